//! The harness itself: what `--list` shows, how a configuration error and an unreachable
//! broker end a run, and that the suite's cases catch faults and say what went wrong (a
//! reversed batch, a publish that returned `Ok` and was lost).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use evbus::memory::{MemoryBroker, MemoryTransport};
use evbus::{
    Capabilities, ConsumerOptions, Error, ErrorKind, Event, Health, Queue, SubscribeOptions,
    Subscription, Topic, Transport,
};
use evbus_conformance::{Harness, Outcome, Report, Suite};

// ---------------------------------------------------------------------------------------------
// A transport with one fault, over the in-memory transport.

/// What the faulty transport gets wrong.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `Queue::send_batch` stores the batch in reverse order.
    ReversedBatch,
    /// `Topic::publish` returns `Ok` for the event whose `seq` extension is 3, and drops it.
    DropsSeq3,
    /// A topic handle's first `publish` returns `Ok` at once and drops the event (so it is
    /// surely among the publishes that returned before anything else happened).
    DropsFirst,
}

#[derive(Debug)]
struct Faulty {
    inner: MemoryTransport,
    fault: Fault,
}

#[derive(Debug)]
struct FaultyTopic {
    inner: Arc<dyn Topic>,
    fault: Fault,
    /// Whether this handle dropped its first publish already.
    dropped: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct FaultyQueue {
    inner: Arc<dyn Queue>,
    fault: Fault,
}

#[async_trait]
impl Transport for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn topic(&self, name: &str) -> evbus::Result<Arc<dyn Topic>> {
        let inner = self.inner.topic(name).await?;
        Ok(Arc::new(FaultyTopic {
            inner,
            fault: self.fault,
            dropped: Default::default(),
        }))
    }
    async fn queue(&self, name: &str) -> evbus::Result<Arc<dyn Queue>> {
        let inner = self.inner.queue(name).await?;
        Ok(Arc::new(FaultyQueue {
            inner,
            fault: self.fault,
        }))
    }
    async fn delete_topic(&self, name: &str) -> evbus::Result<()> {
        self.inner.delete_topic(name).await
    }
    async fn delete_queue(&self, name: &str) -> evbus::Result<()> {
        self.inner.delete_queue(name).await
    }
    async fn health(&self) -> Health {
        self.inner.health().await
    }
    async fn close(&self) -> evbus::Result<()> {
        self.inner.close().await
    }
}

#[async_trait]
impl Topic for FaultyTopic {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn publish(&self, event: &Event) -> evbus::Result<()> {
        if matches!(self.fault, Fault::DropsSeq3) && event.extension("seq") == Some("3") {
            return Ok(());
        }
        if matches!(self.fault, Fault::DropsFirst)
            && !self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        self.inner.publish(event).await
    }
    async fn subscribe(&self, options: SubscribeOptions) -> evbus::Result<Subscription> {
        self.inner.subscribe(options).await
    }
}

#[async_trait]
impl Queue for FaultyQueue {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn send(&self, event: &Event) -> evbus::Result<()> {
        self.inner.send(event).await
    }
    async fn send_batch(&self, events: &[Event]) -> evbus::Result<()> {
        if matches!(self.fault, Fault::ReversedBatch) {
            let reversed: Vec<Event> = events.iter().rev().cloned().collect();
            return self.inner.send_batch(&reversed).await;
        }
        self.inner.send_batch(events).await
    }
    async fn receive(&self, options: ConsumerOptions) -> evbus::Result<Subscription> {
        self.inner.receive(options).await
    }
}

fn faulty(fault: Fault) -> Suite<Faulty> {
    let broker = MemoryBroker::new(Default::default());
    Suite::new("faulty", move || {
        std::future::ready(Ok(Faulty {
            inner: broker.connect(),
            fault,
        }))
    })
}

fn memory() -> Suite<MemoryTransport> {
    let broker = MemoryBroker::new(Default::default());
    Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
}

/// The one case of `report`, with its failure reason if it failed.
fn only_case(report: &Report) -> (&str, Option<&str>) {
    assert_eq!(report.cases().len(), 1, "{report}");
    let case = &report.cases()[0];
    let reason = match case.outcome() {
        Outcome::Failed(reason) => Some(reason.as_str()),
        _ => None,
    };
    (case.name(), reason)
}

// ---------------------------------------------------------------------------------------------
// Faults the cases catch, and what they say.

