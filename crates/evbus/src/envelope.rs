//! The event envelope: CloudEvents 1.0 attributes, extensions and data.
//!
//! An [`Event`] is valid by construction: [`EventBuilder::build`] and the decoders check every
//! attribute, so a transport never sees an event without an id, a source or a type, nor an
//! extension whose name the CloudEvents spec forbids.
//!
//! Data is kept as the exact bytes given (`Bytes`), with its `datacontenttype`. In the
//! structured JSON format (`application/cloudevents+json`) JSON data is written as a JSON value
//! under `data` (byte for byte as given), text as a JSON string, anything else base64-encoded
//! under `data_base64`, as the CloudEvents JSON format specifies.
//!
//! ```
//! use evbus::Event;
//!
//! let event = Event::builder("afterOrderCreate", "/shop/orders")
//!     .json(&serde_json::json!({"orderId": "o-1", "total": 42}))?
//!     .partition_key("o-1")
//!     .build()?;
//! let text = event.to_json()?;
//! assert_eq!(Event::from_json(&text)?, event);
//! # Ok::<(), evbus::Error>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// The largest scratch buffer a thread keeps between two events' JSON (see [`json_bytes`]).
const JSON_SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    static JSON_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `value` written as JSON (the bytes `serde_json` writes, see [`crate::json`]), in a buffer
/// of exactly its size.
///
/// `serde_json` writes into a buffer that grows as it goes (reallocated and copied several
/// times for a few hundred bytes); here it writes into a scratch buffer the thread keeps, and
/// the result is copied once into its own allocation.
pub(crate) fn json_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Bytes> {
    JSON_SCRATCH.with(|scratch| {
        // A `Serialize` that itself writes an event's JSON finds the scratch in use.
        let Ok(mut buffer) = scratch.try_borrow_mut() else {
            let mut own = Vec::new();
            return crate::json::write(&mut own, value).map(|()| Bytes::from(own));
        };
        buffer.clear();
        let written = crate::json::write(&mut buffer, value);
        let bytes = written.map(|()| Bytes::copy_from_slice(&buffer));
        if buffer.capacity() > JSON_SCRATCH_KEEP {
            *buffer = Vec::new();
        }
        bytes
    })
}

/// The CloudEvents spec version evbus writes and reads.
pub const SPEC_VERSION: &str = "1.0";
/// Media type of the CloudEvents structured JSON format.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// Media type of JSON data.
pub const APPLICATION_JSON: &str = "application/json";
/// Extension carrying the partition (ordering) key (CloudEvents Partitioning extension).
pub const PARTITION_KEY: &str = "partitionkey";
/// Extension carrying the W3C trace context `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Extension carrying the W3C trace context `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// Attribute names defined by the CloudEvents core spec or the JSON format; they cannot be used
/// as extension names.
const RESERVED: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// A CloudEvents 1.0 event.
///
/// Cheap to clone: the attributes and data are shared (`Arc`) and copied only when a clone
/// is modified.
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    inner: Arc<Fields>,
}

/// The attributes and data of an [`Event`] (shared between clones).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fields {
    id: String,
    source: Text,
    ty: Text,
    time: Option<Time>,
    datacontenttype: Option<Cow<'static, str>>,
    dataschema: Option<String>,
    subject: Option<String>,
    extensions: BTreeMap<String, String>,
    data: Option<Bytes>,
}

impl Event {
    /// Starts building an event of type `ty` from `source`, with a fresh UUIDv7 id and the
    /// current time.
    pub fn builder(ty: impl Into<String>, source: impl Into<String>) -> EventBuilder {
        Self::builder_of(Text::Owned(ty.into()), Text::Owned(source.into()))
    }

    /// [`builder`](Self::builder) with a type and a source shared with other events (the
    /// Bus's own, no copy per event).
    pub(crate) fn builder_shared(ty: Text, source: Text) -> EventBuilder {
        Self::builder_of(ty, source)
    }

