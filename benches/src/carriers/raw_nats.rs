//! The raw NATS loop: async-nats JetStream driven directly, with the adapter's stream and
//! consumer settings, batch size and acknowledgement point. What keeps the comparison fair:
//!
//! - **Same stream**: one stream per run bound to one subject, with the adapter's defaults
//!   (file storage, `limits` retention, one replica, the 2-minute duplicate window, discard
//!   old), created before the timed publishes as the adapter's stream is.
//! - **Same publish**: the JetStream context is built as the adapter builds it (its request
//!   timeout, back-pressure on in-flight PubAcks). Every publish carries a `Nats-Msg-Id` (the
//!   server's de-duplication check costs the same) and awaits its PubAck: `send_publish`, then
//!   the ack future, exactly what the adapter's pipelined batch publish does for a batch of one
//!   (`Topic::publish`, which the adapter loop calls, is that). The body is the same JSON; the
//!   raw message has no `ce-*` headers, which is the part of the adapter's cost measured.
//! - **Same consume**: a durable pull consumer (explicit acks, `DeliverPolicy::All`, the
//!   default visibility timeout as `ack_wait`, unlimited `max_deliver`, the adapter's
//!   `max_ack_pending`), created at setup as the adapter loop's subscription is; one pull
//!   request at a time of up to `min(16, fetch_batch)` messages expiring after `fetch_wait`
//!   (the adapter's batch), asked again when it is served or expires.
//! - **Same acks**: each event is double-acked (`+ACK` as a request: `AckAck`, `Ok` once the
//!   server recorded it) once decoded, up to 16 acks in flight while pulling goes on, as the
//!   Bus's handlers ack. The ack is sent with `Client::request` on the reply subject, the wire
//!   operation the adapter makes; async-nats's `Message::double_ack` would subscribe a fresh
//!   inbox per ack (two more protocol messages per event) and slow the yardstick, flattering
//!   evbus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, GROUP, in_tasks};
use crate::Result;
use crate::sample::{BrokerWait, Recorder, Sample, decode};

pub(crate) struct RawNats {
    config: evbus_nats::NatsConfig,
    client: Option<async_nats::Client>,
    js: Option<jetstream::Context>,
    stream: String,
    subject: String,
    consumer: Option<Consumer<pull::Config>>,
    published: u64,
    wait: BrokerWait,
    task: Option<JoinHandle<()>>,
}

impl RawNats {
    pub(crate) fn new(url: &str) -> Result<Self> {
        // The adapter's settings (timeouts, batch, consumer limits) from the same URL.
        let config = evbus_nats::NatsConfig::from_url(url)?;
        Ok(RawNats {
            config,
            client: None,
            js: None,
            stream: String::new(),
            subject: String::new(),
            consumer: None,
            published: 0,
            wait: BrokerWait::default(),
            task: None,
        })
    }

    /// The connection, opened on first use (once per process, as it is not timed).
    async fn connect(&mut self) -> Result<(async_nats::Client, jetstream::Context)> {
        if let (Some(client), Some(js)) = (&self.client, &self.js) {
            return Ok((client.clone(), js.clone()));
        }
        let mut options = async_nats::ConnectOptions::new()
            .name("evbus-bench-raw")
            .connection_timeout(self.config.connect_timeout)
            .request_timeout(Some(self.config.request_timeout));
        if let Some(token) = &self.config.token {
            options = options.token(token.clone());
        }
        let client = options.connect(self.config.url.as_str()).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(self.config.request_timeout)
            .backpressure_on_inflight(true)
            .build(client.clone());
        self.client = Some(client.clone());
        self.js = Some(js.clone());
        Ok((client, js))
    }
}

