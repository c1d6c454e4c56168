//! The adapter-facing API: what a transport (or a transport [`layer`](crate::layer)) is built
//! from, kept apart from what applications use.
//!
//! An adapter's consumer produces a stream of [`RawDelivery`]s (an event or an
//! [`Undecodable`] message, its attempt number and an [`Acker`]), and turns it into the
//! application's [`Subscription`] with one call, [`Source::into_subscription`]. That call is
//! the same for every adapter, so the rules that must not drift are written once:
//!
//! | | topic, named subscription | topic, anonymous subscription | queue |
//! |---|---|---|---|
//! | dead-letter queue | `<topic>.<subscription>.dlq` | `<topic>._anonymous.dlq` | `<queue>.dlq` |
//! | `deadletterorigin` | `<topic>/<subscription>` | `<topic>/~anonymous` | `<queue>` |
//!
//! ([`ConsumerOptions::dead_letter_queue`] overrides the dead-letter queue.) Subscription names
//! starting with `_` are reserved, so an anonymous subscription's dead-letter queue never
//! meets a named one's; a queue's differs from both unless a queue is itself named
//! `<topic>.<subscription>` or `<topic>._anonymous`, which is best avoided.
//!
//! Core then enforces, identically everywhere: the in-flight limit, settle-once, attempts and
//! dead-lettering after [`ConsumerOptions::max_attempts`], delayed-nack emulation, the
//! dead-lettering of undecodable messages (never handed out, never blocking the stream), and
//! the end of the stream when the transport closes.
//!
//! ```
//! use std::sync::Arc;
//! use evbus::raw::{Acker, RawDelivery, Source};
//! use evbus::{Event, SubscribeOptions, Transport};
//!
//! struct NoopAcker;
//! #[async_trait::async_trait]
//! impl Acker for NoopAcker {
//!     async fn ack(&self, _tag: u64) -> evbus::Result<()> { Ok(()) }
//!     async fn nack(&self, _tag: u64) -> evbus::Result<()> { Ok(()) }
//! }
//!
//! # async fn demo() -> evbus::Result<()> {
//! let source = Source::topic("orders", &SubscribeOptions::named("billing"))?;
//! assert_eq!(source.dead_letter_queue(), "orders.billing.dlq");
//! assert_eq!(source.origin(), "orders/billing");
//!
//! // Any transport's queue receives the dead letters; here the in-memory one.
//! let transport = evbus::memory::MemoryBroker::new(Default::default()).connect();
//! let dead_letter = transport.queue(source.dead_letter_queue()).await?;
//! let event = Event::builder("orderPlaced", "/shop").build()?;
//! let raw = futures::stream::iter(vec![Ok(RawDelivery::new(event, 1, Arc::new(NoopAcker), 0))]);
//! let mut subscription = source.into_subscription(raw, dead_letter, std::future::pending());
//! let delivery = subscription.next_delivery().await.unwrap()?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, Stream};

use crate::error::{Error, Result};
use crate::layer::Destination;
use crate::subscription::Subscription;
use crate::transport::{ConsumerOptions, Queue, StartPosition, SubscribeOptions};

pub use crate::delivery::{
    Acker, DEAD_LETTER_ATTEMPTS, DEAD_LETTER_DATA_DROPPED, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON,
    DEAD_LETTER_TIME, DEAD_LETTER_TRUNCATED, RawDelivery, UNDECODABLE_EVENT_TYPE, Undecodable,
    dead_letter_event,
};

pub mod hosts;
pub mod kit;
mod lifecycle;
mod read_clock;

pub use crate::transport::check_encoded_len;
pub use lifecycle::{Backoff, Gate};
pub use read_clock::ReadClock;

/// An adapter's stream of raw deliveries.
///
/// An `Err` item does not end the subscription: core hands it to the consumer
/// ([`Subscription::next_delivery`] returns it) and polls the stream again when asked; the
/// [`Bus`](crate::bus::Bus) logs a warning (`handler subscription error`) and polls again
/// after 100 ms. Yield one only for a failure that may pass (the broker unreachable for a
/// while), never on every poll for one that will not. The stream ending (`None`) ends the
/// subscription for good (a Bus handler stops): end it when what it reads is gone for good,
/// such as a deleted topic or queue.
pub type RawStream = BoxStream<'static, Result<RawDelivery>>;

