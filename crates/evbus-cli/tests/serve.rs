//! `evbus serve` and `evbus keys create` as processes: the defaults, the bootstrap key.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::copy_dir;

/// A directory laid out like the repository root: `examples/schemas` only.
fn fresh_root() -> PathBuf {
    let dir = support::temp_dir("serve");
    copy_dir(&support::schemas(), &dir.join("examples/schemas"));
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_runs_on_defaults_and_the_first_admin_key_works() {
    let root = fresh_root();
    // Every default but the port (8080 may be taken on a shared machine).
    let served = support::serve(&root, &["--listen", "127.0.0.1:0"], Duration::from_secs(30));
    let mut hint = false;
    while !hint {
        let line = served
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("serve prints the hint");
        hint = line.contains("evbus keys create --data-dir ./.evbus --name admin --admin");
    }
    let base = served.base.clone();
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
    drop(served);
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
            "--source",
            "https://crm.example/orders,eu/*",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("evb_"));
    // The state was new: said on stderr (a key made in the wrong directory is known to no
    // gateway); the next key, in the same state, is made without the note.
    let note = String::from_utf8(out.stderr).unwrap();
    assert!(note.contains("held no gateway state"), "{note}");
    let again = keys_create(&root, &["--name", "erp"]);
    assert!(again.status.success());
    assert!(
        again.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&again.stderr)
    );
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
    // A key that may publish is bound to the sources it may publish under: without one, it
    // is refused and nothing is created.
    let unbound = keys_create(
        &root,
        &["--name", "unbound", "--publish", "afterOrderCreate"],
    );
    assert_eq!(unbound.status.code(), Some(2));
    assert!(unbound.stdout.is_empty());
    let message = String::from_utf8_lossy(&unbound.stderr);
    assert!(message.contains("--source"), "{message}");
    // A publish byte rate of the key's own: 1 to 1 GiB a second, stored as given.
    for bad in ["0", "1073741825", "-1", "fast"] {
        let out = keys_create(&root, &["--name", "b", "--publish-bytes-per-second", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(out.stdout.is_empty(), "{bad}");
    }
    let out = keys_create(
        &root,
        &["--name", "bytes", "--publish-bytes-per-second", "65536"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = evbus_gateway::keys::parse(String::from_utf8(out.stdout).unwrap().trim())
        .unwrap()
        .0
        .to_owned();
    let record = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = evbus_gateway::SqliteStore::open_dir(&root.join("state"))
            .await
            .unwrap();
        let record = evbus_gateway::Store::get_key(&store, &id).await.unwrap();
        store.close().await;
        record.unwrap()
    });
    assert_eq!(record.publish_bytes_per_second, Some(65536));
    let _ = std::fs::remove_dir_all(root);
}

fn keys_create(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(["keys", "create", "--data-dir", "state"])
        .args(args)
        .current_dir(root)
        .output()
        .unwrap()
}

#[test]
fn keys_create_with_the_catalogue_reports_scopes_that_match_nothing() {
    let root = fresh_root();
    let out = keys_create(
        &root,
        &[
            "--name",
            "crm",
            "--subscribe",
            "afterOrder*,afterOdrer*",
            "--schemas",
            "examples/schemas",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: subscribe scope `afterOdrer*` matches none"),
        "{stderr}"
    );
    assert!(!stderr.contains("`afterOrder*`"), "{stderr}");
    // The key is printed, alone, on stdout.
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(key.trim().starts_with("evb_") && key.trim().lines().count() == 1);
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_per_key_from_keys_create_and_by_default_from_the_environment() {
    let root = fresh_root();
    // Bad limits create nothing and exit 2.
    for bad in [
        &["--name", "x", "--rate-limit", "0"][..],
        &["--name", "x", "--rate-limit", "1000001"],
        &["--name", "x", "--rate-limit", "5", "--burst", "0"],
        &["--name", "x", "--rate-limit", "-3"],
        &["--name", "x", "--burst", "5"],
    ] {
        let out = keys_create(&root, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
    let admin = keys_create(&root, &["--name", "admin", "--admin"]);
    assert!(admin.status.success());
    let admin = String::from_utf8(admin.stdout).unwrap().trim().to_owned();
    let slow = keys_create(
        &root,
        &[
            "--name",
            "slow",
            "--rate-limit",
            "5",
            "--rate-limit-burst",
            "6",
        ],
    );
    assert!(
        slow.status.success(),
        "{}",
        String::from_utf8_lossy(&slow.stderr)
    );
    let quick = keys_create(&root, &["--name", "quick", "--rate-limit", "300"]);
    assert!(quick.status.success());

    // A bad default in the environment stops `serve` before it starts.
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(["serve", "--data-dir", "state", "--listen", "127.0.0.1:0"])
        .env("EVBUS_RATE_LIMIT", "many")
        .current_dir(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EVBUS_RATE_LIMIT"));

    // The default from the environment; --rate-limit-burst wins over its variable.
    let served = support::serve_with_env(
        &root,
        &[
            "--data-dir",
            "state",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit-burst",
            "8",
        ],
        &[("EVBUS_RATE_LIMIT", "7"), ("EVBUS_RATE_LIMIT_BURST", "9")],
        Duration::from_secs(30),
    );
    let keys = reqwest::Client::new()
        .get(format!("{}/v1/keys", served.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    let limit = |name: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .map(|k| k["rate_limit"].clone())
            .unwrap_or_else(|| panic!("{name} not in {keys}"))
    };
    let json = |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap();
    assert_eq!(
        limit("admin"),
        json(r#"{"per_second":7,"burst":8,"default":true}"#)
    );
    assert_eq!(
        limit("slow"),
        json(r#"{"per_second":5,"burst":6,"default":false}"#)
    );
    assert_eq!(
        limit("quick"),
        json(r#"{"per_second":300,"burst":600,"default":false}"#)
    );
    drop(served);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn serve_never_prints_the_password_of_its_transport_url() {
    let root = fresh_root();
    let served = support::serve(
        &root,
        &[
            "--listen",
            "127.0.0.1:0",
            "--transport",
            "memory://user:s3cretpw@host",
        ],
        Duration::from_secs(30),
    );
    assert!(
        served.banner.contains("(transport memory://user:***@host,"),
        "{}",
        served.banner
    );
    assert!(!served.banner.contains("s3cretpw"), "{}", served.banner);
    drop(served);
    let _ = std::fs::remove_dir_all(root);
}

/// A token given as the user name (`nats://TOKEN@host`; memory URLs take user info too) is
/// hidden from the startup line, as a password is; it was printed in clear.
#[test]
fn serve_never_prints_a_token_given_as_its_transport_urls_user_name() {
    let root = fresh_root();
    let served = support::serve(
        &root,
        &[
            "--listen",
            "127.0.0.1:0",
            "--transport",
            "memory://s3cr3t@x",
        ],
        Duration::from_secs(30),
    );
    assert!(
        served.banner.contains("(transport memory://***@x,"),
        "{}",
        served.banner
    );
    assert!(!served.banner.contains("s3cr3t"), "{}", served.banner);
    drop(served);
    // The same from EVBUS_TRANSPORT, which keeps it off the command line.
    let served = support::serve_with_env(
        &root,
        &["--listen", "127.0.0.1:0"],
        &[("EVBUS_TRANSPORT", "memory://s3cr3t@x")],
        Duration::from_secs(30),
    );
    assert!(
        served.banner.contains("(transport memory://***@x,"),
        "{}",
        served.banner
    );
    drop(served);
    let _ = std::fs::remove_dir_all(root);
}

/// A store URL's `?password=` (passed through to the PostgreSQL driver) is hidden from the
/// error that names the store; it was printed in clear.
#[test]
fn keys_create_never_prints_the_password_of_its_store_url() {
    let root = fresh_root();
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "keys",
            "create",
            "--name",
            "a",
            "--store",
            "postgres://gw@127.0.0.1:1/db?password=hunter2",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        stderr.contains("postgres://gw@127.0.0.1:1/db?password=***"),
        "the store is still named: {stderr}"
    );
    let _ = std::fs::remove_dir_all(root);
}

/// SIGTERM (what `kill`, systemd, Docker and Kubernetes send) stops the gateway as Ctrl-C
/// does: it says so and exits 0. It used to kill the process (no exit code, no message).
#[test]
fn serve_stops_gracefully_on_sigterm() {
    let root = fresh_root();
    let mut served = support::serve(
        &root,
        &["--listen", "127.0.0.1:0", "--transport", "memory://"],
        Duration::from_secs(30),
    );
    let pid = served.child.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = served.child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "evbus serve still runs 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The rest of stderr, to its end (it closed with the process).
    let mut rest = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match served.lines.recv_timeout(left) {
            Ok(line) => rest.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("stderr still open after the process exited: {e}; {rest:?}"),
        }
    }
    assert_eq!(status.code(), Some(0), "{status:?}; stderr: {rest:?}");
    assert!(
        rest.iter().any(|l| l == "evbus gateway stopped"),
        "{rest:?}"
    );
    drop(served);
    let _ = std::fs::remove_dir_all(root);
}

/// `serve` logs to stderr, and the PostgreSQL driver logs each store URL parameter it does
/// not know with its value (`?sslpassword=`, libpq's name, which sqlx does not take): that
/// log line is left out, and the error names the store with its `?password=` hidden.
#[test]
fn serve_never_prints_a_secret_of_its_store_url() {
    let root = fresh_root();
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--transport",
            "memory://",
            "--store",
            "postgres://gw@127.0.0.1:1/db?sslpassword=hunter2&password=hunter2",
        ])
        .env_remove("EVBUS_LOG")
        .current_dir(&root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(stderr.contains("password=***"), "{stderr}");
    let _ = std::fs::remove_dir_all(root);
}
