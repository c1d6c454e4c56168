//! Mapping async-nats errors to [`evbus::Error`], with a kind a caller can act on and a
//! retryable classification.
//!
//! | async-nats error | kind | retryable |
//! |---|---|---|
//! | connection refused, I/O error, broken pipe, DNS | `Connection` | yes |
//! | no reply in time (PubAck, API request, double ack, connect) | `Timeout` | yes |
//! | no responders (JetStream not up yet, e.g. right after a restart) | `Connection` | yes |
//! | JetStream cluster busy: no leader, not enough peers, Raft error, stream or consumer offline | `Broker` | yes |
//! | a publish nobody took although its stream exists (no stream leader: election) | `Broker` | yes |
//! | `replicas` above 1 on a server that is not in a cluster | `InvalidConfig` | no |
//! | storage or account limits reached | `Full` | yes |
//! | message above the server's `max_payload` or the stream's `max_msg_size` | `TooLarge` | no |
//! | stream or consumer not found | `NotFound` | no |
//! | authentication or authorization failed, TLS setup, bad server address | `InvalidConfig` | no |
//! | JetStream not enabled on the server or account | `Broker` | no |
//! | a stream name or subject taken with another configuration | `Broker` | no |
//! | anything else | `Broker` | no |

use std::error::Error as StdError;

use async_nats::jetstream::context::{
    ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamError, CreateStreamErrorKind,
    GetStreamError, GetStreamErrorKind, PublishError, PublishErrorKind,
    RequestError as JsRequestError, RequestErrorKind as JsRequestErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectError, ConnectErrorKind, RequestError, RequestErrorKind};
use evbus::{Error, ErrorKind};

/// A classification: the evbus kind, an override of the kind's retryable default, a hint.
pub(crate) type Class = (ErrorKind, Option<bool>, &'static str);

const RECONNECTING: &str = "the adapter reconnects by itself; retry later";
const TIMED_OUT: &str = "NATS did not answer in time (request_timeout); retry later";
const NO_RESPONDERS: &str = "nothing answered on the JetStream API: JetStream is starting up or the server is \
     reconnecting; retry later";
const NOT_FOUND: &str = "the stream or consumer no longer exists (deleted)";

/// Builds the evbus error of `error`, met while doing `what`.
pub(crate) fn build<E>(error: E, what: &str, class: Class) -> Error
where
    E: StdError + Send + Sync + 'static,
{
    let (kind, retryable, hint) = class;
    let mapped = Error::client(kind, what, error).with_hint(hint);
    match retryable {
        Some(retryable) => mapped.with_retryable(retryable),
        None => mapped,
    }
}

/// The class of a JetStream API error code.
pub(crate) fn classify_code(code: ErrorCode) -> Class {
    match code {
        ErrorCode::STREAM_NOT_FOUND | ErrorCode::CONSUMER_NOT_FOUND => {
            (ErrorKind::NotFound, None, NOT_FOUND)
        }
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => (
            ErrorKind::TooLarge,
            None,
            "the message exceeds the stream's max_msg_size",
        ),
        ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED => (
            ErrorKind::Full,
            None,
            "JetStream storage or account limits are reached: delete streams, shorten max_age \
             or raise the server's limits",
        ),
        ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NOT_LEADER
        | ErrorCode::CLUSTER_NOT_ACTIVE
        | ErrorCode::CLUSTER_INCOMPLETE
        | ErrorCode::RAFT_GENERAL
        | ErrorCode::STREAM_OFFLINE
        | ErrorCode::CONSUMER_OFFLINE => (
            ErrorKind::Broker,
            Some(true),
            "the JetStream cluster is electing a leader or missing peers; retry later",
        ),
        ErrorCode::CLUSTER_NO_PEERS => (
            ErrorKind::Broker,
            Some(false),
            "not enough JetStream servers are up for the configured replicas: bring the \
             missing servers back, or lower `replicas`",
        ),
        ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED => (
            ErrorKind::InvalidConfig,
            Some(false),
            "this server is not part of a JetStream cluster: `replicas` above 1 needs a \
             cluster (nats-server --cluster ... --routes ...); use replicas=1 on a single server",
        ),
        ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT => (
            ErrorKind::Broker,
            Some(false),
            "JetStream is not enabled: start nats-server with -js (or enable it for the account)",
        ),
        ErrorCode::STREAM_NAME_EXIST => (
            ErrorKind::Broker,
            Some(false),
            "a stream of this name exists with another configuration (storage, retention, \
             replicas); delete it or use another stream_prefix",
        ),
        ErrorCode::STREAM_SUBJECT_OVERLAP => (
            ErrorKind::Broker,
            Some(false),
            "another stream already binds this subject; use another subject_prefix",
        ),
        _ => (ErrorKind::Broker, None, ""),
    }
}

/// The class of an error found in a source chain (I/O, request and JetStream API errors).
fn classify_chain(error: &(dyn StdError + 'static)) -> Class {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(e) = e.downcast_ref::<jetstream::Error>() {
            return classify_code(e.error_code());
        }
        if let Some(e) = e.downcast_ref::<JsRequestError>() {
            match e.kind() {
                JsRequestErrorKind::TimedOut => return (ErrorKind::Timeout, None, TIMED_OUT),
                JsRequestErrorKind::NoResponders => {
                    return (ErrorKind::Connection, None, NO_RESPONDERS);
                }
                _ => {}
            }
        }
        if let Some(e) = e.downcast_ref::<RequestError>() {
            match e.kind() {
                RequestErrorKind::TimedOut => return (ErrorKind::Timeout, None, TIMED_OUT),
                RequestErrorKind::NoResponders => {
                    return (ErrorKind::Connection, None, NO_RESPONDERS);
                }
                RequestErrorKind::MaxPayloadExceeded => return too_large(),
                _ => {}
            }
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            return match e.kind() {
                std::io::ErrorKind::TimedOut => (ErrorKind::Timeout, None, TIMED_OUT),
                _ => (ErrorKind::Connection, None, RECONNECTING),
            };
        }
        current = e.source();
    }
    (ErrorKind::Broker, None, "")
}

