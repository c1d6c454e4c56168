//! Topics and queues: publishing with JetStream PubAcks, and attaching consumers.

use std::sync::Arc;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use evbus::binding::{self, HeaderStyle};
use evbus::raw::Source;
use evbus::{
    ConsumerOptions, Error, ErrorKind, Event, Queue, Result, SubscribeOptions, Subscription, Topic,
};

use crate::consumer::{self, ConsumerSpec, Start};
use crate::error::from_publish;
use crate::names::{self, Kind, StreamNames};
use crate::transport::{NatsTransport, Shared};

/// Most publishes a batch keeps waiting for their PubAck at once.
const PIPELINE_CHUNK: usize = 512;

/// Header listing the headers whose values the adapter percent-encoded because NATS headers
/// cannot carry them as they are (a CR or LF, leading or trailing whitespace).
pub(crate) const ENCODED_HEADER: &str = "Evbus-Encoded";

/// Whether `value` cannot travel in a NATS header unchanged: the protocol ends a header at a
/// line break and clients trim whitespace around values.
fn needs_encoding(value: &str) -> bool {
    value.contains(['\r', '\n'])
        || value.starts_with(char::is_whitespace)
        || value.ends_with(char::is_whitespace)
}

/// The `Nats-Msg-Id` (JetStream's de-duplication key) of event `id`: the id itself, or, when
/// a header cannot carry it as it is (a line break: the client panics; whitespace at either
/// end: it is trimmed, and two ids would share a key) or it holds a `%`, `%` followed by its
/// percent-encoding. Ids map to distinct keys (only the second kind holds a `%`), and the
/// event's `ce-id` header still carries the id itself.
fn msg_id(id: &str) -> std::borrow::Cow<'_, str> {
    if needs_encoding(id) || id.contains('%') {
        format!("%{}", percent_encode(id)).into()
    } else {
        id.into()
    }
}

/// Percent-encodes every byte outside printable ASCII, and `%` (as the CloudEvents HTTP
/// binding does).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`percent_encode`]; `None` if `value` is not valid percent-encoded UTF-8.
pub(crate) fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The CloudEvents NATS binding (binary mode) of `event`: `ce-*` headers, `Content-Type`,
/// and the data as the body. A value NATS headers cannot carry as it is (a line break,
/// whitespace at either end) is percent-encoded and its header named in [`ENCODED_HEADER`].
pub(crate) fn encode(event: &Event) -> Result<(HeaderMap, Bytes)> {
    let (pairs, body) = binding::encode(event, HeaderStyle::NATS);
    let mut headers = HeaderMap::new();
    let mut encoded: Vec<String> = Vec::new();
    for (name, value) in pairs {
        let header: HeaderName = name.parse().map_err(|e| {
            Error::invalid_event(format!(
                "event {}: `{name}` cannot be a NATS header name: {e}",
                event.id()
            ))
        })?;
        let value = if needs_encoding(&value) {
            encoded.push(name.clone());
            percent_encode(&value)
        } else {
            value
        };
        let value: HeaderValue = value.parse().map_err(|e| {
            Error::invalid_event(format!(
                "event {}: the value of `{name}` cannot travel in a NATS header: {e}",
                event.id()
            ))
        })?;
        headers.append(header, value);
    }
    if !encoded.is_empty() {
        headers.insert(ENCODED_HEADER, encoded.join(",").as_str());
    }
    Ok((headers, body))
}

/// The most bytes of headers JetStream stores with a message: a larger header block is
/// refused ("header size exceeds maximum allowed of 64k", error code 10097).
const MAX_HEADER_BYTES: usize = 65_535;

/// The bytes `headers` take on the wire (`NATS/1.0`, each `name: value` line, the blank
/// line), with the `Nats-Msg-Id` header of a topic's publish of `id` counted whatever the
/// destination (a few dozen bytes: queues and topics take the same events).
fn header_len(headers: &HeaderMap, id: &str) -> usize {
    let line = |name: &str, value: &str| name.len() + value.len() + 4;
    let mut len = "NATS/1.0\r\n\r\n".len() + line("Nats-Msg-Id", &msg_id(id));
    for (name, values) in headers.iter() {
        for value in values {
            len += line(name.as_ref(), value.as_str());
        }
    }
    len
}

