//! `evbus consume`: handle events of one type in a group, printing each as a CloudEvent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use evbus::StartPosition;
use evbus::bus::{Bus, HandlerError, Message};
use tokio::sync::{mpsc, oneshot};

use crate::failure::{self, Failure};
use crate::out::outln;
use crate::transport;

/// `evbus consume` arguments.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    #[arg(
        long,
        value_name = "URL",
        env = transport::TRANSPORT_ENV,
        hide_env_values = true,
        help = transport::transport_help()
    )]
    transport: String,
    /// Catalogue directory: DIR/events/<type>.json and DIR/definitions/<Name>.json.
    #[arg(long, value_name = "DIR")]
    schemas: PathBuf,
    /// The event type, for example afterOrderCreate.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: String,
    /// The handler group: consumers of one group share the events, each group gets every
    /// event. A new group starts from the earliest retained event where the broker keeps
    /// history; an existing group resumes where it stopped.
    #[arg(long, value_name = "GROUP")]
    group: String,
    /// Stop (exit 0) after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this many seconds: exit 1 if --count events did not arrive by then (0
    /// without --count).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
}

/// Runs `evbus consume`: prints one CloudEvent (structured JSON, one line) per event on
/// stdout as it acknowledges it. Invalid events go to the group's dead-letter queue and are
/// not printed on stdout: each is reported on stderr as it happens, as
/// `evbus: dead-lettered <id>: <reason>` (the reason on one line). An event whose line cannot
/// be written (stdout closed by its reader: exit 141, see [`crate::out`]) is not acked.
pub(crate) fn run(args: ConsumeArgs) -> Result<ExitCode, Failure> {
    transport::check(&args.transport)?;
    let catalog = transport::catalog(&args.schemas)?;
    if !catalog.contains(&args.event_type) {
        return Err(Failure::new(format!(
            "unknown event type \"{}\" in {} (known types: {})",
            args.event_type,
            args.schemas.display(),
            catalog.type_names().join(", ")
        )));
    }
    let timeout = match args.timeout {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(Failure::new(format!("--timeout must be >= 0, got {s}"))),
        None => None,
    };
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    let rt = transport::runtime()?;
    rt.block_on(async {
        let transport = transport::connect(&args.transport).await?;
        let start = if transport.capabilities().replay {
            StartPosition::Earliest
        } else {
            StartPosition::Latest
        };
        let bus = Bus::new(transport, catalog, "/evbus-cli");
        // The handler hands each event to the printer and waits for its answer, so exactly
        // the printed events are acked.
        let (tx, mut rx) = mpsc::channel::<(evbus::Event, oneshot::Sender<bool>)>(1);
        let handle = bus
            .on(
                args.event_type.clone(),
                args.group.clone(),
                move |msg: Message| {
                    let tx = tx.clone();
                    async move {
                        let (done, printed) = oneshot::channel();
                        tx.send((msg.into_event(), done)).await?;
                        match printed.await {
                            Ok(true) => Ok(()),
                            _ => Err(HandlerError::from("consume stopped before printing")),
                        }
                    }
                },
            )
            .concurrency(1)
            .start_position(start)
            .on_dead_letter(|event, reason| {
                eprintln!(
                    "evbus: dead-lettered {}: {}",
                    crate::printable::printable(event.id()),
                    crate::printable::one_line(reason)
                );
            })
            .start()
            .await
            .map_err(|e| Failure::new(format!("cannot consume: {e}")))?;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut printed = 0u64;
        let finished = loop {
            if args.count.is_some_and(|n| printed >= n) {
                break true;
            }
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => break args.count.is_none(),
                },
                None => rx.recv().await,
            };
            let Some((event, done)) = next else {
                break false;
            };
            let line = one_line(&event)
                .map_err(|e| Failure::new(format!("cannot print event {}: {e}", event.id())))?;
            // Printed (written and flushed) before it is acked: at least once on stdout.
            if let Err(failure) = outln!("{line}") {
                // Stdout is closed (its reader left, `| head`: exit 141, quietly) or failing:
                // this event is not acked. Its handler is kept waiting (`done` is held, not
                // answered: a `false` or a drop would fail the handler, which counts a failed
                // attempt and retries it later, or dead-letters it on its last attempt), and
                // the shutdown, with no time to wait, interrupts it and nacks it with no
                // delay, so the group's next consume gets it first (on its last attempt the
                // Bus leaves it to its visibility timeout instead). Nothing else is
                // unsettled: with a concurrency of 1 the previous event's ack ended before
                // this event's handler began.
                handle.shutdown(Duration::ZERO).await;
                drop(done);
                drop(rx);
                let _ = bus.shutdown(Duration::from_secs(5)).await;
                return Err(failure.adding(format!(
                    "event {} was not acked and goes to the group's next consumer",
                    crate::printable::printable(event.id())
                )));
            }
            printed += 1;
            let _ = done.send(true);
        };
        // Let the last ack land, then stop; whatever else was taken is nacked.
        handle.shutdown(Duration::from_secs(5)).await;
        drop(rx);
        let _ = bus.shutdown(Duration::from_secs(5)).await;
        Ok(if finished {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(failure::INVALID)
        })
    })
}

/// The event in the structured JSON format on one line: as written (data byte for byte)
/// unless the data itself spans lines, then re-encoded compactly. JSON data with whitespace
/// around it (a producer's trailing newline), which the envelope keeps byte for byte as
/// `data_base64`, is printed as `data`, parsed, so that `jq .data` finds it.
fn one_line(event: &evbus::Event) -> evbus::Result<String> {
    let encoded = |value: &serde_json::Value| {
        serde_json::to_string(value).map_err(|e| evbus::Error::invalid_event(e.to_string()))
    };
    if let Some(parsed) = padded_json(event) {
        let mut value = event.to_json_value()?;
        if let Some(members) = value.as_object_mut() {
            members.remove("data_base64");
            members.insert("data".to_owned(), parsed);
        }
        return encoded(&value);
    }
    let text = event.to_json()?;
    if !text.contains('\n') {
        return Ok(text);
    }
    encoded(&event.to_json_value()?)
}

/// The data parsed, when it is JSON with whitespace around it.
fn padded_json(event: &evbus::Event) -> Option<serde_json::Value> {
    let data = event.data()?;
    if !event.is_json() || data.trim_ascii().len() == data.len() {
        return None;
    }
    serde_json::from_slice(data).ok()
}
