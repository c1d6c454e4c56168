//! Collecting event types and definitions, and freezing them into a [`Catalog`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::{Map, Value};

use super::catalog::{Catalog, EventTypeInfo, EventVersion, Meta};
use super::compat::{self, Compatibility, Incompatibility};
use super::errors::{SchemaError, SchemaErrorKind};
use super::resolve::{self, DocKey, Docs};
use super::{
    ALLOW_KEYWORD, COMPATIBILITY_KEYWORD, EXTERNAL_KEYWORD, EventType, REDACT_KEYWORD,
    VERSION_KEYWORD,
};
use super::{is_valid_name, pointer, schema_of};

/// Collects event types, shared definitions and their extensions, then
/// [freezes](Self::freeze) them into a [`Catalog`].
///
/// Every method checks what it can at once (names, meta-schema, `x-evbus-*` keywords, version
/// order, conflicting extensions, and compatibility when the references involved are already
/// registered); [`freeze`](Self::freeze) checks everything again on the final set of
/// definitions, so a catalogue that freezes never fails at validation time for a reason the
/// schemas could have told.
#[derive(Clone, Debug)]
pub struct CatalogBuilder {
    strict: bool,
    check_compat: bool,
    default_mode: Compatibility,
    modes: BTreeMap<String, Compatibility>,
    definitions: BTreeMap<String, Definition>,
    extensions: Vec<Extension>,
    events: BTreeMap<String, Vec<Pending>>,
}

#[derive(Clone, Debug)]
struct Definition {
    schema: Value,
    origin: String,
}

#[derive(Clone, Debug)]
struct Extension {
    target: String,
    properties: Map<String, Value>,
    required: Vec<String>,
    origin: String,
}

#[derive(Clone, Debug)]
struct Pending {
    version: u32,
    schema: Value,
    origin: String,
    from_rust: bool,
    meta: Meta,
    /// The type's compatibility mode when this version was added: what it was checked with.
    mode: Compatibility,
}

impl Default for CatalogBuilder {
    fn default() -> Self {
        CatalogBuilder::new()
    }
}

impl CatalogBuilder {
    /// An empty, strict builder whose types default to [`Compatibility::Backward`].
    pub fn new() -> Self {
        CatalogBuilder {
            strict: true,
            check_compat: true,
            default_mode: Compatibility::default(),
            modes: BTreeMap::new(),
            definitions: BTreeMap::new(),
            extensions: Vec::new(),
            events: BTreeMap::new(),
        }
    }

    /// Strict (the default): validating an unregistered event type fails. Permissive: it
    /// passes unchecked (registered types are still validated).
    pub fn strict(&mut self, strict: bool) -> &mut Self {
        self.strict = strict;
        self
    }

    /// Whether versions are checked against each other in their type's mode (the default).
    /// Turned off, every version registers whatever it changes: this is for tools that
    /// compare catalogues themselves and must load a breaking one to say what breaks
    /// ([`Catalog::diff`]), never for a service.
    pub fn check_compatibility(&mut self, check: bool) -> &mut Self {
        self.check_compat = check;
        self
    }

    /// The compatibility mode of every type that has none of its own (default `BACKWARD`).
    pub fn compatibility(&mut self, mode: Compatibility) -> &mut Self {
        self.default_mode = mode;
        self
    }

    /// The compatibility mode of one event type. A version is checked with the mode in force
    /// when it is added (as Confluent Schema Registry does), so changing the mode later does
    /// not re-judge earlier versions.
    pub fn type_compatibility(&mut self, ty: &str, mode: Compatibility) -> &mut Self {
        self.modes.insert(ty.to_owned(), mode);
        self
    }

    fn mode_of(&self, ty: &str) -> Compatibility {
        self.modes.get(ty).copied().unwrap_or(self.default_mode)
    }

    /// Registers the shared definition `name` (referenced as `../definitions/<name>.json` from
    /// event schemas, `<name>.json` from other definitions). Registering the same content twice
    /// is a no-op; different content is an error.
    pub fn define(&mut self, name: &str, schema: Value) -> Result<&mut Self, SchemaError> {
        self.define_from(name, schema, "JSON value")
    }

    /// Registers the JSON Schema of a Rust type as the shared definition named after
    /// [`schema_name`](schemars::JsonSchema::schema_name) (for example `Order`).
    pub fn define_type<T: schemars::JsonSchema>(&mut self) -> Result<&mut Self, SchemaError> {
        let name = T::schema_name().into_owned();
        let origin = format!("Rust type {}", super::type_name_of::<T>());
        self.define_from(&name, schema_of::<T>(), &origin)
    }