/// Refuses `event`, encoded as `headers` and `body`, where NATS would: headers JetStream does
/// not store, or a message over the server's `max_payload`. Attributes are counted by
/// [`check_size`] at their length; as headers they can take more (percent-encoded values).
fn check_encoded(
    event: &Event,
    (headers, body): &(HeaderMap, Bytes),
    server_max_payload: usize,
) -> Result<()> {
    let header = header_len(headers, event.id());
    let refused = |what: String| {
        Err(
            Error::new(ErrorKind::TooLarge, format!("event {}: {what}", event.id()))
                .with_hint("keep large values in the data, or send a reference to them"),
        )
    };
    if header > MAX_HEADER_BYTES {
        return refused(format!(
            "its attributes take {header} bytes of NATS headers; JetStream stores at most \
             {MAX_HEADER_BYTES}"
        ));
    }
    if header + body.len() > server_max_payload {
        return refused(format!(
            "its headers and data take {} bytes; the server's max_payload is \
             {server_max_payload}",
            header + body.len()
        ));
    }
    Ok(())
}

/// What [`evbus::Transport::check_size`] says for `event`: what [`append`] refuses for its
/// size.
pub(crate) fn check_publishable(shared: &Shared, event: &Event) -> Result<()> {
    check_size(event, shared.max_payload_bytes)?;
    check_encoded(event, &encode(event)?, shared.server_max_payload)
}

fn check_size(event: &Event, limit: usize) -> Result<()> {
    evbus::raw::check_encoded_len("NATS", Some(limit), event)
}

/// Publishes `events` to the stream behind `names`, in order; `Ok` once every PubAck came
/// back. Publishes are pipelined: all are sent, then the acks are awaited.
async fn append(
    transport: &NatsTransport,
    kind: Kind,
    names: &StreamNames,
    events: &[Event],
    what: &str,
) -> Result<()> {
    let shared = &transport.shared;
    let _op = shared.begin()?;
    let mut encoded = Vec::with_capacity(events.len());
    for event in events {
        check_size(event, shared.max_payload_bytes)?;
        let message = encode(event)?;
        check_encoded(event, &message, shared.server_max_payload)?;
        encoded.push(message);
    }
    shared.ensure_stream(kind, names).await?;
    let mut retried = false;
    let mut start = 0;
    while start < events.len() {
        let end = (start + PIPELINE_CHUNK).min(events.len());
        match send_chunk(
            transport,
            kind,
            names,
            &events[start..end],
            &encoded[start..end],
            what,
        )
        .await
        {
            Ok(()) => start = end,
            Err(e) if e.kind() == ErrorKind::NotFound && !retried => {
                // The stream was deleted behind this transport's back: create it again and
                // publish again (ids already stored are dropped as duplicates).
                retried = true;
                shared.forget_stream(&names.stream);
                shared.ensure_stream(kind, names).await?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // The stream exists (ensure_stream just found or made it), yet nothing took
                // the publish: no server leads the stream right now (a cluster electing a new
                // leader after losing a node, or a server still recovering).
                return Err(Error::new(
                    ErrorKind::Broker,
                    format!(
                        "{}; the stream exists, so it has no leader right now (a JetStream \
                         cluster electing one after losing a server, or a server recovering \
                         its store); retry later (publishing the same event again is safe)",
                        e.message()
                    ),
                )
                .with_retryable(true));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn send_chunk(
    transport: &NatsTransport,
    kind: Kind,
    names: &StreamNames,
    events: &[Event],
    encoded: &[(HeaderMap, Bytes)],
    what: &str,
) -> Result<()> {
    let js = &transport.shared.js;
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
    for (event, (headers, body)) in events.iter().zip(encoded) {
        let mut message = PublishMessage::build()
            .headers(headers.clone())
            .payload(body.clone());
        // Topics drop a second publish of an event id within the duplicate window (a retried
        // emit). Queues do not: what core sends to a queue again under the same id is a new
        // message (a dead letter of an event dead-lettered before, a redrive of one redriven
        // before), and dropping it would lose the event.
        if kind == Kind::Topic {
            message = message.message_id(msg_id(event.id()));
        }
        let ack = js
            .send_publish(names.subject.clone(), message)
            .await
            .map_err(|e| from_publish(e, what))?;
        acks.push(ack);
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {}
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{what}: stream `{}` does not exist", names.stream),
                ));
            }
            Err(e) => return Err(from_publish(e, what)),
        }
    }
    Ok(())
}

