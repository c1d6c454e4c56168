//! Queue (point-to-point) behaviours.

use super::prelude::*;
use super::samples;
use crate::support::{Conn, check_dead_lettered, compete, nack_until_dead_lettered};
use evbus::EventBuilder;

/// Opens `name` on `conn`.
async fn open<T: Transport + 'static>(
    conn: &Conn<T>,
    name: &str,
) -> Result<Arc<dyn Queue>, Failure> {
    bounded(format!("opening queue `{name}`"), conn.queue(name)).await
}

/// Attaches a consumer to `queue`.
async fn receive(queue: &dyn Queue, options: ConsumerOptions) -> Result<Subscription, Failure> {
    bounded(
        format!("consuming queue `{}`", queue.name()),
        queue.receive(options),
    )
    .await
}

/// Sends `events` one by one, in order.
async fn send_all(queue: &dyn Queue, events: &[Event]) -> CaseResult {
    for event in events {
        bounded(format!("sending event {}", event.id()), queue.send(event)).await?;
    }
    Ok(())
}

/// Expects a settlement call on an already settled delivery to fail with `AlreadySettled`.
async fn expect_already_settled<V>(
    what: &str,
    op: impl Future<Output = evbus::Result<V>>,
) -> CaseResult {
    match tokio::time::timeout(Duration::from_secs(30), op).await {
        Err(_) => fail!("{what}: did not return"),
        Ok(Ok(_)) => fail!("{what}: succeeded on a delivery that was already settled"),
        Ok(Err(e)) => {
            ensure!(
                e.kind() == ErrorKind::AlreadySettled,
                "{what}: failed with `{e}` (kind {:?}), expected kind AlreadySettled",
                e.kind()
            );
            Ok(())
        }
    }
}

pub(super) async fn queue_send_receive_ack_delivers_each_event_once<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    // Sent before any consumer exists: the queue keeps them.
    let events = ctx.events(20);
    send_all(&*queue, &events).await?;
    let mut c = receive(&*queue, ctx.short_consumer()).await?;
    let got = receive_exactly(&mut c, &ids(&events), WAIT, "the consumer").await?;
    for (event, attempt) in &got {
        ensure!(
            *attempt == 1,
            "first delivery of event {} says attempt {attempt}",
            event.id()
        );
    }
    // Acked events do not come back, not even after the visibility timeout.
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "the consumer",
    )
    .await
}

pub(super) async fn queue_competing_consumers_handle_each_event_exactly_once<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.queue_name("q");
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let conn = ctx.connect().await?;
        let queue = open(&conn, &name).await?;
        consumers.push(receive(&*queue, ctx.consumer().max_in_flight(1)).await?);
    }
    let sender = ctx.connect().await?;
    let events: Vec<Event> = (0..60)
        .map(|i| ctx.keyed_event(&format!("k{}", i % 12), i))
        .collect();
    send_all(&*open(&sender, &name).await?, &events).await?;
    compete(consumers, &ids(&events), "3 competing consumers").await?;
    Ok(())
}

pub(super) async fn queue_envelope_round_trips_byte_exact<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let sender = ctx.connect().await?;
    let receiver = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let events = samples::all(&ctx);
    send_all(&*open(&sender, &name).await?, &events).await?;
    let mut c = receive(&*open(&receiver, &name).await?, ctx.consumer()).await?;
    let got = receive_exactly(&mut c, &ids(&events), WAIT, "the consumer").await?;
    let got = by_id(&got);
    for event in &events {
        same_event(event, got[event.id()])?;
    }
    Ok(())
}

