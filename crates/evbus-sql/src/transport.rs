//! [`SqlTransport`]: the [`kit::Broker`] over PostgreSQL or SQLite, and the transport type.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use evbus::raw::kit::{self, Broker, Connection, Destination};
use evbus::raw::{Backoff, RawStream, Source};
use evbus::{
    Capabilities, Event, Health, Queue, Result, StartPosition, SubscribeOptions, Subscription,
    Topic, Transport,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, SqlConfig};
use crate::consumer::{self, Buffer, Claim};
use crate::error::sql;
use crate::notify::Notifier;
use crate::sqlite_file::SqliteFile;
use crate::wake::Wakers;

/// The database of a transport.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// What a transport shares between its handles, consumers and background tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) config: SqlConfig,
    /// Consumers waiting for rows, by destination key.
    pub(crate) wakers: Arc<Wakers>,
    /// The PostgreSQL NOTIFY channel of this schema.
    pub(crate) channel: String,
    /// PostgreSQL: the destinations published to, for the notifying task.
    pub(crate) notifier: Arc<Notifier>,
    /// Stops the background tasks (cleanup, LISTEN, NOTIFY).
    stop: CancellationToken,
    /// Consumers giving back rows they claimed and never handed out: close waits for them
    /// before it closes the pool, or the rows would come back only after their visibility
    /// timeout, counted as an attempt.
    pub(crate) give_backs: tokio_util::task::TaskTracker,
    /// Every consumer's claimed rows not handed out yet: a subscription still held when the
    /// transport closes is not read any more, and close gives its rows back.
    buffers: std::sync::Mutex<Vec<std::sync::Weak<Buffer>>>,
    /// SQLite: this process's hold on the file (released at close).
    file: std::sync::Mutex<Option<Arc<SqliteFile>>>,
    /// PostgreSQL: the anonymous subscriptions the cleanup watches (see [`Unmarked`]).
    unmarked: std::sync::Mutex<Unmarked>,
}

/// The anonymous subscriptions of a PostgreSQL schema as this process's cleanup last found
/// them: by partition id, the mark its keep-alive last wrote (`seen_at`, in microseconds) and
/// when (by this process's monotonic clock) the cleanup first found that mark. A partition
/// is deleted once its mark has stayed the same for its TTL by this clock, not when the
/// server's `now()` is past `seen_at` plus the TTL: a step of the server's clock (NTP after a
/// pause, a restored VM or snapshot) would make every live anonymous subscription look
/// abandoned at once and the next cleanup delete them, ending their streams. A keep-alive
/// changes the mark every third of the TTL, whatever the clock does. A cleanup that has just
/// started waits one TTL before it deletes anything.
#[derive(Debug, Default)]
struct Unmarked(std::collections::HashMap<i64, (i64, std::time::Instant)>);

impl Unmarked {
    /// Takes in what a cleanup found (`(id, mark, ttl_ms)` of every anonymous partition) at
    /// `now`, forgets the partitions gone since, and returns the `(id, mark)` of those whose
    /// mark stayed the same for their TTL.
    fn due(&mut self, found: &[(i64, i64, i64)], now: std::time::Instant) -> Vec<(i64, i64)> {
        let ids: std::collections::HashSet<i64> = found.iter().map(|f| f.0).collect();
        self.0.retain(|id, _| ids.contains(id));
        let mut due = Vec::new();
        for &(id, mark, ttl_ms) in found {
            let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
            match self.0.get(&id) {
                Some(&(seen, since)) if seen == mark => {
                    if now.saturating_duration_since(since) >= ttl {
                        due.push((id, mark));
                    }
                }
                _ => {
                    self.0.insert(id, (mark, now));
                }
            }
        }
        due
    }
}

impl Shared {
    pub(crate) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The broker side of the SQL transport (see the crate README, "Transport").
#[derive(Clone, Debug)]
pub struct SqlBroker {
    pub(crate) shared: Arc<Shared>,
}

/// The SQL transport: PostgreSQL (`postgres://`) or one SQLite file (`sqlite:`).
///
/// ```no_run
/// use evbus::Transport;
/// use evbus_sql::{SqlConfig, SqlTransport};
///
/// # async fn demo() -> evbus::Result<()> {
/// let transport = SqlTransport::connect(SqlConfig::from_url("sqlite:///var/lib/evbus/bus.db")?).await?;
/// let topic = transport.topic("orders").await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqlTransport(Connection<SqlBroker>);

/// The key of a destination in wake-ups and NOTIFY payloads.
pub(crate) fn key_of(kind: &str, name: &str) -> String {
    format!("{kind}:{name}")
}

/// The most bytes of event bodies one publish statement carries. PostgreSQL refuses a
/// protocol message over 1 GiB by dropping the connection (which reads as an outage, and a
/// retry meets it again), and SQLite a string over its `SQLITE_MAX_LENGTH` (1e9 bytes by
/// default): a batch over this is written in several statements of one transaction.
const MAX_STATEMENT_BYTES: usize = 256 << 20;

/// `bodies` in order, in parts of at most [`MAX_STATEMENT_BYTES`] (a body over it alone in
/// its part); one part for an empty batch.
fn statement_parts(bodies: Vec<String>) -> Vec<Vec<String>> {
    parts_of(bodies, MAX_STATEMENT_BYTES)
}

/// [`statement_parts`] with a budget of `max` bytes.
fn parts_of(bodies: Vec<String>, max: usize) -> Vec<Vec<String>> {
    let mut parts: Vec<Vec<String>> = vec![Vec::new()];
    let mut bytes = 0;
    for body in bodies {
        let last = parts.last_mut().expect("never empty");
        if !last.is_empty() && bytes + body.len() > max {
            bytes = 0;
            parts.push(Vec::new());
        }
        bytes += body.len();
        parts.last_mut().expect("never empty").push(body);
    }
    parts
}

/// The time SQLite rows carry (`seen_at`, `visible_at`, `created_at`), in milliseconds since
/// the Unix epoch: the wall clock when this process first asked, plus the monotonic time
/// since. An SQLite bus belongs to one process, so these times are only ever compared within
/// it (and with older rows of processes before it); a step of the wall clock while it runs
/// (NTP, a resumed VM) must not make its own live anonymous subscriptions look abandoned to
/// the cleanup (a forward step past `anonymous_ttl` deleted them), nor hold back or release
/// at once the deliveries it delayed. PostgreSQL uses the server's `now()` instead.
pub(crate) fn now_ms() -> i64 {
    static ANCHOR: std::sync::OnceLock<Anchor> = std::sync::OnceLock::new();
    ANCHOR
        .get_or_init(Anchor::now)
        .at(std::time::Instant::now())
}

/// A wall-clock time and the monotonic instant it was read at.
struct Anchor {
    wall_ms: i64,
    at: std::time::Instant,
}

impl Anchor {
    fn now() -> Anchor {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Anchor {
            wall_ms: i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX),
            at: std::time::Instant::now(),
        }
    }

    /// The wall-clock time at `instant`, as the monotonic clock measures it from the anchor.
    fn at(&self, instant: std::time::Instant) -> i64 {
        let elapsed = instant.saturating_duration_since(self.at).as_millis();
        self.wall_ms
            .saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }
}

