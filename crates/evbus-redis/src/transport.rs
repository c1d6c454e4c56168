//! [`RedisTransport`]: one connection to one Redis server, the factory for topics and queues.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use evbus::raw::Gate;
use evbus::{Capabilities, Event, Health, Queue, Result, Topic, Transport};
use redis::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::RedisConfig;
use crate::connection::{self, RedisClient, RedisConn};
use crate::error::from_redis;
use crate::keys::{Keys, StreamKeys, check_destination};
use crate::publisher::{RedisQueue, RedisTopic};

/// A transport on a Redis server or a Redis Cluster (Redis 6.2 or later), through Redis
/// Streams.
///
/// Cheap to clone: clones share the connection and its lifecycle (closing one closes all).
///
/// ```no_run
/// use evbus::{Event, SubscribeOptions, Transport};
/// use evbus_redis::{RedisConfig, RedisTransport};
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> evbus::Result<()> {
/// let transport = RedisTransport::connect(RedisConfig::from_url("redis://127.0.0.1:6379")?).await?;
/// let topic = transport.topic("orders").await?;
/// let mut billing = topic.subscribe(SubscribeOptions::named("billing")).await?;
/// topic.publish(&Event::builder("afterOrderCreate", "/shop").json(&1)?.build()?).await?;
/// let delivery = billing.next().await.expect("a delivery")?;
/// delivery.ack().await?;
/// transport.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisTransport {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.gate.is_closed())
            .finish_non_exhaustive()
    }
}

/// State shared by a transport, its topics, queues, consumers and ack handles.
pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    pub(crate) client: RedisClient,
    conn: RedisConn,
    pub(crate) keys: Keys,
    persistent: bool,
    /// Refuses operations after close; close waits for those in progress.
    gate: Gate,
    /// Cancelled on close: consumers stop.
    pub(crate) cancel: CancellationToken,
    /// Consumer tasks, awaited on close.
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    /// Starts an operation, or fails with [`ErrorKind::Closed`](evbus::ErrorKind::Closed).
    pub(crate) fn begin(&self) -> Result<TaskTrackerToken> {
        self.gate.enter()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// A handle on the shared command connection.
    pub(crate) fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Runs a keyless command on the node holding `key` (on a cluster, the master of its
    /// slot): `CLIENT UNBLOCK` of a consumer reading that stream.
    pub(crate) async fn query_at_key(
        &self,
        cmd: &redis::Cmd,
        key: &str,
        what: &str,
    ) -> Result<Value> {
        self.conn()
            .query_at_key(cmd, key)
            .await
            .map_err(|e| from_redis(e, what))
    }

    /// Runs one command on the shared connection.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T> {
        cmd.query_async(&mut self.conn())
            .await
            .map_err(|e| from_redis(e, what))
    }

    /// Deletes the destination of `keys`, leaving its mark for [`TOMBSTONE_TTL`].
    async fn delete(&self, keys: &StreamKeys, what: &str) -> Result<()> {
        let mark = uuid::Uuid::now_v7().simple().to_string();
        crate::scripts::DELETE
            .key(&keys.stream)
            .key(&keys.delayed)
            .key(&keys.deleted)
            .arg(mark)
            .arg(TOMBSTONE_TTL.as_millis() as u64)
            .invoke_async::<Value>(&mut self.conn())
            .await
            .map_err(|e| from_redis(e, what))?;
        Ok(())
    }

    /// The mark the last deletion of the destination of `keys` left, if any.
    pub(crate) async fn deletion_mark(&self, keys: &StreamKeys) -> Result<Option<String>> {
        self.query(
            redis::cmd("GET").arg(&keys.deleted),
            "reading the deletion mark",
        )
        .await
    }

    /// Creates consumer group `group` on `stream` at `start` (`$` or `0`), creating the
    /// stream if needed. An existing group is kept as it is (it resumes where it stopped).
    pub(crate) async fn ensure_group(&self, stream: &str, group: &str, start: &str) -> Result<()> {
        let result: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if crate::error::is_busy_group(&e) => Ok(()),
            Err(e) => Err(from_redis(
                e,
                &format!("creating consumer group `{group}` on `{stream}`"),
            )),
        }
    }
}

