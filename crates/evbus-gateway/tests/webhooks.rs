//! Webhooks end to end with a real HTTP receiver that verifies Standard Webhooks signatures,
//! on the in-memory transport and on Redis.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use evbus::Transport;
use serde_json::json;
use support::*;

async fn emitted_and_posted_events_arrive_curated_and_signed(h: &Harness) {
    let mut receiver = Receiver::start(200).await;
    let key = h.key(&["afterOrder*"], &["afterOrderCreate"]).await;
    let (_, secret) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;

    let from_bus = h
        .bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    let (s, posted) = h.publish(&key, "afterOrderCreate", order_created()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let from_post = posted["id"].as_str().unwrap().to_owned();

    let mut seen = Vec::new();
    for _ in 0..2 {
        let got = receiver.next().await;
        assert!(got.verify(&secret), "signature must verify");
        assert_eq!(got.headers["content-type"], "application/cloudevents+json");
        assert!(
            !got.body.contains(EMAIL) && !got.body.contains(PHONE),
            "{}",
            got.body
        );
        let event = got.json();
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "afterOrderCreate");
        assert_eq!(event["id"], got.id());
        assert_eq!(event["data"]["order"]["_id"], "ord_1");
        assert!(event.get("traceparent").is_none(), "extensions stay inside");
        seen.push(got.id().to_owned());
    }
    seen.sort();
    let mut expected = vec![from_bus, from_post];
    expected.sort();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn memory_events_emitted_and_posted_arrive_curated_and_signed() {
    let h = Harness::memory().await;
    emitted_and_posted_events_arrive_curated_and_signed(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_events_emitted_and_posted_arrive_curated_and_signed() {
    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("evbus-gateway-test-{}:", uuid::Uuid::now_v7().simple());
    let mut registry = evbus::Registry::new();
    registry.register(evbus_redis::RedisConnector);
    let transport: Arc<dyn Transport> = registry
        .connect(&format!("{base}?prefix={prefix}"))
        .await
        .unwrap();
    let h = Harness::with(Arc::clone(&transport), test_config()).await;
    emitted_and_posted_events_arrive_curated_and_signed(&h).await;

    // And a failing receiver is retried on Redis too, until it recovers.
    let mut receiver = Receiver::start(500).await;
    let key = h.key(&["afterOrderUpdate"], &[]).await;
    let (_, secret) = h
        .register(&key, &receiver.url(), &["afterOrderUpdate"])
        .await;
    let mut data = order_created();
    data.as_object_mut().unwrap().remove("createdBy");
    data["updatedBy"] = json!("u");
    h.bus.emit("afterOrderUpdate", data).await.unwrap();
    let first = receiver.next().await;
    receiver.answer(200);
    let second = receiver.next().await;
    assert_eq!(first.id(), second.id());
    assert!(second.verify(&secret));

    h.gateway.shutdown().await;
    h.bus.shutdown(Duration::from_secs(5)).await.unwrap();
    cleanup_redis(&base, &prefix).await;
}

async fn cleanup_redis(base: &str, prefix: &str) {
    let client = redis::Client::open(base).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_the_same_webhook_id_until_it_recovers() {
    let h = Harness::memory().await;
    let mut receiver = Receiver::start(500).await;
    let key = h.key(&["*"], &[]).await;
    let (id, secret) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    let first = receiver.next().await;
    let second = receiver.next().await;
    assert_eq!(
        first.webhook_id(),
        second.webhook_id(),
        "same webhook-id on every retry"
    );
    receiver.answer(200);
    let third = receiver.next().await;
    assert_eq!(third.webhook_id(), first.webhook_id());
    assert!(third.verify(&secret));
    // The attempt log: status, latency, truncated response; newest first.
    eventually("three attempts logged", || async {
        let (_, a) = h
            .call(
                "GET",
                &format!("/v1/webhooks/{id}/attempts"),
                Some(&key),
                None,
            )
            .await;
        a.as_array()
            .is_some_and(|a| a.len() >= 3 && a[0]["status"] == 200)
    })
    .await;
    let (_, attempts) = h
        .call(
            "GET",
            &format!("/v1/webhooks/{id}/attempts"),
            Some(&key),
            None,
        )
        .await;
    let a = attempts.as_array().unwrap();
    assert_eq!(a[0]["attempt"], 3);
    assert_eq!(a[1]["status"], 500);
    assert_eq!(a[1]["response"], "receiver says hi");
    assert!(a[0]["latency_ms"].is_u64());
}

fn disabling_config() -> evbus_gateway::GatewayConfig {
    let mut config = test_config();
    config.disable_after = Duration::from_millis(150);
    config.retry_schedule = vec![Duration::ZERO; 1]
        .into_iter()
        .chain(std::iter::repeat_n(Duration::from_millis(100), 20))
        .collect();
    config
}

#[tokio::test]
async fn memory_an_endpoint_failing_long_enough_is_disabled_and_replay_re_sends() {
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        disabling_config(),
    )
    .await;
    failing_endpoint_is_disabled_and_replay_re_sends(&h).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_an_endpoint_failing_long_enough_is_disabled_and_replay_re_sends() {
    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("evbus-gateway-test-{}:", uuid::Uuid::now_v7().simple());
    let mut registry = evbus::Registry::new();
    registry.register(evbus_redis::RedisConnector);
    let transport: Arc<dyn Transport> = registry
        .connect(&format!("{base}?prefix={prefix}"))
        .await
        .unwrap();
    let h = Harness::with(transport, disabling_config()).await;
    failing_endpoint_is_disabled_and_replay_re_sends(&h).await;
    h.gateway.shutdown().await;
    h.bus.shutdown(Duration::from_secs(5)).await.unwrap();
    cleanup_redis(&base, &prefix).await;
}

async fn failing_endpoint_is_disabled_and_replay_re_sends(h: &Harness) {
    let mut receiver = Receiver::start(500).await;
    let key = h.key(&["*"], &[]).await;
    let (id, secret) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let event_id = h
        .bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    eventually("the endpoint is disabled", || async {
        let (_, w) = h
            .call("GET", &format!("/v1/webhooks/{id}"), Some(&key), None)
            .await;
        w["enabled"] == false
    })
    .await;
    let (_, w) = h
        .call("GET", &format!("/v1/webhooks/{id}"), Some(&key), None)
        .await;
    assert!(
        w["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("kept failing")
    );
    while receiver.rx.try_recv().is_ok() {}

    receiver.answer(200);
    let (s, r) = h
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/replay"),
            Some(&key),
            Some(json!({"since": before})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(r["replayed"], 1);
    let got = receiver.next().await;
    assert_eq!(got.id(), event_id);
    assert!(got.verify(&secret));
    let (_, w) = h
        .call("GET", &format!("/v1/webhooks/{id}"), Some(&key), None)
        .await;
    assert_eq!(w["enabled"], true);
}

#[tokio::test]
async fn gone_disables_at_once_and_retry_after_is_honoured() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    let mut gone = Receiver::start(410).await;
    let (gone_id, _) = h.register(&key, &gone.url(), &["afterOrderCreate"]).await;
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    gone.next().await;
    eventually("410 disables", || async {
        let (_, w) = h
            .call("GET", &format!("/v1/webhooks/{gone_id}"), Some(&key), None)
            .await;
        w["enabled"] == false && w["disabled_reason"].as_str().unwrap_or("").contains("410")
    })
    .await;

    // 429 with Retry-After: 1 s waits at least that long although the schedule says 100 ms.
    let limited_app = {
        let hits = Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
        let h2 = Arc::clone(&hits);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let hits = Arc::clone(&h2);
                async move {
                    let mut v = hits.lock().unwrap();
                    v.push(std::time::Instant::now());
                    if v.len() == 1 {
                        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
                    } else {
                        StatusCode::OK.into_response()
                    }
                }
            }),
        );
        (app, hits)
    };
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, limited_app.0).await });
    h.register(&key, &format!("http://{addr}/hook"), &["afterOrderUpdate"])
        .await;
    let mut data = order_created();
    data.as_object_mut().unwrap().remove("createdBy");
    data["updatedBy"] = json!("u");
    h.bus.emit("afterOrderUpdate", data).await.unwrap();
    let hits = limited_app.1;
    eventually("the retry after 429", || async {
        hits.lock().unwrap().len() >= 2
    })
    .await;
    let v = hits.lock().unwrap();
    assert!(
        v[1] - v[0] >= Duration::from_millis(950),
        "waited {:?}",
        v[1] - v[0]
    );
}