    fn builder_of(ty: Text, source: Text) -> EventBuilder {
        // One read of the clock for both: the id's timestamp and the event's time agree.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        EventBuilder {
            event: Fields {
                id: new_id(&ID_CONTEXT, now),
                source,
                ty,
                time: Some(Time::Read(now)),
                datacontenttype: None,
                dataschema: None,
                subject: None,
                extensions: BTreeMap::new(),
                data: None,
            },
            error: None,
        }
    }

    /// Turns the event back into a builder, to derive a modified copy.
    pub fn into_builder(self) -> EventBuilder {
        EventBuilder {
            event: Arc::unwrap_or_clone(self.inner),
            error: None,
        }
    }

    /// The event id (unique per source).
    pub fn id(&self) -> &str {
        &self.inner.id
    }
    /// The source URI-reference of the event.
    pub fn source(&self) -> &str {
        &self.inner.source
    }
    /// The event type (for example `afterOrderCreate`).
    pub fn ty(&self) -> &str {
        &self.inner.ty
    }
    /// The CloudEvents spec version (always `1.0`).
    pub fn specversion(&self) -> &str {
        SPEC_VERSION
    }
    /// When the occurrence happened.
    pub fn time(&self) -> Option<DateTime<Utc>> {
        self.inner.time.and_then(Time::get)
    }
    /// The media type of [`data`](Self::data).
    pub fn datacontenttype(&self) -> Option<&str> {
        self.inner.datacontenttype.as_deref()
    }
    /// URI of the schema (and version) the data was validated against.
    pub fn dataschema(&self) -> Option<&str> {
        self.inner.dataschema.as_deref()
    }
    /// The subject of the event in the context of its source.
    pub fn subject(&self) -> Option<&str> {
        self.inner.subject.as_deref()
    }
    /// The partition (ordering) key, if set.
    pub fn partition_key(&self) -> Option<&str> {
        self.extension(PARTITION_KEY)
    }
    /// The W3C `traceparent` carried by the event, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.extension(TRACEPARENT)
    }
    /// The W3C `tracestate` carried by the event, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.extension(TRACESTATE)
    }
    /// One extension attribute by name.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.inner.extensions.get(name).map(String::as_str)
    }
    /// Every extension attribute, sorted by name.
    pub fn extensions(&self) -> &BTreeMap<String, String> {
        &self.inner.extensions
    }
    /// The data bytes exactly as given, if any.
    pub fn data(&self) -> Option<&Bytes> {
        self.inner.data.as_ref()
    }

    /// Whether the data is JSON: no content type (JSON is the default in evbus),
    /// `application/json`, `text/json` or any `*/*+json` type.
    pub fn is_json(&self) -> bool {
        is_json_media_type(self.inner.datacontenttype.as_deref())
    }

    /// Deserialises JSON data into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let data = self.inner.data.as_deref().unwrap_or(b"null");
        serde_json::from_slice(data).map_err(|e| {
            Error::invalid_event(format!(
                "event {} ({}): data is not the expected JSON shape: {e}",
                self.inner.id, self.inner.ty
            ))
            .with_source(e)
        })
    }

    /// Sets an extension attribute (validated like [`EventBuilder::extension`]).
    pub fn set_extension(&mut self, name: &str, value: impl Into<String>) -> Result<()> {
        check_extension_name(name)?;
        Arc::make_mut(&mut self.inner)
            .extensions
            .insert(name.to_owned(), value.into());
        Ok(())
    }

    /// Removes an extension attribute, returning its value.
    pub fn remove_extension(&mut self, name: &str) -> Option<String> {
        Arc::make_mut(&mut self.inner).extensions.remove(name)
    }

    /// Size in bytes of the data plus every attribute value: what a transport must carry.
    pub fn encoded_len(&self) -> usize {
        let attrs = self.inner.id.len()
            + self.inner.source.len()
            + self.inner.ty.len()
            + self.inner.datacontenttype.as_deref().map_or(0, str::len)
            + self.inner.dataschema.as_ref().map_or(0, String::len)
            + self.inner.subject.as_ref().map_or(0, String::len)
            + self
                .inner
                .extensions
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        attrs + self.inner.data.as_ref().map_or(0, Bytes::len) + 64
    }

    /// Encodes the event in the CloudEvents structured JSON format.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(&self.to_structured()?)
            .map_err(|e| Error::new(crate::ErrorKind::Internal, format!("encoding event: {e}")))
    }

    /// Encodes the event as a `serde_json::Value` in the structured JSON format.
    pub fn to_json_value(&self) -> Result<serde_json::Value> {
        let text = self.to_json()?;
        serde_json::from_str(&text)
            .map_err(|e| Error::new(crate::ErrorKind::Internal, format!("encoding event: {e}")))
    }

    fn to_structured(&self) -> Result<Structured<'_>> {
        let mut data = None;
        let mut data_base64 = None;
        if let Some(bytes) = &self.inner.data {
            if self.is_json() {
                let text = std::str::from_utf8(bytes).ok();
                // JSON that is the whole of the bytes: `RawValue` leaves out the whitespace
                // around a value, and data must read back byte for byte (a body ending in a
                // newline goes under `data_base64`).
                let raw = text.and_then(|t| {
                    serde_json::from_str::<&RawValue>(t)
                        .ok()
                        .filter(|raw| raw.get().len() == t.len())
                });
                match raw {
                    Some(raw) => data = Some(StructuredData::Raw(raw)),
                    None => {
                        data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                }
            } else if is_text_media_type(self.inner.datacontenttype.as_deref()) {
                match std::str::from_utf8(bytes) {
                    Ok(text) => data = Some(StructuredData::Text(text)),
                    Err(_) => {
                        data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                }
            } else {
                data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
        }
        Ok(Structured {
            specversion: SPEC_VERSION,
            id: &self.inner.id,
            source: &self.inner.source,
            ty: &self.inner.ty,
            time: self.time().map(format_time),
            datacontenttype: self.inner.datacontenttype.as_deref(),
            dataschema: self.inner.dataschema.as_deref(),
            subject: self.inner.subject.as_deref(),
            extensions: &self.inner.extensions,
            data,
            data_base64,
        })
    }

    /// Decodes an event from the CloudEvents structured JSON format.
    pub fn from_json(text: &str) -> Result<Event> {
        let Members(members) = serde_json::from_str(text).map_err(|e| {
            Error::invalid_event(format!("not a CloudEvents JSON object: {e}")).with_source(e)
        })?;
        Self::from_json_members(&members)
    }

    /// Decodes an event from JSON bytes in the structured format.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Event> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::invalid_event(format!("CloudEvents JSON is not UTF-8: {e}")))?;
        Self::from_json(text)
    }

    /// `members` in document order; a name given twice counts with its last value.
    fn from_json_members(members: &[(Cow<'_, str>, &RawValue)]) -> Result<Event> {
        // Where each name is last given. Looked for by scanning while the object is small (an
        // event's usual dozen members); past that, in a map, so that an object of many
        // members costs time in proportion to them, not to their square (100,000 members in
        // 1.2 MB were 5e9 name comparisons, a consumer or the gateway busy for many seconds).
        let last: Option<std::collections::HashMap<&str, usize>> = (members.len() > SCAN_MEMBERS)
            .then(|| {
                members
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _))| (&**name, i))
                    .collect()
            });
        let get = |name: &str| match &last {
            Some(last) => last.get(name).map(|&i| members[i].1),
            None => members
                .iter()
                .rev()
                .find(|(key, _)| key == name)
                .map(|(_, raw)| *raw),
        };
        let is_last = |i: usize| match &last {
            Some(last) => last.get(&*members[i].0) == Some(&i),
            None => !members[i + 1..]
                .iter()
                .any(|(later, _)| *later == members[i].0),
        };
        // A member whose value is `null` is absent (CloudEvents JSON format: a null attribute
        // is treated as unset).
        let present = |name: &str| get(name).filter(|raw| raw.get() != "null");
        let string = |name: &str| -> Result<Option<String>> {
            match get(name) {
                None => Ok(None),
                Some(raw) => match serde_json::from_str::<Option<String>>(raw.get()) {
                    Ok(v) => Ok(v),
                    Err(_) => Err(Error::invalid_event(format!(
                        "attribute `{name}` must be a string, found {}",
                        quoted(raw.get())
                    ))),
                },
            }
        };
        let specversion = string("specversion")?;
        match specversion.as_deref() {
            Some(SPEC_VERSION) => {}
            Some(other) => {
                return Err(Error::invalid_event(format!(
                    "unsupported specversion `{}`; evbus reads CloudEvents 1.0",
                    quoted(other)
                )));
            }
            None => {
                return Err(Error::invalid_event(
                    "missing required attribute `specversion`",
                ));
            }
        }
        let mut builder = EventBuilder::decoded(string("id")?, string("source")?, string("type")?);
        if let Some(time) = string("time")? {
            builder = builder.time_str(&time);
        }
        builder.event.datacontenttype = string("datacontenttype")?.map(Cow::Owned);
        builder.event.dataschema = string("dataschema")?;
        builder.event.subject = string("subject")?;
        let json = is_json_media_type(builder.event.datacontenttype.as_deref());
        for (i, (name, raw)) in members.iter().enumerate() {
            if !is_last(i) {
                continue;
            }
            match &**name {
                "specversion" | "id" | "source" | "type" | "time" | "datacontenttype"
                | "dataschema" | "subject" => {}
                "data" => {
                    if raw.get() == "null" {
                        continue;
                    }
                    if present("data_base64").is_some() {
                        return Err(Error::invalid_event(
                            "an event cannot have both `data` and `data_base64`",
                        ));
                    }
                    let bytes = if json {
                        Bytes::copy_from_slice(raw.get().as_bytes())
                    } else {
                        match serde_json::from_str::<String>(raw.get()) {
                            Ok(text) => Bytes::from(text),
                            Err(_) => Bytes::copy_from_slice(raw.get().as_bytes()),
                        }
                    };
                    builder.event.data = Some(bytes);
                }
                "data_base64" => {
                    if raw.get() == "null" {
                        continue;
                    }
                    let text: String = serde_json::from_str(raw.get()).map_err(|_| {
                        Error::invalid_event("`data_base64` must be a base64 string")
                    })?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text.as_bytes())
                        .map_err(|e| {
                            Error::invalid_event(format!("`data_base64` is not valid base64: {e}"))
                        })?;
                    builder.event.data = Some(Bytes::from(bytes));
                }
                ext => {
                    // A number is kept as written: read as a `Number` it would be rewritten
                    // (`1e2` as `100.0`, `-0` as `-0.0`, a 30-digit integer rounded to an
                    // `f64`). CloudEvents has integers only, but the gateway's contract (and
                    // JSON Schema, for which `1e2` is an integer) takes any JSON number.
                    if is_number_literal(raw.get()) {
                        builder = builder.extension(ext, raw.get());
                        continue;
                    }
                    let value: serde_json::Value =
                        serde_json::from_str(raw.get()).map_err(|e| {
                            Error::invalid_event(format!("extension `{}`: {e}", quoted(ext)))
                        })?;
                    let value = match value {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Bool(b) => b.to_string(),
                        serde_json::Value::Null => continue,
                        other => {
                            return Err(Error::invalid_event(format!(
                                "extension `{}` must be a string, boolean or integer, found {}",
                                quoted(ext),
                                quoted(&other.to_string())
                            )));
                        }
                    };
                    builder = builder.extension(ext, value);
                }
            }
        }
        builder.build()
    }
}

