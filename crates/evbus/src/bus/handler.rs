//! Handlers: `on(type, group, handler)`, their consume loop, retries and drain.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, ready};
use std::time::Duration;

use async_channel::{Receiver, Sender};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Bus, RetryPolicy, lock, telemetry};
use crate::delivery::{Delivery, Settlement, dead_letter_event};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::EventType;
use crate::signal::{Limit, LimitPermit, Signal};
use crate::transport::{ConsumerOptions, Queue, StartPosition, SubscribeOptions};

/// While the topic keeps events ready, a handler also looks at its redrive queue once every
/// this many events.
const REDRIVE_EVERY: u32 = 16;

/// Events a handler runs at once per instance unless configured otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// How long a handler instance may hold an event before the broker hands it to another
/// instance (one that crashed never settles), unless configured otherwise: 30 s.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a handler returns on failure: any error. It is retried per the [`RetryPolicy`] and
/// its `Display` becomes the dead-letter reason after the last attempt.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One event handed to a handler, with its delivery context. Derefs to the [`Event`].
#[derive(Clone, Debug)]
pub struct Message {
    event: Event,
    attempt: u32,
    max_attempts: u32,
    group: Arc<str>,
    /// The data as validation parsed it, for a typed handler (see [`Handler::typed`]).
    parsed: Option<serde_json::Value>,
}

impl Message {
    /// The event (validated against the catalogue).
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The event, owned.
    pub fn into_event(self) -> Event {
        self.event
    }

    /// This attempt's number: 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed before the event is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a failure now sends the event to the dead-letter queue.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// The handler's group.
    pub fn group(&self) -> &str {
        &self.group
    }
}

impl Deref for Message {
    type Target = Event;
    fn deref(&self) -> &Event {
        &self.event
    }
}

/// A typed handler's value: deserialised from the data validation on consume parsed when
/// there is one (its strings are moved, not copied or scanned again), from the bytes
/// otherwise. The few types that read only from bytes (`serde_json::value::RawValue`, integers
/// beyond 64 bits) fail on the parsed data and are read from the bytes, which also decide the
/// error of data that does not deserialise.
fn typed_data<T: DeserializeOwned>(msg: &mut Message) -> Result<T> {
    if let Some(parsed) = msg.parsed.take()
        && let Ok(value) = serde_json::from_value(parsed)
    {
        return Ok(value);
    }
    msg.event.json::<T>()
}

/// Why one run of a handler did not succeed.
enum Failure {
    /// The handler failed: retry, then dead-letter with this error.
    Retry(String),
    /// The event can never succeed (its data does not deserialise): dead-letter now.
    Reject(String),
}

type DynHandler = Arc<dyn Fn(Message) -> BoxFuture<'static, Result<(), Failure>> + Send + Sync>;

/// A handler as the worker runs it.
struct Handler {
    run: DynHandler,
    /// Whether it deserialises the data ([`Bus::on_typed`]): it is then handed the data as
    /// validation on consume parsed it ([`Message::parsed`]), instead of parsing the bytes a
    /// second time. Other handlers drop that parse at once.
    typed: bool,
}

/// Called with each event a handler dead-letters and the reason (see
/// [`HandlerBuilder::on_dead_letter`]).
type DeadLetterHook = crate::subscription::DeadLetterHook;

impl Bus {
    /// Attaches a raw handler for event type `ty` in `group`; returns a [`HandlerBuilder`]
    /// to configure, then [`start`](HandlerBuilder::start).
    ///
    /// The handler gets a [`Message`] (the validated [`Event`] and its attempt number) and
    /// returns `Ok(())` to acknowledge or an error to retry.
    pub fn on<F, Fut>(
        &self,
        ty: impl Into<String>,
        group: impl Into<String>,
        handler: F,
    ) -> HandlerBuilder
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler: DynHandler = Arc::new(move |msg| {
            let fut = handler(msg);
            async move { fut.await.map_err(|e| Failure::Retry(e.to_string())) }.boxed()
        });
        self.handler_builder(
            ty.into(),
            group.into(),
            Handler {
                run: handler,
                typed: false,
            },
        )
    }

    /// Attaches a typed handler for the Rust event type `T` (`T::TYPE`) in `group`: the data
    /// is deserialised into `T` first; an event whose data does not deserialise is
    /// dead-lettered with the reason, without running the handler.
    ///
    /// When the catalogue validated the event on consume, `T` is deserialised from the data
    /// as validation parsed it (strings are moved out, not parsed a second time), so the
    /// handler gets exactly what was checked: of duplicate keys, the last, as the validator
    /// read it. Values that parsed data cannot hold exactly (integers beyond 64 bits) are read
    /// from the bytes. A `serde_json::value::RawValue` field holds the same JSON value, written
    /// anew (compact, numbers and escapes normalised); for the producer's exact bytes read
    /// the event's [`data`](crate::Event::data) (`Message` derefs to the event).
    pub fn on_typed<T, F, Fut>(&self, group: impl Into<String>, handler: F) -> HandlerBuilder
    where
        T: EventType + DeserializeOwned + Send + 'static,
        F: Fn(T, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let dyn_handler: DynHandler = Arc::new(move |mut msg: Message| {
            let value = typed_data::<T>(&mut msg);
            let handler = Arc::clone(&handler);
            async move {
                let value = value.map_err(|e| {
                    Failure::Reject(format!(
                        "the data does not deserialise into {}: {}",
                        std::any::type_name::<T>(),
                        e.message()
                    ))
                })?;
                handler(value, msg)
                    .await
                    .map_err(|e| Failure::Retry(e.to_string()))
            }
            .boxed()
        });
        self.handler_builder(
            T::TYPE.to_owned(),
            group.into(),
            Handler {
                run: dyn_handler,
                typed: true,
            },
        )
    }

    fn handler_builder(&self, ty: String, group: String, handler: Handler) -> HandlerBuilder {
        let d = &self.inner.defaults;
        HandlerBuilder {
            bus: self.clone(),
            ty,
            group,
            handler,
            retry: d.retry.clone(),
            concurrency: d.concurrency,
            prefetch: d.prefetch,
            ordered: d.ordered,
            visibility_timeout: d.visibility_timeout,
            start: StartPosition::Latest,
            on_dead_letter: None,
        }
    }
}

/// Configures a handler before it starts (see [`Bus::on`]).
#[must_use = "a handler does nothing until started"]
pub struct HandlerBuilder {
    bus: Bus,
    ty: String,
    group: String,
    handler: Handler,
    retry: RetryPolicy,
    concurrency: usize,
    /// `None`: as many as the concurrency.
    prefetch: Option<usize>,
    ordered: bool,
    visibility_timeout: Duration,
    start: StartPosition,
    on_dead_letter: Option<DeadLetterHook>,
}

impl fmt::Debug for HandlerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerBuilder")
            .field("type", &self.ty)
            .field("group", &self.group)
            .field("retry", &self.retry)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.ahead())
            .field("ordered", &self.ordered)
            .finish_non_exhaustive()
    }
}

