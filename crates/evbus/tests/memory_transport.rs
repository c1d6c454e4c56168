//! Behaviour specific to the in-memory transport: bounded memory, URL settings, lifecycle of
//! anonymous subscriptions. The shared contract is proven by the conformance suite
//! (crates/evbus-conformance/tests/memory.rs).

use std::time::Duration;

use evbus::memory::{MemoryBroker, MemoryConfig};
use evbus::{ErrorKind, Event, Registry, SubscribeOptions, Transport};
use futures::StreamExt;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(5);

fn event(n: u32) -> Event {
    Event::builder("test.event", "/tests")
        .json(&n)
        .unwrap()
        .build()
        .unwrap()
}

/// The next delivery of `sub`, within [`BOUND`].
async fn next_of(sub: &mut evbus::Subscription) -> evbus::Delivery {
    timeout(BOUND, sub.next())
        .await
        .expect("a delivery within the bound")
        .expect("the subscription ended")
        .expect("a delivery, not an error")
}

fn small_broker(capacity: usize, publish_timeout: Duration) -> MemoryBroker {
    let url = url::Url::parse(&format!(
        "memory://?capacity={capacity}&publish_timeout_ms={}",
        publish_timeout.as_millis()
    ))
    .unwrap();
    MemoryBroker::new(MemoryConfig::from_url(&url).unwrap())
}

#[tokio::test]
async fn a_full_subscription_fails_publishes_with_a_clear_error_after_the_timeout() {
    let transport = small_broker(2, Duration::from_millis(200)).connect();
    let topic = transport.topic("orders").await.unwrap();
    let _slow = topic
        .subscribe(SubscribeOptions::named("slow"))
        .await
        .unwrap();
    topic.publish(&event(1)).await.unwrap();
    topic.publish(&event(2)).await.unwrap();

    let started = std::time::Instant::now();
    let err = timeout(BOUND, topic.publish(&event(3)))
        .await
        .expect("publish is bounded by publish_timeout")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Full);
    assert!(err.is_retryable());
    assert!(err.message().contains("orders/slow"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn a_waiting_publish_proceeds_as_soon_as_the_consumer_acks() {
    let transport = small_broker(1, Duration::from_secs(30)).connect();
    let queue = transport.queue("work").await.unwrap();
    queue.send(&event(1)).await.unwrap();

    let sender = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.send(&event(2)).await })
    };
    let mut consumer = queue.receive(Default::default()).await.unwrap();
    let first = next_of(&mut consumer).await;
    assert_eq!(first.event().json::<u32>().unwrap(), 1);
    assert!(!sender.is_finished(), "the second send must wait for room");
    first.ack().await.unwrap();

    timeout(BOUND, sender).await.unwrap().unwrap().unwrap();
    let second = next_of(&mut consumer).await;
    assert_eq!(second.event().json::<u32>().unwrap(), 2);
}

#[tokio::test]
async fn a_dropped_anonymous_subscription_no_longer_holds_events() {
    let transport = small_broker(1, Duration::from_millis(100)).connect();
    let topic = transport.topic("news").await.unwrap();
    let anonymous = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    topic.publish(&event(1)).await.unwrap();
    drop(anonymous);
    // Were the anonymous subscription still registered, its capacity of 1 would refuse these.
    for n in 2..5 {
        topic.publish(&event(n)).await.unwrap();
    }
}

