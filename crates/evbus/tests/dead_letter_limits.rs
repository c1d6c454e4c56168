//! Dead-letter records that do not fit the dead-letter queue: a message too large for it
//! whole is still dead-lettered (shortened) and acknowledged, instead of coming back after
//! every visibility timeout forever (and, on Kafka, holding back every later offset).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use evbus::memory::{MemoryBroker, MemoryConfig};
use evbus::raw::{
    Acker, DEAD_LETTER_DATA_DROPPED, DEAD_LETTER_REASON, DEAD_LETTER_TRUNCATED, RawDelivery,
    Source, UNDECODABLE_EVENT_TYPE, Undecodable,
};
use evbus::{ConsumerOptions, Error, Event, Result, Transport};
use futures::StreamExt;
use tokio::time::timeout;

const LIMIT: usize = 4096;
const BOUND: Duration = Duration::from_secs(5);

fn transport() -> Arc<dyn Transport> {
    let mut config = MemoryConfig::default();
    config.max_payload_bytes = LIMIT;
    Arc::new(MemoryBroker::new(config).connect())
}

/// Records the tags acknowledged; refuses nothing.
#[derive(Default)]
struct Recorder {
    acked: Mutex<Vec<u64>>,
}

#[async_trait]
impl Acker for Recorder {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.acked.lock().unwrap().push(tag);
        Ok(())
    }
    async fn nack(&self, _tag: u64) -> Result<()> {
        Ok(())
    }
}

/// The first record of dead-letter queue `dlq`.
async fn first_record(dlq: &dyn evbus::Queue) -> Event {
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    let record = timeout(BOUND, dead.next_delivery())
        .await
        .expect("a dead-letter record")
        .unwrap()
        .unwrap();
    record.event().clone()
}

