//! `evbus-bench run`: interleaved rounds of the three loops per adapter, the summary, the
//! table, the script lines and the JSON.
//!
//! Per adapter: one discarded calibration run of every loop, then `rounds` rounds; in each
//! round every payload size runs every loop (in an order rotated each round, so no loop always
//! runs first or last), three runs each on fresh destinations:
//!
//! - *backlog*: the subscription exists, nobody consumes; publish `events` one at a time
//!   (each awaited until the broker accepted it) → publish throughput; then attach the
//!   consumer and drain → consume throughput, from the first event received to the last
//!   (attaching is not counted: on Kafka it is a consumer-group join of seconds);
//! - *publish-c64*: 64 tasks publish `burst_events` through one client (`Bus`, `Topic`, the
//!   raw client's one connection), each awaiting its own publish → publish throughput; the
//!   events are then consumed (untimed) and must all arrive;
//! - *publish-batch*: the same in batches of 100 (`emit_batch`, `publish_batch`, the raw
//!   client's pipeline or batch of in-flight sends);
//! - *live*: the consumer is attached before the first publish; publish `events` → events/s
//!   from the first publish to the last receipt;
//! - *latency*: the consumer is attached; publish `latency_events` at a fixed offered rate
//!   → end-to-end latency percentiles (receipt − send).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::carriers::{
    self, AMQP_BUILT, BURST_BATCH, BURST_TASKS, Burst, Carrier, KAFKA_BUILT, LOOPS, NATS_BUILT,
    SQL_BUILT,
};
use crate::env::Environment;
use crate::sample::{Generator, Recorder, SIZES};

/// Options of `evbus-bench run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Adapters to run (repeatable): memory, redis, kafka, nats, amqp. Default: all this build
    /// has.
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// Adapters not run, as `NAME=reason` (from xtask), reported as such.
    #[arg(long = "not-run")]
    not_run: Vec<String>,
    /// Fewer events and rounds: the lines in a few minutes, with wider spreads.
    #[arg(long)]
    quick: bool,
    /// Rounds (default 5, 3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Events per throughput run (overrides the adapter's default).
    #[arg(long)]
    events: Option<usize>,
    /// Events per `publish-c64` and `publish-batch` run (overrides the adapter's default).
    #[arg(long)]
    burst_events: Option<usize>,
    /// Compare with the peer libraries instead of the raw clients (`peer ...` lines): each
    /// peer on the adapters it supports ([`carriers::PEERS`]).
    #[arg(long)]
    peers: bool,
    /// The JSON file to write.
    #[arg(long)]
    out: PathBuf,
}

/// How much one adapter's runs carry.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// Events per backlog and live run.
    pub(crate) events: usize,
    /// Events per latency run.
    pub(crate) latency_events: usize,
    /// Offered rate of the latency run, events/s.
    pub(crate) latency_rate: u32,
    /// Measured rounds (after the calibration run).
    pub(crate) rounds: usize,
    /// Whether the live throughput run is made (not with `--quick` on Kafka: each run's
    /// consumer-group join costs seconds there).
    #[serde(default = "yes")]
    pub(crate) live: bool,
    /// Whether the latency run is made (not with `--quick` on Kafka, as for `live`).
    #[serde(default = "yes")]
    pub(crate) latency: bool,
    /// Events per `publish-c64` and `publish-batch` run (more than `events`: with many
    /// publishes in flight a run of `events` is over in milliseconds).
    #[serde(default)]
    pub(crate) burst_events: usize,
}

fn yes() -> bool {
    true
}

