//! The HTTP API: authentication, the key × endpoint × type matrix, publishing, event types,
//! keys, streams.

mod support;

use axum::http::StatusCode;
use chrono::Utc;
use serde_json::{Value, json};
use support::*;

const EXTERNAL: &str = "afterOrderCreate";
const EXTERNAL_OTHER: &str = "afterProductUpdate";
const INTERNAL: &str = "afterCartUpdate";

fn product() -> Value {
    json!({"productId": "p1", "product": {"_id": "p1", "shopId": "s", "title": "T", "isVisible": true,
        "variants": [{"_id": "v", "price": 1, "costPrice": 0.5}]}})
}

fn payload(ty: &str) -> Value {
    match ty {
        EXTERNAL => order_created(),
        EXTERNAL_OTHER => product(),
        _ => cart_updated(),
    }
}

#[tokio::test]
async fn missing_unknown_malformed_expired_and_revoked_keys_get_401_everywhere() {
    let h = Harness::memory().await;
    let spec = evbus_gateway::KeySpec::new("old")
        .subscribe(["*"])
        .publish(["*"])
        .sources(["*"])
        .admin(true)
        .expires_at(Some(Utc::now() - chrono::Duration::seconds(1)));
    let (expired_rec, expired) = evbus_gateway::create_key(h.store.as_ref(), spec)
        .await
        .unwrap();
    let revoked = h.key(&["*"], &["*"]).await;
    let revoked_id = evbus_gateway::keys::parse(&revoked).unwrap().0.to_owned();
    let (s, _) = h
        .call(
            "DELETE",
            &format!("/v1/keys/{revoked_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let unknown = format!("evb_{}_{}", "0".repeat(16), "1".repeat(64));
    let (id, wrong_secret) = (expired_rec.id.clone(), "2".repeat(64));
    let forged = format!("evb_{id}_{wrong_secret}");
    let endpoints = [
        ("POST", "/v1/events"),
        ("GET", "/v1/event-types"),
        ("GET", "/v1/me"),
        ("GET", "/v1/stream"),
        ("POST", "/v1/webhooks"),
        ("GET", "/v1/webhooks"),
        ("GET", "/v1/webhooks/wh_x"),
        ("DELETE", "/v1/webhooks/wh_x"),
        ("POST", "/v1/webhooks/wh_x/rotate-secret"),
        ("GET", "/v1/webhooks/wh_x/attempts"),
        ("POST", "/v1/webhooks/wh_x/replay"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("DELETE", "/v1/keys/x"),
        ("GET", "/metrics"),
    ];
    for key in [
        None,
        Some("garbage"),
        Some(unknown.as_str()),
        Some(forged.as_str()),
        Some(expired.as_str()),
        Some(revoked.as_str()),
    ] {
        for (method, path) in endpoints {
            let resp = {
                let mut r = h.http.request(method.parse().unwrap(), h.url(path));
                if let Some(k) = key {
                    r = r.bearer_auth(k);
                }
                r.send().await.unwrap()
            };
            assert_eq!(resp.status().as_u16(), 401, "{method} {path} with {key:?}");
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
    }
}

/// `GET /v1/event-types` as (type, may subscribe, may publish).
fn what_each_type_allows(list: &Value) -> Vec<(&str, bool, bool)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["type"].as_str().unwrap(),
                t["subscribe"].as_bool().unwrap(),
                t["publish"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_endpoint_enforces_scopes_for_every_key_and_type() {
    let h = Harness::memory().await;
    let receiver = Receiver::start(200).await;
    // (name, key, subscribe patterns, publish patterns, admin)
    let keys = vec![
        ("nothing", h.key(&[], &[]).await, vec![], vec![], false),
        (
            "orders-sub",
            h.key(&["afterOrder*"], &[]).await,
            vec!["afterOrder*"],
            vec![],
            false,
        ),
        (
            "orders-pub",
            h.key(&[], &[EXTERNAL]).await,
            vec![],
            vec![EXTERNAL],
            false,
        ),
        (
            "everything",
            h.key(&["*"], &["*"]).await,
            vec!["*"],
            vec!["*"],
            false,
        ),
        (
            "internal-by-name",
            h.key(&[INTERNAL], &[INTERNAL]).await,
            vec![INTERNAL],
            vec![INTERNAL],
            false,
        ),
        ("admin", h.admin.clone(), vec![], vec![], true),
    ];
    let matches = |pats: &Vec<&str>, ty: &str| {
        pats.iter()
            .any(|p| evbus_gateway::keys::pattern_matches(p, ty))
    };
    let external = |ty: &str| ty != INTERNAL;
    for (name, key, sub, publ, admin) in &keys {
        for ty in [EXTERNAL, EXTERNAL_OTHER, INTERNAL] {
            let may_sub = external(ty) && matches(sub, ty);
            let may_pub = external(ty) && matches(publ, ty);
            let (s, body) = h.publish(key, ty, payload(ty)).await;
            assert_eq!(
                s,
                if may_pub {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::FORBIDDEN
                },
                "{name} publish {ty}: {body}"
            );
            let resp = h
                .http
                .get(h.url(&format!("/v1/stream?types={ty}")))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status().as_u16(),
                if may_sub { 200 } else { 403 },
                "{name} stream {ty}"
            );
            drop(resp);
            let (s, body) = h
                .call(
                    "POST",
                    "/v1/webhooks",
                    Some(key),
                    Some(json!({"url": receiver.url(), "event_types": [ty]})),
                )
                .await;
            assert_eq!(
                s,
                if may_sub {
                    StatusCode::CREATED
                } else {
                    StatusCode::FORBIDDEN
                },
                "{name} webhook {ty}: {body}"
            );
        }
        let (s, listed) = h.call("GET", "/v1/event-types", Some(key), None).await;
        assert_eq!(s, StatusCode::OK);
        // Every external type the key may subscribe to or publish, saying which.
        let listed = what_each_type_allows(&listed);
        let mut expected: Vec<(&str, bool, bool)> = [EXTERNAL, "afterOrderUpdate", EXTERNAL_OTHER]
            .into_iter()
            .map(|t| (t, matches(sub, t), matches(publ, t)))
            .filter(|(_, s, p)| *s || *p)
            .collect();
        expected.sort();
        assert_eq!(listed, expected, "{name} event types");
        for (method, path, body) in [
            ("GET", "/v1/keys", None),
            ("POST", "/v1/keys", Some(json!({"name": "x"}))),
            ("GET", "/metrics", None),
            ("DELETE", "/v1/keys/0000000000000000", None),
        ] {
            let (s, _) = h.call(method, path, Some(key), body).await;
            let ok = matches!(
                s,
                StatusCode::OK | StatusCode::CREATED | StatusCode::NOT_FOUND
            );
            assert_eq!(ok, *admin, "{name} {method} {path}: {s}");
            if !admin {
                assert_eq!(s, StatusCode::FORBIDDEN);
            }
        }
    }
}

#[tokio::test]
async fn webhooks_belong_to_the_key_that_registered_them() {
    let h = Harness::memory().await;
    let receiver = Receiver::start(200).await;
    let alice = h.key(&["*"], &[]).await;
    let bob = h.key(&["*"], &[]).await;
    let (id, _) = h.register(&alice, &receiver.url(), &[EXTERNAL]).await;
    for (method, path) in [
        ("GET", format!("/v1/webhooks/{id}")),
        ("DELETE", format!("/v1/webhooks/{id}")),
        ("POST", format!("/v1/webhooks/{id}/rotate-secret")),
        ("GET", format!("/v1/webhooks/{id}/attempts")),
    ] {
        let (s, _) = h.call(method, &path, Some(&bob), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (_, list) = h.call("GET", "/v1/webhooks", Some(&bob), None).await;
    assert_eq!(list, json!([]));
    let (s, one) = h
        .call("GET", &format!("/v1/webhooks/{id}"), Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        one.get("secret").is_none(),
        "the secret is shown only at creation"
    );
    let (s, _) = h
        .call("DELETE", &format!("/v1/webhooks/{id}"), Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn keys_are_stored_only_as_hashes_and_listed_without_secrets() {
    let h = Harness::memory().await;
    let (s, created) = h.call("POST", "/v1/keys", Some(&h.admin), Some(json!({"name": "crm", "subscribe": ["afterOrder*"], "publish": [], "admin": false, "expires_at": "2099-01-01T00:00:00Z"}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("evb_"));
    let (_, secret) = evbus_gateway::keys::parse(&key).unwrap();
    assert_eq!(secret.len(), 64, "256 bits of secret");
    let (s, list) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let text = list.to_string();
    assert!(!text.contains(secret) && !text.contains(&h.admin[21..]));
    let crm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "crm")
        .unwrap();
    for field in [
        "id",
        "name",
        "prefix",
        "subscribe",
        "publish",
        "admin",
        "created_at",
        "expires_at",
    ] {
        assert!(crm.get(field).is_some(), "{field}");
    }
    assert_eq!(
        crm["prefix"],
        format!("evb_{}", crm["id"].as_str().unwrap())
    );
    // The creation's answer and a later read show one creation time (milliseconds, as kept).
    assert_eq!(crm["created_at"], created["created_at"]);
    // A dump of the database holds no key, not even the secret half.
    let mut dump = Vec::new();
    for entry in std::fs::read_dir(h.dir.path()).unwrap() {
        dump.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let dump = String::from_utf8_lossy(&dump);
    assert!(!dump.contains(secret) && !dump.contains(&h.admin[21..]));
}

/// A second rotation while the previous secret still signs would stop that secret before
/// the time the first rotation promised: refused with 409 unless asked for outright.
#[tokio::test]
async fn a_second_rotation_during_the_overlap_is_refused_unless_it_retires_the_previous_secret() {
    let h = Harness::memory().await;
    let key = h.key(&[EXTERNAL], &[]).await;
    let receiver = Receiver::start(200).await;
    let (id, first) = h.register(&key, &receiver.url(), &[EXTERNAL]).await;
    let path = format!("/v1/webhooks/{id}/rotate-secret");
    let (s, rotated) = h.call("POST", &path, Some(&key), None).await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let promised = rotated["previous_secret_expires_at"].clone();
    let (s, refused) = h.call("POST", &path, Some(&key), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["previous_secret_until"], promised);
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("retire_previous")
    );
    let (s, _) = h
        .call(
            "POST",
            &format!("{path}?retire_previous=maybe"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // The refused rotation changed nothing: the first secret still signs.
    let (_, list) = h.call("GET", "/v1/webhooks", Some(&key), None).await;
    assert!(!list.to_string().contains(&first), "secrets are not listed");
    let (s, forced) = h
        .call(
            "POST",
            &format!("{path}?retire_previous=true"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{forced}");
    assert_ne!(forced["secret"], rotated["secret"]);
}

/// A scope pattern that matches no external type (a misspelling, an internal type) is most
/// likely a mistake: the key is made, and the answer says which patterns give it nothing.
#[tokio::test]
async fn a_scope_that_matches_no_external_type_is_reported_when_the_key_is_made() {
    let h = Harness::memory().await;
    let body = json!({"name": "typo", "subscribe": ["afterOrder*", "afterOdrer*"], "publish": ["afterProductUpdate", "zzz*"], "sources": ["*"]});
    let (s, created) = h.call("POST", "/v1/keys", Some(&h.admin), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let warnings: Vec<&str> = created["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("subscribe scope `afterOdrer*` matches none"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("publish scope `zzz*` matches none"),
        "{warnings:?}"
    );
    // The key was made with every pattern as given.
    assert_eq!(created["subscribe"], json!(["afterOrder*", "afterOdrer*"]));
    let (s, fine) = h
        .call(
            "POST",
            "/v1/keys",
            Some(&h.admin),
            Some(json!({"name": "fine", "subscribe": ["*"], "publish": ["afterOrderCreate"], "sources": ["/crm"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(fine["warnings"], json!([]));
}

#[tokio::test]
async fn revocation_is_effective_immediately_even_on_an_open_stream() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    let id = evbus_gateway::keys::parse(&key).unwrap().0.to_owned();
    let mut stream = h
        .http
        .get(h.url("/v1/stream"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let (s, _) = h
        .call("DELETE", &format!("/v1/keys/{id}"), Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The open stream ends.
    let end = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream of a revoked key must end");
}

#[tokio::test]
async fn publishing_accepts_structured_and_binary_mode_and_validates() {
    let h = Harness::memory().await;
    let key = h.key(&[], &["afterOrder*"]).await;
    let (s, body) = h.publish(&key, EXTERNAL, order_created()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(body["id"].as_str().is_some());
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-1")
        .header("ce-source", "/ext")
        .header("ce-type", EXTERNAL)
        .header("content-type", "application/json")
        .body(order_created().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let mut bad = order_created();
    bad["order"]["email"] = json!("not-an-email-SECRETVALUE");
    let (s, problem) = h.publish(&key, EXTERNAL, bad).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["violations"][0]["pointer"], "/order/email");
    assert!(!problem.to_string().contains("SECRETVALUE"), "{problem}");
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents+json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // Said to be no JSON at all, where: not "an attribute is missing or malformed".
    let problem: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("is not valid JSON") && detail.contains("line 1"),
        "{detail}"
    );
    // A body of the wrong shape names the fields expected (names from the schema), and
    // quotes nothing of the request.
    let (s, problem) = h
        .call(
            "POST",
            "/v1/webhooks",
            Some(&key),
            Some(json!({"eventTypesSECRET": [EXTERNAL]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("expected one of `url`") && !detail.contains("SECRET"),
        "{detail}"
    );
    let (s, problem) = h
        .call(
            "POST",
            "/v1/webhooks",
            Some(&key),
            Some(json!({"url": "http://x"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("lacks the field `event_types`"), "{detail}");
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_with_a_problem() {
    let mut config = test_config();
    config.max_body_bytes = 1024;
    let h = Harness::with(
        std::sync::Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let key = h.key(&[], &["*"]).await;
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents+json")
        .body("x".repeat(4096))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn the_per_key_rate_limit_answers_429_with_retry_after() {
    let mut config = test_config();
    config.rate_limit_per_second = 1;
    config.rate_limit_burst = 3;
    let h = Harness::with(
        std::sync::Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let key = h.key(&["*"], &[]).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let resp = h
            .http
            .get(h.url("/v1/event-types"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status().as_u16() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert!(statuses.contains(&429), "{statuses:?}");
    // Another key is not affected.
    let (s, _) = h.call("GET", "/v1/event-types", Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn event_types_list_curated_schemas() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    let (_, list) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    let order = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == EXTERNAL)
        .unwrap();
    let props = &order["schema"]["properties"]["order"]["properties"];
    assert!(props.get("_id").is_some());
    assert!(
        props.get("email").is_none(),
        "redacted property listed: {props}"
    );
    assert!(
        props["shippingAddress"]["properties"]
            .get("phone")
            .is_none()
    );
    assert!(
        !order["schema"]["properties"]["order"]["required"]
            .as_array()
            .unwrap()
            .contains(&json!("email"))
    );
    let product = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == EXTERNAL_OTHER)
        .unwrap();
    let props = &product["schema"]["properties"]["product"]["properties"];
    assert!(
        props.get("variants").is_none() && props.get("title").is_some(),
        "{props}"
    );
    assert!(!list.to_string().contains(INTERNAL));
    // What the portal shows as an example is valid against the schema shown with it (a
    // `pattern` like `^[A-Z]{3}$` included): an integrator may copy it into a publish.
    for t in list.as_array().unwrap() {
        let validator = jsonschema::validator_for(&t["schema"]).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&t["example"])
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", t["type"]);
    }
    assert_eq!(order["subscribe"], true);
    assert_eq!(order["publish"], false);
}

/// A producer's key sees the types it may publish, with their schemas: what it must send.
/// Each entry says what the key may do with the type; internal types stay invisible.
#[tokio::test]
async fn event_types_list_what_a_key_may_publish_too() {
    let h = Harness::memory().await;
    let producer = h.key(&[], &["afterOrder*"]).await;
    let (s, list) = h
        .call("GET", "/v1/event-types", Some(&producer), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let listed = what_each_type_allows(&list);
    // afterOrderCancel matches the pattern but is internal.
    assert_eq!(
        listed,
        [
            ("afterOrderCreate", false, true),
            ("afterOrderUpdate", false, true)
        ]
    );
    let both = h.key(&[EXTERNAL_OTHER], &[EXTERNAL]).await;
    let (_, list) = h.call("GET", "/v1/event-types", Some(&both), None).await;
    let types: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, [EXTERNAL, EXTERNAL_OTHER]);
    // A stream without `types` still means the types the key may subscribe to: a
    // publish-only key has none.
    let (s, _) = h.call("GET", "/v1/stream", Some(&producer), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An empty list is a malformed request, not a question of scope.
    for empty in ["", ",", " , "] {
        let path = format!("/v1/stream?types={empty}");
        let (s, _) = h.call("GET", &path, Some(&both), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}");
    }
}

#[tokio::test]
async fn health_and_openapi_are_public() {
    let h = Harness::memory().await;
    let (s, body) = h.call("GET", "/healthz", None, None).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"status": "ok"})));
    let (s, doc) = h.call("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/v1/events",
        "/v1/event-types",
        "/v1/stream",
        "/v1/webhooks",
        "/v1/webhooks/{id}/replay",
        "/v1/keys",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    let (s, problem) = h.call("GET", "/nope", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(problem["status"], 404);
    // A browser opened on the gateway's address lands on the portal, not on a 404.
    let resp = h.http.get(h.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.url().path(), "/portal");
}

async fn read_frames(resp: &mut reqwest::Response, n: usize) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        while out.len() < n {
            let chunk = resp.chunk().await.unwrap().expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let mut id = String::new();
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    }
                    if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    out.push((id, serde_json::from_str(&data).unwrap()));
                }
            }
        }
    })
    .await
    .expect("frames in time");
    out
}

#[tokio::test]
async fn the_stream_sends_curated_events_and_resumes_after_last_event_id() {
    let h = Harness::memory().await;
    let key = h.key(&[EXTERNAL], &[]).await;
    let mut first = h
        .http
        .get(h.url(&format!("/v1/stream?types={EXTERNAL}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    for i in 0..3 {
        let mut data = order_created();
        data["createdBy"] = json!(format!("user-{i}"));
        h.bus.emit(EXTERNAL, data).await.unwrap();
        h.bus
            .emit(INTERNAL, json!({"cart": {}, "updatedBy": "x"}))
            .await
            .ok();
    }
    let frames = read_frames(&mut first, 3).await;
    let mut creators: Vec<String> = frames
        .iter()
        .map(|(_, e)| e["data"]["createdBy"].as_str().unwrap().to_owned())
        .collect();
    creators.sort();
    assert_eq!(creators, ["user-0", "user-1", "user-2"]);
    for (_, event) in &frames {
        assert_eq!(event["type"], EXTERNAL);
        assert!(event["data"]["order"].get("email").is_none());
        assert!(!event.to_string().contains(EMAIL) && !event.to_string().contains(PHONE));
    }
    drop(first);
    // Reconnect after the first frame: the next two come again, nothing else.
    let mut again = h
        .http
        .get(h.url(&format!("/v1/stream?types={EXTERNAL}")))
        .bearer_auth(&key)
        .header("last-event-id", &frames[0].0)
        .send()
        .await
        .unwrap();
    let resumed = read_frames(&mut again, 2).await;
    assert_eq!(resumed[0].0, frames[1].0);
    assert_eq!(resumed[1].0, frames[2].0);
}

/// The first frame of a stream: an `id` without data (the position the stream starts from).
async fn position_frame(resp: &mut reqwest::Response) -> String {
    let mut buf = String::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let frame = &buf[..end];
                assert!(
                    !frame.contains("data:"),
                    "the first frame carries data: {frame}"
                );
                let id = frame
                    .lines()
                    .find_map(|l| l.strip_prefix("id:"))
                    .unwrap_or_else(|| panic!("the first frame has no id: {frame}"));
                return id.trim().to_owned();
            }
            let chunk = resp.chunk().await.unwrap().expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the position frame in time")
}

/// A stream opened without `Last-Event-ID` starts from now; one that drops before its first
/// event resumes from where it started, with the events logged while it was away.
#[tokio::test]
async fn a_stream_that_drops_before_its_first_event_resumes_from_its_start() {
    let h = Harness::memory().await;
    let key = h.key(&[EXTERNAL], &[]).await;
    let url = h.url(&format!("/v1/stream?types={EXTERNAL}"));
    let mut first = h.http.get(&url).bearer_auth(&key).send().await.unwrap();
    let start = position_frame(&mut first).await;
    drop(first);
    for i in 0..2 {
        let mut data = order_created();
        data["createdBy"] = json!(format!("away-{i}"));
        h.bus.emit(EXTERNAL, data).await.unwrap();
    }
    let mut again = h
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("last-event-id", &start)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let resumed = read_frames(&mut again, 2).await;
    let mut creators: Vec<&str> = resumed
        .iter()
        .map(|(_, e)| e["data"]["createdBy"].as_str().unwrap())
        .collect();
    creators.sort_unstable();
    assert_eq!(creators, ["away-0", "away-1"]);
}

/// A stream behind a log of large events reads it in pages bounded by bytes (a client that
/// does not read holds one such page, not 100 large events), and a page cut short by its
/// byte bound is not taken for the end of the log: every event comes, in order.
#[tokio::test]
async fn a_stream_behind_large_events_reads_them_all_in_byte_bounded_pages() {
    use evbus_gateway::store::Store;
    let h = Harness::memory().await;
    let key = h.key(&[EXTERNAL], &[]).await;
    let url = h.url(&format!("/v1/stream?types={EXTERNAL}"));
    let mut first = h.http.get(&url).bearer_auth(&key).send().await.unwrap();
    let start = position_frame(&mut first).await;
    drop(first);
    let before = h.store.latest_seq().await.unwrap();
    // About 100 KB each: a page of 256 KiB holds three.
    let n = 7;
    for i in 0..n {
        let mut data = order_created();
        data["createdBy"] = json!(format!("big-{i}-{}", "x".repeat(100_000)));
        h.bus.emit(EXTERNAL, data).await.unwrap();
    }
    // All logged before the stream resumes, so it reads them from the store.
    tokio::time::timeout(WAIT, async {
        while h.store.latest_seq().await.unwrap() < before + n {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the events logged in time");
    let mut again = h
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("last-event-id", &start)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let frames = read_frames(&mut again, n as usize).await;
    let creators: Vec<String> = frames
        .iter()
        .map(|(_, e)| e["data"]["createdBy"].as_str().unwrap()[..6].to_owned())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("big-{i}-")).collect();
    assert_eq!(creators, expected);
}

/// The last active admin key cannot be revoked (nobody could administer the gateway over
/// HTTP any more); once another admin key exists, it can.
#[tokio::test]
async fn the_last_active_admin_key_cannot_be_revoked() {
    let h = Harness::memory().await;
    let admin_id = evbus_gateway::keys::parse(&h.admin).unwrap().0.to_owned();
    let (s, body) = h
        .call(
            "DELETE",
            &format!("/v1/keys/{admin_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, _) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK, "the admin key still works");

    let (s, created) = h
        .call(
            "POST",
            "/v1/keys",
            Some(&h.admin),
            Some(json!({"name": "second admin", "admin": true})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let (s, body) = h
        .call(
            "DELETE",
            &format!("/v1/keys/{admin_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let second = created["key"].as_str().unwrap();
    let (s, _) = h.call("GET", "/v1/keys", Some(second), None).await;
    assert_eq!(s, StatusCode::OK);
}
