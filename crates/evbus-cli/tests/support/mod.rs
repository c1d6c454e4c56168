//! Helpers shared by the CLI's integration tests: running `evbus`, the example catalogue, a
//! running `evbus serve`.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository's example catalogue.
pub fn schemas() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

/// An example payload (`examples/schemas/payloads/NAME`) as one line of JSON.
pub fn payload(name: &str) -> String {
    let path = schemas().join("payloads").join(name);
    let value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_string(&value).unwrap()
}

/// Runs `evbus ARGS` to the end, without stdin.
pub fn evbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run evbus")
}

/// A command's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A JSON Lines file of `lines` in a directory of this test process.
pub fn jsonl(name: &str, lines: &[String]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A fresh directory under the target's temporary directory.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{what}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the directory tree `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
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

/// Whether an unreachable broker must fail the test rather than skip it: `CI` or
/// `EVBUS_REQUIRE_BROKERS` set to `1`, `true` or `yes` (any case), the rule of
/// `evbus_conformance::require_brokers` that every adapter's tests follow. Not a
/// dependency on evbus-conformance so that the CLI's tests build without the suite.
pub fn require_brokers() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "1" || v == "true" || v == "yes"
        })
    })
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `evbus serve`: the process, its base URL and the rest of its stderr.
pub struct Served {
    pub child: Killed,
    /// `http://ADDR`.
    pub base: String,
    /// The first stderr line, `evbus gateway listening on http://ADDR (...)`.
    pub banner: String,
    /// Every later stderr line, as it comes.
    pub lines: Receiver<String>,
}

/// Starts `evbus serve ARGS` in `dir` and waits (up to `wait`) for it to say where it listens.
/// Panics with what it printed if it exits or stays silent.
pub fn serve(dir: &Path, args: &[&str], wait: Duration) -> Served {
    serve_with_env(dir, args, &[], wait)
}

/// [`serve`] with environment variables `envs` set for the process.
pub fn serve_with_env(dir: &Path, args: &[&str], envs: &[(&str, &str)], wait: Duration) -> Served {
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_evbus"))
            .arg("serve")
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + wait;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!(
                "evbus serve did not say where it listens within {wait:?} ({e}); it printed:\n{}",
                seen.join("\n")
            ),
        };
        if let Some(rest) = line.strip_prefix("evbus gateway listening on http://") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            return Served {
                child,
                base: format!("http://{addr}"),
                banner: line,
                lines,
            };
        }
        seen.push(line);
    }
}