/// The longest duration written into SQL (a visibility timeout, a nack delay, retention, an
/// anonymous subscription's TTL): 100 years; longer ones are capped to it. PostgreSQL's
/// `now() + make_interval(..)` fails with "timestamp out of range" long before
/// `Duration::MAX` (9.2e15 s), and failed every claim of the partition, for ever.
pub(crate) const MAX_SQL_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d` in whole milliseconds, for SQL: at most [`MAX_SQL_DURATION`].
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_SQL_DURATION).as_millis()).unwrap_or(i64::MAX)
}

impl SqlTransport {
    /// Opens the database, creates or migrates the transport's tables (under a lock, so any
    /// number of processes may connect at once) and starts the cleanup (and, for PostgreSQL,
    /// the `LISTEN` connection).
    ///
    /// Errors: [`ErrorKind::InvalidConfig`](evbus::ErrorKind::InvalidConfig) for a bad
    /// configuration, refused credentials, or an SQLite file another process holds;
    /// [`ErrorKind::Connection`](evbus::ErrorKind::Connection) /
    /// [`Timeout`](evbus::ErrorKind::Timeout) when the database cannot be reached.
    pub async fn connect(config: SqlConfig) -> Result<SqlTransport> {
        config.validate()?;
        let stop = CancellationToken::new();
        let (db, wakers, file) = match config.backend {
            Backend::Postgres => (
                open_postgres(&config).await?,
                Arc::new(Wakers::default()),
                None,
            ),
            Backend::Sqlite => {
                let path = config
                    .sqlite_path()
                    .ok_or_else(|| evbus::Error::invalid_config("the SQLite URL names no file"))?;
                let file = SqliteFile::open(&path)?;
                let db = open_sqlite(&config, file.path()).await?;
                (db, Arc::clone(file.wakers()), Some(file))
            }
        };
        let shared = Arc::new(Shared {
            channel: format!("evbus_wake_{}", config.schema),
            db,
            config,
            wakers,
            notifier: Arc::default(),
            stop,
            give_backs: tokio_util::task::TaskTracker::new(),
            buffers: std::sync::Mutex::default(),
            file: std::sync::Mutex::new(file),
            unmarked: std::sync::Mutex::default(),
        });
        spawn_cleanup(Arc::downgrade(&shared), shared.stop.clone());
        if let Db::Postgres(_) = &shared.db {
            crate::listen::spawn(&shared)?;
            crate::notify::spawn(&shared);
        }
        Ok(SqlTransport(Connection::new(SqlBroker { shared })))
    }

    /// Opens `url` (see [`SqlConfig::from_url`]).
    pub async fn connect_url(url: &str) -> Result<SqlTransport> {
        SqlTransport::connect(SqlConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &SqlConfig {
        &self.0.broker().shared.config
    }

    /// Deletes subscription `subscription` of topic `topic`, with every delivery it has not
    /// acknowledged; returns whether it existed. Retention deletes only events that every
    /// subscription acknowledged, so a named subscription nobody consumes any more (its group
    /// renamed or retired) keeps everything published since, for ever: this is how it goes.
    /// Its consumers, in any process, end within about two seconds (as when the topic is
    /// deleted); subscribing with that name again makes a new subscription, starting where
    /// [`SubscribeOptions::start`](evbus::SubscribeOptions::start) says. A Bus handler's
    /// subscription is named by [`Bus::subscription_name`](evbus::Bus::subscription_name).
    pub async fn delete_subscription(&self, topic: &str, subscription: &str) -> Result<bool> {
        if self.0.is_closed() {
            return Err(evbus::Error::closed("the SQL transport"));
        }
        evbus::raw::check_name("topic", topic)?;
        evbus::raw::check_name("subscription", subscription)?;
        let what = Destination::Topic {
            topic: topic.to_owned(),
            subscription: Some(subscription.to_owned()),
        };
        Ok(self.0.broker().delete_rows(&what).await? > 0)
    }

    /// Runs the cleanup now instead of waiting for
    /// [`cleanup_interval`](SqlConfig::cleanup_interval): deletes events that every
    /// subscription acknowledged and that are older than
    /// [`retention`](SqlConfig::retention), and anonymous subscriptions not seen for
    /// [`anonymous_ttl`](SqlConfig::anonymous_ttl). Returns how many events it deleted.
    pub async fn cleanup(&self) -> Result<u64> {
        if self.0.is_closed() {
            return Err(evbus::Error::closed("the SQL transport"));
        }
        cleanup(&self.0.broker().shared).await
    }
}

#[async_trait]
impl Transport for SqlTransport {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let inner = self.0.topic(name).await?;
        Ok(Arc::new(SqlTopic {
            inner,
            transport: self.clone(),
        }))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        self.0.queue(name).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.0.delete_topic(name).await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        self.0.delete_queue(name).await
    }

    async fn health(&self) -> Health {
        self.0.health().await
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

async fn open_postgres(config: &SqlConfig) -> Result<Db> {
    let options: PgConnectOptions = config.url.parse().map_err(|e| {
        evbus::Error::client(
            evbus::ErrorKind::InvalidConfig,
            "reading the PostgreSQL URL",
            e,
        )
    })?;
    let options = options
        .application_name("evbus")
        .options([("search_path", config.schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.connect_timeout)
        .idle_timeout(Some(Duration::from_secs(60)))
        .test_before_acquire(true)
        .connect_with(options)
        .await
        .map_err(sql("connecting to PostgreSQL"))?;
    // Concurrent `CREATE SCHEMA IF NOT EXISTS` can still collide: serialize on a lock of
    // this schema. The migrator then takes its own advisory lock.
    let mut tx = pool.begin().await.map_err(sql("creating the schema"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('evbus-sql schema ' || $1))")
        .bind(&config.schema)
        .execute(&mut *tx)
        .await
        .map_err(sql("locking the schema"))?;
    // Looked up first: `CREATE SCHEMA IF NOT EXISTS` needs the database's CREATE privilege
    // even when the schema exists, which a role that owns a schema made for it by a DBA
    // may not have.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&config.schema)
            .fetch_one(&mut *tx)
            .await
            .map_err(sql("looking the schema up"))?;
    if !exists {
        sqlx::query(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            config.schema
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            sql("creating the schema")(e).with_hint(
                "the role needs CREATE on the database to make the schema; or have it made \
                 (CREATE SCHEMA ... AUTHORIZATION <role>) and connect again",
            )
        })?;
    }
    tx.commit().await.map_err(sql("creating the schema"))?;
    migrator(sqlx::migrate!("./migrations/postgres"))
        .run(&pool)
        .await
        .map_err(|e| migrate_error(e, "PostgreSQL"))?;
    Ok(Db::Postgres(pool))
}

/// Creates a missing database file readable by its owner only (0600): it holds every event's
/// data, fields a gateway redacts included, and SQLite would create it world-readable under
/// the usual umask. Its `-wal` and `-shm` files take the same permissions. An existing file
/// keeps the permissions it has.
fn create_private(path: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(evbus::Error::client(
                    evbus::ErrorKind::InvalidConfig,
                    format!("creating the SQLite file {}", path.display()),
                    e,
                ));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

async fn open_sqlite(config: &SqlConfig, path: &std::path::Path) -> Result<Db> {
    create_private(path)?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL + NORMAL: a committed transaction survives the process being killed (the WAL
        // is written before commit returns); only an OS crash or power loss may lose the
        // last transactions. FULL would fsync on every commit.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(config.connect_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| {
            evbus::Error::client(
                evbus::ErrorKind::InvalidConfig,
                format!("opening the SQLite file {}", path.display()),
                e,
            )
        })?;
    migrator(sqlx::migrate!("./migrations/sqlite"))
        .run(&pool)
        .await
        .map_err(|e| migrate_error(e, "SQLite"))?;
    Ok(Db::Sqlite(pool))
}

/// The embedded migrations, run so that tables a newer evbus migrated are accepted: every
/// migration only adds (tables, columns with defaults, functions replaced under the same
/// signature, indexes), so a process of the previous version keeps working during a rolling
/// upgrade, and an older `evbus` CLI can still open the database.
fn migrator(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

fn migrate_error(e: sqlx::migrate::MigrateError, db: &str) -> evbus::Error {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => sql("creating the transport's tables")(e),
        other => evbus::Error::client(
            evbus::ErrorKind::Broker,
            format!("migrating the evbus tables of the {db} database"),
            other,
        )
        .with_hint("the database holds evbus tables of a newer or different version"),
    }
}

/// Runs the cleanup every `cleanup_interval` until the transport closes or is dropped.
fn spawn_cleanup(shared: Weak<Shared>, stop: CancellationToken) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(interval) = shared.upgrade().map(|s| s.config.cleanup_interval) else {
                return;
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let Some(shared) = shared.upgrade() else { return };
            if let Err(e) = cleanup(&shared).await {
                tracing::warn!(error = %e, "evbus-sql cleanup failed; retrying at the next interval");
            }
        }
    });
}

/// One batch of the cleanup deletes at most this many events.
const CLEANUP_BATCH: i64 = 10_000;

/// Most delayed rows one claim moves back ([`PROMOTE_SQLITE`], [`PROMOTE_POSTGRES`]): a wave
/// of rows coming due at once (an outage's) is moved back over several claims, not in one
/// statement holding SQLite's write lock, or the rows' locks on PostgreSQL, for seconds.
const PROMOTE_BATCH: i64 = 1024;

/// Moves at most `?3` delayed rows of partition `?1` that came due at `?2` (ms) back among
/// the rows a claim reads (`delayed_until` 0), earliest due first. A range of
/// `evbus_deliveries_claim (part, delayed_until, id)`: with none due it reads one index
/// entry. The rows keep their id, so they are delivered ahead of the events published after
/// them. The index is named in both statements: a database nobody analysed gives SQLite's
/// planner no statistics to choose by.
const PROMOTE_SQLITE: &str = "UPDATE evbus_deliveries SET delayed_until = 0 \
     WHERE id IN (SELECT id FROM evbus_deliveries INDEXED BY evbus_deliveries_claim \
       WHERE part = ?1 AND delayed_until > 0 AND delayed_until <= ?2 \
       ORDER BY delayed_until LIMIT ?3)";

/// Claims, at `?1` (ms), for `?2` ms, at most `?4` visible rows of partition `?3` that are
/// not delayed, oldest first, counting the attempt. Reads the partition's rows that are not
/// delayed (`delayed_until` 0) in id order, through `evbus_deliveries_claim (part,
/// delayed_until, id)`: delayed rows sort out of that range and are never stepped over.
const CLAIM_SQLITE: &str = "UPDATE evbus_deliveries SET visible_at = ?1 + ?2, \
     attempt = MAX(MIN(attempt, 2147483646), 0) + 1 \
     WHERE id IN (SELECT id FROM evbus_deliveries INDEXED BY evbus_deliveries_claim \
       WHERE part = ?3 AND delayed_until = 0 AND visible_at <= ?1 ORDER BY id LIMIT ?4) \
     RETURNING id, attempt, event";

/// Renews, at `?1` (ms), for `?2` ms, the claims `?3` lists (a JSON array of `[id, attempt]`
/// pairs) that are still theirs, not delayed and not run out, returning the ids renewed. The
/// pairs drive the join: each is one look-up of the primary key, whatever the table holds.
/// Nacks claim (`$1` id, `$2` attempt) on PostgreSQL, visible again in `$3` ms. Given back
/// at once (`$3` = 0), the row is visible since ever (`-infinity`), not since `now()`: a
/// renewal of claims made ahead ([`RENEW_POSTGRES`]) that started before this nack and
/// finds the row only after it (a row handed out meanwhile and nacked at once) compares
/// `visible_at` with its own, earlier, `now()`, and would otherwise find it still claimed
/// and hold it back for a whole visibility timeout.
const NACK_POSTGRES: &str = "UPDATE evbus_deliveries \
     SET visible_at = CASE WHEN $3 > 0 \
       THEN now() + make_interval(secs => $3::float8 / 1000) ELSE '-infinity' END, \
     delayed_until = CASE WHEN $3 > 0 \
       THEN now() + make_interval(secs => $3::float8 / 1000) ELSE '-infinity' END \
     WHERE id = $1 AND attempt = $2";

/// [`NACK_POSTGRES`] on SQLite: `?3` is when it is visible again, 0 if at once (the
/// renewal's `?1` may have been read before the nack's time).
const NACK_SQLITE: &str = "UPDATE evbus_deliveries SET visible_at = ?3, delayed_until = ?3 \
     WHERE id = ?1 AND attempt = ?2";

/// Renews the claims made ahead (`$1` ids, `$2` attempts) for `$3` ms on PostgreSQL; returns
/// the ids renewed. As `unclaim`: the rows are locked once, in id order, in a materialized
/// CTE, and a row another statement holds is skipped, never waited for. This statement thus
/// never waits on a row lock and cannot be part of a deadlock (a deletion's cascade takes
/// the rows in its scan's order); what it skipped is being deleted or given back, so it is
/// not renewed.
const RENEW_POSTGRES: &str = "WITH mine AS MATERIALIZED (SELECT d.id, d.attempt \
       FROM evbus_deliveries d \
       JOIN unnest($1::int8[], $2::int4[]) AS r(id, attempt) \
       ON d.id = r.id AND d.attempt = r.attempt \
       WHERE d.delayed_until = '-infinity' AND d.visible_at > now() \
       ORDER BY d.id FOR UPDATE OF d SKIP LOCKED) \
     UPDATE evbus_deliveries d \
     SET visible_at = now() + make_interval(secs => $3::float8 / 1000) \
     FROM mine WHERE d.id = mine.id AND d.attempt = mine.attempt \
     RETURNING d.id";

const RENEW_SQLITE: &str = "UPDATE evbus_deliveries SET visible_at = ?1 + ?2 \
     FROM (SELECT value ->> 0 AS id, value ->> 1 AS attempt FROM json_each(?3)) AS r \
     WHERE evbus_deliveries.id = r.id AND evbus_deliveries.attempt = r.attempt \
     AND evbus_deliveries.delayed_until = 0 AND evbus_deliveries.visible_at > ?1 \
     RETURNING evbus_deliveries.id";

/// [`PROMOTE_SQLITE`] on PostgreSQL: partition `$1`, at most `$2` rows. Rows another
/// consumer is moving (or claiming) at the same time are skipped, not waited for: two moves
/// never wait on each other's row locks, let alone deadlock.
const PROMOTE_POSTGRES: &str = "WITH due AS MATERIALIZED (SELECT id FROM evbus_deliveries \
       WHERE part = $1 AND delayed_until > '-infinity' AND delayed_until <= now() \
       ORDER BY delayed_until LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE evbus_deliveries d SET delayed_until = '-infinity' FROM due WHERE d.id = due.id";

async fn cleanup(shared: &Shared) -> Result<u64> {
    let retention = ms(shared.config.retention);
    let ttl = ms(shared.config.anonymous_ttl);
    let mut deleted = 0;
    match &shared.db {
        Db::Postgres(pool) => {
            // Abandoned anonymous subscriptions: by the marks their keep-alives write, timed
            // by this process's clock, not the server's (see `Unmarked`).
            let found: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT id, (extract(epoch FROM seen_at) * 1000000)::int8, COALESCE(ttl_ms, $1) \
                 FROM evbus_parts WHERE kind = 'topic' AND name LIKE '\\_anonymous.%'",
            )
            .bind(ttl)
            .fetch_all(pool)
            .await
            .map_err(sql("looking for abandoned anonymous subscriptions"))?;
            let due = shared
                .unmarked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .due(&found, std::time::Instant::now());
            if !due.is_empty() {
                let (ids, marks): (Vec<i64>, Vec<i64>) = due.into_iter().unzip();
                // Only if still unmarked: a keep-alive may have come since the look.
                sqlx::query(
                    "DELETE FROM evbus_parts p USING unnest($1::int8[], $2::int8[]) AS d(id, mark) \
                     WHERE p.id = d.id AND (extract(epoch FROM p.seen_at) * 1000000)::int8 = d.mark",
                )
                .bind(ids)
                .bind(marks)
                .execute(pool)
                .await
                .map_err(sql("deleting abandoned anonymous subscriptions"))?;
            }
            loop {
                let n = sqlx::query(
                    "DELETE FROM evbus_events WHERE id IN (SELECT e.id FROM evbus_events e \
                     WHERE e.created_at < now() - make_interval(secs => $1::float8 / 1000) \
                     AND NOT EXISTS (SELECT 1 FROM evbus_deliveries d WHERE d.event = e.id) \
                     ORDER BY e.id LIMIT $2)",
                )
                .bind(retention)
                .bind(CLEANUP_BATCH)
                .execute(pool)
                .await
                .map_err(sql("deleting events past retention"))?
                .rows_affected();
                deleted += n;
                if n < CLEANUP_BATCH as u64 {
                    break;
                }
            }
        }
        Db::Sqlite(pool) => {
            let now = now_ms();
            sqlx::query(
                "DELETE FROM evbus_parts WHERE kind = 'topic' AND name LIKE '\\_anonymous.%' \
                 ESCAPE '\\' AND seen_at < ?1 - COALESCE(ttl_ms, ?2)",
            )
            .bind(now)
            .bind(ttl)
            .execute(pool)
            .await
            .map_err(sql("deleting abandoned anonymous subscriptions"))?;
            loop {
                let n = sqlx::query(
                    "DELETE FROM evbus_events WHERE id IN (SELECT e.id FROM evbus_events e \
                     WHERE e.created_at < ?1 \
                     AND NOT EXISTS (SELECT 1 FROM evbus_deliveries d WHERE d.event = e.id) \
                     ORDER BY e.id LIMIT ?2)",
                )
                .bind(now.saturating_sub(retention))
                .bind(CLEANUP_BATCH)
                .execute(pool)
                .await
                .map_err(sql("deleting events past retention"))?
                .rows_affected();
                deleted += n;
                if n < CLEANUP_BATCH as u64 {
                    break;
                }
            }
        }
    }
    Ok(deleted)
}

