//! The suite's self-test: the `Faults` layer over the in-memory transport injects one fault
//! at a time, and the named case must fail, while the same case passes without the fault (so
//! the failure is the fault's, not the case's). Each fault of issue 12's list is caught by at
//! least one named case.

mod common;

use evbus::ErrorKind;
use evbus::layer::Fault;
use evbus_conformance::{Outcome, Suite};

/// Runs `case` on a memory broker with `faults` (plus the foreign-message corruption) and
/// returns its outcome.
async fn outcome(faults: &[(Fault, f64)], case: &str) -> Outcome {
    let (broker, layer) = common::corrupting(faults);
    let producer = common::Foreign(broker.clone());
    let report = Suite::new("self-test", move || {
        std::future::ready(Ok(common::connect(&broker, &layer)))
    })
    .with_raw_producer(producer)
    .filter(case)
    .run()
    .await;
    let found: Vec<_> = report.cases().iter().filter(|c| c.name() == case).collect();
    assert_eq!(found.len(), 1, "no case named {case} ran: {report}");
    found[0].outcome().clone()
}

/// The fault makes `case` fail, and `case` passes without it.
async fn caught(fault: Fault, rate: f64, case: &str) {
    let clean = outcome(&[], case).await;
    assert_eq!(clean, Outcome::Passed, "{case} must pass without faults");
    match outcome(&[(fault.clone(), rate)], case).await {
        Outcome::Failed(reason) => println!("{fault:?} caught by {case}: {reason}"),
        other => panic!("{fault:?} at rate {rate} was not caught by {case}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_publish_is_caught() {
    caught(
        Fault::DropPublish,
        0.2,
        "topic_many_concurrent_publishers_on_many_topics_lose_nothing",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_ack_is_caught() {
    caught(
        Fault::LoseAck,
        1.0,
        "queue_explicit_dead_letter_moves_the_event_with_its_reason",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reordered_batch_is_caught() {
    caught(
        Fault::ReorderBatch,
        1.0,
        "queue_send_batch_keeps_batch_order_for_one_consumer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_extension_is_caught() {
    caught(
        Fault::DropExtensions,
        1.0,
        "topic_envelope_round_trips_every_attribute_and_extension",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_time_is_caught() {
    caught(
        Fault::TruncateTime,
        1.0,
        "topic_envelope_round_trips_every_attribute_and_extension",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicated_delivery_is_caught() {
    caught(
        Fault::DuplicateDelivery,
        1.0,
        "queue_send_receive_ack_delivers_each_event_once",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_message_blocking_the_stream_is_caught() {
    caught(
        Fault::BlockAfterUndecodable,
        1.0,
        "queue_undecodable_message_is_dead_lettered_and_does_not_block",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_publish_is_caught() {
    caught(
        Fault::FailPublish(ErrorKind::Timeout),
        1.0,
        "queue_send_receive_ack_delivers_each_event_once",
    )
    .await;
}
