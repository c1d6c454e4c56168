//! The transactional outbox on real PostgreSQL, relayed to real Redis.
//!
//! PostgreSQL at `EVBUS_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! Redis at `EVBUS_REDIS_URL` (default `redis://127.0.0.1:6379`). Every test uses its own
//! outbox table and Redis key prefix and removes them at the end. When a broker does not
//! answer, the test prints a loud warning and returns, unless `CI` or
//! `EVBUS_REQUIRE_BROKERS` is set: then it fails.

mod outbox_support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evbus::bus::Emit;
use evbus::memory::MemoryBroker;
use evbus::{ErrorKind, StartPosition, SubscribeOptions, Transport};
use evbus_sql::outbox::{Outbox, Relay, RelayBuilder};
use outbox_support::*;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Stages `n` committed events, `per_tx` per transaction, for `keys` keys whose `seq`
/// continues from `next` (one counter per key). Returns their ids.
async fn stage_committed(
    pool: &PgPool,
    outbox: &Outbox,
    next: &mut [u64],
    n: usize,
    per_tx: usize,
) -> HashSet<String> {
    let mut ids = HashSet::new();
    let keys = next.len();
    let mut staged = 0;
    let mut k = 0;
    while staged < n {
        let mut tx = pool.begin().await.unwrap();
        for _ in 0..per_tx.min(n - staged) {
            let key = format!("k{k}");
            let seq = next[k];
            next[k] += 1;
            let emit = Emit::new(TYPE, json!({"orderId": key, "seq": seq})).key(&key);
            ids.insert(outbox.stage(&mut tx, emit).await.unwrap());
            staged += 1;
            k = (k + 1) % keys;
        }
        tx.commit().await.unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_of_1000_transactions_only_the_500_committed_reach_redis() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {table}_orders (id TEXT PRIMARY KEY)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let transport: Arc<dyn Transport> = Arc::new(redis.clone());
    let mut sub = subscribe(&*transport, TYPE).await;
    let relay = Relay::postgres(pool.clone(), transport.clone())
        .table(&table)
        .spawn()
        .unwrap();

    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for i in 0..1000 {
        let order = format!("o-{i}");
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(&format!("INSERT INTO {table}_orders (id) VALUES ($1)"))
            .bind(&order)
            .execute(&mut *tx)
            .await
            .unwrap();
        let emit = Emit::new(TYPE, json!({"orderId": order, "seq": 0})).key(&order);
        let id = outbox.stage(&mut tx, emit).await.unwrap();
        if i % 2 == 0 {
            tx.commit().await.unwrap();
            committed.insert(id);
        } else {
            tx.rollback().await.unwrap();
            rolled_back.insert(id);
        }
    }
    assert_eq!(committed.len(), 500);

    let mut seen = Seen::default();
    seen.until_all(&mut sub, &committed).await;
    // Every row is deleted only after Redis accepted its event: once the table is empty,
    // the stream holds everything the relay will ever publish.
    wait_drained(&pool, &table).await;
    let published = stream_len(&redis_url(), &redis, TYPE).await;
    println!(
        "(a) 1000 transactions, 500 committed: {published} events in the Redis stream, \
         {} distinct ids received, {} of the rolled-back ids received",
        seen.ids.len(),
        seen.ids.intersection(&rolled_back).count()
    );
    assert_eq!(published, 500, "exactly the committed events are published");
    assert_eq!(seen.ids, committed);
    assert!(seen.ids.is_disjoint(&rolled_back));
    // The events are the staged ones, unchanged: type, source, key, data, schema.
    let e = &seen.events[0];
    assert_eq!(e.ty(), TYPE);
    assert_eq!(e.source(), "/test/outbox");
    assert_eq!(e.dataschema(), Some("urn:evbus:schema:orderPlaced:1"));
    let data: serde_json::Value = e.json().unwrap();
    assert_eq!(e.partition_key(), data["orderId"].as_str());
    let orders: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}_orders"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orders, 500);
    assert_eq!(relay.stats().relayed, 500);

    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

/// Batch size of the relay child: a killed relay re-publishes at most one batch.
const CHILD_BATCH: usize = 50;
const CHILD_ENV: &str = "EVBUS_OUTBOX_RELAY_CHILD";

/// Not a test of its own: the relay process of
/// `b_a_relay_process_killed_mid_stream_loses_nothing`, which runs this test binary with
/// `EVBUS_OUTBOX_RELAY_CHILD=1`. Without the variable it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_child_process() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let table = std::env::var("EVBUS_OUTBOX_TABLE").unwrap();
    let prefix = std::env::var("EVBUS_OUTBOX_PREFIX").unwrap();
    let pool = pg_pool().await.expect("PostgreSQL");
    let transport = redis_with_prefix(&redis_url(), &prefix).await;
    let relay = Relay::postgres(pool, Arc::new(transport))
        .table(&table)
        .batch_size(CHILD_BATCH)
        .lease_ttl(Duration::from_secs(2))
        .spawn()
        .unwrap();
    eprintln!("relay child {} started", relay.id());
    // Killed long before; the bound only keeps an orphan from running forever.
    tokio::time::sleep(Duration::from_secs(120)).await;
    relay.shutdown().await.unwrap();
}

