#![doc = include_str!("../README.md")]

mod api;
pub mod curation;
mod datadir;
pub mod keys;
mod openapi;
mod portal;
pub mod problem;
mod ratelimit;
mod server;
pub mod signing;
pub mod ssrf;
pub mod store;
mod stream;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use evbus::bus::HandlerHandle;
use evbus::{Bus, Catalog};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use keys::NewKey;
pub use problem::Problem;
pub use ssrf::{HostResolver, OutboundPolicy, SystemResolver};
pub use store::{
    KeyRecord, PostgresStore, RateLimit, SecretsKey, SqliteStore, Store, StoreError, WebhookChange,
    WebhookRecord,
};

/// The Bus group through which the gateway consumes external event types. Every gateway
/// instance on one broker joins it, so each event is taken by one instance and queued once
/// per webhook endpoint in the shared store.
pub const WEBHOOK_GROUP: &str = "evbus-gateway-webhooks";

/// The retry schedule of webhook deliveries by default: the wait before each attempt
/// (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), each randomly lengthened or
/// shortened by up to [`GatewayConfig::retry_jitter`].
pub fn default_retry_schedule() -> Vec<Duration> {
    [0, 5, 300, 1_800, 7_200, 18_000, 36_000, 36_000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

/// Gateway settings. `Default` gives the documented production defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Largest request body accepted. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Deadline of every request except streams. Default 30 s.
    pub request_timeout: Duration,
    /// Requests per second allowed per API key (sustained), for keys without a
    /// [`RateLimit`] of their own ([`KeyRecord::rate_limit`]). Default 50. 0 counts as 1.
    pub rate_limit_per_second: u32,
    /// Burst of requests allowed per API key, for keys without a [`RateLimit`] of their own.
    /// Default 100. 0 counts as 1.
    pub rate_limit_burst: u32,
    /// Request-body bytes one API key may publish per second (`POST /v1/events`, the only
    /// publish route), besides its request rate: a body is charged with its length
    /// (`Content-Length`, else the bytes read) before any of it is parsed, and one over what
    /// is left is answered 429 with `Retry-After`, unparsed. Decoding and validating a large
    /// event is CPU on the request path, and the request rate alone let one key post
    /// [`max_body_bytes`](Self::max_body_bytes) 50 times a second. The burst is a second's
    /// worth and never less than `max_body_bytes`, so a body the gateway accepts always
    /// fits a full allowance. For keys without a rate of their own
    /// ([`KeyRecord::publish_bytes_per_second`]), per instance. Default 8 MiB/s: a burst of 8 bodies of the default 1 MiB, and a key at
    /// the default request rate (50/s) never meets it with events of up to 160 KiB.
    /// 0 counts as 1.
    pub publish_bytes_per_second: u64,
    /// Wait before each delivery attempt; its length is the number of attempts. Default
    /// [`default_retry_schedule`].
    pub retry_schedule: Vec<Duration>,
    /// Fraction (0 to 1) by which each wait is randomly changed. Default 0.2.
    pub retry_jitter: f64,
    /// Longest `Retry-After` honoured. Default 24 h.
    pub max_retry_after: Duration,
    /// An endpoint failing without a success for this long is disabled. Default 5 days.
    pub disable_after: Duration,
    /// Deadline of one outbound webhook request (connect included). Default 15 s.
    pub delivery_timeout: Duration,
    /// Deliveries in flight at once to one endpoint. Default 4.
    pub max_in_flight_per_endpoint: u32,
    /// Deliveries in flight at once in all. Default 64.
    pub max_in_flight: u32,
    /// Deliveries in flight at once to all the endpoints of one API key, so that one key's
    /// slow endpoints cannot hold every delivery slot. Default 16.
    pub max_in_flight_per_key: u32,
    /// How often the dispatcher looks for due deliveries when nothing wakes it. Default 1 s.
    pub poll_interval: Duration,
    /// How long a claimed delivery belongs to the instance that claimed it: if that instance
    /// dies mid-delivery, another instance sharing the store takes the delivery over once
    /// the lease has run out. Never shorter than twice
    /// [`delivery_timeout`](Self::delivery_timeout) plus 1 s (a shorter value is raised to
    /// that), so a live attempt keeps its lease. Default 60 s.
    pub delivery_lease: Duration,
    /// With a shared store (PostgreSQL): how often an instance looks at the store for events
    /// logged and keys revoked by the other instances, besides the store's push signals
    /// (`LISTEN/NOTIFY`). It bounds how long an open stream of a key revoked through another
    /// instance may go on when a signal is lost. Default 1 s.
    pub shared_poll_interval: Duration,
    /// Visibility timeout of the gateway's bus consumers: an event taken by an instance that
    /// died before logging it goes to another instance after this long. Default 30 s.
    pub bus_visibility_timeout: Duration,
    /// How long the previous secret keeps signing after a rotation. Default 24 h.
    pub secret_overlap: Duration,
    /// How long the event log keeps events (for stream resume and replay). Default 72 h.
    pub retention: Duration,
    /// Open streams at once. Default 1,000.
    pub max_streams: usize,
    /// Open streams at once per API key, so that one key cannot take every stream slot.
    /// Default 10.
    pub max_streams_per_key: usize,
    /// How fast the streams of one API key, together, read the event log while they catch up
    /// (resumed with `Last-Event-ID`, or behind the live fan-out), in bytes of curated events
    /// per second: resuming from an old id is a replay, and this is its budget. Live streams
    /// are not paced. Default 4 MiB/s (a key resuming after an hour at 1,000 events/s of 1 KiB
    /// catches up in about 15 minutes).
    pub stream_catch_up_bytes_per_second: u64,
    /// Open client connections at once. A connection above the limit is answered once
    /// (`/healthz` as usual, anything else `503`) and closed. Default 1,024.
    pub max_connections: usize,
    /// Open client connections at once from one address (an IPv6 address counts by its /64
    /// network), so that one host cannot take every connection slot. One above it is answered
    /// like one above [`max_connections`](Self::max_connections), naming this limit. Behind a
    /// proxy every connection comes from the proxy's address: raise it to `max_connections`
    /// there and cap per client in the proxy. Default 256.
    pub max_connections_per_address: usize,
    /// Longest wait for a request's headers, from the moment the connection is ready for a
    /// request: a half-sent request is dropped after it, and so is a kept-alive connection
    /// idle for that long. Also the longest a response write may make no progress (a client
    /// that does not read): the connection is then closed. Default 15 s.
    pub header_read_timeout: Duration,
    /// Pages of new events kept for streams that have caught up with the log (one read of
    /// the log feeds them all); a stream further behind reads the store itself until it
    /// catches up. A page is at most 100 events and 256 KiB of them (or one larger event).
    /// Default 64.
    pub stream_buffer_pages: usize,
    /// Interval of stream keep-alive comments. Default 15 s.
    pub stream_keepalive: Duration,
    /// Which outbound addresses webhooks may reach besides public ones.
    pub outbound: OutboundPolicy,
    /// The Bus group consuming external types. Default [`WEBHOOK_GROUP`].
    pub group: String,
    /// Webhooks one key may hold (an admin key too). Default 25.
    pub max_webhooks_per_key: usize,
    /// Event types one webhook may name. Default 50.
    pub max_types_per_webhook: usize,
    /// Pointers in one webhook's `allow`. Default 100.
    pub max_allow_per_webhook: usize,
    /// Largest body of a webhook registration. Default 64 KiB.
    pub max_webhook_body_bytes: usize,
    /// Events one replay request may queue. Default 10,000.
    pub max_replay_events: u32,
    /// Events replays may queue to one webhook within its replay window of
    /// [`REPLAY_WINDOW`] (24 h, opened by the first replay that queues an event): a replay
    /// beyond it queues what fits, and one with nothing left is answered 429 with the time
    /// the window ends. The webhooks of one key, deleted ones included, share this times
    /// [`max_webhooks_per_key`](Self::max_webhooks_per_key). Default 30,000 (three full
    /// replays a day). 0 counts as 1.
    pub max_replayed_per_day: u32,
}

/// The length of a webhook's replay window ([`GatewayConfig::max_replayed_per_day`]).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            publish_bytes_per_second: 8 * 1024 * 1024,
            retry_schedule: default_retry_schedule(),
            retry_jitter: 0.2,
            max_retry_after: Duration::from_secs(24 * 3600),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            delivery_timeout: Duration::from_secs(15),
            max_in_flight_per_endpoint: 4,
            max_in_flight: 64,
            max_in_flight_per_key: 16,
            poll_interval: Duration::from_secs(1),
            delivery_lease: Duration::from_secs(60),
            shared_poll_interval: Duration::from_secs(1),
            bus_visibility_timeout: Duration::from_secs(30),
            secret_overlap: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(72 * 3600),
            max_streams: 1_000,
            max_streams_per_key: 10,
            stream_catch_up_bytes_per_second: 4 * 1024 * 1024,
            max_connections: 1_024,
            max_connections_per_address: 256,
            header_read_timeout: Duration::from_secs(15),
            stream_buffer_pages: 64,
            stream_keepalive: Duration::from_secs(15),
            outbound: OutboundPolicy::default(),
            group: WEBHOOK_GROUP.to_owned(),
            max_webhooks_per_key: 25,
            max_types_per_webhook: 50,
            max_allow_per_webhook: 100,
            max_webhook_body_bytes: 64 * 1024,
            max_replay_events: 10_000,
            max_replayed_per_day: 30_000,
        }
    }
}

