//! The short path to an adapter: implement the small [`Broker`] trait and wrap it in a
//! [`Connection`], which is the [`Transport`] (with its [`Topic`]s and [`Queue`]s).
//!
//! A broker only moves events: it publishes them to a [`Destination`], gives a stream of
//! [`RawDelivery`]s for a [`Source`], deletes destinations and closes. Everything around that,
//! which every adapter would otherwise write again (and which the conformance suite checks),
//! is done here once. Adapters that need full control (their own handles, a connection task,
//! batching across destinations) implement [`Transport`], [`Topic`] and [`Queue`] directly
//! with the rest of [`evbus::raw`](super).
//!
//! # Contract
//!
//! What [`Connection`] does for the broker:
//!
//! - **Handles.** [`Transport::topic`] and [`Transport::queue`] call [`Broker::declare`] and
//!   hand out handles; `publish`, `publish_batch`, `send` and `send_batch` all reach
//!   [`Broker::publish`] (one call per batch, never with an empty batch), `delete_topic` and
//!   `delete_queue` reach [`Broker::delete`].
//! - **Payload limit.** An event larger than the declared
//!   [`Capabilities::max_payload_bytes`] fails with
//!   [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) before the broker sees the batch.
//! - **Subscriptions.** `subscribe` and `receive` build the [`Source`] (which names the
//!   dead-letter queue and the origin, and refuses reserved subscription names), call
//!   [`Broker::consume`], and assemble the [`Subscription`] with
//!   [`Source::into_subscription`]: dead letters go to this connection's queue
//!   `source.dead_letter_queue()`; in-flight limit, attempts, settle-once, delayed nacks and
//!   undecodable messages are core's.
//! - **Anonymous subscriptions.** Each has its own generated name in
//!   [`Source::destination`]. When its subscription is dropped, or at the latest when the
//!   connection closes, [`Broker::release`] is called once with its source, so the broker can
//!   delete what it created for it. Named subscriptions and queues are never released.
//! - **Close.** [`Transport::close`] makes every new operation (including settlements of
//!   deliveries already handed out) fail with [`ErrorKind::Closed`](crate::ErrorKind::Closed)
//!   and ends every subscription at once (even one whose in-flight slots are all taken); it
//!   then waits for the operations in progress (publishes, settlements, consumes, releases),
//!   releases the anonymous subscriptions still open and calls [`Broker::close`] once. Each
//!   wait lasts at most [`CLOSE_GRACE`] (30 s; [`Connection::with_close_grace`]): what is
//!   still running then is logged and left, and the broker is closed anyway. Closing
//!   again returns `Ok`. [`Transport::health`] is [`Health::Closed`] from then on.
//! - **Names.** Topic and queue names are checked with
//!   [`check_destination_name`](super::check_destination_name) (1 to 249 bytes, no control
//!   character): others fail with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) before the broker sees them.
//!   Every other character reaches the broker as it is (`.`, `/`, `..`, non-ASCII): a broker
//!   that makes names into paths, keys or identifiers escapes them.
//!
//! What the broker must do:
//!
//! - [`publish`](Broker::publish) returns `Ok` only once the broker accepted every event of
//!   the batch, stored in order.
//! - [`consume`](Broker::consume) returns a stream that yields deliveries only when polled
//!   (core polls it only while the consumer has a free in-flight slot), with the attempt
//!   number counted by the broker (1 on first delivery) and an [`Acker`] that settles exactly
//!   the delivery its tag names. A delivery left unsettled past the consumer's
//!   [`visibility_timeout`](crate::ConsumerOptions::visibility_timeout) comes back with its
//!   attempt increased. A message that does not decode is yielded as
//!   [`RawDelivery::undecodable`] ([`RawDelivery::from_json`] and
//!   [`RawDelivery::from_binding`] do this), never as an error. [`poll`] builds such a stream
//!   from a function that fetches one delivery.
//! - A client that takes messages ahead (a push client's prefetch) takes at most
//!   [`max_in_flight`](crate::ConsumerOptions::max_in_flight), and gives back what it never
//!   handed out when the stream is dropped: core cannot see a prefetch, and a message held in
//!   one comes back only after the visibility timeout, with an attempt counted for nothing.
//! - An `Err` item of the stream is handed to the consumer and the subscription goes on, so
//!   it is for failures that may pass; the stream ending ends the subscription for good (see
//!   [`RawStream`]).
//! - A settlement that comes after its delivery's visibility timeout expired, when the
//!   message may have been handed out again, must not affect the redelivery (an ack does not
//!   delete it, a nack does not make it visible again), and returns [`ErrorKind::Expired`](crate::ErrorKind::Expired)
//!   where the broker can tell.
//! - [`Acker::renew`] starts a delivery's visibility timeout over from now, and refuses with
//!   [`ErrorKind::Expired`](crate::ErrorKind::Expired), changing nothing, once the timeout ran out (core renews the
//!   events the Bus holds for an ordered handler, and those it holds for an emulated delayed
//!   nack; the default, [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), leaves
//!   their timeouts running and fails two conformance cases).
//! - A named subscription (in [`Source::destination`]) keeps receiving events published
//!   while no consumer is attached; consumers of one name, or of one queue, compete.
//! - Its errors are [`ErrorKind::Connection`](crate::ErrorKind::Connection) or
//!   [`Timeout`](crate::ErrorKind::Timeout) when the broker cannot be reached, otherwise the
//!   kind that says what went wrong.
//! - Every [`Broker`] and [`Acker`] call ends in bounded time: close waits for the
//!   operations in progress, so a call that never returns (a client retrying for ever
//!   against a broker that is gone) holds close up. Give each request a deadline and fail
//!   with [`Timeout`](crate::ErrorKind::Timeout) when it passes.
//!
//! ```
//! use std::sync::Arc;
//! use evbus::raw::kit::{self, Broker, Connection, Destination};
//! use evbus::raw::{Acker, RawDelivery, RawStream, Source};
//! use evbus::{Capabilities, Event, Transport};
//!
//! /// A broker that accepts everything and never delivers.
//! struct Void;
//!
//! #[async_trait::async_trait]
//! impl Broker for Void {
//!     fn name(&self) -> &str { "void" }
//!     fn capabilities(&self) -> Capabilities { Capabilities::default() }
//!     async fn publish(&self, _to: &Destination, _events: &[Event]) -> evbus::Result<()> { Ok(()) }
//!     async fn consume(&self, _source: &Source) -> evbus::Result<RawStream> {
//!         Ok(kit::poll(std::time::Duration::from_millis(50), (), |()| async { Ok(None) }))
//!     }
//!     async fn delete(&self, _what: &Destination) -> evbus::Result<()> { Ok(()) }
//! }
//!
//! # async fn demo() -> evbus::Result<()> {
//! let transport = Connection::new(Void);
//! let topic = transport.topic("orders").await?;
//! topic.publish(&Event::builder("orderPlaced", "/shop").build()?).await?;
//! transport.close().await?;
//! let err = topic.publish(&Event::builder("orderPlaced", "/shop").build()?).await.unwrap_err();
//! assert_eq!(err.kind(), evbus::ErrorKind::Closed);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use url::Url;

