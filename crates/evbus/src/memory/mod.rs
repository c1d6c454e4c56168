//! The in-memory transport (`memory://`): the reference implementation of the contract and the
//! embedded default.
//!
//! A [`MemoryBroker`] holds topics, subscriptions and queues in process memory; each
//! [`MemoryTransport`] is one "connection" to it, so closing one transport (a consumer that
//! vanished) leaves the broker and other transports running, exactly as with a real broker.
//! `memory://` connects to the process-wide default broker, `memory://NAME` to a named one.
//!
//! Memory is bounded: every subscription and queue holds at most
//! [`MemoryConfig::capacity`] events (ready, delayed or in flight). A publish that would exceed
//! it waits for consumers to catch up (backpressure) for at most
//! [`MemoryConfig::publish_timeout`], then fails with [`ErrorKind::Full`] naming the slow
//! subscription. Each topic retains its last [`MemoryConfig::history`] events for
//! [`StartPosition::Earliest`].
//!
//! Nothing survives the process: it is not [`persistent`](Capabilities::persistent).
//!
//! ```
//! use evbus::{Event, SubscribeOptions, Transport, memory::MemoryBroker};
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> evbus::Result<()> {
//! let transport = MemoryBroker::new(Default::default()).connect();
//! let topic = transport.topic("orders").await?;
//! let mut sub = topic.subscribe(SubscribeOptions::named("billing")).await?;
//! topic.publish(&Event::builder("afterOrderCreate", "/shop").json(&1)?.build()?).await?;
//! let delivery = sub.next().await.unwrap()?;
//! assert_eq!(delivery.event().ty(), "afterOrderCreate");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod group;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::capabilities::Capabilities;
use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::raw::{ConfigKey, Source, parse_millis, parse_value};
use crate::registry::Connector;
use crate::subscription::Subscription;
use crate::transport::{
    ConsumerOptions, Health, Queue, StartPosition, SubscribeOptions, Topic, Transport,
    check_encoded_len,
};
use group::Group;

/// Settings of a [`MemoryBroker`]. From a URL: `memory://[NAME]?capacity=N&history=N&
/// publish_timeout_ms=N&max_payload_bytes=N`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Most events one subscription or queue holds (ready + delayed + in flight). Default
    /// 10,000.
    pub capacity: usize,
    /// Events each topic retains for replay from the earliest position. Default 10,000.
    pub history: usize,
    /// How long a publish waits for room before failing with [`ErrorKind::Full`]. Default 5 s.
    #[serde(
        rename = "publish_timeout_ms",
        alias = "publish_timeout",
        with = "crate::raw::millis"
    )]
    pub publish_timeout: Duration,
    /// Largest event accepted (data plus attributes). Default 16 MiB.
    pub max_payload_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: 10_000,
            history: 10_000,
            publish_timeout: Duration::from_secs(5),
            max_payload_bytes: 16 * 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Reads the settings from a `memory://` URL's query.
    pub fn from_url(url: &Url) -> Result<Self> {
        if url.scheme() != "memory" {
            return Err(Error::invalid_config(format!(
                "`{}://` is not a memory transport URL",
                url.scheme()
            )));
        }
        let mut config = MemoryConfig::default();
        for (key, value) in url.query_pairs() {
            let key = MemoryConfigKey::parse(&key)?;
            match key {
                MemoryConfigKey::Capacity => {
                    config.capacity = parse_value::<_, usize>(key, &value)?.max(1);
                }
                MemoryConfigKey::History => config.history = parse_value(key, &value)?,
                MemoryConfigKey::PublishTimeoutMs => {
                    config.publish_timeout = parse_millis(key, &value)?;
                }
                MemoryConfigKey::MaxPayloadBytes => {
                    config.max_payload_bytes = parse_value(key, &value)?;
                }
            }
        }
        Ok(config)
    }
}

