//! Offline `$ref` resolution over the catalogue's documents.
//!
//! Every document gets a base URI (`evbus:///events/<type>.json`,
//! `evbus:///definitions/<Name>.json`), and [`canonicalize`] rewrites each of its `$ref`s into
//! one of two forms: `#<pointer>` (the same document) or
//! `evbus:///definitions/<Name>.json#<pointer>` (a shared definition). Anchors become pointers,
//! the original root `$id`s of definitions are accepted as aliases, and anything else is an
//! unknown reference — reported at registration, never at validation. On canonical documents
//! the rest is simple: [`check_cycles`] finds `$ref` loops that never reach a schema,
//! [`inline`] replaces references by their targets (for compatibility checks), and [`rewrite`]
//! re-points references into one bundled document (for listing and AsyncAPI).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};
use url::Url;

use super::errors::{SchemaError, SchemaErrorKind};
use super::pointer;

/// Base of shared definitions.
pub(crate) const DEFINITIONS_BASE: &str = "evbus:///definitions/";
/// Base of event types.
pub(crate) const EVENTS_BASE: &str = "evbus:///events/";

pub(crate) fn definition_uri(name: &str) -> String {
    format!("{DEFINITIONS_BASE}{name}.json")
}

pub(crate) fn event_uri(ty: &str) -> String {
    format!("{EVENTS_BASE}{ty}.json")
}

/// Which document a schema lives in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum DocKey {
    /// The event schema being processed (event schemas never reference each other).
    Event,
    /// A shared definition.
    Def(String),
}

impl DocKey {
    fn label(&self, event: &str) -> String {
        match self {
            DocKey::Event => format!("events/{event}.json"),
            DocKey::Def(n) => format!("definitions/{n}.json"),
        }
    }
}

/// A subschema position under a schema object: its pointer suffix and whether it applies to
/// the same instance (`allOf`, `not`, `if`…) rather than to a part of it (`properties`, `items`…).
pub(crate) struct Child<'a> {
    pub(crate) suffix: String,
    pub(crate) value: &'a Value,
    pub(crate) in_place: bool,
}

const SINGLE: &[(&str, bool)] = &[
    ("additionalProperties", false),
    ("unevaluatedProperties", false),
    ("additionalItems", false),
    ("unevaluatedItems", false),
    ("contains", false),
    ("propertyNames", false),
    ("contentSchema", false),
    ("not", true),
    ("if", true),
    ("then", true),
    ("else", true),
];
const LISTS: &[(&str, bool)] = &[
    ("allOf", true),
    ("anyOf", true),
    ("oneOf", true),
    ("prefixItems", false),
];
const MAPS: &[(&str, bool)] = &[
    ("properties", false),
    ("patternProperties", false),
    ("$defs", false),
    ("definitions", false),
    ("dependentSchemas", true),
    ("dependencies", true),
];

/// The direct subschemas of a schema.
pub(crate) fn children(schema: &Value) -> Vec<Child<'_>> {
    let mut out = Vec::new();
    let Some(obj) = schema.as_object() else {
        return out;
    };
    for (k, v) in obj {
        let k = k.as_str();
        if let Some((_, in_place)) = SINGLE.iter().find(|(n, _)| *n == k) {
            if is_schema(v) {
                out.push(Child {
                    suffix: pointer::push("", k),
                    value: v,
                    in_place: *in_place,
                });
            }
        } else if k == "items" {
            match v {
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        out.push(Child {
                            suffix: format!("/items/{i}"),
                            value: item,
                            in_place: false,
                        });
                    }
                }
                _ if is_schema(v) => out.push(Child {
                    suffix: "/items".to_owned(),
                    value: v,
                    in_place: false,
                }),
                _ => {}
            }
        } else if let Some((_, in_place)) = LISTS.iter().find(|(n, _)| *n == k) {
            if let Some(items) = v.as_array() {
                for (i, item) in items.iter().enumerate() {
                    out.push(Child {
                        suffix: format!("/{k}/{i}"),
                        value: item,
                        in_place: *in_place,
                    });
                }
            }
        } else if let Some((_, in_place)) = MAPS.iter().find(|(n, _)| *n == k)
            && let Some(map) = v.as_object()
        {
            for (name, sub) in map {
                if is_schema(sub) {
                    out.push(Child {
                        suffix: format!("/{}/{}", pointer::escape(k), pointer::escape(name)),
                        value: sub,
                        in_place: *in_place,
                    });
                }
            }
        }
    }
    out
}

