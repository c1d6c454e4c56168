//! Consuming: one librdkafka consumer per evbus consumer, owned by a thread that polls it, and
//! the bookkeeping that turns Kafka's "committed offset per partition" into per-event
//! acknowledgement.
//!
//! # Acknowledgement and commits
//!
//! Per assigned partition the consumer keeps every offset from the committed offset `C`
//! upwards that it fetched: how often it was handed out and whether it is settled. An ack
//! marks its offset done; the committed offset only moves over *contiguous* done offsets, so
//! it never passes an unsettled event, whatever order acks arrive in. Every commit carries, in
//! the commit's metadata string, what lies above `C`: the offsets already acknowledged (a
//! later owner of the partition skips them) and how often each unsettled one was handed out
//! (a later owner continues the attempt count). That string is written before deliveries are
//! handed out, so a consumer that crashes still leaves its attempt counts behind.
//!
//! # Redelivery
//!
//! `nack` and an expired visibility timeout hand the same record out again from memory, with
//! the attempt increased; the commit stays behind it meanwhile. A partition that is revoked
//! (rebalance, consumer closed, consumer vanished) stops handing out deliveries at once; its
//! unsettled events are re-read from `C` by the partition's next owner, and settling them on
//! the old consumer fails with [`ErrorKind::Expired`].

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evbus::binding::{self, HeaderStyle};
use evbus::raw::{Acker, RawDelivery, Undecodable};
use evbus::{ConsumerOptions, Error, ErrorKind, Event, Result, StartPosition};
use futures::Stream;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::error::from_kafka;
use crate::state::{Pending, StateTopic};

/// The type of the placeholder event dead-lettered in place of a record that is not a
/// binary-mode CloudEvent (see the crate README): core's, the same on every adapter.
pub use evbus::raw::UNDECODABLE_EVENT_TYPE;

/// Prefix of the commit metadata the adapter writes (its format version).
const METADATA_PREFIX: &str = "evbus1|";
/// Kafka's default `offset.metadata.max.bytes` is 4096; stay well below.
const METADATA_MAX: usize = 3500;
/// How long one poll of the consumer blocks.
const POLL: Duration = Duration::from_millis(50);
/// Most records taken in one round of polling.
const BATCH: usize = 512;
/// How long seeking back over a hole in the fetched offsets may take.
const SEEK: Duration = Duration::from_secs(1);

/// What a consumer reads and how.
pub(crate) struct ConsumerSpec {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) start: StartPosition,
    pub(crate) options: ConsumerOptions,
    /// Where the state above the committed offset is kept: the group's state topic, or
    /// (`None`) the offset commit's metadata.
    pub(crate) state: Option<Arc<StateTopic>>,
    /// Run once the consumer has left its group (deletes an anonymous group).
    pub(crate) on_closed: Option<Box<dyn FnOnce() + Send>>,
    /// Run when the delivery stream is dropped (the consumer starts leaving its group).
    pub(crate) on_dropped: Option<Box<dyn FnOnce() + Send>>,
    /// Cancelled when the transport closes: a settlement then fails with `Closed`.
    pub(crate) transport_closed: CancellationToken,
}

/// Runs a closure when dropped.
struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// How far one fetched offset got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Known from commit metadata, not fetched yet by this consumer.
    Remembered,
    /// In the channel to the stream, not handed to the application yet.
    Queued { token: u64 },
    /// Handed out; redelivered if unsettled at `deadline`.
    Out { token: u64, deadline: Instant },
    /// Nacked: to be handed out again.
    Nacked,
    /// Acknowledged.
    Done,
}

struct Entry {
    stage: Stage,
    /// Times handed out, including a queued delivery.
    deliveries: u32,
    event: Option<Arc<Decoded>>,
    /// Whether the last state written of its partition counted this queued delivery (see
    /// [`Shared::dirty_commits`]): one that joins or leaves the counted window makes its
    /// partition dirty.
    counted: bool,
}

/// A fetched record: its event, or what core needs to dead-letter a record that is not a
/// CloudEvent.
enum Decoded {
    Event(Event),
    Undecodable(Foreign),
}

/// A record that is not a binary-mode CloudEvent, kept whole.
struct Foreign {
    error: String,
    topic: String,
    id: String,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

impl Foreign {
    /// Core's undecodable message: location `kafka:<topic>`, id `<partition>/<offset>`, the
    /// key as header `kafka_key`, every header, and the value as the body.
    fn message(&self) -> Undecodable {
        let mut message = Undecodable::new(
            Error::invalid_event(self.error.clone()),
            format!("kafka:{}", self.topic),
            self.id.clone(),
        );
        if let Some(key) = &self.key {
            message = message.header("kafka_key", key.clone());
        }
        for (name, value) in &self.headers {
            message = message.header(name.clone(), value.clone());
        }
        message.body(self.body.clone())
    }
}

struct Partition {
    generation: u64,
    /// The next offset to commit: everything below it is settled.
    committed: i64,
    entries: BTreeMap<i64, Entry>,
    /// Whether the committed offset or metadata changed since the last commit.
    dirty: bool,
    /// The offset the fetch stream should deliver next (see [`Partition::fetched`]).
    fetch_next: i64,
    /// A hole in the fetched offsets that was fetched again once: if the same hole comes back,
    /// no records are there.
    hole_checked: Option<(i64, i64)>,
    /// Ranges `start..end` that hold no records (transaction markers, compaction, retention),
    /// settled by definition.
    absent: BTreeMap<i64, i64>,
}

/// What a fetched offset says about the offsets before it.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// The next record of the stream (or an earlier one again, after a seek or an offset
    /// reset): take it.
    Next,
    /// Offsets were skipped: fetch again from this one before taking anything after it.
    Refetch(i64),
}

impl Partition {
    fn new(generation: u64, committed: i64) -> Self {
        Partition {
            generation,
            committed,
            entries: BTreeMap::new(),
            dirty: false,
            fetch_next: committed,
            hole_checked: None,
            absent: BTreeMap::new(),
        }
    }

    /// Checks a fetched offset against the offsets fetched before it. Offsets of one
    /// partition arrive in order; the commit only passes offsets it knows are settled, so a
    /// skipped offset would hold it back for good, and the record there would never be
    /// delivered. A hole is fetched again once; the same hole twice means there are no
    /// records in it (a transaction marker, a compacted or expired range), and its offsets
    /// count as settled.
    fn fetched(&mut self, offset: i64) -> Fetched {
        let expected = self.fetch_next;
        if offset <= expected {
            self.fetch_next = offset + 1;
            if self.hole_checked.is_some_and(|(_, end)| offset >= end) {
                self.hole_checked = None;
            }
            return Fetched::Next;
        }
        if self.hole_checked == Some((expected, offset)) {
            self.hole_checked = None;
            self.fetch_next = offset + 1;
            self.absent.insert(expected, offset);
            self.advance();
            return Fetched::Next;
        }
        self.hole_checked = Some((expected, offset));
        Fetched::Refetch(expected)
    }

    /// Moves the committed offset over contiguous done (or absent) offsets.
    fn advance(&mut self) {
        loop {
            if let Some(entry) = self.entries.first_entry()
                && *entry.key() == self.committed
                && entry.get().stage == Stage::Done
            {
                entry.remove();
                self.committed += 1;
                self.dirty = true;
                continue;
            }
            let hole = self
                .absent
                .range(..=self.committed)
                .next_back()
                .map(|(_, &end)| end);
            match hole {
                Some(end) if end > self.committed => {
                    self.committed = end;
                    self.dirty = true;
                }
                _ => break,
            }
        }
        // Holes below the committed offset are passed.
        while let Some(entry) = self.absent.first_entry() {
            if *entry.get() > self.committed {
                break;
            }
            entry.remove();
        }
        // Entries below the committed offset are settled by definition.
        while let Some(entry) = self.entries.first_entry() {
            if *entry.key() >= self.committed {
                break;
            }
            entry.remove();
        }
    }

