//! The relay: reads committed outbox rows and publishes them to a transport.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use evbus::{Error, ErrorKind, Event, Result, Topic, Transport};
use sqlx::{PgPool, SqlitePool};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::store::{Row, Store};
use super::table::{DEFAULT_TABLE, Table};

/// The longest poll interval, lease TTL and back-off a relay uses: longer settings are
/// capped to it (so `Instant` arithmetic and the SQL intervals built from them never
/// overflow).
const MAX_TIMING: Duration = Duration::from_secs(24 * 3600);

/// The shortest back-off: a zero one would retry in a busy loop (zero doubled stays zero).
const MIN_BACKOFF: Duration = Duration::from_millis(1);

/// Configures and starts a relay: [`Relay::postgres`] or [`Relay::sqlite`], then
/// [`RelayBuilder::spawn`].
///
/// ```no_run
/// # async fn doc(pool: sqlx::PgPool, transport: std::sync::Arc<dyn evbus::Transport>) -> evbus::Result<()> {
/// use evbus_sql::outbox::Relay;
///
/// let relay = Relay::postgres(pool, transport).spawn()?;
/// // ... later, on shutdown:
/// relay.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// A relay of the outbox table in the PostgreSQL database of `pool`, publishing to
    /// `transport`. Several relays may run on one database (in one process or many).
    pub fn postgres(pool: PgPool, transport: Arc<dyn Transport>) -> RelayBuilder {
        RelayBuilder::new(Source::Postgres(pool), transport, Duration::from_secs(1))
    }

    /// A relay of the outbox table in the SQLite database of `pool`, publishing to
    /// `transport`. One relay per table of an SQLite database file, in all processes: it
    /// takes every bucket, so a second one would publish the same rows again. A second
    /// [`spawn`](RelayBuilder::spawn) is refused while the first runs (a lock on
    /// `<file>.outbox-<table>.lock`, released when the relay stops or its process exits). It
    /// polls every [`poll_interval`](RelayBuilder::poll_interval) (100 ms by default).
    pub fn sqlite(pool: SqlitePool, transport: Arc<dyn Transport>) -> RelayBuilder {
        RelayBuilder::new(Source::Sqlite(pool), transport, Duration::from_millis(100))
    }
}

enum Source {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Settings of a relay (see [`Relay`]).
#[must_use]
pub struct RelayBuilder {
    source: Source,
    transport: Arc<dyn Transport>,
    table: String,
    id: Option<String>,
    batch_size: usize,
    poll_interval: Duration,
    lease_ttl: Duration,
    publish_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    notify: bool,
}

impl fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("transport", &self.transport.name())
            .field("table", &self.table)
            .field("id", &self.id)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("lease_ttl", &self.lease_ttl)
            .field("publish_timeout", &self.publish_timeout)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

impl RelayBuilder {
    fn new(source: Source, transport: Arc<dyn Transport>, poll: Duration) -> Self {
        RelayBuilder {
            source,
            transport,
            table: DEFAULT_TABLE.to_owned(),
            id: None,
            batch_size: 256,
            poll_interval: poll,
            lease_ttl: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            notify: true,
        }
    }

    /// The outbox table ([`Outbox::with_table`](super::Outbox::with_table)); default
    /// `evbus_outbox`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// This relay's id in the lease table; default `relay-<pid>-<uuid>`. Meant to be unique
    /// among the relays of one table: on PostgreSQL a relay holds its id with an advisory
    /// lock, and a second relay given the same id holds no bucket (publishes nothing, logs
    /// an error once) until the first is gone.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Most events read and published per round (at least 1). Default 256. A round also
    /// reads at most 64 MiB of events (but always at least one event), so that a backlog of
    /// large events takes several rounds rather than `n` times their size in memory.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long an idle relay waits before looking again. With PostgreSQL `NOTIFY` (the
    /// default) it wakes at once on every commit and this is only the fallback. Default 1 s
    /// on PostgreSQL, 100 ms on SQLite; at least 1 ms, at most one day.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.clamp(Duration::from_millis(1), MAX_TIMING);
        self
    }

