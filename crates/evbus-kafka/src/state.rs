//! Where a consumer group keeps, per partition, what lies above its committed offset: the
//! offsets already acknowledged and how often each unsettled one was handed out (the string
//! [`Partition::metadata`](crate::consumer) writes).
//!
//! - [`OffsetStateStore::CommitMetadata`]: in the offset commit's metadata. Atomic with the
//!   commit; Apache Kafka keeps it, tansu drops it.
//! - [`OffsetStateStore::StateTopic`]: in a compacted Kafka topic of the group,
//!   `__evbus_state.<group>`, one partition per partition of the consumed topic, record key
//!   `<topic>/<partition>`, value `<committed offset>|<metadata>`. The record is written (and
//!   its delivery awaited) *before* the commit of that offset is sent. A new owner of a
//!   partition reads the last few records of its state partition and uses the newest one whose
//!   committed offset equals the group's committed offset; a record that does not match (the
//!   process died between the state write and the commit, or the record is older than the
//!   commit) is ignored, so the state can only ever add true facts about offsets at or above
//!   the commit (acked, handed out `n` times), never make the consumer skip an offset that
//!   was not acknowledged.
//! - [`OffsetStateStore::Auto`]: the first consumer of a transport commits metadata to a
//!   throw-away probe group and reads it back; metadata if it round-trips, the state topic
//!   otherwise.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;

/// Where the adapter keeps per-partition acknowledgement state above the committed offset
/// ([`KafkaConfig::offset_state`]); see the crate README, "Guarantees".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OffsetStateStore {
    /// Probe once per transport whether the broker keeps offset-commit metadata; use
    /// [`CommitMetadata`](Self::CommitMetadata) if it does, [`StateTopic`](Self::StateTopic)
    /// otherwise. The default.
    #[default]
    Auto,
    /// In the offset commit's metadata (atomic with the commit; needs a broker that stores it,
    /// as Apache Kafka does).
    CommitMetadata,
    /// In a compacted topic per consumer group, `__evbus_state.<group>` (works on any broker).
    StateTopic,
}

impl OffsetStateStore {
    /// The URL / config spelling: `auto`, `commit_metadata`, `state_topic`.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetStateStore::Auto => "auto",
            OffsetStateStore::CommitMetadata => "commit_metadata",
            OffsetStateStore::StateTopic => "state_topic",
        }
    }
}

impl std::str::FromStr for OffsetStateStore {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(OffsetStateStore::Auto),
            "commit_metadata" => Ok(OffsetStateStore::CommitMetadata),
            "state_topic" => Ok(OffsetStateStore::StateTopic),
            _ => Err("expected `auto`, `commit_metadata` or `state_topic`".to_owned()),
        }
    }
}

/// Prefix of every state topic.
pub(crate) const STATE_TOPIC_PREFIX: &str = "__evbus_state.";

/// How many records at the end of a state partition a new owner looks through for one that
/// matches the committed offset.
const LOOK_BACK: i64 = 32;

/// The state topic of consumer group `group`: `__evbus_state.<group>`, or, when the group's
/// name is not a legal topic name or too long, a legal prefix of it and a hash.
pub(crate) fn state_topic_name(group: &str) -> String {
    let name = format!("{STATE_TOPIC_PREFIX}{group}");
    if crate::naming::check_topic_name(&name).is_ok() {
        return name;
    }
    // FNV-1a: stable across runs and versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let legal: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(180)
        .collect();
    format!("{STATE_TOPIC_PREFIX}{legal}.{hash:016x}")
}

/// The key of partition `partition` of `topic` in a state topic.
fn key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The value of a state record.
pub(crate) fn encode(committed: i64, metadata: &str) -> String {
    format!("{committed}|{metadata}")
}

/// The metadata of a state record, if it was written for committed offset `committed`.
pub(crate) fn decode(value: &str, committed: i64) -> Option<&str> {
    let (offset, metadata) = value.split_once('|')?;
    (offset.parse::<i64>().ok()? == committed).then_some(metadata)
}