    fn define_from(
        &mut self,
        name: &str,
        schema: Value,
        origin: &str,
    ) -> Result<&mut Self, SchemaError> {
        let what = format!("definition \"{name}\" ({origin})");
        check_name(name, "definition")?;
        check_document(&schema, &what, false)?;
        if let Some(existing) = self.definitions.get(name) {
            if existing.schema == schema {
                return Ok(self);
            }
            return Err(SchemaError::new(
                SchemaErrorKind::Duplicate,
                format!(
                    "{what}: a different definition \"{name}\" is already registered ({}); \
                     definitions are not versioned, extend it instead",
                    existing.origin
                ),
            ));
        }
        let exts: Vec<&Extension> = self
            .extensions
            .iter()
            .filter(|e| e.target == name)
            .collect();
        apply_extensions(name, &schema, &exts)?;
        self.definitions.insert(
            name.to_owned(),
            Definition {
                schema,
                origin: origin.to_owned(),
            },
        );
        Ok(self)
    }

    /// Extends the shared definition `name` with more properties and required fields, on
    /// behalf of `by` (a module or plugin name, used in error messages). `extension` is an
    /// object with `properties` and/or `required`:
    ///
    /// ```
    /// # use serde_json::json;
    /// let mut builder = evbus::schema::Catalog::builder();
    /// builder.define("Order", json!({"type": "object", "properties": {"id": {"type": "string"}}}))?;
    /// builder.extend_definition("Order", "loyalty-plugin", json!({
    ///     "properties": {"loyaltyPoints": {"type": "integer", "minimum": 0}},
    ///     "required": ["loyaltyPoints"]
    /// }))?;
    /// # Ok::<(), evbus::schema::SchemaError>(())
    /// ```
    ///
    /// The definition may be registered before or after its extensions; an extension of a
    /// definition that is still missing at [`freeze`](Self::freeze) is an error. A property
    /// that the definition or another extension already has with a different schema is a
    /// conflict, reported here or at the latest when the definition is registered.
    pub fn extend_definition(
        &mut self,
        name: &str,
        by: &str,
        extension: Value,
    ) -> Result<&mut Self, SchemaError> {
        let what = format!("extension of \"{name}\" by {by}");
        let Value::Object(mut obj) = extension else {
            return Err(SchemaError::new(
                SchemaErrorKind::InvalidSchema,
                format!("{what}: an extension is an object with `properties` and/or `required`"),
            ));
        };
        let properties = match obj.remove("properties") {
            None => Map::new(),
            Some(Value::Object(p)) => p,
            Some(_) => {
                return Err(SchemaError::new(
                    SchemaErrorKind::InvalidSchema,
                    format!("{what}: `properties` must be an object"),
                ));
            }
        };
        let required = match obj.remove("required") {
            None => Vec::new(),
            Some(Value::Array(r)) if r.iter().all(Value::is_string) => r
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => {
                return Err(SchemaError::new(
                    SchemaErrorKind::InvalidSchema,
                    format!("{what}: `required` must be an array of property names"),
                ));
            }
        };
        if let Some(k) = obj.keys().next() {
            return Err(SchemaError::new(
                SchemaErrorKind::InvalidSchema,
                format!("{what}: an extension may only add `properties` and `required`, not `{k}`"),
            ));
        }
        let mut doc = Map::new();
        doc.insert("properties".to_owned(), Value::Object(properties.clone()));
        check_document(&Value::Object(doc), &what, false)?;
        let ext = Extension {
            target: name.to_owned(),
            properties,
            required,
            origin: by.to_owned(),
        };
        let mut exts: Vec<&Extension> = self
            .extensions
            .iter()
            .filter(|e| e.target == name)
            .collect();
        exts.push(&ext);
        let base = self
            .definitions
            .get(name)
            .map_or_else(|| Value::Object(Map::new()), |d| d.schema.clone());
        apply_extensions(name, &base, &exts)?;
        self.extensions.push(ext);
        Ok(self)
    }

    /// Registers a Rust payload type as a version of [`EventType::TYPE`].
    pub fn register<T: EventType>(&mut self) -> Result<&mut Self, SchemaError> {
        let origin = format!("Rust type {}", super::type_name_of::<T>());
        self.add(T::TYPE, schema_of::<T>(), &origin, true, None)
    }

    /// Registers `schema` as a version of event type `ty`: version 1 for a new type, the
    /// schema's `x-evbus-version`, or the next version. A new version is checked against the
    /// earlier ones in the type's [compatibility mode](Self::type_compatibility).
    /// Registering an identical schema again under the same version is a no-op.
    pub fn register_json(&mut self, ty: &str, schema: Value) -> Result<&mut Self, SchemaError> {
        self.add(ty, schema, "JSON value", false, None)
    }