/// How many times a deletion on PostgreSQL is tried when it runs into a deadlock.
const DELETE_TRIES: u32 = 3;

/// Whether PostgreSQL aborted the statement as a deadlock's victim (or a serialization
/// failure): the same transaction, run again, can succeed.
fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// One try of a deletion on PostgreSQL (see [`SqlBroker::delete_rows`]).
async fn delete_rows_postgres(
    pool: &sqlx::PgPool,
    kind: &str,
    dest: &str,
    sub: Option<&str>,
) -> std::result::Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let parts = sqlx::query(
        "DELETE FROM evbus_parts WHERE kind = $1 AND dest = $2 \
         AND ($3::text IS NULL OR name = $3)",
    )
    .bind(kind)
    .bind(dest)
    .bind(sub)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if sub.is_none() {
        sqlx::query("DELETE FROM evbus_events WHERE kind = $1 AND dest = $2")
            .bind(kind)
            .bind(dest)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(parts)
}

impl SqlBroker {
    pub(crate) fn config(&self) -> &SqlConfig {
        &self.shared.config
    }

    /// The partition of a queue or of a topic subscription, created if needed; a new topic
    /// subscription starting at `Earliest` gets every retained event of the topic.
    async fn part(&self, to: &Destination, start: StartPosition) -> Result<i64> {
        let (kind, dest) = (to.kind(), to.name());
        let name = to.subscription().unwrap_or("");
        let replay = kind == "topic" && start == StartPosition::Earliest;
        match &self.shared.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(sql("creating a subscription"))?;
                if replay {
                    // Exclusive against publishers of this topic (they hold it shared), so
                    // no event falls between the copy and the new partition.
                    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('evbus-sql topic ' || $1))")
                        .bind(dest)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql("locking the topic"))?;
                }
                let (id, created): (i64, bool) = sqlx::query_as(
                    "INSERT INTO evbus_parts (kind, dest, name) VALUES ($1, $2, $3) \
                     ON CONFLICT (kind, dest, name) DO UPDATE SET seen_at = now() \
                     RETURNING id, (xmax = 0)",
                )
                .bind(kind)
                .bind(dest)
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(sql("creating a subscription"))?;
                if replay && created {
                    sqlx::query(
                        // The events are read FOR KEY SHARE: one deleted meanwhile (by
                        // `delete_topic` or the retention cleanup) is skipped, and one
                        // deleted later waits for this transaction, instead of failing it
                        // with a foreign-key violation.
                        "INSERT INTO evbus_deliveries (part, event) SELECT $1, id \
                         FROM evbus_events WHERE kind = 'topic' AND dest = $2 ORDER BY id \
                         FOR KEY SHARE",
                    )
                    .bind(id)
                    .bind(dest)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql("replaying retained events"))?;
                }
                tx.commit().await.map_err(sql("creating a subscription"))?;
                Ok(id)
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(sql("creating a subscription"))?;
                let existing: Option<i64> = sqlx::query_scalar(
                    "UPDATE evbus_parts SET seen_at = ?4 WHERE kind = ?1 AND dest = ?2 \
                     AND name = ?3 RETURNING id",
                )
                .bind(kind)
                .bind(dest)
                .bind(name)
                .bind(now_ms())
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql("creating a subscription"))?;
                let id = match existing {
                    Some(id) => id,
                    None => {
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO evbus_parts (kind, dest, name, seen_at) \
                             VALUES (?1, ?2, ?3, ?4) RETURNING id",
                        )
                        .bind(kind)
                        .bind(dest)
                        .bind(name)
                        .bind(now_ms())
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(sql("creating a subscription"))?;
                        if replay {
                            sqlx::query(
                                "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
                                 SELECT ?1, id, 0, 0 FROM evbus_events \
                                 WHERE kind = 'topic' AND dest = ?2 ORDER BY id",
                            )
                            .bind(id)
                            .bind(dest)
                            .execute(&mut *tx)
                            .await
                            .map_err(sql("replaying retained events"))?;
                        }
                        id
                    }
                };
                tx.commit().await.map_err(sql("creating a subscription"))?;
                Ok(id)
            }
        }
    }

    /// Publishes `bodies` on PostgreSQL: one statement, or, for a batch over
    /// [`MAX_STATEMENT_BYTES`], one statement per part in one transaction (a batch stays all
    /// or nothing).
    async fn publish_postgres(
        &self,
        pool: &PgPool,
        to: &Destination,
        bodies: Vec<String>,
    ) -> Result<()> {
        let mut parts = statement_parts(bodies);
        if parts.len() == 1 {
            let bodies = parts.pop().unwrap_or_default();
            return Self::publish_postgres_statement(pool, to, bodies).await;
        }
        let mut tx = pool.begin().await.map_err(sql("publishing"))?;
        for bodies in parts {
            Self::publish_postgres_statement(&mut *tx, to, bodies).await?;
        }
        tx.commit().await.map_err(sql("publishing"))
    }

    async fn publish_postgres_statement(
        db: impl sqlx::PgExecutor<'_>,
        to: &Destination,
        bodies: Vec<String>,
    ) -> Result<()> {
        match to {
            Destination::Queue(name) => {
                sqlx::query(
                    "WITH p AS (INSERT INTO evbus_parts (kind, dest, name) VALUES ('queue', $1, '') \
                       ON CONFLICT (kind, dest, name) DO UPDATE SET kind = EXCLUDED.kind RETURNING id), \
                     ev AS (INSERT INTO evbus_events (kind, dest, body) \
                       SELECT 'queue', $1, b FROM unnest($2::text[]) WITH ORDINALITY AS t(b, n) \
                       ORDER BY n RETURNING id) \
                     INSERT INTO evbus_deliveries (part, event) \
                     SELECT p.id, ev.id FROM p, ev ORDER BY ev.id",
                )
                .bind(name)
                .bind(bodies)
                .execute(db)
                .await
                .map_err(sql("sending to a queue"))?;
            }
            Destination::Topic { topic, .. } => {
                // One round trip: the lock and the insert run in the function's own
                // statements (see its migration for why they cannot be one statement).
                sqlx::query("SELECT evbus_publish_topic($1, $2)")
                    .bind(topic)
                    .bind(bodies)
                    .execute(db)
                    .await
                    .map_err(sql("publishing"))?;
            }
        }
        Ok(())
    }

    async fn publish_sqlite(
        &self,
        pool: &SqlitePool,
        to: &Destination,
        bodies: Vec<String>,
    ) -> Result<()> {
        let (kind, dest) = (to.kind(), to.name());
        let now = now_ms();
        let mut tx = pool.begin().await.map_err(sql("publishing"))?;
        if kind == "queue" {
            sqlx::query(
                "INSERT INTO evbus_parts (kind, dest, name, seen_at) VALUES ('queue', ?1, '', ?2) \
                 ON CONFLICT (kind, dest, name) DO NOTHING",
            )
            .bind(dest)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(sql("publishing"))?;
        }
        // One statement per part of at most MAX_STATEMENT_BYTES (SQLite refuses a string
        // over SQLITE_MAX_LENGTH, 1e9 bytes by default), all in this transaction.
        for bodies in statement_parts(bodies) {
            let batch = serde_json::to_string(&bodies).map_err(|e| {
                evbus::Error::client(evbus::ErrorKind::Internal, "encoding a batch", e)
            })?;
            let ids: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO evbus_events (kind, dest, body, created_at) \
                 SELECT ?1, ?2, value, ?3 FROM json_each(?4) ORDER BY key RETURNING id",
            )
            .bind(kind)
            .bind(dest)
            .bind(now)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(sql("publishing"))?;
            let (first, last) = (ids.iter().min(), ids.iter().max());
            if let (Some(first), Some(last)) = (first, last) {
                sqlx::query(
                    "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
                     SELECT p.id, e.id, 0, 0 FROM evbus_parts p JOIN evbus_events e \
                     ON e.id BETWEEN ?3 AND ?4 AND e.kind = ?1 AND e.dest = ?2 \
                     WHERE p.kind = ?1 AND p.dest = ?2 ORDER BY p.id, e.id",
                )
                .bind(kind)
                .bind(dest)
                .bind(first)
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(sql("publishing"))?;
            }
        }
        tx.commit().await.map_err(sql("publishing"))?;
        Ok(())
    }

    /// Claims the oldest visible deliveries of `part`, at most `limit`, for `visibility` ms,
    /// in delivery order.
    ///
    /// With `promote`, delayed rows (given back with a delay, `delayed_until` set) are first
    /// moved back among the others if they came due ([`PROMOTE_SQLITE`],
    /// [`PROMOTE_POSTGRES`]; the consumer asks for it when idle, and at most every
    /// [`PROMOTE_EVERY`](crate::consumer::PROMOTE_EVERY) while rows flow); the claim itself
    /// reads only rows
    /// that are not delayed, so a partition holding many delayed rows ahead of its ready ones
    /// costs a claim nothing more (it stepped over all of them before).
    ///
    /// The attempt count saturates at `i32::MAX` (a negative one, written by another program,
    /// counts from 0): a plain `attempt + 1` on a row at the maximum would overflow
    /// (PostgreSQL) or not fit the `i32` read back (SQLite) and fail the statement, and with
    /// it every claim of the partition, for ever. Core dead-letters such a row as delivered
    /// too often.
    pub(crate) async fn claim(
        &self,
        part: i64,
        visibility: i64,
        limit: usize,
        promote: bool,
    ) -> Result<Vec<Claim>> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        match &self.shared.db {
            Db::Postgres(pool) => {
                // The rows are picked (and locked) once, in a materialized CTE: a subquery
                // under `IN` could be run again by the plan and, skipping locked rows, pick
                // others, claiming more than `limit`.
                if promote {
                    sqlx::query(PROMOTE_POSTGRES)
                        .bind(part)
                        .bind(PROMOTE_BATCH)
                        .execute(pool)
                        .await
                        .map_err(sql("moving delayed deliveries that came due back"))?;
                }
                // `delayed_until <= '-infinity'` (only `= '-infinity'` can be) and the order
                // by it: an order only `evbus_deliveries_claim` gives. With an equality the
                // planner drops the column from the order, and with statistics from before a
                // wave of nacks (the table not analysed since) it took the primary key's
                // order instead and stepped over every delayed row.
                let rows: Vec<(i64, i32, String)> = sqlx::query_as(
                    "WITH picked AS MATERIALIZED (SELECT id FROM evbus_deliveries \
                       WHERE part = $1 AND delayed_until <= '-infinity' AND visible_at <= now() \
                       ORDER BY delayed_until, id LIMIT $3 \
                       FOR UPDATE SKIP LOCKED), \
                     c AS (UPDATE evbus_deliveries d \
                       SET visible_at = now() + make_interval(secs => $2::float8 / 1000), \
                       attempt = LEAST(GREATEST(d.attempt, 0), 2147483646) + 1 \
                       FROM picked WHERE d.id = picked.id \
                       RETURNING d.id, d.attempt, d.event) \
                     SELECT c.id, c.attempt, e.body FROM c JOIN evbus_events e ON e.id = c.event \
                     ORDER BY c.id",
                )
                .bind(part)
                .bind(visibility)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(sql("claiming deliveries"))?;
                Ok(rows
                    .into_iter()
                    .map(|(id, attempt, body)| Claim {
                        id,
                        attempt,
                        body: body.into_bytes(),
                    })
                    .collect())
            }
            Db::Sqlite(pool) => {
                let now = now_ms();
                if promote {
                    sqlx::query(PROMOTE_SQLITE)
                        .bind(part)
                        .bind(now)
                        .bind(PROMOTE_BATCH)
                        .execute(pool)
                        .await
                        .map_err(sql("moving delayed deliveries that came due back"))?;
                }
                let mut rows: Vec<(i64, i32, i64)> = sqlx::query_as(CLAIM_SQLITE)
                    .bind(now)
                    .bind(visibility)
                    .bind(part)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
                    .map_err(sql("claiming deliveries"))?;
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                // RETURNING follows no order.
                rows.sort_unstable_by_key(|row| row.0);
                let events = serde_json::to_string(&rows.iter().map(|r| r.2).collect::<Vec<_>>())
                    .map_err(|e| {
                    evbus::Error::client(evbus::ErrorKind::Internal, "claiming deliveries", e)
                })?;
                // As bytes: another program may have stored a BLOB (`readfile()`) or text
                // that is not UTF-8. Such a body becomes an undecodable message of its own
                // row (see `consumer`); read as a `String`, it would fail the whole claim,
                // already committed, and every row claimed with it again and again.
                let mut bodies: std::collections::HashMap<i64, Vec<u8>> = sqlx::query_as(
                    "SELECT id, CAST(body AS BLOB) FROM evbus_events \
                     WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .bind(events)
                .fetch_all(pool)
                .await
                .map_err(sql("reading claimed events"))?
                .into_iter()
                .collect();
                // An event that vanished with its topic (deleted meanwhile): nothing to deliver.
                Ok(rows
                    .into_iter()
                    .filter_map(|(id, attempt, event)| {
                        let body = bodies.remove(&event)?;
                        Some(Claim { id, attempt, body })
                    })
                    .collect())
            }
        }
    }

    /// Gives claimed deliveries that were never handed out back to their partition: visible
    /// at once, and the claim not counted as an attempt. A claim that has moved on (another
    /// consumer's, after the visibility timeout) is left alone.
    pub(crate) async fn unclaim(&self, claims: &[Claim]) -> Result<()> {
        let (ids, attempts): (Vec<i64>, Vec<i32>) =
            claims.iter().map(|c| (c.id, c.attempt)).unzip();
        match &self.shared.db {
            Db::Postgres(pool) => {
                // Rows locked by another statement are skipped, never waited for: a deletion
                // (its cascade takes the rows in its scan's order) and this give-back could
                // otherwise deadlock, and it aborted the deletion. A row someone else holds is
                // being deleted, claimed again after its timeout (then its attempt differs
                // anyway) or settled, so giving it back has nothing to do.
                sqlx::query(
                    "WITH mine AS MATERIALIZED (SELECT d.id, d.attempt FROM evbus_deliveries d \
                       JOIN unnest($1::int8[], $2::int4[]) AS r(id, attempt) \
                       ON d.id = r.id AND d.attempt = r.attempt \
                       ORDER BY d.id FOR UPDATE OF d SKIP LOCKED) \
                     UPDATE evbus_deliveries d SET visible_at = now(), delayed_until = '-infinity', \
                     attempt = d.attempt - 1 \
                     FROM mine WHERE d.id = mine.id AND d.attempt = mine.attempt",
                )
                .bind(ids)
                .bind(attempts)
                .execute(pool)
                .await
                .map_err(sql("giving back claimed deliveries"))?;
            }
            Db::Sqlite(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(sql("giving back claimed deliveries"))?;
                for (id, attempt) in ids.into_iter().zip(attempts) {
                    sqlx::query(
                        "UPDATE evbus_deliveries SET visible_at = 0, delayed_until = 0, \
                         attempt = attempt - 1 \
                         WHERE id = ?1 AND attempt = ?2",
                    )
                    .bind(id)
                    .bind(attempt)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql("giving back claimed deliveries"))?;
                }
                tx.commit()
                    .await
                    .map_err(sql("giving back claimed deliveries"))?;
            }
        }
        Ok(())
    }

    /// Settles delivery `id` if it is still the claim made for `attempt`: ack deletes it,
    /// nack makes it visible after `delay` (zero: at once).
    pub(crate) async fn settle(
        &self,
        id: i64,
        attempt: i32,
        outcome: Option<Duration>,
    ) -> Result<()> {
        match (&self.shared.db, outcome) {
            (Db::Postgres(pool), None) => {
                sqlx::query("DELETE FROM evbus_deliveries WHERE id = $1 AND attempt = $2")
                    .bind(id)
                    .bind(attempt)
                    .execute(pool)
                    .await
                    .map_err(sql("acknowledging"))?;
            }
            (Db::Postgres(pool), Some(delay)) => {
                sqlx::query(NACK_POSTGRES)
                    .bind(id)
                    .bind(attempt)
                    .bind(ms(delay))
                    .execute(pool)
                    .await
                    .map_err(sql("nacking"))?;
            }
            (Db::Sqlite(pool), None) => {
                sqlx::query("DELETE FROM evbus_deliveries WHERE id = ?1 AND attempt = ?2")
                    .bind(id)
                    .bind(attempt)
                    .execute(pool)
                    .await
                    .map_err(sql("acknowledging"))?;
            }
            (Db::Sqlite(pool), Some(delay)) => {
                // Given back at once: visible since ever (0), as a give-back makes it, not
                // since now (see `NACK_POSTGRES`).
                let due = if delay.is_zero() {
                    0
                } else {
                    now_ms().saturating_add(ms(delay))
                };
                sqlx::query(NACK_SQLITE)
                    .bind(id)
                    .bind(attempt)
                    .bind(due)
                    .execute(pool)
                    .await
                    .map_err(sql("nacking"))?;
            }
        }
        Ok(())
    }

    /// Starts the visibility timeout of delivery `id` over, `visibility` ms from now, if it is
    /// still the claim made for `attempt` and that claim has not run out: `false` otherwise
    /// (its timeout passed, so another consumer may have claimed it, or it was claimed again,
    /// settled, or deleted with its topic or queue). An expired claim is never taken back,
    /// even when nobody claimed it again yet: its holder cannot tell that apart.
    pub(crate) async fn renew(&self, id: i64, attempt: i32, visibility: i64) -> Result<bool> {
        match &self.shared.db {
            Db::Postgres(pool) => sqlx::query(
                "UPDATE evbus_deliveries \
                     SET visible_at = now() + make_interval(secs => $3::float8 / 1000) \
                     WHERE id = $1 AND attempt = $2 AND delayed_until = '-infinity' \
                     AND visible_at > now()",
            )
            .bind(id)
            .bind(attempt)
            .bind(visibility)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() > 0),
            Db::Sqlite(pool) => {
                let now = now_ms();
                sqlx::query(
                    "UPDATE evbus_deliveries SET visible_at = ?3 + ?4 \
                     WHERE id = ?1 AND attempt = ?2 AND delayed_until = 0 AND visible_at > ?3",
                )
                .bind(id)
                .bind(attempt)
                .bind(now)
                .bind(visibility)
                .execute(pool)
                .await
                .map(|done| done.rows_affected() > 0)
            }
        }
        .map_err(sql("renewing a delivery's visibility timeout"))
    }

    /// [`renew`](Self::renew) for many claims in one statement: the `(id, attempt)` claims a
    /// consumer claimed ahead and holds for its stream. Returns the ids renewed; a claim left
    /// out has moved on (as `renew` refuses) or, on PostgreSQL, its row was locked by another
    /// statement: for a claim that runs and was never handed out, that is a deletion of the
    /// row or a give-back of it (claims and moves of delayed rows lock only rows that are
    /// visible or delayed, a settlement only the row of the attempt it settles), so the
    /// claim is as good as gone.
    pub(crate) async fn renew_claims(
        &self,
        claims: &[(i64, i32)],
        visibility: i64,
    ) -> Result<Vec<i64>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        match &self.shared.db {
            Db::Postgres(pool) => {
                let (ids, attempts): (Vec<i64>, Vec<i32>) = claims.iter().copied().unzip();
                sqlx::query_scalar(RENEW_POSTGRES)
                    .bind(ids)
                    .bind(attempts)
                    .bind(visibility)
                    .fetch_all(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                let pairs = serde_json::to_string(claims).map_err(|e| {
                    evbus::Error::client(
                        evbus::ErrorKind::Internal,
                        "renewing claimed deliveries",
                        e,
                    )
                })?;
                sqlx::query_scalar(RENEW_SQLITE)
                    .bind(now_ms())
                    .bind(visibility)
                    .bind(pairs)
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(sql("renewing claimed deliveries"))
    }

    /// Marks anonymous subscription partition `part` alive; `false` if it no longer exists.
    pub(crate) async fn mark_alive(&self, part: i64) -> Result<bool> {
        match &self.shared.db {
            Db::Postgres(pool) => {
                sqlx::query("UPDATE evbus_parts SET seen_at = now(), ttl_ms = $2 WHERE id = $1")
                    .bind(part)
                    .bind(ms(self.shared.config.anonymous_ttl))
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected() > 0)
            }
            Db::Sqlite(pool) => {
                sqlx::query("UPDATE evbus_parts SET seen_at = ?2, ttl_ms = ?3 WHERE id = ?1")
                    .bind(part)
                    .bind(now_ms())
                    .bind(ms(self.shared.config.anonymous_ttl))
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected() > 0)
            }
        }
        .map_err(sql("marking an anonymous subscription alive"))
    }

    /// Whether partition `part` still exists (`delete_topic` or `delete_queue`, from any
    /// connection, removes it).
    pub(crate) async fn part_exists(&self, part: i64) -> Result<bool> {
        let query = match &self.shared.db {
            Db::Postgres(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT id FROM evbus_parts WHERE id = $1")
                    .bind(part)
                    .fetch_optional(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT id FROM evbus_parts WHERE id = ?1")
                    .bind(part)
                    .fetch_optional(pool)
                    .await
            }
        };
        query
            .map(|row| row.is_some())
            .map_err(sql("looking up a subscription's partition"))
    }

    /// Deletes `what`: a topic or queue with its subscriptions and events, or one
    /// subscription of a topic with its deliveries (by cascade). Returns how many
    /// subscriptions (or queue parts) it deleted.
    async fn delete_rows(&self, what: &Destination) -> Result<u64> {
        let (kind, dest) = (what.kind(), what.name());
        let sub = what.subscription();
        let parts = match &self.shared.db {
            Db::Postgres(pool) => {
                // A deadlock (another statement locking some of the same rows in another
                // order: a cleanup's cascade, another deletion of the same topic) aborts the
                // transaction, not the deletion: it is run again, a few times.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match delete_rows_postgres(pool, kind, dest, sub).await {
                        Err(e) if tries < DELETE_TRIES && is_deadlock(&e) => {
                            tracing::debug!(error = %e, kind, dest, "evbus-sql: deleting ran into a deadlock; trying again");
                        }
                        result => break result.map_err(sql("deleting"))?,
                    }
                }
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(sql("deleting"))?;
                let parts = sqlx::query(
                    "DELETE FROM evbus_parts WHERE kind = ?1 AND dest = ?2 \
                     AND (?3 IS NULL OR name = ?3)",
                )
                .bind(kind)
                .bind(dest)
                .bind(sub)
                .execute(&mut *tx)
                .await
                .map_err(sql("deleting"))?
                .rows_affected();
                if sub.is_none() {
                    sqlx::query("DELETE FROM evbus_events WHERE kind = ?1 AND dest = ?2")
                        .bind(kind)
                        .bind(dest)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql("deleting"))?;
                }
                tx.commit().await.map_err(sql("deleting"))?;
                parts
            }
        };
        Ok(parts)
    }

    /// A new consumer's buffer of claimed rows, registered for close to give back.
    pub(crate) fn buffer(&self, visibility: i64) -> Arc<Buffer> {
        let buffer = Arc::new(Buffer::new(visibility));
        let mut buffers = self
            .shared
            .buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buffers.retain(|b| b.strong_count() > 0);
        buffers.push(Arc::downgrade(&buffer));
        buffer
    }

    /// The tracker of rows being given back (see [`Shared::give_backs`]).
    pub(crate) fn give_backs(&self) -> &tokio_util::task::TaskTracker {
        &self.shared.give_backs
    }

    pub(crate) fn wakers(&self) -> &Arc<Wakers> {
        &self.shared.wakers
    }
}

