//! What a transport can do, declared by exception.
//!
//! Behaviour that evbus can provide everywhere (attempt counting, dead-lettering, nack with
//! delay, in-flight limits) is *not* a capability: core or the adapter emulates it, so it is the
//! same on every transport. Capabilities say only what truly differs between brokers.
//!
//! ```
//! use evbus::Capabilities;
//!
//! let caps = Capabilities { replay: true, ..Capabilities::default() };
//! assert!(caps.per_key_order); // declared by exception: defaults are the common case
//! ```

use std::fmt;

/// Capabilities a transport declares. Start from [`Capabilities::default`] and change what
/// differs.
///
/// Deliberately not `#[non_exhaustive]`: adapters in other crates declare theirs with struct
/// update syntax (`Capabilities { replay: true, ..Default::default() }`); a new field always
/// comes with a default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// A subscription can start from the earliest retained event, replaying history.
    pub replay: bool,
    /// Events sharing a partition key reach a single consumer in publish order.
    pub per_key_order: bool,
    /// Accepted events survive a broker restart (the broker keeps them on disk).
    pub persistent: bool,
    /// Publishing the same event id twice delivers it once.
    pub publish_dedup: bool,
    /// Largest event the transport accepts, if limited, as [`Event::encoded_len`] counts it:
    /// the data plus every attribute value (what a broker carries). Larger ones fail with
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge).
    /// [`Transport::check_size`](crate::Transport::check_size) tells whether a publish would
    /// refuse an event for its size (some transports also measure what they write: Redis in
    /// structured mode its JSON, NATS its headers, RabbitMQ its header frame, Kafka its
    /// record).
    ///
    /// [`Event::encoded_len`]: crate::Event::encoded_len
    pub max_payload_bytes: Option<usize>,
    /// Most consumers that can compete on one subscription or queue and all receive events
    /// (Kafka: the partition count), if limited.
    pub max_competing_consumers: Option<usize>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            replay: false,
            per_key_order: true,
            persistent: false,
            publish_dedup: false,
            max_payload_bytes: None,
            max_competing_consumers: None,
        }
    }
}

impl Capabilities {
    /// Whether these capabilities include `cap`.
    pub fn has(&self, cap: Capability) -> bool {
        match cap {
            Capability::Replay => self.replay,
            Capability::PerKeyOrder => self.per_key_order,
            Capability::Persistent => self.persistent,
            Capability::PublishDedup => self.publish_dedup,
            Capability::CompetingConsumers(n) => {
                self.max_competing_consumers.is_none_or(|m| m >= n)
            }
            Capability::Payload(n) => self.max_payload_bytes.is_none_or(|m| m >= n),
        }
    }

    /// Every capability as a `(name, value)` row, for capability matrices.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let limit = |v: Option<usize>| v.map_or("unlimited".to_owned(), |n| n.to_string());
        vec![
            ("replay", self.replay.to_string()),
            ("per-key-order", self.per_key_order.to_string()),
            ("persistent", self.persistent.to_string()),
            ("publish-dedup", self.publish_dedup.to_string()),
            ("max-payload-bytes", limit(self.max_payload_bytes)),
            (
                "max-competing-consumers",
                limit(self.max_competing_consumers),
            ),
        ]
    }
}

/// One capability a behaviour (a conformance case, a Bus feature) may require.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capability {
    /// See [`Capabilities::replay`].
    Replay,
    /// See [`Capabilities::per_key_order`].
    PerKeyOrder,
    /// See [`Capabilities::persistent`].
    Persistent,
    /// See [`Capabilities::publish_dedup`].
    PublishDedup,
    /// At least this many competing consumers (see [`Capabilities::max_competing_consumers`]).
    CompetingConsumers(usize),
    /// Payloads of at least this many bytes (see [`Capabilities::max_payload_bytes`]).
    Payload(usize),
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capability::Replay => f.write_str("replay"),
            Capability::PerKeyOrder => f.write_str("per-key-order"),
            Capability::Persistent => f.write_str("persistent"),
            Capability::PublishDedup => f.write_str("publish-dedup"),
            Capability::CompetingConsumers(n) => write!(f, "competing-consumers>={n}"),
            Capability::Payload(n) => write!(f, "max-payload-bytes>={n}"),
        }
    }
}
