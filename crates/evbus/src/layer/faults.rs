//! The fault-injection layer: makes a working transport misbehave on purpose, by rate and
//! seed, to test what sits on top of it (consumers, the Bus, the conformance suite itself).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DurationRound, TimeDelta};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Destination, Layer, Next};
use crate::delivery::{Acker, RawDelivery, Undecodable};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::raw::RawStream;

/// One way to misbehave.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Publish returns `Ok` but the event is not published (a lost publish).
    DropPublish,
    /// Publish waits this long before going on.
    DelayPublish(Duration),
    /// Each event is published twice.
    DuplicatePublish,
    /// A batch is published in reverse order.
    ReorderBatch,
    /// Publish fails with this kind of error; nothing is published.
    FailPublish(ErrorKind),
    /// Every extension attribute is removed on publish.
    DropExtensions,
    /// `time` is truncated to whole seconds on publish.
    TruncateTime,
    /// `ack` returns `Ok` without acknowledging (the broker redelivers later).
    LoseAck,
    /// `ack` fails with this kind of error without acknowledging, as when the connection
    /// drops under it (the broker redelivers after the visibility timeout).
    FailAck(ErrorKind),
    /// `renew` fails with this kind of error without renewing (with
    /// [`ErrorKind::Unsupported`], a transport that cannot renew visibility timeouts).
    FailRenew(ErrorKind),
    /// Each delivery is handed out twice.
    DuplicateDelivery,
    /// A delivery arrives as an undecodable message (what a foreign producer's garbage looks
    /// like to the consumer); core dead-letters it.
    CorruptDelivery,
    /// After an undecodable message, the stream yields nothing more (an adapter that blocks
    /// behind garbage). Combine with [`CorruptDelivery`](Self::CorruptDelivery).
    BlockAfterUndecodable,
}

#[derive(Clone, Debug)]
struct Rule {
    fault: Fault,
    rate: f64,
    only_type: Option<String>,
}

struct State {
    rules: Vec<Rule>,
    rng: StdRng,
}

/// The fault-injection [`Layer`]. Cheap to clone: clones share rules and random state, so a
/// test keeps a clone to arm faults while the transport runs.
///
/// ```
/// use evbus::layer::{Fault, Faults, LayerExt};
///
/// let faults = Faults::seeded(7).inject(Fault::DropPublish, 0.5);
/// let transport = evbus::memory::MemoryBroker::new(Default::default())
///     .connect()
///     .layer(faults.clone());
/// faults.clear(); // heal it
/// # let _ = transport;
/// ```
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("rules", &self.lock().rules)
            .finish()
    }
}

impl Faults {
    /// No faults yet; decisions drawn from a generator seeded with `seed` (the same seed and
    /// the same sequence of operations make the same decisions).
    pub fn seeded(seed: u64) -> Self {
        Faults {
            state: Arc::new(Mutex::new(State {
                rules: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
            })),
        }
    }

    /// Adds `fault` with probability `rate` (0.0 to 1.0) per event or delivery.
    pub fn inject(self, fault: Fault, rate: f64) -> Self {
        self.arm(fault, rate, None);
        self
    }

    /// Adds `fault` at `rate`, only for events of type `ty`.
    pub fn inject_for_type(self, fault: Fault, rate: f64, ty: impl Into<String>) -> Self {
        self.arm(fault, rate, Some(ty.into()));
        self
    }

    /// Adds a rule to a running layer (see [`inject`](Self::inject)).
    pub fn arm(&self, fault: Fault, rate: f64, only_type: Option<String>) {
        self.lock().rules.push(Rule {
            fault,
            rate: rate.clamp(0.0, 1.0),
            only_type,
        });
    }

    /// Removes every rule: the transport behaves again.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `fault` strikes for an event of type `ty` (draws from the generator).
    fn strikes(&self, fault: &Fault, ty: Option<&str>) -> bool {
        let mut state = self.lock();
        let State { rules, rng } = &mut *state;
        rules.iter().any(|rule| {
            rule.fault == *fault
                && rule
                    .only_type
                    .as_deref()
                    .is_none_or(|only| ty == Some(only))
                && rng.random_bool(rule.rate)
        })
    }

    /// The delay of a `DelayPublish` rule that strikes, if any.
    fn delay(&self) -> Option<Duration> {
        let mut state = self.lock();
        let State { rules, rng } = &mut *state;
        rules.iter().find_map(|rule| match rule.fault {
            Fault::DelayPublish(d) if rng.random_bool(rule.rate) => Some(d),
            _ => None,
        })
    }

    fn has(&self, f: impl Fn(&Fault) -> bool) -> bool {
        self.lock().rules.iter().any(|r| f(&r.fault))
    }

