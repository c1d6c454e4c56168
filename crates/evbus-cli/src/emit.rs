//! `evbus emit`: validate payloads against the catalogue and publish them through the Bus.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use evbus::bus::{Bus, Emit};

use crate::failure::{self, Failure};
use crate::{payloads, transport};

/// `evbus emit` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("payload").required(true).args(["data", "data_file"]))]
pub(crate) struct EmitArgs {
    #[arg(long, value_name = "URL", help = transport::transport_help())]
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

/// Runs `evbus emit`: prints one event id per line on stdout. Exit status 0 all emitted;
/// 1 a payload is invalid or not JSON (each violation on stderr, with its line number for
/// `--data-file`; nothing emitted); 2 usage, IO, schema or transport error.
pub(crate) fn run(args: EmitArgs) -> Result<ExitCode, Failure> {
    transport::check(&args.transport)?;
    let catalog = transport::catalog(&args.schemas)?;
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
        for p in &problems {
            eprintln!("{p}");
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
        let ids = bus
            .emit_batch(emits)
            .await
            .map_err(|e| Failure::new(format!("emit failed: {e}")))?;
        for id in ids {
            println!("{id}");
        }
        bus.shutdown(Duration::from_secs(10))
            .await
            .map_err(|e| Failure::new(format!("closing the transport: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}
