//! CloudEvents *binary mode*: attributes as protocol headers, data as the message body.
//! [`decode`] also reads *structured mode* (the whole event as JSON in the body, announced by
//! an `application/cloudevents+json` content type), as stock CloudEvents SDKs may send it.
//!
//! Every adapter maps an [`Event`] to its broker's headers through this one module, so the
//! rules (which attributes, which prefix, how the content type travels, how values are
//! escaped) are written once. A [`HeaderStyle`] names the protocol binding:
//!
//! | style | attribute header | content type header | value escaping |
//! |---|---|---|---|
//! | [`HeaderStyle::KAFKA`] | `ce_<name>` | `content-type` | none (UTF-8) |
//! | [`HeaderStyle::HTTP`] | `ce-<name>` | `Content-Type` | percent-encoding |
//! | [`HeaderStyle::NATS`] | `ce-<name>` | `Content-Type` | none (UTF-8) |
//! | [`HeaderStyle::AMQP`] | `cloudEvents_<name>` (`cloudEvents:<name>` also read) | `content-type` property | none |
//! | [`HeaderStyle::REDIS`] | `ce_<name>` | `content-type` | none (UTF-8) |
//!
//! ```
//! use evbus::{binding::{self, HeaderStyle}, Event};
//!
//! let event = Event::builder("afterOrderCreate", "/shop").json(&1)?.build()?;
//! let (headers, body) = binding::encode(&event, HeaderStyle::KAFKA);
//! assert!(headers.iter().any(|(k, v)| k == "ce_type" && v == "afterOrderCreate"));
//! let back = binding::decode(headers, body, HeaderStyle::KAFKA)?;
//! assert_eq!(back, event);
//! # Ok::<(), evbus::Error>(())
//! ```

use std::borrow::Cow;

use bytes::Bytes;

use crate::envelope::{Event, EventBuilder, REQUIRED_ATTRIBUTES, quoted, with_time_text};
use crate::error::{Error, Result};

/// How a protocol binding names and escapes CloudEvents attributes in headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderStyle {
    /// Prefix of attribute headers (`ce_`, `ce-`, `cloudEvents:`).
    pub prefix: &'static str,
    /// Header carrying `datacontenttype`.
    pub content_type: &'static str,
    /// Whether header names compare case-insensitively when decoding.
    pub case_insensitive: bool,
    /// Whether values are percent-encoded (HTTP binding §3.1.3.2).
    pub percent_encode: bool,
}

impl HeaderStyle {
    /// Kafka protocol binding.
    pub const KAFKA: HeaderStyle = HeaderStyle {
        prefix: "ce_",
        content_type: "content-type",
        case_insensitive: false,
        percent_encode: false,
    };
    /// HTTP protocol binding (webhooks, the gateway).
    pub const HTTP: HeaderStyle = HeaderStyle {
        prefix: "ce-",
        content_type: "Content-Type",
        case_insensitive: true,
        percent_encode: true,
    };
    /// NATS protocol binding (NATS headers).
    pub const NATS: HeaderStyle = HeaderStyle {
        prefix: "ce-",
        content_type: "Content-Type",
        case_insensitive: true,
        percent_encode: false,
    };
    /// AMQP protocol binding (application properties), with the JMS-safe prefix the binding
    /// prefers; decoding also accepts its older `cloudEvents:` form.
    pub const AMQP: HeaderStyle = HeaderStyle {
        prefix: "cloudEvents_",
        content_type: "content-type",
        case_insensitive: false,
        percent_encode: false,
    };
    /// Redis Streams: entry fields named like the Kafka binding, so `XRANGE` reads naturally.
    pub const REDIS: HeaderStyle = HeaderStyle {
        prefix: "ce_",
        content_type: "content-type",
        case_insensitive: false,
        percent_encode: false,
    };
}

/// Encodes `event` as binary-mode headers and a body (the data bytes, empty when absent).
pub fn encode(event: &Event, style: HeaderStyle) -> (Vec<(String, String)>, Bytes) {
    let mut headers = Vec::with_capacity(8 + event.extensions().len());
    visit(event, style, |prefix, name, value| {
        let mut header = String::with_capacity(prefix.len() + name.len());
        header.push_str(prefix);
        header.push_str(name);
        headers.push((header, value.to_owned()));
    });
    let body = event.data().cloned().unwrap_or_default();
    (headers, body)
}