fn spawn_child(table: &str, prefix: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "relay_child_process", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env("EVBUS_OUTBOX_TABLE", table)
        .env("EVBUS_OUTBOX_PREFIX", prefix)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_relay_process_killed_mid_stream_loses_nothing() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let prefix = redis.config().key_prefix.clone();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut sub = subscribe(&redis, TYPE).await;
    let mut seen = Seen::default();
    let mut next = vec![0u64; 40];

    let mut committed = stage_committed(&pool, &outbox, &mut next, 5000, 10).await;
    let kills = 3;
    for round in 0..kills {
        let before = pending(&pool, &table).await;
        let mut child = spawn_child(&table, &prefix);
        // Mid-stream: once the child relayed a few hundred of the rows, not all.
        let deadline = tokio::time::Instant::now() + WAIT;
        while pending(&pool, &table).await > before - 300 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the child relays nothing"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let left = pending(&pool, &table).await;
        println!(
            "(b) round {round}: relay process SIGKILLed with {left} of {before} rows not yet relayed"
        );
        assert!(left > 0, "the relay was to be killed mid-stream");
        committed.extend(stage_committed(&pool, &outbox, &mut next, 2000, 10).await);
    }
    let mut child = spawn_child(&table, &prefix);
    seen.until_all(&mut sub, &committed).await;
    wait_drained(&pool, &table).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let published = stream_len(&redis_url(), &redis, TYPE).await;
    seen.until_count(&mut sub, published).await;
    let duplicates = seen.duplicates();
    println!(
        "(b) {} committed events, {kills} SIGKILLs: all delivered; {published} publishes, \
         {duplicates} duplicates (bound: {} = kills x batch size)",
        committed.len(),
        kills * CHILD_BATCH
    );
    assert_eq!(seen.ids, committed);
    assert!(
        duplicates <= kills * CHILD_BATCH,
        "{duplicates} duplicates: more than one batch per kill"
    );
    let keys = seen.assert_ordered_per_key();
    assert_eq!(keys, 40);

    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_two_relays_deliver_everything_in_order_per_key() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(redis.clone());
    let mut sub = subscribe(&*transport, TYPE).await;
    let relay = |id: &str| {
        Relay::postgres(pool.clone(), transport.clone())
            .table(&table)
            .id(id)
            .batch_size(64)
            .lease_ttl(Duration::from_secs(6))
            .spawn()
            .unwrap()
    };
    let one = relay("relay-one");
    let two = relay("relay-two");

    // Stage until both relays have relayed events (the second one gets its buckets when
    // the first gives back its surplus, within a third of the lease TTL), and at least
    // 3000 events.
    let mut next = vec![0u64; 20];
    let mut committed = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while committed.len() < 3000 || one.stats().relayed == 0 || two.stats().relayed == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both relays should relay: {:?} {:?}",
            one.stats(),
            two.stats()
        );
        committed.extend(stage_committed(&pool, &outbox, &mut next, 100, 5).await);
    }

    let mut seen = Seen::default();
    seen.until_all(&mut sub, &committed).await;
    wait_drained(&pool, &table).await;
    let published = stream_len(&redis_url(), &redis, TYPE).await;
    seen.until_count(&mut sub, published).await;
    let (s1, s2) = (one.stats(), two.stats());
    println!(
        "(c) two relays: {} committed events delivered, relay-one {} + relay-two {} relayed, \
         buckets held {} + {}, {} duplicates",
        committed.len(),
        s1.relayed,
        s2.relayed,
        s1.buckets_held,
        s2.buckets_held,
        seen.duplicates()
    );
    assert_eq!(seen.ids, committed);
    assert_eq!(seen.assert_ordered_per_key(), 20);
    assert!(s1.relayed > 0 && s2.relayed > 0);
    // Buckets change hands only between rounds, after the rows were deleted: no relay
    // publishes a row another already did.
    assert_eq!(seen.duplicates(), 0);
    assert_eq!(s1.buckets_held + s2.buckets_held, 64);

    // One stops cleanly: the other takes its buckets at once and keeps relaying.
    one.shutdown().await.unwrap();
    let more = stage_committed(&pool, &outbox, &mut next, 200, 5).await;
    seen.until_all(&mut sub, &more).await;
    assert_eq!(seen.assert_ordered_per_key(), 20);
    println!("(c) after relay-one stopped: {:?}", two.stats());

    two.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

