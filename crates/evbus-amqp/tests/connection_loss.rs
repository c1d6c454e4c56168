//! Connection losses and attempt counts, on a RabbitMQ node this test starts itself (see
//! `support::RabbitNode`), whose client connections it closes from the broker's side.
//!
//! RabbitMQ 3.10 adds one to a quorum queue message's `x-delivery-count` whenever it takes
//! the message back from a consumer, including when the consumer's channel is lost while the
//! message only waited in the consumer's prefetch. An attempt is a delivery handed out: a
//! message a consumer never handed out must not come back with a higher attempt, however
//! many times its connection was lost, and a few lost connections in a row must not
//! dead-letter a backlog nobody handled.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use evbus::{ConsumerOptions, ErrorKind, SubscribeOptions, Transport};
use support::RabbitNode;
use tokio::time::Instant;

const IN_FLIGHT: usize = 4;
const MAX_ATTEMPTS: u32 = 3;
/// More losses than attempts allowed.
const LOSSES: usize = 5;
const EVENTS: u64 = 12;

/// `(consumers, messages_unacknowledged)` of quorum queue `queue`.
fn queue_state(node: &RabbitNode, queue: &str) -> (u64, u64) {
    let printed = node
        .eval(&format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
             [{{consumers, C}}, {{messages_unacknowledged, U}}] = \
             rabbit_amqqueue:info(Q, [consumers, messages_unacknowledged]), {{C, U}}."
        ))
        .expect("reading the queue's state");
    let numbers: Vec<u64> = printed
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    match numbers[..] {
        [consumers, unacked] => (consumers, unacked),
        _ => panic!("unexpected queue state `{printed}`"),
    }
}

