//! Worker processes and the Redis under test.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use evbus::Transport;
use evbus::bus::{Bus, Emit};
use evbus_integration_tests::ORDER;

/// The Redis of the development machine and CI (`EVBUS_REDIS_URL`), with a key prefix
/// unique to this test so runs never see each other's streams.
pub fn redis_url(test: &str) -> String {
    let base =
        std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    format!(
        "{base}?prefix=evbus-it-{test}-{}:",
        uuid::Uuid::now_v7().simple()
    )
}

/// One line a worker printed: `(worker, kind, event id, attempt)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub worker: String,
    pub ok: bool,
    pub id: String,
    pub attempt: u32,
}

/// A `bus-worker` process; SIGKILLed on drop if still running.
pub struct Worker {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Worker {
    /// Starts a worker and waits until it is subscribed.
    pub fn start(
        name: &str,
        url: &str,
        topic: &str,
        group: &str,
        mode: &str,
        lines: &Sender<Line>,
    ) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bus-worker"))
            .args([url, topic, group, mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bus-worker");
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = channel();
        let tx = lines.clone();
        let worker = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "ready" {
                    let _ = ready_tx.send(());
                    continue;
                }
                let parts: Vec<&str> = line.split(' ').collect();
                if let [kind, id, attempt] = parts.as_slice() {
                    let _ = tx.send(Line {
                        worker: worker.clone(),
                        ok: *kind == "ok",
                        id: (*id).to_owned(),
                        attempt: attempt.parse().unwrap_or(0),
                    });
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("worker {name} did not get ready within 30 s"));
        Worker {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
        }
    }

    /// SIGKILL: no chance to settle anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Graceful stop: closes stdin, waits for the exit.
    pub fn stop(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Feeds every line to `step` until it returns `true` (done), failing after `within`.
pub fn collect_until(
    rx: &Receiver<Line>,
    within: Duration,
    what: &str,
    mut step: impl FnMut(&Line) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if step(&line) {
                    return;
                }
            }
            Err(_) => panic!("{what}: not done within {within:?}"),
        }
    }
}

/// Emits `n` orders (every 100th flaky) in batches; returns their ids.
pub async fn emit_orders(bus: &Bus, n: u64) -> Vec<String> {
    let mut ids = Vec::with_capacity(n as usize);
    let mut seq = 0;
    while seq < n {
        let end = (seq + 500).min(n);
        let batch = (seq..end).map(|i| {
            Emit::new(ORDER, serde_json::json!({"seq": i, "flaky": i % 100 == 0}))
                .key(format!("k{}", i % 64))
        });
        ids.extend(bus.emit_batch(batch).await.expect("emit a batch"));
        seq = end;
    }
    ids
}

/// Deletes the topic and the queues of `groups`.
pub async fn cleanup(transport: &Arc<dyn Transport>, bus: &Bus, topic: &str, groups: &[&str]) {
    transport.delete_topic(topic).await.unwrap();
    for g in groups {
        transport
            .delete_queue(&bus.dead_letter_queue_name(ORDER, g))
            .await
            .unwrap();
        transport
            .delete_queue(&bus.redrive_queue_name(ORDER, g))
            .await
            .unwrap();
    }
}
