//! From evbus names (topics, queues, subscriptions) to JetStream stream, subject and consumer
//! names.
//!
//! evbus names may hold any character (`orders.billing.dlq` is a dead-letter queue's name);
//! JetStream stream and consumer names may not hold `.`, `*`, `>` or whitespace, and a subject
//! token may not hold `.`. Every name goes through one escaping, [`escape`], used for the
//! stream name, the subject token and the durable consumer name alike:
//!
//! | character | becomes |
//! |---|---|
//! | ASCII letters, digits, `-`, `_` | itself |
//! | `.` | `=` |
//! | any other byte of the UTF-8 name (`=`, `~`, `*`, space, `é`, ...) | `~XX` (upper-case hex) |
//!
//! The escaping is reversible ([`unescape`]), so two different names never share a stream:
//! `orders.billing.dlq` is `orders=billing=dlq`, and a name really containing `=` is `~3D`.
//!
//! | evbus | JetStream (default prefixes) |
//! |---|---|
//! | topic `orders` | stream `EVBUS_topic_orders`, subject `evbus.topic.orders` |
//! | named subscription `billing` of `orders` | durable pull consumer `billing` on that stream |
//! | anonymous subscription | ephemeral pull consumer (server-named), deleted on close |
//! | queue `orders.billing.dlq` | stream `EVBUS_queue_orders=billing=dlq`, subject `evbus.queue.orders=billing=dlq`, durable consumer `evbus-queue` |

use evbus::{Error, Result};

/// Longest stream or consumer name the adapter creates: each becomes a directory of the
/// server's file store, and file systems limit a name to 255 bytes.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// The one durable consumer of every queue stream, shared by all the queue's consumers.
pub(crate) const QUEUE_CONSUMER: &str = "evbus-queue";

/// Longest stream prefix (leaves room for the names themselves).
const MAX_PREFIX_LEN: usize = 64;

/// Escapes an evbus name into a token valid as a stream name, a consumer name and a subject
/// token (see the module documentation).
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(b as char),
            b'.' => out.push('='),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('~');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
    }
    out
}

/// Reverses [`escape`]; `None` if `token` is not the escape of any name.
pub(crate) fn unescape(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(bytes[i]),
            b'=' => out.push(b'.'),
            b'~' => {
                let hex = |b: u8| match b {
                    b'0'..=b'9' => Some(b - b'0'),
                    b'A'..=b'F' => Some(b - b'A' + 10),
                    _ => None,
                };
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                let byte = hi << 4 | lo;
                // Bytes `escape` keeps as they are are never escaped.
                if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' || byte == b'.' {
                    return None;
                }
                out.push(byte);
                i += 2;
            }
            _ => return None,
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// What a stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Topic,
    Queue,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Topic => "topic",
            Kind::Queue => "queue",
        }
    }
}

/// The JetStream names behind one topic or queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamNames {
    /// The stream name (`EVBUS_topic_orders`).
    pub(crate) stream: String,
    /// The one subject the stream binds (`evbus.topic.orders`).
    pub(crate) subject: String,
}

/// Builds names from the configured prefixes.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    stream_prefix: String,
    subject_prefix: String,
}

impl Names {
    pub(crate) fn new(stream_prefix: &str, subject_prefix: &str) -> Self {
        Names {
            stream_prefix: stream_prefix.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
        }
    }

    /// The names behind topic or queue `name`, or `InvalidConfig` if `name` is empty or its
    /// stream name would be too long.
    pub(crate) fn stream(&self, kind: Kind, name: &str) -> Result<StreamNames> {
        if name.is_empty() {
            return Err(Error::invalid_config(format!(
                "a {} name cannot be empty",
                kind.as_str()
            )));
        }
        let token = escape(name);
        let stream = format!("{}_{}_{token}", self.stream_prefix, kind.as_str());
        if stream.len() > MAX_NAME_LEN {
            return Err(Error::invalid_config(format!(
                "{} name `{name}` is too long for NATS: its stream name `{stream}` has {} bytes, \
                 at most {MAX_NAME_LEN} are allowed; use a shorter name",
                kind.as_str(),
                stream.len()
            )));
        }
        let subject = format!("{}.{}.{token}", self.subject_prefix, kind.as_str());
        Ok(StreamNames { stream, subject })
    }
}

