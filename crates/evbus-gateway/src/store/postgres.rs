//! The PostgreSQL store: gateway state shared by several `evbus serve` instances (sqlx,
//! migrations applied at open, one schema of its own).
//!
//! What makes several instances safe on one store:
//! - log positions are handed out in commit order (ingest takes the `ingest` turn row), so a
//!   stream or fan-out that read up to position N never misses a position below N that
//!   commits later;
//! - delivery claims take the `claim` turn row (one claim at a time, so per-key in-flight
//!   limits count every instance's leases exactly) and lock the rows they take with
//!   `FOR UPDATE SKIP LOCKED` (never waiting on a row another instance is settling); a
//!   claimed row carries a lease, and a row whose lease ran out (its instance died) is
//!   claimed again by any instance;
//! - per-key bounds counted in the store are counted and spent in one transaction holding a
//!   lock of the key (until commit): webhook registrations of one key take turns (the count
//!   against `max_webhooks_per_key` and the insert), and so do its replays (the budgets read
//!   and spent), on every instance;
//! - ingests and revocations `NOTIFY` the schema's channel, so the other instances wake their
//!   streams and dispatchers at once ([`Store::signals`]); the gateway also polls.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};

use super::sealing::{self, SecretsKey};
use super::{
    ATTEMPT_TRIM_EVERY, Attempt, DELETED_WEBHOOKS_BUDGET, Delivery, DeliveryOutcome, Ingested,
    KeyRecord, NewEvent, PublishClaim, RateLimit, ReplayLimits, ReplayUse, Replayed, Revocation,
    Signal, Store, StoreError, StoreResult, StoredEvent, WebhookChange, WebhookRecord, cut,
    lease_ms, ms, opt_time, time,
};

/// The schema of the gateway's tables when the URL names none.
pub const DEFAULT_SCHEMA: &str = "evbus_gateway";

/// Gateway state in a PostgreSQL schema, shared by every instance given the same URL.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: String,
    /// The NOTIFY channel of the schema.
    channel: String,
    /// Seals webhook signing secrets at rest ([`PostgresStore::seal_secrets`]).
    secrets: Option<std::sync::Arc<SecretsKey>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("sealed", &self.secrets.is_some())
            .finish_non_exhaustive()
    }
}

/// Free text as PostgreSQL `text` takes it: a NUL character (which `text` cannot hold, and
/// which a webhook response or a description may carry) becomes U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn opt_text(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(text)
}

/// Whether `name` is a usable schema name: 1 to 40 lower-case ASCII letters, digits and
/// `_`, not starting with a digit (it is quoted into statements and names the NOTIFY
/// channel). Lower case because `search_path` folds an unquoted name to lower case: `Gw`
/// would be created as `"Gw"` and then looked up as `gw`.
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// The store's own URL parameters (`schema`, `max_connections`), taken out of `url`; the
/// rest of the URL goes to the driver.
fn split_url(url: &str) -> StoreResult<(String, String, u32)> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        StoreError(format!(
            "the PostgreSQL store URL is not a URL ({e}); expected postgres://USER@HOST:PORT/DATABASE?schema=NAME"
        ))
    })?;
    let mut schema = DEFAULT_SCHEMA.to_owned();
    let mut max_connections = 10u32;
    let mut rest = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "schema" => schema = v.into_owned(),
            "max_connections" => {
                max_connections = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    StoreError(
                        "the store URL's max_connections must be a whole number of at least 1"
                            .into(),
                    )
                })?;
            }
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    if !valid_schema(&schema) {
        return Err(StoreError(
            "the store URL's schema must be 1 to 40 lower-case letters, digits and `_`, not starting with a digit".into(),
        ));
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok((parsed.into(), schema, max_connections))
}

