//! The example commerce catalogue in `examples/schemas/`, and the drift it exists to catch.

use std::path::PathBuf;

use evbus::schema::{AsyncApiOptions, Catalog};
use evbus::{ErrorKind, Event};
use serde_json::{Value, json};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

fn catalog() -> Catalog {
    Catalog::from_dir(dir()).expect("the example catalogue loads")
}

fn order() -> Value {
    json!({
        "_id": "ord_01J9Z6",
        "referenceId": "R-10023",
        "shopId": "shop-1",
        "accountId": "acc-7",
        "email": "ada@example.com",
        "status": "new",
        "currencyCode": "EUR",
        "items": [{"productId": "prod-1", "variantId": "var-1", "sku": "TSHIRT-M", "title": "T-shirt", "quantity": 2, "price": 19.9}],
        "shippingAddress": {"fullName": "Ada Lovelace", "address1": "12 St James's Square", "city": "London", "postal": "SW1Y 4JH", "country": "GB", "phone": "+44 20 7946 0000"},
        "totals": {"subtotal": 39.8, "shipping": 4.9, "tax": 7.56, "total": 44.7},
        "createdAt": "2026-11-27T10:15:00Z"
    })
}

fn product() -> Value {
    json!({
        "_id": "prod-1",
        "shopId": "shop-1",
        "title": "Organic cotton T-shirt",
        "slug": "organic-cotton-t-shirt",
        "isVisible": true,
        "price": {"min": 19.9, "max": 24.9, "currencyCode": "EUR"},
        "variants": [{"_id": "var-1", "sku": "TSHIRT-M", "price": 19.9, "inventoryQuantity": 12, "costPrice": 6.1}],
        "tags": ["summer", "organic"],
        "updatedAt": "2026-11-27T10:15:00Z"
    })
}

fn cart() -> Value {
    json!({
        "_id": "cart-9",
        "shopId": "shop-1",
        "accountId": null,
        "currencyCode": "EUR",
        "items": [{"_id": "ci-1", "productId": "prod-1", "variantId": "var-1", "quantity": 1, "price": 19.9}]
    })
}

