//! `evbus events …` run as a process: output and exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

fn evbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run evbus")
}

fn evbus_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run evbus");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------- list

#[test]
fn list_prints_a_table_of_every_type() {
    let dir = examples();
    let o = evbus(&["events", "list", "--schemas", s(&dir)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(
        lines[0].starts_with("TYPE") && lines[0].contains("EXTERNAL"),
        "{out}"
    );
    assert!(lines[1].starts_with("afterCartUpdate "), "{out}");
    let create = lines
        .iter()
        .find(|l| l.starts_with("afterOrderCreate "))
        .unwrap();
    assert!(
        create.contains(" 1 ")
            && create.contains(" yes ")
            && create.contains("An order was placed."),
        "{create}"
    );
}

#[test]
fn list_json_is_an_array_of_type_version_external_description_schema() {
    let dir = examples();
    let o = evbus(&["events", "list", "--schemas", s(&dir), "--format", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let list: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 5);
    for item in list {
        for key in ["type", "version", "external", "description", "schema"] {
            assert!(item.get(key).is_some(), "{key} missing in {item}");
        }
        assert!(item["schema"]["properties"].is_object());
    }
    let cancel = list
        .iter()
        .find(|i| i["type"] == "afterOrderCancel")
        .unwrap();
    assert_eq!(cancel["version"], 1);
    assert_eq!(cancel["external"], false);
    assert_eq!(
        cancel["schema"]["required"],
        serde_json::json!(["canceledBy", "order", "returnToStock"])
    );
}

#[test]
fn list_asyncapi_prints_an_asyncapi_3_yaml_document() {
    let dir = examples();
    let o = evbus(&[
        "events",
        "list",
        "--schemas",
        s(&dir),
        "--format",
        "asyncapi",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("asyncapi: 3.0.0\n"), "{out}");
    let doc: Value = serde_norway::from_str(&out).unwrap();
    assert_eq!(doc["channels"].as_object().unwrap().len(), 5);
    assert_eq!(
        doc["components"]["messages"]["afterOrderCancel.v1"]["payload"]["$ref"],
        "#/components/schemas/afterOrderCancel.v1.payload"
    );
}

#[test]
fn list_with_an_unknown_format_is_a_usage_error() {
    let dir = examples();
    let o = evbus(&["events", "list", "--schemas", s(&dir), "--format", "xml"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("xml"), "{}", stderr(&o));
}

#[test]
fn list_without_schemas_is_a_usage_error() {
    let o = evbus(&["events", "list"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--schemas"), "{}", stderr(&o));
}

#[test]
fn list_of_a_missing_directory_exits_2() {
    let o = evbus(&["events", "list", "--schemas", "/no/such/catalogue"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("/no/such/catalogue"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

#[test]
fn list_of_a_catalogue_with_a_schema_error_exits_2_naming_it() {
    let event = temp_file(
        "afterOrderCreate.json",
        r#"{"properties": {"order": {"$ref": "../definitions/Ordr.json"}}}"#,
    );
    let dir = event.parent().unwrap().join("cat");
    std::fs::create_dir_all(dir.join("events")).unwrap();
    std::fs::rename(&event, dir.join("events/afterOrderCreate.json")).unwrap();
    let o = evbus(&["events", "list", "--schemas", s(&dir)]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("Ordr.json"), "{}", stderr(&o));
}

// ---------------------------------------------------------------- check

#[test]
fn check_of_a_valid_payload_exits_0() {
    let dir = examples();
    let file = dir.join("payloads/afterOrderCancel.valid.json");
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancel",
        s(&file),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

#[test]
fn check_of_the_return_to_stock_drift_exits_1_naming_the_field() {
    let dir = examples();
    let file = dir.join("payloads/afterOrderCancel.drift.json");
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancel",
        s(&file),
    ]);
    assert_eq!(code(&o), 1);
    assert_eq!(
        stdout(&o),
        "/returnToStock: required property \"returnToStock\" is missing\n"
    );
}

#[test]
fn check_prints_every_violation_on_its_own_line() {
    let dir = examples();
    let file = temp_file(
        "bad.json",
        r#"{"createdBy": "", "order": {"_id": "o", "referenceId": "R-1", "shopId": "s",
            "email": "not-an-email", "status": "lost", "currencyCode": "EUR",
            "items": [], "totals": {"subtotal": 1, "total": 1}, "createdAt": "2026-11-27T10:15:00Z"},
            "extra": true}"#,
    );
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCreate",
        s(&file),
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        [
            "/createdBy: must be at least 1 character long",
            "/extra: property \"extra\" is not allowed here (the schema does not declare it)",
            "/order/email: must be a valid \"email\"",
            "/order/items: must have at least 1 item",
            "/order/referenceId: must match the pattern \"^[A-Za-z0-9-]{4,32}$\"",
            "/order/status: must be one of \"new\", \"processing\", \"shipped\", \"completed\", \"canceled\"",
            "",
        ]
        .join("\n")
    );
}

#[test]
fn check_prints_at_most_a_hundred_violations_and_counts_the_rest() {
    let schema = temp_file(
        "many.json",
        r#"{"type": "object", "additionalProperties": {"type": "integer"}}"#,
    );
    let dir = schema.parent().unwrap().join("catalogue");
    std::fs::create_dir_all(dir.join("events")).unwrap();
    std::fs::rename(&schema, dir.join("events/many.json")).unwrap();
    let fields: Vec<String> = (0..250).map(|i| format!("\"f{i:03}\": \"x\"")).collect();
    let file = temp_file("many-bad.json", &format!("{{{}}}", fields.join(", ")));
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "many",
        s(&file),
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 100, "{out}");
    assert!(out.starts_with("/f000: "), "{out}");
    assert!(
        stderr(&o).contains("250 problems in all; the first 100 are shown, 150 more are not"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_ignores_a_byte_order_mark_as_emit_does() {
    let dir = examples();
    let valid = std::fs::read_to_string(dir.join("payloads/afterOrderCancel.valid.json")).unwrap();
    let file = temp_file("bom.json", &format!("\u{feff}{valid}"));
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancel",
        s(&file),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn check_reads_stdin_when_the_file_is_a_dash() {
    let dir = examples();
    let o = evbus_stdin(
        &[
            "events",
            "check",
            "--schemas",
            s(&dir),
            "--type",
            "afterCartUpdate",
            "-",
        ],
        r#"{"cart": {"_id": "c", "shopId": "s", "currencyCode": "EUR", "items": []}, "updatedBy": null}"#,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = evbus_stdin(
        &[
            "events",
            "check",
            "--schemas",
            s(&dir),
            "--type",
            "afterCartUpdate",
            "-",
        ],
        r#"{"cart": {"_id": "c", "shopId": "s", "currencyCode": "eur", "items": []}}"#,
    );
    assert_eq!(code(&o), 1);
    assert_eq!(
        stdout(&o),
        "/cart/currencyCode: must match the pattern \"^[A-Z]{3}$\"\n/updatedBy: required property \"updatedBy\" is missing\n"
    );
}

#[test]
fn check_of_an_unknown_type_exits_2_listing_the_known_ones() {
    let dir = examples();
    let file = dir.join("payloads/afterOrderCancel.valid.json");
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancelled",
        s(&file),
    ]);
    assert_eq!(code(&o), 2);
    assert!(stdout(&o).is_empty());
    let err = stderr(&o);
    assert!(
        err.contains("afterOrderCancelled") && err.contains("afterOrderCancel,"),
        "{err}"
    );
}

#[test]
fn check_of_a_missing_or_malformed_file_exits_2() {
    let dir = examples();
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancel",
        "/no/such/file.json",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("/no/such/file.json"), "{}", stderr(&o));

    let file = temp_file("broken.json", "{\"canceledBy\": ");
    let o = evbus(&[
        "events",
        "check",
        "--schemas",
        s(&dir),
        "--type",
        "afterOrderCancel",
        s(&file),
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
}

#[test]
fn check_without_a_type_is_a_usage_error() {
    let dir = examples();
    let o = evbus(&["events", "check", "--schemas", s(&dir), "payload.json"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--type"), "{}", stderr(&o));
}

#[test]
fn help_and_version_exit_0() {
    let o = evbus(&["events", "check", "--help"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("--schemas <DIR>"), "{}", stdout(&o));
    let o = evbus(&["--version"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("evbus "), "{}", stdout(&o));
}
