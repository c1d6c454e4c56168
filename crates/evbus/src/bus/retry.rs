//! How a failing handler is retried.

use std::time::Duration;

pub use crate::delivery::LONGEST_BACKOFF;

/// Retry policy of a handler: how many attempts, and how long to wait between them.
///
/// The wait after failed attempt `n` (1-based) is `initial_backoff × multiplier^(n-1)`, capped
/// at `max_backoff`, then reduced by a random fraction of at most `jitter` (so instances that
/// failed together do not retry together): with the defaults 200 ms, 400 ms, 800 ms, 1.6 s,
/// each between 50 % and 100 % of that.
///
/// ```
/// use std::time::Duration;
/// use evbus::bus::RetryPolicy;
///
/// let policy = RetryPolicy::default().jitter(0.0);
/// assert_eq!(policy.max_attempts, 5);
/// assert_eq!(policy.backoff(1), Duration::from_millis(200));
/// assert_eq!(policy.backoff(3), Duration::from_millis(800));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Deliveries of one event before it is dead-lettered (the first included). Default 5.
    pub max_attempts: u32,
    /// Wait after the first failed attempt. Default 200 ms.
    pub initial_backoff: Duration,
    /// Longest wait. Default 30 s; at most [`LONGEST_BACKOFF`] (a year) whatever is set.
    ///
    /// On a transport that delays retries natively (memory, Redis, NATS, SQL) any wait is
    /// kept as a least wait: Redis looks for due retries every `claim_interval` (1 s by
    /// default) and SQL every `poll_interval_ms` (250 ms), so shorter waits come out about
    /// that long there. On one whose delays core emulates by holding the event unacknowledged (Kafka,
    /// RabbitMQ), the hold ends with the handler's visibility timeout (30 s by default): a
    /// longer wait comes back after the visibility timeout, as a redelivery. Keep it under
    /// the visibility timeout there, or raise that.
    pub max_backoff: Duration,
    /// Growth factor of the wait per attempt. Default 2.
    pub multiplier: f64,
    /// Largest fraction (0 to 1) by which a wait is randomly shortened. Default 0.5.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// Sets [`max_attempts`](Self::max_attempts) (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets [`initial_backoff`](Self::initial_backoff).
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// Sets [`max_backoff`](Self::max_backoff).
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Sets [`multiplier`](Self::multiplier) (at least 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }

    /// Sets [`jitter`](Self::jitter) (clamped to 0..=1).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The wait after failed attempt `attempt` (1-based), jitter applied; never over
    /// [`LONGEST_BACKOFF`].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let capped = base
            .min(self.max_backoff.as_secs_f64())
            .min(LONGEST_BACKOFF.as_secs_f64());
        let cut = if self.jitter > 0.0 {
            rand::random::<f64>() * self.jitter
        } else {
            0.0
        };
        // NaN (an infinite base times a zero initial backoff) is no wait.
        Duration::try_from_secs_f64((capped * (1.0 - cut)).max(0.0)).unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let p = RetryPolicy::default()
            .jitter(0.0)
            .max_backoff(Duration::from_secs(1));
        let waits: Vec<_> = (1..=5).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000]);
    }

    /// `Duration::from_secs_f64` panicked past `Duration::MAX`: with `max_backoff(Duration::MAX)`
    /// and a multiplier of 10 at attempt 21, or an initial backoff of `Duration::MAX`, and the
    /// panic killed the handler's worker (found by an outsider review).
    #[test]
    fn backoff_never_panics_and_never_exceeds_a_year() {
        for policy in [
            RetryPolicy::default()
                .multiplier(10.0)
                .max_backoff(Duration::MAX),
            RetryPolicy::default()
                .initial_backoff(Duration::MAX)
                .max_backoff(Duration::MAX),
            RetryPolicy::default()
                .initial_backoff(Duration::ZERO)
                .multiplier(f64::MAX)
                .max_backoff(Duration::MAX),
        ] {
            for attempt in [1, 2, 21, 64, u32::MAX] {
                let wait = policy.clone().jitter(0.0).backoff(attempt);
                assert!(wait <= LONGEST_BACKOFF, "{wait:?}");
                assert!(policy.backoff(attempt) <= LONGEST_BACKOFF);
            }
        }
        let huge = RetryPolicy::default()
            .initial_backoff(Duration::MAX)
            .jitter(0.0);
        assert_eq!(
            huge.clone().max_backoff(Duration::MAX).backoff(1),
            LONGEST_BACKOFF
        );
        assert_eq!(huge.backoff(1), Duration::from_secs(30));
    }

    #[test]
    fn jitter_only_shortens_the_wait_by_at_most_its_fraction() {
        let p = RetryPolicy::default().jitter(0.5);
        for _ in 0..200 {
            let d = p.backoff(2);
            assert!(
                d <= Duration::from_millis(400) && d >= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }
}