fn plan(adapter: &str, quick: bool, rounds: Option<usize>) -> Plan {
    let (events, latency_events, latency_rate) = match (adapter, quick) {
        ("memory", false) => (20_000, 5_000, 10_000),
        ("memory", true) => (5_000, 2_000, 10_000),
        // NATS: every publish waits for its PubAck from the file store, about as fast as an
        // awaited XADD here.
        ("redis" | "redis-structured" | "nats", false) => (5_000, 2_000, 2_000),
        ("redis" | "redis-structured" | "nats", true) => (1_000, 500, 2_000),
        // AMQP: every publish waits for its confirm from a quorum queue (about 0.6 ms here,
        // some 2k/s), so the latency rate stays below that.
        ("amqp", false) => (3_000, 1_000, 500),
        ("amqp", true) => (1_000, 300, 500),
        // SQL: every publish is a committed transaction (a WAL write).
        ("postgres" | "sqlite", false) => (3_000, 1_000, 500),
        ("postgres" | "sqlite", true) => (1_000, 300, 500),
        (_, false) => (500, 300, 200),
        (_, true) => (200, 100, 200),
    };
    let kafka_quick = quick && adapter == "kafka";
    let burst_events = match (adapter, quick) {
        ("memory" | "redis" | "redis-structured" | "nats", false) => 20_000,
        ("memory" | "redis" | "redis-structured" | "nats", true) => 5_000,
        ("kafka", false) => 10_000,
        ("kafka", true) => 3_000,
        (_, false) => 5_000,
        (_, true) => 2_000,
    };
    Plan {
        burst_events,
        events,
        latency_events,
        latency_rate,
        rounds: rounds
            .unwrap_or(match (quick, adapter) {
                // Kafka: every run joins consumer groups (about 5 s each on tansu).
                (true, "kafka") => 2,
                (false, "kafka") => 3,
                (true, _) => 3,
                (false, _) => 5,
            })
            .max(1),
        live: !kafka_quick,
        latency: !kafka_quick,
    }
}

/// Best, median and worst round of one measure.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Stat {
    pub(crate) best: f64,
    pub(crate) median: f64,
    pub(crate) worst: f64,
}

impl Stat {
    /// `higher_is_better`: throughput; otherwise latency.
    pub(crate) fn of(values: &[f64], higher_is_better: bool) -> Stat {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stat {
                best: f64::NAN,
                median: f64::NAN,
                worst: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        let (lo, hi) = (v[0], v[v.len() - 1]);
        if higher_is_better {
            Stat {
                best: hi,
                median,
                worst: lo,
            }
        } else {
            Stat {
                best: lo,
                median,
                worst: hi,
            }
        }
    }

    /// The best-to-worst spread on the ratio scale: |ln(best / worst)|.
    fn spread(&self) -> f64 {
        (self.best / self.worst).ln().abs()
    }
}

/// `indistinguishable` when the Bus and raw medians differ by less than the larger
/// best-to-worst spread of the two loops, both measured as ratios (|ln(bus / raw)| against
/// |ln(best / worst)|, so that a fast, noisy raw loop does not hide a tenfold gap); otherwise
/// `evbus faster` or `evbus slower`.
pub(crate) fn verdict_of(raw: &Stat, bus: &Stat) -> &'static str {
    let diff = (bus.median / raw.median).ln().abs();
    if diff < raw.spread().max(bus.spread()) {
        "indistinguishable"
    } else if bus.median > raw.median {
        "evbus faster"
    } else {
        "evbus slower"
    }
}

/// Every round's figures of one loop at one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct LoopRounds {
    /// Publish throughput of the backlog runs, events/s.
    pub(crate) publish: Vec<f64>,
    /// Publish throughput with [`BURST_TASKS`] tasks publishing at once, events/s.
    #[serde(default)]
    pub(crate) publish_c64: Vec<f64>,
    /// Publish throughput in batches of [`BURST_BATCH`], events/s.
    #[serde(default)]
    pub(crate) publish_batch: Vec<f64>,
    /// Consume (drain) throughput of the backlog runs, events/s.
    pub(crate) consume: Vec<f64>,
    /// Live throughput (consumer attached first), events/s.
    pub(crate) live: Vec<f64>,
    /// Latency percentiles at the offered rate, µs.
    pub(crate) p50_us: Vec<f64>,
    /// 99th percentile, µs.
    pub(crate) p99_us: Vec<f64>,
    /// 99.9th percentile, µs.
    pub(crate) p999_us: Vec<f64>,
    /// Rate the latency run achieved, events/s.
    pub(crate) offered: Vec<f64>,
    /// Share of the backlog publish time spent waiting on the broker (raw loops).
    pub(crate) publish_broker_wait: Vec<f64>,
    /// Share of the drain time spent waiting on the broker (raw loops).
    pub(crate) consume_broker_wait: Vec<f64>,
    /// Runs that failed or timed out, with the reason.
    pub(crate) errors: Vec<String>,
}

