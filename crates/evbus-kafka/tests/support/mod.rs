//! Test helpers shared by the integration tests: a tansu broker process the test owns, behind
//! a TCP proxy the test controls, and the test URL settings.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evbus_conformance::process::{BrokerProcess, accepts_connections, free_port};
use evbus_kafka::KafkaConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The Kafka URL under test: `EVBUS_KAFKA_URL`, default `kafka://127.0.0.1:9092`.
pub fn kafka_url() -> String {
    std::env::var("EVBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned())
}

/// A config for tests: short group timings so that a vanished consumer's partitions move
/// quickly, unless the URL sets them. 6 s is Apache Kafka's default
/// `group.min.session.timeout.ms`, the shortest a stock broker accepts.
pub fn test_config(url: &str) -> evbus::Result<KafkaConfig> {
    let mut config = KafkaConfig::from_url(url)?;
    if !url.contains("session_timeout_ms") {
        config.session_timeout = Duration::from_secs(6);
    }
    if !url.contains("heartbeat_interval_ms") {
        config.heartbeat_interval = Duration::from_millis(300);
    }
    if !url.contains("message_timeout_ms") {
        config.message_timeout = Duration::from_secs(20);
    }
    Ok(config)
}

/// Connects to [`kafka_url`] with `params` added to its query, or `None` (the test is then
/// skipped, loudly) when no broker answers and brokers are not required.
pub async fn connect_with(params: &str) -> Option<evbus_kafka::KafkaTransport> {
    let base = kafka_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let config = test_config(&format!("{base}{sep}{params}")).expect("test URL");
    match evbus_kafka::KafkaTransport::connect(config).await {
        Ok(t) => Some(t),
        Err(e) if !evbus_conformance::require_brokers() => {
            eprintln!("WARNING: Kafka unreachable, test not run: {e}");
            None
        }
        Err(e) => panic!("Kafka unreachable: {e}"),
    }
}

/// An event of type `ty` whose data is the JSON number `i`.
pub fn numbered(ty: &str, i: u32) -> evbus::Event {
    evbus::Event::builder(ty, "/tests")
        .json(&i)
        .and_then(|b| b.build())
        .expect("event")
}

/// The next delivery of `sub` within 20 s; panics naming `what` otherwise.
pub async fn next_within_20s(sub: &mut evbus::Subscription, what: &str) -> evbus::Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.next_delivery())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 20 s"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Where the tansu binary is: `EVBUS_TANSU_BIN`, the xtask cache
/// (`~/.cache/evbus/tansu/tansu`), or `tansu` on `PATH`.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("EVBUS_TANSU_BIN") {
        return Some(PathBuf::from(path));
    }
    let cached = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/evbus/tansu/tansu"))
        .filter(|p| p.is_file());
    cached.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("tansu"))
                .find(|p| p.is_file())
        })
    })
}

/// A tansu broker on a free port, reachable only through a [`Proxy`] whose address it
/// advertises. Killed on drop.
pub struct TansuBehindProxy {
    pub proxy: Proxy,
    broker: BrokerProcess,
}

impl TansuBehindProxy {
    /// Starts the proxy, then tansu (memory storage) behind it. Needs a tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let binary = tansu_binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no tansu binary: run `cargo xtask brokers --start` or set EVBUS_TANSU_BIN",
            )
        })?;
        let broker_port = free_port()?;
        let proxy = Proxy::start(broker_port).await?;
        let advertised = format!("tcp://127.0.0.1:{}", proxy.port);
        let builder = BrokerProcess::builder("tansu", move |_, port| {
            let mut command = Command::new(&binary);
            command
                .arg("broker")
                .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
                .args(["--advertised-listener-url", &advertised])
                .args(["--storage-engine", "memory://tansu/"]);
            command
        })
        .port(broker_port)
        .log_file("tansu.log")
        .ready_when(Duration::from_secs(30), accepts_connections);
        let broker = tokio::task::spawn_blocking(move || builder.start())
            .await
            .map_err(std::io::Error::other)??;
        Ok(TansuBehindProxy { proxy, broker })
    }

    /// The URL clients use: the proxy's address.
    pub fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.proxy.port)
    }
}

/// A TCP proxy the test controls: [`cut`](Self::cut) drops every connection and refuses new
/// ones (accepts and closes them at once) until [`restore`](Self::restore);
/// [`cut_at_request`](Self::cut_at_request) does so when a client sends a given request.
pub struct Proxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    accept: AbortHandle,
}

#[derive(Default)]
struct ProxyShared {
    cut: AtomicBool,
    connections: Mutex<Vec<AbortHandle>>,
    /// The Kafka API key whose next request cuts, and for how long.
    trap: Mutex<Option<(i16, Duration)>>,
    /// Whether the trap went off.
    sprung: AtomicBool,
}

impl ProxyShared {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Proxy {
    /// Listens on a free port and forwards every connection to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(ProxyShared::default());
        let accept = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if shared.cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(forward(client, upstream, Arc::clone(&shared)));
                    let mut open = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
                    open.retain(|t| !t.is_finished());
                    open.push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Ok(Proxy {
            port,
            shared,
            accept,
        })
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.shared.cut();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Cuts (as [`cut`](Self::cut)) for `pause` when a client next sends a request with Kafka
    /// API key `api_key` (9: OffsetFetch), which never reaches the broker.
    pub fn cut_at_request(&self, api_key: i16, pause: Duration) {
        *self.shared.trap.lock().unwrap_or_else(|p| p.into_inner()) = Some((api_key, pause));
    }

    /// Whether a [`cut_at_request`](Self::cut_at_request) went off.
    pub fn sprung(&self) -> bool {
        self.shared.sprung.load(Ordering::SeqCst)
    }
}

/// Forwards one connection, request frame by request frame towards the broker (a Kafka
/// request: a 4-byte length, then the API key first).
async fn forward(client: TcpStream, upstream: u16, shared: Arc<ProxyShared>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    let up = async {
        loop {
            let mut length = [0u8; 4];
            client_read.read_exact(&mut length).await?;
            let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
            client_read.read_exact(&mut frame).await?;
            let api_key = frame.get(..2).map(|k| i16::from_be_bytes([k[0], k[1]]));
            let sprung = {
                let mut trap = shared.trap.lock().unwrap_or_else(|p| p.into_inner());
                match *trap {
                    Some((key, pause)) if Some(key) == api_key => trap.take().map(|_| pause),
                    _ => None,
                }
            };
            if let Some(pause) = sprung {
                shared.sprung.store(true, Ordering::SeqCst);
                shared.cut();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    shared.cut.store(false, Ordering::SeqCst);
                });
                return Ok::<(), std::io::Error>(());
            }
            server_write.write_all(&length).await?;
            server_write.write_all(&frame).await?;
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut();
    }
}
