//! Topics and queues: publishing with `XADD`, and attaching consumers.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use evbus::binding::{self, HeaderStyle};
use evbus::envelope::CLOUDEVENTS_JSON;
use evbus::raw::Source;
use evbus::{
    ConsumerOptions, Error, ErrorKind, Event, Queue, Result, StartPosition, SubscribeOptions,
    Subscription, Topic,
};
use redis::{RedisWrite, Value};

use crate::config::{ContentMode, Retention};
use crate::consumer::{self, ConsumerSpec};
use crate::error::from_redis;
use crate::keys::{ANONYMOUS_GROUP_PREFIX, QUEUE_GROUP, StreamKeys, check_destination, check_name};
use crate::transport::{RedisTransport, Shared};

/// The stream field carrying the event data (the CloudEvents binary-mode body).
pub(crate) const DATA_FIELD: &str = "data";

/// Most `XADD`s sent in one pipeline by a batch publish.
const PIPELINE_CHUNK: usize = 500;

/// Builds the `XADD` of one event: in binary mode `ce_*` attribute fields, `content-type`,
/// then `data`; in structured mode `content-type` (the CloudEvents JSON format) and `data`
/// (the whole event).
pub(crate) fn xadd(
    stream: &str,
    retention: Retention,
    mode: ContentMode,
    limit: usize,
    event: &Event,
) -> Result<redis::Cmd> {
    // Sized once: stream, trimming, `*`, the attributes and `data` (appending ~20 arguments
    // to an empty command regrew its buffer several times per publish).
    let args = 8 + 2 * (9 + event.extensions().len());
    let mut cmd = redis::Cmd::with_capacity(args, stream.len() + event.encoded_len() + 256);
    cmd.arg("XADD").arg(stream);
    match retention {
        Retention::Unlimited => {}
        Retention::MaxLen { entries } => {
            cmd.arg("MAXLEN").arg("~").arg(entries);
        }
        Retention::MaxAge { age } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_sub(age);
            cmd.arg("MINID").arg("~").arg(now.as_millis() as u64);
        }
    }
    cmd.arg("*");
    if mode == ContentMode::Structured {
        let json = event.to_json()?;
        // The entry holds the JSON, which can be larger than the event (base64 data, escapes).
        check_length(event, json.len(), limit)?;
        cmd.arg(HeaderStyle::REDIS.content_type)
            .arg(CLOUDEVENTS_JSON)
            .arg(DATA_FIELD)
            .arg(json);
        return Ok(cmd);
    }
    binding::visit(event, HeaderStyle::REDIS, |prefix, name, value| {
        // The field name is written in its two parts straight into the command's buffer.
        let mut field = cmd.writer_for_next_arg();
        // Writing to the command's own `Vec` cannot fail.
        let _ = field.write_all(prefix.as_bytes());
        let _ = field.write_all(name.as_bytes());
        drop(field);
        cmd.arg(value);
    });
    if let Some(data) = event.data() {
        cmd.arg(DATA_FIELD).arg(data.as_ref());
    }
    Ok(cmd)
}

fn check_size(event: &Event, limit: usize) -> Result<()> {
    evbus::raw::check_encoded_len("Redis", Some(limit), event)
}

/// Refuses what a publish in `mode` refuses for its size: an event over `limit` as
/// `Event::encoded_len` counts it and, in structured mode, one whose JSON (what the entry
/// holds) is over `limit` ([`evbus::Transport::check_size`]).
pub(crate) fn check_publishable(mode: ContentMode, limit: usize, event: &Event) -> Result<()> {
    check_size(event, limit)?;
    if mode == ContentMode::Structured {
        check_length(event, event.to_json()?.len(), limit)?;
    }
    Ok(())
}

/// Refuses `event` when what is written of it is `size` bytes, more than `limit`.
fn check_length(event: &Event, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "event {} is {size} bytes; this Redis transport accepts at most {limit} \
                 (max_payload_bytes)",
                event.id()
            ),
        ));
    }
    Ok(())
}

