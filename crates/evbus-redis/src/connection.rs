//! Connections: one shared, multiplexed, self-reconnecting connection for commands
//! (publish, ack, group management), and one dedicated connection per consumer for its
//! blocking reads, so a `XREADGROUP ... BLOCK` never stalls other traffic.
//!
//! On a Redis Cluster (`redis+cluster://`) both are cluster connections
//! (`redis::cluster_async::ClusterConnection`): each command goes to the master owning its
//! key's slot, `MOVED`/`ASK` redirections are followed and the slot map is refreshed after a
//! failover by the client. [`RedisConn`] hides which kind is in use, so the publisher, the
//! consumers and the scripts have one code path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use evbus::raw::Backoff;
use evbus::{Error, Result};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use crate::config::{RedisConfig, redact_url};
use crate::error::from_redis;

/// The client of one server or of a cluster (no I/O yet).
#[derive(Clone)]
pub(crate) enum RedisClient {
    Single(Client),
    Cluster(ClusterClient),
}

/// Opens the client for `config.url` (no I/O yet).
pub(crate) fn client(config: &RedisConfig) -> Result<RedisClient> {
    let opening = || format!("opening Redis client for `{}`", redact_url(&config.url));
    if config.is_cluster() {
        let nodes = config.cluster_nodes()?;
        cluster_builder(nodes, config)
            .build()
            .map(RedisClient::Cluster)
            .map_err(|e| from_redis(e, &opening()))
    } else {
        Client::open(config.url.as_str())
            .map(RedisClient::Single)
            .map_err(|e| from_redis(e, &opening()))
    }
}

fn cluster_builder(nodes: Vec<String>, config: &RedisConfig) -> ClusterClientBuilder {
    ClusterClientBuilder::new(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.command_timeout)
        // Redirections and reconnections during a failover are retried by the client within
        // the command timeout; what is left fails with a retryable error.
        .retries(8)
        .min_retry_wait(config.reconnect_min_delay.as_millis().max(1) as u64)
        .max_retry_wait(config.reconnect_max_delay.as_millis().max(1) as u64)
}

/// A connection to one server (self-reconnecting or plain) or to a cluster.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Managed(ConnectionManager),
    Direct(MultiplexedConnection),
    Cluster(HealingCluster),
}

/// The least time between two replacements of a shared cluster connection.
const CLUSTER_RESET_INTERVAL: Duration = Duration::from_secs(1);

/// A shared cluster connection that replaces itself after failover-like errors.
///
/// The cluster client refreshes its slot map on `MOVED`, but not when the master it routes
/// to is gone (it reconnects to the same address) and not when it refreshed the map just
/// before the cluster noticed the failure; a SIGKILLed master could then be retried until
/// it comes back, or forever. After a connection error, a timeout or a cluster-state error
/// (at most once per second), a new connection is opened in the background from the seed
/// nodes, with a fresh slot map, and takes over for the commands that follow.
#[derive(Clone)]
pub(crate) struct HealingCluster {
    inner: Arc<HealingInner>,
}

struct HealingInner {
    client: ClusterClient,
    conn: RwLock<ClusterConnection>,
    /// A replacement is being opened.
    resetting: AtomicBool,
    /// When the last replacement was started.
    last_reset: Mutex<Instant>,
}

impl HealingCluster {
    fn new(client: ClusterClient, conn: ClusterConnection) -> Self {
        HealingCluster {
            inner: Arc::new(HealingInner {
                client,
                conn: RwLock::new(conn),
                resetting: AtomicBool::new(false),
                last_reset: Mutex::new(Instant::now()),
            }),
        }
    }

    /// The connection in use now.
    fn current(&self) -> ClusterConnection {
        self.inner
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a replacement after `error`, if it looks like a failover.
    fn after(&self, error: &RedisError) {
        if !is_topology_error(error) {
            return;
        }
        {
            let mut last = self
                .inner
                .last_reset
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < CLUSTER_RESET_INTERVAL
                || self.inner.resetting.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Instant::now();
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            match inner.client.get_async_connection().await {
                Ok(conn) => {
                    *inner.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                    tracing::debug!("replaced the shared Redis Cluster connection after an error");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not reopen the Redis Cluster connection")
                }
            }
            inner.resetting.store(false, Ordering::Release);
        });
    }

