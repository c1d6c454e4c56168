//! A stock Kafka consumer (plain rdkafka `BaseConsumer`, no evbus code) reads what evbus
//! publishes: CloudEvents Kafka binding, binary mode.

mod support;

use std::time::Duration;

use evbus::{Event, Transport};
use evbus_kafka::KafkaTransport;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use support::{kafka_url, test_config};

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_kafka_consumer_sees_ce_headers_and_json_data() {
    let config = match test_config(&kafka_url()) {
        Ok(c) => c,
        Err(e) => panic!("bad EVBUS_KAFKA_URL: {e}"),
    };
    let bootstrap = config.bootstrap_servers.clone();
    let transport = match KafkaTransport::connect(config).await {
        Ok(t) => t,
        Err(e) if !evbus_conformance::require_brokers() => {
            eprintln!("WARNING: Kafka unreachable, test not run: {e}");
            return;
        }
        Err(e) => panic!("Kafka unreachable: {e}"),
    };
    let name = format!("evbus-stock-{}", uuid::Uuid::now_v7().simple());
    let topic = transport.topic(&name).await.expect("topic");
    let event = Event::builder("afterOrderCreate", "/shop/orders")
        .json(&serde_json::json!({"orderId": "o-1", "total": 42}))
        .expect("json")
        .partition_key("o-1")
        .build()
        .expect("event");
    topic.publish(&event).await.expect("publish");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("{name}-stock"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    // Read every partition from the beginning, as `kcat -C -t <topic> -o beginning` would.
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..partitions_of(&transport) {
        partitions
            .add_partition_offset(&name, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let found = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let headers: Vec<(String, String)> = message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let value = message.payload().map(|v| v.to_vec()).unwrap_or_default();
            return Some((headers, key, value));
        }
        None
    })
    .await
    .expect("consumer task")
    .expect("the stock consumer received nothing within 30s");
    let (headers, key, value) = found;
    for (k, v) in &headers {
        println!("{k}: {v}");
    }
    println!("key: {key:?}");
    println!("value: {}", String::from_utf8_lossy(&value));
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("ce_type"), Some("afterOrderCreate"));
    assert_eq!(header("ce_id"), Some(event.id()));
    assert_eq!(header("ce_specversion"), Some("1.0"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(key.as_deref(), Some("o-1"));
    let data: serde_json::Value = serde_json::from_slice(&value).expect("the value is JSON");
    assert_eq!(data, serde_json::json!({"orderId": "o-1", "total": 42}));

    transport.delete_topic(&name).await.expect("cleanup");
    transport.close().await.expect("close");
}

fn partitions_of(transport: &KafkaTransport) -> i32 {
    transport.config().partitions
}
