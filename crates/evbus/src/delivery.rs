//! Deliveries and their settlement: ack, nack (with optional delay) and dead-letter.
//!
//! Adapters implement the small [`Acker`] trait (ack, nack now, and optionally a native delayed
//! nack). Everything that must behave the same on every broker lives here, once:
//!
//! - a delivery is settled at most once: a second `ack`, or an `ack` after `nack`, is an
//!   [`ErrorKind::AlreadySettled`] error, never a panic; a settlement that failed (the broker
//!   was unreachable) leaves the delivery unsettled so it can be tried again;
//! - `nack` of the last allowed attempt dead-letters instead of redelivering;
//! - `nack` with a delay on a broker without native delays keeps the event unacknowledged on
//!   the broker (so a crash cannot lose it) and redelivers it when the delay has passed;
//! - dead-lettering sends the event, with the reason, the attempt count and where it came
//!   from as extensions, to the dead-letter queue, and only then acknowledges the original.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::envelope::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::signal::Limit;
use crate::transport::Queue;

/// The longest delay a nack asks for, and the longest wait
/// [`RetryPolicy::backoff`](crate::bus::RetryPolicy::backoff) returns, whatever the settings:
/// a year. A longer one means "never" in practice, and transports keep a due time that
/// cannot go that far (a clock reading plus `Duration::MAX` overflows).
pub const LONGEST_BACKOFF: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Extension set on a dead-lettered event: why it was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "deadletterreason";
/// Extension set on a dead-lettered event: how many deliveries were attempted.
pub const DEAD_LETTER_ATTEMPTS: &str = "deadletterattempts";
/// Extension set on a dead-lettered event: the topic/subscription or queue it came from.
pub const DEAD_LETTER_ORIGIN: &str = "deadletterorigin";
/// Extension set on a dead-lettered event: when it was dead-lettered (RFC 3339, UTC).
pub const DEAD_LETTER_TIME: &str = "deadlettertime";
/// Extension set on a dead-letter record the dead-letter queue refused as too large with its
/// data: the length in bytes of the data left out. Only the attributes were kept (the
/// event was at or over the transport's `max_payload_bytes` before the dead-letter
/// extensions were added, or its producer bypassed the limit).
pub const DEAD_LETTER_DATA_DROPPED: &str = "deadletterdropped";

/// The shortest interval between renewals of a held delivery, whatever its visibility timeout.
pub(crate) const MIN_RENEW_EVERY: Duration = Duration::from_millis(10);

/// How many bytes of each header value and of the body an undecodable message's placeholder
/// keeps when the whole message does not fit the dead-letter queue.
const PLACEHOLDER_CUT: usize = 1024;
/// How many headers that shortened placeholder keeps.
const PLACEHOLDER_HEADERS: usize = 64;

/// The adapter side of settling deliveries.
///
/// Every call gets the `tag` the adapter put in the [`RawDelivery`]: one acker shared by all
/// the deliveries of a consumer tells them apart by it (a delivery tag, a slot number), so a
/// delivery costs no allocation of its own. An adapter whose acker is per delivery ignores it.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Acknowledges: the event is done and must not be delivered again.
    async fn ack(&self, tag: u64) -> Result<()>;

    /// Acknowledges without waiting, for adapters that can settle on the spot (an in-process
    /// broker): `Some(result)` is the result of the ack, `None` (the default) means "call
    /// [`ack`](Self::ack)". Spares the hot path a boxed future per delivery.
    fn try_ack_now(&self, tag: u64) -> Option<Result<()>> {
        let _ = tag;
        None
    }

    /// Negatively acknowledges: the event should be delivered again now, with the attempt
    /// number increased.
    async fn nack(&self, tag: u64) -> Result<()>;

    /// Whether [`nack_delayed`](Self::nack_delayed) is native. When `false` (the default),
    /// core emulates delays by holding the event unacknowledged and calling
    /// [`nack`](Self::nack) after the delay.
    fn native_delay(&self) -> bool {
        false
    }

    /// Redelivers the event no sooner than `delay` from now (only called when
    /// [`native_delay`](Self::native_delay) is `true`).
    async fn nack_delayed(&self, tag: u64, delay: Duration) -> Result<()> {
        let _ = (tag, delay);
        Err(Error::unsupported(
            "this transport has no native delayed redelivery",
        ))
    }

    /// Starts the delivery's visibility timeout over from now: the event is not handed out
    /// again before a whole timeout has passed since this call, while its holder keeps it
    /// unsettled on purpose (an ordered handler's event waiting behind earlier events of its
    /// key). Nothing else changes: not the attempt count, not the event's place.
    ///
    /// A delivery whose timeout already ran out (it may have been handed out again) must not
    /// be taken back: fail with [`ErrorKind::Expired`] where the broker can tell. The default
    /// fails with [`ErrorKind::Unsupported`], and core then lets the timeout run as before.
    async fn renew(&self, tag: u64) -> Result<()> {
        let _ = tag;
        Err(Error::unsupported(
            "this transport cannot renew a delivery's visibility timeout",
        ))
    }
}

