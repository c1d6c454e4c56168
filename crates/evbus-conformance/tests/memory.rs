//! The conformance suite against the in-memory transport, twice: called directly, and through
//! `Box<dyn Transport>` (the object-safe path applications use when they pick a broker from a
//! URL). Each run gets its own broker.

use std::process::ExitCode;

use evbus::Transport;
use evbus::memory::MemoryBroker;
use evbus_conformance::Suite;

fn main() -> ExitCode {
    let direct = evbus_conformance::main(|| {
        let broker = MemoryBroker::new(Default::default());
        Suite::new("memory", move || std::future::ready(Ok(broker.connect())))
    });
    let boxed = evbus_conformance::main(|| {
        let broker = MemoryBroker::new(Default::default());
        Suite::new("memory-dyn", move || {
            let transport: Box<dyn Transport> = Box::new(broker.connect());
            std::future::ready(Ok(transport))
        })
    });
    if direct == ExitCode::SUCCESS {
        boxed
    } else {
        direct
    }
}