    /// The commit metadata: runs of acknowledged (`a`) offsets and of unsettled offsets
    /// handed out `n` times, above the committed offset. A delivery still in the channel
    /// counts only if its token is in `window` (see [`Shared::dirty_commits`]; a consumer
    /// giving the partition up, `None`, never handed any of them to the application).
    fn metadata(&self, window: Option<&HashSet<u64>>) -> String {
        let mut out = String::from(METADATA_PREFIX);
        let mut run: Option<(i64, i64, String)> = None;
        let push = |out: &mut String, (start, len, value): (i64, i64, String)| {
            if out.len() < METADATA_MAX {
                out.push_str(&format!("{start}+{len}:{value},"));
            }
        };
        for (&offset, entry) in &self.entries {
            let value = match entry.stage {
                Stage::Done => "a".to_owned(),
                Stage::Queued { token } if !window.is_some_and(|w| w.contains(&token)) => {
                    match entry.deliveries.saturating_sub(1) {
                        0 => continue,
                        n => n.to_string(),
                    }
                }
                _ if entry.deliveries == 0 => continue,
                _ => entry.deliveries.to_string(),
            };
            run = match run.take() {
                Some((start, len, v)) if start + len == offset && v == value => {
                    Some((start, len + 1, v))
                }
                Some(previous) => {
                    push(&mut out, previous);
                    Some((offset, 1, value))
                }
                None => Some((offset, 1, value)),
            };
        }
        if let Some(last) = run {
            push(&mut out, last);
        }
        out
    }

    /// Reads what [`metadata`](Self::metadata) wrote; anything unreadable is ignored (the
    /// offsets then count as never delivered).
    fn remember(&mut self, metadata: &str) {
        let Some(runs) = metadata.strip_prefix(METADATA_PREFIX) else {
            return;
        };
        for run in runs.split(',').filter(|r| !r.is_empty()) {
            let Some((range, value)) = run.split_once(':') else {
                continue;
            };
            let Some((start, len)) = range.split_once('+') else {
                continue;
            };
            let (Ok(start), Ok(len)) = (start.parse::<i64>(), len.parse::<i64>()) else {
                continue;
            };
            let (stage, deliveries) = match value {
                "a" => (Stage::Done, 0),
                n => match n.parse::<u32>() {
                    Ok(n) => (Stage::Remembered, n),
                    Err(_) => continue,
                },
            };
            for offset in start.max(self.committed)..start.saturating_add(len.min(1 << 20)) {
                self.entries.insert(
                    offset,
                    Entry {
                        stage,
                        deliveries,
                        event: None,
                        counted: false,
                    },
                );
            }
        }
    }
}

/// One item of the channel from the polling thread to the stream.
struct Ready {
    partition: i32,
    generation: u64,
    offset: i64,
    token: u64,
    /// Record value bytes (0 for a redelivery), for the prefetch bound.
    bytes: usize,
}

/// The state shared by the polling thread, the stream and the ackers.
struct State {
    partitions: HashMap<i32, Partition>,
    next_generation: u64,
    next_token: u64,
    /// Items in the channel.
    queued: usize,
    /// Record value bytes of the items in the channel.
    queued_bytes: usize,
}

impl State {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }
}

pub(crate) struct Shared {
    topic: String,
    state: Mutex<State>,
    /// The consumer, for commits from ackers; the polling thread holds the only strong
    /// reference, so it closes when the thread ends.
    consumer: Mutex<Weak<BaseConsumer<Context>>>,
    visibility: Duration,
    /// The group's state topic; `None`: the state travels in the commit metadata.
    state_topic: Option<Arc<StateTopic>>,
    /// Whether fetching is paused for backpressure (see `poll_loop`). librdkafka keeps a
    /// partition's pause across a rebalance, even through a revocation and a later
    /// re-assignment, so the rebalance callback applies this flag to every partition it
    /// assigns and clears the pause of every partition it gives up.
    paused: AtomicBool,
    /// See [`ConsumerSpec::transport_closed`].
    transport_closed: CancellationToken,
    /// How many deliveries still in the channel count as delivered in what is written while
    /// the consumer runs: the stream's in-flight limit (see [`Shared::dirty_commits`]).
    window: usize,
}

/// One partition's commit: partition, generation, offset, metadata.
type Commit = (i32, u64, i64, String);

/// A round of state-topic commits: the state records in flight, then the offset commits.
struct Round {
    pending: Vec<Pending>,
    failed: bool,
    commits: Vec<Commit>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The commit of every dirty partition, with metadata; marks them clean.
    ///
    /// Deliveries still in the channel to the stream count as delivered (so that an event
    /// whose handler crashes the process still reaches `max_attempts`, its count recorded
    /// before it was handed out) only for the first [`Shared::window`] of them in the
    /// channel's order: all the stream can hand out before the next commit, as each hand-out
    /// past those waits for a settlement, which commits. The rest of the read-ahead (up to
    /// 512 records) counted too before, so a consumer that died (a crash, a kill, a lost
    /// session) gave every record it had fetched ahead one attempt, and after `max_attempts`
    /// such deaths events no handler had received were dead-lettered. A partition whose
    /// counted deliveries changed (the window moved on) is dirty.
    fn dirty_commits(&self, state: &mut State, queued_as_delivered: bool) -> Vec<Commit> {
        let window = if queued_as_delivered {
            let mut tokens: Vec<u64> = state
                .partitions
                .values()
                .flat_map(|part| part.entries.values())
                .filter_map(|entry| match entry.stage {
                    Stage::Queued { token } => Some(token),
                    _ => None,
                })
                .collect();
            if tokens.len() > self.window {
                tokens.select_nth_unstable(self.window);
                tokens.truncate(self.window);
            }
            tokens.into_iter().collect()
        } else {
            HashSet::new()
        };
        let mut commits = Vec::new();
        for (&p, part) in state.partitions.iter_mut() {
            for entry in part.entries.values() {
                if let Stage::Queued { token } = entry.stage
                    && window.contains(&token) != entry.counted
                {
                    part.dirty = true;
                    break;
                }
            }
            if !part.dirty {
                continue;
            }
            part.dirty = false;
            commits.push((
                p,
                part.generation,
                part.committed,
                part.metadata(Some(&window)),
            ));
            for entry in part.entries.values_mut() {
                if let Stage::Queued { token } = entry.stage {
                    entry.counted = window.contains(&token);
                }
            }
        }
        commits
    }