#[async_trait]
impl Broker for SqlBroker {
    fn name(&self) -> &str {
        self.shared.config.backend.name()
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities::capabilities(&self.shared.config)
    }

    async fn declare(&self, to: &Destination) -> Result<()> {
        if let Destination::Queue(_) = to {
            self.part(to, StartPosition::Latest).await?;
        }
        Ok(())
    }

    async fn publish(&self, to: &Destination, events: &[Event]) -> Result<()> {
        let bodies = events
            .iter()
            .map(Event::to_json)
            .collect::<Result<Vec<_>>>()?;
        let key = key_of(to.kind(), to.name());
        match &self.shared.db {
            Db::Postgres(pool) => {
                self.publish_postgres(pool, to, bodies).await?;
                // Other processes' consumers, after the commit (see crate::notify).
                self.shared.notifier.push(&key);
            }
            Db::Sqlite(pool) => self.publish_sqlite(pool, to, bodies).await?,
        }
        self.shared.wakers.wake(&key);
        Ok(())
    }

    async fn consume(&self, source: &Source) -> Result<RawStream> {
        let to = source.destination();
        let part = if source.is_anonymous() {
            // Made in a task of its own: if this call is cancelled part way, the task sees
            // nobody waiting once the partition is committed, and deletes it. Deleting it
            // from here (the kit releases the source) could run before the commit lands.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let broker = self.clone();
            let made = to.clone();
            tokio::spawn(async move {
                let part = broker.part(&made, StartPosition::Latest).await;
                if let Err(Ok(_)) = tx.send(part)
                    && let Err(e) = broker.delete(&made).await
                {
                    tracing::debug!(error = %e, "evbus-sql: could not delete the partition of a cancelled anonymous subscribe; the TTL cleanup removes it");
                }
            });
            rx.await
                .map_err(|_| evbus::Error::closed("the SQL transport"))??
        } else {
            self.part(to, StartPosition::Latest).await?
        };
        Ok(consumer::stream(
            self.clone(),
            part,
            key_of(to.kind(), to.name()),
            source,
        ))
    }

