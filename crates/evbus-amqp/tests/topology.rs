//! Topology RabbitMQ lost is declared again, on the RabbitMQ at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! A RabbitMQ 3.10 node killed within about a second of a subscription binding its queue can
//! come back without the binding (its metadata store lost the last write) while the queue
//! and the topic's directory record survive. Here a stock client removes the binding the
//! same way a crash does, with nobody consuming: the next publisher connection must bind the
//! recorded subscription queues again before it publishes, or what it publishes is confirmed
//! and routed nowhere. A publisher whose user may not read the directory or declare the
//! subscription queues publishes all the same (on a RabbitMQ node this test starts, to add
//! users to it).

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, Event, SubscribeOptions, Transport};
use evbus_amqp::{AmqpConfig, AmqpTransport};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use support::{message_count, shared_transport, stock_channel};

fn unique(label: &str) -> String {
    format!("topology-{label}-{}", uuid::Uuid::now_v7().simple())
}

/// Publishes `body` with a stock client, persistent and `mandatory`, and waits for its
/// confirm (carrying the message back if RabbitMQ returned it).
async fn publish_mandatory(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> Confirmation {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Subscribes `subscription` to topic `name` on a connection of its own, then goes away:
/// the subscription is recorded in the topic's directory, bound, and has no consumer.
async fn subscribe_and_leave(name: &str, subscription: &str) {
    let transport = shared_transport().await;
    let topic = transport.topic(name).await.unwrap();
    drop(
        topic
            .subscribe(SubscribeOptions::named(subscription))
            .await
            .unwrap(),
    );
    transport.close().await.unwrap();
}

fn event(seq: u64) -> Event {
    Event::builder("afterOrderCreate", "/shop")
        .json(&seq)
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_binding_is_restored_before_a_new_connection_publishes() {
    let name = unique("bind");
    subscribe_and_leave(&name, "billing").await;
    let publisher = shared_transport().await;
    let exchange = publisher.exchange_name(&name);
    let queue = publisher.subscription_queue_name(&name, "billing");

    let (conn, channel) = stock_channel().await;
    channel
        .queue_unbind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The binding is really gone: a mandatory publish comes back unroutable.
    let confirmation = publish_mandatory(&channel, &exchange, "", b"probe").await;
    assert!(
        confirmation.take_message().is_some(),
        "RabbitMQ still routes to the subscription queue after the unbind"
    );

    let topic = publisher.topic(&name).await.unwrap();
    for seq in 0..3 {
        topic.publish(&event(seq)).await.unwrap();
    }
    assert_eq!(
        message_count(&conn, &queue).await,
        Some(3),
        "the events published while the subscription had no binding must wait in its queue"
    );

    publisher.delete_topic(&name).await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restoring_bindings_leaves_one_directory_record_per_subscription_and_delete_finds_it() {
    let name = unique("records");
    // Each connection of a subscriber records its queue again.
    for _ in 0..3 {
        subscribe_and_leave(&name, "billing").await;
    }
    subscribe_and_leave(&name, "audit").await;
    let publisher = shared_transport().await;
    let directory = format!("{}_d_subscriptions", publisher.exchange_name(&name));
    let (conn, _channel) = stock_channel().await;
    assert_eq!(message_count(&conn, &directory).await, Some(4));

    let topic = publisher.topic(&name).await.unwrap();
    topic.publish(&event(0)).await.unwrap();
    // The publisher's channel gave the records it kept back when it closed, before the
    // publish.
    assert_eq!(
        message_count(&conn, &directory).await,
        Some(2),
        "one record per subscription queue is left"
    );
    for subscription in ["billing", "audit"] {
        let queue = publisher.subscription_queue_name(&name, subscription);
        assert_eq!(
            message_count(&conn, &queue).await,
            Some(1),
            "{subscription}"
        );
    }

    publisher.delete_topic(&name).await.unwrap();
    for subscription in ["billing", "audit"] {
        let queue = publisher.subscription_queue_name(&name, subscription);
        assert_eq!(
            message_count(&conn, &queue).await,
            None,
            "delete_topic must still find and delete `{queue}`"
        );
    }
    assert_eq!(message_count(&conn, &directory).await, None);
    publisher.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into()))
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_record_naming_another_topics_queue_is_neither_bound_nor_deleted() {
    let name = unique("foreign");
    let other = unique("spied");
    subscribe_and_leave(&name, "billing").await;
    subscribe_and_leave(&other, "spy").await;
    let publisher = shared_transport().await;
    let directory = format!("{}_d_subscriptions", publisher.exchange_name(&name));
    let foreign = publisher.subscription_queue_name(&other, "spy");

    // Someone who may write the directory records another topic's queue in it.
    let (conn, channel) = stock_channel().await;
    let confirmation = publish_mandatory(&channel, "", &directory, foreign.as_bytes()).await;
    assert!(
        confirmation.take_message().is_none(),
        "the record was routed"
    );
    assert_eq!(message_count(&conn, &directory).await, Some(2));

    let topic = publisher.topic(&name).await.unwrap();
    topic.publish(&event(0)).await.unwrap();
    let billing = publisher.subscription_queue_name(&name, "billing");
    assert_eq!(message_count(&conn, &billing).await, Some(1));
    assert_eq!(
        message_count(&conn, &foreign).await,
        Some(0),
        "the publisher bound another topic's queue on a directory record's say-so"
    );
    assert_eq!(
        message_count(&conn, &directory).await,
        Some(1),
        "the foreign record is removed"
    );

    publisher.delete_topic(&name).await.unwrap();
    assert_eq!(message_count(&conn, &billing).await, None);
    assert_eq!(
        message_count(&conn, &foreign).await,
        Some(0),
        "deleted by another topic"
    );
    publisher.delete_topic(&other).await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_allowed_only_its_exchange_still_publishes() {
    // A node of its own: the test adds users.
    let Some(node) = support::start_node() else {
        return;
    };
    let name = unique("perms");
    let admin = support::transport(&node, "").await;
    let topic = admin.topic(&name).await.unwrap();
    drop(
        topic
            .subscribe(SubscribeOptions::named("billing"))
            .await
            .unwrap(),
    );
    let exchange = admin.exchange_name(&name);
    let queue = admin.subscription_queue_name(&name, "billing");
    let only_exchange = format!("^{exchange}$");
    // May read the directory, not declare or bind the subscription queue.
    node.add_user("reader", &only_exchange, &only_exchange, ".*");
    // May not read the directory either.
    node.add_user("writer", &only_exchange, &only_exchange, "^$");

    for (seq, user) in (0..).zip(["reader", "writer"]) {
        let url = node.user_url(user);
        let publisher = AmqpTransport::connect(AmqpConfig::from_url(&url).unwrap())
            .await
            .unwrap();
        let topic = publisher.topic(&name).await.unwrap();
        topic
            .publish(&event(seq))
            .await
            .unwrap_or_else(|e| panic!("{user}'s publish: {e}"));
        publisher.close().await.unwrap();
    }
    let conn = Connection::connect(&node.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    assert_eq!(message_count(&conn, &queue).await, Some(2));
    admin.close().await.unwrap();
}

/// Sends go out on the transport's connection, and RabbitMQ 3.10 closes that whole
/// connection with `INTERNAL_ERROR` when one meets the quorum queue being deleted. The
/// deletion, on the same connection, must still succeed, and so must deleting again. Without
/// the retry this fails in the first round; the rounds are few because each crash costs the
/// broker (some hundreds in a row have left a node refusing connections). The crash can also
/// land on the next round's set-up, which is retried as a caller would retry it.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_queue_that_sends_race_succeeds() {
    let transport = shared_transport().await;
    for round in 0..5 {
        let name = unique("delete");
        let mut tries = 0;
        let queue = loop {
            match transport.queue(&name).await {
                Ok(queue) => break queue,
                Err(e) => {
                    tries += 1;
                    assert!(e.is_retryable() && tries < 3, "round {round}: {e}");
                }
            }
        };
        let sending = tokio::spawn(async move {
            for seq in 0..5 {
                let _ = queue.send(&event(seq)).await;
            }
        });
        for attempt in ["first", "second"] {
            if let Err(e) = transport.delete_queue(&name).await {
                panic!("round {round}: deleting the queue a {attempt} time: {e}");
            }
        }
        sending.await.unwrap();
        // A send after the deletion made the queue again.
        transport.delete_queue(&name).await.unwrap();
    }
    transport.close().await.unwrap();
}

/// A subscription dropped with many deliveries in hand lets go of them by publishing retry
/// copies; deleting its queue at once must wait for that, or the copies meet the queue
/// being deleted and RabbitMQ 3.10 closes the connection under the operations that follow.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_queue_waits_for_a_dropped_consumer_to_let_go() {
    let transport = shared_transport().await;
    for round in 0..5 {
        let name = unique("leave");
        let queue = transport.queue(&name).await.unwrap();
        for seq in 0..50 {
            queue.send(&event(seq)).await.unwrap();
        }
        let mut consumer = queue
            .receive(ConsumerOptions::default().max_in_flight(64))
            .await
            .unwrap();
        let mut held = Vec::new();
        while held.len() < 50 {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next_delivery())
                .await
                .expect("a delivery within 10 s")
                .expect("the consumer ended")
                .unwrap();
            held.push(delivery);
        }
        drop(consumer);
        transport.delete_queue(&name).await.unwrap();
        // Nothing lost the connection: the next operations on it succeed at the first try.
        let queue = transport
            .queue(&name)
            .await
            .unwrap_or_else(|e| panic!("round {round}: opening the queue again: {e}"));
        queue
            .send(&event(0))
            .await
            .unwrap_or_else(|e| panic!("round {round}: sending after the deletion: {e}"));
        drop(held);
        for queue in [name.clone(), format!("{name}.dlq")] {
            transport.delete_queue(&queue).await.unwrap();
        }
    }
    transport.close().await.unwrap();
}

/// A named subscription, an anonymous one and a queue consumer end when their topic or queue
/// is deleted, by another transport or by their own, and nothing declares what was deleted
/// again (re-attaching used to: from its own transport the topic came back; from another,
/// the subscription yielded `not_found` about once a second for ever; the anonymous
/// subscription, whose queue is not deleted with the topic, stayed open and quiet).
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_end_when_their_topic_or_queue_is_deleted() {
    let consumer = shared_transport().await;
    let other = shared_transport().await;
    for deleter in [&other, &consumer] {
        let topic_name = unique("gone-topic");
        let queue_name = unique("gone-queue");
        let topic = consumer.topic(&topic_name).await.unwrap();
        let named = topic
            .subscribe(SubscribeOptions::named("billing"))
            .await
            .unwrap();
        let anonymous = topic
            .subscribe(SubscribeOptions::anonymous())
            .await
            .unwrap();
        let queue = consumer.queue(&queue_name).await.unwrap();
        let received = queue.receive(ConsumerOptions::default()).await.unwrap();
        deleter.delete_topic(&topic_name).await.unwrap();
        deleter.delete_queue(&queue_name).await.unwrap();
        evbus_conformance::checks::each_ends_within(
            vec![
                ("the named subscription", named),
                ("the anonymous subscription", anonymous),
                ("the queue's consumer", received),
            ],
            Duration::from_secs(10),
        )
        .await;
        let (_conn, channel) = stock_channel().await;
        let exchange = consumer.exchange_name(&topic_name);
        let passive = channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(
            passive.is_err(),
            "the deleted topic's exchange was declared again"
        );
        assert_gone(&[
            consumer.subscription_queue_name(&topic_name, "billing"),
            consumer.queue_name(&queue_name),
        ])
        .await;
        // The names are usable again from the consumer's connection, which had declared
        // them before the deletion.
        let topic = consumer.topic(&topic_name).await.unwrap();
        let mut named = topic
            .subscribe(SubscribeOptions::named("billing"))
            .await
            .unwrap();
        topic.publish(&event(1)).await.unwrap();
        let queue = consumer.queue(&queue_name).await.unwrap();
        let mut received = queue.receive(ConsumerOptions::default()).await.unwrap();
        queue.send(&event(2)).await.unwrap();
        for sub in [&mut named, &mut received] {
            let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
                .await
                .expect("a delivery within 10 s of opening the name again")
                .expect("the subscription ended")
                .unwrap();
            delivery.ack().await.unwrap();
        }
        drop((named, received));
        consumer.delete_topic(&topic_name).await.unwrap();
        consumer.delete_queue(&queue_name).await.unwrap();
        for dead in [
            format!("{topic_name}.billing.dlq"),
            format!("{queue_name}.dlq"),
        ] {
            consumer.delete_queue(&dead).await.unwrap();
        }
    }
    consumer.close().await.unwrap();
    other.close().await.unwrap();
}

/// A topic deleted and opened again at once (by another transport) keeps its old
/// subscriptions ended: the tombstone that told their consumers of the deletion was taken
/// away by the reopening before they looked, and the named subscription declared its queue
/// again and went on (outside review, 4 runs in 4). An anonymous subscription ends too,
/// although its topic's exchange is there again (it looked for the tombstone only when the
/// exchange was gone). Deletions are counted now, not marked.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_deleted_and_opened_again_at_once_keeps_its_old_subscriptions_ended() {
    let consumer = shared_transport().await;
    let other = shared_transport().await;
    let topic_name = unique("reopened");
    let topic = consumer.topic(&topic_name).await.unwrap();
    let named = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let anonymous = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    other.delete_topic(&topic_name).await.unwrap();
    let reopened = other.topic(&topic_name).await.unwrap();
    reopened.publish(&event(0)).await.unwrap();
    evbus_conformance::checks::each_ends_within(
        vec![
            ("the named subscription", named),
            ("the anonymous subscription", anonymous),
        ],
        Duration::from_secs(15),
    )
    .await;
    assert_gone(&[consumer.subscription_queue_name(&topic_name, "billing")]).await;
    other.delete_topic(&topic_name).await.unwrap();
    for dead in [
        format!("{topic_name}.billing.dlq"),
        format!("{topic_name}._anonymous.dlq"),
    ] {
        other.delete_queue(&dead).await.unwrap();
    }
    consumer.close().await.unwrap();
    other.close().await.unwrap();
}

/// A deletion by a service whose `tombstone_ttl` differs from the one that made the
/// tombstone still ends the subscriptions: RabbitMQ refused to declare the tombstone again
/// with other arguments (`PRECONDITION_FAILED`), the deletion went uncounted, and the
/// consumers declared their topic and queue again (outside review).
#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_is_counted_by_a_service_with_another_tombstone_ttl() {
    let consumer = shared_transport().await;
    let mut config = AmqpConfig::from_url(&support::shared_url()).expect("a valid URL");
    config.tombstone_ttl = Duration::from_secs(700);
    let other = AmqpTransport::connect(config).await.unwrap();
    let topic_name = unique("ttl-topic");
    let queue_name = unique("ttl-queue");
    // Deleted once by the consumer's transport: the tombstones are its own (600 s).
    consumer.topic(&topic_name).await.unwrap();
    consumer.delete_topic(&topic_name).await.unwrap();
    consumer.queue(&queue_name).await.unwrap();
    consumer.delete_queue(&queue_name).await.unwrap();
    let topic = consumer.topic(&topic_name).await.unwrap();
    let named = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let queue = consumer.queue(&queue_name).await.unwrap();
    let received = queue.receive(ConsumerOptions::default()).await.unwrap();
    other.delete_topic(&topic_name).await.unwrap();
    other.delete_queue(&queue_name).await.unwrap();
    evbus_conformance::checks::each_ends_within(
        vec![
            ("the named subscription", named),
            ("the queue's consumer", received),
        ],
        Duration::from_secs(15),
    )
    .await;
    assert_gone(&[
        consumer.subscription_queue_name(&topic_name, "billing"),
        consumer.queue_name(&queue_name),
    ])
    .await;
    for dead in [
        format!("{topic_name}.billing.dlq"),
        format!("{queue_name}.dlq"),
    ] {
        other.delete_queue(&dead).await.unwrap();
    }
    consumer.close().await.unwrap();
    other.close().await.unwrap();
}

