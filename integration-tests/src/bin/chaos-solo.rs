//! The whole workload of the fault suite (`cargo xtask chaos`) in one process, for the
//! transports that live in one process: `memory://` (the broker is the process) and
//! `sqlite://` (one process owns the database file).
//!
//! `chaos-solo --url URL --dir DIR --emitters E --count N --keys K --rate R --poison-every P
//! --incarnation I --concurrency C --fail-pct F --slow-ms S --visibility-ms V [--ordered 0|1]`
//! runs E emitter tasks (each emitting what is left of its N events: its record file
//! `DIR/emitter-<e>.log` says how many it has emitted already) and six handler instances
//! (groups A and B, three each, recording to `DIR/handler-<G><n>.log`). It prints `ready
//! per-key-order=<bool>` once the handlers are subscribed, `emitted` once every emitter is
//! done, and reads commands on stdin, one per line:
//!
//! - `kill-handler G N`: stops instance N of group G at once (drain deadline zero: what it
//!   holds is nacked), then starts it again after 500 ms;
//! - `kill-emitter E`: aborts emitter task E, and starts a new incarnation of it after 500 ms;
//!
//! and shuts down gracefully when stdin closes. The whole process may also be SIGKILLed and
//! started again with the next `--incarnation` (sqlite: reopening the file).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use evbus::Transport;
use evbus_integration_tests::chaos::{self, EmitterConfig, HandlerConfig, Record};
use evbus_integration_tests::flags;
use tokio::io::AsyncBufReadExt;

struct Plan {
    transport: Arc<dyn Transport>,
    dir: PathBuf,
    count: u64,
    keys: u32,
    rate: f64,
    poison_every: u64,
    visibility: Duration,
    concurrency: usize,
    fail_pct: u64,
    slow: Duration,
    ordered: bool,
}

impl Plan {
    fn emitter_log(&self, e: u32) -> PathBuf {
        self.dir.join(format!("emitter-{e}.log"))
    }

    fn spawn_emitter(&self, e: u32, incarnation: u32) -> std::io::Result<EmitterTask> {
        let log = self.emitter_log(e);
        let done = emitted_so_far(&log)?;
        let cfg = EmitterConfig {
            emitter: e,
            incarnation,
            count: self.count.saturating_sub(done),
            keys: self.keys,
            rate: self.rate,
            poison_every: self.poison_every,
        };
        let record = Record::open(&log)?;
        let bus = chaos::bus(Arc::clone(&self.transport), self.visibility);
        let task = tokio::spawn(async move { chaos::run_emitter(&bus, &cfg, &record).await });
        Ok(EmitterTask {
            incarnation,
            task: Some(task),
        })
    }

    async fn start_handler(&self, group: &str, n: u32) -> evbus::Result<evbus::HandlerHandle> {
        let name = format!("{group}{n}");
        let record = Record::open(&self.dir.join(format!("handler-{name}.log")))
            .map_err(|e| evbus::Error::new(evbus::ErrorKind::Internal, e.to_string()))?;
        let cfg = HandlerConfig {
            group: group.to_owned(),
            instance: name,
            ordered: group == "A" && self.ordered,
            concurrency: self.concurrency,
            fail_pct: self.fail_pct,
            slow: if group == "B" {
                self.slow
            } else {
                Duration::ZERO
            },
        };
        let bus = chaos::bus(Arc::clone(&self.transport), self.visibility);
        chaos::start_handler(&bus, &cfg, &record).await
    }
}

struct EmitterTask {
    incarnation: u32,
    /// `None` once finished and its result checked.
    task: Option<tokio::task::JoinHandle<evbus::Result<()>>>,
}

/// The `O` lines of an emitter's record file: events it has emitted in earlier incarnations.
fn emitted_so_far(log: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(log) {
        Ok(text) => Ok(text.lines().filter(|l| l.starts_with("O ")).count() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    chaos::init_logging();
    let args = flags(std::env::args().skip(1))?;
    let get = |name: &str| {
        args.get(name)
            .cloned()
            .ok_or_else(|| format!("chaos-solo: missing --{name}"))
    };
    let transport = chaos::connect(&get("url")?).await?;
    let ordering = transport.capabilities().per_key_order;
    let plan = Plan {
        transport,
        dir: PathBuf::from(get("dir")?),
        count: get("count")?.parse()?,
        keys: get("keys")?.parse()?,
        rate: get("rate")?.parse()?,
        poison_every: get("poison-every")?.parse()?,
        visibility: Duration::from_millis(get("visibility-ms")?.parse()?),
        concurrency: get("concurrency")?.parse()?,
        fail_pct: get("fail-pct")?.parse()?,
        slow: Duration::from_millis(get("slow-ms")?.parse()?),
        ordered: args.get("ordered").is_none_or(|v| v == "1") && ordering,
    };
    let emitters: u32 = get("emitters")?.parse()?;
    let incarnation: u32 = get("incarnation")?.parse()?;

    let mut handlers = HashMap::new();
    for group in ["A", "B"] {
        for n in 1..=3 {
            handlers.insert((group.to_owned(), n), plan.start_handler(group, n).await?);
        }
    }
    println!("ready per-key-order={ordering}");

    let mut tasks: Vec<EmitterTask> = (0..emitters)
        .map(|e| plan.spawn_emitter(e, incarnation * 100))
        .collect::<Result<_, _>>()?;
    let mut announced = false;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Some(line) = line? else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["kill-handler", group, n] => {
                        let key = ((*group).to_owned(), n.parse::<u32>()?);
                        if let Some(handle) = handlers.remove(&key) {
                            handle.shutdown(Duration::ZERO).await;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        handlers.insert(key, plan.start_handler(group, n.parse()?).await?);
                    }
                    ["kill-emitter", e] => {
                        let e: usize = e.parse()?;
                        let Some(old) = tasks.get_mut(e) else { continue };
                        if let Some(task) = old.task.take() {
                            task.abort();
                            let _ = task.await;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let next = old.incarnation + 1;
                        *old = plan.spawn_emitter(u32::try_from(e)?, next)?;
                        announced = false;
                    }
                    _ => eprintln!("chaos-solo: unknown command `{line}`"),
                }
            }
            _ = tick.tick() => {
                for t in &mut tasks {
                    if t.task.as_ref().is_some_and(|task| task.is_finished())
                        && let Some(task) = t.task.take()
                        && let Ok(Err(e)) = task.await
                    {
                        return Err(e.into());
                    }
                }
                if !announced && tasks.iter().all(|t| t.task.is_none()) {
                    println!("emitted");
                    announced = true;
                }
            }
        }
    }
    for handle in handlers.values() {
        handle.shutdown(Duration::from_secs(10)).await;
    }
    plan.transport.close().await?;
    Ok(())
}