/// The headers [`encode`] makes, handed to `header` one by one without being collected:
/// each header's name in two parts (the style's prefix and the attribute name; for the
/// content type an empty prefix and the style's content-type header), and its value,
/// escaped as the style requires. For an adapter that writes headers straight into its
/// broker's request (the Redis `XADD`), so a publish costs no allocation per header.
pub fn visit(event: &Event, style: HeaderStyle, mut header: impl FnMut(&str, &str, &str)) {
    let mut attribute = |name: &str, value: &str| {
        if style.percent_encode {
            header(style.prefix, name, &percent_encode(value));
        } else {
            header(style.prefix, name, value);
        }
    };
    attribute("specversion", event.specversion());
    attribute("id", event.id());
    attribute("source", event.source());
    attribute("type", event.ty());
    if let Some(time) = event.time() {
        with_time_text(time, |text| attribute("time", text));
    }
    if let Some(v) = event.dataschema() {
        attribute("dataschema", v);
    }
    if let Some(v) = event.subject() {
        attribute("subject", v);
    }
    for (name, value) in event.extensions() {
        attribute(name, value);
    }
    if let Some(ct) = event.datacontenttype() {
        header("", style.content_type, ct);
    }
}

/// Decodes binary-mode headers and body into an [`Event`]. Headers that are neither
/// CloudEvents attributes nor the content type are ignored. An empty body with no content type
/// means no data.
///
/// A message whose content type is a CloudEvents event format and that has no `specversion`
/// attribute header is read in *structured mode* instead, as the protocol bindings ask of a
/// receiver: the body is the whole event in the JSON format (`application/cloudevents+json`,
/// what a stock CloudEvents SDK sends in that mode), and other attribute headers are not
/// read. Other event formats and the batched mode are refused with an error that names them.
/// (A binary-mode event always has `specversion`; one whose data is itself a CloudEvent
/// still reads as binary mode.)
pub fn decode<I, K, V>(headers: I, body: Bytes, style: HeaderStyle) -> Result<Event>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    // Attributes are set in place as they come, borrowed from the headers: a value is copied
    // only where the event keeps it, and a name only when it has to be lower-cased.
    let mut builder = EventBuilder::decoding();
    let mut specversion: Option<Result<(), String>> = None;
    let mut content_type_header = false;
    let mut has_data = !body.is_empty();
    // The attributes of the core spec set so far (bit i: `CORE_ATTRIBUTES[i]`), so that one
    // given twice is told apart from one given once; extensions are looked up in the builder.
    let mut seen = 0u8;
    // The first `datacontenttype` attribute, when a content-type header may have overridden
    // it in the builder.
    let mut datacontenttype: Option<String> = None;
    // The first reason the headers are not a binary-mode event. Kept rather than returned, so
    // that a structured-mode message (whose content type may come after attribute headers it
    // makes irrelevant) is still recognised.
    let mut failed: Option<Error> = None;
    // The content type, when it names a CloudEvents event format.
    let mut structured: Option<String> = None;
    // Whether a `specversion` attribute header was given, read or not: a header after the
    // first failure is not read, and whether the message is in structured mode must not
    // depend on where `specversion` comes among headers brokers do not keep in order.
    let mut specversion_header = false;
    let names_specversion =
        |name: &str| strip_prefix(name, style).is_some_and(|attr| attr == "specversion");
    for (name, value) in headers {
        let name = name.as_ref();
        let matches_ct = if style.case_insensitive {
            name.eq_ignore_ascii_case(style.content_type)
        } else {
            name == style.content_type
        };
        if matches_ct && structured.is_none() && is_structured(value.as_ref()) {
            structured = Some(value.as_ref().to_owned());
        }
        if failed.is_some() {
            specversion_header |= !matches_ct && names_specversion(name);
            continue;
        }
        let value: Cow<'_, str> = if style.percent_encode {
            match percent_decode(value.as_ref()) {
                Ok(value) => Cow::Owned(value),
                Err(e) => {
                    specversion_header |= !matches_ct && names_specversion(name);
                    failed = Some(e);
                    continue;
                }
            }
        } else {
            Cow::Borrowed(value.as_ref())
        };
        if matches_ct {
            if content_type_header && !builder.conflicts("datacontenttype", &value) {
                continue;
            }
            if content_type_header {
                failed = Some(conflict(style.content_type));
                continue;
            }
            // The protocol's content type wins over a `datacontenttype` attribute.
            builder.set_media_type(&value);
            content_type_header = true;
            has_data = true;
            continue;
        }
        let Some(attr) = strip_prefix(name, style) else {
            continue;
        };
        match &*attr {
            "specversion" => {
                specversion_header = true;
                let this = match &*value {
                    crate::envelope::SPEC_VERSION => Ok(()),
                    other => Err(other.to_owned()),
                };
                if specversion.as_ref().is_some_and(|first| *first != this) {
                    failed = Some(conflict("specversion"));
                    continue;
                }
                specversion = Some(this);
            }
            "datacontenttype" => {
                has_data = true;
                match &datacontenttype {
                    Some(first) if *first != *value => {
                        failed = Some(conflict("datacontenttype"));
                        continue;
                    }
                    Some(_) => {}
                    None => datacontenttype = Some(value.clone().into_owned()),
                }
                if !content_type_header {
                    builder.set_media_type(&value);
                }
            }
            attr => {
                let bit = CORE_ATTRIBUTES
                    .iter()
                    .position(|c| *c == attr)
                    .map(|i| 1u8 << i);
                let again = match bit {
                    Some(bit) => seen & bit != 0,
                    // An extension: set before if the builder has it.
                    None => true,
                };
                if again && builder.conflicts(attr, &value) {
                    failed = Some(conflict(attr));
                    continue;
                }
                if let Some(bit) = bit {
                    seen |= bit;
                }
                builder.set_attribute(attr, value);
            }
        }
    }
    // Structured mode: a CloudEvents format as the content type and no `specversion`
    // attribute header. A binary-mode event always has that header, so an event whose own
    // data is a CloudEvent (`datacontenttype` `application/cloudevents+json`, carried as the
    // content type) still reads as binary mode, as evbus writes it, in any header order.
    if let (false, Some(content_type)) = (specversion_header, &structured) {
        return decode_structured(content_type, &body);
    }
    if let Some(error) = failed {
        return Err(error);
    }
    match specversion {
        Some(Ok(())) => {}
        Some(Err(other)) => {
            return Err(Error::invalid_event(format!(
                "unsupported specversion `{}` in `{}specversion`",
                quoted(&other),
                style.prefix
            )));
        }
        None => {
            return Err(Error::invalid_event(format!(
                "missing `{}specversion` header: not a binary-mode CloudEvent",
                style.prefix
            )));
        }
    }
    // The required attributes are the first of the core ones.
    builder.require([0, 1, 2].map(|i| seen & (1 << i) != 0));
    builder.data_bytes(has_data.then_some(body)).build()
}

