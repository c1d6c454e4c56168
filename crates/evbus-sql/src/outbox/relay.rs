//! The relay: reads committed outbox rows and publishes them to a transport.

use std::collections::{BTreeMap, HashMap};
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
    /// `transport`. Run **one** relay per SQLite database (SQLite is one process's store);
    /// it polls every [`poll_interval`](RelayBuilder::poll_interval) (100 ms by default).
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

    /// This relay's id in the lease table; default `relay-<pid>-<uuid>`. Must be unique
    /// among the relays of one database.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Most events read and published per round (at least 1). Default 256.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long an idle relay waits before looking again. With PostgreSQL `NOTIFY` (the
    /// default) it wakes at once on every commit and this is only the fallback. Default 1 s
    /// on PostgreSQL, 100 ms on SQLite.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// PostgreSQL: how long a bucket lease lasts without renewal. A relay renews every third
    /// of it; a relay that died loses its buckets to the others after at most this long.
    /// Default 30 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Limit on one publish to the transport; a publish that takes longer counts as failed
    /// and is retried. Keep it well under the lease TTL. Default 10 s.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Back-off after a failed publish or database error: starts at `min`, doubles up to
    /// `max`. Default 100 ms to 5 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
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
    /// [`ErrorKind::InvalidConfig`] on an invalid table name.
    pub fn spawn(self) -> Result<RelayHandle> {
        let table = Table::new(&self.table)?;
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
    /// Failed publish attempts (each retried later).
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
}

/// What one round of publishing did.
#[derive(Default)]
struct Outcome {
    published: Vec<i64>,
    /// Buckets with at least one event published this round.
    progressed: Vec<i32>,
    /// Buckets that failed: the first row not published and the error.
    failed: BTreeMap<i32, (i64, Error)>,
}

impl Worker {
    async fn run(mut self) -> Result<()> {
        tracing::info!("outbox relay started");
        let mut db_delay = self.min_backoff;
        let mut lease_due = Instant::now();
        let mut leases_valid_until = Instant::now();
        while !self.cancel.is_cancelled() {
            let now = Instant::now();
            if now >= lease_due {
                match self.store.leases(self.lease_ttl).await {
                    Ok(held) => {
                        self.backoff.retain(|b, _| held.binary_search(b).is_ok());
                        self.held = held;
                        self.stats
                            .buckets_held
                            .store(self.held.len(), Ordering::Relaxed);
                        lease_due = now + self.lease_ttl / 3;
                        leases_valid_until = now + self.lease_ttl;
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
                .fetch(&ready, i64::try_from(self.batch_size).unwrap_or(i64::MAX))
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    self.database_error(&e, &mut db_delay).await;
                    continue;
                }
            };
            if rows.is_empty() {
                let mut wake = lease_due.min(now + self.poll_interval);
                if let Some(b) = self.backoff.values().map(|b| b.until).min() {
                    wake = wake.min(b);
                }
                let timeout = wake.saturating_duration_since(Instant::now());
                self.store.wait(timeout, &self.cancel).await;
                continue;
            }
            let outcome = self.publish(rows).await;
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
                }
            }
            self.settle_failures(outcome.failed).await;
        }
        if let Err(e) = self.store.release().await {
            tracing::warn!(error = %e, "outbox relay could not give back its leases; they expire");
        }
        tracing::info!("outbox relay stopped");
        Ok(())
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
        *delay = (*delay * 2).min(self.max_backoff);
    }

    /// Publishes `rows` (in staging order) in runs of consecutive events of one topic,
    /// batched. After a failure that is not a plain outage (an event the transport refuses),
    /// the rest is retried bucket by bucket so that one bad event holds up only its own
    /// bucket (keys of other buckets keep flowing; its own keys wait, in order).
    async fn publish(&mut self, rows: Vec<Row>) -> Outcome {
        let mut outcome = Outcome::default();
        let mut rest: &[Row] = &rows;
        while !rest.is_empty() {
            let run = topic_run(rest);
            match self.publish_run(run).await {
                Ok(()) => {
                    outcome.published.extend(run.iter().map(|r| r.seq));
                    outcome.progressed.extend(run.iter().map(|r| r.bucket));
                    rest = &rest[run.len()..];
                }
                Err(e) if e.is_retryable() || e.kind() == ErrorKind::Closed => {
                    // The transport is down: every remaining bucket waits.
                    for row in rest {
                        outcome
                            .failed
                            .entry(row.bucket)
                            .or_insert_with(|| (row.seq, e.clone_shallow()));
                    }
                    return outcome;
                }
                Err(_) => break,
            }
        }
        if rest.is_empty() {
            return outcome;
        }
        // Isolate: each bucket on its own.
        let mut by_bucket: BTreeMap<i32, Vec<&Row>> = BTreeMap::new();
        for row in rest {
            by_bucket.entry(row.bucket).or_default().push(row);
        }
        for (bucket, rows) in by_bucket {
            let rows: Vec<Row> = rows.into_iter().cloned().collect();
            let mut rest: &[Row] = &rows;
            while !rest.is_empty() {
                let run = topic_run(rest);
                match self.publish_run(run).await {
                    Ok(()) => {
                        outcome.published.extend(run.iter().map(|r| r.seq));
                        outcome.progressed.push(bucket);
                        rest = &rest[run.len()..];
                    }
                    Err(e) => {
                        outcome.failed.insert(bucket, (run[0].seq, e));
                        break;
                    }
                }
            }
        }
        outcome
    }

    /// Publishes one run of rows of one topic.
    async fn publish_run(&mut self, run: &[Row]) -> Result<()> {
        let events: Vec<Event> = run
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
            .collect::<Result<_>>()?;
        let name = &run[0].topic;
        let topic = match self.topics.get(name) {
            Some(t) => t.clone(),
            None => {
                let t = self.transport.topic(name).await?;
                self.topics.insert(name.clone(), t.clone());
                t
            }
        };
        match tokio::time::timeout(self.publish_timeout, topic.publish_batch(&events)).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "publishing {} outbox events to topic `{name}` took more than {:?}",
                    events.len(),
                    self.publish_timeout
                ),
            )),
        }
    }

    /// Backs off the failed buckets and records the error on their first row.
    async fn settle_failures(&mut self, failed: BTreeMap<i32, (i64, Error)>) {
        if failed.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut logged = false;
        for (bucket, (seq, error)) in failed {
            // On the row first, then in the counters (which readers of the row wait for).
            if let Err(e) = self.store.record_failure(seq, &error.to_string()).await {
                tracing::debug!(error = %e, "could not record the publish failure");
            }
            self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(
                "evbus_outbox_publish_failures_total",
                "table" => self.table.clone(),
                "kind" => error.kind().as_str()
            )
            .increment(1);
            let delay = self
                .backoff
                .get(&bucket)
                .map_or(self.min_backoff, |b| (b.delay * 2).min(self.max_backoff));
            self.backoff.insert(
                bucket,
                Backoff {
                    until: now + delay,
                    delay,
                },
            );
            if !logged || !(error.is_retryable() || error.kind() == ErrorKind::Closed) {
                // An outage is logged once per round, an event the transport refuses once
                // per bucket.
                tracing::warn!(
                    bucket, row = seq, error = %error, retry_in_ms = delay.as_millis() as u64,
                    "outbox relay could not publish; will retry (nothing is dropped)"
                );
                logged = true;
            }
        }
    }
}

/// The longest prefix of `rows` going to one topic.
fn topic_run(rows: &[Row]) -> &[Row] {
    let topic = &rows[0].topic;
    let n = rows.iter().take_while(|r| &r.topic == topic).count();
    &rows[..n]
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
