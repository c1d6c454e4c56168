//! `evbus dlq`: list, show, redrive and discard the dead letters of one handler group.
//!
//! Everything goes through [`evbus::bus::DeadLetters`], so the queue names are the Bus's
//! (`Bus::dead_letter_queue_name`, `Bus::redrive_queue_name`): a redriven event goes to the
//! group's redrive queue, which only the handlers of that group consume.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use evbus::Catalog;
use evbus::bus::{Bus, DeadLetter, DeadLetters};
use serde_json::json;

use crate::failure::{self, Failure};
use crate::out::outln;
use crate::printable::{one_line, printable};
use crate::transport;

/// Most dead letters one command looks at.
const DEFAULT_LIMIT: usize = 10_000;

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List the dead letters of a group, one per line: id, attempts, origin, first seen (the
    /// event's time), dead-lettered (when the transport recorded it, else `-`), reason.
    ///
    /// Nothing is removed: each dead letter is received and held, and all are given back
    /// together at the end (a nack with no delay), so they stay where they were; the broker's
    /// own delivery counter of a dead-letter entry grows by one per listing (the attempts
    /// shown are the handler's, stored with the dead letter, and do not change). What a look
    /// holds is not handed to another look for up to 90 s should it die before giving back.
    ///
    /// Exit status: 0 listed (even none); 2 usage or transport error.
    List {
        #[command(flatten)]
        target: Target,
        /// Output format: aligned text, or JSON Lines (one object per dead letter).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one dead letter in full: its metadata, then the original event as JSON.
    ///
    /// Exit status: 0 shown; 1 no dead letter has that id; 2 usage or transport error.
    Show {
        #[command(flatten)]
        target: Target,
        /// The event id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Move dead letters back to the group (its redrive queue, consumed by that group only),
    /// without their dead-letter attributes; prints the id of each one as it is moved. Each
    /// event is moved once per run: one a handler rejects again meanwhile, or a second record
    /// of the same event, stays in the dead-letter queue. Records that cannot be redriven stay
    /// too, named on stderr with why: a message that is not a CloudEvent (`evbus.undecodable`)
    /// and a record whose data was dropped to fit the queue.
    ///
    /// Exit status: 0 moved (all, or every --id given); 1 some --id was not found or cannot be
    /// redriven (the others were moved); 2 usage or transport error (the ids moved before it
    /// are printed).
    Redrive {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        pick: Pick,
    },
    /// Remove dead letters for good (a poison event no handler will ever take, a message that
    /// is not a CloudEvent); prints the id of each one as it is removed. Every record of an
    /// event asked for is removed (an event dead-lettered twice is there twice). The others
    /// stay where they are.
    ///
    /// Exit status: 0 removed (all, or every --id given); 1 some --id was not found (the
    /// others were removed); 2 usage or transport error, or --all without --yes (the ids
    /// removed before an error are printed).
    Discard {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        pick: Pick,
        /// Confirm --all: the dead letters are gone for good.
        #[arg(long, requires = "all")]
        yes: bool,
    },
}

/// Which dead letters a `redrive` or a `discard` takes.
#[derive(Debug, Args)]
pub(crate) struct Pick {
    /// This dead letter (repeat for several).
    #[arg(
        long = "id",
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    ids: Vec<String>,
    /// Every dead letter of the group (up to --limit; `discard` needs --yes too).
    #[arg(long)]
    all: bool,
}

/// The group whose dead letters are looked at.
#[derive(Debug, Args)]
pub(crate) struct Target {
    #[arg(
        long,
        value_name = "URL",
        env = transport::TRANSPORT_ENV,
        hide_env_values = true,
        help = transport::transport_help()
    )]
    transport: String,
    /// The event type, for example afterOrderCreate.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: String,
    /// The handler group.
    #[arg(long, value_name = "GROUP")]
    group: String,
    /// Stop once nothing new arrived for this many seconds (how long an empty queue is
    /// waited on).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    wait: f64,
    /// Look at no more than this many dead letters (at least 1).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT, value_parser = at_least_one)]
    limit: usize,
}

