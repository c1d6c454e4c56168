//! The transactional outbox: stage events inside the application's own transaction, and a
//! relay that forwards committed events to any transport.
//!
//! An application that saves state and emits an event about it must not lose the event when
//! it crashes between the two, nor emit it when the transaction rolls back. With the outbox
//! it writes the event into a table **in the same database transaction** as its state
//! ([`Outbox::stage`]); a [`Relay`] reads the committed rows and publishes them, unchanged
//! (same id), to any evbus [`Transport`](evbus::Transport) — Redis, Kafka, NATS, ...
//!
//! - **Validation** is the catalogue's, at staging time, exactly like
//!   [`Bus::send`](evbus::Bus::send) ([`Bus::prepare_event`](evbus::Bus::prepare_event)): an
//!   invalid event is refused with the same [`ErrorKind::Validation`](evbus::ErrorKind) error
//!   and nothing is written.
//! - **Rolled back** transactions emit nothing: their rows never become visible.
//! - **At least once**: a row is deleted only after the transport accepted its event; a relay
//!   that dies between the two re-publishes it (same id: consumers de-duplicate by id).
//! - **Order per partition key**: rows are relayed in staging order per key-hash bucket, and
//!   a bucket is relayed by one relay at a time (a lease with an expiry, PostgreSQL).
//! - **Several relays** on one PostgreSQL database share the 64 buckets; a relay that dies
//!   loses its leases when they expire and the others take its buckets over.
//!
//! The application creates the table once with [`Outbox::migrate`] (idempotent), at start-up
//! or in its own migrations (the DDL is plain `CREATE TABLE IF NOT EXISTS`).
//!
//! See the crate README's "Outbox" section and `docs/adr/0009-outbox.md`.

mod relay;
mod store;
mod table;

use std::future::Future;

use evbus::bus::Emit;
use evbus::{Bus, Result};
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use tracing::Instrument;

pub use relay::{Relay, RelayBuilder, RelayHandle, RelayStats};

use table::{DEFAULT_TABLE, Table, bucket_of};

/// Stages events in the application's own sqlx transaction, validated by a [`Bus`]'s
/// catalogue.
///
/// Cheap to clone. The [`Bus`] is used only to validate and build envelopes
/// ([`Bus::prepare_event`]), to name topics ([`Bus::topic_name`]) and for its transport's
/// size limit ([`Transport::check_size`](evbus::Transport::check_size)): an event its
/// publish would refuse is refused at stage. Give it the relay's transport (or one with the
/// same limit and, on Redis, the same content mode): a bus on `memory://` (16 MiB) in a
/// process that only stages lets through events that a relay to a smaller limit can never
/// publish, and such a row holds up the keys of its bucket until it is removed.
#[derive(Clone, Debug)]
pub struct Outbox {
    bus: Bus,
    table: Table,
    notify: bool,
}

/// One validated event ready to insert.
#[derive(Debug)]
struct Staged {
    id: String,
    ty: String,
    topic: String,
    key: Option<String>,
    bucket: i32,
    event: String,
}

impl Outbox {
    /// An outbox writing to the table `evbus_outbox`.
    pub fn new(bus: &Bus) -> Outbox {
        Outbox {
            bus: bus.clone(),
            table: Table::new(DEFAULT_TABLE).expect("the default table name is valid"),
            notify: true,
        }
    }

    /// An outbox writing to the table `table` (`name` or `schema.name`: lowercase ASCII
    /// letters, digits and `_`, at most 63 bytes in all with the suffixes the relay adds:
    /// PostgreSQL's limit for a name). Fails with
    /// [`ErrorKind::InvalidConfig`](evbus::ErrorKind::InvalidConfig) on another name.
    pub fn with_table(bus: &Bus, table: &str) -> Result<Outbox> {
        Ok(Outbox {
            bus: bus.clone(),
            table: Table::new(table)?,
            notify: true,
        })
    }

