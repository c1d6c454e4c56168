//! Consumers: a task per consumer reading its consumer group, and the [`Acker`] that settles
//! each delivery.
//!
//! The task owns a dedicated connection. It decodes what it fetches into a buffer it shares
//! with the subscription's stream: the stream hands out a buffered delivery on the spot. Once
//! the buffer is down to half the in-flight limit it asks the task to *read ahead* (an
//! `XREADGROUP` without `BLOCK`, so the next entries arrive while these are handled), and
//! when the buffer is empty it asks the task for the next delivery. Either way the task
//! fetches only the consumer's free in-flight slots: the limit less the deliveries handed
//! out and unsettled and the entries already buffered, a delivery whose ack is being sent
//! counting as settled (so a read overlaps the ack batch before it). Fetched entries never
//! exceed the limit, and the buffer keeps their stream order:
//!
//! 1. *takeover* (every `claim_interval`, at least twice per visibility timeout, and at once
//!    after a local nack): the [`RECLAIM`](crate::scripts::RECLAIM) script claims pending
//!    entries idle for the visibility timeout (their consumer vanished, or they were nacked),
//!    skipping delayed redeliveries not yet due; the attempt is the entry's delivery count;
//! 2. otherwise `XREADGROUP ... COUNT n BLOCK ms STREAMS key >` for new entries (attempt 1).
//!
//! A blocking read is interrupted with `CLIENT UNBLOCK` (never by dropping it, which would
//! lose the entries of its reply) when the subscription is dropped, the transport closes or
//! a local nack wants a takeover now. Entries fetched but never handed out are given back
//! ([`RELEASE`](crate::scripts::RELEASE)) when the consumer stops, and after a lost reply.
//!
//! Acks are group-committed per consumer: an ack joins the consumer's queue of waiting acks,
//! and one flush task at a time settles up to [`MAX_ACK_BATCH`] of them, then hands each
//! caller the result for its own entry. A lone ack starts a flush at once (no timer); acks
//! arriving while a flush is in flight wait for it and go together in the next one. Nacks
//! are not batched. A topic's delivery acknowledged within half its visibility timeout goes
//! as a plain `XACK` (one pipeline for the batch): no evbus consumer can have taken it over
//! yet, because the takeover script waits out the holder's own timeout, read from its name
//! (ADR 0021). Every other ack goes through one [`ACK_BATCH`](crate::scripts::ACK_BATCH)
//! script call, which checks the entry is still this consumer's, with the same delivery
//! count, and deletes what it settles on queues.
//!
//! A renewal ([`RENEW`](crate::scripts::RENEW)) makes the same check, then `XCLAIM`s the
//! entry to this same consumer with `JUSTID`: its idle time starts again from 0 and its
//! delivery count stays, so every consumer's takeover waits a whole timeout from the
//! renewal. The delivery's plain-ack window then runs from when the renewal was sent
//! ([`RedisAcker::idle_since`]), not from the fetch. A delivery idle for its whole timeout,
//! or given back by a nack meanwhile (idle "forever"), is not renewed.
//!
//! Entries wait in the buffer for the consumer, and their visibility timeouts run there. So
//! that a consumer in use but slower than a timeout per buffer-full still gets them on their
//! first attempt and in order, the task renews them every third of the visibility timeout
//! (the oldest buffered entry's fetch or last renewal decides when), with one
//! [`RENEW_BATCH`](crate::scripts::RENEW_BATCH) call for all of them: it makes the same checks
//! as `RENEW`, so an entry another consumer took over is never claimed back, and an entry
//! whose renewal is refused is dropped from the buffer (never handed out), as an entry found
//! timed out there is. This holds only while the subscription's stream was polled within the
//! last visibility timeout: a consumer that stopped reading (hung, or just holding the
//! subscription) must not hold events for ever, so its buffered entries time out as they did
//! before, and any consumer takes them over. An empty buffer costs no timer at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::raw::{Acker, Backoff, RawDelivery, ReadClock, Undecodable};
use evbus::{ConsumerOptions, Error, ErrorKind, Event, Result};
use futures::Stream;
use redis::{RedisError, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::connection::{self, BlockingConnection, RedisConn, bytes_of, int_of, string_of};
use crate::error::{from_redis, is_no_group};
use crate::keys::{ANONYMOUS_GROUP_PREFIX, StreamKeys};
use crate::publisher::DATA_FIELD;
use crate::scripts::{
    self, GIVEN_BACK, NOT_PENDING, RAN_OUT, RELEASED_IDLE_MS, SETTLED, TAKEN_OVER, TRIMMED,
};
use crate::transport::{RedisTransport, Shared};

/// The type of the placeholder event dead-lettered in place of an entry that is not a
/// CloudEvent (see the crate README).
pub use evbus::raw::UNDECODABLE_EVENT_TYPE;

/// How often a consumer of a trimmed topic checks how far its subscription lags.
const LAG_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Most acks merged into one settlement script call (keeps each call short: the server runs
/// a script without serving anyone else).
const MAX_ACK_BATCH: usize = 128;

/// Most entries one takeover script call claims. The script runs in Redis as one command,
/// claiming entry by entry: a consumer with many free slots (a look at a large dead-letter
/// queue holds thousands) once claimed 65,535 in one call and blocked the server for over a
/// second. The rest of the pending list is scanned at the next fetches.
const RECLAIM_BATCH: usize = 256;

/// Most new entries one `XREADGROUP` asks for (one of 30,000 took Redis 68 ms).
const READ_BATCH: usize = 1024;

/// Shortest visibility timeout whose deliveries may be acknowledged with a plain `XACK`
/// (see [`plain_ack_safe`]): below it, half the timeout is too thin a margin for a slow
/// network or a busy connection.
const PLAIN_ACK_MIN_VISIBILITY: Duration = Duration::from_secs(1);

/// What a consumer needs to know about the group it reads.
pub(crate) struct ConsumerSpec {
    pub(crate) keys: StreamKeys,
    pub(crate) group: String,
    /// `topic/group` or the queue name, for dead-letter records and logs.
    pub(crate) origin: String,
    /// An anonymous subscription's group is destroyed when its consumer stops.
    pub(crate) anonymous: bool,
    /// Queues delete acknowledged entries.
    pub(crate) delete_on_ack: bool,
    /// Warn when the group lags close to the retention limit.
    pub(crate) check_lag: bool,
    pub(crate) options: ConsumerOptions,
    /// The destination's deletion mark when the subscription was made (before its group
    /// was): a group found gone under another mark was deleted, under the same one lost.
    pub(crate) deletion_mark: Option<String>,
}

/// When an anonymous subscription's group was made (Unix ms, from its name); `None` for
/// any other group.
fn anonymous_group_created(group: &str) -> Option<u64> {
    group
        .strip_prefix(ANONYMOUS_GROUP_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The name of a new anonymous subscription's group: `evbus.anonymous.<unix ms>.<random>`.
pub(crate) fn anonymous_group_name() -> String {
    format!(
        "{ANONYMOUS_GROUP_PREFIX}{}.{}",
        unix_millis(),
        uuid::Uuid::now_v7().simple()
    )
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// An entry's delivery count exactly as Redis reports it (the integer of `XPENDING`): the
/// settlement scripts compare it with the entry's count in Redis, so it is never clamped. A
/// stock client may set any count (`XCLAIM ... RETRYCOUNT`), beyond `u32::MAX` too; past
/// `i64::MAX` Redis itself reports it negative, and it is carried as such.
type DeliveryCount = i64;

/// The attempt number of a delivery with `count`, as shown to the application: the count,
/// saturating at `u32::MAX` (a count Redis reports negative is past `i64::MAX`), at least 1.
fn attempt_of(count: DeliveryCount) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX).max(1)
}

/// The delivery count an entry given back gets: the one it had before this consumer took it.
fn count_before(count: DeliveryCount) -> DeliveryCount {
    match count {
        1.. => count - 1,
        0 => 0,
        // Reported negative: past `i64::MAX`, the most `RETRYCOUNT` takes.
        _ => i64::MAX,
    }
}

/// State shared by a consumer's task and the ack handles of its deliveries.
struct ConsumerState {
    shared: Arc<Shared>,
    keys: StreamKeys,
    group: String,
    consumer: String,
    delete_on_ack: bool,
    /// Entries fetched and decoded, not handed out yet. Lock order: `buffer`, then `held`.
    buffer: Mutex<VecDeque<Buffered>>,
    /// Deliveries handed out and not settled (or dropped) yet: `(entry id, delivery count)`.
    held: Mutex<HashSet<(String, DeliveryCount)>>,
    visibility: Duration,
    /// A takeover scan is wanted now (set by a nack).
    reclaim_now: AtomicBool,
    wake: Notify,
    /// Acks waiting for the next settlement script call.
    acks: Mutex<AckQueue>,
    /// The consumer's in-flight limit.
    max_in_flight: usize,
    /// A read-ahead was asked of the task and has not run yet.
    reading_ahead: AtomicBool,
    /// The consumer task stopped (a named group's consumer: it leaves the group once it
    /// holds no delivery, see [`ConsumerState::leave_when_settled`]).
    ended: AtomicBool,
    /// Leaving the group was started (once).
    leaving: AtomicBool,
    /// When the subscription's stream was last polled: buffered entries are renewed only
    /// while it was polled within the visibility timeout.
    read: ReadClock,
}

impl ConsumerState {
    fn held(&self) -> MutexGuard<'_, HashSet<(String, DeliveryCount)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn buffer(&self) -> MutexGuard<'_, VecDeque<Buffered>> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out the next buffered delivery, if there is one: called by the stream itself
    /// (no round trip to the consumer task) and by the task.
    fn take_buffered(self: &Arc<Self>) -> Option<(Handed, String, DeliveryCount)> {
        let mut buffer = self.buffer();
        while let Some(entry) = buffer.pop_front() {
            if !entry.trimmed && entry.at.elapsed() >= self.visibility {
                // Its visibility timeout ran out while it waited here: any consumer (this
                // one included) takes it over with its next scan.
                continue;
            }
            let Buffered {
                id,
                count,
                payload,
                at,
                trimmed,
            } = entry;
            // Held before the buffer lock is released, so `recover` (which takes both locks)
            // always finds the entry in one of the two.
            self.held().insert((id.clone(), count));
            let acker = RedisAcker {
                state: Arc::clone(self),
                id: id.clone(),
                count,
                idle_since: Mutex::new(at),
                held: AtomicBool::new(true),
            };
            // The acker is per delivery (it holds the entry id): tag 0.
            let attempt = attempt_of(count);
            let raw = match payload {
                Ok(event) => RawDelivery::new(event, attempt, Arc::new(acker), 0),
                // Not a CloudEvent: core dead-letters it and acks it through the acker.
                Err(message) => RawDelivery::undecodable(*message, attempt, Arc::new(acker), 0),
            };
            let expires = (!trimmed).then(|| at + self.visibility);
            return Some((Handed { raw, expires }, id, count));
        }
        None
    }

    fn acks(&self) -> MutexGuard<'_, AckQueue> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many more entries a read may fetch: the in-flight limit less the deliveries
    /// handed out and unsettled and the entries already buffered. A delivery whose ack is on
    /// its way counts as settled: reading only for the slots already free would shrink
    /// reads to a single entry while a batch of acks is sent (the read runs alongside the
    /// ack batch instead).
    fn free_slots(&self) -> usize {
        let settling = self.acks().settling();
        let unsettled = self.held().len().saturating_sub(settling);
        let buffered = self.buffer().len();
        self.max_in_flight.saturating_sub(unsettled + buffered)
    }

    /// Called by the stream after it handed out a buffered delivery: once the buffer is
    /// down to half the in-flight limit, asks the task to read ahead (one request at a time),
    /// so the next entries are fetched while these are handled.
    fn want_read_ahead(&self, requests: &mpsc::Sender<Request>) {
        if self.buffer().len() * 2 > self.max_in_flight
            || self.reading_ahead.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if requests.try_send(Request::ReadAhead).is_err() {
            self.reading_ahead.store(false, Ordering::Release);
        }
    }
}

impl ConsumerState {
    /// Once the consumer task stopped and no delivery of this consumer is held any more
    /// (settled, given back or dropped: none can be settled through it again), leaves the
    /// group, at most once: at the task's end if it holds nothing, else after the last
    /// settlement, which may come after the subscription was dropped (a look at a
    /// dead-letter queue gives back what it saw after dropping its subscription). Called
    /// after each delivery leaves the held set.
    fn leave_when_settled(self: &Arc<Self>) {
        if !self.ended.load(Ordering::SeqCst) || !self.held().is_empty() {
            return;
        }
        // Outside a runtime (a delivery dropped as its runtime shuts down) nothing can run:
        // the consumer stays in the group, as after a crash.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.leaving.swap(true, Ordering::SeqCst) {
            return;
        }
        let state = Arc::clone(self);
        self.shared.tasks.spawn_on(
            async move {
                let mut conn = state.shared.conn();
                state.leave(&mut conn).await;
            },
            &runtime,
        );
    }

    /// Leaves the group ([`scripts::LEAVE`]): moves the entries this consumer gave back to
    /// [`scripts::RELEASED_HOLDER`], then removes it unless it still owns others. Only once
    /// it holds no delivery.
    async fn leave(&self, conn: &mut RedisConn) {
        let timeout = self.shared.config.command_timeout;
        loop {
            let mut invocation = scripts::LEAVE.key(&self.keys.stream);
            invocation
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(scripts::RELEASED_HOLDER)
                .arg(scripts::LEAVE_BATCH)
                .arg(RELEASED_IDLE_MS);
            let call = invocation.invoke_async::<i64>(conn);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(scripts::MORE)) => continue,
                Ok(Ok(scripts::KEPT)) => {
                    tracing::debug!(
                        stream = %self.keys.stream,
                        group = %self.group,
                        consumer = %self.consumer,
                        "a stopped consumer stays in its group: it owns entries it did not give back (taken over after the visibility timeout)"
                    );
                    return;
                }
                Ok(Ok(scripts::LEFT)) => return,
                Ok(Ok(other)) => {
                    tracing::debug!(stream = %self.keys.stream, group = %self.group, result = other, "unexpected result leaving the consumer group");
                    return;
                }
                Ok(Err(e)) if is_no_group(&e) => return,
                Ok(Err(e)) => {
                    tracing::debug!(stream = %self.keys.stream, group = %self.group, error = %e, "could not leave the consumer group");
                    return;
                }
                Err(_) => {
                    tracing::debug!(stream = %self.keys.stream, group = %self.group, "leaving the consumer group timed out");
                    return;
                }
            }
        }
    }
}

