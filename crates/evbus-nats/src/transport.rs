//! [`NatsTransport`]: one connection to one NATS server, the factory for topics and queues.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use evbus::raw::Gate;
use evbus::{Capabilities, Error, ErrorKind, Event, Health, Queue, Result, Topic, Transport};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::{NatsConfig, Retention, Storage};
use crate::connection;
use crate::error::{classify_code, from_create_stream, from_get_stream, from_request};
use crate::names::{Kind, Names, StreamNames};
use crate::publisher::{NatsQueue, NatsTopic};

/// A transport on a NATS server with JetStream enabled (nats-server 2.9 or later).
///
/// Cheap to clone: clones share the connection and its lifecycle (closing one closes all).
///
/// ```no_run
/// use evbus::{Event, SubscribeOptions, Transport};
/// use evbus_nats::{NatsConfig, NatsTransport};
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> evbus::Result<()> {
/// let transport = NatsTransport::connect(NatsConfig::from_url("nats://127.0.0.1:4222")?).await?;
/// let topic = transport.topic("orders").await?;
/// let mut billing = topic.subscribe(SubscribeOptions::named("billing")).await?;
/// topic.publish(&Event::builder("afterOrderCreate", "/shop").json(&1)?.build()?).await?;
/// let delivery = billing.next().await.expect("a delivery")?;
/// delivery.ack().await?;
/// transport.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsTransport {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.gate.is_closed())
            .finish_non_exhaustive()
    }
}

