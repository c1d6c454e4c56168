//! `evbus events`: list the catalogue, check a payload against it, compare two catalogues.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Subcommand, ValueEnum};
use evbus::schema::{AsyncApiOptions, Catalog, Severity, ValidationProblem};

use crate::failure::{self, Failure};
use crate::out;

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
    /// Compare two catalogues: every change, compatible or breaking under its type's
    /// compatibility mode, one line per finding on stdout:
    /// `<compatible|breaking> <type> <from-version> -> <to-version> <json-pointer> <rule>
    /// [(BACKWARD|FORWARD)]: <message>`.
    ///
    /// Exit status: 0 no breaking change; 1 at least one breaking change; 2 usage error or
    /// a catalogue that cannot be read.
    Diff {
        /// The catalogue as deployed (the base of the change).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "from_git",
            conflicts_with = "from_git"
        )]
        from: Option<PathBuf>,
        /// Take the base catalogue from git: the --to directory as it is at REF (a branch,
        /// tag or commit, for example origin/main), extracted with the `git` command.
        #[arg(long, value_name = "REF")]
        from_git: Option<String>,
        /// The catalogue as proposed.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Output format: text lines, or JSON Lines (one object per finding).
        #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
        format: DiffFormat,
    },
}

/// `events diff` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DiffFormat {
    /// One line per finding.
    Text,
    /// One JSON object per finding: type, severity, kind, from_version, to_version, path,
    /// rule, direction, message.
    Json,
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
        EventsCommand::Diff {
            from,
            from_git,
            to,
            format,
        } => diff(from.as_deref(), from_git.as_deref(), &to, format),
    }
}

/// Loads a catalogue without checking its versions against each other: the diff reports
/// what breaks instead of refusing to load it.
fn load_unchecked(dir: &Path) -> Result<Catalog, Failure> {
    let mut builder = Catalog::builder();
    builder.check_compatibility(false);
    builder.load_dir(dir)?;
    Ok(builder.freeze()?)
}

fn diff(
    from: Option<&Path>,
    from_git: Option<&str>,
    to: &Path,
    format: DiffFormat,
) -> Result<ExitCode, Failure> {
    let new = load_unchecked(to).map_err(|e| Failure::new(format!("--to: {e}")))?;
    let old = match (from, from_git) {
        (Some(dir), _) => load_unchecked(dir).map_err(|e| Failure::new(format!("--from: {e}")))?,
        (None, Some(reference)) => {
            let extracted = git_catalogue(reference, to)?;
            match &extracted {
                Some(dir) => load_unchecked(dir.path())
                    .map_err(|e| Failure::new(format!("--from-git {reference}: {e}")))?,
                None => Catalog::default(),
            }
        }
        (None, None) => return Err(Failure::new("give --from DIR or --from-git REF")),
    };
    let changes = old.diff(&new);
    let mut out = String::new();
    for c in &changes {
        match format {
            DiffFormat::Text => out.push_str(&c.to_string()),
            DiffFormat::Json => out.push_str(
                &serde_json::to_string(c)
                    .map_err(|e| Failure::new(format!("cannot write JSON: {e}")))?,
            ),
        }
        out.push('\n');
    }
    out::text(&out)?;
    let breaking = changes
        .iter()
        .filter(|c| c.severity == Severity::Breaking)
        .count();
    eprintln!(
        "evbus: {breaking} breaking, {} compatible change{}",
        changes.len() - breaking,
        if changes.len() - breaking == 1 {
            ""
        } else {
            "s"
        }
    );
    Ok(if breaking > 0 {
        ExitCode::from(failure::INVALID)
    } else {
        ExitCode::SUCCESS
    })
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, Failure> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!("evbus-diff-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| {
            Failure::new(format!(
                "cannot create a temporary directory {}: {e}",
                path.display()
            ))
        })?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `git ARGS` in `dir`; its stdout, or a failure quoting what git said.
fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, Failure> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| Failure::new(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Extracts the catalogue directory `to` as it is at `reference` into a temporary directory,
/// with `git ls-tree` and `git cat-file` (nothing in the work tree or the index changes).
/// `None` when the directory does not exist at that reference (a new catalogue).
fn git_catalogue(reference: &str, to: &Path) -> Result<Option<TempDir>, Failure> {
    let abs = to
        .canonicalize()
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", to.display())))?;
    let top = git(&abs, &["rev-parse", "--show-toplevel"]).map_err(|e| {
        Failure::new(format!(
            "--from-git needs --to inside a git work tree ({}): {e}",
            to.display()
        ))
    })?;
    let top = PathBuf::from(String::from_utf8_lossy(&top).trim().to_owned());
    let top = top.canonicalize().unwrap_or(top);
    let rel = abs.strip_prefix(&top).map_err(|_| {
        Failure::new(format!(
            "{} is not inside the git work tree {}",
            abs.display(),
            top.display()
        ))
    })?;
    let rel = rel
        .to_str()
        .ok_or_else(|| Failure::new(format!("{} is not a UTF-8 path", rel.display())))?
        .replace('\\', "/");
    git(
        &top,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{reference}^{{commit}}"),
        ],
    )
    .map_err(|_| Failure::new(format!("--from-git: unknown git reference \"{reference}\"")))?;
    let spec = if rel.is_empty() {
        ".".to_owned()
    } else {
        rel.clone()
    };
    let listing = git(
        &top,
        &["ls-tree", "-r", "-z", "--name-only", reference, "--", &spec],
    )?;
    let files: Vec<String> = listing
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if files.is_empty() {
        eprintln!(
            "evbus: {reference} has no {}; comparing with an empty catalogue",
            if rel.is_empty() { "files" } else { &rel }
        );
        return Ok(None);
    }
    let tmp = TempDir::new()?;
    for file in files {
        let inside = if rel.is_empty() {
            file.as_str()
        } else {
            file.strip_prefix(&format!("{rel}/")).unwrap_or(&file)
        };
        let target = tmp.path().join(inside);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Failure::new(format!("cannot create {}: {e}", parent.display())))?;
        }
        let blob = git(&top, &["cat-file", "blob", &format!("{reference}:{file}")])?;
        std::fs::write(&target, blob)
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", target.display())))?;
    }
    Ok(Some(tmp))
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
    out::text(&text)?;
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
    // A UTF-8 byte order mark (some editors write one) is not part of the JSON, as for `emit`.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let data: serde_json::Value = serde_json::from_str(text).map_err(|e| {
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
            let violations: Vec<_> = errors.iter().collect();
            let (out, more) = failure::bounded(&violations);
            out::text(&out)?;
            if let Some(more) = more {
                eprintln!("{more}");
            }
            Ok(ExitCode::from(failure::INVALID))
        }
        Err(errors) => Err(Failure::new(errors)),
    }
}
