//! Schema evolution: compatibility modes and the rules that decide them.
//!
//! The modes are those of Confluent Schema Registry. A check always asks one question: can a
//! *reader* schema accept every payload that a *writer* schema accepts?
//!
//! | mode | question, for a new version n |
//! |---|---|
//! | `BACKWARD` (default) | n reads data written with n−1 (consumers upgrade first) |
//! | `BACKWARD_TRANSITIVE` | n reads data written with every earlier version |
//! | `FORWARD` | n−1 reads data written with n (producers upgrade first) |
//! | `FORWARD_TRANSITIVE` | every earlier version reads data written with n |
//! | `FULL` | both `BACKWARD` and `FORWARD` against n−1 |
//! | `FULL_TRANSITIVE` | both, against every earlier version |
//! | `NONE` | nothing is checked |
//!
//! [`check`] compares two self-contained schemas keyword by keyword, as Confluent does for
//! JSON Schema, and names each breaking change with Confluent's rule name where it has one:
//!
//! - **Content models.** An object schema is *closed* when `additionalProperties` is `false`,
//!   *open* when it is absent or `true`, *partially open* when it is a schema (or
//!   `patternProperties` cover a name). Adding a property to an open writer model is refused
//!   (`PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL`: old data may already hold that name with any
//!   value) unless the new property's schema accepts anything; adding it to a closed model is
//!   fine. Removing a property is fine for an open reader and refused for a closed one
//!   (`PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL`); with a partially open model, the property
//!   must be covered by the model's schema. A new `patternProperties` pattern applies to the
//!   declared properties it matches as well, and must accept the writer's values for them
//!   (`PATTERN_PROPERTY_ADDED_OVER_DECLARED_PROPERTY`), and the values of the writer's
//!   patterns it may meet, unless both start with literal text that tells them apart (`^x-`,
//!   `^y-`; `PATTERN_PROPERTY_ADDED_OVER_PATTERN_PROPERTY`). Patterns run as the validator runs
//!   them (ECMA-262: lookaround and backreferences included); one that cannot be run is taken
//!   to match. `unevaluatedProperties` counts as the content model
//!   when there is no `additionalProperties` and nothing else in the object schema evaluates
//!   properties once `allOf` and `$ref` are merged (the 2020-12 way to close an event built on
//!   a shared definition: `{"$ref": "../definitions/Base.json", "properties": {…},
//!   "unevaluatedProperties": false}`); beside alternatives or conditionals that evaluate
//!   properties, it is compared as a whole (`UNEVALUATED_PROPERTIES_CHANGED` when it changes).
//! - **Required.** A property newly required by the reader is refused
//!   (`REQUIRED_PROPERTY_ADDED`); a property no longer required is fine.
//! - **Types.** The reader must accept every writer type (`integer` is accepted by `number`):
//!   widening is fine, `TYPE_NARROWED` and `TYPE_CHANGED` are refused.
//! - **Enums and const.** The reader's values must include the writer's (`ENUM_ARRAY_NARROWED`).
//! - **Limits.** `maximum`, `minimum` (and exclusive forms), `maxLength`, `minLength`,
//!   `maxItems`, `minItems`, `maxProperties`, `minProperties` (integers, `5.0` included):
//!   relaxing is fine, tightening or adding one is refused; `multipleOf` must divide the
//!   writer's; `pattern`, `format` added or changed, `uniqueItems` added, dependencies added are
//!   refused. `contains` needs the writer's own `contains`, as many matches (`minContains`,
//!   `MIN_CONTAINS_INCREASED`), and a `maxContains` the writer bounds as tightly, with its own
//!   `maxContains` on the same schema or with `maxItems` (`MAX_CONTAINS_ADDED`,
//!   `MAX_CONTAINS_DECREASED`).
//! - **Combinations.** Every writer alternative of `anyOf`/`oneOf` must be accepted by some
//!   reader alternative (`SUM_TYPE_NARROWED` otherwise; adding alternatives is fine; a writer
//!   `type` of several types counts as one alternative per type). Under a reader's `oneOf`,
//!   writer data must also be kept out of its other alternatives, or it would match two and be
//!   refused (`ONE_OF_OVERLAP`): alternatives are told apart by their types, `const`/`enum`
//!   values, or a required property whose schemas are told apart the same way; `allOf`
//!   conjuncts are merged before comparing, except where a keyword reads the keywords beside
//!   it (`additionalProperties` its object's `properties`, `items` its `prefixItems`, `then`
//!   its `if`, ...): those conjuncts are compared one by one; `not`, `if`/`then`/`else` must
//!   keep their meaning.
//! - **References.** `$ref`s are inlined before comparing (keywords beside a `$ref` are
//!   constraints from 2019-09 on, and ignored in draft-07, as the validator reads them); a
//!   recursive one, a `$dynamicRef` or `$recursiveRef`, and any past 100,000 inlined schema
//!   objects or 64 references deep, is compared as the reference it is
//!   (`REFERENCE_CHANGED`).
//! - **Dialect.** A version written in another JSON Schema draft (`$schema`, 2020-12 when
//!   absent) is refused (`DIALECT_CHANGED`): the same keywords mean other things.
//! - **Unevaluated items.** `unevaluatedItems` added or changed is refused
//!   (`UNEVALUATED_ITEMS_CHANGED`), compared as a whole.
//! - **Annotations** (`description`, `title`, `default`, `examples`, `x-*`…) never matter.
//!   `evbus events diff` names the `x-evbus-…` keywords of a version changed in place, as
//!   they change what the gateway lets out (a compatible change, to review).
//!
//! Differences from Confluent, on purpose: a newly required property that has a `default` is
//! still refused (evbus validates payloads as they are and does not fill in defaults), and
//! changing `format` counts because evbus asserts formats.
//!
//! ```
//! use evbus::schema::compat;
//! use serde_json::json;
//!
//! let v1 = json!({"type": "object", "properties": {"id": {"type": "string"}}});
//! let v2 = json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]});
//! let problems = compat::check(&v1, &v2); // can v2 read v1 data?
//! assert_eq!(problems[0].rule(), "REQUIRED_PROPERTY_ADDED");
//! assert_eq!(problems[0].path(), "/required");
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::pointer;

/// How a new version of an event type must relate to the earlier ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// The new version reads data written with the previous one.
    #[default]
    Backward,
    /// The new version reads data written with every earlier one.
    BackwardTransitive,
    /// The previous version reads data written with the new one.
    Forward,
    /// Every earlier version reads data written with the new one.
    ForwardTransitive,
    /// Backward and forward against the previous version.
    Full,
    /// Backward and forward against every earlier version.
    FullTransitive,
    /// No check.
    None,
}

impl Compatibility {
    /// Every mode, in the order Confluent lists them.
    pub const ALL: [Compatibility; 7] = [
        Compatibility::Backward,
        Compatibility::BackwardTransitive,
        Compatibility::Forward,
        Compatibility::ForwardTransitive,
        Compatibility::Full,
        Compatibility::FullTransitive,
        Compatibility::None,
    ];

    /// The Confluent name: `BACKWARD`, `FULL_TRANSITIVE`…
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
            Compatibility::None => "NONE",
        }
    }

    /// Whether the new version must read older data.
    pub fn checks_backward(self) -> bool {
        matches!(
            self,
            Compatibility::Backward
                | Compatibility::BackwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether older versions must read the new version's data.
    pub fn checks_forward(self) -> bool {
        matches!(
            self,
            Compatibility::Forward
                | Compatibility::ForwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether the new version is checked against every earlier version, not just the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compatibility {
    type Err = String;

    /// Parses a Confluent name, case-insensitively, with `_` or `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        Compatibility::ALL
            .into_iter()
            .find(|m| m.as_str() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown compatibility mode \"{s}\" (one of: {})",
                    Compatibility::ALL.map(|m| m.as_str()).join(", ")
                )
            })
    }
}

/// One change that breaks a compatibility rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Incompatibility {
    path: String,
    rule: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<CheckContext>,
}

/// Which check of a mode found an incompatibility.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct CheckContext {
    direction: &'static str,
    reader: u32,
    writer: u32,
}

