//! An evbus transport over one SQLite database file (`sqlite-example:///path/to/file.db`),
//! written as a third party would: the worked example of `docs/adapter-guide.md`.
//!
//! Every topic subscription and every queue is a *partition* (a row of `parts`). Publishing
//! to a topic inserts one `messages` row per subscription of the topic, in one statement.
//! A consumer leases the oldest visible row of its partition with one atomic
//! `UPDATE ... RETURNING` (`visible_at = now + visibility timeout`, `attempt = attempt + 1`);
//! ack deletes the row, nack makes it visible now. Idle consumers poll every 20 ms. Events
//! are stored in the CloudEvents JSON format (`Event::to_json`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use evbus::raw::{Acker, RawDelivery, Source, Undecodable};
use evbus::{Capabilities, ConsumerOptions, Error, ErrorKind, Event, Health, Queue, Result};
use evbus::{SubscribeOptions, Subscription, Topic, Transport};
use futures::Stream;
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use tokio_util::sync::CancellationToken;

/// The URL scheme: `sqlite-example:///absolute/path/to/file.db`.
pub const URL_SCHEME: &str = "sqlite-example";
/// Largest event accepted (data plus attributes).
const MAX_PAYLOAD: usize = 16 << 20;
/// How long an idle consumer waits before looking for new rows again.
const POLL: Duration = Duration::from_millis(20);

// Partitions: one per topic subscription (`kind` t) or queue (`kind` q, empty name); `owner`
// marks the anonymous subscriptions of one connection. Messages: one row per event and partition.
// AUTOINCREMENT: an id is never reused, so a late delete or ack cannot hit a newer row.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS parts (id INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL, dest TEXT NOT NULL, name TEXT NOT NULL, owner TEXT, UNIQUE (kind, dest, name));
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
  part INTEGER NOT NULL REFERENCES parts (id) ON DELETE CASCADE, visible_at INTEGER NOT NULL,
  attempt INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_part ON messages (part);";
// The partition (kind, dest, name), created if needed; a NULL name makes a new anonymous one.
const PART: &str = "INSERT INTO parts (kind, dest, name, owner) VALUES (?1, ?2, \
  coalesce(?3, '~' || hex(randomblob(8))), ?4) ON CONFLICT DO UPDATE SET kind = kind RETURNING id";
// One row for every subscription of a topic, or for the queue.
const PUBLISH: &str = "INSERT INTO messages (part, visible_at, attempt, event) \
  SELECT id, 0, 0, ?3 FROM parts WHERE kind = ?1 AND dest = ?2";
const LEASE: &str = "UPDATE messages SET visible_at = ?1 + ?2, attempt = attempt + 1 WHERE id = \
  (SELECT id FROM messages WHERE part = ?3 AND visible_at <= ?1 ORDER BY id LIMIT 1) \
  RETURNING id, attempt, event";

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// One connection to an SQLite database file.
#[derive(Clone, Debug)]
pub struct SqliteTransport {
    db: SqlitePool,
    closed: CancellationToken,
    owner: String,
}

/// Maps a database error: `Closed` once the pool is closed, otherwise `Connection`.
fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| match e {
        sqlx::Error::PoolClosed => Error::closed("the sqlite-example transport"),
        e => Error::client(ErrorKind::Connection, what, e),
    }
}

