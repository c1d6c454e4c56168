//! Per-key rate limits: a key's own limit (set at creation through `POST /v1/keys`), the
//! gateway's default for keys without one, what `GET /v1/keys` shows, and the values the
//! admin API refuses.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
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
}
