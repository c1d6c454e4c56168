//! The Bus: the application-facing runtime on top of a [`Transport`] and a frozen [`Catalog`].
//!
//! It replaces an in-process `emit(name, ...)` / `on(name, fn)` emitter: events are checked
//! against their schema, carried by a real broker, handled once per *group* across every
//! running instance, retried with backoff, dead-lettered when they keep failing, traced and
//! counted.
//!
//! ```
//! use std::sync::Arc;
//! use evbus::bus::{Bus, Message};
//! use evbus::memory::MemoryBroker;
//! use evbus::schema::Catalog;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> evbus::Result<()> {
//! let mut catalog = Catalog::builder();
//! catalog.register_json("afterOrderCreate", json!({
//!     "type": "object",
//!     "properties": {"orderId": {"type": "string"}},
//!     "required": ["orderId"]
//! }))?;
//! let transport = Arc::new(MemoryBroker::new(Default::default()).connect());
//! let bus = Bus::new(transport, catalog.freeze()?, "/shop/orders");
//!
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! bus.on("afterOrderCreate", "billing", move |msg: Message| {
//!     let tx = tx.clone();
//!     async move {
//!         tx.send(msg.event().id().to_owned())?;
//!         Ok(())
//!     }
//! })
//! .start()
//! .await?;
//!
//! let id = bus.emit("afterOrderCreate", json!({"orderId": "o-1"})).await?;
//! assert_eq!(rx.recv().await, Some(id));
//!
//! // A payload that breaks its schema is refused and nothing is published.
//! let err = bus.emit("afterOrderCreate", json!({})).await.unwrap_err();
//! assert_eq!(err.kind(), evbus::ErrorKind::Validation);
//!
//! bus.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # Routing
//!
//! By default each event type has its own topic, named after the type. [`BusBuilder::route`]
//! maps several types to one topic, so that per-key order holds *across* them (all order
//! events keyed by order id on topic `orders`): a handler for `afterOrderCreate` on that
//! topic acknowledges events of the other types without running. An event of a type this
//! Bus neither routes to the topic nor has in its catalogue is dead-lettered as
//! `misrouted` instead (it is not known to belong there): a producer that starts routing a
//! new type to a shared topic before its consumers know the type fills their dead-letter
//! queues (redrive them once the consumers are upgraded), so deploy consumers first.
//!
//! # Groups
//!
//! [`Bus::on`] attaches a handler under a *group*. The group is a named, durable subscription
//! of the type's topic: instances running the same group compete (each event is handled by
//! one of them) and different groups each receive every event. The subscription is named
//! after the group when the topic carries only that type, and `<group>.<type>` when the
//! topic is shared by several types (so two handlers of one group for two types of one topic
//! never take events from each other). See [`Bus::subscription_name`].
//!
//! The name changes when a topic becomes shared: a handler of group `search` for
//! `productChanged` subscribes as `search` while `productChanged` has its topic to itself,
//! and as `search.productChanged` once a route adds another type to it. The new subscription
//! starts at the latest event, so what was published between the old version stopping and
//! the new one starting is not in it (it is in the old one, `search`, which is left behind
//! holding it). To share a topic that groups already consume, deploy the consumers with a
//! [`HandlerBuilder::start_position`] of `Earliest` for that release where the transport
//! replays ([`Capabilities::replay`](crate::Capabilities)), or stop the producers until the
//! new consumers run; and delete the old subscription once nothing reads it.
//!
//! # Validation on both sides
//!
//! [`Bus::emit`] validates against the catalogue before anything is published: an invalid
//! payload, or an unknown type in a strict catalogue, is an [`ErrorKind::Validation`] error
//! naming every violation (or every known type). Events are validated again on consume with
//! [`Catalog::read_event`] (a foreign producer may be wrong): an invalid or unknown event
//! goes to the group's dead-letter queue with the reason and never reaches the handler.
//!
//! An event written with a version of its type that the consumer's catalogue lacks (a
//! producer deployed first with a newer catalogue) reaches the handler when its data is valid
//! under the latest version the consumer knows — the contract the handler was written
//! against — with a debug log and the counter `evbus_unknown_version_read_total{type, group,
//! relation="newer"|"older"}`; otherwise it is dead-lettered with a reason naming the missing
//! version and the deploy order (see `docs/adr/0010-schema-evolution.md`).
//!
//! # Retries, dead letters, redrive
//!
//! A handler error is retried according to the handler's [`RetryPolicy`] (default 5 attempts,
//! exponential backoff with jitter, through a delayed nack so a crash loses nothing); after
//! the last attempt the event goes to the dead-letter queue
//! `<topic>.<subscription>.dlq` with the **last handler error** as its reason.
//! [`Bus::dead_letters`] inspects that queue and redrives from it: redriven events go to the
//! group's private *redrive queue* `<topic>.<subscription>.redrive`, which every handler of
//! the group also consumes, so a redrive reaches that group only — re-publishing to the topic
//! would deliver the event again to every group.
//!
//! # Concurrency and order
//!
//! A handler runs at most [`DEFAULT_CONCURRENCY`] (16) events at once per instance
//! ([`HandlerBuilder::concurrency`]) and may hold as many more fetched ahead
//! ([`HandlerBuilder::prefetch`]): the transport's in-flight limit is the sum, so while every
//! slot is busy the next events are already on their way, and the broker never hands an
//! instance more than that. A fetched event's visibility timeout runs while it waits for a
//! slot (about one handler run): keep runs under half the timeout, or set the prefetch to 0.
//! With
//! [`HandlerBuilder::ordered_by_key`], events sharing a partition key run one at a time in
//! arrival order (one serial lane per key), and their retries happen in place (the lane waits
//! for the backoff, the event stays unacknowledged on the broker) so a retried event is never
//! overtaken by a later event of its key. Events waiting in a lane have their visibility
//! timeouts renewed, so a long backlog of one key does not come back from the broker.
//!
//! On a multi-threaded runtime unordered events are handled by a pool of long-lived tasks,
//! at most the concurrency of them, so handlers run in parallel on the runtime's workers
//! without a task spawned per event; an ordered handler's key lanes run on the same kind of
//! pool (a task runs one lane until it is empty, then the next). On a current-thread runtime,
//! where tasks never run in parallel, an unordered handler's run, or an ordered handler's new
//! lane, is first polled in the handler's consume loop and gets a task of its own only if it
//! has to wait (the limit, the retries and the drain are the same); the loop lets other tasks
//! run after as many events as the concurrency.
//!
//! # Shutdown
//!
//! [`Bus::shutdown`] stops every handler from taking deliveries, lets the running ones finish
//! until the deadline, nacks what is still running (or queued) at the deadline so another
//! instance gets it at once, waits for the emits in progress, then closes the transport
//! (which flushes every accepted publish). [`HandlerHandle::shutdown`] does the same for one
//! handler and returns a [`DrainReport`] of what was interrupted.
//!
//! An interrupted delivery counts as an attempt, as a crash's would (a broker cannot tell
//! them apart). One interrupted on its last attempt is not nacked (that would dead-letter an
//! event that did not fail) but left to its visibility timeout; when it comes back past
//! `max_attempts`, the subscription dead-letters it with `max attempts exceeded (n
//! deliveries, m allowed)`, without running the handler, without the `on_dead_letter` hook
//! and without the handler's metrics. Give the deadline room for the longest run, and
//! redrive such dead letters after a deploy that cut runs short.
//!
//! A handler also stops by itself when its subscription ends: its topic was deleted (by any
//! connection, ADR 0031) or its transport was closed under it. It logs a warning naming its
//! type and group, lets the runs under way finish (for at most the handler's visibility
//! timeout, or until a shutdown's deadline; their settlements may then fail, and the events
//! come back), and [`HandlerHandle::is_running`] turns `false`. Start it again to go on.
//!
//! # Observability
//!
//! Every emit runs in a `tracing` span `evbus.emit` and every handling in a span
//! `evbus.handle`. With the default `opentelemetry` feature, `evbus.emit` writes the W3C
//! `traceparent`/`tracestate` of its OpenTelemetry context into the event and
//! `evbus.handle` takes the event's context as its parent, so in a trace the handler is a
//! child of the emitter across the broker (install a `tracing-opentelemetry` layer to export
//! them). Metrics go through the [`metrics`](https://docs.rs/metrics) facade (install any
//! recorder: Prometheus, StatsD, ...):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `evbus_emitted_total` | counter | `type` |
//! | `evbus_handled_total` | counter | `type`, `group` |
//! | `evbus_failed_total` | counter (handler errors, one per failed attempt) | `type`, `group` |
//! | `evbus_retried_total` | counter | `type`, `group` |
//! | `evbus_dead_lettered_total` | counter | `type`, `group`, `cause` (`handler`, `invalid`, `undecodable`, `misrouted`, `unknown_version`) |
//! | `evbus_handle_duration_seconds` | histogram | `type`, `group` |
//!
//! [`ErrorKind::Validation`]: crate::ErrorKind::Validation

mod dead_letters;
mod emit;
mod handler;
mod retry;
mod telemetry;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::schema::Catalog;
use crate::transport::{ConsumerOptions, Topic, Transport, dead_letter_queue_name};

pub use dead_letters::{DeadLetter, DeadLetters};
pub use emit::Emit;
pub use handler::{
    DEFAULT_CONCURRENCY, DEFAULT_VISIBILITY_TIMEOUT, DrainReport, HandlerBuilder, HandlerError,
    HandlerHandle, Message,
};
pub use retry::{LONGEST_BACKOFF, RetryPolicy};

/// The default `source` attribute of emitted events when none is given.
pub const DEFAULT_SOURCE: &str = "/evbus";

/// The application-facing runtime: emit validated events, attach handlers in groups.
///
/// Cheap to clone (one `Arc` inside), `Send + Sync`: clone it into every task that emits.
/// See the [module documentation](self) for the guarantees.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    catalog: Catalog,
    /// Shared by every event the bus builds.
    source: Arc<str>,
    routes: FxHashMap<String, String>,
    shared_topics: HashMap<String, usize>,
    /// What emitting needs per type, for every type the catalogue lists or a route names:
    /// one lookup per emit. (The maps of types use a fast hash: their keys are the
    /// application's own types; the gateway publishes only types of the catalogue.)
    types: FxHashMap<String, TypeEntry>,
    /// The same for types outside the catalogue (accepted by a permissive one), made on
    /// their first successful emit.
    other_types: RwLock<FxHashMap<String, Arc<TypeEntry>>>,
    defaults: Defaults,
    topics: Mutex<HashMap<String, Arc<dyn Topic>>>,
    emits: TaskTracker,
    handlers: Mutex<Vec<HandlerHandle>>,
    closed: AtomicBool,
    /// Held by the [`Bus::shutdown`] under way, `true` once one has finished: a call made
    /// while another runs waits for it, instead of finding the handlers already taken and
    /// closing the transport under a handler still running.
    shut_down: tokio::sync::Mutex<bool>,
}

/// One event type as emitting sees it.
struct TypeEntry {
    /// The type's name, shared by every event of it the bus builds.
    ty: Arc<str>,
    /// The topic it is published to (its route, or its own name).
    topic: String,
    /// That topic's handle, once opened.
    handle: OnceLock<Arc<dyn Topic>>,
    metrics: telemetry::TypeMetrics,
}

/// Handler settings used unless a [`HandlerBuilder`] overrides them.
#[derive(Clone, Debug)]
struct Defaults {
    retry: RetryPolicy,
    concurrency: usize,
    /// `None`: as many as the concurrency.
    prefetch: Option<usize>,
    ordered: bool,
    visibility_timeout: Duration,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.inner.transport.name())
            .field("source", &self.inner.source)
            .field("routes", &self.inner.routes)
            .field("closed", &self.inner.closed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    /// A bus on `transport`, validating against `catalog`, emitting with `source` as the
    /// CloudEvents `source`, with one topic per event type and default handler settings.
    pub fn new(transport: Arc<dyn Transport>, catalog: Catalog, source: impl Into<String>) -> Bus {
        Bus::builder(transport, catalog).source(source).build()
    }

    /// A [`BusBuilder`] for routing and handler defaults.
    pub fn builder(transport: Arc<dyn Transport>, catalog: Catalog) -> BusBuilder {
        BusBuilder {
            transport,
            catalog,
            source: DEFAULT_SOURCE.to_owned(),
            routes: HashMap::new(),
            defaults: Defaults {
                retry: RetryPolicy::default(),
                concurrency: DEFAULT_CONCURRENCY,
                prefetch: None,
                ordered: false,
                visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            },
        }
    }

    /// The transport the bus runs on.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The catalogue events are validated against.
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The `source` attribute of emitted events.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The topic events of type `ty` are published to: its route, or the type name.
    pub fn topic_name(&self, ty: &str) -> String {
        self.topic_of(ty, None).to_owned()
    }

    /// The subscription a handler of `ty` in `group` consumes: `group` when the type's topic
    /// carries only this type, `<group>.<ty>` when it is routed to a topic shared by several
    /// types.
    pub fn subscription_name(&self, ty: &str, group: &str) -> String {
        let topic = self.topic_name(ty);
        if self.inner.shared_topics.get(&topic).copied().unwrap_or(0) > 1 {
            format!("{group}.{ty}")
        } else {
            group.to_owned()
        }
    }

    /// The dead-letter queue of the handlers of `ty` in `group`:
    /// `<topic>.<subscription>.dlq` ([`dead_letter_queue_name`]).
    pub fn dead_letter_queue_name(&self, ty: &str, group: &str) -> String {
        dead_letter_queue_name(
            &self.topic_name(ty),
            Some(&self.subscription_name(ty, group)),
            &ConsumerOptions::default(),
        )
    }

    /// The redrive queue of the handlers of `ty` in `group`:
    /// `<topic>.<subscription>.redrive`. Every handler of the group consumes it besides the
    /// topic; [`DeadLetters::redrive`] sends to it.
    pub fn redrive_queue_name(&self, ty: &str, group: &str) -> String {
        format!(
            "{}.{}.redrive",
            self.topic_name(ty),
            self.subscription_name(ty, group)
        )
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn ensure_open(&self) -> Result<()> {
        if self.is_shut_down() {
            Err(Error::closed("the bus"))
        } else {
            Ok(())
        }
    }

    /// The topic handle of a known type (cached in its entry after the first emit).
    async fn type_topic(&self, entry: &TypeEntry) -> Result<Arc<dyn Topic>> {
        if let Some(topic) = entry.handle.get() {
            return Ok(Arc::clone(topic));
        }
        // Opened once per type: boxed, so that every emit's future does not carry the state of
        // opening a topic (the emit future is moved into place once or twice per emit).
        let topic = Box::pin(self.topic(&entry.topic)).await?;
        Ok(Arc::clone(entry.handle.get_or_init(|| topic)))
    }

    /// The entry of a type outside the catalogue, if it was made.
    fn find_other_type(&self, ty: &str) -> Option<Arc<TypeEntry>> {
        self.inner
            .other_types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ty)
            .cloned()
    }

    /// The entry of a type outside the catalogue, made on first use.
    fn other_type(&self, ty: &str) -> Arc<TypeEntry> {
        let others = self
            .inner
            .other_types
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = others.get(ty) {
            return Arc::clone(entry);
        }
        drop(others);
        let mut others = self
            .inner
            .other_types
            .write()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(others.entry(ty.to_owned()).or_insert_with(|| {
            Arc::new(TypeEntry {
                ty: Arc::from(ty),
                topic: self.topic_name(ty),
                handle: OnceLock::new(),
                metrics: telemetry::TypeMetrics::new(ty),
            })
        }))
    }

    pub(crate) async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        if let Some(topic) = lock(&self.inner.topics).get(name) {
            return Ok(Arc::clone(topic));
        }
        let topic = self.inner.transport.topic(name).await?;
        lock(&self.inner.topics)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::clone(&topic));
        Ok(topic)
    }

    /// Stops every handler, drains, flushes and closes the transport.
    ///
    /// In order: handlers stop taking deliveries; running handlers get until `deadline` to
    /// finish, after which what is still running or queued is nacked (redelivered to another
    /// instance); emits in progress finish (also bounded by `deadline`); new emits fail with
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed); finally the transport is closed, which
    /// flushes every accepted publish. Calling it again returns `Ok`; a call made while
    /// another is under way (from another task) returns once that one has finished.
    pub async fn shutdown(&self, deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        self.inner.closed.store(true, Ordering::Release);
        let mut shut_down = self.inner.shut_down.lock().await;
        if *shut_down {
            return Ok(());
        }
        let handlers = std::mem::take(&mut *lock(&self.inner.handlers));
        futures::future::join_all(handlers.iter().map(|h| h.shutdown_until(until))).await;
        self.inner.emits.close();
        if tokio::time::timeout_at(until, self.inner.emits.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "emits still in progress at the shutdown deadline; closing the transport anyway"
            );
        }
        let closed = self.inner.transport.close().await;
        *shut_down = true;
        closed
    }

    pub(crate) fn register_handler(&self, handle: HandlerHandle) {
        let mut handlers = lock(&self.inner.handlers);
        handlers.retain(HandlerHandle::is_running);
        handlers.push(handle);
    }
}

