//! The PostgreSQL transport beyond the conformance suite, against the server at
//! `EVBUS_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`), each test in a
//! schema of its own: LISTEN/NOTIFY wake-ups, the polling fallback, competing consumers,
//! claimed rows given back, retention, concurrent migrations, precise errors. Without a
//! reachable server each test says so loudly and passes, unless CI=true or
//! EVBUS_REQUIRE_BROKERS=1 (then it fails).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use evbus::{ConsumerOptions, ErrorKind, Event, SubscribeOptions, Transport};
use evbus_sql::{SqlConfig, SqlTransport};
use sqlx::Connection;
use support::{drop_schema, postgres_url, unique_schema, with_params};

const WAIT: Duration = Duration::from_secs(30);

/// A fresh schema on the shared server, dropped on drop; `None` (after a loud warning) if
/// the server is unreachable and brokers are not required.
struct Schema {
    name: String,
}

impl Schema {
    async fn new() -> Option<Schema> {
        let base = postgres_url();
        match sqlx::PgConnection::connect(&base).await {
            Ok(conn) => {
                let _ = conn.close().await;
            }
            Err(e) => {
                assert!(
                    !evbus_conformance::require_brokers(),
                    "PostgreSQL at {} is unreachable: {e}",
                    evbus::registry::redact(&base)
                );
                eprintln!(
                    "WARNING: PostgreSQL at {} is unreachable ({e}); this test did NOT run. \
                     Set EVBUS_POSTGRES_URL, or EVBUS_REQUIRE_BROKERS=1 to make this a failure.",
                    evbus::registry::redact(&base)
                );
                return None;
            }
        }
        Some(Schema {
            name: unique_schema("evbus_test"),
        })
    }

    fn url(&self, params: &str) -> String {
        let url = with_params(&postgres_url(), &format!("schema={}", self.name));
        if params.is_empty() {
            url
        } else {
            with_params(&url, params)
        }
    }

    async fn open(&self, params: &str) -> SqlTransport {
        SqlTransport::connect(SqlConfig::from_url(&self.url(params)).unwrap())
            .await
            .unwrap()
    }

    async fn raw(&self) -> sqlx::PgConnection {
        let mut conn = sqlx::PgConnection::connect(&postgres_url()).await.unwrap();
        sqlx::query(&format!("SET search_path TO \"{}\"", self.name))
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    async fn count(&self, table: &str) -> i64 {
        let mut conn = self.raw().await;
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    async fn drop(self) {
        drop_schema(&postgres_url(), &self.name).await;
    }
}

fn event(n: usize) -> Event {
    Event::builder("orderPlaced", "/postgres-test")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_wakes_a_consumer_of_another_transport_long_before_its_poll() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    // Polling every 60 s: only NOTIFY (the publisher is another transport, with wake-ups of
    // its own) can deliver within the bound below.
    let consumer = schema.open("poll_interval_ms=60000").await;
    let publisher = schema.open("poll_interval_ms=60000").await;
    let topic = consumer.topic("orders").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    // Idle (LISTEN established meanwhile) before the publish.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next_delivery())
            .await
            .is_err()
    );
    let publishing = publisher.topic("orders").await.unwrap();
    let mut latencies = Vec::new();
    for n in 0..5 {
        let sent = event(n);
        let started = Instant::now();
        publishing.publish(&sent).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
            .await
            .expect("NOTIFY woke the consumer well before its 60 s poll")
            .unwrap()
            .unwrap();
        latencies.push(started.elapsed());
        assert_eq!(d.event().id(), sent.id());
        d.ack().await.unwrap();
    }
    eprintln!("publish-to-delivery latencies through NOTIFY: {latencies:?}");
    // A queue send wakes the other transport's queue consumer the same way.
    let mut receiver = consumer
        .queue("mail")
        .await
        .unwrap()
        .receive(ConsumerOptions::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), receiver.next_delivery())
            .await
            .is_err()
    );
    let sent = event(99);
    publisher
        .queue("mail")
        .await
        .unwrap()
        .send(&sent)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), receiver.next_delivery())
        .await
        .expect("NOTIFY woke the queue consumer well before its 60 s poll")
        .unwrap()
        .unwrap();
    assert_eq!(d.event().id(), sent.id());
    d.ack().await.unwrap();
    drop(receiver);
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_finds_rows_written_without_a_notification() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let consumer = schema.open("poll_interval_ms=200").await;
    let queue = consumer.queue("jobs").await.unwrap();
    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    // A row written by plain SQL: no NOTIFY, so only polling can find it.
    let sent = event(7);
    let mut raw = schema.raw().await;
    sqlx::query(
        "WITH ev AS (INSERT INTO evbus_events (kind, dest, body) VALUES ('queue', 'jobs', $1) \
           RETURNING id) \
         INSERT INTO evbus_deliveries (part, event) SELECT p.id, ev.id FROM evbus_parts p, ev \
         WHERE p.kind = 'queue' AND p.dest = 'jobs'",
    )
    .bind(sent.to_json().unwrap())
    .execute(&mut raw)
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the 200 ms poll finds the row")
        .unwrap()
        .unwrap();
    assert_eq!(d.event().id(), sent.id());
    d.ack().await.unwrap();
    consumer.close().await.unwrap();
    schema.drop().await;
}