use super::{ConfigKey, RawStream, Source};
use crate::binding::HeaderStyle;
use crate::capabilities::Capabilities;
use crate::delivery::{Acker, RawDelivery, Undecodable};
use crate::envelope::Event;
use crate::error::{Error, Result};
use crate::registry::Connector;
use crate::subscription::Subscription;
use crate::transport::{
    ConsumerOptions, Health, Queue, SubscribeOptions, Topic, Transport, check_encoded_len,
};

pub use crate::layer::Destination;

/// What an adapter implements on the short path: the broker's side only. [`Connection`]
/// makes it a [`Transport`]; see the [module docs](self) for who does what.
///
/// Every method, and every [`Acker`] method of the deliveries it yields, must end in bounded
/// time: [`Transport::close`] waits for the operations in progress before it calls
/// [`Broker::close`], so a call that never returns (a client retrying for ever against a
/// server that is gone) holds close up. Give each request a deadline (the client's timeout,
/// or `tokio::time::timeout`) and fail with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) when it passes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The adapter's short name (`sqlite-example`, `redis`).
    fn name(&self) -> &str;

    /// What this broker can do beyond the common contract. A declared
    /// [`max_payload_bytes`](Capabilities::max_payload_bytes) is enforced by core.
    fn capabilities(&self) -> Capabilities;

    /// Makes sure `to` (a topic, with `subscription: None`, or a queue) exists; called when
    /// the application asks for it. The default does nothing (destinations made on first
    /// publish or consume).
    async fn declare(&self, to: &Destination) -> Result<()> {
        let _ = to;
        Ok(())
    }

    /// Stores `events` (one or more, in order) in `to` (a topic, with `subscription: None`,
    /// or a queue); returns `Ok` only once the broker accepted all of them.
    async fn publish(&self, to: &Destination, events: &[Event]) -> Result<()>;

    /// Starts a consumer of `source` ([`Source::destination`]: the queue, or the topic with
    /// its subscription, created if needed) and returns its deliveries.
    async fn consume(&self, source: &Source) -> Result<RawStream>;

    /// Deletes what was made for the anonymous subscription `source` (its consumer is gone).
    /// Called once per anonymous subscription, also when its `consume` failed or was
    /// cancelled part way: what it names may never have been made, which is not an error.
    /// The default does nothing.
    async fn release(&self, source: &Source) -> Result<()> {
        let _ = source;
        Ok(())
    }

    /// Deletes a topic (with its subscriptions) or a queue, and their events. Deleting what
    /// does not exist is not an error.
    async fn delete(&self, what: &Destination) -> Result<()>;

    /// Whether the broker is reachable now. The default says [`Health::Healthy`];
    /// [`health_of`] turns the result of a cheap request into a `Health`.
    async fn health(&self) -> Health {
        Health::Healthy
    }

    /// Releases the connection. Called once, after every operation in progress finished.
    /// The default does nothing.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// A [`Broker`] made a [`Transport`]: handles, payload limit, subscriptions, release of
