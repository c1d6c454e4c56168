//! `cargo xtask chaos [--adapter NAME] [--events N] [--duration D] [--seed S]`: the fault
//! suite (issue 18, docs/reliability.md).
//!
//! Per adapter, the run starts (where it can) its own broker on a private port and data
//! directory with persistence on, a TCP proxy it controls between the clients and the broker,
//! three handler processes in each of two groups (`A` ordered by key when the transport
//! declares per-key order, `B` unordered and slow) and two emitter processes
//! (`integration-tests/src/bin/chaos-*.rs`). While the emitters publish, a fault schedule
//! drawn from the seed SIGKILLs handler instances (restarted after a pause) and an emitter
//! (restarted as a new incarnation), SIGKILLs and restarts the broker, cuts the network
//! (connections reset), holds it half-open (one direction stalls) and adds latency spikes.
//! Then it waits until both groups have handled everything, reads every record file and the
//! dead-letter queues, and prints
//!
//! `chaos <adapter>: emitted N, handled N (group A) N (group B), lost 0, duplicates D (bound
//! B), dead-lettered P (expected P), order violations 0, peak RSS X MiB, faults F`
//!
//! failing on a loss, a duplicate count over the bound, an order violation, or an unexpected
//! dead letter. `memory://` and `sqlite://` run in one process (`chaos-solo`): memory gets
//! in-process faults only (its broker is the process), sqlite also SIGKILLs of the process,
//! which reopens the file.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::{sleep, spawn};
use std::time::{Duration, Instant};

use crate::artifacts::{self, Kind};
use crate::{Result, cargo, project_root, run_streaming};

/// Every adapter the suite knows, in the order of a full run.
pub(crate) const ADAPTERS: &[&str] = &[
    "memory", "redis", "kafka", "nats", "amqp", "postgres", "sqlite",
];

/// Handler concurrency per instance: the most events one instance has run and not settled
/// (the events it fetched ahead, as many again, never ran there: ADR 0024).
const CONCURRENCY: usize = 8;
/// Instances per group.
const INSTANCES: u32 = 3;
/// Emitter processes.
const EMITTERS: u32 = 2;
/// Keys per emitter incarnation.
const KEYS: u32 = 16;
/// One event in this many (by sequence number) is poison: dead-lettered in both groups.
const POISON_EVERY: u64 = 101;
/// Percentage of events failing their first attempt.
const FAIL_PCT: u64 = 5;
/// How long a killed process stays down.
const PAUSE: Duration = Duration::from_millis(1500);
/// Visibility timeout of the handlers: a killed instance's events come back after it.
const VISIBILITY: Duration = Duration::from_secs(5);
/// The run fails when nothing new is handled for this long after the emitters are done.
const STALL: Duration = Duration::from_secs(120);
/// Events per second of a soak run (`--soak`) when `--events` is not given.
const SOAK_RATE: u64 = 100;
/// The length of a soak run when `--duration` is not given.
const SOAK_DURATION: Duration = Duration::from_secs(3600);
/// The windows a soak run compares (at most a sixth of the run each).
const SOAK_WINDOW: Duration = Duration::from_secs(300);
/// How often a soak run samples the resident memory of its processes.
const SOAK_SAMPLE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) adapter: Option<String>,
    /// Default 50,000; with `soak`, [`SOAK_RATE`] per second of the duration.
    pub(crate) events: Option<u64>,
    pub(crate) duration: Option<String>,
    pub(crate) seed: Option<u64>,
    /// A soak run: no faults, a steady rate for an hour (or `duration`), and the drift of
    /// latency and memory between its first and last minutes.
    pub(crate) soak: bool,
}

/// `adapter`, or every adapter when `None`; an error naming the known ones for a typo.
fn adapters(adapter: Option<&str>) -> Result<Vec<&'static str>> {
    Ok(match adapter {
        Some(name) => vec![
            ADAPTERS
                .iter()
                .copied()
                .find(|a| *a == name)
                .ok_or_else(|| {
                    format!("unknown adapter `{name}`; known: {}", ADAPTERS.join(", "))
                })?,
        ],
        None => ADAPTERS.to_vec(),
    })
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    let adapters = adapters(opts.adapter.as_deref())?;
    let duration = match &opts.duration {
        Some(text) => parse_duration(text)?,
        None if opts.soak => SOAK_DURATION,
        None => default_duration(opts.events.unwrap_or(50_000)),
    };
    let events = opts.events.unwrap_or(if opts.soak {
        duration.as_secs() * SOAK_RATE
    } else {
        50_000
    });
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let bins = build()?;
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for adapter in adapters {
        let what = if opts.soak { "soak" } else { "chaos" };
        println!("\n==> {what} {adapter}: {events} events over {duration:?}, seed {seed}");
        let started = Instant::now();
        match run_adapter(adapter, &bins, events, duration, seed, opts.soak) {
            Ok(verdict) => {
                println!("{}", verdict.line);
                if let Some(soak) = &verdict.soak {
                    println!("{soak}");
                }
                println!(
                    "  (took {:.1}s; command: cargo xtask chaos --adapter {adapter} --events \
                     {events} --duration {}s --seed {seed}{})",
                    started.elapsed().as_secs_f64(),
                    duration.as_secs(),
                    if opts.soak { " --soak" } else { "" }
                );
                if !verdict.ok {
                    failed.push(format!("{adapter}: {}", verdict.problems.join("; ")));
                }
                lines.push(verdict.line);
                lines.extend(verdict.soak);
            }
            Err(e) => {
                let line = format!("chaos {adapter}: could not run: {e}");
                println!("{line}");
                failed.push(line.clone());
                lines.push(line);
            }
        }
    }
    println!("\n==> chaos summary (seed {seed})");
    for line in &lines {
        println!("{line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("chaos failed: {}", failed.join(" | ")))
    }
}

/// The short run of `cargo xtask test`: 5000 events per adapter, one handler kill, one broker
/// restart or cut.
pub(crate) fn test_step() -> Result<Vec<String>> {
    short_run(None)
}

/// `cargo xtask chaos --short [--adapter NAME]`: the short run on `adapter`, or on every
/// adapter (as `cargo xtask test` runs it).
pub(crate) fn short_run(adapter: Option<&str>) -> Result<Vec<String>> {
    let adapters = adapters(adapter)?;
    let seed = 18;
    let bins = build()?;
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for adapter in adapters {
        let started = Instant::now();
        // One adapter that cannot run (its broker down) fails the step, after the others
        // have run: their verdicts are not hidden behind it.
        let verdict = match run_adapter(adapter, &bins, 5000, default_duration(5000), seed, false) {
            Ok(verdict) => verdict,
            Err(e) => {
                eprintln!("chaos {adapter}: could not run: {e}");
                failed.push(format!("{adapter}: could not run: {e}"));
                continue;
            }
        };
        println!("{} ({:.0}s)", verdict.line, started.elapsed().as_secs_f64());
        if !verdict.ok {
            failed.push(format!("{adapter}: {}", verdict.problems.join("; ")));
        }
        lines.push(verdict.line);
    }
    if failed.is_empty() {
        Ok(lines)
    } else {
        Err(format!("chaos failed: {}", failed.join(" | ")))
    }
}

