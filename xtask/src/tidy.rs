//! `cargo xtask tidy`: small repository hygiene checks, also run as a `#[test]` so that
//! `cargo test --workspace` keeps them.
//!
//! - every crate under `crates/` has a `README.md`, and every package (crates, `xtask`,
//!   `examples`) opts into the workspace lints with `[lints] workspace = true`;
//! - every `docs/adr/*.md` is named `NNNN-title.md`, with no number used twice;
//! - the README shows the two set-up commands verbatim, each in its own code block.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::{Result, project_root};

/// The README's set-up commands: run the main job, run the tests.
pub(crate) const SETUP_COMMANDS: [&str; 2] =
    ["cargo run -p evbus-cli -- serve", "cargo xtask test"];

pub(crate) fn run() -> Result<()> {
    let problems = check(&project_root());
    if problems.is_empty() {
        println!("tidy: ok");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("tidy: {problem}");
    }
    Err(format!("{} tidy problem(s)", problems.len()))
}

/// Every problem found under `root`; empty when tidy.
fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    check_packages(root, &mut problems);
    check_adrs(root, &mut problems);
    check_readme(root, &mut problems);
    problems
}

fn check_packages(root: &Path, problems: &mut Vec<String>) {
    let mut packages = vec!["xtask".to_owned(), "examples".to_owned()];
    match fs::read_dir(root.join("crates")) {
        Ok(entries) => {
            let mut crates: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("Cargo.toml").is_file())
                .map(|e| format!("crates/{}", e.file_name().to_string_lossy()))
                .collect();
            crates.sort();
            for krate in &crates {
                if !root.join(krate).join("README.md").is_file() {
                    problems.push(format!("{krate} has no README.md"));
                }
            }
            packages.extend(crates);
        }
        Err(e) => problems.push(format!("cannot list crates/: {e}")),
    }
    for package in packages {
        let manifest = root.join(&package).join("Cargo.toml");
        let Ok(text) = fs::read_to_string(&manifest) else {
            problems.push(format!("{package}/Cargo.toml is missing or unreadable"));
            continue;
        };
        if !uses_workspace_lints(&text) {
            problems.push(format!(
                "{package}/Cargo.toml does not opt into the workspace lints (`[lints]` with \
                 `workspace = true`)"
            ));
        }
    }
}

/// Whether a manifest has a `[lints]` table containing `workspace = true`.
fn uses_workspace_lints(manifest: &str) -> bool {
    let mut in_lints = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_lints = line == "[lints]";
        } else if in_lints && line.split_whitespace().collect::<String>() == "workspace=true" {
            return true;
        }
    }
    false
}

fn check_adrs(root: &Path, problems: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(root.join("docs/adr")) else {
        problems.push("docs/adr/ is missing".to_owned());
        return;
    };
    let mut numbers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".md") {
            continue;
        }
        match adr_number(&name) {
            Some(n) => numbers.entry(n.to_owned()).or_default().push(name),
            None => problems.push(format!(
                "docs/adr/{name} is not named NNNN-title.md (four digits, a dash, a lowercase \
                 kebab-case title)"
            )),
        }
    }
    for (n, names) in numbers {
        if names.len() > 1 {
            problems.push(format!("ADR number {n} is used by {}", names.join(" and ")));
        }
    }
}

/// `Some("0001")` for `0001-event-bus.md`.
fn adr_number(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".md")?;
    let (number, title) = stem.split_once('-')?;
    let number_ok = number.len() == 4 && number.bytes().all(|b| b.is_ascii_digit());
    let title_ok = !title.is_empty()
        && !title.starts_with('-')
        && !title.ends_with('-')
        && title
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (number_ok && title_ok).then_some(number)
}

fn check_readme(root: &Path, problems: &mut Vec<String>) {
    let Ok(readme) = fs::read_to_string(root.join("README.md")) else {
        problems.push("README.md is missing".to_owned());
        return;
    };
    let blocks = code_blocks(&readme);
    for command in SETUP_COMMANDS {
        if !blocks.iter().any(|b| b.trim() == command) {
            problems.push(format!(
                "README.md must show `{command}` alone in a code block (a set-up command)"
            ));
        }
    }
}

/// The contents of the fenced (```) code blocks of a Markdown text.
fn code_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(String::new()),
            }
        } else if let Some(block) = &mut current {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy() {
        let problems = check(&project_root());
        assert!(
            problems.is_empty(),
            "tidy found problems:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn lints_table_is_recognised() {
        assert!(uses_workspace_lints(
            "[package]\nname = \"x\"\n\n[lints]\nworkspace = true\n"
        ));
        assert!(!uses_workspace_lints("[lints.rust]\nworkspace = true\n"));
        assert!(!uses_workspace_lints(
            "[lints]\n[package]\nworkspace = true\n"
        ));
    }

    #[test]
    fn adr_names() {
        assert_eq!(adr_number("0001-event-bus.md"), Some("0001"));
        assert_eq!(adr_number("0002-settlement-in-core.md"), Some("0002"));
        for bad in [
            "1-event-bus.md",
            "0001_event_bus.md",
            "0001-.md",
            "0001-Event.md",
            "adr.md",
        ] {
            assert_eq!(adr_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn setup_commands_must_stand_alone_in_a_block() {
        let md = "# x\n\n```sh\ncargo xtask test\n```\n\nthen `cargo run --example quickstart`\n";
        let blocks = code_blocks(md);
        assert!(blocks.iter().any(|b| b.trim() == "cargo xtask test"));
        assert!(
            !blocks
                .iter()
                .any(|b| b.trim() == "cargo run --example quickstart")
        );
    }
}
