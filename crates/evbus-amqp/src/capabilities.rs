//! What the AMQP transport declares beyond the common contract.

use evbus::Capabilities;

use crate::config::AmqpConfig;

/// The capabilities of a transport with `config`.
///
/// - `replay`: no. A queue hands each message out once; nothing is kept after it is acked, so
///   a new subscription cannot start from history ([`StartPosition::Earliest`] starts where
///   `Latest` does). RabbitMQ streams would allow it; evbus-amqp does not use them.
/// - `per_key_order`: yes, for one consumer per subscription or queue: a queue is FIFO and
///   publishes on one channel stay in order. Competing consumers, and redeliveries after a
///   nack, interleave as on every broker.
/// - `persistent`: yes. Exchanges, subscription queues and queues are durable, messages are
///   persistent, and a publish returns `Ok` only after the confirm, which a quorum queue sends
///   once a majority of its replicas fsynced the message. Anonymous subscriptions are not
///   durable by design.
/// - `publish_dedup`: no (RabbitMQ has no deduplication without a plugin).
/// - `max_payload_bytes`: [`AmqpConfig::max_payload_bytes`].
///
/// [`StartPosition::Earliest`]: evbus::StartPosition::Earliest
pub(crate) fn capabilities(config: &AmqpConfig) -> Capabilities {
    Capabilities {
        replay: false,
        per_key_order: true,
        persistent: true,
        publish_dedup: false,
        max_payload_bytes: Some(config.max_payload_bytes),
        max_competing_consumers: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistent_ordered_without_replay_with_the_configured_limit() {
        let config = AmqpConfig {
            max_payload_bytes: 1000,
            ..AmqpConfig::default()
        };
        let caps = capabilities(&config);
        assert!(caps.persistent && caps.per_key_order);
        assert!(!caps.replay && !caps.publish_dedup);
        assert_eq!(caps.max_payload_bytes, Some(1000));
        assert_eq!(caps.max_competing_consumers, None);
    }
}
