//! Bounded concurrency, per-key order and graceful shutdown of handlers.

mod bus_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_support::*;
use evbus::bus::{Bus, Emit, HandlerBuilder, Message};
use evbus::layer::{Fault, Faults, LayerExt};
use evbus::{ErrorKind, Transport};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Runs each listed case as two tests, `NAME::current_thread` and `NAME::multi_threaded`: on
/// a current-thread runtime unordered handlers run inline, on a multi-threaded one on the
/// handler's pool of tasks, and both must keep the same bounds.
macro_rules! on_both_runtimes {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn current_thread() {
                super::$case().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_threaded() {
                super::$case().await;
            }
        }
    )*};
}

on_both_runtimes!(
    a_handler_runs_at_most_its_concurrency_at_once,
    an_ordered_handler_runs_at_most_its_concurrency_at_once,
    the_topic_and_the_redrive_queue_together_stay_within_the_concurrency,
    shutdown_lets_running_handlers_finish_before_closing,
    a_second_shutdown_under_way_waits_for_the_first,
    a_key_s_backlog_longer_than_the_visibility_timeout_runs_once_in_order,
    an_ordered_handler_s_waiting_events_leave_the_slots_to_other_keys,
    at_the_deadline_a_still_running_event_is_nacked_to_another_instance,
    deliveries_whose_ack_failed_do_not_stall_the_handler,
    runs_that_finish_at_once_and_runs_that_wait_each_handle_their_event_once,
    at_the_deadline_an_ordered_handler_gives_back_the_running_event_and_those_behind_it,
    the_backlogs_of_two_keys_run_side_by_side_at_concurrency_two,
);

/// Starts a handler of `orderPlaced` with `concurrency` that reports each event it starts
/// (its subject, and how many runs were in progress with it) and then waits for a permit of
/// the returned gate.
async fn gated_handler(
    bus: &Bus,
    concurrency: usize,
) -> (Arc<Semaphore>, UnboundedReceiver<(Option<String>, usize)>) {
    gated_handler_ordered(bus, concurrency, false).await
}

