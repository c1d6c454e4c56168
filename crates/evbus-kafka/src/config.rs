//! [`KafkaConfig`]: where the Kafka cluster is and how the adapter uses it.

use std::collections::BTreeMap;
use std::time::Duration;

use evbus::raw::{ConfigKey, parse_millis, parse_value};
use evbus::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::state::OffsetStateStore;

/// Settings of a [`KafkaTransport`](crate::KafkaTransport).
///
/// Every field has a documented default; build one with [`KafkaConfig::new`] or
/// [`KafkaConfig::from_url`], then adjust fields (the struct is `#[non_exhaustive]`). With
/// `serde`, missing fields take their defaults and durations are whole milliseconds
/// (`session_timeout_ms`, ...).
///
/// ```
/// use evbus_kafka::KafkaConfig;
///
/// let config = KafkaConfig::from_url("kafka://127.0.0.1:9092?partitions=6&session_timeout_ms=6000")?;
/// assert_eq!(config.bootstrap_servers, "127.0.0.1:9092");
/// assert_eq!(config.partitions, 6);
/// assert_eq!(config.session_timeout.as_millis(), 6000);
/// # Ok::<(), evbus::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `host:port[,host:port...]` of the bootstrap brokers. Default `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// The `client.id` every client of the transport reports. Default `evbus`.
    pub client_id: String,
    /// Partitions of the topics the adapter creates. Also the most consumers that can compete
    /// on one subscription or queue and all receive events
    /// ([`Capabilities::max_competing_consumers`](evbus::Capabilities::max_competing_consumers)).
    /// Default 3.
    pub partitions: i32,
    /// Replication factor of the topics the adapter creates. Default 1 (use 3 in production).
    pub replication_factor: i32,
    /// Consumer group session timeout (`session.timeout.ms`): how long a consumer that vanished
    /// without leaving its group keeps its partitions (and so its unacknowledged deliveries)
    /// before the group hands them to another member. Apache Kafka refuses values below the
    /// broker's `group.min.session.timeout.ms` (6 s by default). Default 10 s.
    #[serde(rename = "session_timeout_ms", with = "evbus::raw::millis")]
    pub session_timeout: Duration,
    /// Consumer heartbeat interval (`heartbeat.interval.ms`): how soon a member learns of a
    /// rebalance. Default 1 s.
    #[serde(rename = "heartbeat_interval_ms", with = "evbus::raw::millis")]
    pub heartbeat_interval: Duration,
    /// How long the producer keeps retrying one publish (`message.timeout.ms`, through broker
    /// outages) before it fails with a retryable [`ErrorKind::Timeout`](evbus::ErrorKind).
    /// Default 30 s. Every timing here is at least 1 ms (librdkafka reads a
    /// `message.timeout.ms` of 0 as "never"), at most `i32::MAX` ms, and session and
    /// heartbeat at most an hour (librdkafka's range).
    #[serde(rename = "message_timeout_ms", with = "evbus::raw::millis")]
    pub message_timeout: Duration,
    /// Time limit of admin requests, offset commits and metadata requests. Default 10 s.
    #[serde(rename = "operation_timeout_ms", with = "evbus::raw::millis")]
    pub operation_timeout: Duration,
    /// How long a new consumer waits for its first partition assignment before
    /// `subscribe`/`receive` fail with a retryable timeout. Default 30 s.
    #[serde(rename = "assignment_timeout_ms", with = "evbus::raw::millis")]
    pub assignment_timeout: Duration,
    /// Largest event data accepted, in bytes. The adapter creates topics with a
    /// `max.message.bytes` large enough for it plus the headers, and sets the producer's
    /// `message.max.bytes` to match. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Where per-partition acknowledgement state above the committed offset (out-of-order
    /// acks, attempt counts) is kept, so that it survives a change of partition owner:
    /// [`OffsetStateStore::Auto`] (the default) probes whether the broker keeps offset-commit
    /// metadata and uses it if so, a compacted state topic per consumer group otherwise. URL
    /// parameter `offset_state=auto|commit_metadata|state_topic`.
    pub offset_state: OffsetStateStore,
    /// Extra librdkafka properties given to every client (`security.protocol`,
    /// `compression.type`, ...). They override the adapter's own settings: change the
    /// delivery guarantees (`acks`, `enable.idempotence`) at your own risk.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            client_id: "evbus".to_owned(),
            partitions: 3,
            replication_factor: 1,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            message_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(10),
            assignment_timeout: Duration::from_secs(30),
            max_payload_bytes: 1024 * 1024,
            offset_state: OffsetStateStore::Auto,
            properties: BTreeMap::new(),
        }
    }
}

/// Headers and framing allowed on top of the payload when sizing `max.message.bytes`.
pub(crate) const HEADER_ALLOWANCE: usize = 64 * 1024;

