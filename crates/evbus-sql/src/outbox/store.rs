//! The SQL the relay runs: leases and heartbeats (PostgreSQL), fetching, deleting and
//! recording failures (both databases), and waiting for new rows.

use std::time::Duration;

use evbus::{Error, ErrorKind, Result};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, SqlitePool};
use tokio_util::sync::CancellationToken;

use super::table::{BUCKETS, Table};

/// A staged row, as the relay reads it.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) seq: i64,
    pub(crate) bucket: i32,
    pub(crate) topic: String,
    pub(crate) event: String,
}

/// A sqlx error as an evbus error: connection-level failures are retryable
/// ([`ErrorKind::Connection`], [`ErrorKind::Timeout`]), a closed pool is
/// [`ErrorKind::Closed`], anything the database refused is [`ErrorKind::Broker`].
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            ErrorKind::Connection
        }
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => ErrorKind::Closed,
        sqlx::Error::Database(_) => ErrorKind::Broker,
        sqlx::Error::Configuration(_) => ErrorKind::InvalidConfig,
        _ => ErrorKind::Internal,
    };
    let missing_table = match &e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("42P01") || db.message().contains("no such table")
        }
        _ => false,
    };
    let error = Error::client(kind, format!("outbox: {what}"), e);
    if missing_table {
        error.with_hint("create the outbox tables first with `Outbox::migrate`")
    } else {
        error
    }
}

/// Creates the PostgreSQL tables, serialised by an advisory lock so concurrent migrations
/// do not race on `CREATE TABLE IF NOT EXISTS`.
pub(crate) async fn migrate_postgres(pool: &PgPool, table: &Table) -> Result<()> {
    let what = format!("creating the outbox table `{}`", table.name);
    let err = |e| db_error(&what, e);
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("evbus-outbox:{}", table.name))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    for ddl in table.postgres_ddl() {
        sqlx::query(&ddl).execute(&mut *tx).await.map_err(err)?;
    }
    tx.commit().await.map_err(err)
}

/// Creates the SQLite table.
pub(crate) async fn migrate_sqlite(pool: &SqlitePool, table: &Table) -> Result<()> {
    let what = format!("creating the outbox table `{}`", table.name);
    for ddl in table.sqlite_ddl() {
        sqlx::query(&ddl)
            .execute(pool)
            .await
            .map_err(|e| db_error(&what, e))?;
    }
    Ok(())
}

/// The database a relay reads.
pub(crate) enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

pub(crate) struct PgStore {
    pool: PgPool,
    table: Table,
    relay: String,
    notify: bool,
    /// The `LISTEN` connection's own pool of one, apart from the application's pool: a
    /// listener holds its connection for the relay's life, which would starve an
    /// application pool of one (and take one connection from any other).
    listen_pool: Option<PgPool>,
    listener: Option<PgListener>,
    /// Live relays at the last renewal, this one included.
    live: usize,
    /// The connection holding this relay id's session lock (see [`PgStore::hold_id`]).
    id_lock: Option<sqlx::PgConnection>,
    /// Whether the last renewal found the id held by another relay (to warn once per
    /// stretch, not at every renewal).
    id_taken: bool,
    /// Whether the lease table is known to hold a row per bucket (see
    /// [`PgStore::leases`]).
    seeded: bool,
}

pub(crate) struct SqliteStore {
    pool: SqlitePool,
    table: Table,
}

impl Store {
    pub(crate) fn postgres(pool: PgPool, table: Table, relay: String, notify: bool) -> Store {
        Store::Postgres(PgStore {
            pool,
            table,
            relay,
            notify,
            listen_pool: None,
            listener: None,
            live: 1,
            id_lock: None,
            id_taken: false,
            seeded: false,
        })
    }

    pub(crate) fn sqlite(pool: SqlitePool, table: Table) -> Store {
        Store::Sqlite(SqliteStore { pool, table })
    }

