//! The consumer: a lazily polled stream of claimed rows, woken by publishes and `NOTIFY`,
//! polling as the fallback; and the acker settling one claim.
//!
//! One claim statement takes as many rows as the consumer has free in-flight slots (the
//! limit less the deliveries handed out and not yet settled, at most [`MAX_CLAIM`]); the
//! stream hands them out in delivery order from its buffer before it claims again. While the
//! stream is read (polled within the last visibility timeout), a task of its own renews the
//! buffered claims every third of the timeout, all in one statement (see [`renew_buffered`]),
//! so rows claimed ahead wait for a reader slower than its claims without timing out: each is
//! handed out on its first attempt, in order, and stays this consumer's (rows given back
//! there went to the end of the line behind rows claimed after them, by this consumer or
//! another, and an ordered handler ran a key's events out of order). A row whose renewal
//! fails has moved on and is dropped from the buffer. Rows claimed but never handed out (the
//! subscription was dropped, the transport closed) are given back at once, and their claim is
//! not counted as an attempt. Once the stream has not been read for a whole visibility
//! timeout (a hung or stopped reader), renewal stops and the buffered claims run down: a row
//! is handed out only with at least half its visibility timeout left, the stream gives back
//! the rows past that before it claims again, and rows whose claim outlived the whole timeout
//! are dropped, for another consumer may hold them by then. A claim runs in a task of its
//! own, so a stream dropped while its claim statement runs gives the rows it claimed back too.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evbus::Result;
use evbus::raw::{Acker, RawDelivery, RawStream, ReadClock, Source, Undecodable};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::transport::{SqlBroker, ms};

/// How often a consumer looks whether its partition still exists. `delete_topic` or
/// `delete_queue` on any connection removes it, and what is published to the name
/// afterwards goes to a new one: the consumer would wait on the old one for nothing, so its
/// stream ends, as on the other transports that see the deletion.
const PART_CHECK: Duration = Duration::from_secs(2);

/// Most rows one claim statement takes.
pub(crate) const MAX_CLAIM: usize = 256;

/// While its claims keep finding rows, a consumer moves its partition's delayed rows that
/// came due back among the others at most this often (a statement of its own before the
/// claim: on every claim it cost a consumer with `max_in_flight(1)` a fifth of its rate). An
/// idle consumer (its last claim found nothing) moves them on every claim. So a delayed row
/// comes back at most this much after it came due, on top of the wait for the next claim.
pub(crate) const PROMOTE_EVERY: Duration = Duration::from_millis(50);

/// The shortest interval between renewals of the claims made ahead, whatever the visibility
/// timeout (as core's for a held delivery).
const MIN_RENEW_EVERY: Duration = Duration::from_millis(10);

/// A claimed delivery row.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) id: i64,
    pub(crate) attempt: i32,
    /// The event's body as stored: CloudEvents JSON when evbus wrote it, anything when
    /// another program did (decoded per row when handed out, see [`decode`]).
    pub(crate) body: Vec<u8>,
}

struct State {
    broker: SqlBroker,
    part: i64,
    visibility: i64,
    notify: Arc<Notify>,
    /// The last call failed: wait before the next.
    failed: bool,
    /// Anonymous subscriptions: the task marking the partition alive, stopped when the
    /// stream is dropped.
    _keep_alive: Option<DropGuard>,
    /// When the partition was last found to exist (see [`PART_CHECK`]).
    checked: Instant,
    /// When this consumer's claim last moved due delayed rows back, and whether its last
    /// claim found nothing (see [`PROMOTE_EVERY`]).
    promoted: Option<Instant>,
    idle: bool,
    location: Arc<str>,
    /// Claimed rows not handed out yet, shared with the transport's close and the renewal.
    buffer: Arc<Buffer>,
    /// Stops the renewal of the buffered claims: cancelled when the stream is dropped (and,
    /// a child of the transport's, when the transport closes).
    renewal: CancellationToken,
    /// Deliveries handed out and not dropped yet (settled or not).
    held: Arc<AtomicUsize>,
    max_in_flight: usize,
}

