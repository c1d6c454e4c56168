//! Consumers: pull consumers on a stream, read in batches no larger than the consumer's free
//! in-flight slots, and the acker that settles each delivery.
//!
//! Each pull request asks for the in-flight limit less the deliveries handed out and not
//! settled yet (at least one: core reads the stream only with a slot free; at most
//! `fetch_batch`), and the next request is made only once the last one is served in full or
//! expired. The messages a request brings and the deliveries still unsettled therefore never
//! exceed `max_in_flight`: a message fetched into a batch has its `ack_wait` running on the
//! server, and one its holder has no slot to take would wait there (core reads the stream
//! only with a slot free, so it is not renewed for long, see below) until the server
//! delivered it again. A delivery counts as unsettled from when it is handed out until
//! its ack, nack or delayed nack succeeds, or until its acker is dropped unsettled; a renewal
//! changes nothing. Messages a dropped subscription fetched and never handed out are given
//! back (see [`give_back`]).
//!
//! Fetched messages wait for the subscription's holder to take them (it takes one per free
//! slot, and may be slow), in the batch or in the adapter's buffer ([`Ahead`]); their
//! `ack_wait` runs meanwhile. While the stream is polled, a renewal task renews them every
//! third of the timeout (see [`renew_ahead`]), so that they are handed out on their first
//! attempt, in order; once the stream has not been polled for a whole timeout (its holder
//! hung or stopped reading), it stops and they time out as any unsettled delivery does.
//!
//! | evbus | JetStream |
//! |---|---|
//! | attempt | `num_delivered` of the message (from its `$JS.ACK` reply subject) |
//! | visibility timeout | the consumer's `ack_wait` |
//! | renew | `+WPI` (in progress) as a request, which the server answers (2.9 and later), after the adapter's own check that the timeout has not run out: the server restarts the timer of whichever delivery of the message is pending, a stale one's too |
//! | renew what was fetched and not handed out | `+WPI` published (no answer awaited) for each, every third of the timeout, after the same check |
//! | ack | `+ACK`, as a request (double ack, `AckAck`) unless `double_ack` is off |
//! | nack | `-NAK` |
//! | nack with delay | `-NAK {"delay": ns}` (native) |
//! | max attempts | counted by core; `max_deliver` is unlimited so the server never drops an event silently |

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, pull};
use async_trait::async_trait;
use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::raw::{Acker, Backoff, RawDelivery, ReadClock, Undecodable};
use evbus::{ConsumerOptions, Error, ErrorKind, Event, Result};
use futures::{Stream, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{classify_consumer_info, from_boxed, from_consumer, from_consumer_info};
use crate::names::{Kind, StreamNames};
use crate::transport::{NatsTransport, Shared};

/// Where a new consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Only messages stored after the consumer was created.
    New,
    /// Every message the stream holds.
    All,
}

/// What to consume.
#[derive(Clone)]
pub(crate) struct ConsumerSpec {
    /// The stream name.
    pub(crate) stream: String,
    /// The durable consumer name; `None` for an anonymous subscription's ephemeral consumer.
    pub(crate) durable: Option<String>,
    /// Where a new consumer starts (an existing durable one resumes where it stopped).
    pub(crate) start: Start,
    pub(crate) options: ConsumerOptions,
}

/// Shortest pause before pulling again after an error.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts to pull again after an error.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Share of the visibility timeout after which a delivery is no longer renewed, in tenths.
/// The adapter's clock of a delivery starts when the message reached it, a little after the
/// server's, and the `+WPI` reaches the server a little after the look: in the last tenth a
/// renewal could land on a delivery the server already handed out again (and renew that
/// one instead), so it is refused as expired. Renewals come every third of the timeout.
const RENEWABLE_TENTHS: u32 = 9;
/// Least time between two looks whether the consumer still exists after pull requests that
/// brought nothing. A request made after the consumer was deleted gets no answer at all
/// (only one waiting at that moment gets a 409), so an empty pull is the only sign.
const EXISTS_CHECK: Duration = Duration::from_secs(2);
/// Shortest time between two renewals of the messages fetched and not handed out, whatever
/// the visibility timeout (core renews held deliveries no more often either).
const MIN_RENEW_EVERY: Duration = Duration::from_millis(10);
/// How long one pull request waits on the server: `fetch_wait` less a random share of up to
/// a fifth of it, drawn for each request.
///
/// NATS Server 2.9 miscounts a redelivery that it dispatches in the instant a pull request
/// expires: it counts the delivery without sending it (the message comes back one visibility
/// timeout later, its attempt count one higher), and sends the stream's newest message again
/// as attempt 1 (the consumer's position steps back by one; reproduced with async-nats alone:
/// `examples/redelivery_counts.rs`, ADR 0038). Requests that all last exactly `fetch_wait`
/// expire in step with redeliveries whose timeout is a multiple of it (1 s and 30 s against
/// the default 1 s), and so meet them: with a fixed 500 ms expiry and a 1 s `ack_wait`, 8 of
/// 48 runs of the reproduction hit the defect, with the expiry spread like this none of 48.
fn request_expiry(fetch_wait: Duration) -> Duration {
    use rand::Rng;
    let spread = u64::try_from((fetch_wait / 5).as_nanos()).unwrap_or(u64::MAX);
    if spread == 0 {
        return fetch_wait;
    }
    fetch_wait - Duration::from_nanos(rand::rng().random_range(0..spread))
}

