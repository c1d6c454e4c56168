//! Consuming: one channel per consumer with `basic.qos` prefetch = the in-flight limit, a
//! task that re-attaches after a lost connection, and the [`Acker`] that settles deliveries
//! with `basic.ack` / `basic.nack` (requeue).
//!
//! - **Attempts**: a quorum queue (named subscriptions, queues) counts returns in the
//!   `x-delivery-count` header, so attempt = `x-delivery-count` + 1 whoever held the message
//!   before. An anonymous subscription's exclusive classic queue has only this consumer, so
//!   the consumer counts its own requeues (keyed by `message-id`).
//! - **Visibility timeout**: RabbitMQ has none; it requeues when a channel or connection
//!   closes. The consumer also requeues (`basic.nack`, `requeue`) every delivery handed out
//!   longer than [`ConsumerOptions::visibility_timeout`] ago and still unsettled, so a
//!   consumer that hangs or drops a delivery gives it back; settling it later fails with
//!   [`ErrorKind::Expired`].
//! - **Dropping the subscription** closes its channel: RabbitMQ requeues what it held.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use evbus::raw::{Acker, RawDelivery, Source, Undecodable};
use evbus::{ConsumerOptions, Error, ErrorKind, Result, Subscription, Transport};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::connection::{Live, short, within};
use crate::message;
use crate::transport::{AmqpTransport, Shared};

/// What a consumer reads.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// A named subscription: a durable quorum queue bound to the topic's exchange.
    Named { exchange: String, queue: String },
    /// An anonymous subscription: an exclusive, auto-delete classic queue bound to it.
    Anonymous { exchange: String, queue: String },
    /// A queue: a durable quorum queue.
    Queue { queue: String },
}

impl Target {
    fn queue(&self) -> &str {
        match self {
            Target::Named { queue, .. }
            | Target::Anonymous { queue, .. }
            | Target::Queue { queue } => queue,
        }
    }
}

/// A consumer channel and its `basic.consume`.
struct Attached {
    channel: Channel,
    consumer: Consumer,
    /// Which attachment of this consumer (deliveries of an earlier one cannot be settled).
    epoch: u64,
}

