//! Topic (fan-out) behaviours.

use super::prelude::*;
use super::samples;
use crate::support::{Conn, check_dead_lettered, compete, nack_until_dead_lettered};

/// Opens `name` on `conn`.
async fn open<T: Transport + 'static>(
    conn: &Conn<T>,
    name: &str,
) -> Result<Arc<dyn Topic>, Failure> {
    bounded(format!("opening topic `{name}`"), conn.topic(name)).await
}

/// Subscribes to `topic`.
async fn subscribe(topic: &dyn Topic, options: SubscribeOptions) -> Result<Subscription, Failure> {
    let what = match &options.subscription {
        Some(name) => format!("subscribing `{name}` to topic `{}`", topic.name()),
        None => format!("subscribing anonymously to topic `{}`", topic.name()),
    };
    bounded(what, topic.subscribe(options)).await
}

/// Publishes `events` one by one, in order.
async fn publish_all(topic: &dyn Topic, events: &[Event]) -> CaseResult {
    for event in events {
        bounded(
            format!("publishing event {}", event.id()),
            topic.publish(event),
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn topic_durable_subscription_receives_events_published_while_offline<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.topic_name("t");
    let sub = ctx.subscription_name(&name, "s");

    // A first "process" creates the subscription, then goes away.
    let first = ctx.connect().await?;
    let topic = open(&first, &name).await?;
    drop(subscribe(&*topic, ctx.named(&sub)).await?);
    bounded("closing the first connection", first.close()).await?;

    // Events are published while no consumer runs.
    let publisher = ctx.connect().await?;
    let events = ctx.events(20);
    publish_all(&*open(&publisher, &name).await?, &events).await?;

    // A new "process" attaches to the subscription and gets every one of them.
    let consumer = ctx.connect().await?;
    let mut s = subscribe(&*open(&consumer, &name).await?, ctx.named(&sub)).await?;
    receive_exactly(&mut s, &ids(&events), WAIT, "the reattached subscription").await?;
    Ok(())
}

pub(super) async fn topic_two_subscriptions_each_receive_every_event<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let mut a = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "a"))).await?;
    let mut b = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "b"))).await?;

    let events = ctx.events(30);
    publish_all(&*topic, &events).await?;
    receive_exactly(&mut a, &ids(&events), WAIT, "subscription a").await?;
    receive_exactly(&mut b, &ids(&events), WAIT, "subscription b").await?;

    // Nothing more (no second copy) reaches either.
    let sentinel = ctx.sentinel();
    bounded("publishing the sentinel", topic.publish(&sentinel)).await?;
    expect_sentinel(&mut a, &sentinel, QUIET, "subscription a").await?;
    expect_sentinel(&mut b, &sentinel, QUIET, "subscription b").await
}

pub(super) async fn topic_consumers_sharing_a_subscription_split_the_events<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.topic_name("t");
    let sub = ctx.subscription_name(&name, "shared");
    let options = SubscribeOptions::named(&sub).consumer(ctx.consumer().max_in_flight(1));
    // Two "instances", each with its own connection, attach under the same name.
    let one = ctx.connect().await?;
    let two = ctx.connect().await?;
    let topic = open(&one, &name).await?;
    let c0 = subscribe(&*topic, options.clone()).await?;
    let c1 = subscribe(&*open(&two, &name).await?, options).await?;

    let events: Vec<Event> = (0..40)
        .map(|i| ctx.keyed_event(&format!("k{}", i % 8), i))
        .collect();
    publish_all(&*topic, &events).await?;
    compete(
        vec![c0, c1],
        &ids(&events),
        "2 consumers of one subscription",
    )
    .await?;
    Ok(())
}

pub(super) async fn topic_isolation_nothing_crosses_between_topics<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let (x_name, y_name) = (ctx.topic_name("x"), ctx.topic_name("y"));
    let (x, y) = (open(&conn, &x_name).await?, open(&conn, &y_name).await?);
    let mut sx = subscribe(&*x, ctx.named(&ctx.subscription_name(&x_name, "s"))).await?;
    let mut sy = subscribe(&*y, ctx.named(&ctx.subscription_name(&y_name, "s"))).await?;
    let mut ax = subscribe(&*x, SubscribeOptions::anonymous().consumer(ctx.consumer())).await?;

    let (ex, ey) = (ctx.events(10), ctx.events(10));
    for (a, b) in ex.iter().zip(&ey) {
        bounded("publishing to x", x.publish(a)).await?;
        bounded("publishing to y", y.publish(b)).await?;
    }
    receive_exactly(&mut sx, &ids(&ex), WAIT, "the subscription of topic x").await?;
    receive_exactly(
        &mut ax,
        &ids(&ex),
        WAIT,
        "the anonymous subscription of topic x",
    )
    .await?;
    receive_exactly(&mut sy, &ids(&ey), WAIT, "the subscription of topic y").await?;

    let sentinel = ctx.sentinel();
    bounded("publishing the sentinel to x", x.publish(&sentinel)).await?;
    expect_sentinel(&mut sx, &sentinel, QUIET, "the subscription of topic x").await?;
    expect_sentinel(
        &mut ax,
        &sentinel,
        QUIET,
        "the anonymous subscription of topic x",
    )
    .await?;
    // y's sentinel comes after x's: x's must not have reached y.
    topic_sentinel(&ctx, &*y, &mut sy, QUIET, "the subscription of topic y").await
}