impl KafkaConfig {
    /// The defaults, with `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            ..KafkaConfig::default()
        }
    }

    /// Parses `kafka://host:port[?param=value&...]`.
    ///
    /// Query parameters: `brokers` (more bootstrap servers, comma-separated), `client_id`,
    /// `partitions`, `replication_factor`, `session_timeout_ms`, `heartbeat_interval_ms`,
    /// `message_timeout_ms`, `operation_timeout_ms`, `assignment_timeout_ms`,
    /// `max_payload_bytes`, `offset_state` (`auto`, `commit_metadata`, `state_topic`), and
    /// `rdkafka.<property>` for any librdkafka property.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = evbus::registry::parse_url(url, "Kafka")?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), from a parsed URL.
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        let shown = evbus::registry::redact(url.as_str());
        if !crate::URL_SCHEMES.contains(&url.scheme()) {
            return Err(Error::invalid_config(format!(
                "`{shown}` is not a Kafka URL: expected kafka://host:port"
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid_config(format!(
                "`{shown}`: credentials in Kafka URLs are not supported; set SASL properties \
                 with `rdkafka.sasl.*` parameters instead"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| Error::invalid_config(format!("`{shown}` names no broker host")))?;
        let mut config = KafkaConfig::new(format!("{host}:{}", url.port().unwrap_or(9092)));
        for (name, value) in url.query_pairs() {
            use KafkaConfigKey as K;
            // Any librdkafka property: `rdkafka.<property>`.
            if let Some(property) = name.strip_prefix("rdkafka.").filter(|p| !p.is_empty()) {
                config
                    .properties
                    .insert(property.to_owned(), value.to_string());
                continue;
            }
            let key = K::parse(&name)?;
            let millis = || parse_millis(key, &value);
            match key {
                K::Brokers => {
                    config.bootstrap_servers.push(',');
                    config.bootstrap_servers.push_str(&value);
                }
                K::ClientId => config.client_id = value.to_string(),
                K::Partitions => config.partitions = parse_value(key, &value)?,
                K::ReplicationFactor => config.replication_factor = parse_value(key, &value)?,
                K::SessionTimeoutMs => config.session_timeout = millis()?,
                K::HeartbeatIntervalMs => config.heartbeat_interval = millis()?,
                K::MessageTimeoutMs => config.message_timeout = millis()?,
                K::OperationTimeoutMs => config.operation_timeout = millis()?,
                K::AssignmentTimeoutMs => config.assignment_timeout = millis()?,
                K::MaxPayloadBytes => config.max_payload_bytes = parse_value(key, &value)?,
                K::OffsetState => config.offset_state = parse_value(key, &value)?,
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::invalid_config("bootstrap_servers is empty"));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err(Error::invalid_config(
                "partitions and replication_factor must be at least 1",
            ));
        }
        // librdkafka's ranges (`message.timeout.ms` 0 is "no timeout": a publish during an
        // outage would never return); the adapter's own limits must let an operation start.
        let group = [
            ("session_timeout", self.session_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
        ];
        let operations = [
            ("message_timeout", self.message_timeout),
            ("operation_timeout", self.operation_timeout),
            ("assignment_timeout", self.assignment_timeout),
        ];
        evbus::raw::check_positive(&group)?;
        evbus::raw::check_positive(&operations)?;
        evbus::raw::check_at_most(&group, Duration::from_secs(3600))?;
        evbus::raw::check_at_most(&operations, Duration::from_millis(i32::MAX as u64))?;
        if self.heartbeat_interval >= self.session_timeout {
            return Err(Error::invalid_config(
                "heartbeat_interval must be shorter than session_timeout",
            ));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 512 * 1024 * 1024 {
            return Err(Error::invalid_config(
                "max_payload_bytes must be between 1 byte and 512 MiB",
            ));
        }
        Ok(())
    }

    /// The librdkafka `message.max.bytes`/`max.message.bytes` the adapter uses.
    pub(crate) fn message_max_bytes(&self) -> usize {
        self.max_payload_bytes + HEADER_ALLOWANCE
    }

    /// Settings shared by every librdkafka client of the transport.
    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set("message.max.bytes", self.message_max_bytes().to_string())
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("log_level", "3");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// The URL query parameters of [`KafkaConfig`]: the serde names of its fields, except
/// `brokers` (more bootstrap servers, added to [`KafkaConfig::bootstrap_servers`]), plus
/// `rdkafka.<property>` for [`KafkaConfig::properties`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KafkaConfigKey {
    /// More bootstrap servers, comma-separated.
    Brokers,
    /// [`KafkaConfig::client_id`].
    ClientId,
    /// [`KafkaConfig::partitions`].
    Partitions,
    /// [`KafkaConfig::replication_factor`].
    ReplicationFactor,
    /// [`KafkaConfig::session_timeout`].
    SessionTimeoutMs,
    /// [`KafkaConfig::heartbeat_interval`].
    HeartbeatIntervalMs,
    /// [`KafkaConfig::message_timeout`].
    MessageTimeoutMs,
    /// [`KafkaConfig::operation_timeout`].
    OperationTimeoutMs,
    /// [`KafkaConfig::assignment_timeout`].
    AssignmentTimeoutMs,
    /// [`KafkaConfig::max_payload_bytes`].
    MaxPayloadBytes,
    /// [`KafkaConfig::offset_state`].
    OffsetState,
}

impl ConfigKey for KafkaConfigKey {
    const ADAPTER: &'static str = "Kafka";
    const ALL: &'static [Self] = &[
        KafkaConfigKey::Brokers,
        KafkaConfigKey::ClientId,
        KafkaConfigKey::Partitions,
        KafkaConfigKey::ReplicationFactor,
        KafkaConfigKey::SessionTimeoutMs,
        KafkaConfigKey::HeartbeatIntervalMs,
        KafkaConfigKey::MessageTimeoutMs,
        KafkaConfigKey::OperationTimeoutMs,
        KafkaConfigKey::AssignmentTimeoutMs,
        KafkaConfigKey::MaxPayloadBytes,
        KafkaConfigKey::OffsetState,
    ];

    fn name(self) -> &'static str {
        match self {
            KafkaConfigKey::Brokers => "brokers",
            KafkaConfigKey::ClientId => "client_id",
            KafkaConfigKey::Partitions => "partitions",
            KafkaConfigKey::ReplicationFactor => "replication_factor",
            KafkaConfigKey::SessionTimeoutMs => "session_timeout_ms",
            KafkaConfigKey::HeartbeatIntervalMs => "heartbeat_interval_ms",
            KafkaConfigKey::MessageTimeoutMs => "message_timeout_ms",
            KafkaConfigKey::OperationTimeoutMs => "operation_timeout_ms",
            KafkaConfigKey::AssignmentTimeoutMs => "assignment_timeout_ms",
            KafkaConfigKey::MaxPayloadBytes => "max_payload_bytes",
            KafkaConfigKey::OffsetState => "offset_state",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_outside_what_librdkafka_takes_are_refused_at_once() {
        for (query, name) in [
            ("message_timeout_ms=0", "message_timeout"),
            ("message_timeout_ms=3000000000", "message_timeout"),
            ("operation_timeout_ms=0", "operation_timeout"),
            ("assignment_timeout_ms=0", "assignment_timeout"),
            ("session_timeout_ms=3600001", "session_timeout"),
            ("heartbeat_interval_ms=0", "heartbeat_interval"),
        ] {
            let e = KafkaConfig::from_url(&format!("kafka://k1:9093?{query}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert_eq!(e.kind(), evbus::ErrorKind::InvalidConfig, "{query}: {e}");
            assert!(e.to_string().contains(name), "{query}: {e}");
        }
        KafkaConfig::from_url("kafka://k1:9093?message_timeout_ms=1&session_timeout_ms=3600000")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn urls_set_every_documented_parameter() {
        let c = KafkaConfig::from_url(
            "kafka://k1:9093?brokers=k2:9093&partitions=8&replication_factor=3&heartbeat_interval_ms=500\
             &message_timeout_ms=5000&offset_state=state_topic&rdkafka.compression.type=zstd",
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers, "k1:9093,k2:9093");
        assert_eq!((c.partitions, c.replication_factor), (8, 3));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.message_timeout, Duration::from_secs(5));
        assert_eq!(c.properties["compression.type"], "zstd");
        assert_eq!(c.offset_state, OffsetStateStore::StateTopic);
    }

    #[test]
    fn bad_urls_are_invalid_config_errors_without_secrets() {
        for url in [
            "redis://h:1",
            "kafka://h:1?partitions=zero",
            "kafka://h:1?what=1",
            "kafka://h:1?partitions=0",
            "kafka://h:1?offset_state=metadata",
        ] {
            let e = KafkaConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), evbus::ErrorKind::InvalidConfig, "{url}");
        }
        let e = KafkaConfig::from_url("kafka://u:s3cret@h:1").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn url_keys_are_the_serde_names_but_brokers_and_rdkafka_properties() {
        let json = serde_json::to_value(KafkaConfig::default()).unwrap();
        let skip = ["bootstrap_servers", "properties", "brokers"];
        let mut serde_names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| &**k)
            .filter(|k| !skip.contains(k))
            .collect();
        serde_names.sort_unstable();
        let mut url_names: Vec<&str> = KafkaConfigKey::ALL
            .iter()
            .map(|k| k.name())
            .filter(|k| !skip.contains(k))
            .collect();
        url_names.sort_unstable();
        assert_eq!(serde_names, url_names);
        let typo = KafkaConfig::from_url("kafka://h:1?partition=2").unwrap_err();
        assert!(
            typo.message()
                .contains("valid keys are: brokers, client_id"),
            "{typo}"
        );
    }

    #[test]
    fn default_port_is_9092() {
        assert_eq!(
            KafkaConfig::from_url("kafka://broker")
                .unwrap()
                .bootstrap_servers,
            "broker:9092"
        );
    }
}
