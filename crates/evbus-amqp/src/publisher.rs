//! Publishing: [`Topic::publish`] to the topic's exchange, [`Queue::send`] to the queue
//! through the default exchange, both with publisher confirms on the connection's dedicated
//! publisher channel. `Ok` means RabbitMQ confirmed the message (for a quorum queue: a
//! majority of its replicas wrote it to disk).

use async_trait::async_trait;
use evbus::{ConsumerOptions, Error, ErrorKind, Event, Result, SubscribeOptions, Subscription};
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;

use crate::connection::{short, within};
use crate::consumer::{self, Target};
use crate::message;
use crate::transport::{AmqpTransport, Shared};

/// Where a message goes.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// A topic's fanout exchange: a message no queue takes (a topic without subscriptions)
    /// is dropped by design, so it is not `mandatory`.
    Exchange(&'a str),
    /// A queue, through the default exchange: `mandatory`, so a message no queue takes
    /// (the queue was deleted) is returned and the send fails.
    Queue(&'a str),
}

/// A topic: a durable fanout exchange.
#[derive(Debug)]
pub(crate) struct AmqpTopic {
    name: String,
    exchange: String,
    transport: AmqpTransport,
}

impl AmqpTopic {
    pub(crate) fn new(name: &str, transport: AmqpTransport) -> Self {
        AmqpTopic {
            exchange: transport.shared.names.exchange(name),
            name: name.to_owned(),
            transport,
        }
    }
}

/// A queue: a durable quorum queue.
#[derive(Debug)]
pub(crate) struct AmqpQueue {
    name: String,
    queue: String,
    transport: AmqpTransport,
}

impl AmqpQueue {
    pub(crate) fn new(name: &str, transport: AmqpTransport) -> Self {
        AmqpQueue {
            queue: transport.shared.names.queue(name),
            name: name.to_owned(),
            transport,
        }
    }
}

#[async_trait]
impl evbus::Topic for AmqpTopic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        publish(
            &self.transport,
            Route::Exchange(&self.exchange),
            std::slice::from_ref(event),
            &self.name,
        )
        .await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        publish(
            &self.transport,
            Route::Exchange(&self.exchange),
            events,
            &self.name,
        )
        .await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let _op = self.transport.shared.begin()?;
        let source = evbus::raw::Source::topic(&self.name, &options)?;
        let names = &self.transport.shared.names;
        let target = match source.subscription() {
            Some(sub) => Target::Named {
                exchange: self.exchange.clone(),
                queue: names.subscription(&self.name, sub),
            },
            None => Target::Anonymous {
                exchange: self.exchange.clone(),
                queue: names.anonymous(&self.name),
            },
        };
        consumer::subscribe(&self.transport, source, target).await
    }
}

#[async_trait]
impl evbus::Queue for AmqpQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, event: &Event) -> Result<()> {
        publish(
            &self.transport,
            Route::Queue(&self.queue),
            std::slice::from_ref(event),
            &self.name,
        )
        .await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        publish(
            &self.transport,
            Route::Queue(&self.queue),
            events,
            &self.name,
        )
        .await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let _op = self.transport.shared.begin()?;
        let source = evbus::raw::Source::queue(&self.name, &options)?;
        let target = Target::Queue {
            queue: self.queue.clone(),
        };
        consumer::subscribe(&self.transport, source, target).await
    }
}

/// Refuses `event` over `limit` as `Event::encoded_len` counts it (`max_payload_bytes`).
fn check_size(event: &Event, limit: usize) -> Result<()> {
    evbus::raw::check_encoded_len("RabbitMQ", Some(limit), event)
}

/// What [`evbus::Transport::check_size`] says for `event`: what [`publish`] refuses for its
/// size (`max_payload_bytes`, and properties that do not fit a frame of the transport's
/// connection).
pub(crate) fn check_publishable(shared: &Shared, event: &Event) -> Result<()> {
    check_size(event, shared.config.max_payload_bytes)?;
    let (properties, _) = message::encode(event, &shared.copies);
    message::check_header_frame(
        event.id(),
        &properties,
        shared.link.frame_max(),
        message::RETRY_HEADER_ROOM,
    )
}