/// The emission phase: long enough for the fault schedule (at least 20 s, 1000 events/s).
fn default_duration(events: u64) -> Duration {
    Duration::from_secs((events / 1000).clamp(20, 600))
}

fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || format!("`{text}` is not a duration (examples: 90, 90s, 5m, 1h)");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs.max(1)))
}

/// The workload binaries.
struct Bins {
    emitter: PathBuf,
    handler: PathBuf,
    solo: PathBuf,
}

fn build() -> Result<Bins> {
    if artifacts::from_workspace_test_build() {
        let package = "evbus-integration-tests";
        let mut found = artifacts::find_all(&[
            (package, "chaos-emitter", Kind::Bin),
            (package, "chaos-handler", Kind::Bin),
            (package, "chaos-solo", Kind::Bin),
        ])?
        .into_iter()
        .map(|e| e.path);
        let mut next = || found.next().ok_or("chaos binaries missing");
        return Ok(Bins {
            emitter: next()?,
            handler: next()?,
            solo: next()?,
        });
    }
    let ok = run_streaming(
        cargo(&["build", "-p", "evbus-integration-tests", "--bins"]),
        |_| {},
    )?;
    if !ok {
        return Err("building the chaos binaries failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                project_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| project_root().join("target"));
    let dir = target.join("debug");
    Ok(Bins {
        emitter: dir.join("chaos-emitter"),
        handler: dir.join("chaos-handler"),
        solo: dir.join("chaos-solo"),
    })
}

/// A small seeded generator (splitmix64): the same seed gives the same fault schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A time in [lo, hi) of `span`.
    fn at(&mut self, span: Duration, lo: f64, hi: f64) -> Duration {
        let f = lo + (hi - lo) * (self.below(1_000_000) as f64 / 1_000_000.0);
        span.mul_f64(f)
    }
}

/// One step of the fault schedule.
#[derive(Clone, Debug)]
enum Action {
    KillHandler(char, u32),
    StartHandler(char, u32),
    KillEmitter(u32),
    StartEmitter(u32),
    /// SIGKILL of the broker (or of the solo process, for sqlite).
    KillBroker,
    StartBroker,
    Proxy(Mode),
}

/// What the proxy does with the bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pass,
    /// Every connection reset, new ones refused.
    Cut,
    /// Broker-to-client bytes stall (the client's writes still reach the broker).
    HalfOpen,
    /// Every chunk waits this long.
    Latency(Duration),
}

/// How an adapter is run.
#[derive(Debug)]
enum Setup {
    /// Emitters and handlers in their own processes, through the proxy.
    Processes {
        url: String,
        /// The broker the run owns (restartable), if any.
        broker: Option<BrokerSpec>,
    },
    /// Everything in one `chaos-solo` process.
    Solo { url: String, killable: bool },
}

#[derive(Debug, Clone)]
struct BrokerSpec {
    program: PathBuf,
    args: Vec<String>,
    port: u16,
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn wait_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        sleep(Duration::from_millis(100));
    }
    false
}

fn setup(adapter: &str, dir: &Path, proxy_port: u16, tag: &str) -> Result<(Setup, u16)> {
    let data = dir.join("broker");
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let data_s = data.display().to_string();
    let port = free_port()?;
    let proxied = |scheme_rest: &str| format!("{scheme_rest}127.0.0.1:{proxy_port}");
    Ok(match adapter {
        "memory" => (
            Setup::Solo {
                url: "memory://".into(),
                killable: false,
            },
            0,
        ),
        "sqlite" => (
            Setup::Solo {
                url: format!("sqlite://{}/bus.db", dir.display()),
                killable: true,
            },
            0,
        ),
        "redis" => (
            Setup::Processes {
                url: proxied("redis://"),
                broker: Some(BrokerSpec {
                    program: "redis-server".into(),
                    args: [
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        &port.to_string(),
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                        "--save",
                        "",
                        "--dir",
                        &data_s,
                    ]
                    .map(String::from)
                    .to_vec(),
                    port,
                }),
            },
            port,
        ),
        "nats" => (
            Setup::Processes {
                url: proxied("nats://"),
                broker: Some(BrokerSpec {
                    program: "nats-server".into(),
                    args: [
                        "-a",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-js",
                        "-sd",
                        &data_s,
                    ]
                    .map(String::from)
                    .to_vec(),
                    port,
                }),
            },
            port,
        ),
        "kafka" => {
            let tansu = crate::brokers::ensure_tansu()?;
            (
                Setup::Processes {
                    url: proxied("kafka://"),
                    broker: Some(BrokerSpec {
                        program: tansu,
                        args: vec![
                            "broker".into(),
                            "--listener-url".into(),
                            format!("tcp://127.0.0.1:{port}"),
                            "--advertised-listener-url".into(),
                            format!("tcp://127.0.0.1:{proxy_port}"),
                            "--storage-engine".into(),
                            "memory://tansu/".into(),
                        ],
                        port,
                    }),
                },
                port,
            )
        }
        // The shared brokers of the machine (the run does not own them: network faults only),
        // isolated by a prefix / schema of their own.
        "amqp" => (
            Setup::Processes {
                url: format!("amqp://guest:guest@127.0.0.1:{proxy_port}/%2f?prefix=chaos{tag}."),
                broker: None,
            },
            5672,
        ),
        "postgres" => (
            Setup::Processes {
                url: format!(
                    "postgres://postgres@127.0.0.1:{proxy_port}/postgres?schema=chaos_{tag}"
                ),
                broker: None,
            },
            5432,
        ),
        other => return Err(format!("no chaos setup for `{other}`")),
    })
}

/// A child process the run watches.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    peak_kib: u64,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        if let Some(out) = child.stdout.take() {
            spawn(move || {
                for line in BufReader::new(out).lines().map_while(std::io::Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            stdin,
            lines: rx,
            peak_kib: 0,
        })
    }

    /// Waits for a stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "{} did not print `{prefix}` within {within:?} (exit: {:?}; see its log)",
                        self.name,
                        self.child.try_wait().ok().flatten()
                    ));
                }
            }
        }
    }

    fn rss_kib(&self) -> u64 {
        vm_rss(self.child.id()).unwrap_or(0)
    }

    fn sample(&mut self) {
        if let Some(kib) = vm_hwm(self.child.id()) {
            self.peak_kib = self.peak_kib.max(kib);
        }
    }

    fn sigkill(&mut self) {
        self.sample();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Closes stdin (graceful stop) and waits up to `within`, then kills.
    fn stop(&mut self, within: Duration) {
        self.sample();
        self.stdin.take();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        self.sigkill();
    }

    fn send(&mut self, command: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{command}");
        }
    }
}

