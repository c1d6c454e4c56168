//! Curation: what of an event may leave the gateway.
//!
//! One function, [`curate_data`], shapes every outbound payload (webhook bodies, stream frames,
//! replays), by the rules of the event's version and the latest one ([`curate_data_of`]);
//! [`curate_event`] applies it to an envelope and drops the envelope attributes that
//! are internal (extensions: trace context, partition key, anything else); [`curate_schema`]
//! shapes the schemas listed by `GET /v1/event-types` the same way.
//!
//! Rules, in order: every `x-evbus-redact` pointer is removed; then, if `x-evbus-allow` is
//! present, only the allowed pointers (and what lies under them) remain; then, if a webhook
//! narrows further, only its pointers remain. A pointer that is absent from a payload is
//! ignored. Pointers follow RFC 6901 (`/order/email`, `/items/0/price`), plus one wildcard
//! token: `*` means every element of an array or every member of an object
//! (`/customers/*/email` is the email of every customer). The catalogue refuses a pointer it
//! can see cannot apply (`-`, or a name where the schema has an array); where the schema does
//! not say, a redact pointer fails closed: a name token that meets an array applies to every
//! element (`/customers/email` redacts each customer's email), and so do `-` and `*`. An allow
//! pointer never widens: a name token that meets an array keeps nothing of it. A redacted or
//! disallowed array element becomes `null` (trailing ones are dropped) instead of shifting the
//! later elements, so curation is idempotent: curating a curated event changes nothing.
//!
//! Undeclared data: "curated" means the redact and allow rules above, which name what they
//! remove or keep. An open schema lets a producer send members it does not declare; by
//! default they leave like the rest (a type's `x-evbus-allow`, if any, removes them). A type
//! whose schema root says `"x-evbus-undeclared": "drop"` also loses, after the other rules,
//! every object member no `properties` (or `additionalProperties` schema) of its schema
//! declares, at any depth, and every array element no `items`/`prefixItems` types
//! (`patternProperties` declares nothing here: fails closed). The `subject` attribute is data
//! too: under a type's `x-evbus-allow` it is dropped unless the schema root says
//! `"x-evbus-subject": "keep"`, and under a webhook's own `allow` it is always dropped.
//!
//! Versions: an event naming an older version is curated by its version's rules and then by
//! the latest version's ([`curate_data_of`]), so a rule added in a new version covers the
//! events producers not upgraded yet still write, and those already in the log.

use evbus::Event;
use evbus::schema::{EventTypeInfo, EventVersion};
use serde_json::{Map, Value};
use std::collections::HashMap;

fn tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The token meaning "every element or member".
pub const WILDCARD: &str = "*";

/// Longest pointer a webhook's `allow` may hold, in bytes.
pub const MAX_POINTER_BYTES: usize = 256;
/// Most tokens (levels) a pointer of a webhook's `allow` may have.
pub const MAX_POINTER_TOKENS: usize = 16;

/// Checks a pointer of a webhook's `allow` (written by a key holder, curated against on every
/// delivery): a JSON pointer of at most [`MAX_POINTER_BYTES`] bytes and
/// [`MAX_POINTER_TOKENS`] tokens. The message quotes no part of the pointer.
pub fn check_allow_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.starts_with('/') {
        return Err("`allow` holds JSON pointers such as /order/id".to_owned());
    }
    if pointer.len() > MAX_POINTER_BYTES {
        return Err(format!(
            "a pointer in `allow` may be at most {MAX_POINTER_BYTES} bytes long"
        ));
    }
    if pointer.matches('/').count() > MAX_POINTER_TOKENS {
        return Err(format!(
            "a pointer in `allow` may have at most {MAX_POINTER_TOKENS} levels"
        ));
    }
    Ok(())
}

fn index(token: &str) -> Option<usize> {
    // RFC 6901 array indexes: `0` or digits without a leading zero.
    if token == "0" || (!token.starts_with('0') && token.bytes().all(|b| b.is_ascii_digit())) {
        token.parse().ok()
    } else {
        None
    }
}

/// Removes the value at `tokens` (if present); `*` removes every element or member. Fails
/// closed on arrays: a token that is not an index applies to every element.
fn remove(value: &mut Value, tokens: &[String]) {
    let Some((first, rest)) = tokens.split_first() else {
        *value = Value::Null;
        return;
    };
    match value {
        Value::Object(map) if first == WILDCARD => {
            if rest.is_empty() {
                map.clear();
            } else {
                map.values_mut().for_each(|v| remove(v, rest));
            }
        }
        Value::Object(map) => {
            if rest.is_empty() {
                map.remove(first);
            } else if let Some(v) = map.get_mut(first) {
                remove(v, rest);
            }
        }
        // An array element becomes null rather than being removed: the later elements keep
        // their positions, so curating again (every outbound path does) removes nothing more.
        Value::Array(items) => match index(first) {
            Some(i) => {
                if let Some(item) = items.get_mut(i) {
                    remove(item, rest);
                }
            }
            // `*` (and `-`, which names no element): every element.
            None if first == WILDCARD || first == "-" => {
                items.iter_mut().for_each(|v| remove(v, rest));
            }
            // A name where an array is: the pointer applies to every element, so a pointer
            // written without an index still redacts.
            None => items.iter_mut().for_each(|v| remove(v, tokens)),
        },
        _ => {}
    }
}

/// The allowed pointers (token lists) that continue under `key` at `depth` (`*` matches any).
/// Borrowed, not copied. Used for schemas (the catalogue's own lists); event data goes
/// through [`AllowTrie`], whose cost per data node does not grow with the pointers.
fn children<'a>(allowed: &[&'a [String]], depth: usize, key: &str) -> Vec<&'a [String]> {
    allowed
        .iter()
        .filter(|a| a.len() > depth && (a[depth] == key || a[depth] == WILDCARD))
        .copied()
        .collect()
}

