//! `cargo xtask conformance [--adapter NAME]`: runs adapters' conformance targets.
//!
//! Each adapter proves itself with a `harness = false` test target (libtest-style, on
//! `libtest-mimic`) that, after libtest's own output, prints one line per case
//! (`PASS <case> (0.12s)`, `FAIL <case> (15.00s): <reason>`, `IGNORED <case>: needs <need>`)
//! and ends with `conformance <adapter>: N passed, M failed, K ignored`. This module knows
//! where each target lives and which environment variable carries its broker address; xtask
//! only passes the environment through, and repeats the failed cases at the end.

use std::fmt;
use std::process::Command;
use std::time::Duration;

use crate::artifacts::{self, Kind};
use crate::{Result, cargo, project_root, run_streaming};

/// Where an adapter's conformance target lives and how it finds its broker.
#[derive(Debug)]
pub(crate) struct Adapter {
    /// The name used by `--adapter` and in the summary line.
    pub(crate) name: &'static str,
    /// The package holding the conformance target (directory `crates/<package>`).
    pub(crate) package: &'static str,
    /// The `[[test]]` target name.
    pub(crate) target: &'static str,
    /// The broker address variable and the default the adapter's target uses without it.
    pub(crate) url: Option<(&'static str, &'static str)>,
}

