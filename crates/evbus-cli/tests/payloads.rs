//! Property tests of `evbus emit`'s payload parsing (`--data`, `--data-file`), which takes
//! foreign bytes (issue 18): whatever the bytes (random, invalid UTF-8, cut short, deeply
//! nested, huge numbers, a byte order mark), parsing and checking never panic; a refusal is
//! a payload in error named by its line (`not UTF-8 text …`, `not JSON: …`), and the command
//! answers it with exit status 1 and nothing emitted.

mod support;

#[allow(dead_code)]
#[path = "../src/payloads.rs"]
mod payloads;

use std::sync::LazyLock;

use evbus::Catalog;
use proptest::prelude::*;
use serde_json::Value;
use support::*;

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| Catalog::from_dir(schemas()).unwrap());

/// Types of the example catalogue, plus one it does not have.
const TYPES: [&str; 3] = ["afterOrderCancel", "afterOrderCreate", "noSuchType"];

/// What every payload of a file must look like, whatever the bytes: a 1-based line number
/// within the file, lines in order, and either a value or one of the documented reasons. The
/// checker then names every payload in error by its line.
fn check_file(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = payloads::from_file(bytes);
    let lines = bytes.split(|b| *b == b'\n').count();
    let mut last = 0;
    for p in &parsed {
        let n = p.line.expect("file payloads have a line number");
        prop_assert!(n > last && n <= lines, "line {n} after {last} of {lines}");
        last = n;
        if let Err(reason) = &p.data {
            prop_assert!(
                reason.starts_with("not UTF-8 text (invalid byte at column ")
                    || reason.starts_with("not JSON: "),
                "{reason}"
            );
        }
    }
    for ty in TYPES {
        let (problems, refused) = payloads::check(&CATALOG, ty, &parsed);
        prop_assert!(refused <= parsed.len());
        for p in &parsed {
            if let (Some(n), Err(reason)) = (p.line, &p.data) {
                let expected = format!("line {n}: {reason}");
                prop_assert!(problems.contains(&expected), "{expected} in {problems:?}");
            }
        }
        let in_error = parsed.iter().filter(|p| p.data.is_err()).count();
        prop_assert!(refused >= in_error);
        if ty == "noSuchType" {
            // An unknown type refuses every payload.
            prop_assert_eq!(refused, parsed.len());
        }
    }
    Ok(())
}

/// Any JSON value: big and small numbers, any text, nested arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            proptest::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Fragments of JSON Lines text, glued in random order.
fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"\\u".to_vec()),
        Just(b"\\ud800".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b" \t".to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"-0.0e-999999".to_vec()),
        Just(b"123456789012345678901234567890".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\"canceledBy\":\"u\",".to_vec()),
        Just(b"\"returnToStock\":true".to_vec()),
        Just(vec![0xff]),
        Just(vec![0xc3]),
        Just(vec![0xed, 0xa0, 0x80]),
        Just(vec![0]),
        "[a-z0-9]{1,6}".prop_map(String::into_bytes),
    ];
    proptest::collection::vec(piece, 0..64).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_data_file_of_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_file(&bytes)?;
    }

    #[test]
    fn a_data_file_of_jsonish_bytes_never_panics(bytes in jsonish_bytes()) {
        check_file(&bytes)?;
    }

    #[test]
    fn the_example_payload_cut_or_changed_anywhere_never_panics(
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let mut bytes = payload("afterOrderCancel.valid.json").into_bytes();
        let at = at.index(bytes.len());
        if cut {
            bytes.truncate(at);
        } else {
            bytes[at] = byte;
        }
        check_file(&bytes)?;
    }

    /// JSON Lines written any usual way (BOM or not, LF or CRLF, blank lines between, a last
    /// line with or without its end) read back as exactly the values written, at their lines.
    #[test]
    fn json_lines_read_back_as_the_values_written(
        values in proptest::collection::vec((json_value(), 0..3usize), 0..16),
        bom in any::<bool>(),
        crlf in any::<bool>(),
        last_newline in any::<bool>(),
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        if bom {
            text.push('\u{feff}');
        }
        let mut expected = Vec::new();
        let mut line = 0;
        for (i, (value, blanks)) in values.iter().enumerate() {
            for _ in 0..*blanks {
                text.push_str(if line % 2 == 0 { "" } else { " \t" });
                text.push_str(end);
                line += 1;
            }
            text.push_str(&serde_json::to_string(value).unwrap());
            line += 1;
            expected.push((line, value.clone()));
            if i + 1 < values.len() || last_newline {
                text.push_str(end);
            }
        }
        let parsed = payloads::from_file(text.as_bytes());
        let got: Vec<(usize, Value)> = parsed
            .into_iter()
            .map(|p| (p.line.unwrap(), p.data.unwrap()))
            .collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn a_data_argument_of_any_text_never_panics(text in any::<String>(), ty in 0..TYPES.len()) {
        let parsed = [payloads::from_arg(&text)];
        let (problems, refused) = payloads::check(&CATALOG, TYPES[ty], &parsed);
        prop_assert!(refused <= 1);
        if let Err(reason) = &parsed[0].data {
            prop_assert!(reason.starts_with("not JSON: "), "{reason}");
            prop_assert_eq!(&problems, &vec![reason.clone()]);
        }
    }

    /// Any JSON value in place of the example's members reaches the schema and is refused with
    /// violations, never a panic.
    #[test]
    fn any_value_in_the_example_payload_is_checked(value in json_value(), member in 0..4usize) {
        let mut data: Value = serde_json::from_str(&payload("afterOrderCancel.valid.json")).unwrap();
        let slot = match member {
            0 => &mut data["canceledBy"],
            1 => &mut data["order"],
            2 => &mut data["order"]["items"],
            _ => &mut data["order"]["totals"]["total"],
        };
        *slot = value;
        let line = serde_json::to_string(&data).unwrap();
        check_file(line.as_bytes())?;
    }
}

