//! The frozen catalogue: lookup, validation and discovery.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::builder::CatalogBuilder;
use super::compat::Compatibility;
use super::errors::SchemaError;
use super::violation::{self, ValidationErrors, ValidationProblem};
use super::{dataschema_uri, parse_dataschema};
use crate::envelope::Event;

/// The `x-evbus-*` and `description` root keywords of one schema version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) description: Option<String>,
    pub(crate) external: bool,
    pub(crate) redact: Vec<String>,
    pub(crate) allow: Option<Vec<String>>,
}

/// One version of an event type: its schema, its root keywords and its compiled validator.
pub struct EventVersion {
    event_type: String,
    version: u32,
    dataschema: String,
    meta: Meta,
    schema: Value,
    source: Value,
    canonical: Value,
    origin: String,
    /// The mode this version was checked in against the earlier ones when registered.
    mode: Compatibility,
    validator: jsonschema::Validator,
}

impl EventVersion {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        event_type: &str,
        version: u32,
        meta: Meta,
        schema: Value,
        source: Value,
        canonical: Value,
        origin: String,
        mode: Compatibility,
        validator: jsonschema::Validator,
    ) -> Self {
        EventVersion {
            event_type: event_type.to_owned(),
            version,
            dataschema: dataschema_uri(event_type, version),
            meta,
            schema,
            source,
            canonical,
            origin,
            mode,
            validator,
        }
    }

    /// The mode this version is checked in against the earlier versions (the type's mode
    /// when it was added, as loading a catalogue checks it).
    pub(crate) fn mode(&self) -> Compatibility {
        self.mode
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The version number (from `x-evbus-version`, 1 by default).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The `dataschema` URI naming this version: `urn:evbus:schema:<type>:<version>`.
    pub fn dataschema(&self) -> &str {
        &self.dataschema
    }

    /// The schema's root `description`.
    pub fn description(&self) -> Option<&str> {
        self.meta.description.as_deref()
    }

    /// `x-evbus-external`: whether the type may be seen outside through the gateway.
    pub fn external(&self) -> bool {
        self.meta.external
    }

    /// `x-evbus-redact`: JSON pointers removed from the data before it leaves.
    pub fn redact(&self) -> &[String] {
        &self.meta.redact
    }

    /// `x-evbus-allow`: if present, the only JSON pointers of the data that leave.
    pub fn allow(&self) -> Option<&[String]> {
        self.meta.allow.as_deref()
    }

    /// The schema as validated, self-contained: shared definitions (with their extensions)
    /// are embedded under `$defs` and referenced as `#/$defs/<Name>`.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The schema exactly as registered (relative references, no extensions).
    pub fn source_schema(&self) -> &Value {
        &self.source
    }

    /// The schema with canonical references (`#…`, `evbus:///definitions/<Name>.json#…`).
    pub(crate) fn canonical(&self) -> &Value {
        &self.canonical
    }

    /// Where the schema came from: `file …`, `Rust type …` or `JSON value`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Validates `data` against this version.
    pub fn validate(&self, data: &Value) -> Result<(), ValidationErrors> {
        if self.validator.is_valid(data) {
            return Ok(());
        }
        Err(ValidationErrors::invalid(
            &self.event_type,
            self.version,
            violation::collect(self.validator.iter_errors(data)),
        ))
    }
}

impl fmt::Debug for EventVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventVersion")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("external", &self.meta.external)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// An event type and all its versions, oldest first.
#[derive(Debug)]
pub struct EventTypeInfo {
    name: String,
    compatibility: Compatibility,
    versions: Vec<EventVersion>,
}

impl EventTypeInfo {
    pub(crate) fn new(
        name: String,
        compatibility: Compatibility,
        versions: Vec<EventVersion>,
    ) -> Self {
        EventTypeInfo {
            name,
            compatibility,
            versions,
        }
    }

    /// The event type name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compatibility mode its versions were checked in.
    pub fn compatibility(&self) -> Compatibility {
        self.compatibility
    }

    /// Every version, oldest first (never empty).
    pub fn versions(&self) -> &[EventVersion] {
        &self.versions
    }

    /// The latest version: the one new events are validated against.
    pub fn latest(&self) -> &EventVersion {
        self.versions
            .last()
            .expect("an event type has at least one version")
    }

