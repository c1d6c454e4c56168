//! When a subscription's stream was last read: a transport renews what it fetched ahead of
//! its consumer only while the consumer reads (ADR 0037).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a subscription's stream was last polled, for a transport that renews the deliveries
/// it fetched ahead and has not handed out: it renews them while the stream was read within
/// the visibility timeout, and stops once it was not (its holder hung, or stopped reading
/// without dropping the subscription), so a stuck consumer does not hold events for ever.
/// Mark it in the stream's `poll_next`; ask [`read_within`](Self::read_within) before each
/// renewal. Millisecond resolution; shared between the stream and a renewal task.
///
/// ```
/// use std::time::Duration;
///
/// let clock = evbus::raw::ReadClock::new();
/// assert!(clock.read_within(Duration::from_secs(1)));
/// clock.mark();
/// assert!(clock.read_within(Duration::from_secs(1)));
/// ```
#[derive(Debug)]
pub struct ReadClock {
    origin: Instant,
    /// The last read, in ms since `origin`.
    read: AtomicU64,
}

impl ReadClock {
    /// A clock that counts as read now (the consumer is about to read).
    pub fn new() -> Self {
        ReadClock {
            origin: Instant::now(),
            read: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes that the stream is being polled now.
    pub fn mark(&self) {
        self.read.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether the stream was polled less than `window` ago.
    pub fn read_within(&self, window: Duration) -> bool {
        let since = self
            .now_ms()
            .saturating_sub(self.read.load(Ordering::Relaxed));
        Duration::from_millis(since) < window
    }
}

impl Default for ReadClock {
    fn default() -> Self {
        ReadClock::new()
    }
}