    /// Whether the relay leases its buckets (PostgreSQL), so that its rounds must end before
    /// its leases may expire.
    pub(crate) fn leases_buckets(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Renews this relay's heartbeat and leases, takes or gives back buckets so that every
    /// live relay holds its fair share, and returns the buckets held (sorted). SQLite has one
    /// relay: it holds every bucket.
    pub(crate) async fn leases(&mut self, ttl: Duration) -> Result<Vec<i32>> {
        match self {
            Store::Postgres(pg) => pg.leases(ttl).await,
            Store::Sqlite(_) => Ok((0..BUCKETS).collect()),
        }
    }

    /// The oldest rows of `buckets`, at most `limit`, in staging order (so each bucket's
    /// rows are a prefix of its backlog).
    pub(crate) async fn fetch(&self, buckets: &[i32], limit: i64) -> Result<Vec<Row>> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let rows = match self {
            Store::Postgres(pg) => {
                // The first `limit` sequence numbers of each bucket (index-only on
                // (bucket, seq)), the first `limit` of those overall, then their rows.
                let sql = format!(
                    "SELECT o.seq, o.bucket, o.topic, o.event FROM {t} o
                     WHERE o.seq IN (
                         SELECT r.seq FROM unnest($1::int[]) AS b(bucket)
                         CROSS JOIN LATERAL (
                             SELECT x.seq FROM {t} x
                             WHERE x.bucket = b.bucket ORDER BY x.seq LIMIT $2
                         ) r
                         ORDER BY r.seq LIMIT $2
                     )
                     ORDER BY o.seq",
                    t = pg.table.sql()
                );
                sqlx::query(&sql)
                    .bind(buckets)
                    .bind(limit)
                    .fetch_all(&pg.pool)
                    .await
                    .and_then(|rows| rows.iter().map(decode_row).collect())
            }
            Store::Sqlite(lite) => {
                // One process holds every bucket: only buckets in back-off are left out.
                let sql = format!(
                    "SELECT seq, bucket, topic, event FROM {}
                     WHERE bucket IN (SELECT value FROM json_each(?1))
                     ORDER BY seq LIMIT ?2",
                    lite.table.sql()
                );
                sqlx::query(&sql)
                    .bind(json_array(buckets))
                    .bind(limit)
                    .fetch_all(&lite.pool)
                    .await
                    .and_then(|rows| rows.iter().map(decode_row).collect())
            }
        };
        rows.map_err(|e| db_error(&format!("reading `{}`", self.table().name), e))
    }

    /// Deletes the rows `seqs` (published).
    pub(crate) async fn delete(&self, seqs: &[i64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let result = match self {
            Store::Postgres(pg) => {
                let sql = format!("DELETE FROM {} WHERE seq = ANY($1)", pg.table.sql());
                sqlx::query(&sql)
                    .bind(seqs)
                    .execute(&pg.pool)
                    .await
                    .map(drop)
            }
            Store::Sqlite(lite) => {
                let sql = format!(
                    "DELETE FROM {} WHERE seq IN (SELECT value FROM json_each(?1))",
                    lite.table.sql()
                );
                sqlx::query(&sql)
                    .bind(json_array(seqs))
                    .execute(&lite.pool)
                    .await
                    .map(drop)
            }
        };
        result.map_err(|e| {
            db_error(
                &format!("deleting relayed rows of `{}`", self.table().name),
                e,
            )
        })
    }

    /// Counts a failed attempt on row `seq` with its error, for operators (`attempts`,
    /// `last_error` columns).
    pub(crate) async fn record_failure(&self, seq: i64, error: &str) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET attempts = attempts + 1, last_error = $1 WHERE seq = $2",
            self.table().sql()
        );
        let result = match self {
            Store::Postgres(pg) => sqlx::query(&sql)
                .bind(error)
                .bind(seq)
                .execute(&pg.pool)
                .await
                .map(drop),
            Store::Sqlite(lite) => {
                let sql = sql.replace('$', "?");
                sqlx::query(&sql)
                    .bind(error)
                    .bind(seq)
                    .execute(&lite.pool)
                    .await
                    .map(drop)
            }
        };
        result.map_err(|e| db_error("recording a publish failure", e))
    }

    /// Waits up to `timeout` for new rows: a `NOTIFY` on PostgreSQL (when enabled), else
    /// just the timeout (polling). Returns early when `cancel` fires.
    pub(crate) async fn wait(&mut self, timeout: Duration, cancel: &CancellationToken) {
        let sleep = tokio::time::sleep(timeout);
        match self {
            Store::Postgres(pg) if pg.notify => {
                if pg.listener.is_none() {
                    match pg.listen().await {
                        Ok(l) => pg.listener = Some(l),
                        Err(e) => tracing::warn!(
                            table = %pg.table.name,
                            error = %e,
                            "outbox relay cannot LISTEN; polling until it can"
                        ),
                    }
                }
                if let Some(listener) = pg.listener.as_mut() {
                    tokio::select! {
                        _ = sleep => {}
                        _ = cancel.cancelled() => {}
                        received = listener.recv() => {
                            if let Err(e) = received {
                                tracing::warn!(
                                    table = %pg.table.name,
                                    error = %e,
                                    "outbox relay lost its LISTEN connection; reconnecting"
                                );
                                pg.listener = None;
                            }
                        }
                    }
                    return;
                }
                tokio::select! {
                    _ = sleep => {}
                    _ = cancel.cancelled() => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = sleep => {}
                    _ = cancel.cancelled() => {}
                }
            }
        }
    }

    /// Gives back every lease and removes the heartbeat (a clean shutdown: the other relays
    /// take the buckets over at once instead of after the lease expiry).
    pub(crate) async fn release(&mut self) -> Result<()> {
        match self {
            Store::Postgres(pg) => {
                pg.listener = None;
                if let Some(pool) = pg.listen_pool.take() {
                    pool.close().await;
                }
                pg.step_back().await
            }
            Store::Sqlite(_) => Ok(()),
        }
    }

    /// Whether another relay renewed its heartbeat within the last lease period (as of this
    /// relay's last [`leases`](Self::leases)).
    pub(crate) fn others_alive(&self) -> bool {
        match self {
            Store::Postgres(pg) => pg.live > 1,
            Store::Sqlite(_) => false,
        }
    }

    /// Gives back every lease and removes the heartbeat, as [`release`](Self::release) does,
    /// but goes on listening: the relay takes buckets again at its next
    /// [`leases`](Self::leases).
    pub(crate) async fn step_back(&mut self) -> Result<()> {
        match self {
            Store::Postgres(pg) => pg.step_back().await,
            Store::Sqlite(_) => Ok(()),
        }
    }

    fn table(&self) -> &Table {
        match self {
            Store::Postgres(pg) => &pg.table,
            Store::Sqlite(lite) => &lite.table,
        }
    }
}

