//! Emitting: validate, build the envelope, publish, return once the transport confirmed.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::Either;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::{Bus, TypeEntry, telemetry};
use crate::envelope::{Event, Text, json_bytes};
use crate::error::{Error, ErrorKind, Result};
use crate::schema::{EventType, EventTypeInfo};

/// One event to emit: its type, its JSON data and optional envelope attributes.
///
/// ```
/// use evbus::bus::Emit;
/// use serde_json::json;
///
/// let emit = Emit::new("afterOrderCreate", json!({"orderId": "o-1"}))
///     .key("o-1")
///     .subject("orders/o-1")
///     .extension("tenant", "acme");
/// assert_eq!(emit.event_type(), "afterOrderCreate");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Emit {
    ty: String,
    data: Value,
    key: Option<String>,
    subject: Option<String>,
    id: Option<String>,
    source: Option<String>,
    time: Option<chrono::DateTime<chrono::Utc>>,
    extensions: BTreeMap<String, String>,
}

impl Emit {
    /// An event of type `ty` with `data`.
    pub fn new(ty: impl Into<String>, data: Value) -> Self {
        Emit {
            ty: ty.into(),
            data,
            key: None,
            subject: None,
            id: None,
            source: None,
            time: None,
            extensions: BTreeMap::new(),
        }
    }

    /// An event of the Rust event type `T`, its data serialised from `value`.
    pub fn typed<T: EventType + Serialize>(value: &T) -> Result<Self> {
        let data = serde_json::to_value(value).map_err(|e| {
            Error::invalid_event(format!(
                "`{}` data cannot be serialised as JSON: {e}",
                T::TYPE
            ))
        })?;
        Ok(Emit::new(T::TYPE, data))
    }

    /// The partition key: events sharing it keep their order (on transports that declare
    /// per-key order, and for handlers that keep it).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The CloudEvents `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// The CloudEvents `id`, instead of a new UUIDv7 — for an event that already has one
    /// (relayed from a producer outside the bus). Must not be empty.
    ///
    /// CloudEvents requires `source` + `id` to be unique; keeping them so is the caller's
    /// job: evbus does **not** deduplicate, so emitting twice with the same id publishes two
    /// events (consumers that dedup by id will then drop the second).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The CloudEvents `source`, instead of the Bus's own source. Must not be empty.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The CloudEvents `time`, instead of the moment of the emit — for an event that already
    /// has one (relayed from a producer outside the bus).
    pub fn time(mut self, time: chrono::DateTime<chrono::Utc>) -> Self {
        self.time = Some(time);
        self
    }

    /// An extension attribute (lowercase letters and digits, at most 20).
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.ty
    }

    /// The data.
    pub fn data(&self) -> &Value {
        &self.data
    }
}

impl Bus {
    /// Validates `data` as event type `ty`, publishes it to the type's topic and returns the
    /// new event's id once the transport accepted it.
    ///
    /// An invalid payload, or an unknown type in a strict catalogue, fails with
    /// [`ErrorKind::Validation`] naming every violation (or every known type), and nothing is
    /// published.
    pub async fn emit(&self, ty: &str, data: Value) -> Result<String> {
        self.send_prepared(ty, |bus, span, entry| {
            bus.prepare_data(ty, &data, span, entry)
        })
        .await
    }

