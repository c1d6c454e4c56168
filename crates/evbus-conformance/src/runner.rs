//! Runs cases: checks needs, spawns each case with a time limit, turns a panic or a timeout
//! into a failure, and cleans up what the case created. Used by both entry points: the
//! libtest-style harness ([`crate::harness`]) and [`Suite::run`](crate::Suite::run).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use evbus::{Capabilities, ErrorKind, Health, Transport};
use futures::StreamExt;

use crate::cases::Case;
use crate::report::{CaseReport, Outcome, Report};
use crate::support::{
    CONNECT_WITHIN, ConnectFn, Control, Ctx, Failure, Names, OPERATION_WITHIN, Resource, Shared,
    run_id,
};
use crate::{Need, RawProducer, Suite};

/// How many cases run at once unless told otherwise (`--test-threads`,
/// [`Suite::concurrency`](crate::Suite::concurrency)).
pub(crate) const DEFAULT_CONCURRENCY: usize = 4;

/// Why the suite cannot run against the broker at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unusable {
    /// The broker could not be reached (a connection or timeout error, or an unhealthy
    /// transport): a warning outside CI, a failure under it.
    Unreachable(String),
    /// Opening a connection failed for another reason (an invalid URL or setting, refused
    /// credentials, ...): always a failure.
    Config(String),
    /// The transport misbehaves right away (reports itself closed after connecting): always a
    /// failure.
    Broken(String),
}

impl Unusable {
    /// The reason printed in `FAIL <adapter>: <reason>`.
    pub(crate) fn reason(&self) -> String {
        match self {
            Unusable::Unreachable(e) => format!("broker unreachable: {e}"),
            Unusable::Config(e) => format!(
                "configuration error: {e} (not an unreachable broker, so this fails even \
                 outside CI: fix the adapter's URL or settings)"
            ),
            Unusable::Broken(e) => e.clone(),
        }
    }

    /// The report of a run that could not start: the single case `<adapter>` failed.
    pub(crate) fn report(&self, adapter: &str) -> Report {
        let mut report = Report::new(adapter);
        report.push(CaseReport::new(
            adapter,
            Outcome::Failed(self.reason()),
            Duration::ZERO,
        ));
        report
    }
}

/// Classifies a connect error: only [`ErrorKind::Connection`] and [`ErrorKind::Timeout`] mean
/// the broker is unreachable; every other kind is a configuration error.
pub(crate) fn classify(error: &evbus::Error) -> Unusable {
    match error.kind() {
        ErrorKind::Connection | ErrorKind::Timeout => Unusable::Unreachable(error.to_string()),
        _ => Unusable::Config(error.to_string()),
    }
}

/// Connects, checks health and reads the capabilities; the error says why the broker cannot
/// be used.
pub(crate) async fn probe<T: Transport + 'static>(
    connect: &ConnectFn<T>,
) -> Result<Capabilities, Unusable> {
    let transport = match tokio::time::timeout(CONNECT_WITHIN, connect()).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(classify(&e)),
        Err(_) => {
            return Err(Unusable::Unreachable(format!(
                "no connection within {CONNECT_WITHIN:?}"
            )));
        }
    };
    let health = match tokio::time::timeout(OPERATION_WITHIN, transport.health()).await {
        Ok(h) => h,
        Err(_) => Health::Unhealthy(format!("health did not answer within {OPERATION_WITHIN:?}")),
    };
    let caps = transport.capabilities();
    let _ = tokio::time::timeout(OPERATION_WITHIN, transport.close()).await;
    match health {
        Health::Healthy | Health::Degraded(_) => Ok(caps),
        // Unreachable, not broken: a client that connects lazily (Kafka's) opens without
        // the broker and learns of it here. But it may be the adapter's own `health`.
        Health::Unhealthy(reason) => Err(Unusable::Unreachable(format!(
            "the transport connected but reports it is unhealthy: {reason} (if the broker is \
             up, look at the adapter's `health`)"
        ))),
        Health::Closed => Err(Unusable::Broken(
            "the transport reports it is closed right after connecting".into(),
        )),
    }
}