/// Waits until `queue` has one consumer holding `unacked` messages (the consumer re-attached
/// and filled its prefetch), or fails after `within`.
async fn until_attached(node: &Arc<RabbitNode>, queue: &str, unacked: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let state = {
            let (node, queue) = (Arc::clone(node), queue.to_owned());
            tokio::task::spawn_blocking(move || queue_state(&node, &queue))
                .await
                .unwrap()
        };
        if state == (1, unacked) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not re-attach with {unacked} messages prefetched within \
             {within:?}: (consumers, unacked) = {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Evaluates `expr` on `node` (`rabbitmqctl eval`, off the runtime's threads) and returns
/// what it printed; fails the test, saying `what` it was doing, if the evaluation fails.
async fn eval(node: &Arc<RabbitNode>, expr: String, what: &str) -> String {
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || node.eval(&expr))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Closes every client connection of the node, from the broker's side.
async fn close_connections(node: &Arc<RabbitNode>) {
    let expr = "rabbit_networking:close_all_connections(\"evbus test: connection lost\").";
    eval(node, expr.to_owned(), "closing the connections").await;
}

/// What each test starts from: a node, a transport on it, a topic and its named
/// subscription `s`.
struct Subscribed {
    node: Arc<RabbitNode>,
    transport: evbus_amqp::AmqpTransport,
    topic_name: String,
    topic: Arc<dyn evbus::Topic>,
    sub: evbus::Subscription,
    queue: String,
}

/// Starts a node (`None`: no node, and not required) and subscribes to topic
/// `<name>-<pid>` with `options`, whose visibility timeout is made far longer than the test:
/// nothing is requeued by the sweep, and a re-attachment that waited for it would fail the
/// tests' waits.
async fn subscribed(name: &str, options: ConsumerOptions) -> Option<Subscribed> {
    let node = support::start_node()?;
    let transport =
        support::transport(&node, "reconnect_max_delay_ms=500&command_timeout_ms=5000").await;
    let topic_name = format!("{name}-{}", std::process::id());
    let topic = transport.topic(&topic_name).await.expect("topic");
    let options = options.visibility_timeout(Duration::from_secs(120));
    let sub = topic
        .subscribe(SubscribeOptions::named("s").consumer(options))
        .await
        .expect("subscribe");
    let queue = transport.subscription_queue_name(&topic_name, "s");
    Some(Subscribed {
        node,
        transport,
        topic_name,
        topic,
        sub,
        queue,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_losses_count_only_against_deliveries_handed_out() {
    let options = ConsumerOptions::default()
        .max_in_flight(IN_FLIGHT)
        .max_attempts(MAX_ATTEMPTS);
    let Some(Subscribed {
        node,
        transport,
        topic_name,
        topic,
        mut sub,
        queue,
    }) = subscribed("losses", options).await
    else {
        return;
    };

    let published = support::publish_numbered(&*topic, "losses", EVENTS).await;

    // Every in-flight slot taken by a delivery handed out and left unsettled.
    let mut handed = Vec::new();
    for _ in 0..IN_FLIGHT {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .expect("a delivery within 10s")
            .expect("the subscription ended")
            .expect("a delivery");
        assert_eq!(d.attempt(), 1, "a first delivery");
        handed.push(d);
    }

    // The first loss: what was handed out cannot be settled any more. The consumer waits
    // while it holds every slot, and comes back as soon as it is settled, not after the
    // visibility timeout.
    close_connections(&node).await;
    for d in &handed {
        let error = d.ack().await.expect_err("an ack on a lost channel");
        assert!(
            matches!(error.kind(), ErrorKind::Expired | ErrorKind::Connection),
            "{error}"
        );
    }
    until_attached(&node, &queue, IN_FLIGHT as u64, Duration::from_secs(15)).await;

    // More losses than attempts allowed while the prefetch waits and nothing is handed out.
    for _ in 0..LOSSES {
        close_connections(&node).await;
        until_attached(&node, &queue, IN_FLIGHT as u64, Duration::from_secs(15)).await;
    }

    // Dropped: an unsettled delivery keeps its in-flight slot until then.
    let lost_while_handed: Vec<String> = handed.iter().map(|d| d.event().id().to_owned()).collect();
    drop(handed);
    // One of the others is nacked once: its next attempt is its second, not more.
    let mut nacked: Option<String> = None;
    let mut attempts: HashMap<String, u32> = HashMap::new();
    while attempts.len() < published.len() {
        let next = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery()).await;
        let Ok(Some(Ok(d))) = next else {
            let missing: Vec<&String> = published
                .iter()
                .filter(|id| !attempts.contains_key(*id))
                .collect();
            panic!(
                "{} of {EVENTS} events did not come back after {} lost connections \
                 (dead-lettered as over-delivered?): {missing:?}; got {next:?}",
                missing.len(),
                LOSSES + 1
            );
        };
        let id = d.event().id().to_owned();
        if nacked.is_none() && !lost_while_handed.contains(&id) {
            d.nack(None).await.expect("nack");
            nacked = Some(id);
            continue;
        }
        d.ack().await.expect("ack");
        attempts.insert(id, d.attempt());
    }
    for id in &published {
        let again = lost_while_handed.contains(id) || nacked.as_ref() == Some(id);
        let expected = if again { 2 } else { 1 };
        assert_eq!(
            attempts[id],
            expected,
            "event {id}: handed out {} time(s) before, whatever RabbitMQ counted",
            expected - 1
        );
    }
    let _ = transport.delete_topic(&topic_name).await;
    let _ = transport.close().await;
}

/// A publish retried after its confirm was lost leaves two copies of one event (one id) in
/// the queue. What a lost connection counted against one copy must not be taken off, or
/// added to, the other: both copies here waited in the prefetch, never handed out, when the
/// connection was lost, so each comes back as a first attempt. Keyed by the event id, the
/// first copy back took both corrections and the second arrived as a second attempt, past
/// `max_attempts` 1: dead-lettered without ever reaching a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_one_event_keep_their_own_attempts_across_a_loss() {
    let options = ConsumerOptions::default().max_in_flight(2).max_attempts(1);
    let Some(Subscribed {
        node,
        transport,
        topic_name,
        topic,
        mut sub,
        queue,
    }) = subscribed("copies", options).await
    else {
        return;
    };
    for copy in ["first", "second"] {
        let event = evbus::Event::builder("copies", "/copies")
            .id("one-event-two-copies")
            .json(&copy)
            .expect("a string is JSON")
            .build()
            .expect("a valid event");
        topic.publish(&event).await.expect("publish");
    }
    // Both copies in the prefetch, neither handed out; then the connection is lost.
    until_attached(&node, &queue, 2, Duration::from_secs(15)).await;
    close_connections(&node).await;
    until_attached(&node, &queue, 2, Duration::from_secs(15)).await;

    let mut attempts: HashMap<String, u32> = HashMap::new();
    while attempts.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery()).await;
        let Ok(Some(Ok(d))) = next else {
            panic!(
                "a copy did not come back after one lost connection (dead-lettered as \
                 over-delivered?); got {attempts:?} and then {next:?}"
            );
        };
        let copy: String = d.event().json().expect("the copy's name");
        d.ack().await.expect("ack");
        attempts.insert(copy, d.attempt());
    }
    assert_eq!(
        attempts,
        HashMap::from([("first".to_owned(), 1), ("second".to_owned(), 1)]),
        "neither copy was handed out before the loss"
    );
    let _ = transport.delete_topic(&topic_name).await;
    let _ = transport.close().await;
}

/// Publishes a binary-mode CloudEvent numbered `seq` to exchange `exchange` of `node` with a
/// stock client on a connection of its own, and waits for RabbitMQ's confirm. Not through
/// evbus: an evbus publisher's first publish on a connection reads the topic's directory and
/// removes duplicate records, which would hide what the consumers recorded.
async fn stock_publish(node: &RabbitNode, exchange: &str, seq: usize) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let conn = lapin::Connection::connect(&node.url(), lapin::ConnectionProperties::default())
        .await
        .expect("a stock connection to the test's node");
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents_specversion", "1.0".to_owned()),
        ("cloudEvents_id", format!("stock-{seq}")),
        ("cloudEvents_source", "/stock".to_owned()),
        ("cloudEvents_type", "records".to_owned()),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default()
                .with_headers(headers)
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("a confirm");
    assert!(confirmation.is_ack(), "RabbitMQ refused the stock publish");
    let _ = conn.close(200, "done".into()).await;
}

/// A consumer records its subscription queue in the topic's directory once, not again on
/// every connection it re-attaches on: the directory grew by one record per reconnect, 105
/// after a few seconds of a connection that kept dropping (found by an outside review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_leave_one_directory_record_per_subscription() {
    let Some(Subscribed {
        node,
        transport,
        topic_name,
        mut sub,
        queue,
        ..
    }) = subscribed("records", ConsumerOptions::default()).await
    else {
        return;
    };
    let exchange = transport.exchange_name(&topic_name);
    let directory = format!("{exchange}_d_subscriptions");
    for round in 0..LOSSES {
        close_connections(&node).await;
        until_attached(&node, &queue, 0, Duration::from_secs(15)).await;
        // A delivery settled on the new connection: the consumer re-attached (and recorded
        // its queue, if it does) after the loss.
        stock_publish(&node, &exchange, round).await;
        let d = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
            .await
            .expect("a delivery within 15 s of the reconnection")
            .expect("the subscription ended")
            .expect("a delivery");
        assert_eq!(d.event().id(), format!("stock-{round}"));
        d.ack().await.expect("an ack on the new connection");
    }
    let stock = lapin::Connection::connect(&node.url(), lapin::ConnectionProperties::default())
        .await
        .expect("a stock connection to the test's node");
    assert_eq!(
        support::message_count(&stock, &directory).await,
        Some(1),
        "one directory record for the subscription after {LOSSES} reconnects"
    );
    let _ = stock.close(200, "done".into()).await;
    let _ = transport.delete_topic(&topic_name).await;
    let _ = transport.close().await;
}

