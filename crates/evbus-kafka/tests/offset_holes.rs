//! Offsets without a record. A transaction of another producer that is aborted leaves offsets
//! a `read_committed` consumer never sees (its records and the abort marker). The consumer
//! commits only over offsets it knows are settled, so it must tell such a hole from a fetch
//! that skipped records: it fetches a hole again once, and passes it when it comes back the
//! same. Without that, the committed offset stays below the hole for good: every acked event
//! after it stays in memory and in the commit metadata, which is capped (past the cap, later
//! owners deliver acked events again).

mod support;

use std::time::{Duration, Instant};

use evbus::{ConsumerOptions, Event, Transport};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::{kafka_url, test_config};

const WAIT: Duration = Duration::from_secs(30);

fn event(i: usize) -> Event {
    Event::builder("holeTest", "/tests")
        .json(&i)
        .and_then(|b| b.partition_key("one-key").build())
        .expect("event")
}

async fn next_id(sub: &mut evbus::Subscription) -> String {
    let delivery = tokio::time::timeout(WAIT, sub.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
        .expect("a delivery");
    let id = delivery.event().id().to_owned();
    delivery.ack().await.expect("ack");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_transaction_leaves_a_hole_the_commit_passes() {
    let Some(transport) = support::connect_with("partitions=1").await else {
        return;
    };
    let bootstrap = test_config(&kafka_url())
        .expect("test URL")
        .bootstrap_servers;
    let name = format!("evbus-holes-{}", uuid::Uuid::now_v7().simple());
    let queue = transport.queue(&name).await.expect("queue");
    let options = ConsumerOptions::default();
    // Receive first: the group is in place before anything is sent.
    let mut sub = queue.receive(options.clone()).await.expect("receive");

    let before: Vec<Event> = (0..3).map(event).collect();
    for e in &before {
        queue.send(e).await.expect("send");
    }

    // Another producer's transaction, aborted: two records and the abort marker.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", format!("{name}-tx"))
        .set("message.timeout.ms", "20000")
        .create()
        .expect("transactional producer");
    let tx = tokio::task::spawn_blocking(move || {
        producer.init_transactions(WAIT)?;
        producer.begin_transaction()?;
        Ok::<_, rdkafka::error::KafkaError>(producer)
    })
    .await
    .expect("join")
    .expect("the broker takes transactions");
    for i in 0..2 {
        tx.send(
            FutureRecord::to(&name)
                .key("one-key")
                .payload(&format!("aborted {i}")),
            WAIT,
        )
        .await
        .map_err(|(e, _)| e)
        .expect("send in the transaction");
    }
    tokio::task::spawn_blocking(move || tx.abort_transaction(WAIT))
        .await
        .expect("join")
        .expect("abort");

    let after: Vec<Event> = (3..6).map(event).collect();
    for e in &after {
        queue.send(e).await.expect("send");
    }

    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(next_id(&mut sub).await);
    }
    let want: Vec<String> = before
        .iter()
        .chain(&after)
        .map(|e| e.id().to_owned())
        .collect();
    assert_eq!(
        seen, want,
        "every committed event once, in order, none aborted"
    );

    // Every event is acked: the group's committed offset reaches the end of the partition,
    // past the aborted records and the marker (the acks are committed asynchronously).
    let group = format!("evbus.queue.{name}");
    let (end, committed) = tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .create()
            .expect("probe");
        let (_, end) = probe.fetch_watermarks(&name, 0, WAIT).expect("watermarks");
        let mut partition = TopicPartitionList::new();
        partition.add_partition(&name, 0);
        let deadline = Instant::now() + WAIT;
        loop {
            let committed = probe
                .committed_offsets(partition.clone(), WAIT)
                .expect("committed offsets")
                .find_partition(&name, 0)
                .map(|e| e.offset());
            if committed == Some(Offset::Offset(end)) || Instant::now() > deadline {
                return (end, committed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("join");
    assert_eq!(end, 9, "6 events, 2 aborted records and the abort marker");
    assert_eq!(
        committed,
        Some(Offset::Offset(end)),
        "the commit passes the offsets without a record"
    );
    drop(sub);
}
