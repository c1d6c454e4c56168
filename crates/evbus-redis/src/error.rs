//! Mapping `redis::RedisError` to [`evbus::Error`], with a kind a caller can act on and a
//! retryable classification.
//!
//! | Redis error | kind | retryable |
//! |---|---|---|
//! | I/O error, connection refused/reset/dropped | `Connection` | yes |
//! | no reply within the response or connect timeout | `Timeout` | yes |
//! | `LOADING`, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`, `READONLY`, `BUSY`, `MISCONF` | `Broker` | yes |
//! | `MOVED`, `ASK` reaching the adapter (a redirection storm during a failover) | `Broker` | yes |
//! | no connection to the cluster node owning a slot | `Connection` | yes |
//! | `CROSSSLOT` (a bug: every command stays within one slot) | `Internal` | no |
//! | `OOM` (maxmemory reached) | `Full` | yes |
//! | `NOGROUP` (the stream or group was deleted) | `NotFound` | no |
//! | authentication failed, `NOAUTH`, `WRONGPASS`, invalid client config | `InvalidConfig` | no |
//! | anything else (`NOPERM`, `WRONGTYPE`, protocol errors) | `Broker` | no |

use evbus::{Error, ErrorKind};
use redis::{RedisError, ServerErrorKind};

/// Converts a Redis error met while doing `what` ("publishing to topic `orders`").
pub(crate) fn from_redis(error: RedisError, what: &str) -> Error {
    let (kind, retryable, hint) = classify(&error);
    let mapped = Error::client(kind, what, error).with_hint(hint);
    match retryable {
        Some(retryable) => mapped.with_retryable(retryable),
        None => mapped,
    }
}

/// The evbus kind of a Redis error, an override of the kind's retryable default, and a hint.
fn classify(error: &RedisError) -> (ErrorKind, Option<bool>, &'static str) {
    use redis::ErrorKind as K;
    if error.is_timeout() {
        return (
            ErrorKind::Timeout,
            None,
            "Redis did not answer in time (command_timeout)",
        );
    }
    if error.is_connection_refusal() || error.is_connection_dropped() || error.is_io_error() {
        return (
            ErrorKind::Connection,
            None,
            "the adapter reconnects by itself; retry later",
        );
    }
    match error.kind() {
        K::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => (
            ErrorKind::Broker,
            Some(true),
            "Redis is temporarily unable to serve writes; retry later",
        ),
        // A cluster client follows redirections itself; one reaching the adapter is a
        // redirection storm during a failover (retry), or a cluster node used through a
        // single-server URL.
        K::Server(ServerErrorKind::Moved | ServerErrorKind::Ask) => (
            ErrorKind::Broker,
            Some(true),
            "the slot moved (a failover or resharding): retry; if this persists, the server is \
             a Redis Cluster node: use a redis+cluster:// URL (see the evbus-redis README, \
             Clusters)",
        ),
        K::ClusterConnectionNotFound => (
            ErrorKind::Connection,
            Some(true),
            "no connection to the cluster node owning the slot (a failover?); the client \
             reconnects by itself, retry later",
        ),
        K::Server(ServerErrorKind::CrossSlot) => (
            ErrorKind::Internal,
            Some(false),
            "keys of different hash slots in one command: a bug of evbus-redis, please report",
        ),
        K::AuthenticationFailed | K::InvalidClientConfig => (
            ErrorKind::InvalidConfig,
            None,
            "check the credentials and settings in the Redis URL",
        ),
        _ if is_no_group(error) => (
            ErrorKind::NotFound,
            None,
            "the stream or its consumer group no longer exists (deleted)",
        ),
        _ => match error.code() {
            Some("OOM") => (
                ErrorKind::Full,
                None,
                "Redis reached maxmemory: consume or trim streams, or raise maxmemory",
            ),
            Some("BUSY" | "MISCONF") => (
                ErrorKind::Broker,
                Some(true),
                "Redis is temporarily refusing commands; retry later",
            ),
            Some("NOAUTH" | "WRONGPASS") => (
                ErrorKind::InvalidConfig,
                None,
                "check the credentials in the Redis URL",
            ),
            Some("WRONGTYPE") => (
                ErrorKind::Broker,
                Some(false),
                "a key the adapter uses holds another type; choose another key_prefix",
            ),
            _ => (ErrorKind::Broker, None, ""),
        },
    }
}

