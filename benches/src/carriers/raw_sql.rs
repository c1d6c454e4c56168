//! The raw SQL loops (PostgreSQL and SQLite): plain sqlx on the same three tables the
//! evbus-sql transport creates (its migration files, included here), doing what a hand-written
//! table queue would: per publish, one statement inserting the event and its delivery row
//! (awaited); one consumer claiming up to 16 visible rows at a time (`FOR UPDATE SKIP LOCKED`
//! on PostgreSQL) with the default visibility timeout, and deleting each row once decoded (up
//! to 16 deletes in flight, as the Bus's handlers ack). No NOTIFY: when it finds nothing it
//! polls again after 1 ms. What the adapter adds on top is its part of the cost: the fan-out
//! to subscriptions, the per-topic lock, NOTIFY, one claim per delivery, the envelope.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, in_tasks};
use crate::Result;
use crate::sample::{BrokerWait, Recorder, Sample, decode};

const PG_TABLES: &str =
    include_str!("../../../crates/evbus-sql/migrations/postgres/20261130000001_transport.sql");
const SQLITE_TABLES: &str =
    include_str!("../../../crates/evbus-sql/migrations/sqlite/20261130000001_transport.sql");

/// The raw loop's own PostgreSQL schema, recreated at each setup.
const PG_SCHEMA: &str = "evbus_bench_raw";

#[derive(Clone)]
enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

pub(crate) struct RawSql {
    /// `postgres://...` or a directory for SQLite files.
    target: Target,
    db: Option<Db>,
    part: i64,
    wait: BrokerWait,
    task: Option<JoinHandle<()>>,
}

enum Target {
    Postgres(String),
    Sqlite(std::path::PathBuf),
}

fn ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl RawSql {
    /// On the PostgreSQL server of `url` (the transport's own parameters are dropped).
    pub(crate) fn postgres(url: &str) -> Self {
        let plain = url.split('?').next().unwrap_or(url).to_owned();
        Self::new(Target::Postgres(plain))
    }

    /// On SQLite files in `dir`.
    pub(crate) fn sqlite(dir: std::path::PathBuf) -> Self {
        Self::new(Target::Sqlite(dir))
    }

    fn new(target: Target) -> Self {
        RawSql {
            target,
            db: None,
            part: 0,
            wait: BrokerWait::default(),
            task: None,
        }
    }
}

fn visibility_ms() -> i64 {
    evbus::ConsumerOptions::default()
        .visibility_timeout
        .as_millis() as i64
}

#[async_trait]
impl Carrier for RawSql {
    async fn setup(&mut self, run: &str) -> Result<()> {
        match &self.target {
            Target::Postgres(url) => {
                let admin = PgPool::connect(url).await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
                    .execute(&admin)
                    .await?;
                sqlx::query(&format!("CREATE SCHEMA {PG_SCHEMA}"))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                let options: sqlx::postgres::PgConnectOptions = url.parse()?;
                let pool = PgPoolOptions::new()
                    .max_connections(5)
                    .connect_with(options.options([("search_path", PG_SCHEMA)]))
                    .await?;
                sqlx::raw_sql(PG_TABLES).execute(&pool).await?;
                self.part = sqlx::query_scalar(
                    "INSERT INTO evbus_parts (kind, dest, name) VALUES ('topic', 'raw', 'bench') \
                     RETURNING id",
                )
                .fetch_one(&pool)
                .await?;
                self.db = Some(Db::Postgres(pool));
            }
            Target::Sqlite(dir) => {
                std::fs::create_dir_all(dir)?;
                let options = SqliteConnectOptions::new()
                    .filename(dir.join(format!("raw-{run}.db")))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(5)
                    .connect_with(options)
                    .await?;
                sqlx::raw_sql(SQLITE_TABLES).execute(&pool).await?;
                self.part = sqlx::query_scalar(
                    "INSERT INTO evbus_parts (kind, dest, name, seen_at) \
                     VALUES ('topic', 'raw', 'bench', 0) RETURNING id",
                )
                .fetch_one(&pool)
                .await?;
                self.db = Some(Db::Sqlite(pool));
            }
        }
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let body = serde_json::to_string(sample)?;
        let db = self.db.as_ref().ok_or("raw sql: not set up")?;
        let started = Instant::now();
        insert_one(db, self.part, body).await?;
        self.wait.add(started);
        Ok(())
    }