impl HandlerBuilder {
    /// The retry policy (default: the bus's, [`RetryPolicy::default`] unless set).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Shorthand for the retry policy's [`max_attempts`](RetryPolicy::max_attempts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.retry = self.retry.max_attempts(n);
        self
    }

    /// Most events run at once by this instance (default [`DEFAULT_CONCURRENCY`]; at least
    /// 1). The transport's in-flight limit is this plus the [`prefetch`](Self::prefetch).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Events this instance may hold beyond the ones running (default: as many as the
    /// [`concurrency`](Self::concurrency)). While every slot is busy the transport fetches
    /// these ahead, so the next event is at hand when a run ends instead of a round trip
    /// later. A fetched event waits for a free slot in the transport, which renews its
    /// visibility timeout while the handler takes deliveries at least once a timeout (ADR
    /// 0037), so however long the wait (about `prefetch / concurrency` runs) it runs once, in
    /// order. Keep each run (for an ordered handler, with its retries in place and their
    /// backoffs) under half the [`visibility_timeout`](Self::visibility_timeout): the handler
    /// logs a warning when one is not, as a run is not renewed, and while every slot is held
    /// past a whole timeout the transport stops renewing and fetched events come back as
    /// redeliveries (run twice; for an ordered handler, out of order). A third-party
    /// transport that does not renew what it fetched ahead fails the conformance case
    /// `queue_events_fetched_ahead_wait_for_a_consumer_in_use_past_the_visibility_timeout`;
    /// with one, keep `prefetch / concurrency` runs under half the timeout. Set 0 to fetch
    /// only for free slots.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// The prefetch in effect.
    fn ahead(&self) -> usize {
        self.prefetch.unwrap_or(self.concurrency)
    }

    /// Keeps per-key order: events with the same partition key never run concurrently nor out
    /// of order; a failing event is retried in place (after its backoff) before the next
    /// event of its key runs. Events without a key are not ordered.
    ///
    /// The broker counts deliveries, not runs: an event whose retries in place are cut
    /// short (the process stops, or the visibility timeout passes) comes back as its next
    /// delivery, and the runs made in place are not counted again. Such an event can run
    /// more times than the [`RetryPolicy`]'s `max_attempts` before it is dead-lettered.
    ///
    /// The handler takes a delivery when one of its [`concurrency`](Self::concurrency) slots
    /// is free. An event whose key is busy gives its slot back and waits in the key's lane,
    /// taking a slot again when its turn comes: events of one key wait for each other
    /// without holding slots, so other keys run meanwhile, as far as the in-flight limit
    /// (concurrency plus [`prefetch`](Self::prefetch)) lets them be taken (with
    /// `prefetch(0)`, one busy key can still take every place; events fetched ahead of the
    /// slots wait in the transport, which renews them, as the prefetch says). While they wait
    /// the handler renews their visibility timeouts (every third of
    /// [`visibility_timeout`](Self::visibility_timeout), and once more as each starts), so a
    /// key's backlog may take longer than one timeout: each event still runs once, in
    /// order. If this process dies, they come back a timeout after the last renewal. On a
    /// transport that cannot renew (a third-party adapter without
    /// [`Acker::renew`](crate::raw::Acker::renew)), an event that waits past its timeout is
    /// delivered again, and that copy runs after later events of its key (order broken) with
    /// another attempt counted; the handler then logs a warning, once, when an event waited
    /// over half of it.
    ///
    /// The running event itself is not renewed: keep one run of a key, with its retries in
    /// place, under the timeout. A run that goes on past it may hang: its event is delivered
    /// again, and the handler stops renewing the events waiting behind it (and warns, once),
    /// so they come back too and another instance can run them; when the long run ends, the
    /// events that timed out behind it are not run here (their redeliveries are).
    pub fn ordered_by_key(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// How long this instance may hold an event before the broker gives it to another
    /// (default [`DEFAULT_VISIBILITY_TIMEOUT`]). Keep it above the longest handler run (and,
    /// for ordered handlers, above the sum of their in-place backoffs); with a
    /// [`prefetch`](Self::prefetch), above twice the usual run, as a fetched event waits
    /// for a slot with its timeout running.
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// Where the group's subscription starts when it is created by this handler (default
    /// [`StartPosition::Latest`]; an existing subscription resumes where it stopped).
    pub fn start_position(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Calls `hook` with each event this handler sends to the dead-letter queue, and the
    /// reason stored with it, once the dead letter is stored (for a command-line consumer
    /// that reports them as they happen, or an alert). That includes the messages its
    /// subscription moves aside by itself: one that is not a CloudEvent (`hook` gets the
    /// placeholder record, type `evbus.undecodable`) and one delivered more than
    /// `max_attempts` times. The hook runs on the consume path: keep it short and never
    /// block in it.
    pub fn on_dead_letter(mut self, hook: impl Fn(&Event, &str) + Send + Sync + 'static) -> Self {
        self.on_dead_letter = Some(Arc::new(hook));
        self
    }

    /// Subscribes and starts consuming. Returns once the subscription exists, so every event
    /// emitted afterwards reaches the group.
    ///
    /// A type the catalogue does not know fails with
    /// [`ErrorKind::Validation`](crate::ErrorKind::Validation) when the catalogue is strict.
    pub async fn start(self) -> Result<HandlerHandle> {
        let prefetch = self.ahead();
        let bus = self.bus;
        bus.ensure_open()?;
        let catalog = &bus.inner.catalog;
        if catalog.is_strict() && !catalog.contains(&self.ty) {
            return Err(crate::schema::ValidationErrors::unknown_type(
                &self.ty,
                catalog.type_names(),
            )
            .into());
        }
        let topic_name = bus.topic_name(&self.ty);
        let subscription = bus.subscription_name(&self.ty, &self.group);
        let dlq_name = bus.dead_letter_queue_name(&self.ty, &self.group);
        let redrive_name = bus.redrive_queue_name(&self.ty, &self.group);
        let consumer = ConsumerOptions::default()
            .max_in_flight(self.concurrency.saturating_add(prefetch))
            .max_attempts(self.retry.max_attempts)
            .visibility_timeout(self.visibility_timeout)
            .dead_letter_queue(dlq_name.clone());
        let transport = Arc::clone(&bus.inner.transport);
        let topic = bus.topic(&topic_name).await?;
        // One after the other: opening both at once made a Redis webhook delivery test of
        // the gateway miss its first event about half the time (not yet explained).
        let mut from_topic = topic
            .subscribe(
                SubscribeOptions::named(subscription.clone())
                    .start(self.start)
                    .consumer(consumer.clone()),
            )
            .await?;
        let mut from_redrive = transport
            .queue(&redrive_name)
            .await?
            .receive(consumer.clone())
            .await?;
        // Messages the subscriptions dead-letter by themselves (not CloudEvents, delivered
        // too often) are this handler's dead letters too.
        if let Some(hook) = &self.on_dead_letter {
            from_topic = from_topic.on_dead_letter(Arc::clone(hook));
            from_redrive = from_redrive.on_dead_letter(Arc::clone(hook));
        }
        let dead_letter = transport.queue(&dlq_name).await?;

        let shared = Arc::new(Shared {
            ty: self.ty.clone(),
            group: Arc::from(self.group.as_str()),
            topic: topic_name,
            subscription,
            dead_letter_queue: dlq_name,
            redrive_queue: redrive_name,
            running: AtomicBool::new(true),
            cancel: CancellationToken::new(),
            deadline: Mutex::new(None),
            report: watch::channel(None).0,
        });
        let worker = Worker {
            shared: Arc::clone(&shared),
            bus: bus.clone(),
            handler: self.handler,
            retry: self.retry,
            ordered: self.ordered,
            visibility_timeout: self.visibility_timeout,
            dead_letter,
            metrics: telemetry::HandlerMetrics::new(&self.ty, &self.group),
            lane_warned: AtomicBool::new(false),
            renews: AtomicBool::new(true),
            slow_runs: (prefetch > 0).then(|| SlowRuns {
                half_visibility: self.visibility_timeout / 2,
                warned: AtomicBool::new(false),
            }),
            in_flight: Mutex::new(HashMap::default()),
            next_id: AtomicU64::new(0),
            lanes: Mutex::new(HashMap::new()),
            hang_warned: AtomicBool::new(false),
            on_dead_letter: self.on_dead_letter,
        };
        // The topic first: the redrive queue is empty nearly always, and polling it between
        // any two events cost more than taking the event. It is still looked at whenever the
        // topic has nothing ready, and every `REDRIVE_EVERY`-th event when the topic never
        // runs dry, so a redrive waits for no backlog.
        let stream = Deliveries {
            topic: from_topic,
            redrive: from_redrive,
            taken: 0,
            redrive_ended: false,
        };
        tokio::spawn(Arc::new(worker).run(stream, self.concurrency));
        let handle = HandlerHandle { shared };
        bus.register_handler(handle.clone());
        Ok(handle)
    }
}

/// A handler's deliveries: its subscription's first, its redrive queue's whenever the
/// subscription has nothing ready and first on every `REDRIVE_EVERY`-th look (the redrive
/// queue is empty nearly always, and looking at it ahead of every event cost more than the
/// event; this way a redrive waits for no backlog). The stream ends with the subscription (its
/// topic deleted, its transport closed: ADR 0031), whatever the redrive queue does.
struct Deliveries<T, R> {
    topic: T,
    redrive: R,
    taken: u32,
    redrive_ended: bool,
}

impl<T, R> Deliveries<T, R>
where
    R: futures::Stream<Item = Result<Delivery>> + Unpin,
{
    fn poll_redrive(&mut self, cx: &mut std::task::Context<'_>) -> Option<Result<Delivery>> {
        if self.redrive_ended {
            return None;
        }
        match self.redrive.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => Some(item),
            Poll::Ready(None) => {
                self.redrive_ended = true;
                None
            }
            Poll::Pending => None,
        }
    }
}

