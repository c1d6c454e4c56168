//! A bounded message group: the ready/delayed/in-flight bookkeeping behind one queue or one
//! topic subscription, shared by its competing consumers.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Closed;
use crate::delivery::{Acker, RawDelivery};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::signal::Gated;

#[derive(Clone)]
struct Entry {
    /// Cheap to clone: the event's fields are shared.
    event: Event,
    /// Deliveries made so far.
    deliveries: u32,
    /// Its place in the group's order of publishes: an event given back goes ahead of the
    /// events published after it, and behind those given back that were published before it.
    /// 32 bits (the entry stays 16 bytes), compared as serial numbers: the events a group
    /// holds at once span far fewer than 2^31 publishes.
    seq: u32,
}

impl Entry {
    /// Whether this entry was published before `other` (serial-number order, so the count
    /// may wrap).
    fn before(&self, other: &Entry) -> bool {
        (self.seq.wrapping_sub(other.seq) as i32) < 0
    }
}

#[derive(Default)]
struct GroupState {
    ready: VecDeque<Entry>,
    delayed: BTreeSet<(Instant, u64)>,
    delayed_entries: FxHashMap<u64, Entry>,
    in_flight: InFlight,
    /// Visibility deadlines, one lane per visibility timeout. A lane only grows at its back
    /// with `now + timeout` (the clock is monotonic and read under the lock), so each lane is
    /// sorted without a tree. A settled delivery's entry, and the earlier deadline of a
    /// renewed one (no longer its slot's [`Slot::deadline`]), stay in the lane until they
    /// reach the front or the lane is compacted.
    deadlines: Vec<Lane>,
    /// Keys of delayed entries.
    next_delay_key: u64,
    /// The next [`Entry::seq`].
    next_seq: u32,
    deleted: bool,
}

/// The deliveries in flight, in slots reused as they are settled. A delivery's tag is its slot
/// and the slot's generation (`generation << 32 | slot`), so a late settlement of a delivery
/// whose slot moved on finds another generation and is refused. No hashing on the hot path;
/// the slots never outnumber the most deliveries ever in flight at once (bounded by the
/// group's capacity).
#[derive(Default)]
struct InFlight {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
    /// When the delivery in this slot expires: the last deadline pushed for it (a renewal
    /// pushes a later one). An earlier deadline of the same delivery found in its lane is
    /// stale and ignored.
    deadline: Instant,
}

impl InFlight {
    fn len(&self) -> usize {
        self.len
    }

    /// Stores `entry`, due back at `deadline`, and returns its tag.
    fn insert(&mut self, entry: Entry, deadline: Instant) -> u64 {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                    deadline,
                });
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 deliveries in flight")
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.entry = Some(entry);
        slot.deadline = deadline;
        self.len += 1;
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    fn slot(&self, tag: u64) -> Option<&Slot> {
        self.slots
            .get((tag & u64::from(u32::MAX)) as usize)
            .filter(|slot| u64::from(slot.generation) == tag >> 32)
    }

    #[cfg(test)]
    fn contains(&self, tag: u64) -> bool {
        self.slot(tag).is_some_and(|slot| slot.entry.is_some())
    }

    /// Whether `tag` is in flight and `at` is its deadline (not one a renewal replaced).
    fn due_at(&self, tag: u64, at: Instant) -> bool {
        self.slot(tag)
            .is_some_and(|slot| slot.entry.is_some() && slot.deadline == at)
    }

    /// Moves the deadline of `tag`, if in flight; whether it was.
    fn set_deadline(&mut self, tag: u64, deadline: Instant) -> bool {
        let index = (tag & u64::from(u32::MAX)) as usize;
        match self.slots.get_mut(index) {
            Some(slot) if u64::from(slot.generation) == tag >> 32 && slot.entry.is_some() => {
                slot.deadline = deadline;
                true
            }
            _ => false,
        }
    }

    fn remove(&mut self, tag: u64) -> Option<Entry> {
        let index = (tag & u64::from(u32::MAX)) as usize;
        let slot = self.slots.get_mut(index)?;
        if u64::from(slot.generation) != tag >> 32 {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        self.len -= 1;
        Some(entry)
    }
}