    /// `file_version`: the version a history file's name gives (`events/<type>/<n>.json`),
    /// which the schema's `x-evbus-version`, if any, must repeat.
    fn add(
        &mut self,
        ty: &str,
        schema: Value,
        origin: &str,
        from_rust: bool,
        file_version: Option<u32>,
    ) -> Result<&mut Self, SchemaError> {
        let what = format!("event type \"{ty}\" ({origin})");
        check_name(ty, "event type")?;
        check_document(&schema, &what, true)?;
        let (explicit, meta) = parse_meta(&schema, &what)?;
        let declared_mode = parse_mode(&schema, &what)?;
        let explicit = match (explicit, file_version) {
            (Some(v), Some(n)) if v != n => {
                return Err(SchemaError::new(
                    SchemaErrorKind::VersionOrder,
                    format!(
                        "{what}: the file name says version {n} but \"{VERSION_KEYWORD}\" says \
                         {v}; a file of events/{ty}/ is named after the version it holds \
                         (events/{ty}/{v}.json)"
                    ),
                ));
            }
            (Some(v), _) => Some(v),
            (None, n) => n,
        };
        let existing = self.events.get(ty).map(Vec::as_slice).unwrap_or(&[]);
        let latest = existing.last().map(|p| p.version);
        // Registering the latest schema again (without naming a version) is a no-op, as in
        // Confluent Schema Registry.
        if explicit.is_none() && existing.last().is_some_and(|p| p.schema == schema) {
            return Ok(self);
        }
        let version = match (explicit, latest) {
            (Some(v), _) => v,
            (None, None) => 1,
            (None, Some(v)) => v.checked_add(1).ok_or_else(|| {
                SchemaError::new(
                    SchemaErrorKind::InvalidSchema,
                    format!("{what}: there is no version after {v}; number versions from 1"),
                )
            })?,
        };
        if let Some(same) = existing.iter().find(|p| p.version == version) {
            if same.schema == schema {
                return Ok(self);
            }
            return Err(SchemaError::new(
                SchemaErrorKind::Duplicate,
                format!(
                    "{what}: version {version} is already registered ({}) with a different \
                     schema; give the new schema \"{VERSION_KEYWORD}\": {}",
                    same.origin,
                    latest.unwrap_or(version).saturating_add(1)
                ),
            ));
        }
        if let Some(latest) = latest.filter(|l| *l > version) {
            return Err(SchemaError::new(
                SchemaErrorKind::VersionOrder,
                format!(
                    "{what}: version {version} is below the latest registered version {latest}; \
                     versions are added in increasing order"
                ),
            ));
        }
        let mode = declared_mode.unwrap_or_else(|| self.mode_of(ty));
        let pending = Pending {
            version,
            schema,
            origin: origin.to_owned(),
            from_rust,
            meta,
            mode,
        };
        // Check compatibility now if everything it needs is registered; freeze checks again.
        if self.check_compat
            && !existing.is_empty()
            && mode != Compatibility::None
            && let Ok(defs) = self.resolved_definitions()
        {
            let docs = Docs {
                defs: &defs.canonical,
                aliases: &defs.aliases,
            };
            let mut all: Vec<&Pending> = existing.iter().collect();
            all.push(&pending);
            let inlined: Result<Vec<(u32, Value)>, SchemaError> = all
                .iter()
                .map(|p| {
                    let doc = effective_schema(p, &defs.canonical);
                    let c = resolve::canonicalize(&doc, &resolve::event_uri(ty), &docs, &what)?;
                    Ok((p.version, resolve::inline(&c, &docs)))
                })
                .collect();
            if let Ok(inlined) = inlined {
                let origins: Vec<&str> = all.iter().map(|p| p.origin.as_str()).collect();
                check_versions(ty, mode, &inlined, inlined.len() - 1, &origins)?;
            }
        }
        if let Some(m) = declared_mode {
            self.modes.insert(ty.to_owned(), m);
        }
        self.events.entry(ty.to_owned()).or_default().push(pending);
        Ok(self)
    }