/// Publishes `events` in order, pipelined: every message is written before the first
/// confirm is awaited. `Ok` once RabbitMQ confirmed them all.
async fn publish(
    transport: &AmqpTransport,
    route: Route<'_>,
    events: &[Event],
    name: &str,
) -> Result<()> {
    let shared = &transport.shared;
    let _op = shared.begin()?;
    let what = match route {
        Route::Exchange(_) => format!("publishing to topic `{name}`"),
        Route::Queue(_) => format!("sending to queue `{name}`"),
    };
    for event in events {
        check_size(event, shared.config.max_payload_bytes)
            .map_err(|e| Error::new(e.kind(), format!("{what}: {}", e.message())))?;
    }
    if events.is_empty() {
        return Ok(());
    }
    let live = shared.link.live().await?;
    let (exchange, routing_key, mandatory) = match route {
        Route::Exchange(exchange) => {
            crate::transport::prepare_topic(&live, exchange).await?;
            (exchange, "", false)
        }
        Route::Queue(queue) => {
            live.declare_quorum_queue(queue).await?;
            ("", queue, true)
        }
    };
    let exchange = short("exchange name", exchange)?;
    let routing_key = short("queue name", routing_key)?;
    // Every message checked before any is sent: one whose properties do not fit a frame
    // leaves the whole call unpublished, as a refusal by size above does.
    let frame_max = live.conn.configuration().frame_max();
    let messages = events
        .iter()
        .map(|event| {
            let (properties, body) = message::encode(event, &shared.copies);
            message::check_header_frame(
                event.id(),
                &properties,
                frame_max,
                message::RETRY_HEADER_ROOM,
            )?;
            Ok((event, properties, body))
        })
        .collect::<Result<Vec<_>>>()?;
    let channel = live.publisher().await?;
    let mut confirms = Vec::with_capacity(events.len());
    let publishing = live.publishing().await;
    for (event, properties, body) in messages {
        let confirm = within(
            live.timeout(),
            || what.clone(),
            channel.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            ),
        )
        .await
        .inspect_err(|e| forget_if_gone(&live, e, route))?;
        confirms.push((event.id(), confirm));
    }
    drop(publishing);
    for (id, confirm) in confirms {
        let confirmation = within(live.timeout(), || what.clone(), confirm)
            .await
            .inspect_err(|e| forget_if_gone(&live, e, route))?;
        confirmed(confirmation, &what, id).inspect_err(|e| forget_if_gone(&live, e, route))?;
    }
    Ok(())
}

/// What RabbitMQ's confirm of event `id`, published for `what`, means: `Ok` once it is
/// stored, `NotFound` when a `mandatory` message was returned unroutable (its queue is gone),
/// a retryable `Broker` error for a negative confirm. Also used by consumers' retries.
pub(crate) fn confirmed(confirmation: Confirmation, what: &str, id: &str) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{what}: RabbitMQ returned event {id} as unroutable ({} {}): the queue no \
                 longer exists; open the queue again",
                returned.reply_code, returned.reply_text
            ),
        )),
        Confirmation::Nack(_) => Err(Error::new(
            ErrorKind::Broker,
            format!(
                "{what}: RabbitMQ refused event {id} (negative confirm: it could not store \
                 it, e.g. a queue length limit or a failed replica); retry later"
            ),
        )
        .with_retryable(true)),
        Confirmation::NotRequested => Err(Error::new(
            ErrorKind::Internal,
            format!("{what}: the publisher channel is not in confirm mode"),
        )),
    }
}

/// After a `NOT_FOUND`, declare the exchange (and restore its bindings) or the queue again
/// on the next publish.
fn forget_if_gone(live: &crate::connection::Live, error: &Error, route: Route<'_>) {
    if error.kind() == ErrorKind::NotFound {
        forget(live, route);
    }
}

/// Declare what `route` goes to again on the next publish: it was deleted.
fn forget(live: &crate::connection::Live, route: Route<'_>) {
    match route {
        Route::Exchange(exchange) => live.forget_topic(exchange),
        Route::Queue(queue) => live.forget_queue(queue),
    }
}