/// The state topic of one consumer group, and a reader for it.
pub(crate) struct StateTopic {
    pub(crate) name: String,
    producer: FutureProducer,
    config: KafkaConfig,
    /// An assign-only consumer (no group) reading state partitions; created on first use.
    reader: Mutex<Option<BaseConsumer>>,
}

/// The delivery of one state record.
pub(crate) type Pending = rdkafka::producer::DeliveryFuture;

impl StateTopic {
    pub(crate) fn new(name: String, producer: FutureProducer, config: KafkaConfig) -> Self {
        StateTopic {
            name,
            producer,
            config,
            reader: Mutex::new(None),
        }
    }

    /// Closes the reader, if one was made (a later [`read`](Self::read) makes another): its
    /// subscription's consumer is gone, and nothing reads the state for it any more.
    pub(crate) fn close_reader(&self) {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(reader);
    }

    /// Enqueues the state record of partition `partition` of `topic`; `None` if librdkafka
    /// refused it (queue full, closing).
    pub(crate) fn write(
        &self,
        topic: &str,
        partition: i32,
        committed: i64,
        metadata: &str,
    ) -> Option<Pending> {
        let key = key(topic, partition);
        let value = encode(committed, metadata);
        let record = FutureRecord::to(&self.name)
            .partition(partition)
            .key(&key)
            .payload(&value);
        match self.producer.send_result(record) {
            Ok(pending) => Some(pending),
            Err((e, _)) => {
                tracing::debug!(error = %e, topic = %self.name, "could not enqueue a state record");
                None
            }
        }
    }

    /// Writes the state records of `commits` (partition, committed offset, metadata) and
    /// waits for their delivery (at most the producer's `message_timeout`); whether all were
    /// written.
    pub(crate) fn write_sync(&self, topic: &str, commits: &[(i32, i64, String)]) -> bool {
        let pending: Vec<Option<Pending>> = commits
            .iter()
            .map(|(p, offset, metadata)| self.write(topic, *p, *offset, metadata))
            .collect();
        pending.into_iter().all(|p| match p {
            Some(p) => matches!(futures::executor::block_on(p), Ok(Ok(_))),
            None => false,
        })
    }

    /// Reads, for each `(partition, committed offset)`, the metadata of the newest state
    /// record of that partition written for that committed offset. Partitions without one
    /// (or whose state cannot be read within `operation_timeout`) are left out.
    pub(crate) fn read(&self, topic: &str, wanted: &[(i32, i64)]) -> Vec<(i32, String)> {
        let timeout = self.config.operation_timeout;
        let mut guard = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let mut client = self.config.client_config();
            // A group id is needed to `assign`; the reader never joins or commits.
            client
                .set("group.id", "evbus.state-reader")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "10");
            match client.create::<BaseConsumer>() {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    let e = crate::error::from_kafka(e, "creating the state topic's reader");
                    tracing::warn!(error = %e, topic = %self.name, "cannot read the state topic; attempt counts restart");
                    return Vec::new();
                }
            }
        }
        let Some(reader) = guard.as_ref() else {
            return Vec::new();
        };
        // Where each partition's look-back starts, and the last offset in it.
        let mut tpl = TopicPartitionList::new();
        let mut ends = std::collections::HashMap::new();
        for &(p, committed) in wanted {
            match reader.fetch_watermarks(&self.name, p, timeout) {
                Ok((low, high)) if high > low => {
                    let start = low.max(high - LOOK_BACK);
                    let _ = tpl.add_partition_offset(&self.name, p, Offset::Offset(start));
                    ends.insert(p, (high - 1, committed, None::<String>, false));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.name, partition = p, "cannot read the state topic; attempt counts restart");
                }
            }
        }
        if tpl.count() == 0 {
            return Vec::new();
        }
        if let Err(e) = reader.assign(&tpl) {
            tracing::warn!(error = %e, topic = %self.name, "cannot read the state topic; attempt counts restart");
            return Vec::new();
        }
        type Ends = std::collections::HashMap<i32, (i64, i64, Option<String>, bool)>;
        let take = |ends: &mut Ends, message: &rdkafka::message::BorrowedMessage<'_>| {
            let p = message.partition();
            let Some(end) = ends.get_mut(&p) else {
                return;
            };
            let expected = key(topic, p);
            if message.key() == Some(expected.as_bytes())
                && let Some(value) = message.payload().and_then(|v| std::str::from_utf8(v).ok())
                && let Some(metadata) = decode(value, end.1)
            {
                end.2 = Some(metadata.to_owned());
            }
            if message.offset() >= end.0 {
                end.3 = true;
            }
        };
        let deadline = Instant::now() + timeout;
        let mut all_read = false;
        while !all_read && Instant::now() < deadline {
            if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
                take(&mut ends, &message);
            }
            all_read = ends.values().all(|e| e.3);
        }
        // A high watermark may fall short of the end (tansu: the last batch's first offset
        // plus one), so records of that batch can lie past it: what was fetched already is
        // read too, so that the newest record of a partition is not left behind.
        if all_read {
            while Instant::now() < deadline
                && let Some(Ok(message)) = reader.poll(Duration::from_millis(20))
            {
                take(&mut ends, &message);
            }
        }
        let _ = reader.unassign();
        ends.into_iter()
            .filter_map(|(p, (_, _, metadata, done))| {
                if !done {
                    tracing::warn!(topic = %self.name, partition = p, "state partition not read in time; attempt counts restart");
                }
                metadata.map(|m| (p, m))
            })
            .collect()
    }
}