/// A compiled allow-list: its pointers' tokens as a trie, built once per list, so curating a
/// data node costs one map lookup whatever the number of pointers (a webhook's `allow` comes
/// from a key holder: up to `max_allow_per_webhook` pointers).
///
/// Same semantics as matching every pointer at every node: a pointer that ends at a node
/// keeps its whole subtree; an object member continues the pointers whose next token is its
/// name or `*`; an array element continues those whose next token is its index (RFC 6901
/// form: `0` or digits without a leading zero) or `*`; a scalar where a pointer continues is
/// dropped; a disallowed array element becomes `null` and trailing ones are dropped.
#[derive(Debug, Clone)]
pub struct AllowTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// A pointer ends here.
    end: bool,
    /// Literal tokens (every token but `*`).
    names: HashMap<String, u32>,
    /// The literal tokens that are array indexes, parsed once here (also in `names`).
    indexes: HashMap<usize, u32>,
    /// The `*` token.
    wildcard: Option<u32>,
}

impl AllowTrie {
    /// Compiles a list of JSON pointers (RFC 6901, plus the `*` token).
    pub fn compile(pointers: &[String]) -> AllowTrie {
        let mut nodes = vec![TrieNode::default()];
        for pointer in pointers {
            let mut at = 0usize;
            for token in tokens(pointer) {
                let next = nodes.len() as u32;
                let existing = if token == WILDCARD {
                    nodes[at].wildcard
                } else {
                    nodes[at].names.get(&token).copied()
                };
                let child = match existing {
                    Some(child) => child,
                    None => {
                        nodes.push(TrieNode::default());
                        let node = &mut nodes[at];
                        if token == WILDCARD {
                            node.wildcard = Some(next);
                        } else {
                            if let Some(i) = index(&token) {
                                node.indexes.insert(i, next);
                            }
                            node.names.insert(token, next);
                        }
                        next
                    }
                };
                at = child as usize;
            }
            nodes[at].end = true;
        }
        AllowTrie { nodes }
    }

    /// Keeps only what lies on or under the compiled pointers (`null` for a scalar root that
    /// no empty pointer keeps).
    pub fn keep(&self, data: Value) -> Value {
        self.keep_with_budget(data, MEMO_BUDGET)
    }

    fn keep_with_budget(&self, data: Value, budget: usize) -> Value {
        let mut walk = Walk {
            trie: self,
            states: Vec::new(),
            ids: HashMap::new(),
            budget,
        };
        match walk.intern(vec![0]) {
            Next::To(root) => walk.keep(data, root),
            Next::Set(members) => walk.keep_set(data, &members),
            Next::Dead => None,
        }
        .unwrap_or(Value::Null)
    }
}

/// What one walk may memoise, in trie nodes and tokens held by its states: beyond it, a new
/// set of trie nodes is followed without memoising (a lookup per member), so memory stays
/// bounded whatever the data and pointers.
const MEMO_BUDGET: usize = 1 << 16;

/// A memoised transition of the walk, resolved on first use.
#[derive(Debug, Clone, Copy)]
enum Step {
    Unknown,
    /// No pointer continues.
    Dead,
    To(u32),
}

/// Where a data node's pointers continue.
enum Next {
    Dead,
    /// A memoised state.
    To(u32),
    /// A set of trie nodes not memoised (past [`MEMO_BUDGET`]).
    Set(Vec<u32>),
}

impl From<Step> for Option<Next> {
    fn from(step: Step) -> Self {
        match step {
            Step::Unknown => None,
            Step::Dead => Some(Next::Dead),
            Step::To(t) => Some(Next::To(t)),
        }
    }
}

/// A set of trie nodes the data path matches at once (`/a/x` and `/*/y` under `a`): a state
/// of the determinised trie, built lazily during one walk and memoised, so that every data
/// node costs one lookup (the set's construction is paid once per distinct set reached, not
/// per data node).
struct DState<'t> {
    members: Vec<u32>,
    end: bool,
    /// Every literal token of a member, and where it leads.
    names: HashMap<&'t str, Step>,
    /// Every index token of a member, and where it leads.
    indexes: HashMap<usize, Step>,
    /// Where any other member name or element leads (the members' `*` children).
    other: Step,
}

struct Walk<'t> {
    trie: &'t AllowTrie,
    states: Vec<DState<'t>>,
    ids: HashMap<Vec<u32>, u32>,
    /// What may still be memoised ([`MEMO_BUDGET`]).
    budget: usize,
}