/// A process left running when a run stops early (an error) is killed, never orphaned.
impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// VmHWM (peak resident set) of `pid`, in KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// The resident set of `pid` now, in KiB.
fn vm_rss(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The TCP proxy between the clients and the broker.
struct Proxy {
    state: Arc<ProxyState>,
}

struct ProxyState {
    mode: Mutex<Mode>,
    conns: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
}

impl Proxy {
    fn start(listen: u16, upstream: u16) -> Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", listen))
            .map_err(|e| format!("proxy cannot listen on {listen}: {e}"))?;
        let state = Arc::new(ProxyState {
            mode: Mutex::new(Mode::Pass),
            conns: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        });
        let st = Arc::clone(&state);
        spawn(move || {
            for client in listener.incoming() {
                if st.stopped.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                if st.mode() == Mode::Cut {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                    let mut conns = st.conns.lock().unwrap_or_else(|e| e.into_inner());
                    conns.retain(|c| c.peer_addr().is_ok());
                    conns.push(c3);
                    conns.push(s3);
                }
                let up = Arc::clone(&st);
                spawn(move || pump(client, s2, &up, false));
                let down = Arc::clone(&st);
                spawn(move || pump(server, c2, &down, true));
            }
        });
        Ok(Proxy { state })
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        if mode == Mode::Cut {
            self.reset_all();
        }
    }

    fn reset_all(&self) {
        let conns =
            std::mem::take(&mut *self.state.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn stop(&self) {
        self.state.stopped.store(true, Ordering::Release);
        self.set(Mode::Cut);
    }
}

impl ProxyState {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Copies `from` to `to` under the proxy's mode; `downstream` is broker to client.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &ProxyState, downstream: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            match state.mode() {
                Mode::HalfOpen if downstream => sleep(Duration::from_millis(20)),
                Mode::Latency(d) => {
                    sleep(d);
                    break;
                }
                _ => break,
            }
        }
        if state.mode() == Mode::Cut || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The outcome of one adapter's run.
struct Verdict {
    line: String,
    ok: bool,
    problems: Vec<String>,
    /// A soak run's drift line.
    soak: Option<String>,
}

/// Counts of the faults that can cause duplicates.
#[derive(Default, Debug)]
struct Faults {
    total: u64,
    /// Handler instance kills per group.
    handler_kills: HashMap<char, u64>,
    /// Broker restarts, cuts, half-open spells, latency spikes, solo process kills.
    broker: u64,
    /// Handler processes that exited on their own and were restarted, per group.
    crashes: HashMap<char, u64>,
    /// When the run SIGKILLed the broker it owns (unix nanos).
    broker_kills_at: Vec<u128>,
}

/// Whether the broker may forget consumer state it had confirmed when it is SIGKILLed.
///
/// nats-server (2.9, file store) confirms an ack (the double-ack reply) and a delivery from
/// memory and writes the consumer's state to its store later. A SIGKILL forgets what was not
/// written yet: seconds of acknowledgements in the runs here. After its restart the server
/// hands those events out again, and as attempt 1, since it forgot their delivery count too.
/// Redis here runs with `appendfsync always` (an `XACK` is on disk before its reply); the
/// run does not SIGKILL the other brokers.
fn broker_forgets_acks(adapter: &str) -> bool {
    adapter == "nats"
}

/// Whether `h` ran after a broker SIGKILL that followed its emission: a handling the broker
/// may have redelivered without knowing (see [`broker_forgets_acks`]).
fn across_a_kill(h: &Handled, kills: &[u128]) -> bool {
    kills.iter().any(|&k| h.sent_nanos < k && k < h.nanos)
}

/// Unix time in nanoseconds, the clock of the handlers' records.
fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[allow(clippy::too_many_lines)]
fn run_adapter(
    adapter: &str,
    bins: &Bins,
    events: u64,
    duration: Duration,
    seed: u64,
    soak: bool,
) -> Result<Verdict> {
    let tag = format!("{seed}_{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("evbus-chaos/{adapter}-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("  records and logs: {}", dir.display());
    let proxy_port = free_port()?;
    let (setup, upstream) = setup(adapter, &dir, proxy_port, &tag)?;
    let short = events <= 5000;
    let mut rng = Rng(seed ^ fnv(adapter));

    // The fault schedule.
    let mut schedule: Vec<(Duration, Action)> = Vec::new();
    let kills = match (soak, short) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => 3,
    };
    for _ in 0..kills {
        let group = if rng.below(2) == 0 { 'A' } else { 'B' };
        let n = 1 + rng.below(u64::from(INSTANCES)) as u32;
        let at = rng.at(duration, 0.1, 0.8);
        schedule.push((at, Action::KillHandler(group, n)));
        schedule.push((at + PAUSE, Action::StartHandler(group, n)));
    }
    if !short && !soak {
        let e = rng.below(u64::from(EMITTERS)) as u32;
        let at = rng.at(duration, 0.2, 0.6);
        schedule.push((at, Action::KillEmitter(e)));
        schedule.push((at + PAUSE, Action::StartEmitter(e)));
    }
    let restartable = match &setup {
        Setup::Processes { broker, .. } => broker.is_some() && adapter != "kafka",
        Setup::Solo { killable, .. } => *killable,
    };
    let proxied = matches!(setup, Setup::Processes { .. });
    let restarts = if !restartable || soak {
        0
    } else if short {
        1
    } else {
        2
    };
    for _ in 0..restarts {
        let at = rng.at(duration, 0.15, 0.85);
        schedule.push((at, Action::KillBroker));
        schedule.push((at + PAUSE, Action::StartBroker));
    }
    if proxied && !soak {
        let spells: &[(Mode, Duration)] = if short && restarts == 0 {
            &[(Mode::Cut, Duration::from_secs(2))]
        } else if short {
            &[]
        } else {
            &[
                (Mode::Cut, Duration::from_secs(2)),
                (Mode::HalfOpen, Duration::from_secs(3)),
                (
                    Mode::Latency(Duration::from_millis(200)),
                    Duration::from_secs(3),
                ),
                (Mode::Cut, Duration::from_secs(1)),
            ]
        };
        // One spell per slot of the window, so that they never overlap.
        let slot = 0.75 / spells.len().max(1) as f64;
        for (i, (mode, length)) in spells.iter().enumerate() {
            let lo = 0.1 + slot * i as f64;
            let at = rng.at(duration, lo, lo + slot / 2.0);
            schedule.push((at, Action::Proxy(*mode)));
            schedule.push((at + *length, Action::Proxy(Mode::Pass)));
        }
    }
    schedule.sort_by_key(|(at, _)| *at);

    // Faulty runs emit over 80% of the phase (the schedule's last faults fall after it); a
    // soak run emits steadily over all of it.
    let rate = events as f64 / (duration.as_secs_f64() * if soak { 1.0 } else { 0.8 });
    let per_emitter = events / u64::from(EMITTERS);
    let mut faults = Faults::default();
    let mut problems = Vec::new();

    let proxy = if proxied {
        Some(Proxy::start(proxy_port, upstream)?)
    } else {
        None
    };
    let mut broker_spec = None;
    let mut broker: Option<Proc> = None;
    if let Setup::Processes {
        broker: Some(spec), ..
    } = &setup
    {
        broker = Some(start_broker(spec, &dir)?);
        broker_spec = Some(spec.clone());
    }
    let mut broker_peak = 0;

    let result = (|| -> Result<Verdict> {
        let mut handlers: HashMap<(char, u32), Proc> = HashMap::new();
        let mut emitters: HashMap<u32, (u32, Proc)> = HashMap::new();
        let mut solo: Option<(u32, Proc)> = None;
        let mut dead_procs: Vec<u64> = Vec::new();
        let mut ordering = true;

        match &setup {
            Setup::Processes { url, .. } => {
                // Started together: a Kafka consumer takes seconds to join its group.
                for group in ['A', 'B'] {
                    for n in 1..=INSTANCES {
                        handlers.insert((group, n), start_handler(bins, url, &dir, group, n)?);
                    }
                }
                for p in handlers.values_mut() {
                    let ready = p.wait_line("ready", Duration::from_secs(90))?;
                    ordering = ready.ends_with("per-key-order=true");
                }
                for e in 0..EMITTERS {
                    let p = start_emitter(bins, url, &dir, e, 0, per_emitter, rate)?;
                    emitters.insert(e, (0, p));
                }
            }
            Setup::Solo { url, .. } => {
                let mut p = start_solo(bins, url, &dir, 0, per_emitter, rate)?;
                let ready = p.wait_line("ready", Duration::from_secs(60))?;
                ordering = ready.ends_with("per-key-order=true");
                solo = Some((0, p));
            }
        }

        // The emission phase, with the faults.
        let started = Instant::now();
        let mut next = 0;
        let mut emitted_at = None;
        let mut last_progress = (0usize, Instant::now());
        let mut handled_at: Option<Instant> = None;
        // Soak: (time into the run, largest resident set of any handler or emitter, KiB).
        let mut rss: Vec<(Duration, u64)> = Vec::new();
        loop {
            let now = started.elapsed();
            if soak && rss.last().is_none_or(|(at, _)| now >= *at + SOAK_SAMPLE) {
                let largest = handlers
                    .values()
                    .chain(emitters.values().map(|(_, p)| p))
                    .chain(solo.iter().map(|(_, p)| p))
                    .map(Proc::rss_kib)
                    .max()
                    .unwrap_or(0);
                rss.push((now, largest));
            }
            while next < schedule.len() && schedule[next].0 <= now {
                let action = schedule[next].1.clone();
                next += 1;
                println!("  [{:>6.1}s] {action:?}", now.as_secs_f64());
                match action {
                    Action::KillHandler(g, n) => {
                        faults.total += 1;
                        *faults.handler_kills.entry(g).or_default() += 1;
                        if let Some((_, p)) = &mut solo {
                            p.send(&format!("kill-handler {g} {n}"));
                        } else if let Some(mut p) = handlers.remove(&(g, n)) {
                            p.sigkill();
                            dead_procs.push(p.peak_kib);
                        }
                    }
                    Action::StartHandler(g, n) => {
                        if let Setup::Processes { url, .. } = &setup {
                            let p = start_handler(bins, url, &dir, g, n)?;
                            handlers.insert((g, n), p);
                        }
                    }
                    Action::KillEmitter(e) => {
                        faults.total += 1;
                        if let Some((_, p)) = &mut solo {
                            emitted_at = None;
                            p.send(&format!("kill-emitter {e}"));
                        } else if let Some((_, p)) = emitters.get_mut(&e) {
                            p.sigkill();
                            dead_procs.push(p.peak_kib);
                        }
                    }
                    Action::StartEmitter(e) => {
                        if let (Setup::Processes { url, .. }, Some((inc, p))) =
                            (&setup, emitters.get_mut(&e))
                        {
                            let done = count_ok(&dir.join(format!("emitter-{e}.log")));
                            let left = per_emitter.saturating_sub(done);
                            *inc += 1;
                            *p = start_emitter(bins, url, &dir, e, *inc, left, rate)?;
                        }
                    }
                    Action::KillBroker => {
                        faults.total += 1;
                        faults.broker += 1;
                        if let Some(b) = &mut broker {
                            faults.broker_kills_at.push(unix_nanos());
                            b.sigkill();
                            broker_peak = broker_peak.max(b.peak_kib);
                        }
                        if let Some((_, p)) = &mut solo {
                            p.sigkill();
                            dead_procs.push(p.peak_kib);
                        }
                    }
                    Action::StartBroker => {
                        if let Some(spec) = &broker_spec {
                            broker = Some(start_broker(spec, &dir)?);
                        }
                        if let (Setup::Solo { url, .. }, Some((inc, p))) = (&setup, &mut solo) {
                            emitted_at = None;
                            *inc += 1;
                            *p = start_solo(bins, url, &dir, *inc, per_emitter, rate)?;
                        }
                    }
                    Action::Proxy(mode) => {
                        if mode != Mode::Pass {
                            faults.total += 1;
                            faults.broker += 1;
                        }
                        if let Some(proxy) = &proxy {
                            proxy.set(mode);
                        }
                    }
                }
            }

            // Sample memory, notice processes that died on their own.
            for p in handlers.values_mut() {
                p.sample();
            }
            for (_, p) in emitters.values_mut() {
                p.sample();
            }
            if let Some((_, p)) = &mut solo {
                p.sample();
            }
            if let Some(b) = &mut broker {
                b.sample();
                broker_peak = broker_peak.max(b.peak_kib);
            }
            if let Setup::Processes { url, .. } = &setup {
                let dead: Vec<(char, u32)> = handlers
                    .iter_mut()
                    .filter_map(|(k, p)| p.exited().map(|_| *k))
                    .collect();
                for key in dead {
                    println!(
                        "  handler {}{} exited on its own; restarting it",
                        key.0, key.1
                    );
                    *faults.crashes.entry(key.0).or_default() += 1;
                    if let Some(p) = handlers.get(&key) {
                        dead_procs.push(p.peak_kib);
                    }
                    handlers.insert(key, start_handler(bins, url, &dir, key.0, key.1)?);
                }
            }

            let emitting_done = next >= schedule.len()
                && match &mut solo {
                    Some((_, p)) => {
                        if emitted_at.is_none() && p.lines.try_recv().is_ok_and(|l| l == "emitted")
                        {
                            emitted_at = Some(Instant::now());
                        }
                        emitted_at.is_some()
                    }
                    None => {
                        let mut all = true;
                        for (e, (_, p)) in &mut emitters {
                            match p.exited() {
                                None => all = false,
                                Some(status) if status.success() => {}
                                Some(status) => {
                                    return Err(format!(
                                        "emitter {e} failed ({status}); see {}",
                                        dir.join(format!("emitter-{e}.stderr")).display()
                                    ));
                                }
                            }
                        }
                        all
                    }
                };
            if emitting_done {
                let records = Records::read(&dir)?;
                let handled = records.progress();
                if handled != last_progress.0 {
                    last_progress = (handled, Instant::now());
                }
                let (handled_all, dead_all) = records.complete();
                if handled_all && dead_all {
                    break;
                }
                // A dead-letter hook does not run when the ack after the dead letter failed
                // (the reply lost in a cut): the dead-letter queues are read below anyway.
                if handled_all {
                    let since = *handled_at.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                }
                if last_progress.1.elapsed() > STALL {
                    problems.push(format!(
                        "nothing new handled for {}s; stopped waiting",
                        STALL.as_secs()
                    ));
                    break;
                }
            }
            sleep(Duration::from_millis(250));
        }
        // Dead-letter hooks run just after the dead letter is stored; give stragglers a moment.
        sleep(Duration::from_secs(1));

        // Stop everything gracefully, then read the dead-letter queues.
        let mut peak_kib = dead_procs.iter().copied().max().unwrap_or(0);
        for p in handlers.values_mut() {
            p.stop(Duration::from_secs(15));
            peak_kib = peak_kib.max(p.peak_kib);
        }
        for (_, p) in emitters.values_mut() {
            p.stop(Duration::from_secs(5));
            peak_kib = peak_kib.max(p.peak_kib);
        }
        let mut dlq: HashMap<char, HashSet<String>> = HashMap::new();
        match (&setup, &mut solo) {
            (Setup::Processes { url, .. }, _) => {
                for group in ['A', 'B'] {
                    dlq.insert(group, dead_letters(bins, url, &dir, group)?);
                }
            }
            (Setup::Solo { url, killable }, Some((_, p))) => {
                p.stop(Duration::from_secs(15));
                peak_kib = peak_kib.max(p.peak_kib);
                if *killable {
                    for group in ['A', 'B'] {
                        dlq.insert(group, dead_letters(bins, url, &dir, group)?);
                    }
                }
            }
            _ => {}
        }
        let records = Records::read(&dir)?;
        let mut verdict = records.verdict(
            adapter,
            ordering,
            &dlq,
            &faults,
            peak_kib,
            broker_peak,
            problems.clone(),
        );
        if soak {
            verdict.soak = Some(soak_line(adapter, &records, &rss, duration, rate));
        }
        Ok(verdict)
    })();

    if let Some(proxy) = &proxy {
        proxy.stop();
    }
    if let Some(b) = &mut broker {
        b.sigkill();
    }
    result
}

/// A soak run's drift line: end-to-end latency (the event's `time` to the end of a
/// successful first attempt, both groups) and the largest resident set of any handler or
/// emitter, in the first and the last window of the emission phase.
fn soak_line(
    adapter: &str,
    records: &Records,
    rss: &[(Duration, u64)],
    duration: Duration,
    rate: f64,
) -> String {
    let window = SOAK_WINDOW.min(duration / 6);
    let latencies: Vec<(u128, u128)> = records
        .handled
        .values()
        .flatten()
        .filter(|h| h.attempt == 1 && h.sent_nanos > 0 && h.nanos >= h.sent_nanos)
        .map(|h| (h.sent_nanos, h.nanos - h.sent_nanos))
        .collect();
    let (Some(first), Some(last)) = (
        latencies.iter().map(|(sent, _)| *sent).min(),
        latencies.iter().map(|(sent, _)| *sent).max(),
    ) else {
        return format!("soak {adapter}: no first-attempt handling recorded an event time");
    };
    let w = window.as_nanos();
    let pick = |lo: u128, hi: u128| -> Vec<u128> {
        latencies
            .iter()
            .filter(|(sent, _)| *sent >= lo && *sent <= hi)
            .map(|(_, l)| *l)
            .collect()
    };
    let early = pick(first, first + w);
    let late = pick(last.saturating_sub(w), last);
    let ms = |nanos: u128| nanos as f64 / 1e6;
    let (p50a, p99a) = (percentile(&early, 50), percentile(&early, 99));
    let (p50b, p99b) = (percentile(&late, 50), percentile(&late, 99));
    let rss_in = |lo: Duration, hi: Duration| {
        rss.iter()
            .filter(|(at, _)| *at >= lo && *at <= hi)
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    };
    let rss_first = rss_in(Duration::ZERO, window);
    let rss_last = rss_in(duration.saturating_sub(window), duration);
    let drift = |a: f64, b: f64| {
        if a > 0.0 {
            format!("{:+.0}%", (b - a) / a * 100.0)
        } else {
            "n/a".to_owned()
        }
    };
    format!(
        "soak {adapter}: {} s at {rate:.0} events/s; latency first {} s p50 {:.1} ms p99 {:.1} ms, \
         last {} s p50 {:.1} ms p99 {:.1} ms (p99 drift {}); peak RSS first {} s {:.1} MiB, last \
         {} s {:.1} MiB (drift {})",
        duration.as_secs(),
        window.as_secs(),
        ms(p50a),
        ms(p99a),
        window.as_secs(),
        ms(p50b),
        ms(p99b),
        drift(ms(p99a), ms(p99b)),
        window.as_secs(),
        rss_first as f64 / 1024.0,
        window.as_secs(),
        rss_last as f64 / 1024.0,
        drift(rss_first as f64, rss_last as f64),
    )
}

/// The `p`th percentile (nearest rank) of `values`; 0 when empty.
fn percentile(values: &[u128], p: usize) -> u128 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn start_broker(spec: &BrokerSpec, dir: &Path) -> Result<Proc> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args);
    let mut p = Proc::spawn("broker", cmd, &dir.join("broker.out"))?;
    // Broker output goes to its log too, not to our pipe.
    if !wait_port(spec.port, Duration::from_secs(30)) {
        p.sigkill();
        return Err(format!(
            "the broker ({}) did not listen on {} within 30s; see {}",
            spec.program.display(),
            spec.port,
            dir.join("broker.out").display()
        ));
    }
    Ok(p)
}