/// A `--limit`: a whole number of at least 1 (0 would look at nothing and say so as if the
/// queue were empty).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `dlq list` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// One line per dead letter.
    Text,
    /// One JSON object per dead letter: id, type, attempts, origin, first_seen,
    /// dead_lettered, reason, data_dropped (the bytes of data dropped to fit the queue, or
    /// null).
    Json,
}

pub(crate) fn run(cmd: DlqCommand) -> Result<ExitCode, Failure> {
    let target = match &cmd {
        DlqCommand::List { target, .. }
        | DlqCommand::Show { target, .. }
        | DlqCommand::Redrive { target, .. }
        | DlqCommand::Discard { target, .. } => target,
    };
    if let DlqCommand::Discard {
        pick: Pick { all: true, .. },
        yes: false,
        ..
    } = &cmd
    {
        return Err(Failure::new(
            "dlq discard --all removes every dead letter of the group for good; add --yes to \
             confirm",
        ));
    }
    transport::check(&target.transport)?;
    let wait = match target.wait {
        s if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        s => return Err(Failure::new(format!("--wait must be > 0, got {s}"))),
    };
    let rt = transport::runtime()?;
    rt.block_on(async {
        let bus = Bus::new(
            transport::connect(&target.transport).await?,
            Catalog::default(),
            "/evbus-cli",
        );
        let dlq = bus
            .dead_letters(&target.event_type, &target.group)
            .await
            .map_err(|e| Failure::new(format!("cannot open the dead-letter queue: {e}")))?;
        let result = match &cmd {
            DlqCommand::List { format, .. } => list(&dlq, target.limit, wait, *format).await,
            DlqCommand::Show { id, .. } => show(&dlq, target.limit, wait, id).await,
            DlqCommand::Redrive { pick, .. } => {
                redrive(&dlq, target.limit, wait, &pick.ids, pick.all).await
            }
            DlqCommand::Discard { pick, .. } => {
                discard(&dlq, target.limit, wait, &pick.ids, pick.all).await
            }
        };
        let _ = bus.shutdown(Duration::from_secs(5)).await;
        result
    })
}

/// The reason of a dead letter on one line, and that its data was dropped if it was.
fn reason(d: &DeadLetter) -> String {
    let reason = one_line(d.reason().unwrap_or("-"));
    match d.data_dropped() {
        Some(n) => format!("{reason} (its {n} bytes of data were dropped to fit the queue)"),
        None => reason,
    }
}

fn first_seen(d: &DeadLetter) -> String {
    d.event()
        .time()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".to_owned())
}

fn last_seen(d: &DeadLetter) -> String {
    d.dead_lettered_at().unwrap_or("-").to_owned()
}

async fn peek(dlq: &DeadLetters, limit: usize, wait: Duration) -> Result<Vec<DeadLetter>, Failure> {
    dlq.peek(limit, wait)
        .await
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", dlq.name())))
}