/// anonymous subscriptions and close, as the [module docs](self) describe. Cheap to clone
/// (clones share the connection).
pub struct Connection<B> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    broker: B,
    /// Cancelled by close: new operations fail, subscriptions end.
    closed: CancellationToken,
    /// Operations in progress; close waits for them.
    operations: TaskTracker,
    /// Set once close finished (a second close returns at once).
    closing: tokio::sync::Mutex<bool>,
    /// Anonymous subscriptions not released yet, by consumer number.
    anonymous: Mutex<HashMap<u64, Source>>,
    next_consumer: AtomicU64,
    /// How long close waits for operations in progress, then for releases.
    close_grace: Duration,
}

/// How long [`Transport::close`] of a [`Connection`] waits for the operations in progress,
/// and then for the releases of the anonymous subscriptions still open, before it closes the
/// broker anyway ([`Connection::with_close_grace`] sets another).
pub const CLOSE_GRACE: Duration = Duration::from_secs(30);

impl<B> Clone for Connection<B> {
    fn clone(&self) -> Self {
        Connection {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Broker> fmt::Debug for Connection<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("broker", &self.inner.broker.name())
            .field("closed", &self.inner.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<B: Broker> Connection<B> {
    /// Wraps `broker`.
    pub fn new(broker: B) -> Self {
        Self::with_close_grace(broker, CLOSE_GRACE)
    }

    /// [`new`](Self::new), with how long [`Transport::close`] waits for the operations in
    /// progress (and then for the releases of anonymous subscriptions) before it closes the
    /// broker anyway, logging what it left: a publish or settlement stuck on a broker that
    /// stopped answering must not hold a shutdown for ever. Default [`CLOSE_GRACE`].
    pub fn with_close_grace(broker: B, grace: Duration) -> Self {
        Connection {
            inner: Arc::new(Inner {
                broker,
                closed: CancellationToken::new(),
                operations: TaskTracker::new(),
                closing: tokio::sync::Mutex::new(false),
                anonymous: Mutex::new(HashMap::new()),
                next_consumer: AtomicU64::new(0),
                close_grace: grace,
            }),
        }
    }

    /// The broker.
    pub fn broker(&self) -> &B {
        &self.inner.broker
    }

    /// Whether [`close`](Transport::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Registers an operation (close waits for it), or fails with `Closed`.
    fn enter(&self) -> Result<TaskTrackerToken> {
        let token = self.inner.operations.token();
        if self.is_closed() {
            return Err(
                Error::closed(format!("the {} transport", self.inner.broker.name()))
                    .with_hint("open a new connection"),
            );
        }
        Ok(token)
    }

    async fn publish(&self, to: &Destination, events: &[Event]) -> Result<()> {
        let _operation = self.enter()?;
        let limit = self.inner.broker.capabilities().max_payload_bytes;
        for event in events {
            check_encoded_len(self.inner.broker.name(), limit, event)?;
        }
        if events.is_empty() {
            return Ok(());
        }
        self.inner.broker.publish(to, events).await
    }

    async fn consume(&self, source: Source) -> Result<Subscription> {
        let _operation = self.enter()?;
        let dead_letter = self.queue(source.dead_letter_queue()).await?;
        // Registered before it is made: a consume that fails or is cancelled part way (its
        // future dropped) releases what it may have made, which nothing else would.
        let release = source.is_anonymous().then(|| self.track(&source));
        let raw = self.inner.broker.consume(&source).await?;
        let mut settler = Settler {
            connection: self.clone(),
            last: None,
            _release: release,
        };
        let raw = raw
            .take_until(self.inner.closed.clone().cancelled_owned())
            .map(move |item| item.map(|delivery| settler.guard(delivery)));
        let closed = self.inner.closed.clone().cancelled_owned();
        Ok(source.into_subscription(raw, dead_letter, closed))
    }

    /// Keeps an anonymous subscription's source until its consumer goes away.
    fn track(&self, source: &Source) -> Release<B> {
        let id = self.inner.next_consumer.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.anonymous).insert(id, source.clone());
        Release {
            connection: self.clone(),
            id,
        }
    }

    fn handle(&self, to: Destination) -> Arc<Handle<B>> {
        Arc::new(Handle {
            connection: self.clone(),
            to,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl<B: Broker> Transport for Connection<B> {
    fn name(&self) -> &str {
        self.inner.broker.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.broker.capabilities()
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let _operation = self.enter()?;
        super::check_destination_name(name)?;
        let to = Destination::Topic {
            topic: name.to_owned(),
            subscription: None,
        };
        self.inner.broker.declare(&to).await?;
        Ok(self.handle(to))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        let _operation = self.enter()?;
        super::check_destination_name(name)?;
        let to = Destination::Queue(name.to_owned());
        self.inner.broker.declare(&to).await?;
        Ok(self.handle(to))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        let _operation = self.enter()?;
        super::check_destination_name(name)?;
        let what = Destination::Topic {
            topic: name.to_owned(),
            subscription: None,
        };
        self.inner.broker.delete(&what).await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let _operation = self.enter()?;
        super::check_destination_name(name)?;
        let what = Destination::Queue(name.to_owned());
        self.inner.broker.delete(&what).await
    }

    async fn health(&self) -> Health {
        match self.enter() {
            Ok(_operation) => self.inner.broker.health().await,
            Err(_) => Health::Closed,
        }
    }

    async fn close(&self) -> Result<()> {
        let mut done = self.inner.closing.lock().await;
        if *done {
            return Ok(());
        }
        self.inner.closed.cancel();
        self.inner.operations.close();
        let grace = self.inner.close_grace;
        if tokio::time::timeout(grace, self.inner.operations.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                broker = self.inner.broker.name(),
                left = self.inner.operations.len(),
                "operations still running {grace:?} after close began (a broker that stopped \
                 answering?); closing the broker without them"
            );
        }
        let open: Vec<Source> = lock(&self.inner.anonymous)
            .drain()
            .map(|(_, s)| s)
            .collect();
        let releases = async {
            for source in &open {
                if let Err(e) = self.inner.broker.release(source).await {
                    tracing::warn!(error = %e, origin = source.origin(), "could not release an anonymous subscription at close");
                }
            }
        };
        if tokio::time::timeout(grace, releases).await.is_err() {
            tracing::warn!(
                broker = self.inner.broker.name(),
                "releasing the anonymous subscriptions took over {grace:?} at close; the \
                 broker is closed without the rest"
            );
        }
        *done = true;
        self.inner.broker.close().await
    }
}

/// Releases an anonymous subscription when its consumer's stream is dropped.
struct Release<B: Broker> {
    connection: Connection<B>,
    id: u64,
}

impl<B: Broker> Drop for Release<B> {
    fn drop(&mut self) {
        let inner = &self.connection.inner;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // left for close
        };
        let mut open = lock(&inner.anonymous);
        // Taken before looking at `closed`, so that a close that starts now waits for it.
        let operation = inner.operations.token();
        if inner.closed.is_cancelled() {
            return; // close releases it (or already did)
        }
        let Some(source) = open.remove(&self.id) else {
            return;
        };
        drop(open);
        let connection = self.connection.clone();
        runtime.spawn(async move {
            let _operation = operation;
            if let Err(e) = connection.inner.broker.release(&source).await {
                tracing::warn!(error = %e, origin = source.origin(), "could not release an anonymous subscription");
            }
        });
    }
}

/// Puts every delivery's settlements behind the connection's close.
struct Settler<B: Broker> {
    connection: Connection<B>,
    /// The last acker seen and its guard: adapters with one acker per consumer get one guard.
    /// Weak, so that an adapter's acker made for one delivery is dropped with that delivery
    /// (one that releases something on drop does so then, not when the subscription ends);
    /// the weak reference also keeps its allocation, so no later acker can take its address.
    last: Option<(Weak<dyn Acker>, Weak<dyn Acker>)>,
    _release: Option<Release<B>>,
}

impl<B: Broker> Settler<B> {
    fn guard(&mut self, delivery: RawDelivery) -> RawDelivery {
        let acker = delivery.acker();
        let reused = self
            .last
            .as_ref()
            .filter(|(seen, _)| std::ptr::addr_eq(seen.as_ptr(), Arc::as_ptr(acker)))
            .and_then(|(_, guard)| guard.upgrade());
        let guard = match reused {
            Some(guard) => guard,
            None => {
                let guard: Arc<dyn Acker> = Arc::new(Guarded {
                    acker: Arc::clone(acker),
                    connection: self.connection.clone(),
                });
                self.last = Some((Arc::downgrade(acker), Arc::downgrade(&guard)));
                guard
            }
        };
        let tag = delivery.tag();
        delivery.with_acker(guard, tag)
    }
}

/// An acker that refuses to settle after close, and that close waits for.
struct Guarded<B> {
    acker: Arc<dyn Acker>,
    connection: Connection<B>,
}

#[async_trait]
impl<B: Broker> Acker for Guarded<B> {
    async fn ack(&self, tag: u64) -> Result<()> {
        let _operation = self.connection.enter()?;
        self.acker.ack(tag).await
    }

    fn try_ack_now(&self, tag: u64) -> Option<Result<()>> {
        match self.connection.enter() {
            Ok(_operation) => self.acker.try_ack_now(tag),
            Err(e) => Some(Err(e)),
        }
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        let _operation = self.connection.enter()?;
        self.acker.nack(tag).await
    }

    fn native_delay(&self) -> bool {
        self.acker.native_delay()
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        let _operation = self.connection.enter()?;
        self.acker.nack_delayed(tag, delay).await
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        let _operation = self.connection.enter()?;
        self.acker.renew(tag).await
    }
}

/// A topic or queue handle of a [`Connection`].
struct Handle<B> {
    connection: Connection<B>,
    to: Destination,
}

impl<B> fmt::Debug for Handle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to)
    }
}

#[async_trait]
impl<B: Broker> Topic for Handle<B> {
    fn name(&self) -> &str {
        self.to.name()
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        let events = std::slice::from_ref(event);
        self.connection.publish(&self.to, events).await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        self.connection.publish(&self.to, events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let source = Source::topic(self.to.name(), &options)?;
        self.connection.consume(source).await
    }
}

#[async_trait]
impl<B: Broker> Queue for Handle<B> {
    fn name(&self) -> &str {
        self.to.name()
    }

    async fn send(&self, event: &Event) -> Result<()> {
        let events = std::slice::from_ref(event);
        self.connection.publish(&self.to, events).await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        self.connection.publish(&self.to, events).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let source = Source::queue(self.to.name(), &options)?;
        self.connection.consume(source).await
    }
}

/// A consumer stream for brokers that are asked for messages (a database, an HTTP API): calls
/// `fetch(state.clone())` each time core asks for a delivery (never ahead of it), and while
/// `fetch` finds nothing (`Ok(None)`) calls it again every `interval`. An error is passed on
/// to the consumer and the subscription goes on: the next call waits `interval` first, so a
/// broker that is down is not hammered, and the [`Bus`](crate::bus::Bus) logs a warning and
/// asks again after 100 ms. So return `Err` only for a failure that may pass, never on every
/// call for one that will not (see [`RawStream`]).
///
/// The stream never ends by itself. On the short path [`Connection`] ends the subscription,
/// and drops the stream, when it closes; a full-control adapter that uses `poll` ends it
/// itself (such as with `take_until` on its close signal).
///
/// ```
/// use std::time::Duration;
/// use evbus::raw::kit;
///
/// // state: whatever the fetch needs (a client, a partition id), cloned for each call
/// let raw = kit::poll(Duration::from_millis(20), 7_i64, |partition| async move {
///     let _ = partition; // look for a message of this partition
///     Ok(None)
/// });
/// # drop(raw);
/// ```
pub fn poll<S, F, Fut>(interval: Duration, state: S, fetch: F) -> RawStream
where
    S: Clone + Send + 'static,
    F: Fn(S) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<RawDelivery>>> + Send + 'static,
{
    let start = (state, fetch, false);
    futures::stream::unfold(start, move |(state, fetch, mut wait)| async move {
        loop {
            if wait {
                tokio::time::sleep(interval).await;
            }
            match fetch(state.clone()).await {
                Ok(Some(delivery)) => return Some((Ok(delivery), (state, fetch, false))),
                Ok(None) => wait = true,
                Err(e) => return Some((Err(e), (state, fetch, true))),
            }
        }
    })
    .boxed()
}

impl RawDelivery {
    /// A message stored in the CloudEvents JSON format: the event if `json` decodes,
    /// otherwise an [`undecodable`](RawDelivery::undecodable) message (read at `location`,
    /// with the broker id `tag`, the JSON kept as its body) that core dead-letters.
    ///
    /// ```
    /// use std::sync::Arc;
    /// # struct NoopAcker;
    /// # #[async_trait::async_trait]
    /// # impl evbus::raw::Acker for NoopAcker {
    /// #     async fn ack(&self, _: u64) -> evbus::Result<()> { Ok(()) }
    /// #     async fn nack(&self, _: u64) -> evbus::Result<()> { Ok(()) }
    /// # }
    /// use evbus::raw::RawDelivery;
    ///
    /// let raw = RawDelivery::from_json("{oops".into(), 1, Arc::new(NoopAcker), 17, "mydb:orders");
    /// assert!(raw.event().is_none());
    /// assert_eq!(raw.undecodable_message().unwrap().raw_body().as_ref(), b"{oops");
    /// ```
    pub fn from_json(
        json: String,
        attempt: u32,
        acker: Arc<dyn Acker>,
        tag: u64,
        location: &str,
    ) -> RawDelivery {
        match Event::from_json(&json) {
            Ok(event) => RawDelivery::new(event, attempt, acker, tag),
            Err(e) => {
                let message = Undecodable::new(e, location, tag.to_string()).body(json);
                RawDelivery::undecodable(message, attempt, acker, tag)
            }
        }
    }

    /// A message in CloudEvents binary mode (headers and body, mapped with `style`, see
    /// [`binding::decode`](crate::binding::decode)): the event if it decodes, otherwise an
    /// [`undecodable`](RawDelivery::undecodable) message (read at `location`, with the broker
    /// id `tag`, its headers and body kept) that core dead-letters.
    pub fn from_binding(
        headers: Vec<(String, String)>,
        body: Bytes,
        style: HeaderStyle,
        attempt: u32,
        acker: Arc<dyn Acker>,
        tag: u64,
        location: &str,
    ) -> RawDelivery {
        let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        match crate::binding::decode(pairs, body.clone(), style) {
            Ok(event) => RawDelivery::new(event, attempt, acker, tag),
            Err(e) => {
                let message = headers.into_iter().fold(
                    Undecodable::new(e, location, tag.to_string()).body(body),
                    |message, (name, value)| message.header(name, value),
                );
                RawDelivery::undecodable(message, attempt, acker, tag)
            }
        }
    }
}

impl Destination {
    /// The subscription of a topic consumer (for a consumer's [`Source::destination`], also
    /// the generated name of an anonymous one); `None` for a publish or a queue.
    pub fn subscription(&self) -> Option<&str> {
        match self {
            Destination::Topic { subscription, .. } => subscription.as_deref(),
            Destination::Queue(_) => None,
        }
    }
}

/// [`ConfigKey`] for adapters whose URLs take no parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoKeys {}

impl ConfigKey for NoKeys {
    const ADAPTER: &'static str = "this adapter";
    const ALL: &'static [Self] = &[];

    fn name(self) -> &'static str {
        match self {}
    }
}

/// Checks an adapter URL and reads its parameters: `url` must parse, have the scheme
/// `scheme`, pass `valid` (host, path, port: whatever the adapter requires) and carry only
/// parameters named by `K` ([`NoKeys`] for none). Anything else is an
/// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig): "`<url>` is not a
/// `<scheme>` URL: write `<form>`" (the password hidden), or the "valid keys are" error of
/// [`ConfigKey::parse`].
///
/// ```
/// use evbus::raw::kit::{self, NoKeys};
///
/// let form = "mydb:///path/to/file";
/// let has_path = |url: &url::Url| url.path().len() > 1;
/// let (url, params) = kit::parse_url::<NoKeys>("mydb:///tmp/x", "mydb", form, has_path)?;
/// assert_eq!((url.path(), params.len()), ("/tmp/x", 0));
/// let err = kit::parse_url::<NoKeys>("mydb://", "mydb", form, has_path).unwrap_err();
/// assert!(err.message().ends_with("write mydb:///path/to/file"), "{err}");
/// let err = kit::parse_url::<NoKeys>("mydb:///x?mode=rw", "mydb", form, has_path).unwrap_err();
/// assert_eq!(err.message(), "mydb URLs take no parameters; remove `mode`");
/// # Ok::<(), evbus::Error>(())
/// ```
pub fn parse_url<K: ConfigKey>(
    url: &str,
    scheme: &str,
    form: &str,
    valid: impl FnOnce(&Url) -> bool,
) -> Result<(Url, Vec<(K, String)>)> {
    let bad = || {
        let url = crate::registry::redact(url);
        let url = if url.starts_with('<') {
            "the URL"
        } else {
            &url
        };
        Error::invalid_config(format!("`{url}` is not a {scheme} URL: write {form}"))
    };
    let parsed = Url::parse(url).map_err(|_| bad())?;
    if parsed.scheme() != scheme || !valid(&parsed) {
        return Err(bad());
    }
    if K::ALL.is_empty() && parsed.query().is_some() {
        // Named (never its value, which may be a secret), so the user sees what to remove.
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(key, _)| format!("`{key}`"))
            .collect();
        return Err(Error::invalid_config(format!(
            "{scheme} URLs take no parameters; remove {}",
            if names.is_empty() {
                "the `?`".to_owned()
            } else {
                names.join(", ")
            }
        )));
    }
    let params = parsed
        .query_pairs()
        .map(|(key, value)| Ok((K::parse(&key)?, value.into_owned())))
        .collect::<Result<_>>()?;
    Ok((parsed, params))
}

/// [`Health::Healthy`] if a cheap request (`SELECT 1`, `PING`) succeeded, otherwise
/// [`Health::Unhealthy`] with the error.
pub fn health_of(result: Result<()>) -> Health {
    match result {
        Ok(()) => Health::Healthy,
        Err(e) => Health::Unhealthy(e.to_string()),
    }
}

/// A [`Connector`] from a function: opens `schemes` URLs with `connect(url)`.
///
/// ```
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::empty();
/// registry.register(evbus::raw::kit::connector(&["mem"], |_url| async {
///     Ok(evbus::memory::MemoryBroker::new(Default::default()).connect())
/// }));
/// assert_eq!(registry.connect("mem://").await?.name(), "memory");
/// // A cluster's other hosts reach `connect` in the parameter named here.
/// let mut clusters = evbus::Registry::empty();
/// clusters.register(
///     evbus::raw::kit::connector(&["mem"], |url| async move {
///         assert_eq!(url.query(), Some("servers=h2:2"));
///         Ok(evbus::memory::MemoryBroker::new(Default::default()).connect())
///     })
///     .more_hosts("servers"),
/// );
/// assert_eq!(clusters.connect("mem://h1:1,h2:2").await?.name(), "memory");
/// # Ok(()) }
/// ```
pub fn connector<F, Fut, T>(schemes: &'static [&'static str], connect: F) -> FnConnector<F, T>
where
    F: Fn(Url) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Transport + 'static,
{
    FnConnector {
        schemes,
        connect,
        more_hosts: None,
        transport: PhantomData,
    }
}

/// The [`Connector`] made by [`connector`].
pub struct FnConnector<F, T> {
    schemes: &'static [&'static str],
    connect: F,
    more_hosts: Option<&'static str>,
    transport: PhantomData<fn() -> T>,
}

impl<F, T> FnConnector<F, T> {
    /// Names the query parameter that takes a cluster's other hosts
    /// ([`Connector::more_hosts_parameter`]).
    pub fn more_hosts(mut self, parameter: &'static str) -> Self {
        self.more_hosts = Some(parameter);
        self
    }
}

impl<F, T> fmt::Debug for FnConnector<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnConnector")
            .field("schemes", &self.schemes)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<F, Fut, T> Connector for FnConnector<F, T>
where
    F: Fn(Url) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Transport + 'static,
{
    fn schemes(&self) -> &'static [&'static str] {
        self.schemes
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new((self.connect)(url.clone()).await?))
    }

    fn more_hosts_parameter(&self) -> Option<&'static str> {
        self.more_hosts
    }
}

#[cfg(test)]
mod tests;