/// Whether a content type names a CloudEvents event format (`application/cloudevents...`):
/// the message is then in *structured mode*, the whole event in its body.
fn is_structured(content_type: &str) -> bool {
    let media = content_type.trim_start();
    media
        .get(..STRUCTURED_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(STRUCTURED_PREFIX))
}

/// Media types start with this when a message carries a whole CloudEvent in an event format.
const STRUCTURED_PREFIX: &str = "application/cloudevents";

/// Decodes a structured-mode message: the body is the event in the JSON event format
/// ([`Event::from_json_slice`]); the other headers are not read (the protocol bindings give
/// the body precedence). Other event formats, and the batched mode, are refused by name.
fn decode_structured(content_type: &str, body: &[u8]) -> Result<Event> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        crate::envelope::CLOUDEVENTS_JSON => Event::from_json_slice(body).map_err(|e| {
            Error::invalid_event(format!(
                "structured-mode CloudEvent ({}): {}",
                crate::envelope::CLOUDEVENTS_JSON,
                e.message()
            ))
        }),
        "application/cloudevents-batch+json" => Err(Error::invalid_event(
            "a batch of CloudEvents (application/cloudevents-batch+json): evbus reads one \
             event per message, in binary or structured mode",
        )),
        other => Err(Error::invalid_event(format!(
            "structured-mode CloudEvent in the event format `{}`: evbus reads the JSON \
             format ({})",
            quoted(other),
            crate::envelope::CLOUDEVENTS_JSON
        ))),
    }
}

