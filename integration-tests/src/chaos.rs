//! The workload of the fault suite (`cargo xtask chaos`, docs/reliability.md), shared by the
//! `chaos-emitter`, `chaos-handler` and `chaos-solo` binaries.
//!
//! Emitters publish `chaos.tick {key, seq, poison}` events through a [`Bus`] with per-key
//! sequence numbers, one key at a time in publish order, and append one line per event the
//! bus returned `Ok` for to their record file. Handlers append one line per event they
//! handled successfully. Every line is one `write(2)` on a file opened for appending, made
//! before the next step (the next emit, or returning `Ok` to the bus): a SIGKILL cannot lose
//! a line for an event that was acknowledged (the kernel keeps the page; `fsync` would only
//! matter for a machine crash, which the suite does not simulate).
//!
//! Record lines (space separated):
//! - emitter: `O <id> <key> <seq> <poison 0|1>` once `Ok`; `R <id>` each time a publish failed
//!   and is retried with the same id (a retry may duplicate an event the broker had kept);
//! - handler: `H <id> <key> <seq> <instance> <attempt> <unix nanos> <event time, unix nanos>`
//!   on success, `D <id> <reason>` when the bus dead-lettered the event (the
//!   `on_dead_letter` hook).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evbus::bus::{Bus, HandlerError, Message, RetryPolicy};
use evbus::{Catalog, Emit, HandlerHandle, Registry};
use serde_json::json;

/// The event type of the workload.
pub const TICK: &str = "chaos.tick";

/// The topic every event of the workload goes to.
pub const TOPIC: &str = "chaos";

/// Attempts before a failing event is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 4;

/// `chaos.tick {key: string, seq: integer >= 1, poison: boolean}`.
pub fn catalog() -> Catalog {
    let mut builder = Catalog::builder();
    builder
        .register_json(
            TICK,
            json!({
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "seq": {"type": "integer", "minimum": 1},
                    "poison": {"type": "boolean"}
                },
                "required": ["key", "seq", "poison"]
            }),
        )
        .expect("the chaos schema is valid");
    builder.freeze().expect("the chaos catalogue freezes")
}

/// Every transport of the workspace: memory, redis, kafka, nats, amqp, postgres and sqlite.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register(evbus_redis::RedisConnector)
        .register(evbus_kafka::KafkaConnector)
        .register(evbus_nats::NatsConnector)
        .register(evbus_amqp::AmqpConnector)
        .register(evbus_sql::SqlConnector);
    registry
}

