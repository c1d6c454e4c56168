//! What every connection-owning adapter needs for its lifecycle: a close gate (new operations
//! refused after close, close waits for those in progress, subscriptions end) and a reconnect
//! backoff. Written once here so adapters do not each keep an in-flight counter and a
//! jittered-doubling loop of their own.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::error::{Error, Result};

/// The close gate of a transport.
///
/// - [`enter`](Self::enter) registers an operation (a publish, a settlement), or fails with
///   [`ErrorKind::Closed`](crate::ErrorKind::Closed) once closing started;
/// - [`close`](Self::close) refuses new operations, fires [`closed`](Self::closed) (pass it to
///   [`Source::into_subscription`](super::Source::into_subscription) so subscriptions end), and
///   waits for the operations in progress; it returns `true` only for the first caller, so the
///   adapter releases its connection once and a second close is a no-op.
///
/// ```
/// # async fn demo() {
/// let gate = evbus::raw::Gate::new("the example transport");
/// let op = gate.enter().expect("open");
/// drop(op);
/// assert!(gate.close().await);
/// assert!(!gate.close().await);
/// assert_eq!(gate.enter().unwrap_err().kind(), evbus::ErrorKind::Closed);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Gate {
    what: &'static str,
    closed: CancellationToken,
    operations: TaskTracker,
    first: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the first closer's [`close_once`](Gate::close_once) guard is dropped.
    finished: CancellationToken,
}

impl Gate {
    /// A new, open gate; `what` names the transport in errors ("the NATS transport").
    pub fn new(what: &'static str) -> Self {
        Gate {
            what,
            closed: CancellationToken::new(),
            operations: TaskTracker::new(),
            first: Default::default(),
            finished: CancellationToken::new(),
        }
    }

    /// Registers an operation; close waits until the returned token is dropped.
    pub fn enter(&self) -> Result<TaskTrackerToken> {
        // Taken before looking at the flag: a close that starts now waits for it.
        let token = self.operations.token();
        if self.closed.is_cancelled() {
            return Err(Error::closed(self.what).with_hint("open a new connection"));
        }
        Ok(token)
    }

    /// Whether closing started.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Completes once closing started.
    pub fn closed(&self) -> WaitForCancellationFutureOwned {
        self.closed.clone().cancelled_owned()
    }

    /// A child token cancelled with the gate (for a consumer task's own stop signal).
    pub fn child_token(&self) -> CancellationToken {
        self.closed.child_token()
    }

    /// Refuses new operations, ends subscriptions, and waits for the operations in progress.
    /// `true` for the first call only.
    pub async fn close(&self) -> bool {
        self.closed.cancel();
        self.operations.close();
        self.operations.wait().await;
        !self.first.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// [`close`](Self::close) for a transport's own `close`: the first caller gets a guard
    /// and finishes closing (ends subscriptions, releases the connection) while it holds it;
    /// every other caller, at the same time or later, waits until that guard is dropped and
    /// gets `None`. No caller's close then returns before the transport is closed, and a
    /// process that exits when its own close returns leaves nothing behind.
    ///
    /// ```
    /// # async fn demo() {
    /// let gate = evbus::raw::Gate::new("the example transport");
    /// let first = gate.close_once().await.expect("the first close");
    /// let other = gate.clone();
    /// let second = tokio::spawn(async move { other.close_once().await.is_none() });
    /// // ... the first closer releases the connection, then:
    /// drop(first);
    /// assert!(second.await.unwrap());
    /// # }
    /// ```
    pub async fn close_once(&self) -> Option<DropGuard> {
        if self.close().await {
            Some(self.finished.clone().drop_guard())
        } else {
            self.finished.cancelled().await;
            None
        }
    }
}

/// Reconnect delays: doubling from `min` up to `max`, each drawn uniformly between the
/// previous floor and the ceiling (jitter), back to `min` after [`reset`](Self::reset).
///
/// ```
/// use std::time::Duration;
/// let mut backoff = evbus::raw::Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
/// for _ in 0..20 {
///     let d = backoff.next_delay();
///     assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(100));
/// }
/// backoff.reset();
/// assert!(backoff.next_delay() <= Duration::from_millis(10));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays between `min` and `max` (`max` below `min` counts as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.min.saturating_mul(factor).min(self.max).max(self.min);
        let floor = self.min.min(ceiling);
        let spread = u64::try_from(ceiling.saturating_sub(floor).as_millis()).unwrap_or(u64::MAX);
        floor + Duration::from_millis(rand::rng().random_range(0..=spread))
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_close_waits_until_the_first_close_has_finished() {
        let gate = Gate::new("the test transport");
        let first = gate.close_once().await.expect("the first close");
        let other = gate.clone();
        let mut second = tokio::spawn(async move { other.close_once().await.is_none() });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut second)
                .await
                .is_err(),
            "a second close returned while the first was still closing"
        );
        drop(first);
        assert!(second.await.unwrap());
        // Once closed, a close returns at once.
        assert!(gate.close_once().await.is_none());
    }
}