/// Creates (or finds and adjusts) the consumer of `spec` and returns its stream of raw
/// deliveries.
pub(crate) async fn open(
    transport: &NatsTransport,
    spec: ConsumerSpec,
) -> Result<impl Stream<Item = Result<RawDelivery>> + Send + 'static + use<>> {
    let shared = Arc::clone(&transport.shared);
    // An anonymous subscription's consumer is named here and registered before it is made:
    // a subscribe cancelled part way (its future dropped) then deletes it, instead of
    // leaving it to the server until `anonymous_ttl`.
    let ephemeral = match &spec.durable {
        Some(_) => None,
        None => {
            let name = format!("evbus_anon_{}", uuid::Uuid::now_v7().simple());
            let id = shared.track_anonymous(&spec.stream, &name);
            Some((
                name,
                Registered {
                    shared: Arc::clone(&shared),
                    id: Some(id),
                },
            ))
        }
    };
    let consumer =
        ensure_consumer(&shared, &spec, ephemeral.as_ref().map(|(n, _)| n.as_str())).await?;
    let name = consumer.cached_info().name.clone();
    let anonymous = ephemeral.and_then(|(_, mut registered)| registered.id.take());
    let ack_wait = ack_wait(&spec.options);
    let ahead = Ahead::new(ack_wait);
    let pull = Pull {
        location: format!("nats:{}", spec.stream),
        stream: spec.stream.into(),
        name: name.into(),
        consumer,
        max_in_flight: spec.options.max_in_flight.max(1),
        fetch_batch: shared.config.fetch_batch.max(1),
        outstanding: Arc::new(AtomicUsize::new(0)),
        ack_wait,
        ahead: Arc::clone(&ahead),
        renewer: None,
        requesting: None,
        requested_at: Instant::now(),
        checked: Instant::now(),
        backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
        anonymous,
        connected: shared.connected.subscribe(),
        shared,
    };
    let mut deliveries = Box::pin(futures::stream::unfold(pull, |mut pull| async move {
        pull.next().await.map(|item| (item, pull))
    }));
    // Every poll counts, whether or not it brings a delivery: the fetched messages are
    // renewed only while the holder reads the stream (see `renew_ahead`).
    Ok(futures::stream::poll_fn(move |cx| {
        ahead.read.mark();
        deliveries.as_mut().poll_next(cx)
    }))
}

/// Opens the consumer of `spec` on the stream of a `kind` named `names`, creating the
/// stream unless this transport knows it. A stream deleted behind this transport's back
/// (by another connection) is created again, once, as a publish does: otherwise every
/// subscribe would fail with `NotFound` until something published through this transport.
pub(crate) async fn open_on(
    transport: &NatsTransport,
    kind: Kind,
    names: &StreamNames,
    spec: ConsumerSpec,
) -> Result<impl Stream<Item = Result<RawDelivery>> + Send + 'static + use<>> {
    let shared = &transport.shared;
    shared.ensure_stream(kind, names).await?;
    match open(transport, spec.clone()).await {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            shared.forget_stream(&names.stream);
            shared.ensure_stream(kind, names).await?;
            open(transport, spec).await
        }
        opened => opened,
    }
}

/// An anonymous subscription's consumer registered for deletion, deleted when this is
/// dropped before the subscription takes the registration over.
struct Registered {
    shared: Arc<Shared>,
    id: Option<u64>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.release_anonymous(id);
        }
    }
}

/// The consumer configuration evbus asks for; `ephemeral` names an anonymous
/// subscription's consumer.
fn desired_config(
    shared: &Shared,
    spec: &ConsumerSpec,
    start: Start,
    ephemeral: Option<&str>,
) -> pull::Config {
    let config = &shared.config;
    pull::Config {
        durable_name: spec.durable.clone(),
        name: spec
            .durable
            .clone()
            .or_else(|| ephemeral.map(str::to_owned)),
        deliver_policy: match start {
            Start::New => DeliverPolicy::New,
            Start::All => DeliverPolicy::All,
        },
        ack_policy: AckPolicy::Explicit,
        ack_wait: ack_wait(&spec.options),
        // Core counts attempts and dead-letters after max_attempts; the server must never
        // stop delivering on its own (that would strand the event silently).
        max_deliver: -1,
        max_ack_pending: config.max_ack_pending,
        inactive_threshold: if spec.durable.is_none() {
            config.anonymous_ttl
        } else {
            Duration::ZERO
        },
        ..Default::default()
    }
}

/// The consumer's `ack_wait`: the visibility timeout (the server refuses zero).
fn ack_wait(options: &ConsumerOptions) -> Duration {
    options.visibility_timeout.max(Duration::from_millis(1))
}

/// Creates the consumer, or updates an existing durable one to this consumer's visibility
/// timeout (keeping where it started: an existing subscription resumes where it stopped).
async fn ensure_consumer(
    shared: &Shared,
    spec: &ConsumerSpec,
    ephemeral: Option<&str>,
) -> Result<Consumer<pull::Config>> {
    let what = match &spec.durable {
        Some(name) => format!("creating consumer `{name}` on stream `{}`", spec.stream),
        None => format!("creating an ephemeral consumer on stream `{}`", spec.stream),
    };
    let stream = shared
        .js
        .get_stream_no_info(&spec.stream)
        .await
        .map_err(|e| crate::error::from_get_stream(e, &what))?;
    let mut start = spec.start;
    if let Some(name) = &spec.durable {
        match stream.consumer_info(name).await {
            Ok(info) => {
                start = match info.config.deliver_policy {
                    DeliverPolicy::New => Start::New,
                    _ => Start::All,
                };
            }
            Err(e) if classify_consumer_info(&e).0 == ErrorKind::NotFound => {}
            Err(e) => return Err(from_consumer_info(e, &what)),
        }
    }
    let desired = desired_config(shared, spec, start, ephemeral);
    stream
        .create_consumer(desired)
        .await
        .map_err(|e| from_consumer(e, &what))
}

/// Whether consumer `name` of `stream` still exists (`true` when that cannot be told right
/// now).
async fn consumer_exists(shared: &Shared, stream: &str, name: &str) -> bool {
    let stream = match shared.js.get_stream_no_info(stream).await {
        Ok(stream) => stream,
        Err(_) => return true,
    };
    match stream.consumer_info(name).await {
        Err(e) => classify_consumer_info(&e).0 != ErrorKind::NotFound,
        Ok(_) => true,
    }
}