    /// PostgreSQL: how long a bucket lease lasts without renewal. A relay renews every third
    /// of it; a relay that died loses its buckets to the others after at most this long.
    /// Default 30 s; at least 300 ms, at most one day.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.clamp(Duration::from_millis(300), MAX_TIMING);
        self
    }

    /// Limit on one publish to the transport; a publish that takes longer counts as failed
    /// and is retried. Keep it well under the lease TTL: on PostgreSQL a publish is also cut
    /// where the relay's leases may expire. Default 10 s.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Back-off after a failed publish or database error: starts at `min`, doubles up to
    /// `max`. Default 100 ms to 5 s. `min` is at least 1 ms (a zero back-off would retry in
    /// a busy loop), both are at most one day, and `max` is at least `min`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min.clamp(MIN_BACKOFF, MAX_TIMING);
        self.max_backoff = max.clamp(self.min_backoff, MAX_TIMING);
        self
    }

    /// PostgreSQL: wake on `LISTEN`/`NOTIFY` (staging sends a `NOTIFY`, delivered at
    /// commit, unless [`Outbox::notify`](super::Outbox::notify) turned it off). Default on;
    /// off means polling only.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Starts the relay on the current Tokio runtime. Fails with
    /// [`ErrorKind::InvalidConfig`] on an invalid table name, and on SQLite when a relay of
    /// the same table of the same file runs already (in this process or another).
    pub fn spawn(self) -> Result<RelayHandle> {
        let table = Table::new(&self.table)?;
        let exclusive = match &self.source {
            Source::Sqlite(pool) => sole_relay(pool, &table.name)?,
            Source::Postgres(_) => None,
        };
        let id = self.id.unwrap_or_else(|| {
            format!(
                "relay-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            )
        });
        if id.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the outbox relay id must not be empty",
            ));
        }
        if matches!(self.source, Source::Postgres(_)) && self.publish_timeout >= self.lease_ttl {
            // A publish is cut where the leases may expire: about 0.9 of `lease_ttl`.
            tracing::warn!(
                relay = %id,
                publish_timeout_ms = self.publish_timeout.as_millis() as u64,
                lease_ttl_ms = self.lease_ttl.as_millis() as u64,
                "outbox relay: publish_timeout is not under lease_ttl, and a publish is cut \
                 before the leases may expire; a broker slower than about 0.9 lease_ttl per \
                 publish gets nothing published. Keep lease_ttl well above the slowest publish"
            );
        }
        let store = match self.source {
            Source::Postgres(pool) => Store::postgres(pool, table.clone(), id.clone(), self.notify),
            Source::Sqlite(pool) => Store::sqlite(pool, table.clone()),
        };
        let stats = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let worker = Worker {
            store,
            transport: self.transport,
            table: table.name.clone(),
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            lease_ttl: self.lease_ttl,
            publish_timeout: self.publish_timeout,
            min_backoff: self.min_backoff,
            max_backoff: self.max_backoff,
            stats: stats.clone(),
            cancel: cancel.clone(),
            topics: HashMap::new(),
            held: Vec::new(),
            backoff: HashMap::new(),
            suspect: HashSet::new(),
            slow: HashMap::new(),
            timed_out: HashSet::new(),
            _exclusive: exclusive,
        };
        let span = tracing::info_span!("evbus.outbox.relay", relay = %id, table = %table.name);
        let task = tokio::spawn(worker.run().instrument(span));
        Ok(RelayHandle {
            id,
            cancel,
            task,
            stats,
        })
    }
}

/// The lock that makes this the only relay of `table` on the SQLite file of `pool`; `None`
/// for a database without a file (in memory).
fn sole_relay(pool: &SqlitePool, table: &str) -> Result<Option<std::fs::File>> {
    let options = pool.connect_options();
    let file = options.get_filename();
    if !file.is_file() {
        return Ok(None);
    }
    let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
    // Two names of one file would give two relay locks (and two WALs).
    crate::sqlite_file::refuse_extra_links(&file)?;
    let mut lock = file.clone().into_os_string();
    lock.push(format!(".outbox-{table}.lock"));
    crate::sqlite_file::hold(std::path::Path::new(&lock), |holder, lock| {
        Error::invalid_config(format!(
            "an outbox relay of table `{table}` already runs on the SQLite database {} (in \
             {holder}, which holds {}); a second one would publish the same rows again",
            file.display(),
            lock.display()
        ))
        .with_hint(
            "run one relay per SQLite database, in one process (the others only stage), or \
             keep the outbox in PostgreSQL to run several",
        )
    })
    .map(Some)
}

/// A running relay. Dropping it leaves the relay running; call
/// [`shutdown`](Self::shutdown) to stop it cleanly.
#[derive(Debug)]
pub struct RelayHandle {
    id: String,
    cancel: CancellationToken,
    task: JoinHandle<Result<()>>,
    stats: Arc<Counters>,
}