/// What the subscription's stream asks of the consumer task.
enum Request {
    /// The buffer is empty: fetch (blocking until entries arrive) and hand out the next one.
    Deliver(oneshot::Sender<Handed>),
    /// The buffer is running low: fetch what is already there, without waiting.
    ReadAhead,
}

/// The outcome of one ack in a batch: a settlement script result, or the error of the call.
type AckOutcome = std::result::Result<i64, RedisError>;

/// An ack waiting for its batch.
struct AckRequest {
    id: String,
    count: DeliveryCount,
    /// When the request that last started the entry's idle time was sent (see
    /// [`RedisAcker::idle_since`]).
    idle_since: Instant,
    reply: oneshot::Sender<AckOutcome>,
}

/// A consumer's acks not yet sent to Redis, and whether a flush task is running (at most one
/// per consumer; it drains the queue before it ends).
#[derive(Default)]
struct AckQueue {
    waiting: Vec<AckRequest>,
    flushing: bool,
    /// Acks of the batch the flush task is sending now.
    sending: usize,
}

impl AckQueue {
    /// Acks requested and not answered yet: their entries are still held, but their slots
    /// are as good as free.
    fn settling(&self) -> usize {
        self.waiting.len() + self.sending
    }
}

/// Attaches a new consumer to `spec.group` and returns its stream of deliveries.
pub(crate) async fn start(
    transport: &RedisTransport,
    spec: ConsumerSpec,
) -> Result<impl Stream<Item = Result<RawDelivery>> + Send + 'static> {
    let shared = Arc::clone(&transport.shared);
    let consumer = consumer_name(spec.options.visibility_timeout);
    // Register the consumer now, so XINFO shows it (and the anonymous sweeper sees it alive)
    // before its first read.
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATECONSUMER")
        .arg(&spec.keys.stream)
        .arg(&spec.group)
        .arg(&consumer);
    shared
        .query::<Value>(
            &create,
            &format!(
                "joining consumer group `{}` on `{}`",
                spec.group, spec.keys.stream
            ),
        )
        .await?;
    let state = Arc::new(ConsumerState {
        shared: Arc::clone(&shared),
        keys: spec.keys,
        group: spec.group,
        consumer,
        delete_on_ack: spec.delete_on_ack,
        buffer: Mutex::new(VecDeque::new()),
        held: Mutex::new(HashSet::new()),
        visibility: spec.options.visibility_timeout,
        reclaim_now: AtomicBool::new(false),
        wake: Notify::new(),
        acks: Mutex::new(AckQueue::default()),
        max_in_flight: spec.options.max_in_flight.max(1),
        reading_ahead: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        leaving: AtomicBool::new(false),
        read: ReadClock::new(),
    });
    let config = &shared.config;
    let visibility = spec.options.visibility_timeout;
    let claim_interval = config
        .claim_interval
        .min((visibility / 2).max(Duration::from_millis(10)));
    let now = Instant::now();
    let stream_state = Arc::clone(&state);
    let task = ConsumerTask {
        conn: BlockingConnection::new(shared.client.clone(), config, &state.keys.stream),
        backoff: connection::backoff(config),
        cancel: shared.cancel.child_token(),
        state,
        visibility,
        claim_interval,
        origin: spec.origin,
        anonymous: spec.anonymous,
        check_lag: spec.check_lag,
        deletion_mark: spec.deletion_mark,
        deleted: false,
        last_read: None,
        started_ms: unix_millis(),
        unsent: Vec::new(),
        cursor: "-".to_owned(),
        next_reclaim: now,
        next_lag_check: now,
        needs_recovery: false,
        renew_interval: (visibility / 3).max(Duration::from_millis(1)),
        renewals_resume: now,
    };
    let (requests, inbox) = mpsc::channel::<Request>(2);
    shared.tasks.spawn(task.run(inbox));
    let polled = Arc::clone(&stream_state);
    let stream = (requests, stream_state);
    let mut deliveries = Box::pin(futures::stream::unfold(
        stream,
        |(requests, state)| async move {
            if let Some((handed, _, _)) = state.take_buffered() {
                state.want_read_ahead(&requests);
                return Some((Ok(handed.raw), (requests, state)));
            }
            loop {
                let (reply, delivery) = oneshot::channel();
                requests.send(Request::Deliver(reply)).await.ok()?;
                let handed = delivery.await.ok()?;
                // The reply may have waited for a consumer that stopped reading (a handler
                // busy elsewhere): past its visibility timeout another consumer may have
                // taken the entry over, so it is dropped here (and taken over by a scan, this
                // consumer's included), as a stale entry of the buffer is.
                if handed.expires.is_some_and(|at| Instant::now() >= at) {
                    continue;
                }
                return Some((Ok(handed.raw), (requests, state)));
            }
        },
    ));
    // Every poll is noted: the task renews buffered entries only while the stream is read.
    Ok(futures::stream::poll_fn(move |cx| {
        polled.read.mark();
        deliveries.as_mut().poll_next(cx)
    }))
}

