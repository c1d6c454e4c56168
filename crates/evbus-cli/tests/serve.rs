//! `evbus serve` and `evbus keys create` as processes: the defaults, the bootstrap key.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A directory laid out like the repository root: `examples/schemas` only.
fn fresh_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "serve-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    let schemas = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas");
    copy_dir(&schemas, &dir.join("examples/schemas"));
    dir
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_runs_on_defaults_and_the_first_admin_key_works() {
    let root = fresh_root();
    // Every default but the port (8080 may be taken on a shared machine).
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_evbus"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let mut addr = None;
    let mut hint = false;
    while addr.is_none() || !hint {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve prints its address and the hint");
        if let Some(rest) = line.strip_prefix("evbus gateway listening on http://") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("evbus keys create --data-dir ./.evbus --name admin --admin") {
            hint = true;
        }
    }
    let base = format!("http://{}", addr.unwrap());
    assert!(
        root.join(".evbus/gateway.sqlite3").is_file(),
        "state under ./.evbus"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "keys",
            "create",
            "--data-dir",
            "./.evbus",
            "--name",
            "admin",
            "--admin",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.trim();
    assert_eq!(stdout.lines().count(), 1, "only the key on stdout");
    assert!(key.starts_with("evb_"));

    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let keys = http
        .get(format!("{base}/v1/keys"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status().as_u16(), 200);
    let body = keys.text().await.unwrap();
    assert!(body.contains("\"admin\"") && !body.contains(&key[21..]));
    let denied = http.get(format!("{base}/v1/keys")).send().await.unwrap();
    assert_eq!(denied.status().as_u16(), 401);
    drop(child);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn keys_create_takes_scopes_and_refuses_bad_patterns() {
    let root = fresh_root();
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "keys",
            "create",
            "--data-dir",
            "state",
            "--name",
            "crm",
            "--subscribe",
            "afterOrder*,afterProductUpdate",
            "--publish",
            "afterOrderCreate",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("evb_"));
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "keys",
            "create",
            "--data-dir",
            "state",
            "--name",
            "bad",
            "--subscribe",
            "a b",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(root);
}