    /// Loads a catalogue directory:
    ///
    /// ```text
    /// DIR/definitions/<Name>.json   shared definitions
    /// DIR/events/<type>.json        the latest version of an event type (<type> is the stem)
    /// DIR/events/<type>/<n>.json    earlier version n of the type (optional history)
    /// ```
    ///
    /// Files not ending in `.json` are ignored. The history files of a type are added in
    /// increasing version order, then the latest file (whose version, unless it says
    /// `x-evbus-version`, is the one after the highest history file); each version is checked
    /// against the earlier ones in the type's mode, which the latest file may set with
    /// `x-evbus-compatibility` (BACKWARD by default). A history file that says
    /// `x-evbus-version` must say the version its name gives. A type may also have only a
    /// history directory (its highest version is then the latest). Loading a second directory
    /// adds its event schemas as new versions (checked for compatibility) and its definitions
    /// (identical ones are no-ops).
    pub fn load_dir(&mut self, dir: impl AsRef<Path>) -> Result<&mut Self, SchemaError> {
        let dir = dir.as_ref();
        let meta = std::fs::metadata(dir).map_err(|e| {
            SchemaError::new(
                SchemaErrorKind::Io,
                format!("cannot read schema directory {}: {e}", dir.display()),
            )
            .with_source(e)
        })?;
        if !meta.is_dir() {
            return Err(SchemaError::new(
                SchemaErrorKind::Io,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let defs_dir = dir.join("definitions");
        let events_dir = dir.join("events");
        if !defs_dir.is_dir() && !events_dir.is_dir() {
            return Err(SchemaError::new(
                SchemaErrorKind::Io,
                format!(
                    "{} has neither an events/ nor a definitions/ directory (expected \
                     DIR/events/<type>.json and DIR/definitions/<Name>.json)",
                    dir.display()
                ),
            ));
        }
        for (name, path, value) in read_json_files(&defs_dir)? {
            self.define_from(&name, value, &format!("file {}", path.display()))?;
        }
        let mut latest: BTreeMap<String, (std::path::PathBuf, Value)> =
            read_json_files(&events_dir)?
                .into_iter()
                .map(|(ty, path, value)| (ty, (path, value)))
                .collect();
        let mut types: BTreeSet<String> = latest.keys().cloned().collect();
        types.extend(history_dirs(&events_dir)?);
        for ty in types {
            let history = read_history(&events_dir.join(&ty), &ty)?;
            let latest = latest.remove(&ty);
            // The latest file's mode governs the whole history, so it is known first.
            if let Some((path, value)) = &latest
                && !history.is_empty()
                && let Some(mode) = parse_mode(
                    value,
                    &format!("event type \"{ty}\" (file {})", path.display()),
                )?
            {
                self.modes.insert(ty.clone(), mode);
            }
            for (version, path, value) in history {
                let origin = format!("file {}", path.display());
                self.add(&ty, value, &origin, false, Some(version))?;
            }
            if let Some((path, value)) = latest {
                self.add(&ty, value, &format!("file {}", path.display()), false, None)?;
            }
        }
        Ok(self)
    }

    /// Applies extensions to every definition and canonicalizes their references.
    fn resolved_definitions(&self) -> Result<ResolvedDefs, SchemaError> {
        let mut extended = BTreeMap::new();
        for (name, def) in &self.definitions {
            let exts: Vec<&Extension> = self
                .extensions
                .iter()
                .filter(|e| &e.target == name)
                .collect();
            extended.insert(name.clone(), apply_extensions(name, &def.schema, &exts)?);
        }
        if let Some(ext) = self
            .extensions
            .iter()
            .find(|e| !self.definitions.contains_key(&e.target))
        {
            let known: Vec<&str> = self.definitions.keys().map(String::as_str).collect();
            return Err(SchemaError::new(
                SchemaErrorKind::UnknownDefinition,
                format!(
                    "{} extends the definition \"{}\", which is not registered (definitions: {})",
                    ext.origin,
                    ext.target,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let mut aliases = HashMap::new();
        for (name, def) in &self.definitions {
            if let Some(id) = def.schema.get("$id").and_then(Value::as_str) {
                aliases.insert(id.trim_end_matches('#').to_owned(), name.clone());
            }
        }
        let mut canonical = BTreeMap::new();
        {
            let docs = Docs {
                defs: &extended,
                aliases: &aliases,
            };
            for (name, def) in &extended {
                let what = format!("definition \"{name}\" ({})", self.definitions[name].origin);
                canonical.insert(
                    name.clone(),
                    resolve::canonicalize(def, &resolve::definition_uri(name), &docs, &what)?,
                );
            }
        }
        Ok(ResolvedDefs {
            extended,
            canonical,
            aliases,
        })
    }

    /// Checks everything on the final set of schemas and compiles every validator.
    ///
    /// Errors: an extension of a missing definition, conflicting extensions, unknown
    /// references, unresolvable `$ref` cycles, incompatible versions, invalid `x-evbus-redact`
    /// / `x-evbus-allow` pointers, or a schema the validator cannot compile.
    pub fn freeze(&self) -> Result<Catalog, SchemaError> {
        let defs = self.resolved_definitions()?;
        let docs = Docs {
            defs: &defs.canonical,
            aliases: &defs.aliases,
        };
        resolve::check_cycles("", &Value::Null, &docs)?;

        let registry = jsonschema::Registry::new()
            .extend(
                defs.canonical
                    .iter()
                    .map(|(name, v)| (resolve::definition_uri(name), v.clone())),
            )
            .and_then(|b| b.prepare())
            .map_err(|e| {
                SchemaError::new(
                    SchemaErrorKind::InvalidSchema,
                    format!("cannot index the shared definitions: {e}"),
                )
            })?;

        let mut types = BTreeMap::new();
        for (ty, versions) in &self.events {
            let mut canon = Vec::new();
            let mut inlined = Vec::new();
            for p in versions {
                let what = format!("event type \"{ty}\" version {} ({})", p.version, p.origin);
                let doc = effective_schema(p, &defs.canonical);
                let c = resolve::canonicalize(&doc, &resolve::event_uri(ty), &docs, &what)?;
                resolve::check_cycles(ty, &c, &docs).map_err(|e| e.context(&what))?;
                inlined.push((p.version, resolve::inline(&c, &docs)));
                canon.push(c);
            }
            let origins: Vec<&str> = versions.iter().map(|p| p.origin.as_str()).collect();
            for (i, p) in versions.iter().enumerate().skip(1) {
                if self.check_compat {
                    check_versions(ty, p.mode, &inlined, i, &origins)?;
                }
            }
            let mode = self.mode_of(ty);
            let mut out = Vec::new();
            for ((p, c), (_, inline)) in versions.iter().zip(&canon).zip(&inlined) {
                let what = format!("event type \"{ty}\" version {} ({})", p.version, p.origin);
                check_pointers(&p.meta, inline, &what)?;
                let validator = validation_options()
                    .with_registry(&registry)
                    .with_base_uri(resolve::event_uri(ty))
                    .build(c)
                    .map_err(|e| {
                        SchemaError::new(
                            SchemaErrorKind::InvalidSchema,
                            format!("{what}: the schema does not compile: {}", e.masked()),
                        )
                    })?;
                out.push(EventVersion::new(
                    ty,
                    p.version,
                    p.meta.clone(),
                    bundle(c, &docs),
                    p.schema.clone(),
                    c.clone(),
                    p.origin.clone(),
                    p.mode,
                    validator,
                ));
            }
            types.insert(ty.clone(), EventTypeInfo::new(ty.clone(), mode, out));
        }
        Ok(Catalog::new(
            self.strict,
            types,
            defs.extended,
            defs.canonical,
        ))
    }
}

struct ResolvedDefs {
    /// Definitions with extensions applied, as written (relative references).
    extended: BTreeMap<String, Value>,
    /// The same with canonical references.
    canonical: BTreeMap<String, Value>,
    aliases: HashMap<String, String>,
}

fn check_name(name: &str, what: &str) -> Result<(), SchemaError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(SchemaError::new(
            SchemaErrorKind::InvalidName,
            format!(
                "invalid {what} name \"{name}\": use 1 to 200 ASCII letters, digits, `.`, `_` \
                 or `-`, not starting with `.` or `-`"
            ),
        ))
    }
}

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
const DRAFT_2019_09: &str = "https://json-schema.org/draft/2019-09/schema";
const DRAFT_07: &str = "http://json-schema.org/draft-07/schema";

fn draft_of(schema: &Value, what: &str) -> Result<jsonschema::Draft, SchemaError> {
    let Some(s) = schema.get("$schema") else {
        return Ok(jsonschema::Draft::Draft202012);
    };
    let norm = s.as_str().unwrap_or("").trim_end_matches('#').replace(
        "https://json-schema.org/draft-07",
        "http://json-schema.org/draft-07",
    );
    match norm.as_str() {
        DRAFT_2020_12 => Ok(jsonschema::Draft::Draft202012),
        DRAFT_2019_09 => Ok(jsonschema::Draft::Draft201909),
        DRAFT_07 => Ok(jsonschema::Draft::Draft7),
        _ => Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!(
                "{what}: unsupported \"$schema\" {s}; use {DRAFT_2020_12} (the default), \
                 {DRAFT_2019_09} or {DRAFT_07}#"
            ),
        )),
    }
}

/// Numeric `format`s that `schemars` writes for Rust integer and float types. They describe
/// numbers, and `format` only ever checks strings, so they are known and check nothing.
const NUMERIC_FORMATS: &[&str] = &[
    "int", "int8", "int16", "int32", "int64", "int128", "uint", "uint8", "uint16", "uint32",
    "uint64", "uint128", "float", "double",
];

/// Validator options shared by every compiled schema: formats asserted, unknown ones refused.
fn validation_options<'a>() -> jsonschema::ValidationOptions<'a> {
    let mut options = jsonschema::options()
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false);
    for f in NUMERIC_FORMATS {
        options = options.with_format(*f, |_: &str| true);
    }
    options
}

/// Meta-schema validation, supported draft, known formats.
fn check_document(schema: &Value, what: &str, event: bool) -> Result<(), SchemaError> {
    if event && !schema.is_object() {
        return Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!("{what}: an event schema must be a JSON object"),
        ));
    }
    if !schema.is_object() && !schema.is_boolean() {
        return Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!("{what}: a schema must be a JSON object or a boolean"),
        ));
    }
    let draft = draft_of(schema, what)?;
    if let Err(e) = jsonschema::meta::validate(schema) {
        let at = e.instance_path().as_str().to_owned();
        return Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!(
                "{what}: not a valid JSON Schema at {}: {e}",
                if at.is_empty() { "the root" } else { &at }
            ),
        ));
    }
    let options = validation_options();
    let mut unknown = Vec::new();
    find_unknown_formats(schema, "", draft, &options, &mut unknown);
    if !unknown.is_empty() {
        return Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!(
                "{what}: unknown format {} (evbus asserts formats, so a misspelt one would \
                 silently accept anything)",
                unknown.join(", ")
            ),
        ));
    }
    Ok(())
}