/// A delivery the task hands to the stream in reply to [`Request::Deliver`].
struct Handed {
    raw: RawDelivery,
    /// When its visibility timeout runs out, counted from the fetch (`None`: trimmed, so it
    /// is handed out however late; see [`Buffered::trimmed`]).
    expires: Option<Instant>,
}

/// One entry fetched and decoded, not yet handed out.
struct Buffered {
    id: String,
    count: DeliveryCount,
    /// The event, or the entry as an undecodable message.
    payload: std::result::Result<Event, Box<Undecodable>>,
    /// When the request that fetched it was sent: Redis made the delivery after this.
    at: Instant,
    /// Trimmed from the stream (retention) since it was fetched, as a renewal found: it is
    /// not renewed (`XCLAIM` would delete it from the pending list), and it is handed out
    /// even after its timeout ran out, as nobody else can have it (a takeover deletes it).
    trimmed: bool,
}

/// One entry as fetched from the stream.
struct Fetched {
    id: String,
    count: DeliveryCount,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// When the request that fetched it was sent.
    at: Instant,
}

enum Step {
    Deliver(Box<Handed>, String, DeliveryCount),
    /// The subscription went away or the transport is closing.
    Interrupted,
    /// The stream or group was deleted.
    End,
}

struct ConsumerTask {
    state: Arc<ConsumerState>,
    conn: BlockingConnection,
    backoff: Backoff,
    cancel: CancellationToken,
    visibility: Duration,
    claim_interval: Duration,
    origin: String,
    anonymous: bool,
    check_lag: bool,
    /// See [`ConsumerSpec::deletion_mark`].
    deletion_mark: Option<String>,
    /// The destination was found deleted (another deletion mark) by the periodic look.
    deleted: bool,
    /// The id of the last new entry this consumer read (`XREADGROUP ... >`), and when it
    /// started (Unix ms): where a lost group of a topic is made again.
    last_read: Option<String>,
    started_ms: u64,
    /// Fetched entries whose hand-out failed (the subscription was dropped meanwhile).
    unsent: Vec<(String, DeliveryCount)>,
    cursor: String,
    next_reclaim: Instant,
    next_lag_check: Instant,
    needs_recovery: bool,
    /// How often buffered entries are renewed: a third of the visibility timeout.
    renew_interval: Duration,
    /// No renewal before this: set when a renewal was skipped (the stream was not polled) or
    /// failed, so the check waits a while instead of running again at once.
    renewals_resume: Instant,
}

impl ConsumerTask {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        loop {
            // The buffer fills only here, in the task, so the renewal time worked out now
            // holds until the task acts again. While the task serves a `Deliver` request the
            // buffer is empty (the stream asks only then), so nothing waits unrenewed.
            let renewal = self.renewal_due();
            let renewal_due = async {
                match renewal {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut reply = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                request = requests.recv() => match request {
                    Some(Request::Deliver(reply)) => reply,
                    Some(Request::ReadAhead) => {
                        self.read_ahead().await;
                        continue;
                    }
                    None => break,
                },
                () = renewal_due, if renewal.is_some() => {
                    self.renew_buffered().await;
                    continue;
                }
            };
            match self.next_delivery(&mut reply).await {
                Step::Deliver(raw, id, count) => {
                    if reply.send(*raw).is_err() {
                        self.unsent.push((id, count));
                    }
                }
                Step::Interrupted => {}
                Step::End => break,
            }
        }
        drop(requests);
        self.shutdown().await;
    }