/// The full Bus against the raw client for one measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Comparison {
    /// The raw client.
    pub(crate) raw: Stat,
    /// The adapter alone.
    pub(crate) adapter: Stat,
    /// The full Bus (`evbus` in the script lines).
    pub(crate) bus: Stat,
    /// bus median / raw median.
    pub(crate) ratio: f64,
    /// adapter median / raw median.
    pub(crate) adapter_ratio: f64,
    /// See [`verdict_of`].
    pub(crate) verdict: String,
    /// The raw loop waited on the broker more than half of the time (median round).
    pub(crate) broker_bound: bool,
}

impl Comparison {
    fn new(raw: &[f64], adapter: &[f64], bus: &[f64], broker_wait: &[f64]) -> Self {
        let (raw, adapter, bus) = (
            Stat::of(raw, true),
            Stat::of(adapter, true),
            Stat::of(bus, true),
        );
        let verdict = verdict_of(&raw, &bus);
        Comparison {
            ratio: bus.median / raw.median,
            adapter_ratio: adapter.median / raw.median,
            raw,
            adapter,
            bus,
            verdict: verdict.to_owned(),
            broker_bound: Stat::of(broker_wait, true).median > 0.5,
        }
    }
}

/// One payload size of one adapter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SizeResult {
    /// Payload bytes.
    pub(crate) size: usize,
    /// Per loop (`raw`, `adapter`, `bus`): every round.
    pub(crate) loops: BTreeMap<String, LoopRounds>,
    /// Publish throughput compared.
    pub(crate) publish: Comparison,
    /// Publish throughput with [`BURST_TASKS`] tasks at once compared (`publish-c64`).
    #[serde(default)]
    pub(crate) publish_c64: Option<Comparison>,
    /// Publish throughput in batches of [`BURST_BATCH`] compared (`publish-batch`).
    #[serde(default)]
    pub(crate) publish_batch: Option<Comparison>,
    /// Consume throughput compared.
    pub(crate) consume: Comparison,
    /// Latency p50 / p99 / p99.9 per loop, µs.
    pub(crate) latency: BTreeMap<String, [Stat; 3]>,
}

impl SizeResult {
    /// Every throughput measure in report order: publish, the bursts, consume.
    pub(crate) fn measures(&self) -> impl Iterator<Item = (&'static str, &Comparison)> {
        std::iter::once(("publish", &self.publish))
            .chain(self.bursts())
            .chain(std::iter::once(("consume", &self.consume)))
    }

    /// The `publish-c64` and `publish-batch` comparisons this result has (none in results
    /// written before they were measured).
    pub(crate) fn bursts(&self) -> impl Iterator<Item = (&'static str, &Comparison)> {
        [
            ("publish-c64", self.publish_c64.as_ref()),
            ("publish-batch", self.publish_batch.as_ref()),
        ]
        .into_iter()
        .filter_map(|(what, c)| c.map(|c| (what, c)))
    }
}

/// One adapter's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AdapterResult {
    /// `memory`, `redis`, `kafka`.
    pub(crate) name: String,
    /// What each run carried.
    pub(crate) plan: Plan,
    /// Per payload size.
    pub(crate) sizes: Vec<SizeResult>,
    /// Wall time of the adapter's runs, s.
    pub(crate) seconds: f64,
    /// What the `raw` loop was: `raw` (the broker's client) or a peer library.
    #[serde(default = "raw_loop")]
    pub(crate) baseline: String,
    /// The environment of the run this result came from (set by the report, which merges
    /// runs made at different times).
    #[serde(skip)]
    pub(crate) measured: Option<crate::env::Environment>,
}

fn raw_loop() -> String {
    "raw".to_owned()
}

/// A whole `run`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunResult {
    /// Where and how it ran.
    pub(crate) environment: Environment,
    /// Whether it was a `--quick` run.
    pub(crate) quick: bool,
    /// Adapters measured.
    pub(crate) adapters: Vec<AdapterResult>,
    /// Adapters not run, with the reason.
    pub(crate) not_run: BTreeMap<String, String>,
}

/// Short size label: `16B`, `256B`, `1KiB`, `16KiB`.
pub(crate) fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

/// The script line of one measurement (exact format; see the issue).
pub(crate) fn script_line(adapter: &str, what: &str, size: usize, c: &Comparison) -> String {
    format!(
        "bench {adapter} {what} {}: evbus {:.0}/s raw {:.0}/s ratio {:.2}",
        size_label(size),
        c.bus.median,
        c.raw.median,
        c.ratio
    )
}