/// Puts a message into queue `queue` of `node` whose `message-id` is not UTF-8, from inside
/// the broker: what a foreign producer's client can write (RabbitMQ passes it on unchecked)
/// and lapin cannot, nor read (it drops the connection the message is delivered on).
async fn publish_unparsable(node: &Arc<RabbitNode>, queue: &str) {
    // `#'P_basic'{delivery_mode = 2, message_id = <<255, 254>>}`, as a tuple.
    let expr = format!(
        "rabbit_basic:publish(rabbit_misc:r(<<\"/\">>, exchange, <<>>), <<\"{queue}\">>, \
         {{'P_basic', undefined, undefined, undefined, 2, undefined, undefined, undefined, \
         undefined, <<255, 254>>, undefined, undefined, undefined, undefined, undefined}}, \
         <<\"{{}}\">>)."
    );
    eval(
        node,
        expr,
        "publishing the unparsable message inside the broker",
    )
    .await;
}

/// A message the client cannot parse stalls only the subscription that reads it: that
/// subscription's connection is lost at every re-attach, while the transport's other
/// subscriptions go on receiving and its sends go on succeeding. With one connection per
/// transport, one such message in any queue it consumed took every subscription, publish
/// and send of the transport down several times a second until the message was removed
/// (outside review with pika; ADR 0039).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_cannot_parse_stalls_only_the_subscription_reading_it() {
    let Some(node) = support::start_node() else {
        return;
    };
    let transport =
        support::transport(&node, "reconnect_max_delay_ms=500&command_timeout_ms=5000").await;
    let pid = std::process::id();
    let (poisoned_name, healthy_name) = (format!("poisoned-{pid}"), format!("healthy-{pid}"));
    let poisoned = transport.queue(&poisoned_name).await.expect("queue");
    let healthy = transport.queue(&healthy_name).await.expect("queue");
    let mut poisoned_sub = poisoned
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    let mut healthy_sub = healthy
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    publish_unparsable(&node, &transport.queue_name(&poisoned_name)).await;

    // Meanwhile the poisoned consumer loses its connection again and again.
    let started = Instant::now();
    let mut sent = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let event = evbus::Event::builder("healthy", "/healthy")
            .json(&sent.len())
            .expect("JSON")
            .build()
            .expect("an event");
        healthy
            .send(&event)
            .await
            .expect("sending while another queue's consumer meets a message it cannot parse");
        sent.push(event.id().to_owned());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), healthy_sub.next_delivery())
            .await
            .expect("the healthy queue's deliveries go on")
            .expect("the subscription goes on")
            .expect("a delivery");
        received.push(delivery.event().id().to_owned());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(received, sent);

    // The premise: the message is still there, and the poisoned subscription handed out
    // nothing (the client never got past it).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), poisoned_sub.next_delivery())
            .await
            .is_err(),
        "the poisoned subscription handed something out"
    );
    drop(poisoned_sub);
    // RabbitMQ updates a quorum queue's counts every few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (node, queue) = (Arc::clone(&node), transport.queue_name(&poisoned_name));
        let counts = tokio::task::spawn_blocking(move || {
            node.eval(&format!(
                "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, \
                 <<\"{queue}\">>)), rabbit_amqqueue:info(Q, [messages])."
            ))
        })
        .await
        .unwrap()
        .expect("reading the poisoned queue");
        if counts.contains("{messages,1}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the poisoned queue does not hold the message: {counts}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(healthy_sub);
    transport
        .delete_queue(&poisoned_name)
        .await
        .expect("delete");
    transport.delete_queue(&healthy_name).await.expect("delete");
    transport.close().await.expect("close");
}

