//! Fixes of the outside gateway review (`zz_review_gateway.md`): #5, a client that never
//! reads its responses is closed once a write has made no progress for the write-stall bound
//! (the header-read timeout), while a stream read slowly stays open; #4b, the `webhook-id` is
//! unique per event ((`source`, `id`)) and stable across retries and replays; #8, a webhook URL
//! is stored and listed as parsed (the URL deliveries go to).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use evbus_gateway::signing::message_id;
use evbus_gateway::{GatewayConfig, Store};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use support::*;

const ORDERS: &str = "afterOrderCreate";
/// The write-stall bound of these tests (the header-read timeout).
const BOUND: Duration = Duration::from_secs(1);

fn stall_config() -> GatewayConfig {
    let mut config = test_config();
    config.header_read_timeout = BOUND;
    config
}

/// A connection to `addr` with a small receive buffer, so the server's writes stall soon.
async fn small_window(addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// `n` pipelined `GET /v1/openapi.json`, the last one asking to close.
fn pipelined(n: usize) -> Vec<u8> {
    let mut requests = Vec::new();
    for i in 0..n {
        let close = if i + 1 == n {
            "connection: close\r\n"
        } else {
            ""
        };
        requests.extend_from_slice(
            format!("GET /v1/openapi.json HTTP/1.1\r\nhost: gateway\r\n{close}\r\n").as_bytes(),
        );
    }
    requests
}

async fn openapi_len(addr: &str) -> usize {
    reqwest::get(format!("http://{addr}/v1/openapi.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len()
}

/// Reads until the connection ends (EOF or reset): the bytes read, and whether it ended
/// within `bound`.
async fn read_to_end(socket: &mut TcpStream, bound: Duration) -> (usize, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let ended = timeout(bound, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .is_ok();
    (total, ended)
}

/// #5: a client pipelines many requests for a large document and never reads. Once the
/// server's write has been stuck for the bound, the connection is closed: reading afterwards
/// yields only what the kernel buffers held, then the end, not the remaining responses.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_after_the_write_stall_bound() {
    let served = served(stall_config()).await;
    let addr = served.addr.clone();
    let doc = openapi_len(&addr).await;
    assert!(doc > 10_000, "a large document: {doc} bytes");
    let n = 2_000;
    let mut socket = small_window(&addr).await;
    // The requests are small (about 120 KB); the server reads them as it answers.
    let requests = pipelined(n);
    let written = timeout(Duration::from_secs(10), socket.write_all(&requests)).await;
    assert!(
        matches!(written, Ok(Ok(()))),
        "the pipelined requests were sent: {written:?}"
    );
    let sent = Instant::now();
    // Never read for five times the bound (the header-read timeout does not cover this): the
    // server fills the buffers, then its write makes no progress for the bound.
    tokio::time::sleep(BOUND * 5).await;
    let (got, ended) = read_to_end(&mut socket, Duration::from_secs(30)).await;
    let all = n * doc;
    assert!(
        ended,
        "the connection ended ({got} bytes read, {:?} after the requests)",
        sent.elapsed()
    );
    // Without the bound, reading lets the server go on and every response arrives (then the
    // keep-alive close); with it, no more than the buffers held when it closed.
    assert!(
        got < all / 4,
        "the server stopped writing to a client that did not read: {got} of {all} bytes arrived"
    );
    // The server itself still answers.
    assert!(openapi_len(&addr).await > 10_000);
}

/// #5: the bound is on time without progress, not a response's total time: a client that
/// reads a long pipelined answer slowly (longer than the bound in all) gets all of it.
#[tokio::test]
async fn a_slow_but_reading_client_gets_every_response() {
    let served = served(stall_config()).await;
    let addr = served.addr.clone();
    let doc = openapi_len(&addr).await;
    let n = 60;
    let mut socket = small_window(&addr).await;
    socket.write_all(&pipelined(n)).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    timeout(Duration::from_secs(60), async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) => return,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) => panic!("the connection failed after {} bytes: {e}", got.len()),
            }
            // About 300 KB/s: the whole answer takes several times the bound.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the answer ends (connection: close on the last request)");
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text.matches("HTTP/1.1 200 OK").count(),
        n,
        "every response arrived ({} bytes, {doc} per document)",
        got.len()
    );
    assert!(
        elapsed > BOUND * 2,
        "the reading took longer than the bound in all: {elapsed:?}"
    );
}