impl<'t> Walk<'t> {
    fn intern(&mut self, mut members: Vec<u32>) -> Next {
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            return Next::Dead;
        }
        if let Some(id) = self.ids.get(&members) {
            return Next::To(*id);
        }
        let trie = self.trie;
        let cost = members
            .iter()
            .map(|&m| {
                let node = &trie.nodes[m as usize];
                2 + node.names.len() + node.indexes.len()
            })
            .sum::<usize>()
            * 2;
        if cost > self.budget {
            return Next::Set(members);
        }
        self.budget -= cost;
        let mut state = DState {
            members: members.clone(),
            end: false,
            names: HashMap::new(),
            indexes: HashMap::new(),
            other: Step::Unknown,
        };
        for &m in &members {
            let node = &trie.nodes[m as usize];
            state.end |= node.end;
            for name in node.names.keys() {
                state.names.insert(name.as_str(), Step::Unknown);
            }
            for i in node.indexes.keys() {
                state.indexes.insert(*i, Step::Unknown);
            }
        }
        let id = self.states.len() as u32;
        self.states.push(state);
        self.ids.insert(members, id);
        Next::To(id)
    }

    /// The trie nodes that continue `members` under one member name or element: their `*`
    /// children, plus (for a literal token) their children of that token.
    fn successors(&self, members: &[u32], literal: impl Fn(&TrieNode) -> Option<u32>) -> Vec<u32> {
        members
            .iter()
            .flat_map(|&m| {
                let node = &self.trie.nodes[m as usize];
                [literal(node), node.wildcard]
            })
            .flatten()
            .collect()
    }

    fn resolve(&mut self, s: u32, literal: impl Fn(&TrieNode) -> Option<u32>) -> Next {
        let next = self.successors(&self.states[s as usize].members, literal);
        self.intern(next)
    }

    /// A memoisable form of `next` (a set past the budget is not memoised).
    fn memo(next: &Next) -> Option<Step> {
        match next {
            Next::Dead => Some(Step::Dead),
            Next::To(t) => Some(Step::To(*t)),
            Next::Set(_) => None,
        }
    }

    fn other(&mut self, s: u32) -> Next {
        if let Some(next) = self.states[s as usize].other.into() {
            return next;
        }
        let next = self.resolve(s, |_| None);
        if let Some(step) = Self::memo(&next) {
            self.states[s as usize].other = step;
        }
        next
    }

    fn name(&mut self, s: u32, key: &str) -> Next {
        let Some((&name, &step)) = self.states[s as usize].names.get_key_value(key) else {
            return self.other(s);
        };
        if let Some(next) = step.into() {
            return next;
        }
        let next = self.resolve(s, |n| n.names.get(key).copied());
        if let Some(step) = Self::memo(&next) {
            self.states[s as usize].names.insert(name, step);
        }
        next
    }

    fn element(&mut self, s: u32, i: usize) -> Next {
        let state = &self.states[s as usize];
        let step = if state.indexes.is_empty() {
            None
        } else {
            state.indexes.get(&i).copied()
        };
        let Some(step) = step else {
            return self.other(s);
        };
        if let Some(next) = step.into() {
            return next;
        }
        let next = self.resolve(s, |n| n.indexes.get(&i).copied());
        if let Some(step) = Self::memo(&next) {
            self.states[s as usize].indexes.insert(i, step);
        }
        next
    }

    fn follow(&mut self, value: Value, next: Next) -> Option<Value> {
        match next {
            Next::Dead => None,
            Next::To(t) => self.keep(value, t),
            Next::Set(members) => self.keep_set(value, &members),
        }
    }

    /// Keeps what the pointers of state `s` allow of `value`.
    fn keep(&mut self, value: Value, s: u32) -> Option<Value> {
        // A pointer that ends here keeps the whole subtree.
        if self.states[s as usize].end {
            return Some(value);
        }
        self.rebuild(value, |w, k| w.name(s, k), |w, i| w.element(s, i))
    }

    /// [`Walk::keep`] for a set of trie nodes past the memo budget: a lookup per member.
    fn keep_set(&mut self, value: Value, members: &[u32]) -> Option<Value> {
        if members.iter().any(|&m| self.trie.nodes[m as usize].end) {
            return Some(value);
        }
        self.rebuild(
            value,
            |w, k| {
                let next = w.successors(members, |n| n.names.get(k).copied());
                w.intern(next)
            },
            |w, i| {
                let next = w.successors(members, |n| n.indexes.get(&i).copied());
                w.intern(next)
            },
        )
    }

    /// `value` rebuilt with what each member allows, `by_name` and `by_index` giving the state
    /// a member's key or element moves to.
    fn rebuild(
        &mut self,
        value: Value,
        mut by_name: impl FnMut(&mut Self, &str) -> Next,
        mut by_index: impl FnMut(&mut Self, usize) -> Next,
    ) -> Option<Value> {
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    let next = by_name(self, &k);
                    if let Some(v) = self.follow(v, next) {
                        out.insert(k, v);
                    }
                }
                Some(Value::Object(out))
            }
            Value::Array(items) => {
                // Elements keep their positions (others become null), so allowed pointers
                // still name the same elements when curated again.
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in items.into_iter().enumerate() {
                    let next = by_index(self, i);
                    out.push(self.follow(v, next).unwrap_or(Value::Null));
                }
                while out.last().is_some_and(Value::is_null) {
                    out.pop();
                }
                Some(Value::Array(out))
            }
            // A scalar where the allow-list expects a container: nothing of it is allowed.
            _ => None,
        }
    }
}

/// Applies the redact list, then the allow-list if any, then a narrower allow-list if any.
pub fn curate_value(
    mut data: Value,
    redact: &[String],
    allow: Option<&[String]>,
    narrow: Option<&[String]>,
) -> Value {
    for pointer in redact {
        remove(&mut data, &tokens(pointer));
    }
    for list in [allow, narrow].into_iter().flatten() {
        data = AllowTrie::compile(list).keep(data);
    }
    data
}

/// The schema-root keyword saying what happens to data the schema does not declare:
/// `"keep"` (the default) or `"drop"`. Any other value drops (fails closed).
pub const UNDECLARED_KEYWORD: &str = "x-evbus-undeclared";

/// The schema-root keyword saying whether the CloudEvent `subject` leaves under the type's
/// `x-evbus-allow`: `"keep"` keeps it; by default an allow-listed type's subject is dropped.
pub const SUBJECT_KEYWORD: &str = "x-evbus-subject";

/// Whether `version` drops what its schema does not declare (`x-evbus-undeclared`).
pub fn drops_undeclared(version: &EventVersion) -> bool {
    match version.schema().get(UNDECLARED_KEYWORD) {
        None => false,
        Some(Value::String(s)) => s != "keep",
        Some(_) => true,
    }
}

/// Whether the `subject` of an event of `version` leaves, given a webhook's own allow-list.
///
/// Without any allow-list the subject leaves. Under the type's `x-evbus-allow` it leaves only
/// if the schema says `"x-evbus-subject": "keep"`; under a webhook's `allow` it never leaves
/// (the receiver asked for the listed data pointers only).
pub fn subject_leaves(version: &EventVersion, narrow: Option<&[String]>) -> bool {
    if narrow.is_some() {
        return false;
    }
    version.allow().is_none()
        || version.schema().get(SUBJECT_KEYWORD) == Some(&Value::String("keep".into()))
}

