//! Curation: what of an event may leave the gateway.
//!
//! One function, [`curate_data`], shapes every outbound payload (webhook bodies, stream frames,
//! replays); [`curate_event`] applies it to an envelope and drops the envelope attributes that
//! are internal (extensions: trace context, partition key, anything else); [`curate_schema`]
//! shapes the schemas listed by `GET /v1/event-types` the same way.
//!
//! Rules, in order: every `x-evbus-redact` pointer is removed; then, if `x-evbus-allow` is
//! present, only the allowed pointers (and what lies under them) remain; then, if a webhook
//! narrows further, only its pointers remain. A pointer that is absent from a payload is
//! ignored. Pointers follow RFC 6901 (`/order/email`, `/items/0/price`). A redacted or
//! disallowed array element becomes `null` (trailing ones are dropped) instead of shifting the
//! later elements, so curation is idempotent: curating a curated event changes nothing.

use evbus::Event;
use evbus::schema::EventVersion;
use serde_json::{Map, Value};

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

/// Removes the value at `tokens` (if present).
fn remove(value: &mut Value, tokens: &[String]) {
    let Some((last, parents)) = tokens.split_last() else {
        *value = Value::Null;
        return;
    };
    let mut node = value;
    for t in parents {
        node = match node {
            Value::Object(map) => match map.get_mut(t) {
                Some(v) => v,
                None => return,
            },
            Value::Array(items) => match t.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(v) => v,
                None => return,
            },
            _ => return,
        };
    }
    match node {
        Value::Object(map) => {
            map.remove(last);
        }
        // An array element becomes null rather than being removed: the later elements keep
        // their positions, so curating again (every outbound path does) removes nothing more.
        Value::Array(items) => {
            if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *item = Value::Null;
            }
        }
        _ => {}
    }
}

/// Keeps only what lies on or under the allowed pointers (given as token lists).
fn keep_only(value: Value, allowed: &[Vec<String>], depth: usize) -> Option<Value> {
    // An allowed pointer that ends here keeps the whole subtree.
    if allowed.iter().any(|a| a.len() == depth) {
        return Some(value);
    }
    let child = |key: &str| -> Vec<Vec<String>> {
        allowed
            .iter()
            .filter(|a| a.len() > depth && a[depth] == key)
            .cloned()
            .collect()
    };
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let sub = child(&k);
                if !sub.is_empty()
                    && let Some(v) = keep_only(v, &sub, depth + 1)
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
                let sub = child(&i.to_string());
                let kept = if sub.is_empty() {
                    None
                } else {
                    keep_only(v, &sub, depth + 1)
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
        let allowed: Vec<Vec<String>> = list.iter().map(|p| tokens(p)).collect();
        data = keep_only(data, &allowed, 0).unwrap_or(Value::Null);
    }
    data
}

/// Curates event data of the given schema version; `narrow` is a webhook's own allow-list.
pub fn curate_data(version: &EventVersion, data: Value, narrow: Option<&[String]>) -> Value {
    curate_value(data, version.redact(), version.allow(), narrow)
}

/// The outbound form of `event`: curated data (through [`curate_data`]) and no extensions.
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
    let curated = curate_data(version, data, narrow);
    let mut out = event.clone();
    let names: Vec<String> = out.extensions().keys().cloned().collect();
    for name in names {
        out.remove_extension(&name);
    }
    out.into_builder().json(&curated).ok()?.build().ok()
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

/// Curates a schema node along one path: `Some(kept)` or `None` when nothing is allowed.
fn schema_keep_only(mut node: Value, allowed: &[Vec<String>], depth: usize) -> Value {
    if allowed.iter().any(|a| a.len() == depth) {
        return node;
    }
    if let Value::Object(map) = &mut node {
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            let keys: Vec<String> = props.keys().cloned().collect();
            for k in keys {
                let sub: Vec<Vec<String>> = allowed
                    .iter()
                    .filter(|a| a.len() > depth && a[depth] == k)
                    .cloned()
                    .collect();
                if sub.is_empty() {
                    props.remove(&k);
                } else if let Some(v) = props.remove(&k) {
                    props.insert(k, schema_keep_only(v, &sub, depth + 1));
                }
            }
        }
        if let Some(items) = map.remove("items") {
            let sub: Vec<Vec<String>> = allowed
                .iter()
                .filter(|a| a.len() > depth && a[depth].parse::<usize>().is_ok())
                .cloned()
                .collect();
            if !sub.is_empty() {
                map.insert("items".into(), schema_keep_only(items, &sub, depth + 1));
            }
        }
        for k in ["additionalProperties", "patternProperties"] {
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

fn schema_remove(node: &mut Value, tokens: &[String]) {
    let Some((first, rest)) = tokens.split_first() else {
        return;
    };
    let Value::Object(map) = node else { return };
    if first.parse::<usize>().is_ok() {
        if let Some(items) = map.get_mut("items") {
            schema_remove(items, rest);
        }
        return;
    }
    if rest.is_empty() {
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            props.remove(first);
        }
        prune_required(map);
    } else if let Some(Value::Object(props)) = map.get_mut("properties")
        && let Some(child) = props.get_mut(first)
    {
        schema_remove(child, rest);
    }
}

/// The schema of `version` as the outside sees it: references inlined, redacted properties
/// removed, only allowed properties kept, `x-evbus-redact`/`x-evbus-allow` dropped.
pub fn curate_schema(version: &EventVersion) -> Value {
    let root = version.schema();
    let mut schema = inline_refs(root, root, 0);
    if let Value::Object(map) = &mut schema {
        for k in ["$defs", "definitions", "x-evbus-redact", "x-evbus-allow"] {
            map.remove(k);
        }
    }
    for pointer in version.redact() {
        schema_remove(&mut schema, &tokens(pointer));
    }
    if let Some(allow) = version.allow() {
        let allowed: Vec<Vec<String>> = allow.iter().map(|p| tokens(p)).collect();
        schema = schema_keep_only(schema, &allowed, 0);
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn allow_of_a_scalar_parent_keeps_nothing_of_it() {
        let out = curate_value(json!({"a": 5}), &[], Some(&["/a/b".to_string()]), None);
        assert_eq!(out, json!({}));
    }
}
