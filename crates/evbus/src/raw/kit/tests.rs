//! The kit over a tiny broker: shelves of JSON strings in a `Mutex`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::ErrorKind;
use crate::delivery::DEAD_LETTER_REASON;
use crate::transport::Transport;

/// Partitions of JSON texts: `t:<topic>/<subscription>` and `q:<queue>`.
#[derive(Default)]
struct State {
    parts: HashMap<String, VecDeque<String>>,
    published: usize,
    acks: usize,
    released: Vec<String>,
    closes: usize,
}

#[derive(Clone, Default)]
struct Shelf {
    state: Arc<Mutex<State>>,
    max_payload: Option<usize>,
}

impl Shelf {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn key(to: &Destination) -> String {
    match to {
        Destination::Topic {
            topic,
            subscription,
        } => format!("t:{topic}/{}", subscription.as_deref().unwrap_or("")),
        Destination::Queue(name) => format!("q:{name}"),
    }
}

#[async_trait]
impl Broker for Shelf {
    fn name(&self) -> &str {
        "shelf"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_payload_bytes: self.max_payload,
            ..Default::default()
        }
    }

    async fn publish(&self, to: &Destination, events: &[Event]) -> Result<()> {
        let mut state = self.state();
        state.published += events.len();
        let target = key(to);
        if matches!(to, Destination::Queue(_)) {
            state.parts.entry(target.clone()).or_default();
        }
        for (name, part) in state.parts.iter_mut() {
            if name == &target || (target.ends_with('/') && name.starts_with(&target)) {
                for event in events {
                    part.push_back(event.to_json()?);
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, source: &Source) -> Result<RawStream> {
        let part = key(source.destination());
        self.state().parts.entry(part.clone()).or_default();
        Ok(poll(
            Duration::from_millis(5),
            (self.clone(), part),
            |(shelf, part)| async move {
                let json = shelf
                    .state()
                    .parts
                    .get_mut(&part)
                    .and_then(|p| p.pop_front());
                let acker: Arc<dyn Acker> = Arc::new(shelf.clone());
                Ok(json.map(|json| RawDelivery::from_json(json, 1, acker, 0, &part)))
            },
        ))
    }

    async fn release(&self, source: &Source) -> Result<()> {
        let part = key(source.destination());
        let mut state = self.state();
        state.parts.remove(&part);
        state.released.push(part);
        Ok(())
    }

    async fn delete(&self, what: &Destination) -> Result<()> {
        let target = key(what);
        self.state().parts.retain(|name, _| {
            name != &target && !(target.ends_with('/') && name.starts_with(&target))
        });
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.state().closes += 1;
        Ok(())
    }
}

#[async_trait]
impl Acker for Shelf {
    async fn ack(&self, _tag: u64) -> Result<()> {
        self.state().acks += 1;
        Ok(())
    }

    async fn nack(&self, _tag: u64) -> Result<()> {
        Ok(())
    }
}

fn event(ty: &str) -> Event {
    Event::builder(ty, "/test").build().unwrap()
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn next(sub: &mut Subscription) -> Option<Result<crate::Delivery>> {
    tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
        .await
        .expect("the subscription answers within 5 s")
}

#[tokio::test]
async fn events_flow_from_publish_to_a_named_subscription_and_acks_reach_the_broker() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let topic = transport.topic("orders").await.unwrap();
    let mut billing = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    topic
        .publish_batch(&[event("a"), event("b")])
        .await
        .unwrap();
    for ty in ["a", "b"] {
        let delivery = next(&mut billing).await.unwrap().unwrap();
        assert_eq!(delivery.event().ty(), ty);
        assert_eq!(delivery.origin(), "orders/billing");
        delivery.ack().await.unwrap();
    }
    assert_eq!(shelf.state().acks, 2);
    assert!(shelf.state().parts.contains_key("t:orders/billing"));
}

#[tokio::test]
async fn after_close_every_operation_fails_with_closed_and_the_broker_closes_once() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let topic = transport.topic("orders").await.unwrap();
    let queue = transport.queue("jobs").await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    transport.close().await.unwrap();

    let closed = |r: Result<()>, what: &str| {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed, "{what}");
    };
    closed(transport.topic("t").await.map(drop), "topic");
    closed(transport.queue("q").await.map(drop), "queue");
    closed(topic.publish(&event("a")).await, "publish");
    closed(queue.send_batch(&[event("a")]).await, "send_batch");
    closed(
        topic
            .subscribe(SubscribeOptions::anonymous())
            .await
            .map(drop),
        "subscribe",
    );
    closed(
        queue.receive(ConsumerOptions::default()).await.map(drop),
        "receive",
    );
    closed(transport.delete_topic("orders").await, "delete_topic");
    assert_eq!(transport.health().await, Health::Closed);
    assert!(next(&mut sub).await.is_none(), "the subscription ended");
    transport.close().await.unwrap();
    assert_eq!(shelf.state().closes, 1);
    assert_eq!(shelf.state().published, 0);
}

#[tokio::test]
async fn close_ends_a_subscription_whose_in_flight_slots_are_all_taken_and_refuses_its_acks() {
    let transport = Connection::new(Shelf::default());
    let queue = transport.queue("jobs").await.unwrap();
    let options = ConsumerOptions::default().max_in_flight(1);
    let mut sub = queue.receive(options).await.unwrap();
    queue.send_batch(&[event("a"), event("b")]).await.unwrap();
    let held = next(&mut sub).await.unwrap().unwrap();
    let waiting = tokio::spawn(async move { sub.next_delivery().await.map(|r| r.map(drop)) });
    transport.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(matches!(ended, Ok(Ok(None))), "{ended:?}");
    assert_eq!(held.ack().await.unwrap_err().kind(), ErrorKind::Closed);
    assert!(!held.is_settled());
}

#[tokio::test]
async fn a_dropped_anonymous_subscription_is_released_once_and_named_ones_never() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let topic = transport.topic("orders").await.unwrap();
    let anonymous = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let named = topic
        .subscribe(SubscribeOptions::named("keep"))
        .await
        .unwrap();
    let queue = transport.queue("jobs").await.unwrap();
    let receiver = queue.receive(ConsumerOptions::default()).await.unwrap();
    drop((anonymous, named, receiver));
    eventually("the anonymous subscription is released", || {
        shelf.state().released.len() == 1
    })
    .await;
    let released = shelf.state().released[0].clone();
    assert!(released.starts_with("t:orders/_anonymous."), "{released}");
    transport.close().await.unwrap();
    let state = shelf.state();
    assert_eq!(state.released.len(), 1, "{:?}", state.released);
    assert!(state.parts.contains_key("t:orders/keep"));
}