/// A subscription lost again and again to a message the client cannot parse backs off,
/// even when an ordinary event ahead of that message is delivered (and acked, in vain) on
/// each attachment: each successful attach started the backoff over, and it re-attached and
/// handed the event out again about 5 times a second (38 in these 8 s; an outside review
/// counted 92 to 109 re-attaches in 15 s, the event dead-lettered again at each one past its
/// attempts). With the backoff growing to `reconnect_max_delay` (1 s here): 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_stalled_by_an_unparsable_message_backs_off_whatever_comes_first() {
    let Some(node) = support::start_node() else {
        return;
    };
    let transport = support::transport(
        &node,
        "reconnect_min_delay_ms=100&reconnect_max_delay_ms=1000&command_timeout_ms=5000",
    )
    .await;
    let name = format!("backoff-{}", std::process::id());
    let queue = transport.queue(&name).await.expect("queue");
    let ahead = evbus::Event::builder("ahead", "/ahead")
        .json(&1)
        .expect("JSON")
        .build()
        .expect("an event");
    queue.send(&ahead).await.expect("send");
    publish_unparsable(&node, &transport.queue_name(&name)).await;
    let mut sub = queue
        .receive(
            ConsumerOptions::default()
                .max_in_flight(4)
                .max_attempts(1000),
        )
        .await
        .expect("receive");
    let started = Instant::now();
    let mut handed = 0;
    while let Some(left) = Duration::from_secs(8).checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, sub.next_delivery()).await {
            Ok(Some(Ok(d))) => {
                assert_eq!(d.event().id(), ahead.id());
                handed += 1;
                // Its ack fails (the connection drops with the message behind it) or lands.
                let _ = d.ack().await;
            }
            Ok(other) => panic!("the subscription yielded {:?}", other.map(|r| r.err())),
            Err(_) => break,
        }
    }
    assert!(
        (1..=16).contains(&handed),
        "the event ahead of the unparsable message was handed out {handed} times in 8 s \
         (one per attach; a backoff growing to 1 s allows about a dozen)"
    );
    drop(sub);
    transport.delete_queue(&name).await.expect("delete");
    transport.close().await.expect("close");
}

/// Whether the exchange (`kind` "exchange") or queue (`kind` "queue") `name` exists in the
/// default vhost of `node`.
async fn exists_on(node: &Arc<RabbitNode>, kind: &str, name: &str) -> bool {
    let module = match kind {
        "exchange" => "rabbit_exchange",
        _ => "rabbit_amqqueue",
    };
    let expr = format!(
        "case {module}:lookup(rabbit_misc:r(<<\"/\">>, {kind}, <<\"{name}\">>)) of \
         {{ok, _}} -> yes; {{error, not_found}} -> no end."
    );
    let printed = eval(node, expr, "looking up on the node").await;
    match printed.as_str() {
        "yes" => true,
        "no" => false,
        other => panic!("unexpected answer `{other}`"),
    }
}

/// Waits until `sub` ends (errors from its failed re-attaches are skipped); fails if it hands
/// out an event or is still open after `within`.
async fn until_ended(sub: &mut evbus::Subscription, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sub.next_delivery()).await {
            Ok(None) => return,
            Ok(Some(Err(_))) => {}
            Ok(Some(Ok(d))) => panic!("{what} handed out {} after its deletion", d.event().id()),
            Err(_) => panic!("{what} did not end within {within:?} after its deletion"),
        }
    }
}