/// The origin of every anonymous subscription of `topic`.
const ANONYMOUS: &str = "~anonymous";
/// The dead-letter queue segment of anonymous subscriptions.
const ANONYMOUS_DLQ: &str = "_anonymous";

/// Where a consumer reads from: a topic subscription (named or anonymous) or a queue. Names
/// its dead-letter queue and its origin the same way on every adapter (see the
/// [module docs](self)) and assembles the [`Subscription`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    kind: Kind,
    destination: Destination,
    origin: String,
    dead_letter_queue: String,
    consumer: ConsumerOptions,
    start: StartPosition,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Named(String),
    Anonymous,
    Queue,
}

impl Source {
    /// A subscription of `topic`. Fails with
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) if the subscription
    /// name is empty or starts with `_` (reserved for evbus).
    pub fn topic(topic: &str, options: &SubscribeOptions) -> Result<Source> {
        check_consumer_options(&options.consumer)?;
        let consumer = options.consumer.clone();
        let (kind, origin, default_dlq) = match options.subscription.as_deref() {
            Some(sub) => {
                check_subscription_name(sub)?;
                (
                    Kind::Named(sub.to_owned()),
                    format!("{topic}/{sub}"),
                    format!("{topic}.{sub}.dlq"),
                )
            }
            None => (
                Kind::Anonymous,
                format!("{topic}/{ANONYMOUS}"),
                format!("{topic}.{ANONYMOUS_DLQ}.dlq"),
            ),
        };
        let subscription = match &kind {
            Kind::Named(name) => name.clone(),
            _ => format!("{ANONYMOUS_DLQ}.{}", uuid::Uuid::now_v7().simple()),
        };
        Ok(Source {
            kind,
            destination: Destination::Topic {
                topic: topic.to_owned(),
                subscription: Some(subscription),
            },
            origin,
            dead_letter_queue: consumer.dead_letter_queue.clone().unwrap_or(default_dlq),
            consumer,
            start: options.start,
        })
    }

    /// A consumer of `queue`. Fails with
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) for a visibility timeout
    /// no broker keeps (see [`check_consumer_options`]).
    pub fn queue(queue: &str, options: &ConsumerOptions) -> Result<Source> {
        check_consumer_options(options)?;
        Ok(Source {
            kind: Kind::Queue,
            destination: Destination::Queue(queue.to_owned()),
            origin: queue.to_owned(),
            dead_letter_queue: options
                .dead_letter_queue
                .clone()
                .unwrap_or_else(|| format!("{queue}.dlq")),
            consumer: options.clone(),
            start: StartPosition::Latest,
        })
    }

    /// Names the source in dead-letter records and logs: `orders/billing`,
    /// `orders/~anonymous` or `jobs`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// What the consumer reads: the queue, or the topic with the subscription. An anonymous
    /// subscription has a name too, made for this consumer alone: `_anonymous.<32 hex digits>`
    /// (names starting with `_` are reserved, so it never meets a named one). A broker can
    /// then treat it as a named subscription and delete it when the consumer goes away (see
    /// [`kit::Broker::release`]). [`subscription`](Self::subscription) stays `None` for it.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The queue receiving this consumer's dead letters.
    pub fn dead_letter_queue(&self) -> &str {
        &self.dead_letter_queue
    }

    /// Where a subscription that is new starts ([`SubscribeOptions::start`]): at the events
    /// published from now on, or at the earliest event the broker retains (only for a broker
    /// that declares [`Capabilities::replay`](crate::Capabilities::replay)). A named
    /// subscription that exists already resumes where it stopped, whatever this says. Always
    /// [`StartPosition::Latest`] for a queue consumer.
    pub fn start(&self) -> StartPosition {
        self.start
    }

    /// The consumer settings.
    pub fn consumer(&self) -> &ConsumerOptions {
        &self.consumer
    }

    /// The named subscription; `None` for a queue or an anonymous subscription.
    pub fn subscription(&self) -> Option<&str> {
        match &self.kind {
            Kind::Named(name) => Some(name),
            Kind::Anonymous | Kind::Queue => None,
        }
    }

    /// Whether this is an anonymous topic subscription.
    pub fn is_anonymous(&self) -> bool {
        self.kind == Kind::Anonymous
    }

    /// Whether this is a queue consumer.
    pub fn is_queue(&self) -> bool {
        self.kind == Kind::Queue
    }

    /// Wraps the adapter's raw stream into the application's [`Subscription`]: in-flight
    /// limit, max attempts, dead-lettering (to `dead_letter`, normally
    /// `transport.queue(source.dead_letter_queue())`), undecodable messages moved aside, and
    /// the stream ends as soon as `closed` completes (pass the transport's close signal, such
    /// as `token.clone().cancelled_owned()` of a `tokio_util` `CancellationToken`; without it
    /// a consumer holding every in-flight slot would wait forever after close).
    pub fn into_subscription<S>(
        self,
        raw: S,
        dead_letter: Arc<dyn Queue>,
        closed: impl Future<Output = ()> + Send + 'static,
    ) -> Subscription
    where
        S: Stream<Item = Result<RawDelivery>> + Send + 'static,
    {
        Subscription::new(raw, &self.consumer, dead_letter, self.origin).until(closed)
    }
}