/// Hands `event` (tag `tag`) to a consumer of queue `foreign` whose dead-letter queue is
/// `dlq`, dead-letters it with `reason`, and checks it was settled: the record taken, the
/// event acknowledged.
async fn dead_letter_one(
    dlq: &Arc<dyn evbus::Queue>,
    event: &Event,
    acker: &Arc<Recorder>,
    tag: u64,
    reason: &str,
) {
    let raw = futures::stream::iter(vec![Ok(RawDelivery::new(
        event.clone(),
        1,
        Arc::clone(acker) as Arc<dyn Acker>,
        tag,
    ))])
    .chain(futures::stream::pending());
    let mut subscription = Source::queue("foreign", &ConsumerOptions::default())
        .unwrap()
        .into_subscription(raw, Arc::clone(dlq), futures::future::pending());
    let delivery = timeout(BOUND, subscription.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    delivery.dead_letter(reason).await.expect("dead-lettered");
    assert!(delivery.is_settled());
    assert_eq!(*acker.acked.lock().unwrap(), vec![tag]);
}

fn good_event() -> Event {
    Event::builder("test.event", "/tests")
        .json(&serde_json::json!({"n": 1}))
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_undecodable_message_too_large_for_the_dead_letter_queue_is_dead_lettered_shortened() {
    let transport = transport();
    let dlq = transport.queue("foreign.dlq").await.unwrap();
    let acker = Arc::new(Recorder::default());
    // Not UTF-8 (so base64, a third larger) and, with a long header, over the limit whole.
    let body = vec![0xffu8; 3500];
    let message = Undecodable::new(
        Error::invalid_event("not a CloudEvent"),
        "test:foreign",
        "1-0",
    )
    .header("trace", "x".repeat(3000))
    .header("euro", "€".repeat(700))
    .body(body.clone());
    assert!(
        message.placeholder().unwrap().encoded_len() > LIMIT,
        "the test's message must not fit whole"
    );
    let raw = futures::stream::iter(vec![
        Ok(RawDelivery::undecodable(message, 1, acker.clone(), 7)),
        Ok(RawDelivery::new(good_event(), 1, acker.clone(), 8)),
    ])
    .chain(futures::stream::pending());
    let mut subscription = Source::queue("foreign", &ConsumerOptions::default())
        .unwrap()
        .into_subscription(raw, Arc::clone(&dlq), futures::future::pending());

    // The undecodable message is dead-lettered before the next delivery is handed out.
    let next = timeout(BOUND, subscription.next_delivery())
        .await
        .expect("the good event after the undecodable one")
        .unwrap()
        .unwrap();
    assert_eq!(next.event().ty(), "test.event");
    assert_eq!(
        *acker.acked.lock().unwrap(),
        [7],
        "the undecodable one was acked"
    );

    let record = first_record(dlq.as_ref()).await;
    assert_eq!(record.ty(), UNDECODABLE_EVENT_TYPE);
    assert!(record.encoded_len() <= LIMIT);
    assert!(
        record
            .extension(DEAD_LETTER_REASON)
            .is_some_and(|r| r.contains("not a CloudEvent"))
    );
    let data: serde_json::Value = record.json().unwrap();
    assert_eq!(data["truncated"], true);
    assert_eq!(data["body_length"], body.len());
    assert_eq!(data["headers_count"], 2);
    assert_eq!(data["id"], "1-0");
    // The first kilobyte of each value is kept.
    assert_eq!(data["headers"]["trace"], "x".repeat(1024));
    // Text is cut at its last whole character (three bytes each here), and stays text.
    assert_eq!(data["headers"]["euro"], "€".repeat(341));
    let kept = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        data["body"]["base64"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(kept, body[..1024]);
}

#[tokio::test]
async fn a_dead_letter_record_over_the_limit_keeps_the_attributes_and_says_what_was_dropped() {
    let transport = transport();
    let queue = transport.queue("work").await.unwrap();
    // Fits the queue, but not with the dead-letter extensions added.
    let padding = "p".repeat(LIMIT - 600);
    let event = Event::builder("test.event", "/tests")
        .json(&serde_json::json!({ "padding": padding }))
        .unwrap()
        .subject("s-1")
        .build()
        .unwrap();
    assert!(event.encoded_len() <= LIMIT);
    queue.send(&event).await.unwrap();
    let mut work = queue.receive(ConsumerOptions::default()).await.unwrap();
    let delivery = timeout(BOUND, work.next_delivery())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reason = format!("handler failed: {}", "r".repeat(700));
    delivery
        .dead_letter(&reason)
        .await
        .expect("dead-lettered without its data");

    let record = first_record(transport.queue("work.dlq").await.unwrap().as_ref()).await;
    assert_eq!(record.id(), event.id());
    assert_eq!(record.ty(), "test.event");
    assert_eq!(record.subject(), Some("s-1"));
    assert_eq!(record.data(), None);
    assert_eq!(record.extension(DEAD_LETTER_REASON), Some(reason.as_str()));
    let dropped = event.data().unwrap().len().to_string();
    assert_eq!(
        record.extension(DEAD_LETTER_DATA_DROPPED),
        Some(dropped.as_str())
    );
    assert!(delivery.is_settled());
}

/// A foreign producer's event whose attributes alone are over the limit (a huge subject) and
/// that is dead-lettered: without its data it is still too large, so its attribute values are
/// cut and the record says so. It was refused again, and the event came back after every
/// visibility timeout for ever (found by an outsider review: on Kafka that pinned the group's
/// offset and the consumer's memory grew with every later record).
#[tokio::test]
async fn a_record_whose_attributes_alone_are_over_the_limit_is_dead_lettered_cut() {
    let transport = transport();
    let dlq = transport.queue("foreign.dlq").await.unwrap();
    let acker = Arc::new(Recorder::default());
    let huge = Event::builder("test.event", "/tests")
        .json(&serde_json::json!({"n": "x"}))
        .unwrap()
        .subject("s".repeat(3 * LIMIT))
        .extension("note", "n".repeat(2 * LIMIT))
        .build()
        .unwrap();
    dead_letter_one(&dlq, &huge, &acker, 9, "rejected: invalid").await;

    let record = first_record(dlq.as_ref()).await;
    assert_eq!(record.id(), huge.id());
    assert_eq!(record.extension(DEAD_LETTER_TRUNCATED), Some("true"));
    assert_eq!(
        record.extension(DEAD_LETTER_REASON),
        Some("rejected: invalid")
    );
    assert!(record.extension(DEAD_LETTER_DATA_DROPPED).is_some());
    assert_eq!(record.subject().map(str::len), Some(1024));
    assert_eq!(record.extension("note").map(str::len), Some(1024));
    assert!(record.encoded_len() <= LIMIT);
}

/// An event whose many attributes sit just under the limit: its dead-letter record (a few
/// hundred bytes of dead-letter extensions more) is refused whole, and still refused with its
/// values cut to 1 KiB (each was under that); it is cut further until it fits. It was
/// refused at every step and came back after every visibility timeout, for ever (outside
/// review: on NATS, whose headers hold 64 KiB, with 64 extensions of 994 bytes).
#[tokio::test]
async fn a_record_of_many_attributes_near_the_limit_is_cut_until_it_fits() {
    let mut builder = Event::builder("test.event", "/tests").subject("s".repeat(1000));
    for i in 0..64 {
        builder = builder.extension(&format!("ext{i}"), "v".repeat(994));
    }
    let event = builder.build().unwrap();
    // The event fits, with ten bytes to spare: its dead-letter extensions do not.
    let limit = event.encoded_len() + 10;
    let mut config = MemoryConfig::default();
    config.max_payload_bytes = limit;
    let transport: Arc<dyn Transport> = Arc::new(MemoryBroker::new(config).connect());
    let dlq = transport.queue("many.dlq").await.unwrap();
    let acker = Arc::new(Recorder::default());
    transport.check_size(&event).expect("the event itself fits");
    dead_letter_one(&dlq, &event, &acker, 4, "rejected").await;
    let record = first_record(dlq.as_ref()).await;
    assert_eq!(record.id(), event.id());
    assert_eq!(record.extension(DEAD_LETTER_TRUNCATED), Some("true"));
    assert_eq!(record.extension(DEAD_LETTER_REASON), Some("rejected"));
    assert!(record.encoded_len() <= limit);
    assert!(
        record.extensions().len() < 64 + 4,
        "extensions were dropped"
    );
}
