//! [`AmqpTransport`]: one connection to one RabbitMQ broker, the factory for topics and
//! queues.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use evbus::raw::Gate;
use evbus::{Capabilities, Error, ErrorKind, Event, Health, Queue, Result, Topic, Transport};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::AmqpConfig;
use crate::connection::{Link, Live, short, within};
use crate::names::{Names, check_name, is_subscription_of, queue_tombstone, topic_tombstone};
use crate::publisher::{AmqpQueue, AmqpTopic};

/// How many times a deletion is attempted when its connection is lost under it.
const DELETE_ATTEMPTS: u32 = 3;

/// A transport on a RabbitMQ broker (3.8 or later: quorum queues), through AMQP 0-9-1.
///
/// Cheap to clone: clones share the connection and its lifecycle (closing one closes all).
///
/// ```no_run
/// use evbus::{Event, SubscribeOptions, Transport};
/// use evbus_amqp::{AmqpConfig, AmqpTransport};
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> evbus::Result<()> {
/// let transport = AmqpTransport::connect(AmqpConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?).await?;
/// let topic = transport.topic("orders").await?;
/// let mut billing = topic.subscribe(SubscribeOptions::named("billing")).await?;
/// topic.publish(&Event::builder("afterOrderCreate", "/shop").json(&1)?.build()?).await?;
/// let delivery = billing.next().await.expect("a delivery")?;
/// delivery.ack().await?;
/// transport.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpTransport {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.gate.is_closed())
            .finish_non_exhaustive()
    }
}

/// State shared by a transport, its topics, queues, consumers and ack handles.
pub(crate) struct Shared {
    pub(crate) config: AmqpConfig,
    pub(crate) link: Link,
    pub(crate) names: Names,
    /// Refuses operations after close; close waits for those in progress.
    gate: Gate,
    /// Cancelled on close: consumers stop.
    pub(crate) cancel: CancellationToken,
    /// Consumer tasks, awaited on close.
    pub(crate) tasks: TaskTracker,
    /// Consumer tasks by queue, for deletions to wait on those letting go.
    pub(crate) leaving: crate::consumer::Leaving,
    /// Subscription queues this process already recorded in their topic's directory (see
    /// [`Shared::record_subscription`]).
    recorded: std::sync::Mutex<HashSet<String>>,
    /// Numbers every message published (see [`crate::message::Copies`]).
    pub(crate) copies: crate::message::Copies,
}

impl Shared {
    /// Starts an operation, or fails with [`ErrorKind::Closed`].
    pub(crate) fn begin(&self) -> Result<TaskTrackerToken> {
        self.gate.enter()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// Records the subscription queue `queue` in the directory of its topic's exchange, so
    /// [`Transport::delete_topic`] from any process finds it (AMQP cannot list bindings).
    ///
    /// Once per queue and process: a consumer re-attaches on every new connection, and a
    /// record each time grew the directory by one message per reconnect, without end under a
    /// connection that keeps dropping. A queue recorded before is recorded again only when
    /// its topic's directory holds no record at all (a crash lost the directory, or it was
    /// deleted and declared again): a directory's records cannot be looked at one by one
    /// without taking them, and one record too many is harmless (a publisher's read removes
    /// duplicates).
    pub(crate) async fn record_subscription(
        &self,
        live: &Live,
        exchange: &str,
        queue: &str,
    ) -> Result<()> {
        let directory = directory_of(exchange);
        let records = declare_directory(live, &directory).await?;
        if records > 0
            && self
                .recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(queue)
        {
            return Ok(());
        }
        let channel = live.publisher().await?;
        let publishing = live.publishing().await;
        let confirm = within(
            live.timeout(),
            || format!("recording subscription queue `{queue}`"),
            channel.basic_publish(
                "".into(),
                short("queue name", &directory)?,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                queue.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await?;
        drop(publishing);
        let confirmation = within(
            live.timeout(),
            || format!("recording subscription queue `{queue}`"),
            confirm,
        )
        .await?;
        if !confirmation.is_ack() || confirmation.take_message().is_some() {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("RabbitMQ did not accept the directory record of queue `{queue}`"),
            )
            .with_retryable(true));
        }
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_owned());
        Ok(())
    }

