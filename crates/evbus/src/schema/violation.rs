//! What a failed validation reports: every violation, with pointer, keyword and message.

use std::fmt;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde::Serialize;
use serde_json::Value;

use super::compat::Compatibility;
use super::pointer;
use crate::error::{Error, ErrorKind};

/// One way a payload breaks its schema.
///
/// Messages never quote values of the payload (they may be personal data that must not reach
/// logs); they quote only the schema: property names, limits, allowed values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pointer: String,
    keyword: String,
    message: String,
}

impl Violation {
    /// A violation at `pointer` of the schema keyword `keyword`.
    pub fn new(
        pointer: impl Into<String>,
        keyword: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Violation {
            pointer: pointer.into(),
            keyword: keyword.into(),
            message: message.into(),
        }
    }

    /// JSON pointer (RFC 6901) into the payload: where the offending value is, or for
    /// `required`, `additionalProperties` and `unevaluatedProperties`, the property concerned
    /// (`/order/returnToStock`). The empty string is the payload itself.
    pub fn pointer(&self) -> &str {
        &self.pointer
    }

    /// The JSON Schema keyword that failed (`required`, `type`, `minimum`…).
    pub fn keyword(&self) -> &str {
        &self.keyword
    }

    /// What is wrong, in words: `required property "returnToStock" is missing`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Violation {
    /// `<pointer>: <message>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pointer, self.message)
    }
}

/// Why a payload was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ValidationProblem {
    /// The event type is not in the catalogue, and the catalogue is strict.
    UnknownType {
        /// The types the catalogue knows, sorted.
        known: Vec<String>,
    },
    /// The event names a version of its type that the catalogue does not have.
    UnknownVersion {
        /// The version asked for.
        version: u32,
        /// The versions the catalogue has for the type.
        known: Vec<u32>,
    },
    /// The event data is not a JSON document.
    NotJson {
        /// What the JSON parser said.
        reason: String,
    },
    /// The data breaks its schema; see [`ValidationErrors::violations`].
    Invalid,
}

/// A refused payload: the event type, the version checked, and every violation at once.
///
/// `Display` prints one violation per line as `<json-pointer>: <message>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors {
    event_type: String,
    version: Option<u32>,
    problem: ValidationProblem,
    violations: Vec<Violation>,
}

impl ValidationErrors {
    pub(crate) fn invalid(event_type: &str, version: u32, violations: Vec<Violation>) -> Self {
        ValidationErrors {
            event_type: event_type.to_owned(),
            version: Some(version),
            problem: ValidationProblem::Invalid,
            violations,
        }
    }

    pub(crate) fn unknown_type(event_type: &str, known: Vec<String>) -> Self {
        let message = if known.is_empty() {
            format!("unknown event type \"{event_type}\": the catalogue has no event types")
        } else {
            format!(
                "unknown event type \"{event_type}\": the catalogue is strict and knows only {}",
                known.join(", ")
            )
        };
        ValidationErrors {
            event_type: event_type.to_owned(),
            version: None,
            problem: ValidationProblem::UnknownType { known },
            violations: vec![Violation::new("", "type", message)],
        }
    }

    pub(crate) fn unknown_version(event_type: &str, version: u32, known: Vec<u32>) -> Self {
        let list: Vec<String> = known.iter().map(u32::to_string).collect();
        let message = format!(
            "event type \"{event_type}\" has no version {version} (versions: {})",
            list.join(", ")
        );
        ValidationErrors {
            event_type: event_type.to_owned(),
            version: Some(version),
            problem: ValidationProblem::UnknownVersion { version, known },
            violations: vec![Violation::new("", "x-evbus-version", message)],
        }
    }

