//! The compatibility checker against the validator: a change the checker accepts must not
//! make a reader refuse data the writer accepted, and the refusals name the right keyword.
//! Each refused case carries a witness payload — valid under the writer version, refused by
//! the reader version — so the refusal is shown to be a real break, not a cautious guess.
//!
//! Also: `Catalog::diff` on a change that comes from a shared definition rather than from the
//! event's own file says so, and advises something the user can do.

use evbus::Event;
use evbus::schema::{Catalog, ChangeKind, Compatibility, SchemaErrorKind, Severity};
use serde_json::{Value, json};

/// A catalogue holding `versions` of type `e` without checking them against each other: the
/// validator's view of each version.
fn unchecked(defs: &[(&str, Value)], versions: &[Value]) -> Catalog {
    let mut b = Catalog::builder();
    b.check_compatibility(false);
    for (name, d) in defs {
        b.define(name, d.clone()).unwrap();
    }
    for v in versions {
        b.register_json("e", v.clone()).unwrap();
    }
    b.freeze().unwrap()
}

/// Registers version 1 then version 2 of `e` under `mode`: the error text of a refusal, with
/// the rules it names.
fn register(
    mode: Compatibility,
    defs: &[(&str, Value)],
    v1: &Value,
    v2: &Value,
) -> Result<(), (String, Vec<&'static str>)> {
    let mut b = Catalog::builder();
    b.type_compatibility("e", mode);
    for (name, d) in defs {
        b.define(name, d.clone()).unwrap();
    }
    b.register_json("e", v1.clone()).unwrap();
    match b.register_json("e", v2.clone()) {
        Ok(_) => {
            b.freeze().unwrap();
            Ok(())
        }
        Err(e) => {
            assert_eq!(e.kind(), SchemaErrorKind::Incompatible, "{e}");
            let rules = e.incompatibilities().iter().map(|i| i.rule()).collect();
            Err((e.to_string(), rules))
        }
    }
}

/// `data` is valid under version `writer` of `e` and refused by version `reader`.
fn breaks(c: &Catalog, writer: u32, reader: u32, data: &Value) {
    assert!(
        c.validate_version("e", writer, data).is_ok(),
        "witness {data} is not valid under the writer v{writer}"
    );
    assert!(
        c.validate_version("e", reader, data).is_err(),
        "witness {data} is read by v{reader}: the change does not break it"
    );
}

/// The 2020-12 way to build an event on a shared definition and keep it closed: `$ref` next
/// to the event's own properties, `unevaluatedProperties: false` (`additionalProperties`
/// would refuse the definition's properties).
fn base() -> [(&'static str, Value); 1] {
    [(
        "Base",
        json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}),
    )]
}

fn on_base(props: Value) -> Value {
    json!({
        "$ref": "../definitions/Base.json",
        "type": "object",
        "properties": props,
        "unevaluatedProperties": false
    })
}

#[test]
fn removing_a_property_from_a_model_closed_by_unevaluated_properties_is_not_backward() {
    let v1 = on_base(json!({"note": {"type": "string"}}));
    let v2 = on_base(json!({}));
    let (text, rules) = register(Compatibility::Backward, &base(), &v1, &v2).unwrap_err();
    assert_eq!(
        rules,
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
        "{text}"
    );
    assert!(text.contains("/properties/note"), "{text}");
    assert!(text.contains("(unevaluatedProperties: false)"), "{text}");
    // Why: an event written with v1 that has `note` is refused by v2 consumers.
    breaks(
        &unchecked(&base(), &[v1, v2]),
        1,
        2,
        &json!({"id": "p-1", "note": "gift"}),
    );

    // The same without a definition.
    let closed = |props: Value| json!({"type": "object", "properties": props, "unevaluatedProperties": false});
    let v1 = closed(json!({"id": {"type": "string"}, "note": {"type": "string"}}));
    let v2 = closed(json!({"id": {"type": "string"}}));
    let (text, rules) = register(Compatibility::Backward, &[], &v1, &v2).unwrap_err();
    assert_eq!(
        rules,
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
        "{text}"
    );
    breaks(&unchecked(&[], &[v1, v2]), 1, 2, &json!({"note": "gift"}));

    // Beside alternatives that evaluate properties too, `unevaluatedProperties` is not the
    // content model of the object alone, and closing it where it was open stays a refusal.
    let v1 = json!({"type": "object", "anyOf": [{"properties": {"a": {"type": "string"}}}]});
    let v2 = json!({
        "type": "object",
        "anyOf": [{"properties": {"a": {"type": "string"}}}],
        "unevaluatedProperties": false
    });
    let (text, rules) = register(Compatibility::Backward, &[], &v1, &v2).unwrap_err();
    assert!(rules.contains(&"UNEVALUATED_PROPERTIES_CHANGED"), "{text}");
    breaks(&unchecked(&[], &[v1, v2]), 1, 2, &json!({"b": 1}));
}

