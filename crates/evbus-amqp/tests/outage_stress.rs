//! Stress: a named subscription and a publisher across several hard kills of a RabbitMQ node
//! this test starts itself (see `support::RabbitNode`). Every publish that returned `Ok` must
//! reach the subscriber; when one does not, the test says where it went (the subscription's
//! dead-letter queue, or nowhere).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evbus::{ConsumerOptions, Event, SubscribeOptions, Transport};
use tokio::time::Instant;

const OUTAGES: usize = 4;
const PUBLISHES_BETWEEN_OUTAGES: usize = 40;

/// The adapter options of the stress test's transports.
const OPTIONS: &str = "reconnect_max_delay_ms=1000&command_timeout_ms=5000&connect_timeout_ms=2000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_topic_publishes_survive_repeated_hard_kills() {
    // Same rule as the conformance suite's outage cases: without a local `rabbitmq-server`
    // there is nothing to kill.
    let Some(node) = support::start_node() else {
        return;
    };
    let consumer = support::transport(&node, OPTIONS).await;
    let publisher = support::transport(&node, OPTIONS).await;
    let topic_name = format!("stress-{}", std::process::id());
    let topic = consumer.topic(&topic_name).await.expect("topic");
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut sub = topic
        .subscribe(SubscribeOptions::named("s").consumer(options.clone()))
        .await
        .expect("subscribe");

    // What the subscriber saw: event id -> highest attempt.
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen_by_consumer = Arc::clone(&seen);
    let consuming = tokio::spawn(async move {
        while let Some(item) = sub.next_delivery().await {
            if let Ok(d) = item {
                let _ = d.ack().await;
                let mut seen = seen_by_consumer.lock().unwrap();
                let attempt = seen.entry(d.event().id().to_owned()).or_insert(0);
                *attempt = (*attempt).max(d.attempt());
            }
        }
    });

    let topic = publisher.topic(&topic_name).await.expect("topic");
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let accepted_by_publisher = Arc::clone(&accepted);
    let stop = tokio_util::sync::CancellationToken::new();
    let stop_publishing = stop.clone();
    let publishing = tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop_publishing.is_cancelled() {
            seq += 1;
            let event = Event::builder("stress", "/stress")
                .json(&seq)
                .unwrap()
                .build()
                .unwrap();
            loop {
                match topic.publish(&event).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("a publish failed with a non-retryable error: {e}"),
                }
            }
            accepted_by_publisher
                .lock()
                .unwrap()
                .push(event.id().to_owned());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    for outage in 0..OUTAGES {
        let target = (outage + 1) * PUBLISHES_BETWEEN_OUTAGES;
        let give_up = Instant::now() + Duration::from_secs(120);
        while accepted.lock().unwrap().len() < target {
            assert!(
                Instant::now() < give_up,
                "publishing did not resume after outage {outage}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node = Arc::clone(&node);
        tokio::task::spawn_blocking(move || {
            node.sync_ra_registry().expect("sync Ra registry");
            node.kill();
            // The length of the outage, not an assertion.
            std::thread::sleep(Duration::from_secs(2));
            node.restart().expect("restart the node");
        })
        .await
        .unwrap();
    }
    let target = (OUTAGES + 1) * PUBLISHES_BETWEEN_OUTAGES;
    let give_up = Instant::now() + Duration::from_secs(120);
    while accepted.lock().unwrap().len() < target {
        assert!(
            Instant::now() < give_up,
            "publishing did not resume after the last outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    publishing.await.unwrap();
    let accepted: Vec<String> = accepted.lock().unwrap().clone();

    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: Vec<String> = {
            let seen = seen.lock().unwrap();
            accepted
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    consuming.abort();

    if !missing.is_empty() {
        // Where did they go? Drain the subscription's dead-letter queue.
        let dlq_name = evbus::dead_letter_queue_name(&topic_name, Some("s"), &options);
        let mut dead = HashMap::new();
        if let Ok(dlq) = consumer.queue(&dlq_name).await
            && let Ok(mut dlq_sub) = dlq.receive(ConsumerOptions::default()).await
        {
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), dlq_sub.next_delivery()).await
            {
                let reason = d
                    .event()
                    .extension(evbus::delivery::DEAD_LETTER_REASON)
                    .unwrap_or("?")
                    .to_owned();
                dead.insert(d.event().id().to_owned(), reason);
                let _ = d.ack().await;
            }
        }
        let missing: HashSet<&String> = missing.iter().collect();
        let report: Vec<String> = missing
            .iter()
            .map(|id| match dead.get(*id) {
                Some(reason) => format!("{id}: dead-lettered ({reason})"),
                None => format!("{id}: nowhere"),
            })
            .collect();
        panic!(
            "{} of {} accepted publishes never arrived: {report:?}",
            missing.len(),
            accepted.len()
        );
    }
    let redelivered = seen.lock().unwrap().values().filter(|a| **a > 1).count();
    eprintln!(
        "{} accepted publishes across {OUTAGES} outages all arrived ({redelivered} redelivered)",
        accepted.len()
    );
    let _ = consumer.delete_topic(&topic_name).await;
    let _ = consumer.close().await;
    let _ = publisher.close().await;
}

/// A `basic.consume` that RabbitMQ answers only after the adapter gave up on it (the quorum
/// queue was busy: a leader election after a restart, a loaded machine) must not leave a
/// consumer behind: such a consumer takes events and holds them unacknowledged, and since
/// nothing reads it, they never arrive anywhere while its connection lives. The Ra server
/// of the subscription queue is suspended so the consume times out, then resumed so the
/// broker finishes it late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_answered_after_its_timeout_leaves_no_consumer_behind() {
    let Some(node) = support::start_node() else {
        return;
    };
    let transport =
        support::transport(&node, "command_timeout_ms=1000&reconnect_max_delay_ms=1000").await;
    let topic_name = format!("late-consume-{}", std::process::id());
    let topic = transport.topic(&topic_name).await.expect("topic");
    let options = SubscribeOptions::named("s");
    let mut sub = topic.subscribe(options.clone()).await.expect("subscribe");
    let queue = transport.subscription_queue_name(&topic_name, "s");

    let suspend = |on: bool| {
        let node = Arc::clone(&node);
        let queue = queue.clone();
        tokio::task::spawn_blocking(move || node.suspend_quorum_queue(&queue, on))
    };
    suspend(true).await.unwrap().expect("suspending the queue");
    let second = topic.subscribe(options).await;
    suspend(false).await.unwrap().expect("resuming the queue");
    let error = second.expect_err("a consume on a suspended queue cannot succeed");
    assert_eq!(error.kind(), evbus::ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable(), "{error}");

    const EVENTS: u64 = 40;
    let accepted: HashSet<String> = support::publish_numbered(&*topic, "late", EVENTS)
        .await
        .into_iter()
        .collect();
    let mut received = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !accepted.is_subset(&received) {
        match tokio::time::timeout_at(deadline, sub.next_delivery()).await {
            Ok(Some(Ok(d))) => {
                received.insert(d.event().id().to_owned());
                d.ack().await.expect("ack");
            }
            Ok(Some(Err(e))) => panic!("the subscription failed: {e}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!(
                "{} of {EVENTS} accepted publishes never reached the only live consumer \
                 (a consumer left behind by the failed subscribe holds them)",
                accepted.difference(&received).count()
            ),
        }
    }
    let _ = transport.delete_topic(&topic_name).await;
    let _ = transport.close().await;
}
