//! A `subscribe` (or `receive`) whose future is dropped while it still waits for its first
//! partition assignment. Its consumer is then in the middle of joining the group; one that
//! left at that point never left as far as tansu is concerned, and the group kept rebalancing
//! for it: the next consumer of the same subscription got no assignment within its
//! `assignment_timeout` (30 s and more). The ending consumer now finishes joining first, then
//! leaves as a member.

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, SubscribeOptions, Transport};

/// How long the first `subscribe` runs before it is cancelled: well inside tansu's group
/// join (its initial rebalance delay is 3 s).
const CANCEL_AFTER: Duration = Duration::from_millis(500);

fn event(i: u32) -> evbus::Event {
    support::numbered("cancelledSubscribe", i)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_named_subscription_cancelled_mid_join_can_be_opened_again() {
    let Some(transport) = support::connect_with("assignment_timeout_ms=20000").await else {
        return;
    };
    let name = format!("evbus-cancel-{}", uuid::Uuid::now_v7().simple());
    let topic = transport.topic(&name).await.expect("topic");

    let cancelled =
        tokio::time::timeout(CANCEL_AFTER, topic.subscribe(SubscribeOptions::named("s"))).await;
    drop(cancelled);

    let mut sub = topic
        .subscribe(SubscribeOptions::named("s"))
        .await
        .expect("the subscription is opened again after a cancelled subscribe");
    topic.publish(&event(1)).await.expect("publish");
    let delivery = support::next_within_20s(&mut sub, "the subscription opened again").await;
    delivery.ack().await.expect("ack");
    drop(sub);
    transport.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_consumer_cancelled_mid_join_leaves_the_queue_usable() {
    let Some(transport) = support::connect_with("assignment_timeout_ms=20000").await else {
        return;
    };
    let name = format!("evbus-cancelq-{}", uuid::Uuid::now_v7().simple());
    let queue = transport.queue(&name).await.expect("queue");

    let cancelled =
        tokio::time::timeout(CANCEL_AFTER, queue.receive(ConsumerOptions::default())).await;
    drop(cancelled);

    let mut worker = queue
        .receive(ConsumerOptions::default())
        .await
        .expect("a queue consumer attaches after a cancelled receive");
    queue.send(&event(1)).await.expect("send");
    let delivery = support::next_within_20s(&mut worker, "the queue consumer").await;
    delivery.ack().await.expect("ack");
    drop(worker);
    transport.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscribe_waiting_when_the_transport_closes_fails_with_closed() {
    let Some(transport) = support::connect_with("").await else {
        return;
    };
    let name = format!("evbus-cancelc-{}", uuid::Uuid::now_v7().simple());
    let topic = transport.topic(&name).await.expect("topic");
    let waiting = tokio::spawn(async move { topic.subscribe(SubscribeOptions::named("s")).await });
    tokio::time::sleep(CANCEL_AFTER).await;
    transport.close().await.expect("close");
    match waiting.await.expect("the subscribe task") {
        Err(e) => assert_eq!(e.kind(), evbus::ErrorKind::Closed, "{e}"),
        Ok(_) => panic!("subscribe returned a subscription of a closed transport"),
    }
}