/// Rows another program wrote whose bodies are not CloudEvents are dead-lettered as
/// undecodable (their text kept), and the event sent behind them through evbus, claimed in
/// the same statement, is delivered and acknowledged: the same as on SQLite
/// (`tests/sqlite.rs`, where bodies may also be BLOBs or not UTF-8).
#[tokio::test(flavor = "multi_thread")]
async fn foreign_rows_that_are_not_cloudevents_never_fail_the_rows_claimed_with_them() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("poll_interval_ms=100").await;
    let bodies = ["not a cloudevent", r#"{"specversion": "1.0", "id": "x"}"#];
    let mut raw = schema.raw().await;
    for body in bodies {
        // As another program writes a row: the partition if needed, the event, its delivery.
        sqlx::query(
            "WITH p AS (INSERT INTO evbus_parts (kind, dest, name) VALUES ('queue', 'inbox', '') \
               ON CONFLICT (kind, dest, name) DO UPDATE SET kind = EXCLUDED.kind RETURNING id), \
             ev AS (INSERT INTO evbus_events (kind, dest, body) VALUES ('queue', 'inbox', $1) \
               RETURNING id) \
             INSERT INTO evbus_deliveries (part, event) SELECT p.id, ev.id FROM p, ev",
        )
        .bind(body)
        .execute(&mut raw)
        .await
        .unwrap();
    }
    let good = event(1);
    transport
        .queue("inbox")
        .await
        .unwrap()
        .send(&good)
        .await
        .unwrap();

    let records = support::consume_past_foreign_rows(&transport, "inbox", &[&good], 2).await;
    for (record, body) in records.iter().zip(bodies) {
        support::assert_undecodable_record(record, "inbox", body.as_bytes());
    }
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

/// A delivery at the largest attempt count (another program wrote it, or a row redelivered
/// that often) is still claimed, its count saturating: core dead-letters it as delivered too
/// often, and the events behind it flow. `attempt + 1` overflowed the `integer` column, so
/// the claim statement failed, and with it every claim of the queue, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_at_the_largest_attempt_count_is_dead_lettered_and_the_rest_flow() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("poll_interval_ms=100").await;
    let queue = transport.queue("worn").await.unwrap();
    let worn = event(1);
    queue.send(&worn).await.unwrap();
    let updated = sqlx::query("UPDATE evbus_deliveries SET attempt = $1")
        .bind(i32::MAX)
        .execute(&mut schema.raw().await)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1);
    let behind: Vec<Event> = (2..4).map(event).collect();
    queue.send_batch(&behind).await.unwrap();

    let records =
        support::consume_past_foreign_rows(&transport, "worn", &[&behind[0], &behind[1]], 1).await;
    support::assert_over_delivered_record(&records[0], &worn, "worn");
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn competing_consumers_of_two_transports_never_get_the_same_row() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    const EVENTS: usize = 300;
    let a = schema.open("").await;
    let b = schema.open("").await;
    let publisher = schema.open("").await;
    let queue = publisher.queue("work").await.unwrap();
    let events: Vec<Event> = (0..EVENTS).map(event).collect();
    for chunk in events.chunks(50) {
        queue.send_batch(chunk).await.unwrap();
    }
    // A long visibility timeout: a row delivered twice could only be a double claim.
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(300))
        .max_in_flight(16);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for transport in [&a, &b] {
        let mut sub = transport
            .queue("work")
            .await
            .unwrap()
            .receive(options.clone())
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = sub.next_delivery().await {
                let _ = tx.send((d.event().id().to_owned(), d.attempt()));
                d.ack().await.unwrap();
            }
        });
    }
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < EVENTS {
        let (id, attempt) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("every event within the bound")
            .unwrap();
        assert_eq!(attempt, 1, "event {id} was claimed again");
        assert!(seen.insert(id.clone()), "event {id} was delivered twice");
    }
    // Nothing more comes.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .is_err()
    );
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    for t in [a, b, publisher] {
        t.close().await.unwrap();
    }
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_hands_out_every_event_on_its_first_attempt() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::a_slow_reader_hands_out_every_event_on_its_first_attempt(&transport).await;
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_holds_a_claim_and_one_past_its_timeout_is_refused() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::a_renewal_holds_a_claim_and_one_past_its_timeout_is_refused(&transport).await;
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

