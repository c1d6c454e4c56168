//! `cargo xtask bench [--adapter NAME] [--quick] [--callgrind] [--baseline REF] [--gateway]`.
//!
//! Builds the `evbus-bench` program (package `benches/`) in release and runs it:
//!
//! - the throughput and latency loops of every adapter (`memory`, `redis`; `kafka`, `nats` and
//!   `amqp` when `crates/evbus-kafka` / `crates/evbus-nats` / `crates/evbus-amqp` is a
//!   workspace member and its broker answers at `EVBUS_KAFKA_URL` / `EVBUS_NATS_URL` /
//!   `EVBUS_AMQP_URL`; otherwise a `bench NAME: not run (...)` line says why); JSON under
//!   `<target>/bench/`;
//! - the callgrind scenarios (instructions, allocations and system calls per event on the
//!   in-memory transport), each with 1,000 and 2,000 events, differenced;
//! - `report`, which regenerates `docs/benchmarks.md` and `docs/benchmarks.svg`.
//!
//! Plain `bench` does all three; `--quick` only the loops (no docs); `--callgrind` only the
//! scenarios (docs regenerated with the last full run's loops); `--baseline REF` also builds
//! REF in a git worktree under `<target>/bench/` with today's bench program and reports every
//! scenario more than 2% worse in instructions or with half a system call per event more.
//! `--peers` and `--gateway` measure against the peer libraries and the gateway against bare
//! handlers.
//!
//! What the page shows is kept in the repository, under `benches/results/` ([`RESULTS`]):
//! each adapter's last full run of the loops (`loops/<adapter>.json`) and of the peers
//! (`peers/<adapter>.json`), the last full gateway run (`gateway.txt`) and the last callgrind
//! figures (`callgrind.json`). A full run replaces the files of what it measured only, so the
//! page can be completed one adapter at a time (`--adapter NAME`), on different days; each
//! adapter's section says when and on which commit its run was made.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Result, cargo, display, project_root};

/// An adapter the bench knows: its name, its package directory and its broker.
struct BenchAdapter {
    name: &'static str,
    /// The workspace member that must exist (`None`: always there).
    member: Option<&'static str>,
    /// The broker URL variable and its default (`None`: in process).
    url: Option<(&'static str, &'static str)>,
    /// The cargo feature of evbus-bench that carries its loops.
    feature: Option<&'static str>,
}

