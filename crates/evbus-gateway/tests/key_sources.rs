//! Keys bound to the CloudEvents sources they may publish under: a key cannot publish as
//! another producer, so it can neither claim another producer's (`source`, `id`) before that
//! producer does (which would get the producer's own event a 409) nor learn from a 409 which
//! ids another producer used.

mod support;

use axum::http::StatusCode;
use evbus_gateway::Store;
use serde_json::{Value, json};
use support::*;

const ORDERS: &str = "afterOrderCreate";

/// Posts a structured CloudEvent; status and raw body.
async fn post(h: &Harness, key: &str, id: &str, source: &str) -> (StatusCode, String) {
    let event = json!({"specversion": "1.0", "id": id, "source": source, "type": ORDERS,
        "datacontenttype": "application/json", "data": order_created()});
    h.post_cloud_event(key, &event).await
}

#[tokio::test]
async fn a_key_publishes_only_under_its_sources_and_cannot_claim_another_producers_ids() {
    let h = Harness::memory().await;
    let shop = h.key_for_sources(&[], &[ORDERS], &["/shop"]).await;
    let partner = h
        .key_for_sources(&[], &[ORDERS], &["https://partner.example/*"])
        .await;
    let subscriber = h.key(&["*"], &[]).await;
    let mut receiver = Receiver::start(200).await;
    h.register(&subscriber, &receiver.url(), &[ORDERS]).await;

    // The partner tries the shop's next id under the shop's source, and a source that only
    // starts like its own: refused before anything is kept, the value not echoed.
    for source in [
        "/shop",
        "https://partner.example.evil/x",
        "https://partner.example",
    ] {
        let (s, text) = post(&h, &partner, "order-1", source).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{source}: {text}");
        assert!(text.contains("`source`"), "{text}");
        assert!(!text.contains(source), "echoed {source}: {text}");
    }
    // Binary mode is held to the same sources.
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&partner)
        .header("ce-specversion", "1.0")
        .header("ce-id", "order-1")
        .header("ce-source", "/shop")
        .header("ce-type", ORDERS)
        .header("content-type", "application/json")
        .body(order_created().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    // The shop's own event under that id is still its own: accepted and delivered, not a 409.
    let (s, text) = post(&h, &shop, "order-1", "/shop").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    let got = receiver.next().await.json();
    assert_eq!(
        (got["id"].as_str(), got["source"].as_str()),
        (Some("order-1"), Some("/shop"))
    );
    // The shop may not use the partner's sources either.
    let (s, _) = post(&h, &shop, "order-2", "https://partner.example/eu").await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A limited key sees its own sources (and nothing of other keys) at GET /v1/me.
    let (s, me) = h.call("GET", "/v1/me", Some(&partner), None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["sources"], json!(["https://partner.example/*"]));
    assert_eq!(me["publish"], json!([ORDERS]));
    assert!(
        me.get("key").is_none() && me.get("secret_hash").is_none(),
        "{me}"
    );
    assert_eq!(me["publish_byte_rate"]["default"], json!(true));
    let (s, _) = h.call("GET", "/v1/keys", Some(&partner), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Each publishes under its own: a pattern's `*` covers any run of characters.
    let (s, text) = post(&h, &partner, "order-1", "https://partner.example/eu/1").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    let got = receiver.next().await.json();
    assert_eq!(got["source"], "https://partner.example/eu/1");
    // Nothing refused was delivered: the two accepted events were the only deliveries.
    let marker = "order-marker";
    let (s, _) = post(&h, &shop, marker, "/shop").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(receiver.next().await.id(), marker);
}

#[tokio::test]
async fn a_key_that_may_publish_is_refused_without_sources_and_lists_them_once_made() {
    let h = Harness::memory().await;
    let create = |body: Value| h.call("POST", "/v1/keys", Some(&h.admin), Some(body));

    let (s, problem) = create(json!({"name": "unbound", "publish": [ORDERS]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("at least one source"),
        "{problem}"
    );
    let (s, problem) = create(json!({"name": "empty", "publish": [ORDERS], "sources": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    // Invalid patterns by position, never quoted.
    let long = "s".repeat(evbus_gateway::keys::MAX_SOURCE_PATTERN_LEN + 1);
    let body =
        json!({"name": "bad", "publish": [ORDERS], "sources": ["/ok", "/MARKER\nx", "", long]});
    let (s, problem) = create(body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["invalid_positions"], json!([1, 2, 3]));
    assert!(!problem.to_string().contains("MARKER"), "{problem}");
    let (s, problem) =
        create(json!({"name": "typed", "publish": [ORDERS], "sources": "/shop"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    // None of the refused keys was made.
    let (_, keys) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    assert_eq!(
        keys.as_array().unwrap().len(),
        1,
        "only the admin key: {keys}"
    );

    // A key that only subscribes needs none.
    let (s, reader) = create(json!({"name": "reader", "subscribe": [ORDERS]})).await;
    assert_eq!(s, StatusCode::CREATED, "{reader}");
    assert_eq!(reader["sources"], json!([]));
    let sources = json!(["/shop", "https://shop.example/a,b/*"]);
    let (s, made) = create(json!({"name": "shop", "publish": [ORDERS], "sources": sources})).await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    assert_eq!(made["sources"], sources);
    let (_, keys) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    let listed = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == made["id"])
        .unwrap();
    assert_eq!(listed["sources"], sources);
    // A source with a comma is one source.
    let key = made["key"].as_str().unwrap();
    let (s, text) = post(&h, key, "o-comma", "https://shop.example/a,b/eu").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
}

/// Keys made before keys were bound to sources keep publishing under any source after the
/// store is migrated (`*`), as they could before; that is what GET /v1/keys shows for them.
/// Keys that may not publish get none.
#[tokio::test]
async fn keys_made_before_sources_were_bound_keep_any_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.sqlite3");
    {
        let pool = sqlite_store_before(&path, 7).await;
        sqlx::query(
            "INSERT INTO api_keys (id, name, secret_hash, subscribe, publish, admin, created_at)
             VALUES ('00000000000000aa', 'old', x'00', '[]', '[\"afterOrderCreate\"]', 0, 1),
                    ('00000000000000bb', 'reader', x'00', '[\"*\"]', '[]', 0, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let store = evbus_gateway::SqliteStore::open_file(&path).await.unwrap();
    let old = store.get_key("00000000000000aa").await.unwrap().unwrap();
    assert_eq!(old.publish, ["afterOrderCreate"]);
    assert_eq!(old.sources, ["*"]);
    // A key that may not publish needs none.
    let reader = store.get_key("00000000000000bb").await.unwrap().unwrap();
    assert!(reader.sources.is_empty(), "{:?}", reader.sources);
    store.close().await;
}

/// Every list of a key is checked on the request path, so each is bounded; and a source that
/// reads as another one (invisible formatting characters) is refused, in a key's patterns and
/// in a published event.
#[tokio::test]
async fn key_lists_are_bounded_and_sources_hold_no_invisible_formatting() {
    let h = Harness::memory().await;
    let create = |body: Value| h.call("POST", "/v1/keys", Some(&h.admin), Some(body));
    let max = evbus_gateway::keys::MAX_PATTERNS;
    let many = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    for body in [
        json!({"name": "s", "publish": [ORDERS], "sources": many("/s", max + 1)}),
        json!({"name": "p", "publish": many("t", max + 1), "sources": ["*"]}),
        json!({"name": "r", "subscribe": many("t", max + 1)}),
    ] {
        let (s, problem) = create(body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("more than {max}")),
            "{problem}"
        );
    }
    let (s, made) =
        create(json!({"name": "full", "publish": [ORDERS], "sources": many("/s", max)})).await;
    assert_eq!(s, StatusCode::CREATED, "{made}");

    for (i, pattern) in ["/shop/\u{202e}nimda", "/sh\u{200b}op", "\u{feff}/shop"]
        .into_iter()
        .enumerate()
    {
        let (s, problem) =
            create(json!({"name": "f", "publish": [ORDERS], "sources": ["/ok", pattern]})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{i}: {problem}");
        assert_eq!(problem["invalid_positions"], json!([1]), "{i}");
    }
    // Under `*`, a published source that reads as another one is refused all the same.
    let any = h.key_for_sources(&[], &[ORDERS], &["*"]).await;
    let (s, text) = post(&h, &any, "fmt-1", "/shop/\u{202e}nimda").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("invisible formatting"), "{text}");
    let (s, text) = post(&h, &any, "fmt-2", "/shop/é").await;
    assert_eq!(s, StatusCode::ACCEPTED, "visible non-ASCII is fine: {text}");
}
