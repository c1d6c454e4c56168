//! Shared by the `outbox_*` tests: a catalogue, the real PostgreSQL and Redis (each test
//! with its own table and key prefix), a consumer that records what reached Redis, and a
//! `redis-server` a test owns (to take it down).
//!
//! When PostgreSQL or Redis does not answer, a test prints a loud warning and returns,
//! unless `CI` or `EVBUS_REQUIRE_BROKERS` is set: then it fails.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evbus::bus::Bus;
use evbus::layer::{Destination, Layer, Next};
use evbus::memory::MemoryBroker;
use evbus::{
    Catalog, ConsumerOptions, Error, ErrorKind, Event, SubscribeOptions, Subscription, Transport,
};
use evbus_conformance::process::BrokerProcess;
use evbus_redis::{RedisConfig, RedisTransport};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// Bound for anything expected to happen.
pub const WAIT: Duration = Duration::from_secs(60);

/// The event type every test stages, and its topic.
pub const TYPE: &str = "orderPlaced";

/// A second event type (and topic) of the same schema, for rounds of several topics.
pub const OTHER_TYPE: &str = "orderPaid";

pub fn pg_url() -> String {
    std::env::var("EVBUS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Fails under `CI`/`EVBUS_REQUIRE_BROKERS`, else warns loudly (the caller returns).
pub fn unavailable(what: &str, e: &dyn std::fmt::Display) {
    if evbus_conformance::require_brokers() {
        panic!("{what} is required (CI / EVBUS_REQUIRE_BROKERS) but unreachable: {e}");
    }
    eprintln!("WARNING: outbox test SKIPPED: {what} unreachable: {e}");
}

/// `orderPlaced` and `orderPaid`: `{orderId: string, seq: integer >= 0}`.
pub fn catalog() -> Catalog {
    let mut b = Catalog::builder();
    for ty in [TYPE, OTHER_TYPE] {
        b.register_json(
            ty,
            json!({
                "type": "object",
                "properties": {
                    "orderId": {"type": "string"},
                    "seq": {"type": "integer", "minimum": 0}
                },
                "required": ["orderId", "seq"]
            }),
        )
        .unwrap();
    }
    b.freeze().unwrap()
}

/// A bus that only validates (the outbox does not use its transport).
pub fn bus() -> Bus {
    Bus::new(
        Arc::new(MemoryBroker::new(Default::default()).connect()),
        catalog(),
        "/test/outbox",
    )
}

/// A unique table name for one test.
pub fn table_name() -> String {
    format!("outbox_t_{}", uuid::Uuid::now_v7().simple())
}

pub async fn pg_pool() -> Option<PgPool> {
    match PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg_url())
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            unavailable(&format!("PostgreSQL at {}", pg_url()), &e);
            None
        }
    }
}

/// Drops the outbox tables of `table` (and the test's `_orders` table).
pub async fn drop_tables(pool: &PgPool, table: &str) {
    sqlx::query(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_leases, {table}_relays, {table}_orders"
    ))
    .execute(pool)
    .await
    .unwrap();
}