    /// An event of a version the catalogue lacks, whose data the latest version refuses:
    /// says which version is missing, why the latest cannot read it, and what to deploy.
    pub(crate) fn unreadable_version(
        event_type: &str,
        version: u32,
        known: Vec<u32>,
        mode: Compatibility,
        violations: Vec<Violation>,
    ) -> Self {
        let latest = known.iter().copied().max().unwrap_or_default();
        let list: Vec<String> = known.iter().map(u32::to_string).collect();
        let list = list.join(", ");
        let shown: Vec<String> = violations.iter().take(3).map(ToString::to_string).collect();
        let more = match violations.len().saturating_sub(3) {
            0 => String::new(),
            n => format!("; and {n} more"),
        };
        let why = format!(
            "its data is not valid under version {latest}, the latest this consumer knows ({}{more})",
            shown.join("; ")
        );
        let message = if version > latest {
            let order = if mode.checks_forward() {
                format!(
                    "under {mode} compatibility older versions should read newer data, so check \
                     the producer's catalogue against this one (`evbus events diff`)"
                )
            } else if mode == Compatibility::None {
                "its mode is NONE, so versions need not read each other's data: deploy \
                 consumers before producers"
                    .to_owned()
            } else {
                format!("under {mode} compatibility consumers must be deployed before producers")
            };
            format!(
                "event type \"{event_type}\" version {version} is newer than this consumer's \
                 catalogue (versions: {list}), and {why}; deploy this consumer with version \
                 {version} of \"{event_type}\" (events/{event_type}.json), then redrive this \
                 dead letter ({order})"
            )
        } else {
            format!(
                "event type \"{event_type}\" version {version} is not in this consumer's \
                 catalogue (versions: {list}), and {why}; keep the versions that may still be in \
                 flight in the catalogue (events/{event_type}/{version}.json), deploy, then \
                 redrive this dead letter"
            )
        };
        let mut all = vec![Violation::new("", "x-evbus-version", message)];
        all.extend(violations);
        ValidationErrors {
            event_type: event_type.to_owned(),
            version: Some(version),
            problem: ValidationProblem::UnknownVersion { version, known },
            violations: all,
        }
    }

    pub(crate) fn not_json(event_type: &str, version: Option<u32>, reason: String) -> Self {
        let message = format!("the event data is not JSON: {reason}");
        ValidationErrors {
            event_type: event_type.to_owned(),
            version,
            problem: ValidationProblem::NotJson { reason },
            violations: vec![Violation::new("", "type", message)],
        }
    }

    /// The event type the payload was validated as.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The schema version checked, if the type and version are known.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// Why the payload was refused.
    pub fn problem(&self) -> &ValidationProblem {
        &self.problem
    }

    /// Every violation, sorted by pointer (never empty). For an unknown type or version, or
    /// data that is not JSON, a violation at the empty pointer says so; for an unknown
    /// version whose data the latest version refuses ([`Catalog::read_event`]), the
    /// violations under the latest version follow it.
    ///
    /// [`Catalog::read_event`]: super::Catalog::read_event
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Number of violations.
    pub fn len(&self) -> usize {
        self.violations.len()
    }

    /// Always false: a `ValidationErrors` has at least one violation.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// Iterates over the violations.
    pub fn iter(&self) -> std::slice::Iter<'_, Violation> {
        self.violations.iter()
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a Violation;
    type IntoIter = std::slice::Iter<'a, Violation>;
    fn into_iter(self) -> Self::IntoIter {
        self.violations.iter()
    }
}

impl fmt::Display for ValidationErrors {
    /// One violation per line as `<json-pointer>: <message>`; for an unknown type or version,
    /// or data that is not JSON, just the message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problem != ValidationProblem::Invalid
            && let Some(v) = self.violations.first()
        {
            return f.write_str(&v.message);
        }
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl From<ValidationErrors> for Error {
    fn from(e: ValidationErrors) -> Self {
        let what = match (&e.problem, e.version) {
            (ValidationProblem::Invalid, Some(v)) => format!(
                "invalid \"{}\" event (schema version {v}, {} violation{}):\n{e}",
                e.event_type,
                e.len(),
                if e.len() == 1 { "" } else { "s" }
            ),
            _ => e.to_string(),
        };
        Error::new(ErrorKind::Validation, what).with_source(e)
    }
}

/// Turns the validator's errors into violations, one per problem, sorted by pointer.
pub(crate) fn collect<'a>(
    errors: impl Iterator<Item = jsonschema::ValidationError<'a>>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for e in errors {
        push_violations(&e, &mut out);
    }
    out.sort_by(|a, b| a.pointer.cmp(&b.pointer));
    out.dedup();
    out
}