/// The keys of [`MemoryConfig`], in `memory://` URLs and in serde.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryConfigKey {
    /// [`MemoryConfig::capacity`].
    Capacity,
    /// [`MemoryConfig::history`].
    History,
    /// [`MemoryConfig::publish_timeout`], in milliseconds.
    PublishTimeoutMs,
    /// [`MemoryConfig::max_payload_bytes`].
    MaxPayloadBytes,
}

impl ConfigKey for MemoryConfigKey {
    const ADAPTER: &'static str = "memory";
    const ALL: &'static [Self] = &[
        MemoryConfigKey::Capacity,
        MemoryConfigKey::History,
        MemoryConfigKey::PublishTimeoutMs,
        MemoryConfigKey::MaxPayloadBytes,
    ];

    fn name(self) -> &'static str {
        match self {
            MemoryConfigKey::Capacity => "capacity",
            MemoryConfigKey::History => "history",
            MemoryConfigKey::PublishTimeoutMs => "publish_timeout_ms",
            MemoryConfigKey::MaxPayloadBytes => "max_payload_bytes",
        }
    }
}

/// An in-process broker. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<BrokerInner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct BrokerInner {
    config: MemoryConfig,
    state: Mutex<BrokerState>,
    next_anonymous: AtomicU64,
}

/// Keyed by topic and queue names, which the application chooses (a map with a fast hash:
/// one lookup per publish).
#[derive(Default)]
struct BrokerState {
    topics: FxHashMap<String, TopicState>,
    queues: FxHashMap<String, Arc<Group>>,
}

impl BrokerState {
    /// Topic `name`, created empty if new (without copying the name when it exists).
    fn topic_mut(&mut self, name: &str) -> &mut TopicState {
        if !self.topics.contains_key(name) {
            self.topics.insert(name.to_owned(), TopicState::default());
        }
        self.topics
            .get_mut(name)
            .expect("the topic was inserted just above")
    }
}

#[derive(Default)]
struct TopicState {
    history: VecDeque<Event>,
    named: FxHashMap<String, Arc<Group>>,
    anonymous: FxHashMap<u64, Weak<Group>>,
}

impl TopicState {
    /// Appends `events` to every subscription and to the history (kept to `history`
    /// events), or returns a subscription without room (nothing appended then).
    fn append(&mut self, events: &[Event], history: usize) -> Option<Arc<Group>> {
        if !self.anonymous.is_empty() {
            self.anonymous.retain(|_, g| g.strong_count() > 0);
        }
        if let Some(full) = self.named.values().find(|g| !g.has_room()) {
            return Some(Arc::clone(full));
        }
        let anonymous: Vec<Arc<Group>> =
            self.anonymous.values().filter_map(Weak::upgrade).collect();
        if let Some(full) = anonymous.iter().find(|g| !g.has_room()) {
            return Some(Arc::clone(full));
        }
        for group in self.named.values().chain(&anonymous) {
            group.push(events);
        }
        self.history.extend(events.iter().cloned());
        while self.history.len() > history {
            self.history.pop_front();
        }
        None
    }

    fn groups(&self) -> impl Iterator<Item = Arc<Group>> + '_ {
        self.named
            .values()
            .cloned()
            .chain(self.anonymous.values().filter_map(Weak::upgrade))
    }
}

