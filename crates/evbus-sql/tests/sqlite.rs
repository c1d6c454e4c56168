//! The SQLite transport beyond the conformance suite: the single-process rule with real
//! processes, a SIGKILLed holder losing no accepted event, wake-ups inside one process,
//! retention, claimed rows given back, and precise errors.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use evbus::{ErrorKind, Event, SubscribeOptions, Transport};
use evbus_sql::{SqlConfig, SqlTransport};
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

const WAIT: Duration = Duration::from_secs(30);
/// Set in the child process of `a_second_process_is_refused_...`: the database file.
const CHILD_FILE: &str = "EVBUS_SQL_TEST_CHILD_FILE";

fn url(path: &Path, params: &str) -> String {
    let sep = if params.is_empty() { "" } else { "?" };
    format!("sqlite://{}{sep}{params}", path.display())
}

async fn open(path: &Path, params: &str) -> SqlTransport {
    SqlTransport::connect(SqlConfig::from_url(&url(path, params)).unwrap())
        .await
        .unwrap()
}

fn event(n: usize) -> Event {
    Event::builder("orderPlaced", "/sqlite-test")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Rows of `table` in the file, read with a connection of its own.
async fn count(path: &Path, table: &str) -> i64 {
    let mut db = SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap();
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// In the child process (`CHILD_FILE` set): opens the file, makes the named subscription
/// `s` of topic `orders`, then publishes events for ever, printing `accepted <id>` after
/// each publish returned Ok. In the test process: two transports of one process share the
/// file (the single-process rule is per process, not per connection).
#[tokio::test(flavor = "multi_thread")]
async fn child_process_publishing_until_killed() {
    let Ok(file) = std::env::var(CHILD_FILE) else {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        let first = open(&path, "").await;
        let second = open(&path, "").await;
        assert!(first.health().await.is_healthy() && second.health().await.is_healthy());
        first.close().await.unwrap();
        second.close().await.unwrap();
        return;
    };
    let transport = open(Path::new(&file), "").await;
    let topic = transport.topic("orders").await.unwrap();
    drop(topic.subscribe(SubscribeOptions::named("s")).await.unwrap());
    println!("ready {}", std::process::id());
    for n in 0.. {
        let e = event(n);
        topic.publish(&e).await.unwrap();
        println!("accepted {}", e.id());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_is_refused_and_a_killed_holder_loses_no_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_publishing_until_killed",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_FILE, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut accepted = HashSet::new();
    let mut pid = None;
    while accepted.len() < 200 {
        let line = lines.recv_timeout(WAIT).expect("the child publishes");
        // libtest may print `test <name> ... ` on the same line first.
        if let Some((_, p)) = line.split_once("ready ") {
            pid = Some(p.trim().to_owned());
        }
        if let Some(id) = line.strip_prefix("accepted ") {
            accepted.insert(id.to_owned());
        }
        if accepted.len() == 100 {
            // While the child holds the file, this process is refused, naming the holder.
            let err = SqlTransport::connect(SqlConfig::from_url(&url(&path, "")).unwrap())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
            let pid = pid.as_deref().expect("the child said ready");
            assert!(
                err.to_string()
                    .contains(&format!("is already open in process {pid}")),
                "{err}"
            );
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever it printed after the last line read was accepted too.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
        if let Some(id) = line.strip_prefix("accepted ") {
            accepted.insert(id.to_owned());
        }
    }

    // The kernel released the dead holder's lock: this process opens the file.
    let transport = open(&path, "").await;
    let topic = transport.topic("orders").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let mut received = HashSet::new();
    while !accepted.is_subset(&received) {
        let delivery = tokio::time::timeout(WAIT, sub.next_delivery())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} accepted events missing after the kill",
                    accepted.difference(&received).count(),
                    accepted.len()
                )
            })
            .expect("open")
            .unwrap();
        received.insert(delivery.event().id().to_owned());
        delivery.ack().await.unwrap();
    }
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_one_transport_wakes_a_consumer_of_another_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    // Polling every 60 s: only the wake-up can deliver within the bound below.
    let consumer = open(&path, "poll_interval_ms=60000").await;
    let publisher = open(&path, "poll_interval_ms=60000").await;
    let queue = consumer.queue("jobs").await.unwrap();
    let mut sub = queue.receive(Default::default()).await.unwrap();
    // The consumer is idle (found nothing) before the send.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next_delivery())
            .await
            .is_err()
    );
    let sent = event(1);
    let started = std::time::Instant::now();
    publisher
        .queue("jobs")
        .await
        .unwrap()
        .send(&sent)
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
        .await
        .expect("woken well before the 60 s poll")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event().id(), sent.id());
    eprintln!("wake-up latency: {:?}", started.elapsed());
    delivery.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_end_when_another_transport_deletes_their_topic_or_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let consumer = open(&path, "").await;
    let deleter = open(&path, "").await;
    support::subscriptions_end_when_another_transport_deletes(&consumer, &deleter).await;
    deleter.close().await.unwrap();
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_of_a_deleted_queue_are_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let consumer = open(&path, "").await;
    let deleter = open(&path, "").await;
    support::claimed_rows_of_a_deleted_queue_are_not_handed_out(&consumer, &deleter).await;
    deleter.close().await.unwrap();
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpolled_anonymous_subscription_outlives_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "anonymous_ttl_ms=1000&cleanup_interval_ms=200").await;
    support::an_unpolled_anonymous_subscription_outlives_the_ttl(&transport).await;
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shorter_ttl_elsewhere_does_not_end_a_live_anonymous_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let subscriber = open(&path, "").await;
    let cleaner = open(&path, "anonymous_ttl_ms=200&cleanup_interval_ms=3600000").await;
    support::a_shorter_ttl_elsewhere_does_not_end_a_live_anonymous_subscription(
        &subscriber,
        &cleaner,
    )
    .await;
    cleaner.close().await.unwrap();
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_anonymous_subscribes_leave_no_partition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::cancelled_anonymous_subscribes_leave_no_partition(&transport, || {
        count(&path, support::ANONYMOUS_PARTS)
    })
    .await;
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_go_back_when_dropped_just_before_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    support::claimed_rows_go_back_at_close(|| open(&path, ""), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claimed_rows_go_back_when_still_held_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    support::claimed_rows_go_back_at_close(|| open(&path, ""), false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_hands_out_every_event_on_its_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::a_slow_reader_hands_out_every_event_on_its_first_attempt(&transport).await;
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_stay_with_a_reader_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::rows_claimed_ahead_stay_with_a_reader_in_use(&transport).await;
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_by_a_stream_not_polled_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::rows_claimed_ahead_by_a_stream_not_polled_time_out(&transport).await;
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_claimed_ahead_and_never_handed_out_go_back_at_once_uncounted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::unhanded_claims_go_back_at_once_uncounted(&transport).await;
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_rows_wait_apart_and_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::delayed_rows_wait_apart_and_come_back_in_order(&transport, || {
        count(&path, "evbus_deliveries WHERE delayed_until > 0")
    })
    .await;
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_holds_a_claim_and_one_past_its_timeout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    support::a_renewal_holds_a_claim_and_one_past_its_timeout_is_refused(&transport).await;
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn durations_past_what_sql_holds_are_capped_at_100_years() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(
        &path,
        "retention_ms=18446744073709551615&anonymous_ttl_ms=18446744073709551615",
    )
    .await;
    let due_in_years = || async {
        let mut db = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap();
        let due: i64 = sqlx::query_scalar("SELECT max(visible_at) FROM evbus_deliveries")
            .fetch_one(&mut db)
            .await
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as f64;
        (due as f64 - now) / 1000.0 / support::HUNDRED_YEARS_SECS * 100.0
    };
    support::durations_past_what_sql_holds_are_capped(&transport, due_in_years).await;
    assert_eq!(transport.cleanup().await.unwrap(), 0);
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_acknowledged_events_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "retention_ms=0&cleanup_interval_ms=3600000").await;
    let topic = transport.topic("orders").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    for n in 0..3 {
        topic.publish(&event(n)).await.unwrap();
    }
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, sub.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
    }
    assert_eq!(count(&path, "evbus_events").await, 3);
    // Past retention (0) and acknowledged by every subscription: deleted. The third is still
    // waiting for `s`: kept.
    tokio::time::sleep(Duration::from_millis(5)).await; // created_at strictly in the past
    assert_eq!(transport.cleanup().await.unwrap(), 2);
    assert_eq!(count(&path, "evbus_events").await, 1);
    assert_eq!(count(&path, "evbus_deliveries").await, 1);
    transport.close().await.unwrap();

    // With a retention, acknowledged events stay, and a new subscription from Earliest
    // replays them.
    let kept = tempfile::tempdir().unwrap();
    let path = kept.path().join("bus.db");
    let transport = open(&path, "retention_ms=3600000").await;
    let topic = transport.topic("orders").await.unwrap();
    let published: Vec<Event> = (0..3).map(event).collect();
    topic.publish_batch(&published).await.unwrap();
    assert_eq!(transport.cleanup().await.unwrap(), 0);
    let mut replay = topic
        .subscribe(SubscribeOptions::named("late").start(evbus::StartPosition::Earliest))
        .await
        .unwrap();
    for expected in &published {
        let d = tokio::time::timeout(WAIT, replay.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), expected.id());
        d.ack().await.unwrap();
    }
}