pub(super) async fn queue_send_batch_delivers_every_event<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let events = ctx.events(50);
    bounded("sending a batch", queue.send_batch(&events)).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    receive_exactly(&mut c, &ids(&events), WAIT, "the consumer").await?;
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_send_batch_keeps_batch_order_for_one_consumer<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    const N: u64 = 30;
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    // One partition key across the batch, one consumer that settles each delivery before it
    // may get the next: the only order left to observe is the one the batch was stored in.
    let events: Vec<Event> = (0..N).map(|i| ctx.keyed_event("batch", i)).collect();
    bounded("sending a batch", queue.send_batch(&events)).await?;
    let mut c = receive(&*queue, ctx.consumer().max_in_flight(1)).await?;
    let got = receive_exactly(&mut c, &ids(&events), WAIT, "the consumer").await?;
    let order: Vec<u64> = got.iter().map(|(e, _)| seq(e)).collect::<Result<_, _>>()?;
    if let Some(at) = order.iter().zip(0..N).position(|(got, want)| *got != want) {
        fail!(
            "a batch of {N} events with one partition key, sent with `send_batch`, reached a \
             single consumer (max_in_flight 1) out of order: position {at} held event {} \
             instead of {at}; the order was {order:?}",
            order[at]
        );
    }
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_nack_redelivers_with_the_attempt_count_increased<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let event = ctx.event(0);
    bounded("sending", queue.send(&event)).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    for attempt in 1..=3 {
        let d = next(&mut c, WAIT, &format!("delivery {attempt}")).await?;
        ensure!(
            d.event().id() == event.id() && d.attempt() == attempt,
            "expected event {} attempt {attempt}, got event {} attempt {}",
            event.id(),
            d.event().id(),
            d.attempt()
        );
        if attempt < 3 {
            let settled = bounded("nacking", d.nack(None)).await?;
            ensure!(
                settled == Settlement::Nacked,
                "nack returned {settled:?}, expected Nacked"
            );
        } else {
            bounded("acking", d.ack()).await?;
        }
    }
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_nack_with_delay_redelivers_no_sooner_than_the_delay<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const DELAY: Duration = Duration::from_millis(500);
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let event = ctx.event(0);
    bounded("sending", queue.send(&event)).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    let d = next(&mut c, WAIT, "the first delivery").await?;
    let nacked_at = Instant::now();
    let settled = bounded("nacking with a delay", d.nack(Some(DELAY))).await?;
    ensure!(
        settled == Settlement::Nacked,
        "nack returned {settled:?}, expected Nacked"
    );

    let again = next(&mut c, WAIT, "the delayed redelivery").await?;
    let after = nacked_at.elapsed();
    ensure!(
        again.event().id() == event.id() && again.attempt() == 2,
        "expected event {} attempt 2, got event {} attempt {}",
        event.id(),
        again.event().id(),
        again.attempt()
    );
    ensure!(
        after >= DELAY,
        "the event was redelivered {after:?} after a nack with a {DELAY:?} delay"
    );
    bounded("acking", again.ack()).await?;
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_nack_with_a_delay_longer_than_the_visibility_timeout_waits_the_delay<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    // Two and a half timeouts: a transport that emulates delays by holding the event must
    // keep it from timing out meanwhile.
    let delay = SHORT_VISIBILITY * 5 / 2;
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let event = ctx.event(0);
    bounded("sending", queue.send(&event)).await?;
    let mut c = receive(&*queue, ctx.short_consumer()).await?;
    let d = next(&mut c, WAIT, "the first delivery").await?;
    let nacked_at = Instant::now();
    bounded("nacking with a delay", d.nack(Some(delay))).await?;

    let again = next(&mut c, WAIT, "the delayed redelivery").await?;
    let after = nacked_at.elapsed();
    ensure!(
        again.event().id() == event.id() && again.attempt() == 2,
        "expected event {} attempt 2, got event {} attempt {}",
        event.id(),
        again.event().id(),
        again.attempt()
    );
    ensure!(
        after >= delay,
        "the event was redelivered {after:?} after a nack with a {delay:?} delay (visibility \
         timeout {SHORT_VISIBILITY:?})"
    );
    bounded("acking", again.ack()).await?;
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "the consumer",
    )
    .await
}

pub(super) async fn queue_nack_with_delay_does_not_hold_back_later_events<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const DELAY: Duration = Duration::from_millis(1000);
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let delayed = ctx.event(0);
    bounded("sending", queue.send(&delayed)).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    let d = next(&mut c, WAIT, "the first delivery").await?;
    let nacked_at = Instant::now();
    bounded("nacking with a delay", d.nack(Some(DELAY))).await?;

    let later = ctx.event(1);
    bounded("sending a later event", queue.send(&later)).await?;
    let d = next(&mut c, WAIT, "the later event").await?;
    let waited = nacked_at.elapsed();
    ensure!(
        d.event().id() == later.id(),
        "the delayed event came back (attempt {}) before the later event",
        d.attempt()
    );
    ensure!(
        waited < DELAY,
        "the later event arrived only {waited:?} after the nack, not before the {DELAY:?} delay \
         ran out: the delayed event held it back"
    );
    bounded("acking the later event", d.ack()).await?;

    let again = next(&mut c, WAIT, "the delayed redelivery").await?;
    ensure!(
        again.event().id() == delayed.id() && again.attempt() == 2,
        "expected the delayed event attempt 2, got event {} attempt {}",
        again.event().id(),
        again.attempt()
    );
    ensure!(
        nacked_at.elapsed() >= DELAY,
        "the delayed event came back {:?} after the nack, sooner than its {DELAY:?} delay",
        nacked_at.elapsed()
    );
    bounded("acking", again.ack()).await?;
    Ok(())
}

pub(super) async fn queue_unacked_events_of_a_vanished_consumer_are_redelivered_to_another<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.queue_name("q");
    let sender = ctx.connect().await?;
    let queue = open(&sender, &name).await?;
    let events = ctx.events(3);
    send_all(&*queue, &events).await?;

    // Consumer A takes every event and holds them unsettled...
    let a = ctx.connect().await?;
    let mut ca = receive(&*open(&a, &name).await?, ctx.short_consumer()).await?;
    let mut held = Vec::new();
    for _ in 0..events.len() {
        held.push(next(&mut ca, WAIT, "consumer A").await?);
    }
    // ...consumer B is live...
    let b = ctx.connect().await?;
    let mut cb = receive(&*open(&b, &name).await?, ctx.short_consumer()).await?;
    // ...and A vanishes: its subscription and its connection go away.
    drop(held);
    drop(ca);
    bounded("closing consumer A's connection", a.close()).await?;

    let got = receive_exactly(&mut cb, &ids(&events), WAIT, "consumer B").await?;
    for (event, attempt) in &got {
        ensure!(
            *attempt == 2,
            "event {} came back to consumer B with attempt {attempt}, expected 2",
            event.id()
        );
    }
    queue_sentinel(&ctx, &*queue, &mut cb, QUIET, "consumer B").await
}

/// Two competing consumers of a new queue with a short timeout, both consuming before one
/// event is sent: on a partitioned broker a consumer that joins later takes partitions over,
/// and with them the deliveries held there (a reassignment, which no renewal survives). A
/// case reads both throughout, so a redelivery is seen wherever the broker sends it.
struct Competing<T: Transport + 'static> {
    queue: Arc<dyn Queue>,
    ca: Subscription,
    cb: Subscription,
    event: Event,
    _connections: (Conn<T>, Conn<T>),
}

