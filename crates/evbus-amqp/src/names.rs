//! Naming: how evbus topics, subscriptions and queues become RabbitMQ exchanges and queues.
//!
//! | evbus | RabbitMQ | example (prefix `evbus.`) |
//! |---|---|---|
//! | topic `orders` | durable fanout exchange `<prefix><topic>` | exchange `evbus.orders` |
//! | named subscription `billing` | durable quorum queue `<prefix><topic>_s_<subscription>` | queue `evbus.orders_s_billing` |
//! | anonymous subscription | exclusive auto-delete queue `<prefix><topic>_a_<uuid>` | queue `evbus.orders_a_0193...` |
//! | queue `jobs` | durable quorum queue `<prefix><queue>` | queue `evbus.jobs` |
//! | topic `orders` deleted | durable classic queue `<exchange>_deleted` (expires) | queue `evbus.orders_deleted` |
//! | queue `jobs` deleted | durable classic queue `<queue>_deleted_queue` (expires) | queue `evbus.jobs_deleted_queue` |
//!
//! Exchanges and queues are separate namespaces in AMQP, so a topic and a queue of the same
//! name never meet. Names keep ASCII letters, digits, `.` and `-`; every other byte (UTF-8)
//! is written `_XX` (two uppercase hex digits), so `_` followed by a lowercase letter never
//! comes from a name and `_s_` / `_a_` separate unambiguously: no two evbus names share a
//! queue. (RabbitMQ 3.10 cannot recover a quorum queue whose name holds `/` after a crash,
//! one more reason to keep names plain.) AMQP names are at most 255 bytes: a longer name
//! keeps its first 200 bytes and ends with `_h_` and a 16-digit hash of the whole name.

use evbus::Result;

/// Longest AMQP exchange or queue name (a short string).
const MAX_NAME: usize = 255;
/// Where [`fit`] cuts a longer name.
const CUT: usize = 200;

/// Builds exchange and queue names under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
        }
    }

    /// The exchange behind topic `topic`.
    pub(crate) fn exchange(&self, topic: &str) -> String {
        fit(format!("{}{}", self.prefix, escape(topic)))
    }

    /// The quorum queue behind queue `queue`.
    pub(crate) fn queue(&self, queue: &str) -> String {
        fit(format!("{}{}", self.prefix, escape(queue)))
    }

    /// The quorum queue behind named subscription `subscription` of `topic`.
    pub(crate) fn subscription(&self, topic: &str, subscription: &str) -> String {
        fit(format!(
            "{}{}_s_{}",
            self.prefix,
            escape(topic),
            escape(subscription)
        ))
    }

    /// A new exclusive queue for an anonymous subscription of `topic`.
    pub(crate) fn anonymous(&self, topic: &str) -> String {
        fit(format!(
            "{}{}_a_{}",
            self.prefix,
            escape(topic),
            uuid::Uuid::now_v7().simple()
        ))
    }
}

/// The tombstone of the topic whose exchange is `exchange`: the durable classic queue
/// `<exchange>_deleted`, dropped by RabbitMQ after `AmqpConfig::tombstone_ttl` unused (`_`
/// and a lowercase letter never come from a name, so no queue of evbus's has it). Each
/// `delete_topic` adds a message to it before deleting anything; a consumer that finds more
/// than when it started ends instead of declaring again what it reads (see
/// `consumer::look_up`).
pub(crate) fn topic_tombstone(exchange: &str) -> String {
    fit(format!("{exchange}_deleted"))
}

/// The tombstone of the queue `queue` (its RabbitMQ name), counting `delete_queue`s: the
/// durable classic queue `<queue>_deleted_queue` (a queue and a topic of one name have one
/// RabbitMQ name, in the two namespaces; their tombstones are both queues and must differ).
pub(crate) fn queue_tombstone(queue: &str) -> String {
    fit(format!("{queue}_deleted_queue"))
}

/// Whether `queue` can be the queue of a named subscription of the topic whose exchange is
/// `exchange` (both built by [`Names`]): it starts with the exchange's name and `_s_`, or,
/// where [`fit`] cut the names, with the first bytes the two share. What a topic's directory
/// names is checked with it: a record written there by someone else must not make evbus bind
/// (or delete) a queue of another topic.
pub(crate) fn is_subscription_of(queue: &str, exchange: &str) -> bool {
    if exchange.len() + 3 <= CUT {
        return queue
            .strip_prefix(exchange)
            .is_some_and(|rest| rest.starts_with("_s_"));
    }
    let mut cut = CUT.min(exchange.len());
    while !exchange.is_char_boundary(cut) {
        cut -= 1;
    }
    queue.len() > cut && queue.starts_with(&exchange[..cut])
}

/// Checks a topic, queue or subscription name: the rule of every transport
/// ([`evbus::raw::check_name`]), so a name valid on one transport is valid on every one.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    evbus::raw::check_name(what, name)
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// Whether `prefix` uses only the characters names keep (letters, digits, `.`, `-`, `_`).
pub(crate) fn is_plain(prefix: &str) -> bool {
    prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// `name` if it fits an AMQP short string, else its first 200 bytes, `~` and a hash.
fn fit(name: String) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut cut = CUT;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_h_{:016x}", &name[..cut], fnv1a(name.as_bytes()))
}

