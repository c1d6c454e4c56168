//! Consuming: one channel per consumer with `basic.qos` prefetch = the in-flight limit, a
//! task that re-attaches after a lost connection, and the [`Acker`] that settles deliveries
//! (ADR 0020).
//!
//! - **Attempts travel with the message.** A retry (a `nack`, an expired visibility timeout,
//!   a subscription dropped while a delivery it handed out is unsettled) publishes a copy of
//!   the message to the consumer's own queue with the `evbus-attempts` header (the attempts
//!   made so far), waits for RabbitMQ's confirm, then acks the original. A delivery's
//!   attempt is `evbus-attempts` + 1. Between the confirm and the ack a crash leaves two
//!   copies: at-least-once, as a lost publish confirm already can. If the copy cannot be
//!   published the delivery is requeued (`basic.nack`) instead, a return: that attempt
//!   counts only if the message comes back to this consumer (see below).
//! - **Returns are not attempts.** RabbitMQ returns a message to its queue when the channel
//!   holding it goes: a consumer crashed, its connection was cut, or it only held the
//!   message in its prefetch. A quorum queue counts these returns in `x-delivery-count`,
//!   but the count cannot tell an attempt from a message that never reached a handler: when
//!   every connection of a group drops at once, RabbitMQ 3.10 hands what the first consumer
//!   returns to consumers whose own loss is still queued, which return it again, up to
//!   several times per message. So returns bound a crash loop instead: a delivery whose
//!   returns exceed `max_attempts` + [`SPARE_RETURNS`] is reported as that many deliveries,
//!   past `max_attempts`, and core dead-letters it without handing it out.
//! - **What the consumer saw itself** corrects both, per copy of a message (the
//!   `evbus-copy` header our publishers stamp, else the `message-id`; two copies of one
//!   event, left by a publish retried after a lost confirm, each have their own): a message
//!   it had handed out when its channel was lost counts one attempt more when it comes back
//!   to it, and returns of messages it had not handed out are taken off the returns.
//!   Deliveries received on a lost channel and still waiting are dropped, not handed out
//!   (RabbitMQ has requeued them), and after a loss the consumer does not re-attach while
//!   what it had handed out on the lost channel holds every in-flight slot (at most a
//!   visibility timeout): new deliveries would only wait behind deliveries nobody can
//!   settle.
//! - **Visibility timeout**: RabbitMQ has none; it requeues when a channel or connection
//!   closes. The consumer also retries every delivery handed out longer than
//!   [`ConsumerOptions::visibility_timeout`] ago and still unsettled, so a consumer that
//!   hangs or drops a delivery gives it back; settling it later fails with
//!   [`ErrorKind::Expired`]. Renewing a delivery ([`Acker::renew`]) starts its timeout
//!   over from now, unless the timeout already ran out ([`ErrorKind::Expired`]).
//! - **Dropping the subscription** retries what it handed out and did not settle, then
//!   closes its channel: RabbitMQ requeues what it held without handing it out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use evbus::raw::{Acker, RawDelivery, Source, Undecodable};
use evbus::{ConsumerOptions, Error, ErrorKind, Result, Subscription, Transport};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connection::{Link, Live, short, within};
use crate::message::{self, CopyKey};
use crate::names::{queue_tombstone, topic_tombstone};
use crate::transport::{AmqpTransport, Shared};

/// Returns (a channel lost while it held the message) a message may have beyond
/// `max_attempts` before it is dead-lettered as a crash loop. Not attempts: one mass
/// disconnect can return a message several times without any handler seeing it.
pub const SPARE_RETURNS: u32 = 10;

/// How often an anonymous subscription that received nothing looks for its topic's
/// exchange, to end when the topic was deleted (ADR 0031).
const EXISTS_CHECK: Duration = Duration::from_secs(2);

/// How often a consumer whose connection is lost again and again to a message the client
/// cannot parse logs it at error level.
const UNPARSABLE_LOG_EVERY: Duration = Duration::from_secs(10);

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

