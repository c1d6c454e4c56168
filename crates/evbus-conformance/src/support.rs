//! What cases are written with: the per-case context (connections, unique names, cleanup
//! bookkeeping), sample events, and bounded waits on subscriptions.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use evbus::{
    Capabilities, ConsumerOptions, Delivery, Event, Queue, SubscribeOptions, Subscription, Topic,
    Transport, dead_letter_queue_name,
};
use futures::future::BoxFuture;

use crate::BrokerControl;

/// Bound for an expected delivery (or a batch of them) to arrive.
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// Visibility timeout of cases that show redelivery: short, so they are fast.
pub(crate) const SHORT_VISIBILITY: Duration = Duration::from_secs(1);
/// Visibility timeout of cases that must not see redeliveries (a consumer settles well within).
pub(crate) const LONG_VISIBILITY: Duration = Duration::from_secs(30);
/// Window in which nothing more may arrive, waited only after a marker event proved the
/// pipeline is flowing.
pub(crate) const QUIET: Duration = Duration::from_millis(200);
/// Bound for opening a connection.
pub(crate) const CONNECT_WITHIN: Duration = Duration::from_secs(30);
/// Bound for one broker operation (publish, send, settle, delete, close).
pub(crate) const OPERATION_WITHIN: Duration = Duration::from_secs(30);

/// Opens a new connection to the broker under test.
pub(crate) type ConnectFn<T> = dyn Fn() -> BoxFuture<'static, evbus::Result<T>> + Send + Sync;
/// The harness's broker control, if any.
pub(crate) type Control<T> = Arc<dyn BrokerControl<Transport = T>>;

/// Why a case failed.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

/// What a case returns.
pub(crate) type CaseResult = Result<(), Failure>;

/// Returns a [`Failure`] from the enclosing case when the condition does not hold.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::support::Failure(format!($($arg)+)));
        }
    };
}
pub(crate) use ensure;

/// Returns a [`Failure`] from the enclosing case.
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::support::Failure(format!($($arg)+)))
    };
}
pub(crate) use fail;

/// Turns an evbus error into a [`Failure`] that says what the case was doing.
pub(crate) trait Context<V> {
    fn context(self, what: impl fmt::Display) -> Result<V, Failure>;
}

impl<V> Context<V> for evbus::Result<V> {
    fn context(self, what: impl fmt::Display) -> Result<V, Failure> {
        self.map_err(|e| Failure(format!("{what}: {e}")))
    }
}

/// Awaits a broker operation for at most [`OPERATION_WITHIN`].
pub(crate) async fn bounded<V>(
    what: impl fmt::Display,
    op: impl Future<Output = evbus::Result<V>>,
) -> Result<V, Failure> {
    match tokio::time::timeout(OPERATION_WITHIN, op).await {
        Ok(result) => result.context(what),
        Err(_) => Err(Failure(format!(
            "{what}: did not return within {OPERATION_WITHIN:?}"
        ))),
    }
}

/// Something a case created, deleted after the case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Topic(String),
    Queue(String),
}

/// Bookkeeping shared between a running case and the runner that cleans up after it.
pub(crate) struct Shared<T> {
    resources: Mutex<Vec<Resource>>,
    connections: Mutex<Vec<Arc<T>>>,
    used_control: AtomicBool,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared {
            resources: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
            used_control: AtomicBool::new(false),
        }
    }
}

fn lock<V>(m: &Mutex<V>) -> MutexGuard<'_, V> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Shared<T> {
    fn register(&self, resource: Resource) {
        let mut resources = lock(&self.resources);
        if !resources.contains(&resource) {
            resources.push(resource);
        }
    }

    /// Takes what the case created, in creation order.
    pub(crate) fn take_resources(&self) -> Vec<Resource> {
        std::mem::take(&mut *lock(&self.resources))
    }

    /// Takes the connections the case opened.
    pub(crate) fn take_connections(&self) -> Vec<Arc<T>> {
        std::mem::take(&mut *lock(&self.connections))
    }

    /// Whether the case used the controlled broker.
    pub(crate) fn used_control(&self) -> bool {
        self.used_control.load(Ordering::Acquire)
    }
}

/// A connection opened by a case. Derefs to the transport, so calls go straight to `T`.
pub(crate) struct Conn<T>(Arc<T>);