/// Appends `events` to `stream`, in order; `Ok` once Redis replied to every `XADD`.
async fn append(
    transport: &RedisTransport,
    stream: &str,
    retention: Retention,
    events: &[Event],
    what: &str,
) -> Result<()> {
    let shared = &transport.shared;
    let _op = shared.begin()?;
    for event in events {
        check_size(event, shared.config.max_payload_bytes)?;
    }
    let replicas = shared.config.replicas_to_wait_for();
    let mode = shared.config.content_mode;
    let limit = shared.config.max_payload_bytes;
    if let ([event], 0) = (events, replicas) {
        let command = xadd(stream, retention, mode, limit, event)?;
        shared.query::<Value>(&command, what).await?;
        return Ok(());
    }
    // Every command built before any is sent: an event refused while building (too large as
    // structured JSON) leaves the whole call unpublished, as a refusal by size above does.
    let mut commands = events
        .iter()
        .map(|event| xadd(stream, retention, mode, limit, event))
        .collect::<Result<Vec<_>>>()?;
    while !commands.is_empty() {
        let rest = commands.split_off(commands.len().min(PIPELINE_CHUNK));
        let mut pipe = redis::pipe();
        for command in std::mem::replace(&mut commands, rest) {
            pipe.add_command(command);
        }
        if replicas > 0 {
            // In the same pipeline, so on the same connection to the master that took the
            // writes (a cluster client routes the pipeline by the stream key; WAIT has none).
            pipe.add_command(wait(replicas, shared.config.wait_timeout));
        }
        let replies = pipe
            .query_async::<Vec<Value>>(&mut shared.conn())
            .await
            .map_err(|e| from_redis(e, what))?;
        if replicas > 0 {
            check_replicated(replies.last(), replicas, shared.config.wait_timeout, what)?;
        }
    }
    Ok(())
}

/// `WAIT replicas timeout_ms`: blocks until `replicas` replicas acknowledged every write of
/// this connection so far, or the timeout passed; replies with how many did.
fn wait(replicas: u32, timeout: std::time::Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(replicas).arg(timeout.as_millis().max(1) as u64);
    cmd
}

/// Fails with a retryable error when fewer than `wanted` replicas acknowledged the writes.
fn check_replicated(
    reply: Option<&Value>,
    wanted: u32,
    timeout: std::time::Duration,
    what: &str,
) -> Result<()> {
    let acked = reply.and_then(crate::connection::int_of).unwrap_or(0);
    if acked >= i64::from(wanted) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Broker,
        format!(
            "{what}: the master stored the event but only {acked} of {wanted} replica(s) \
             acknowledged it within {timeout:?} (wait_replicas, wait_timeout_ms): it could be \
             lost if the master fails now. Retrying publishes it again (a possible duplicate); \
             a replica may be down or resyncing after a failover"
        ),
    )
    .with_retryable(true))
}

/// A topic: one stream; each subscription is a consumer group on it.
#[derive(Debug)]
pub(crate) struct RedisTopic {
    name: String,
    keys: StreamKeys,
    transport: RedisTransport,
    /// What a failed publish says it was doing (made once, not per publish).
    publishing: String,
}

impl RedisTopic {
    pub(crate) fn new(name: &str, transport: RedisTransport) -> Self {
        RedisTopic {
            name: name.to_owned(),
            keys: transport.shared.keys.topic(name),
            transport,
            publishing: format!("publishing to topic `{name}`"),
        }
    }

    async fn publish_all(&self, events: &[Event]) -> Result<()> {
        let retention = self.transport.shared.config.retention;
        append(
            &self.transport,
            &self.keys.stream,
            retention,
            events,
            &self.publishing,
        )
        .await
    }
}

#[async_trait]
impl Topic for RedisTopic {
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
        let cluster = shared.config.is_cluster();
        check_destination("dead-letter queue", source.dead_letter_queue(), cluster)?;
        let start = match options.start {
            StartPosition::Latest => "$",
            StartPosition::Earliest => "0",
        };
        let (group, anonymous) = match &options.subscription {
            Some(name) => {
                check_name("subscription", name)?;
                if name.starts_with(ANONYMOUS_GROUP_PREFIX) {
                    return Err(Error::invalid_config(format!(
                        "subscription names starting with `{ANONYMOUS_GROUP_PREFIX}` are \
                         reserved for anonymous subscriptions"
                    )));
                }
                (name.clone(), false)
            }
            None => {
                if let Err(e) = consumer::sweep_anonymous(shared, &self.keys).await {
                    tracing::debug!(error = %e, topic = %self.name, "could not sweep stale anonymous subscriptions");
                }
                (consumer::anonymous_group_name(), true)
            }
        };
        // An anonymous group is removed again if this subscribe does not get as far as its
        // consumer (it fails, or its future is dropped part way, even while the group is
        // being made): nothing else would.
        let made = anonymous.then(|| AnonymousGroup {
            shared: Arc::clone(shared),
            keys: self.keys.clone(),
            group: group.clone(),
            armed: true,
        });
        shared
            .ensure_group(&self.keys.stream, &group, start)
            .await?;
        // Read once the group is there: a deletion from here on is this subscription's.
        let deletion_mark = shared.deletion_mark(&self.keys).await?;
        let dead_letter: Arc<dyn Queue> =
            Arc::new(self.transport.queue_handle(source.dead_letter_queue()));
        let origin = source.origin().to_owned();
        let check_lag = shared.config.retention != Retention::Unlimited;
        let raw = consumer::start(
            &self.transport,
            ConsumerSpec {
                keys: self.keys.clone(),
                group,
                origin,
                anonymous,
                delete_on_ack: false,
                check_lag,
                options: options.consumer.clone(),
                deletion_mark,
            },
        )
        .await?;
        // The consumer removes it from now on.
        if let Some(mut made) = made {
            made.armed = false;
        }
        Ok(source.into_subscription(raw, dead_letter, shared.cancel.clone().cancelled_owned()))
    }
}