fn is_schema(v: &Value) -> bool {
    v.is_object() || v.is_boolean()
}

/// Applies `f` to the subschemas of `schema` (mutably), with their pointer suffixes.
fn map_children(schema: &mut Map<String, Value>, f: &mut dyn FnMut(&str, &mut Value)) {
    for (k, v) in schema.iter_mut() {
        let k = k.as_str();
        if SINGLE.iter().any(|(n, _)| *n == k) {
            if is_schema(v) {
                f(&pointer::push("", k), v);
            }
        } else if k == "items" || LISTS.iter().any(|(n, _)| *n == k) {
            match v {
                Value::Array(items) => {
                    for (i, item) in items.iter_mut().enumerate() {
                        f(&format!("/{k}/{i}"), item);
                    }
                }
                _ if k == "items" && is_schema(v) => f("/items", v),
                _ => {}
            }
        } else if MAPS.iter().any(|(n, _)| *n == k)
            && let Some(map) = v.as_object_mut()
        {
            for (name, sub) in map.iter_mut() {
                if is_schema(sub) {
                    f(
                        &format!("/{}/{}", pointer::escape(k), pointer::escape(name)),
                        sub,
                    );
                }
            }
        }
    }
}

/// The documents references can reach while processing one document.
pub(crate) struct Docs<'a> {
    /// Definitions by name (extended, canonical once canonicalized).
    pub(crate) defs: &'a BTreeMap<String, Value>,
    /// Original root `$id` (without fragment) of a definition → its name.
    pub(crate) aliases: &'a HashMap<String, String>,
}

impl Docs<'_> {
    fn get<'v>(&'v self, key: &DocKey, event: &'v Value) -> Option<&'v Value> {
        match key {
            DocKey::Event => Some(event),
            DocKey::Def(n) => self.defs.get(n),
        }
    }
}

/// Rewrites every `$ref` of `doc` (whose base URI is `base`) into canonical form.
/// `what` names the document in error messages.
pub(crate) fn canonicalize(
    doc: &Value,
    base: &str,
    docs: &Docs<'_>,
    what: &str,
) -> Result<Value, SchemaError> {
    let base_url = Url::parse(base).map_err(|e| {
        SchemaError::new(
            SchemaErrorKind::InvalidName,
            format!("{what}: cannot form the URI {base}: {e}"),
        )
    })?;
    let mut out = doc.clone();
    if let Some(obj) = out.as_object_mut() {
        // The catalogue decides where documents live; a root `$id` would move the base.
        obj.remove("$id");
    }
    let mut errors = Vec::new();
    canonicalize_in(&mut out, "", doc, &base_url, docs, &mut errors);
    if errors.is_empty() {
        Ok(out)
    } else {
        let mut known: Vec<&str> = docs.defs.keys().map(String::as_str).collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        Err(SchemaError::new(
            SchemaErrorKind::UnknownReference,
            format!("{what}: {} (known definitions: {known})", errors.join("; ")),
        ))
    }
}

fn canonicalize_in(
    schema: &mut Value,
    at: &str,
    original: &Value,
    base: &Url,
    docs: &Docs<'_>,
    errors: &mut Vec<String>,
) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(r)) = obj.get("$ref") {
        match canonical_ref(r, base, original, docs) {
            Ok(c) => {
                obj.insert("$ref".to_owned(), Value::String(c));
            }
            Err(e) => errors.push(format!("$ref \"{r}\" at {}: {e}", display_pointer(at))),
        }
    }
    map_children(obj, &mut |suffix: &str, child: &mut Value| {
        canonicalize_in(
            child,
            &format!("{at}{suffix}"),
            original,
            base,
            docs,
            errors,
        );
    });
}

fn display_pointer(p: &str) -> String {
    if p.is_empty() {
        "the root".to_owned()
    } else {
        p.to_owned()
    }
}