    async fn release(&self, source: &Source) -> Result<()> {
        self.delete(source.destination()).await
    }

    async fn delete(&self, what: &Destination) -> Result<()> {
        self.delete_rows(what).await.map(drop)
    }

    async fn health(&self) -> Health {
        let result = match &self.shared.db {
            Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        };
        kit::health_of(result.map_err(sql("checking health")))
    }

    async fn close(&self) -> Result<()> {
        self.shared.stop.cancel();
        // Subscriptions still held are not read any more: what they claimed ahead goes back
        // now, not after its visibility timeout counted as an attempt.
        let buffers = std::mem::take(
            &mut *self
                .shared
                .buffers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Each after its renewal in flight, if any (see `Buffer::take_to_give_back`), but
        // not waiting on a statement that hangs for longer than close waits for give-backs.
        let grace = self.shared.config.connect_timeout;
        let mut claims = Vec::new();
        for buffer in buffers.iter().filter_map(std::sync::Weak::upgrade) {
            match tokio::time::timeout(grace, buffer.take_to_give_back()).await {
                Ok(taken) => claims.extend(taken),
                Err(_) => claims.extend(buffer.take_unexpired()),
            }
        }
        if !claims.is_empty() {
            let broker = self.clone();
            self.shared.give_backs.spawn(async move {
                if let Err(e) = broker.unclaim(&claims).await {
                    tracing::debug!(error = %e, rows = claims.len(), "evbus-sql: could not give back claimed rows at close; they return after the visibility timeout");
                }
            });
        }
        self.shared.give_backs.close();
        if tokio::time::timeout(grace, self.shared.give_backs.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                "evbus-sql: rows being given back at close did not finish within {grace:?}; they return after their visibility timeout"
            );
        }
        match &self.shared.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
        // Another process may open the SQLite file once every transport of this one closed.
        let file = self
            .shared
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(file);
        Ok(())
    }
}

