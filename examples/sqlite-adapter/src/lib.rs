//! An evbus transport over one SQLite database file (`sqlite-example:///path/to/file.db`),
//! written as a third party would: the worked example of `docs/adapter-guide.md`, built on
//! `evbus::raw::kit` (core does the handles, close, subscriptions and payload limit).
//!
//! Every topic subscription (anonymous ones have a generated name) and every queue is a
//! *partition* (a row of `parts`). Publishing to a topic inserts one `messages` row per
//! subscription of the topic, in one statement. A consumer leases the oldest visible row of
//! its partition with one atomic `UPDATE ... RETURNING` (`visible_at = now + visibility
//! timeout`, `attempt = attempt + 1`); ack deletes the row, nack makes it visible now, renew
//! moves `visible_at` on while that lease (that attempt) still runs. Idle consumers poll every
//! 20 ms. Events are stored in the CloudEvents JSON format.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use evbus::raw::kit::{self, Broker, Connection, Destination, NoKeys};
use evbus::raw::{Acker, RawDelivery, RawStream, Source};
use evbus::{Capabilities, Error, ErrorKind, Event, Health, Result};
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool};

/// The URL scheme: `sqlite-example:///absolute/path/to/file.db`.
pub const URL_SCHEME: &str = "sqlite-example";

// Partitions: one per topic subscription (`kind` topic) or queue (`kind` queue, empty name).
// Messages: one row per event and partition. AUTOINCREMENT: an id is never reused, so a late
// ack or delete cannot hit a newer row.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS parts (id INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL, dest TEXT NOT NULL, name TEXT NOT NULL, UNIQUE (kind, dest, name));
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
  part INTEGER NOT NULL REFERENCES parts (id) ON DELETE CASCADE, visible_at INTEGER NOT NULL,
  attempt INTEGER NOT NULL); CREATE INDEX IF NOT EXISTS messages_by_part ON messages (part);";
// The partition (kind, dest, name), created if needed.
const PART: &str = "INSERT INTO parts (kind, dest, name) VALUES (?1, ?2, ?3) \
  ON CONFLICT DO UPDATE SET kind = kind RETURNING id";
// The batch ?1 (a JSON array of events in the JSON format), in order, in one statement: one row
// per event for every subscription of the topic, or for the queue.
const PUBLISH: &str = "INSERT INTO messages (part, visible_at, attempt, event)
  SELECT p.id, 0, 0, e.value FROM parts p, json_each(?1) e WHERE p.kind = ?2 AND p.dest = ?3
  ORDER BY p.id, e.key";
// Leases the oldest visible row of partition ?2 for ?1 ms (`visible_at`: the database's clock
// in ms; "now" is one instant within a statement).
const LEASE: &str = "UPDATE messages SET visible_at = unixepoch('subsec') * 1000 + ?1,
  attempt = attempt + 1 WHERE id = (SELECT id FROM messages WHERE part = ?2
  AND visible_at <= unixepoch('subsec') * 1000 ORDER BY id LIMIT 1) RETURNING id, attempt, event";
// Starts the lease of row ?2 over for ?1 ms, only while lease ?3 (its attempt) still runs.
const RENEW: &str = "UPDATE messages SET visible_at = unixepoch('subsec') * 1000 + ?1
  WHERE id = ?2 AND attempt = ?3 AND visible_at > unixepoch('subsec') * 1000";
// A whole topic or queue, or one subscription of a topic.
const DELETE: &str = "DELETE FROM parts WHERE kind = ?1 AND dest = ?2 AND ?3 IN (name, '*')";

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// The broker side: one pool of connections to the database file.
#[derive(Clone, Debug)]
pub struct SqliteBroker(SqlitePool);

/// One connection to an SQLite database file (a `Transport`).
pub type SqliteTransport = Connection<SqliteBroker>;

fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::client(ErrorKind::Connection, what, e)
}