impl RelayHandle {
    /// The relay's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the relay has stopped. It stops on its own only when its transport was
    /// closed (a closed transport never opens again); [`shutdown`](Self::shutdown) then
    /// returns that error. The rows it did not publish stay in the outbox.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// What the relay did so far.
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// Stops the relay: the round in progress finishes (its publishes complete or time out
    /// and published rows are deleted), then its leases are given back so other relays
    /// take its buckets at once.
    pub async fn shutdown(self) -> Result<()> {
        self.cancel.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("the outbox relay task failed: {e}"),
            )),
        }
    }
}

/// Counters of a relay ([`RelayHandle::stats`]). Also exported as metrics:
/// `evbus_outbox_relayed_total`, `evbus_outbox_publish_failures_total` (label `table`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Events published (and their rows deleted).
    pub relayed: u64,
    /// Publishes to the transport that failed (each retried later): one per publish,
    /// whatever the rows and buckets it carried; counted once the failed rows' `attempts`
    /// and `last_error` are recorded.
    pub publish_failures: u64,
    /// Database errors of the relay (each retried later).
    pub database_errors: u64,
    /// Buckets this relay holds now (PostgreSQL; 64 on SQLite).
    pub buckets_held: usize,
}

#[derive(Debug, Default)]
struct Counters {
    relayed: AtomicU64,
    publish_failures: AtomicU64,
    database_errors: AtomicU64,
    buckets_held: AtomicUsize,
}

impl Counters {
    fn snapshot(&self) -> RelayStats {
        RelayStats {
            relayed: self.relayed.load(Ordering::Relaxed),
            publish_failures: self.publish_failures.load(Ordering::Relaxed),
            database_errors: self.database_errors.load(Ordering::Relaxed),
            buckets_held: self.buckets_held.load(Ordering::Relaxed),
        }
    }
}

/// Back-off state of one bucket (or of the whole relay, for database errors).
#[derive(Clone, Copy, Debug)]
struct Backoff {
    until: Instant,
    delay: Duration,
}

struct Worker {
    store: Store,
    transport: Arc<dyn Transport>,
    table: String,
    batch_size: usize,
    poll_interval: Duration,
    lease_ttl: Duration,
    publish_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    stats: Arc<Counters>,
    cancel: CancellationToken,
    topics: HashMap<String, Arc<dyn Topic>>,
    /// Buckets held, sorted.
    held: Vec<i32>,
    /// Buckets whose last publish failed, and until when to leave them alone.
    backoff: HashMap<i32, Backoff>,
    /// Buckets that may hold an event the transport refuses (a run with their rows was
    /// refused and they have not made progress since): published apart from the others,
    /// their first row alone, so that the refusal is pinned on its own row and costs the
    /// other buckets nothing.
    suspect: HashSet<i32>,
    /// Buckets whose first row's publish timed out, and how many times in a row: it goes
    /// alone, with the timeout doubled each time (at most [`SLOW_ROW_GROWTH`] times), since
    /// a publish that timed out may have been accepted all the same and each retry then
    /// adds a copy.
    slow: HashMap<i32, u32>,
    /// Buckets whose publish timed out since this relay last published anything (see
    /// `run`: two or more make a hung transport, one is one slow event).
    timed_out: HashSet<i32>,
    /// On SQLite, the lock that keeps a second relay of this table off the file, held for
    /// as long as the worker runs.
    _exclusive: Option<std::fs::File>,
}

/// What one round of publishing did.
#[derive(Default)]
struct Outcome {
    published: Vec<i64>,
    /// Buckets with at least one event published this round.
    progressed: Vec<i32>,
    /// Buckets that failed: the first row not published, the error, and whether that row was
    /// in the publish that failed (`false`: its bucket was not tried, and waits behind an
    /// outage met by another).
    failed: BTreeMap<i32, (i64, Error, bool)>,
    /// What each publish of the round that failed failed with (a publish carries the rows of
    /// one or several buckets).
    failed_publishes: Vec<ErrorKind>,
    /// The round stopped early, its other rows not published, because the leases are due
    /// for renewal (nothing failed).
    stopped_for_leases: bool,
    /// A publish of the round was refused (the transport answered, and said no), as opposed
    /// to failing because the transport is down or does not answer in time.
    refused: bool,
    /// Buckets with rows in a publish of the round that timed out.
    timed_out: Vec<i32>,
}

/// When a round on leased buckets (PostgreSQL) stops publishing.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    /// No publish starts after this, but the round's first: the leases are due for renewal.
    renew: Instant,
    /// No publish starts, or runs on, past this: the leases may have expired, and another
    /// relay may hold the buckets.
    expiry: Instant,
}

