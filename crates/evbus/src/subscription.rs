//! A consumer's stream of [`Delivery`]s.
//!
//! Adapters produce a stream of [`RawDelivery`]s and wrap it with [`Subscription::new`]; core
//! then enforces, identically for every adapter:
//!
//! - the in-flight limit: the stream yields nothing more while
//!   [`ConsumerOptions::max_in_flight`] deliveries are unsettled;
//! - max attempts: a delivery whose attempt number exceeds
//!   [`ConsumerOptions::max_attempts`] (its previous consumer vanished on the last attempt) is
//!   dead-lettered without reaching the consumer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

use crate::delivery::{Delivery, DeliveryPolicy, RawDelivery};
use crate::error::Result;
use crate::transport::{ConsumerOptions, Queue};

/// A stream of deliveries for one consumer. Dropping it detaches the consumer; its unsettled
/// deliveries are redelivered after their visibility timeout.
pub struct Subscription {
    inner: Limited,
    /// The close signal given to [`until`](Self::until): the stream ends once it completes.
    stop: Option<BoxFuture<'static, ()>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// The adapter's raw stream behind the in-flight limit and the max-attempts rule.
struct Limited {
    raw: BoxStream<'static, Result<RawDelivery>>,
    limit: PollSemaphore,
    /// A permit taken for the next delivery, kept while the raw stream has nothing.
    permit: Option<OwnedSemaphorePermit>,
    policy: DeliveryPolicy,
    /// An over-delivered event being dead-lettered before the stream goes on.
    dead_lettering: Option<BoxFuture<'static, ()>>,
    done: bool,
}

impl Limited {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(pending) = self.dead_lettering.as_mut() {
                ready!(pending.as_mut().poll(cx));
                self.dead_lettering = None;
            }
            let permit = match self.permit.take() {
                Some(permit) => permit,
                None => match ready!(self.limit.poll_acquire(cx)) {
                    Some(permit) => permit,
                    None => {
                        self.done = true;
                        return Poll::Ready(None);
                    }
                },
            };
            let raw = match self.raw.poll_next_unpin(cx) {
                Poll::Pending => {
                    self.permit = Some(permit);
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.permit = Some(permit);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(raw))) => raw,
            };
            if raw.attempt > self.policy.max_attempts {
                // Its previous consumer vanished on the last attempt: dead-letter it without
                // handing it out, then go on with the next one.
                self.permit = Some(permit);
                self.dead_lettering = Some(Box::pin(dead_letter_over_delivered(
                    raw,
                    self.policy.clone(),
                )));
                continue;
            }
            return Poll::Ready(Some(Ok(Delivery::new(
                raw,
                self.policy.clone(),
                Some(permit),
            ))));
        }
    }
}

async fn dead_letter_over_delivered(raw: RawDelivery, policy: DeliveryPolicy) {
    let attempts = raw.attempt;
    let max = policy.max_attempts;
    let delivery = Delivery::new(raw, policy, None);
    let reason = format!("max attempts exceeded ({attempts} deliveries, {max} allowed)");
    if let Err(e) = delivery.dead_letter(&reason).await {
        tracing::warn!(
            error = %e,
            event = delivery.event().id(),
            "could not dead-letter an over-delivered event; it stays pending and is retried after the visibility timeout"
        );
    }
}

impl Subscription {
    /// Wraps an adapter's raw stream. `dead_letter` is the queue that receives dead-lettered
    /// events; `origin` names the source in dead-letter records (`topic/subscription`, or the
    /// queue name).
    pub fn new<S>(
        raw: S,
        options: &ConsumerOptions,
        dead_letter: Arc<dyn Queue>,
        origin: impl Into<Arc<str>>,
    ) -> Self
    where
        S: Stream<Item = Result<RawDelivery>> + Send + 'static,
    {
        let policy = DeliveryPolicy {
            max_attempts: options.max_attempts.max(1),
            dead_letter,
            origin: origin.into(),
        };
        let limit = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
        Subscription {
            inner: Limited {
                raw: raw.boxed(),
                limit: PollSemaphore::new(limit),
                permit: None,
                policy,
                dead_lettering: None,
                done: false,
            },
            stop: None,
        }
    }

    /// Ends the stream as soon as `signal` completes (the adapter's close signal), even while
    /// the consumer holds every in-flight slot and the stream is waiting for one to free up.
    /// Adapters call this with their transport's close signal so that
    /// [`Transport::close`](crate::Transport::close) ends every subscription promptly.
    pub fn until(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let signal = Box::pin(signal);
        self.stop = Some(match self.stop.take() {
            None => signal,
            Some(earlier) => Box::pin(async move {
                futures::future::select(earlier, signal).await;
            }),
        });
        self
    }

    /// The next delivery, or `None` once the subscription ended (closed transport).
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        self.next().await
    }

    /// Detaches the consumer. Equivalent to dropping the subscription.
    pub fn close(self) {}
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(stop) = this.stop.as_mut() {
            if stop.as_mut().poll(cx).is_ready() {
                // Closed: the stream ends for good.
                this.inner.done = true;
                this.stop = None;
            }
        }
        this.inner.poll_next(cx)
    }
}
