//! `Bus::emit`: validate, build the envelope, publish.

mod bus_support;

use std::sync::Arc;
use std::time::Duration;

use bus_support::*;
use evbus::bus::{Bus, Emit};
use evbus::schema::EventType;
use evbus::{ErrorKind, SubscribeOptions, Transport};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A named subscription of `topic`, made before anything is emitted to it.
async fn probe(bus: &Bus, topic: &str) -> evbus::Subscription {
    let topic = bus.transport().topic(topic).await.unwrap();
    topic
        .subscribe(SubscribeOptions::named("probe"))
        .await
        .unwrap()
}

#[tokio::test]
async fn emit_publishes_a_validated_envelope_and_returns_its_id() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    let id = bus
        .send(
            Emit::new("orderPlaced", placed("o-1"))
                .key("o-1")
                .subject("orders/o-1")
                .extension("tenant", "acme"),
        )
        .await
        .unwrap();

    let d = next(&mut sub).await;
    let e = d.event();
    assert_eq!(e.id(), id);
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    assert_eq!(e.ty(), "orderPlaced");
    assert_eq!(e.source(), "/test/shop");
    assert_eq!(e.dataschema(), Some("urn:evbus:schema:orderPlaced:1"));
    assert_eq!(e.partition_key(), Some("o-1"));
    assert_eq!(e.subject(), Some("orders/o-1"));
    assert_eq!(e.extension("tenant"), Some("acme"));
    assert!(e.time().is_some());
    assert_eq!(e.json::<serde_json::Value>().unwrap(), placed("o-1"));
}

