//! Behaviour specific to the Redis adapter (what the conformance suite cannot see from the
//! outside), against the Redis at `EVBUS_REDIS_URL` (default `redis://127.0.0.1:6379`).
//!
//! Every test uses its own key prefix and deletes its keys at the end. When no Redis answers,
//! the tests print a warning and pass, unless `CI` or `EVBUS_REQUIRE_BROKERS` is set.

mod support;

use std::sync::Arc;
use std::time::Duration;

use evbus::delivery::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_REASON};
use evbus::{
    ConsumerOptions, ErrorKind, Event, Registry, SubscribeOptions, Subscription, Transport,
};
use evbus_redis::{ContentMode, RedisConfig, RedisConnector, RedisTransport, Retention};
use futures::StreamExt;
use redis::Value;
use redis::aio::MultiplexedConnection;

const WAIT: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A transport with a key prefix of its own, and a raw connection to look at the keys.
struct Env {
    transport: RedisTransport,
    raw: MultiplexedConnection,
    prefix: String,
    /// The server is this test's own (`support::RedisServer`): command counts are exact.
    own_server: bool,
}

impl Env {
    async fn new() -> Option<Env> {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut RedisConfig)) -> Option<Env> {
        Self::at(&url(), false, adjust).await
    }

    /// On `server` if the test could start one (nothing else talks to it, so its
    /// `INFO commandstats` counts only this test's commands), else on the shared Redis.
    async fn on(
        server: Option<&support::RedisServer>,
        adjust: impl FnOnce(&mut RedisConfig),
    ) -> Option<Env> {
        match server {
            Some(server) => {
                let url = format!("redis://127.0.0.1:{}", server.port());
                Self::at(&url, true, adjust).await
            }
            None => {
                eprintln!("WARNING: no redis-server binary; using the shared Redis");
                Self::with(adjust).await
            }
        }
    }

    async fn at(url: &str, own_server: bool, adjust: impl FnOnce(&mut RedisConfig)) -> Option<Env> {
        let prefix = format!("evbus-test-{}:", uuid::Uuid::now_v7().simple());
        let mut config = RedisConfig::from_url(url).unwrap();
        config.key_prefix = prefix.clone();
        adjust(&mut config);
        let transport = match RedisTransport::connect(config).await {
            Ok(t) => t,
            Err(e) if !evbus_conformance::require_brokers() => {
                eprintln!("WARNING: Redis test skipped, no Redis at {url}: {e}");
                return None;
            }
            Err(e) => panic!("no Redis at {url}: {e}"),
        };
        let raw = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Some(Env {
            transport,
            raw,
            prefix,
            own_server,
        })
    }

    /// Lua script calls the server has run so far: `EVALSHA` and `EVAL` calls in
    /// `INFO commandstats`, less the failed ones (Redis 7 counts an `EVALSHA` answered
    /// `NOSCRIPT`, which the client follows with `SCRIPT LOAD` and the same `EVALSHA`).
    async fn script_calls(&self) -> i64 {
        let info: String = self.cmd(redis::cmd("INFO").arg("commandstats")).await;
        let field = |stats: &str, name: &str| -> i64 {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        info.lines()
            .filter_map(|line| {
                line.strip_prefix("cmdstat_evalsha:")
                    .or_else(|| line.strip_prefix("cmdstat_eval:"))
            })
            .map(|stats| field(stats, "calls") - field(stats, "failed_calls"))
            .sum()
    }

    /// Entries pending in `group` on `key` (the count of `XPENDING key group`).
    async fn pending(&self, key: &str, group: &str) -> i64 {
        let summary: Value = self.cmd(redis::cmd("XPENDING").arg(key).arg(group)).await;
        match summary {
            Value::Array(items) => match items.first() {
                Some(Value::Int(n)) => *n,
                other => panic!("XPENDING summary {other:?}"),
            },
            other => panic!("XPENDING summary {other:?}"),
        }
    }

    /// The entries pending in `group` on `key` (`XPENDING key group - + 100`), as
    /// `(id, consumer, idle ms, delivery count)`.
    async fn pending_entries(&self, key: &str, group: &str) -> Vec<(String, String, i64, i64)> {
        self.cmd(
            redis::cmd("XPENDING")
                .arg(key)
                .arg(group)
                .arg("-")
                .arg("+")
                .arg(100),
        )
        .await
    }

    async fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.raw.clone()).await.unwrap()
    }

    /// `XGROUP CREATE key group start MKSTREAM`, as a stock client (or an earlier consumer)
    /// makes a group.
    async fn create_group(&self, key: &str, group: &str, start: &str) {
        let _: Value = self
            .cmd(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(key)
                    .arg(group)
                    .arg(start)
                    .arg("MKSTREAM"),
            )
            .await;
    }

    /// The fields of the first entry of the stream `key`, in order, as text.
    async fn first_entry(&self, key: &str) -> Vec<(String, String)> {
        let range: Value = self
            .cmd(
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1),
            )
            .await;
        let Value::Array(entries) = range else {
            panic!("{range:?}")
        };
        let Value::Array(entry) = &entries[0] else {
            panic!("{entries:?}")
        };
        let Value::Array(flat) = &entry[1] else {
            panic!("{entry:?}")
        };
        flat.chunks(2).map(|p| (text(&p[0]), text(&p[1]))).collect()
    }

    async fn xlen(&self, key: &str) -> i64 {
        self.cmd(redis::cmd("XLEN").arg(key)).await
    }

    /// Fields of the groups on `key`, as `(name, consumers)`.
    async fn groups(&self, key: &str) -> Vec<(String, i64)> {
        let value: Value = self.cmd(redis::cmd("XINFO").arg("GROUPS").arg(key)).await;
        records(&value)
            .into_iter()
            .map(|r| {
                let name = r.iter().find(|(k, _)| k == "name").map(|(_, v)| v.clone());
                let consumers = r
                    .iter()
                    .find(|(k, _)| k == "consumers")
                    .map(|(_, v)| v.clone());
                (
                    name.unwrap_or_default(),
                    consumers.and_then(|c| c.parse().ok()).unwrap_or(-1),
                )
            })
            .collect()
    }

    /// The consumers of `group` on `key`, as `(name, pending entries)`.
    async fn consumers(&self, key: &str, group: &str) -> Vec<(String, i64)> {
        let value: Value = self
            .cmd(redis::cmd("XINFO").arg("CONSUMERS").arg(key).arg(group))
            .await;
        records(&value)
            .into_iter()
            .map(|r| {
                let field = |name: &str| {
                    r.iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                (field("name"), field("pending").parse().unwrap_or(-1))
            })
            .collect()
    }

    /// Deletes every key this test created.
    async fn cleanup(self) {
        let _ = self.transport.close().await;
        let mut raw = self.raw.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut raw)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: Value = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut raw)
                .await
                .unwrap();
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn records(value: &Value) -> Vec<Vec<(String, String)>> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item {
            Value::Array(flat) => {
                Some(flat.chunks(2).map(|p| (text(&p[0]), text(&p[1]))).collect())
            }
            _ => None,
        })
        .collect()
}

fn event(n: u64) -> Event {
    Event::builder("afterOrderCreate", "/shop/orders")
        .json(&serde_json::json!({"orderId": format!("o-{n}"), "total": n}))
        .unwrap()
        .partition_key(format!("o-{n}"))
        .build()
        .unwrap()
}

/// Sends `n` events to queue `q` and takes every one of them (in-flight limit `n`): the
/// queue's stream key, the subscription and the deliveries, all unsettled.
async fn hold_all(env: &Env, n: usize) -> (String, Subscription, Vec<evbus::Delivery>) {
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let events: Vec<Event> = (0..n as u64).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let options = ConsumerOptions::default().max_in_flight(n);
    let mut sub = queue.receive(options).await.unwrap();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(next(&mut sub).await);
    }
    (key, sub, held)
}

async fn next(sub: &mut Subscription) -> evbus::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("an open subscription")
        .expect("a delivery, not an error")
}