async fn gated_handler_ordered(
    bus: &Bus,
    concurrency: usize,
    ordered: bool,
) -> (Arc<Semaphore>, UnboundedReceiver<(Option<String>, usize)>) {
    let running = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (tx, rx) = unbounded_channel();
    let g = Arc::clone(&gate);
    bus.on("orderPlaced", "g", move |msg: Message| {
        let (r, g, tx) = (Arc::clone(&running), Arc::clone(&g), tx.clone());
        async move {
            let at_once = r.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = tx.send((msg.event().subject().map(str::to_owned), at_once));
            g.acquire().await?.forget();
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .concurrency(concurrency)
    .ordered_by_key(ordered)
    .start()
    .await
    .unwrap();
    (gate, rx)
}

async fn emit_placed(bus: &Bus, orders: std::ops::Range<usize>) {
    for i in orders {
        bus.emit("orderPlaced", placed(&format!("o-{i}")))
            .await
            .unwrap();
    }
}

async fn a_handler_runs_at_most_its_concurrency_at_once() {
    let broker = broker();
    let bus = bus(&broker);
    let (gate, mut rx) = gated_handler(&bus, 4).await;
    emit_placed(&bus, 0..10).await;
    let started: Vec<usize> = vec![
        recv(&mut rx).await.1,
        recv(&mut rx).await.1,
        recv(&mut rx).await.1,
        recv(&mut rx).await.1,
    ];
    assert_eq!(started.iter().max(), Some(&4));
    // While four are blocked, a fifth never starts.
    expect_nothing(&mut rx).await;
    gate.add_permits(10);
    for _ in 4..10 {
        assert!(recv(&mut rx).await.1 <= 4);
    }
}

/// An ordered handler takes its events into lanes without slots; a lane takes one of the
/// `concurrency` slots to run. Events of ten keys and five without a key: never more than
/// four run at once, and every one runs once the gate opens.
async fn an_ordered_handler_runs_at_most_its_concurrency_at_once() {
    let broker = broker();
    let bus = bus(&broker);
    let (gate, mut rx) = gated_handler_ordered(&bus, 4, true).await;
    let emits = (0..15).map(|i| {
        let emit = Emit::new("orderPlaced", placed(&format!("o-{i}")));
        if i < 10 {
            emit.key(format!("k{i}"))
        } else {
            emit
        }
    });
    bus.emit_batch(emits).await.unwrap();
    for _ in 0..4 {
        assert!(recv(&mut rx).await.1 <= 4);
    }
    // While four are blocked, a fifth never starts.
    expect_nothing(&mut rx).await;
    gate.add_permits(15);
    for _ in 4..15 {
        assert!(recv(&mut rx).await.1 <= 4);
    }
    expect_nothing(&mut rx).await;
}

/// Runs that finish in their first poll and runs that have to wait, interleaved: inline (a
/// current-thread runtime) a finished run leaves its box to the next one and a waiting run
/// takes its box into a task of its own. Every event is handled exactly once, the waiting
/// ones once the gate opens, while the others kept flowing past them.
async fn runs_that_finish_at_once_and_runs_that_wait_each_handle_their_event_once() {
    let broker = broker();
    let bus = bus(&broker);
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = unbounded_channel();
    let g = Arc::clone(&gate);
    let handler = bus
        .on("orderPlaced", "g", move |msg: Message| {
            let (g, tx) = (Arc::clone(&g), tx.clone());
            let order = msg.event().json::<serde_json::Value>().unwrap()["orderId"]
                .as_str()
                .unwrap()
                .to_owned();
            async move {
                // Every third event waits for the gate; the others finish at once.
                if order_index(&order).is_multiple_of(3) {
                    g.acquire().await?.forget();
                }
                let _ = tx.send(order);
                Ok(())
            }
        })
        .concurrency(8)
        .start()
        .await
        .unwrap();
    emit_placed(&bus, 0..30).await;
    let mut seen = HashSet::new();
    // With the gate shut, only events that do not wait finish (at most 7 wait in the 8 slots
    // while these come through, so they are not starved).
    for _ in 0..10 {
        let order = recv(&mut rx).await;
        assert!(
            !order_index(&order).is_multiple_of(3),
            "{order} ran before the gate opened"
        );
        assert!(seen.insert(order.clone()), "{order} was handled twice");
    }
    gate.add_permits(100);
    while seen.len() < 30 {
        let order = recv(&mut rx).await;
        assert!(seen.insert(order.clone()), "{order} was handled twice");
    }
    expect_nothing(&mut rx).await;
    // Nothing was left running or unsettled.
    assert_eq!(
        handler.shutdown(Duration::from_secs(5)).await.interrupted,
        0
    );
}

fn order_index(order: &str) -> usize {
    order.trim_start_matches("o-").parse().unwrap()
}

/// The topic and the redrive queue each have their own in-flight limit; the handler's
/// concurrency bounds both together.
async fn the_topic_and_the_redrive_queue_together_stay_within_the_concurrency() {
    let broker = broker();
    let bus = bus(&broker);
    let (gate, mut rx) = gated_handler(&bus, 2).await;
    // Two events on the topic take both slots.
    emit_placed(&bus, 0..2).await;
    assert_eq!(recv(&mut rx).await.1.max(recv(&mut rx).await.1), 2);
    // Two more wait in the redrive queue, which has room for them in its own limit.
    let redrive = broker
        .connect()
        .queue(&bus.redrive_queue_name("orderPlaced", "g"))
        .await
        .unwrap();
    for i in 0..2 {
        let event = evbus::Event::builder("orderPlaced", "/test/shop")
            .subject(format!("redriven-{i}"))
            .json(&placed(&format!("r-{i}")))
            .unwrap()
            .build()
            .unwrap();
        redrive.send(&event).await.unwrap();
    }
    for (i, permits) in [1, 10].into_iter().enumerate() {
        // While both slots are held, the next redriven event does not start.
        expect_nothing(&mut rx).await;
        gate.add_permits(permits);
        let (subject, at_once) = recv(&mut rx).await;
        assert_eq!(subject, Some(format!("redriven-{i}")));
        assert!(
            at_once <= 2,
            "{at_once} handlers ran at once with a concurrency of 2"
        );
    }
}

#[tokio::test]
async fn ordered_handlers_never_run_one_key_concurrently_or_out_of_order() {
    let broker = broker();
    let bus = bus(&broker);
    let active: Arc<Mutex<HashSet<String>>> = Arc::default();
    let log: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let overlap = Arc::new(AtomicUsize::new(0));
    let max_parallel = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = unbounded_channel();
    {
        let (active, log, overlap, max_parallel) = (
            Arc::clone(&active),
            Arc::clone(&log),
            Arc::clone(&overlap),
            Arc::clone(&max_parallel),
        );
        bus.on("orderPlaced", "g", move |msg: Message| {
            let (active, log, overlap, max_parallel, tx) = (
                Arc::clone(&active),
                Arc::clone(&log),
                Arc::clone(&overlap),
                Arc::clone(&max_parallel),
                tx.clone(),
            );
            async move {
                let key = msg.partition_key().unwrap().to_owned();
                let seq: u64 = msg.extension("seq").unwrap().parse()?;
                {
                    let mut a = active.lock().unwrap();
                    if !a.insert(key.clone()) {
                        overlap.fetch_add(1, Ordering::SeqCst);
                    }
                    max_parallel.fetch_max(a.len(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_micros(200 + (seq % 7) * 150)).await;
                log.lock().unwrap().push((key.clone(), seq));
                active.lock().unwrap().remove(&key);
                let _ = tx.send(());
                Ok(())
            }
        })
        .ordered_by_key(true)
        .concurrency(8)
        .start()
        .await
        .unwrap();
    }
    const KEYS: u64 = 4;
    const PER_KEY: u64 = 40;
    let emits = (0..PER_KEY).flat_map(|seq| {
        (0..KEYS).map(move |k| {
            Emit::new("orderPlaced", placed(&format!("o-{k}")))
                .key(format!("k{k}"))
                .extension("seq", seq.to_string())
        })
    });
    bus.emit_batch(emits).await.unwrap();
    for _ in 0..KEYS * PER_KEY {
        recv(&mut rx).await;
    }
    assert_eq!(overlap.load(Ordering::SeqCst), 0, "a key ran concurrently");
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for (k, s) in log.lock().unwrap().iter() {
        per_key.entry(k.clone()).or_default().push(*s);
    }
    for (k, seqs) in per_key {
        assert_eq!(
            seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "key {k} out of order"
        );
    }
    assert!(
        max_parallel.load(Ordering::SeqCst) > 1,
        "different keys ran in parallel"
    );
}

/// An outside review's finding: an ordered handler takes as many events as it has slots, and
/// those of one key wait behind each other in its lane. Their visibility timeouts ran from
/// the take: a backlog of one key longer than the timeout came back from the broker, ran
/// again after later events of the key, and counted attempts until successful events were
/// dead-lettered. Now the Bus renews the waiting events: eight events of one key, runs of
/// 120 ms, a timeout of 400 ms (the last waits 840 ms, two timeouts): each runs once, in
/// order, on its first attempt, and nothing is dead-lettered.
async fn a_key_s_backlog_longer_than_the_visibility_timeout_runs_once_in_order() {
    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
        let (tx, attempt) = (tx.clone(), msg.attempt());
        async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            let _ = tx.send((seq, attempt));
            Ok(())
        }
    })
    .ordered_by_key(true)
    .concurrency(8)
    .prefetch(0)
    .visibility_timeout(Duration::from_millis(400))
    .start()
    .await
    .unwrap();
    emit_seqs(&bus, "k", 0..8).await;
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(recv(&mut rx).await);
    }
    assert_eq!(got, (0..8).map(|seq| (seq, 1)).collect::<Vec<_>>());
    // Nothing comes back once the backlog is done (a timed-out copy would, within a timeout).
    if let Ok(Some(again)) = tokio::time::timeout(Duration::from_millis(600), rx.recv()).await {
        panic!("an event ran again: {again:?}");
    }
    let dead = bus
        .transport()
        .queue(&bus.dead_letter_queue_name("orderPlaced", "g"))
        .await
        .unwrap();
    let mut sub = dead
        .receive(evbus::ConsumerOptions::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next_delivery())
            .await
            .is_err(),
        "an event was dead-lettered"
    );
    bus.shutdown(WAIT).await.unwrap();
}

