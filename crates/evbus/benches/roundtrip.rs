//! The in-memory round trip: `Topic::publish` → subscription → decode → `ack`, one event at a
//! time, on the in-memory transport; and the same through the Bus (`emit` → handler → ack,
//! with validation).
//!
//! ```text
//! cargo bench -p evbus --bench roundtrip
//! cargo bench -p evbus --bench roundtrip -- --warm-up-time 1 --measurement-time 3   # quick
//! ```

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use evbus::bus::{Bus, Message};
use evbus::memory::MemoryBroker;
use evbus::{Catalog, Event, SubscribeOptions, Transport};
use futures::StreamExt;
use serde_json::json;

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = json!([123, "x".repeat(248)]);
    let mut g = c.benchmark_group("in-memory round trip (256 B)");
    g.throughput(Throughput::Elements(1));

    let transport = MemoryBroker::new(Default::default()).connect();
    let (topic, mut sub) = runtime.block_on(async {
        let topic = transport.topic("bench").await.unwrap();
        let sub = topic
            .subscribe(SubscribeOptions::named("bench"))
            .await
            .unwrap();
        (topic, sub)
    });
    let event = Event::builder("benchSample", "/bench")
        .json(&data)
        .unwrap()
        .build()
        .unwrap();
    g.bench_function("topic publish → next → decode → ack", |b| {
        b.iter(|| {
            runtime.block_on(async {
                topic.publish(black_box(&event)).await.unwrap();
                let delivery = sub.next().await.unwrap().unwrap();
                let value: (u64, String) = delivery.event().json().unwrap();
                black_box(value);
                delivery.ack().await.unwrap();
            })
        })
    });

    let mut catalog = Catalog::builder();
    catalog
        .register_json(
            "benchSample",
            json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}),
        )
        .unwrap();
    let transport: Arc<dyn Transport> = Arc::new(MemoryBroker::new(Default::default()).connect());
    let bus = Bus::new(transport, catalog.freeze().unwrap(), "/bench");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    runtime.block_on(async {
        bus.on("benchSample", "bench", move |msg: Message| {
            let value: (u64, String) = msg.event().json().unwrap();
            black_box(value);
            let _ = tx.send(());
            async { Ok(()) }
        })
        .start()
        .await
        .unwrap();
    });
    g.bench_function("Bus emit (validated) → handler → ack", |b| {
        b.iter(|| {
            runtime.block_on(async {
                bus.emit("benchSample", black_box(data.clone()))
                    .await
                    .unwrap();
                rx.recv().await.unwrap();
            })
        })
    });
    g.finish();
    runtime
        .block_on(bus.shutdown(std::time::Duration::from_secs(5)))
        .unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