/// FNV-1a, 64 bits: stable across builds and platforms (names must not change).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_mapping() {
        let names = Names::new("evbus.");
        assert_eq!(names.exchange("orders"), "evbus.orders");
        assert_eq!(names.queue("jobs.high"), "evbus.jobs.high");
        assert_eq!(
            names.subscription("orders", "billing"),
            "evbus.orders_s_billing"
        );
        let anonymous = names.anonymous("orders");
        assert!(anonymous.starts_with("evbus.orders_a_"), "{anonymous}");
        assert_ne!(anonymous, names.anonymous("orders"));
    }

    #[test]
    fn dotted_slashed_and_underscored_names_never_collide() {
        let names = Names::new("evbus.");
        assert_ne!(
            names.subscription("a.b", "c"),
            names.subscription("a", "b.c")
        );
        assert_eq!(names.queue("orders/billing"), "evbus.orders_2Fbilling");
        assert_eq!(names.queue("a_s_b"), "evbus.a_5Fs_5Fb");
        assert_ne!(names.queue("a_s_b"), names.subscription("a", "b"));
        assert_ne!(
            names.subscription("a_s_b", "c"),
            names.subscription("a", "b_s_c")
        );
        assert_eq!(names.queue("zoë"), "evbus.zo_C3_AB");
        assert!(is_plain("evbus.") && is_plain("shop_1-x") && !is_plain("a/b"));
    }

    #[test]
    fn long_names_are_shortened_with_a_stable_hash() {
        let names = Names::new("evbus.");
        let long = "é".repeat(200);
        let a = names.subscription(&long, "s1");
        let b = names.subscription(&long, "s2");
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{}", a.len());
        assert_ne!(a, b);
        assert_eq!(a, names.subscription(&long, "s1"));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn tombstones_are_queues_evbus_names_never_give_and_differ_by_kind() {
        let names = Names::new("evbus.");
        let orders = names.exchange("orders");
        assert_eq!(topic_tombstone(&orders), "evbus.orders_deleted");
        assert_eq!(
            queue_tombstone(&names.queue("orders")),
            "evbus.orders_deleted_queue"
        );
        // A topic named like a tombstone is escaped: it never meets one.
        assert_ne!(names.exchange("orders_deleted"), topic_tombstone(&orders));
        assert_ne!(
            names.exchange("orders_deleted_queue"),
            queue_tombstone(&names.queue("orders"))
        );
        // A topic and a queue of one name have one RabbitMQ name, and two tombstones.
        assert_eq!(orders, names.queue("orders"));
        assert_ne!(topic_tombstone(&orders), queue_tombstone(&orders));
        // Names at the limit are cut, as every name is, and stay apart.
        for topic in ["t".repeat(249), "é".repeat(200)] {
            let exchange = names.exchange(&topic);
            let (t, q) = (topic_tombstone(&exchange), queue_tombstone(&exchange));
            assert!(t.len() <= MAX_NAME && q.len() <= MAX_NAME, "{t} {q}");
            assert_ne!(t, q);
            assert_ne!(t, exchange);
            assert_eq!(t, topic_tombstone(&names.exchange(&topic)));
        }
    }

    #[test]
    fn only_a_topics_own_subscription_queues_belong_to_it() {
        let names = Names::new("evbus.");
        let orders = names.exchange("orders");
        assert!(is_subscription_of(
            &names.subscription("orders", "billing"),
            &orders
        ));
        assert!(is_subscription_of(
            &names.subscription("orders", &"b".repeat(249)),
            &orders
        ));
        // A topic whose name extends this one, a queue, another topic's exchange.
        for other in [
            names.subscription("orders.eu", "billing"),
            names.subscription("orders_s_x", "billing"),
            names.queue("orders"),
            names.queue("jobs"),
            orders.clone(),
            names.anonymous("orders"),
        ] {
            assert!(!is_subscription_of(&other, &orders), "{other}");
        }
        // Names long enough to be cut: the shared first bytes decide.
        for topic in ["t".repeat(196), "t".repeat(230), "t".repeat(249)] {
            let exchange = names.exchange(&topic);
            for subscription in ["s", &"s".repeat(249)] {
                let queue = names.subscription(&topic, subscription);
                assert!(is_subscription_of(&queue, &exchange), "{queue}");
            }
            assert!(!is_subscription_of(&names.queue("jobs"), &exchange));
            assert!(!is_subscription_of(
                &names.subscription("orders", "s"),
                &exchange
            ));
        }
    }

    #[test]
    fn names_must_be_printable_and_short() {
        check_name("topic", "orders.created").unwrap();
        assert!(check_name("topic", "").is_err());
        assert!(check_name("queue", "a\nb").is_err());
        assert!(check_name("queue", &"x".repeat(250)).is_err());
    }
}
