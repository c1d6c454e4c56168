#![doc = include_str!("../README.md")]
//!
//! # What the suite checks
//!
//! Every behaviour of the evbus design for topics, queues and the transport lifecycle, and
//! schema validation through the Bus (the two `schema_` cases), one case per behaviour, named
//! after it: `cargo test --test conformance -- --list` lists them, and
//! `docs/adapter-guide.md` explains the contract they check. A case declares what it
//! [`Need`]s beyond the common contract; a case whose need is not met is reported ignored
//! with the need (`IGNORED <case>: needs per-key-order`), never run and never counted as
//! passed.
//!
//! # How cases run
//!
//! Each case is a libtest trial (on `libtest-mimic`): `--list` lists them, a free argument
//! filters them, `--exact`, `--skip`, `--ignored`, `--include-ignored`, `--format terse|json`
//! and `--test-threads` work as for `#[test]` functions, and `cargo nextest run` runs each
//! case in its own process. Independent cases run concurrently, 4 at a time unless
//! `--test-threads` (or `RUST_TEST_THREADS`) says otherwise; cases that interrupt the
//! controlled broker never overlap each other.
//!
//! Each case runs in its own task with a time limit (a panic or a timeout is a failure), with
//! names unique to the run (`<adapter>-<run>-<case>-...`), on connections of its own, and
//! deletes every topic and queue it named afterwards, dead-letter queues included, whatever
//! the outcome. Waits are bounded; where a case shows that something does *not* arrive, it
//! first sends a marker event and waits for it, then watches a short window. A case that
//! waits in vain for events says whether their publishes returned `Ok`, so a lost publish is
//! not mistaken for a slow consumer or a bad close.

use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::FutureExt;

mod cases;
pub mod checks;
#[cfg(feature = "containers")]
pub mod container;
pub mod failover;
mod harness;
pub mod process;
mod report;
mod runner;
mod support;

pub use harness::Harness;
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
    raw_producer: Option<Arc<dyn RawProducer>>,
    filter: Option<String>,
    concurrency: Option<usize>,
}

