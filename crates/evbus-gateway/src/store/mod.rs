//! Gateway state behind a [`Store`] trait: API keys, webhooks, the curated event log, the
//! delivery outbox and the attempt log. [`SqliteStore`] is the embedded default, for one
//! process; [`PostgresStore`] implements the same trait for several gateway instances sharing
//! one database ([`open`] picks one from a location).

mod group_commit;
mod postgres;
mod sealing;
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use postgres::{DEFAULT_SCHEMA, PostgresStore};
pub use sealing::SecretsKey;
pub use sqlite::{DB_FILE, SqliteStore};

/// A store error: what failed, as text (no secrets, no payloads).
#[derive(Debug, thiserror::Error)]
#[error("gateway store: {0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError(e.to_string())
    }
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// An API key record: never the key itself, only the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public lookup id (the part after `evb_`).
    pub id: String,
    /// A human name.
    pub name: String,
    /// SHA-256 of the secret.
    pub secret_hash: Vec<u8>,
    /// Event types (names or `*` patterns) the key may subscribe to.
    pub subscribe: Vec<String>,
    /// Event types (names or `*` patterns) the key may publish.
    pub publish: Vec<String>,
    /// Whether the key may manage keys.
    pub admin: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Its own request rate limit; `None`: the gateway's default
    /// ([`GatewayConfig::rate_limit_per_second`](crate::GatewayConfig::rate_limit_per_second)
    /// and [`rate_limit_burst`](crate::GatewayConfig::rate_limit_burst)).
    pub rate_limit: Option<RateLimit>,
}

/// A request rate limit: a token bucket holding `burst` requests, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_second: u32,
    /// Requests that may come at once (the bucket's size).
    pub burst: u32,
}

impl RateLimit {
    /// The largest sustained rate a key may be given, per second.
    pub const MAX_PER_SECOND: u32 = 1_000_000;
    /// The largest burst a key may be given.
    pub const MAX_BURST: u32 = 1_000_000;

    /// A limit of `per_second` requests per second with bursts of `burst`, each from 1 to
    /// its maximum ([`MAX_PER_SECOND`](Self::MAX_PER_SECOND), [`MAX_BURST`](Self::MAX_BURST));
    /// else what is wrong, in words.
    pub fn new(per_second: u64, burst: u64) -> Result<RateLimit, String> {
        let check = |name: &str, n: u64, max: u32| {
            u32::try_from(n)
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("{name} must be a whole number from 1 to {max}"))
        };
        Ok(RateLimit {
            per_second: check(
                "the rate limit (requests per second)",
                per_second,
                Self::MAX_PER_SECOND,
            )?,
            burst: check("the burst", burst, Self::MAX_BURST)?,
        })
    }

    /// The burst given with `per_second` when none is: two seconds' worth (as the gateway's
    /// default, 50/s with bursts of 100), at most [`MAX_BURST`](Self::MAX_BURST).
    pub fn default_burst(per_second: u64) -> u64 {
        per_second.saturating_mul(2).min(u64::from(Self::MAX_BURST))
    }

    /// A limit read back from a store: both columns, else none.
    pub(crate) fn from_columns(per_second: Option<i64>, burst: Option<i64>) -> Option<RateLimit> {
        let (p, b) = (per_second?, burst?);
        Some(RateLimit {
            per_second: u32::try_from(p).ok().filter(|p| *p > 0)?,
            burst: u32::try_from(b).ok().filter(|b| *b > 0)?,
        })
    }
}

impl KeyRecord {
    /// Whether the key works at `now`: not revoked, not expired.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// A webhook endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookRecord {
    /// Its id (`wh_…`).
    pub id: String,
    /// The key that registered it: deliveries stop if that key is revoked, expires or loses
    /// the scope.
    pub owner_key_id: String,
    /// Where events are POSTed.
    pub url: String,
    /// The event types delivered.
    pub event_types: Vec<String>,
    /// A human description.
    pub description: String,
    /// A narrower allow-list of JSON pointers, on top of the types' curation.
    pub allow: Option<Vec<String>>,
    /// The current signing secret (`whsec_…`).
    pub secret: String,
    /// The previous secret, still signing until `previous_secret_until`.
    pub previous_secret: Option<String>,
    /// End of the rotation overlap.
    pub previous_secret_until: Option<DateTime<Utc>>,
    /// Whether deliveries run.
    pub enabled: bool,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// Start of the current run of failures.
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// One curated event of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the log (the SSE event id).
    pub seq: i64,
    /// The CloudEvents source.
    pub source: String,
    /// The CloudEvents id (unique per source).
    pub id: String,
    /// The event type.
    pub ty: String,
    /// When the gateway received it.
    pub received_at: DateTime<Utc>,
    /// The curated structured CloudEvent, JSON.
    pub body: String,
}

/// An event to append to the log ([`Store::ingest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewEvent<'a> {
    /// The CloudEvents source.
    pub source: &'a str,
    /// The CloudEvents id.
    pub id: &'a str,
    /// The event type.
    pub ty: &'a str,
    /// A digest of the content, telling a redelivery from a different event reusing the id.
    pub fingerprint: &'a str,
    /// When the gateway received it.
    pub received_at: DateTime<Utc>,
    /// The curated structured CloudEvent, JSON.
    pub body: &'a str,
}