/// A gateway error at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus refused to attach a consumer.
    #[error("cannot consume from the bus: {0}")]
    Bus(#[from] evbus::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

/// Which event types exist for the outside, and what a key may do with them.
///
/// An internal or unknown type is treated exactly like a type outside the key's scope, so the
/// outside cannot tell them apart.
#[derive(Clone, Debug)]
pub struct Visibility {
    catalog: Catalog,
}

impl Visibility {
    /// Visibility over `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        Visibility { catalog }
    }

    /// Whether `ty` is an external type (`x-evbus-external: true` on its latest version).
    pub fn is_external(&self, ty: &str) -> bool {
        self.catalog.get(ty).is_some_and(|t| t.latest().external())
    }

    /// Whether `key` may subscribe to `ty` now.
    pub fn may_subscribe(&self, key: &KeyRecord, ty: &str) -> bool {
        self.is_external(ty) && keys::scope_allows(&key.subscribe, ty)
    }

    /// Whether `key` may publish `ty` now.
    pub fn may_publish(&self, key: &KeyRecord, ty: &str) -> bool {
        self.is_external(ty) && keys::scope_allows(&key.publish, ty)
    }

    /// The external types `key` may subscribe to, sorted.
    pub fn subscribable(&self, key: &KeyRecord) -> Vec<String> {
        let mut out: Vec<String> = self
            .catalog
            .event_types()
            .map(|t| t.name().to_owned())
            .filter(|t| self.may_subscribe(key, t))
            .collect();
        out.sort();
        out
    }

    /// Why some of `key`'s scope patterns may be mistakes: one line for each pattern that
    /// matches none of the catalogue's external types (a misspelt type, or one the catalogue
    /// does not have yet). Such a pattern is kept: it starts to match when a catalogue with
    /// the type is served.
    pub fn unmatched_scopes(&self, key: &KeyRecord) -> Vec<String> {
        let external = self.external_types();
        let lists = [("subscribe", &key.subscribe), ("publish", &key.publish)];
        lists
            .into_iter()
            .flat_map(|(scope, patterns)| {
                let external = &external;
                patterns
                    .iter()
                    .filter(move |p| !external.iter().any(|ty| keys::pattern_matches(p, ty)))
                    .map(move |p| {
                        format!(
                            "{scope} scope `{p}` matches none of the catalogue's {} external \
                             event types; it gives nothing until the catalogue has such a type",
                            external.len()
                        )
                    })
            })
            .collect()
    }

    /// The external types `key` may subscribe to or publish, sorted.
    pub fn usable(&self, key: &KeyRecord) -> Vec<String> {
        let mut out: Vec<String> = self
            .catalog
            .event_types()
            .map(|t| t.name().to_owned())
            .filter(|t| self.may_subscribe(key, t) || self.may_publish(key, t))
            .collect();
        out.sort();
        out
    }

    /// The external types, sorted.
    pub fn external_types(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .catalog
            .event_types()
            .map(|t| t.name().to_owned())
            .filter(|t| self.is_external(t))
            .collect();
        out.sort();
        out
    }
}