/// Whether `error` says the stream or consumer group does not exist (directly, or from
/// inside a script, where Redis before 7.0 wraps it in an `ERR Error running script`), or
/// went away under a blocked read: Redis 7 answers an `XREADGROUP ... BLOCK` whose stream
/// key or group is deleted with `UNBLOCKED the stream key no longer exists` (or `the
/// consumer group this client was blocked on no longer exists`).
pub(crate) fn is_no_group(error: &RedisError) -> bool {
    match error.code() {
        Some("NOGROUP") => true,
        Some("UNBLOCKED") => error
            .detail()
            .is_some_and(|d| d.contains("no longer exists")),
        _ => error.detail().is_some_and(|d| d.contains("NOGROUP")),
    }
}

/// Whether `error` says the consumer group already exists.
pub(crate) fn is_busy_group(error: &RedisError) -> bool {
    error.code() == Some("BUSYGROUP")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn server(code: &str, detail: &str) -> RedisError {
        // Parse a real error reply, exactly as the client sees it from the server.
        let reply = format!("-{code} {detail}\r\n");
        let value = redis::parse_redis_value(reply.as_bytes()).expect("an error reply");
        match value.extract_error() {
            Err(e) => e,
            Ok(v) => panic!("not an error: {v:?}"),
        }
    }

    #[test]
    fn dropped_connections_are_retryable_connection_errors() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            let e = from_redis(io::Error::from(kind).into(), "publishing");
            assert_eq!(e.kind(), ErrorKind::Connection, "{kind:?}");
            assert!(e.is_retryable(), "{kind:?}");
        }
    }

    #[test]
    fn timeouts_are_retryable_timeouts() {
        let e = from_redis(io::Error::from(io::ErrorKind::TimedOut).into(), "acking");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
        assert!(e.message().starts_with("acking: "), "{e}");
    }

    #[test]
    fn transient_server_states_are_retryable() {
        for code in [
            "LOADING",
            "TRYAGAIN",
            "MASTERDOWN",
            "CLUSTERDOWN",
            "READONLY",
            "BUSY",
        ] {
            let e = from_redis(server(code, "try later"), "x");
            assert_eq!(e.kind(), ErrorKind::Broker, "{code}");
            assert!(e.is_retryable(), "{code}");
        }
    }

    #[test]
    fn cluster_redirections_during_a_failover_are_retryable() {
        for (code, detail) in [
            ("MOVED", "3999 127.0.0.1:7232"),
            ("ASK", "3999 127.0.0.1:7233"),
        ] {
            let e = from_redis(server(code, detail), "publishing");
            assert_eq!(e.kind(), ErrorKind::Broker, "{code}");
            assert!(e.is_retryable(), "{code}");
        }
        let e = from_redis(
            RedisError::from((redis::ErrorKind::ClusterConnectionNotFound, "no node")),
            "publishing",
        );
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
        let e = from_redis(server("CROSSSLOT", "Keys in request don't hash"), "x");
        assert!(!e.is_retryable());
    }

    #[test]
    fn out_of_memory_is_full() {
        let e = from_redis(
            server("OOM", "command not allowed when used memory > 'maxmemory'."),
            "x",
        );
        assert_eq!(e.kind(), ErrorKind::Full);
        assert!(e.is_retryable());
    }

    #[test]
    fn a_missing_group_is_not_found() {
        let err = server("NOGROUP", "No such key 'k' or consumer group 'g'");
        assert!(is_no_group(&err));
        let e = from_redis(err, "reading");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retryable());
        assert!(is_busy_group(&server(
            "BUSYGROUP",
            "Consumer Group name already exists"
        )));
    }

    #[test]
    fn a_blocked_read_whose_stream_or_group_was_deleted_is_not_found() {
        for detail in [
            "the stream key no longer exists",
            "the consumer group this client was blocked on no longer exists",
        ] {
            let err = server("UNBLOCKED", detail);
            assert!(is_no_group(&err), "{detail}");
            assert_eq!(from_redis(err, "reading").kind(), ErrorKind::NotFound);
        }
        // Unblocked by an operator (`CLIENT UNBLOCK <id> ERROR`): not a deletion.
        let err = server("UNBLOCKED", "client unblocked via CLIENT UNBLOCK");
        assert!(!is_no_group(&err));
    }

    #[test]
    fn refusals_are_not_retryable() {
        let e = from_redis(server("NOPERM", "this user has no permissions"), "x");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(!e.is_retryable());
        let e = from_redis(server("WRONGTYPE", "Operation against a key"), "x");
        assert!(!e.is_retryable());
        assert!(e.message().contains("key_prefix"), "{e}");
        let e = from_redis(server("WRONGPASS", "invalid username-password pair"), "x");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        let e = from_redis(server("ERR", "unknown command"), "x");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(!e.is_retryable());
    }
}