impl<T: Transport + 'static> Competing<T> {
    async fn start(ctx: &Ctx<T>) -> Result<Self, Failure> {
        let name = ctx.queue_name("q");
        let conn = ctx.connect().await?;
        let queue = open(&conn, &name).await?;
        let a = ctx.connect().await?;
        let ca = receive(&*open(&a, &name).await?, ctx.short_consumer()).await?;
        let cb = receive(&*open(&conn, &name).await?, ctx.short_consumer()).await?;
        let event = ctx.event(0);
        bounded("sending", queue.send(&event)).await?;
        Ok(Competing {
            queue,
            ca,
            cb,
            event,
            _connections: (conn, a),
        })
    }
}

/// The next delivery of either subscription, and whether it came from `a`.
async fn next_of_either(
    a: &mut Subscription,
    b: &mut Subscription,
    within: Duration,
    what: &str,
) -> Result<(evbus::Delivery, bool), Failure> {
    let got = tokio::time::timeout(within, async {
        tokio::select! {
            got = a.next_delivery() => (got, true),
            got = b.next_delivery() => (got, false),
        }
    })
    .await;
    match got {
        Err(_) => fail!("{what}: nothing was delivered within {within:?}"),
        Ok((None, _)) => fail!("{what}: a subscription ended unexpectedly"),
        Ok((Some(Err(e)), _)) => fail!("{what}: a subscription yielded an error: {e}"),
        Ok((Some(Ok(d)), from_a)) => Ok((d, from_a)),
    }
}

/// What a subscription yielded, for a failure message.
fn yielded(got: Option<evbus::Result<evbus::Delivery>>) -> String {
    got.map_or("the end of its subscription".to_owned(), |d| match d {
        Ok(d) => format!("event {} attempt {}", d.event().id(), d.attempt()),
        Err(e) => format!("an error: {e}"),
    })
}

pub(super) async fn queue_renewed_delivery_stays_with_its_consumer_past_the_visibility_timeout<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let Competing {
        queue,
        mut ca,
        mut cb,
        event,
        _connections,
    } = Competing::start(&ctx).await?;
    let (held, from_a) = next_of_either(&mut ca, &mut cb, WAIT, "either consumer").await?;
    ensure!(
        held.event().id() == event.id(),
        "a consumer got event {}, expected {}",
        held.event().id(),
        event.id()
    );
    let (holder, other) = if from_a {
        (&mut ca, &mut cb)
    } else {
        (&mut cb, &mut ca)
    };

    // The holder renews it every third of the timeout for over two and a half timeouts: it
    // must not come back, to either consumer.
    let renew_every = SHORT_VISIBILITY / 3;
    let held_at = Instant::now();
    while held_at.elapsed() < SHORT_VISIBILITY * 5 / 2 {
        bounded("renewing the held delivery", held.renew()).await?;
        tokio::select! {
            got = other.next_delivery() => fail!(
                "the other consumer got {} while the holder renewed the delivery it held \
                 (after {:?}, visibility timeout {SHORT_VISIBILITY:?})",
                yielded(got),
                held_at.elapsed()
            ),
            got = holder.next_delivery() => fail!(
                "the holder got another delivery ({}) while it renewed the one it held",
                yielded(got)
            ),
            () = tokio::time::sleep(renew_every) => {}
        }
    }
    // Still the holder's: its ack lands, and the event never comes back.
    bounded(
        "acking the renewed delivery after 2.5 visibility timeouts",
        held.ack(),
    )
    .await?;
    expect_already_settled("renewing a settled delivery", held.renew()).await?;
    let (mut remaining, what) = if from_a {
        drop(ca);
        (cb, "consumer B")
    } else {
        drop(cb);
        (ca, "consumer A")
    };
    queue_sentinel(
        &ctx,
        &*queue,
        &mut remaining,
        SHORT_VISIBILITY + QUIET,
        what,
    )
    .await
}

/// Events a consumer fetched ahead, into its in-flight room, wait for it without timing out
/// while it is in use: the transport keeps their visibility timeouts running only once they
/// are handed out. A consumer with room for 4 takes 8 events of one key one at a time,
/// holding each for two fifths of the visibility timeout before it acks it: the last events
/// wait in its buffer for over a timeout. Each must come once, on its first attempt, in send
/// order, with its lease alive (a renewal holds it). A transport that let them time out there delivered them again (counted: a second
/// attempt; Redis, NATS) or gave them back and took them again behind later ones (out of
/// order: SQL), which an ordered handler with a prefetch then ran twice or out of order.
pub(super) async fn queue_events_fetched_ahead_wait_for_a_consumer_in_use_past_the_visibility_timeout<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const N: u64 = 8;
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let events: Vec<Event> = (0..N).map(|i| ctx.keyed_event("ahead", i)).collect();
    bounded("sending a batch", queue.send_batch(&events)).await?;
    let mut c = receive(&*queue, ctx.short_consumer().max_in_flight(4)).await?;
    let hold = SHORT_VISIBILITY * 2 / 5;
    let started = Instant::now();
    for (at, event) in events.iter().enumerate() {
        let d = next(&mut c, WAIT, &format!("delivery {at}")).await?;
        ensure!(
            d.event().id() == event.id() && d.attempt() == 1,
            "delivery {at} (after {:?}, each held {hold:?}, visibility timeout \
             {SHORT_VISIBILITY:?}, in-flight room 4) was event {} on attempt {}, expected \
             event {} (seq {at}) on attempt 1: an event fetched ahead timed out while it \
             waited for the consumer",
            started.elapsed(),
            d.event().id(),
            d.attempt(),
            event.id()
        );
        // Handed out with its lease alive: a renewal holds it (NATS, which redelivers into a
        // waiting pull request only, handed out the stale copy on attempt 1, and its lease
        // had run out).
        bounded(
            format!(
                "renewing delivery {at} (after {:?}, visibility timeout {SHORT_VISIBILITY:?}; \
                 it timed out while it waited for the consumer)",
                started.elapsed()
            ),
            d.renew(),
        )
        .await?;
        // The consumer at work.
        tokio::time::sleep(hold).await;
        bounded("acking", d.ack()).await?;
    }
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "the consumer",
    )
    .await
}

