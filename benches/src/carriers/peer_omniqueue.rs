//! The peer loops (`--peers`): omniqueue, the Rust queue library a user would pick instead of
//! evbus, on the same broker, payloads and runs as the evbus loops.
//!
//! Each is driven the way omniqueue's own documentation shows: a producer from the backend's
//! builder, `send_raw` per event (awaited), and a consumer taking `receive_all` batches of the
//! Bus's handler concurrency, each delivery acked once decoded (up to that many acks in flight,
//! as the Bus's handlers ack). omniqueue neither creates the Redis consumer group nor declares
//! RabbitMQ queues: the loop does, with the topology the evbus adapter uses (a stream and its
//! group; a durable fanout exchange and a quorum queue).
//!
//! Where it differs from evbus in what a publish means, the difference stays (it is what a user
//! gets): omniqueue's RabbitMQ producer does not put its channel in confirm mode, so its `send`
//! returns before the broker has taken the message, where evbus waits for the confirm.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use omniqueue::backends::redis::RedisConnectionManager;
use omniqueue::backends::{
    RabbitMqBackend, RabbitMqConfig, RabbitMqConsumer, RabbitMqProducer, RedisBackend, RedisConfig,
    RedisConsumer, RedisProducer, rabbitmq,
};
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, GROUP, in_tasks};
use crate::Result;
use crate::sample::{Recorder, Sample, decode};

/// How long one `receive_all` waits for its first delivery.
const RECEIVE_WAIT: Duration = Duration::from_millis(100);

/// The two halves omniqueue builds for one backend.
enum Halves {
    Redis(
        Arc<RedisProducer<RedisConnectionManager>>,
        Option<RedisConsumer<RedisConnectionManager>>,
    ),
    Amqp(Arc<RabbitMqProducer>, Option<RabbitMqConsumer>),
}

/// The broker an [`Omniqueue`] loop runs on.
enum Broker {
    /// Redis Streams at this URL.
    Redis(String),
    /// RabbitMQ at this URL.
    Amqp(String),
}

/// omniqueue on Redis Streams or RabbitMQ.
pub(crate) struct Omniqueue {
    broker: Broker,
    /// The stream key (Redis) or the exchange and queue (RabbitMQ) of the current run.
    names: (String, String),
    halves: Option<Halves>,
    task: Option<JoinHandle<()>>,
}

impl Omniqueue {
    pub(crate) fn redis(url: &str) -> Self {
        // The adapter's own query parameters are not the client's.
        let plain = url.split('?').next().unwrap_or(url).to_owned();
        Omniqueue::new(Broker::Redis(plain))
    }

    pub(crate) fn amqp(url: &str) -> Result<Self> {
        let config = evbus_amqp::AmqpConfig::from_url(url)?;
        Ok(Omniqueue::new(Broker::Amqp(config.url)))
    }

    fn new(broker: Broker) -> Self {
        Omniqueue {
            broker,
            names: Default::default(),
            halves: None,
            task: None,
        }
    }

    async fn amqp_admin(url: &str) -> Result<lapin::Connection> {
        let properties = lapin::ConnectionProperties::default()
            .with_connection_name("evbus-bench-peer-admin".into());
        Ok(lapin::Connection::connect(url, properties).await?)
    }
}

#[async_trait]
impl Carrier for Omniqueue {
    async fn setup(&mut self, run: &str) -> Result<()> {
        match &self.broker {
            Broker::Redis(url) => {
                let stream = format!("evbus-bench:{run}:omniqueue");
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg("$")
                    .arg("MKSTREAM")
                    .query_async::<redis::Value>(&mut conn)
                    .await?;
                let config = RedisConfig {
                    dsn: url.clone(),
                    // One connection per concurrent publisher at most (bb8 pool).
                    max_connections: 64,
                    reinsert_on_nack: false,
                    queue_key: stream.clone(),
                    delayed_queue_key: format!("{stream}:delayed"),
                    delayed_lock_key: format!("{stream}:delayed-lock"),
                    consumer_group: GROUP.to_owned(),
                    consumer_name: "c1".to_owned(),
                    payload_key: "payload".to_owned(),
                    ack_deadline_ms: 30_000,
                    dlq_config: None,
                    sentinel_config: None,
                };
                let (producer, consumer) = RedisBackend::builder(config).build_pair().await?;
                self.halves = Some(Halves::Redis(Arc::new(producer), Some(consumer)));
                self.names = (stream, String::new());
            }
            Broker::Amqp(url) => {
                let exchange = format!("evbus-bench.{run}.omniqueue");
                let queue = format!("evbus-bench.{run}.omniqueue_s_{GROUP}");
                let admin = Self::amqp_admin(url).await?;
                super::raw_amqp::declare(&admin, &exchange, &queue).await?;
                admin.close(200, "OK".into()).await?;
                let config = RabbitMqConfig {
                    uri: url.clone(),
                    connection_properties: rabbitmq::ConnectionProperties::default(),
                    publish_exchange: exchange.clone(),
                    publish_routing_key: String::new(),
                    publish_options: rabbitmq::BasicPublishOptions::default(),
                    // Persistent, as evbus publishes.
                    publish_properties: rabbitmq::BasicProperties::default().with_delivery_mode(2),
                    consume_queue: queue.clone(),
                    consumer_tag: String::new(),
                    consume_options: rabbitmq::BasicConsumeOptions::default(),
                    consume_arguments: rabbitmq::FieldTable::default(),
                    consume_prefetch_count: Some(CONCURRENCY as u16),
                    requeue_on_nack: false,
                };
                let (producer, consumer) = RabbitMqBackend::builder(config).build_pair().await?;
                self.halves = Some(Halves::Amqp(Arc::new(producer), Some(consumer)));
                self.names = (exchange, queue);
            }
        }
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        match self.halves.as_ref().ok_or("omniqueue: not set up")? {
            Halves::Redis(producer, _) => producer.send_raw(&bytes).await?,
            Halves::Amqp(producer, _) => producer.send_raw(&bytes).await?,
        }
        Ok(())
    }