impl<T> Clone for Conn<T> {
    fn clone(&self) -> Self {
        Conn(Arc::clone(&self.0))
    }
}

impl<T: Transport + 'static> Conn<T> {
    /// The connection as a shared trait object (what a [`Bus`](evbus::bus::Bus) runs on).
    pub(crate) fn shared(&self) -> Arc<dyn Transport> {
        Arc::clone(&self.0) as Arc<dyn Transport>
    }
}

impl<T> Deref for Conn<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Everything a case gets from the harness.
pub(crate) struct Ctx<T: Transport + 'static> {
    pub(crate) case: &'static str,
    /// Unique prefix of topic and queue names for this case in this run.
    scope: String,
    /// Short unique prefix of subscription names for this case in this run.
    sub_scope: String,
    connect: Arc<ConnectFn<T>>,
    control: Option<Control<T>>,
    raw_producer: Option<Arc<dyn crate::RawProducer>>,
    /// The capabilities the transport declared.
    pub(crate) caps: Capabilities,
    shared: Arc<Shared<T>>,
}

impl<T: Transport + 'static> Ctx<T> {
    pub(crate) fn new(
        case: &'static str,
        names: &Names,
        connect: Arc<ConnectFn<T>>,
        control: Option<Control<T>>,
        raw_producer: Option<Arc<dyn crate::RawProducer>>,
        caps: Capabilities,
        shared: Arc<Shared<T>>,
    ) -> Self {
        Ctx {
            case,
            scope: names.scope(case),
            sub_scope: names.sub_scope(case),
            connect,
            control,
            raw_producer,
            caps,
            shared,
        }
    }

    /// Opens a new connection to the broker under test; the runner closes it after the case.
    pub(crate) async fn connect(&self) -> Result<Conn<T>, Failure> {
        let transport = match tokio::time::timeout(CONNECT_WITHIN, (self.connect)()).await {
            Ok(result) => result.context("connecting to the broker")?,
            Err(_) => fail!("connecting to the broker: no answer within {CONNECT_WITHIN:?}"),
        };
        Ok(self.keep(transport))
    }

    /// The harness's broker control (the case declared [`Need::BrokerControl`](crate::Need)).
    pub(crate) fn control(&self) -> Result<Control<T>, Failure> {
        self.shared.used_control.store(true, Ordering::Release);
        self.control
            .clone()
            .ok_or_else(|| Failure("the case needs broker control, and none was given".into()))
    }

    /// The harness's foreign producer (the case declared [`Need::RawProducer`](crate::Need)).
    pub(crate) fn raw_producer(&self) -> Result<Arc<dyn crate::RawProducer>, Failure> {
        self.raw_producer
            .clone()
            .ok_or_else(|| Failure("the case needs a raw producer, and none was given".into()))
    }

    /// Opens a new connection to the controlled broker.
    pub(crate) async fn connect_controlled(&self) -> Result<Conn<T>, Failure> {
        let control = self.control()?;
        let transport = match tokio::time::timeout(CONNECT_WITHIN, control.connect()).await {
            Ok(result) => result.context("connecting to the controlled broker")?,
            Err(_) => {
                fail!("connecting to the controlled broker: no answer within {CONNECT_WITHIN:?}")
            }
        };
        Ok(self.keep(transport))
    }

    fn keep(&self, transport: T) -> Conn<T> {
        let transport = Arc::new(transport);
        lock(&self.shared.connections).push(Arc::clone(&transport));
        Conn(transport)
    }

    /// A topic name unique to this case and run, deleted after the case (with the
    /// dead-letter queue of its anonymous subscriptions).
    pub(crate) fn topic_name(&self, label: &str) -> String {
        debug_assert!(label.len() <= MAX_LABEL, "label `{label}` is too long");
        let name = format!("{}-{label}", self.scope);
        self.shared.register(Resource::Topic(name.clone()));
        // Where its anonymous subscriptions dead-letter.
        if let Ok(anonymous) = evbus::raw::Source::topic(&name, &SubscribeOptions::anonymous()) {
            let dlq = anonymous.dead_letter_queue().to_owned();
            self.shared.register(Resource::Queue(dlq));
        }
        name
    }

    /// A queue name unique to this case and run, deleted after the case with its
    /// dead-letter queue.
    pub(crate) fn queue_name(&self, label: &str) -> String {
        debug_assert!(label.len() <= MAX_LABEL, "label `{label}` is too long");
        let name = format!("{}-{label}", self.scope);
        self.shared.register(Resource::Queue(name.clone()));
        let dlq = dead_letter_queue_name(&name, None, &ConsumerOptions::default());
        self.shared.register(Resource::Queue(dlq));
        name
    }

    /// A subscription name unique to this case and run; its dead-letter queue on `topic` is
    /// deleted after the case.
    pub(crate) fn subscription_name(&self, topic: &str, label: &str) -> String {
        debug_assert!(label.len() <= MAX_LABEL, "label `{label}` is too long");
        let name = format!("{}-{label}", self.sub_scope);
        let dlq = dead_letter_queue_name(topic, Some(&name), &ConsumerOptions::default());
        self.shared.register(Resource::Queue(dlq));
        name
    }

    /// Registers one more queue the case creates (under a name it derived from the case's
    /// topic), to be deleted after the case.
    pub(crate) fn extra_queue(&self, name: String) {
        self.shared.register(Resource::Queue(name));
    }

    /// Consumer settings of cases that must not see redeliveries.
    pub(crate) fn consumer(&self) -> ConsumerOptions {
        ConsumerOptions::default().visibility_timeout(LONG_VISIBILITY)
    }

    /// Consumer settings of cases that show redelivery.
    pub(crate) fn short_consumer(&self) -> ConsumerOptions {
        ConsumerOptions::default().visibility_timeout(SHORT_VISIBILITY)
    }

    /// A named subscription with [`consumer`](Self::consumer) settings.
    pub(crate) fn named(&self, subscription: &str) -> SubscribeOptions {
        SubscribeOptions::named(subscription).consumer(self.consumer())
    }

    /// A sample event carrying `seq` (as the `seq` extension and as JSON data).
    pub(crate) fn event(&self, seq: u64) -> Event {
        self.event_builder(seq)
            .build()
            .expect("a sample event is valid")
    }

    /// A sample event with a partition key.
    pub(crate) fn keyed_event(&self, key: &str, seq: u64) -> Event {
        self.event_builder(seq)
            .partition_key(key)
            .build()
            .expect("a sample event is valid")
    }

    /// `n` sample events, `seq` 0 to n-1.
    pub(crate) fn events(&self, n: u64) -> Vec<Event> {
        (0..n).map(|i| self.event(i)).collect()
    }

    /// An event to send after the ones under test, to prove the pipeline flows.
    pub(crate) fn sentinel(&self) -> Event {
        Event::builder("evbus.conformance.sentinel", self.source())
            .build()
            .expect("a sentinel event is valid")
    }

    pub(crate) fn source(&self) -> String {
        format!("/evbus-conformance/{}", self.case)
    }

    fn event_builder(&self, seq: u64) -> evbus::EventBuilder {
        Event::builder("evbus.conformance.sample", self.source())
            .extension(SEQ, seq.to_string())
            .json(&seq)
            .expect("a number is JSON")
    }
}

