//! Repository automation for evbus, in the style of rust-analyzer's `xtask`: one enum of
//! subcommands, one module per command, few dependencies.
//!
//! Run it through the cargo alias in `.cargo/config.toml`: `cargo xtask <command>`.

mod artifacts;
mod bench;
mod brokers;
mod capabilities;
mod chaos;
mod clients;
mod cluster;
mod conformance;
mod containers;
mod contract;
mod test;
mod tidy;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};

/// Errors are messages for a person; every command reports them the same way.
type Result<T, E = String> = std::result::Result<T, E>;

/// evbus repository tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Xtask {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Everything CI checks, in order: fmt, clippy, the workspace tests (with every
    /// adapter's conformance target), chaos, contract, clients, containers and tidy. This is
    /// the README's test command.
    Test,
    /// Runs the conformance target of one adapter, or of every adapter in the workspace.
    Conformance {
        /// The adapter to run (`memory`, `redis`, ...); all of them when omitted.
        #[arg(long)]
        adapter: Option<String>,
        /// Runs each broker in a container (Docker; images from `cargo xtask containers
        /// build`) instead of against the loopback brokers, the outage cases through the
        /// container itself.
        #[arg(long)]
        containers: bool,
        /// Arguments passed on to the conformance binary (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The TypeScript client's tests (clients/typescript, `npm ci` + `npm test`) against a
    /// real `evbus serve`.
    Clients,
    /// The gateway's OpenAPI document checked against a real `evbus serve` with schemathesis
    /// (every phase and check; installs schemathesis in a private virtualenv when missing).
    Contract,
    /// Checks the local brokers (Redis, RabbitMQ, NATS, PostgreSQL, Kafka as tansu) and says how to start
    /// those that are down. Exits non-zero while any is down.
    Brokers {
        /// Starts the brokers that are down and waits up to 30 s for each port.
        #[arg(long)]
        start: bool,
    },
    /// Broker images for the conformance suite in containers (docker/, docs/adr/0011).
    Containers {
        #[command(subcommand)]
        command: ContainersCmd,
    },
    /// Repository hygiene checks (also run as a `#[test]` of this crate).
    Tidy,
    /// Benchmarks: evbus against each broker's raw client (throughput, latency), callgrind
    /// instructions and allocations per event; regenerates docs/benchmarks.md.
    Bench {
        /// Only these adapters, comma separated (`memory`, `redis`, `kafka`, `nats`, `amqp`,
        /// `postgres`, `sqlite`).
        #[arg(long)]
        adapter: Option<String>,
        /// Fewer events and rounds: the result lines in a few minutes (docs left as they are).
        #[arg(long)]
        quick: bool,
        /// Only the callgrind scenarios (instructions, allocations and system calls per event,
        /// in memory).
        #[arg(long)]
        callgrind: bool,
        /// Also measures the callgrind scenarios at this git ref and reports any more than
        /// 2% worse in instructions or with half a system call per event more.
        #[arg(long, value_name = "REF")]
        baseline: Option<String>,
        /// Against the peer libraries (omniqueue on Redis and RabbitMQ) and, on Redis, the
        /// raw client writing the same CloudEvents fields as the Bus (`raw-same-fields`),
        /// instead of the raw clients: `peer ...` lines; a full run (no `--quick`) adds them
        /// to the docs.
        #[arg(long)]
        peers: bool,
        /// Only the gateway under load (POST /v1/events with 64 clients, webhook deliveries
        /// to 10 receivers, SSE fan-out to 500 streams), each against a bare axum handler
        /// doing the same I/O: `bench gateway ...` lines.
        #[arg(long, conflicts_with_all = ["adapter", "callgrind", "baseline", "peers"])]
        gateway: bool,
        /// Measures nothing: regenerates docs/benchmarks.md from the results kept under
        /// benches/results/ (after an edit of benches/notes.md, which the page includes).
        #[arg(long, conflicts_with_all = ["adapter", "quick", "callgrind", "baseline", "peers", "gateway"])]
        report: bool,
    },
    /// The fault suite: emitter and handler processes on one adapter (all when omitted) under
    /// a seeded schedule of SIGKILLs, broker restarts and network faults; fails on any loss,
    /// order violation or duplicates over the contract's bound (docs/reliability.md).
    Chaos {
        /// The adapter (`memory`, `redis`, `kafka`, `nats`, `amqp`, `postgres`, `sqlite`).
        #[arg(long)]
        adapter: Option<String>,
        /// Events to emit (over both emitters); default 50,000, with `--soak` 100 per second.
        #[arg(long)]
        events: Option<u64>,
        /// Length of the emission phase (`90`, `90s`, `5m`, `1h`); default events/1000 s, at
        /// least 20 s; with `--soak` one hour.
        #[arg(long)]
        duration: Option<String>,
        /// Seed of the fault schedule (default: the current time, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The short run on every adapter, or on `--adapter` (5,000 events, seed 18, one
        /// handler kill and one broker restart or cut each), also a step of `cargo xtask test`.
        #[arg(long, conflicts_with_all = ["events", "duration", "seed", "soak"])]
        short: bool,
        /// A soak run: no faults, a steady rate for an hour (or `--duration`); prints the
        /// drift of latency (p50, p99) and memory between the first and last 5 minutes.
        #[arg(long)]
        soak: bool,
    },
    /// Regenerates the capability matrix of docs/capabilities.md from the live transports
    /// (`evbus capabilities` at each adapter's URL, as for `conformance`).
    Capabilities,
    /// A local broker cluster (`nats`: 3 nats-server with JetStream on 127.0.0.1:4231-4233;
    /// `amqp`: RabbitMQ nodes evbus1..3@localhost on 5681-5683; `redis`: a 6-node Redis
    /// Cluster, 3 masters and 3 replicas, on 7231-7236), data in ~/.cache/evbus/clusters/
    /// (or $EVBUS_<BROKER>_CLUSTER_DIR), for `conformance --adapter
    /// nats-cluster|amqp-cluster|redis-cluster` and failover tests.
    Cluster {
        /// `start` (idempotent; waits until the cluster is formed), `stop`, `status`, `kill`
        /// (SIGKILL one node) or `restart` (start one node again, wait until it rejoined).
        action: String,
        /// The broker: `nats`, `amqp` or `redis`.
        broker: String,
        /// The node (1-based) for `kill` and `restart`.
        node: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum ContainersCmd {
    /// Builds the base image (no registry needed: mmdebstrap from the machine's Debian
    /// mirror, then `docker import`) and every broker image whose Dockerfile or inputs
    /// changed; does nothing when all are up to date.
    Build {
        /// Builds on this image instead of the locally made base (with a registry:
        /// `debian:bookworm-slim`).
        #[arg(long)]
        base: Option<String>,
    },
}

fn main() -> ExitCode {
    let xtask = Xtask::parse();
    let result = match xtask.command {
        Cmd::Test => test::run(),
        Cmd::Conformance {
            adapter,
            containers: false,
            args,
        } => conformance::run(adapter.as_deref(), &args),
        Cmd::Conformance {
            adapter,
            containers: true,
            args,
        } => containers::conformance(adapter.as_deref(), &args).map(drop),
        Cmd::Containers {
            command: ContainersCmd::Build { base },
        } => containers::build(base.as_deref()),
        Cmd::Contract => contract::run().map(|summary| println!("{summary}")),
        Cmd::Clients => clients::run().map(|summary| println!("{summary}")),
        Cmd::Brokers { start } => brokers::run(start),
        Cmd::Tidy => tidy::run(),
        Cmd::Capabilities => capabilities::run(),
        Cmd::Cluster {
            action,
            broker,
            node,
        } => cluster::run(&action, &broker, node),
        Cmd::Chaos {
            short: true,
            adapter,
            ..
        } => chaos::short_run(adapter.as_deref()).map(|_| ()),
        Cmd::Chaos {
            adapter,
            events,
            duration,
            seed,
            short: false,
            soak,
        } => chaos::run(&chaos::Options {
            adapter,
            events,
            duration,
            seed,
            soak,
        }),
        Cmd::Bench {
            adapter,
            quick,
            callgrind,
            baseline,
            peers,
            gateway,
            report,
        } => bench::run(&bench::Options {
            adapter,
            quick,
            callgrind,
            baseline,
            peers,
            gateway,
            report,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn project_root() -> PathBuf {
    // Prefer the run-time value: with a target directory shared between clones, it always
    // names the checkout cargo was invoked in.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// A `cargo` command (the same cargo that runs xtask) in the workspace root, without the
/// variables `cargo run` gave xtask about its own package (see [`is_package_variable`]).
fn cargo(args: &[&str]) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(project_root());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_variable) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `name` is one of the variables cargo sets for the program it runs about that
/// program's package (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...).
///
/// Build scripts read the same names and tell cargo to rebuild when they change (ring's does,
/// with `rerun-if-env-changed`, and cargo compares its own environment). A cargo started by
/// xtask with `CARGO_PKG_NAME=xtask` and one started from a shell without it each found
/// ring's build out of date, and rebuilt it and everything above it (rustls, reqwest, lapin,
/// async-nats, the gateway, the CLI): 1 m 18 s every time one followed the other.
fn is_package_variable(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_CFG_",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || matches!(
            name,
            "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
        )
}

/// The command as a person would type it, for messages.
fn display(cmd: &Command) -> String {
    let program = cmd.get_program().to_string_lossy();
    let program = if program.ends_with("cargo") {
        "cargo".into()
    } else {
        program
    };
    std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with stderr inherited and stdout streamed through line by line (tee), calling
/// `on_line` for each stdout line. Returns whether the command succeeded.
fn run_streaming(mut cmd: Command, mut on_line: impl FnMut(&str)) -> Result<bool> {
    let shown = display(&cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let mut out = std::io::stdout();
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    // Forward the raw bytes; a closed stdout (`| head`) must not stop the child.
                    let _ = out.write_all(&line).and_then(|()| out.flush());
                    on_line(String::from_utf8_lossy(&line).trim_end());
                }
                Err(e) => return Err(format!("reading the output of `{shown}`: {e}")),
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for `{shown}`: {e}"))?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_commands_lose_the_package_variables_and_keep_the_settings() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ] {
            assert!(is_package_variable(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "CARGO_INCREMENTAL",
            "PATH",
        ] {
            assert!(!is_package_variable(name), "{name}");
        }
        // `cargo run` gave this test process its package's variables: they are not passed on.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo(&["--version"]);
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        assert!(removed.iter().any(|n| n == "CARGO_PKG_NAME"), "{removed:?}");
        assert!(
            removed.iter().all(|n| is_package_variable(n)),
            "{removed:?}"
        );
    }
}