/// A transport of the user `user` (added to `node` with every permission), re-attaching fast.
async fn connect_as(node: &RabbitNode, user: &str) -> evbus_amqp::AmqpTransport {
    node.add_user(user, ".*", ".*", ".*");
    let url = format!(
        "{}?reconnect_max_delay_ms=200&command_timeout_ms=5000",
        node.user_url(user)
    );
    evbus_amqp::AmqpTransport::connect(
        evbus_amqp::AmqpConfig::from_url(&url).expect("a valid AMQP URL"),
    )
    .await
    .expect("connecting as the test's user")
}

/// Cuts `user` off: its permissions on the vhost cleared and every connection of the node
/// closed, then `and_then` (Erlang expressions, each after a comma) in the same evaluation,
/// before any client can connect again.
async fn cut_off(node: &Arc<RabbitNode>, user: &str, and_then: &str) {
    let expr = format!(
        "ok = rabbit_auth_backend_internal:clear_permissions(<<\"{user}\">>, <<\"/\">>, \
         <<\"test\">>), rabbit_networking:close_all_connections(\"evbus test: cut off\")\
         {and_then}."
    );
    eval(node, expr, "cutting the user off").await;
}

/// Gives `user` its permissions back.
async fn let_in(node: &Arc<RabbitNode>, user: &str) {
    let expr = format!(
        "ok = rabbit_auth_backend_internal:set_permissions(<<\"{user}\">>, <<\"/\">>, \
         <<\".*\">>, <<\".*\">>, <<\".*\">>, <<\"test\">>)."
    );
    eval(node, expr, "letting the user in again").await;
}

/// A topic name and a queue name for this process, `<what>-t-<pid>` and `<what>-q-<pid>`.
fn names(what: &str) -> (String, String) {
    let pid = std::process::id();
    (format!("{what}-t-{pid}"), format!("{what}-q-{pid}"))
}

/// A named subscription `s` of topic `topic` and a consumer of queue `queue`, on `transport`.
async fn subscription_and_receiver(
    transport: &evbus_amqp::AmqpTransport,
    topic: &str,
    queue: &str,
) -> (evbus::Subscription, evbus::Subscription) {
    let subscription = transport
        .topic(topic)
        .await
        .expect("topic")
        .subscribe(SubscribeOptions::named("s"))
        .await
        .expect("subscribe");
    let receiver = transport
        .queue(queue)
        .await
        .expect("queue")
        .receive(ConsumerOptions::default())
        .await
        .expect("receive");
    (subscription, receiver)
}

/// A topic and a queue deleted while their consumers' connections were lost stay deleted:
/// the consumers end when they reach RabbitMQ again. They attached again as after any loss,
/// declaring the exchange, the subscription queue and its binding, and the queue, again: a
/// deletion undone, and queues nobody would read filling with every publish (reported by an
/// earlier session's review; a consumer that RabbitMQ cancels already looked first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_and_a_queue_deleted_while_their_consumers_were_cut_off_stay_deleted() {
    let Some(node) = support::start_node() else {
        return;
    };
    let user = "cutoff";
    let consumers = connect_as(&node, user).await;
    let (topic_name, queue_name) = names("cutoff");
    let (mut subscription, mut receiver) =
        subscription_and_receiver(&consumers, &topic_name, &queue_name).await;
    let exchange = consumers.exchange_name(&topic_name);
    let subscription_queue = consumers.subscription_queue_name(&topic_name, "s");
    let plain_queue = consumers.queue_name(&queue_name);
    for (kind, name) in [
        ("exchange", &exchange),
        ("queue", &subscription_queue),
        ("queue", &plain_queue),
    ] {
        assert!(exists_on(&node, kind, name).await, "{kind} {name} declared");
    }

    // The consumers' user may no longer open the vhost, and every connection is closed: they
    // try to attach again, and are refused, while the topic and the queue are deleted.
    cut_off(&node, user, "").await;
    // Connected after the cut, so that nothing of it was closed.
    let admin = support::transport(&node, "command_timeout_ms=5000").await;
    admin.delete_topic(&topic_name).await.expect("delete_topic");
    admin.delete_queue(&queue_name).await.expect("delete_queue");
    for (kind, name) in [
        ("exchange", &exchange),
        ("queue", &subscription_queue),
        ("queue", &plain_queue),
    ] {
        assert!(!exists_on(&node, kind, name).await, "{kind} {name} deleted");
    }
    let_in(&node, user).await;

    until_ended(
        &mut subscription,
        "the subscription",
        Duration::from_secs(30),
    )
    .await;
    until_ended(
        &mut receiver,
        "the queue's consumer",
        Duration::from_secs(30),
    )
    .await;
    for (kind, name) in [
        ("exchange", &exchange),
        ("queue", &subscription_queue),
        ("queue", &plain_queue),
    ] {
        assert!(
            !exists_on(&node, kind, name).await,
            "{kind} {name} was declared again after its deletion"
        );
    }
    let _ = consumers.close().await;
    let _ = admin.close().await;
}