/// Every adapter, in run order. A new adapter is one more row here and a `raw` loop in
/// `benches/src/carriers/`.
const ADAPTERS: &[BenchAdapter] = &[
    BenchAdapter {
        name: "memory",
        member: None,
        url: None,
        feature: None,
    },
    BenchAdapter {
        name: "redis",
        member: Some("crates/evbus-redis"),
        url: Some(("EVBUS_REDIS_URL", "redis://127.0.0.1:6379")),
        feature: None,
    },
    BenchAdapter {
        // The same broker, evbus writing CloudEvents structured mode (ADR 0030).
        name: "redis-structured",
        member: Some("crates/evbus-redis"),
        url: Some(("EVBUS_REDIS_URL", "redis://127.0.0.1:6379")),
        feature: None,
    },
    BenchAdapter {
        name: "kafka",
        member: Some("crates/evbus-kafka"),
        url: Some(("EVBUS_KAFKA_URL", "kafka://127.0.0.1:9092")),
        feature: Some("kafka"),
    },
    BenchAdapter {
        name: "nats",
        member: Some("crates/evbus-nats"),
        // A nats-server with JetStream on (`-js`).
        url: Some(("EVBUS_NATS_URL", "nats://127.0.0.1:4222")),
        feature: Some("nats"),
    },
    BenchAdapter {
        name: "amqp",
        member: Some("crates/evbus-amqp"),
        url: Some(("EVBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
        feature: Some("amqp"),
    },
    BenchAdapter {
        name: "postgres",
        member: Some("crates/evbus-sql"),
        url: Some((
            "EVBUS_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )),
        feature: Some("sql"),
    },
    BenchAdapter {
        name: "sqlite",
        member: Some("crates/evbus-sql"),
        // In process: a file in a temporary directory.
        url: None,
        feature: Some("sql"),
    },
];

/// The optional rows of `benches/Cargo.toml`: the adapter crate each needs, and what marks
/// its lines (a dependency name, the feature line, its comment). A baseline worktree of a
/// commit without that crate gets the manifest without those lines, so it still builds.
const OPTIONAL_ROWS: &[(&str, &[&str])] = &[
    (
        "crates/evbus-kafka",
        &["evbus-kafka", "rdkafka", "kafka = ", "# The Kafka rows"],
    ),
    (
        "crates/evbus-nats",
        &["evbus-nats", "async-nats", "nats = ", "# The NATS rows"],
    ),
    (
        "crates/evbus-amqp",
        &["evbus-amqp", "lapin", "amqp = ", "# The AMQP rows"],
    ),
    (
        "crates/evbus-sql",
        &["evbus-sql", "sqlx", "sql = ", "# The SQL rows"],
    ),
];

/// `manifest` (benches/Cargo.toml) without the lines of the optional rows whose adapter
/// crate `exists` says is missing.
fn strip_optional_rows(manifest: &str, exists: impl Fn(&str) -> bool) -> String {
    let missing: Vec<&str> = OPTIONAL_ROWS
        .iter()
        .filter(|(krate, _)| !exists(krate))
        .flat_map(|(_, marks)| marks.iter().copied())
        .collect();
    let kept: Vec<&str> = manifest
        .lines()
        .filter(|l| !missing.iter().any(|m| l.contains(m)))
        .collect();
    kept.join("\n") + "\n"
}

/// The callgrind scenarios measured per event.
/// (`-16`: the same with 16-byte payloads, which isolates the code from payload scanning.)
const SCENARIOS: &[&str] = &[
    "consume-decode",
    "consume-decode-16",
    "emit-handle",
    "emit-handle-16",
    "emit-handle-validated",
    "emit-typed-validated",
    "emit-value-handle",
    "emit-ordered-handle",
];

/// Instructions may grow this much against `--baseline` before a scenario is reported.
const BASELINE_TOLERANCE_PCT: f64 = 2.0;

/// System calls per event may grow this much against `--baseline` before a scenario is
/// reported: half a call per event is a new call on at least every other event.
const BASELINE_SYSCALL_TOLERANCE: f64 = 0.5;

/// Options of `cargo xtask bench`.
#[derive(Debug, Default)]
pub(crate) struct Options {
    pub(crate) adapter: Option<String>,
    pub(crate) quick: bool,
    pub(crate) callgrind: bool,
    pub(crate) baseline: Option<String>,
    /// Against the peer libraries instead of the raw clients.
    pub(crate) peers: bool,
    /// Only regenerates the page from the kept results.
    pub(crate) report: bool,
    /// Only the gateway rows (`evbus-bench gateway`).
    pub(crate) gateway: bool,
}

/// `--gateway`: builds evbus-bench with the `gateway` feature and runs `evbus-bench gateway`,
/// which prints the `bench gateway ...` lines. A full (not `--quick`) run keeps them in
/// `benches/results/gateway.txt` and regenerates docs/benchmarks.md when a full run of the
/// loops is kept, so the page carries the gateway's last full figures.
fn run_gateway(options: &Options) -> Result<()> {
    let target = target_dir();
    if !build(&["gateway"], &target, None)? {
        return Err("evbus-bench does not build with the `gateway` feature".to_owned());
    }
    let bin = target.join("release").join("evbus-bench");
    let mut cmd = Command::new(&bin);
    cmd.arg("gateway");
    if options.quick {
        cmd.arg("--quick");
    }
    let output = cmd
        .current_dir(project_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        return Err(format!("the gateway bench failed: {}", output.status));
    }
    if options.quick {
        eprintln!("bench: --quick leaves docs/benchmarks.md as it is (a full run regenerates it)");
        return Ok(());
    }
    let results = results_dir();
    std::fs::create_dir_all(&results)
        .map_err(|e| format!("creating {}: {e}", results.display()))?;
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("bench gateway "))
        .collect();
    let kept = format!(
        "# {} cargo xtask bench --gateway\n{}\n",
        utc_now(),
        lines.join("\n")
    );
    std::fs::write(results.join(GATEWAY_FILE), kept)
        .map_err(|e| format!("writing the gateway lines: {e}"))?;
    report(&bin)
}

/// Where the results the page is made of are kept, in the repository.
const RESULTS: &str = "benches/results";
/// Under [`RESULTS`]: each adapter's last full run of the loops, `<adapter>.json`.
const LOOPS_DIR: &str = "loops";
/// Under [`RESULTS`]: each adapter's last full peer run, `<adapter>.json`.
const PEERS_DIR: &str = "peers";
/// Under [`LOOPS_DIR`]: why adapters without a result there were not run, `name=why` lines.
const NOT_RUN_FILE: &str = "not-run.txt";
/// Under [`RESULTS`]: the last full gateway run's lines, after a `# date command` line.
const GATEWAY_FILE: &str = "gateway.txt";
/// Under [`RESULTS`]: the last callgrind figures.
const CALLGRIND_FILE: &str = "callgrind.json";

fn results_dir() -> PathBuf {
    project_root().join(RESULTS)
}

/// Keeps `file`, the full run of `adapter`, as its last (`dir`: loops or peers).
fn keep_result(dir: &Path, adapter: &str, file: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let kept = dir.join(format!("{adapter}.json"));
    std::fs::copy(file, &kept)
        .map(|_| ())
        .map_err(|e| format!("keeping {} as {}: {e}", file.display(), kept.display()))
}

/// Updates `not-run.txt` after a full run of the loops: adapters that ran lose their line; an
/// adapter that could not run gets one, unless an earlier full run of it is kept (the page
/// then shows that one, with its date).
fn update_not_run(dir: &Path, ran: &[&str], not_run: &[(&str, String)]) -> Result<()> {
    let file = dir.join(NOT_RUN_FILE);
    let mut reasons: std::collections::BTreeMap<String, String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(name, why)| (name.to_owned(), why.to_owned()))
        .collect();
    for name in ran {
        reasons.remove(*name);
    }
    for (name, why) in not_run {
        if dir.join(format!("{name}.json")).exists() {
            eprintln!("bench {name}: not run now ({why}); the page keeps its last full run");
            reasons.remove(*name);
        } else {
            reasons.insert((*name).to_owned(), why.clone());
        }
    }
    let lines: Vec<String> = reasons.iter().map(|(n, w)| format!("{n}={w}\n")).collect();
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::write(&file, lines.concat()).map_err(|e| format!("writing {}: {e}", file.display()))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, from `date` (no date crate in xtask).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("unix {}", unix_now()))
}

/// The adapters the peer loops run on (`benches/src/carriers/mod.rs`, `PEERS`).
const PEER_ADAPTERS: &[&str] = &["redis", "amqp"];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// Whether `member` is listed in the root manifest's `members`.
fn is_member(member: &str) -> bool {
    let manifest = std::fs::read_to_string(project_root().join("Cargo.toml")).unwrap_or_default();
    manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("members"))
        .take_while(|l| !l.trim_start().starts_with('[') || l.contains("members"))
        .any(|l| l.contains(&format!("\"{member}\"")))
        && project_root().join(member).join("Cargo.toml").exists()
}

