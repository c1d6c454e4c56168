//! Mapping `lapin::Error` to [`evbus::Error`], with a kind a caller can act on and a
//! retryable classification.
//!
//! | AMQP / client error | kind | retryable |
//! |---|---|---|
//! | I/O error, connection or channel not open, missed heartbeats, `CONNECTION_FORCED` | `Connection` | yes |
//! | `RESOURCE_ERROR` (a broker resource alarm, memory or disk) | `Full` | yes |
//! | `RESOURCE_LOCKED` (an exclusive queue of another connection) | `Broker` | yes |
//! | `INTERNAL_ERROR` (e.g. a quorum queue consumed before its replica has started) | `Broker` | yes |
//! | `NOT_FOUND` "home node ... is down or inaccessible" (a classic queue on a lost cluster node) | `Broker` | yes |
//! | `NOT_FOUND` (a deleted exchange or queue), `NO_ROUTE` | `NotFound` | no |
//! | `CONTENT_TOO_LARGE`, a frame beyond `max_message_size` | `TooLarge` | no |
//! | `ACCESS_REFUSED` on connect, `NOT_ALLOWED`, `INVALID_PATH` (credentials, vhost) | `InvalidConfig` | no |
//! | anything else (`PRECONDITION_FAILED`, `ACCESS_REFUSED` on a resource, protocol errors) | `Broker` | no |

use evbus::{Error, ErrorKind};
use lapin::ErrorKind as K;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Converts a client error met while doing `what` ("publishing to topic `orders`").
pub(crate) fn from_lapin(error: lapin::Error, what: &str) -> Error {
    let class = classify(&error, false);
    build(error, what, class)
}

/// Converts an error met while connecting (an `ACCESS_REFUSED` there means bad credentials).
pub(crate) fn from_connect(error: lapin::Error, what: &str) -> Error {
    let class = classify(&error, true);
    build(error, what, class)
}

/// The evbus error of `error` met while doing `what`, of the given classification.
fn build(
    error: lapin::Error,
    what: &str,
    (kind, retryable, hint): (ErrorKind, Option<bool>, &'static str),
) -> Error {
    let mapped = Error::client(kind, what, error).with_hint(hint);
    match retryable {
        Some(retryable) => mapped.with_retryable(retryable),
        None => mapped,
    }
}

/// A timeout of `what` after `limit`.
pub(crate) fn timeout(what: &str, limit: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("{what}: no answer from RabbitMQ within {limit:?} (command_timeout); retry later"),
    )
}

const RECONNECTS: &str = "the adapter reconnects by itself; retry later";

fn classify(error: &lapin::Error, connecting: bool) -> (ErrorKind, Option<bool>, &'static str) {
    match error.kind() {
        K::IOError(_)
        | K::InvalidConnectionState(_)
        | K::InvalidChannelState(..)
        | K::InvalidChannel(_)
        | K::MissingHeartbeatError => (ErrorKind::Connection, None, RECONNECTS),
        // A frame the client could not parse closes the connection, and the adapter
        // reconnects: in practice a foreign message whose properties are not UTF-8, which
        // comes back at every reconnection until an operator removes it (README, "Broker
        // gaps"). Retryable: the operation succeeds once it is gone. (While connecting, it
        // is what answered that is not RabbitMQ.)
        K::ParsingError(_) if !connecting => (
            ErrorKind::Connection,
            None,
            "the connection was lost to a message the client cannot parse (a property that is \
             not UTF-8, written by a producer other than evbus); the adapter reconnects, but \
             the message comes back until it is taken off its queue: the error log names the \
             queue to look in (README, \"Broker gaps\")",
        ),
        K::ChannelsLimitReached => (
            ErrorKind::Full,
            None,
            "the connection has no channel left (channel_max); close subscriptions or raise it",
        ),
        K::AuthProviderError(_) => (
            ErrorKind::InvalidConfig,
            None,
            "check the credentials in the AMQP URL",
        ),
        K::ProtocolError(amqp) => match amqp.kind() {
            // A user's or vhost's `max-connections` reached (`set_user_limits`,
            // `set_vhost_limits`): NOT_ALLOWED, as a vhost the user may not use, but it
            // clears as other connections close, and every subscription opens one of its own.
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                if amqp.get_message().as_str().contains("connection limit") =>
            {
                (
                    ErrorKind::Full,
                    Some(true),
                    "RabbitMQ refused another connection: the user's or the vhost's connection \
                     limit is reached. Each subscription of an AMQP transport has a connection \
                     of its own, besides the transport's (README, \"Mapping\"): raise the limit \
                     (`rabbitmqctl set_user_limits` or `set_vhost_limits`) or hold fewer \
                     subscriptions; the adapter retries",
                )
            }
            // In a cluster, a durable classic queue (a topic's subscription directory) lives
            // on one node: while that node is down, RabbitMQ answers NOT_FOUND "home node
            // ... is down or inaccessible". It comes back with the node.
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
                if amqp.get_message().as_str().contains("down or inaccessible") =>
            {
                (
                    ErrorKind::Broker,
                    Some(true),
                    "the cluster node holding this classic queue is down; retry once it is back",
                )
            }
            // A message over the broker's `max_message_size` closes the channel with
            // PRECONDITION_FAILED ("message size N is larger than configured max size M"), the
            // code of a declaration that does not match too.
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                if amqp
                    .get_message()
                    .as_str()
                    .contains("larger than configured max size") =>
            {
                (
                    ErrorKind::TooLarge,
                    None,
                    "the message is over RabbitMQ's max_message_size: keep max_payload_bytes \
                     under it, or raise it in rabbitmq.conf",
                )
            }
            AMQPErrorKind::Soft(soft) => soft_error(soft, connecting),
            AMQPErrorKind::Hard(hard) => hard_error(hard),
        },
        _ => (ErrorKind::Broker, None, ""),
    }
}