async fn list(
    dlq: &DeadLetters,
    limit: usize,
    wait: Duration,
    format: Format,
) -> Result<ExitCode, Failure> {
    let dead = peek(dlq, limit, wait).await?;
    match format {
        Format::Json => {
            for d in &dead {
                outln!(
                    "{}",
                    json!({
                        "id": d.event().id(),
                        "type": d.event().ty(),
                        "attempts": d.attempts(),
                        "origin": d.origin(),
                        "first_seen": d.event().time(),
                        "dead_lettered": d.dead_lettered_at(),
                        "reason": d.reason(),
                        "data_dropped": d.data_dropped(),
                    })
                )?;
            }
        }
        Format::Text => {
            let rows: Vec<[String; 6]> = dead
                .iter()
                .map(|d| {
                    [
                        printable(d.event().id()).into_owned(),
                        d.attempts()
                            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
                        printable(d.origin().unwrap_or("-")).into_owned(),
                        first_seen(d),
                        printable(&last_seen(d)).into_owned(),
                        reason(d),
                    ]
                })
                .collect();
            let header = [
                "ID",
                "ATTEMPTS",
                "ORIGIN",
                "FIRST SEEN",
                "DEAD-LETTERED",
                "REASON",
            ];
            let mut widths = header.map(str::len);
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: [&str; 6]| {
                let mut l = String::new();
                for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                    if i == 5 {
                        l.push_str(cell);
                    } else {
                        l.push_str(&format!("{cell:<w$}  "));
                    }
                }
                l.trim_end().to_owned()
            };
            outln!("{}", line(header))?;
            for r in &rows {
                outln!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]))?;
            }
        }
    }
    eprintln!(
        "evbus: {} dead letter{} in {}",
        dead.len(),
        if dead.len() == 1 { "" } else { "s" },
        dlq.name()
    );
    Ok(ExitCode::SUCCESS)
}

