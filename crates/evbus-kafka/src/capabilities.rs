//! What the Kafka transport declares beyond the common contract.

use evbus::Capabilities;

use crate::config::KafkaConfig;

/// The capabilities of a transport with `config`.
///
/// - `replay`: a topic keeps its history for its retention time, so a subscription can start
///   from the earliest retained event.
/// - `per_key_order`: the partition key is the Kafka message key, so one key's events go to
///   one partition, and one partition is read by one consumer in order.
/// - `persistent`: Kafka writes every record to its log; with `acks=all` an accepted publish
///   survives a broker restart (with tansu's memory storage, used for tests, it does not).
/// - `max_payload_bytes`: [`KafkaConfig::max_payload_bytes`].
/// - `max_competing_consumers`: [`KafkaConfig::partitions`]: a partition is read by one member
///   of a consumer group at a time, so members beyond the partition count receive nothing.
pub(crate) fn capabilities(config: &KafkaConfig) -> Capabilities {
    Capabilities {
        replay: true,
        per_key_order: true,
        persistent: true,
        publish_dedup: false,
        max_payload_bytes: Some(config.max_payload_bytes),
        max_competing_consumers: Some(usize::try_from(config.partitions).unwrap_or(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn competing_consumers_are_limited_by_the_partition_count() {
        let config = KafkaConfig {
            partitions: 7,
            ..KafkaConfig::default()
        };
        let caps = capabilities(&config);
        assert_eq!(caps.max_competing_consumers, Some(7));
        assert!(caps.replay && caps.per_key_order && !caps.publish_dedup);
        assert_eq!(caps.max_payload_bytes, Some(1024 * 1024));
    }
}
