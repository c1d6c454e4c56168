//! What the NATS transport declares beyond the common contract.

use evbus::Capabilities;

use crate::config::{NatsConfig, Retention, Storage};

/// The capabilities of a transport with `config`, whose largest accepted event is
/// `max_payload_bytes` (see [`NatsConfig::max_payload_bytes`]).
///
/// - `replay`: with [`Retention::Limits`] a topic stream keeps its history (up to
///   [`NatsConfig::max_age`]), so a subscription can start from the earliest event. With
///   [`Retention::Interest`] a message is gone once the subscriptions that existed acked it.
/// - `per_key_order`: a stream is totally ordered and a pull consumer receives it in order.
/// - `persistent`: with [`Storage::File`]: the server keeps every stored (PubAck'ed) message
///   on disk. JetStream writes without `fsync` by default (`sync_interval` 2 min): a server
///   *process* crash loses nothing, a machine crash can lose the last writes unless the
///   server runs with `sync_interval: always`.
/// - `publish_dedup`: the event id is a topic publish's `Nats-Msg-Id`; the server drops a
///   second publish of the same id within [`NatsConfig::duplicate_window`]. Queue sends are
///   not deduplicated (dead letters and redrives send an id again on purpose).
/// - `max_payload_bytes`: the server's `max_payload` minus a header allowance, or the
///   configured limit.
pub(crate) fn capabilities(config: &NatsConfig, max_payload_bytes: usize) -> Capabilities {
    Capabilities {
        replay: config.retention == Retention::Limits,
        per_key_order: true,
        persistent: config.storage == Storage::File,
        publish_dedup: true,
        max_payload_bytes: Some(max_payload_bytes),
        ..Capabilities::default()
    }
}

/// The largest event a transport accepts: the configured limit, or the server's
/// `max_payload` minus [`HEADER_ALLOWANCE`](crate::config::HEADER_ALLOWANCE) (attributes
/// travel as headers, which count against the same limit).
pub(crate) fn max_payload_bytes(config: &NatsConfig, server_max_payload: usize) -> usize {
    let derived = server_max_payload
        .saturating_sub(crate::config::HEADER_ALLOWANCE)
        .max(1);
    match config.max_payload_bytes {
        Some(limit) => limit.min(server_max_payload),
        None => derived,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_storage_with_limits_retention_replays_and_persists() {
        let config = NatsConfig::default();
        let caps = capabilities(&config, 1000);
        assert!(caps.replay && caps.per_key_order && caps.persistent && caps.publish_dedup);
        assert_eq!(caps.max_payload_bytes, Some(1000));
        assert_eq!(caps.max_competing_consumers, None);
    }

    #[test]
    fn memory_storage_is_not_persistent_and_interest_retention_does_not_replay() {
        let config = NatsConfig {
            storage: Storage::Memory,
            retention: Retention::Interest,
            ..NatsConfig::default()
        };
        let caps = capabilities(&config, 1000);
        assert!(!caps.persistent && !caps.replay);
    }

    #[test]
    fn the_payload_limit_follows_the_server_unless_configured_lower() {
        let mut config = NatsConfig::default();
        assert_eq!(max_payload_bytes(&config, 1 << 20), (1 << 20) - 4096);
        config.max_payload_bytes = Some(1000);
        assert_eq!(max_payload_bytes(&config, 1 << 20), 1000);
        config.max_payload_bytes = Some(usize::MAX);
        assert_eq!(max_payload_bytes(&config, 1 << 20), 1 << 20);
    }
}
