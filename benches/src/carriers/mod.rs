//! What carries the events in each loop: the raw clients and the two evbus loops.
//!
//! Every loop implements [`Carrier`]; a measurement drives them all the same way, so the
//! loops differ only in what carries the events.

mod evbus_loops;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "peers")]
mod peer_omniqueue;
#[cfg(feature = "amqp")]
mod raw_amqp;
mod raw_memory;
#[cfg(feature = "nats")]
mod raw_nats;
mod raw_redis;
#[cfg(feature = "sql")]
mod raw_sql;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::Result;
use crate::sample::{Recorder, Sample};

pub(crate) use evbus_loops::{AdapterLoop, BusLoop};

/// Events each consumer holds at once: the Bus's default handler concurrency, used as the
/// in-flight limit (prefetch / batch size) of every loop.
pub(crate) const CONCURRENCY: usize = evbus::bus::DEFAULT_CONCURRENCY;

/// The subscription (consumer group) every loop consumes.
pub(crate) const GROUP: &str = "bench";

/// One way of carrying events from a publisher to a consumer.
#[async_trait]
pub(crate) trait Carrier: Send {
    /// Creates fresh destinations named after `run` and the subscription the consumer will
    /// read, so that events published from now on are kept for it.
    async fn setup(&mut self, run: &str) -> Result<()>;
    /// Publishes one event; returns once the broker accepted it.
    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()>;
    /// Publishes every payload (samples as JSON values, each loop serialising its own) the
    /// way a busy service does ([`Burst`]): from many tasks at once, or in batches; returns
    /// once the broker accepted all of them.
    async fn publish_burst(&mut self, payloads: Vec<serde_json::Value>, burst: Burst)
    -> Result<()>;
    /// Attaches the consumer (in a task); every event it receives is decoded and recorded.
    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()>;
    /// Stops the consumer and deletes what `setup` created.
    async fn teardown(&mut self) -> Result<()>;
    /// Time spent waiting on the broker since the last call (raw loops only; zero otherwise).
    fn take_broker_wait(&mut self) -> Duration {
        Duration::ZERO
    }
}

/// How [`Carrier::publish_burst`] publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Burst {
    /// This many tasks publish at once through one client (one `Bus`, one `Topic`), each
    /// awaiting its own publish, as the handlers of concurrent requests of a web service do.
    Tasks(usize),
    /// Batches of this many events, one batch awaited at a time (`emit_batch`,
    /// `publish_batch`, a pipeline of the raw client).
    Batch(usize),
}

/// The concurrency of the `publish-c64` rows.
pub(crate) const BURST_TASKS: usize = 64;
/// The batch size of the `publish-batch` rows.
pub(crate) const BURST_BATCH: usize = 100;