    /// The offset commit of `commits`.
    fn tpl(&self, commits: &[Commit]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, _, offset, metadata) in commits {
            set_commit(&mut tpl, &self.topic, *p, *offset, metadata.clone());
        }
        tpl
    }

    /// Commits `commits` synchronously (rebalances), writing their state records first when
    /// the state lives in a state topic.
    fn commit_sync(&self, consumer: &BaseConsumer<Context>, commits: &[Commit], what: &str) {
        if commits.is_empty() {
            return;
        }
        if let Some(topic) = &self.state_topic {
            let records: Vec<(i32, i64, String)> = commits
                .iter()
                .map(|(p, _, offset, metadata)| (*p, *offset, metadata.clone()))
                .collect();
            if !topic.write_sync(&self.topic, &records) {
                tracing::warn!(topic = %self.topic, state_topic = %topic.name, "writing partition state failed; a later owner restarts attempt counts");
            }
        }
        if let Err(e) = consumer.commit(&self.tpl(commits), CommitMode::Sync) {
            tracing::warn!(error = %e, topic = %self.topic, "{what}");
        }
    }

    /// With a state topic, called by the polling thread each round: once the state records
    /// of the round in flight are delivered, commits its offsets (of partitions still owned
    /// by the same generation); then starts the next round with whatever is dirty. So every
    /// commit follows the delivery of its state record, and commits stay ordered.
    fn flush_state(&self, consumer: &BaseConsumer<Context>, round: &mut Option<Round>) {
        let Some(topic) = &self.state_topic else {
            return;
        };
        if let Some(current) = round.as_mut() {
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            let mut failed = current.failed;
            current
                .pending
                .retain_mut(|p| match std::pin::Pin::new(p).poll(&mut cx) {
                    std::task::Poll::Pending => true,
                    std::task::Poll::Ready(Ok(Ok(_))) => false,
                    std::task::Poll::Ready(_) => {
                        failed = true;
                        false
                    }
                });
            current.failed = failed;
            if !current.pending.is_empty() {
                return;
            }
            let done = round.take().map(|r| (r.failed, r.commits));
            if let Some((failed, commits)) = done {
                let mut state = self.lock();
                let owned: Vec<Commit> = commits
                    .into_iter()
                    .filter(|(p, generation, _, _)| {
                        match state.partitions.get_mut(p) {
                            Some(part) if part.generation == *generation => {
                                // Retried with the next round.
                                part.dirty |= failed;
                                true
                            }
                            _ => false,
                        }
                    })
                    .collect();
                if !failed
                    && !owned.is_empty()
                    && let Err(e) = consumer.commit(&self.tpl(&owned), CommitMode::Async)
                {
                    tracing::debug!(error = %e, topic = %self.topic, "offset commit failed; retried with the next one");
                    for (p, generation, _, _) in &owned {
                        if let Some(part) = state.partitions.get_mut(p) {
                            part.dirty |= part.generation == *generation;
                        }
                    }
                }
            }
        }
        let commits = {
            let mut state = self.lock();
            self.dirty_commits(&mut state, true)
        };
        if commits.is_empty() {
            return;
        }
        let mut next = Round {
            pending: Vec::new(),
            failed: false,
            commits,
        };
        for (p, _, offset, metadata) in &next.commits {
            match topic.write(&self.topic, *p, *offset, metadata) {
                Some(pending) => next.pending.push(pending),
                None => next.failed = true,
            }
        }
        *round = Some(next);
    }

    /// Commits dirty partitions asynchronously (offset commits are ordered per connection,
    /// and the list is built and sent under the state lock, so a later commit never lands
    /// before an earlier one).
    fn commit_async(&self) {
        if self.state_topic.is_some() {
            // The polling thread commits after the state records (`flush_state`).
            return;
        }
        let consumer = self.consumer.lock().ok().and_then(|c| c.upgrade());
        let Some(consumer) = consumer else { return };
        let mut state = self.lock();
        let tpl = self.tpl(&self.dirty_commits(&mut state, true));
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, topic = %self.topic, "offset commit failed; retried with the next one");
            for elem in tpl.elements() {
                if let Some(part) = state.partitions.get_mut(&elem.partition()) {
                    part.dirty = true;
                }
            }
        }
    }
}

/// Adds the commit of `offset` with `metadata` for partition `p` of `topic` to `tpl`.
fn set_commit(tpl: &mut TopicPartitionList, topic: &str, p: i32, offset: i64, metadata: String) {
    if tpl
        .add_partition_offset(topic, p, Offset::Offset(offset))
        .is_ok()
        && let Some(mut elem) = tpl.find_partition(topic, p)
    {
        elem.set_metadata(metadata);
    }
}

/// The consumer's librdkafka context: handles rebalances.
pub(crate) struct Context {
    shared: Arc<Shared>,
    start: StartPosition,
    timeout: Duration,
    assigned: watch::Sender<bool>,
    /// The polling thread's stop (the subscription dropped) and the consumer's end: what
    /// ends [`Context::read_until`]'s retries.
    stop: CancellationToken,
    closed: CancellationToken,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let others = self.assign(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, topic = %self.shared.topic, "assigning partitions failed");
                }
                // A partition paused before it was revoked would otherwise stay paused now
                // that it is back, while the polling thread believes it resumed everything.
                let paused = self.shared.paused.load(Ordering::Acquire);
                let applied = if paused {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = applied {
                    tracing::warn!(error = %e, topic = %self.shared.topic, paused, "setting the pause state of assigned partitions failed");
                }
                // Record the start of a new subscription right away, so that it survives
                // the consumer closing before anything arrives.
                let mut state = self.shared.lock();
                let mut commits = self.shared.dirty_commits(&mut state, true);
                drop(state);
                commits.extend(others);
                self.shared
                    .commit_sync(consumer, &commits, "committing start offsets failed");
                self.assigned.send_replace(true);
            }
            _ => {
                self.revoke(consumer, tpl);
                // Clear a backpressure pause: librdkafka would keep it until the partition
                // is assigned here again.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::debug!(error = %e, topic = %self.shared.topic, "resuming revoked partitions failed");
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, topic = %self.shared.topic, "unassigning partitions failed");
                }
            }
        }
    }
}