#[tokio::test]
async fn an_invalid_payload_is_refused_with_every_violation_and_nothing_is_published() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    let err = bus
        .emit("orderPlaced", json!({"total": -1}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(err.message().contains("/orderId"), "{err}");
    assert!(err.message().contains("/total"), "{err}");

    // The next valid event is the first thing the topic carries.
    let id = bus.emit("orderPlaced", placed("o-2")).await.unwrap();
    assert_eq!(next(&mut sub).await.event().id(), id);
}

#[tokio::test]
async fn an_unknown_type_is_refused_naming_the_known_types() {
    let bus = bus(&broker());
    let err = bus.emit("orderShipped", json!({})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(
        err.message().contains("orderCanceled, orderPlaced"),
        "{err}"
    );
}

#[tokio::test]
async fn a_batch_is_validated_whole_before_anything_is_published() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    let err = bus
        .emit_batch([
            Emit::new("orderPlaced", placed("o-1")),
            Emit::new("orderPlaced", json!({"orderId": "o-2"})),
            Emit::new("orderPlaced", placed("o-3")),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(err.message().contains("event 1 (orderPlaced)"), "{err}");
    assert!(err.message().contains("nothing was published"), "{err}");

    let ids = bus
        .emit_batch((0..3).map(|i| Emit::new("orderPlaced", placed(&format!("o-{i}")))))
        .await
        .unwrap();
    for id in &ids {
        assert_eq!(next(&mut sub).await.event().id(), id);
    }
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
struct ProductUpdated {
    product_id: String,
    price: f64,
}

impl EventType for ProductUpdated {
    const TYPE: &'static str = "productUpdated";
}

#[tokio::test]
async fn typed_emit_uses_the_rust_type_s_event_type_and_schema() {
    let mut b = evbus::Catalog::builder();
    b.register::<ProductUpdated>().unwrap();
    let broker = broker();
    let bus = Bus::new(Arc::new(broker.connect()), b.freeze().unwrap(), "/test");
    let mut sub = probe(&bus, "productUpdated").await;

    let id = bus
        .emit_typed(&ProductUpdated {
            product_id: "p-1".into(),
            price: 9.5,
        })
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.event().id(), id);
    assert_eq!(d.event().ty(), "productUpdated");
    assert_eq!(
        d.event().json::<serde_json::Value>().unwrap(),
        json!({"productId": "p-1", "price": 9.5})
    );
}

#[tokio::test]
async fn routed_types_share_one_topic_in_emit_order() {
    let broker = broker();
    let bus = Bus::builder(Arc::new(broker.connect()), catalog())
        .route(["orderPlaced", "orderCanceled"], "orders")
        .build();
    let mut sub = probe(&bus, "orders").await;

    let a = bus.emit("orderPlaced", placed("o-1")).await.unwrap();
    let b = bus
        .emit("orderCanceled", json!({"orderId": "o-1", "reason": "r"}))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.event().id(), a);
    assert_eq!(next(&mut sub).await.event().id(), b);
}

#[tokio::test]
async fn a_batch_across_topics_keeps_each_topics_order_and_every_attribute() {
    let broker = broker();
    let mut b = catalog_builder();
    b.strict(false);
    let bus = Bus::builder(Arc::new(broker.connect()), b.freeze().unwrap())
        .source("/test/shop")
        .route(["orderPlaced", "orderCanceled"], "orders")
        .build();
    let mut orders = probe(&bus, "orders").await;
    let mut other = probe(&bus, "stockCounted").await;

    let canceled = json!({"orderId": "o-1", "reason": "r"});
    let ids = bus
        .emit_batch([
            Emit::new("orderPlaced", placed("o-1")),
            // A type outside the catalogue (permissive): its own topic, no `dataschema`.
            Emit::new("stockCounted", json!({"sku": "s-1", "count": 3})),
            Emit::new("orderCanceled", canceled.clone()).source("/test/returns"),
            Emit::new("stockCounted", json!({"sku": "s-2", "count": 0})).key("s-2"),
            Emit::new("orderPlaced", placed("o-2")).subject("orders/o-2"),
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut orders).await.event().clone());
    }
    let placed_schema = got[0].dataschema().map(str::to_owned);
    assert!(
        placed_schema.is_some(),
        "a catalogued type carries its schema"
    );
    let seen: Vec<(&str, &str, &str, Option<&str>)> = got
        .iter()
        .map(|e| (e.id(), e.ty(), e.source(), e.subject()))
        .collect();
    assert_eq!(
        seen,
        [
            (ids[0].as_str(), "orderPlaced", "/test/shop", None),
            (ids[2].as_str(), "orderCanceled", "/test/returns", None),
            (
                ids[4].as_str(),
                "orderPlaced",
                "/test/shop",
                Some("orders/o-2")
            ),
        ]
    );
    assert_eq!(got[1].json::<serde_json::Value>().unwrap(), canceled);

    let first = next(&mut other).await.event().clone();
    let second = next(&mut other).await.event().clone();
    assert_eq!((first.id(), first.ty()), (ids[1].as_str(), "stockCounted"));
    assert_eq!(first.dataschema(), None);
    assert_eq!(
        (second.id(), second.partition_key()),
        (ids[3].as_str(), Some("s-2"))
    );
}

#[tokio::test]
async fn emit_after_shutdown_fails_with_closed() {
    let broker = broker();
    let bus = bus(&broker);
    bus.shutdown(Duration::from_secs(1)).await.unwrap();
    let err = bus.emit("orderPlaced", placed("o-1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert!(bus.shutdown(Duration::from_secs(1)).await.is_ok());
}

#[tokio::test]
async fn id_and_source_overrides_are_kept_and_validated_non_empty() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    let id = bus
        .send(
            Emit::new("orderPlaced", placed("o-1"))
                .id("producer-42")
                .source("/external/shop"),
        )
        .await
        .unwrap();
    assert_eq!(id, "producer-42");
    let d = next(&mut sub).await;
    assert_eq!(d.event().id(), "producer-42");
    assert_eq!(d.event().source(), "/external/shop");

    // Only the id given: the Bus's own source stays.
    let id = bus
        .send(Emit::new("orderPlaced", placed("o-2")).id("producer-43"))
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        (d.event().id(), d.event().source()),
        (id.as_str(), "/test/shop")
    );

    // Empty overrides are refused and nothing is published.
    for emit in [
        Emit::new("orderPlaced", placed("o-3")).id(""),
        Emit::new("orderPlaced", placed("o-3")).source(" "),
    ] {
        let err = bus.send(emit).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEvent, "{err}");
        assert!(err.message().contains("must not be empty"), "{err}");
    }
    let err = bus
        .emit_batch([Emit::new("orderPlaced", placed("o-3")).id("")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidEvent, "{err}");
    let next_id = bus.emit("orderPlaced", placed("o-4")).await.unwrap();
    assert_eq!(next(&mut sub).await.event().id(), next_id);
}

/// `orderPlaced` data as a Rust value, its fields in an order a sorted `Value` would not keep.
#[derive(Serialize)]
struct Placed<'a> {
    total: f64,
    #[serde(rename = "orderId")]
    order_id: &'a str,
}

