//! Kafka names for evbus destinations and consumer groups.
//!
//! - An evbus topic or queue `orders` is the Kafka topic `orders` (topics and queues share
//!   Kafka's topic namespace), so stock Kafka tools see the names applications use.
//! - A named subscription `billing` of topic `orders` is the consumer group
//!   `evbus.sub.orders.billing`; every consumer of a queue `jobs` joins `evbus.queue.jobs`;
//!   an anonymous subscription gets a group of its own,
//!   `evbus.anon.<topic>.<uuid>`.

use evbus::{Error, Result};

/// Kafka's limit on topic name length.
const MAX_TOPIC_NAME: usize = 249;

/// Checks that `name` is a legal Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or
/// `..`.
pub(crate) fn check_topic_name(name: &str) -> Result<()> {
    let legal = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if legal {
        Ok(())
    } else {
        Err(Error::invalid_config(format!(
            "`{name}` is not a valid Kafka topic name: use 1 to {MAX_TOPIC_NAME} ASCII letters, \
             digits, `.`, `_` or `-`"
        )))
    }
}

/// The consumer group of the named subscription `subscription` of `topic`.
pub(crate) fn subscription_group(topic: &str, subscription: &str) -> String {
    format!("evbus.sub.{topic}.{subscription}")
}

/// The consumer group every consumer of `queue` joins.
pub(crate) fn queue_group(queue: &str) -> String {
    format!("evbus.queue.{queue}")
}

/// A fresh consumer group for an anonymous subscription of `topic`.
pub(crate) fn anonymous_group(topic: &str) -> String {
    format!("evbus.anon.{topic}.{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_kafka_names_pass_and_others_are_invalid_config() {
        assert!(check_topic_name("orders.billing.dlq").is_ok());
        assert!(check_topic_name("kafka-abc_1").is_ok());
        for bad in ["", ".", "..", "a/b", "ä", &"x".repeat(250)] {
            assert_eq!(
                check_topic_name(bad).unwrap_err().kind(),
                evbus::ErrorKind::InvalidConfig
            );
        }
    }

    #[test]
    fn groups_name_their_destination() {
        assert_eq!(
            subscription_group("orders", "billing"),
            "evbus.sub.orders.billing"
        );
        assert_eq!(queue_group("jobs"), "evbus.queue.jobs");
        assert!(anonymous_group("orders").starts_with("evbus.anon.orders."));
        assert_ne!(anonymous_group("t"), anonymous_group("t"));
    }
}