impl MemoryBroker {
    /// A new, empty broker.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryBroker {
            inner: Arc::new(BrokerInner {
                config,
                state: Mutex::new(BrokerState::default()),
                next_anonymous: AtomicU64::new(0),
            }),
        }
    }

    /// The process-wide broker called `name` (`""` is the default broker), created with
    /// `config` on first use; later calls return the same broker and ignore `config`.
    pub fn shared(name: &str, config: MemoryConfig) -> Self {
        static BROKERS: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();
        let brokers = BROKERS.get_or_init(Default::default);
        let mut brokers = brokers.lock().unwrap_or_else(|p| p.into_inner());
        brokers
            .entry(name.to_owned())
            .or_insert_with(|| MemoryBroker::new(config))
            .clone()
    }

    /// Opens a new connection to this broker.
    pub fn connect(&self) -> MemoryTransport {
        MemoryTransport {
            broker: self.clone(),
            closed: Closed::default(),
        }
    }

    /// The broker's settings.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    fn lock(&self) -> MutexGuard<'_, BrokerState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        check_encoded_len("memory", Some(self.inner.config.max_payload_bytes), event)
    }

    /// Appends `events` to every group of `target` if every one has room; otherwise appends
    /// nothing and returns a group that is full. All-or-nothing, under the broker's lock.
    fn try_append(&self, events: &[Event], target: Target<'_>) -> Option<Arc<Group>> {
        let mut state = self.lock();
        match target {
            Target::Topic(name) => {
                let history = self.inner.config.history;
                // One lookup when the topic exists (the usual case).
                match state.topics.get_mut(name) {
                    Some(topic) => topic.append(events, history),
                    None => state.topic_mut(name).append(events, history),
                }
            }
            Target::Queue(name) => {
                let group = match state.queues.get(name) {
                    Some(group) => Arc::clone(group),
                    // The queue may have been deleted and recreated since its handle was
                    // made.
                    None => Arc::clone(state.queues.entry(name.to_owned()).or_insert_with(|| {
                        Group::new(name.to_owned(), self.inner.config.capacity)
                    })),
                };
                if group.has_room() {
                    group.push(events);
                    None
                } else {
                    Some(group)
                }
            }
        }
    }

    /// One attempt of [`append`](Self::append): refused if the transport is closed or an
    /// event is too large; otherwise appended (`None`), or nothing appended and a full group
    /// returned to wait for.
    fn append_now(
        &self,
        events: &[Event],
        closed: &Closed,
        target: Target<'_>,
    ) -> Result<Option<Arc<Group>>> {
        if closed.is_closed() {
            return Err(Error::closed("the memory transport"));
        }
        for event in events {
            self.check_size(event)?;
        }
        Ok(self.try_append(events, target))
    }

    /// Appends `events` to every group of `target`, waiting for room up to the publish
    /// timeout. All-or-nothing: events are appended only when every group has room.
    async fn append(&self, events: &[Event], closed: &Closed, target: Target<'_>) -> Result<()> {
        let mut deadline = None;
        loop {
            let Some(wait) = self.append_now(events, closed, target)? else {
                return Ok(());
            };
            let deadline = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + self.inner.config.publish_timeout
            });
            let _waiting = wait.space().enter();
            let space = wait.space().notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if wait.has_room() {
                continue;
            }
            tokio::select! {
                _ = &mut space => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::new(
                        ErrorKind::Full,
                        format!(
                            "`{}` holds {} unsettled events (the memory transport's capacity) and \
                             its consumers did not catch up within {:?}; consume faster or raise \
                             capacity",
                            wait.origin(),
                            self.inner.config.capacity,
                            self.inner.config.publish_timeout
                        ),
                    ));
                }
                _ = closed.cancelled() => return Err(Error::closed("the memory transport")),
            }
        }
    }
}

/// Where [`MemoryBroker::append`] appends.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// Every subscription of the topic, and its history.
    Topic(&'a str),
    /// The queue.
    Queue(&'a str),
}

/// Connects `memory://` URLs to the shared in-process brokers.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryConnector;

#[async_trait]
impl Connector for MemoryConnector {
    fn schemes(&self) -> &'static [&'static str] {
        &["memory"]
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(MemoryTransport::from_url(url)?))
    }
}

/// One connection to a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemoryTransport {
    broker: MemoryBroker,
    closed: Closed,
}