    async fn next_delivery(&mut self, reply: &mut oneshot::Sender<Handed>) -> Step {
        loop {
            if let Some((handed, id, count)) = self.state.take_buffered() {
                return Step::Deliver(Box::new(handed), id, count);
            }
            if self.cancel.is_cancelled() || reply.is_closed() {
                return Step::Interrupted;
            }
            match self.fetch(reply).await {
                Ok(()) if self.deleted => {
                    tracing::warn!(
                        origin = %self.origin,
                        "the topic or queue was deleted (and its group made again since); the \
                         subscription ends"
                    );
                    return Step::End;
                }
                Ok(()) => self.backoff.reset(),
                Err(e) if is_no_group(&e) => match self.group_lost().await {
                    Ok(false) => {
                        tracing::warn!(
                            origin = %self.origin,
                            "the topic or queue was deleted; the subscription ends"
                        );
                        return Step::End;
                    }
                    Ok(true) => {
                        self.backoff.reset();
                        self.cursor = "-".to_owned();
                    }
                    Err(error) => {
                        let delay = self.backoff.next_delay();
                        tracing::warn!(
                            origin = %self.origin, %error, retry_in = ?delay,
                            "the consumer group is gone and whether it was deleted could not \
                             be read; trying again"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.cancel.cancelled() => return Step::Interrupted,
                            _ = reply.closed() => return Step::Interrupted,
                        }
                    }
                },
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    let error = crate::error::from_redis(e, "consuming");
                    if error.is_retryable() {
                        tracing::warn!(
                            origin = %self.origin,
                            %error,
                            retry_in = ?delay,
                            "Redis consumer lost its connection; reconnecting"
                        );
                    } else {
                        // A refusal reconnecting does not cure (a missing ACL permission, a
                        // key of another type): said as such, at every retry, for an operator
                        // to fix; the subscription keeps trying meanwhile.
                        tracing::error!(
                            origin = %self.origin,
                            %error,
                            retry_in = ?delay,
                            "Redis refuses this consumer's commands; nothing is delivered until \
                             that is fixed (check the user's ACL: the adapter README lists the \
                             commands it needs)"
                        );
                    }
                    self.conn.reset();
                    self.needs_recovery = true;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => return Step::Interrupted,
                        _ = reply.closed() => return Step::Interrupted,
                    }
                }
            }
        }
    }

    /// The group is gone: `false` if its topic or queue was deleted since the subscription
    /// was made (another deletion mark than it saw then); else the group was lost (a Redis
    /// restarted without it: no AOF, a failover, `FLUSHALL`), and it is made again at the
    /// start of the stream, `true`. Ending then, as on a deletion, left every later event
    /// unread (outside review).
    async fn group_lost(&mut self) -> evbus::Result<bool> {
        let shared = &self.state.shared;
        let mark = shared.deletion_mark(&self.state.keys).await?;
        if mark.is_some() && mark != self.deletion_mark {
            return Ok(false);
        }
        let start = self.restart_id();
        tracing::error!(
            origin = %self.origin,
            group = %self.state.group,
            %start,
            "the consumer group is gone, but its topic or queue was not deleted: Redis lost \
             it (restarted without AOF, a failover to a replica without it, FLUSHALL, or \
             another process's sweep of anonymous groups); making it again after what this \
             consumer read (deliveries it held pending are gone with it)"
        );
        shared
            .ensure_group(&self.state.keys.stream, &self.state.group, &start)
            .await?;
        Ok(true)
    }

    /// Where a lost group is made again. A queue: at its start (acked entries are deleted,
    /// so what is left was never acked). A topic: after the last new entry this consumer
    /// read, else from when the subscription began (an anonymous group's name carries its
    /// creation time, a named one's consumer when it started): never its history again.
    fn restart_id(&self) -> String {
        if self.state.delete_on_ack {
            return "0".to_owned();
        }
        if let Some(id) = &self.last_read {
            return id.clone();
        }
        let began = anonymous_group_created(&self.state.group).unwrap_or(self.started_ms);
        format!("{began}-0")
    }

    /// Fills the buffer (or returns after a blocking read found nothing).
    async fn fetch(
        &mut self,
        reply: &mut oneshot::Sender<Handed>,
    ) -> std::result::Result<(), RedisError> {
        let free = self.state.free_slots().max(1);
        if self.needs_recovery {
            self.recover().await?;
            self.needs_recovery = false;
            self.next_reclaim = Instant::now();
        }
        let now = Instant::now();
        if self.state.reclaim_now.swap(false, Ordering::AcqRel) || now >= self.next_reclaim {
            if now >= self.next_reclaim {
                // A deletion whose group was made again at once (another process subscribed
                // under the same name before this consumer read) shows no `NOGROUP`: its mark
                // does.
                let mark: Option<String> = redis::cmd("GET")
                    .arg(&self.state.keys.deleted)
                    .query_async(&mut self.conn.get().await?.clone())
                    .await?;
                if mark.is_some() && mark != self.deletion_mark {
                    self.deleted = true;
                    return Ok(());
                }
            }
            self.next_reclaim = now + self.claim_interval;
            if self.reclaim(free).await? > 0 {
                return Ok(());
            }
        }
        if self.check_lag && now >= self.next_lag_check {
            self.next_lag_check = now + LAG_CHECK_INTERVAL;
            self.warn_on_lag().await;
        }
        let block = self
            .next_reclaim
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), self.state.shared.config.block);
        self.read_new(free, block, reply).await
    }

    /// `XREADGROUP ... >`: new entries, attempt 1.
    async fn read_new(
        &mut self,
        count: usize,
        block: Duration,
        reply: &mut oneshot::Sender<Handed>,
    ) -> std::result::Result<(), RedisError> {
        let mut conn = self.conn.get().await?.clone();
        let client_id = self.conn.client_id();
        let state = &self.state;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&state.group)
            .arg(&state.consumer)
            .arg("COUNT")
            .arg(count.min(READ_BATCH))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&state.keys.stream)
            .arg(">");
        let at = Instant::now();
        let read = async move { cmd.query_async::<Value>(&mut conn).await };
        tokio::pin!(read);
        let mut unblocked = false;
        let value = loop {
            tokio::select! {
                value = &mut read => break value?,
                _ = interrupted(&self.cancel, state, reply), if !unblocked => {
                    // Never drop the read: its reply may carry entries now pending for us.
                    unblocked = true;
                    unblock(&state.shared, &state.keys.stream, client_id).await;
                }
            }
        };
        self.buffer_read_reply(value, at)
    }

    /// A read ahead of the stream: `XREADGROUP ... >` without `BLOCK`, for the free slots,
    /// into the buffer. A failure is left to the next fetch (which reconnects and recovers
    /// what a lost reply may have made pending).
    async fn read_ahead(&mut self) {
        let free = self.state.free_slots();
        let result = if free == 0 || self.needs_recovery || self.cancel.is_cancelled() {
            Ok(())
        } else {
            self.read_available(free).await
        };
        self.state.reading_ahead.store(false, Ordering::Release);
        if let Err(e) = result {
            tracing::debug!(origin = %self.origin, error = %e, "Redis read-ahead failed");
            self.conn.reset();
            self.needs_recovery = true;
        }
    }

    async fn read_available(&mut self, count: usize) -> std::result::Result<(), RedisError> {
        let mut conn = self.conn.get().await?.clone();
        let state = &self.state;
        let at = Instant::now();
        let value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&state.group)
            .arg(&state.consumer)
            .arg("COUNT")
            .arg(count.min(READ_BATCH))
            .arg("STREAMS")
            .arg(&state.keys.stream)
            .arg(">")
            .query_async::<Value>(&mut conn)
            .await?;
        self.buffer_read_reply(value, at)
    }

    /// Buffers the entries of an `XREADGROUP ... >` reply (attempt 1) to a read sent `at`.
    fn buffer_read_reply(
        &mut self,
        value: Value,
        at: Instant,
    ) -> std::result::Result<(), RedisError> {
        let fetched: Vec<Fetched> = parse_read_reply(value)?
            .into_iter()
            .map(|(id, fields)| Fetched {
                id,
                count: 1,
                fields,
                at,
            })
            .collect();
        if let Some(last) = fetched.last() {
            self.last_read = Some(last.id.clone());
        }
        self.buffer_fetched(fetched);
        Ok(())
    }

    /// Decodes fetched entries into the shared buffer; those that are not CloudEvents go in
    /// as undecodable messages (core dead-letters them). Returns how many were fetched.
    fn buffer_fetched(&mut self, fetched: Vec<Fetched>) -> usize {
        let n = fetched.len();
        let stream = &self.state.keys.stream;
        let decoded = fetched.into_iter().map(|mut f| {
            let payload = decode(&mut f.fields).map_err(|e| Box::new(undecodable(stream, &f, e)));
            Buffered {
                id: f.id,
                count: f.count,
                payload,
                at: f.at,
                trimmed: false,
            }
        });
        self.state.buffer().extend(decoded);
        n
    }

    /// When the buffered entries are next renewed: a third of the visibility timeout after
    /// the oldest one's fetch or last renewal (and not before `renewals_resume`). `None` when
    /// the buffer is empty, or when every buffered entry already timed out (none can be
    /// renewed: they wait for the stream to skip them, or to be given back at shutdown).
    fn renewal_due(&self) -> Option<Instant> {
        let buffer = self.state.buffer();
        // Trimmed entries are not renewed, and entries past their timeout are never handed
        // out (`take_buffered` drops them): neither may keep the renewal due (it would be
        // due at once, again and again).
        let renewable = || {
            buffer
                .iter()
                .filter(|b| !b.trimmed && b.at.elapsed() < self.visibility)
                .map(|b| b.at)
        };
        let oldest = renewable().min()?;
        Some((oldest + self.renew_interval).max(self.renewals_resume))
    }

    /// Renews every buffered entry still inside its visibility timeout
    /// ([`RENEW_BATCH`](scripts::RENEW_BATCH), one call per [`scripts::RENEW_BATCH_SIZE`]),
    /// if the stream was polled within the last timeout. A renewed entry's deadline then
    /// runs from when the call was sent (Redis reset its idle time after that); an entry
    /// whose renewal is refused (taken over, settled, given back or timed out) leaves the
    /// buffer. A failed call is retried after half a renewal interval, on a new connection;
    /// it changes nothing in Redis that would need recovering.
    async fn renew_buffered(&mut self) {
        let now = Instant::now();
        if !self.state.read.read_within(self.visibility) {
            // Nobody reads: the entries time out as they would without renewals, and any
            // consumer takes them over. Looked at again in a while, in case reading resumes.
            self.renewals_resume = now + self.renew_interval;
            return;
        }
        let entries: Vec<(String, DeliveryCount)> = self
            .state
            .buffer()
            .iter()
            .filter(|b| !b.trimmed && now.saturating_duration_since(b.at) < self.visibility)
            .map(|b| (b.id.clone(), b.count))
            .collect();
        if entries.is_empty() {
            return;
        }
        let sent = Instant::now();
        let timeout = self.state.shared.config.command_timeout;
        let renewed = match self.conn.get().await {
            Ok(conn) => tokio::time::timeout(timeout, renew_batch(conn, &self.state, &entries))
                .await
                .unwrap_or_else(|_| Err(unexpected("renewing buffered entries timed out"))),
            Err(e) => Err(e),
        };
        let results = match renewed {
            Ok(results) => results,
            Err(e) => {
                tracing::debug!(origin = %self.origin, error = %e, "could not renew the entries fetched ahead; retrying");
                self.conn.reset();
                self.renewals_resume = Instant::now() + self.renew_interval / 2;
                return;
            }
        };
        let outcome: HashMap<(&str, DeliveryCount), i64> = entries
            .iter()
            .map(|(id, count)| (id.as_str(), *count))
            .zip(results)
            .collect();
        let mut dropped = 0;
        self.state.buffer().retain_mut(|b| {
            match outcome.get(&(b.id.as_str(), b.count)) {
                Some(&SETTLED) => {
                    b.at = b.at.max(sent);
                    true
                }
                Some(&TRIMMED) => {
                    b.trimmed = true;
                    true
                }
                // Not sent (already timed out here), or taken by the stream meanwhile.
                None => true,
                Some(_) => {
                    dropped += 1;
                    false
                }
            }
        });
        if dropped > 0 {
            tracing::debug!(origin = %self.origin, dropped, "entries fetched ahead could not be renewed (taken over, settled or timed out) and are not handed out");
        }
    }

    /// Takes over entries idle past the visibility timeout, nacked, or due after a delay: at
    /// most [`RECLAIM_BATCH`] per script call, the scan going on at the next fetch.
    async fn reclaim(&mut self, count: usize) -> std::result::Result<usize, RedisError> {
        let count = count.min(RECLAIM_BATCH);
        let state = &self.state;
        let conn = self.conn.get().await?;
        let at = Instant::now();
        let value: Value = scripts::RECLAIM
            .key(&state.keys.stream)
            .key(&state.keys.delayed)
            .arg(&state.group)
            .arg(&state.consumer)
            .arg(self.visibility.as_millis() as u64)
            .arg(&self.cursor)
            .arg(count)
            .invoke_async(conn)
            .await?;
        let (cursor, claimed) = parse_reclaim_reply(value)?;
        if cursor != "-" {
            // More of the pending list to scan: go on at the next fetch.
            self.next_reclaim = Instant::now();
        }
        self.cursor = cursor;
        let fetched = claimed
            .into_iter()
            .map(|(id, fields, count)| Fetched {
                id,
                count,
                fields,
                at,
            })
            .collect();
        Ok(self.buffer_fetched(fetched))
    }

    /// After a lost reply, gives back what Redis may have handed to this consumer without
    /// the reply arriving: this consumer's pending entries that it neither holds nor buffers.
    async fn recover(&mut self) -> std::result::Result<(), RedisError> {
        let state = Arc::clone(&self.state);
        let conn = self.conn.get().await?;
        let pending: Value = redis::cmd("XPENDING")
            .arg(&state.keys.stream)
            .arg(&state.group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(&state.consumer)
            .query_async(conn)
            .await?;
        let lost: Vec<(String, DeliveryCount)> = {
            // Both locks, in order: an entry moves from the buffer to the held set under the
            // buffer lock, so it is always seen in one of them.
            let buffer = state.buffer();
            let held = state.held();
            let known: HashSet<&str> = held
                .iter()
                .map(|(id, _)| id.as_str())
                .chain(buffer.iter().map(|b| b.id.as_str()))
                .collect();
            parse_pending(&pending)
                .into_iter()
                .filter(|p| p.idle_ms < RELEASED_IDLE_MS)
                .filter(|p| !known.contains(p.id.as_str()))
                .map(|p| (p.id, p.count))
                .collect()
        };
        if lost.is_empty() {
            return Ok(());
        }
        let released = release(conn, &state, &lost).await?;
        tracing::debug!(origin = %self.origin, released, "gave back entries whose delivery reply was lost");
        Ok(())
    }

    /// Logs a warning when trimming is about to drop entries this group has not read.
    async fn warn_on_lag(&mut self) {
        let state = Arc::clone(&self.state);
        let Ok(conn) = self.conn.get().await else {
            return;
        };
        let info: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&state.keys.stream)
            .query_async(conn)
            .await
        {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "could not read consumer group lag");
                return;
            }
        };
        let Some(group) = parse_records(&info)
            .into_iter()
            .find(|g| g.get("name").and_then(string_of).as_deref() == Some(&state.group))
        else {
            return;
        };
        let lag = group.get("lag").and_then(int_of);
        let last_ms = group
            .get("last-delivered-id")
            .and_then(string_of)
            .and_then(|id| id.split('-').next()?.parse::<u64>().ok());
        let retention = state.shared.config.retention;
        if let Some(warning) = lag_warning(retention, lag, last_ms, unix_millis()) {
            tracing::warn!(origin = %self.origin, "{warning}");
        }
    }

    async fn shutdown(mut self) {
        let state = Arc::clone(&self.state);
        let mut give_back = std::mem::take(&mut self.unsent);
        // Under the buffer lock: whatever the stream did not take is given back, and the
        // stream cannot take it any more.
        give_back.extend(state.buffer().drain(..).map(|b| (b.id, b.count)));
        let timeout = state.shared.config.command_timeout;
        let mut conn = state.shared.conn();
        if !give_back.is_empty() {
            match tokio::time::timeout(timeout, release(&mut conn, &state, &give_back)).await {
                Ok(Ok(n)) => {
                    tracing::debug!(origin = %self.origin, released = n, "gave back undelivered entries");
                }
                Ok(Err(e)) => {
                    tracing::warn!(origin = %self.origin, error = %e, "could not give back undelivered entries; they are redelivered after the visibility timeout");
                }
                Err(_) => {
                    tracing::warn!(origin = %self.origin, "giving back undelivered entries timed out; they are redelivered after the visibility timeout");
                }
            }
        }
        if !self.anonymous {
            // Leaves the group now if no delivery is held, else after the last settlement
            // (deliveries outlive their subscription; leaving before they are settled would
            // keep this consumer for good, as it owns their entries then).
            state.ended.store(true, Ordering::SeqCst);
            if state.held().is_empty() && !state.leaving.swap(true, Ordering::SeqCst) {
                state.leave(&mut conn).await;
            }
            return;
        }
        let leave = remove_anonymous(&mut conn, &state.keys, &state.group);
        match tokio::time::timeout(timeout, leave).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_no_group(&e) => {}
            Ok(Err(e)) => {
                tracing::debug!(origin = %self.origin, error = %e, "could not remove the anonymous subscription")
            }
            Err(_) => {
                tracing::debug!(origin = %self.origin, "removing the anonymous subscription timed out")
            }
        }
    }
}

