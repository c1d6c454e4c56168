#![doc = include_str!("../README.md")]
//!
//! # What the suite checks
//!
//! Every behaviour of DESIGN §4 for topics, queues and the transport lifecycle, one case per
//! behaviour, named after it. A case declares what it [`Need`]s beyond the common contract;
//! a case whose need is not met is reported `IGNORED` with the need, never run and never
//! counted as passed.
//!
//! Cases run one at a time, each in its own task with a time limit (a panic or a timeout is a
//! `FAIL`), with names unique to the run (`<adapter>-<run>-<case>-...`), and delete every
//! topic and queue they named afterwards, dead-letter queues included, whatever the outcome.
//! Waits are bounded; where a case shows that something does *not* arrive, it first sends a
//! marker event and waits for it, then watches a short window.

use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

mod cases;
mod report;
mod runner;
mod support;

pub use report::{CaseReport, Outcome, Report};

/// The conformance suite, ready to run against one transport.
///
/// ```no_run
/// use evbus::memory::MemoryBroker;
/// use evbus_conformance::Suite;
///
/// # async fn run() {
/// let broker = MemoryBroker::new(Default::default());
/// let report = Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
///     .filter("queue_")
///     .run()
///     .await;
/// assert!(report.is_success());
/// # }
/// ```
pub struct Suite<T: evbus::Transport + 'static> {
    adapter: String,
    connect: Arc<support::ConnectFn<T>>,
    control: Option<support::Control<T>>,
    filter: Option<String>,
}

impl<T: evbus::Transport + 'static> fmt::Debug for Suite<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Suite")
            .field("adapter", &self.adapter)
            .field("broker_control", &self.control.is_some())
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl<T: evbus::Transport + 'static> Suite<T> {
    /// A suite for `adapter` (the name printed in the report). `connect` opens a **new**
    /// connection to the broker under test each call: cases open several (a consumer that
    /// vanishes, a publisher and a consumer in different "processes").
    pub fn new<F, Fut>(adapter: impl Into<String>, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = evbus::Result<T>> + Send + 'static,
    {
        Suite {
            adapter: adapter.into(),
            connect: Arc::new(move || connect().boxed()),
            control: None,
            filter: None,
        }
    }

    /// Adds a broker the harness controls, for the outage cases (without it they are
    /// reported `IGNORED ...: needs broker-control`).
    pub fn with_broker_control(
        mut self,
        control: impl BrokerControl<Transport = T> + 'static,
    ) -> Self {
        self.control = Some(Arc::new(control));
        self
    }

    /// Runs only the cases whose name contains `filter` (for debugging).
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// Runs every case, printing one line per case to stdout as it finishes
    /// (`PASS <case>`, `FAIL <case>: <reason>`, `IGNORED <case>: needs <need>`), then the
    /// summary line `conformance <adapter>: N passed, M failed, K ignored`; returns the
    /// report.
    ///
    /// When no connection can be opened (or the new connection reports itself unhealthy),
    /// the report holds the single failure `FAIL <adapter>: broker unreachable: <error>`.
    pub async fn run(self) -> Report {
        runner::run(self).await
    }
}

/// A broker process the harness controls, for the outage cases.
///
/// Implement it over a broker the harness started itself (on a free port, never the shared
/// development broker): stop and restart the process where the broker keeps its data on
/// disk, or cut connections through a TCP proxy the harness owns where it does not.
#[async_trait]
pub trait BrokerControl: Send + Sync {
    /// The transport type connections to the controlled broker have.
    type Transport: evbus::Transport + 'static;

    /// Opens a connection to the controlled broker (a separate broker process the harness
    /// started).
    async fn connect(&self) -> evbus::Result<Self::Transport>;

    /// Makes the broker unavailable (stop the process, or cut connections through a proxy).
    async fn interrupt(&self) -> evbus::Result<()>;

    /// Makes it available again (restart keeping data, or let connections through). Called
    /// after every case that used the control, so resuming an available broker must be a
    /// no-op.
    async fn resume(&self) -> evbus::Result<()>;
}

/// What a case needs beyond the common contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Need {
    /// A capability the transport must declare (see [`evbus::Capabilities`]).
    Capability(evbus::Capability),
    /// A broker the harness controls ([`Suite::with_broker_control`]).
    BrokerControl,
    /// A declared payload limit ([`evbus::Capabilities::max_payload_bytes`]), to show what
    /// happens beyond it.
    PayloadLimit,
}

/// The capability's `Display` (`replay`, `max-payload-bytes>=1048576`, ...),
/// `broker-control`, or `max-payload-bytes-declared`.
impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Capability(cap) => write!(f, "{cap}"),
            Need::BrokerControl => f.write_str("broker-control"),
            Need::PayloadLimit => f.write_str("max-payload-bytes-declared"),
        }
    }
}

/// Whether an unreachable broker must fail the run: `CI` or `EVBUS_REQUIRE_BROKERS` set to
/// `1`, `true` or `yes` (any case).
pub fn require_brokers() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "1" || v == "true" || v == "yes"
        })
    })
}

