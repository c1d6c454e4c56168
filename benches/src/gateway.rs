//! `evbus-bench gateway`: the gateway under load, each measure next to a bare axum handler
//! doing the same I/O, as a ratio (`cargo xtask bench --gateway`).
//!
//! Everything runs in this one process, on one tokio runtime: the gateway (`Gateway::serve`
//! on 127.0.0.1, the SQLite store in a temporary directory, the in-memory transport), the
//! bare handlers and the load, so both sides share the same CPUs and client. The measures:
//!
//! - `post-events`: 64 concurrent clients POST CloudEvents (`afterProductUpdate`, about
//!   200 bytes of data) for a fixed time; accepted/s, p50 and p99 latency. The gateway
//!   authenticates the key (a store read), rate-limits it (its own limit, high enough never
//!   to refuse), validates against the catalogue, records the publish claim, emits on the
//!   bus, settles the claim, and its bus handler logs the curated event. The bare handler:
//!   reads the key row, parses the JSON, checks the attributes, inserts the event into a
//!   SQLite table (same pool settings: WAL, 4 connections) and answers 202.
//! - `webhook-deliveries`: events emitted on the bus, each delivered to 10 local receivers
//!   (10 keys, one endpoint each); deliveries/s from the first emit to the last delivery.
//!   Bare: each event is inserted with its 10 delivery rows in one transaction, then 64
//!   workers POST the deliveries and mark each delivered.
//! - `sse-fanout`: 500 streams (50 keys of 10) follow one type while events are emitted at a
//!   steady pace; frames received/s over all streams and the p99 lag from emit to frame.
//!   Bare: an axum handler streaming frames from a broadcast channel that the publisher
//!   feeds after inserting each event into SQLite.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use evbus::{Bus, Catalog};
use evbus_gateway::{Gateway, GatewayConfig, OutboundPolicy, RateLimit, SqliteStore, Store};
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::{broadcast, oneshot};

use crate::Result;

/// The external type every measure uses.
const TYPE: &str = "afterProductUpdate";
/// The `source` of the bench's events, the one its key is bound to.
const SOURCE: &str = "/bench";
const CLIENTS: usize = 64;
const RECEIVERS: usize = 10;
const STREAMS: usize = 500;
/// The gateway's per-key stream cap (10 by default) over 500 streams: 50 keys.
const STREAMS_PER_KEY: usize = 10;

/// `evbus-bench gateway` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct GatewayArgs {
    /// Shorter runs (the lines in about a minute).
    #[arg(long)]
    quick: bool,
    /// Only these measures (`post-events`, `webhook-deliveries`, `sse-fanout`), comma
    /// separated; default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

struct Sizes {
    post_warmup: Duration,
    post_measure: Duration,
    webhook_events: usize,
    sse_rate: u64,
    sse_seconds: u64,
}

pub(crate) fn run(args: GatewayArgs) -> Result<()> {
    let sizes = if args.quick {
        Sizes {
            post_warmup: Duration::from_secs(1),
            post_measure: Duration::from_secs(5),
            webhook_events: 300,
            sse_rate: 50,
            sse_seconds: 4,
        }
    } else {
        Sizes {
            post_warmup: Duration::from_secs(2),
            post_measure: Duration::from_secs(15),
            webhook_events: 1_000,
            sse_rate: 100,
            sse_seconds: 10,
        }
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        if wanted("post-events") {
            post_events(&sizes).await?;
        }
        if wanted("webhook-deliveries") {
            webhook_deliveries(&sizes).await?;
        }
        if wanted("sse-fanout") {
            sse_fanout(&sizes).await?;
        }
        Ok(())
    })
}

// ---- shared pieces ------------------------------------------------------------------------

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "evbus-bench-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gateway serving on 127.0.0.1: its base URL, store and bus; stopped by `stop`.
struct RunningGateway {
    base: String,
    store: Arc<SqliteStore>,
    bus: Bus,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: TempDir,
}