pub(crate) struct State {
    bus: Bus,
    store: Arc<dyn Store>,
    config: GatewayConfig,
    visibility: Visibility,
    client: reqwest::Client,
    /// Wakes the delivery dispatcher.
    dispatch: Notify,
    /// The last position of the event log, for streams.
    latest: watch::Sender<i64>,
    /// Bumped on every key revocation, so open streams re-check their key at once.
    revocations: watch::Sender<u64>,
    /// New pages of the log for streams that have caught up.
    fanout: stream::Fanout,
    /// Per-key request rate limits.
    limiters: ratelimit::Limiters,
    /// Per-key pace of streams catching up on the log.
    catch_up: ratelimit::ByteRate,
    /// Per-key allowance of published request-body bytes.
    publish_bytes: ratelimit::PublishRates,
    streams: Arc<Semaphore>,
    /// Open streams per key id.
    key_streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl State {
    pub(crate) fn now() -> DateTime<Utc> {
        Utc::now()
    }

    /// Authenticates a presented key: the record if it exists, matches and is active.
    pub(crate) async fn authenticate(
        &self,
        presented: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let Some((id, secret)) = keys::parse(presented) else {
            return Ok(None);
        };
        let Some(record) = self.store.get_key(id).await? else {
            // Same work as a found key, so timing does not tell whether an id exists.
            let _ = keys::verify(secret, &[0u8; 32]);
            return Ok(None);
        };
        let ok = keys::verify(secret, &record.secret_hash) && record.is_active(Self::now());
        Ok(ok.then_some(record))
    }

    /// Logs an event arriving from the bus (curated) and queues its webhook deliveries.
    async fn ingest(&self, event: &evbus::Event) -> Result<(), StoreError> {
        let Some(curated) = curation::curate_event(self.visibility_catalog(), event, None) else {
            return Ok(());
        };
        let body = curated
            .to_json()
            .map_err(|e| StoreError(format!("encoding a curated event: {e}")))?;
        let fingerprint = store::fingerprint([
            curated.ty().as_bytes(),
            curated.subject().unwrap_or_default().as_bytes(),
            curated.data().map(|d| d.as_ref()).unwrap_or_default(),
        ]);
        let new = store::NewEvent {
            source: curated.source(),
            id: curated.id(),
            ty: curated.ty(),
            fingerprint: &fingerprint,
            received_at: Self::now(),
            body: &body,
        };
        match self.store.ingest(&new).await? {
            store::Ingested::Logged(seq) => {
                metrics::counter!("evbus_gateway_events_logged_total", "type" => curated.ty().to_owned())
                    .increment(1);
                self.logged(seq);
                self.dispatch.notify_one();
            }
            store::Ingested::Redelivered => {}
            // Never silent: an event reusing another one's source and id is reported.
            store::Ingested::Conflict => {
                metrics::counter!("evbus_gateway_events_conflicting_total", "type" => curated.ty().to_owned())
                    .increment(1);
                tracing::warn!(
                    event_type = curated.ty(),
                    "an event reuses the source and id of a different logged event; it is not delivered (give every event a unique id per source)"
                );
            }
        }
        Ok(())
    }

    /// Moves the log position streams follow to `seq`: handlers of several types (and other
    /// instances) log concurrently, so the position only moves forward.
    fn logged(&self, seq: i64) {
        self.latest.send_if_modified(|at| {
            let newer = seq > *at;
            *at = (*at).max(seq);
            newer
        });
    }

    fn visibility_catalog(&self) -> &Catalog {
        &self.visibility.catalog
    }
}

/// A running gateway: the Bus consumers, the delivery dispatcher, the pruner and the HTTP
/// API ([`router`](Gateway::router)).
pub struct Gateway {
    state: Arc<State>,
    handlers: Vec<HandlerHandle>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.state.config)
            .field("store", &self.state.store)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts a gateway on `bus` with `store`: attaches one handler per external event type
    /// in the [`GatewayConfig::group`] Bus group and starts the delivery dispatcher.
    pub async fn start(
        bus: Bus,
        store: Arc<dyn Store>,
        config: GatewayConfig,
    ) -> Result<Gateway, GatewayError> {
        Self::start_with_metrics(bus, store, config, None).await
    }