impl Context {
    /// Sets each assigned partition's start: its committed offset (and the metadata above
    /// it); for a new subscription the end (latest) or the beginning (earliest); for a
    /// partition added to the topic of an existing subscription, the beginning.
    ///
    /// A read that fails is tried again, never taken for an answer: a committed offset that
    /// could not be read, taken for none, started a durable subscription at the end of its
    /// partition (skipping what was published while it was away) or, with the bounds
    /// unread too, at offset 0 (everything again), and committed that start at once
    /// (outside review). Stopping meanwhile leaves the partitions untracked: nothing is
    /// delivered from them or committed for them.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) -> Vec<Commit> {
        let assigned: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        // Every partition up to the highest assigned one: partitions added to a topic take
        // the next numbers, so the subscription's older partitions are among these even when
        // this consumer was assigned only new ones.
        let highest = assigned.iter().copied().max().unwrap_or(-1);
        let Some(committed) = self.committed(consumer, 0..=highest) else {
            return Vec::new();
        };
        // The subscription exists once any partition has a committed offset: its first
        // assignment commits the start of every partition of the topic at once (below). A
        // partition without one is then a partition added to the topic since: everything in
        // it was published after the subscription was created, so it starts at its
        // beginning, whatever the subscription's start. At the end it would skip what
        // producers wrote to it before this consumer's metadata showed it (outside review).
        let existing = committed.values().any(Option::is_some);
        // With a state topic, the state of each assigned partition that has a committed
        // offset.
        let from_topic: HashMap<i32, String> = match &self.shared.state_topic {
            Some(topic) => {
                let wanted: Vec<(i32, i64)> = assigned
                    .iter()
                    .filter_map(|p| committed.get(p)?.as_ref().map(|(o, _)| (*p, *o)))
                    .collect();
                topic
                    .read(&self.shared.topic, &wanted)
                    .into_iter()
                    .collect()
            }
            None => HashMap::new(),
        };
        // The starts, read before the state is locked (reads may be retried for a while).
        let mut starts = Vec::new();
        for p in &assigned {
            let start = match committed.get(p).cloned().flatten() {
                Some((o, metadata)) => match &self.shared.state_topic {
                    Some(_) => (o, from_topic.get(p).cloned().unwrap_or_default(), false),
                    None => (o, metadata, false),
                },
                None => {
                    let Some(start) = self.first_start(consumer, *p, existing) else {
                        return Vec::new();
                    };
                    (start, String::new(), true)
                }
            };
            starts.push(start);
        }
        // A new subscription also records the start of the partitions other consumers of
        // its group were assigned: one of them that read the offsets before the others
        // committed anything would otherwise take its partitions for partitions added later
        // and start them at their beginning.
        let others = if existing {
            Vec::new()
        } else {
            match self.starts_of_the_others(consumer, &assigned) {
                Some(others) => others,
                None => return Vec::new(),
            }
        };
        let mut state = self.shared.lock();
        for (mut elem, (start, metadata, new)) in tpl.elements().into_iter().zip(starts) {
            let p = elem.partition();
            tracing::debug!(
                topic = %self.shared.topic,
                partition = p,
                start,
                new,
                "partition assigned"
            );
            state.next_generation += 1;
            let mut part = Partition::new(state.next_generation, start);
            part.remember(&metadata);
            part.dirty = new;
            state.partitions.insert(p, part);
            let _ = elem.set_offset(Offset::Offset(start));
        }
        others
    }

    /// The committed offset (and its metadata) of each of `partitions`, read until the read
    /// succeeds; `None` once the consumer stops meanwhile.
    fn committed(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Option<HashMap<i32, Option<(i64, String)>>> {
        let mut asked = TopicPartitionList::new();
        for p in partitions {
            asked.add_partition(&self.shared.topic, p);
        }
        let committed = self.read_until("reading the committed offsets", || {
            consumer.committed_offsets(asked.clone(), self.timeout)
        })?;
        Some(
            committed
                .elements_for_topic(&self.shared.topic)
                .iter()
                .map(|e| {
                    let known = match e.offset() {
                        Offset::Offset(o) if o >= 0 => Some((o, e.metadata().to_owned())),
                        _ => None,
                    };
                    (e.partition(), known)
                })
                .collect(),
        )
    }

    /// Where partition `p`, without a committed offset, starts: at its beginning when the
    /// subscription exists already (`existing`: a partition added since) or starts at the
    /// earliest; else at its end.
    fn first_start(&self, consumer: &BaseConsumer<Self>, p: i32, existing: bool) -> Option<i64> {
        let (low, high) = self.read_until("reading a partition's bounds", || {
            consumer.fetch_watermarks(&self.shared.topic, p, self.timeout)
        })?;
        Some(match (self.start, existing) {
            (StartPosition::Latest, false) => high,
            (StartPosition::Earliest, _) | (_, true) => low,
        })
    }

    /// For a new subscription: the starts of the topic's partitions not in `assigned` that
    /// still have no committed offset, as commits.
    fn starts_of_the_others(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &[i32],
    ) -> Option<Vec<Commit>> {
        let count = self.read_until("reading the topic's partitions", || {
            consumer
                .fetch_metadata(Some(&self.shared.topic), self.timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == self.shared.topic)
                        .map_or(0, |t| t.partitions().len() as i32)
                })
        })?;
        let others: Vec<i32> = (0..count).filter(|p| !assigned.contains(p)).collect();
        if others.is_empty() {
            return Some(Vec::new());
        }
        let mut starts = Vec::new();
        for &p in &others {
            starts.push((p, self.first_start(consumer, p, false)?));
        }
        // Read again just before: a partition its owner committed meanwhile keeps that.
        let committed = self.committed(consumer, others)?;
        Some(
            starts
                .into_iter()
                .filter(|(p, _)| committed.get(p).is_none_or(Option::is_none))
                .map(|(p, start)| (p, 0, start, Partition::new(0, start).metadata(None)))
                .collect(),
        )
    }

    /// `read()`, again (after 100 ms, doubling to 5 s) until it succeeds; `None` once the
    /// consumer stops or ends meanwhile.
    fn read_until<T>(
        &self,
        what: &str,
        mut read: impl FnMut() -> rdkafka::error::KafkaResult<T>,
    ) -> Option<T> {
        let mut pause = Duration::from_millis(100);
        loop {
            match read() {
                Ok(value) => return Some(value),
                Err(e) => {
                    if self.stop.is_cancelled() || self.closed.is_cancelled() {
                        return None;
                    }
                    tracing::warn!(
                        error = %e,
                        topic = %self.shared.topic,
                        "{what} for a partition assignment failed; trying again in {pause:?} \
                         (a start that was not read is never guessed)"
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Gives revoked partitions up: records what was handed out, commits, forgets them.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let mut state = self.shared.lock();
        let mut commits = Vec::new();
        for elem in tpl.elements() {
            let p = elem.partition();
            let Some(part) = state.partitions.remove(&p) else {
                continue;
            };
            tracing::debug!(
                topic = %self.shared.topic,
                partition = p,
                committed = part.committed,
                lost,
                "partition revoked"
            );
            if lost {
                continue;
            }
            commits.push((p, part.generation, part.committed, part.metadata(None)));
        }
        drop(state);
        self.shared.commit_sync(
            consumer,
            &commits,
            "committing revoked partitions failed; their unsettled events are redelivered",
        );
    }
}

/// Settles one delivery, or renews its visibility timeout.
struct KafkaAcker {
    shared: Arc<Shared>,
    partition: i32,
    generation: u64,
    offset: i64,
    token: u64,
}

impl KafkaAcker {
    /// The error of a delivery that is no longer current, for `what` (settled, renewed).
    fn stale(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Expired,
            format!(
                "the delivery of offset {} of `{}` partition {} can no longer be {what}: its \
                 visibility timeout expired or the partition was reassigned, so it is \
                 redelivered",
                self.offset, self.shared.topic, self.partition
            ),
        )
    }

    /// Runs `f` on the delivery's partition and on its entry's visibility deadline if the
    /// delivery is still current: handed out under this token, by this generation of the
    /// partition.
    fn with_current<R>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Partition, Instant) -> R,
    ) -> Result<R> {
        // Its consumer left the group at close, which revoked every partition: the delivery
        // is stale, but because the transport closed.
        if self.shared.transport_closed.is_cancelled() {
            return Err(Error::closed("the Kafka transport").with_hint(
                "the delivery comes back to the subscription's next consumer; settle before \
                 closing",
            ));
        }
        let mut state = self.shared.lock();
        let part = state
            .partitions
            .get_mut(&self.partition)
            .filter(|p| p.generation == self.generation)
            .ok_or_else(|| self.stale(what))?;
        let entry = part
            .entries
            .get(&self.offset)
            .ok_or_else(|| self.stale(what))?;
        let deadline = match entry.stage {
            Stage::Out { token, deadline } if token == self.token => deadline,
            _ => return Err(self.stale(what)),
        };
        Ok(f(part, deadline))
    }

    /// Runs `settle` on the delivery's entry if the delivery is still current.
    fn with_entry(&self, settle: impl FnOnce(&mut Entry)) -> Result<()> {
        self.with_current("settled", |part, _| {
            if let Some(entry) = part.entries.get_mut(&self.offset) {
                settle(entry);
            }
            part.advance();
            part.dirty = true;
        })
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self, _tag: u64) -> Result<()> {
        self.with_entry(|entry| {
            entry.stage = Stage::Done;
            entry.event = None;
        })?;
        self.shared.commit_async();
        Ok(())
    }

    async fn nack(&self, _tag: u64) -> Result<()> {
        self.with_entry(|entry| entry.stage = Stage::Nacked)
    }

    /// Moves the delivery's deadline to a whole visibility timeout from now, under the state
    /// lock the polling thread looks at deadlines under. A deadline already passed is not
    /// moved, even if the polling thread has not handed the record out again yet: its holder
    /// cannot tell that apart, so the renewal fails with `Expired` either way. Nothing is
    /// committed: the commit metadata records attempts, not deadlines.
    async fn renew(&self, _tag: u64) -> Result<()> {
        let renewed = self.with_current("renewed", |part, deadline| {
            let now = Instant::now();
            if deadline <= now {
                return false;
            }
            if let Some(entry) = part.entries.get_mut(&self.offset) {
                entry.stage = Stage::Out {
                    token: self.token,
                    deadline: now + self.shared.visibility,
                };
            }
            true
        })?;
        if renewed {
            Ok(())
        } else {
            Err(self.stale("renewed"))
        }
    }
}

