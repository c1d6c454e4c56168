//! What the SQL transport declares.

use evbus::Capabilities;

use crate::config::SqlConfig;

/// Replay of retained events (`StartPosition::Earliest`), per-key order for a single
/// consumer (rows are claimed in publish order), persistence (committed rows survive a
/// restart), the configured payload limit; no publish deduplication (an event id published
/// twice is stored twice), no limit on competing consumers.
pub(crate) fn capabilities(config: &SqlConfig) -> Capabilities {
    Capabilities {
        replay: true,
        per_key_order: true,
        persistent: true,
        publish_dedup: false,
        max_payload_bytes: Some(config.max_payload_bytes),
        max_competing_consumers: None,
    }
}
