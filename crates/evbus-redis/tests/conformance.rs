//! The conformance suite against Redis, twice: as `redis`, writing CloudEvents binary mode
//! (the default), and as `redis-structured`, writing structured mode
//! (`content_mode=structured` added to the URL).
//!
//! Most cases run against the Redis at `EVBUS_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! The outage cases run against a `redis-server` this harness starts itself on a free port
//! with `--appendonly yes --appendfsync always` (every acknowledged write is on disk before
//! the reply), kills with SIGKILL to interrupt, and restarts on the same port and data
//! directory to resume. Without a `redis-server` binary on `PATH` those cases are reported
//! `IGNORED ...: needs broker-control`.
//!
//! Against a Redis Cluster (`EVBUS_REDIS_URL=redis+cluster://...`, `cargo xtask conformance
//! --adapter redis-cluster`) the suites report as `redis-cluster` and
//! `redis-cluster-structured`; the outage cases still run against the single servers this
//! harness starts. In container mode (`EVBUS_CONFORMANCE_IMAGE`) the suite runs once, in
//! binary mode.
//!
//! The foreign-message case writes with the `redis` client itself: an `XADD` of a plain entry
//! (no `ce_` fields) to the queue's stream, `<prefix>queue:{<name>}` as the README documents.

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::container::{self, BrokerContainer, ContainerControl, ContainerSpec};
use evbus_conformance::{BrokerControl, Harness, RawProducer, Suite};
use evbus_redis::{ContentMode, RedisConfig, RedisTransport};
use support::{RedisServer, io_error};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    match container::image_from_env() {
        Some(image) => evbus_conformance::main(|| in_containers(image)),
        None => {
            let url = std::env::var("EVBUS_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            // The whole suite in each content mode the adapter writes: binary mode (the
            // default) as `redis`, structured mode as `redis-structured`.
            let structured = with_parameter(&url, "content_mode=structured");
            Harness::new()
                .suite(move || local(url, ""))
                .suite(move || local(structured, "&content_mode=structured"))
                .run()
        }
    }
}

/// The suite against the Redis at `url`, its outage cases against a `redis-server` this
/// harness starts, connected to with `control` appended to its URL's parameters.
fn local(url: String, control: &'static str) -> Suite<RedisTransport> {
    let suite = suite(url, None);
    match RedisServer::start() {
        Ok(server) => suite.with_broker_control(Control { server, control }),
        Err(e) => {
            eprintln!("WARNING: cannot start a redis-server for the outage cases: {e}");
            suite
        }
    }
}

/// `url` with one more query parameter.
fn with_parameter(url: &str, parameter: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{parameter}")
}

/// The suite against the Redis at `url`, with a raw producer, named after the adapter and
/// its content mode. The suite keeps `container` (the broker at `url` in container mode)
/// until it is dropped, which removes it.
fn suite(url: String, container: Option<Arc<BrokerContainer>>) -> Suite<RedisTransport> {
    let raw = RawRedis::new(&url);
    let config = RedisConfig::from_url(&url);
    let cluster = config.as_ref().is_ok_and(|c| c.is_cluster());
    let structured = config
        .as_ref()
        .is_ok_and(|c| c.content_mode == ContentMode::Structured);
    let name = match (cluster, structured) {
        (false, false) => "redis",
        (false, true) => "redis-structured",
        (true, false) => "redis-cluster",
        (true, true) => "redis-cluster-structured",
    };
    let suite = Suite::new(name, move || {
        let _owned = &container;
        let url = url.clone();
        async move { RedisTransport::connect(RedisConfig::from_url(&url)?).await }
    });
    match raw {
        Ok(raw) => suite.with_raw_producer(raw),
        Err(e) => {
            eprintln!("WARNING: no raw Redis producer for the foreign-message case: {e}");
            suite
        }
    }
}

/// Container mode (`EVBUS_CONFORMANCE_IMAGE`, see `docker/redis`): one container for the
/// suite, another for the outage cases, killed with SIGKILL and started again (the image
/// syncs its append-only file on every write).
fn in_containers(image: String) -> Suite<RedisTransport> {
    let spec = ContainerSpec::new(image, 6379);
    let mut started = container::start_or_exit("redis", vec![spec.clone(), spec]);
    let controlled = started.pop().expect("two containers");
    let main = started.pop().expect("two containers");
    let url = format!("redis://127.0.0.1:{}", main.host_port());
    println!(
        "container mode: the suite runs against {} at {url}",
        main.name()
    );
    let control = ContainerControl::new(controlled, |port| async move {
        RedisTransport::connect(RedisConfig::from_url(&control_url(port))?).await
    });
    suite(url, Some(Arc::new(main))).with_broker_control(control)
}

/// The URL of the controlled broker: short timeouts and reconnection delays.
fn control_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}?reconnect_max_delay_ms=1000&command_timeout_ms=2000")
}

/// The `redis-server` of the outage cases, connected to with `control` appended to
/// [`control_url`] (the suite's content mode).
struct Control {
    server: RedisServer,
    control: &'static str,
}

#[async_trait]
impl BrokerControl for Control {
    type Transport = RedisTransport;

    async fn connect(&self) -> evbus::Result<RedisTransport> {
        let url = format!("{}{}", control_url(self.server.port()), self.control);
        RedisTransport::connect(RedisConfig::from_url(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL: no chance to write anything more. With `appendfsync always`, every write
        // Redis acknowledged is already on disk.
        self.server.kill();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        tokio::task::block_in_place(|| self.server.restart())
            .map_err(|e| io_error("restarting redis-server", e))
    }
}

/// A foreign producer: the `redis` client writing a plain stream entry, no evbus involved.
struct RawRedis {
    client: RawClient,
    /// The adapter's key prefix (`prefix` in the URL, `evbus:` by default).
    prefix: String,
}

impl RawRedis {
    fn new(url: &str) -> evbus::Result<Self> {
        let config = RedisConfig::from_url(url)?;
        let unusable = |e: redis::RedisError| {
            Error::invalid_config(format!("the raw Redis producer cannot use the URL: {e}"))
        };
        let client = if config.is_cluster() {
            RawClient::Cluster(
                redis::cluster::ClusterClient::new(config.cluster_nodes()?).map_err(unusable)?,
            )
        } else {
            RawClient::Single(redis::Client::open(config.url.as_str()).map_err(unusable)?)
        };
        Ok(RawRedis {
            client,
            prefix: config.key_prefix,
        })
    }
}

/// The raw producer's client: one server, or a cluster (routes the `XADD` by its key).
enum RawClient {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

#[async_trait]
impl RawProducer for RawRedis {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        // The README, "How evbus maps onto Redis": queue `q` is the stream `<prefix>queue:{q}`.
        let key = format!("{}queue:{{{queue}}}", self.prefix);
        let failed = |e: redis::RedisError| {
            Error::new(
                ErrorKind::Connection,
                format!("the raw Redis producer could not XADD to `{key}`: {e}"),
            )
        };
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&key).arg("*").arg("body").arg("not a cloudevent");
        let _id: String = match &self.client {
            RawClient::Single(client) => {
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(failed)?;
                xadd.query_async(&mut conn).await.map_err(failed)?
            }
            RawClient::Cluster(client) => {
                let mut conn = client.get_async_connection().await.map_err(failed)?;
                xadd.query_async(&mut conn).await.map_err(failed)?
            }
        };
        Ok(())
    }
}
