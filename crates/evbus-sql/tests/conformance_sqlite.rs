//! The conformance suite against the SQLite transport, on a fresh database file in a
//! temporary directory (or the file `EVBUS_SQLITE_URL` names).
//!
//! The three outage cases (`lifecycle_*_outage_*`, `lifecycle_health_reflects_a_broker_outage`)
//! are reported `IGNORED ...: needs broker-control`: they interrupt a broker while the same
//! connections stay open and expect them to recover, and an embedded SQLite database has no
//! broker apart from the process that holds the file. What they protect — nothing accepted is
//! lost when the holder dies, and the next process reopens the file — is tested with real
//! processes instead: `tests/sqlite.rs` (`a_killed_process_loses_no_accepted_event_...`) and
//! `crates/evbus-cli/tests/serve_restart.rs`.
//!
//! The foreign-message case writes with plain sqlx on its own connection to the file.

use std::process::ExitCode;
use std::time::Duration;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::{RawProducer, Suite};
use evbus_sql::{SqlConfig, SqlTransport};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    let dir = tempfile::tempdir().expect("a temporary directory for the database");
    let url = std::env::var("EVBUS_SQLITE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bus.db").display()));
    let raw_url = url.clone();
    evbus_conformance::main(move || {
        Suite::new("sqlite", move || {
            let url = url.clone();
            async move { SqlTransport::connect(SqlConfig::from_url(&url)?).await }
        })
        .with_raw_producer(RawSqlite { url: raw_url })
    })
}

/// A foreign producer: its own SQLite connection to the file, no evbus involved.
struct RawSqlite {
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
        let path = SqlConfig::from_url(&self.url)?
            .sqlite_path()
            .ok_or_else(|| Error::invalid_config("not an SQLite URL"))?;
        let mut db = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(failed)?;
        let mut tx = db.begin().await.map_err(failed)?;
        sqlx::query(
            "INSERT INTO evbus_parts (kind, dest, name, seen_at) VALUES ('queue', ?1, '', 0) \
             ON CONFLICT (kind, dest, name) DO NOTHING",
        )
        .bind(queue)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        let event: i64 = sqlx::query_scalar(
            "INSERT INTO evbus_events (kind, dest, body, created_at) \
             VALUES ('queue', ?1, 'not a cloudevent', 0) RETURNING id",
        )
        .bind(queue)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
        sqlx::query(
            "INSERT INTO evbus_deliveries (part, event, visible_at, attempt) \
             SELECT id, ?2, 0, 0 FROM evbus_parts WHERE kind = 'queue' AND dest = ?1 AND name = ''",
        )
        .bind(queue)
        .bind(event)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        db.close().await.map_err(failed)?;
        Ok(())
    }
}