/// Waits up to `within` for `check` to hold.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn xrange_shows_readable_cloudevents_fields_and_json_data() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("orders").await.unwrap();
    let e = event(1);
    topic.publish(&e).await.unwrap();
    let key = env.transport.topic_key("orders");
    assert_eq!(key, format!("{}topic:{{orders}}", env.prefix));
    let fields = env.first_entry(&key).await;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(field("ce_specversion"), Some("1.0"));
    assert_eq!(field("ce_id"), Some(e.id()));
    assert_eq!(field("ce_type"), Some("afterOrderCreate"));
    assert_eq!(field("ce_source"), Some("/shop/orders"));
    assert_eq!(field("ce_partitionkey"), Some("o-1"));
    assert_eq!(field("content-type"), Some("application/json"));
    assert_eq!(field("data"), Some(r#"{"orderId":"o-1","total":1}"#));
    env.cleanup().await;
}

#[tokio::test]
async fn structured_mode_writes_two_fields_and_both_modes_read_one_stream() {
    // A structured-mode writer and a binary-mode one on the same topic (as while a
    // deployment changes `content_mode`), and a stock producer writing structured mode by
    // hand: one subscriber reads all three as the events they are, in order.
    let Some(binary) = Env::new().await else {
        return;
    };
    let mut config = RedisConfig::from_url(&url()).unwrap();
    config.key_prefix = binary.prefix.clone();
    config.content_mode = ContentMode::Structured;
    let structured = RedisTransport::connect(config).await.unwrap();
    let reader = binary.transport.topic("orders").await.unwrap();
    let mut sub = reader
        .subscribe(SubscribeOptions::named("s"))
        .await
        .unwrap();

    let first = event(1);
    let second = Event::builder("afterOrderCreate", "/shop/orders")
        .data("application/octet-stream", vec![0u8, 0xff, 7])
        .subject("o 2")
        .extension("tenant", "acme")
        .build()
        .unwrap();
    let writer = structured.topic("orders").await.unwrap();
    writer
        .publish_batch(&[first.clone(), second.clone()])
        .await
        .unwrap();
    let third = event(3);
    reader.publish(&third).await.unwrap();
    let key = binary.transport.topic_key("orders");
    let _: Value = binary
        .cmd(
            redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("content-type")
                .arg("application/cloudevents+json; charset=utf-8")
                .arg("data")
                .arg(
                    r#"{"specversion":"1.0","id":"stock-1","source":"/sdk","type":"afterOrderCreate","data":{"orderId":"o-4"}}"#,
                ),
        )
        .await;

    // What a stock Redis client reads of a structured entry: two fields, the event as JSON.
    let fields = binary.first_entry(&key).await;
    assert_eq!(fields.len(), 2, "{fields:?}");
    assert_eq!(
        fields[0],
        (
            "content-type".to_owned(),
            "application/cloudevents+json".to_owned()
        )
    );
    assert_eq!(fields[1].0, "data");
    let json: serde_json::Value = serde_json::from_str(&fields[1].1).unwrap();
    assert_eq!(json["id"], first.id());
    assert_eq!(
        json["data"],
        serde_json::json!({"orderId": "o-1", "total": 1})
    );

    for expected in [&first, &second, &third] {
        let d = next(&mut sub).await;
        assert_eq!(d.event(), expected);
        d.ack().await.unwrap();
    }
    let stock = next(&mut sub).await;
    assert_eq!(stock.event().id(), "stock-1");
    assert_eq!(
        stock.event().data().map(|d| &d[..]),
        Some(&br#"{"orderId":"o-4"}"#[..])
    );
    stock.ack().await.unwrap();
    drop(sub);
    let _ = structured.close().await;
    binary.cleanup().await;
}

#[tokio::test]
async fn an_entry_that_is_not_a_cloudevent_is_dead_lettered_and_later_events_flow() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    // A foreign producer writes a plain entry.
    let key = env.transport.topic_key("t");
    let _: Value = env
        .cmd(
            redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("order")
                .arg(r#"{"id":7}"#)
                .arg("blob")
                .arg(&[0xffu8, 0x00][..]),
        )
        .await;
    let good = event(2);
    topic.publish(&good).await.unwrap();
    let delivery = next(&mut sub).await;
    assert_eq!(
        delivery.event().id(),
        good.id(),
        "the foreign entry never reaches the consumer"
    );
    delivery.ack().await.unwrap();

    let dlq = env.transport.queue("t.s.dlq").await.unwrap();
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    let record = next(&mut dead).await;
    let e = record.event();
    assert_eq!(e.ty(), evbus_redis::UNDECODABLE_EVENT_TYPE);
    let reason = e.extension(DEAD_LETTER_REASON).unwrap();
    assert!(
        reason.contains("undecodable message") && reason.contains("specversion"),
        "{reason}"
    );
    assert_eq!(e.extension(DEAD_LETTER_ATTEMPTS), Some("1"));
    let data: serde_json::Value = e.json().unwrap();
    assert_eq!(data["headers"]["order"], r#"{"id":7}"#);
    assert_eq!(data["headers"]["blob"]["base64"], "/wA=");
    record.ack().await.unwrap();
    // Acknowledged: nothing stays pending for the subscription.
    let pending: Value = env.cmd(redis::cmd("XPENDING").arg(&key).arg("s")).await;
    let Value::Array(summary) = pending else {
        panic!()
    };
    assert_eq!(summary[0], Value::Int(0));
    env.cleanup().await;
}

#[tokio::test]
async fn a_registry_opens_redis_urls() {
    let Some(env) = Env::new().await else { return };
    let mut registry = Registry::new();
    registry.register(RedisConnector);
    assert!(registry.schemes().contains(&"redis"));
    assert!(registry.schemes().contains(&"rediss"));
    let url = format!("{}?prefix={}", url(), env.prefix);
    let transport = registry.connect(&url).await.unwrap();
    assert_eq!(transport.name(), "redis");
    assert!(transport.health().await.is_healthy());
    let queue = transport.queue("q").await.unwrap();
    queue.send(&event(1)).await.unwrap();
    assert_eq!(env.xlen(&env.transport.queue_key("q")).await, 1);
    transport.close().await.unwrap();
    if !cfg!(feature = "tls") {
        let err = registry
            .connect("rediss://127.0.0.1:6380")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_nack_delay_longer_than_the_visibility_timeout_is_still_waited() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(100)).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_millis(300));
    let mut sub = queue.receive(options).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let first = next(&mut sub).await;
    let nacked_at = tokio::time::Instant::now();
    first.nack(Some(Duration::from_millis(1500))).await.unwrap();
    let again = next(&mut sub).await;
    let waited = nacked_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "redelivered after {waited:?}"
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn acknowledged_queue_entries_are_deleted_from_the_stream() {
    let Some(env) = Env::new().await else { return };
    let queue = env.transport.queue("q").await.unwrap();
    queue
        .send_batch(&[event(1), event(2), event(3)])
        .await
        .unwrap();
    let key = env.transport.queue_key("q");
    assert_eq!(env.xlen(&key).await, 3);
    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    for _ in 0..3 {
        next(&mut sub).await.ack().await.unwrap();
    }
    assert_eq!(env.xlen(&key).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_dropped_consumer_gives_back_what_it_fetched_but_never_delivered() {
    let Some(env) = Env::new().await else { return };
    let queue = env.transport.queue("q").await.unwrap();
    let events: Vec<Event> = (0..10).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    // Visibility timeout far beyond the test: only the give-back can bring entries back.
    let options = ConsumerOptions::default()
        .max_in_flight(10)
        .visibility_timeout(Duration::from_secs(120));
    let mut first = queue.receive(options.clone()).await.unwrap();
    let taken = next(&mut first).await;
    taken.ack().await.unwrap();
    drop(first);
    let mut second = queue.receive(options).await.unwrap();
    for _ in 1..10 {
        let d = next(&mut second).await;
        assert_eq!(
            d.attempt(),
            1,
            "never delivered before, so this is the first attempt"
        );
        d.ack().await.unwrap();
    }
    env.cleanup().await;
}

#[tokio::test]
async fn acking_a_delivery_handed_to_another_consumer_is_expired() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let short = ConsumerOptions::default().visibility_timeout(Duration::from_millis(200));
    let mut slow = queue.receive(short.clone()).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let stale = next(&mut slow).await;
    let mut fast = queue.receive(short).await.unwrap();
    let fresh = next(&mut fast).await;
    assert_eq!(fresh.event().id(), stale.event().id());
    assert_eq!(fresh.attempt(), 2);
    let err = stale.ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    fresh.ack().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_anonymous_subscription_removes_its_group_when_dropped() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    let named = topic
        .subscribe(SubscribeOptions::named("keep"))
        .await
        .unwrap();
    let anonymous = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    assert_eq!(env.groups(&key).await.len(), 2);
    drop(anonymous);
    let gone = eventually(WAIT, || async { env.groups(&key).await.len() == 1 }).await;
    assert!(gone, "groups left: {:?}", env.groups(&key).await);
    assert_eq!(env.groups(&key).await[0].0, "keep");
    drop(named);
    env.cleanup().await;
}

/// An anonymous subscription dropped after nacking with a delay leaves nothing in the
/// topic's delayed set: its member (`<entry id> <group>`) used to stay until the topic was
/// deleted, one per such nack, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_subscription_leaves_no_delayed_member_behind() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    let delayed = format!("{key}:delayed");
    let mut sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    topic.publish(&event(1)).await.unwrap();
    next(&mut sub)
        .await
        .nack(Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let members: Vec<String> = env
        .cmd(redis::cmd("ZRANGE").arg(&delayed).arg(0).arg(-1))
        .await;
    assert_eq!(
        members.len(),
        1,
        "the nack's delay is recorded: {members:?}"
    );
    drop(sub);
    let gone = eventually(WAIT, || async { env.groups(&key).await.is_empty() }).await;
    assert!(gone, "groups left: {:?}", env.groups(&key).await);
    let members: Vec<String> = env
        .cmd(redis::cmd("ZRANGE").arg(&delayed).arg(0).arg(-1))
        .await;
    assert!(members.is_empty(), "delayed members left: {members:?}");
    env.cleanup().await;
}

/// An anonymous subscribe cancelled part way (its future dropped, here by a timeout of a
/// fraction of a millisecond) leaves no consumer group behind: it used to stay until a
/// later anonymous subscribe swept it after `anonymous_ttl` (an hour).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_anonymous_subscribe_leaves_no_group_behind() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    topic.publish(&event(0)).await.unwrap();
    for round in 0..60u64 {
        let within = Duration::from_micros(100 + (round * 17) % 1000);
        if let Ok(sub) =
            tokio::time::timeout(within, topic.subscribe(SubscribeOptions::anonymous())).await
        {
            drop(sub.unwrap());
        }
    }
    let gone = eventually(WAIT, || async { env.groups(&key).await.is_empty() }).await;
    assert!(gone, "groups left: {:?}", env.groups(&key).await);
    env.cleanup().await;
}

#[tokio::test]
async fn stale_anonymous_groups_of_dead_processes_are_swept() {
    let Some(env) = Env::with(|c| c.anonymous_ttl = Duration::from_secs(60)).await else {
        return;
    };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    // A group left by a process that died long ago (created at Unix time 1 s).
    env.create_group(&key, "evbus.anonymous.1000.dead", "$")
        .await;
    let _sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let names: Vec<String> = env.groups(&key).await.into_iter().map(|g| g.0).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        !names.contains(&"evbus.anonymous.1000.dead".to_owned()),
        "{names:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_consumer_leaves_its_group_when_it_holds_nothing() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    let sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    assert_eq!(env.groups(&key).await, vec![("s".to_owned(), 1)]);
    drop(sub);
    let left = eventually(WAIT, || async {
        env.groups(&key).await == vec![("s".to_owned(), 0)]
    })
    .await;
    assert!(left, "{:?}", env.groups(&key).await);
    env.cleanup().await;
}

/// Looks at a dead-letter queue (`evbus dlq list`: a subscription taking what is there, dropped,
/// then each delivery given back) leave no consumer behind: each look's consumer leaves its
/// group once it has given back what it saw, the entries it gave back kept pending (for the
/// next look) by the one consumer that holds given-back entries.
#[tokio::test]
async fn dead_letter_looks_leave_no_consumers_behind() {
    let Some(env) = Env::new().await else { return };
    let catalog = evbus::Catalog::builder().strict(false).freeze().unwrap();
    let bus = evbus::bus::Bus::new(Arc::new(env.transport.clone()), catalog, "/evbus-redis");
    let name = bus.dead_letter_queue_name("orderFailed", "g");
    let dlq = env.transport.queue(&name).await.unwrap();
    for n in 0..3 {
        let record = Event::builder("orderFailed", "/evbus-redis")
            .json(&serde_json::json!({ "n": n }))
            .unwrap()
            .extension(DEAD_LETTER_REASON, "rejected")
            .build()
            .unwrap();
        dlq.send(&record).await.unwrap();
    }
    let key = env.transport.queue_key(&name);
    let dead = bus.dead_letters("orderFailed", "g").await.unwrap();
    let looks = 6;
    for _ in 0..looks {
        let seen = dead.peek(10, Duration::from_millis(500)).await.unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
    }
    let group = env.groups(&key).await[0].0.clone();
    let settled = eventually(WAIT, || async {
        env.consumers(&key, &group).await == vec![("evbus.released".to_owned(), 3)]
    })
    .await;
    let consumers = env.consumers(&key, &group).await;
    assert!(
        settled,
        "after {looks} looks, consumers (name, pending): {consumers:?}"
    );
    assert_eq!(env.pending(&key, &group).await, 3);
    // Nothing was lost: the next look sees every record, at once.
    assert_eq!(
        dead.peek(10, Duration::from_secs(2)).await.unwrap().len(),
        3
    );
    drop(dlq);
    env.cleanup().await;
}

/// A consumer whose subscription is dropped leaves its group only once none of its
/// deliveries can be settled through it any more, and never while it owns entries it did not
/// give back (removing it would delete them from the pending list): a delivery held past the
/// subscription's end keeps it, its nack lets it leave; a delivery dropped unsettled keeps it
/// until the visibility timeout brings the entry back to another consumer.
#[tokio::test]
async fn a_stopped_consumer_stays_while_it_owns_pending_entries() {
    let Some(env) = Env::new().await else { return };
    let (key, sub, mut held) = hold_all(&env, 2).await;
    let group = env.groups(&key).await[0].0.clone();
    let [mine] = env.consumers(&key, &group).await.try_into().unwrap();
    drop(sub);
    // The consumer task stops; both deliveries are still held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.consumers(&key, &group).await, vec![(mine.0.clone(), 2)]);
    held.pop().unwrap().ack().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.consumers(&key, &group).await, vec![(mine.0.clone(), 1)]);
    // The last one given back: the consumer leaves, the entry stays pending.
    held.pop().unwrap().nack(None).await.unwrap();
    let left = eventually(WAIT, || async {
        env.consumers(&key, &group).await == vec![("evbus.released".to_owned(), 1)]
    })
    .await;
    assert!(left, "{:?}", env.consumers(&key, &group).await);
    // Taken over as usual, as a second attempt; dropped unsettled, it keeps its consumer.
    let queue = env.transport.queue("q").await.unwrap();
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(120));
    let mut again = queue.receive(options).await.unwrap();
    let retried = next(&mut again).await;
    assert_eq!(retried.attempt(), 2);
    let consumers = env.consumers(&key, &group).await;
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    let second = consumers
        .into_iter()
        .find(|(name, _)| name != "evbus.released")
        .unwrap();
    assert_eq!(second.1, 1, "{second:?}");
    drop(again);
    drop(retried);
    // Kept: it owns an entry it did not give back (and the empty holder of given-back
    // entries is gone).
    let kept = eventually(WAIT, || async {
        env.consumers(&key, &group).await == vec![(second.0.clone(), 1)]
    })
    .await;
    assert!(kept, "{:?}", env.consumers(&key, &group).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.consumers(&key, &group).await,
        vec![(second.0.clone(), 1)]
    );
    assert_eq!(env.pending(&key, &group).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn maxlen_retention_trims_topics_approximately_but_never_queues() {
    let Some(env) = Env::with(|c| c.retention = Retention::MaxLen { entries: 100 }).await else {
        return;
    };
    let events: Vec<Event> = (0..1000).map(event).collect();
    let topic = env.transport.topic("t").await.unwrap();
    topic.publish_batch(&events).await.unwrap();
    let len = env.xlen(&env.transport.topic_key("t")).await;
    assert!((100..1000).contains(&len), "topic length {len}");
    let queue = env.transport.queue("q").await.unwrap();
    queue.send_batch(&events).await.unwrap();
    assert_eq!(env.xlen(&env.transport.queue_key("q")).await, 1000);
    env.cleanup().await;
}

#[tokio::test]
async fn deleting_a_topic_ends_its_subscriptions() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    env.transport.delete_topic("t").await.unwrap();
    let ended = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("the stream ends in time");
    assert!(ended.is_none());
    env.cleanup().await;
}

/// Redis 7 answers the blocked read of a subscription whose stream is deleted with
/// `UNBLOCKED`: that is the deletion too. Taken for a lost connection, the subscription
/// reconnected after its backoff and, with the group made again meanwhile, went on
/// consuming the new subscription's events.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_whose_topic_is_deleted_and_made_again_at_once_ends() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let mut old = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    // Set-up: the old subscription waits in its blocking read.
    let waiting = tokio::time::timeout(Duration::from_millis(300), old.next()).await;
    assert!(waiting.is_err(), "nothing was published yet");
    env.transport.delete_topic("t").await.unwrap();
    let topic = env.transport.topic("t").await.unwrap();
    let mut new = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let ended = tokio::time::timeout(WAIT, old.next())
        .await
        .expect("the old subscription ends in time");
    assert!(ended.is_none(), "the old subscription went on: {ended:?}");
    topic.publish(&event(1)).await.unwrap();
    next(&mut new).await.ack().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_connection_error() {
    let port = evbus_conformance::process::free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}?connect_timeout_ms=500&reconnect_max_delay_ms=100");
    let err = RedisTransport::connect_url(&url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread")]
async fn persistence_is_declared_only_with_an_append_only_file() {
    let Some(env) = Env::new().await else { return };
    // The shared development server keeps nothing on disk.
    let info: String = env.cmd(redis::cmd("INFO").arg("persistence")).await;
    let aof = info.contains("aof_enabled:1");
    assert_eq!(env.transport.capabilities().persistent, aof);
    env.cleanup().await;
    let Ok(server) = support::RedisServer::start() else {
        eprintln!("WARNING: no redis-server binary; persistence part skipped");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", server.port());
    let transport = RedisTransport::connect_url(&url).await.unwrap();
    assert!(transport.capabilities().persistent);
    transport.close().await.unwrap();
}

#[tokio::test]
async fn close_refuses_new_work_and_ends_subscriptions() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    topic.publish(&event(1)).await.unwrap();
    let held = next(&mut sub).await;
    env.transport.close().await.unwrap();
    assert_eq!(
        topic.publish(&event(2)).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(held.ack().await.unwrap_err().kind(), ErrorKind::Closed);
    let ended = tokio::time::timeout(WAIT, sub.next()).await.unwrap();
    assert!(ended.is_none());
    env.transport.close().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_transport_works_as_a_trait_object() {
    let Some(env) = Env::new().await else { return };
    let transport: Arc<dyn Transport> = Arc::new(env.transport.clone());
    let queue = transport.queue("q").await.unwrap();
    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    env.cleanup().await;
}

/// The group every queue's consumers share.
const QUEUE_GROUP: &str = "evbus";

/// An outside review: an ordered handler's events fetched ahead (the consumer's read-ahead
/// buffer, `prefetch` entries) waited there, not in the key's lane, so the Bus did not renew
/// them and, behind a busy key, they came back from Redis (16 events of one key, runs of
/// 300 ms, a 1 s timeout, concurrency 4 + prefetch 4: 19 runs, event 7 after event 15). An
/// ordered handler now takes whatever its in-flight limit allows into its lanes, where every
/// waiting event is renewed: each runs once, in order, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_bus_handler_renews_everything_it_fetched_ahead() {
    let Some(env) = Env::new().await else { return };
    let mut catalog = evbus::Catalog::builder();
    catalog.strict(false);
    let transport = Arc::new(env.transport.clone());
    let bus = evbus::Bus::builder(transport, catalog.freeze().unwrap()).build();
    let ty = "afterOrderCreate";
    let topic_name = bus.topic_name(ty);
    let group = bus.subscription_name(ty, "billing");
    let topic = env.transport.topic(&topic_name).await.unwrap();
    // The subscription exists before the events: the handler's first read finds them all.
    drop(
        topic
            .subscribe(SubscribeOptions::named(&group))
            .await
            .unwrap(),
    );
    const EVENTS: u64 = 16;
    for n in 0..EVENTS {
        let one_key = event(n)
            .into_builder()
            .partition_key("k")
            .extension("seq", n.to_string())
            .build()
            .unwrap();
        topic.publish(&one_key).await.unwrap();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = bus
        .on(ty, "billing", move |msg: evbus::bus::Message| {
            let tx = tx.clone();
            let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
            let attempt = msg.attempt();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send((seq, attempt));
                Ok(())
            }
        })
        .ordered_by_key(true)
        .concurrency(4)
        .prefetch(4)
        .visibility_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < EVENTS as usize {
        match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
            Ok(Some(run)) => got.push(run),
            _ => panic!("only {} runs: {got:?}", got.len()),
        }
    }
    assert_eq!(got, (0..EVENTS).map(|n| (n, 1)).collect::<Vec<_>>());
    // Nothing runs again (a timed-out copy would come back within a timeout).
    if let Ok(Some(again)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
        panic!("an event ran again: {again:?}");
    }
    handle.shutdown(Duration::from_secs(5)).await;
    env.cleanup().await;
}

/// A Bus handler holds the events it runs plus its prefetch (by default as many as its
/// concurrency) fetched ahead, and no more: with every run blocked, that is what is pending
/// for its group, while it never runs more than its concurrency at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_handler_holds_its_running_events_and_its_prefetch() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    const EVENTS: usize = 10;
    // (concurrency, prefetch, pending expected while every run is blocked)
    for (concurrency, prefetch, expected) in [(2, None, 4), (2, Some(0), 2), (1, Some(3), 4)] {
        let Some(env) = Env::new().await else { return };
        let mut catalog = evbus::Catalog::builder();
        catalog.strict(false);
        let transport = Arc::new(env.transport.clone());
        let bus = evbus::Bus::builder(transport, catalog.freeze().unwrap()).build();
        let ty = "afterOrderCreate";
        // Published before the handler starts, to a subscription that exists already, so the
        // handler's first read finds them all and fetches as many as its window allows.
        let topic_name = bus.topic_name(ty);
        let group = bus.subscription_name(ty, "billing");
        let topic = env.transport.topic(&topic_name).await.unwrap();
        drop(
            topic
                .subscribe(SubscribeOptions::named(&group))
                .await
                .unwrap(),
        );
        for n in 0..EVENTS as u64 {
            topic.publish(&event(n)).await.unwrap();
        }
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (open, opened) = tokio::sync::watch::channel(false);
        let handler = {
            let (running, most, done) = (running.clone(), most.clone(), done.clone());
            bus.on(ty, "billing", move |_msg| {
                let (running, most, done) = (running.clone(), most.clone(), done.clone());
                let mut opened = opened.clone();
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let _ = opened.wait_for(|open| *open).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .concurrency(concurrency)
        };
        let handler = match prefetch {
            Some(n) => handler.prefetch(n),
            None => handler,
        };
        let handle = handler.start().await.unwrap();
        let key = env.transport.topic_key(&topic_name);
        assert!(
            eventually(WAIT, || async {
                running.load(Ordering::SeqCst) == concurrency
            })
            .await,
            "the handler starts {concurrency} runs"
        );
        // The read that fetched the running events fetched the prefetch with them, and a
        // read-ahead finds no free slot: the count is final once they run.
        assert!(
            eventually(WAIT, || async {
                env.pending(&key, &group).await == expected
            })
            .await,
            "concurrency {concurrency}, prefetch {prefetch:?}: {} pending, {expected} expected",
            env.pending(&key, &group).await
        );
        assert_eq!(most.load(Ordering::SeqCst), concurrency);

        // Let them run: every event is handled and acknowledged, never more than the
        // concurrency at once.
        open.send_replace(true);
        assert!(
            eventually(WAIT, || async { done.load(Ordering::SeqCst) == EVENTS }).await,
            "{} of {EVENTS} handled",
            done.load(Ordering::SeqCst)
        );
        assert!(
            eventually(WAIT, || async { env.pending(&key, &group).await == 0 }).await,
            "every event acknowledged"
        );
        assert_eq!(most.load(Ordering::SeqCst), concurrency);
        handle.shutdown(Duration::from_secs(5)).await;
        env.cleanup().await;
    }
}

/// The consumer reads ahead while deliveries are handled, but never fetches more than its
/// in-flight limit (handed out and buffered together), and hands entries out in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_keeps_order_and_the_in_flight_limit() {
    let Some(env) = Env::new().await else { return };
    const N: u64 = 60;
    const LIMIT: usize = 8;
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let events: Vec<Event> = (0..N).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let mut sub = queue
        .receive(ConsumerOptions::default().max_in_flight(LIMIT))
        .await
        .unwrap();

    // Hold half the limit unsettled: what is pending for the consumer (handed out, buffered,
    // or being read ahead) stays within the limit while the consumer sits there.
    let mut held = Vec::new();
    for _ in 0..LIMIT / 2 {
        held.push(next(&mut sub).await);
    }
    let watch_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < watch_until {
        let pending = env.pending(&key, QUEUE_GROUP).await;
        assert!(
            pending <= LIMIT as i64,
            "{pending} entries pending for a consumer with max_in_flight {LIMIT}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Then ack each delivery as it comes (reads ahead run alongside): every event once, in
    // the order it was sent.
    let mut got: Vec<String> = held.iter().map(|d| d.event().id().to_owned()).collect();
    for d in held {
        d.ack().await.unwrap();
    }
    while got.len() < N as usize {
        let d = next(&mut sub).await;
        got.push(d.event().id().to_owned());
        d.ack().await.unwrap();
    }
    let sent: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(
        got, sent,
        "one consumer gets a queue's events once each, in order"
    );
    assert!(
        eventually(WAIT, || async { env.pending(&key, QUEUE_GROUP).await == 0 }).await,
        "every entry settled"
    );
    env.cleanup().await;
}

/// Sends four events to queue `q` and takes the first with a consumer that has room for
/// four and a 1 s visibility timeout, then acks it: the other three wait in its buffer,
/// fetched by the same read. Returns the queue's stream key, the subscription and the
/// other three's entry ids, in order, and the four events sent.
async fn three_fetched_ahead(env: &Env) -> (String, Subscription, Vec<String>, Vec<Event>) {
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let events: Vec<Event> = (0..4).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let options = ConsumerOptions::default()
        .max_in_flight(4)
        .visibility_timeout(Duration::from_secs(1));
    let mut sub = queue.receive(options).await.unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.event().id(), events[0].id());
    first.ack().await.unwrap();
    let ahead: Vec<String> = env
        .pending_entries(&key, QUEUE_GROUP)
        .await
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    assert_eq!(ahead.len(), 3, "the other three were fetched ahead");
    (key, sub, ahead, events)
}

/// Entries fetched ahead are renewed while the consumer reads, however slowly, but one
/// another consumer took over meanwhile is not claimed back: it leaves the buffer. Here the
/// consumer does not poll for 1.3 s, past the 1 s timeout of what it fetched (but within a
/// timeout of the renewals made while it still counted as reading).
#[tokio::test]
async fn entries_fetched_ahead_are_renewed_but_one_taken_over_meanwhile_is_dropped() {
    let Some(env) = Env::new().await else { return };
    let (key, mut sub, ahead, events) = three_fetched_ahead(&env).await;
    // Another consumer takes the second entry over (a stock client's XCLAIM).
    let _: Value = env
        .cmd(
            redis::cmd("XCLAIM")
                .arg(&key)
                .arg(QUEUE_GROUP)
                .arg("thief")
                .arg(0)
                .arg(&ahead[0])
                .arg("JUSTID"),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for (n, id) in [(2, &ahead[1]), (3, &ahead[2])] {
        let d = next(&mut sub).await;
        assert_eq!(
            (d.event().id(), d.attempt()),
            (events[n].id(), 1),
            "event {n}, kept in the buffer past its first timeout by the renewals, on its \
             first attempt (the one taken over is not handed out)"
        );
        let pending = env.pending_entries(&key, QUEUE_GROUP).await;
        let mine = pending.iter().find(|p| &p.0 == id).unwrap();
        assert!(mine.2 < 1000, "renewed within the timeout: {pending:?}");
        let stolen = pending.iter().find(|p| p.0 == ahead[0]).unwrap();
        assert_eq!(
            (stolen.1.as_str(), stolen.3),
            ("thief", 1),
            "the entry taken over stays with the other consumer: {pending:?}"
        );
        d.ack().await.unwrap();
    }
    drop(sub);
    env.cleanup().await;
}

/// Entries fetched ahead and then trimmed from the stream (retention, or a stock client's
/// `XTRIM`) are still handed out, each once, after their first timeout too: the consumer
/// holds their fields and nobody else can have them. A renewal's `XCLAIM` deletes a trimmed
/// entry from the pending list (Redis 7), and the first version of the renewal then dropped
/// it from the buffer too: lost (outside review of ADR 0037). Here the stream is trimmed
/// empty with three entries buffered, and the consumer holds each delivery 400 ms (1.2 s in
/// all, past the 1 s timeout).
#[tokio::test]
async fn entries_fetched_ahead_and_then_trimmed_are_still_handed_out() {
    let Some(env) = Env::new().await else { return };
    let (key, mut sub, _ahead, events) = three_fetched_ahead(&env).await;
    let trimmed: i64 = env
        .cmd(redis::cmd("XTRIM").arg(&key).arg("MAXLEN").arg(0))
        .await;
    assert!(
        trimmed >= 3,
        "the three buffered entries were trimmed: {trimmed}"
    );
    for event in &events[1..] {
        let d = next(&mut sub).await;
        assert_eq!(d.event().id(), event.id(), "every trimmed entry, in order");
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Its ack may find it gone (a takeover scan deletes trimmed entries); the event was
        // handed out, once.
        let _ = d.ack().await;
    }
    drop(sub);
    env.cleanup().await;
}

/// A consumer that fetched ahead and then stops reading (its subscription kept, never
/// polled) does not hold the events for ever: renewals stop once it has not read for a whole
/// visibility timeout, and another consumer takes them over (a second attempt).
#[tokio::test]
async fn entries_fetched_ahead_time_out_once_the_consumer_stops_reading() {
    let Some(env) = Env::new().await else { return };
    let (_key, stuck, _ahead, events) = three_fetched_ahead(&env).await;
    let queue = env.transport.queue("q").await.unwrap();
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut other = queue.receive(options).await.unwrap();
    for (n, event) in events.iter().enumerate().skip(1) {
        let d = next(&mut other).await;
        assert_eq!(
            (d.event().id(), d.attempt()),
            (event.id(), 2),
            "event {n}, taken over from the consumer that stopped reading"
        );
        d.ack().await.unwrap();
    }
    drop(stuck);
    env.cleanup().await;
}

/// A consumer waiting in a blocking read gets its entry handed over by its task; if the
/// consumer stops polling meanwhile (its handler busy elsewhere) for longer than the
/// visibility timeout, another consumer takes the entry over, and the first must not hand
/// out its stale copy when it polls again (the handler would run the event twice).
#[tokio::test]
async fn a_consumer_back_from_a_pause_hands_out_nothing_its_blocking_read_got_that_timed_out() {
    let Some(env) = Env::new().await else { return };
    let queue = env.transport.queue("q").await.unwrap();
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut paused = queue.receive(options.clone()).await.unwrap();
    // One poll: the consumer's task now waits in `XREADGROUP ... BLOCK` for it.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), paused.next())
            .await
            .is_err(),
        "nothing to deliver yet"
    );
    let sent = event(1);
    queue.send(&sent).await.unwrap();
    let mut other = queue.receive(options).await.unwrap();
    let d = next(&mut other).await;
    assert_eq!(
        (d.event().id(), d.attempt()),
        (sent.id(), 2),
        "taken over from the paused consumer after its timeout"
    );
    let stale = tokio::time::timeout(Duration::from_millis(500), paused.next()).await;
    assert!(
        stale.is_err(),
        "the paused consumer handed out its timed-out copy: {:?}",
        stale.map(|d| d.map(|d| d.map(|d| (d.event().id().to_owned(), d.attempt()))))
    );
    d.ack().await.unwrap();
    drop(paused);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_acks_are_all_applied_with_far_fewer_script_calls() {
    let server = support::RedisServer::start().ok();
    let Some(env) = Env::on(server.as_ref(), |_| {}).await else {
        return;
    };
    const N: usize = 300;
    let (key, _sub, deliveries) = hold_all(&env, N).await;
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, N as i64);

    let before = env.script_calls().await;
    // Each ack from a task of its own, as handlers ack.
    let acks: Vec<_> = deliveries
        .into_iter()
        .map(|d| tokio::spawn(async move { d.ack().await }))
        .collect();
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    let calls = env.script_calls().await - before;

    assert_eq!(env.pending(&key, QUEUE_GROUP).await, 0, "every ack applied");
    assert_eq!(
        env.xlen(&key).await,
        0,
        "acknowledged queue entries deleted"
    );
    eprintln!("{N} acks took {calls} script calls");
    assert!(calls >= 1);
    if env.own_server {
        assert!(
            calls * 4 <= N as i64,
            "{N} acks took {calls} script calls: not batched"
        );
    } else {
        // Other clients of the shared server may run scripts meanwhile.
        assert!(calls < N as i64, "{N} acks took {calls} script calls");
    }
    env.cleanup().await;
}

// The default current-thread runtime: `join!` registers every ack before the flush task
// runs, so the five acks go to Redis in one script call (a queue's acks always go through
// the settlement script, which deletes what it settles).
#[tokio::test]
async fn a_late_ack_after_a_takeover_is_refused_while_the_rest_of_its_batch_is_applied() {
    let server = support::RedisServer::start().ok();
    let Some(env) = Env::on(server.as_ref(), |_| {}).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let long = ConsumerOptions::default()
        .max_in_flight(10)
        .visibility_timeout(Duration::from_secs(120));
    let mut slow = queue.receive(long).await.unwrap();
    queue.send(&event(0)).await.unwrap();
    let stale = next(&mut slow).await;
    // A stock client takes the entry over (an evbus consumer would first wait out the
    // holder's visibility timeout).
    let pending: Value = env
        .cmd(
            redis::cmd("XPENDING")
                .arg(&key)
                .arg(QUEUE_GROUP)
                .arg("-")
                .arg("+")
                .arg(1),
        )
        .await;
    let id = match &pending {
        Value::Array(rows) => match rows.first() {
            Some(Value::Array(row)) => redis::from_redis_value::<String>(row[0].clone()).unwrap(),
            other => panic!("XPENDING row {other:?}"),
        },
        other => panic!("XPENDING {other:?}"),
    };
    let _: Value = env
        .cmd(
            redis::cmd("XCLAIM")
                .arg(&key)
                .arg(QUEUE_GROUP)
                .arg("stock-client")
                .arg(0)
                .arg(&id),
        )
        .await;

    let events: Vec<Event> = (1..5).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let mut others = Vec::new();
    for _ in 1..5 {
        others.push(next(&mut slow).await);
    }
    let before = env.script_calls().await;
    let (late, rest) = tokio::join!(
        stale.ack(),
        futures::future::join_all(others.iter().map(|d| d.ack()))
    );
    let calls = env.script_calls().await - before;

    let err = late.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    assert!(err.message().contains("handed out again"), "{err}");
    for result in rest {
        result.unwrap();
    }
    if env.own_server {
        assert_eq!(calls, 1, "the five acks share one script call");
    }
    // Only the stock client's delivery is left.
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, 1);
    assert_eq!(env.xlen(&key).await, 1);
    env.cleanup().await;
}

/// Sends `n` events to topic `t` and takes every one of them through subscription `s` with
/// `options` (in-flight limit `n`): the topic's stream key, the subscription and the
/// deliveries, all unsettled.
async fn hold_all_of_topic(
    env: &Env,
    n: usize,
    options: ConsumerOptions,
) -> (String, Subscription, Vec<evbus::Delivery>) {
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    let options = SubscribeOptions::named("s").consumer(options.max_in_flight(n));
    let mut sub = topic.subscribe(options).await.unwrap();
    let events: Vec<Event> = (0..n as u64).map(event).collect();
    topic.publish_batch(&events).await.unwrap();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(next(&mut sub).await);
    }
    (key, sub, held)
}

// Acks well inside their visibility timeout skip the ownership check: plain `XACK`s, no
// script call (ADR 0021).
#[tokio::test]
async fn prompt_acks_of_a_topic_are_plain_xacks() {
    let server = support::RedisServer::start().ok();
    let Some(env) = Env::on(server.as_ref(), |_| {}).await else {
        return;
    };
    const N: usize = 50;
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(60));
    let (key, _sub, held) = hold_all_of_topic(&env, N, options).await;
    assert_eq!(env.pending(&key, "s").await, N as i64);
    let before = env.script_calls().await;
    for result in futures::future::join_all(held.iter().map(|d| d.ack())).await {
        result.unwrap();
    }
    let calls = env.script_calls().await - before;
    assert_eq!(env.pending(&key, "s").await, 0, "every ack applied");
    if env.own_server {
        assert_eq!(calls, 0, "prompt acks need no settlement script");
    }
    env.cleanup().await;
}

// Past half its visibility timeout a delivery is acknowledged through the settlement
// script, which checks it is still this consumer's.
#[tokio::test]
async fn a_slow_ack_of_a_topic_goes_through_the_checked_script() {
    let server = support::RedisServer::start().ok();
    let Some(env) = Env::on(server.as_ref(), |_| {}).await else {
        return;
    };
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_millis(1200));
    let (key, _sub, held) = hold_all_of_topic(&env, 1, options).await;
    // Ageing the delivery past its plain window (600 ms), not asserting a duration.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = env.script_calls().await;
    held[0].ack().await.unwrap();
    let calls = env.script_calls().await - before;
    assert_eq!(env.pending(&key, "s").await, 0);
    if env.own_server {
        assert_eq!(calls, 1, "a slow ack is checked by the script");
    }
    env.cleanup().await;
}