impl<T, R> futures::Stream for Deliveries<T, R>
where
    T: futures::Stream<Item = Result<Delivery>> + Unpin,
    R: futures::Stream<Item = Result<Delivery>> + Unpin,
{
    type Item = Result<Delivery>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.taken = this.taken.wrapping_add(1);
        let redrive_first = this.taken.is_multiple_of(REDRIVE_EVERY);
        if redrive_first && let Some(item) = this.poll_redrive(cx) {
            return Poll::Ready(Some(item));
        }
        if let Poll::Ready(item) = this.topic.poll_next_unpin(cx) {
            return Poll::Ready(item);
        }
        if !redrive_first && let Some(item) = this.poll_redrive(cx) {
            return Poll::Ready(Some(item));
        }
        Poll::Pending
    }
}

struct Shared {
    ty: String,
    group: Arc<str>,
    topic: String,
    subscription: String,
    dead_letter_queue: String,
    redrive_queue: String,
    running: AtomicBool,
    cancel: CancellationToken,
    deadline: Mutex<Option<Instant>>,
    report: watch::Sender<Option<DrainReport>>,
}

/// A running handler: where it consumes, and how to stop it.
#[derive(Clone)]
pub struct HandlerHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for HandlerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerHandle")
            .field("type", &self.shared.ty)
            .field("group", &self.shared.group)
            .field("topic", &self.shared.topic)
            .field("subscription", &self.shared.subscription)
            .field("running", &self.is_running())
            .finish()
    }
}

/// How a handler's drain ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Deliveries still running or queued at the deadline, nacked for redelivery (or left
    /// to their visibility timeout when they were on their last attempt).
    pub interrupted: usize,
}

impl HandlerHandle {
    /// The event type handled.
    pub fn event_type(&self) -> &str {
        &self.shared.ty
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The subscription of the topic consumed (see [`Bus::subscription_name`]).
    pub fn subscription(&self) -> &str {
        &self.shared.subscription
    }

    /// The dead-letter queue of this handler's group.
    pub fn dead_letter_queue(&self) -> &str {
        &self.shared.dead_letter_queue
    }

    /// The redrive queue of this handler's group.
    pub fn redrive_queue(&self) -> &str {
        &self.shared.redrive_queue
    }

    /// Whether the handler still consumes: false once it was shut down, or once its
    /// subscription ended (its topic deleted, its transport closed) and its runs finished.
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::Acquire)
    }

    /// Stops taking deliveries, lets running handlers finish for at most `deadline`, nacks
    /// what is still running or queued then, and returns once the handler has stopped.
    pub async fn shutdown(&self, deadline: Duration) -> DrainReport {
        self.shutdown_until(Instant::now() + deadline).await
    }

    pub(super) async fn shutdown_until(&self, deadline: Instant) -> DrainReport {
        {
            let mut d = lock(&self.shared.deadline);
            *d = Some(d.map_or(deadline, |old| old.min(deadline)));
        }
        self.shared.cancel.cancel();
        let mut rx = self.shared.report.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(report) => report.unwrap_or_default(),
            Err(_) => DrainReport::default(),
        }
    }
}

/// One delivery taken by the worker, until it is done.
struct Taken {
    id: u64,
    delivery: Arc<Delivery>,
    /// When it was queued in a lane (an ordered handler), if it was.
    queued: Option<std::time::Instant>,
    /// One of the handler's `concurrency` slots while it runs, given back when the delivery
    /// is done.
    slot: Slot,
}

