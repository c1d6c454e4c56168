//! A stock AMQP client (plain lapin, no evbus) reads what evbus writes, and evbus reads what
//! a stock client writes, on the RabbitMQ at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, Event, Transport};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use support::{shared_transport, stock_channel};

fn unique(label: &str) -> String {
    format!("stock-{label}-{}", uuid::Uuid::now_v7().simple())
}

fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).expect("UTF-8"),
        other => panic!("expected a long string, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_client_reads_the_cloud_events_headers_and_the_json_body() {
    let transport = shared_transport().await;
    let name = unique("read");
    let queue = transport.queue(&name).await.unwrap();
    let event = Event::builder("afterOrderCreate", "/shop/orders")
        .json(&serde_json::json!({"orderId": "o-1", "total": 42.5}))
        .unwrap()
        .subject("o-1")
        .partition_key("customer-7")
        .build()
        .unwrap();
    queue.send(&event).await.unwrap();

    let (conn, channel) = stock_channel().await;
    let amqp_queue = transport.queue_name(&name);
    let message = channel
        .basic_get(amqp_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message evbus sent");
    let properties = &message.delivery.properties;
    let headers = properties.headers().as_ref().expect("headers").inner();
    // RabbitMQ adds its own `x-` headers (a quorum queue's `x-delivery-count`).
    let mut seen: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("x-"))
        .map(|(k, v)| (k.to_string(), text(v)))
        .collect();
    println!(
        "broker headers: {:?}",
        headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-"))
            .collect::<Vec<_>>()
    );
    seen.sort();
    println!("queue: {amqp_queue}");
    println!("content-type: {:?}", properties.content_type());
    println!("delivery-mode: {:?}", properties.delivery_mode());
    println!("message-id: {:?}", properties.message_id());
    for (k, v) in &seen {
        println!("header {k} = {v}");
    }
    println!("body: {}", String::from_utf8_lossy(&message.delivery.data));

    let get = |k: &str| {
        seen.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("cloudEvents_specversion").as_deref(), Some("1.0"));
    assert_eq!(get("cloudEvents_id").as_deref(), Some(event.id()));
    assert_eq!(get("cloudEvents_type").as_deref(), Some("afterOrderCreate"));
    assert_eq!(get("cloudEvents_source").as_deref(), Some("/shop/orders"));
    assert_eq!(get("cloudEvents_subject").as_deref(), Some("o-1"));
    assert_eq!(
        get("cloudEvents_partitionkey").as_deref(),
        Some("customer-7")
    );
    assert!(get("cloudEvents_time").is_some());
    // Besides the binding's headers, only the copy number (see the README's "Events on the
    // wire"): 16 hex digits.
    let copy = get("evbus-copy").expect("the copy number");
    assert!(
        copy.len() == 16 && copy.bytes().all(|b| b.is_ascii_hexdigit()),
        "{copy}"
    );
    assert!(
        seen.iter()
            .all(|(k, _)| k.starts_with("cloudEvents_") || k == "evbus-copy"),
        "{seen:?}"
    );
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2));
    let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body, serde_json::json!({"orderId": "o-1", "total": 42.5}));

    let _ = conn.close(200, "done".into()).await;
    transport.delete_queue(&name).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn evbus_reads_a_stock_producer_in_either_mode_and_moves_garbage_aside() {
    let transport = shared_transport().await;
    let name = unique("write");
    let queue = transport.queue(&name).await.unwrap();
    let amqp_queue = transport.queue_name(&name);

    let (conn, channel) = stock_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |headers: FieldTable, body: &'static [u8], ct: Option<&str>| {
        let channel = channel.clone();
        let amqp_queue = amqp_queue.clone();
        let ct = ct.map(str::to_owned);
        async move {
            let mut properties = BasicProperties::default().with_headers(headers);
            if let Some(ct) = ct {
                properties = properties.with_content_type(ct.into());
            }
            channel
                .basic_publish(
                    "".into(),
                    amqp_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    // Garbage first: it must not block the event behind it.
    publish(FieldTable::default(), b"\xff not a cloud event", None).await;
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", "stock-1"),
        ("cloudEvents:source", "/legacy-producer"),
        ("cloudEvents:type", "orderShipped"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    publish(headers, b"{\"ok\":true}", Some("application/json")).await;
    // Structured mode: the whole event as JSON, announced by the content type.
    publish(
        FieldTable::default(),
        br#"{"specversion":"1.0","id":"stock-2","source":"/sdk","type":"orderShipped","data":{"ok":2}}"#,
        Some("application/cloudevents+json"),
    )
    .await;

    let options = ConsumerOptions::default().dead_letter_queue(unique("dlq"));
    let dlq_name = options.dead_letter_queue.clone().unwrap();
    let mut sub = queue.receive(options).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
        .await
        .expect("a delivery within 15s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(delivery.event().id(), "stock-1");
    assert_eq!(delivery.event().source(), "/legacy-producer");
    assert_eq!(
        delivery.event().data().map(|d| &d[..]),
        Some(&b"{\"ok\":true}"[..])
    );
    delivery.ack().await.unwrap();
    let structured = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
        .await
        .expect("a delivery within 15s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(structured.event().id(), "stock-2");
    assert_eq!(structured.event().source(), "/sdk");
    assert_eq!(
        structured.event().data().map(|d| &d[..]),
        Some(&b"{\"ok\":2}"[..])
    );
    structured.ack().await.unwrap();

    let dlq = transport.queue(&dlq_name).await.unwrap();
    let mut dead = dlq.receive(ConsumerOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(15), dead.next_delivery())
        .await
        .expect("a dead letter within 15s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(d.event().ty(), evbus::raw::UNDECODABLE_EVENT_TYPE);
    assert!(
        d.event()
            .extension(evbus::raw::DEAD_LETTER_REASON)
            .is_some_and(|r| r.contains("specversion")),
        "{:?}",
        d.event()
    );
    let first_dead = d.event().id().to_owned();
    d.ack().await.unwrap();

    // A second consumer on a connection of its own, as a second run of a program: its
    // delivery tags start at 1 again, and its dead letter still gets an id of its own.
    drop(sub);
    publish(FieldTable::default(), b"\xfe more garbage", None).await;
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "stock-3"),
        ("cloudEvents_source", "/sdk"),
        ("cloudEvents_type", "orderShipped"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    // The CloudEvents AMQP binding lets `time` be an AMQP timestamp (seconds).
    headers.insert(
        "cloudEvents_time".into(),
        AMQPValue::Timestamp(1_700_000_000),
    );
    publish(headers, b"{}", Some("application/json")).await;
    let second = shared_transport().await;
    let mut again = second
        .queue(&name)
        .await
        .unwrap()
        .receive(ConsumerOptions::default().dead_letter_queue(dlq_name.clone()))
        .await
        .unwrap();
    let timed = tokio::time::timeout(Duration::from_secs(15), again.next_delivery())
        .await
        .expect("a delivery within 15s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(timed.event().id(), "stock-3");
    assert_eq!(
        timed.event().time().map(|t| t.to_rfc3339()).as_deref(),
        Some("2023-11-14T22:13:20+00:00")
    );
    timed.ack().await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(15), dead.next_delivery())
        .await
        .expect("a second dead letter within 15s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(d.event().ty(), evbus::raw::UNDECODABLE_EVENT_TYPE);
    assert_ne!(d.event().id(), first_dead, "two dead letters, one id");
    d.ack().await.unwrap();
    drop(again);
    second.close().await.unwrap();

    let _ = conn.close(200, "done".into()).await;
    transport.delete_queue(&name).await.unwrap();
    transport.delete_queue(&dlq_name).await.unwrap();
    transport.close().await.unwrap();
}

/// Looks at a dead-letter queue that stop before its end (`dlq list --limit 1`) leave it as it
/// was: the look's give-back raced its subscription's end, the retry copy was published and
/// the original's ack found the channel closed, so RabbitMQ requeued the original too (found
/// by an outsider review: two records became six after five looks).
#[tokio::test(flavor = "multi_thread")]
async fn looks_that_stop_early_add_no_copies_to_a_dead_letter_queue() {
    let transport = std::sync::Arc::new(shared_transport().await);
    let catalog = evbus::Catalog::builder().strict(false).freeze().unwrap();
    let ty = unique("looked");
    let bus = evbus::bus::Bus::new(transport.clone(), catalog, "/evbus-amqp/tests");
    let name = bus.dead_letter_queue_name(&ty, "g");
    let dlq = transport.queue(&name).await.unwrap();
    for n in 0..2 {
        let record = Event::builder(ty.as_str(), "/evbus-amqp/tests")
            .json(&serde_json::json!({ "n": n }))
            .unwrap()
            .extension("deadletterreason", "rejected")
            .build()
            .unwrap();
        dlq.send(&record).await.unwrap();
    }
    let dead = bus.dead_letters(&ty, "g").await.unwrap();
    for _ in 0..5 {
        let seen = dead.peek(1, Duration::from_secs(2)).await.unwrap();
        assert_eq!(seen.len(), 1);
    }
    let all = dead.peek(100, Duration::from_secs(2)).await.unwrap();
    let (conn, _channel) = stock_channel().await;
    let ready = support::message_count(&conn, &transport.queue_name(&name)).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(ready, Some(2));
    transport.delete_queue(&name).await.unwrap();
    let _ = transport
        .delete_queue(&bus.redrive_queue_name(&ty, "g"))
        .await;
}

/// A message in a dead-letter queue that is not a CloudEvent (published there by a stock
/// client) is listed under the same placeholder id by every look, so `evbus dlq show <id>`
/// finds it: its `message-id` when it has one, else an id derived from the message, never
/// from the delivery (each look gives it back as a new copy, with a copy number and attempts
/// of its own).
#[tokio::test(flavor = "multi_thread")]
async fn looks_list_a_foreign_message_under_the_same_id_every_time() {
    let transport = std::sync::Arc::new(shared_transport().await);
    let catalog = evbus::Catalog::builder().strict(false).freeze().unwrap();
    let ty = unique("foreign");
    let bus = evbus::bus::Bus::new(transport.clone(), catalog, "/evbus-amqp/tests");
    let name = bus.dead_letter_queue_name(&ty, "g");
    transport.queue(&name).await.unwrap();
    let amqp_queue = transport.queue_name(&name);
    let (conn, channel) = stock_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (body, properties) in [
        (
            &b"\xff no message id"[..],
            BasicProperties::default().with_content_type("text/plain".into()),
        ),
        (
            &b"{\"legacy\":true}"[..],
            BasicProperties::default().with_message_id("legacy-42".into()),
        ),
    ] {
        channel
            .basic_publish(
                "".into(),
                amqp_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = bus.dead_letters(&ty, "g").await.unwrap();
    let mut looks = Vec::new();
    for _ in 0..3 {
        let seen = dead.peek(10, Duration::from_secs(2)).await.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen.iter()
                .all(|d| d.event().ty() == evbus::raw::UNDECODABLE_EVENT_TYPE),
            "{seen:?}"
        );
        let mut ids: Vec<String> = seen.iter().map(|d| d.event().id().to_owned()).collect();
        ids.sort();
        looks.push(ids);
    }
    assert_eq!(looks[0], looks[1], "the first and the second look");
    assert_eq!(looks[0], looks[2], "the first and the third look");
    assert_ne!(looks[0][0], looks[0][1], "two messages, one id");
    let location = format!("amqp:{amqp_queue}/");
    assert!(
        looks[0].contains(&format!("{location}legacy-42")),
        "the message id names the message that has one: {:?}",
        looks[0]
    );
    assert!(
        looks[0].iter().all(|id| id.starts_with(&location)),
        "{:?}",
        looks[0]
    );
    // The last look's give-back may still be on its way (its channel closing).
    let mut ready = None;
    for _ in 0..100 {
        ready = support::message_count(&conn, &amqp_queue).await;
        if ready == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, Some(2), "the looks left the queue as it was");
    let _ = conn.close(200, "done".into()).await;
    transport.delete_queue(&name).await.unwrap();
    let _ = transport
        .delete_queue(&bus.redrive_queue_name(&ty, "g"))
        .await;
}

/// A stock producer's attribute that is an AMQP decimal (pika writes a Python `Decimal` so),
/// a double or a float is read as the number's text, as an integer is: it was refused as
/// "not a string, a number, ..." and the event dead-lettered (found by an outside review).
#[tokio::test(flavor = "multi_thread")]
async fn decimal_and_floating_point_headers_are_read_as_numbers() {
    let transport = shared_transport().await;
    let name = unique("decimal");
    let queue = transport.queue(&name).await.unwrap();
    let amqp_queue = transport.queue_name(&name);
    let (conn, channel) = stock_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "stock-decimal-1"),
        ("cloudEvents_source", "/pika"),
        ("cloudEvents_type", "orderPriced"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    headers.insert(
        "cloudEvents_amount".into(),
        AMQPValue::DecimalValue(lapin::types::DecimalValue {
            scale: 1,
            value: 15,
        }),
    );
    headers.insert("cloudEvents_ratio".into(), AMQPValue::Double(0.25));
    headers.insert("cloudEvents_weight".into(), AMQPValue::Float(-2.5));
    channel
        .basic_publish(
            "".into(),
            amqp_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default()
                .with_headers(headers)
                .with_content_type("application/json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let options = ConsumerOptions::default().dead_letter_queue(unique("decimal-dlq"));
    let dlq_name = options.dead_letter_queue.clone().unwrap();
    let mut sub = queue.receive(options).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next_delivery())
        .await
        .expect("a delivery within 15s (a refused message is dead-lettered, not handed out)")
        .expect("the stream is open")
        .unwrap();
    let event = delivery.event();
    assert_eq!(event.id(), "stock-decimal-1");
    assert_eq!(event.extension("amount"), Some("1.5"));
    assert_eq!(event.extension("ratio"), Some("0.25"));
    assert_eq!(event.extension("weight"), Some("-2.5"));
    delivery.ack().await.unwrap();
    drop(sub);

    let _ = conn.close(200, "done".into()).await;
    transport.delete_queue(&name).await.unwrap();
    transport.delete_queue(&dlq_name).await.unwrap();
    transport.close().await.unwrap();
}
