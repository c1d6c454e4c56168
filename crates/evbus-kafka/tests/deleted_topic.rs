//! Publishing through a topic or queue handle whose Kafka topic this transport deleted. tansu
//! accepts records for a deleted topic from a producer that still has it in its metadata,
//! assigns them offsets, and no consumer ever sees them: the publish returned `Ok` for a lost
//! event. The transport now creates the topic again first, as `topic` and `queue` do.

mod support;

use evbus::{ConsumerOptions, StartPosition, SubscribeOptions, Transport};

fn event(i: u32) -> evbus::Event {
    support::numbered("deletedTopic", i)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_published_after_its_topic_was_deleted_is_not_lost() {
    let Some(transport) = support::connect_with("").await else {
        return;
    };
    let name = format!("evbus-deleted-{}", uuid::Uuid::now_v7().simple());
    let topic = transport.topic(&name).await.expect("topic");
    topic.publish(&event(0)).await.expect("publish before");
    transport.delete_topic(&name).await.expect("delete");
    topic
        .publish(&event(1))
        .await
        .expect("publish after the deletion");
    let queue = transport.queue(&format!("{name}-q")).await.expect("queue");
    queue.send(&event(2)).await.expect("send before");
    transport
        .delete_queue(&format!("{name}-q"))
        .await
        .expect("delete the queue");
    queue
        .send_batch(&[event(3)])
        .await
        .expect("send after the deletion");

    // Another connection reads both from the beginning.
    let reader = support::connect_with("")
        .await
        .expect("a second connection");
    let topic = reader.topic(&name).await.expect("topic");
    let mut sub = topic
        .subscribe(SubscribeOptions::named("r").start(StartPosition::Earliest))
        .await
        .expect("subscribe");
    let delivery =
        support::next_within_20s(&mut sub, "the event published after the deletion").await;
    assert_eq!(delivery.event().data().map(|d| &d[..]), Some(&b"1"[..]));
    delivery.ack().await.expect("ack");
    let queue = reader.queue(&format!("{name}-q")).await.expect("queue");
    let mut worker = queue
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    let delivery = support::next_within_20s(&mut worker, "the event sent after the deletion").await;
    assert_eq!(delivery.event().data().map(|d| &d[..]), Some(&b"3"[..]));
    delivery.ack().await.expect("ack");
    drop((sub, worker));
    reader.close().await.expect("close the reader");
    transport.close().await.expect("close");
}
