//! Transport layers: decorators over any [`Transport`] (metrics, fault injection, encryption,
//! tenancy), written as two hooks instead of three wrapper types.
//!
//! A [`Layer`] sees every publish (one event or a batch) with a [`Next`] that passes it on,
//! and every consumer's stream of [`RawDelivery`]s before core turns them into
//! [`Delivery`](crate::Delivery)s. It never re-wraps finished deliveries, and the inner
//! transport's settlement rules (attempts, dead-lettering, in-flight limit) apply once.
//! [`Layered`] makes the layer a transport; layers stack.
//!
//! ```
//! use evbus::layer::{Destination, Layer, LayerExt, Next};
//! use evbus::{Event, Transport};
//!
//! /// Counts published events.
//! #[derive(Default)]
//! struct Count(std::sync::atomic::AtomicUsize);
//!
//! #[async_trait::async_trait]
//! impl Layer for Count {
//!     async fn publish(&self, _to: &Destination, events: &[Event], next: Next<'_>) -> evbus::Result<()> {
//!         self.0.fetch_add(events.len(), std::sync::atomic::Ordering::Relaxed);
//!         next.run(events).await
//!     }
//! }
//!
//! # async fn demo() -> evbus::Result<()> {
//! let transport = evbus::memory::MemoryBroker::new(Default::default()).connect().layer(Count::default());
//! let topic = transport.topic("orders").await?;
//! topic.publish(&Event::builder("orderPlaced", "/shop").build()?).await?;
//! assert_eq!(transport.layer_ref().0.load(std::sync::atomic::Ordering::Relaxed), 1);
//! # Ok(()) }
//! ```
//!
//! Shipped layers: [`Observe`] (tracing spans and `metrics` counters per destination) and
//! [`Faults`] (drop, delay, duplicate, reorder, fail, corrupt: for testing consumers and the
//! conformance suite's self-test).
//!
//! Dead-lettering goes to the inner transport's dead-letter queue directly, not through the
//! layer.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::delivery::RawDelivery;
use crate::envelope::Event;
use crate::error::Result;
use crate::raw::RawStream;
use crate::subscription::Subscription;
use crate::transport::{ConsumerOptions, Health, Queue, SubscribeOptions, Topic, Transport};

mod faults;
mod observe;

pub use faults::{Fault, Faults};
pub use observe::Observe;

/// Where a publish goes, or where a consumer reads from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A topic; for consumers, with the subscription (for an anonymous one, see
    /// `subscription`).
    Topic {
        /// The topic name.
        topic: String,
        /// The subscription of a consumer; `None` for a publish. For an anonymous subscription
        /// it depends on where the destination comes from. In
        /// [`Source::destination`](crate::raw::Source::destination), which a kit
        /// [`Broker`](crate::raw::kit::Broker) gets in `consume` and `release`, it is the
        /// generated name, `Some("_anonymous.<32 hex digits>")`, one per subscription: key the
        /// broker's subscription on it. In [`Layer::deliveries`] it is `None`, as the
        /// application asked (a layer cannot tell two anonymous subscriptions apart by it).
        subscription: Option<String>,
    },
    /// A queue.
    Queue(String),
}

impl Destination {
    /// The topic or queue name.
    pub fn name(&self) -> &str {
        match self {
            Destination::Topic { topic, .. } => topic,
            Destination::Queue(name) => name,
        }
    }

    /// `"topic"` or `"queue"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Topic { .. } => "topic",
            Destination::Queue(_) => "queue",
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Topic {
                topic,
                subscription: Some(sub),
            } => write!(f, "topic {topic}/{sub}"),
            Destination::Topic { topic, .. } => write!(f, "topic {topic}"),
            Destination::Queue(name) => write!(f, "queue {name}"),
        }
    }
}

/// The rest of the publish path: the inner topic or queue.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    target: Target<'a>,
}