/// Runs `publish` on every item from `tasks` tasks at once, each taking the next item when
/// its previous publish returned; the first error ends the run.
pub(crate) async fn in_tasks<T, F, Fut>(items: Vec<T>, tasks: usize, publish: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let publish = Arc::new(publish);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks.max(1) {
        let (queue, publish) = (Arc::clone(&queue), Arc::clone(&publish));
        set.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                match next {
                    Some(item) => publish(item).await?,
                    None => return Ok::<(), crate::Error>(()),
                }
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    Ok(())
}

/// Connects a fresh transport for one run.
pub(crate) type Connect =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Arc<dyn evbus::Transport>>> + Send + Sync>;

/// The three loops of one adapter, in a fixed order: raw, adapter, bus.
pub(crate) struct Loops {
    pub(crate) carriers: Vec<(&'static str, Box<dyn Carrier>)>,
}

/// The loop names, in report order.
pub(crate) const LOOPS: [&str; 3] = ["raw", "adapter", "bus"];

/// The loops of `adapter` (`memory`, `redis`, `kafka`, `nats`, `amqp`, `postgres`, `sqlite`). `capacity` is the most events one
/// run keeps in flight (the in-memory capacity). With `peer`, the baseline loop (named `raw`
/// in the results) is that peer library on the same broker instead of the raw client
/// ([`PEERS`]).
pub(crate) async fn loops(adapter: &str, capacity: usize, peer: Option<&str>) -> Result<Loops> {
    let connect: Connect;
    let mut raw: Box<dyn Carrier>;
    match adapter {
        "memory" => {
            raw = Box::new(raw_memory::RawMemory::new(capacity));
            connect = Arc::new(move |_run| {
                Box::pin(async move {
                    let mut config = evbus::memory::MemoryConfig::default();
                    config.capacity = config.capacity.max(capacity);
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus::memory::MemoryBroker::new(config).connect());
                    Ok(transport)
                })
            });
        }
        // `redis-structured`: the same broker and raw loop, evbus writing CloudEvents
        // structured mode (two stream fields) instead of binary mode (one per attribute).
        "redis" | "redis-structured" => {
            let url = redis_url();
            raw = Box::new(raw_redis::RawRedis::new(&url)?);
            let structured = adapter == "redis-structured";
            connect = Arc::new(move |run| {
                let url = url.clone();
                Box::pin(async move {
                    let mut config = evbus_redis::RedisConfig::from_url(&url)?;
                    if structured {
                        config.content_mode = evbus_redis::ContentMode::Structured;
                    }
                    config.key_prefix = format!("evbus-bench:{run}:");
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_redis::RedisTransport::connect(config).await?);
                    Ok(transport)
                })
            });
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let url = kafka_url();
            raw = Box::new(kafka::RawKafka::new(&url)?);
            connect = Arc::new(move |_run| {
                let url = url.clone();
                Box::pin(async move {
                    let config = evbus_kafka::KafkaConfig::from_url(&url)?;
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_kafka::KafkaTransport::connect(config).await?);
                    Ok(transport)
                })
            });
        }
        #[cfg(feature = "nats")]
        "nats" => {
            let url = nats_url();
            raw = Box::new(raw_nats::RawNats::new(&url)?);
            connect = Arc::new(move |_run| {
                let url = url.clone();
                Box::pin(async move {
                    let mut config = evbus_nats::NatsConfig::from_url(&url)?;
                    // The bench's streams and subjects apart from any application's.
                    config.stream_prefix = "EVBUS_BENCH".to_owned();
                    config.subject_prefix = "evbus-bench".to_owned();
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_nats::NatsTransport::connect(config).await?);
                    Ok(transport)
                })
            });
        }
        #[cfg(feature = "amqp")]
        "amqp" => {
            let url = amqp_url();
            raw = Box::new(raw_amqp::RawAmqp::new(&url)?);
            connect = Arc::new(move |_run| {
                let url = url.clone();
                Box::pin(async move {
                    let mut config = evbus_amqp::AmqpConfig::from_url(&url)?;
                    // The bench's exchanges and queues apart from any application's.
                    config.prefix = "evbus-bench.".to_owned();
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_amqp::AmqpTransport::connect(config).await?);
                    Ok(transport)
                })
            });
        }
        #[cfg(feature = "sql")]
        "postgres" => {
            let url = postgres_url();
            raw = Box::new(raw_sql::RawSql::postgres(&url));
            connect = Arc::new(move |_run| {
                let url = url.clone();
                Box::pin(async move {
                    let mut config = evbus_sql::SqlConfig::from_url(&url)?;
                    // The bench's tables apart from any application's.
                    config.schema = "evbus_bench".to_owned();
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_sql::SqlTransport::connect(config).await?);
                    Ok(transport)
                })
            });
        }
        #[cfg(feature = "sql")]
        "sqlite" => {
            let dir = std::env::temp_dir().join(format!("evbus-bench-{}", std::process::id()));
            raw = Box::new(raw_sql::RawSql::sqlite(dir.join("raw")));
            connect = Arc::new(move |run| {
                let file = dir.join("adapter").join(format!("{run}.db"));
                Box::pin(async move {
                    let url = format!("sqlite://{}", file.display());
                    let transport: Arc<dyn evbus::Transport> =
                        Arc::new(evbus_sql::SqlTransport::connect_url(&url).await?);
                    Ok(transport)
                })
            });
        }
        other => return Err(format!("unknown adapter `{other}`").into()),
    }
    match (peer, adapter) {
        (Some(raw_redis::SAME_FIELDS), "redis") => {
            raw = Box::new(raw_redis::RawRedis::with_cloudevents_fields(&redis_url())?);
        }
        (Some(peer), _) => raw = peer_loop(peer, adapter)?,
        (None, _) => {}
    }
    // Kafka runs keep their (freshly named) topics: deleting topics while other clients of
    // the process still cache their metadata crashed librdkafka against tansu (SIGSEGV in
    // rd_kafka_metadata_cache_find).
    let cleanup = adapter != "kafka";
    // Kafka topics keep every event for a group that joins later at the earliest offset.
    let presubscribe = adapter != "kafka";
    Ok(Loops {
        carriers: vec![
            ("raw", raw),
            (
                "adapter",
                Box::new(AdapterLoop::new(
                    Arc::clone(&connect),
                    cleanup,
                    presubscribe,
                )),
            ),
            (
                "bus",
                Box::new(BusLoop::new(connect, cleanup, presubscribe)),
            ),
        ],
    })
}