/// What [`Store::ingest`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Logged at this position, deliveries queued.
    Logged(i64),
    /// The same event was already logged (a broker redelivery): nothing done.
    Redelivered,
    /// Another event with the same source and id but different content is logged: nothing
    /// done.
    Conflict,
}

/// What [`Store::claim_publish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishClaim {
    /// First time: recorded, not yet sent.
    New,
    /// Already accepted with the same content and sent to the bus.
    Sent,
    /// Already recorded with the same content but not (yet) sent.
    Unsent,
    /// Already accepted with different content.
    Conflict,
}

/// A delivery claimed for an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Its id.
    pub id: i64,
    /// The endpoint.
    pub webhook_id: String,
    /// The event's position in the log.
    pub event_seq: i64,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What became of a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Delivered (2xx).
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// Given up (schedule exhausted, 410, endpoint disabled or gone).
    Failed,
}

impl DeliveryOutcome {
    /// The delivery's `state` after it, and its new `next_attempt_at` (ms; `None`: kept).
    pub(crate) fn columns(self) -> (&'static str, Option<i64>) {
        match self {
            DeliveryOutcome::Delivered => ("delivered", None),
            DeliveryOutcome::RetryAt(at) => ("pending", Some(ms(at))),
            DeliveryOutcome::Failed => ("failed", None),
        }
    }
}

/// One logged delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attempt {
    /// Its id.
    pub id: i64,
    /// The endpoint.
    pub webhook_id: String,
    /// The delivery.
    pub delivery_id: i64,
    /// The event id (the `webhook-id` header).
    pub event_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The HTTP status, if a response came.
    pub status: Option<u16>,
    /// How long it took.
    pub latency_ms: u64,
    /// Why it failed without a response (timeout, connection, refused address).
    pub error: Option<String>,
    /// The start of the response body (at most 1 KiB).
    pub response: Option<String>,
}

/// A change made through a shared store, told to every instance sharing it
/// ([`Store::signals`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// An event was logged at this position.
    Logged(i64),
    /// A key was revoked.
    Revoked,
    /// Signals may have been missed (the channel was lost and is back): look at the store.
    Lost,
}