fn start_handler(bins: &Bins, url: &str, dir: &Path, group: char, n: u32) -> Result<Proc> {
    let name = format!("{group}{n}");
    let mut cmd = Command::new(&bins.handler);
    cmd.args([
        "--url",
        url,
        "--group",
        &group.to_string(),
        "--instance",
        &name,
    ]);
    cmd.args(["--ordered", if group == 'A' { "1" } else { "0" }]);
    cmd.args(["--concurrency", &CONCURRENCY.to_string()]);
    cmd.args(["--fail-pct", &FAIL_PCT.to_string()]);
    cmd.args(["--slow-ms", if group == 'B' { "2" } else { "0" }]);
    cmd.args(["--visibility-ms", &VISIBILITY.as_millis().to_string()]);
    cmd.arg("--out")
        .arg(dir.join(format!("handler-{name}.log")));
    Proc::spawn(
        &format!("handler {name}"),
        cmd,
        &dir.join(format!("handler-{name}.stderr")),
    )
}

fn start_emitter(
    bins: &Bins,
    url: &str,
    dir: &Path,
    e: u32,
    incarnation: u32,
    count: u64,
    rate: f64,
) -> Result<Proc> {
    let mut cmd = Command::new(&bins.emitter);
    cmd.args(["--url", url, "--emitter", &e.to_string()]);
    cmd.args(["--incarnation", &incarnation.to_string()]);
    cmd.args(["--count", &count.to_string(), "--keys", &KEYS.to_string()]);
    cmd.args(["--rate", &format!("{:.1}", rate / f64::from(EMITTERS))]);
    cmd.args(["--poison-every", &POISON_EVERY.to_string()]);
    cmd.arg("--out").arg(dir.join(format!("emitter-{e}.log")));
    Proc::spawn(
        &format!("emitter {e}"),
        cmd,
        &dir.join(format!("emitter-{e}.stderr")),
    )
}