#[tokio::test]
async fn close_releases_the_anonymous_subscriptions_still_open_before_closing_the_broker() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let topic = transport.topic("orders").await.unwrap();
    let first = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let second = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    transport.close().await.unwrap();
    assert_eq!(shelf.state().released.len(), 2);
    assert_eq!(shelf.state().closes, 1);
    drop((first, second));
    tokio::task::yield_now().await;
    assert_eq!(shelf.state().released.len(), 2, "released once only");
}

#[tokio::test]
async fn an_event_beyond_the_payload_limit_fails_with_too_large_before_the_broker_sees_it() {
    let shelf = Shelf {
        max_payload: Some(1024),
        ..Shelf::default()
    };
    let transport = Connection::new(shelf.clone());
    let queue = transport.queue("jobs").await.unwrap();
    let big = Event::builder("big", "/test")
        .json(&"x".repeat(2048))
        .unwrap()
        .build()
        .unwrap();
    let err = queue.send_batch(&[event("small"), big]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert_eq!(
        shelf.state().published,
        0,
        "no prefix of the batch was sent"
    );
    queue.send(&event("small")).await.unwrap();
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_and_the_next_event_still_arrives() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let queue = transport.queue("jobs").await.unwrap();
    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    shelf
        .state()
        .parts
        .get_mut("q:jobs")
        .unwrap()
        .push_back("{not json".into());
    queue.send(&event("good")).await.unwrap();
    let delivery = next(&mut sub).await.unwrap().unwrap();
    assert_eq!(delivery.event().ty(), "good");
    let dead = shelf.state().parts["q:jobs.dlq"].front().cloned().unwrap();
    let dead = Event::from_json(&dead).unwrap();
    assert_eq!(dead.ty(), crate::raw::UNDECODABLE_EVENT_TYPE);
    assert!(dead.extension(DEAD_LETTER_REASON).is_some());
    assert_eq!(
        shelf.state().acks,
        1,
        "the undecodable message was acknowledged"
    );
}

#[tokio::test]
async fn poll_fetches_only_when_asked_and_waits_after_finding_nothing() {
    use futures::StreamExt as _;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut raw = poll(
        Duration::from_millis(30),
        calls.clone(),
        |calls| async move {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let acker: Arc<dyn Acker> = Arc::new(Shelf::default());
            Ok((n % 2 == 0).then(|| RawDelivery::new(event("e"), 1, acker, 0)))
        },
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing fetched before asked"
    );
    raw.next().await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let started = tokio::time::Instant::now();
    raw.next().await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(started.elapsed() >= Duration::from_millis(30));
}

#[test]
fn from_binding_keeps_headers_and_body_of_a_message_that_does_not_decode() {
    let acker: Arc<dyn Acker> = Arc::new(Shelf::default());
    let headers = vec![("x-foreign".to_owned(), "1".to_owned())];
    let raw = RawDelivery::from_binding(
        headers,
        Bytes::from_static(b"raw"),
        HeaderStyle::KAFKA,
        2,
        acker,
        9,
        "kafka:orders",
    );
    let message = raw.undecodable_message().expect("undecodable");
    assert_eq!(message.headers().len(), 1);
    assert_eq!(message.raw_body().as_ref(), b"raw");
    assert_eq!((raw.attempt(), raw.tag()), (2, 9));
}

#[test]
fn parse_url_refuses_what_the_adapter_does_not_take_with_configuration_errors() {
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Key {
        Prefix,
    }
    impl ConfigKey for Key {
        const ADAPTER: &'static str = "Shelf";
        const ALL: &'static [Self] = &[Key::Prefix];
        fn name(self) -> &'static str {
            "prefix"
        }
    }
    let any = |_: &Url| true;
    let (_, params) = parse_url::<Key>("shelf://h/?prefix=p", "shelf", "F", any).unwrap();
    assert_eq!(params, vec![(Key::Prefix, "p".to_owned())]);
    for url in [
        "not a url",
        "other://h/",
        "shelf://u:secret@h/?prefix=1&x=2",
    ] {
        let err = parse_url::<Key>(url, "shelf", "F", any).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
        assert!(!err.message().contains("secret"), "{err}");
    }
    // A URL of the adapter's form with parameters it does not take: they are named (never
    // their values), so the user knows what to remove.
    let err = parse_url::<NoKeys>("shelf://h/?a=1", "shelf", "shelf://h/", any).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert_eq!(err.message(), "shelf URLs take no parameters; remove `a`");
    let err = parse_url::<NoKeys>("shelf://h/?token=s3cret&b", "shelf", "F", any).unwrap_err();
    assert_eq!(
        err.message(),
        "shelf URLs take no parameters; remove `token`, `b`"
    );
    let no_host = |u: &Url| u.host_str().is_none();
    assert!(parse_url::<NoKeys>("shelf://h/", "shelf", "F", no_host).is_err());
}