/// The deadlines of the deliveries taken with one visibility timeout, oldest first.
struct Lane {
    timeout: Duration,
    queue: VecDeque<(Instant, u64)>,
}

impl GroupState {
    fn len(&self) -> usize {
        self.ready.len() + self.delayed_entries.len() + self.in_flight.len()
    }

    /// Moves due delayed events and expired in-flight deliveries back to `ready`, and drops
    /// the deadlines of settled deliveries from the front of every lane.
    #[inline]
    fn promote(&mut self, now: Instant) {
        // Every take looks; nearly always nothing is due.
        let due = |queue: Option<&(Instant, u64)>| queue.is_some_and(|&(at, _)| at <= now);
        if due(self.delayed.first()) || self.deadlines.iter().any(|l| due(l.queue.front())) {
            self.promote_due(now);
        }
    }

    #[inline(never)]
    fn promote_due(&mut self, now: Instant) {
        while let Some(&(at, tag)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(entry) = self.delayed_entries.remove(&tag) {
                self.ready.push_back(entry);
            }
        }
        let mut expired: Vec<(Instant, u64)> = Vec::new();
        for lane in &mut self.deadlines {
            // A lane is sorted: once its front is not due, nothing in it is. Settled
            // deliveries at the front are dropped when they come due (or when the lane is
            // compacted), not on every look.
            while let Some(&(at, tag)) = lane.queue.front() {
                if at > now {
                    break;
                }
                lane.queue.pop_front();
                if self.in_flight.due_at(tag, at) {
                    expired.push((at, tag));
                }
            }
        }
        // Lanes expire in their own order: redeliver in deadline order across lanes, as one
        // sorted set of deadlines would.
        if self.deadlines.len() > 1 {
            expired.sort_unstable();
        }
        for (_, tag) in expired {
            if let Some(entry) = self.in_flight.remove(tag) {
                // Expired: its consumer vanished or hung. Redeliver before newer events.
                self.requeue(entry);
            }
        }
    }

    /// Drops the deadlines of settled deliveries (and the replaced deadlines of renewed
    /// ones) from the front of every lane, so that the front is a delivery still in flight.
    fn prune_settled(&mut self) {
        for lane in &mut self.deadlines {
            while let Some(&(at, tag)) = lane.queue.front() {
                if self.in_flight.due_at(tag, at) {
                    break;
                }
                lane.queue.pop_front();
            }
        }
    }

