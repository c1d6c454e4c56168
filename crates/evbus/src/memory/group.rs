//! A bounded message group: the ready/delayed/in-flight bookkeeping behind one queue or one
//! topic subscription, shared by its competing consumers.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Acker, RawDelivery};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};

#[derive(Clone)]
struct Entry {
    /// Cheap to clone: the event's fields are shared.
    event: Event,
    /// Deliveries made so far.
    deliveries: u32,
}

struct InFlight {
    entry: Entry,
    deadline: Instant,
}

#[derive(Default)]
struct GroupState {
    ready: VecDeque<Entry>,
    delayed: BTreeSet<(Instant, u64)>,
    delayed_entries: FxHashMap<u64, Entry>,
    in_flight: FxHashMap<u64, InFlight>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_tag: u64,
    deleted: bool,
}

impl GroupState {
    fn len(&self) -> usize {
        self.ready.len() + self.delayed_entries.len() + self.in_flight.len()
    }

    /// Moves due delayed events and expired in-flight deliveries back to `ready`.
    fn promote(&mut self, now: Instant) {
        while let Some(&(at, tag)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(entry) = self.delayed_entries.remove(&tag) {
                self.ready.push_back(entry);
            }
        }
        while let Some(&(at, tag)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(f) = self.in_flight.remove(&tag) {
                // Expired: its consumer vanished or hung. Redeliver before newer events.
                self.ready.push_front(f.entry);
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let d = self.delayed.first().map(|(at, _)| *at);
        let f = self.deadlines.first().map(|(at, _)| *at);
        match (d, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take_in_flight(&mut self, tag: u64) -> Option<Entry> {
        let f = self.in_flight.remove(&tag)?;
        self.deadlines.remove(&(f.deadline, tag));
        Some(f.entry)
    }
}

/// One queue or one topic subscription: events waiting, delayed and in flight.
pub(crate) struct Group {
    origin: String,
    capacity: usize,
    state: Mutex<GroupState>,
    /// Signalled when events become ready (publish, nack, delete).
    changed: Notify,
    /// Signalled when room is freed (ack, dead-letter, delete).
    space: Notify,
}

impl Group {
    pub(crate) fn new(origin: String, capacity: usize) -> Arc<Self> {
        Arc::new(Group {
            origin,
            capacity,
            state: Mutex::new(GroupState::default()),
            changed: Notify::new(),
            space: Notify::new(),
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

    /// Registers interest in freed room; call before re-checking [`has_room`](Self::has_room).
    pub(crate) fn space(&self) -> &Notify {
        &self.space
    }

    /// Appends events. Callers check room first (under the broker lock).
    pub(crate) fn push(&self, events: &[Event]) {
        {
            let mut state = self.lock();
            for event in events {
                state.ready.push_back(Entry {
                    event: event.clone(),
                    deliveries: 0,
                });
            }
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn delete(&self) {
        {
            let mut state = self.lock();
            *state = GroupState {
                deleted: true,
                ..GroupState::default()
            };
        }
        self.changed.notify_waiters();
        self.space.notify_waiters();
    }

    /// A competing consumer of this group, ending when `closed` is cancelled or the group is
    /// deleted.
    pub(crate) fn consume(
        self: &Arc<Self>,
        visibility_timeout: Duration,
        closed: CancellationToken,
        keep_alive: Option<Box<dyn Send + Sync>>,
    ) -> impl Stream<Item = Result<RawDelivery>> + Send + 'static {
        let consumer = Consumer {
            shared: Arc::new(MemoryAcker {
                group: Arc::clone(self),
                closed,
            }),
            visibility_timeout,
            _keep_alive: keep_alive,
        };
        futures::stream::unfold(consumer, |consumer| async move {
            let next = consumer.next().await?;
            Some((Ok(next), consumer))
        })
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
    closed: CancellationToken,
}

struct Consumer {
    shared: Arc<MemoryAcker>,
    visibility_timeout: Duration,
    _keep_alive: Option<Box<dyn Send + Sync>>,
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
            if self.shared.closed.is_cancelled() {
                return None;
            }
            // Ready events are taken without registering for wake-ups first.
            match self.take() {
                Take::Delivery(d) => return Some(d),
                Take::Deleted => return None,
                Take::Wait(_) => {}
            }
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
            return Take::Wait(state.next_wakeup());
        };
        entry.deliveries += 1;
        let tag = state.next_tag;
        state.next_tag += 1;
        let deadline = now + self.visibility_timeout;
        state.deadlines.insert((deadline, tag));
        let event = entry.event.clone();
        let attempt = entry.deliveries;
        state.in_flight.insert(tag, InFlight { entry, deadline });
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
        if self.closed.is_cancelled() {
            return Err(Error::closed("the memory transport"));
        }
        Ok(())
    }

    fn ack_now(&self, tag: u64) -> Result<()> {
        self.check_open()?;
        self.group.settle(tag, |_, _| {})?;
        self.group.space.notify_waiters();
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
            .settle(tag, |state, entry| state.ready.push_front(entry))?;
        self.group.changed.notify_waiters();
        Ok(())
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.check_open()?;
        self.group.settle(tag, |state, entry| {
            state.delayed.insert((Instant::now() + delay, tag));
            state.delayed_entries.insert(tag, entry);
        })?;
        self.group.changed.notify_waiters();
        Ok(())
    }
}
