//! Runs cases one by one: checks needs, spawns each case with a time limit, turns a panic or a
//! timeout into a failure, and cleans up what the case created.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use evbus::{Capabilities, Health, Transport};

use crate::cases::Case;
use crate::report::{CaseReport, Outcome, Report};
use crate::support::{
    CONNECT_WITHIN, ConnectFn, Control, Ctx, Failure, Names, OPERATION_WITHIN, Resource, Shared,
    run_id,
};
use crate::{Need, Suite};

/// Connects, checks health and reads the capabilities; the error says why the broker cannot
/// be used.
pub(crate) async fn probe<T: Transport + 'static>(
    connect: &ConnectFn<T>,
) -> Result<Capabilities, String> {
    let transport = match tokio::time::timeout(CONNECT_WITHIN, connect()).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no connection within {CONNECT_WITHIN:?}")),
    };
    let health = match tokio::time::timeout(OPERATION_WITHIN, transport.health()).await {
        Ok(h) => h,
        Err(_) => Health::Unhealthy(format!("health did not answer within {OPERATION_WITHIN:?}")),
    };
    let caps = transport.capabilities();
    let _ = tokio::time::timeout(OPERATION_WITHIN, transport.close()).await;
    match health {
        Health::Healthy | Health::Degraded(_) => Ok(caps),
        Health::Unhealthy(reason) => {
            Err(format!("the transport reports it is unhealthy: {reason}"))
        }
        Health::Closed => Err("the transport reports it is closed right after connecting".into()),
    }
}

/// Runs the suite, printing each line as it is known.
pub(crate) async fn run<T: Transport + 'static>(suite: Suite<T>) -> Report {
    let mut report = Report::new(suite.adapter.clone());
    let caps = match probe(&*suite.connect).await {
        Ok(caps) => caps,
        Err(reason) => {
            let case = CaseReport::new(
                suite.adapter.clone(),
                Outcome::Failed(format!("broker unreachable: {reason}")),
                Duration::ZERO,
            );
            println!("{case}");
            report.push(case);
            println!("{}", report.summary());
            return report;
        }
    };
    let names = Names::new(&suite.adapter, &run_id());
    for case in crate::cases::all::<T>() {
        if let Some(filter) = &suite.filter {
            if !case.name.contains(filter.as_str()) {
                continue;
            }
        }
        let unmet: Vec<Need> = case
            .needs
            .iter()
            .copied()
            .filter(|need| !meets(*need, &caps, suite.control.is_some()))
            .collect();
        let result = if unmet.is_empty() {
            run_case(&case, &names, &suite.connect, suite.control.as_ref(), &caps).await
        } else {
            CaseReport::new(case.name, Outcome::Ignored(unmet), Duration::ZERO)
        };
        println!("{result}");
        report.push(result);
    }
    println!("{}", report.summary());
    report
}

/// Whether a need is met by the declared capabilities and the harness.
pub(crate) fn meets(need: Need, caps: &Capabilities, has_control: bool) -> bool {
    match need {
        Need::Capability(cap) => caps.has(cap),
        Need::BrokerControl => has_control,
        Need::PayloadLimit => caps.max_payload_bytes.is_some(),
    }
}

async fn run_case<T: Transport + 'static>(
    case: &Case<T>,
    names: &Names,
    connect: &Arc<ConnectFn<T>>,
    control: Option<&Control<T>>,
    caps: &Capabilities,
) -> CaseReport {
    let started = tokio::time::Instant::now();
    let shared = Arc::new(Shared::default());
    let ctx = Ctx::new(
        case.name,
        names,
        Arc::clone(connect),
        control.cloned(),
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