#[tokio::test]
async fn emit_json_writes_the_value_s_own_bytes_and_validates_them_like_emit() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    let data = Placed {
        total: 12.5,
        order_id: "o-1",
    };
    let id = bus.emit_json("orderPlaced", &data).await.unwrap();
    let d = next(&mut sub).await;
    let e = d.event();
    assert_eq!(e.id(), id);
    assert_eq!(e.dataschema(), Some("urn:evbus:schema:orderPlaced:1"));
    assert_eq!(e.datacontenttype(), Some("application/json"));
    // Exactly what serde_json writes for the value: its field order, not sorted keys.
    assert_eq!(
        e.data().map(|b| &b[..]),
        Some(&br#"{"total":12.5,"orderId":"o-1"}"#[..])
    );

    // Invalid against the schema: refused with the violation, nothing published.
    let err = bus
        .emit_json(
            "orderPlaced",
            &Placed {
                total: -1.0,
                order_id: "o-2",
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation, "{err}");
    assert!(err.message().contains("total"), "{err}");
    // An unknown type in a strict catalogue: refused as `emit` refuses it.
    let err = bus.emit_json("orderShipped", &data).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation, "{err}");
    assert!(err.message().contains("orderShipped"), "{err}");
    // Neither was published: the next valid event is the next thing the topic carries.
    let id = bus.emit_json("orderPlaced", &data).await.unwrap();
    assert_eq!(next(&mut sub).await.event().id(), id);
}

#[tokio::test]
async fn emit_json_of_data_json_cannot_express_fails_and_publishes_nothing() {
    let broker = broker();
    let mut b = evbus::Catalog::builder();
    b.strict(false);
    let bus = Bus::new(Arc::new(broker.connect()), b.freeze().unwrap(), "/test");
    let mut sub = probe(&bus, "gridUpdated").await;

    // JSON object keys are strings: a map keyed by pairs has no JSON form.
    let cells: std::collections::BTreeMap<(u8, u8), u8> = [((0, 0), 1)].into_iter().collect();
    let err = bus.emit_json("gridUpdated", &cells).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidEvent, "{err}");
    assert!(err.message().contains("`gridUpdated` data"), "{err}");

    // A permissive catalogue lets an unregistered type through unchecked, no `dataschema`;
    // this is the first event the topic carries.
    let id = bus.emit_json("gridUpdated", &[1, 2, 3]).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.event().id(), id);
    assert_eq!(d.event().dataschema(), None);
    assert_eq!(d.event().data().map(|b| &b[..]), Some(&b"[1,2,3]"[..]));
}

#[tokio::test]
async fn an_emit_does_nothing_until_its_future_is_polled() {
    let broker = broker();
    let bus = bus(&broker);
    let mut sub = probe(&bus, "orderPlaced").await;

    // Made and dropped unpolled: nothing is published.
    drop(bus.emit("orderPlaced", placed("o-dropped")));
    drop(bus.emit_json("orderPlaced", &placed("o-dropped-json")));
    let kept = bus.emit("orderPlaced", placed("o-kept")).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.event().id(), kept);
    assert_eq!(
        d.event().json::<serde_json::Value>().unwrap(),
        placed("o-kept")
    );

    // Made before the shutdown, polled after it: the Bus is closed by then.
    let late = bus.emit("orderPlaced", placed("o-late"));
    let late_json = bus.emit_json("orderPlaced", &placed("o-late-json"));
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(late.await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(late_json.await.unwrap_err().kind(), ErrorKind::Closed);
}