/// A connection of its own to the file, as another program (the `sqlite3` shell) has.
async fn foreign(path: &Path) -> sqlx::SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

/// Another program stores `body` as an event of queue `name` with its delivery, as
/// `sqlite3 bus.db "INSERT INTO evbus_events (kind, dest, body, created_at) VALUES ('queue',
/// 'q', readfile('e.json'), 0)"` and the delivery row would: `body` is bound as is, so bytes
/// are a BLOB (what `readfile()` returns) unless `as_text`, which stores them as TEXT even
/// when they are not UTF-8 (`CAST(x'...' AS TEXT)`).
async fn write_foreign_row(path: &Path, name: &str, body: &[u8], as_text: bool) {
    let mut db = foreign(path).await;
    let value = if as_text { "CAST(?2 AS TEXT)" } else { "?2" };
    sqlx::query(
        "INSERT INTO evbus_parts (kind, dest, name, seen_at) VALUES ('queue', ?1, '', 0) \
         ON CONFLICT (kind, dest, name) DO NOTHING",
    )
    .bind(name)
    .execute(&mut db)
    .await
    .unwrap();
    let event: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO evbus_events (kind, dest, body, created_at) \
         VALUES ('queue', ?1, {value}, 0) RETURNING id"
    ))
    .bind(name)
    .bind(body)
    .fetch_one(&mut db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
         SELECT id, ?2, 0, 0 FROM evbus_parts WHERE kind = 'queue' AND dest = ?1 AND name = ''",
    )
    .bind(name)
    .bind(event)
    .execute(&mut db)
    .await
    .unwrap();
}