    /// Tasks: one committed insert per publish from every task, on the one pool. Batches:
    /// PostgreSQL inserts a batch with one statement over `unnest` of the bodies; SQLite in
    /// one transaction.
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let db = self.db.clone().ok_or("raw sql: not set up")?;
        let part = self.part;
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let db = db.clone();
                    async move { insert_one(&db, part, serde_json::to_string(&data)?).await }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in payloads.chunks(size.max(1)) {
                    let bodies = chunk
                        .iter()
                        .map(serde_json::to_string)
                        .collect::<Result<Vec<_>, _>>()?;
                    insert_many(&db, part, bodies).await?;
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let db = self.db.clone().ok_or("raw sql: not set up")?;
        let part = self.part;
        let wait = self.wait.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let started = Instant::now();
                let claimed = claim(&db, part).await;
                wait.add(started);
                let rows = match claimed {
                    Ok(rows) => rows,
                    Err(e) => {
                        eprintln!("raw sql: claiming: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if rows.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let mut acks = Vec::with_capacity(rows.len());
                for (id, body) in rows {
                    recorder.received(decode(body.as_bytes()));
                    let db = db.clone();
                    acks.push(async move { ack(&db, id).await });
                }
                let started = Instant::now();
                for result in futures::future::join_all(acks).await {
                    if let Err(e) = result {
                        eprintln!("raw sql: deleting: {e}");
                    }
                }
                wait.add(started);
            }
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        match self.db.take() {
            Some(Db::Postgres(pool)) => {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
                    .execute(&pool)
                    .await?;
                pool.close().await;
            }
            Some(Db::Sqlite(pool)) => pool.close().await,
            None => {}
        }
        if let Target::Sqlite(dir) = &self.target {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    fn take_broker_wait(&mut self) -> Duration {
        self.wait.take()
    }
}

/// Claims up to [`CONCURRENCY`] visible rows of `part` for the visibility timeout.
async fn claim(db: &Db, part: i64) -> std::result::Result<Vec<(i64, String)>, sqlx::Error> {
    match db {
        Db::Postgres(pool) => {
            sqlx::query_as(
                "WITH c AS (UPDATE evbus_deliveries \
                   SET visible_at = now() + make_interval(secs => $3::float8 / 1000), \
                   attempt = attempt + 1 \
                   WHERE id IN (SELECT id FROM evbus_deliveries WHERE part = $1 \
                     AND visible_at <= now() ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                   RETURNING id, event) \
                 SELECT c.id, e.body FROM c JOIN evbus_events e ON e.id = c.event ORDER BY c.id",
            )
            .bind(part)
            .bind(CONCURRENCY as i64)
            .bind(visibility_ms())
            .fetch_all(pool)
            .await
        }
        Db::Sqlite(pool) => {
            let now = ms_now();
            let mut tx = pool.begin().await?;
            let rows: Vec<(i64, i64)> = sqlx::query_as(
                "UPDATE evbus_deliveries SET visible_at = ?1 + ?2, attempt = attempt + 1 \
                 WHERE id IN (SELECT id FROM evbus_deliveries WHERE part = ?3 \
                   AND visible_at <= ?1 ORDER BY id LIMIT ?4) RETURNING id, event",
            )
            .bind(now)
            .bind(visibility_ms())
            .bind(part)
            .bind(CONCURRENCY as i64)
            .fetch_all(&mut *tx)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, event) in rows {
                let body: String =
                    sqlx::query_scalar("SELECT body FROM evbus_events WHERE id = ?1")
                        .bind(event)
                        .fetch_one(&mut *tx)
                        .await?;
                out.push((id, body));
            }
            tx.commit().await?;
            out.sort_by_key(|(id, _)| *id);
            Ok(out)
        }
    }
}

async fn ack(db: &Db, id: i64) -> std::result::Result<(), sqlx::Error> {
    match db {
        Db::Postgres(pool) => sqlx::query("DELETE FROM evbus_deliveries WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await
            .map(drop),
        Db::Sqlite(pool) => sqlx::query("DELETE FROM evbus_deliveries WHERE id = ?1")
            .bind(id)
            .execute(pool)
            .await
            .map(drop),
    }
}

/// One event and its delivery, committed.
async fn insert_one(db: &Db, part: i64, body: String) -> Result<()> {
    match db {
        Db::Postgres(pool) => {
            sqlx::query(
                "WITH ev AS (INSERT INTO evbus_events (kind, dest, body) \
                   VALUES ('topic', 'raw', $1) RETURNING id) \
                 INSERT INTO evbus_deliveries (part, event) SELECT $2, id FROM ev",
            )
            .bind(body)
            .bind(part)
            .execute(pool)
            .await?;
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await?;
            sqlite_insert(&mut tx, part, body).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Several events and their deliveries, committed together.
async fn insert_many(db: &Db, part: i64, bodies: Vec<String>) -> Result<()> {
    match db {
        Db::Postgres(pool) => {
            sqlx::query(
                "WITH ev AS (INSERT INTO evbus_events (kind, dest, body) \
                   SELECT 'topic', 'raw', b FROM unnest($1::text[]) WITH ORDINALITY AS t(b, n) \
                   ORDER BY n RETURNING id) \
                 INSERT INTO evbus_deliveries (part, event) SELECT $2, id FROM ev ORDER BY id",
            )
            .bind(bodies)
            .bind(part)
            .execute(pool)
            .await?;
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await?;
            for body in bodies {
                sqlite_insert(&mut tx, part, body).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

async fn sqlite_insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    part: i64,
    body: String,
) -> Result<()> {
    let event: i64 = sqlx::query_scalar(
        "INSERT INTO evbus_events (kind, dest, body, created_at) \
         VALUES ('topic', 'raw', ?1, ?2) RETURNING id",
    )
    .bind(body)
    .bind(ms_now())
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
         VALUES (?1, ?2, 0, 0)",
    )
    .bind(part)
    .bind(event)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
