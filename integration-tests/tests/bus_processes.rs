//! Several bus instances in separate processes on the real local Redis (DESIGN §3 "Bus"):
//! groups compete inside and share across, failures retry and dead-letter, a SIGKILLed
//! instance loses nothing.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::Duration;

use evbus::Transport;
use evbus_integration_tests::{ORDER, bus};
use support::*;

const EVENTS: u64 = 10_000;
const WITHIN: Duration = Duration::from_secs(90);

async fn connect(url: &str) -> Arc<dyn Transport> {
    Arc::new(
        evbus_redis::RedisTransport::connect_url(url)
            .await
            .expect("Redis is reachable"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_of_group_g_handle_each_event_once_and_group_h_handles_all() {
    let url = redis_url("groups");
    let (tx, rx) = channel();
    let g: Vec<Worker> = (1..=3)
        .map(|i| Worker::start(&format!("g{i}"), &url, "orders", "G", "flaky", &tx))
        .collect();
    let h = Worker::start("h", &url, "orders", "H", "ok", &tx);
    let transport = connect(&url).await;
    let bus = bus(Arc::clone(&transport), "orders");

    let started = std::time::Instant::now();
    let ids = emit_orders(&bus, EVENTS).await;
    let emitted = started.elapsed();
    let all: HashSet<String> = ids.iter().cloned().collect();
    let flaky: HashSet<String> = ids.iter().step_by(100).cloned().collect();
    assert_eq!(flaky.len(), 100);

    let mut g_ok: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    let mut g_fail: HashMap<String, Vec<u32>> = HashMap::new();
    let mut h_ok: HashMap<String, u32> = HashMap::new();
    let rx_ref = &rx;
    tokio::task::block_in_place(|| {
        collect_until(rx_ref, WITHIN, "handling 10,000 events in G and H", |l| {
            match (l.worker.as_str(), l.ok) {
                ("h", true) => *h_ok.entry(l.id.clone()).or_default() += 1,
                (_, true) => g_ok
                    .entry(l.id.clone())
                    .or_default()
                    .push((l.worker.clone(), l.attempt)),
                (_, false) => g_fail.entry(l.id.clone()).or_default().push(l.attempt),
            }
            g_ok.len() as u64 == EVENTS && h_ok.len() as u64 == EVENTS
        })
    });
    let handled = started.elapsed();
    eprintln!("emitted {EVENTS} events in {emitted:?}; G and H handled all by {handled:?}");

    assert_eq!(g_ok.keys().cloned().collect::<HashSet<_>>(), all);
    let twice: Vec<_> = g_ok.iter().filter(|(_, runs)| runs.len() != 1).collect();
    assert!(
        twice.is_empty(),
        "G handled events more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    assert!(h_ok.values().all(|&n| n == 1), "H handled an event twice");
    for worker in ["g1", "g2", "g3"] {
        let n = g_ok.values().filter(|runs| runs[0].0 == worker).count();
        assert!(n > 0, "{worker} handled nothing");
        eprintln!("{worker} handled {n}");
    }
    for id in &flaky {
        let mut fails = g_fail.get(id).cloned().unwrap_or_default();
        fails.sort();
        assert_eq!(fails, [1, 2], "flaky event {id} failed on attempts 1 and 2");
        assert_eq!(g_ok[id][0].1, 3, "flaky event {id} succeeded on attempt 3");
    }
    assert_eq!(g_fail.len(), 100, "only the flaky events failed");

    for w in g {
        w.stop();
    }
    h.stop();
    cleanup(&transport, &bus, "orders", &["G", "H"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_always_failing_handler_dead_letters_with_5_attempts_recorded() {
    let url = redis_url("deadletter");
    let (tx, rx) = channel();
    let worker = Worker::start("f", &url, "orders", "F", "fail", &tx);
    let transport = connect(&url).await;
    let bus = bus(Arc::clone(&transport), "orders");
    let ids = emit_orders(&bus, 3).await;

    let mut attempts: HashMap<String, Vec<u32>> = HashMap::new();
    tokio::task::block_in_place(|| {
        collect_until(&rx, WITHIN, "five attempts of three events", |l| {
            attempts.entry(l.id.clone()).or_default().push(l.attempt);
            attempts.values().map(Vec::len).sum::<usize>() == 15
        })
    });
    for runs in attempts.values_mut() {
        runs.sort();
        assert_eq!(*runs, [1, 2, 3, 4, 5]);
    }
    let dead = bus.dead_letters(ORDER, "F").await.unwrap();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while letters.len() < 3 && std::time::Instant::now() < deadline {
        letters = dead.peek(10, Duration::from_secs(1)).await.unwrap();
    }
    let got: HashSet<_> = letters.iter().map(|l| l.event().id().to_owned()).collect();
    assert_eq!(got, ids.iter().cloned().collect());
    for letter in &letters {
        assert_eq!(letter.attempts(), Some(5));
        assert_eq!(
            letter.reason(),
            Some("handler failed on attempt 5 of 5: failing on purpose")
        );
    }
    worker.stop();
    cleanup(&transport, &bus, "orders", &["F"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_instance_loses_nothing_and_duplicates_stay_within_its_in_flight() {
    let url = redis_url("sigkill");
    let (tx, rx) = channel();
    let mut g: Vec<Worker> = (1..=3)
        .map(|i| Worker::start(&format!("g{i}"), &url, "orders", "G", "ok", &tx))
        .collect();
    let transport = connect(&url).await;
    let bus = bus(Arc::clone(&transport), "orders");
    let emitter = {
        let bus = bus.clone();
        tokio::spawn(async move { emit_orders(&bus, EVENTS).await })
    };

    let mut runs: HashMap<String, u32> = HashMap::new();
    let mut by_victim = 0;
    tokio::task::block_in_place(|| {
        collect_until(&rx, WITHIN, "g1 handling 500 events", |l| {
            *runs.entry(l.id.clone()).or_default() += 1;
            by_victim += usize::from(l.worker == "g1");
            by_victim >= 500
        })
    });
    g[0].kill();
    eprintln!("killed g1 after it handled {by_victim} events");
    let ids = emitter.await.unwrap();
    tokio::task::block_in_place(|| {
        collect_until(&rx, WITHIN, "every event handled after the kill", |l| {
            *runs.entry(l.id.clone()).or_default() += 1;
            runs.len() as u64 == EVENTS
        })
    });
    let all: HashSet<String> = ids.into_iter().collect();
    assert_eq!(
        runs.keys().cloned().collect::<HashSet<_>>(),
        all,
        "nothing was lost"
    );
    let duplicates: u32 = runs.values().map(|n| n - 1).sum();
    eprintln!("duplicates after SIGKILL: {duplicates}");
    assert!(
        duplicates as usize <= evbus::bus::DEFAULT_CONCURRENCY,
        "{duplicates} duplicates; at most the killed instance's {} in-flight events may repeat",
        evbus::bus::DEFAULT_CONCURRENCY
    );
    for w in g.drain(1..) {
        w.stop();
    }
    cleanup(&transport, &bus, "orders", &["G"]).await;
}