/// Completes when the current blocking read should be cut short: the transport closes, the
/// subscription was dropped, or a nack asked for a takeover scan (a wake-up left over from
/// a nack already handled is ignored).
async fn interrupted(
    cancel: &CancellationToken,
    state: &ConsumerState,
    reply: &mut oneshot::Sender<Handed>,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = reply.closed() => return,
            _ = state.wake.notified() => {
                if state.reclaim_now.load(Ordering::Acquire) {
                    return;
                }
            }
        }
    }
}

/// Ends a blocking read early (`CLIENT UNBLOCK`); the read then returns what it has.
/// On a cluster it goes to the master of the stream's slot, where the read blocks.
async fn unblock(shared: &Shared, stream: &str, client_id: Option<i64>) {
    let Some(id) = client_id else { return };
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("UNBLOCK").arg(id);
    let result = tokio::time::timeout(
        shared.config.command_timeout,
        shared.query_at_key(&cmd, stream, "CLIENT UNBLOCK"),
    )
    .await;
    if let Ok(Err(e)) = result {
        // Without it the read ends at its BLOCK timeout: slower, still correct.
        tracing::debug!(error = %e, "CLIENT UNBLOCK failed");
    }
}

async fn release<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    state: &ConsumerState,
    entries: &[(String, DeliveryCount)],
) -> std::result::Result<i64, RedisError> {
    let mut released = 0;
    for chunk in entries.chunks(256) {
        let mut invocation = scripts::RELEASE.key(&state.keys.stream);
        invocation.arg(&state.group).arg(&state.consumer);
        for (id, count) in chunk {
            invocation.arg(id).arg(*count).arg(count_before(*count));
        }
        released += invocation.invoke_async::<i64>(conn).await?;
    }
    Ok(released)
}

/// Renews `entries` ([`RENEW_BATCH`](scripts::RENEW_BATCH)): one script call per
/// [`scripts::RENEW_BATCH_SIZE`] entries, one result per entry, in order.
async fn renew_batch<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    state: &ConsumerState,
    entries: &[(String, DeliveryCount)],
) -> std::result::Result<Vec<i64>, RedisError> {
    let visibility_ms = u64::try_from(state.visibility.as_millis()).unwrap_or(u64::MAX);
    let mut results = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(scripts::RENEW_BATCH_SIZE) {
        let (low, high) = id_range(chunk.iter().map(|(id, _)| id.as_str()));
        let mut invocation = scripts::RENEW_BATCH.key(&state.keys.stream);
        invocation
            .arg(&state.group)
            .arg(&state.consumer)
            .arg(visibility_ms)
            .arg(RELEASED_IDLE_MS)
            .arg(low)
            .arg(high);
        for (id, count) in chunk {
            invocation.arg(id).arg(*count);
        }
        let answered: Vec<i64> = invocation.invoke_async(conn).await?;
        if answered.len() != chunk.len() {
            return Err(unexpected(
                "Redis answered a different number of renewal results",
            ));
        }
        results.extend(answered);
    }
    Ok(results)
}

/// Removes anonymous subscription `group` of `keys`: its consumer group and its members of
/// the delayed set ([`scripts::REMOVE_ANONYMOUS`]).
pub(crate) async fn remove_anonymous(
    conn: &mut RedisConn,
    keys: &StreamKeys,
    group: &str,
) -> std::result::Result<(), RedisError> {
    scripts::REMOVE_ANONYMOUS
        .key(&keys.stream)
        .key(&keys.delayed)
        .arg(group)
        .invoke_async::<Value>(conn)
        .await
        .map(drop)
}

/// Removes anonymous subscriptions of `keys` left behind by processes that died: older than
/// `anonymous_ttl`, with no consumer seen for that long.
pub(crate) async fn sweep_anonymous(shared: &Shared, keys: &StreamKeys) -> Result<()> {
    let stream = keys.stream.as_str();
    let ttl = shared.config.anonymous_ttl.as_millis() as u64;
    let now = unix_millis();
    let mut cmd = redis::cmd("XINFO");
    cmd.arg("GROUPS").arg(stream);
    let groups: Value = match cmd.query_async(&mut shared.conn()).await {
        Ok(v) => v,
        Err(e) if e.code() == Some("ERR") => return Ok(()), // no such key yet
        Err(e) => return Err(from_redis(e, "listing consumer groups")),
    };
    for group in parse_records(&groups) {
        let Some(name) = group.get("name").and_then(string_of) else {
            continue;
        };
        let Some(created) = anonymous_group_created(&name) else {
            continue;
        };
        if now.saturating_sub(created) < ttl {
            continue;
        }
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(stream).arg(&name);
        let consumers: Value = shared.query(&cmd, "listing consumers").await?;
        let alive = parse_records(&consumers).iter().any(|c| {
            c.get("idle")
                .and_then(int_of)
                .is_some_and(|idle| (idle as u64) < ttl)
        });
        if alive {
            continue;
        }
        remove_anonymous(&mut shared.conn(), keys, &name)
            .await
            .map_err(|e| from_redis(e, "removing a stale anonymous subscription"))?;
        tracing::info!(stream, group = %name, "destroyed a stale anonymous subscription");
    }
    Ok(())
}

