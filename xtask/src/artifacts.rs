//! Where the programs the later steps of `cargo xtask test` run come from.
//!
//! Cargo resolves the features of dependencies for the packages a command selects, so
//! `cargo test -p evbus-redis --test conformance` or `cargo build -p evbus-cli` after
//! `cargo test --workspace` compiles much of the dependency graph again with other features.
//! On a fresh machine that was about seven of the 44 minutes of `cargo xtask test` (the chaos
//! binaries 1 m 50 s, the five container conformance targets about 5 m, the `evbus` binary of
//! the contract step). Within `cargo xtask test` the `test` step has just built every test
//! target, binary and example of the workspace, so the steps after it run those executables
//! ([`find`] asks cargo for them: `cargo test --workspace --no-run`, which has nothing left
//! to build by then). Run on their own (`cargo xtask chaos`, `cargo xtask conformance
//! --containers`, `cargo xtask contract`), the commands build just their package, which is
//! quicker after a change when only one adapter is wanted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Result, cargo, display};

static WORKSPACE_TEST_BUILD: AtomicBool = AtomicBool::new(false);

/// From now on, [`from_workspace_test_build`] is true: called by `cargo xtask test` once its
/// `test` step has built the workspace.
pub(crate) fn use_workspace_test_build() {
    WORKSPACE_TEST_BUILD.store(true, Ordering::SeqCst);
}

/// Whether the steps run the executables of the workspace's test build (see the module).
pub(crate) fn from_workspace_test_build() -> bool {
    WORKSPACE_TEST_BUILD.load(Ordering::SeqCst)
}

/// One executable of `cargo test --workspace --no-run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Executable {
    /// The program.
    pub(crate) path: PathBuf,
    /// Its package's directory: where `cargo test` runs a test binary.
    pub(crate) dir: PathBuf,
}

/// What an executable is: a test harness (an integration test, or the unit tests of a
/// library or binary) or the binary itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Test,
    Bin,
}

/// The executable of target `target` of package `package` in the workspace's test build
/// (built first if anything is out of date).
pub(crate) fn find(package: &str, target: &str, kind: Kind) -> Result<Executable> {
    let mut found = find_all(&[(package, target, kind)])?;
    Ok(found.remove(0))
}

/// [`find`] for several executables, in the order asked, with one call of cargo.
pub(crate) fn find_all(wanted: &[(&str, &str, Kind)]) -> Result<Vec<Executable>> {
    let mut cmd = cargo(&[
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let shown = display(&cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut found: Vec<Option<Executable>> = vec![None; wanted.len()];
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading `{shown}`: {e}"))?;
        for (slot, &(package, target, kind)) in found.iter_mut().zip(wanted) {
            if slot.is_none() {
                *slot = executable_in(&line, package, target, kind);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for `{shown}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{shown}` failed"));
    }
    found
        .into_iter()
        .zip(wanted)
        .map(|(executable, (package, target, kind))| {
            executable.ok_or_else(|| {
                format!(
                    "`{shown}` built no {kind:?} executable of target `{target}` in package \
                     `{package}`"
                )
            })
        })
        .collect()
}

/// The executable a line of cargo's JSON messages announces, if it is the one wanted.
fn executable_in(line: &str, package: &str, target: &str, kind: Kind) -> Option<Executable> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let path = message["executable"].as_str()?;
    if message["target"]["name"] != target
        || package_name(message["package_id"].as_str()?) != Some(package)
    {
        return None;
    }
    // A binary target is built twice by `cargo test`: the program, and its unit tests.
    let test = message["profile"]["test"].as_bool()?;
    if test != (kind == Kind::Test) {
        return None;
    }
    let manifest = Path::new(message["manifest_path"].as_str()?);
    Some(Executable {
        path: PathBuf::from(path),
        dir: manifest.parent()?.to_path_buf(),
    })
}

/// The package name of a cargo package id: `path+file:///w/crates/evbus-redis#0.1.0` (the
/// name is the directory's) or `path+file:///w/examples/sqlite-adapter#evbus-example-sqlite@0.1.0`.
fn package_name(id: &str) -> Option<&str> {
    let (url, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _version)) => Some(name),
        None => url.rsplit('/').next().filter(|name| !name.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_come_from_the_fragment_or_the_directory() {
        assert_eq!(
            package_name("path+file:///w/crates/evbus-redis#0.1.0"),
            Some("evbus-redis")
        );
        assert_eq!(
            package_name("path+file:///w/examples/sqlite-adapter#evbus-example-sqlite@0.1.0"),
            Some("evbus-example-sqlite")
        );
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#serde@1.0.229"),
            Some("serde")
        );
        assert_eq!(package_name("no fragment"), None);
    }

    fn artifact(target: &str, test: bool, executable: &str) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": "path+file:///w/crates/evbus-integration-tests#0.0.0",
            "manifest_path": "/w/crates/evbus-integration-tests/Cargo.toml",
            "target": {"name": target, "kind": ["bin"]},
            "profile": {"test": test},
            "executable": executable,
        })
        .to_string()
    }

    #[test]
    fn a_binary_and_its_unit_tests_are_told_apart() {
        let program = artifact("chaos-solo", false, "/t/debug/chaos-solo");
        let unit_tests = artifact("chaos-solo", true, "/t/debug/deps/chaos_solo-1f2e");
        let wanted = |line: &str, kind| {
            executable_in(line, "evbus-integration-tests", "chaos-solo", kind)
                .map(|e| (e.path, e.dir))
        };
        let dir = PathBuf::from("/w/crates/evbus-integration-tests");
        assert_eq!(
            wanted(&program, Kind::Bin),
            Some((PathBuf::from("/t/debug/chaos-solo"), dir.clone()))
        );
        assert_eq!(wanted(&unit_tests, Kind::Bin), None);
        assert_eq!(
            wanted(&unit_tests, Kind::Test),
            Some((PathBuf::from("/t/debug/deps/chaos_solo-1f2e"), dir))
        );
        assert_eq!(
            executable_in(&program, "evbus-cli", "chaos-solo", Kind::Bin),
            None
        );
        assert_eq!(
            executable_in(
                &program,
                "evbus-integration-tests",
                "chaos-emitter",
                Kind::Bin
            ),
            None
        );
    }

    #[test]
    fn other_messages_are_passed_over() {
        let no_executable = serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": "path+file:///w/crates/evbus#0.1.0",
            "manifest_path": "/w/crates/evbus/Cargo.toml",
            "target": {"name": "evbus", "kind": ["lib"]},
            "profile": {"test": false},
            "executable": null,
        })
        .to_string();
        assert_eq!(
            executable_in(&no_executable, "evbus", "evbus", Kind::Bin),
            None
        );
        let finished = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(executable_in(finished, "evbus", "evbus", Kind::Bin), None);
        assert_eq!(executable_in("not json", "evbus", "evbus", Kind::Bin), None);
    }
}