fn start_solo(
    bins: &Bins,
    url: &str,
    dir: &Path,
    incarnation: u32,
    per_emitter: u64,
    rate: f64,
) -> Result<Proc> {
    let mut cmd = Command::new(&bins.solo);
    cmd.args(["--url", url]).arg("--dir").arg(dir);
    cmd.args(["--emitters", &EMITTERS.to_string()]);
    cmd.args([
        "--count",
        &per_emitter.to_string(),
        "--keys",
        &KEYS.to_string(),
    ]);
    cmd.args(["--rate", &format!("{:.1}", rate / f64::from(EMITTERS))]);
    cmd.args(["--poison-every", &POISON_EVERY.to_string()]);
    cmd.args(["--incarnation", &incarnation.to_string()]);
    cmd.args(["--concurrency", &CONCURRENCY.to_string()]);
    cmd.args(["--fail-pct", &FAIL_PCT.to_string(), "--slow-ms", "2"]);
    cmd.args(["--visibility-ms", &VISIBILITY.as_millis().to_string()]);
    Proc::spawn("solo", cmd, &dir.join("solo.stderr"))
}

/// The ids in `group`'s dead-letter queue, read by a `chaos-handler --dead-letters` process.
fn dead_letters(bins: &Bins, url: &str, dir: &Path, group: char) -> Result<HashSet<String>> {
    let mut cmd = Command::new(&bins.handler);
    cmd.args(["--url", url, "--dead-letters", &group.to_string()]);
    let mut p = Proc::spawn(
        &format!("dead letters {group}"),
        cmd,
        &dir.join("dead-letters.stderr"),
    )?;
    let mut ids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match p.lines.recv_timeout(left) {
            Ok(line) if line == "end" => break,
            Ok(line) => {
                ids.insert(line);
            }
            Err(_) => {
                p.sigkill();
                return Err(format!(
                    "reading the dead letters of group {group} failed; see {}",
                    dir.join("dead-letters.stderr").display()
                ));
            }
        }
    }
    let _ = p.child.wait();
    Ok(ids)
}

