//! Abuse suite, availability part: one key must not starve another. Stream-slot exhaustion
//! by one key, slow endpoints of one key holding every delivery slot, slowloris and idle
//! connections holding every connection.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

use support::*;

const ORDERS: &str = "afterOrderCreate";
/// The bound the issue sets on another key's deliveries and stream frames.
const FAIR: Duration = Duration::from_secs(2);

/// An HTTP endpoint that accepts connections, reads the request and never answers: every
/// delivery to it holds its slot until the delivery timeout. Counts connections.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

async fn open_stream(h: &Harness, key: &str) -> reqwest::Response {
    h.http
        .get(h.url(&format!("/v1/stream?types={ORDERS}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// Reads a stream until a frame whose data holds `needle`; panics after `bound`.
async fn frame_with(stream: &mut reqwest::Response, needle: &str, bound: Duration) {
    let mut buf = String::new();
    timeout(bound, async {
        loop {
            let chunk = stream.chunk().await.unwrap().expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if buf
                .lines()
                .any(|l| l.starts_with("data:") && l.contains(needle))
            {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no frame with {needle} within {bound:?}; got {buf:?}"));
}

/// Item 9 and 11, and the "must show": one key holds its per-key maximum of streams
/// and has slow endpoints holding deliveries; a second key's stream and fast webhook still
/// get each event within 2 s, and the first key's extra stream is refused naming the limit.
#[tokio::test]
async fn one_key_at_its_stream_and_delivery_limits_does_not_starve_another_key() {
    let mut config = test_config();
    config.max_streams = 6;
    config.max_streams_per_key = 3;
    config.stream_keepalive = Duration::from_millis(200);
    config.max_in_flight = 8;
    config.max_in_flight_per_key = 4;
    config.max_in_flight_per_endpoint = 4;
    // Slow deliveries hold their slot for this long: far beyond the 2 s bound.
    config.delivery_timeout = Duration::from_secs(15);
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let hog = h.key(&[ORDERS], &[ORDERS]).await;
    let other = h.key(&[ORDERS], &[]).await;

    // Stream slots: the hog takes its three, the fourth is refused with the limit named.
    let mut hog_streams = Vec::new();
    for _ in 0..3 {
        let s = open_stream(&h, &hog).await;
        assert_eq!(s.status().as_u16(), 200);
        hog_streams.push(s);
    }
    let refused = open_stream(&h, &hog).await;
    assert_eq!(refused.status().as_u16(), 429, "a 4th stream of one key");
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.text().await.unwrap();
    assert!(
        body.contains("max_streams_per_key") && body.contains("\"limit\":3"),
        "{body}"
    );
    // Another key still gets a slot (the global limit, 6, is not reached).
    let mut other_stream = open_stream(&h, &other).await;
    assert_eq!(other_stream.status().as_u16(), 200);

    // Delivery slots: the hog's ten endpoints never answer.
    let (hole, seen) = black_hole().await;
    for i in 0..10 {
        h.register(&hog, &format!("{hole}/slow/{i}"), &[ORDERS])
            .await;
    }
    let (s, body) = h.publish(&hog, ORDERS, order_created()).await;
    assert_eq!(s.as_u16(), 202, "{body}");
    // Wait until the hog's deliveries hold all the slots they may take.
    eventually("the slow endpoints hold their delivery slots", || {
        let seen = Arc::clone(&seen);
        async move { seen.load(Ordering::SeqCst) >= 4 }
    })
    .await;

    let mut fast = Receiver::start(200).await;
    h.register(&other, &fast.url(), &[ORDERS]).await;
    let published = Instant::now();
    let (s, body) = h
        .publish(
            &hog,
            ORDERS,
            serde_json::json!({"createdBy": "second", "order": order_created()["order"].clone()}),
        )
        .await;
    assert_eq!(s.as_u16(), 202, "{body}");
    let got = timeout(FAIR, fast.rx.recv())
        .await
        .expect("the other key's fast endpoint got the event within 2 s")
        .unwrap();
    assert!(got.body.contains("second"), "{}", got.body);
    let left = FAIR.saturating_sub(published.elapsed());
    frame_with(
        &mut other_stream,
        "second",
        left.max(Duration::from_millis(1)),
    )
    .await;
    assert!(
        seen.load(Ordering::SeqCst) <= 4,
        "the slow key holds more than its 4 delivery slots"
    );

    // A stream given back frees the key's slot again.
    drop(hog_streams.pop());
    eventually("a closed stream gives its key slot back", || async {
        open_stream(&h, &hog).await.status().as_u16() == 200
    })
    .await;
}

/// One host holding its share of connections, idle and half-sent, is refused more with `503`
/// naming the per-address limit, while a client from another address is served as usual.
#[tokio::test]
async fn one_address_cannot_take_every_connection_slot() {
    let mut config = test_config();
    config.max_connections = 100;
    config.max_connections_per_address = 6;
    config.header_read_timeout = Duration::from_secs(60);
    let served = served(config).await;
    let addr = served.addr.clone();
    let mut held = Vec::new();
    for i in 0..6 {
        let mut socket = TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            socket
                .write_all(b"GET /v1/event-types HTTP/1.1\r\nHost: gateway\r\n")
                .await
                .unwrap();
        }
        held.push(socket);
    }
    let from = |local: &str| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .local_address(local.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let same = timeout(
        FAIR,
        from("127.0.0.1")
            .get(format!("http://{addr}/v1/event-types"))
            .send(),
    )
    .await
    .expect("an answer within 2 s")
    .unwrap();
    assert_eq!(
        same.status().as_u16(),
        503,
        "a seventh connection of one address"
    );
    assert!(same.headers().contains_key("retry-after"));
    let body = same.text().await.unwrap();
    assert!(body.contains("max_connections_per_address"), "{body}");
    // Another address (all of 127/8 is this host's loopback) is served as usual.
    let other = timeout(
        FAIR,
        from("127.0.0.2")
            .get(format!("http://{addr}/v1/event-types"))
            .header("authorization", "Bearer nothing")
            .send(),
    )
    .await
    .expect("an answer within 2 s")
    .unwrap();
    assert_eq!(
        other.status().as_u16(),
        401,
        "another address reaches the API"
    );
    // The address's own slots come back as its connections close.
    held.clear();
    eventually(
        "the address is served again once its connections close",
        || async {
            from("127.0.0.1")
                .get(format!("http://{addr}/v1/event-types"))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() != 503)
        },
    )
    .await;
}

/// Reads until the server closes the connection; panics if it stays open past `bound`.
async fn closed_within(socket: &mut TcpStream, bound: Duration, what: &str) {
    let mut buf = [0u8; 1024];
    timeout(bound, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} still open after {bound:?}"));
}

/// Item 10: a half-sent request, and a connection that sends nothing, are closed after the
/// header-read timeout.
#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed_after_the_header_timeout() {
    let mut config = test_config();
    config.header_read_timeout = Duration::from_millis(500);
    let served = served(config).await;
    let addr = served.addr.clone();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    closed_within(&mut half, Duration::from_secs(5), "a half-sent request").await;
    closed_within(&mut idle, Duration::from_secs(5), "an idle connection").await;
    // The server itself still answers.
    let resp = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// Item 10: with every connection slot held by idle and half-sent connections, `/healthz`
/// still answers within 2 s, and other requests are refused with `503` naming the limit
/// instead of queueing.
#[tokio::test]
async fn healthz_answers_while_idle_and_slowloris_connections_hold_every_slot() {
    let mut config = test_config();
    config.max_connections = 20;
    config.header_read_timeout = Duration::from_secs(60);
    let served = served(config).await;
    let addr = served.addr.clone();
    let mut held = Vec::new();
    for i in 0..20 {
        let mut socket = TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            socket
                .write_all(b"GET /v1/event-types HTTP/1.1\r\nHost: gateway\r\n")
                .await
                .unwrap();
        }
        held.push(socket);
    }
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let health = timeout(FAIR, fresh().get(format!("http://{addr}/healthz")).send())
        .await
        .expect("/healthz answered within 2 s with every connection slot held")
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let other = timeout(
        FAIR,
        fresh().get(format!("http://{addr}/v1/event-types")).send(),
    )
    .await
    .expect("an answer within 2 s")
    .unwrap();
    assert_eq!(
        other.status().as_u16(),
        503,
        "a request above the connection limit"
    );
    assert!(other.headers().contains_key("retry-after"));
    let body = other.text().await.unwrap();
    assert!(body.contains("max_connections"), "{body}");
    // Freeing slots lets ordinary requests through again.
    held.clear();
    eventually(
        "ordinary requests are served once connections close",
        || async {
            fresh()
                .get(format!("http://{addr}/v1/event-types"))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() != 503)
        },
    )
    .await;
}