fn find_unknown_formats(
    schema: &Value,
    at: &str,
    draft: jsonschema::Draft,
    options: &jsonschema::ValidationOptions<'_>,
    out: &mut Vec<String>,
) {
    if let Some(f) = schema.get("format").and_then(Value::as_str)
        && !options.is_known_format(draft, f)
    {
        out.push(format!(
            "\"{f}\" at {}",
            if at.is_empty() { "the root" } else { at }
        ));
    }
    for c in resolve::children(schema) {
        find_unknown_formats(c.value, &format!("{at}{}", c.suffix), draft, options, out);
    }
}

/// Reads `x-evbus-compatibility`, the type's compatibility mode, if the schema declares it.
pub(crate) fn parse_mode(schema: &Value, what: &str) -> Result<Option<Compatibility>, SchemaError> {
    match schema.get(COMPATIBILITY_KEYWORD) {
        None => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|e: String| {
            SchemaError::new(
                SchemaErrorKind::InvalidSchema,
                format!("{what}: \"{COMPATIBILITY_KEYWORD}\": {e}"),
            )
        }),
        Some(v) => Err(SchemaError::new(
            SchemaErrorKind::InvalidSchema,
            format!(
                "{what}: \"{COMPATIBILITY_KEYWORD}\" must be a mode name such as \"BACKWARD\", \
                 not {v}"
            ),
        )),
    }
}