/// Most lines [`trail`] shows.
const TRAIL_LINES: usize = 40;

impl Records {
    /// [`trail`] of `id` in these records' folder ("" when they were not read from one).
    fn trail(&self, id: &str) -> String {
        self.dir
            .as_deref()
            .map(|dir| trail(dir, id))
            .unwrap_or_default()
    }
}

/// Every line of the run's records and process logs that names event `id` (the emitter's
/// publish and retries, each handling with its attempt, dead letters with their reason, the
/// processes' warnings), each after its file's name: what a failed run prints under its
/// verdict, so that the CI log alone tells what happened to the event (the folder of a
/// clean-clone run is gone with its machine).
fn trail(dir: &Path, id: &str) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return String::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    let mut lines = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            // Whole id only: `s9` must not match `s93`.
            let names_it = line.match_indices(id).any(|(at, _)| {
                let after = line[at + id.len()..].chars().next();
                !after.is_some_and(|c| c.is_ascii_alphanumeric())
            });
            if names_it {
                lines.push(format!("    {name}: {}", line.trim()));
            }
        }
    }
    if lines.is_empty() {
        return format!("\n  trail of {id}: no record names it");
    }
    let more = lines.len().saturating_sub(TRAIL_LINES);
    lines.truncate(TRAIL_LINES);
    if more > 0 {
        lines.push(format!("    ... {more} more lines in {}", dir.display()));
    }
    format!("\n  trail of {id}:\n{}", lines.join("\n"))
}

fn count_ok(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| l.starts_with("O ")).count() as u64)
        .unwrap_or(0)
}

/// One handled event: key, seq, time.
struct Handled {
    id: String,
    key: String,
    seq: u64,
    instance: String,
    attempt: u32,
    nanos: u128,
    /// The event's `time` (set by the emitting bus), unix nanos; 0 when absent.
    sent_nanos: u128,
}

/// Everything the record files say.
#[derive(Default)]
struct Records {
    /// Ok'd events: id -> poison.
    emitted: HashMap<String, bool>,
    /// Publishes retried after an error.
    retries: u64,
    handled: HashMap<char, Vec<Handled>>,
    /// Dead letters the hooks saw, per group.
    dead: HashMap<char, HashSet<String>>,
    /// Where the records are (for [`trail`] of an event the verdict reports).
    dir: Option<PathBuf>,
}