/// #5: an event stream read by its client stays open well past the bound, and still
/// delivers.
#[tokio::test]
async fn a_read_stream_stays_open_past_the_write_stall_bound() {
    let mut config = stall_config();
    config.stream_keepalive = Duration::from_millis(200);
    let served = served(config).await;
    let (addr, store) = (served.addr.clone(), Arc::clone(&served.store));
    let spec = evbus_gateway::KeySpec::new("streamer")
        .subscribe([ORDERS])
        .publish([ORDERS])
        .sources(["*"]);
    let (_, key) = evbus_gateway::create_key(store.as_ref(), spec)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut stream = http
        .get(format!("http://{addr}/v1/stream?types={ORDERS}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    // Read steadily for four times the bound.
    let until = Instant::now() + BOUND * 4;
    while Instant::now() < until {
        let chunk = timeout(Duration::from_secs(5), stream.chunk())
            .await
            .expect("keep-alive comments keep coming")
            .unwrap()
            .expect("the stream stays open");
        assert!(!chunk.is_empty());
    }
    // Still open, and still delivering.
    let id = format!("stall-{}", uuid::Uuid::now_v7().simple());
    let resp = http
        .post(format!("http://{addr}/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": id, "source": "/external", "type": ORDERS, "data": order_created()}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    read_stream_until(&mut stream, |read| read.contains(&id)).await;
}

/// Posts an event of `ORDERS` with `source` and `id`.
async fn post_event(h: &Harness, key: &str, source: &str, id: &str, created_by: &str) {
    let mut data = order_created();
    data["createdBy"] = json!(created_by);
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(key)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": id, "source": source, "type": ORDERS, "data": data})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{source} {id}");
}

/// #4b: two events with the same id from different sources get different `webhook-id`s
/// (each signed), and every retry and replay of an event carries the event's own one.
#[tokio::test]
async fn the_webhook_id_is_unique_per_source_and_id_and_stable_across_retries_and_replays() {
    let h = Harness::memory().await;
    let mut receiver = Receiver::start(500).await;
    let key = h.key(&[ORDERS], &[ORDERS]).await;
    let (hook, secret) = h.register(&key, &receiver.url(), &[ORDERS]).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let id = format!("wh-{}", uuid::Uuid::now_v7().simple());
    post_event(&h, &key, "/t", &id, "real").await;
    post_event(&h, &key, "/attacker", &id, "forged").await;

    // Attempts by source: failed (500) until each event has been retried, then delivered.
    let mut ids: HashMap<String, Vec<String>> = HashMap::new();
    let mut failed: Option<HashMap<String, usize>> = None;
    loop {
        let got = receiver.next().await;
        assert!(got.verify(&secret), "signed over its webhook-id");
        let event = got.json();
        assert_eq!(event["id"], id.as_str(), "the body keeps the event id");
        let source = event["source"].as_str().unwrap().to_owned();
        ids.entry(source)
            .or_default()
            .push(got.webhook_id().to_owned());
        match &failed {
            None if ids.len() == 2 && ids.values().all(|w| w.len() >= 2) => {
                receiver.answer(200);
                failed = Some(ids.iter().map(|(s, w)| (s.clone(), w.len())).collect());
            }
            Some(at_switch) if ids.iter().all(|(s, w)| w.len() > at_switch[s]) => break,
            _ => {}
        }
    }
    // Both settled as delivered before the replay (a pending one is not queued again).
    let path = format!("/v1/webhooks/{hook}/attempts");
    eventually("both deliveries settled", || async {
        let (_, log) = h.call("GET", &path, Some(&key), None).await;
        log.as_array()
            .is_some_and(|a| a.iter().filter(|a| a["status"] == 200).count() == 2)
    })
    .await;
    let real = ids["/t"].clone();
    let forged = ids["/attacker"].clone();
    assert!(real.len() >= 2 && forged.len() >= 2, "retried: {ids:?}");
    assert!(
        real.iter().all(|w| *w == real[0]),
        "one webhook-id on every attempt: {real:?}"
    );
    assert!(
        forged.iter().all(|w| *w == forged[0]),
        "one webhook-id on every attempt: {forged:?}"
    );
    assert_ne!(
        real[0], forged[0],
        "two events (different sources, same id) share no webhook-id"
    );
    assert_eq!(real[0], message_id("/t", &id));
    // The documented construction (README, `signing::message_id`), as computed elsewhere
    // (Python: "msg_" + sha256(struct.pack(">Q", len(source)) + source + id).hexdigest()[:32]).
    assert_eq!(
        message_id("/t", "wh-1"),
        "msg_4b6f3da3e18f6735137390e3a1f85c3f"
    );
    assert_eq!(forged[0], message_id("/attacker", &id));
    assert!(
        real[0].starts_with("msg_") && real[0].len() == 36,
        "{}",
        real[0]
    );

    // A replay delivers each again, under the same webhook-id.
    while receiver.rx.try_recv().is_ok() {}
    let (s, r) = h
        .call(
            "POST",
            &format!("/v1/webhooks/{hook}/replay"),
            Some(&key),
            Some(json!({"since": before})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    let mut replayed = HashMap::new();
    while replayed.len() < 2 {
        let got = receiver.next().await;
        assert!(got.verify(&secret));
        let source = got.json()["source"].as_str().unwrap().to_owned();
        replayed.insert(source, got.webhook_id().to_owned());
    }
    assert_eq!(replayed["/t"], real[0], "a replay keeps the webhook-id");
    assert_eq!(replayed["/attacker"], forged[0]);
}

/// #8: a webhook URL is stored, answered and listed as parsed, i.e. as the URL deliveries
/// go to, not as typed (`\` is a `/` in an http URL, so the host is 8.8.8.8, not 127.0.0.1).
#[tokio::test]
async fn a_webhook_url_is_stored_and_listed_normalised() {
    let h = Harness::memory().await;
    let key = h.key(&[ORDERS], &[]).await;
    for (typed, normalised) in [
        (r"http://8.8.8.8\@127.0.0.1/", "http://8.8.8.8/@127.0.0.1/"),
        ("http://8.8.8.8#@127.0.0.1/", "http://8.8.8.8/#@127.0.0.1/"),
        ("HTTP://8.8.8.8:80/a/../hook", "http://8.8.8.8/hook"),
    ] {
        let (status, created) = h
            .call(
                "POST",
                "/v1/webhooks",
                Some(&key),
                Some(json!({"url": typed, "event_types": [ORDERS]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{typed}: {created}");
        assert_eq!(created["url"], normalised, "answered: {typed}");
        let id = created["id"].as_str().unwrap();
        let (_, got) = h
            .call("GET", &format!("/v1/webhooks/{id}"), Some(&key), None)
            .await;
        assert_eq!(got["url"], normalised, "read: {typed}");
        let stored = h.store.get_webhook(id).await.unwrap().unwrap();
        assert_eq!(stored.url, normalised, "stored: {typed}");
    }
    let (_, list) = h.call("GET", "/v1/webhooks", Some(&key), None).await;
    let urls: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["url"].as_str().unwrap())
        .collect();
    assert!(
        !urls
            .iter()
            .any(|u| u.contains('\\') || u.starts_with("HTTP")),
        "listed: {urls:?}"
    );
    assert!(urls.contains(&"http://8.8.8.8/@127.0.0.1/"), "{urls:?}");
}