/// Kills `node`, wipes its data and starts it again on the same port: a broker that came
/// back without its definitions (a new node with no data, a reset), nor its users but the
/// default one.
fn wipe(node: &RabbitNode) {
    node.kill();
    let mnesia = node.data_dir().join("mnesia");
    std::fs::remove_dir_all(&mnesia).expect("wiping the node's data");
    std::fs::create_dir_all(&mnesia).expect("wiping the node's data");
    tokio::task::block_in_place(|| node.restart()).expect("restarting the node");
}

/// Waits until the queues `names` exist on `node` again (declared by their consumers), then
/// publishes to topic `topic` and sends to queue `queue` from a new transport, and checks
/// that `subscription` and `receiver` get what was published and sent.
async fn declared_again_and_receiving(
    node: &Arc<RabbitNode>,
    names: [&str; 2],
    (topic, queue): (&str, &str),
    subscription: &mut evbus::Subscription,
    receiver: &mut evbus::Subscription,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in names {
        while !exists_on(node, "queue", name).await {
            assert!(
                Instant::now() < deadline,
                "queue {name} was not declared again after the broker lost its definitions"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let producer = support::transport(node, "command_timeout_ms=5000").await;
    let published =
        support::publish_numbered(&*producer.topic(topic).await.expect("topic"), "wiped", 1).await;
    let sent = evbus::Event::builder("wiped", "/wiped")
        .json(&1)
        .expect("JSON")
        .build()
        .expect("valid");
    producer
        .queue(queue)
        .await
        .expect("queue")
        .send(&sent)
        .await
        .expect("send");
    for (sub, want, what) in [
        (subscription, published[0].clone(), "the subscription"),
        (receiver, sent.id().to_owned(), "the queue's consumer"),
    ] {
        let got = loop {
            match tokio::time::timeout(Duration::from_secs(30), sub.next_delivery()).await {
                Ok(Some(Ok(delivery))) => break delivery,
                Ok(Some(Err(_))) => {}
                Ok(None) => panic!("{what} ended after the broker lost its definitions"),
                Err(_) => panic!("{what} received nothing within 30 s"),
            }
        };
        assert_eq!(got.event().id(), want, "{what}");
        got.ack().await.expect("ack");
    }
    let _ = producer.close().await;
}

/// Subscribes on `consumers` (a subscription and a queue consumer named after `what`), wipes
/// `node`, runs `meanwhile` (what happens before the consumers come back), and checks that
/// both declare their queues again and receive what is published from then on.
async fn survive_a_wipe(
    node: &Arc<RabbitNode>,
    consumers: &evbus_amqp::AmqpTransport,
    what: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) {
    let (topic_name, queue_name) = names(what);
    let (mut subscription, mut receiver) =
        subscription_and_receiver(consumers, &topic_name, &queue_name).await;
    let subscription_queue = consumers.subscription_queue_name(&topic_name, "s");
    let plain_queue = consumers.queue_name(&queue_name);
    wipe(node);
    meanwhile.await;
    declared_again_and_receiving(
        node,
        [&subscription_queue, &plain_queue],
        (&topic_name, &queue_name),
        &mut subscription,
        &mut receiver,
    )
    .await;
}

/// A broker that comes back without its definitions (a new node with no data, a reset)
/// keeps every subscription: they declare what they read again, and take what is published
/// from then on. Since consumers look before they attach again (so that a deletion stays a
/// deletion), they took such a broker for one that deleted everything and all ended
/// (outside review): a deletion leaves a tombstone, which such a broker has lost too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_broker_that_lost_its_definitions() {
    let Some(node) = support::start_node() else {
        return;
    };
    let consumers =
        support::transport(&node, "reconnect_max_delay_ms=300&command_timeout_ms=5000").await;
    survive_a_wipe(&node, &consumers, "wiped", async {}).await;
    let _ = consumers.close().await;
}

/// The same when another transport starts on the wiped broker before the consumers come
/// back (here: their user is gone with the definitions until the test adds it again). A
/// transport that started declared a marker whose absence told consumers that the broker
/// lost its definitions: found again, every subscription ended (outside review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_wiped_broker_that_another_transport_reached_first() {
    let Some(node) = support::start_node() else {
        return;
    };
    let user = "wipedfirst";
    let consumers = connect_as(&node, user).await;
    // The consumers' user is gone with the definitions: they cannot attach yet. Another
    // process starts and opens a topic of its own, then the user is added again.
    let meanwhile = async {
        let early = support::transport(&node, "command_timeout_ms=5000").await;
        early.topic("wipedfirst-other").await.expect("topic");
        early.close().await.expect("close");
        connect_as(&node, user).await.close().await.expect("close");
    };
    survive_a_wipe(&node, &consumers, "wipedfirst", meanwhile).await;
    let _ = consumers.close().await;
}

/// A named subscription `s` of topic `<user>-<pid>`, on a transport of `user`.
struct Named {
    consumers: evbus_amqp::AmqpTransport,
    topic_name: String,
    subscription: evbus::Subscription,
    exchange: String,
    queue: String,
}

async fn named_subscription_as(node: &Arc<RabbitNode>, user: &str) -> Named {
    let consumers = connect_as(node, user).await;
    let topic_name = format!("{user}-{}", std::process::id());
    let subscription = consumers
        .topic(&topic_name)
        .await
        .expect("topic")
        .subscribe(SubscribeOptions::named("s"))
        .await
        .expect("subscribe");
    Named {
        exchange: consumers.exchange_name(&topic_name),
        queue: consumers.subscription_queue_name(&topic_name, "s"),
        consumers,
        topic_name,
        subscription,
    }
}

/// `delete_topic` sticks while a producer keeps publishing: the producer declares the
/// topic's exchange again after the `NotFound` its next publish meets, and the
/// subscription's consumer, cut off during the deletion, then found its queue gone beside
/// an exchange and took the queue for one deleted with another tool: it declared, recorded
/// and bound it again and went on consuming (outside review, deterministic with a cut-off
/// consumer, 3 runs in 3 with a connected one). The tombstone `delete_topic` leaves ends
/// it; opening the topic again takes the tombstone away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_topic_sticks_while_a_producer_keeps_publishing() {
    let Some(node) = support::start_node() else {
        return;
    };
    let user = "producing";
    let Named {
        consumers,
        topic_name,
        mut subscription,
        exchange,
        queue,
    } = named_subscription_as(&node, user).await;
    let tombstone = format!("{exchange}_deleted");
    let producer =
        support::transport(&node, "command_timeout_ms=5000&tombstone_ttl_ms=3600000").await;
    let topic = producer.topic(&topic_name).await.expect("topic");

    cut_off(&node, user, "").await;
    producer
        .delete_topic(&topic_name)
        .await
        .expect("delete_topic");
    // The tombstone expires after the transport's `tombstone_ttl` unused.
    let expr = format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, \
         <<\"{tombstone}\">>)), rabbit_amqqueue:info(Q, [arguments])."
    );
    let arguments = eval(&node, expr, "reading the tombstone's arguments").await;
    assert!(
        arguments.contains("x-expires") && arguments.contains("3600000"),
        "{arguments}"
    );
    // The producer goes on: the first publish meets the deleted exchange, a later one
    // declares it again.
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let event = evbus::Event::builder("producing", "/producing")
            .build()
            .expect("valid");
        outcomes.push(topic.publish(&event).await.map_err(|e| e.kind()));
        if exists_on(&node, "exchange", &exchange).await {
            break;
        }
    }
    assert!(
        exists_on(&node, "exchange", &exchange).await,
        "the producer did not declare the exchange again: {outcomes:?}"
    );
    let_in(&node, user).await;

    until_ended(
        &mut subscription,
        "the subscription",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !exists_on(&node, "queue", &queue).await,
        "the subscription's queue was declared again after `delete_topic`"
    );
    // Opened again, the topic is a topic like any other: a subscription made now is not
    // ended by the deletion before it (its queue deleted with another tool comes back).
    let again = producer
        .topic(&topic_name)
        .await
        .expect("topic")
        .subscribe(SubscribeOptions::named("t"))
        .await
        .expect("subscribe");
    let new_queue = producer.subscription_queue_name(&topic_name, "t");
    eval(
        &node,
        format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, \
             <<\"{new_queue}\">>)), rabbit_amqqueue:delete(Q, false, false, <<\"test\">>)."
        ),
        "deleting the new subscription's queue",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exists_on(&node, "queue", &new_queue).await {
        assert!(
            Instant::now() < deadline,
            "the new subscription ended with the deletion before it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(again);
    let _ = consumers.close().await;
    let _ = producer.close().await;
}

/// Messages in quorum queue `queue` of `node`.
async fn messages_in(node: &Arc<RabbitNode>, queue: &str) -> u64 {
    let expr = format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         [{{messages, M}}] = rabbit_amqqueue:info(Q, [messages]), M."
    );
    eval(node, expr, "reading the queue's length")
        .await
        .parse()
        .expect("a count")
}