/// Asserts that none of the deleted `queues` exists: nothing declared them again.
async fn assert_gone(queues: &[String]) {
    let (conn, _channel) = stock_channel().await;
    for queue in queues {
        assert_eq!(
            message_count(&conn, queue).await,
            None,
            "the deleted queue `{queue}` was declared again"
        );
    }
    let _ = conn.close(200, "done".into()).await;
}

/// The consumer count of queue `queue` (a passive declare on a channel of its own): `None`
/// when the queue does not exist.
async fn consumer_count(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let channel = conn.create_channel().await.expect("a channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "looked up".into()).await;
    Some(declared.consumer_count())
}

/// A named subscription's queue deleted with a stock client while its topic still exists (an
/// operator clearing it in the management UI) is declared, bound and consumed again by the
/// same subscription: it used to take the deletion for `delete_topic` and end, while the
/// topic's publishers bound the queue again from the directory and filled it with no one
/// consuming (found by an outside review). A queue's consumer does the same: with no
/// tombstone of `delete_queue` there, its queue's deletion is not evbus's (until tombstones,
/// it ended, and a broker that lost its definitions ended every queue consumer too).
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_queue_deleted_outside_evbus_is_declared_again_and_consumed() {
    let transport = shared_transport().await;
    let name = unique("cleared");
    let queue_name = unique("cleared-queue");
    let topic = transport.topic(&name).await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let queue = transport.queue(&queue_name).await.unwrap();
    let mut received = queue.receive(ConsumerOptions::default()).await.unwrap();
    topic.publish(&event(0)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open")
        .unwrap();
    first.ack().await.unwrap();

    let amqp_queue = transport.subscription_queue_name(&name, "billing");
    let (conn, channel) = stock_channel().await;
    for deleted in [amqp_queue.clone(), transport.queue_name(&queue_name)] {
        channel
            .queue_delete(
                deleted.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
    }
    // Both declare their queues again and consume them: wait for their consumers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for queue_name in [amqp_queue.clone(), transport.queue_name(&queue_name)] {
        loop {
            let consumers = consumer_count(&conn, &queue_name).await;
            if consumers == Some(1) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue_name} was not consumed again within 15 s of its deletion \
                 (consumers: {consumers:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    topic.publish(&event(1)).await.unwrap();
    queue.send(&event(2)).await.unwrap();
    for (sub, want, what) in [
        (&mut sub, &b"1"[..], "the subscription"),
        (&mut received, &b"2"[..], "the queue's consumer"),
    ] {
        let again = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .unwrap_or_else(|_| panic!("{what}: a delivery within 10 s of the deletion"))
            .unwrap_or_else(|| panic!("{what} ended when its queue was deleted outside evbus"))
            .unwrap();
        assert_eq!(again.event().data().map(|d| &d[..]), Some(want), "{what}");
        again.ack().await.unwrap();
    }

    drop(sub);
    transport.delete_topic(&name).await.unwrap();
    for dead in [format!("{name}.billing.dlq"), format!("{queue_name}.dlq")] {
        transport.delete_queue(&dead).await.unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    transport.close().await.unwrap();
}