/// Two relays given the same id (a copied configuration): leases belong to an id, so both
/// published every bucket's rows, a good share of them twice. The second now holds nothing
/// while the first lives, and takes over once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_with_one_id_do_not_publish_a_row_twice() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(redis.clone());
    let mut sub = subscribe(&*transport, TYPE).await;
    let relay = || {
        Relay::postgres(pool.clone(), transport.clone())
            .table(&table)
            .id("twin")
            .batch_size(16)
            .lease_ttl(Duration::from_secs(3))
            .spawn()
            .unwrap()
    };
    // A backlog first, so that both relays start on it together.
    let mut next = vec![0u64; 20];
    let mut committed = HashSet::new();
    for _ in 0..20 {
        committed.extend(stage_committed(&pool, &outbox, &mut next, 100, 5).await);
    }
    let one = relay();
    let two = relay();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &committed).await;
    wait_drained(&pool, &table).await;
    let published = stream_len(&redis_url(), &redis, TYPE).await;
    seen.until_count(&mut sub, published).await;
    let (s1, s2) = (one.stats(), two.stats());
    assert_eq!(seen.ids, committed);
    assert_eq!(
        seen.duplicates(),
        0,
        "relayed {} + {}",
        s1.relayed,
        s2.relayed
    );
    assert_eq!(s1.relayed + s2.relayed, committed.len() as u64);
    assert!(
        (s1.relayed == 0) != (s2.relayed == 0),
        "one relay only: {} + {}",
        s1.relayed,
        s2.relayed
    );
    // Over two renewals (a third of the lease TTL each) the 64 buckets are held once: by one
    // of the two, never by both.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let held = one.stats().buckets_held + two.stats().buckets_held;
        assert!(held <= 64, "{held} buckets held by one id");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(one.stats().buckets_held + two.stats().buckets_held, 64);

    // The one that relayed stops: the other holds the id within a renewal and goes on.
    let (gone, left) = if s1.relayed > 0 {
        (one, two)
    } else {
        (two, one)
    };
    gone.shutdown().await.unwrap();
    let more = stage_committed(&pool, &outbox, &mut next, 100, 5).await;
    seen.until_all(&mut sub, &more).await;
    assert!(left.stats().relayed > 0);
    assert_eq!(seen.duplicates(), 0);
    left.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