/// An outside review (finding F2): an ordered handler's event waiting behind its key held a
/// concurrency slot, so one busy key could hold every slot while one event ran, and other
/// keys waited for its backlog. Waiting events now hold no slot: with a hot key's eight
/// 150 ms runs and then one event of another key, concurrency 4 and prefetch 4, the other
/// key's event runs as soon as the in-flight limit lets it be taken (after the first hot
/// run), not behind the hot backlog.
async fn an_ordered_handler_s_waiting_events_leave_the_slots_to_other_keys() {
    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let key = msg.partition_key().unwrap().to_owned();
        let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
        let tx = tx.clone();
        async move {
            if key == "hot" {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let _ = tx.send((key, seq));
            Ok(())
        }
    })
    .ordered_by_key(true)
    .concurrency(4)
    .prefetch(4)
    .start()
    .await
    .unwrap();
    let hot = (0..8).map(|seq| ("hot", seq));
    bus.emit_batch(hot.chain([("cold", 0)]).map(|(key, seq)| {
        Emit::new("orderPlaced", placed("o-1"))
            .key(key)
            .extension("seq", seq.to_string())
    }))
    .await
    .unwrap();
    let mut order = Vec::new();
    for _ in 0..9 {
        order.push(recv(&mut rx).await);
    }
    let cold = order.iter().position(|(k, _)| k == "cold").unwrap();
    assert!(
        cold <= 2,
        "the other key's event waited behind the hot key's backlog: {order:?}"
    );
    bus.shutdown(WAIT).await.unwrap();
}