/// `host:port` of a broker URL (`scheme://[user@]host:port[/...]`).
fn host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(host_port.to_owned())
}

fn reachable(url: &str) -> bool {
    let Some(addr) = host_port(url) else {
        return false;
    };
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// Why `adapter` cannot run here, if it cannot.
fn why_not(adapter: &BenchAdapter) -> Option<String> {
    if let Some(member) = adapter.member
        && !is_member(member)
    {
        return Some(format!("`{member}` is not a workspace member yet"));
    }
    if let Some((var, default)) = adapter.url {
        let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        if !reachable(&url) {
            // host:port only: the URL may hold a password.
            let at = host_port(&url).unwrap_or_default();
            return Some(format!(
                "no broker answers at {at} ({var}); `cargo xtask brokers --start` starts the local ones"
            ));
        }
    }
    None
}

fn build(features: &[&str], target: &Path, manifest: Option<&Path>) -> Result<bool> {
    let mut args = vec!["build", "--release", "--package", "evbus-bench"];
    let joined = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &joined]);
    }
    let mut cmd = cargo(&args);
    if let Some(manifest) = manifest {
        cmd.arg("--manifest-path").arg(manifest);
    }
    cmd.env("CARGO_TARGET_DIR", target);
    eprintln!("$ {}", display(&cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    Ok(status.success())
}

fn rustc_version() -> String {
    Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn run(options: &Options) -> Result<()> {
    if options.gateway {
        return run_gateway(options);
    }
    if options.report {
        // The report is a command of the bench program: the plainest build of it will do.
        let target = target_dir();
        if !build(&[], &target, None)? {
            return Err("evbus-bench does not build".to_owned());
        }
        return report(&target.join("release").join("evbus-bench"));
    }
    let root = project_root();
    let target = target_dir();
    let out = target.join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let loops = !options.callgrind || options.quick || options.peers;
    let scenarios =
        !options.peers && (options.callgrind || options.baseline.is_some() || !options.quick);

    // Which adapters run, and why the others do not. `--adapter` may name several, comma
    // separated.
    let chosen: Option<Vec<&str>> = options
        .adapter
        .as_deref()
        .map(|list| list.split(',').map(str::trim).collect());
    if let Some(unknown) = chosen
        .iter()
        .flatten()
        .find(|name| !ADAPTERS.iter().any(|a| a.name == **name))
    {
        let known: Vec<&str> = ADAPTERS.iter().map(|a| a.name).collect();
        return Err(format!(
            "unknown adapter `{unknown}`; known: {}",
            known.join(", ")
        ));
    }
    let mut run = Vec::new();
    let mut not_run = Vec::new();
    for adapter in ADAPTERS {
        if chosen.as_ref().is_some_and(|c| !c.contains(&adapter.name)) {
            continue;
        }
        if options.peers && !PEER_ADAPTERS.contains(&adapter.name) {
            continue;
        }
        match why_not(adapter) {
            None => run.push(adapter),
            Some(why) => not_run.push((adapter.name, why)),
        }
    }

    // Build, with the features of the adapters that run; an adapter whose feature does not
    // build is reported as not run, and the rest still run.
    let mut features: Vec<&str> = if loops {
        let mut features: Vec<&str> = run.iter().filter_map(|a| a.feature).collect();
        // postgres and sqlite share the `sql` feature.
        features.dedup();
        if options.peers {
            features.push("peers");
        }
        features
    } else {
        Vec::new()
    };
    if !build(&features, &target, None)? {
        if features.is_empty() {
            return Err("evbus-bench does not build".to_owned());
        }
        for adapter in run.iter().filter(|a| a.feature.is_some()) {
            not_run.push((
                adapter.name,
                format!(
                    "evbus-bench does not build with the `{}` feature (see the errors above)",
                    adapter.feature.unwrap_or_default()
                ),
            ));
        }
        run.retain(|a| a.feature.is_none());
        features.clear();
        if !build(&features, &target, None)? {
            return Err("evbus-bench does not build".to_owned());
        }
    }
    let bin = target.join("release").join("evbus-bench");

    // One process per adapter: an adapter that crashes (a C client library, a broker that
    // hangs) costs its own lines only.
    let results = results_dir();
    if loops {
        if run.is_empty() {
            for (name, why) in &not_run {
                println!("bench {name}: not run ({why})");
            }
            return Err("no adapter can run here".to_owned());
        }
        let stamp = unix_now();
        let mut files = Vec::new();
        for adapter in &run {
            let file = out.join(format!(
                "run-{stamp}-{}{}{}.json",
                adapter.name,
                if options.peers { "-peers" } else { "" },
                if options.quick { "-quick" } else { "" }
            ));
            let mut cmd = Command::new(&bin);
            cmd.arg("run")
                .arg("--out")
                .arg(&file)
                .arg("--adapter")
                .arg(adapter.name);
            if options.quick {
                cmd.arg("--quick");
            }
            if options.peers {
                cmd.arg("--peers");
            }
            cmd.current_dir(&root)
                .env("EVBUS_BENCH_RUSTC", rustc_version())
                .env("EVBUS_BENCH_PROFILE", "release")
                .env(
                    "EVBUS_BENCH_RUSTFLAGS",
                    std::env::var("RUSTFLAGS").unwrap_or_default(),
                )
                .env("EVBUS_BENCH_FEATURES", features.join(","))
                .env("EVBUS_BENCH_LOCKFILE", root.join("Cargo.lock"));
            let status = cmd
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
            if status.success() && file.exists() {
                files.push((adapter.name, file));
            } else {
                not_run.push((adapter.name, format!("the bench process failed: {status}")));
            }
        }
        for (name, why) in &not_run {
            println!("bench {name}: not run ({why})");
        }
        // Each adapter's full run replaces its last one, for the page.
        if !options.quick {
            let keep = results.join(if options.peers { PEERS_DIR } else { LOOPS_DIR });
            for (adapter, file) in &files {
                keep_result(&keep, adapter, file)?;
            }
            if !options.peers {
                let ran: Vec<&str> = files.iter().map(|(adapter, _)| *adapter).collect();
                update_not_run(&keep, &ran, &not_run)?;
            }
        }
        if files.is_empty() {
            return Err("every adapter's bench run failed".to_owned());
        }
    }

    let callgrind_json = results.join(CALLGRIND_FILE);
    if scenarios {
        std::fs::create_dir_all(&results)
            .map_err(|e| format!("creating {}: {e}", results.display()))?;
        if Command::new("valgrind").arg("--version").output().is_err() {
            println!("bench callgrind: not run (valgrind is not installed)");
        } else {
            let current = measure_scenarios(&bin, "current")?;
            let mut json = scenarios_json(&current);
            if let Some(reference) = &options.baseline {
                let base_bin = build_baseline(reference, &target)?;
                let base = measure_scenarios(&base_bin, reference)?;
                json = with_baseline(json, reference, &base, &current);
                let worse = compare(&base, &current);
                if !worse.is_empty() {
                    std::fs::write(&callgrind_json, &json)
                        .map_err(|e| format!("writing {}: {e}", callgrind_json.display()))?;
                    return Err(format!(
                        "{} scenario(s) worse than `{reference}` (more than {BASELINE_TOLERANCE_PCT}% more \
                         instructions, or {BASELINE_SYSCALL_TOLERANCE} more system calls per \
                         event): {}",
                        worse.len(),
                        worse.join(", ")
                    ));
                }
            }
            std::fs::write(&callgrind_json, &json)
                .map_err(|e| format!("writing {}: {e}", callgrind_json.display()))?;
        }
    }

    if !options.quick {
        report(&bin)?;
    } else if options.quick {
        eprintln!("bench: --quick leaves docs/benchmarks.md as it is (a full run regenerates it)");
    }
    Ok(())
}

/// Regenerates docs/benchmarks.md and its chart from the results kept under [`RESULTS`]: each
/// adapter's last full run of the loops and of the peers, the last gateway run and the
/// callgrind figures, those that exist. Without any run of the loops the page is left as it
/// is.
fn report(bin: &Path) -> Result<()> {
    let root = project_root();
    let results = results_dir();
    let json_in = |dir: &Path| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    };
    let loops = results.join(LOOPS_DIR);
    let runs = json_in(&loops);
    if runs.is_empty() {
        eprintln!(
            "bench: no full run of the loops kept under {RESULTS}/{LOOPS_DIR} (`cargo xtask bench`): \
             docs/benchmarks.md left as it is"
        );
        return Ok(());
    }
    let mut cmd = Command::new(bin);
    cmd.arg("report");
    // The loops' runs first, then the peers' (the report tells them apart by their baseline).
    for file in runs.iter().chain(&json_in(&results.join(PEERS_DIR))) {
        cmd.arg("--run").arg(file);
    }
    let reasons = std::fs::read_to_string(loops.join(NOT_RUN_FILE)).unwrap_or_default();
    for line in reasons.lines().filter(|l| !l.is_empty()) {
        cmd.arg("--not-run").arg(line);
    }
    // An adapter with neither a kept run nor a reason was not run since results were kept.
    for adapter in ADAPTERS {
        let name = adapter.name;
        let prefix = format!("{name}=");
        if !loops.join(format!("{name}.json")).exists()
            && !reasons.lines().any(|l| l.starts_with(&prefix))
        {
            cmd.arg("--not-run").arg(format!(
                "{name}=no full run kept yet under {RESULTS}/{LOOPS_DIR} (`cargo xtask bench --adapter {name}`)"
            ));
        }
    }
    cmd.arg("--docs")
        .arg(root.join("docs/benchmarks.md"))
        .arg("--svg")
        .arg(root.join("docs/benchmarks.svg"))
        .arg("--notes")
        .arg(root.join("benches/notes.md"));
    let callgrind_json = results.join(CALLGRIND_FILE);
    if callgrind_json.exists() {
        cmd.arg("--callgrind").arg(&callgrind_json);
    }
    let gateway = results.join(GATEWAY_FILE);
    if gateway.exists() {
        cmd.arg("--gateway").arg(&gateway);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
    if !status.success() {
        return Err("regenerating docs/benchmarks.md failed".to_owned());
    }
    Ok(())
}

/// One scenario's figures.
#[derive(Debug, Clone, Default)]
struct Scenario {
    name: String,
    instructions: f64,
    allocations: f64,
    bytes: f64,
    /// System calls other than clock reads: each one enters the kernel, whose instructions
    /// callgrind does not count.
    syscalls: f64,
    /// `clock_gettime` and its kind. Valgrind makes them system calls; a native run reads the
    /// clock through the vDSO without entering the kernel, so they are counted apart.
    clock_reads: f64,
}

/// What one scenario run did in its measured region.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    instructions: u64,
    allocations: u64,
    bytes: u64,
    syscalls: u64,
    clock_reads: u64,
}

/// The system calls of valgrind's `--trace-syscalls=yes` output made between the two
/// `getpid` calls that mark the measured region (see `evbus_bench_measured` in
/// `benches/src/main.rs`): `(system calls, clock reads)`, or `None` without both marks.
fn count_syscalls(trace: &str) -> Option<(u64, u64)> {
    // A line per call, `SYSCALL[pid,tid](nr) name ( args ) --> result`; a call that blocks
    // is printed again when it returns, as `SYSCALL[pid,tid](nr) ... [async] --> result`.
    let names: Vec<&str> = trace
        .lines()
        .filter_map(|line| line.strip_prefix("SYSCALL["))
        .filter_map(|rest| rest.split_once(") ").map(|(_, call)| call))
        .filter_map(|call| call.split([' ', '(']).next())
        .filter(|name| *name != "...")
        .collect();
    let first = names.iter().position(|n| *n == "sys_getpid")?;
    let last = names.iter().rposition(|n| *n == "sys_getpid")?;
    if last == first {
        return None;
    }
    let inside = &names[first + 1..last];
    let clock_reads = inside
        .iter()
        .filter(|n| matches!(**n, "sys_clock_gettime" | "sys_gettimeofday" | "sys_time"))
        .count() as u64;
    Some((inside.len() as u64 - clock_reads, clock_reads))
}

/// Instructions, allocations and system calls in the measured region of one scenario run.
fn callgrind(bin: &Path, scenario: &str, events: usize) -> Result<Counts> {
    let file = target_dir()
        .join("bench")
        .join(format!("callgrind.{scenario}.{events}.out"));
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg("--toggle-collect=*evbus_bench_measured*")
        .arg("--trace-syscalls=yes")
        .arg(bin)
        .args(["scenario", scenario, "--events", &events.to_string()]);
    let shown = display(&cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{shown}` failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> u64 {
        stdout
            .split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (syscalls, clock_reads) = count_syscalls(&String::from_utf8_lossy(&output.stderr))
        .ok_or_else(|| {
            format!(
                "`{shown}`: no measured region marked in the system call trace \
                 (two `sys_getpid` lines)"
            )
        })?;
    let profile =
        std::fs::read_to_string(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let instructions = profile
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no instruction total in {}", file.display()))?;
    Ok(Counts {
        instructions,
        allocations: field("allocations"),
        bytes: field("bytes"),
        syscalls,
        clock_reads,
    })
}

fn measure_scenarios(bin: &Path, label: &str) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    for name in SCENARIOS {
        eprintln!("bench callgrind ({label}): {name} with 1,000 and 2,000 events");
        let one = callgrind(bin, name, 1000)?;
        let two = callgrind(bin, name, 2000)?;
        let per = |f: fn(&Counts) -> u64| (f(&two) as f64 - f(&one) as f64) / 1000.0;
        let s = Scenario {
            name: (*name).to_owned(),
            instructions: per(|c| c.instructions),
            allocations: per(|c| c.allocations),
            bytes: per(|c| c.bytes),
            syscalls: per(|c| c.syscalls),
            clock_reads: per(|c| c.clock_reads),
        };
        println!(
            "bench callgrind memory {}: {:.0} instructions/event, {:.1} allocations/event, \
             {:.0} bytes/event, {:.2} system calls/event, {:.2} clock reads/event",
            s.name, s.instructions, s.allocations, s.bytes, s.syscalls, s.clock_reads
        );
        out.push(s);
    }
    eprintln!("bench callgrind ({label}): cold-start");
    let cold = callgrind(bin, "cold-start", 1)?;
    out.push(Scenario {
        name: "cold-start".to_owned(),
        instructions: cold.instructions as f64,
        allocations: cold.allocations as f64,
        bytes: cold.bytes as f64,
        syscalls: cold.syscalls as f64,
        clock_reads: cold.clock_reads as f64,
    });
    println!(
        "bench callgrind memory cold-start: {} instructions, {} allocations, {} system calls \
         (build the Bus, first event)",
        cold.instructions, cold.allocations, cold.syscalls
    );
    Ok(out)
}

fn scenarios_json(scenarios: &[Scenario]) -> String {
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let rows: Vec<String> = scenarios
        .iter()
        .filter(|s| s.name != "cold-start")
        .map(|s| {
            format!(
                r#"    {{"name": "{}", "instructions_per_event": {:.1}, "allocations_per_event": {:.2}, "bytes_per_event": {:.1}, "syscalls_per_event": {:.3}, "clock_reads_per_event": {:.3}}}"#,
                s.name, s.instructions, s.allocations, s.bytes, s.syscalls, s.clock_reads
            )
        })
        .collect();
    let cold = scenarios.iter().find(|s| s.name == "cold-start");
    format!(
        "{{\n  \"valgrind\": \"{valgrind}\",\n  \"payload_bytes\": 256,\n  \"scenarios\": [\n{}\n  ],\n  \"cold_start\": {{\"instructions\": {}, \"allocations\": {}, \"syscalls\": {}}}\n}}\n",
        rows.join(",\n"),
        cold.map_or(0.0, |c| c.instructions),
        cold.map_or(0.0, |c| c.allocations),
        cold.map_or(0.0, |c| c.syscalls)
    )
}

fn change_pct(base: f64, now: f64) -> f64 {
    if base > 0.0 {
        (now - base) / base * 100.0
    } else {
        0.0
    }
}

fn compare(base: &[Scenario], current: &[Scenario]) -> Vec<String> {
    let mut worse = Vec::new();
    for now in current {
        if let Some(b) = base.iter().find(|b| b.name == now.name) {
            let pct = change_pct(b.instructions, now.instructions);
            // Cold start is one run, not a difference per event: its count of system calls
            // (thread starts, file reads) is reported, not held to the per-event bound.
            let per_event = now.name != "cold-start";
            let more_calls = now.syscalls - b.syscalls;
            let flag = if pct > BASELINE_TOLERANCE_PCT {
                worse.push(format!("{} ({pct:+.1}% instructions)", now.name));
                "  WORSE"
            } else if per_event && more_calls >= BASELINE_SYSCALL_TOLERANCE {
                worse.push(format!(
                    "{} ({more_calls:+.2} system calls per event)",
                    now.name
                ));
                "  WORSE"
            } else {
                ""
            };
            let per = if per_event { " per event" } else { "" };
            println!(
                "bench baseline {}: {:.0} -> {:.0} instructions ({pct:+.1}%), \
                 {:.2} -> {:.2} system calls{per}{flag}",
                now.name, b.instructions, now.instructions, b.syscalls, now.syscalls
            );
        }
    }
    worse
}

fn with_baseline(json: String, reference: &str, base: &[Scenario], now: &[Scenario]) -> String {
    let rows: Vec<String> = now
        .iter()
        .filter_map(|n| {
            let b = base.iter().find(|b| b.name == n.name)?;
            Some(format!(
                r#"{{"name": "{}", "baseline": {:.1}, "current": {:.1}, "change_pct": {:.2}, "baseline_syscalls": {:.3}, "current_syscalls": {:.3}}}"#,
                n.name,
                b.instructions,
                n.instructions,
                change_pct(b.instructions, n.instructions),
                b.syscalls,
                n.syscalls
            ))
        })
        .collect();
    let reference = reference.replace('"', "'");
    let trimmed = json.trim_end().trim_end_matches('}').trim_end();
    format!(
        "{trimmed},\n  \"baseline\": {{\"ref\": \"{reference}\", \"rows\": [{}]}}\n}}\n",
        rows.join(", ")
    )
}

/// Builds today's bench program against the evbus of `reference`: a detached git worktree
/// of `reference` under `<target>/bench/`, today's `benches/` copied in and made a member,
/// built into its own target directory. Returns the binary.
fn build_baseline(reference: &str, target: &Path) -> Result<PathBuf> {
    let root = project_root();
    let safe: String = reference
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let tree = target.join("bench").join(format!("baseline-{safe}"));
    let git = |args: &[&str], dir: &Path| -> Result<()> {
        let status = Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .map_err(|e| format!("could not start git: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`git {}` failed", args.join(" ")))
        }
    };
    if tree.join(".git").exists() {
        git(&["checkout", "--force", "--detach", reference], &tree)?;
    } else {
        let tree_s = tree.to_string_lossy().into_owned();
        git(
            &["worktree", "add", "--force", "--detach", &tree_s, reference],
            &root,
        )?;
    }
    copy_dir(&root.join("benches"), &tree.join("benches"))?;
    // The callgrind scenarios need only the in-memory transport: drop the optional adapter
    // loops (Kafka, NATS) where that commit has no such adapter.
    let path = tree.join("benches/Cargo.toml");
    let bench_manifest =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let stripped = strip_optional_rows(&bench_manifest, |krate| {
        tree.join(krate).join("Cargo.toml").exists()
    });
    if stripped != bench_manifest {
        std::fs::write(&path, stripped).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    // Make the copied bench package a member, with the dependencies it needs.
    let manifest_path = tree.join("Cargo.toml");
    let mut manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|e| format!("reading {}: {e}", manifest_path.display()))?;
    if !manifest.contains("\"benches\"") {
        manifest = manifest.replacen("members = [", "members = [\"benches\", ", 1);
    }
    let current = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
    for dep in [
        "stats_alloc",
        "rdkafka",
        "evbus-kafka",
        "async-nats",
        "evbus-nats",
        "redis",
        "evbus-redis",
        "clap",
    ] {
        let has = |m: &str| m.lines().any(|l| l.starts_with(&format!("{dep} =")));
        if !has(&manifest)
            && let Some(line) = current.lines().find(|l| l.starts_with(&format!("{dep} =")))
        {
            manifest = manifest.replacen(
                "[workspace.dependencies]\n",
                &format!("[workspace.dependencies]\n{line}\n"),
                1,
            );
        }
    }
    std::fs::write(&manifest_path, manifest)
        .map_err(|e| format!("writing {}: {e}", manifest_path.display()))?;
    let base_target = target.join("bench").join("baseline-target");
    if !build(&[], &base_target, Some(&tree.join("Cargo.toml")))? {
        return Err(format!(
            "today's bench program does not build against `{reference}` (its evbus API differs)"
        ));
    }
    Ok(base_target.join("release").join("evbus-bench"))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &dest)?;
        } else {
            std::fs::copy(&path, &dest).map_err(|e| format!("copying {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_run_replaces_the_kept_results_of_what_it_measured_only() {
        let dir = std::env::temp_dir().join(format!("evbus-bench-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        let loops = dir.join(LOOPS_DIR);
        let run = |name: &str, body: &str| {
            let file = runs.join(format!("run-1-{name}.json"));
            std::fs::write(&file, body).unwrap();
            file
        };
        let read = |name: &str| std::fs::read_to_string(loops.join(name)).unwrap_or_default();

        // Day one: memory runs, redis cannot, kafka has never run.
        keep_result(&loops, "memory", &run("memory", "memory day 1")).unwrap();
        update_not_run(&loops, &["memory"], &[("redis", "no broker".to_owned())]).unwrap();
        assert_eq!(read("memory.json"), "memory day 1");
        assert_eq!(read(NOT_RUN_FILE), "redis=no broker\n");

        // Day two, `--adapter redis`: redis is kept, memory's day-one run stays.
        keep_result(&loops, "redis", &run("redis", "redis day 2")).unwrap();
        update_not_run(&loops, &["redis"], &[]).unwrap();
        assert_eq!(read("memory.json"), "memory day 1");
        assert_eq!(read("redis.json"), "redis day 2");
        assert_eq!(read(NOT_RUN_FILE), "");

        // Day three: redis cannot run; its kept run stays and no reason replaces it.
        update_not_run(&loops, &[], &[("redis", "no broker".to_owned())]).unwrap();
        assert_eq!(read("redis.json"), "redis day 2");
        assert_eq!(read(NOT_RUN_FILE), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broker_addresses_come_from_urls() {
        assert_eq!(
            host_port("kafka://127.0.0.1:9092").as_deref(),
            Some("127.0.0.1:9092")
        );
        assert_eq!(
            host_port("redis://:pw@localhost:6380/0?prefix=x").as_deref(),
            Some("localhost:6380")
        );
    }

    #[test]
    fn baselines_without_an_adapter_crate_lose_only_its_rows() {
        let manifest = "[features]\n\
            default = []\n\
            # The Kafka rows: librdkafka.\n\
            kafka = [\"dep:evbus-kafka\", \"dep:rdkafka\"]\n\
            # The NATS rows: async-nats.\n\
            nats = [\"dep:evbus-nats\", \"dep:async-nats\"]\n\
            [dependencies]\n\
            evbus.workspace = true\n\
            evbus-kafka = { workspace = true, optional = true }\n\
            rdkafka = { workspace = true, optional = true }\n\
            evbus-nats = { workspace = true, optional = true }\n\
            async-nats = { workspace = true, optional = true }\n\
            tokio.workspace = true\n";
        let without_nats = strip_optional_rows(manifest, |k| k != "crates/evbus-nats");
        assert!(!without_nats.contains("nats"), "{without_nats}");
        assert!(without_nats.contains("kafka = ["), "{without_nats}");
        assert!(without_nats.contains("rdkafka = {"), "{without_nats}");
        assert!(without_nats.contains("tokio.workspace"), "{without_nats}");
        let neither = strip_optional_rows(manifest, |_| false);
        assert!(
            !neither.contains("kafka") && !neither.contains("nats"),
            "{neither}"
        );
        assert!(neither.contains("evbus.workspace = true"), "{neither}");
        assert_eq!(strip_optional_rows(manifest, |_| true), manifest);
    }

    #[test]
    fn baseline_rows_are_appended_to_the_json() {
        let s = |n: &str, i: f64| Scenario {
            name: n.to_owned(),
            instructions: i,
            ..Scenario::default()
        };
        let json = with_baseline(
            "{\n  \"a\": 1\n}\n".to_owned(),
            "HEAD~1",
            &[s("x", 100.0)],
            &[s("x", 103.0)],
        );
        assert!(
            json.contains("\"baseline\": {\"ref\": \"HEAD~1\""),
            "{json}"
        );
        assert_eq!(compare(&[s("x", 100.0)], &[s("x", 103.0)]).len(), 1);
        assert!(compare(&[s("x", 100.0)], &[s("x", 101.0)]).is_empty());
        // A new system call on every event is reported though the instructions did not move
        // (callgrind does not count the kernel's).
        let calls = |n: f64| Scenario {
            syscalls: n,
            ..s("x", 100.0)
        };
        assert_eq!(compare(&[calls(0.06)], &[calls(1.06)]).len(), 1);
        assert!(compare(&[calls(0.06)], &[calls(0.10)]).is_empty());
        // Cold start's figure is the whole run's count: one more call there is not a call per
        // event, but its instructions are still held to the bound.
        let cold = |i: f64, n: f64| Scenario {
            syscalls: n,
            ..s("cold-start", i)
        };
        assert!(compare(&[cold(100.0, 75.0)], &[cold(100.0, 76.0)]).is_empty());
        assert_eq!(compare(&[cold(100.0, 75.0)], &[cold(103.0, 75.0)]).len(), 1);
    }

    #[test]
    fn the_system_calls_of_the_measured_region_are_counted_apart_from_clock_reads() {
        let trace = "\
SYSCALL[10,1](12) sys_brk ( 0x0 ) --> [pre-success] Success(0x4000000)
SYSCALL[10,1](39) sys_getpid ()[sync] --> Success(0xa)
SYSCALL[10,1](228) sys_clock_gettime ( 1, 0x1ffefff8f0 ) --> [pre-success] Success(0x0)
SYSCALL[10,1](318) sys_getrandom ( 0x1ffefff7c0, 16, 0 ) --> [pre-success] Success(0x10)
SYSCALL[10,1](202) sys_futex ( 0x403b338, 129, 2147483647, 0x7, 0x0 ) --> [async] ...
SYSCALL[10,2](228) sys_clock_gettime ( 1, 0x1ffefff8f0 ) --> [pre-success] Success(0x0)
SYSCALL[10,1](202) ... [async] --> Success(0x0)
==10== some other valgrind line
SYSCALL[10,1](39) sys_getpid ()[sync] --> Success(0xa)
SYSCALL[10,1](11) sys_munmap ( 0x483c000, 12288 )[sync] --> Success(0x0)
";
        // getrandom and futex (its answer is not a second call); two clock reads.
        assert_eq!(count_syscalls(trace), Some((2, 2)));
        // Without both marks there is no region to count.
        let one_mark = trace.replacen("sys_getpid", "sys_getppid", 1);
        assert_eq!(count_syscalls(&one_mark), None);
        assert_eq!(count_syscalls(""), None);
    }
}