#[tokio::test]
async fn deleting_a_topic_ends_its_subscriptions() {
    let transport = MemoryBroker::new(MemoryConfig::default()).connect();
    let topic = transport.topic("gone").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    transport.delete_topic("gone").await.unwrap();
    assert!(timeout(BOUND, sub.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn url_parameters_configure_the_broker_and_typos_are_refused() {
    let url = url::Url::parse("memory://cfg?capacity=7&history=3&max_payload_bytes=100").unwrap();
    let config = MemoryConfig::from_url(&url).unwrap();
    assert_eq!(
        (config.capacity, config.history, config.max_payload_bytes),
        (7, 3, 100)
    );

    let err = Registry::new()
        .connect("memory://x?capacty=7")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.message().contains("capacty"), "{err}");
}

#[tokio::test]
async fn the_same_url_name_reaches_the_same_broker() {
    let registry = Registry::new();
    let a = registry.connect("memory://shared-by-name").await.unwrap();
    let b = registry.connect("memory://shared-by-name").await.unwrap();
    let queue_a = a.queue("q").await.unwrap();
    queue_a.send(&event(9)).await.unwrap();
    let mut consumer = b
        .queue("q")
        .await
        .unwrap()
        .receive(Default::default())
        .await
        .unwrap();
    let got = next_of(&mut consumer).await;
    assert_eq!(got.event().json::<u32>().unwrap(), 9);
    got.ack().await.unwrap();
    b.delete_queue("q").await.unwrap();
}

/// A nack delayed by `Duration::MAX` is a delay of a year (`evbus::bus::LONGEST_BACKOFF`):
/// the memory transport added it to the clock and panicked (found by an outsider review).
#[tokio::test]
async fn a_nack_delayed_for_ever_is_accepted_and_holds_the_event_back() {
    let transport = MemoryBroker::new(MemoryConfig::default()).connect();
    let queue = transport.queue("never").await.unwrap();
    queue.send(&event(1)).await.unwrap();
    queue.send(&event(2)).await.unwrap();
    let mut consumer = queue
        .receive(evbus::ConsumerOptions::default())
        .await
        .unwrap();
    let first = next_of(&mut consumer).await;
    first.nack(Some(Duration::MAX)).await.unwrap();
    let second = next_of(&mut consumer).await;
    assert_eq!(second.event().json::<u32>().unwrap(), 2);
    second.ack().await.unwrap();
    assert!(
        timeout(Duration::from_millis(200), consumer.next())
            .await
            .is_err(),
        "the event nacked for ever came back at once"
    );
}

#[tokio::test]
async fn an_expired_delivery_cannot_be_settled_by_its_late_consumer() {
    let transport = MemoryBroker::new(MemoryConfig::default()).connect();
    let queue = transport.queue("slow").await.unwrap();
    queue.send(&event(1)).await.unwrap();
    let options = evbus::ConsumerOptions::default().visibility_timeout(Duration::from_millis(50));
    let mut late = queue.receive(options.clone()).await.unwrap();
    let first = next_of(&mut late).await;
    let mut other = queue.receive(options).await.unwrap();
    let again = next_of(&mut other).await;
    assert_eq!(again.attempt(), 2);
    let err = first.ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn a_publish_without_waiting_takes_the_event_only_when_there_is_room() {
    let transport = small_broker(1, Duration::from_secs(30)).connect();
    let topic = transport.topic("orders").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();

    assert!(matches!(topic.try_publish_now(&event(1)), Some(Ok(()))));
    // Full: nothing is appended, and the caller is told to publish (and wait) instead.
    assert!(topic.try_publish_now(&event(2)).is_none());

    let first = next_of(&mut sub).await;
    assert_eq!(first.event().json::<u32>().unwrap(), 1);
    first.ack().await.unwrap();
    assert!(matches!(topic.try_publish_now(&event(3)), Some(Ok(()))));
    // Event 2 was never appended: the next one is 3.
    let next = next_of(&mut sub).await;
    assert_eq!(next.event().json::<u32>().unwrap(), 3);
    next.ack().await.unwrap();

    // Refusals are results, as from `publish`.
    let url = url::Url::parse("memory://?max_payload_bytes=64").unwrap();
    let tiny = MemoryBroker::new(MemoryConfig::from_url(&url).unwrap()).connect();
    let tiny_topic = tiny.topic("orders").await.unwrap();
    let big = Event::builder("test.event", "/tests")
        .json(&"x".repeat(100))
        .unwrap()
        .build()
        .unwrap();
    let refused = tiny_topic.try_publish_now(&big).unwrap().unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::TooLarge);
    transport.close().await.unwrap();
    let closed = topic.try_publish_now(&event(4)).unwrap().unwrap_err();
    assert_eq!(closed.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn a_bus_emit_to_a_full_memory_topic_waits_for_room() {
    use std::sync::Arc;

    let transport = Arc::new(small_broker(1, Duration::from_secs(30)).connect());
    let mut catalog = evbus::Catalog::builder();
    catalog.strict(false);
    let bus = evbus::bus::Bus::builder(
        Arc::clone(&transport) as Arc<dyn Transport>,
        catalog.freeze().unwrap(),
    )
    .source("/tests")
    .build();
    let topic = transport
        .topic(&bus.topic_name("test.event"))
        .await
        .unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    bus.emit("test.event", serde_json::json!(1)).await.unwrap();

    let second = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.emit("test.event", serde_json::json!(2)).await })
    };
    let first = next_of(&mut sub).await;
    assert_eq!(first.event().json::<u32>().unwrap(), 1);
    // Let the spawned emit run up to its wait for room.
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    assert!(!second.is_finished(), "the second emit must wait for room");
    first.ack().await.unwrap();

    timeout(BOUND, second).await.unwrap().unwrap().unwrap();
    let next = next_of(&mut sub).await;
    assert_eq!(next.event().json::<u32>().unwrap(), 2);
}

/// Publishes signal waiting consumers only when some are registered: a consumer that starts
/// waiting on another thread while events are published must still be woken for each of
/// them (a lost wake-up leaves an event unconsumed until the next publish, here never).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_waiting_on_other_threads_are_woken_by_every_publish() {
    const EVENTS: u32 = 2_000;
    const CONSUMERS: usize = 4;
    let transport = MemoryBroker::new(MemoryConfig::default()).connect();
    let topic = transport.topic("wakeups").await.unwrap();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let mut subscription = topic
            .subscribe(SubscribeOptions::named("workers"))
            .await
            .unwrap();
        consumers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            // Each consumer ends when no event reached it for well over any scheduling delay:
            // an event left ready with every consumer asleep stays unconsumed.
            while let Ok(Some(delivery)) =
                timeout(Duration::from_millis(1_500), subscription.next()).await
            {
                let delivery = delivery.unwrap();
                seen.push(delivery.event().json::<u32>().unwrap());
                delivery.ack().await.unwrap();
            }
            seen
        }));
    }
    // One at a time, often letting the consumers catch up and wait again in between.
    for n in 0..EVENTS {
        topic.publish(&event(n)).await.unwrap();
        if n % 3 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut seen = Vec::new();
    for consumer in consumers {
        seen.extend(timeout(BOUND * 4, consumer).await.unwrap().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "each event once");
}

/// Events given back are redelivered in their publish order, ahead of later ones, whatever
/// the order they were given back in (a Bus drain nacks a key's events together): per-key
/// order survives a give-back on the reference transport.
#[tokio::test]
async fn events_given_back_together_come_back_in_publish_order() {
    let transport = MemoryBroker::new(MemoryConfig::default()).connect();
    let queue = transport.queue("work").await.unwrap();
    for n in 0..4 {
        queue.send(&event(n)).await.unwrap();
    }
    let mut consumer = queue.receive(Default::default()).await.unwrap();
    let mut taken = Vec::new();
    for _ in 0..3 {
        let delivery = timeout(BOUND, consumer.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        taken.push(delivery);
    }
    // Given back out of order: 1, then 2, then 0.
    for i in [1, 2, 0] {
        taken[i].nack(None).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let delivery = timeout(BOUND, consumer.next_delivery())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        order.push(delivery.event().json::<u32>().unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(order, [0, 1, 2, 3]);
}