pub(super) async fn queue_renewing_after_the_visibility_timeout_fails_and_takes_nothing_back<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    // The redelivery may reach either consumer (a prefetch or an open pull of the first
    // holder's, on some brokers): both are read.
    let Competing {
        queue,
        mut ca,
        mut cb,
        event,
        _connections,
    } = Competing::start(&ctx).await?;

    // One takes the event and lets its timeout run out; it is handed out again, to either.
    let (stale, _) = next_of_either(&mut ca, &mut cb, WAIT, "either consumer").await?;
    let (again, _) = next_of_either(&mut ca, &mut cb, WAIT, "the redelivery").await?;
    ensure!(
        again.event().id() == event.id() && again.attempt() == 2,
        "the redelivery was event {} attempt {}, expected event {} attempt 2",
        again.event().id(),
        again.attempt(),
        event.id()
    );

    // The first holder's renewal comes too late: refused, and the new holder keeps it.
    match tokio::time::timeout(Duration::from_secs(30), stale.renew()).await {
        Err(_) => fail!("renewing a delivery past its visibility timeout did not return"),
        Ok(Ok(())) => fail!(
            "renewing a delivery past its visibility timeout (the event was handed out again) \
             succeeded, expected an Expired error"
        ),
        Ok(Err(e)) => ensure!(
            e.kind() == ErrorKind::Expired,
            "renewing a delivery past its visibility timeout failed with `{e}` (kind {:?}), \
             expected kind Expired",
            e.kind()
        ),
    }
    bounded("acking the redelivery", again.ack()).await?;
    drop(stale);
    drop(ca);
    queue_sentinel(
        &ctx,
        &*queue,
        &mut cb,
        SHORT_VISIBILITY + QUIET,
        "consumer B",
    )
    .await
}

/// A visibility timeout under a millisecond (zero: every delivery due back at once, so on
/// some brokers nothing was ever handed out) is refused as a configuration error, and
/// `Duration::MAX` ("never") is taken as the longest a transport keeps, 100 years: the
/// consumer delivers and settles as any other (it overflowed deadlines and delivered nothing
/// on some brokers, and was refused on others).
pub(super) async fn queue_visibility_timeouts_out_of_range_are_refused_and_duration_max_is_never<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    for (timeout, what) in [
        (Duration::ZERO, "zero"),
        (Duration::from_micros(999), "999 µs"),
        (Duration::MAX, "Duration::MAX set on the field"),
    ] {
        let mut options = ctx.consumer();
        options.visibility_timeout = timeout;
        match queue.receive(options).await {
            Ok(_) => fail!("a consumer with a visibility timeout of {what} was opened"),
            Err(e) => ensure!(
                e.kind() == ErrorKind::InvalidConfig,
                "a visibility timeout of {what} failed with `{e}` (kind {:?}), expected kind \
                 InvalidConfig",
                e.kind()
            ),
        }
    }
    let never = ctx.consumer().visibility_timeout(Duration::MAX);
    ensure!(
        never.visibility_timeout == evbus::raw::LONGEST_VISIBILITY,
        "visibility_timeout(Duration::MAX) set {:?}, expected 100 years",
        never.visibility_timeout
    );
    let mut c = receive(&*queue, never).await?;
    let events = ctx.events(2);
    send_all(&*queue, &events).await?;
    let got = receive_exactly(&mut c, &ids(&events), WAIT, "the consumer").await?;
    ensure!(
        got.iter().all(|(_, attempt)| *attempt == 1),
        "a first delivery said attempt {:?}",
        got.iter().map(|(_, a)| a).collect::<Vec<_>>()
    );
    Ok(())
}

pub(super) async fn queue_max_attempts_dead_letters_with_reason_and_attempt_count<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let queue = open(&conn, &name).await?;
    let options = ctx.consumer().max_attempts(3);
    let poison = ctx.event(0);
    let others: Vec<Event> = (1..4).map(|i| ctx.event(i)).collect();
    bounded("sending the poison event", queue.send(&poison)).await?;
    send_all(&*queue, &others).await?;
    let mut c = receive(&*queue, options.clone()).await?;
    nack_until_dead_lettered(&mut c, &poison, &ids(&others), 3, "the consumer").await?;

    let dlq_name = dead_letter_queue_name(&name, None, &options);
    let mut dead = receive(&*open(&conn, &dlq_name).await?, ctx.consumer()).await?;
    let d = next(
        &mut dead,
        WAIT,
        &format!("the dead-letter queue `{dlq_name}`"),
    )
    .await?;
    check_dead_lettered(d.event(), &poison, None, 3, &name)?;
    ensure!(
        !d.event()
            .extension(DEAD_LETTER_REASON)
            .unwrap_or_default()
            .is_empty(),
        "the dead letter has no reason"
    );
    bounded("acking the dead letter", d.ack()).await?;

    // Later events still flow.
    let later = ctx.events(3);
    send_all(&*queue, &later).await?;
    receive_exactly(
        &mut c,
        &ids(&later),
        WAIT,
        "the consumer after dead-lettering",
    )
    .await?;
    Ok(())
}

