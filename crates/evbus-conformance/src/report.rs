//! The result of a suite run: one line per case and a summary.

use std::fmt;
use std::time::Duration;

use crate::Need;

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour was shown.
    Passed,
    /// The behaviour was not shown; the reason says what went wrong.
    Failed(String),
    /// The case was not run because the transport (or the harness) does not meet these needs.
    Ignored(Vec<Need>),
}

/// The result of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseReport {
    name: String,
    outcome: Outcome,
    duration: Duration,
}

impl CaseReport {
    /// A result for the case `name`.
    pub fn new(name: impl Into<String>, outcome: Outcome, duration: Duration) -> Self {
        CaseReport {
            name: name.into(),
            outcome,
            duration,
        }
    }

    /// The case name (snake_case, named after the behaviour).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the case ended.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// How long the case ran, cleanup included (zero when ignored).
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

/// One line: `PASS <case> (<secs>s)`, `FAIL <case> (<secs>s): <reason>` or
/// `IGNORED <case>: needs <need>[, <need>]`. The duration (cleanup included) has two
/// decimals, like libtest's `finished in 0.14s`. A multi-line reason is folded onto the one
/// line.
impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.duration.as_secs_f64();
        match &self.outcome {
            Outcome::Passed => write!(f, "PASS {} ({secs:.2}s)", self.name),
            Outcome::Failed(reason) => {
                write!(f, "FAIL {} ({secs:.2}s): {}", self.name, one_line(reason))
            }
            Outcome::Ignored(needs) => {
                write!(f, "IGNORED {}: needs ", self.name)?;
                for (i, need) in needs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{need}")?;
                }
                Ok(())
            }
        }
    }
}

/// Folds a message onto one line so that every report line stays one case.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push_str(" | ");
        }
        out.push_str(line);
    }
    if out.is_empty() {
        out.push_str("(no reason given)");
    }
    out
}

/// The results of one suite run against one adapter.
///
/// `Display` prints what the run printed: one line per case, then the summary line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    adapter: String,
    cases: Vec<CaseReport>,
}

impl Report {
    /// An empty report for `adapter`.
    pub fn new(adapter: impl Into<String>) -> Self {
        Report {
            adapter: adapter.into(),
            cases: Vec::new(),
        }
    }

    /// Adds the result of one case.
    pub fn push(&mut self, case: CaseReport) {
        self.cases.push(case);
    }

    /// The adapter name the suite ran against.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// Every case result, in the order they were pushed (the suite's catalogue order once a
    /// run is complete).
    pub fn cases(&self) -> &[CaseReport] {
        &self.cases
    }

    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// Cases that were not run because a need was not met.
    pub fn ignored(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Ignored(_)))
    }

    /// Whether no case failed.
    pub fn is_success(&self) -> bool {
        self.failed() == 0
    }

    /// The summary line: `conformance <adapter>: N passed, M failed, K ignored`.
    pub fn summary(&self) -> String {
        format!(
            "conformance {}: {} passed, {} failed, {} ignored",
            self.adapter,
            self.passed(),
            self.failed(),
            self.ignored()
        )
    }

    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.cases.iter().filter(|c| pred(&c.outcome)).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for case in &self.cases {
            writeln!(f, "{case}")?;
        }
        write!(f, "{}", self.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::Capability;

    fn case(name: &str, outcome: Outcome) -> CaseReport {
        CaseReport::new(name, outcome, Duration::from_millis(10))
    }

    #[test]
    fn a_passed_case_is_one_pass_line_with_its_duration() {
        let line = case("queue_ack_once", Outcome::Passed).to_string();
        assert_eq!(line, "PASS queue_ack_once (0.01s)");
        let slow = CaseReport::new("q", Outcome::Passed, Duration::from_millis(15_004));
        assert_eq!(slow.to_string(), "PASS q (15.00s)");
    }

    #[test]
    fn a_failed_case_names_the_reason_on_one_line() {
        let reason = "expected 3 deliveries\n  got 2\n\nmissing: a\n".to_owned();
        let line = case("queue_ack_once", Outcome::Failed(reason)).to_string();
        assert_eq!(
            line,
            "FAIL queue_ack_once (0.01s): expected 3 deliveries | got 2 | missing: a"
        );
    }

    #[test]
    fn a_failure_without_a_reason_still_says_so() {
        let line = case("x", Outcome::Failed(String::new())).to_string();
        assert_eq!(line, "FAIL x (0.01s): (no reason given)");
    }

    #[test]
    fn an_ignored_case_names_what_it_needs() {
        let line = case("topic_outage", Outcome::Ignored(vec![Need::BrokerControl])).to_string();
        assert_eq!(line, "IGNORED topic_outage: needs broker-control");

        let line = case(
            "topic_replay",
            Outcome::Ignored(vec![
                Need::Capability(Capability::Replay),
                Need::Capability(Capability::Payload(1 << 20)),
            ]),
        )
        .to_string();
        assert_eq!(
            line,
            "IGNORED topic_replay: needs replay, max-payload-bytes>=1048576"
        );
    }

    #[test]
    fn the_report_prints_every_line_then_the_summary() {
        let mut report = Report::new("memory");
        report.push(case("a", Outcome::Passed));
        report.push(case("b", Outcome::Failed("boom".into())));
        report.push(case("c", Outcome::Ignored(vec![Need::BrokerControl])));
        report.push(case("d", Outcome::Passed));
        assert_eq!(
            report.to_string(),
            "PASS a (0.01s)\nFAIL b (0.01s): boom\nIGNORED c: needs broker-control\nPASS d (0.01s)\n\
             conformance memory: 2 passed, 1 failed, 1 ignored"
        );
        assert_eq!(
            (report.passed(), report.failed(), report.ignored()),
            (2, 1, 1)
        );
        assert!(!report.is_success());
    }

    #[test]
    fn success_means_no_failure_even_with_ignored_cases() {
        let mut report = Report::new("redis");
        assert!(report.is_success());
        assert_eq!(
            report.summary(),
            "conformance redis: 0 passed, 0 failed, 0 ignored"
        );
        report.push(case("c", Outcome::Ignored(vec![Need::BrokerControl])));
        assert!(report.is_success());
    }
}