impl Records {
    fn read(dir: &Path) -> Result<Records> {
        let mut r = Records {
            dir: Some(dir.to_owned()),
            ..Records::default()
        };
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".log") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let group = name
                .strip_prefix("handler-")
                .and_then(|rest| rest.chars().next());
            for line in text.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                match (f.as_slice(), group) {
                    (["O", id, _key, _seq, poison], None) => {
                        r.emitted.insert((*id).to_owned(), *poison == "1");
                    }
                    (["R", _], None) => r.retries += 1,
                    (["H", id, key, seq, instance, attempt, nanos, rest @ ..], Some(g)) => {
                        r.handled.entry(g).or_default().push(Handled {
                            id: (*id).to_owned(),
                            key: (*key).to_owned(),
                            seq: seq.parse().unwrap_or(0),
                            instance: (*instance).to_owned(),
                            attempt: attempt.parse().unwrap_or(0),
                            nanos: nanos.parse().unwrap_or(0),
                            sent_nanos: rest.first().and_then(|s| s.parse().ok()).unwrap_or(0),
                        });
                    }
                    // `D <id> <reason...>`.
                    (["D", id, ..], Some(g)) => {
                        r.dead.entry(g).or_default().insert((*id).to_owned());
                    }
                    // A line cut by a kill mid-write (not expected: one write per line).
                    _ => {}
                }
            }
        }
        Ok(r)
    }

    fn progress(&self) -> usize {
        self.handled.values().map(Vec::len).sum::<usize>()
            + self.dead.values().map(HashSet::len).sum::<usize>()
    }

    /// Whether both groups handled every Ok'd event that is not poison, and whether their
    /// dead-letter hooks reported every poison one.
    fn complete(&self) -> (bool, bool) {
        let mut handled_all = true;
        let mut dead_all = true;
        for g in ['A', 'B'] {
            let handled: HashSet<&str> = self
                .handled
                .get(&g)
                .map(|v| v.iter().map(|h| h.id.as_str()).collect())
                .unwrap_or_default();
            let dead = self.dead.get(&g);
            for (id, poison) in &self.emitted {
                if *poison {
                    dead_all &= dead.is_some_and(|d| d.contains(id));
                } else {
                    handled_all &= handled.contains(id.as_str());
                }
            }
        }
        (handled_all, dead_all)
    }

    #[allow(clippy::too_many_arguments)]
    fn verdict(
        &self,
        adapter: &str,
        ordering: bool,
        dlq: &HashMap<char, HashSet<String>>,
        faults: &Faults,
        peak_kib: u64,
        broker_kib: u64,
        mut problems: Vec<String>,
    ) -> Verdict {
        let emitted = self.emitted.len();
        let mut handled_counts = Vec::new();
        let mut lost = 0;
        let mut duplicates = 0;
        let mut dead_lettered = 0;
        let expected_dead = 2 * self.emitted.values().filter(|p| **p).count();
        let mut order_violations = 0;
        let mut group_inversions = 0;
        let mut bound = 0;
        let mut forgotten = 0;
        let forgetful_kills: &[u128] = if broker_forgets_acks(adapter) {
            &faults.broker_kills_at
        } else {
            &[]
        };
        for g in ['A', 'B'] {
            let empty = Vec::new();
            let handled = self.handled.get(&g).unwrap_or(&empty);
            let mut times: HashMap<&str, u64> = HashMap::new();
            for h in handled {
                *times.entry(h.id.as_str()).or_default() += 1;
            }
            duplicates += times.values().map(|n| n - 1).sum::<u64>();
            // Handlings beyond the first that a broker restart caused by forgetting the
            // acknowledgement of the earlier one: reported apart, not the transport's doing.
            if broker_forgets_acks(adapter) && !faults.broker_kills_at.is_empty() {
                let mut first: HashMap<&str, u128> = HashMap::new();
                for h in handled {
                    let t = first.entry(h.id.as_str()).or_insert(h.nanos);
                    *t = (*t).min(h.nanos);
                }
                forgotten += handled
                    .iter()
                    .filter(|h| {
                        let t0 = first[h.id.as_str()];
                        h.nanos != t0
                            && faults
                                .broker_kills_at
                                .iter()
                                .any(|&k| t0 < k && k < h.nanos)
                    })
                    .count() as u64;
            }
            // The dead-letter queue itself when it could be read; the hooks' records otherwise.
            let dead: HashSet<&String> = match dlq.get(&g) {
                Some(ids) => ids
                    .iter()
                    .chain(self.dead.get(&g).into_iter().flatten())
                    .collect(),
                None => self.dead.get(&g).into_iter().flatten().collect(),
            };
            let mut ok = 0;
            let mut lost_g = Vec::new();
            for (id, poison) in &self.emitted {
                if *poison {
                    if dead.contains(id) {
                        dead_lettered += 1;
                    } else {
                        lost_g.push(id.clone());
                    }
                } else if times.contains_key(id.as_str()) {
                    ok += 1;
                } else {
                    lost_g.push(id.clone());
                }
            }
            let unexpected: Vec<&&String> = dead
                .iter()
                .filter(|id| self.emitted.get(id.as_str()) == Some(&false))
                .collect();
            if !unexpected.is_empty() {
                problems.push(format!(
                    "group {g}: {} events dead-lettered that should not have been (e.g. {}){}",
                    unexpected.len(),
                    unexpected[0],
                    self.trail(unexpected[0])
                ));
            }
            if !lost_g.is_empty() {
                lost_g.sort();
                problems.push(format!(
                    "group {g} lost {} events (e.g. {}){}",
                    lost_g.len(),
                    lost_g[..lost_g.len().min(5)].join(", "),
                    self.trail(&lost_g[0])
                ));
            }
            lost += lost_g.len();
            handled_counts.push(ok);

            // Per-key order in group A, in the scope the transport promises it: across the
            // group where a key sticks to one consumer (Kafka: a partition has one consumer at
            // a time), per consumer elsewhere (competing consumers split a stream entry by
            // entry, so two instances run neighbouring events of a key side by side).
            if g == 'A' && ordering {
                let group_scope = adapter == "kafka";
                let (violations, example) = order_breaks(handled, group_scope, forgetful_kills);
                order_violations += violations;
                if let Some(example) = example {
                    problems.push(format!(
                        "{violations} per-key order violations in group A (e.g. {example})"
                    ));
                }
                if !group_scope {
                    group_inversions = order_breaks(handled, true, forgetful_kills).0;
                }
            }

            // The contract: at-least-once; an event is handled again only if the instance
            // holding it died or could not settle it. Per fault, at most the in-flight
            // events of the instances it hit: CONCURRENCY per killed instance, CONCURRENCY
            // per instance for a fault that hits every instance (broker restart, network
            // fault, solo process kill); plus each publish retried after an error.
            let kills = faults.handler_kills.get(&g).copied().unwrap_or(0)
                + faults.crashes.get(&g).copied().unwrap_or(0);
            bound +=
                (kills + faults.broker * u64::from(INSTANCES)) * CONCURRENCY as u64 + self.retries;
        }
        if duplicates - forgotten > bound {
            problems.push(format!(
                "duplicates {} over the bound {bound}",
                duplicates - forgotten
            ));
        }
        if dead_lettered != expected_dead {
            problems.push(format!(
                "dead-lettered {dead_lettered}, expected {expected_dead}"
            ));
        }
        // The broker's own forgetting is reported beside the transport's duplicates.
        let duplicates = duplicates - forgotten;
        let line = format!(
            "chaos {adapter}: emitted {emitted}, handled {} (group A) {} (group B), lost {lost}, \
             duplicates {duplicates} (bound {bound}), dead-lettered {dead_lettered} (expected \
             {expected_dead}), order violations {}, peak RSS {:.0} MiB, faults {}",
            handled_counts[0],
            handled_counts[1],
            if ordering {
                order_violations.to_string()
            } else {
                "n/a (no per-key order declared)".into()
            },
            peak_kib as f64 / 1024.0,
            faults.total
        );
        let mut line = line;
        if broker_kib > 0 {
            line.push_str(&format!(
                " [broker peak RSS {:.0} MiB]",
                broker_kib as f64 / 1024.0
            ));
        }
        if group_inversions > 0 {
            line.push_str(&format!(
                " [group-wide per-key inversions {group_inversions}, not promised by this \
                 transport]"
            ));
        }
        let crashes: u64 = faults.crashes.values().sum();
        if crashes > 0 {
            line.push_str(&format!(" [handler self-exits {crashes}]"));
        }
        if forgotten > 0 {
            line.push_str(&format!(
                " [{forgotten} more handlings after the broker forgot acknowledgements in a \
                 restart]"
            ));
        }
        let ok = lost == 0 && order_violations == 0 && duplicates <= bound && problems.is_empty();
        for p in &problems {
            println!("  problem: {p}");
        }
        Verdict {
            line,
            ok,
            problems,
            soak: None,
        }
    }
}