/// A round of publishing in progress.
struct Round {
    outcome: Outcome,
    deadline: Option<Deadline>,
    /// Publishes started.
    publishes: usize,
}

impl Round {
    fn accepted(&mut self, run: &[Row]) {
        self.outcome.published.extend(run.iter().map(|r| r.seq));
        self.outcome.progressed.extend(run.iter().map(|r| r.bucket));
    }

    /// The transport is down: every bucket of `rows` (not published) waits. `tried`: the
    /// rows were in the publish that failed, and their buckets' first rows count an attempt.
    fn outage<'a>(&mut self, e: &Error, rows: impl IntoIterator<Item = &'a Row>, tried: bool) {
        for row in rows {
            self.outcome
                .failed
                .entry(row.bucket)
                .or_insert_with(|| (row.seq, e.clone_shallow(), tried));
        }
    }
}

/// How the publish of one run ended.
enum Sent {
    /// The transport accepted every event of the run.
    Accepted,
    /// It failed; the transport may have accepted a prefix of the run.
    Failed(Error),
    /// Not published: the leases are due for renewal, or may have expired.
    LeasesDue,
}

/// Why a round ends before it published everything it read.
enum Stop {
    Outage(Error),
    LeasesDue,
}

/// An error meaning the transport is down (every bucket waits), not that it refused an event.
/// A timeout is not one by itself: one slow event (a large one) times out while the others
/// go through, so a timed-out run is taken apart like a refused one; two timeouts in a row
/// on different buckets are an outage (see [`Worker::publish`]).
fn is_outage(e: &Error) -> bool {
    (e.is_retryable() && e.kind() != ErrorKind::Timeout) || e.kind() == ErrorKind::Closed
}

/// How many times the publish timeout of a slow bucket's row is doubled, at most.
const SLOW_ROW_GROWTH: u32 = 4;

/// `now + d`, or as late as the relay ever waits if that does not fit an `Instant`.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(MAX_TIMING))
        .unwrap_or(now)
}