#[tokio::test]
async fn an_invalid_event_is_refused_at_stage_with_the_catalogue_error() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let bus = bus();
    let outbox = Outbox::with_table(&bus, &table).unwrap();
    outbox.migrate(&pool).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let invalid = Emit::new(TYPE, json!({"orderId": 7}));
    let err = outbox.stage(&mut tx, invalid.clone()).await.unwrap_err();
    let expected = bus.prepare_event(invalid).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert_eq!(err.message(), expected.message());
    assert!(err.message().contains("/orderId"), "{err}");

    let unknown = outbox
        .stage(&mut tx, Emit::new("orderShipped", json!({})))
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::Validation);
    assert!(unknown.message().contains(TYPE), "{unknown}");

    // A batch with one invalid event stages nothing, naming it by index.
    let batch = outbox
        .stage_batch(
            &mut tx,
            [
                Emit::new(TYPE, json!({"orderId": "o-1", "seq": 0})),
                Emit::new(TYPE, json!({"orderId": "o-2", "seq": -1})),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(batch.kind(), ErrorKind::Validation);
    assert!(batch.message().contains("event 1 (orderPlaced)"), "{batch}");

    // The transaction is still usable and nothing was written.
    let ok = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "o-3", "seq": 0})),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ids: Vec<String> = sqlx::query_scalar(&format!("SELECT event_id FROM {table}"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![ok]);

    // A bad table name is refused before any SQL is built from it.
    let bad = Outbox::with_table(&bus, "orders; DROP TABLE x").unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidConfig);
    drop_tables(&pool, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_outage_makes_the_relay_wait_and_resume_without_loss() {
    let Some(pool) = pg_pool().await else { return };
    let server = match RedisServer::start() {
        Ok(s) => s,
        Err(e) => {
            unavailable("a redis-server of the test's own", &e);
            return;
        }
    };
    let Some(redis) = redis(&server.url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut sub = subscribe(&redis, TYPE).await;
    let relay = Relay::postgres(pool.clone(), Arc::new(redis.clone()))
        .table(&table)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .publish_timeout(Duration::from_secs(2))
        .spawn()
        .unwrap();
    let mut next = vec![0u64; 10];
    let mut seen = Seen::default();
    let before = stage_committed(&pool, &outbox, &mut next, 100, 5).await;
    seen.until_all(&mut sub, &before).await;
    drop(sub);

    server.0.kill();
    let during = stage_committed(&pool, &outbox, &mut next, 100, 5).await;
    // The relay tries, fails, keeps the rows and backs off.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.stats().publish_failures == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no publish failure");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pending(&pool, &table).await, 100, "nothing is dropped");
    let attempts: i64 = sqlx::query_scalar(&format!("SELECT max(attempts)::bigint FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(attempts >= 1, "failures are recorded on the rows");
    let failures = relay.stats().publish_failures;

    server.0.restart().unwrap();
    wait_drained(&pool, &table).await;
    // Read the whole stream back from the restarted server.
    let reader = redis_with_prefix(&server.url(), &redis.config().key_prefix).await;
    let mut verify = reader
        .topic(TYPE)
        .await
        .unwrap()
        .subscribe(SubscribeOptions::named("verify").start(StartPosition::Earliest))
        .await
        .unwrap();
    let mut all = Seen::default();
    let want: HashSet<String> = before.union(&during).cloned().collect();
    all.until_all(&mut verify, &want).await;
    println!(
        "outage: {failures} failed publish rounds while Redis was down, then all {} events \
         delivered ({} duplicates)",
        want.len(),
        all.duplicates()
    );
    assert_eq!(all.ids, want);
    assert_eq!(all.assert_ordered_per_key(), 10);

    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_the_relay_polls_and_still_delivers() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap().notify(false);
    // Concurrent migrations of one table do not race.
    let (a, b) = tokio::join!(outbox.migrate(&pool), outbox.migrate(&pool));
    a.unwrap();
    b.unwrap();
    let mut sub = subscribe(&redis, TYPE).await;
    let relay = Relay::postgres(pool.clone(), Arc::new(redis.clone()))
        .table(&table)
        .notify(false)
        .poll_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let mut next = vec![0u64; 3];
    let ids = stage_committed(&pool, &outbox, &mut next, 60, 3).await;
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &ids).await;
    assert_eq!(seen.assert_ordered_per_key(), 3);
    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_transport_refuses_holds_up_only_its_own_bucket() {
    let Some(pool) = pg_pool().await else { return };
    let Some(probe) = redis(&redis_url()).await else {
        return;
    };
    // A transport that refuses events over 4 KiB (TooLarge, not retryable).
    let mut config = probe.config().clone();
    config.max_payload_bytes = 4096;
    let small = evbus_redis::RedisTransport::connect(config).await.unwrap();
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut sub = subscribe(&probe, TYPE).await;

    // The poison event first, then one more of its key, then 20 keys x 5 events.
    let mut tx = pool.begin().await.unwrap();
    let big = "x".repeat(10_000);
    let poison = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": big, "seq": 0})).key("poison"),
        )
        .await
        .unwrap();
    let behind = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "p", "seq": 1})).key("poison"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut next = vec![0u64; 20];
    stage_committed(&pool, &outbox, &mut next, 100, 5).await;
    let rows: Vec<(String, i32)> = sqlx::query_as(&format!(
        "SELECT event_id, bucket FROM {table} ORDER BY seq"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let poison_bucket = rows[0].1;
    let held: HashSet<String> = rows
        .iter()
        .filter(|(_, b)| *b == poison_bucket)
        .map(|(id, _)| id.clone())
        .collect();
    let flowing: HashSet<String> = rows
        .iter()
        .filter(|(_, b)| *b != poison_bucket)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(held.contains(&poison) && held.contains(&behind));
    assert!(flowing.len() >= 90, "most keys are in other buckets");

    let relay = Relay::postgres(pool.clone(), Arc::new(small))
        .table(&table)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn()
        .unwrap();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &flowing).await;
    // The poison row is retried (attempts counted, error kept), never dropped; its bucket
    // waits behind it, in order.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (attempts, error) = loop {
        let (attempts, error): (i32, Option<String>) = sqlx::query_as(&format!(
            "SELECT attempts, last_error FROM {table} WHERE event_id = $1"
        ))
        .bind(&poison)
        .fetch_one(&pool)
        .await
        .unwrap();
        if attempts >= 2 {
            break (attempts, error.unwrap());
        }
        assert!(tokio::time::Instant::now() < deadline, "no retry recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let left: HashSet<String> = sqlx::query_scalar(&format!("SELECT event_id FROM {table}"))
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    println!(
        "refused event: {attempts} attempts so far, last error: {error}; {} events of other \
         buckets delivered, {} held in its bucket",
        flowing.len(),
        left.len()
    );
    assert!(error.contains("too_large"), "{error}");
    assert_eq!(left, held, "exactly the refused event's bucket waits");
    assert!(seen.ids.is_disjoint(&held));

    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_the_migration_waits_for_it() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let mut sub = subscribe(&redis, TYPE).await;
    let relay = Relay::postgres(pool.clone(), Arc::new(redis.clone()))
        .table(&table)
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.stats().database_errors == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no database error");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Staging without the table fails with a hint, and the relay keeps retrying.
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let err = outbox
        .stage(&mut tx, Emit::new(TYPE, json!({"orderId": "o", "seq": 0})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker);
    assert!(err.message().contains("Outbox::migrate"), "{err}");
    tx.rollback().await.unwrap();

    outbox.migrate(&pool).await.unwrap();
    let mut next = vec![0u64; 2];
    let ids = stage_committed(&pool, &outbox, &mut next, 10, 2).await;
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &ids).await;
    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

/// Publishes of two relays ([`Slow`]'s log) that overlapped in time and shared a bucket.
fn overlapping(log: &[Publish], bucket_of: &HashMap<String, i32>) -> Vec<(i32, Publish, Publish)> {
    let mut overlaps = Vec::new();
    for (i, a) in log.iter().enumerate() {
        for b in &log[i + 1..] {
            if a.relay == b.relay || !(a.start < b.end && b.start < a.end) {
                continue;
            }
            let buckets: HashSet<i32> = a.ids.iter().map(|id| bucket_of[id]).collect();
            if let Some(bucket) = b
                .ids
                .iter()
                .map(|id| bucket_of[id])
                .find(|b| buckets.contains(b))
            {
                overlaps.push((bucket, a.clone(), b.clone()));
            }
        }
    }
    overlaps
}

/// Two relays of `table` with a lease TTL of 1 s, each publishing through a [`Slow`]
/// broker taking `delay` over every publish: relay-one starts first (and takes every
/// bucket), relay-two once relay-one's first publish began; both run until `done` holds
/// for the log of finished publishes (within [`WAIT`]) and are shut down. Returns the log
/// and the bucket of every staged event.
async fn two_slow_relays(
    pool: &PgPool,
    table: &str,
    delay: Duration,
    done: impl Fn(&[Publish]) -> bool,
) -> (Vec<Publish>, HashMap<String, i32>) {
    let bucket_of: HashMap<String, i32> =
        sqlx::query_as(&format!("SELECT event_id, bucket FROM {table}"))
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let log = Arc::new(Mutex::new(Vec::<Publish>::new()));
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let relay = |id: &str| {
        let slow = Slow {
            relay: id.to_owned(),
            delay,
            log: log.clone(),
            started: started.clone(),
        };
        Relay::postgres(pool.clone(), Arc::new(memory_behind(slow)))
            .table(table)
            .id(id)
            .lease_ttl(Duration::from_secs(1))
            .spawn()
            .unwrap()
    };
    let one = relay("relay-one");
    let deadline = tokio::time::Instant::now() + WAIT;
    while started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay-one publishes nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let two = relay("relay-two");
    while !done(&log.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {WAIT:?}: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    one.shutdown().await.unwrap();
    two.shutdown().await.unwrap();
    let log = log.lock().unwrap().clone();
    (log, bucket_of)
}

/// Whether relay `relay` finished at least `n` publishes.
fn finished(log: &[Publish], relay: &str, n: usize) -> bool {
    log.iter().filter(|p| p.relay == relay).count() >= n
}

/// Two relays, a broker that takes 25 ms over every publish, rounds of 128 single-event
/// publishes (two topics alternate, so no two consecutive rows share a run): a round is
/// 3.2 s, the lease TTL 1 s. No two relays may ever publish one bucket at the same time.
/// Before, a relay checked its leases only before reading a round and published the whole
/// round past their expiry, while the other relay took the expired buckets over and
/// published them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stops_publishing_before_its_leases_may_expire() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let mut staged = HashSet::new();
    for i in 0..128u64 {
        let key = format!("k{}", i % 64);
        let ty = if i % 2 == 0 { TYPE } else { OTHER_TYPE };
        let emit = Emit::new(ty, json!({"orderId": key, "seq": i / 64})).key(&key);
        staged.insert(outbox.stage(&mut tx, emit).await.unwrap());
    }
    tx.commit().await.unwrap();
    // Until every event was published (at least once).
    let (log, bucket_of) = two_slow_relays(&pool, &table, Duration::from_millis(25), |log| {
        let published: HashSet<&String> = log.iter().flat_map(|p| &p.ids).collect();
        staged.iter().all(|id| published.contains(id))
    })
    .await;
    let overlaps = overlapping(&log, &bucket_of);
    println!(
        "two relays, lease TTL 1 s, 25 ms per publish: {} publishes ({} by relay-two); {} \
         overlapping publishes of one bucket",
        log.len(),
        log.iter().filter(|p| p.relay == "relay-two").count(),
        overlaps.len()
    );
    assert!(
        overlaps.is_empty(),
        "two relays published one bucket at once: {:?}",
        &overlaps[..overlaps.len().min(3)]
    );
    assert!(
        finished(&log, "relay-two", 1),
        "relay-two took buckets over"
    );
    wait_drained(&pool, &table).await;
    drop_tables(&pool, &table).await;
}

/// A hung broker (3 s over every publish; the lease TTL is 1 s and the publish timeout the
/// default 10 s): a relay's publish is cut where its leases may expire, and counted as a
/// timeout. Before, it ran on for 3 s while the other relay took the expired buckets over
/// and published them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_to_a_hung_broker_is_cut_before_the_leases_may_expire() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for k in 0..64u64 {
        let key = format!("k{k}");
        let emit = Emit::new(TYPE, json!({"orderId": key, "seq": 0})).key(&key);
        outbox.stage(&mut tx, emit).await.unwrap();
    }
    tx.commit().await.unwrap();
    let (log, bucket_of) = two_slow_relays(&pool, &table, Duration::from_secs(3), |log| {
        finished(log, "relay-two", 1) && finished(log, "relay-one", 1)
    })
    .await;
    let overlaps = overlapping(&log, &bucket_of);
    let longest = log.iter().map(|p| p.end - p.start).max().unwrap();
    println!(
        "hung broker, lease TTL 1 s: {} publishes, the longest {longest:?}; {} overlapping \
         publishes of one bucket",
        log.len(),
        overlaps.len()
    );
    assert!(
        overlaps.is_empty(),
        "two relays published one bucket at once: {:?}",
        &overlaps[..overlaps.len().min(3)]
    );
    let errors: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT last_error FROM {table} WHERE last_error IS NOT NULL"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        errors.iter().any(|e| e.contains("leases may expire")),
        "{errors:?}"
    );
    drop_tables(&pool, &table).await;
}

/// Waits until a session of the database runs `LISTEN "<channel>"`: a relay that went idle.
async fn wait_listening(channel: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
            .bind(format!("LISTEN \"{channel}\""))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relay listens on `{channel}`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns a relay of `table` on `pool` (configured by `configure`) publishing to a memory
/// broker, waits until it is idle and listening, stages one event in a transaction of
/// `pool`, and expects it relayed (by `NOTIFY`) within 20 s; then shuts the relay down.
async fn relays_an_event_staged_while_it_idles(
    pool: &PgPool,
    table: &str,
    configure: impl FnOnce(RelayBuilder) -> RelayBuilder,
) {
    let outbox = Outbox::with_table(&bus(), table).unwrap();
    outbox.migrate(pool).await.unwrap();
    let memory = MemoryBroker::new(Default::default()).connect();
    let mut sub = subscribe(&memory, TYPE).await;
    let relay = configure(Relay::postgres(pool.clone(), Arc::new(memory.clone())).table(table))
        .spawn()
        .unwrap();
    wait_listening(table).await;
    let mut tx = tokio::time::timeout(Duration::from_secs(10), pool.begin())
        .await
        .expect("pool.begin() hangs")
        .expect("the application gets a connection of its pool while the relay idles");
    let id = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "o-1", "seq": 0})).key("o-1"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(20), sub.next_delivery())
        .await
        .expect("the staged event relayed")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event().id(), id);
    relay.shutdown().await.unwrap();
}