/// The cleanup of anonymous subscriptions does not trust the server's clock. A step of it
/// forward (simulated: every anonymous subscription's mark moved a day back, as `now()`
/// jumping a day ahead would look) made the next cleanup delete every live anonymous
/// subscription, ending its stream. Now a live one (TTL 2 s, marked every 667 ms) survives
/// cleanups for 5 s after the step and still gets what is published; the partition of a
/// process that is gone (a row marked an hour ago, TTL 200 ms) is deleted once the cleaner
/// has found its mark unchanged for 200 ms.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_of_the_server_clock_does_not_end_live_anonymous_subscriptions() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let subscriber = schema
        .open("anonymous_ttl_ms=2000&cleanup_interval_ms=3600000")
        .await;
    let cleaner = schema
        .open("anonymous_ttl_ms=2000&cleanup_interval_ms=3600000")
        .await;
    let topic = subscriber.topic("stepped").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let mut raw = schema.raw().await;
    let gone = "_anonymous.00000000000000000000000000000000";
    sqlx::query(
        "INSERT INTO evbus_parts (kind, dest, name, seen_at, ttl_ms) \
         VALUES ('topic', 'stepped', $1, now() - interval '1 hour', 200)",
    )
    .bind(gone)
    .execute(&mut raw)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE evbus_parts SET seen_at = seen_at - interval '1 day' \
         WHERE name LIKE '\\_anonymous.%'",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let parts = |name_is_gone: bool| {
        let schema = &schema;
        async move {
            let op = if name_is_gone { "=" } else { "<>" };
            schema
                .count(&format!(
                    "evbus_parts WHERE dest = 'stepped' AND name {op} '{gone}'"
                ))
                .await
        }
    };
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(5) {
        cleaner.cleanup().await.unwrap();
        assert_eq!(
            parts(false).await,
            1,
            "the cleanup deleted a live anonymous subscription {:?} after the step",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        parts(true).await,
        0,
        "the abandoned partition is still there"
    );
    support::still_delivers(&*topic, &mut sub).await;
    drop(raw);
    subscriber.close().await.unwrap();
    cleaner.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_rows_wait_apart_and_come_back_in_order() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::delayed_rows_wait_apart_and_come_back_in_order(&transport, || {
        schema.count("evbus_deliveries WHERE delayed_until > '-infinity'")
    })
    .await;
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_stay_with_a_reader_in_use() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::rows_claimed_ahead_stay_with_a_reader_in_use(&transport).await;
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_by_a_stream_not_polled_time_out() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::rows_claimed_ahead_by_a_stream_not_polled_time_out(&transport).await;
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_and_never_handed_out_go_back_at_once_uncounted() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::unhanded_claims_go_back_at_once_uncounted(&transport).await;
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_end_when_another_transport_deletes_their_topic_or_queue() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let consumer = schema.open("").await;
    let deleter = schema.open("").await;
    support::subscriptions_end_when_another_transport_deletes(&consumer, &deleter).await;
    deleter.close().await.unwrap();
    consumer.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_of_a_deleted_queue_are_not_handed_out() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let consumer = schema.open("").await;
    let deleter = schema.open("").await;
    support::claimed_rows_of_a_deleted_queue_are_not_handed_out(&consumer, &deleter).await;
    deleter.close().await.unwrap();
    consumer.close().await.unwrap();
    schema.drop().await;
}

