//! Per-key rate limits: a key's own limit (set at creation through `POST /v1/keys`), the
//! gateway's default for keys without one, what `GET /v1/keys` shows, and the values the
//! admin API refuses; and the publish byte rate (`publish_bytes_per_second`, or a key's own
//! `publish_byte_rate`).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use evbus_gateway::Store;
use serde_json::{Value, json};
use support::*;

/// Requests `GET /v1/event-types` with `key` until the first 429 (at most `max` requests):
/// the statuses and how long the run took.
async fn until_refused(h: &Harness, key: &str, max: usize) -> (Vec<u16>, Duration) {
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..max {
        let resp = h
            .http
            .get(h.url("/v1/event-types"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        if status == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
        statuses.push(status);
        if status != 200 {
            break;
        }
    }
    (statuses, started.elapsed())
}

/// The run of `until_refused` is what a token bucket of `burst` refilled at `per_second`
/// allows: at least `burst` requests pass, then a 429 comes, no later than the tokens the
/// run's own duration refilled.
fn assert_bucket(statuses: &[u16], took: Duration, per_second: u32, burst: usize) {
    let passed = statuses.iter().take_while(|s| **s == 200).count();
    assert_eq!(
        statuses.last(),
        Some(&429),
        "no 429 after {passed} requests: {statuses:?}"
    );
    assert!(passed >= burst, "refused within the burst: {statuses:?}");
    let refilled = (took.as_secs_f64() * f64::from(per_second)).ceil() as usize;
    assert!(
        passed <= burst + refilled,
        "{passed} requests passed in {took:?}, a bucket of {burst} at {per_second}/s allows {}",
        burst + refilled
    );
}

async fn create_key(h: &Harness, body: Value) -> (StatusCode, Value) {
    h.call("POST", "/v1/keys", Some(&h.admin), Some(body)).await
}

async fn listed(h: &Harness, id: &str) -> Value {
    let (s, keys) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK);
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("key {id} not listed: {keys}"))
}