// A delivery is its consumer's for that consumer's whole visibility timeout: a consumer of
// the same group with a shorter timeout takes it over only after it (ADR 0021).
#[tokio::test]
async fn a_delivery_is_not_taken_over_before_its_own_visibility_timeout() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let holder = ConsumerOptions::default().visibility_timeout(Duration::from_millis(2500));
    let (key, _held_sub, held) = hold_all_of_topic(&env, 1, holder).await;
    let taken_at = tokio::time::Instant::now();
    let topic = env.transport.topic("t").await.unwrap();
    let short = ConsumerOptions::default().visibility_timeout(Duration::from_millis(100));
    let mut other = topic
        .subscribe(SubscribeOptions::named("s").consumer(short))
        .await
        .unwrap();
    // Still held: the other consumer (scanning every 50 ms) gets nothing for a second.
    let early = tokio::time::timeout(Duration::from_secs(1), other.next()).await;
    assert!(
        early.is_err(),
        "taken over before the holder's timeout: {early:?}"
    );
    let again = next(&mut other).await;
    assert!(taken_at.elapsed() >= Duration::from_millis(2000));
    assert_eq!(again.event().id(), held[0].event().id());
    assert_eq!(again.attempt(), 2);
    let err = held[0].ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    again.ack().await.unwrap();
    assert_eq!(env.pending(&key, "s").await, 0);
    env.cleanup().await;
}