/// Deleting a queue while a dropped consumer gives its claimed rows back: both touch the same
/// rows, and took their locks in different orders (the give-back in its join's order, the
/// deletion's cascade in its scan's), so PostgreSQL now and then aborted the deletion with
/// "deadlock detected" (seen in the conformance suite's deletion case). Each round claims
/// 300 rows (handed out and nacked in reverse order first, so that the table's physical
/// order differs from the ids'), drops the consumer and deletes the queue at once; every deletion
/// must succeed and leave no row.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_queue_while_its_claims_go_back_does_not_deadlock() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    const ROWS: usize = 300;
    for round in 0..25 {
        let name = format!("race{round}");
        let queue = transport.queue(&name).await.unwrap();
        let events: Vec<Event> = (0..ROWS).map(event).collect();
        queue.send_batch(&events).await.unwrap();
        let options = ConsumerOptions::default()
            .visibility_timeout(Duration::from_secs(60))
            .max_in_flight(ROWS);
        // Every row handed out and nacked in reverse order: the table's physical order is
        // then the reverse of the ids'.
        let mut shuffle = queue.receive(options.clone()).await.unwrap();
        let mut held = Vec::with_capacity(ROWS);
        for _ in 0..ROWS {
            let d = tokio::time::timeout(WAIT, shuffle.next_delivery())
                .await
                .expect("a delivery")
                .unwrap()
                .unwrap();
            held.push(d);
        }
        for d in held.into_iter().rev() {
            d.nack(None).await.unwrap();
        }
        drop(shuffle);
        let mut consumer = queue.receive(options).await.unwrap();
        let first = tokio::time::timeout(WAIT, consumer.next_delivery())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        drop(consumer);
        transport
            .delete_queue(&name)
            .await
            .unwrap_or_else(|e| panic!("round {round}: deleting the queue: {e}"));
        drop(first);
    }
    transport.close().await.unwrap();
    assert_eq!(schema.count("evbus_deliveries").await, 0);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpolled_anonymous_subscription_outlives_the_ttl() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema
        .open("anonymous_ttl_ms=1000&cleanup_interval_ms=200")
        .await;
    support::an_unpolled_anonymous_subscription_outlives_the_ttl(&transport).await;
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shorter_ttl_elsewhere_does_not_end_a_live_anonymous_subscription() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let subscriber = schema.open("").await;
    let cleaner = schema
        .open("anonymous_ttl_ms=200&cleanup_interval_ms=3600000")
        .await;
    support::a_shorter_ttl_elsewhere_does_not_end_a_live_anonymous_subscription(
        &subscriber,
        &cleaner,
    )
    .await;
    cleaner.close().await.unwrap();
    subscriber.close().await.unwrap();
    schema.drop().await;
}