    /// One version by number.
    pub fn version(&self, version: u32) -> Option<&EventVersion> {
        self.versions.iter().find(|v| v.version == version)
    }
}

/// A summary of one event type for listings (`evbus events list --format json`).
#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The latest version.
    pub version: u32,
    /// Every version, oldest first.
    pub versions: Vec<u32>,
    /// Whether the type is visible outside through the gateway.
    pub external: bool,
    /// The latest version's description.
    pub description: Option<String>,
    /// The latest version's `dataschema` URI.
    pub dataschema: String,
    /// The compatibility mode of the type.
    pub compatibility: Compatibility,
    /// JSON pointers redacted before the event leaves.
    pub redact: Vec<String>,
    /// If present, the only JSON pointers that leave.
    pub allow: Option<Vec<String>>,
    /// The latest version's self-contained schema.
    pub schema: Value,
}

/// What a successful validation tells: the version the data was validated against.
#[derive(Clone, Copy, Debug)]
pub struct Validated<'c> {
    schema: Option<&'c EventVersion>,
    /// [`Catalog::read_event`]: the version the event named, when the catalogue lacks it.
    unknown: Option<u32>,
}

impl<'c> Validated<'c> {
    const UNCHECKED: Validated<'static> = Validated {
        schema: None,
        unknown: None,
    };

    fn of(schema: &'c EventVersion) -> Self {
        Validated {
            schema: Some(schema),
            unknown: None,
        }
    }

    /// The version validated against; `None` when a permissive catalogue let an unregistered
    /// type through unchecked.
    pub fn version(&self) -> Option<u32> {
        self.schema.map(EventVersion::version)
    }

    /// The `dataschema` URI to put on the event envelope, if the type is registered.
    pub fn dataschema(&self) -> Option<&'c str> {
        self.schema.map(EventVersion::dataschema)
    }

    /// The schema version validated against, if the type is registered.
    pub fn schema(&self) -> Option<&'c EventVersion> {
        self.schema
    }

    /// Whether the type is registered (false only in a permissive catalogue).
    pub fn is_registered(&self) -> bool {
        self.schema.is_some()
    }

    /// For [`Catalog::read_event`]: `Some(v)` when the event was written with version `v`,
    /// which this catalogue does not have, and its data was read as (validated against) the
    /// latest version, [`version`](Self::version), instead.
    pub fn unknown_version(&self) -> Option<u32> {
        self.unknown
    }
}

struct Inner {
    strict: bool,
    types: BTreeMap<String, EventTypeInfo>,
    definitions: BTreeMap<String, Value>,
    canonical_definitions: BTreeMap<String, Value>,
}

