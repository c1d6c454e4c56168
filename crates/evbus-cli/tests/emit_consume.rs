//! `evbus emit` and `evbus consume` run as processes: against memory:// (in-process, so only
//! what one process shows) and across two processes on the local Redis.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use evbus::Transport;
use serde_json::Value;

fn schemas() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

fn payload(name: &str) -> String {
    let path = schemas().join("payloads").join(name);
    let value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_string(&value).unwrap()
}

fn evbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run evbus")
}

fn jsonl(name: &str, lines: &[String]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn emit_prints_the_new_event_id() {
    let data = payload("afterOrderCancel.valid.json");
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--key",
        "ord_01J9Z6",
        "--data",
        &data,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout);
    assert_eq!(
        uuid::Uuid::parse_str(id.trim()).unwrap().get_version_num(),
        7
    );
}

#[test]
fn emit_of_a_file_with_one_invalid_line_names_it_and_emits_nothing() {
    let file = jsonl(
        "drift.jsonl",
        &[
            payload("afterOrderCancel.valid.json"),
            payload("afterOrderCancel.drift.json"),
            payload("afterOrderCancel.valid.json"),
        ],
    );
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "", "no event id is printed");
    let err = text(&out.stderr);
    assert!(
        err.contains(r#"line 2: /returnToStock: required property "returnToStock" is missing"#),
        "{err}"
    );
    assert!(err.contains("nothing was emitted"), "{err}");
}

#[test]
fn consume_without_events_exits_1_when_the_timeout_passes() {
    let dir = schemas();
    let out = evbus(&[
        "consume",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_emitted_by_one_process_are_consumed_by_another_on_redis() {
    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("evbus-cli-test-{}:", uuid::Uuid::now_v7().simple());
    let url = format!("{base}?prefix={prefix}");
    let dir = schemas();
    let dir = dir.to_str().unwrap();
    let file = jsonl(
        "redis.jsonl",
        &vec![payload("afterOrderCancel.valid.json"); 3],
    );

    let out = evbus(&[
        "emit",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--key",
        "ord_01J9Z6",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 3);

    let out = evbus(&[
        "consume",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--group",
        "audit",
        "--count",
        "3",
        "--timeout",
        "20",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
        .collect();
    let got: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids, "every event, in emit order (one key)");
    assert_eq!(events[0]["type"], "afterOrderCancel");
    assert_eq!(events[0]["specversion"], "1.0");
    assert_eq!(
        events[0]["dataschema"],
        "urn:evbus:schema:afterOrderCancel:1"
    );
    assert_eq!(events[0]["partitionkey"], "ord_01J9Z6");
    assert_eq!(events[0]["data"]["returnToStock"], true);

    // The group acked them: a second consumer of the group gets nothing and times out.
    let out = evbus(&[
        "consume",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--group",
        "audit",
        "--count",
        "1",
        "--timeout",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");

    let transport = evbus_redis::RedisTransport::connect_url(&url)
        .await
        .unwrap();
    transport.delete_topic("afterOrderCancel").await.unwrap();
    for q in [
        "afterOrderCancel.audit.dlq",
        "afterOrderCancel.audit.redrive",
    ] {
        transport.delete_queue(q).await.unwrap();
    }
    transport.close().await.unwrap();
}
