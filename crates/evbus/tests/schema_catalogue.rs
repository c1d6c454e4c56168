//! The schema catalogue: registration, extension, resolution, validation, discovery.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use evbus::schema::{
    AsyncApiOptions, Catalog, CatalogBuilder, EventType, SchemaErrorKind, ValidationProblem,
    parse_dataschema,
};
use evbus::{ErrorKind, Event};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Value, json};

fn order_def() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "total": {"type": "number", "minimum": 0},
            "email": {"type": "string", "format": "email"}
        },
        "required": ["id", "total"]
    })
}

fn cancel_event() -> Value {
    json!({
        "description": "An order was canceled.",
        "type": "object",
        "properties": {
            "canceledBy": {"type": "string"},
            "order": {"$ref": "../definitions/Order.json"},
            "returnToStock": {"type": "boolean"}
        },
        "required": ["canceledBy", "order", "returnToStock"],
        "additionalProperties": false
    })
}

fn builder_with_order() -> CatalogBuilder {
    let mut b = Catalog::builder();
    b.define("Order", order_def()).unwrap();
    b.register_json("afterOrderCancel", cancel_event()).unwrap();
    b
}

fn good_cancel() -> Value {
    json!({"canceledBy": "u-1", "returnToStock": true, "order": {"id": "o-1", "total": 10}})
}

/// A fresh directory under the target's temp dir.
fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "schema-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("events")).unwrap();
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    dir
}

fn write(dir: &Path, rel: &str, v: &Value) {
    std::fs::write(dir.join(rel), serde_json::to_string_pretty(v).unwrap()).unwrap();
}

// ---------------------------------------------------------------- registration

/// A product's price or stock changed.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-evbus-external" = true, "x-evbus-redact" = ["/costPrice"]))]
struct ProductUpdated {
    product_id: String,
    price: f64,
    cost_price: f64,
}

impl EventType for ProductUpdated {
    const TYPE: &'static str = "afterProductUpdate";
}

#[test]
fn registers_a_rust_type_with_its_doc_comment_and_evbus_keywords() {
    let mut b = Catalog::builder();
    b.register::<ProductUpdated>().unwrap();
    let c = b.freeze().unwrap();
    let v = c.get("afterProductUpdate").unwrap().latest();
    assert_eq!(v.version(), 1);
    assert_eq!(v.description(), Some("A product's price or stock changed."));
    assert!(v.external());
    assert_eq!(v.redact(), ["/costPrice".to_owned()]);
    let data = serde_json::to_value(ProductUpdated {
        product_id: "p-1".into(),
        price: 9.5,
        cost_price: 4.0,
    })
    .unwrap();
    c.validate("afterProductUpdate", &data).unwrap();
    let e = c
        .validate(
            "afterProductUpdate",
            &json!({"productId": "p-1", "price": "9.5"}),
        )
        .unwrap_err();
    let pointers: Vec<&str> = e.iter().map(|v| v.pointer()).collect();
    assert_eq!(pointers, ["/costPrice", "/price"]);
}

#[test]
fn registers_a_json_schema_value() {
    let c = builder_with_order().freeze().unwrap();
    let ok = c.validate("afterOrderCancel", &good_cancel()).unwrap();
    assert_eq!(ok.version(), Some(1));
    assert_eq!(ok.dataschema(), Some("urn:evbus:schema:afterOrderCancel:1"));
}

#[test]
fn loads_a_directory_with_relative_definition_references() {
    let dir = temp_dir("load");
    write(&dir, "definitions/Order.json", &order_def());
    write(&dir, "events/afterOrderCancel.json", &cancel_event());
    std::fs::write(dir.join("events/README.md"), "not a schema").unwrap();
    let c = Catalog::from_dir(&dir).unwrap();
    assert_eq!(c.type_names(), ["afterOrderCancel"]);
    assert!(
        c.get("afterOrderCancel")
            .unwrap()
            .latest()
            .origin()
            .contains("afterOrderCancel.json")
    );
    c.validate("afterOrderCancel", &good_cancel()).unwrap();
    let e = c
        .validate(
            "afterOrderCancel",
            &json!({"canceledBy": "u", "returnToStock": false, "order": {"id": "o"}}),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/order/total: required property "total" is missing"#
    );
}

