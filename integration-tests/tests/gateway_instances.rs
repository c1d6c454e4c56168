//! Three `evbus serve` processes (the built binary) on one PostgreSQL store and one Redis bus:
//!
//! - 1,000 events POSTed round-robin to the three reach each of two webhook endpoints, whose
//!   receiver verifies every Standard Webhooks signature, at least once, and exactly once
//!   apart from the deliveries the SIGKILLed instance had in flight (counted and reported);
//! - one instance is SIGKILLed mid-run (its leased deliveries are taken over by the others)
//!   and started again;
//! - a stream on instance 2 sees every event, whichever instance logged it, and a stream
//!   resumed on instance 1 with a `Last-Event-ID` of instance 2 goes on right after it;
//! - a key revoked through instance 1 is refused by instances 2 and 3 within 1 s, and its
//!   open stream on instance 2 ends within 1 s.
//!
//! Needs PostgreSQL (`EVBUS_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`)
//! and Redis (`EVBUS_REDIS_URL`): without them the test says so loudly and passes, unless
//! CI=true or EVBUS_REQUIRE_BROKERS=1 (then it fails).

mod support;

use evbus_gateway::Store;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const ORDERS: &str = "afterOrderCreate";
const EVENTS: usize = 1_000;
const WAIT: Duration = Duration::from_secs(45);

fn postgres_url() -> String {
    std::env::var("EVBUS_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn brokers_required() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "1" || v == "true" || v == "yes"
        })
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What `cargo test` sets for a test process about its package.
const SET_BY_CARGO_TEST: [&str; 18] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PKG_NAME",
    "CARGO_PKG_VERSION",
    "CARGO_PKG_VERSION_MAJOR",
    "CARGO_PKG_VERSION_MINOR",
    "CARGO_PKG_VERSION_PATCH",
    "CARGO_PKG_VERSION_PRE",
    "CARGO_PKG_AUTHORS",
    "CARGO_PKG_DESCRIPTION",
    "CARGO_PKG_HOMEPAGE",
    "CARGO_PKG_REPOSITORY",
    "CARGO_PKG_LICENSE",
    "CARGO_PKG_LICENSE_FILE",
    "CARGO_PKG_README",
    "CARGO_PKG_RUST_VERSION",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// The `evbus` binary of this build, built now if needed (cargo is quick when it is up to
/// date): next to this test's `deps` directory, in the same target directory and profile.
fn evbus_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap().to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", "evbus-cli", "--bin", "evbus"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(repo());
    // `cargo test` gave this process its package's variables. Build scripts watch some of
    // those names (ring's does), so passing them on would make this build and the
    // workspace's each find ring out of date and rebuild it and everything above it.
    for name in SET_BY_CARGO_TEST {
        build.env_remove(name);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build -p evbus-cli");
    assert!(status.success(), "cargo build -p evbus-cli failed");
    let bin = profile_dir.join("evbus");
    assert!(bin.is_file(), "no evbus binary at {}", bin.display());
    bin
}

fn order(n: usize) -> Value {
    json!({
        "createdBy": format!("instances-{n}"),
        "order": {
            "_id": format!("ord_{n}"), "referenceId": "R-10023", "shopId": "shop-1", "accountId": null,
            "email": "ada@example.com", "status": "new", "currencyCode": "EUR",
            "items": [{"productId": "p1", "variantId": "v1", "quantity": 1, "price": 10}],
            "shippingAddress": {"fullName": "Ada", "address1": "1 rue", "city": "Paris",
                "postal": "75001", "country": "FR", "phone": "+33 1 00 00 00 00"},
            "totals": {"subtotal": 10, "total": 10}, "createdAt": "2026-11-27T10:15:00Z"
        }
    })
}

