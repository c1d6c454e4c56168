//! Failover runs against a broker cluster: the part every adapter's `cluster_failover` test
//! shares.
//!
//! A run emits events from concurrent emitters (each its share, one event after the other,
//! retrying a retryable error with the same event until `Ok`), while the test kills the node
//! that leads the events' stream or queue and restarts it; then it waits until every event
//! whose emit returned `Ok` has been consumed, and prints and checks one line:
//!
//! ```text
//! failover nats-cluster: emitted 20000, lost 0, duplicates 3 (bound 103), publishes retried 3, first Ok after the kill Some(1.2s), longest publish stall 1.3s, published in 9.1s
//! ```
//!
//! The test keeps what is specific to its broker: the connection, the consumer, finding the
//! leader, killing and restarting it.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use evbus::{SubscribeOptions, Topic, Transport};
//! use evbus_conformance::failover::{Emitter, Failover, Received};
//!
//! # async fn run(transport: impl Transport) {
//! let Some(url) = evbus_conformance::failover::cluster_url(
//!     "EVBUS_NATS_CLUSTER_URL",
//!     "nats",
//!     "nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233?replicas=3",
//! ) else {
//!     return; // not configured: a loud WARNING was printed
//! };
//! let topic: Arc<dyn Topic> = transport.topic("failover").await.unwrap();
//! let received = Received::consume(topic.subscribe(SubscribeOptions::named("f")).await.unwrap());
//! let run = Failover::new("nats-cluster").start(Emitter::Topic(topic), &received);
//! run.wait_for_a_quarter().await;
//! // ... find the leader's process ...
//! # let pid = 0;
//! let kill = run.kill(pid); // SIGKILL
//! // ... restart it ...
//! let outcome = run.finish(received).await; // prints the `failover ...` line
//! outcome.check();
//! # }
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evbus::{Event, Queue, Subscription, Topic};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// The cluster URL in `var`, or `None` after a loud WARNING on stderr that the test was not
/// run, naming `cargo xtask cluster start <broker>` and `example` (the URL of that cluster).
/// A test returns (and passes) on `None`: CI does not start the cluster.
pub fn cluster_url(var: &str, broker: &str, example: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    if url.is_none() {
        // Straight to stderr: libtest captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\nWARNING: cluster_failover was NOT run: {var} is not set. Start a cluster \
             (`cargo xtask cluster start {broker}`) and set {var}='{example}'.\n"
        );
    }
    url
}

/// `EVBUS_FAILOVER_EVENTS`, the number of events a run emits; 20,000 when unset or not a
/// number.
pub fn events_from_env() -> u64 {
    std::env::var("EVBUS_FAILOVER_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

/// The directory of the local cluster of `broker` (`nats`, `amqp`, `redis`), where `cargo
/// xtask cluster` keeps each node's data and pid file (`nodeN/`): `EVBUS_<BROKER>_CLUSTER_DIR`,
/// else `~/.cache/evbus/clusters/<broker>`.
pub fn cluster_dir(broker: &str) -> PathBuf {
    let var = format!("EVBUS_{}_CLUSTER_DIR", broker.to_ascii_uppercase());
    if let Some(dir) = std::env::var_os(var) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/evbus/clusters").join(broker)
}

/// The pid in `pid_file`; panics, naming the file, when it cannot be read or is not a pid.
pub fn read_pid(pid_file: &Path) -> u32 {
    std::fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
}

/// A name unique to this process and moment: `failover-<what>-<pid>-<nanos>`.
pub fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("failover-{what}-{}-{nanos}", std::process::id())
}

/// Where a run emits its events.
#[derive(Clone)]
pub enum Emitter {
    /// `Topic::publish`; the line says "publishes retried", "longest publish stall",
    /// "published in".
    Topic(Arc<dyn Topic>),
    /// `Queue::send`; the line says "sends retried", "longest send stall", "sent in".
    Queue(Arc<dyn Queue>),
}

impl Emitter {
    async fn emit(&self, event: &Event) -> evbus::Result<()> {
        match self {
            Emitter::Topic(topic) => topic.publish(event).await,
            Emitter::Queue(queue) => queue.send(event).await,
        }
    }
}

/// The words of the printed line: `publish` (publishes, published) or `send` (sends, sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// publish, publishes, published.
    Publish,
    /// send, sends, sent.
    Send,
}