/// Starts a consumer of `spec` and returns its raw delivery stream once it has its first
/// partition assignment.
pub(crate) async fn start(
    config: &KafkaConfig,
    spec: ConsumerSpec,
    closed: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<impl Stream<Item = Result<RawDelivery>> + Send + 'static> {
    let shared = Arc::new(Shared {
        topic: spec.topic.clone(),
        state: Mutex::new(State {
            partitions: HashMap::new(),
            next_generation: 0,
            next_token: 0,
            queued: 0,
            queued_bytes: 0,
        }),
        consumer: Mutex::new(Weak::new()),
        visibility: spec.options.visibility_timeout,
        state_topic: spec.state.clone(),
        paused: AtomicBool::new(false),
        transport_closed: spec.transport_closed.clone(),
        window: spec.options.max_in_flight.max(1),
    });
    let (assigned_tx, mut assigned) = watch::channel(false);
    let stop = CancellationToken::new();
    let context = Context {
        shared: Arc::clone(&shared),
        start: spec.start,
        timeout: config.operation_timeout,
        assigned: assigned_tx,
        stop: stop.clone(),
        closed: closed.clone(),
    };
    let mut client = config.client_config();
    client
        .set("group.id", &spec.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("partition.assignment.strategy", "range,roundrobin")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            config.heartbeat_interval.as_millis().to_string(),
        )
        .set("fetch.wait.max.ms", "100")
        .set(
            "fetch.max.bytes",
            (config.message_max_bytes() * 2).to_string(),
        )
        .set(
            "max.partition.fetch.bytes",
            config.message_max_bytes().to_string(),
        );
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    let what = format!(
        "consuming Kafka topic `{}` as group `{}`",
        spec.topic, spec.group
    );
    let consumer: BaseConsumer<Context> = client
        .create_with_context(context)
        .map_err(|e| from_kafka(e, &what))?;
    consumer
        .subscribe(&[&spec.topic])
        .map_err(|e| from_kafka(e, &what))?;
    let consumer = Arc::new(consumer);
    if let Ok(mut weak) = shared.consumer.lock() {
        *weak = Arc::downgrade(&consumer);
    }

    let (tx, rx) = mpsc::unbounded_channel::<Ready>();
    let high_water = Prefetch::for_in_flight(spec.options.max_in_flight);
    let join_deadline = Instant::now() + config.assignment_timeout;
    let operation_timeout = config.operation_timeout;
    {
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        let closed = closed.clone();
        let on_closed = spec.on_closed;
        tracker.spawn_blocking(move || {
            poll_loop(&consumer, &shared, &tx, &stop, &closed, high_water);
            finish_join(
                &consumer,
                join_deadline.min(Instant::now() + operation_timeout),
            );
            // Dropping the consumer leaves the group; the revoke callback commits first.
            close_here(consumer, &shared);
            // Deliveries kept after their subscription ended keep `shared`, and with it the
            // state topic: not its reader, a librdkafka client of its own (threads, sockets).
            if let Some(topic) = &shared.state_topic {
                topic.close_reader();
            }
            if let Some(on_closed) = on_closed {
                on_closed();
            }
        });
    }
    // From here on, dropping `guard` stops the thread.
    let guard = (stop.drop_guard(), OnDrop(spec.on_dropped));

    let within = config.assignment_timeout;
    match tokio::time::timeout(within, assigned.wait_for(|a| *a)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(Error::closed("the Kafka consumer")),
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{what}: no partition assignment within {within:?} (assignment_timeout); is \
                     the group coordinator reachable?"
                ),
            ));
        }
    }
    // Ended (transport closed, topic deleted) while waiting: the consumer only finished
    // joining so as to leave cleanly (`finish_join`); it delivers nothing.
    if closed.is_cancelled() {
        return Err(Error::closed("the Kafka consumer"));
    }

    let state = (rx, shared, guard);
    Ok(futures::stream::unfold(
        state,
        |(mut rx, shared, guard)| async move {
            loop {
                let ready = rx.recv().await?;
                let taken = take(&shared, &ready);
                let Some((decoded, attempt)) = taken else {
                    continue;
                };
                let acker = Arc::new(KafkaAcker {
                    shared: Arc::clone(&shared),
                    partition: ready.partition,
                    generation: ready.generation,
                    offset: ready.offset,
                    token: ready.token,
                });
                // The acker is per delivery (it holds the offset): tag 0.
                let raw = match &*decoded {
                    Decoded::Event(event) => RawDelivery::new(event.clone(), attempt, acker, 0),
                    // Core dead-letters it and acks it through the acker.
                    Decoded::Undecodable(foreign) => {
                        RawDelivery::undecodable(foreign.message(), attempt, acker, 0)
                    }
                };
                return Some((Ok(raw), (rx, shared, guard)));
            }
        },
    ))
}

/// Lets a consumer that is ending before its first assignment (its `subscribe` was cancelled,
/// or the transport closed or the topic was deleted meanwhile) finish joining its group, up
/// to `deadline`, so that it leaves as a member. Closed mid-join, it never leaves: tansu keeps
/// the group rebalancing for it, and the next consumer of the group gets no assignment (seen
/// for more than 30 s).
fn finish_join(consumer: &BaseConsumer<Context>, deadline: Instant) {
    while !*consumer.context().assigned.borrow() && Instant::now() < deadline {
        // Nothing is taken from a consumer that is ending: records polled here are not
        // tracked, so no commit passes them.
        let _ = consumer.poll(POLL);
    }
}