    /// Like [`start`](Self::start), with a Prometheus handle rendered by `GET /metrics`.
    pub async fn start_with_metrics(
        bus: Bus,
        store: Arc<dyn Store>,
        config: GatewayConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Gateway, GatewayError> {
        // Every webhook must be readable (sealed secrets need their key): fail at start, not
        // at the first delivery.
        store.list_webhooks(None).await?;
        let visibility = Visibility::new(bus.catalog().clone());
        let policy = Arc::new(config.outbound.clone());
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(ssrf::CheckedResolver::new(Arc::clone(&policy))))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.delivery_timeout)
            .connect_timeout(config.delivery_timeout)
            .user_agent(concat!("evbus-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GatewayError::Client(e.to_string()))?;
        let default_limit = RateLimit {
            per_second: config.rate_limit_per_second.max(1),
            burst: config.rate_limit_burst.max(1),
        };
        let latest = store.latest_seq().await?;
        let state = Arc::new(State {
            bus: bus.clone(),
            store,
            visibility: visibility.clone(),
            client,
            dispatch: Notify::new(),
            latest: watch::channel(latest).0,
            revocations: watch::channel(0).0,
            fanout: stream::Fanout::new(config.stream_buffer_pages, latest),
            limiters: ratelimit::Limiters::new(default_limit),
            catch_up: ratelimit::ByteRate::catch_up(config.stream_catch_up_bytes_per_second),
            publish_bytes: ratelimit::PublishRates::new(
                config.publish_bytes_per_second,
                config.max_body_bytes,
            ),
            streams: Arc::new(Semaphore::new(config.max_streams)),
            key_streams: Arc::default(),
            metrics,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            config,
        });
        let mut handlers = Vec::new();
        for ty in visibility.external_types() {
            let st = Arc::clone(&state);
            let handle = bus
                .on(
                    ty,
                    state.config.group.clone(),
                    move |msg: evbus::Message| {
                        let st = Arc::clone(&st);
                        async move {
                            st.ingest(msg.event())
                                .await
                                .map_err(|e| Box::new(e) as evbus::bus::HandlerError)
                        }
                    },
                )
                .visibility_timeout(state.config.bus_visibility_timeout)
                .start()
                .await?;
            handlers.push(handle);
        }
        state.tasks.spawn(webhooks::dispatcher(Arc::clone(&state)));
        state.tasks.spawn(webhooks::pruner(Arc::clone(&state)));
        state.tasks.spawn(stream::fanout(Arc::clone(&state)));
        if state.store.shared() {
            state.tasks.spawn(follow_store(Arc::clone(&state)));
        }
        Ok(Gateway { state, handlers })
    }

    /// The HTTP API.
    pub fn router(&self) -> axum::Router {
        api::router(Arc::clone(&self.state))
    }

    /// Who may see what.
    pub fn visibility(&self) -> &Visibility {
        &self.state.visibility
    }

    /// Serves the API on `listener` until `signal` completes, then stops the gateway.
    ///
    /// Connections are HTTP/1.1, bounded by [`GatewayConfig::max_connections`] (in all and
    /// [per address](GatewayConfig::max_connections_per_address)) and
    /// [`GatewayConfig::header_read_timeout`]; `/healthz` answers even above the connection
    /// limits.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let cancel = self.state.cancel.clone();
        let stop = cancel.clone();
        let watcher = tokio::spawn(async move {
            tokio::select! {
                _ = signal => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
        let limits = server::Limits {
            max_connections: self.state.config.max_connections.max(1),
            max_connections_per_address: self.state.config.max_connections_per_address.max(1),
            header_read_timeout: self.state.config.header_read_timeout,
            drain: self.state.config.request_timeout,
        };
        let served = server::serve(listener, self.router(), limits, cancel).await;
        watcher.abort();
        self.shutdown().await;
        served
    }

    /// Stops consuming, lets deliveries in flight finish (bounded by the delivery timeout),
    /// ends open streams. Does not shut the bus down.
    pub async fn shutdown(&self) {
        self.state.cancel.cancel();
        for h in &self.handlers {
            let _ = h.shutdown(Duration::from_secs(5)).await;
        }
        self.state.tasks.close();
        let _ = tokio::time::timeout(
            self.state.config.delivery_timeout + Duration::from_secs(1),
            self.state.tasks.wait(),
        )
        .await;
    }
}

/// With a shared store: follows what the other instances do. Events they log move the log
/// position (streams and the fan-out read them) and wake the dispatcher; keys they revoke
/// make open streams check their key at once. Signals come as the store pushes them
/// ([`Store::signals`]), and the store is polled every
/// [`GatewayConfig::shared_poll_interval`] besides, for signals lost.
async fn follow_store(state: Arc<State>) {
    let mut signals = match state.store.signals().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the store's signals; polling it instead");
            None
        }
    };
    let mut revoked = state.store.revoked_keys().await.unwrap_or(0);
    let every = state
        .config
        .shared_poll_interval
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signal = tokio::select! {
            _ = state.cancel.cancelled() => return,
            _ = tick.tick() => None,
            s = async {
                match signals.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match s {
                Some(s) => Some(s),
                None => {
                    // The signal task ended: polling alone from now on.
                    signals = None;
                    continue;
                }
            },
        };
        match signal {
            Some(store::Signal::Logged(seq)) => {
                state.logged(seq);
                state.dispatch.notify_one();
            }
            Some(store::Signal::Revoked) => {
                revoked = state.store.revoked_keys().await.unwrap_or(revoked);
                state.revocations.send_modify(|n| *n += 1);
            }
            // A tick, or signals lost: look.
            _ => {
                match state.store.latest_seq().await {
                    Ok(seq) => state.logged(seq),
                    Err(e) => tracing::warn!(error = %e, "polling the shared store failed"),
                }
                if let Ok(n) = state.store.revoked_keys().await
                    && n != revoked
                {
                    revoked = n;
                    state.revocations.send_modify(|n| *n += 1);
                }
            }
        }
    }
}

/// What a new API key may do: the argument of [`create_key`].
///
/// ```
/// # use evbus_gateway::KeySpec;
/// let shop = KeySpec::new("shop")
///     .publish(["orderPlaced"])
///     .sources(["/shop", "https://shop.example/*"])
///     .subscribe(["order*"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySpec {
    /// Who or what uses the key.
    pub name: String,
    /// Event types (names or `*` patterns) the key may subscribe to.
    pub subscribe: Vec<String>,
    /// Event types (names or `*` patterns) the key may publish.
    pub publish: Vec<String>,
    /// The CloudEvents `source` values (exact, or `*` patterns) its published events may
    /// carry: required when [`publish`](Self::publish) is not empty
    /// ([`keys::check_sources`]).
    pub sources: Vec<String>,
    /// Whether the key may manage keys and read `/metrics`.
    pub admin: bool,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// Its own request rate limit; `None`: the gateway's default.
    pub rate_limit: Option<RateLimit>,
    /// Its own publish byte rate (1 to [`store::MAX_PUBLISH_BYTES_PER_SECOND`]); `None`: the
    /// gateway's default ([`GatewayConfig::publish_bytes_per_second`]).
    pub publish_bytes_per_second: Option<u64>,
}

