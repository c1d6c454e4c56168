//! Traces across the broker: OpenTelemetry with an in-memory exporter. Alone in its test
//! binary, so no other test caches tracing callsite interest without the subscriber.

mod bus_support;

use std::time::Duration;

use bus_support::*;
use evbus::bus::Message;
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