/// An anonymous subscription's consumer group made by a subscribe that has not handed it to
/// its consumer yet: removed when dropped armed, by a task close waits for.
struct AnonymousGroup {
    shared: Arc<Shared>,
    keys: StreamKeys,
    group: String,
    armed: bool,
}

impl Drop for AnonymousGroup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, keys, group) = (
            Arc::clone(&self.shared),
            self.keys.clone(),
            std::mem::take(&mut self.group),
        );
        let remove = async move {
            if let Err(e) = consumer::remove_anonymous(&mut shared.conn(), &keys, &group).await {
                tracing::debug!(group, error = %e, "could not remove the group of a subscribe that did not finish; a later anonymous subscribe sweeps it after anonymous_ttl");
            }
        };
        drop(runtime.spawn(self.shared.tasks.track_future(remove)));
    }
}

/// A queue: one stream with one consumer group every consumer joins. Acknowledged entries
/// are deleted, so the stream holds only what is waiting or in flight.
#[derive(Debug)]
pub(crate) struct RedisQueue {
    name: String,
    keys: StreamKeys,
    transport: RedisTransport,
    /// What a failed send says it was doing (made once, not per send).
    sending: String,
}

impl RedisQueue {
    pub(crate) fn new(name: &str, transport: RedisTransport) -> Self {
        RedisQueue {
            name: name.to_owned(),
            keys: transport.shared.keys.queue(name),
            transport,
            sending: format!("sending to queue `{name}`"),
        }
    }

    async fn send_all(&self, events: &[Event]) -> Result<()> {
        append(
            &self.transport,
            &self.keys.stream,
            Retention::Unlimited,
            events,
            &self.sending,
        )
        .await
    }
}