/// Extension carrying a sample event's sequence number.
pub(crate) const SEQ: &str = "seq";

/// The sequence number of a sample event.
pub(crate) fn seq(event: &Event) -> Result<u64, Failure> {
    event
        .extension(SEQ)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Failure(format!(
                "event {} has no numeric `{SEQ}` extension: {event:?}",
                event.id()
            ))
        })
}

/// The ids of `events`.
pub(crate) fn ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> HashSet<String> {
    events.into_iter().map(|e| e.id().to_owned()).collect()
}

/// Unique, valid names for one run of the suite.
///
/// Topic and queue names are `<adapter>-<run>-<case>-<hash>-<label>`, at most 64
/// characters; subscription names `<run>-<hash>-<label>`, at most 28; so even a dead-letter
/// queue `<topic>.<subscription>.dlq` stays within 100 characters. Only ASCII letters, digits,
/// `-` and `.` are used.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    adapter: String,
    run: String,
}

/// Longest label a case gives a name.
pub(crate) const MAX_LABEL: usize = 10;

impl Names {
    pub(crate) fn new(adapter: &str, run: &str) -> Self {
        let mut adapter: String = adapter
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .take(16)
            .collect();
        if adapter.is_empty() {
            adapter.push_str("evbus");
        }
        Names {
            adapter,
            run: run
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(8)
                .collect(),
        }
    }