#[tokio::test]
async fn names_no_transport_accepts_never_reach_the_broker() {
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let long = "x".repeat(crate::raw::MAX_DESTINATION_NAME + 1);
    for name in ["", "a\nb", "tab\there", long.as_str()] {
        let refused = [
            transport.topic(name).await.map(drop),
            transport.queue(name).await.map(drop),
            transport.delete_topic(name).await,
            transport.delete_queue(name).await,
        ];
        for result in refused {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{name:?}: {err}");
            assert!(!err.message().contains('\n'), "{err}");
        }
    }
    // What is printable and not too long is the broker's to take (escaping is its job).
    let awkward = "a.b/../c é";
    let queue = transport.queue(awkward).await.unwrap();
    queue.send(&event("a")).await.unwrap();
    assert!(shelf.state().parts.contains_key(&format!("q:{awkward}")));
    let longest = "y".repeat(crate::raw::MAX_DESTINATION_NAME);
    transport.topic(&longest).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test]
async fn an_acker_made_for_one_delivery_goes_with_that_delivery() {
    // The shelf makes an acker (a clone holding its state) per delivery: once every delivery
    // is settled and dropped, none may be kept, though the subscription stays open.
    let shelf = Shelf::default();
    let transport = Connection::new(shelf.clone());
    let queue = transport.queue("q").await.unwrap();
    let mut sub = queue.receive(ConsumerOptions::default()).await.unwrap();
    // The stream has polled: its own clone of the shelf is counted in the baseline.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sub.next_delivery())
            .await
            .is_err()
    );
    let baseline = Arc::strong_count(&shelf.state);
    queue
        .send_batch(&[event("a"), event("b"), event("c")])
        .await
        .unwrap();
    for _ in 0..3 {
        let delivery = next(&mut sub).await.unwrap().unwrap();
        delivery.ack().await.unwrap();
    }
    eventually("every acker is dropped", || {
        Arc::strong_count(&shelf.state) == baseline
    })
    .await;
    drop(sub);
    transport.close().await.unwrap();
}

/// A broker whose publishes never answer (a client retrying for ever against a dead server).
struct Stuck {
    closes: Arc<AtomicUsize>,
}

#[async_trait]
impl Broker for Stuck {
    fn name(&self) -> &str {
        "stuck"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn publish(&self, _to: &Destination, _events: &[Event]) -> Result<()> {
        std::future::pending().await
    }

    async fn consume(&self, _source: &Source) -> Result<RawStream> {
        Ok(poll(Duration::from_millis(5), (), |()| async { Ok(None) }))
    }

    async fn delete(&self, _what: &Destination) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn close_does_not_wait_past_its_grace_for_an_operation_that_never_ends() {
    let closes = Arc::new(AtomicUsize::new(0));
    let transport = Connection::with_close_grace(
        Stuck {
            closes: Arc::clone(&closes),
        },
        Duration::from_millis(200),
    );
    let topic = transport.topic("t").await.unwrap();
    let publish = tokio::spawn(async move { topic.publish(&event("a")).await });
    // The publish has started (it holds an operation) before close begins.
    eventually("the publish started", || {
        transport.inner.operations.len() == 1
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), transport.close())
        .await
        .expect("close returns after its grace")
        .unwrap();
    assert_eq!(closes.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(transport.health().await, Health::Closed);
    publish.abort();
}