/// The needs of `case` that the transport and the harness do not meet.
pub(crate) fn unmet<T: Transport + 'static>(
    case: &Case<T>,
    caps: &Capabilities,
    has_control: bool,
    has_raw_producer: bool,
) -> Vec<Need> {
    case.needs
        .iter()
        .copied()
        .filter(|need| !meets(*need, caps, has_control, has_raw_producer))
        .collect()
}

/// Whether a case uses the controlled broker (such cases never run at the same time).
pub(crate) fn uses_control<T: Transport + 'static>(case: &Case<T>) -> bool {
    case.needs.contains(&Need::BrokerControl)
}

/// Runs the suite, `concurrency` cases at a time (outage cases one at a time), printing each
/// line as it is known; the report lists the cases in catalogue order.
pub(crate) async fn run<T: Transport + 'static>(suite: Suite<T>) -> Report {
    let caps = match probe(&*suite.connect).await {
        Ok(caps) => caps,
        Err(unusable) => {
            let report = unusable.report(&suite.adapter);
            println!("{report}");
            return report;
        }
    };
    let names = Names::new(&suite.adapter, &run_id());
    let outage = tokio::sync::Mutex::new(());
    let selected: Vec<(usize, Case<T>)> = crate::cases::all::<T>()
        .into_iter()
        .filter(|case| suite.selects(case.name))
        .enumerate()
        .collect();
    let concurrency = suite.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let mut results: Vec<(usize, CaseReport)> = futures::stream::iter(selected)
        .map(|(index, case)| {
            let (names, caps, outage) = (&names, &caps, &outage);
            let (connect, control) = (&suite.connect, suite.control.as_ref());
            let raw = suite.raw_producer.as_ref();
            async move {
                let unmet = unmet(&case, caps, control.is_some(), raw.is_some());
                let result = if !unmet.is_empty() {
                    CaseReport::new(case.name, Outcome::Ignored(unmet), Duration::ZERO)
                } else if uses_control(&case) {
                    let _one_outage_at_a_time = outage.lock().await;
                    run_case(&case, names, connect, control, raw, caps).await
                } else {
                    run_case(&case, names, connect, control, raw, caps).await
                };
                println!("{result}");
                (index, result)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.sort_by_key(|(index, _)| *index);
    let mut report = Report::new(suite.adapter.clone());
    for (_, result) in results {
        report.push(result);
    }
    println!("{}", report.summary());
    report
}

/// Whether a need is met by the declared capabilities and the harness.
pub(crate) fn meets(
    need: Need,
    caps: &Capabilities,
    has_control: bool,
    has_raw_producer: bool,
) -> bool {
    match need {
        Need::Capability(cap) => caps.has(cap),
        Need::BrokerControl => has_control,
        Need::RawProducer => has_raw_producer,
        Need::PayloadLimit => caps.max_payload_bytes.is_some(),
    }
}

/// Runs one case in its own task with its time limit, then cleans up after it.
pub(crate) async fn run_case<T: Transport + 'static>(
    case: &Case<T>,
    names: &Names,
    connect: &Arc<ConnectFn<T>>,
    control: Option<&Control<T>>,
    raw_producer: Option<&Arc<dyn RawProducer>>,
    caps: &Capabilities,
) -> CaseReport {
    let started = tokio::time::Instant::now();
    let shared = Arc::new(Shared::default());
    let ctx = Ctx::new(
        case.name,
        names,
        Arc::clone(connect),
        control.cloned(),
        raw_producer.cloned(),
        caps.clone(),
        Arc::clone(&shared),
    );
    let limit = case.timeout;
    let body = (case.run)(ctx);
    let task = tokio::spawn(async move { tokio::time::timeout(limit, body).await });
    let mut outcome = match task.await {
        Ok(Ok(Ok(()))) => Outcome::Passed,
        Ok(Ok(Err(Failure(reason)))) => Outcome::Failed(reason),
        Ok(Err(_)) => Outcome::Failed(format!("timed out after {limit:?}")),
        Err(e) if e.is_panic() => {
            Outcome::Failed(format!("panicked: {}", panic_message(e.into_panic())))
        }
        Err(e) => Outcome::Failed(format!("the case task did not finish: {e}")),
    };
    if let Err(problem) = cleanup(&shared, connect, control).await {
        outcome = match outcome {
            Outcome::Passed => Outcome::Failed(format!("cleanup failed: {problem}")),
            Outcome::Failed(reason) => {
                Outcome::Failed(format!("{reason} (cleanup failed too: {problem})"))
            }
            ignored @ Outcome::Ignored(_) => ignored,
        };
    }
    CaseReport::new(case.name, outcome, started.elapsed())
}

/// Closes the case's connections, lets the controlled broker back up, and deletes every
/// topic and queue the case named.
async fn cleanup<T: Transport + 'static>(
    shared: &Shared<T>,
    connect: &Arc<ConnectFn<T>>,
    control: Option<&Control<T>>,
) -> Result<(), String> {
    for conn in shared.take_connections() {
        // The case may have closed it already (fine) or left it broken (nothing to do).
        let _ = tokio::time::timeout(OPERATION_WITHIN, conn.close()).await;
    }
    let resources = shared.take_resources();
    let controlled = match control {
        Some(control) if shared.used_control() => {
            match tokio::time::timeout(Duration::from_secs(120), control.resume()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("resuming the controlled broker: {e}")),
                Err(_) => return Err("resuming the controlled broker did not finish".into()),
            }
            Some(control)
        }
        _ => None,
    };
    if resources.is_empty() {
        return Ok(());
    }
    let opened = match controlled {
        Some(control) => tokio::time::timeout(CONNECT_WITHIN, control.connect()).await,
        None => tokio::time::timeout(CONNECT_WITHIN, connect()).await,
    };
    let conn = match opened {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(format!("connecting to delete what the case created: {e}")),
        Err(_) => return Err("connecting to delete what the case created timed out".into()),
    };
    let mut problems = Vec::new();
    for resource in resources.iter().rev() {
        let (what, result) = match resource {
            Resource::Topic(name) => (
                format!("topic `{name}`"),
                tokio::time::timeout(OPERATION_WITHIN, conn.delete_topic(name)).await,
            ),
            Resource::Queue(name) => (
                format!("queue `{name}`"),
                tokio::time::timeout(OPERATION_WITHIN, conn.delete_queue(name)).await,
            ),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("deleting {what}: {e}")),
            Err(_) => problems.push(format!("deleting {what} timed out")),
        }
    }
    let _ = tokio::time::timeout(OPERATION_WITHIN, conn.close()).await;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The message of a panic payload.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_and_timeout_errors_mean_an_unreachable_broker() {
        for kind in [ErrorKind::Connection, ErrorKind::Timeout] {
            let unusable = classify(&evbus::Error::new(kind, "refused"));
            assert!(matches!(unusable, Unusable::Unreachable(_)), "{kind}");
            assert!(
                unusable.reason().starts_with("broker unreachable: "),
                "{}",
                unusable.reason()
            );
        }
        for kind in [
            ErrorKind::InvalidConfig,
            ErrorKind::Broker,
            ErrorKind::Unsupported,
            ErrorKind::Full,
            ErrorKind::Internal,
        ] {
            let unusable = classify(&evbus::Error::new(kind, "unknown key `hots`"));
            assert!(matches!(unusable, Unusable::Config(_)), "{kind}");
            let reason = unusable.reason();
            assert!(reason.starts_with("configuration error: "), "{reason}");
            assert!(reason.contains("unknown key `hots`"), "{reason}");
        }
    }

    #[test]
    fn a_run_that_cannot_start_is_one_failed_case_named_after_the_adapter() {
        let report = Unusable::Config("bad url".into()).report("redis");
        assert_eq!(
            report.summary(),
            "conformance redis: 0 passed, 1 failed, 0 ignored"
        );
        assert!(
            report.cases()[0]
                .to_string()
                .starts_with("FAIL redis (0.00s): configuration error: bad url")
        );
    }
}