impl KeySpec {
    /// A key named `name` that may do nothing yet.
    pub fn new(name: impl Into<String>) -> Self {
        KeySpec {
            name: name.into(),
            ..KeySpec::default()
        }
    }

    /// The event types it may subscribe to.
    pub fn subscribe<S: Into<String>>(mut self, types: impl IntoIterator<Item = S>) -> Self {
        self.subscribe = types.into_iter().map(Into::into).collect();
        self
    }

    /// The event types it may publish (it needs [`sources`](Self::sources) too).
    pub fn publish<S: Into<String>>(mut self, types: impl IntoIterator<Item = S>) -> Self {
        self.publish = types.into_iter().map(Into::into).collect();
        self
    }

    /// The sources its published events may carry.
    pub fn sources<S: Into<String>>(mut self, sources: impl IntoIterator<Item = S>) -> Self {
        self.sources = sources.into_iter().map(Into::into).collect();
        self
    }

    /// Whether it is an admin key.
    pub fn admin(mut self, admin: bool) -> Self {
        self.admin = admin;
        self
    }

    /// When it stops working.
    pub fn expires_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.expires_at = at;
        self
    }

    /// Its own request rate limit.
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Its own publish byte rate.
    pub fn publish_bytes_per_second(mut self, rate: Option<u64>) -> Self {
        self.publish_bytes_per_second = rate;
        self
    }
}

