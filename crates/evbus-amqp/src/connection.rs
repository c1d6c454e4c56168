//! Broker connections, each reconnected with backoff when it is lost, with a dedicated
//! publisher channel (publisher confirms) and an administration channel for declarations.
//! A transport has one for publishing, sending and administration, and each subscription
//! one of its own (ADR 0039): a message the client cannot parse drops the connection it is
//! delivered on, and then stalls only the subscription reading it. Topology is declared
//! again on every new connection before it is used (declarations are idempotent), and
//! consumers re-attach by themselves (see [`consumer`](crate::consumer)).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use evbus::raw::Backoff;
use evbus::{Error, ErrorKind, Result};
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::error::{from_connect, from_lapin, timeout};

/// Runs `op` within `limit`, mapping a client error with `what`.
pub(crate) async fn within<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    op: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(from_lapin(e, &what())),
        Err(_) => Err(timeout(&what(), limit)),
    }
}

/// An AMQP short string (names, content types: at most 255 bytes).
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid_config(format!(
            "{what} `{value}` is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

/// The arguments of a durable quorum queue.
pub(crate) fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// RabbitMQ's `frame_max` unless configured otherwise (`frame_max` in `rabbitmq.conf`).
const DEFAULT_FRAME_MAX: u32 = 131_072;

/// A connection (the transport's, or one subscription's), opened again when lost.
pub(crate) struct Link {
    config: AmqpConfig,
    /// The connection name RabbitMQ shows (`connection_name`), telling an operator whose
    /// connection it is.
    name: String,
    state: Mutex<LinkState>,
    generation: AtomicU64,
    /// The `frame_max` negotiated by the last connection opened (0 before the first).
    frame_max: AtomicU32,
}

struct LinkState {
    live: Option<Arc<Live>>,
    backoff: Backoff,
    /// No new connection attempt before this instant (backoff after a failure).
    retry_at: Option<Instant>,
    last_error: Option<Error>,
    closed: bool,
}

/// One open AMQP connection and what was declared on it.
pub(crate) struct Live {
    pub(crate) conn: Connection,
    pub(crate) generation: u64,
    timeout: Duration,
    publisher: Mutex<Option<Channel>>,
    /// Held by whoever hands messages to the publisher channel (see
    /// [`publishing`](Self::publishing)).
    publishing: Mutex<()>,
    admin: Mutex<Option<Channel>>,
    declared: std::sync::Mutex<HashSet<String>>,
}

impl Link {
    /// The transport's link, on the connection `first` that [`open`](Self::open) made.
    pub(crate) fn new(config: AmqpConfig, first: Live) -> Self {
        let mut link = Self::lazy(config, transport_connection_name());
        link.generation = AtomicU64::new(first.generation);
        link.frame_max = AtomicU32::new(first.conn.configuration().frame_max());
        link.state.get_mut().live = Some(Arc::new(first));
        link
    }

    /// A link that connects on first use, named `name`: a subscription's own.
    pub(crate) fn lazy(config: AmqpConfig, name: String) -> Self {
        let backoff = backoff(&config);
        Link {
            name,
            config,
            generation: AtomicU64::new(0),
            frame_max: AtomicU32::new(0),
            state: Mutex::new(LinkState {
                live: None,
                backoff,
                retry_at: None,
                last_error: None,
                closed: false,
            }),
        }
    }

    /// Opens a connection (the first one, or again after a loss). With several nodes
    /// ([`AmqpConfig::server_urls`]) each is tried in turn, starting from node `generation`
    /// modulo their number, so that a reconnection starts with the node after the previous
    /// attempt's; the first that accepts is used. Fails like the last node's attempt.
    pub(crate) async fn open(config: &AmqpConfig, name: &str, generation: u64) -> Result<Live> {
        let servers = config.server_urls()?;
        let count = servers.len();
        let first = usize::try_from(generation).unwrap_or(0) % count;
        let mut last_error = None;
        for i in 0..count {
            let server = &servers[(first + i) % count];
            match Self::open_one(config, name, server).await {
                Ok(conn) => {
                    return Ok(Live {
                        conn,
                        generation,
                        timeout: config.command_timeout,
                        publisher: Mutex::new(None),
                        publishing: Mutex::new(()),
                        admin: Mutex::new(None),
                        declared: std::sync::Mutex::new(HashSet::new()),
                    });
                }
                // A configuration error is the same on every node.
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    if count > 1 {
                        tracing::debug!(error = %e, "RabbitMQ node unreachable; trying the next");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::invalid_config("no AMQP node to connect to")))
    }

    /// One connection attempt to the node at `server` (a one-host URL).
    async fn open_one(config: &AmqpConfig, name: &str, server: &str) -> Result<Connection> {
        let what = || {
            format!(
                "connecting to RabbitMQ at `{}`",
                crate::config::redact(server)
            )
        };
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(
            config.connect_timeout,
            Connection::connect(server, properties),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => {
                let e = from_connect(e, &what());
                // The client may quote the URL: keep the password out.
                Err(
                    Error::new(e.kind(), crate::config::scrub(e.message(), server))
                        .with_retryable(e.is_retryable()),
                )
            }
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "{}: no connection within {:?} (connect_timeout); is RabbitMQ running?",
                    what(),
                    config.connect_timeout
                ),
            )),
        }
    }

    /// The largest frame the last connection opened negotiated (`frame_max`, frame header
    /// and end octet included), or RabbitMQ's default before the first.
    pub(crate) fn frame_max(&self) -> u32 {
        match self.frame_max.load(Ordering::Relaxed) {
            0 => DEFAULT_FRAME_MAX,
            n => n,
        }
    }

    /// The open connection, reconnecting if it was lost. While the broker is unreachable this
    /// fails fast with a retryable [`ErrorKind::Connection`] error: a new attempt is made
    /// only once the backoff delay after the previous failure has passed.
    pub(crate) async fn live(&self) -> Result<Arc<Live>> {
        let mut state = self.state.lock().await;
        if state.closed {
            return Err(Error::closed("the AMQP transport"));
        }
        if let Some(live) = &state.live {
            if live.is_open() {
                return Ok(Arc::clone(live));
            }
            tracing::warn!(
                broker = %self.config.redacted_url(),
                connection = %self.name,
                "the RabbitMQ connection was lost; reconnecting"
            );
            state.live = None;
        }
        if let Some(at) = state.retry_at
            && Instant::now() < at
        {
            return Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "RabbitMQ at `{}` is unreachable; reconnecting (last error: {})",
                    self.config.redacted_url(),
                    state
                        .last_error
                        .as_ref()
                        .map_or_else(|| "none".to_owned(), ToString::to_string)
                ),
            ));
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        match Self::open(&self.config, &self.name, generation).await {
            Ok(live) => {
                tracing::info!(broker = %self.config.redacted_url(), connection = %self.name, "connected to RabbitMQ");
                let live = Arc::new(live);
                self.frame_max
                    .store(live.conn.configuration().frame_max(), Ordering::Relaxed);
                state.live = Some(Arc::clone(&live));
                state.backoff.reset();
                state.retry_at = None;
                state.last_error = None;
                Ok(live)
            }
            Err(e) => {
                let delay = state.backoff.next_delay();
                state.retry_at = Some(Instant::now() + delay);
                state.last_error = Some(Error::new(e.kind(), e.message().to_owned()));
                Err(e)
            }
        }
    }

    /// The delay a consumer waits before trying to re-attach after a failure.
    pub(crate) fn backoff(&self) -> Backoff {
        backoff(&self.config)
    }

    /// Closes the connection (after the publisher channel's confirms); later calls to
    /// [`live`](Self::live) fail with [`ErrorKind::Closed`].
    pub(crate) async fn close(&self) {
        let live = {
            let mut state = self.state.lock().await;
            state.closed = true;
            state.live.take()
        };
        let Some(live) = live else { return };
        if let Some(channel) = live.publisher.lock().await.take() {
            let _ = tokio::time::timeout(live.timeout, channel.wait_for_confirms()).await;
            let _ = tokio::time::timeout(live.timeout, channel.close(200, "closing".into())).await;
        }
        if live.is_open() {
            let _ =
                tokio::time::timeout(live.timeout, live.conn.close(200, "evbus closing".into()))
                    .await;
        }
    }
}