/// The warning to log, if trimming threatens entries the group has not read yet.
fn lag_warning(
    retention: Retention,
    lag: Option<i64>,
    last_delivered_ms: Option<u64>,
    now_ms: u64,
) -> Option<String> {
    let lag = lag?;
    if lag <= 0 {
        return None;
    }
    match retention {
        Retention::Unlimited => None,
        Retention::MaxLen { entries } => (lag as u64 >= entries / 5 * 4).then(|| {
            format!(
                "subscription lags {lag} entries behind the end of its topic and retention keeps \
                 about {entries}: events it has not read yet are about to be trimmed \
                 (consume faster or raise the MaxLen retention)"
            )
        }),
        Retention::MaxAge { age } => {
            let age_ms = age.as_millis() as u64;
            let oldest_unread = last_delivered_ms?;
            (now_ms.saturating_sub(oldest_unread) >= age_ms / 5 * 4).then(|| {
                format!(
                    "subscription lags {lag} entries behind, the oldest unread about {} s old, \
                     and retention keeps {} s: events it has not read yet are about to be \
                     trimmed (consume faster or raise the MaxAge retention)",
                    now_ms.saturating_sub(oldest_unread) / 1000,
                    age_ms / 1000
                )
            })
        }
    }
}

/// The ack handle of one delivery: entry `id`, delivered for the `count`-th time.
struct RedisAcker {
    state: Arc<ConsumerState>,
    id: String,
    count: DeliveryCount,
    /// When the request that last started the entry's idle time in Redis was sent: the
    /// fetch, then the latest successful renewal. Redis reset the idle time after this, so
    /// the delivery's plain-ack window ([`plain_ack_safe`]) runs from here.
    idle_since: Mutex<Instant>,
    held: AtomicBool,
}

impl RedisAcker {
    fn idle_since(&self) -> MutexGuard<'_, Instant> {
        self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unhold(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.state.held().remove(&(self.id.clone(), self.count));
            self.state.leave_when_settled();
        }
    }

    /// Acknowledges through the consumer's ack queue (see the module documentation).
    async fn ack_batched(&self) -> Result<()> {
        let state = &self.state;
        let _op = state.shared.begin()?;
        let (reply, outcome) = oneshot::channel();
        let start_flush = {
            let mut queue = state.acks();
            queue.waiting.push(AckRequest {
                id: self.id.clone(),
                count: self.count,
                idle_since: *self.idle_since(),
                reply,
            });
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start_flush {
            state.shared.tasks.spawn(flush_acks(Arc::clone(state)));
        }
        let what = "acknowledging";
        let result = match outcome.await {
            Ok(result) => result.map_err(|e| from_redis(e, &self.describe(what)))?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "{}: the acknowledgement batch was abandoned (the runtime is shutting \
                         down); the entry may still be pending",
                        self.describe(what)
                    ),
                ));
            }
        };
        if result == SETTLED {
            // The flush task already removed it from the held set, before replying to anyone,
            // so the consumer's next fetch counts every slot the batch freed.
            self.held.store(false, Ordering::Release);
        }
        self.outcome(result, what)
    }

    async fn nack_after(&self, delay: Duration) -> Result<()> {
        let state = &self.state;
        let _op = state.shared.begin()?;
        let what = "negatively acknowledging";
        let result = scripts::NACK
            .key(&state.keys.stream)
            .key(&state.keys.delayed)
            .arg(&state.group)
            .arg(&state.consumer)
            .arg(&self.id)
            .arg(self.count)
            .arg(delay.as_millis() as u64)
            .invoke_async::<i64>(&mut state.shared.conn())
            .await
            .map_err(|e| from_redis(e, &self.describe(what)))?;
        if result == SETTLED {
            self.unhold();
        }
        self.outcome(result, what)
    }

    /// Starts the delivery's visibility timeout over ([`scripts::RENEW`]): the entry's idle
    /// time goes back to 0, its delivery count stays. Once renewed, the plain-ack window runs
    /// from when the renewal was sent (Redis reset the idle time after that), as it ran from
    /// the fetch before; a renewal whose answer is lost leaves it where it was, which only
    /// makes more acks go through the checked script.
    async fn renew_timeout(&self) -> Result<()> {
        let state = &self.state;
        let _op = state.shared.begin()?;
        let what = "renewing the visibility timeout of";
        let visibility_ms = u64::try_from(state.visibility.as_millis()).unwrap_or(u64::MAX);
        let sent = Instant::now();
        let result = scripts::RENEW
            .key(&state.keys.stream)
            .arg(&state.group)
            .arg(&state.consumer)
            .arg(&self.id)
            .arg(self.count)
            .arg(visibility_ms)
            .arg(RELEASED_IDLE_MS)
            .invoke_async::<i64>(&mut state.shared.conn())
            .await
            .map_err(|e| from_redis(e, &self.describe(what)))?;
        match result {
            SETTLED => {
                let mut since = self.idle_since();
                *since = (*since).max(sent);
                Ok(())
            }
            RAN_OUT => Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "{}: its visibility timeout ({:?}) already ran out, so any consumer may \
                     take it over at its next scan; renew more often than the timeout",
                    self.describe(what),
                    state.visibility
                ),
            )),
            GIVEN_BACK => Err(Error::new(
                ErrorKind::AlreadySettled,
                format!(
                    "{}: the delivery was given back (nacked) and waits to be handed out \
                     again: nothing to renew",
                    self.describe(what)
                ),
            )),
            other => self.outcome(other, what),
        }
    }

    fn describe(&self, what: &str) -> String {
        format!(
            "{what} entry {} of `{}` (group `{}`)",
            self.id, self.state.keys.stream, self.state.group
        )
    }

    /// Maps a settlement script result to the caller's result.
    fn outcome(&self, result: i64, what: &str) -> Result<()> {
        match result {
            SETTLED => Ok(()),
            NOT_PENDING => Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "{}: the entry is no longer pending: it exceeded its visibility timeout, was \
                     handed to another consumer and settled there, or was deleted",
                    self.describe(what)
                ),
            )),
            TAKEN_OVER => Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "{}: the delivery exceeded its visibility timeout and was handed out again; \
                     settle faster or raise the visibility timeout",
                    self.describe(what)
                ),
            )),
            other => Err(Error::new(
                ErrorKind::Internal,
                format!("{}: unexpected script result {other}", self.describe(what)),
            )),
        }
    }
}

/// A consumer's flush task: settles the waiting acks, up to [`MAX_ACK_BATCH`] per round,
/// until none is left. Acks still inside their plain window ([`plain_ack_safe`]) go as one
/// pipeline of `XACK`s, the others through one settlement script call. Replies reach the
/// callers only after Redis answered; a failed call fails every ack it carried (their entries
/// stay pending, the acks can be retried).
async fn flush_acks(state: Arc<ConsumerState>) {
    let mut conn = state.shared.conn();
    loop {
        let batch: Vec<AckRequest> = {
            let mut queue = state.acks();
            // An ack whose caller went away (its future was dropped) is not sent.
            queue.waiting.retain(|r| !r.reply.is_closed());
            if queue.waiting.is_empty() {
                queue.flushing = false;
                queue.sending = 0;
                return;
            }
            let n = queue.waiting.len().min(MAX_ACK_BATCH);
            queue.sending = n;
            queue.waiting.drain(..n).collect()
        };
        let now = Instant::now();
        let (plain, checked): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| {
            !state.delete_on_ack && plain_ack_safe(r.idle_since, state.visibility, now)
        });
        if !plain.is_empty() {
            let results = ack_plain(&mut conn, &state, &plain).await;
            answer(&state, plain, results);
        }
        if !checked.is_empty() {
            let results = ack_checked(&mut conn, &state, &checked).await;
            answer(&state, checked, results);
        }
    }
}

/// Whether a delivery whose entry's idle time was last started by a request sent at
/// `fetched_at` (the fetch, or the latest renewal) may be acknowledged with a plain `XACK`,
/// without the script's check that it is still this consumer's: while less than half its
/// visibility timeout has passed. No evbus consumer takes an entry over before the
/// visibility timeout of the consumer holding it has passed (the takeover script reads it
/// from the holder's name), and Redis started counting after `fetched_at`; the other half
/// is the margin for the ack's own trip to Redis. See ADR 0021.
fn plain_ack_safe(fetched_at: Instant, visibility: Duration, now: Instant) -> bool {
    visibility >= PLAIN_ACK_MIN_VISIBILITY
        && now.saturating_duration_since(fetched_at) < visibility / 2
}

/// A consumer's name: unique, and carrying its visibility timeout
/// (`<pid>-<uuid>-v<ms>`), which the takeover script of every consumer honours.
fn consumer_name(visibility: Duration) -> String {
    format!(
        "{}-{}-v{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple(),
        visibility.as_millis()
    )
}