pub(super) async fn queue_event_whose_consumer_vanished_on_the_last_attempt_is_dead_lettered<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.queue_name("q");
    let options = ctx.short_consumer().max_attempts(1);
    let sender = ctx.connect().await?;
    let queue = open(&sender, &name).await?;
    let poison = ctx.event(0);
    bounded("sending", queue.send(&poison)).await?;

    // A takes its only allowed delivery and vanishes.
    let a = ctx.connect().await?;
    let mut ca = receive(&*open(&a, &name).await?, options.clone()).await?;
    let d = next(&mut ca, WAIT, "consumer A").await?;
    ensure!(
        d.attempt() == 1,
        "first delivery says attempt {}",
        d.attempt()
    );
    drop(d);
    drop(ca);
    bounded("closing consumer A's connection", a.close()).await?;

    // B consumes on; the expired delivery must reach the dead-letter queue, not B.
    let b = ctx.connect().await?;
    let mut cb = receive(&*open(&b, &name).await?, options.clone()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _consumer = spawn(async move {
        while let Some(item) = cb.next_delivery().await {
            let item = match item {
                Ok(d) => {
                    let _ = d.ack().await;
                    Ok((d.event().id().to_owned(), d.attempt()))
                }
                Err(e) => Err(e.to_string()),
            };
            if tx.send(item).is_err() {
                break;
            }
        }
    });

    let dlq_name = dead_letter_queue_name(&name, None, &options);
    let mut dead = receive(&*open(&sender, &dlq_name).await?, ctx.consumer()).await?;
    let d = next(
        &mut dead,
        WAIT,
        &format!("the dead-letter queue `{dlq_name}`"),
    )
    .await?;
    check_dead_lettered(d.event(), &poison, None, 2, &name)?;
    bounded("acking the dead letter", d.ack()).await?;

    // B never saw it, and keeps flowing.
    let sentinel = ctx.sentinel();
    bounded("sending the sentinel", queue.send(&sentinel)).await?;
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => fail!("consumer B did not receive the sentinel within {WAIT:?}"),
            Ok(None) => fail!("consumer B stopped"),
            Ok(Some(Err(e))) => fail!("consumer B's subscription yielded an error: {e}"),
            Ok(Some(Ok((id, attempt)))) => {
                ensure!(
                    id != poison.id(),
                    "consumer B received the event (attempt {attempt}) although its last \
                     allowed attempt was used"
                );
                if id == sentinel.id() {
                    return Ok(());
                }
            }
        }
    }
}

pub(super) async fn queue_explicit_dead_letter_moves_the_event_with_its_reason<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const REASON: &str = "rejected by the consumer: total must be ≥ 0 ✗";
    let conn = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let queue = open(&conn, &name).await?;
    let options = ctx.short_consumer();
    let event = ctx.event(0);
    bounded("sending", queue.send(&event)).await?;
    let mut c = receive(&*queue, options.clone()).await?;
    let d = next(&mut c, WAIT, "the consumer").await?;
    bounded("dead-lettering", d.dead_letter(REASON)).await?;
    ensure!(
        d.is_settled(),
        "the delivery is not settled after dead_letter"
    );

    let dlq_name = dead_letter_queue_name(&name, None, &options);
    let mut dead = receive(&*open(&conn, &dlq_name).await?, ctx.consumer()).await?;
    let got = next(
        &mut dead,
        WAIT,
        &format!("the dead-letter queue `{dlq_name}`"),
    )
    .await?;
    check_dead_lettered(got.event(), &event, Some(REASON), 1, &name)?;
    bounded("acking the dead letter", got.ack()).await?;
    // The original was acked: it does not come back, even after the visibility timeout.
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "the consumer",
    )
    .await
}