/// Whether the broker keeps offset-commit metadata: commits offset 0 of partition 0 of
/// `topic` with metadata for the throw-away group `group`, and reads it back.
pub(crate) fn probe_commit_metadata(
    config: &KafkaConfig,
    topic: &str,
    group: &str,
) -> Result<bool, String> {
    const MARK: &str = "evbus-probe";
    let mut client = config.client_config();
    client
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client
        .create()
        .map_err(|e| crate::error::from_kafka(e, "creating a probe consumer").to_string())?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(0))
        .map_err(|e| e.to_string())?;
    if let Some(mut elem) = tpl.find_partition(topic, 0) {
        elem.set_metadata(MARK);
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| e.to_string())?;
    let committed = consumer
        .committed_offsets(tpl, config.operation_timeout)
        .map_err(|e| e.to_string())?;
    Ok(committed
        .find_partition(topic, 0)
        .is_some_and(|e| e.metadata() == MARK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_apply_only_to_their_committed_offset() {
        let value = encode(42, "evbus1|43+1:a,44+2:3,");
        assert_eq!(decode(&value, 42), Some("evbus1|43+1:a,44+2:3,"));
        // The commit did not land (crash after the state write), or the state is older.
        assert_eq!(decode(&value, 41), None);
        assert_eq!(decode(&value, 43), None);
        assert_eq!(decode("garbage", 0), None);
    }

    #[test]
    fn state_topic_names_are_legal_kafka_names() {
        assert_eq!(
            state_topic_name("evbus.queue.jobs"),
            "__evbus_state.evbus.queue.jobs"
        );
        for group in ["evbus.sub.orders.bill ing/ä", &"x".repeat(300)] {
            let name = state_topic_name(group);
            assert!(crate::naming::check_topic_name(&name).is_ok(), "{name}");
            assert_ne!(name, state_topic_name("evbus.sub.orders.other"));
        }
    }

    #[test]
    fn store_names_round_trip() {
        for store in [
            OffsetStateStore::Auto,
            OffsetStateStore::CommitMetadata,
            OffsetStateStore::StateTopic,
        ] {
            assert_eq!(store.as_str().parse::<OffsetStateStore>(), Ok(store));
        }
        assert!("metadata".parse::<OffsetStateStore>().is_err());
    }
}