#[derive(Clone, Copy)]
enum Target<'a> {
    Topic(&'a dyn Topic),
    Queue(&'a dyn Queue),
}

impl fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.target {
            Target::Topic(t) => t.name(),
            Target::Queue(q) => q.name(),
        };
        f.debug_struct("Next").field("to", &name).finish()
    }
}

impl Next<'_> {
    /// Publishes `events` (in order) to the inner destination: one event with
    /// `publish`/`send`, several with `publish_batch`/`send_batch`. May be called several
    /// times (a layer that duplicates) or not at all (one that drops).
    pub async fn run(&self, events: &[Event]) -> Result<()> {
        match (self.target, events) {
            (_, []) => Ok(()),
            (Target::Topic(t), [event]) => t.publish(event).await,
            (Target::Topic(t), events) => t.publish_batch(events).await,
            (Target::Queue(q), [event]) => q.send(event).await,
            (Target::Queue(q), events) => q.send_batch(events).await,
        }
    }
}

/// A decorator over a transport: two hooks, both optional.
#[async_trait]
pub trait Layer: Send + Sync + 'static {
    /// Publishes `events` (one event, or a batch in order) to `to` by calling `next`. The
    /// default passes them on unchanged.
    async fn publish(&self, to: &Destination, events: &[Event], next: Next<'_>) -> Result<()> {
        let _ = to;
        next.run(events).await
    }

    /// Transforms the raw deliveries of a consumer of `from` before core applies the
    /// settlement rules. The default passes them on unchanged.
    fn deliveries(&self, from: &Destination, raw: RawStream) -> RawStream {
        let _ = from;
        raw
    }

    /// Whether the transport behind the layer, `inner`, would refuse `event` for its size
    /// once [`publish`](Self::publish) has made it what it passes on
    /// ([`Transport::check_size`], which the outbox asks when it stages an event). A layer
    /// that changes events on their way (adds attributes, encrypts, compresses) asks `inner`
    /// about the event it would pass on, or refuses with
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) itself; otherwise an event is
    /// staged that no publish will ever take. The default asks about `event` unchanged.
    fn check_size(&self, event: &Event, inner: &dyn Transport) -> Result<()> {
        inner.check_size(event)
    }
}

/// A transport with a [`Layer`] in front of it. Its name and capabilities are the inner
/// transport's.
pub struct Layered<L> {
    inner: Arc<dyn Transport>,
    layer: Arc<L>,
}

impl<L> Clone for Layered<L> {
    fn clone(&self) -> Self {
        Layered {
            inner: Arc::clone(&self.inner),
            layer: Arc::clone(&self.layer),
        }
    }
}

impl<L> fmt::Debug for Layered<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered")
            .field("inner", &self.inner)
            .field("layer", &std::any::type_name::<L>())
            .finish()
    }
}

impl<L: Layer> Layered<L> {
    /// Puts `layer` in front of `inner`.
    pub fn new(inner: impl Transport + 'static, layer: L) -> Self {
        Layered {
            inner: Arc::new(inner),
            layer: Arc::new(layer),
        }
    }

    /// The layer.
    pub fn layer_ref(&self) -> &L {
        &self.layer
    }

    /// The transport behind the layer.
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }
}

/// `transport.layer(l)`: puts a [`Layer`] in front of any transport.
pub trait LayerExt: Transport + Sized + 'static {
    /// Wraps this transport in `layer`.
    fn layer<L: Layer>(self, layer: L) -> Layered<L> {
        Layered::new(self, layer)
    }
}

impl<T: Transport + Sized + 'static> LayerExt for T {}

#[async_trait]
impl<L: Layer> Transport for Layered<L> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        self.layer.check_size(event, &*self.inner)
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let inner = self.inner.topic(name).await?;
        Ok(Arc::new(LayeredTopic {
            to: Destination::Topic {
                topic: name.to_owned(),
                subscription: None,
            },
            inner,
            layer: Arc::clone(&self.layer),
        }))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        let inner = self.inner.queue(name).await?;
        Ok(Arc::new(LayeredQueue {
            to: Destination::Queue(name.to_owned()),
            inner,
            layer: Arc::clone(&self.layer),
        }))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner.delete_topic(name).await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        self.inner.delete_queue(name).await
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct LayeredTopic<L> {
    to: Destination,
    inner: Arc<dyn Topic>,
    layer: Arc<L>,
}