/// One consumer's pull loop.
struct Pull {
    shared: Arc<Shared>,
    consumer: Consumer<pull::Config>,
    stream: Arc<str>,
    name: Arc<str>,
    /// `nats:<stream>`, for undecodable messages.
    location: String,
    /// The consumer's in-flight limit.
    max_in_flight: usize,
    /// Most messages one pull request asks for (the transport's `fetch_batch`).
    fetch_batch: usize,
    /// How many deliveries this consumer handed out that are not settled yet, shared with
    /// their ackers (see [`Handout`]): a pull request asks only for the slots left free.
    outstanding: Arc<AtomicUsize>,
    /// The consumer's `ack_wait` (the visibility timeout its deliveries' ackers renew).
    ack_wait: Duration,
    /// The pull request being served and what it brought that is not handed out yet, shared
    /// with the renewal task.
    ahead: Arc<Ahead>,
    /// Ends the renewal task ([`renew_ahead`]), started at the first hand-out; cancelled on
    /// drop, and with the transport.
    renewer: Option<CancellationToken>,
    /// A pull request being made, in a task of its own: once sent, the server hands it
    /// messages (given-back ones at once) whether or not anyone reads them, so a request cut
    /// off by the subscription's end must still be read and given back (see [`give_back`]).
    requesting: Option<tokio::task::JoinHandle<Requested>>,
    /// When the pull request being made (or served) was started: no message of it was sent
    /// before.
    requested_at: Instant,
    /// When the consumer was last found to exist after an empty pull (see [`EXISTS_CHECK`]).
    checked: Instant,
    backoff: Backoff,
    /// The anonymous subscription's registration, released (consumer deleted) on drop.
    anonymous: Option<u64>,
    /// The client's connections: a pull request lives on the server it was sent to, and
    /// one made before a reconnect may be gone with it, unanswered. The reader then ends it
    /// once it has nothing more to give, rather than waiting for its expiry (`fetch_wait`)
    /// with nothing coming (outside review: 29 s with `fetch_wait_ms=30000`).
    connected: tokio::sync::watch::Receiver<u64>,
}

/// What making a pull request gives.
type Requested = Result<pull::Batch, pull::BatchError>;

impl Drop for Pull {
    fn drop(&mut self) {
        if let Some(stop) = self.renewer.take() {
            stop.cancel();
        }
        let (buffered, batch) = self.ahead.take_all();
        if let Some(id) = self.anonymous.take() {
            // Its consumer is deleted, with whatever it had fetched.
            self.shared.release_anonymous(id);
        } else if !buffered.is_empty() || batch.is_some() {
            give_back(&self.shared, buffered, async move { batch });
        } else if let Some(request) = self.requesting.take() {
            // Dropped while its next pull request was being made (a look that ends as one
            // expires and the next is asked for): that request is the one the give-backs
            // go to, so it is read too.
            give_back(
                &self.shared,
                Vec::new(),
                async move { request.await.ok()?.ok() },
            );
        }
    }
}

/// Gives back the messages a dropped subscription had fetched and not handed out (`buffered`,
/// read from the batch already, then what is left in the batch), so that
/// they are redelivered about a second later instead of after the visibility timeout
/// (`ack_wait`, 30 s by default). The pull request may still bring some until it expires
/// (`fetch_wait`): they are given back too. Each is a `-NAK` delayed past that expiry, so
/// none comes back into the same request (each delivery there would count as an attempt).
///
/// Read until the request ends, even when the transport closes: what the subscription's
/// holder gives back once it dropped the subscription (a dead-letter look nacks everything
/// it held at its end) is redelivered at once into this request, the only one waiting; a
/// message the server delivered into it that nobody reads stays hidden for `ack_wait`.
/// Tracked, so a close waits for it (at most `fetch_wait`, within the close's grace).
fn give_back(
    shared: &Arc<Shared>,
    buffered: Vec<async_nats::jetstream::Message>,
    batch: impl Future<Output = Option<pull::Batch>> + Send + 'static,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let fetch_wait = shared.config.fetch_wait;
    let delay = fetch_wait + Duration::from_millis(100);
    let task = async move {
        let nak = |message: async_nats::jetstream::Message| async move {
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
        };
        for message in buffered {
            nak(message).await;
        }
        let Some(mut batch) = batch.await else {
            return;
        };
        let expired = tokio::time::sleep(fetch_wait);
        tokio::pin!(expired);
        loop {
            let item = tokio::select! {
                biased;
                item = batch.next() => item,
                () = &mut expired => return,
            };
            match item {
                Some(Ok(message)) => nak(message).await,
                Some(Err(_)) | None => return,
            }
        }
    };
    drop(handle.spawn(shared.tasks.track_future(task)));
}