/// Acknowledges deliveries still inside their plain window: one pipeline of `XACK`s, one per
/// entry, so each gets its own answer (1 settled, 0 no longer pending).
async fn ack_plain(
    conn: &mut RedisConn,
    state: &ConsumerState,
    batch: &[AckRequest],
) -> std::result::Result<Vec<i64>, RedisError> {
    let mut pipe = redis::pipe();
    for request in batch {
        pipe.cmd("XACK")
            .arg(&state.keys.stream)
            .arg(&state.group)
            .arg(&request.id);
    }
    let acked: Vec<i64> = pipe.query_async(conn).await?;
    Ok(acked
        .into_iter()
        .map(|n| if n > 0 { SETTLED } else { NOT_PENDING })
        .collect())
}

/// Acknowledges deliveries through the [`ACK_BATCH`](scripts::ACK_BATCH) script, which
/// checks each is still pending for this consumer with the same delivery count.
async fn ack_checked(
    conn: &mut RedisConn,
    state: &ConsumerState,
    batch: &[AckRequest],
) -> std::result::Result<Vec<i64>, RedisError> {
    let (low, high) = id_range(batch.iter().map(|r| r.id.as_str()));
    let mut invocation = scripts::ACK_BATCH.key(&state.keys.stream);
    invocation
        .arg(&state.group)
        .arg(&state.consumer)
        .arg(if state.delete_on_ack { "1" } else { "0" })
        .arg(low)
        .arg(high);
    for request in batch {
        invocation.arg(&request.id).arg(request.count);
    }
    invocation.invoke_async::<Vec<i64>>(conn).await
}

/// Hands each ack of a batch its result: settled entries leave the held set first (so the
/// consumer's next fetch counts every slot the batch freed), then the callers are answered.
fn answer(
    state: &Arc<ConsumerState>,
    batch: Vec<AckRequest>,
    results: std::result::Result<Vec<i64>, RedisError>,
) {
    let results = match results {
        Ok(results) if results.len() == batch.len() => results,
        Ok(_) => {
            let e = unexpected("Redis answered a different number of ack results");
            for request in batch {
                let _ = request.reply.send(Err(e.clone()));
            }
            return;
        }
        Err(e) => {
            for request in batch {
                let _ = request.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut replies = Vec::with_capacity(batch.len());
    {
        let mut held = state.held();
        for (request, result) in batch.into_iter().zip(results) {
            let AckRequest {
                id, count, reply, ..
            } = request;
            if result == SETTLED {
                held.remove(&(id, count));
            }
            replies.push((reply, result));
        }
    }
    for (reply, result) in replies {
        let _ = reply.send(Ok(result));
    }
    state.leave_when_settled();
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        self.unhold();
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self, _tag: u64) -> Result<()> {
        self.ack_batched().await
    }

    async fn nack(&self, _tag: u64) -> Result<()> {
        self.nack_after(Duration::ZERO).await?;
        // Let this consumer take it over right away instead of at its next scan.
        self.state.reclaim_now.store(true, Ordering::Release);
        self.state.wake.notify_one();
        Ok(())
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, _tag: u64, delay: Duration) -> Result<()> {
        self.nack_after(delay.max(Duration::from_millis(1))).await
    }

    async fn renew(&self, _tag: u64) -> Result<()> {
        self.renew_timeout().await
    }
}

/// The lowest and the highest of stream entry ids (`<ms>-<seq>`), for an `XPENDING` range;
/// `-` and `+` (the whole list) if one does not parse, which costs time but not correctness.
fn id_range<'a>(ids: impl Iterator<Item = &'a str>) -> (String, String) {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
    };
    let mut range: Option<((u64, u64), (u64, u64))> = None;
    for id in ids {
        let Some(id) = parse(id) else {
            return ("-".to_owned(), "+".to_owned());
        };
        range = Some(match range {
            None => (id, id),
            Some((low, high)) => (low.min(id), high.max(id)),
        });
    }
    match range {
        Some(((lm, ls), (hm, hs))) => (format!("{lm}-{ls}"), format!("{hm}-{hs}")),
        None => ("-".to_owned(), "+".to_owned()),
    }
}

/// Decodes a stream entry written in CloudEvents binary mode. The event's data is the entry's
/// `data` field, moved out of `fields` (not copied); it is put back if the entry does not
/// decode, for the undecodable message.
pub(crate) fn decode(fields: &mut [(Vec<u8>, Vec<u8>)]) -> Result<Event> {
    // The last `data` field, as a reader of the fields in order would keep.
    let data = fields
        .iter()
        .rposition(|(name, _)| name.as_slice() == DATA_FIELD.as_bytes());
    let body = match data {
        Some(i) => Bytes::from(std::mem::take(&mut fields[i].1)),
        None => Bytes::new(),
    };
    let decoded = decode_attributes(fields, body.clone());
    if let (Err(_), Some(i)) = (&decoded, data) {
        fields[i].1 = body.to_vec();
    }
    decoded
}

fn decode_attributes(fields: &[(Vec<u8>, Vec<u8>)], body: Bytes) -> Result<Event> {
    let mut headers = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if name == DATA_FIELD {
            continue;
        } else if name.starts_with(HeaderStyle::REDIS.prefix)
            || name == HeaderStyle::REDIS.content_type
        {
            // Borrowed: the event copies what it keeps, once.
            let value = std::str::from_utf8(value).map_err(|_| {
                Error::invalid_event(format!(
                    "field `{}` is not UTF-8 text",
                    evbus::raw::quoted(name)
                ))
            })?;
            headers.push((name, value));
        }
    }
    binding::decode(headers, body, HeaderStyle::REDIS)
}

/// An entry that is not a CloudEvent, as core's undecodable message: location
/// `redis:<stream key>`, id the entry id, the `data` field as the body and every other field
/// as a header.
fn undecodable(stream: &str, fetched: &Fetched, error: Error) -> Undecodable {
    let mut message = Undecodable::new(error, format!("redis:{stream}"), fetched.id.clone());
    for (name, value) in &fetched.fields {
        if name.as_slice() == DATA_FIELD.as_bytes() {
            message = message.body(value.clone());
        } else {
            message = message.header(String::from_utf8_lossy(name).into_owned(), value.clone());
        }
    }
    message
}

// ---- reply parsing --------------------------------------------------------------------------

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

