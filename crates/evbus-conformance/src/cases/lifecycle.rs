//! Transport lifecycle and broker faults.

use evbus::Health;

use super::prelude::*;
use crate::support::Conn;

/// Expects `op` to fail promptly with `ErrorKind::Closed`.
async fn expect_closed<V>(what: &str, op: impl Future<Output = evbus::Result<V>>) -> CaseResult {
    match tokio::time::timeout(Duration::from_secs(10), op).await {
        Err(_) => fail!("{what} after close did not return within 10s"),
        Ok(Ok(_)) => fail!("{what} after close succeeded"),
        Ok(Err(e)) => {
            ensure!(
                e.kind() == ErrorKind::Closed,
                "{what} after close failed with `{e}` (kind {:?}), expected kind Closed",
                e.kind()
            );
            Ok(())
        }
    }
}

pub(super) async fn lifecycle_close_flushes_every_accepted_publish<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    const BURST: u64 = 200;
    const BEFORE_CLOSE: usize = 20;
    let name = ctx.topic_name("t");
    let consumer = ctx.connect().await?;
    let ct = bounded("opening the topic", consumer.topic(&name)).await?;
    let sub = ctx.subscription_name(&name, "s");
    let mut s = bounded("subscribing", ct.subscribe(ctx.named(&sub))).await?;

    let publisher = ctx.connect().await?;
    let topic = bounded("opening the topic", publisher.topic(&name)).await?;
    let events = ctx.events(BURST);
    let (accepted_tx, mut accepted_rx) = tokio::sync::watch::channel(0usize);
    let accepted_tx = Arc::new(accepted_tx);
    let mut tasks = Vec::with_capacity(events.len());
    for event in events.clone() {
        let topic = Arc::clone(&topic);
        let accepted_tx = Arc::clone(&accepted_tx);
        tasks.push(spawn(async move {
            let result = topic.publish(&event).await;
            // Read before the count goes up: a publish counted among those that returned
            // before close was called then surely has an instant before close's (a task
            // paused between the two would otherwise be blamed on close).
            let returned = Instant::now();
            if result.is_ok() {
                accepted_tx.send_modify(|n| *n += 1);
            }
            (event.id().to_owned(), result, returned)
        }));
    }
    // Close while the burst is in flight (once some publishes have returned).
    if tokio::time::timeout(WAIT, accepted_rx.wait_for(|n| *n >= BEFORE_CLOSE))
        .await
        .is_err()
    {
        fail!("fewer than {BEFORE_CLOSE} of {BURST} publishes returned Ok within {WAIT:?}");
    }
    let closing = Instant::now();
    bounded("closing the publishing connection", publisher.close()).await?;

    let mut accepted = HashSet::new();
    // Publishes that had returned Ok before close was called: if one of these is lost, the
    // publish was lost, not the flush.
    let mut before_close = HashSet::new();
    for task in tasks {
        let (id, result, returned) = task.join(WAIT, "a publish").await?;
        match result {
            Ok(()) => {
                if returned < closing {
                    before_close.insert(id.clone());
                }
                accepted.insert(id);
            }
            Err(e) => ensure!(
                e.kind() == ErrorKind::Closed,
                "a publish racing with close failed with `{e}`, expected Ok or kind Closed"
            ),
        }
    }

    // Every publish that returned Ok is delivered (others may or may not be).
    let all = ids(&events);
    let deadline = Instant::now() + WAIT;
    let mut seen = HashSet::new();
    while !accepted.is_subset(&seen) {
        let d = match tokio::time::timeout_at(deadline, s.next_delivery()).await {
            Err(_) => {
                let missing: Vec<&String> = accepted.difference(&seen).collect();
                let lost_early = before_close.difference(&seen).count();
                let blame = if lost_early > 0 {
                    format!(
                        "{lost_early} of the missing had returned Ok before close was called: \
                         those publishes were lost, not (only) the close's flush"
                    )
                } else {
                    "every missing one returned Ok while close was flushing: close lost them"
                        .to_owned()
                };
                fail!(
                    "published {BURST} events and closed during the burst: {} returned Ok \
                     ({} of them before close was called), the rest failed with Closed; {} of \
                     those that returned Ok never arrived within {WAIT:?}: {}; {blame}",
                    accepted.len(),
                    before_close.len(),
                    missing.len(),
                    crate::support::sample(missing)
                )
            }
            Ok(None) => fail!("the subscription ended"),
            Ok(Some(Err(e))) => fail!("the subscription yielded an error: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let id = d.event().id().to_owned();
        ensure!(all.contains(&id), "an unexpected event {id} was delivered");
        ensure!(seen.insert(id.clone()), "event {id} was delivered twice");
        bounded("acking", d.ack()).await?;
    }
    Ok(())
}

pub(super) async fn lifecycle_operations_after_close_fail_with_closed<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let tname = ctx.topic_name("t");
    let qname = ctx.queue_name("q");
    let topic = bounded("opening the topic", conn.topic(&tname)).await?;
    let queue = bounded("opening the queue", conn.queue(&qname)).await?;
    let event = ctx.event(0);
    let sub = ctx.subscription_name(&tname, "s");
    bounded("closing", conn.close()).await?;

    expect_closed("opening a topic", conn.topic(&tname)).await?;
    expect_closed("opening a queue", conn.queue(&qname)).await?;
    expect_closed("publishing", topic.publish(&event)).await?;
    expect_closed(
        "publishing a batch",
        topic.publish_batch(std::slice::from_ref(&event)),
    )
    .await?;
    expect_closed("subscribing", topic.subscribe(ctx.named(&sub))).await?;
    expect_closed("sending", queue.send(&event)).await?;
    expect_closed(
        "sending a batch",
        queue.send_batch(std::slice::from_ref(&event)),
    )
    .await?;
    expect_closed("consuming a queue", queue.receive(ctx.consumer())).await?;
    expect_closed("deleting a topic", conn.delete_topic(&tname)).await?;
    expect_closed("deleting a queue", conn.delete_queue(&qname)).await
}