    /// The next delayed event or visibility deadline (after
    /// [`prune_settled`](Self::prune_settled), the front of every lane is a delivery still in
    /// flight).
    fn next_wakeup(&self) -> Option<Instant> {
        let d = self.delayed.first().map(|(at, _)| *at);
        let f = self
            .deadlines
            .iter()
            .filter_map(|lane| lane.queue.front().map(|(at, _)| *at))
            .min();
        match (d, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Records the visibility deadline of delivery `tag`, taken with `timeout`.
    fn push_deadline(&mut self, timeout: Duration, deadline: Instant, tag: u64) {
        let index = match self.deadlines.iter().position(|l| l.timeout == timeout) {
            Some(index) => index,
            None => {
                self.deadlines.push(Lane {
                    timeout,
                    queue: VecDeque::new(),
                });
                self.deadlines.len() - 1
            }
        };
        let in_flight = &self.in_flight;
        let lane = &mut self.deadlines[index].queue;
        // Settled deliveries leave their entries behind; keep the lane within a constant
        // factor of what is really in flight (amortised: at most once per that many pushes).
        if lane.len() >= 2 * in_flight.len() + 64 {
            lane.retain(|&(at, t)| in_flight.due_at(t, at));
        }
        lane.push_back((deadline, tag));
    }

    /// Puts an event given back (nacked, or expired in flight) ahead of the ready events
    /// published after it, and behind those given back before it that were published
    /// earlier: events given back together are redelivered in their publish order, whatever
    /// the order they came back in (a drain nacks a key's events in any order). The scan
    /// stops at the first later event, so it covers only the others given back.
    // Off the path of a take: a give-back is rare next to takes.
    #[inline(never)]
    fn requeue(&mut self, entry: Entry) {
        let at = self.ready.iter().take_while(|e| e.before(&entry)).count();
        self.ready.insert(at, entry);
    }

    fn take_in_flight(&mut self, tag: u64) -> Option<Entry> {
        // Its deadline stays in its lane until it reaches the front (see `promote`).
        self.in_flight.remove(tag)
    }
}

/// One queue or one topic subscription: events waiting, delayed and in flight.
pub(crate) struct Group {
    origin: String,
    capacity: usize,
    state: Mutex<GroupState>,
    /// Consumers waiting for events, woken when events become ready (publish, nack,
    /// delete): a burst of publishes while every consumer is busy signals nobody.
    changed: Waiters,
    /// Publishers waiting for room, woken when room is freed (ack, dead-letter, delete).
    space: Waiters,
}

/// A [`Notify`] that knows whether anyone waits on it, so that waking costs one atomic load
/// while nobody does. A waiter counts itself ([`enter`](Self::enter)) before it registers
/// ([`notified`](Self::notified)) and looks at the group's state again; whoever changes that
/// state does it under the group's lock and then calls [`wake`](Self::wake). Either the
/// waiter's look sees the change, or the change comes after it and sees the count.
pub(crate) struct Waiters {
    notify: Notify,
    count: AtomicUsize,
}

impl Waiters {
    fn new() -> Self {
        Waiters {
            notify: Notify::new(),
            count: AtomicUsize::new(0),
        }
    }

    /// Counts the caller as waiting until the guard is dropped.
    pub(crate) fn enter(&self) -> Waiting<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Waiting(&self.count)
    }

    /// The next wake-up (call after [`enter`](Self::enter)).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Wakes the waiters, if any.
    fn wake(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// One waiter counted by [`Waiters::enter`].
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Group {
    pub(crate) fn new(origin: String, capacity: usize) -> Arc<Self> {
        Arc::new(Group {
            origin,
            capacity,
            state: Mutex::new(GroupState::default()),
            changed: Waiters::new(),
            space: Waiters::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // loses events (every mutation is a single move), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether one more event fits.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().len() < self.capacity
    }

    /// The publishers waiting for room: enter, register, then re-check
    /// [`has_room`](Self::has_room) (see [`Waiters`]).
    pub(crate) fn space(&self) -> &Waiters {
        &self.space
    }

    /// Wakes the consumers waiting for events, if any.
    fn events_changed(&self) {
        self.changed.wake();
    }

    /// Wakes the publishers waiting for room, if any.
    fn room_freed(&self) {
        self.space.wake();
    }

    /// Appends events. Callers check room first (under the broker lock).
    pub(crate) fn push(&self, events: &[Event]) {
        {
            let mut state = self.lock();
            for event in events {
                let seq = state.next_seq;
                state.next_seq = seq.wrapping_add(1);
                state.ready.push_back(Entry {
                    event: event.clone(),
                    deliveries: 0,
                    seq,
                });
            }
        }
        self.events_changed();
    }

    pub(crate) fn delete(&self) {
        {
            let mut state = self.lock();
            *state = GroupState {
                deleted: true,
                ..GroupState::default()
            };
        }
        self.events_changed();
        self.room_freed();
    }

    /// A competing consumer of this group, ending when `closed` is cancelled or the group is
    /// deleted.
    pub(crate) fn consume(
        self: &Arc<Self>,
        visibility_timeout: Duration,
        closed: Closed,
        keep_alive: Option<Box<dyn Send + Sync>>,
    ) -> impl Stream<Item = Result<RawDelivery>> + Send + 'static {
        ConsumerStream {
            consumer: Arc::new(Consumer {
                shared: Arc::new(MemoryAcker {
                    group: Arc::clone(self),
                    closed,
                    visibility_timeout,
                }),
                visibility_timeout,
                _keep_alive: keep_alive,
            }),
            waiting: None,
        }
    }

    /// Starts the visibility timeout of delivery `tag` over: due back `timeout` from now. A
    /// delivery already past its deadline is given back first (as a consumer's next look
    /// would) and the renewal refused.
    fn renew(&self, tag: u64, timeout: Duration) -> Result<()> {
        let mut state = self.lock();
        if state.deleted {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "`{}` was deleted; the delivery cannot be renewed",
                    self.origin
                ),
            ));
        }
        let now = Instant::now();
        state.promote(now);
        let deadline = now + timeout;
        if !state.in_flight.set_deadline(tag, deadline) {
            drop(state);
            // `promote` may have made an expired delivery ready.
            self.events_changed();
            return Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "delivery on `{}` exceeded its visibility timeout before it was renewed \
                     and was handed out again",
                    self.origin
                ),
            ));
        }
        state.push_deadline(timeout, deadline, tag);
        Ok(())
    }

    fn settle(&self, tag: u64, then: impl FnOnce(&mut GroupState, Entry)) -> Result<()> {
        let mut state = self.lock();
        if state.deleted {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "`{}` was deleted; the delivery cannot be settled",
                    self.origin
                ),
            ));
        }
        match state.take_in_flight(tag) {
            Some(entry) => {
                then(&mut state, entry);
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "delivery on `{}` exceeded its visibility timeout and was handed out again; \
                     settle faster or raise the visibility timeout",
                    self.origin
                ),
            )),
        }
    }
}

