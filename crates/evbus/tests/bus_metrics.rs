//! Metrics through the `metrics` facade, read with a debugging recorder (process-wide, so
//! alone in its test binary).

mod bus_support;

use bus_support::*;
use evbus::bus::Message;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// One snapshot of every metric (a snapshot drains the recorder).
type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;
use tokio::sync::mpsc::unbounded_channel;

/// The value of counter `name` (or the number of samples of histogram `name`), summed over
/// the series carrying every label given.
fn counter(snap: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    snap.iter()
        .filter(|(k, ..)| {
            k.key().name() == name
                && labels.iter().all(|(l, v)| {
                    k.key()
                        .labels()
                        .any(|kl| kl.key() == *l && kl.value() == *v)
                })
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => *n,
            DebugValue::Histogram(h) => h.len() as u64,
            DebugValue::Gauge(_) => 0,
        })
        .sum()
}

#[tokio::test]
async fn emits_handlings_failures_retries_and_dead_letters_are_counted_by_type_and_group() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().unwrap();

    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    let tx2 = tx.clone();
    bus.on("orderPlaced", "flaky", move |msg: Message| {
        let tx = tx.clone();
        async move {
            if msg.attempt() == 1 {
                return Err("first attempt fails".into());
            }
            let _ = tx.send(());
            Ok(())
        }
    })
    .start()
    .await
    .unwrap();
    bus.on("orderPlaced", "broken", move |msg: Message| {
        let tx = tx2.clone();
        async move {
            if msg.is_last_attempt() {
                let _ = tx.send(());
            }
            Err("always".into())
        }
    })
    .max_attempts(2)
    .start()
    .await
    .unwrap();
    for i in 0..2 {
        bus.emit("orderPlaced", placed(&format!("o-{i}")))
            .await
            .unwrap();
    }
    for _ in 0..4 {
        recv(&mut rx).await;
    }
    let dlq = bus.dead_letter_queue_name("orderPlaced", "broken");
    drain_queue(&**bus.transport(), &dlq, 2).await;
    // Drained: every handling that started has been settled and counted.
    bus.shutdown(WAIT).await.unwrap();

    let snap: Snapshot = snap.snapshot().into_vec();
    let ty = ("type", "orderPlaced");
    assert_eq!(counter(&snap, "evbus_emitted_total", &[ty]), 2);
    assert_eq!(
        counter(&snap, "evbus_handled_total", &[ty, ("group", "flaky")]),
        2
    );
    assert_eq!(
        counter(&snap, "evbus_failed_total", &[ty, ("group", "flaky")]),
        2
    );
    assert_eq!(
        counter(&snap, "evbus_retried_total", &[ty, ("group", "flaky")]),
        2
    );
    assert_eq!(
        counter(&snap, "evbus_failed_total", &[ty, ("group", "broken")]),
        4
    );
    assert_eq!(
        counter(
            &snap,
            "evbus_dead_lettered_total",
            &[ty, ("group", "broken"), ("cause", "handler")]
        ),
        2
    );
    assert_eq!(
        counter(
            &snap,
            "evbus_handle_duration_seconds",
            &[ty, ("group", "flaky")]
        ),
        4
    );
}