/// Every adapter evbus has or plans. Only those whose package exists are used.
const ADAPTERS: &[Adapter] = &[
    Adapter {
        name: "memory",
        package: "evbus-conformance",
        target: "memory",
        url: None,
    },
    Adapter {
        name: "redis",
        package: "evbus-redis",
        target: "conformance",
        url: Some(("EVBUS_REDIS_URL", "redis://127.0.0.1:6379")),
    },
    Adapter {
        name: "kafka",
        package: "evbus-kafka",
        target: "conformance",
        url: Some(("EVBUS_KAFKA_URL", "kafka://127.0.0.1:9092")),
    },
    Adapter {
        name: "nats",
        package: "evbus-nats",
        target: "conformance",
        url: Some(("EVBUS_NATS_URL", "nats://127.0.0.1:4222")),
    },
    Adapter {
        name: "amqp",
        package: "evbus-amqp",
        target: "conformance",
        url: Some(("EVBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
    },
    Adapter {
        name: "postgres",
        package: "evbus-sql",
        target: "conformance_postgres",
        url: Some((
            "EVBUS_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )),
    },
    // The conformance target uses a fresh file in a temporary directory unless
    // EVBUS_SQLITE_URL is set; the default here is for `cargo xtask capabilities` and bench.
    Adapter {
        name: "sqlite",
        package: "evbus-sql",
        target: "conformance_sqlite",
        url: Some(("EVBUS_SQLITE_URL", "sqlite:///tmp/evbus-sqlite/bus.db")),
    },
];

/// An adapter run against a local cluster (`cargo xtask cluster`), which is started first
/// when it is not running: the conformance target of `base`, its URL variable set to the
/// cluster's URL plus `parameters`. Only run when named (`--adapter nats-cluster`): not part
/// of a run of every adapter, nor of `cargo xtask test`.
#[derive(Debug)]
struct ClusterAdapter {
    /// The name used by `--adapter` and in the summary line.
    name: &'static str,
    /// The single-node row whose conformance target runs.
    base: &'static str,
    /// The cluster, for `crate::cluster`.
    broker: &'static str,
    /// Appended to the cluster's URL.
    parameters: &'static str,
}

const CLUSTER_ADAPTERS: &[ClusterAdapter] = &[
    ClusterAdapter {
        name: "nats-cluster",
        base: "nats",
        broker: "nats",
        parameters: "?replicas=3",
    },
    // Quorum queues (the adapter's only kind) are replicated on every node of the cluster.
    ClusterAdapter {
        name: "amqp-cluster",
        base: "amqp",
        broker: "amqp",
        parameters: "",
    },
    // Three masters with one replica each; every publish waits for its replica (the
    // default `wait_replicas` of a cluster URL).
    ClusterAdapter {
        name: "redis-cluster",
        base: "redis",
        broker: "redis",
        parameters: "",
    },
];

impl ClusterAdapter {
    /// Starts the cluster unless it runs; its URL for the adapter.
    fn start(&self) -> Result<String> {
        let cluster = crate::cluster::of(self.broker)?;
        if !cluster.running() {
            println!(
                "starting the local {0} cluster (cargo xtask cluster start {0})",
                cluster.name
            );
        }
        cluster.start()?;
        Ok(format!("{}{}", cluster.url(), self.parameters))
    }
}

/// `cargo xtask conformance --adapter <name>-cluster`.
fn run_cluster(cluster: &ClusterAdapter, args: &[String]) -> Result<()> {
    let base = ADAPTERS
        .iter()
        .find(|a| a.name == cluster.base)
        .ok_or_else(|| format!("no adapter `{}`", cluster.base))?;
    let (var, _) = base
        .url
        .ok_or_else(|| format!("adapter `{}` takes no URL", base.name))?;
    let started = std::time::Instant::now();
    let url = cluster.start()?;
    println!("{}: {var}={}", cluster.name, redact(&url));
    let mut failed_cases = Vec::new();
    let summaries = run_one(base.name, args, &[(var, &url)], |line| {
        if let Some(case) = CaseLine::parse(line).filter(|c| c.outcome == CaseOutcome::Failed) {
            failed_cases.push(format!("{}: {}", cluster.name, case.name));
        }
    })?;
    println!();
    for case in &failed_cases {
        println!("failed: {case}");
    }
    for summary in &summaries {
        println!("{summary}");
    }
    println!(
        "{} took {:.0} s (cluster start and build included)",
        cluster.name,
        started.elapsed().as_secs_f64()
    );
    if summaries
        .iter()
        .any(|s| s.failed != 0 || s.status != Status::Ran)
    {
        Err(format!("conformance failed for: {}", cluster.name))
    } else {
        Ok(())
    }
}

impl Adapter {
    /// Whether the adapter's package is in this checkout.
    fn exists(&self) -> bool {
        project_root()
            .join("crates")
            .join(self.package)
            .join("Cargo.toml")
            .is_file()
    }

    /// Where the target's test file is expected.
    fn target_exists(&self) -> bool {
        let tests = project_root()
            .join("crates")
            .join(self.package)
            .join("tests");
        tests.join(format!("{}.rs", self.target)).is_file()
            || tests.join(self.target).join("main.rs").is_file()
    }

    /// `redis: EVBUS_REDIS_URL=redis://... (default)`, with any password hidden.
    pub(crate) fn describe_url(&self) -> String {
        match self.url {
            None => format!("{}: in-process, no broker", self.name),
            Some((var, default)) => match std::env::var(var) {
                Ok(url) if !url.is_empty() => format!("{}: {var}={}", self.name, redact(&url)),
                _ => format!("{}: {var} unset, using {}", self.name, redact(default)),
            },
        }
    }
}

/// The adapters whose package exists in this checkout, in table order.
pub(crate) fn present() -> Vec<&'static Adapter> {
    ADAPTERS.iter().filter(|a| a.exists()).collect()
}

/// Prints which broker address each present adapter uses, and the strictness settings.
pub(crate) fn print_environment() {
    println!("broker addresses:");
    for adapter in present() {
        println!("  {}", adapter.describe_url());
    }
    let strict = ["CI", "EVBUS_REQUIRE_BROKERS"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x}")))
        .collect::<Vec<_>>();
    if strict.is_empty() {
        println!(
            "  (an unreachable broker is a loud warning; set EVBUS_REQUIRE_BROKERS=1 to make it a failure)"
        );
    } else {
        println!(
            "  ({}: an unreachable broker is a failure)",
            strict.join(", ")
        );
    }
}

pub(crate) fn run(adapter: Option<&str>, args: &[String]) -> Result<()> {
    if let Some(cluster) = adapter.and_then(|name| CLUSTER_ADAPTERS.iter().find(|c| c.name == name))
    {
        return run_cluster(cluster, args);
    }
    let present = present();
    let selected: Vec<&Adapter> = match adapter {
        None => present.clone(),
        Some(name) => match present.iter().find(|a| a.name == name) {
            Some(a) => vec![*a],
            None => {
                let known = present
                    .iter()
                    .map(|a| a.name)
                    .chain(CLUSTER_ADAPTERS.iter().map(|c| c.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                let planned = ADAPTERS
                    .iter()
                    .find(|a| a.name == name)
                    .map(|a| {
                        format!(
                            " (`{name}` is planned: crates/{} does not exist yet)",
                            a.package
                        )
                    })
                    .unwrap_or_default();
                return Err(format!("unknown adapter `{name}`{planned}; known: {known}"));
            }
        },
    };
    for adapter in &selected {
        if !adapter.target_exists() {
            return Err(format!(
                "adapter `{}` has no conformance target yet: expected crates/{}/tests/{}.rs \
                 (a `[[test]] name = \"{}\"`, `harness = false` target; see docs/adapter-guide.md)",
                adapter.name, adapter.package, adapter.target, adapter.target
            ));
        }
    }

    for adapter in &selected {
        println!("{}", adapter.describe_url());
    }
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    let mut failed_cases = Vec::new();
    for adapter in &selected {
        let mut cmd = cargo(&["test", "-p", adapter.package, "--test", adapter.target]);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        let before = summaries.len();
        let ok = run_streaming(cmd, |line| {
            summaries.extend(Summary::parse(line));
            if let Some(case) = CaseLine::parse(line).filter(|c| c.outcome == CaseOutcome::Failed) {
                failed_cases.push(format!("{}: {}", adapter.name, case.name));
            }
        })?;
        if summaries.len() == before {
            summaries.push(Summary::not_seen(adapter.name, Status::Missing));
        }
        if !ok || summaries[before..].iter().any(|s| s.failed != 0) {
            failed.push(adapter.name);
        }
    }

    println!();
    for case in &failed_cases {
        println!("failed: {case}");
    }
    for summary in &summaries {
        println!("{summary}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("conformance failed for: {}", failed.join(", ")))
    }
}

/// Runs the conformance target of the adapter `name` once, with `env` added to its
/// environment (container mode: `crate::containers`), calling `on_line` for each stdout line;
/// returns the summaries it printed (a `Missing` one if none).
pub(crate) fn run_one(
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
    mut on_line: impl FnMut(&str),
) -> Result<Vec<Summary>> {
    let adapter = ADAPTERS
        .iter()
        .find(|a| a.name == name && a.exists() && a.target_exists())
        .ok_or_else(|| format!("adapter `{name}` has no conformance target in this checkout"))?;
    let mut cmd = if artifacts::from_workspace_test_build() {
        let test = artifacts::find(adapter.package, adapter.target, Kind::Test)?;
        let mut cmd = Command::new(test.path);
        cmd.current_dir(test.dir).args(args);
        cmd
    } else {
        let mut cmd = cargo(&["test", "-p", adapter.package, "--test", adapter.target]);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        cmd
    };
    cmd.envs(env.iter().copied());
    let mut summaries = Vec::new();
    let ok = run_streaming(cmd, |line| {
        summaries.extend(Summary::parse(line));
        on_line(line);
    })?;
    if summaries.is_empty() {
        summaries.push(Summary::not_seen(adapter.name, Status::Missing));
    }
    if !ok && summaries.iter().all(|s| s.failed == 0) {
        summaries[0].failed += 1;
    }
    Ok(summaries)
}

/// A parsed `conformance <adapter>: N passed, M failed, K ignored` line, or the suite's
/// warning that it did not run, or the absence of both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) adapter: String,
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
    pub(crate) status: Status,
}

/// Whether a suite ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// It ran and printed its summary line.
    Ran,
    /// It printed its loud "was NOT run" warning: the broker was unreachable and not required
    /// (with `CI=true` or `EVBUS_REQUIRE_BROKERS=1` the suite reports a failure instead).
    NotRun,
    /// It printed neither (it did not build, crashed, or the target does not exist).
    Missing,
}

impl Summary {
    /// Parses a summary line or the suite's "NOT run" warning; any other line gives `None`.
    pub(crate) fn parse(line: &str) -> Option<Summary> {
        let line = line.trim();
        if let Some(adapter) = line
            .strip_prefix("WARNING: the evbus conformance suite for `")
            .and_then(|rest| rest.strip_suffix("` was NOT run."))
        {
            return Some(Summary::not_seen(adapter, Status::NotRun));
        }
        let rest = line.strip_prefix("conformance ")?;
        let (adapter, counts) = rest.rsplit_once(": ")?;
        let mut numbers = counts.split(", ").map(|part| {
            let (n, word) = part.split_once(' ')?;
            Some((n.parse::<u64>().ok()?, word))
        });
        let mut next = |expected: &str| match numbers.next()?? {
            (n, word) if word == expected => Some(n),
            _ => None,
        };
        let summary = Summary {
            adapter: adapter.to_owned(),
            passed: next("passed")?,
            failed: next("failed")?,
            ignored: next("ignored")?,
            status: Status::Ran,
        };
        numbers.next().is_none().then_some(summary)
    }

    fn not_seen(adapter: &str, status: Status) -> Summary {
        Summary {
            adapter: adapter.to_owned(),
            passed: 0,
            failed: 0,
            ignored: 0,
            status,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adapter = &self.adapter;
        match self.status {
            Status::Ran => write!(
                f,
                "conformance {adapter}: {} passed, {} failed, {} ignored",
                self.passed, self.failed, self.ignored
            ),
            Status::NotRun => write!(
                f,
                "conformance {adapter}: NOT RUN, broker unreachable (see the WARNING above; \
                 EVBUS_REQUIRE_BROKERS=1 makes this a failure)"
            ),
            Status::Missing => write!(
                f,
                "conformance {adapter}: no summary line (the target did not build or did not finish)"
            ),
        }
    }
}

/// How one case ended, from its report line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CaseOutcome {
    Passed,
    Failed,
    Ignored,
}

/// A parsed per-case line of a conformance report: `PASS <case> (0.12s)`,
/// `FAIL <case> (15.00s): <reason>` or `IGNORED <case>: needs <need>[, <need>]`. Lines of
/// suites from before durations were printed (`PASS <case>`, `FAIL <case>: <reason>`) parse
/// too, without a duration.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CaseLine {
    pub(crate) name: String,
    pub(crate) outcome: CaseOutcome,
    /// How long the case ran (none for ignored cases and old-style lines).
    pub(crate) duration: Option<Duration>,
    /// The failure reason, or what an ignored case needs.
    pub(crate) detail: Option<String>,
}

impl CaseLine {
    /// Parses one report line; any other line gives `None`.
    pub(crate) fn parse(line: &str) -> Option<CaseLine> {
        let line = line.trim_end();
        let (outcome, rest) = if let Some(rest) = line.strip_prefix("PASS ") {
            (CaseOutcome::Passed, rest)
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            (CaseOutcome::Failed, rest)
        } else if let Some(rest) = line.strip_prefix("IGNORED ") {
            (CaseOutcome::Ignored, rest)
        } else {
            return None;
        };
        // The name has no spaces or colons; what follows is ` (<secs>s)` and/or `: <detail>`.
        let name_end = rest.find([' ', ':']).unwrap_or(rest.len());
        let (name, mut rest) = rest.split_at(name_end);
        if name.is_empty() {
            return None;
        }
        let mut duration = None;
        if let Some(after) = rest.strip_prefix(" (") {
            let (secs, after) = after.split_once("s)")?;
            duration = Some(Duration::try_from_secs_f64(secs.parse().ok()?).ok()?);
            rest = after;
        }
        let detail = match rest.strip_prefix(": ") {
            Some(detail) => Some(detail.to_owned()),
            None if rest.is_empty() => None,
            None => return None,
        };
        let well_formed = match outcome {
            CaseOutcome::Passed => detail.is_none(),
            CaseOutcome::Failed => detail.is_some(),
            CaseOutcome::Ignored => detail.as_deref().is_some_and(|d| d.starts_with("needs ")),
        };
        well_formed.then(|| CaseLine {
            name: name.to_owned(),
            outcome,
            duration,
            detail,
        })
    }
}

/// A URL with its password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse() {
        assert_eq!(
            Summary::parse("conformance memory: 31 passed, 0 failed, 3 ignored"),
            Some(Summary {
                adapter: "memory".into(),
                passed: 31,
                failed: 0,
                ignored: 3,
                status: Status::Ran,
            })
        );
        let dyn_line = Summary::parse("conformance memory (dyn): 1 passed, 2 failed, 0 ignored");
        assert_eq!(
            dyn_line.map(|s| (s.adapter, s.failed)),
            Some(("memory (dyn)".into(), 2))
        );
    }

    #[test]
    fn the_not_run_warning_is_recognised() {
        let warning =
            Summary::parse("WARNING: the evbus conformance suite for `redis` was NOT run.");
        assert_eq!(
            warning.map(|s| (s.adapter, s.status)),
            Some(("redis".into(), Status::NotRun))
        );
    }

    #[test]
    fn case_lines_parse_with_and_without_durations() {
        let line = |s: &str| CaseLine::parse(s).unwrap_or_else(|| panic!("{s:?} did not parse"));
        let pass = line("PASS queue_send_receive_ack (0.12s)");
        assert_eq!(
            (pass.name.as_str(), pass.outcome, pass.duration, pass.detail),
            (
                "queue_send_receive_ack",
                CaseOutcome::Passed,
                Some(Duration::from_millis(120)),
                None
            )
        );
        let fail = line(
            "FAIL topic_fan_out (15.00s): subscription a: published 10 events, all returned Ok; \
             3 never arrived within 15s: a, b, c (7 did)",
        );
        assert_eq!(fail.outcome, CaseOutcome::Failed);
        assert_eq!(fail.duration, Some(Duration::from_secs(15)));
        assert!(fail.detail.as_deref().is_some_and(
            |d| d.starts_with("subscription a: published 10") && d.ends_with("(7 did)")
        ));
        let ignored = line("IGNORED lifecycle_outage: needs broker-control");
        assert_eq!(
            (ignored.outcome, ignored.duration, ignored.detail.as_deref()),
            (CaseOutcome::Ignored, None, Some("needs broker-control"))
        );
        // The line of a suite that could not start, and lines of older suites.
        let unreachable = line("FAIL redis (0.00s): broker unreachable: connection refused");
        assert_eq!(unreachable.name, "redis");
        let old = line("FAIL queue_x: expected 3 deliveries (2 arrived)");
        assert_eq!(
            (old.duration, old.detail.as_deref()),
            (None, Some("expected 3 deliveries (2 arrived)"))
        );
        assert_eq!(line("PASS queue_x").duration, None);
    }

    #[test]
    fn other_lines_are_not_case_lines() {
        for line in [
            "conformance memory: 31 passed, 0 failed, 3 ignored",
            "test [memory] queue_x ... ok",
            "PASS",
            "PASS queue_x: why",
            "FAIL queue_x (0.1s)",
            "FAIL queue_x (soon): why",
            "IGNORED queue_x: broker-control",
            "PASSED queue_x",
        ] {
            assert_eq!(CaseLine::parse(line), None, "{line}");
        }
    }

    #[test]
    fn other_lines_are_not_summaries() {
        for line in [
            "PASS queue_send_receive_ack",
            "PASS queue_send_receive_ack (0.12s)",
            "FAIL topic_fan_out: conformance x: 1 passed",
            "FAIL topic_fan_out (1.00s): conformance x: 1 passed, 0 failed, 0 ignored",
            "IGNORED lifecycle_outage: needs broker-control",
            "conformance redis: 1 passed, 2 failed",
            "conformance redis: 1 passed, 2 failed, 3 ignored, 4 more",
            "test result: ok. 3 passed; 0 failed",
        ] {
            assert_eq!(Summary::parse(line), None, "{line}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn adapter_names_are_unique() {
        let mut names: Vec<_> = ADAPTERS
            .iter()
            .map(|a| a.name)
            .chain(CLUSTER_ADAPTERS.iter().map(|c| c.name))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ADAPTERS.len() + CLUSTER_ADAPTERS.len());
        for cluster in CLUSTER_ADAPTERS {
            let base = ADAPTERS.iter().find(|a| a.name == cluster.base);
            assert!(base.is_some_and(|b| b.url.is_some()), "{}", cluster.name);
            assert!(crate::cluster::of(cluster.broker).is_ok());
        }
    }
}