/// A run's concurrency slot, given back when dropped.
enum Slot {
    /// An unordered handler's: taken by the worker before it takes the delivery (one taker,
    /// no lock: the hot path).
    Worker(#[allow(dead_code)] LimitPermit),
    /// An ordered handler's: taken by the worker before it takes a delivery, given back when
    /// the delivery has to wait behind its key, and taken again by the key's lane when its
    /// turn comes (several takers: a semaphore). Waiting events hold no slot.
    Lane(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// Waiting in a lane: no slot yet.
    Waiting,
}

/// Which lane an ordered handler's event waits in: its partition key's, or one of its own
/// for an event without a key (not ordered, but it waits for a slot in a lane too, renewed).
#[derive(Clone, PartialEq, Eq, Hash)]
enum LaneKey {
    /// Shared: the map's key and the task running the lane each hold it.
    Key(Arc<str>),
    Alone(u64),
}

/// One lane of an ordered handler: the events not started yet, in arrival order, and when
/// the one running started, if one is.
#[derive(Default)]
struct Lane {
    waiting: VecDeque<Taken>,
    running_since: Option<std::time::Instant>,
}

/// What [`Worker::admit`] decided about an event before its run.
enum Admission {
    /// Run it, in this span, with this data already parsed (for a typed handler).
    Run(tracing::Span, Option<serde_json::Value>),
    /// Of another type sharing the topic: acked unseen.
    Skip,
    /// Misrouted or invalid: dead-lettered with `reason`, counted under `cause`.
    Reject { reason: String, cause: &'static str },
}

/// The tasks that run a handler's unordered events on a multi-threaded runtime, and an
/// ordered handler's lanes. A task lives as long as the worker and takes one job after
/// another from a channel: a hand-over costs about half of spawning a task per event
/// (benches/notes.md, "What the Bus adds to a Redis consume"); for an ordered handler, whose
/// events of many keys nearly all start a lane of their own, it saved 3,000 of 17,300
/// instructions per event ("A run's future, and an ordered handler's lanes"). A task is added when a job finds none idle: an unordered handler has never
/// more than its concurrency, an ordered one never more than its lanes at their most (each
/// holds at least one event taken).
struct Pool {
    jobs: Sender<Job>,
    receiver: Receiver<Job>,
    /// Tasks waiting for a job that none has been handed yet.
    idle: Arc<AtomicUsize>,
}

/// A pool task's job.
enum Job {
    /// An unordered handler's event.
    Event(Taken),
    /// An ordered handler's new lane: its key, its first event (with its slot) and the
    /// handler's slots, which its later events take one at a time.
    Lane(LaneKey, Taken, Arc<tokio::sync::Semaphore>),
}

impl Pool {
    fn new() -> Self {
        let (jobs, receiver) = async_channel::unbounded();
        Self {
            jobs,
            receiver,
            idle: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Hands `job` to an idle task, or to a new one.
    fn run(&mut self, job: Job, worker: &Arc<Worker>, tasks: &mut JoinSet<()>) {
        let promised = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let job = if promised {
            // Unbounded, and open while the pool holds a receiver: it never fails.
            match self.jobs.try_send(job) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            }
        } else {
            job
        };
        let worker = Arc::clone(worker);
        tasks.spawn(worker.pooled(job, self.receiver.clone(), Arc::clone(&self.idle)));
    }
}

/// Watches a prefetching handler's run times: a run is not renewed, and the transport keeps
/// renewing the events it fetched ahead only while the handler takes a delivery at least once
/// a timeout (ADR 0037), so runs over half the visibility timeout put both at risk.
struct SlowRuns {
    half_visibility: Duration,
    /// Warned once per handler instance.
    warned: AtomicBool,
}

impl SlowRuns {
    fn ran_for(&self, run: Duration, ty: &str, group: &str) {
        if run > self.half_visibility && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                event_type = ty,
                group,
                run = ?run,
                visibility_timeout = ?(self.half_visibility * 2),
                "a handler run (with its retries in place, for an ordered handler) took over \
                 half the visibility timeout: the run itself is not renewed, and once every \
                 slot is held past a whole timeout the transport stops renewing the events \
                 fetched ahead, which then come back as redeliveries (run twice, with another \
                 attempt counted; for an ordered handler, out of order); raise the visibility \
                 timeout or set prefetch(0)"
            );
        }
    }
}

/// Polls `run` once, in place, in `spare`'s box when there is one: a run that completes in
/// its first poll (nearly all of them) leaves its box to the next, so the box is allocated
/// once, not per run. A run that has to wait is returned, box and all, for the caller to give
/// it a task of its own; the next run gets a new box.
async fn poll_in_place<F: Future<Output = ()>>(
    spare: &mut Option<Pin<Box<F>>>,
    run: F,
) -> Option<Pin<Box<F>>> {
    let mut boxed = match spare.take() {
        Some(mut boxed) => {
            boxed.set(run);
            boxed
        }
        None => Box::pin(run),
    };
    let polled = std::future::poll_fn(|cx| Poll::Ready(boxed.as_mut().poll(cx))).await;
    if polled.is_pending() {
        return Some(boxed);
    }
    *spare = Some(boxed);
    None
}

/// Counts one event handled in place in `count`: handled inline, events never make the
/// worker wait for a free slot, so it lets the other tasks (the other instances of the group
/// among them) run after as many events (`every`, the concurrency) as it would take before
/// its spawned handlers ran.
async fn yield_after(count: &mut usize, every: usize) {
    *count += 1;
    if *count >= every {
        *count = 0;
        tokio::task::yield_now().await;
    }
}

/// Most renewals of waiting deliveries in flight at once (see [`Worker::renew_lanes`]).
const RENEWALS_AT_ONCE: usize = 32;

struct Worker {
    shared: Arc<Shared>,
    bus: Bus,
    handler: Handler,
    retry: RetryPolicy,
    ordered: bool,
    /// How long a run may go on after the subscription ended by itself: its delivery cannot
    /// be settled any later.
    visibility_timeout: Duration,
    dead_letter: Arc<dyn Queue>,
    metrics: telemetry::HandlerMetrics,
    /// `None` without prefetch.
    slow_runs: Option<SlowRuns>,
    /// Whether [`waited_in_lane`](Self::waited_in_lane) warned (once per handler).
    lane_warned: AtomicBool,
    /// Whether the transport renews visibility timeouts (see
    /// [`renew_lanes`](Self::renew_lanes)); `false` once it said it cannot.
    renews: AtomicBool,
    /// Every delivery taken and not yet done (running or waiting in a lane), for the drain.
    in_flight: Mutex<FxHashMap<u64, Arc<Delivery>>>,
    next_id: AtomicU64,
    /// An ordered handler's lanes: per key, the deliveries not started yet and when the
    /// running one started.
    lanes: Mutex<HashMap<LaneKey, Lane>>,
    /// Whether [`renew_lanes`](Self::renew_lanes) warned of a run gone on past the
    /// visibility timeout (once per handler).
    hang_warned: AtomicBool,
    on_dead_letter: Option<DeadLetterHook>,
}

impl Worker {
    async fn run(
        self: Arc<Self>,
        mut stream: impl futures::Stream<Item = Result<Delivery>> + Unpin + Send,
        concurrency: usize,
    ) {
        let mut cancel = Signal::new(self.shared.cancel.clone().cancelled_owned());
        // The worker is the slots' only taker; a slot comes back when its delivery is done,
        // on whichever task that is, without a lock.
        let slots = Arc::new(Limit::new(concurrency));
        // An ordered handler's: taken by the worker and by its lanes, several at once.
        let lane_slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut worker_lane_slots = tokio_util::sync::PollSemaphore::new(Arc::clone(&lane_slots));
        let mut lane_permit = None;
        // On a current-thread runtime spawned handlers never run in parallel anyway: there an
        // unordered handler's run, or an ordered handler's new lane, is first polled right
        // here, in the worker's task, and gets a task of its own only if it has to wait. On a
        // multi-threaded runtime they go to the pool's tasks, so handlers run in parallel on
        // the runtime's workers.
        let inline = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let mut tasks = JoinSet::new();
        let mut pool = Pool::new();
        let mut permit = None;
        // Events handled inline since the worker last let other tasks run.
        let mut inline_run = 0;
        // Events waiting in an ordered handler's lanes are kept from timing out.
        let renewer = self
            .ordered
            .then(|| tokio::spawn(Arc::clone(&self).renew_lanes()));
        // The boxes an inline run, and an ordered handler's inline lane, are pinned in (see
        // `poll_in_place`).
        let mut spare_box = None;
        let mut spare_lane = None;
        loop {
            while tasks.try_join_next().is_some() {}
            // A free slot, then a delivery; the cancellation first, at every step.
            // While deliveries flow the cancellation is looked at only if it woke; before the
            // worker waits, it is polled and the worker registered with it.
            let next = std::future::poll_fn(|cx| {
                if cancel.fired_if_woken() {
                    return Poll::Ready(None);
                }
                let next = (|| {
                    if !self.ordered {
                        if permit.is_none() {
                            permit = Some(ready!(slots.poll_take_owned(cx)));
                        }
                    } else if lane_permit.is_none() {
                        // Never closed.
                        let Some(slot) = ready!(worker_lane_slots.poll_acquire(cx)) else {
                            return Poll::Ready(None);
                        };
                        lane_permit = Some(slot);
                    }
                    let next = stream.poll_next_unpin(cx);
                    if next.is_pending() {
                        // Nothing to take: an ordered handler's slot goes back while the
                        // worker waits. The events waiting in lanes take slots as their turn
                        // comes, and a slot kept idle here left them one fewer (the backlogs
                        // of two keys at concurrency 2 ran one event at a time).
                        lane_permit = None;
                    }
                    next.map(Some)
                })();
                if next.is_pending() && cancel.poll_fired(cx) {
                    return Poll::Ready(None);
                }
                next
            })
            .await;
            let delivery = match next {
                None | Some(None) => break,
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, group = %self.shared.group, "handler subscription error");
                    tokio::select! {
                        () = self.shared.cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
                Some(Some(Ok(d))) => Arc::new(d),
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if self.ordered {
                let Some(slot) = lane_permit.take() else {
                    // Unreachable: a delivery is only taken with a slot.
                    break;
                };
                let key = match delivery.event().partition_key() {
                    Some(key) => LaneKey::Key(Arc::from(key)),
                    None => LaneKey::Alone(id),
                };
                let mut taken = Taken {
                    id,
                    delivery,
                    queued: None,
                    slot: Slot::Lane(slot),
                };
                lock(&self.in_flight).insert(id, Arc::clone(&taken.delivery));
                let new_lane = {
                    let mut lanes = lock(&self.lanes);
                    match lanes.entry(key) {
                        Entry::Occupied(mut lane) => {
                            // It waits behind its key, renewed, without a slot: the worker
                            // takes another delivery with this one.
                            taken.slot = Slot::Waiting;
                            taken.queued = Some(std::time::Instant::now());
                            lane.get_mut().waiting.push_back(taken);
                            None
                        }
                        Entry::Vacant(vacant) => {
                            let key = vacant.key().clone();
                            vacant.insert(Lane {
                                waiting: VecDeque::new(),
                                running_since: Some(std::time::Instant::now()),
                            });
                            Some((key, taken))
                        }
                    }
                };
                let Some((key, taken)) = new_lane else {
                    continue;
                };
                if !inline {
                    let job = Job::Lane(key, taken, Arc::clone(&lane_slots));
                    pool.run(job, &self, &mut tasks);
                    continue;
                }
                // As an unordered run below: the lane is polled here first, and gets a task of
                // its own only if it has to wait. A lane that ran its event and found nothing
                // more of its key waiting has ended (an async fn's body has dropped its
                // arguments: it holds nothing any more).
                let lane = Arc::clone(&self).lane(key, taken, Arc::clone(&lane_slots));
                if let Some(waiting) = poll_in_place(&mut spare_lane, lane).await {
                    tasks.spawn(waiting);
                }
                yield_after(&mut inline_run, concurrency).await;
                continue;
            }
            let Some(permit) = permit.take() else {
                // Unreachable: an unordered handler takes a delivery only with a slot.
                break;
            };
            let taken = Taken {
                id,
                delivery,
                queued: None,
                slot: Slot::Worker(permit),
            };
            if inline {
                let delivery = Arc::clone(&taken.delivery);
                // Not in the drain's map unless it has to wait (below): no removal either.
                // A finished run holds nothing any more (see `run_taken`).
                let process = Arc::clone(&self).run_taken(taken);
                if let Some(waiting) = poll_in_place(&mut spare_box, process).await {
                    // It waits: it goes on in a task of its own, tracked for the drain.
                    lock(&self.in_flight).insert(id, delivery);
                    let worker = Arc::clone(&self);
                    tasks.spawn(waiting.map(move |_| {
                        lock(&worker.in_flight).remove(&id);
                    }));
                }
                yield_after(&mut inline_run, concurrency).await;
            } else {
                lock(&self.in_flight).insert(id, Arc::clone(&taken.delivery));
                pool.run(Job::Event(taken), &self, &mut tasks);
            }
        }
        // The slot the worker held for its next delivery: the drain's runs may need it.
        drop((permit, lane_permit));
        if !self.shared.cancel.is_cancelled() {
            tracing::warn!(
                event_type = %self.shared.ty,
                group = %self.shared.group,
                subscription = %self.shared.subscription,
                "handler stopped: its subscription ended (its topic was deleted, or its \
                 transport closed); runs under way finish, for at most the visibility timeout"
            );
        }
        // The pool's tasks run what was handed to them, then end.
        drop(pool);
        let report = self.drain(tasks).await;
        if let Some(renewer) = renewer {
            renewer.abort();
        }
        drop(stream);
        // Stopped before the report goes out: `shutdown` returns on the report, and its
        // caller may look at `is_running` on another thread at once.
        self.shared.running.store(false, Ordering::Release);
        self.shared.report.send_replace(Some(report));
    }

    /// A pool task: does `first`, then whatever the worker hands it, until the worker ends.
    async fn pooled(self: Arc<Self>, first: Job, jobs: Receiver<Job>, idle: Arc<AtomicUsize>) {
        let mut current = first;
        loop {
            match current {
                Job::Event(Taken {
                    id, delivery, slot, ..
                }) => {
                    self.handle(&delivery).await;
                    lock(&self.in_flight).remove(&id);
                    // Dropped before the task waits: a delivery whose settlement failed holds
                    // one of the subscription's in-flight permits until it is dropped, and an
                    // idle task that kept it would starve the worker of deliveries.
                    drop(delivery);
                    // Idle before the slot is given back: whenever the worker holds a slot,
                    // either a task is idle or fewer than `concurrency` exist, so the pool
                    // never outgrows the handler's concurrency.
                    idle.fetch_add(1, Ordering::AcqRel);
                    drop(slot);
                }
                Job::Lane(key, first, slots) => {
                    Arc::clone(&self).lane(key, first, slots).await;
                    idle.fetch_add(1, Ordering::AcqRel);
                }
            }
            match jobs.recv().await {
                Ok(next) => current = next,
                Err(_) => return,
            }
        }
    }

    /// Runs `first` (which came with its slot), then the events queued in lane `key`, one at
    /// a time, in arrival order, each once it has one of the handler's `slots`, until the
    /// lane is empty (then removed).
    async fn lane(self: Arc<Self>, key: LaneKey, first: Taken, slots: Arc<tokio::sync::Semaphore>) {
        let mut next = Some(first);
        loop {
            let taken = match next.take() {
                Some(taken) => taken,
                None => {
                    {
                        // The run (or the skip) before is done: the lane goes if nothing of
                        // its key waits, or waits for a slot without running. One lookup
                        // (the map hashes keys with SipHash: they come from producers).
                        let mut lanes = lock(&self.lanes);
                        let Entry::Occupied(mut lane) = lanes.entry(key.clone()) else {
                            return;
                        };
                        if lane.get().waiting.is_empty() {
                            lane.remove();
                            return;
                        }
                        lane.get_mut().running_since = None;
                    }
                    // Never closed; the drain aborts this task.
                    let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                        return;
                    };
                    let mut lanes = lock(&self.lanes);
                    let Some(lane) = lanes.get_mut(&key) else {
                        return;
                    };
                    let Some(taken) = lane.waiting.pop_front() else {
                        continue;
                    };
                    lane.running_since = Some(std::time::Instant::now());
                    Taken {
                        slot: Slot::Lane(slot),
                        ..taken
                    }
                }
            };
            if let Some(queued) = taken.queued {
                let waited = queued.elapsed();
                self.waited_in_lane(waited);
                if waited >= self.visibility_timeout / 20 && !self.still_held(&taken).await {
                    // Timed out while it waited (behind a run that went on past the
                    // timeout): the broker has it again, and its redelivery runs it.
                    lock(&self.in_flight).remove(&taken.id);
                    continue;
                }
            }
            Arc::clone(&self).process(taken).await;
        }
    }

    /// Renews an event that waited in a lane, as it starts: its run gets a whole visibility
    /// timeout (the last periodic renewal may be up to a third of it ago). `false` when it
    /// is no longer this instance's to run: its timeout ran out while it waited (a lane
    /// behind a run gone on past the timeout is not renewed), or it was settled. A transport
    /// that cannot renew, or cannot be reached, lets it run as it is.
    async fn still_held(&self, taken: &Taken) -> bool {
        if !self.renews.load(Ordering::Relaxed) {
            return true;
        }
        match taken.delivery.renew().await {
            Err(e) if matches!(e.kind(), ErrorKind::Expired | ErrorKind::AlreadySettled) => {
                tracing::warn!(
                    event_type = %self.shared.ty,
                    group = %self.shared.group,
                    event = taken.delivery.event().id(),
                    error = %e,
                    "an event of an ordered handler timed out while it waited behind its \
                     key (a run went on past the visibility timeout): not run here; the broker \
                     delivers it again"
                );
                false
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                self.renews.store(false, Ordering::Relaxed);
                true
            }
            _ => true,
        }
    }

    /// Renews, every third of the visibility timeout, the deliveries waiting in the lanes
    /// behind earlier events of their key, until the worker is done (aborted then). They were
    /// taken from the broker with the events ahead of them and their timeouts run from then:
    /// without renewals, a key's backlog of (concurrency + prefetch) runs longer than one
    /// timeout would come back from the broker, run again after later events of the key and
    /// count attempts nobody failed. A renewal that fails leaves that delivery's timeout
    /// running (it may come back, as before); a transport that cannot renew at all ends
    /// the renewals and leaves the warning of [`waited_in_lane`](Self::waited_in_lane).
    async fn renew_lanes(self: Arc<Self>) {
        let every = (self.visibility_timeout / 3).max(crate::delivery::MIN_RENEW_EVERY);
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut waiting: Vec<Arc<Delivery>> = Vec::new();
            let mut hung = None;
            for lane in lock(&self.lanes).values() {
                // A run gone on past the timeout may hang: the broker hands its event out
                // again, and the events behind it must not be kept here for ever.
                match lane.running_since.map(|t| t.elapsed()) {
                    Some(ran) if ran > self.visibility_timeout => hung = Some(ran),
                    _ => waiting.extend(lane.waiting.iter().map(|t| Arc::clone(&t.delivery))),
                }
            }
            if let Some(ran) = hung
                && !self.hang_warned.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    event_type = %self.shared.ty,
                    group = %self.shared.group,
                    running_for = ?ran,
                    visibility_timeout = ?self.visibility_timeout,
                    "a run of an ordered handler has gone on past the visibility timeout (it \
                     may hang): its event is delivered again, and the events of its key \
                     waiting behind it are no longer renewed, so they come back too, possibly \
                     to another instance, and run there"
                );
            }
            let mut renewals = futures::stream::iter(waiting)
                .map(|delivery| async move { (delivery.renew().await, delivery) })
                .buffer_unordered(RENEWALS_AT_ONCE);
            let mut failed = None;
            while let Some((result, delivery)) = renewals.next().await {
                match result {
                    // Its turn came, and it was settled, since the lanes were looked at.
                    Err(e) if e.kind() == ErrorKind::AlreadySettled => {}
                    Err(e) if e.kind() == ErrorKind::Unsupported => {
                        self.renews.store(false, Ordering::Relaxed);
                        tracing::debug!(group = %self.shared.group, error = %e, "the transport cannot renew visibility timeouts: events waiting behind their key keep theirs running");
                        return;
                    }
                    // Settled since (its run ended and acked it): a transport that cannot
                    // tell a settled delivery from an expired one says `Expired`.
                    Err(_) if delivery.is_settled() => {}
                    Err(e) => failed = Some((e, delivery)),
                    Ok(()) => {}
                }
            }
            if let Some((e, delivery)) = failed {
                // Once per round: a broker outage fails every renewal of the round alike.
                tracing::warn!(
                    event_type = %self.shared.ty,
                    group = %self.shared.group,
                    event = delivery.event().id(),
                    error = %e,
                    "could not renew the visibility timeout of an event waiting behind \
                     earlier events of its key: if it runs out, the event is delivered again"
                );
            }
        }
    }

    /// Warns, once per handler, when an event of an ordered handler waited behind earlier
    /// events of its key for over half its visibility timeout on a transport that cannot
    /// renew it. Its timeout runs while it waits (it was taken from the broker with them):
    /// past it, the broker delivers it again, and that copy runs after later events of the
    /// key, and counts another attempt.
    fn waited_in_lane(&self, waited: Duration) {
        if waited > self.visibility_timeout / 2
            && !self.renews.load(Ordering::Relaxed)
            && !self.lane_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                event_type = %self.shared.ty,
                group = %self.shared.group,
                waited = ?waited,
                visibility_timeout = ?self.visibility_timeout,
                "an event of an ordered handler waited over half its visibility timeout \
                 behind earlier events of its key, and its transport cannot renew the timeout: \
                 past it the event is delivered again, runs again out of order and counts \
                 another attempt; keep (concurrency + prefetch) x the longest run of one key \
                 under the visibility timeout (raise it, or lower them)"
            );
        }
    }

    async fn drain(&self, mut tasks: JoinSet<()>) -> DrainReport {
        // Stopped by `shutdown`: its deadline. Ended by itself (the subscription ended): runs
        // under way finish, not dropped half-way through their side effects, unless a
        // `shutdown` comes with an earlier deadline.
        let shutdown = |d: &Mutex<Option<Instant>>| *lock(d);
        let mut deadline = shutdown(&self.shared.deadline)
            .unwrap_or_else(|| Instant::now() + self.visibility_timeout);
        let finished = {
            let all = async { while tasks.join_next().await.is_some() {} };
            tokio::pin!(all);
            let mut stopping = !self.shared.cancel.is_cancelled();
            loop {
                tokio::select! {
                    () = &mut all => break true,
                    () = tokio::time::sleep_until(deadline) => break false,
                    () = self.shared.cancel.cancelled(), if stopping => {
                        stopping = false;
                        if let Some(d) = shutdown(&self.shared.deadline) {
                            deadline = deadline.min(d);
                        }
                    }
                }
            }
        };
        let mut report = DrainReport::default();
        if !finished {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            // Given back in the order they were taken, so that a transport that redelivers
            // in the order of give-backs keeps each key's order (the drain map's own order
            // is a hash map's).
            let mut left: Vec<(u64, Arc<Delivery>)> = lock(&self.in_flight).drain().collect();
            left.sort_unstable_by_key(|(id, _)| *id);
            let left = left.into_iter().map(|(_, d)| d);
            lock(&self.lanes).clear();
            for delivery in left {
                if delivery.is_settled() {
                    continue;
                }
                report.interrupted += 1;
                if delivery.attempt() < delivery.max_attempts()
                    && let Err(e) = delivery.nack(None).await
                {
                    tracing::warn!(error = %e, event = delivery.event().id(), "could not nack at shutdown; the event comes back after its visibility timeout");
                }
                // On the last attempt a nack would dead-letter an event that did not fail:
                // it is left to its visibility timeout instead. It comes back past its
                // attempts all the same, and the subscription dead-letters it then as
                // over-delivered (a broker cannot tell an interrupted run from a crash; see
                // the module's "Shutdown").
            }
        }
        report
    }

    /// An ordered handler's run of a lane's event (see [`handle`](Self::handle)): an event
    /// with a key is retried in place, so that nothing of its key overtakes it.
    async fn process(self: Arc<Self>, taken: Taken) {
        let delivery = &taken.delivery;
        match self.admit(delivery) {
            Admission::Run(span, parsed) if delivery.event().partition_key().is_some() => {
                telemetry::within(span, self.run_in_place(delivery, parsed)).await;
            }
            Admission::Run(span, parsed) => {
                telemetry::within(span, self.run_once(delivery, parsed)).await;
            }
            Admission::Skip => self.skip(delivery).await,
            Admission::Reject { reason, cause } => {
                Box::pin(self.reject(delivery, reason, cause)).await;
            }
        }
        lock(&self.in_flight).remove(&taken.id);
    }

    /// [`handle`](Self::handle) of a delivery not (yet) in the drain's map; its slot is
    /// given back when `taken` goes.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's future keeps a second copy of its arguments; a block's does not"
    )]
    fn run_taken(self: Arc<Self>, taken: Taken) -> impl Future<Output = ()> + Send {
        async move {
            self.handle(&taken.delivery).await;
            // Moved out whole once the run is done: the block holds all of `taken` until then
            // (one that named only the delivery would hold only that, and give the slot back
            // before the run), and a finished block holds nothing (an inline run's box keeps
            // it until the next run replaces it).
            drop((self, taken));
        }
    }

    /// An unordered handler's run of an event: one attempt, a failure retried through a
    /// delayed nack.
    ///
    /// The future of a run is what an inline run moves into its box, and what a pool task
    /// holds, per event: the hot path (admit, call, ack) is kept apart from the cold ones,
    /// which are boxed where they are awaited (dead-lettering, nacks, retries in place), so
    /// that it stays a few hundred bytes (it was 1,224, copied three times per event).
    async fn handle(&self, delivery: &Delivery) {
        // Moved out of the match before the run: the decision does not stay in the future.
        let (span, parsed) = match self.admit(delivery) {
            Admission::Run(span, parsed) => (span, parsed),
            Admission::Skip => return self.skip(delivery).await,
            Admission::Reject { reason, cause } => {
                return Box::pin(self.reject(delivery, reason, cause)).await;
            }
        };
        telemetry::within(span, self.run_once(delivery, parsed)).await;
    }

    /// What to do with an event before its run: run it (with the run's span and the data a
    /// typed handler gets already parsed), skip one of another type sharing the topic, or
    /// dead-letter a misrouted or invalid one.
    fn admit(&self, delivery: &Delivery) -> Admission {
        let event = delivery.event();
        let group = &*self.shared.group;
        let ty = &self.shared.ty;
        if event.ty() != ty {
            if self.bus.topic_of(event.ty(), None) == self.shared.topic {
                // Another type sharing the topic: its own handlers have subscriptions of
                // their own, so it is not this handler's business.
                return Admission::Skip;
            }
            // A type that is not published here (a producer writing straight to the broker
            // misnamed it, `OrderCreated` for `orderCreated`, or sent it to the wrong topic):
            // no handler of this Bus would ever see it where it belongs, so it is kept in
            // this group's dead-letter queue rather than acknowledged unseen.
            let known = self.bus.inner.routes.contains_key(event.ty())
                || self.bus.inner.catalog.get(event.ty()).is_some();
            let reason = if known {
                format!(
                    "misrouted: an event of type `{}` on topic `{}`, which carries `{ty}`; \
                     events of its type are published to `{}`",
                    event.ty(),
                    self.shared.topic,
                    self.bus.topic_of(event.ty(), None)
                )
            } else {
                // A type this Bus does not know at all: where its producers publish it is
                // not for this Bus to say (a new type another service routes to a shared
                // topic, deployed before this consumer learnt of it, lands here).
                format!(
                    "misrouted: an event of type `{}` on topic `{}`, which carries `{ty}`; \
                     this Bus has no route or catalogue entry for its type (if it is published \
                     to `{}` on purpose, route it there in this Bus too, and its handlers \
                     will skip it)",
                    event.ty(),
                    self.shared.topic,
                    self.shared.topic
                )
            };
            tracing::warn!(event = event.id(), group, %reason, "dead-lettering a misrouted event");
            return Admission::Reject {
                reason,
                cause: "misrouted",
            };
        }
        let parsed = match self.bus.inner.catalog.read_event_data(event) {
            Ok((read, parsed)) => {
                if let (Some(written), Some(read_as)) = (read.unknown_version(), read.version()) {
                    let relation = if written > read_as { "newer" } else { "older" };
                    tracing::debug!(
                        event = event.id(),
                        group,
                        written,
                        read_as,
                        "the event's schema version is not in this catalogue; its data is valid \
                         under the latest version, so the handler gets it"
                    );
                    telemetry::unknown_version_read(ty, group, relation);
                }
                // Only a typed handler reads it; for any other it goes now.
                parsed.filter(|_| self.handler.typed)
            }
            Err(errors) => {
                let cause = match errors.problem() {
                    crate::schema::ValidationProblem::UnknownVersion { .. } => "unknown_version",
                    _ => "invalid",
                };
                let reason = format!("rejected on consume: {}", Error::from(errors).message());
                tracing::warn!(event = event.id(), group, %reason, "dead-lettering an invalid event");
                return Admission::Reject { reason, cause };
            }
        };
        let span = tracing::info_span!(
            "evbus.handle",
            otel.kind = "consumer",
            event.r#type = %ty,
            event.id = %event.id(),
            group = %group,
            attempt = delivery.attempt(),
        );
        telemetry::adopt(&span, event);
        Admission::Run(span, parsed)
    }

    /// Acks an event of another type sharing the topic (see [`admit`](Self::admit)).
    async fn skip(&self, delivery: &Delivery) {
        let ack = delivery.ack().await;
        settle("skipping an event of another type", delivery.event(), ack);
    }

    /// Dead-letters an event [`admit`](Self::admit) turned away.
    async fn reject(&self, delivery: &Delivery, reason: String, cause: &'static str) {
        let event = delivery.event();
        self.dead_lettered(event, &reason, delivery.dead_letter(&reason).await);
        telemetry::dead_lettered(&self.shared.ty, &self.shared.group, cause);
    }

    async fn call(
        &self,
        event: &Event,
        attempt: u32,
        parsed: Option<serde_json::Value>,
    ) -> Result<(), Failure> {
        let msg = Message {
            event: event.clone(),
            attempt,
            max_attempts: self.retry.max_attempts,
            group: Arc::clone(&self.shared.group),
            parsed,
        };
        let started = std::time::Instant::now();
        // The call itself is caught too: a closure may panic before it returns its future
        // (code ahead of its `async` block, a typed handler's `Deserialize`), and that
        // panic is a failed run like one inside the future, not the end of the worker.
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.handler.run)(msg))) {
            Ok(run) => AssertUnwindSafe(run).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        let run = started.elapsed();
        self.metrics.handle_duration(run.as_secs_f64());
        if let Some(slow) = &self.slow_runs {
            slow.ran_for(run, &self.shared.ty, &self.shared.group);
        }
        match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string payload".to_owned());
                Err(Failure::Retry(format!("the handler panicked: {what}")))
            }
        }
    }

    /// One attempt; a failure is retried through a delayed nack.
    async fn run_once(&self, delivery: &Delivery, parsed: Option<serde_json::Value>) {
        let event = delivery.event();
        match self.call(event, delivery.attempt(), parsed).await {
            Ok(()) => {
                settle("acking", event, delivery.ack().await);
                self.metrics.handled();
            }
            // Boxed: off the hot path (see `handle`).
            Err(failure) => Box::pin(self.failed_once(delivery, failure)).await,
        }
    }

    /// After a failed [`run_once`](Self::run_once): dead-letters a rejected event, or one on
    /// its last attempt; nacks the others with the retry policy's backoff.
    async fn failed_once(&self, delivery: &Delivery, failure: Failure) {
        let (ty, group) = (&*self.shared.ty, &*self.shared.group);
        let event = delivery.event();
        let attempt = delivery.attempt();
        match failure {
            Failure::Reject(reason) => {
                self.dead_lettered(event, &reason, delivery.dead_letter(&reason).await);
                telemetry::dead_lettered(ty, group, "undecodable");
            }
            Failure::Retry(error) => {
                self.metrics.failed();
                let max = delivery.max_attempts();
                if attempt >= max {
                    let reason = last_error_reason(attempt, max, &error);
                    tracing::warn!(event = event.id(), group, %reason, "dead-lettering");
                    self.dead_lettered(event, &reason, delivery.dead_letter(&reason).await);
                    telemetry::dead_lettered(ty, group, "handler");
                } else {
                    let delay = self.retry.backoff(attempt);
                    tracing::debug!(event = event.id(), group, attempt, ?delay, %error, "handler failed; retrying");
                    match delivery.nack(Some(delay)).await {
                        Ok(Settlement::DeadLettered) => {
                            // The delivery was on its last attempt after all: it stored
                            // this reason (see `Delivery::nack`).
                            let reason = format!("max attempts reached ({attempt} of {max})");
                            self.dead_lettered(event, &reason, Ok(()));
                            telemetry::dead_lettered(ty, group, "handler");
                        }
                        Ok(_) => self.metrics.retried(),
                        Err(e) => settle("nacking", event, Err(e)),
                    }
                }
            }
        }
    }

    /// Ordered mode: retries in place so nothing of the same key overtakes the event.
    async fn run_in_place(&self, delivery: &Delivery, parsed: Option<serde_json::Value>) {
        // Retried in place, an event holds its slot through every attempt and backoff: that
        // whole time, not one call's, is what events fetched ahead wait.
        let started = self.slow_runs.as_ref().map(|_| std::time::Instant::now());
        self.attempts_in_place(delivery, parsed).await;
        if let (Some(slow), Some(started)) = (&self.slow_runs, started) {
            slow.ran_for(started.elapsed(), &self.shared.ty, &self.shared.group);
        }
    }

    async fn attempts_in_place(&self, delivery: &Delivery, mut parsed: Option<serde_json::Value>) {
        let (ty, group) = (&*self.shared.ty, &*self.shared.group);
        let event = delivery.event();
        let max = delivery.max_attempts();
        let mut attempt = delivery.attempt();
        loop {
            // The first attempt takes the parsed data; a retry in place reads the bytes.
            match self.call(event, attempt, parsed.take()).await {
                Ok(()) => {
                    settle("acking", event, delivery.ack().await);
                    self.metrics.handled();
                    return;
                }
                Err(Failure::Reject(reason)) => {
                    self.dead_lettered(
                        event,
                        &reason,
                        Box::pin(delivery.dead_letter(&reason)).await,
                    );
                    telemetry::dead_lettered(ty, group, "undecodable");
                    return;
                }
                Err(Failure::Retry(error)) => {
                    self.metrics.failed();
                    if attempt >= max {
                        let reason = last_error_reason(attempt, max, &error);
                        let result = if attempt == delivery.attempt() {
                            Box::pin(delivery.dead_letter(&reason)).await
                        } else {
                            // Retried in place: record the attempts actually made.
                            Box::pin(self.dead_letter_in_place(delivery, &reason, attempt)).await
                        };
                        self.dead_lettered(event, &reason, result);
                        telemetry::dead_lettered(ty, group, "handler");
                        return;
                    }
                    self.metrics.retried();
                    Box::pin(tokio::time::sleep(self.retry.backoff(attempt))).await;
                    attempt += 1;
                }
            }
        }
    }

    /// After a dead-lettering attempt: logs a failure (the event comes back), or calls the
    /// dead-letter hook.
    fn dead_lettered(&self, event: &Event, reason: &str, result: Result<()>) {
        match result {
            Ok(()) => crate::subscription::tell(self.on_dead_letter.as_ref(), event, reason),
            Err(e) => settle("dead-lettering", event, Err(e)),
        }
    }

    async fn dead_letter_in_place(
        &self,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        let dead = dead_letter_event(delivery.event(), reason, attempts, delivery.origin())?;
        crate::delivery::send_dead_letter(&*self.dead_letter, dead).await?;
        delivery.ack().await
    }
}

fn last_error_reason(attempt: u32, max: u32, error: &str) -> String {
    format!("handler failed on attempt {attempt} of {max}: {error}")
}

/// Logs a settlement that failed: the event stays pending on the broker and comes back
/// after its visibility timeout, so nothing is lost.
fn settle(what: &str, event: &Event, result: Result<()>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, event = event.id(), "{what} failed; the event will be redelivered after its visibility timeout");
    }
}
