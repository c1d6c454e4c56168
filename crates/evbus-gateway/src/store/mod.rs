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
    /// The CloudEvents `source` values (exact, or `*` patterns) the key's published events
    /// may carry ([`keys::check_sources`](crate::keys::check_sources)). Keys created before
    /// sources were bound have `*`.
    pub sources: Vec<String>,
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
    /// Its own publish byte rate (bytes of `POST /v1/events` bodies per second, 1 to
    /// [`MAX_PUBLISH_BYTES_PER_SECOND`]); `None`: the gateway's default
    /// ([`GatewayConfig::publish_bytes_per_second`](crate::GatewayConfig::publish_bytes_per_second)).
    pub publish_bytes_per_second: Option<u64>,
}

/// The largest publish byte rate a key may be given: 1 GiB per second.
pub const MAX_PUBLISH_BYTES_PER_SECOND: u64 = 1 << 30;

/// A publish byte rate read back from a store.
pub(crate) fn publish_bytes_from_column(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0)
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

/// What [`Store::revoke_key_keeping_an_admin`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Revocation {
    /// The key is revoked.
    Revoked,
    /// There is no such key not yet revoked: nothing changed.
    NotActive,
    /// The key is the last active admin key: nothing changed.
    LastAdmin,
}

/// What an owner changes in a webhook (`PATCH /v1/webhooks/{id}`, or a replay re-enabling it):
/// each `Some` member is set, the others are left as they are in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookChange {
    /// The event types delivered.
    pub event_types: Option<Vec<String>>,
    /// The description.
    pub description: Option<String>,
    /// `true` re-enables a disabled endpoint and clears its failure state (`disabled_reason`,
    /// `failing_since`); `false` disables an enabled one with the reason
    /// [`WebhookChange::DISABLED_BY_OWNER`]. Either is nothing on an endpoint already so.
    pub enabled: Option<bool>,
}

impl WebhookChange {
    /// The `disabled_reason` of an endpoint its owner disabled.
    pub const DISABLED_BY_OWNER: &'static str = "disabled by its owner";

    /// Applies the change to a record, as the stores do in place.
    pub fn apply(&self, w: &mut WebhookRecord) {
        if let Some(types) = &self.event_types {
            w.event_types = types.clone();
        }
        if let Some(d) = &self.description {
            w.description = d.clone();
        }
        match self.enabled {
            Some(true) if !w.enabled => {
                w.enabled = true;
                w.disabled_reason = None;
                w.failing_since = None;
            }
            Some(false) if w.enabled => {
                w.enabled = false;
                w.disabled_reason = Some(Self::DISABLED_BY_OWNER.to_owned());
            }
            _ => {}
        }
    }
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
    /// Already recorded with the same content, not sent, and claimed more than
    /// [`PUBLISH_CLAIM_LEASE`] ago (the request that claimed it failed without settling, or
    /// is hung): the claim is now this caller's, to send.
    Unsent,
    /// Already recorded with the same content and claimed less than [`PUBLISH_CLAIM_LEASE`]
    /// ago by another request, which is sending it: not this caller's to send.
    InFlight,
    /// Already accepted with different content.
    Conflict,
}

/// How long a claim of [`Store::claim_publish`] is its request's alone: an identical post
/// meanwhile is told [`PublishClaim::InFlight`] instead of sending the event a second time.
/// Past it, a claim never settled (its request died, or its send hangs) is taken over. Well
/// over the default request timeout (30 s): a request answered 408 may still be sending (its
/// send finishes after the answer), and a retry must not send again meanwhile (a lease
/// equal to the timeout let the retry right after a 408 send a second copy; outside
/// review). Claim times are each instance's clock: instances sharing a store must agree
/// on the time within a fraction of it.
pub const PUBLISH_CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(120);

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
    /// The event's CloudEvents id (the body's `id`; the `webhook-id` header is derived from
    /// it and the event's `source`, [`signing::message_id`](crate::signing::message_id)).
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
    /// The start of the response body (at most [`Attempt::MAX_RESPONSE_BYTES`]).
    pub response: Option<String>,
}

impl Attempt {
    /// Longest response excerpt an attempt keeps, in bytes of UTF-8: the stores cut a longer
    /// one (on a character boundary) before writing it.
    pub const MAX_RESPONSE_BYTES: usize = 1024;
    /// Attempts kept per webhook, the newest: the stores drop a webhook's older attempts
    /// about every 64 attempts it logs, and every webhook's at each [`Store::prune`], so one
    /// endpoint cannot grow the attempt log without bound within the retention. Well above
    /// the 100 that `GET /v1/webhooks/{id}/attempts` shows.
    pub const KEPT_PER_WEBHOOK: u32 = 1_000;

