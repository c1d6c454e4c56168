//! The transactional outbox on SQLite (a file of the test's own), relayed to real Redis at
//! `EVBUS_REDIS_URL` (default `redis://127.0.0.1:6379`, own key prefix). When Redis does not
//! answer, the relay test prints a loud warning and returns, unless `CI` or
//! `EVBUS_REQUIRE_BROKERS` is set: then it fails.

mod outbox_support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use evbus::ErrorKind;
use evbus::bus::Emit;
use evbus_sql::outbox::{Outbox, Relay};
use outbox_support::*;
use serde_json::json;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

async fn open(path: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .unwrap()
}

async fn pending(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM evbus_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_drained(pool: &SqlitePool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while pending(pool).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "rows left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stages_in_the_app_transaction_and_the_relay_publishes_only_commits() {
    let Some(redis) = redis(&redis_url()).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let pool = open(&path).await;
    let outbox = Outbox::new(&bus());
    outbox.migrate(&pool).await.unwrap();
    outbox.migrate(&pool).await.unwrap(); // idempotent
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let mut sub = subscribe(&redis, TYPE).await;

    // Staged before any relay runs: the rows wait in the table.
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    let mut next = [0u64; 5];
    for i in 0..200 {
        let key = format!("k{}", i % 5);
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id) VALUES (?)")
            .bind(format!("o-{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        if i % 2 == 0 {
            let seq = next[i % 5];
            next[i % 5] += 1;
            let emit = Emit::new(TYPE, json!({"orderId": key, "seq": seq})).key(&key);
            committed.insert(outbox.stage(&mut tx, emit).await.unwrap());
            tx.commit().await.unwrap();
        } else {
            let emit = Emit::new(TYPE, json!({"orderId": key, "seq": 999})).key(&key);
            rolled_back.insert(outbox.stage(&mut tx, emit).await.unwrap());
            tx.rollback().await.unwrap();
        }
    }
    assert_eq!(pending(&pool).await, 100);

    let relay = Relay::sqlite(pool.clone(), Arc::new(redis.clone()))
        .spawn()
        .unwrap();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &committed).await;
    wait_drained(&pool).await;
    let published = stream_len(&redis_url(), &redis, TYPE).await;
    println!(
        "sqlite: 200 transactions, 100 committed: {published} published, {} rolled-back ids received",
        seen.ids.intersection(&rolled_back).count()
    );
    assert_eq!(published, 100);
    assert_eq!(seen.ids, committed);
    assert_eq!(seen.assert_ordered_per_key(), 5);
    relay.shutdown().await.unwrap();

    // Staged while no relay runs, the file closed and reopened: a new relay publishes it.
    let mut tx = pool.begin().await.unwrap();
    let later = outbox
        .stage_batch(
            &mut tx,
            (0..5).map(|k| {
                let key = format!("k{k}");
                Emit::new(TYPE, json!({"orderId": key, "seq": next[k]})).key(key)
            }),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    pool.close().await;
    let pool = open(&path).await;
    assert_eq!(pending(&pool).await, 5);
    let relay = Relay::sqlite(pool.clone(), Arc::new(redis.clone()))
        .spawn()
        .unwrap();
    seen.until_all(&mut sub, &later.into_iter().collect()).await;
    assert_eq!(seen.assert_ordered_per_key(), 5);
    wait_drained(&pool).await;
    relay.shutdown().await.unwrap();
    cleanup_redis(&redis_url(), &redis).await;
}

#[tokio::test]
async fn sqlite_refuses_an_invalid_event_at_stage() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("app.db")).await;
    let bus = bus();
    let outbox = Outbox::with_table(&bus, "my_outbox").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let invalid = Emit::new(TYPE, json!({"seq": "x"}));
    let err = outbox.stage(&mut tx, invalid.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert_eq!(
        err.message(),
        bus.prepare_event(invalid).unwrap_err().message()
    );
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM my_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}