/// A frozen set of event types: validators compiled once, shared by cheap clones across
/// threads (`Catalog` is `Send + Sync`; clones share one `Arc`).
#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catalog")
            .field("strict", &self.inner.strict)
            .field("types", &self.inner.types.keys().collect::<Vec<_>>())
            .field(
                "definitions",
                &self.inner.definitions.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for Catalog {
    /// An empty, strict catalogue: every event type is unknown.
    fn default() -> Self {
        Catalog::new(true, BTreeMap::new(), BTreeMap::new(), BTreeMap::new())
    }
}

impl Catalog {
    pub(crate) fn new(
        strict: bool,
        types: BTreeMap<String, EventTypeInfo>,
        definitions: BTreeMap<String, Value>,
        canonical_definitions: BTreeMap<String, Value>,
    ) -> Self {
        Catalog {
            inner: Arc::new(Inner {
                strict,
                types,
                definitions,
                canonical_definitions,
            }),
        }
    }

    /// A new [`CatalogBuilder`].
    pub fn builder() -> CatalogBuilder {
        CatalogBuilder::new()
    }

    /// Loads and freezes a strict catalogue directory (see [`CatalogBuilder::load_dir`]).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Catalog, SchemaError> {
        CatalogBuilder::new().load_dir(dir)?.freeze()
    }

    /// Whether unregistered types are refused (the default) rather than let through.
    pub fn is_strict(&self) -> bool {
        self.inner.strict
    }

    /// One event type.
    pub fn get(&self, ty: &str) -> Option<&EventTypeInfo> {
        self.inner.types.get(ty)
    }

    /// Whether `ty` is registered.
    pub fn contains(&self, ty: &str) -> bool {
        self.inner.types.contains_key(ty)
    }

    /// Every event type, sorted by name.
    pub fn event_types(&self) -> impl ExactSizeIterator<Item = &EventTypeInfo> {
        self.inner.types.values()
    }

    /// The names of every event type, sorted.
    pub fn type_names(&self) -> Vec<String> {
        self.inner.types.keys().cloned().collect()
    }

    /// The shared definitions with their extensions applied, as written (references between
    /// definitions stay relative: `Address.json`).
    pub fn definitions(&self) -> &BTreeMap<String, Value> {
        &self.inner.definitions
    }

    pub(crate) fn canonical_definitions(&self) -> &BTreeMap<String, Value> {
        &self.inner.canonical_definitions
    }

    /// One summary per event type, for listings.
    pub fn summaries(&self) -> Vec<EventSummary> {
        self.event_types()
            .map(|t| {
                let l = t.latest();
                EventSummary {
                    event_type: t.name.clone(),
                    version: l.version,
                    versions: t.versions.iter().map(|v| v.version).collect(),
                    external: l.external(),
                    description: l.meta.description.clone(),
                    dataschema: l.dataschema.clone(),
                    compatibility: t.compatibility,
                    redact: l.meta.redact.clone(),
                    allow: l.meta.allow.clone(),
                    schema: l.schema.clone(),
                }
            })
            .collect()
    }

    fn unknown(&self, ty: &str) -> ValidationErrors {
        ValidationErrors::unknown_type(ty, self.type_names())
    }

    /// Validates `data` as the latest version of event type `ty`.
    ///
    /// Unregistered types fail in a strict catalogue and pass unchecked (with no version) in
    /// a permissive one. On failure, every violation is reported at once.
    pub fn validate(&self, ty: &str, data: &Value) -> Result<Validated<'_>, ValidationErrors> {
        self.validate_found(ty, self.inner.types.get(ty), None, data)
    }

    /// Validates `data` as `version` of `ty` (its latest when `None`), `ty` looked up
    /// already: `info` is its entry here, or `None` when this catalogue does not have it.
    pub(crate) fn validate_found<'c>(
        &'c self,
        ty: &str,
        info: Option<&'c EventTypeInfo>,
        version: Option<u32>,
        data: &Value,
    ) -> Result<Validated<'c>, ValidationErrors> {
        match info {
            Some(t) => Self::validate_as(t, version, data),
            None if self.inner.strict => Err(self.unknown(ty)),
            None => Ok(Validated::UNCHECKED),
        }
    }

    /// Validates `data` as a given version of `ty` (for example the version an incoming
    /// event names in its `dataschema`).
    pub fn validate_version(
        &self,
        ty: &str,
        version: u32,
        data: &Value,
    ) -> Result<Validated<'_>, ValidationErrors> {
        self.validate_found(ty, self.inner.types.get(ty), Some(version), data)
    }

    /// Validates `data` as `version` of `info` (its latest when `None`).
    fn validate_as<'c>(
        info: &'c EventTypeInfo,
        version: Option<u32>,
        data: &Value,
    ) -> Result<Validated<'c>, ValidationErrors> {
        let schema = match version {
            None => info.latest(),
            Some(version) => info.version(version).ok_or_else(|| {
                ValidationErrors::unknown_version(
                    &info.name,
                    version,
                    info.versions.iter().map(|v| v.version).collect(),
                )
            })?,
        };
        schema.validate(data)?;
        Ok(Validated::of(schema))
    }

    /// Validates an event's data against its type: the version named by its `dataschema` if
    /// that is a catalogue URI for the same type, the latest version otherwise. This is the
    /// check made when consuming (a foreign producer may be wrong).
    pub fn validate_event(&self, event: &Event) -> Result<Validated<'_>, ValidationErrors> {
        self.validate_event_data(event)
            .map(|(validated, _)| validated)
    }

    /// [`validate_event`](Self::validate_event), also handing back the data as it was parsed
    /// to be validated (`None` when a permissive catalogue let the type through unchecked).
    fn validate_event_data(
        &self,
        event: &Event,
    ) -> Result<(Validated<'_>, Option<Value>), ValidationErrors> {
        let ty = event.ty();
        // One lookup per consumed event.
        let Some(info) = self.inner.types.get(ty) else {
            return if self.inner.strict {
                Err(self.unknown(ty))
            } else {
                Ok((Validated::UNCHECKED, None))
            };
        };
        let version = event
            .dataschema()
            .and_then(parse_dataschema)
            .filter(|(t, _)| *t == ty)
            .map(|(_, v)| v);
        let data: Value = match event.data() {
            None => Value::Null,
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| ValidationErrors::not_json(ty, version, e.to_string()))?,
        };
        let validated = Self::validate_as(info, version, &data)?;
        Ok((validated, Some(data)))
    }

    /// Validates an incoming event as a consumer reads it: like
    /// [`validate_event`](Self::validate_event), except for an event written with a version
    /// of its type that this catalogue does not have (a producer deployed with a newer
    /// catalogue, or an old event of a version this catalogue dropped). Such an event is read
    /// as the latest version the catalogue has when its data is valid under it — the contract
    /// the consumer's code was written against — and
    /// [`Validated::unknown_version`] says so. Otherwise the error
    /// ([`ValidationProblem::UnknownVersion`](super::ValidationProblem::UnknownVersion)) says
    /// which version is missing, why the data cannot be read as the latest, and what to
    /// deploy.
    ///
    /// ```
    /// use evbus::{Event, schema::Catalog};
    /// use serde_json::json;
    ///
    /// let mut b = Catalog::builder();
    /// b.register_json("afterProductUpdate", json!({
    ///     "type": "object",
    ///     "properties": {"productId": {"type": "string"}},
    ///     "required": ["productId"],
    ///     "additionalProperties": false
    /// }))?;
    /// let consumer = b.freeze()?;
    /// // Written by a producer that knows version 2 (one optional property more).
    /// let event = |data| Event::builder("afterProductUpdate", "/catalog")
    ///     .dataschema("urn:evbus:schema:afterProductUpdate:2")
    ///     .json(&data).unwrap().build().unwrap();
    ///
    /// let ok = consumer.read_event(&event(json!({"productId": "p-1"})))?;
    /// assert_eq!((ok.version(), ok.unknown_version()), (Some(1), Some(2)));
    ///
    /// let err = consumer.read_event(&event(json!({"productId": "p-1", "color": "red"}))).unwrap_err();
    /// assert!(err.to_string().starts_with(
    ///     "event type \"afterProductUpdate\" version 2 is newer than this consumer's catalogue (versions: 1)"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_event(&self, event: &Event) -> Result<Validated<'_>, ValidationErrors> {
        self.read_event_data(event).map(|(validated, _)| validated)
    }

    /// [`read_event`](Self::read_event), also handing back the data as it was parsed to be
    /// validated (`None` when a permissive catalogue let the type through unchecked), so that
    /// a typed handler need not parse the bytes again.
    pub(crate) fn read_event_data(
        &self,
        event: &Event,
    ) -> Result<(Validated<'_>, Option<Value>), ValidationErrors> {
        let errors = match self.validate_event_data(event) {
            Ok(read) => return Ok(read),
            Err(e) => e,
        };
        let ValidationProblem::UnknownVersion { version, known } = errors.problem() else {
            return Err(errors);
        };
        let (version, ty) = (*version, event.ty());
        let Some(info) = self.inner.types.get(ty) else {
            return Err(errors);
        };
        let latest = info.latest();
        let data: Value = match event.data() {
            None => Value::Null,
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| ValidationErrors::not_json(ty, Some(version), e.to_string()))?,
        };
        match latest.validate(&data) {
            Ok(()) => Ok((
                Validated {
                    schema: Some(latest),
                    unknown: Some(version),
                },
                Some(data),
            )),
            Err(invalid) => Err(ValidationErrors::unreadable_version(
                ty,
                version,
                known.clone(),
                info.compatibility(),
                invalid.violations().to_vec(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_send_sync_and_cheap_to_clone() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Catalog>();
        let c = Catalog::default();
        let d = c.clone();
        assert!(Arc::ptr_eq(&c.inner, &d.inner));
    }
}