/// Creates an API key in `store` and returns it (the only time the full key exists). Scope
/// patterns, source patterns ([`keys::check_sources`]) and the rate limit are checked first:
/// a refused spec creates nothing.
pub async fn create_key(
    store: &dyn Store,
    spec: KeySpec,
) -> Result<(KeyRecord, String), StoreError> {
    let KeySpec {
        name,
        subscribe,
        publish,
        sources,
        admin,
        expires_at,
        rate_limit,
        publish_bytes_per_second,
    } = spec;
    if let Some(limit) = rate_limit {
        RateLimit::new(limit.per_second.into(), limit.burst.into()).map_err(StoreError)?;
    }
    if publish_bytes_per_second
        .is_some_and(|n| !(1..=store::MAX_PUBLISH_BYTES_PER_SECOND).contains(&n))
    {
        return Err(StoreError(format!(
            "the publish byte rate must be a whole number of bytes per second from 1 to {}",
            store::MAX_PUBLISH_BYTES_PER_SECOND
        )));
    }
    if subscribe.len().max(publish.len()) > keys::MAX_PATTERNS {
        return Err(StoreError(format!(
            "a key's scope lists hold at most {} patterns each",
            keys::MAX_PATTERNS
        )));
    }
    for p in subscribe.iter().chain(&publish) {
        if !keys::is_valid_pattern(p) {
            return Err(StoreError(format!(
                "`{p}` is not a valid scope pattern (letters, digits, `.`, `_`, `-`, `*`)"
            )));
        }
    }
    keys::check_sources(&publish, &sources).map_err(StoreError)?;
    let key = NewKey::generate();
    let record = KeyRecord {
        id: key.id().to_owned(),
        name,
        secret_hash: key.secret_hash(),
        subscribe,
        publish,
        sources,
        admin,
        // Milliseconds, as stored: the answer to the creation shows what a read shows later.
        created_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 3),
        expires_at,
        revoked_at: None,
        rate_limit,
        publish_bytes_per_second,
    };
    store.insert_key(&record).await?;
    Ok((record, key.expose()))
}