/// A named subscription starting at `Earliest` copies the topic's retained events; one
/// deleted meanwhile (here by `delete_topic` on another transport) is skipped. The copy
/// used to fail the subscribe with a foreign-key violation (`evbus_deliveries_event_fkey`),
/// a `Broker` error, in about two rounds of three.
#[tokio::test(flavor = "multi_thread")]
async fn an_earliest_subscribe_racing_a_topic_deletion_succeeds() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let subscriber = schema.open("").await;
    let deleter = schema.open("").await;
    let topic = subscriber.topic("replayed").await.unwrap();
    for round in 0..30 {
        let batch: Vec<Event> = (0..200).map(|n| event(round * 200 + n)).collect();
        topic.publish_batch(&batch).await.unwrap();
        let subscribing = {
            let topic = std::sync::Arc::clone(&topic);
            tokio::spawn(async move {
                topic
                    .subscribe(
                        SubscribeOptions::named(format!("s{round}"))
                            .start(evbus::StartPosition::Earliest),
                    )
                    .await
                    .map(drop)
            })
        };
        let deleting = {
            let deleter = deleter.clone();
            tokio::spawn(async move {
                if round % 2 == 0 {
                    tokio::task::yield_now().await;
                }
                deleter.delete_topic("replayed").await
            })
        };
        if let Err(e) = subscribing.await.unwrap() {
            panic!("round {round}: subscribing: {e}");
        }
        deleting.await.unwrap().unwrap();
    }
    deleter.close().await.unwrap();
    subscriber.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_anonymous_subscribes_leave_no_partition() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::cancelled_anonymous_subscribes_leave_no_partition(&transport, || {
        schema.count(support::ANONYMOUS_PARTS)
    })
    .await;
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_go_back_when_dropped_just_before_close() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    support::claimed_rows_go_back_at_close(|| schema.open(""), true).await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_go_back_when_still_held_at_close() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    support::claimed_rows_go_back_at_close(|| schema.open(""), false).await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn durations_past_what_sql_holds_are_capped_at_100_years() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    // Retention and the anonymous TTL go into SQL intervals too (the cleanup).
    let transport = schema
        .open("retention_ms=18446744073709551615&anonymous_ttl_ms=18446744073709551615")
        .await;
    let due_in_years = || async {
        let mut conn = schema.raw().await;
        let due: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM max(visible_at) - now())::float8 FROM evbus_deliveries",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        due / support::HUNDRED_YEARS_SECS * 100.0
    };
    support::durations_past_what_sql_holds_are_capped(&transport, due_in_years).await;
    assert_eq!(
        transport
            .cleanup()
            .await
            .expect("cleanup with retention u64::MAX ms"),
        0
    );
    transport.close().await.unwrap();
    schema.drop().await;
}

/// The schema is created quoted but named unquoted in `search_path`, where PostgreSQL folds
/// it to lower case: `schema=Bus1` created `Bus1` and then looked for `bus1`. Upper case is
/// refused with what to write.
#[tokio::test]
async fn an_upper_case_schema_is_refused_with_the_name_to_write() {
    let url = with_params(&postgres_url(), "schema=Bus1");
    let err = SqlTransport::connect_url(&url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.message().contains("write `bus1`"), "{err}");
}