/// Expects `sub` to end (or report `Closed`) because its connection was closed.
async fn expect_ended(sub: &mut Subscription, what: &str) -> CaseResult {
    match tokio::time::timeout(WAIT, sub.next_delivery()).await {
        Err(_) => fail!(
            "{what} was still open {WAIT:?} after its connection closed (the adapter must end \
             every subscription when its transport closes, also one waiting for a free \
             in-flight slot: build it with `Subscription::until(<the close signal>)`)"
        ),
        Ok(None) => Ok(()),
        Ok(Some(Err(e))) if e.kind() == ErrorKind::Closed => Ok(()),
        Ok(Some(Err(e))) => fail!("{what} yielded `{e}` after close, expected its end"),
        Ok(Some(Ok(d))) => fail!("{what} delivered event {} after close", d.event().id()),
    }
}

pub(super) async fn lifecycle_close_ends_open_subscriptions<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let other = ctx.connect().await?;
    let tname = ctx.topic_name("t");
    let qname = ctx.queue_name("q");
    let topic = bounded("opening the topic", conn.topic(&tname)).await?;
    let queue = bounded("opening the queue", conn.queue(&qname)).await?;
    let mut named = bounded(
        "subscribing",
        topic.subscribe(ctx.named(&ctx.subscription_name(&tname, "a"))),
    )
    .await?;
    let mut anonymous = bounded(
        "subscribing anonymously",
        topic.subscribe(SubscribeOptions::anonymous().consumer(ctx.consumer())),
    )
    .await?;
    let mut consumer = bounded("consuming the queue", queue.receive(ctx.consumer())).await?;
    // A subscription of another connection is not affected.
    let other_topic = bounded("opening the topic", other.topic(&tname)).await?;
    let other_sub = ctx.subscription_name(&tname, "b");
    let mut survivor = bounded("subscribing", other_topic.subscribe(ctx.named(&other_sub))).await?;

    bounded("closing", conn.close()).await?;
    expect_ended(&mut named, "a named subscription").await?;
    expect_ended(&mut anonymous, "an anonymous subscription").await?;
    expect_ended(&mut consumer, "a queue consumer").await?;

    let event = ctx.event(0);
    bounded(
        "publishing on the other connection",
        other_topic.publish(&event),
    )
    .await?;
    receive_exactly(
        &mut survivor,
        &ids([&event]),
        WAIT,
        "the other connection's subscription",
    )
    .await?;
    Ok(())
}