/// Publishes `events` from one connection and checks that a subscriber on another
/// connection receives each one equal, attribute by attribute and byte for byte.
async fn round_trip<T: Transport + 'static>(ctx: &Ctx<T>, events: &[Event]) -> CaseResult {
    let publisher = ctx.connect().await?;
    let consumer = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let sub = ctx.subscription_name(&name, "s");
    let mut s = subscribe(&*open(&consumer, &name).await?, ctx.named(&sub)).await?;
    publish_all(&*open(&publisher, &name).await?, events).await?;
    let got = receive_exactly(&mut s, &ids(events), WAIT, "the subscriber").await?;
    let got = by_id(&got);
    for event in events {
        same_event(event, got[event.id()])?;
    }
    Ok(())
}

pub(super) async fn topic_envelope_round_trips_every_attribute_and_extension<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let full = samples::full_event();
    let whole_seconds = full
        .clone()
        .into_builder()
        .id(format!("{}-s", full.id()))
        .time_str("1999-12-31T23:59:59Z")
        .build()
        .expect("valid");
    let offset = full
        .clone()
        .into_builder()
        .id(format!("{}-o", full.id()))
        .time_str("2030-06-15T12:00:00.5+02:00")
        .build()
        .expect("valid");
    round_trip(&ctx, &[full, whole_seconds, offset]).await
}

pub(super) async fn topic_unicode_json_and_text_data_round_trip_byte_exact<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let events = [
        samples::unicode_json_event(&ctx),
        samples::unicode_text_event(&ctx),
    ];
    round_trip(&ctx, &events).await
}

pub(super) async fn topic_binary_data_with_a_non_json_content_type_round_trips_byte_exact<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let events = [samples::binary_event(&ctx), samples::png_event(&ctx)];
    round_trip(&ctx, &events).await
}

pub(super) async fn topic_event_without_data_or_optional_attributes_round_trips<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let events = [samples::bare_event(&ctx), samples::untyped_json_event(&ctx)];
    round_trip(&ctx, &events).await
}

pub(super) async fn topic_per_key_order_is_kept_under_concurrent_publishing<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const KEYS: usize = 16;
    const PER_KEY: u64 = 64;
    let name = ctx.topic_name("t");
    let consumer = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut s = subscribe(
        &*open(&consumer, &name).await?,
        ctx.named(&ctx.subscription_name(&name, "s")),
    )
    .await?;
    let topic = open(&publisher, &name).await?;

    // One publisher task per key, all at once; each publishes its key's events in order.
    let mut publishers = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let events: Vec<Event> = (0..PER_KEY).map(|i| ctx.keyed_event(&key, i)).collect();
        let topic = Arc::clone(&topic);
        publishers.push(spawn(async move { publish_all(&*topic, &events).await }));
    }

    let total = KEYS * PER_KEY as usize;
    let deadline = Instant::now() + WAIT * 2;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut seen = HashSet::new();
    while seen.len() < total {
        let d = match tokio::time::timeout_at(deadline, s.next_delivery()).await {
            Err(_) => fail!(
                "received {} of {total} events within {:?}",
                seen.len(),
                WAIT * 2
            ),
            Ok(None) => fail!(
                "the subscription ended after {} of {total} events",
                seen.len()
            ),
            Ok(Some(Err(e))) => fail!("the subscription yielded an error: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let event = d.event();
        ensure!(
            seen.insert(event.id().to_owned()),
            "event {} was delivered twice (attempt {})",
            event.id(),
            d.attempt()
        );
        let Some(key) = event.partition_key() else {
            fail!("event {} arrived without its partition key", event.id())
        };
        let n = seq(event)?;
        if let Some(&before) = last.get(key) {
            ensure!(
                n > before,
                "key `{key}`: event {n} was delivered after event {before}; per-key order was lost"
            );
        }
        last.insert(key.to_owned(), n);
        bounded("acking", d.ack()).await?;
    }
    for p in publishers {
        p.join(WAIT, "a publisher").await??;
    }
    Ok(())
}

pub(super) async fn topic_earliest_start_replays_retained_history<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let history = ctx.events(5);
    publish_all(&*topic, &history).await?;

    let sub = ctx.subscription_name(&name, "s");
    let mut s = subscribe(&*topic, ctx.named(&sub).start(StartPosition::Earliest)).await?;
    receive_exactly(
        &mut s,
        &ids(&history),
        WAIT,
        "the subscription from earliest",
    )
    .await?;
    let newer = ctx.events(3);
    publish_all(&*topic, &newer).await?;
    receive_exactly(&mut s, &ids(&newer), WAIT, "the subscription from earliest").await?;
    topic_sentinel(
        &ctx,
        &*topic,
        &mut s,
        QUIET,
        "the subscription from earliest",
    )
    .await
}