/// Each publish gets its own confirm while others publish on the transport at once. lapin
/// numbers a message for its confirm before it queues the message's frames, so concurrent
/// publishes on the shared publisher channel reached RabbitMQ in another order than they
/// were numbered: beside large events, sends that RabbitMQ refused (a full queue that
/// rejects publishes) returned `Ok` and were lost, and as many stored large events were
/// reported refused (an outside review: 173 swapped in 20 s with 8 MiB events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_get_their_own_confirm() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(node) = support::start_node() else {
        return;
    };
    let transport = Arc::new(support::transport(&node, "command_timeout_ms=30000").await);
    let pid = std::process::id();
    let (full_name, big_name) = (format!("full-{pid}"), format!("big-{pid}"));
    let (full_queue, big_queue) = (
        transport.queue_name(&full_name),
        transport.queue_name(&big_name),
    );
    // The full queue keeps one message and refuses every other publish (a negative confirm).
    node.eval(&format!(
        "ok = rabbit_policy:set(<<\"/\">>, <<\"full\">>, <<\"^{full_queue}$\">>, \
         [{{<<\"max-length\">>, 1}}, {{<<\"overflow\">>, <<\"reject-publish\">>}}], 0, \
         <<\"queues\">>, <<\"test\">>)."
    ))
    .expect("setting the policy");
    let full = transport.queue(&full_name).await.expect("queue");
    let big = transport.queue(&big_name).await.expect("queue");
    // Applied to the new queue in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let expr = format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, \
             <<\"{full_queue}\">>)), rabbit_amqqueue:info(Q, [policy])."
        );
        let policy = eval(&node, expr, "reading the queue's policy").await;
        if policy.contains("full") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy was not applied: {policy}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let small = || {
        evbus::Event::builder("small", "/test")
            .json(&1)
            .expect("JSON")
            .build()
            .expect("valid")
    };
    // A quorum queue takes one message over its limit before it refuses.
    let mut taken = 0;
    while full.send(&small()).await.is_ok() {
        taken += 1;
        assert!(taken < 5, "the full queue does not refuse publishes");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let small_sends = {
        let (stop, full) = (Arc::clone(&stop), Arc::clone(&full));
        tokio::spawn(async move {
            let mut ok = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if full.send(&small()).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        })
    };
    let big_sends = {
        let (stop, big) = (Arc::clone(&stop), Arc::clone(&big));
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let event = evbus::Event::builder("big", "/test")
                    .data("application/octet-stream", vec![7u8; 2 << 20])
                    .build()
                    .expect("valid");
                match big.send(&event).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let small_ok = small_sends.await.unwrap();
    let (big_ok, big_failed) = big_sends.await.unwrap();
    assert_eq!(
        small_ok,
        0,
        "sends the full queue refused returned Ok ({} large sends failed: {:?})",
        big_failed.len(),
        big_failed.first()
    );
    assert!(
        big_failed.is_empty(),
        "{} large sends failed: {:?}",
        big_failed.len(),
        big_failed.first()
    );
    assert!(big_ok > 0, "no large send finished");
    // The queue counts what it has written, which can trail the confirms a little.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = messages_in(&node, &big_queue).await;
        if stored == big_ok || Instant::now() > deadline {
            assert_eq!(stored, big_ok, "large events stored");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = transport.close().await;
}

/// A named subscription whose topic's exchange alone was deleted (with another tool) while
/// its connection was lost declares the exchange again and re-attaches, as it did before
/// consumers looked first. Attached without declaring what the look found, its binding
/// failed at every try, and it neither recovered nor ended (outside review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_exchange_alone_was_deleted_declares_it_again() {
    let Some(node) = support::start_node() else {
        return;
    };
    let user = "exchangeless";
    let Named {
        consumers,
        subscription: _subscription,
        exchange,
        queue,
        ..
    } = named_subscription_as(&node, user).await;
    let delete = format!(
        ", rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{exchange}\">>), \
         false, <<\"test\">>)"
    );
    cut_off(&node, user, &delete).await;
    assert!(!exists_on(&node, "exchange", &exchange).await);
    assert!(exists_on(&node, "queue", &queue).await);
    let_in(&node, user).await;
    // No publisher runs: the consumer itself brings the exchange back and consumes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exists_on(&node, "exchange", &exchange).await {
        assert!(
            Instant::now() < deadline,
            "the exchange was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_attached(&node, &queue, 0, Duration::from_secs(30)).await;
    let _ = consumers.close().await;
}