impl<L> fmt::Debug for LayeredTopic<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayeredTopic")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<L: Layer> Topic for LayeredTopic<L> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        let next = Next {
            target: Target::Topic(&*self.inner),
        };
        self.layer
            .publish(&self.to, std::slice::from_ref(event), next)
            .await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        let next = Next {
            target: Target::Topic(&*self.inner),
        };
        self.layer.publish(&self.to, events, next).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let from = Destination::Topic {
            topic: self.inner.name().to_owned(),
            subscription: options.subscription.clone(),
        };
        let subscription = self.inner.subscribe(options).await?;
        Ok(subscription.map_raw(|raw| self.layer.deliveries(&from, raw)))
    }
}

struct LayeredQueue<L> {
    to: Destination,
    inner: Arc<dyn Queue>,
    layer: Arc<L>,
}

impl<L> fmt::Debug for LayeredQueue<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayeredQueue")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<L: Layer> Queue for LayeredQueue<L> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, event: &Event) -> Result<()> {
        let next = Next {
            target: Target::Queue(&*self.inner),
        };
        self.layer
            .publish(&self.to, std::slice::from_ref(event), next)
            .await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        let next = Next {
            target: Target::Queue(&*self.inner),
        };
        self.layer.publish(&self.to, events, next).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let subscription = self.inner.receive(options).await?;
        Ok(subscription.map_raw(|raw| self.layer.deliveries(&self.to, raw)))
    }
}

/// Maps each raw delivery of a stream (a helper for layers that look at deliveries one by
/// one).
pub fn map_deliveries(
    raw: RawStream,
    mut f: impl FnMut(RawDelivery) -> RawDelivery + Send + 'static,
) -> RawStream {
    use futures::StreamExt;
    raw.map(move |item| item.map(&mut f)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::memory::{MemoryBroker, MemoryConfig};

    /// Adds a 100-byte extension to every event it publishes, and says so in `check_size`
    /// when `honest`.
    struct Stamp {
        honest: bool,
    }

    fn stamped(event: &Event) -> Result<Event> {
        event
            .clone()
            .into_builder()
            .extension("stamp", "s".repeat(100))
            .build()
    }

    #[async_trait]
    impl Layer for Stamp {
        async fn publish(&self, _to: &Destination, events: &[Event], next: Next<'_>) -> Result<()> {
            let events = events.iter().map(stamped).collect::<Result<Vec<_>>>()?;
            next.run(&events).await
        }

        fn check_size(&self, event: &Event, inner: &dyn Transport) -> Result<()> {
            if self.honest {
                inner.check_size(&stamped(event)?)
            } else {
                inner.check_size(event)
            }
        }
    }

    #[tokio::test]
    async fn check_size_asks_about_what_the_layer_would_publish() {
        let event = Event::builder("t", "/s")
            .data("text/plain", vec![b'x'; 100])
            .build()
            .unwrap();
        // Fits as the caller has it; not once stamped (100 bytes more).
        let config = MemoryConfig {
            max_payload_bytes: event.encoded_len() + 50,
            ..MemoryConfig::default()
        };
        let broker = MemoryBroker::new(config);
        let honest = broker.connect().layer(Stamp { honest: true });
        let err = honest.check_size(&event).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
        let topic = honest.topic("t").await.unwrap();
        let published = topic.publish(&event).await.unwrap_err();
        assert_eq!(published.kind(), ErrorKind::TooLarge, "{published}");
        // A layer that does not say measures the event unchanged (the trait's default).
        let silent = broker.connect().layer(Stamp { honest: false });
        silent.check_size(&event).unwrap();
    }
}