#[tokio::test]
async fn rotation_signs_with_old_and_new_secrets_during_the_overlap() {
    let h = Harness::memory().await;
    let mut receiver = Receiver::start(200).await;
    let key = h.key(&["*"], &[]).await;
    let (id, old) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let (s, rotated) = h
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/rotate-secret"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    let got = receiver.next().await;
    let header = got.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(
        header.split(' ').filter(|s| s.starts_with("v1,")).count(),
        2
    );
    assert!(got.verify(&old) && got.verify(&new));
}

/// The registration's answer and a later read show one creation time (milliseconds, as kept;
/// the answer had nanoseconds).
#[tokio::test]
async fn a_webhooks_creation_time_reads_back_as_it_was_answered() {
    let h = Harness::memory().await;
    let receiver = Receiver::start(200).await;
    let key = h.key(&["*"], &[]).await;
    let (s, created) = h
        .call(
            "POST",
            "/v1/webhooks",
            Some(&key),
            Some(json!({"url": receiver.url(), "event_types": ["afterOrderCreate"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let (s, read) = h
        .call("GET", &format!("/v1/webhooks/{id}"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(read["created_at"], created["created_at"]);
}

/// Rotations at once: one takes effect and the others are 409, so the first secret keeps
/// signing for the overlap it was promised (found by the TypeScript client's tests: 8 of 8
/// rotations at once were 200, and the original secret stopped signing at once).
#[tokio::test(flavor = "multi_thread")]
async fn of_rotations_at_once_one_takes_effect() {
    let h = Harness::memory().await;
    let mut receiver = Receiver::start(200).await;
    let key = h.key(&["*"], &[]).await;
    let (id, old) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let path = format!("/v1/webhooks/{id}/rotate-secret");
    let calls = (0..8).map(|_| h.call("POST", &path, Some(&key), None));
    let answers = futures::future::join_all(calls).await;
    let ok: Vec<&serde_json::Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(ok.len(), 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::CONFLICT),
        "{answers:?}"
    );
    let new = ok[0]["secret"].as_str().unwrap().to_owned();
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    let got = receiver.next().await;
    assert!(got.verify(&old), "the original secret still signs");
    assert!(got.verify(&new));
}

#[tokio::test]
async fn a_slow_endpoint_does_not_stall_others() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    // An endpoint that never answers in time.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let slow_app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }),
    );
    tokio::spawn(async move { axum::serve(slow, slow_app).await });
    h.register(
        &key,
        &format!("http://{slow_addr}/hook"),
        &["afterOrderCreate"],
    )
    .await;
    let mut fast = Receiver::start(200).await;
    h.register(&key, &fast.url(), &["afterOrderCreate"]).await;
    for _ in 0..10 {
        h.bus
            .emit("afterOrderCreate", order_created())
            .await
            .unwrap();
    }
    for _ in 0..10 {
        fast.next().await;
    }
}

#[tokio::test]
async fn ssrf_private_addresses_are_refused_at_registration_and_at_delivery() {
    // Without an allow-list, loopback is refused at registration.
    let mut config = test_config();
    config.outbound = evbus_gateway::OutboundPolicy::default();
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let key = h.key(&["*"], &[]).await;
    let receiver = Receiver::start(200).await;
    for url in [
        receiver.url(),
        format!("http://localhost:{}/hook", receiver.addr.port()),
        "http://169.254.169.254/latest".into(),
        "http://[::1]/x".into(),
        "http://10.0.0.1/".into(),
        "ftp://example.com/".into(),
    ] {
        let (s, problem) = h
            .call(
                "POST",
                "/v1/webhooks",
                Some(&key),
                Some(json!({"url": url, "event_types": ["afterOrderCreate"]})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {problem}");
    }

    // Registered while allowed, refused at delivery once the policy no longer allows it
    // (the same check as a DNS answer that changed to a private address).
    let h_allow = Harness::memory().await;
    let key = h_allow.key(&["*"], &[]).await;
    let (id, _) = h_allow
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let webhook = evbus_gateway::Store::get_webhook(h_allow.store.as_ref(), &id)
        .await
        .unwrap()
        .unwrap();
    // Move the same webhook into the strict gateway's store and deliver from there.
    evbus_gateway::Store::insert_webhook(
        h.store.as_ref(),
        &evbus_gateway::WebhookRecord {
            owner_key_id: evbus_gateway::keys::parse(&key)
                .map(|(i, _)| i.to_owned())
                .unwrap(),
            ..webhook
        },
    )
    .await
    .unwrap();
    let strict_key_owner = h.key(&["*"], &[]).await;
    let owner_id = evbus_gateway::keys::parse(&strict_key_owner)
        .unwrap()
        .0
        .to_owned();
    let mut w = evbus_gateway::Store::get_webhook(h.store.as_ref(), &id)
        .await
        .unwrap()
        .unwrap();
    w.owner_key_id = owner_id;
    evbus_gateway::Store::delete_webhook(h.store.as_ref(), &id)
        .await
        .unwrap();
    evbus_gateway::Store::insert_webhook(h.store.as_ref(), &w)
        .await
        .unwrap();
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    eventually("a refused attempt is logged", || async {
        let (_, a) = h
            .call(
                "GET",
                &format!("/v1/webhooks/{id}/attempts"),
                Some(&strict_key_owner),
                None,
            )
            .await;
        a.as_array().is_some_and(|a| {
            a.first()
                .is_some_and(|a| a["error"].as_str().unwrap_or("").starts_with("refused"))
        })
    })
    .await;
    let mut rx = receiver.rx;
    assert!(
        rx.try_recv().is_err(),
        "nothing reached the private address"
    );
}

#[tokio::test]
async fn a_webhook_allow_list_narrows_curation_end_to_end() {
    let h = Harness::memory().await;
    let key = h.key(&["afterOrderCreate"], &[]).await;
    let mut narrow = Receiver::start(200).await;
    let mut full = Receiver::start(200).await;
    // `/order/email` is redacted by the schema: naming it in a webhook's list cannot widen.
    let (status, created) = h
        .call(
            "POST",
            "/v1/webhooks",
            Some(&key),
            Some(json!({
                "url": narrow.url(),
                "event_types": ["afterOrderCreate"],
                "allow": ["/order/_id", "/order/status", "/order/email", "/order/items/0/quantity"],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let narrow_secret = created["secret"].as_str().unwrap().to_owned();
    let (_, full_secret) = h.register(&key, &full.url(), &["afterOrderCreate"]).await;

    let id = h
        .bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();

    let got = narrow.next().await;
    assert!(got.verify(&narrow_secret), "signature must verify");
    assert!(!got.verify(&full_secret));
    assert_eq!(got.id(), id);
    let event = got.json();
    assert_eq!(event["id"], id.as_str());
    assert_eq!(
        event["data"],
        json!({"order": {"_id": "ord_1", "status": "new", "items": [{"quantity": 1}]}}),
        "only the webhook's allowed fields, the redacted email still out"
    );
    for gone in [EMAIL, PHONE, "R-10023", "user-42", "shop-1", "Paris"] {
        assert!(!got.body.contains(gone), "{gone} in {}", got.body);
    }

    // The other endpoint of the same key gets the schema-curated payload, unnarrowed.
    let other = full.next().await;
    assert!(other.verify(&full_secret));
    let data = &other.json()["data"];
    assert_eq!(data["createdBy"], "user-42");
    assert_eq!(data["order"]["referenceId"], "R-10023");
    assert!(data["order"].get("email").is_none());
}

#[tokio::test]
async fn the_producer_id_and_source_are_kept_from_post_to_webhook_and_stream() {
    let h = Harness::memory().await;
    let key = h.key(&["afterOrderCreate"], &["afterOrderCreate"]).await;
    let key_id = evbus_gateway::keys::parse(&key).unwrap().0.to_owned();
    let mut receiver = Receiver::start(200).await;
    let (_, secret) = h
        .register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let mut stream = h
        .http
        .get(h.url("/v1/stream?types=afterOrderCreate"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    // An internal consumer on the broker side.
    let topic = h.bus.transport().topic("afterOrderCreate").await.unwrap();
    let mut probe = topic
        .subscribe(evbus::SubscribeOptions::named("probe"))
        .await
        .unwrap();

    let posted_id = "shop-42:order-created:0001";
    let (s, body) = h
        .publish_with_id(&key, posted_id, "afterOrderCreate", order_created())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["id"], posted_id, "202 answers the producer's id");

    // Inside: the producer's id and source, and the publishing key in `evbuskey`.
    let delivery = tokio::time::timeout(WAIT, probe.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let inside = delivery.event();
    assert_eq!(inside.id(), posted_id);
    assert_eq!(inside.source(), "/external");
    assert_eq!(inside.extension("evbuskey"), Some(key_id.as_str()));

    // The webhook: the posted id in the body, and the `webhook-id` header derived from it
    // and the source (`Received::id` checks that); extensions stay inside.
    let got = receiver.next().await;
    assert!(got.verify(&secret));
    assert_eq!(got.id(), posted_id);
    assert_eq!(
        got.webhook_id(),
        evbus_gateway::signing::message_id("/external", posted_id)
    );
    let event = got.json();
    assert_eq!(event["id"], posted_id);
    assert_eq!(event["source"], "/external");
    assert!(event.get("evbuskey").is_none(), "{event}");

    // The stream: same id.
    let buf = read_stream_until(&mut stream, |read| {
        read.contains("\n\n") && read.contains("data:")
    })
    .await;
    let data = buf
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .expect("a data line");
    let framed: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(framed["id"], posted_id);
    assert_eq!(framed["source"], "/external");
    assert!(framed.get("evbuskey").is_none());
}

/// A resolver whose answer changes, as DNS can: `host` resolves to a public-looking address
/// for its first `public` lookups, then to 127.0.0.1.
struct Rebinding {
    public: std::collections::HashMap<&'static str, usize>,
    calls: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

#[async_trait::async_trait]
impl evbus_gateway::HostResolver for Rebinding {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(host.to_owned()).or_default();
            *n += 1;
            *n
        };
        let public = self.public.get(host).copied().unwrap_or(0);
        let ip: std::net::IpAddr = if n <= public {
            "93.184.216.34".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        Ok(vec![std::net::SocketAddr::new(ip, port)])
    }
}

#[tokio::test]
async fn ssrf_a_name_rebound_to_loopback_after_registration_is_refused_at_delivery() {
    let resolver = Arc::new(Rebinding {
        // `hooks`: public at registration only, loopback at the delivery check.
        // `late`: public at registration and at the delivery check, loopback when the
        // delivery client resolves it to connect.
        public: [("hooks.example.test", 1), ("late.example.test", 2)].into(),
        calls: Default::default(),
    });
    let mut config = test_config();
    // No allow-list: 127.0.0.1 is not allowed.
    config.outbound = evbus_gateway::OutboundPolicy::default().with_resolver(resolver.clone());
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let key = h.key(&["*"], &[]).await;
    let mut receiver = Receiver::start(200).await;
    let port = receiver.addr.port();
    let (early, _) = h
        .register(
            &key,
            &format!("http://hooks.example.test:{port}/hook"),
            &["afterOrderCreate"],
        )
        .await;
    let (late, _) = h
        .register(
            &key,
            &format!("http://late.example.test:{port}/hook"),
            &["afterOrderCreate"],
        )
        .await;

    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();

    for id in [&early, &late] {
        eventually("a refused attempt is logged", || async {
            !evbus_gateway::Store::list_attempts(h.store.as_ref(), id, 10)
                .await
                .unwrap()
                .is_empty()
        })
        .await;
    }
    let early_attempt = evbus_gateway::Store::list_attempts(h.store.as_ref(), &early, 10)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let reason = early_attempt.error.clone().unwrap_or_default();
    assert_eq!(early_attempt.status, None);
    assert!(reason.starts_with("refused: "), "{reason}");
    // The host is named, the internal DNS answer is not (it stays in the server log).
    assert!(reason.contains("hooks.example.test"), "{reason}");
    assert!(!reason.contains("127.0.0.1"), "{reason}");
    assert!(reason.contains("address deliveries may go to"), "{reason}");
    // Rebound between the delivery check and the connection: the client's own resolver
    // refuses it too.
    let late_attempt = evbus_gateway::Store::list_attempts(h.store.as_ref(), &late, 10)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let reason = late_attempt.error.clone().unwrap_or_default();
    assert_eq!(late_attempt.status, None);
    assert!(
        !reason.contains("127.0.0.1") && reason.contains("address deliveries may go to"),
        "{reason}"
    );
    // Let any retry run too: nothing ever reaches the loopback receiver.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.rx.try_recv().is_err(),
        "nothing reached the loopback receiver"
    );
    assert!(
        resolver.calls.lock().unwrap()["late.example.test"] >= 3,
        "the client resolved through the injected resolver"
    );
}

#[tokio::test]
async fn a_receiver_hanging_past_the_outbound_timeout_is_logged_as_timed_out_and_retried() {
    let mut config = test_config();
    config.delivery_timeout = Duration::from_millis(300);
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let key = h.key(&["*"], &[]).await;
    // Hangs for 10 s on the first two requests, then answers at once.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let s = Arc::clone(&s);
            async move {
                let n = {
                    let mut seen = s.lock().unwrap();
                    seen.push(headers["webhook-id"].to_str().unwrap().to_owned());
                    seen.len()
                };
                if n <= 2 {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (id, _) = h
        .register(&key, &format!("http://{addr}/hook"), &["afterOrderCreate"])
        .await;
    let started = std::time::Instant::now();
    let event_id = h
        .bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();

    eventually("a successful attempt after the timeouts", || async {
        evbus_gateway::Store::list_attempts(h.store.as_ref(), &id, 10)
            .await
            .unwrap()
            .iter()
            .any(|a| a.status == Some(200))
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "attempts were cut at the timeout, not after the receiver's 10 s"
    );
    let mut attempts = evbus_gateway::Store::list_attempts(h.store.as_ref(), &id, 10)
        .await
        .unwrap();
    attempts.reverse();
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for a in &attempts[..2] {
        let error = a.error.as_deref().unwrap_or_default();
        assert!(error.starts_with("timed out"), "{error}");
        assert_eq!(a.status, None);
        assert!(
            (250..3_000).contains(&a.latency_ms),
            "cut at ~300 ms: {}",
            a.latency_ms
        );
        assert_eq!(a.event_id, event_id);
    }
    assert_eq!(attempts[2].status, Some(200));
    // Retried per the schedule (100 ms ± 10 % after the previous attempt ended).
    for pair in attempts.windows(2) {
        let ended = pair[0].at + chrono::Duration::milliseconds(pair[0].latency_ms as i64);
        let gap = pair[1].at - ended;
        assert!(gap >= chrono::Duration::milliseconds(80), "{gap:?}");
    }
    // One webhook-id on every attempt: the bus's source (`/test`) and the event id.
    let message_id = evbus_gateway::signing::message_id("/test", &event_id);
    assert_eq!(*seen.lock().unwrap(), vec![message_id; 3]);
}

/// A producer's `time` survives the gateway: the webhook delivery carries the time the
/// producer gave, not the moment the gateway received the event.
#[tokio::test]
async fn a_published_event_keeps_its_producers_time() {
    let h = Harness::memory().await;
    let mut receiver = Receiver::start(200).await;
    let key = h.key(&["afterOrderCreate"], &["afterOrderCreate"]).await;
    h.register(&key, &receiver.url(), &["afterOrderCreate"])
        .await;
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "timed-1", "source": "/erp", "type": "afterOrderCreate",
                "time": "2026-01-02T03:04:05Z", "data": order_created()})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let got = receiver.next().await.json();
    assert_eq!(got["time"], "2026-01-02T03:04:05Z", "{got}");
}

/// An owner who takes an event type off a webhook gets no more deliveries of that type, not
/// even the retries of one that was failing when the change was made.
#[tokio::test]
async fn a_type_taken_off_a_webhook_is_not_delivered_any_more_not_even_its_retries() {
    let h = holding_harness().await;
    let mut receiver = HeldReceiver::start().await;
    let key = h.key(&["*"], &[]).await;
    let (id, _) = h
        .register(
            &key,
            &receiver.url,
            &["afterOrderCreate", "afterProductUpdate"],
        )
        .await;
    h.bus
        .emit("afterOrderCreate", order_created())
        .await
        .unwrap();
    // The first attempt is in flight (it will fail) when the owner narrows the types.
    let first = receiver.next().await;
    let (status, patched) = h
        .call(
            "PATCH",
            &format!("/v1/webhooks/{id}"),
            Some(&key),
            Some(json!({"event_types": ["afterProductUpdate"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    receiver.open();
    let path = format!("/v1/webhooks/{id}/attempts");
    eventually("the retry is settled", || async {
        h.call("GET", &path, Some(&key), None)
            .await
            .1
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|a| a["attempt"] == 2))
    })
    .await;
    let (_, log) = h.call("GET", &path, Some(&key), None).await;
    let retry = &log[0];
    assert_eq!(retry["event_id"], first.id());
    assert_eq!(
        retry["status"],
        json!(null),
        "the retry of a type taken off the webhook must not be sent: {log}"
    );
    assert!(
        retry["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("not delivered")),
        "{log}"
    );
    // The attempt is logged after its response: a request made would be here already.
    assert!(
        receiver.arrived.try_recv().is_err(),
        "the receiver got the event again"
    );
}