#[test]
fn a_directory_file_that_is_not_json_is_an_error_naming_the_file_and_line() {
    let dir = temp_dir("badjson");
    std::fs::write(
        dir.join("events/broken.json"),
        "{\n  \"type\": \"object\",\n}",
    )
    .unwrap();
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Parse);
    assert!(e.message().contains("broken.json"), "{e}");
    assert!(e.message().contains("line 3"), "{e}");
}

#[cfg(unix)]
#[test]
fn a_schema_file_linked_to_a_missing_file_is_an_error_not_a_type_left_out() {
    let dir = temp_dir("dangling");
    write(&dir, "events/present.json", &json!({"type": "object"}));
    std::os::unix::fs::symlink(dir.join("nowhere.json"), dir.join("events/gone.json")).unwrap();
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Io);
    assert!(e.message().contains("gone.json"), "{e}");
    assert!(e.message().contains("symbolic link"), "{e}");
    std::fs::remove_file(dir.join("events/gone.json")).unwrap();
    assert_eq!(
        Catalog::from_dir(&dir).unwrap().type_names(),
        vec!["present"]
    );
}

#[test]
fn a_missing_directory_is_an_io_error() {
    let e = Catalog::from_dir("/definitely/not/here").unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Io);
}

#[test]
fn definitions_may_reference_each_other_relatively() {
    let mut b = Catalog::builder();
    b.define(
        "Address",
        json!({"type": "object", "properties": {"country": {"type": "string", "pattern": "^[A-Z]{2}$"}}}),
    )
    .unwrap();
    b.define(
        "Order",
        json!({"type": "object", "properties": {"shipTo": {"$ref": "Address.json"}}}),
    )
    .unwrap();
    b.register_json(
        "afterOrderCreate",
        json!({"type": "object", "properties": {"order": {"$ref": "../definitions/Order.json"}}}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let e = c
        .validate(
            "afterOrderCreate",
            &json!({"order": {"shipTo": {"country": "France"}}}),
        )
        .unwrap_err();
    assert_eq!(e.violations()[0].pointer(), "/order/shipTo/country");
    assert_eq!(e.violations()[0].keyword(), "pattern");
}

#[test]
fn invalid_names_and_documents_are_refused_at_registration() {
    let mut b = Catalog::builder();
    let e = b.register_json("bad name", json!({})).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidName);
    let e = b.register_json("x", json!({"type": "strnig"})).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidSchema);
    let e = b.register_json("x", json!(true)).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidSchema);
    let e = b
        .register_json(
            "x",
            json!({"$schema": "http://json-schema.org/draft-04/schema#"}),
        )
        .unwrap_err();
    assert!(e.message().contains("unsupported"), "{e}");
    let e = b
        .register_json(
            "x",
            json!({"properties": {"mail": {"type": "string", "format": "emial"}}}),
        )
        .unwrap_err();
    assert!(e.message().contains("\"emial\" at /properties/mail"), "{e}");
}

#[test]
fn evbus_keywords_with_the_wrong_shape_are_refused() {
    for bad in [
        json!({"x-evbus-version": 0}),
        json!({"x-evbus-version": "2"}),
        json!({"x-evbus-external": "yes"}),
        json!({"x-evbus-redact": "/email"}),
        json!({"x-evbus-redact": ["email"]}),
        json!({"x-evbus-allow": [""]}),
    ] {
        let e = Catalog::builder()
            .register_json("x", bad.clone())
            .unwrap_err();
        assert_eq!(e.kind(), SchemaErrorKind::InvalidSchema, "{bad}");
    }
}

#[test]
fn a_redact_pointer_into_a_closed_object_must_name_a_declared_property() {
    let mut b = builder_with_order();
    let mut v2 = cancel_event();
    v2["x-evbus-redact"] = json!(["/order/email", "/canceledByy"]);
    b.type_compatibility("afterOrderCancel", evbus::Compatibility::None);
    b.register_json("afterOrderCancel", v2).unwrap();
    let e = b.freeze().unwrap_err();
    assert!(e.message().contains("canceledByy"), "{e}");
    assert!(
        e.message().contains("canceledBy, order, returnToStock"),
        "{e}"
    );
}

#[test]
fn draft_07_schemas_are_accepted() {
    let mut b = Catalog::builder();
    b.register_json(
        "legacy",
        json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "definitions": {"Id": {"type": "string", "minLength": 3}},
            "properties": {"id": {"$ref": "#/definitions/Id"}},
            "required": ["id"]
        }),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    c.validate("legacy", &json!({"id": "abc"})).unwrap();
    let e = c.validate("legacy", &json!({"id": "a"})).unwrap_err();
    assert_eq!(
        e.violations()[0].message(),
        "must be at least 3 characters long"
    );
}