#[async_trait]
impl Carrier for RawNats {
    async fn setup(&mut self, run: &str) -> Result<()> {
        let (_, js) = self.connect().await?;
        self.stream = format!("EVBUS_BENCH_raw_{run}");
        self.subject = format!("evbus-bench.raw.{run}");
        let stream = js
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: 1,
                duplicate_window: self.config.duplicate_window,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(GROUP.to_owned()),
                name: Some(GROUP.to_owned()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: evbus::ConsumerOptions::default().visibility_timeout,
                max_deliver: -1,
                max_ack_pending: self.config.max_ack_pending,
                ..Default::default()
            })
            .await?;
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        let js = self.js.as_ref().ok_or("raw nats: not set up")?;
        self.published += 1;
        // Unique per process, as evbus event ids are.
        let id = format!("raw-{}-{}", self.stream, self.published);
        let message = PublishMessage::build()
            .payload(Bytes::from(bytes))
            .message_id(id);
        let started = Instant::now();
        js.send_publish(self.subject.clone(), message)
            .await?
            .await?;
        self.wait.add(started);
        Ok(())
    }

    /// Tasks: each task publishes and awaits its own PubAck on the one client. Batches:
    /// every message of a batch published, then the acks awaited together (JetStream's
    /// async-publish pattern).
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let js = self.js.clone().ok_or("raw nats: not set up")?;
        let subject = self.subject.clone();
        let first = self.published;
        self.published += payloads.len() as u64;
        // Unique per process, as evbus event ids are.
        let prefix = format!("raw-{}-", self.stream);
        let message = move |n: u64, data: &serde_json::Value| -> Result<PublishMessage> {
            Ok(PublishMessage::build()
                .payload(Bytes::from(serde_json::to_vec(data)?))
                .message_id(format!("{prefix}{n}")))
        };
        let numbered: Vec<(u64, serde_json::Value)> = (first + 1..).zip(payloads).collect();
        match burst {
            Burst::Tasks(tasks) => {
                let message = Arc::new(message);
                in_tasks(numbered, tasks, move |(n, data)| {
                    let (js, subject, message) =
                        (js.clone(), subject.clone(), Arc::clone(&message));
                    async move {
                        js.send_publish(subject, message(n, &data)?).await?.await?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in numbered.chunks(size.max(1)) {
                    let mut acks = Vec::with_capacity(chunk.len());
                    for (n, data) in chunk {
                        acks.push(js.send_publish(subject.clone(), message(*n, data)?).await?);
                    }
                    for ack in futures::future::join_all(
                        acks.into_iter().map(std::future::IntoFuture::into_future),
                    )
                    .await
                    {
                        ack?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let consumer = self.consumer.clone().ok_or("raw nats: not set up")?;
        let client = self.client.clone().ok_or("raw nats: not connected")?;
        let batch_size = CONCURRENCY.clamp(1, self.config.fetch_batch.max(1));
        let fetch_wait = self.config.fetch_wait;
        let wait = self.wait.clone();
        self.task = Some(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            let mut batch: Option<pull::Batch> = None;
            loop {
                let started = Instant::now();
                let Some(messages) = batch.as_mut() else {
                    match consumer
                        .batch()
                        .max_messages(batch_size)
                        .expires(fetch_wait)
                        .messages()
                        .await
                    {
                        Ok(b) => batch = Some(b),
                        Err(e) => {
                            eprintln!("raw nats: pull request: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    wait.add(started);
                    continue;
                };
                tokio::select! {
                    biased;
                    Some(()) = acks.next(), if !acks.is_empty() => {}
                    item = messages.next(), if acks.len() < CONCURRENCY => match item {
                        // Served in full or expired: ask again.
                        None => batch = None,
                        Some(Ok(message)) => {
                            recorder.received(decode(&message.payload));
                            let client = client.clone();
                            let reply = message.reply.clone();
                            acks.push(async move {
                                let Some(reply) = reply else {
                                    eprintln!("raw nats: a message without a reply subject");
                                    return;
                                };
                                if let Err(e) = client.request(reply, Bytes::from(AckKind::Ack)).await {
                                    eprintln!("raw nats: double ack: {e}");
                                }
                            });
                        }
                        Some(Err(e)) => {
                            eprintln!("raw nats: pulling: {e}");
                            batch = None;
                        }
                    },
                }
                wait.add(started);
            }
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.consumer = None;
        let stream = std::mem::take(&mut self.stream);
        if let (Some(js), false) = (&self.js, stream.is_empty()) {
            js.delete_stream(&stream).await?;
        }
        Ok(())
    }

    fn take_broker_wait(&mut self) -> Duration {
        self.wait.take()
    }
}
