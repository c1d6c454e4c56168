//! Structured mode (`application/cloudevents+json`) as a foreign producer may write it, read
//! through `binding::decode` (every adapter) and `Event::from_json` (the gateway): what is
//! read must be what binary mode and a structured re-publish carry, byte for byte, and no
//! message may keep a consumer busy out of proportion to its size.

use std::time::{Duration, Instant};

use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::{ErrorKind, Event};

const HEAD: &str = r#""specversion":"1.0","id":"e-1","source":"/s","type":"t""#;

/// `text` read as a structured-mode Kafka record (the path every adapter shares).
fn structured(text: &str) -> evbus::Result<Event> {
    binding::decode(
        [("content-type", "application/cloudevents+json")],
        Bytes::from(text.to_owned()),
        HeaderStyle::KAFKA,
    )
}

/// `event` written in structured mode and read back, and in binary mode and read back: both
/// must be `event`.
fn assert_carried(event: &Event) {
    let text = event.to_json().unwrap();
    assert_eq!(
        &Event::from_json(&text).unwrap(),
        event,
        "structured: {text}"
    );
    for style in [HeaderStyle::KAFKA, HeaderStyle::NATS, HeaderStyle::REDIS] {
        let (headers, body) = binding::encode(event, style);
        assert_eq!(
            &binding::decode(headers, body, style).unwrap(),
            event,
            "{style:?}"
        );
    }
}

#[test]
fn an_object_of_many_members_is_read_in_time_proportional_to_its_size() {
    // 100,000 members, 1.2 MB: within a Kafka record's or the gateway's default limit. Read
    // in a few milliseconds; compared name by name with every later one it took minutes.
    let members = 100_000;
    let mut text = format!("{{{HEAD}");
    for i in 0..members {
        text.push_str(&format!(",\"x{i:06}\":{i}"));
    }
    // A name given twice still counts with its last value in a large object.
    text.push_str(r#","x000007":"last","type":"u"}"#);
    let started = Instant::now();
    let event = structured(&text).unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "{members} members read in {took:?}"
    );
    assert_eq!(event.extensions().len(), members);
    assert_eq!(event.extension("x000007"), Some("last"));
    assert_eq!(event.extension("x000008"), Some("8"));
    assert_eq!(event.ty(), "u");
}

#[test]
fn json_data_with_whitespace_around_it_round_trips_byte_for_byte() {
    // A body ending in a newline (what `echo`, most JSON writers' "pretty" modes and many
    // HTTP clients send), read in binary mode and re-published in structured mode (Redis
    // `content_mode=structured`), must keep its bytes.
    for (content_type, data) in [
        (Some("application/json"), &b"{\"a\":1}\n"[..]),
        (None, &b"  [1, 2]"[..]),
        (Some("application/cloudevents+json"), &b"{\"b\":2}\r\n"[..]),
        (Some("text/json"), &b"\t\"s\" "[..]),
    ] {
        let mut headers = vec![
            ("ce_specversion", "1.0"),
            ("ce_id", "e-1"),
            ("ce_source", "/s"),
            ("ce_type", "t"),
        ];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let event =
            binding::decode(headers, Bytes::copy_from_slice(data), HeaderStyle::KAFKA).unwrap();
        assert_eq!(event.data().map(|d| &d[..]), Some(data));
        let text = event.to_json().unwrap();
        let back = structured(&text).unwrap();
        assert_eq!(back.data().map(|d| &d[..]), Some(data), "{text}");
        assert_eq!(back, event);
    }
    // JSON without whitespace around it is still written as the JSON value.
    let event = Event::builder("t", "/s")
        .data("application/json", &b"{\"a\": [1, 2]}"[..])
        .build()
        .unwrap();
    let value = event.to_json_value().unwrap();
    assert_eq!(value["data"], serde_json::json!({"a": [1, 2]}));
    assert!(value.get("data_base64").is_none());
}

