//! Inspecting a group's dead-letter queue, redriving from it and removing from it.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::Bus;
use crate::delivery::{
    DEAD_LETTER_ATTEMPTS, DEAD_LETTER_DATA_DROPPED, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON,
    DEAD_LETTER_TRUNCATED, UNDECODABLE_EVENT_TYPE,
};
use crate::envelope::Event;
use crate::error::Result;
use crate::transport::{ConsumerOptions, Queue};

use crate::delivery::DEAD_LETTER_TIME;

/// An event in a dead-letter queue, with why it got there.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    event: Event,
}

impl DeadLetter {
    /// The event as stored (the original plus the dead-letter extensions).
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The original event, without the dead-letter extensions.
    pub fn original(&self) -> Event {
        let mut event = self.event.clone();
        for name in [
            DEAD_LETTER_REASON,
            DEAD_LETTER_ATTEMPTS,
            DEAD_LETTER_ORIGIN,
            DEAD_LETTER_TIME,
        ] {
            event.remove_extension(name);
        }
        event
    }

    /// Why it was dead-lettered: the last handler error, or why it was rejected.
    pub fn reason(&self) -> Option<&str> {
        self.event.extension(DEAD_LETTER_REASON)
    }

    /// How many deliveries were attempted.
    pub fn attempts(&self) -> Option<u32> {
        self.event
            .extension(DEAD_LETTER_ATTEMPTS)
            .and_then(|a| a.parse().ok())
    }

    /// Where it was consumed from (`topic/subscription` or a queue name).
    pub fn origin(&self) -> Option<&str> {
        self.event.extension(DEAD_LETTER_ORIGIN)
    }

    /// When it was dead-lettered, if that was recorded (the `deadlettertime` extension).
    pub fn dead_lettered_at(&self) -> Option<&str> {
        self.event.extension(DEAD_LETTER_TIME)
    }

    /// The length of the data that was dropped to fit the record in the dead-letter queue
    /// (the `deadletterdropped` extension): the record holds the attributes only, and the
    /// data is left only where the event was first published.
    pub fn data_dropped(&self) -> Option<usize> {
        self.event
            .extension(DEAD_LETTER_DATA_DROPPED)
            .and_then(|n| n.parse().ok())
    }

    /// Why this record cannot be redriven, if it cannot: a placeholder of a message that was
    /// not a CloudEvent (type `evbus.undecodable`: a handler would only dead-letter it again),
    /// or a record whose data was dropped (it would be sent on without its data). A redrive
    /// leaves such records where they are.
    pub fn not_redrivable(&self) -> Option<String> {
        if self.event.ty() == UNDECODABLE_EVENT_TYPE {
            return Some(
                "it stands for a message that is not a CloudEvent: no handler can take it; \
                 read it (its data holds the raw message) and publish a corrected event, then \
                 remove it (`evbus dlq discard --id`, `DeadLetters::discard_each`)"
                    .to_owned(),
            );
        }
        if self.event.extension(DEAD_LETTER_TRUNCATED).is_some() {
            return Some(
                "its attributes were cut to fit the dead-letter queue: it would be sent on \
                 changed; publish the event again from where it was first stored"
                    .to_owned(),
            );
        }
        self.data_dropped().map(|n| {
            format!(
                "its {n} bytes of data were dropped to fit the dead-letter queue: it would be \
                 sent on without them; publish the event again from where it was first stored"
            )
        })
    }
}

/// The dead-letter queue of one handler group, from [`Bus::dead_letters`].
#[derive(Clone)]
pub struct DeadLetters {
    name: String,
    queue: Arc<dyn Queue>,
    redrive: Arc<dyn Queue>,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("queue", &self.name)
            .field("redrive", &self.redrive.name())
            .finish()
    }
}

/// The most dead letters one look holds unsettled at once ([`DeadLetters::peek`] and the
/// ones a redrive leaves): more than any broker's own prefetch limit (AMQP's is 65,535).
const MAX_HELD: usize = 65_535;

/// How many dead letters a redrive may leave in place (held until it ends) beyond `max`.
const LEFT_PER_CALL: usize = 4_096;

/// How long a look holds what it received before the broker may hand it out again (what a
/// look that died, or whose give-back was lost, keeps hidden).
const LOOK_VISIBILITY: Duration = Duration::from_secs(90);

/// The longest a look runs: well within [`LOOK_VISIBILITY`], so nothing it holds comes back to
/// it, and every dead letter it receives is another one (two may carry the same event id).
const LOOK_LIMIT: Duration = Duration::from_secs(60);

/// The consumer settings used on a dead-letter queue: nothing there is ever dead-lettered
/// again (a message that is not a CloudEvent is handed out as its placeholder), and room to
/// hold `held` deliveries at once.
fn dlq_consumer(held: usize) -> ConsumerOptions {
    let mut options = ConsumerOptions::default()
        .max_attempts(u32::MAX)
        .max_in_flight(held.clamp(1, MAX_HELD))
        .visibility_timeout(LOOK_VISIBILITY);
    options.inspect = true;
    options
}