/// Logs to stderr (the process's `.stderr` file in the run's directory): warnings, or what
/// the `EVBUS_LOG` filter says (e.g. `EVBUS_LOG=evbus_kafka=debug`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Opens `url`, retrying a connection error for up to a minute: a process restarted while
/// the broker is down (a fault of the schedule) waits for it, as a deployed service would.
pub async fn connect(url: &str) -> evbus::Result<Arc<dyn evbus::Transport>> {
    let registry = registry();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match registry.connect(url).await {
            Ok(transport) => return Ok(transport),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                eprintln!("chaos: cannot connect yet, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The bus of every chaos process: quick retries (50 ms doubling, at most 1 s), at most
/// [`MAX_ATTEMPTS`] attempts, and a short visibility timeout so that a killed instance's
/// events come back quickly.
pub fn bus(transport: Arc<dyn evbus::Transport>, visibility: Duration) -> Bus {
    Bus::builder(transport, catalog())
        .source("/evbus/chaos")
        .route([TICK], TOPIC)
        .retry(
            RetryPolicy::default()
                .max_attempts(MAX_ATTEMPTS)
                .initial_backoff(Duration::from_millis(50))
                .max_backoff(Duration::from_secs(1)),
        )
        .visibility_timeout(visibility)
        .build()
}

/// An append-only record file shared by the tasks of one process; each line is one write.
#[derive(Clone, Debug)]
pub struct Record(Arc<Mutex<File>>);

impl Record {
    /// Opens (creates) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Record> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Record(Arc::new(Mutex::new(file))))
    }

    /// Appends `line` (with its newline) in one write.
    pub fn line(&self, line: &str) -> std::io::Result<()> {
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(buf.as_bytes())
    }
}

/// One emitter incarnation.
#[derive(Clone, Debug)]
pub struct EmitterConfig {
    /// Emitter number (ids and keys start with `e<emitter>i<incarnation>`).
    pub emitter: u32,
    /// Restart count of this emitter: a new incarnation uses fresh keys, so that per-key
    /// sequences never mix events of two incarnations.
    pub incarnation: u32,
    /// Events to emit.
    pub count: u64,
    /// Keys, each emitted sequentially by its own task.
    pub keys: u32,
    /// Events per second over all keys (0: as fast as possible).
    pub rate: f64,
    /// Every event whose `seq` is a multiple of this is poison (always fails: dead-lettered).
    pub poison_every: u64,
}

/// Emits `cfg.count` events, recording each `Ok` to `record`. A failed publish is retried
/// with the same id until it succeeds (errors that can never succeed end the run).
pub async fn run_emitter(bus: &Bus, cfg: &EmitterConfig, record: &Record) -> evbus::Result<()> {
    let keys = u64::from(cfg.keys.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    for k in 0..keys {
        let n = cfg.count / keys + u64::from(k < cfg.count % keys);
        let bus = bus.clone();
        let record = record.clone();
        let key = format!("e{}i{}k{k}", cfg.emitter, cfg.incarnation);
        let per_key_rate = cfg.rate / keys as f64;
        let poison_every = cfg.poison_every;
        tasks.spawn(async move {
            for seq in 1..=n {
                if per_key_rate > 0.0 {
                    let at = started + Duration::from_secs_f64((seq - 1) as f64 / per_key_rate);
                    tokio::time::sleep_until(at).await;
                }
                let poison = poison_every > 0 && seq % poison_every == 0;
                let id = format!("{key}s{seq}");
                let emit = Emit::new(TICK, json!({"key": key, "seq": seq, "poison": poison}))
                    .key(key.clone())
                    .id(id.clone());
                loop {
                    match bus.send(emit.clone()).await {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() || e.kind() == evbus::ErrorKind::Closed => {
                            record.line(&format!("R {id}")).map_err(io_error)?;
                            eprintln!("chaos-emitter: publish of {id} failed, retrying: {e}");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                record
                    .line(&format!("O {id} {key} {seq} {}", u8::from(poison)))
                    .map_err(io_error)?;
            }
            Ok::<(), evbus::Error>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| evbus::Error::new(evbus::ErrorKind::Internal, e.to_string()))??;
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> evbus::Error {
    evbus::Error::new(
        evbus::ErrorKind::Internal,
        format!("cannot write the record: {e}"),
    )
}

/// One handler instance.
#[derive(Clone, Debug)]
pub struct HandlerConfig {
    /// `A` (ordered by key when the transport declares it) or `B` (unordered).
    pub group: String,
    /// The instance name recorded with each handled event.
    pub instance: String,
    /// Keep per-key order.
    pub ordered: bool,
    /// Events run at once by this instance.
    pub concurrency: usize,
    /// Percentage of events failing their first attempt (chosen by a hash of the id).
    pub fail_pct: u64,
    /// Extra time each handler run takes (a slow consumer builds a backlog).
    pub slow: Duration,
}

/// FNV-1a of `s`: the same choice of transiently failing events in every process.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Starts one handler instance on `bus`, recording to `record`.
pub async fn start_handler(
    bus: &Bus,
    cfg: &HandlerConfig,
    record: &Record,
) -> evbus::Result<HandlerHandle> {
    let handled = record.clone();
    let dead = record.clone();
    let instance: Arc<str> = cfg.instance.as_str().into();
    let fail_pct = cfg.fail_pct;
    let slow = cfg.slow;
    bus.on(TICK, cfg.group.clone(), move |msg: Message| {
        let handled = handled.clone();
        let instance = Arc::clone(&instance);
        async move {
            let data: serde_json::Value = msg.json()?;
            if data["poison"] == true {
                return Err(HandlerError::from("poison event: fails on every attempt"));
            }
            if msg.attempt() == 1 && fnv(msg.id()) % 100 < fail_pct {
                return Err(HandlerError::from("transient failure on purpose"));
            }
            if !slow.is_zero() {
                tokio::time::sleep(slow).await;
            }
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let sent = msg
                .event()
                .time()
                .and_then(|t| t.timestamp_nanos_opt())
                .unwrap_or(0);
            handled.line(&format!(
                "H {} {} {} {instance} {} {nanos} {sent}",
                msg.id(),
                data["key"].as_str().unwrap_or("-"),
                data["seq"].as_u64().unwrap_or(0),
                msg.attempt()
            ))?;
            Ok(())
        }
    })
    .ordered_by_key(cfg.ordered)
    .concurrency(cfg.concurrency)
    .on_dead_letter(move |event, reason| {
        // The reason tells an over-delivery (never handed out) from a handler's last failure.
        let reason = reason.replace(['\n', '\r'], " ");
        if let Err(e) = dead.line(&format!("D {} {reason}", event.id())) {
            eprintln!("chaos-handler: cannot record a dead letter: {e}");
        }
    })
    .start()
    .await
}

/// The ids in the dead-letter queue of `group`. Every dead letter is received and held
/// (none settled) until nothing new arrives for 3 s, then all are nacked back: unlike
/// [`evbus::bus::DeadLetters::peek`], which nacks each at once and stops at the first one it
/// sees twice, this counts a queue whose nacked entries come back first (evbus-sql).
pub async fn dead_letter_ids(bus: &Bus, group: &str) -> evbus::Result<Vec<String>> {
    let queue = bus
        .transport()
        .queue(&bus.dead_letter_queue_name(TICK, group))
        .await?;
    let mut sub = queue
        .receive(
            evbus::ConsumerOptions::default()
                .max_attempts(u32::MAX)
                .max_in_flight(1_000_000)
                .visibility_timeout(Duration::from_secs(300)),
        )
        .await?;
    let mut held = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(3), sub.next_delivery()).await
    {
        let delivery = delivery?;
        ids.insert(delivery.event().id().to_owned());
        held.push(delivery);
    }
    for delivery in held {
        delivery.nack(None).await?;
    }
    Ok(ids.into_iter().collect())
}
