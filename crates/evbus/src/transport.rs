//! The contract every transport (broker adapter) implements.
//!
//! # Contract
//!
//! A [`Transport`] is one connection to one broker. It hands out [`Topic`]s (fan-out) and
//! [`Queue`]s (point-to-point) by name; both are created on first use.
//!
//! - **Publish** ([`Topic::publish`], [`Queue::send`]) returns `Ok` only once the broker
//!   accepted the event; an event accepted is never lost by evbus (at-least-once).
//! - **Topic subscriptions.** A *named* subscription receives every event published after it
//!   was first created, across reconnects and process restarts where the broker keeps data;
//!   consumers attached under the same name compete (each event goes to one of them). An
//!   *anonymous* subscription is ephemeral and starts at "now". [`StartPosition::Earliest`]
//!   replays retained history where [`Capabilities::replay`] is declared.
//! - **Queues.** Every consumer competes; each event is handled by exactly one consumer unless
//!   it is not acknowledged, in which case it is redelivered.
//! - **Deliveries** carry the event, the attempt number (1 on first delivery) and an ack
//!   handle; see [`Delivery`](crate::Delivery). A delivery that is neither acked nor nacked
//!   within the visibility timeout (its consumer crashed, hung or dropped it) is redelivered to
//!   a live consumer. After [`ConsumerOptions::max_attempts`] the event goes to the
//!   dead-letter queue (named by
//!   [`Source::dead_letter_queue`](crate::raw::Source::dead_letter_queue):
//!   `<topic>.<subscription>.dlq`, `<topic>._anonymous.dlq` or `<queue>.dlq`) with the reason
//!   and the attempt count, and the events behind it keep flowing.
//! - **Backpressure.** A consumer holds at most [`ConsumerOptions::max_in_flight`] unsettled
//!   deliveries; the stream yields nothing more until some are settled.
//! - **Close** ([`Transport::close`]) flushes every accepted publish, then refuses new
//!   operations with [`ErrorKind::Closed`](crate::ErrorKind::Closed). Closing twice is fine.
//!
//! The traits are object-safe: `Box<dyn Transport>` and `Arc<dyn Transport>` are transports
//! too, so an application can pick a broker at run time from a URL
//! ([`Registry`](crate::Registry)).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::envelope::Event;
use crate::error::Result;
use crate::subscription::Subscription;

/// One connection to a broker: the factory for topics and queues.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug {
    /// The adapter's short name (`memory`, `redis`, `kafka`, ...).
    fn name(&self) -> &str;

    /// What this transport can do beyond the common contract.
    fn capabilities(&self) -> Capabilities;

    /// Refuses `event` with [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) if this
    /// transport's publish or send would refuse it for its size, without publishing
    /// anything: what a caller that hands the event to this transport later (an outbox
    /// staging what its relay publishes) checks first, so that it never keeps an event no
    /// publish can take.
    ///
    /// The default measures [`Event::encoded_len`] (the data plus every attribute value)
    /// against [`Capabilities::max_payload_bytes`], as a transport's publish must. A
    /// transport that refuses some events by another measure as well (Redis in structured
    /// mode measures the JSON it writes) overrides this with the same rule its publish
    /// applies.
    fn check_size(&self, event: &Event) -> Result<()> {
        check_encoded_len(self.name(), self.capabilities().max_payload_bytes, event)
    }

    /// The topic `name`, created on the broker if needed.
    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>>;

    /// The queue `name`, created on the broker if needed.
    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>>;

    /// Deletes a topic with its subscriptions and retained events (cleanup, tests). Deleting
    /// what does not exist is not an error.
    async fn delete_topic(&self, name: &str) -> Result<()>;

    /// Deletes a queue and its events. Deleting what does not exist is not an error.
    async fn delete_queue(&self, name: &str) -> Result<()>;

    /// Whether the broker is reachable right now.
    async fn health(&self) -> Health;

    /// Flushes accepted publishes, ends subscriptions and releases the connection. Further
    /// operations fail with [`ErrorKind::Closed`](crate::ErrorKind::Closed); closing again
    /// returns `Ok`.
    async fn close(&self) -> Result<()>;
}

