//! Backpressure across rebalances. A consumer far behind its application pauses fetching;
//! librdkafka keeps a partition's pause through a revocation and a later re-assignment. A
//! partition paused, moved to another member while the first one caught up (and resumed only
//! what it still had), then assigned back, must be fetched again. Found by `cargo xtask chaos
//! --adapter kafka` (docs/reliability.md), where such a partition stopped being read for good.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use evbus::{ConsumerOptions, Event, Transport};
use evbus_kafka::KafkaTransport;

/// More than the consumer's prefetch bound (512 records), so that it pauses.
const EVENTS: usize = 1500;

/// Connects with two partitions per topic, or `None` (test skipped) when no broker answers
/// and brokers are not required.
async fn connect() -> Option<KafkaTransport> {
    support::connect_with("partitions=2").await
}

/// Takes deliveries from `sub`, acking each, until none arrives for `quiet` or `until`
/// returns true; records every event id seen.
async fn drain(
    sub: &mut evbus::Subscription,
    seen: &mut HashSet<String>,
    quiet: Duration,
    until: impl Fn(&HashSet<String>) -> bool,
) {
    while !until(seen) {
        match tokio::time::timeout(quiet, sub.next_delivery()).await {
            Ok(Some(Ok(delivery))) => {
                seen.insert(delivery.event().id().to_owned());
                // A delivery of a partition revoked meanwhile cannot be acked (expired); it
                // comes back to its next owner.
                let _ = delivery.ack().await;
            }
            Ok(Some(Err(e))) => panic!("subscription error: {e}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_paused_revoked_and_assigned_back_is_read_again() {
    let Some(a) = connect().await else {
        return;
    };
    let name = format!("evbus-pause-{}", uuid::Uuid::now_v7().simple());
    let queue = a.queue(&name).await.expect("queue");
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| {
            Event::builder("pauseTest", "/tests")
                .json(&i)
                .and_then(|b| b.partition_key(format!("k{i}")).build())
                .expect("event")
        })
        .collect();
    for chunk in events.chunks(100) {
        queue.send_batch(chunk).await.expect("send");
    }
    let options = ConsumerOptions::default().max_in_flight(1);

    // A fetches past its prefetch bound and pauses both partitions: the test takes one
    // delivery, then leaves the rest queued.
    let mut ca = queue.receive(options.clone()).await.expect("receive A");
    let mut seen = HashSet::new();
    drain(&mut ca, &mut seen, Duration::from_secs(20), |s| {
        !s.is_empty()
    })
    .await;
    assert!(!seen.is_empty(), "A received nothing");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // B joins: one partition moves to B, which holds its deliveries without settling them.
    let b = connect().await.expect("B connects");
    let queue_b = b.queue(&name).await.expect("queue");
    let mut cb = queue_b.receive(options).await.expect("receive B");
    let first_b = tokio::time::timeout(Duration::from_secs(30), cb.next_delivery())
        .await
        .expect("B gets a partition and a delivery in time")
        .expect("B's subscription is open")
        .expect("a delivery");
    seen.insert(first_b.event().id().to_owned());

    // A catches up with the partition it kept and resumes fetching it.
    drain(&mut ca, &mut seen, Duration::from_secs(3), |s| {
        s.len() == EVENTS
    })
    .await;

    // B leaves: its partition goes back to A, which must fetch it again.
    drop(first_b);
    drop(cb);
    b.close().await.expect("close B");
    drain(&mut ca, &mut seen, Duration::from_secs(30), |s| {
        s.len() == EVENTS
    })
    .await;
    assert_eq!(
        seen.len(),
        EVENTS,
        "A stopped receiving after its paused partition came back ({} of {EVENTS} events seen)",
        seen.len()
    );
    drop(ca);
    a.close().await.expect("close A");
}