impl PostgresStore {
    /// Opens the store at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`, with an
    /// optional `schema=NAME`, default [`DEFAULT_SCHEMA`], and `max_connections=N`, default
    /// 10): creates the schema if needed and applies migrations. Several instances may open
    /// the same URL at once.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let (url, schema, max_connections) = split_url(url)?;
        let options: PgConnectOptions = url.parse().map_err(|e| {
            StoreError(format!(
                "reading the PostgreSQL store URL {}: {e}",
                evbus::registry::redact(&url)
            ))
        })?;
        let options = options
            .application_name("evbus-gateway")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError(format!(
                    "connecting to the PostgreSQL store at {}: {e}",
                    evbus::registry::redact(&url)
                ))
            })?;
        // Concurrent `CREATE SCHEMA IF NOT EXISTS` can collide: one instance at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('evbus-gateway schema ' || $1))")
            .bind(&schema)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        sqlx::migrate!("./migrations-postgres")
            .run(&pool)
            .await
            .map_err(|e| {
                StoreError(format!(
                    "migrating the gateway tables in schema {schema}: {e} (a schema holds one gateway's tables; give another with ?schema=NAME)"
                ))
            })?;
        Ok(PostgresStore {
            pool,
            channel: format!("evbus_gateway_{schema}"),
            schema,
            secrets: None,
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Seals webhook signing secrets at rest with `key` from now on (see [`SecretsKey`]):
    /// secrets stored in clear are sealed now, and every secret already sealed must open with
    /// `key` (else an error, before anything is changed). Every instance sharing the store
    /// must be given the same key.
    pub async fn seal_secrets(mut self, key: SecretsKey) -> StoreResult<Self> {
        let rows = sqlx::query("SELECT id, secret, previous_secret FROM webhooks")
            .fetch_all(&self.pool)
            .await?;
        let mut clear = Vec::new();
        for row in &rows {
            let id: String = row.get("id");
            let secret: String = row.get("secret");
            let previous: Option<String> = row.get("previous_secret");
            let sealed = sealing::is_sealed(&secret);
            let secret = sealing::open(Some(&key), &id, secret)?;
            let previous = match previous {
                Some(p) => Some(sealing::open(Some(&key), &id, p)?),
                None => None,
            };
            if !sealed {
                clear.push((id, secret, previous));
            }
        }
        let mut tx = self.pool.begin().await?;
        for (id, secret, previous) in &clear {
            let previous = match previous {
                Some(p) => Some(key.seal(id, p)?),
                None => None,
            };
            // Only while still in clear: another instance may be sealing them too.
            sqlx::query(
                "UPDATE webhooks SET secret = $1, previous_secret = $2
                 WHERE id = $3 AND secret NOT LIKE 'sealed:%'",
            )
            .bind(key.seal(id, secret)?)
            .bind(previous)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if !clear.is_empty() {
            tracing::info!(
                webhooks = clear.len(),
                "sealed webhook secrets stored in clear"
            );
        }
        self.secrets = Some(std::sync::Arc::new(key));
        Ok(self)
    }

    fn sealed(&self, id: &str, secret: Option<&str>) -> StoreResult<Option<String>> {
        sealing::seal_opt(self.secrets.as_deref(), id, secret)
    }

    fn webhook_from(&self, row: &PgRow) -> StoreResult<WebhookRecord> {
        let mut w = webhook_from(row);
        sealing::open_webhook(self.secrets.as_deref(), &mut w)?;
        Ok(w)
    }

    /// Inserts webhook `w` (its secrets sealed) through `conn`.
    async fn write_webhook(&self, conn: &mut PgConnection, w: &WebhookRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, owner_key_id, url, event_types, description, allow, secret,
                previous_secret, previous_secret_until, enabled, disabled_reason, failing_since, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&w.id)
        .bind(&w.owner_key_id)
        .bind(text(&w.url))
        .bind(&w.event_types)
        .bind(text(&w.description))
        .bind(&w.allow)
        .bind(self.sealed(&w.id, Some(&w.secret))?)
        .bind(self.sealed(&w.id, w.previous_secret.as_deref())?)
        .bind(w.previous_secret_until.map(ms))
        .bind(w.enabled)
        .bind(opt_text(w.disabled_reason.as_deref()))
        .bind(w.failing_since.map(ms))
        .bind(ms(w.created_at))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Closes the connection pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Drops the store's schema and everything in it (tests; irreversible).
    pub async fn drop_schema(&self) -> StoreResult<()> {
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn key_from(row: &PgRow) -> KeyRecord {
    KeyRecord {
        id: row.get("id"),
        name: row.get("name"),
        secret_hash: row.get("secret_hash"),
        subscribe: row.get("subscribe"),
        publish: row.get("publish"),
        sources: row.get("sources"),
        admin: row.get("admin"),
        created_at: time(row.get("created_at")),
        expires_at: opt_time(row.get("expires_at")),
        revoked_at: opt_time(row.get("revoked_at")),
        rate_limit: RateLimit::from_columns(
            row.get("rate_limit_per_second"),
            row.get("rate_limit_burst"),
        ),
        publish_bytes_per_second: super::publish_bytes_from_column(
            row.get("publish_bytes_per_second"),
        ),
    }
}

fn webhook_from(row: &PgRow) -> WebhookRecord {
    WebhookRecord {
        id: row.get("id"),
        owner_key_id: row.get("owner_key_id"),
        url: row.get("url"),
        event_types: row.get("event_types"),
        description: row.get("description"),
        allow: row.get("allow"),
        secret: row.get("secret"),
        previous_secret: row.get("previous_secret"),
        previous_secret_until: opt_time(row.get("previous_secret_until")),
        enabled: row.get("enabled"),
        disabled_reason: row.get("disabled_reason"),
        failing_since: opt_time(row.get("failing_since")),
        created_at: time(row.get("created_at")),
    }
}

fn event_from(row: &PgRow) -> StoredEvent {
    StoredEvent {
        seq: row.get("seq"),
        source: row.get("source"),
        id: row.get("id"),
        ty: row.get("type"),
        received_at: time(row.get("received_at")),
        body: row.get("body"),
    }
}

/// Reads the NOTIFY payloads of the schema's channel into signals until `tx` closes.
async fn listen(pool: PgPool, channel: String, tx: tokio::sync::mpsc::Sender<Signal>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let connect = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = tx.closed() => return,
            l = connect => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "gateway store: LISTEN failed; polling meanwhile");
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        delay = Duration::from_millis(100);
        // Whatever happened while not listening.
        let _ = tx.try_send(Signal::Lost);
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                n = listener.try_recv() => n,
            };
            let signal = match next {
                Ok(Some(n)) => {
                    let payload = n.payload();
                    if payload == "revoked" {
                        Signal::Revoked
                    } else if let Some(seq) = payload.strip_prefix("logged ") {
                        match seq.parse() {
                            Ok(seq) => Signal::Logged(seq),
                            Err(_) => continue,
                        }
                    } else {
                        continue;
                    }
                }
                // Lost: the next `try_recv` reconnects and listens again.
                Ok(None) => Signal::Lost,
                Err(e) => {
                    tracing::debug!(error = %e, "gateway store: LISTEN connection lost");
                    let _ = tx.try_send(Signal::Lost);
                    break;
                }
            };
            // A full queue: the gateway is behind and polls anyway.
            let _ = tx.try_send(signal);
        }
    }
}

