//! Abuse suite, integrity part: SSRF through deprecated or IPv4-embedding IPv6 ranges,
//! header-bound attributes (control characters, non-ASCII ids), id squatting across sources,
//! and streams of keys that expire.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use chrono::Utc;
use evbus_gateway::Store;
use evbus_gateway::store::{Ingested, NewEvent};
use serde_json::{Value, json};
use support::*;

const ORDERS: &str = "afterOrderCreate";
const PRODUCTS: &str = "afterProductUpdate";

fn product() -> Value {
    json!({"productId": "p1", "product": {"_id": "p1", "shopId": "s", "title": "T", "isVisible": true,
        "variants": [{"_id": "v", "price": 1, "costPrice": 0.5}]}})
}

/// Posts a structured CloudEvent built from `attributes` (plus JSON data); status and raw body.
async fn post_event(h: &Harness, key: &str, attributes: Value) -> (StatusCode, String) {
    h.post_cloud_event(key, &attributes).await
}

fn event(id: &str, source: &str, ty: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": source, "type": ty,
        "datacontenttype": "application/json", "data": data})
}

// Item 14.
#[tokio::test]
async fn ssrf_deprecated_and_ipv4_embedding_ipv6_webhook_urls_are_refused() {
    // The test policy allows 127.0.0.0/8: an embedded loopback must not ride on it either.
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    for url in [
        "http://[::127.0.0.1]:9/hook",
        "http://[::ffff:0:7f00:1]:9/hook",
        "http://[2002:7f00:1::1]:9/hook",
        "http://[fec0::1]:9/hook",
        "http://[64:ff9b::a00:1]:9/hook",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]:9/hook",
    ] {
        let (status, problem) = h
            .call(
                "POST",
                "/v1/webhooks",
                Some(&key),
                Some(json!({"url": url, "event_types": [ORDERS]})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {problem}");
    }
    let (_, list) = h.call("GET", "/v1/webhooks", Some(&key), None).await;
    assert_eq!(list, json!([]), "no refused URL may be registered");
}

// Item 8.
#[tokio::test]
async fn control_characters_and_non_ascii_ids_are_refused_at_the_door_without_echo() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &["*"]).await;
    let marker = "QZX9marker";
    let long_id = format!("{marker}{}", "a".repeat(300));
    let base = || event("ok-id", "/src", ORDERS, order_created());
    let mut cases: Vec<(&str, Value)> = Vec::new();
    for bad_id in [
        format!("{marker}\nX-Injected: 1"),
        format!("{marker}\u{0}"),
        format!("{marker}\u{7f}"),
        format!("{marker}-évènement"),
        format!("{marker} with space"),
        long_id.clone(),
    ] {
        let mut e = base();
        e["id"] = json!(bad_id);
        cases.push(("id", e));
    }
    let mut e = base();
    e["source"] = json!(format!("/{marker}\r\nx"));
    cases.push(("source", e));
    let mut e = base();
    e["subject"] = json!(format!("{marker}\u{1b}[31m"));
    cases.push(("subject", e));
    let mut e = base();
    e["type"] = json!(format!("{marker}\n"));
    cases.push(("type", e));
    let mut e = base();
    e["partitionkey"] = json!(format!("{marker}\u{7}"));
    cases.push(("partitionkey", e));
    let mut e = base();
    e["myext"] = json!(format!("{marker}\t\u{85}"));
    cases.push(("extension", e));
    for (what, body) in cases {
        let (status, text) = post_event(&h, &key, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        assert!(
            !text.contains(marker) && !text.contains("myext"),
            "the error must not echo the value ({what}): {text}"
        );
        let problem: Value = serde_json::from_str(&text).unwrap();
        assert!(problem["detail"].as_str().unwrap().contains("CloudEvent"));
    }
    // Binary mode: a percent-encoded newline decodes into the id and is refused as well.
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("{marker}%0Ax"))
        .header("ce-source", "/src")
        .header("ce-type", ORDERS)
        .header("content-type", "application/json")
        .body(order_created().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(!resp.text().await.unwrap().contains(marker));
    // Nothing refused reached the log; a clean event with the longest id still goes through.
    let ok_id = "k".repeat(256);
    let mut e = base();
    e["id"] = json!(ok_id);
    e["subject"] = json!("commandes/été");
    let (status, text) = post_event(&h, &key, e).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    eventually("the clean event is logged", || async {
        let log = h
            .store
            .events_after(0, &[ORDERS.to_owned()], 100, usize::MAX)
            .await
            .unwrap();
        log.len() == 1 && log[0].id == ok_id
    })
    .await;
}

