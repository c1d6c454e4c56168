//! `evbus-bench scenario NAME --events N`: one in-memory scenario whose measured part runs
//! inside [`evbus_bench_measured`] (callgrind collects only there; allocations are counted
//! there). xtask runs each with 1,000 and 2,000 events and divides the difference by 1,000:
//! the steady-state cost of one event, without setup, warm-up or teardown.
//!
//! - `emit-handle-validated`: `Bus::emit_json` of the Rust value (validated) → handler
//!   (validated again, decoded) → ack;
//! - `emit-handle`: the same with a permissive catalogue that has no schema for the type (no
//!   validation on either side): the Rust value is written straight to the event's bytes;
//! - `emit-typed-validated`: `emit-handle-validated` with a typed handler (`Bus::on_typed`)
//!   that is handed the data as an owned Rust value (the bench type with a `String`), as a
//!   typed consumer of a strict catalogue has it;
//! - `emit-value-handle`: `emit-handle` with the data handed to `Bus::emit` as a
//!   `serde_json::Value` (dynamic data, as the gateway has it), owned and dropped per event;
//! - `emit-ordered-handle`: `emit-value-handle` with a partition key on every event (1,000
//!   keys, in turn) sent to an ordered handler (`ordered_by_key(true)`): what per-key order
//!   costs (a lane per key, one event of a key running at a time);
//! - `consume-decode`: a subscription of a memory topic already holding the events: next →
//!   decode into the bench type → ack;
//! - `cold-start`: the whole of building the catalogue, the transport and the Bus, starting
//!   the handler and emitting the first event until it was handled (run with `--events 1`).
//!
//! The handlers count each receipt without reading the clock (no scenario reads a latency).
//!
//! Payloads are 256 bytes of JSON; a `-16` suffix (`consume-decode-16`, `emit-handle-16`)
//! runs the same scenario with 16-byte payloads, where decoding the payload costs least and
//! the figure is mostly the code's own.

use std::sync::Arc;
use std::time::Duration;

use evbus::bus::{Bus, Emit, Message};
use evbus::{Catalog, Event, SubscribeOptions, Transport};
use futures::StreamExt;

use crate::carriers::{CONCURRENCY, GROUP};
use crate::sample::{EVENT_TYPE, Generator, OwnedSample, Recorder, SOURCE, decode, schema};
use crate::{Result, evbus_bench_measured};

/// Payload size of the scenarios without a `-16` suffix.
const SIZE: usize = 256;
/// Payload size of the `-16` scenarios.
const SMALL: usize = 16;
/// Keys of `emit-ordered-handle`'s events (event `n` has key `k{n % KEYS}`).
const KEYS: usize = 1_000;

fn memory(events: usize) -> Arc<dyn Transport> {
    let mut config = evbus::memory::MemoryConfig::default();
    config.capacity = config.capacity.max(events);
    Arc::new(evbus::memory::MemoryBroker::new(config).connect())
}

fn catalog(validated: bool) -> Result<Catalog> {
    let mut builder = Catalog::builder();
    if validated {
        builder.register_json(EVENT_TYPE, schema())?;
    } else {
        builder.strict(false);
    }
    Ok(builder.freeze()?)
}

/// How the scenario's handler gets the payload.
#[derive(Clone, Copy, PartialEq)]
enum Handler {
    /// `Bus::on`: decodes the event's bytes into the borrowing bench type itself.
    Bytes,
    /// `Bus::on_typed`: handed an owned [`OwnedSample`].
    Typed,
}

async fn bus_with_handler(
    validated: bool,
    handler: Handler,
    recorder: Arc<Recorder>,
    events: usize,
    ordered: bool,
) -> Result<Bus> {
    let bus = Bus::builder(memory(events), catalog(validated)?)
        .source(SOURCE)
        .concurrency(CONCURRENCY)
        .build();
    let builder = match handler {
        Handler::Bytes => bus.on(EVENT_TYPE, GROUP, move |msg: Message| {
            let data = msg.event().data().map_or(&[][..], |d| &d[..]);
            recorder.received_untimed(decode(data));
            async { Ok(()) }
        }),
        Handler::Typed => bus.on_typed(GROUP, move |sample: OwnedSample, _: Message| {
            recorder.received_untimed(std::hint::black_box(sample).0);
            async { Ok(()) }
        }),
    };
    builder.ordered_by_key(ordered).start().await?;
    Ok(bus)
}

/// Lets spawned tasks (the acks after the last handler run) finish.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