// A renewal is checked like a settlement: once the delivery was handed out again, it is
// refused and the entry stays with its new holder, with its delivery count.
#[tokio::test]
async fn a_renewal_after_a_takeover_is_expired_and_takes_nothing_back() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let short = ConsumerOptions::default().visibility_timeout(Duration::from_millis(200));
    let mut slow = queue.receive(short.clone()).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let stale = next(&mut slow).await;
    let mut fast = queue.receive(short).await.unwrap();
    let fresh = next(&mut fast).await;
    assert_eq!(fresh.event().id(), stale.event().id());
    assert_eq!(fresh.attempt(), 2);
    let taken = env.pending_entries(&key, QUEUE_GROUP).await;
    assert_eq!(taken.len(), 1);
    let err = stale.renew().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    let after = env.pending_entries(&key, QUEUE_GROUP).await;
    assert_eq!(
        (&after[0].1, after[0].3),
        (&taken[0].1, 2),
        "still the new holder's, with its count"
    );
    fresh.ack().await.unwrap();
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, 0);
    env.cleanup().await;
}

// A delivery whose timeout ran out is not renewed even if nobody took it over yet (any
// consumer's next scan may); it stays as it was, and is still its holder's to settle.
#[tokio::test]
async fn a_renewal_after_the_visibility_timeout_is_expired() {
    let Some(env) = Env::new().await else { return };
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_millis(300));
    // Nobody polls the subscription after this: no takeover scan runs.
    let (key, _sub, held) = hold_all_of_topic(&env, 1, options).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = held[0].renew().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    let pending = env.pending_entries(&key, "s").await;
    assert!(pending[0].2 >= 500, "idle time reset: {pending:?}");
    assert_eq!(pending[0].3, 1);
    held[0].ack().await.unwrap();
    assert_eq!(env.pending(&key, "s").await, 0);
    env.cleanup().await;
}

