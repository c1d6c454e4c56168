//! The SQL the relay runs: leases and heartbeats (PostgreSQL), fetching, deleting and
//! recording failures (both databases), and waiting for new rows.

use std::time::Duration;

use evbus::{Error, ErrorKind, Result};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, SqlitePool};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::table::{BUCKETS, Creates, Table};

/// The longest one attempt to open a relay's `LISTEN` connection takes (the listen pool's
/// acquire timeout, when the application pool's is longer).
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause after a failed attempt to open the `LISTEN` connection, doubling on each
/// failure in a row up to [`LISTEN_RETRY_MAX`]; the relay polls meanwhile.
const LISTEN_RETRY_MIN: Duration = Duration::from_secs(1);

/// The longest pause between attempts to open the `LISTEN` connection.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

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

/// Creates what is missing of the PostgreSQL tables, serialised by an advisory lock so
/// concurrent migrations do not race on `CREATE TABLE IF NOT EXISTS`.
///
/// Each table and index is looked up first (`to_regclass`), and the lease rows counted, and
/// only the statements of what is missing run: PostgreSQL checks the `CREATE` right on the
/// schema before it looks whether the table exists, so `CREATE TABLE IF NOT EXISTS` failed
/// for a role that may only read and write the tables (a migration role creates them, the
/// application's role uses them), with nothing to do.
pub(crate) async fn migrate_postgres(pool: &PgPool, table: &Table) -> Result<()> {
    let what = format!("migrating the outbox table `{}`", table.name);
    let err = |e| lookup_error(&what, e);
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("evbus-outbox:{}", table.name))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    for step in table.postgres_steps() {
        let missing = match &step.creates {
            Creates::Relation(name) => {
                let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(err)?;
                found.is_none()
            }
            // The lease table exists by now: an earlier step made it if it was missing.
            Creates::LeaseRows => {
                let rows: i64 = sqlx::query_scalar(&table.count_lease_rows())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(err)?;
                rows < i64::from(BUCKETS)
            }
        };
        if missing {
            sqlx::query(&step.statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| create_error(table, &step.creates, e))?;
        }
    }
    tx.commit().await.map_err(err)
}

/// The SQLSTATE of a database error.
fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// An error of a migration's look-ups, with a hint when the role may not look.
fn lookup_error(what: &str, e: sqlx::Error) -> Error {
    match sqlstate(&e).as_deref() {
        // insufficient_privilege
        Some("42501") => db_error(what, e).with_hint(
            "`Outbox::migrate` looks up the outbox tables first and creates only what is \
             missing: its role needs USAGE on their schema and SELECT on the lease table",
        ),
        _ => db_error(what, e),
    }
}