/// What a redrive does: an event dead-lettered once, sent to its queue again under the same
/// id, and dead-lettered again. Both sends and both dead letters are new messages; a broker
/// that drops repeated ids must not drop these (the event would be in no queue at all).
pub(super) async fn queue_an_event_sent_and_dead_lettered_again_is_kept_again<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let queue = open(&conn, &name).await?;
    let options = ctx.short_consumer();
    let dlq_name = dead_letter_queue_name(&name, None, &options);
    let mut dead = receive(&*open(&conn, &dlq_name).await?, ctx.consumer()).await?;
    let mut c = receive(&*queue, options.clone()).await?;
    let event = ctx.event(0);
    for round in 1..=2 {
        let reason = format!("rejected, round {round}");
        bounded(&format!("sending, round {round}"), queue.send(&event)).await?;
        let d = next(
            &mut c,
            WAIT,
            &format!("the consumer, round {round} (the event sent again under its id)"),
        )
        .await?;
        bounded("dead-lettering", d.dead_letter(&reason)).await?;
        let got = next(
            &mut dead,
            WAIT,
            &format!("the dead-letter queue `{dlq_name}`, round {round}"),
        )
        .await?;
        check_dead_lettered(got.event(), &event, Some(&reason), 1, &name)?;
        bounded("acking the dead letter", got.ack()).await?;
    }
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_undecodable_message_is_dead_lettered_and_does_not_block<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    use evbus::raw::UNDECODABLE_EVENT_TYPE;
    let conn = ctx.connect().await?;
    let name = ctx.queue_name("q");
    let queue = open(&conn, &name).await?;
    // One slot: a consumer that stalls behind the foreign message shows at once.
    let options = ctx.short_consumer().max_in_flight(1);
    let mut c = receive(&*queue, options.clone()).await?;
    let producer = ctx.raw_producer()?;
    bounded(
        "writing a foreign message with the broker's own client",
        producer.send_undecodable(&name),
    )
    .await?;
    let good = ctx.event(1);
    bounded("sending an event after it", queue.send(&good)).await?;
    let d = next(
        &mut c,
        WAIT,
        "the consumer (the event sent after the foreign message)",
    )
    .await?;
    ensure!(
        d.event().id() == good.id(),
        "the consumer was handed {} of type `{}` instead of the event sent after the foreign \
         message: messages that are not CloudEvents must never reach the consumer",
        d.event().id(),
        d.event().ty()
    );
    bounded("acking", d.ack()).await?;

    let dlq_name = dead_letter_queue_name(&name, None, &options);
    let mut dead = receive(&*open(&conn, &dlq_name).await?, ctx.consumer()).await?;
    // The consumer keeps being polled while the record is awaited: core moves the foreign
    // message aside as the consumer's stream is read, and on a partitioned queue the message
    // may come after the event sent behind it. Nothing more may reach the consumer.
    let got = {
        use futures::StreamExt as _;
        tokio::select! {
            record = dead.next() => match record {
                Some(Ok(record)) => record,
                Some(Err(e)) => fail!("the dead-letter queue `{dlq_name}` failed: {e}"),
                None => fail!("the dead-letter queue `{dlq_name}` ended"),
            },
            extra = c.next() => match extra {
                Some(Ok(d)) => fail!(
                    "the consumer was handed {} of type `{}` after the event sent behind \
                     the foreign message: messages that are not CloudEvents must never \
                     reach the consumer",
                    d.event().id(),
                    d.event().ty()
                ),
                Some(Err(e)) => fail!("the consumer's stream failed: {e}"),
                None => fail!("the consumer's stream ended"),
            },
            () = tokio::time::sleep(WAIT) => fail!(
                "the dead-letter queue `{dlq_name}` (the foreign message's record): nothing \
                 was delivered within {WAIT:?} while the consumer kept reading"
            ),
        }
    };
    let record = got.event();
    ensure!(
        record.ty() == UNDECODABLE_EVENT_TYPE,
        "the dead-letter record has type `{}`, expected `{UNDECODABLE_EVENT_TYPE}`",
        record.ty()
    );
    let reason = record.extension(DEAD_LETTER_REASON).unwrap_or_default();
    ensure!(
        reason.contains("undecodable"),
        "the dead-letter record's reason {reason:?} does not say the message was undecodable"
    );
    ensure!(
        record.extension(evbus::raw::DEAD_LETTER_ATTEMPTS) == Some("1"),
        "the dead-letter record's attempts are {:?}, expected \"1\"",
        record.extension(evbus::raw::DEAD_LETTER_ATTEMPTS)
    );
    ensure!(
        record.extension(evbus::raw::DEAD_LETTER_ORIGIN) == Some(name.as_str()),
        "the dead-letter record's origin is {:?}, expected {name:?}",
        record.extension(evbus::raw::DEAD_LETTER_ORIGIN)
    );
    bounded("acking the dead letter", got.ack()).await?;
    // Moved aside and acknowledged: it does not come back after the visibility timeout.
    queue_sentinel(
        &ctx,
        &*queue,
        &mut c,
        SHORT_VISIBILITY + QUIET,
        "the consumer",
    )
    .await
}

pub(super) async fn queue_acking_twice_is_an_already_settled_error<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    bounded("sending", queue.send(&ctx.event(0))).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    let d = next(&mut c, WAIT, "the consumer").await?;
    bounded("the first ack", d.ack()).await?;
    expect_already_settled("a second ack", d.ack()).await?;
    expect_already_settled("a nack after ack", d.nack(None)).await?;
    expect_already_settled("a dead_letter after ack", d.dead_letter("too late")).await?;
    ensure!(d.is_settled(), "the delivery does not say it is settled");
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_acking_after_nack_is_an_already_settled_error<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let event = ctx.event(0);
    bounded("sending", queue.send(&event)).await?;
    let mut c = receive(&*queue, ctx.consumer()).await?;
    let d = next(&mut c, WAIT, "the consumer").await?;
    let settled = bounded("nacking", d.nack(None)).await?;
    ensure!(
        settled == Settlement::Nacked,
        "nack returned {settled:?}, expected Nacked"
    );
    expect_already_settled("an ack after nack", d.ack()).await?;
    expect_already_settled("a second nack", d.nack(None)).await?;

    // The redelivery is a new delivery with its own, unsettled handle.
    let again = next(&mut c, WAIT, "the redelivery").await?;
    ensure!(
        again.event().id() == event.id() && again.attempt() == 2,
        "expected event {} attempt 2, got event {} attempt {}",
        event.id(),
        again.event().id(),
        again.attempt()
    );
    bounded("acking the redelivery", again.ack()).await?;
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the consumer").await
}