/// The relay's `LISTEN` connection is its own (a pool of one beside the application's), as
/// the transport's is: it took one connection of the application's pool for the relay's
/// life, so an application with a pool of one could not begin a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_listens_on_a_connection_of_its_own() {
    let pool = match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&pg_url())
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            unavailable(&format!("PostgreSQL at {}", pg_url()), &e);
            return;
        }
    };
    let table = table_name();
    relays_an_event_staged_while_it_idles(&pool, &table, |relay| relay).await;
    drop_tables(&pool, &table).await;
}

/// `poll_interval(Duration::MAX)` is capped (at a day): `now + poll_interval` overflowed
/// `Instant` and killed the relay task before its first wait, so it never listened nor
/// relayed anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_interval_of_duration_max_still_relays_on_notify() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    relays_an_event_staged_while_it_idles(&pool, &table, |relay| {
        relay.poll_interval(Duration::MAX)
    })
    .await;
    drop_tables(&pool, &table).await;
}

/// `lease_ttl(Duration::MAX)` is capped (at a day): its milliseconds overflowed the SQL
/// interval of the lease statements ("interval out of range"), so the relay never held a
/// bucket and never relayed anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_ttl_of_duration_max_still_relays() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    relays_an_event_staged_while_it_idles(&pool, &table, |relay| relay.lease_ttl(Duration::MAX))
        .await;
    drop_tables(&pool, &table).await;
}