/// An error creating what a migration found missing, with a hint naming the fix when the
/// role may not create it (the application's role of a least-privilege split) or the schema
/// does not exist.
fn create_error(table: &Table, creates: &Creates, e: sqlx::Error) -> Error {
    let state = sqlstate(&e);
    let (what, hint) = match creates {
        Creates::Relation(name) => (
            format!(
                "creating {name}, which the outbox table `{}` lacks",
                table.name
            ),
            format!(
                "`Outbox::migrate` creates only what is missing, and {name} is, which this \
                 role may not create: run `Outbox::migrate` once as a role that may (the \
                 migration role: the schema's owner, or one with CREATE on it), or put the \
                 statements of `Outbox::ddl` into your migrations; with everything in \
                 place, `migrate` only reads (SELECT on the lease table)"
            ),
        ),
        Creates::LeaseRows => (
            format!(
                "adding the missing bucket rows of the outbox lease table {}",
                table.leases()
            ),
            format!(
                "the role needs INSERT on {}, or run `Outbox::migrate` once as the migration \
                 role (its statements: `Outbox::ddl`)",
                table.leases()
            ),
        ),
    };
    let error = db_error(&what, e);
    match state.as_deref() {
        // insufficient_privilege
        Some("42501") => error.with_hint(&hint),
        // invalid_schema_name
        Some("3F000") => error.with_hint(&format!(
            "create the schema `{}` first: `Outbox::migrate` creates the outbox tables, not \
             their schema",
            table.schema_prefix.trim_end_matches('.')
        )),
        _ => error,
    }
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
    /// The `LISTEN` connection being opened, in a task of its own: opening it may take up to
    /// the listen pool's acquire timeout (sqlx retries a server at its connection limit, or
    /// refusing connections, until then), and a wait, a shutdown or the renewal of the
    /// leases must not wait for it. Waits race it against their own end.
    connecting: Option<JoinHandle<std::result::Result<PgListener, sqlx::Error>>>,
    /// No new `LISTEN` attempt before this (after a failed one), and the pause after the
    /// next failure: [`LISTEN_RETRY_MIN`] doubling to [`LISTEN_RETRY_MAX`].
    listen_retry_at: Instant,
    listen_retry: Duration,
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
            connecting: None,
            listen_retry_at: Instant::now(),
            listen_retry: LISTEN_RETRY_MIN,
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

    /// The oldest rows of `buckets`, at most `limit` rows and `max_bytes` of events (but
    /// at least one row, however large), in staging order (so each bucket's rows are a
    /// prefix of its backlog).
    ///
    /// The rows are chosen as by `limit` alone, then cut to their longest prefix in staging
    /// order whose events add up to at most `max_bytes`: a prefix of rows in staging order
    /// holds a prefix of each bucket's rows. The sizes are summed in the database
    /// (`octet_length`, read from the row's header or TOAST pointer without reading the
    /// event), so that only the rows kept are sent: `limit` rows of large events would be
    /// that much memory in the relay at once.
    pub(crate) async fn fetch(
        &self,
        buckets: &[i32],
        limit: i64,
        max_bytes: i64,
    ) -> Result<Vec<Row>> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let rows = match self {
            Store::Postgres(pg) => {
                // The first `limit` sequence numbers of each bucket (index-only on
                // (bucket, seq)), the first `limit` of those overall, the prefix of those
                // within `max_bytes` (the first always), then their rows.
                let sql = format!(
                    "SELECT o.seq, o.bucket, o.topic, o.event FROM {t} o
                     WHERE o.seq IN (
                         SELECT w.seq FROM (
                             SELECT c.seq,
                                 sum(octet_length(c.event)) OVER (ORDER BY c.seq) AS upto,
                                 row_number() OVER (ORDER BY c.seq) AS n
                             FROM {t} c
                             WHERE c.seq IN (
                                 SELECT r.seq FROM unnest($1::int[]) AS b(bucket)
                                 CROSS JOIN LATERAL (
                                     SELECT x.seq FROM {t} x
                                     WHERE x.bucket = b.bucket ORDER BY x.seq LIMIT $2
                                 ) r
                                 ORDER BY r.seq LIMIT $2
                             )
                         ) w
                         WHERE w.upto <= $3 OR w.n = 1
                     )
                     ORDER BY o.seq",
                    t = pg.table.sql()
                );
                sqlx::query(&sql)
                    .bind(buckets)
                    .bind(limit)
                    .bind(max_bytes)
                    .fetch_all(&pg.pool)
                    .await
                    .and_then(|rows| rows.iter().map(decode_row).collect())
            }
            Store::Sqlite(lite) => {
                // One process holds every bucket: only buckets in back-off are left out. The
                // first `limit` rows' sizes (`octet_length` reads a value's size without
                // the value), the prefix of those within `max_bytes` (the first always),
                // then their rows.
                let sql = format!(
                    "SELECT o.seq, o.bucket, o.topic, o.event FROM {t} o
                     WHERE o.seq IN (
                         SELECT w.seq FROM (
                             SELECT f.seq,
                                 sum(f.len) OVER (ORDER BY f.seq) AS upto,
                                 row_number() OVER (ORDER BY f.seq) AS n
                             FROM (
                                 SELECT seq, octet_length(event) AS len FROM {t}
                                 WHERE bucket IN (SELECT value FROM json_each(?1))
                                 ORDER BY seq LIMIT ?2
                             ) f
                         ) w
                         WHERE w.upto <= ?3 OR w.n = 1
                     )
                     ORDER BY o.seq",
                    t = lite.table.sql()
                );
                sqlx::query(&sql)
                    .bind(json_array(buckets))
                    .bind(limit)
                    .bind(max_bytes)
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
    /// just the timeout (polling). Returns early when `cancel` fires. Never longer: while
    /// the `LISTEN` connection cannot be opened it polls, and an attempt to open it runs
    /// beside the waits (see [`PgStore::connecting`]).
    pub(crate) async fn wait(&mut self, timeout: Duration, cancel: &CancellationToken) {
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        match self {
            Store::Postgres(pg) if pg.notify => {
                if pg.listener.is_none() {
                    pg.start_listening();
                    if let Some(connecting) = pg.connecting.as_mut() {
                        tokio::select! {
                            _ = &mut sleep => return,
                            _ = cancel.cancelled() => return,
                            opened = connecting => {
                                pg.connecting = None;
                                pg.listening(opened);
                            }
                        }
                    }
                }
                if let Some(listener) = pg.listener.as_mut() {
                    tokio::select! {
                        _ = &mut sleep => {}
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
                    _ = &mut sleep => {}
                    _ = cancel.cancelled() => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = &mut sleep => {}
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
                if let Some(connecting) = pg.connecting.take() {
                    connecting.abort();
                }
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

impl Drop for PgStore {
    /// A relay task that ends without [`Store::release`] (aborted) stops opening its
    /// `LISTEN` connection too.
    fn drop(&mut self) {
        if let Some(connecting) = self.connecting.take() {
            connecting.abort();
        }
    }
}

impl PgStore {
    /// Starts opening the `LISTEN` connection in a task of its own, unless one is being
    /// opened or the last attempt failed too recently.
    fn start_listening(&mut self) {
        if self.connecting.is_some() || Instant::now() < self.listen_retry_at {
            return;
        }
        let pool = self
            .listen_pool
            .get_or_insert_with(|| {
                let options = self.pool.connect_options().as_ref().clone();
                PgPoolOptions::new()
                    .max_connections(1)
                    .min_connections(0)
                    // Bounds one attempt (the waits do not wait for it): a failed attempt
                    // is logged and retried after a pause, not retried by sqlx in silence
                    // for the application pool's acquire timeout (30 s by default).
                    .acquire_timeout(
                        self.pool
                            .options()
                            .get_acquire_timeout()
                            .min(LISTEN_CONNECT_TIMEOUT),
                    )
                    .connect_lazy_with(options)
            })
            .clone();
        let channel = self.table.channel().to_owned();
        self.connecting = Some(tokio::spawn(async move {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok(listener)
        }));
    }

    /// Takes the outcome of an attempt to open the `LISTEN` connection: the listener, or a
    /// warning and the next attempt after a pause (meanwhile the relay polls).
    fn listening(
        &mut self,
        opened: std::result::Result<
            std::result::Result<PgListener, sqlx::Error>,
            tokio::task::JoinError,
        >,
    ) {
        let error = match opened {
            Ok(Ok(listener)) => {
                self.listener = Some(listener);
                self.listen_retry = LISTEN_RETRY_MIN;
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            table = %self.table.name,
            error = %error,
            retry_in_ms = self.listen_retry.as_millis() as u64,
            "outbox relay cannot LISTEN; polling until it can"
        );
        self.listen_retry_at = Instant::now() + self.listen_retry;
        self.listen_retry = self.listen_retry.saturating_mul(2).min(LISTEN_RETRY_MAX);
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
            // leased, so its events would wait for ever without a word. Looked up first: a
            // relay's role may lack INSERT on the lease table, which it needs only here.
            let have: i64 = sqlx::query_scalar(&self.table.count_lease_rows())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| db_error("counting the rows of the outbox lease table", e))?;
            if have < i64::from(BUCKETS) {
                match sqlx::query(&self.table.seed_leases())
                    .execute(&self.pool)
                    .await
                {
                    Ok(done) => tracing::warn!(
                        table = %self.table.name, added = done.rows_affected(),
                        "the outbox lease table lacked bucket rows (tables made without \
                         `Outbox::migrate`?); the relay added them"
                    ),
                    Err(e) => tracing::error!(
                        table = %self.table.name, rows = have, buckets = BUCKETS,
                        error = %db_error("adding the missing rows of the outbox lease table", e),
                        "the outbox lease table lacks bucket rows and this relay may not add \
                         them: events of the missing buckets wait until they are added (run \
                         `Outbox::migrate`, its statements are `Outbox::ddl`, or grant the \
                         relay INSERT on the lease table)"
                    ),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages `sizes.len()` rows into `store`'s table, alternately in buckets 0 and 1, the
    /// `i`-th with an event of `sizes[i]` bytes (the fetch does not read the JSON).
    async fn insert_rows(store: &Store, sizes: &[usize]) {
        for (i, size) in sizes.iter().enumerate() {
            let bucket = i32::try_from(i % 2).unwrap();
            let event = "x".repeat(*size);
            let id = format!("e{i}");
            let result = match store {
                Store::Postgres(pg) => sqlx::query(&pg.table.insert('$'))
                    .bind(bucket)
                    .bind("t")
                    .bind(&id)
                    .bind("ty")
                    .bind(None::<String>)
                    .bind(&event)
                    .execute(&pg.pool)
                    .await
                    .map(drop),
                Store::Sqlite(lite) => sqlx::query(&lite.table.insert('?'))
                    .bind(bucket)
                    .bind("t")
                    .bind(&id)
                    .bind("ty")
                    .bind(None::<String>)
                    .bind(&event)
                    .execute(&lite.pool)
                    .await
                    .map(drop),
            };
            result.unwrap();
        }
    }

    /// The positions (0-based, in staging order) of the rows a fetch returned.
    async fn fetched(store: &Store, buckets: &[i32], rows: i64, bytes: i64) -> Vec<i64> {
        let fetched = store.fetch(buckets, rows, bytes).await.unwrap();
        let first = match store {
            Store::Postgres(pg) => {
                sqlx::query_scalar::<_, i64>(&format!("SELECT min(seq) FROM {}", pg.table.sql()))
                    .fetch_one(&pg.pool)
                    .await
                    .unwrap()
            }
            Store::Sqlite(lite) => {
                sqlx::query_scalar::<_, i64>(&format!("SELECT min(seq) FROM {}", lite.table.sql()))
                    .fetch_one(&lite.pool)
                    .await
                    .unwrap()
            }
        };
        fetched.iter().map(|r| r.seq - first).collect()
    }

    /// A fetch reads at most `max_bytes` of events, and always at least one row, however
    /// large: ten rows of 1,000 bytes, read with a budget of 2,500 bytes, gave all ten (the
    /// relay held `batch_size` rows of whatever size in memory at once: 256 rows of 16 MiB
    /// are 4 GiB). The rows kept are the first in staging order, so each bucket's rows are
    /// still a prefix of its backlog.
    async fn a_fetch_stops_at_its_byte_budget(store: &Store) {
        insert_rows(store, &[1_000; 10]).await;
        // Both buckets: the first two rows (2,000 bytes; a third would be 3,000).
        assert_eq!(fetched(store, &[0, 1], 256, 2_500).await, [0, 1]);
        // A budget smaller than the first row: that row alone, never nothing.
        assert_eq!(fetched(store, &[0, 1], 256, 10).await, [0]);
        // One bucket (the rows at even positions): the first two of its backlog.
        assert_eq!(fetched(store, &[0], 256, 2_500).await, [0, 2]);
        assert_eq!(fetched(store, &[1], 256, 2_500).await, [1, 3]);
        // The row limit still holds, and a budget over the backlog reads all of it.
        assert_eq!(fetched(store, &[0, 1], 3, 1 << 20).await, [0, 1, 2]);
        assert_eq!(
            fetched(store, &[0, 1], 256, 1 << 20).await,
            (0..10).collect::<Vec<i64>>()
        );
        // Exactly at the budget: the row that reaches it is read.
        assert_eq!(fetched(store, &[0, 1], 256, 3_000).await, [0, 1, 2]);
    }

    #[tokio::test]
    async fn a_sqlite_fetch_stops_at_its_byte_budget_but_reads_at_least_one_row() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let table = Table::new("fetch_bytes").unwrap();
        migrate_sqlite(&pool, &table).await.unwrap();
        let store = Store::sqlite(pool, table);
        a_fetch_stops_at_its_byte_budget(&store).await;
    }

    #[tokio::test]
    async fn a_postgres_fetch_stops_at_its_byte_budget_but_reads_at_least_one_row() {
        let url = std::env::var("EVBUS_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = match PgPool::connect(&url).await {
            Ok(pool) => pool,
            Err(e) => {
                assert!(
                    !evbus_conformance::require_brokers(),
                    "PostgreSQL at {} is unreachable: {e}",
                    evbus::registry::redact(&url)
                );
                eprintln!(
                    "WARNING: PostgreSQL at {} is unreachable ({e}); this test did NOT run",
                    evbus::registry::redact(&url)
                );
                return;
            }
        };
        let name = format!("outbox_fetch_{}", uuid::Uuid::now_v7().simple());
        let table = Table::new(&name).unwrap();
        migrate_postgres(&pool, &table).await.unwrap();
        let store = Store::postgres(pool.clone(), table, "r".to_owned(), false);
        a_fetch_stops_at_its_byte_budget(&store).await;
        sqlx::query(&format!("DROP TABLE {name}, {name}_leases, {name}_relays"))
            .execute(&pool)
            .await
            .unwrap();
    }
}