// ---------------------------------------------------------------- extension

#[test]
fn an_extension_of_a_definition_is_seen_by_every_event_referencing_it() {
    let mut b = builder_with_order();
    b.register_json(
        "afterOrderCreate",
        json!({"type": "object", "properties": {"order": {"$ref": "../definitions/Order.json"}}, "required": ["order"]}),
    )
    .unwrap();
    b.extend_definition(
        "Order",
        "loyalty-plugin",
        json!({"properties": {"loyaltyPoints": {"type": "integer", "minimum": 0}}, "required": ["loyaltyPoints"]}),
    )
    .unwrap();
    let c = b.freeze().unwrap();

    for (ty, data) in [
        ("afterOrderCancel", good_cancel()),
        (
            "afterOrderCreate",
            json!({"order": {"id": "o-1", "total": 10}}),
        ),
    ] {
        let e = c.validate(ty, &data).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"/order/loyaltyPoints: required property "loyaltyPoints" is missing"#,
            "{ty}"
        );
    }
    let mut data = good_cancel();
    data["order"]["loyaltyPoints"] = json!(-3);
    let e = c.validate("afterOrderCancel", &data).unwrap_err();
    assert_eq!(e.to_string(), "/order/loyaltyPoints: must be at least 0");
    data["order"]["loyaltyPoints"] = json!(12);
    c.validate("afterOrderCancel", &data).unwrap();

    // Discovery shows the extended form.
    let schema = c.get("afterOrderCancel").unwrap().latest().schema();
    assert_eq!(
        schema["$defs"]["Order"]["properties"]["loyaltyPoints"],
        json!({"type": "integer", "minimum": 0})
    );
    assert!(
        c.definitions()["Order"]["required"]
            .as_array()
            .unwrap()
            .contains(&json!("loyaltyPoints"))
    );
}

#[test]
fn an_extension_reaches_events_through_a_chain_of_definitions() {
    let mut b = Catalog::builder();
    b.define(
        "Customer",
        json!({"type": "object", "properties": {"id": {"type": "string"}}}),
    )
    .unwrap();
    b.define(
        "Order",
        json!({"type": "object", "properties": {"customer": {"$ref": "Customer.json"}}}),
    )
    .unwrap();
    b.register_json(
        "afterOrderCreate",
        json!({"properties": {"order": {"$ref": "../definitions/Order.json"}}}),
    )
    .unwrap();
    b.extend_definition(
        "Customer",
        "crm",
        json!({"required": ["segment"], "properties": {"segment": {"enum": ["b2b", "b2c"]}}}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let e = c
        .validate(
            "afterOrderCreate",
            &json!({"order": {"customer": {"id": "c-1", "segment": "vip"}}}),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/order/customer/segment: must be one of "b2b", "b2c""#
    );
}

#[test]
fn an_extension_may_come_before_its_definition() {
    let mut b = Catalog::builder();
    b.extend_definition(
        "Order",
        "early-plugin",
        json!({"properties": {"note": {"type": "string"}}}),
    )
    .unwrap();
    b.define("Order", order_def()).unwrap();
    b.register_json("afterOrderCancel", cancel_event()).unwrap();
    let c = b.freeze().unwrap();
    let mut data = good_cancel();
    data["order"]["note"] = json!(42);
    let e = c.validate("afterOrderCancel", &data).unwrap_err();
    assert_eq!(e.violations()[0].pointer(), "/order/note");
}

#[test]
fn an_extension_of_an_unknown_definition_fails_at_freeze() {
    let mut b = builder_with_order();
    b.extend_definition("Ordr", "typo-plugin", json!({"properties": {"x": {}}}))
        .unwrap();
    let e = b.freeze().unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::UnknownDefinition);
    assert!(e.message().contains("typo-plugin"), "{e}");
    assert!(e.message().contains("\"Ordr\""), "{e}");
}

#[test]
fn conflicting_extensions_are_refused_naming_both_parties() {
    let mut b = builder_with_order();
    b.extend_definition(
        "Order",
        "loyalty",
        json!({"properties": {"points": {"type": "integer"}}}),
    )
    .unwrap();
    let e = b
        .extend_definition(
            "Order",
            "rewards",
            json!({"properties": {"points": {"type": "string"}}}),
        )
        .unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::ConflictingExtension);
    assert!(
        e.message().contains("rewards") && e.message().contains("loyalty"),
        "{e}"
    );
    // The refused extension was not recorded: the catalogue still freezes.
    b.freeze().unwrap();
}

