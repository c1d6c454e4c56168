//! `evbus emit`: validate payloads against the catalogue and publish them through the Bus.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use evbus::bus::{Bus, Emit};

use crate::failure::{self, Failure};
use crate::{out, payloads, transport};

/// How many events one publish carries: each chunk's ids are printed once it is published, so
/// a failure partway leaves on stdout exactly the ids known to be published.
const CHUNK: usize = 100;

/// `evbus emit` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("payload").required(true).args(["data", "data_file"]))]
pub(crate) struct EmitArgs {
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
    /// Partition key of every event emitted (events sharing a key keep their order).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// The payload: one JSON document.
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    /// JSON Lines: one payload per line (blank lines skipped, a UTF-8 byte order mark at the
    /// start ignored). Every line is validated first; if any is invalid (or not UTF-8 JSON),
    /// nothing from the file is emitted.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
}

/// Runs `evbus emit`: prints one event id per line on stdout, in chunks of [`CHUNK`] as each
/// is published. Exit status 0 all emitted (a failure to close the transport afterwards is
/// only a warning); 1 a payload is invalid or not JSON (each violation on stderr, with its
/// line number for `--data-file`; nothing emitted); 2 usage (an unknown `--type`), IO,
/// schema or transport error (after a publish failed partway, stdout lists the ids
/// published and stderr says how many of how many).
pub(crate) fn run(args: EmitArgs) -> Result<ExitCode, Failure> {
    transport::check(&args.transport)?;
    let catalog = transport::catalog(&args.schemas)?;
    // A usage error (exit 2), not a refused payload: checked before any payload is read.
    if !catalog.contains(&args.event_type) {
        return Err(Failure::new(format!(
            "unknown event type \"{}\" in {} (known types: {})",
            args.event_type,
            args.schemas.display(),
            catalog.type_names().join(", ")
        )));
    }
    let given = match (&args.data, &args.data_file) {
        (Some(json), _) => vec![payloads::from_arg(json)],
        (None, Some(file)) => payloads::from_file(
            &std::fs::read(file)
                .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?,
        ),
        (None, None) => return Err(Failure::new("give --data or --data-file")),
    };
    let (problems, refused) = payloads::check(&catalog, &args.event_type, &given);
    if !problems.is_empty() {
        let (text, more) = failure::bounded(&problems);
        eprint!("{text}");
        if let Some(more) = more {
            eprintln!("{more}");
        }
        eprintln!(
            "evbus: {} of {} payloads refused; nothing was emitted",
            refused,
            given.len()
        );
        return Ok(ExitCode::from(failure::INVALID));
    }
    let emits: Vec<Emit> = given
        .into_iter()
        // Every payload is JSON here: `check` refused any other.
        .filter_map(|p| p.data.ok())
        .map(|data| {
            let emit = Emit::new(args.event_type.clone(), data);
            match &args.key {
                Some(key) => emit.key(key.clone()),
                None => emit,
            }
        })
        .collect();
    let rt = transport::runtime()?;
    rt.block_on(async {
        let bus = Bus::new(
            transport::connect(&args.transport).await?,
            catalog,
            "/evbus-cli",
        );
        let total = emits.len();
        let mut published = 0;
        let mut emits = emits.into_iter().peekable();
        while emits.peek().is_some() {
            let chunk: Vec<Emit> = emits.by_ref().take(CHUNK).collect();
            let size = chunk.len();
            let ids = bus.emit_batch(chunk).await.map_err(|e| {
                let listed = if published > 0 {
                    " (their ids are on stdout)"
                } else {
                    ""
                };
                // Refusals made before anything is sent (too large, invalid) publish nothing.
                let refused_before = matches!(
                    e.kind(),
                    evbus::ErrorKind::TooLarge
                        | evbus::ErrorKind::Validation
                        | evbus::ErrorKind::InvalidEvent
                );
                let maybe = if size == 1 && refused_before {
                    "the one being published was refused before it was sent".to_owned()
                } else if size == 1 {
                    "the one being published may have been published anyway".to_owned()
                } else {
                    format!("some of the {size} being published may have been published anyway")
                };
                Failure::new(format!(
                    "emit failed: {published} of {total} events published{listed}; {maybe}: {e}"
                ))
            })?;
            // Printed as soon as their publish is known to have succeeded.
            published += ids.len();
            let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
            if let Err(failure) = out::text(&text) {
                // Nothing more is published once stdout is gone (its reader left, `| head`:
                // exit 141, quietly): what was published is published, the rest is not.
                let _ = bus.shutdown(Duration::from_secs(10)).await;
                return Err(failure.adding(format!(
                    "{published} of {total} events published (the ids of the last {} may be \
                     missing from stdout)",
                    ids.len()
                )));
            }
        }
        // Every event is published: a failure to close the transport changes nothing of that.
        if let Err(e) = bus.shutdown(Duration::from_secs(10)).await {
            eprintln!("evbus: warning: all {total} events published, but closing the transport failed: {e}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
