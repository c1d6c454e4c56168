//! An example payload built from a curated schema, for `GET /v1/event-types` (and so the
//! portal): every declared field with a plausible value of its type.
//!
//! Only scalar hints of the schema are used (`const`, `enum`, `examples`, `default` when they
//! are strings, numbers, booleans or null): an object or array given as an example is never
//! copied, since it could hold what curation removes. The result is then curated like any
//! outbound payload ([`curate_data`](crate::curation::curate_data)).

use serde_json::{Map, Value, json};

/// How deep the example goes (recursive schemas stop here with `null`).
const MAX_DEPTH: usize = 12;

/// The example of `schema` (a curated schema: references already inlined).
pub(crate) fn example(schema: &Value) -> Value {
    build(schema, 0)
}

fn scalar(v: Option<&Value>) -> Option<Value> {
    v.filter(|v| !v.is_object() && !v.is_array()).cloned()
}

fn build(schema: &Value, depth: usize) -> Value {
    let Value::Object(map) = schema else {
        return Value::Null;
    };
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    if let Some(v) = scalar(map.get("const"))
        .or_else(|| scalar(map.get("examples").and_then(|e| e.get(0))))
        .or_else(|| scalar(map.get("default")))
        .or_else(|| scalar(map.get("enum").and_then(|e| e.get(0))))
    {
        return v;
    }
    if let Some(Value::Array(branches)) = map.get("allOf") {
        let mut merged = Map::new();
        let mut other = None;
        for branch in branches {
            match build(branch, depth + 1) {
                Value::Object(m) => merged.extend(m),
                Value::Null => {}
                v => other = Some(v),
            }
        }
        let own = own_value(map, depth);
        if let Value::Object(m) = own {
            merged.extend(m);
        } else if merged.is_empty() {
            return other.unwrap_or(own);
        }
        return Value::Object(merged);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(Value::Array(branches)) = map.get(key) {
            // The first branch that is not only `null`.
            let first = branches
                .iter()
                .map(|b| build(b, depth + 1))
                .find(|v| !v.is_null());
            if let Some(v) = first {
                return v;
            }
        }
    }
    own_value(map, depth)
}

/// The declared type of a schema node, `null` last.
fn type_of(map: &Map<String, Value>) -> Option<&str> {
    match map.get("type") {
        Some(Value::String(t)) => Some(t),
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            names
                .iter()
                .find(|t| **t != "null")
                .or(names.first())
                .copied()
        }
        _ if map.contains_key("properties") => Some("object"),
        _ if map.contains_key("items") || map.contains_key("prefixItems") => Some("array"),
        _ => None,
    }
}

fn own_value(map: &Map<String, Value>, depth: usize) -> Value {
    match type_of(map) {
        Some("object") => {
            let mut out = Map::new();
            if let Some(Value::Object(props)) = map.get("properties") {
                for (name, sub) in props {
                    out.insert(name.clone(), build(sub, depth + 1));
                }
            }
            Value::Object(out)
        }
        Some("array") => {
            if let Some(Value::Array(prefix)) = map.get("prefixItems") {
                return Value::Array(prefix.iter().map(|s| build(s, depth + 1)).collect());
            }
            match map.get("items") {
                Some(items @ Value::Object(_)) => Value::Array(vec![build(items, depth + 1)]),
                _ => json!([]),
            }
        }
        Some("string") => {
            let by_format = match map.get("format").and_then(Value::as_str) {
                Some("date-time") => Some("2026-01-01T12:00:00Z"),
                Some("date") => Some("2026-01-01"),
                Some("time") => Some("12:00:00Z"),
                Some("email") => Some("someone@example.com"),
                Some("uri" | "url" | "iri") => Some("https://example.com/"),
                Some("uuid") => Some("123e4567-e89b-12d3-a456-426614174000"),
                _ => None,
            };
            if let Some(s) = by_format {
                return json!(s);
            }
            let min = map.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            let max = map
                .get("maxLength")
                .and_then(Value::as_u64)
                .map(|m| m as usize);
            // A string the pattern matches, when it also fits the length bounds.
            if let Some(s) = map
                .get("pattern")
                .and_then(Value::as_str)
                .and_then(matching)
                .filter(|s| {
                    let n = s.chars().count();
                    n >= min && max.is_none_or(|m| n <= m)
                })
            {
                return json!(s);
            }
            let mut s = String::from("string");
            while s.len() < min.min(64) {
                s.push('x');
            }
            if let Some(max) = max {
                s.truncate(max);
            }
            json!(s)
        }
        Some(t @ ("integer" | "number")) => {
            let min = map.get("minimum").and_then(Value::as_f64).or_else(|| {
                map.get("exclusiveMinimum")
                    .and_then(Value::as_f64)
                    .map(|m| m + 1.0)
            });
            let n = min.unwrap_or(0.0).max(0.0).min(
                map.get("maximum")
                    .and_then(Value::as_f64)
                    .unwrap_or(f64::MAX),
            );
            if t == "integer" {
                json!(n.ceil() as i64)
            } else {
                json!(n)
            }
        }
        Some("boolean") => json!(true),
        _ => Value::Null,
    }
}

