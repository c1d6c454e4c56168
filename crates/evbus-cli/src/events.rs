//! `evbus events`: list the catalogue, check a payload against it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use evbus::schema::{AsyncApiOptions, Catalog, ValidationProblem};

use crate::failure::{self, Failure};

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// List every event type of a catalogue directory.
    List {
        /// Catalogue directory: DIR/events/<type>.json and DIR/definitions/<Name>.json.
        #[arg(long, value_name = "DIR")]
        schemas: PathBuf,
        /// Output format: a table for people, a JSON array for scripts, or an AsyncAPI 3.0
        /// document (YAML).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check that FILE holds a valid payload of event type TYPE.
    ///
    /// Exit status: 0 valid; 1 invalid (each violation printed on stdout as
    /// `<json-pointer>: <message>`); 2 usage, IO or schema error.
    Check {
        /// Catalogue directory: DIR/events/<type>.json and DIR/definitions/<Name>.json.
        #[arg(long, value_name = "DIR")]
        schemas: PathBuf,
        /// The event type, for example afterOrderCreate.
        #[arg(long = "type", value_name = "TYPE")]
        event_type: String,
        /// JSON file holding the event data (the payload, not a CloudEvent envelope); `-`
        /// reads stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// `events list` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns: type, version, external, description.
    Table,
    /// A JSON array with one object per type: type, version, versions, external,
    /// description, dataschema, compatibility, redact, allow, schema.
    Json,
    /// An AsyncAPI 3.0 document in YAML.
    Asyncapi,
}

pub(crate) fn run(cmd: EventsCommand) -> Result<ExitCode, Failure> {
    match cmd {
        EventsCommand::List { schemas, format } => list(&schemas, format),
        EventsCommand::Check {
            schemas,
            event_type,
            file,
        } => check(&schemas, &event_type, &file),
    }
}

fn load(dir: &PathBuf) -> Result<Catalog, Failure> {
    Ok(Catalog::from_dir(dir)?)
}

fn list(dir: &PathBuf, format: Format) -> Result<ExitCode, Failure> {
    let catalog = load(dir)?;
    let text = match format {
        Format::Table => table(&catalog),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&catalog.summaries())
                .map_err(|e| Failure::new(format!("cannot write JSON: {e}")))?;
            s.push('\n');
            s
        }
        Format::Asyncapi => catalog
            .to_asyncapi_yaml(&AsyncApiOptions::default())
            .map_err(Failure::new)?,
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn table(catalog: &Catalog) -> String {
    let header = ["TYPE", "VERSION", "EXTERNAL", "DESCRIPTION"];
    let rows: Vec<[String; 4]> = catalog
        .event_types()
        .map(|t| {
            let l = t.latest();
            [
                t.name().to_owned(),
                l.version().to_string(),
                if l.external() { "yes" } else { "no" }.to_owned(),
                l.description().map(first_sentence).unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 3 {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
    }
    out
}

fn first_sentence(s: &str) -> String {
    match s.find(". ") {
        Some(i) => s[..=i].to_owned(),
        None => s.to_owned(),
    }
}

fn check(dir: &PathBuf, ty: &str, file: &PathBuf) -> Result<ExitCode, Failure> {
    let catalog = load(dir)?;
    if !catalog.contains(ty) {
        let known = catalog.type_names().join(", ");
        return Err(Failure::new(format!(
            "unknown event type \"{ty}\" in {} (known types: {known})",
            dir.display()
        )));
    }
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?
    };
    let data: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Failure::new(format!(
            "{} is not valid JSON (line {}, column {}): {e}",
            file.display(),
            e.line(),
            e.column()
        ))
    })?;
    match catalog.validate(ty, &data) {
        Ok(ok) => {
            eprintln!(
                "valid {ty} payload (schema version {}, {})",
                ok.version().unwrap_or_default(),
                ok.dataschema().unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) if *errors.problem() == ValidationProblem::Invalid => {
            let mut out = String::new();
            for v in &errors {
                out.push_str(&format!("{v}\n"));
            }
            write_stdout(&out)?;
            Ok(ExitCode::from(failure::INVALID))
        }
        Err(errors) => Err(Failure::new(errors)),
    }
}

fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        // A closed pipe (`evbus events list | head`) is not an error worth reporting.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::new(format!("cannot write to stdout: {e}"))),
    }
}
