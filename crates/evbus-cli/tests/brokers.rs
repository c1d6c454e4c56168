//! `evbus emit`, `consume` and `serve` as processes of the default build on the brokers:
//! Kafka at `EVBUS_KAFKA_URL` (default `kafka://127.0.0.1:9092`, tansu on the development and
//! CI machines: `cargo xtask brokers --start`), NATS at `EVBUS_NATS_URL` and RabbitMQ at
//! `EVBUS_AMQP_URL` (Redis: `emit_consume.rs`).
//!
//! Each test has a catalogue of its own with one event type named for the run, so its topic
//! and groups are its own, and it deletes them at the end. When a broker does not answer, its
//! tests print a warning and pass, unless `CI` or `EVBUS_REQUIRE_BROKERS` is set; any other
//! error (a bad URL) fails.

#![cfg(any(feature = "kafka", feature = "nats", feature = "amqp"))]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use evbus::{Bus, Catalog, ErrorKind, Registry, Transport};
use serde_json::Value;
use support::{evbus, jsonl, payload, text};

/// How long one `consume` may wait: a Kafka group join alone takes about 3 s on tansu.
const CONSUME_TIMEOUT: &str = "60";

/// The broker URL of `adapter`: `EVBUS_<ADAPTER>_URL`, else the local default.
fn broker_url(adapter: &str) -> String {
    let default = match adapter {
        "kafka" => "kafka://127.0.0.1:9092",
        "nats" => "nats://127.0.0.1:4222",
        "amqp" => "amqp://guest:guest@127.0.0.1:5672/%2f",
        other => panic!("no default URL for {other}"),
    };
    std::env::var(format!("EVBUS_{}_URL", adapter.to_ascii_uppercase()))
        .unwrap_or_else(|_| default.to_owned())
}

/// The connectors of the adapters under test.
fn registry() -> Registry {
    let mut registry = Registry::empty();
    registry.register(evbus_kafka::KafkaConnector);
    registry.register(evbus_nats::NatsConnector);
    registry.register(evbus_amqp::AmqpConnector);
    registry
}

/// A catalogue with one event type of this test's own (`afterOrderCancel`'s schema, marked
/// external so the gateway publishes it), and a transport to clean up with.
struct Env {
    url: String,
    dir: PathBuf,
    ty: String,
    transport: Arc<dyn Transport>,
}

impl Env {
    /// `None` (test skipped, with a warning) when no broker answers and brokers are not
    /// required; a panic when they are.
    async fn new(adapter: &str, what: &str) -> Option<Env> {
        let url = broker_url(adapter);
        let transport = match registry().connect(&url).await {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::Connection && !support::require_brokers() => {
                eprintln!(
                    "WARNING: {adapter} CLI test skipped, no broker at {}: {e} (start it with \
                     `cargo xtask brokers --start`; with CI=true or EVBUS_REQUIRE_BROKERS=1 \
                     this is a failure)",
                    evbus::registry::redact(&url)
                );
                return None;
            }
            Err(e) => panic!("{adapter} at {}: {e}", evbus::registry::redact(&url)),
        };
        let dir = support::temp_dir(&format!("{adapter}-{what}"));
        let ty = format!("cli-{adapter}-{what}-{}", uuid::Uuid::now_v7().simple());
        let schemas = dir.join("schemas");
        support::copy_dir(
            &support::schemas().join("definitions"),
            &schemas.join("definitions"),
        );
        let source = support::schemas().join("events/afterOrderCancel.json");
        let mut schema: Value =
            serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
        schema["x-evbus-external"] = Value::Bool(true);
        std::fs::create_dir_all(schemas.join("events")).unwrap();
        std::fs::write(
            schemas.join(format!("events/{ty}.json")),
            serde_json::to_string_pretty(&schema).unwrap(),
        )
        .unwrap();
        Some(Env {
            url,
            dir,
            ty,
            transport,
        })
    }

    fn schemas(&self) -> PathBuf {
        self.dir.join("schemas")
    }

    /// `evbus consume` of this test's type in `group`, up to `count` events.
    fn consume(&self, group: &str, count: usize) -> Vec<Value> {
        let (code, events) = self.try_consume(group, count, CONSUME_TIMEOUT);
        assert_eq!(code, Some(0));
        events
    }

    /// `evbus consume`: its exit status and what it printed (stderr goes to the test's).
    fn try_consume(&self, group: &str, count: usize, timeout: &str) -> (Option<i32>, Vec<Value>) {
        let schemas = self.schemas();
        let count = count.to_string();
        let out = evbus(&[
            "consume",
            "--transport",
            &self.url,
            "--schemas",
            s(&schemas),
            "--type",
            &self.ty,
            "--group",
            group,
            "--count",
            &count,
            "--timeout",
            timeout,
        ]);
        eprint!("{}", text(&out.stderr));
        let events = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
            .collect();
        (out.status.code(), events)
    }