/// How a subscription starts: its first attachment, and the deletions of what it consumes
/// counted before it (see [`look_up`]).
struct Started {
    attached: Attached,
    deletions: Option<u32>,
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
    // The subscription's own connection (ADR 0039), opened by the first attach.
    let link = Arc::new(Link::lazy(
        shared.config.clone(),
        crate::connection::consumer_connection_name(target.queue()),
    ));
    let acker = Arc::new(AmqpAcker {
        shared: Arc::clone(&shared),
        state: std::sync::Mutex::default(),
        next_tag: AtomicU64::new(1),
        queue: target.queue().to_owned(),
        visibility_timeout: options.visibility_timeout,
        max_returns: options.max_attempts.saturating_add(SPARE_RETURNS),
        lost_settled: tokio::sync::Notify::new(),
        settling: tokio_util::task::TaskTracker::new(),
    });
    // A broker-side refusal that a new attempt can clear (RabbitMQ's INTERNAL_ERROR when a
    // new quorum queue is consumed while it starts, which also closes the connection) is
    // retried a few times, through the reconnection, before the subscription fails; an
    // unreachable broker still fails at once.
    // The deletions of what it consumes so far, read before it attaches: a deletion from
    // here on ends it.
    let seen = match shared.link.live().await {
        Ok(live) => deletions(&live, &target).await,
        Err(_) => None,
    };
    let mut retries = 0;
    let attached = loop {
        match attach(&shared, &link, &target, &options, 1, Declare::All).await {
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
            Err(e) => {
                link.close().await;
                return Err(e);
            }
        }
    };
    let (tx, rx) = mpsc::channel(options.max_in_flight.clamp(1, 4096));
    let done = shared.leaving.add(target.queue(), &tx);
    let task = run(
        Arc::clone(&shared),
        Arc::clone(&link),
        target,
        options,
        Arc::clone(&acker),
        Started {
            attached,
            deletions: seen,
        },
        tx,
    );
    shared.tasks.spawn(async move {
        let _done = done.drop_guard();
        task.await;
        // Its channel is closed: RabbitMQ requeued what it held.
        link.close().await;
    });
    let stream = futures::stream::unfold((rx, acker), |(mut rx, acker)| async move {
        loop {
            let item = rx.recv().await?;
            // A delivery received on a channel lost since is dropped: RabbitMQ requeued it,
            // and nothing could settle it. Otherwise the visibility timeout runs from now.
            if let Ok(raw) = &item
                && !acker.handed(raw.tag())
            {
                continue;
            }
            return Some((item, (rx, acker)));
        }
    });
    Ok(source.into_subscription(stream, dead_letter, shared.cancel.clone().cancelled_owned()))
}

/// What an attach declares of what its target needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Declare {
    /// Everything (the first attach; after a loss or a cancel that found something gone
    /// without a tombstone: deleted with another tool, or lost with RabbitMQ's definitions).
    All,
    /// Only an anonymous subscription's own queue (it died with the connection): after a
    /// loss, the look found the exchange and queue there, and declaring them would bring
    /// them back if a deletion came between the look and the attach. Gone by then, the
    /// binding or the consume fails with `NOT_FOUND`, and the next look ends the
    /// subscription.
    Own,
}