/// A relay that cannot reach the broker (every publish fails with `Connection`) while
/// another relay can gives its buckets up after a lease period, and the other relay
/// publishes everything. It renewed its leases for as long as the database answered, and
/// its share of the keys waited for it while the healthy relay idled (an outsider review
/// saw 105 of 200 events delivered after ten lease periods).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_the_broker_gives_its_buckets_to_one_that_is_not() {
    use evbus::layer::LayerExt;
    let broker = MemoryBroker::new(Default::default());
    let down = Picky::default();
    down.down.store(true, std::sync::atomic::Ordering::SeqCst);
    gives_its_buckets_away(&broker, Arc::new(broker.connect().layer(down))).await;
}

/// The same for a relay whose broker hangs (every publish times out, nothing is refused): it
/// kept its buckets for ever, since only a round in which every failure was an outage
/// counted toward giving them up, and a hung broker's timeouts are not one (an outside
/// review: 21 of 40 rows still waiting after 20 lease periods).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_broker_hangs_gives_its_buckets_to_one_that_is_not() {
    use evbus::layer::LayerExt;
    let broker = MemoryBroker::new(Default::default());
    let hung = Slow {
        relay: "hung".to_owned(),
        delay: Duration::from_secs(3600),
        log: Arc::default(),
        started: Arc::default(),
    };
    gives_its_buckets_away(&broker, Arc::new(broker.connect().layer(hung))).await;
}

/// A relay on `failing` (a transport of `broker` that publishes nothing) holding every bucket,
/// and a healthy one on `broker`: every event staged reaches `broker` within 20 lease
/// periods, all through the healthy relay.
async fn gives_its_buckets_away(broker: &MemoryBroker, failing: Arc<dyn Transport>) {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut sub = subscribe(&broker.connect(), TYPE).await;
    let ttl = Duration::from_millis(500);
    // The failing relay first, so that it holds every bucket when the other one starts.
    let cut_off = Relay::postgres(pool.clone(), failing)
        .table(&table)
        .lease_ttl(ttl)
        .publish_timeout(Duration::from_millis(200))
        .spawn()
        .unwrap();
    tokio::time::sleep(ttl).await;
    let healthy = Relay::postgres(pool.clone(), Arc::new(broker.connect()))
        .table(&table)
        .lease_ttl(ttl)
        .spawn()
        .unwrap();
    let mut ids = HashSet::new();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..200 {
        let key = format!("k{i}");
        let emit = Emit::new(TYPE, json!({"orderId": key, "seq": 0})).key(&key);
        ids.insert(outbox.stage(&mut tx, emit).await.unwrap());
    }
    tx.commit().await.unwrap();
    let mut seen = Seen::default();
    tokio::time::timeout(ttl * 20, seen.until_all(&mut sub, &ids))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} of 200 events after 20 lease periods; cut-off relay {:?}, healthy relay {:?}",
                ids.intersection(&seen.ids).count(),
                cut_off.stats(),
                healthy.stats()
            )
        });
    assert_eq!(cut_off.stats().relayed, 0);
    cut_off.shutdown().await.unwrap();
    healthy.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
}