/// A topic: one stream; each named subscription is a durable pull consumer on it.
#[derive(Debug)]
pub(crate) struct NatsTopic {
    name: String,
    names: StreamNames,
    transport: NatsTransport,
}

impl NatsTopic {
    pub(crate) fn new(name: &str, transport: NatsTransport) -> Result<Self> {
        Ok(NatsTopic {
            name: name.to_owned(),
            names: transport.shared.names.stream(Kind::Topic, name)?,
            transport,
        })
    }

    async fn publish_all(&self, events: &[Event]) -> Result<()> {
        let what = format!("publishing to topic `{}`", self.name);
        append(&self.transport, Kind::Topic, &self.names, events, &what).await
    }
}

#[async_trait]
impl Topic for NatsTopic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.publish_all(std::slice::from_ref(event)).await
    }

    async fn publish_batch(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.publish_all(events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let shared = &self.transport.shared;
        let _op = shared.begin()?;
        let source = Source::topic(&self.name, &options)?;
        let durable = match source.subscription() {
            Some(name) => Some(names::consumer(name)?),
            None => None,
        };
        let dead_letter: Arc<dyn Queue> =
            Arc::new(self.transport.queue_handle(source.dead_letter_queue())?);
        let raw = consumer::open_on(
            &self.transport,
            Kind::Topic,
            &self.names,
            ConsumerSpec {
                stream: self.names.stream.clone(),
                durable,
                start: match options.start {
                    evbus::StartPosition::Latest => Start::New,
                    evbus::StartPosition::Earliest => Start::All,
                },
                options: source.consumer().clone(),
            },
        )
        .await?;
        Ok(source.into_subscription(raw, dead_letter, shared.cancel.clone().cancelled_owned()))
    }
}

/// A queue: one work-queue stream with one durable consumer every consumer shares. An
/// acknowledged message is deleted, so the stream holds only what is waiting or in flight.
#[derive(Debug)]
pub(crate) struct NatsQueue {
    name: String,
    names: StreamNames,
    transport: NatsTransport,
}

impl NatsQueue {
    pub(crate) fn new(name: &str, transport: NatsTransport) -> Result<Self> {
        Ok(NatsQueue {
            name: name.to_owned(),
            names: transport.shared.names.stream(Kind::Queue, name)?,
            transport,
        })
    }

    async fn send_all(&self, events: &[Event]) -> Result<()> {
        let what = format!("sending to queue `{}`", self.name);
        append(&self.transport, Kind::Queue, &self.names, events, &what).await
    }
}