pub(super) async fn queue_in_flight_limit_holds_back_deliveries_until_one_is_settled<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let events = ctx.events(5);
    send_all(&*queue, &events).await?;
    let mut c = receive(&*queue, ctx.consumer().max_in_flight(3)).await?;
    let mut held = Vec::new();
    for i in 1..=3 {
        held.push(
            next(
                &mut c,
                WAIT,
                &format!("delivery {i} of 3 allowed in flight"),
            )
            .await?,
        );
    }
    // Two more are ready, but three are unsettled: nothing more comes.
    match tokio::time::timeout(QUIET * 2, c.next_delivery()).await {
        Err(_) => {}
        Ok(Some(Ok(d))) => fail!(
            "a 4th delivery (event {}) arrived while 3 were unsettled with max_in_flight 3",
            d.event().id()
        ),
        Ok(Some(Err(e))) => fail!("the subscription yielded an error: {e}"),
        Ok(None) => fail!("the subscription ended"),
    }
    // Settling one releases exactly one more.
    let first = held.remove(0);
    bounded("acking one", first.ack()).await?;
    let fourth = next(&mut c, WAIT, "the 4th delivery, after one was settled").await?;
    held.push(fourth);
    match tokio::time::timeout(QUIET, c.next_delivery()).await {
        Err(_) => {}
        Ok(Some(Ok(d))) => fail!(
            "a 5th delivery (event {}) arrived while 3 were unsettled with max_in_flight 3",
            d.event().id()
        ),
        Ok(Some(Err(e))) => fail!("the subscription yielded an error: {e}"),
        Ok(None) => fail!("the subscription ended"),
    }
    // A nack settles too.
    let settled = bounded("nacking one", held.remove(0).nack(None)).await?;
    ensure!(settled == Settlement::Nacked, "nack returned {settled:?}");
    let mut seen: HashSet<String> = ids(held.iter().map(|d| d.event()));
    seen.insert(first.event().id().to_owned());
    for d in held {
        bounded("acking", d.ack()).await?;
    }
    // What is left (the 5th and the nacked one) arrives.
    let mut left = ids(&events);
    left.retain(|id| !seen.contains(id));
    let got = receive_exactly(&mut c, &left, WAIT, "the rest").await?;
    seen.extend(got.into_iter().map(|(e, _)| e.id().to_owned()));
    ensure!(seen == ids(&events), "not every event arrived");
    Ok(())
}

pub(super) async fn queue_large_payload_round_trips<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    const SIZE: usize = 1 << 20;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            // xorshift64: incompressible, every byte value.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    // 1 MiB as `Event::encoded_len` counts it, the size `max_payload_bytes` limits: the data
    // less what the attributes take.
    let event = Event::builder("evbus.conformance.large", ctx.source())
        .data("application/octet-stream", data)
        .build()
        .expect("valid");
    let attributes = event.encoded_len() - SIZE;
    let data = event.data().map(|d| d.slice(attributes..));
    let event = event
        .into_builder()
        .data_bytes(data)
        .build()
        .expect("valid");
    let sender = ctx.connect().await?;
    let receiver = ctx.connect().await?;
    let name = ctx.queue_name("q");
    bounded("sending 1 MiB", open(&sender, &name).await?.send(&event)).await?;
    let mut c = receive(&*open(&receiver, &name).await?, ctx.consumer()).await?;
    let got = receive_exactly(&mut c, &ids([&event]), WAIT, "the consumer").await?;
    same_event(&event, &got[0].0)
}

pub(super) async fn queue_oversized_payload_fails_with_too_large<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let Some(limit) = ctx.caps.max_payload_bytes else {
        fail!("the transport declares no max_payload_bytes");
    };
    let big = Event::builder("evbus.conformance.oversized", ctx.source())
        .data("application/octet-stream", vec![0x5a; limit + 1])
        .build()
        .expect("valid");
    let conn = ctx.connect().await?;
    let queue = open(&conn, &ctx.queue_name("q")).await?;
    let tname = ctx.topic_name("t");
    let topic = bounded("opening the topic", conn.topic(&tname)).await?;
    let sub = ctx.subscription_name(&tname, "s");
    let mut s = bounded("subscribing", topic.subscribe(ctx.named(&sub))).await?;

    let check = |what: &str, result: evbus::Result<()>| -> CaseResult {
        match result {
            Ok(()) => fail!(
                "{what} of {} data bytes succeeded although the transport declares \
                 max_payload_bytes {limit}",
                limit + 1
            ),
            Err(e) if e.kind() == ErrorKind::TooLarge => Ok(()),
            Err(e) => fail!(
                "{what} failed with `{e}` (kind {:?}), expected TooLarge",
                e.kind()
            ),
        }
    };
    let sent = tokio::time::timeout(Duration::from_secs(60), queue.send(&big)).await;
    check(
        "sending",
        sent.map_err(|_| Failure("sending did not return".into()))?,
    )?;
    let published = tokio::time::timeout(Duration::from_secs(60), topic.publish(&big)).await;
    check(
        "publishing",
        published.map_err(|_| Failure("publishing did not return".into()))?,
    )?;

    // The queue and the topic still work, and the oversized event never arrives.
    let mut c = receive(&*queue, ctx.consumer()).await?;
    queue_sentinel(&ctx, &*queue, &mut c, QUIET, "the queue consumer").await?;
    topic_sentinel(&ctx, &*topic, &mut s, QUIET, "the topic subscription").await
}