/// An outside review (lanes, finding 1): an ordered handler's worker took a slot before it
/// looked for the next delivery and kept it while there was none, so once every event was
/// taken the keys' lanes ran on `concurrency - 1` slots: the backlogs of two keys at
/// concurrency 2 ran one event at a time. The worker now lets its slot go while it waits.
/// Five events of each of two keys, each run held until the test lets a run of its key go:
/// in every round, the next event of both keys runs at once.
async fn the_backlogs_of_two_keys_run_side_by_side_at_concurrency_two() {
    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut started) = unbounded_channel();
    // One gate per key: a permit let go for one key's run cannot end the other's.
    let gates: Arc<HashMap<String, Semaphore>> = Arc::new(
        ["a", "b"]
            .into_iter()
            .map(|key| (key.to_owned(), Semaphore::new(0)))
            .collect(),
    );
    let g = Arc::clone(&gates);
    bus.on("orderPlaced", "g", move |msg: Message| {
        let key = msg.partition_key().unwrap().to_owned();
        let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
        let (tx, g) = (tx.clone(), Arc::clone(&g));
        async move {
            let _ = tx.send((key.clone(), seq));
            g[&key].acquire().await?.forget();
            Ok(())
        }
    })
    .ordered_by_key(true)
    .concurrency(2)
    .prefetch(10)
    .start()
    .await
    .unwrap();
    let events = ["a", "b"]
        .into_iter()
        .flat_map(|key| (0..5).map(move |seq| (key, seq)));
    bus.emit_batch(events.map(|(key, seq)| {
        Emit::new("orderPlaced", placed("o-1"))
            .key(key)
            .extension("seq", seq.to_string())
    }))
    .await
    .unwrap();
    for round in 0..5 {
        let mut running = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(WAIT, started.recv()).await {
                Ok(Some(run)) => running.push(run),
                _ => panic!(
                    "round {round}: only {running:?} ran; the other key's event waited for a \
                     slot while the handler ran one event"
                ),
            }
        }
        running.sort();
        assert_eq!(running, [("a".to_owned(), round), ("b".to_owned(), round)]);
        for gate in gates.values() {
            gate.add_permits(1);
        }
    }
    bus.shutdown(WAIT).await.unwrap();
}

/// An outside review: since the Bus renews the events waiting behind their key, a run that
/// hangs kept its key's waiting events here for ever (renewed), and even the copy of the
/// hung event the broker handed out again queued behind it: nothing of the key ever ran
/// again, on any instance, and nothing was said. A lane whose run has gone on past the
/// visibility timeout is no longer renewed (and warned about), so its events come back and
/// another instance runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_run_does_not_hold_its_key_s_waiting_events_for_ever() {
    let broker = broker();
    let (a, b) = (bus(&broker), bus(&broker));
    let (tx, mut rx) = unbounded_channel();
    let for_ever = |seq: u64, _| (seq == 0).then_some(Duration::from_secs(3600));
    let hung = seq_reporter(&a, tx.clone(), for_ever).await;
    emit_seqs(&a, "k", 0..4).await;
    // Instance A now runs event 0 for ever, with 1 to 3 behind it; B joins.
    tokio::time::sleep(Duration::from_millis(50)).await;
    seq_reporter(&b, tx, |_, _| None).await;
    let mut ran = HashSet::new();
    while !(1..4).all(|seq| ran.contains(&seq)) {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(seq)) => {
                ran.insert(seq);
            }
            _ => panic!("events of the hung run's key never ran: ran {ran:?}"),
        }
    }
    hung.shutdown(Duration::from_millis(100)).await;
    b.shutdown(WAIT).await.unwrap();
}