/// State shared by a transport, its topics, queues, consumers and ack handles.
pub(crate) struct Shared {
    pub(crate) config: NatsConfig,
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) names: Names,
    /// Largest event accepted.
    pub(crate) max_payload_bytes: usize,
    /// The server's `max_payload`: what one message (headers and body) may take.
    pub(crate) server_max_payload: usize,
    /// Refuses operations after close; close waits for those in progress.
    gate: Gate,
    /// Streams known to exist (created or found by this transport).
    streams: Mutex<HashSet<String>>,
    /// Anonymous subscriptions' ephemeral consumers still open: deleted on close.
    anonymous: Mutex<HashMap<u64, (String, String)>>,
    next_anonymous: AtomicU64,
    /// Cancelled on close: consumers stop.
    pub(crate) cancel: CancellationToken,
    /// Background work (consumer clean-up), awaited on close.
    pub(crate) tasks: TaskTracker,
    /// How many times the client connected: a consumer ends the pull request it waits on
    /// when this moves (see `Pull::next`).
    pub(crate) connected: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Starts an operation, or fails with [`ErrorKind::Closed`].
    pub(crate) fn begin(&self) -> Result<TaskTrackerToken> {
        self.gate.enter()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// The stream configuration of a topic or queue.
    fn stream_config(&self, kind: Kind, names: &StreamNames) -> stream::Config {
        let config = &self.config;
        let (retention, max_age) = match kind {
            Kind::Topic => (
                match config.retention {
                    Retention::Limits => stream::RetentionPolicy::Limits,
                    Retention::Interest => stream::RetentionPolicy::Interest,
                },
                config.max_age,
            ),
            // A queue never drops what no consumer took yet.
            Kind::Queue => (stream::RetentionPolicy::WorkQueue, Duration::ZERO),
        };
        let duplicate_window = if max_age.is_zero() {
            config.duplicate_window
        } else {
            config.duplicate_window.min(max_age)
        };
        stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.subject.clone()],
            retention,
            storage: match config.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: config.replicas,
            max_age,
            duplicate_window,
            discard: stream::DiscardPolicy::Old,
            description: Some(format!(
                "evbus {} `{}`",
                match kind {
                    Kind::Topic => "topic",
                    Kind::Queue => "queue",
                },
                crate::names::unescape(names.subject.rsplit('.').next().unwrap_or_default())
                    .unwrap_or_default()
            )),
            ..Default::default()
        }
    }

    /// Creates the stream behind a topic or queue unless this transport already knows it.
    /// An existing stream is used as it is, if it stores the topic's or queue's subject: a
    /// stream of that name made outside evbus for other subjects is a configuration error
    /// (every publish to it would find no stream and be retried for ever).
    pub(crate) async fn ensure_stream(&self, kind: Kind, names: &StreamNames) -> Result<()> {
        if self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&names.stream)
        {
            return Ok(());
        }
        let config = self.stream_config(kind, names);
        // A replicated stream is created through the cluster's meta group, then elects its
        // own leader: on a loaded cluster that can outlast one request_timeout although it
        // goes through. Creating is idempotent (an existing stream is used as it is), so a
        // timed-out creation of a replicated stream is asked again, twice at most.
        let attempts = if self.config.replicas > 1 { 3 } else { 1 };
        for attempt in 1..=attempts {
            match self.js.get_or_create_stream(config.clone()).await {
                Ok(stream) => {
                    let subjects = &stream.cached_info().config.subjects;
                    if !subjects.iter().any(|s| subject_matches(s, &names.subject)) {
                        return Err(Error::invalid_config(format!(
                            "stream `{}` exists but stores {subjects:?}, not `{}`: it was made \
                             outside evbus; delete it, or give this transport another \
                             `stream_prefix`",
                            names.stream, names.subject
                        )));
                    }
                    break;
                }
                Err(e) => {
                    let e = from_create_stream(e, &format!("creating stream `{}`", names.stream));
                    if attempt == attempts || e.kind() != ErrorKind::Timeout {
                        return Err(e);
                    }
                    tracing::debug!(
                        stream = %names.stream, error = %e,
                        "creating a replicated stream timed out; asking again"
                    );
                }
            }
        }
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(names.stream.clone());
        Ok(())
    }

    /// Forgets that a stream exists (it was deleted, maybe by someone else).
    pub(crate) fn forget_stream(&self, stream: &str) {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
    }

    /// Registers an anonymous subscription's consumer for deletion on close.
    pub(crate) fn track_anonymous(&self, stream: &str, consumer: &str) -> u64 {
        let id = self.next_anonymous.fetch_add(1, Ordering::Relaxed);
        self.anonymous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (stream.to_owned(), consumer.to_owned()));
        id
    }

    /// Deletes an anonymous subscription's consumer (its subscription ended, or the
    /// subscribe that made it was cancelled).
    pub(crate) fn release_anonymous(self: &Arc<Self>, id: u64) {
        // While closing, close deletes it with the others: it is left registered.
        if self.is_closed() {
            return;
        }
        let removed = self
            .anonymous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let Some((stream, consumer)) = removed else {
            return;
        };
        // Tracked: a close starting meanwhile, which did not see this one, waits for it.
        let shared = Arc::clone(self);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let task = async move { shared.delete_consumer(&stream, &consumer).await };
            drop(handle.spawn(self.tasks.track_future(task)));
        }
    }

    async fn delete_consumer(&self, stream: &str, consumer: &str) {
        let deleting = self.js.delete_consumer_from_stream(consumer, stream);
        match tokio::time::timeout(self.config.request_timeout, deleting).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(
                stream, consumer, error = %e,
                "could not delete an anonymous subscription's consumer; the server removes it \
                 after anonymous_ttl"
            ),
            Err(_) => tracing::debug!(
                stream,
                consumer,
                "deleting an anonymous subscription's consumer timed out; the server removes it \
                 after anonymous_ttl"
            ),
        }
    }

    async fn delete_stream(&self, kind: Kind, name: &str) -> Result<()> {
        let names = self.names.stream(kind, name)?;
        self.forget_stream(&names.stream);
        match self.js.delete_stream(&names.stream).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = from_get_stream(e, &format!("deleting stream `{}`", names.stream));
                if e.kind() == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// Asks JetStream for the account's info (`$JS.API.INFO`): `Ok` when JetStream answers
/// without an error.
async fn jetstream_info(client: &Client) -> Result<()> {
    const WHAT: &str = "asking JetStream for its account info";
    let reply = client
        .request("$JS.API.INFO", Bytes::new())
        .await
        .map_err(|e| from_request(e, WHAT))?;
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
        Error::new(
            ErrorKind::Broker,
            format!("{WHAT}: the answer is not JSON: {e}"),
        )
    })?;
    if let Some(error) = body.get("error") {
        let code = error
            .get("err_code")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let description = error
            .get("description")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown error");
        let (kind, retryable, hint) = classify_code(jetstream::ErrorCode(code));
        let mut message = format!("{WHAT}: {description} (error code {code})");
        if !hint.is_empty() {
            message.push_str("; ");
            message.push_str(hint);
        }
        let error = Error::new(kind, message);
        return Err(match retryable {
            Some(r) => error.with_retryable(r),
            None => error,
        });
    }
    Ok(())
}