/// Nesting deeper than the parser's limit is `not JSON` (no stack overflow), at any depth
/// up to far past it, in an array or an object, and inside a payload that is otherwise valid.
#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [1, 100, 127, 128, 129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let line = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let parsed = payloads::from_file(line.as_bytes());
            assert_eq!(parsed.len(), 1);
            if let Err(reason) = &parsed[0].data {
                assert!(
                    reason.contains("recursion limit exceeded"),
                    "{depth}: {reason}"
                );
                assert!(depth >= 128, "{depth}: {reason}");
            } else {
                assert!(depth < 128, "{depth}");
            }
            let inside = format!(
                r#"{{"canceledBy":"u","returnToStock":true,"order":{}{{}}{}}}"#,
                "[".repeat(depth.min(120)),
                "]".repeat(depth.min(120))
            );
            let (_, refused) = payloads::check(
                &CATALOG,
                "afterOrderCancel",
                &payloads::from_file(inside.as_bytes()),
            );
            assert_eq!(refused, 1, "{depth}");
        }
    }
}

#[test]
fn numbers_beyond_f64_are_refused_and_long_ones_read() {
    let parsed = payloads::from_file(b"1e400\n-1e400\n123456789012345678901234567890\n1e-400\n");
    let reasons: Vec<String> = parsed
        .iter()
        .map(|p| match &p.data {
            Ok(v) => v.to_string(),
            Err(e) => e.clone(),
        })
        .collect();
    assert!(
        reasons[0].starts_with("not JSON: number out of range"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("not JSON: number out of range"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], "1.2345678901234568e+29");
    assert_eq!(reasons[3], "0.0");
}

#[test]
fn invalid_utf8_names_its_line_and_column_and_a_bom_is_ignored() {
    let parsed = payloads::from_file(b"\xef\xbb\xbf{}\r\n\r\n  \n[1,\xff]\n\xc3");
    let got: Vec<(Option<usize>, Result<Value, String>)> =
        parsed.into_iter().map(|p| (p.line, p.data)).collect();
    assert_eq!(
        got,
        vec![
            (Some(1), Ok(serde_json::json!({}))),
            (
                Some(4),
                Err("not UTF-8 text (invalid byte at column 4)".to_owned())
            ),
            (
                Some(5),
                Err("not UTF-8 text (invalid byte at column 1)".to_owned())
            ),
        ]
    );
    // A byte order mark anywhere else is not whitespace to JSON.
    let parsed = payloads::from_file("{}\n\u{feff}{}".as_bytes());
    assert!(
        parsed[1]
            .data
            .as_ref()
            .is_err_and(|e| e.starts_with("not JSON: "))
    );
}

// ---- The command, run as a process -------------------------------------------------------

fn emit_file(name: &str, bytes: &[u8]) -> std::process::Output {
    let path = temp_dir("payloads").join(name);
    std::fs::write(&path, bytes).unwrap();
    emit_path(&path)
}

fn emit_path(path: &std::path::Path) -> std::process::Output {
    let dir = schemas();
    evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--data-file",
        path.to_str().unwrap(),
    ])
}

#[test]
fn emit_of_a_garbage_file_names_each_bad_line_and_emits_nothing() {
    let mut bytes = payload("afterOrderCancel.valid.json").into_bytes();
    bytes.extend_from_slice(b"\n\x00\xff\xfe garbage \x80\n{\"canceledBy\": \n");
    bytes.extend_from_slice(&"[".repeat(10_000).into_bytes());
    bytes.extend_from_slice(b"\n\x1b[31m not json\n");
    let out = emit_file("garbage.jsonl", &bytes);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(text(&out.stdout), "", "no event id is printed");
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "line 2: not UTF-8 text (invalid byte at column 2)",
        "line 3: not JSON: EOF while parsing",
        "line 4: not JSON: recursion limit exceeded",
        "line 5: not JSON: ",
        "evbus: 4 of 5 payloads refused; nothing was emitted",
    ] {
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
}

#[test]
fn emit_of_random_bytes_exits_0_or_1_never_a_crash() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 8,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 1..4096), |bytes| {
            let out = emit_file("random.jsonl", &bytes);
            let err = String::from_utf8_lossy(&out.stderr);
            let code = out.status.code();
            // Exit 0 is possible for bytes that happen to be valid payloads or blank lines.
            prop_assert!(matches!(code, Some(0..=1)), "{code:?}: {err}");
            if code == Some(1) {
                prop_assert!(err.contains("nothing was emitted"), "{err}");
                prop_assert_eq!(text(&out.stdout), "");
            }
            prop_assert!(!err.contains("panicked"), "{err}");
            Ok(())
        })
        .unwrap();
}

#[test]
fn emit_of_a_file_with_a_bom_and_crlf_line_ends_emits_every_line() {
    let line = payload("afterOrderCancel.valid.json");
    let bytes = format!("\u{feff}{line}\r\n\r\n{line}\r\n");
    let out = emit_file("bom.jsonl", bytes.as_bytes());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text(&out.stdout).lines().count(), 2);
}

#[test]
fn emit_of_a_file_it_cannot_read_is_exit_2_naming_it() {
    let dir = temp_dir("payloads-dir");
    for path in [dir.clone(), dir.join("missing.jsonl")] {
        let out = emit_path(&path);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with(&format!("evbus: error: cannot read {}: ", path.display())),
            "{err}"
        );
    }
}