/// The most bytes of a foreign value an error message quotes.
const QUOTED_MAX: usize = 128;

/// `text` as an error message quotes it: whole when short, else its first [`QUOTED_MAX`]
/// bytes (cut at a character) and its length. A decoder's error quotes what a foreign
/// producer sent, and becomes the reason of the dead-letter record, an attribute: one as
/// large as the message could make that record too large for the dead-letter queue even
/// without its data, and the message would come back after every visibility timeout.
pub(crate) fn quoted(text: &str) -> Cow<'_, str> {
    cut(text, QUOTED_MAX)
}

/// `text` whole when at most `max` bytes, else its first `max` bytes (cut at a character)
/// followed by `… (N bytes)`, N its whole length.
pub(crate) fn cut(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!(
        "{}… ({} bytes)",
        char_prefix(text, max),
        text.len()
    ))
}

/// The longest prefix of `text` of at most `max` bytes that ends at a character boundary.
pub(crate) fn char_prefix(text: &str, max: usize) -> &str {
    let end = (0..=text.len().min(max))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

/// Objects of up to this many members have their names compared by scanning
/// ([`Event::from_json`]); larger ones are indexed in a map.
const SCAN_MEMBERS: usize = 32;

/// Whether a JSON value (valid JSON, as a `RawValue` is) is a number: it starts with `-` or a
/// digit.
fn is_number_literal(raw: &str) -> bool {
    raw.bytes()
        .next()
        .is_some_and(|b| b == b'-' || b.is_ascii_digit())
}

/// The members of a JSON object in document order, each value left unparsed; a name is
/// borrowed from the text unless it has escapes. What [`Event::from_json`] reads, without a
/// map or an allocated name per member.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(10));
                while let Some(Name(name)) = map.next_key()? {
                    members.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A member's name: borrowed from the text where it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Event");
        d.field("id", &self.inner.id)
            .field("source", &self.inner.source)
            .field("type", &self.inner.ty)
            .field("time", &self.time())
            .field("datacontenttype", &self.inner.datacontenttype)
            .field("dataschema", &self.inner.dataschema)
            .field("subject", &self.inner.subject)
            .field("extensions", &self.inner.extensions);
        match &self.inner.data {
            Some(data) => d.field("data_len", &data.len()),
            None => d.field("data_len", &0),
        };
        d.finish()
    }
}