/// The canonical form of one reference found in a document based at `base`.
fn canonical_ref(r: &str, base: &Url, this: &Value, docs: &Docs<'_>) -> Result<String, String> {
    let target = base
        .join(r)
        .map_err(|e| format!("not a valid URI reference ({e})"))?;
    let fragment = pointer::percent_decode(target.fragment().unwrap_or(""));
    let mut doc_uri = target.clone();
    doc_uri.set_fragment(None);
    let mut base_doc = base.clone();
    base_doc.set_fragment(None);
    let doc_uri = doc_uri.as_str();

    let (key, doc): (DocKey, &Value) = if doc_uri == base_doc.as_str() {
        (DocKey::Event, this)
    } else if let Some(name) = doc_uri
        .strip_prefix(DEFINITIONS_BASE)
        .and_then(|n| n.strip_suffix(".json"))
        .filter(|n| docs.defs.contains_key(*n))
    {
        (DocKey::Def(name.to_owned()), &docs.defs[name])
    } else if let Some(name) = docs.aliases.get(doc_uri.trim_end_matches('#')) {
        (DocKey::Def(name.clone()), &docs.defs[name])
    } else if let Some(name) = doc_uri
        .strip_prefix(DEFINITIONS_BASE)
        .and_then(|n| n.strip_suffix(".json"))
    {
        return Err(format!("there is no definition \"{name}\""));
    } else if doc_uri.starts_with(EVENTS_BASE) {
        return Err(format!(
            "resolves to {doc_uri}; a schema may reference shared definitions \
             (../definitions/<Name>.json) and its own subschemas, not other event types"
        ));
    } else {
        return Err(format!(
            "resolves to {doc_uri}, which is not in the catalogue (references are resolved \
             offline, never fetched)"
        ));
    };

    let ptr = if fragment.is_empty() || fragment.starts_with('/') {
        if pointer::tokens(&fragment).is_none() || doc.pointer(&fragment).is_none() {
            return Err(format!("the location #{fragment} does not exist"));
        }
        fragment
    } else {
        find_anchor(doc, &fragment, "")
            .ok_or_else(|| format!("there is no anchor \"{fragment}\""))?
    };
    let frag = if ptr.is_empty() {
        String::new()
    } else {
        format!("#{}", pointer::fragment_encode(&ptr))
    };
    Ok(match key {
        DocKey::Event => {
            if frag.is_empty() {
                "#".to_owned()
            } else {
                frag
            }
        }
        DocKey::Def(name) => format!("{}{frag}", definition_uri(&name)),
    })
}

fn find_anchor(schema: &Value, anchor: &str, at: &str) -> Option<String> {
    if let Some(obj) = schema.as_object() {
        let draft7_id = format!("#{anchor}");
        if obj.get("$anchor").and_then(Value::as_str) == Some(anchor)
            || obj.get("$id").and_then(Value::as_str) == Some(draft7_id.as_str())
        {
            return Some(at.to_owned());
        }
    }
    children(schema)
        .into_iter()
        .find_map(|c| find_anchor(c.value, anchor, &format!("{at}{}", c.suffix)))
}

/// Splits a canonical reference into its document and pointer.
pub(crate) fn parse_canonical(r: &str) -> Option<(DocKey, String)> {
    let (doc, frag) = r.split_once('#').unwrap_or((r, ""));
    let ptr = pointer::percent_decode(frag);
    if doc.is_empty() {
        Some((DocKey::Event, ptr))
    } else {
        let name = doc.strip_prefix(DEFINITIONS_BASE)?.strip_suffix(".json")?;
        Some((DocKey::Def(name.to_owned()), ptr))
    }
}

/// Resolves a canonical reference found in document `from`.
fn target_of(r: &str, from: &DocKey) -> Option<(DocKey, String)> {
    let (key, ptr) = parse_canonical(r)?;
    Some(match key {
        DocKey::Event => (from.clone(), ptr),
        other => (other, ptr),
    })
}