/// The schema nodes `node` stands for: itself, the target of a local `$ref`, and its in-place
/// branches (`allOf`, `anyOf`, `oneOf`, `if`/`then`/`else`), recursively up to a depth.
fn declarations<'a>(node: &'a Value, root: &'a Value, depth: usize, out: &mut Vec<&'a Value>) {
    let Value::Object(map) = node else { return };
    if depth > 32 {
        return;
    }
    out.push(node);
    if let Some(Value::String(r)) = map.get("$ref")
        && let Some(ptr) = r.strip_prefix('#')
        && let Some(target) = root.pointer(ptr)
    {
        declarations(target, root, depth + 1, out);
    }
    for k in IN_PLACE {
        match map.get(k) {
            Some(Value::Array(branches)) => branches
                .iter()
                .for_each(|b| declarations(b, root, depth + 1, out)),
            Some(branch @ Value::Object(_)) => declarations(branch, root, depth + 1, out),
            _ => {}
        }
    }
}

/// Keeps only what the schema nodes `schemas` declare: object members named by `properties`
/// (or typed by an `additionalProperties` schema), array elements typed by `items` or
/// `prefixItems`. An undeclared member is removed; an undeclared array element becomes `null`
/// (as in the allow-list, so positions stay and curating again changes nothing).
/// `patternProperties` declares nothing here (fails closed).
fn keep_declared(value: Value, schemas: &[&Value], root: &Value, depth: usize) -> Value {
    let mut nodes = Vec::new();
    for s in schemas {
        declarations(s, root, depth, &mut nodes);
    }
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let sub: Vec<&Value> = nodes
                    .iter()
                    .filter_map(|n| {
                        n.get("properties")
                            .and_then(|p| p.get(&k))
                            .or_else(|| n.get("additionalProperties").filter(|a| a.is_object()))
                    })
                    .collect();
                if !sub.is_empty() {
                    out.insert(k, keep_declared(v, &sub, root, depth + 1));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, v) in items.into_iter().enumerate() {
                let sub: Vec<&Value> = nodes
                    .iter()
                    .filter_map(|n| {
                        n.get("prefixItems")
                            .and_then(|p| p.get(i))
                            .or_else(|| n.get("items").filter(|a| a.is_object()))
                    })
                    .collect();
                out.push(if sub.is_empty() {
                    Value::Null
                } else {
                    keep_declared(v, &sub, root, depth + 1)
                });
            }
            while out.last().is_some_and(Value::is_null) {
                out.pop();
            }
            Value::Array(out)
        }
        scalar => scalar,
    }
}

/// Removes from `data` everything `schema` (a self-contained schema, local `$ref`s only) does
/// not declare.
pub fn drop_undeclared(data: Value, schema: &Value) -> Value {
    keep_declared(data, &[schema], schema, 0)
}

/// Curates event data of the given schema version; `narrow` is a webhook's own allow-list.
/// A version with `x-evbus-undeclared: "drop"` also loses what its schema does not declare.
pub fn curate_data(version: &EventVersion, data: Value, narrow: Option<&[String]>) -> Value {
    let data = curate_value(data, version.redact(), version.allow(), narrow);
    if drops_undeclared(version) {
        drop_undeclared(data, version.schema())
    } else {
        data
    }
}

/// Curates data of `version` of type `info` for the outside: by its own version's rules and,
/// when that is not the latest, by the latest version's as well (its redactions too, only
/// what both allow-lists keep, and what the latest does not declare if it drops undeclared
/// data). A rule added in a new version is how an operator stops a field from leaving: it
/// covers the events that still name an older version (producers not upgraded yet, the
/// event log) as much as the new ones.
pub fn curate_data_of(
    info: &EventTypeInfo,
    version: &EventVersion,
    data: Value,
    narrow: Option<&[String]>,
) -> Value {
    let data = curate_data(version, data, narrow);
    let latest = info.latest();
    if version.version() == latest.version() {
        return data;
    }
    curate_data(latest, data, None)
}

/// The outbound form of `event`: curated data (through [`curate_data_of`]: its version's rules
/// and the latest version's) and no extensions.
///
/// Returns `None` for an event the outside may not see: its type is unknown or internal, or
/// its data is not JSON (nothing that cannot be curated leaves).
pub fn curate_event(
    catalog: &evbus::Catalog,
    event: &Event,
    narrow: Option<&[String]>,
) -> Option<Event> {
    let info = catalog.get(event.ty())?;
    let version = event
        .dataschema()
        .and_then(evbus::schema::parse_dataschema)
        .filter(|(t, _)| *t == event.ty())
        .and_then(|(_, v)| info.version(v))
        .unwrap_or_else(|| info.latest());
    if !version.external() || !info.latest().external() {
        return None;
    }
    let data: Value = match event.data() {
        Some(bytes) => serde_json::from_slice(bytes).ok()?,
        None => Value::Null,
    };
    let curated = curate_data_of(info, version, data, narrow);
    let mut out = event.clone();
    let names: Vec<String> = out.extensions().keys().cloned().collect();
    for name in names {
        out.remove_extension(&name);
    }
    let out = out.into_builder().json(&curated).ok()?.build().ok()?;
    if out.subject().is_none()
        || (subject_leaves(version, narrow) && subject_leaves(info.latest(), narrow))
    {
        return Some(out);
    }
    // The builder cannot unset an attribute: through the structured form.
    let mut structured = out.to_json_value().ok()?;
    structured.as_object_mut()?.remove("subject");
    Event::from_json(&structured.to_string()).ok()
}

/// Resolves local `$ref`s (`#/...`) by inlining them, up to a depth (recursive schemas keep
/// their reference past it).
fn inline_refs(node: &Value, root: &Value, depth: usize) -> Value {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref")
                && let Some(ptr) = r.strip_prefix('#')
                && depth < 16
                && let Some(target) = root.pointer(ptr)
            {
                let mut merged = match inline_refs(target, root, depth + 1) {
                    Value::Object(m) => m,
                    other => return other,
                };
                for (k, v) in map {
                    if k != "$ref" {
                        merged.insert(k.clone(), inline_refs(v, root, depth));
                    }
                }
                return Value::Object(merged);
            }
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline_refs(v, root, depth)))
                    .collect(),
            )
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| inline_refs(v, root, depth)).collect())
        }
        other => other.clone(),
    }
}

/// Subschema keywords that describe the same instance as their parent: a pointer applies to
/// them as to the parent.
const IN_PLACE: [&str; 6] = ["allOf", "anyOf", "oneOf", "if", "then", "else"];

