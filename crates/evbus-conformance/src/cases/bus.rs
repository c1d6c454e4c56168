//! Bus cases: how the Bus's handlers behave on every adapter, where that rests on the
//! transport.

use std::sync::Mutex;

use evbus::bus::{Emit, HandlerError, Message};

use super::prelude::*;
use super::schema::{TYPE, bus, valid};

/// A prefetching handler whose backlog takes longer than the visibility timeout runs each
/// event once, on its first attempt, in order per key: an ordered handler at concurrency 2
/// with a prefetch of 8 and a 1 s timeout, 8 keys of 2 events each, runs of 300 ms (2.4 s in
/// all). A key's second event waits in its lane (which the Bus renews); an event whose key is
/// free waits for a slot fetched ahead in the transport, up to about 4 runs (1.2 s), which
/// the transport renews while the handler takes deliveries (ADR 0037). Before transports
/// renewed what they fetched ahead, two outside reviews saw such a handler run events twice
/// and out of order on NATS and Redis.
pub(super) async fn bus_a_prefetching_handler_runs_a_backlog_past_the_visibility_timeout_once_in_order<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const PER_KEY: usize = 2;
    const KEYS: [&str; 8] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let run = Duration::from_millis(300);
    let conn = ctx.connect().await?;
    let (bus, topic_name) = bus(&ctx, &conn)?;
    let group = ctx.subscription_name(&topic_name, "ordered");
    ctx.extra_queue(bus.redrive_queue_name(TYPE, &group));
    ctx.extra_queue(bus.dead_letter_queue_name(TYPE, &group));
    let runs: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let seen = Arc::clone(&runs);
    let handler = bounded(
        "starting the ordered handler",
        bus.on(TYPE, group.clone(), move |msg: Message| {
            let order = msg
                .event()
                .data()
                .and_then(|data| serde_json::from_slice::<serde_json::Value>(data).ok())
                .and_then(|v| v.get("orderId")?.as_str().map(str::to_owned));
            seen.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((order.unwrap_or_default(), msg.attempt()));
            let tx = tx.clone();
            async move {
                tokio::time::sleep(run).await;
                let _ = tx.send(());
                Ok::<(), HandlerError>(())
            }
        })
        .ordered_by_key(true)
        .concurrency(2)
        .prefetch(8)
        .visibility_timeout(SHORT_VISIBILITY)
        .start(),
    )
    .await?;
    let mut emits = Vec::new();
    for i in 0..PER_KEY {
        for key in KEYS {
            emits.push(Emit::new(TYPE, valid(&format!("{key}-{i}"))).key(key));
        }
    }
    bounded("emitting the backlog", bus.emit_batch(emits)).await?;
    let total = PER_KEY * KEYS.len();
    let started = Instant::now();
    for done in 0..total {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(())) => {}
            _ => fail!(
                "{done} of {total} runs ended within {WAIT:?} of each other; runs so far: {:?}",
                runs.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            ),
        }
    }
    let took = started.elapsed();
    // Past another visibility timeout: nothing may run again.
    tokio::time::sleep(SHORT_VISIBILITY + QUIET).await;
    handler.shutdown(Duration::from_secs(5)).await;
    let runs = runs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for key in KEYS {
        let of_key: Vec<&(String, u32)> = runs
            .iter()
            .filter(|(o, _)| o.starts_with(&format!("{key}-")))
            .collect();
        let want: Vec<(String, u32)> = (0..PER_KEY).map(|i| (format!("{key}-{i}"), 1)).collect();
        ensure!(
            of_key.iter().map(|r| (*r).clone()).eq(want.iter().cloned()),
            "key {key}: the runs (event, attempt) were {of_key:?}, expected each of its \
             {PER_KEY} events once, in order, on attempt 1 (the backlog took {took:?}, \
             visibility timeout {SHORT_VISIBILITY:?}: events waiting for their turn timed \
             out where they waited)"
        );
    }
    ensure!(
        runs.len() == total,
        "{} runs for {total} events: {runs:?}",
        runs.len()
    );
    Ok(())
}