pub(super) async fn lifecycle_close_ends_a_subscription_whose_in_flight_slots_are_all_taken<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let qname = ctx.queue_name("q");
    let queue = bounded("opening the queue", conn.queue(&qname)).await?;
    bounded("sending", queue.send_batch(&[ctx.event(0), ctx.event(1)])).await?;
    let mut consumer = bounded(
        "consuming the queue",
        queue.receive(ctx.consumer().max_in_flight(1)),
    )
    .await?;
    // Hold the only in-flight slot: the stream now waits for it to be settled.
    let _held = next(&mut consumer, WAIT, "the first delivery").await?;
    bounded("closing", conn.close()).await?;
    expect_ended(
        &mut consumer,
        "a consumer holding its whole in-flight limit",
    )
    .await
}

pub(super) async fn lifecycle_closing_twice_is_ok<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    bounded("the first close", conn.close()).await?;
    bounded("the second close", conn.close()).await?;
    Ok(())
}

pub(super) async fn lifecycle_health_is_healthy_when_open_and_not_after_close<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let health = health_of(&conn).await?;
    ensure!(
        health == Health::Healthy,
        "a new connection reports {health:?}"
    );
    bounded("closing", conn.close()).await?;
    let health = health_of(&conn).await?;
    ensure!(
        !health.is_healthy(),
        "a closed connection reports {health:?}"
    );
    Ok(())
}

async fn health_of<T: Transport + 'static>(conn: &Conn<T>) -> Result<Health, Failure> {
    tokio::time::timeout(Duration::from_secs(30), conn.health())
        .await
        .map_err(|_| Failure("health did not answer within 30s".into()))
}