/// Bodies another program stored as a BLOB, or as TEXT that is not UTF-8, are read per row:
/// one that is not a CloudEvent is dead-lettered as undecodable (its bytes kept), one that
/// is (a file of CloudEvents JSON read with `readfile()`) is delivered, and the event sent
/// behind them through evbus, claimed in the same statement, is delivered and acknowledged.
/// Read as text, one such row failed the whole claim, after it had committed: the rows
/// claimed with it came back together, failed together, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn foreign_blob_and_non_utf8_bodies_never_fail_the_rows_claimed_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "poll_interval_ms=100").await;
    let binary: &[u8] = b"\x89PNG\r\n\x1a\n\x00\xff not an event";
    let latin1: &[u8] = b"{\"specversion\": \"1.0\", \"id\": \"caf\xe9\"}";
    let from_file = event(1);
    write_foreign_row(&path, "inbox", binary, false).await;
    write_foreign_row(&path, "inbox", latin1, true).await;
    write_foreign_row(
        &path,
        "inbox",
        from_file.to_json().unwrap().as_bytes(),
        false,
    )
    .await;
    let typeof_bodies: Vec<String> =
        sqlx::query_scalar("SELECT typeof(body) FROM evbus_events ORDER BY id")
            .fetch_all(&mut foreign(&path).await)
            .await
            .unwrap();
    assert_eq!(typeof_bodies, ["blob", "text", "blob"]);
    let good = event(2);
    transport
        .queue("inbox")
        .await
        .unwrap()
        .send(&good)
        .await
        .unwrap();

    let records =
        support::consume_past_foreign_rows(&transport, "inbox", &[&from_file, &good], 2).await;
    support::assert_undecodable_record(&records[0], "inbox", binary);
    support::assert_undecodable_record(&records[1], "inbox", latin1);
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