/// A short string that `pattern` matches, built from its syntax: literals as written, a
/// class by a letter or digit of it (else its first printable character), each repetition
/// its minimum times, an alternation's first branch, anchors as nothing. `None` for a
/// pattern the parser does not take (JSON Schema patterns are ECMA-262; most are also Rust
/// syntax) or one that would give more than 256 characters.
fn matching(pattern: &str) -> Option<String> {
    use regex_syntax::hir::{Class, Hir, HirKind};
    fn pick(ranges: impl Iterator<Item = (char, char)> + Clone) -> Option<char> {
        let nice = |c: char| c.is_ascii_alphanumeric();
        let printable = |c: char| !c.is_control() && !c.is_whitespace();
        for good in [&nice as &dyn Fn(char) -> bool, &printable] {
            for (lo, hi) in ranges.clone() {
                // A few characters into each range is enough to find one.
                if let Some(c) = (lo..=hi).take(128).find(|&c| good(c)) {
                    return Some(c);
                }
            }
        }
        ranges.clone().next().map(|(lo, _)| lo)
    }
    fn walk(h: &Hir, out: &mut String, budget: &mut usize) -> Option<()> {
        *budget = budget.checked_sub(1)?;
        match h.kind() {
            HirKind::Empty | HirKind::Look(_) => {}
            HirKind::Literal(l) => out.push_str(std::str::from_utf8(&l.0).ok()?),
            HirKind::Class(Class::Unicode(c)) => {
                out.push(pick(c.ranges().iter().map(|r| (r.start(), r.end())))?);
            }
            HirKind::Class(Class::Bytes(c)) => out.push(pick(
                c.ranges()
                    .iter()
                    .filter(|r| r.start().is_ascii())
                    .map(|r| (char::from(r.start()), char::from(r.end().min(0x7f)))),
            )?),
            HirKind::Repetition(r) => {
                for _ in 0..r.min {
                    walk(&r.sub, out, budget)?;
                }
            }
            HirKind::Capture(c) => walk(&c.sub, out, budget)?,
            HirKind::Concat(parts) => {
                for part in parts {
                    walk(part, out, budget)?;
                }
            }
            HirKind::Alternation(branches) => walk(branches.first()?, out, budget)?,
        }
        (out.len() <= 256).then_some(())
    }
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .ok()?;
    let mut out = String::new();
    walk(&hir, &mut out, &mut 4096)?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_declared_field_from_scalar_hints_only() {
        let schema = json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "minLength": 8},
                "at": {"type": "string", "format": "date-time"},
                "status": {"enum": ["new", "paid"]},
                "count": {"type": "integer", "minimum": 1},
                "tags": {"type": "array", "items": {"type": "string"}},
                "nested": {"type": ["object", "null"], "properties": {"ok": {"type": "boolean"}}},
                "leaky": {"type": "object", "examples": [{"email": "a@b.c"}], "properties": {"x": {"type": "number"}}},
                "either": {"anyOf": [{"type": "null"}, {"type": "string", "examples": ["hello"]}]},
                "both": {"allOf": [{"properties": {"a": {"const": 1}}}, {"properties": {"b": {"const": 2}}}]}
            }
        });
        assert_eq!(
            example(&schema),
            json!({
                "id": "stringxx", "at": "2026-01-01T12:00:00Z", "status": "new", "count": 1,
                "tags": ["string"], "nested": {"ok": true}, "leaky": {"x": 0.0},
                "either": "hello", "both": {"a": 1, "b": 2}
            })
        );
    }

    #[test]
    fn strings_match_their_pattern_when_it_can_be_followed() {
        let s = |schema: Value| example(&schema);
        assert_eq!(
            s(json!({"type": "string", "pattern": "^[A-Z]{3}$"})),
            json!("AAA")
        );
        assert_eq!(
            s(json!({"type": "string", "pattern": "^\\d{4}-\\d{2}$"})),
            json!("0000-00")
        );
        assert_eq!(
            s(json!({"type": "string", "pattern": "^(EUR|USD)$"})),
            json!("EUR")
        );
        assert_eq!(
            s(json!({"type": "string", "pattern": "^.+@.+$"})),
            json!("0@0")
        );
        // Not Rust syntax (a lookahead), or too short for minLength: as before.
        assert_eq!(
            s(json!({"type": "string", "pattern": "^(?=a)a$"})),
            json!("string")
        );
        assert_eq!(
            s(json!({"type": "string", "pattern": "^a", "minLength": 3})),
            json!("string")
        );
    }

    #[test]
    fn recursive_or_odd_schemas_end() {
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "object", "properties": {"next": deep}});
        }
        let out = example(&deep);
        assert!(out.is_object());
        assert_eq!(example(&json!(true)), Value::Null);
        assert_eq!(
            example(&json!({"type": "string", "maxLength": 3})),
            json!("str")
        );
    }
}
