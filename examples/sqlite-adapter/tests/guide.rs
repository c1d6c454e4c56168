//! `docs/adapter-guide.md` quotes this example. These tests keep every quote true: each
//! ```rust and ```toml block of the guide must appear verbatim (up to a constant indent) in
//! the example file named just above it, every conformance case the guide names must exist,
//! and the case count the guide and the README quote must be the catalogue's. So the guide's
//! snippets are compiled (as part of this crate) and fail here when they drift.

use std::path::{Path, PathBuf};

const GUIDE: &str = include_str!("../../../docs/adapter-guide.md");
const EXAMPLE: &str = "examples/sqlite-adapter/";

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fenced block of the guide: its language, the example file it quotes, its lines and where
/// it starts.
struct Block {
    lang: String,
    source: Option<String>,
    lines: Vec<String>,
    at: usize,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    let mut last_prose = "";
    while let Some((n, line)) = lines.next() {
        let Some(lang) = line.strip_prefix("```") else {
            if !line.trim().is_empty() {
                last_prose = line;
            }
            continue;
        };
        let source = last_prose
            .split('`')
            .find(|part| part.starts_with(EXAMPLE))
            .map(str::to_owned);
        let body = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| !l.starts_with("```"))
            .map(str::to_owned)
            .collect();
        blocks.push(Block {
            lang: lang.trim().to_owned(),
            source,
            lines: body,
            at: n + 1,
        });
        last_prose = "";
    }
    blocks
}

/// Whether `block` appears in `file` as consecutive lines, all with the same extra indent.
fn quotes(file: &str, block: &[String]) -> bool {
    let file: Vec<&str> = file.lines().collect();
    (0..file.len()).any(|start| {
        let Some(indent) = file[start].strip_suffix(block[0].as_str()) else {
            return false;
        };
        indent.trim().is_empty()
            && block.len() <= file.len() - start
            && block.iter().zip(&file[start..]).all(|(quoted, line)| {
                if quoted.is_empty() {
                    line.trim().is_empty()
                } else {
                    line.strip_prefix(indent) == Some(quoted.as_str())
                }
            })
    })
}

#[test]
fn every_rust_and_toml_block_of_the_guide_is_quoted_from_the_example() {
    let checked: Vec<Block> = blocks(GUIDE)
        .into_iter()
        .filter(|b| b.lang == "rust" || b.lang == "toml")
        .collect();
    assert!(
        checked.iter().filter(|b| b.lang == "rust").count() >= 8,
        "the guide should quote the example's code; found fewer than 8 ```rust blocks"
    );
    let mut problems = Vec::new();
    for block in &checked {
        let Some(source) = &block.source else {
            problems.push(format!(
                "line {}: a ```{} block must be introduced by a line naming the example file it \
                 quotes (`{EXAMPLE}...`)",
                block.at, block.lang
            ));
            continue;
        };
        let path = repository_root().join(source);
        let Ok(file) = std::fs::read_to_string(&path) else {
            problems.push(format!("line {}: cannot read {}", block.at, path.display()));
            continue;
        };
        if block.lines.is_empty() || !quotes(&file, &block.lines) {
            problems.push(format!(
                "line {}: this ```{} block is not (or no longer) in {source}; copy it from there \
                 again",
                block.at, block.lang
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_conformance_case_the_guide_names_exists() {
    let catalogue = std::fs::read_to_string(
        repository_root().join("crates/evbus-conformance/src/cases/mod.rs"),
    )
    .expect("the conformance catalogue");
    let named: Vec<&str> = GUIDE
        .split('`')
        .filter(|word| {
            ["topic_", "queue_", "lifecycle_", "schema_", "bus_"]
                .iter()
                .any(|p| word.starts_with(p))
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(!named.is_empty(), "the guide names no conformance case");
    let missing: Vec<&&str> = named
        .iter()
        .filter(|name| !catalogue.contains(&format!("::{name}")))
        .collect();
    assert!(
        missing.is_empty(),
        "the guide names cases that do not exist: {missing:?}"
    );
    assert!(
        !GUIDE.contains("DESIGN"),
        "DESIGN.md is not in the repository"
    );
}

/// The cases of the conformance catalogue: each is named once there, as
/// `<module>::<module>_<behaviour>`.
fn catalogue_cases() -> usize {
    let catalogue = std::fs::read_to_string(
        repository_root().join("crates/evbus-conformance/src/cases/mod.rs"),
    )
    .expect("the conformance catalogue");
    [
        "::topic_",
        "::queue_",
        "::lifecycle_",
        "::schema_",
        "::bus_",
    ]
    .iter()
    .map(|prefix| catalogue.matches(prefix).count())
    .sum()
}

#[test]
fn the_guide_and_the_readme_quote_the_current_case_count() {
    let cases = catalogue_cases();
    // Replay and the three broker-outage cases are ignored; every other case passes.
    let summary = format!(
        "conformance sqlite-example: {} passed, 0 failed, 4 ignored",
        cases - 4
    );
    let readme = include_str!("../README.md");
    for (name, text) in [("docs/adapter-guide.md", GUIDE), ("README.md", readme)] {
        assert!(
            text.contains(&summary) && text.contains(&format!("{cases} cases")),
            "the catalogue has {cases} cases: {name} should say so and quote `{summary}`"
        );
    }
}

/// Non-blank lines of `src/` that are not comments (the README states the count).
fn adapter_lines() -> usize {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    std::fs::read_dir(&src)
        .expect("src/")
        .map(|entry| std::fs::read_to_string(entry.expect("a source file").path()).expect("UTF-8"))
        .flat_map(|text| {
            text.lines()
                .map(str::trim)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|line| !line.is_empty() && !line.starts_with("//"))
        .count()
}

#[test]
fn the_readme_states_the_adapter_size() {
    let readme = include_str!("../README.md");
    let lines = adapter_lines();
    assert!(
        readme.contains(&format!("**{lines} lines**")),
        "src/ has {lines} lines of adapter code (non-blank, non-comment); update README.md"
    );
}