/// Settles delivery `id` after an attempt (which counts).
async fn settle_delivery(
    conn: &mut PgConnection,
    id: i64,
    outcome: DeliveryOutcome,
) -> StoreResult<()> {
    let (state, next) = outcome.columns();
    sqlx::query(
        "UPDATE deliveries SET state = $1, attempts = attempts + 1, lease_until = NULL,
            next_attempt_at = COALESCE($2, next_attempt_at) WHERE id = $3",
    )
    .bind(state)
    .bind(next)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Logs attempt `a` (its response cut to [`Attempt::MAX_RESPONSE_BYTES`], after a NUL became
/// U+FFFD); every [`ATTEMPT_TRIM_EVERY`] ids, trims its webhook's attempts to the newest
/// [`Attempt::KEPT_PER_WEBHOOK`].
async fn insert_attempt(conn: &mut PgConnection, a: &Attempt) -> StoreResult<()> {
    let response = opt_text(a.response.as_deref());
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO attempts (webhook_id, delivery_id, event_id, attempt, at, status, latency_ms, error, response)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
    )
    .bind(&a.webhook_id)
    .bind(a.delivery_id)
    .bind(text(&a.event_id))
    .bind(i32::try_from(a.attempt).unwrap_or(i32::MAX))
    .bind(ms(a.at))
    .bind(a.status.map(i32::from))
    .bind(i64::try_from(a.latency_ms).unwrap_or(i64::MAX))
    .bind(opt_text(a.error.as_deref()))
    .bind(response.as_deref().map(|r| cut(r, Attempt::MAX_RESPONSE_BYTES)))
    .fetch_one(&mut *conn)
    .await?;
    if id % ATTEMPT_TRIM_EVERY == 0 {
        trim_attempts(conn, &a.webhook_id).await?;
    }
    Ok(())
}

/// Drops webhook `webhook_id`'s attempts older than its newest [`Attempt::KEPT_PER_WEBHOOK`]
/// (read through the `(webhook_id, id)` index: as many steps as attempts kept).
async fn trim_attempts(conn: &mut PgConnection, webhook_id: &str) -> StoreResult<()> {
    sqlx::query(
        "DELETE FROM attempts WHERE webhook_id = $1 AND id < (
           SELECT id FROM attempts WHERE webhook_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
    )
    .bind(text(webhook_id))
    .bind(i64::from(Attempt::KEPT_PER_WEBHOOK) - 1)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What replays already queued to webhook `webhook_id` and to the other webhooks of `owner`
/// in windows still open at `now` (ms).
async fn replay_use(
    conn: &mut PgConnection,
    webhook_id: &str,
    owner: &str,
    now: i64,
) -> StoreResult<ReplayUse> {
    let own = sqlx::query(
        "SELECT window_ends_at, replayed FROM replay_budgets WHERE webhook_id = $1 AND window_ends_at > $2",
    )
    .bind(text(webhook_id))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let others = sqlx::query(
        "SELECT COALESCE(SUM(replayed), 0)::BIGINT AS used, MIN(window_ends_at) AS first_end
         FROM replay_budgets WHERE owner_key_id = $1 AND webhook_id <> $2 AND window_ends_at > $3",
    )
    .bind(owner)
    .bind(text(webhook_id))
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(ReplayUse {
        webhook: own
            .as_ref()
            .map_or(0, |r| r.get::<i64, _>("replayed").max(0) as u64),
        webhook_ends: own.as_ref().map(|r| r.get("window_ends_at")),
        others: others.get::<i64, _>("used").max(0) as u64,
        others_first_end: others.get("first_end"),
    })
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_key(&self, key: &KeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, secret_hash, subscribe, publish, admin, created_at, expires_at, revoked_at, rate_limit_per_second, rate_limit_burst, sources, publish_bytes_per_second)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&key.id)
        .bind(text(&key.name))
        .bind(&key.secret_hash)
        .bind(&key.subscribe)
        .bind(&key.publish)
        .bind(key.admin)
        .bind(ms(key.created_at))
        .bind(key.expires_at.map(ms))
        .bind(key.revoked_at.map(ms))
        .bind(key.rate_limit.map(|l| i64::from(l.per_second)))
        .bind(key.rate_limit.map(|l| i64::from(l.burst)))
        .bind(&key.sources)
        .bind(key.publish_bytes_per_second.and_then(|n| i64::try_from(n).ok()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
            .bind(text(id))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_from))
    }

    async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(key_from).collect())
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        // The NOTIFY goes out with the commit: other instances end the key's streams at once.
        let revoked: i64 = sqlx::query_scalar(
            "WITH r AS (UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING id)
             SELECT COUNT(*) FROM (SELECT pg_notify($3, 'revoked') FROM r) n",
        )
        .bind(ms(at))
        .bind(text(id))
        .bind(&self.channel)
        .fetch_one(&self.pool)
        .await?;
        Ok(revoked > 0)
    }

    async fn revoke_key_keeping_an_admin(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Revocation> {
        let mut tx = self.pool.begin().await?;
        // The active admin keys, locked until this transaction ends: a concurrent revocation
        // (on any instance) waits, then sees this one's outcome (a row it revoked no longer
        // matches when the lock is granted), so two admin keys revoking each other cannot
        // both succeed.
        let admins: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM api_keys
             WHERE admin AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)
             ORDER BY id FOR UPDATE",
        )
        .bind(ms(at))
        .fetch_all(&mut *tx)
        .await?;
        if admins.len() == 1 && admins[0] == id {
            return Ok(Revocation::LastAdmin);
        }
        // The NOTIFY goes out with the commit: other instances end the key's streams at once.
        let revoked: i64 = sqlx::query_scalar(
            "WITH r AS (UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING id)
             SELECT COUNT(*) FROM (SELECT pg_notify($3, 'revoked') FROM r) n",
        )
        .bind(ms(at))
        .bind(text(id))
        .bind(&self.channel)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if revoked > 0 {
            Revocation::Revoked
        } else {
            Revocation::NotActive
        })
    }

    async fn insert_webhook(&self, w: &WebhookRecord) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        self.write_webhook(&mut conn, w).await
    }

    async fn insert_webhook_within(
        &self,
        w: &WebhookRecord,
        max_per_key: usize,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // Registrations for one key take turns, on every instance (a lock held until
        // commit): two of them counting at once would both see room for one more. The count
        // is read after the turn is granted, so it sees every insert of the turns before.
        // A lock of its own rather than the key's row: the owner needs no row in `api_keys`.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext('evbus-gateway webhooks ' || $1 || ' ' || $2))",
        )
        .bind(&self.schema)
        .bind(text(&w.owner_key_id))
        .execute(&mut *tx)
        .await?;
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks WHERE owner_key_id = $1")
            .bind(text(&w.owner_key_id))
            .fetch_one(&mut *tx)
            .await?;
        if held >= i64::try_from(max_per_key).unwrap_or(i64::MAX) {
            return Ok(false);
        }
        self.write_webhook(&mut tx, w).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn get_webhook(&self, id: &str) -> StoreResult<Option<WebhookRecord>> {
        let row = sqlx::query("SELECT * FROM webhooks WHERE id = $1")
            .bind(text(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| self.webhook_from(r)).transpose()
    }

    async fn list_webhooks(&self, owner: Option<&str>) -> StoreResult<Vec<WebhookRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM webhooks WHERE ($1::text IS NULL OR owner_key_id = $1) ORDER BY created_at, id",
        )
        .bind(opt_text(owner))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.webhook_from(r)).collect()
    }

    async fn delete_webhook(&self, id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(text(id))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE webhook_id = $1 AND state IN ('pending', 'in_flight')",
        )
        .bind(text(id))
        .execute(&mut *tx)
        .await?;
        // As on SQLite: its attempts go, its replay budget is folded into its owner's row.
        sqlx::query("DELETE FROM attempts WHERE webhook_id = $1")
            .bind(text(id))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO replay_budgets (webhook_id, owner_key_id, window_ends_at, replayed)
             SELECT $3 || owner_key_id, owner_key_id, window_ends_at, replayed
             FROM replay_budgets WHERE webhook_id = $1 AND window_ends_at > $2
             ON CONFLICT (webhook_id) DO UPDATE SET
               replayed = CASE WHEN replay_budgets.window_ends_at > $2
                 THEN replay_budgets.replayed + excluded.replayed ELSE excluded.replayed END,
               window_ends_at = CASE WHEN replay_budgets.window_ends_at > $2
                 THEN GREATEST(replay_budgets.window_ends_at, excluded.window_ends_at)
                 ELSE excluded.window_ends_at END",
        )
        .bind(text(id))
        .bind(ms(Utc::now()))
        .bind(DELETED_WEBHOOKS_BUDGET)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM replay_budgets WHERE webhook_id = $1")
            .bind(text(id))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn update_webhook(&self, w: &WebhookRecord) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhooks SET secret = $1, previous_secret = $2, previous_secret_until = $3,
                enabled = $4, disabled_reason = $5, failing_since = $6, event_types = $7,
                description = $8, allow = $9 WHERE id = $10",
        )
        .bind(self.sealed(&w.id, Some(&w.secret))?)
        .bind(self.sealed(&w.id, w.previous_secret.as_deref())?)
        .bind(w.previous_secret_until.map(ms))
        .bind(w.enabled)
        .bind(opt_text(w.disabled_reason.as_deref()))
        .bind(w.failing_since.map(ms))
        .bind(&w.event_types)
        .bind(text(&w.description))
        .bind(&w.allow)
        .bind(&w.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn change_webhook(&self, id: &str, change: &WebhookChange) -> StoreResult<bool> {
        // Every right-hand side reads the row as it was: one statement, nothing read before.
        let done = sqlx::query(
            "UPDATE webhooks SET
                event_types = COALESCE($2, event_types),
                description = COALESCE($3, description),
                disabled_reason = CASE WHEN $4::BOOLEAN IS NULL OR $4 = enabled THEN disabled_reason
                                       WHEN $4 THEN NULL ELSE $5 END,
                failing_since = CASE WHEN $4 AND NOT enabled THEN NULL ELSE failing_since END,
                enabled = COALESCE($4, enabled)
             WHERE id = $1",
        )
        .bind(text(id))
        .bind(change.event_types.as_ref())
        .bind(change.description.as_deref().map(text))
        .bind(change.enabled)
        .bind(WebhookChange::DISABLED_BY_OWNER)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
        previous_until: DateTime<Utc>,
        unless_signing_at: Option<DateTime<Utc>>,
    ) -> StoreResult<bool> {
        // The current secret moves as it is stored (sealed ones are bound to the webhook id,
        // not to the column).
        let done = sqlx::query(
            "UPDATE webhooks SET previous_secret = secret, secret = $2, previous_secret_until = $3
             WHERE id = $1 AND ($4::BIGINT IS NULL OR previous_secret IS NULL
                 OR previous_secret_until IS NULL OR previous_secret_until <= $4)",
        )
        .bind(text(id))
        .bind(self.sealed(id, Some(secret))?)
        .bind(ms(previous_until))
        .bind(unless_signing_at.map(ms))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn webhook_succeeded(&self, id: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhooks SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
        )
        .bind(text(id))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook_failed(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let since: Option<i64> = sqlx::query_scalar(
            "UPDATE webhooks SET failing_since = COALESCE(failing_since, $2) WHERE id = $1
             RETURNING failing_since",
        )
        .bind(text(id))
        .bind(ms(at))
        .fetch_optional(&self.pool)
        .await?;
        Ok(since.map(time))
    }

    async fn disable_webhook(&self, id: &str, reason: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE webhooks SET enabled = FALSE, disabled_reason = $2 WHERE id = $1 AND enabled",
        )
        .bind(text(id))
        .bind(text(reason))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ingest(&self, e: &NewEvent<'_>) -> StoreResult<Ingested> {
        let mut tx = self.pool.begin().await?;
        // Positions in commit order: the turn is held until this transaction ends.
        sqlx::query("SELECT name FROM turns WHERE name = 'ingest' FOR UPDATE")
            .execute(&mut *tx)
            .await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (source, id, type, received_at, fingerprint, body)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (source, id) DO NOTHING RETURNING seq",
        )
        .bind(text(e.source))
        .bind(text(e.id))
        .bind(e.ty)
        .bind(ms(e.received_at))
        .bind(e.fingerprint)
        .bind(text(e.body))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seq) = inserted else {
            let existing: Option<String> =
                sqlx::query_scalar("SELECT fingerprint FROM events WHERE source = $1 AND id = $2")
                    .bind(text(e.source))
                    .bind(text(e.id))
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(match existing {
                Some(f) if f != e.fingerprint => Ingested::Conflict,
                _ => Ingested::Redelivered,
            });
        };
        sqlx::query(
            "INSERT INTO deliveries (webhook_id, event_seq, replay, state, attempts, next_attempt_at, created_at)
             SELECT w.id, $1, FALSE, 'pending', 0, $2, $2
             FROM webhooks w WHERE w.enabled AND $3 = ANY (w.event_types)
             ON CONFLICT DO NOTHING",
        )
        .bind(seq)
        .bind(ms(e.received_at))
        .bind(e.ty)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(format!("logged {seq}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ingested::Logged(seq))
    }

    async fn claim_publish(
        &self,
        source: &str,
        id: &str,
        fingerprint: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<PublishClaim> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO published (source, id, fingerprint, sent, received_at) VALUES ($1, $2, $3, FALSE, $4)
             ON CONFLICT (source, id) DO NOTHING",
        )
        .bind(text(source))
        .bind(text(id))
        .bind(fingerprint)
        .bind(ms(at))
        .execute(&mut *tx)
        .await?;
        let claim = if inserted.rows_affected() > 0 {
            PublishClaim::New
        } else {
            // Locked: of identical posts at once, one takes an expired claim over.
            let row = sqlx::query(
                "SELECT fingerprint, sent, received_at FROM published WHERE source = $1 AND id = $2 FOR UPDATE",
            )
            .bind(text(source))
            .bind(text(id))
            .fetch_one(&mut *tx)
            .await?;
            let claimed: i64 = row.get("received_at");
            if row.get::<String, _>("fingerprint") != fingerprint {
                PublishClaim::Conflict
            } else if row.get::<bool, _>("sent") {
                PublishClaim::Sent
            } else if ms(at) - claimed < lease_ms() {
                PublishClaim::InFlight
            } else {
                sqlx::query("UPDATE published SET received_at = $3 WHERE source = $1 AND id = $2")
                    .bind(text(source))
                    .bind(text(id))
                    .bind(ms(at))
                    .execute(&mut *tx)
                    .await?;
                PublishClaim::Unsent
            }
        };
        tx.commit().await?;
        Ok(claim)
    }

    async fn settle_publish(
        &self,
        source: &str,
        id: &str,
        claimed_at: DateTime<Utc>,
        sent: bool,
    ) -> StoreResult<()> {
        let query = if sent {
            sqlx::query("UPDATE published SET sent = TRUE WHERE source = $1 AND id = $2")
                .bind(text(source))
                .bind(text(id))
        } else {
            sqlx::query(
                "DELETE FROM published WHERE source = $1 AND id = $2 AND NOT sent AND received_at = $3",
            )
            .bind(text(source))
            .bind(text(id))
            .bind(ms(claimed_at))
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    async fn events_after(
        &self,
        after: i64,
        types: &[String],
        limit: u32,
        max_bytes: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        // `page_before`: the bytes of the page's bodies ahead of each row. `octet_length`
        // reads a large body's size without fetching it; only the rows kept are read whole.
        let rows = sqlx::query(
            "SELECT e.* FROM events AS e JOIN (
                SELECT seq, (SUM(n) OVER (ORDER BY seq) - n)::bigint AS page_before
                FROM (SELECT seq, octet_length(body)::bigint AS n FROM events
                      WHERE seq > $1 AND type = ANY ($2) ORDER BY seq LIMIT $3) AS sizes
             ) AS p ON e.seq = p.seq
             WHERE p.page_before < $4 ORDER BY e.seq",
        )
        .bind(after)
        .bind(types)
        .bind(i64::from(limit))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX).max(1))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(event_from).collect())
    }

    async fn latest_seq(&self) -> StoreResult<i64> {
        let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::bigint FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq)
    }

    async fn get_event(&self, seq: i64) -> StoreResult<Option<StoredEvent>> {
        let row = sqlx::query("SELECT * FROM events WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(event_from))
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        busy: &[String],
        per_webhook: u32,
        per_owner: u32,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        let mut tx = self.pool.begin().await?;
        // One claim at a time across instances: the in-flight counts below are exact.
        sqlx::query("SELECT name FROM turns WHERE name = 'claim' FOR UPDATE")
            .execute(&mut *tx)
            .await?;
        // The ranking of the SQLite store over the same candidates (each enabled endpoint's
        // first `per_webhook` due deliveries, read through its index, and the expired
        // leases; `rn` within an endpoint, `rn_owner` within an owner key, owners taking
        // turns, the leases every instance holds counted against `per_webhook` and
        // `per_owner`); the rows picked are then locked, skipping any row another instance
        // is settling right now, and checked due again.
        let rows = sqlx::query(
            "WITH held AS (
               SELECT d.webhook_id, w.owner_key_id AS owner, COUNT(*) AS n
               FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id
               WHERE d.state = 'in_flight' AND d.lease_until >= $1
               GROUP BY d.webhook_id, w.owner_key_id
             ),
             held_owner AS (
               SELECT owner, SUM(n)::BIGINT AS n FROM held GROUP BY owner
             ),
             picked AS (
               SELECT c.id FROM (
                 SELECT id, next_attempt_at, owner, rn,
                        ROW_NUMBER() OVER (PARTITION BY owner ORDER BY rn, next_attempt_at, id) AS rn_owner
                 FROM (
                   SELECT r.id, r.next_attempt_at, r.owner, r.rn FROM (
                     SELECT id, webhook_id, next_attempt_at, owner,
                            ROW_NUMBER() OVER (PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS rn
                     FROM (
                       SELECT d.id, w.id AS webhook_id, d.next_attempt_at, w.owner_key_id AS owner
                       FROM webhooks w CROSS JOIN LATERAL (
                         SELECT d3.id, d3.next_attempt_at FROM deliveries d3
                         WHERE d3.webhook_id = w.id AND d3.state = 'pending' AND d3.next_attempt_at <= $1
                         ORDER BY d3.next_attempt_at, d3.id LIMIT $4
                       ) d
                       WHERE w.enabled AND NOT (w.id = ANY ($3))
                       UNION ALL
                       SELECT d.id, d.webhook_id, d.next_attempt_at, w.owner_key_id AS owner
                       FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id
                       WHERE d.state = 'in_flight' AND d.lease_until < $1
                         AND w.enabled AND NOT (w.id = ANY ($3))
                     ) candidates
                   ) r LEFT JOIN held hw ON hw.webhook_id = r.webhook_id
                   WHERE r.rn <= $4 - COALESCE(hw.n, 0)
                 ) within_endpoints
               ) c LEFT JOIN held_owner h ON h.owner = c.owner
               WHERE c.rn_owner <= $5 - COALESCE(h.n, 0)
               ORDER BY c.rn_owner, c.next_attempt_at, c.id LIMIT $6
             ),
             locked AS (
               SELECT d.id FROM deliveries d
               WHERE d.id IN (SELECT id FROM picked)
                 AND ((d.state = 'pending' AND d.next_attempt_at <= $1)
                      OR (d.state = 'in_flight' AND d.lease_until < $1))
               FOR UPDATE SKIP LOCKED
             )
             UPDATE deliveries SET state = 'in_flight', lease_until = $2
             WHERE id IN (SELECT id FROM locked)
             RETURNING id, webhook_id, event_seq, attempts",
        )
        .bind(ms(now))
        .bind(ms(lease_until))
        .bind(busy)
        .bind(i64::from(per_webhook))
        .bind(i64::from(per_owner))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut claimed: Vec<Delivery> = rows
            .iter()
            .map(|r| Delivery {
                id: r.get("id"),
                webhook_id: r.get("webhook_id"),
                event_seq: r.get("event_seq"),
                attempts: r.get::<i32, _>("attempts").max(0) as u32,
            })
            .collect();
        claimed.sort_by_key(|d| d.id);
        Ok(claimed)
    }

    async fn finish_delivery(&self, id: i64, outcome: DeliveryOutcome) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        settle_delivery(&mut conn, id, outcome).await
    }

    async fn next_due(&self) -> StoreResult<Option<DateTime<Utc>>> {
        let due: Option<i64> = sqlx::query_scalar(
            // Each enabled endpoint's first pending delivery (through its index) and the
            // earliest lease: not a scan of every pending delivery.
            "SELECT MIN(due) FROM (
               SELECT (SELECT d.next_attempt_at FROM deliveries d
                       WHERE d.webhook_id = w.id AND d.state = 'pending'
                       ORDER BY d.next_attempt_at LIMIT 1) AS due
               FROM webhooks w WHERE w.enabled
               UNION ALL
               SELECT MIN(d.lease_until) FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id
               WHERE d.state = 'in_flight' AND w.enabled
             ) dues",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(opt_time(due))
    }

    async fn record_attempt(&self, a: &Attempt) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        insert_attempt(&mut conn, a).await
    }

    async fn finish_attempt(&self, a: &Attempt, outcome: DeliveryOutcome) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        insert_attempt(&mut tx, a).await?;
        settle_delivery(&mut tx, a.delivery_id, outcome).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>> {
        let rows =
            sqlx::query("SELECT * FROM attempts WHERE webhook_id = $1 ORDER BY id DESC LIMIT $2")
                .bind(text(webhook_id))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| Attempt {
                id: r.get("id"),
                webhook_id: r.get("webhook_id"),
                delivery_id: r.get("delivery_id"),
                event_id: r.get("event_id"),
                attempt: r.get::<i32, _>("attempt").max(0) as u32,
                at: time(r.get("at")),
                status: r
                    .get::<Option<i32>, _>("status")
                    .map(|s| u16::try_from(s).unwrap_or(0)),
                latency_ms: r.get::<i64, _>("latency_ms").max(0) as u64,
                error: r.get("error"),
                response: r.get("response"),
            })
            .collect())
    }

    async fn replay(
        &self,
        webhook_id: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        limits: &ReplayLimits,
    ) -> StoreResult<Replayed> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner_key_id FROM webhooks WHERE id = $1")
                .bind(text(webhook_id))
                .fetch_optional(&mut *tx)
                .await?;
        let Some(owner) = owner else {
            return Ok(ReplayUse::default().outcome(limits, now, 0));
        };
        // Two replays of one endpoint at once (on two instances) would both see no pending
        // delivery, and two replays of one key's endpoints would both read the key's budget
        // before either spends it: replays of one key take turns (a lock held until commit).
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext('evbus-gateway replay ' || $1 || ' ' || $2))",
        )
        .bind(&self.schema)
        .bind(&owner)
        .execute(&mut *tx)
        .await?;
        let used = replay_use(&mut tx, webhook_id, &owner, ms(now)).await?;
        let allowed = used.allowed(limits);
        if allowed == 0 {
            return Ok(used.outcome(limits, now, 0));
        }
        let done = sqlx::query(
            "INSERT INTO deliveries (webhook_id, event_seq, replay, state, attempts, next_attempt_at, created_at)
             SELECT w.id, e.seq, TRUE, 'pending', 0, $3, $3
             FROM webhooks w JOIN events e ON e.type = ANY (w.event_types)
             WHERE w.id = $1 AND e.received_at >= $2
               AND NOT EXISTS (SELECT 1 FROM deliveries d
                                WHERE d.webhook_id = w.id AND d.event_seq = e.seq
                                  AND d.state IN ('pending', 'in_flight'))
             ORDER BY e.seq LIMIT $4",
        )
        .bind(text(webhook_id))
        .bind(ms(since))
        .bind(ms(now))
        .bind(i64::try_from(allowed).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        let queued = done.rows_affected();
        if let Some((ends, counted)) = used.record(limits, now, queued) {
            sqlx::query(
                "INSERT INTO replay_budgets (webhook_id, owner_key_id, window_ends_at, replayed)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (webhook_id) DO UPDATE SET owner_key_id = excluded.owner_key_id,
                   window_ends_at = excluded.window_ends_at, replayed = excluded.replayed",
            )
            .bind(text(webhook_id))
            .bind(&owner)
            .bind(ends)
            .bind(counted)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(used.outcome(limits, now, queued))
    }

    async fn stream_cursor_key(&self) -> StoreResult<Vec<u8>> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query(
            "INSERT INTO meta (name, value) VALUES ('stream_cursor_key', $1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(fresh.as_slice())
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'stream_cursor_key'")
                .fetch_one(&self.pool)
                .await?;
        Ok(value)
    }

    async fn prune(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM attempts WHERE at < $1")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        // Each webhook's newest attempts only (logging trims them too, every so often).
        let over: Vec<String> = sqlx::query_scalar(
            "SELECT webhook_id FROM attempts GROUP BY webhook_id HAVING COUNT(*) > $1",
        )
        .bind(i64::from(Attempt::KEPT_PER_WEBHOOK))
        .fetch_all(&mut *tx)
        .await?;
        for webhook_id in &over {
            trim_attempts(&mut tx, webhook_id).await?;
        }
        sqlx::query("DELETE FROM replay_budgets WHERE window_ends_at < $1")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM published WHERE received_at < $1")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND created_at < $1",
        )
        .bind(ms(before))
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "DELETE FROM events e WHERE e.received_at < $1
               AND NOT EXISTS (SELECT 1 FROM deliveries d
                               WHERE d.event_seq = e.seq AND d.state IN ('pending', 'in_flight'))",
        )
        .bind(ms(before))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn revoked_keys(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(revoked_at) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn signals(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<Signal>>> {
        // A pool of one apart from the store's: the listener holds its connection.
        let options = self.pool.connect_options().as_ref().clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(listen(pool, self.channel.clone(), tx));
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_parameters_leave_the_url_and_are_checked() {
        let (url, schema, n) = split_url("postgres://u:p@h:5432/db?schema=gw_1").unwrap();
        assert_eq!(
            (url.as_str(), schema.as_str(), n),
            ("postgres://u:p@h:5432/db", "gw_1", 10)
        );
        let (url, schema, n) =
            split_url("postgres://h/db?sslmode=disable&max_connections=3").unwrap();
        assert_eq!(url, "postgres://h/db?sslmode=disable");
        assert_eq!((schema.as_str(), n), (DEFAULT_SCHEMA, 3));
        for bad in [
            "postgres://h/db?schema=a-b",
            "postgres://h/db?schema=Gw",
            "postgres://h/db?schema=1a",
            "postgres://h/db?schema=",
            "postgres://h/db?max_connections=0",
            "not a url",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
        assert_eq!(text("a\0b"), "a\u{fffd}b");
    }
}