/// Attaches a consumer for `source` on `target` and wraps it into a [`Subscription`].
pub(crate) async fn subscribe(
    transport: &AmqpTransport,
    source: Source,
    target: Target,
) -> Result<Subscription> {
    let shared = Arc::clone(&transport.shared);
    let options = source.consumer().clone();
    let dead_letter = transport.queue(source.dead_letter_queue()).await?;
    let acker = Arc::new(AmqpAcker {
        shared: Arc::clone(&shared),
        held: std::sync::Mutex::new(HashMap::new()),
        next_tag: AtomicU64::new(1),
        own_count: matches!(target, Target::Anonymous { .. }),
        requeued: std::sync::Mutex::new(HashMap::new()),
    });
    // A broker-side refusal that a new attempt can clear (RabbitMQ's INTERNAL_ERROR when a
    // new quorum queue is consumed while it starts, which also closes the connection) is
    // retried a few times, through the reconnection, before the subscription fails; an
    // unreachable broker still fails at once.
    let mut retries = 0;
    let attached = loop {
        match attach(&shared, &target, &options, 1).await {
            Ok(attached) => break attached,
            Err(e)
                if e.is_retryable()
                    && retries < 3
                    && (e.kind() == ErrorKind::Broker || retries > 0) =>
            {
                retries += 1;
                tracing::debug!(queue = target.queue(), error = %e, retries, "subscribing failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * retries)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let (tx, rx) = mpsc::channel(options.max_in_flight.clamp(1, 4096));
    let task = run(
        Arc::clone(&shared),
        target,
        options,
        Arc::clone(&acker),
        attached,
        tx,
    );
    shared.tasks.spawn(task);
    let stream = futures::stream::unfold((rx, acker), |(mut rx, acker)| async move {
        let item = rx.recv().await?;
        if let Ok(raw) = &item {
            // The visibility timeout runs from the moment the delivery is handed out.
            acker.handed(raw.tag());
        }
        Some((item, (rx, acker)))
    });
    Ok(source.into_subscription(stream, dead_letter, shared.cancel.clone().cancelled_owned()))
}

/// Opens a channel, declares what `target` needs and starts consuming.
async fn attach(
    shared: &Shared,
    target: &Target,
    options: &ConsumerOptions,
    epoch: u64,
) -> Result<Attached> {
    let live = shared.link.live().await?;
    let limit = live.timeout();
    let channel = within(
        limit,
        || "opening a consumer channel".to_owned(),
        live.conn.create_channel(),
    )
    .await?;
    match start(&live, &channel, shared, target, options).await {
        Ok(consumer) => Ok(Attached {
            channel,
            consumer,
            epoch,
        }),
        Err(e) => {
            // A command that timed out may still be carried out by RabbitMQ: a late
            // `consume-ok` would leave a consumer on this channel that nothing reads, holding
            // up to `max_in_flight` events unacknowledged for as long as the connection
            // lives. Closing the channel cancels whatever it started; RabbitMQ requeues what
            // it delivered there.
            let _ = tokio::time::timeout(limit, channel.close(200, "consumer setup failed".into()))
                .await;
            Err(e)
        }
    }
}

/// Sets the prefetch, declares what `target` needs on `channel` and starts consuming.
async fn start(
    live: &Live,
    channel: &Channel,
    shared: &Shared,
    target: &Target,
    options: &ConsumerOptions,
) -> Result<Consumer> {
    let limit = live.timeout();
    let prefetch = u16::try_from(options.max_in_flight.max(1)).unwrap_or(u16::MAX);
    within(
        limit,
        || "setting the consumer's prefetch (basic.qos)".to_owned(),
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    match target {
        Target::Named { exchange, queue } => {
            live.declare_exchange(exchange).await?;
            live.declare_quorum_queue(queue).await?;
            shared.record_subscription(live, exchange, queue).await?;
            live.bind(channel, queue, exchange).await?;
        }
        Target::Anonymous { exchange, queue } => {
            live.declare_exchange(exchange).await?;
            within(
                limit,
                || format!("declaring exclusive queue `{queue}`"),
                channel.queue_declare(
                    short("queue name", queue)?,
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            live.bind(channel, queue, exchange).await?;
        }
        Target::Queue { queue } => live.declare_quorum_queue(queue).await?,
    }
    let queue = target.queue();
    within(
        limit,
        || format!("consuming queue `{queue}`"),
        channel.basic_consume(
            short("queue name", queue)?,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// The consumer task: forwards deliveries, requeues expired ones, re-attaches after a lost
/// connection, and closes its channel when the subscription is dropped or the transport
/// closes.
async fn run(
    shared: Arc<Shared>,
    target: Target,
    options: ConsumerOptions,
    acker: Arc<AmqpAcker>,
    first: Attached,
    tx: mpsc::Sender<Result<RawDelivery>>,
) {
    let cancel = shared.cancel.clone();
    let mut attached = Some(first);
    let mut epoch = 1;
    let mut backoff = shared.link.backoff();
    let sweep_every =
        (options.visibility_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(current) = attached.as_mut() else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            epoch += 1;
            match attach(&shared, &target, &options, epoch).await {
                Ok(a) => {
                    tracing::info!(queue = target.queue(), "consumer re-attached to RabbitMQ");
                    backoff.reset();
                    attached = Some(a);
                }
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) if e.is_retryable() => {
                    tracing::debug!(queue = target.queue(), error = %e, "consumer cannot re-attach yet");
                }
                Err(e) => {
                    tracing::warn!(queue = target.queue(), error = %e, "consumer cannot re-attach");
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                }
            }
            continue;
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                detach(current, &acker).await;
                return;
            }
            _ = tx.closed() => {
                detach(current, &acker).await;
                return;
            }
            _ = sweep.tick() => acker.sweep(options.visibility_timeout).await,
            next = current.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let raw = acker.raw(delivery, &current.channel, current.epoch, target.queue());
                    tokio::select! {
                        sent = tx.send(Ok(raw)) => if sent.is_err() {
                            detach(current, &acker).await;
                            return;
                        },
                        _ = cancel.cancelled() => {
                            detach(current, &acker).await;
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = target.queue(), error = %e, "consumer lost its channel; re-attaching");
                    detach(current, &acker).await;
                    attached = None;
                }
                None => {
                    tracing::warn!(queue = target.queue(), "RabbitMQ cancelled the consumer; re-attaching");
                    // The channel may still be open: close it, or what it holds unsettled
                    // (and can no longer be settled) would stay there while the connection
                    // lives instead of being redelivered.
                    detach(current, &acker).await;
                    attached = None;
                }
            }
        }
    }
}

/// Closes the consumer's channel: RabbitMQ requeues every delivery it held unsettled.
async fn detach(attached: &Attached, acker: &AmqpAcker) {
    acker.lost(attached.epoch);
    let limit = acker.shared.config.command_timeout;
    let _ =
        tokio::time::timeout(limit, attached.channel.close(200, "consumer closed".into())).await;
}

/// One delivery handed to core and not settled yet.
struct Held {
    channel: Channel,
    delivery_tag: u64,
    epoch: u64,
    /// When core took it from the stream (the visibility timeout runs from then).
    handed: Option<Instant>,
    attempt: u32,
    key: Option<String>,
}

/// Settles a consumer's deliveries; shared by all of them, told apart by their tag.
struct AmqpAcker {
    shared: Arc<Shared>,
    held: std::sync::Mutex<HashMap<u64, Held>>,
    next_tag: AtomicU64,
    /// Whether this consumer counts requeues itself (no `x-delivery-count`).
    own_count: bool,
    /// Attempts of messages this consumer requeued, by `message-id` (`own_count` only).
    requeued: std::sync::Mutex<HashMap<String, u32>>,
}

impl AmqpAcker {
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attempt(&self, delivery: &lapin::message::Delivery, key: Option<&str>) -> u32 {
        let count = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count"))
            .and_then(message::integer_of);
        if let Some(count) = count {
            return u32::try_from(count.max(0))
                .unwrap_or(u32::MAX - 1)
                .saturating_add(1);
        }
        if !delivery.redelivered {
            return 1;
        }
        let before = key.and_then(|k| {
            self.requeued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(k)
        });
        before.map_or(2, |a| a.saturating_add(1))
    }

    /// Registers `delivery` and builds what core receives.
    fn raw(
        self: &Arc<Self>,
        delivery: lapin::message::Delivery,
        channel: &Channel,
        epoch: u64,
        queue: &str,
    ) -> RawDelivery {
        let key = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        let attempt = self.attempt(&delivery, key.as_deref());
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.lock_held().insert(
            tag,
            Held {
                channel: channel.clone(),
                delivery_tag: delivery.delivery_tag,
                epoch,
                handed: None,
                attempt,
                key,
            },
        );
        let acker: Arc<dyn Acker> = Arc::clone(self) as Arc<dyn Acker>;
        match message::decode(&delivery.properties, &delivery.data) {
            Ok(event) => RawDelivery::new(event, attempt, acker, tag),
            Err(error) => {
                tracing::warn!(queue, error = %error, "a message is not a CloudEvent; moving it to the dead-letter queue");
                let mut message = Undecodable::new(
                    error,
                    format!("amqp:{queue}"),
                    delivery.delivery_tag.to_string(),
                );
                for (name, value) in message::raw_headers(&delivery.properties) {
                    message = message.header(name, value);
                }
                RawDelivery::undecodable(message.body(delivery.data), attempt, acker, tag)
            }
        }
    }

    fn handed(&self, tag: u64) {
        if let Some(held) = self.lock_held().get_mut(&tag) {
            held.handed = Some(Instant::now());
        }
    }

    /// Forgets the deliveries of attachment `epoch`: its channel is gone and RabbitMQ
    /// requeues them.
    fn lost(&self, epoch: u64) {
        self.lock_held().retain(|_, held| held.epoch != epoch);
    }

    fn take(&self, tag: u64) -> Result<Held> {
        self.lock_held().remove(&tag).ok_or_else(|| {
            Error::new(
                ErrorKind::Expired,
                "this delivery was given back to RabbitMQ (its visibility timeout passed, its \
                 subscription was dropped or its channel was lost) and will be redelivered",
            )
        })
    }

    fn remember_requeue(&self, held: &Held) {
        if let (true, Some(key)) = (self.own_count, &held.key) {
            self.requeued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), held.attempt);
        }
    }

    async fn requeue(&self, held: Held) -> Result<()> {
        self.remember_requeue(&held);
        within(
            self.shared.config.command_timeout,
            || "requeueing a delivery (basic.nack)".to_owned(),
            held.channel.basic_nack(
                held.delivery_tag,
                BasicNackOptions {
                    requeue: true,
                    multiple: false,
                },
            ),
        )
        .await
    }

    /// Requeues every delivery handed out more than `visibility` ago and still unsettled.
    async fn sweep(&self, visibility: Duration) {
        let expired: Vec<Held> = {
            let mut held = self.lock_held();
            let tags: Vec<u64> = held
                .iter()
                .filter(|(_, h)| h.handed.is_some_and(|t| t.elapsed() >= visibility))
                .map(|(tag, _)| *tag)
                .collect();
            tags.into_iter().filter_map(|t| held.remove(&t)).collect()
        };
        for held in expired {
            tracing::debug!(
                visibility_timeout = ?visibility,
                "requeueing a delivery left unsettled past its visibility timeout"
            );
            if let Err(e) = self.requeue(held).await {
                // Its channel is gone: RabbitMQ requeues it anyway.
                tracing::debug!(error = %e, "could not requeue an expired delivery");
            }
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        let _op = self.shared.begin()?;
        let held = self.take(tag)?;
        within(
            self.shared.config.command_timeout,
            || "acknowledging a delivery (basic.ack)".to_owned(),
            held.channel
                .basic_ack(held.delivery_tag, BasicAckOptions::default()),
        )
        .await
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        let _op = self.shared.begin()?;
        let held = self.take(tag)?;
        self.requeue(held).await
    }
}