/// A running `evbus serve`; SIGKILLed on drop.
struct Instance {
    child: Child,
    base: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Instance {
    fn start(bin: &Path, dir: &Path, store: &str, bus: &str) -> Instance {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(bin)
            .arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--store",
                store,
                "--transport",
                bus,
            ])
            .arg("--data-dir")
            .arg(dir)
            .arg("--schemas")
            .arg(repo().join("examples/schemas"))
            .args(["--webhook-allow", "127.0.0.0/8"])
            // Short lease and visibility timeout: a killed instance's work moves on quickly.
            .args(["--delivery-timeout", "2", "--delivery-lease", "5"])
            .args(["--bus-visibility-timeout", "3"])
            .args(["--rate-limit", "100000", "--rate-limit-burst", "100000"])
            .env("EVBUS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start evbus serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("evbus gateway listening on http://") {
                    let _ = tx.send(Ok(line));
                } else if line.contains("ERROR") || line.starts_with("error") {
                    eprintln!("[evbus serve] {line}");
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(line)) => {
                    let addr = line["evbus gateway listening on http://".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .to_owned();
                    return Instance {
                        child,
                        base: format!("http://{addr}"),
                    };
                }
                Ok(Err(_)) => continue,
                Err(e) => panic!("evbus serve did not start: {e}"),
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Standard Webhooks: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by the
/// base64 after `whsec_` (checked here independently of the gateway's own code).
fn signature_ok(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| engine.decode(k).ok())
    else {
        return false;
    };
    header.split(' ').any(|sig| {
        let Some(given) = sig.strip_prefix("v1,").and_then(|b| engine.decode(b).ok()) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&given).is_ok()
    })
}

/// What the receiver saw: per endpoint, how often each event id arrived; bad signatures.
#[derive(Default)]
struct Seen {
    counts: HashMap<String, HashMap<String, u32>>,
    bad_signatures: u32,
}