/// Whether a [`MemoryTransport`] was closed: a flag for the checks on every delivery and
/// settlement (no lock), and a token to wait on.
#[derive(Clone, Default)]
pub(crate) struct Closed {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Closed {
    pub(crate) fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn close(&self) {
        // The flag first: whoever the token wakes sees it set.
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Completes once the transport is closed.
    pub(crate) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("closed", &self.closed.is_closed())
            .finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// A connection to the shared broker a `memory://[NAME]` URL names.
    pub fn from_url(url: &Url) -> Result<Self> {
        let config = MemoryConfig::from_url(url)?;
        let name = url.host_str().unwrap_or("");
        Ok(MemoryBroker::shared(name, config).connect())
    }

    /// The broker this transport is connected to.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.is_closed() {
            Err(Error::closed("the memory transport"))
        } else {
            Ok(())
        }
    }

    fn memory_queue(&self, name: &str) -> Arc<MemoryQueue> {
        let capacity = self.broker.inner.config.capacity;
        let group = self
            .broker
            .lock()
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| Group::new(name.to_owned(), capacity))
            .clone();
        Arc::new(MemoryQueue {
            name: name.to_owned(),
            group,
            transport: self.clone(),
        })
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replay: true,
            max_payload_bytes: Some(self.broker.inner.config.max_payload_bytes),
            ..Capabilities::default()
        }
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        self.check_open()?;
        check_name(name)?;
        self.broker
            .lock()
            .topics
            .entry(name.to_owned())
            .or_default();
        Ok(Arc::new(MemoryTopic {
            name: name.to_owned(),
            transport: self.clone(),
        }))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        self.check_open()?;
        check_name(name)?;
        Ok(self.memory_queue(name))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let removed = self.broker.lock().topics.remove(name);
        if let Some(topic) = removed {
            for group in topic.groups() {
                group.delete();
            }
        }
        Ok(())
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let removed = self.broker.lock().queues.remove(name);
        if let Some(group) = removed {
            group.delete();
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        if self.closed.is_closed() {
            Health::Closed
        } else {
            Health::Healthy
        }
    }

    async fn close(&self) -> Result<()> {
        // Publishes complete synchronously, so there is nothing to flush.
        self.closed.close();
        Ok(())
    }
}

fn check_name(name: &str) -> Result<()> {
    crate::raw::check_destination_name(name)
}

/// A topic on the memory broker.
#[derive(Debug)]
struct MemoryTopic {
    name: String,
    transport: MemoryTransport,
}

impl MemoryTopic {
    async fn publish_all(&self, events: &[Event]) -> Result<()> {
        self.transport.check_open()?;
        self.transport
            .broker
            .append(events, &self.transport.closed, Target::Topic(&self.name))
            .await
    }
}

/// Removes an anonymous subscription's group when its consumer goes away.
struct AnonymousGuard {
    broker: MemoryBroker,
    topic: String,
    id: u64,
}

impl Drop for AnonymousGuard {
    fn drop(&mut self) {
        if let Some(topic) = self.broker.lock().topics.get_mut(&self.topic) {
            topic.anonymous.remove(&self.id);
        }
    }
}