impl Pull {
    async fn next(&mut self) -> Option<Result<RawDelivery>> {
        let cancel = self.shared.cancel.clone();
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            if self.ahead.lock().is_drained() {
                let (consumer, max, expires) = (
                    &self.consumer,
                    self.request_size(),
                    request_expiry(self.shared.config.fetch_wait),
                );
                if self.requesting.is_none() {
                    self.requested_at = Instant::now();
                    // A reconnect from here on may have lost this request.
                    self.connected.mark_unchanged();
                }
                let request = self.requesting.get_or_insert_with(|| {
                    let consumer = consumer.clone();
                    tokio::spawn(async move {
                        consumer
                            .batch()
                            .max_messages(max)
                            .expires(expires)
                            .messages()
                            .await
                    })
                });
                // Cancelled: the request is left in `requesting`, for the drop to give back.
                let joined = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return None,
                    joined = request => joined,
                };
                self.requesting = None;
                let result = match joined {
                    Ok(result) => result,
                    Err(e) => {
                        let e = Error::new(
                            ErrorKind::Internal,
                            format!(
                                "pulling from `{}`: the request's task failed: {e}",
                                self.stream
                            ),
                        );
                        if !self.recover(e).await {
                            return None;
                        }
                        continue;
                    }
                };
                match result {
                    Ok(batch) => self.ahead.serve(batch, self.requested_at),
                    Err(e) => {
                        let e = crate::error::build(
                            e,
                            &format!("pulling from `{}`", self.stream),
                            (ErrorKind::Connection, None, ""),
                        );
                        if !self.recover(e).await {
                            return None;
                        }
                        continue;
                    }
                }
            }
            let ahead = &self.ahead;
            let taken = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                taken = std::future::poll_fn(|cx| ahead.poll_take(cx)) => taken,
                Ok(()) = self.connected.changed() => {
                    // Reconnected: the request may be gone with the server it was sent to.
                    ahead.lock().stale = true;
                    continue;
                }
            };
            match taken {
                // No batch: a request is made first.
                None => {}
                Some(Taken::Message(buffered)) => {
                    self.backoff.reset();
                    self.start_renewer();
                    return Some(Ok(self.delivery(buffered)));
                }
                // The pull request expired or was served in full: ask again, unless it
                // brought nothing and the consumer is gone.
                Some(Taken::End(Ended::Done)) => {
                    let served = self.ahead.lock().served;
                    if !served && self.checked.elapsed() >= EXISTS_CHECK {
                        if self.ended().await {
                            return None;
                        }
                        self.checked = Instant::now();
                    }
                }
                Some(Taken::End(Ended::Failed(e))) => {
                    let e = from_boxed(e, &format!("pulling from `{}`", self.stream));
                    if !self.recover(e).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Starts the renewal task of the messages fetched and not handed out, the first time a
    /// delivery is handed out (before, nothing was fetched ahead).
    fn start_renewer(&mut self) {
        if self.renewer.is_some() {
            return;
        }
        let stop = self.shared.cancel.child_token();
        tokio::spawn(renew_ahead(
            Arc::clone(&self.ahead),
            Arc::clone(&self.shared),
            stop.clone(),
            Arc::clone(&self.stream),
            Arc::clone(&self.name),
        ));
        self.renewer = Some(stop);
    }

    /// How many messages the next pull request asks for: the in-flight slots left free by
    /// the deliveries handed out and not settled yet, at least one (core reads the stream
    /// only with a slot free; a delivery dropped unsettled frees core's slot just before its
    /// acker gives its count back) and at most `fetch_batch`.
    fn request_size(&self) -> usize {
        let outstanding = self.outstanding.load(Ordering::Acquire);
        self.max_in_flight
            .saturating_sub(outstanding)
            .clamp(1, self.fetch_batch)
    }

    /// After a failed pull: `false` if the consumer or its stream is gone (the subscription
    /// ends), else waits a little (backing off) and returns `true`.
    async fn recover(&mut self, error: Error) -> bool {
        if self.ended().await {
            return false;
        }
        let cancel = self.shared.cancel.clone();
        let delay = self.backoff.next_delay();
        tracing::warn!(
            stream = %self.stream, consumer = %self.name, error = %error, retry_in = ?delay,
            "pulling from NATS failed; retrying"
        );
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Whether the subscription ends: the transport closes, or the consumer or its stream
    /// is gone.
    async fn ended(&self) -> bool {
        let cancel = self.shared.cancel.clone();
        let exists = tokio::select! {
            _ = cancel.cancelled() => return true,
            exists = self.consumer_exists() => exists,
        };
        if !exists {
            tracing::warn!(
                stream = %self.stream, consumer = %self.name,
                "the NATS consumer or its stream was deleted; the subscription ends"
            );
        }
        !exists
    }

    async fn consumer_exists(&self) -> bool {
        consumer_exists(&self.shared, &self.stream, &self.name).await
    }

    fn delivery(&self, buffered: Buffered) -> RawDelivery {
        let Buffered { message, since } = buffered;
        let (attempt, sequence) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                info.stream_sequence,
            ),
            Err(_) => (1, 0),
        };
        let acker: Arc<dyn Acker> = Arc::new(NatsAcker {
            shared: Arc::clone(&self.shared),
            reply: message.reply.clone(),
            stream: Arc::clone(&self.stream),
            consumer: Arc::clone(&self.name),
            ack_wait: self.ack_wait,
            since,
            handout: Handout::new(&self.outstanding),
        });
        match decode(&message) {
            Ok(event) => RawDelivery::new(event, attempt, acker, sequence),
            Err(e) => {
                let mut undecodable =
                    Undecodable::new(e, self.location.clone(), sequence.to_string());
                if let Some(headers) = &message.headers {
                    for (name, values) in headers.iter() {
                        for value in values {
                            undecodable =
                                undecodable.header(name.to_string(), value.as_str().as_bytes());
                        }
                    }
                }
                let undecodable = undecodable.body(message.payload.clone());
                RawDelivery::undecodable(undecodable, attempt, acker, sequence)
            }
        }
    }
}

/// Decodes a message written in the CloudEvents NATS binding (binary mode), percent-decoding
/// the values listed in [`ENCODED_HEADER`](crate::publisher::ENCODED_HEADER). Structured mode
/// is read too: with a CloudEvents content type (by [`binding::decode`]), and without any
/// `ce-` header or content type at all when the payload is a JSON object, as the NATS binding
/// before headers (1.0.1) has every event and stock SDKs still publish it.
pub(crate) fn decode(message: &async_nats::Message) -> Result<Event> {
    let Some(headers) = &message.headers else {
        return headerless_structured(message).unwrap_or_else(|| {
            Err(Error::invalid_event(
                "the message has no headers: not a binary-mode CloudEvent (no `ce-specversion`)",
            ))
        });
    };
    let attributes = headers.iter().any(|(name, _)| {
        let name: &str = name.as_ref();
        name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
            || name.eq_ignore_ascii_case(HeaderStyle::NATS.content_type)
    });
    if !attributes && let Some(structured) = headerless_structured(message) {
        return structured;
    }
    let encoded: Vec<String> = headers
        .get(crate::publisher::ENCODED_HEADER)
        .map(|v| v.as_str().split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            let value = value.as_str();
            let value = if encoded.iter().any(|e| e.eq_ignore_ascii_case(name)) {
                crate::publisher::percent_decode(value).ok_or_else(|| {
                    Error::invalid_event(format!(
                        "header `{}` is listed as percent-encoded but is not: `{}`",
                        evbus::raw::quoted(name),
                        evbus::raw::quoted(value)
                    ))
                })?
            } else {
                value.to_owned()
            };
            pairs.push((name.to_owned(), value));
        }
    }
    binding::decode(pairs, message.payload.clone(), HeaderStyle::NATS)
}