/// Drops the last reference to the consumer on the polling thread, so that it has left its
/// group before the thread's `on_closed` runs (which releases `delete_topic`, and deletes an
/// anonymous group). An acker committing at that moment holds a reference for a moment; had
/// it the last one, the consumer would close on that task's (async) thread, and later.
fn close_here(mut consumer: Arc<BaseConsumer<Context>>, shared: &Shared) {
    // No acker takes a new reference from here on (it then skips its asynchronous commit;
    // the revoke callback commits every acked offset synchronously).
    if let Ok(mut weak) = shared.consumer.lock() {
        *weak = Weak::new();
    }
    loop {
        match Arc::try_unwrap(consumer) {
            Ok(last) => {
                drop(last);
                return;
            }
            Err(shared) => {
                consumer = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// How often records this client cannot read are reported while they block a partition.
const COMPLAIN_EVERY: Duration = Duration::from_secs(30);

/// Whether a consumer error means records this client cannot read (librdkafka retries them
/// for ever): a compression codec it was built without, a record over its fetch limits, a
/// corrupt record. Not the transient errors of a broker connection.
fn unreadable(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotImplemented
                | RDKafkaErrorCode::BadCompression
                | RDKafkaErrorCode::UnsupportedCompressionType
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::BadMessage
        )
    )
}

/// Marks a queued item handed out; `None` if it is stale (revoked partition, redelivered).
fn take(shared: &Shared, ready: &Ready) -> Option<(Arc<Decoded>, u32)> {
    let mut state = shared.lock();
    state.queued = state.queued.saturating_sub(1);
    state.queued_bytes = state.queued_bytes.saturating_sub(ready.bytes);
    let part = state
        .partitions
        .get_mut(&ready.partition)
        .filter(|p| p.generation == ready.generation)?;
    let entry = part.entries.get_mut(&ready.offset)?;
    match entry.stage {
        Stage::Queued { token } if token == ready.token => {}
        _ => return None,
    }
    entry.stage = Stage::Out {
        token: ready.token,
        deadline: Instant::now() + shared.visibility,
    };
    Some((Arc::clone(entry.event.as_ref()?), entry.deliveries.max(1)))
}

/// Decodes a record into an event, or a placeholder naming what is wrong with it.
fn decode(topic: &str, message: &impl Message) -> Decoded {
    // rdkafka (0.38) unwraps the UTF-8 conversion of every header *name* it hands out: a
    // record whose producer wrote a name that is not UTF-8 would panic the polling thread
    // and stop the consumer. Caught here, such a record is undecodable like any other
    // (dead-lettered with its body; its headers cannot be read).
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut headers = Vec::new();
        let mut bad_header = None;
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                if !is_cloudevents_header(h.key) {
                    // The binding ignores it: whatever its bytes (a binary tracing header),
                    // it does not make the record undecodable. It stays in the record, and
                    // in the placeholder should the record not decode for another reason.
                    continue;
                }
                // A header with a null value (legal in Kafka; a stock producer writes an
                // optional attribute it has no value for so) carries no value: the attribute
                // is absent, not empty (an empty `ce_subject` would make the record
                // undecodable).
                let Some(value) = h.value else { continue };
                match std::str::from_utf8(value) {
                    Ok(v) => headers.push((h.key.to_owned(), v.to_owned())),
                    Err(_) => bad_header = Some(format!("header `{}` is not UTF-8", h.key)),
                }
            }
        }
        (headers, bad_header)
    }));
    let (headers, bad_header) = read.unwrap_or_else(|_| {
        tracing::warn!(
            topic,
            partition = message.partition(),
            offset = message.offset(),
            "a record has a header name that is not UTF-8 (the panic above is rdkafka's, \
             caught); it is dead-lettered as undecodable, without its headers"
        );
        (Vec::new(), Some("a header name is not UTF-8".to_owned()))
    });
    let body = bytes::Bytes::copy_from_slice(message.payload().unwrap_or_default());
    let result = match bad_header {
        Some(problem) => Err(Error::invalid_event(problem)),
        None => binding::decode(headers.clone(), body.clone(), HeaderStyle::KAFKA),
    };
    match result.and_then(|event| with_record_key(event, message.key())) {
        Ok(event) => Decoded::Event(event),
        Err(e) => Decoded::Undecodable(Foreign {
            error: e.message().to_owned(),
            topic: topic.to_owned(),
            id: format!("{}/{}", message.partition(), message.offset()),
            key: message.key().map(<[u8]>::to_vec),
            headers: std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                message
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default()
            }))
            .unwrap_or_default(),
            body,
        }),
    }
}

/// `event` with the record's key as its `partitionkey`, when it has none and the key is text:
/// a stock producer keys its records without writing `ce_partitionkey` (as the CloudEvents
/// SDKs read the key back). Without it the key was lost to evbus: handlers saw no key to keep
/// order by, and a dead letter and its redrive were written without one.
fn with_record_key(event: Event, key: Option<&[u8]>) -> Result<Event> {
    match key.map(std::str::from_utf8) {
        Some(Ok(key)) if !key.is_empty() && event.partition_key().is_none() => {
            event.into_builder().partition_key(key).build()
        }
        _ => Ok(event),
    }
}

/// Whether header `name` is one the Kafka binding reads (a `ce_` attribute or the content
/// type), and so must be UTF-8 text, as on the other adapters.
fn is_cloudevents_header(name: &str) -> bool {
    let style = HeaderStyle::KAFKA;
    name.starts_with(style.prefix) || name == style.content_type
}

/// How much the polling thread hands on ahead of the application before it pauses fetching.
#[derive(Clone, Copy, Debug)]
struct Prefetch {
    messages: usize,
    bytes: usize,
}

impl Prefetch {
    /// At least 512 records (more with a large in-flight limit) or 8 MiB of values.
    fn for_in_flight(max_in_flight: usize) -> Self {
        Prefetch {
            messages: max_in_flight.saturating_mul(4).max(512),
            bytes: 8 << 20,
        }
    }

    fn full(self, queued: usize, bytes: usize) -> bool {
        queued >= self.messages || bytes >= self.bytes
    }

    /// Below half of both bounds: fetching resumes.
    fn drained(self, queued: usize, bytes: usize) -> bool {
        queued < self.messages / 2 && bytes < self.bytes / 2
    }
}

