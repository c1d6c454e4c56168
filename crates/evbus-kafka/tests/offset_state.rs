//! The per-partition state above the committed offset (out-of-order acks, attempt counts)
//! survives a change of owner, with each store: the state topic (forced), and whatever `auto`
//! picks for the broker under test (the state topic on tansu, commit metadata on Apache
//! Kafka). Forcing `commit_metadata` is only checked where the broker keeps metadata.

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, Event, Transport};
use evbus_kafka::KafkaTransport;

const WAIT: Duration = Duration::from_secs(20);

/// Connects with `offset_state`, or `None` (test skipped) when no broker answers and brokers
/// are not required.
async fn connect(offset_state: &str) -> Option<KafkaTransport> {
    support::connect_with(&format!("offset_state={offset_state}")).await
}

async fn next(sub: &mut evbus::Subscription) -> evbus::Delivery {
    tokio::time::timeout(WAIT, sub.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
        .expect("a delivery, not an error")
}

/// Consumer A takes two events of a one-partition queue, acks the second only and closes;
/// consumer B (another transport) gets only the first, as attempt 2.
async fn acks_and_attempts_survive_a_change_of_owner(offset_state: &str) {
    let Some(a) = connect(offset_state).await else {
        return;
    };
    let name = format!("evbus-state-{}", uuid::Uuid::now_v7().simple());
    // One partition, so that both events are in one partition's state.
    let event = |i: u32| {
        Event::builder("stateTest", "/tests")
            .json(&i)
            .and_then(|b| b.partition_key("one").build())
            .expect("event")
    };
    let (first, second) = (event(1), event(2));
    let queue = a.queue(&name).await.expect("queue");
    queue.send(&first).await.expect("send");
    queue.send(&second).await.expect("send");

    let mut ca = queue
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    let d1 = next(&mut ca).await;
    let d2 = next(&mut ca).await;
    assert_eq!((d1.event().id(), d1.attempt()), (first.id(), 1));
    assert_eq!((d2.event().id(), d2.attempt()), (second.id(), 1));
    d2.ack().await.expect("ack");
    drop(d1);
    drop(ca);
    a.close().await.expect("close A");

    let b = connect(offset_state).await.expect("B connects");
    let mut cb = b
        .queue(&name)
        .await
        .expect("queue")
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    let again = next(&mut cb).await;
    assert_eq!(
        (again.event().id(), again.attempt()),
        (first.id(), 2),
        "the unacked event comes back as attempt 2"
    );
    again.ack().await.expect("ack");
    let more = tokio::time::timeout(Duration::from_secs(2), cb.next_delivery()).await;
    assert!(
        more.is_err(),
        "the event acked out of order came back: {:?}",
        more.ok()
            .flatten()
            .and_then(|d| d.ok())
            .map(|d| d.event().id().to_owned())
    );
    drop(cb);
    b.close().await.expect("close B");
}

#[tokio::test(flavor = "multi_thread")]
async fn state_topic_keeps_acks_and_attempts_across_owners() {
    acks_and_attempts_survive_a_change_of_owner("state_topic").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_keeps_acks_and_attempts_across_owners() {
    acks_and_attempts_survive_a_change_of_owner("auto").await;
}

/// A named subscription closed with deliveries unsettled and reopened at once on the same
/// transport: the reopen is not held up by the group (see the README's tansu gaps), the acked
/// events stay acked and the unsettled ones come back as attempt 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_reopened_at_once_resumes_with_its_state() {
    let Some(t) = connect("auto").await else {
        return;
    };
    let name = format!("evbus-state-{}", uuid::Uuid::now_v7().simple());
    let topic = t.topic(&name).await.expect("topic");
    let options = evbus::SubscribeOptions::named("s")
        .consumer(ConsumerOptions::default().visibility_timeout(Duration::from_secs(1)));
    let mut s = topic.subscribe(options.clone()).await.expect("subscribe");
    let events: Vec<Event> = (0..6u32)
        .map(|i| {
            Event::builder("stateTest", "/tests")
                .json(&i)
                .and_then(|b| b.build())
                .expect("event")
        })
        .collect();
    for e in &events {
        topic.publish(e).await.expect("publish");
    }
    let mut held = Vec::new();
    let mut acked = std::collections::HashSet::new();
    for i in 0..events.len() {
        let d = next(&mut s).await;
        if i % 2 == 0 {
            d.ack().await.expect("ack");
            acked.insert(d.event().id().to_owned());
        } else {
            held.push(d);
        }
    }
    drop(held);
    drop(s);
    let mut s = tokio::time::timeout(WAIT, topic.subscribe(options))
        .await
        .expect("the reopen is not held up")
        .expect("subscribe again");
    for _ in 0..events.len() - acked.len() {
        let d = next(&mut s).await;
        assert!(!acked.contains(d.event().id()), "an acked event came back");
        assert_eq!(d.attempt(), 2, "an unsettled event comes back as attempt 2");
        d.ack().await.expect("ack");
    }
    drop(s);
    t.close().await.expect("close");
}
