//! Schema cases: validation through the Bus, on every adapter (DESIGN §4 "Schema").

use evbus::Catalog;
use evbus::bus::{Bus, HandlerError, Message};
use serde_json::{Value, json};

use super::prelude::*;
use crate::support::{Conn, expect_quiet};

/// The event type of these cases.
pub(super) const TYPE: &str = "evbus.conformance.order";

fn catalog() -> Result<Catalog, Failure> {
    let mut builder = Catalog::builder();
    builder
        .register_json(
            TYPE,
            json!({
                "type": "object",
                "properties": {
                    "orderId": {"type": "string"},
                    "total": {"type": "number", "minimum": 0}
                },
                "required": ["orderId", "total"]
            }),
        )
        .map_err(|e| Failure(format!("building the catalogue: {e}")))?;
    builder
        .freeze()
        .map_err(|e| Failure(format!("freezing the catalogue: {e}")))
}

/// A bus on `conn` that publishes [`TYPE`] to a topic unique to the case.
pub(super) fn bus<T: Transport + 'static>(
    ctx: &Ctx<T>,
    conn: &Conn<T>,
) -> Result<(Bus, String), Failure> {
    let topic = ctx.topic_name("orders");
    let bus = Bus::builder(conn.shared(), catalog()?)
        .source(ctx.source())
        .route([TYPE], topic.clone())
        .build();
    Ok((bus, topic))
}

pub(super) fn valid(order: &str) -> Value {
    json!({"orderId": order, "total": 12.5})
}

pub(super) async fn schema_invalid_event_is_rejected_at_emit_and_nothing_is_published<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let (bus, topic_name) = bus(&ctx, &conn)?;
    let topic = bounded("opening the topic", conn.topic(&topic_name)).await?;
    let probe = ctx.subscription_name(&topic_name, "probe");
    let mut sub = bounded("subscribing", topic.subscribe(ctx.named(&probe))).await?;

    let refused = bus.emit(TYPE, json!({"orderId": 42, "total": -1})).await;
    match refused {
        Ok(id) => fail!("an invalid payload was emitted as event {id}"),
        Err(e) => {
            ensure!(
                e.kind() == ErrorKind::Validation,
                "an invalid payload failed with {:?}, not Validation: {e}",
                e.kind()
            );
            ensure!(
                e.message().contains("/orderId") && e.message().contains("/total"),
                "the error does not name every violation: {e}"
            );
        }
    }
    // The next valid event is the first thing on the topic: the invalid one never got there.
    let id = bounded("emitting a valid event", bus.emit(TYPE, valid("o-1"))).await?;
    let d = next(&mut sub, WAIT, "the probe subscription").await?;
    ensure!(
        d.event().id() == id,
        "the topic carried event {} (data {:?}) before the valid one",
        d.event().id(),
        d.event().data()
    );
    bounded("acking", d.ack()).await?;
    expect_quiet(&mut sub, QUIET, "the probe subscription").await
}

pub(super) async fn schema_invalid_event_from_a_raw_producer_is_dead_lettered_and_never_handled<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let (bus, topic_name) = bus(&ctx, &conn)?;
    let group = ctx.subscription_name(&topic_name, "g");
    ctx.extra_queue(bus.redrive_queue_name(TYPE, &group));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handler = bounded(
        "starting the handler",
        bus.on(TYPE, group.clone(), move |msg: Message| {
            let _ = tx.send(msg.id().to_owned());
            async { Ok::<(), HandlerError>(()) }
        })
        .start(),
    )
    .await?;

    let topic = bounded("opening the topic", conn.topic(&topic_name)).await?;
    let bad = Event::builder(TYPE, ctx.source())
        .json(&json!({"orderId": 7}))
        .context("building the invalid event")?
        .build()
        .context("building the invalid event")?;
    bounded("publishing the invalid event raw", topic.publish(&bad)).await?;
    let good = bounded("emitting a valid event", bus.emit(TYPE, valid("o-2"))).await?;

    let handled = tokio::time::timeout(WAIT, rx.recv()).await;
    match handled {
        Ok(Some(id)) if id == good => {}
        Ok(Some(id)) if id == *bad.id() => fail!("the handler ran for the invalid event {id}"),
        Ok(other) => fail!("the handler got {other:?}, expected the valid event {good}"),
        Err(_) => fail!("the handler did not get the valid event within {WAIT:?}"),
    }

    let dlq_name = bus.dead_letter_queue_name(TYPE, &group);
    let dlq = bounded("opening the dead-letter queue", conn.queue(&dlq_name)).await?;
    let mut dead = bounded(
        "consuming the dead-letter queue",
        dlq.receive(ctx.consumer()),
    )
    .await?;
    let d = next(
        &mut dead,
        WAIT,
        &format!("the dead-letter queue `{dlq_name}`"),
    )
    .await?;
    ensure!(
        d.event().id() == bad.id(),
        "the dead-letter queue holds {} instead of the invalid event {}",
        d.event().id(),
        bad.id()
    );
    let reason = d.event().extension(DEAD_LETTER_REASON).unwrap_or_default();
    ensure!(
        reason.contains("/total"),
        "the dead-letter reason does not name the violation: {reason:?}"
    );
    bounded("acking the dead letter", d.ack()).await?;

    handler.shutdown(Duration::from_secs(5)).await;
    ensure!(
        rx.try_recv().is_err(),
        "the handler ran for something else than the valid event"
    );
    Ok(())
}