/// A subscription starting at the earliest event, created while publishers run, gets every
/// event exactly once: each is either in the copy of the retained events or delivered to
/// the new partition (the publish function's lock, taken before its insert reads the
/// partitions, keeps any from falling between).
#[tokio::test(flavor = "multi_thread")]
async fn an_earliest_subscription_made_during_publishing_misses_nothing() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    const PUBLISHERS: usize = 4;
    const EACH: usize = 150;
    let transport = schema.open("").await;
    let topic = transport.topic("busy").await.unwrap();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let transport = transport.clone();
            tokio::spawn(async move {
                let topic = transport.topic("busy").await.unwrap();
                let mut ids = Vec::with_capacity(EACH);
                for n in 0..EACH {
                    let e = event(p * EACH + n);
                    topic.publish(&e).await.unwrap();
                    ids.push(e.id().to_owned());
                }
                ids
            })
        })
        .collect();
    // Subscribe while the publishers are midway.
    let deadline = Instant::now() + WAIT;
    while schema.count("evbus_events").await < (PUBLISHERS * EACH / 3) as i64 {
        assert!(Instant::now() < deadline, "the publishers made no progress");
        tokio::task::yield_now().await;
    }
    let mut sub = topic
        .subscribe(SubscribeOptions::named("late").start(evbus::StartPosition::Earliest))
        .await
        .unwrap();
    let mut published = HashSet::new();
    for p in publishers {
        published.extend(p.await.unwrap());
    }
    let mut seen = HashSet::new();
    while seen.len() < published.len() {
        let d = tokio::time::timeout(WAIT, sub.next_delivery())
            .await
            .unwrap_or_else(|_| panic!("{} of {} events arrived", seen.len(), published.len()))
            .unwrap()
            .unwrap();
        assert!(published.contains(d.event().id()));
        assert!(seen.insert(d.event().id().to_owned()), "delivered twice");
        d.ack().await.unwrap();
    }
    drop(sub);
    transport.close().await.unwrap();
    schema.drop().await;
}

/// See [`support::a_deleted_subscription_lets_retention_take_what_it_held`].
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_subscription_lets_retention_take_what_it_held_and_ends_its_consumers() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema
        .open("retention_ms=0&cleanup_interval_ms=3600000")
        .await;
    let rows = |table| schema.count(table);
    support::a_deleted_subscription_lets_retention_take_what_it_held(&transport, rows).await;
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_acknowledged_events_only() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema
        .open("retention_ms=0&cleanup_interval_ms=3600000")
        .await;
    let topic = transport.topic("orders").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let published: Vec<Event> = (0..4).map(event).collect();
    topic.publish_batch(&published).await.unwrap();
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, sub.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
    }
    assert_eq!(schema.count("evbus_events").await, 4);
    assert_eq!(transport.cleanup().await.unwrap(), 3);
    assert_eq!(schema.count("evbus_events").await, 1);
    // The one left is the unacknowledged one, still delivered.
    drop(sub);
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let d = tokio::time::timeout(WAIT, sub.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.event().id(), published[3].id());
    d.ack().await.unwrap();
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_processes_connecting_at_once_migrate_once() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let url = schema.url("max_connections=2");
    let connects = (0..8).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { SqlTransport::connect(SqlConfig::from_url(&url)?).await })
    });
    let transports: Vec<SqlTransport> = futures::future::join_all(connects)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    // Each migration applied once, not once per process.
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count() as i64;
    assert_eq!(schema.count("_sqlx_migrations").await, migrations);
    for t in transports {
        t.close().await.unwrap();
    }
    schema.drop().await;
}

/// A role that owns a schema made for it, and may not create schemas in the database (the
/// least privilege a DBA gives an application), connects and works; the same role naming a
/// schema that does not exist is told what it lacks.
#[tokio::test]
async fn a_role_without_create_on_the_database_uses_a_schema_it_was_given() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let role = unique_schema("evbus_role");
    let mut admin = sqlx::PgConnection::connect(&postgres_url()).await.unwrap();
    for statement in [
        format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'evbus-test'"),
        format!("CREATE SCHEMA \"{}\" AUTHORIZATION \"{role}\"", schema.name),
    ] {
        sqlx::query(&statement).execute(&mut admin).await.unwrap();
    }
    let may_create: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CREATE')")
            .bind(&role)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(
        !may_create,
        "this server grants CREATE on the database to every role"
    );
    let mut url = url::Url::parse(&schema.url("")).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("evbus-test")).unwrap();
    let transport = SqlTransport::connect_url(url.as_str()).await.unwrap();
    let queue = transport.queue("least-privilege").await.unwrap();
    queue
        .send(&Event::builder("t", "/test").build().unwrap())
        .await
        .unwrap();
    transport.close().await.unwrap();
    // A schema nobody made for it: the error says what to do.
    let missing = unique_schema("evbus_missing");
    url.query_pairs_mut()
        .clear()
        .append_pair("schema", &missing);
    let err = SqlTransport::connect_url(url.as_str()).await.unwrap_err();
    assert!(err.to_string().contains("CREATE on the database"), "{err}");
    schema.drop().await;
    sqlx::query(&format!("DROP ROLE \"{role}\""))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Tables migrated by a newer evbus (a migration this build does not know) are accepted, so a