/// An attribute's text: owned, or shared between events (one allocation for all the events
/// a Bus emits with the same type and source).
#[derive(Clone)]
pub(crate) enum Text {
    Owned(String),
    Shared(Arc<str>),
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Text::Owned(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Text {}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

/// An event's `time`: as given (or decoded), or the clock reading a new event was made at.
///
/// A reading is turned into a date only when someone asks for the time (an adapter writing
/// it, a handler reading it): working out the calendar date of a timestamp is about a
/// hundred instructions that an in-process event nobody asks the time of need not pay.
#[derive(Clone, Copy)]
enum Time {
    Given(DateTime<Utc>),
    /// Since the Unix epoch.
    Read(std::time::Duration),
}

impl Time {
    fn get(self) -> Option<DateTime<Utc>> {
        match self {
            Time::Given(time) => Some(time),
            Time::Read(since_epoch) => {
                DateTime::from_timestamp(since_epoch.as_secs() as i64, since_epoch.subsec_nanos())
            }
        }
    }
}

impl PartialEq for Time {
    /// The same instant, however it is held.
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Time {}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.get(), f)
    }
}

/// Builds a valid [`Event`]; see [`Event::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    event: Fields,
    error: Option<String>,
}

/// The attributes besides `specversion` that every event has, in the order a missing one is
/// reported.
pub(crate) const REQUIRED_ATTRIBUTES: [&str; 3] = ["id", "source", "type"];

impl EventBuilder {
    fn decoded(id: Option<String>, source: Option<String>, ty: Option<String>) -> Self {
        let present = [id.is_some(), source.is_some(), ty.is_some()];
        let mut builder = EventBuilder {
            event: Fields {
                id: id.unwrap_or_default(),
                source: Text::Owned(source.unwrap_or_default()),
                ty: Text::Owned(ty.unwrap_or_default()),
                time: None,
                datacontenttype: None,
                dataschema: None,
                subject: None,
                extensions: BTreeMap::new(),
                data: None,
            },
            error: None,
        };
        builder.require(present);
        builder
    }

    /// An empty builder for a binary-mode decoder to fill with
    /// [`set_attribute`](Self::set_attribute); [`require`](Self::require) then names a
    /// required attribute that never came.
    pub(crate) fn decoding() -> Self {
        Self::decoded(
            Some(String::new()),
            Some(String::new()),
            Some(String::new()),
        )
    }

    /// Fails with `missing required attribute` for the first of [`REQUIRED_ATTRIBUTES`] not
    /// `present`, ahead of any error the attributes made.
    pub(crate) fn require(&mut self, present: [bool; 3]) {
        if let Some(name) = REQUIRED_ATTRIBUTES
            .into_iter()
            .zip(present)
            .find_map(|(name, present)| (!present).then_some(name))
        {
            self.error = Some(format!("missing required attribute `{name}`"));
        }
    }

    /// Builder for decoders: starts from the three required attributes, no time.
    pub fn from_parts(id: Option<String>, source: Option<String>, ty: Option<String>) -> Self {
        Self::decoded(id, source, ty)
    }

