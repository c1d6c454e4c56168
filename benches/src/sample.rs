//! The payload generator, the Rust type every loop decodes into, and the receipt recorder.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The payload sizes measured, in bytes of JSON data.
pub(crate) const SIZES: [usize; 4] = [16, 256, 1024, 16 * 1024];

/// The event type every loop carries.
pub(crate) const EVENT_TYPE: &str = "benchSample";

/// The CloudEvents source of the events the evbus loops build.
pub(crate) const SOURCE: &str = "/evbus/bench";

/// One payload: a sequence number and padding. Serialised as a JSON array
/// (`[seq,"xxxx"]`), so that even the 16-byte size carries a sequence number. The padding is
/// borrowed when decoding: decoding allocates nothing.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Sample<'a>(pub(crate) u64, #[serde(borrow)] pub(crate) &'a str);

/// [`Sample`] owning its padding: what a typed handler (`Bus::on_typed`) is handed. Same JSON,
/// same schema.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct OwnedSample(
    pub(crate) u64,
    #[expect(dead_code, reason = "decoded to be paid for, not looked at")] pub(crate) String,
);

impl evbus::EventType for OwnedSample {
    const TYPE: &'static str = EVENT_TYPE;
}

/// The JSON Schema of [`Sample`], registered for [`EVENT_TYPE`] when the Bus validates.
pub(crate) fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "prefixItems": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "maxLength": 65536}
        ],
        "minItems": 2,
        "maxItems": 2
    })
}

/// Builds samples whose JSON is exactly the requested size.
pub(crate) struct Generator {
    pad: String,
}

impl Generator {
    pub(crate) fn new() -> Self {
        Generator {
            pad: "x".repeat(SIZES[SIZES.len() - 1]),
        }
    }

    /// Sample `seq` whose JSON encoding is exactly `size` bytes.
    pub(crate) fn sample(&self, seq: u64, size: usize) -> Sample<'_> {
        let digits = seq.checked_ilog10().unwrap_or(0) as usize + 1;
        // `[` seq `,"` pad `"]`
        let overhead = digits + 5;
        let pad = size.saturating_sub(overhead);
        Sample(seq, &self.pad[..pad])
    }
}

/// Decodes a payload into [`Sample`], keeps the result alive and returns its sequence number.
/// Every loop, raw or evbus, calls this on the bytes it received.
pub(crate) fn decode(bytes: &[u8]) -> u64 {
    match serde_json::from_slice::<Sample<'_>>(bytes) {
        Ok(sample) => {
            let sample = std::hint::black_box(sample);
            sample.0
        }
        Err(_) => u64::MAX,
    }
}

/// Send and receive instants of one run, by sequence number.
pub(crate) struct Recorder {
    epoch: Instant,
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    count: AtomicUsize,
    done: Notify,
}

impl Recorder {
    pub(crate) fn new(events: usize) -> Arc<Self> {
        Arc::new(Recorder {
            epoch: Instant::now(),
            sent: (0..events).map(|_| AtomicU64::new(0)).collect(),
            received: (0..events).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            done: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// Nanoseconds since the recorder was made (never 0).
    pub(crate) fn elapsed_ns(&self) -> u64 {
        self.now()
    }

    /// Records that `seq` is being sent now.
    pub(crate) fn sent(&self, seq: u64) {
        if let Some(slot) = self.sent.get(seq as usize) {
            slot.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Records the first receipt of `seq` (redeliveries are ignored).
    pub(crate) fn received(&self, seq: u64) {
        self.mark_received(seq, self.now());
    }

    /// Counts the first receipt of `seq` without reading the clock, for the callgrind
    /// scenarios: they read no latency, and their measured region is what evbus does per
    /// event (the clock read and its arithmetic were about 95 instructions of the bench's
    /// own). [`latencies_ns`](Self::latencies_ns) is meaningless after it.
    pub(crate) fn received_untimed(&self, seq: u64) {
        self.mark_received(seq, 1);
    }

    fn mark_received(&self, seq: u64, at: u64) {
        let Some(slot) = self.received.get(seq as usize) else {
            return;
        };
        if slot
            .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.received.len()
        {
            self.done.notify_one();
        }
    }

    /// Whether every event was received.
    pub(crate) fn is_done(&self) -> bool {
        self.count.load(Ordering::Acquire) >= self.received.len()
    }

    /// Events received so far.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until every event was received, for at most `timeout`; whether they all were.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_done() {
            if tokio::time::timeout_at(deadline, self.done.notified())
                .await
                .is_err()
            {
                return self.is_done();
            }
        }
        true
    }

    /// The earliest receive instant (ns since the epoch), 0 if nothing was received.
    pub(crate) fn first_received_ns(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .min()
            .unwrap_or(0)
    }

    /// The latest receive instant (ns since the epoch).
    pub(crate) fn last_received_ns(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// End-to-end latencies (receive − send) in nanoseconds of the events both sent and
    /// received, sorted.
    pub(crate) fn latencies_ns(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .sent
            .iter()
            .zip(&self.received)
            .filter_map(|(s, r)| {
                let (s, r) = (s.load(Ordering::Relaxed), r.load(Ordering::Relaxed));
                (s != 0 && r != 0).then(|| r.saturating_sub(s))
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// Shared nanosecond counter of the time a raw loop spent waiting on its broker.
#[derive(Clone, Default)]
pub(crate) struct BrokerWait(Arc<AtomicU64>);

impl BrokerWait {
    /// Adds the time since `since`.
    pub(crate) fn add(&self, since: Instant) {
        self.0
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    /// Returns and resets the total.
    pub(crate) fn take(&self) -> Duration {
        Duration::from_nanos(self.0.swap(0, Ordering::Relaxed))
    }
}