/// Starts an ordered handler (concurrency 4, no prefetch, a 400 ms visibility timeout) whose
/// runs wait `hold(seq, attempt)`, if any, then send their event's `seq` extension on `tx`.
async fn seq_reporter(
    bus: &Bus,
    tx: UnboundedSender<u64>,
    hold: fn(u64, u32) -> Option<Duration>,
) -> evbus::bus::HandlerHandle {
    bus.on("orderPlaced", "g", move |msg: Message| {
        let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
        let (tx, wait) = (tx.clone(), hold(seq, msg.attempt()));
        async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            let _ = tx.send(seq);
            Ok(())
        }
    })
    .ordered_by_key(true)
    .concurrency(4)
    .prefetch(0)
    .visibility_timeout(Duration::from_millis(400))
    .start()
    .await
    .unwrap()
}

/// Emits events `seqs` of partition key `key`, each with its number as extension `seq`.
async fn emit_seqs(bus: &Bus, key: &str, seqs: std::ops::Range<u64>) {
    let emits = seqs.map(|seq| {
        Emit::new("orderPlaced", placed("o-1"))
            .key(key)
            .extension("seq", seq.to_string())
    });
    bus.emit_batch(emits).await.unwrap();
}

/// A second outside review (L1): behind a run that went on past the visibility timeout the
/// waiting events are no longer renewed, so they time out and the broker hands them out
/// again (here to a second instance, which runs them); when the long run ended, its lane
/// still ran those timed-out deliveries too: each event behind it ran twice. A waiting event
/// is now renewed as it starts, and one whose timeout ran out is not run. Event 0 runs 1.5 s
/// on its first attempt under a 400 ms timeout, events 1 to 3 wait behind it: each of them
/// runs once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_timed_out_behind_a_long_run_run_once_not_twice() {
    let broker = broker();
    let (a, b) = (bus(&broker), bus(&broker));
    let (tx, mut rx) = unbounded_channel();
    let long_first =
        |seq: u64, attempt| (seq == 0 && attempt == 1).then_some(Duration::from_millis(1500));
    seq_reporter(&a, tx.clone(), long_first).await;
    emit_seqs(&a, "k", 0..4).await;
    // A takes all four (its in-flight limit); B joins and gets what times out at A.
    tokio::time::sleep(Duration::from_millis(50)).await;
    seq_reporter(&b, tx, long_first).await;
    let mut runs = Vec::new();
    while !(1..4).all(|seq| runs.contains(&seq)) {
        runs.push(recv(&mut rx).await);
    }
    // A's long run ends 1.5 s in; anything run twice is run within a timeout or two of it.
    while let Ok(Some(seq)) = tokio::time::timeout(Duration::from_millis(2000), rx.recv()).await {
        runs.push(seq);
    }
    let later: Vec<u64> = runs.iter().copied().filter(|&seq| seq > 0).collect();
    assert_eq!(later, [1, 2, 3], "runs: {runs:?}");
    a.shutdown(WAIT).await.unwrap();
    b.shutdown(WAIT).await.unwrap();
}

