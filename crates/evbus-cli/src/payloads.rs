//! The payloads of `evbus emit`, read from foreign bytes (`--data JSON`, `--data-file FILE`)
//! and checked against the catalogue.
//!
//! Whatever the bytes, this never panics: each payload is a JSON value or the reason it is
//! not one. The module uses nothing else of the crate, so `tests/payloads.rs` includes it
//! (`#[path]`) and drives it with arbitrary bytes: the crate has no library target.

use evbus::Catalog;
use serde_json::Value;

/// The UTF-8 byte order mark, ignored at the start of a data file.
const BOM: &[u8] = "\u{feff}".as_bytes();

/// One payload: its line in the data file (`None` for `--data`) and its JSON value, or why
/// the line is not a JSON document (`not UTF-8 …`, `not JSON: …`).
#[derive(Debug)]
pub(crate) struct Payload {
    pub(crate) line: Option<usize>,
    pub(crate) data: Result<Value, String>,
}

/// The payload of `--data`.
pub(crate) fn from_arg(text: &str) -> Payload {
    Payload {
        line: None,
        data: parse_json(text),
    }
}

/// The payloads of a `--data-file` (JSON Lines): one per line, lines split at `\n` (a `\r`
/// before it is dropped), lines holding only whitespace skipped, a UTF-8 byte order mark at
/// the start ignored. A line that is not UTF-8 or not JSON is a payload in error, named by
/// its line number (1-based).
pub(crate) fn from_file(bytes: &[u8]) -> Vec<Payload> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let data = match std::str::from_utf8(line) {
                Ok(text) if text.trim().is_empty() => return None,
                Ok(text) => parse_json(text),
                Err(e) => {
                    // Blank apart from invalid bytes is still a line in error, not skipped.
                    Err(format!(
                        "not UTF-8 text (invalid byte at column {})",
                        e.valid_up_to() + 1
                    ))
                }
            };
            Some(Payload {
                line: Some(i + 1),
                data,
            })
        })
        .collect()
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// Every problem of every payload against type `ty` of `catalog`, as
/// `line N: <pointer>: <message>` (without the line prefix for `--data`), and how many
/// payloads have one.
pub(crate) fn check(catalog: &Catalog, ty: &str, payloads: &[Payload]) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut refused = 0;
    for payload in payloads {
        let before = problems.len();
        let at = payload
            .line
            .map(|n| format!("line {n}: "))
            .unwrap_or_default();
        match &payload.data {
            Err(reason) => problems.push(format!("{at}{reason}")),
            Ok(data) => {
                if let Err(errors) = catalog.validate(ty, data) {
                    if errors.problem() == &evbus::schema::ValidationProblem::Invalid {
                        for v in &errors {
                            problems.push(format!("{at}{v}"));
                        }
                    } else {
                        problems.push(format!("{at}{errors}"));
                    }
                }
            }
        }
        if problems.len() > before {
            refused += 1;
        }
    }
    (problems, refused)
}
