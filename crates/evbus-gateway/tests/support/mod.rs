//! Test harness: a gateway on a real socket, a real HTTP receiver, helpers.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use evbus::{Bus, Catalog, Transport};
use evbus_gateway::{Gateway, GatewayConfig, KeySpec, OutboundPolicy, SqliteStore, Store};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

pub const WAIT: Duration = Duration::from_secs(20);

/// The PostgreSQL of the PostgreSQL tests: `EVBUS_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("EVBUS_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `method url` with `key` as bearer token and `body` as JSON: the status and the answer as
/// JSON (a string when it is not JSON).
pub async fn request(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Whether the PostgreSQL at [`postgres_url`] answers. When it does not, the test fails under
/// CI=true or EVBUS_REQUIRE_BROKERS=1, and otherwise says loudly that it did not run.
pub async fn postgres_reachable() -> bool {
    match <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url()).await {
        Ok(conn) => {
            let _ = sqlx::Connection::close(conn).await;
            true
        }
        Err(e) => {
            let url = evbus::registry::redact(&postgres_url());
            assert!(
                !brokers_required(),
                "PostgreSQL at {url} is unreachable: {e}"
            );
            eprintln!(
                "WARNING: PostgreSQL at {url} is unreachable ({e}); this test did NOT run. \
                 Set EVBUS_POSTGRES_URL, or EVBUS_REQUIRE_BROKERS=1 to make this a failure."
            );
            false
        }
    }
}

/// CI=true or EVBUS_REQUIRE_BROKERS=1 (or `yes`, any case): a missing server fails the test.
pub fn brokers_required() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "1" || v == "true" || v == "yes"
        })
    })
}

pub fn schemas() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

pub fn catalog() -> Catalog {
    Catalog::from_dir(schemas()).unwrap()
}

/// Fast settings for tests: compressed schedule, quick polling, loopback allowed.
pub fn test_config() -> GatewayConfig {
    let mut c = GatewayConfig::default();
    c.retry_schedule = vec![
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_millis(100),
        Duration::from_millis(100),
        Duration::from_millis(100),
        Duration::from_millis(100),
    ];
    c.retry_jitter = 0.1;
    c.poll_interval = Duration::from_millis(50);
    c.delivery_timeout = Duration::from_secs(5);
    c.outbound = OutboundPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
    c
}

/// [`test_config`] for tests that hold a delivery with a [`HeldReceiver`] while they act:
/// an outbound timeout long enough that the held attempt never times out meanwhile, however
/// slow the machine.
pub fn holding_config() -> GatewayConfig {
    let mut c = test_config();
    c.delivery_timeout = Duration::from_secs(120);
    c
}

/// A gateway on the in-memory transport with [`holding_config`].
pub async fn holding_harness() -> Harness {
    Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        holding_config(),
    )
    .await
}

pub struct Harness {
    pub base: String,
    pub http: reqwest::Client,
    pub bus: Bus,
    pub store: Arc<SqliteStore>,
    pub dir: tempfile::TempDir,
    pub gateway: Arc<Gateway>,
    pub admin: String,
}

impl Harness {
    pub async fn memory() -> Harness {
        Self::with(
            Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
            test_config(),
        )
        .await
    }

    pub async fn with(transport: Arc<dyn Transport>, config: GatewayConfig) -> Harness {
        Self::with_catalog(transport, config, catalog()).await
    }

    pub async fn with_catalog(
        transport: Arc<dyn Transport>,
        config: GatewayConfig,
        catalog: Catalog,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        Self::with_store(transport, config, catalog, dir, store).await
    }

