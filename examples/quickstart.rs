//! evbus in one minute, on the in-memory transport:
//!
//! 1. fan-out: two named subscriptions of the topic `orders` each get every `afterOrderCreate`;
//! 2. a queue with two competing consumers splitting the work;
//! 3. a nack, and the redelivery that follows with attempt 2;
//! 4. an event that keeps failing, dead-lettered after its last attempt.
//!
//! Run it with `cargo run --example quickstart`. Every wait is bounded, so it cannot hang.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use evbus::delivery::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON};
use evbus::{
    ConsumerOptions, Delivery, Event, Registry, Settlement, SubscribeOptions, Subscription,
    dead_letter_queue_name,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Result<T = (), E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

/// The longest the example waits for any one delivery.
const WAIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> Result {
    // Any transport is picked from a URL; `memory://NAME` is an in-process broker.
    let transport = Registry::new().connect("memory://quickstart").await?;
    println!("connected to the `{}` transport", transport.name());

    // 1. Fan-out ----------------------------------------------------------------------------
    println!("\n1. fan-out: topic `orders`, subscriptions `billing` and `shipping`");
    let orders = transport.topic("orders").await?;
    // Named subscriptions are durable: they get every event published after they exist.
    let mut billing = orders.subscribe(SubscribeOptions::named("billing")).await?;
    let mut shipping = orders
        .subscribe(SubscribeOptions::named("shipping"))
        .await?;
    for (id, total) in [("o-1", 42.5), ("o-2", 9.99), ("o-3", 120.0)] {
        let event = Event::builder("afterOrderCreate", "/shop/orders")
            .subject(id)
            .partition_key(id)
            .json(&json!({ "orderId": id, "total": total }))?
            .build()?;
        orders.publish(&event).await?;
        println!("   published afterOrderCreate {id}");
    }
    for (name, subscription) in [("billing", &mut billing), ("shipping", &mut shipping)] {
        for _ in 0..3 {
            let delivery = next(subscription, name).await?;
            let order: Value = delivery.event().json()?;
            println!(
                "   {name:<8} got {} {} (total {})",
                delivery.event().ty(),
                order["orderId"].as_str().unwrap_or("?"),
                order["total"]
            );
            delivery.ack().await?;
        }
    }

    // 2. Competing consumers ----------------------------------------------------------------
    println!("\n2. queue `emails`, two competing workers");
    let emails = transport.queue("emails").await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for worker in ["worker-a", "worker-b"] {
        // One event at a time each, so the two really share the load.
        let mut consumer = emails
            .receive(ConsumerOptions::default().max_in_flight(1))
            .await?;
        let done = done_tx.clone();
        workers.push(tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next_delivery().await {
                tokio::time::sleep(Duration::from_millis(20)).await; // "sending the email"
                let to: String = delivery.event().json().unwrap_or_default();
                if delivery.ack().await.is_ok() {
                    let _ = done.send((worker, to));
                }
            }
        }));
    }
    for n in 1..=6 {
        let to = format!("customer{n}@example.com");
        emails
            .send(
                &Event::builder("sendEmail", "/shop/notifications")
                    .json(&to)?
                    .build()?,
            )
            .await?;
    }
    let mut handled: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for _ in 0..6 {
        let (worker, to) = tokio::time::timeout(WAIT, done_rx.recv())
            .await
            .map_err(|_| "timed out waiting for the workers")?
            .ok_or("the workers stopped")?;
        println!("   {worker} sent {to}");
        handled.entry(worker).or_default().push(to);
    }
    for worker in &workers {
        worker.abort();
    }
    let split: Vec<String> = handled
        .iter()
        .map(|(w, jobs)| format!("{w} {}", jobs.len()))
        .collect();
    println!("   6 emails, each sent once: {}", split.join(", "));

    // 3. Nack and redelivery ----------------------------------------------------------------
    println!("\n3. queue `payments`: nack, then redelivery");
    let payments = transport.queue("payments").await?;
    payments
        .send(
            &Event::builder("capturePayment", "/shop/payments")
                .json(&json!({ "orderId": "o-1" }))?
                .build()?,
        )
        .await?;
    let mut consumer = payments.receive(ConsumerOptions::default()).await?;
    let first = next(&mut consumer, "payments").await?;
    let delay = Duration::from_millis(200);
    println!(
        "   attempt {}: the payment gateway timed out -> nack, retry in {} ms",
        first.attempt(),
        delay.as_millis()
    );
    let nacked_at = Instant::now();
    first.nack(Some(delay)).await?;
    let second = next(&mut consumer, "payments").await?;
    println!(
        "   attempt {}: redelivered after {} ms -> captured, ack",
        second.attempt(),
        nacked_at.elapsed().as_millis()
    );
    second.ack().await?;
    if let Err(e) = first.ack().await {
        println!("   acking the first delivery again is an error, not a panic: {e}");
    }

    // 4. Dead-letter ------------------------------------------------------------------------
    println!("\n4. queue `webhooks`, max 3 attempts: a poison event is dead-lettered");
    let options = ConsumerOptions::default().max_attempts(3);
    let webhooks = transport.queue("webhooks").await?;
    for id in ["o-7", "o-8"] {
        let event = Event::builder("afterOrderCancel", "/shop/orders")
            .subject(id)
            .json(&json!({ "orderId": id }))?
            .build()?;
        webhooks.send(&event).await?;
    }
    let mut consumer = webhooks.receive(options.clone()).await?;
    let (mut dead_lettered, mut flowed) = (false, false);
    while !(dead_lettered && flowed) {
        let delivery = next(&mut consumer, "webhooks").await?;
        let subject = delivery.event().subject().unwrap_or("?").to_owned();
        let (attempt, max) = (delivery.attempt(), delivery.max_attempts());
        if subject == "o-8" {
            println!("   {subject}: attempt {attempt} -> ok, ack (the queue keeps flowing)");
            delivery.ack().await?;
            flowed = true;
            continue;
        }
        match delivery.nack(None).await? {
            Settlement::DeadLettered => {
                println!("   {subject}: attempt {attempt} of {max} failed -> dead-lettered");
                dead_lettered = true;
            }
            _ => println!("   {subject}: attempt {attempt} of {max} failed -> nack"),
        }
    }
    let dlq_name = dead_letter_queue_name("webhooks", None, &options);
    let mut dlq = transport
        .queue(&dlq_name)
        .await?
        .receive(ConsumerOptions::default())
        .await?;
    let dead = next(&mut dlq, &dlq_name).await?;
    let ext = |name| dead.event().extension(name).unwrap_or("-");
    println!(
        "   `{dlq_name}` holds {} {}: reason \"{}\", attempts {}, origin {}",
        dead.event().ty(),
        dead.event().subject().unwrap_or("?"),
        ext(DEAD_LETTER_REASON),
        ext(DEAD_LETTER_ATTEMPTS),
        ext(DEAD_LETTER_ORIGIN)
    );
    dead.ack().await?;

    transport.close().await?;
    println!("\ndone: transport closed");
    Ok(())
}

/// The next delivery of `subscription`, waiting at most [`WAIT`].
async fn next(subscription: &mut Subscription, name: &str) -> Result<Delivery> {
    match tokio::time::timeout(WAIT, subscription.next_delivery()).await {
        Ok(Some(delivery)) => Ok(delivery?),
        Ok(None) => Err(format!("`{name}` ended unexpectedly").into()),
        Err(_) => Err(format!("nothing arrived on `{name}` within {WAIT:?}").into()),
    }
}