fn soft_error(error: &AMQPSoftError, connecting: bool) -> (ErrorKind, Option<bool>, &'static str) {
    match error {
        AMQPSoftError::NOTFOUND => (
            ErrorKind::NotFound,
            None,
            "the exchange or queue no longer exists (deleted); open the topic or queue again",
        ),
        AMQPSoftError::NOROUTE => (
            ErrorKind::NotFound,
            None,
            "no queue took the message (the queue was deleted); open the queue again",
        ),
        AMQPSoftError::CONTENTTOOLARGE => (
            ErrorKind::TooLarge,
            None,
            "the message exceeds RabbitMQ's max_message_size",
        ),
        AMQPSoftError::ACCESSREFUSED if connecting => (
            ErrorKind::InvalidConfig,
            None,
            "RabbitMQ refused the login: check the user and password in the AMQP URL",
        ),
        AMQPSoftError::ACCESSREFUSED => (
            ErrorKind::Broker,
            Some(false),
            "the user lacks a permission on this vhost (configure, write or read)",
        ),
        AMQPSoftError::RESOURCELOCKED => (
            ErrorKind::Broker,
            Some(true),
            "the queue is exclusive to another connection; retry later",
        ),
        AMQPSoftError::PRECONDITIONFAILED => (
            ErrorKind::Broker,
            Some(false),
            "an exchange or queue of this name exists with other settings (another \
             application, or a classic queue where evbus wants a quorum queue); delete it or \
             choose another prefix",
        ),
        AMQPSoftError::NOCONSUMERS => (ErrorKind::Broker, None, ""),
    }
}