/// A second outside review (L2): an ordered handler took everything its in-flight limit
/// allowed (concurrency + prefetch) into its lanes, so a shutdown nacked events that had
/// never started, counting an attempt for each (with `max_attempts(1)` they were
/// dead-lettered without running). Events fetched ahead of the slots stay with the
/// transport again: of 30 events (distinct keys) under concurrency 2 and prefetch 20, only
/// the two interrupted runs come back with an attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_costs_no_attempt_to_events_an_ordered_handler_never_started() {
    let broker = broker();
    let (a, b) = (bus(&broker), bus(&broker));
    let (tx, mut rx) = unbounded_channel();
    let start = |bus: &Bus, blocks: bool, tx: UnboundedSender<(u64, u32)>| {
        bus.on("orderPlaced", "g", move |msg: Message| {
            let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
            let (tx, attempt) = (tx.clone(), msg.attempt());
            async move {
                if blocks {
                    std::future::pending::<()>().await;
                }
                let _ = tx.send((seq, attempt));
                Ok(())
            }
        })
        .ordered_by_key(true)
        .concurrency(2)
        .prefetch(20)
        .visibility_timeout(Duration::from_secs(30))
        .start()
    };
    let blocked = start(&a, true, tx.clone()).await.unwrap();
    a.emit_batch((0..30).map(|seq| {
        Emit::new("orderPlaced", placed("o-1"))
            .key(format!("k{seq}"))
            .extension("seq", seq.to_string())
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = blocked.shutdown(Duration::from_millis(50)).await;
    assert_eq!(
        report.interrupted, 2,
        "only the two running events were interrupted"
    );
    start(&b, false, tx).await.unwrap();
    let mut attempts = HashMap::new();
    while attempts.len() < 30 {
        let (seq, attempt) = recv(&mut rx).await;
        attempts.insert(seq, attempt);
    }
    let counted = attempts.values().filter(|&&attempt| attempt > 1).count();
    assert_eq!(counted, 2, "attempts: {attempts:?}");
    b.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn an_ordered_handler_retries_in_place_so_later_events_of_the_key_wait() {
    let broker = broker();
    let bus = bus(&broker);
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let seq: u64 = msg.extension("seq").unwrap().parse().unwrap();
        let _ = tx.send((seq, msg.attempt()));
        async move {
            if seq == 1 && msg.attempt() < 3 {
                Err("not yet".into())
            } else {
                Ok(())
            }
        }
    })
    .ordered_by_key(true)
    .start()
    .await
    .unwrap();
    emit_seqs(&bus, "o-1", 0..3).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(recv(&mut rx).await);
    }
    assert_eq!(got, [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1)]);
}

#[tokio::test]
async fn an_ordered_handler_dead_letters_with_the_attempts_made_in_place() {
    let broker = broker();
    let bus = bus(&broker);
    bus.on("orderPlaced", "g", |_msg: Message| async {
        Err("always".into())
    })
    .ordered_by_key(true)
    .max_attempts(3)
    .start()
    .await
    .unwrap();
    let id = bus
        .send(Emit::new("orderPlaced", placed("o-1")).key("o-1"))
        .await
        .unwrap();
    let dead = drain_queue(
        &**bus.transport(),
        &bus.dead_letter_queue_name("orderPlaced", "g"),
        1,
    )
    .await;
    assert_eq!(dead[0].id(), id);
    assert_eq!(dead[0].extension("deadletterattempts"), Some("3"));
    assert_eq!(
        dead[0].extension("deadletterreason"),
        Some("handler failed on attempt 3 of 3: always")
    );
}

