//! CloudEvents AMQP protocol binding, binary mode, through [`evbus::binding`]:
//!
//! - every attribute and extension is an application-properties header (`headers` table)
//!   named `cloudEvents_<name>` (the binding's JMS-safe prefix), its value an AMQP long
//!   string; the older `cloudEvents:<name>` is accepted when reading;
//! - `datacontenttype` is the AMQP `content-type` property;
//! - the data is the message body, byte for byte;
//! - `message-id` is the event id and `delivery-mode` is 2 (persistent);
//! - the `evbus-copy` header (16 hex digits, a long string like the others) numbers the
//!   message among everything its transport published, so that two copies of one event (a
//!   publish retried after its confirm was lost) can be told apart: a consumer keeps what
//!   it knows of a message's attempts per copy (see `consumer`). Readers other than evbus
//!   can ignore it;
//! - the `evbus-attempts` header (a long-long integer) is on a message a consumer published
//!   again to retry it: how many handler attempts were made before this copy. A message
//!   without it starts at attempt 1.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::{Error, ErrorKind, Event, Result};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// The prefix written on attribute headers.
pub(crate) const PREFIX: &str = "cloudEvents_";
/// The older prefix of the AMQP binding, accepted when reading.
pub(crate) const LEGACY_PREFIX: &str = "cloudEvents:";

/// The header that tells copies of one event apart.
pub(crate) const COPY_HEADER: &str = "evbus-copy";

/// The header that carries the attempts made before a retried copy.
pub(crate) const ATTEMPTS_HEADER: &str = "evbus-attempts";

/// Numbers the messages of one transport for [`COPY_HEADER`]: a random start (the 62 random
/// bits of a v4 UUID's second half), then one more per message, so that the numbers of two
/// transports do not meet. (Not a v7 UUID: successive ones in a process share their random
/// bits, which would start two transports of one process a few numbers apart.)
pub(crate) struct Copies(AtomicU64);

impl Copies {
    pub(crate) fn new() -> Self {
        Copies(AtomicU64::new(uuid::Uuid::new_v4().as_u64_pair().1))
    }

    fn next(&self) -> String {
        format!("{:016x}", self.0.fetch_add(1, Ordering::Relaxed))
    }
}

/// Which copy of a message a delivery is: its [`COPY_HEADER`], or else (a message published
/// by another client) its `message-id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CopyKey {
    Numbered(u64),
    MessageId(String),
}

impl CopyKey {
    pub(crate) fn of(properties: &BasicProperties) -> Option<CopyKey> {
        let numbered = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(COPY_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                _ => None,
            })
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if let Some(n) = numbered {
            return Some(CopyKey::Numbered(n));
        }
        properties
            .message_id()
            .as_ref()
            .map(|id| CopyKey::MessageId(id.to_string()))
    }
}

/// The attempts made before this copy of a message: its [`ATTEMPTS_HEADER`] (an integer or
/// decimal text), 0 when it has none or it is not a number.
pub(crate) fn attempts_made(properties: &BasicProperties) -> u32 {
    let Some(value) = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER))
    else {
        return 0;
    };
    let made = integer_of(value).or_else(|| text_of(value)?.trim().parse().ok());
    made.map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// The properties of the copy that retries a delivered message after `attempts` attempts:
/// the same properties and headers, a new copy number, [`ATTEMPTS_HEADER`] set, and without
/// what RabbitMQ added on delivery (`x-delivery-count`), which counts again from the copy.
pub(crate) fn retry_properties(
    properties: &BasicProperties,
    attempts: u32,
    copies: &Copies,
) -> BasicProperties {
    let mut inner = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    inner.retain(|name, _| name.as_str() != "x-delivery-count");
    let mut table = FieldTable::from(inner);
    table.insert(
        COPY_HEADER.into(),
        AMQPValue::LongString(copies.next().into()),
    );
    table.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    properties.clone().with_headers(table)
}