#[test]
fn an_extension_redefining_a_base_property_is_refused() {
    let mut b = builder_with_order();
    let e = b
        .extend_definition(
            "Order",
            "sloppy",
            json!({"properties": {"total": {"type": "string"}}}),
        )
        .unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::ConflictingExtension);
    assert!(e.message().contains("the definition itself"), "{e}");
}

#[test]
fn a_definition_registered_after_a_conflicting_extension_is_refused() {
    let mut b = Catalog::builder();
    b.extend_definition(
        "Order",
        "early",
        json!({"properties": {"total": {"type": "string"}}}),
    )
    .unwrap();
    let e = b.define("Order", order_def()).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::ConflictingExtension);
}

#[test]
fn identical_extensions_and_identical_redefinitions_are_no_ops() {
    let mut b = builder_with_order();
    let ext = json!({"properties": {"points": {"type": "integer"}}, "required": ["points"]});
    b.extend_definition("Order", "a", ext.clone()).unwrap();
    b.extend_definition("Order", "b", ext).unwrap();
    b.define("Order", order_def()).unwrap();
    let e = b.define("Order", json!({"type": "object"})).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Duplicate);
    b.freeze().unwrap();
}

#[test]
fn an_extension_may_only_add_properties_and_required() {
    let e = Catalog::builder()
        .extend_definition("Order", "x", json!({"additionalProperties": false}))
        .unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidSchema);
}

/// The Rust view of the shared `Order` definition.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct Order {
    id: String,
    total: f64,
}

/// An order was created (Rust emitter).
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct OrderCreated {
    created_by: String,
    order: Order,
}

impl EventType for OrderCreated {
    const TYPE: &'static str = "afterOrderCreate";
}

#[test]
fn rust_types_named_like_a_shared_definition_see_its_extensions() {
    let mut b = Catalog::builder();
    b.define_type::<Order>().unwrap();
    b.register::<OrderCreated>().unwrap();
    b.extend_definition(
        "Order",
        "loyalty",
        json!({"properties": {"points": {"type": "integer"}}, "required": ["points"]}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let data = json!({"createdBy": "u", "order": {"id": "o", "total": 1.0}});
    let e = c.validate("afterOrderCreate", &data).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/order/points: required property "points" is missing"#
    );
}

// ---------------------------------------------------------------- references

#[test]
fn an_unknown_reference_fails_at_freeze_naming_it_never_at_validation() {
    let mut b = Catalog::builder();
    b.define("Order", order_def()).unwrap();
    b.register_json(
        "afterOrderCancel",
        json!({"properties": {"order": {"$ref": "../definitions/Ordr.json"}}}),
    )
    .unwrap();
    let e = b.freeze().unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::UnknownReference);
    assert!(e.message().contains("\"../definitions/Ordr.json\""), "{e}");
    assert!(e.message().contains("/properties/order"), "{e}");
    assert!(e.message().contains("known definitions: Order"), "{e}");
}

#[test]
fn references_to_missing_locations_remote_documents_or_other_events_are_unknown() {
    for r in [
        "../definitions/Order.json#/$defs/Nope",
        "https://example.com/schemas/Order.json",
        "afterOrderCreate.json",
        "#/$defs/missing",
        "#anchorless",
    ] {
        let mut b = Catalog::builder();
        b.define("Order", order_def()).unwrap();
        b.register_json("x", json!({"properties": {"a": {"$ref": r}}}))
            .unwrap();
        let e = b.freeze().unwrap_err();
        assert_eq!(e.kind(), SchemaErrorKind::UnknownReference, "{r}: {e}");
    }
}

