//! Attempts travel with the message (ADR 0020), on the RabbitMQ at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! RabbitMQ counts every return of a quorum queue message in `x-delivery-count`, including
//! returns no handler saw (a mass disconnect bounces a message through consumers that are
//! going down). Here a stock client plays those consumers: it takes the message and gives it
//! back (`basic.nack`, requeue) without evbus seeing it. The last test runs on a RabbitMQ
//! node of its own (it adds a user).

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, Delivery, Event, Settlement, Subscription, Transport};
use evbus_amqp::{AmqpConfig, AmqpTransport};
use lapin::Channel;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use support::{shared_transport, stock_channel};

fn unique(label: &str) -> String {
    format!("attempts-{label}-{}", uuid::Uuid::now_v7().simple())
}

fn event(n: u32) -> Event {
    Event::builder("attempts.test", "/evbus-amqp/tests")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Takes the message at the head of `queue` and gives it back, `times` times.
async fn bounce(channel: &Channel, queue: &str, times: u32) {
    for _ in 0..times {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message to bounce");
        give_back(channel, message.delivery.delivery_tag).await;
    }
}

/// Returns a message a stock client took (`basic.nack`, requeue).
async fn give_back(channel: &Channel, delivery_tag: u64) {
    channel
        .basic_nack(
            delivery_tag,
            BasicNackOptions {
                requeue: true,
                multiple: false,
            },
        )
        .await
        .unwrap();
}

async fn next(sub: &mut Subscription, what: &str) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10s"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn returns_no_handler_saw_are_not_attempts() {
    let transport = shared_transport().await;
    let name = unique("returns");
    let queue = transport.queue(&name).await.unwrap();
    let sent = event(1);
    queue.send(&sent).await.unwrap();
    let (_conn, channel) = stock_channel().await;
    // More returns than attempts allowed.
    bounce(&channel, &transport.queue_name(&name), 5).await;

    let options = ConsumerOptions::default().max_attempts(2);
    let mut sub = queue.receive(options).await.unwrap();
    let d = next(&mut sub, "after 5 returns").await;
    assert_eq!(d.event().id(), sent.id());
    assert_eq!(d.attempt(), 1, "returns no handler saw are no attempts");
    assert_eq!(d.nack(None).await.unwrap(), Settlement::Nacked);
    let d = next(&mut sub, "after a nack").await;
    assert_eq!(d.event().id(), sent.id());
    assert_eq!(d.attempt(), 2, "a nack is an attempt");
    d.ack().await.unwrap();
    drop(sub);
    let _ = transport.delete_queue(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nack_leaves_a_copy_whose_header_carries_the_attempts() {
    let transport = shared_transport().await;
    let name = unique("copy");
    let amqp_queue = transport.queue_name(&name);
    let queue = transport.queue(&name).await.unwrap();
    let sent = event(2);
    queue.send(&sent).await.unwrap();

    let options = ConsumerOptions::default().max_attempts(5);
    let mut sub = queue.receive(options.clone()).await.unwrap();
    let d = next(&mut sub, "the first delivery").await;
    assert_eq!(d.nack(None).await.unwrap(), Settlement::Nacked);
    drop(d);
    drop(sub);

    // A stock client sees the retry: the same event, one attempt made. (The copy may have
    // waited in the dropped consumer's prefetch: a return, which is not an attempt.)
    let (_conn, channel) = stock_channel().await;
    let message = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let got = channel
                .basic_get(
                    amqp_queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .unwrap();
            if let Some(message) = got {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the retried copy within 10s");
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers");
    let attempts = headers.inner().get(evbus_amqp::ATTEMPTS_HEADER);
    assert_eq!(attempts, Some(&AMQPValue::LongLongInt(1)), "{headers:?}");
    assert!(
        matches!(
            headers.inner().get("cloudEvents_id"),
            Some(AMQPValue::LongString(id)) if id.as_bytes() == sent.id().as_bytes()
        ),
        "{headers:?}"
    );
    give_back(&channel, message.delivery.delivery_tag).await;

    // Back in evbus: the second attempt, whatever the stock client's return added.
    let mut sub = queue.receive(options).await.unwrap();
    let d = next(&mut sub, "the retried copy").await;
    assert_eq!(d.event(), &sent);
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
    drop(sub);
    let _ = transport.delete_queue(&name).await;
}

/// A message returned more than `max_attempts` + `SPARE_RETURNS` times (a consumer that
/// crashes on it, again and again) is dead-lettered without reaching a handler; one return
/// fewer still reaches it, as a first attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_loop_is_dead_lettered_past_its_spare_returns() {
    let transport = shared_transport().await;
    let (_conn, channel) = stock_channel().await;
    let max_attempts = 2;
    let limit = max_attempts + evbus_amqp::SPARE_RETURNS;
    let options = ConsumerOptions::default().max_attempts(max_attempts);

    let name = unique("spare");
    let queue = transport.queue(&name).await.unwrap();
    let spared = event(3);
    queue.send(&spared).await.unwrap();
    bounce(&channel, &transport.queue_name(&name), limit).await;
    let mut sub = queue.receive(options.clone()).await.unwrap();
    let d = next(&mut sub, "at the limit").await;
    assert_eq!(d.event().id(), spared.id());
    assert_eq!(d.attempt(), 1);
    d.ack().await.unwrap();
    drop(sub);
    let _ = transport.delete_queue(&name).await;

    let name = unique("loop");
    let queue = transport.queue(&name).await.unwrap();
    let looping = event(4);
    queue.send(&looping).await.unwrap();
    bounce(&channel, &transport.queue_name(&name), limit + 1).await;
    let after = event(5);
    queue.send(&after).await.unwrap();
    let mut sub = queue.receive(options.clone()).await.unwrap();
    let d = next(&mut sub, "the event after the crash loop").await;
    assert_eq!(
        d.event().id(),
        after.id(),
        "the looping event reached a handler"
    );
    d.ack().await.unwrap();

    let dlq_name = evbus::dead_letter_queue_name(&name, None, &options);
    let dlq = transport.queue(&dlq_name).await.unwrap();
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    let d = next(&mut dead, "the dead-letter queue").await;
    assert_eq!(d.event().id(), looping.id());
    let reason = d
        .event()
        .extension(evbus::delivery::DEAD_LETTER_REASON)
        .unwrap_or_default()
        .to_owned();
    let deliveries = limit + 2;
    assert!(
        reason.contains(&format!("{deliveries} deliveries")),
        "reason: {reason}"
    );
    d.ack().await.unwrap();
    drop((sub, dead));
    let _ = transport.delete_queue(&name).await;
    let _ = transport.delete_queue(&dlq_name).await;
}

/// A retry whose copy cannot be published (here the consumer's user may not write to the
/// default exchange, `amq.default`) requeues the delivery instead: nothing is lost, no copy
/// is left behind, and the attempt still counts when the message comes back to the same
/// consumer.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_that_cannot_be_published_requeues_and_loses_nothing() {
    // A node of its own: the test adds a user.
    let Some(node) = support::start_node() else {
        return;
    };
    let admin = support::transport(&node, "").await;
    let name = unique("refused");
    let queue = admin.queue(&name).await.unwrap();
    let sent = event(6);
    queue.send(&sent).await.unwrap();
    // May declare and consume, may not publish anywhere.
    node.add_user("consumer", ".*", "^$", ".*");
    let consumer =
        AmqpTransport::connect(AmqpConfig::from_url(&node.user_url("consumer")).unwrap())
            .await
            .unwrap();
    let consumer_queue = consumer.queue(&name).await.unwrap();
    let refused = consumer_queue.send(&event(7)).await;
    assert!(
        refused.is_err(),
        "the consumer's user may not publish, so no retry copy can be: {refused:?}"
    );
    let options = ConsumerOptions::default().max_attempts(3);
    let mut sub = consumer_queue.receive(options).await.unwrap();
    let d = next(&mut sub, "the first delivery").await;
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.nack(None).await.unwrap(), Settlement::Nacked);
    let d = next(&mut sub, "after the requeue").await;
    assert_eq!(d.event(), &sent);
    assert_eq!(
        d.attempt(),
        2,
        "the requeued attempt counts when it comes back here"
    );
    d.ack().await.unwrap();
    drop(sub);
    consumer.close().await.unwrap();

    let conn = lapin::Connection::connect(&node.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    assert_eq!(
        support::message_count(&conn, &admin.queue_name(&name)).await,
        Some(0),
        "a copy or the original was left behind"
    );
    admin.close().await.unwrap();
}
