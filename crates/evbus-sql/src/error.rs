//! sqlx errors as evbus errors: only an unreachable database is `Connection`/`Timeout`.

use evbus::{Error, ErrorKind};

/// The error kind of a sqlx error.
pub(crate) fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => ErrorKind::Connection,
        // Only the transport's own close closes its pool.
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::Configuration(_) => ErrorKind::InvalidConfig,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // PostgreSQL: connection exceptions, shutting down / starting up, too many
                // connections, serialization and deadlock (retry).
                c if c.starts_with("08") => ErrorKind::Connection,
                "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" => ErrorKind::Connection,
                // PostgreSQL: wrong password, no such role or database.
                "28P01" | "28000" | "3D000" => ErrorKind::InvalidConfig,
                // SQLite: SQLITE_BUSY, SQLITE_LOCKED (another writer held the file too long).
                "5" | "6" | "517" | "261" | "262" => ErrorKind::Timeout,
                _ => ErrorKind::Broker,
            }
        }
        _ => ErrorKind::Broker,
    }
}

/// Wraps a sqlx error: `what` says what the transport was doing.
pub(crate) fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| {
        let kind = kind_of(&e);
        let error = Error::client(kind, what, e);
        match kind {
            ErrorKind::InvalidConfig => {
                error.with_hint("check the user, password and database name of the URL")
            }
            _ => error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_closed_by_the_transport_is_closed_not_a_retryable_outage() {
        let e = sql("cleaning up")(sqlx::Error::PoolClosed);
        assert_eq!(e.kind(), ErrorKind::Closed);
        assert!(!e.is_retryable());
    }
}