// After a renewal, the plain-ack window of ADR 0021 runs from the renewal: an ack past half
// the timeout since the fetch but inside half of it since the renewal is a plain `XACK`.
#[tokio::test]
async fn a_renewed_delivery_is_acked_plainly_within_half_a_timeout_of_its_renewal() {
    let server = support::RedisServer::start().ok();
    let Some(env) = Env::on(server.as_ref(), |_| {}).await else {
        return;
    };
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_millis(1200));
    let (key, _sub, held) = hold_all_of_topic(&env, 1, options).await;
    // Ageing the delivery past the plain window of its fetch (600 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = env.script_calls().await;
    held[0].renew().await.unwrap();
    let renewed = env.script_calls().await;
    held[0].ack().await.unwrap();
    let after = env.script_calls().await;
    assert_eq!(env.pending(&key, "s").await, 0, "the ack applied");
    if env.own_server {
        assert_eq!(renewed - before, 1, "a renewal is one script call");
        assert_eq!(
            after - renewed,
            0,
            "the ack after the renewal is a plain XACK"
        );
    }
    env.cleanup().await;
}

// A renewed delivery stays its consumer's past its first timeout, even against a consumer
// with a much shorter timeout scanning all along, and its late ack (checked) lands.
#[tokio::test]
async fn a_renewed_delivery_is_not_taken_over_until_a_timeout_after_its_renewal() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let holder = ConsumerOptions::default().visibility_timeout(Duration::from_millis(2000));
    let (key, _held_sub, held) = hold_all_of_topic(&env, 1, holder).await;
    let taken_at = tokio::time::Instant::now();
    let topic = env.transport.topic("t").await.unwrap();
    let short = ConsumerOptions::default().visibility_timeout(Duration::from_millis(100));
    let mut other = topic
        .subscribe(SubscribeOptions::named("s").consumer(short))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    held[0].renew().await.unwrap();
    // 2.6 s after the fetch, 1.5 s after the renewal: still held.
    let early = tokio::time::timeout(Duration::from_millis(1500), other.next()).await;
    assert!(
        early.is_err(),
        "taken over {:?} after the fetch although renewed: {early:?}",
        taken_at.elapsed()
    );
    held[0].ack().await.unwrap();
    assert_eq!(env.pending(&key, "s").await, 0);
    env.cleanup().await;
}

