//! Shared by the `bus_*` tests: a small catalogue, a fresh in-memory broker per test, and
//! bounded waits.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use evbus::bus::{Bus, RetryPolicy};
use evbus::memory::MemoryBroker;
use evbus::{Catalog, CatalogBuilder, ConsumerOptions, Event, Subscription, Transport};
use serde_json::json;

/// Bound for anything expected to happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// `orderPlaced {orderId, total >= 0}`, `orderCanceled {orderId, reason}`.
pub fn catalog() -> Catalog {
    catalog_builder().freeze().unwrap()
}

/// [`catalog`]'s builder, before it is frozen.
pub fn catalog_builder() -> CatalogBuilder {
    let mut b = Catalog::builder();
    b.register_json(
        "orderPlaced",
        json!({
            "type": "object",
            "properties": {"orderId": {"type": "string"}, "total": {"type": "number", "minimum": 0}},
            "required": ["orderId", "total"]
        }),
    )
    .unwrap();
    b.register_json(
        "orderCanceled",
        json!({
            "type": "object",
            "properties": {"orderId": {"type": "string"}, "reason": {"type": "string"}},
            "required": ["orderId", "reason"]
        }),
    )
    .unwrap();
    b
}

/// A new broker; `connect()` opens another "instance" on it.
pub fn broker() -> MemoryBroker {
    MemoryBroker::new(Default::default())
}

/// A bus on a new connection to `broker`, with fast retries (10 ms, no jitter).
pub fn bus(broker: &MemoryBroker) -> Bus {
    Bus::builder(Arc::new(broker.connect()), catalog())
        .source("/test/shop")
        .retry(fast_retry())
        .build()
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy::default()
        .initial_backoff(Duration::from_millis(10))
        .jitter(0.0)
}

pub fn placed(order: &str) -> serde_json::Value {
    json!({"orderId": order, "total": 10})
}

/// Receives `n` events from a queue (acking them) within [`WAIT`].
pub async fn drain_queue(transport: &dyn Transport, queue: &str, n: usize) -> Vec<Event> {
    let q = transport.queue(queue).await.unwrap();
    let mut sub = q
        .receive(ConsumerOptions::default().max_attempts(100))
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let d = next(&mut sub).await;
        out.push(d.event().clone());
        d.ack().await.unwrap();
    }
    out
}

pub async fn next(sub: &mut Subscription) -> evbus::Delivery {
    tokio::time::timeout(WAIT, sub.next_delivery())
        .await
        .expect("a delivery within the wait")
        .expect("the subscription is open")
        .expect("no subscription error")
}

/// Awaits `rx` for one value within [`WAIT`].
pub async fn recv<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a value within the wait")
        .expect("the sender is alive")
}

/// Fails if `rx` yields anything within a short window (call after a marker proved the
/// pipeline flows).
pub async fn expect_nothing<T: std::fmt::Debug>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) {
    if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        panic!("nothing more was expected, got {v:?}");
    }
}
