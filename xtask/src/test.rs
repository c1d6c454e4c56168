//! `cargo xtask test`: everything CI checks, in order, stopping at the first failing step.
//!
//! 1. `fmt`: `cargo fmt --all --check`
//! 2. `clippy`: `cargo clippy --workspace --all-targets -- -D warnings`
//! 3. `test`: `cargo test --workspace --no-fail-fast` — unit, integration and doc tests, and
//!    every adapter's conformance target (`harness = false` binaries ending with
//!    `conformance <adapter>: N passed, M failed, K ignored`); every adapter in the workspace
//!    must print that line
//! 4. `chaos`: the fault suite's short run on every adapter (`cargo xtask chaos --events 5000`
//!    with one handler kill and one broker restart or network cut each, seed 18; see
//!    [`crate::chaos`] and docs/reliability.md)
//! 5. `contract`: the gateway's OpenAPI document against a real `evbus serve` with
//!    schemathesis, every phase and check (see [`crate::contract`])
//! 6. `clients`: the TypeScript client's tests against a real `evbus serve` (see
//!    [`crate::clients`])
//! 7. `containers`: the conformance suites again, each broker in a container
//!    (`cargo xtask conformance --containers`, see [`crate::containers`]) when Docker is
//!    reachable; without Docker one loud line says they were skipped, and under `CI` or
//!    `EVBUS_REQUIRE_BROKERS` that is a failure
//! 8. `tidy`: see [`crate::tidy`]
//!
//! Steps 4 to 7 run the programs step 3 built (test binaries, the chaos workloads, `evbus`)
//! instead of building their packages again with other dependency features: see
//! [`crate::artifacts`].
//!
//! Child output is streamed, never captured; a summary of steps and durations ends the run,
//! closed by one plain line adding up every libtest result and conformance summary:
//! `tests: N passed, M failed, K skipped`. A conformance target is itself a libtest-style
//! binary: its `test result:` line is followed by its `conformance ...` summaries, which
//! replace it in the sum so that no case is counted twice.

use std::time::{Duration, Instant};

use crate::conformance::{self, CaseLine, Status, Summary};
use crate::{Result, cargo, containers, run_streaming, tidy};

type StepFn = fn(&mut Totals) -> Result<()>;

const STEPS: [(&str, StepFn); 8] = [
    ("fmt", fmt),
    ("clippy", clippy),
    ("test", test),
    ("chaos", |totals| {
        totals.notes.extend(crate::chaos::test_step()?);
        Ok(())
    }),
    ("contract", contract),
    ("clients", |totals| {
        totals.notes.push(crate::clients::run()?);
        Ok(())
    }),
    ("containers", containers),
    ("tidy", |_| tidy::run()),
];

pub(crate) fn run() -> Result<()> {
    let started = Instant::now();
    conformance::print_environment();

    let mut totals = Totals::default();
    let mut report: Vec<(&str, Option<(bool, Duration)>)> = Vec::new();
    let mut failure = None;
    for (name, step) in STEPS {
        if failure.is_some() {
            report.push((name, None));
            continue;
        }
        println!("\n==> xtask test: {name}");
        let step_started = Instant::now();
        let result = step(&mut totals);
        let took = step_started.elapsed();
        if let Err(message) = &result {
            eprintln!("xtask test: step `{name}` failed: {message}");
            failure = Some(format!("step `{name}` failed: {message}"));
        }
        report.push((name, Some((result.is_ok(), took))));
    }

    println!("\n==> xtask test: summary");
    for (name, outcome) in &report {
        match outcome {
            Some((true, took)) => println!("  ok      {name:<10} {:>7.1}s", took.as_secs_f64()),
            Some((false, took)) => println!("  FAILED  {name:<10} {:>7.1}s", took.as_secs_f64()),
            None => println!("  skipped {name:<10}"),
        }
    }
    for summary in &totals.conformance {
        println!("  {summary}");
    }
    for note in &totals.notes {
        println!("  {note}");
    }
    println!(
        "  total              {:>7.1}s",
        started.elapsed().as_secs_f64()
    );
    let (passed, failed, skipped) = totals.sum();
    println!("tests: {passed} passed, {failed} failed, {skipped} skipped");

    failure.map_or(Ok(()), Err)
}

fn fmt(_: &mut Totals) -> Result<()> {
    let ok = run_streaming(cargo(&["fmt", "--all", "--check"]), |_| {})?;
    ok.then_some(())
        .ok_or_else(|| "formatting differs; run `cargo fmt --all`".to_owned())
}

fn clippy(_: &mut Totals) -> Result<()> {
    let cmd = cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let ok = run_streaming(cmd, |_| {})?;
    ok.then_some(())
        .ok_or_else(|| "clippy found problems (see above)".to_owned())
}

fn contract(totals: &mut Totals) -> Result<()> {
    totals.notes.push(crate::contract::run()?);
    Ok(())
}

fn containers(totals: &mut Totals) -> Result<()> {
    match containers::test_step()? {
        Ok(summaries) => totals.conformance.extend(summaries),
        Err(skipped) => totals.notes.push(skipped),
    }
    Ok(())
}