pub async fn pending(pool: &PgPool, table: &str) -> i64 {
    sqlx::query(&format!("SELECT count(*) AS n FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
        .get("n")
}

/// Waits until the outbox table is empty: every committed event was published (a row is
/// deleted only after the transport accepted it).
pub async fn wait_drained(pool: &PgPool, table: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = pending(pool, table).await;
        if n == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} rows still in {table} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis transport with a key prefix of its own.
pub async fn redis(url: &str) -> Option<RedisTransport> {
    let mut config = RedisConfig::from_url(url).unwrap();
    config.key_prefix = format!("evbus-outbox-test-{}:", uuid::Uuid::now_v7().simple());
    match RedisTransport::connect(config).await {
        Ok(t) => Some(t),
        Err(e) => {
            unavailable(&format!("Redis at {url}"), &e);
            None
        }
    }
}

/// A Redis transport on `prefix` (another connection to the same keys).
pub async fn redis_with_prefix(url: &str, prefix: &str) -> RedisTransport {
    let mut config = RedisConfig::from_url(url).unwrap();
    config.key_prefix = prefix.to_owned();
    RedisTransport::connect(config).await.unwrap()
}

/// Entries in the topic's stream: every publish ever accepted (retention is unlimited).
pub async fn stream_len(url: &str, transport: &RedisTransport, topic: &str) -> usize {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("XLEN")
        .arg(transport.topic_key(topic))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Deletes the test's Redis keys.
pub async fn cleanup_redis(url: &str, transport: &RedisTransport) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pattern = format!("{}*", transport.config().key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

/// A named subscription on the topic, created before anything is published.
pub async fn subscribe(transport: &dyn Transport, topic: &str) -> Subscription {
    transport
        .topic(topic)
        .await
        .unwrap()
        .subscribe(
            SubscribeOptions::named("probe")
                .consumer(ConsumerOptions::default().max_in_flight(512)),
        )
        .await
        .unwrap()
}

/// What a consumer saw: every delivery in order.
#[derive(Debug, Default)]
pub struct Seen {
    pub events: Vec<Event>,
    pub ids: HashSet<String>,
}

impl Seen {
    /// Receives (and acks) until `ids` holds every id of `want`, within [`WAIT`].
    pub async fn until_all(&mut self, sub: &mut Subscription, want: &HashSet<String>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !want.is_subset(&self.ids) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let d = match tokio::time::timeout(left, sub.next_delivery()).await {
                Ok(Some(Ok(d))) => d,
                Ok(other) => panic!("subscription ended: {other:?}"),
                Err(_) => panic!(
                    "after {WAIT:?}: {} of {} events received",
                    want.intersection(&self.ids).count(),
                    want.len()
                ),
            };
            self.ids.insert(d.event().id().to_owned());
            self.events.push(d.event().clone());
            d.ack().await.unwrap();
        }
    }

    /// Receives (and acks) until `n` deliveries in all.
    pub async fn until_count(&mut self, sub: &mut Subscription, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.events.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let d = match tokio::time::timeout(left, sub.next_delivery()).await {
                Ok(Some(Ok(d))) => d,
                Ok(other) => panic!("subscription ended: {other:?}"),
                Err(_) => panic!("after {WAIT:?}: {} of {n} deliveries", self.events.len()),
            };
            self.ids.insert(d.event().id().to_owned());
            self.events.push(d.event().clone());
            d.ack().await.unwrap();
        }
    }

    /// Checks per-key order after de-duplication by id (what a consumer that de-duplicates
    /// sees): each key's `seq` values arrive as 0, 1, 2, ... without gap. Returns the
    /// number of keys.
    pub fn assert_ordered_per_key(&self) -> usize {
        let mut first = HashSet::new();
        let mut next: HashMap<String, u64> = HashMap::new();
        for e in &self.events {
            if !first.insert(e.id().to_owned()) {
                continue;
            }
            let key = e
                .partition_key()
                .expect("every test event has a key")
                .to_owned();
            let seq = e.json::<serde_json::Value>().unwrap()["seq"]
                .as_u64()
                .unwrap();
            let expected = next.entry(key.clone()).or_insert(0);
            assert_eq!(
                seq, *expected,
                "key {key}: got seq {seq}, expected {expected} (order per key broken)"
            );
            *expected += 1;
        }
        next.len()
    }

    /// Deliveries beyond the first of each id.
    pub fn duplicates(&self) -> usize {
        self.events.len() - self.ids.len()
    }
}

/// A `redis-server` owned by a test (killed and restarted on the same port and data).
pub struct RedisServer(pub BrokerProcess);

impl RedisServer {
    pub fn start() -> std::io::Result<Self> {
        BrokerProcess::builder("redis-server", |dir, port| {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--save", ""])
                .arg("--dir")
                .arg(dir);
            command
        })
        .ready_when(Duration::from_secs(30), |port| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            stream.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 7];
            let n = stream.read(&mut reply)?;
            Ok(reply[..n].starts_with(b"+PONG"))
        })
        .start()
        .map(RedisServer)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port())
    }
}

/// A transport layer (over the memory broker) that publishes a batch one event at a time, as
/// Kafka's producer does, so a failure can come after a prefix of the batch was accepted:
/// an event whose data is over 4 KiB is refused with `TooLarge`; while `down` is set, any
/// other event fails with `Connection`. It logs every event it accepted and counts the
/// publishes (one per `publish`/`publish_batch` call).
#[derive(Default)]
pub struct Picky {
    pub accepted: Mutex<Vec<String>>,
    pub calls: AtomicUsize,
    pub down: AtomicBool,
}

impl Picky {
    /// How many times the transport accepted event `id`.
    pub fn accepted(&self, id: &str) -> usize {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == id)
            .count()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Layer for Picky {
    async fn publish(
        &self,
        _to: &Destination,
        events: &[Event],
        next: Next<'_>,
    ) -> evbus::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for event in events {
            if event.data().is_some_and(|d| d.len() > 4096) {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!("event {} is over 4 KiB", event.id()),
                ));
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Connection, "the broker is down"));
            }
            next.run(std::slice::from_ref(event)).await?;
            self.accepted.lock().unwrap().push(event.id().to_owned());
        }
        Ok(())
    }
}

/// One publish seen by [`Slow`]: which relay, which events, when it started and when it
/// ended (returned, or was abandoned by the relay).
#[derive(Clone, Debug)]
pub struct Publish {
    pub relay: String,
    pub ids: Vec<String>,
    pub start: Instant,
    pub end: Instant,
}

/// A transport layer that takes `delay` over every publish (a slow or hung broker) and logs
/// each publish into a log shared by several relays' transports; `started` counts the
/// publishes begun.
pub struct Slow {
    pub relay: String,
    pub delay: Duration,
    pub log: Arc<Mutex<Vec<Publish>>>,
    pub started: Arc<AtomicUsize>,
}

/// Logs a publish when it ends, however it ends (a publish cut short by a time limit is
/// dropped, not finished).
struct Logging<'a> {
    slow: &'a Slow,
    ids: Vec<String>,
    start: Instant,
}

impl Drop for Logging<'_> {
    fn drop(&mut self) {
        self.slow.log.lock().unwrap().push(Publish {
            relay: self.slow.relay.clone(),
            ids: std::mem::take(&mut self.ids),
            start: self.start,
            end: Instant::now(),
        });
    }
}

#[async_trait::async_trait]
impl Layer for Slow {
    async fn publish(
        &self,
        _to: &Destination,
        events: &[Event],
        next: Next<'_>,
    ) -> evbus::Result<()> {
        let _logging = Logging {
            slow: self,
            ids: events.iter().map(|e| e.id().to_owned()).collect(),
            start: Instant::now(),
        };
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        next.run(events).await
    }
}

/// A memory transport (its own broker) behind `layer`.
pub fn memory_behind<L: Layer>(layer: L) -> evbus::layer::Layered<L> {
    use evbus::layer::LayerExt;
    MemoryBroker::new(Default::default()).connect().layer(layer)
}