/// Starts a handler whose runs take 300 ms, emits one event and returns once its run
/// started; the count of runs finished.
async fn a_run_under_way(bus: &Bus) -> Arc<AtomicUsize> {
    let finished = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = unbounded_channel();
    let f = Arc::clone(&finished);
    bus.on("orderPlaced", "g", move |_msg: Message| {
        let (f, tx) = (Arc::clone(&f), tx.clone());
        async move {
            let _ = tx.send(());
            tokio::time::sleep(Duration::from_millis(300)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .start()
    .await
    .unwrap();
    bus.emit("orderPlaced", placed("o-1")).await.unwrap();
    recv(&mut rx).await;
    finished
}

async fn shutdown_lets_running_handlers_finish_before_closing() {
    let broker = broker();
    let bus = bus(&broker);
    let finished = a_run_under_way(&bus).await;
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the running handler finished first"
    );
}

/// Two `shutdown`s at once (an application's signal handler and its main task, say): the
/// second used to find the handlers already taken by the first, return at once and close
/// the transport under the handler still running, whose ack was then lost (on Redis another
/// instance handled the event again, after it had succeeded). Both now return only once the
/// running handler finished.
async fn a_second_shutdown_under_way_waits_for_the_first() {
    let broker = broker();
    let bus = bus(&broker);
    let finished = a_run_under_way(&bus).await;
    let (first, second) = (bus.clone(), bus.clone());
    let a = tokio::spawn(async move { first.shutdown(Duration::from_secs(5)).await });
    // The second starts once the first has taken the handlers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = tokio::spawn(async move { second.shutdown(Duration::from_secs(5)).await });
    let a_then = Arc::clone(&finished);
    let b_done = b.await.unwrap();
    assert_eq!(
        a_then.load(Ordering::SeqCst),
        1,
        "the second shutdown returned while the handler still ran"
    );
    b_done.unwrap();
    a.await.unwrap().unwrap();
}

/// What a [`reporting`] handler reports of each event it starts.
type Started = (&'static str, Option<String>, u32);

/// A handler of `orderPlaced` in group `g` on `bus` that reports each event it starts as
/// (`name`, subject, attempt), then finishes the run if `finish`, else never.
fn reporting(
    bus: &Bus,
    name: &'static str,
    tx: UnboundedSender<Started>,
    finish: bool,
) -> HandlerBuilder {
    bus.on("orderPlaced", "g", move |msg: Message| {
        let subject = msg.event().subject().map(str::to_owned);
        let _ = tx.send((name, subject, msg.attempt()));
        async move {
            if !finish {
                futures::future::pending::<()>().await;
            }
            Ok(())
        }
    })
}

async fn at_the_deadline_a_still_running_event_is_nacked_to_another_instance() {
    let broker = broker();
    let (a, b) = (bus(&broker), bus(&broker));
    let (tx, mut rx) = unbounded_channel();
    let stuck = reporting(&a, "a", tx.clone(), false).start().await.unwrap();
    a.emit("orderPlaced", placed("o-1")).await.unwrap();
    assert_eq!(recv(&mut rx).await, ("a", None, 1));

    let report = stuck.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.interrupted, 1);
    assert!(!stuck.is_running());
    reporting(&b, "b", tx, true).start().await.unwrap();
    assert_eq!(recv(&mut rx).await, ("b", None, 2));
    expect_nothing(&mut rx).await;
}

/// Ordered: the event running at the deadline and the events of its key waiting behind it
/// (never started) are all given back at once, each counted as delivered once, and another
/// instance handles each of them once.
async fn at_the_deadline_an_ordered_handler_gives_back_the_running_event_and_those_behind_it() {
    let broker = broker();
    let (a, b) = (bus(&broker), bus(&broker));
    let (tx, mut rx) = unbounded_channel();
    let stuck = reporting(&a, "a", tx.clone(), false)
        .ordered_by_key(true)
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let emits = (0..3).map(|i| {
        Emit::new("orderPlaced", placed(&format!("o-{i}")))
            .key("k")
            .subject(format!("s-{i}"))
    });
    a.emit_batch(emits).await.unwrap();
    assert_eq!(recv(&mut rx).await, ("a", Some("s-0".to_owned()), 1));
    // The other two wait behind it in the key's lane: they never start here.
    expect_nothing(&mut rx).await;

    let report = stuck.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.interrupted, 3);
    reporting(&b, "b", tx, true)
        .ordered_by_key(true)
        .start()
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(recv(&mut rx).await);
    }
    // In the key's order: not sorted here.
    assert_eq!(
        got,
        vec![
            ("b", Some("s-0".to_owned()), 2),
            ("b", Some("s-1".to_owned()), 2),
            ("b", Some("s-2".to_owned()), 2),
        ],
        "each given back once, in the key's order, with the delivery counted"
    );
    expect_nothing(&mut rx).await;
}

/// On a multi-threaded runtime a handler that computes for a long time without awaiting
/// must not hold up the next events: they run on the runtime's other workers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_awaits_still_runs_in_parallel_on_a_multi_threaded_runtime() {
    let broker = broker();
    let bus = bus(&broker);
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = unbounded_channel();
    let (r, m) = (Arc::clone(&running), Arc::clone(&most));
    bus.on("orderPlaced", "g", move |_msg: Message| {
        // Busy, without an await: 50 ms of a blocking sleep stands for a computation.
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        r.fetch_sub(1, Ordering::SeqCst);
        let _ = tx.send(());
        async { Ok(()) }
    })
    .concurrency(4)
    .start()
    .await
    .unwrap();
    for i in 0..8 {
        bus.emit("orderPlaced", placed(&format!("o-{i}")))
            .await
            .unwrap();
    }
    for _ in 0..8 {
        recv(&mut rx).await;
    }
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "8 events of a 50 ms handler with concurrency 4 on 2 workers never overlapped"
    );
}

/// A handler of `orderPlaced` in group `g` that records the most tasks alive at the
/// runtime while it ran (after a yield, so that runs overlap) and reports each run.
fn counting_tasks(bus: &Bus) -> (HandlerBuilder, Arc<AtomicUsize>, UnboundedReceiver<()>) {
    let most = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = unbounded_channel();
    let m = Arc::clone(&most);
    let handler = bus.on("orderPlaced", "g", move |_msg: Message| {
        let (m, tx) = (Arc::clone(&m), tx.clone());
        async move {
            tokio::task::yield_now().await;
            m.fetch_max(
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks(),
                Ordering::SeqCst,
            );
            let _ = tx.send(());
            Ok(())
        }
    });
    (handler, most, rx)
}