fn test(totals: &mut Totals) -> Result<()> {
    let cmd = cargo(&["test", "--workspace", "--no-fail-fast"]);
    let ok = run_streaming(cmd, |line| totals.record(line))?;
    if !ok {
        return Err("some tests failed (see above)".to_owned());
    }
    // The steps after this one run what it built (see `crate::artifacts`).
    crate::artifacts::use_workspace_test_build();
    let summaries = &totals.conformance;
    if let Some(bad) = summaries.iter().find(|s| s.failed != 0) {
        return Err(format!("{bad}, yet its target exited successfully"));
    }
    let mut silent = Vec::new();
    for adapter in conformance::present() {
        let seen: Vec<&Summary> = summaries
            .iter()
            .filter(|s| summary_of(s, adapter.name))
            .collect();
        if seen.is_empty() {
            silent.push(format!(
                "{} (crates/{}, test target `{}`)",
                adapter.name, adapter.package, adapter.target
            ));
        }
        for not_run in seen.iter().filter(|s| s.status == Status::NotRun) {
            eprintln!("xtask test: WARNING: {not_run}");
        }
    }
    if !silent.is_empty() {
        return Err(format!(
            "no `conformance <adapter>: ...` line from: {}; every adapter in the workspace must \
             run the conformance suite (docs/adapter-guide.md)",
            silent.join(", ")
        ));
    }
    Ok(())
}

/// What the test step saw: libtest results and conformance summaries.
#[derive(Debug, Default)]
struct Totals {
    /// Sums of libtest's `test result:` lines: passed, failed, ignored.
    libtest: (u64, u64, u64),
    conformance: Vec<Summary>,
    /// The last `test result:` counts, while only blank lines followed them: if conformance
    /// summaries come next, that result was the conformance binary's own, and is taken back.
    last_result: Option<(u64, u64, u64)>,
    /// Lines for the summary (the container runs skipped because Docker is absent).
    notes: Vec<String>,
}

impl Totals {
    fn record(&mut self, line: &str) {
        if let Some((p, f, i)) = libtest_result(line) {
            self.libtest.0 += p;
            self.libtest.1 += f;
            self.libtest.2 += i;
            self.last_result = Some((p, f, i));
            return;
        }
        match Summary::parse(line) {
            Some(summary) => {
                if summary.status == Status::Ran
                    && let Some((p, f, i)) = self.last_result.take()
                {
                    self.libtest.0 -= p;
                    self.libtest.1 -= f;
                    self.libtest.2 -= i;
                }
                self.conformance.push(summary);
            }
            // The report's per-case lines come between libtest's result and the summaries.
            None if line.trim().is_empty() || CaseLine::parse(line).is_some() => {}
            None => self.last_result = None,
        }
    }

    /// Passed, failed and skipped (ignored) over libtest and the conformance suites.
    fn sum(&self) -> (u64, u64, u64) {
        self.conformance.iter().fold(self.libtest, |(p, f, i), s| {
            (p + s.passed, f + s.failed, i + s.ignored)
        })
    }
}

/// The counts of a libtest line such as
/// `test result: ok. 18 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.1s`.
fn libtest_result(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_status, counts) = rest.split_once(". ")?;
    let mut found = (None, None, None);
    for part in counts.split("; ") {
        let Some((n, word)) = part.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match word {
            "passed" => found.0 = Some(n),
            "failed" => found.1 = Some(n),
            "ignored" => found.2 = Some(n),
            _ => {}
        }
    }
    Some((found.0?, found.1?, found.2?))
}

/// Whether `summary` reports on `adapter` (`memory`, or a variant such as `memory (dyn)`).
fn summary_of(summary: &Summary, adapter: &str) -> bool {
    summary
        .adapter
        .strip_prefix(adapter)
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_results_are_counted() {
        assert_eq!(
            libtest_result(
                "test result: ok. 18 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.14s"
            ),
            Some((18, 0, 2))
        );
        assert_eq!(
            libtest_result(
                "test result: FAILED. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((8, 1, 0))
        );
        assert_eq!(libtest_result("test tidy::tests::tidy ... ok"), None);
    }

    #[test]
    fn a_conformance_binary_is_counted_by_its_summaries_not_twice() {
        let mut totals = Totals::default();
        for line in [
            "test result: ok. 18 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.14s",
            "     Running tests/memory.rs (target/debug/deps/memory-0123)",
            "test [memory] queue_x ... ok",
            "",
            "test result: ok. 4 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.2s",
            "",
            "PASS queue_x (0.10s)",
            "IGNORED lifecycle_outage: needs broker-control",
            "conformance memory: 2 passed, 0 failed, 1 ignored",
            "PASS queue_x (0.10s)",
            "conformance memory-dyn: 2 passed, 0 failed, 1 ignored",
            "test result: ok. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
            "     Running tests/other.rs",
            "conformance redis: 1 passed, 0 failed, 0 ignored",
        ] {
            totals.record(line);
        }
        // 18+2 and 5+1 from libtest; the memory binary's 4+2 replaced by its two summaries;
        // a summary far from any result line is added as it is.
        assert_eq!(totals.sum(), (18 + 5 + 4 + 1, 1, 2 + 2));
        assert_eq!(totals.conformance.len(), 3);
    }

    #[test]
    fn variants_of_an_adapter_count_as_its_summary() {
        let line = |s: &str| Summary::parse(s).expect("a summary line");
        assert!(summary_of(
            &line("conformance memory: 1 passed, 0 failed, 0 ignored"),
            "memory"
        ));
        assert!(summary_of(
            &line("conformance memory (dyn): 1 passed, 0 failed, 0 ignored"),
            "memory"
        ));
        assert!(!summary_of(
            &line("conformance memorydb: 1 passed, 0 failed, 0 ignored"),
            "memory"
        ));
    }
}
