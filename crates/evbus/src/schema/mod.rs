//! The schema catalogue: every event type, its JSON Schema versions, and validation.
//!
//! A [`CatalogBuilder`] collects event types and shared definitions — from Rust types
//! ([`EventType`] + `schemars`), from JSON values, or from a directory of `.json` files — checks
//! them (meta-schema, references, cycles, compatibility of new versions) and
//! [freezes](CatalogBuilder::freeze) them into a [`Catalog`]: immutable, cheap to clone
//! (`Arc`-shared), `Send + Sync`, with every validator compiled once.
//!
//! ```
//! use evbus::schema::Catalog;
//! use serde_json::json;
//!
//! let mut builder = Catalog::builder();
//! builder.define("Order", json!({
//!     "type": "object",
//!     "properties": {"id": {"type": "string"}, "total": {"type": "number", "minimum": 0}},
//!     "required": ["id", "total"]
//! }))?;
//! builder.register_json("afterOrderCancel", json!({
//!     "description": "An order was canceled.",
//!     "type": "object",
//!     "properties": {
//!         "order": {"$ref": "../definitions/Order.json"},
//!         "canceledBy": {"type": "string"},
//!         "returnToStock": {"type": "boolean"}
//!     },
//!     "required": ["order", "canceledBy", "returnToStock"]
//! }))?;
//! let catalog = builder.freeze()?;
//!
//! // The emitter forgot `returnToStock`: refused, naming the field.
//! let data = json!({"order": {"id": "o-1", "total": 12.5}, "canceledBy": "u-7"});
//! let errors = catalog.validate("afterOrderCancel", &data).unwrap_err();
//! assert_eq!(errors.to_string(), r#"/returnToStock: required property "returnToStock" is missing"#);
//!
//! let data = json!({"order": {"id": "o-1", "total": 12.5}, "canceledBy": "u-7", "returnToStock": true});
//! let ok = catalog.validate("afterOrderCancel", &data)?;
//! assert_eq!(ok.dataschema(), Some("urn:evbus:schema:afterOrderCancel:1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Directory layout
//!
//! ```text
//! DIR/events/<type>.json          one event type per file (its latest version); <type> is the file stem
//! DIR/events/<type>/<n>.json      earlier version <n> of the type (optional history)
//! DIR/definitions/<Name>.json     shared named definitions
//! ```
//!
//! The history files keep the versions that producers and consumers still in service may
//! use: a consumer validates each event against the version its `dataschema` names, and
//! [`Catalog::from_dir`] checks every adjacent pair of versions (every pair for the
//! transitive modes) in the type's mode, so a history that breaks the mode does not load.
//! A directory without history files loads exactly as before.
//!
//! Event schemas reference definitions with ordinary relative references
//! (`{"$ref": "../definitions/Order.json"}`), so any JSON Schema tool validates against the same
//! files. Internally a definition lives at `evbus:///definitions/<Name>.json` and an event type
//! at `evbus:///events/<type>.json`; nothing is ever fetched from the network or the disk while
//! resolving references. Definitions may reference each other (`{"$ref": "Address.json"}`).
//!
//! # Schema-root keywords evbus reads
//!
//! | keyword | type | default | meaning |
//! |---|---|---|---|
//! | `description` | string | none | what the event means; listed and exported |
//! | `x-evbus-version` | integer ≥ 1 | 1, or the next version | the schema version |
//! | `x-evbus-compatibility` | mode name | `BACKWARD` | the type's [`Compatibility`] mode, from this version on |
//! | `x-evbus-external` | boolean | `false` | visible outside through the gateway |
//! | `x-evbus-redact` | array of JSON pointers | `[]` | removed before the event leaves |
//! | `x-evbus-allow` | array of JSON pointers | none | if present, only these leave |
//!
//! In `x-evbus-redact` and `x-evbus-allow` pointers, the token `*` means every element of an
//! array or every member of an object (`/customers/*/email`). A pointer that cannot be applied
//! is refused at registration: one naming a property a closed object does not declare, `-`
//! where the schema has an array (it names the position after the last element), or a name
//! where the schema has an array (`/customers/email`: write `/customers/*/email`).
//!
//! JSON Schema 2020-12 is the default dialect; draft-07 and 2019-09 are accepted through
//! `$schema`. `format` is asserted (an `email` must be an email), and an unknown format name is
//! an error at registration rather than silently ignored.
//!
//! # Extending shared definitions
//!
//! Before the catalogue is frozen, any module can add properties and required fields to a
//! shared definition with [`CatalogBuilder::extend_definition`]; every event type that
//! references the definition, directly or through another definition, validates against the
//! extended form. Two extensions that give one property different schemas, or an extension
//! that redefines a property of the base definition differently, are refused.
//!
//! # Versions and compatibility
//!
//! Registering a schema for a type that already has versions adds version n+1 (or the explicit
//! `x-evbus-version`), checked against the earlier versions in the type's [`Compatibility`]
//! mode (BACKWARD by default), with the rules of Confluent Schema Registry for JSON Schema: see
//! [`compat`] for the rules and the deliberate differences.
//!
//! [`Catalog::read_event`] is how consumers validate: an event of a version the catalogue
//! lacks is read as the latest version when its data fits, and refused with a reason naming
//! the missing version and the deploy order otherwise. [`Catalog::diff`] lists every change
//! between two catalogues, compatible or breaking under each type's mode (`evbus events
//! diff`). See `docs/schema-evolution.md` and ADR 0010.