/// Publishes old events, subscribes with `options`, publishes new ones: only the new ones
/// arrive.
async fn only_new_events<T: Transport + 'static>(
    ctx: &Ctx<T>,
    name: &str,
    options: SubscribeOptions,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let topic = open(&conn, name).await?;
    publish_all(&*topic, &ctx.events(5)).await?;
    let mut s = subscribe(&*topic, options).await?;
    let new = ctx.events(5);
    publish_all(&*topic, &new).await?;
    receive_exactly(&mut s, &ids(&new), WAIT, "the new subscription").await?;
    topic_sentinel(ctx, &*topic, &mut s, QUIET, "the new subscription").await
}

pub(super) async fn topic_latest_start_receives_only_new_events<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.topic_name("t");
    let sub = ctx.subscription_name(&name, "s");
    let options = ctx.named(&sub).start(StartPosition::Latest);
    only_new_events(&ctx, &name, options).await
}

pub(super) async fn topic_anonymous_subscription_starts_at_now<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let name = ctx.topic_name("t");
    let options = SubscribeOptions::anonymous().consumer(ctx.consumer());
    only_new_events(&ctx, &name, options).await
}

/// Anonymous subscriptions are each their own: two of one topic (one per connection, one
/// sharing a connection) each receive every event instead of competing for them, and one
/// opened after another was dropped starts at now, with nothing the dropped one left behind.
/// An adapter that names the broker's subscription after `Source::subscription()` (`None` for
/// every anonymous one) instead of the destination's generated name fails here.
pub(super) async fn topic_anonymous_subscriptions_each_receive_every_event<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let other = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let anonymous = || SubscribeOptions::anonymous().consumer(ctx.consumer());
    let mut a = subscribe(&*topic, anonymous()).await?;
    let mut b = subscribe(&*topic, anonymous()).await?;
    let mut c = subscribe(&*open(&other, &name).await?, anonymous()).await?;

    let events = ctx.events(20);
    publish_all(&*topic, &events).await?;
    receive_exactly(&mut a, &ids(&events), WAIT, "anonymous subscription a").await?;
    receive_exactly(&mut b, &ids(&events), WAIT, "anonymous subscription b").await?;
    receive_exactly(
        &mut c,
        &ids(&events),
        WAIT,
        "anonymous subscription c (another connection)",
    )
    .await?;

    // `a` goes away with events of its own still unread; a new one starts at now.
    let unread = ctx.events(5);
    publish_all(&*topic, &unread).await?;
    receive_exactly(&mut b, &ids(&unread), WAIT, "anonymous subscription b").await?;
    drop(a);
    let mut d = subscribe(&*topic, anonymous()).await?;
    let later = ctx.events(5);
    publish_all(&*topic, &later).await?;
    receive_exactly(
        &mut d,
        &ids(&later),
        WAIT,
        "an anonymous subscription opened after one was dropped",
    )
    .await?;
    receive_exactly(&mut b, &ids(&later), WAIT, "anonymous subscription b").await?;
    topic_sentinel(
        &ctx,
        &*topic,
        &mut d,
        QUIET,
        "an anonymous subscription opened after one was dropped",
    )
    .await
}