/// The longest topic or queue name every transport accepts, in bytes (Kafka's topic limit
/// less room for a suffix such as `.dlq`).
pub const MAX_DESTINATION_NAME: usize = 249;

/// Checks a topic or queue name: 1 to [`MAX_DESTINATION_NAME`] bytes, no control character.
/// The in-memory transport and every adapter on the kit ([`kit::Connection`]) refuse other
/// names with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) before a broker
/// sees them. Any other character can occur (`.`, `/`, `..`, non-ASCII): an adapter that
/// turns names into paths, keys or identifiers escapes them itself.
pub fn check_destination_name(name: &str) -> Result<()> {
    check_name("topic or queue", name)
}

/// [`check_destination_name`]'s rule for a name of `what` (`topic`, `queue`,
/// `subscription`, ...), named so in the error: what a full-control adapter uses to refuse
/// the names every transport refuses.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_DESTINATION_NAME || name.chars().any(char::is_control) {
        return Err(Error::invalid_config(format!(
            "`{}` is not a valid {what} name: use 1 to {MAX_DESTINATION_NAME} bytes of \
             printable characters",
            crate::envelope::quoted(&name.escape_debug().to_string())
        )));
    }
    Ok(())
}

/// The shortest visibility timeout a consumer takes: a millisecond, the unit brokers count
/// it in.
pub const SHORTEST_VISIBILITY: Duration = Duration::from_millis(1);

/// The longest visibility timeout a consumer takes: 100 years ("never" in practice; what a
/// broker keeps in a 64-bit count of nanoseconds, and what a clock reading plus it still
/// holds).
pub const LONGEST_VISIBILITY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Checks a consumer's settings every transport applies alike: a visibility timeout
/// between [`SHORTEST_VISIBILITY`] and [`LONGEST_VISIBILITY`]. A zero timeout made every
/// delivery due back at once (on Redis nothing was ever delivered), and `Duration::MAX`
/// overflowed deadlines (on Redis the consumer delivered nothing and left its group; NATS
/// refused it; SQL capped it; outside review): out of range is a configuration error, before
/// a broker is asked. [`ConsumerOptions::visibility_timeout`] caps `Duration::MAX` at the
/// longest, so "never" works everywhere. [`Source::topic`] and [`Source::queue`] call it.
pub fn check_consumer_options(options: &ConsumerOptions) -> Result<()> {
    let timeout = options.visibility_timeout;
    if !(SHORTEST_VISIBILITY..=LONGEST_VISIBILITY).contains(&timeout) {
        return Err(Error::invalid_config(format!(
            "visibility_timeout must be between 1 ms and 100 years, got {timeout:?} \
             (`ConsumerOptions::visibility_timeout` takes `Duration::MAX` as 100 years)"
        )));
    }
    Ok(())
}

/// Checks a subscription name: not empty, not starting with `_` (reserved).
pub fn check_subscription_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_config("a subscription name cannot be empty"));
    }
    if name.starts_with('_') {
        return Err(Error::invalid_config(format!(
            "subscription name `{name}` starts with `_`, which is reserved for evbus; \
             choose a name starting with a letter or digit"
        )));
    }
    Ok(())
}