/// Polls health every 100 ms until `want` holds, for at most `within`.
async fn wait_for_health<T: Transport + 'static>(
    conn: &Conn<T>,
    want: impl Fn(&Health) -> bool,
    within: Duration,
    what: &str,
) -> CaseResult {
    let deadline = Instant::now() + within;
    loop {
        let health = health_of(conn).await?;
        if want(&health) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            fail!("{what}: health still {health:?} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) async fn lifecycle_health_reflects_a_broker_outage<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let control = ctx.control()?;
    let conn = ctx.connect_controlled().await?;
    wait_for_health(&conn, Health::is_healthy, WAIT, "before the outage").await?;
    bounded("interrupting the broker", control.interrupt()).await?;
    wait_for_health(
        &conn,
        |h| !h.is_healthy(),
        Duration::from_secs(30),
        "during the outage",
    )
    .await?;
    bounded("resuming the broker", control.resume()).await?;
    wait_for_health(
        &conn,
        Health::is_healthy,
        Duration::from_secs(60),
        "after the outage",
    )
    .await
}

/// Where the outage cases publish.
enum Destination {
    Topic(Arc<dyn Topic>),
    Queue(Arc<dyn Queue>),
}

impl Destination {
    async fn send(&self, event: &Event) -> evbus::Result<()> {
        match self {
            Destination::Topic(t) => t.publish(event).await,
            Destination::Queue(q) => q.send(event).await,
        }
    }
}

/// What the consumer task of an outage case reports.
enum Seen {
    Event(String),
    Error(evbus::Error),
    Ended,
}

/// A consumer and a publisher run while the broker goes away and comes back: every publish
/// that returned Ok is delivered, and the consumer resumes by itself.
async fn outage<T: Transport + 'static>(ctx: &Ctx<T>, on_topic: bool) -> CaseResult {
    const EVENTS: u64 = 150;
    const BEFORE_OUTAGE: usize = 30;
    const OUTAGE: Duration = Duration::from_secs(2);
    const PER_EVENT: Duration = Duration::from_secs(90);
    let control = ctx.control()?;
    let consumer = ctx.connect_controlled().await?;
    let publisher = ctx.connect_controlled().await?;

    // An acknowledgement lost in the outage means a redelivery after a short visibility
    // timeout: allowed (at-least-once).
    let options = ctx.short_consumer();
    let (mut sub, destination, dead_letters) = if on_topic {
        let name = ctx.topic_name("t");
        let sub_name = ctx.subscription_name(&name, "s");
        let topic = bounded("opening the topic", consumer.topic(&name)).await?;
        let dead_letters = dead_letter_queue_name(&name, Some(&sub_name), &options);
        let subscribe = SubscribeOptions::named(&sub_name).consumer(options);
        let sub = bounded("subscribing", topic.subscribe(subscribe)).await?;
        let topic = bounded("opening the topic", publisher.topic(&name)).await?;
        (sub, Destination::Topic(topic), dead_letters)
    } else {
        let name = ctx.queue_name("q");
        let queue = bounded("opening the queue", consumer.queue(&name)).await?;
        let dead_letters = dead_letter_queue_name(&name, None, &options);
        let sub = bounded("consuming", queue.receive(options)).await?;
        let queue = bounded("opening the queue", publisher.queue(&name)).await?;
        (sub, Destination::Queue(queue), dead_letters)
    };

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let _consumer = spawn(async move {
        loop {
            let seen = match sub.next_delivery().await {
                Some(Ok(d)) => {
                    let _ = d.ack().await;
                    Seen::Event(d.event().id().to_owned())
                }
                Some(Err(e)) => Seen::Error(e),
                None => Seen::Ended,
            };
            let ended = matches!(seen, Seen::Ended);
            if seen_tx.send(seen).is_err() || ended {
                return;
            }
        }
    });

    let events = ctx.events(EVENTS);
    let order: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let publishing = spawn(async move {
        let mut accepted = HashSet::new();
        // The publishes that returned a retryable error before they were accepted.
        let mut retried = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let give_up = Instant::now() + PER_EVENT;
            loop {
                match tokio::time::timeout_at(give_up, destination.send(event)).await {
                    Err(_) => fail!("a publish did not return within {PER_EVENT:?} of the outage"),
                    Ok(Ok(())) => break,
                    Ok(Err(e)) if e.is_retryable() => {
                        if retried.last() != Some(&i) {
                            retried.push(i);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(Err(e)) => fail!("a publish failed with a non-retryable error: {e}"),
                }
            }
            accepted.insert(event.id().to_owned());
            count_tx.send_replace(accepted.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((accepted, retried))
    });

    if tokio::time::timeout(WAIT, count_rx.wait_for(|n| *n >= BEFORE_OUTAGE))
        .await
        .is_err()
    {
        fail!("fewer than {BEFORE_OUTAGE} publishes succeeded before the outage");
    }
    bounded("interrupting the broker", control.interrupt()).await?;
    // The length of the outage, not an assertion.
    tokio::time::sleep(OUTAGE).await;
    match tokio::time::timeout(Duration::from_secs(120), control.resume()).await {
        Ok(result) => result.context("resuming the broker")?,
        Err(_) => fail!("resuming the broker did not finish within 120s"),
    }
    let resumed_after = *count_rx.borrow();
    let (accepted, retried): (HashSet<String>, Vec<usize>) =
        publishing.join(PER_EVENT * 2, "the publisher").await??;

    let within = Duration::from_secs(90);
    let deadline = Instant::now() + within;
    let mut received = HashSet::new();
    let mut errors = 0;
    while !accepted.is_subset(&received) {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Err(_) => {
                let lost: Vec<usize> = (0..order.len())
                    .filter(|&i| !received.contains(&order[i]))
                    .collect();
                let dead = dead_lettered(&consumer, &dead_letters).await;
                let dead: Vec<String> = lost
                    .iter()
                    .filter_map(|&i| dead.get(&order[i]).map(|why| format!("{i}: {why}")))
                    .collect();
                fail!(
                    "{} after the outage ended ({errors} stream errors); publishes by position \
                     (0-based, in order): lost {}; retried through the outage {}; {resumed_after} \
                     accepted when the broker was back; of the lost, dead-lettered: {}",
                    crate::support::never_arrived(&accepted, &received, within),
                    crate::support::ranges(&lost),
                    crate::support::ranges(&retried),
                    if dead.is_empty() {
                        "none".to_owned()
                    } else {
                        dead.join(", ")
                    },
                )
            }
            Ok(None) | Ok(Some(Seen::Ended)) => {
                fail!("the consumer's stream ended instead of resuming after the outage")
            }
            Ok(Some(Seen::Error(e))) if e.is_retryable() => errors += 1,
            Ok(Some(Seen::Error(e))) => {
                fail!("the consumer's stream failed with a non-retryable error: {e}")
            }
            Ok(Some(Seen::Event(id))) => {
                received.insert(id);
            }
        }
    }
    Ok(())
}

/// What the dead-letter queue `name` holds (event id → reason), read for a failure's
/// message: whatever cannot be read in a few seconds is left out.
async fn dead_lettered<T: Transport>(conn: &Conn<T>, name: &str) -> HashMap<String, String> {
    let mut found = HashMap::new();
    let Ok(Ok(queue)) = tokio::time::timeout(WAIT, conn.queue(name)).await else {
        return found;
    };
    let Ok(Ok(mut sub)) = tokio::time::timeout(WAIT, queue.receive(Default::default())).await
    else {
        return found;
    };
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_secs(2), sub.next_delivery()).await
    {
        let reason = d.event().extension(DEAD_LETTER_REASON).unwrap_or("?");
        found.insert(d.event().id().to_owned(), reason.to_owned());
        let _ = d.ack().await;
    }
    found
}

pub(super) async fn lifecycle_topic_outage_loses_no_accepted_publish_and_consumers_resume<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    outage(&ctx, true).await
}

pub(super) async fn lifecycle_queue_outage_loses_no_accepted_send_and_consumers_resume<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    outage(&ctx, false).await
}