#[test]
fn anchors_and_root_ids_of_definitions_resolve() {
    let mut b = Catalog::builder();
    b.define(
        "Money",
        json!({"$id": "https://shop.example/schemas/Money.json", "$defs": {"amount": {"$anchor": "amount", "type": "number", "minimum": 0}}, "type": "object"}),
    )
    .unwrap();
    b.register_json(
        "x",
        json!({"properties": {
            "a": {"$ref": "../definitions/Money.json#amount"},
            "b": {"$ref": "https://shop.example/schemas/Money.json#/$defs/amount"}
        }}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let e = c.validate("x", &json!({"a": -1, "b": -2})).unwrap_err();
    let pointers: Vec<&str> = e.iter().map(|v| v.pointer()).collect();
    assert_eq!(pointers, ["/a", "/b"]);
}

#[test]
fn a_reference_loop_that_never_reaches_a_schema_is_refused() {
    let mut b = Catalog::builder();
    b.define("A", json!({"allOf": [{"$ref": "B.json"}]}))
        .unwrap();
    b.define(
        "B",
        json!({"anyOf": [{"$ref": "A.json"}, {"type": "string"}]}),
    )
    .unwrap();
    b.register_json(
        "x",
        json!({"properties": {"a": {"$ref": "../definitions/A.json"}}}),
    )
    .unwrap();
    let e = b.freeze().unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Cycle);
    assert!(
        e.message().contains("definitions/A.json") && e.message().contains("definitions/B.json"),
        "{e}"
    );
}

#[test]
fn a_recursive_definition_through_properties_is_fine() {
    let mut b = Catalog::builder();
    b.define(
        "Category",
        json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}}
        }, "required": ["name"]}),
    )
    .unwrap();
    b.register_json(
        "afterCategoryUpdate",
        json!({"properties": {"category": {"$ref": "../definitions/Category.json"}}}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let data = json!({"category": {"name": "a", "children": [{"name": "b", "children": [{}]}]}});
    let e = c.validate("afterCategoryUpdate", &data).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/category/children/0/children/0/name: required property "name" is missing"#
    );
    // The listed schema stays self-contained.
    let schema = c.get("afterCategoryUpdate").unwrap().latest().schema();
    assert_eq!(
        schema["$defs"]["Category"]["properties"]["children"]["items"]["$ref"],
        "#/$defs/Category"
    );
}

// ---------------------------------------------------------------- validation

#[test]
fn a_strict_catalogue_refuses_unknown_types_naming_the_known_ones() {
    let c = builder_with_order().freeze().unwrap();
    assert!(c.is_strict());
    let e = c.validate("afterOrderCancell", &json!({})).unwrap_err();
    assert!(
        matches!(e.problem(), ValidationProblem::UnknownType { known } if known == &["afterOrderCancel"])
    );
    assert_eq!(
        e.to_string(),
        r#"unknown event type "afterOrderCancell": the catalogue is strict and knows only afterOrderCancel"#
    );
}

#[test]
fn a_permissive_catalogue_lets_unknown_types_through_but_checks_known_ones() {
    let mut b = builder_with_order();
    b.strict(false);
    let c = b.freeze().unwrap();
    let ok = c
        .validate("somethingElse", &json!({"any": "thing"}))
        .unwrap();
    assert!(!ok.is_registered());
    assert_eq!(ok.dataschema(), None);
    assert!(c.validate("afterOrderCancel", &json!({})).is_err());
}