// A nack (here with a delay) landing in Redis while a renewal of the same delivery is on
// its way: the renewal must not reset the entry's idle time ("forever" after a nack), or
// the redelivery would wait a whole visibility timeout instead of the delay.
#[tokio::test]
async fn a_renewal_does_not_hold_back_a_delivery_given_back_meanwhile() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let long = ConsumerOptions::default().visibility_timeout(Duration::from_secs(60));
    let mut holder = queue.receive(long.clone()).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let held = next(&mut holder).await;
    let pending = env.pending_entries(&key, QUEUE_GROUP).await;
    let (id, consumer) = (&pending[0].0, &pending[0].1);
    // What the nack script does with a delay of 500 ms, done behind the delivery's back (it
    // still looks unsettled, as it does to a renewal racing with its nack).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: Value = env
        .cmd(
            redis::cmd("ZADD")
                .arg(format!("{key}:delayed"))
                .arg(now_ms + 500)
                .arg(format!("{id} {QUEUE_GROUP}")),
        )
        .await;
    let _: Value = env
        .cmd(
            redis::cmd("XCLAIM")
                .arg(&key)
                .arg(QUEUE_GROUP)
                .arg(consumer)
                .arg(0)
                .arg(id)
                .arg("TIME")
                .arg(1)
                .arg("JUSTID"),
        )
        .await;
    let err = held.renew().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadySettled, "{err}");
    let after = env.pending_entries(&key, QUEUE_GROUP).await;
    assert!(
        after[0].2 > 10 * 365 * 24 * 3600 * 1000,
        "the renewal reset the idle time of a given-back entry: {after:?}"
    );
    // Redelivered once due, not a 60 s timeout later.
    let mut other = queue.receive(long).await.unwrap();
    let again = next(&mut other).await;
    assert_eq!(again.event().id(), held.event().id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    drop(held);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ack_batch_fails_every_ack_and_leaves_the_entries_pending() {
    let Ok(server) = support::RedisServer::start() else {
        eprintln!("WARNING: no redis-server binary; test skipped");
        return;
    };
    let url = format!(
        "redis://127.0.0.1:{}?command_timeout_ms=1000&reconnect_max_delay_ms=200",
        server.port()
    );
    let Some(env) = Env::at(&url, true, |_| {}).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let events: Vec<Event> = (0..20).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let options = ConsumerOptions::default()
        .max_in_flight(20)
        .visibility_timeout(Duration::from_secs(120));
    let mut sub = queue.receive(options).await.unwrap();
    let mut deliveries = Vec::new();
    for _ in 0..20 {
        deliveries.push(next(&mut sub).await);
    }
    server.kill();
    let results = futures::future::join_all(deliveries.iter().map(|d| d.ack())).await;
    for result in &results {
        let err = result
            .as_ref()
            .expect_err("no ack succeeds while Redis is down");
        assert!(err.is_retryable(), "{err}");
    }
    tokio::task::block_in_place(|| server.restart()).unwrap();
    // Nothing was acknowledged (the append-only file kept the pending list): retrying
    // settles every delivery.
    let mut raw = redis::Client::open(url.split('?').next().unwrap())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let summary: Value = redis::cmd("XPENDING")
        .arg(&key)
        .arg(QUEUE_GROUP)
        .query_async(&mut raw)
        .await
        .unwrap();
    let Value::Array(summary) = summary else {
        panic!("{summary:?}")
    };
    assert_eq!(summary[0], Value::Int(20));
    let mut left: Vec<&evbus::Delivery> = deliveries.iter().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !left.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "acks still failing");
        let results = futures::future::join_all(left.iter().map(|d| d.ack())).await;
        left = left
            .into_iter()
            .zip(results)
            .filter_map(|(d, r)| match r {
                Ok(()) => None,
                Err(e) if e.is_retryable() => Some(d),
                Err(e) => panic!("{e}"),
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let summary: Value = redis::cmd("XPENDING")
        .arg(&key)
        .arg(QUEUE_GROUP)
        .query_async(&mut raw)
        .await
        .unwrap();
    let Value::Array(summary) = summary else {
        panic!("{summary:?}")
    };
    assert_eq!(summary[0], Value::Int(0));
    let _ = env.transport.close().await;
}

// Current-thread runtime: both acks share one script call. The stale delivery is still
// pending for this consumer, but with the count of the later delivery, so it is refused.
#[tokio::test]
async fn a_stale_and_a_fresh_delivery_of_one_entry_acked_together_settle_only_the_fresh_one() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(50)).await else {
        return;
    };
    let queue = env.transport.queue("q").await.unwrap();
    let key = env.transport.queue_key("q");
    let options = ConsumerOptions::default()
        .max_in_flight(2)
        .visibility_timeout(Duration::from_millis(300));
    let mut sub = queue.receive(options).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let stale = next(&mut sub).await;
    // Held past its visibility timeout: the same consumer takes it over again.
    let fresh = next(&mut sub).await;
    assert_eq!(fresh.event().id(), stale.event().id());
    assert_eq!(fresh.attempt(), 2);
    let (late, current) = tokio::join!(stale.ack(), fresh.ack());
    let err = late.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    current.unwrap();
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, 0);
    assert_eq!(env.xlen(&key).await, 0);
    env.cleanup().await;
}