pub(super) async fn queue_check_size_takes_the_largest_event_a_send_takes<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let data =
        |event: EventBuilder, n: usize| event.data("application/octet-stream", vec![0x5a; n]);
    check_size_agrees_with_send(ctx, "data bytes", data, |limit| limit + 1).await
}

pub(super) async fn queue_check_size_takes_the_largest_subject_a_send_takes<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    // A line break and then characters of two bytes: what headers cannot carry as it is
    // (NATS percent-encodes the whole value, three times its length) and JSON escapes.
    let subject =
        |event: EventBuilder, n: usize| event.subject(format!("s\n{}", "\u{e9}".repeat(n)));
    check_size_agrees_with_send(ctx, "subject characters", subject, |limit| limit / 2 + 1).await
}

pub(super) async fn queue_check_size_takes_the_largest_partition_key_a_send_takes<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    // A transport may carry the key more than once (Kafka: the record key and a header).
    let key = |event: EventBuilder, n: usize| event.partition_key(format!("k{}", "x".repeat(n)));
    check_size_agrees_with_send(ctx, "partition key bytes", key, |limit| limit + 1).await
}

/// Finds the largest `event(n)` that `Transport::check_size` takes (`n` from 0; `refused(limit)`
/// is an `n` over the declared limit), sends it, which must succeed, and `event(n + 1)`, which
/// must fail with `TooLarge`; then receives what was sent, whole. `event(n)` is an event of
/// the case's source with JSON data, shaped by `shape` with `n`.
async fn check_size_agrees_with_send<T: Transport + 'static>(
    ctx: Ctx<T>,
    what: &'static str,
    shape: impl Fn(EventBuilder, usize) -> EventBuilder + Send + Sync + 'static,
    refused: impl Fn(usize) -> usize,
) -> CaseResult {
    let Some(limit) = ctx.caps.max_payload_bytes else {
        fail!("the transport declares no max_payload_bytes");
    };
    let source = ctx.source();
    // One time for every event: the time of the moment an event is built is written with
    // 0, 3, 6 or 9 fraction digits (whatever it needs), so events built apart would differ
    // in size by a few bytes, and the largest one `check_size` takes moves with them.
    let event = move |n: usize| {
        let event = Event::builder("evbus.conformance.limit", source.clone())
            .time_str("2026-01-01T12:00:00.123456789Z")
            .json(&0)
            .expect("JSON");
        shape(event, n).build().expect("valid")
    };
    let conn = ctx.connect().await?;
    let event = Arc::new(event);
    let over = refused(limit);
    // Events of up to the limit, made and measured some thirty times: on a thread of its own,
    // not on the runtime's (whose workers run the other cases' I/O meanwhile).
    let (low, high) = {
        let (shared, event) = (conn.shared(), Arc::clone(&event));
        tokio::task::spawn_blocking(move || largest_taken(&*shared, &*event, what, limit, over))
            .await
            .map_err(|e| Failure(format!("looking for the largest {what}: {e}")))??
    };
    let name = ctx.queue_name("q");
    let queue = open(&conn, &name).await?;
    let largest = event(low);
    bounded(
        format!("sending {low} {what}, which check_size takes"),
        queue.send(&largest),
    )
    .await?;
    let sent = tokio::time::timeout(Duration::from_secs(60), queue.send(&event(high))).await;
    match sent.map_err(|_| Failure("sending did not return".into()))? {
        Ok(()) => fail!("sending {high} {what}, which check_size refuses, succeeded"),
        Err(e) if e.kind() == ErrorKind::TooLarge => {}
        Err(e) => fail!(
            "sending {high} {what} failed with `{e}` (kind {:?}), expected TooLarge",
            e.kind()
        ),
    }
    // What was taken arrives whole.
    let mut c = receive(&*queue, ctx.consumer()).await?;
    let got = receive_exactly(&mut c, &ids([&largest]), WAIT, "the consumer").await?;
    same_event(&largest, &got[0].0)
}

/// `(low, high)`: `check_size` takes `event(low)` and refuses `event(high = low + 1)` with
/// `TooLarge`; it must take `event(0)` and refuse `event(over)`.
fn largest_taken(
    conn: &dyn Transport,
    event: &dyn Fn(usize) -> Event,
    what: &str,
    limit: usize,
    over: usize,
) -> std::result::Result<(usize, usize), Failure> {
    // Whether `Transport::check_size` takes `event(n)`; a refusal must say `TooLarge`.
    let fits = |n: usize| -> std::result::Result<bool, Failure> {
        match conn.check_size(&event(n)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::TooLarge => Ok(false),
            Err(e) => fail!(
                "check_size of {n} {what} failed with `{e}` (kind {:?}), expected TooLarge",
                e.kind()
            ),
        }
    };
    if !fits(0)? {
        fail!("check_size refuses an event of 0 {what}");
    }
    if fits(over)? {
        fail!(
            "check_size takes {over} {what} ({} bytes as Event::encoded_len counts them) \
             although the transport declares max_payload_bytes {limit}",
            event(over).encoded_len()
        );
    }
    // First where `encoded_len` is exactly the limit (two looks when that is the only
    // measure), then a binary search.
    let (mut low, mut high) = (0, over);
    let step = event(1).encoded_len() - event(0).encoded_len();
    let guess = limit.saturating_sub(event(0).encoded_len()) / step.max(1);
    for probe in [guess, guess + 1] {
        if probe > low && probe < high {
            if fits(probe)? {
                low = probe;
            } else {
                high = probe;
            }
        }
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid)? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok((low, high))
}