/// Builds a [`Bus`]: source, routing and handler defaults.
#[must_use]
pub struct BusBuilder {
    transport: Arc<dyn Transport>,
    catalog: Catalog,
    source: String,
    routes: HashMap<String, String>,
    defaults: Defaults,
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("source", &self.source)
            .field("routes", &self.routes)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl BusBuilder {
    /// The CloudEvents `source` of emitted events (default [`DEFAULT_SOURCE`]), for example
    /// `/shop/orders` or `urn:pod:orders-7f9c`.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Publishes the given event types to `topic` instead of one topic per type, so that
    /// per-key order holds across them.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # let transport = Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect());
    /// let bus = evbus::bus::Bus::builder(transport, evbus::Catalog::default())
    ///     .route(["afterOrderCreate", "afterOrderUpdate"], "orders")
    ///     .build();
    /// assert_eq!(bus.topic_name("afterOrderUpdate"), "orders");
    /// assert_eq!(bus.topic_name("afterProductUpdate"), "afterProductUpdate");
    /// assert_eq!(bus.subscription_name("afterOrderCreate", "billing"), "billing.afterOrderCreate");
    /// ```
    pub fn route<I, S>(mut self, types: I, topic: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let topic = topic.into();
        for ty in types {
            self.routes.insert(ty.into(), topic.clone());
        }
        self
    }

    /// The retry policy of handlers that do not set their own (default
    /// [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.defaults.retry = policy;
        self
    }