fn too_large() -> Class {
    (
        ErrorKind::TooLarge,
        None,
        "the message (headers and data) exceeds the server's max_payload",
    )
}

/// Connecting.
pub(crate) fn from_connect(error: ConnectError, what: &str) -> Error {
    let class = match error.kind() {
        ConnectErrorKind::Io | ConnectErrorKind::Dns | ConnectErrorKind::MaxReconnects => (
            ErrorKind::Connection,
            None,
            "is nats-server running and reachable at this address?",
        ),
        ConnectErrorKind::TimedOut => (
            ErrorKind::Timeout,
            None,
            "the server did not answer within connect_timeout",
        ),
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::InvalidConfig,
            None,
            "check the credentials (user and password, token, nkey or creds file)",
        ),
        ConnectErrorKind::Tls => (
            ErrorKind::InvalidConfig,
            None,
            "check the TLS settings (tls://, tls_ca) and the server's certificate",
        ),
        ConnectErrorKind::ServerParse => (
            ErrorKind::InvalidConfig,
            None,
            "check the server address in the URL",
        ),
    };
    build(error, what, class)
}

/// Publishing (the PubAck).
pub(crate) fn from_publish(error: PublishError, what: &str) -> Error {
    let class = match error.kind() {
        PublishErrorKind::TimedOut => (
            ErrorKind::Timeout,
            None,
            "no PubAck within request_timeout: the event may or may not be stored; publishing \
             it again is safe within the duplicate window (same event id)",
        ),
        PublishErrorKind::BrokenPipe => (ErrorKind::Connection, None, RECONNECTING),
        PublishErrorKind::MaxAckPending => (
            ErrorKind::Full,
            None,
            "too many publishes wait for their PubAck; retry later",
        ),
        PublishErrorKind::MaxPayloadExceeded => too_large(),
        PublishErrorKind::StreamNotFound => (ErrorKind::NotFound, None, NOT_FOUND),
        _ => match StdError::source(&error) {
            Some(source) => classify_chain(source),
            None => (ErrorKind::Broker, None, ""),
        },
    };
    build(error, what, class)
}