impl RunningGateway {
    async fn start() -> Result<RunningGateway> {
        let dir = TempDir::new("gateway")?;
        let store = Arc::new(SqliteStore::open_dir(&dir.0).await?);
        let transport = Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect());
        let bus = Bus::new(transport, Catalog::from_dir("examples/schemas")?, "/bench");
        let mut config = GatewayConfig::default();
        config.outbound = OutboundPolicy::new(vec!["127.0.0.0/8".parse()?]);
        let gateway =
            Gateway::start(bus.clone(), Arc::clone(&store) as Arc<dyn Store>, config).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(gateway.serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(RunningGateway {
            base: format!("http://{addr}"),
            store,
            bus,
            stop: Some(stop),
            served,
            _dir: dir,
        })
    }

    /// A key for `TYPE` (publish and subscribe) with a limit that never refuses the bench.
    async fn key(&self, name: &str) -> Result<String> {
        let spec = evbus_gateway::KeySpec::new(name)
            .subscribe([TYPE])
            .publish([TYPE])
            .sources([SOURCE])
            .rate_limit(Some(RateLimit::new(
                u64::from(RateLimit::MAX_PER_SECOND),
                u64::from(RateLimit::MAX_BURST),
            )?));
        let (_, key) = evbus_gateway::create_key(self.store.as_ref(), spec).await?;
        Ok(key)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.served).await;
        let _ = self.bus.shutdown(Duration::from_secs(5)).await;
        self.store.close().await;
    }
}

/// A SQLite pool as the gateway's store opens its own (WAL, 4 connections).
async fn bare_pool(dir: &TempDir) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(dir.0.join("bare.sqlite3"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    for statement in [
        "CREATE TABLE keys (token TEXT PRIMARY KEY, name TEXT NOT NULL)",
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, received_at INTEGER NOT NULL, body TEXT NOT NULL, UNIQUE (source, id))",
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, receiver INTEGER NOT NULL, event_seq INTEGER NOT NULL, state TEXT NOT NULL)",
        "INSERT INTO keys (token, name) VALUES ('bench-token', 'bench')",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    Ok(pool)
}

/// Serves `router` on 127.0.0.1: its address (the server ends with the runtime).
async fn serve(router: Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The event data: `productId` carries `tag` (a unique id, or the emit time for lags).
fn product(tag: &str) -> Value {
    json!({
        "productId": tag,
        "product": {
            "_id": "p-1", "shopId": "shop-1", "title": "Bench product", "slug": "bench-product",
            "isVisible": true, "price": {"min": 10, "max": 12, "currencyCode": "EUR"},
            "updatedAt": "2026-11-30T10:00:00Z"
        }
    })
}

fn cloud_event(id: &str) -> String {
    json!({
        "specversion": "1.0", "id": id, "source": SOURCE, "type": TYPE,
        "datacontenttype": "application/json", "data": product(id)
    })
    .to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1e3)
}

fn ratio(evbus: f64, bare: f64) -> String {
    if bare > 0.0 {
        format!("{:.2}", evbus / bare)
    } else {
        "n/a".to_owned()
    }
}

// ---- post-events --------------------------------------------------------------------------

/// What a load run saw inside its measured window.
struct Load {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    refused: u64,
}

/// 64 clients POSTing events to `url` with `token` for `warmup + measure`; only requests
/// started after the warm-up and finished before the end count.
async fn load(url: String, token: String, warmup: Duration, measure: Duration) -> Result<Load> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = Vec::new();
    for task in 0..CLIENTS {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut refused = 0u64;
            let mut n = 0u64;
            loop {
                let began = Instant::now();
                if began >= until {
                    break;
                }
                n += 1;
                let body = cloud_event(&format!("e-{task}-{n}"));
                let resp = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/cloudevents+json")
                    .body(body)
                    .send()
                    .await;
                let ok = match resp {
                    Ok(r) => {
                        let ok = r.status().as_u16() == 202;
                        let _ = r.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                let ended = Instant::now();
                if began >= from && ended <= until {
                    if ok {
                        latencies.push(ended - began);
                    } else {
                        refused += 1;
                    }
                }
            }
            (latencies, refused)
        }));
    }
    let mut latencies = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (l, r) = t.await?;
        latencies.extend(l);
        refused += r;
    }
    latencies.sort();
    Ok(Load {
        per_second: latencies.len() as f64 / measure.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        refused,
    })
}

