//! `cargo xtask contract`: the gateway's OpenAPI document checked against a real
//! `evbus serve` with schemathesis, every phase (examples, coverage, fuzzing, stateful) and
//! every check. A step of `cargo xtask test`.
//!
//! schemathesis lives in a private virtualenv (`$HOME/.cache/evbus/schemathesis`, or
//! `EVBUS_SCHEMATHESIS_VENV`), created with the pinned version when missing. The gateway runs
//! on the memory transport with a fresh data directory, its rate limit lifted, and an admin
//! key that may also publish and subscribe to every type, so that no operation is only ever
//! answered 403. `GET /v1/stream` is excluded: a stream never ends, so no response to check.
//! The seed is fixed for a reproducible CI run; `EVBUS_SCHEMATHESIS_SEED=random` (or a
//! number) explores further. Settings: `crates/evbus-gateway/tests/schemathesis.toml`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::{self, Kind};
use crate::{Result, cargo, project_root, run_streaming};

/// The schemathesis release the contract is checked with.
const VERSION: &str = "4.32.5";
/// The seed of a CI run.
const SEED: &str = "20261130";

/// Runs the contract test; `Ok(summary)` when it passes.
pub(crate) fn run() -> Result<String> {
    let st = schemathesis()?;
    let evbus = evbus_binary()?;
    let data = std::env::temp_dir().join(format!("evbus-contract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let key = create_admin_key(&evbus, &data)?;
    let gateway = Gateway::start(&evbus, &data)?;
    let mut cmd = Command::new(&st);
    cmd.arg("--config-file")
        .arg(project_root().join("crates/evbus-gateway/tests/schemathesis.toml"))
        .arg("run")
        .arg(format!("{}/v1/openapi.json", gateway.base))
        .args(["--checks", "all", "--exclude-path", "/v1/stream"])
        .args(["--max-examples", "50", "--no-color"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {key}"));
    match std::env::var("EVBUS_SCHEMATHESIS_SEED").as_deref() {
        Ok("random") => {}
        Ok(seed) => {
            cmd.args(["--seed", seed]);
        }
        Err(_) => {
            cmd.args(["--seed", SEED]);
        }
    }
    let mut summary = None;
    let passed = run_streaming(cmd, |line| {
        if line.contains(" generated, ") {
            summary = Some(line.trim().to_owned());
        }
    })?;
    drop(gateway);
    let _ = std::fs::remove_dir_all(&data);
    let summary = summary.unwrap_or_else(|| "no summary line".into());
    if passed {
        Ok(format!(
            "contract: schemathesis {VERSION}, all phases and checks: {summary}"
        ))
    } else {
        Err(format!(
            "schemathesis found the gateway and its OpenAPI document disagreeing ({summary}); run `cargo xtask contract` to see the cases"
        ))
    }
}

/// The `st` program of the private virtualenv, installed when missing.
fn schemathesis() -> Result<PathBuf> {
    let venv = std::env::var_os("EVBUS_SCHEMATHESIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/evbus/schemathesis"));
    let st = venv.join("bin/st");
    let installed = Command::new(&st)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(VERSION));
    if installed {
        return Ok(st);
    }
    println!("installing schemathesis {VERSION} into {}", venv.display());
    let venv_made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map_err(|e| format!("python3 -m venv (python3 is needed for schemathesis): {e}"))?;
    if !venv_made.success() {
        return Err(format!(
            "python3 -m venv {} failed (Debian: apt-get install python3-venv)",
            venv.display()
        ));
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", &format!("schemathesis=={VERSION}")])
        .status()
        .map_err(|e| format!("pip install schemathesis: {e}"))?;
    if !pip.success() {
        return Err(format!("pip install schemathesis=={VERSION} failed"));
    }
    Ok(st)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// The `evbus` binary of this checkout, built (or found up to date) first.
pub(crate) fn evbus_binary() -> Result<PathBuf> {
    if artifacts::from_workspace_test_build() {
        return Ok(artifacts::find("evbus-cli", "evbus", Kind::Bin)?.path);
    }
    let built = cargo(&["build", "--quiet", "-p", "evbus-cli", "--bin", "evbus"])
        .status()
        .map_err(|e| format!("cargo build -p evbus-cli: {e}"))?;
    if !built.success() {
        return Err("building the evbus binary failed".into());
    }
    Ok(target_dir().join("debug/evbus"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// `evbus keys create --admin` with every scope, in `data`; the key.
fn create_admin_key(evbus: &Path, data: &Path) -> Result<String> {
    let out = Command::new(evbus)
        .args(["keys", "create", "--name", "contract", "--admin"])
        .args([
            "--subscribe",
            "*",
            "--publish",
            "*",
            "--source",
            "*",
            "--data-dir",
        ])
        .arg(data)
        .output()
        .map_err(|e| format!("evbus keys create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "evbus keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running `evbus serve`, killed on drop.
struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    fn start(evbus: &Path, data: &Path) -> Result<Gateway> {
        let mut child = Command::new(evbus)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--transport",
                "memory://",
            ])
            .args(["--rate-limit", "1000000", "--rate-limit-burst", "1000000"])
            .arg("--schemas")
            .arg(project_root().join("examples/schemas"))
            .arg("--data-dir")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting evbus serve: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the server never blocks.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(rest) = line.strip_prefix("evbus gateway listening on http://") {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return Ok(Gateway {
                    child,
                    base: format!("http://{addr}"),
                });
            }
            seen.push(line);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "evbus serve did not start listening:\n{}",
            seen.join("\n")
        ))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