#[test]
fn adding_an_optional_property_to_a_model_closed_by_unevaluated_properties() {
    let v1 = on_base(json!({"note": {"type": "string"}}));
    let v2 = on_base(json!({"note": {"type": "string"}, "tag": {"type": "string"}}));

    // BACKWARD: v1 data cannot hold `tag` (the model is closed), so v2 reads all of it.
    register(Compatibility::Backward, &base(), &v1, &v2)
        .unwrap_or_else(|(text, _)| panic!("a safe change refused: {text}"));

    // FORWARD: a v1 reader refuses v2 data that uses `tag`.
    let (text, rules) = register(Compatibility::Forward, &base(), &v1, &v2).unwrap_err();
    assert_eq!(
        rules,
        ["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
        "{text}"
    );
    assert!(
        text.contains("[FORWARD: v1 reading data written with v2] /properties/tag"),
        "{text}"
    );
    let both = unchecked(&base(), &[v1.clone(), v2]);
    let data = json!({"id": "p-1", "tag": "new"});
    breaks(&both, 2, 1, &data);
    // A consumer still on v1 dead-letters such an event: exactly what FORWARD must prevent.
    let consumer = unchecked(&base(), &[v1]);
    let event = Event::builder("e", "/test")
        .dataschema("urn:evbus:schema:e:2")
        .json(&data)
        .unwrap()
        .build()
        .unwrap();
    let refused = consumer.read_event(&event).unwrap_err();
    assert!(
        refused.to_string().contains("version 2 is newer"),
        "{refused}"
    );
}

#[test]
fn contains_counts_are_compared() {
    let arr = |extra: Value| {
        let mut a = json!({"type": "array", "contains": {"const": 1}});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        json!({"type": "object", "properties": {"a": a}})
    };
    let cases = [
        (
            json!({}),
            json!({"maxContains": 1}),
            Some("MAX_CONTAINS_ADDED"),
            json!({"a": [1, 1]}),
        ),
        (
            json!({"maxContains": 3}),
            json!({"maxContains": 2}),
            Some("MAX_CONTAINS_DECREASED"),
            json!({"a": [1, 1, 1]}),
        ),
        (
            json!({}),
            json!({"minContains": 2}),
            Some("MIN_CONTAINS_INCREASED"),
            json!({"a": [1]}),
        ),
        // Relaxing is fine.
        (json!({"minContains": 2}), json!({}), None, json!({})),
        (
            json!({"maxContains": 2}),
            json!({"maxContains": 3}),
            None,
            json!({}),
        ),
        // A writer that holds at most two items holds at most two matching ones.
        (
            json!({"maxItems": 2}),
            json!({"maxItems": 2, "maxContains": 2}),
            None,
            json!({}),
        ),
    ];
    for (w, r, rule, witness) in cases {
        let (v1, v2) = (arr(w), arr(r));
        let result = register(Compatibility::Backward, &[], &v1, &v2);
        match rule {
            Some(rule) => {
                let (text, rules) = result.unwrap_err();
                assert_eq!(rules, [rule], "{text}");
                assert!(text.contains("/properties/a/"), "{text}");
                breaks(&unchecked(&[], &[v1, v2]), 1, 2, &witness);
            }
            None => {
                result.unwrap_or_else(|(text, _)| panic!("{v1} -> {v2}: refused: {text}"));
            }
        }
    }
}

#[test]
fn limits_written_as_integral_floats_are_limits() {
    // `5.0` is the integer 5 to JSON Schema, and the validator enforces it.
    let v1 = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let v2 = json!({"type": "object", "properties": {"a": {"type": "string", "maxLength": 5.0}}});
    let (text, rules) = register(Compatibility::Backward, &[], &v1, &v2).unwrap_err();
    assert_eq!(rules, ["MAX_LENGTH_ADDED"], "{text}");
    breaks(
        &unchecked(&[], &[v1, v2]),
        1,
        2,
        &json!({"a": "longer than five"}),
    );
}

/// A catalogue of one definition `Order` and event type `t` (versions as given).
fn with_order(order: Value, versions: &[Value]) -> Catalog {
    let mut b = Catalog::builder();
    b.check_compatibility(false);
    b.define("Order", order).unwrap();
    for v in versions {
        b.register_json("t", v.clone()).unwrap();
    }
    b.freeze().unwrap()
}

#[test]
fn diff_says_when_a_version_changed_through_a_shared_definition() {
    let order_v1 =
        json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]});
    let order_v2 = json!({
        "type": "object",
        "properties": {"id": {"type": "string"}, "currency": {"type": "string"}},
        "required": ["id", "currency"]
    });
    let t1 =
        json!({"type": "object", "properties": {"order": {"$ref": "../definitions/Order.json"}}});
    let mut t1_in_history = t1.clone();
    t1_in_history["x-evbus-version"] = json!(1);
    let from = with_order(order_v1.clone(), std::slice::from_ref(&t1));
    // The team kept version 1 as it was (moved to the history) and changed the definition.
    let to = with_order(order_v2, &[t1_in_history, t1.clone()]);
    let changes = from.diff(&to);
    let in_place: Vec<_> = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::VersionChanged)
        .collect();
    assert!(!in_place.is_empty(), "{changes:#?}");
    for c in &in_place {
        assert_eq!(c.severity, Severity::Breaking, "{c}");
        assert!(
            c.message.contains("version 1 is unchanged, but the shared definition it references changed (definitions/Order.json)"),
            "{c}"
        );
        // Not the advice for an edited file, which the user has already followed.
        assert!(
            !c.message.contains("publish the change as a new version"),
            "{c}"
        );
    }

    // An annotation of the definition: compatible, and said to come from the definition.
    let mut described = order_v1.clone();
    described["description"] = json!("An order.");
    let to = with_order(described, std::slice::from_ref(&t1));
    let changes = from.diff(&to);
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0].severity, Severity::Compatible);
    assert_eq!(
        changes[0].message,
        "version 1 is unchanged; the shared definition it references changed \
         (definitions/Order.json), in annotations only"
    );

    // An edit of the event's own file keeps its advice.
    let mut edited = t1.clone();
    edited["required"] = json!(["order"]);
    let to = with_order(order_v1, &[edited]);
    let changes = from.diff(&to);
    assert!(
        changes
            .iter()
            .any(|c| c.message.contains("publish the change as a new version")),
        "{changes:#?}"
    );
}