impl Verb {
    /// (verb, plural noun, past participle).
    fn words(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Verb::Publish => ("publish", "publishes", "published"),
            Verb::Send => ("send", "sends", "sent"),
        }
    }
}

/// The deliveries of one consumer, counted per event id; every delivery is acked.
#[derive(Debug)]
pub struct Received {
    counts: Arc<Mutex<HashMap<String, u64>>>,
    consumer: JoinHandle<()>,
}

impl Received {
    /// Consumes `subscription` in a task of its own: acks every delivery (an ack lost in the
    /// failover means one more delivery, counted as a duplicate) and counts it under its
    /// event's id. A failed delivery panics the task (the run then reports lost events).
    pub fn consume(mut subscription: Subscription) -> Self {
        let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let consumer = {
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                while let Some(delivery) = subscription.next_delivery().await {
                    let delivery = match delivery {
                        Ok(d) => d,
                        Err(e) => panic!("the consumer failed: {e}"),
                    };
                    let id = delivery.event().id().to_owned();
                    let _ = delivery.ack().await;
                    *counts.lock().await.entry(id).or_default() += 1;
                }
            })
        };
        Received { counts, consumer }
    }
}

/// A failover run's settings; [`start`](Self::start) begins emitting.
#[derive(Clone, Debug)]
pub struct Failover {
    name: String,
    events: u64,
    emitters: u64,
    drain: Duration,
    verb: Option<Verb>,
    detail: Option<String>,
    progress: Option<Duration>,
}

impl Failover {
    /// A run named `name` in its line (`failover <name>: ...`): [`events_from_env`] events,
    /// 16 emitters, 120 s for consumption to catch up at the end.
    pub fn new(name: impl Into<String>) -> Self {
        Failover {
            name: name.into(),
            events: events_from_env(),
            emitters: 16,
            drain: Duration::from_secs(120),
            verb: None,
            detail: None,
            progress: None,
        }
    }

    /// How many events to emit in all.
    pub fn events(mut self, events: u64) -> Self {
        self.events = events;
        self
    }

    /// How many emitters run at once (at least 1).
    pub fn emitters(mut self, emitters: u64) -> Self {
        self.emitters = emitters.max(1);
        self
    }

    /// How long consumption may take to catch up after the last `Ok`.
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// The words of the line (default: from the [`Emitter`], publish for a topic, send for a
    /// queue).
    pub fn verb(mut self, verb: Verb) -> Self {
        self.verb = Some(verb);
        self
    }

    /// Appended to the line in parentheses (`... published in 9.1s (wait_replicas 1)`).
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Prints a progress line every `every` while the run lasts: the `Ok` emits so far, the
    /// ids received, and the latest retryable error.
    pub fn progress(mut self, every: Duration) -> Self {
        self.progress = Some(every);
        self
    }

    /// Spawns the emitters: each emits its share of the events (`failover.tick` with body
    /// `{"seq": n}`), every event until `Ok`, retrying a retryable error with the same event
    /// after 50 ms; a non-retryable error panics it. `received` (the consumer of the events)
    /// is counted by the progress lines, if asked for.
    pub fn start(self, emitter: Emitter, received: &Received) -> Run {
        let verb = self.verb.unwrap_or(match emitter {
            Emitter::Topic(_) => Verb::Publish,
            Emitter::Queue(_) => Verb::Send,
        });
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let step = usize::try_from(self.emitters).unwrap_or(usize::MAX);
        let tasks = (0..self.emitters)
            .map(|first| {
                let emitter = emitter.clone();
                let shared = Arc::clone(&shared);
                let seqs = (first..self.events).step_by(step);
                tokio::spawn(emit_share(emitter, seqs, shared, verb))
            })
            .collect();
        let progress = self.progress.map(|every| {
            let shared = Arc::clone(&shared);
            let counts = Arc::clone(&received.counts);
            let verbs = verb.words().1;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let got = counts.lock().await.len();
                    let error = shared
                        .last_seen
                        .lock()
                        .expect("not poisoned")
                        .take()
                        .unwrap_or_default();
                    eprintln!(
                        "  {:>5.1} s: {} Ok {verbs}, {got} ids received {error}",
                        started.elapsed().as_secs_f64(),
                        shared.done.load(Ordering::Relaxed)
                    );
                }
            })
        });
        Run {
            settings: self,
            verb,
            shared,
            started,
            tasks,
            progress,
        }
    }
}

