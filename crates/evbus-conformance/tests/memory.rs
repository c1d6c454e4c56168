//! The conformance suite against the in-memory transport, twice in one libtest run: called
//! directly (`[memory] <case>`), and through `Box<dyn Transport>` behind a transport layer
//! (`[memory-dyn] <case>`: the object-safe path applications use when they pick a broker from
//! a URL, with the `Faults` layer acting as a foreign producer, see `common`). Each suite gets
//! its own broker.
//!
//! `cargo test -p evbus-conformance --test memory -- --list` lists every case of both;
//! `cargo nextest run -p evbus-conformance` runs each in its own process.

mod common;

use std::process::ExitCode;

use evbus::Transport;
use evbus::memory::MemoryBroker;
use evbus_conformance::{Harness, Suite};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    Harness::new()
        .suite(|| {
            let broker = MemoryBroker::new(Default::default());
            Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
        })
        .suite(|| {
            let (broker, faults) = common::corrupting(&[]);
            let producer = common::Foreign(broker.clone());
            Suite::new("memory-dyn", move || {
                let transport: Box<dyn Transport> = Box::new(common::connect(&broker, &faults));
                std::future::ready(Ok(transport))
            })
            .with_raw_producer(producer)
        })
        .run()
}
