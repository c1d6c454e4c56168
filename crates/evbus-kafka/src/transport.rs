//! [`KafkaTransport`]: the [`evbus::Transport`] over one Kafka cluster.

use std::sync::Arc;

use async_trait::async_trait;
use evbus::raw::Source;
use evbus::{
    Capabilities, ConsumerOptions, Event, Health, Queue, Result, StartPosition, SubscribeOptions,
    Subscription, Topic, Transport,
};
use rdkafka::producer::Producer;

use crate::capabilities::capabilities;
use crate::config::KafkaConfig;
use crate::connection::Connection;
use crate::consumer::{self, ConsumerSpec};
use crate::naming;

/// A transport over one Kafka cluster (see the crate documentation for the mapping).
///
/// ```no_run
/// use evbus::{Event, Transport};
/// use evbus_kafka::{KafkaConfig, KafkaTransport};
///
/// # async fn demo() -> evbus::Result<()> {
/// let transport = KafkaTransport::connect(KafkaConfig::from_url("kafka://127.0.0.1:9092")?).await?;
/// let orders = transport.topic("orders").await?;
/// orders.publish(&Event::builder("afterOrderCreate", "/shop").json(&42)?.build()?).await?;
/// transport.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct KafkaTransport {
    conn: Arc<Connection>,
}

impl KafkaTransport {
    /// Creates the clients for `config` and checks that a broker answers within
    /// [`KafkaConfig::operation_timeout`]; librdkafka reconnects by itself afterwards.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let conn = Arc::new(Connection::open(config)?);
        Connection::check_reachable(&conn.config).await?;
        Ok(KafkaTransport { conn })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.conn.config
    }

    /// Attaches a consumer of Kafka topic `topic` in consumer group `group`; an `anonymous`
    /// group has this one consumer only, keeps no state for later owners and is deleted when
    /// the consumer closes.
    async fn consume(
        &self,
        topic: &str,
        group: String,
        start: StartPosition,
        source: Source,
    ) -> Result<Subscription> {
        let anonymous = source.is_anonymous();
        let options = source.consumer().clone();
        // Close waits for a subscribe under way: it would otherwise go on joining the group
        // after close returned, and a process exiting then leaves the group as a crashed
        // consumer does (the next member waits out the session timeout).
        let _operation = self.conn.gate.enter()?;
        self.conn.ensure_topic(topic).await?;
        let dead_letter = match self.queue(source.dead_letter_queue()).await {
            // The default name is made from the topic's and the subscription's: a name core
            // accepts (`billing/eu`, or one that makes it too long) may not be a Kafka one.
            Err(e)
                if e.kind() == evbus::ErrorKind::InvalidConfig
                    && options.dead_letter_queue.is_none() =>
            {
                return Err(evbus::Error::invalid_config(format!(
                    "`{}` cannot be consumed on Kafka under this name: its default dead-letter \
                     queue `{}` is not a valid Kafka topic name (1 to 249 ASCII letters, \
                     digits, `.`, `_` or `-`); name the dead-letter queue with \
                     `ConsumerOptions::dead_letter_queue`, or choose a subscription name of \
                     those characters that keeps it within 249",
                    source.origin(),
                    source.dead_letter_queue()
                )));
            }
            other => other?,
        };
        let state = if anonymous || !self.conn.use_state_topic(topic).await {
            None
        } else {
            Some(self.conn.state_topic(&group, topic).await?)
        };
        // Ended by the topic's deletion (or the transport's close); deleting the topic waits
        // for this token, held until the consumer has left its group.
        let of_topic = self.conn.consumers_of(topic);
        let thread = of_topic.threads.token();
        let on_closed: Box<dyn FnOnce() + Send> = {
            let conn = Arc::clone(&self.conn);
            let group = group.clone();
            Box::new(move || {
                let _thread = thread;
                if anonymous {
                    futures::executor::block_on(conn.delete_group(&group));
                } else {
                    conn.left_group(&group);
                }
            })
        };
        let on_dropped: Box<dyn FnOnce() + Send> = {
            let conn = Arc::clone(&self.conn);
            let group = group.clone();
            Box::new(move || conn.left_group(&group))
        };
        self.conn.rejoin_gap(&group).await;
        let spec = ConsumerSpec {
            topic: topic.to_owned(),
            group,
            start,
            options: options.clone(),
            state,
            on_closed: Some(on_closed),
            on_dropped: Some(on_dropped),
            transport_closed: self.conn.gate.child_token(),
        };
        let raw = consumer::start(
            &self.conn.config,
            spec,
            of_topic.ended.clone(),
            &self.conn.consumers,
        )
        .await?;
        let ended = of_topic.ended;
        Ok(source.into_subscription(raw, dead_letter, async move { ended.cancelled().await }))
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.conn.config)
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        self.conn.check_size(event)
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        self.conn.check_open()?;
        self.conn.ensure_topic(name).await?;
        Ok(Arc::new(KafkaTopic {
            name: name.to_owned(),
            transport: self.clone(),
        }))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        self.conn.check_open()?;
        self.conn.ensure_topic(name).await?;
        Ok(Arc::new(KafkaQueue {
            name: name.to_owned(),
            transport: self.clone(),
        }))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.conn.check_open()?;
        self.conn.delete_topic(name).await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        self.conn.check_open()?;
        self.conn.delete_topic(name).await?;
        self.conn.delete_queue_state_topic(name).await
    }

    async fn health(&self) -> Health {
        if self.conn.gate.is_closed() {
            return Health::Closed;
        }
        match self.conn.reachable().await {
            Ok(()) => Health::Healthy,
            Err(reason) => Health::Unhealthy(format!("no Kafka broker answers: {reason}")),
        }
    }

    async fn close(&self) -> Result<()> {
        // Another close, at the same time or later, waits for this one to finish.
        let Some(_closing) = self.conn.gate.close_once().await else {
            return Ok(());
        };
        // Every publish that returned Ok was already acknowledged; flush what is still in
        // flight (publishes racing with close) and let consumers commit and leave.
        let producer = self.conn.producer.clone();
        let timeout = self.conn.config.message_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        self.conn.consumers.close();
        let _ = tokio::time::timeout(
            self.conn.config.operation_timeout,
            self.conn.consumers.wait(),
        )
        .await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::error::from_kafka(e, "flushing the Kafka producer")),
            Err(e) => Err(evbus::Error::new(
                evbus::ErrorKind::Internal,
                format!("flush task failed: {e}"),
            )),
        }
    }
}