    /// Tasks: `send_raw` from every task on the one producer. Batches: omniqueue has no
    /// batch send, so a batch is its sends awaited together.
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let send = match self.halves.as_ref().ok_or("omniqueue: not set up")? {
            Halves::Redis(producer, _) => Sender::Redis(Arc::clone(producer)),
            Halves::Amqp(producer, _) => Sender::Amqp(Arc::clone(producer)),
        };
        match burst {
            Burst::Tasks(tasks) => {
                let send = Arc::new(send);
                in_tasks(payloads, tasks, move |data| {
                    let send = Arc::clone(&send);
                    async move { send.send(&serde_json::to_vec(&data)?).await }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in payloads.chunks(size.max(1)) {
                    let bodies = chunk
                        .iter()
                        .map(serde_json::to_vec)
                        .collect::<Result<Vec<_>, _>>()?;
                    let sends = bodies.iter().map(|b| send.send(b));
                    for sent in futures::future::join_all(sends).await {
                        sent?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let consumer = match self.halves.as_mut().ok_or("omniqueue: not set up")? {
            Halves::Redis(_, consumer) => consumer.take().map(Receiver::Redis),
            Halves::Amqp(_, consumer) => consumer.take().map(Receiver::Amqp),
        };
        let mut consumer = consumer.ok_or("omniqueue: the consumer is taken")?;
        self.task = Some(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            loop {
                // Room for a whole batch before the next receive, as the Bus's handlers.
                while acks.len() >= CONCURRENCY {
                    acks.next().await;
                }
                let batch = match consumer.receive_all(CONCURRENCY - acks.len()).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        eprintln!("omniqueue loop: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                for delivery in batch {
                    recorder.received(decode(delivery.borrow_payload().unwrap_or_default()));
                    acks.push(async move {
                        if let Err((e, _)) = delivery.ack().await {
                            eprintln!("omniqueue loop: ack failed: {e}");
                        }
                    });
                }
                // Acks that are done make room without waiting for a full window.
                while let Some(Some(())) = futures::FutureExt::now_or_never(acks.next()) {}
            }
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.halves = None;
        let (first, second) = std::mem::take(&mut self.names);
        match &self.broker {
            Broker::Redis(url) => {
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("DEL")
                    .arg(&first)
                    .arg(format!("{first}:delayed"))
                    .arg(format!("{first}_processing"))
                    .query_async::<redis::Value>(&mut conn)
                    .await?;
            }
            Broker::Amqp(url) => {
                let admin = Self::amqp_admin(url).await?;
                super::raw_amqp::delete(&admin, &first, &second).await?;
                admin.close(200, "OK".into()).await?;
            }
        }
        Ok(())
    }
}

enum Sender {
    Redis(Arc<RedisProducer<RedisConnectionManager>>),
    Amqp(Arc<RabbitMqProducer>),
}

impl Sender {
    async fn send(&self, bytes: &[u8]) -> Result<()> {
        match self {
            Sender::Redis(p) => p.send_raw(bytes).await?,
            Sender::Amqp(p) => p.send_raw(bytes).await?,
        }
        Ok(())
    }
}

enum Receiver {
    Redis(RedisConsumer<RedisConnectionManager>),
    Amqp(RabbitMqConsumer),
}

impl Receiver {
    async fn receive_all(&mut self, max: usize) -> omniqueue::Result<Vec<omniqueue::Delivery>> {
        match self {
            Receiver::Redis(c) => c.receive_all(max.max(1), RECEIVE_WAIT).await,
            Receiver::Amqp(c) => c.receive_all(max.max(1), RECEIVE_WAIT).await,
        }
    }
}