pub(super) async fn topic_many_concurrent_publishers_on_many_topics_lose_nothing<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    const TOPICS: usize = 8;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 25;
    let publishers = [ctx.connect().await?, ctx.connect().await?];
    let consumer = ctx.connect().await?;

    let mut subscriptions = Vec::with_capacity(TOPICS);
    let mut work = Vec::with_capacity(TOPICS * PUBLISHERS);
    for t in 0..TOPICS {
        let name = ctx.topic_name(&format!("t{t}"));
        let events = ctx.events((PUBLISHERS * EACH) as u64);
        let s = subscribe(
            &*open(&consumer, &name).await?,
            ctx.named(&ctx.subscription_name(&name, "s")),
        )
        .await?;
        subscriptions.push((t, s, ids(&events)));
        for (p, chunk) in events.chunks(EACH).enumerate() {
            let conn = publishers[p % 2].clone();
            let name = name.clone();
            work.push((conn, name, chunk.to_vec()));
        }
    }
    // Each subscription's wait runs from here, when every subscription is in place: setting
    // up the others (a consumer group join each on Kafka) is not part of it.
    let mut consumers = Vec::with_capacity(TOPICS);
    for (t, mut s, expected) in subscriptions {
        consumers.push(spawn(async move {
            let what = format!("the subscription of topic {t}");
            receive_exactly(&mut s, &expected, WAIT * 2, &what)
                .await
                .map(|_| ())
        }));
    }
    // Every publisher starts at once.
    let mut tasks = Vec::with_capacity(work.len());
    for (conn, name, chunk) in work {
        tasks.push(spawn(async move {
            let topic = open(&conn, &name).await?;
            publish_all(&*topic, &chunk).await
        }));
    }
    for task in tasks {
        task.join(WAIT * 2, "a publisher").await??;
    }
    for c in consumers {
        c.join(WAIT * 2, "a consumer").await??;
    }
    Ok(())
}

pub(super) async fn topic_closing_one_subscription_leaves_the_others_working<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let a_name = ctx.subscription_name(&name, "a");
    let mut a = subscribe(&*topic, ctx.named(&a_name)).await?;
    let mut b = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "b"))).await?;
    let mut c = subscribe(
        &*topic,
        SubscribeOptions::anonymous().consumer(ctx.consumer()),
    )
    .await?;

    let first = ctx.events(5);
    publish_all(&*topic, &first).await?;
    receive_exactly(&mut a, &ids(&first), WAIT, "subscription a").await?;
    receive_exactly(&mut b, &ids(&first), WAIT, "subscription b").await?;
    receive_exactly(&mut c, &ids(&first), WAIT, "the anonymous subscription").await?;

    a.close();
    let second = ctx.events(5);
    publish_all(&*topic, &second).await?;
    receive_exactly(&mut b, &ids(&second), WAIT, "subscription b after a closed").await?;
    receive_exactly(
        &mut c,
        &ids(&second),
        WAIT,
        "the anonymous subscription after a closed",
    )
    .await?;

    // `a` is durable: reattached, it gets what was published while it was closed.
    let mut a = subscribe(&*topic, ctx.named(&a_name)).await?;
    receive_exactly(&mut a, &ids(&second), WAIT, "subscription a, reattached").await?;
    Ok(())
}

pub(super) async fn topic_durable_subscription_closed_mid_stream_and_reopened_misses_nothing<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let sub = ctx.subscription_name(&name, "s");
    let options = SubscribeOptions::named(&sub).consumer(ctx.short_consumer());
    let mut s = subscribe(&*topic, options.clone()).await?;

    let before = ctx.events(10);
    publish_all(&*topic, &before).await?;
    // Take 6: ack 4, leave 2 unsettled, then close mid-stream.
    let mut acked = HashSet::new();
    let mut held = Vec::new();
    for i in 0..6 {
        let d = next(&mut s, WAIT, "the subscription before closing").await?;
        if i < 4 {
            bounded("acking", d.ack()).await?;
            acked.insert(d.event().id().to_owned());
        } else {
            held.push(d);
        }
    }
    let held_ids = ids(held.iter().map(|d| d.event()));
    drop(held);
    drop(s);

    let during = ctx.events(5);
    publish_all(&*topic, &during).await?;

    let mut s = subscribe(&*topic, options).await?;
    let expected: HashSet<String> = ids(before.iter().chain(&during))
        .difference(&acked)
        .cloned()
        .collect();
    let got = receive_exactly(&mut s, &expected, WAIT, "the reopened subscription")
        .await
        .map_err(|f| Failure(format!("{} (acked before closing: {acked:?})", f.0)))?;
    for (event, attempt) in &got {
        if held_ids.contains(event.id()) {
            ensure!(
                *attempt >= 2,
                "event {} was delivered unsettled before closing, and its redelivery says \
                 attempt {attempt}",
                event.id()
            );
        }
    }
    // Events acked before closing would have come back with the unsettled ones (their
    // visibility timeouts ran out together): nothing more arrives.
    topic_sentinel(&ctx, &*topic, &mut s, QUIET, "the reopened subscription").await
}