impl SqliteTransport {
    /// Opens the database a `sqlite-example:///path/to/file.db` URL names, creating it if
    /// needed. A malformed URL or a file that cannot be opened is `InvalidConfig`.
    pub async fn connect(url: &str) -> Result<Self> {
        let parsed = evbus::registry::parse_url(url, URL_SCHEME)?;
        let host = parsed.host_str().is_some_and(|host| !host.is_empty());
        if parsed.scheme() != URL_SCHEME
            || host
            || parsed.path().len() < 2
            || parsed.query().is_some()
        {
            let url = evbus::registry::redact(url);
            let why =
                format!("`{url}` is not a {URL_SCHEME} URL: write {URL_SCHEME}:///path/to/file.db");
            return Err(Error::invalid_config(why));
        }
        let options = SqliteConnectOptions::new()
            .filename(parsed.path())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let db = SqlitePool::connect_with(options).await.map_err(|e| {
            Error::client(ErrorKind::InvalidConfig, format!("opening {url}"), e)
                .with_hint("check the file path in the URL")
        })?;
        sqlx::raw_sql(SCHEMA)
            .execute(&db)
            .await
            .map_err(sql("creating tables"))?;
        let owner = sqlx::query_scalar("SELECT hex(randomblob(8))")
            .fetch_one(&db)
            .await
            .map_err(sql("naming the connection"))?;
        let closed = CancellationToken::new();
        Ok(SqliteTransport { db, closed, owner })
    }

    /// The pool, or `Closed` after [`close`](Transport::close).
    fn db(&self) -> Result<&SqlitePool> {
        match self.closed.is_cancelled() {
            true => Err(Error::closed("the sqlite-example transport")),
            false => Ok(&self.db),
        }
    }

    async fn run(&self, query: Query<'_>, what: &'static str) -> Result<()> {
        query.execute(self.db()?).await.map(drop).map_err(sql(what))
    }

    /// The id of partition `(kind, dest, name)`; `name: None` makes an anonymous one.
    async fn part(&self, kind: &str, dest: &str, name: Option<&str>) -> Result<i64> {
        let owner = name.is_none().then_some(&self.owner);
        let query = sqlx::query_scalar(PART)
            .bind(kind)
            .bind(dest)
            .bind(name)
            .bind(owner);
        query
            .fetch_one(self.db()?)
            .await
            .map_err(sql("creating a partition"))
    }

    fn dest(&self, kind: &'static str, name: &str) -> Arc<Dest> {
        Arc::new(Dest {
            t: self.clone(),
            kind,
            name: name.to_owned(),
        })
    }
}

#[async_trait]
impl Transport for SqliteTransport {
    fn name(&self) -> &str {
        URL_SCHEME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            persistent: true,
            max_payload_bytes: Some(MAX_PAYLOAD),
            ..Default::default()
        }
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        self.db()?;
        Ok(self.dest("t", name))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        self.part("q", name, Some("")).await?;
        Ok(self.dest("q", name))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        let query = sqlx::query("DELETE FROM parts WHERE kind = 't' AND dest = ?");
        self.run(query.bind(name), "deleting a topic").await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let query = sqlx::query("DELETE FROM parts WHERE kind = 'q' AND dest = ?");
        self.run(query.bind(name), "deleting a queue").await
    }

    async fn health(&self) -> Health {
        match self.run(sqlx::query("SELECT 1"), "checking health").await {
            Ok(()) => Health::Healthy,
            Err(e) if e.kind() == ErrorKind::Closed => Health::Closed,
            Err(e) => Health::Unhealthy(e.to_string()),
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.cancel(); // refuses new operations and ends every subscription
        let anonymous = sqlx::query("DELETE FROM parts WHERE owner = ?").bind(&self.owner);
        let _ = anonymous.execute(&self.db).await; // fails harmlessly when closing twice
        self.db.close().await; // waits for the operations in progress
        Ok(())
    }
}

/// A topic or a queue.
#[derive(Debug)]
struct Dest {
    t: SqliteTransport,
    kind: &'static str,
    name: String,
}

impl Dest {
    async fn put(&self, event: &Event) -> Result<()> {
        if event.encoded_len() > MAX_PAYLOAD {
            let why = format!("event {} is larger than {MAX_PAYLOAD} bytes", event.id());
            return Err(Error::new(ErrorKind::TooLarge, why));
        }
        if self.kind == "q" {
            self.t.part("q", &self.name, Some("")).await?; // recreated if deleted meanwhile
        }
        let query = sqlx::query(PUBLISH)
            .bind(self.kind)
            .bind(&self.name)
            .bind(event.to_json()?);
        self.t.run(query, "publishing").await
    }