/// On a multi-threaded runtime unordered events run on a pool of long-lived tasks: under a
/// steady load the pool grows to the handler's concurrency and no further, where one task per
/// event would have made as many tasks as events in flight at the runtime at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_pool_never_outgrows_the_concurrency() {
    let broker = broker();
    let bus = bus(&broker);
    let metrics = tokio::runtime::Handle::current().metrics();
    let (handler, most, mut rx) = counting_tasks(&bus);
    handler.concurrency(4).start().await.unwrap();
    // The worker and whatever the transport runs, before any event.
    let before = metrics.num_alive_tasks();
    for i in 0..300 {
        bus.emit("orderPlaced", placed(&format!("o-{i}")))
            .await
            .unwrap();
    }
    for _ in 0..300 {
        recv(&mut rx).await;
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= before + 4,
        "{most} tasks alive while handling, {before} before the first event: the pool outgrew \
         a concurrency of 4"
    );
}

/// An ordered handler's lanes run on the same pool: with every event of a key of its own
/// (each starts a lane), the pool grows to the most lanes alive at once, which the in-flight
/// limit bounds (concurrency 4, prefetch 2), and no further. A pool task that never counted
/// itself idle again after a lane would leave one task per lane behind, waiting for work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_handler_s_pool_never_outgrows_its_in_flight_limit() {
    let broker = broker();
    let bus = bus(&broker);
    let metrics = tokio::runtime::Handle::current().metrics();
    let (handler, most, mut rx) = counting_tasks(&bus);
    handler
        .concurrency(4)
        .prefetch(2)
        .ordered_by_key(true)
        .start()
        .await
        .unwrap();
    // The worker, its renewer and whatever the transport runs, before any event.
    let before = metrics.num_alive_tasks();
    let emits =
        (0..300).map(|i| Emit::new("orderPlaced", placed(&format!("o-{i}"))).key(format!("k{i}")));
    bus.emit_batch(emits).await.unwrap();
    for _ in 0..300 {
        recv(&mut rx).await;
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= before + 6,
        "{most} tasks alive while handling, {before} before the first event: the pool outgrew \
         the 6 events an ordered handler of concurrency 4 and prefetch 2 holds at once"
    );
    // Every lane was run and removed, and the next events are taken by idle tasks.
    let again =
        (0..20).map(|i| Emit::new("orderPlaced", placed(&format!("p-{i}"))).key(format!("k{i}")));
    bus.emit_batch(again).await.unwrap();
    for _ in 0..20 {
        recv(&mut rx).await;
    }
    assert!(
        metrics.num_alive_tasks() <= before + 6,
        "the pool grew past the in-flight limit on the second batch"
    );
}

/// A delivery whose ack failed (the connection dropped under it) holds one of the
/// subscription's in-flight permits until it is dropped: whatever ran it must let go of it,
/// or the handler stops receiving once every permit is held that way.
async fn deliveries_whose_ack_failed_do_not_stall_the_handler() {
    let broker = broker();
    let faults = Faults::seeded(3).inject(Fault::FailAck(ErrorKind::Connection), 1.0);
    let transport = broker.connect().layer(faults.clone());
    let bus = Bus::builder(Arc::new(transport), catalog())
        .source("/test/shop")
        .retry(fast_retry())
        .build();
    let (tx, mut rx) = unbounded_channel();
    bus.on("orderPlaced", "g", move |msg: Message| {
        let _ = tx.send(msg.event().subject().map(str::to_owned));
        async { Ok(()) }
    })
    .concurrency(2)
    .visibility_timeout(Duration::from_secs(60))
    .start()
    .await
    .unwrap();
    // Two events take both in-flight permits, and their acks fail.
    for i in 0..2 {
        bus.send(Emit::new("orderPlaced", placed(&format!("o-{i}"))).subject(format!("s-{i}")))
            .await
            .unwrap();
    }
    let mut first = vec![recv(&mut rx).await, recv(&mut rx).await];
    first.sort();
    assert_eq!(first, [Some("s-0".to_owned()), Some("s-1".to_owned())]);
    // Healed, the next event still gets in, long before the failed ones come back.
    faults.clear();
    bus.send(Emit::new("orderPlaced", placed("o-2")).subject("s-2"))
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, Some("s-2".to_owned()));
}