/// The names of the history directories `events/<type>/` (hidden ones skipped).
fn history_dirs(events_dir: &Path) -> Result<Vec<String>, SchemaError> {
    if !events_dir.is_dir() {
        return Ok(Vec::new());
    }
    let io = |e: std::io::Error| {
        SchemaError::new(
            SchemaErrorKind::Io,
            format!("cannot read {}: {e}", events_dir.display()),
        )
        .with_source(e)
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(events_dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() && !name.starts_with('.') {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// The history files `<n>.json` of one type, in increasing version order.
fn read_history(
    dir: &Path,
    ty: &str,
) -> Result<Vec<(u32, std::path::PathBuf, Value)>, SchemaError> {
    let mut out = Vec::new();
    for (stem, path, value) in read_json_files(dir)? {
        let version = stem
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= 1 && stem == v.to_string());
        let Some(version) = version else {
            return Err(SchemaError::new(
                SchemaErrorKind::InvalidName,
                format!(
                    "{}: a file of events/{ty}/ holds one earlier version of \"{ty}\" and is \
                     named after it (1.json, 2.json…), not \"{stem}.json\"",
                    path.display()
                ),
            ));
        };
        out.push((version, path, value));
    }
    out.sort_by_key(|(v, _, _)| *v);
    Ok(out)
}

/// Reads the `x-evbus-*` root keywords.
fn parse_meta(schema: &Value, what: &str) -> Result<(Option<u32>, Meta), SchemaError> {
    let bad =
        |msg: String| SchemaError::new(SchemaErrorKind::InvalidSchema, format!("{what}: {msg}"));
    let version = match schema.get(VERSION_KEYWORD) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(u32::MAX) => Some(n as u32),
            _ => {
                return Err(bad(format!(
                    "\"{VERSION_KEYWORD}\" must be a positive integer, not {v}"
                )));
            }
        },
    };
    let external = match schema.get(EXTERNAL_KEYWORD) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(bad(format!(
                "\"{EXTERNAL_KEYWORD}\" must be true or false, not {v}"
            )));
        }
    };
    let pointers = |kw: &str| -> Result<Option<Vec<String>>, SchemaError> {
        let Some(v) = schema.get(kw) else {
            return Ok(None);
        };
        let Some(items) = v.as_array() else {
            return Err(bad(format!("\"{kw}\" must be an array of JSON pointers")));
        };
        let mut out = Vec::new();
        for item in items {
            match item.as_str() {
                Some(p) if p.starts_with('/') && pointer::tokens(p).is_some() => {
                    out.push(p.to_owned());
                }
                _ => {
                    return Err(bad(format!(
                        "\"{kw}\" must hold JSON pointers into the data such as \
                         \"/order/customer/email\", not {item}"
                    )));
                }
            }
        }
        Ok(Some(out))
    };
    let description = match schema.get("description") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => None,
    };
    Ok((
        version,
        Meta {
            description,
            external,
            redact: pointers(REDACT_KEYWORD)?.unwrap_or_default(),
            allow: pointers(ALLOW_KEYWORD)?,
        },
    ))
}

