//! The handler's span is a child of the emitter's span across Redis (W3C `traceparent`
//! carried in the stream entry).

use std::sync::Arc;
use std::time::Duration;

use evbus::Transport;
use evbus::bus::Message;
use evbus_integration_tests::{ORDER, bus};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "current_thread")]
async fn the_handle_span_is_a_child_of_the_emit_span_across_redis() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("evbus-it")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let url = format!(
        "{base}?prefix=evbus-it-trace-{}:",
        uuid::Uuid::now_v7().simple()
    );
    let transport: Arc<dyn Transport> = Arc::new(
        evbus_redis::RedisTransport::connect_url(&url)
            .await
            .unwrap(),
    );
    let bus = bus(Arc::clone(&transport), "traced");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bus.on(ORDER, "g", move |msg: Message| {
        let _ = tx.send(msg.id().to_owned());
        async { Ok(()) }
    })
    .start()
    .await
    .unwrap();
    let id = bus
        .emit(ORDER, serde_json::json!({"seq": 1, "flaky": false}))
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(id));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().unwrap();
        if spans.iter().any(|s| s.name == "evbus.handle") {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no evbus.handle span: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let find = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let (checkout, emit, handle) = (find("checkout"), find("evbus.emit"), find("evbus.handle"));
    assert_eq!(emit.parent_span_id, checkout.span_context.span_id());
    assert_eq!(handle.parent_span_id, emit.span_context.span_id());
    assert_eq!(
        handle.span_context.trace_id(),
        checkout.span_context.trace_id()
    );

    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    let cleanup: Arc<dyn Transport> = Arc::new(
        evbus_redis::RedisTransport::connect_url(&url)
            .await
            .unwrap(),
    );
    cleanup.delete_topic("traced").await.unwrap();
    for q in ["traced.g.dlq", "traced.g.redrive"] {
        cleanup.delete_queue(q).await.unwrap();
    }
    cleanup.close().await.unwrap();
}