/// Used by the LISTEN task: reconnect delays.
pub(crate) fn listen_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// A topic handle: the kit's, plus replay for a new named subscription starting at
/// `Earliest` (the kit's `Source` does not carry the start position, so its partition is
/// created here, with the retained events, before the kit subscribes to it).
#[derive(Debug)]
struct SqlTopic {
    inner: Arc<dyn Topic>,
    transport: SqlTransport,
}

#[async_trait]
impl Topic for SqlTopic {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.inner.publish(event).await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        self.inner.publish_batch(events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        if options.start == StartPosition::Earliest
            && let Some(name) = options.subscription.as_deref()
        {
            evbus::raw::check_subscription_name(name)?;
            if self.transport.0.is_closed() {
                return Err(evbus::Error::closed("the SQL transport"));
            }
            let to = Destination::Topic {
                topic: self.inner.name().to_owned(),
                subscription: Some(name.to_owned()),
            };
            self.transport
                .0
                .broker()
                .part(&to, StartPosition::Earliest)
                .await?;
        }
        self.inner.subscribe(options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_time_moves_with_the_monotonic_clock_from_its_anchor() {
        let start = std::time::Instant::now();
        let anchor = Anchor {
            wall_ms: 1_000_000,
            at: start,
        };
        // Whatever the wall clock does meanwhile, 20 minutes later by the monotonic clock is
        // 20 minutes later: a step of the system clock does not move it.
        let later = start + Duration::from_secs(20 * 60);
        assert_eq!(anchor.at(later), 1_000_000 + 20 * 60 * 1000);
        assert_eq!(anchor.at(start), 1_000_000);
        // Never before the anchor.
        let earlier = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
        assert_eq!(anchor.at(earlier), 1_000_000);
        // The process's clock: close to the wall clock, and never going back.
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
        let wall = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        assert!((wall - b).abs() < 60_000, "{wall} vs {b}");
    }

    /// A SQLite database in a new directory (kept while the `TempDir` lives) holding queue
    /// `q` (partition 1) and one event (id 1), after `statements` ran on it.
    async fn sqlite_queue_with(statements: &[&str]) -> (tempfile::TempDir, sqlx::SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evbus.db");
        let config = SqlConfig::from_url(&format!("sqlite://{}", path.display())).unwrap();
        let Db::Sqlite(pool) = open_sqlite(&config, &path).await.unwrap() else {
            unreachable!("a SQLite file opens as SQLite")
        };
        let queue = [
            "INSERT INTO evbus_parts (kind, dest, name, seen_at) VALUES ('queue', 'q', '', 0)",
            "INSERT INTO evbus_events (kind, dest, body, created_at) VALUES ('queue', 'q', '{}', 0)",
        ];
        for statement in queue.iter().chain(statements) {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        (dir, pool)
    }

    /// The plans SQLite makes for a claim and for moving due delayed rows back: the claim
    /// reads the partition's rows that are not delayed, in id order, through the index
    /// (never a scan of the table, never a sort, never a step over delayed rows); the move
    /// reads only the range of delayed rows that came due. Made with 20,000 delayed rows ahead of one ready
    /// row (a partition after an outage), the tables not analysed (as nobody does).
    #[tokio::test]
    async fn a_sqlite_claim_never_reads_a_delayed_row() {
        let (_dir, pool) = sqlite_queue_with(&[
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
             INSERT INTO evbus_deliveries (part, event, visible_at, attempt, delayed_until) \
             SELECT 1, 1, 9000000000000, 1, 9000000000000 FROM n",
            "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) VALUES (1, 1, 0, 0)",
        ])
        .await;
        let plan = |sql: &'static str, args: &'static [i64]| {
            let pool = pool.clone();
            async move {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
                for arg in args {
                    query = query.bind(*arg);
                }
                let rows = query.fetch_all(&pool).await.unwrap();
                rows.into_iter().map(|r| r.3).collect::<Vec<_>>()
            }
        };
        let claim = plan(CLAIM_SQLITE, &[1, 2, 1, 10]).await;
        assert!(
            claim.iter().any(|step| step
                == "SEARCH evbus_deliveries USING INDEX evbus_deliveries_claim \
                    (part=? AND delayed_until=?)"),
            "{claim:?}"
        );
        assert!(
            !claim
                .iter()
                .any(|step| step.starts_with("SCAN") || step.contains("TEMP B-TREE")),
            "{claim:?}"
        );
        let promote = plan(PROMOTE_SQLITE, &[1, 2, 1024]).await;
        assert!(
            promote.iter().any(|step| step.contains(
                "INDEX evbus_deliveries_claim (part=? AND delayed_until>? AND delayed_until<?)"
            )),
            "{promote:?}"
        );
        assert!(
            !promote
                .iter()
                .any(|step| step.starts_with("SCAN") || step.contains("TEMP B-TREE")),
            "{promote:?}"
        );
        // And the claim takes the one ready row, behind 20,000 delayed ones.
        let claimed: Vec<(i64, i32, i64)> = sqlx::query_as(CLAIM_SQLITE)
            .bind(1_i64)
            .bind(60_000_i64)
            .bind(1_i64)
            .bind(10_i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(claimed, [(20_001, 1, 1)]);
        pool.close().await;
    }

    /// The renewal of a consumer's claims made ahead, on SQLite: one look-up of the primary
    /// key per claim (never a scan of `evbus_deliveries`, here 20,000 rows, the tables not
    /// analysed), and only claims that are still theirs, not delayed and not run out are
    /// renewed and returned.
    #[tokio::test]
    async fn a_sqlite_renewal_of_claims_looks_up_each_and_renews_only_live_ones() {
        let (_dir, pool) = sqlite_queue_with(&[
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
             INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
             SELECT 1, 1, 1000, 1 FROM n",
            // 2: claimed again since (attempt 2); 3: run out; 4: nacked with a delay.
            "UPDATE evbus_deliveries SET attempt = 2 WHERE id = 2",
            "UPDATE evbus_deliveries SET visible_at = 100 WHERE id = 3",
            "UPDATE evbus_deliveries SET delayed_until = 1000 WHERE id = 4",
        ])
        .await;
        let pairs = "[[1,1],[2,1],[3,1],[4,1],[5,1]]";
        let explain = format!("EXPLAIN QUERY PLAN {RENEW_SQLITE}");
        let plan: Vec<String> = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain)
            .bind(500_i64)
            .bind(60_000_i64)
            .bind(pairs)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.3)
            .collect();
        assert!(
            plan.iter()
                .any(|step| step.starts_with("SEARCH evbus_deliveries")
                    && step.contains("PRIMARY KEY")),
            "{plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.starts_with("SCAN evbus_deliveries")),
            "{plan:?}"
        );
        let mut renewed: Vec<i64> = sqlx::query_scalar(RENEW_SQLITE)
            .bind(500_i64)
            .bind(60_000_i64)
            .bind(pairs)
            .fetch_all(&pool)
            .await
            .unwrap();
        renewed.sort_unstable();
        assert_eq!(renewed, [1, 5]);
        let due: Vec<(i64, i64)> =
            sqlx::query_as("SELECT id, visible_at FROM evbus_deliveries WHERE id <= 6 ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            due,
            [
                (1, 60_500),
                (2, 1000),
                (3, 100),
                (4, 1000),
                (5, 60_500),
                (6, 1000)
            ]
        );
        pool.close().await;
    }

    /// A renewal of claims made ahead reads its time, then a consumer the row was handed to
    /// meanwhile nacks it at once, then the renewal reaches the row: it must find the row
    /// given back, not still claimed (else the event waits a whole visibility timeout).
    #[tokio::test]
    async fn a_sqlite_renewal_started_before_a_nack_leaves_the_nacked_row_visible() {
        let (_dir, pool) = sqlite_queue_with(&[
            "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
             VALUES (1, 1, 60000, 1)",
        ])
        .await;
        let renewal_now = 1_000_i64;
        // The nack, a little later than the renewal's clock read, with no delay.
        sqlx::query(NACK_SQLITE)
            .bind(1_i64)
            .bind(1_i32)
            .bind(0_i64)
            .execute(&pool)
            .await
            .unwrap();
        let renewed: Vec<i64> = sqlx::query_scalar(RENEW_SQLITE)
            .bind(renewal_now)
            .bind(60_000_i64)
            .bind("[[1,1]]")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(renewed, Vec::<i64>::new(), "the nacked row was renewed");
        let claimed: Vec<(i64, i32, i64)> = sqlx::query_as(CLAIM_SQLITE)
            .bind(renewal_now + 1)
            .bind(60_000_i64)
            .bind(1_i64)
            .bind(10_i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(claimed, [(1, 2, 1)], "claimed again at once, attempt 2");
        pool.close().await;
    }

    /// [`a_sqlite_renewal_started_before_a_nack_leaves_the_nacked_row_visible`] on
    /// PostgreSQL, where a statement's `now()` is its transaction's start: the renewal runs
    /// in a transaction that began before the nack committed.
    #[tokio::test]
    async fn a_postgres_renewal_started_before_a_nack_leaves_the_nacked_row_visible() {
        use sqlx::Connection;
        let base = std::env::var("EVBUS_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        if let Err(e) = sqlx::PgConnection::connect(&base).await {
            assert!(
                !evbus_conformance::require_brokers(),
                "PostgreSQL at {} is unreachable: {e}",
                evbus::registry::redact(&base)
            );
            eprintln!(
                "WARNING: PostgreSQL at {} is unreachable ({e}); this test did NOT run",
                evbus::registry::redact(&base)
            );
            return;
        }
        let schema = format!("renew_nack_{}", std::process::id());
        let sep = if base.contains('?') { '&' } else { '?' };
        let config = SqlConfig::from_url(&format!("{base}{sep}schema={schema}")).unwrap();
        let Db::Postgres(pool) = open_postgres(&config).await.unwrap() else {
            unreachable!("a PostgreSQL URL opens PostgreSQL")
        };
        for statement in [
            "INSERT INTO evbus_parts (kind, dest, name) VALUES ('queue', 'q', '')",
            "INSERT INTO evbus_events (kind, dest, body) VALUES ('queue', 'q', '{}')",
            "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
             SELECT p.id, e.id, now() + interval '1 minute', 1 FROM evbus_parts p, evbus_events e",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        let id: i64 = sqlx::query_scalar("SELECT id FROM evbus_deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
        let mut renewal = pool.begin().await.unwrap();
        // The renewal's transaction has started (its `now()` is fixed from here).
        sqlx::query("SELECT now()")
            .execute(&mut *renewal)
            .await
            .unwrap();
        sqlx::query(NACK_POSTGRES)
            .bind(id)
            .bind(1_i32)
            .bind(0_i64)
            .execute(&pool)
            .await
            .unwrap();
        let renewed: Vec<i64> = sqlx::query_scalar(RENEW_POSTGRES)
            .bind(vec![id])
            .bind(vec![1_i32])
            .bind(60_000_i64)
            .fetch_all(&mut *renewal)
            .await
            .unwrap();
        renewal.commit().await.unwrap();
        let visible: bool =
            sqlx::query_scalar("SELECT visible_at <= now() FROM evbus_deliveries WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&pool)
            .await;
        pool.close().await;
        assert_eq!(renewed, Vec::<i64>::new(), "the nacked row was renewed");
        assert!(visible, "the nacked row is not visible");
    }

    #[test]
    fn an_anonymous_partition_is_due_once_its_mark_stayed_the_same_for_its_ttl() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut unmarked = Unmarked::default();
        // First look: nothing is due, whatever the marks say (a cleanup that just started).
        assert!(
            unmarked
                .due(&[(1, 10, 100), (2, 20, 100)], at(0))
                .is_empty()
        );
        // Partition 1 marked again (its keep-alive); 2 not: 2 is due once 100 ms passed.
        assert!(
            unmarked
                .due(&[(1, 11, 100), (2, 20, 100)], at(60))
                .is_empty()
        );
        assert_eq!(
            unmarked.due(&[(1, 11, 100), (2, 20, 100)], at(100)),
            [(2, 20)]
        );
        // 1's TTL runs from when its new mark was first found (60 ms).
        assert!(unmarked.due(&[(1, 11, 100)], at(159)).is_empty());
        assert_eq!(unmarked.due(&[(1, 11, 100)], at(160)), [(1, 11)]);
        // A partition gone is forgotten: found again, it starts over.
        assert!(unmarked.due(&[], at(200)).is_empty());
        assert!(unmarked.due(&[(1, 11, 100)], at(300)).is_empty());
        // A mark that moves back (the server's clock stepped back) is a new mark too.
        assert!(unmarked.due(&[(1, 5, 100)], at(390)).is_empty());
        assert!(unmarked.due(&[(1, 5, 100)], at(489)).is_empty());
        assert_eq!(unmarked.due(&[(1, 5, 100)], at(490)), [(1, 5)]);
    }

    #[test]
    fn a_large_batch_is_cut_into_statements_in_order_and_none_is_empty() {
        let body = |n: usize, len: usize| format!("{n}{}", "x".repeat(len - 1));
        // Ten bodies of a quarter of the budget: four per statement.
        let bodies: Vec<String> = (0..10).map(|n| body(n, 25)).collect();
        let parts = parts_of(bodies.clone(), 100);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(parts.concat(), bodies, "in order, none lost");
        // A body over the budget is a statement of its own.
        let parts = parts_of(vec![body(0, 10), body(1, 101), body(2, 10)], 100);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        // A small batch is one statement; an empty one too.
        assert_eq!(statement_parts(vec![body(0, 10), body(1, 10)]).len(), 1);
        assert_eq!(statement_parts(Vec::new()), vec![Vec::<String>::new()]);
    }
}
