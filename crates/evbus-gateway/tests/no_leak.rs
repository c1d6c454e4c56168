//! Property: no redacted value appears in any outbound byte — webhook bodies and headers,
//! stream frames, error bodies and logs — over random payloads.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use support::*;

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_redacted_value_appears_in_any_outbound_byte() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (h, receiver, key, stream) = rt.block_on(async {
        let h = Harness::memory().await;
        let receiver = Receiver::start(200).await;
        let key = h.key(&["*"], &["*"]).await;
        h.register(
            &key,
            &receiver.url(),
            &["afterOrderCreate", "afterProductUpdate"],
        )
        .await;
        let stream = h
            .http
            .get(h.url("/v1/stream?types=afterOrderCreate,afterProductUpdate"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status().as_u16(), 200);
        (h, receiver, key, stream)
    });
    let receiver = tokio::sync::Mutex::new(receiver);
    let stream = tokio::sync::Mutex::new((stream, String::new()));
    let outbound = Mutex::new(String::new());

    let strategy = (
        "[a-z]{14,20}",
        "[A-Z0-9]{14,20}",
        "[a-z]{14,20}",
        -1000i64..1000,
        proptest::bool::ANY,
    );
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    runner
        .run(&strategy, |(local, phone, cost, price, visible)| {
            let email = format!("{local}@example.com");
            let phone = format!("P{phone}");
            let cost_note = format!("C{cost}");
            let secrets = [email.clone(), phone.clone(), cost_note.clone()];
            rt.block_on(async {
                let mut order = order_created();
                order["order"]["email"] = json!(email);
                order["order"]["shippingAddress"]["phone"] = json!(phone);
                order["order"]["totals"]["total"] = json!(price.abs());
                let product = json!({"productId": "p1", "product": {"_id": "p1", "shopId": "s", "title": "T", "isVisible": visible,
                    "description": cost_note, "variants": [{"_id": "v", "price": 1, "costPrice": price.abs()}]}});
                // Through the bus and through POST /v1/events.
                let id1 = h.bus.emit("afterOrderCreate", order.clone()).await.unwrap();
                let (s, posted) = h.publish(&key, "afterProductUpdate", product.clone()).await;
                assert_eq!(s.as_u16(), 202);
                let id2 = posted["id"].as_str().unwrap().to_owned();
                // Error bodies: invalid payloads carrying the values.
                let mut bad = order.clone();
                bad["order"]["email"] = json!(format!("not an email {email}"));
                bad["order"]["status"] = json!(phone);
                let (_, problem) = h.publish(&key, "afterOrderCreate", bad).await;
                outbound.lock().unwrap().push_str(&problem.to_string());
                let (_, problem) = h.call("POST", "/v1/webhooks", Some(&key), Some(json!({"url": format!("http://{email}/"), "event_types": [phone]}))).await;
                outbound.lock().unwrap().push_str(&problem.to_string());
                // Webhook bodies and headers.
                let mut rx = receiver.lock().await;
                let mut got = Vec::new();
                while got.len() < 2 {
                    let r = rx.next().await;
                    got.push(r.id().to_owned());
                    let mut out = outbound.lock().unwrap();
                    out.push_str(&r.body);
                    for (k, v) in &r.headers {
                        out.push_str(k.as_str());
                        out.push_str(v.to_str().unwrap_or(""));
                    }
                }
                assert!(got.contains(&id1) && got.contains(&id2));
                // Stream frames.
                let mut guard = stream.lock().await;
                let (resp, buf) = &mut *guard;
                tokio::time::timeout(WAIT, async {
                    while !(buf.contains(&id1) && buf.contains(&id2)) {
                        let chunk = resp.chunk().await.unwrap().unwrap();
                        buf.push_str(&String::from_utf8_lossy(&chunk));
                    }
                })
                .await
                .expect("frames in time");
                outbound.lock().unwrap().push_str(buf);
            });
            let out = outbound.lock().unwrap();
            let log = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
            for secret in &secrets {
                prop_assert!(!out.contains(secret.as_str()), "{secret} left in an HTTP body or header");
                prop_assert!(!log.contains(secret.as_str()), "{secret} left in the log");
            }
            // The allow-list kept what it allows.
            prop_assert!(out.contains("\"isVisible\""));
            Ok(())
        })
        .unwrap();
    let data: Value = json!(logs.0.lock().unwrap().len());
    assert!(data.as_u64().unwrap() > 0, "the log was captured");
}
