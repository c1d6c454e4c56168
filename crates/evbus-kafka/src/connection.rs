//! The librdkafka clients one transport shares: the idempotent producer, the admin client,
//! the set of topics known to exist, and the close signal every consumer watches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evbus::raw::Gate;
use evbus::{Error, ErrorKind, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::KafkaConfig;
use crate::error::from_kafka;
use crate::naming::check_topic_name;
use crate::state::{OffsetStateStore, StateTopic, state_topic_name};

/// What every topic, queue and consumer of one transport shares.
pub(crate) struct Connection {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    known_topics: Mutex<HashSet<String>>,
    /// Closed by [`KafkaTransport::close`](crate::KafkaTransport): consumers stop, and a
    /// second close waits for the first to finish.
    pub(crate) gate: Gate,
    /// The consumer threads, so that close waits for their final offset commits.
    pub(crate) consumers: TaskTracker,
    /// Whether the broker keeps offset-commit metadata, once probed.
    metadata_kept: Mutex<Option<bool>>,
    /// When a consumer of this transport last left each consumer group.
    left: Mutex<HashMap<String, Instant>>,
    /// This transport's consumers of each Kafka topic, so that deleting the topic ends them
    /// and waits for them to leave first.
    consumers_of: Mutex<HashMap<String, TopicConsumers>>,
}

/// The consumers of one Kafka topic on one transport.
#[derive(Clone)]
pub(crate) struct TopicConsumers {
    /// Ends them (a child of the transport's close signal).
    pub(crate) ended: CancellationToken,
    /// Their threads, each holding a token until its consumer has left the group.
    pub(crate) threads: TaskTracker,
}

/// How long a new consumer of a group waits after another consumer of this transport left
/// it (see the README: tansu hangs a `JoinGroup` that overtakes a `LeaveGroup`).
const REJOIN_GAP: Duration = Duration::from_millis(500);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .field("closed", &self.gate.is_closed())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Creates the producer and the admin client (librdkafka connects lazily, in the
    /// background, and reconnects by itself).
    pub(crate) fn open(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let mut producer_config = config.client_config();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            // No lingering: a lone publish is sent at once (0.2-0.3 ms on tansu here, where
            // `linger.ms=2` made it 3 ms); under load records still go out in batches, the
            // ones that queue while earlier requests are in flight (see the README, "Latency
            // and batching").
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                config.message_timeout.as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "100000");
        for (k, v) in &config.properties {
            producer_config.set(k, v);
        }
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|e| from_kafka(e, "creating the Kafka producer"))?;
        let admin: AdminClient<DefaultClientContext> = config
            .client_config()
            .create()
            .map_err(|e| from_kafka(e, "creating the Kafka admin client"))?;
        Ok(Connection {
            config,
            producer,
            admin,
            known_topics: Mutex::new(HashSet::new()),
            gate: Gate::new("the Kafka transport"),
            consumers: TaskTracker::new(),
            metadata_kept: Mutex::new(None),
            left: Mutex::new(HashMap::new()),
            consumers_of: Mutex::new(HashMap::new()),
        })
    }

    /// Fails with [`ErrorKind::Closed`] once the transport was closed.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.gate.is_closed() {
            Err(Error::closed("the Kafka transport"))
        } else {
            Ok(())
        }
    }

    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.config.operation_timeout))
            .operation_timeout(Some(self.config.operation_timeout))
    }

    /// Creates the Kafka topic `name` unless this transport already knows it exists.
    pub(crate) async fn ensure_topic(&self, name: &str) -> Result<()> {
        check_topic_name(name)?;
        if self.known_topics.lock().is_ok_and(|t| t.contains(name)) {
            return Ok(());
        }
        let max_message_bytes = self.config.message_max_bytes().to_string();
        let topic = NewTopic::new(
            name,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        )
        .set("max.message.bytes", &max_message_bytes);
        self.create_topic(&topic, name).await
    }

    /// Creates `topic` (named `name`) unless it exists, and waits until the cluster lists it.
    async fn create_topic(&self, topic: &NewTopic<'_>, name: &str) -> Result<()> {
        let what = format!("creating Kafka topic `{name}`");
        let results = self
            .admin
            .create_topics([topic], &self.admin_options())
            .await
            .map_err(|e| from_kafka(e, &what))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    let (kind, retryable, _) = crate::error::classify_code(code);
                    let e = Error::new(kind, format!("{what}: {code}"));
                    return Err(match retryable {
                        Some(r) => e.with_retryable(r),
                        None => e,
                    });
                }
            }
        }
        self.wait_for_metadata(name).await?;
        if let Ok(mut known) = self.known_topics.lock() {
            known.insert(name.to_owned());
        }
        Ok(())
    }

    /// Waits until the cluster's metadata lists `name` with its partitions (a topic just
    /// created may take a moment to appear on every broker).
    async fn wait_for_metadata(&self, name: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout;
        loop {
            let producer = self.producer.clone();
            let topic = name.to_owned();
            let found = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|m| {
                        m.topics().iter().any(|t| {
                            t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                        })
                    })
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("metadata task failed: {e}")))?;
            if let Ok(true) = found {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match found {
                    Err(e) => from_kafka(e, &format!("reading metadata of topic `{name}`")),
                    Ok(_) => Error::new(
                        ErrorKind::Timeout,
                        format!("topic `{name}` did not appear in the cluster metadata"),
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The signal that ends this transport's consumers of Kafka topic `topic`, and the
    /// tracker of their threads.
    pub(crate) fn consumers_of(&self, topic: &str) -> TopicConsumers {
        let mut map = self.consumers_of.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(topic.to_owned())
            .or_insert_with(|| TopicConsumers {
                ended: self.gate.child_token(),
                threads: TaskTracker::new(),
            })
            .clone()
    }

    /// Deletes the Kafka topic `name`; a missing topic is not an error.
    ///
    /// This transport's consumers of the topic end first (their subscriptions end, as on
    /// the in-memory transport), and the deletion waits, up to the operation timeout, until
    /// they have left their groups: a consumer still leaving, or still subscribed, when its
    /// topic goes was seen to crash librdkafka 2.12 against tansu (a metadata response
    /// naming no topic, read in `rd_kafka_metadata_cache_find`).
    pub(crate) async fn delete_topic(&self, name: &str) -> Result<()> {
        check_topic_name(name)?;
        let consumers = self
            .consumers_of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(consumers) = consumers {
            consumers.ended.cancel();
            consumers.threads.close();
            if tokio::time::timeout(self.config.operation_timeout, consumers.threads.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    topic = name,
                    "deleting a Kafka topic whose consumers on this transport did not leave \
                     their groups within the operation timeout"
                );
            }
        }
        if let Ok(mut known) = self.known_topics.lock() {
            known.remove(name);
        }
        let what = format!("deleting Kafka topic `{name}`");
        let results = self
            .admin
            .delete_topics(&[name], &self.admin_options())
            .await
            .map_err(|e| from_kafka(e, &what))?;
        // Again: a publish racing with the deletion may have found the topic and recorded it.
        if let Ok(mut known) = self.known_topics.lock() {
            known.remove(name);
        }
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((_, code)) => {
                    return Err(Error::new(ErrorKind::Broker, format!("{what}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// Whether consumers of this transport keep their partition state in state topics (`true`)
    /// or in offset-commit metadata: [`KafkaConfig::offset_state`], probing the broker (on
    /// Kafka topic `topic`, which exists) the first time it is `Auto`. A probe that fails
    /// answers "state topic" (it works on every broker) without remembering the answer.
    pub(crate) async fn use_state_topic(self: &Arc<Self>, topic: &str) -> bool {
        match self.config.offset_state {
            OffsetStateStore::CommitMetadata => return false,
            OffsetStateStore::StateTopic => return true,
            _ => {}
        }
        if let Some(kept) = self.metadata_kept.lock().ok().and_then(|k| *k) {
            return !kept;
        }
        let group = format!("evbus.probe.{}", uuid::Uuid::now_v7().simple());
        let config = self.config.clone();
        let (topic, probe_group) = (topic.to_owned(), group.clone());
        // The probe and the deletion of its group run in a task of their own: a subscribe
        // cancelled while the probe commits would otherwise leave the group behind.
        let conn = Arc::clone(self);
        let probed = tokio::spawn(async move {
            let probed = tokio::task::spawn_blocking(move || {
                crate::state::probe_commit_metadata(&config, &topic, &probe_group)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            conn.delete_group(&group).await;
            probed
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match probed {
            Ok(kept) => {
                tracing::debug!(
                    kept,
                    "probed whether the Kafka broker keeps offset-commit metadata"
                );
                if let Ok(mut k) = self.metadata_kept.lock() {
                    *k = Some(kept);
                }
                !kept
            }
            Err(e) => {
                tracing::warn!(error = %e, "probing offset-commit metadata failed; using a state topic");
                true
            }
        }
    }

    /// Creates (when missing) the compacted state topic of consumer group `group`, with as
    /// many partitions as Kafka topic `topic` has.
    pub(crate) async fn state_topic(&self, group: &str, topic: &str) -> Result<Arc<StateTopic>> {
        let name = state_topic_name(group);
        if !self.known_topics.lock().is_ok_and(|t| t.contains(&name)) {
            let partitions = self.partition_count(topic).await?;
            let max_message_bytes = (64 * 1024).to_string();
            let new = NewTopic::new(
                &name,
                partitions,
                TopicReplication::Fixed(self.config.replication_factor),
            )
            .set("cleanup.policy", "compact")
            .set("max.message.bytes", &max_message_bytes);
            self.create_topic(&new, &name).await?;
        }
        Ok(Arc::new(StateTopic::new(
            name,
            self.producer.clone(),
            self.config.clone(),
        )))
    }

    /// The number of partitions of Kafka topic `topic`.
    async fn partition_count(&self, topic: &str) -> Result<i32> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let timeout = self.config.operation_timeout;
        let count = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map_or(0, |t| t.partitions().len())
                })
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("metadata task failed: {e}")))?
        .map_err(|e| from_kafka(e, &format!("reading metadata of topic `{topic}`")))?;
        Ok(i32::try_from(count)
            .unwrap_or(i32::MAX)
            .max(self.config.partitions))
    }

    /// Records that a consumer of this transport left consumer group `group` just now.
    pub(crate) fn left_group(&self, group: &str) {
        if let Ok(mut left) = self.left.lock() {
            let now = Instant::now();
            left.retain(|_, at| now.duration_since(*at) < REJOIN_GAP);
            left.insert(group.to_owned(), now);
        }
    }

    /// Waits until [`REJOIN_GAP`] has passed since a consumer of this transport left `group`,
    /// so that the broker has seen it leave before another member joins.
    pub(crate) async fn rejoin_gap(&self, group: &str) {
        // Again after each wait: the leaving consumer records its leave twice (when its
        // stream is dropped and when it has left).
        loop {
            let at = self.left.lock().ok().and_then(|l| l.get(group).copied());
            match at {
                Some(at) if at.elapsed() < REJOIN_GAP => {
                    tokio::time::sleep_until((at + REJOIN_GAP).into()).await;
                }
                _ => return,
            }
        }
    }

    /// Deletes consumer group `group`, logging failures (an empty group expires anyway).
    pub(crate) async fn delete_group(&self, group: &str) {
        match self
            .admin
            .delete_groups(&[group], &self.admin_options())
            .await
        {
            Ok(results) => {
                for result in results {
                    if let Err((_, code)) = result {
                        tracing::debug!(group, error = %code, "deleting a consumer group failed");
                    }
                }
            }
            Err(e) => tracing::debug!(group, error = %e, "deleting a consumer group failed"),
        }
    }

    /// Deletes the state topic of the queue group of Kafka topic `topic`, so that a queue
    /// created again under the same name does not meet stale state.
    pub(crate) async fn delete_queue_state_topic(&self, topic: &str) -> Result<()> {
        self.delete_topic(&state_topic_name(&crate::naming::queue_group(topic)))
            .await
    }

    /// Checks, before the transport is handed out, that a broker answers a metadata
    /// request, with a client of its own that listens to librdkafka's global errors: a
    /// broker that refuses the credentials or the TLS handshake makes the request time out
    /// like an absent one, and only that error says why. Refused credentials or TLS are an
    /// [`ErrorKind::InvalidConfig`] naming librdkafka's reason (retrying does not cure them);
    /// no answer is a [`ErrorKind::Connection`].
    pub(crate) async fn check_reachable(config: &KafkaConfig) -> Result<()> {
        let servers = config.bootstrap_servers.clone();
        let timeout = config.operation_timeout.min(Duration::from_secs(2));
        let client_config = config.client_config();
        let (answered, refused) = tokio::task::spawn_blocking(move || {
            let probe: rdkafka::producer::BaseProducer<Refusals> =
                match client_config.create_with_context(Refusals::default()) {
                    Ok(probe) => probe,
                    Err(e) => return (Err(e.to_string()), None),
                };
            let answered = probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string());
            if answered.is_err() {
                // Global errors reach the context only through a poll of the client.
                probe.poll(Duration::from_millis(100));
            }
            let refused = probe.context().first();
            (answered, refused)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("metadata task failed: {e}")))?;
        match (answered, refused) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(reason)) => Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("the Kafka broker at `{servers}` refused this client: {reason}"),
            )
            .with_hint(
                "check the credentials and TLS settings in the URL (`rdkafka.sasl.*`, \
                 `rdkafka.security.protocol`, `rdkafka.ssl.*`)",
            )),
            (Err(reason), None) => Err(Error::new(
                ErrorKind::Connection,
                format!("no Kafka broker answered at `{servers}`: {reason}"),
            )),
        }
    }

    /// Whether a broker answers a metadata request now.
    pub(crate) async fn reachable(&self) -> std::result::Result<(), String> {
        let producer = self.producer.clone();
        let timeout = self.config.operation_timeout.min(Duration::from_secs(2));
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// A client context that keeps the first global error saying the broker refused the client
/// (authentication, authorization of the cluster, TLS), for [`Connection::check_reachable`].
/// Every global error is still logged, at debug level (librdkafka retries the others).
#[derive(Default)]
struct Refusals {
    first: Mutex<Option<String>>,
}

impl Refusals {
    fn first(&self) -> Option<String> {
        self.first.lock().ok().and_then(|f| f.clone())
    }
}

impl rdkafka::ClientContext for Refusals {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka global error while connecting");
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::UnsupportedSASLMechanism
                    | RDKafkaErrorCode::IllegalSASLState
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::SSL
            )
        );
        if refused && let Ok(mut first) = self.first.lock() {
            first.get_or_insert_with(|| reason.to_owned());
        }
    }
}

impl rdkafka::producer::ProducerContext for Refusals {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}