/// The properties (headers included) and body of one copy of `event`, numbered by `copies`.
pub(crate) fn encode(event: &Event, copies: &Copies) -> (BasicProperties, Bytes) {
    let (headers, body) = binding::encode(event, HeaderStyle::AMQP);
    let mut table = FieldTable::default();
    table.insert(
        COPY_HEADER.into(),
        AMQPValue::LongString(copies.next().into()),
    );
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    for (name, value) in headers {
        if name == HeaderStyle::AMQP.content_type {
            match ShortString::try_new(value.clone()) {
                Ok(ct) => properties = properties.with_content_type(ct),
                // Longer than the property allows: carried as an attribute header instead.
                Err(_) => {
                    table.insert(
                        format!("{PREFIX}datacontenttype").into(),
                        AMQPValue::LongString(value.into()),
                    );
                }
            }
            continue;
        }
        // Attribute names are at most 20 characters: the header name always fits.
        table.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    if let Ok(id) = ShortString::try_new(event.id()) {
        properties = properties.with_message_id(id);
    }
    (properties.with_headers(table), body)
}

/// Header room a published event keeps for what a retry copy adds to its properties (a copy
/// number and an attempt count, see [`retry_properties`]): a message that fits only without
/// them would be published, and its retry refused.
pub(crate) const RETRY_HEADER_ROOM: usize = 256;

/// Refuses message `id`, whose properties are `properties`, when they do not fit one content
/// header frame of a connection whose `frame_max` is `frame_max`, less `room` bytes: RabbitMQ
/// closes the whole connection on a larger frame (`FRAME_ERROR`, `frame_too_large`), failing
/// every publish and consumer on it, so it is never sent. The attributes travel there as
/// headers; only the body is split across frames.
pub(crate) fn check_header_frame(
    id: &str,
    properties: &BasicProperties,
    frame_max: u32,
    room: usize,
) -> Result<()> {
    // The frame's payload (what `frame_max` less the frame header and end octet bounds):
    // class, weight and body size, then the property flags and values.
    let written = lapin::protocol::basic::gen_properties::<Vec<u8>>(properties)(Vec::new().into())
        .map_or(usize::MAX, |c| c.write.len());
    let size = 12usize.saturating_add(written);
    let limit = (frame_max as usize).saturating_sub(8).saturating_sub(room);
    if size > limit {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "message {id}: its attributes take {size} bytes of AMQP properties, more than \
                 one header frame carries (frame_max {frame_max}, less {room} kept for a \
                 retry's headers)"
            ),
        )
        .with_hint("keep large values in the data, or send a reference to them"));
    }
    Ok(())
}

/// Decodes a delivered message. Fails with [`ErrorKind::InvalidEvent`](evbus::ErrorKind)
/// when it is not a binary-mode CloudEvent (no `cloudEvents_specversion`, an attribute that
/// is a table, an array or bytes, invalid attributes).
pub(crate) fn decode(properties: &BasicProperties, body: Bytes) -> Result<Event> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            let name = name.as_str();
            let attribute = name
                .strip_prefix(PREFIX)
                .or_else(|| name.strip_prefix(LEGACY_PREFIX));
            let Some(attribute) = attribute else { continue };
            let text = text_of(value).ok_or_else(|| {
                Error::invalid_event(format!(
                    "header `{name}` is not a string, a number, a boolean or a timestamp \
                     (AMQP type {:?})",
                    value.get_type()
                ))
            })?;
            pairs.push((format!("{PREFIX}{attribute}"), text));
        }
    }
    if let Some(ct) = properties.content_type() {
        pairs.push((HeaderStyle::AMQP.content_type.to_owned(), ct.to_string()));
    }
    binding::decode(pairs, body, HeaderStyle::AMQP)
}