/// A fan-out destination.
#[async_trait]
pub trait Topic: Send + Sync + fmt::Debug {
    /// The topic name.
    fn name(&self) -> &str;

    /// Publishes one event; returns once the broker accepted it.
    async fn publish(&self, event: &Event) -> Result<()>;

    /// Publishes one event without waiting, for transports that can take it on the spot (an
    /// in-process broker with room): `Some(result)` is the publish's result, `None` (the
    /// default) means "call [`publish`](Self::publish)", and nothing was published. Spares
    /// the hot path a boxed future per event. A layer that wraps a topic keeps the default
    /// unless it does for this call what it does for `publish`.
    fn try_publish_now(&self, event: &Event) -> Option<Result<()>> {
        let _ = event;
        None
    }

    /// Publishes several events, in order, keeping many in flight where the broker allows.
    /// Returns `Ok` only once all were accepted; on error, a prefix may have been accepted.
    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        for event in events {
            self.publish(event).await?;
        }
        Ok(())
    }

    /// Attaches a consumer to a subscription of this topic.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription>;
}

/// A point-to-point destination.
#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    /// The queue name.
    fn name(&self) -> &str;

    /// Sends one event; returns once the broker accepted it.
    async fn send(&self, event: &Event) -> Result<()>;

    /// Sends several events, in order (see [`Topic::publish_batch`]).
    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        for event in events {
            self.send(event).await?;
        }
        Ok(())
    }

    /// Attaches a competing consumer to this queue.
    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription>;
}

// Object safety: these lines fail to compile if a trait stops being usable as `dyn`.
const _: Option<&dyn Transport> = None;
const _: Option<&dyn Topic> = None;
const _: Option<&dyn Queue> = None;

macro_rules! forward_transport {
    ($ty:ty) => {
        #[async_trait]
        impl<T: Transport + ?Sized> Transport for $ty {
            fn name(&self) -> &str {
                (**self).name()
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            fn check_size(&self, event: &Event) -> Result<()> {
                (**self).check_size(event)
            }
            async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
                (**self).topic(name).await
            }
            async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
                (**self).queue(name).await
            }
            async fn delete_topic(&self, name: &str) -> Result<()> {
                (**self).delete_topic(name).await
            }
            async fn delete_queue(&self, name: &str) -> Result<()> {
                (**self).delete_queue(name).await
            }
            async fn health(&self) -> Health {
                (**self).health().await
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
        }
    };
}
forward_transport!(Box<T>);
forward_transport!(Arc<T>);

/// [`Transport::check_size`]'s default, and the check every adapter makes before it sends:
/// `event` is refused with [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) when its
/// [`Event::encoded_len`] is over `limit` (no limit: never), in a message naming the
/// `transport` and `max_payload_bytes`. Re-exported as `evbus::raw::check_encoded_len`.
pub fn check_encoded_len(transport: &str, limit: Option<usize>, event: &Event) -> Result<()> {
    match limit {
        Some(limit) if event.encoded_len() > limit => Err(crate::Error::new(
            crate::ErrorKind::TooLarge,
            format!(
                "event {} is {} bytes (its data and attributes); this {transport} transport \
                 accepts at most {limit} (max_payload_bytes)",
                event.id(),
                event.encoded_len()
            ),
        )
        .with_hint("send a reference to large data (a URL) instead of the data itself")),
        _ => Ok(()),
    }
}

/// Broker reachability as a transport sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Connected and working.
    Healthy,
    /// Working with reduced service (reconnecting, a replica down); the reason says what.
    Degraded(String),
    /// Not usable now; the reason says why.
    Unhealthy(String),
    /// The transport was closed.
    Closed,
}

impl Health {
    /// Whether operations are expected to succeed now.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// Where a new named subscription starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartPosition {
    /// Only events published after the subscription is created.
    #[default]
    Latest,
    /// The earliest event the broker retains (needs [`Capabilities::replay`]).
    Earliest,
}

