//! What the Redis transport declares beyond the common contract.

use evbus::Capabilities;

use crate::config::RedisConfig;

/// The capabilities of a transport with `config` on a server that keeps an append-only file
/// (`persistent`).
///
/// - `replay`: a stream keeps its history (up to the retention limit), so a subscription can
///   start from the earliest entry.
/// - `per_key_order`: a stream is totally ordered; one consumer receives its entries in
///   publish order.
/// - `persistent`: only when the server has AOF enabled (`INFO persistence`, `aof_enabled:1`,
///   read at connect time). RDB snapshots alone lose what was written since the last
///   snapshot, so they do not count. With `appendfsync everysec` (Redis' default) up to a
///   second of acknowledged writes can still be lost on a crash; `appendfsync always` loses
///   none.
/// - `max_payload_bytes`: [`RedisConfig::max_payload_bytes`].
pub(crate) fn capabilities(config: &RedisConfig, persistent: bool) -> Capabilities {
    Capabilities {
        replay: true,
        per_key_order: true,
        persistent,
        max_payload_bytes: Some(config.max_payload_bytes),
        ..Capabilities::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_and_order_always_persistence_only_with_aof() {
        let config = RedisConfig::default();
        let caps = capabilities(&config, false);
        assert!(caps.replay && caps.per_key_order && !caps.persistent);
        assert!(!caps.publish_dedup);
        assert_eq!(caps.max_payload_bytes, Some(16 * 1024 * 1024));
        assert_eq!(caps.max_competing_consumers, None);
        assert!(capabilities(&config, true).persistent);
    }
}