/// Tables made from the outbox's statements without the `INSERT` of the lease rows (only the
/// `CREATE ... IF NOT EXISTS` statements copied into an application's migrations, a
/// schema-only restore): the relay adds the missing lease rows itself and publishes; and
/// again after the lease table was emptied while it ran. Before, a bucket without a lease
/// row was never leased and its events waited for ever without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_adds_the_lease_rows_the_tables_lack_and_publishes() {
    let Some(pool) = pg_pool().await else { return };
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    let statements = outbox.ddl::<sqlx::Postgres>();
    assert!(
        statements.iter().any(|s| s.starts_with("INSERT")),
        "{statements:?}"
    );
    for statement in statements.iter().filter(|s| !s.starts_with("INSERT")) {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let leases = |pool: PgPool, table: String| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}_leases"))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(leases(pool.clone(), table.clone()).await, 0);
    let mut sub = subscribe(&redis, TYPE).await;
    let relay = Relay::postgres(pool.clone(), Arc::new(redis.clone()))
        .table(&table)
        .lease_ttl(Duration::from_secs(1))
        .spawn()
        .unwrap();
    let mut next = vec![0u64; 8];
    let ids = stage_committed(&pool, &outbox, &mut next, 16, 4).await;
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &ids).await;
    assert_eq!(leases(pool.clone(), table.clone()).await, 64);

    sqlx::query(&format!("TRUNCATE {table}_leases"))
        .execute(&pool)
        .await
        .unwrap();
    // The renewal after the truncation finds nothing held; the next adds the rows again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while leases(pool.clone(), table.clone()).await < 64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease rows were not added again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = stage_committed(&pool, &outbox, &mut next, 16, 4).await;
    seen.until_all(&mut sub, &ids).await;
    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
    cleanup_redis(&redis_url(), &redis).await;
}

/// A refused event's row deleted by an operator (as the README says to, to let its key go):
/// the bucket's back-off has run out and the bucket has nothing, and the idle relay polls as
/// usual. Before, the expired back-off made every idle wait zero: hundreds of fetches a
/// second until that bucket had an event again (193,419 index scans, about 3,000 fetches,
/// in 4.5 s). Counted as index scans of the outbox table (PostgreSQL's statistics of this
/// test's own table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_polls_at_its_interval_after_a_refused_row_was_deleted() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let poison = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "x".repeat(10_000), "seq": 0})).key("k"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::postgres(pool.clone(), Arc::new(memory_behind(Picky::default())))
        .table(&table)
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.stats().publish_failures < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deleted = sqlx::query(&format!("DELETE FROM {table} WHERE event_id = $1"))
        .bind(&poison)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1);
    // Past the longest back-off, then three seconds of an idle relay (poll interval 1 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scans = |pool: PgPool, table: String| async move {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await
            .ok();
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) FROM pg_stat_user_tables \
             WHERE relid = $1::regclass",
        )
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    };
    let before = scans(pool.clone(), table.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The relay's statistics reach the shared ones at the latest a second after its last
    // statement (PostgreSQL flushes a busy backend's at most every second).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = scans(pool.clone(), table.clone()).await;
    // A fetch of the relay's 64 buckets is up to 64 index scans (one per bucket).
    let fetches = (after - before) as f64 / 64.0;
    println!("idle relay after the refused row went: about {fetches:.0} fetches in 4.5 s");
    assert!(
        fetches <= 15.0,
        "about {fetches:.0} fetches of the outbox in 4.5 s (poll interval 1 s)"
    );
    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
}

/// A partition key the Bus accepts holds a NUL, which PostgreSQL's `text` cannot: staging it
/// must neither fail nor abort the application's transaction (the rest of it commits), and
/// the relay publishes the event with its key as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_a_nul_is_staged_and_relayed_as_it_was() {
    let Some(pool) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&pool).await.unwrap();
    let transport = MemoryBroker::new(Default::default()).connect();
    let mut sub = subscribe(&transport, TYPE).await;
    let mut tx = pool.begin().await.unwrap();
    let odd = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "o", "seq": 0})).key("a\0b"),
        )
        .await
        .unwrap();
    let plain = outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "p", "seq": 0})).key("p"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::postgres(pool.clone(), Arc::new(transport.clone()))
        .table(&table)
        .spawn()
        .unwrap();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &HashSet::from([odd.clone(), plain]))
        .await;
    let relayed = seen.events.iter().find(|e| e.id() == odd).unwrap();
    assert_eq!(relayed.partition_key(), Some("a\0b"));
    relay.shutdown().await.unwrap();
    drop_tables(&pool, &table).await;
}

/// A login role of one test (a unique name), for what depends on a role's rights or limits;
/// [`TestRole::drop`] removes it.
struct TestRole {
    name: String,
}

impl TestRole {
    /// A role allowed at most `limit` connections (`-1`: no limit).
    async fn create(admin: &PgPool, limit: i32) -> TestRole {
        let name = format!("outbox_role_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{name}' CONNECTION LIMIT {limit}"
        ))
        .execute(admin)
        .await
        .unwrap();
        TestRole { name }
    }

    /// The test's PostgreSQL, as this role.
    fn options(&self) -> PgConnectOptions {
        pg_url()
            .parse::<PgConnectOptions>()
            .unwrap()
            .username(&self.name)
            .password(&self.name)
    }

    /// Lets the role read and write (not create or alter) the outbox tables of `table`.
    async fn grant_outbox_tables(&self, admin: &PgPool, table: &str) {
        sqlx::query(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {table}, {table}_leases, {table}_relays \
             TO {}",
            self.name
        ))
        .execute(admin)
        .await
        .unwrap();
    }

    /// The sessions of the role now.
    async fn sessions(&self, admin: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(&self.name)
            .fetch_one(admin)
            .await
            .unwrap()
    }

    /// Drops the role and its rights (its pools must be closed).
    async fn drop(self, admin: &PgPool) {
        for statement in [
            format!("DROP OWNED BY {}", self.name),
            format!("DROP ROLE {}", self.name),
        ] {
            sqlx::query(&statement).execute(admin).await.unwrap();
        }
    }
}