/// Finds `$ref` loops that never look inside the instance (`A → B → A`, or through `allOf`,
/// `anyOf`, `not`…): validation against them could never finish. `event` may be `Value::Null`
/// when checking definitions alone.
pub(crate) fn check_cycles(
    event_name: &str,
    event: &Value,
    docs: &Docs<'_>,
) -> Result<(), SchemaError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Color {
        Grey,
        Black,
    }
    type Node = (DocKey, String);
    let mut colors: HashMap<Node, Color> = HashMap::new();

    fn edges(node: &Node, value: &Value) -> Vec<Node> {
        let mut out = Vec::new();
        if let Some(r) = value.get("$ref").and_then(Value::as_str)
            && let Some(t) = target_of(r, &node.0)
        {
            out.push(t);
        }
        for c in children(value) {
            if c.in_place {
                out.push((node.0.clone(), format!("{}{}", node.1, c.suffix)));
            }
        }
        out
    }

    fn visit(
        node: Node,
        event: &Value,
        docs: &Docs<'_>,
        colors: &mut HashMap<Node, Color>,
        stack: &mut Vec<Node>,
    ) -> Option<Vec<Node>> {
        match colors.get(&node) {
            Some(Color::Black) => return None,
            Some(Color::Grey) => {
                let start = stack.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node);
                return Some(cycle);
            }
            None => {}
        }
        let value = docs.get(&node.0, event)?.pointer(&node.1)?;
        colors.insert(node.clone(), Color::Grey);
        stack.push(node.clone());
        for next in edges(&node, value) {
            if let Some(c) = visit(next, event, docs, colors, stack) {
                return Some(c);
            }
        }
        stack.pop();
        colors.insert(node, Color::Black);
        None
    }

    // Every subschema of every document is a possible entry into a loop.
    let mut starts: Vec<Node> = Vec::new();
    fn all_nodes(key: &DocKey, v: &Value, at: &str, out: &mut Vec<(DocKey, String)>) {
        out.push((key.clone(), at.to_owned()));
        for c in children(v) {
            all_nodes(key, c.value, &format!("{at}{}", c.suffix), out);
        }
    }
    if !event.is_null() {
        all_nodes(&DocKey::Event, event, "", &mut starts);
    }
    for (name, def) in docs.defs {
        all_nodes(&DocKey::Def(name.clone()), def, "", &mut starts);
    }
    for start in starts {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(start, event, docs, &mut colors, &mut stack) {
            let steps: Vec<String> = cycle
                .iter()
                .map(|(k, p)| {
                    if p.is_empty() {
                        k.label(event_name)
                    } else {
                        format!("{}#{p}", k.label(event_name))
                    }
                })
                .collect();
            return Err(SchemaError::new(
                SchemaErrorKind::Cycle,
                format!(
                    "$ref cycle that never reaches a schema: {} (each step refers to the next \
                     without looking inside the data, so validation could never end)",
                    steps.join(" → ")
                ),
            ));
        }
    }
    Ok(())
}

/// Replaces every reference of a canonical event document by its target, for comparing
/// schemas. A reference back into a schema being expanded (a recursive type) stays a `$ref`
/// in absolute form. `$defs`/`definitions` are dropped (their content is inlined where used).
///
/// The expansion is bounded: a reference is kept (in absolute form, as a recursive one)
/// once [`INLINE_BUDGET`] schema objects were expanded from references, or beyond
/// [`INLINE_DEPTH`] references inside one another. Each definition referenced twice by the
/// next doubles the expansion: a 1.9 KB file expanded to 2.2 GB in 37 s, and a chain of
/// 5,000 definitions overflowed the stack (outside review); the validator reads such
/// schemas lazily and never meets either. A reference kept for the budget cannot be
/// compared (the same one in two versions may name different content): it is marked, and
/// a change of such a schema is refused as too large to check.
pub(crate) fn inline(event: &Value, docs: &Docs<'_>) -> Value {
    let mut stack = Vec::new();
    let mut budget = INLINE_BUDGET;
    let mut inlined = inline_in(
        event,
        &DocKey::Event,
        "",
        event,
        docs,
        &mut stack,
        &mut budget,
    );
    // The root keeps its dialect: the same keywords mean other things in another draft, and
    // the comparison must see a change of it.
    if let (Some(dialect), Value::Object(root)) = (event.get("$schema"), &mut inlined) {
        root.insert("$schema".to_owned(), dialect.clone());
    }
    inlined
}

/// Whether the document `root` is draft-07: by its own `$schema`, else by the event's (a
/// definition without one is read in the dialect of the event that references it).
fn is_draft_07(root: &Value, event: &Value) -> bool {
    root.get("$schema")
        .or_else(|| event.get("$schema"))
        .and_then(Value::as_str)
        .is_some_and(|s| s.contains("json-schema.org/draft-07"))
}

/// Appended to a reference [`inline`] did not expand for its budget (see `compat::refs`).
pub(crate) const UNEXPANDED_MARK: &str = "#evbus-unexpanded-";

/// The most schema objects [`inline`] expands from references, for one event schema.
const INLINE_BUDGET: usize = 100_000;
/// The most references [`inline`] follows inside one another.
const INLINE_DEPTH: usize = 64;

/// The number of schema objects in `v` (objects, counted through arrays too).
fn objects_in(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(objects_in).sum::<usize>(),
        Value::Array(a) => a.iter().map(objects_in).sum(),
        _ => 0,
    }
}

const ANNOTATIONS: &[&str] = &[
    "description",
    "title",
    "default",
    "examples",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];