/// A header value as text: strings (UTF-8), integers, decimals and floating-point numbers,
/// booleans, and timestamps as RFC 3339 (the CloudEvents AMQP binding lets a producer send
/// `time` as an AMQP timestamp). Numbers other than integers are numbers too: a stock
/// producer's client picks the AMQP type from its language's value (pika writes a Python
/// `Decimal` as an AMQP decimal), and an attribute is text whatever type carried it.
pub(crate) fn text_of(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::DecimalValue(d) => decimal_text(d.scale, d.value),
        // Infinities and NaN are no number a CloudEvents attribute could mean.
        AMQPValue::Float(f) if f.is_finite() => f.to_string(),
        AMQPValue::Double(f) if f.is_finite() => f.to_string(),
        AMQPValue::Timestamp(seconds) => {
            chrono::DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0)?
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        }
        other => integer_of(other)?.to_string(),
    })
}

/// An AMQP decimal (`value` × 10^-`scale`) written out in decimal notation with its `scale`
/// digits after the point, as written (`1.50` stays `1.50`). The 32 bits of `value` are read
/// as a signed integer, as clients write a negative decimal (pika packs it signed; the
/// client library here reads it unsigned).
fn decimal_text(scale: u8, value: u32) -> String {
    let value = i64::from(value.cast_signed());
    let digits = value.unsigned_abs().to_string();
    let scale = usize::from(scale);
    let sign = if value < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// An integer header value (RabbitMQ writes `x-delivery-count` as a long or long-long).
pub(crate) fn integer_of(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
        _ => return None,
    })
}

/// Every header and property of a message as raw bytes, for the dead-letter record of a
/// message that could not be decoded.
pub(crate) fn raw_headers(properties: &BasicProperties) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some(ct) = properties.content_type() {
        out.push(("content-type".to_owned(), ct.as_str().as_bytes().to_vec()));
    }
    if let Some(id) = properties.message_id() {
        out.push(("message-id".to_owned(), id.as_str().as_bytes().to_vec()));
    }
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            out.push((name.to_string(), header_bytes(value)));
        }
    }
    out
}

/// A header value as raw bytes: strings and byte arrays as they are, other values as text.
fn header_bytes(value: &AMQPValue) -> Vec<u8> {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        other => text_of(other)
            .unwrap_or_else(|| format!("{other:?}"))
            .into_bytes(),
    }
}

/// Headers that change from one delivery of a message to the next: RabbitMQ's count of its
/// deliveries (quorum queues), and the copy number and attempts of the copy a consumer
/// publishes when it gives a message back (a look at a dead-letter queue gives back all it saw).
const VOLATILE_HEADERS: [&str; 3] = ["x-delivery-count", COPY_HEADER, ATTEMPTS_HEADER];

