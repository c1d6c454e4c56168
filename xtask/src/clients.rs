//! `cargo xtask clients`: the TypeScript client's tests (`clients/typescript`, Node's own test
//! runner) against a real `evbus serve`. A step of `cargo xtask test`.
//!
//! Dependencies come from the committed lockfile (`npm ci`). Without Node.js 20 or later the
//! step says so in one line and is skipped, unless `CI` or `EVBUS_REQUIRE_BROKERS` is set,
//! where that is a failure.

use std::process::Command;

use crate::{Result, containers, contract, project_root, run_streaming};

/// Runs the client's tests; a summary line, or why they were skipped.
pub(crate) fn run() -> Result<String> {
    let dir = project_root().join("clients/typescript");
    let node = Command::new("node").arg("--version").output();
    let major = node
        .as_ref()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            v.trim()
                .trim_start_matches('v')
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        });
    if major.is_none_or(|m| m < 20) {
        let why = "Node.js 20 or later is not installed (node --version)";
        if containers::evbus_required() {
            return Err(format!("the TypeScript client's tests need {why}"));
        }
        return Ok(format!(
            "typescript client: SKIPPED, {why} (under CI that is a failure)"
        ));
    }
    let evbus = contract::evbus_binary()?;
    let mut ci = Command::new("npm");
    ci.args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir);
    if !run_streaming(ci, |_| {})? {
        return Err("npm ci in clients/typescript failed".into());
    }
    let mut test = Command::new("npm");
    test.arg("test").current_dir(&dir).env("EVBUS_BIN", &evbus);
    let (mut passed, mut failed) = (None, None);
    let ok = run_streaming(test, |line| {
        let count = |prefix: &str| line.strip_prefix(prefix)?.trim().parse::<u64>().ok();
        passed = passed.or(count("# pass "));
        failed = failed.or(count("# fail "));
    })?;
    let summary = format!(
        "typescript client: {} passed, {} failed",
        passed.unwrap_or(0),
        failed.unwrap_or(0)
    );
    if ok && passed.is_some_and(|n| n > 0) {
        Ok(summary)
    } else {
        Err(format!("npm test in clients/typescript failed ({summary})"))
    }
}
