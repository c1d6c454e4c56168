//! The embedded SQLite store (sqlx, WAL mode, migrations applied at open).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{Row, SqliteConnection};

use super::group_commit::GroupCommit;
use super::sealing::{self, SecretsKey};
use super::{
    ATTEMPT_TRIM_EVERY, Attempt, DELETED_WEBHOOKS_BUDGET, Delivery, DeliveryOutcome, Ingested,
    KeyRecord, NewEvent, PublishClaim, RateLimit, ReplayLimits, ReplayUse, Replayed, Revocation,
    Store, StoreError, StoreResult, StoredEvent, WebhookChange, WebhookRecord, cut, lease_ms, ms,
    opt_time, time,
};

/// Gateway state in one SQLite file (`<data dir>/gateway.sqlite3`).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Taken by every write: SQLite has one writer at a time, and connections of the pool
    /// competing for its lock would wait in SQLite's busy handler, which sleeps (1, 2, 5, ...
    /// up to 100 ms) instead of waking when the lock is free; queued here, each write starts
    /// as soon as the previous one commits.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The hot writes (publish claims and settlements, the event log, delivery claims,
    /// outcomes and attempts), made together in one transaction with whatever else is
    /// waiting: one `fsync` for many (see [`GroupCommit`]). Its task takes `writer` around
    /// each transaction.
    batch: GroupCommit,
    /// Seals webhook signing secrets at rest ([`SqliteStore::seal_secrets`]).
    secrets: Option<std::sync::Arc<SecretsKey>>,
}

/// The database file name inside a data directory.
pub const DB_FILE: &str = "gateway.sqlite3";

fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating it if needed) the store in directory `dir`, applying migrations.
    pub async fn open_dir(dir: &Path) -> StoreResult<Self> {
        crate::datadir::prepare_dir(dir).map_err(StoreError)?;
        Self::open_file(&dir.join(DB_FILE)).await
    }

    /// Opens (creating it if needed) the store in file `path`, applying migrations.
    pub async fn open_file(path: &Path) -> StoreResult<Self> {
        // The database holds webhook secrets: 0600, and so its -wal and -shm.
        crate::datadir::restrict_database(path).map_err(StoreError)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            // Overwritten and deleted content is zeroed, not left in free pages: webhook
            // secrets sealed in place leave no clear copy behind.
            .pragma("secure_delete", "on")
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        crate::datadir::restrict_database(path).map_err(StoreError)?;
        let writer = std::sync::Arc::default();
        Ok(SqliteStore {
            batch: GroupCommit::start(pool.clone(), std::sync::Arc::clone(&writer)),
            pool,
            writer,
            secrets: None,
        })
    }

    /// Seals webhook signing secrets at rest with `key` from now on (see [`SecretsKey`]):
    /// secrets stored in clear are sealed now, and every secret already sealed must open with
    /// `key` (else an error, before anything is changed).
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
            sqlx::query("UPDATE webhooks SET secret = ?, previous_secret = ? WHERE id = ?")
                .bind(key.seal(id, secret)?)
                .bind(previous)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if !clear.is_empty() {
            // The clear values' old pages leave the write-ahead log for the (zeroing) file.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
            tracing::info!(
                webhooks = clear.len(),
                "sealed webhook secrets stored in clear"
            );
        }
        self.secrets = Some(std::sync::Arc::new(key));
        Ok(self)
    }

    /// The stored form of webhook `id`'s secret `secret`.
    fn sealed(&self, id: &str, secret: Option<&str>) -> StoreResult<Option<String>> {
        sealing::seal_opt(self.secrets.as_deref(), id, secret)
    }

    /// A webhook row, its secrets opened.
    fn webhook_from(&self, row: &SqliteRow) -> StoreResult<WebhookRecord> {
        let mut w = webhook_from(row);
        sealing::open_webhook(self.secrets.as_deref(), &mut w)?;
        Ok(w)
    }

    /// Inserts webhook `w` (its secrets sealed) through `conn`.
    async fn write_webhook(
        &self,
        conn: &mut SqliteConnection,
        w: &WebhookRecord,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, owner_key_id, url, event_types, description, allow, secret,
                previous_secret, previous_secret_until, enabled, disabled_reason, failing_since, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&w.id)
        .bind(&w.owner_key_id)
        .bind(&w.url)
        .bind(to_json(&w.event_types))
        .bind(&w.description)
        .bind(w.allow.as_deref().map(to_json))
        .bind(self.sealed(&w.id, Some(&w.secret))?)
        .bind(self.sealed(&w.id, w.previous_secret.as_deref())?)
        .bind(w.previous_secret_until.map(ms))
        .bind(w.enabled as i64)
        .bind(&w.disabled_reason)
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
}