    async fn route_command(&self, cmd: &Cmd, routing: RoutingInfo) -> RedisResult<Value> {
        let result = self.current().route_command(cmd.clone(), routing).await;
        if let Err(e) = &result {
            self.after(e);
        }
        result
    }
}

/// Whether `error` can mean that the client's slot map is out of date (a failover).
fn is_topology_error(error: &RedisError) -> bool {
    use redis::ErrorKind as K;
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || matches!(
            error.kind(),
            K::ClusterConnectionNotFound
                | K::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::Moved
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
}

impl ConnectionLike for HealingCluster {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut conn = self.current();
        Box::pin(async move {
            let result = conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.after(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = self.current();
        Box::pin(async move {
            let result = conn.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &result {
                self.after(e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Managed(c) => c.req_packed_command(cmd),
            RedisConn::Direct(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Direct(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Managed(c) => c.get_db(),
            RedisConn::Direct(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Runs a keyless `cmd` on the node holding `key` (the master of its slot on a cluster;
    /// the server otherwise): `CLIENT ID`, `CLIENT UNBLOCK`, `WAIT`.
    pub(crate) async fn query_at_key(&mut self, cmd: &Cmd, key: &str) -> RedisResult<Value> {
        match self {
            RedisConn::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
            }
            other => cmd.query_async(other).await,
        }
    }

    /// Runs a keyless `cmd` on one server (a master chosen at random on a cluster): `INFO`.
    pub(crate) async fn query_one_node(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            RedisConn::Cluster(c) => {
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                )
                .await
            }
            other => cmd.query_async(other).await,
        }
    }
}

/// Connects the shared command connection. It reconnects by itself after a failure (the
/// failing command returns a retryable error; the next one uses the new connection).
pub(crate) async fn shared_connection(
    client: &RedisClient,
    config: &RedisConfig,
) -> Result<RedisConn> {
    let connecting = || format!("connecting to Redis at `{}`", redact_url(&config.url));
    match client {
        RedisClient::Single(client) => {
            let manager_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(config.command_timeout))
                .set_connection_timeout(Some(config.connect_timeout))
                .set_min_delay(config.reconnect_min_delay)
                .set_max_delay(config.reconnect_max_delay)
                .set_number_of_retries(3);
            ConnectionManager::new_with_config(client.clone(), manager_config)
                .await
                .map(RedisConn::Managed)
                .map_err(|e| from_redis(e, &connecting()))
        }
        RedisClient::Cluster(client) => client
            .get_async_connection()
            .await
            .map(|conn| RedisConn::Cluster(HealingCluster::new(client.clone(), conn)))
            .map_err(|e| from_redis(e, &connecting())),
    }
}

/// A consumer's own connection for blocking reads, reconnected on demand.
pub(crate) struct BlockingConnection {
    client: RedisClient,
    config: AsyncConnectionConfig,
    /// A cluster connection's client, with the response timeout of a blocking read.
    cluster: Option<ClusterClient>,
    /// The stream the consumer reads: on a cluster, `CLIENT ID` goes to its slot's master.
    stream: String,
    conn: Option<(RedisConn, i64)>,
}

impl BlockingConnection {
    pub(crate) fn new(client: RedisClient, config: &RedisConfig, stream: &str) -> Self {
        // A blocking read legitimately waits `block` for its reply.
        let response_timeout = config.block + config.command_timeout;
        let cluster = match &client {
            RedisClient::Cluster(_) => config.cluster_nodes().ok().and_then(|nodes| {
                cluster_builder(nodes, config)
                    .response_timeout(response_timeout)
                    .build()
                    .ok()
            }),
            RedisClient::Single(_) => None,
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        BlockingConnection {
            client,
            config,
            cluster,
            stream: stream.to_owned(),
            conn: None,
        }
    }

    /// The connection, connecting first if needed.
    pub(crate) async fn get(&mut self) -> RedisResult<&mut RedisConn> {
        if self.conn.is_none() {
            let mut conn = match (&self.client, &self.cluster) {
                (RedisClient::Single(client), _) => RedisConn::Direct(
                    client
                        .get_multiplexed_async_connection_with_config(&self.config)
                        .await?,
                ),
                (RedisClient::Cluster(client), cluster) => {
                    // Its own: the consumer opens a new one after any error anyway.
                    let client = cluster.as_ref().unwrap_or(client);
                    let conn = client.get_async_connection().await?;
                    RedisConn::Cluster(HealingCluster::new(client.clone(), conn))
                }
            };
            let mut client_id = redis::cmd("CLIENT");
            client_id.arg("ID");
            let id = conn.query_at_key(&client_id, &self.stream).await?;
            let id: i64 = redis::from_redis_value(id)?;
            self.conn = Some((conn, id));
        }
        match &mut self.conn {
            Some((conn, _)) => Ok(conn),
            None => unreachable!("connected above"),
        }
    }

    /// The server-side client id of the current connection (for `CLIENT UNBLOCK`; on a
    /// cluster, on the master of the stream's slot).
    pub(crate) fn client_id(&self) -> Option<i64> {
        self.conn.as_ref().map(|(_, id)| *id)
    }

    /// Drops the current connection; the next [`get`](Self::get) reconnects.
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }
}

/// The reconnect backoff `config` asks for.
pub(crate) fn backoff(config: &RedisConfig) -> Backoff {
    Backoff::new(config.reconnect_min_delay, config.reconnect_max_delay)
}

/// Reads `INFO <section>` into `(field, value)` pairs.
pub(crate) async fn info(conn: &mut RedisConn, section: &str) -> Result<Vec<(String, String)>> {
    let what = || format!("reading INFO {section}");
    let mut cmd = redis::cmd("INFO");
    cmd.arg(section);
    let value = conn
        .query_one_node(&cmd)
        .await
        .map_err(|e| from_redis(e, &what()))?;
    let text: String = redis::from_redis_value(value).map_err(|e| from_redis(e.into(), &what()))?;
    Ok(parse_info(&text))
}

fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// `major.minor` of a `redis_version` string.
pub(crate) fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The oldest server the adapter supports: `XPENDING ... IDLE`, exclusive ranges and
/// `XGROUP CREATECONSUMER` arrived in Redis 6.2.
pub(crate) const MIN_VERSION: (u32, u32) = (6, 2);

/// Checks the server version from `INFO server`.
pub(crate) fn check_version(info: &[(String, String)]) -> Result<()> {
    let version = info
        .iter()
        .find(|(k, _)| k == "redis_version")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match parse_version(version) {
        Some(v) if v >= MIN_VERSION => Ok(()),
        _ => Err(Error::unsupported(format!(
            "Redis {version} is too old: evbus-redis needs Redis {}.{} or later",
            MIN_VERSION.0, MIN_VERSION.1
        ))),
    }
}

/// Bytes of a bulk or simple string reply.
pub(crate) fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// A string reply as UTF-8 (lossy).
pub(crate) fn string_of(value: &Value) -> Option<String> {
    bytes_of(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// An integer reply (also accepting integers sent as strings).
pub(crate) fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_become_pairs() {
        let text = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n";
        let info = parse_info(text);
        assert_eq!(info[0], ("redis_version".to_owned(), "7.0.15".to_owned()));
        check_version(&info).unwrap();
    }

    #[test]
    fn old_servers_are_refused_with_the_needed_version() {
        let info = vec![("redis_version".to_owned(), "6.0.9".to_owned())];
        let err = check_version(&info).unwrap_err();
        assert_eq!(err.kind(), evbus::ErrorKind::Unsupported);
        assert!(err.message().contains("6.2"), "{err}");
        assert_eq!(parse_version("6.2.14"), Some((6, 2)));
        assert_eq!(parse_version("x"), None);
    }
}