#[test]
fn an_invalid_payload_reports_every_violation_at_once() {
    let c = builder_with_order().freeze().unwrap();
    let data = json!({
        "canceledBy": 7,
        "order": {"id": "", "total": -1, "email": "ada.example.com"},
        "returnToStok": true
    });
    let e = c.validate("afterOrderCancel", &data).unwrap_err();
    let got: Vec<(String, String)> = e
        .iter()
        .map(|v| (v.pointer().to_owned(), v.keyword().to_owned()))
        .collect();
    let expected = [
        ("/canceledBy", "type"),
        ("/order/email", "format"),
        ("/order/id", "minLength"),
        ("/order/total", "minimum"),
        ("/returnToStock", "required"),
        ("/returnToStok", "additionalProperties"),
    ];
    assert_eq!(
        got,
        expected
            .iter()
            .map(|(p, k)| (p.to_string(), k.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        e.to_string(),
        [
            "/canceledBy: must be a string, not an integer",
            r#"/order/email: must be a valid "email""#,
            "/order/id: must be at least 1 character long",
            "/order/total: must be at least 0",
            r#"/returnToStock: required property "returnToStock" is missing"#,
            r#"/returnToStok: property "returnToStok" is not allowed here (the schema does not declare it)"#,
        ]
        .join("\n")
    );
    assert_eq!(e.event_type(), "afterOrderCancel");
    assert_eq!(e.version(), Some(1));
}

#[test]
fn violation_messages_never_quote_the_payload() {
    let c = builder_with_order().freeze().unwrap();
    let secret = "very-secret-address@@example";
    let data = json!({"canceledBy": "u", "returnToStock": "s3cr3t-flag", "order": {"id": "o", "total": 1, "email": secret}});
    let e = c.validate("afterOrderCancel", &data).unwrap_err();
    let text = format!("{e} {e:?} {}", evbus::Error::from(e.clone()));
    assert!(!text.contains(secret) && !text.contains("s3cr3t"), "{text}");
}

#[test]
fn validation_errors_become_evbus_errors_of_kind_validation() {
    let c = builder_with_order().freeze().unwrap();
    let e: evbus::Error = c
        .validate("afterOrderCancel", &json!({}))
        .unwrap_err()
        .into();
    assert_eq!(e.kind(), ErrorKind::Validation);
    assert!(!e.is_retryable());
    assert!(
        e.message()
            .starts_with("invalid \"afterOrderCancel\" event (schema version 1, 3 violations):"),
        "{e}"
    );
}

#[test]
fn anyof_failures_point_at_the_closest_alternative() {
    let mut b = Catalog::builder();
    b.register_json(
        "x",
        json!({"properties": {"p": {"anyOf": [
            {"type": "object", "required": ["sku"]},
            {"type": "string"}
        ]}}}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let e = c.validate("x", &json!({"p": {}})).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/p: matches none of the 2 allowed alternatives (anyOf); closest is alternative 1: /p/sku: required property "sku" is missing"#
    );
}

#[test]
fn the_catalogue_is_shared_across_threads() {
    let c = builder_with_order().freeze().unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    c.validate("afterOrderCancel", &good_cancel()).unwrap();
                    assert!(c.validate("afterOrderCancel", &json!({"n": i})).is_err());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

// ---------------------------------------------------------------- versions

#[test]
fn versions_are_numbered_and_named_in_dataschema() {
    let mut b = builder_with_order();
    let mut v2 = cancel_event();
    v2["properties"]["reason"] = json!({"type": "string"});
    b.register_json("afterOrderCancel", v2).unwrap();
    let c = b.freeze().unwrap();
    let t = c.get("afterOrderCancel").unwrap();
    assert_eq!(
        t.versions().iter().map(|v| v.version()).collect::<Vec<_>>(),
        [1, 2]
    );
    let ok = c.validate("afterOrderCancel", &good_cancel()).unwrap();
    assert_eq!(ok.dataschema(), Some("urn:evbus:schema:afterOrderCancel:2"));
    assert_eq!(
        parse_dataschema(ok.dataschema().unwrap()),
        Some(("afterOrderCancel", 2))
    );

    let mut with_reason = good_cancel();
    with_reason["reason"] = json!("customer request");
    c.validate("afterOrderCancel", &with_reason).unwrap();
    // Version 1 is closed and does not know `reason`.
    assert!(
        c.validate_version("afterOrderCancel", 1, &with_reason)
            .is_err()
    );
    let e = c
        .validate_version("afterOrderCancel", 9, &good_cancel())
        .unwrap_err();
    assert!(matches!(
        e.problem(),
        ValidationProblem::UnknownVersion { version: 9, .. }
    ));
}

#[test]
fn explicit_versions_must_increase_and_must_not_be_reused() {
    let mut b = builder_with_order();
    let mut v3 = cancel_event();
    v3["x-evbus-version"] = json!(3);
    b.register_json("afterOrderCancel", v3.clone()).unwrap();
    b.register_json("afterOrderCancel", v3.clone()).unwrap(); // identical: no-op
    let mut v2 = cancel_event();
    v2["x-evbus-version"] = json!(2);
    assert_eq!(
        b.register_json("afterOrderCancel", v2).unwrap_err().kind(),
        SchemaErrorKind::VersionOrder
    );
    v3["description"] = json!("changed");
    assert_eq!(
        b.register_json("afterOrderCancel", v3).unwrap_err().kind(),
        SchemaErrorKind::Duplicate
    );
    let c = b.freeze().unwrap();
    let versions: Vec<u32> = c
        .get("afterOrderCancel")
        .unwrap()
        .versions()
        .iter()
        .map(|v| v.version())
        .collect();
    assert_eq!(versions, [1, 3]);
}

#[test]
fn an_incompatible_version_is_refused_with_the_change_and_the_rule() {
    let mut b = Catalog::builder();
    b.register_json(
        "afterOrderCancel",
        json!({"type": "object", "properties": {"canceledBy": {"type": "string"}}, "required": ["canceledBy"], "additionalProperties": false}),
    )
    .unwrap();
    let e = b
        .register_json(
            "afterOrderCancel",
            json!({"type": "object", "properties": {"canceledBy": {"type": "string"}, "returnToStock": {"type": "boolean"}}, "required": ["canceledBy", "returnToStock"], "additionalProperties": false}),
        )
        .unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Incompatible);
    assert_eq!(e.incompatibilities().len(), 1);
    let i = &e.incompatibilities()[0];
    assert_eq!(
        (i.path(), i.rule(), i.direction()),
        ("/required", "REQUIRED_PROPERTY_ADDED", Some("BACKWARD"))
    );
    assert_eq!(
        e.to_string(),
        "event type \"afterOrderCancel\" version 2 is not BACKWARD compatible with v1 (1 breaking change):\n  \
         [BACKWARD: v2 reading data written with v1] /required: REQUIRED_PROPERTY_ADDED: property \
         \"returnToStock\" is required by the reader but not by the writer: data without it is refused"
    );
    // The refused version was not added.
    assert_eq!(
        b.freeze()
            .unwrap()
            .get("afterOrderCancel")
            .unwrap()
            .versions()
            .len(),
        1
    );
}

#[test]
fn compatibility_sees_through_definition_references() {
    let mut b = Catalog::builder();
    b.define("Order", json!({"type": "object", "properties": {"id": {"type": "string"}}, "additionalProperties": false}))
        .unwrap();
    b.define("OrderV2", json!({"type": "object", "properties": {"id": {"type": "integer"}}, "additionalProperties": false}))
        .unwrap();
    b.register_json(
        "e",
        json!({"properties": {"order": {"$ref": "../definitions/Order.json"}}}),
    )
    .unwrap();
    let e = b
        .register_json(
            "e",
            json!({"properties": {"order": {"$ref": "../definitions/OrderV2.json"}}}),
        )
        .unwrap_err();
    assert_eq!(
        e.incompatibilities()[0].path(),
        "/properties/order/properties/id/type"
    );
    assert_eq!(e.incompatibilities()[0].rule(), "TYPE_CHANGED");
}

#[test]
fn consume_side_validation_uses_the_version_named_by_dataschema() {
    let mut b = builder_with_order();
    let mut v2 = cancel_event();
    v2["properties"]["reason"] = json!({"type": "string"});
    b.register_json("afterOrderCancel", v2).unwrap();
    let c = b.freeze().unwrap();
    let mut data = good_cancel();
    data["reason"] = json!("r");
    let v1_event = Event::builder("afterOrderCancel", "/orders")
        .json(&data)
        .unwrap()
        .dataschema("urn:evbus:schema:afterOrderCancel:1")
        .build()
        .unwrap();
    let e = c.validate_event(&v1_event).unwrap_err();
    assert_eq!(e.version(), Some(1));
    let v2_event = v1_event
        .into_builder()
        .dataschema("urn:evbus:schema:afterOrderCancel:2")
        .build()
        .unwrap();
    assert_eq!(c.validate_event(&v2_event).unwrap().version(), Some(2));
    let raw = Event::builder("afterOrderCancel", "/orders")
        .data("application/json", "{not json")
        .build()
        .unwrap();
    assert!(matches!(
        c.validate_event(&raw).unwrap_err().problem(),
        ValidationProblem::NotJson { .. }
    ));
}

// ---------------------------------------------------------------- discovery

#[test]
fn summaries_list_type_version_external_description_and_a_self_contained_schema() {
    let mut b = builder_with_order();
    b.register::<ProductUpdated>().unwrap();
    let c = b.freeze().unwrap();
    let list = serde_json::to_value(c.summaries()).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let cancel = &list[0];
    assert_eq!(cancel["type"], "afterOrderCancel");
    assert_eq!(cancel["version"], 1);
    assert_eq!(cancel["external"], false);
    assert_eq!(cancel["description"], "An order was canceled.");
    assert_eq!(cancel["compatibility"], "BACKWARD");
    assert_eq!(list[1]["external"], true);
    // The listed schema validates on its own with any JSON Schema validator.
    let standalone = jsonschema::validator_for(&cancel["schema"]).unwrap();
    assert!(standalone.is_valid(&good_cancel()));
    assert!(
        !standalone
            .is_valid(&json!({"canceledBy": "u", "returnToStock": true, "order": {"id": "o"}}))
    );
}

fn all_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_owned());
                    }
                } else {
                    all_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| all_refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_asyncapi_export_has_a_channel_per_type_and_a_message_per_version() {
    let mut b = builder_with_order();
    let mut v2 = cancel_event();
    v2["properties"]["reason"] = json!({"type": "string"});
    b.register_json("afterOrderCancel", v2).unwrap();
    b.register::<ProductUpdated>().unwrap();
    let c = b.freeze().unwrap();
    let doc = c.to_asyncapi(&AsyncApiOptions::default());
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(
        doc["channels"]["afterOrderCancel"]["address"],
        "afterOrderCancel"
    );
    let msgs = doc["channels"]["afterOrderCancel"]["messages"]
        .as_object()
        .unwrap();
    assert_eq!(
        msgs.keys().collect::<Vec<_>>(),
        ["afterOrderCancel.v1", "afterOrderCancel.v2"]
    );
    let m = &doc["components"]["messages"]["afterOrderCancel.v2"];
    assert_eq!(
        m["headers"]["properties"]["ce_type"]["const"],
        "afterOrderCancel"
    );
    assert_eq!(
        m["headers"]["properties"]["ce_dataschema"]["const"],
        "urn:evbus:schema:afterOrderCancel:2"
    );
    assert_eq!(doc["operations"]["emitAfterOrderCancel"]["action"], "send");
    assert!(doc["components"]["schemas"]["Order"].is_object());

    // Every local reference resolves inside the document.
    let mut refs = Vec::new();
    all_refs(&doc, &mut refs);
    assert!(refs.len() > 10);
    for r in refs {
        let p = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local ref {r}"));
        assert!(doc.pointer(p).is_some(), "dangling {r}");
    }

    // JSON and YAML renderings carry the same document.
    let opts = AsyncApiOptions::default();
    let from_json: Value = serde_json::from_str(&c.to_asyncapi_json(&opts)).unwrap();
    let from_yaml: Value = serde_norway::from_str(&c.to_asyncapi_yaml(&opts).unwrap()).unwrap();
    assert_eq!(from_json, doc);
    assert_eq!(from_yaml, doc);
    assert!(
        c.to_asyncapi_yaml(&opts)
            .unwrap()
            .starts_with("asyncapi: 3.0.0\ninfo:")
    );

    let external = c.to_asyncapi(&AsyncApiOptions {
        external_only: true,
        ..Default::default()
    });
    assert_eq!(
        external["channels"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["afterProductUpdate"]
    );
}

/// A catalogue using every feature the export must carry: versions, Rust types with nested
/// definitions, recursive and chained definitions, anchors, local `$defs`, draft-07. The
/// documents are also written to the target's temp dir (`asyncapi-rich.{yaml,json}`) for
/// checking with external tools such as the AsyncAPI parser.
#[test]
fn a_rich_catalogue_exports_a_self_contained_asyncapi_document() {
    let mut b = builder_with_order();
    let mut v2 = cancel_event();
    v2["properties"]["reason"] = json!({"$ref": "#/$defs/Reason"});
    v2["$defs"] = json!({"Reason": {"enum": ["customer", "fraud", "stock"]}});
    b.register_json("afterOrderCancel", v2).unwrap();
    b.register::<ProductUpdated>().unwrap();
    b.register::<OrderCreated>().unwrap();
    b.define(
        "Category",
        json!({"type": "object", "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}}}),
    )
    .unwrap();
    b.define(
        "Money",
        json!({"$defs": {"amount": {"$anchor": "amount", "type": "number", "minimum": 0}}, "type": "object", "properties": {"amount": {"$ref": "#amount"}, "currency": {"type": "string"}}}),
    )
    .unwrap();
    b.register_json(
        "afterCategoryUpdate",
        json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {
            "category": {"$ref": "../definitions/Category.json"},
            "budget": {"$ref": "../definitions/Money.json"},
            "floor": {"$ref": "../definitions/Money.json#amount"}
        }}),
    )
    .unwrap();
    let c = b.freeze().unwrap();
    let opts = AsyncApiOptions::default();
    let doc = c.to_asyncapi(&opts);
    let mut refs = Vec::new();
    all_refs(&doc, &mut refs);
    for r in &refs {
        let p = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local ref {r}"));
        assert!(doc.pointer(p).is_some(), "dangling {r}");
    }
    assert_eq!(
        doc["components"]["schemas"]["Category"]["properties"]["children"]["items"]["$ref"],
        "#/components/schemas/Category"
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(
        out.join("asyncapi-rich.yaml"),
        c.to_asyncapi_yaml(&opts).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("asyncapi-rich.json"), c.to_asyncapi_json(&opts)).unwrap();
}