#[tokio::test(flavor = "multi_thread")]
async fn a_send_batch_that_reverses_the_batch_fails_the_batch_order_case() {
    const CASE: &str = "queue_send_batch_keeps_batch_order_for_one_consumer";
    let good = memory().filter(CASE).run().await;
    assert_eq!(only_case(&good), (CASE, None), "{good}");

    let bad = faulty(Fault::ReversedBatch).filter(CASE).run().await;
    let (name, reason) = only_case(&bad);
    assert_eq!(name, CASE);
    let reason = reason.unwrap_or_else(|| panic!("a reversed batch passed: {bad}"));
    assert!(reason.contains("out of order"), "{reason}");
    assert!(
        reason.contains("position 0 held event 29 instead of 0"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_publish_is_reported_as_published_with_ok_and_never_arrived() {
    const CASE: &str = "topic_two_subscriptions_each_receive_every_event";
    let report = faulty(Fault::DropsSeq3).filter(CASE).run().await;
    let (_, reason) = only_case(&report);
    let reason = reason.unwrap_or_else(|| panic!("a dropped publish passed: {report}"));
    assert!(
        reason.contains("all returned Ok; 1 never arrived within 15s"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_lost_before_close_is_not_blamed_on_close() {
    const CASE: &str = "lifecycle_close_flushes_every_accepted_publish";
    // The burst's publishes run concurrently: the one dropped must be one that surely
    // returned before close was called (seq 3 may be scheduled after close started).
    let report = faulty(Fault::DropsFirst).filter(CASE).run().await;
    let (_, reason) = only_case(&report);
    let reason = reason.unwrap_or_else(|| panic!("a dropped publish passed: {report}"));
    assert!(
        reason.contains("1 of those that returned Ok never arrived within 15s"),
        "{reason}"
    );
    assert!(
        reason.contains("had returned Ok before close was called"),
        "{reason}"
    );
    assert!(!reason.contains("close lost them"), "{reason}");
}

// ---------------------------------------------------------------------------------------------
// The harness: listing, selection, and runs that cannot start.

/// A log file for libtest's output (`--logfile`), unique to the test.
fn logfile(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "evbus-conformance-harness-{}-{test}.log",
        std::process::id()
    ))
}

/// Runs `harness` with `args` (after the program name) and libtest's output going to a log
/// file; returns the exit code and the log.
fn run(harness: Harness, test: &str, args: &[&str]) -> (ExitCode, String) {
    let log = logfile(test);
    let log_arg = log.to_string_lossy().into_owned();
    let mut argv = vec!["conformance", "--logfile", log_arg.as_str()];
    argv.extend_from_slice(args);
    let code = harness.run_with(argv);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (code, text)
}

/// The names `--list` printed.
fn listed(log: &str) -> BTreeSet<String> {
    log.lines()
        .map(|line| {
            line.strip_suffix(": test")
                .unwrap_or_else(|| panic!("not a list line: {line:?}"))
                .to_owned()
        })
        .collect()
}

fn failing_connect(kind: ErrorKind, message: &'static str) -> Suite<MemoryTransport> {
    Suite::new("broken", move || {
        std::future::ready(Err(Error::new(kind, message)))
    })
}

#[test]
fn list_shows_every_case_once_and_ignored_lists_the_unmet_needs() {
    let (code, all) = run(Harness::new().suite(memory), "list", &["--list"]);
    assert_eq!(code, ExitCode::SUCCESS);
    let all = listed(&all);
    assert!(all.len() >= 47, "{all:?}");
    for case in [
        "queue_send_batch_keeps_batch_order_for_one_consumer",
        "lifecycle_health_reflects_a_broker_outage",
        "topic_two_subscriptions_each_receive_every_event",
    ] {
        assert!(all.contains(case), "{case} is not listed: {all:?}");
    }

    // What nextest asks to know which tests to skip: the memory transport has no controlled
    // broker and no foreign producer, and declares every capability.
    let (_, ignored) = run(
        Harness::new().suite(memory),
        "list-ignored",
        &["--list", "--ignored"],
    );
    let expected: BTreeSet<String> = [
        "lifecycle_topic_outage_loses_no_accepted_publish_and_consumers_resume",
        "lifecycle_queue_outage_loses_no_accepted_send_and_consumers_resume",
        "lifecycle_health_reflects_a_broker_outage",
        "queue_undecodable_message_is_dead_lettered_and_does_not_block",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(listed(&ignored), expected);
}

#[test]
fn several_suites_in_one_binary_are_told_apart_by_kind() {
    let harness = Harness::new()
        .suite(memory)
        .suite(|| faulty(Fault::DropsSeq3));
    let (_, log) = run(
        harness,
        "kinds",
        &[
            "--list",
            "--exact",
            "[faulty] queue_send_batch_delivers_every_event",
        ],
    );
    assert_eq!(
        listed(&log),
        BTreeSet::from(["[faulty] queue_send_batch_delivers_every_event".to_owned()])
    );
}

#[test]
fn filters_skip_and_exact_select_cases_like_libtest() {
    // `lifecycle_clos` matches four cases; `--skip twice` drops one.
    let (code, log) = run(
        Harness::new().suite(memory),
        "select",
        &["lifecycle_clos", "--skip", "twice"],
    );
    assert_eq!(code, ExitCode::SUCCESS, "{log}");
    assert!(log.contains("running 3 tests"), "{log}");
    assert!(!log.contains("twice"), "{log}");
    assert!(
        log.contains("test result: ok. 3 passed; 0 failed; 0 ignored"),
        "{log}"
    );

    // What nextest runs: one case by its exact name.
    let (code, log) = run(
        Harness::new().suite(memory),
        "exact",
        &["--exact", "lifecycle_closing_twice_is_ok"],
    );
    assert_eq!(code, ExitCode::SUCCESS, "{log}");
    assert!(log.contains("running 1 test\n"), "{log}");
}

#[test]
fn a_case_with_an_unmet_need_is_reported_ignored_with_the_need() {
    let (code, log) = run(
        Harness::new().suite(memory),
        "ignored",
        &["--exact", "lifecycle_health_reflects_a_broker_outage"],
    );
    assert_eq!(code, ExitCode::SUCCESS, "{log}");
    assert!(log.contains("ignored (needs broker-control)"), "{log}");
    assert!(log.contains("0 passed; 0 failed; 1 ignored"), "{log}");
}

#[test]
fn a_configuration_error_fails_even_when_brokers_are_not_required() {
    let harness = Harness::new()
        .require_brokers(false)
        .suite(|| failing_connect(ErrorKind::InvalidConfig, "unknown key `hots`"));
    let (code, _) = run(
        harness,
        "config",
        &["--exact", "lifecycle_closing_twice_is_ok"],
    );
    assert_eq!(code, ExitCode::FAILURE);

    // Listing still works, so that nextest runs the cases and each reports the error.
    let harness = Harness::new()
        .require_brokers(false)
        .suite(|| failing_connect(ErrorKind::InvalidConfig, "unknown key `hots`"));
    let (code, log) = run(harness, "config-list", &["--list"]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(
        listed(&log).contains("lifecycle_closing_twice_is_ok"),
        "{log}"
    );
}

#[test]
fn an_unreachable_broker_warns_unless_brokers_are_required() {
    let refused = || failing_connect(ErrorKind::Connection, "connection refused");
    let (code, log) = run(
        Harness::new().require_brokers(false).suite(refused),
        "unreachable",
        &["lifecycle_clos"],
    );
    assert_eq!(code, ExitCode::SUCCESS, "{log}");
    assert!(log.contains("0 passed; 0 failed; 4 ignored"), "{log}");
    assert!(
        log.contains("ignored (broker unreachable, the `broken` suite was NOT run)"),
        "{log}"
    );

    // nextest skips them instead of running each to a warning.
    let (_, log) = run(
        Harness::new().require_brokers(false).suite(refused),
        "unreachable-list",
        &["--list", "--ignored"],
    );
    assert!(
        listed(&log).contains("lifecycle_closing_twice_is_ok"),
        "{log}"
    );

    let (code, _) = run(
        Harness::new().require_brokers(true).suite(refused),
        "unreachable-required",
        &["lifecycle_clos"],
    );
    assert_eq!(code, ExitCode::FAILURE);

    let timeout = || failing_connect(ErrorKind::Timeout, "no answer");
    let (code, _) = run(
        Harness::new().require_brokers(false).suite(timeout),
        "timeout",
        &["lifecycle_clos"],
    );
    assert_eq!(code, ExitCode::SUCCESS);
}