/// The lines of one measure against a peer library: the Bus's, then the adapter's.
pub(crate) fn peer_lines(
    adapter: &str,
    peer: &str,
    what: &str,
    size: usize,
    c: &Comparison,
) -> [String; 2] {
    let label = size_label(size);
    [
        format!(
            "peer {adapter} {what} {label}: evbus {:.0}/s {peer} {:.0}/s ratio {:.2}",
            c.bus.median, c.raw.median, c.ratio
        ),
        format!(
            "peer {adapter} {what} {label} (adapter): evbus {:.0}/s {peer} {:.0}/s ratio {:.2}",
            c.adapter.median, c.raw.median, c.adapter_ratio
        ),
    ]
}

/// Progress on stderr: rewritten in place on a terminal, one line per step otherwise.
struct Progress {
    tty: bool,
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let width = 30;
        let filled = width * self.done / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        let line = format!(
            "[{bar}] {}/{} {:>5.0}s {what}",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Entry point of `evbus-bench run`.
pub(crate) fn run(args: RunArgs) -> Result<()> {
    let mut adapters = args.adapters.clone();
    if adapters.is_empty() {
        adapters = vec![
            "memory".to_owned(),
            "redis".to_owned(),
            "redis-structured".to_owned(),
        ];
        if KAFKA_BUILT {
            adapters.push("kafka".to_owned());
        }
        if NATS_BUILT {
            adapters.push("nats".to_owned());
        }
        if AMQP_BUILT {
            adapters.push("amqp".to_owned());
        }
        if SQL_BUILT {
            adapters.push("postgres".to_owned());
            adapters.push("sqlite".to_owned());
        }
    }
    let mut not_run: BTreeMap<String, String> = args
        .not_run
        .iter()
        .filter_map(|s| s.split_once('='))
        .map(|(a, r)| (a.to_owned(), r.to_owned()))
        .collect();
    if !KAFKA_BUILT && adapters.iter().any(|a| a == "kafka") {
        adapters.retain(|a| a != "kafka");
        not_run.insert(
            "kafka".to_owned(),
            "this build of evbus-bench has no `kafka` feature".to_owned(),
        );
    }
    if !NATS_BUILT && adapters.iter().any(|a| a == "nats") {
        adapters.retain(|a| a != "nats");
        not_run.insert(
            "nats".to_owned(),
            "this build of evbus-bench has no `nats` feature".to_owned(),
        );
    }
    if !AMQP_BUILT && adapters.iter().any(|a| a == "amqp") {
        adapters.retain(|a| a != "amqp");
        not_run.insert(
            "amqp".to_owned(),
            "this build of evbus-bench has no `amqp` feature".to_owned(),
        );
    }
    if !SQL_BUILT {
        for sql in ["postgres", "sqlite"] {
            if adapters.iter().any(|a| a == sql) {
                adapters.retain(|a| a != sql);
                not_run.insert(
                    sql.to_owned(),
                    "this build of evbus-bench has no `sql` feature".to_owned(),
                );
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.peers && !carriers::PEERS_BUILT {
        return Err("--peers: this build of evbus-bench has no `peers` feature".into());
    }
    let environment = Environment::collect(&adapters);
    let mut results = Vec::new();
    // Each adapter against its raw client, or against every peer that runs on it.
    let mut runs: Vec<(String, Option<&str>)> = Vec::new();
    for adapter in &adapters {
        if !args.peers {
            runs.push((adapter.clone(), None));
            continue;
        }
        for (peer, on) in carriers::PEERS {
            if on.contains(&adapter.as_str()) {
                runs.push((adapter.clone(), Some(*peer)));
            }
        }
    }
    for (adapter, peer) in runs {
        let mut plan = plan(&adapter, args.quick, args.rounds);
        if let Some(events) = args.events {
            plan.events = events.max(1);
            plan.latency_events = plan.latency_events.min(plan.events);
        }
        if let Some(burst) = args.burst_events {
            plan.burst_events = burst.max(1);
        }
        match runtime.block_on(run_adapter(&adapter, plan, peer)) {
            Ok(result) => {
                print_adapter(&result);
                results.push(result);
            }
            Err(e) => {
                eprintln!("bench {adapter}: failed: {e}");
                not_run.insert(adapter.clone(), format!("failed: {e}"));
            }
        }
    }
    for (adapter, reason) in &not_run {
        println!("bench {adapter}: not run ({reason})");
    }
    // Let the consumers' tasks end before the runtime goes.
    runtime.shutdown_timeout(Duration::from_secs(2));
    let mut environment = environment;
    environment.finish();
    let run = RunResult {
        environment,
        quick: args.quick,
        adapters: results,
        not_run,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&run)?)?;
    eprintln!("bench: results written to {}", args.out.display());
    Ok(())
}

async fn run_adapter(adapter: &str, plan: Plan, peer: Option<&str>) -> Result<AdapterResult> {
    let started = Instant::now();
    let mut loops = carriers::loops(adapter, plan.events.max(plan.latency_events), peer).await?;
    let generator = Generator::new();
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        total: LOOPS.len() * (1 + plan.rounds * SIZES.len()),
        done: 0,
        started,
    };
    let mut rounds: BTreeMap<usize, BTreeMap<String, LoopRounds>> = BTreeMap::new();
    let mut run_no = 0usize;
    let run_id = |n: usize| format!("{}-{}-{n}", std::process::id(), unique());

    // The calibration run: every loop once at 1 KiB, discarded (connections, JIT-free but
    // cold caches, page faults, broker warm-up).
    for (name, carrier) in &mut loops.carriers {
        progress.step(&format!("{adapter} calibration {name}"));
        run_no += 1;
        let mut discard = LoopRounds::default();
        one_loop(
            carrier.as_mut(),
            &generator,
            1024,
            plan,
            &run_id(run_no),
            &mut discard,
        )
        .await;
    }

    for round in 0..plan.rounds {
        for &size in &SIZES {
            let n = loops.carriers.len();
            for i in 0..n {
                let idx = (i + round) % n;
                let (name, carrier) = &mut loops.carriers[idx];
                progress.step(&format!(
                    "{adapter} round {}/{} {} {name}",
                    round + 1,
                    plan.rounds,
                    size_label(size)
                ));
                run_no += 1;
                let slot = rounds
                    .entry(size)
                    .or_default()
                    .entry((*name).to_owned())
                    .or_default();
                one_loop(
                    carrier.as_mut(),
                    &generator,
                    size,
                    plan,
                    &run_id(run_no),
                    slot,
                )
                .await;
            }
        }
    }
    progress.finish();

    let sizes = rounds
        .into_iter()
        .map(|(size, loops)| {
            let get = |l: &str| loops.get(l).cloned().unwrap_or_default();
            let (raw, adapter, bus) = (get("raw"), get("adapter"), get("bus"));
            let latency = loops
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        [
                            Stat::of(&r.p50_us, false),
                            Stat::of(&r.p99_us, false),
                            Stat::of(&r.p999_us, false),
                        ],
                    )
                })
                .collect();
            SizeResult {
                size,
                publish: Comparison::new(
                    &raw.publish,
                    &adapter.publish,
                    &bus.publish,
                    &raw.publish_broker_wait,
                ),
                publish_c64: Some(Comparison::new(
                    &raw.publish_c64,
                    &adapter.publish_c64,
                    &bus.publish_c64,
                    &[],
                )),
                publish_batch: Some(Comparison::new(
                    &raw.publish_batch,
                    &adapter.publish_batch,
                    &bus.publish_batch,
                    &[],
                )),
                consume: Comparison::new(
                    &raw.consume,
                    &adapter.consume,
                    &bus.consume,
                    &raw.consume_broker_wait,
                ),
                latency,
                loops,
            }
        })
        .collect();
    Ok(AdapterResult {
        name: adapter.to_owned(),
        plan,
        sizes,
        seconds: started.elapsed().as_secs_f64(),
        baseline: peer.unwrap_or("raw").to_owned(),
        measured: None,
    })
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// The three runs (backlog, live, latency) of one loop at one size, recorded in `into`.
async fn one_loop(
    carrier: &mut dyn Carrier,
    generator: &Generator,
    size: usize,
    plan: Plan,
    run: &str,
    into: &mut LoopRounds,
) {
    let result = async {
        backlog(
            carrier,
            generator,
            size,
            plan.events,
            &format!("{run}b"),
            into,
        )
        .await?;
        for (burst, into) in [
            (Burst::Tasks(BURST_TASKS), &mut into.publish_c64),
            (Burst::Batch(BURST_BATCH), &mut into.publish_batch),
        ] {
            let tag = match burst {
                Burst::Tasks(_) => "c",
                Burst::Batch(_) => "B",
            };
            let rate = publish_burst(
                carrier,
                generator,
                size,
                plan.burst_events.max(1),
                burst,
                &format!("{run}{tag}"),
            )
            .await?;
            into.push(rate);
        }
        if plan.live {
            live(
                carrier,
                generator,
                size,
                plan.events,
                &format!("{run}l"),
                into,
            )
            .await?;
        }
        if plan.latency {
            latency(carrier, generator, size, plan, &format!("{run}t"), into).await?;
        }
        Ok::<(), crate::Error>(())
    }
    .await;
    if let Err(e) = result {
        into.errors.push(e.to_string());
        eprintln!("\nbench: run {run} failed: {e}");
        let _ = carrier.teardown().await;
    }
}

fn drain_timeout(events: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(events as u64 * 2)
}

async fn backlog(
    carrier: &mut dyn Carrier,
    generator: &Generator,
    size: usize,
    events: usize,
    run: &str,
    into: &mut LoopRounds,
) -> Result<()> {
    carrier.setup(run).await?;
    let recorder = Recorder::new(events);
    carrier.take_broker_wait();
    let started = Instant::now();
    for seq in 0..events as u64 {
        carrier.publish(&generator.sample(seq, size)).await?;
    }
    let publish = started.elapsed();
    let waited = carrier.take_broker_wait();
    let attach = recorder.elapsed_ns();
    carrier.consume(Arc::clone(&recorder)).await?;
    if !recorder.wait(drain_timeout(events)).await {
        carrier.teardown().await?;
        return Err(format!(
            "backlog drain: {} of {events} events received",
            recorder.count()
        )
        .into());
    }
    // The drain runs from the first event received to the last: attaching the consumer
    // (a consumer-group join of seconds on Kafka) is not part of the consume rate.
    let first = recorder.first_received_ns().max(attach);
    let drained = Duration::from_nanos(recorder.last_received_ns().saturating_sub(first));
    let consume_waited = carrier.take_broker_wait();
    carrier.teardown().await?;
    into.publish.push(events as f64 / publish.as_secs_f64());
    into.consume
        .push(events.saturating_sub(1).max(1) as f64 / drained.as_secs_f64());
    into.publish_broker_wait
        .push(waited.as_secs_f64() / publish.as_secs_f64());
    into.consume_broker_wait
        .push(consume_waited.as_secs_f64() / drained.as_secs_f64());
    Ok(())
}

/// Publishes `events` in one [`Burst`] and returns the publish rate, events/s. The events are
/// then consumed (not timed): a burst that loses or mangles events is an error, not a rate.
async fn publish_burst(
    carrier: &mut dyn Carrier,
    generator: &Generator,
    size: usize,
    events: usize,
    burst: Burst,
    run: &str,
) -> Result<f64> {
    carrier.setup(run).await?;
    let recorder = Recorder::new(events);
    let payloads = (0..events as u64)
        .map(|seq| serde_json::to_value(generator.sample(seq, size)))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let published = carrier.publish_burst(payloads, burst).await;
    let took = started.elapsed();
    if let Err(e) = published {
        carrier.teardown().await?;
        return Err(format!("{burst:?}: {e}").into());
    }
    carrier.consume(Arc::clone(&recorder)).await?;
    let drained = recorder.wait(drain_timeout(events)).await;
    carrier.teardown().await?;
    if !drained {
        return Err(format!(
            "{burst:?}: {} of {events} published events received",
            recorder.count()
        )
        .into());
    }
    Ok(events as f64 / took.as_secs_f64())
}

async fn live(
    carrier: &mut dyn Carrier,
    generator: &Generator,
    size: usize,
    events: usize,
    run: &str,
    into: &mut LoopRounds,
) -> Result<()> {
    carrier.setup(run).await?;
    let recorder = Recorder::new(events);
    carrier.consume(Arc::clone(&recorder)).await?;
    let first = recorder.elapsed_ns();
    for seq in 0..events as u64 {
        carrier.publish(&generator.sample(seq, size)).await?;
    }
    let ok = recorder.wait(drain_timeout(events)).await;
    carrier.teardown().await?;
    if !ok {
        return Err(format!("live: {} of {events} events received", recorder.count()).into());
    }
    let elapsed = Duration::from_nanos(recorder.last_received_ns().saturating_sub(first));
    into.live.push(events as f64 / elapsed.as_secs_f64());
    Ok(())
}

async fn latency(
    carrier: &mut dyn Carrier,
    generator: &Generator,
    size: usize,
    plan: Plan,
    run: &str,
    into: &mut LoopRounds,
) -> Result<()> {
    let events = plan.latency_events;
    carrier.setup(run).await?;
    let recorder = Recorder::new(events);
    carrier.consume(Arc::clone(&recorder)).await?;
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.latency_rate));
    for seq in 0..events as u64 {
        let due = start + interval * seq as u32;
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        recorder.sent(seq);
        carrier.publish(&generator.sample(seq, size)).await?;
    }
    let offered = events as f64 / start.elapsed().as_secs_f64();
    let ok = recorder.wait(drain_timeout(events)).await;
    carrier.teardown().await?;
    if !ok {
        return Err(format!("latency: {} of {events} events received", recorder.count()).into());
    }
    let lat = recorder.latencies_ns();
    let pct = |p: f64| -> f64 {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    into.p50_us.push(pct(0.50));
    into.p99_us.push(pct(0.99));
    into.p999_us.push(pct(0.999));
    into.offered.push(offered);
    Ok(())
}