/// A Kafka topic used as an evbus topic.
#[derive(Debug)]
struct KafkaTopic {
    name: String,
    transport: KafkaTransport,
}

#[async_trait]
impl Topic for KafkaTopic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.transport.conn.publish(&self.name, event).await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        self.transport.conn.publish_batch(&self.name, events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let source = Source::topic(&self.name, &options)?;
        let group = match source.subscription() {
            Some(sub) => naming::subscription_group(&self.name, sub),
            // Anonymous: a group of its own, starting now, unless asked for history.
            None => naming::anonymous_group(&self.name),
        };
        self.transport
            .consume(&self.name, group, options.start, source)
            .await
    }
}

/// A Kafka topic used as an evbus queue: every consumer joins one group.
#[derive(Debug)]
struct KafkaQueue {
    name: String,
    transport: KafkaTransport,
}

#[async_trait]
impl Queue for KafkaQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, event: &Event) -> Result<()> {
        self.transport.conn.publish(&self.name, event).await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        self.transport.conn.publish_batch(&self.name, events).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let source = Source::queue(&self.name, &options)?;
        // A queue keeps what was sent before its first consumer: start from the earliest.
        self.transport
            .consume(
                &self.name,
                naming::queue_group(&self.name),
                StartPosition::Earliest,
                source,
            )
            .await
    }
}
