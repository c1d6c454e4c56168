//! A consumer's stream of [`Delivery`]s.
//!
//! Adapters produce a stream of [`RawDelivery`]s and wrap it with
//! [`raw::Source::into_subscription`](crate::raw::Source::into_subscription); core then
//! enforces, identically for every adapter:
//!
//! - the in-flight limit: the stream yields nothing more while
//!   [`ConsumerOptions::max_in_flight`] deliveries are unsettled;
//! - max attempts: a delivery whose attempt number exceeds
//!   [`ConsumerOptions::max_attempts`] (its previous consumer vanished on the last attempt) is
//!   dead-lettered without reaching the consumer;
//! - undecodable messages: a [`RawDelivery::undecodable`] is dead-lettered as a placeholder
//!   record and acknowledged, never handed out, so it cannot block the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};

use crate::delivery::{Acker, Delivery, DeliveryPolicy, Payload, RawDelivery, Undecodable};
use crate::error::Result;
use crate::signal::{Limit, Signal};
use crate::transport::{ConsumerOptions, Queue};

/// A stream of deliveries for one consumer. Dropping it detaches the consumer; its unsettled
/// deliveries are redelivered after their visibility timeout.
pub struct Subscription {
    inner: Limited,
    /// The close signal given to [`until`](Self::until): the stream ends once it completes.
    stop: Option<Signal>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// The adapter's raw stream behind the in-flight limit and the max-attempts rule.
struct Limited {
    raw: BoxStream<'static, Result<RawDelivery>>,
    /// The in-flight limit: each delivery gives its permit back once, when settled or
    /// dropped (see [`Delivery`]).
    limit: Arc<Limit>,
    /// Whether a permit is held for the next delivery, kept while the raw stream has
    /// nothing.
    permit: bool,
    policy: Arc<DeliveryPolicy>,
    /// An over-delivered event being dead-lettered before the stream goes on.
    dead_lettering: Option<BoxFuture<'static, ()>>,
    /// Told of each message this stream dead-letters itself (undecodable, over-delivered).
    on_dead_letter: Option<DeadLetterHook>,
    /// Hands undecodable messages out as placeholders instead of dead-lettering them
    /// ([`ConsumerOptions`]' `inspect`).
    inspect: bool,
    done: bool,
}

/// Called with a dead-lettered record and its reason, once it is stored.
pub(crate) type DeadLetterHook = Arc<dyn Fn(&crate::Event, &str) + Send + Sync>;

/// Calls `hook`, if any; a panic in it is logged, not propagated: a dead letter is stored and
/// settled by then, and the hook must not take the stream (or a handler's task) with it.
pub(crate) fn tell(hook: Option<&DeadLetterHook>, event: &crate::Event, reason: &str) {
    if let Some(hook) = hook
        && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(event, reason))).is_err()
    {
        tracing::error!(event = event.id(), "the on_dead_letter hook panicked");
    }
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
            if !self.permit {
                ready!(self.limit.poll_take(cx));
                self.permit = true;
            }
            let raw = match self.raw.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(raw))) => raw,
            };
            let (payload, attempt, acker, tag) = raw.into_parts();
            let event = match payload {
                Payload::Event(event) => event,
                Payload::Undecodable(message) if self.inspect => match inspected(&message) {
                    Ok(placeholder) => placeholder,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                Payload::Undecodable(message) => {
                    // Not a CloudEvent: moved aside, never handed out (the permit is kept).
                    self.dead_lettering = Some(Box::pin(dead_letter_undecodable(
                        message,
                        attempt,
                        acker,
                        tag,
                        Arc::clone(&self.policy),
                        self.on_dead_letter.clone(),
                    )));
                    continue;
                }
            };
            if attempt > self.policy.max_attempts {
                // Its previous consumer vanished on the last attempt: dead-letter it without
                // handing it out, then go on with the next one (the permit is kept).
                self.dead_lettering = Some(Box::pin(dead_letter_over_delivered(
                    Delivery::new(event, attempt, acker, tag, Arc::clone(&self.policy), None),
                    self.on_dead_letter.clone(),
                )));
                continue;
            }
            // The permit goes with the delivery.
            self.permit = false;
            return Poll::Ready(Some(Ok(Delivery::new(
                event,
                attempt,
                acker,
                tag,
                Arc::clone(&self.policy),
                Some(Arc::clone(&self.limit)),
            ))));
        }
    }
}

/// The placeholder of a message that is not a CloudEvent, as a look at a dead-letter queue
/// lists it: with the reason a dead letter carries.
fn inspected(message: &Undecodable) -> Result<crate::Event> {
    // No `time`: the message has none of its own, and the look's would change at every look.
    let mut placeholder = message.placeholder()?.into_builder().time(None).build()?;
    placeholder.set_extension(
        crate::delivery::DEAD_LETTER_REASON,
        format!(
            "not a CloudEvent (written to this queue by something else): {}",
            message.error().message()
        ),
    )?;
    Ok(placeholder)
}