    /// Forgets that `queue` was recorded in its topic's directory (the queue was deleted):
    /// the next attachment records it again.
    pub(crate) fn forget_recorded(&self, queue: &str) {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(queue);
    }
}

/// The classic queue listing the subscription queues of a topic's exchange
/// (`<exchange>_d_subscriptions`: `_d` never comes from a name, see `names`).
fn directory_of(exchange: &str) -> String {
    let mut cut = exchange.len().min(200);
    while !exchange.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_d_subscriptions", &exchange[..cut])
}

/// Makes the topic exchange `exchange` ready for publishing on `live`, once per connection:
/// declares it, then binds the subscription queues recorded in its directory to it again,
/// declaring them as their consumers do. Later publishes on the connection check one flag.
///
/// RabbitMQ keeps bindings in its metadata store, whose last writes a crash can lose
/// (RabbitMQ 3.10: Mnesia, killed within about a second of a subscription binding its
/// queue). The node then comes back with the subscription queue and its directory record
/// but not the binding: every publish to the topic would be confirmed and routed nowhere
/// until the subscription's consumer re-attaches and binds again, and for a subscription
/// whose consumer is offline, until it comes back. Every connection is new after a restart,
/// so restoring them before its first publish closes that window.
///
/// A directory whose cluster node is down, or that the publisher's user may not read, and
/// subscription queues it may not declare or bind, are logged and skipped: only a crash that
/// also lost a binding makes them matter, and publishing does not depend on them.
pub(crate) async fn prepare_topic(live: &Live, exchange: &str) -> Result<()> {
    let key = format!("b:{exchange}");
    if live.is_declared(&key) {
        return Ok(());
    }
    live.declare_exchange(exchange).await?;
    let directory = directory_of(exchange);
    // A channel of its own: reading a directory that does not exist closes the channel, and
    // closing it gives back the records it read.
    let channel = within(
        live.timeout(),
        || format!("opening a channel to read subscription directory `{directory}`"),
        live.conn.create_channel(),
    )
    .await?;
    let read = read_directory(live, &channel, exchange, Read::Keep).await;
    let _ = tokio::time::timeout(live.timeout(), channel.close(200, "directory read".into())).await;
    let queues = match read {
        Ok(queues) => queues,
        // No directory: the topic never had a named subscription.
        Err(e) if e.kind() == ErrorKind::NotFound => HashSet::new(),
        // Its cluster node is down (see `error`), or the user may not read it.
        Err(e) if e.kind() == ErrorKind::Broker => {
            tracing::warn!(exchange, error = %e, "cannot read the topic's subscription directory; its bindings are not restored on this connection");
            HashSet::new()
        }
        // A lost connection or a timeout: the publish fails (retryable) and the next one
        // tries again.
        Err(e) => return Err(e),
    };
    let admin = live.admin().await?;
    for queue in &queues {
        let restored = async {
            live.declare_quorum_queue(queue).await?;
            live.bind(&admin, queue, exchange).await
        };
        match restored.await {
            Ok(()) => {}
            // Refused (a publisher's user may not configure the subscription queues, or a
            // queue of that name has other settings): the channel is closed, and the
            // publish goes on without the rest.
            Err(e) if e.kind() == ErrorKind::Broker => {
                tracing::warn!(exchange, queue = queue.as_str(), error = %e, "cannot bind a recorded subscription queue again; the other bindings are not restored on this connection");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    live.mark_declared(key);
    Ok(())
}

/// How [`read_directory`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Reads every record and acknowledges none (the topic is being deleted): deleting the
    /// directory discards them, and closing the channel after a failed deletion gives them
    /// back for the next attempt.
    Take,
    /// Leaves one record per subscription queue, unacknowledged on the reading channel
    /// (closing it gives them back), and removes duplicates (every process that subscribes
    /// records its queue, see [`Shared::record_subscription`]) and records naming no queue
    /// of the topic.
    Keep,
}

/// The subscription queues recorded in the directory of the topic exchange `exchange`, read
/// on `channel`.
async fn read_directory(
    live: &Live,
    channel: &lapin::Channel,
    exchange: &str,
    read: Read,
) -> Result<HashSet<String>> {
    let directory = directory_of(exchange);
    let directory = directory.as_str();
    let what = || format!("reading subscription directory `{directory}`");
    let mut queues = HashSet::new();
    loop {
        let got = within(
            live.timeout(),
            what,
            channel.basic_get(
                short("queue name", directory)?,
                BasicGetOptions { no_ack: false },
            ),
        )
        .await?;
        let Some(message) = got else { break };
        let queue = String::from_utf8_lossy(&message.delivery.data).into_owned();
        // Not a subscription queue of this topic: written by someone else, never bound or
        // deleted on its say-so, and removed.
        let own = is_subscription_of(&queue, exchange);
        if !own {
            tracing::warn!(
                directory,
                queue,
                "ignoring a directory record that names no subscription queue of its topic"
            );
        }
        let kept = own && queues.insert(queue);
        if read == Read::Keep && !kept {
            within(
                live.timeout(),
                what,
                channel.basic_ack(message.delivery.delivery_tag, BasicAckOptions::default()),
            )
            .await?;
        }
    }
    Ok(queues)
}

/// Deletes queue `queue` on `channel`; what does not exist is not an error.
async fn delete_one(live: &Live, channel: &lapin::Channel, queue: &str) -> Result<()> {
    within(
        live.timeout(),
        || format!("deleting queue `{queue}`"),
        channel.queue_delete(short("queue name", queue)?, QueueDeleteOptions::default()),
    )
    .await?;
    live.forget_queue(queue);
    Ok(())
}

/// Counts a deletion in tombstone `tombstone` ([`topic_tombstone`], [`queue_tombstone`])
/// before anything is deleted: a durable classic queue that RabbitMQ drops once it has been
/// unused for `ttl` (`x-expires`, so deleted names leave nothing behind for good), holding
/// one message per deletion. A consumer compares the count with the one it started with
/// (see `consumer::look_up`): more, and it ends instead of declaring again what was
/// deleted. A user whose permissions do not cover the name cannot count it: the deletion
/// goes on, with a warning (such consumers then declare again what they read).
///
/// A tombstone declared by a service with another `tombstone_ttl` is counted in as it is:
/// RabbitMQ refuses a declaration whose arguments differ (`PRECONDITION_FAILED`), and the
/// deletion would otherwise go uncounted and be undone by the consumers.
async fn bury(live: &Live, tombstone: &str, ttl: Duration) -> Result<()> {
    let name = short("queue name", tombstone)?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
    );
    // A channel of its own: a refused declaration closes it.
    let open = || {
        within(
            live.timeout(),
            || "opening a channel".to_owned(),
            live.conn.create_channel(),
        )
    };
    let mut channel = open().await?;
    let counted = async {
        if let Err(refused) = declare_tombstone(live, &channel, tombstone, Some(&arguments)).await {
            if refused.is_retryable() {
                return Err(refused);
            }
            // There with other arguments, or not ours to declare: count in it if it is there.
            channel = open().await?;
            declare_tombstone(live, &channel, tombstone, None)
                .await
                .map_err(|_| refused)?;
        }
        within(
            live.timeout(),
            || format!("counting a deletion in tombstone queue `{tombstone}`"),
            channel.basic_publish(
                "".into(),
                name.clone(),
                BasicPublishOptions::default(),
                &[],
                lapin::BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await?;
        // A passive declare on the same channel answers once the queue has the message:
        // anyone who sees what follows (the deletions) counts it.
        declare_tombstone(live, &channel, tombstone, None).await
    }
    .await;
    if channel.status().connected() {
        let _ = tokio::time::timeout(live.timeout(), channel.close(200, "counted".into())).await;
    }
    match counted {
        Ok(_) => Ok(()),
        Err(e) if !e.is_retryable() => {
            tracing::warn!(
                tombstone,
                error = %e,
                "could not count a deletion in its tombstone (a queue): consumers whose \
                 connection is lost while it is made will declare what they read again"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Declares tombstone queue `tombstone` on `channel` with `arguments`, or passively (a
/// look-up that fails with `NotFound` when it is not there) without.
async fn declare_tombstone(
    live: &Live,
    channel: &lapin::Channel,
    tombstone: &str,
    arguments: Option<&FieldTable>,
) -> Result<()> {
    let options = QueueDeclareOptions {
        passive: arguments.is_none(),
        durable: arguments.is_some(),
        ..QueueDeclareOptions::default()
    };
    within(
        live.timeout(),
        || match arguments {
            Some(_) => format!("declaring tombstone queue `{tombstone}`"),
            None => format!("looking up tombstone queue `{tombstone}`"),
        },
        channel.queue_declare(
            short("queue name", tombstone)?,
            options,
            arguments.cloned().unwrap_or_default(),
        ),
    )
    .await
    .map(drop)
}

/// Declares the subscription directory `directory` (idempotent) and returns how many records
/// it holds ready (not those a reader holds unacknowledged).
async fn declare_directory(live: &Live, directory: &str) -> Result<u32> {
    let channel = live.admin().await?;
    let declared = within(
        live.timeout(),
        || format!("declaring subscription directory `{directory}`"),
        channel.queue_declare(
            short("queue name", directory)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(declared.message_count())
}

impl AmqpTransport {
    /// Connects to the broker `config` names. Fails with a retryable
    /// [`ErrorKind::Connection`] error when it cannot be reached, and with
    /// [`ErrorKind::InvalidConfig`] for bad settings, credentials or vhost.
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        config.validate()?;
        let first = Link::open(&config, &crate::connection::transport_connection_name(), 1).await?;
        let names = Names::new(&config.prefix);
        Ok(AmqpTransport {
            shared: Arc::new(Shared {
                link: Link::new(config.clone(), first),
                config,
                names,
                gate: Gate::new("the AMQP transport"),
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
                leaving: crate::consumer::Leaving::default(),
                recorded: std::sync::Mutex::new(HashSet::new()),
                copies: crate::message::Copies::new(),
            }),
        })
    }

    /// Connects with the settings of an `amqp://` or `amqps://` URL
    /// (see [`AmqpConfig::from_url`]).
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(AmqpConfig::from_url(url)?).await
    }

    /// The settings this transport was opened with.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// The exchange behind topic `name` (for inspection with `rabbitmqctl` or a stock client).
    pub fn exchange_name(&self, topic: &str) -> String {
        self.shared.names.exchange(topic)
    }

    /// The queue behind queue `name`.
    pub fn queue_name(&self, queue: &str) -> String {
        self.shared.names.queue(queue)
    }

    /// The queue behind the named subscription `subscription` of topic `topic`.
    pub fn subscription_queue_name(&self, topic: &str, subscription: &str) -> String {
        self.shared.names.subscription(topic, subscription)
    }

    pub(crate) fn queue_handle(&self, name: &str) -> AmqpQueue {
        AmqpQueue::new(name, self.clone())
    }

    /// Deletes the exchange `exchange`, then the subscription queues recorded in its
    /// directory (read on `reader`), then the directory.
    ///
    /// The deletion is counted in the topic's tombstone by then (`delete_topic` counts it
    /// first): a consumer whose queue is deleted under it finds one more and ends, where a
    /// queue deleted with another tool is declared again (see `consumer::look_up`). The exchange goes first, so that
    /// publishers stop reaching the queues before they go.
    async fn delete_recorded(
        &self,
        live: &Live,
        reader: &lapin::Channel,
        exchange: &str,
    ) -> Result<()> {
        let directory = directory_of(exchange);
        let queues = read_directory(live, reader, exchange, Read::Take).await?;
        self.shared
            .leaving
            .wait(|q| queues.contains(q), live.timeout())
            .await;
        let channel = live.admin().await?;
        within(
            live.timeout(),
            || format!("deleting exchange `{exchange}`"),
            channel.exchange_delete(
                short("exchange name", exchange)?,
                ExchangeDeleteOptions::default(),
            ),
        )
        .await?;
        for queue in queues
            .iter()
            .map(String::as_str)
            .chain([directory.as_str()])
        {
            delete_one(live, &channel, queue).await?;
        }
        live.forget_topic(exchange);
        self.shared
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|queue| !queues.contains(queue));
        Ok(())
    }

    /// Runs deletion `op` ("deleting queue `orders`"). Deleting is idempotent, so an attempt
    /// whose connection was lost under it is made again on a new connection, up to
    /// [`DELETE_ATTEMPTS`] in all. RabbitMQ 3.10 closes the whole connection with
    /// `INTERNAL_ERROR` when a publish on another of its channels meets a quorum queue being
    /// deleted, as when a consumer dropped just before the deletion releases its delivery by
    /// publishing a copy: that failure belongs to the publish, not to the deletion.
    async fn delete<F>(&self, what: String, op: impl Fn(Arc<Live>) -> F) -> Result<()>
    where
        F: Future<Output = Result<()>>,
    {
        let _op = self.shared.begin()?;
        let mut attempt = 1;
        loop {
            let live = self.shared.link.live().await?;
            match op(Arc::clone(&live)).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && !live.is_open() && attempt < DELETE_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "{what}: the connection was lost; deleting again");
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Error::new(e.kind(), format!("{what}: {}", e.message()))
                        .with_retryable(e.is_retryable()));
                }
            }
        }
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn name(&self) -> &str {
        "amqp"
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities::capabilities(&self.shared.config)
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        crate::publisher::check_publishable(&self.shared, event)
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let _op = self.shared.begin()?;
        check_name("topic", name)?;
        let exchange = self.shared.names.exchange(name);
        let live = self.shared.link.live().await?;
        // Opening declares again, whatever this connection remembers: another connection
        // may have deleted the topic, and opening it again is how a caller recovers from
        // the `NotFound` that follows.
        live.forget_topic(&exchange);
        live.declare_exchange(&exchange).await?;
        Ok(Arc::new(AmqpTopic::new(name, self.clone())))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        let _op = self.shared.begin()?;
        check_name("queue", name)?;
        let queue = self.shared.names.queue(name);
        let live = self.shared.link.live().await?;
        // As for a topic: another connection may have deleted the queue.
        live.forget_queue(&queue);
        live.declare_quorum_queue(&queue).await?;
        Ok(Arc::new(self.queue_handle(name)))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        let exchange = &self.shared.names.exchange(name);
        let directory = &directory_of(exchange);
        self.delete(format!("deleting topic `{name}`"), |live| async move {
            // The tombstone, then the exchange, then the subscription queues recorded in the
            // directory, then the directory (see `delete_recorded`). What does not exist is
            // not an error. The records are read on a channel of their own, unacknowledged,
            // so that a failure part way returns them.
            bury(
                &live,
                &topic_tombstone(exchange),
                self.shared.config.tombstone_ttl,
            )
            .await?;
            declare_directory(&live, directory).await?;
            let reader = within(
                live.timeout(),
                || format!("opening a channel to read subscription directory `{directory}`"),
                live.conn.create_channel(),
            )
            .await?;
            let deleted = self.delete_recorded(&live, &reader, exchange).await;
            let _ = tokio::time::timeout(live.timeout(), reader.close(200, "topic deleted".into()))
                .await;
            deleted
        })
        .await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let queue = &self.shared.names.queue(name);
        self.delete(format!("deleting queue `{name}`"), |live| async move {
            self.shared
                .leaving
                .wait(|q| q == queue, live.timeout())
                .await;
            bury(
                &live,
                &queue_tombstone(queue),
                self.shared.config.tombstone_ttl,
            )
            .await?;
            let channel = live.admin().await?;
            delete_one(&live, &channel, queue).await
        })
        .await
    }

    async fn health(&self) -> Health {
        if self.shared.is_closed() {
            return Health::Closed;
        }
        match self.shared.link.live().await {
            Ok(live) if live.is_open() => Health::Healthy,
            Ok(_) => Health::Unhealthy("the RabbitMQ connection is not open".to_owned()),
            Err(e) if e.kind() == ErrorKind::Closed => Health::Closed,
            Err(e) => Health::Unhealthy(e.to_string()),
        }
    }

    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        // Flush: wait for publishes (and their confirms) and settlements under way.
        // Another close, at the same time or later, waits for this one to finish.
        let Some(_closing) = shared.gate.close_once().await else {
            return Ok(());
        };
        // End subscriptions: consumers close their channels, and RabbitMQ requeues what
        // they held unsettled.
        shared.cancel.cancel();
        shared.tasks.close();
        let grace = shared.config.command_timeout * 2;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some AMQP consumers did not stop within {grace:?}; each closes its own \
                 connection as it stops, and RabbitMQ requeues their unsettled deliveries then"
            );
        }
        shared.link.close().await;
        Ok(())
    }
}