    fn on_delivery(&self, from: &Destination, delivery: RawDelivery) -> Vec<RawDelivery> {
        let Some(event) = delivery.event() else {
            return vec![delivery];
        };
        let ty = Some(event.ty().to_owned());
        let ty = ty.as_deref();
        if self.strikes(&Fault::CorruptDelivery, ty) {
            let data = event.data().cloned().unwrap_or_default();
            let id = event.id().to_owned();
            let (attempt, acker, tag) = (
                delivery.attempt(),
                Arc::clone(delivery.acker()),
                delivery.tag(),
            );
            let message = Undecodable::new(
                Error::invalid_event("corrupted by the fault-injection layer"),
                format!("faults:{}", from.name()),
                id,
            )
            .header("x-fault", "corrupt")
            .body(data);
            return vec![RawDelivery::undecodable(message, attempt, acker, tag)];
        }
        let mut delivery = delivery;
        if self.strikes(&Fault::LoseAck, ty) {
            let inner = Arc::clone(delivery.acker());
            let tag = delivery.tag();
            delivery = delivery.with_acker(Arc::new(FaultyAcker { inner, fails: None }), tag);
        }
        if let Some(kind) = self.failing_ack(ty) {
            let inner = Arc::clone(delivery.acker());
            let tag = delivery.tag();
            let fails = Some(kind);
            delivery = delivery.with_acker(Arc::new(FaultyAcker { inner, fails }), tag);
        }
        if let Some(kind) = self.failing_renew(ty) {
            let inner = Arc::clone(delivery.acker());
            let tag = delivery.tag();
            delivery = delivery.with_acker(Arc::new(NoRenewals { inner, fails: kind }), tag);
        }
        if self.strikes(&Fault::DuplicateDelivery, ty)
            && let Some(event) = delivery.event().cloned()
        {
            let twin = RawDelivery::new(
                event,
                delivery.attempt(),
                Arc::clone(delivery.acker()),
                delivery.tag(),
            );
            return vec![delivery, twin];
        }
        vec![delivery]
    }

    fn on_publish(&self, events: &[Event]) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let ty = Some(event.ty());
            if self.strikes(&Fault::FailPublish(ErrorKind::Connection), ty) {
                return Err(injected(ErrorKind::Connection));
            }
            if let Some(kind) = self.failing_kind(event.ty()) {
                return Err(injected(kind));
            }
            if self.strikes(&Fault::DropPublish, ty) {
                continue;
            }
            let mut event = event.clone();
            if self.strikes(&Fault::DropExtensions, ty) {
                let names: Vec<String> = event.extensions().keys().cloned().collect();
                for name in names {
                    event.remove_extension(&name);
                }
            }
            if self.strikes(&Fault::TruncateTime, ty)
                && let Some(time) = event.time()
            {
                let truncated = time.duration_trunc(TimeDelta::seconds(1)).unwrap_or(time);
                event = event.into_builder().time(Some(truncated)).build()?;
            }
            let twice = self.strikes(&Fault::DuplicatePublish, ty);
            if twice {
                out.push(event.clone());
            }
            out.push(event);
        }
        if out.len() > 1 && self.strikes(&Fault::ReorderBatch, None) {
            out.reverse();
        }
        Ok(out)
    }

    /// The kind of a `FailPublish` rule (other than `Connection`, drawn above) that strikes.
    fn failing_kind(&self, ty: &str) -> Option<ErrorKind> {
        self.striking_kind(Some(ty), |fault| match fault {
            Fault::FailPublish(kind) if *kind != ErrorKind::Connection => Some(*kind),
            _ => None,
        })
    }

    /// The kind of a `FailAck` rule that strikes.
    fn failing_ack(&self, ty: Option<&str>) -> Option<ErrorKind> {
        self.striking_kind(ty, |fault| match fault {
            Fault::FailAck(kind) => Some(*kind),
            _ => None,
        })
    }

    /// The kind of a `FailRenew` rule that strikes.
    fn failing_renew(&self, ty: Option<&str>) -> Option<ErrorKind> {
        self.striking_kind(ty, |fault| match fault {
            Fault::FailRenew(kind) => Some(*kind),
            _ => None,
        })
    }

    /// The kind of the first rule that `kind_of` gives a kind for and that strikes.
    fn striking_kind(
        &self,
        ty: Option<&str>,
        kind_of: impl Fn(&Fault) -> Option<ErrorKind>,
    ) -> Option<ErrorKind> {
        let faults: Vec<(Fault, ErrorKind)> = self
            .lock()
            .rules
            .iter()
            .filter_map(|r| kind_of(&r.fault).map(|kind| (r.fault.clone(), kind)))
            .collect();
        faults
            .into_iter()
            .find(|(fault, _)| self.strikes(fault, ty))
            .map(|(_, kind)| kind)
    }
}

fn injected(kind: ErrorKind) -> Error {
    Error::new(
        kind,
        "publish failed: injected by the fault-injection layer",
    )
}

