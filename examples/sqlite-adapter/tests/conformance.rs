//! The evbus conformance suite against the SQLite example adapter, on a fresh database file
//! in a temporary directory (or the one `EVBUS_SQLITE_EXAMPLE_URL` names).
//!
//! The foreign-message case writes with sqlx itself, as another program sharing the file
//! would: a `messages` row whose event text is not a CloudEvent, in the queue's partition
//! (`parts` row `kind` `queue`, `dest` the queue's name, `name` empty; see `src/lib.rs`).
//!
//! `cargo test -p evbus-example-sqlite --test conformance -- --list` lists the cases.

use std::time::Duration;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::{Harness, RawProducer, Suite};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

// Fails `cargo test`, saying what to add, if the `[[test]]` table lacks `harness = false`.
evbus_conformance::harness_false_required!();

fn main() -> std::process::ExitCode {
    let dir = tempfile::tempdir().expect("a temporary directory for the database");
    let file = dir.path().join("evbus.db");
    let url = std::env::var("EVBUS_SQLITE_EXAMPLE_URL")
        .unwrap_or_else(|_| format!("sqlite-example://{}", file.display()));
    // A file is never "unreachable": an unhealthy first connection fails the run.
    let harness = Harness::new().require_brokers(true);
    harness
        .suite(move || {
            let raw = RawSqlite { url: url.clone() };
            Suite::new("sqlite-example", move || {
                let url = url.clone();
                async move { evbus_example_sqlite::connect(&url).await }
            })
            .with_raw_producer(raw)
        })
        .run()
}

/// A foreign producer: its own SQLite connection to the database file, no evbus involved.
struct RawSqlite {
    /// The `sqlite-example:///path/to/file.db` URL of the database under test.
    url: String,
}

#[async_trait]
impl RawProducer for RawSqlite {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        let failed = |e: sqlx::Error| {
            Error::new(
                ErrorKind::Connection,
                format!("the raw SQLite producer could not insert into queue `{queue}`: {e}"),
            )
        };
        let url = url::Url::parse(&self.url).map_err(|e| {
            Error::invalid_config(format!("the raw SQLite producer cannot read the URL: {e}"))
        })?;
        // Decoded, as `connect` reads it (`url.path()` is percent-encoded).
        let path = url.to_file_path().map_err(|()| {
            Error::invalid_config("the raw SQLite producer needs an absolute path in the URL")
        })?;
        let mut db = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(failed)?;
        // The queue's partition, created if needed, as `Queue::send` does.
        let part: i64 = sqlx::query_scalar(
            "INSERT INTO parts (kind, dest, name) VALUES ('queue', ?1, '') \
             ON CONFLICT DO UPDATE SET kind = kind RETURNING id",
        )
        .bind(queue)
        .fetch_one(&mut db)
        .await
        .map_err(failed)?;
        let inserted = sqlx::query(
            "INSERT INTO messages (part, visible_at, attempt, event) VALUES (?1, 0, 0, ?2)",
        )
        .bind(part)
        .bind("not a cloudevent")
        .execute(&mut db)
        .await
        .map_err(failed)?;
        db.close().await.map_err(failed)?;
        if inserted.rows_affected() != 1 {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the raw SQLite producer inserted {} rows into queue `{queue}`, expected 1",
                    inserted.rows_affected()
                ),
            ));
        }
        Ok(())
    }
}