/// Consumer settings shared by topic subscriptions and queue consumers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Most unsettled deliveries this consumer holds at once. Default 64.
    pub max_in_flight: usize,
    /// Deliveries of one event before it is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// How long a delivery may stay unsettled before it is given to another consumer.
    /// Default 30 s; from 1 ms to 100 years (a subscribe or receive refuses others).
    pub visibility_timeout: Duration,
    /// The dead-letter queue name; `None` uses the default: `<topic>.<subscription>.dlq` for
    /// a named subscription, `<topic>._anonymous.dlq` for an anonymous one, `<queue>.dlq` for
    /// a queue ([`Source::dead_letter_queue`](crate::raw::Source::dead_letter_queue)).
    /// Names may hold dots, so defaults can coincide (topic `a.b` with subscription `c`,
    /// topic `a` with subscription `b.c` and queue `a.b.c` all use `a.b.c.dlq`): where names
    /// extend one another, give each its own.
    pub dead_letter_queue: Option<String>,
    /// A look at a dead-letter queue ([`DeadLetters`](crate::bus::DeadLetters)): a message that
    /// is not a CloudEvent is handed out as its `evbus.undecodable` placeholder, to be listed
    /// and given back, instead of being moved to this queue's own dead-letter queue.
    pub(crate) inspect: bool,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            max_in_flight: 64,
            max_attempts: 5,
            visibility_timeout: Duration::from_secs(30),
            dead_letter_queue: None,
            inspect: false,
        }
    }
}

impl ConsumerOptions {
    /// Sets [`max_in_flight`](Self::max_in_flight) (at least 1).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
    /// Sets [`max_attempts`](Self::max_attempts) (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets [`visibility_timeout`](Self::visibility_timeout), at most
    /// [`LONGEST_VISIBILITY`](crate::raw::LONGEST_VISIBILITY) (100 years): `Duration::MAX`
    /// means "never". A subscribe or receive refuses a timeout under a millisecond with
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout.min(crate::raw::LONGEST_VISIBILITY);
        self
    }
    /// Sets [`dead_letter_queue`](Self::dead_letter_queue).
    pub fn dead_letter_queue(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(name.into());
        self
    }
}

/// Options for [`Topic::subscribe`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The subscription name; `None` for an anonymous, ephemeral subscription.
    pub subscription: Option<String>,
    /// Where a *new* named subscription starts; an existing one resumes where it stopped.
    pub start: StartPosition,
    /// Consumer settings.
    pub consumer: ConsumerOptions,
}

impl SubscribeOptions {
    /// A named, durable subscription (consumers using the same name compete).
    pub fn named(name: impl Into<String>) -> Self {
        SubscribeOptions {
            subscription: Some(name.into()),
            ..Default::default()
        }
    }
    /// An anonymous subscription starting now.
    pub fn anonymous() -> Self {
        SubscribeOptions::default()
    }
    /// Sets the start position.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
    /// Sets the consumer settings.
    pub fn consumer(mut self, consumer: ConsumerOptions) -> Self {
        self.consumer = consumer;
        self
    }
}

/// The dead-letter queue of a named topic subscription (`<topic>.<subscription>.dlq`) or of a
/// queue (`<queue>.dlq`, with `subscription` `None`), unless
/// [`ConsumerOptions::dead_letter_queue`] names another.
///
/// Not for anonymous subscriptions: their dead letters go to `<topic>._anonymous.dlq`, and
/// `None` gives `<topic>.dlq`, a queue's name. An adapter takes the name for every kind of
/// consumer from [`Source::dead_letter_queue`](crate::raw::Source::dead_letter_queue).
pub fn dead_letter_queue_name(
    destination: &str,
    subscription: Option<&str>,
    options: &ConsumerOptions,
) -> String {
    if let Some(name) = &options.dead_letter_queue {
        return name.clone();
    }
    match subscription {
        Some(sub) => format!("{destination}.{sub}.dlq"),
        None => format!("{destination}.dlq"),
    }
}