/// What an adapter's consumer yields: an event (or a message that could not be decoded), its
/// attempt number and how to settle it. Core turns it into a [`Delivery`] (see
/// [`raw::Source::into_subscription`](crate::raw::Source::into_subscription)).
pub struct RawDelivery {
    payload: Payload,
    attempt: u32,
    acker: Arc<dyn Acker>,
    tag: u64,
}

/// What a raw delivery carries.
pub(crate) enum Payload {
    Event(Event),
    Undecodable(Box<Undecodable>),
}

impl std::fmt::Debug for RawDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RawDelivery");
        match &self.payload {
            Payload::Event(event) => d.field("event", event),
            Payload::Undecodable(message) => d.field("undecodable", message),
        };
        d.field("attempt", &self.attempt)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl RawDelivery {
    /// A decoded event. `attempt` is 1 on first delivery and counts every delivery after it;
    /// `tag` is given back to every [`Acker`] call (0 when the acker is per delivery).
    pub fn new(event: Event, attempt: u32, acker: Arc<dyn Acker>, tag: u64) -> Self {
        RawDelivery {
            payload: Payload::Event(event),
            attempt,
            acker,
            tag,
        }
    }

    /// A message that could not be decoded (a foreign producer wrote something that is not a
    /// CloudEvent). Core never hands it to the consumer: it sends a placeholder event (type
    /// [`UNDECODABLE_EVENT_TYPE`], carrying the raw headers and body) to the dead-letter queue
    /// with the reason, the attempt count and the origin, then acknowledges it through
    /// `acker`, so it never blocks the messages behind it.
    pub fn undecodable(
        message: Undecodable,
        attempt: u32,
        acker: Arc<dyn Acker>,
        tag: u64,
    ) -> Self {
        RawDelivery {
            payload: Payload::Undecodable(Box::new(message)),
            attempt,
            acker,
            tag,
        }
    }

    /// The event; `None` for an undecodable message.
    pub fn event(&self) -> Option<&Event> {
        match &self.payload {
            Payload::Event(event) => Some(event),
            Payload::Undecodable(_) => None,
        }
    }

    /// Mutable access to the event (for transport layers); `None` for an undecodable message.
    pub fn event_mut(&mut self) -> Option<&mut Event> {
        match &mut self.payload {
            Payload::Event(event) => Some(event),
            Payload::Undecodable(_) => None,
        }
    }

    /// The undecodable message, if this is one.
    pub fn undecodable_message(&self) -> Option<&Undecodable> {
        match &self.payload {
            Payload::Event(_) => None,
            Payload::Undecodable(message) => Some(message),
        }
    }

    /// 1 on first delivery, incremented on each redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The settlement handle.
    pub fn acker(&self) -> &Arc<dyn Acker> {
        &self.acker
    }

    /// The tag given back to every [`Acker`] call.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Replaces the settlement handle and its tag: a transport layer wraps the inner acker to
    /// observe or alter settlements.
    pub fn with_acker(mut self, acker: Arc<dyn Acker>, tag: u64) -> Self {
        self.acker = acker;
        self.tag = tag;
        self
    }

    /// Replaces the attempt number (a layer that redelivers on its own counts its attempts).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    pub(crate) fn into_parts(self) -> (Payload, u32, Arc<dyn Acker>, u64) {
        (self.payload, self.attempt, self.acker, self.tag)
    }
}