    pub(crate) fn scope(&self, case: &str) -> String {
        let short: String = case
            .chars()
            .take(20)
            .map(|c| if c == '_' { '-' } else { c })
            .collect();
        format!("{}-{}-{short}-{}", self.adapter, self.run, hash6(case))
    }

    pub(crate) fn sub_scope(&self, case: &str) -> String {
        format!("{}-{}", self.run, hash6(case))
    }
}

/// 6 hex digits of FNV-1a: tells apart cases whose names share a prefix.
fn hash6(text: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0x00ff_ffff)
}

/// A run id from the clock and a random seed: 8 lowercase base-36 digits.
pub(crate) fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(nanos);
    let mut n = hasher.finish() ^ nanos.rotate_left(17);
    let mut id = String::with_capacity(8);
    for _ in 0..8 {
        let d = (n % 36) as u32;
        id.push(char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
    }
    id
}

// ---------------------------------------------------------------------------------------------
// Waiting on subscriptions. Every wait is bounded.

/// The next delivery within `within`.
pub(crate) async fn next(
    sub: &mut Subscription,
    within: Duration,
    what: &str,
) -> Result<Delivery, Failure> {
    match tokio::time::timeout(within, sub.next_delivery()).await {
        Err(_) => fail!("{what}: nothing was delivered within {within:?}"),
        Ok(None) => fail!("{what}: the subscription ended unexpectedly"),
        Ok(Some(Err(e))) => fail!("{what}: the subscription yielded an error: {e}"),
        Ok(Some(Ok(d))) => Ok(d),
    }
}

/// Acks a delivery, bounded.
pub(crate) async fn ack(delivery: &Delivery, what: &str) -> CaseResult {
    bounded(
        format!("{what}: acking event {}", delivery.event().id()),
        delivery.ack(),
    )
    .await
}