/// process of the previous version keeps working during a rolling upgrade.
#[tokio::test]
async fn tables_a_newer_version_migrated_are_accepted() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    schema.open("").await.close().await.unwrap();
    let mut conn = schema.raw().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000001, 'from a newer evbus', true, '\\x00', 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let transport = schema.open("").await;
    let queue = transport.queue("after-upgrade").await.unwrap();
    queue
        .send(&Event::builder("t", "/test").build().unwrap())
        .await
        .unwrap();
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test]
async fn wrong_database_user_or_address_are_precise_errors() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let base = url::Url::parse(&postgres_url()).unwrap();
    let mut no_db = base.clone();
    no_db.set_path("/evbus_no_such_database");
    let err = SqlTransport::connect_url(no_db.as_str()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("evbus_no_such_database"), "{err}");
    let mut no_user = base.clone();
    no_user.set_username("evbus_no_such_role").unwrap();
    let err = SqlTransport::connect_url(no_user.as_str())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("evbus_no_such_role"), "{err}");
    // Nobody listens: unreachable, retryable.
    let port = evbus_conformance::process::free_port().unwrap();
    let nowhere = format!("postgres://postgres@127.0.0.1:{port}/test?connect_timeout_ms=2000");
    let err = SqlTransport::connect_url(&nowhere).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    schema.drop().await;
}

/// A subscription deleted while a publish to its topic runs (an anonymous one released or
/// expired, by another transport): the publish read the topic's partitions before the
/// deletion committed, and its insert then broke `evbus_deliveries_part_fkey`, failing the
/// publish for every other subscriber (seen in CI as a flaky conformance case). Here the
/// deletion is held open until the publish waits on it, then committed: the publish succeeds
/// and the other subscription gets the event.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_deleted_during_a_publish_does_not_fail_it() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    let topic = transport.topic("t").await.unwrap();
    let mut kept = topic
        .subscribe(SubscribeOptions::named("kept"))
        .await
        .unwrap();
    let gone = topic
        .subscribe(SubscribeOptions::named("gone"))
        .await
        .unwrap();
    drop(gone);

    let mut deleter = schema.raw().await;
    sqlx::query("BEGIN").execute(&mut deleter).await.unwrap();
    let deleted = sqlx::query("DELETE FROM evbus_parts WHERE kind = 'topic' AND name = 'gone'")
        .execute(&mut deleter)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1, "the subscription's partition");

    let publishing = {
        let topic = topic.clone();
        tokio::spawn(async move { topic.publish(&event(1)).await })
    };
    // Until the publish waits on the deleting transaction's row lock.
    let mut watcher = schema.raw().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%evbus_publish_topic%'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !publishing.is_finished(),
            "the publish ended before the deletion committed: {:?}",
            publishing.await
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the publish never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("COMMIT").execute(&mut deleter).await.unwrap();

    publishing
        .await
        .unwrap()
        .expect("a publish is not failed by a subscription deleted meanwhile");
    let d = tokio::time::timeout(Duration::from_secs(20), kept.next_delivery())
        .await
        .expect("the kept subscription gets the event")
        .unwrap()
        .unwrap();
    d.ack().await.unwrap();
    drop(kept);
    transport.close().await.unwrap();
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_one_statement_is_published_whole_in_order() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let transport = schema.open("").await;
    support::a_batch_over_one_statement_is_published_whole_in_order(&transport).await;
    transport.close().await.unwrap();
    schema.drop().await;
}