/// Entry point for a `[[test]] harness = false` target.
///
/// Builds a multi-thread tokio runtime, checks that the broker is reachable (a first
/// connection and its health), runs the suite (printing as it goes) and returns
/// `ExitCode::FAILURE` if any case failed.
///
/// If the broker is unreachable and [`require_brokers`] is true, it prints
/// `FAIL <adapter>: broker unreachable: <error>` and
/// `conformance <adapter>: 0 passed, 1 failed, 0 ignored` and fails; otherwise it prints a
/// loud WARNING to stderr and stdout saying the suite was **not** run and how to make the
/// broker reachable (`EVBUS_<ADAPTER>_URL`), and succeeds.
///
/// Command-line arguments work like libtest's where they make sense: the first free argument
/// is a case filter (`cargo test --test conformance -- queue_nack`); flags such as
/// `--nocapture` are ignored; `--list` lists nothing and exits.
///
/// To run several suites from one test binary, call `main` once per suite and combine the
/// exit codes (see the crate's `tests/memory.rs`).
pub fn main<T: evbus::Transport + 'static>(build: impl FnOnce() -> Suite<T>) -> ExitCode {
    let args = Args::parse(std::env::args().skip(1));
    if args.list {
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("FAIL: could not start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async move {
        let mut suite = build();
        if let Some(filter) = args.filter {
            suite = suite.filter(filter);
        }
        match runner::probe(&*suite.connect).await {
            Ok(_) => Some(suite.run().await),
            Err(reason) if require_brokers() => {
                let mut report = Report::new(suite.adapter.clone());
                report.push(CaseReport::new(
                    suite.adapter.clone(),
                    Outcome::Failed(format!("broker unreachable: {reason}")),
                    std::time::Duration::ZERO,
                ));
                println!("{report}");
                Some(report)
            }
            Err(reason) => {
                let warning = not_run_warning(&suite.adapter, &reason);
                eprintln!("{warning}");
                println!("{warning}");
                None
            }
        }
    });
    // Leftover tasks of a timed-out case must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match report {
        Some(report) if !report.is_success() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// The warning printed when the broker is unreachable and not required.
fn not_run_warning(adapter: &str, reason: &str) -> String {
    let var: String = adapter
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let rule = "WARNING: ".to_owned() + &"=".repeat(70);
    [
        rule.as_str(),
        &format!("WARNING: the evbus conformance suite for `{adapter}` was NOT run."),
        &format!("WARNING: broker unreachable: {reason}"),
        "WARNING: start the broker (see the adapter's README), or point",
        &format!("WARNING: EVBUS_{var}_URL at a reachable one, and run again."),
        "WARNING: with CI=true or EVBUS_REQUIRE_BROKERS=1 this is a failure instead.",
        rule.as_str(),
    ]
    .join("\n")
}

/// The libtest-like arguments `main` understands.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    filter: Option<String>,
    list: bool,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Self {
        // libtest flags that take a separate value.
        const WITH_VALUE: &[&str] = &[
            "--test-threads",
            "--skip",
            "--color",
            "--format",
            "--logfile",
            "--shuffle-seed",
            "-Z",
        ];
        let mut parsed = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--list" {
                parsed.list = true;
            } else if WITH_VALUE.contains(&arg.as_str()) {
                args.next();
            } else if arg.starts_with('-') {
                // --nocapture, --exact, --quiet, --test-threads=2, ...
            } else if parsed.filter.is_none() {
                parsed.filter = Some(arg);
            }
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::Capability;

    fn args(list: &[&str]) -> Args {
        Args::parse(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn need_displays_the_capability_or_broker_control() {
        assert_eq!(Need::BrokerControl.to_string(), "broker-control");
        assert_eq!(Need::Capability(Capability::Replay).to_string(), "replay");
        assert_eq!(
            Need::Capability(Capability::PerKeyOrder).to_string(),
            "per-key-order"
        );
        assert_eq!(
            Need::Capability(Capability::Payload(1 << 20)).to_string(),
            "max-payload-bytes>=1048576"
        );
        assert_eq!(Need::PayloadLimit.to_string(), "max-payload-bytes-declared");
    }

    #[test]
    fn the_first_free_argument_filters_and_libtest_flags_are_ignored() {
        assert_eq!(args(&[]), Args::default());
        assert_eq!(
            args(&["--nocapture", "queue_nack"]).filter.as_deref(),
            Some("queue_nack")
        );
        assert_eq!(args(&["--test-threads", "2"]).filter, None);
        assert_eq!(
            args(&["--test-threads=2", "--exact", "x"])
                .filter
                .as_deref(),
            Some("x")
        );
        assert!(args(&["--list", "--format", "terse"]).list);
    }

    #[test]
    fn the_warning_names_the_url_variable() {
        let text = not_run_warning("memory-dyn", "connection refused");
        assert!(text.contains("EVBUS_MEMORY_DYN_URL"), "{text}");
        assert!(text.contains("was NOT run"), "{text}");
        assert!(
            text.contains("broker unreachable: connection refused"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.starts_with("WARNING: ")), "{text}");
    }
}