    /// PostgreSQL: whether staging sends a `NOTIFY` (delivered at commit) so relays wake at
    /// once. Default on. `NOTIFY` takes a database-wide lock at commit; a database with very
    /// many concurrent writers may turn it off and let relays poll
    /// ([`RelayBuilder::notify`], [`RelayBuilder::poll_interval`]). Ignored on SQLite.
    #[must_use]
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table.name
    }

    /// Creates the outbox table (and on PostgreSQL its lease and relay tables) if they do not
    /// exist. Idempotent and safe to run from several processes at once; the application
    /// runs it before staging.
    ///
    /// On PostgreSQL it looks up each table, the index and the lease rows first, and runs
    /// only the statements of what is missing: a role that may only read and write the
    /// existing tables (created by a migration role) may run it too. When something is
    /// missing that the role may not create, it fails with
    /// [`ErrorKind::Broker`](evbus::ErrorKind::Broker) and a hint naming the fix. The schema
    /// must exist.
    pub async fn migrate<DB: OutboxDatabase>(&self, pool: &Pool<DB>) -> Result<()> {
        DB::migrate(pool, &self.table).await
    }

    /// The statements [`migrate`](Self::migrate) runs on `DB`, in order, each idempotent: for
    /// an application that keeps its schema in migrations of its own. On PostgreSQL they end
    /// with the `INSERT` of the lease table's bucket rows (a relay adds missing ones itself,
    /// if its role may insert).
    pub fn ddl<DB: OutboxDatabase>(&self) -> Vec<String> {
        DB::ddl(&self.table)
    }

    /// Validates `emit` against the catalogue exactly as [`Bus::send`] would and writes it
    /// into the outbox inside `tx`; returns the event id. The event is published by a
    /// [`Relay`] once (and only if) `tx` commits.
    ///
    /// An invalid event fails with the catalogue's [`ErrorKind::Validation`](evbus::ErrorKind::Validation) error and
    /// nothing is written; a database error fails with [`ErrorKind::Connection`](evbus::ErrorKind::Connection) or
    /// [`ErrorKind::Broker`](evbus::ErrorKind::Broker) (the transaction is then usually aborted: roll it back).
    pub async fn stage<DB: OutboxDatabase>(
        &self,
        tx: &mut Transaction<'_, DB>,
        emit: Emit,
    ) -> Result<String> {
        let span = tracing::info_span!(
            "evbus.outbox.stage",
            event.r#type = %emit.event_type(),
            event.id = tracing::field::Empty,
            table = %self.table.name,
        );
        async {
            let staged = self.prepare(emit)?;
            tracing::Span::current().record("event.id", staged.id.as_str());
            DB::insert(&mut **tx, &self.table, &staged, self.notify).await?;
            Ok(staged.id)
        }
        .instrument(span)
        .await
    }

    /// Stages several events in `tx`, in order; returns their ids.
    ///
    /// Every event is validated first: if any is invalid, the error names each invalid one
    /// by its index and nothing is written.
    pub async fn stage_batch<DB: OutboxDatabase>(
        &self,
        tx: &mut Transaction<'_, DB>,
        emits: impl IntoIterator<Item = Emit>,
    ) -> Result<Vec<String>> {
        let staged = self
            .bus
            .prepare_events(emits)?
            .into_iter()
            .map(|event| self.staged(event))
            .collect::<Result<Vec<_>>>()?;
        for s in &staged {
            DB::insert(&mut **tx, &self.table, s, self.notify).await?;
        }
        Ok(staged.into_iter().map(|s| s.id).collect())
    }

    fn prepare(&self, emit: Emit) -> Result<Staged> {
        self.staged(self.bus.prepare_event(emit)?)
    }

    /// The row of a prepared event.
    fn staged(&self, event: evbus::Event) -> Result<Staged> {
        // An event the Bus's transport would refuse could never be relayed: it would hold up
        // the other keys of its bucket for as long as it stayed. Refused here, at stage, by
        // the transport's own measure (`Transport::check_size`: Redis in structured mode
        // counts the JSON it writes, others the data and attributes), on the event as the
        // relay will read it back from the row.
        let json = event.to_json()?;
        let relayed = evbus::Event::from_json(&json)?;
        if let Err(e) = self.bus.transport().check_size(&relayed) {
            return Err(match e.kind() {
                evbus::ErrorKind::TooLarge => evbus::Error::new(
                    evbus::ErrorKind::TooLarge,
                    format!(
                        "event {} of type `{}` was not staged: the relay could never publish \
                         it to the Bus's transport ({})",
                        event.id(),
                        event.ty(),
                        e.message()
                    ),
                )
                .with_hint("send a reference to the data instead"),
                _ => e,
            });
        }
        let topic = self.bus.topic_name(event.ty());
        let key = event.partition_key();
        let bucket = bucket_of(key.unwrap_or(event.id()));
        Ok(Staged {
            id: column_text(event.id()),
            ty: column_text(event.ty()),
            topic,
            key: key.map(column_text),
            bucket,
            event: json,
        })
    }
}