/// A consumer's claimed rows not handed out yet, in delivery order, and when their claim was
/// last made or renewed. The consumer's stream is read lazily: once the transport closes
/// nobody reads it, so close takes them from here to give them back (see
/// [`Buffer::take_to_give_back`]).
#[derive(Debug)]
pub(crate) struct Buffer {
    visibility: i64,
    rows: std::sync::Mutex<Buffered>,
    /// Held by a renewal for its statement and by whoever takes the rows to give them back,
    /// so that the two never meet on the same rows: on PostgreSQL each skips the rows the
    /// other holds locked, and a give-back that skipped a row being renewed left it claimed
    /// for a whole timeout, then counted as an attempt.
    turn: tokio::sync::Mutex<()>,
    /// When its stream was last polled.
    read: ReadClock,
}

#[derive(Debug)]
struct Buffered {
    claims: VecDeque<Claim>,
    /// When the claims' visibility timeout last started: when the claim statement or the
    /// last renewal that succeeded was sent (the database's timeout starts later, never
    /// earlier).
    claimed_at: Instant,
    /// Counts the fills: a renewal that finishes after the buffer was emptied and filled
    /// again does not apply to the new claims.
    fills: u64,
    /// Whether a renewal task runs (see [`renew_buffered`]).
    renewing: bool,
}