/// A core NATS request (a double ack).
pub(crate) fn from_request(error: RequestError, what: &str) -> Error {
    let class = classify_chain(&error);
    build(error, what, class)
}

/// Creating a stream.
pub(crate) fn from_create_stream(error: CreateStreamError, what: &str) -> Error {
    let class = match error.kind() {
        CreateStreamErrorKind::JetStream(e) => classify_code(e.error_code()),
        CreateStreamErrorKind::TimedOut => (ErrorKind::Timeout, None, TIMED_OUT),
        CreateStreamErrorKind::JetStreamUnavailable => (ErrorKind::Connection, None, NO_RESPONDERS),
        CreateStreamErrorKind::NotFound => (ErrorKind::NotFound, None, NOT_FOUND),
        CreateStreamErrorKind::EmptyStreamName | CreateStreamErrorKind::InvalidStreamName => {
            (ErrorKind::InvalidConfig, None, "")
        }
        _ => chain_of(&error),
    };
    build(error, what, class)
}

/// Looking up or deleting a stream.
pub(crate) fn from_get_stream(error: GetStreamError, what: &str) -> Error {
    let class = match error.kind() {
        GetStreamErrorKind::JetStream(e) => classify_code(e.error_code()),
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
            (ErrorKind::InvalidConfig, None, "")
        }
        _ => chain_of(&error),
    };
    build(error, what, class)
}

/// Creating, updating or deleting a consumer.
pub(crate) fn from_consumer(error: ConsumerError, what: &str) -> Error {
    let class = match error.kind() {
        ConsumerErrorKind::JetStream(e) => classify_code(e.error_code()),
        ConsumerErrorKind::TimedOut => (ErrorKind::Timeout, None, TIMED_OUT),
        ConsumerErrorKind::InvalidName | ConsumerErrorKind::InvalidConsumerType => {
            (ErrorKind::InvalidConfig, None, "")
        }
        _ => chain_of(&error),
    };
    build(error, what, class)
}

/// Reading a consumer's info.
pub(crate) fn from_consumer_info(error: ConsumerInfoError, what: &str) -> Error {
    let class = classify_consumer_info(&error);
    build(error, what, class)
}

pub(crate) fn classify_consumer_info(error: &ConsumerInfoError) -> Class {
    match error.kind() {
        ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
            (ErrorKind::NotFound, None, NOT_FOUND)
        }
        ConsumerInfoErrorKind::JetStream(e) => classify_code(e.error_code()),
        ConsumerInfoErrorKind::TimedOut => (ErrorKind::Timeout, None, TIMED_OUT),
        ConsumerInfoErrorKind::NoResponders => (ErrorKind::Connection, None, NO_RESPONDERS),
        ConsumerInfoErrorKind::Offline => (
            ErrorKind::Broker,
            Some(true),
            "the consumer is offline (its server is down); retry later",
        ),
        ConsumerInfoErrorKind::InvalidName => (ErrorKind::InvalidConfig, None, ""),
        _ => chain_of(error),
    }
}

/// An error of a pull request or of the messages it returned (boxed by async-nats).
pub(crate) fn from_boxed(error: async_nats::Error, what: &str) -> Error {
    let class = classify_chain(error.as_ref());
    let (kind, retryable, hint) = class;
    let mut message = format!("{what}: {error}");
    if !hint.is_empty() {
        message.push_str("; ");
        message.push_str(hint);
    }
    let mapped = Error::new(kind, message);
    let mapped = match retryable {
        Some(r) => mapped.with_retryable(r),
        None => mapped,
    };
    mapped.with_source(error)
}

