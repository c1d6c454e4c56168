//! Outbox table names at their edges. An outside review found that a name that is also an
//! SQL keyword (`order`, `user`, `table`) passed `Outbox::with_table` and then failed at
//! `migrate` with a syntax error (the name was spliced unquoted into the SQL), and that a
//! name of 64 bytes or more passed too and then failed every `stage` on PostgreSQL ("channel
//! name too long": the whole name is the `NOTIFY` channel). Keywords now work, on SQLite and
//! PostgreSQL; a name over 63 bytes is refused by `with_table`, and the longest accepted one
//! stages and relays on PostgreSQL.
//!
//! The PostgreSQL tests use the server at `EVBUS_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in a schema of their own; when it does not
//! answer they warn and return, unless `CI` or `EVBUS_REQUIRE_BROKERS` is set.

mod outbox_support;

use std::collections::HashSet;
use std::sync::Arc;

use evbus::ErrorKind;
use evbus::bus::Emit;
use evbus::memory::MemoryBroker;
use evbus_sql::outbox::{Outbox, Relay};
use outbox_support::*;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

fn order(key: &str, seq: u64) -> Emit {
    Emit::new(TYPE, json!({"orderId": key, "seq": seq})).key(key)
}

/// `name` quoted for SQL (`schema.table` part by part).
fn quoted(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

async fn sqlite_pool(path: &std::path::Path) -> SqlitePool {
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

async fn sqlite_pending(pool: &SqlitePool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", quoted(table)))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn pg_pending(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", quoted(table)))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_tables_named_by_sql_keywords_migrate_stage_and_relay() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir.path().join("app.db")).await;
    for table in ["order", "user", "table"] {
        let outbox = Outbox::with_table(&bus(), table).unwrap();
        outbox.migrate(&pool).await.unwrap();
        outbox.migrate(&pool).await.unwrap(); // idempotent
        let mut tx = pool.begin().await.unwrap();
        let ids: HashSet<String> = outbox
            .stage_batch(&mut tx, (0..3).map(|i| order("k", i)))
            .await
            .unwrap()
            .into_iter()
            .collect();
        tx.commit().await.unwrap();
        assert_eq!(sqlite_pending(&pool, table).await, 3, "{table}");

        let transport = Arc::new(MemoryBroker::new(Default::default()).connect());
        let mut sub = subscribe(&*transport, TYPE).await;
        let relay = Relay::sqlite(pool.clone(), transport.clone())
            .table(table)
            .spawn()
            .unwrap();
        let mut seen = Seen::default();
        seen.until_all(&mut sub, &ids).await;
        seen.assert_ordered_per_key();
        let deadline = tokio::time::Instant::now() + WAIT;
        while sqlite_pending(&pool, table).await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "{table}: rows left");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        relay.shutdown().await.unwrap();
    }
}

/// A schema of the test's own, 30 bytes long (`ob_` and 27 hex digits).
fn schema_name() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("ob_{}", &id[id.len() - 27..])
}

/// Migrates, stages three events (with `NOTIFY`, the default) and relays them (listening),
/// for the outbox table `table` of PostgreSQL.
async fn pg_round_trip(pool: &PgPool, table: &str) {
    let outbox = Outbox::with_table(&bus(), table).unwrap();
    outbox.migrate(pool).await.unwrap();
    outbox.migrate(pool).await.unwrap(); // idempotent
    let mut tx = pool.begin().await.unwrap();
    let mut ids = HashSet::new();
    for i in 0..3 {
        ids.insert(outbox.stage(&mut tx, order("k", i)).await.unwrap());
    }
    tx.commit().await.unwrap();
    assert_eq!(pg_pending(pool, table).await, 3, "{table}");

    let transport = Arc::new(MemoryBroker::new(Default::default()).connect());
    let mut sub = subscribe(&*transport, TYPE).await;
    let relay = Relay::postgres(pool.clone(), transport.clone())
        .table(table)
        .spawn()
        .unwrap();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &ids).await;
    seen.assert_ordered_per_key();
    let deadline = tokio::time::Instant::now() + WAIT;
    while pg_pending(pool, table).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{table}: rows left");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Staged while the relay listens: the NOTIFY on the table's channel wakes it.
    let mut tx = pool.begin().await.unwrap();
    let late: HashSet<String> = [outbox.stage(&mut tx, order("k", 3)).await.unwrap()].into();
    tx.commit().await.unwrap();
    seen.until_all(&mut sub, &late).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_tables_named_by_sql_keywords_migrate_stage_and_relay() {
    let Some(pool) = pg_pool().await else { return };
    let schema = schema_name();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .unwrap();
    // Unqualified names are where a keyword breaks unquoted SQL (after `schema.` PostgreSQL
    // takes any keyword): the test's schema is first on the search path, so the tables
    // `order`, `order_leases`, ... are made there and not in `public`.
    let options = pg_url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let in_schema = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect_with(options)
        .await
        .unwrap();
    for table in ["order", "user", "table"] {
        pg_round_trip(&in_schema, table).await;
        pg_round_trip(&pool, &format!("{schema}.{table}")).await;
    }
    in_schema.close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_longest_accepted_table_name_stages_and_relays() {
    let schema = schema_name();
    assert_eq!(schema.len(), 30);
    // 30 + 1 + 32 = 63 bytes: the longest name PostgreSQL keeps, and the NOTIFY channel.
    let longest = format!("{schema}.{}", "o".repeat(32));
    assert_eq!(longest.len(), 63);
    // One byte more is refused before anything reaches the database.
    let over = format!("{schema}.{}", "o".repeat(33));
    let e = Outbox::with_table(&bus(), &over).expect_err("a 64-byte name");
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("63 bytes"), "{e}");
    let e = Relay::sqlite(
        SqlitePoolOptions::new().connect_lazy_with(SqliteConnectOptions::new()),
        Arc::new(MemoryBroker::new(Default::default()).connect()),
    )
    .table(&over)
    .spawn()
    .expect_err("a relay of a 64-byte name");
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");

    let Some(pool) = pg_pool().await else { return };
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .unwrap();
    pg_round_trip(&pool, &longest).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