impl Buffer {
    pub(crate) fn new(visibility: i64) -> Self {
        Buffer {
            visibility,
            rows: std::sync::Mutex::new(Buffered {
                claims: VecDeque::new(),
                claimed_at: Instant::now(),
                fills: 0,
                renewing: false,
            }),
            turn: tokio::sync::Mutex::new(()),
            read: ReadClock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffered> {
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().claims.len()
    }

    /// Whether the stream was polled within the last visibility timeout.
    fn polled_lately(&self) -> bool {
        let visibility = u64::try_from(self.visibility).unwrap_or(0);
        self.read.read_within(Duration::from_millis(visibility))
    }

    /// The next row while its claim has at least half the visibility timeout left.
    fn pop_fresh(&self) -> Option<Claim> {
        let mut rows = self.lock();
        if rows.claims.is_empty() || rows.age() * 2 >= self.visibility {
            return None;
        }
        rows.claims.pop_front()
    }

    /// Every row, and whether their claim is still within its visibility timeout (rows whose
    /// claim outlived it may be another consumer's by now: they are not given back).
    fn take_all(&self) -> (Vec<Claim>, bool) {
        let mut rows = self.lock();
        let unexpired = rows.age() < self.visibility;
        (rows.claims.drain(..).collect(), unexpired)
    }

    /// The rows whose claim has not expired, for giving back; expired ones are dropped.
    pub(crate) fn take_unexpired(&self) -> Vec<Claim> {
        match self.take_all() {
            (claims, true) => claims,
            (_, false) => Vec::new(),
        }
    }

    /// [`take_unexpired`](Self::take_unexpired) once a renewal in flight has finished, so
    /// that what it found gone is not given back and what it renewed counts from the renewal.
    pub(crate) async fn take_to_give_back(&self) -> Vec<Claim> {
        let _turn = self.turn.lock().await;
        self.take_unexpired()
    }

    /// Buffers `claims`, claimed at `at`. Returns whether a renewal task is to be started
    /// (rows are buffered and none runs); it is then counted as running.
    fn fill(&self, claims: impl Iterator<Item = Claim>, at: Instant) -> bool {
        let mut rows = self.lock();
        rows.claims.extend(claims);
        rows.claimed_at = at;
        rows.fills += 1;
        rows.start_renewal()
    }

    /// Whether a renewal task is to be started again (rows are buffered and none runs, as
    /// after the stream was not polled for a whole timeout); it is then counted as running.
    fn restart_renewal(&self) -> bool {
        self.lock().start_renewal()
    }

    /// When the next renewal is due, `every` after the claims' timeout started (or at
    /// `retry`, if later), and which fill it is for; `None`, and the renewal task counted as
    /// stopped, when nothing is buffered.
    fn next_renewal(&self, every: Duration, retry: Option<Instant>) -> Option<(Instant, u64)> {
        let mut rows = self.lock();
        if rows.claims.is_empty() {
            rows.renewing = false;
            return None;
        }
        let due = (rows.claimed_at + every).max(retry.unwrap_or(rows.claimed_at));
        Some((due, rows.fills))
    }

    /// The buffered claims of fill `fill`, as `(id, attempt)`, for renewal; `None` when
    /// nothing of it is buffered any more.
    fn to_renew(&self, fill: u64) -> Option<Vec<(i64, i32)>> {
        let rows = self.lock();
        if rows.claims.is_empty() || rows.fills != fill {
            return None;
        }
        Some(rows.claims.iter().map(|c| (c.id, c.attempt)).collect())
    }

    /// Counts the renewal task as stopped.
    fn stop_renewal(&self) {
        self.lock().renewing = false;
    }

    /// Applies a renewal of fill `fill`, sent at `sent`, that renewed `renewed`: the rows it
    /// renewed now count from `sent`; the others (moved on) are dropped, and counted in the
    /// result. Nothing changes if the buffer was emptied and filled again meanwhile (its
    /// claims are newer); rows handed out meanwhile are the deliveries' own business.
    fn renewed(&self, fill: u64, renewed: &HashSet<i64>, sent: Instant) -> usize {
        let mut rows = self.lock();
        if rows.fills != fill {
            return 0;
        }
        let before = rows.claims.len();
        rows.claims.retain(|c| renewed.contains(&c.id));
        rows.claimed_at = sent;
        before - rows.claims.len()
    }
}

impl Buffered {
    /// How long ago the buffered claims' visibility timeout started, in ms.
    fn age(&self) -> i64 {
        i64::try_from(self.claimed_at.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// See [`Buffer::fill`].
    fn start_renewal(&mut self) -> bool {
        let start = !self.claims.is_empty() && !self.renewing;
        self.renewing |= start;
        start
    }
}

impl State {
    /// How many rows the next claim may take.
    fn free_slots(&self) -> usize {
        let held = self.held.load(Ordering::Acquire);
        self.max_in_flight
            .saturating_sub(held + self.buffer.len())
            .clamp(1, MAX_CLAIM)
    }

    /// The next buffered row, as a delivery, while its claim has at least half the
    /// visibility timeout left. The stream is read again: the renewal of the rows left
    /// starts again if it had stopped.
    fn take_buffered(&mut self) -> Option<RawDelivery> {
        let claim = self.buffer.pop_fresh()?;
        if self.buffer.restart_renewal() {
            self.start_renewal();
        }
        Some(self.hand_out(claim))
    }

    /// Starts the task renewing the buffered claims (see [`renew_buffered`]).
    fn start_renewal(&self) {
        tokio::spawn(renew_buffered(
            self.broker.clone(),
            Arc::clone(&self.buffer),
            self.renewal.clone(),
        ));
    }

    /// `claim` as a delivery, counted as held until it is dropped.
    fn hand_out(&self, claim: Claim) -> RawDelivery {
        self.held.fetch_add(1, Ordering::AcqRel);
        let acker = Arc::new(ClaimAcker {
            broker: self.broker.clone(),
            attempt: claim.attempt,
            visibility: self.visibility,
            notify: Arc::clone(&self.notify),
            held: Arc::clone(&self.held),
        });
        let attempt = u32::try_from(claim.attempt).unwrap_or(1).max(1);
        let tag = u64::try_from(claim.id).unwrap_or_default();
        decode(claim.body, attempt, acker, tag, &self.location)
    }
}

/// A stored body as a delivery: the event if it is CloudEvents JSON, otherwise (not UTF-8,
/// not JSON, not a CloudEvent) an undecodable message, read at `location` with the delivery
/// row's id, that core dead-letters and acknowledges. A foreign row thus never fails, nor
/// holds up, the other rows of its claim; both databases go through here.
fn decode(
    body: Vec<u8>,
    attempt: u32,
    acker: Arc<dyn Acker>,
    tag: u64,
    location: &str,
) -> RawDelivery {
    match String::from_utf8(body) {
        Ok(json) => RawDelivery::from_json(json, attempt, acker, tag, location),
        Err(e) => {
            let error = evbus::Error::invalid_event(format!(
                "the stored event is not UTF-8 text ({})",
                e.utf8_error()
            ));
            let message = Undecodable::new(error, location, tag.to_string()).body(e.into_bytes());
            RawDelivery::undecodable(message, attempt, acker, tag)
        }
    }
}

impl Drop for State {
    /// Gives back the rows claimed and never handed out, so they go to the next consumer
    /// now rather than after the visibility timeout.
    fn drop(&mut self) {
        self.renewal.cancel();
        if self.buffer.len() == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.broker.clone();
        let notify = Arc::clone(&self.notify);
        let buffer = Arc::clone(&self.buffer);
        let tracker = self.broker.give_backs().clone();
        runtime.spawn(tracker.track_future(async move {
            let claims = buffer.take_to_give_back().await;
            if !claims.is_empty() {
                give_back(&broker, &notify, claims).await;
            }
        }));
    }
}

/// Renews the claims in `buffer` every third of its visibility timeout (at least every
/// [`MIN_RENEW_EVERY`]), in one statement for all of them (see [`SqlBroker::renew_claims`]),
/// while its stream was polled within the last visibility timeout; until the buffer is empty,
/// the stream has not been polled for that long, or `stop` (the stream was dropped or the
/// transport closed). A claim the statement did not renew has moved on (its timeout ran out,
/// or its row is being deleted) and is dropped from the buffer, never handed out; the others'
/// timeout counts from when the statement was sent. A failed statement is tried again after
/// a quarter of the period, while the claims last: if they run out first, the stream gives
/// back or drops them as it does when renewal has stopped.
async fn renew_buffered(broker: SqlBroker, buffer: Arc<Buffer>, stop: CancellationToken) {
    let visibility = u64::try_from(buffer.visibility).unwrap_or(u64::MAX);
    let every = (Duration::from_millis(visibility) / 3).max(MIN_RENEW_EVERY);
    let mut retry = None;
    loop {
        let Some((due, fill)) = buffer.next_renewal(every, retry) else {
            return;
        };
        tokio::select! {
            () = stop.cancelled() => {
                buffer.stop_renewal();
                return;
            }
            () = tokio::time::sleep_until(due.into()) => {}
        }
        // Not while rows are being taken to be given back (drop, close): see `Buffer::turn`.
        let _turn = buffer.turn.lock().await;
        if stop.is_cancelled() || !buffer.polled_lately() {
            // The consumer stopped reading: its claims run down, and the stream gives back
            // or drops them when it is read again (it restarts the renewal then).
            buffer.stop_renewal();
            return;
        }
        let Some(claims) = buffer.to_renew(fill) else {
            // Emptied (the next round ends the task), or emptied and filled again (the next
            // round waits for the new claims' turn).
            continue;
        };
        let sent = Instant::now();
        match broker.renew_claims(&claims, buffer.visibility).await {
            Ok(renewed) => {
                retry = None;
                let renewed: HashSet<i64> = renewed.into_iter().collect();
                let gone = buffer.renewed(fill, &renewed, sent);
                if gone > 0 {
                    tracing::debug!(
                        rows = gone,
                        "evbus-sql: claims made ahead ran out or their rows were deleted before \
                         they were handed out; they are not handed out"
                    );
                }
            }
            Err(e) if e.kind() == evbus::ErrorKind::Closed => {
                buffer.stop_renewal();
                return;
            }
            Err(e) => {
                tracing::debug!(
                    error = %e,
                    rows = claims.len(),
                    "evbus-sql: could not renew claims made ahead; trying again"
                );
                retry = Some(Instant::now() + (every / 4).max(MIN_RENEW_EVERY));
            }
        }
    }
}

/// Claims up to `n` rows of the stream's partition in a task of its own, so that dropping
/// the stream while the statement runs cannot lose the rows it claims: they are given back.
async fn claim(state: &mut State, n: usize) -> Result<Vec<Claim>> {
    let promote = state.idle
        || state
            .promoted
            .is_none_or(|at| at.elapsed() >= PROMOTE_EVERY);
    if promote {
        state.promoted = Some(Instant::now());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let broker = state.broker.clone();
    let notify = Arc::clone(&state.notify);
    let (part, visibility) = (state.part, state.visibility);
    let tracker = broker.give_backs().clone();
    tokio::spawn(tracker.track_future(async move {
        let claimed = broker.claim(part, visibility, n, promote).await;
        if let Err(Ok(claims)) = tx.send(claimed)
            && !claims.is_empty()
        {
            // Nobody is reading any more.
            give_back(&broker, &notify, claims).await;
        }
    }));
    let claimed = rx
        .await
        .map_err(|_| evbus::Error::closed("the SQL transport"))?;
    state.idle = claimed.as_ref().is_ok_and(Vec::is_empty);
    claimed
}

/// Gives claimed rows back (see [`SqlBroker::unclaim`]) and wakes this process's consumers of
/// the partition's destination to take them; a failure leaves them to come back after their
/// visibility timeout.
async fn give_back(broker: &SqlBroker, notify: &Notify, claims: Vec<Claim>) {
    match broker.unclaim(&claims).await {
        Ok(()) => notify.notify_waiters(),
        Err(e) => tracing::debug!(
            error = %e,
            rows = claims.len(),
            "evbus-sql: could not give back claimed rows; they return after the visibility timeout"
        ),
    }
}

/// Marks an anonymous subscription's partition alive at once and then every third of
/// `anonymous_ttl` (at most every minute) for as long as the subscription lives, whether it
/// is polled or not: the cleanup of any transport deletes one not marked for the TTL the mark
/// records (this transport's `anonymous_ttl`, whatever the cleaner's own), and a handler
/// holding its deliveries that long is no dead process.
fn keep_alive(broker: SqlBroker, part: i64) -> DropGuard {
    let stop = CancellationToken::new();
    let every = (broker.config().anonymous_ttl / 3)
        .min(Duration::from_secs(60))
        .max(Duration::from_millis(10));
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
            match broker.mark_alive(part).await {
                Ok(true) => {}
                // Deleted (the stream ends at its next look), or the transport closed.
                Ok(false) => return,
                Err(e) if e.kind() == evbus::ErrorKind::Closed => return,
                Err(e) => tracing::debug!(
                    error = %e,
                    "evbus-sql: could not mark an anonymous subscription alive; trying again"
                ),
            }
        }
    });
    stop.drop_guard()
}

/// The deliveries of partition `part` (the source's queue or subscription).
pub(crate) fn stream(broker: SqlBroker, part: i64, key: String, source: &Source) -> RawStream {
    let notify = broker.wakers().get(&key);
    let visibility = ms(source.consumer().visibility_timeout).max(1);
    let location = format!(
        "{}:{}/{}",
        broker.config().backend.name(),
        source.origin(),
        part
    );
    let keep_alive = source
        .is_anonymous()
        .then(|| keep_alive(broker.clone(), part));
    let buffer = broker.buffer(visibility);
    let renewal = broker.shared.stop_token().child_token();
    let state = State {
        broker,
        part,
        visibility,
        notify,
        failed: false,
        _keep_alive: keep_alive,
        checked: Instant::now(),
        promoted: None,
        idle: true,
        location: location.into(),
        buffer: Arc::clone(&buffer),
        renewal,
        held: Arc::new(AtomicUsize::new(0)),
        max_in_flight: source.consumer().max_in_flight.max(1),
    };
    let mut deliveries = futures::stream::unfold(state, next).boxed();
    // Every poll counts as the consumer reading: the renewal of the claims made ahead goes
    // on while it polls (see `renew_buffered`).
    futures::stream::poll_fn(move |cx| {
        buffer.read.mark();
        deliveries.poll_next_unpin(cx)
    })
    .boxed()
}

async fn next(mut state: State) -> Option<(Result<RawDelivery>, State)> {
    let poll = state.broker.config().poll_interval;
    loop {
        if state.failed {
            tokio::time::sleep(poll).await;
            state.failed = false;
        }
        // Before anything is handed out, even rows claimed ahead: after a deletion nothing
        // of the deleted partition comes out.
        if state.checked.elapsed() >= PART_CHECK {
            match state.broker.part_exists(state.part).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(
                        partition = %state.location,
                        "evbus-sql: the subscription's topic or queue was deleted; the subscription ends"
                    );
                    drop(state.buffer.take_all());
                    return None;
                }
                Err(e) => {
                    state.failed = true;
                    return Some((Err(e), state));
                }
            }
            state.checked = Instant::now();
        }
        if let Some(delivery) = state.take_buffered() {
            return Some((Ok(delivery), state));
        }
        // Held too long to hand out (the stream was not read for a whole timeout, so their
        // renewal stopped): give back what another consumer cannot hold yet, and claim
        // afresh (in order, so the rows given back come first again).
        let claims = state.buffer.take_to_give_back().await;
        if !claims.is_empty() {
            give_back(&state.broker, &state.notify, claims).await;
        }
        let notify = Arc::clone(&state.notify);
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before looking: a publish from now on wakes this consumer.
        notified.as_mut().enable();
        let claimed_at = Instant::now();
        let slots = state.free_slots();
        match claim(&mut state, slots).await {
            Ok(claims) if !claims.is_empty() => {
                // The first is handed out now, however long the claim took: a visibility
                // timeout shorter than a round trip still makes progress.
                let mut claims = claims.into_iter();
                let first = claims.next().map(|claim| state.hand_out(claim));
                if state.buffer.fill(claims, claimed_at) {
                    state.start_renewal();
                }
                if let Some(first) = first {
                    return Some((Ok(first), state));
                }
            }
            Ok(_) => {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            Err(e) => {
                state.failed = true;
                return Some((Err(e), state));
            }
        }
    }
}

/// Settles one claim (the delivery row id is the tag). A settlement arriving after the
/// visibility timeout gave the row to another consumer (its attempt moved on) changes
/// nothing: that consumer's claim stands. A renewal moves the claim's `visible_at` to a
/// whole visibility timeout from now, while the claim is still this one and has not run out.
struct ClaimAcker {
    broker: SqlBroker,
    attempt: i32,
    /// The consumer's visibility timeout in ms, which a renewal starts over.
    visibility: i64,
    notify: Arc<Notify>,
    /// The stream's count of deliveries handed out, which this one leaves when dropped.
    held: Arc<AtomicUsize>,
}

impl Drop for ClaimAcker {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ClaimAcker {
    fn id(tag: u64) -> i64 {
        i64::try_from(tag).unwrap_or(i64::MAX)
    }
}

#[async_trait]
impl Acker for ClaimAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.broker.settle(Self::id(tag), self.attempt, None).await
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        self.broker
            .settle(Self::id(tag), self.attempt, Some(Duration::ZERO))
            .await?;
        self.notify.notify_waiters();
        Ok(())
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.broker
            .settle(Self::id(tag), self.attempt, Some(delay))
            .await
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        let id = Self::id(tag);
        if self.broker.renew(id, self.attempt, self.visibility).await? {
            return Ok(());
        }
        Err(evbus::Error::new(
            evbus::ErrorKind::Expired,
            format!(
                "delivery {id} (attempt {}) exceeded its visibility timeout before it was \
                 renewed: it may have been claimed again (or its topic or queue was deleted)",
                self.attempt
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoAcker;

    #[async_trait]
    impl Acker for NoAcker {
        async fn ack(&self, _: u64) -> Result<()> {
            Ok(())
        }

        async fn nack(&self, _: u64) -> Result<()> {
            Ok(())
        }
    }

    fn decoded(body: &[u8]) -> RawDelivery {
        decode(body.to_vec(), 1, Arc::new(NoAcker), 7, "sqlite:q/1")
    }

    #[test]
    fn a_stored_body_decodes_per_row() {
        let event = evbus::Event::builder("orderPlaced", "/test")
            .build()
            .unwrap();
        let raw = decoded(event.to_json().unwrap().as_bytes());
        assert_eq!(raw.event().map(evbus::Event::id), Some(event.id()));

        // Not UTF-8 (a BLOB, or text in another encoding): undecodable, its bytes kept.
        let bytes = b"\x89PNG\r\n\x1a\n\x00\xff";
        let raw = decoded(bytes);
        assert!(raw.event().is_none());
        let message = raw.undecodable_message().unwrap();
        assert_eq!(message.raw_body().as_ref(), bytes);
        assert!(
            message.error().to_string().contains("not UTF-8"),
            "{}",
            message.error()
        );
        assert_eq!(message.error().kind(), evbus::ErrorKind::InvalidEvent);

        // UTF-8 but not a CloudEvent: undecodable too.
        let raw = decoded(b"not a cloudevent");
        assert_eq!(
            raw.undecodable_message().unwrap().raw_body().as_ref(),
            b"not a cloudevent"
        );
    }
}