#[async_trait]
impl Layer for Faults {
    async fn publish(&self, _to: &Destination, events: &[Event], next: Next<'_>) -> Result<()> {
        if let Some(delay) = self.delay() {
            tokio::time::sleep(delay).await;
        }
        let events = self.on_publish(events)?;
        next.run(&events).await
    }

    fn deliveries(&self, from: &Destination, raw: RawStream) -> RawStream {
        let faults = self.clone();
        let from = from.clone();
        let block = self.has(|f| *f == Fault::BlockAfterUndecodable);
        let expanded = raw.flat_map(move |item| {
            let out: Vec<Result<RawDelivery>> = match item {
                Err(e) => vec![Err(e)],
                Ok(d) => faults.on_delivery(&from, d).into_iter().map(Ok).collect(),
            };
            futures::stream::iter(out)
        });
        if !block {
            return expanded.boxed();
        }
        // Hands out the undecodable message, then never anything again.
        futures::stream::unfold((expanded.boxed(), false), |(mut raw, blocked)| async move {
            if blocked {
                futures::future::pending::<()>().await;
            }
            let item = raw.next().await?;
            let undecodable = matches!(&item, Ok(d) if d.event().is_none());
            Some((item, (raw, undecodable)))
        })
        .boxed()
    }
}

/// An acker whose `ack` does not acknowledge: it says it worked (`LoseAck`), or fails with
/// an error of the kind given (`FailAck`). Nacks go through.
struct FaultyAcker {
    inner: Arc<dyn Acker>,
    fails: Option<ErrorKind>,
}

#[async_trait]
impl Acker for FaultyAcker {
    async fn ack(&self, _tag: u64) -> Result<()> {
        match self.fails {
            None => Ok(()),
            Some(kind) => Err(Error::new(
                kind,
                "ack failed: injected by the fault-injection layer",
            )),
        }
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        self.inner.nack(tag).await
    }

    fn native_delay(&self) -> bool {
        self.inner.native_delay()
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.inner.nack_delayed(tag, delay).await
    }

    async fn renew(&self, tag: u64) -> Result<()> {
        self.inner.renew(tag).await
    }
}

/// An acker whose `renew` fails with `fails` (`FailRenew`); everything else goes through.
struct NoRenewals {
    inner: Arc<dyn Acker>,
    fails: ErrorKind,
}

#[async_trait]
impl Acker for NoRenewals {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.inner.ack(tag).await
    }

    fn try_ack_now(&self, tag: u64) -> Option<Result<()>> {
        self.inner.try_ack_now(tag)
    }

    async fn nack(&self, tag: u64) -> Result<()> {
        self.inner.nack(tag).await
    }

    fn native_delay(&self) -> bool {
        self.inner.native_delay()
    }

    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        self.inner.nack_delayed(tag, delay).await
    }

    async fn renew(&self, _tag: u64) -> Result<()> {
        Err(Error::new(
            self.fails,
            "renew failed: injected by the fault-injection layer",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::builder("t", "/s")
                    .extension("seq", i.to_string())
                    .build()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn rate_zero_never_strikes_and_rate_one_always_does() {
        let never = Faults::seeded(1).inject(Fault::DropPublish, 0.0);
        assert_eq!(never.on_publish(&events(50)).unwrap().len(), 50);
        let always = Faults::seeded(1).inject(Fault::DropPublish, 1.0);
        assert!(always.on_publish(&events(50)).unwrap().is_empty());
    }

    #[test]
    fn the_same_seed_makes_the_same_decisions() {
        let run = |seed| {
            let f = Faults::seeded(seed).inject(Fault::DropPublish, 0.5);
            f.on_publish(&events(64))
                .unwrap()
                .iter()
                .map(|e| e.extension("seq").unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        let kept = run(3).len();
        assert!(kept > 0 && kept < 64, "{kept}");
    }

    #[test]
    fn publish_faults_change_what_is_published() {
        let f = Faults::seeded(1).inject(Fault::ReorderBatch, 1.0);
        let out = f.on_publish(&events(3)).unwrap();
        assert_eq!(out[0].extension("seq"), Some("2"));
        let f = Faults::seeded(1).inject(Fault::DropExtensions, 1.0);
        assert!(f.on_publish(&events(1)).unwrap()[0].extensions().is_empty());
        let f = Faults::seeded(1).inject(Fault::FailPublish(ErrorKind::Timeout), 1.0);
        assert_eq!(
            f.on_publish(&events(1)).unwrap_err().kind(),
            ErrorKind::Timeout
        );
        let f = Faults::seeded(1).inject_for_type(Fault::DuplicatePublish, 1.0, "other");
        assert_eq!(f.on_publish(&events(2)).unwrap().len(), 2);
        f.clear();
        f.arm(Fault::DuplicatePublish, 1.0, None);
        assert_eq!(f.on_publish(&events(2)).unwrap().len(), 4);
    }
}
