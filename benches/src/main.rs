//! `evbus-bench`: the benchmark program behind `cargo xtask bench`.
//!
//! Three subcommands:
//!
//! - `run`: per adapter (memory, redis, kafka, nats, amqp), three loops that differ only in
//!   what carries the events: the broker's raw client, the evbus adapter alone (topic
//!   publish / subscribe / ack) and the full [`evbus::Bus`] (emit with validation, handler, ack). Rounds are
//!   interleaved; the output is a table and one line per measurement on stdout, a progress
//!   indicator on stderr and a JSON file.
//! - `scenario`: one in-memory scenario for `valgrind --tool=callgrind`: its steady state
//!   runs inside [`evbus_bench_measured`], the function xtask toggles instruction collection on, and the
//!   heap allocations made there are counted by the counting global allocator below.
//! - `report`: renders `docs/benchmarks.md` and the SVG chart from the JSON files.
//!
//! Benchmarks are programs, never tests: this binary has no test target.

mod carriers;
mod env;
#[cfg(feature = "gateway")]
mod gateway;
mod measure;
mod report;
mod sample;
mod scenario;

use std::alloc::System;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

/// Every heap allocation of the process is counted (allocations per event).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Errors of this program: messages for a person.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
/// Results of this program.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// evbus benchmarks (run them with `cargo xtask bench`).
#[derive(Debug, Parser)]
#[command(name = "evbus-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the throughput and latency loops.
    Run(measure::RunArgs),
    /// Runs one in-memory scenario (for callgrind and the allocation count).
    Scenario {
        /// `emit-handle-validated`, `emit-typed-validated`, `emit-handle`, `emit-value-handle`,
        /// `consume-decode` or
        /// `cold-start` (a `-16` suffix: 16-byte payloads).
        name: String,
        /// Events in the measured region.
        #[arg(long, default_value_t = 1000)]
        events: usize,
    },
    /// The gateway under load against bare axum handlers (needs the `gateway` feature).
    #[cfg(feature = "gateway")]
    Gateway(gateway::GatewayArgs),
    /// Regenerates docs/benchmarks.md and its chart from the JSON results.
    Report {
        /// The runs' JSON (from `run --out`; one per adapter), merged in order.
        #[arg(long, required = true)]
        run: Vec<PathBuf>,
        /// Adapters not run, as `NAME=reason`.
        #[arg(long = "not-run")]
        not_run: Vec<String>,
        /// The callgrind figures' JSON (written by xtask), if any.
        #[arg(long)]
        callgrind: Option<PathBuf>,
        /// The markdown file to write.
        #[arg(long)]
        docs: PathBuf,
        /// The SVG chart to write (linked from the markdown by file name).
        #[arg(long)]
        svg: PathBuf,
        /// Hand-written analysis included at the end of the markdown.
        #[arg(long)]
        notes: Option<PathBuf>,
        /// The `bench gateway ...` lines of the last full gateway run (written by xtask).
        #[arg(long)]
        gateway: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => measure::run(args),
        Cmd::Scenario { name, events } => scenario::run(&name, events),
        #[cfg(feature = "gateway")]
        Cmd::Gateway(args) => gateway::run(args),
        Cmd::Report {
            run,
            not_run,
            callgrind,
            docs,
            svg,
            notes,
            gateway,
        } => report::write(
            &run,
            &not_run,
            report::Extras {
                callgrind: callgrind.as_deref(),
                notes: notes.as_deref(),
                gateway: gateway.as_deref(),
            },
            &docs,
            &svg,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evbus-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f`: the only code callgrind measures in a scenario (xtask passes
/// `--toggle-collect=*evbus_bench_measured*`), with the allocations made inside it counted.
/// Returns `f`'s result and the allocations.
///
/// The region is marked in the system call trace by a `getpid` on each side (glibc does not
/// cache the pid): xtask runs the scenarios with valgrind's `--trace-syscalls=yes` and counts
/// the system calls between the two marks, which callgrind's instruction counts cannot see.
#[inline(never)]
pub(crate) fn evbus_bench_measured<R>(f: impl FnOnce() -> R) -> (R, stats_alloc::Stats) {
    std::hint::black_box(std::process::id());
    let region = stats_alloc::Region::new(GLOBAL);
    let r = std::hint::black_box(f());
    let stats = region.change();
    std::hint::black_box(std::process::id());
    (r, stats)
}