/// A consumer's settlement handle, shared by all its deliveries (told apart by their tags).
struct MemoryAcker {
    group: Arc<Group>,
    closed: Closed,
    /// The consumer's visibility timeout, which [`Acker::renew`] starts over.
    visibility_timeout: Duration,
}

struct Consumer {
    shared: Arc<MemoryAcker>,
    visibility_timeout: Duration,
    _keep_alive: Option<Box<dyn Send + Sync>>,
}

/// A consumer as a stream: a ready event is taken on the spot; only when there is none does
/// it wait, in a future polled again only once it was woken.
struct ConsumerStream {
    consumer: Arc<Consumer>,
    waiting: Option<Gated<Option<RawDelivery>>>,
}

impl Stream for ConsumerStream {
    type Item = Result<RawDelivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let waiting = match this.waiting.as_mut() {
            Some(waiting) => waiting,
            None => {
                if this.consumer.shared.closed.is_closed() {
                    return Poll::Ready(None);
                }
                match this.consumer.take() {
                    Take::Delivery(d) => return Poll::Ready(Some(Ok(d))),
                    Take::Deleted => return Poll::Ready(None),
                    Take::Wait(_) => {}
                }
                let consumer = Arc::clone(&this.consumer);
                this.waiting
                    .insert(Gated::new(async move { consumer.next().await }))
            }
        };
        let next = ready!(waiting.poll(cx));
        this.waiting = None;
        Poll::Ready(next.map(Ok))
    }
}

/// What one look at the group found.
enum Take {
    Delivery(RawDelivery),
    /// Nothing ready; the next delayed event or expiry is due at this instant, if any.
    Wait(Option<Instant>),
    Deleted,
}