/// The next delivery of a look, `None` once nothing came for `idle` or the look has run for
/// [`LOOK_LIMIT`] since `started`.
async fn next_looked(
    sub: &mut crate::Subscription,
    idle: Duration,
    started: tokio::time::Instant,
) -> Option<Result<crate::delivery::Delivery>> {
    let left = LOOK_LIMIT.saturating_sub(started.elapsed());
    if left.is_zero() {
        tracing::warn!(
            "a look at a dead-letter queue stopped after {} s; it may hold more",
            LOOK_LIMIT.as_secs()
        );
        return None;
    }
    tokio::time::timeout(idle.min(left), sub.next_delivery())
        .await
        .ok()
        .flatten()
}

/// Gives back what a look held, together and in the order received: given back one by one
/// as they were seen, a broker that redelivers a given-back message first (the memory
/// transport does, and SQL may) handed the same one straight back and the look ended after it.
///
/// Never an error: a dead letter that could not be given back (its subscription is gone on a
/// broker that settles through it) comes back after the visibility timeout, or when the
/// broker requeues what a closed consumer held; nothing is lost, and the look's result
/// stands. Bounded in time for the same reason.
async fn give_back(held: Vec<crate::delivery::Delivery>) {
    let all = async {
        for delivery in held {
            match delivery.nack(None).await {
                Ok(_) => {}
                // The broker has it back already (the subscription's end gave back what it
                // held, as on RabbitMQ).
                Err(e) if e.kind() == crate::ErrorKind::Expired => {
                    tracing::debug!(error = %e, "a dead letter looked at was given back already");
                }
                Err(e) => {
                    tracing::warn!(error = %e, event = delivery.event().id(), "a dead letter looked at could not be given back at once; it comes back after its visibility timeout");
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .is_err()
    {
        tracing::warn!(
            "giving back the dead letters looked at took over 10 s; the rest come back after their visibility timeout"
        );
    }
}

impl Bus {
    /// The dead-letter queue of the handlers of `ty` in `group`
    /// ([`Bus::dead_letter_queue_name`]), to inspect and redrive.
    pub async fn dead_letters(&self, ty: &str, group: &str) -> Result<DeadLetters> {
        let name = self.dead_letter_queue_name(ty, group);
        let transport = &self.inner.transport;
        Ok(DeadLetters {
            queue: transport.queue(&name).await?,
            redrive: transport.queue(&self.redrive_queue_name(ty, group)).await?,
            name,
        })
    }
}

impl DeadLetters {
    /// The dead-letter queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Up to `max` dead letters, without removing them: each is received and held, and all
    /// are given back together at the end (at most 65,535 are held at once). Stops early once
    /// nothing new arrives for `idle` (an empty queue returns after `idle`), and after a
    /// minute (what it holds is not handed out again for 90 s). The same event may be there
    /// twice (dead-lettered twice); each record is listed. A message in the queue that is not
    /// a CloudEvent is listed as its `evbus.undecodable` placeholder and left as it is.
    pub async fn peek(&self, max: usize, idle: Duration) -> Result<Vec<DeadLetter>> {
        let started = tokio::time::Instant::now();
        let mut sub = self.queue.receive(dlq_consumer(max)).await?;
        let mut out = Vec::new();
        let mut held = Vec::new();
        let looked: Result<()> = async {
            while out.len() < max {
                let Some(delivery) = next_looked(&mut sub, idle, started).await else {
                    break;
                };
                let delivery = delivery?;
                out.push(DeadLetter {
                    event: delivery.event().clone(),
                });
                held.push(delivery);
            }
            Ok(())
        }
        .await;
        // Stopped first: a consumer still running could take what is given back into its
        // own buffer (the SQL transport claims ahead) and hold it past this call.
        drop(sub);
        give_back(held).await;
        looked?;
        Ok(out)
    }

    /// Moves up to `max` dead letters back to the group: each is stripped of its dead-letter
    /// extensions and sent to the group's redrive queue (consumed by every handler of the
    /// group, and only by them), then removed from the dead-letter queue. Returns how many
    /// were moved; stops early once nothing arrives for `idle`. An event is moved once per
    /// call: if a handler dead-letters it again meanwhile, that new dead letter stays (see
    /// [`redrive_each`](Self::redrive_each)).
    pub async fn redrive(&self, max: usize, idle: Duration) -> Result<usize> {
        self.redrive_where(max, idle, |_| true).await
    }

    /// Like [`redrive`](Self::redrive), moving only the dead letters `keep` accepts; the
    /// others stay in the dead-letter queue.
    pub async fn redrive_where(
        &self,
        max: usize,
        idle: Duration,
        keep: impl Fn(&DeadLetter) -> bool,
    ) -> Result<usize> {
        self.redrive_each(max, idle, keep, |_| {}).await
    }

    /// Like [`redrive_where`](Self::redrive_where), calling `moved` with each dead letter as
    /// soon as it is moved (sent to the redrive queue and removed from the dead-letter
    /// queue), so that what was moved is known even when a later one fails: on an error,
    /// every dead letter moved before it has been passed to `moved`, and the one being moved
    /// is not (if its removal failed it was sent already, and stays in the dead-letter queue
    /// too).
    ///
    /// The dead letters it leaves in place (`keep` refused them) are held until it ends and
    /// then given back together, so that a broker that hands a given-back message out first
    /// does not end the look at it; a call stops after leaving `max` + 4,096 of them (at
    /// most 65,535).
    ///
    /// Each event id is moved at most once per call: a dead letter whose event was already
    /// moved by this call (a handler of the group rejected it again, and it came back while
    /// the redrive was still running, or the event was dead-lettered twice) stays in the
    /// dead-letter queue, and is not offered to `keep` either. Without that, a redrive of
    /// everything would move such an event again and again, up to `max` times. Records that
    /// [cannot be redriven](DeadLetter::not_redrivable) stay too, whatever `keep` says. Like
    /// [`peek`](Self::peek), a call looks for at most a minute.
    pub async fn redrive_each(
        &self,
        max: usize,
        idle: Duration,
        keep: impl Fn(&DeadLetter) -> bool,
        moved: impl FnMut(&DeadLetter),
    ) -> Result<usize> {
        self.take_each(max, idle, keep, Some(&self.redrive), moved)
            .await
    }

    /// Removes dead letters for good: each one `keep` accepts is taken out of the dead-letter
    /// queue (acknowledged there) and `removed` is called with it; the others stay, given back
    /// together at the end as [`redrive_each`](Self::redrive_each) leaves them. Returns how
    /// many were removed; stops early once nothing arrives for `idle`, after `max` removals,
    /// and, like [`peek`](Self::peek), after a minute.
    ///
    /// Every record is offered, placeholders of messages that are not CloudEvents too (they
    /// cannot be redriven; removing them is how a queue is cleared of them), and every record
    /// of an event `keep` accepts is removed (an event dead-lettered twice is there twice).
    /// On an error, every record removed before it has been passed to `removed`.
    pub async fn discard_each(
        &self,
        max: usize,
        idle: Duration,
        keep: impl Fn(&DeadLetter) -> bool,
        removed: impl FnMut(&DeadLetter),
    ) -> Result<usize> {
        self.take_each(max, idle, keep, None, removed).await
    }

    /// [`redrive_each`](Self::redrive_each) when `redrive` is the redrive queue, else
    /// [`discard_each`](Self::discard_each).
    async fn take_each(
        &self,
        max: usize,
        idle: Duration,
        keep: impl Fn(&DeadLetter) -> bool,
        redrive: Option<&Arc<dyn Queue>>,
        mut taken: impl FnMut(&DeadLetter),
    ) -> Result<usize> {
        let mut sub = self
            .queue
            .receive(dlq_consumer(max.saturating_add(LEFT_PER_CALL)))
            .await?;
        let started = tokio::time::Instant::now();
        let mut count = 0;
        let mut done = HashSet::new();
        // The dead letters left where they are, given back together at the end (see
        // `give_back`).
        let mut held = Vec::new();
        // Not an `async` block: that would borrow `keep` and `taken` across its awaits and
        // need them `Sync` for the future to be `Send`.
        let mut looked: Result<()> = Ok(());
        while count < max && held.len() < max.saturating_add(LEFT_PER_CALL).min(MAX_HELD) {
            let delivery = match next_looked(&mut sub, idle, started).await {
                None => break,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    looked = Err(e);
                    break;
                }
            };
            let dead = DeadLetter {
                event: delivery.event().clone(),
            };
            // `keep` sees what cannot be redriven (it may want to say so), not what was moved.
            let left = match redrive {
                Some(_) => {
                    done.contains(dead.event.id())
                        || !keep(&dead)
                        || dead.not_redrivable().is_some()
                }
                None => !keep(&dead),
            };
            if left {
                held.push(delivery);
                continue;
            }
            if let Some(redrive) = redrive
                && let Err(e) = redrive.send(&dead.original()).await
            {
                held.push(delivery);
                looked = Err(e);
                break;
            }
            if let Err(e) = delivery.ack().await {
                looked = Err(e);
                break;
            }
            count += 1;
            taken(&dead);
            if redrive.is_some() {
                done.insert(dead.event.id().to_owned());
            }
        }
        // Stopped first: a consumer still running could take what is given back into its
        // own buffer (the SQL transport claims ahead) and hold it past this call.
        drop(sub);
        give_back(held).await;
        looked?;
        Ok(count)
    }
}
