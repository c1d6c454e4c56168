//! The raw Kafka loop: rdkafka driven directly with the adapter's client settings — an
//! idempotent `acks=all` `FutureProducer` (`linger.ms=2`, 5 requests in flight) awaited per
//! publish; a `StreamConsumer` in a consumer group (`fetch.wait.max.ms=100`) storing each
//! event's offset once decoded (the ack point, as the adapter acks) and committing the stored
//! offsets in the background every 50 ms — the idiomatic at-least-once pattern of rdkafka, and
//! the same cadence as the adapter, which commits the acked offsets in rounds of its 50 ms poll
//! loop rather than one commit request per event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::task::JoinHandle;

use super::{Burst, Carrier, GROUP, in_tasks};
use crate::Result;
use crate::sample::{BrokerWait, Recorder, Sample, decode};

pub(crate) struct RawKafka {
    servers: String,
    partitions: i32,
    session_timeout_ms: String,
    heartbeat_interval_ms: String,
    producer: Option<FutureProducer>,
    topic: String,
    wait: BrokerWait,
    task: Option<JoinHandle<()>>,
}

impl RawKafka {
    pub(crate) fn new(url: &str) -> Result<Self> {
        let config = evbus_kafka::KafkaConfig::from_url(url)?;
        Ok(RawKafka {
            session_timeout_ms: config.session_timeout.as_millis().to_string(),
            heartbeat_interval_ms: config.heartbeat_interval.as_millis().to_string(),
            servers: config.bootstrap_servers,
            partitions: config.partitions,
            producer: None,
            topic: String::new(),
            wait: BrokerWait::default(),
            task: None,
        })
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers)
            .set("client.id", "evbus-bench-raw")
            .set("log_level", "3");
        c
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        Ok(self.base().create()?)
    }
}

#[async_trait]
impl Carrier for RawKafka {
    async fn setup(&mut self, run: &str) -> Result<()> {
        self.topic = format!("bench-{run}-raw");
        let admin = self.admin()?;
        let topic = NewTopic::new(&self.topic, self.partitions, TopicReplication::Fixed(1));
        for r in admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?
        {
            r.map_err(|(t, e)| format!("creating {t}: {e}"))?;
        }
        let producer: FutureProducer = self
            .base()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            // The adapter's producer settings, so the ratio measures evbus, not a setting.
            .set("linger.ms", "0")
            .set("queue.buffering.max.messages", "100000")
            .create()?;
        // As the adapter does before its first publish to a new topic: the producer connects
        // and learns the topic's partitions now, not inside the timed publishes.
        let client = producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let metadata = client
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))?;
                let ready = metadata.topics().iter().any(|t| {
                    t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                });
                if ready {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(format!("raw kafka: topic `{topic}` has no partitions yet").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await??;
        self.producer = Some(producer);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        let producer = self.producer.as_ref().ok_or("raw kafka: not set up")?;
        let started = Instant::now();
        producer
            .send(
                FutureRecord::<(), _>::to(&self.topic).payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        self.wait.add(started);
        Ok(())
    }

    /// Tasks: each task awaits its own `FutureProducer::send`, so up to that many records
    /// are in flight and librdkafka batches them (the throughput pattern of rdkafka's
    /// examples). Batches: every record of a batch sent, then all awaited.
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let producer = self.producer.clone().ok_or("raw kafka: not set up")?;
        let topic = self.topic.clone();
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let (producer, topic) = (producer.clone(), topic.clone());
                    async move {
                        let bytes = serde_json::to_vec(&data)?;
                        producer
                            .send(
                                FutureRecord::<(), _>::to(&topic).payload(&bytes),
                                Duration::from_secs(30),
                            )
                            .await
                            .map_err(|(e, _)| e)?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in payloads.chunks(size.max(1)) {
                    let bodies = chunk
                        .iter()
                        .map(serde_json::to_vec)
                        .collect::<Result<Vec<_>, _>>()?;
                    let sends = bodies.iter().map(|bytes| {
                        producer.send(
                            FutureRecord::<(), _>::to(&topic).payload(bytes),
                            Duration::from_secs(30),
                        )
                    });
                    for sent in futures::future::join_all(sends).await {
                        sent.map_err(|(e, _)| e)?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let consumer: StreamConsumer = self
            .base()
            .set("group.id", format!("{GROUP}-{}", self.topic))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "50")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", &self.session_timeout_ms)
            .set("heartbeat.interval.ms", &self.heartbeat_interval_ms)
            .set("fetch.wait.max.ms", "100")
            .create()?;
        consumer.subscribe(&[&self.topic])?;
        let consumer = Arc::new(consumer);
        let wait = self.wait.clone();
        let task_consumer = Arc::clone(&consumer);
        self.task = Some(tokio::spawn(async move {
            let consumer = task_consumer;
            // The wait for the first event includes the group join, which the evbus loops
            // make before `consume` returns: not counted as waiting on the broker.
            let mut first = true;
            loop {
                let started = Instant::now();
                let message = consumer.recv().await;
                if !first {
                    wait.add(started);
                }
                first = false;
                match message {
                    Ok(m) => {
                        recorder.received(decode(m.payload().unwrap_or_default()));
                        if let Err(e) = consumer.store_offset_from_message(&m) {
                            eprintln!("raw kafka: storing the offset: {e}");
                        }
                    }
                    Err(e) => {
                        eprintln!("raw kafka: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
        // Return once partitions are assigned, as the adapter's subscribe does, so that the
        // live and latency runs start with a consumer in place on every side.
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer.assignment()?.count() == 0 {
            if Instant::now() > deadline {
                return Err("raw kafka: no partition assignment within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.producer = None;
        if !self.topic.is_empty() {
            let admin = self.admin()?;
            let _ = admin
                .delete_topics(&[&self.topic], &AdminOptions::new())
                .await;
        }
        Ok(())
    }

    fn take_broker_wait(&mut self) -> Duration {
        self.wait.take()
    }
}