    /// A gateway on `store`, kept in `dir`.
    pub async fn with_store(
        transport: Arc<dyn Transport>,
        config: GatewayConfig,
        catalog: Catalog,
        dir: tempfile::TempDir,
        store: SqliteStore,
    ) -> Harness {
        let store = Arc::new(store);
        let bus = Bus::new(transport, catalog, "/test");
        let gateway = Arc::new(
            Gateway::start(bus.clone(), Arc::clone(&store) as Arc<dyn Store>, config)
                .await
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = gateway.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let (_, admin) =
            evbus_gateway::create_key(store.as_ref(), KeySpec::new("admin").admin(true))
                .await
                .unwrap();
        Harness {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            bus,
            store,
            dir,
            gateway,
            admin,
        }
    }

    /// A key with these scopes; one that may publish may use any `source` (see
    /// [`key_for_sources`](Self::key_for_sources)).
    pub async fn key(&self, subscribe: &[&str], publish: &[&str]) -> String {
        let sources: &[&str] = if publish.is_empty() { &[] } else { &["*"] };
        self.key_for_sources(subscribe, publish, sources).await
    }

    /// A key with these scopes, bound to these source patterns.
    pub async fn key_for_sources(
        &self,
        subscribe: &[&str],
        publish: &[&str],
        sources: &[&str],
    ) -> String {
        let spec = KeySpec::new("test")
            .subscribe(subscribe.iter().copied())
            .publish(publish.iter().copied())
            .sources(sources.iter().copied());
        let (_, key) = evbus_gateway::create_key(self.store.as_ref(), spec)
            .await
            .unwrap();
        key
    }

    /// Posts `event` as a structured CloudEvent to `POST /v1/events`; the status and the raw
    /// answer.
    pub async fn post_cloud_event(&self, key: &str, event: &Value) -> (StatusCode, String) {
        let resp = self
            .http
            .post(self.url("/v1/events"))
            .bearer_auth(key)
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.text().await.unwrap_or_default())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        request(&self.http, method, &self.url(path), key, body).await
    }

    /// Publishes through `POST /v1/events` with a fresh producer id (`client-<uuid>`).
    pub async fn publish(&self, key: &str, ty: &str, data: Value) -> (StatusCode, Value) {
        let id = format!("client-{}", uuid::Uuid::now_v7().simple());
        self.publish_with_id(key, &id, ty, data).await
    }