impl Consumer {
    async fn next(&self) -> Option<RawDelivery> {
        let group = &self.shared.group;
        loop {
            if self.shared.closed.is_closed() {
                return None;
            }
            // Ready events are taken without registering for wake-ups first.
            match self.take() {
                Take::Delivery(d) => return Some(d),
                Take::Deleted => return None,
                Take::Wait(_) => {}
            }
            // Counted before registering, so a publish after the look below signals.
            let _waiting = group.changed.enter();
            let changed = group.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Again, now that a publish from here on wakes us.
            let wakeup = match self.take() {
                Take::Delivery(d) => return Some(d),
                Take::Deleted => return None,
                Take::Wait(at) => at,
            };
            let sleep = async {
                match wakeup {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed => {}
                _ = sleep => {}
                _ = self.shared.closed.cancelled() => return None,
            }
        }
    }

    fn take(&self) -> Take {
        let mut state = self.shared.group.lock();
        if state.deleted {
            return Take::Deleted;
        }
        let now = Instant::now();
        state.promote(now);
        let Some(mut entry) = state.ready.pop_front() else {
            // About to wait: only then is it worth tidying the lanes, so the consumer does not
            // wake for deliveries settled since.
            state.prune_settled();
            return Take::Wait(state.next_wakeup());
        };
        entry.deliveries += 1;
        let deadline = now + self.visibility_timeout;
        let event = entry.event.clone();
        let attempt = entry.deliveries;
        let tag = state.in_flight.insert(entry, deadline);
        state.push_deadline(self.visibility_timeout, deadline, tag);
        Take::Delivery(RawDelivery::new(
            event,
            attempt,
            Arc::clone(&self.shared) as Arc<dyn Acker>,
            tag,
        ))
    }
}

impl MemoryAcker {
    /// Settling through a closed connection fails, as on a real broker; the delivery then
    /// comes back after its visibility timeout.
    fn check_open(&self) -> Result<()> {
        if self.closed.is_closed() {
            return Err(Error::closed("the memory transport"));
        }
        Ok(())
    }

    fn ack_now(&self, tag: u64) -> Result<()> {
        self.check_open()?;
        self.group.settle(tag, |_, _| {})?;
        self.group.room_freed();
        Ok(())
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.ack_now(tag)
    }

    fn try_ack_now(&self, tag: u64) -> Option<Result<()>> {
        Some(self.ack_now(tag))
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        self.check_open()?;
        self.group
            .settle(tag, |state, entry| state.requeue(entry))?;
        self.group.events_changed();
        Ok(())
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.check_open()?;
        self.group.settle(tag, |state, entry| {
            let key = state.next_delay_key;
            state.next_delay_key += 1;
            state.delayed.insert((Instant::now() + delay, key));
            state.delayed_entries.insert(key, entry);
        })?;
        self.group.events_changed();
        Ok(())
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        self.check_open()?;
        self.group.renew(tag, self.visibility_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            event: Event::builder("t", "s").id(id).build().unwrap(),
            deliveries: 1,
            seq: 0,
        }
    }

    #[test]
    fn publish_order_survives_the_sequence_wrapping() {
        let at = |seq: u32| Entry { seq, ..entry("e") };
        assert!(at(1).before(&at(2)));
        assert!(!at(2).before(&at(1)));
        assert!(!at(5).before(&at(5)));
        // Across the wrap: u32::MAX was published just before 0.
        assert!(at(u32::MAX).before(&at(0)));
        assert!(!at(0).before(&at(u32::MAX)));
        assert!(at(u32::MAX - 10).before(&at(10)));
    }

    #[test]
    fn a_reused_slot_refuses_the_tag_of_the_delivery_it_held_before() {
        let mut in_flight = InFlight::default();
        let first = in_flight.insert(entry("a"), Instant::now());
        let second = in_flight.insert(entry("b"), Instant::now());
        assert_ne!(first, second);
        assert_eq!(in_flight.len(), 2);

        let removed = in_flight.remove(first).expect("first is in flight");
        assert_eq!(removed.event.id(), "a");
        assert!(!in_flight.contains(first));
        // Settling twice finds nothing.
        assert!(in_flight.remove(first).is_none());

        // The freed slot is reused under a new tag; the old tag still finds nothing.
        let third = in_flight.insert(entry("c"), Instant::now());
        assert_ne!(third, first);
        assert_eq!(third & u64::from(u32::MAX), first & u64::from(u32::MAX));
        assert!(!in_flight.contains(first));
        assert!(in_flight.remove(first).is_none());
        assert!(in_flight.contains(third));
        assert_eq!(in_flight.len(), 2);

        assert_eq!(in_flight.remove(third).unwrap().event.id(), "c");
        assert_eq!(in_flight.remove(second).unwrap().event.id(), "b");
        assert_eq!(in_flight.len(), 0);
        // A tag no slot ever had.
        assert!(in_flight.remove(u64::from(u32::MAX)).is_none());
    }
}