    /// The excerpt of a response body `bytes` that an attempt keeps: decoded as UTF-8 (an
    /// invalid sequence becomes U+FFFD), NUL characters as U+FFFD (PostgreSQL `text` cannot
    /// hold them, so both stores keep the same), then cut to at most
    /// [`MAX_RESPONSE_BYTES`](Self::MAX_RESPONSE_BYTES) on a character boundary. The cut comes
    /// after the decoding, which can triple the size (each invalid byte is 3 bytes of U+FFFD).
    pub fn response_excerpt(bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        let text = if text.contains('\0') {
            text.replace('\0', "\u{fffd}")
        } else {
            text.into_owned()
        };
        cut(&text, Self::MAX_RESPONSE_BYTES).to_owned()
    }
}

/// A webhook's attempts are trimmed to [`Attempt::KEPT_PER_WEBHOOK`] when the store's id of
/// the attempt it just logged is a multiple of this: every 64 attempts of an endpoint that has
/// the log to itself, as often on average otherwise ([`Store::prune`] trims every webhook's).
pub(crate) const ATTEMPT_TRIM_EVERY: i64 = 64;

/// The longest start of `text` of at most `max` bytes that ends on a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The bounds of a replay ([`Store::replay`]): it queues events while all of them hold.
///
/// Budgets are counted in windows of fixed length per webhook: a window opens with the first
/// replay that queues an event to the webhook (once its previous window has closed) and counts
/// every event replays queue to it until it closes; then the webhook's budget is whole again.
/// A deleted webhook's window still counts for its key until it closes, so deleting a webhook
/// and registering it again gives its key no more budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayLimits {
    /// Events one replay may queue
    /// ([`GatewayConfig::max_replay_events`](crate::GatewayConfig::max_replay_events)).
    pub per_replay: u32,
    /// Events replays may queue to one webhook within its window
    /// ([`GatewayConfig::max_replayed_per_day`](crate::GatewayConfig::max_replayed_per_day)).
    pub per_webhook: u64,
    /// Events replays may queue to the webhooks of one owner key (deleted ones included)
    /// within their open windows (the gateway: `max_replayed_per_day` ×
    /// `max_webhooks_per_key`, what that many webhooks could have).
    pub per_key: u64,
    /// The length of a window (the gateway: [`REPLAY_WINDOW`](crate::REPLAY_WINDOW), 24 h).
    pub window: chrono::Duration,
}

/// Which replay budget is spent ([`Replayed::exhausted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayBudget {
    /// The webhook's own ([`ReplayLimits::per_webhook`]).
    Webhook,
    /// Its owner key's, over all the key's webhooks ([`ReplayLimits::per_key`]).
    Key,
}

/// What [`Store::replay`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replayed {
    /// Deliveries queued.
    pub queued: u64,
    /// Events replays may still queue to this webhook before its window (or its key's
    /// earliest) closes: the smaller of what its own budget and its key's leave.
    pub remaining: u64,
    /// The budget that is spent, when `remaining` is 0.
    pub exhausted: Option<ReplayBudget>,
    /// When more budget frees up: the end of the webhook's window, or, when its key's budget
    /// is the one spent, the end of the key's earliest window; `None` when the webhook has
    /// no open window.
    pub resets_at: Option<DateTime<Utc>>,
}

impl Replayed {
    /// Whether nothing could be queued because a budget was already spent (not because no
    /// event was left to queue).
    pub fn refused(&self) -> bool {
        self.queued == 0 && self.exhausted.is_some()
    }
}

/// What replays already queued within open windows, as a store reads it; the arithmetic of
/// [`Store::replay`] shared by the stores, so both behave the same.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReplayUse {
    /// Events queued to the webhook in its open window (0 without one).
    pub(crate) webhook: u64,
    /// When the webhook's open window closes (ms), if it has one.
    pub(crate) webhook_ends: Option<i64>,
    /// Events queued to the owner key's other webhooks in their open windows.
    pub(crate) others: u64,
    /// When the first of those windows closes (ms).
    pub(crate) others_first_end: Option<i64>,
}

impl ReplayUse {
    /// How many events this replay may queue.
    pub(crate) fn allowed(&self, limits: &ReplayLimits) -> u64 {
        self.left(limits, 0).0.min(u64::from(limits.per_replay))
    }

