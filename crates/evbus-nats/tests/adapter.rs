//! NATS-specific behaviour beyond the conformance suite: what a stock NATS client sees of an
//! evbus event, foreign messages, clean-up of anonymous subscriptions, connection errors and
//! payload limits. Runs against the server at `EVBUS_NATS_URL` (default
//! `nats://127.0.0.1:4222`), and against a `nats-server` it starts itself where a test needs
//! its own server configuration.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use evbus::raw::{DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON, UNDECODABLE_EVENT_TYPE};
use evbus::{ConsumerOptions, ErrorKind, Event, StartPosition, SubscribeOptions, Transport};
use evbus_nats::{NatsConfig, NatsTransport};

const WAIT: Duration = Duration::from_secs(15);

fn url() -> String {
    std::env::var("EVBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A name unique to this test run.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("adapter-{what}-{}-{nanos}", std::process::id())
}

async fn transport() -> NatsTransport {
    NatsTransport::connect(NatsConfig::from_url(&url()).expect("a valid URL"))
        .await
        .expect("the NATS server at EVBUS_NATS_URL is reachable, with JetStream")
}

/// The next delivery of `subscription`, within [`WAIT`].
async fn next(subscription: &mut evbus::Subscription) -> evbus::Delivery {
    tokio::time::timeout(WAIT, subscription.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("the stream goes on")
        .unwrap()
}

/// The first record of the dead-letter queue `dlq_name`, within [`WAIT`].
async fn first_dead_letter(transport: &NatsTransport, dlq_name: &str) -> evbus::Delivery {
    let dlq = transport.queue(dlq_name).await.unwrap();
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    tokio::time::timeout(WAIT, dead.next_delivery())
        .await
        .expect("a dead letter in time")
        .expect("the dead-letter queue flows")
        .unwrap()
}

async fn plain_client() -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(url()).await.expect("connecting");
    let js = jetstream::new(client.clone());
    (client, js)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_nats_client_reads_ce_headers_and_json_data() {
    let transport = transport().await;
    let name = unique("stock");
    let topic = transport.topic(&name).await.unwrap();
    let event = Event::builder("afterOrderCreate", "/shop/orders")
        .json(&serde_json::json!({"orderId": "o-42", "total": 99.5}))
        .unwrap()
        .subject("orders/o-42")
        .partition_key("o-42")
        .build()
        .unwrap();
    topic.publish(&event).await.unwrap();

    // A plain async-nats JetStream client, knowing nothing of evbus, reads the stored message.
    let (_client, js) = plain_client().await;
    let stream_name = transport.topic_stream(&name).unwrap();
    let stream = js.get_stream(&stream_name).await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    let headers = message.headers.clone();
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());

    println!("stream {stream_name}, sequence {}", message.sequence);
    println!("subject: {}", message.subject);
    let mut lines: Vec<String> = headers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{k}: {v}")))
        .collect();
    lines.sort();
    for line in &lines {
        println!("{line}");
    }
    println!("data: {}", String::from_utf8_lossy(&message.payload));

    assert_eq!(
        message.subject.as_str(),
        transport.topic_subject(&name).unwrap()
    );
    assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(header("ce-id").as_deref(), Some(event.id()));
    assert_eq!(header("ce-type").as_deref(), Some("afterOrderCreate"));
    assert_eq!(header("ce-source").as_deref(), Some("/shop/orders"));
    assert_eq!(header("ce-subject").as_deref(), Some("orders/o-42"));
    assert_eq!(header("ce-partitionkey").as_deref(), Some("o-42"));
    assert!(header("ce-time").is_some());
    assert_eq!(header("Content-Type").as_deref(), Some("application/json"));
    // The event id is the JetStream de-duplication id.
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some(event.id()));
    let data: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(data, serde_json::json!({"orderId": "o-42", "total": 99.5}));

    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// A subscription dropped with messages it had fetched ahead gives them back: subscribing
/// again gets them at once, not after the visibility timeout (a CLI reading one event, or
/// looking for one dead letter, used to hide the rest for `ack_wait`).
#[tokio::test(flavor = "multi_thread")]
async fn messages_fetched_ahead_by_a_dropped_subscription_come_back_at_once() {
    let transport = transport().await;
    let name = unique("giveback");
    let topic = transport.topic(&name).await.unwrap();
    // Far longer than WAIT: an event that waits it out fails the test.
    let options = || {
        SubscribeOptions::named("g")
            .start(StartPosition::Earliest)
            .consumer(
                ConsumerOptions::default()
                    .max_in_flight(8)
                    .visibility_timeout(Duration::from_secs(120)),
            )
    };
    let events: Vec<Event> = (0..5)
        .map(|i| Event::builder("t", "/s").json(&i).unwrap().build().unwrap())
        .collect();
    topic.publish_batch(&events).await.unwrap();
    let mut first = topic.subscribe(options()).await.unwrap();
    let d = next(&mut first).await;
    assert_eq!(d.event().id(), events[0].id());
    d.ack().await.unwrap();
    drop(first);
    let mut again = topic.subscribe(options()).await.unwrap();
    let mut got = Vec::new();
    for _ in 1..events.len() {
        let d = next(&mut again).await;
        got.push(d.event().id().to_owned());
        d.ack().await.unwrap();
    }
    got.sort();
    let mut expected: Vec<String> = events[1..].iter().map(|e| e.id().to_owned()).collect();
    expected.sort();
    assert_eq!(got, expected);
    drop(again);
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// The server starts a message's `ack_wait` as it sends it into a pull request, not when the
/// subscription hands it out. A message waiting in a fetched batch is renewed only while the
/// subscription's stream is polled: once nobody polled it for a whole timeout, its timeout
/// runs out, and it is never handed out: the server's redelivery is, on attempt 2, with a
/// live lease (a renewal of the stale copy, or its ack, would land on the redelivery, which
/// another consumer may hold).
#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_waited_in_a_batch_nobody_polled_is_not_renewed_past_its_timeout() {
    let transport = transport().await;
    let name = unique("renew-waited");
    let queue = transport.queue(&name).await.unwrap();
    let events = [event(0), event(1)];
    for e in &events {
        queue.send(e).await.unwrap();
    }
    let visibility = Duration::from_secs(1);
    // Both come in the first pull request.
    let mut c = queue
        .receive(
            ConsumerOptions::default()
                .max_in_flight(2)
                .visibility_timeout(visibility),
        )
        .await
        .unwrap();
    let first = next(&mut c).await;
    // The stream is not polled for two and a half timeouts: the second is renewed for one
    // timeout at most, then its own runs out. The first is renewed by its holder.
    for _ in 0..5 {
        tokio::time::sleep(visibility / 2).await;
        first.renew().await.unwrap();
    }
    let second = next(&mut c).await;
    assert_eq!(second.event().id(), events[1].id());
    assert_eq!(
        second.attempt(),
        2,
        "the copy whose timeout ran out in the batch was handed out"
    );
    second.renew().await.unwrap();
    // The first, renewed in time, is still its holder's.
    first.renew().await.unwrap();
    first.ack().await.unwrap();
    drop((second, c));
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// Messages a consumer fetched ahead (into its in-flight room) wait for it while it reads
/// its stream, however long past the visibility timeout: renewed in the batch, they are not
/// handed to another consumer of the queue meanwhile, and each delivery's own timeout
/// counts from its last renewal (its holder can renew it when it gets it at last). A
/// consumer with room for 4 takes 4 messages one at a time, holding each for two fifths of
/// the timeout: the last waits for over a timeout.
#[tokio::test(flavor = "multi_thread")]
async fn messages_fetched_ahead_wait_for_a_consumer_in_use_and_go_to_no_other() {
    let transport = transport().await;
    let name = unique("ahead-in-use");
    let queue = transport.queue(&name).await.unwrap();
    let events: Vec<Event> = (0..4).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let visibility = Duration::from_secs(1);
    let options = ConsumerOptions::default()
        .max_in_flight(4)
        .visibility_timeout(visibility);
    let mut slow = queue.receive(options.clone()).await.unwrap();
    // The first pull request, with every slot free, brings all 4 (they are stored already).
    let first = next(&mut slow).await;
    // Another consumer of the queue, waiting: a message whose timeout ran out would come to
    // it. It keeps the first delivery it gets.
    let mut other = queue.receive(options).await.unwrap();
    let other_got = tokio::spawn(async move {
        let got = tokio::time::timeout(WAIT, other.next_delivery()).await;
        (got, other)
    });
    let started = tokio::time::Instant::now();
    let mut delivery = first;
    for (at, event) in events.iter().enumerate() {
        if at > 0 {
            delivery = next(&mut slow).await;
        }
        assert_eq!(
            (delivery.event().id(), delivery.attempt()),
            (event.id(), 1),
            "delivery {at}, after {:?}",
            started.elapsed()
        );
        // The consumer at work; then its delivery, waited for up to a timeout and more
        // before it was handed out, is still its own.
        tokio::time::sleep(visibility * 2 / 5).await;
        delivery
            .renew()
            .await
            .unwrap_or_else(|e| panic!("renewing delivery {at}: {e}"));
        delivery.ack().await.unwrap();
    }
    assert!(started.elapsed() > visibility);
    // The other consumer's first delivery is the next event sent: none of the 4 came to it.
    drop(slow);
    let sentinel = event(99);
    queue.send(&sentinel).await.unwrap();
    let (got, other) = other_got.await.unwrap();
    let got = got
        .expect("the sentinel in time")
        .expect("the stream goes on")
        .unwrap();
    assert_eq!(
        (got.event().id(), got.attempt()),
        (sentinel.id(), 1),
        "the other consumer got a message fetched ahead by the consumer in use"
    );
    got.ack().await.unwrap();
    drop(other);
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// Messages a consumer fetched ahead are renewed only while it reads its stream: once it
/// has not been polled for a whole visibility timeout (its holder hung or stopped reading),
/// their timeouts run out and another consumer of the queue gets them, as redeliveries.
#[tokio::test(flavor = "multi_thread")]
async fn messages_fetched_ahead_by_a_consumer_that_stopped_reading_go_to_another() {
    let transport = transport().await;
    let name = unique("ahead-stopped");
    let queue = transport.queue(&name).await.unwrap();
    let events: Vec<Event> = (0..4).map(event).collect();
    queue.send_batch(&events).await.unwrap();
    let options = ConsumerOptions::default()
        .max_in_flight(4)
        .visibility_timeout(Duration::from_secs(1));
    let mut stopped = queue.receive(options.clone()).await.unwrap();
    // The first pull request brings all 4; the consumer takes one, then reads no more.
    let first = next(&mut stopped).await;
    assert_eq!(first.event().id(), events[0].id());
    first.ack().await.unwrap();
    let mut other = queue.receive(options).await.unwrap();
    let mut got = Vec::new();
    for _ in 1..events.len() {
        let d = next(&mut other).await;
        assert_eq!(
            d.attempt(),
            2,
            "{} came to the other consumer",
            d.event().id()
        );
        got.push(d.event().id().to_owned());
        d.ack().await.unwrap();
    }
    got.sort();
    let mut expected: Vec<String> = events[1..].iter().map(|e| e.id().to_owned()).collect();
    expected.sort();
    assert_eq!(got, expected);
    drop((stopped, other));
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// A consumer that comes back after a pause longer than the visibility timeout hands out
/// nothing that timed out meanwhile, whether it fetched it ahead (`waiting` false: it took
/// one of 4, then paused) or it arrived while its stream waited on an empty batch and then
/// went unpolled (`waiting` true). The server delivered those again to the other consumer,
/// on attempt 2; handed out here too they ran twice, the second copy on attempt 1 with its
/// renewal and ack landing on the other's delivery (outside review of ADR 0037).
async fn a_consumer_back_from_a_pause_hands_out_nothing_that_timed_out(waiting: bool) {
    let transport = transport().await;
    let name = unique(if waiting {
        "pause-waiting"
    } else {
        "pause-ahead"
    });
    let queue = transport.queue(&name).await.unwrap();
    let events: Vec<Event> = (0..4).map(event).collect();
    let options = ConsumerOptions::default()
        .max_in_flight(4)
        .visibility_timeout(Duration::from_secs(1));
    let mut paused = queue.receive(options.clone()).await.unwrap();
    let mut expected: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    if waiting {
        // Its stream waits on an empty batch when the events come.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), paused.next_delivery())
                .await
                .is_err()
        );
        queue.send_batch(&events).await.unwrap();
    } else {
        queue.send_batch(&events).await.unwrap();
        let first = next(&mut paused).await;
        assert_eq!(first.event().id(), events[0].id());
        first.ack().await.unwrap();
        expected.remove(0);
    }
    let mut other = queue.receive(options).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let d = next(&mut other).await;
        assert_eq!(
            d.attempt(),
            2,
            "{} came to the other consumer",
            d.event().id()
        );
        got.push(d.event().id().to_owned());
        d.ack().await.unwrap();
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    // Back, past the timeout of all it held: nothing it hands out is one of those.
    if let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(1500), paused.next_delivery()).await
    {
        panic!(
            "the consumer back from its pause handed out {} on attempt {}, which the other \
             consumer had already run",
            d.event().id(),
            d.attempt()
        );
    }
    drop((paused, other));
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_back_from_a_pause_hands_out_nothing_it_fetched_ahead_that_timed_out() {
    a_consumer_back_from_a_pause_hands_out_nothing_that_timed_out(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_back_from_a_pause_hands_out_nothing_that_came_while_it_waited_and_timed_out() {
    a_consumer_back_from_a_pause_hands_out_nothing_that_timed_out(true).await;
}

/// A pull request asks only for the consumer's free in-flight slots: with `max_in_flight` 4
/// and 3 deliveries held unsettled, taking one more pulls one message, not 4. The messages a
/// pull brought beyond the free slots waited in the batch with their `ack_wait` running,
/// renewed by nobody, and came back as redeliveries (an ordered handler ran events twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_asks_only_for_the_free_in_flight_slots() {
    let transport = transport().await;
    let name = unique("free-slots");
    let queue = transport.queue(&name).await.unwrap();
    for n in 0..10 {
        queue.send(&event(n)).await.unwrap();
    }
    // Far longer than the test: nothing is redelivered meanwhile.
    let mut c = queue
        .receive(
            ConsumerOptions::default()
                .max_in_flight(4)
                .visibility_timeout(Duration::from_secs(120)),
        )
        .await
        .unwrap();
    // The first pull request, with every slot free, brings 4.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut c).await);
    }
    // One settled: 3 held unsettled, one slot free.
    held.remove(0).ack().await.unwrap();
    held.push(next(&mut c).await);
    let (_client, js) = plain_client().await;
    let stream = js
        .get_stream(transport.queue_stream(&name).unwrap())
        .await
        .unwrap();
    // Time for the server to send whatever a larger request asked for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = stream.consumer_info("evbus-queue").await.unwrap();
    assert!(
        info.num_ack_pending <= 4,
        "{} messages pulled and unacknowledged with max_in_flight 4 (4 held)",
        info.num_ack_pending
    );
    assert_eq!(
        info.delivered.consumer_sequence, 5,
        "messages delivered to a consumer that took 5"
    );
    // The rest flow on as slots free up, each once.
    let mut seen = 5;
    while let Some(delivery) = held.pop() {
        delivery.ack().await.unwrap();
        if seen < 10 {
            let d = next(&mut c).await;
            assert_eq!(d.attempt(), 1);
            held.push(d);
            seen += 1;
        }
    }
    drop(c);
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// A look at a queue (what `evbus dlq list` does, each on a transport of its own closed right
/// after): it holds what it received, ends its subscription, gives everything back with a
/// plain nack and closes. The server redelivers the given-back messages at once, into the
/// ended subscription's pull request, which stays open until it expires; a close that stopped
/// reading that request left them unacknowledged in it, hidden for the visibility timeout.
/// Every look, and a last one, must see every message.
#[tokio::test(flavor = "multi_thread")]
async fn what_looks_closed_right_after_give_back_comes_back_to_the_next_look() {
    let name = unique("look-close");
    let setup = transport().await;
    let queue = setup.queue(&name).await.unwrap();
    let events: Vec<Event> = (0..4)
        .map(|i| Event::builder("t", "/s").json(&i).unwrap().build().unwrap())
        .collect();
    for event in &events {
        queue.send(event).await.unwrap();
    }
    let mut expected: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    expected.sort();
    for look in 0..5 {
        let transport = transport().await;
        let queue = transport.queue(&name).await.unwrap();
        // Far longer than WAIT: a message hidden for it fails the test.
        let mut sub = queue
            .receive(
                ConsumerOptions::default()
                    .max_attempts(u32::MAX)
                    .max_in_flight(64)
                    .visibility_timeout(Duration::from_secs(120)),
            )
            .await
            .unwrap();
        let mut held = Vec::new();
        while held.len() < events.len() {
            match tokio::time::timeout(WAIT, sub.next_delivery()).await {
                Ok(Some(delivery)) => held.push(delivery.unwrap()),
                _ => break,
            }
        }
        let mut seen: Vec<String> = held.iter().map(|d| d.event().id().to_owned()).collect();
        seen.sort();
        assert_eq!(seen, expected, "look {look}");
        drop(sub);
        for delivery in held {
            delivery.nack(None).await.unwrap();
        }
        transport.close().await.unwrap();
    }
    setup.delete_queue(&name).await.unwrap();
    setup.close().await.unwrap();
}

/// `evbus dlq list` again and again, as a script polls it: each look a transport of its own,
/// closed right after, ending once nothing new came for a short idle. What one look gave back
/// must be there for the next at once, every time: a give-back the server had not applied
/// when the next look started (a `-NAK` sent without waiting for the server) left records
/// out of a look, or in it twice.
#[tokio::test(flavor = "multi_thread")]
async fn looks_in_a_row_each_see_every_dead_letter_once() {
    let ty = unique("looks-row");
    let group = "g";
    let catalog = || {
        let mut catalog = evbus::Catalog::builder();
        catalog.strict(false);
        catalog.freeze().unwrap()
    };
    let setup = transport().await;
    let setup_bus = evbus::Bus::new(std::sync::Arc::new(setup.clone()), catalog(), "/test");
    let dlq_name = setup_bus.dead_letter_queue_name(&ty, group);
    let dlq = setup.queue(&dlq_name).await.unwrap();
    let events: Vec<Event> = (0..6)
        .map(|i| Event::builder(&ty, "/s").json(&i).unwrap().build().unwrap())
        .collect();
    for event in &events {
        dlq.send(event).await.unwrap();
    }
    let mut expected: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    expected.sort();
    for look in 0..12 {
        let transport = transport().await;
        let bus = evbus::Bus::new(std::sync::Arc::new(transport.clone()), catalog(), "/test");
        let dead = bus.dead_letters(&ty, group).await.unwrap();
        let mut seen: Vec<String> = dead
            .peek(100, Duration::from_millis(1500))
            .await
            .unwrap()
            .iter()
            .map(|d| d.event().id().to_owned())
            .collect();
        seen.sort();
        assert_eq!(seen, expected, "look {look}");
        transport.close().await.unwrap();
    }
    setup.delete_queue(&dlq_name).await.unwrap();
    setup.close().await.unwrap();
}

/// A queue is not deduplicated: the same event sent twice is two messages (core sends an id
/// again on purpose: a dead letter of an event dead-lettered before, a redrive).
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_keeps_every_send_of_an_event_id() {
    let transport = transport().await;
    let name = unique("queue-dup");
    let queue = transport.queue(&name).await.unwrap();
    let event = Event::builder("t", "/s").json(&1).unwrap().build().unwrap();
    queue.send(&event).await.unwrap();
    queue.send(&event).await.unwrap();
    let (_client, js) = plain_client().await;
    let mut stream = js
        .get_stream(transport.queue_stream(&name).unwrap())
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_the_same_event_twice_stores_it_once() {
    let transport = transport().await;
    let name = unique("dedup");
    let topic = transport.topic(&name).await.unwrap();
    let event = Event::builder("t", "/s").json(&1).unwrap().build().unwrap();
    topic.publish(&event).await.unwrap();
    topic.publish(&event).await.unwrap();
    topic
        .publish_batch(&[event.clone(), event.clone()])
        .await
        .unwrap();

    let (_client, js) = plain_client().await;
    let mut stream = js
        .get_stream(transport.topic_stream(&name).unwrap())
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_mode_events_of_stock_sdks_are_read_with_or_without_headers() {
    // A stock CloudEvents SDK on NATS publishes structured mode: the event as JSON in the
    // payload, with no headers at all (the binding before NATS had headers) or with a
    // CloudEvents content type. Both are events; a JSON object that is not one is dead-lettered.
    let transport = transport().await;
    let name = unique("structured");
    let topic = transport.topic(&name).await.unwrap();
    let options = SubscribeOptions::named("billing")
        .start(StartPosition::Earliest)
        .consumer(ConsumerOptions::default().max_attempts(1));
    let mut subscription = topic.subscribe(options).await.unwrap();
    let (client, js) = plain_client().await;
    let subject = transport.topic_subject(&name).unwrap();
    let body = |id: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/sdk","type":"afterOrderCreate","datacontenttype":"application/json","data":{{"orderId":"{id}"}}}}"#
        )
    };
    js.publish(subject.clone(), body("bare").into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Content-Type",
        "application/cloudevents+json; charset=utf-8",
    );
    js.publish_with_headers(subject.clone(), headers, body("typed").into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(subject, r#"{"orderId":"not-an-event"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let last = Event::builder("after", "/s")
        .json(&3)
        .unwrap()
        .build()
        .unwrap();
    topic.publish(&last).await.unwrap();

    for id in ["bare", "typed"] {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.event().id(), id);
        assert_eq!(delivery.event().ty(), "afterOrderCreate");
        assert_eq!(
            delivery.event().data().map(|d| &d[..]),
            Some(format!(r#"{{"orderId":"{id}"}}"#).as_bytes())
        );
        delivery.ack().await.unwrap();
    }
    let delivery = next(&mut subscription).await;
    assert_eq!(
        delivery.event().id(),
        last.id(),
        "the JSON that is no event is skipped"
    );
    delivery.ack().await.unwrap();

    let dlq_name = format!("{name}.billing.dlq");
    let record = first_dead_letter(&transport, &dlq_name).await;
    assert_eq!(record.event().ty(), UNDECODABLE_EVENT_TYPE);
    let reason = record
        .event()
        .extension(DEAD_LETTER_REASON)
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("structured-mode"), "{reason}");
    record.ack().await.unwrap();

    drop(client);
    transport.delete_topic(&name).await.unwrap();
    transport.delete_queue(&dlq_name).await.unwrap();
    transport.close().await.unwrap();
}

/// A Bus handler's `on_dead_letter` hook hears of the messages its subscription moves aside
/// by itself: `evbus consume` reports each dead letter on stderr through it.
#[tokio::test(flavor = "multi_thread")]
async fn a_handlers_dead_letter_hook_hears_of_a_foreign_message() {
    let transport = std::sync::Arc::new(transport().await);
    let mut catalog = evbus::Catalog::builder();
    catalog.strict(false);
    let bus = evbus::Bus::builder(transport.clone(), catalog.freeze().unwrap()).build();
    let ty = unique("hook");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = bus
        .on(ty.clone(), "g", |_msg: evbus::Message| async { Ok(()) })
        .start_position(StartPosition::Earliest)
        .on_dead_letter(move |event, reason| {
            let _ = tx.send((event.ty().to_owned(), reason.to_owned()));
        })
        .start()
        .await
        .unwrap();
    let (_client, js) = plain_client().await;
    js.publish(
        transport.topic_subject(&bus.topic_name(&ty)).unwrap(),
        "plain text, no ce- headers".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let (record_type, reason) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the hook called in time")
        .unwrap();
    assert_eq!(record_type, UNDECODABLE_EVENT_TYPE);
    assert!(reason.starts_with("undecodable message"), "{reason}");
    handle.shutdown(Duration::from_secs(5)).await;
    transport.delete_topic(&bus.topic_name(&ty)).await.unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_message_is_dead_lettered_as_undecodable_and_the_stream_flows_on() {
    let transport = transport().await;
    let name = unique("foreign");
    let topic = transport.topic(&name).await.unwrap();
    let options = SubscribeOptions::named("billing")
        .start(StartPosition::Earliest)
        .consumer(ConsumerOptions::default().max_attempts(3));
    let mut subscription = topic.subscribe(options.clone()).await.unwrap();

    // A plain client publishes something that is not a CloudEvent to the topic's subject.
    let (client, js) = plain_client().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Origin", "legacy-service");
    js.publish_with_headers(
        transport.topic_subject(&name).unwrap(),
        headers,
        "plain text, no ce- headers".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let event = Event::builder("after", "/s")
        .json(&2)
        .unwrap()
        .build()
        .unwrap();
    topic.publish(&event).await.unwrap();

    // The consumer gets the valid event only.
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.event().id(), event.id());
    delivery.ack().await.unwrap();

    // The foreign message went to the subscription's dead-letter queue, with the metadata.
    let dlq_name = format!("{name}.billing.dlq");
    let record = first_dead_letter(&transport, &dlq_name).await;
    assert_eq!(record.event().ty(), UNDECODABLE_EVENT_TYPE);
    assert!(
        record
            .event()
            .extension(DEAD_LETTER_REASON)
            .unwrap_or_default()
            .contains("ce-specversion"),
        "{:?}",
        record.event()
    );
    assert_eq!(
        record.event().extension(DEAD_LETTER_ORIGIN),
        Some(format!("{name}/billing").as_str())
    );
    // The placeholder carries the raw headers and body.
    let placeholder = String::from_utf8_lossy(record.event().data().expect("placeholder data"));
    assert!(placeholder.contains("legacy-service"), "{placeholder}");
    assert!(placeholder.contains("X-Origin"), "{placeholder}");
    record.ack().await.unwrap();

    drop(client);
    transport.delete_topic(&name).await.unwrap();
    transport.delete_queue(&dlq_name).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_subscription_leaves_no_consumer_behind_after_close() {
    let transport = transport().await;
    let name = unique("anon");
    let topic = transport.topic(&name).await.unwrap();
    let first = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let second = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let (_client, js) = plain_client().await;
    let mut stream = js
        .get_stream(transport.topic_stream(&name).unwrap())
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 2);

    // Dropping one subscription removes its consumer; closing the transport removes the rest.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    while stream.info().await.unwrap().state.consumer_count != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped subscription's consumer is still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    transport.close().await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
    drop(second);

    let cleanup = self::transport().await;
    cleanup.delete_topic(&name).await.unwrap();
    cleanup.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_and_queues_with_dots_and_odd_characters_get_their_own_streams() {
    let transport = transport().await;
    let base = unique("names");
    let names = [
        format!("{base}.a.b"),
        format!("{base}=a=b"),
        format!("{base} a*b>"),
    ];
    for name in &names {
        let topic = transport.topic(name).await.unwrap();
        let mut s = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
        let event = Event::builder("t", "/s")
            .json(name)
            .unwrap()
            .build()
            .unwrap();
        topic.publish(&event).await.unwrap();
        let d = tokio::time::timeout(WAIT, s.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), event.id(), "{name}");
        d.ack().await.unwrap();
    }
    let streams: std::collections::HashSet<String> = names
        .iter()
        .map(|n| transport.topic_stream(n).unwrap())
        .collect();
    assert_eq!(streams.len(), names.len(), "{streams:?}");
    for name in &names {
        transport.delete_topic(name).await.unwrap();
    }
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_a_retryable_connection_error() {
    let port = evbus_conformance::process::free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}?connect_timeout_ms=500");
    let err = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_of_seed_servers_gets_past_the_ones_that_are_down() {
    let server = support::NatsServer::start().expect("starting a nats-server");
    let dead = evbus_conformance::process::free_port().unwrap();
    let dead2 = evbus_conformance::process::free_port().unwrap();
    // Both forms: comma-separated hosts, and the `servers` parameter.
    for url in [
        format!(
            "nats://127.0.0.1:{dead},127.0.0.1:{dead2},127.0.0.1:{}?connect_timeout_ms=500",
            server.port()
        ),
        format!(
            "nats://127.0.0.1:{dead}?servers=127.0.0.1:{dead2},127.0.0.1:{}&connect_timeout_ms=500",
            server.port()
        ),
    ] {
        let transport = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let name = unique("seeds");
        let topic = transport.topic(&name).await.unwrap();
        topic
            .publish(&Event::builder("t", "/s").build().unwrap())
            .await
            .unwrap();
        transport.delete_topic(&name).await.unwrap();
        transport.close().await.unwrap();
    }
    // None up: a retryable error naming no password.
    let url = format!("nats://u:hunter2@127.0.0.1:{dead},127.0.0.1:{dead2}?connect_timeout_ms=500");
    let err = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{dead2}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_above_one_on_a_single_server_is_a_clear_configuration_error() {
    let server = support::NatsServer::start().expect("starting a nats-server");
    let url = format!("{}?replicas=3", server.url());
    let transport = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let topic = transport.topic(&unique("replicas")).await.unwrap();
    let err = topic
        .publish(&Event::builder("t", "/s").build().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("not part of a JetStream cluster"),
        "{err}"
    );
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_a_configuration_error() {
    let server = support::NatsServer::start_with_config("authorization { token: \"right\" }\n")
        .expect("starting a nats-server");
    let url = format!("nats://wrong@127.0.0.1:{}", server.port());
    let err = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!err.to_string().contains("wrong@"), "{err}");
    let url = format!("nats://127.0.0.1:{}?token=right", server.port());
    let transport = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_a_larger_max_payload_carries_a_one_mib_event() {
    let server = support::NatsServer::start_with_config("max_payload: 8MB\n")
        .expect("starting a nats-server");
    let transport = NatsTransport::connect(NatsConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        transport.capabilities().max_payload_bytes,
        Some(8 * 1024 * 1024 - evbus_nats::HEADER_ALLOWANCE)
    );
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let event = Event::builder("big", "/s")
        .data("application/octet-stream", data.clone())
        .build()
        .unwrap();
    let queue = transport.queue("big").await.unwrap();
    queue.send(&event).await.unwrap();
    let mut c = queue.receive(ConsumerOptions::default()).await.unwrap();
    let d = tokio::time::timeout(WAIT, c.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.event().data().map(|b| b.len()), Some(1 << 20));
    assert_eq!(d.event(), &event);
    d.ack().await.unwrap();
    transport.close().await.unwrap();
}

/// A cluster URL's comma-separated servers work through `evbus::Registry` (how `evbus serve`
/// and the other CLI commands open transports), which parses URLs as standard URLs first
/// and refused a host list with ports ("invalid port number"): the registry hands the
/// adapter the first server in the authority and the others in `servers`.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_opens_a_url_naming_several_servers() {
    let base = url();
    let list = evbus::raw::hosts::HostList::parse(&base).expect("EVBUS_NATS_URL is a URL");
    let host = list.hosts[0];
    let port = host
        .rsplit_once(':')
        .map_or("4222", |(_, port)| port)
        .to_owned();
    // The one test server twice, by address and by name: seeds as a cluster URL has them.
    let several = format!("{}{host},localhost:{port}{}", list.prefix, list.suffix);
    assert!(
        url::Url::parse(&several).is_err(),
        "`{several}` must be a URL the standard parser refuses, or this shows nothing"
    );
    let mut registry = evbus::Registry::new();
    registry.register(evbus_nats::NatsConnector);
    let transport = registry
        .connect(&several)
        .await
        .unwrap_or_else(|e| panic!("`{several}`: {e}"));
    assert_eq!(transport.name(), "nats");
    assert!(transport.health().await.is_healthy());
    transport.close().await.expect("close");
}

/// Two clones closing at once: whichever returns first, the transport is closed by then
/// (its anonymous subscriptions' consumers are gone). The later close used to return as
/// soon as the operations in progress had finished, before the clean-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_close_returns_only_once_the_transport_is_closed_even_if_another_is_under_way() {
    let transport = transport().await;
    let name = unique("close-twice");
    let topic = transport.topic(&name).await.unwrap();
    let mut subscriptions = Vec::new();
    for _ in 0..5 {
        subscriptions.push(
            topic
                .subscribe(SubscribeOptions::anonymous())
                .await
                .unwrap(),
        );
    }
    let (_client, js) = plain_client().await;
    let mut stream = js
        .get_stream(transport.topic_stream(&name).unwrap())
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 5);
    let closes: Vec<_> = (0..2)
        .map(|_| {
            let transport = transport.clone();
            tokio::spawn(async move { transport.close().await })
        })
        .collect();
    let (first, _, rest) = futures::future::select_all(closes).await;
    first.unwrap().unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.consumer_count,
        0,
        "a close returned before the anonymous subscriptions' consumers were deleted"
    );
    for close in rest {
        close.await.unwrap().unwrap();
    }
    drop(subscriptions);
    let cleanup = self::transport().await;
    cleanup.delete_topic(&name).await.unwrap();
    cleanup.close().await.unwrap();
}

/// Acknowledging a delivery whose consumer was deleted is `NotFound`, not retryable: nothing
/// answers such an acknowledgement, which read as a JetStream outage to retry for ever.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledging_after_the_consumer_was_deleted_is_not_found() {
    let transport = transport().await;
    let name = unique("ack-gone");
    let queue = transport.queue(&name).await.unwrap();
    let mut received = queue.receive(ConsumerOptions::default()).await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let held = next(&mut received).await;
    transport.delete_queue(&name).await.unwrap();
    let err = held.ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(!err.is_retryable(), "{err}");
    drop(received);
    transport.close().await.unwrap();
}

/// Waits until the stream of topic `name` has no consumer left, or panics with `what`.
async fn no_consumer_left(transport: &NatsTransport, name: &str, what: &str) {
    let (_client, js) = plain_client().await;
    let mut stream = js
        .get_stream(transport.topic_stream(name).unwrap())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = stream.info().await.unwrap().state.consumer_count;
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {left} consumers left after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An anonymous subscribe cancelled part way (its future dropped, here by a timeout of a
/// fraction of a millisecond) leaves no consumer behind: the consumer is registered before
/// it is made. It used to stay until the server's `anonymous_ttl` (five minutes).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_anonymous_subscribe_leaves_no_consumer_behind() {
    let transport = transport().await;
    let name = unique("cancelled");
    let topic = transport.topic(&name).await.unwrap();
    let mut completed = 0;
    for round in 0..60u64 {
        let within = Duration::from_micros(200 + (round * 37) % 2000);
        if let Ok(sub) =
            tokio::time::timeout(within, topic.subscribe(SubscribeOptions::anonymous())).await
        {
            drop(sub.unwrap());
            completed += 1;
        }
    }
    eprintln!("{completed} of 60 subscribes completed in time");
    no_consumer_left(&transport, &name, "after the cancelled subscribes").await;
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// An anonymous subscription dropped while `close` waits for the operations in progress has
/// its consumer deleted by the close: it used to be forgotten and left to `anonymous_ttl`.
#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_subscription_dropped_during_close_leaves_no_consumer_behind() {
    let transport = transport().await;
    let name = unique("drop-closing");
    let topic = transport.topic(&name).await.unwrap();
    let sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let batch: Vec<Event> = (0..50_000).map(event).collect();
    let publishing = {
        let topic = std::sync::Arc::clone(&topic);
        tokio::spawn(async move { topic.publish_batch(&batch).await })
    };
    // Set-up: the batch is under way when the close starts, and the close is waiting for
    // it when the subscription is dropped.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closing = {
        let transport = transport.clone();
        tokio::spawn(async move { transport.close().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !closing.is_finished(),
        "the close did not wait for the batch"
    );
    drop(sub);
    let started = std::time::Instant::now();
    publishing.await.unwrap().unwrap();
    eprintln!("the batch finished {:?} after the drop", started.elapsed());
    closing.await.unwrap().unwrap();
    no_consumer_left(&transport, &name, "after the close").await;
    let cleanup = self::transport().await;
    cleanup.delete_topic(&name).await.unwrap();
    cleanup.close().await.unwrap();
}

/// A subscription not pulling when its topic or queue is deleted (its handler busy) ends
/// all the same: NATS answers only the pull requests waiting at that moment, and a request
/// made afterwards gets no answer at all. It used to pull on for ever, receiving nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_busy_while_its_topic_or_queue_is_deleted_ends() {
    let other = transport().await;
    let transport = transport().await;
    let topic_name = unique("busy-topic");
    let queue_name = unique("busy-queue");
    let topic = transport.topic(&topic_name).await.unwrap();
    let mut named = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    topic.publish(&event(1)).await.unwrap();
    let queue = transport.queue(&queue_name).await.unwrap();
    let mut received = queue.receive(ConsumerOptions::default()).await.unwrap();
    queue.send(&event(2)).await.unwrap();
    let held = [next(&mut named).await, next(&mut received).await];
    // The handlers work past the pull requests' expiry (`fetch_wait`, 1 s) before the
    // deletions: nothing is waiting on the server when they come.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    transport.delete_topic(&topic_name).await.unwrap();
    other.delete_queue(&queue_name).await.unwrap();
    drop(held);
    evbus_conformance::checks::each_ends_within(
        vec![
            ("the named subscription", named),
            ("the queue's consumer", received),
        ],
        WAIT,
    )
    .await;
    transport.close().await.unwrap();
    other.close().await.unwrap();
}

/// After another connection deleted a topic or queue this transport had used, subscribing
/// to it makes it again, as publishing does (it failed with `NotFound`, as the stream was
/// remembered, until something was published through this transport).
#[tokio::test(flavor = "multi_thread")]
async fn subscribing_after_another_connection_deleted_the_stream_makes_it_again() {
    let other = transport().await;
    let transport = transport().await;
    let topic_name = unique("again-topic");
    let queue_name = unique("again-queue");
    let topic = transport.topic(&topic_name).await.unwrap();
    topic.publish(&event(1)).await.unwrap();
    let queue = transport.queue(&queue_name).await.unwrap();
    queue.send(&event(2)).await.unwrap();
    other.delete_topic(&topic_name).await.unwrap();
    other.delete_queue(&queue_name).await.unwrap();
    let mut named = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let mut received = queue.receive(ConsumerOptions::default()).await.unwrap();
    topic.publish(&event(3)).await.unwrap();
    queue.send(&event(4)).await.unwrap();
    for sub in [&mut named, &mut received] {
        next(sub).await.ack().await.unwrap();
    }
    drop((named, received));
    transport.delete_topic(&topic_name).await.unwrap();
    transport.delete_queue(&queue_name).await.unwrap();
    transport.close().await.unwrap();
    other.close().await.unwrap();
}

fn event(n: u64) -> Event {
    Event::builder("orderPlaced", "/nats-test")
        .json(&n)
        .unwrap()
        .build()
        .unwrap()
}

/// An event id is any non-empty string. One with a line break became the `Nats-Msg-Id` of a
/// topic's publish as it was, and async-nats panicked building the header: a `Bus::emit`
/// caller panicked, and the outbox relay's task died on such a row (an outside review).
/// Such ids travel and arrive unchanged; JetStream still drops a second publish of the same
/// id, and no other id's.
#[tokio::test(flavor = "multi_thread")]
async fn ids_no_header_can_carry_are_published_and_deduplicated() {
    let transport = transport().await;
    let name = unique("ids");
    let topic = transport.topic(&name).await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let ids = ["x\r\ny", " padded ", "%x%0D%0Ay"];
    for id in ids.iter().chain(&ids) {
        let event = Event::builder("t", "/test")
            .id(*id)
            .json(&1)
            .unwrap()
            .build()
            .unwrap();
        topic.publish(&event).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..ids.len() {
        let delivery = next(&mut sub).await;
        got.push(delivery.event().id().to_owned());
        delivery.ack().await.unwrap();
    }
    got.sort();
    let mut want = ids.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(got, want, "each id once, unchanged");
    let extra = tokio::time::timeout(Duration::from_secs(1), sub.next_delivery()).await;
    assert!(extra.is_err(), "a second publish of an id was not dropped");
    drop(sub);
    transport.delete_topic(&name).await.unwrap();
}

/// While the client reconnects, acks, nacks and `close` end within `request_timeout`, also
/// once the client's command queue is full: every publish tried during an outage leaves a
/// command in it, and a settlement then waited for room until NATS came back (outside
/// review: an ack with `request_timeout_ms=1000` took 17.6 s, and neither a nack nor `close`
/// had ended 15 s into the outage).
#[tokio::test(flavor = "multi_thread")]
async fn settlements_and_close_end_in_time_while_the_client_queue_is_full() {
    let server = support::NatsServer::start().expect("starting a nats-server");
    let url = format!("{}?request_timeout_ms=1000", server.url());
    let transport = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let topic = transport.topic(&unique("full-queue")).await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("billing").start(StartPosition::Earliest))
        .await
        .unwrap();
    let event = |i: usize| Event::builder("t", "/s").json(&i).unwrap().build().unwrap();
    for i in 0..2 {
        topic.publish(&event(i)).await.unwrap();
    }
    let first = next(&mut sub).await;
    let second = next(&mut sub).await;
    server.kill();
    // About 2,500 commands queued: the first chunk of each batch.
    let events: Vec<Event> = (0..2500).map(event).collect();
    for _ in 0..5 {
        let failed = topic.publish_batch(&events).await;
        assert!(failed.is_err(), "a publish succeeded with the server down");
    }
    let started = std::time::Instant::now();
    let (acked, nacked) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(second.ack(), first.nack(None))
    })
    .await
    .expect("an ack and a nack waited 30 s into the outage");
    let took = started.elapsed();
    let acked = acked.expect_err("an ack succeeded with the server down");
    assert_eq!(acked.kind(), ErrorKind::Timeout, "{acked}");
    assert!(acked.is_retryable(), "{acked}");
    nacked.expect_err("a nack succeeded with the server down");
    assert!(
        took < Duration::from_secs(5),
        "the settlements took {took:?}"
    );
    drop(sub);
    tokio::time::timeout(Duration::from_secs(10), transport.close())
        .await
        .expect("close did not end within 10 s of the outage")
        .unwrap();
}

/// A visibility timeout of `Duration::MAX` ("no timeout") is the longest evbus keeps, 100
/// years, which JetStream holds (int64 nanoseconds): the consumer's `ack_wait` is that, not
/// a `Broker` error quoting the server's JSON parser. One set past it on the field is a
/// configuration error.
#[tokio::test(flavor = "multi_thread")]
async fn a_visibility_timeout_of_duration_max_is_the_longest_jetstream_holds() {
    use futures::StreamExt;
    let transport = transport().await;
    let name = unique("vis-max");
    let topic = transport.topic(&name).await.unwrap();
    let mut past = SubscribeOptions::named("billing");
    past.consumer.visibility_timeout = Duration::MAX;
    let err = topic.subscribe(past).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("visibility_timeout"), "{err}");

    let mut options = SubscribeOptions::named("billing");
    options.consumer = ConsumerOptions::default().visibility_timeout(Duration::MAX);
    let mut sub = topic.subscribe(options).await.unwrap();
    let event = Event::builder("t", "/s").json(&1).unwrap().build().unwrap();
    topic.publish(&event).await.unwrap();
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.event().id(), event.id());
    delivery.ack().await.unwrap();
    let (_client, js) = plain_client().await;
    let stream = js
        .get_stream(transport.topic_stream(&name).unwrap())
        .await
        .unwrap();
    let mut consumers = stream.consumers();
    let info = consumers
        .next()
        .await
        .expect("the subscription's consumer")
        .unwrap();
    assert_eq!(info.config.ack_wait, evbus::raw::LONGEST_VISIBILITY);
    drop(sub);
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// A subscription waiting on a pull request when the server restarts receives the next
/// event as soon as it is published, not once the lost request expires: the request lived
/// on the server that went away, and the reader waited out `fetch_wait` with nothing coming
/// (outside review: 29 s with `fetch_wait_ms=30000`). It ends a request made before a
/// reconnect once nothing more comes from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_waiting_through_a_server_restart_receives_the_next_event_promptly() {
    use futures::StreamExt;
    let server = support::NatsServer::start().expect("starting a nats-server");
    let url = format!("{}?fetch_wait_ms=30000", server.url());
    let transport = NatsTransport::connect(NatsConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let name = unique("restart-wait");
    let topic = transport.topic(&name).await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let delivery = tokio::time::timeout(Duration::from_secs(60), sub.next_delivery())
            .await
            .expect("a delivery within 60 s")
            .expect("the stream goes on")
            .unwrap();
        let at = std::time::Instant::now();
        delivery.ack().await.unwrap();
        (at, delivery.event().id().to_owned(), sub)
    });
    // The reader's pull request is waiting on the server.
    let stream_name = transport.topic_stream(&name).unwrap();
    let plain = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(plain);
    let stream = js.get_stream(&stream_name).await.unwrap();
    let waiting = async {
        loop {
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                if info.unwrap().num_waiting > 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the subscription's pull request reached the server");

    server.kill();
    server.restart().expect("restarting the nats-server");
    let event = Event::builder("t", "/s").json(&1).unwrap().build().unwrap();
    let published_at = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match topic.publish(&event).await {
                Ok(()) => break std::time::Instant::now(),
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("publishing after the restart: {e}"),
            }
        }
    })
    .await
    .expect("a publish succeeded within 30 s of the restart");
    let (received_at, id, sub) = reader.await.unwrap();
    assert_eq!(id, event.id());
    let took = received_at.saturating_duration_since(published_at);
    assert!(
        took < Duration::from_secs(10),
        "delivered {took:?} after the publish (the pull request waits 30 s)"
    );
    drop(sub);
    transport.close().await.unwrap();
}

/// A stream of evbus's name made outside evbus for other subjects (the `nats` CLI
/// re-creating it, say) is a configuration error for publishes and subscriptions: a publish
/// found no stream for its subject and was called a leader election (a retryable error that
/// never cleared), and a subscription opened on a stream no event could reach (outside
/// review).
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_of_evbus_name_for_other_subjects_is_a_configuration_error() {
    let transport = transport().await;
    let name = unique("foreign-stream");
    let (_client, js) = plain_client().await;
    let stream = transport.topic_stream(&name).unwrap();
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("other.{}", std::process::id())],
        ..Default::default()
    })
    .await
    .unwrap();
    let topic = transport.topic(&name).await.unwrap();
    let event = Event::builder("t", "/s").json(&1).unwrap().build().unwrap();
    let published = topic.publish(&event).await.unwrap_err();
    assert_eq!(published.kind(), ErrorKind::InvalidConfig, "{published}");
    assert!(!published.is_retryable(), "{published}");
    assert!(published.message().contains(&stream), "{published}");
    let subscribed = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(subscribed.kind(), ErrorKind::InvalidConfig, "{subscribed}");
    js.delete_stream(&stream).await.unwrap();
    // Gone, the stream is evbus's to make again.
    topic.publish(&event).await.unwrap();
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}