/// Per-key order breaks among `handled`: in `group_scope`, the first handling of each event
/// across the group must follow publish order; otherwise, per instance, the first deliveries
/// (attempt 1 and the first handling in the group; redeliveries come back later by
/// contract) must. Returns the count and an
/// example.
/// Per-key order breaks among first deliveries. `kills`: SIGKILLs of a broker that forgets
/// delivery state ([`broker_forgets_acks`]); an event emitted before one and handled after
/// it may be a redelivery the broker hands out as attempt 1, so it is left out.
fn order_breaks(handled: &[Handled], group_scope: bool, kills: &[u128]) -> (u64, Option<String>) {
    // The first handling of each event in the group: a later one is a redelivery, which may
    // come back with attempt 1 when the broker lost its delivery count (a NATS restart).
    let mut first: HashMap<&str, u128> = HashMap::new();
    for h in handled {
        let t = first.entry(h.id.as_str()).or_insert(h.nanos);
        *t = (*t).min(h.nanos);
    }
    let mut by_key: HashMap<(&str, &str), Vec<&Handled>> = HashMap::new();
    for h in handled {
        if across_a_kill(h, kills) {
            continue;
        }
        if group_scope {
            by_key.entry((h.key.as_str(), "")).or_default().push(h);
        } else if h.attempt == 1 && first.get(h.id.as_str()) == Some(&h.nanos) {
            by_key
                .entry((h.key.as_str(), h.instance.as_str()))
                .or_default()
                .push(h);
        }
    }
    let mut breaks = 0;
    let mut example = None;
    for ((key, instance), mut hs) in by_key {
        hs.sort_by_key(|h| h.nanos);
        let mut seen = HashSet::new();
        let mut last = 0;
        for h in hs {
            if !seen.insert(h.id.as_str()) {
                continue;
            }
            if h.seq < last {
                breaks += 1;
                example.get_or_insert_with(|| {
                    format!("key {key} {instance}: seq {} after {last}", h.seq)
                });
            }
            last = last.max(h.seq);
        }
    }
    (breaks, example)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, key: &str, seq: u64, instance: &str, attempt: u32, nanos: u128) -> Handled {
        Handled {
            id: id.into(),
            key: key.into(),
            seq,
            instance: instance.into(),
            attempt,
            nanos,
            sent_nanos: 0,
        }
    }

    #[test]
    fn one_adapter_or_all_are_selected() {
        assert_eq!(adapters(Some("redis")).unwrap(), ["redis"]);
        assert_eq!(adapters(None).unwrap(), ADAPTERS);
        assert_eq!(
            adapters(Some("redis-cluster")).unwrap_err(),
            "unknown adapter `redis-cluster`; known: memory, redis, kafka, nats, amqp, \
             postgres, sqlite"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_schedule_rng_is_seeded() {
        let (mut a, mut b, mut c) = (Rng(7), Rng(7), Rng(8));
        let xs: Vec<u64> = (0..4).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.next()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn order_is_checked_per_instance_or_across_the_group() {
        // k: 1 and 2 on two instances side by side, 2 finishing first.
        let side_by_side = [h("a", "k", 1, "A1", 1, 20), h("b", "k", 2, "A2", 1, 10)];
        assert_eq!(order_breaks(&side_by_side, false, &[]).0, 0);
        assert_eq!(order_breaks(&side_by_side, true, &[]).0, 1);
        // One instance seeing 2 before 1 is a break in either scope.
        let swapped = [h("a", "k", 1, "A1", 1, 20), h("b", "k", 2, "A1", 1, 10)];
        assert_eq!(order_breaks(&swapped, false, &[]).0, 1);
        // A redelivery (handled before by another instance) is not a first delivery, even
        // with attempt 1.
        let redelivered = [
            h("a", "k", 1, "A2", 1, 5),
            h("b", "k", 2, "A1", 1, 10),
            h("a", "k", 1, "A1", 1, 20),
        ];
        assert_eq!(order_breaks(&redelivered, false, &[]).0, 0);
        assert_eq!(order_breaks(&redelivered, true, &[]).0, 0);
    }

    #[test]
    fn a_reported_event_comes_with_its_trail() {
        let dir = std::env::temp_dir().join(format!("evbus-chaos-trail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("emitter-0.log"),
            "O e0k1s9 e0k1 9 0\nO e0k1s93 e0k1 93 0\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("handler-B1.log"),
            "D e0k1s93 max attempts exceeded (5 deliveries, 4 allowed)\n",
        )
        .unwrap();
        let trail = trail(&dir, "e0k1s9");
        assert!(
            trail.contains("emitter-0.log: O e0k1s9 e0k1 9 0"),
            "{trail}"
        );
        assert!(!trail.contains("s93"), "another event's lines: {trail}");
        let trail = super::trail(&dir, "e0k1s93");
        assert!(
            trail.contains("handler-B1.log: D e0k1s93 max attempts exceeded"),
            "{trail}"
        );
        assert!(super::trail(&dir, "nowhere").contains("no record names it"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lost_event_fails_the_verdict() {
        let mut r = Records::default();
        r.emitted.insert("e1".into(), false);
        r.emitted.insert("e2".into(), false);
        r.emitted.insert("p".into(), true);
        for g in ['A', 'B'] {
            r.handled
                .entry(g)
                .or_default()
                .push(h("e1", "k", 1, "x", 1, 1));
            r.dead.entry(g).or_default().insert("p".into());
        }
        r.handled
            .entry('B')
            .or_default()
            .push(h("e2", "k", 2, "x", 1, 2));
        let v = r.verdict(
            "redis",
            true,
            &HashMap::new(),
            &Faults::default(),
            0,
            0,
            vec![],
        );
        assert!(!v.ok);
        assert!(v.line.contains("lost 1,"), "{}", v.line);
        assert!(
            v.line.contains("dead-lettered 2 (expected 2)"),
            "{}",
            v.line
        );
        // Handled by A too: nothing lost; a second handling is a duplicate over a zero bound.
        for id in ["e2", "e2"] {
            r.handled
                .entry('A')
                .or_default()
                .push(h(id, "k", 2, "x", 1, 3));
        }
        let v = r.verdict(
            "redis",
            true,
            &HashMap::new(),
            &Faults::default(),
            0,
            0,
            vec![],
        );
        assert!(v.line.contains("lost 0,"), "{}", v.line);
        assert!(v.line.contains("duplicates 1 (bound 0)"), "{}", v.line);
        assert!(!v.ok);
    }

    #[test]
    fn nats_redeliveries_across_a_broker_kill_are_reported_apart() {
        let second = 1_000_000_000u128;
        let kill = 100 * second;
        let mut r = Records::default();
        r.emitted.insert("e1".into(), false);
        r.emitted.insert("e2".into(), false);
        for g in ['A', 'B'] {
            let hs = r.handled.entry(g).or_default();
            // e1 handled before the kill and again after it, as attempt 1; e2 twice before.
            let mut first = h("e1", "k", 1, "x", 1, kill - second);
            first.sent_nanos = kill - 2 * second;
            let mut again = h("e1", "k", 1, "y", 1, kill + second);
            again.sent_nanos = kill - 2 * second;
            hs.extend([first, again]);
            hs.push(h("e2", "k", 2, "x", 1, kill - second / 2));
            hs.push(h("e2", "k", 2, "x", 2, kill - second / 4));
        }
        let faults = Faults {
            broker_kills_at: vec![kill],
            ..Faults::default()
        };
        let nats = r.verdict("nats", true, &HashMap::new(), &faults, 0, 0, vec![]);
        // e2's second run is the transport's duplicate (bound 0 here: no fault counted);
        // e1's is the broker's forgetting, reported apart; its late first-attempt handling
        // is not an order violation.
        assert!(
            nats.line.contains("duplicates 2 (bound 0)"),
            "{}",
            nats.line
        );
        assert!(
            nats.line.contains("[2 more handlings after the broker"),
            "{}",
            nats.line
        );
        assert!(nats.line.contains("order violations 0"), "{}", nats.line);
        let redis = r.verdict("redis", true, &HashMap::new(), &faults, 0, 0, vec![]);
        assert!(
            redis.line.contains("duplicates 4 (bound 0)"),
            "{}",
            redis.line
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u128> = (1..=100).rev().collect();
        assert_eq!(percentile(&values, 50), 50);
        assert_eq!(percentile(&values, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 99), 0);
    }
}