/// Opens a channel on the subscription's connection `link`, declares what `target` needs
/// (`declare`) and starts consuming.
async fn attach(
    shared: &Shared,
    link: &Link,
    target: &Target,
    options: &ConsumerOptions,
    epoch: u64,
    declare: Declare,
) -> Result<Attached> {
    let live = link.live().await?;
    let limit = live.timeout();
    let channel = within(
        limit,
        || "opening a consumer channel".to_owned(),
        live.conn.create_channel(),
    )
    .await?;
    match start(&live, &channel, shared, target, options, declare).await {
        Ok(consumer) => Ok(Attached {
            channel,
            consumer,
            epoch,
        }),
        Err(e) => {
            if e.kind() == ErrorKind::NotFound {
                // Deleted by another connection since this one declared it: the next
                // attempt declares again.
                if let Target::Named { exchange, .. } | Target::Anonymous { exchange, .. } = target
                {
                    live.forget_topic(exchange);
                }
                live.forget_queue(target.queue());
            }
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

/// What a consumer finds when it looks for what it consumes (see [`look_up`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// It is there, or the lookup could not tell: re-attach.
    There,
    /// Deleted by `delete_topic` or `delete_queue` since the subscription started or last
    /// looked (its tombstone counts more deletions): the subscription ends.
    Deleted,
    /// What it names is gone, and not by a deletion since it looked: deleted with another
    /// tool, or lost with RabbitMQ's definitions (a reset, a new node without the old one's
    /// data, which loses the tombstones too). The consumer declares everything again and
    /// re-attaches.
    Missing(&'static str),
}

/// Looks for what `target` consumes after RabbitMQ cancelled its consumer, after a lost
/// connection, or, for an anonymous subscription, after a quiet while. `seen` is the count
/// of deletions of its topic or queue (the messages of its tombstone) when the subscription
/// started or last looked; `None` when that could not be read.
///
/// `delete_topic` and `delete_queue` add a message to the tombstone of what they delete (a
/// classic queue that expires after `tombstone_ttl` unused) before deleting anything. More
/// of them than `seen`: deleted since, by evbus; the subscription ends (re-attaching would
/// declare it again, resurrecting it, and a queue nobody reads would fill). Otherwise,
/// what it reads is its topic's exchange and its queue (a named subscription), its topic's
/// exchange (an anonymous subscription: its queue is its own connection's, and deleting the
/// topic only unbinds it), or its queue; one of them gone is a loss that is not evbus's: a
/// queue or exchange deleted with stock tools (an operator clearing a queue in the
/// management UI), or a broker that came back without its definitions (and its
/// tombstones). Then the consumer declares again what it reads, as the topic's publishers
/// do (they declare the exchange after a `NotFound` and bind the queues recorded in its
/// directory) and senders do, and goes on with what is published from then on.
///
/// Counting, not the tombstone's presence, tells: a topic deleted and opened again at once
/// (or published to again, which declares its exchange) keeps its old subscriptions ended,
/// and a subscription made after a deletion is not ended by it. An expired or lost
/// tombstone starts the count over.
///
/// Anything but a plain `NOT_FOUND` (a cluster node down answers with a retryable one) is
/// not an absence; a look that cannot tell answers [`Found::There`].
async fn look_up(shared: &Shared, link: &Link, target: &Target, seen: &mut Option<u32>) -> Found {
    let Ok(live) = link.live().await else {
        return Found::There;
    };
    let Some(count) = deletions(&live, target).await else {
        return Found::There;
    };
    let deleted = seen.is_some_and(|seen| count > seen);
    *seen = Some(count);
    let gone = if deleted {
        None
    } else {
        match target {
            Target::Anonymous { exchange, .. } => (exists(&live, Kind::Exchange, exchange).await
                == Some(false))
            .then_some("the topic's exchange"),
            Target::Queue { queue } => {
                (exists(&live, Kind::Queue, queue).await == Some(false)).then_some("the queue")
            }
            Target::Named { exchange, queue } => {
                if exists(&live, Kind::Queue, queue).await == Some(false) {
                    Some("the subscription's queue")
                } else if exists(&live, Kind::Exchange, exchange).await == Some(false) {
                    Some("the topic's exchange")
                } else {
                    None
                }
            }
        }
    };
    let found = match (deleted, gone) {
        (true, _) => Found::Deleted,
        (false, Some(what)) => Found::Missing(what),
        (false, None) => return Found::There,
    };
    // What this connection remembers declaring is gone: declared again when missing, and
    // a queue deleted with its topic is no longer this transport's record to keep.
    match target {
        Target::Anonymous { exchange, .. } => live.forget_topic(exchange),
        Target::Queue { queue } => live.forget_queue(queue),
        Target::Named { exchange, queue } => {
            live.forget_topic(exchange);
            live.forget_queue(queue);
            // Recorded again in the topic's directory by the attach that declares it again
            // (the directory may be gone with it).
            shared.forget_recorded(queue);
        }
    }
    found
}

/// What [`exists`] looks up.
#[derive(Clone, Copy)]
enum Kind {
    Exchange,
    Queue,
}

/// Whether the exchange or queue `name` exists (a passive declare): `None` when the lookup
/// failed otherwise than with `NOT_FOUND`.
async fn look(live: &Live, kind: Kind, name: &str) -> Option<Option<u32>> {
    // A failed passive declare closes its channel: a channel of its own.
    let channel = within(
        live.timeout(),
        || "opening a channel".to_owned(),
        live.conn.create_channel(),
    )
    .await
    .ok()?;
    let looked = match kind {
        Kind::Exchange => match short("exchange name", name) {
            Ok(short_name) => within(
                live.timeout(),
                || format!("looking up exchange `{name}`"),
                channel.exchange_declare(
                    short_name,
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await
            .map(|()| 0),
            Err(e) => Err(e),
        },
        Kind::Queue => match short("queue name", name) {
            Ok(short_name) => within(
                live.timeout(),
                || format!("looking up queue `{name}`"),
                channel.queue_declare(
                    short_name,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await
            .map(|q| q.message_count()),
            Err(e) => Err(e),
        },
    };
    let _ = tokio::time::timeout(live.timeout(), channel.close(200, "looked up".into())).await;
    match looked {
        Ok(messages) => Some(Some(messages)),
        Err(e) if e.kind() == ErrorKind::NotFound => Some(None),
        Err(_) => None,
    }
}

/// Whether `name` exists (see [`look`]); `None` when that could not be told.
async fn exists(live: &Live, kind: Kind, name: &str) -> Option<bool> {
    look(live, kind, name).await.map(|found| found.is_some())
}

/// The deletions of what `target` consumes so far: the messages in its tombstone (0 when
/// there is none); `None` when that could not be told.
pub(crate) async fn deletions(live: &Live, target: &Target) -> Option<u32> {
    let tombstone = match target {
        Target::Named { exchange, .. } | Target::Anonymous { exchange, .. } => {
            topic_tombstone(exchange)
        }
        Target::Queue { queue } => queue_tombstone(queue),
    };
    look(live, Kind::Queue, &tombstone)
        .await
        .map(|found| found.unwrap_or(0))
}

/// Sets the prefetch, declares what `target` needs on `channel` and starts consuming.
async fn start(
    live: &Live,
    channel: &Channel,
    shared: &Shared,
    target: &Target,
    options: &ConsumerOptions,
    declare: Declare,
) -> Result<Consumer> {
    let all = declare == Declare::All;
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
            if all {
                live.declare_exchange(exchange).await?;
                live.declare_quorum_queue(queue).await?;
                shared.record_subscription(live, exchange, queue).await?;
            }
            live.bind(channel, queue, exchange).await?;
        }
        Target::Anonymous { exchange, queue } => {
            if all {
                live.declare_exchange(exchange).await?;
            }
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
        Target::Queue { queue } if all => live.declare_quorum_queue(queue).await?,
        Target::Queue { .. } => {}
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

/// The consumers of one transport as a deletion of their queue sees them. A consumer whose
/// subscription was dropped may still be publishing retry copies of what it left unsettled
/// (see [`detach`]), and on RabbitMQ 3.10 a publish that meets a quorum queue being deleted
/// costs the whole connection (README, "Broker gaps"): a deletion waits for those first.
#[derive(Default)]
pub(crate) struct Leaving {
    consumers: std::sync::Mutex<Vec<Consumed>>,
}

/// One consumer task: the queue it consumes, its subscription's end of the channel (closed
/// once the subscription is dropped) and whether the task has ended.
struct Consumed {
    queue: String,
    tx: mpsc::WeakSender<Result<RawDelivery>>,
    done: CancellationToken,
}

impl Leaving {
    /// Registers a consumer task of `queue` forwarding into `tx`; the task cancels the
    /// token it is given when it ends.
    fn add(&self, queue: &str, tx: &mpsc::Sender<Result<RawDelivery>>) -> CancellationToken {
        let done = CancellationToken::new();
        let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers.retain(|c| !c.done.is_cancelled());
        consumers.push(Consumed {
            queue: queue.to_owned(),
            tx: tx.downgrade(),
            done: done.clone(),
        });
        done
    }

    /// Waits, at most `limit`, until no consumer of a queue `deleted` names is still
    /// letting go of it after its subscription was dropped.
    pub(crate) async fn wait(&self, deleted: impl Fn(&str) -> bool, limit: Duration) {
        let leaving: Vec<CancellationToken> = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| {
                deleted(&c.queue)
                    && !c.done.is_cancelled()
                    && c.tx.upgrade().is_none_or(|tx| tx.is_closed())
            })
            .map(|c| c.done.clone())
            .collect();
        if leaving.is_empty() {
            return;
        }
        let all = futures::future::join_all(leaving.iter().map(CancellationToken::cancelled));
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::debug!("a consumer still letting go of a queue being deleted after {limit:?}");
        }
    }
}

/// What a consumer logged last of its connection lost to a message the client cannot parse.
#[derive(Default)]
struct Unparsable {
    /// When the last error was logged.
    logged: Option<Instant>,
    /// Losses the same way since then, not logged.
    since: u32,
}

impl Unparsable {
    /// Logs at error level that the connection of the consumer of `queue` was lost to a
    /// frame the client could not parse: in practice a message a foreign producer wrote with
    /// a property or header name that is not UTF-8 (README, "Broker gaps"). It sits at the
    /// head of `queue` and comes back at every re-attach, so the consumer stalls until it is
    /// taken off with another tool; the errors name nothing else, so this log is where an
    /// operator learns which queue to look in. At the first loss, then at most every
    /// [`UNPARSABLE_LOG_EVERY`] (the loop re-attaches several times a second) with the count
    /// of losses in between.
    fn lost(&mut self, queue: &str, error: &dyn std::fmt::Display) {
        if self
            .logged
            .is_some_and(|at| at.elapsed() < UNPARSABLE_LOG_EVERY)
        {
            self.since += 1;
            tracing::debug!(queue, error = %error, "the consumer's RabbitMQ connection was lost to a message the client cannot parse, again");
            return;
        }
        self.logged = Some(Instant::now());
        let since = std::mem::take(&mut self.since);
        tracing::error!(
            queue,
            error = %error,
            lost_since_last_log = since,
            "the RabbitMQ connection of the consumer of queue `{queue}` was lost to a \
             message the client cannot parse (a property or header name that is not UTF-8, \
             written by a producer other than evbus). It is delivered again at every \
             re-attach: this consumer stalls until the message is taken off the queue with \
             another tool (README, \"Broker gaps\"); the transport's other subscriptions, \
             publishes and sends go on"
        );
    }
}

/// The consumer task: forwards deliveries, requeues expired ones, re-attaches after a lost
/// connection, and closes its channel when the subscription is dropped or the transport
/// closes.
async fn run(
    shared: Arc<Shared>,
    link: Arc<Link>,
    target: Target,
    options: ConsumerOptions,
    acker: Arc<AmqpAcker>,
    first: Started,
    tx: mpsc::Sender<Result<RawDelivery>>,
) {
    let Started {
        attached: first,
        deletions: mut seen,
    } = first;
    let cancel = shared.cancel.clone();
    let mut attached = Some(first);
    let mut epoch = 1;
    let mut backoff = link.backoff();
    let mut unparsable = Unparsable::default();
    // Whether the last attachment was lost to a message the client cannot parse: it comes
    // back at every attach (after whatever is ahead of it in the queue), so the re-attach
    // backoff keeps growing, up to `reconnect_max_delay`, instead of starting over at each
    // attach and reconnecting several times a second. Any other loss (an outage, a closed
    // connection) starts it over at the next attach, for a quick recovery.
    let mut poisoned = false;
    // Whether to look for what the consumer reads before it attaches again: after a lost
    // channel or connection, the topic or queue may have been deleted meanwhile (by
    // `delete_topic` or `delete_queue` elsewhere), and attaching declares it again,
    // undoing the deletion. Kept until an attach succeeds (a look that could not reach
    // RabbitMQ tells nothing).
    let mut look_first = false;
    let sweep_every =
        (options.visibility_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An anonymous subscription is not told when its topic is deleted (see [`deleted`]): it
    // looks for the exchange itself after every quiet [`EXISTS_CHECK`].
    let anonymous = matches!(target, Target::Anonymous { .. });
    let mut exists = tokio::time::interval_at(Instant::now() + EXISTS_CHECK, EXISTS_CHECK);
    exists.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = true;
    // Deliveries received and not yet forwarded to the subscription (at most a prefetch).
    let mut waiting: VecDeque<RawDelivery> = VecDeque::new();
    loop {
        let Some(current) = attached.as_mut() else {
            // What was handed out on the lost channel holds in-flight slots until it is
            // settled: while it holds them all, new deliveries could only wait behind it.
            let pause = async {
                acker
                    .settle_lost(options.max_in_flight, options.visibility_timeout)
                    .await;
                tokio::time::sleep(backoff.next_delay()).await;
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                () = pause => {}
            }
            let mut declare = Declare::All;
            if look_first {
                let found = tokio::select! {
                    _ = cancel.cancelled() => return,
                    found = look_up(&shared, &link, &target, &mut seen) => found,
                };
                match found {
                    Found::Deleted => {
                        ended(&target);
                        return;
                    }
                    Found::Missing(what) => tracing::warn!(
                        queue = target.queue(),
                        "{what} is gone, and not by `delete_topic` or `delete_queue` (its \
                         tombstone counts no new deletion): deleted with another tool, or \
                         RabbitMQ lost its definitions; declaring what the consumer reads \
                         again and re-attaching (what it held is gone)"
                    ),
                    // Found there: attached without declaring it again, so that a deletion
                    // after the look is not undone (the attach fails, and the next look
                    // ends the subscription).
                    Found::There => declare = Declare::Own,
                }
            }
            epoch += 1;
            // Raced with the close: `close` waits for this task, and an attach can take a
            // connect timeout per node and several command timeouts. Whatever it started is
            // closed with the connection below.
            let attaching = tokio::select! {
                _ = cancel.cancelled() => return,
                attaching = attach(&shared, &link, &target, &options, epoch, declare) => attaching,
            };
            match attaching {
                Ok(a) => {
                    tracing::info!(queue = target.queue(), "consumer re-attached to RabbitMQ");
                    look_first = false;
                    if !poisoned {
                        backoff.reset();
                    }
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
                detach(current, &acker, Ending::Closed).await;
                return;
            }
            _ = tx.closed() => {
                detach(current, &acker, Ending::Closed).await;
                return;
            }
            _ = sweep.tick() => acker.sweep().await,
            _ = exists.tick(), if anonymous => {
                if std::mem::replace(&mut quiet, true) {
                    match look_up(&shared, &link, &target, &mut seen).await {
                        Found::Deleted => {
                            tracing::info!(queue = target.queue(), "the subscription's topic was deleted; the subscription ends");
                            detach(current, &acker, Ending::Closed).await;
                            return;
                        }
                        // Deleted with another tool: its queue is no longer bound. Attached
                        // again, it declares the exchange and binds a queue to it.
                        Found::Missing(_) => {
                            detach(current, &acker, Ending::Lost).await;
                            waiting.clear();
                            attached = None;
                            look_first = true;
                        }
                        Found::There => {}
                    }
                }
            }
            // Forwarding waits for room without blocking the loop: a channel lost meanwhile
            // is noticed at once (what waited here is dropped; RabbitMQ requeued it).
            room = tx.reserve(), if !waiting.is_empty() => match (room, waiting.pop_front()) {
                (Ok(room), Some(raw)) => room.send(Ok(raw)),
                _ => {
                    detach(current, &acker, Ending::Closed).await;
                    return;
                }
            },
            next = current.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    quiet = false;
                    waiting.push_back(acker.raw(delivery, &current.channel, current.epoch, target.queue()));
                }
                Some(Err(e)) => {
                    poisoned = matches!(e.kind(), lapin::ErrorKind::ParsingError(_));
                    if poisoned {
                        unparsable.lost(target.queue(), &e);
                    }
                    tracing::warn!(queue = target.queue(), error = %e, "consumer lost its channel; re-attaching");
                    look_first = true;
                    detach(current, &acker, Ending::Lost).await;
                    waiting.clear();
                    attached = None;
                }
                None => {
                    poisoned = false;
                    // The channel may still be open: close it, or what it holds unsettled
                    // (and can no longer be settled) would stay there while the connection
                    // lives instead of being redelivered.
                    detach(current, &acker, Ending::Lost).await;
                    waiting.clear();
                    attached = None;
                    // Its queue may have been deleted: looked up before the next attach, as
                    // after a loss (a look that cannot reach RabbitMQ tells nothing, and is
                    // made again at every try).
                    tracing::warn!(queue = target.queue(), "RabbitMQ cancelled the consumer; looking up what it reads, then re-attaching");
                    look_first = true;
                }
            }
        }
    }
}

/// Logs the end of a consumer whose queue or topic was deleted.
fn ended(target: &Target) {
    match target {
        // No topic tells `delete_queue` from another tool, and the queue's events stop
        // being handled here for good: what is sent to it from now on waits in it for a
        // consumer that opens it again.
        Target::Queue { queue } => tracing::error!(
            queue = queue.as_str(),
            "queue `{queue}` was deleted by `delete_queue`; its consumer ends and does not \
             declare it again: open the queue and receive from it again to go on consuming"
        ),
        Target::Named { queue, .. } | Target::Anonymous { queue, .. } => tracing::info!(
            queue = queue.as_str(),
            "the subscription's topic was deleted; the subscription ends"
        ),
    }
}

/// Why a consumer lets go of its channel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The subscription was dropped or the transport closes: the channel still works.
    Closed,
    /// The channel was lost, or RabbitMQ cancelled the consumer.
    Lost,
}

/// Closes the consumer's channel: RabbitMQ requeues every delivery it held unsettled. When
/// the subscription ends on purpose, what it handed out and did not settle is retried first,
/// as a nack would: an attempt that did not finish counts (a consumer that closes on an
/// event's last attempt leaves it to be dead-lettered, not handed out once more).
async fn detach(attached: &Attached, acker: &AmqpAcker, ending: Ending) {
    let limit = acker.shared.config.command_timeout;
    if ending == Ending::Closed {
        let handed = acker.take_handed(attached.epoch);
        futures::future::join_all(handed.into_iter().map(|held| async {
            if let Err(e) = acker.retry(held).await {
                tracing::debug!(queue = %acker.queue, error = %e, "could not retry a delivery left unsettled by a closing consumer; RabbitMQ requeues it");
            }
        }))
        .await;
        // Settlements that took their delivery before `take_handed` finish on the open
        // channel (a retry's ack after its copy), then the channel closes.
        acker.settling.close();
        let _ = tokio::time::timeout(limit, acker.settling.wait()).await;
        acker.settling.reopen();
    }
    acker.lost(attached.epoch);
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
    key: Option<CopyKey>,
    /// Returns RabbitMQ counted for this message that were no attempt (see [`PerCopy`]).
    uncounted: u32,
    /// Attempts this consumer made on this copy and lost with their channel.
    handed_lost: u32,
    /// What a retry publishes again.
    properties: BasicProperties,
    body: Bytes,
}

/// Settles a consumer's deliveries; shared by all of them, told apart by their tag.
struct AmqpAcker {
    shared: Arc<Shared>,
    state: std::sync::Mutex<Holding>,
    next_tag: AtomicU64,
    /// The queue consumed, where retries are published.
    queue: String,
    /// How long a delivery handed out may stay unsettled before [`Self::sweep`] retries it.
    visibility_timeout: Duration,
    /// Returns beyond which a delivery is reported past `max_attempts` (a crash loop).
    max_returns: u32,
    /// Woken when a delivery handed out on a lost channel is settled.
    lost_settled: tokio::sync::Notify,
    /// The settlements under way: a subscription that ends waits for them before it closes
    /// its channel. A nack racing the end (a look at a dead-letter queue gives back what it
    /// held as its subscription is dropped) had published its retry copy, then found the
    /// channel closed for the original's ack, and RabbitMQ requeued the original too: a
    /// copy more in the queue at every such look.
    settling: tokio_util::task::TaskTracker,
}

/// What a consumer holds, under one lock.
#[derive(Default)]
struct Holding {
    /// Unsettled deliveries of live channels, by tag.
    held: HashMap<u64, Held>,
    /// Tags handed out on a channel that was lost since, not settled yet.
    lost: HashSet<u64>,
    /// Returns RabbitMQ counted for messages this consumer received but never handed out
    /// (they waited in its buffer when their channel was lost): taken off the returns.
    unhanded: PerCopy,
    /// Messages this consumer had handed out when their channel was lost: one attempt more.
    handed_lost: PerCopy,
}

/// A count per copy of a message, claimed when the message comes back to this consumer. A
/// message that went to another consumer never claims its entry, so the oldest go first
/// past [`PerCopy::LIMIT`].
#[derive(Default)]
struct PerCopy {
    counts: HashMap<CopyKey, u32>,
    order: VecDeque<CopyKey>,
}

impl Holding {
    /// Remembers, per copy, what RabbitMQ's return of `held` means when the message comes
    /// back to this consumer: one attempt more if it was `handed` out, else one return that
    /// was no attempt (with what the delivery had claimed of both).
    fn remember_return(&mut self, held: &Held, handed: bool) {
        let Some(key) = &held.key else {
            return;
        };
        let handed_lost = held.handed_lost.saturating_add(u32::from(handed));
        let uncounted = held.uncounted.saturating_add(u32::from(!handed));
        if handed_lost > 0 {
            self.handed_lost.add(key, handed_lost);
        }
        if uncounted > 0 {
            self.unhanded.add(key, uncounted);
        }
    }
}

impl PerCopy {
    const LIMIT: usize = 4096;

    fn add(&mut self, key: &CopyKey, n: u32) {
        if let Some(count) = self.counts.get_mut(key) {
            *count = count.saturating_add(n);
            return;
        }
        if self.order.len() >= Self::LIMIT
            && let Some(oldest) = self.order.pop_front()
        {
            self.counts.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.counts.insert(key.clone(), n);
    }

    fn take(&mut self, key: &CopyKey) -> u32 {
        // Empty but after a lost channel: no hashing per delivery then.
        if self.counts.is_empty() {
            return 0;
        }
        self.counts.remove(key).unwrap_or(0)
    }
}

impl AmqpAcker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Holding> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attempt of a delivery with `properties`: the attempts its copy carries, plus
    /// `handed_lost` (this consumer handed it out before losing its channel), plus 1, unless
    /// RabbitMQ returned it more than [`Self::max_returns`] times besides the `uncounted`
    /// returns this consumer caused without handing it out: then all its deliveries, which
    /// is past `max_attempts` (a crash loop).
    fn attempt(&self, properties: &BasicProperties, uncounted: u32, handed_lost: u32) -> u32 {
        let attempt = message::attempts_made(properties)
            .saturating_add(handed_lost)
            .saturating_add(1);
        let returns = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count"))
            .and_then(message::integer_of)
            .map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
            .saturating_sub(uncounted);
        if returns > self.max_returns {
            return attempt.saturating_add(returns).saturating_sub(handed_lost);
        }
        attempt
    }

    /// Registers `delivery` and builds what core receives.
    fn raw(
        self: &Arc<Self>,
        delivery: lapin::message::Delivery,
        channel: &Channel,
        epoch: u64,
        queue: &str,
    ) -> RawDelivery {
        let key = CopyKey::of(&delivery.properties);
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::from(delivery.data);
        let decoded = message::decode(&delivery.properties, body.clone());
        // What the placeholder of a message that is not a CloudEvent needs of its properties.
        let undecodable = decoded.is_err().then(|| {
            (
                message::undecodable_id(&delivery.properties, &body),
                message::raw_headers(&delivery.properties),
            )
        });
        let attempt = {
            let mut state = self.lock();
            let (uncounted, handed_lost) = key.as_ref().map_or((0, 0), |k| {
                (state.unhanded.take(k), state.handed_lost.take(k))
            });
            let attempt = self.attempt(&delivery.properties, uncounted, handed_lost);
            state.held.insert(
                tag,
                Held {
                    channel: channel.clone(),
                    delivery_tag: delivery.delivery_tag,
                    epoch,
                    handed: None,
                    attempt,
                    key,
                    uncounted,
                    handed_lost,
                    properties: delivery.properties,
                    body: body.clone(),
                },
            );
            attempt
        };
        let acker: Arc<dyn Acker> = Arc::clone(self) as Arc<dyn Acker>;
        match decoded {
            Ok(event) => RawDelivery::new(event, attempt, acker, tag),
            Err(error) => {
                // Logged by core as it dead-letters it (a look at a dead-letter queue leaves it).
                tracing::debug!(queue, error = %error, "a message is not a CloudEvent");
                // RabbitMQ gives a message no id of its own (delivery tags start again at 1
                // on every channel): one derived from the message, the same at every
                // delivery, so two looks at a dead-letter queue list it under one id.
                let (id, raw_headers) = undecodable.unwrap_or_default();
                let mut message = Undecodable::new(error, format!("amqp:{queue}"), id);
                for (name, value) in raw_headers {
                    message = message.header(name, value);
                }
                RawDelivery::undecodable(message.body(body), attempt, acker, tag)
            }
        }
    }

    /// Marks `tag` handed out; `false` when its channel was lost (do not hand it out).
    fn handed(&self, tag: u64) -> bool {
        match self.lock().held.get_mut(&tag) {
            Some(held) => {
                held.handed = Some(Instant::now());
                true
            }
            None => false,
        }
    }

    /// Forgets the deliveries of attachment `epoch`: its channel is gone and RabbitMQ
    /// requeues them. Those handed out are awaited (see [`Self::settle_lost`]); the others
    /// were no attempt, whatever RabbitMQ counts.
    fn lost(&self, epoch: u64) {
        let mut state = self.lock();
        let tags: Vec<u64> = state
            .held
            .iter()
            .filter(|(_, held)| held.epoch == epoch)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in tags {
            let Some(held) = state.held.remove(&tag) else {
                continue;
            };
            let handed = held.handed.is_some();
            if handed {
                state.lost.insert(tag);
            }
            state.remember_return(&held, handed);
        }
    }

    /// Waits while deliveries handed out on a lost channel hold all `slots` in-flight slots
    /// (what a new channel delivered could only wait behind them), for at most `limit`.
    async fn settle_lost(&self, slots: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let settled = self.lost_settled.notified();
            if self.lock().lost.len() < slots.max(1) {
                return;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                // Never settled (dropped unsettled, or still running): stop waiting for them.
                self.lock().lost.clear();
                return;
            }
        }
    }

    fn take(&self, tag: u64) -> Result<Held> {
        let mut state = self.lock();
        if let Some(held) = state.held.remove(&tag) {
            return Ok(held);
        }
        if state.lost.remove(&tag) {
            self.lost_settled.notify_one();
        }
        Err(Error::new(
            ErrorKind::Expired,
            "this delivery was given back to RabbitMQ (its visibility timeout passed, its \
             subscription was dropped or its channel was lost) and will be redelivered",
        ))
    }

    /// Takes out the deliveries of attachment `epoch` that were handed out and not settled.
    fn take_handed(&self, epoch: u64) -> Vec<Held> {
        let held = &mut self.lock().held;
        let tags: Vec<u64> = held
            .iter()
            .filter(|(_, h)| h.epoch == epoch && h.handed.is_some())
            .map(|(tag, _)| *tag)
            .collect();
        tags.into_iter().filter_map(|t| held.remove(&t)).collect()
    }

    /// Retries `held` after its attempt: publishes a copy carrying the attempts made so far
    /// to this consumer's queue, then acks the original once RabbitMQ confirmed the copy.
    /// If the copy cannot be published, requeues the original (that attempt counts only if
    /// the message comes back to this consumer).
    async fn retry(&self, held: Held) -> Result<()> {
        // A lost channel: RabbitMQ took the message back already.
        if held.channel.status().connected() {
            match self.publish_retry(&held).await {
                Ok(()) => {
                    return within(
                        self.shared.config.command_timeout,
                        || "acknowledging a retried delivery (basic.ack)".to_owned(),
                        held.channel
                            .basic_ack(held.delivery_tag, BasicAckOptions::default()),
                    )
                    .await;
                }
                Err(e) => tracing::warn!(
                    queue = %self.queue,
                    error = %e,
                    "could not publish the retry of a delivery; requeueing it instead (this \
                     attempt counts only if it comes back to this consumer)"
                ),
            }
        }
        self.requeue(held).await
    }

    /// Publishes the copy that retries `held` and waits for RabbitMQ's confirm.
    async fn publish_retry(&self, held: &Held) -> Result<()> {
        let live = self.shared.link.live().await?;
        let channel = live.publisher().await?;
        let what = || {
            format!(
                "publishing the retry of a delivery to queue `{}`",
                self.queue
            )
        };
        let properties =
            message::retry_properties(&held.properties, held.attempt, &self.shared.copies);
        let id = held
            .properties
            .message_id()
            .as_ref()
            .map_or("", |id| id.as_str());
        // A foreign message whose headers leave no room for the copy's is requeued instead:
        // sent, the copy would close the transport's connection.
        message::check_header_frame(id, &properties, live.conn.configuration().frame_max(), 0)?;
        let publishing = live.publishing().await;
        let confirm = within(
            live.timeout(),
            what,
            channel.basic_publish(
                "".into(),
                short("queue name", &self.queue)?,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &held.body,
                properties,
            ),
        )
        .await?;
        drop(publishing);
        let confirmation = within(live.timeout(), what, confirm).await?;
        crate::publisher::confirmed(confirmation, &what(), id)
    }

    /// Gives `held` back to RabbitMQ (`basic.nack`, requeue): for RabbitMQ a return, which
    /// counts as an attempt only if the message comes back to this consumer.
    async fn requeue(&self, held: Held) -> Result<()> {
        self.lock().remember_return(&held, true);
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

    /// Retries every delivery handed out (or renewed) more than the visibility timeout ago
    /// and still unsettled.
    async fn sweep(&self) {
        let visibility = self.visibility_timeout;
        let expired: Vec<Held> = {
            let held = &mut self.lock().held;
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
                "retrying a delivery left unsettled past its visibility timeout"
            );
            if let Err(e) = self.retry(held).await {
                // Its channel is gone: RabbitMQ requeues it anyway.
                tracing::debug!(error = %e, "could not retry an expired delivery");
            }
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        let _op = self.shared.begin()?;
        let _settling = self.settling.token();
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
        let _settling = self.settling.token();
        let held = self.take(tag)?;
        self.retry(held).await
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        let _op = self.shared.begin()?;
        // Under the lock the sweep takes expired deliveries out with: renewed here, the
        // delivery is not taken out; taken out (or due to be), it is not renewed.
        match self.lock().held.get_mut(&tag) {
            Some(held)
                if held
                    .handed
                    .is_some_and(|t| t.elapsed() < self.visibility_timeout) =>
            {
                held.handed = Some(Instant::now());
                Ok(())
            }
            _ => Err(Error::new(
                ErrorKind::Expired,
                format!(
                    "this delivery's visibility timeout ({:?}) ran out before it was renewed, \
                     or its subscription was dropped or its channel lost: it is (or is about \
                     to be) given back to RabbitMQ and redelivered",
                    self.visibility_timeout
                ),
            )),
        }
    }
}