impl Incompatibility {
    fn new(path: &str, rule: &'static str, message: String) -> Self {
        Incompatibility {
            path: if path.is_empty() {
                "/".to_owned()
            } else {
                path.to_owned()
            },
            rule,
            message,
            context: None,
        }
    }

    pub(crate) fn in_context(mut self, direction: &'static str, reader: u32, writer: u32) -> Self {
        self.context = Some(CheckContext {
            direction,
            reader,
            writer,
        });
        self
    }

    /// Where in the schema the change is (a JSON pointer into the schema, `/` for its root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The rule broken, in Confluent's vocabulary (`REQUIRED_PROPERTY_ADDED`,
    /// `PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL`, `TYPE_NARROWED`…).
    pub fn rule(&self) -> &'static str {
        self.rule
    }

    /// What changed and why it breaks reading, in words.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For a check made by the catalogue: `BACKWARD` (the new version reading older data) or
    /// `FORWARD` (an older version reading new data).
    pub fn direction(&self) -> Option<&'static str> {
        self.context.as_ref().map(|c| c.direction)
    }
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.context {
            write!(
                f,
                "[{}: v{} reading data written with v{}] ",
                c.direction, c.reader, c.writer
            )?;
        }
        write!(f, "{}: {}: {}", self.path, self.rule, self.message)
    }
}

/// Every change that prevents `reader` from accepting data valid under `writer`. Both schemas
/// must be self-contained (the catalogue passes them with references inlined); an empty list
/// means compatible.
pub fn check(writer: &Value, reader: &Value) -> Vec<Incompatibility> {
    let mut out = Vec::new();
    let (wd, rd) = (dialect(writer), dialect(reader));
    if wd != rd {
        // The same keywords mean other things (next to `$ref`, `items`, `dependencies`…):
        // nothing below can be trusted to say what the change does.
        out.push(Incompatibility::new(
            "/$schema",
            "DIALECT_CHANGED",
            format!(
                "the reader is written in another JSON Schema dialect ({wd} → {rd}); keywords \
                 such as those beside `$ref` or `items` change meaning between drafts, so \
                 the change cannot be checked keyword by keyword: keep the writer's dialect"
            ),
        ));
    }
    compare(writer, reader, "", 0, &mut out);
    out
}

/// The JSON Schema dialect a root schema is written in, normalised (`$schema`, 2020-12 when
/// absent, without a trailing `#`, draft-07 under either scheme).
fn dialect(schema: &Value) -> String {
    match schema.get("$schema").and_then(Value::as_str) {
        None => "https://json-schema.org/draft/2020-12/schema".to_owned(),
        Some(s) => s.trim_end_matches('#').replace(
            "https://json-schema.org/draft-07",
            "http://json-schema.org/draft-07",
        ),
    }
}

const MAX_DEPTH: usize = 64;

const ASSERTIONS: &[&str] = &[
    "type",
    "enum",
    "const",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "format",
    "items",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxProperties",
    "minProperties",
    "required",
    "properties",
    "patternProperties",
    "additionalProperties",
    "unevaluatedProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "$ref",
    "$dynamicRef",
    "$recursiveRef",
];

/// Whether a schema accepts every instance.
fn accepts_anything(s: &Value) -> bool {
    match s {
        Value::Bool(b) => *b,
        Value::Object(m) => !m.keys().any(|k| ASSERTIONS.contains(&k.as_str())),
        _ => true,
    }
}

fn accepts_nothing(s: &Value) -> bool {
    matches!(s, Value::Bool(false))
}