fn chain_of(error: &(dyn StdError + 'static)) -> Class {
    match error.source() {
        Some(source) => classify_chain(source),
        None => (ErrorKind::Broker, None, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn js_error(code: u64, status: usize, description: &str) -> jetstream::Error {
        // Parse a real API error body, exactly as the client reads it from the server.
        serde_json::from_value(serde_json::json!({
            "code": status,
            "err_code": code,
            "description": description,
        }))
        .expect("an API error")
    }

    #[test]
    fn publish_timeouts_are_retryable_and_say_republishing_is_safe() {
        let e = from_publish(PublishError::new(PublishErrorKind::TimedOut), "publishing");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
        assert!(e.message().starts_with("publishing: "), "{e}");
        assert!(e.message().contains("duplicate window"), "{e}");
        let e = from_publish(PublishError::new(PublishErrorKind::BrokenPipe), "x");
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
    }

    #[test]
    fn oversized_messages_are_too_large_and_not_retryable() {
        let e = from_publish(PublishError::new(PublishErrorKind::MaxPayloadExceeded), "x");
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(!e.is_retryable());
        let e = from_publish(
            PublishError::with_source(
                PublishErrorKind::Other,
                js_error(10054, 400, "message size exceeds maximum allowed"),
            ),
            "x",
        );
        assert_eq!(e.kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn io_errors_are_retryable_connection_errors() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
        ] {
            let e = from_boxed(Box::new(io::Error::from(kind)), "pulling");
            assert_eq!(e.kind(), ErrorKind::Connection, "{kind:?}");
            assert!(e.is_retryable(), "{kind:?}");
        }
        let e = from_boxed(Box::new(io::Error::from(io::ErrorKind::TimedOut)), "acking");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        let e = from_connect(ConnectError::new(ConnectErrorKind::Io), "connecting");
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
    }

    #[test]
    fn bad_credentials_are_configuration_errors() {
        for kind in [
            ConnectErrorKind::Authentication,
            ConnectErrorKind::AuthorizationViolation,
            ConnectErrorKind::Tls,
            ConnectErrorKind::ServerParse,
        ] {
            let e = from_connect(ConnectError::new(kind), "connecting");
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{kind:?}");
            assert!(!e.is_retryable(), "{kind:?}");
        }
    }

    #[test]
    fn no_responders_means_jetstream_is_not_up_yet() {
        let e = from_request(RequestError::new(RequestErrorKind::NoResponders), "acking");
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
        let e = from_request(RequestError::new(RequestErrorKind::TimedOut), "acking");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        let e = from_consumer_info(
            ConsumerInfoError::new(ConsumerInfoErrorKind::NoResponders),
            "x",
        );
        assert!(e.is_retryable());
    }

    #[test]
    fn api_error_codes_are_classified() {
        let cases = [
            (10059, ErrorKind::NotFound, false),
            (10014, ErrorKind::NotFound, false),
            (10047, ErrorKind::Full, true),
            (10008, ErrorKind::Broker, true),
            (10005, ErrorKind::Broker, false),
            (10076, ErrorKind::Broker, false),
            (10058, ErrorKind::Broker, false),
            (10065, ErrorKind::Broker, false),
            (10118, ErrorKind::Broker, true),
            (10119, ErrorKind::Broker, true),
            (10006, ErrorKind::Broker, true),
            (10074, ErrorKind::InvalidConfig, false),
            (10999, ErrorKind::Broker, false),
        ];
        for (code, kind, retryable) in cases {
            let e = from_create_stream(
                CreateStreamError::new(CreateStreamErrorKind::JetStream(js_error(
                    code, 400, "test",
                ))),
                "creating",
            );
            assert_eq!(e.kind(), kind, "{code}");
            assert_eq!(e.is_retryable(), retryable, "{code}");
        }
        let e = from_consumer(
            ConsumerError::new(ConsumerErrorKind::JetStream(js_error(
                10014,
                404,
                "consumer not found",
            ))),
            "x",
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = from_get_stream(
            GetStreamError::new(GetStreamErrorKind::JetStream(js_error(
                10059,
                404,
                "stream not found",
            ))),
            "x",
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
