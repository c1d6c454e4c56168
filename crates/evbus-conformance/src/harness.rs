//! The suite as a standard test target, on `libtest-mimic`: every case is a trial, so
//! `--list`, filters, `--exact`, `--skip`, `--ignored`, `--include-ignored`, `--format`,
//! `--test-threads`, nextest and IDE runners work as with `#[test]` functions.
//!
//! Around libtest's own output the harness keeps the suite's report: after the run, one line
//! per case in catalogue order (`PASS <case> (0.12s)`, `FAIL <case> (15.00s): <reason>`,
//! `IGNORED <case>: needs <need>`) and the summary line
//! `conformance <adapter>: N passed, M failed, K ignored`, for each suite of the binary.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use libtest_mimic::{Arguments, Completion, Failed, FormatSetting, Trial};

use crate::cases::Case;
use crate::report::{CaseReport, Outcome, Report};
use crate::runner::{self, Unusable};
use crate::support::Names;
use crate::{Need, Suite};

/// Several conformance suites in one `harness = false` test binary.
///
/// [`main`](crate::main) is `Harness::new().suite(build).run()`. Use `Harness` directly when
/// one binary checks several transports (or one transport several ways): their cases run in
/// one libtest run, each listed with the adapter as its kind (`[memory-dyn] <case>: test`),
/// and each suite ends with its own summary line.
///
/// ```no_run
/// use evbus::Transport;
/// use evbus::memory::MemoryBroker;
/// use evbus_conformance::{Harness, Suite};
///
/// fn main() -> std::process::ExitCode {
///     Harness::new()
///         .suite(|| {
///             let broker = MemoryBroker::new(Default::default());
///             Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
///         })
///         .suite(|| {
///             let broker = MemoryBroker::new(Default::default());
///             Suite::new("memory-dyn", move || {
///                 let boxed: Box<dyn Transport> = Box::new(broker.connect());
///                 std::future::ready(Ok(boxed))
///             })
///         })
///         .run()
/// }
/// ```
pub struct Harness {
    suites: Vec<Builder<'static>>,
    require_brokers: Option<bool>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("suites", &self.suites.len())
            .field("require_brokers", &self.require_brokers)
            .finish_non_exhaustive()
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// A harness without suites.
    pub fn new() -> Self {
        Harness {
            suites: Vec::new(),
            require_brokers: None,
        }
    }

    /// Adds a suite. `build` runs inside the harness's tokio runtime (it may start a broker
    /// process for [`Suite::with_broker_control`]), once per process, also for `--list`.
    pub fn suite<T: evbus::Transport + 'static>(
        mut self,
        build: impl FnOnce() -> Suite<T> + 'static,
    ) -> Self {
        self.suites
            .push(Box::new(move |setup: &Setup<'_>| prepare(build, setup)));
        self
    }

    /// Whether an unreachable broker fails the run (`true`) or only warns (`false`). Defaults
    /// to [`require_brokers`](crate::require_brokers) (`CI` or `EVBUS_REQUIRE_BROKERS`).
    /// A configuration error fails either way.
    pub fn require_brokers(mut self, required: bool) -> Self {
        self.require_brokers = Some(required);
        self
    }

    /// Runs the suites with the process's command-line arguments (libtest's).
    pub fn run(self) -> ExitCode {
        self.run_with(std::env::args())
    }

    /// Runs the suites with these command-line arguments; the first is the program name, as
    /// in `std::env::args()`. Invalid arguments print libtest's usage and exit the process.
    pub fn run_with<I>(self, args: I) -> ExitCode
    where
        I: IntoIterator,
        I::Item: Into<std::ffi::OsString> + Clone,
    {
        let kinds = self.suites.len() > 1;
        execute(
            self.suites,
            Arguments::from_iter(args),
            kinds,
            self.require_brokers,
        )
    }
}

/// Prepares one suite (builds it, probes the broker, makes its trials).
type Builder<'a> = Box<dyn FnOnce(&Setup<'_>) -> Prepared + 'a>;

/// [`crate::main`]: one suite, whose `build` need not be `'static`.
pub(crate) fn run_one<T: evbus::Transport + 'static>(
    build: impl FnOnce() -> Suite<T>,
    kinds: bool,
) -> ExitCode {
    let builder: Builder<'_> = Box::new(move |setup: &Setup<'_>| prepare(build, setup));
    execute(vec![builder], Arguments::from_args(), kinds, None)
}