    /// The concurrency of handlers that do not set their own (default
    /// [`DEFAULT_CONCURRENCY`]; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.defaults.concurrency = n.max(1);
        self
    }

    /// The prefetch of handlers that do not set their own (default: each handler's
    /// concurrency; see [`HandlerBuilder::prefetch`]).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.defaults.prefetch = Some(n);
        self
    }

    /// Whether handlers keep per-key order unless they say otherwise (default `false`).
    pub fn ordered_by_key(mut self, ordered: bool) -> Self {
        self.defaults.ordered = ordered;
        self
    }

    /// The visibility timeout of handler subscriptions (default
    /// [`DEFAULT_VISIBILITY_TIMEOUT`]): how long an instance may hold an event before the
    /// broker gives it to another (an instance that crashed).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.visibility_timeout = timeout;
        self
    }

    /// The bus.
    pub fn build(self) -> Bus {
        let mut shared_topics: HashMap<String, usize> = HashMap::new();
        for topic in self.routes.values() {
            *shared_topics.entry(topic.clone()).or_default() += 1;
        }
        // A type routed to a topic named like another type shares that topic with it.
        for (ty, topic) in &self.routes {
            if ty != topic && self.catalog.contains(topic) && !self.routes.contains_key(topic) {
                *shared_topics.entry(topic.clone()).or_default() += 1;
            }
        }
        let types = self
            .catalog
            .type_names()
            .into_iter()
            .chain(self.routes.keys().cloned())
            .map(|ty| {
                let entry = TypeEntry {
                    ty: Arc::from(ty.as_str()),
                    topic: self.routes.get(&ty).cloned().unwrap_or_else(|| ty.clone()),
                    handle: OnceLock::new(),
                    metrics: telemetry::TypeMetrics::new(&ty),
                };
                (ty, entry)
            })
            .collect();
        Bus {
            inner: Arc::new(Inner {
                transport: self.transport,
                catalog: self.catalog,
                source: Arc::from(self.source),
                routes: self.routes.into_iter().collect(),
                shared_topics,
                types,
                other_types: RwLock::new(FxHashMap::default()),
                defaults: self.defaults,
                topics: Mutex::new(HashMap::new()),
                emits: TaskTracker::new(),
                handlers: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                shut_down: tokio::sync::Mutex::new(false),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_is_send_sync_and_cheap_to_clone() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Bus>();
    }
}