    /// On a broker that keeps no history for a group before it exists (`replay` false: AMQP),
    /// a first consumer of `group` that finds nothing creates it, so that what is emitted next
    /// waits for the group.
    fn open_group(&self, group: &str) {
        if self.transport.capabilities().replay {
            return;
        }
        let (code, events) = self.try_consume(group, 1, "3");
        assert_eq!(
            (code, events),
            (Some(1), Vec::new()),
            "a new group finds nothing"
        );
    }

    /// Deletes the topic and the dead-letter and redrive queues of `groups`.
    async fn clean(self, groups: &[&str]) {
        let catalog = Catalog::from_dir(self.schemas()).unwrap();
        let bus = Bus::new(Arc::clone(&self.transport), catalog, "/evbus-cli-test");
        for group in groups {
            for queue in [
                bus.dead_letter_queue_name(&self.ty, group),
                bus.redrive_queue_name(&self.ty, group),
            ] {
                if let Err(e) = self.transport.delete_queue(&queue).await {
                    eprintln!("cleanup: deleting queue {queue}: {e}");
                }
            }
        }
        if let Err(e) = self.transport.delete_topic(&self.ty).await {
            eprintln!("cleanup: deleting topic {}: {e}", self.ty);
        }
        let _ = self.transport.close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ids(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["id"].as_str().unwrap()).collect()
}

/// Emits three events with one key from one process, consumes them in a group from another,
/// then checks that the group resumes after what it acked.
async fn events_emitted_by_one_process_are_consumed_by_another(adapter: &str) {
    let Some(env) = Env::new(adapter, "emit").await else {
        return;
    };
    env.open_group("audit");
    let schemas = env.schemas();
    let file = jsonl(
        &format!("{}.jsonl", env.ty),
        &vec![payload("afterOrderCancel.valid.json"); 3],
    );
    let emit = |file: &Path| {
        let out = evbus(&[
            "emit",
            "--transport",
            &env.url,
            "--schemas",
            s(&schemas),
            "--type",
            &env.ty,
            "--key",
            "ord_01J9Z6",
            "--data-file",
            s(file),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let emitted = emit(&file);
    assert_eq!(emitted.len(), 3);

    let events = env.consume("audit", 3);
    assert_eq!(
        ids(&events),
        emitted,
        "every event, in emit order (one key)"
    );
    assert_eq!(events[0]["type"], env.ty.as_str());
    assert_eq!(events[0]["specversion"], "1.0");
    assert_eq!(events[0]["source"], "/evbus-cli");
    assert_eq!(events[0]["partitionkey"], "ord_01J9Z6");
    assert_eq!(events[0]["data"]["returnToStock"], true);

    // The group acked those three: its next consumer starts after them, with the next event.
    let one = jsonl(
        &format!("{}-one.jsonl", env.ty),
        &[payload("afterOrderCancel.valid.json")],
    );
    let fourth = emit(&one);
    let events = env.consume("audit", 1);
    assert_eq!(
        ids(&events),
        fourth,
        "the group resumes after its acked events"
    );

    env.clean(&["audit"]).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread")]
async fn events_emitted_on_kafka_by_one_process_are_consumed_by_another() {
    events_emitted_by_one_process_are_consumed_by_another("kafka").await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread")]
async fn events_emitted_on_nats_by_one_process_are_consumed_by_another() {
    events_emitted_by_one_process_are_consumed_by_another("nats").await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread")]
async fn events_emitted_on_amqp_by_one_process_are_consumed_by_another() {
    events_emitted_by_one_process_are_consumed_by_another("amqp").await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread")]
async fn serve_on_kafka_publishes_what_its_http_api_accepts() {
    let Some(env) = Env::new("kafka", "serve").await else {
        return;
    };
    env.open_group("audit");
    let schemas = env.schemas();
    let state = env.dir.join("state");
    let served = support::serve(
        &env.dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--transport",
            &env.url,
            "--schemas",
            s(&schemas),
            "--data-dir",
            s(&state),
        ],
        std::time::Duration::from_secs(60),
    );
    assert!(
        served
            .banner
            .contains(&format!("(transport {}", evbus::registry::redact(&env.url))),
        "{}",
        served.banner
    );
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    let out = evbus(&[
        "keys",
        "create",
        "--data-dir",
        s(&state),
        "--name",
        "producer",
        "--publish",
        &env.ty,
        "--source",
        "/crm",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();

    let id = format!("cli-kafka-{}", uuid::Uuid::now_v7().simple());
    let resp = http
        .post(format!("{}/v1/events", served.base))
        .bearer_auth(&key)
        .header("ce-specversion", "1.0")
        .header("ce-id", &id)
        .header("ce-source", "/crm")
        .header("ce-type", &env.ty)
        .header("content-type", "application/json")
        .body(payload("afterOrderCancel.valid.json"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 202, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["id"], id.as_str());

    // What the gateway accepted is on Kafka: another process reads it there.
    let events = env.consume("audit", 1);
    assert_eq!(ids(&events), [id.as_str()]);
    assert_eq!(events[0]["source"], "/crm");
    let posted: Value = serde_json::from_str(&payload("afterOrderCancel.valid.json")).unwrap();
    assert_eq!(events[0]["data"], posted);

    drop(served);
    env.clean(&["audit", "evbus-gateway-webhooks"]).await;
}
