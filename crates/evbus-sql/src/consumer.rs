//! The consumer: a lazily polled stream of claimed rows, woken by publishes and `NOTIFY`,
//! polling as the fallback; and the acker settling one claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evbus::Result;
use evbus::raw::{Acker, RawDelivery, RawStream, Source};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::transport::{SqlBroker, ms};

/// A claimed delivery row.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) id: i64,
    pub(crate) attempt: i32,
    pub(crate) body: String,
}

struct State {
    broker: SqlBroker,
    part: i64,
    visibility: i64,
    notify: Arc<Notify>,
    /// The last call failed: wait before the next.
    failed: bool,
    /// Anonymous subscriptions: when the partition was last marked alive.
    touched: Option<Instant>,
    location: Arc<str>,
}

/// The deliveries of partition `part` (the source's queue or subscription).
pub(crate) fn stream(broker: SqlBroker, part: i64, key: String, source: &Source) -> RawStream {
    let notify = broker.wakers().get(&key);
    let visibility = ms(source.consumer().visibility_timeout).max(1);
    let location = format!(
        "{}:{}/{}",
        broker.config().backend.name(),
        source.origin(),
        part
    );
    let state = State {
        broker,
        part,
        visibility,
        notify,
        failed: false,
        touched: source.is_anonymous().then(Instant::now),
        location: location.into(),
    };
    futures::stream::unfold(state, next).boxed()
}

async fn next(mut state: State) -> Option<(Result<RawDelivery>, State)> {
    let poll = state.broker.config().poll_interval;
    let touch_every = (state.broker.config().anonymous_ttl / 3).min(Duration::from_secs(60));
    loop {
        if state.failed {
            tokio::time::sleep(poll).await;
            state.failed = false;
        }
        if let Some(touched) = state.touched
            && touched.elapsed() >= touch_every
        {
            if let Err(e) = state.broker.touch(state.part).await {
                state.failed = true;
                return Some((Err(e), state));
            }
            state.touched = Some(Instant::now());
        }
        let notify = Arc::clone(&state.notify);
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before looking: a publish from now on wakes this consumer.
        notified.as_mut().enable();
        match state.broker.claim(state.part, state.visibility).await {
            Ok(Some(claim)) => {
                let acker = Arc::new(ClaimAcker {
                    broker: state.broker.clone(),
                    attempt: claim.attempt,
                    notify: Arc::clone(&state.notify),
                });
                let attempt = u32::try_from(claim.attempt).unwrap_or(1).max(1);
                let tag = u64::try_from(claim.id).unwrap_or_default();
                let delivery =
                    RawDelivery::from_json(claim.body, attempt, acker, tag, &state.location);
                return Some((Ok(delivery), state));
            }
            Ok(None) => {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            Err(e) => {
                state.failed = true;
                return Some((Err(e), state));
            }
        }
    }
}

/// Settles one claim (the delivery row id is the tag). A settlement arriving after the
/// visibility timeout gave the row to another consumer (its attempt moved on) changes
/// nothing: that consumer's claim stands.
struct ClaimAcker {
    broker: SqlBroker,
    attempt: i32,
    notify: Arc<Notify>,
}

impl ClaimAcker {
    fn id(tag: u64) -> i64 {
        i64::try_from(tag).unwrap_or(i64::MAX)
    }
}

#[async_trait]
impl Acker for ClaimAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.broker.settle(Self::id(tag), self.attempt, None).await
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        self.broker
            .settle(Self::id(tag), self.attempt, Some(Duration::ZERO))
            .await?;
        self.notify.notify_waiters();
        Ok(())
    }

    fn native_delay(&self) -> bool {
        true
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.broker
            .settle(Self::id(tag), self.attempt, Some(delay))
            .await
    }
}