// One script call checks a batch through one `XPENDING` over its id range, which lists a
// limited number of the consumer's entries; deliveries beyond that are checked one by one.
#[tokio::test]
async fn acks_far_apart_among_many_held_deliveries_are_all_applied() {
    let Some(env) = Env::new().await else { return };
    const N: usize = 100;
    let (key, _sub, mut held) = hold_all(&env, N).await;
    let last = held.pop().unwrap();
    let first = held.remove(0);
    let (a, b) = tokio::join!(first.ack(), last.ack());
    a.unwrap();
    b.unwrap();
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, N as i64 - 2);
    let results = futures::future::join_all(held.iter().map(|d| d.ack())).await;
    for result in results {
        result.unwrap();
    }
    assert_eq!(env.pending(&key, QUEUE_GROUP).await, 0);
    assert_eq!(env.xlen(&key).await, 0);
    env.cleanup().await;
}

/// Sends an event to queue `name` and, as a stock client would (`redis-cli XREADGROUP` then
/// `XCLAIM <key> evbus stock 0 <id> IDLE ... RETRYCOUNT <count>`), leaves it pending with
/// delivery count `count`, idle long enough for any consumer to take it over. Returns the
/// queue, its stream key and the event.
async fn over_delivered(
    env: &Env,
    name: &str,
    count: i64,
) -> (Arc<dyn evbus::Queue>, String, Event) {
    let queue = env.transport.queue(name).await.unwrap();
    let key = env.transport.queue_key(name);
    let sent = event(1);
    queue.send(&sent).await.unwrap();
    // The group a queue's consumers share (`evbus`), at the start, as the first `receive`
    // creates it; that `receive` keeps it as it is.
    let _: Value = env
        .cmd(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg("evbus")
                .arg("0"),
        )
        .await;
    let _: Value = env
        .cmd(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("evbus")
                .arg("stock")
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(&key)
                .arg(">"),
        )
        .await;
    let range: Value = env
        .cmd(redis::cmd("XRANGE").arg(&key).arg("-").arg("+"))
        .await;
    let id = match &range {
        Value::Array(entries) => match entries.first() {
            Some(Value::Array(entry)) => text(&entry[0]),
            other => panic!("XRANGE entry {other:?}"),
        },
        other => panic!("XRANGE {other:?}"),
    };
    let _: Value = env
        .cmd(
            redis::cmd("XCLAIM")
                .arg(&key)
                .arg("evbus")
                .arg("stock")
                .arg(0)
                .arg(&id)
                .arg("IDLE")
                .arg(3_600_000)
                .arg("RETRYCOUNT")
                .arg(count)
                .arg("JUSTID"),
        )
        .await;
    (queue, key, sent)
}