#[tokio::test]
async fn a_key_with_its_own_limit_gets_429_while_other_keys_are_unaffected() {
    let h = Harness::memory().await;
    let (s, limited) = create_key(
        &h,
        json!({"name": "slow", "subscribe": ["*"], "rate_limit": {"per_second": 5, "burst": 5}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{limited}");
    assert_eq!(
        limited["rate_limit"],
        json!({"per_second": 5, "burst": 5, "default": false})
    );
    let other = h.key(&["*"], &[]).await;

    let (statuses, took) = until_refused(&h, limited["key"].as_str().unwrap(), 50).await;
    assert_bucket(&statuses, took, 5, 5);

    // The other key (the default: 50/s, burst 100) goes on, and so does the admin key.
    for key in [&other, &h.admin] {
        for _ in 0..20 {
            let (s, _) = h.call("GET", "/v1/event-types", Some(key), None).await;
            assert_eq!(s, StatusCode::OK);
        }
    }
    // The limit is the key's own, kept in the store and listed.
    let view = listed(&h, limited["id"].as_str().unwrap()).await;
    assert_eq!(
        view["rate_limit"],
        json!({"per_second": 5, "burst": 5, "default": false})
    );
    let record = h
        .store
        .get_key(limited["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.rate_limit,
        Some(evbus_gateway::RateLimit::new(5, 5).unwrap())
    );
}

#[tokio::test]
async fn keys_without_their_own_limit_get_the_gateway_default() {
    let mut config = test_config();
    config.rate_limit_per_second = 2;
    config.rate_limit_burst = 4;
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let (s, plain) = create_key(&h, json!({"name": "plain", "subscribe": ["*"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{plain}");
    assert_eq!(
        plain["rate_limit"],
        json!({"per_second": 2, "burst": 4, "default": true})
    );
    // Given only `per_second`, the burst is two seconds' worth.
    let (s, fast) = create_key(
        &h,
        json!({"name": "fast", "subscribe": ["*"], "rate_limit": {"per_second": 1000}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{fast}");
    assert_eq!(
        fast["rate_limit"],
        json!({"per_second": 1000, "burst": 2000, "default": false})
    );
    let view = listed(&h, plain["id"].as_str().unwrap()).await;
    assert_eq!(
        view["rate_limit"],
        json!({"per_second": 2, "burst": 4, "default": true})
    );

    let (statuses, took) = until_refused(&h, plain["key"].as_str().unwrap(), 50).await;
    assert_bucket(&statuses, took, 2, 4);
    // A key with its own, higher limit is not held to the default.
    for _ in 0..30 {
        let (s, _) = h
            .call("GET", "/v1/event-types", fast["key"].as_str(), None)
            .await;
        assert_eq!(s, StatusCode::OK);
    }
}

#[tokio::test]
async fn the_admin_api_refuses_bad_rate_limits_with_a_clear_400() {
    let h = Harness::memory().await;
    let before = h.store.list_keys().await.unwrap().len();
    let cases = [
        (json!({"per_second": 0}), "rate_limit.per_second"),
        (json!({"per_second": -5}), "rate_limit.per_second"),
        (json!({"per_second": 1.5}), "rate_limit.per_second"),
        (json!({"per_second": "5"}), "rate_limit.per_second"),
        (json!({"per_second": 1_000_001}), "rate_limit.per_second"),
        (json!({"per_second": 5, "burst": 0}), "rate_limit.burst"),
        (
            json!({"per_second": 5, "burst": 2_000_000}),
            "rate_limit.burst",
        ),
        (json!({"burst": 5}), "rate_limit.per_second"),
        (json!({"per_second": 5, "rate": 5}), "rate_limit"),
        (json!(5), "rate_limit"),
        (json!([5, 5]), "rate_limit"),
    ];
    for (limit, field) in cases {
        let (s, body) = create_key(&h, json!({"name": "bad", "rate_limit": limit})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{limit}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(&format!("`{field}`")),
            "{limit}: the detail names `{field}`: {body}"
        );
    }
    // Nothing was created; `null` means the default.
    assert_eq!(h.store.list_keys().await.unwrap().len(), before);
    let (s, body) = create_key(&h, json!({"name": "ok", "rate_limit": null})).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["rate_limit"]["default"], json!(true));
    // A whole number written with a fraction is a whole number (JSON Schema's `integer`).
    let (s, body) = create_key(
        &h,
        json!({"name": "float", "rate_limit": {"per_second": 6133.0, "burst": 7000.0}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["rate_limit"],
        json!({"per_second": 6133, "burst": 7000, "default": false})
    );
}

const ORDERS: &str = "afterOrderCreate";

/// A gateway whose keys may publish `bytes_per_second` bytes of bodies, with a body limit of
/// `max_body` bytes (the burst: the rate is far below it).
async fn byte_limited(bytes_per_second: u64, max_body: usize) -> Harness {
    let mut config = test_config();
    config.publish_bytes_per_second = bytes_per_second;
    config.max_body_bytes = max_body;
    Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await
}

/// A valid structured `afterOrderCreate` CloudEvent of exactly `len` bytes (at least about
/// 700), its `createdBy` padded.
fn event_of(len: usize) -> String {
    let build = |pad: usize| {
        let mut data = order_created();
        data["createdBy"] = json!("x".repeat(pad));
        json!({"specversion": "1.0", "id": format!("big-{}", uuid::Uuid::now_v7().simple()),
               "source": "/external", "type": ORDERS, "datacontenttype": "application/json",
               "data": data})
        .to_string()
    };
    let bare = build(0).len();
    assert!(len >= bare, "an event is at least {bare} bytes");
    let event = build(len - bare);
    assert_eq!(event.len(), len);
    event
}

/// `POST /v1/events` of `body` as a structured CloudEvent (with a `Content-Length`).
async fn post_event(h: &Harness, key: &str, body: String) -> (u16, HeaderMap, Value) {
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(key)
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The publish byte rate's 429: a problem naming the rate, with `Retry-After` of at least
/// `at_least` seconds.
fn assert_over_byte_rate(status: u16, headers: &HeaderMap, body: &Value, rate: u64, at_least: u64) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry >= at_least,
        "Retry-After {retry}, expected at least {at_least}"
    );
    assert_eq!(body["status"], json!(429), "{body}");
    assert_eq!(body["limit"], json!(rate), "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("publish_bytes_per_second"), "{body}");
}

/// Finding 8 of the outside review: validating large events within the request rate made
/// another key wait. A key that has spent its publish byte allowance is answered 429 with
/// `Retry-After`, while another key's publish is accepted at once and the first key's other
/// requests go on.
#[tokio::test]
async fn a_key_over_its_publish_byte_rate_gets_429_while_another_key_publishes() {
    // 1 KiB/s, a burst of 256 KiB (the body limit): two events of 100 KB, not three.
    let h = byte_limited(1024, 256 * 1024).await;
    let heavy = h.key(&[], &[ORDERS]).await;
    let other = h.key(&[], &[ORDERS]).await;
    for _ in 0..2 {
        let (status, _, body) = post_event(&h, &heavy, event_of(100_000)).await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, headers, body) = post_event(&h, &heavy, event_of(100_000)).await;
    // 62 KB left of 256 KiB, 38 KB short at 1 KiB/s: more than half a minute.
    assert_over_byte_rate(status, &headers, &body, 1024, 30);

    let started = Instant::now();
    let (status, _, body) = post_event(&h, &other, event_of(100_000)).await;
    assert_eq!(status, 202, "the other key's publish: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the other key waited {:?}",
        started.elapsed()
    );
    // The byte rate bounds publishing only: the heavy key's other requests still pass.
    let (s, _) = h.call("GET", "/v1/event-types", Some(&heavy), None).await;
    assert_eq!(s, StatusCode::OK);
    // And a small event that fits what is left is accepted.
    let (status, _, body) = post_event(&h, &heavy, event_of(1_000)).await;
    assert_eq!(status, 202, "{body}");
}

/// A key made with a publish byte rate of its own is held to it, above or below the
/// gateway's default, while keys without one keep the default; `GET /v1/keys` shows which.
#[tokio::test]
async fn a_key_with_its_own_publish_byte_rate_is_held_to_it() {
    // A default of 1 KiB/s and a body limit of 256 KiB: bursts of 256 KiB.
    let h = byte_limited(1024, 256 * 1024).await;
    let create = |name: &str, rate: u64| {
        create_key(
            &h,
            json!({"name": name, "publish": [ORDERS], "sources": ["/external"],
                   "publish_byte_rate": {"bytes_per_second": rate}}),
        )
    };
    let (s, fast) = create("producer", 1024 * 1024).await;
    assert_eq!(s, StatusCode::CREATED, "{fast}");
    assert_eq!(
        fast["publish_byte_rate"],
        json!({"bytes_per_second": 1024 * 1024, "default": false})
    );
    let (s, slow) = create("trickle", 1).await;
    assert_eq!(s, StatusCode::CREATED, "{slow}");
    let plain = h.key(&[], &[ORDERS]).await;
    let plain_id = evbus_gateway::keys::parse(&plain).unwrap().0.to_owned();
    assert_eq!(
        listed(&h, &plain_id).await["publish_byte_rate"],
        json!({"bytes_per_second": 1024, "default": true})
    );
    assert_eq!(
        listed(&h, fast["id"].as_str().unwrap()).await["publish_byte_rate"],
        json!({"bytes_per_second": 1024 * 1024, "default": false})
    );

    // Its own burst of 1 MiB: ten events of 100 KB, where the default lets two through.
    let fast = fast["key"].as_str().unwrap();
    for n in 0..10 {
        let (status, _, body) = post_event(&h, fast, event_of(100_000)).await;
        assert_eq!(status, 202, "event {n}: {body}");
    }
    for key in [&plain, slow["key"].as_str().unwrap()] {
        for _ in 0..2 {
            let (status, _, body) = post_event(&h, key, event_of(100_000)).await;
            assert_eq!(status, 202, "{body}");
        }
    }
    let (status, headers, body) = post_event(&h, &plain, event_of(100_000)).await;
    assert_over_byte_rate(status, &headers, &body, 1024, 30);
    // Below the default: the burst is still the largest body, and `limit` is its own rate.
    let slow = slow["key"].as_str().unwrap();
    let (status, headers, body) = post_event(&h, slow, event_of(100_000)).await;
    assert_over_byte_rate(status, &headers, &body, 1, 30);
}

#[tokio::test]
async fn the_admin_api_refuses_bad_publish_byte_rates_with_a_clear_400() {
    let h = Harness::memory().await;
    let before = h.store.list_keys().await.unwrap().len();
    let max = evbus_gateway::store::MAX_PUBLISH_BYTES_PER_SECOND;
    for rate in [
        json!({"bytes_per_second": 0}),
        json!({"bytes_per_second": -1}),
        json!({"bytes_per_second": 1.5}),
        json!({"bytes_per_second": "5"}),
        json!({"bytes_per_second": max + 1}),
        json!({"bytes_per_second": 5, "burst": 5}),
        json!({}),
        json!(5),
    ] {
        let (s, body) = create_key(&h, json!({"name": "bad", "publish_byte_rate": rate})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{rate}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("`publish_byte_rate`"), "{rate}: {body}");
    }
    assert_eq!(h.store.list_keys().await.unwrap().len(), before);
    let (s, body) = create_key(&h, json!({"name": "ok", "publish_byte_rate": null})).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["publish_byte_rate"]["default"], json!(true));
    let (s, body) = create_key(
        &h,
        json!({"name": "max", "publish_byte_rate": {"bytes_per_second": max}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = create_key(
        &h,
        json!({"name": "float", "publish_byte_rate": {"bytes_per_second": 4096.0}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["publish_byte_rate"]["bytes_per_second"], json!(4096));
}

/// The 429 comes before the body is parsed or validated: over its allowance, a body that is
/// not JSON, or breaks the event's schema, is answered 429, not 400 or 422, with a
/// `Content-Length` or without one (chunked: charged with the bytes read).
#[tokio::test]
async fn a_publish_over_the_byte_rate_is_refused_before_its_body_is_parsed() {
    let h = byte_limited(1024, 256 * 1024).await;
    let spent = h.key(&[], &[ORDERS]).await;
    let fresh = h.key(&[], &[ORDERS]).await;
    let not_json = "x".repeat(60_000);
    let mut breaks_schema: Value = serde_json::from_str(&event_of(100_000)).unwrap();
    breaks_schema["data"]["order"] = json!(42);
    let breaks_schema = breaks_schema.to_string();

    // A key with its allowance gets these bodies parsed, and refused for what they are
    // (220 KB of its 256 KiB, the chunked one below included).
    let (status, _, body) = post_event(&h, &fresh, not_json.clone()).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = post_event(&h, &fresh, breaks_schema.clone()).await;
    assert_eq!(status, 422, "{body}");

    // Spent: 250 KB of a 256 KiB allowance, 12 KB left.
    let (status, _, body) = post_event(&h, &spent, event_of(250_000)).await;
    assert_eq!(status, 202, "{body}");
    for invalid in [&not_json, &breaks_schema] {
        let (status, headers, body) = post_event(&h, &spent, invalid.clone()).await;
        assert_over_byte_rate(status, &headers, &body, 1024, 30);
    }
    // Without a Content-Length: charged with what was read, still before parsing.
    let (status, headers, body) = post_chunked(&h, &spent, not_json.as_bytes()).await;
    assert_over_byte_rate(status, &headers, &body, 1024, 30);
    // The same chunked body from the key with its allowance left is parsed (and refused).
    let (status, _, body) = post_chunked(&h, &fresh, not_json.as_bytes()).await;
    assert_eq!(status, 400, "{body}");
}

/// `POST /v1/events` of `body` in chunks of 16 KiB, without a `Content-Length`, over a raw
/// connection: the status, headers and body of the answer.
async fn post_chunked(h: &Harness, key: &str, body: &[u8]) -> (u16, HeaderMap, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = h.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/cloudevents+json\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(16 * 1024) {
        socket
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        socket.write_all(chunk).await.unwrap();
        socket.write_all(b"\r\n").await.unwrap();
    }
    socket.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = answer.split_once("\r\n\r\n").expect("a whole answer");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.insert(
            axum::http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    // The answer is small: one chunk, or a Content-Length body.
    let text = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        rest.split_once("\r\n")
            .map(|(_, r)| r)
            .unwrap_or(rest)
            .split("\r\n")
            .next()
            .unwrap_or_default()
    } else {
        rest
    };
    (
        status,
        headers,
        serde_json::from_str(text).unwrap_or(Value::String(text.to_owned())),
    )
}

/// However low the byte rate, the burst is at least the body limit: an event of the largest
/// size the gateway accepts passes alone; the next publish waits for the allowance.
#[tokio::test]
async fn an_event_of_the_largest_body_size_always_fits_the_publish_burst() {
    let max_body = 128 * 1024;
    // 1 byte a second: the burst is the body limit, not a second's worth.
    let h = byte_limited(1, max_body).await;
    let key = h.key(&[], &[ORDERS]).await;
    let (status, _, body) = post_event(&h, &key, event_of(max_body)).await;
    assert_eq!(status, 202, "a max-size event: {body}");
    let (status, headers, body) = post_event(&h, &key, event_of(1_000)).await;
    assert_over_byte_rate(status, &headers, &body, 1, 900);
    // Another key has its whole burst.
    let other = h.key(&[], &[ORDERS]).await;
    let (status, _, body) = post_event(&h, &other, event_of(max_body)).await;
    assert_eq!(status, 202, "{body}");
}