/// The broker id of a message that is not a CloudEvent, for its `evbus.undecodable`
/// placeholder (`amqp:<queue>/<id>`): the same at every delivery of the message, so that two
/// looks at a queue list it under one id and `evbus dlq show <id>` finds it. RabbitMQ gives a
/// message no id of its own (delivery tags start again at 1 on every channel): its
/// `message-id` when it has one (as [`CopyKey`] tells copies apart), else `sha256-` and 32 hex
/// digits of a SHA-256 of its body and of every property and header that stays the same from
/// one delivery to the next (not the delivery tag, the redelivered flag, the exchange and
/// routing key it was last published with, nor [`VOLATILE_HEADERS`]). Two messages alike in
/// all of these get the same id, as two records of one event do.
pub(crate) fn undecodable_id(properties: &BasicProperties, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    if let Some(id) = properties.message_id().as_ref().map(|id| id.as_str())
        && !id.is_empty()
    {
        return id.to_owned();
    }
    let mut hash = Sha256::new();
    // Each part as a name, a length and the bytes: no two messages hash the same parts.
    let mut part = |name: &str, bytes: &[u8]| {
        hash.update((name.len() as u64).to_be_bytes());
        hash.update(name.as_bytes());
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    part("body", body);
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().as_bytes().to_vec());
    let number = |n: Option<u64>| n.map(|n| n.to_string().into_bytes());
    let fields = [
        ("content-type", text(properties.content_type())),
        ("content-encoding", text(properties.content_encoding())),
        (
            "delivery-mode",
            number(properties.delivery_mode().map(u64::from)),
        ),
        ("priority", number(properties.priority().map(u64::from))),
        ("correlation-id", text(properties.correlation_id())),
        ("reply-to", text(properties.reply_to())),
        ("expiration", text(properties.expiration())),
        ("timestamp", number(*properties.timestamp())),
        ("type", text(properties.kind())),
        ("user-id", text(properties.user_id())),
        ("app-id", text(properties.app_id())),
        ("cluster-id", text(properties.cluster_id())),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            part(name, &value);
        }
    }
    if let Some(headers) = properties.headers() {
        // A field table is ordered by name.
        for (name, value) in headers.inner() {
            if !VOLATILE_HEADERS.contains(&name.as_str()) {
                part(&format!("header:{name}"), &header_bytes(value));
            }
        }
    }
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event::builder("afterOrderCreate", "/shop/orders")
            .json(&serde_json::json!({"name": "Zoë 😀"}))
            .unwrap()
            .subject("o 1")
            .partition_key("o-1")
            .extension("tenant", "açme")
            .build()
            .unwrap()
    }

    /// RabbitMQ closed the connection on a header frame of 200,319 bytes (`frame_too_large`,
    /// `frame_max` 131,072) for an event with a 200,000-character subject: the measure is
    /// that frame's payload, and what does not fit is refused before it is sent.
    #[test]
    fn properties_that_do_not_fit_one_frame_are_refused() {
        let copies = Copies::new();
        let with_subject = |n: usize| {
            Event::builder("t", "/s")
                .id("6b9f1c1e-2f55-4d1a-9a43-3c1d0f2b7a10")
                .subject("s".repeat(n))
                .json(&1)
                .unwrap()
                .build()
                .unwrap()
        };
        let big = with_subject(200_000);
        let (properties, _) = encode(&big, &copies);
        let err =
            check_header_frame(big.id(), &properties, 131_072, RETRY_HEADER_ROOM).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(err.message().contains("frame_max 131072"), "{err}");
        let size: usize = err
            .message()
            .split("take ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("the size in the message");
        // Within a few bytes of RabbitMQ's count (the copy number's length varies).
        assert!(size.abs_diff(200_319) < 64, "{size}");
        let small = with_subject(1000);
        let (properties, _) = encode(&small, &copies);
        check_header_frame(small.id(), &properties, 131_072, RETRY_HEADER_ROOM).unwrap();
        // The room kept for a retry copy's headers: refused a little under the frame.
        let near = with_subject(131_072 - 8 - 300);
        let (properties, _) = encode(&near, &copies);
        assert!(check_header_frame(near.id(), &properties, 131_072, RETRY_HEADER_ROOM).is_err());
    }

    fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        properties.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn attributes_are_cloud_events_underscore_long_strings() {
        let event = sample();
        let (properties, body) = encode(&event, &Copies::new());
        assert_eq!(
            header(&properties, "cloudEvents_type"),
            Some(&AMQPValue::LongString("afterOrderCreate".into()))
        );
        assert_eq!(
            header(&properties, "cloudEvents_specversion"),
            Some(&AMQPValue::LongString("1.0".into()))
        );
        assert!(header(&properties, "cloudEvents_tenant").is_some());
        assert!(header(&properties, "content-type").is_none());
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(
            properties.message_id().as_ref().map(|c| c.as_str()),
            Some(event.id())
        );
        assert_eq!(body, event.data().cloned().unwrap());
        assert_eq!(decode(&properties, body.clone()).unwrap(), event);
    }

    #[test]
    fn a_retry_copy_carries_its_attempts_and_a_new_number_but_not_the_delivery_count() {
        let event = sample();
        let copies = Copies::new();
        let (published, body) = encode(&event, &copies);
        assert_eq!(attempts_made(&published), 0, "a first copy");
        // As RabbitMQ delivers it after two returns.
        let mut headers = published.headers().clone().unwrap_or_default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        let delivered = published.clone().with_headers(headers);

        let retry = retry_properties(&delivered, 3, &copies);
        assert_eq!(attempts_made(&retry), 3);
        assert!(header(&retry, "x-delivery-count").is_none());
        assert_ne!(CopyKey::of(&retry), CopyKey::of(&delivered), "a new copy");
        assert_eq!(retry.message_id(), delivered.message_id());
        assert_eq!(retry.content_type(), delivered.content_type());
        assert_eq!(*retry.delivery_mode(), Some(2));
        // The event is the same, and the header is no attribute of it.
        let again = decode(&retry, body.clone()).unwrap();
        assert_eq!(again, event);
        assert_eq!(again.extension(ATTEMPTS_HEADER), None);
        // A retry of the retry counts on.
        assert_eq!(attempts_made(&retry_properties(&retry, 4, &copies)), 4);
    }

    #[test]
    fn a_foreign_message_keeps_its_placeholder_id_from_one_delivery_to_the_next() {
        let mut headers = FieldTable::default();
        headers.insert("origin".into(), AMQPValue::LongString("legacy".into()));
        let published = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let body = b"\xff not a cloud event";
        let id = undecodable_id(&published, body);
        assert!(
            id.len() == 39
                && id.starts_with("sha256-")
                && id[7..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        // Delivered again by RabbitMQ, and given back as a retry copy.
        let mut headers = published.headers().clone().unwrap_or_default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let redelivered = published.clone().with_headers(headers);
        assert_eq!(undecodable_id(&redelivered, body), id);
        let copies = Copies::new();
        let retried = retry_properties(&redelivered, 4, &copies);
        assert_eq!(undecodable_id(&retried, body), id);
        assert_eq!(
            undecodable_id(&retry_properties(&retried, 5, &copies), body),
            id
        );
        // Another body, another property, another header: another message.
        assert_ne!(undecodable_id(&published, b"\xfe not a cloud event"), id);
        assert_ne!(
            undecodable_id(&published.clone().with_timestamp(1_700_000_001), body),
            id
        );
        let mut headers = published.headers().clone().unwrap_or_default();
        headers.insert("origin".into(), AMQPValue::LongString("other".into()));
        assert_ne!(
            undecodable_id(&published.clone().with_headers(headers), body),
            id
        );
        // A message id is the id.
        let named = published.clone().with_message_id("legacy-42".into());
        assert_eq!(undecodable_id(&named, body), "legacy-42");
        assert_eq!(
            undecodable_id(&retry_properties(&named, 2, &copies), b"other"),
            "legacy-42"
        );
    }

    #[test]
    fn attempts_made_reads_integers_and_decimal_text_and_nothing_else() {
        let with = |value: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(ATTEMPTS_HEADER.into(), value);
            attempts_made(&BasicProperties::default().with_headers(headers))
        };
        assert_eq!(with(AMQPValue::LongInt(2)), 2);
        assert_eq!(with(AMQPValue::ShortShortUInt(7)), 7);
        assert_eq!(with(AMQPValue::LongString("5".into())), 5);
        assert_eq!(with(AMQPValue::LongLongInt(-3)), 0, "negative");
        assert_eq!(
            with(AMQPValue::LongLongInt(i64::MAX)),
            u32::MAX,
            "saturates"
        );
        assert_eq!(with(AMQPValue::LongString("many".into())), 0);
        assert_eq!(with(AMQPValue::Boolean(true)), 0);
        assert_eq!(attempts_made(&BasicProperties::default()), 0);
    }

    #[test]
    fn each_copy_of_an_event_is_numbered_and_foreign_ones_are_known_by_their_id() {
        let event = sample();
        let copies = Copies::new();
        let (first, _) = encode(&event, &copies);
        let (second, _) = encode(&event, &copies);
        let (a, b) = (CopyKey::of(&first), CopyKey::of(&second));
        assert!(matches!(a, Some(CopyKey::Numbered(_))), "{a:?}");
        assert_ne!(a, b, "two copies of one event");
        // Two transports start far apart.
        let (other, _) = encode(&event, &Copies::new());
        let (Some(CopyKey::Numbered(x)), Some(CopyKey::Numbered(y))) = (a, CopyKey::of(&other))
        else {
            panic!("numbered copies");
        };
        assert!(x.abs_diff(y) > 1 << 32, "{x:x} and {y:x}");
        // The copy number is no attribute of the event.
        assert_eq!(
            decode(&first, Bytes::from_static(b""))
                .unwrap()
                .extension(COPY_HEADER),
            None
        );
        let foreign = BasicProperties::default().with_message_id("m-1".into());
        assert_eq!(
            CopyKey::of(&foreign),
            Some(CopyKey::MessageId("m-1".to_owned()))
        );
        assert_eq!(CopyKey::of(&BasicProperties::default()), None);
    }

    #[test]
    fn the_colon_prefix_of_older_producers_is_read_too() {
        let mut table = FieldTable::default();
        for (k, v) in [
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", "42"),
            ("cloudEvents:source", "/legacy"),
            ("cloudEvents:type", "t"),
        ] {
            table.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let properties = BasicProperties::default()
            .with_headers(table)
            .with_content_type("text/plain".into());
        let event = decode(&properties, Bytes::from_static(b"hi")).unwrap();
        assert_eq!((event.id(), event.source()), ("42", "/legacy"));
        assert_eq!(event.datacontenttype(), Some("text/plain"));
    }

    #[test]
    fn a_long_content_type_travels_as_a_header() {
        let ct = format!("application/x.{};v=1", "a".repeat(300));
        let event = Event::builder("t", "s")
            .data(ct.clone(), b"x".to_vec())
            .build()
            .unwrap();
        let (properties, body) = encode(&event, &Copies::new());
        assert!(properties.content_type().is_none());
        assert_eq!(
            decode(&properties, body.clone()).unwrap().datacontenttype(),
            Some(&*ct)
        );
    }

    #[test]
    fn foreign_messages_are_invalid_events() {
        let err = decode(&BasicProperties::default(), Bytes::from_static(b"{}")).unwrap_err();
        assert_eq!(err.kind(), evbus::ErrorKind::InvalidEvent);
        let mut table = FieldTable::default();
        table.insert(
            "cloudEvents_specversion".into(),
            AMQPValue::FieldArray(Default::default()),
        );
        let properties = BasicProperties::default().with_headers(table);
        let err = decode(&properties, Bytes::from_static(b"")).unwrap_err();
        assert!(err.message().contains("not a string"), "{err}");
        let raw = raw_headers(&properties);
        assert_eq!(raw[0].0, "cloudEvents_specversion");
    }

    #[test]
    fn integer_headers_are_read_whatever_their_width() {
        assert_eq!(integer_of(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(integer_of(&AMQPValue::LongInt(2)), Some(2));
        assert_eq!(integer_of(&AMQPValue::ShortShortUInt(1)), Some(1));
        assert_eq!(integer_of(&AMQPValue::LongString("1".into())), None);
    }

    #[test]
    fn decimals_and_floats_are_read_as_their_numbers() {
        let decimal =
            |scale, value| AMQPValue::DecimalValue(lapin::types::DecimalValue { scale, value });
        assert_eq!(text_of(&decimal(1, 15)).as_deref(), Some("1.5"));
        assert_eq!(text_of(&decimal(2, 150)).as_deref(), Some("1.50"));
        assert_eq!(text_of(&decimal(3, 5)).as_deref(), Some("0.005"));
        assert_eq!(text_of(&decimal(0, 42)).as_deref(), Some("42"));
        // A negative decimal, as pika packs it (two's complement).
        assert_eq!(
            text_of(&decimal(1, (-15_i32).cast_unsigned())).as_deref(),
            Some("-1.5")
        );
        assert_eq!(text_of(&AMQPValue::Double(2.25)).as_deref(), Some("2.25"));
        assert_eq!(text_of(&AMQPValue::Float(-0.5)).as_deref(), Some("-0.5"));
        assert_eq!(text_of(&AMQPValue::Double(f64::NAN)), None);
    }
}