/// Receives until every event of `expected` was delivered, acking each. Fails on an
/// unexpected or a second delivery, or when `within` passes first (naming what is missing).
/// Returns `(event, attempt)` in delivery order.
///
/// Call it only with events whose publish or send returned `Ok` (cases publish with `?`
/// first): the failure says so, so that a lost publish is told apart from a stalled consumer.
pub(crate) async fn receive_exactly(
    sub: &mut Subscription,
    expected: &HashSet<String>,
    within: Duration,
    what: &str,
) -> Result<Vec<(Event, u32)>, Failure> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = HashSet::new();
    let mut got = Vec::with_capacity(expected.len());
    while seen.len() < expected.len() {
        let delivery = match tokio::time::timeout_at(deadline, sub.next_delivery()).await {
            Err(_) => fail!("{what}: {}", never_arrived(expected, &seen, within)),
            Ok(None) => fail!(
                "{what}: the subscription ended after {} of {} events (every publish of them \
                 had returned Ok)",
                seen.len(),
                expected.len()
            ),
            Ok(Some(Err(e))) => fail!("{what}: the subscription yielded an error: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let id = delivery.event().id().to_owned();
        ensure!(
            expected.contains(&id),
            "{what}: received event {id} (type {}, attempt {}) that was not expected here",
            delivery.event().ty(),
            delivery.attempt()
        );
        ensure!(
            seen.insert(id.clone()),
            "{what}: event {id} was delivered a second time (attempt {}) although it was acked",
            delivery.attempt()
        );
        ack(&delivery, what).await?;
        let attempt = delivery.attempt();
        got.push((delivery.event().clone(), attempt));
    }
    Ok(got)
}

/// `published 10 events, all returned Ok; 3 never arrived within 15s: <ids> (7 did)`: what a
/// wait for events whose publishes all returned `Ok` says when it runs out.
pub(crate) fn never_arrived(
    expected: &HashSet<String>,
    seen: &HashSet<String>,
    within: Duration,
) -> String {
    let missing: Vec<&String> = expected.difference(seen).collect();
    let (lost, arrived) = (missing.len(), expected.len() - missing.len());
    let all = if expected.len() == 1 {
        "it returned Ok"
    } else {
        "all returned Ok"
    };
    let plural = if expected.len() == 1 { "" } else { "s" };
    format!(
        "published {} event{plural}, {all}; {lost} never arrived within {within:?}: {} \
         ({arrived} did)",
        expected.len(),
        sample(missing),
    )
}

/// Fails if anything is delivered within `window`. Only call after a marker event showed
/// the pipeline is flowing: a quiet window on a stalled pipeline proves nothing.
pub(crate) async fn expect_quiet(
    sub: &mut Subscription,
    window: Duration,
    what: &str,
) -> CaseResult {
    match tokio::time::timeout(window, sub.next_delivery()).await {
        Err(_) => Ok(()),
        Ok(None) => fail!("{what}: the subscription ended unexpectedly"),
        Ok(Some(Err(e))) => fail!("{what}: the subscription yielded an error: {e}"),
        Ok(Some(Ok(d))) => fail!(
            "{what}: event {} (type {}, attempt {}) was delivered when nothing more was expected",
            d.event().id(),
            d.event().ty(),
            d.attempt()
        ),
    }
}

/// Expects `sentinel` to be the very next delivery (acking it), then nothing more for
/// `quiet`: whatever should not arrive would have arrived before the sentinel or within the
/// window.
pub(crate) async fn expect_sentinel(
    sub: &mut Subscription,
    sentinel: &Event,
    quiet: Duration,
    what: &str,
) -> CaseResult {
    let d = next(sub, WAIT, &format!("{what} (waiting for the sentinel)")).await?;
    ensure!(
        d.event().id() == sentinel.id(),
        "{what}: event {} (type {}, attempt {}) was delivered before the sentinel, when nothing \
         more was expected",
        d.event().id(),
        d.event().ty(),
        d.attempt()
    );
    ack(&d, what).await?;
    expect_quiet(sub, quiet, what).await
}

/// Publishes a sentinel on `topic` and expects it next on `sub`, then a quiet `quiet`.
pub(crate) async fn topic_sentinel<T: Transport + 'static>(
    ctx: &Ctx<T>,
    topic: &dyn Topic,
    sub: &mut Subscription,
    quiet: Duration,
    what: &str,
) -> CaseResult {
    let sentinel = ctx.sentinel();
    bounded("publishing the sentinel", topic.publish(&sentinel)).await?;
    expect_sentinel(sub, &sentinel, quiet, what).await
}

/// Sends a sentinel to `queue` and expects it next on `sub`, then a quiet `quiet`.
pub(crate) async fn queue_sentinel<T: Transport + 'static>(
    ctx: &Ctx<T>,
    queue: &dyn Queue,
    sub: &mut Subscription,
    quiet: Duration,
    what: &str,
) -> CaseResult {
    let sentinel = ctx.sentinel();
    bounded("sending the sentinel", queue.send(&sentinel)).await?;
    expect_sentinel(sub, &sentinel, quiet, what).await
}

/// Up to 5 items, for messages.
pub(crate) fn sample<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let mut items: Vec<&String> = items.into_iter().collect();
    items.sort();
    let more = items.len().saturating_sub(5);
    let mut text = items
        .iter()
        .take(5)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// Sorted positions as ranges: `3-5, 9` (`none` when empty).