#[async_trait]
impl Topic for MemoryTopic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.publish_all(std::slice::from_ref(event)).await
    }

    fn try_publish_now(&self, event: &Event) -> Option<Result<()>> {
        let attempt = self.transport.broker.append_now(
            std::slice::from_ref(event),
            &self.transport.closed,
            Target::Topic(&self.name),
        );
        match attempt {
            Ok(None) => Some(Ok(())),
            // Full: nothing was appended; `publish` waits for room.
            Ok(Some(_full)) => None,
            Err(e) => Some(Err(e)),
        }
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        self.publish_all(events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        self.transport.check_open()?;
        let broker = &self.transport.broker;
        let capacity = broker.inner.config.capacity;
        let source = Source::topic(&self.name, &options)?;
        let consumer = source.consumer();
        let (group, guard) = {
            let mut state = broker.lock();
            let topic = state.topics.entry(self.name.clone()).or_default();
            match &options.subscription {
                Some(sub) => {
                    check_name(sub)?;
                    let group = match topic.named.get(sub) {
                        Some(g) => Arc::clone(g),
                        None => {
                            let g = Group::new(source.origin().to_owned(), capacity);
                            if options.start == StartPosition::Earliest {
                                let skip = topic.history.len().saturating_sub(capacity);
                                let replay: Vec<_> =
                                    topic.history.iter().skip(skip).cloned().collect();
                                g.push(&replay);
                            }
                            topic.named.insert(sub.clone(), Arc::clone(&g));
                            g
                        }
                    };
                    (group, None)
                }
                None => {
                    let id = broker.inner.next_anonymous.fetch_add(1, Ordering::Relaxed);
                    let g = Group::new(source.origin().to_owned(), capacity);
                    if options.start == StartPosition::Earliest {
                        let skip = topic.history.len().saturating_sub(capacity);
                        let replay: Vec<_> = topic.history.iter().skip(skip).cloned().collect();
                        g.push(&replay);
                    }
                    topic.anonymous.insert(id, Arc::downgrade(&g));
                    let guard: Box<dyn Send + Sync> = Box::new((
                        Arc::clone(&g),
                        AnonymousGuard {
                            broker: broker.clone(),
                            topic: self.name.clone(),
                            id,
                        },
                    ));
                    (g, Some(guard))
                }
            }
        };
        let dead_letter: Arc<dyn Queue> = self.transport.memory_queue(source.dead_letter_queue());
        let raw = group.consume(
            consumer.visibility_timeout,
            self.transport.closed.clone(),
            guard,
        );
        Ok(source.into_subscription(
            raw,
            dead_letter,
            self.transport.closed.token.clone().cancelled_owned(),
        ))
    }
}

/// A queue on the memory broker.
struct MemoryQueue {
    name: String,
    group: Arc<Group>,
    transport: MemoryTransport,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl MemoryQueue {
    async fn send_all(&self, events: &[Event]) -> Result<()> {
        self.transport.check_open()?;
        self.transport
            .broker
            .append(events, &self.transport.closed, Target::Queue(&self.name))
            .await
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, event: &Event) -> Result<()> {
        self.send_all(std::slice::from_ref(event)).await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        self.send_all(events).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        self.transport.check_open()?;
        let group = {
            // The queue may have been deleted and recreated since this handle was made.
            let mut state = self.transport.broker.lock();
            Arc::clone(
                state
                    .queues
                    .entry(self.name.clone())
                    .or_insert_with(|| Arc::clone(&self.group)),
            )
        };
        let source = Source::queue(&self.name, &options)?;
        let dead_letter: Arc<dyn Queue> = self.transport.memory_queue(source.dead_letter_queue());
        let raw = group.consume(
            options.visibility_timeout,
            self.transport.closed.clone(),
            None,
        );
        Ok(source.into_subscription(
            raw,
            dead_letter,
            self.transport.closed.token.clone().cancelled_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_keys_are_the_serde_names() {
        let json = serde_json::to_value(MemoryConfig::default()).unwrap();
        let serde_names: Vec<&str> = json.as_object().unwrap().keys().map(|k| &**k).collect();
        let mut url_names: Vec<&str> = MemoryConfigKey::ALL.iter().map(|k| k.name()).collect();
        url_names.sort_unstable();
        assert_eq!(serde_names, url_names);
    }

    #[test]
    fn a_typo_in_a_url_names_the_valid_keys() {
        let url = Url::parse("memory://?capacty=5").unwrap();
        let err = MemoryConfig::from_url(&url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(
            err.message()
                .contains("valid keys are: capacity, history, publish_timeout_ms"),
            "{err}"
        );
        let url = Url::parse("memory://?capacity=lots").unwrap();
        let err = MemoryConfig::from_url(&url).unwrap_err();
        assert!(
            err.message().contains("`capacity`: bad value `lots`"),
            "{err}"
        );
    }
}