/// Gateway state. Implementations must make [`claim_deliveries`](Store::claim_deliveries)
/// atomic, so that several instances sharing a store never attempt one delivery at once.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Stores a new key.
    async fn insert_key(&self, key: &KeyRecord) -> StoreResult<()>;
    /// One key by id.
    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>>;
    /// Every key, oldest first.
    async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>>;
    /// Revokes a key; `false` if there is no such active key.
    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool>;

    /// Stores a new webhook.
    async fn insert_webhook(&self, webhook: &WebhookRecord) -> StoreResult<()>;
    /// One webhook by id.
    async fn get_webhook(&self, id: &str) -> StoreResult<Option<WebhookRecord>>;
    /// Webhooks of one owner key, or all; oldest first.
    async fn list_webhooks(&self, owner: Option<&str>) -> StoreResult<Vec<WebhookRecord>>;
    /// Deletes a webhook and its pending deliveries; `false` if there was none.
    async fn delete_webhook(&self, id: &str) -> StoreResult<bool>;
    /// Replaces a webhook's mutable state: secrets, enabled, failure tracking, event types,
    /// description and allow-list (everything but its id, owner, URL and creation time).
    async fn update_webhook(&self, webhook: &WebhookRecord) -> StoreResult<()>;

    /// Appends a curated event to the log and queues one delivery per enabled webhook of its
    /// type. Events are unique per (`source`, `id`): an event already logged under them is a
    /// redelivery if its `fingerprint` is the same (nothing is queued twice), a conflict
    /// otherwise (nothing is logged; the caller reports it).
    async fn ingest(&self, event: &NewEvent<'_>) -> StoreResult<Ingested>;
    /// Records that `POST /v1/events` accepts the event (`source`, `id`) with content
    /// `fingerprint`, unless that pair is already recorded: then says whether the recorded
    /// content is the same (and whether it reached the bus) or different.
    async fn claim_publish(
        &self,
        source: &str,
        id: &str,
        fingerprint: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<PublishClaim>;
    /// Settles a claim of [`claim_publish`](Store::claim_publish): marks it sent, or forgets
    /// it when the bus refused the event (so that a retry is not taken for a duplicate).
    async fn settle_publish(&self, source: &str, id: &str, sent: bool) -> StoreResult<()>;
    /// Logged events after position `after` whose type is in `types`, at most `limit`.
    async fn events_after(
        &self,
        after: i64,
        types: &[String],
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// The last position of the log (0 when empty).
    async fn latest_seq(&self) -> StoreResult<i64>;
    /// One logged event.
    async fn get_event(&self, seq: i64) -> StoreResult<Option<StoredEvent>>;

    /// Atomically claims due deliveries of enabled webhooks (pending and due, or in flight
    /// with an expired lease) until `lease_until`: none for the endpoints in `busy`, at most
    /// `limit` in all, at most `per_webhook` in flight per endpoint and `per_owner` for the
    /// endpoints of one owner key (both counting the unexpired leases already held, by any
    /// instance). Owners take turns: every owner's first delivery before any owner's second.
    /// Each endpoint's deliveries are claimed in due order (then id).
    #[allow(clippy::too_many_arguments)]
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        busy: &[String],
        per_webhook: u32,
        per_owner: u32,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>>;
    /// Settles a claimed delivery after an attempt (which counts).
    async fn finish_delivery(&self, id: i64, outcome: DeliveryOutcome) -> StoreResult<()>;
    /// The earliest time a pending delivery is due, if any.
    async fn next_due(&self) -> StoreResult<Option<DateTime<Utc>>>;
    /// Logs an attempt.
    async fn record_attempt(&self, attempt: &Attempt) -> StoreResult<()>;
    /// Logs an attempt and settles its delivery (`attempt.delivery_id`) with `outcome`: what
    /// [`record_attempt`](Self::record_attempt) then [`finish_delivery`](Self::finish_delivery)
    /// do, in one transaction where the store can.
    async fn finish_attempt(&self, attempt: &Attempt, outcome: DeliveryOutcome) -> StoreResult<()> {
        self.record_attempt(attempt).await?;
        self.finish_delivery(attempt.delivery_id, outcome).await
    }
    /// The latest attempts of a webhook, newest first.
    async fn list_attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>>;
    /// Queues again every logged event of the webhook's types received at or after `since`
    /// (at most `max`), except those with a delivery to this webhook still pending or in
    /// flight, so a repeated replay queues nothing twice; returns how many were queued.
    async fn replay(
        &self,
        webhook_id: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        max: u32,
    ) -> StoreResult<u64>;
    /// The secret key of stream cursors (the SSE ids): 32 random bytes, created on first use
    /// and the same afterwards (across restarts and for every instance sharing the store).
    async fn stream_cursor_key(&self) -> StoreResult<Vec<u8>>;
    /// Drops logged events received before `before` that no pending delivery needs, and
    /// attempts, settled deliveries and publish claims older than that; returns the events
    /// dropped.
    async fn prune(&self, before: DateTime<Utc>) -> StoreResult<u64>;

    /// Whether several gateway instances may share this store (then each instance follows
    /// the changes the others make: [`signals`](Store::signals), and polling of
    /// [`latest_seq`](Store::latest_seq) and [`revoked_keys`](Store::revoked_keys)).
    fn shared(&self) -> bool {
        false
    }
    /// How many keys are revoked (it only grows): an instance that sees it change ends the
    /// streams of revoked keys.
    async fn revoked_keys(&self) -> StoreResult<u64> {
        Ok(self
            .list_keys()
            .await?
            .iter()
            .filter(|k| k.revoked_at.is_some())
            .count() as u64)
    }
    /// Changes made by any instance as they commit, if the store can push them (PostgreSQL
    /// `LISTEN`); `None` when it cannot (the gateway then polls).
    async fn signals(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<Signal>>> {
        Ok(None)
    }
}

/// Where `evbus serve` keeps its state: a `postgres://` (or `postgresql://`) URL opens a
/// [`PostgresStore`] (shared by every instance given the same URL); `None`, an empty value or
/// `sqlite` opens the [`SqliteStore`] in `data_dir` (one process). Webhook secrets are
/// sealed with `secrets` if given.
pub async fn open(
    location: Option<&str>,
    data_dir: &std::path::Path,
    secrets: Option<SecretsKey>,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    let location = location.map(str::trim).filter(|l| !l.is_empty());
    match location {
        None | Some("sqlite") => {
            let store = SqliteStore::open_dir(data_dir).await?;
            Ok(match secrets {
                Some(key) => std::sync::Arc::new(store.seal_secrets(key).await?),
                None => std::sync::Arc::new(store),
            })
        }
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PostgresStore::open(url).await?;
            Ok(match secrets {
                Some(key) => std::sync::Arc::new(store.seal_secrets(key).await?),
                None => std::sync::Arc::new(store),
            })
        }
        Some(_) => Err(StoreError(
            "the store must be `sqlite` (the data directory's gateway.sqlite3, the default) or a postgres://USER@HOST:PORT/DATABASE URL (optionally ?schema=NAME)".into(),
        )),
    }
}

/// Where [`open`] keeps state, for messages: the redacted URL, or the SQLite file.
pub fn describe(location: Option<&str>, data_dir: &std::path::Path) -> String {
    match location
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "sqlite")
    {
        Some(url) => evbus::registry::redact(url),
        None => data_dir.join(DB_FILE).display().to_string(),
    }
}

/// SHA-256 (hex) over length-prefixed parts: a content digest where no two different lists
/// of parts collide by concatenation.
/// A time as the stores keep it: Unix milliseconds.
pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// A stored time (Unix milliseconds) back; the epoch if out of range.
pub(crate) fn time(ms: i64) -> DateTime<Utc> {
    use chrono::TimeZone;
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// [`time`] of an optional column.
pub(crate) fn opt_time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.map(time)
}

pub(crate) fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hex::encode(hash.finalize())
}