/// A delivery at the largest attempt count (another program wrote it, or a row redelivered
/// that often) is still claimed, its count saturating: core dead-letters it as delivered too
/// often, and the events behind it flow. `attempt + 1` no longer fitted the `i32` read back,
/// so every claim of the queue failed, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_at_the_largest_attempt_count_is_dead_lettered_and_the_rest_flow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "poll_interval_ms=100").await;
    let queue = transport.queue("worn").await.unwrap();
    let worn = event(1);
    queue.send(&worn).await.unwrap();
    let updated = sqlx::query("UPDATE evbus_deliveries SET attempt = ?1")
        .bind(i32::MAX)
        .execute(&mut foreign(&path).await)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1);
    let behind: Vec<Event> = (2..4).map(event).collect();
    queue.send_batch(&behind).await.unwrap();

    let records =
        support::consume_past_foreign_rows(&transport, "worn", &[&behind[0], &behind[1]], 1).await;
    support::assert_over_delivered_record(&records[0], &worn, "worn");
    assert_eq!(count(&path, "evbus_deliveries").await, 0);
    transport.close().await.unwrap();
}

#[tokio::test]
async fn files_that_cannot_be_opened_are_precise_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let err = SqlTransport::connect_url(&url(dir.path(), ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("SQLite file"), "{err}");
    // A parent that is a file.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = SqlTransport::connect_url(&url(&file.join("bus.db"), ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    // Through the registry: the URL forms.
    let mut registry = evbus::Registry::new();
    registry.register(evbus_sql::SqlConnector);
    for (bad, want) in [
        ("sqlite://relative/bus.db", "three slashes"),
        ("sqlite::memory:", "use memory://"),
        ("sqlite:///tmp/x.db?timeout=5", "valid keys are"),
    ] {
        let err = registry.connect(bad).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad}: {err}");
        assert!(err.to_string().contains(want), "{bad}: {err}");
    }
    let _: PathBuf = file;
}

/// The database file holds every event's data: a file the transport creates is its owner's
/// alone (SQLite would make it readable by every user under the usual umask), and so are
/// the files SQLite keeps beside it.
#[cfg(unix)]
#[tokio::test]
async fn a_new_database_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "").await;
    let topic = transport.topic("orders").await.unwrap();
    topic.publish(&event(1)).await.unwrap();
    for file in ["bus.db", "bus.db-wal", "bus.db-shm"] {
        let file = dir.path().join(file);
        if !file.exists() {
            assert_ne!(file, path, "the database file exists");
            continue;
        }
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
    transport.close().await.unwrap();
}

/// See [`support::a_deleted_subscription_lets_retention_take_what_it_held`].
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_subscription_lets_retention_take_what_it_held_and_ends_its_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let transport = open(&path, "retention_ms=0&cleanup_interval_ms=3600000").await;
    let rows = |table| count(&path, table);
    support::a_deleted_subscription_lets_retention_take_what_it_held(&transport, rows).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_one_statement_is_published_whole_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let transport = open(&dir.path().join("bus.db"), "").await;
    support::a_batch_over_one_statement_is_published_whole_in_order(&transport).await;
    transport.close().await.unwrap();
}