#[test]
fn the_example_catalogue_lists_its_five_event_types_and_three_definitions() {
    let c = catalog();
    assert_eq!(
        c.type_names(),
        [
            "afterCartUpdate",
            "afterOrderCancel",
            "afterOrderCreate",
            "afterOrderUpdate",
            "afterProductUpdate"
        ]
    );
    assert_eq!(
        c.definitions().keys().collect::<Vec<_>>(),
        ["Cart", "Order", "Product"]
    );
    let fields = |ty: &str| -> Vec<String> {
        let mut f: Vec<String> = c.get(ty).unwrap().latest().schema()["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        f.sort();
        f
    };
    assert_eq!(fields("afterOrderCreate"), ["createdBy", "order"]);
    assert_eq!(fields("afterOrderUpdate"), ["order", "updatedBy"]);
    assert_eq!(
        fields("afterOrderCancel"),
        ["canceledBy", "order", "returnToStock"]
    );
    assert_eq!(fields("afterProductUpdate"), ["product", "productId"]);
    assert_eq!(fields("afterCartUpdate"), ["cart", "updatedBy"]);
    for t in c.event_types() {
        assert!(
            t.latest().description().is_some(),
            "{} has a description",
            t.name()
        );
    }
}

#[test]
fn realistic_payloads_of_every_example_type_are_valid() {
    let c = catalog();
    let payloads = [
        (
            "afterOrderCreate",
            json!({"createdBy": "user-42", "order": order()}),
        ),
        (
            "afterOrderUpdate",
            json!({"order": order(), "updatedBy": "user-42"}),
        ),
        (
            "afterOrderCancel",
            json!({"canceledBy": "user-42", "order": order(), "returnToStock": true}),
        ),
        (
            "afterProductUpdate",
            json!({"productId": "prod-1", "product": product()}),
        ),
        (
            "afterCartUpdate",
            json!({"cart": cart(), "updatedBy": null}),
        ),
    ];
    for (ty, data) in payloads {
        if let Err(e) = c.validate(ty, &data) {
            panic!("{ty}:\n{e}");
        }
    }
}

#[test]
fn external_types_declare_what_must_not_leave() {
    let c = catalog();
    let create = c.get("afterOrderCreate").unwrap().latest();
    assert!(create.external());
    assert_eq!(
        create.redact(),
        ["/order/email", "/order/shippingAddress/phone"]
    );
    let product = c.get("afterProductUpdate").unwrap().latest();
    assert!(product.external());
    assert!(
        product
            .allow()
            .unwrap()
            .contains(&"/product/price".to_owned())
    );
    assert!(!c.get("afterOrderCancel").unwrap().latest().external());
    assert!(!c.get("afterCartUpdate").unwrap().latest().external());
}

/// The classic drift: the inventory listener of `afterOrderCancel` reads `returnToStock`, the
/// emitter never sends it. Without a contract the listener silently reads `undefined` and never
/// restocks; with the catalogue the emit is refused, naming the missing field.
#[test]
fn the_catalogue_catches_the_missing_return_to_stock_drift() {
    let c = catalog();

    // What the listener relies on.
    let restock = |data: &Value| data["returnToStock"].as_bool();

    // What the emitter sends: the order and who canceled it, but not `returnToStock`.
    let emitted = json!({"canceledBy": "user-42", "order": order()});
    assert_eq!(restock(&emitted), None, "the listener would read nothing");

    let errors = c.validate("afterOrderCancel", &emitted).unwrap_err();
    assert_eq!(errors.len(), 1);
    let v = &errors.violations()[0];
    assert_eq!(v.pointer(), "/returnToStock");
    assert_eq!(v.keyword(), "required");
    assert_eq!(
        v.message(),
        r#"required property "returnToStock" is missing"#
    );

    // As the bus reports it at emit time.
    let err: evbus::Error = errors.into();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(err.message().contains("returnToStock"), "{err}");

    // A raw producer that bypassed the emitter is caught on consume as well.
    let raw = Event::builder("afterOrderCancel", "/legacy/orders")
        .json(&emitted)
        .unwrap()
        .build()
        .unwrap();
    let on_consume = c.validate_event(&raw).unwrap_err();
    assert_eq!(on_consume.violations()[0].pointer(), "/returnToStock");

    // The fixed emitter passes, and `dataschema` names the version it was checked against.
    let mut fixed = emitted;
    fixed["returnToStock"] = json!(true);
    let ok = c.validate("afterOrderCancel", &fixed).unwrap();
    assert_eq!(ok.dataschema(), Some("urn:evbus:schema:afterOrderCancel:1"));
    assert_eq!(restock(&fixed), Some(true));
}

#[test]
fn the_sample_payload_files_match_their_verdicts() {
    let c = catalog();
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir().join("payloads").join(name)).unwrap())
            .unwrap()
    };
    c.validate("afterOrderCancel", &read("afterOrderCancel.valid.json"))
        .unwrap();
    let e = c
        .validate("afterOrderCancel", &read("afterOrderCancel.drift.json"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"/returnToStock: required property "returnToStock" is missing"#
    );
}

#[test]
fn the_example_asyncapi_document_is_self_contained() {
    let c = catalog();
    let doc = c.to_asyncapi(&AsyncApiOptions::default());
    assert_eq!(doc["channels"].as_object().unwrap().len(), 5);
    assert_eq!(doc["components"]["messages"].as_object().unwrap().len(), 5);
    let mut stack = vec![&doc];
    let mut refs = 0;
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    refs += 1;
                    let p = r.strip_prefix('#').expect("local reference");
                    assert!(doc.pointer(p).is_some(), "dangling {r}");
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    assert!(refs >= 20);
}