impl NatsTransport {
    /// Connects to the server `config` names and checks that JetStream is enabled. Fails
    /// with a retryable [`ErrorKind::Connection`] error when the server cannot be reached.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        config.validate()?;
        let (connected, _) = tokio::sync::watch::channel(0);
        let client = connection::connect(&config, connected.clone()).await?;
        let js = connection::jetstream(client.clone(), &config);
        // JetStream must be enabled: fail now rather than on the first publish.
        jetstream_info(&client).await.map_err(|e| {
            if e.kind() == ErrorKind::Connection {
                // Connected, yet nothing answers on the JetStream API.
                Error::new(
                    ErrorKind::Broker,
                    format!(
                        "{}; is JetStream enabled on this server (nats-server -js)?",
                        e.message()
                    ),
                )
                .with_retryable(false)
            } else {
                e
            }
        })?;
        let server_max_payload = client.server_info().max_payload;
        let max_payload_bytes = crate::capabilities::max_payload_bytes(&config, server_max_payload);
        let names = Names::new(&config.stream_prefix, &config.subject_prefix);
        Ok(NatsTransport {
            shared: Arc::new(Shared {
                config,
                client,
                js,
                names,
                max_payload_bytes,
                server_max_payload,
                gate: Gate::new("the NATS transport"),
                streams: Mutex::new(HashSet::new()),
                anonymous: Mutex::new(HashMap::new()),
                next_anonymous: AtomicU64::new(0),
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
                connected,
            }),
        })
    }

    /// Connects with the settings of a `nats://` or `tls://` URL
    /// (see [`NatsConfig::from_url`]).
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(NatsConfig::from_url(url)?).await
    }

    /// The settings this transport was opened with.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    /// The stream behind topic `name` (for inspection with `nats stream info`).
    pub fn topic_stream(&self, name: &str) -> Result<String> {
        Ok(self.shared.names.stream(Kind::Topic, name)?.stream)
    }

    /// The subject events of topic `name` are published to (for `nats sub`).
    pub fn topic_subject(&self, name: &str) -> Result<String> {
        Ok(self.shared.names.stream(Kind::Topic, name)?.subject)
    }

    /// The stream behind queue `name`.
    pub fn queue_stream(&self, name: &str) -> Result<String> {
        Ok(self.shared.names.stream(Kind::Queue, name)?.stream)
    }

    /// The subject events sent to queue `name` are published to.
    pub fn queue_subject(&self, name: &str) -> Result<String> {
        Ok(self.shared.names.stream(Kind::Queue, name)?.subject)
    }

    pub(crate) fn queue_handle(&self, name: &str) -> Result<NatsQueue> {
        NatsQueue::new(name, self.clone())
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities::capabilities(&self.shared.config, self.shared.max_payload_bytes)
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        crate::publisher::check_publishable(&self.shared, event)
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let _op = self.shared.begin()?;
        Ok(Arc::new(NatsTopic::new(name, self.clone())?))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        let _op = self.shared.begin()?;
        Ok(Arc::new(self.queue_handle(name)?))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        let _op = self.shared.begin()?;
        self.shared.delete_stream(Kind::Topic, name).await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let _op = self.shared.begin()?;
        self.shared.delete_stream(Kind::Queue, name).await
    }

    async fn health(&self) -> Health {
        if self.shared.is_closed() {
            return Health::Closed;
        }
        if self.shared.client.connection_state() != State::Connected {
            return Health::Unhealthy(
                "not connected to NATS; the client is reconnecting".to_owned(),
            );
        }
        let timeout = self.shared.config.request_timeout;
        match tokio::time::timeout(timeout, jetstream_info(&self.shared.client)).await {
            Ok(Ok(())) => Health::Healthy,
            Ok(Err(e)) => Health::Unhealthy(e.to_string()),
            Err(_) => Health::Unhealthy(format!("JetStream did not answer within {timeout:?}")),
        }
    }

    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        // Flush: wait for publishes and settlements already under way.
        // Another close, at the same time or later, waits for this one to finish.
        let Some(_closing) = shared.gate.close_once().await else {
            return Ok(());
        };
        // End subscriptions, then remove the anonymous ones' consumers.
        shared.cancel.cancel();
        let anonymous: Vec<(String, String)> = shared
            .anonymous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        futures::future::join_all(
            anonymous
                .iter()
                .map(|(stream, consumer)| shared.delete_consumer(stream, consumer)),
        )
        .await;
        shared.tasks.close();
        let grace = shared.config.request_timeout;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some NATS clean-up did not finish within {grace:?}");
        }
        // Sends what the client still buffers (acks, naks), then closes the connection.
        if let Err(e) = tokio::time::timeout(grace, shared.client.drain()).await {
            tracing::warn!(error = %e, "draining the NATS connection timed out");
        }
        Ok(())
    }
}

/// Whether the NATS subject filter `filter` (tokens, `*` for one, `>` for the rest) takes
/// `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    #[test]
    fn subject_filters_match_as_nats_matches_them() {
        use super::subject_matches as m;
        assert!(m("evbus.topic.orders", "evbus.topic.orders"));
        assert!(m("evbus.topic.*", "evbus.topic.orders"));
        assert!(m("evbus.>", "evbus.topic.orders"));
        assert!(m(">", "evbus.topic.orders"));
        assert!(!m("evbus.topic", "evbus.topic.orders"));
        assert!(!m("evbus.topic.orders.>", "evbus.topic.orders"));
        assert!(!m("evbus.*", "evbus.topic.orders"));
        assert!(!m("other.orders", "evbus.topic.orders"));
        assert!(!m("evbus.topic.orders.x", "evbus.topic.orders"));
    }
}