impl Worker {
    async fn run(mut self) -> Result<()> {
        tracing::info!("outbox relay started");
        let leased = self.store.leases_buckets();
        let mut db_delay = self.min_backoff;
        let mut lease_due = Instant::now();
        let mut leases_valid_until = Instant::now();
        // Leased buckets (PostgreSQL): since when every publish met an outage while other
        // relays were alive, and how long this one stands back once that lasted a lease
        // period (see `stand_back`): one lease period, doubling to four.
        let mut cut_off_since: Option<Instant> = None;
        let mut stand_back = self.lease_ttl;
        while !self.cancel.is_cancelled() {
            let now = Instant::now();
            if now >= lease_due {
                match self.store.leases(self.lease_ttl).await {
                    Ok(held) => {
                        self.backoff.retain(|b, _| held.binary_search(b).is_ok());
                        self.suspect.retain(|b| held.binary_search(b).is_ok());
                        self.slow.retain(|b, _| held.binary_search(b).is_ok());
                        self.held = held;
                        self.stats
                            .buckets_held
                            .store(self.held.len(), Ordering::Relaxed);
                        lease_due = later(now, self.lease_ttl / 3);
                        // Counted from before the renewal's statements, with a tenth of the
                        // TTL to spare for round trips and clock rates: the expiry the
                        // database wrote, which other relays go by, is later.
                        leases_valid_until = later(now, self.lease_ttl - self.lease_ttl / 10);
                    }
                    Err(e) => {
                        self.database_error(&e, &mut db_delay).await;
                        continue;
                    }
                }
            }
            if Instant::now() >= leases_valid_until {
                // The leases may have passed to another relay: publish nothing before
                // renewing them.
                lease_due = Instant::now();
                continue;
            }
            let ready: Vec<i32> = self
                .held
                .iter()
                .copied()
                .filter(|b| self.backoff.get(b).is_none_or(|s| s.until <= now))
                .collect();
            let rows = match self
                .store
                .fetch(
                    &ready,
                    i64::try_from(self.batch_size).unwrap_or(i64::MAX),
                    FETCH_BYTES,
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    self.database_error(&e, &mut db_delay).await;
                    continue;
                }
            };
            if rows.is_empty() {
                // A bucket whose back-off ran out and that has nothing now (its failed row was
                // deleted, as the README says to) needs no back-off any more: an expired one
                // kept would make every wait below zero, a busy poll of the database.
                self.backoff.retain(|_, b| b.until > now);
                let mut wake = lease_due.min(later(now, self.poll_interval));
                if let Some(b) = self.backoff.values().map(|b| b.until).min() {
                    wake = wake.min(b);
                }
                let timeout = wake.saturating_duration_since(Instant::now());
                self.store.wait(timeout, &self.cancel).await;
                continue;
            }
            // Without leases (SQLite: one relay) a round is not cut short.
            let deadline = leased.then_some(Deadline {
                renew: lease_due,
                expiry: leases_valid_until,
            });
            let outcome = self.publish(rows, deadline).await;
            if !outcome.published.is_empty() {
                // Published rows must be deleted before anything else happens, or they are
                // published again (at-least-once: duplicates, never loss).
                loop {
                    match self.store.delete(&outcome.published).await {
                        Ok(()) => break,
                        Err(e) => {
                            if self.cancel.is_cancelled() {
                                // Stopping: they will be published again by the next relay.
                                tracing::warn!(
                                    error = %e, rows = outcome.published.len(),
                                    "outbox relay stopping before it could delete relayed rows; \
                                     they will be published again"
                                );
                                break;
                            }
                            self.database_error(&e, &mut db_delay).await;
                        }
                    }
                }
                let n = outcome.published.len() as u64;
                self.stats.relayed.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("evbus_outbox_relayed_total", "table" => self.table.clone())
                    .increment(n);
            }
            db_delay = self.min_backoff;
            for bucket in &outcome.progressed {
                if !outcome.failed.contains_key(bucket) {
                    self.backoff.remove(bucket);
                    self.suspect.remove(bucket);
                    self.slow.remove(bucket);
                }
            }
            if outcome.stopped_for_leases {
                tracing::debug!(
                    published = outcome.published.len(),
                    "outbox relay: leases due for renewal; the rest of the round waits for the next"
                );
            }
            // Down, or hung: nothing went through, and every publish that failed did so for
            // want of an answer (an outage or a timeout), none because the transport refused
            // an event. A hung transport's timed-out publishes, cut short by the leases, end
            // a round after one publish; they count once they timed out on two buckets since
            // the relay last published: the timeouts of one bucket are one slow event, which
            // another relay would publish again from the shortest time limit (more copies).
            if !outcome.published.is_empty() {
                self.timed_out.clear();
            }
            self.timed_out.extend(outcome.timed_out.iter().copied());
            let unanswered = outcome
                .failed_publishes
                .iter()
                .any(|kind| *kind != ErrorKind::Timeout)
                || self.timed_out.len() >= 2;
            let cut_off = outcome.published.is_empty()
                && !outcome.failed_publishes.is_empty()
                && !outcome.refused
                && unanswered;
            // A closed transport never opens again: waiting for it would keep this relay's
            // buckets from every other relay for as long as the process lives.
            let closed = outcome
                .failed
                .values()
                .find(|(_, e, _)| e.kind() == ErrorKind::Closed)
                .map(|(_, e, _)| e.clone_shallow());
            self.settle_failures(outcome.failed, &outcome.failed_publishes)
                .await;
            if let Some(e) = closed {
                tracing::error!(
                    error = %e,
                    "outbox relay stopping: its transport was closed; the unpublished rows stay \
                     in the outbox for a relay on an open transport"
                );
                self.release().await;
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!("the outbox relay stopped: its transport was closed ({e})"),
                )
                .with_hint("spawn a relay on an open transport; nothing staged was lost"));
            }
            // Alone, a relay that cannot publish has nobody to give its buckets to.
            if !leased || !cut_off || !self.store.others_alive() {
                cut_off_since = None;
                if !outcome.published.is_empty() {
                    stand_back = self.lease_ttl;
                }
            } else if cut_off_since.get_or_insert(now).elapsed() >= self.lease_ttl {
                self.stand_back(stand_back).await;
                stand_back = stand_back.saturating_mul(2).min(self.lease_ttl * 4);
                cut_off_since = None;
                lease_due = Instant::now();
            }
        }
        self.release().await;
        tracing::info!("outbox relay stopped");
        Ok(())
    }

    /// This relay cannot reach the transport, maybe while other relays can: it gives its
    /// buckets back and its heartbeat up, so that they take the buckets over, and looks
    /// again after `period`. Held, the buckets would wait for this relay alone.
    async fn stand_back(&mut self, period: Duration) {
        tracing::warn!(
            buckets = self.held.len(),
            retry_in_ms = period.as_millis() as u64,
            "outbox relay cannot publish for a lease period: giving its buckets to other relays"
        );
        if let Err(e) = self.store.step_back().await {
            tracing::debug!(error = %e, "outbox relay could not give back its leases; they expire");
        }
        self.held.clear();
        self.backoff.clear();
        self.timed_out.clear();
        self.stats.buckets_held.store(0, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = self.cancel.cancelled() => {}
        }
    }

    /// Gives back this relay's leases, so that other relays take its buckets at once.
    async fn release(&mut self) {
        if let Err(e) = self.store.release().await {
            tracing::warn!(error = %e, "outbox relay could not give back its leases; they expire");
        }
    }

    async fn database_error(&self, e: &Error, delay: &mut Duration) {
        self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            "outbox relay: database error; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(*delay) => {}
            _ = self.cancel.cancelled() => {}
        }
        *delay = delay.saturating_mul(2).min(self.max_backoff);
    }

    /// Publishes `rows` (in staging order) in runs of consecutive events of one topic,
    /// batched.
    ///
    /// - A retryable error (the transport is down) ends the round: every bucket not
    ///   published waits.
    /// - After any other error (the transport refused an event) the rest is published bucket
    ///   by bucket, so that the refused event holds up only its own bucket (keys of other
    ///   buckets keep flowing; its own keys wait, in order). The rows of the refused run go
    ///   one at a time (the transport may have taken a prefix of the run: those go once
    ///   more, then are deleted), so the refusal is counted on the row refused.
    /// - With leases (PostgreSQL), no publish starts once they are due for renewal (the
    ///   round's first excepted) and none runs past the point where they may have expired:
    ///   the round stops there and the rest waits for the next one, after the renewal.
    async fn publish(&mut self, rows: Vec<Row>, deadline: Option<Deadline>) -> Outcome {
        let mut round = Round {
            outcome: Outcome::default(),
            deadline,
            publishes: 0,
        };
        // Buckets that may hold a refused event go apart, each on its own.
        let (apart, together): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .partition(|r| self.suspect.contains(&r.bucket));
        let mut rest: &[Row] = &together;
        let mut refused_run = 0;
        while !rest.is_empty() {
            let run = topic_run(rest);
            match self.publish_run(run, &mut round).await {
                Sent::Accepted => {
                    round.accepted(run);
                    rest = &rest[run.len()..];
                }
                Sent::Failed(e) if is_outage(&e) => {
                    round.outage(&e, run, true);
                    round.outage(&e, rest.iter().chain(&apart), false);
                    return round.outcome;
                }
                Sent::Failed(_) => {
                    refused_run = run.len();
                    self.suspect.extend(run.iter().map(|r| r.bucket));
                    break;
                }
                Sent::LeasesDue => {
                    round.outcome.stopped_for_leases = true;
                    return round.outcome;
                }
            }
        }
        // Each bucket on its own: its rows, and how many of them go one at a time.
        let mut buckets: BTreeMap<i32, (Vec<Row>, usize)> = BTreeMap::new();
        for (i, row) in rest.iter().enumerate() {
            let (rows, alone) = buckets.entry(row.bucket).or_default();
            rows.push(row.clone());
            if i < refused_run {
                *alone += 1;
            }
        }
        for row in apart {
            let (rows, alone) = buckets.entry(row.bucket).or_default();
            rows.push(row);
            *alone = 1;
        }
        let buckets: Vec<(i32, Vec<Row>, usize)> = buckets
            .into_iter()
            .map(|(bucket, (rows, alone))| (bucket, rows, alone))
            .collect();
        let mut timeouts_in_a_row = 0;
        for (k, (bucket, rows, alone)) in buckets.iter().enumerate() {
            match self.publish_bucket(*bucket, rows, *alone, &mut round).await {
                Ok(()) => {
                    // A bucket timed out on its own row: one slow event, unless the next
                    // bucket's times out too (the transport hangs: every bucket would take
                    // the whole timeout).
                    let timed_out = round
                        .outcome
                        .failed
                        .get(bucket)
                        .filter(|(_, e, _)| e.kind() == ErrorKind::Timeout)
                        .map(|(_, e, _)| e.clone_shallow());
                    match timed_out {
                        Some(e) => {
                            timeouts_in_a_row += 1;
                            if timeouts_in_a_row >= 2 {
                                // The buckets not tried wait as in any outage: not suspect.
                                let hung = Error::new(
                                    ErrorKind::Connection,
                                    format!("the transport timed out on two buckets in a row: {e}"),
                                );
                                round.outage(
                                    &hung,
                                    buckets[k + 1..].iter().map(|(_, rows, _)| &rows[0]),
                                    false,
                                );
                                return round.outcome;
                            }
                        }
                        None => timeouts_in_a_row = 0,
                    }
                }
                Err(Stop::Outage(e)) => {
                    round.outage(
                        &e,
                        buckets[k + 1..].iter().map(|(_, rows, _)| &rows[0]),
                        false,
                    );
                    return round.outcome;
                }
                Err(Stop::LeasesDue) => {
                    round.outcome.stopped_for_leases = true;
                    return round.outcome;
                }
            }
        }
        round.outcome
    }

    /// Publishes the rows of one bucket, in order: the first `alone` one at a time, the rest
    /// in runs. A refused run is published again one row at a time, to find the row refused;
    /// the failure is counted on that row and the bucket's later rows wait.
    async fn publish_bucket(
        &mut self,
        bucket: i32,
        rows: &[Row],
        mut alone: usize,
        round: &mut Round,
    ) -> std::result::Result<(), Stop> {
        let mut i = 0;
        while i < rows.len() {
            let n = if i < alone {
                1
            } else {
                topic_run(&rows[i..]).len()
            };
            let run = &rows[i..i + n];
            match self.publish_run(run, round).await {
                Sent::Accepted => {
                    round.accepted(run);
                    i += n;
                }
                Sent::Failed(e) if is_outage(&e) => {
                    round
                        .outcome
                        .failed
                        .insert(bucket, (run[0].seq, e.clone_shallow(), true));
                    return Err(Stop::Outage(e));
                }
                Sent::Failed(e) if n == 1 => {
                    round.outcome.failed.insert(bucket, (run[0].seq, e, true));
                    return Ok(());
                }
                // Which row? One at a time from the run's first.
                Sent::Failed(_) => alone = i + n,
                Sent::LeasesDue => return Err(Stop::LeasesDue),
            }
        }
        Ok(())
    }

    /// Publishes one run of rows of one topic, unless the round's leases forbid it.
    async fn publish_run(&mut self, run: &[Row], round: &mut Round) -> Sent {
        let mut limit = self.publish_timeout;
        if let [row] = run
            && let Some(&timeouts) = self.slow.get(&row.bucket)
        {
            limit = limit.saturating_mul(1 << timeouts.min(SLOW_ROW_GROWTH));
        }
        let mut limited_by_leases = false;
        if let Some(deadline) = round.deadline {
            let now = Instant::now();
            if now >= deadline.expiry || (round.publishes > 0 && now >= deadline.renew) {
                return Sent::LeasesDue;
            }
            let left = deadline.expiry - now;
            if left < limit {
                limit = left;
                limited_by_leases = true;
            }
        }
        round.publishes += 1;
        let events = match run
            .iter()
            .map(|r| {
                Event::from_json(&r.event).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidEvent,
                        format!(
                            "outbox row {} does not hold a valid CloudEvents JSON event: {}",
                            r.seq,
                            e.message()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
        {
            Ok(events) => events,
            Err(e) => {
                // A row that is not an event: a publish that failed, as the broker's refusal
                // would be (retried, and counted).
                round.outcome.failed_publishes.push(e.kind());
                round.outcome.refused = true;
                return Sent::Failed(e);
            }
        };
        let name = &run[0].topic;
        let publish = async {
            let topic = match self.topics.get(name) {
                Some(t) => t.clone(),
                None => {
                    let t = self.transport.topic(name).await?;
                    self.topics.insert(name.clone(), t.clone());
                    t
                }
            };
            topic.publish_batch(&events).await
        };
        let sent = match tokio::time::timeout(limit, publish).await {
            Ok(Ok(())) => Sent::Accepted,
            Ok(Err(e)) => Sent::Failed(e),
            Err(_) if limited_by_leases => Sent::Failed(Error::new(
                ErrorKind::Timeout,
                format!(
                    "publishing {} outbox events to topic `{name}` did not finish within the \
                     {limit:?} left before the relay's bucket leases may expire",
                    events.len()
                ),
            )),
            Err(_) => Sent::Failed(Error::new(
                ErrorKind::Timeout,
                format!(
                    "publishing {} outbox events to topic `{name}` took more than {limit:?}",
                    events.len()
                ),
            )),
        };
        if let Sent::Failed(e) = &sent {
            round.outcome.failed_publishes.push(e.kind());
            round.outcome.refused |= !is_outage(e) && e.kind() != ErrorKind::Timeout;
            if e.kind() == ErrorKind::Timeout {
                round.outcome.timed_out.extend(run.iter().map(|r| r.bucket));
            }
        }
        sent
    }

    /// Backs off the failed buckets and records the error on the rows that were tried (a
    /// bucket that waits behind an outage met elsewhere counts no attempt).
    async fn settle_failures(
        &mut self,
        failed: BTreeMap<i32, (i64, Error, bool)>,
        failed_publishes: &[ErrorKind],
    ) {
        let now = Instant::now();
        let mut logged = false;
        for (bucket, (seq, error, tried)) in failed {
            if tried && let Err(e) = self.store.record_failure(seq, &error.to_string()).await {
                tracing::debug!(error = %e, "could not record the publish failure");
            }
            let outage = is_outage(&error);
            if !outage {
                self.suspect.insert(bucket);
            }
            if error.kind() == ErrorKind::Timeout {
                *self.slow.entry(bucket).or_default() += 1;
            }
            let delay = self.backoff.get(&bucket).map_or(self.min_backoff, |b| {
                b.delay.saturating_mul(2).min(self.max_backoff)
            });
            self.backoff.insert(
                bucket,
                Backoff {
                    until: later(now, delay),
                    delay,
                },
            );
            if !logged || !outage {
                // An outage is logged once per round, an event the transport refuses once
                // per bucket.
                tracing::warn!(
                    bucket, row = seq, error = %error, retry_in_ms = delay.as_millis() as u64,
                    "outbox relay could not publish; will retry (nothing is dropped)"
                );
                logged = true;
            }
        }
        // After the rows, which readers of the counters wait for.
        for kind in failed_publishes {
            self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(
                "evbus_outbox_publish_failures_total",
                "table" => self.table.clone(),
                "kind" => kind.as_str()
            )
            .increment(1);
        }
    }
}

/// The most bytes of events one publish of the relay carries (a run holds at least one
/// event, whatever its size). `batch_size` bounds a round by rows; this bounds each publish by
/// bytes, so that a backlog of large events is neither one huge transport batch (PostgreSQL
/// refuses a message over 1 GiB by dropping the connection, which reads as an outage and
/// would be retried for ever) nor that much memory at once in the transport.
const RUN_BYTES: usize = 64 << 20;

/// The most bytes of events one round reads (at least one row, whatever its size), beside
/// `batch_size` rows. Bounded by rows alone, a round of large events was `batch_size` times
/// their size in memory at once (256 rows of 16 MiB, the memory, Redis and NATS transports'
/// limit, are 4 GiB; an outside review measured 2.5 GB of peak memory for a backlog of
/// 0.9 GB): a relay with less memory was killed, restarted, read the same rows again, and
/// never got past them. One publish's budget: a round is still at least one full publish.
const FETCH_BYTES: i64 = RUN_BYTES as i64;

/// The longest prefix of `rows` going to one topic, of at most [`RUN_BYTES`] of events (at
/// least one row).
fn topic_run(rows: &[Row]) -> &[Row] {
    let topic = &rows[0].topic;
    let mut bytes = 0;
    let n = rows
        .iter()
        .take_while(|r| {
            bytes += r.event.len();
            &r.topic == topic && bytes <= RUN_BYTES
        })
        .count();
    &rows[..n.max(1)]
}

/// A copy of an error's kind and message (evbus errors are not `Clone`: their source is
/// not).
trait CloneShallow {
    fn clone_shallow(&self) -> Error;
}

impl CloneShallow for Error {
    fn clone_shallow(&self) -> Error {
        Error::new(self.kind(), self.message().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, topic: &str, len: usize) -> Row {
        Row {
            seq,
            bucket: 0,
            topic: topic.to_owned(),
            event: "x".repeat(len),
        }
    }

    #[test]
    fn a_run_is_one_topic_and_at_most_its_byte_budget_but_never_empty() {
        let small = [row(1, "a", 10), row(2, "a", 10), row(3, "b", 10)];
        assert_eq!(topic_run(&small).len(), 2);
        // Events of 30 MiB: two fit in 64 MiB, the third starts the next run.
        let large: Vec<Row> = (1..=5).map(|i| row(i, "a", 30 << 20)).collect();
        assert_eq!(topic_run(&large).len(), 2);
        assert_eq!(topic_run(&large[2..]).len(), 2);
        assert_eq!(topic_run(&large[4..]).len(), 1);
        // An event over the budget alone is a run of its own.
        let huge = [row(1, "a", RUN_BYTES + 1), row(2, "a", 1)];
        assert_eq!(topic_run(&huge).len(), 1);
        assert_eq!(topic_run(&huge[1..]).len(), 1);
    }
}