/// Versions of `t` registered without checks, every one in `mode`.
fn unchecked_in(mode: Compatibility, versions: &[Value]) -> Catalog {
    let mut b = Catalog::builder();
    b.check_compatibility(false);
    b.type_compatibility("t", mode);
    for v in versions {
        b.register_json("t", v.clone()).unwrap();
    }
    b.freeze().unwrap()
}

/// Whether the same versions load with the check every service makes.
fn loads(mode: Compatibility, versions: &[Value]) -> bool {
    let mut b = Catalog::builder();
    b.type_compatibility("t", mode);
    versions
        .iter()
        .all(|v| b.register_json("t", v.clone()).is_ok())
        && b.freeze().is_ok()
}

#[test]
fn diff_reports_a_proposed_catalogue_whose_history_breaks_its_mode() {
    let closed = |props: Value| json!({"type": "object", "properties": props, "additionalProperties": false});
    let v1 = closed(json!({"id": {"type": "string"}}));
    let v2 = closed(json!({"id": {"type": "string"}, "note": {"type": "string"}}));
    let history = [v1, v2];
    // Deployed: BACKWARD, where v2 (an optional property added to a closed model) is fine.
    let from = unchecked_in(Compatibility::Backward, &history);
    assert!(loads(Compatibility::Backward, &history));
    // Proposed: the same versions under FULL, which no service can load (v1 refuses `note`).
    assert!(!loads(Compatibility::Full, &history));
    let to = unchecked_in(Compatibility::Full, &history);
    let changes = from.diff(&to);
    let breaking: Vec<_> = changes
        .iter()
        .filter(|c| c.severity == Severity::Breaking)
        .collect();
    assert_eq!(breaking.len(), 1, "{changes:#?}");
    let c = breaking[0];
    assert_eq!(
        (c.kind, c.from_version, c.to_version, c.direction),
        (ChangeKind::Incompatible, Some(1), Some(2), Some("FORWARD"))
    );
    assert_eq!(c.rule, "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL");
    assert!(
        c.message
            .ends_with("version 2 is not FULL compatible with version 1 in this catalogue, so no service loads it"),
        "{c}"
    );

    // A new type whose own history breaks its mode is no compatible addition either.
    let from = Catalog::default();
    let to = unchecked_in(Compatibility::Full, &history);
    let changes = from.diff(&to);
    assert!(
        changes
            .iter()
            .any(|c| c.severity == Severity::Breaking && c.kind == ChangeKind::Incompatible),
        "{changes:#?}"
    );

    // A history that loads yields no such line.
    let to = unchecked_in(Compatibility::Backward, &history);
    assert!(
        Catalog::default()
            .diff(&to)
            .iter()
            .all(|c| c.severity == Severity::Compatible)
    );
}