#[async_trait]
impl Queue for NatsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, event: &Event) -> Result<()> {
        self.send_all(std::slice::from_ref(event)).await
    }

    async fn send_batch(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.send_all(events).await
    }

    async fn receive(&self, options: ConsumerOptions) -> Result<Subscription> {
        let shared = &self.transport.shared;
        let _op = shared.begin()?;
        let source = Source::queue(&self.name, &options)?;
        let dead_letter: Arc<dyn Queue> =
            Arc::new(self.transport.queue_handle(source.dead_letter_queue())?);
        let raw = consumer::open_on(
            &self.transport,
            Kind::Queue,
            &self.names,
            ConsumerSpec {
                stream: self.names.stream.clone(),
                durable: Some(names::QUEUE_CONSUMER.to_owned()),
                // Everything sent before the first consumer came.
                start: Start::All,
                options: source.consumer().clone(),
            },
        )
        .await?;
        Ok(source.into_subscription(raw, dead_letter, shared.cancel.clone().cancelled_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_ce_headers_and_a_json_body() {
        let event = Event::builder("afterOrderCreate", "/shop")
            .json(&serde_json::json!({"id": 42}))
            .unwrap()
            .subject("orders/42 Łódź")
            .extension("tenant", "acme")
            .build()
            .unwrap();
        let (headers, body) = encode(&event).unwrap();
        assert_eq!(
            headers.get("ce-type").map(|v| v.as_str()),
            Some("afterOrderCreate")
        );
        assert_eq!(headers.get("ce-id").map(|v| v.as_str()), Some(event.id()));
        assert_eq!(
            headers.get("ce-specversion").map(|v| v.as_str()),
            Some("1.0")
        );
        assert_eq!(
            headers.get("ce-subject").map(|v| v.as_str()),
            Some("orders/42 Łódź")
        );
        assert_eq!(headers.get("ce-tenant").map(|v| v.as_str()), Some("acme"));
        assert_eq!(
            headers.get("Content-Type").map(|v| v.as_str()),
            Some("application/json")
        );
        assert_eq!(&body[..], br#"{"id":42}"#);
    }

    #[test]
    fn values_nats_headers_cannot_carry_are_percent_encoded_and_listed() {
        let event = Event::builder("t", "/s")
            .extension("note", "two\r\nlines 100%")
            .extension("pad", " padded ")
            .extension("plain", "as is")
            .build()
            .unwrap();
        let (headers, _) = encode(&event).unwrap();
        assert_eq!(
            headers.get("ce-note").map(|v| v.as_str()),
            Some("two%0D%0Alines%20100%25")
        );
        assert_eq!(
            headers.get("ce-pad").map(|v| v.as_str()),
            Some("%20padded%20")
        );
        assert_eq!(headers.get("ce-plain").map(|v| v.as_str()), Some("as is"));
        let listed = headers.get(ENCODED_HEADER).unwrap().as_str().to_owned();
        let mut listed: Vec<&str> = listed.split(',').collect();
        listed.sort_unstable();
        assert_eq!(listed, ["ce-note", "ce-pad"]);
        assert_eq!(
            percent_decode("two%0D%0Alines%20100%25").as_deref(),
            Some("two\r\nlines 100%")
        );
        assert_eq!(percent_decode("%ZZ"), None);
        assert_eq!(percent_decode("%C3"), None);
    }

    #[test]
    fn oversized_events_are_too_large() {
        let event = Event::builder("t", "/s")
            .data("application/octet-stream", vec![0u8; 100])
            .build()
            .unwrap();
        let err = check_size(&event, 50).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        check_size(&event, 1 << 20).unwrap();
    }

    /// An id with a line break made async-nats panic when it became the `Nats-Msg-Id` of a
    /// topic's publish (an outside review: the outbox relay's task died on such a row). Keys
    /// stay distinct from every other id's.
    #[test]
    fn message_ids_travel_as_headers_whatever_they_hold() {
        assert_eq!(msg_id("01a2-b3"), "01a2-b3");
        let keys = ["x\r\ny", " x", "x ", "x%0A", "x\n", "%x%0A"].map(|id| msg_id(id).into_owned());
        for key in &keys {
            assert!(!needs_encoding(key), "{key:?}");
            // What the client builds from it, without panicking.
            let _ = PublishMessage::build().message_id(key.as_str());
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }

    /// Attributes count at their length against `max_payload_bytes`, but travel as headers:
    /// a value with a line break is percent-encoded (up to three times longer), and
    /// JetStream stores at most 64 KiB of headers. What would not go is refused first.
    #[test]
    fn headers_jetstream_would_refuse_are_too_large() {
        let with_subject = |subject: String| {
            Event::builder("t", "/s")
                .subject(subject)
                .json(&1)
                .unwrap()
                .build()
                .unwrap()
        };
        // 30,000 bytes as an attribute, about 90,000 as a header.
        let event = with_subject(format!("a\n{}", "\u{e9}".repeat(15_000)));
        assert!(event.encoded_len() < 40_000);
        let encoded = encode(&event).unwrap();
        let header = header_len(&encoded.0, event.id());
        assert!(header > 80_000, "{header}");
        let err = check_encoded(&event, &encoded, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(err.message().contains("65535"), "{err}");
        // Headers within JetStream's limit, but headers and data over the server's.
        let event = with_subject("s".repeat(60_000));
        let encoded = encode(&event).unwrap();
        check_encoded(&event, &encoded, 1 << 20).unwrap();
        let err = check_encoded(&event, &encoded, 60_000).unwrap_err();
        assert!(err.message().contains("max_payload"), "{err}");
    }
}
