//! Traces across the broker: OpenTelemetry with an in-memory exporter. Alone in its test
//! binary, so no other test caches tracing callsite interest without the subscriber.

mod bus_support;

use std::sync::Arc;
use std::time::Duration;

use bus_support::*;
use evbus::bus::Message;
use evbus::layer::{Fault, Faults, LayerExt};
use evbus::{Bus, ErrorKind};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc::unbounded_channel;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

async fn spans_named(
    provider: &SdkTracerProvider,
    exporter: &InMemorySpanExporter,
    names: &[&str],
) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().unwrap();
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans {names:?} not exported: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_handle_span_is_a_child_of_the_emit_span_across_the_broker() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("evbus-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let _ = tx.send(msg.traceparent().map(str::to_owned));
        async { Ok(()) }
    })
    .start()
    .await
    .unwrap();
    bus.emit("orderPlaced", placed("o-1"))
        .instrument(tracing::info_span!("http.request"))
        .await
        .unwrap();
    let traceparent = recv(&mut rx)
        .await
        .expect("the event carries a traceparent");

    let spans = spans_named(
        &provider,
        &exporter,
        &["http.request", "evbus.emit", "evbus.handle"],
    )
    .await;
    let find = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let (request, emit, handle) = (
        find("http.request"),
        find("evbus.emit"),
        find("evbus.handle"),
    );
    assert_eq!(emit.parent_span_id, request.span_context.span_id());
    assert_eq!(handle.parent_span_id, emit.span_context.span_id());
    assert_eq!(handle.span_context.trace_id(), emit.span_context.trace_id());
    assert!(
        traceparent.contains(&emit.span_context.span_id().to_string()),
        "{traceparent}"
    );
}

/// What a `tracing_subscriber::fmt` subscriber writes, kept in memory.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Collects the warnings (and errors) of this thread until the guard is dropped.
    fn warnings() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// How many times `needle` was written.
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs three events through a handler (concurrency 1, a 200 ms visibility timeout) whose
/// runs take `run`, and counts the warnings about runs near the visibility timeout.
async fn slow_run_warnings(prefetch: Option<usize>, run: Duration) -> usize {
    let (logs, _guard) = Logs::warnings();

    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    let handler = bus
        .on("orderPlaced", "g", move |_: Message| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(run).await;
                let _ = tx.send(());
                Ok(())
            }
        })
        .concurrency(1)
        .visibility_timeout(Duration::from_millis(200));
    let handler = match prefetch {
        Some(n) => handler.prefetch(n),
        None => handler,
    };
    handler.start().await.unwrap();
    for n in 0..3 {
        bus.emit("orderPlaced", placed(&format!("o-{n}")))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        recv(&mut rx).await;
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    logs.count("took over half the visibility timeout")
}

/// An ordered handler retries in place and holds its slot through the backoffs: two
/// instant failures with 150 ms backoffs hold it about 450 ms, over half a 200 ms visibility
/// timeout, though no single call takes any time. Warned once.
#[tokio::test(flavor = "current_thread")]
async fn an_ordered_handler_warns_when_its_retries_in_place_hold_a_slot_that_long() {
    let (logs, _guard) = Logs::warnings();

    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let _ = tx.send(msg.attempt());
        async move {
            if msg.attempt() < 3 {
                Err("not yet".into())
            } else {
                Ok(())
            }
        }
    })
    .ordered_by_key(true)
    .concurrency(1)
    .visibility_timeout(Duration::from_millis(200))
    .retry(
        evbus::bus::RetryPolicy::default()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(150))
            .jitter(0.0),
    )
    .start()
    .await
    .unwrap();
    bus.emit_batch([evbus::bus::Emit::new("orderPlaced", placed("o-1")).key("k")])
        .await
        .unwrap();
    for attempt in 1..=3 {
        assert_eq!(recv(&mut rx).await, attempt);
    }
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(logs.count("took over half the visibility timeout"), 1);
}

/// A run is not renewed, and the transport renews the events fetched ahead only while the
/// handler takes a delivery at least once a timeout: a prefetching handler whose runs take
/// over half the visibility timeout says so, once; one that fetches only for free slots, or
/// runs quickly, does not. At concurrency 1 and a 200 ms timeout: runs of 120 ms warn; runs
/// of 30 ms do not, with a prefetch of 4 either (the transport renews the four waiting,
/// which wait about 120 ms).
#[tokio::test(flavor = "current_thread")]
async fn a_prefetching_handler_warns_once_when_a_run_takes_half_the_visibility_timeout() {
    let slow = Duration::from_millis(120);
    assert_eq!(slow_run_warnings(None, slow).await, 1);
    assert_eq!(slow_run_warnings(Some(0), slow).await, 0);
    assert_eq!(slow_run_warnings(None, Duration::ZERO).await, 0);
    let short = Duration::from_millis(30);
    assert_eq!(slow_run_warnings(Some(4), short).await, 0);
    assert_eq!(slow_run_warnings(Some(4), slow).await, 1);
}

/// An ordered handler takes as many events as it has slots; those of one key wait behind
/// each other with their visibility timeout running. On a transport that cannot renew the
/// timeout (here the fault layer refusing every renewal as unsupported), past it they come
/// back and run again out of order (an outside review's finding), so the handler warns.
/// Four events of one key, runs of 120 ms, a visibility timeout of 400 ms: the fourth waits
/// about 360 ms, over half of it. Warned once; with events of four keys, nothing waits and
/// nothing is said; where renewals work (the memory transport itself), nothing is said
/// either: the waiting events are renewed.
#[tokio::test(flavor = "current_thread")]
async fn an_ordered_handler_warns_once_when_an_event_waits_half_its_timeout_unrenewed() {
    async fn run(keys: [&str; 4], renewals: bool) -> usize {
        let (logs, _guard) = Logs::warnings();
        let broker = broker();
        let faults = Faults::seeded(1);
        if !renewals {
            faults.arm(Fault::FailRenew(ErrorKind::Unsupported), 1.0, None);
        }
        let transport = Arc::new(broker.connect().layer(faults));
        let bus = Bus::builder(transport, catalog())
            .source("/test/shop")
            .build();
        let (tx, mut rx) = unbounded_channel();
        bus.on("orderPlaced", "g", move |_: Message| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(120)).await;
                let _ = tx.send(());
                Ok(())
            }
        })
        .ordered_by_key(true)
        .concurrency(4)
        .prefetch(0)
        .visibility_timeout(Duration::from_millis(400))
        .start()
        .await
        .unwrap();
        bus.emit_batch(
            keys.iter().enumerate().map(|(n, k)| {
                evbus::bus::Emit::new("orderPlaced", placed(&format!("o-{n}"))).key(*k)
            }),
        )
        .await
        .unwrap();
        for _ in 0..4 {
            recv(&mut rx).await;
        }
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        logs.count("waited over half its visibility timeout")
    }
    assert_eq!(run(["k", "k", "k", "k"], false).await, 1);
    assert_eq!(run(["a", "b", "c", "d"], false).await, 0);
    assert_eq!(run(["k", "k", "k", "k"], true).await, 0);
}