fn into_items(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Map(pairs) => Some(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

fn items_of(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn into_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One `[id, [field, value, ...]]` entry.
fn parse_entry(value: Value) -> Option<(String, Fields)> {
    let mut parts = into_items(value)?.into_iter();
    let id = String::from_utf8(into_bytes(parts.next()?)?).ok()?;
    let mut flat = into_items(parts.next()?)?.into_iter();
    let mut fields = Vec::new();
    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
        fields.push((into_bytes(name)?, into_bytes(value)?));
    }
    Some((id, fields))
}

/// `XREADGROUP` reply: `[[key, [entry, ...]]]`, or nil when the block timed out.
fn parse_read_reply(value: Value) -> std::result::Result<Vec<(String, Fields)>, RedisError> {
    let streams =
        into_items(value).ok_or_else(|| unexpected("XREADGROUP reply is not an array"))?;
    let mut entries = Vec::new();
    let mut streams = streams.into_iter();
    while let Some(stream) = streams.next() {
        // RESP2: [key, entries]; RESP3 maps arrive flattened as key, entries.
        let entry_list = match stream {
            Value::Array(mut pair) if pair.len() == 2 => pair.pop().unwrap_or(Value::Nil),
            _ => streams.next().unwrap_or(Value::Nil),
        };
        for entry in into_items(entry_list).unwrap_or_default() {
            entries.push(parse_entry(entry).ok_or_else(|| unexpected("malformed stream entry"))?);
        }
    }
    Ok(entries)
}

/// `RECLAIM` reply: `[cursor, [[id, fields, count], ...]]`.
/// Entries taken over: id, fields and delivery count.
type Claimed = Vec<(String, Fields, DeliveryCount)>;

fn parse_reclaim_reply(value: Value) -> std::result::Result<(String, Claimed), RedisError> {
    let bad = || unexpected("malformed reclaim script reply");
    let mut parts = into_items(value).ok_or_else(bad)?.into_iter();
    let cursor = parts.next().as_ref().and_then(string_of).ok_or_else(bad)?;
    let mut claimed = Vec::new();
    for item in into_items(parts.next().ok_or_else(bad)?).ok_or_else(bad)? {
        let mut item = into_items(item).ok_or_else(bad)?.into_iter();
        let (id, fields) = (item.next(), item.next());
        let count = item.next().as_ref().and_then(int_of).ok_or_else(bad)?;
        let entry = Value::Array(vec![id.ok_or_else(bad)?, fields.ok_or_else(bad)?]);
        let (id, fields) = parse_entry(entry).ok_or_else(bad)?;
        claimed.push((id, fields, count));
    }
    Ok((cursor, claimed))
}

struct PendingEntry {
    id: String,
    idle_ms: i64,
    count: DeliveryCount,
}

/// Extended `XPENDING` reply: `[[id, consumer, idle ms, count], ...]`.
fn parse_pending(value: &Value) -> Vec<PendingEntry> {
    items_of(value)
        .unwrap_or_default()
        .iter()
        .filter_map(|item| {
            let item = items_of(item)?;
            Some(PendingEntry {
                id: string_of(item.first()?)?,
                idle_ms: int_of(item.get(2)?)?,
                count: int_of(item.get(3)?)?,
            })
        })
        .collect()
}

/// A list of records as `XINFO` returns them: each a flat `[name, value, ...]` array.
fn parse_records(value: &Value) -> Vec<Record<'_>> {
    items_of(value)
        .unwrap_or_default()
        .iter()
        .map(|record| match record {
            Value::Map(pairs) => Record(pairs.iter().map(|(k, v)| (k, v)).collect()),
            other => Record(
                items_of(other)
                    .unwrap_or_default()
                    .chunks(2)
                    .filter_map(|pair| Some((pair.first()?, pair.get(1)?)))
                    .collect(),
            ),
        })
        .collect()
}

struct Record<'a>(Vec<(&'a Value, &'a Value)>);

impl<'a> Record<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0
            .iter()
            .find(|(k, _)| bytes_of(k) == Some(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ContentMode;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn fields(pairs: &[(&str, &[u8])]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn entries_written_by_xadd_decode_to_the_same_event_in_either_mode() {
        let event = Event::builder("afterOrderCreate", "/shop")
            .json(&serde_json::json!({"name": "Zoë"}))
            .unwrap()
            .subject("o 1")
            .build()
            .unwrap();
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let cmd = crate::publisher::xadd("s", Retention::Unlimited, mode, usize::MAX, &event)
                .unwrap();
            let args: Vec<Vec<u8>> = cmd
                .args_iter()
                .skip(3)
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.to_vec(),
                    _ => Vec::new(),
                })
                .collect();
            let mut fields: Fields = args
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect();
            assert_eq!(decode(&mut fields).unwrap(), event, "{mode:?}");
        }
    }

    #[test]
    fn foreign_fields_are_ignored_and_missing_attributes_refused() {
        let mut ok = fields(&[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"1"),
            ("ce_source", b"s"),
            ("ce_type", b"t"),
            ("producer", b"legacy"),
        ]);
        assert_eq!(decode(&mut ok).unwrap().id(), "1");
        let err = decode(&mut fields(&[("order", b"{}")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEvent);
        let err = decode(&mut fields(&[
            ("ce_specversion", b"1.0"),
            ("ce_id", &[0xff, 0xfe]),
        ]))
        .unwrap_err();
        assert!(err.message().contains("ce_id"), "{err}");
    }

    #[test]
    fn a_long_field_name_is_quoted_short_in_the_error_of_a_structured_entry() {
        // The error is the dead-letter reason, an attribute of the record: as long as the
        // field name, it made the record too large for the dead-letter queue, forever.
        let name = format!("ce_{}", "a".repeat(2 * 1024 * 1024));
        let mut entry: Fields = vec![
            (
                b"content-type".to_vec(),
                b"application/cloudevents+json".to_vec(),
            ),
            (b"data".to_vec(), b"{}".to_vec()),
            (name.into_bytes(), vec![0xff]),
        ];
        let err = decode(&mut entry).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEvent);
        assert!(err.message().len() < 1024, "{} bytes", err.message().len());
        assert!(
            err.message().contains("is not UTF-8"),
            "{}",
            &err.message()[..200]
        );
    }

    #[test]
    fn the_data_moves_into_the_event_and_stays_with_an_entry_that_does_not_decode() {
        let mut good = fields(&[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"1"),
            ("ce_source", b"s"),
            ("ce_type", b"t"),
            ("data", b"old"),
            ("data", b"[1,2]"),
        ]);
        let event = decode(&mut good).unwrap();
        // The last `data` field is the event's data.
        assert_eq!(event.data().map(|d| &d[..]), Some(&b"[1,2]"[..]));
        let mut bad = fields(&[("ce_specversion", b"0.3"), ("data", b"kept")]);
        decode(&mut bad).unwrap_err();
        assert_eq!(
            bad,
            fields(&[("ce_specversion", b"0.3"), ("data", b"kept")])
        );
    }

    #[test]
    fn undecodable_entries_become_a_placeholder_keeping_every_field() {
        let fetched = Fetched {
            id: "1-0".to_owned(),
            count: 2,
            fields: fields(&[("order", b"{\"id\":1}"), ("blob", &[0xff, 0x00])]),
            at: Instant::now(),
        };
        let message = undecodable(
            "evbus:topic:{t}",
            &fetched,
            Error::invalid_event("not a CloudEvent"),
        );
        let event = message.placeholder().unwrap();
        assert_eq!(event.ty(), UNDECODABLE_EVENT_TYPE);
        assert_eq!(event.id(), "redis:evbus:topic:{t}/1-0");
        let data: serde_json::Value = event.json().unwrap();
        assert_eq!(data["headers"]["order"], "{\"id\":1}");
        assert_eq!(data["headers"]["blob"]["base64"], "/wA=");
    }

    #[test]
    fn read_replies_parse_and_nil_means_nothing_new() {
        assert!(parse_read_reply(Value::Nil).unwrap().is_empty());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("k"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("ce_id"), bulk("a"), bulk("data"), bulk("x")]),
            ])]),
        ])]);
        let entries = parse_read_reply(reply).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(entries[0].1[1], (b"data".to_vec(), b"x".to_vec()));
    }

    #[test]
    fn reclaim_replies_carry_the_delivery_count() {
        let reply = Value::Array(vec![
            bulk("(5-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("5-0"),
                Value::Array(vec![bulk("f"), bulk("v")]),
                Value::Int(3),
            ])]),
        ]);
        let (cursor, claimed) = parse_reclaim_reply(reply).unwrap();
        assert_eq!(cursor, "(5-0");
        assert_eq!(claimed[0].0, "5-0");
        assert_eq!(claimed[0].2, 3);
    }

    #[test]
    fn delivery_counts_stay_exact_and_only_the_attempt_saturates() {
        let reply = Value::Array(vec![
            bulk("-"),
            Value::Array(vec![Value::Array(vec![
                bulk("5-0"),
                Value::Array(vec![bulk("f"), bulk("v")]),
                Value::Int(4_294_967_297),
            ])]),
        ]);
        let (_, claimed) = parse_reclaim_reply(reply).unwrap();
        assert_eq!(
            claimed[0].2, 4_294_967_297,
            "compared with Redis's count as it is"
        );
        assert_eq!(attempt_of(claimed[0].2), u32::MAX);
        assert_eq!(attempt_of(3), 3);
        assert_eq!(attempt_of(0), 1);
        assert_eq!(
            attempt_of(i64::MIN),
            u32::MAX,
            "past i64::MAX, reported negative"
        );
        let pending = Value::Array(vec![Value::Array(vec![
            bulk("5-0"),
            bulk("c"),
            Value::Int(10),
            Value::Int(1 << 40),
        ])]);
        assert_eq!(parse_pending(&pending)[0].count, 1 << 40);
        assert_eq!(count_before(4_294_967_297), 4_294_967_296);
        assert_eq!(count_before(0), 0);
        assert_eq!(count_before(i64::MIN), i64::MAX);
    }

    #[test]
    fn anonymous_group_names_carry_their_creation_time() {
        let name = anonymous_group_name();
        let ms = anonymous_group_created(&name).unwrap();
        assert!(unix_millis() - ms < 60_000);
        assert_eq!(anonymous_group_created("billing"), None);
    }

    #[test]
    fn lag_warnings_fire_near_the_retention_limit() {
        let by_len = Retention::MaxLen { entries: 1000 };
        assert!(lag_warning(by_len, Some(100), None, 0).is_none());
        assert!(
            lag_warning(by_len, Some(800), None, 0)
                .unwrap()
                .contains("800 entries")
        );
        assert!(lag_warning(by_len, None, None, 0).is_none());
        let by_age = Retention::MaxAge {
            age: Duration::from_secs(100),
        };
        assert!(lag_warning(by_age, Some(5), Some(50_000), 100_000).is_none());
        assert!(lag_warning(by_age, Some(5), Some(10_000), 100_000).is_some());
        assert!(lag_warning(Retention::Unlimited, Some(1_000_000), None, 0).is_none());
    }

    #[test]
    fn plain_acks_only_inside_half_the_visibility_timeout() {
        let fetched = Instant::now();
        let thirty = Duration::from_secs(30);
        assert!(plain_ack_safe(fetched, thirty, fetched));
        assert!(plain_ack_safe(
            fetched,
            thirty,
            fetched + Duration::from_millis(14_999)
        ));
        assert!(!plain_ack_safe(
            fetched,
            thirty,
            fetched + Duration::from_secs(15)
        ));
        assert!(!plain_ack_safe(
            fetched,
            thirty,
            fetched + Duration::from_secs(40)
        ));
        // Too short a timeout leaves too thin a margin: always checked.
        assert!(!plain_ack_safe(
            fetched,
            Duration::from_millis(999),
            fetched
        ));
    }

    #[test]
    fn consumer_names_carry_their_visibility_timeout_for_the_takeover_script() {
        let name = consumer_name(Duration::from_millis(1500));
        assert!(name.ends_with("-v1500"), "{name}");
        assert!(
            name.starts_with(&format!("{}-", std::process::id())),
            "{name}"
        );
        assert_ne!(name, consumer_name(Duration::from_millis(1500)));
    }
}