/// A message without CloudEvents headers whose payload is a JSON object: the event in the
/// structured JSON format, or why not. `None` for any other payload.
fn headerless_structured(message: &async_nats::Message) -> Option<Result<Event>> {
    if !message.payload.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    Some(Event::from_json_slice(&message.payload).map_err(|e| {
        Error::invalid_event(format!(
            "no `ce-specversion` header, and the payload is not a structured-mode CloudEvent: {}",
            e.message()
        ))
    }))
}

/// No later than when the server started (or last restarted) a delivery's `ack_wait`: the
/// clock of its visibility timeout, shared by the buffered message and, once it is handed
/// out, its acker, so that a renewal by either counts for both.
struct Since {
    at: std::sync::Mutex<Instant>,
    /// Set once the message is handed out: the renewal task no longer renews it (a `+WPI`
    /// after its settlement would undo a delayed `-NAK`'s delay on the server).
    handed: AtomicBool,
}

impl Since {
    fn new(at: Instant) -> Arc<Self> {
        Arc::new(Since {
            at: std::sync::Mutex::new(at),
            handed: AtomicBool::new(false),
        })
    }

    fn get(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hand_out(&self) {
        self.handed.store(true, Ordering::Release);
    }

    fn handed(&self) -> bool {
        self.handed.load(Ordering::Acquire)
    }

    /// Records a renewal sent at `at` (taken before it was sent); one started later may have
    /// been recorded first.
    fn renewed(&self, at: Instant) {
        let mut since = self.at.lock().unwrap_or_else(|p| p.into_inner());
        *since = (*since).max(at);
    }

    /// Whether a renewal sent at `now` still lands on this delivery (see
    /// [`RENEWABLE_TENTHS`]).
    fn renewable(&self, now: Instant, ack_wait: Duration) -> bool {
        now.saturating_duration_since(self.get()) < ack_wait / 10 * RENEWABLE_TENTHS
    }
}

/// A message read from the batch and not handed out yet.
struct Buffered {
    message: async_nats::jetstream::Message,
    since: Arc<Since>,
}

/// What the reader takes next from [`Ahead`]: returned, never stored (the message is not
/// boxed: that would cost an allocation per delivery).
#[allow(clippy::large_enum_variant)]
enum Taken {
    Message(Buffered),
    End(Ended),
}

/// How a pull request ended.
enum Ended {
    /// It expired or was served in full.
    Done,
    /// It failed.
    Failed(async_nats::Error),
}

/// What one consumer fetched and has not handed out: the pull request being served (the
/// messages async-nats received into it and the subscription has not read yet wait in its
/// channel) and the messages read from it ahead of the reader. Shared by the pull loop,
/// which hands them out in order, and the renewal task ([`renew_ahead`]), which moves what
/// reached the channel into the buffer and renews the buffer. The lock is never held across
/// an await.
struct Ahead {
    state: std::sync::Mutex<AheadState>,
    /// Wakes the renewal task.
    arrival: Arc<Arrival>,
    /// `arrival` as a waker, left with the batch by every read ahead.
    waker: Waker,
    /// When the subscription's stream was last polled.
    read: ReadClock,
    /// The consumer's `ack_wait`.
    ack_wait: Duration,
}

struct AheadState {
    /// The pull request being served, until it is seen to end.
    batch: Option<pull::Batch>,
    /// Messages read from the batch ahead of the reader, in the order they came.
    buffer: VecDeque<Buffered>,
    /// How the batch ended, once read ahead: handed to the reader after the buffer.
    end: Option<Ended>,
    /// No later than when the next message of the batch reached this consumer: the moment
    /// the batch was last seen empty, or, when a message was read without waiting for it,
    /// when the message before it came (or the request was made, or the first message to
    /// come woke the renewal task). The server started the message's `ack_wait` as it sent
    /// it, so a delivery's visibility timeout is counted from here, not from when it was
    /// handed out: a message can wait in a batch until its holder asks for the next delivery.
    received: Instant,
    /// Whether the pull request being served brought a message.
    served: bool,
    /// Whether the client reconnected since the pull request being served was made: it
    /// ends as soon as it has nothing more to give.
    stale: bool,
    /// Whether the reader waits for the batch (its waker, not the renewal task's, is with
    /// the channel: the renewal task leaves the batch alone, and there is nothing to renew).
    waiting: bool,
    /// Whether the renewal task runs (is not idle): the reader need not wake it.
    renewing: bool,
}

/// Wakes the renewal task when a message reaches a batch nobody waits on (or the buffer
/// needs renewing), and remembers when the first such message came.
struct Arrival {
    notify: Notify,
    /// When the first wake since the batch was last read came: no sooner than the message
    /// that woke it reached this consumer (the channel wakes its waker as the message comes).
    first: std::sync::Mutex<Option<Instant>>,
    /// The reader waiting on an empty batch, woken with the renewal task: the batch is
    /// polled with this waker, never the reader's, so that a message the reader takes long
    /// after it came (the reader was woken and did not poll) is dated from when it came.
    reader: std::sync::Mutex<Option<Waker>>,
}

impl Wake for Arrival {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        self.notify.notify_one();
        if let Some(reader) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            reader.wake();
        }
    }
}