async fn bare_publish(State(db): State<SqlitePool>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    match sqlx::query("SELECT name FROM keys WHERE token = ?")
        .bind(token)
        .fetch_optional(&db)
        .await
    {
        Ok(Some(_)) => {}
        Ok(None) => return StatusCode::UNAUTHORIZED.into_response(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let attr = |name: &str| event.get(name).and_then(Value::as_str);
    let (Some(id), Some(source), Some(ty)) = (attr("id"), attr("source"), attr("type")) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if !event.get("data").is_some_and(Value::is_object) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let stored = sqlx::query(
        "INSERT INTO events (source, id, type, received_at, body) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (source, id) DO NOTHING",
    )
    .bind(source)
    .bind(id)
    .bind(ty)
    .bind(unix_ms())
    .bind(event.to_string())
    .execute(&db)
    .await;
    match stored {
        Ok(_) => (StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn post_events(sizes: &Sizes) -> Result<()> {
    eprintln!("gateway post-events: {CLIENTS} clients, evbus...");
    let gw = RunningGateway::start().await?;
    let key = gw.key("bench-publisher").await?;
    let evbus = load(
        format!("{}/v1/events", gw.base),
        key,
        sizes.post_warmup,
        sizes.post_measure,
    )
    .await?;
    gw.stop().await;

    eprintln!("gateway post-events: bare...");
    let dir = TempDir::new("bare")?;
    let pool = bare_pool(&dir).await?;
    let addr = serve(
        Router::new()
            .route("/v1/events", post(bare_publish))
            .with_state(pool.clone()),
    )
    .await?;
    let bare = load(
        format!("http://{addr}/v1/events"),
        "bench-token".to_owned(),
        sizes.post_warmup,
        sizes.post_measure,
    )
    .await?;
    pool.close().await;

    println!(
        "bench gateway post-events: evbus {:.0}/s p50 {} p99 {} bare {:.0}/s p50 {} p99 {} ratio {}{}",
        evbus.per_second,
        ms(evbus.p50),
        ms(evbus.p99),
        bare.per_second,
        ms(bare.p50),
        ms(bare.p99),
        ratio(evbus.per_second, bare.per_second),
        if evbus.refused + bare.refused > 0 {
            format!(
                " (not accepted: evbus {}, bare {})",
                evbus.refused, bare.refused
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

// ---- webhook-deliveries -------------------------------------------------------------------

/// `RECEIVERS` HTTP receivers answering 204 and counting what they get.
async fn receivers() -> Result<(Vec<String>, Arc<AtomicU64>)> {
    let count = Arc::new(AtomicU64::new(0));
    let mut urls = Vec::new();
    for _ in 0..RECEIVERS {
        let c = Arc::clone(&count);
        let app = Router::new().route(
            "/hook",
            post(move |_body: Bytes| {
                let c = Arc::clone(&c);
                async move {
                    c.fetch_add(1, Ordering::Relaxed);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        urls.push(format!("http://{}/hook", serve(app).await?));
    }
    Ok((urls, count))
}

/// Waits until `count` reaches `target` (or `limit` passes): the time it took from `since`.
async fn wait_for(count: &AtomicU64, target: u64, since: Instant, limit: Duration) -> Duration {
    let deadline = since + limit;
    while count.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    since.elapsed()
}

async fn webhook_deliveries(sizes: &Sizes) -> Result<()> {
    let events = sizes.webhook_events;
    let target = (events * RECEIVERS) as u64;
    let limit = Duration::from_secs(300);
    eprintln!("gateway webhook-deliveries: {events} events to {RECEIVERS} receivers, evbus...");
    let gw = RunningGateway::start().await?;
    let (urls, count) = receivers().await?;
    let http = reqwest::Client::new();
    for (i, url) in urls.iter().enumerate() {
        let key = gw.key(&format!("bench-receiver-{i}")).await?;
        let resp = http
            .post(format!("{}/v1/webhooks", gw.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(json!({"url": url, "event_types": [TYPE], "description": "bench"}).to_string())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            return Err(format!(
                "registering a webhook: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            )
            .into());
        }
    }
    let started = Instant::now();
    for i in 0..events {
        gw.bus.emit(TYPE, product(&format!("w-{i}"))).await?;
    }
    let took = wait_for(&count, target, started, limit).await;
    let evbus_got = count.load(Ordering::Relaxed);
    gw.stop().await;
    let evbus_rate = evbus_got as f64 / took.as_secs_f64();

    eprintln!("gateway webhook-deliveries: bare...");
    let dir = TempDir::new("bare")?;
    let pool = bare_pool(&dir).await?;
    let (urls, count) = receivers().await?;
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(i64, usize, Arc<String>)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (rx, pool, urls, http) = (
            Arc::clone(&rx),
            pool.clone(),
            urls.clone(),
            reqwest::Client::new(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some((delivery, receiver, body)) = next else {
                    return;
                };
                let ok = http
                    .post(&urls[receiver])
                    .header("content-type", "application/cloudevents+json")
                    .body(body.as_str().to_owned())
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                let state = if ok { "delivered" } else { "pending" };
                let _ = sqlx::query("UPDATE deliveries SET state = ? WHERE id = ?")
                    .bind(state)
                    .bind(delivery)
                    .execute(&pool)
                    .await;
            }
        }));
    }
    for i in 0..events {
        let body = Arc::new(cloud_event(&format!("w-{i}")));
        let mut db = pool.begin().await?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (source, id, type, received_at, body) VALUES ('/bench', ?, ?, ?, ?) RETURNING seq",
        )
        .bind(format!("w-{i}"))
        .bind(TYPE)
        .bind(unix_ms())
        .bind(body.as_str())
        .fetch_one(&mut *db)
        .await?;
        let mut ids = Vec::new();
        for receiver in 0..RECEIVERS {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO deliveries (receiver, event_seq, state) VALUES (?, ?, 'pending') RETURNING id",
            )
            .bind(receiver as i64)
            .bind(seq)
            .fetch_one(&mut *db)
            .await?;
            ids.push((id, receiver));
        }
        db.commit().await?;
        for (id, receiver) in ids {
            let _ = tx.send((id, receiver, Arc::clone(&body)));
        }
    }
    drop(tx);
    let took = wait_for(&count, target, started, limit).await;
    let bare_got = count.load(Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    pool.close().await;
    let bare_rate = bare_got as f64 / took.as_secs_f64();
    let missing = |got: u64| {
        if got < target {
            format!(" ({got} of {target} delivered in time)")
        } else {
            String::new()
        }
    };
    println!(
        "bench gateway webhook-deliveries: evbus {evbus_rate:.0}/s{} bare {bare_rate:.0}/s{} ratio {} ({events} events x {RECEIVERS} receivers)",
        missing(evbus_got),
        missing(bare_got),
        ratio(evbus_rate, bare_rate)
    );
    Ok(())
}

// ---- sse-fanout ---------------------------------------------------------------------------

/// Frames received and their lags, over every stream.
#[derive(Default)]
struct Seen {
    frames: AtomicU64,
    lags: std::sync::Mutex<Vec<Duration>>,
}

/// Reads an SSE body: every `data:` line is a frame whose event data's `productId` is
/// `t<micros since base>`.
async fn follow(mut resp: reqwest::Response, base: Instant, seen: Arc<Seen>) {
    let mut pending = String::new();
    let mut lags = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            const TAG: &str = "\"productId\":\"t";
            let Some(at) = data
                .find(TAG)
                .and_then(|i| data[i + TAG.len()..].split('"').next())
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let sent = base + Duration::from_micros(at);
            lags.push(Instant::now().saturating_duration_since(sent));
            seen.frames.fetch_add(1, Ordering::Relaxed);
        }
        // Handed over at once: the reader is aborted when the measure ends.
        if !lags.is_empty() {
            seen.lags
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut lags);
        }
    }
}

/// Emits `rate` events a second for `seconds` through `emit`, each tagged with its emit time.
async fn paced<F, Fut>(base: Instant, rate: u64, seconds: u64, mut emit: F) -> Result<u64>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let total = rate * seconds;
    let every = Duration::from_secs(1) / rate as u32;
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        emit(format!("t{}", base.elapsed().as_micros())).await?;
    }
    Ok(total)
}

struct Fanout {
    per_second: f64,
    p99: Duration,
    got: u64,
    expected: u64,
}

async fn finish_fanout(seen: &Seen, expected: u64, started: Instant) -> Fanout {
    let took = wait_for(&seen.frames, expected, started, Duration::from_secs(120)).await;
    let got = seen.frames.load(Ordering::Relaxed);
    let mut lags = std::mem::take(&mut *seen.lags.lock().unwrap_or_else(|e| e.into_inner()));
    lags.sort();
    Fanout {
        per_second: got as f64 / took.as_secs_f64(),
        p99: percentile(&lags, 0.99),
        got,
        expected,
    }
}

async fn sse_fanout(sizes: &Sizes) -> Result<()> {
    eprintln!(
        "gateway sse-fanout: {STREAMS} streams, {} events/s for {} s, evbus...",
        sizes.sse_rate, sizes.sse_seconds
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(STREAMS)
        .build()?;
    let base = Instant::now();

    let gw = RunningGateway::start().await?;
    let seen = Arc::new(Seen::default());
    let mut readers = Vec::new();
    for k in 0..STREAMS / STREAMS_PER_KEY {
        let key = gw.key(&format!("bench-stream-{k}")).await?;
        for _ in 0..STREAMS_PER_KEY {
            let resp = client
                .get(format!("{}/v1/stream?types={TYPE}", gw.base))
                .bearer_auth(&key)
                .send()
                .await?;
            if resp.status().as_u16() != 200 {
                return Err(format!("opening a stream: {}", resp.status()).into());
            }
            readers.push(tokio::spawn(follow(resp, base, Arc::clone(&seen))));
        }
    }
    let started = Instant::now();
    let bus = gw.bus.clone();
    let sent = paced(base, sizes.sse_rate, sizes.sse_seconds, |tag| {
        let bus = bus.clone();
        async move {
            bus.emit(TYPE, product(&tag)).await?;
            Ok::<(), crate::Error>(())
        }
    })
    .await?;
    let evbus = finish_fanout(&seen, sent * STREAMS as u64, started).await;
    for r in &readers {
        r.abort();
    }
    gw.stop().await;

    eprintln!("gateway sse-fanout: bare...");
    let dir = TempDir::new("bare")?;
    let pool = bare_pool(&dir).await?;
    let (frames, _) = broadcast::channel::<Bytes>(4096);
    let router = Router::new()
        .route("/v1/stream", get(bare_stream))
        .with_state(frames.clone());
    let addr = serve(router).await?;
    let seen = Arc::new(Seen::default());
    let mut readers = Vec::new();
    for _ in 0..STREAMS {
        let resp = client
            .get(format!("http://{addr}/v1/stream"))
            .bearer_auth("bench-token")
            .send()
            .await?;
        readers.push(tokio::spawn(follow(resp, base, Arc::clone(&seen))));
    }
    // Every stream subscribed before the first event.
    while frames.receiver_count() < STREAMS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let sent = paced(base, sizes.sse_rate, sizes.sse_seconds, |tag| {
        let (pool, frames) = (pool.clone(), frames.clone());
        async move {
            let body = json!({"specversion": "1.0", "id": tag, "source": "/bench", "type": TYPE, "data": product(&tag)}).to_string();
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO events (source, id, type, received_at, body) VALUES ('/bench', ?, ?, ?, ?) RETURNING seq",
            )
            .bind(&tag)
            .bind(TYPE)
            .bind(unix_ms())
            .bind(&body)
            .fetch_one(&pool)
            .await?;
            let _ = frames.send(Bytes::from(format!("id: {seq}\ndata: {body}\n\n")));
            Ok::<(), crate::Error>(())
        }
    })
    .await?;
    let bare = finish_fanout(&seen, sent * STREAMS as u64, started).await;
    for r in &readers {
        r.abort();
    }
    pool.close().await;

    let short = |f: &Fanout| {
        if f.got < f.expected {
            format!(" ({} of {} frames in time)", f.got, f.expected)
        } else {
            String::new()
        }
    };
    println!(
        "bench gateway sse-fanout: evbus {:.0} events/s p99 lag {}{} bare {:.0} events/s p99 lag {}{} ratio {} ({STREAMS} streams, {} events/s emitted)",
        evbus.per_second,
        ms(evbus.p99),
        short(&evbus),
        bare.per_second,
        ms(bare.p99),
        short(&bare),
        ratio(evbus.per_second, bare.per_second),
        sizes.sse_rate
    );
    Ok(())
}

/// The bare stream: frames of a broadcast channel, as they come (a stream that falls more
/// than the channel's capacity behind skips what it missed).
async fn bare_stream(State(frames): State<broadcast::Sender<Bytes>>) -> Response {
    let rx = frames.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(frame) => return Some((Ok::<_, Infallible>(frame), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}