/// The core attributes (other than `specversion` and `datacontenttype`, handled apart) whose
/// decoding builder starts with a value of its own, so a second occurrence is found by
/// position, not by looking. The first three are [`REQUIRED_ATTRIBUTES`], in their order:
/// the bits of those say which required attributes were given.
const CORE_ATTRIBUTES: [&str; 6] = [
    REQUIRED_ATTRIBUTES[0],
    REQUIRED_ATTRIBUTES[1],
    REQUIRED_ATTRIBUTES[2],
    "time",
    "dataschema",
    "subject",
];

/// An attribute given twice with different values: which one the producer meant is unknown,
/// and brokers do not agree on header order (NATS headers come out of a hash map, AMQP
/// tables sorted by name), so picking one would decode the same message differently on
/// different adapters, or on different deliveries.
fn conflict(attr: &str) -> Error {
    Error::invalid_event(format!(
        "attribute `{}` is given more than once, with different values",
        quoted(attr)
    ))
}

/// The AMQP binding's older prefix, still accepted when decoding [`HeaderStyle::AMQP`].
const AMQP_COLON_PREFIX: &str = "cloudEvents:";

/// The attribute name of header `name`, lower-cased (borrowed when it already is).
fn strip_prefix(name: &str, style: HeaderStyle) -> Option<Cow<'_, str>> {
    fn lower(tail: &str) -> Cow<'_, str> {
        match tail.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(tail.to_ascii_lowercase()),
            false => Cow::Borrowed(tail),
        }
    }
    if style == HeaderStyle::AMQP
        && let Some(tail) = name
            .strip_prefix(AMQP_COLON_PREFIX)
            .filter(|t| !t.is_empty())
    {
        return Some(lower(tail));
    }
    let p = style.prefix;
    // A foreign header name may have a multi-byte character across the prefix's length.
    if name.len() <= p.len() || !name.is_char_boundary(p.len()) {
        return None;
    }
    let (head, tail) = name.split_at(p.len());
    let prefixed = if style.case_insensitive {
        head.eq_ignore_ascii_case(p)
    } else {
        head == p
    };
    prefixed.then(|| lower(tail))
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(value: &str) -> Result<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::invalid_event(format!(
                        "bad percent-encoding in header value `{}`",
                        quoted(value)
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::invalid_event(format!("header value `{}` is not UTF-8", quoted(value))))
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
            .extension("tenant", "açme \"q\" 100%")
            .build()
            .unwrap()
    }

    const STYLES: [HeaderStyle; 5] = [
        HeaderStyle::KAFKA,
        HeaderStyle::HTTP,
        HeaderStyle::NATS,
        HeaderStyle::AMQP,
        HeaderStyle::REDIS,
    ];

    #[test]
    fn every_style_reads_a_structured_mode_message() {
        let e = sample();
        let body = Bytes::from(e.to_json().unwrap());
        for style in STYLES {
            for ct in [
                "application/cloudevents+json",
                "Application/CloudEvents+JSON; charset=UTF-8",
            ] {
                let headers = [(style.content_type, ct)];
                assert_eq!(
                    decode(headers, body.clone(), style).unwrap(),
                    e,
                    "{style:?} {ct}"
                );
            }
        }
    }

    #[test]
    fn a_structured_message_is_read_from_its_body_whatever_attribute_headers_come_first() {
        let e = sample();
        let body = Bytes::from(e.to_json().unwrap());
        for style in STYLES {
            let id = format!("{}id", style.prefix);
            // Headers that would fail a binary-mode read (an attribute twice, two values),
            // and one that would override the body's, but no `specversion`: the body is the
            // event.
            let headers = vec![
                (id.clone(), "other".to_owned()),
                (id, "another".to_owned()),
                (
                    style.content_type.to_owned(),
                    "application/cloudevents+json".to_owned(),
                ),
            ];
            assert_eq!(
                decode(headers, body.clone(), style).unwrap(),
                e,
                "{style:?}"
            );
        }
    }

    #[test]
    fn an_event_whose_data_is_a_cloudevent_still_reads_as_binary_mode() {
        let inner = sample();
        let outer = Event::builder("envelopeForwarded", "/relay")
            .data(
                crate::envelope::CLOUDEVENTS_JSON,
                inner.to_json().unwrap().into_bytes(),
            )
            .build()
            .unwrap();
        for style in STYLES {
            let (headers, body) = encode(&outer, style);
            let back = decode(headers, body, style).unwrap();
            assert_eq!(back, outer, "{style:?}");
            assert_eq!(back.ty(), "envelopeForwarded");
        }
    }

    #[test]
    fn structured_mode_in_another_format_or_batched_is_refused_by_name() {
        let style = HeaderStyle::KAFKA;
        let batch = decode(
            [("content-type", "application/cloudevents-batch+json")],
            Bytes::from_static(b"[]"),
            style,
        )
        .unwrap_err();
        assert!(batch.message().contains("batch"), "{batch}");
        let avro = decode(
            [("content-type", "application/cloudevents+avro")],
            Bytes::from_static(b"\x00"),
            style,
        )
        .unwrap_err();
        assert!(
            avro.message().contains("application/cloudevents+avro"),
            "{avro}"
        );
        let broken = decode(
            [("content-type", "application/cloudevents+json")],
            Bytes::from_static(b"{\"specversion\":\"1.0\""),
            style,
        )
        .unwrap_err();
        assert!(broken.message().contains("structured-mode"), "{broken}");
    }

    #[test]
    fn every_style_round_trips() {
        for style in [
            HeaderStyle::KAFKA,
            HeaderStyle::HTTP,
            HeaderStyle::NATS,
            HeaderStyle::AMQP,
            HeaderStyle::REDIS,
        ] {
            let e = sample();
            let (headers, body) = encode(&e, style);
            assert_eq!(decode(headers, body, style).unwrap(), e, "{style:?}");
        }
    }

    #[test]
    fn http_values_are_percent_encoded_ascii() {
        let (headers, _) = encode(&sample(), HeaderStyle::HTTP);
        let tenant = headers.iter().find(|(k, _)| k == "ce-tenant").unwrap();
        assert_eq!(tenant.1, "a%C3%A7me%20%22q%22%20100%25");
        assert!(headers.iter().all(|(_, v)| v.is_ascii()));
    }

    #[test]
    fn http_header_names_are_case_insensitive() {
        let headers = vec![
            ("CE-SpecVersion", "1.0"),
            ("Ce-Id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("content-type", "text/plain"),
        ];
        let e = decode(headers, Bytes::from_static(b"hi"), HeaderStyle::HTTP).unwrap();
        assert_eq!(e.id(), "1");
        assert_eq!(e.datacontenttype(), Some("text/plain"));
    }

    #[test]
    fn amqp_writes_the_underscore_prefix_and_reads_both() {
        let event = sample();
        let (headers, body) = encode(&event, HeaderStyle::AMQP);
        assert!(headers.iter().any(|(k, _)| k == "cloudEvents_type"));
        let colon = headers
            .into_iter()
            .map(|(k, v)| (k.replacen("cloudEvents_", "cloudEvents:", 1), v));
        assert_eq!(decode(colon, body, HeaderStyle::AMQP).unwrap(), event);
    }

    #[test]
    fn missing_specversion_is_not_a_cloudevent() {
        let err = decode(vec![("ce_id", "1")], Bytes::new(), HeaderStyle::KAFKA).unwrap_err();
        assert!(err.message().contains("ce_specversion"), "{err}");
    }

    #[test]
    fn the_content_type_header_wins_in_any_order_and_names_are_read_in_any_case() {
        let base = [
            ("ce_specversion", "1.0"),
            ("ce_ID", "1"),
            ("ce_source", "s"),
            ("ce_type", "t"),
            ("ce_Region", "eu"),
        ];
        for extra in [
            [
                ("content-type", "text/plain"),
                ("ce_datacontenttype", "application/json"),
            ],
            [
                ("ce_datacontenttype", "application/json"),
                ("content-type", "text/plain"),
            ],
        ] {
            let headers = base.iter().chain(&extra).copied();
            let event = decode(headers, Bytes::from_static(b"hi"), HeaderStyle::KAFKA).unwrap();
            assert_eq!(event.datacontenttype(), Some("text/plain"));
            assert_eq!(event.id(), "1");
            assert_eq!(event.extension("region"), Some("eu"));
        }
    }

    #[test]
    fn a_missing_required_attribute_is_named_before_a_bad_one() {
        let headers = vec![
            ("ce_specversion", "1.0"),
            ("ce_time", "yesterday"),
            ("ce_id", "1"),
            ("ce_type", "t"),
        ];
        let err = decode(headers.clone(), Bytes::new(), HeaderStyle::KAFKA).unwrap_err();
        assert!(err.message().contains("`source`"), "{err}");
        let mut with_source = headers;
        with_source.push(("ce_source", "s"));
        let err = decode(with_source, Bytes::new(), HeaderStyle::KAFKA).unwrap_err();
        assert!(err.message().contains("RFC 3339"), "{err}");
    }

    #[test]
    fn an_attribute_given_twice_with_different_values_is_not_decoded() {
        let base = [
            ("ce_specversion", "1.0"),
            ("ce_id", "1"),
            ("ce_source", "s"),
            ("ce_type", "t"),
            ("ce_region", "eu"),
            ("content-type", "application/json"),
        ];
        for (extra, attr) in [
            (("ce_type", "T"), "type"),
            (("ce_id", "2"), "id"),
            (("ce_source", "/other"), "source"),
            (("ce_region", "us"), "region"),
            (("ce_specversion", "0.3"), "specversion"),
            (("content-type", "text/plain"), "content-type"),
        ] {
            // Whichever comes first.
            for front in [false, true] {
                let mut headers = base.to_vec();
                if front {
                    headers.insert(0, extra);
                } else {
                    headers.push(extra);
                }
                let err = decode(headers, Bytes::from_static(b"{}"), HeaderStyle::KAFKA)
                    .expect_err("a conflicting duplicate");
                assert!(
                    err.message().contains(&format!("`{attr}`"))
                        && err.message().contains("more than once"),
                    "{attr}: {err}"
                );
            }
        }
        // Times compare as instants; a repeated equal value is no conflict.
        let mut headers = base.to_vec();
        headers.extend([
            ("ce_time", "2026-01-01T00:00:00Z"),
            ("ce_time", "2026-01-01T00:00:00+00:00"),
            ("ce_type", "t"),
            ("ce_region", "eu"),
            ("content-type", "application/json"),
        ]);
        let event = decode(headers, Bytes::from_static(b"{}"), HeaderStyle::KAFKA).unwrap();
        assert_eq!(event.ty(), "t");
        let mut headers = base.to_vec();
        headers.extend([
            ("ce_time", "2026-01-01T00:00:00Z"),
            ("ce_time", "2026-01-01T00:00:01Z"),
        ]);
        let err = decode(headers, Bytes::new(), HeaderStyle::KAFKA).unwrap_err();
        assert!(err.message().contains("`time`"), "{err}");
        // Two `datacontenttype` attributes that differ, even under a content-type header.
        let mut headers = base.to_vec();
        headers.extend([
            ("ce_datacontenttype", "application/json"),
            ("ce_datacontenttype", "text/plain"),
        ]);
        let err = decode(headers, Bytes::new(), HeaderStyle::KAFKA).unwrap_err();
        assert!(err.message().contains("`datacontenttype`"), "{err}");
    }

    #[test]
    fn names_that_differ_in_case_or_prefix_are_one_attribute() {
        // NATS reads names in any case (its headers come out of a hash map, in any order),
        // AMQP both prefixes (its tables come sorted by name): with different values the
        // message is refused whatever the order, never decoded as one or the other.
        let nats = [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "a"),
            ("CE-TYPE", "b"),
        ];
        let amqp = [
            ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_id", "1"),
            ("cloudEvents_source", "s"),
            ("cloudEvents:type", "a"),
            ("cloudEvents_type", "b"),
        ];
        for (headers, style) in [(&nats, HeaderStyle::NATS), (&amqp, HeaderStyle::AMQP)] {
            let mut headers = headers.to_vec();
            for _ in 0..2 {
                let err = decode(headers.clone(), Bytes::new(), style).unwrap_err();
                assert!(err.message().contains("`type`"), "{style:?}: {err}");
                headers.reverse();
            }
        }
    }

    #[test]
    fn no_data_stays_no_data() {
        let e = Event::builder("t", "s").build().unwrap();
        let (headers, body) = encode(&e, HeaderStyle::KAFKA);
        assert_eq!(
            decode(headers, body, HeaderStyle::KAFKA).unwrap().data(),
            None
        );
    }
}
