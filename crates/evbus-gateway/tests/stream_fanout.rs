//! Item 9, second half: one read of the event log per page of new events however many
//! streams are open (the shared fan-out), and no event lost by a stream that falls behind it.
//!
//! One test per binary: it installs the process-wide metrics recorder to count log reads.

mod support;

use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use support::*;
use tokio::time::timeout;

const ORDERS: &str = "afterOrderCreate";

/// Reads a stream until it has `n` data frames; returns the `createdBy` of each, in order,
/// and checks that every frame has an id and that ids do not repeat.
async fn frames(stream: &mut reqwest::Response, n: usize) -> Vec<String> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let mut ids = Vec::new();
    timeout(WAIT, async {
        while out.len() < n {
            let chunk = stream
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let id = frame.lines().find_map(|l| l.strip_prefix("id:"));
                let data = frame.lines().find_map(|l| l.strip_prefix("data:"));
                // A frame without data is the stream's start position (its first frame).
                if let Some(data) = data {
                    let id = id.unwrap_or_else(|| panic!("a data frame without an id: {frame}"));
                    ids.push(id.trim().to_owned());
                    let event: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                    out.push(created_by(&event));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} of {n} frames within {WAIT:?}", out.len()));
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "repeated SSE ids: {ids:?}");
    out
}

/// The `createdBy` of a frame's event, without the padding some tests add after a `~`.
fn created_by(event: &serde_json::Value) -> String {
    let name = event["data"]["createdBy"].as_str().unwrap();
    name.split('~').next().unwrap().to_owned()
}

/// Checks that `got` is `want`, naming the first difference (not printing thousands of names).
fn same(got: &[String], want: &[String], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: {} frames, {} expected; first difference at {i}: got {:?}, expected {:?}; got around it: {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i),
            &got[i.saturating_sub(3)..(i + 3).min(got.len())]
        );
    }
}

/// The value of `evbus_gateway_stream_log_reads_total{reader=...}` in a Prometheus text page.
fn reads(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| l.starts_with("evbus_gateway_stream_log_reads_total{"))
        .filter_map(|l| {
            let reader = l.split("reader=\"").nth(1)?.split('"').next()?.to_owned();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((reader, value))
        })
        .collect()
}

#[tokio::test]
async fn many_streams_share_one_read_of_the_log_and_a_stream_behind_it_loses_nothing() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let mut config = test_config();
    config.max_streams_per_key = 10;
    config.rate_limit_per_second = 10_000;
    config.rate_limit_burst = 10_000;
    // One page kept: a stream busy sending a page misses the next ones and must catch up
    // from the store.
    config.stream_buffer_pages = 1;
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let publisher = h.key(&[], &[ORDERS]).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let key = h.key(&[ORDERS], &[]).await;
        for _ in 0..10 {
            let s = h
                .http
                .get(h.url(&format!("/v1/stream?types={ORDERS}")))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(s.status().as_u16(), 200);
            streams.push(s);
        }
    }

    // Published one at a time, waiting for the first stream to see each: one page per event,
    // so the old one-read-per-stream-per-event design would make 40 reads per event.
    let sent: Vec<String> = (0..30).map(|i| format!("paced-{i}")).collect();
    let mut first = streams.remove(0);
    for name in &sent {
        let mut event = order_created();
        event["createdBy"] = json!(name);
        let (s, body) = h.publish(&publisher, ORDERS, event).await;
        assert_eq!(s.as_u16(), 202, "{body}");
        same(
            &frames(&mut first, 1).await,
            std::slice::from_ref(name),
            "paced, first stream",
        );
    }
    for s in &mut streams {
        same(&frames(s, sent.len()).await, &sent, "paced, another stream");
    }
    let counted = reads(&metrics.render());
    let by_streams = counted.get("stream").copied().unwrap_or_default();
    let by_fanout = counted.get("fanout").copied().unwrap_or_default();
    eprintln!(
        "30 paced events, 40 streams: {by_streams} reads by streams, {by_fanout} by the fan-out"
    );
    assert!(by_fanout >= 30.0, "the fan-out read each page: {counted:?}");
    assert!(
        by_streams < 40.0 * 3.0,
        "streams that keep up read the log themselves: {counted:?} (40 streams, 30 events)"
    );

    // A stream whose client stops reading: a tiny receive buffer, then a burst of events
    // far larger than the socket and HTTP buffers. The stream stops being polled, the
    // one-page buffer wraps, and it must catch up from the store without losing an event.
    drop(streams);
    let key = h.key(&[ORDERS], &[]).await;
    let mut slow = RawStream::open(&h, &key).await;
    // 120 events of about 60 KB each: 7 MB, more than the server's socket buffer (4 MB at
    // most here) and HTTP buffer can take, so the stalled stream's task stops being polled.
    let burst: Vec<String> = (0..120).map(|i| format!("burst-{i}")).collect();
    let padding = "x".repeat(60_000);
    for name in &burst {
        let mut event = order_created();
        event["createdBy"] = json!(format!("{name}~{padding}"));
        h.bus.emit(ORDERS, event).await.unwrap();
    }
    // Emitted straight on the bus, the events are logged in the order the gateway's
    // handlers take them: every stream must show that one order (the log's), each event once.
    let logged = frames(&mut first, burst.len()).await;
    let mut sorted = logged.clone();
    sorted.sort();
    let mut expected = burst.clone();
    expected.sort();
    same(
        &sorted,
        &expected,
        "burst, a stream reading: each event once",
    );
    same(
        &slow.created_by(burst.len()).await,
        &logged,
        "burst, the stalled stream",
    );
    let after = reads(&metrics.render());
    eprintln!("after a burst of 120 with one stalled stream: {after:?}");
    // Its first read when it opened, then at least one more: the catch-up.
    assert!(
        after.get("stream").copied().unwrap_or_default() >= by_streams + 2.0,
        "the stalled stream went back to the store: {after:?}"
    );
}