fn hard_error(error: &AMQPHardError) -> (ErrorKind, Option<bool>, &'static str) {
    match error {
        AMQPHardError::CONNECTIONFORCED => (
            ErrorKind::Connection,
            None,
            "RabbitMQ closed the connection (shutdown or an operator); the adapter reconnects",
        ),
        AMQPHardError::RESOURCEERROR => (
            ErrorKind::Full,
            None,
            "RabbitMQ is short of a resource (memory or disk alarm); retry later",
        ),
        AMQPHardError::INVALIDPATH | AMQPHardError::NOTALLOWED => (
            ErrorKind::InvalidConfig,
            None,
            "check the vhost in the AMQP URL and the user's access to it",
        ),
        // Seen from RabbitMQ 3.x when several clients declare and consume one new quorum
        // queue at once: the consume can reach the queue before its Raft member runs, the
        // channel crashes and the connection closes. A new attempt on the new connection
        // succeeds.
        AMQPHardError::INTERNALERROR => (
            ErrorKind::Broker,
            Some(true),
            "RabbitMQ hit an internal error and closed the connection (e.g. a quorum queue \
             consumed while it was still starting); the adapter reconnects and a retry usually \
             succeeds",
        ),
        AMQPHardError::FRAMEERROR => (
            ErrorKind::TooLarge,
            None,
            "the message exceeds a broker limit (frame_max or max_message_size)",
        ),
        _ => (ErrorKind::Broker, None, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn amqp(id: u16) -> lapin::Error {
        let error = AMQPError::from_id(id, "reply text".into()).expect("a known reply code");
        lapin::ErrorKind::ProtocolError(error).into()
    }

    /// RabbitMQ refuses a message over its `max_message_size` with PRECONDITION_FAILED, the
    /// code of a declaration that does not match: it was reported as one ("an exchange or
    /// queue of this name exists with other settings"), a `Broker` error (outside review).
    #[test]
    fn a_message_over_max_message_size_is_too_large_not_a_declaration_mismatch() {
        let error: lapin::Error = lapin::ErrorKind::ProtocolError(
            AMQPError::from_id(
                406,
                "PRECONDITION_FAILED - message size 2097300 is larger than configured max size \
                 1048576"
                    .into(),
            )
            .expect("PRECONDITION_FAILED"),
        )
        .into();
        let e = from_lapin(error, "sending");
        assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
        assert!(e.message().contains("max_message_size"), "{e}");
        assert!(!e.message().contains("other settings"), "{e}");
        let e = from_lapin(amqp(406), "declaring");
        assert_eq!(e.kind(), ErrorKind::Broker, "{e}");
    }

    #[test]
    fn a_connection_limit_reached_is_a_retryable_full_error_not_a_vhost_problem() {
        for text in [
            "NOT_ALLOWED - connection refused for user 'u': user connection limit (3) is reached",
            "NOT_ALLOWED - access to vhost 'v' refused for user 'u': connection limit (2) is reached",
        ] {
            let error: lapin::Error = lapin::ErrorKind::ProtocolError(
                AMQPError::from_id(530, text.into()).expect("NOT_ALLOWED"),
            )
            .into();
            let e = from_connect(error, "connecting");
            assert_eq!(e.kind(), ErrorKind::Full, "{e}");
            assert!(e.is_retryable(), "{e}");
            assert!(e.message().contains("connection limit"), "{e}");
            assert!(!e.message().contains("check the vhost"), "{e}");
        }
        // A vhost the user may not use is still a configuration error.
        let error: lapin::Error = lapin::ErrorKind::ProtocolError(
            AMQPError::from_id(530, "NOT_ALLOWED - vhost v not found".into()).expect("530"),
        )
        .into();
        assert_eq!(
            from_connect(error, "connecting").kind(),
            ErrorKind::InvalidConfig
        );
    }

    #[test]
    fn dropped_connections_are_retryable_connection_errors() {
        let io: lapin::Error = lapin::ErrorKind::IOError(std::sync::Arc::new(
            std::io::ErrorKind::ConnectionReset.into(),
        ))
        .into();
        let e = from_lapin(io, "publishing");
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
        assert!(e.message().starts_with("publishing: "), "{e}");
        let e = from_lapin(lapin::ErrorKind::MissingHeartbeatError.into(), "x");
        assert!(e.is_retryable());
        let e = from_lapin(amqp(320), "x"); // CONNECTION_FORCED
        assert_eq!(e.kind(), ErrorKind::Connection);
    }

    #[test]
    fn broker_refusals_are_classified() {
        let e = from_lapin(amqp(404), "publishing");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retryable());
        let e = from_lapin(amqp(312), "sending");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = from_lapin(amqp(406), "declaring");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(!e.is_retryable());
        assert!(e.message().contains("quorum"), "{e}");
        let e = from_lapin(amqp(405), "consuming");
        assert!(e.is_retryable());
        let e = from_lapin(amqp(506), "publishing");
        assert_eq!(e.kind(), ErrorKind::Full);
        assert!(e.is_retryable());
        let e = from_lapin(amqp(311), "publishing");
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        let e = from_lapin(amqp(541), "consuming");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(e.is_retryable());
    }

    #[test]
    fn a_classic_queue_on_a_lost_cluster_node_is_retryable() {
        // The reply text of RabbitMQ 3.10 for a durable classic queue whose node is down.
        let error = AMQPError::from_id(
            404,
            "NOT_FOUND - home node 'evbus2@localhost' of durable queue 'evbus.t_d_subscriptions' \
             in vhost '/' is down or inaccessible"
                .into(),
        )
        .unwrap();
        let e = from_lapin(lapin::ErrorKind::ProtocolError(error).into(), "declaring");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert!(e.is_retryable(), "{e}");
        assert!(e.message().contains("node"), "{e}");
    }

    #[test]
    fn login_and_vhost_refusals_are_configuration_errors() {
        let e = from_connect(amqp(403), "connecting");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("password"), "{e}");
        let e = from_lapin(amqp(403), "declaring");
        assert_eq!(e.kind(), ErrorKind::Broker);
        let e = from_connect(amqp(530), "connecting");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("vhost"), "{e}");
    }

    #[test]
    fn timeouts_are_retryable() {
        let e = timeout("acking", std::time::Duration::from_secs(1));
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
    }
}