/// Calls `f` on every in-place subschema of `map` (the branches of `allOf`, `anyOf`, …).
fn in_place(map: &mut Map<String, Value>, mut f: impl FnMut(&mut Value)) {
    for k in IN_PLACE {
        match map.get_mut(k) {
            Some(Value::Array(branches)) => branches.iter_mut().for_each(&mut f),
            Some(branch @ Value::Object(_)) => f(branch),
            _ => {}
        }
    }
}

/// Whether a schema node describes arrays.
fn is_array_schema(map: &Map<String, Value>) -> bool {
    map.contains_key("items")
        || map.contains_key("prefixItems")
        || map.get("type") == Some(&Value::String("array".into()))
}

/// Curates a schema node along the allowed paths: what no allowed pointer reaches is removed.
fn schema_keep_only(mut node: Value, allowed: &[&[String]], depth: usize) -> Value {
    if allowed.iter().any(|a| a.len() == depth) {
        return node;
    }
    if let Value::Object(map) = &mut node {
        in_place(map, |b| *b = schema_keep_only(b.take(), allowed, depth));
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            let keys: Vec<String> = props.keys().cloned().collect();
            for k in keys {
                let sub = children(allowed, depth, &k);
                if sub.is_empty() {
                    props.remove(&k);
                } else if let Some(v) = props.remove(&k) {
                    props.insert(k, schema_keep_only(v, &sub, depth + 1));
                }
            }
        }
        let element: Vec<&[String]> = allowed
            .iter()
            .filter(|a| a.len() > depth && (index(&a[depth]).is_some() || a[depth] == WILDCARD))
            .copied()
            .collect();
        for k in ["items", "prefixItems"] {
            if let Some(items) = map.remove(k)
                && !element.is_empty()
            {
                let kept = match items {
                    Value::Array(list) => Value::Array(
                        list.into_iter()
                            .map(|v| schema_keep_only(v, &element, depth + 1))
                            .collect(),
                    ),
                    other => schema_keep_only(other, &element, depth + 1),
                };
                map.insert(k.into(), kept);
            }
        }
        for k in [
            "additionalProperties",
            "patternProperties",
            "dependentSchemas",
        ] {
            map.remove(k);
        }
        prune_required(map);
    }
    node
}

fn prune_required(map: &mut Map<String, Value>) {
    let props: Vec<String> = match map.get("properties") {
        Some(Value::Object(p)) => p.keys().cloned().collect(),
        _ => Vec::new(),
    };
    if let Some(Value::Array(req)) = map.get_mut("required") {
        req.retain(|r| r.as_str().is_some_and(|r| props.iter().any(|p| p == r)));
    }
}

/// Removes from a schema node what a redact pointer names, in every place that describes it:
/// declared properties, array items, `*` members, and the branches of `allOf`/`anyOf`/….
fn schema_remove(node: &mut Value, tokens: &[String]) {
    let Some((first, rest)) = tokens.split_first() else {
        return;
    };
    let Value::Object(map) = node else { return };
    in_place(map, |b| schema_remove(b, tokens));
    let is_array = is_array_schema(map);
    if first == WILDCARD {
        if rest.is_empty() {
            for k in [
                "properties",
                "additionalProperties",
                "patternProperties",
                "items",
                "prefixItems",
                "dependentSchemas",
            ] {
                map.remove(k);
            }
            map.remove("required");
            return;
        }
        for k in ["properties", "patternProperties"] {
            if let Some(Value::Object(props)) = map.get_mut(k) {
                props.values_mut().for_each(|v| schema_remove(v, rest));
            }
        }
        for k in ["additionalProperties", "items"] {
            if let Some(v) = map.get_mut(k) {
                schema_remove(v, rest);
            }
        }
        if let Some(Value::Array(list)) = map.get_mut("prefixItems") {
            list.iter_mut().for_each(|v| schema_remove(v, rest));
        }
        return;
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        if rest.is_empty() {
            props.remove(first);
        } else if let Some(child) = props.get_mut(first) {
            schema_remove(child, rest);
        }
    }
    if rest.is_empty() {
        prune_required(map);
    }
    if is_array {
        // An index, `-` or a name on an array: curation applies it to the elements.
        let on_items: &[String] = if index(first).is_some() || first == "-" {
            rest
        } else {
            tokens
        };
        if !on_items.is_empty() {
            if let Some(items) = map.get_mut("items") {
                schema_remove(items, on_items);
            }
            if let Some(Value::Array(list)) = map.get_mut("prefixItems") {
                list.iter_mut().for_each(|v| schema_remove(v, on_items));
            }
        }
    }
}

/// Removes every `$defs`/`definitions` level and every reference left after inlining (a
/// recursion cut at the inlining depth): what is published is only the inlined tree, which
/// curation went through.
fn strip_definitions(node: &mut Value) {
    match node {
        Value::Object(map) => {
            for k in ["$defs", "definitions", "$id", "$anchor", "$dynamicAnchor"] {
                map.remove(k);
            }
            let unresolved = map.get("$ref").or_else(|| map.get("$dynamicRef")).is_some();
            if unresolved {
                map.remove("$ref");
                map.remove("$dynamicRef");
                map.insert(
                    "$comment".into(),
                    Value::String("recursive structure, cut at this depth".into()),
                );
            }
            map.values_mut().for_each(strip_definitions);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_definitions),
        _ => {}
    }
}

/// Keywords that can name properties, or hold whole instances, outside `properties`: the
/// property-wise removal above does not see into them, so a curated type publishes none.
const REVEALING: [&str; 8] = [
    "dependentRequired",
    "dependencies",
    "dependentSchemas",
    "not",
    "contains",
    "propertyNames",
    "examples",
    "default",
];