impl Arrival {
    fn take_first(&self) -> Option<Instant> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Ahead {
    fn new(ack_wait: Duration) -> Arc<Self> {
        let arrival = Arc::new(Arrival {
            notify: Notify::new(),
            first: std::sync::Mutex::new(None),
            reader: std::sync::Mutex::new(None),
        });
        let now = Instant::now();
        Arc::new(Ahead {
            state: std::sync::Mutex::new(AheadState {
                batch: None,
                buffer: VecDeque::new(),
                end: None,
                received: now,
                served: false,
                stale: false,
                waiting: false,
                renewing: false,
            }),
            waker: Waker::from(Arc::clone(&arrival)),
            arrival,
            read: ReadClock::new(),
            ack_wait,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pull request made at `requested_at` is served from now on.
    fn serve(&self, batch: pull::Batch, requested_at: Instant) {
        let mut state = self.lock();
        state.batch = Some(batch);
        state.served = false;
        state.stale = false;
        state.received = requested_at;
        // A wake left by an earlier batch says nothing of this one.
        self.arrival.take_first();
    }

    /// The reader's next item: a buffered message, else how the batch ended, else the next
    /// message of the batch (`None`: there is no batch). A message is dated from when it
    /// reached the batch, however long after that the reader polls (the batch is polled with
    /// [`Arrival`]'s waker), and one whose timeout ran out before it was taken is dropped,
    /// never handed out. Once a message is taken, what the batch holds already is read
    /// ahead, so that the renewal task sees it (and the next message to come wakes that
    /// task).
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Taken>> {
        let mut state = self.lock();
        let now = Instant::now();
        // A buffered message whose timeout ran out (its reader came back after a pause past
        // it) is never handed out: the server delivers it again, perhaps to another
        // consumer already.
        let mut expired = 0usize;
        let fresh = loop {
            match state.buffer.pop_front() {
                Some(b) if !b.since.renewable(now, self.ack_wait) => expired += 1,
                other => break other,
            }
        };
        if expired > 0 {
            tracing::debug!(
                expired,
                "fetched messages timed out before they were handed out; the server delivers them again"
            );
        }
        let taken = if let Some(buffered) = fresh {
            Taken::Message(buffered)
        } else if let Some(end) = state.end.take() {
            state.waiting = false;
            return Poll::Ready(Some(Taken::End(end)));
        } else {
            let Some(batch) = state.batch.as_mut() else {
                state.waiting = false;
                return Poll::Ready(None);
            };
            // Polled with the arrival's waker, which wakes the reader too and records when
            // the next message came: the reader may poll again long after.
            *self
                .arrival
                .reader
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            let mut arrival_cx = Context::from_waker(&self.waker);
            match batch.poll_next_unpin(&mut arrival_cx) {
                Poll::Pending if state.stale => {
                    // Made before a reconnect, and nothing more came: ended, ask again.
                    tracing::debug!("ending a pull request made before a reconnect");
                    state.waiting = false;
                    state.stale = false;
                    state.batch = None;
                    return Poll::Ready(Some(Taken::End(Ended::Done)));
                }
                Poll::Pending => {
                    state.waiting = true;
                    // Whatever comes next comes after this look.
                    state.received = state.received.max(now);
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(message))) => {
                    let since = state.next_since(&self.arrival);
                    state.received = since;
                    state.served = true;
                    let buffered = Buffered {
                        message,
                        since: Since::new(since),
                    };
                    if !buffered.since.renewable(Instant::now(), self.ack_wait) {
                        // Came while the reader did not poll, for longer than its timeout.
                        tracing::debug!(
                            "a fetched message timed out before it was handed out; the server delivers it again"
                        );
                        drop(state);
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Taken::Message(buffered)
                }
                Poll::Ready(None) => {
                    state.waiting = false;
                    state.batch = None;
                    return Poll::Ready(Some(Taken::End(Ended::Done)));
                }
                Poll::Ready(Some(Err(e))) => {
                    state.waiting = false;
                    state.batch = None;
                    return Poll::Ready(Some(Taken::End(Ended::Failed(e))));
                }
            }
        };
        if let Taken::Message(b) = &taken {
            b.since.hand_out();
        }
        state.waiting = false;
        state.read_ahead(&self.arrival, &self.waker);
        if !state.buffer.is_empty() && !state.renewing {
            state.renewing = true;
            self.arrival.notify.notify_one();
        }
        Poll::Ready(Some(taken))
    }

    /// Everything fetched and not handed out, for a dropped subscription to give back: the
    /// buffered messages whose timeout has not run out (the server hands the others out
    /// again anyway, and a `-NAK` of a stale delivery would land on the redelivery another
    /// consumer may hold), then the batch.
    fn take_all(&self) -> (Vec<async_nats::jetstream::Message>, Option<pull::Batch>) {
        let mut state = self.lock();
        let now = Instant::now();
        let buffered = std::mem::take(&mut state.buffer)
            .into_iter()
            .filter(|b| b.since.renewable(now, self.ack_wait))
            .map(|b| {
                // Given back: a renewal under way leaves it alone.
                b.since.hand_out();
                b.message
            })
            .collect();
        state.end = None;
        (buffered, state.batch.take())
    }
}

impl AheadState {
    /// Nothing left of the last pull request: the next one can be made.
    fn is_drained(&self) -> bool {
        self.batch.is_none() && self.buffer.is_empty() && self.end.is_none()
    }

    /// The start of the timeout of a message read from the batch without waiting for it
    /// (see `received`).
    fn next_since(&mut self, arrival: &Arrival) -> Instant {
        if let Some(first) = arrival.take_first() {
            self.received = self.received.max(first);
        }
        self.received
    }

    /// Moves what the batch holds already into the buffer, without waiting, leaving `waker`
    /// (the renewal task's) with it: the next message to come wakes that task.
    fn read_ahead(&mut self, arrival: &Arrival, waker: &Waker) {
        let mut cx = Context::from_waker(waker);
        while let Some(batch) = self.batch.as_mut() {
            let looked = Instant::now();
            // Outside tokio's cooperative budget: a spent budget would answer `Pending` (and
            // wake `waker` at once) with messages still in the channel, and this look must
            // tell an empty channel.
            let read =
                tokio::task::unconstrained(std::future::poll_fn(|cx| batch.poll_next_unpin(cx)));
            match std::pin::pin!(read).poll(&mut cx) {
                Poll::Pending => {
                    // Whatever comes next comes after this look.
                    self.received = self.received.max(looked);
                    return;
                }
                Poll::Ready(Some(Ok(message))) => {
                    let since = Since::new(self.next_since(arrival));
                    self.served = true;
                    self.buffer.push_back(Buffered { message, since });
                }
                Poll::Ready(None) => {
                    self.batch = None;
                    self.end = Some(Ended::Done);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.batch = None;
                    self.end = Some(Ended::Failed(e));
                }
            }
        }
    }
}

/// What a renewal tick leaves the renewal task to do.
enum Tick {
    /// Renew again a third of the timeout later.
    Renewing,
    /// Nothing to renew: wait until woken.
    Idle,
    /// The transport is closing.
    Stop,
}

/// Renews the visibility timeouts of the messages a consumer fetched and has not handed out
/// yet, every third of the timeout (as core renews the deliveries an ordered handler holds
/// waiting), while the subscription's stream was polled within the last timeout. Idle,
/// with no timer, while there is nothing to renew: woken by the reader when it leaves
/// messages in the buffer, and by the batch when a message reaches it while nobody waits on
/// it. Ends when the subscription is dropped or the transport closes (`stop`).
async fn renew_ahead(
    ahead: Arc<Ahead>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    stream: Arc<str>,
    consumer: Arc<str>,
) {
    let every = (ahead.ack_wait / 3).max(MIN_RENEW_EVERY);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = ahead.arrival.notify.notified() => {}
        }
        loop {
            match renew_tick(&ahead, &shared, every, &stop, (&stream, &consumer)).await {
                Tick::Renewing => {}
                Tick::Idle => break,
                Tick::Stop => return,
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// One renewal: reads into the buffer what reached the batch, drops from it the messages
/// whose timeout ran out (the server hands them out again: never handed out from here), and
/// sends a `+WPI` for each of the others not renewed within half a period (the rest are
/// renewed the next time, well within their timeout). The `+WPI`s are published without
/// waiting for answers (the client writes them out together), and each renewed message's
/// timeout counts from just before they were sent.
async fn renew_tick(
    ahead: &Ahead,
    shared: &Shared,
    every: Duration,
    stop: &CancellationToken,
    (stream, consumer): (&str, &str),
) -> Tick {
    let now = Instant::now();
    let mut expired = 0usize;
    let due: Vec<(Option<Subject>, Arc<Since>)> = {
        let mut state = ahead.lock();
        if state.waiting || !ahead.read.read_within(ahead.ack_wait) {
            // The reader waits on an empty batch, or nobody reads the stream any more: its
            // holder hung or stopped reading, and must not hold the messages for ever.
            state.renewing = false;
            return Tick::Idle;
        }
        state.read_ahead(&ahead.arrival, &ahead.waker);
        state.buffer.retain(|b| {
            let renewable = b.since.renewable(now, ahead.ack_wait);
            expired += usize::from(!renewable);
            renewable
        });
        if state.buffer.is_empty() {
            state.renewing = false;
            return Tick::Idle;
        }
        state.renewing = true;
        state
            .buffer
            .iter()
            .filter(|b| now.saturating_duration_since(b.since.get()) >= every / 2)
            .map(|b| (b.message.reply.clone(), Arc::clone(&b.since)))
            .collect()
    };
    if expired > 0 {
        tracing::debug!(
            stream = %stream, consumer = %consumer, expired,
            "fetched messages timed out before they were handed out; the server delivers them again"
        );
    }
    for (reply, since) in due {
        // Handed out since the list was made: its acker settles it, and a `+WPI` after a
        // delayed `-NAK` would undo the delay on the server.
        if stop.is_cancelled() {
            // Dropped: its give-back `-NAK`s what is left.
            return Tick::Stop;
        }
        if since.handed() {
            continue;
        }
        match send_ack(
            shared,
            (stream, consumer),
            reply.as_ref(),
            AckKind::Progress,
            false,
            "renewing a fetched message's visibility timeout (in-progress ack)",
        )
        .await
        {
            Ok(()) => since.renewed(now),
            Err(e) if e.kind() == ErrorKind::Closed => return Tick::Stop,
            Err(e) => {
                // The connection is down: the next tick tries again, and a message whose
                // timeout runs out meanwhile is dropped then.
                tracing::warn!(
                    stream = %stream, consumer = %consumer, error = %e,
                    "renewing fetched messages failed"
                );
                break;
            }
        }
    }
    Tick::Renewing
}

/// A delivery's place in its consumer's count of deliveries handed out and not settled
/// ([`Pull::outstanding`]): taken when the delivery is handed out, given back exactly once,
/// when the delivery is settled or its acker dropped unsettled.
struct Handout {
    outstanding: Arc<AtomicUsize>,
    held: AtomicBool,
}

impl Handout {
    fn new(outstanding: &Arc<AtomicUsize>) -> Self {
        outstanding.fetch_add(1, Ordering::AcqRel);
        Handout {
            outstanding: Arc::clone(outstanding),
            held: AtomicBool::new(true),
        }
    }

    /// Gives the place back, the first time only.
    fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Handout {
    fn drop(&mut self) {
        self.release();
    }
}

/// Settles one delivery through its `$JS.ACK` reply subject.
struct NatsAcker {
    shared: Arc<Shared>,
    reply: Option<Subject>,
    /// The stream and consumer that delivered the message.
    stream: Arc<str>,
    consumer: Arc<str>,
    /// The consumer's `ack_wait`, the visibility timeout [`Acker::renew`] starts over.
    ack_wait: Duration,
    /// No later than when the server started this delivery's `ack_wait` (see
    /// [`AheadState::received`]) or restarted it for a renewal, the renewal task's too. The
    /// server cannot tell a stale delivery of a message from the one pending now (a `+WPI`
    /// restarts the timer of whichever is pending), so this is how a renewal knows the
    /// timeout ran out.
    since: Arc<Since>,
    /// Counts the delivery as handed out and unsettled until it is settled (its ack, nack or
    /// delayed nack succeeded) or this acker is dropped.
    handout: Handout,
}

/// Sends `kind` to the `$JS.ACK` subject `reply` of a message consumer `consumer` of stream
/// `stream` delivered: as a request the server answers when `confirm`, else published.
async fn send_ack(
    shared: &Shared,
    (stream, consumer): (&str, &str),
    reply: Option<&Subject>,
    kind: AckKind,
    confirm: bool,
    what: &str,
) -> Result<()> {
    let _op = shared.begin()?;
    let Some(reply) = reply.cloned() else {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{what}: the message has no reply subject (not a JetStream message)"),
        ));
    };
    let payload: Bytes = kind.into();
    // Bounded as a whole: while the client reconnects it queues commands, and once its queue
    // is full (publishes tried during the outage fill it) a send waits for room with no limit
    // of its own, so acks, nacks and renewals, and `close` behind them, hung until NATS came
    // back (outside review). Unsent, the delivery comes back after its ack wait.
    let limit = shared.config.request_timeout;
    match tokio::time::timeout(
        limit,
        send_ack_now(shared, (stream, consumer), reply, payload, confirm, what),
    )
    .await
    {
        Ok(sent) => sent,
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "{what}: NATS did not take it within {limit:?} (request_timeout); the client may be reconnecting. Unsettled, the delivery comes back after its ack wait"
            ),
        )),
    }
}

/// [`send_ack`] without its time limit.
async fn send_ack_now(
    shared: &Shared,
    (stream, consumer): (&str, &str),
    reply: Subject,
    payload: Bytes,
    confirm: bool,
    what: &str,
) -> Result<()> {
    if confirm {
        match shared.client.request(reply, payload).await {
            Ok(_) => {}
            // Nothing answers the acknowledgement of a deleted consumer: that is no
            // outage to wait out, and retrying could never succeed.
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && !consumer_exists(shared, stream, consumer).await =>
            {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "{what}: consumer `{consumer}` of stream `{stream}` no longer exists (its topic or queue was deleted, or its anonymous subscription ended); the delivery cannot be settled"
                    ),
                ));
            }
            Err(e) => return Err(crate::error::from_request(e, what)),
        }
    } else {
        shared
            .client
            .publish(reply, payload)
            .await
            .map_err(|e| crate::error::build(e, what, (ErrorKind::Connection, None, "")))?;
    }
    Ok(())
}