/// An attribute for the row's columns that only inform (`event_id`, `event_type`,
/// `partition_key`: the relay reads the event from its JSON), with a NUL written `\u0000`
/// as in that JSON: PostgreSQL's `text` cannot hold one, and the insert would fail and abort
/// the application's transaction over an event the Bus accepts.
fn column_text(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

mod sealed {
    // The sealed trait is not nameable outside this crate, so its crate-private argument
    // types are not part of the public interface.
    #![allow(unreachable_pub, private_interfaces)]

    use super::*;

    /// What the outbox runs on a database (not implementable outside this crate).
    pub trait Sealed: sqlx::Database {
        fn migrate<'a>(
            pool: &'a Pool<Self>,
            table: &'a Table,
        ) -> impl Future<Output = Result<()>> + Send + 'a;

        fn ddl(table: &Table) -> Vec<String>;

        fn insert<'a>(
            conn: &'a mut Self::Connection,
            table: &'a Table,
            staged: &'a Staged,
            notify: bool,
        ) -> impl Future<Output = Result<()>> + Send + 'a;
    }
}

/// A database the outbox stages in: [`sqlx::Postgres`] or [`sqlx::Sqlite`].
pub trait OutboxDatabase: sealed::Sealed {}

impl OutboxDatabase for Postgres {}
impl OutboxDatabase for Sqlite {}

#[allow(private_interfaces)] // see `sealed`
impl sealed::Sealed for Postgres {
    fn migrate<'a>(
        pool: &'a Pool<Self>,
        table: &'a Table,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        store::migrate_postgres(pool, table)
    }

    fn ddl(table: &Table) -> Vec<String> {
        table.postgres_ddl()
    }

    async fn insert(
        conn: &mut sqlx::PgConnection,
        table: &Table,
        staged: &Staged,
        notify: bool,
    ) -> Result<()> {
        let sql = if notify {
            table.insert_notify()
        } else {
            table.insert('$')
        };
        let mut query = sqlx::query(&sql)
            .bind(staged.bucket)
            .bind(&staged.topic)
            .bind(&staged.id)
            .bind(&staged.ty)
            .bind(staged.key.as_deref())
            .bind(&staged.event);
        if notify {
            query = query.bind(table.channel());
        }
        query
            .execute(conn)
            .await
            .map_err(|e| store::db_error(&format!("staging into `{}`", table.name), e))?;
        Ok(())
    }
}

#[allow(private_interfaces)] // see `sealed`
impl sealed::Sealed for Sqlite {
    fn migrate<'a>(
        pool: &'a Pool<Self>,
        table: &'a Table,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        store::migrate_sqlite(pool, table)
    }

    fn ddl(table: &Table) -> Vec<String> {
        table.sqlite_ddl()
    }

    async fn insert(
        conn: &mut sqlx::SqliteConnection,
        table: &Table,
        staged: &Staged,
        _notify: bool,
    ) -> Result<()> {
        let sql = table.insert('?');
        sqlx::query(&sql)
            .bind(staged.bucket)
            .bind(&staged.topic)
            .bind(&staged.id)
            .bind(&staged.ty)
            .bind(staged.key.as_deref())
            .bind(&staged.event)
            .execute(conn)
            .await
            .map_err(|e| store::db_error(&format!("staging into `{}`", table.name), e))?;
        Ok(())
    }
}