fn fmt_rate(x: f64) -> String {
    if !x.is_finite() {
        "-".to_owned()
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "-".to_owned()
    } else if x >= 1000.0 {
        format!("{:.1}ms", x / 1000.0)
    } else {
        format!("{x:.0}µs")
    }
}

fn bmw(s: &Stat, f: fn(f64) -> String) -> String {
    format!("{}/{}/{}", f(s.best), f(s.median), f(s.worst))
}

/// The stdout table of one adapter, then its script lines.
fn print_adapter(r: &AdapterResult) {
    println!();
    let latency = if r.plan.latency {
        format!(
            "{} at {}/s for latency",
            r.plan.latency_events, r.plan.latency_rate
        )
    } else {
        "no latency run".to_owned()
    };
    let live = if r.plan.live { "" } else { ", no live run" };
    println!(
        "== {} ({} events per throughput run{live}, {latency}, {} rounds; best/median/worst) ==",
        r.name, r.plan.events, r.plan.rounds
    );
    println!(
        "{:<6} {:<13} {:<24} {:<24} {:<24} {:>7} {:>8}  verdict",
        "size", "measure", r.baseline, "adapter", "bus (evbus)", "bus/raw", "adp/raw"
    );
    for s in &r.sizes {
        for (what, c) in s.measures() {
            println!(
                "{:<6} {:<13} {:<24} {:<24} {:<24} {:>7.2} {:>8.2}  {}{}",
                size_label(s.size),
                what,
                bmw(&c.raw, fmt_rate),
                bmw(&c.adapter, fmt_rate),
                bmw(&c.bus, fmt_rate),
                c.ratio,
                c.adapter_ratio,
                c.verdict,
                if c.broker_bound { ", broker-bound" } else { "" }
            );
        }
        let live = |l: &str| {
            s.loops
                .get(l)
                .map(|x| Stat::of(&x.live, true))
                .unwrap_or_default()
        };
        println!(
            "{:<6} {:<13} {:<24} {:<24} {:<24}",
            size_label(s.size),
            "live",
            bmw(&live("raw"), fmt_rate),
            bmw(&live("adapter"), fmt_rate),
            bmw(&live("bus"), fmt_rate),
        );
        for (i, p) in ["p50", "p99", "p99.9"].iter().enumerate() {
            let get = |l: &str| s.latency.get(l).map(|x| x[i]).unwrap_or_default();
            println!(
                "{:<6} {:<13} {:<24} {:<24} {:<24}",
                size_label(s.size),
                p,
                bmw(&get("raw"), fmt_us),
                bmw(&get("adapter"), fmt_us),
                bmw(&get("bus"), fmt_us),
            );
        }
        for (l, rounds) in &s.loops {
            for e in &rounds.errors {
                println!("{:<6} {l}: run failed: {e}", size_label(s.size));
            }
        }
    }
    if r.baseline != "raw" {
        for s in &r.sizes {
            for (what, c) in s.measures() {
                for line in peer_lines(&r.name, &r.baseline, what, s.size, c) {
                    println!("{line}");
                }
            }
        }
        return;
    }
    for s in &r.sizes {
        println!("{}", script_line(&r.name, "publish", s.size, &s.publish));
        for (what, c) in s.bursts() {
            println!("{}", script_line(&r.name, what, s.size, c));
        }
        println!("{}", script_line(&r.name, "consume", s.size, &s.consume));
    }
}