/// The peers `--peers` compares evbus with, and the adapters each runs on. Besides the peer
/// libraries: on Redis, the raw client writing the same CloudEvents fields as the Bus
/// ([`raw_redis::SAME_FIELDS`]), which separates evbus's own cost from the wire format's.
pub(crate) const PEERS: &[(&str, &[&str])] = &[
    ("omniqueue", &["redis", "amqp"]),
    (raw_redis::SAME_FIELDS, &["redis"]),
];

/// Whether this build carries the peer loops.
pub(crate) const PEERS_BUILT: bool = cfg!(feature = "peers");

#[cfg(feature = "peers")]
fn peer_loop(peer: &str, adapter: &str) -> Result<Box<dyn Carrier>> {
    match (peer, adapter) {
        ("omniqueue", "redis") => Ok(Box::new(peer_omniqueue::Omniqueue::redis(&redis_url()))),
        ("omniqueue", "amqp") => Ok(Box::new(peer_omniqueue::Omniqueue::amqp(&amqp_url())?)),
        _ => Err(format!("no {peer} loop on {adapter}").into()),
    }
}

#[cfg(not(feature = "peers"))]
fn peer_loop(peer: &str, _adapter: &str) -> Result<Box<dyn Carrier>> {
    Err(format!("this build of evbus-bench has no `peers` feature (for {peer})").into())
}

/// The Redis server the redis loops use: `EVBUS_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub(crate) fn redis_url() -> String {
    std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The Kafka broker the kafka loops use: `EVBUS_KAFKA_URL`, default `kafka://127.0.0.1:9092`.
pub(crate) fn kafka_url() -> String {
    std::env::var("EVBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned())
}

/// Whether this build carries the Kafka loops.
pub(crate) const KAFKA_BUILT: bool = cfg!(feature = "kafka");

/// The NATS server (JetStream on) the nats loops use: `EVBUS_NATS_URL`, default
/// `nats://127.0.0.1:4222`.
pub(crate) fn nats_url() -> String {
    std::env::var("EVBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Whether this build carries the NATS loops.
pub(crate) const NATS_BUILT: bool = cfg!(feature = "nats");

/// The RabbitMQ broker the amqp loops use: `EVBUS_AMQP_URL`, default
/// `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub(crate) fn amqp_url() -> String {
    std::env::var("EVBUS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The PostgreSQL server the postgres loops use: `EVBUS_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
#[cfg(feature = "sql")]
pub(crate) fn postgres_url() -> String {
    std::env::var("EVBUS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether this build carries the SQL loops (postgres, sqlite).
pub(crate) const SQL_BUILT: bool = cfg!(feature = "sql");

/// Whether this build carries the AMQP loops.
pub(crate) const AMQP_BUILT: bool = cfg!(feature = "amqp");
