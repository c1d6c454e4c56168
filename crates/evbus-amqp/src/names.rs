//! Naming: how evbus topics, subscriptions and queues become RabbitMQ exchanges and queues.
//!
//! | evbus | RabbitMQ | example (prefix `evbus.`) |
//! |---|---|---|
//! | topic `orders` | durable fanout exchange `<prefix><topic>` | exchange `evbus.orders` |
//! | named subscription `billing` | durable quorum queue `<prefix><topic>_s_<subscription>` | queue `evbus.orders_s_billing` |
//! | anonymous subscription | exclusive auto-delete queue `<prefix><topic>_a_<uuid>` | queue `evbus.orders_a_0193...` |
//! | queue `jobs` | durable quorum queue `<prefix><queue>` | queue `evbus.jobs` |
//!
//! Exchanges and queues are separate namespaces in AMQP, so a topic and a queue of the same
//! name never meet. Names keep ASCII letters, digits, `.` and `-`; every other byte (UTF-8)
//! is written `_XX` (two uppercase hex digits), so `_` followed by a lowercase letter never
//! comes from a name and `_s_` / `_a_` separate unambiguously: no two evbus names share a
//! queue. (RabbitMQ 3.10 cannot recover a quorum queue whose name holds `/` after a crash,
//! one more reason to keep names plain.) AMQP names are at most 255 bytes: a longer name
//! keeps its first 200 bytes and ends with `_h_` and a 16-digit hash of the whole name.

use evbus::{Error, Result};

/// Longest AMQP exchange or queue name (a short string).
const MAX_NAME: usize = 255;

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

/// Checks a topic, queue or subscription name: 1 to 249 printable characters (the rule of
/// the in-memory transport, so a name valid on one transport is valid on every one).
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 249 || name.chars().any(char::is_control) {
        return Err(Error::invalid_config(format!(
            "`{}` is not a valid {what} name: use 1 to 249 printable characters",
            name.escape_debug()
        )));
    }
    Ok(())
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
    let mut cut = 200;
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
    fn names_must_be_printable_and_short() {
        check_name("topic", "orders.created").unwrap();
        assert!(check_name("topic", "").is_err());
        assert!(check_name("queue", "a\nb").is_err());
        assert!(check_name("queue", &"x".repeat(250)).is_err());
    }
}
