//! Key naming. Every key of one topic or queue carries the name as its cluster hash tag
//! (`{name}`), so a topic's stream and its bookkeeping always live in one hash slot: the
//! adapter's Lua scripts touch several of them atomically, which Redis Cluster allows only
//! within one slot.

use evbus::Result;

/// The consumer group every consumer of a queue joins.
pub(crate) const QUEUE_GROUP: &str = "evbus";

/// Prefix of the consumer groups behind anonymous subscriptions:
/// `evbus.anonymous.<created-unix-ms>.<random>`.
pub(crate) const ANONYMOUS_GROUP_PREFIX: &str = "evbus.anonymous.";

/// Builds the keys of topics and queues under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

/// The keys of one destination (a topic or a queue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamKeys {
    /// The stream holding the entries, e.g. `evbus:topic:{orders}`.
    pub(crate) stream: String,
    /// A sorted set of delayed redeliveries (`<entry id> <group>` scored by due time in
    /// Unix milliseconds), e.g. `evbus:topic:{orders}:delayed`.
    pub(crate) delayed: String,
    /// The mark the destination's last deletion left, for a day (see
    /// [`DELETE`](crate::scripts::DELETE)), e.g. `evbus:topic:{orders}:deleted`.
    pub(crate) deleted: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub(crate) fn topic(&self, name: &str) -> StreamKeys {
        self.keys("topic", name)
    }

    pub(crate) fn queue(&self, name: &str) -> StreamKeys {
        self.keys("queue", name)
    }

    fn keys(&self, kind: &str, name: &str) -> StreamKeys {
        let stream = format!("{}{kind}:{{{name}}}", self.prefix);
        StreamKeys {
            delayed: format!("{stream}:delayed"),
            deleted: format!("{stream}:deleted"),
            stream,
        }
    }
}

/// Checks a topic, queue or subscription name: the rule of every transport
/// ([`evbus::raw::check_name`]), so a name valid on one transport is valid on every one.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    evbus::raw::check_name(what, name)
}

/// Checks the name of a topic or queue, whose keys carry it as their hash tag: on a cluster
/// (`cluster`), also that it does not start with `}`. Redis takes a key's tag from its first
/// `{` to the next `}`, so `evbus:topic:{}x}` has an empty tag and is hashed whole, and its
/// `:delayed` key lands in another slot: every script touching both failed with CROSSSLOT,
/// and nothing published to it was ever delivered (outside review). A single server has no
/// slots, and such names keep working there.
pub(crate) fn check_destination(what: &str, name: &str, cluster: bool) -> Result<()> {
    check_name(what, name)?;
    if cluster && name.starts_with('}') {
        return Err(evbus::Error::invalid_config(format!(
            "{what} name `{name}` starts with `}}`: on a Redis Cluster its keys could not share \
             a hash slot (the name is their hash tag); choose a name that does not"
        )));
    }
    Ok(())
}

/// The cluster hash slot of a key (CRC16/XMODEM of the hash tag, modulo 16384), as Redis
/// Cluster computes it. Used by tests to prove a destination's keys share a slot.
#[cfg(test)]
pub(crate) fn hash_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let data = tagged.unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_kind_and_tag_the_name() {
        let keys = Keys::new("evbus:");
        let topic = keys.topic("orders");
        assert_eq!(topic.stream, "evbus:topic:{orders}");
        assert_eq!(topic.delayed, "evbus:topic:{orders}:delayed");
        assert_eq!(keys.queue("emails").stream, "evbus:queue:{emails}");
    }

    #[test]
    fn topics_and_queues_of_one_name_are_different_streams() {
        let keys = Keys::new("evbus:");
        assert_ne!(keys.topic("x").stream, keys.queue("x").stream);
    }

    #[test]
    fn the_prefix_is_configurable() {
        assert_eq!(Keys::new("shop:").topic("t").stream, "shop:topic:{t}");
        assert_eq!(Keys::new("").queue("q").stream, "queue:{q}");
    }

    #[test]
    fn one_destinations_keys_share_a_cluster_slot() {
        let keys = Keys::new("evbus:");
        for name in ["orders", "a.b.dlq", "ünï cødé", "x}:delayed", "{weird}"] {
            let k = keys.topic(name);
            assert_eq!(hash_slot(&k.stream), hash_slot(&k.delayed), "{name}");
        }
        // A leading `}` leaves the tag empty: the keys are hashed whole, apart (so
        // `check_destination` refuses such names on a cluster).
        let split = keys.topic("}x");
        assert_ne!(hash_slot(&split.stream), hash_slot(&split.delayed));
        // Known slot values (redis-cli CLUSTER KEYSLOT): the tag decides.
        assert_eq!(hash_slot("{orders}"), hash_slot("evbus:topic:{orders}"));
        assert_eq!(hash_slot("foo"), 12182);
    }

    #[test]
    fn distinct_names_never_share_a_key() {
        let keys = Keys::new("evbus:");
        let a = keys.topic("a}:delayed");
        let b = keys.topic("a");
        assert_ne!(a.stream, b.delayed);
        assert_ne!(a.stream, b.stream);
    }

    #[test]
    fn names_follow_the_memory_transport_rule() {
        check_destination("topic", "}x", false).unwrap();
        let refused = check_destination("queue", "}x", true).unwrap_err();
        assert_eq!(refused.kind(), evbus::ErrorKind::InvalidConfig);
        check_destination("topic", "x}", true).unwrap();
        check_name("topic", "orders").unwrap();
        check_name("topic", "ünï cødé").unwrap();
        assert!(check_name("topic", "").is_err());
        assert!(check_name("topic", "a\nb").is_err());
        assert!(check_name("topic", &"x".repeat(250)).is_err());
    }
}