/// Only the assertion keywords of a schema, for equality.
fn assertions(s: &Value) -> Option<Map<String, Value>> {
    s.as_object().map(|m| {
        m.iter()
            .filter(|(k, _)| ASSERTIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

fn compare(w: &Value, r: &Value, path: &str, depth: usize, out: &mut Vec<Incompatibility>) {
    if accepts_anything(r) || accepts_nothing(w) {
        return;
    }
    if depth > MAX_DEPTH {
        if assertions(w) != assertions(r) {
            out.push(Incompatibility::new(
                path,
                "SCHEMA_TOO_DEEP",
                "the schemas differ deeper than 64 levels and cannot be compared".to_owned(),
            ));
        }
        return;
    }
    if accepts_nothing(r) {
        out.push(Incompatibility::new(
            path,
            "FALSE_SCHEMA_ADDED",
            "the reader accepts nothing here (false) but the writer accepts values".to_owned(),
        ));
        return;
    }
    let empty = Map::new();
    let w_obj = w.as_object().unwrap_or(&empty);
    let r_obj = r.as_object().unwrap_or(&empty);
    if assertions(w) == assertions(r) {
        return;
    }
    let w = flatten_all_of(w_obj, Side::Writer);
    let r = flatten_all_of(r_obj, Side::Reader);

    // A writer made of alternatives: each alternative, with the writer's other keywords, must
    // be readable.
    let r_has_alts = r.contains_key("anyOf") || r.contains_key("oneOf");
    if !r_has_alts && let Some(alts) = alternatives(&w) {
        let base = without(&w, &["anyOf", "oneOf"]);
        for alt in &alts {
            let merged = merge_shallow(&base, alt);
            let mut sub = Vec::new();
            compare(
                &Value::Object(merged),
                &Value::Object(r.clone()),
                path,
                depth + 1,
                &mut sub,
            );
            if !sub.is_empty() {
                out.extend(sub);
                return;
            }
        }
        return;
    }

    refs(&w, &r, path, out);
    types(&w, &r, path, out);
    enums(&w, &r, path, out);
    let wt = declared_types(&w);
    let may = |t: &str| match &wt {
        None => true,
        Some(set) => set.contains(t) || (t == "number" && set.contains("integer")),
    };
    if may("number") {
        numbers(&w, &r, path, out);
    }
    if may("string") {
        strings(&w, &r, path, out);
    }
    if may("object") {
        objects(&w, &r, path, depth, out);
    }
    if may("array") {
        arrays(&w, &r, path, depth, out);
    }
    combinators(&w, &r, path, depth, out);
}

fn at(path: &str, token: &str) -> String {
    pointer::push(path, token)
}

fn without(m: &Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn alternatives(m: &Map<String, Value>) -> Option<Vec<Value>> {
    m.get("anyOf")
        .or_else(|| m.get("oneOf"))
        .and_then(Value::as_array)
        .cloned()
}

/// `base` with `alt`'s keywords added; `required` and `properties` are united.
fn merge_shallow(base: &Map<String, Value>, alt: &Value) -> Map<String, Value> {
    let mut out = base.clone();
    let Some(alt) = alt.as_object() else {
        if alt == &Value::Bool(false) {
            return [("not".to_owned(), Value::Object(Map::new()))]
                .into_iter()
                .collect();
        }
        return out;
    };
    for (k, v) in alt {
        match (k.as_str(), out.get_mut(k)) {
            ("required", Some(Value::Array(req))) => {
                for name in v.as_array().into_iter().flatten() {
                    if !req.contains(name) {
                        req.push(name.clone());
                    }
                }
            }
            ("properties", Some(Value::Object(props))) => {
                for (name, s) in v.as_object().into_iter().flatten() {
                    match props.get_mut(name) {
                        Some(existing) if existing != s => {
                            *existing = Value::Object(
                                [(
                                    "allOf".to_owned(),
                                    Value::Array(vec![existing.clone(), s.clone()]),
                                )]
                                .into_iter()
                                .collect(),
                            );
                        }
                        Some(_) => {}
                        None => {
                            props.insert(name.clone(), s.clone());
                        }
                    }
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Merges the `allOf` conjuncts of a schema into it where no keyword collides (`properties`
/// and `required` always merge); the others stay under `allOf`.
/// Keywords whose meaning depends on keywords beside them in the same schema object, with
/// those keywords: `additionalProperties` covers only the names its own object's
/// `properties` and `patternProperties` do not, `items` only the items after its own
/// object's `prefixItems` (and `additionalItems` after an array `items`), `then` and `else`
/// do nothing without their own object's `if`, `minContains` and `maxContains` count its
/// `contains`.
const SIBLING_SENSITIVE: &[(&str, &[&str])] = &[
    ("additionalProperties", &["properties", "patternProperties"]),
    ("items", &["prefixItems"]),
    ("additionalItems", &["items"]),
    ("then", &["if"]),
    ("else", &["if"]),
    ("minContains", &["contains"]),
    ("maxContains", &["contains"]),
];

/// `unevaluatedProperties` and `unevaluatedItems` see what their own object and the
/// subschemas it applies in place (`allOf`, `$ref`, ...) evaluated, but not what the object
/// around them did.
const UNEVALUATED: &[(&str, &[&str])] = &[
    (
        "unevaluatedProperties",
        &["properties", "patternProperties", "additionalProperties"],
    ),
    ("unevaluatedItems", &["prefixItems", "items", "contains"]),
];

/// Whether `child`, a subschema that `parent` applies in place (one of its `allOf`, or the
/// target of its `$ref`), can be written into `parent` without changing what either means:
/// no keyword of one reads keywords of the other that it would not see apart. Merged,
/// `{"properties": {"id": …}, "additionalProperties": false}` and `{"properties": {"note":
/// …}}` would seem to allow `note`, which the first refuses; they stay separate conjuncts,
/// compared one by one. (A parent's `unevaluatedProperties` does see its child's
/// properties: that merge stands.)
pub(crate) fn can_merge(parent: &Map<String, Value>, child: &Map<String, Value>) -> bool {
    let reads = |x: &Map<String, Value>, y: &Map<String, Value>, rules: &[(&str, &[&str])]| {
        rules.iter().any(|(keyword, depends)| {
            x.contains_key(*keyword) && depends.iter().any(|d| y.contains_key(*d))
        })
    };
    !reads(parent, child, SIBLING_SENSITIVE)
        && !reads(child, parent, SIBLING_SENSITIVE)
        && !reads(child, parent, UNEVALUATED)
}

/// Of [`SIBLING_SENSITIVE`], the keywords whose merge makes a schema accept less than the
/// conjuncts apart: apart, `then` without its `if`, `minContains` without its `contains`
/// and `additionalItems` without an array `items` do nothing; merged, they constrain.
const NARROWED_BY_MERGING: &[(&str, &[&str])] = &[
    ("then", &["if"]),
    ("else", &["if"]),
    ("minContains", &["contains"]),
    ("maxContains", &["contains"]),
    ("additionalItems", &["items"]),
];

/// Whether `child` can be merged into `parent` on the *writer's* side of a comparison. The
/// writer may be taken for a schema that accepts more than it does (a change that reads the
/// wider writer reads the real one), never less: merged, an `additionalProperties` seems to
/// allow the other conjunct's properties and `items` to spare its `prefixItems`, which
/// only widens; only [`NARROWED_BY_MERGING`] is kept apart. The reader's side keeps every
/// conjunct whose keywords read the other's apart ([`can_merge`]), or it would seem to
/// accept what it refuses.
fn can_merge_widening(parent: &Map<String, Value>, child: &Map<String, Value>) -> bool {
    let reads = |x: &Map<String, Value>, y: &Map<String, Value>| {
        NARROWED_BY_MERGING.iter().any(|(keyword, depends)| {
            x.contains_key(*keyword) && depends.iter().any(|d| y.contains_key(*d))
        })
    };
    !reads(parent, child) && !reads(child, parent)
}

/// Which side of a comparison a schema is on, for merging its `allOf` ([`flatten_all_of`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The writer: merged where that may only widen it.
    Writer,
    /// The reader: merged only where that changes nothing.
    Reader,
}

fn flatten_all_of(m: &Map<String, Value>, side: Side) -> Map<String, Value> {
    let Some(Value::Array(conjuncts)) = m.get("allOf") else {
        return m.clone();
    };
    let mut out = without(m, &["allOf"]);
    let mut rest = Vec::new();
    for c in conjuncts {
        match c {
            Value::Object(cm) => {
                let cm = flatten_all_of(cm, side);
                let apart = match side {
                    Side::Writer => !can_merge_widening(&out, &cm),
                    Side::Reader => !can_merge(&out, &cm),
                };
                // A keyword both sides have with the same value merges as itself (`$ref` to
                // an object definition next to `"type": "object"`).
                let mergeable = !apart
                    && cm.iter().all(|(k, v)| {
                        out.get(k).is_none_or(|o| o == v)
                            || matches!(k.as_str(), "properties" | "required")
                            || !ASSERTIONS.contains(&k.as_str())
                    });
                if mergeable {
                    out = merge_shallow(&out, &Value::Object(cm));
                } else {
                    rest.push(Value::Object(cm));
                }
            }
            Value::Bool(true) => {}
            other => rest.push(other.clone()),
        }
    }
    if !rest.is_empty() {
        out.insert("allOf".to_owned(), Value::Array(rest));
    }
    out
}

fn refs(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    // A reference left after inlining (recursive, or dynamic: `$dynamicRef` in 2020-12,
    // `$recursiveRef` in 2019-09) is compared as the reference it is.
    for keyword in ["$ref", "$dynamicRef", "$recursiveRef"] {
        let wr = w.get(keyword);
        let unexpanded = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .is_some_and(|s| s.contains(super::resolve::UNEXPANDED_MARK))
        };
        if unexpanded(wr) || unexpanded(r.get(keyword)) {
            out.push(Incompatibility::new(
                &at(path, keyword),
                "SCHEMA_TOO_LARGE",
                "its references expand to more than 100,000 schema objects (or nest more than \
                 64 deep), too many to compare the versions; reference shared definitions \
                 fewer times, or publish the change under a new event type"
                    .to_owned(),
            ));
            continue;
        }
        if let Some(rr) = r.get(keyword)
            && wr != Some(rr)
        {
            out.push(Incompatibility::new(
                &at(path, keyword),
                "REFERENCE_CHANGED",
                format!(
                    "the recursive reference {rr} of the reader does not match the writer's{}",
                    wr.map(|w| format!(" ({w})")).unwrap_or_default()
                ),
            ));
        }
    }
}

/// The types a schema allows, `None` for any. `enum`/`const` without `type` imply theirs.
fn declared_types(m: &Map<String, Value>) -> Option<BTreeSet<String>> {
    match m.get("type") {
        Some(Value::String(t)) => Some([t.clone()].into_iter().collect()),
        Some(Value::Array(ts)) => Some(
            ts.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => enum_values(m).map(|vals| vals.iter().map(|v| value_type(v).to_owned()).collect()),
    }
}

fn value_type(v: &Value) -> &'static str {
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

fn type_list(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn types(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    if !r.contains_key("type") {
        return;
    }
    let Some(rt) = declared_types(r) else { return };
    let accepts = |t: &str| rt.contains(t) || (t == "integer" && rt.contains("number"));
    match declared_types(w) {
        None => out.push(Incompatibility::new(
            &at(path, "type"),
            "TYPE_NARROWED",
            format!(
                "the writer allows any type here, the reader only {}",
                type_list(&rt)
            ),
        )),
        Some(wt) => {
            let lost: BTreeSet<String> = wt.iter().filter(|t| !accepts(t)).cloned().collect();
            if !lost.is_empty() {
                let narrowed = rt
                    .iter()
                    .all(|t| wt.contains(t) || (t == "integer" && wt.contains("number")));
                out.push(Incompatibility::new(
                    &at(path, "type"),
                    if narrowed {
                        "TYPE_NARROWED"
                    } else {
                        "TYPE_CHANGED"
                    },
                    format!(
                        "the type changed from {} to {}: {} written before is refused",
                        type_list(&wt),
                        type_list(&rt),
                        type_list(&lost)
                    ),
                ));
            }
        }
    }
}

fn enum_values(m: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(c) = m.get("const") {
        return Some(vec![c.clone()]);
    }
    m.get("enum").and_then(Value::as_array).cloned()
}

fn enums(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    let Some(re) = enum_values(r) else { return };
    let kw = if r.contains_key("const") {
        "const"
    } else {
        "enum"
    };
    match enum_values(w) {
        None => out.push(Incompatibility::new(
            &at(path, kw),
            "ENUM_ARRAY_NARROWED",
            format!(
                "the reader restricts values to {} where the writer allowed any",
                Value::Array(re)
            ),
        )),
        Some(we) => {
            let lost: Vec<Value> = we.iter().filter(|v| !re.contains(v)).cloned().collect();
            if !lost.is_empty() {
                let narrowed = re.iter().all(|v| we.contains(v));
                out.push(Incompatibility::new(
                    &at(path, kw),
                    if narrowed {
                        "ENUM_ARRAY_NARROWED"
                    } else {
                        "ENUM_ARRAY_CHANGED"
                    },
                    format!(
                        "values {} were allowed and are no longer",
                        Value::Array(lost)
                    ),
                ));
            }
        }
    }
}

fn num(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(Value::as_f64)
}

/// The tightest bound of one side: (value, exclusive).
fn bound(
    m: &Map<String, Value>,
    inclusive: &str,
    exclusive: &str,
    upper: bool,
) -> Option<(f64, bool)> {
    let a = num(m, inclusive).map(|v| (v, false));
    let b = num(m, exclusive).map(|v| (v, true));
    match (a, b) {
        (Some(a), Some(b)) => {
            let tighter_b = if upper { b.0 <= a.0 } else { b.0 >= a.0 };
            Some(if tighter_b { b } else { a })
        }
        (x, None) | (None, x) => x,
    }
}

fn numbers(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    for (upper, inc, exc) in [
        (true, "maximum", "exclusiveMaximum"),
        (false, "minimum", "exclusiveMinimum"),
    ] {
        for (kw, r_exclusive) in [(inc, false), (exc, true)] {
            let Some(rv) = num(r, kw) else { continue };
            let rule_base = if r_exclusive {
                if upper {
                    "EXCLUSIVE_MAXIMUM"
                } else {
                    "EXCLUSIVE_MINIMUM"
                }
            } else if upper {
                "MAXIMUM"
            } else {
                "MINIMUM"
            };
            match bound(w, inc, exc, upper) {
                None => out.push(Incompatibility::new(
                    &at(path, kw),
                    rule_name(rule_base, "_ADDED"),
                    format!("the reader adds the limit {kw} {rv} that the writer did not have"),
                )),
                Some((wv, w_exclusive)) => {
                    let ok = if upper {
                        wv < rv || (wv == rv && (w_exclusive || !r_exclusive))
                    } else {
                        wv > rv || (wv == rv && (w_exclusive || !r_exclusive))
                    };
                    if !ok {
                        out.push(Incompatibility::new(
                            &at(path, kw),
                            rule_name(rule_base, if upper { "_DECREASED" } else { "_INCREASED" }),
                            format!(
                                "{kw} tightened to {rv} (the writer allowed up to {}{wv})",
                                if w_exclusive { "but excluding " } else { "" }
                            ),
                        ));
                    }
                }
            }
        }
    }
    if let Some(rv) = num(r, "multipleOf") {
        match num(w, "multipleOf") {
            None => out.push(Incompatibility::new(
                &at(path, "multipleOf"),
                "MULTIPLE_OF_ADDED",
                format!("the reader requires multiples of {rv}"),
            )),
            Some(wv) => {
                let q = wv / rv;
                if (q - q.round()).abs() > 1e-9 {
                    out.push(Incompatibility::new(
                        &at(path, "multipleOf"),
                        "MULTIPLE_OF_CHANGED",
                        format!("multipleOf changed from {wv} to {rv}, which does not divide it"),
                    ));
                }
            }
        }
    }
}

/// Rule names are `'static`: the few composed ones are interned here.
fn rule_name(base: &str, suffix: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "MAXIMUM_ADDED",
        "MAXIMUM_DECREASED",
        "MINIMUM_ADDED",
        "MINIMUM_INCREASED",
        "EXCLUSIVE_MAXIMUM_ADDED",
        "EXCLUSIVE_MAXIMUM_DECREASED",
        "EXCLUSIVE_MINIMUM_ADDED",
        "EXCLUSIVE_MINIMUM_INCREASED",
        "MAX_LENGTH_ADDED",
        "MAX_LENGTH_DECREASED",
        "MIN_LENGTH_ADDED",
        "MIN_LENGTH_INCREASED",
        "MAX_ITEMS_ADDED",
        "MAX_ITEMS_DECREASED",
        "MIN_ITEMS_ADDED",
        "MIN_ITEMS_INCREASED",
        "MAX_PROPERTIES_ADDED",
        "MAX_PROPERTIES_DECREASED",
        "MIN_PROPERTIES_ADDED",
        "MIN_PROPERTIES_INCREASED",
    ];
    let full = format!("{base}{suffix}");
    NAMES
        .iter()
        .find(|n| **n == full)
        .copied()
        .unwrap_or("LIMIT_CHANGED")
}

/// A count keyword's value (`maxLength`…): a non-negative integer, which JSON Schema lets
/// be written `5.0` as well as `5`.
fn as_count(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// An integer limit (`maxLength`…): the reader's must not be tighter than the writer's.
fn limit(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    kw: &str,
    upper: bool,
    rule_base: &str,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    let Some(rv) = r.get(kw).and_then(as_count) else {
        return;
    };
    if !upper && rv == 0 {
        return;
    }
    match w.get(kw).and_then(as_count) {
        None => out.push(Incompatibility::new(
            &at(path, kw),
            rule_name(rule_base, "_ADDED"),
            format!("the reader adds {kw} {rv} that the writer did not have"),
        )),
        Some(wv) if (upper && wv > rv) || (!upper && wv < rv) => out.push(Incompatibility::new(
            &at(path, kw),
            rule_name(rule_base, if upper { "_DECREASED" } else { "_INCREASED" }),
            format!("{kw} tightened from {wv} to {rv}"),
        )),
        Some(_) => {}
    }
}

fn strings(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Incompatibility>,
) {
    limit(w, r, "maxLength", true, "MAX_LENGTH", path, out);
    limit(w, r, "minLength", false, "MIN_LENGTH", path, out);
    for (kw, added, changed) in [
        ("pattern", "PATTERN_ADDED", "PATTERN_CHANGED"),
        ("format", "FORMAT_ADDED", "FORMAT_CHANGED"),
    ] {
        let Some(rv) = r.get(kw) else { continue };
        match w.get(kw) {
            None => out.push(Incompatibility::new(
                &at(path, kw),
                added,
                format!("the reader adds {kw} {rv} that the writer did not have"),
            )),
            Some(wv) if wv != rv => out.push(Incompatibility::new(
                &at(path, kw),
                changed,
                format!("{kw} changed from {wv} to {rv}"),
            )),
            Some(_) => {}
        }
    }
}

/// How an object schema treats a property name it does not declare in `properties`.
enum Cover<'a> {
    /// Refused, by the keyword named (`additionalProperties` or `unevaluatedProperties`).
    Closed(&'static str),
    Open,
    Schema(&'a Value),
}

/// The schema an object schema applies to the property names it does not declare in
/// `properties` or `patternProperties`, with its keyword: `additionalProperties`, or
/// `unevaluatedProperties` when that is the only one and nothing else in the schema
/// (`allOf`, `anyOf`, `oneOf`, `if`/`then`/`else`, `dependentSchemas`, a recursive `$ref`)
/// evaluates properties. Then the two mean the same: `unevaluatedProperties: false` is how
/// 2020-12 closes a model built with `$ref`/`allOf`, which the comparison has already merged.
/// `None`: the model is open (or `unevaluatedProperties` depends on more than this schema,
/// which [`objects`] then compares as a whole).
fn rest(m: &Map<String, Value>) -> Option<(&'static str, &Value)> {
    if let Some(ap) = m.get("additionalProperties") {
        return Some(("additionalProperties", ap));
    }
    let up = m.get("unevaluatedProperties")?;
    let elsewhere = m.contains_key("$ref")
        || m.contains_key("$dynamicRef")
        || [
            "allOf",
            "anyOf",
            "oneOf",
            "if",
            "then",
            "else",
            "dependentSchemas",
        ]
        .iter()
        .any(|k| m.get(*k).is_some_and(mentions_properties));
    (!elsewhere).then_some(("unevaluatedProperties", up))
}

/// Whether a schema (or anything under it) says something about object properties.
fn mentions_properties(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.iter().any(|(k, v)| {
            matches!(
                k.as_str(),
                "properties"
                    | "patternProperties"
                    | "additionalProperties"
                    | "unevaluatedProperties"
                    | "$ref"
                    | "$dynamicRef"
            ) || mentions_properties(v)
        }),
        Value::Array(a) => a.iter().any(mentions_properties),
        _ => false,
    }
}

/// Whether the ECMA-262 `pattern` of `patternProperties` matches `name`, with the regex
/// engine the validator uses for what `regex` cannot run (lookaround, backreferences);
/// `None` when neither compiles it (callers take the cautious side).
fn pattern_matches(pattern: &str, name: &str) -> Option<bool> {
    match regex::Regex::new(pattern) {
        Ok(re) => Some(re.is_match(name)),
        Err(_) => fancy_regex::Regex::new(pattern)
            .ok()
            .and_then(|re| re.is_match(name).ok()),
    }
}

/// Whether no name can match both patterns, as far as their anchored literal starts show
/// (`^x-` and `^y-`); `false` when that cannot be told.
fn patterns_disjoint(a: &str, b: &str) -> bool {
    // The literal text after `^`, up to the first character with a meaning in a regex.
    let start = |p: &str| -> Option<String> {
        // An alternation may match anywhere.
        let rest = p.strip_prefix('^').filter(|_| !p.contains('|'))?;
        let plain = |c: &char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '/');
        let mut literal: String = rest.chars().take_while(plain).collect();
        // A quantifier after it may leave its last character out.
        if rest[literal.len()..].starts_with(['?', '*', '{']) {
            literal.pop();
        }
        Some(literal)
    };
    match (start(a), start(b)) {
        (Some(x), Some(y)) => !x.starts_with(&y) && !y.starts_with(&x),
        _ => false,
    }
}

fn cover<'a>(m: &'a Map<String, Value>, name: &str) -> Cover<'a> {
    if let Some(pp) = m.get("patternProperties").and_then(Value::as_object) {
        for (pattern, s) in pp {
            if pattern_matches(pattern, name) != Some(false) {
                return Cover::Schema(s);
            }
        }
    }
    match rest(m) {
        None | Some((_, Value::Bool(true))) => Cover::Open,
        Some((kw, Value::Bool(false))) => Cover::Closed(kw),
        Some((_, s)) if accepts_anything(s) => Cover::Open,
        Some((_, s)) => Cover::Schema(s),
    }
}

fn str_set(m: &Map<String, Value>, k: &str) -> BTreeSet<String> {
    m.get(k)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

fn objects(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    depth: usize,
    out: &mut Vec<Incompatibility>,
) {
    let empty = Map::new();
    let wp = w
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let rp = r
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let wreq = str_set(w, "required");
    let rreq = str_set(r, "required");

    for name in rreq.difference(&wreq) {
        out.push(Incompatibility::new(
            &at(path, "required"),
            "REQUIRED_PROPERTY_ADDED",
            format!(
                "property \"{name}\" is required by the reader but not by the writer: data \
                 without it is refused"
            ),
        ));
    }

    for (name, rs) in rp {
        let p = at(&at(path, "properties"), name);
        if let Some(ws) = wp.get(name) {
            compare(ws, rs, &p, depth + 1, out);
            continue;
        }
        match cover(w, name) {
            Cover::Closed(_) => {} // PROPERTY_ADDED_TO_CLOSED_CONTENT_MODEL: compatible.
            Cover::Open if accepts_anything(rs) => {}
            Cover::Open => out.push(Incompatibility::new(
                &p,
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                format!(
                    "property \"{name}\" is new, but the writer's content model is open \
                     (additionalProperties is not false), so data written with it may already \
                     hold \"{name}\" with any value; close the model or give the property an \
                     empty schema"
                ),
            )),
            Cover::Schema(ws) => {
                let mut sub = Vec::new();
                compare(ws, rs, &p, depth + 1, &mut sub);
                if !sub.is_empty() {
                    out.push(Incompatibility::new(
                        &p,
                        "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                        format!(
                            "property \"{name}\" is new and its schema does not accept every \
                             value the writer's partially open model allowed: {}",
                            summary(&sub)
                        ),
                    ));
                }
            }
        }
    }

    for (name, ws) in wp {
        if rp.contains_key(name) || accepts_nothing(ws) {
            continue;
        }
        let p = at(&at(path, "properties"), name);
        match cover(r, name) {
            Cover::Open => {} // PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL: compatible.
            Cover::Closed(kw) => out.push(Incompatibility::new(
                &p,
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                format!(
                    "property \"{name}\" was removed, but the reader's content model is closed \
                     ({kw}: false), so data that has \"{name}\" is refused"
                ),
            )),
            Cover::Schema(rs) => {
                let mut sub = Vec::new();
                compare(ws, rs, &p, depth + 1, &mut sub);
                if !sub.is_empty() {
                    out.push(Incompatibility::new(
                        &p,
                        "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                        format!(
                            "property \"{name}\" was removed and the reader's partially open \
                             model does not accept its values: {}",
                            summary(&sub)
                        ),
                    ));
                }
            }
        }
    }

    // What happens to names neither side declares.
    let w_rest = rest(w);
    let r_rest = rest(r);
    let w_ap = w_rest.map(|(_, s)| s);
    let r_ap = r_rest.map(|(_, s)| s);
    let w_open = w_ap.is_none_or(accepts_anything);
    // `unevaluatedProperties` in the reader's place of `additionalProperties` keeps its rule.
    let r_kw = r_rest.map_or("additionalProperties", |(kw, _)| kw);
    let by_ap = r_kw == "additionalProperties";
    match r_ap {
        Some(Value::Bool(false)) if !matches!(w_ap, Some(Value::Bool(false))) => {
            out.push(Incompatibility::new(
                &at(path, r_kw),
                if by_ap {
                    "ADDITIONAL_PROPERTIES_REMOVED"
                } else {
                    "UNEVALUATED_PROPERTIES_CHANGED"
                },
                format!(
                    "the reader closed the content model ({r_kw}: false), so data with \
                     properties it does not declare is refused"
                ),
            ));
        }
        Some(rs) if !accepts_anything(rs) && !accepts_nothing(rs) => {
            if w_open {
                out.push(Incompatibility::new(
                    &at(path, r_kw),
                    if by_ap {
                        "ADDITIONAL_PROPERTIES_NARROWED"
                    } else {
                        "UNEVALUATED_PROPERTIES_CHANGED"
                    },
                    format!(
                        "the reader constrains undeclared properties ({r_kw}) that the writer \
                         left open"
                    ),
                ));
            } else if let Some(ws) = w_ap.filter(|s| !accepts_nothing(s)) {
                compare(ws, rs, &at(path, r_kw), depth + 1, out);
            }
        }
        _ => {}
    }

    // patternProperties.
    let wpp = w
        .get("patternProperties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let rpp = r
        .get("patternProperties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (pat, rs) in rpp {
        let p = at(&at(path, "patternProperties"), pat);
        if let Some(ws) = wpp.get(pat) {
            compare(ws, rs, &p, depth + 1, out);
        } else if w_open && !accepts_anything(rs) {
            out.push(Incompatibility::new(
                &p,
                "PATTERN_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                format!(
                    "the reader constrains properties matching {pat:?}, which the writer's open \
                     model allowed with any value"
                ),
            ));
        } else {
            if let Some(ws) = w_ap.filter(|s| !accepts_nothing(s) && !accepts_anything(s)) {
                compare(ws, rs, &p, depth + 1, out);
            }
            // The names the writer's other patterns let through, where its model is closed:
            // a new pattern that may match them must accept what those patterns accepted.
            if !w_open {
                for (wpat, ws) in wpp.iter().filter(|(wpat, _)| !patterns_disjoint(wpat, pat)) {
                    let mut sub = Vec::new();
                    compare(ws, rs, &p, depth + 1, &mut sub);
                    if !sub.is_empty() {
                        out.push(Incompatibility::new(
                            &p,
                            "PATTERN_PROPERTY_ADDED_OVER_PATTERN_PROPERTY",
                            format!(
                                "the reader's new pattern {pat:?} may match names of the \
                                 writer's pattern {wpat:?} too, and refuses values the writer \
                                 allowed there: {}",
                                summary(&sub)
                            ),
                        ));
                    }
                }
            }
            // A pattern applies to the declared properties it matches too, on top of their
            // own schemas: a new one must accept what the writer declared under such names.
            // A pattern this check cannot run is taken to match them.
            for (name, ws) in wp
                .iter()
                .filter(|(name, _)| pattern_matches(pat, name) != Some(false))
            {
                let mut sub = Vec::new();
                compare(ws, rs, &p, depth + 1, &mut sub);
                if !sub.is_empty() {
                    out.push(Incompatibility::new(
                        &p,
                        "PATTERN_PROPERTY_ADDED_OVER_DECLARED_PROPERTY",
                        format!(
                            "the reader's new pattern {pat:?} applies to the declared property \
                             \"{name}\" as well, and refuses values the writer allowed there: {}",
                            summary(&sub)
                        ),
                    ));
                }
            }
        }
    }
    for (pat, ws) in wpp {
        if rpp.contains_key(pat) || accepts_nothing(ws) {
            continue;
        }
        match r_ap {
            None | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => out.push(Incompatibility::new(
                &at(&at(path, "patternProperties"), pat),
                "PATTERN_PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                format!(
                    "properties matching {pat:?} were allowed by the writer and the reader's \
                     closed model refuses them"
                ),
            )),
            Some(rs) => compare(
                ws,
                rs,
                &at(&at(path, "patternProperties"), pat),
                depth + 1,
                out,
            ),
        }
    }

    limit(w, r, "maxProperties", true, "MAX_PROPERTIES", path, out);
    limit(w, r, "minProperties", false, "MIN_PROPERTIES", path, out);

    // dependentRequired and draft-07 dependencies.
    for kw in ["dependentRequired", "dependencies"] {
        let Some(rd) = r.get(kw).and_then(Value::as_object) else {
            continue;
        };
        let wd = w.get(kw).and_then(Value::as_object).unwrap_or(&empty);
        for (k, rv) in rd {
            let p = at(&at(path, kw), k);
            match rv {
                Value::Array(names) => {
                    let have: Vec<&Value> = wd
                        .get(k)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .collect();
                    let added: Vec<&Value> = names.iter().filter(|n| !have.contains(n)).collect();
                    if !added.is_empty() {
                        out.push(Incompatibility::new(
                            &p,
                            if wd.contains_key(k) {
                                "DEPENDENCY_ARRAY_EXTENDED"
                            } else {
                                "DEPENDENCY_ARRAY_ADDED"
                            },
                            format!(
                                "when \"{k}\" is present the reader also requires {}",
                                added
                                    .iter()
                                    .map(|v| v.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
                rs => dependent_schema(wd.get(k), rs, k, &p, depth, out),
            }
        }
    }
    if let Some(rd) = r.get("dependentSchemas").and_then(Value::as_object) {
        let wd = w
            .get("dependentSchemas")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for (k, rs) in rd {
            let p = at(&at(path, "dependentSchemas"), k);
            dependent_schema(wd.get(k), rs, k, &p, depth, out);
        }
    }

    if let Some(rs) = r.get("propertyNames") {
        match w.get("propertyNames") {
            Some(ws) => compare(ws, rs, &at(path, "propertyNames"), depth + 1, out),
            None if !accepts_anything(rs) => out.push(Incompatibility::new(
                &at(path, "propertyNames"),
                "PROPERTY_NAMES_ADDED",
                "the reader constrains property names that the writer did not".to_owned(),
            )),
            None => {}
        }
    }

    // Compared above when it is the reader's content model; otherwise as a whole.
    if by_ap
        && let Some(ru) = r.get("unevaluatedProperties")
        && w.get("unevaluatedProperties") != Some(ru)
        && !accepts_anything(ru)
    {
        out.push(Incompatibility::new(
            &at(path, "unevaluatedProperties"),
            "UNEVALUATED_PROPERTIES_CHANGED",
            "the reader constrains unevaluated properties differently from the writer".to_owned(),
        ));
    }
}

fn dependent_schema(
    ws: Option<&Value>,
    rs: &Value,
    k: &str,
    p: &str,
    depth: usize,
    out: &mut Vec<Incompatibility>,
) {
    match ws {
        Some(ws) if ws.is_object() || ws.is_boolean() => compare(ws, rs, p, depth + 1, out),
        _ if accepts_anything(rs) => {}
        _ => out.push(Incompatibility::new(
            p,
            "DEPENDENCY_SCHEMA_ADDED",
            format!("when \"{k}\" is present the reader applies a schema the writer did not"),
        )),
    }
}

/// Tuple and rest item schemas of an array schema (draft-07 and 2020-12 forms).
fn item_schemas(m: &Map<String, Value>) -> (Vec<Value>, Value) {
    let t = Value::Bool(true);
    if let Some(Value::Array(prefix)) = m.get("prefixItems") {
        return (prefix.clone(), m.get("items").cloned().unwrap_or(t));
    }
    match m.get("items") {
        Some(Value::Array(prefix)) => (
            prefix.clone(),
            m.get("additionalItems").cloned().unwrap_or(t),
        ),
        Some(items) => (Vec::new(), items.clone()),
        None => (Vec::new(), t),
    }
}

fn arrays(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    depth: usize,
    out: &mut Vec<Incompatibility>,
) {
    let (wp, wrest) = item_schemas(w);
    let (rp, rrest) = item_schemas(r);
    let tuple_kw = if r.contains_key("prefixItems") {
        "prefixItems"
    } else {
        "items"
    };
    for i in 0..wp.len().max(rp.len()) {
        let ws = wp.get(i).unwrap_or(&wrest);
        let rs = rp.get(i).unwrap_or(&rrest);
        compare(
            ws,
            rs,
            &at(&at(path, tuple_kw), &i.to_string()),
            depth + 1,
            out,
        );
    }
    let rest_kw = if rp.is_empty() || r.contains_key("prefixItems") {
        "items"
    } else {
        "additionalItems"
    };
    compare(&wrest, &rrest, &at(path, rest_kw), depth + 1, out);

    limit(w, r, "maxItems", true, "MAX_ITEMS", path, out);
    limit(w, r, "minItems", false, "MIN_ITEMS", path, out);
    if r.get("uniqueItems") == Some(&Value::Bool(true))
        && w.get("uniqueItems") != Some(&Value::Bool(true))
    {
        out.push(Incompatibility::new(
            &at(path, "uniqueItems"),
            "UNIQUE_ITEMS_ADDED",
            "the reader requires unique items; the writer allowed duplicates".to_owned(),
        ));
    }
    contains(w, r, path, depth, out);
    // Items no other keyword evaluated: compared as a whole, as `unevaluatedProperties`
    // beside alternatives.
    if let Some(ru) = r.get("unevaluatedItems")
        && w.get("unevaluatedItems") != Some(ru)
        && !accepts_anything(ru)
    {
        out.push(Incompatibility::new(
            &at(path, "unevaluatedItems"),
            "UNEVALUATED_ITEMS_CHANGED",
            "the reader constrains unevaluated items differently from the writer".to_owned(),
        ));
    }
}

/// `contains` with `minContains` (default 1) and `maxContains`: how many items must match.
fn contains(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    depth: usize,
    out: &mut Vec<Incompatibility>,
) {
    let Some(rc) = r.get("contains") else { return };
    let wc = w.get("contains");
    let count = |m: &Map<String, Value>, kw: &str| m.get(kw).and_then(as_count);
    let r_min = count(r, "minContains").unwrap_or(1);
    let w_min = wc.map_or(0, |_| count(w, "minContains").unwrap_or(1));
    let mut sub = Vec::new();
    if let Some(wc) = wc {
        compare(wc, rc, &at(path, "contains"), depth + 1, &mut sub);
    }
    if r_min > 0 {
        match wc {
            // Items the writer guarantees match the reader's `contains` only if it accepts them.
            Some(_) if !sub.is_empty() => out.append(&mut sub),
            Some(_) if w_min < r_min => out.push(Incompatibility::new(
                &at(path, "minContains"),
                "MIN_CONTAINS_INCREASED",
                format!(
                    "the reader requires at least {r_min} items matching \"contains\", the \
                     writer only {w_min}"
                ),
            )),
            Some(_) => {}
            None => out.push(Incompatibility::new(
                &at(path, "contains"),
                "CONTAINS_ADDED",
                "the reader requires an item matching \"contains\"; the writer did not".to_owned(),
            )),
        }
    }
    // At most `maxContains` items may match: the writer must bound the same items as tightly.
    if let Some(r_max) = count(r, "maxContains") {
        let same_items = wc.is_some_and(|wc| assertions(wc) == assertions(rc));
        let w_max = count(w, "maxContains")
            .filter(|_| same_items)
            .into_iter()
            .chain(count(w, "maxItems"))
            .min();
        match w_max {
            Some(w_max) if w_max <= r_max => {}
            Some(w_max) => out.push(Incompatibility::new(
                &at(path, "maxContains"),
                "MAX_CONTAINS_DECREASED",
                format!(
                    "the reader allows at most {r_max} items matching \"contains\", the \
                     writer up to {w_max}"
                ),
            )),
            None => out.push(Incompatibility::new(
                &at(path, "maxContains"),
                "MAX_CONTAINS_ADDED",
                format!(
                    "the reader allows at most {r_max} items matching \"contains\"; the \
                     writer set no such limit"
                ),
            )),
        }
    }
}

fn combinators(
    w: &Map<String, Value>,
    r: &Map<String, Value>,
    path: &str,
    depth: usize,
    out: &mut Vec<Incompatibility>,
) {
    // anyOf / oneOf in the reader: every writer alternative must fit one reader alternative;
    // under oneOf it must also be kept out of the reader's other alternatives.
    for kw in ["anyOf", "oneOf"] {
        let Some(r_alts) = r.get(kw).and_then(Value::as_array) else {
            continue;
        };
        let base = without(w, &["anyOf", "oneOf"]);
        let w_alts: Vec<Map<String, Value>> = match alternatives(w) {
            Some(alts) => alts.iter().map(|a| merge_shallow(&base, a)).collect(),
            None => vec![base.clone()],
        };
        // A writer alternative of several types is read as one alternative per type (a value
        // has one of them), so `type: [T, "null"]` fits `anyOf: [T, null]`.
        let w_alts: Vec<(usize, Map<String, Value>)> = w_alts
            .into_iter()
            .enumerate()
            .flat_map(|(i, wa)| by_type(wa).into_iter().map(move |part| (i, part)))
            .collect();
        let r_base = without(r, &["anyOf", "oneOf"]);
        for (i, wa) in &w_alts {
            let wa = Value::Object(wa.clone());
            let mut best: Option<Vec<Incompatibility>> = None;
            let mut fits = None;
            for (j, ra) in r_alts.iter().enumerate() {
                let mut sub = Vec::new();
                compare(&wa, ra, &at(path, kw), depth + 1, &mut sub);
                if sub.is_empty() {
                    best = None;
                    fits = Some(j);
                    break;
                }
                if best.as_ref().is_none_or(|b| sub.len() < b.len()) {
                    best = Some(sub);
                }
            }
            let writer = if alternatives(w).is_some() {
                format!("writer alternative {}", i + 1)
            } else {
                "the writer's schema".to_owned()
            };
            if let Some(closest) = best {
                out.push(Incompatibility::new(
                    &at(path, kw),
                    "SUM_TYPE_NARROWED",
                    format!(
                        "{writer} is accepted by none of the reader's {} alternatives (closest: {})",
                        r_alts.len(),
                        summary(&closest)
                    ),
                ));
            }
            if kw == "oneOf"
                && let Some(j) = fits
                && let Some(k) = one_of_overlap(w, *i, &wa, &r_base, r_alts, j)
            {
                out.push(Incompatibility::new(
                    &at(&at(path, kw), &k.to_string()),
                    "ONE_OF_OVERLAP",
                    format!(
                        "{writer} fits the reader's oneOf alternative {} but may also match \
                         alternative {}, and a value matching two alternatives of a oneOf is \
                         refused; keep the alternatives apart (different types, or a required \
                         property with different const/enum values)",
                        j + 1,
                        k + 1
                    ),
                ));
            }
        }
    }
    // allOf conjuncts that could not be merged: each must accept the writer.
    if let Some(r_all) = r.get("allOf").and_then(Value::as_array) {
        let wv = Value::Object(w.clone());
        for (i, rc) in r_all.iter().enumerate() {
            let mut sub = Vec::new();
            compare(
                &wv,
                rc,
                &at(&at(path, "allOf"), &i.to_string()),
                depth + 1,
                &mut sub,
            );
            if !sub.is_empty() {
                out.push(Incompatibility::new(
                    &at(&at(path, "allOf"), &i.to_string()),
                    "PRODUCT_TYPE_EXTENDED",
                    format!(
                        "a reader allOf member refuses writer data: {}",
                        summary(&sub)
                    ),
                ));
            }
        }
    }
    // not: the reader must exclude no more than the writer.
    if let Some(rn) = r.get("not") {
        match w.get("not") {
            Some(wn) => {
                let mut sub = Vec::new();
                compare(rn, wn, &at(path, "not"), depth + 1, &mut sub);
                if !sub.is_empty() {
                    out.push(Incompatibility::new(
                        &at(path, "not"),
                        "NOT_TYPE_EXTENDED",
                        "the reader's \"not\" excludes values the writer's did not".to_owned(),
                    ));
                }
            }
            None => out.push(Incompatibility::new(
                &at(path, "not"),
                "NOT_TYPE_ADDED",
                "the reader adds a \"not\" that excludes values the writer allowed".to_owned(),
            )),
        }
    }
    // if/then/else: compared as a whole.
    let cond = |m: &Map<String, Value>| {
        (
            m.get("if").cloned(),
            m.get("then").cloned(),
            m.get("else").cloned(),
        )
    };
    let rc = cond(r);
    if rc.0.is_some() && rc != cond(w) {
        out.push(Incompatibility::new(
            &at(path, "if"),
            "CONDITIONAL_CHANGED",
            "the reader's if/then/else differs from the writer's".to_owned(),
        ));
    }
}

/// `m` split into one schema per type when its `type` lists several (each value has one type).
fn by_type(m: Map<String, Value>) -> Vec<Map<String, Value>> {
    match m.get("type") {
        Some(Value::Array(ts)) if ts.len() > 1 => ts
            .iter()
            .map(|t| {
                let mut part = m.clone();
                part.insert("type".to_owned(), t.clone());
                part
            })
            .collect(),
        _ => vec![m],
    }
}

/// The first reader `oneOf` alternative, other than `fits` (the one that accepts writer
/// alternative `i`), that writer data of `wa` may also match. Reader alternatives the writer
/// already had among its own `oneOf` alternatives, other than `i` itself, are no new overlap:
/// writer data matched exactly one of those.
fn one_of_overlap(
    w: &Map<String, Value>,
    i: usize,
    wa: &Value,
    r_base: &Map<String, Value>,
    r_alts: &[Value],
    fits: usize,
) -> Option<usize> {
    // Index `i` counts the writer's alternatives as `alternatives` gives them: its `oneOf`
    // only when it has no `anyOf` beside it. Otherwise nothing is known to be exclusive.
    let w_one_of = w
        .get("oneOf")
        .and_then(Value::as_array)
        .filter(|_| !w.contains_key("anyOf"));
    let fit = Value::Object(merge_shallow(r_base, &r_alts[fits]));
    (0..r_alts.len()).find(|&k| {
        if k == fits {
            return false;
        }
        let known = w_one_of.is_some_and(|alts| {
            alts.iter()
                .enumerate()
                .any(|(n, a)| n != i && a == &r_alts[k])
        });
        let other = Value::Object(merge_shallow(r_base, &r_alts[k]));
        !known && !disjoint(wa, &other, 0) && !disjoint(&fit, &other, 0)
    })
}

/// Whether no value can match both schemas, as far as types, `const`/`enum` and required
/// properties of objects show; `false` when that cannot be told.
fn disjoint(a: &Value, b: &Value, depth: usize) -> bool {
    if accepts_nothing(a) || accepts_nothing(b) {
        return true;
    }
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return false;
    };
    if depth > MAX_DEPTH {
        return false;
    }
    // Both taken wider than they may be: what no value of the wider ones matches, no value
    // of the real ones does.
    let (a, b) = (
        flatten_all_of(a, Side::Writer),
        flatten_all_of(b, Side::Writer),
    );
    let overlap = |x: &BTreeSet<String>, y: &BTreeSet<String>| {
        x.iter().any(|t| {
            y.contains(t)
                || (t == "integer" && y.contains("number"))
                || (t == "number" && y.contains("integer"))
        })
    };
    let (at, bt) = (declared_types(&a), declared_types(&b));
    if let (Some(at), Some(bt)) = (&at, &bt)
        && !overlap(at, bt)
    {
        return true;
    }
    if let (Some(ae), Some(be)) = (enum_values(&a), enum_values(&b))
        && !ae.iter().any(|v| be.contains(v))
    {
        return true;
    }
    // Objects only: a property one of them requires, whose schemas cannot both match.
    let only_objects = |t: &Option<BTreeSet<String>>| {
        t.as_ref()
            .is_some_and(|t| t.len() == 1 && t.contains("object"))
    };
    if !only_objects(&at) && !only_objects(&bt) {
        return false;
    }
    let (Some(ap), Some(bp)) = (
        a.get("properties").and_then(Value::as_object),
        b.get("properties").and_then(Value::as_object),
    ) else {
        return false;
    };
    let (ar, br) = (str_set(&a, "required"), str_set(&b, "required"));
    ap.iter().any(|(name, sa)| {
        (ar.contains(name) || br.contains(name))
            && bp.get(name).is_some_and(|sb| disjoint(sa, sb, depth + 1))
    })
}

fn summary(list: &[Incompatibility]) -> String {
    list.iter()
        .take(3)
        .map(|i| format!("{}: {}", i.path, i.rule))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(w: Value, r: Value) -> Vec<&'static str> {
        check(&w, &r).iter().map(Incompatibility::rule).collect()
    }

    #[test]
    fn modes_parse_and_print_like_confluent() {
        for m in Compatibility::ALL {
            assert_eq!(m.as_str().parse::<Compatibility>().unwrap(), m);
        }
        assert_eq!(
            "full-transitive".parse::<Compatibility>().unwrap(),
            Compatibility::FullTransitive
        );
        assert!("sideways".parse::<Compatibility>().is_err());
        assert_eq!(Compatibility::default(), Compatibility::Backward);
    }

    #[test]
    fn identical_schemas_are_compatible() {
        let s =
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
        assert!(check(&s, &s).is_empty());
    }

    #[test]
    fn allof_is_merged_before_comparing() {
        let w = json!({"allOf": [{"type": "object"}, {"required": ["a"]}]});
        let r = json!({"type": "object", "required": ["a"]});
        assert_eq!(rules(w, r), Vec::<&str>::new());
    }

    #[test]
    fn a_change_of_dialect_is_breaking() {
        let body = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let mut draft7 = body.clone();
        draft7["$schema"] = json!("http://json-schema.org/draft-07/schema#");
        let mut current = body.clone();
        current["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        assert_eq!(
            rules(draft7.clone(), current.clone()),
            vec!["DIALECT_CHANGED"]
        );
        assert_eq!(
            rules(current.clone(), draft7.clone()),
            vec!["DIALECT_CHANGED"]
        );
        // 2020-12 is the default: naming it or not is the same dialect, as are both spellings
        // of draft-07.
        assert!(check(&body, &current).is_empty());
        let mut https7 = body.clone();
        https7["$schema"] = json!("https://json-schema.org/draft-07/schema");
        assert!(check(&draft7, &https7).is_empty());
    }

    #[test]
    fn unevaluated_items_added_or_changed_is_breaking() {
        let w = json!({"type": "array", "prefixItems": [{"type": "string"}]});
        let r = json!({"type": "array", "prefixItems": [{"type": "string"}], "unevaluatedItems": false});
        assert_eq!(
            rules(w.clone(), r.clone()),
            vec!["UNEVALUATED_ITEMS_CHANGED"]
        );
        // Taking it away, or keeping it as it was, is fine.
        assert!(check(&r, &w).is_empty());
        assert!(check(&r, &r).is_empty());
        let open =
            json!({"type": "array", "prefixItems": [{"type": "string"}], "unevaluatedItems": true});
        assert!(check(&w, &open).is_empty());
    }

    #[test]
    fn a_oneof_alternative_must_not_overlap_another() {
        let w = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        let r = json!({"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]});
        let problems = check(&w, &r);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].rule(), "ONE_OF_OVERLAP");
        assert_eq!(problems[0].path(), "/oneOf/2");
        // The same change under anyOf is fine: matching two alternatives is allowed there.
        let w = json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
        let r = json!({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]});
        assert!(check(&w, &r).is_empty());
        // anyOf tightened to oneOf over alternatives that may overlap.
        let a = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let b = json!({"type": "object", "properties": {"b": {"type": "string"}}});
        let w = json!({"anyOf": [a, b]});
        let r = json!({"oneOf": [a, b]});
        assert_eq!(rules(w, r), vec!["ONE_OF_OVERLAP", "ONE_OF_OVERLAP"]);
        // A writer schema that fits one alternative of a widened oneOf whose other one
        // contains it.
        let w = json!({"type": "integer"});
        let r = json!({"oneOf": [{"type": "integer"}, {"type": "number"}]});
        assert_eq!(rules(w, r), vec!["ONE_OF_OVERLAP"]);
    }

    #[test]
    fn oneof_alternatives_told_apart_are_not_an_overlap() {
        let variant = |kind: &str| json!({"type": "object", "properties": {"kind": {"const": kind}}, "required": ["kind"]});
        let w = json!({"oneOf": [variant("a"), variant("b")]});
        let r = json!({"oneOf": [variant("a"), variant("b"), variant("c")]});
        assert!(check(&w, &r).is_empty());
        // Told apart by enums, and by types.
        let w = json!({"oneOf": [{"enum": [1, 2]}, {"type": "string"}]});
        let r = json!({"oneOf": [{"enum": [1, 2]}, {"type": "string"}, {"enum": [3]}]});
        assert!(check(&w, &r).is_empty());
        // Alternatives the writer already had: its data matched exactly one of them.
        let open = |p: &str| json!({"type": "object", "properties": {p: {"type": "string"}}});
        let w = json!({"oneOf": [open("a"), open("b")], "minProperties": 1});
        let r = json!({"oneOf": [open("a"), open("b")]});
        assert!(check(&w, &r).is_empty());
    }

    #[test]
    fn a_type_list_fits_alternatives_of_each_type() {
        let w = json!({"type": ["string", "null"]});
        assert!(
            check(
                &w,
                &json!({"anyOf": [{"type": "string"}, {"type": "null"}]})
            )
            .is_empty()
        );
        assert!(
            check(
                &w,
                &json!({"oneOf": [{"type": "null"}, {"type": "string"}]})
            )
            .is_empty()
        );
        assert_eq!(
            rules(w, json!({"anyOf": [{"type": "string"}]})),
            vec!["SUM_TYPE_NARROWED"]
        );
    }

    #[test]
    fn a_new_pattern_must_accept_the_declared_properties_it_matches() {
        let w = json!({
            "type": "object",
            "properties": {"xa": {"type": "string"}, "b": {"type": "integer"}},
            "additionalProperties": false
        });
        let mut r = w.clone();
        r["patternProperties"] = json!({"^x": {"type": "integer"}});
        let problems = check(&w, &r);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].rule(),
            "PATTERN_PROPERTY_ADDED_OVER_DECLARED_PROPERTY"
        );
        assert_eq!(problems[0].path(), "/patternProperties/^x");
        assert!(problems[0].message().contains("\"xa\""), "{problems:?}");
        // A pattern that accepts the declared property's values is fine.
        r["patternProperties"] = json!({"^x": {"type": ["string", "integer"]}});
        assert!(check(&w, &r).is_empty());
    }

    #[test]
    fn writer_alternatives_each_need_a_reader() {
        let w = json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
        let r = json!({"type": ["string", "number"]});
        assert!(check(&w, &r).is_empty());
        let r = json!({"type": "string"});
        assert_eq!(rules(w, r), vec!["TYPE_CHANGED"]);
    }
}
