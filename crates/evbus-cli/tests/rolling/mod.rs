//! Shared by the schema-evolution CLI tests (`evolution.rs`, `dlq.rs`): catalogue
//! directories of several versions, and `evbus emit` / `consume` / `dlq` run as separate
//! processes against the local Redis, each test under its own key prefix.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::support::{self, evbus, text};

/// The Redis URL of one test: a prefix of its own, so tests never see each other's keys.
/// `None` (after a loud warning) when Redis is not reachable and brokers are not required;
/// a panic when they are (`CI=true` or `EVBUS_REQUIRE_BROKERS=1`).
pub async fn redis(test: &str) -> Option<String> {
    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let url = format!(
        "{base}?prefix=evbus-cli-{test}-{}:",
        uuid::Uuid::now_v7().simple()
    );
    match evbus_redis::RedisTransport::connect_url(&url).await {
        Ok(t) => {
            let _ = evbus::Transport::close(&t).await;
            Some(url)
        }
        Err(e) if e.kind() == evbus::ErrorKind::Connection && !support::require_brokers() => {
            eprintln!(
                "WARNING: {test} skipped, no Redis at {base}: {e} (start it with `cargo xtask \
                 brokers --start`; with CI=true or EVBUS_REQUIRE_BROKERS=1 this is a failure)"
            );
            None
        }
        Err(e) => panic!("Redis at {base}: {e}"),
    }
}

/// Deletes what a test left under its prefix: the topic, and each group's DLQ and redrive
/// queue.
pub async fn cleanup(url: &str, ty: &str, groups: &[&str]) {
    use evbus::Transport;
    let Ok(t) = evbus_redis::RedisTransport::connect_url(url).await else {
        return;
    };
    let _ = t.delete_topic(ty).await;
    for g in groups {
        let _ = t.delete_queue(&format!("{ty}.{g}.dlq")).await;
        let _ = t.delete_queue(&format!("{ty}.{g}.redrive")).await;
    }
    let _ = t.close().await;
}

/// A catalogue directory holding one event type: `latest` as `events/<ty>.json`, `history`
/// as `events/<ty>/1.json`, `2.json`…
pub fn catalogue(what: &str, ty: &str, latest: &Value, history: &[&Value]) -> PathBuf {
    let dir = support::temp_dir(what);
    write(&dir.join(format!("events/{ty}.json")), latest);
    for (i, v) in history.iter().enumerate() {
        write(&dir.join(format!("events/{ty}/{}.json", i + 1)), v);
    }
    dir
}

pub fn write(path: &Path, value: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// `evbus emit` of `payloads` (one process); the event ids, in order.
pub fn emit(url: &str, dir: &Path, ty: &str, payloads: &[Value]) -> Vec<String> {
    let lines: Vec<String> = payloads.iter().map(Value::to_string).collect();
    let file = dir.join("payloads.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = evbus(&[
        "emit",
        "--transport",
        url,
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        ty,
        "--key",
        "one-key",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "emit: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

/// What one `evbus consume` process saw.
#[derive(Debug)]
pub struct Consumed {
    /// The events printed (handled), as JSON.
    pub handled: Vec<Value>,
    /// `(id, reason)` of each `evbus: dead-lettered <id>: <reason>` line on stderr.
    pub dead_lettered: Vec<(String, String)>,
    pub code: Option<i32>,
    pub stderr: String,
}

impl Consumed {
    pub fn handled_ids(&self) -> Vec<String> {
        self.handled
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn dead_ids(&self) -> Vec<String> {
        self.dead_lettered
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// `evbus consume` (one process) until `count` events are handled, at most 30 s, with its
/// default log filter (`EVBUS_LOG` unset).
pub fn consume(url: &str, dir: &Path, ty: &str, group: &str, count: usize) -> Consumed {
    consume_logging(url, dir, ty, group, count, None)
}

/// [`consume`] with `EVBUS_LOG` set to `log`, or unset for `None`.
pub fn consume_logging(
    url: &str,
    dir: &Path,
    ty: &str,
    group: &str,
    count: usize,
    log: Option<&str>,
) -> Consumed {
    let mut command = Command::new(env!("CARGO_BIN_EXE_evbus"));
    command
        .args([
            "consume",
            "--transport",
            url,
            "--schemas",
            dir.to_str().unwrap(),
            "--type",
            ty,
            "--group",
            group,
            "--count",
            &count.to_string(),
            "--timeout",
            "30",
        ])
        .stdin(Stdio::null())
        .env_remove("EVBUS_LOG");
    if let Some(log) = log {
        command.env("EVBUS_LOG", log);
    }
    let out = command.output().expect("run evbus");
    let stderr = text(&out.stderr);
    let dead_lettered = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("evbus: dead-lettered "))
        .map(|rest| {
            let (id, reason) = rest.split_once(": ").expect("<id>: <reason>");
            (id.to_owned(), reason.to_owned())
        })
        .collect();
    Consumed {
        handled: text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
            .collect(),
        dead_lettered,
        code: out.status.code(),
        stderr,
    }
}

/// `evbus dlq list --format json` (one process): `(id, reason, attempts)` per dead letter.
pub fn dlq_list(url: &str, ty: &str, group: &str) -> Vec<(String, String, u64)> {
    let out = evbus(&[
        "dlq",
        "list",
        "--transport",
        url,
        "--type",
        ty,
        "--group",
        group,
        "--wait",
        "1",
        "--format",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "dlq list: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("one JSON object per line");
            (
                v["id"].as_str().unwrap().to_owned(),
                v["reason"].as_str().unwrap().to_owned(),
                v["attempts"].as_u64().unwrap(),
            )
        })
        .collect()
}