    /// Emits a Rust event type: `T::TYPE` with `value` serialised as its data (see
    /// [`emit_json`](Self::emit_json)).
    pub fn emit_typed<T: EventType + Serialize>(
        &self,
        value: &T,
    ) -> impl Future<Output = Result<String>> + Send + '_ {
        self.emit_json(T::TYPE, value)
    }

    /// Emits event type `ty` with `data` serialised straight to its JSON bytes; returns the
    /// new event's id once the transport accepted it.
    ///
    /// The bytes are what `serde_json` writes for `data` (object keys in the order `data`'s
    /// `Serialize` gives them, unlike [`emit`](Self::emit), whose `Value` sorts them). No
    /// [`Value`] is built unless the catalogue has a schema for `ty`; then `data` is also
    /// turned into one and validated exactly as [`emit`](Self::emit) validates, and nothing is
    /// published if it is invalid. `data` that `serde_json` cannot write (a map with
    /// non-string keys, a failing `Serialize`) fails with [`ErrorKind::InvalidEvent`].
    ///
    /// `data` is serialised before the returned future is first polled, so it need not
    /// outlive this call.
    pub fn emit_json<'a, T: Serialize + ?Sized>(
        &'a self,
        ty: &'a str,
        data: &T,
    ) -> impl Future<Output = Result<String>> + Send + 'a {
        let encoded = self.encode(ty, data);
        // The rest when first polled, as an `async` block would do it; but the future is
        // either this closure (before) or the publish (after), never both: an `async` block
        // keeps what it captured next to what it awaits.
        futures::future::lazy(move |_| {
            self.send_prepared(ty, move |bus, span, entry| {
                let (bytes, checked) = encoded?;
                let checked = checked.as_ref().map(|(value, info)| (value, *info));
                bus.prepare_encoded(ty, bytes, checked, span, entry)
            })
        })
        .flatten()
    }

    /// `data`'s JSON bytes and, when the catalogue has a schema for `ty`, its [`Value`] to
    /// validate with that schema's entry (the one lookup of `ty` in the catalogue).
    fn encode<T: Serialize + ?Sized>(
        &self,
        ty: &str,
        data: &T,
    ) -> Result<(bytes::Bytes, Option<(Value, &EventTypeInfo)>)> {
        let failed = |e: serde_json::Error| {
            Error::invalid_event(format!("`{ty}` data cannot be serialised as JSON: {e}"))
        };
        let checked = match self.inner.catalog.get(ty) {
            Some(info) => Some((serde_json::to_value(data).map_err(failed)?, info)),
            None => None,
        };
        Ok((json_bytes(data).map_err(failed)?, checked))
    }

    /// Emits one [`Emit`] (with a key, subject or extensions); returns the event id.
    pub async fn send(&self, mut emit: Emit) -> Result<String> {
        let ty = std::mem::take(&mut emit.ty);
        self.send_prepared(&ty, |bus, span, entry| {
            bus.prepare_as(&ty, emit, span, entry)
        })
        .await
    }

    /// Publishes the event `prepare` builds (in the `evbus.emit` span) for type `ty`.
    ///
    /// Everything before the publish (the type's entry, the span, `prepare`) runs when this is
    /// called, and the future returned holds only what the publish needs: the event, its
    /// type's entry, the span and the emit's shutdown token. An emit's future is moved into
    /// place once or twice per emit, and every task awaiting one carries it, so its size is
    /// paid per emit (`prepare` and its captured data used to be part of it).
    fn send_prepared<'a>(
        &'a self,
        ty: &str,
        prepare: impl FnOnce(&Self, &tracing::Span, Option<&TypeEntry>) -> Result<Event>,
    ) -> impl Future<Output = Result<String>> + Send + 'a {
        match self.prepare_send(ty, prepare) {
            Ok((prepared, span)) => Either::Left(telemetry::within(span, prepared.publish(self))),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// The part of [`send_prepared`](Self::send_prepared) that does not wait.
    fn prepare_send<'a>(
        &'a self,
        ty: &str,
        prepare: impl FnOnce(&Self, &tracing::Span, Option<&TypeEntry>) -> Result<Event>,
    ) -> Result<(Prepared<'a>, tracing::Span)> {
        self.ensure_open()?;
        let _token = self.inner.emits.token();
        // One lookup: the type's topic (borrowed, no allocation per emit), its cached handle
        // and metric keys. Types outside the catalogue (a permissive one) use their route or
        // their own name.
        let entry = self.inner.types.get(ty);
        // A type outside the catalogue has an entry once it was emitted validly.
        let other = match entry {
            Some(_) => None,
            None => self.find_other_type(ty),
        };
        let span = tracing::info_span!(
            "evbus.emit",
            otel.kind = "producer",
            event.r#type = %ty,
            event.id = tracing::field::Empty,
            topic = %self.topic_of(ty, entry),
        );
        let event = {
            // Not held across an await: the publish is instrumented with the span instead.
            let _in_span = span.enter();
            prepare(self, &span, entry.or(other.as_deref()))?
        };
        if !span.is_disabled() {
            span.record("event.id", event.id());
        }
        let entry = match (entry, other) {
            (Some(entry), _) => EntryRef::Catalogued(entry),
            (None, Some(other)) => EntryRef::Other(other),
            (None, None) => EntryRef::Other(self.other_type(ty)),
        };
        Ok((
            Prepared {
                _token,
                entry,
                event,
            },
            span,
        ))
    }

    /// Emits several events; returns their ids in the same order.
    ///
    /// Every event is validated first: if any is invalid, the error names each invalid one
    /// by its index and nothing is published. Events are then published per topic in order
    /// ([`Topic::publish_batch`](crate::Topic::publish_batch)); on a transport error a prefix
    /// may have been published.
    pub async fn emit_batch(&self, emits: impl IntoIterator<Item = Emit>) -> Result<Vec<String>> {
        self.ensure_open()?;
        let _token = self.inner.emits.token();
        let emits: Vec<Emit> = emits.into_iter().collect();
        let span = tracing::info_span!("evbus.emit", otel.kind = "producer", batch = emits.len(),);
        async {
            let prepared = self.prepare_all(emits, &tracing::Span::current(), "published")?;
            // Group by topic, keeping each topic's events in the order given. A catalogued
            // type's entry gives its topic, its cached topic handle and its metrics: one
            // lookup per event, made when it was prepared.
            let mut by_topic: Vec<Batch<'_>> = Vec::new();
            for (event, entry) in &prepared {
                let name = self.topic_of(event.ty(), *entry);
                let batch = match by_topic.iter().position(|b| b.topic == name) {
                    Some(at) => &mut by_topic[at],
                    None => {
                        by_topic.push(Batch {
                            topic: name,
                            events: Vec::new(),
                            entries: Vec::new(),
                        });
                        by_topic.last_mut().expect("just pushed")
                    }
                };
                batch.events.push(event.clone());
                batch.entries.push(*entry);
            }
            for batch in &by_topic {
                // Every type of a topic opens the same topic: the first catalogued one's
                // cached handle serves them all.
                let topic = match batch.entries.iter().flatten().next() {
                    Some(entry) => self.type_topic(entry).await?,
                    None => self.topic(batch.topic).await?,
                };
                topic.publish_batch(&batch.events).await?;
                for (event, entry) in batch.events.iter().zip(&batch.entries) {
                    match entry {
                        Some(entry) => entry.metrics.emitted(),
                        None => telemetry::emitted(event.ty()),
                    }
                }
            }
            Ok(prepared.iter().map(|(e, _)| e.id().to_owned()).collect())
        }
        .instrument(span)
        .await
    }

    /// Validates `emit` against the catalogue and builds its envelope exactly as
    /// [`Bus::send`] would (id, source, `dataschema`, key, subject, extensions, trace
    /// context of the current span), without publishing it.
    ///
    /// This is what a transactional outbox stages: the event is checked at the same point
    /// and with the same rules as an emit, and published later, unchanged, by a relay (to
    /// the topic [`Bus::topic_name`] names).
    pub fn prepare_event(&self, emit: Emit) -> Result<Event> {
        self.ensure_open()?;
        self.prepare(emit, &tracing::Span::current())
    }

    /// [`prepare_event`](Self::prepare_event) for several events: all of them, or, if any is
    /// invalid, an error naming each invalid one by its index (as
    /// [`emit_batch`](Self::emit_batch) reports them) and no event.
    pub fn prepare_events(&self, emits: impl IntoIterator<Item = Emit>) -> Result<Vec<Event>> {
        self.ensure_open()?;
        let prepared = self.prepare_all(emits, &tracing::Span::current(), "prepared")?;
        Ok(prepared.into_iter().map(|(event, _)| event).collect())
    }

    /// Every event prepared, or a validation error naming each invalid one; `outcome` says
    /// in the error what did not happen ("nothing was {outcome}").
    fn prepare_all(
        &self,
        emits: impl IntoIterator<Item = Emit>,
        span: &tracing::Span,
        outcome: &str,
    ) -> Result<Vec<(Event, Option<&TypeEntry>)>> {
        let mut problems = Vec::new();
        let mut prepared = Vec::new();
        for (i, mut emit) in emits.into_iter().enumerate() {
            let ty = std::mem::take(&mut emit.ty);
            let entry = self.inner.types.get(ty.as_str());
            match self.prepare_as(&ty, emit, span, entry) {
                Ok(event) => prepared.push((event, entry)),
                Err(e) if e.kind() == ErrorKind::Validation => {
                    problems.push(format!("event {i} ({ty}): {}", e.message()));
                }
                Err(e) => return Err(e),
            }
        }
        if problems.is_empty() {
            return Ok(prepared);
        }
        Err(Error::new(
            ErrorKind::Validation,
            format!(
                "{} of {} events are invalid; nothing was {outcome}:\n{}",
                problems.len(),
                problems.len() + prepared.len(),
                problems.join("\n")
            ),
        ))
    }

    /// Validates and builds the envelope (not published).
    fn prepare(&self, mut emit: Emit, span: &tracing::Span) -> Result<Event> {
        let ty = std::mem::take(&mut emit.ty);
        let entry = self.inner.types.get(ty.as_str());
        self.prepare_as(&ty, emit, span, entry)
    }

    /// [`prepare`](Self::prepare) of `emit` whose type, `ty`, was taken out of it; `entry`
    /// is the catalogue's entry of `ty`, if it has one.
    fn prepare_as(
        &self,
        ty: &str,
        emit: Emit,
        span: &tracing::Span,
        entry: Option<&TypeEntry>,
    ) -> Result<Event> {
        for (name, value) in [("id", &emit.id), ("source", &emit.source)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(Error::invalid_event(format!(
                    "the `{name}` given to `Emit::{name}` must not be empty"
                )));
            }
        }
        let validated = self.inner.catalog.validate(ty, &emit.data)?;
        // The type and source texts are shared with the bus where they can be, not copied.
        let source = match emit.source {
            Some(source) => Text::Owned(source),
            None => Text::Shared(Arc::clone(&self.inner.source)),
        };
        let mut builder =
            Event::builder_shared(type_text(ty, entry), source).json_value(&emit.data);
        if let Some(id) = emit.id {
            builder = builder.id(id);
        }
        if let Some(time) = emit.time {
            builder = builder.time(Some(time));
        }
        if let Some(uri) = validated.dataschema() {
            builder = builder.dataschema(uri);
        }
        if let Some(key) = emit.key {
            builder = builder.partition_key(key);
        }
        if let Some(subject) = emit.subject {
            builder = builder.subject(subject);
        }
        for (name, value) in &emit.extensions {
            builder = builder.extension(name, value.clone());
        }
        telemetry::inject(&mut builder, span);
        builder.build()
    }

    /// [`prepare_data`](Self::prepare_data) of data already written as JSON `bytes`;
    /// `checked` is the same data to validate with `ty`'s catalogue entry, present when the
    /// catalogue has `ty` (the only case in which validation reads the data).
    fn prepare_encoded(
        &self,
        ty: &str,
        bytes: bytes::Bytes,
        checked: Option<(&Value, &EventTypeInfo)>,
        span: &tracing::Span,
        entry: Option<&TypeEntry>,
    ) -> Result<Event> {
        let (info, value) = match checked {
            Some((value, info)) => (Some(info), value),
            None => (None, &Value::Null),
        };
        let validated = self.inner.catalog.validate_found(ty, info, None, value)?;
        // The type and source texts are shared with the bus, not copied.
        let source = Text::Shared(Arc::clone(&self.inner.source));
        // Set in place: each by-value builder call would move every field of the event.
        let mut builder = Event::builder_shared(type_text(ty, entry), source);
        builder.set_data_json(bytes);
        if let Some(uri) = validated.dataschema() {
            builder.set_dataschema(uri.to_owned());
        }
        telemetry::inject(&mut builder, span);
        builder.build()
    }

    /// [`prepare`](Self::prepare) of a plain emit (type and data, no other attributes),
    /// from borrowed parts.
    fn prepare_data(
        &self,
        ty: &str,
        data: &Value,
        span: &tracing::Span,
        entry: Option<&TypeEntry>,
    ) -> Result<Event> {
        // A `Value` has string keys and finite numbers only: writing it cannot fail.
        let bytes = json_bytes(data).unwrap_or_default();
        let checked = self.inner.catalog.get(ty).map(|info| (data, info));
        self.prepare_encoded(ty, bytes, checked, span, entry)
    }

    /// The topic type `ty` is published to, `entry` being its catalogue entry if it has one
    /// (which holds the same name): [`topic_name`](Self::topic_name) without a copy.
    pub(super) fn topic_of<'a>(&'a self, ty: &'a str, entry: Option<&'a TypeEntry>) -> &'a str {
        match entry {
            Some(entry) => &entry.topic,
            None => self.inner.routes.get(ty).map_or(ty, String::as_str),
        }
    }
}