/// The type of the record dead-lettered in place of a message that is not a CloudEvent.
pub const UNDECODABLE_EVENT_TYPE: &str = "evbus.undecodable";

/// A message an adapter read but could not decode into an [`Event`]: why, where, and its raw
/// headers and body, kept so that the dead-letter record loses nothing.
///
/// ```
/// use evbus::raw::Undecodable;
///
/// let message = Undecodable::new(
///     evbus::Error::invalid_event("missing `ce_specversion` header"),
///     "redis:orders",
///     "1700000000000-0",
/// )
/// .header("order", "{}")
/// .body(&b"\xff\x00"[..]);
/// assert_eq!(message.headers().len(), 1);
/// ```
#[derive(Debug)]
pub struct Undecodable {
    error: Error,
    location: String,
    id: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

impl Undecodable {
    /// `error`: why decoding failed; `location`: where it was read (`nats:EVBUS_orders`,
    /// `redis:evbus:topic:orders`); `id`: the broker's id of the message (a stream sequence,
    /// an offset, an entry id).
    pub fn new(error: Error, location: impl Into<String>, id: impl Into<String>) -> Self {
        Undecodable {
            error,
            location: location.into(),
            id: id.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds one header (property, field) of the raw message, in any encoding.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the raw body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Why decoding failed.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The raw headers.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The raw body.
    pub fn raw_body(&self) -> &Bytes {
        &self.body
    }

    /// The placeholder event dead-lettered in its place: type [`UNDECODABLE_EVENT_TYPE`],
    /// source `location`, id `location/id`, and as JSON data
    /// `{"location", "id", "error", "headers": {name: text}, "body": text}` where a value that
    /// is not UTF-8 becomes `{"base64": "..."}`.
    pub fn placeholder(&self) -> Result<Event> {
        self.placeholder_cut(None)
    }

    /// [`placeholder`](Self::placeholder) keeping at most `cut` bytes of each header value
    /// and of the body, and at most [`PLACEHOLDER_HEADERS`] headers: for a message too large
    /// for the dead-letter queue whole. A shortened value is marked: the data then also holds
    /// `"truncated": true`, `"body_length"` (the body's full length) and `"headers_count"`.
    fn placeholder_cut(&self, cut: Option<usize>) -> Result<Event> {
        use base64::Engine as _;
        let text = |bytes: &[u8]| {
            let bytes = match cut {
                // A prefix cut inside a character is not text any more: cut at the last
                // whole character when the value is text.
                Some(n) if bytes.len() > n => match std::str::from_utf8(bytes) {
                    Ok(text) => crate::envelope::char_prefix(text, n).as_bytes(),
                    Err(_) => &bytes[..n],
                },
                _ => bytes,
            };
            match std::str::from_utf8(bytes) {
                Ok(text) => serde_json::Value::String(text.to_owned()),
                Err(_) => serde_json::json!({
                    "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
                }),
            }
        };
        let kept = cut.map_or(self.headers.len(), |_| PLACEHOLDER_HEADERS);
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .take(kept)
            .map(|(name, value)| (name.clone(), text(value)))
            .collect();
        let source = if self.location.is_empty() {
            "evbus:undecodable"
        } else {
            &self.location
        };
        let mut data = serde_json::json!({
            "location": self.location,
            "id": self.id,
            "error": self.error.message(),
            "headers": headers,
            "body": text(&self.body),
        });
        if cut.is_some() {
            data["truncated"] = true.into();
            data["body_length"] = self.body.len().into();
            data["headers_count"] = self.headers.len().into();
        }
        Event::builder(UNDECODABLE_EVENT_TYPE, source)
            .id(format!("{}/{}", self.location, self.id))
            .json(&data)?
            .build()
    }

    /// The dead-letter record of this message, sent to `queue`: the whole placeholder, or, if
    /// the queue refuses it as too large, one keeping the first [`PLACEHOLDER_CUT`] bytes of
    /// each value (and then, if even that is too large, the attributes alone: see
    /// [`send_dead_letter`]). `Ok` once the queue took one of them.
    pub(crate) async fn dead_letter_to(
        &self,
        queue: &dyn Queue,
        reason: &str,
        attempt: u32,
        origin: &str,
    ) -> Result<Event> {
        let record = dead_letter_event(&self.placeholder()?, reason, attempt, origin)?;
        match queue.send(&record).await {
            Err(e) if e.kind() == ErrorKind::TooLarge => {
                tracing::warn!(
                    message = record.id(),
                    body_length = self.body.len(),
                    dead_letter_queue = queue.name(),
                    "an undecodable message is too large for the dead-letter queue whole; \
                     dead-lettering its first {PLACEHOLDER_CUT} bytes of each value"
                );
                let cut = self.placeholder_cut(Some(PLACEHOLDER_CUT))?;
                let record = dead_letter_event(&cut, reason, attempt, origin)?;
                send_dead_letter(queue, record).await
            }
            Err(e) => Err(e),
            Ok(()) => Ok(record),
        }
    }
}

/// Sends a dead-letter record to `queue`. A record the queue refuses as too large is sent
/// again without its data, with [`DEAD_LETTER_DATA_DROPPED`] giving the data's length, and
/// an error is logged; one still too large (a foreign producer's attributes alone over the
/// limit, or many attributes near it) is sent with every attribute value cut to
/// [`PLACEHOLDER_CUT`] bytes and at most [`PLACEHOLDER_HEADERS`] extensions of its own, then,
/// refused again, to 256 bytes and 8 extensions, then 64 bytes and none, marked
/// [`DEAD_LETTER_TRUNCATED`]. A dead-letter record
/// that can never be stored would otherwise bring its event back after every visibility
/// timeout, forever (and on Kafka hold back every later offset's commit). Returns the record
/// the queue took.
pub(crate) async fn send_dead_letter(queue: &dyn Queue, record: Event) -> Result<Event> {
    let record = match queue.send(&record).await {
        Ok(()) => return Ok(record),
        Err(e) if e.kind() != ErrorKind::TooLarge => return Err(e),
        Err(e) if record.data().is_some() => {
            let length = record.data().map_or(0, Bytes::len);
            tracing::error!(
                event = record.id(),
                data_length = length,
                dead_letter_queue = queue.name(),
                error = %e,
                "a dead-letter record is too large for the dead-letter queue; dead-lettering \
                 its attributes without the data (extension {DEAD_LETTER_DATA_DROPPED})"
            );
            let mut slim = record.into_builder().data_bytes(None).build()?;
            slim.set_extension(DEAD_LETTER_DATA_DROPPED, length.to_string())?;
            match queue.send(&slim).await {
                Ok(()) => return Ok(slim),
                Err(e) if e.kind() != ErrorKind::TooLarge => return Err(e),
                Err(_) => slim,
            }
        }
        Err(_) => record,
    };
    tracing::error!(
        event = crate::envelope::char_prefix(record.id(), PLACEHOLDER_CUT),
        dead_letter_queue = queue.name(),
        "a dead-letter record's attributes alone are too large for the dead-letter queue; \
         dead-lettering them cut to {PLACEHOLDER_CUT} bytes each (extension \
         {DEAD_LETTER_TRUNCATED})"
    );
    // Shorter at each refusal, down to a record that fits any limit a transport declares
    // in earnest (a few hundred bytes of attributes): a dead letter refused at every step
    // would bring its event back after every visibility timeout, for ever.
    let mut refused = None;
    for (value_cut, others) in CUTS {
        let cut = cut_attributes(&record, value_cut, others)?;
        match queue.send(&cut).await {
            Ok(()) => return Ok(cut),
            Err(e) if e.kind() == ErrorKind::TooLarge => refused = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(refused.unwrap_or_else(|| Error::new(ErrorKind::TooLarge, "dead-letter record too large")))
}

/// The shortenings of a dead-letter record's attributes tried in turn: each value cut to so
/// many bytes, and so many extensions of the event's own kept (the dead-letter ones always).
const CUTS: [(usize, usize); 3] = [(PLACEHOLDER_CUT, PLACEHOLDER_HEADERS), (256, 8), (64, 0)];

/// Extension set on a dead-letter record whose attribute values were cut to fit the
/// dead-letter queue (see [`DEAD_LETTER_DATA_DROPPED`], which such a record carries too when
/// it had data): `true`.
pub const DEAD_LETTER_TRUNCATED: &str = "deadlettertruncated";

/// `record` with each attribute value cut to `value_cut` bytes (at a character boundary),
/// its dead-letter extensions and at most `others` other extensions kept, no data, and
/// [`DEAD_LETTER_TRUNCATED`] set.
fn cut_attributes(record: &Event, value_cut: usize, others: usize) -> Result<Event> {
    let cut = |value: &str| crate::envelope::char_prefix(value, value_cut).to_owned();
    let mut builder = Event::builder(cut(record.ty()), cut(record.source()))
        .id(cut(record.id()))
        .time(record.time());
    if let Some(subject) = record.subject() {
        builder = builder.subject(cut(subject));
    }
    if let Some(schema) = record.dataschema().filter(|s| s.len() <= value_cut) {
        builder = builder.dataschema(schema);
    }
    let ours = |name: &str| name.starts_with("deadletter");
    let others = record
        .extensions()
        .iter()
        .filter(|(name, _)| !ours(name))
        .take(others);
    for (name, value) in record
        .extensions()
        .iter()
        .filter(|(name, _)| ours(name))
        .chain(others)
    {
        builder = builder.extension(name, cut(value));
    }
    builder.extension(DEAD_LETTER_TRUNCATED, "true").build()
}

/// Settlement policy shared by every delivery of one consumer.
#[derive(Clone)]
pub(crate) struct DeliveryPolicy {
    pub(crate) max_attempts: u32,
    /// The consumer's visibility timeout: an emulated delayed nack renews the delivery it
    /// holds every third of it.
    pub(crate) visibility_timeout: Duration,
    pub(crate) dead_letter: Arc<dyn Queue>,
    pub(crate) origin: Arc<str>,
}

const PENDING: u8 = 0;
const SETTLING: u8 = 1;
const SETTLED: u8 = 2;

/// How a delivery was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Acknowledged.
    Acked,
    /// Scheduled for redelivery.
    Nacked,
    /// Sent to the dead-letter queue.
    DeadLettered,
}

/// One event handed to a consumer, with its attempt number and its ack handle.
///
/// Settle it exactly once with [`ack`](Self::ack), [`nack`](Self::nack) or
/// [`dead_letter`](Self::dead_letter). A delivery dropped unsettled is redelivered after the
/// visibility timeout.
pub struct Delivery {
    event: Event,
    attempt: u32,
    acker: Arc<dyn Acker>,
    tag: u64,
    policy: Arc<DeliveryPolicy>,
    state: AtomicU8,
    /// The consumer's in-flight limit, whose permit for this delivery (taken by the
    /// subscription) is given back exactly once: when the delivery is settled, or when it is
    /// dropped unsettled.
    limit: Option<Arc<Limit>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event)
            .field("attempt", &self.attempt)
            .field("origin", &self.policy.origin)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub(crate) fn new(
        event: Event,
        attempt: u32,
        acker: Arc<dyn Acker>,
        tag: u64,
        policy: Arc<DeliveryPolicy>,
        limit: Option<Arc<Limit>>,
    ) -> Self {
        Delivery {
            event,
            attempt: attempt.max(1),
            acker,
            tag,
            policy,
            state: AtomicU8::new(PENDING),
            limit,
        }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// Mutable access to the event (settling is unaffected: it acts on the broker's copy).
    pub fn event_mut(&mut self) -> &mut Event {
        &mut self.event
    }

    /// 1 on first delivery, incremented on each redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Deliveries allowed before the event is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }

    /// Where the delivery came from (`topic/subscription` or `queue`).
    pub fn origin(&self) -> &str {
        &self.policy.origin
    }

    /// Whether the delivery has been settled.
    pub fn is_settled(&self) -> bool {
        self.state.load(Ordering::Acquire) == SETTLED
    }

    /// Starts the visibility timeout over: the event is not handed out again before a whole
    /// [`visibility_timeout`](crate::ConsumerOptions::visibility_timeout) has passed from
    /// now. For a holder that keeps a delivery unsettled longer than one timeout on purpose
    /// and is still alive (the Bus renews the events an ordered handler holds behind earlier
    /// events of their key). Fails with [`ErrorKind::AlreadySettled`] once the delivery is
    /// settled or being settled, with [`ErrorKind::Expired`] where the transport can tell the
    /// timeout already ran out, and with [`ErrorKind::Unsupported`] on a transport that
    /// cannot renew (every adapter of this workspace can).
    pub async fn renew(&self) -> Result<()> {
        if self.state.load(Ordering::Acquire) != PENDING {
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!(
                    "delivery of event {} is settled or being settled: nothing to renew",
                    self.event.id()
                ),
            ));
        }
        self.acker.renew(self.tag).await
    }

    /// Acknowledges the event: it will not be delivered again.
    pub async fn ack(&self) -> Result<()> {
        self.begin_settle()?;
        // A transport that settles on the spot (the in-memory one) needs no future at all.
        let result = match self.acker.try_ack_now(self.tag) {
            Some(result) => result,
            None => self.acker.ack(self.tag).await,
        };
        self.end_settle(result)
    }

    /// Asks for redelivery, after `delay` if given (at most
    /// [`LONGEST_BACKOFF`], a year). On the last allowed attempt
    /// the event is dead-lettered instead; the returned [`Settlement`] says which happened.
    pub async fn nack(&self, delay: Option<Duration>) -> Result<Settlement> {
        if self.attempt >= self.policy.max_attempts {
            let reason = format!(
                "max attempts reached ({} of {})",
                self.attempt, self.policy.max_attempts
            );
            return self
                .settle(async { self.send_to_dead_letter(&reason).await })
                .await
                .map(|()| Settlement::DeadLettered);
        }
        // Capped: a transport keeps the due time as a clock reading plus the delay, which
        // `Duration::MAX` overflows.
        let delay = delay
            .filter(|d| !d.is_zero())
            .map(|d| d.min(LONGEST_BACKOFF));
        self.settle(async {
            match delay {
                None => self.acker.nack(self.tag).await,
                Some(d) if self.acker.native_delay() => self.acker.nack_delayed(self.tag, d).await,
                Some(d) => {
                    let (acker, tag) = (Arc::clone(&self.acker), self.tag);
                    let every = (self.policy.visibility_timeout / 3).max(MIN_RENEW_EVERY);
                    tokio::spawn(async move {
                        // Held unacknowledged for the delay, renewed meanwhile so that a delay
                        // longer than the visibility timeout is not cut short by it. A
                        // transport that cannot renew lets the timeout run (the event may
                        // then come back sooner, with its attempt counted).
                        let due = tokio::time::Instant::now() + d;
                        let mut renewing = true;
                        loop {
                            let now = tokio::time::Instant::now();
                            if now >= due {
                                break;
                            }
                            if !renewing {
                                tokio::time::sleep_until(due).await;
                                break;
                            }
                            tokio::time::sleep_until(due.min(now + every)).await;
                            if tokio::time::Instant::now() < due
                                && let Err(e) = acker.renew(tag).await
                            {
                                match e.kind() {
                                    ErrorKind::Unsupported => renewing = false,
                                    // Handed out again already: nothing left to nack.
                                    ErrorKind::Expired => return,
                                    // The broker may be back for the next one.
                                    _ => tracing::debug!(error = %e, "could not renew a delivery held for a delayed nack"),
                                }
                            }
                        }
                        if let Err(e) = acker.nack(tag).await {
                            // The event stays unacknowledged on the broker and comes back
                            // after the visibility timeout: nothing is lost.
                            tracing::warn!(error = %e, "delayed nack failed; the event will be redelivered after its visibility timeout");
                        }
                    });
                    Ok(())
                }
            }
        })
        .await
        .map(|()| Settlement::Nacked)
    }

    /// Sends the event to the dead-letter queue with `reason`, then acknowledges it.
    pub async fn dead_letter(&self, reason: &str) -> Result<()> {
        self.settle(async { self.send_to_dead_letter(reason).await })
            .await
    }

    async fn send_to_dead_letter(&self, reason: &str) -> Result<()> {
        let event = dead_letter_event(&self.event, reason, self.attempt, &self.policy.origin)?;
        send_dead_letter(&*self.policy.dead_letter, event).await?;
        self.acker.ack(self.tag).await
    }

    async fn settle(&self, op: impl Future<Output = Result<()>>) -> Result<()> {
        self.begin_settle()?;
        self.end_settle(op.await)
    }

    /// Claims the settlement: refused if the delivery is settled or being settled.
    fn begin_settle(&self) -> Result<()> {
        if let Err(current) =
            self.state
                .compare_exchange(PENDING, SETTLING, Ordering::AcqRel, Ordering::Acquire)
        {
            let what = if current == SETTLING {
                "is being settled concurrently"
            } else {
                "was already settled (acked, nacked or dead-lettered)"
            };
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!("delivery of event {} {what}", self.event.id()),
            ));
        }
        Ok(())
    }