fn inline_in(
    v: &Value,
    doc: &DocKey,
    at: &str,
    event: &Value,
    docs: &Docs<'_>,
    stack: &mut Vec<(DocKey, String)>,
    budget: &mut usize,
) -> Value {
    let Some(obj) = v.as_object() else {
        return v.clone();
    };
    let mut out = Map::new();
    let mut target = None;
    if let Some(r) = obj.get("$ref").and_then(Value::as_str)
        && let Some((key, ptr)) = target_of(r, doc)
    {
        let node = (key.clone(), ptr.clone());
        let target_doc = docs.get(&key, event).and_then(|d| d.pointer(&ptr));
        let size = target_doc.map_or(0, objects_in);
        let recursive = stack.contains(&node);
        let spent = !recursive && (size > *budget || stack.len() >= INLINE_DEPTH);
        if !recursive && !spent {
            *budget -= size;
        }
        if recursive || spent {
            let mut abs = match &key {
                DocKey::Event => format!("#{ptr}"),
                DocKey::Def(n) => format!("{}#{ptr}", definition_uri(n)),
            };
            if spent {
                // Not expanded, it cannot be compared: the same reference in two versions may
                // name different content (each version's own `$defs`). Made unique, it never
                // compares equal, and the comparison says why (`compat::refs`).
                use std::sync::atomic::{AtomicU64, Ordering};
                static UNEXPANDED: AtomicU64 = AtomicU64::new(0);
                let n = UNEXPANDED.fetch_add(1, Ordering::Relaxed);
                abs = format!("{abs}{UNEXPANDED_MARK}{n}");
            }
            out.insert("$ref".to_owned(), Value::String(abs));
        } else if let Some(t) = target_doc {
            stack.push(node);
            target = Some(inline_in(t, &key, &ptr, event, docs, stack, budget));
            stack.pop();
        }
    }
    // Draft-07 ignores the keywords beside a `$ref`, and so does the validator: kept, they
    // would make the schema look narrower than what it accepts.
    let ignored_beside_ref =
        obj.contains_key("$ref") && is_draft_07(docs.get(doc, event).unwrap_or(event), event);
    for (k, sub) in obj {
        if k == "$ref" || k == "$defs" || k == "definitions" || k == "$schema" || k == "$id" {
            continue;
        }
        if ignored_beside_ref && !ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        out.insert(k.clone(), sub.clone());
    }
    map_children(&mut out, &mut |suffix: &str, child: &mut Value| {
        *child = inline_in(
            child,
            doc,
            &format!("{at}{suffix}"),
            event,
            docs,
            stack,
            budget,
        );
    });
    match target {
        None => Value::Object(out),
        Some(Value::Object(mut t)) => {
            // Merge the siblings of `$ref` into its target when they do not collide, nor read
            // each other (a closed target next to sibling `properties`: see `can_merge`).
            let apart = !super::compat::can_merge(&out, &t);
            let mut rest = Map::new();
            for (k, v) in out {
                if (!t.contains_key(&k) && !apart) || ANNOTATIONS.contains(&k.as_str()) {
                    t.insert(k, v);
                } else {
                    rest.insert(k, v);
                }
            }
            if rest.is_empty() {
                Value::Object(t)
            } else {
                let mut all = Map::new();
                all.insert(
                    "allOf".to_owned(),
                    Value::Array(vec![Value::Object(t), Value::Object(rest)]),
                );
                Value::Object(all)
            }
        }
        Some(t) => {
            if out.keys().all(|k| ANNOTATIONS.contains(&k.as_str())) {
                t
            } else {
                let mut all = Map::new();
                all.insert(
                    "allOf".to_owned(),
                    Value::Array(vec![t, Value::Object(out)]),
                );
                Value::Object(all)
            }
        }
    }
}

/// The definitions a canonical document references, directly or through other definitions.
pub(crate) fn referenced_definitions(event: &Value, docs: &Docs<'_>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![event];
    while let Some(v) = todo.pop() {
        collect_def_refs(v, &mut |name| {
            if found.insert(name.to_owned())
                && let Some(d) = docs.defs.get(name)
            {
                todo.push(d);
            }
        });
    }
    found
}

fn collect_def_refs(v: &Value, f: &mut dyn FnMut(&str)) {
    if let Some(r) = v.get("$ref").and_then(Value::as_str)
        && let Some((DocKey::Def(n), _)) = parse_canonical(r)
    {
        f(&n);
    }
    for c in children(v) {
        collect_def_refs(c.value, f);
    }
}