/// Prepares every suite, hands their trials to libtest, then prints each suite's report.
fn execute(
    suites: Vec<Builder<'_>>,
    mut args: Arguments,
    kinds: bool,
    require_brokers: Option<bool>,
) -> ExitCode {
    if args.test_threads.is_none() {
        args.test_threads = Some(default_threads());
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
    let setup = Setup {
        args: &args,
        runtime: &runtime,
        kinds,
        require_brokers: require_brokers.unwrap_or_else(crate::require_brokers),
    };
    let mut prepared: Vec<Prepared> = suites.into_iter().map(|p| p(&setup)).collect();
    let trials: Vec<Trial> = prepared
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.trials))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Leftover tasks of a timed-out case must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if args.list {
        return ExitCode::SUCCESS;
    }

    let mut out = ReportOut::new(&args);
    let mut failed = conclusion.has_failed();
    let any_selected = prepared.iter().any(|p| p.selected > 0);
    for suite in &prepared {
        match &suite.state {
            State::Ready(collected) if suite.selected > 0 || !any_selected => {
                out.print(&collected.report(&suite.adapter));
            }
            State::Ready(_) | State::NotRun => {}
            State::Unusable(unusable) => {
                out.print(&unusable.report(&suite.adapter));
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// libtest's default is one thread per core; the suite's cases mostly wait on the broker, so
/// it runs [`runner::DEFAULT_CONCURRENCY`] at a time unless `--test-threads` or
/// `RUST_TEST_THREADS` says otherwise.
fn default_threads() -> usize {
    std::env::var("RUST_TEST_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(runner::DEFAULT_CONCURRENCY)
}

/// What every suite is prepared with.
struct Setup<'a> {
    args: &'a Arguments,
    runtime: &'a tokio::runtime::Runtime,
    kinds: bool,
    require_brokers: bool,
}

/// One suite, ready to hand its trials to libtest.
struct Prepared {
    adapter: String,
    trials: Vec<Trial>,
    /// How many of its trials the arguments select (not filtered out).
    selected: usize,
    state: State,
}

impl Prepared {
    fn new(adapter: String, trials: Vec<Trial>, args: &Arguments, state: State) -> Self {
        let selected = trials.iter().filter(|t| !args.is_filtered_out(t)).count();
        Prepared {
            adapter,
            trials,
            selected,
            state,
        }
    }
}

/// Whether a suite can run.
enum State {
    /// The broker answered; results are collected here.
    Ready(Arc<Collected>),
    /// The broker is unreachable and not required: a warning was printed, every case is
    /// ignored, and no summary line is printed (tools read the warning instead).
    NotRun,
    /// The suite cannot run and that is a failure: `FAIL <adapter>: <reason>` after the run.
    Unusable(Unusable),
}

/// The results of one suite's cases, as their trials finish.
#[derive(Default)]
struct Collected {
    results: Mutex<Vec<(usize, CaseReport)>>,
}

impl Collected {
    fn push(&self, index: usize, report: CaseReport) {
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((index, report));
    }

    /// The report in catalogue order.
    fn report(&self, adapter: &str) -> Report {
        let mut results =
            std::mem::take(&mut *self.results.lock().unwrap_or_else(|p| p.into_inner()));
        results.sort_by_key(|(index, _)| *index);
        let mut report = Report::new(adapter);
        for (_, case) in results {
            report.push(case);
        }
        report
    }
}

/// Where the report goes: stdout after libtest's own output, or stderr when stdout is JSON.
struct ReportOut {
    json: bool,
}

impl ReportOut {
    fn new(args: &Arguments) -> Self {
        ReportOut {
            json: args.format == Some(FormatSetting::Json),
        }
    }

    /// Prints with the `print!` macros, so that a test running a harness in-process (with
    /// libtest's output capture) keeps the report to itself.
    fn print(&mut self, report: &Report) {
        if self.json {
            eprintln!("{report}");
        } else {
            println!("{report}");
            let _ = std::io::stdout().flush();
        }
    }
}

/// Builds the suite, probes its broker and makes one trial per case.
fn prepare<T: evbus::Transport + 'static>(
    build: impl FnOnce() -> Suite<T>,
    setup: &Setup<'_>,
) -> Prepared {
    let args = setup.args;
    // The suite (and a controlled broker it may hold) is dropped in the runtime's context.
    let _entered = setup.runtime.enter();
    // Inside the runtime: `build` may start a broker process with async code.
    let (suite, probed) = setup.runtime.block_on(async move {
        let suite = build();
        let probed = runner::probe(&*suite.connect).await;
        (suite, probed)
    });
    let adapter = suite.adapter.clone();
    let kind = if setup.kinds {
        adapter.clone()
    } else {
        String::new()
    };
    let cases: Vec<Case<T>> = crate::cases::all::<T>()
        .into_iter()
        .filter(|case| suite.selects(case.name))
        .collect();
    let trial = |name: &str, ignored: bool, runner: Runner| {
        Trial::ignorable_test(name, runner)
            .with_kind(kind.clone())
            .with_ignored_flag(ignored)
    };

    let caps = match probed {
        Ok(caps) => caps,
        Err(Unusable::Unreachable(reason)) if !setup.require_brokers => {
            let warning = crate::not_run_warning(&adapter, &reason);
            eprintln!("{warning}");
            if !args.list && args.format != Some(FormatSetting::Json) {
                println!("{warning}");
            }
            // Listed as ignored, so that nextest skips them too; reported ignored with the
            // reason when run.
            let trials = cases
                .iter()
                .map(|case| {
                    let reason = format!("broker unreachable, the `{adapter}` suite was NOT run");
                    trial(
                        case.name,
                        args.list || args.ignored,
                        Box::new(move || Ok(Completion::ignored_with(reason))),
                    )
                })
                .collect();
            return Prepared::new(adapter, trials, args, State::NotRun);
        }
        Err(unusable) => {
            // Listed (so that nextest runs them and each reports the failure); not run.
            let trials = if args.list {
                cases
                    .iter()
                    .map(|case| {
                        let reason = unusable.reason();
                        trial(case.name, false, Box::new(move || Err(reason.into())))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            return Prepared::new(adapter, trials, args, State::Unusable(unusable));
        }
    };

    let shared = Arc::new(SuiteRun {
        names: Names::new(&adapter, &crate::support::run_id()),
        connect: Arc::clone(&suite.connect),
        control: suite.control.clone(),
        raw_producer: suite.raw_producer.clone(),
        caps,
        runtime: setup.runtime.handle().clone(),
        outage: Mutex::new(()),
    });
    let forced = args.ignored || args.include_ignored;
    let collected = Arc::new(Collected::default());
    let mut trials = Vec::with_capacity(cases.len());
    for (index, case) in cases.into_iter().enumerate() {
        let unmet = runner::unmet(
            &case,
            &shared.caps,
            shared.control.is_some(),
            shared.raw_producer.is_some(),
        );
        // Statically ignored only where libtest needs to know before running: `--list`
        // (nextest asks `--list --ignored` which tests to skip) and `--ignored` (which runs
        // only those). Otherwise the trial runs and reports itself ignored with the reason.
        let flagged = !unmet.is_empty() && (args.list || args.ignored);
        let name = case.name;
        let shared = Arc::clone(&shared);
        let collected = Arc::clone(&collected);
        let runner: Runner = Box::new(move || {
            let result = shared.run(&case, &unmet, forced);
            let completion = match result.outcome() {
                Outcome::Passed => Ok(Completion::Completed),
                Outcome::Failed(reason) => Err(Failed::from(reason.as_str())),
                Outcome::Ignored(needs) => Ok(Completion::ignored_with(needs_text(needs))),
            };
            collected.push(index, result);
            completion
        });
        trials.push(trial(name, flagged, runner));
    }
    Prepared::new(adapter, trials, args, State::Ready(collected))
}

/// A trial's body.
type Runner = Box<dyn FnOnce() -> Result<Completion, Failed> + Send>;

/// `needs a, b`.
fn needs_text(needs: &[Need]) -> String {
    let needs: Vec<String> = needs.iter().map(Need::to_string).collect();
    format!("needs {}", needs.join(", "))
}

/// What the trials of one suite share.
struct SuiteRun<T: evbus::Transport + 'static> {
    names: Names,
    connect: Arc<crate::support::ConnectFn<T>>,
    control: Option<crate::support::Control<T>>,
    raw_producer: Option<Arc<dyn crate::RawProducer>>,
    caps: evbus::Capabilities,
    runtime: tokio::runtime::Handle,
    /// Held by a case that uses the controlled broker: outages never overlap.
    outage: Mutex<()>,
}

impl<T: evbus::Transport + 'static> SuiteRun<T> {
    /// Runs one case on the calling (libtest) thread. A case with unmet needs is ignored,
    /// unless `forced` (`--ignored`, `--include-ignored`) and the need is only an undeclared
    /// capability: then it runs, to show whether the transport could declare it.
    fn run(&self, case: &Case<T>, unmet: &[Need], forced: bool) -> CaseReport {
        let impossible = unmet
            .iter()
            .any(|need| !matches!(need, Need::Capability(_)));
        if !unmet.is_empty() && (!forced || impossible) {
            return CaseReport::new(
                case.name,
                Outcome::Ignored(unmet.to_vec()),
                std::time::Duration::ZERO,
            );
        }
        let _one_outage_at_a_time = runner::uses_control(case)
            .then(|| self.outage.lock().unwrap_or_else(|p| p.into_inner()));
        let run = runner::run_case(
            case,
            &self.names,
            &self.connect,
            self.control.as_ref(),
            self.raw_producer.as_ref(),
            &self.caps,
        );
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runtime.block_on(run)))
        {
            Ok(report) => report,
            Err(payload) => CaseReport::new(
                case.name,
                Outcome::Failed(format!(
                    "the harness panicked: {}",
                    runner::panic_message(payload)
                )),
                std::time::Duration::ZERO,
            ),
        }
    }
}