impl<T: evbus::Transport + 'static> fmt::Debug for Suite<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Suite")
            .field("adapter", &self.adapter)
            .field("broker_control", &self.control.is_some())
            .field("raw_producer", &self.raw_producer.is_some())
            .field("filter", &self.filter)
            .field("concurrency", &self.concurrency)
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
            raw_producer: None,
            filter: None,
            concurrency: None,
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

    /// Adds a foreign producer, for the cases that feed the transport a message that is not a
    /// CloudEvent (without it they are reported `IGNORED ...: needs raw-producer`).
    pub fn with_raw_producer(mut self, producer: impl RawProducer + 'static) -> Self {
        self.raw_producer = Some(Arc::new(producer));
        self
    }

    /// Keeps only the cases whose name contains `filter`. Under [`main`] and [`Harness`] the
    /// command line filters further (and `--list` shows only these cases).
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// How many cases [`run`](Self::run) runs at once (default 4; at least 1). Cases that use
    /// the controlled broker never overlap. Under [`main`] and [`Harness`],
    /// `--test-threads` decides instead.
    pub fn concurrency(mut self, cases: usize) -> Self {
        self.concurrency = Some(cases);
        self
    }

    /// Whether the case `name` passes [`filter`](Self::filter).
    fn selects(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// Runs every case ([`concurrency`](Self::concurrency) at a time), printing one line per
    /// case to stdout as it finishes (`PASS <case> (0.12s)`, `FAIL <case> (15.00s): <reason>`,
    /// `IGNORED <case>: needs <need>`), then the summary line
    /// `conformance <adapter>: N passed, M failed, K ignored`; returns the report, its cases
    /// in catalogue order.
    ///
    /// When no connection can be opened (or the new connection reports itself unhealthy),
    /// the report holds the single failure `FAIL <adapter>: broker unreachable: <error>`, or
    /// `FAIL <adapter>: configuration error: <error>` when opening it failed for another
    /// reason than an unreachable broker (an error kind other than `Connection` or
    /// `Timeout`, such as `InvalidConfig`).
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

/// Writes messages the way a foreign producer would: with the broker's own client, not
/// through evbus, and not as a CloudEvent.
///
/// Implement it in an adapter's conformance target with the broker's client library (a
/// Redis `XADD` of arbitrary fields, a Kafka record without `ce_` headers, a plain NATS or
/// AMQP message), addressing the queue exactly where the adapter's `Queue::send` would put
/// it. The suite then checks that such a message is dead-lettered with its metadata and does
/// not block the events behind it.
#[async_trait]
pub trait RawProducer: Send + Sync {
    /// Puts one message that is not a CloudEvent (for example a body `not a cloudevent` with
    /// no CloudEvents headers) on the queue `queue`, where the next consumer of
    /// `transport.queue(queue)` reads it.
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()>;
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
    /// A foreign producer ([`Suite::with_raw_producer`]).
    RawProducer,
}

/// The capability's `Display` (`replay`, `max-payload-bytes>=1048576`, ...),
/// `broker-control`, or `max-payload-bytes-declared`.
impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Capability(cap) => write!(f, "{cap}"),
            Need::BrokerControl => f.write_str("broker-control"),
            Need::PayloadLimit => f.write_str("max-payload-bytes-declared"),
            Need::RawProducer => f.write_str("raw-producer"),
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

/// Entry point for a `[[test]] harness = false` target: `Harness::new().suite(build).run()`.
///
/// Builds a multi-thread tokio runtime, calls `build` inside it, checks that the broker is
/// usable (a first connection and its health), and hands one libtest trial per case to
/// `libtest-mimic`, which parses the command line (`--list`, filters, `--exact`, `--skip`,
/// `--ignored`, `--include-ignored`, `--format`, `--test-threads`, ...) and runs them. After
/// libtest's output it prints the suite's report: one line per selected case in catalogue
/// order (`PASS <case> (0.12s)`, `FAIL <case> (15.00s): <reason>`,
/// `IGNORED <case>: needs <need>`), then `conformance <adapter>: N passed, M failed, K ignored`.
/// It returns `ExitCode::FAILURE` if any case failed.
///
/// If opening the first connection fails with an error kind other than `Connection` or
/// `Timeout` (an invalid URL, a bad setting, refused credentials), it prints
/// `FAIL <adapter> (0.00s): configuration error: <error>` and
/// `conformance <adapter>: 0 passed, 1 failed, 0 ignored` and fails, in CI or not.
///
/// If the broker is unreachable and [`require_brokers`] is true, it prints
/// `FAIL <adapter> (0.00s): broker unreachable: <error>` and the same summary and fails;
/// otherwise it prints a loud WARNING to stderr and stdout saying the suite was **not** run
/// and how to make the broker reachable (`EVBUS_<ADAPTER>_URL`), reports every case ignored,
/// and succeeds.
///
/// To run several suites from one test binary, use [`Harness`] (see the crate's
/// `tests/memory.rs`). Calling `main` several times also works: from the second call on, the
/// cases are listed with their adapter as kind (`[memory-dyn] <case>: test`).
pub fn main<T: evbus::Transport + 'static>(build: impl FnOnce() -> Suite<T>) -> ExitCode {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let again = CALLS.fetch_add(1, Ordering::Relaxed) > 0;
    harness::run_one(build, again)
}

/// A test that fails, saying what to add to `Cargo.toml`, when a conformance target is built
/// with libtest's harness: without `harness = false` in its `[[test]]` table (or with a
/// `name` that is not the file's), Cargo compiles the target with libtest's own `main`, the
/// target's `main` never runs, and `cargo test` reports `running 0 tests` and `ok`. Put it
/// next to the target's `main`:
///
/// ```no_run
/// evbus_conformance::harness_false_required!();
///
/// fn main() -> std::process::ExitCode {
///     evbus_conformance::main(|| {
///         let broker = evbus::memory::MemoryBroker::new(Default::default());
///         evbus_conformance::Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
///     })
/// }
/// ```
///
/// With `harness = false` the test is not compiled at all (`#[test]` items exist only in
/// libtest builds), so it costs nothing where the target is set up right.
#[macro_export]
macro_rules! harness_false_required {
    () => {
        #[test]
        fn conformance_target_built_without_harness_false() {
            panic!(
                "this conformance target has its own `main`, which Cargo only runs with \
                 `harness = false`: add to Cargo.toml\n\n[[test]]\nname = \"{}\"\nharness = false\n\n\
                 (the name is the file's, without `.rs`); without it none of the suite's cases runs",
                module_path!()
            );
        }
    };
}

/// The warning printed when the broker is unreachable and not required.
pub(crate) fn not_run_warning(adapter: &str, reason: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::Capability;

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