    /// Records the first error; [`build`](Self::build) returns it.
    fn fail_in_place(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    /// For binary-mode decoders: sets CloudEvents attribute `attr` (lower-case, without the
    /// protocol's prefix) in place, so that filling a builder moves it nowhere. Names other
    /// than the required attributes and `time`, `dataschema`, `subject` and
    /// `datacontenttype` are extensions.
    /// Whether attribute `attr`, set once already while decoding, holds something other than
    /// `value` (`time` compares instants). An extension not set yet never conflicts.
    pub(crate) fn conflicts(&self, attr: &str, value: &str) -> bool {
        let e = &self.event;
        match attr {
            "id" => e.id != value,
            "source" => *e.source != *value,
            "type" => *e.ty != *value,
            "time" => parse_time(value).ok().map(Time::Given) != e.time,
            "dataschema" => e.dataschema.as_deref() != Some(value),
            "subject" => e.subject.as_deref() != Some(value),
            "datacontenttype" => e.datacontenttype.as_deref() != Some(value),
            other => e.extensions.get(other).is_some_and(|v| v != value),
        }
    }

    pub(crate) fn set_attribute(&mut self, attr: &str, value: Cow<'_, str>) {
        match attr {
            "id" => self.event.id = value.into_owned(),
            "source" => self.event.source = Text::Owned(value.into_owned()),
            "type" => self.event.ty = Text::Owned(value.into_owned()),
            "time" => self.set_time_str(&value),
            "dataschema" => self.event.dataschema = Some(value.into_owned()),
            "subject" => self.event.subject = Some(value.into_owned()),
            "datacontenttype" => self.set_media_type(&value),
            _ => self.set_extension(attr, value.into_owned()),
        }
    }

    /// Replaces the generated id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = id.into();
        self
    }
    /// Replaces the event type.
    pub fn ty(mut self, ty: impl Into<String>) -> Self {
        self.event.ty = Text::Owned(ty.into());
        self
    }
    /// Replaces the source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.event.source = Text::Owned(source.into());
        self
    }
    /// Sets the time (or clears it with `None`).
    pub fn time(mut self, time: Option<DateTime<Utc>>) -> Self {
        self.event.time = time.map(Time::Given);
        self
    }
    /// Sets the time from an RFC 3339 string.
    pub fn time_str(mut self, time: &str) -> Self {
        self.set_time_str(time);
        self
    }

    fn set_time_str(&mut self, time: &str) {
        match parse_time(time) {
            Ok(t) => self.event.time = Some(Time::Given(t)),
            Err(e) => self.fail_in_place(format!(
                "attribute `time` is not an RFC 3339 timestamp: {e}"
            )),
        }
    }
    /// Sets `dataschema`.
    pub fn dataschema(mut self, uri: impl Into<String>) -> Self {
        self.set_dataschema(uri.into());
        self
    }

    /// [`dataschema`](Self::dataschema) in place (see [`set_data_json`](Self::set_data_json)).
    pub(crate) fn set_dataschema(&mut self, uri: String) {
        self.event.dataschema = Some(uri);
    }
    /// Sets `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.event.subject = Some(subject.into());
        self
    }
    /// Sets `datacontenttype` without touching the data.
    pub fn datacontenttype(mut self, media_type: impl Into<String>) -> Self {
        self.event.datacontenttype = Some(Cow::Owned(media_type.into()));
        self
    }
    /// [`datacontenttype`](Self::datacontenttype) from a borrowed name, in place: JSON's, by
    /// far the most common, is shared instead of copied.
    pub(crate) fn set_media_type(&mut self, media_type: &str) {
        self.event.datacontenttype = Some(match media_type {
            APPLICATION_JSON => Cow::Borrowed(APPLICATION_JSON),
            other => Cow::Owned(other.to_owned()),
        });
    }
    /// Sets the partition (ordering) key extension.
    pub fn partition_key(self, key: impl Into<String>) -> Self {
        self.extension(PARTITION_KEY, key)
    }
    /// Sets the W3C `traceparent` extension.
    pub fn traceparent(self, value: impl Into<String>) -> Self {
        self.extension(TRACEPARENT, value)
    }
    /// Sets an extension attribute. Names are 1–20 lowercase ASCII letters or digits and not
    /// a core attribute name (CloudEvents 1.0 §Extension Context Attributes).
    pub fn extension(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_extension(name, value.into());
        self
    }

    /// [`extension`](Self::extension) in place (see [`set_data_json`](Self::set_data_json)).
    pub(crate) fn set_extension(&mut self, name: &str, value: String) {
        match check_extension_name(name) {
            Ok(()) => {
                self.event.extensions.insert(name.to_owned(), value);
            }
            Err(e) => self.fail_in_place(e.message().to_owned()),
        }
    }
    /// Serialises `value` as JSON data (`datacontenttype: application/json`).
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self> {
        let bytes = json_bytes(value)
            .map_err(|e| Error::invalid_event(format!("data cannot be encoded as JSON: {e}")))?;
        Ok(self.data_json(bytes))
    }
    /// [`json`](Self::json) of a JSON value, which always serialises.
    pub(crate) fn json_value(self, value: &serde_json::Value) -> Self {
        // A `Value` has string keys and finite numbers only: writing it cannot fail.
        self.data_json(json_bytes(value).unwrap_or_default())
    }
    /// Sets data already written as JSON.
    pub(crate) fn data_json(mut self, bytes: Bytes) -> Self {
        self.set_data_json(bytes);
        self
    }

    /// [`data_json`](Self::data_json) in place. The builder holds every field of the event
    /// by value: each by-value setter moves them all, so the Bus's emit sets in place.
    pub(crate) fn set_data_json(&mut self, bytes: Bytes) {
        self.event.data = Some(bytes);
        self.event.datacontenttype = Some(Cow::Borrowed(APPLICATION_JSON));
    }
    /// Sets the data bytes and their media type.
    pub fn data(mut self, media_type: impl Into<String>, bytes: impl Into<Bytes>) -> Self {
        self.event.data = Some(bytes.into());
        self.event.datacontenttype = Some(Cow::Owned(media_type.into()));
        self
    }
    /// Sets the data bytes, keeping the current media type.
    pub fn data_bytes(mut self, bytes: Option<Bytes>) -> Self {
        self.event.data = bytes;
        self
    }
    /// Checks every attribute and returns the event.
    pub fn build(self) -> Result<Event> {
        if let Some(message) = self.error {
            return Err(Error::invalid_event(message));
        }
        // Checked where they are, then moved once, into the event's allocation.
        let e = &self.event;
        if e.id.is_empty() {
            return Err(Error::invalid_event("attribute `id` must not be empty"));
        }
        if e.source.is_empty() {
            return Err(Error::invalid_event("attribute `source` must not be empty"));
        }
        if e.ty.is_empty() {
            return Err(Error::invalid_event("attribute `type` must not be empty"));
        }
        for (name, value) in [
            ("datacontenttype", e.datacontenttype.as_deref()),
            ("dataschema", e.dataschema.as_deref()),
            ("subject", e.subject.as_deref()),
        ] {
            if value == Some("") {
                return Err(Error::invalid_event(format!(
                    "attribute `{name}` must not be empty when present"
                )));
            }
        }
        Ok(Event {
            inner: Arc::new(self.event),
        })
    }
}

/// The counter behind every id of the process: ids made in the same millisecond still sort
/// in the order they were made, across threads (what `Uuid::now_v7` does with a context of
/// its own, which would read the clock a second time).
static ID_CONTEXT: Mutex<uuid::ContextV7> = Mutex::new(uuid::ContextV7::new());

/// A fresh UUIDv7 for `now` (since the Unix epoch) from `context`, in its usual text form
/// (lowercase, hyphenated), written without the formatting machinery of `to_string`.
fn new_id(context: &Mutex<uuid::ContextV7>, now: std::time::Duration) -> String {
    let timestamp = uuid::Timestamp::from_unix(context, now.as_secs(), now.subsec_nanos());
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::new_v7(timestamp)
        .hyphenated()
        .encode_lower(&mut buffer)
        .to_owned()
}