#[test]
fn a_number_extension_is_read_as_written() {
    let event = structured(&format!(
        r#"{{{HEAD},"big":123456789012345678901234567890,"zero":-0,"n":42,"neg":-7,"half":1.5,"hundred":1e2,"e":4.553807694262277e+16}}"#
    ))
    .unwrap();
    // Read as a `Number` they were rewritten (`1e2` as `100.0`, the 30 digits rounded).
    for (name, text) in [
        ("big", "123456789012345678901234567890"),
        ("zero", "-0"),
        ("n", "42"),
        ("neg", "-7"),
        ("half", "1.5"),
        ("hundred", "1e2"),
        ("e", "4.553807694262277e+16"),
    ] {
        assert_eq!(event.extension(name), Some(text), "{name}");
    }
    assert_carried(&event);
    // Other JSON values are no extension values.
    for value in ["[1]", r#"{"a":1}"#] {
        let err = structured(&format!(r#"{{{HEAD},"x":{value}}}"#)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEvent, "{value}");
    }
}

#[test]
fn a_null_data_base64_is_absent_like_every_other_null_member() {
    let read = |members: &str| structured(&format!("{{{HEAD},{members}}}"));
    assert_eq!(read(r#""data_base64":null"#).unwrap().data(), None);
    let event =
        read(r#""datacontenttype":"application/octet-stream","data":null,"data_base64":"AAE=""#)
            .unwrap();
    assert_eq!(event.data().map(|d| &d[..]), Some(&[0u8, 1][..]));
    assert_carried(&event);
    let event = read(r#""data_base64":null,"data":{"a":1}"#).unwrap();
    assert_eq!(event.data().map(|d| &d[..]), Some(&b"{\"a\":1}"[..]));
    assert_carried(&event);
    // Both given: still refused.
    let err = read(r#""data":{"a":1},"data_base64":"AAE=""#).unwrap_err();
    assert!(err.message().contains("both"), "{err}");
}

#[test]
fn a_binary_message_whose_data_is_a_cloudevent_never_reads_as_its_data_whatever_the_header_order() {
    // A binary-mode message (it has `specversion`) whose data is a CloudEvent, with an
    // attribute given twice with different values. Brokers do not keep header order (NATS
    // headers come out of a hash map, AMQP tables sorted by name, where `cloudEvents:` comes
    // before `cloudEvents_`): in every order it is refused for the conflict, never read as
    // the event in its data.
    let inner = Event::builder("innerType", "/inner")
        .id("inner-1")
        .build()
        .unwrap();
    let body = Bytes::from(inner.to_json().unwrap());
    for (style, headers) in [
        (
            HeaderStyle::KAFKA,
            vec![
                ("ce_specversion", "1.0"),
                ("ce_id", "outer-1"),
                ("ce_id", "outer-2"),
                ("ce_source", "/outer"),
                ("ce_type", "outerType"),
                ("content-type", "application/cloudevents+json"),
            ],
        ),
        (
            HeaderStyle::AMQP,
            vec![
                ("cloudEvents:id", "outer-1"),
                ("cloudEvents_id", "outer-2"),
                ("cloudEvents_source", "/outer"),
                ("cloudEvents_specversion", "1.0"),
                ("cloudEvents_type", "outerType"),
                ("content-type", "application/cloudevents+json"),
            ],
        ),
        (
            HeaderStyle::HTTP,
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "outer%ZZ"),
                ("ce-source", "/outer"),
                ("ce-type", "outerType"),
                ("Content-Type", "application/cloudevents+json"),
            ],
        ),
    ] {
        for reversed in [false, true] {
            let mut headers = headers.clone();
            if reversed {
                headers.reverse();
            }
            let read = binding::decode(headers.clone(), body.clone(), style);
            assert!(
                read.is_err(),
                "{style:?} {headers:?}: read as {:?}",
                read.map(|e| e.ty().to_owned())
            );
        }
    }
}

#[test]
fn an_error_quotes_at_most_a_little_of_what_the_producer_sent() {
    // The error of an undecodable message is the reason of its dead-letter record, an
    // attribute kept even when the record is cut down to fit: one that quoted a value as large
    // as the message made the record too large for the dead-letter queue (Redis takes entries
    // far larger than `max_payload_bytes`), and the message came back forever.
    let big = "x".repeat(2 * 1024 * 1024);
    let big_array = format!("[{}0]", "0,".repeat(1024 * 1024));
    let big_name = "a".repeat(2 * 1024 * 1024);
    let structured_texts = [
        format!(r#"{{"specversion":"1.0","id":{big_array},"source":"/s","type":"t"}}"#),
        format!(r#"{{"specversion":"1.{big}","id":"1","source":"/s","type":"t"}}"#),
        format!(r#"{{{HEAD},"{big_name}":"v"}}"#),
        format!(r#"{{{HEAD},"A{big_name}":"v"}}"#),
        format!(r#"{{{HEAD},"x":{{"a":"{big}"}}}}"#),
        format!(r#"{{{HEAD},"{big_name}":"\ud800"}}"#),
    ];
    let mut errors: Vec<evbus::Error> = structured_texts
        .iter()
        .map(|text| structured(text).unwrap_err())
        .collect();
    let big_header = format!("ce_{big_name}");
    let bad_escape = format!("%ZZ{big}");
    let big_format = format!("application/cloudevents+{big}");
    let binary: [(HeaderStyle, Vec<(&str, &str)>); 5] = [
        (
            HeaderStyle::REDIS,
            vec![
                ("ce_specversion", &big),
                ("ce_id", "1"),
                ("ce_source", "/s"),
                ("ce_type", "t"),
            ],
        ),
        (
            HeaderStyle::REDIS,
            vec![
                ("ce_specversion", "1.0"),
                ("ce_id", "1"),
                ("ce_source", "/s"),
                ("ce_type", "t"),
                (&big_header, "v"),
            ],
        ),
        (
            HeaderStyle::KAFKA,
            vec![
                ("ce_specversion", "1.0"),
                ("ce_id", "1"),
                ("ce_source", "/s"),
                ("ce_type", "t"),
                (&big_header, "v"),
                (&big_header, "w"),
            ],
        ),
        (
            HeaderStyle::HTTP,
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-x", &bad_escape),
            ],
        ),
        (HeaderStyle::KAFKA, vec![("content-type", &big_format)]),
    ];
    for (style, headers) in binary {
        errors.push(binding::decode(headers, Bytes::from_static(b"{}"), style).unwrap_err());
    }
    for err in errors {
        assert_eq!(err.kind(), ErrorKind::InvalidEvent);
        let message = err.message();
        assert!(
            message.len() < 1024,
            "an error of {} bytes: {}…",
            message.len(),
            &message[..message.floor_char_boundary(200)]
        );
    }
}
