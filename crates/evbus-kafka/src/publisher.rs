//! Publishing: one Kafka record per event, CloudEvents Kafka binding in binary mode.
//!
//! The record key is the event's partition key (so per-key order holds), the headers are the
//! `ce_*` attributes and `content-type`, the value is the data. A publish returns `Ok` only
//! once the delivery report says the broker accepted the record (`acks=all`, idempotent
//! producer); a batch enqueues every record first and then waits for all the reports, so many
//! are in flight at once.

use std::time::Duration;

use evbus::binding::{self, HeaderStyle};
use evbus::{Error, Event, Result};
use futures::future::try_join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use crate::connection::Connection;
use crate::error::from_kafka;

/// Encodes `event` as a record's key, headers and value.
pub(crate) fn encode(event: &Event) -> (Option<String>, OwnedHeaders, bytes::Bytes) {
    let (headers, body) = binding::encode(event, HeaderStyle::KAFKA);
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in &headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    (event.partition_key().map(str::to_owned), owned, body)
}

/// Bytes a record takes beyond its key, value and header names and values, at most: the
/// batch that carries it alone (61), the record's own fields (about 21) and two varints per
/// header (counted apart).
const RECORD_OVERHEAD: usize = 96;
/// Bytes a header takes beyond its name and value, at most (two varints).
const HEADER_OVERHEAD: usize = 10;

/// The most bytes the record of `event` takes, as the producer and the broker count it
/// against `message.max.bytes`: the key (the partition key, which travels again as the
/// `ce_partitionkey` header), the value, every header. Counted as [`encode`] would write
/// them, without writing them (it is on every publish's path).
fn record_len(event: &Event) -> usize {
    let mut len = event.partition_key().map_or(0, str::len)
        + event.data().map_or(0, bytes::Bytes::len)
        + RECORD_OVERHEAD;
    binding::visit(event, HeaderStyle::KAFKA, |prefix, name, value| {
        len += prefix.len() + name.len() + value.len() + HEADER_OVERHEAD;
    });
    len
}

impl Connection {
    /// Refuses events over the configured limit, counted as every transport counts it
    /// (`Event::encoded_len`: the data plus every attribute value), and events whose record
    /// would not fit `message.max.bytes` (the limit and a header allowance): the partition
    /// key travels twice, and every attribute takes its `ce_` name. Both the producer and
    /// the broker would refuse it; an outbox row of it could never be relayed.
    pub(crate) fn check_size(&self, event: &Event) -> Result<()> {
        evbus::raw::check_encoded_len("Kafka", Some(self.config.max_payload_bytes), event)?;
        let len = record_len(event);
        let max = self.config.message_max_bytes();
        if len > max {
            return Err(Error::new(
                evbus::ErrorKind::TooLarge,
                format!(
                    "event {}: its Kafka record takes {len} bytes (the partition key travels \
                     as the key and as a header, each attribute as a `ce_` header), more \
                     than message.max.bytes ({max}: max_payload_bytes and a header \
                     allowance)",
                    event.id()
                ),
            )
            .with_hint("keep large values in the data, and partition keys short"));
        }
        Ok(())
    }

    /// Hands one record to the producer, waiting while its local queue is full. The caller
    /// checked the event's size.
    async fn enqueue(&self, topic: &str, event: &Event) -> Result<DeliveryFuture> {
        self.check_open()?;
        let (key, headers, body) = encode(event);
        loop {
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .payload(&body[..])
                .headers(headers.clone());
            if let Some(key) = &key {
                record = record.key(key.as_str());
                // librdkafka's default partitioner sends empty keys (as null ones) to a
                // random partition: an empty key goes where `consistent` puts it (CRC32 of
                // "" is 0), so that its events keep their order as any key's do.
                if key.is_empty() {
                    record = record.partition(0);
                }
            }
            match self.producer.send_result(record) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(from_kafka(
                        e,
                        &format!("publishing event {} to Kafka topic `{topic}`", event.id()),
                    ));
                }
            }
        }
    }

    /// Waits for the delivery report of one record.
    async fn delivered(topic: &str, id: &str, future: DeliveryFuture) -> Result<()> {
        let what = || format!("publishing event {id} to Kafka topic `{topic}`");
        match future.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(from_kafka(e, &what())),
            Err(_) => Err(Error::closed("the Kafka producer")),
        }
    }

    /// Creates Kafka topic `topic` again when this transport deleted it after the topic or
    /// queue handle was made (a no-op otherwise). Against tansu, a producer that still knows
    /// a deleted topic has it accept records, with offsets, that no consumer ever sees: the
    /// publish would return `Ok` for an event that is lost.
    async fn ensure_target(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.ensure_topic(topic).await
    }

    /// Publishes one event and waits for the broker's acknowledgement.
    pub(crate) async fn publish(&self, topic: &str, event: &Event) -> Result<()> {
        // Close waits for it, then flushes.
        let _operation = self.gate.enter()?;
        self.check_size(event)?;
        self.ensure_target(topic).await?;
        let future = self.enqueue(topic, event).await?;
        Self::delivered(topic, event.id(), future).await
    }

    /// Publishes events in order, all in flight at once; `Ok` once every one was accepted.
    pub(crate) async fn publish_batch(&self, topic: &str, events: &[Event]) -> Result<()> {
        let _operation = self.gate.enter()?;
        // Every event is checked before the first is handed to the producer: a batch with
        // an event over the limit publishes nothing, not the events ahead of it.
        for event in events {
            self.check_size(event)?;
        }
        self.ensure_target(topic).await?;
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let future = self.enqueue(topic, event).await?;
            pending.push(Self::delivered(topic, event.id(), future));
        }
        try_join_all(pending).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn records_carry_ce_headers_the_key_and_the_data() {
        let event = Event::builder("afterOrderCreate", "/shop")
            .json(&serde_json::json!({"id": 1}))
            .unwrap()
            .partition_key("order-1")
            .build()
            .unwrap();
        let (key, headers, body) = encode(&event);
        assert_eq!(key.as_deref(), Some("order-1"));
        let names: Vec<&str> = headers.iter().map(|h| h.key).collect();
        assert!(names.contains(&"ce_type") && names.contains(&"ce_id"));
        assert!(names.contains(&"content-type"));
        assert_eq!(&body[..], br#"{"id":1}"#);
    }
}