async fn dead_letter_over_delivered(delivery: Delivery, hook: Option<DeadLetterHook>) {
    let attempts = delivery.attempt();
    let max = delivery.max_attempts();
    let reason = format!("max attempts exceeded ({attempts} deliveries, {max} allowed)");
    match delivery.dead_letter(&reason).await {
        Ok(()) => tell(hook.as_ref(), delivery.event(), &reason),
        Err(e) => tracing::warn!(
            error = %e,
            event = delivery.event().id(),
            "could not dead-letter an over-delivered event; it stays pending and is retried after the visibility timeout"
        ),
    }
}

/// Sends the placeholder of an undecodable message to the dead-letter queue, then acknowledges
/// the message. If either step fails the message stays unacknowledged on the broker and comes
/// back after the visibility timeout: nothing is lost.
async fn dead_letter_undecodable(
    message: Box<Undecodable>,
    attempt: u32,
    acker: Arc<dyn Acker>,
    tag: u64,
    policy: Arc<DeliveryPolicy>,
    hook: Option<DeadLetterHook>,
) {
    let reason = format!("undecodable message: {}", message.error().message());
    tracing::warn!(
        origin = %policy.origin,
        %reason,
        dead_letter_queue = policy.dead_letter.name(),
        "dead-lettering a message that is not a CloudEvent"
    );
    let sent = message
        .dead_letter_to(
            &*policy.dead_letter,
            &reason,
            attempt.max(1),
            &policy.origin,
        )
        .await;
    let record = match sent {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(error = %e, origin = %policy.origin, "could not dead-letter an undecodable message; it stays unacknowledged and comes back after the visibility timeout");
            return;
        }
    };
    tell(hook.as_ref(), &record, &reason);
    if let Err(e) = acker.ack(tag).await {
        tracing::warn!(error = %e, message = record.id(), "could not acknowledge a dead-lettered undecodable message; it may be dead-lettered again");
    }
}

impl Subscription {
    /// Wraps an adapter's raw stream. `dead_letter` is the queue that receives dead-lettered
    /// events; `origin` names the source in dead-letter records (`topic/subscription`, or the
    /// queue name). Adapters go through
    /// [`raw::Source::into_subscription`](crate::raw::Source::into_subscription).
    pub(crate) fn new<S>(
        raw: S,
        options: &ConsumerOptions,
        dead_letter: Arc<dyn Queue>,
        origin: impl Into<Arc<str>>,
    ) -> Self
    where
        S: Stream<Item = Result<RawDelivery>> + Send + 'static,
    {
        let policy = Arc::new(DeliveryPolicy {
            max_attempts: options.max_attempts.max(1),
            visibility_timeout: options.visibility_timeout,
            dead_letter,
            origin: origin.into(),
        });
        Subscription {
            inner: Limited {
                raw: raw.boxed(),
                limit: Arc::new(Limit::new(options.max_in_flight.max(1))),
                permit: false,
                policy,
                dead_lettering: None,
                on_dead_letter: None,
                inspect: options.inspect,
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
            None => Signal::new(signal),
            Some(earlier) => {
                let earlier = earlier.into_future();
                Signal::new(async move {
                    futures::future::select(earlier, signal).await;
                })
            }
        });
        self
    }

    /// For transport layers: replaces the adapter's raw stream with `f(raw)`, keeping
    /// everything else (in-flight limit, max attempts, dead-letter queue, origin, close
    /// signal). A layer sees [`RawDelivery`]s, not finished deliveries, so it never re-wraps
    /// them and two layers never both dead-letter. See [`layer`](crate::layer).
    pub fn map_raw<S>(mut self, f: impl FnOnce(crate::raw::RawStream) -> S) -> Self
    where
        S: Stream<Item = Result<RawDelivery>> + Send + 'static,
    {
        let raw = std::mem::replace(&mut self.inner.raw, futures::stream::empty().boxed());
        self.inner.raw = f(raw).boxed();
        self
    }

    /// Calls `hook` with each message this subscription dead-letters by itself (one that is
    /// not a CloudEvent, or one delivered more than `max_attempts` times), and the reason,
    /// once the record is stored. The Bus passes its handler's
    /// [`on_dead_letter`](crate::bus::HandlerBuilder::on_dead_letter) hook here.
    pub(crate) fn on_dead_letter(mut self, hook: DeadLetterHook) -> Self {
        self.inner.on_dead_letter = Some(hook);
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
        // While deliveries flow, the close signal is looked at only if it woke (one load);
        // before the stream waits, it is polled and this task registered with it.
        if let Some(stop) = this.stop.as_mut()
            && stop.fired_if_woken()
        {
            // Closed: the stream ends for good.
            this.inner.done = true;
            this.stop = None;
        }
        let next = this.inner.poll_next(cx);
        if next.is_pending()
            && let Some(stop) = this.stop.as_mut()
            && stop.poll_fired(cx)
        {
            this.inner.done = true;
            this.stop = None;
            return Poll::Ready(None);
        }
        next
    }
}