/// The polling thread.
fn poll_loop(
    consumer: &BaseConsumer<Context>,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Ready>,
    stop: &CancellationToken,
    closed: &CancellationToken,
    high_water: Prefetch,
) {
    let mut round = None;
    // When records that cannot be read were last reported.
    let mut complained: Option<Instant> = None;
    while !stop.is_cancelled() && !closed.is_cancelled() && !tx.is_closed() {
        shared.flush_state(consumer, &mut round);
        // Backpressure: stop fetching while the application is far behind. Pausing drops
        // what librdkafka prefetched (resuming fetches it again), so the bound is wide enough
        // for a pause to be rare while an application keeps up.
        let (queued, bytes) = {
            let state = shared.lock();
            (state.queued, state.queued_bytes)
        };
        // The flag is set before pausing and cleared after resuming, so a rebalance in
        // between (callbacks run inside `poll`, on this thread) sees what it must apply.
        let paused = shared.paused.load(Ordering::Acquire);
        if !paused && high_water.full(queued, bytes) {
            shared.paused.store(true, Ordering::Release);
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
            tracing::debug!(topic = %shared.topic, queued, bytes, "fetching paused");
        } else if paused && high_water.drained(queued, bytes) {
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.resume(&assignment);
            }
            shared.paused.store(false, Ordering::Release);
            tracing::debug!(topic = %shared.topic, queued, bytes, "fetching resumed");
        }

        let mut batch = Vec::new();
        if let Some(first) = consumer.poll(POLL) {
            batch.push(first);
            while batch.len() < BATCH {
                match consumer.poll(Duration::ZERO) {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
        }
        let mut ready = Vec::new();
        // Partitions to seek back (partition, offset) after this round: their later records
        // come again.
        let mut refetching: Vec<(i32, i64)> = Vec::new();
        {
            let mut state = shared.lock();
            let state = &mut *state;
            for message in batch {
                let message = match message {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(_)) => continue,
                    Err(e) if unreadable(&e) => {
                        // librdkafka retries such a batch for ever and nothing behind it in
                        // its partition is delivered: said loudly (at most every 30 s).
                        if complained.is_none_or(|at| at.elapsed() >= COMPLAIN_EVERY) {
                            complained = Some(Instant::now());
                            tracing::error!(
                                error = %e, topic = %shared.topic,
                                "Kafka records cannot be read (a codec or size this client \
                                 does not support?); their partition is stuck until they are \
                                 removed or the consumer can read them"
                            );
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, topic = %shared.topic, "Kafka consumer error; librdkafka retries");
                        continue;
                    }
                };
                let p = message.partition();
                let offset = message.offset();
                let Some(part) = state.partitions.get_mut(&p) else {
                    continue;
                };
                if refetching.iter().any(|&(q, _)| q == p) {
                    continue;
                }
                if let Fetched::Refetch(from) = part.fetched(offset) {
                    tracing::warn!(
                        topic = %shared.topic,
                        partition = p,
                        from,
                        to = offset,
                        "the fetch skipped offsets; fetching them again"
                    );
                    refetching.push((p, from));
                    continue;
                }
                if offset < part.committed {
                    continue;
                }
                let entry = part.entries.entry(offset).or_insert(Entry {
                    stage: Stage::Remembered,
                    deliveries: 0,
                    event: None,
                    counted: false,
                });
                match entry.stage {
                    Stage::Done => {
                        part.advance();
                        continue;
                    }
                    Stage::Remembered => {}
                    // Already in memory (a fetch repeated after a seek): keep it.
                    _ => continue,
                }
                state.next_token += 1;
                let token = state.next_token;
                entry.stage = Stage::Queued { token };
                entry.counted = false;
                entry.deliveries += 1;
                entry.event = Some(Arc::new(decode(&shared.topic, &message)));
                part.dirty = true;
                ready.push(Ready {
                    partition: p,
                    generation: part.generation,
                    offset,
                    token,
                    bytes: message.payload_len(),
                });
            }
            // Nacked and expired deliveries go out again.
            let now = Instant::now();
            let mut again = Vec::new();
            for (&p, part) in state.partitions.iter_mut() {
                for (&offset, entry) in part.entries.iter_mut() {
                    let due = match entry.stage {
                        Stage::Nacked => true,
                        Stage::Out { deadline, .. } => deadline <= now,
                        _ => false,
                    };
                    if due && entry.event.is_some() {
                        entry.deliveries += 1;
                        again.push((p, part.generation, offset));
                        part.dirty = true;
                    }
                }
            }
            for (p, generation, offset) in again {
                let token = state.token();
                if let Some(entry) = state
                    .partitions
                    .get_mut(&p)
                    .and_then(|part| part.entries.get_mut(&offset))
                {
                    entry.stage = Stage::Queued { token };
                    entry.counted = false;
                }
                ready.push(Ready {
                    partition: p,
                    generation,
                    offset,
                    token,
                    bytes: 0,
                });
            }
            state.queued += ready.len();
            state.queued_bytes += ready.iter().map(|r| r.bytes).sum::<usize>();
        }
        // Outside the state lock: a seek waits on librdkafka, and ackers take that lock.
        for (p, from) in refetching {
            if let Err(e) = consumer.seek(&shared.topic, p, Offset::Offset(from), SEEK) {
                tracing::warn!(error = %e, topic = %shared.topic, partition = p, "seeking back failed");
                // The next record after the hole tries again.
                if let Some(part) = shared.lock().partitions.get_mut(&p) {
                    part.hole_checked = None;
                }
            }
        }
        if !ready.is_empty() {
            // Attempt counts are recorded before anything is handed out.
            shared.commit_async();
            shared.flush_state(consumer, &mut round);
            for item in ready {
                if tx.send(item).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stage: Stage, deliveries: u32) -> Entry {
        Entry {
            stage,
            deliveries,
            counted: false,
            event: None,
        }
    }

    #[test]
    fn the_commit_never_passes_an_unsettled_offset() {
        let mut part = Partition::new(1, 10);
        let deadline = Instant::now();
        part.entries
            .insert(10, entry(Stage::Out { token: 1, deadline }, 1));
        part.entries.insert(11, entry(Stage::Done, 1));
        part.entries.insert(12, entry(Stage::Done, 1));
        part.advance();
        assert_eq!(part.committed, 10);
        part.entries.get_mut(&10).unwrap().stage = Stage::Done;
        part.advance();
        assert_eq!(part.committed, 13);
        assert!(part.entries.is_empty());
    }

    #[test]
    fn a_hole_in_the_fetched_offsets_is_fetched_again_then_passed() {
        let mut part = Partition::new(1, 10);
        assert_eq!(part.fetched(10), Fetched::Next);
        part.entries.insert(10, entry(Stage::Done, 1));
        part.advance();
        assert_eq!(part.committed, 11);
        // 11 and 12 skipped: fetch again from 11, take nothing after the hole meanwhile.
        assert_eq!(part.fetched(13), Fetched::Refetch(11));
        // The fetch again delivers them: nothing is passed over.
        assert_eq!(part.fetched(11), Fetched::Next);
        assert_eq!(part.fetched(12), Fetched::Next);
        assert_eq!(part.fetched(13), Fetched::Next);
        assert!(part.absent.is_empty());
        assert_eq!(
            part.committed, 11,
            "the commit waits for 11 and 12 to be settled"
        );

        // The same hole twice: no records there (a transaction marker, say); the commit
        // passes it once the records around it are settled.
        assert_eq!(part.fetched(16), Fetched::Refetch(14));
        assert_eq!(part.fetched(16), Fetched::Next);
        for offset in [11, 12, 13] {
            part.entries.insert(offset, entry(Stage::Done, 1));
        }
        part.advance();
        assert_eq!(part.committed, 16, "14 and 15 hold no records");
        assert!(part.absent.is_empty());
        // An earlier offset again (a seek, an offset reset) restarts the expectation there.
        assert_eq!(part.fetched(12), Fetched::Next);
        assert_eq!(part.fetched(13), Fetched::Next);
    }

    #[test]
    fn a_different_hole_is_fetched_again_too() {
        let mut part = Partition::new(1, 0);
        assert_eq!(part.fetched(2), Fetched::Refetch(0));
        // A record fetched before the seek: another hole, fetched again as well.
        assert_eq!(part.fetched(3), Fetched::Refetch(0));
        assert_eq!(part.fetched(0), Fetched::Next);
        assert!(part.absent.is_empty());
    }

    /// Of the deliveries fetched ahead, only as many as the stream may hand out before the
    /// next commit (its in-flight limit) are recorded as delivered, in the channel's order
    /// across partitions; as the stream takes them, the next ones are recorded. A consumer
    /// that dies thus adds an attempt to those only, not to its whole read-ahead.
    #[test]
    fn only_the_deliveries_the_stream_may_take_next_are_recorded_as_delivered() {
        // Partition 0: offsets 0..4 queued under tokens 1, 3, 5, 7; partition 1: offsets
        // 0..4 under tokens 2, 4, 6, 8 (the channel interleaves them).
        let mut partitions = HashMap::new();
        for p in 0..2_i32 {
            let mut part = Partition::new(1, 0);
            for offset in 0..4_i64 {
                let token = (offset * 2 + i64::from(p) + 1) as u64;
                part.entries
                    .insert(offset, entry(Stage::Queued { token }, 1));
            }
            part.dirty = true;
            partitions.insert(p, part);
        }
        let shared = shared_with(partitions, Duration::from_secs(30), 3);
        let written = |commits: Vec<Commit>| {
            let mut commits: Vec<(i32, String)> =
                commits.into_iter().map(|(p, _, _, m)| (p, m)).collect();
            commits.sort();
            commits
        };
        let mut state = shared.lock();
        // Tokens 1, 2 and 3: offsets 0 and 1 of partition 0, offset 0 of partition 1.
        assert_eq!(
            written(shared.dirty_commits(&mut state, true)),
            [
                (0, "evbus1|0+2:1,".to_owned()),
                (1, "evbus1|0+1:1,".to_owned())
            ]
        );
        // Nothing changed: nothing to write.
        assert!(shared.dirty_commits(&mut state, true).is_empty());
        // The stream takes token 1 (partition 0, offset 0): token 4 (partition 1, offset 1)
        // joins the window, and only its partition is written again.
        let deadline = Instant::now() + Duration::from_secs(30);
        state
            .partitions
            .get_mut(&0)
            .unwrap()
            .entries
            .get_mut(&0)
            .unwrap()
            .stage = Stage::Out { token: 1, deadline };
        assert_eq!(
            written(shared.dirty_commits(&mut state, true)),
            [(1, "evbus1|0+2:1,".to_owned())]
        );
        // Leaving the partitions: nothing queued counts.
        assert_eq!(
            state.partitions[&0].metadata(None),
            "evbus1|0+1:1,",
            "only the delivery handed out"
        );
    }

    #[test]
    fn metadata_round_trips_acks_and_delivery_counts() {
        let mut part = Partition::new(1, 5);
        let deadline = Instant::now();
        part.entries
            .insert(5, entry(Stage::Out { token: 1, deadline }, 2));
        part.entries
            .insert(6, entry(Stage::Out { token: 2, deadline }, 2));
        part.entries.insert(7, entry(Stage::Done, 1));
        part.entries.insert(8, entry(Stage::Queued { token: 3 }, 1));
        let running = part.metadata(Some(&HashSet::from([3])));
        assert_eq!(running, "evbus1|5+2:2,7+1:a,8+1:1,");
        let leaving = part.metadata(None);
        assert_eq!(leaving, "evbus1|5+2:2,7+1:a,");

        let mut next = Partition::new(2, 5);
        next.remember(&leaving);
        assert_eq!(next.entries[&5].deliveries, 2);
        assert_eq!(next.entries[&6].stage, Stage::Remembered);
        assert_eq!(next.entries[&7].stage, Stage::Done);
        assert!(!next.entries.contains_key(&8));
        next.remember("not ours");
        next.remember("evbus1|garbage,1+x:2,");
        assert_eq!(next.entries.len(), 3);
    }

    /// A consumer's shared state holding `partitions`, with an in-flight limit of `window`.
    fn shared_with(
        partitions: HashMap<i32, Partition>,
        visibility: Duration,
        window: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            topic: "t".to_owned(),
            state: Mutex::new(State {
                partitions,
                next_generation: 1,
                next_token: 1,
                queued: 0,
                queued_bytes: 0,
            }),
            consumer: Mutex::new(Weak::new()),
            visibility,
            state_topic: None,
            paused: AtomicBool::new(false),
            transport_closed: CancellationToken::new(),
            window,
        })
    }

    /// A consumer's shared state with partition 0 (generation 1) holding offset 5 handed
    /// out under token 1 until `deadline`, and the acker of that delivery.
    fn handed_out(deadline: Instant, visibility: Duration) -> KafkaAcker {
        let mut part = Partition::new(1, 5);
        part.entries
            .insert(5, entry(Stage::Out { token: 1, deadline }, 1));
        let shared = shared_with(HashMap::from([(0, part)]), visibility, 1);
        KafkaAcker {
            shared,
            partition: 0,
            generation: 1,
            offset: 5,
            token: 1,
        }
    }

    fn deadline_of(acker: &KafkaAcker) -> Option<Instant> {
        match acker.shared.lock().partitions[&0].entries[&5].stage {
            Stage::Out { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_renewal_moves_the_deadline_of_a_current_delivery_only() {
        let visibility = Duration::from_secs(30);
        let acker = handed_out(Instant::now() + Duration::from_secs(1), visibility);
        let before = Instant::now();
        acker.renew(0).await.expect("renewing a current delivery");
        let deadline = deadline_of(&acker).expect("still handed out");
        assert!(
            deadline >= before + visibility,
            "a whole timeout from the renewal"
        );
        assert!(
            !acker.shared.lock().partitions[&0].dirty,
            "nothing to commit"
        );

        // Its deadline passed (the polling thread has not handed it out again yet): refused,
        // and the deadline stays where it was, so the record goes out again.
        let passed = Instant::now();
        let acker = handed_out(passed, visibility);
        let e = acker
            .renew(0)
            .await
            .expect_err("renewing past the deadline");
        assert_eq!(e.kind(), ErrorKind::Expired, "{e}");
        assert_eq!(deadline_of(&acker), Some(passed));

        // Handed out again (a new token), or the partition reassigned (a new generation).
        let acker = handed_out(Instant::now() + visibility, visibility);
        acker
            .shared
            .lock()
            .partitions
            .get_mut(&0)
            .unwrap()
            .entries
            .get_mut(&5)
            .unwrap()
            .stage = Stage::Queued { token: 2 };
        let e = acker
            .renew(0)
            .await
            .expect_err("renewing a redelivered record");
        assert_eq!(e.kind(), ErrorKind::Expired, "{e}");
        let acker = handed_out(Instant::now() + visibility, visibility);
        acker
            .shared
            .lock()
            .partitions
            .get_mut(&0)
            .unwrap()
            .generation = 2;
        let e = acker
            .renew(0)
            .await
            .expect_err("renewing on a reassigned partition");
        assert_eq!(e.kind(), ErrorKind::Expired, "{e}");

        // The transport closed.
        let acker = handed_out(Instant::now() + visibility, visibility);
        acker.shared.transport_closed.cancel();
        let e = acker.renew(0).await.expect_err("renewing after close");
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    }

    fn record(headers: &[(&str, &[u8])]) -> rdkafka::message::OwnedMessage {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |hs, (key, value)| {
                hs.insert(Header {
                    key,
                    value: Some(*value),
                })
            });
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        )
    }

    #[test]
    fn a_cloudevents_header_with_a_null_value_is_an_absent_attribute() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
        let headers = EVENT
            .iter()
            .fold(OwnedHeaders::new(), |hs, (key, value)| {
                hs.insert(Header {
                    key,
                    value: Some(*value),
                })
            })
            .insert(Header {
                key: "ce_subject",
                value: None::<&[u8]>,
            });
        let message = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        );
        match decode("t", &message) {
            Decoded::Event(event) => assert_eq!(event.subject(), None),
            Decoded::Undecodable(f) => panic!("a null `ce_subject` refused: {}", f.error),
        }
    }

    const EVENT: [(&str, &[u8]); 4] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"1"),
        ("ce_source", b"/s"),
        ("ce_type", b"t"),
    ];

    #[test]
    fn only_cloudevents_headers_must_be_utf8() {
        let mut headers = EVENT.to_vec();
        headers.extend([
            ("traceparent-bin", &[0xff, 0x00][..]),
            ("producer", b"legacy"),
        ]);
        match decode("t", &record(&headers)) {
            Decoded::Event(event) => {
                assert_eq!(event.id(), "1");
                // Foreign headers are ignored by the binding, as before.
                assert!(event.extensions().is_empty(), "{:?}", event.extensions());
            }
            Decoded::Undecodable(f) => panic!("a binary foreign header refused: {}", f.error),
        }
        for bad in [("ce_subject", &[0xff][..]), ("content-type", &[0xff][..])] {
            let mut headers = EVENT.to_vec();
            headers.push(bad);
            match decode("t", &record(&headers)) {
                Decoded::Undecodable(f) => {
                    assert!(f.error.contains(bad.0), "{}", f.error);
                    assert_eq!(f.headers.len(), 5, "every header kept");
                }
                Decoded::Event(_) => panic!("`{}` not UTF-8, yet decoded", bad.0),
            }
        }
    }
}