    /// Ends the settlement [`begin_settle`](Self::begin_settle) claimed: settled on success,
    /// pending again (it may be settled again) on failure.
    fn end_settle(&self, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                self.state.store(SETTLED, Ordering::Release);
                self.release_permit();
                Ok(())
            }
            Err(e) => {
                self.state.store(PENDING, Ordering::Release);
                Err(e)
            }
        }
    }

    fn release_permit(&self) {
        if let Some(limit) = &self.limit {
            limit.give_back();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // Settled deliveries gave their permit back already.
        if *self.state.get_mut() != SETTLED {
            self.release_permit();
        }
    }
}

/// The most bytes of a reason a dead-letter record keeps ([`dead_letter_event`]).
pub const DEAD_LETTER_REASON_MAX: usize = 4096;

/// The event as it is stored in a dead-letter queue: the original plus
/// [`DEAD_LETTER_REASON`], [`DEAD_LETTER_ATTEMPTS`], [`DEAD_LETTER_ORIGIN`] and
/// [`DEAD_LETTER_TIME`]. A reason longer than [`DEAD_LETTER_REASON_MAX`] bytes is cut there
/// (at a character, followed by `… (N bytes)`): a reason is an error message, which may quote
/// what a producer or a handler put in it, and one as large as the event could make the
/// record too large for its queue, so that the delivery could never leave.
pub fn dead_letter_event(
    event: &Event,
    reason: &str,
    attempts: u32,
    origin: &str,
) -> Result<Event> {
    let mut dead = event.clone();
    dead.set_extension(
        DEAD_LETTER_REASON,
        &*crate::envelope::cut(reason, DEAD_LETTER_REASON_MAX),
    )?;
    dead.set_extension(DEAD_LETTER_ATTEMPTS, attempts.to_string())?;
    dead.set_extension(DEAD_LETTER_ORIGIN, origin)?;
    dead.set_extension(
        DEAD_LETTER_TIME,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )?;
    Ok(dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_at_most_a_bounded_reason() {
        let event = Event::builder("t", "/s").build().unwrap();
        let short = dead_letter_event(&event, "handler failed", 3, "t/g").unwrap();
        assert_eq!(short.extension(DEAD_LETTER_REASON), Some("handler failed"));
        // A reason quoting a megabyte of what a producer sent, with a multi-byte character
        // across the cut.
        let long = format!("bad value `{}`", "é".repeat(1 << 19));
        let dead = dead_letter_event(&event, &long, 3, "t/g").unwrap();
        let kept = dead.extension(DEAD_LETTER_REASON).unwrap();
        assert!(kept.len() < DEAD_LETTER_REASON_MAX + 32, "{}", kept.len());
        assert!(kept.starts_with("bad value `é"), "{}", &kept[..20]);
        assert!(
            kept.ends_with(&format!("… ({} bytes)", long.len())),
            "{kept}"
        );
        assert_eq!(dead.extension(DEAD_LETTER_ATTEMPTS), Some("3"));
    }
}