pub(crate) fn run(full_name: &str, events: usize) -> Result<()> {
    let (name, size) = match full_name.strip_suffix("-16") {
        Some(base) => (base, SMALL),
        None => (full_name, SIZE),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let generator = Generator::new();
    let timeout = Duration::from_secs(600);
    let (result, allocs) = match name {
        "emit-handle-validated"
        | "emit-typed-validated"
        | "emit-handle"
        | "emit-value-handle"
        | "emit-ordered-handle" => {
            let validated = name.ends_with("-validated");
            let handler = match name {
                "emit-typed-validated" => Handler::Typed,
                _ => Handler::Bytes,
            };
            let ordered = name == "emit-ordered-handle";
            let recorder = Recorder::new(events);
            let bus = runtime.block_on(bus_with_handler(
                validated,
                handler,
                Arc::clone(&recorder),
                events,
                ordered,
            ))?;
            let samples = (0..events as u64)
                .map(|seq| generator.sample(seq, size))
                .collect::<Vec<_>>();
            let values = match name {
                "emit-value-handle" | "emit-ordered-handle" => samples
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            // The ordered scenario's events: the same values, each with one of `KEYS` keys
            // (made before the measured part).
            let (values, keyed) = if ordered {
                let keyed = values
                    .into_iter()
                    .enumerate()
                    .map(|(seq, value)| {
                        Emit::new(EVENT_TYPE, value).key(format!("k{}", seq % KEYS))
                    })
                    .collect();
                (Vec::new(), keyed)
            } else {
                (values, Vec::new())
            };
            let out = evbus_bench_measured(|| {
                runtime.block_on(async {
                    if values.is_empty() && keyed.is_empty() {
                        for sample in &samples {
                            bus.emit_json(EVENT_TYPE, sample).await?;
                        }
                    }
                    for value in values {
                        bus.emit(EVENT_TYPE, value).await?;
                    }
                    for emit in keyed {
                        bus.send(emit).await?;
                    }
                    let done = recorder.wait(timeout).await;
                    settle().await;
                    Ok::<bool, crate::Error>(done)
                })
            });
            runtime.block_on(bus.shutdown(Duration::from_secs(5)))?;
            out
        }
        "consume-decode" => {
            let transport = memory(events);
            let (topic, mut subscription) = runtime.block_on(async {
                let topic = transport.topic("bench").await?;
                let subscription = topic
                    .subscribe(
                        SubscribeOptions::named(GROUP)
                            .consumer(evbus::ConsumerOptions::default().max_in_flight(CONCURRENCY)),
                    )
                    .await?;
                let batch = (0..events as u64)
                    .map(|seq| {
                        Event::builder(EVENT_TYPE, SOURCE)
                            .json(&generator.sample(seq, size))?
                            .build()
                    })
                    .collect::<evbus::Result<Vec<_>>>()?;
                topic.publish_batch(&batch).await?;
                Ok::<_, crate::Error>((topic, subscription))
            })?;
            let out = evbus_bench_measured(|| {
                runtime.block_on(async {
                    let mut got = 0;
                    while got < events {
                        let Some(delivery) = subscription.next().await else {
                            break;
                        };
                        let delivery = delivery?;
                        let data = delivery.event().data().map_or(&[][..], |d| &d[..]);
                        std::hint::black_box(decode(data));
                        delivery.ack().await?;
                        got += 1;
                    }
                    Ok::<bool, crate::Error>(got == events)
                })
            });
            drop((topic, subscription));
            out
        }
        "cold-start" => evbus_bench_measured(|| {
            runtime.block_on(async {
                let recorder = Recorder::new(events);
                let bus =
                    bus_with_handler(true, Handler::Bytes, Arc::clone(&recorder), events, false)
                        .await?;
                for seq in 0..events as u64 {
                    bus.emit(
                        EVENT_TYPE,
                        serde_json::to_value(generator.sample(seq, size))?,
                    )
                    .await?;
                }
                let done = recorder.wait(timeout).await;
                settle().await;
                Ok::<bool, crate::Error>(done)
            })
        }),
        other => {
            return Err(format!(
                "unknown scenario `{other}`: emit-handle-validated, emit-typed-validated, \
                 emit-handle, emit-value-handle, emit-ordered-handle, consume-decode, cold-start \
                 (a `-16` suffix: 16-byte payloads)"
            )
            .into());
        }
    };
    if !result? {
        return Err(format!("scenario {full_name}: not every event was handled").into());
    }
    println!(
        "scenario {full_name} events {events} allocations {} reallocations {} bytes {}",
        allocs.allocations, allocs.reallocations, allocs.bytes_allocated
    );
    Ok(())
}