/// The webhook receiver: `/hook/<name>`, verifying signatures with the secrets registered
/// under each name; a little slow (so deliveries are in flight when an instance dies).
async fn receiver(secrets: Arc<Mutex<HashMap<String, String>>>, seen: Arc<Mutex<Seen>>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hook/{name}",
        axum::routing::post(
            move |axum::extract::Path(name): axum::extract::Path<String>,
                  headers: HeaderMap,
                  body: axum::body::Bytes| {
                let secrets = Arc::clone(&secrets);
                let seen = Arc::clone(&seen);
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let (id, ts, sig) = (
                        h("webhook-id"),
                        h("webhook-timestamp"),
                        h("webhook-signature"),
                    );
                    let secret = secrets.lock().unwrap().get(&name).cloned();
                    // Counted by the event's id; the `webhook-id` is its (source, id) digest.
                    let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let event_id = event["id"].as_str().unwrap_or_default().to_owned();
                    let source = event["source"].as_str().unwrap_or_default();
                    let ok = secret.is_some_and(|s| signature_ok(&s, &id, &ts, &body, &sig))
                        && id == evbus_gateway::signing::message_id(source, &event_id);
                    {
                        let mut seen = seen.lock().unwrap();
                        if ok {
                            *seen
                                .counts
                                .entry(name)
                                .or_default()
                                .entry(event_id)
                                .or_default() += 1;
                        } else {
                            seen.bad_signatures += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    if ok {
                        StatusCode::NO_CONTENT
                    } else {
                        StatusCode::UNAUTHORIZED
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// One SSE frame: its id and the CloudEvent id in its data.
#[derive(Clone, Debug)]
struct Frame {
    sse_id: String,
    event_id: String,
}

/// Reads `/v1/stream` frames into `out` until the stream ends; returns when it ends.
async fn read_stream(mut resp: reqwest::Response, out: Arc<Mutex<Vec<Frame>>>) {
    let mut buf = String::new();
    let mut sse_id = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(id) = line.strip_prefix("id:") {
                sse_id = id.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim()).unwrap();
                out.lock().unwrap().push(Frame {
                    sse_id: sse_id.clone(),
                    event_id: v["id"].as_str().unwrap().to_owned(),
                });
            }
        }
    }
}

async fn open_stream(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    last: Option<&str>,
) -> reqwest::Response {
    let mut req = http
        .get(format!("{base}/v1/stream?types={ORDERS}"))
        .bearer_auth(key);
    if let Some(last) = last {
        req = req.header("last-event-id", last);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_deliveries_streams_and_revocations() {
    // The brokers.
    let schema = format!("gwi_{}", uuid::Uuid::now_v7().simple());
    let store_url = format!("{}?schema={schema}", postgres_url());
    let store = match evbus_gateway::PostgresStore::open(&store_url).await {
        Ok(s) => s,
        Err(e) if !brokers_required() && e.to_string().contains("connecting") => {
            eprintln!(
                "WARNING: PostgreSQL is unreachable ({e}); this test did NOT run. Set EVBUS_REQUIRE_BROKERS=1 to make this a failure."
            );
            return;
        }
        Err(e) => panic!("PostgreSQL store: {e}"),
    };
    // Declared before the instances: dropped after they are killed, even on a failure.
    let _cleanup = DropSchema(store.clone());
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err()
        && std::env::var("EVBUS_REDIS_URL").is_err()
    {
        assert!(
            !brokers_required(),
            "Redis at 127.0.0.1:6379 is unreachable"
        );
        eprintln!(
            "WARNING: Redis is unreachable; this test did NOT run. Set EVBUS_REQUIRE_BROKERS=1 to make this a failure."
        );
        return;
    }
    let bus = support::redis_url("gateway-instances");
    let bin = evbus_binary();
    let root = std::env::temp_dir().join(format!("evbus-gwi-{}", uuid::Uuid::now_v7().simple()));

    // The first admin key, made in the shared store by `evbus keys create --store`.
    let out = Command::new(&bin)
        .args([
            "keys", "create", "--store", &store_url, "--name", "admin", "--admin",
        ])
        .arg("--data-dir")
        .arg(root.join("keys"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mut instances: Vec<Instance> = (0..3)
        .map(|i| Instance::start(&bin, &root.join(format!("i{i}")), &store_url, &bus))
        .collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Streams last: no deadline on the whole response.
    let sse = reqwest::Client::new();

    // A key that publishes and subscribes to orders, made through instance 1.
    let (status, made) = call(
        &http,
        reqwest::Method::POST,
        &instances[0].url("/v1/keys"),
        &admin,
        Some(json!({"name": "shop", "subscribe": [ORDERS], "publish": [ORDERS], "sources": ["/instances-test"]})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let shop = made["key"].as_str().unwrap().to_owned();

    // Two endpoints, registered through instances 2 and 3.
    let secrets: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let hook = receiver(Arc::clone(&secrets), Arc::clone(&seen)).await;
    let mut webhook_ids = HashMap::new();
    for (i, name) in [(1, "a"), (2, "b")] {
        let (status, body) = call(
            &http,
            reqwest::Method::POST,
            &instances[i].url("/v1/webhooks"),
            &shop,
            Some(json!({"url": format!("{hook}/{name}"), "event_types": [ORDERS]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        webhook_ids.insert(name, body["id"].as_str().unwrap().to_owned());
        secrets
            .lock()
            .unwrap()
            .insert(name.to_owned(), body["secret"].as_str().unwrap().to_owned());
    }

    // A stream on instance 2, open before anything is posted.
    let frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
    let streaming = tokio::spawn(read_stream(
        open_stream(&sse, &instances[1].base, &shop, None).await,
        Arc::clone(&frames),
    ));

    // 1,000 events round-robin over the three, 8 posters at once; instance 3 is SIGKILLed
    // a third of the way and started again two thirds of the way. A post refused by a dead
    // instance goes to the next one (same id: the gateway takes it as the same event).
    let started = Instant::now();
    let bases: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(
        instances.iter().map(|i| Some(i.base.clone())).collect(),
    ));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ids: Vec<String> = (0..EVENTS)
        .map(|n| format!("gwi-{n}-{}", uuid::Uuid::now_v7().simple()))
        .collect();
    let ids = Arc::new(ids);
    // A poster's failure, seen by the waits below (not only when the posters are joined).
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let posters: Vec<_> = (0..8)
        .map(|_| {
            let failed = Arc::clone(&failed);
            let (http, shop, bases, next, ids) = (
                http.clone(),
                shop.clone(),
                Arc::clone(&bases),
                Arc::clone(&next),
                Arc::clone(&ids),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= EVENTS {
                        return;
                    }
                    let body =
                        json!({"specversion": "1.0", "id": ids[n], "source": "/instances-test",
                        "type": ORDERS, "datacontenttype": "application/json", "data": order(n)})
                        .to_string();
                    let mut target = n % 3;
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        if tries > 50 {
                            *failed.lock().unwrap() =
                                Some(format!("event {n} accepted by no instance"));
                            return;
                        }
                        let base = bases.lock().unwrap()[target].clone();
                        let Some(base) = base else {
                            target = (target + 1) % 3;
                            continue;
                        };
                        let sent = http
                            .post(format!("{base}/v1/events"))
                            .bearer_auth(&shop)
                            .header("content-type", "application/cloudevents+json")
                            .body(body.clone())
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status().as_u16() == 202 => break,
                            Ok(r) => {
                                let why = format!(
                                    "event {n}: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                                *failed.lock().unwrap() = Some(why);
                                return;
                            }
                            Err(_) => {
                                target = (target + 1) % 3;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let posting_failed = || {
        if let Some(why) = failed.lock().unwrap().as_ref() {
            panic!("posting failed: {why}");
        }
    };
    wait_for("a third of the events delivered", || {
        posting_failed();
        seen.lock().unwrap().counts.get("a").map_or(0, |c| c.len()) >= EVENTS / 3
    })
    .await;
    bases.lock().unwrap()[2] = None;
    instances[2].kill();
    let killed_at = Instant::now();
    eprintln!("instance 3 SIGKILLed after {:?}", killed_at - started);
    wait_for("two thirds of the events delivered", || {
        posting_failed();
        seen.lock().unwrap().counts.get("a").map_or(0, |c| c.len()) >= 2 * EVENTS / 3
    })
    .await;
    instances[2] = Instance::start(&bin, &root.join("i2b"), &store_url, &bus);
    bases.lock().unwrap()[2] = Some(instances[2].base.clone());
    for p in posters {
        p.await.unwrap();
    }
    posting_failed();

    // Every event at each endpoint.
    wait_for("every event at both endpoints", || {
        let s = seen.lock().unwrap();
        ["a", "b"]
            .iter()
            .all(|n| s.counts.get(*n).map_or(0, |c| c.len()) == EVENTS)
    })
    .await;
    let elapsed = started.elapsed();
    // Counted once the shared outbox is empty (nothing pending, nothing leased): no
    // delivery is made after that, so no duplicate comes later.
    let deadline = Instant::now() + WAIT;
    while store.next_due().await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "deliveries left in the shared outbox"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut recorded = HashMap::new();
    for (name, id) in &webhook_ids {
        let attempts = store.list_attempts(id, 10_000).await.unwrap();
        let ok = attempts
            .iter()
            .filter(|a| a.status.is_some_and(|s| (200..300).contains(&s)))
            .count();
        recorded.insert(*name, ok);
    }
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.bad_signatures, 0, "every delivery verifies");
        for name in ["a", "b"] {
            let counts = &s.counts[name];
            for id in ids.iter() {
                assert!(
                    counts.get(id).is_some_and(|c| *c >= 1),
                    "endpoint {name} never got {id}"
                );
            }
            assert!(
                counts.keys().all(|id| ids.contains(id)),
                "only the events posted"
            );
            let duplicates: u32 = counts.values().map(|c| c - 1).sum();
            let received: u32 = counts.values().sum();
            // Successful attempts the store recorded, against what arrived: the difference is
            // the attempts the killed instance made but never recorded.
            let unrecorded = received as usize - recorded[name].min(received as usize);
            eprintln!(
                "endpoint {name}: {EVENTS} events, {duplicates} duplicates (deliveries the killed instance had in flight, taken over after their lease); {} successful attempts recorded, {unrecorded} made by the killed instance and not recorded",
                recorded[name]
            );
            assert!(
                recorded[name] >= EVENTS,
                "every event has a recorded successful attempt"
            );
            // Only the killed instance's unfinished deliveries may come twice: at most what
            // one instance holds in flight (max_in_flight 64), never one per instance.
            assert!(duplicates <= 64, "endpoint {name}: {duplicates} duplicates");
        }
        eprintln!("1,000 events delivered to 2 endpoints by 3 instances in {elapsed:?}");
    }

    // The stream on instance 2 saw every event, whichever instance logged it.
    wait_for("every event on the stream of instance 2", || {
        let f = frames.lock().unwrap();
        assert!(
            !streaming.is_finished(),
            "the stream on instance 2 ended after {} frames",
            f.len()
        );
        f.iter()
            .map(|f| &f.event_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
            == EVENTS
    })
    .await;
    let seen_frames = frames.lock().unwrap().clone();
    assert_eq!(seen_frames.len(), EVENTS, "each event once on the stream");
    // Resumed on instance 1 from the 500th frame of instance 2: the 501st comes first.
    let resumed: Arc<Mutex<Vec<Frame>>> = Arc::default();
    let resuming = tokio::spawn(read_stream(
        open_stream(
            &sse,
            &instances[0].base,
            &shop,
            Some(&seen_frames[499].sse_id),
        )
        .await,
        Arc::clone(&resumed),
    ));
    wait_for("the resumed stream", || {
        resumed.lock().unwrap().len() >= EVENTS - 500
    })
    .await;
    {
        let r = resumed.lock().unwrap();
        let expected: Vec<&str> = seen_frames[500..]
            .iter()
            .map(|f| f.event_id.as_str())
            .collect();
        let got: Vec<&str> = r.iter().map(|f| f.event_id.as_str()).collect();
        assert_eq!(
            got, expected,
            "resume on another instance goes on right after the id"
        );
    }
    resuming.abort();
    streaming.abort();

    // Revocation: a key working on every instance, with a stream open on instance 2, is
    // revoked through instance 1.
    let (status, made) = call(
        &http,
        reqwest::Method::POST,
        &instances[0].url("/v1/keys"),
        &admin,
        Some(json!({"name": "partner", "subscribe": [ORDERS]})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let partner = made["key"].as_str().unwrap().to_owned();
    let partner_id = made["id"].as_str().unwrap().to_owned();
    for i in &instances {
        let (status, _) = call(
            &http,
            reqwest::Method::GET,
            &i.url("/v1/webhooks"),
            &partner,
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    let partner_frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
    let partner_stream = tokio::spawn(read_stream(
        open_stream(&sse, &instances[1].base, &partner, None).await,
        Arc::clone(&partner_frames),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!partner_stream.is_finished());
    let revoked_at = Instant::now();
    let (status, body) = call(
        &http,
        reqwest::Method::DELETE,
        &instances[0].url(&format!("/v1/keys/{partner_id}")),
        &admin,
        None,
    )
    .await;
    assert!(status == 204 || status == 200, "{status} {body}");
    for i in &instances[1..] {
        loop {
            let (status, _) = call(
                &http,
                reqwest::Method::GET,
                &i.url("/v1/webhooks"),
                &partner,
                None,
            )
            .await;
            if status == 401 {
                break;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "instance {} still accepts the revoked key",
                i.base
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let refused_after = revoked_at.elapsed();
    tokio::time::timeout(Duration::from_secs(1), partner_stream)
        .await
        .expect("the revoked key's stream on instance 2 ends within 1 s")
        .unwrap();
    eprintln!(
        "revoked through instance 1: refused by instances 2 and 3 after {refused_after:?}, stream on instance 2 ended after {:?}",
        revoked_at.elapsed()
    );

    drop(instances);
    let _ = std::fs::remove_dir_all(&root);
}

/// Drops the test's schema when the test ends, passed or failed (on a thread of its own: a
/// `Drop` cannot await, and the test's runtime may be unwinding).
struct DropSchema(evbus_gateway::PostgresStore);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let store = self.0.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Err(e) = store.drop_schema().await {
                    eprintln!("could not drop the test schema {}: {e}", store.schema());
                }
            });
        });
        let _ = done.join();
    }
}
