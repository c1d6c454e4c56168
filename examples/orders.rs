//! The commerce scenario end to end, on the example catalogue (`examples/schemas`):
//!
//! 1. order events are routed to one topic `orders`, keyed by order id;
//! 2. two handler groups: `inventory` handles `afterOrderCancel` (restocks canceled orders) and
//!    `notifications` handles `afterOrderCreate` and `afterOrderCancel` (mails the customer);
//!    every handler is a raw one (`Bus::on`, reading the data as JSON) and runs the events of
//!    one order one at a time, in order (`ordered_by_key(true)`);
//! 3. `afterOrderCreate` and `afterOrderCancel` are emitted through the Bus;
//! 4. a drifted `afterOrderCancel` (the old emitter forgot `returnToStock`) is refused at
//!    emit, naming the missing field, and nothing is published.
//!
//! `cargo run --example orders` runs it on `memory://`; `cargo run --example orders --
//! redis://127.0.0.1:6379` on Redis (under a key prefix unique to the run, deleted at the
//! end). Every wait is bounded.

use std::path::PathBuf;
use std::time::Duration;

use evbus::bus::{Bus, Message};
use evbus::{Catalog, Registry};
use serde_json::Value;
use tokio::sync::mpsc;

type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

fn schemas() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn payload(name: &str) -> Result<Value> {
    let text = std::fs::read_to_string(schemas().join("payloads").join(name))?;
    Ok(serde_json::from_str(&text)?)
}

#[tokio::main]
async fn main() -> Result {
    let url = match std::env::args().nth(1) {
        Some(base) => {
            let run = std::process::id();
            format!("{base}?prefix=evbus-example-orders-{run}:")
        }
        None => "memory://orders".to_owned(),
    };
    let mut registry = Registry::new();
    registry.register(evbus_redis::RedisConnector);
    let transport = registry.connect(&url).await?;
    let catalog = Catalog::from_dir(schemas())?;
    println!("catalogue: {}", catalog.type_names().join(", "));

    let bus = Bus::builder(transport.clone(), catalog)
        .source("/shop/orders")
        .route(
            ["afterOrderCreate", "afterOrderUpdate", "afterOrderCancel"],
            "orders",
        )
        .build();

    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    for (group, ty) in [
        ("inventory", "afterOrderCancel"),
        ("notifications", "afterOrderCreate"),
        ("notifications", "afterOrderCancel"),
    ] {
        let tx = tx.clone();
        bus.on(ty, group, move |msg: Message| {
            let tx = tx.clone();
            async move {
                let data: Value = msg.json()?;
                let order = data["order"]["_id"].as_str().unwrap_or("?").to_owned();
                let line = match (group, msg.ty()) {
                    ("inventory", _) => format!(
                        "inventory: order {order} canceled, returnToStock={}",
                        data["returnToStock"]
                    ),
                    (_, "afterOrderCreate") => {
                        format!(
                            "notifications: mail {} about new order {order}",
                            data["order"]["email"]
                        )
                    }
                    _ => format!("notifications: mail about canceled order {order}"),
                };
                tx.send(line)?;
                Ok(())
            }
        })
        .ordered_by_key(true)
        .start()
        .await?;
    }

    let cancel = payload("afterOrderCancel.valid.json")?;
    let create = serde_json::json!({"createdBy": "user-42", "order": cancel["order"].clone()});
    let mut create = create;
    create["order"]["status"] = "new".into();
    let order_id = "ord_01J9Z6";
    let created = bus
        .send(evbus::bus::Emit::new("afterOrderCreate", create).key(order_id))
        .await?;
    let canceled = bus
        .send(evbus::bus::Emit::new("afterOrderCancel", cancel).key(order_id))
        .await?;
    println!("emitted afterOrderCreate {created} and afterOrderCancel {canceled}");

    match bus
        .emit("afterOrderCancel", payload("afterOrderCancel.drift.json")?)
        .await
    {
        Ok(id) => return Err(format!("the drifted payload was emitted as {id}").into()),
        Err(e) => println!("drifted payload refused: {e}"),
    }

    let mut lines = Vec::new();
    while lines.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .ok_or("handlers stopped")?;
        println!("{line}");
        lines.push(line);
    }

    bus.shutdown(Duration::from_secs(5)).await?;
    if url.starts_with("redis") {
        let cleanup = registry.connect(&url).await?;
        cleanup.delete_topic("orders").await?;
        for group in [
            "inventory.afterOrderCancel",
            "notifications.afterOrderCreate",
            "notifications.afterOrderCancel",
        ] {
            cleanup.delete_queue(&format!("orders.{group}.dlq")).await?;
            cleanup
                .delete_queue(&format!("orders.{group}.redrive"))
                .await?;
        }
        cleanup.close().await?;
    }
    Ok(())
}
