//! Mapping `rdkafka::error::KafkaError` to [`evbus::Error`], with a kind a caller can act on
//! and a retryable classification.
//!
//! | Kafka error | kind | retryable |
//! |---|---|---|
//! | transport failure, all brokers down, message timed out, request timed out | `Connection` / `Timeout` | yes |
//! | `MSG_SIZE_TOO_LARGE`, `MESSAGE_BATCH_TOO_LARGE` | `TooLarge` | no |
//! | local queue full | `Full` | yes |
//! | not leader, coordinator loading/not available, rebalance in progress | `Broker` | yes |
//! | unknown topic or partition | `NotFound` | no |
//! | invalid configuration (`ClientConfig`, bad broker list) | `InvalidConfig` | no |
//! | anything else | `Broker` | no |

use evbus::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Converts a Kafka error met while doing `what` ("publishing to topic `orders`").
pub(crate) fn from_kafka(error: KafkaError, what: &str) -> Error {
    if let KafkaError::ClientConfig(_, description, property, value) = &error {
        return config_error(description, property, value, what);
    }
    let (kind, retryable, hint) = classify(&error);
    let mapped = Error::client(kind, what, error).with_hint(hint);
    match retryable {
        Some(retryable) => mapped.with_retryable(retryable),
        None => mapped,
    }
}

/// A librdkafka configuration error: its description and property, with the value only when
/// the property's name does not look secret. librdkafka's own message quotes the value, which
/// may be a password (`ssl.key.password` refused by a build without TLS).
fn config_error(description: &str, property: &str, value: &str, what: &str) -> Error {
    let message = if evbus::registry::is_secret_parameter(property) {
        let description = if value.is_empty() {
            description.to_owned()
        } else {
            description.replace(value, "***")
        };
        format!("{what}: {description} (property `{property}`; its value is not shown)")
    } else {
        format!("{what}: {description} (property `{property}` = {value:?})")
    };
    Error::new(ErrorKind::InvalidConfig, message).with_hint("check the Kafka URL and settings")
}

/// The evbus kind of an rdkafka error code, an override of the kind's retryable default, and
/// a hint.
pub(crate) fn classify_code(code: RDKafkaErrorCode) -> (ErrorKind, Option<bool>, &'static str) {
    use RDKafkaErrorCode as C;
    const RECONNECTS: &str = "librdkafka reconnects by itself; retry later";
    match code {
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut => {
            (ErrorKind::Timeout, None, RECONNECTS)
        }
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::BrokerDestroy => (ErrorKind::Connection, None, RECONNECTS),
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => (
            ErrorKind::TooLarge,
            None,
            "the event exceeds the message size limit (max_payload_bytes, the topic's max.message.bytes)",
        ),
        C::QueueFull => (
            ErrorKind::Full,
            None,
            "the producer's local queue is full; retry once in-flight publishes complete",
        ),
        C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::RebalanceInProgress
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::PartitionEOF
        | C::UnknownTopicOrPartition
        | C::UnknownPartition => (
            ErrorKind::Broker,
            Some(true),
            "the cluster is moving leadership or group state; retry later",
        ),
        C::UnknownTopic => (ErrorKind::NotFound, None, ""),
        C::InvalidArgument | C::InvalidConfig => (ErrorKind::InvalidConfig, None, ""),
        _ => (ErrorKind::Broker, None, ""),
    }
}

fn classify(error: &KafkaError) -> (ErrorKind, Option<bool>, &'static str) {
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => (
            ErrorKind::InvalidConfig,
            None,
            "check the Kafka URL and settings",
        ),
        KafkaError::Canceled => (ErrorKind::Closed, None, ""),
        other => match other.rdkafka_error_code() {
            Some(code) => classify_code(code),
            None => (ErrorKind::Broker, None, ""),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error librdkafka gives for one setting, from a client it refuses to create.
    fn refused(property: &str, value: &str) -> Error {
        let created = rdkafka::ClientConfig::new()
            .set(property, value)
            .create::<rdkafka::consumer::BaseConsumer>();
        match created {
            Err(e) => from_kafka(e, "creating the Kafka producer"),
            Ok(_) => panic!("librdkafka accepted {property}={value}"),
        }
    }

    #[test]
    fn a_secret_setting_refused_by_librdkafka_is_not_quoted() {
        // A misspelt secret (no such property), and a secret this build cannot use (no TLS).
        for property in ["sasl.passwd", "ssl.key.password"] {
            let e = refused(property, "hunter2");
            assert_eq!(e.kind(), ErrorKind::InvalidConfig);
            let text = e.to_string();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains(property), "{text}");
        }
        // Other settings keep their value, which explains the refusal.
        let e = refused("security.protocol", "bogus");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn outages_are_retryable_and_size_errors_are_too_large() {
        let e = from_kafka(
            KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown),
            "publishing",
        );
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(e.is_retryable());
        let e = from_kafka(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "publishing",
        );
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(!e.is_retryable());
        let e = from_kafka(
            KafkaError::MessageProduction(RDKafkaErrorCode::NotLeaderForPartition),
            "publishing",
        );
        assert!(e.is_retryable());
    }
}