fn push_violations(e: &jsonschema::ValidationError<'_>, out: &mut Vec<Violation>) {
    let at = e.instance_path().as_str().to_owned();
    let kind = e.kind();
    let keyword = kind.keyword().to_owned();
    let message = match kind {
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_owned);
            out.push(Violation::new(
                pointer::push(&at, &name),
                keyword,
                format!("required property \"{name}\" is missing"),
            ));
            return;
        }
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            for name in unexpected {
                out.push(Violation::new(
                    pointer::push(&at, name),
                    keyword.clone(),
                    format!(
                        "property \"{name}\" is not allowed here (the schema does not declare it)"
                    ),
                ));
            }
            return;
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => article(&t.to_string()),
                TypeKind::Multiple(set) => {
                    let names: Vec<String> = set.iter().map(|t| t.to_string()).collect();
                    join_or(&names)
                }
            };
            format!(
                "must be {expected}, not {}",
                article(json_type(e.instance()))
            )
        }
        ValidationErrorKind::Enum { options } => match options.as_array() {
            Some(values) => format!("must be one of {}", list_values(values)),
            None => format!("must be one of {options}"),
        },
        ValidationErrorKind::Constant { expected_value } => {
            format!("must be exactly {expected_value}")
        }
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            format!("must be greater than {limit}")
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        ValidationErrorKind::MultipleOf { multiple_of } => {
            format!("must be a multiple of {multiple_of}")
        }
        ValidationErrorKind::MinLength { limit } => {
            format!("must be at least {limit} character{} long", plural(*limit))
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("must be at most {limit} character{} long", plural(*limit))
        }
        ValidationErrorKind::Pattern { pattern } => {
            format!("must match the pattern \"{pattern}\"")
        }
        ValidationErrorKind::Format { format } => format!("must be a valid \"{format}\""),
        ValidationErrorKind::MinItems { limit } => {
            format!("must have at least {limit} item{}", plural(*limit))
        }
        ValidationErrorKind::MaxItems { limit } => {
            format!("must have at most {limit} item{}", plural(*limit))
        }
        ValidationErrorKind::AdditionalItems { limit } => {
            format!("must have at most {limit} item{}", plural(*limit as u64))
        }
        ValidationErrorKind::UnevaluatedItems { unexpected } => format!(
            "has {} item{} that the schema does not allow",
            unexpected.len(),
            plural(unexpected.len() as u64)
        ),
        ValidationErrorKind::UniqueItems => "must not contain duplicate items".to_owned(),
        ValidationErrorKind::Contains => {
            "must contain at least one item matching the \"contains\" schema".to_owned()
        }
        ValidationErrorKind::MinProperties { limit } => {
            format!("must have at least {limit} propert{}", plural_y(*limit))
        }
        ValidationErrorKind::MaxProperties { limit } => {
            format!("must have at most {limit} propert{}", plural_y(*limit))
        }
        ValidationErrorKind::PropertyNames { error } => {
            format!(
                "has a property name that is not allowed: {}",
                error.masked()
            )
        }
        ValidationErrorKind::AnyOf { context } => {
            format!(
                "matches none of the {} allowed alternatives (anyOf){}",
                context.len(),
                closest(context)
            )
        }
        ValidationErrorKind::OneOfNotValid { context } => {
            format!(
                "matches none of the {} allowed alternatives (oneOf){}",
                context.len(),
                closest(context)
            )
        }
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            "matches more than one alternative, but exactly one is allowed (oneOf)".to_owned()
        }
        ValidationErrorKind::Not { .. } => {
            "must not match the schema given under \"not\"".to_owned()
        }
        ValidationErrorKind::FalseSchema => "is not allowed here".to_owned(),
        _ => e.masked().to_string(),
    };
    out.push(Violation::new(at, keyword, message));
}

/// For a failed `anyOf`/`oneOf`, the alternative that came closest (fewest errors).
fn closest(context: &[Vec<jsonschema::ValidationError<'static>>]) -> String {
    let Some((idx, best)) = context
        .iter()
        .enumerate()
        .filter(|(_, errs)| !errs.is_empty())
        .min_by_key(|(_, errs)| errs.len())
    else {
        return String::new();
    };
    let mut inner = Vec::new();
    for e in best {
        push_violations(e, &mut inner);
    }
    let parts: Vec<String> = inner.iter().map(|v| v.to_string()).collect();
    format!("; closest is alternative {}: {}", idx + 1, parts.join("; "))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn article(t: &str) -> String {
    match t {
        "null" => "null".to_owned(),
        "array" | "object" | "integer" => format!("an {t}"),
        _ => format!("a {t}"),
    }
}

fn join_or(names: &[String]) -> String {
    match names {
        [] => "nothing".to_owned(),
        [one] => article(one),
        [init @ .., last] => format!(
            "{} or {}",
            init.iter()
                .map(|n| article(n))
                .collect::<Vec<_>>()
                .join(", "),
            article(last)
        ),
    }
}

fn list_values(values: &[Value]) -> String {
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn plural_y(n: u64) -> &'static str {
    if n == 1 { "y" } else { "ies" }
}