/// The durable consumer name of named subscription `name`.
pub(crate) fn consumer(name: &str) -> Result<String> {
    let token = escape(name);
    if token.len() > MAX_NAME_LEN {
        return Err(Error::invalid_config(format!(
            "subscription name `{name}` is too long for NATS: its consumer name has {} bytes, at \
             most {MAX_NAME_LEN} are allowed; use a shorter name",
            token.len()
        )));
    }
    Ok(token)
}

/// Checks that a stream prefix leaves room for names.
pub(crate) fn check_prefix_room(stream_prefix: &str) -> Result<()> {
    if stream_prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::invalid_config(format!(
            "stream_prefix `{stream_prefix}` is longer than {MAX_PREFIX_LEN} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_stream_name(name: &str) -> bool {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\'))
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(escape("orders"), "orders");
        assert_eq!(escape("order-events_v2"), "order-events_v2");
        assert_eq!(escape("orders.billing.dlq"), "orders=billing=dlq");
    }

    #[test]
    fn every_other_byte_is_hex_escaped() {
        assert_eq!(escape("a b"), "a~20b");
        assert_eq!(escape("a*>"), "a~2A~3E");
        assert_eq!(escape("x=y~z"), "x~3Dy~7Ez");
        assert_eq!(escape("é"), "~C3~A9");
        assert_eq!(escape("a/b\\c"), "a~2Fb~5Cc");
    }

    #[test]
    fn escaping_is_reversible_and_yields_valid_names() {
        for name in [
            "orders",
            "orders.billing.dlq",
            "orders._anonymous.dlq",
            ".leading.and.trailing.",
            "a..b",
            "with space\tand\nnewline",
            "wild.*.>",
            "x=y~z",
            "~3D",
            "Zoë 日本 🎉",
            "_",
        ] {
            let token = escape(name);
            assert!(valid_stream_name(&token), "{name:?} -> {token:?}");
            assert_eq!(unescape(&token).as_deref(), Some(name), "{token}");
        }
    }

    #[test]
    fn different_names_never_share_a_token() {
        let names = ["a.b", "a=b", "a~2Eb", "a~3Db", "a_b", "a-b", "a b", "A.b"];
        let tokens: std::collections::HashSet<String> = names.iter().map(|n| escape(n)).collect();
        assert_eq!(tokens.len(), names.len(), "{tokens:?}");
    }

    #[test]
    fn unescape_rejects_what_escape_never_produces() {
        for token in ["a.b", "a~2", "a~2e", "a~41", "a~2E", "a b", "a~ZZ"] {
            assert_eq!(unescape(token), None, "{token}");
        }
    }

    #[test]
    fn topics_and_queues_get_distinct_streams_and_subjects() {
        let names = Names::new("EVBUS", "evbus");
        let topic = names.stream(Kind::Topic, "orders").unwrap();
        assert_eq!(topic.stream, "EVBUS_topic_orders");
        assert_eq!(topic.subject, "evbus.topic.orders");
        let queue = names.stream(Kind::Queue, "orders").unwrap();
        assert_eq!(queue.stream, "EVBUS_queue_orders");
        assert_eq!(queue.subject, "evbus.queue.orders");
        let dlq = names.stream(Kind::Queue, "orders.billing.dlq").unwrap();
        assert_eq!(dlq.stream, "EVBUS_queue_orders=billing=dlq");
        assert_eq!(dlq.subject, "evbus.queue.orders=billing=dlq");
    }

    #[test]
    fn empty_and_overlong_names_are_refused() {
        let names = Names::new("EVBUS", "evbus");
        let err = names.stream(Kind::Topic, "").unwrap_err();
        assert_eq!(err.kind(), evbus::ErrorKind::InvalidConfig);
        let long = "x".repeat(250);
        let err = names.stream(Kind::Queue, &long).unwrap_err();
        assert!(err.message().contains("too long"), "{err}");
        assert!(consumer(&"é".repeat(100)).is_err());
        assert_eq!(consumer("billing").unwrap(), "billing");
    }
}