/// A redact or allow pointer must be one curation can apply: it must not run into a closed
/// object schema that lacks the name, and where the schema is an array the token must be an
/// index or `*` (every element); `-` (the position after the last element) names nothing.
fn check_pointers(meta: &Meta, inlined: &Value, what: &str) -> Result<(), SchemaError> {
    let all = meta
        .redact
        .iter()
        .map(|p| (REDACT_KEYWORD, p))
        .chain(meta.allow.iter().flatten().map(|p| (ALLOW_KEYWORD, p)));
    for (kw, p) in all {
        let tokens = pointer::tokens(p).unwrap_or_default();
        let refuse = |i: usize, why: String| {
            let at: Vec<String> = tokens[..i].iter().map(|t| pointer::escape(t)).collect();
            SchemaError::new(
                SchemaErrorKind::InvalidSchema,
                format!(
                    "{what}: \"{kw}\" pointer {p} cannot be applied at /{}: {why}",
                    at.join("/")
                ),
            )
        };
        let mut schema = inlined;
        for (i, t) in tokens.iter().enumerate() {
            let props = schema.get("properties").and_then(Value::as_object);
            let is_array = schema.get("items").is_some_and(Value::is_object)
                || schema.get("prefixItems").is_some()
                || schema.get("type") == Some(&Value::String("array".into()));
            if let Some(next) = props.and_then(|m| m.get(t)) {
                schema = next;
            } else if is_array {
                if t == "-" {
                    return Err(refuse(
                        i,
                        "\"-\" names no element (it is the position after the last one); \
                         write \"*\" for every element or an index"
                            .to_owned(),
                    ));
                }
                if t != "*" && t.parse::<usize>().is_err() {
                    return Err(refuse(
                        i,
                        format!(
                            "the schema there is an array, so this token must be \"*\" \
                             (every element) or an index, not \"{t}\""
                        ),
                    ));
                }
                match schema.get("items").filter(|s| s.is_object()) {
                    Some(items) => schema = items,
                    None => break,
                }
            } else if t == "*" {
                // Every property: the rest is checked against data, not a single schema.
                break;
            } else if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
                let known: Vec<&str> = props
                    .map(|m| m.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(refuse(
                    i,
                    format!(
                        "it names \"{t}\", which the closed object there does not declare \
                         (it has: {})",
                        known.join(", ")
                    ),
                ));
            } else {
                break;
            }
        }
    }
    Ok(())
}

/// Applies extensions to a definition, refusing conflicts.
fn apply_extensions(name: &str, base: &Value, exts: &[&Extension]) -> Result<Value, SchemaError> {
    if exts.is_empty() {
        return Ok(base.clone());
    }
    let Some(obj) = base.as_object() else {
        return Err(SchemaError::new(
            SchemaErrorKind::ConflictingExtension,
            format!("definition \"{name}\" is a boolean schema and cannot be extended"),
        ));
    };
    if obj.contains_key("$ref")
        && draft_of(base, name).is_ok_and(|d| d == jsonschema::Draft::Draft7)
    {
        return Err(SchemaError::new(
            SchemaErrorKind::ConflictingExtension,
            format!(
                "definition \"{name}\" is a draft-07 `$ref`, whose sibling keywords are \
                 ignored, so it cannot be extended"
            ),
        ));
    }
    let mut out = obj.clone();
    let mut props = out
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut required: Vec<Value> = out
        .get("required")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut added: BTreeMap<&str, &str> = BTreeMap::new();
    for ext in exts {
        for (prop, schema) in &ext.properties {
            match props.get(prop) {
                Some(existing) if existing == schema => {}
                Some(existing) => {
                    let by = added.get(prop.as_str()).map_or_else(
                        || "the definition itself".to_owned(),
                        |o| format!("the extension by {o}"),
                    );
                    return Err(SchemaError::new(
                        SchemaErrorKind::ConflictingExtension,
                        format!(
                            "conflicting extensions of \"{name}\": the extension by {} gives \
                             property \"{prop}\" the schema {schema}, but {by} gives it {existing}",
                            ext.origin
                        ),
                    ));
                }
                None => {
                    props.insert(prop.clone(), schema.clone());
                    added.insert(prop, &ext.origin);
                }
            }
        }
        for r in &ext.required {
            let v = Value::String(r.clone());
            if !required.contains(&v) {
                required.push(v);
            }
        }
    }
    out.insert("properties".to_owned(), Value::Object(props));
    if !required.is_empty() {
        out.insert("required".to_owned(), Value::Array(required));
    }
    Ok(Value::Object(out))
}

/// The schema of a pending version as compiled: for Rust types, nested `$defs` named like a
/// shared definition become references to it.
fn effective_schema(p: &Pending, defs: &BTreeMap<String, Value>) -> Value {
    let mut schema = p.schema.clone();
    if p.from_rust
        && let Some(local) = schema.get_mut("$defs").and_then(Value::as_object_mut)
    {
        for (name, v) in local.iter_mut() {
            if defs.contains_key(name) {
                let mut r = Map::new();
                r.insert(
                    "$ref".to_owned(),
                    Value::String(format!("../definitions/{name}.json")),
                );
                *v = Value::Object(r);
            }
        }
    }
    schema
}