    /// What the budgets leave after `queued` more: the smaller, and the webhook's own.
    fn left(&self, limits: &ReplayLimits, queued: u64) -> (u64, u64) {
        let webhook = limits
            .per_webhook
            .saturating_sub(self.webhook.saturating_add(queued));
        let key = limits.per_key.saturating_sub(
            self.webhook
                .saturating_add(self.others)
                .saturating_add(queued),
        );
        (webhook.min(key), webhook)
    }

    /// The webhook's window after `queued` events more: (end in ms, events counted), or
    /// `None` when nothing changes.
    pub(crate) fn record(
        &self,
        limits: &ReplayLimits,
        now: DateTime<Utc>,
        queued: u64,
    ) -> Option<(i64, i64)> {
        (queued > 0).then(|| {
            let ends = self.webhook_ends.unwrap_or_else(|| ms(now + limits.window));
            let counted = self.webhook.saturating_add(queued);
            (ends, i64::try_from(counted).unwrap_or(i64::MAX))
        })
    }

    /// The answer after `queued` events were queued.
    pub(crate) fn outcome(
        &self,
        limits: &ReplayLimits,
        now: DateTime<Utc>,
        queued: u64,
    ) -> Replayed {
        let (remaining, webhook_left) = self.left(limits, queued);
        let ends = self
            .record(limits, now, queued)
            .map(|(e, _)| e)
            .or(self.webhook_ends);
        let exhausted = match (remaining, webhook_left) {
            (0, 0) => Some(ReplayBudget::Webhook),
            (0, _) => Some(ReplayBudget::Key),
            _ => None,
        };
        let resets_at = match exhausted {
            // The key frees budget when its earliest window closes (this webhook's included).
            Some(ReplayBudget::Key) => match (ends, self.others_first_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            _ => ends,
        };
        Replayed {
            queued,
            remaining,
            exhausted,
            resets_at: opt_time(resets_at),
        }
    }
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

    /// Revokes a key unless it is the last active admin key at `at` (revoking it would lock
    /// every administrator out), in one step: two admin keys revoking each other at the same
    /// moment, through any instances, cannot both succeed. Stores sharing state between
    /// instances must do it atomically; the default reads the keys, then revokes.
    async fn revoke_key_keeping_an_admin(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Revocation> {
        let keys = self.list_keys().await?;
        let admins: Vec<&KeyRecord> = keys.iter().filter(|k| k.admin && k.is_active(at)).collect();
        if admins.len() == 1 && admins[0].id == id {
            return Ok(Revocation::LastAdmin);
        }
        Ok(if self.revoke_key(id, at).await? {
            Revocation::Revoked
        } else {
            Revocation::NotActive
        })
    }

    /// Stores a new webhook.
    async fn insert_webhook(&self, webhook: &WebhookRecord) -> StoreResult<()>;
    /// Stores a new webhook unless its owner key (`webhook.owner_key_id`) already holds
    /// `max_per_key` webhooks; `false` (nothing stored) if it does. Counting and inserting are
    /// one step: registrations for one key made at the same moment, on one instance or on
    /// several sharing the store, never leave the key more than `max_per_key` webhooks (the
    /// gateway's `max_webhooks_per_key`). Stores sharing state between instances must do it
    /// atomically; the default counts, then inserts.
    async fn insert_webhook_within(
        &self,
        webhook: &WebhookRecord,
        max_per_key: usize,
    ) -> StoreResult<bool> {
        let held = self.list_webhooks(Some(&webhook.owner_key_id)).await?.len();
        if held >= max_per_key {
            return Ok(false);
        }
        self.insert_webhook(webhook).await?;
        Ok(true)
    }
    /// One webhook by id.
    async fn get_webhook(&self, id: &str) -> StoreResult<Option<WebhookRecord>>;
    /// Webhooks of one owner key, or all; oldest first.
    async fn list_webhooks(&self, owner: Option<&str>) -> StoreResult<Vec<WebhookRecord>>;
    /// Deletes a webhook and its pending deliveries; `false` if there was none.
    async fn delete_webhook(&self, id: &str) -> StoreResult<bool>;
    /// Replaces a webhook's mutable state: secrets, enabled, failure tracking, event types,
    /// description and allow-list (everything but its id, owner, URL and creation time).
    /// A record read earlier written back with this undoes whatever changed since, on any
    /// instance: the gateway changes webhooks in place instead
    /// ([`change_webhook`](Self::change_webhook),
    /// [`rotate_webhook_secret`](Self::rotate_webhook_secret) and the dispatcher's
    /// [`webhook_failed`](Self::webhook_failed), [`webhook_succeeded`](Self::webhook_succeeded),
    /// [`disable_webhook`](Self::disable_webhook)).
    async fn update_webhook(&self, webhook: &WebhookRecord) -> StoreResult<()>;
    /// Applies an owner's change to a webhook in place, leaving every other column as the
    /// store has it (a secret rotated or failure tracking written meanwhile by any instance
    /// stays); `false` if there is no such webhook. Stores should do it in one statement; the
    /// default reads and replaces the record.
    async fn change_webhook(&self, id: &str, change: &WebhookChange) -> StoreResult<bool> {
        let Some(mut w) = self.get_webhook(id).await? else {
            return Ok(false);
        };
        change.apply(&mut w);
        self.update_webhook(&w).await?;
        Ok(true)
    }
    /// Rotates a webhook's signing secret in place: the current secret becomes the previous
    /// one, signing until `previous_until`, and `secret` the current one; nothing else
    /// changes. With `unless_signing_at`, only if no previous secret still signs at that
    /// instant (so that of two rotations at once, one wins and the other changes nothing).
    /// `false` if there is no such webhook, or it was not rotated for that reason. Stores
    /// should do it in one statement; the default reads and replaces the record.
    async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: DateTime<Utc>,
        unless_signing_at: Option<DateTime<Utc>>,
    ) -> StoreResult<bool> {
        let Some(mut w) = self.get_webhook(id).await? else {
            return Ok(false);
        };
        if let Some(at) = unless_signing_at
            && w.previous_secret.is_some()
            && w.previous_secret_until.is_some_and(|until| until > at)
        {
            return Ok(false);
        }
        w.previous_secret = Some(std::mem::replace(&mut w.secret, secret.to_owned()));
        w.previous_secret_until = Some(previous_until);
        self.update_webhook(&w).await?;
        Ok(true)
    }
    /// Records a successful attempt on the endpoint's failure tracking: clears
    /// `failing_since` and changes nothing else. The dispatcher settles an attempt with this
    /// (and [`webhook_failed`](Self::webhook_failed), [`disable_webhook`](Self::disable_webhook))
    /// rather than [`update_webhook`](Self::update_webhook) of the record it read before the
    /// attempt, so that what the owner changed meanwhile, through any instance (a rotated
    /// secret, event types, disabling), is never written back over. Stores should do it in
    /// one statement; the default reads and replaces the record.
    async fn webhook_succeeded(&self, id: &str) -> StoreResult<()> {
        if let Some(mut w) = self.get_webhook(id).await?
            && w.failing_since.is_some()
        {
            w.failing_since = None;
            self.update_webhook(&w).await?;
        }
        Ok(())
    }
    /// Records a failed attempt on the endpoint's failure tracking: `failing_since` becomes
    /// `at` unless a run of failures is already under way, and nothing else changes (see
    /// [`webhook_succeeded`](Self::webhook_succeeded)). Returns the start of the run, `None`
    /// if there is no such webhook.
    async fn webhook_failed(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let Some(mut w) = self.get_webhook(id).await? else {
            return Ok(None);
        };
        if let Some(since) = w.failing_since {
            return Ok(Some(since));
        }
        w.failing_since = Some(at);
        self.update_webhook(&w).await?;
        Ok(Some(at))
    }
    /// Disables an enabled endpoint with `reason`, changing nothing else (see
    /// [`webhook_succeeded`](Self::webhook_succeeded)); `false` if it was not enabled or does
    /// not exist (a reason its owner gave is kept).
    async fn disable_webhook(&self, id: &str, reason: &str) -> StoreResult<bool> {
        let Some(mut w) = self.get_webhook(id).await? else {
            return Ok(false);
        };
        if !w.enabled {
            return Ok(false);
        }
        w.enabled = false;
        w.disabled_reason = Some(reason.to_owned());
        self.update_webhook(&w).await?;
        Ok(true)
    }

    /// Appends a curated event to the log and queues one delivery per enabled webhook of its
    /// type. Events are unique per (`source`, `id`): an event already logged under them is a
    /// redelivery if its `fingerprint` is the same (nothing is queued twice), a conflict
    /// otherwise (nothing is logged; the caller reports it).
    async fn ingest(&self, event: &NewEvent<'_>) -> StoreResult<Ingested>;
    /// Records that `POST /v1/events` accepts the event (`source`, `id`) with content
    /// `fingerprint`, claimed at `at`, unless that pair is already recorded: then says
    /// whether the recorded content is the same (and whether it reached the bus, or another
    /// request is sending it) or different. Atomic: of identical posts at once, one is told
    /// [`New`](PublishClaim::New) and the others [`InFlight`](PublishClaim::InFlight); an
    /// unsent claim older than [`PUBLISH_CLAIM_LEASE`] is taken over by one of them
    /// ([`Unsent`](PublishClaim::Unsent), its claim time moved to `at`).
    async fn claim_publish(
        &self,
        source: &str,
        id: &str,
        fingerprint: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<PublishClaim>;
    /// Settles the claim of [`claim_publish`](Store::claim_publish) made at `claimed_at`:
    /// marks the event sent, or forgets the claim when the bus refused the event (so that a
    /// retry is not taken for a duplicate). A claim taken over since (its request outlived
    /// [`PUBLISH_CLAIM_LEASE`]) is not forgotten: it is the other request's, which may be
    /// sending the event.
    async fn settle_publish(
        &self,
        source: &str,
        id: &str,
        claimed_at: DateTime<Utc>,
        sent: bool,
    ) -> StoreResult<()>;
    /// Logged events after position `after` whose type is in `types`, at most `limit`, and
    /// no more once their bodies add up to `max_bytes` (the first is always given, however
    /// large): a page holds at most `max_bytes` plus one event.
    async fn events_after(
        &self,
        after: i64,
        types: &[String],
        limit: u32,
        max_bytes: usize,
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
    /// Logs an attempt (its response cut to [`Attempt::MAX_RESPONSE_BYTES`]), and every so
    /// often trims the webhook's log to its newest [`Attempt::KEPT_PER_WEBHOOK`].
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
    /// Queues again every logged event of the webhook's types received at or after `since`,
    /// oldest first, except those with a delivery to this webhook still pending or in flight
    /// (so a repeated replay queues nothing twice), within `limits`: at most
    /// [`per_replay`](ReplayLimits::per_replay), and no more than the webhook's and its owner
    /// key's replay budgets leave at `now` (see [`ReplayLimits`]); the events queued count
    /// against both. Replays of one key's webhooks take turns, on every instance sharing the
    /// store. A webhook that does not exist gets nothing queued.
    async fn replay(
        &self,
        webhook_id: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        limits: &ReplayLimits,
    ) -> StoreResult<Replayed>;
    /// The secret key of stream cursors (the SSE ids): 32 random bytes, created on first use
    /// and the same afterwards (across restarts and for every instance sharing the store).
    async fn stream_cursor_key(&self) -> StoreResult<Vec<u8>>;
    /// Drops logged events received before `before` that no pending delivery needs, and
    /// attempts, settled deliveries, publish claims and replay budget windows older than
    /// that; trims every webhook's attempts to its newest [`Attempt::KEPT_PER_WEBHOOK`];
    /// returns the events dropped.
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
/// The `replay_budgets` row (this prefix and the owner's key id) that holds what the owner's
/// deleted webhooks replayed in windows still open: one row per owner, whatever the number of
/// webhooks it deleted. No webhook id starts with it (they are UUIDs).
pub(crate) const DELETED_WEBHOOKS_BUDGET: &str = "deleted-webhooks:";

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// [`PUBLISH_CLAIM_LEASE`] in milliseconds, as claim times are stored.
pub(crate) fn lease_ms() -> i64 {
    i64::try_from(PUBLISH_CLAIM_LEASE.as_millis()).unwrap_or(i64::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_excerpt_is_cut_after_decoding_on_a_character_boundary() {
        // Invalid bytes decode to U+FFFD, 3 bytes each: 1 KiB of them would be 3 KiB.
        let invalid = Attempt::response_excerpt(&[0xff; 1024]);
        assert_eq!(invalid, "\u{fffd}".repeat(341));
        assert!(invalid.len() <= Attempt::MAX_RESPONSE_BYTES);
        // Valid text up to the limit is kept whole; a character across it is dropped whole.
        let text = "a".repeat(1023) + "é";
        assert_eq!(Attempt::response_excerpt(text.as_bytes()), "a".repeat(1023));
        assert_eq!(Attempt::response_excerpt(b"ok"), "ok");
        // NUL as U+FFFD, as PostgreSQL would have it.
        assert_eq!(Attempt::response_excerpt(b"a\0b"), "a\u{fffd}b");
    }
}