/// Opens the database a `sqlite-example:///path/to/file.db` URL names, creating it if needed.
/// A malformed URL or a file that cannot be opened is `InvalidConfig`.
pub async fn connect(url: impl AsRef<str>) -> Result<SqliteTransport> {
    // An absolute path with a file name: `to_file_path` decodes it (`url.path()` is still
    // percent-encoded: `my%20dir`), refuses a relative one (`sqlite-example:x.db`) and any
    // host but `localhost`.
    let file = |u: &url::Url| u.to_file_path().ok().filter(|p| p.file_name().is_some());
    let form = "sqlite-example:///path/to/file.db";
    let valid = |u: &url::Url| file(u).is_some();
    let (url, _) = kit::parse_url::<NoKeys>(url.as_ref(), URL_SCHEME, form, valid)?;
    let options = SqliteConnectOptions::new()
        .filename(file(&url).expect("checked by parse_url"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let db = SqlitePool::connect_with(options).await;
    let db =
        db.map_err(|e| Error::client(ErrorKind::InvalidConfig, "opening the URL's file", e))?;
    let schema = sqlx::raw_sql(SCHEMA).execute(&db).await;
    schema.map_err(sql("creating tables"))?;
    Ok(Connection::new(SqliteBroker(db)))
}

impl SqliteBroker {
    async fn run(&self, query: Query<'_>, what: &'static str) -> Result<()> {
        query.execute(&self.0).await.map(drop).map_err(sql(what))
    }

    /// The id of the partition of a queue or of a topic subscription, created if needed.
    async fn part(&self, to: &Destination) -> Result<i64> {
        let query = sqlx::query_scalar(PART).bind(to.kind()).bind(to.name());
        let query = query.bind(to.subscription().unwrap_or(""));
        query.fetch_one(&self.0).await.map_err(sql("partition"))
    }

    /// Leases the oldest visible row of partition `part`, if there is one.
    async fn lease((broker, part, ms): (Self, i64, i64)) -> Result<Option<RawDelivery>> {
        let query = sqlx::query_as(LEASE).bind(ms).bind(part);
        let row = query.fetch_optional(&broker.0).await;
        let row: Option<(i64, u32, String)> = row.map_err(sql("leasing"))?;
        let at = format!("{URL_SCHEME}:{part}");
        Ok(row.map(|(id, n, json)| {
            let acker = Arc::new(Lease { broker, n, ms });
            RawDelivery::from_json(json, n, acker, id as u64, &at)
        }))
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn name(&self) -> &str {
        URL_SCHEME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            persistent: true,
            max_payload_bytes: Some(16 << 20),
            ..Default::default()
        }
    }

    async fn publish(&self, to: &Destination, events: &[Event]) -> Result<()> {
        if let Destination::Queue(_) = to {
            self.part(to).await?; // recreated if deleted meanwhile
        }
        let batch: Result<Vec<_>> = events.iter().map(Event::to_json).collect();
        let batch = serde_json::json!(batch?).to_string();
        let query = sqlx::query(PUBLISH).bind(batch).bind(to.kind());
        self.run(query.bind(to.name()), "publishing").await
    }

    async fn consume(&self, source: &Source) -> Result<RawStream> {
        let part = self.part(source.destination()).await?;
        let ms = source.consumer().visibility_timeout.as_millis() as i64;
        let state = (self.clone(), part, ms);
        Ok(kit::poll(Duration::from_millis(20), state, Self::lease))
    }

    async fn release(&self, source: &Source) -> Result<()> {
        self.delete(source.destination()).await
    }

    async fn delete(&self, what: &Destination) -> Result<()> {
        let query = sqlx::query(DELETE).bind(what.kind()).bind(what.name());
        let query = query.bind(what.subscription().unwrap_or("*"));
        self.run(query, "deleting").await
    }

    async fn health(&self) -> Health {
        kit::health_of(self.run(sqlx::query("SELECT 1"), "checking health").await)
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await; // core waited for the operations in progress
        Ok(())
    }
}

/// One delivery's lease of a row: the row's id is the delivery's tag, the attempt `n` tells
/// the lease from later ones of the row, `ms` is the consumer's visibility timeout.
struct Lease {
    broker: SqliteBroker,
    n: u32,
    ms: i64,
}

/// Settles rows by id (the delivery's tag); renews only the lease it was made for.
#[async_trait]
impl Acker for Lease {
    async fn ack(&self, tag: u64) -> Result<()> {
        let query = sqlx::query("DELETE FROM messages WHERE id = ?");
        self.broker.run(query.bind(tag as i64), "acking").await
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        let query = sqlx::query("UPDATE messages SET visible_at = 0 WHERE id = ?");
        self.broker.run(query.bind(tag as i64), "nacking").await
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        let query = sqlx::query(RENEW).bind(self.ms).bind(tag as i64);
        let done = query.bind(self.n).execute(&self.broker.0).await;
        match done.map_err(sql("renewing"))?.rows_affected() {
            0 => Err(Error::new(ErrorKind::Expired, "the lease had run out")),
            _ => Ok(()),
        }
    }
}

/// Opens `sqlite-example://` URLs for an [`evbus::Registry`].
pub fn connector() -> impl evbus::Connector {
    kit::connector(&[URL_SCHEME], connect)
}