/// An SSE stream read from a raw socket with a small receive buffer, so that not reading it
/// stalls the server's side quickly.
struct RawStream {
    socket: tokio::net::TcpStream,
    /// Bytes read and not yet decoded.
    raw: Vec<u8>,
    /// Decoded body not yet parsed into frames.
    body: String,
}

impl RawStream {
    async fn open(h: &Harness, key: &str) -> RawStream {
        use tokio::io::AsyncWriteExt;
        let addr: std::net::SocketAddr = h.base.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut socket = socket.connect(addr).await.unwrap();
        let request = format!(
            "GET /v1/stream?types={ORDERS} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut stream = RawStream {
            socket,
            raw: Vec::new(),
            body: String::new(),
        };
        // The head, then the body in chunked encoding.
        let head = stream.until(b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        stream
    }

    /// Reads until `end`; returns the bytes before it (and consumes `end`).
    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(at) = self.raw.windows(end.len()).position(|w| w == end) {
                let out = self.raw[..at].to_vec();
                self.raw.drain(..at + end.len());
                return out;
            }
            let mut buf = [0u8; 8192];
            let n = self.socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream closed");
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// One chunk of the chunked body.
    async fn chunk(&mut self) {
        let size = self.until(b"\r\n").await;
        let size = usize::from_str_radix(std::str::from_utf8(&size).unwrap().trim(), 16).unwrap();
        assert!(size > 0, "the stream ended");
        let mut data = self.until(b"\r\n").await;
        while data.len() < size {
            // CRLF inside the chunk's data: keep reading to its end.
            data.extend_from_slice(b"\r\n");
            data.extend(self.until(b"\r\n").await);
        }
        self.body.push_str(std::str::from_utf8(&data).unwrap());
    }

    /// The `createdBy` of the next `n` events.
    async fn created_by(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        timeout(WAIT, async {
            while out.len() < n {
                while let Some(end) = self.body.find("\n\n") {
                    let frame: String = self.body.drain(..end + 2).collect();
                    for line in frame.lines() {
                        if let Some(data) = line.strip_prefix("data:") {
                            let event: serde_json::Value =
                                serde_json::from_str(data.trim()).unwrap();
                            out.push(created_by(&event));
                        }
                    }
                }
                if out.len() < n {
                    self.chunk().await;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} of {n} frames within {WAIT:?}", out.len()));
        out
    }
}