/// Checks an extension attribute name against CloudEvents 1.0 naming rules.
pub fn check_extension_name(name: &str) -> Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > 20 || !valid_chars {
        return Err(Error::invalid_event(format!(
            "extension name `{}` is invalid: use 1 to 20 lowercase letters or digits",
            quoted(name)
        )));
    }
    if RESERVED.contains(&name) {
        return Err(Error::invalid_event(format!(
            "`{name}` is a CloudEvents core attribute, not an extension"
        )));
    }
    Ok(())
}

/// Formats a timestamp the way evbus writes `time`: RFC 3339, UTC, `Z`, sub-seconds as needed
/// (none, or 3, 6 or 9 digits: chrono's `to_rfc3339_opts(SecondsFormat::AutoSi, true)`).
pub fn format_time(time: DateTime<Utc>) -> String {
    with_time_text(time, str::to_owned)
}

/// Calls `with` with `time` as [`format_time`] writes it, without allocating for the usual
/// timestamps (years 0 to 9999, no leap second).
pub(crate) fn with_time_text<R>(time: DateTime<Utc>, with: impl FnOnce(&str) -> R) -> R {
    match TimeText::new(time) {
        Some(text) => with(text.as_str()),
        None => with(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// Parses an RFC 3339 timestamp exactly as chrono's `DateTime::parse_from_rfc3339` does, in
/// UTC. The form [`format_time`] writes, which is what evbus reads back on every consume, is
/// read without chrono's general parser (`EventBuilder::time_str` of a nanosecond timestamp:
/// 522 → 342 instructions); anything else, valid or not, is chrono's.
pub(crate) fn parse_time(text: &str) -> std::result::Result<DateTime<Utc>, chrono::ParseError> {
    match parse_written_time(text) {
        Some(time) => Ok(time),
        None => DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z` with a valid date and time and no leap
/// second; `None` for anything else.
fn parse_written_time(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    // The fraction's digits, and what one unit of it is in nanoseconds.
    let (fraction, unit) = match b.len() {
        20 => (0, 0),
        24 => (3, 1_000_000),
        27 => (6, 1_000),
        30 => (9, 1),
        _ => return None,
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
        || (fraction > 0 && b[19] != b'.')
    {
        return None;
    }
    let year = i32::try_from(read_digits::<4>(b, 0)?).ok()?;
    let date =
        chrono::NaiveDate::from_ymd_opt(year, read_digits::<2>(b, 5)?, read_digits::<2>(b, 8)?)?;
    let nanos = match fraction {
        0 => 0,
        3 => read_digits::<3>(b, 20)?,
        6 => read_digits::<6>(b, 20)?,
        _ => read_digits::<9>(b, 20)?,
    } * unit;
    // A leap second (`:60`) is not a time here: chrono's own rules read it.
    let (hour, minute, second) = (
        read_digits::<2>(b, 11)?,
        read_digits::<2>(b, 14)?,
        read_digits::<2>(b, 17)?,
    );
    let clock = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    Some(date.and_time(clock).and_utc())
}

/// The `N` decimal digits of `bytes` from `from`, if they are all digits.
fn read_digits<const N: usize>(bytes: &[u8], from: usize) -> Option<u32> {
    let digits: &[u8; N] = bytes.get(from..from + N)?.try_into().ok()?;
    let mut n = 0u32;
    for &c in digits {
        let digit = c.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n = n * 10 + u32::from(digit);
    }
    Some(n)
}

/// A timestamp written as [`format_time`] writes it, in a buffer of its own.
///
/// chrono's RFC 3339 writer goes through `core::fmt` and a `String`, and every binary-mode
/// publish writes one `time`; this writes the digits directly (`binding::visit` of an event
/// with the Redis header style: 858 → 475 instructions). Timestamps whose year is not four
/// digits, and leap seconds, are left to chrono (`new` returns `None`); tests compare the
/// two.
struct TimeText {
    bytes: [u8; TimeText::MAX],
    len: usize,
}

impl TimeText {
    /// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`
    const MAX: usize = 30;

    fn new(time: DateTime<Utc>) -> Option<Self> {
        use chrono::{Datelike, Timelike};
        let naive = time.naive_utc();
        let (date, clock) = (naive.date(), naive.time());
        let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
        let nanos = clock.nanosecond();
        if nanos >= 1_000_000_000 {
            return None;
        }
        let mut text = TimeText {
            bytes: [0; Self::MAX],
            len: 0,
        };
        text.digits(year, 4);
        text.push(b'-');
        text.digits(date.month(), 2);
        text.push(b'-');
        text.digits(date.day(), 2);
        text.push(b'T');
        text.digits(clock.hour(), 2);
        text.push(b':');
        text.digits(clock.minute(), 2);
        text.push(b':');
        text.digits(clock.second(), 2);
        if nanos != 0 {
            text.push(b'.');
            if nanos % 1_000_000 == 0 {
                text.digits(nanos / 1_000_000, 3);
            } else if nanos % 1_000 == 0 {
                text.digits(nanos / 1_000, 6);
            } else {
                text.digits(nanos, 9);
            }
        }
        text.push(b'Z');
        Some(text)
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// `value`'s last `width` decimal digits, zero-padded.
    fn digits(&mut self, mut value: u32, width: usize) {
        for at in (self.len..self.len + width).rev() {
            self.bytes[at] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only ASCII digits and separators")
    }
}

/// Whether a media type denotes JSON (absent counts as JSON).
pub fn is_json_media_type(media_type: Option<&str>) -> bool {
    let Some(mt) = media_type else { return true };
    let essence = mt
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == APPLICATION_JSON || essence == "text/json" || essence.ends_with("+json")
}

fn is_text_media_type(media_type: Option<&str>) -> bool {
    media_type.is_some_and(|mt| mt.trim_start().to_ascii_lowercase().starts_with("text/"))
}

#[derive(Serialize)]
struct Structured<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(flatten)]
    extensions: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<StructuredData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum StructuredData<'a> {
    Raw(&'a RawValue),
    Text(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20,000 pseudo-random instants over years 0 to 9999, with every kind of fraction (none,
    /// milli-, micro- and nanoseconds).
    fn spread_of_times(mut seed: u64) -> impl Iterator<Item = DateTime<Utc>> {
        (0..20_000).map(move |_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let secs = (seed % 315_537_897_600) as i64 - 62_167_219_200;
            let unit = [1, 1_000, 1_000_000, 1_000_000_000][(seed >> 62) as usize];
            let nanos = (seed >> 20) as u32 % 1_000_000_000 / unit * unit;
            DateTime::<Utc>::from_timestamp(secs, nanos).expect("years 0 to 9999")
        })
    }

    fn chrono_text(time: DateTime<Utc>) -> String {
        time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    #[test]
    fn time_is_written_as_chrono_writes_it() {
        let at = |secs: i64, nanos: u32| DateTime::<Utc>::from_timestamp(secs, nanos).unwrap();
        let mut times = vec![
            at(0, 0),
            at(1_700_000_000, 0),
            at(1_700_000_000, 120_000_000),
            at(1_700_000_000, 1_000_000),
            at(1_700_000_000, 123_456_000),
            at(1_700_000_000, 1_000),
            at(1_700_000_000, 123_456_789),
            at(1_700_000_000, 1),
            at(1_700_000_000, 999_999_999),
            // Year 0 and 9999, the last instant chrono writes with four digits.
            at(-62_167_219_200, 0),
            at(253_402_300_799, 999_000_000),
            // Left to chrono: five-digit and negative years, a leap second.
            at(253_402_300_800, 0),
            at(-62_167_219_201, 5_000),
            at(1_483_228_799, 1_500_000_000),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        times.extend(spread_of_times(0x9e37_79b9_7f4a_7c15));
        for time in times {
            let expected = chrono_text(time);
            assert_eq!(format_time(time), expected, "{time:?}");
            assert_eq!(with_time_text(time, str::to_owned), expected, "{time:?}");
        }
    }

    fn chrono_parse(text: &str) -> std::result::Result<DateTime<Utc>, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc))
    }

    #[test]
    fn time_is_read_as_chrono_reads_it() {
        let mut texts: Vec<String> = [
            "2026-12-04T16:50:00Z",
            "2026-12-04T16:50:00.123Z",
            "2026-12-04T16:50:00.123456Z",
            "2026-12-04T16:50:00.123456789Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            // Valid, in forms evbus does not write: chrono's.
            "2026-12-04t16:50:00z",
            "2026-12-04 16:50:00Z",
            "2026-12-04T16:50:00+02:00",
            "2026-12-04T16:50:00.1Z",
            "2026-12-04T16:50:00.1234567891Z",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            // Invalid.
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T23:60:00Z",
            "2026-12-04T23:59:61Z",
            "2026-12-04T16:50:00.12xZ",
            "2026-12-04T16:50:00,123Z",
            "+2026-12-04T16:50:00Z",
            "2026-12-04T16:50:00",
            "",
        ]
        .map(str::to_owned)
        .to_vec();
        // Every byte of written timestamps replaced by each of a few others.
        for written in [
            "2024-02-29T23:59:59Z",
            "2026-12-04T16:50:00.120Z",
            "2026-12-04T16:50:00.000120Z",
            "2026-12-04T16:50:00.000000120Z",
        ] {
            for at in 0..written.len() {
                for c in [
                    '0', '1', '3', '5', '9', '-', ':', '.', 'T', 'Z', ' ', '+', 'x',
                ] {
                    let mut text = written.to_owned();
                    text.replace_range(at..=at, &c.to_string());
                    texts.push(text);
                }
            }
        }
        for text in &texts {
            let ours = parse_time(text);
            match chrono_parse(text) {
                Ok(expected) => assert_eq!(ours.ok(), Some(expected), "{text}"),
                Err(expected) => {
                    assert_eq!(
                        ours.err().map(|e| e.to_string()),
                        Some(expected.to_string()),
                        "{text}"
                    );
                }
            }
        }
        // What evbus writes reads back to the same instant.
        for time in spread_of_times(0x2545_f491_4f6c_dd1d) {
            let text = format_time(time);
            assert!(parse_written_time(&text).is_some(), "{text}");
            assert_eq!(parse_time(&text).ok(), Some(time), "{text}");
        }
    }

    fn sample() -> Event {
        Event::builder("afterOrderCreate", "/shop/orders")
            .json(&serde_json::json!({"orderId": "o-1", "name": "Zoë ☃ 😀"}))
            .unwrap()
            .subject("o-1")
            .dataschema("urn:evbus:schema:afterOrderCreate:1")
            .partition_key("o-1")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .extension("tenant", "acme")
            .build()
            .unwrap()
    }

    /// Data whose `Serialize` writes an event's JSON itself, while the outer one is written.
    struct Nested(u32);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            let inner = json_bytes(&[self.0]).map_err(serde::ser::Error::custom)?;
            s.serialize_str(std::str::from_utf8(&inner).map_err(serde::ser::Error::custom)?)
        }
    }

    #[test]
    fn json_is_written_exactly_sized_including_from_inside_another_serialisation() {
        let big = "x".repeat(JSON_SCRATCH_KEEP * 2);
        for _ in 0..2 {
            let bytes = json_bytes(&(Nested(7), "tail", &big[..3])).unwrap();
            assert_eq!(&bytes[..], br#"["[7]","tail","xxx"]"#);
            // A payload larger than the scratch the thread keeps is written whole, and the
            // next, small one is not disturbed by it.
            assert_eq!(json_bytes(&big).unwrap().len(), big.len() + 2);
        }
        let failed = json_bytes(&std::collections::BTreeMap::from([((1, 2), 3)]));
        assert!(failed.is_err());
        assert_eq!(&json_bytes(&"ok").unwrap()[..], br#""ok""#);
    }

    #[test]
    fn ids_are_uuid_v7() {
        let e = sample();
        let id = uuid::Uuid::parse_str(e.id()).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }

    fn id_millis(id: &str) -> u64 {
        let id = uuid::Uuid::parse_str(id).unwrap();
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        secs * 1000 + u64::from(nanos / 1_000_000)
    }

    #[test]
    fn an_id_is_made_for_the_instant_it_is_given() {
        // A context of its own: the process-wide one never goes back to an earlier instant.
        let context = Mutex::new(uuid::ContextV7::new());
        let now = std::time::Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(id_millis(&new_id(&context, now)), 1_700_000_000_123);
        let later = std::time::Duration::new(1_700_000_005, 0);
        assert_eq!(id_millis(&new_id(&context, later)), 1_700_000_005_000);
    }

    #[test]
    fn an_id_is_never_older_than_the_event_time() {
        // One clock read makes both; the id's counter can only move its timestamp forward
        // (other threads made ids at a later instant first, or the clock stepped back).
        for _ in 0..100 {
            let e = Event::builder("t", "s").build().unwrap();
            let time_ms = u64::try_from(e.time().unwrap().timestamp_millis()).unwrap();
            let id_ms = id_millis(e.id());
            assert!(id_ms >= time_ms, "id at {id_ms} ms, time at {time_ms} ms");
        }
    }

    #[test]
    fn ids_made_together_on_many_threads_are_unique_and_sort_in_order_on_each() {
        let per_thread: Vec<Vec<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..2_000)
                            .map(|_| Event::builder("t", "s").build().unwrap().id().to_owned())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ids in &per_thread {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        }
        let all: std::collections::HashSet<&String> = per_thread.iter().flatten().collect();
        assert_eq!(all.len(), 4 * 2_000);
    }

    #[test]
    fn structured_json_reads_escaped_names_and_the_last_of_a_name_given_twice() {
        let e = Event::from_json(
            r#"{"specversion":"1.0","\u0069d":"e-1","source":"/s","type":"t","type":"u",
                "data":{"a":1},"data":null,"tenant":"x","tenant":"y"}"#,
        )
        .unwrap();
        assert_eq!(e.id(), "e-1");
        assert_eq!(e.ty(), "u");
        assert!(e.data().is_none());
        assert_eq!(e.extensions().get("tenant").map(String::as_str), Some("y"));
        let err = Event::from_json("[1]").unwrap_err();
        assert!(
            err.message().contains("not a CloudEvents JSON object"),
            "{err}"
        );
    }

    #[test]
    fn structured_json_round_trips_every_attribute() {
        let e = sample();
        let text = e.to_json().unwrap();
        let back = Event::from_json(&text).unwrap();
        assert_eq!(back, e);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "afterOrderCreate");
        assert_eq!(v["partitionkey"], "o-1");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["data"]["name"], "Zoë ☃ 😀");
    }

    #[test]
    fn json_data_keeps_its_exact_bytes() {
        let raw = br#"{"b":1,   "a":[1,2.50,"\u00e9"]}"#;
        let e = Event::builder("t", "s")
            .data(APPLICATION_JSON, &raw[..])
            .build()
            .unwrap();
        let back = Event::from_json(&e.to_json().unwrap()).unwrap();
        assert_eq!(back.data().unwrap().as_ref(), &raw[..]);
    }

    #[test]
    fn binary_data_uses_data_base64() {
        let bytes: Vec<u8> = (0..=255).collect();
        let e = Event::builder("t", "s")
            .data("application/octet-stream", bytes.clone())
            .build()
            .unwrap();
        let v = e.to_json_value().unwrap();
        assert!(v.get("data").is_none());
        assert!(v["data_base64"].is_string());
        let back = Event::from_json(&e.to_json().unwrap()).unwrap();
        assert_eq!(back.data().unwrap().as_ref(), &bytes[..]);
    }

    #[test]
    fn text_data_is_a_json_string() {
        let e = Event::builder("t", "s")
            .data("text/plain", "héllo")
            .build()
            .unwrap();
        assert_eq!(e.to_json_value().unwrap()["data"], "héllo");
        let back = Event::from_json(&e.to_json().unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn missing_required_attributes_are_named() {
        let err = Event::from_json(r#"{"specversion":"1.0","source":"s","type":"t"}"#).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidEvent);
        assert!(err.message().contains("`id`"), "{err}");
        let err = Event::from_json(r#"{"id":"1","source":"s","type":"t"}"#).unwrap_err();
        assert!(err.message().contains("specversion"), "{err}");
        let err = Event::from_json(r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#)
            .unwrap_err();
        assert!(err.message().contains("0.3"), "{err}");
    }

    #[test]
    fn invalid_extension_names_are_refused() {
        for bad in ["", "Upper", "with-dash", "abcdefghijklmnopqrstu", "subject"] {
            let err = Event::builder("t", "s")
                .extension(bad, "v")
                .build()
                .unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidEvent, "{bad}");
        }
    }

    #[test]
    fn non_string_extensions_are_read_as_their_text() {
        let e = Event::from_json(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","count":3,"flag":true}"#,
        )
        .unwrap();
        assert_eq!(e.extension("count"), Some("3"));
        assert_eq!(e.extension("flag"), Some("true"));
    }

    #[test]
    fn bad_time_is_a_clear_error() {
        let err = Event::from_json(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#,
        )
        .unwrap_err();
        assert!(err.message().contains("RFC 3339"), "{err}");
    }
}