impl PgStore {
    async fn listen(&mut self) -> std::result::Result<PgListener, sqlx::Error> {
        let pool = self.listen_pool.get_or_insert_with(|| {
            let options = self.pool.connect_options().as_ref().clone();
            PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(self.pool.options().get_acquire_timeout())
                .connect_lazy_with(options)
        });
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(self.table.channel()).await?;
        Ok(listener)
    }

    /// Whether this relay holds its id: a session-level advisory lock on `<table>:<id>`, on
    /// a connection of its own kept for the relay's life. Leases belong to a relay id, so two
    /// live relays configured with the same id would both publish the same buckets (every
    /// row twice); the second one holds no lease until the first is gone (its connection
    /// closed: a crashed process's lock goes with its session). `Ok(false)` while another
    /// holds it; a lost lock connection is made again at the next renewal.
    async fn hold_id(&mut self) -> Result<bool> {
        use sqlx::Connection as _;
        let err = |e| db_error("locking the relay's id", e);
        if let Some(conn) = self.id_lock.as_mut() {
            if conn.ping().await.is_ok() {
                return Ok(true);
            }
            // The session, and the lock with it, is gone: take it again below.
            self.id_lock = None;
        }
        let options = self.pool.connect_options();
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(err)?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(format!(
                    "evbus-outbox-relay:{}:{}",
                    self.table.name, self.relay
                ))
                .fetch_one(&mut conn)
                .await
                .map_err(err)?;
        if locked {
            if self.id_taken {
                tracing::info!(relay = %self.relay, table = %self.table.name, "outbox relay holds its id now");
            }
            self.id_taken = false;
            self.id_lock = Some(conn);
        } else if !self.id_taken {
            self.id_taken = true;
            tracing::error!(
                relay = %self.relay, table = %self.table.name,
                "another live outbox relay uses this relay id: this one publishes nothing until \
                 it is gone (give every relay its own id, or leave it unset for a generated one)"
            );
        }
        Ok(locked)
    }