impl Live {
    pub(crate) fn is_open(&self) -> bool {
        self.conn.status().connected()
    }

    /// The publisher channel (in confirm mode), opened again if the broker closed it.
    pub(crate) async fn publisher(&self) -> Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = within(
            self.timeout,
            || "opening the publisher channel".to_owned(),
            self.conn.create_channel(),
        )
        .await?;
        within(
            self.timeout,
            || "enabling publisher confirms".to_owned(),
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Held while messages are handed to the publisher channel (every `basic_publish` on
    /// it, up to the future it returns: the confirm is awaited after). lapin numbers a
    /// message for its confirm before it queues the message's frames, so two tasks
    /// publishing at once on one channel can reach RabbitMQ in the other order than they
    /// were numbered, and each then gets the other's confirm: a nacked event reported
    /// stored (lost) and a stored one reported refused (an outside review swapped 173 of
    /// them in 20 s, publishing 8 MiB events beside a queue that refused every publish).
    pub(crate) async fn publishing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.publishing.lock().await
    }

    /// The channel for declarations and deletions, opened again if the broker closed it.
    pub(crate) async fn admin(&self) -> Result<Channel> {
        let mut slot = self.admin.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = within(
            self.timeout,
            || "opening a channel".to_owned(),
            self.conn.create_channel(),
        )
        .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn is_declared(&self, key: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    pub(crate) fn mark_declared(&self, key: String) {
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
    }

    /// Forgets a declaration (the exchange or queue was deleted).
    fn forget(&self, key: &str) {
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Forgets the declaration of the topic exchange `exchange` and the bindings restored
    /// to it (see [`crate::transport::prepare_topic`]): it was deleted.
    pub(crate) fn forget_topic(&self, exchange: &str) {
        self.forget(&format!("x:{exchange}"));
        self.forget(&format!("b:{exchange}"));
    }

    /// Forgets the declaration of the queue `queue`: it was deleted.
    pub(crate) fn forget_queue(&self, queue: &str) {
        self.forget(&format!("q:{queue}"));
    }

    /// Declares the durable fanout exchange `exchange` (once per connection).
    pub(crate) async fn declare_exchange(&self, exchange: &str) -> Result<()> {
        let key = format!("x:{exchange}");
        if self.is_declared(&key) {
            return Ok(());
        }
        let name = short("exchange name", exchange)?;
        let channel = self.admin().await?;
        within(
            self.timeout,
            || format!("declaring exchange `{exchange}`"),
            channel.exchange_declare(
                name,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        self.mark_declared(key);
        Ok(())
    }

    /// Declares the durable quorum queue `queue` (once per connection).
    pub(crate) async fn declare_quorum_queue(&self, queue: &str) -> Result<()> {
        let key = format!("q:{queue}");
        if self.is_declared(&key) {
            return Ok(());
        }
        let name = short("queue name", queue)?;
        let channel = self.admin().await?;
        within(
            self.timeout,
            || format!("declaring quorum queue `{queue}`"),
            channel.queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                quorum_arguments(),
            ),
        )
        .await?;
        self.mark_declared(key);
        Ok(())
    }

    /// Binds `queue` to the fanout `exchange` on `channel`.
    pub(crate) async fn bind(&self, channel: &Channel, queue: &str, exchange: &str) -> Result<()> {
        within(
            self.timeout,
            || format!("binding queue `{queue}` to exchange `{exchange}`"),
            channel.queue_bind(
                short("queue name", queue)?,
                short("exchange name", exchange)?,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }
}

/// The name of a transport's own connection: `evbus-amqp/<process id>`.
pub(crate) fn transport_connection_name() -> String {
    format!("evbus-amqp/{}", std::process::id())
}

/// The name of the connection of a subscription to `queue`:
/// `evbus-amqp/<process id> consuming <queue>`.
pub(crate) fn consumer_connection_name(queue: &str) -> String {
    format!("{} consuming {queue}", transport_connection_name())
}

/// The reconnect backoff `config` asks for.
pub(crate) fn backoff(config: &AmqpConfig) -> Backoff {
    Backoff::new(config.reconnect_min_delay, config.reconnect_max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_a_short_string_are_configuration_errors() {
        assert!(short("queue name", &"q".repeat(255)).is_ok());
        let err = short("content type", &"c".repeat(256)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("255"), "{err}");
    }
}
