//! `evbus serve` with no `--transport` is durable: its bus is `sqlite://<data-dir>/bus.db`.
//! The process is SIGKILLed with webhook deliveries pending (their endpoint is down) and with
//! events on the bus that it has not consumed yet (emitted into the bus file by `evbus emit`
//! while it was down), restarted on the same data directory, and delivers every one of them.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};

const ORDERS: &str = "afterOrderCreate";
const WAIT: Duration = Duration::from_secs(30);
/// Events posted while the webhook endpoint is down.
const POSTED: usize = 5;
/// Events emitted into the bus file while the gateway is down.
const EMITTED: usize = 3;

fn order(created_by: &str) -> Value {
    json!({
        "createdBy": created_by,
        "order": {
            "_id": "ord_1", "referenceId": "R-10023", "shopId": "shop-1", "accountId": null,
            "email": "ada@example.com", "status": "new", "currencyCode": "EUR",
            "items": [{"productId": "p1", "variantId": "v1", "quantity": 1, "price": 10}],
            "shippingAddress": {"fullName": "Ada", "address1": "1 rue", "city": "Paris",
                "postal": "75001", "country": "FR", "phone": "+33 1 00 00 00 00"},
            "totals": {"subtotal": 10, "total": 10}, "createdAt": "2026-11-27T10:15:00Z"
        }
    })
}

/// `evbus serve` with every default but the port, and webhooks allowed to reach loopback.
fn serve(root: &Path) -> support::Served {
    support::serve(
        root,
        &["--listen", "127.0.0.1:0", "--webhook-allow", "127.0.0.0/8"],
        WAIT,
    )
}

/// `evbus emit` of one order straight into the bus file.
fn emit(root: &Path, bus: &str, created_by: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(["emit", "--transport", bus, "--schemas", "examples/schemas"])
        .args(["--type", ORDERS, "--data", &order(created_by).to_string()])
        .current_dir(root)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_keeps_undelivered_events_and_webhook_deliveries_across_a_sigkill() {
    let root = support::temp_dir("serve-restart");
    support::copy_dir(&support::schemas(), &root.join("examples/schemas"));
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args([
            "keys",
            "create",
            "--data-dir",
            "./.evbus",
            "--name",
            "admin",
            "--admin",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::text(&out.stderr));
    let admin = support::text(&out.stdout).trim().to_owned();
    let http = reqwest::Client::new();

    // The webhook endpoint: a port nobody listens on yet (connections refused).
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let hook = format!("http://127.0.0.1:{port}/hook");

    let served = serve(&root);
    let bus_file = std::fs::canonicalize(root.join(".evbus"))
        .unwrap()
        .join("bus.db");
    let bus = format!("sqlite://{}", bus_file.display());
    assert!(
        served.banner.contains(&format!("(transport {bus},")),
        "serve's default transport is the data directory's bus.db: {}",
        served.banner
    );

    // One process per bus file: while serve runs, another process is refused, clearly.
    let refused = emit(&root, &bus, "intruder");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = support::text(&refused.stderr);
    assert!(
        stderr.contains("is already open in process") && stderr.contains("one process"),
        "{stderr}"
    );

    let base = served.base.clone();
    // A key that may publish and subscribe to orders (the admin key manages, it does not
    // subscribe).
    let made = http
        .post(format!("{base}/v1/keys"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(json!({"name": "shop", "subscribe": [ORDERS], "publish": [ORDERS], "sources": ["/restart-test"]}).to_string())
        .send()
        .await
        .unwrap();
    let status = made.status().as_u16();
    let made = made.text().await.unwrap();
    assert_eq!(status, 201, "{made}");
    let made: Value = serde_json::from_str(&made).unwrap();
    let admin = made["key"].as_str().unwrap().to_owned();
    let created = http
        .post(format!("{base}/v1/webhooks"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(json!({"url": hook, "event_types": [ORDERS]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status().as_u16(),
        201,
        "{}",
        created.text().await.unwrap()
    );
    let webhook: Value = serde_json::from_str(&created.text().await.unwrap()).unwrap();
    let webhook = webhook["id"].as_str().unwrap().to_owned();

    let mut expected = HashSet::new();
    for n in 0..POSTED {
        let id = format!("restart-{n}-{}", uuid::Uuid::now_v7().simple());
        let event = json!({"specversion": "1.0", "id": id, "source": "/restart-test",
            "type": ORDERS, "datacontenttype": "application/json", "data": order("posted")});
        let resp = http
            .post(format!("{base}/v1/events"))
            .bearer_auth(&admin)
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            202,
            "{}",
            resp.text().await.unwrap()
        );
        expected.insert(id);
    }

    // Every posted event had its first (failed) delivery attempt: deliveries are pending.
    let deadline = Instant::now() + WAIT;
    loop {
        let attempts = http
            .get(format!("{base}/v1/webhooks/{webhook}/attempts"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let attempts: Value = serde_json::from_str(&attempts).unwrap();
        let tried: HashSet<&str> = attempts
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["event_id"].as_str())
            .collect();
        if expected.iter().all(|id| tried.contains(id.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every posted event had a delivery attempt within {WAIT:?}: {attempts}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGKILL: no shutdown, nothing flushed on the way out.
    let mut served = served;
    served.child.0.kill().unwrap();
    served.child.0.wait().unwrap();

    // While it is down, events reach its bus that it has never consumed.
    for n in 0..EMITTED {
        let out = emit(&root, &bus, &format!("emitted-{n}"));
        assert!(out.status.success(), "{}", support::text(&out.stderr));
        let id = support::text(&out.stdout).trim().to_owned();
        assert!(!id.is_empty());
        expected.insert(id);
    }

    // The endpoint comes up, then the gateway, on the same data directory.
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let restarted = serve(&root);

    let mut seen = HashSet::new();
    let within = Duration::from_secs(60);
    let result = timeout(within, async {
        while !expected.is_subset(&seen) {
            let body = received.recv().await.expect("the receiver runs");
            let event: Value = serde_json::from_str(&body).unwrap();
            seen.insert(event["id"].as_str().unwrap().to_owned());
        }
    })
    .await;
    let missing: Vec<&String> = expected.difference(&seen).collect();
    assert!(
        result.is_ok(),
        "after the restart, {} of {} events never reached the webhook within {within:?}: {missing:?}",
        missing.len(),
        expected.len()
    );
    drop(restarted);
    let _ = std::fs::remove_dir_all(root);
}
