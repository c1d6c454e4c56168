//! The raw AMQP loop: lapin driven directly, with the adapter's topology, publish and
//! acknowledgement point. What keeps the comparison fair:
//!
//! - **Same topology**: per run a durable fanout exchange and a durable quorum queue bound
//!   to it (the adapter's topic and named subscription), declared at setup as the adapter
//!   loop's topic and subscription are.
//! - **Same publish**: one publisher channel in confirm mode; every publish is persistent
//!   (`delivery-mode` 2, `content-type` JSON), not `mandatory` (as the adapter's topic
//!   publish), and awaits its publisher confirm (an ack from the quorum queue once it wrote
//!   the message). The body is the same JSON; the raw message has no `cloudEvents_*`
//!   headers, which is the part of the adapter's cost measured.
//! - **Same consume**: a consumer channel with `basic.qos` prefetch 16 (the adapter's
//!   in-flight limit), `basic.consume` with manual acks, one `basic.ack` per event once
//!   decoded, up to 16 acks in flight while deliveries go on, as the Bus's handlers ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, GROUP, in_tasks};
use crate::Result;
use crate::sample::{BrokerWait, Recorder, Sample, decode};

pub(crate) struct RawAmqp {
    /// The URL given to the client (the adapter's own parameters removed).
    url: String,
    conn: Option<Connection>,
    publisher: Option<Channel>,
    consumer: Option<Channel>,
    exchange: String,
    queue: String,
    wait: BrokerWait,
    task: Option<JoinHandle<()>>,
}

impl RawAmqp {
    pub(crate) fn new(url: &str) -> Result<Self> {
        let config = evbus_amqp::AmqpConfig::from_url(url)?;
        Ok(RawAmqp {
            url: config.url,
            conn: None,
            publisher: None,
            consumer: None,
            exchange: String::new(),
            queue: String::new(),
            wait: BrokerWait::default(),
            task: None,
        })
    }

    /// The connection, opened on first use (once per process, as it is not timed).
    async fn connection(&mut self) -> Result<&Connection> {
        let conn = match self.conn.take() {
            Some(conn) if conn.status().connected() => conn,
            _ => {
                let properties =
                    ConnectionProperties::default().with_connection_name("evbus-bench-raw".into());
                Connection::connect(&self.url, properties).await?
            }
        };
        Ok(self.conn.insert(conn))
    }
}

#[async_trait]
impl Carrier for RawAmqp {
    async fn setup(&mut self, run: &str) -> Result<()> {
        self.exchange = format!("evbus-bench.{run}.raw");
        self.queue = format!("evbus-bench.{run}.raw_s_{GROUP}");
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        let conn = self.connection().await?;
        declare(conn, &exchange, &queue).await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.publisher = Some(publisher);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        let channel = self.publisher.as_ref().ok_or("raw amqp: not set up")?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let started = Instant::now();
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &bytes,
                properties,
            )
            .await?
            .await?;
        self.wait.add(started);
        match confirm {
            Confirmation::Ack(_) => Ok(()),
            other => Err(format!("raw amqp: publish not confirmed: {other:?}").into()),
        }
    }

    /// Tasks: each task publishes on the one confirm-mode channel and awaits its own
    /// confirm. Batches: every message of a batch published, then the confirms awaited
    /// together (RabbitMQ's "publish in batches" confirm strategy).
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let channel = self.publisher.clone().ok_or("raw amqp: not set up")?;
        let exchange = self.exchange.clone();
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let (channel, exchange) = (channel.clone(), exchange.clone());
                    async move {
                        let confirm = publish_one(&channel, &exchange, &data).await?.await?;
                        confirmed(confirm)
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in payloads.chunks(size.max(1)) {
                    let mut confirms = Vec::with_capacity(chunk.len());
                    for data in chunk {
                        confirms.push(publish_one(&channel, &exchange, data).await?);
                    }
                    for confirm in futures::future::join_all(confirms).await {
                        confirmed(confirm?)?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let queue = self.queue.clone();
        let channel = self.connection().await?.create_channel().await?;
        channel
            .basic_qos(CONCURRENCY as u16, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.consumer = Some(channel);
        let wait = self.wait.clone();
        self.task = Some(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            loop {
                let started = Instant::now();
                tokio::select! {
                    biased;
                    Some(()) = acks.next(), if !acks.is_empty() => {}
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            recorder.received(decode(&delivery.data));
                            acks.push(async move {
                                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                                    eprintln!("raw amqp: basic.ack: {e}");
                                }
                            });
                        }
                        Some(Err(e)) => {
                            eprintln!("raw amqp: consuming: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        None => break,
                    },
                }
                wait.add(started);
            }
            while acks.next().await.is_some() {}
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(channel) = self.consumer.take() {
            let _ = channel.close(200, "OK".into()).await;
        }
        if let Some(channel) = self.publisher.take() {
            let _ = channel.close(200, "OK".into()).await;
        }
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        delete(self.connection().await?, &exchange, &queue).await
    }

    fn take_broker_wait(&mut self) -> Duration {
        self.wait.take()
    }
}

/// Publishes one persistent message; the returned future is its confirm.
async fn publish_one(
    channel: &Channel,
    exchange: &str,
    data: &serde_json::Value,
) -> Result<lapin::PublisherConfirm> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    Ok(channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(data)?,
            properties,
        )
        .await?)
}

fn confirmed(confirm: Confirmation) -> Result<()> {
    match confirm {
        Confirmation::Ack(_) => Ok(()),
        other => Err(format!("raw amqp: publish not confirmed: {other:?}").into()),
    }
}

/// Declares a durable fanout `exchange` and a durable quorum `queue` bound to it (the
/// adapter's topology for one subscription).
pub(crate) async fn declare(conn: &Connection, exchange: &str, queue: &str) -> Result<()> {
    let admin = conn.create_channel().await?;
    admin
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    admin
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            quorum,
        )
        .await?;
    admin
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    admin.close(200, "OK".into()).await?;
    Ok(())
}

/// Deletes what [`declare`] made.
pub(crate) async fn delete(conn: &Connection, exchange: &str, queue: &str) -> Result<()> {
    let admin = conn.create_channel().await?;
    admin
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    admin
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    admin.close(200, "OK".into()).await?;
    Ok(())
}
