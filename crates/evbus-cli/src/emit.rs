//! `evbus emit`: validate payloads against the catalogue and publish them through the Bus.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use evbus::Catalog;
use evbus::bus::{Bus, Emit};
use serde_json::Value;

use crate::failure::{self, Failure};
use crate::transport;

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
    /// JSON Lines: one payload per line (blank lines skipped). Every line is validated first;
    /// if any is invalid, nothing from the file is emitted.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
}

/// Runs `evbus emit`: prints one event id per line on stdout. Exit status 0 all emitted;
/// 1 a payload is invalid or not JSON (each violation on stderr, with its line number for
/// `--data-file`; nothing emitted); 2 usage, IO, schema or transport error.
pub(crate) fn run(args: EmitArgs) -> Result<ExitCode, Failure> {
    transport::check(&args.transport)?;
    let catalog = transport::catalog(&args.schemas)?;
    let payloads = match (&args.data, &args.data_file) {
        (Some(json), _) => vec![(None, json.clone())],
        (None, Some(file)) => read_lines(file)?,
        (None, None) => return Err(Failure::new("give --data or --data-file")),
    };
    let (problems, refused) = check(&catalog, &args.event_type, &payloads);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!(
            "evbus: {} of {} payloads refused; nothing was emitted",
            refused,
            payloads.len()
        );
        return Ok(ExitCode::from(failure::INVALID));
    }
    let emits: Vec<Emit> = payloads
        .iter()
        .map(|(_, text)| {
            let data: Value = serde_json::from_str(text).unwrap_or(Value::Null);
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

fn read_lines(file: &Path) -> Result<Vec<(Option<usize>, String)>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (Some(i + 1), l.to_owned()))
        .collect())
}

/// Every problem of every payload, as `line N: <pointer>: <message>` (or without the line
/// prefix for `--data`), and how many payloads have one.
fn check(
    catalog: &Catalog,
    ty: &str,
    payloads: &[(Option<usize>, String)],
) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut refused = 0;
    for (line, text) in payloads {
        let before = problems.len();
        let at = line.map(|n| format!("line {n}: ")).unwrap_or_default();
        let data: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{at}not JSON: {e}"));
                refused += 1;
                continue;
            }
        };
        if let Err(errors) = catalog.validate(ty, &data) {
            if errors.problem() == &evbus::schema::ValidationProblem::Invalid {
                for v in &errors {
                    problems.push(format!("{at}{v}"));
                }
            } else {
                problems.push(format!("{at}{errors}"));
            }
        }
        if problems.len() > before {
            refused += 1;
        }
    }
    (problems, refused)
}
