//! Cheap checks for hot loops: a future polled only after it woke ([`Gated`], [`Signal`]),
//! and an in-flight limit without locks ([`Limit`]).
//!
//! Polling a `CancellationToken`'s future or a `Notify` waiter takes a lock each time, even
//! when nothing happened. A [`Gated`] future is polled only after it woke its waker (or on
//! the first poll), so checking it on every delivery costs two atomic operations.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use futures::future::BoxFuture;
use futures::task::{ArcWake, AtomicWaker, waker_ref};

/// A boxed future polled only when it may have made progress.
pub(crate) struct Gated<T> {
    future: BoxFuture<'static, T>,
    wake: Arc<Flag>,
    /// The waker registered last (until a wake-up takes it): polled again from the same
    /// task with nothing woken, the check is two loads.
    registered: Option<Waker>,
}

/// The waker given to a gated future: marks it woken and wakes whoever polled last.
struct Flag {
    woken: AtomicBool,
    waker: AtomicWaker,
}

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.woken.store(true, Ordering::Release);
        arc_self.waker.wake();
    }
}

impl<T> Gated<T> {
    pub(crate) fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Gated {
            future: Box::pin(future),
            wake: Arc::new(Flag {
                // Polled on the first poll: the future has never run.
                woken: AtomicBool::new(true),
                waker: AtomicWaker::new(),
            }),
            registered: None,
        }
    }

    /// Polls the future if it woke since its last poll; `cx`'s task is woken when it does.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        // Not woken, and the task's waker is still the registered one (a wake-up sets the
        // flag before it takes the waker): nothing to do.
        if !self.wake.woken.load(Ordering::Acquire)
            && self
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        // Registered before the flag is read: a wake-up after the read reaches this task.
        self.wake.waker.register(cx.waker());
        if self
            .registered
            .as_ref()
            .is_none_or(|w| !w.will_wake(cx.waker()))
        {
            self.registered = Some(cx.waker().clone());
        }
        if !self.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(&self.wake);
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }

    /// Polls the future only if it woke since its last poll, without registering `cx`'s
    /// task: for a caller about to return `Ready` anyway, which will call [`poll`](Self::poll)
    /// before it returns `Pending`. Costs one atomic load when nothing woke.
    pub(crate) fn poll_if_woken(&mut self) -> Poll<T> {
        if !self.wake.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // The wake-up took the registered waker: the next `poll` must register again.
        self.registered = None;
        self.wake.woken.store(false, Ordering::Release);
        let waker = waker_ref(&self.wake);
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }

    fn into_future(self) -> BoxFuture<'static, T> {
        self.future
    }
}

/// A one-shot signal (a close or cancel future), checked on every poll of a hot loop.
pub(crate) struct Signal {
    /// `None` once it completed.
    gated: Option<Gated<()>>,
}

impl Signal {
    pub(crate) fn new(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Signal {
            gated: Some(Gated::new(future)),
        }
    }

    /// Whether the signal completed. If not, `cx`'s task is woken when it may have.
    pub(crate) fn poll_fired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(gated) = self.gated.as_mut() else {
            return true;
        };
        if gated.poll(cx).is_ready() {
            self.gated = None;
            return true;
        }
        false
    }

    /// Whether the signal completed, looking only if it woke since the last look; `cx`'s task
    /// is not registered. Callers returning `Pending` call [`poll_fired`](Self::poll_fired)
    /// first (a hot loop checks this one on every item it returns).
    pub(crate) fn fired_if_woken(&mut self) -> bool {
        let Some(gated) = self.gated.as_mut() else {
            return true;
        };
        if gated.poll_if_woken().is_ready() {
            self.gated = None;
            return true;
        }
        false
    }

    /// The signal's future (already complete if the signal fired).
    pub(crate) fn into_future(self) -> BoxFuture<'static, ()> {
        match self.gated {
            Some(gated) => gated.into_future(),
            None => Box::pin(std::future::ready(())),
        }
    }
}

/// An in-flight limit with a single taker (one consumer's stream) and any number of
/// returners (its deliveries, settled on any task): a counter and one waker, no lock.
pub(crate) struct Limit {
    available: AtomicUsize,
    waker: AtomicWaker,
}

impl Limit {
    pub(crate) fn new(permits: usize) -> Self {
        Limit {
            available: AtomicUsize::new(permits),
            waker: AtomicWaker::new(),
        }
    }

    /// Takes one permit, or registers `cx`'s task to be woken when one is given back. Only
    /// one task may take (permits are never taken concurrently).
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.try_take() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Again: a permit given back before the registration did not wake this task.
        if self.try_take() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn try_take(&self) -> bool {
        // The only taker: a positive count cannot drop to zero under us.
        if self.available.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.available.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Gives one permit back.
    pub(crate) fn give_back(&self) {
        // Only a taker that found none can be waiting.
        if self.available.fetch_add(1, Ordering::AcqRel) == 0 {
            self.waker.wake();
        }
    }

    /// [`poll_take`](Self::poll_take), with the permit as a guard that gives it back when
    /// dropped (on whichever task that is).
    pub(crate) fn poll_take_owned(self: &Arc<Self>, cx: &mut Context<'_>) -> Poll<LimitPermit> {
        self.poll_take(cx).map(|()| LimitPermit(Arc::clone(self)))
    }
}

/// One permit of a [`Limit`], given back when dropped.
pub(crate) struct LimitPermit(Arc<Limit>);

impl Drop for LimitPermit {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_fires_once_its_future_completes_and_wakes_the_checker() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut signal = Signal::new(async move {
            let _ = rx.await;
        });
        let checker = tokio::spawn(async move {
            std::future::poll_fn(|cx| {
                if signal.poll_fired(cx) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            // Stays fired.
            std::future::poll_fn(|cx| Poll::Ready(signal.poll_fired(cx))).await
        });
        tokio::task::yield_now().await;
        assert!(!checker.is_finished());
        tx.send(()).unwrap();
        assert!(checker.await.unwrap());
    }

    #[tokio::test]
    async fn a_limit_hands_out_its_permits_and_wakes_the_taker_when_one_comes_back() {
        let limit = Arc::new(Limit::new(2));
        let take = |limit: &Arc<Limit>| {
            let limit = Arc::clone(limit);
            async move { std::future::poll_fn(|cx| limit.poll_take(cx)).await }
        };
        take(&limit).await;
        take(&limit).await;
        let third = tokio::spawn(take(&limit));
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        limit.give_back();
        third.await.unwrap();
        assert_eq!(limit.available.load(Ordering::Acquire), 0);
    }
}