    async fn leases(&mut self, ttl: Duration) -> Result<Vec<i32>> {
        if !self.hold_id().await? {
            self.live = 1;
            return Ok(Vec::new());
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        if !self.seeded {
            // Tables made from copied DDL without the lease rows, restored from a
            // schema-only dump, or a truncated lease table: a bucket without a row is never
            // leased, so its events would wait for ever without a word.
            let added = sqlx::query(&self.table.seed_leases())
                .execute(&self.pool)
                .await
                .map_err(|e| {
                    db_error("adding the missing rows of the outbox lease table", e).with_hint(
                        "the relay's role needs INSERT on the lease table, or run \
                         `Outbox::migrate` (its statements: `Outbox::ddl`)",
                    )
                })?
                .rows_affected();
            if added > 0 {
                tracing::warn!(
                    table = %self.table.name, added,
                    "the outbox lease table lacked bucket rows (tables made without \
                     `Outbox::migrate`?); the relay added them"
                );
            }
            self.seeded = true;
        }
        let err = |e| db_error("renewing the relay's leases", e);
        let (leases, relays) = (self.table.leases(), self.table.relays());
        // Heartbeat, and forget relays silent for three lease periods.
        sqlx::query(&format!(
            "INSERT INTO {relays} (id, seen_at) VALUES ($1, now())
             ON CONFLICT (id) DO UPDATE SET seen_at = now()"
        ))
        .bind(&self.relay)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        sqlx::query(&format!(
            "DELETE FROM {relays} WHERE seen_at < now() - $1 * interval '3 millisecond'"
        ))
        .bind(ttl_ms)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {relays} WHERE seen_at > now() - $1 * interval '1 millisecond'"
        ))
        .bind(ttl_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(err)?;
        // Renew what this relay holds. A lease that expired but was not taken by another
        // relay is still ours (taking a lease sets its owner), so renewing it is safe.
        let mut held: Vec<i32> = sqlx::query_scalar(&format!(
            "UPDATE {leases} SET expires_at = now() + $2 * interval '1 millisecond'
             WHERE owner = $1 RETURNING bucket"
        ))
        .bind(&self.relay)
        .bind(ttl_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        held.sort_unstable();
        let live = usize::try_from(live.max(1)).unwrap_or(1);
        self.live = live;
        let target = (BUCKETS as usize).div_ceil(live);
        if held.len() > target {
            // Give back the surplus; called between batches, so nothing of these buckets is
            // in flight here.
            let surplus = held.split_off(target);
            sqlx::query(&format!(
                "UPDATE {leases} SET owner = NULL, expires_at = now()
                 WHERE bucket = ANY($1) AND owner = $2"
            ))
            .bind(&surplus)
            .bind(&self.relay)
            .execute(&self.pool)
            .await
            .map_err(err)?;
            tracing::info!(
                relay = %self.relay, table = %self.table.name, released = surplus.len(),
                live_relays = live, "outbox relay gave back buckets for another relay"
            );
        } else if held.len() < target {
            let want = i64::try_from(target - held.len()).unwrap_or(0);
            let taken: Vec<i32> = sqlx::query_scalar(&format!(
                "UPDATE {leases} SET owner = $1, expires_at = now() + $2 * interval '1 millisecond'
                 WHERE bucket IN (
                     SELECT bucket FROM {leases}
                     WHERE owner IS NULL OR expires_at <= now()
                     ORDER BY random() LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 ) AND (owner IS NULL OR expires_at <= now())
                 RETURNING bucket"
            ))
            .bind(&self.relay)
            .bind(ttl_ms)
            .bind(want)
            .fetch_all(&self.pool)
            .await
            .map_err(err)?;
            if !taken.is_empty() {
                tracing::info!(
                    relay = %self.relay, table = %self.table.name, taken = taken.len(),
                    live_relays = live, "outbox relay took buckets"
                );
                held.extend(taken);
                held.sort_unstable();
            }
        }
        if held.is_empty() {
            // Nothing to lease: look for missing lease rows again at the next renewal.
            self.seeded = false;
        }
        Ok(held)
    }

    async fn step_back(&mut self) -> Result<()> {
        let err = |e| db_error("releasing the relay's leases", e);
        sqlx::query(&format!(
            "UPDATE {} SET owner = NULL, expires_at = now() WHERE owner = $1",
            self.table.leases()
        ))
        .bind(&self.relay)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        sqlx::query(&format!(
            "DELETE FROM {} WHERE id = $1",
            self.table.relays()
        ))
        .bind(&self.relay)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(())
    }
}

fn decode_row<R: sqlx::Row>(r: &R) -> std::result::Result<Row, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i32: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Row {
        seq: r.try_get("seq")?,
        bucket: r.try_get("bucket")?,
        topic: r.try_get("topic")?,
        event: r.try_get("event")?,
    })
}

/// `[1,2,3]` for SQLite's `json_each`.
fn json_array<T: ToString>(values: &[T]) -> String {
    let items: Vec<String> = values.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(","))
}
