//! A delivery kept after its subscription ended holds no librdkafka client of its own: the
//! state topic's reader (a second client, with its threads and sockets) was kept alive by
//! every delivery of the subscription until the last one went (outside review, 2026-12-07).
//! Its own test program: it counts the process's librdkafka threads.

mod support;

use std::time::{Duration, Instant};

use evbus::{ConsumerOptions, Event, Transport};

/// The threads librdkafka runs in this process (`rdk:main`, `rdk:broker…`, …).
fn librdkafka_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("rdk:"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_kept_after_its_subscription_ended_keeps_no_client_alive() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("WARNING: no /proc/self/task (not Linux): test not run");
        return;
    }
    let Some(transport) = support::connect_with("offset_state=state_topic&partitions=1").await
    else {
        return;
    };
    let name = format!("evbus-kept-{}", uuid::Uuid::now_v7().simple());
    let queue = transport.queue(&name).await.unwrap();
    let event = Event::builder("kept", "/tests")
        .json(&1)
        .and_then(|b| b.build())
        .unwrap();
    queue.send(&event).await.unwrap();
    let before = librdkafka_threads();

    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    let kept = support::next_within_20s(&mut sub, "the event").await;
    assert!(
        librdkafka_threads() > before,
        "the subscription runs no librdkafka client"
    );
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = librdkafka_threads();
        if now <= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the subscription ended, {now} librdkafka threads run ({before} before it)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(kept);
    transport.close().await.unwrap();
    let cleanup = support::connect_with("partitions=1")
        .await
        .expect("Kafka answered a moment ago");
    cleanup.delete_queue(&name).await.unwrap();
    cleanup.close().await.unwrap();
}