    async fn consume(&self, source: Source, part: i64) -> Result<Subscription> {
        let dead_letter = self.t.queue(source.dead_letter_queue()).await?;
        let visibility = source.consumer().visibility_timeout.as_millis() as i64;
        let rows = Arc::new(Rows(self.t.clone()));
        let consumer = Consumer {
            rows,
            part,
            anonymous: source.is_anonymous(),
            visibility,
        };
        let closed = self.t.closed.clone().cancelled_owned();
        Ok(source.into_subscription(consumer.stream(), dead_letter, closed))
    }
}

#[async_trait]
impl Topic for Dest {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.put(event).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let source = Source::topic(&self.name, &options)?;
        let part = self.t.part("t", &self.name, source.subscription()).await?;
        self.consume(source, part).await
    }
}

#[async_trait]
impl Queue for Dest {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, event: &Event) -> Result<()> {
        self.put(event).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let part = self.t.part("q", &self.name, Some("")).await?;
        self.consume(Source::queue(&self.name, &options), part)
            .await
    }
}

/// One consumer of one partition.
struct Consumer {
    rows: Arc<Rows>,
    part: i64,
    anonymous: bool,
    visibility: i64,
}

impl Consumer {
    /// Leases the oldest visible row of the partition, if there is one.
    async fn lease(&self) -> Result<Option<RawDelivery>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let query = sqlx::query_as(LEASE)
            .bind(now as i64)
            .bind(self.visibility)
            .bind(self.part);
        let row: Option<(i64, u32, String)> = query
            .fetch_optional(self.rows.0.db()?)
            .await
            .map_err(sql("leasing"))?;
        Ok(row.map(|(id, attempt, json)| {
            let acker: Arc<dyn Acker> = self.rows.clone();
            match Event::from_json(&json) {
                Ok(event) => RawDelivery::new(event, attempt, acker, id as u64),
                Err(e) => {
                    let message =
                        Undecodable::new(e, format!("{URL_SCHEME}:{}", self.part), id.to_string());
                    RawDelivery::undecodable(message.body(json), attempt, acker, id as u64)
                }
            }
        }))
    }

    /// Leases rows one by one as core asks for them; ends when the transport closes.
    fn stream(self) -> impl Stream<Item = Result<RawDelivery>> + Send + 'static {
        futures::stream::unfold(self, |c| async move {
            loop {
                let closed = &c.rows.0.closed;
                match c.lease().await {
                    Ok(Some(delivery)) => return Some((Ok(delivery), c)),
                    Ok(None) => {}
                    Err(_) if closed.is_cancelled() => return None,
                    Err(e) => return Some((Err(e), c)),
                }
                tokio::select! {
                    () = closed.cancelled() => return None,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        })
    }
}

/// An anonymous subscription goes away with its consumer.
impl Drop for Consumer {
    fn drop(&mut self) {
        let (db, part) = (self.rows.0.db.clone(), self.part);
        if let (true, Ok(runtime)) = (self.anonymous, tokio::runtime::Handle::try_current()) {
            let delete = sqlx::query("DELETE FROM parts WHERE id = ?").bind(part);
            runtime.spawn(async move { delete.execute(&db).await });
        }
    }
}

/// Settles rows by id (the delivery's tag).
struct Rows(SqliteTransport);

#[async_trait]
impl Acker for Rows {
    async fn ack(&self, tag: u64) -> Result<()> {
        let query = sqlx::query("DELETE FROM messages WHERE id = ?");
        self.0.run(query.bind(tag as i64), "acking").await
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        let query = sqlx::query("UPDATE messages SET visible_at = 0 WHERE id = ?");
        self.0.run(query.bind(tag as i64), "nacking").await
    }
}

/// Opens `sqlite-example://` URLs for an [`evbus::Registry`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteConnector;

#[async_trait]
impl evbus::Connector for SqliteConnector {
    fn schemes(&self) -> &'static [&'static str] {
        &[URL_SCHEME]
    }

    async fn connect(&self, url: &url::Url) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(SqliteTransport::connect(url.as_str()).await?))
    }
}