/// How long a deletion's mark is kept: far longer than a consumer takes to find its group
/// gone (its next read, or its first after a reconnection).
pub(crate) const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

impl RedisTransport {
    /// Connects to the server `config` names and checks that it is usable (Redis 6.2 or
    /// later). Fails with a retryable [`ErrorKind::Connection`](evbus::ErrorKind::Connection)
    /// error when the server cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let client = connection::client(&config)?;
        let mut conn = connection::shared_connection(&client, &config).await?;
        let server = connection::info(&mut conn, "server").await?;
        connection::check_version(&server)?;
        let persistence = connection::info(&mut conn, "persistence").await?;
        let persistent = persistence
            .iter()
            .any(|(k, v)| k == "aof_enabled" && v == "1");
        let keys = Keys::new(&config.key_prefix);
        Ok(RedisTransport {
            shared: Arc::new(Shared {
                config,
                client,
                conn,
                keys,
                persistent,
                gate: Gate::new("the Redis transport"),
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// Connects with the settings of a `redis://`, `rediss://`, `redis+cluster://` or
    /// `rediss+cluster://` URL
    /// (see [`RedisConfig::from_url`]).
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// The settings this transport was opened with.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// The key of the stream behind topic `name` (for inspection with `redis-cli`).
    pub fn topic_key(&self, name: &str) -> String {
        self.shared.keys.topic(name).stream
    }

    /// The key of the stream behind queue `name` (for inspection with `redis-cli`).
    pub fn queue_key(&self, name: &str) -> String {
        self.shared.keys.queue(name).stream
    }

    pub(crate) fn queue_handle(&self, name: &str) -> RedisQueue {
        RedisQueue::new(name, self.clone())
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities::capabilities(&self.shared.config, self.shared.persistent)
    }

    fn check_size(&self, event: &Event) -> Result<()> {
        let config = &self.shared.config;
        crate::publisher::check_publishable(config.content_mode, config.max_payload_bytes, event)
    }

    async fn topic(&self, name: &str) -> Result<Arc<dyn Topic>> {
        let _op = self.shared.begin()?;
        check_destination("topic", name, self.shared.config.is_cluster())?;
        Ok(Arc::new(RedisTopic::new(name, self.clone())))
    }

    async fn queue(&self, name: &str) -> Result<Arc<dyn Queue>> {
        let _op = self.shared.begin()?;
        check_destination("queue", name, self.shared.config.is_cluster())?;
        Ok(Arc::new(self.queue_handle(name)))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        let _op = self.shared.begin()?;
        let keys = self.shared.keys.topic(name);
        self.shared
            .delete(&keys, &format!("deleting topic `{name}`"))
            .await
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let _op = self.shared.begin()?;
        let keys = self.shared.keys.queue(name);
        self.shared
            .delete(&keys, &format!("deleting queue `{name}`"))
            .await
    }

    async fn health(&self) -> Health {
        if self.shared.is_closed() {
            return Health::Closed;
        }
        let ping = redis::cmd("PING");
        let timeout = self.shared.config.command_timeout;
        match tokio::time::timeout(timeout, self.shared.query::<Value>(&ping, "PING")).await {
            Ok(Ok(_)) => Health::Healthy,
            Ok(Err(e)) => Health::Unhealthy(e.to_string()),
            Err(_) => Health::Unhealthy(format!("Redis did not answer PING within {timeout:?}")),
        }
    }

    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        // Flush: wait for publishes and settlements already under way.
        // Another close, at the same time or later, waits for this one to finish.
        let Some(_closing) = shared.gate.close_once().await else {
            return Ok(());
        };
        // End subscriptions: consumers give back what they fetched but did not deliver.
        shared.cancel.cancel();
        shared.tasks.close();
        let grace = shared.config.command_timeout * 2;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some Redis consumers did not stop within {grace:?}; their undelivered entries \
                 come back after their visibility timeout"
            );
        }
        Ok(())
    }
}