/// Removes the [`REVEALING`] keywords from every schema node of `node`, and `const`/`enum`
/// where they hold an object or an array (scalar ones name no property and stay). Keys of
/// `properties` and `patternProperties` are names, not keywords: only their schemas are
/// looked into.
fn strip_revealing(node: &mut Value) {
    let Value::Object(map) = node else { return };
    for k in REVEALING {
        map.remove(k);
    }
    let container = |v: &Value| matches!(v, Value::Object(_) | Value::Array(_));
    if map.get("const").is_some_and(container) {
        map.remove("const");
    }
    if map
        .get("enum")
        .and_then(Value::as_array)
        .is_some_and(|values| values.iter().any(container))
    {
        map.remove("enum");
    }
    for (k, v) in map.iter_mut() {
        match (k.as_str(), v) {
            ("properties" | "patternProperties", Value::Object(props)) => {
                props.values_mut().for_each(strip_revealing);
            }
            // Values, not schemas.
            ("required" | "enum" | "const" | "type", _) => {}
            (_, Value::Array(items)) => items.iter_mut().for_each(strip_revealing),
            (_, v @ Value::Object(_)) => strip_revealing(v),
            _ => {}
        }
    }
}

/// The schema of `version` as the outside sees it: references inlined, every `$defs` level
/// dropped, redacted properties removed, only allowed properties kept,
/// `x-evbus-redact`/`x-evbus-allow` dropped; for a type with either rule, also every keyword
/// that could name a property or hold a whole instance elsewhere.
pub fn curate_schema(version: &EventVersion) -> Value {
    curate_schema_by(version, &[version])
}

/// [`curate_schema`] of `version` of type `info`, by its own rules and, for an older version,
/// the latest version's too (as [`curate_data_of`] curates its events): the schema of an old
/// version does not describe a property the latest version withholds.
pub fn curate_schema_of(info: &EventTypeInfo, version: &EventVersion) -> Value {
    let latest = info.latest();
    if version.version() == latest.version() {
        curate_schema(version)
    } else {
        curate_schema_by(version, &[version, latest])
    }
}

