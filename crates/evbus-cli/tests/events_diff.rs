//! `evbus events diff`: every incompatibility the compatibility checker knows, found between
//! two catalogue directories and printed one line each; exit 0 / 1 / 2; `--from-git`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::{evbus, temp_dir, text};

fn write(path: &Path, value: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A closed event schema whose property `x` has schema `x`.
/// `evbus events diff --from FROM --to TO`.
fn diff(from: &Path, to: &Path) -> std::process::Output {
    evbus(&[
        "events",
        "diff",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ])
}

fn event(x: Value) -> Value {
    json!({"type": "object", "properties": {"x": x}, "additionalProperties": false})
}

/// `leaf` nested `depth` arrays deep: `{"items": {"items": … leaf}}` (one JSON level per
/// schema level, so the files stay under the JSON parser's recursion limit of 128).
fn nested(depth: usize, leaf: Value) -> Value {
    let mut s = leaf;
    for _ in 0..depth {
        s = json!({"items": s});
    }
    s
}

/// Every rule of the checker (crates/evbus/src/schema/compat.rs), with a change of property
/// `x` from `writer` (version 1) to `reader` (version 2) that breaks it under BACKWARD (the
/// new version reading data written with the old). The event type is named after the rule.
fn cases() -> Vec<(&'static str, Value, Value)> {
    let s = |v: Value| v;
    let tree = json!({"$defs": {"Tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}}}}});
    let _ = tree;
    vec![
        (
            "TYPE_NARROWED",
            json!({"type": ["string", "integer"]}),
            json!({"type": "string"}),
        ),
        (
            "TYPE_CHANGED",
            json!({"type": "string"}),
            json!({"type": "integer"}),
        ),
        (
            "ENUM_ARRAY_NARROWED",
            json!({"enum": ["a", "b"]}),
            json!({"enum": ["a"]}),
        ),
        (
            "ENUM_ARRAY_CHANGED",
            json!({"enum": ["a", "b"]}),
            json!({"enum": ["a", "c"]}),
        ),
        (
            "MAXIMUM_ADDED",
            json!({"type": "number"}),
            json!({"type": "number", "maximum": 10}),
        ),
        (
            "MAXIMUM_DECREASED",
            json!({"type": "number", "maximum": 10}),
            json!({"type": "number", "maximum": 5}),
        ),
        (
            "MINIMUM_ADDED",
            json!({"type": "number"}),
            json!({"type": "number", "minimum": 0}),
        ),
        (
            "MINIMUM_INCREASED",
            json!({"type": "number", "minimum": 0}),
            json!({"type": "number", "minimum": 5}),
        ),
        (
            "EXCLUSIVE_MAXIMUM_ADDED",
            json!({"type": "number"}),
            json!({"type": "number", "exclusiveMaximum": 10}),
        ),
        (
            "EXCLUSIVE_MAXIMUM_DECREASED",
            json!({"type": "number", "exclusiveMaximum": 10}),
            json!({"type": "number", "exclusiveMaximum": 5}),
        ),
        (
            "EXCLUSIVE_MINIMUM_ADDED",
            json!({"type": "number"}),
            json!({"type": "number", "exclusiveMinimum": 0}),
        ),
        (
            "EXCLUSIVE_MINIMUM_INCREASED",
            json!({"type": "number", "exclusiveMinimum": 0}),
            json!({"type": "number", "exclusiveMinimum": 5}),
        ),
        (
            "MULTIPLE_OF_ADDED",
            json!({"type": "integer"}),
            json!({"type": "integer", "multipleOf": 2}),
        ),
        (
            "MULTIPLE_OF_CHANGED",
            json!({"type": "integer", "multipleOf": 2}),
            json!({"type": "integer", "multipleOf": 3}),
        ),
        (
            "MAX_LENGTH_ADDED",
            json!({"type": "string"}),
            json!({"type": "string", "maxLength": 8}),
        ),
        (
            "MAX_LENGTH_DECREASED",
            json!({"type": "string", "maxLength": 8}),
            json!({"type": "string", "maxLength": 4}),
        ),
        (
            "MIN_LENGTH_ADDED",
            json!({"type": "string"}),
            json!({"type": "string", "minLength": 1}),
        ),
        (
            "MIN_LENGTH_INCREASED",
            json!({"type": "string", "minLength": 1}),
            json!({"type": "string", "minLength": 3}),
        ),
        (
            "PATTERN_ADDED",
            json!({"type": "string"}),
            json!({"type": "string", "pattern": "^p-"}),
        ),
        (
            "PATTERN_CHANGED",
            json!({"type": "string", "pattern": "^p-"}),
            json!({"type": "string", "pattern": "^q-"}),
        ),
        (
            "FORMAT_ADDED",
            json!({"type": "string"}),
            json!({"type": "string", "format": "email"}),
        ),
        (
            "FORMAT_CHANGED",
            json!({"type": "string", "format": "email"}),
            json!({"type": "string", "format": "uri"}),
        ),
        (
            "MAX_ITEMS_ADDED",
            json!({"type": "array"}),
            json!({"type": "array", "maxItems": 3}),
        ),
        (
            "MAX_ITEMS_DECREASED",
            json!({"type": "array", "maxItems": 3}),
            json!({"type": "array", "maxItems": 2}),
        ),
        (
            "MIN_ITEMS_ADDED",
            json!({"type": "array"}),
            json!({"type": "array", "minItems": 1}),
        ),
        (
            "MIN_ITEMS_INCREASED",
            json!({"type": "array", "minItems": 1}),
            json!({"type": "array", "minItems": 2}),
        ),
        (
            "UNIQUE_ITEMS_ADDED",
            json!({"type": "array"}),
            json!({"type": "array", "uniqueItems": true}),
        ),
        (
            "CONTAINS_ADDED",
            json!({"type": "array"}),
            json!({"type": "array", "contains": {"type": "string"}}),
        ),
        (
            "MIN_CONTAINS_INCREASED",
            json!({"type": "array", "contains": {"type": "string"}}),
            json!({"type": "array", "contains": {"type": "string"}, "minContains": 2}),
        ),
        (
            "MAX_CONTAINS_ADDED",
            json!({"type": "array", "contains": {"type": "string"}}),
            json!({"type": "array", "contains": {"type": "string"}, "maxContains": 1}),
        ),
        (
            "MAX_CONTAINS_DECREASED",
            json!({"type": "array", "contains": {"type": "string"}, "maxContains": 3}),
            json!({"type": "array", "contains": {"type": "string"}, "maxContains": 2}),
        ),
        (
            "MAX_PROPERTIES_ADDED",
            json!({"type": "object"}),
            json!({"type": "object", "maxProperties": 3}),
        ),
        (
            "MAX_PROPERTIES_DECREASED",
            json!({"type": "object", "maxProperties": 3}),
            json!({"type": "object", "maxProperties": 2}),
        ),
        (
            "MIN_PROPERTIES_ADDED",
            json!({"type": "object"}),
            json!({"type": "object", "minProperties": 1}),
        ),
        (
            "MIN_PROPERTIES_INCREASED",
            json!({"type": "object", "minProperties": 1}),
            json!({"type": "object", "minProperties": 2}),
        ),
        (
            "REQUIRED_PROPERTY_ADDED",
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
        ),
        (
            "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
            json!({"type": "object"}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        ),
        (
            "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "additionalProperties": false}),
        ),
        (
            "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}}),
        ),
        (
            "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
            json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}}),
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
        ),
        (
            "ADDITIONAL_PROPERTIES_REMOVED",
            json!({"type": "object"}),
            json!({"type": "object", "additionalProperties": false}),
        ),
        (
            "ADDITIONAL_PROPERTIES_NARROWED",
            json!({"type": "object"}),
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
        ),
        (
            "PATTERN_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
            json!({"type": "object"}),
            json!({"type": "object", "patternProperties": {"^s_": {"type": "string"}}}),
        ),
        (
            "PATTERN_PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
            json!({"type": "object", "patternProperties": {"^s_": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "additionalProperties": false}),
        ),
        (
            "DEPENDENCY_ARRAY_ADDED",
            json!({"type": "object"}),
            json!({"type": "object", "dependentRequired": {"a": ["b"]}}),
        ),
        (
            "DEPENDENCY_ARRAY_EXTENDED",
            json!({"type": "object", "dependentRequired": {"a": ["b"]}}),
            json!({"type": "object", "dependentRequired": {"a": ["b", "c"]}}),
        ),
        (
            "DEPENDENCY_SCHEMA_ADDED",
            json!({"type": "object"}),
            json!({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
        ),
        (
            "PROPERTY_NAMES_ADDED",
            json!({"type": "object"}),
            json!({"type": "object", "propertyNames": {"maxLength": 5}}),
        ),
        (
            "UNEVALUATED_PROPERTIES_CHANGED",
            json!({"type": "object"}),
            json!({"type": "object", "unevaluatedProperties": false}),
        ),
        (
            "UNEVALUATED_ITEMS_CHANGED",
            json!({"type": "array", "prefixItems": [{"type": "string"}]}),
            json!({"type": "array", "prefixItems": [{"type": "string"}], "unevaluatedItems": false}),
        ),
        // Property x is the same: version 2 names another dialect at its root (`root_for`).
        (
            "DIALECT_CHANGED",
            json!({"type": "string"}),
            json!({"type": "string"}),
        ),
        (
            "SUM_TYPE_NARROWED",
            json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
            json!({"anyOf": [{"type": "string"}]}),
        ),
        (
            "PATTERN_PROPERTY_ADDED_OVER_DECLARED_PROPERTY",
            json!({"type": "object", "properties": {"xa": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"xa": {"type": "string"}}, "additionalProperties": false, "patternProperties": {"^x": {"type": "integer"}}}),
        ),
        (
            "ONE_OF_OVERLAP",
            json!({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
            json!({"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]}),
        ),
        (
            "PRODUCT_TYPE_EXTENDED",
            json!({"type": "string"}),
            // A conjunct that repeats `"type": "string"` merges (and would be MAX_LENGTH_ADDED):
            // this one says the type differently, so it stays a conjunct.
            json!({"type": "string", "allOf": [{"type": ["string", "null"], "maxLength": 3}]}),
        ),
        (
            "NOT_TYPE_ADDED",
            json!({"type": "string"}),
            json!({"type": "string", "not": {"const": "a"}}),
        ),
        (
            "NOT_TYPE_EXTENDED",
            json!({"type": "string", "not": {"const": "a"}}),
            json!({"type": "string", "not": {"enum": ["a", "b"]}}),
        ),
        (
            "CONDITIONAL_CHANGED",
            json!({"type": "object"}),
            json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
        ),
        (
            "FALSE_SCHEMA_ADDED",
            json!({"type": "string"}),
            json!(false),
        ),
        (
            "REFERENCE_CHANGED",
            json!({"type": "object", "properties": {"kids": {"type": "array"}}}),
            json!({"$ref": "#/$defs/Tree"}),
        ),
        (
            "SCHEMA_TOO_DEEP",
            nested(70, json!({"type": "string"})),
            s(nested(70, json!({"type": "integer"}))),
        ),
        (
            "PATTERN_PROPERTY_ADDED_OVER_PATTERN_PROPERTY",
            json!({"type": "object", "additionalProperties": false, "patternProperties": {"^x-": {"type": "string"}}}),
            json!({"type": "object", "additionalProperties": false, "patternProperties": {"^x-": {"type": "string"}, "^x": {"type": "integer"}}}),
        ),
        (
            // References that expand past the checker's bound (each definition twice in the
            // next): only a description differs, and still it cannot be compared.
            "SCHEMA_TOO_LARGE",
            doubling(20, None),
            doubling(20, Some("the same")),
        ),
    ]
}

/// Property x as `depth` local definitions, each referencing the one before twice (2^depth
/// schema objects expanded), with a `description` if given.
fn doubling(depth: usize, description: Option<&str>) -> Value {
    let mut defs = serde_json::Map::new();
    defs.insert("D0".to_owned(), json!({"type": "string"}));
    for k in 1..=depth {
        let previous = format!("#/properties/x/$defs/D{}", k - 1);
        defs.insert(
            format!("D{k}"),
            json!({"type": "object", "properties": {"a": {"$ref": previous}, "b": {"$ref": previous}}}),
        );
    }
    let mut x = json!({"$defs": defs, "$ref": format!("#/properties/x/$defs/D{depth}")});
    if let Some(d) = description {
        x["description"] = json!(d);
    }
    x
}

/// The root keyword a case's version 2 adds, the change the case is about.
fn root_for(rule: &str) -> Option<(&'static str, Value)> {
    (rule == "DIALECT_CHANGED")
        .then(|| ("$schema", json!("http://json-schema.org/draft-07/schema#")))
}

/// Where a case's finding is: under property x, or at the root keyword it changes.
fn path_of(rule: &str) -> String {
    root_for(rule).map_or_else(|| "/properties/x".to_owned(), |(k, _)| format!("/{k}"))
}

/// The root `$defs` a case's version 2 needs.
fn defs_for(rule: &str) -> Option<Value> {
    (rule == "REFERENCE_CHANGED").then(|| {
        json!({"Tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}}}})
    })
}

/// The rule names written in the checker's source: every quoted SCREAMING_SNAKE_CASE string
/// except the mode names, the serde attribute, the bases of composed names and the fallback
/// that no composed name reaches.
fn rules_in_checker() -> BTreeSet<String> {
    let source = include_str!("../../evbus/src/schema/compat.rs");
    let not_rules = [
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
        "NONE",
        "SCREAMING_SNAKE_CASE",
        "MAXIMUM",
        "MINIMUM",
        "EXCLUSIVE_MAXIMUM",
        "EXCLUSIVE_MINIMUM",
        "MAX_LENGTH",
        "MIN_LENGTH",
        "MAX_ITEMS",
        "MIN_ITEMS",
        "MAX_PROPERTIES",
        "MIN_PROPERTIES",
        "LIMIT_CHANGED",
    ];
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.len() > 3
                && s.starts_with(|c: char| c.is_ascii_uppercase())
                && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                && !not_rules.contains(s)
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_cases_cover_every_rule_of_the_checker() {
    let covered: BTreeSet<String> = cases().iter().map(|(r, _, _)| (*r).to_owned()).collect();
    let known = rules_in_checker();
    assert_eq!(
        covered, known,
        "a rule of compat.rs has no case here, or a case names no rule"
    );
    assert_eq!(covered.len(), cases().len(), "one case per rule");
}

#[test]
fn every_incompatibility_kind_is_one_breaking_line_and_exit_1() {
    let from = temp_dir("diff-from");
    let to = temp_dir("diff-to");
    for (rule, writer, reader) in cases() {
        write(
            &from.join(format!("events/{rule}.json")),
            &event(writer.clone()),
        );
        write(&to.join(format!("events/{rule}/1.json")), &event(writer));
        let mut v2 = event(reader);
        if let Some(defs) = defs_for(rule) {
            v2["$defs"] = defs;
        }
        if let Some((k, v)) = root_for(rule) {
            v2[k] = v;
        }
        write(&to.join(format!("events/{rule}.json")), &v2);
    }
    let out = diff(&from, &to);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for (rule, _, _) in cases() {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("breaking {rule} v1 -> v2 ")))
            .unwrap_or_else(|| panic!("no finding for {rule}:\n{stdout}"));
        assert!(
            line.contains(&format!(
                " {rule} (BACKWARD): v2 reading data written with v1: "
            )),
            "{line}"
        );
        // The JSON pointer names where in the schema: under property x, or the root keyword.
        let path = line.split(' ').nth(5).unwrap();
        assert!(path.starts_with(&path_of(rule)), "{line}");
    }
    assert!(
        !stdout.lines().any(|l| l.starts_with("compatible ")),
        "{stdout}"
    );
    let err = text(&out.stderr);
    assert!(err.contains("breaking, 0 compatible changes"), "{err}");
}

#[test]
fn the_json_format_has_one_object_per_finding() {
    let from = temp_dir("diff-json-from");
    let to = temp_dir("diff-json-to");
    let v1 = event(json!({"type": "string"}));
    write(&from.join("events/t.json"), &v1);
    write(&to.join("events/t/1.json"), &v1);
    write(
        &to.join("events/t.json"),
        &event(json!({"type": "integer"})),
    );
    let out = evbus(&[
        "events",
        "diff",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "t");
    assert_eq!(lines[0]["severity"], "breaking");
    assert_eq!(lines[0]["kind"], "INCOMPATIBLE");
    assert_eq!(lines[0]["rule"], "TYPE_CHANGED");
    assert_eq!(lines[0]["path"], "/properties/x/type");
    assert_eq!(lines[0]["direction"], "BACKWARD");
    assert_eq!(
        (
            lines[0]["from_version"].as_u64(),
            lines[0]["to_version"].as_u64()
        ),
        (Some(1), Some(2))
    );
}

#[test]
fn compatible_changes_exit_0_and_are_listed() {
    let from = temp_dir("diff-ok-from");
    let to = temp_dir("diff-ok-to");
    let v1 = json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"], "additionalProperties": false});
    let mut v2 = v1.clone();
    v2["properties"]["note"] = json!({"type": "string"});
    write(&from.join("events/grows.json"), &v1);
    write(&to.join("events/grows/1.json"), &v1);
    write(&to.join("events/grows.json"), &v2);
    write(&from.join("events/same.json"), &v1);
    write(&to.join("events/same.json"), &v1);
    write(&to.join("events/fresh.json"), &v1);
    let out = diff(&from, &to);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "compatible fresh - -> v1 / TYPE_ADDED: new event type (v1, BACKWARD)\n\
         compatible grows v1 -> v2 / VERSION_ADDED: new version 2, BACKWARD compatible with v1\n"
    );
    assert!(text(&out.stderr).contains("0 breaking, 2 compatible changes"));

    // The same catalogue twice: nothing to say.
    let out = evbus(&[
        "events",
        "diff",
        "--from",
        to.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn the_same_change_breaks_forward_under_full() {
    let from = temp_dir("diff-full-from");
    let to = temp_dir("diff-full-to");
    let v1 = json!({"x-evbus-compatibility": "FULL", "type": "object", "properties": {"id": {"type": "string"}}, "additionalProperties": false});
    let mut v2 = v1.clone();
    v2["properties"]["note"] = json!({"type": "string"});
    write(&from.join("events/t.json"), &v1);
    write(&to.join("events/t/1.json"), &v1);
    write(&to.join("events/t.json"), &v2);
    let out = diff(&from, &to);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "breaking t v1 -> v2 /properties/note PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL (FORWARD): \
         v1 reading data written with v2: property \"note\" was removed, but the reader's content \
         model is closed (additionalProperties: false), so data that has \"note\" is refused\n"
    );
}

#[test]
fn usage_errors_and_unreadable_catalogues_exit_2() {
    let good = temp_dir("diff-good");
    write(
        &good.join("events/t.json"),
        &event(json!({"type": "string"})),
    );
    let bad = temp_dir("diff-bad");
    std::fs::create_dir_all(bad.join("events")).unwrap();
    std::fs::write(bad.join("events/t.json"), "{not json").unwrap();
    let missing = good.join("nowhere");
    let g = good.to_str().unwrap();
    for (args, expect) in [
        (vec!["events", "diff", "--to", g], "--from"),
        (
            vec![
                "events",
                "diff",
                "--from",
                g,
                "--from-git",
                "HEAD",
                "--to",
                g,
            ],
            "cannot be used with",
        ),
        (
            vec![
                "events",
                "diff",
                "--from",
                missing.to_str().unwrap(),
                "--to",
                g,
            ],
            "--from: cannot read schema directory",
        ),
        (
            vec!["events", "diff", "--from", g, "--to", bad.to_str().unwrap()],
            "--to: ",
        ),
        (
            vec!["events", "diff", "--from", g, "--to", g, "--format", "yaml"],
            "invalid value 'yaml'",
        ),
    ] {
        let out = evbus(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = evbus(&["events", "diff", "--from", g, "--to", bad.to_str().unwrap()]);
    assert!(
        text(&out.stderr).contains("is not valid JSON (line 1, column 2)"),
        "{}",
        text(&out.stderr)
    );
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=evbus test",
            "-c",
            "user.email=test@evbus.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
}

#[test]
fn from_git_compares_the_directory_at_a_reference() {
    let repo = temp_dir("diff-git");
    git(&repo, &["init", "-q", "-b", "main"]);
    let cat = repo.join("schemas");
    let v1 = event(json!({"type": "string"}));
    write(&cat.join("events/t.json"), &v1);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "v1"]);
    // The working tree moves t to version 2 (breaking) and keeps version 1 as history.
    write(&cat.join("events/t/1.json"), &v1);
    write(
        &cat.join("events/t.json"),
        &event(json!({"type": "string", "maxLength": 3})),
    );
    let out = evbus(&[
        "events",
        "diff",
        "--from-git",
        "main",
        "--to",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "breaking t v1 -> v2 /properties/x/maxLength MAX_LENGTH_ADDED (BACKWARD): v2 reading data \
         written with v1: the reader adds maxLength 3 that the writer did not have\n"
    );
    // Nothing in the repository changed: the work tree still has the new files.
    assert!(cat.join("events/t/1.json").exists());

    // An unknown reference, and a directory outside any work tree, are usage errors.
    let out = evbus(&[
        "events",
        "diff",
        "--from-git",
        "no-such-branch",
        "--to",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown git reference \"no-such-branch\""),
        "{}",
        text(&out.stderr)
    );

    // A catalogue the reference does not have yet: everything is new.
    let fresh = repo.join("other");
    write(&fresh.join("events/u.json"), &v1);
    let out = evbus(&[
        "events",
        "diff",
        "--from-git",
        "main",
        "--to",
        fresh.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "compatible u - -> v1 / TYPE_ADDED: new event type (v1, BACKWARD)\n"
    );
    assert!(
        text(&out.stderr).contains("main has no other; comparing with an empty catalogue"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_change_through_a_shared_definition_names_the_definition() {
    let from = temp_dir("diff-def-from");
    let to = temp_dir("diff-def-to");
    let order =
        json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]});
    let t =
        json!({"type": "object", "properties": {"order": {"$ref": "../definitions/Order.json"}}});
    write(&from.join("definitions/Order.json"), &order);
    write(&from.join("events/t.json"), &t);
    // The proposed catalogue keeps version 1 of t as it was, in the history, adds version 2,
    // and makes a property of the shared definition required.
    let mut order2 = order.clone();
    order2["properties"]["currency"] = json!({"type": "string"});
    order2["required"] = json!(["id", "currency"]);
    write(&to.join("definitions/Order.json"), &order2);
    write(&to.join("events/t/1.json"), &t);
    let mut t2 = t.clone();
    t2["properties"]["note"] = json!({});
    write(&to.join("events/t.json"), &t2);
    let out = diff(&from, &to);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("breaking t v1 -> v1 /properties/order/required "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains(
            "version 1 is unchanged, but the shared definition it references changed \
             (definitions/Order.json)"
        ),
        "{line}"
    );
    assert!(
        !stdout.contains("keep this one in events/t/1.json"),
        "{stdout}"
    );
}

#[test]
fn a_proposed_catalogue_that_does_not_load_is_breaking() {
    let from = temp_dir("diff-mode-from");
    let to = temp_dir("diff-mode-to");
    let v1 = event(json!({"type": "string"}));
    let mut v2 = v1.clone();
    v2["properties"]["note"] = json!({"type": "string"});
    for dir in [&from, &to] {
        write(&dir.join("events/t/1.json"), &v1);
    }
    write(&from.join("events/t.json"), &v2);
    // The pull request only makes the mode stricter: version 2 is not FORWARD compatible.
    let mut full = v2.clone();
    full["x-evbus-compatibility"] = json!("FULL");
    write(&to.join("events/t.json"), &full);
    // What every service does with the proposed catalogue: refuse to load it.
    let list = evbus(&["events", "list", "--schemas", to.to_str().unwrap()]);
    assert_eq!(list.status.code(), Some(2), "{}", text(&list.stderr));

    let out = diff(&from, &to);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.lines().any(|l| l.starts_with(
            "breaking t v1 -> v2 /properties/note PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL (FORWARD): "
        ) && l.ends_with("so no service loads it")),
        "{stdout}"
    );
}