/// One adapter's configuration keys, listed once: the URL query parameter names, equal to the
/// serde field names of its config struct. [`parse`](Self::parse) gives the one "valid keys
/// are ..." error for a typo.
///
/// ```
/// use evbus::raw::ConfigKey;
///
/// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// enum MyKey { Prefix, TimeoutMs }
///
/// impl ConfigKey for MyKey {
///     const ADAPTER: &'static str = "MyBroker";
///     const ALL: &'static [Self] = &[MyKey::Prefix, MyKey::TimeoutMs];
///     fn name(self) -> &'static str {
///         match self { MyKey::Prefix => "prefix", MyKey::TimeoutMs => "timeout_ms" }
///     }
/// }
///
/// assert_eq!(MyKey::parse("timeout_ms")?, MyKey::TimeoutMs);
/// let typo = MyKey::parse("timeout").unwrap_err();
/// assert!(typo.message().contains("valid keys are: prefix, timeout_ms"));
/// let ms = evbus::raw::parse_millis(MyKey::TimeoutMs, "250")?;
/// assert_eq!(ms, std::time::Duration::from_millis(250));
/// # Ok::<(), evbus::Error>(())
/// ```
pub trait ConfigKey: Copy + Eq + Sized + 'static {
    /// The adapter, as messages name it (`Redis`, `Kafka`).
    const ADAPTER: &'static str;
    /// Every key.
    const ALL: &'static [Self];

    /// The key's name in URLs and in serde.
    fn name(self) -> &'static str;

    /// The key named `name`; an unknown name is an
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) listing the valid keys.
    fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|key| key.name() == name)
            .ok_or_else(|| {
                Error::invalid_config(format!(
                    "unknown {} URL parameter `{name}`; valid keys are: {}",
                    Self::ADAPTER,
                    Self::ALL
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}

/// A foreign value (a header, a field name, an attribute) as a decoding error should quote it:
/// whole when at most 128 bytes, else its first 128 bytes (cut at a character) and its
/// length. A decoding error becomes the dead-letter reason of the undecodable message, and a
/// reason as large as the message could keep the record from fitting its queue.
///
/// ```
/// let long = "x".repeat(1000);
/// assert_eq!(evbus::raw::quoted("short"), "short");
/// assert!(evbus::raw::quoted(&long).ends_with("… (1000 bytes)"));
/// ```
pub fn quoted(text: &str) -> std::borrow::Cow<'_, str> {
    crate::envelope::quoted(text)
}

/// Parses the value of a URL parameter; a bad value is an
/// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the key.
pub fn parse_value<K: ConfigKey, V>(key: K, value: &str) -> Result<V>
where
    V: std::str::FromStr,
    V::Err: std::fmt::Display,
{
    value.parse().map_err(|e| {
        Error::invalid_config(format!(
            "{} URL parameter `{}`: bad value `{value}`: {e}",
            K::ADAPTER,
            key.name()
        ))
    })
}

/// Checks that each named duration of a config is at least 1 ms (a zero timeout or poll
/// interval would fail or spin at once); the error names the first one that is not.
///
/// ```
/// use std::time::Duration;
/// let ok = evbus::raw::check_positive(&[("connect_timeout", Duration::from_secs(2))]);
/// assert!(ok.is_ok());
/// let err = evbus::raw::check_positive(&[("block", Duration::ZERO)]).unwrap_err();
/// assert!(err.message().starts_with("block must be at least 1 ms"));
/// ```
pub fn check_positive(durations: &[(&str, std::time::Duration)]) -> Result<()> {
    match durations
        .iter()
        .find(|(_, value)| *value < std::time::Duration::from_millis(1))
    {
        Some((name, value)) => Err(Error::invalid_config(format!(
            "{name} must be at least 1 ms, got {value:?}"
        ))),
        None => Ok(()),
    }
}

/// Checks that each named duration of a configuration is at most `max`, with
/// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the first that is
/// not: a few digits too many in a URL would make a timeout that never ends, or a value the
/// broker reads wrapped around. [`check_positive`]'s other end.
///
/// ```
/// use std::time::Duration;
/// let hour = Duration::from_secs(3600);
/// assert!(evbus::raw::check_at_most(&[("block", Duration::from_secs(1))], hour).is_ok());
/// let err = evbus::raw::check_at_most(&[("block", 2 * hour)], hour).unwrap_err();
/// assert!(err.message().starts_with("block must be at most 3600000 ms"));
/// ```
pub fn check_at_most(
    durations: &[(&str, std::time::Duration)],
    max: std::time::Duration,
) -> Result<()> {
    match durations.iter().find(|(_, value)| *value > max) {
        Some((name, value)) => Err(Error::invalid_config(format!(
            "{name} must be at most {} ms, got {} ms",
            max.as_millis(),
            value.as_millis()
        ))),
        None => Ok(()),
    }
}

/// Parses a URL parameter holding whole milliseconds.
pub fn parse_millis<K: ConfigKey>(key: K, value: &str) -> Result<std::time::Duration> {
    parse_value::<K, u64>(key, value).map(std::time::Duration::from_millis)
}

/// `#[serde(with = "evbus::raw::millis")]`: a `Duration` as whole milliseconds, the way every
/// adapter's config writes durations (`*_ms` fields).
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes whole milliseconds (saturating).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_source_has_its_own_dead_letter_queue_and_origin() {
        let named = Source::topic("orders", &SubscribeOptions::named("billing")).unwrap();
        let anonymous = Source::topic("orders", &SubscribeOptions::anonymous()).unwrap();
        let queue = Source::queue("orders", &ConsumerOptions::default()).unwrap();
        assert_eq!(
            (named.dead_letter_queue(), named.origin()),
            ("orders.billing.dlq", "orders/billing")
        );
        assert_eq!(
            (anonymous.dead_letter_queue(), anonymous.origin()),
            ("orders._anonymous.dlq", "orders/~anonymous")
        );
        assert_eq!(
            (queue.dead_letter_queue(), queue.origin()),
            ("orders.dlq", "orders")
        );
        assert_eq!(named.subscription(), Some("billing"));
        assert_eq!(queue.destination(), &Destination::Queue("orders".into()));
        let Destination::Topic {
            topic,
            subscription: Some(name),
        } = anonymous.destination()
        else {
            panic!("an anonymous subscription is a topic destination with a generated name");
        };
        assert_eq!(topic, "orders");
        assert!(
            name.starts_with("_anonymous.") && name.len() == 43,
            "{name}"
        );
        let again = Source::topic("orders", &SubscribeOptions::anonymous()).unwrap();
        assert_ne!(again.destination(), anonymous.destination());
        assert!(anonymous.is_anonymous() && queue.is_queue());
    }

    #[test]
    fn a_source_carries_the_start_position_a_broker_needs_for_replay() {
        let replay = SubscribeOptions::named("audit").start(StartPosition::Earliest);
        assert_eq!(
            Source::topic("orders", &replay).unwrap().start(),
            StartPosition::Earliest
        );
        let anonymous = SubscribeOptions::anonymous().start(StartPosition::Earliest);
        assert_eq!(
            Source::topic("orders", &anonymous).unwrap().start(),
            StartPosition::Earliest
        );
        assert_eq!(
            Source::topic("orders", &SubscribeOptions::named("billing"))
                .unwrap()
                .start(),
            StartPosition::Latest
        );
        assert_eq!(
            Source::queue("jobs", &ConsumerOptions::default())
                .unwrap()
                .start(),
            StartPosition::Latest
        );
    }

    #[test]
    fn an_explicit_dead_letter_queue_wins() {
        let options = ConsumerOptions::default().dead_letter_queue("parked");
        assert_eq!(
            Source::queue("jobs", &options).unwrap().dead_letter_queue(),
            "parked"
        );
        let sub = SubscribeOptions::anonymous().consumer(options);
        assert_eq!(
            Source::topic("t", &sub).unwrap().dead_letter_queue(),
            "parked"
        );
    }

    #[test]
    fn reserved_and_empty_subscription_names_are_configuration_errors() {
        for name in ["", "_anonymous", "_x"] {
            let err = Source::topic("t", &SubscribeOptions::named(name)).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig, "{name}");
        }
    }
}