pub(crate) fn ranges(positions: &[usize]) -> String {
    let mut sorted = positions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Checks that `got` equals `sent` attribute by attribute, naming the first differences.
pub(crate) fn same_event(sent: &Event, got: &Event) -> CaseResult {
    if sent == got {
        return Ok(());
    }
    let mut diffs = Vec::new();
    let mut cmp = |name: &str, a: Option<String>, b: Option<String>| {
        if a != b {
            diffs.push(format!("{name}: sent {a:?}, received {b:?}"));
        }
    };
    cmp("id", Some(sent.id().into()), Some(got.id().into()));
    cmp(
        "source",
        Some(sent.source().into()),
        Some(got.source().into()),
    );
    cmp("type", Some(sent.ty().into()), Some(got.ty().into()));
    cmp(
        "specversion",
        Some(sent.specversion().into()),
        Some(got.specversion().into()),
    );
    cmp(
        "time",
        sent.time().map(evbus::envelope::format_time),
        got.time().map(evbus::envelope::format_time),
    );
    cmp(
        "datacontenttype",
        sent.datacontenttype().map(Into::into),
        got.datacontenttype().map(Into::into),
    );
    cmp(
        "dataschema",
        sent.dataschema().map(Into::into),
        got.dataschema().map(Into::into),
    );
    cmp(
        "subject",
        sent.subject().map(Into::into),
        got.subject().map(Into::into),
    );
    let names: std::collections::BTreeSet<&String> = sent
        .extensions()
        .keys()
        .chain(got.extensions().keys())
        .collect();
    for name in names {
        cmp(
            &format!("extension `{name}`"),
            sent.extension(name).map(Into::into),
            got.extension(name).map(Into::into),
        );
    }
    match (sent.data(), got.data()) {
        (None, None) => {}
        (Some(_), None) => diffs.push("data: sent some, received none".into()),
        (None, Some(b)) => diffs.push(format!("data: sent none, received {} bytes", b.len())),
        (Some(a), Some(b)) if a != b => {
            let at = a.iter().zip(b.iter()).position(|(x, y)| x != y);
            diffs.push(match at {
                Some(i) => format!(
                    "data: sent {} bytes, received {}; first difference at byte {i} \
                     (sent {:#04x}, received {:#04x})",
                    a.len(),
                    b.len(),
                    a[i],
                    b[i]
                ),
                None => format!(
                    "data: sent {} bytes, received {} (a prefix)",
                    a.len(),
                    b.len()
                ),
            });
        }
        _ => {}
    }
    if diffs.is_empty() {
        diffs.push(format!("sent {sent:?}, received {got:?}"));
    }
    fail!(
        "event {} did not round-trip: {}",
        sent.id(),
        diffs.join("; ")
    )
}

/// Index of received events by id.
pub(crate) fn by_id(events: &[(Event, u32)]) -> HashMap<&str, &Event> {
    events.iter().map(|(e, _)| (e.id(), e)).collect()
}

/// Aborts a spawned task when dropped, so a failing case does not leave it running.
pub(crate) struct AbortOnDrop<V>(pub(crate) tokio::task::JoinHandle<V>);

impl<V> Drop for AbortOnDrop<V> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<V> AbortOnDrop<V> {
    /// Waits for the task, bounded; a panic or an abort becomes a failure.
    pub(crate) async fn join(mut self, within: Duration, what: &str) -> Result<V, Failure> {
        match tokio::time::timeout(within, &mut self.0).await {
            Err(_) => fail!("{what}: did not finish within {within:?}"),
            Ok(Err(e)) if e.is_panic() => {
                fail!(
                    "{what}: panicked: {}",
                    crate::runner::panic_message(e.into_panic())
                )
            }
            Ok(Err(e)) => fail!("{what}: {e}"),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

/// Spawns a task that is aborted if the case ends first.
pub(crate) fn spawn<F>(future: F) -> AbortOnDrop<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    AbortOnDrop(tokio::spawn(future))
}

/// One message from a competing consumer task to the case.
type Handled = Result<(usize, String, u32), Failure>;

/// Runs `subs` as competing consumers until every event of `expected` was acked, and returns
/// how many each handled. Fails when an event is handled twice, an unexpected one arrives,
/// some are missing, or one consumer gets nothing.
///
/// Give each consumer `max_in_flight(1)`: every consumer holds its first delivery unsettled
/// until all consumers have one, so the others must take the rest and every consumer takes
/// part, deterministically. After the last expected event a short quiet window catches late
/// duplicates.
pub(crate) async fn compete(
    subs: Vec<Subscription>,
    expected: &HashSet<String>,
    what: &str,
) -> Result<Vec<usize>, Failure> {
    let n = subs.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handled>();
    let (started, _) = tokio::sync::watch::channel(0usize);
    let started = Arc::new(started);
    let mut tasks = Vec::with_capacity(n);
    for (i, mut sub) in subs.into_iter().enumerate() {
        let tx = tx.clone();
        let started = Arc::clone(&started);
        let what = format!("{what}, consumer {i}");
        tasks.push(spawn(async move {
            let result: CaseResult = async {
                let first = next(&mut sub, WAIT, &what).await?;
                let _ = tx.send(Ok((i, first.event().id().to_owned(), first.attempt())));
                let mut all = started.subscribe();
                started.send_modify(|c| *c += 1);
                if tokio::time::timeout(WAIT, all.wait_for(|c| *c >= n))
                    .await
                    .is_err()
                {
                    fail!(
                        "{what} held its first delivery for {WAIT:?} while another consumer of \
                         the same subscription received nothing: the events were not shared"
                    );
                }
                ack(&first, &what).await?;
                loop {
                    match sub.next_delivery().await {
                        None => fail!("{what}: the subscription ended unexpectedly"),
                        Some(Err(e)) => fail!("{what}: the subscription yielded an error: {e}"),
                        Some(Ok(d)) => {
                            let _ = tx.send(Ok((i, d.event().id().to_owned(), d.attempt())));
                            ack(&d, &what).await?;
                        }
                    }
                }
            }
            .await;
            if let Err(f) = result {
                let _ = tx.send(Err(f));
            }
        }));
    }
    drop(tx);
    let within = WAIT * 2;
    let deadline = tokio::time::Instant::now() + within;
    let mut handled_by: HashMap<String, usize> = HashMap::new();
    let mut counts = vec![0; n];
    while handled_by.len() < expected.len() {
        let (i, id, attempt) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                let seen: HashSet<String> = handled_by.keys().cloned().collect();
                fail!("{what}: {}", never_arrived(expected, &seen, within))
            }
            Ok(None) => fail!("{what}: every consumer stopped"),
            Ok(Some(Err(f))) => return Err(f),
            Ok(Some(Ok(handled))) => handled,
        };
        ensure!(
            expected.contains(&id),
            "{what}: consumer {i} received event {id} that was not expected here"
        );
        if let Some(first) = handled_by.insert(id.clone(), i) {
            fail!(
                "{what}: event {id} was handled twice: by consumer {first}, then by consumer \
                 {i} (attempt {attempt})"
            );
        }
        counts[i] += 1;
    }
    match tokio::time::timeout(QUIET, rx.recv()).await {
        Err(_) | Ok(None) => {}
        Ok(Some(Err(f))) => return Err(f),
        Ok(Some(Ok((i, id, attempt)))) => fail!(
            "{what}: event {id} was delivered again (to consumer {i}, attempt {attempt}) after \
             every event was acked"
        ),
    }
    drop(tasks);
    Ok(counts)
}

/// Consumes `sub`, nacking `poison` on every delivery and acking the events of `others`,
/// until the poison was dead-lettered (on its `max_attempts`-th delivery) and every other
/// event was handled. Checks the attempt numbers and what each nack returned.
pub(crate) async fn nack_until_dead_lettered(
    sub: &mut Subscription,
    poison: &Event,
    others: &HashSet<String>,
    max_attempts: u32,
    what: &str,
) -> CaseResult {
    let within = WAIT * 2;
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    let mut dead = false;
    while !dead || seen.len() < others.len() {
        let d = match tokio::time::timeout_at(deadline, sub.next_delivery()).await {
            Err(_) => fail!(
                "{what}: within {within:?} the poison event was delivered {deliveries} times \
                 (dead-lettered: {dead}) and {} of {} other events arrived",
                seen.len(),
                others.len()
            ),
            Ok(None) => fail!("{what}: the subscription ended unexpectedly"),
            Ok(Some(Err(e))) => fail!("{what}: the subscription yielded an error: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let id = d.event().id().to_owned();
        if id == poison.id() {
            ensure!(
                !dead,
                "{what}: the poison event was delivered again (attempt {}) after it was \
                 dead-lettered",
                d.attempt()
            );
            deliveries += 1;
            ensure!(
                d.attempt() == deliveries,
                "{what}: delivery {deliveries} of the poison event carried attempt {}",
                d.attempt()
            );
            ensure!(
                d.max_attempts() == max_attempts,
                "{what}: the delivery says max_attempts {}, the consumer asked for {max_attempts}",
                d.max_attempts()
            );
            let settlement =
                bounded(format!("{what}: nacking the poison event"), d.nack(None)).await?;
            let expected = if deliveries < max_attempts {
                evbus::Settlement::Nacked
            } else {
                evbus::Settlement::DeadLettered
            };
            ensure!(
                settlement == expected,
                "{what}: nack of attempt {deliveries} of {max_attempts} returned {settlement:?}, \
                 expected {expected:?}"
            );
            dead = settlement == evbus::Settlement::DeadLettered;
        } else {
            ensure!(
                others.contains(&id),
                "{what}: received event {id} that was not expected here"
            );
            ensure!(
                seen.insert(id.clone()),
                "{what}: event {id} was delivered a second time (attempt {}) although it was acked",
                d.attempt()
            );
            ack(&d, what).await?;
        }
    }
    Ok(())
}

/// Checks a dead-lettered copy: the original event plus the dead-letter extensions.
pub(crate) fn check_dead_lettered(
    got: &Event,
    original: &Event,
    reason: Option<&str>,
    attempts: u32,
    origin: &str,
) -> CaseResult {
    use evbus::delivery::{
        DEAD_LETTER_ATTEMPTS, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON, DEAD_LETTER_TIME,
    };
    match (got.extension(DEAD_LETTER_REASON), reason) {
        (None, _) => fail!("the dead-lettered event has no `{DEAD_LETTER_REASON}` extension"),
        (Some(""), _) => fail!("the dead-lettered event has an empty `{DEAD_LETTER_REASON}`"),
        (Some(got), Some(expected)) if got != expected => fail!(
            "the dead-lettered event's `{DEAD_LETTER_REASON}` is {got:?}, expected {expected:?}"
        ),
        _ => {}
    }
    let expected_attempts = attempts.to_string();
    ensure!(
        got.extension(DEAD_LETTER_ATTEMPTS) == Some(expected_attempts.as_str()),
        "the dead-lettered event's `{DEAD_LETTER_ATTEMPTS}` is {:?}, expected {expected_attempts:?}",
        got.extension(DEAD_LETTER_ATTEMPTS)
    );
    ensure!(
        got.extension(DEAD_LETTER_ORIGIN) == Some(origin),
        "the dead-lettered event's `{DEAD_LETTER_ORIGIN}` is {:?}, expected {origin:?}",
        got.extension(DEAD_LETTER_ORIGIN)
    );
    let when = got.extension(DEAD_LETTER_TIME);
    ensure!(
        when.is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "the dead-lettered event's `{DEAD_LETTER_TIME}` is {when:?}, expected an RFC 3339 time"
    );
    let mut stripped = got.clone();
    for name in [
        DEAD_LETTER_REASON,
        DEAD_LETTER_ATTEMPTS,
        DEAD_LETTER_ORIGIN,
        DEAD_LETTER_TIME,
    ] {
        stripped.remove_extension(name);
    }
    same_event(original, &stripped).map_err(|f| {
        Failure(format!(
            "the dead-lettered event is not the original: {}",
            f.0
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_ranges() {
        assert_eq!(ranges(&[]), "none");
        assert_eq!(ranges(&[9, 3, 4, 5, 4, 12, 13]), "3-5, 9, 12-13");
    }

    #[test]
    fn names_stay_short_and_portable_even_for_long_adapters_and_cases() {
        let names = Names::new("my very_long adapter/name with spaces", &run_id());
        let case = "topic_durable_subscription_closed_mid_stream_and_reopened_misses_nothing";
        let topic = format!("{}-{}", names.scope(case), "x".repeat(MAX_LABEL));
        let sub = format!("{}-{}", names.sub_scope(case), "y".repeat(MAX_LABEL));
        let dlq = dead_letter_queue_name(&topic, Some(&sub), &ConsumerOptions::default());
        assert!(topic.len() <= 64, "{topic}");
        assert!(sub.len() <= 28, "{sub}");
        assert!(dlq.len() <= 100, "{dlq}");
        for name in [&topic, &sub, &dlq] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
                "{name}"
            );
        }
    }

    #[test]
    fn names_differ_between_cases_and_runs() {
        let a = Names::new("memory", "run1");
        let b = Names::new("memory", "run2");
        let long = "queue_nack_with_delay_redelivers_no_sooner_than_the_delay";
        let other = "queue_nack_with_delay_does_not_block_later_events";
        assert_ne!(a.scope(long), a.scope(other));
        assert_ne!(a.sub_scope(long), a.sub_scope(other));
        assert_ne!(a.scope(long), b.scope(long));
        assert_ne!(run_id(), run_id());
    }
}