/// The text of type `ty` for an event: shared with `entry`, the type's catalogue entry, or a
/// copy for a type outside the catalogue.
fn type_text(ty: &str, entry: Option<&TypeEntry>) -> Text {
    match entry {
        Some(entry) => Text::Shared(Arc::clone(&entry.ty)),
        None => Text::Owned(ty.to_owned()),
    }
}

/// An emit ready to publish (see [`Bus::send_prepared`]).
struct Prepared<'a> {
    /// Holds the Bus's shutdown back until the publish is done.
    _token: tokio_util::task::task_tracker::TaskTrackerToken,
    entry: EntryRef<'a>,
    event: Event,
}

impl<'a> Prepared<'a> {
    /// Publishes the event to its type's topic; its id once the transport accepted it.
    ///
    /// An `async` block rather than an `async fn`, which would keep a second copy of `self`;
    /// nothing but the topic is held across the awaits.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of `self` in its future"
    )]
    fn publish(self, bus: &'a Bus) -> impl Future<Output = Result<String>> + Send + 'a {
        async move {
            let topic = bus.type_topic(&self.entry).await?;
            let waiting = match topic.try_publish_now(&self.event) {
                Some(published) => {
                    published?;
                    None
                }
                None => Some(topic.publish(&self.event)),
            };
            if let Some(publish) = waiting {
                publish.await?;
            }
            self.entry.metrics.emitted();
            Ok(self.event.id().to_owned())
        }
    }
}

/// The entry of an event's type: the catalogue's, or the one made for a type outside it.
enum EntryRef<'a> {
    Catalogued(&'a TypeEntry),
    Other(Arc<TypeEntry>),
}

impl std::ops::Deref for EntryRef<'_> {
    type Target = TypeEntry;

    fn deref(&self) -> &TypeEntry {
        match self {
            EntryRef::Catalogued(entry) => entry,
            EntryRef::Other(entry) => entry,
        }
    }
}

/// The events of one topic in [`Bus::emit_batch`].
struct Batch<'a> {
    topic: &'a str,
    events: Vec<Event>,
    /// The catalogue entry of each event's type, if it has one.
    entries: Vec<Option<&'a TypeEntry>>,
}
