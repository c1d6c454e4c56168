//! Envelope encode/decode: the CloudEvents structured JSON format and the binary-mode binding
//! (headers + body, as the adapters write it), for a 256 B and a 1 KiB JSON payload.
//!
//! ```text
//! cargo bench -p evbus --bench envelope
//! cargo bench -p evbus --bench envelope -- --warm-up-time 1 --measurement-time 3   # quick
//! ```

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use evbus::Event;
use evbus::binding::{self, HeaderStyle};
use serde_json::json;

fn event(size: usize) -> Event {
    // `[seq,"xxx…"]` padded to exactly `size` bytes, as the evbus-bench payloads.
    let pad = "x".repeat(size - 8);
    let data = json!([123, pad]);
    assert_eq!(serde_json::to_vec(&data).unwrap().len(), size);
    Event::builder("afterOrderCreate", "/shop/orders")
        .json(&data)
        .unwrap()
        .partition_key("ord-42")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    for size in [256, 1024] {
        let event = event(size);
        let mut g = c.benchmark_group(format!("envelope {size} B"));
        g.throughput(Throughput::Elements(1));

        let text = event.to_json().unwrap();
        g.bench_function("structured encode (to_json)", |b| {
            b.iter(|| black_box(&event).to_json().unwrap())
        });
        g.bench_function("structured decode (from_json)", |b| {
            b.iter(|| Event::from_json(black_box(&text)).unwrap())
        });

        let (headers, body) = binding::encode(&event, HeaderStyle::KAFKA);
        assert_eq!(
            binding::decode(headers.clone(), body.clone(), HeaderStyle::KAFKA).unwrap(),
            event
        );
        g.bench_function("binary encode (binding::encode)", |b| {
            b.iter(|| binding::encode(black_box(&event), HeaderStyle::KAFKA))
        });
        g.bench_function("binary decode (binding::decode)", |b| {
            b.iter(|| {
                binding::decode(
                    black_box(headers.clone()),
                    black_box(body.clone()),
                    HeaderStyle::KAFKA,
                )
                .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