fn key_from(row: &SqliteRow) -> KeyRecord {
    KeyRecord {
        id: row.get("id"),
        name: row.get("name"),
        secret_hash: row.get("secret_hash"),
        subscribe: from_json(row.get("subscribe")),
        publish: from_json(row.get("publish")),
        sources: from_json(row.get("sources")),
        admin: row.get::<i64, _>("admin") != 0,
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

fn webhook_from(row: &SqliteRow) -> WebhookRecord {
    WebhookRecord {
        id: row.get("id"),
        owner_key_id: row.get("owner_key_id"),
        url: row.get("url"),
        event_types: from_json(row.get("event_types")),
        description: row.get("description"),
        allow: row.get::<Option<String>, _>("allow").map(|a| from_json(&a)),
        secret: row.get("secret"),
        previous_secret: row.get("previous_secret"),
        previous_secret_until: opt_time(row.get("previous_secret_until")),
        enabled: row.get::<i64, _>("enabled") != 0,
        disabled_reason: row.get("disabled_reason"),
        failing_since: opt_time(row.get("failing_since")),
        created_at: time(row.get("created_at")),
    }
}

fn event_from(row: &SqliteRow) -> StoredEvent {
    StoredEvent {
        seq: row.get("seq"),
        source: row.get("source"),
        id: row.get("id"),
        ty: row.get("type"),
        received_at: time(row.get("received_at")),
        body: row.get("body"),
    }
}

/// Settles delivery `id` after an attempt (which counts).
async fn settle_delivery(
    conn: &mut SqliteConnection,
    id: i64,
    outcome: DeliveryOutcome,
) -> StoreResult<()> {
    let (state, next) = outcome.columns();
    sqlx::query(
        "UPDATE deliveries SET state = ?, attempts = attempts + 1, lease_until = NULL,
            next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
    )
    .bind(state)
    .bind(next)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Logs attempt `a` (its response cut to [`Attempt::MAX_RESPONSE_BYTES`]); every
/// [`ATTEMPT_TRIM_EVERY`] ids, trims its webhook's attempts to the newest
/// [`Attempt::KEPT_PER_WEBHOOK`].
async fn insert_attempt(conn: &mut SqliteConnection, a: &Attempt) -> StoreResult<()> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO attempts (webhook_id, delivery_id, event_id, attempt, at, status, latency_ms, error, response)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(&a.webhook_id)
    .bind(a.delivery_id)
    .bind(&a.event_id)
    .bind(a.attempt as i64)
    .bind(ms(a.at))
    .bind(a.status.map(i64::from))
    .bind(a.latency_ms as i64)
    .bind(&a.error)
    .bind(a.response.as_deref().map(|r| cut(r, Attempt::MAX_RESPONSE_BYTES)))
    .fetch_one(&mut *conn)
    .await?;
    if id % ATTEMPT_TRIM_EVERY == 0 {
        trim_attempts(conn, &a.webhook_id).await?;
    }
    Ok(())
}

/// Drops webhook `webhook_id`'s attempts older than its newest [`Attempt::KEPT_PER_WEBHOOK`]
/// (read through the `(webhook_id, id)` index: as many steps as attempts kept).
async fn trim_attempts(conn: &mut SqliteConnection, webhook_id: &str) -> StoreResult<()> {
    sqlx::query(
        "DELETE FROM attempts WHERE webhook_id = ?1 AND id < (
           SELECT id FROM attempts WHERE webhook_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )
    .bind(webhook_id)
    .bind(i64::from(Attempt::KEPT_PER_WEBHOOK) - 1)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What replays already queued to webhook `webhook_id` and to the other webhooks of `owner`
/// in windows still open at `now` (ms).
async fn replay_use(
    conn: &mut SqliteConnection,
    webhook_id: &str,
    owner: &str,
    now: i64,
) -> StoreResult<ReplayUse> {
    let own = sqlx::query(
        "SELECT window_ends_at, replayed FROM replay_budgets WHERE webhook_id = ? AND window_ends_at > ?",
    )
    .bind(webhook_id)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let others = sqlx::query(
        "SELECT COALESCE(SUM(replayed), 0) AS used, MIN(window_ends_at) AS first_end
         FROM replay_budgets WHERE owner_key_id = ? AND webhook_id <> ? AND window_ends_at > ?",
    )
    .bind(owner)
    .bind(webhook_id)
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
impl Store for SqliteStore {
    async fn insert_key(&self, key: &KeyRecord) -> StoreResult<()> {
        let _write = self.writer.lock().await;
        sqlx::query(
            "INSERT INTO api_keys (id, name, secret_hash, subscribe, publish, admin, created_at, expires_at, revoked_at, rate_limit_per_second, rate_limit_burst, sources, publish_bytes_per_second)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.secret_hash)
        .bind(to_json(&key.subscribe))
        .bind(to_json(&key.publish))
        .bind(key.admin as i64)
        .bind(ms(key.created_at))
        .bind(key.expires_at.map(ms))
        .bind(key.revoked_at.map(ms))
        .bind(key.rate_limit.map(|l| i64::from(l.per_second)))
        .bind(key.rate_limit.map(|l| i64::from(l.burst)))
        .bind(to_json(&key.sources))
        .bind(key.publish_bytes_per_second.and_then(|n| i64::try_from(n).ok()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = ?")
            .bind(id)
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
        let _write = self.writer.lock().await;
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(ms(at))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_key_keeping_an_admin(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Revocation> {
        // Counting and revoking under the one write lock: nothing revokes in between.
        let _write = self.writer.lock().await;
        let admins: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM api_keys
             WHERE admin AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(ms(at))
        .fetch_all(&self.pool)
        .await?;
        if admins.len() == 1 && admins[0] == id {
            return Ok(Revocation::LastAdmin);
        }
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(ms(at))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(if done.rows_affected() > 0 {
            Revocation::Revoked
        } else {
            Revocation::NotActive
        })
    }

    async fn insert_webhook(&self, w: &WebhookRecord) -> StoreResult<()> {
        let _write = self.writer.lock().await;
        let mut conn = self.pool.acquire().await?;
        self.write_webhook(&mut conn, w).await
    }

    async fn insert_webhook_within(
        &self,
        w: &WebhookRecord,
        max_per_key: usize,
    ) -> StoreResult<bool> {
        // Counted and inserted in one write transaction, under the one write lock: no other
        // write comes in between. `BEGIN IMMEDIATE` takes SQLite's write lock before the
        // count, so that holds even for another connection to the file.
        let _write = self.writer.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks WHERE owner_key_id = ?")
            .bind(&w.owner_key_id)
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
        let row = sqlx::query("SELECT * FROM webhooks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| self.webhook_from(r)).transpose()
    }

    async fn list_webhooks(&self, owner: Option<&str>) -> StoreResult<Vec<WebhookRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM webhooks WHERE (?1 IS NULL OR owner_key_id = ?1) ORDER BY created_at, id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.webhook_from(r)).collect()
    }

    async fn delete_webhook(&self, id: &str) -> StoreResult<bool> {
        let _write = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM webhooks WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE webhook_id = ? AND state IN ('pending', 'in_flight')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // Its attempts go with it (nothing can read them any more): a key creating and
        // deleting webhooks left every attempt until retention.
        sqlx::query("DELETE FROM attempts WHERE webhook_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // Its replay budget still counts for its owner (a deleted webhook's replays are not
        // forgotten), folded into one row per owner: one row per deleted webhook made every
        // replay check sum them all, under the writer lock.
        sqlx::query(
            "INSERT INTO replay_budgets (webhook_id, owner_key_id, window_ends_at, replayed)
             SELECT ?3 || owner_key_id, owner_key_id, window_ends_at, replayed
             FROM replay_budgets WHERE webhook_id = ?1 AND window_ends_at > ?2
             ON CONFLICT (webhook_id) DO UPDATE SET
               replayed = CASE WHEN replay_budgets.window_ends_at > ?2
                 THEN replay_budgets.replayed + excluded.replayed ELSE excluded.replayed END,
               window_ends_at = CASE WHEN replay_budgets.window_ends_at > ?2
                 THEN MAX(replay_budgets.window_ends_at, excluded.window_ends_at)
                 ELSE excluded.window_ends_at END",
        )
        .bind(id)
        .bind(ms(Utc::now()))
        .bind(DELETED_WEBHOOKS_BUDGET)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM replay_budgets WHERE webhook_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn update_webhook(&self, w: &WebhookRecord) -> StoreResult<()> {
        let _write = self.writer.lock().await;
        sqlx::query(
            "UPDATE webhooks SET secret = ?, previous_secret = ?, previous_secret_until = ?,
                enabled = ?, disabled_reason = ?, failing_since = ?, event_types = ?,
                description = ?, allow = ? WHERE id = ?",
        )
        .bind(self.sealed(&w.id, Some(&w.secret))?)
        .bind(self.sealed(&w.id, w.previous_secret.as_deref())?)
        .bind(w.previous_secret_until.map(ms))
        .bind(w.enabled as i64)
        .bind(&w.disabled_reason)
        .bind(w.failing_since.map(ms))
        .bind(to_json(&w.event_types))
        .bind(&w.description)
        .bind(w.allow.as_deref().map(to_json))
        .bind(&w.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn change_webhook(&self, id: &str, change: &WebhookChange) -> StoreResult<bool> {
        let _write = self.writer.lock().await;
        // Every right-hand side reads the row as it was: one statement, nothing read before.
        let done = sqlx::query(
            "UPDATE webhooks SET
                event_types = COALESCE(?1, event_types),
                description = COALESCE(?2, description),
                disabled_reason = CASE WHEN ?3 IS NULL OR ?3 = enabled THEN disabled_reason
                                       WHEN ?3 THEN NULL ELSE ?4 END,
                failing_since = CASE WHEN ?3 AND NOT enabled THEN NULL ELSE failing_since END,
                enabled = COALESCE(?3, enabled)
             WHERE id = ?5",
        )
        .bind(change.event_types.as_ref().map(|t| to_json(t)))
        .bind(change.description.as_deref())
        .bind(change.enabled.map(i64::from))
        .bind(WebhookChange::DISABLED_BY_OWNER)
        .bind(id)
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
        let _write = self.writer.lock().await;
        // The current secret moves as it is stored (sealed ones are bound to the webhook id,
        // not to the column).
        let done = sqlx::query(
            "UPDATE webhooks SET previous_secret = secret, secret = ?, previous_secret_until = ?
             WHERE id = ? AND (?4 IS NULL OR previous_secret IS NULL
                 OR previous_secret_until IS NULL OR previous_secret_until <= ?4)",
        )
        .bind(self.sealed(id, Some(secret))?)
        .bind(ms(previous_until))
        .bind(id)
        .bind(unless_signing_at.map(ms))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn webhook_succeeded(&self, id: &str) -> StoreResult<()> {
        let _write = self.writer.lock().await;
        sqlx::query(
            "UPDATE webhooks SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook_failed(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let _write = self.writer.lock().await;
        let since: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?) WHERE id = ?
             RETURNING failing_since",
        )
        .bind(ms(at))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(since.map(|s| time(s.unwrap_or_else(|| ms(at)))))
    }

    async fn disable_webhook(&self, id: &str, reason: &str) -> StoreResult<bool> {
        let _write = self.writer.lock().await;
        let done = sqlx::query(
            "UPDATE webhooks SET enabled = 0, disabled_reason = ? WHERE id = ? AND enabled",
        )
        .bind(reason)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ingest(&self, e: &NewEvent<'_>) -> StoreResult<Ingested> {
        let args = (
            [e.source, e.id, e.ty, e.fingerprint, e.body].map(str::to_owned),
            ms(e.received_at),
        );
        self.batch
            .write(args, |conn, ([source, id, ty, fingerprint, body], received_at)| {
                Box::pin(async move {
                    let inserted = sqlx::query(
                        "INSERT INTO events (source, id, type, received_at, fingerprint, body)
                         VALUES (?, ?, ?, ?, ?, ?)
                         ON CONFLICT (source, id) DO NOTHING RETURNING seq",
                    )
                    .bind(source)
                    .bind(id)
                    .bind(ty)
                    .bind(*received_at)
                    .bind(fingerprint)
                    .bind(body)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = inserted else {
                        let existing: Option<String> = sqlx::query_scalar(
                            "SELECT fingerprint FROM events WHERE source = ? AND id = ?",
                        )
                        .bind(source)
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                        // Rows logged before fingerprints existed count as the same event.
                        return Ok(match existing {
                            Some(f) if f != *fingerprint => Ingested::Conflict,
                            _ => Ingested::Redelivered,
                        });
                    };
                    let seq: i64 = row.get("seq");
                    sqlx::query(
                        "INSERT OR IGNORE INTO deliveries (webhook_id, event_seq, replay, state, attempts, next_attempt_at, created_at)
                         SELECT w.id, ?1, 0, 'pending', 0, ?2, ?2
                         FROM webhooks w WHERE w.enabled = 1
                           AND EXISTS (SELECT 1 FROM json_each(w.event_types) t WHERE t.value = ?3)",
                    )
                    .bind(seq)
                    .bind(*received_at)
                    .bind(ty)
                    .execute(&mut *conn)
                    .await?;
                    Ok(Ingested::Logged(seq))
                })
            })
            .await
    }

    async fn claim_publish(
        &self,
        source: &str,
        id: &str,
        fingerprint: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<PublishClaim> {
        let args = ([source, id, fingerprint].map(str::to_owned), ms(at));
        self.batch
            .write(args, |conn, ([source, id, fingerprint], at)| {
                Box::pin(async move {
                    let inserted = sqlx::query(
                        "INSERT INTO published (source, id, fingerprint, sent, received_at) VALUES (?, ?, ?, 0, ?)
                         ON CONFLICT (source, id) DO NOTHING",
                    )
                    .bind(source)
                    .bind(id)
                    .bind(fingerprint)
                    .bind(*at)
                    .execute(&mut *conn)
                    .await?;
                    if inserted.rows_affected() > 0 {
                        return Ok(PublishClaim::New);
                    }
                    let row = sqlx::query(
                        "SELECT fingerprint, sent, received_at FROM published WHERE source = ? AND id = ?",
                    )
                    .bind(source)
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await?;
                    if row.get::<String, _>("fingerprint") != *fingerprint {
                        return Ok(PublishClaim::Conflict);
                    }
                    if row.get::<i64, _>("sent") != 0 {
                        return Ok(PublishClaim::Sent);
                    }
                    let claimed: i64 = row.get("received_at");
                    if *at - claimed < lease_ms() {
                        return Ok(PublishClaim::InFlight);
                    }
                    let taken = sqlx::query(
                        "UPDATE published SET received_at = ? WHERE source = ? AND id = ? AND sent = 0 AND received_at = ?",
                    )
                    .bind(*at)
                    .bind(source)
                    .bind(id)
                    .bind(claimed)
                    .execute(&mut *conn)
                    .await?;
                    Ok(if taken.rows_affected() == 1 {
                        PublishClaim::Unsent
                    } else {
                        PublishClaim::InFlight
                    })
                })
            })
            .await
    }

    async fn settle_publish(
        &self,
        source: &str,
        id: &str,
        claimed_at: DateTime<Utc>,
        sent: bool,
    ) -> StoreResult<()> {
        let args = ([source, id].map(str::to_owned), ms(claimed_at), sent);
        self.batch
            .write(args, |conn, ([source, id], claimed_at, sent)| {
                Box::pin(async move {
                    if *sent {
                        sqlx::query("UPDATE published SET sent = 1 WHERE source = ? AND id = ?")
                            .bind(source)
                            .bind(id)
                            .execute(&mut *conn)
                            .await?;
                        return Ok(());
                    }
                    sqlx::query(
                        "DELETE FROM published WHERE source = ? AND id = ? AND sent = 0 AND received_at = ?",
                    )
                    .bind(source)
                    .bind(id)
                    .bind(*claimed_at)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn events_after(
        &self,
        after: i64,
        types: &[String],
        limit: u32,
        max_bytes: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        // `page_before`: the bytes of the page's bodies ahead of each row. The sizes come from
        // `octet_length` of the column, which SQLite reads off the record header without
        // loading the body; only the bodies of the rows kept are read.
        let rows = sqlx::query(
            "SELECT e.* FROM events AS e JOIN (
                SELECT seq, SUM(n) OVER (ORDER BY seq) - n AS page_before
                FROM (SELECT seq, octet_length(body) AS n FROM events
                      WHERE seq > ? AND type IN (SELECT value FROM json_each(?))
                      ORDER BY seq LIMIT ?)
             ) AS p ON e.seq = p.seq
             WHERE p.page_before < ? ORDER BY e.seq",
        )
        .bind(after)
        .bind(to_json(types))
        .bind(limit as i64)
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX).max(1))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(event_from).collect())
    }

    async fn latest_seq(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get("seq"))
    }

    async fn get_event(&self, seq: i64) -> StoreResult<Option<StoredEvent>> {
        let row = sqlx::query("SELECT * FROM events WHERE seq = ?")
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
        let args = (
            [ms(now), ms(lease_until)],
            to_json(busy),
            [per_webhook, per_owner, limit].map(i64::from),
        );
        // The candidates: each enabled endpoint's first `per_webhook` due deliveries, read
        // through its index (not every due delivery: a claim costs the same however long the
        // backlog), and the deliveries whose lease expired (an instance stopped mid-attempt;
        // at most what the instances had in flight). `rn`: the rank of a candidate within its
        // endpoint; `rn_owner`: within its owner key, endpoints taking turns. An endpoint
        // gets what `per_webhook` leaves after its unexpired leases (`held`, by any
        // instance), an owner what `per_owner` leaves after its own (`held_owner`), and
        // owners take turns (ordered by `rn_owner` first). The in-flight rows are read
        // through their own index (`INDEXED BY`): they are few, and a planner guessing
        // otherwise would scan the whole outbox; `CROSS JOIN` keeps the endpoints the outer
        // loop (without statistics SQLite would otherwise scan the deliveries).
        const CLAIM: &str = "UPDATE deliveries SET state = 'in_flight', lease_until = ?2
             WHERE id IN (
               WITH held AS MATERIALIZED (
                 SELECT d.webhook_id, w.owner_key_id AS owner, COUNT(*) AS n
                 FROM deliveries d INDEXED BY deliveries_lease JOIN webhooks w ON w.id = d.webhook_id
                 WHERE d.state = 'in_flight' AND d.lease_until >= ?1
                 GROUP BY d.webhook_id
               ),
               held_owner AS MATERIALIZED (
                 SELECT owner, SUM(n) AS n FROM held GROUP BY owner
               )
               SELECT c.id FROM (
                 SELECT id, next_attempt_at, owner, rn,
                        ROW_NUMBER() OVER (PARTITION BY owner ORDER BY rn, next_attempt_at, id) AS rn_owner
                 FROM (
                   SELECT r.id, r.next_attempt_at, r.owner, r.rn FROM (
                     SELECT id, webhook_id, next_attempt_at, owner,
                            ROW_NUMBER() OVER (PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS rn
                     FROM (
                       SELECT d.id, d.webhook_id, d.next_attempt_at, w.owner_key_id AS owner
                       FROM webhooks w CROSS JOIN deliveries d ON d.id IN (
                         SELECT d3.id FROM deliveries d3
                         WHERE d3.webhook_id = w.id AND d3.state = 'pending' AND d3.next_attempt_at <= ?1
                         ORDER BY d3.next_attempt_at, d3.id LIMIT ?4
                       )
                       WHERE w.enabled = 1 AND w.id NOT IN (SELECT value FROM json_each(?3))
                       UNION ALL
                       SELECT d.id, d.webhook_id, d.next_attempt_at, w.owner_key_id AS owner
                       FROM deliveries d INDEXED BY deliveries_lease JOIN webhooks w ON w.id = d.webhook_id
                       WHERE d.state = 'in_flight' AND d.lease_until < ?1
                         AND w.enabled = 1 AND w.id NOT IN (SELECT value FROM json_each(?3))
                     )
                   ) r LEFT JOIN held hw ON hw.webhook_id = r.webhook_id
                   WHERE r.rn <= ?4 - COALESCE(hw.n, 0)
                 )
               ) c LEFT JOIN held_owner h ON h.owner = c.owner
               WHERE c.rn_owner <= ?5 - COALESCE(h.n, 0)
               ORDER BY c.rn_owner, c.next_attempt_at, c.id LIMIT ?6
             )
             RETURNING id, webhook_id, event_seq, attempts";
        self.batch
            .write(
                args,
                |conn, ([now, lease_until], busy, [per_webhook, per_owner, limit])| {
                    Box::pin(async move {
                        let rows = sqlx::query(CLAIM)
                            .bind(*now)
                            .bind(*lease_until)
                            .bind(busy)
                            .bind(*per_webhook)
                            .bind(*per_owner)
                            .bind(*limit)
                            .fetch_all(&mut *conn)
                            .await?;
                        Ok(rows
                            .iter()
                            .map(|r| Delivery {
                                id: r.get("id"),
                                webhook_id: r.get("webhook_id"),
                                event_seq: r.get("event_seq"),
                                attempts: r.get::<i64, _>("attempts") as u32,
                            })
                            .collect())
                    })
                },
            )
            .await
    }

    async fn finish_delivery(&self, id: i64, outcome: DeliveryOutcome) -> StoreResult<()> {
        self.batch
            .write((id, outcome), |conn, (id, outcome)| {
                Box::pin(settle_delivery(conn, *id, *outcome))
            })
            .await
    }

    async fn next_due(&self) -> StoreResult<Option<DateTime<Utc>>> {
        let row = sqlx::query(
            // Each enabled endpoint's first pending delivery (through its index) and the
            // earliest lease: not a scan of every pending delivery.
            "SELECT MIN(due) AS due FROM (
               SELECT (SELECT d.next_attempt_at FROM deliveries d
                       WHERE d.webhook_id = w.id AND d.state = 'pending'
                       ORDER BY d.next_attempt_at LIMIT 1) AS due
               FROM webhooks w WHERE w.enabled = 1
               UNION ALL
               SELECT MIN(d.lease_until)
               FROM deliveries d INDEXED BY deliveries_lease JOIN webhooks w ON w.id = d.webhook_id
               WHERE d.state = 'in_flight' AND w.enabled = 1
             )",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(opt_time(row.get("due")))
    }

    async fn record_attempt(&self, a: &Attempt) -> StoreResult<()> {
        self.batch
            .write(a.clone(), |conn, a| Box::pin(insert_attempt(conn, a)))
            .await
    }

    async fn finish_attempt(&self, a: &Attempt, outcome: DeliveryOutcome) -> StoreResult<()> {
        self.batch
            .write((a.clone(), outcome), |conn, (a, outcome)| {
                Box::pin(async move {
                    insert_attempt(conn, a).await?;
                    settle_delivery(conn, a.delivery_id, *outcome).await
                })
            })
            .await
    }

    async fn list_attempts(&self, webhook_id: &str, limit: u32) -> StoreResult<Vec<Attempt>> {
        let rows =
            sqlx::query("SELECT * FROM attempts WHERE webhook_id = ? ORDER BY id DESC LIMIT ?")
                .bind(webhook_id)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| Attempt {
                id: r.get("id"),
                webhook_id: r.get("webhook_id"),
                delivery_id: r.get("delivery_id"),
                event_id: r.get("event_id"),
                attempt: r.get::<i64, _>("attempt") as u32,
                at: time(r.get("at")),
                status: r.get::<Option<i64>, _>("status").map(|s| s as u16),
                latency_ms: r.get::<i64, _>("latency_ms") as u64,
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
        // One writer: replays (of every key) take turns, so a budget is read and spent at once.
        let _write = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner_key_id FROM webhooks WHERE id = ?")
                .bind(webhook_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(owner) = owner else {
            return Ok(ReplayUse::default().outcome(limits, now, 0));
        };
        let used = replay_use(&mut tx, webhook_id, &owner, ms(now)).await?;
        let allowed = used.allowed(limits);
        if allowed == 0 {
            return Ok(used.outcome(limits, now, 0));
        }
        let done = sqlx::query(
            "INSERT INTO deliveries (webhook_id, event_seq, replay, state, attempts, next_attempt_at, created_at)
             SELECT w.id, e.seq, 1, 'pending', 0, ?3, ?3
             FROM webhooks w JOIN events e
               ON e.type IN (SELECT value FROM json_each(w.event_types))
             WHERE w.id = ?1 AND e.received_at >= ?2
               AND NOT EXISTS (SELECT 1 FROM deliveries d
                                WHERE d.webhook_id = w.id AND d.event_seq = e.seq
                                  AND d.state IN ('pending', 'in_flight'))
             ORDER BY e.seq LIMIT ?4",
        )
        .bind(webhook_id)
        .bind(ms(since))
        .bind(ms(now))
        .bind(i64::try_from(allowed).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        let queued = done.rows_affected();
        if let Some((ends, counted)) = used.record(limits, now, queued) {
            sqlx::query(
                "INSERT INTO replay_budgets (webhook_id, owner_key_id, window_ends_at, replayed)
                 VALUES (?, ?, ?, ?)
                 ON CONFLICT (webhook_id) DO UPDATE SET owner_key_id = excluded.owner_key_id,
                   window_ends_at = excluded.window_ends_at, replayed = excluded.replayed",
            )
            .bind(webhook_id)
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
        let _write = self.writer.lock().await;
        let fresh: [u8; 32] = rand::random();
        sqlx::query("INSERT OR IGNORE INTO meta (name, value) VALUES ('stream_cursor_key', ?)")
            .bind(fresh.as_slice())
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM meta WHERE name = 'stream_cursor_key'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get("value"))
    }

    async fn prune(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let _write = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM attempts WHERE at < ?")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        // Each webhook's newest attempts only (logging trims them too, every so often).
        let over: Vec<String> = sqlx::query_scalar(
            "SELECT webhook_id FROM attempts GROUP BY webhook_id HAVING COUNT(*) > ?",
        )
        .bind(i64::from(Attempt::KEPT_PER_WEBHOOK))
        .fetch_all(&mut *tx)
        .await?;
        for webhook_id in &over {
            trim_attempts(&mut tx, webhook_id).await?;
        }
        sqlx::query("DELETE FROM replay_budgets WHERE window_ends_at < ?")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM published WHERE received_at < ?")
            .bind(ms(before))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND created_at < ?",
        )
        .bind(ms(before))
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "DELETE FROM events WHERE received_at < ?
               AND seq NOT IN (SELECT event_seq FROM deliveries WHERE state IN ('pending', 'in_flight'))",
        )
        .bind(ms(before))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn revoked_keys(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(revoked_at) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }
}