/// The schema of `version` curated by the rules of each of `rules`.
fn curate_schema_by(version: &EventVersion, rules: &[&EventVersion]) -> Value {
    let root = version.schema();
    let mut schema = inline_refs(root, root, 0);
    strip_definitions(&mut schema);
    if let Value::Object(map) = &mut schema {
        for k in ["x-evbus-redact", "x-evbus-allow"] {
            map.remove(k);
        }
    }
    let mut ruled = false;
    for rule in rules {
        for pointer in rule.redact() {
            schema_remove(&mut schema, &tokens(pointer));
        }
        if let Some(allow) = rule.allow() {
            let allowed: Vec<Vec<String>> = allow.iter().map(|p| tokens(p)).collect();
            let allowed: Vec<&[String]> = allowed.iter().map(Vec::as_slice).collect();
            schema = schema_keep_only(schema, &allowed, 0);
        }
        ruled |= !rule.redact().is_empty() || rule.allow().is_some();
    }
    if ruled {
        strip_revealing(&mut schema);
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The curation before [`AllowTrie`] (every pointer compared at every node): the
    /// reference the trie must match byte for byte.
    fn keep_only_reference(value: Value, allowed: &[&[String]], depth: usize) -> Option<Value> {
        // An allowed pointer that ends here keeps the whole subtree.
        if allowed.iter().any(|a| a.len() == depth) {
            return Some(value);
        }
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    let sub = children(allowed, depth, &k);
                    if !sub.is_empty()
                        && let Some(v) = keep_only_reference(v, &sub, depth + 1)
                    {
                        out.insert(k, v);
                    }
                }
                Some(Value::Object(out))
            }
            Value::Array(items) => {
                // Elements keep their positions (others become null), so allowed pointers still
                // name the same elements when curated again.
                let mut out = Vec::new();
                for (i, v) in items.into_iter().enumerate() {
                    let sub = children(allowed, depth, &i.to_string());
                    let kept = if sub.is_empty() {
                        None
                    } else {
                        keep_only_reference(v, &sub, depth + 1)
                    };
                    out.push(kept.unwrap_or(Value::Null));
                }
                while out.last().is_some_and(Value::is_null) {
                    out.pop();
                }
                Some(Value::Array(out))
            }
            // A scalar where the allow-list expects a container: nothing of it is allowed.
            _ => None,
        }
    }

    #[test]
    fn redact_removes_pointers_and_ignores_absent_ones() {
        let data = json!({"order": {"email": "a@b.c", "id": "o-1", "items": [{"p": 1}, {"p": 2}]}});
        let out = curate_value(
            data,
            &[
                "/order/email".into(),
                "/nope/x".into(),
                "/order/items/0".into(),
            ],
            None,
            None,
        );
        assert_eq!(
            out,
            json!({"order": {"id": "o-1", "items": [null, {"p": 2}]}})
        );
    }

    #[test]
    fn curation_is_idempotent_with_array_pointers() {
        let data = json!({"items": [{"p": 1, "s": "x"}, {"p": 2, "s": "y"}, {"p": 3}], "z": 1});
        let redact = ["/items/0".to_string()];
        let allow = ["/items/1/p".to_string(), "/items/2".into()];
        let once = curate_value(data, &redact, Some(&allow), None);
        assert_eq!(once, json!({"items": [null, {"p": 2}, {"p": 3}]}));
        let twice = curate_value(once.clone(), &redact, Some(&allow), None);
        assert_eq!(twice, once);
        let narrow = ["/items/1".to_string()];
        let out = curate_value(once, &redact, Some(&allow), Some(&narrow));
        assert_eq!(out, json!({"items": [null, {"p": 2}]}));
    }

    #[test]
    fn allow_keeps_only_allowed_subtrees_and_narrow_narrows_further() {
        let data =
            json!({"productId": "p", "product": {"title": "T", "cost": 3, "price": {"min": 1}}});
        let allow = [
            "/productId".to_string(),
            "/product/title".into(),
            "/product/price".into(),
        ];
        let out = curate_value(data.clone(), &[], Some(&allow), None);
        assert_eq!(
            out,
            json!({"productId": "p", "product": {"title": "T", "price": {"min": 1}}})
        );
        let narrow = ["/product/price/min".to_string(), "/product/cost".into()];
        let out = curate_value(data, &[], Some(&allow), Some(&narrow));
        assert_eq!(out, json!({"product": {"price": {"min": 1}}}));
    }

    #[test]
    fn wildcard_redacts_every_element_and_member_and_names_fail_closed_on_arrays() {
        let data = json!({
            "customers": [{"n": 1, "email": "a"}, {"n": 2, "email": "b"}, 3],
            "byId": {"x": {"n": 1, "email": "c"}, "y": {"email": "d"}},
            "people": [{"email": "e", "n": 1}, [{"email": "f"}]],
            "dash": [{"k": 1, "v": 2}],
            "all": [1, 2],
        });
        let redact = [
            "/customers/*/email".to_string(),
            "/byId/*/email".into(),
            "/people/email".into(),
            "/dash/-/k".into(),
            "/all/*".into(),
        ];
        let once = curate_value(data, &redact, None, None);
        assert_eq!(
            once,
            json!({
                "customers": [{"n": 1}, {"n": 2}, 3],
                "byId": {"x": {"n": 1}, "y": {}},
                "people": [{"n": 1}, [{}]],
                "dash": [{"v": 2}],
                "all": [null, null],
            })
        );
        assert_eq!(curate_value(once.clone(), &redact, None, None), once);
    }

    #[test]
    fn wildcard_allows_every_element_and_a_name_on_an_array_keeps_nothing() {
        let data = json!({"c": [{"n": 1, "s": "x"}, {"n": 2}], "m": {"a": {"n": 1, "s": 2}}, "l": [{"n": 1}]});
        let allow = ["/c/*/n".to_string(), "/m/*/n".into(), "/l/n".into()];
        let out = curate_value(data, &[], Some(&allow), None);
        assert_eq!(
            out,
            json!({"c": [{"n": 1}, {"n": 2}], "m": {"a": {"n": 1}}, "l": []})
        );
    }

    #[test]
    fn drop_undeclared_keeps_only_what_the_schema_declares() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"x": {}}},
                "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
                "tuple": {"prefixItems": [{"type": "integer"}]},
                "map": {"additionalProperties": {"properties": {"v": {}}}},
                "both": {"allOf": [{"properties": {"p": {}}}, {"properties": {"q": {}}}]},
            },
            "$defs": {"Item": {"properties": {"n": {}}}},
        });
        let data = json!({
            "a": {"x": 1, "secret": 2},
            "list": [{"n": 1, "hidden": 2}, {"n": 2}],
            "tuple": [1, "extra"],
            "map": {"k": {"v": 1, "w": 2}},
            "both": {"p": 1, "q": 2, "r": 3},
            "undeclared": {"deep": true},
        });
        let once = drop_undeclared(data, &schema);
        assert_eq!(
            once,
            json!({
                "a": {"x": 1},
                "list": [{"n": 1}, {"n": 2}],
                "tuple": [1],
                "map": {"k": {"v": 1}},
                "both": {"p": 1, "q": 2},
            })
        );
        assert_eq!(drop_undeclared(once.clone(), &schema), once);
    }

    #[test]
    fn allow_of_a_scalar_parent_keeps_nothing_of_it() {
        let out = curate_value(json!({"a": 5}), &[], Some(&["/a/b".to_string()]), None);
        assert_eq!(out, json!({}));
    }

    /// Today's reference of [`curate_value`]'s allow step.
    fn keep_reference(data: Value, list: &[String]) -> Value {
        let allowed: Vec<Vec<String>> = list.iter().map(|p| tokens(p)).collect();
        let allowed: Vec<&[String]> = allowed.iter().map(Vec::as_slice).collect();
        keep_only_reference(data, &allowed, 0).unwrap_or(Value::Null)
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    /// Member names, raw (decoded): names, index-like names, `*`, `-`, the empty name, and
    /// the characters pointers escape.
    const KEYS: [&str; 12] = [
        "a", "b", "c", "0", "1", "2", "01", "*", "-", "", "x/y", "m~n",
    ];
    /// Pointer tokens, escaped: the same, indexes (and non-canonical ones), huge numbers.
    const TOKENS: [&str; 19] = [
        "a",
        "b",
        "c",
        "0",
        "1",
        "2",
        "3",
        "01",
        "00",
        "*",
        "*",
        "*",
        "-",
        "",
        "x~1y",
        "m~0n",
        "+1",
        "18446744073709551616",
        "99999999999999999999999",
    ];

    fn document(rng: &mut Rng, depth: usize) -> Value {
        let kind = if depth >= 5 {
            4 + rng.below(4)
        } else {
            rng.below(8)
        };
        match kind {
            0..=1 => {
                let mut map = Map::new();
                for _ in 0..rng.below(5) {
                    map.insert(rng.pick(&KEYS).to_owned(), document(rng, depth + 1));
                }
                Value::Object(map)
            }
            2..=3 => Value::Array(
                (0..rng.below(6))
                    .map(|_| document(rng, depth + 1))
                    .collect(),
            ),
            4 => Value::Null,
            5 => json!(rng.below(100)),
            6 => json!("s"),
            _ => json!(true),
        }
    }

    fn pointers(rng: &mut Rng) -> Vec<String> {
        (0..rng.below(7))
            .map(|_| {
                if rng.below(25) == 0 {
                    return String::new();
                }
                (0..1 + rng.below(5))
                    .map(|_| format!("/{}", rng.pick(&TOKENS)))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_allow_trie_curates_exactly_like_the_reference() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut kept_something = 0;
        for case in 0..30_000 {
            let data = document(&mut rng, 0);
            let list = pointers(&mut rng);
            let expected = keep_reference(data.clone(), &list);
            let trie = AllowTrie::compile(&list);
            // Memoised, not memoised at all, and past the memo budget partway through.
            for budget in [MEMO_BUDGET, 0, 40] {
                let got = trie.keep_with_budget(data.clone(), budget);
                assert_eq!(
                    serde_json::to_string(&got).unwrap(),
                    serde_json::to_string(&expected).unwrap(),
                    "case {case}, budget {budget}: data {data} allow {list:?}"
                );
            }
            if !matches!(&expected, Value::Null) && expected != json!({}) && expected != json!([]) {
                kept_something += 1;
            }
            // Through curate_value too (redact, then allow, then a narrower list).
            let narrow = pointers(&mut rng);
            let redact = pointers(&mut rng);
            let mut reference = data.clone();
            for p in &redact {
                remove(&mut reference, &tokens(p));
            }
            let reference = keep_reference(keep_reference(reference, &list), &narrow);
            let curated = curate_value(data, &redact, Some(&list), Some(&narrow));
            assert_eq!(
                serde_json::to_string(&curated).unwrap(),
                serde_json::to_string(&reference).unwrap(),
                "case {case}: redact {redact:?} allow {list:?} narrow {narrow:?}"
            );
        }
        // The generator reaches the interesting cases, not only empty results.
        assert!(kept_something > 3_000, "{kept_something}");
    }

    #[test]
    fn the_allow_trie_handles_edge_pointers_like_the_reference() {
        let data = json!({
            "": {"": 1, "a": 2}, "*": [1, {"*": 2}], "a": [[0, 1, 2, {"b": 3}], {"0": "zero"}],
            "x/y": {"m~n": 4}, "01": [5, 6], "n": null, "s": "t",
        });
        let lists: Vec<Vec<&str>> = vec![
            vec![],
            vec![""],
            vec!["/"],
            vec!["//"],
            vec!["/*"],
            vec!["/*/*"],
            vec!["/*/1", "/a/0/*"],
            vec!["/a/0/3/b", "/a/*/3"],
            vec!["/a/1/0", "/a/01", "/a/00/1"],
            vec!["/x~1y/m~0n", "/x/y"],
            vec!["/01/1", "/01/01"],
            vec!["/n/a", "/s/0", "/s"],
            vec!["/*/*/*/*", "/a/*/3/b", "/a/0/*/c"],
        ];
        for list in lists {
            let list: Vec<String> = list.into_iter().map(str::to_owned).collect();
            for budget in [MEMO_BUDGET, 0, 20] {
                assert_eq!(
                    serde_json::to_string(
                        &AllowTrie::compile(&list).keep_with_budget(data.clone(), budget)
                    )
                    .unwrap(),
                    serde_json::to_string(&keep_reference(data.clone(), &list)).unwrap(),
                    "{list:?}, budget {budget}"
                );
            }
        }
    }

    /// Not a benchmark (no assertion on time): prints the cost of the review's case, 250,000
    /// array elements under 100 wildcard pointers, for the trie and for the reference.
    /// `cargo test -p evbus-gateway --lib allow_trie_cost -- --nocapture`
    #[test]
    fn allow_trie_cost_on_a_large_array_under_many_pointers() {
        let data = json!({"userId": "u", "tags": vec![""; 250_000]});
        let list: Vec<String> = (0..100).map(|i| format!("/tags/*/k{i}")).collect();
        let copy = data.clone();
        let started = std::time::Instant::now();
        let got = AllowTrie::compile(&list).keep(copy);
        let trie = started.elapsed();
        let started = std::time::Instant::now();
        let expected = keep_reference(data, &list);
        let reference = started.elapsed();
        assert_eq!(got, expected);
        // An object under each element, and pointers that overlap at every level: 4 of them,
        // then 100 of the same shapes (the trie's time should not grow with the pointers).
        let data = json!({"tags": vec![json!({"k1": 1, "z": 2}); 250_000]});
        let shapes = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| match i % 4 {
                    0 => format!("/tags/*/k{i}"),
                    1 => format!("/*/*/k{i}"),
                    2 => format!("/tags/{i}/k1"),
                    _ => format!("/*/{i}/*"),
                })
                .collect()
        };
        let mut times = Vec::new();
        for n in [4, 100] {
            let list = shapes(n);
            let copy = data.clone();
            let started = std::time::Instant::now();
            let got = AllowTrie::compile(&list).keep(copy);
            let trie_time = started.elapsed();
            let copy = data.clone();
            let started = std::time::Instant::now();
            let expected = keep_reference(copy, &list);
            let reference_time = started.elapsed();
            assert_eq!(got, expected);
            times.push(format!(
                "{n} overlapping pointers: trie {trie_time:?}, reference {reference_time:?}"
            ));
        }
        // The floor: taking the document apart and building it again, no pointer compared.
        let copy = data.clone();
        let started = std::time::Instant::now();
        let rebuilt = rebuild(copy);
        let floor = started.elapsed();
        assert_eq!(rebuilt, data);
        // Pointers crafted so that data paths match ever new sets of them (a literal at one
        // level, `*` at the others), under a tree of every key: past the memo budget.
        let list: Vec<String> = (0..10)
            .flat_map(|l| {
                (0..5).map(move |j| {
                    (0..10)
                        .map(|d| {
                            if d == l {
                                format!("/k{j}")
                            } else {
                                "/*".to_owned()
                            }
                        })
                        .collect::<String>()
                })
            })
            .collect();
        fn tree(depth: usize) -> Value {
            if depth == 0 {
                return json!({"k0": 1, "k9": 2});
            }
            Value::Object((0..6).map(|j| (format!("k{j}"), tree(depth - 1))).collect())
        }
        let data = tree(6);
        let copy = data.clone();
        let started = std::time::Instant::now();
        let got = AllowTrie::compile(&list).keep(copy);
        let crafted = started.elapsed();
        let started = std::time::Instant::now();
        let expected = keep_reference(data, &list);
        let crafted_reference = started.elapsed();
        assert_eq!(got, expected);
        println!(
            "crafted sets (6^6 paths x 50 pointers): trie {crafted:?}, reference {crafted_reference:?}"
        );
        println!(
            "250,000 elements x 100 wildcard pointers: trie {trie:?}, reference {reference:?}; \
             250,000 objects, {}; {}; rebuilding alone {floor:?}",
            times[0], times[1]
        );
    }

    /// Takes a value apart and builds it again (what any curation walk costs at least).
    fn rebuild(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, rebuild(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(rebuild).collect()),
            other => other,
        }
    }
}