/// What the emitters and the test share.
#[derive(Default)]
struct Shared {
    /// `Ok` emits so far.
    done: AtomicU64,
    /// When the test killed the node.
    killed_at: std::sync::Mutex<Option<Instant>>,
    /// The latest retryable error, for the progress line (taken by it).
    last_seen: std::sync::Mutex<Option<String>>,
}

/// What one emitter saw.
#[derive(Default)]
struct EmitStats {
    /// Ids whose emit returned `Ok`.
    ok: Vec<String>,
    /// Emit attempts that failed with a retryable error (then retried, same event).
    retried: u64,
    /// Longest time one event took from its first attempt to its `Ok`.
    longest_stall: Duration,
    /// First `Ok` of an emit attempted after the kill, measured from the kill.
    first_ok_after_kill: Option<Duration>,
    /// The last retryable error seen.
    last_error: Option<String>,
}

async fn emit_share(
    emitter: Emitter,
    seqs: std::iter::StepBy<std::ops::Range<u64>>,
    shared: Arc<Shared>,
    verb: Verb,
) -> EmitStats {
    let mut stats = EmitStats::default();
    for seq in seqs {
        let event = Event::builder("failover.tick", "/failover")
            .json(&serde_json::json!({ "seq": seq }))
            .expect("a JSON body")
            .build()
            .expect("a valid event");
        let first_try = Instant::now();
        loop {
            match emitter.emit(&event).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    stats.retried += 1;
                    stats.last_error = Some(e.to_string());
                    *shared.last_seen.lock().expect("not poisoned") =
                        Some(format!("(last error: {e})"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{} {seq} failed, not retryable: {e}", verb.words().0),
            }
        }
        let now = Instant::now();
        stats.longest_stall = stats.longest_stall.max(now - first_try);
        let killed_at = *shared.killed_at.lock().expect("not poisoned");
        if let Some(kill) = killed_at
            && first_try > kill
            && stats.first_ok_after_kill.is_none()
        {
            stats.first_ok_after_kill = Some(now - kill);
        }
        stats.ok.push(event.id().to_owned());
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// A run in progress: the emitters are running.
pub struct Run {
    settings: Failover,
    verb: Verb,
    shared: Arc<Shared>,
    started: Instant,
    tasks: Vec<JoinHandle<EmitStats>>,
    progress: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("name", &self.settings.name)
            .field("done", &self.done())
            .finish_non_exhaustive()
    }
}

impl Run {
    /// How many emits returned `Ok` so far.
    pub fn done(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// Returns once `count` emits returned `Ok`.
    pub async fn wait_for(&self, count: u64) {
        while self.done() < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns once a quarter of the events were emitted: the moment to kill the leader.
    pub async fn wait_for_a_quarter(&self) {
        self.wait_for(self.settings.events / 4).await;
    }

    /// SIGKILLs process `pid` (`kill -KILL <pid>`; panics if that fails), then records the
    /// kill as [`killed`](Self::killed) does; returns its instant.
    pub fn kill(&self, pid: u32) -> Instant {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -KILL {pid}");
        self.killed()
    }

    /// Records the kill (now), from which "first Ok after the kill" is measured; returns
    /// the instant.
    pub fn killed(&self) -> Instant {
        let kill = Instant::now();
        *self.shared.killed_at.lock().expect("not poisoned") = Some(kill);
        kill
    }

    /// Waits for every emitter, then until every `Ok`-returned id was received (or the
    /// drain time is over); stops the consumer and prints the line (see the module
    /// documentation) to stderr.
    pub async fn finish(mut self, received: Received) -> Outcome {
        let mut ok = Vec::new();
        let mut retried = 0;
        let mut longest_stall = Duration::ZERO;
        let mut first_ok_after_kill: Option<Duration> = None;
        let mut last_error = None;
        for task in std::mem::take(&mut self.tasks) {
            let stats = task.await.expect("an emitter panicked");
            ok.extend(stats.ok);
            retried += stats.retried;
            longest_stall = longest_stall.max(stats.longest_stall);
            last_error = last_error.or(stats.last_error);
            first_ok_after_kill = match (first_ok_after_kill, stats.first_ok_after_kill) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let emitted_in = self.started.elapsed();

        // Every Ok-returned event must arrive.
        let drain = self.settings.drain;
        let deadline = Instant::now() + drain;
        let missing = loop {
            let counts = received.counts.lock().await;
            let missing: Vec<&String> = ok.iter().filter(|id| !counts.contains_key(*id)).collect();
            if missing.is_empty() || Instant::now() > deadline {
                break missing.into_iter().cloned().collect::<Vec<_>>();
            }
            drop(counts);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let duplicates: u64 = received.counts.lock().await.values().map(|n| n - 1).sum();
        // The contract's bound (docs/reliability.md): one consumer whose unsettled deliveries
        // (at most its in-flight limit) may all come again after one node kill, plus every
        // emit retried after an error (the first attempt may have been stored).
        let bound = evbus::ConsumerOptions::default().max_in_flight as u64 + retried;
        received.consumer.abort();
        if let Some(progress) = self.progress.take() {
            progress.abort();
        }
        let outcome = Outcome {
            name: self.settings.name.clone(),
            events: self.settings.events,
            drain,
            emitted: ok.len() as u64,
            missing,
            duplicates,
            bound,
            retried,
            first_ok_after_kill,
            longest_stall,
            emitted_in,
            last_error,
        };
        eprintln!(
            "{}",
            outcome.line(self.verb, self.settings.detail.as_deref())
        );
        outcome
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(progress) = &self.progress {
            progress.abort();
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The run's name.
    pub name: String,
    /// Events the run was to emit.
    pub events: u64,
    /// How long consumption could catch up.
    pub drain: Duration,
    /// Emits that returned `Ok`.
    pub emitted: u64,
    /// Ids of `Ok`-returned events never received within the drain time.
    pub missing: Vec<String>,
    /// Deliveries beyond the first of each id.
    pub duplicates: u64,
    /// The duplicates the contract allows: the consumer's in-flight limit plus the retries.
    pub bound: u64,
    /// Emit attempts retried after a retryable error.
    pub retried: u64,
    /// First `Ok` of an emit attempted after the kill, measured from the kill.
    pub first_ok_after_kill: Option<Duration>,
    /// Longest time one event took from its first attempt to its `Ok`.
    pub longest_stall: Duration,
    /// How long the emitters took.
    pub emitted_in: Duration,
    /// A retryable error seen (the last of the first emitter that saw one).
    pub last_error: Option<String>,
}

impl Outcome {
    /// `failover <name>: emitted N, lost L, duplicates D (bound B), <verbs> retried R, first
    /// Ok after the kill .., longest <verb> stall .., <verbed> in ..[ (<detail>)]`.
    fn line(&self, verb: Verb, detail: Option<&str>) -> String {
        let (verb, verbs, verbed) = verb.words();
        format!(
            "failover {}: emitted {}, lost {}, duplicates {} (bound {}), {verbs} retried {}, \
             first Ok after the kill {:?}, longest {verb} stall {:?}, {verbed} in {:?}{}",
            self.name,
            self.emitted,
            self.missing.len(),
            self.duplicates,
            self.bound,
            self.retried,
            self.first_ok_after_kill,
            self.longest_stall,
            self.emitted_in,
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        )
    }

    /// Asserts that every event was emitted and that the duplicates stay within the bound.
    pub fn check_bound(&self) {
        assert_eq!(self.emitted, self.events);
        assert!(
            self.duplicates <= self.bound,
            "duplicates {} over the bound {}",
            self.duplicates,
            self.bound
        );
    }

    /// Asserts that every `Ok`-returned event arrived.
    pub fn check_none_lost(&self) {
        assert!(
            self.missing.is_empty(),
            "{} Ok-returned events never arrived within {:?}, e.g. {:?}",
            self.missing.len(),
            self.drain,
            &self.missing[..self.missing.len().min(5)]
        );
    }

    /// [`check_bound`](Self::check_bound), then [`check_none_lost`](Self::check_none_lost).
    pub fn check(&self) {
        self.check_bound();
        self.check_none_lost();
    }
}
