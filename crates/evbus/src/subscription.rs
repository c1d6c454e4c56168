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
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::Semaphore;

use crate::delivery::{Delivery, DeliveryPolicy, RawDelivery};
use crate::error::Result;
use crate::transport::{ConsumerOptions, Queue};

/// A stream of deliveries for one consumer. Dropping it detaches the consumer; its unsettled
/// deliveries are redelivered after their visibility timeout.
pub struct Subscription {
    inner: BoxStream<'static, Result<Delivery>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
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
        let state = (raw.boxed(), limit, policy);
        let inner = futures::stream::unfold(state, |(mut raw, limit, policy)| async move {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                return None;
            };
            loop {
                match raw.next().await {
                    None => return None,
                    Some(Err(e)) => return Some((Err(e), (raw, limit, policy))),
                    Some(Ok(d)) if d.attempt > policy.max_attempts => {
                        let attempts = d.attempt;
                        let delivery = Delivery::new(d, policy.clone(), None);
                        let reason = format!(
                            "max attempts exceeded ({attempts} deliveries, {} allowed)",
                            policy.max_attempts
                        );
                        if let Err(e) = delivery.dead_letter(&reason).await {
                            tracing::warn!(
                                error = %e,
                                event = delivery.event().id(),
                                "could not dead-letter an over-delivered event; it stays pending and is retried after the visibility timeout"
                            );
                        }
                    }
                    Some(Ok(d)) => {
                        let delivery = Delivery::new(d, policy.clone(), Some(permit));
                        return Some((Ok(delivery), (raw, limit, policy)));
                    }
                }
            }
        });
        Subscription {
            inner: inner.boxed(),
        }
    }

    /// Ends the stream as soon as `signal` completes (the adapter's close signal), even while
    /// the consumer holds every in-flight slot and the stream is waiting for one to free up.
    /// Adapters call this with their transport's close signal so that
    /// [`Transport::close`](crate::Transport::close) ends every subscription promptly.
    pub fn until(self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        Subscription {
            inner: self.inner.take_until(signal).boxed(),
        }
    }

    /// The next delivery, or `None` once the subscription ended (closed transport).
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        self.inner.next().await
    }

    /// Detaches the consumer. Equivalent to dropping the subscription.
    pub fn close(self) {}
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
