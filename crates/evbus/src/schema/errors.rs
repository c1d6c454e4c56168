//! Errors of building a catalogue (registration, extension, freezing, loading files).

use std::fmt;

use super::compat::Incompatibility;
use crate::error::{Error, ErrorKind};

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong while building a catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SchemaErrorKind {
    /// A file or directory could not be read.
    Io,
    /// A file is not well-formed JSON.
    Parse,
    /// An event type or definition name is not acceptable (see [`super::is_valid_name`]).
    InvalidName,
    /// A document is not a valid JSON Schema of a supported draft, uses an unknown `format`,
    /// or an `x-evbus-*` keyword has the wrong shape.
    InvalidSchema,
    /// The same version of an event type, or the same definition, was registered twice with
    /// different contents.
    Duplicate,
    /// A version number is not above the versions already registered for the type.
    VersionOrder,
    /// A `$ref` names a document or a location that the catalogue does not have.
    UnknownReference,
    /// `$ref`s form a loop that never reaches a schema (for example `A → B → A` with nothing in
    /// between), so no instance could ever be checked against it.
    Cycle,
    /// An extension targets a definition that was never registered.
    UnknownDefinition,
    /// Two extensions, or an extension and its base definition, disagree about a property.
    ConflictingExtension,
    /// A new version breaks the compatibility mode of its type; see
    /// [`SchemaError::incompatibilities`].
    Incompatible,
}

impl SchemaErrorKind {
    /// A short, stable, lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaErrorKind::Io => "io",
            SchemaErrorKind::Parse => "parse",
            SchemaErrorKind::InvalidName => "invalid_name",
            SchemaErrorKind::InvalidSchema => "invalid_schema",
            SchemaErrorKind::Duplicate => "duplicate",
            SchemaErrorKind::VersionOrder => "version_order",
            SchemaErrorKind::UnknownReference => "unknown_reference",
            SchemaErrorKind::Cycle => "cycle",
            SchemaErrorKind::UnknownDefinition => "unknown_definition",
            SchemaErrorKind::ConflictingExtension => "conflicting_extension",
            SchemaErrorKind::Incompatible => "incompatible",
        }
    }
}

impl fmt::Display for SchemaErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error building a catalogue: registering, extending, loading or freezing.
///
/// It converts into [`crate::Error`] (kind [`ErrorKind::InvalidConfig`]) with `?`.
pub struct SchemaError {
    kind: SchemaErrorKind,
    message: String,
    incompatibilities: Vec<Incompatibility>,
    source: Option<Source>,
}

impl SchemaError {
    /// A new error of `kind` with a message saying what is wrong and where.
    pub fn new(kind: SchemaErrorKind, message: impl Into<String>) -> Self {
        SchemaError {
            kind,
            message: message.into(),
            incompatibilities: Vec::new(),
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn incompatible(message: String, list: Vec<Incompatibility>) -> Self {
        let mut e = SchemaError::new(SchemaErrorKind::Incompatible, message);
        e.incompatibilities = list;
        e
    }

    /// Prefixes the message with context (`in file …: `).
    pub(crate) fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> SchemaErrorKind {
        self.kind
    }

    /// The message, naming the type, definition, file and location concerned.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For [`SchemaErrorKind::Incompatible`]: every change that broke a compatibility rule.
    pub fn incompatibilities(&self) -> &[Incompatibility] {
        &self.incompatibilities
    }
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for i in &self.incompatibilities {
            write!(f, "\n  {i}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SchemaError");
        d.field("kind", &self.kind).field("message", &self.message);
        if !self.incompatibilities.is_empty() {
            d.field("incompatibilities", &self.incompatibilities);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for SchemaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<SchemaError> for Error {
    fn from(e: SchemaError) -> Self {
        Error::new(ErrorKind::InvalidConfig, format!("schema catalogue: {e}")).with_source(e)
    }
}