/// A delivery count past `u32::MAX` (and past what a Lua number prints or counts exactly):
/// the attempt shown saturates, but the ack is checked against Redis's exact count, so it
/// settles the delivery instead of being refused as taken over.
#[tokio::test]
async fn a_delivery_counted_past_u32_max_can_still_be_settled() {
    let Some(env) = Env::new().await else { return };
    let counts = [4_294_967_296_i64, 1_000_000_000_000_000, (1 << 53) + 1];
    for (i, count) in counts.into_iter().enumerate() {
        let name = format!("q{i}");
        let (queue, key, sent) = over_delivered(&env, &name, count).await;
        // Every attempt allowed: the delivery reaches the consumer, which acknowledges it.
        let options = ConsumerOptions::default().max_attempts(u32::MAX);
        let mut sub = queue.receive(options).await.unwrap();
        let delivery = next(&mut sub).await;
        assert_eq!(delivery.event().id(), sent.id());
        assert_eq!(delivery.attempt(), u32::MAX, "the attempt shown saturates");
        if let Err(e) = delivery.ack().await {
            panic!("RETRYCOUNT {count}: the ack was refused: {e}");
        }
        assert_eq!(
            env.xlen(&key).await,
            0,
            "RETRYCOUNT {count}: acked and deleted"
        );
        assert_eq!(env.pending(&key, "evbus").await, 0, "RETRYCOUNT {count}");
        drop(sub);
    }
    env.cleanup().await;
}

/// The same entry with the default `max_attempts`: core dead-letters it without handing it
/// out and acknowledges it. The ack must settle it: were it refused, every visibility timeout
/// would take the entry over and dead-letter another copy.
#[tokio::test]
async fn an_entry_delivered_past_u32_max_times_is_dead_lettered_once() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(100)).await else {
        return;
    };
    let (queue, key, sent) = over_delivered(&env, "q", 4_294_967_296).await;
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut sub = queue.receive(options).await.unwrap();
    // Core dead-letters it while the stream is read; nothing may reach the consumer.
    let reader = tokio::spawn(async move {
        let handed_out = sub.next().await;
        handed_out.map(|d| d.map(|d| d.event().id().to_owned()))
    });
    let dlq_key = env.transport.queue_key("q.dlq");
    let settled = eventually(WAIT, || async {
        env.xlen(&key).await == 0 && env.pending(&key, "evbus").await == 0
    })
    .await;
    assert!(
        settled,
        "the over-delivered entry is still there ({} pending) after {WAIT:?}, with {} \
         dead-letter records",
        env.pending(&key, "evbus").await,
        env.xlen(&dlq_key).await
    );
    // Gone from the queue: no further copy can be dead-lettered.
    assert_eq!(
        env.xlen(&dlq_key).await,
        1,
        "exactly one dead-letter record"
    );
    assert!(!reader.is_finished(), "{:?}", reader.await);
    reader.abort();

    let dlq = env.transport.queue("q.dlq").await.unwrap();
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    let record = next(&mut dead).await;
    let e = record.event();
    assert_eq!(e.id(), sent.id());
    let reason = e.extension(DEAD_LETTER_REASON).unwrap();
    assert!(reason.contains("max attempts exceeded"), "{reason}");
    let attempts = u32::MAX.to_string();
    assert_eq!(e.extension(DEAD_LETTER_ATTEMPTS), Some(attempts.as_str()));
    record.ack().await.unwrap();
    env.cleanup().await;
}

/// A stock consumer whose name merely ends like an evbus consumer's (`-v<ms>`, the visibility
/// timeout the takeover script honours) no longer keeps what it read: the script trusted
/// any such name, and `mallory-v99999999999999999999` held its entries for good (outside
/// review). Only evbus's own names (`<pid>-<uuid>-v<ms>`) carry a timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_stock_consumer_named_like_a_long_timeout_does_not_keep_its_entries() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(100)).await else {
        return;
    };
    let queue = env.transport.queue("jobs").await.unwrap();
    let key = env.transport.queue_key("jobs");
    // The queue's group, as its first consumer makes it; the stock client reads the one
    // entry before any evbus consumer exists.
    env.create_group(&key, "evbus", "0").await;
    let sent = event(7);
    queue.send(&sent).await.unwrap();
    let read: Value = env
        .cmd(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("evbus")
                .arg("mallory-v99999999999999999999")
                .arg("STREAMS")
                .arg(&key)
                .arg(">"),
        )
        .await;
    assert_ne!(read, Value::Nil, "the stock consumer read the entry");
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut sub = queue.receive(options).await.unwrap();
    // Taken over once the evbus consumer's own timeout has passed.
    let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
        .await
        .expect("the entry the stock consumer held was taken over within 15 s")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event().id(), sent.id());
    assert_eq!(delivery.attempt(), 2);
    delivery.ack().await.unwrap();
    env.cleanup().await;
}

/// Subscriptions outlive a Redis that lost their consumer groups (here `FLUSHALL`; a restart
/// without AOF, or a failover to a replica that lacked them, looks the same): each consumer
/// makes its group again and reads what is published from then on. They ended as on a
/// deletion, and everything published later stayed unread (outside review). A deletion
/// still ends them, even with the topic published to again at once.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_outlive_a_redis_that_lost_their_groups() {
    async fn next(sub: &mut evbus::Subscription) -> evbus::Delivery {
        tokio::time::timeout(Duration::from_secs(20), sub.next_delivery())
            .await
            .expect("a delivery within 20 s")
            .expect("the subscription goes on")
            .unwrap()
    }
    let Ok(server) = support::RedisServer::start() else {
        eprintln!("WARNING: no redis-server binary; test not run");
        return;
    };
    let Some(env) = Env::on(Some(&server), |_| {}).await else {
        return;
    };
    let topic = env.transport.topic("t").await.unwrap();
    let queue = env.transport.queue("q").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let mut consumer = queue.receive(ConsumerOptions::default()).await.unwrap();
    topic.publish(&event(1)).await.unwrap();
    queue.send(&event(2)).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    next(&mut consumer).await.ack().await.unwrap();

    let _: Value = env.cmd(&redis::cmd("FLUSHALL")).await;
    let (after_topic, after_queue) = (event(3), event(4));
    topic.publish(&after_topic).await.unwrap();
    queue.send(&after_queue).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.event().id(), after_topic.id());
    got.ack().await.unwrap();
    let got = next(&mut consumer).await;
    assert_eq!(got.event().id(), after_queue.id());
    got.ack().await.unwrap();

    env.transport.delete_topic("t").await.unwrap();
    topic.publish(&event(5)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), sub.next_delivery())
        .await
        .expect("the subscription of a deleted topic ended within 20 s");
    assert!(ended.is_none(), "a delivery after the deletion: {ended:?}");
    drop(consumer);
    env.cleanup().await;
}

/// A group lost with its stream kept (destroyed here; another process's sweep of anonymous
/// groups does the same) is made again after what the consumer read, not at the start of
/// the stream: the first re-creation delivered every acked event of the topic's history
/// again (outside review of the re-creation).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_made_again_delivers_no_history() {
    let Some(env) = Env::new().await else { return };
    let topic = env.transport.topic("t").await.unwrap();
    let key = env.transport.topic_key("t");
    for (options, group) in [
        (SubscribeOptions::named("billing"), Some("billing")),
        (SubscribeOptions::anonymous(), None),
    ] {
        let mut sub = topic.subscribe(options).await.unwrap();
        let history = [event(1), event(2), event(3)];
        for e in &history {
            topic.publish(e).await.unwrap();
        }
        for _ in &history {
            let d = tokio::time::timeout(WAIT, sub.next_delivery())
                .await
                .expect("a delivery")
                .unwrap()
                .unwrap();
            d.ack().await.unwrap();
        }
        let group = match group {
            Some(g) => g.to_owned(),
            None => env
                .groups(&key)
                .await
                .into_iter()
                .map(|g| g.0)
                .find(|g| g.starts_with("evbus.anonymous."))
                .expect("the anonymous group"),
        };
        let _: Value = env
            .cmd(redis::cmd("XGROUP").arg("DESTROY").arg(&key).arg(&group))
            .await;
        let after = event(4);
        topic.publish(&after).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next_delivery())
            .await
            .expect("a delivery after the group was lost")
            .unwrap()
            .unwrap();
        assert_eq!(
            d.event().id(),
            after.id(),
            "{group}: the first delivery after the loss was not the new event"
        );
        d.ack().await.unwrap();
    }
    env.cleanup().await;
}

/// A deleted topic's subscription ends even when another process made its group again
/// before this consumer read (no `NOGROUP` to see): it looks at the deletion mark every
/// `claim_interval` (outside review of the re-creation).
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_ends_when_its_topic_is_deleted_and_its_group_made_again_at_once() {
    let Some(env) = Env::with(|c| c.claim_interval = Duration::from_millis(200)).await else {
        return;
    };
    let topic = env.transport.topic("t").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    env.transport.delete_topic("t").await.unwrap();
    let again = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the subscription of the deleted topic ended within 10 s");
    assert!(ended.is_none(), "a delivery: {ended:?}");
    drop(again);
    env.cleanup().await;
}