/// The relay's `LISTEN` connection cannot be opened (its role is at its connection limit,
/// SQLSTATE 53300, what a server at `max_connections` answers) while the application's pool
/// works: the relay polls at its `poll_interval` meanwhile, and shuts down at once. Before,
/// every idle wait began by waiting for the listen connection, which sqlx retries until the
/// pool's `acquire_timeout` (30 s by default): each event waited up to 30 s (an outside
/// review measured 28 to 29.5 s), and so could a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_listen_polls_meanwhile_and_shuts_down_at_once() {
    let Some(admin) = pg_pool().await else { return };
    let table = table_name();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&admin).await.unwrap();
    // Two connections: the relay's pool of one and its id lock; none left for `LISTEN`.
    let role = TestRole::create(&admin, 2).await;
    role.grant_outbox_tables(&admin, &table).await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        // sqlx's default, spelled out: what a listen connection was waited for.
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(role.options())
        .await
        .unwrap();
    let memory = MemoryBroker::new(Default::default()).connect();
    let mut sub = subscribe(&memory, TYPE).await;
    let relay = Relay::postgres(pool.clone(), Arc::new(memory.clone()))
        .table(&table)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.stats().buckets_held < 64 {
        assert!(tokio::time::Instant::now() < deadline, "no buckets held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for seq in 0..3 {
        let mut tx = admin.begin().await.unwrap();
        let id = outbox
            .stage(
                &mut tx,
                Emit::new(TYPE, json!({"orderId": "o-1", "seq": seq})).key("o-1"),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
            .await
            .unwrap_or_else(|_| {
                panic!("event {seq} not relayed within 5 s (poll interval 1 s, no LISTEN)")
            })
            .unwrap()
            .unwrap();
        assert_eq!(delivery.event().id(), id);
        delivery.ack().await.unwrap();
        // Lets the relay go idle (and try to listen) again before the next event.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The case is the one meant: the role's two connections are the relay's, and nobody
    // listens on the outbox's channel.
    assert_eq!(role.sessions(&admin).await, 2);
    let listening: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
            .bind(format!("LISTEN \"{table}\""))
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(listening, 0);
    tokio::time::timeout(Duration::from_secs(5), relay.shutdown())
        .await
        .expect("the relay shuts down within 5 s while it cannot listen")
        .unwrap();
    pool.close().await;
    drop_tables(&admin, &table).await;
    role.drop(&admin).await;
}

/// The least-privilege split: a migration role creates the outbox tables, the application's
/// role may only read and write them, and the application runs `Outbox::migrate` at start-up
/// as the README says it may. It succeeds (and adds missing lease rows, which the role may
/// insert); when something it may not create is missing, it fails with a hint naming the
/// fix. Before, `migrate` always ran its `CREATE ... IF NOT EXISTS` statements, which
/// PostgreSQL refuses without the `CREATE` right on the schema even when the table exists
/// ("permission denied for schema"), with no hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_succeeds_for_a_role_that_may_only_use_the_existing_tables() {
    let Some(admin) = pg_pool().await else { return };
    let role = TestRole::create(&admin, -1).await;
    let schema = format!("outbox_s_{}", uuid::Uuid::now_v7().simple());
    let table = format!("{schema}.outbox");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("GRANT USAGE ON SCHEMA {schema} TO {}", role.name))
        .execute(&admin)
        .await
        .unwrap();
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&admin).await.unwrap();
    role.grant_outbox_tables(&admin, &table).await;
    let app = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(role.options())
        .await
        .unwrap();
    outbox
        .migrate(&app)
        .await
        .expect("migrate as a role that may read and write the existing tables");

    // Lease rows missing: the role may insert them, and does.
    sqlx::query(&format!("DELETE FROM {table}_leases WHERE bucket >= 32"))
        .execute(&admin)
        .await
        .unwrap();
    outbox.migrate(&app).await.unwrap();
    let leases: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}_leases"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(leases, 64);
    let mut tx = app.begin().await.unwrap();
    outbox
        .stage(
            &mut tx,
            Emit::new(TYPE, json!({"orderId": "o-1", "seq": 0})).key("o-1"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The index missing, which only the tables' owner may create: an error that says so.
    sqlx::query(&format!("DROP INDEX {schema}.outbox_bucket_seq"))
        .execute(&admin)
        .await
        .unwrap();
    let e = outbox.migrate(&app).await.unwrap_err();
    let message = e.to_string();
    println!("migrate as the application's role, the index missing: {message}");
    assert_eq!(e.kind(), ErrorKind::Broker, "{message}");
    for part in ["outbox_bucket_seq", "Outbox::ddl", "migration role"] {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
    // The migration role puts it back; the application's `migrate` succeeds again.
    outbox.migrate(&admin).await.unwrap();
    outbox.migrate(&app).await.unwrap();

    app.close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    role.drop(&admin).await;
}