/// Re-points every canonical reference of `doc` (a document known as `from`) at
/// `prefix(target document)` + pointer, for embedding documents into one.
pub(crate) fn rewrite(doc: &Value, from: &DocKey, prefix: &dyn Fn(&DocKey) -> String) -> Value {
    let mut out = doc.clone();
    rewrite_in(&mut out, from, prefix);
    out
}

fn rewrite_in(v: &mut Value, from: &DocKey, prefix: &dyn Fn(&DocKey) -> String) {
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    if let Some(Value::String(r)) = obj.get("$ref")
        && let Some((key, ptr)) = target_of(r, from)
    {
        let p = prefix(&key);
        let new = if ptr.is_empty() && p.is_empty() {
            "#".to_owned()
        } else {
            format!(
                "{}{}",
                if p.is_empty() { "#" } else { &p },
                pointer::fragment_encode(&ptr)
            )
        };
        obj.insert("$ref".to_owned(), Value::String(new));
    }
    map_children(obj, &mut |_: &str, child: &mut Value| {
        rewrite_in(child, from, prefix)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn docs(defs: &BTreeMap<String, Value>) -> Docs<'_> {
        static EMPTY: std::sync::LazyLock<HashMap<String, String>> =
            std::sync::LazyLock::new(HashMap::new);
        Docs {
            defs,
            aliases: &EMPTY,
        }
    }

    #[test]
    fn relative_refs_become_canonical() {
        let mut defs = BTreeMap::new();
        defs.insert("Order".to_owned(), json!({"$defs": {"Line": {}}}));
        let d = docs(&defs);
        let ev = json!({"properties": {
            "a": {"$ref": "../definitions/Order.json"},
            "b": {"$ref": "../definitions/Order.json#/$defs/Line"},
            "c": {"$ref": "#/properties/a"},
            "d": {"$ref": "#"}
        }});
        let c = canonicalize(&ev, &event_uri("x"), &d, "x").unwrap();
        assert_eq!(
            c["properties"]["a"]["$ref"],
            "evbus:///definitions/Order.json"
        );
        assert_eq!(
            c["properties"]["b"]["$ref"],
            "evbus:///definitions/Order.json#/$defs/Line"
        );
        assert_eq!(c["properties"]["c"]["$ref"], "#/properties/a");
        assert_eq!(c["properties"]["d"]["$ref"], "#");
    }

    #[test]
    fn unknown_refs_name_the_location_and_the_known_definitions() {
        let mut defs = BTreeMap::new();
        defs.insert("Order".to_owned(), json!({}));
        let d = docs(&defs);
        let ev = json!({"properties": {"a": {"$ref": "../definitions/Ordr.json"}}});
        let e = canonicalize(&ev, &event_uri("x"), &d, "event type \"x\"").unwrap_err();
        assert_eq!(e.kind(), SchemaErrorKind::UnknownReference);
        assert!(e.message().contains("/properties/a"), "{e}");
        assert!(e.message().contains("no definition \"Ordr\""), "{e}");
        assert!(e.message().contains("known definitions: Order"), "{e}");
    }

    #[test]
    fn refs_inside_const_are_data_not_references() {
        let defs = BTreeMap::new();
        let d = docs(&defs);
        let ev = json!({"const": {"$ref": "nowhere.json"}});
        assert!(canonicalize(&ev, &event_uri("x"), &d, "x").is_ok());
    }

    #[test]
    fn a_pure_ref_loop_is_a_cycle_but_recursion_through_properties_is_not() {
        let mut defs = BTreeMap::new();
        defs.insert(
            "A".to_owned(),
            json!({"allOf": [{"$ref": "evbus:///definitions/B.json"}]}),
        );
        defs.insert(
            "B".to_owned(),
            json!({"$ref": "evbus:///definitions/A.json"}),
        );
        let d = docs(&defs);
        let e = check_cycles("x", &Value::Null, &d).unwrap_err();
        assert_eq!(e.kind(), SchemaErrorKind::Cycle);
        assert!(e.message().contains("definitions/A.json"), "{e}");

        let mut defs = BTreeMap::new();
        defs.insert(
            "Category".to_owned(),
            json!({"properties": {"children": {"items": {"$ref": "#"}}}}),
        );
        let d = docs(&defs);
        assert!(check_cycles("x", &Value::Null, &d).is_ok());
        let inlined = inline(&json!({"$ref": "evbus:///definitions/Category.json"}), &d);
        assert_eq!(
            inlined["properties"]["children"]["items"]["$ref"],
            "evbus:///definitions/Category.json#"
        );
    }
}