/// Deletes `name` with `delete`, then again, then `never` (a name never opened): each must
/// return `Ok`. `what` is `queue` or `topic`.
async fn delete_thrice<F, Fut>(what: &str, name: &str, never: &str, delete: F) -> CaseResult
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = evbus::Result<()>>,
{
    for (step, target) in [
        (format!("the {what}"), name),
        (format!("the {what} a second time"), name),
        (format!("a {what} that never existed"), never),
    ] {
        bounded(format!("deleting {step}"), delete(target.to_owned())).await?;
    }
    Ok(())
}

pub(super) async fn lifecycle_deleting_a_queue_discards_its_events_and_may_be_repeated<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let queue = bounded("opening the queue", conn.queue(&name)).await?;
    // Some waiting, one in flight: the deletion takes both.
    for event in ctx.events(5) {
        bounded("sending", queue.send(&event)).await?;
    }
    {
        let mut c = bounded("consuming", queue.receive(ctx.short_consumer())).await?;
        next(&mut c, WAIT, "the consumer before the deletion").await?;
    }
    delete_thrice("queue", &name, &ctx.queue_name("never"), |n| {
        let conn = conn.clone();
        async move { conn.delete_queue(&n).await }
    })
    .await?;
    // The name is usable again, and starts empty: the sentinel is the first delivery, even
    // after the visibility timeout of the delivery that was in flight.
    let queue = bounded("opening the queue again", conn.queue(&name)).await?;
    let mut c = bounded(
        "consuming the queue again",
        queue.receive(ctx.short_consumer()),
    )
    .await?;
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "a consumer of the queue made again",
    )
    .await
}

pub(super) async fn lifecycle_deleting_a_topic_discards_its_subscriptions_and_may_be_repeated<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let sub = ctx.subscription_name(&name, "s");
    let topic = bounded("opening the topic", conn.topic(&name)).await?;
    // A durable subscription with events waiting for it, one of them in flight.
    {
        let mut s = bounded(
            "subscribing",
            topic.subscribe(ctx.named(&sub).consumer(ctx.short_consumer())),
        )
        .await?;
        for event in ctx.events(5) {
            bounded("publishing", topic.publish(&event)).await?;
        }
        next(&mut s, WAIT, "the subscription before the deletion").await?;
    }
    delete_thrice("topic", &name, &ctx.topic_name("never"), |n| {
        let conn = conn.clone();
        async move { conn.delete_topic(&n).await }
    })
    .await?;
    // The same subscription name on the topic made again starts afresh: none of the events
    // that waited for the old one, nor the one it had in flight, comes before the sentinel.
    let topic = bounded("opening the topic again", conn.topic(&name)).await?;
    let mut s = bounded(
        "subscribing again",
        topic.subscribe(
            ctx.named(&sub)
                .consumer(ctx.short_consumer())
                .start(StartPosition::Latest),
        ),
    )
    .await?;
    topic_sentinel(
        &ctx,
        &*topic,
        &mut s,
        SHORT_VISIBILITY + QUIET,
        "the subscription made again",
    )
    .await
}