// Item 7.
#[tokio::test]
async fn an_id_reused_by_another_source_is_delivered_and_a_conflicting_repost_gets_409() {
    let h = Harness::memory().await;
    let orders = h.key(&[], &[ORDERS]).await;
    let squatter = h.key(&[], &[PRODUCTS]).await;
    let subscriber = h.key(&["*"], &[]).await;
    let mut receiver = Receiver::start(200).await;
    h.register(&subscriber, &receiver.url(), &[ORDERS, PRODUCTS])
        .await;

    let id = "evt-shared-1";
    let (s, text) = post_event(&h, &orders, event(id, "/shop", ORDERS, order_created())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    // Another producer (another source) reusing the id: its own event, delivered too.
    let (s, text) = post_event(&h, &squatter, event(id, "/catalog", PRODUCTS, product())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    let mut got = [receiver.next().await.json(), receiver.next().await.json()];
    got.sort_by_key(|e| e["source"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["source"], "/catalog");
    assert_eq!(got[0]["type"], PRODUCTS);
    assert_eq!(got[1]["source"], "/shop");
    assert_eq!(got[1]["type"], ORDERS);

    // The same source and id with other content: refused, not dropped silently.
    let (s, text) = post_event(&h, &squatter, event(id, "/shop", PRODUCTS, product())).await;
    assert_eq!(s, StatusCode::CONFLICT, "{text}");
    assert!(!text.contains(id), "the 409 must not echo the id: {text}");
    let mut changed = order_created();
    changed["createdBy"] = json!("someone-else");
    let (s, _) = post_event(&h, &orders, event(id, "/shop", ORDERS, changed)).await;
    assert_eq!(s, StatusCode::CONFLICT);

    // An identical re-post stays idempotent: accepted, logged and delivered once.
    let (s, body) = post_event(&h, &orders, event(id, "/shop", ORDERS, order_created())).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["id"], id);
    let marker_id = "evt-after-1";
    let (s, _) = post_event(
        &h,
        &orders,
        event(marker_id, "/shop", ORDERS, order_created()),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let next = receiver.next().await;
    assert_eq!(
        next.id(),
        marker_id,
        "nothing but the new event is delivered"
    );
    let log = h
        .store
        .events_after(
            0,
            &[ORDERS.to_owned(), PRODUCTS.to_owned()],
            100,
            usize::MAX,
        )
        .await
        .unwrap();
    let keys: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.source.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(
        keys,
        [("/shop", id), ("/catalog", id), ("/shop", marker_id)],
        "the log holds each (source, id) once"
    );
}

/// Identical posts that overlap (a client's retry while its first attempt is still being
/// sent: the client retries connection failures, 408 and 5xx) are sent to the bus once, and
/// each is answered 202. The claim was not exclusive: every identical post that arrived
/// before the first one settled sent the event again (an outside review counted 4 copies of
/// 5 posts at once in the transport; consumers of the bus got them all).
#[tokio::test]
async fn identical_posts_at_once_are_sent_to_the_bus_once() {
    use evbus::layer::{Fault, Faults, LayerExt};
    use evbus::{SubscribeOptions, Transport};
    let broker = evbus::memory::MemoryBroker::new(Default::default());
    // Every publish takes a while: the posts overlap the first one's send.
    let slow = Faults::seeded(7).inject(Fault::DelayPublish(Duration::from_millis(300)), 1.0);
    let h = Harness::with(
        std::sync::Arc::new(broker.connect().layer(slow)),
        test_config(),
    )
    .await;
    let orders = h.key(&[], &[ORDERS]).await;
    let watcher = broker.connect();
    let mut sub = watcher
        .topic(ORDERS)
        .await
        .unwrap()
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let ids: Vec<String> = (0..3).map(|round| format!("evt-race-{round}")).collect();
    for id in &ids {
        let posts = futures::future::join_all(
            (0..5).map(|_| post_event(&h, &orders, event(id, "/shop", ORDERS, order_created()))),
        )
        .await;
        for (s, text) in posts {
            assert_eq!(s, StatusCode::ACCEPTED, "{text}");
        }
    }
    let marker = "evt-race-end";
    let (s, text) = post_event(&h, &orders, event(marker, "/shop", ORDERS, order_created())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    let mut seen = Vec::new();
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .expect("the marker within 10 s")
            .expect("open")
            .unwrap();
        let id = delivery.event().id().to_owned();
        delivery.ack().await.unwrap();
        if id == marker {
            break;
        }
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, ids, "each posted event sent to the bus once");
}

/// Found by an outsider review: the idempotency answer was an oracle. A key that may publish
/// a type posted guesses under another tenant's (`source`, `id`): 202 for the exact data
/// (curation included, so a redacted field it cannot read), 409 otherwise. Only the key that
/// posted an event may now re-post it idempotently; any other key gets 409 for every guess.
#[tokio::test]
async fn another_keys_repost_is_a_conflict_whatever_it_guessed() {
    let h = Harness::memory().await;
    let owner = h.key(&[], &[ORDERS]).await;
    let guesser = h.key(&[], &[ORDERS]).await;
    let id = "evt-guessed-1";
    let (s, text) = post_event(&h, &owner, event(id, "/shop", ORDERS, order_created())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
    let mut wrong = order_created();
    wrong["createdBy"] = json!("a wrong guess");
    for (guess, what) in [
        (wrong, "a wrong guess"),
        (order_created(), "the exact data"),
    ] {
        let (s, text) = post_event(&h, &guesser, event(id, "/shop", ORDERS, guess)).await;
        assert_eq!(s, StatusCode::CONFLICT, "{what}: {text}");
    }
    // The owner's own re-post stays idempotent.
    let (s, text) = post_event(&h, &owner, event(id, "/shop", ORDERS, order_created())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{text}");
}

// Item 7, at the log: a redelivery is quiet, a different event under a logged (source, id)
// is reported as a conflict, the same id under another source is logged.
#[tokio::test]
async fn the_log_keys_events_by_source_and_id() {
    let h = Harness::memory().await;
    let at = Utc::now();
    let ev = |source: &'static str, fingerprint: &'static str| NewEvent {
        source,
        id: "same",
        ty: ORDERS,
        fingerprint,
        received_at: at,
        body: "{}",
    };
    assert!(matches!(
        h.store.ingest(&ev("/a", "f1")).await.unwrap(),
        Ingested::Logged(_)
    ));
    assert_eq!(
        h.store.ingest(&ev("/a", "f1")).await.unwrap(),
        Ingested::Redelivered
    );
    assert_eq!(
        h.store.ingest(&ev("/a", "f2")).await.unwrap(),
        Ingested::Conflict
    );
    assert!(matches!(
        h.store.ingest(&ev("/b", "f2")).await.unwrap(),
        Ingested::Logged(_)
    ));
}

// Item 7, the schema change: a log written by the first schema keeps its events (with their
// source) and its positions.
#[tokio::test]
async fn the_source_migration_keeps_events_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.sqlite3");
    {
        // The first schema only.
        let pool = sqlite_store_before(&path, 2).await;
        for (id, body) in [
            ("a", r#"{"source":"/s","id":"a"}"#),
            ("b", r#"{"source":"/t","id":"b"}"#),
            ("c", r#"{"source":"/t","id":"c"}"#),
        ] {
            sqlx::query("INSERT INTO events (id, type, received_at, body) VALUES (?, 't', 1, ?)")
                .bind(id)
                .bind(body)
                .execute(&pool)
                .await
                .unwrap();
        }
        // The newest event was pruned: its position must still never be reused.
        sqlx::query("DELETE FROM events WHERE id = 'c'")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = evbus_gateway::SqliteStore::open_file(&path).await.unwrap();
    let log = store
        .events_after(0, &["t".to_owned()], 10, usize::MAX)
        .await
        .unwrap();
    let rows: Vec<(i64, &str, &str)> = log
        .iter()
        .map(|e| (e.seq, e.source.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(rows, [(1, "/s", "a"), (2, "/t", "b")]);
    let new = NewEvent {
        source: "/s",
        id: "d",
        ty: "t",
        fingerprint: "f",
        received_at: Utc::now(),
        body: "{}",
    };
    assert_eq!(store.ingest(&new).await.unwrap(), Ingested::Logged(4));
}

// Item 13.
#[tokio::test]
async fn a_stream_ends_when_its_key_expires() {
    let h = Harness::memory().await;
    let expires_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let spec = evbus_gateway::KeySpec::new("short-lived")
        .subscribe(["*"])
        .expires_at(Some(expires_at));
    let (_, key) = evbus_gateway::create_key(h.store.as_ref(), spec)
        .await
        .unwrap();
    let mut stream = h
        .http
        .get(h.url("/v1/stream"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    // No event arrives: the stream must end on its own, at expiry (keep-alives are 15 s apart).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.chunk().await {}
        Utc::now()
    })
    .await;
    let ended_at = ended.expect("the stream of an expired key must end");
    assert!(ended_at >= expires_at, "ended before the key expired");
    let (s, _) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