#[async_trait]
impl Queue for RedisQueue {
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
        let cluster = shared.config.is_cluster();
        check_destination("dead-letter queue", source.dead_letter_queue(), cluster)?;
        // From the start of the stream: everything sent before the first consumer came.
        shared
            .ensure_group(&self.keys.stream, QUEUE_GROUP, "0")
            .await?;
        let deletion_mark = shared.deletion_mark(&self.keys).await?;
        let dead_letter: Arc<dyn Queue> =
            Arc::new(self.transport.queue_handle(source.dead_letter_queue()));
        let raw = consumer::start(
            &self.transport,
            ConsumerSpec {
                keys: self.keys.clone(),
                group: QUEUE_GROUP.to_owned(),
                origin: self.name.clone(),
                anonymous: false,
                delete_on_ack: true,
                check_lag: false,
                options: options.clone(),
                deletion_mark,
            },
        )
        .await?;
        Ok(source.into_subscription(raw, dead_letter, shared.cancel.clone().cancelled_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".to_owned(),
            })
            .collect()
    }

    fn binary(stream: &str, retention: Retention, event: &Event) -> redis::Cmd {
        xadd(stream, retention, ContentMode::Binary, usize::MAX, event).unwrap()
    }

    fn event() -> Event {
        Event::builder("afterOrderCreate", "/shop/orders")
            .id("e-1")
            .json(&serde_json::json!({"orderId": "o-1"}))
            .unwrap()
            .partition_key("o-1")
            .build()
            .unwrap()
    }

    #[test]
    fn xadd_writes_binary_mode_fields_then_data() {
        let a = args(&binary(
            "evbus:topic:{orders}",
            Retention::Unlimited,
            &event(),
        ));
        assert_eq!(&a[..3], ["XADD", "evbus:topic:{orders}", "*"]);
        let fields: Vec<_> = a[3..]
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        assert_eq!(fields[0], ("ce_specversion", "1.0"));
        assert_eq!(fields[1], ("ce_id", "e-1"));
        assert!(fields.contains(&("ce_type", "afterOrderCreate")));
        assert!(fields.contains(&("ce_partitionkey", "o-1")));
        assert!(fields.contains(&("content-type", "application/json")));
        assert_eq!(fields.last(), Some(&("data", r#"{"orderId":"o-1"}"#)));
    }

    #[test]
    fn xadd_trims_approximately_when_retention_is_set() {
        let a = args(&binary("s", Retention::MaxLen { entries: 1000 }, &event()));
        assert_eq!(&a[..5], ["XADD", "s", "MAXLEN", "~", "1000"]);
        let a = args(&binary(
            "s",
            Retention::MaxAge {
                age: std::time::Duration::from_secs(60),
            },
            &event(),
        ));
        assert_eq!(&a[..4], ["XADD", "s", "MINID", "~"]);
        let min_id: u64 = a[4].parse().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            min_id <= now - 59_000 && min_id >= now - 61_000,
            "{min_id} vs {now}"
        );
    }

    #[test]
    fn events_without_data_have_no_data_field() {
        let e = Event::builder("t", "s").build().unwrap();
        let a = args(&binary("s", Retention::Unlimited, &e));
        assert!(!a.iter().any(|f| f == DATA_FIELD));
    }

    #[test]
    fn structured_mode_writes_the_whole_event_as_json_in_two_fields() {
        let e = event();
        let a = args(
            &xadd(
                "s",
                Retention::MaxLen { entries: 10 },
                ContentMode::Structured,
                usize::MAX,
                &e,
            )
            .unwrap(),
        );
        assert_eq!(&a[..6], ["XADD", "s", "MAXLEN", "~", "10", "*"]);
        assert_eq!(a.len(), 10, "{a:?}");
        assert_eq!(
            &a[6..9],
            ["content-type", "application/cloudevents+json", "data"]
        );
        assert_eq!(Event::from_json(&a[9]).unwrap(), e);
        let json: serde_json::Value = serde_json::from_str(&a[9]).unwrap();
        assert_eq!(json["data"], serde_json::json!({"orderId": "o-1"}));
        assert_eq!(json["partitionkey"], "o-1");
    }

    #[test]
    fn too_few_replica_acknowledgements_are_a_retryable_error() {
        let timeout = std::time::Duration::from_millis(500);
        check_replicated(Some(&Value::Int(1)), 1, timeout, "publishing").unwrap();
        check_replicated(Some(&Value::Int(2)), 1, timeout, "publishing").unwrap();
        let err = check_replicated(Some(&Value::Int(0)), 1, timeout, "publishing").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Broker);
        assert!(err.is_retryable());
        assert!(err.message().contains("wait_replicas"), "{err}");
        assert!(check_replicated(None, 1, timeout, "x").is_err());
        assert_eq!(args(&wait(1, timeout)), ["WAIT", "1", "500"]);
    }

    #[test]
    fn structured_mode_refuses_an_event_whose_json_is_over_the_limit() {
        // 3 bytes of data, 4 in base64, and the JSON around them: fits as an event, not as
        // the entry structured mode writes.
        let e = Event::builder("t", "/s")
            .data("application/octet-stream", vec![0u8, 1, 2])
            .build()
            .unwrap();
        let json = e.to_json().unwrap().len();
        let limit = e.encoded_len();
        assert!(json > limit, "{json} vs {limit}");
        let err = xadd(
            "s",
            Retention::Unlimited,
            ContentMode::Structured,
            limit,
            &e,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(err.message().contains("max_payload_bytes"), "{err}");
        assert!(xadd("s", Retention::Unlimited, ContentMode::Structured, json, &e).is_ok());
        // The transport's own check (what an outbox asks at stage) refuses it too, and only
        // in the mode that writes the JSON.
        let err = check_publishable(ContentMode::Structured, limit, &e).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(err.message().contains(&format!("{json} bytes")), "{err}");
        check_publishable(ContentMode::Structured, json, &e).unwrap();
        check_publishable(ContentMode::Binary, limit, &e).unwrap();
        let err = check_publishable(ContentMode::Binary, limit - 1, &e).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn oversized_events_are_refused_with_the_limit() {
        let err = check_size(&event(), 10).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        assert!(err.message().contains("max_payload_bytes"), "{err}");
    }
}