pub(super) async fn topic_publish_batch_delivers_every_event<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let mut s = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "s"))).await?;
    let events = ctx.events(50);
    bounded("publishing a batch", topic.publish_batch(&events)).await?;
    receive_exactly(&mut s, &ids(&events), WAIT, "the subscription").await?;
    topic_sentinel(&ctx, &*topic, &mut s, QUIET, "the subscription").await
}

pub(super) async fn topic_publish_batch_keeps_publish_order_per_key<T: Transport + 'static>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let mut s = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "s"))).await?;
    let events: Vec<Event> = (0..50).map(|i| ctx.keyed_event("batch", i)).collect();
    bounded("publishing a batch", topic.publish_batch(&events)).await?;
    let got = receive_exactly(&mut s, &ids(&events), WAIT, "the subscription").await?;
    let order: Vec<u64> = got.iter().map(|(e, _)| seq(e)).collect::<Result<_, _>>()?;
    let expected: Vec<u64> = (0..50).collect();
    ensure!(
        order == expected,
        "the batch arrived in the order {order:?}"
    );
    Ok(())
}

pub(super) async fn topic_nack_redelivers_only_to_the_nacking_subscription<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let mut a = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "a"))).await?;
    let mut b = subscribe(&*topic, ctx.named(&ctx.subscription_name(&name, "b"))).await?;
    let event = ctx.event(0);
    bounded("publishing", topic.publish(&event)).await?;

    let first = next(&mut a, WAIT, "subscription a").await?;
    ensure!(
        first.event().id() == event.id(),
        "subscription a got an unexpected event"
    );
    let settled = bounded("nacking on a", first.nack(None)).await?;
    ensure!(settled == Settlement::Nacked, "nack returned {settled:?}");
    let again = next(&mut a, WAIT, "subscription a, after nack").await?;
    ensure!(
        again.event().id() == event.id() && again.attempt() == 2,
        "after the nack subscription a got event {} attempt {}, expected {} attempt 2",
        again.event().id(),
        again.attempt(),
        event.id()
    );
    bounded("acking on a", again.ack()).await?;

    let on_b = next(&mut b, WAIT, "subscription b").await?;
    ensure!(
        on_b.event().id() == event.id() && on_b.attempt() == 1,
        "subscription b got event {} attempt {}, expected {} attempt 1: a's nack leaked into b",
        on_b.event().id(),
        on_b.attempt(),
        event.id()
    );
    bounded("acking on b", on_b.ack()).await?;

    let sentinel = ctx.sentinel();
    bounded("publishing the sentinel", topic.publish(&sentinel)).await?;
    expect_sentinel(&mut a, &sentinel, QUIET, "subscription a").await?;
    expect_sentinel(&mut b, &sentinel, QUIET, "subscription b").await
}

pub(super) async fn topic_max_attempts_dead_letters_to_the_subscription_dead_letter_queue<
    T: Transport + 'static,
>(
    ctx: Ctx<T>,
) -> CaseResult {
    let conn = ctx.connect().await?;
    let name = ctx.topic_name("t");
    let topic = open(&conn, &name).await?;
    let sub = ctx.subscription_name(&name, "s");
    let consumer = ctx.consumer().max_attempts(2);
    let mut s = subscribe(
        &*topic,
        SubscribeOptions::named(&sub).consumer(consumer.clone()),
    )
    .await?;

    let poison = ctx.event(0);
    let others: Vec<Event> = (1..4).map(|i| ctx.event(i)).collect();
    bounded("publishing the poison event", topic.publish(&poison)).await?;
    publish_all(&*topic, &others).await?;
    nack_until_dead_lettered(&mut s, &poison, &ids(&others), 2, "the subscription").await?;

    let dlq_name = dead_letter_queue_name(&name, Some(&sub), &consumer);
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
    check_dead_lettered(d.event(), &poison, None, 2, &format!("{name}/{sub}"))?;
    bounded("acking the dead letter", d.ack()).await?;

    // The subscription keeps flowing behind it.
    let later = ctx.events(3);
    publish_all(&*topic, &later).await?;
    receive_exactly(
        &mut s,
        &ids(&later),
        WAIT,
        "the subscription after dead-lettering",
    )
    .await?;
    Ok(())
}