async fn show(
    dlq: &DeadLetters,
    limit: usize,
    wait: Duration,
    id: &str,
) -> Result<ExitCode, Failure> {
    let dead = peek(dlq, limit, wait).await?;
    let same: Vec<&DeadLetter> = dead.iter().filter(|d| d.event().id() == id).collect();
    if same.len() > 1 {
        eprintln!(
            "evbus: {} dead letters of event {id} in {}; the first is shown",
            same.len(),
            dlq.name()
        );
    }
    let Some(d) = same.first() else {
        eprintln!(
            "evbus: no dead letter {id} in {} ({} looked at)",
            dlq.name(),
            dead.len()
        );
        return Ok(ExitCode::from(failure::INVALID));
    };
    outln!("id:            {}", printable(d.event().id()))?;
    outln!("type:          {}", printable(d.event().ty()))?;
    outln!(
        "attempts:      {}",
        d.attempts()
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    )?;
    outln!("origin:        {}", printable(d.origin().unwrap_or("-")))?;
    outln!("first seen:    {}", first_seen(d))?;
    outln!("dead-lettered: {}", printable(&last_seen(d)))?;
    outln!("reason:        {}", reason(d))?;
    let event = d
        .original()
        .to_json_value()
        .map_err(|e| Failure::new(format!("cannot print event {id}: {e}")))?;
    outln!(
        "{}",
        serde_json::to_string_pretty(&event)
            .map_err(|e| Failure::new(format!("cannot print event {id}: {e}")))?
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn redrive(
    dlq: &DeadLetters,
    limit: usize,
    wait: Duration,
    ids: &[String],
    all: bool,
) -> Result<ExitCode, Failure> {
    let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut moved: Vec<String> = Vec::new();
    // Wanted records the redrive leaves where they are, and why.
    let refused: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let unprinted = Unprinted::default();
    let result = dlq
        .redrive_each(
            limit,
            wait,
            |d| {
                if unprinted.stopped() {
                    return false;
                }
                let want = all || wanted.contains(d.event().id());
                if want && let Some(why) = d.not_redrivable() {
                    let mut refused = refused.lock().unwrap_or_else(|e| e.into_inner());
                    refused.push((d.event().id().to_owned(), why));
                }
                want
            },
            |d| {
                // Printed as each one is moved, so an error later leaves them listed.
                unprinted.print(d);
                moved.push(d.event().id().to_owned());
            },
        )
        .await;
    let count = moved.len();
    let plural = if count == 1 { "" } else { "s" };
    let done = "moved to the group's redrive queue";
    unprinted.check(result, "redrive from", dlq, count, done)?;
    eprintln!("evbus: {count} dead letter{plural} redriven to the group's redrive queue");
    let refused = refused.into_inner().unwrap_or_else(|e| e.into_inner());
    for (id, why) in &refused {
        eprintln!(
            "evbus: not redriven, left in {}: {}: {why}",
            dlq.name(),
            printable(id)
        );
    }
    if !all {
        let found: BTreeSet<&str> = moved
            .iter()
            .map(String::as_str)
            .chain(refused.iter().map(|(id, _)| id.as_str()))
            .collect();
        let missing: Vec<&str> = wanted.difference(&found).copied().collect();
        if !missing.is_empty() {
            eprintln!("evbus: not found in {}: {}", dlq.name(), missing.join(", "));
        }
        let left = refused.iter().any(|(id, _)| !moved.iter().any(|m| m == id));
        if !missing.is_empty() || left {
            return Ok(ExitCode::from(failure::INVALID));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn discard(
    dlq: &DeadLetters,
    limit: usize,
    wait: Duration,
    ids: &[String],
    all: bool,
) -> Result<ExitCode, Failure> {
    let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut removed: Vec<String> = Vec::new();
    let unprinted = Unprinted::default();
    let result = dlq
        .discard_each(
            limit,
            wait,
            |d| !unprinted.stopped() && (all || wanted.contains(d.event().id())),
            |d| {
                // Printed as each one is removed, so an error later leaves them listed.
                unprinted.print(d);
                removed.push(d.event().id().to_owned());
            },
        )
        .await;
    let count = removed.len();
    let plural = if count == 1 { "" } else { "s" };
    unprinted.check(result, "discarding from", dlq, count, "removed")?;
    eprintln!(
        "evbus: {count} dead letter{plural} removed from {}",
        dlq.name()
    );
    if !all {
        let found: BTreeSet<&str> = removed.iter().map(String::as_str).collect();
        let missing: Vec<&str> = wanted.difference(&found).copied().collect();
        if !missing.is_empty() {
            eprintln!("evbus: not found in {}: {}", dlq.name(), missing.join(", "));
            return Ok(ExitCode::from(failure::INVALID));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ids a redrive or a discard prints as it moves or removes each dead letter, and the
/// first failure to print one: from then on the run takes nothing more (its `keep` refuses
/// the rest, which stay in the dead-letter queue, given back with what it holds), so that a
/// reader that goes away (`| head`) stops it as SIGPIPE stops other tools, with each dead
/// letter either moved (or removed) whole or left where it was.
/// (A `Mutex`, not a `RefCell`: the future of the run, which holds it, stays `Send`.)
#[derive(Default)]
struct Unprinted(Mutex<Option<Failure>>);

impl Unprinted {
    fn failure(&self) -> MutexGuard<'_, Option<Failure>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an id could not be printed: take nothing more.
    fn stopped(&self) -> bool {
        self.failure().is_some()
    }

    /// Prints the id of `d`, just moved or removed; keeps the first failure.
    fn print(&self, d: &DeadLetter) {
        let mut failure = self.failure();
        if failure.is_none()
            && let Err(e) = outln!("{}", printable(d.event().id()))
        {
            *failure = Some(e);
        }
    }

    /// The run's end: its transport error (after `count` dead letters were `done`), else the
    /// failure to print, which stopped it (a closed stdout: exit 141, quietly).
    fn check(
        self,
        result: evbus::Result<usize>,
        action: &str,
        dlq: &DeadLetters,
        count: usize,
        done: &str,
    ) -> Result<(), Failure> {
        let unprinted = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        let plural = if count == 1 { "" } else { "s" };
        if let Err(e) = result {
            let listed = if count > 0 && unprinted.is_none() {
                " (their ids are on stdout)"
            } else {
                ""
            };
            return Err(Failure::new(format!(
                "{action} {} failed after {count} dead letter{plural} {done}{listed}: {e}",
                dlq.name(),
            )));
        }
        match unprinted {
            None => Ok(()),
            Some(failure) => Err(failure.adding(format!(
                "{count} dead letter{plural} {done} (the last id is not on stdout); the rest \
                 were left in {}",
                dlq.name()
            ))),
        }
    }
}
