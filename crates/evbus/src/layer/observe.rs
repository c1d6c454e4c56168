//! The observability layer: a `tracing` span around every publish and `metrics` counters for
//! what goes in and out of each destination, for any transport.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use super::{Destination, Layer, Next};
use crate::delivery::{Acker, RawDelivery};
use crate::envelope::Event;
use crate::error::Result;
use crate::raw::RawStream;

/// Traces and counts what passes through a transport.
///
/// Metrics (through the `metrics` facade; install any recorder):
///
/// | name | labels | what |
/// |---|---|---|
/// | `evbus_transport_published_total` | `transport`, `kind`, `destination`, `outcome` | events published (`ok` / the error kind) |
/// | `evbus_transport_delivered_total` | `transport`, `kind`, `destination` | deliveries handed to consumers |
/// | `evbus_transport_undecodable_total` | `transport`, `kind`, `destination` | messages that were not CloudEvents |
/// | `evbus_transport_settled_total` | `transport`, `kind`, `destination`, `settlement` | `ack`, `nack`, `nack_delayed`, each with `outcome` |
///
/// Spans: `evbus.transport.publish` with `destination`, `events` and the first event's id.
#[derive(Clone, Debug)]
pub struct Observe {
    transport: Arc<str>,
}

impl Observe {
    /// Labels every metric with `transport` (usually the adapter name).
    pub fn new(transport: impl Into<Arc<str>>) -> Self {
        Observe {
            transport: transport.into(),
        }
    }
}

fn labels(transport: &str, to: &Destination) -> Vec<(&'static str, String)> {
    vec![
        ("transport", transport.to_owned()),
        ("kind", to.kind().to_owned()),
        ("destination", to.name().to_owned()),
    ]
}

fn count(name: &'static str, labels: &[(&'static str, String)], n: u64) {
    metrics::counter!(name, labels).increment(n);
}

#[async_trait]
impl Layer for Observe {
    async fn publish(&self, to: &Destination, events: &[Event], next: Next<'_>) -> Result<()> {
        let span = tracing::debug_span!(
            "evbus.transport.publish",
            destination = %to,
            events = events.len(),
            first = events.first().map(Event::id).unwrap_or_default(),
        );
        let result = next.run(events).instrument(span).await;
        let mut labels = labels(&self.transport, to);
        let outcome = match &result {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.kind().as_str().to_owned(),
        };
        labels.push(("outcome", outcome));
        count(
            "evbus_transport_published_total",
            &labels,
            events.len() as u64,
        );
        result
    }

    fn deliveries(&self, from: &Destination, raw: RawStream) -> RawStream {
        let labels = Arc::new(labels(&self.transport, from));
        super::map_deliveries(raw, move |delivery: RawDelivery| {
            if delivery.event().is_none() {
                count("evbus_transport_undecodable_total", &labels, 1);
            } else {
                count("evbus_transport_delivered_total", &labels, 1);
            }
            let tag = delivery.tag();
            let inner = Arc::clone(delivery.acker());
            delivery.with_acker(
                Arc::new(CountingAcker {
                    inner,
                    labels: Arc::clone(&labels),
                }),
                tag,
            )
        })
    }
}

/// Counts settlements, then passes them on.
struct CountingAcker {
    inner: Arc<dyn Acker>,
    labels: Arc<Vec<(&'static str, String)>>,
}

impl CountingAcker {
    fn record(&self, settlement: &'static str, result: &Result<()>) {
        let mut labels = (*self.labels).clone();
        labels.push(("settlement", settlement.to_owned()));
        let outcome = match result {
            Ok(()) => "ok",
            Err(e) => e.kind().as_str(),
        };
        labels.push(("outcome", outcome.to_owned()));
        count("evbus_transport_settled_total", &labels, 1);
    }
}

#[async_trait]
impl Acker for CountingAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        let result = self.inner.ack(tag).await;
        self.record("ack", &result);
        result
    }

    fn try_ack_now(&self, tag: u64) -> Option<Result<()>> {
        let result = self.inner.try_ack_now(tag)?;
        self.record("ack", &result);
        Some(result)
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        let result = self.inner.nack(tag).await;
        self.record("nack", &result);
        result
    }

    fn native_delay(&self) -> bool {
        self.inner.native_delay()
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        let result = self.inner.nack_delayed(tag, delay).await;
        self.record("nack_delayed", &result);
        result
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        let result = self.inner.renew(tag).await;
        self.record("renew", &result);
        result
    }
}
