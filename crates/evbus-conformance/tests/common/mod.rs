//! A foreign producer for the in-memory transport. The memory broker stores `Event`s, so a
//! message that is not a CloudEvent cannot be written to it; instead the producer sends an
//! event of type [`FOREIGN_TYPE`], and the `Faults` layer in front of every connection turns
//! each delivery of that type into an undecodable message, exactly what a consumer sees when a
//! foreign producer wrote garbage.

use async_trait::async_trait;
use evbus::layer::{Fault, Faults, LayerExt, Layered};
use evbus::memory::MemoryBroker;
use evbus::{Event, Transport};
use evbus_conformance::RawProducer;

/// The type the layer corrupts on delivery.
pub(crate) const FOREIGN_TYPE: &str = "evbus.conformance.foreign";

/// A memory broker whose connections corrupt deliveries of [`FOREIGN_TYPE`], plus any
/// `extra` faults.
pub(crate) fn corrupting(extra: &[(Fault, f64)]) -> (MemoryBroker, Faults) {
    let mut faults = Faults::seeded(7).inject_for_type(Fault::CorruptDelivery, 1.0, FOREIGN_TYPE);
    for (fault, rate) in extra {
        faults = faults.inject(fault.clone(), *rate);
    }
    (MemoryBroker::new(Default::default()), faults)
}

/// A new connection to `broker` behind `faults`.
pub(crate) fn connect(broker: &MemoryBroker, faults: &Faults) -> Layered<Faults> {
    broker.connect().layer(faults.clone())
}

/// Sends [`FOREIGN_TYPE`] events past the layer, straight to the broker.
pub(crate) struct Foreign(pub(crate) MemoryBroker);

#[async_trait]
impl RawProducer for Foreign {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        let transport = self.0.connect();
        let event = Event::builder(FOREIGN_TYPE, "/foreign-producer")
            .data("application/octet-stream", &b"\xff not a cloudevent"[..])
            .build()?;
        transport.queue(queue).await?.send(&event).await?;
        transport.close().await
    }
}