mod asyncapi;
mod builder;
mod catalog;
pub mod compat;
mod diff;
mod errors;
mod pointer;
mod resolve;
mod violation;

use std::borrow::Cow;

pub use asyncapi::AsyncApiOptions;
pub use builder::CatalogBuilder;
pub use catalog::{Catalog, EventSummary, EventTypeInfo, EventVersion, Validated};
pub use compat::{Compatibility, Incompatibility};
pub use diff::{Change, ChangeKind, Severity};
pub use errors::{SchemaError, SchemaErrorKind};
pub use violation::{ValidationErrors, ValidationProblem, Violation};

/// Root keyword: the schema version (integer, default 1).
pub const VERSION_KEYWORD: &str = "x-evbus-version";
/// Root keyword: the compatibility mode of the event type (`BACKWARD`, `FULL`…; default
/// `BACKWARD`), applied to the version that declares it and the later ones.
pub const COMPATIBILITY_KEYWORD: &str = "x-evbus-compatibility";
/// Root keyword: whether the event type is visible outside through the gateway (default false).
pub const EXTERNAL_KEYWORD: &str = "x-evbus-external";
/// Root keyword: JSON pointers removed from the data before an event leaves through the gateway.
pub const REDACT_KEYWORD: &str = "x-evbus-redact";
/// Root keyword: if present, the only JSON pointers of the data that leave through the gateway.
pub const ALLOW_KEYWORD: &str = "x-evbus-allow";

/// Prefix of the `dataschema` URIs of the catalogue: `urn:evbus:schema:<type>:<version>`.
pub const DATASCHEMA_PREFIX: &str = "urn:evbus:schema:";

/// The `dataschema` URI naming version `version` of event type `ty`.
///
/// ```
/// assert_eq!(evbus::schema::dataschema_uri("afterOrderCreate", 2), "urn:evbus:schema:afterOrderCreate:2");
/// ```
pub fn dataschema_uri(ty: &str, version: u32) -> String {
    format!("{DATASCHEMA_PREFIX}{ty}:{version}")
}

/// Splits a `dataschema` URI written by the catalogue into its event type and version.
///
/// ```
/// use evbus::schema::parse_dataschema;
/// assert_eq!(parse_dataschema("urn:evbus:schema:afterOrderCreate:2"), Some(("afterOrderCreate", 2)));
/// assert_eq!(parse_dataschema("https://example.com/schema.json"), None);
/// ```
pub fn parse_dataschema(uri: &str) -> Option<(&str, u32)> {
    let rest = uri.strip_prefix(DATASCHEMA_PREFIX)?;
    let (ty, version) = rest.rsplit_once(':')?;
    let version = version.parse().ok()?;
    (!ty.is_empty() && version > 0).then_some((ty, version))
}

/// A Rust type that is the payload of one event type.
///
/// Derive [`schemars::JsonSchema`] and name the event type; register it with
/// [`CatalogBuilder::register`]. Doc comments become the `description`; the other root
/// keywords are set with `#[schemars(extend(...))]`:
///
/// ```
/// use evbus::schema::{Catalog, EventType};
/// use schemars::JsonSchema;
/// use serde::Serialize;
///
/// /// A product's price or stock changed.
/// #[derive(Serialize, JsonSchema)]
/// #[serde(rename_all = "camelCase")]
/// #[schemars(extend("x-evbus-external" = true))]
/// struct ProductUpdated {
///     product_id: String,
///     price: f64,
/// }
///
/// impl EventType for ProductUpdated {
///     const TYPE: &'static str = "afterProductUpdate";
/// }
///
/// let mut builder = Catalog::builder();
/// builder.register::<ProductUpdated>()?;
/// let catalog = builder.freeze()?;
/// let info = catalog.get("afterProductUpdate").unwrap();
/// assert!(info.latest().external());
/// assert_eq!(info.latest().description(), Some("A product's price or stock changed."));
/// let data = serde_json::to_value(ProductUpdated { product_id: "p-1".into(), price: 9.5 })?;
/// catalog.validate("afterProductUpdate", &data)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A nested type whose [`schema_name`](schemars::JsonSchema::schema_name) equals the name of a
/// shared definition of the catalogue (for example `Order`) is replaced by that definition when
/// the catalogue is frozen, so Rust-registered events see extensions of shared definitions too.
pub trait EventType: schemars::JsonSchema {
    /// The event type name, for example `afterOrderCreate`.
    const TYPE: &'static str;
}

/// The JSON Schema (2020-12) of a Rust type, as the catalogue registers it.
pub fn schema_of<T: schemars::JsonSchema + ?Sized>() -> serde_json::Value {
    schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// Whether `name` is acceptable as an event type or definition name: non-empty, at most 200
/// characters of ASCII letters, digits, `.`, `_` and `-`, not starting with `.` or `-`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn type_name_of<T: ?Sized>() -> Cow<'static, str> {
    Cow::Borrowed(std::any::type_name::<T>())
}

/// Re-export of `schemars`, so the derive can be used through evbus (`#[schemars(crate = "evbus::schema::schemars")]`).
pub use schemars;