impl NatsAcker {
    async fn send(&self, kind: AckKind, confirm: bool, what: &str) -> Result<()> {
        send_ack(
            &self.shared,
            (&self.stream, &self.consumer),
            self.reply.as_ref(),
            kind,
            confirm,
            what,
        )
        .await
    }

    /// Sends a settlement (ack, nack, delayed nack); once it succeeded, the delivery no
    /// longer counts as unsettled. A failed one leaves it unsettled: core may settle it again,
    /// or drop it (which gives its count back too).
    async fn settle(&self, kind: AckKind, confirm: bool, what: &str) -> Result<()> {
        self.send(kind, confirm, what).await?;
        self.handout.release();
        Ok(())
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self, _tag: u64) -> Result<()> {
        self.settle(AckKind::Ack, self.shared.config.double_ack, "acknowledging")
            .await
    }

    async fn nack(&self, _tag: u64) -> Result<()> {
        self.settle(AckKind::Nak(None), false, "negatively acknowledging")
            .await
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, _tag: u64, delay: Duration) -> Result<()> {
        self.settle(
            AckKind::Nak(Some(delay)),
            false,
            "negatively acknowledging with a delay",
        )
        .await
    }

    async fn renew(&self, _tag: u64) -> Result<()> {
        let now = Instant::now();
        if !self.since.renewable(now, self.ack_wait) {
            return Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "the delivery's visibility timeout ({:?}) ran out (or was about to) before \
                     it was renewed: consumer `{}` of stream `{}` hands the message out again",
                    self.ack_wait, self.consumer, self.stream
                ),
            ));
        }
        // A request: the server answers an in-progress ack once it has restarted the timer.
        self.send(
            AckKind::Progress,
            true,
            "renewing a delivery's visibility timeout (in-progress ack)",
        )
        .await?;
        // The server restarted it after `now`; a renewal started later may have landed first.
        self.since.renewed(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_requests_expire_within_the_last_fifth_of_fetch_wait_and_not_in_step() {
        let fetch_wait = Duration::from_secs(1);
        let expiries: Vec<Duration> = (0..64).map(|_| request_expiry(fetch_wait)).collect();
        for expiry in &expiries {
            assert!(
                *expiry <= fetch_wait && *expiry > fetch_wait * 4 / 5,
                "a request expiring after {expiry:?} (fetch_wait {fetch_wait:?})"
            );
        }
        let distinct: std::collections::HashSet<_> = expiries.iter().collect();
        assert!(
            distinct.len() > 32,
            "64 requests expired after only {} different times: {expiries:?}",
            distinct.len()
        );
        // Too short to spread: as configured.
        assert_eq!(
            request_expiry(Duration::from_nanos(4)),
            Duration::from_nanos(4)
        );
    }

    #[test]
    fn a_long_value_is_quoted_short_in_the_error_of_a_structured_message() {
        // The error is the dead-letter reason, an attribute of the record: as long as the
        // value, it made the record too large for the dead-letter queue, forever.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        headers.insert(crate::publisher::ENCODED_HEADER, "ce-x");
        headers.insert("ce-x", format!("%ZZ{}", "v".repeat(512 * 1024)).as_str());
        let message = async_nats::Message {
            subject: "s".into(),
            reply: None,
            payload: bytes::Bytes::from_static(b"{}"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let err = decode(&message).unwrap_err();
        assert_eq!(err.kind(), evbus::ErrorKind::InvalidEvent);
        assert!(err.message().len() < 1024, "{} bytes", err.message().len());
        assert!(
            err.message().contains("percent-encoded"),
            "{}",
            &err.message()[..200]
        );
    }
}