/// Checks version `i` of a type against the earlier ones, as its mode asks.
fn check_versions(
    ty: &str,
    mode: Compatibility,
    inlined: &[(u32, Value)],
    i: usize,
    origins: &[&str],
) -> Result<(), SchemaError> {
    if mode == Compatibility::None || i == 0 {
        return Ok(());
    }
    let (new_v, new) = &inlined[i];
    let earlier: Vec<&(u32, Value)> = if mode.is_transitive() {
        inlined[..i].iter().collect()
    } else {
        vec![&inlined[i - 1]]
    };
    let mut problems: Vec<Incompatibility> = Vec::new();
    for (old_v, old) in earlier.iter().rev().map(|(v, s)| (v, s)) {
        if mode.checks_backward() {
            problems.extend(
                compat::check(old, new)
                    .into_iter()
                    .map(|p| p.in_context("BACKWARD", *new_v, *old_v)),
            );
        }
        if mode.checks_forward() {
            problems.extend(
                compat::check(new, old)
                    .into_iter()
                    .map(|p| p.in_context("FORWARD", *old_v, *new_v)),
            );
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let against: BTreeSet<u32> = earlier.iter().map(|(v, _)| *v).collect();
    let against: Vec<String> = against.iter().map(|v| format!("v{v}")).collect();
    // Files are named (a directory with history); other origins add nothing.
    let origin_of = |j: usize| origins.get(j).copied().unwrap_or("unknown origin");
    let mut named = vec![(*new_v, origin_of(i))];
    if !mode.is_transitive() {
        named.push((inlined[i - 1].0, origin_of(i - 1)));
    }
    let files = if named.iter().any(|(_, o)| o.starts_with("file ")) {
        let list: Vec<String> = named
            .iter()
            .map(|(v, o)| format!("v{v} from {o}"))
            .collect();
        format!("; {}", list.join(", "))
    } else {
        String::new()
    };
    Err(SchemaError::incompatible(
        format!(
            "event type \"{ty}\" version {new_v} is not {mode} compatible with {} ({} breaking \
             change{}{files}):",
            against.join(", "),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
        ),
        problems,
    ))
}

/// A self-contained copy of a canonical event schema: referenced definitions under `$defs`.
fn bundle(event: &Value, docs: &Docs<'_>) -> Value {
    let names = resolve::referenced_definitions(event, docs);
    let local: BTreeSet<String> = event
        .get("$defs")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, v)| {
                    // A pure alias of the shared definition of the same name is replaced.
                    let alias = v.get("$ref").and_then(Value::as_str)
                        == Some(resolve::definition_uri(k).as_str())
                        && v.as_object().is_some_and(|o| o.len() == 1);
                    !alias
                })
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let key = |name: &str| -> String {
        if local.contains(name) {
            format!("evbus.{name}")
        } else {
            name.to_owned()
        }
    };
    let prefix = |k: &DocKey| match k {
        DocKey::Event => "#".to_owned(),
        DocKey::Def(n) => format!("#/$defs/{}", pointer::escape(&key(n))),
    };
    let mut out = resolve::rewrite(event, &DocKey::Event, &prefix);
    if names.is_empty() {
        return out;
    }
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    let defs_entry = obj
        .entry("$defs")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(defs_map) = defs_entry.as_object_mut() {
        for name in &names {
            let Some(def) = docs.defs.get(name) else {
                continue;
            };
            let from = DocKey::Def(name.clone());
            let own = format!("#/$defs/{}", pointer::escape(&key(name)));
            let prefix_in_def = |k: &DocKey| match k {
                DocKey::Event => own.clone(),
                DocKey::Def(n) if n == name => own.clone(),
                DocKey::Def(n) => format!("#/$defs/{}", pointer::escape(&key(n))),
            };
            let mut d = resolve::rewrite(def, &from, &prefix_in_def);
            if let Some(m) = d.as_object_mut() {
                m.remove("$schema");
                m.remove("$id");
            }
            defs_map.insert(key(name), d);
        }
    }
    out
}

fn read_json_files(dir: &Path) -> Result<Vec<(String, std::path::PathBuf, Value)>, SchemaError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let io = |e: std::io::Error, what: &Path| {
        SchemaError::new(
            SchemaErrorKind::Io,
            format!("cannot read {}: {e}", what.display()),
        )
        .with_source(e)
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(e, dir))? {
        let path = entry.map_err(|e| io(e, dir))?.path();
        let is_json = path.extension().is_some_and(|e| e == "json");
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !is_json || hidden {
            continue;
        }
        // A schema file that cannot be read (a link to a missing file, no permission) is an
        // error, not a file to skip: a catalogue missing one of its types would load.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => paths.push(path),
            Ok(_) => {}
            Err(e) if path.is_symlink() => {
                return Err(SchemaError::new(
                    SchemaErrorKind::Io,
                    format!(
                        "{} is a symbolic link to a file that cannot be read: {e}",
                        path.display()
                    ),
                )
                .with_source(e));
            }
            Err(e) => return Err(io(e, &path)),
        }
    }
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let text = std::fs::read_to_string(&path).map_err(|e| io(e, &path))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            SchemaError::new(
                SchemaErrorKind::Parse,
                format!(
                    "{} is not valid JSON (line {}, column {}): {e}",
                    path.display(),
                    e.line(),
                    e.column()
                ),
            )
            .with_source(e)
        })?;
        out.push((stem, path, value));
    }
    Ok(out)
}