    /// Publishes through `POST /v1/events` with the producer id `id` and source `/external`.
    pub async fn publish_with_id(
        &self,
        key: &str,
        id: &str,
        ty: &str,
        data: Value,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url("/v1/events"))
            .bearer_auth(key)
            .header("content-type", "application/cloudevents+json")
            .body(json!({"specversion": "1.0", "id": id, "source": "/external", "type": ty, "datacontenttype": "application/json", "data": data}).to_string())
            .send()
            .await
            .unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn register(&self, key: &str, url: &str, types: &[&str]) -> (String, String) {
        let (status, body) = self
            .call(
                "POST",
                "/v1/webhooks",
                Some(key),
                Some(json!({"url": url, "event_types": types, "description": "test"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["secret"].as_str().unwrap().to_owned(),
        )
    }
}

/// A delivery as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: String,
}

impl Received {
    /// The `webhook-id` header: `msg_…` derived from the event's `source` and `id`
    /// (`evbus_gateway::signing::message_id`), the same on every retry and replay.
    pub fn webhook_id(&self) -> &str {
        self.headers["webhook-id"].to_str().unwrap()
    }
    /// The CloudEvent `id` of the body (one without JSON escapes), checked against the
    /// `webhook-id` it came with.
    pub fn id(&self) -> &str {
        #[derive(serde::Deserialize)]
        struct Ids<'a> {
            source: &'a str,
            id: &'a str,
        }
        let ids: Ids<'_> = serde_json::from_str(&self.body).expect("a source and an id");
        assert_eq!(
            self.webhook_id(),
            evbus_gateway::signing::message_id(ids.source, ids.id),
            "webhook-id of ({}, {})",
            ids.source,
            ids.id
        );
        ids.id
    }
    pub fn verify(&self, secret: &str) -> bool {
        let ts: i64 = self.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let sig = self.headers["webhook-signature"].to_str().unwrap();
        evbus_gateway::signing::verify(secret, self.webhook_id(), ts, self.body.as_bytes(), sig)
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A real HTTP receiver on 127.0.0.1:0 answering `status` (changeable).
pub struct Receiver {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    pub rx: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    pub async fn start(status: u16) -> Receiver {
        let status = Arc::new(AtomicU16::new(status));
        let (tx, rx) = mpsc::unbounded_channel();
        let s = Arc::clone(&status);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let s = Arc::clone(&s);
                let tx = tx.clone();
                async move {
                    // The answer is decided before the test hears of the request: a test that
                    // changes the answer once it saw a request changes the *next* one.
                    let code = StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap();
                    let _ = tx.send(Received { headers, body });
                    (code, "receiver says hi")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, status, rx }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a delivery in time")
            .unwrap()
    }
}

/// A receiver that holds every request until the test lets it go, then answers 500: the
/// test acts while an attempt is in flight.
pub struct HeldReceiver {
    pub url: String,
    pub arrived: mpsc::UnboundedReceiver<Received>,
    pub release: Arc<Semaphore>,
}

impl HeldReceiver {
    pub async fn start() -> HeldReceiver {
        let (tx, arrived) = mpsc::unbounded_channel();
        let release = Arc::new(Semaphore::new(0));
        let gate = Arc::clone(&release);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let tx = tx.clone();
                let gate = Arc::clone(&gate);
                async move {
                    let _ = tx.send(Received { headers, body });
                    gate.acquire().await.unwrap().forget();
                    (StatusCode::INTERNAL_SERVER_ERROR, "not now")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        HeldReceiver {
            url,
            arrived,
            release,
        }
    }

    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.arrived.recv())
            .await
            .expect("a delivery in time")
            .unwrap()
    }

    /// Lets every request go, now and later.
    pub fn open(&self) {
        self.release.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Waits until `f` holds, polling; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub const EMAIL: &str = "ada.secret@example.com";
pub const PHONE: &str = "+33-6-SECRET-PHONE";

pub fn order_created() -> Value {
    json!({
        "createdBy": "user-42",
        "order": {
            "_id": "ord_1", "referenceId": "R-10023", "shopId": "shop-1", "accountId": null,
            "email": EMAIL, "status": "new", "currencyCode": "EUR",
            "items": [{"productId": "p1", "variantId": "v1", "quantity": 1, "price": 10}],
            "shippingAddress": {"fullName": "Ada", "address1": "1 rue", "city": "Paris", "postal": "75001", "country": "FR", "phone": PHONE},
            "totals": {"subtotal": 10, "total": 10}, "createdAt": "2026-11-27T10:15:00Z"
        }
    })
}

pub fn cart_updated() -> Value {
    json!({"cartId": "c1"})
}

/// A gateway served by [`Gateway::serve`] (the accept loop `evbus serve` uses) on the memory
/// transport and a SQLite store in a temporary directory; it stops when this is dropped.
pub struct Served {
    pub addr: String,
    pub store: Arc<SqliteStore>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// Serves a gateway of `config` (see [`Served`]).
pub async fn served(config: GatewayConfig) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open_dir(dir.path()).await.unwrap());
    let bus = Bus::new(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        catalog(),
        "/test",
    );
    let gateway = Gateway::start(bus, Arc::clone(&store) as Arc<dyn Store>, config)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async move {
        let _ = stopped.await;
    }));
    Served {
        addr: addr.to_string(),
        store,
        _stop: stop,
        _dir: dir,
    }
}

/// Reads `stream` (a `/v1/stream` response) until what it has read satisfies `done`, within
/// [`WAIT`]; returns what it read.
pub async fn read_stream_until(
    stream: &mut reqwest::Response,
    done: impl Fn(&str) -> bool + Sync,
) -> String {
    let mut read = String::new();
    tokio::time::timeout(WAIT, async {
        while !done(&read) {
            let chunk = stream
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            read.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the stream brought what was waited for in time");
    read
}

/// A new SQLite gateway store at `path` with only the migrations before `version` applied:
/// the schema an earlier version of the gateway left (for tests of a migration).
pub async fn sqlite_store_before(path: &std::path::Path, version: i64) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut before = sqlx::migrate!("./migrations");
    let kept: Vec<_> = before
        .migrations
        .iter()
        .filter(|m| m.version < version)
        .cloned()
        .collect();
    assert!(!kept.is_empty(), "migrations before {version}");
    before.migrations = std::borrow::Cow::Owned(kept);
    before.run(&pool).await.unwrap();
    pool
}
