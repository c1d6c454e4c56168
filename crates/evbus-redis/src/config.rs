//! [`RedisConfig`]: where the Redis server is and how the adapter uses it.

use std::fmt;
use std::time::Duration;

use evbus::raw::{ConfigKey, parse_millis, parse_value};
use evbus::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

/// Redis refuses bulk strings above `proto-max-bulk-len` (512 MiB by default); the adapter
/// refuses larger limits outright.
pub const MAX_PAYLOAD_LIMIT: usize = 512 * 1024 * 1024;

/// Settings of a [`RedisTransport`](crate::RedisTransport).
///
/// Every field has a documented default; build one with [`RedisConfig::new`] or
/// [`RedisConfig::from_url`], then adjust fields (the struct is `#[non_exhaustive]`, so set
/// fields on a value rather than with a struct literal). With `serde`, missing fields take
/// their defaults and durations are whole milliseconds (`block_ms`, `claim_interval_ms`, ...).
///
/// `Debug` output never shows the password of [`url`](Self::url).
///
/// ```
/// use evbus_redis::{RedisConfig, Retention};
///
/// let config = RedisConfig::from_url("redis://:s3cret@127.0.0.1:6379/0?prefix=shop:&maxlen=100000")?;
/// assert_eq!(config.key_prefix, "shop:");
/// assert_eq!(config.retention, Retention::MaxLen { entries: 100_000 });
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), evbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The connection URL given to the Redis client: `redis://[user][:password]@host[:port][/db]`
    /// (`rediss://` for TLS, with the `tls` feature). Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key the adapter creates. Default `evbus:`. It must not contain `{` or
    /// `}`: the topic or queue name inside each key is the cluster hash tag. URL and serde
    /// name `prefix`.
    #[serde(rename = "prefix", alias = "key_prefix")]
    pub key_prefix: String,
    /// How topic streams are trimmed on publish. Default [`Retention::Unlimited`].
    pub retention: Retention,
    /// How long one `XREADGROUP` blocks waiting for new entries (`BLOCK`). Default 1 s.
    #[serde(rename = "block_ms", with = "evbus::raw::millis")]
    pub block: Duration,
    /// How often a consumer looks for entries to take over: deliveries whose visibility
    /// timeout expired, nacked and due delayed entries. Never less often than half the
    /// consumer's visibility timeout. Default 1 s.
    #[serde(rename = "claim_interval_ms", with = "evbus::raw::millis")]
    pub claim_interval: Duration,
    /// How long a command may wait for its reply before failing with
    /// [`ErrorKind::Timeout`](evbus::ErrorKind::Timeout). Default 5 s.
    #[serde(rename = "command_timeout_ms", with = "evbus::raw::millis")]
    pub command_timeout: Duration,
    /// How long one connection attempt may take. Default 2 s.
    #[serde(rename = "connect_timeout_ms", with = "evbus::raw::millis")]
    pub connect_timeout: Duration,
    /// First delay between reconnection attempts; it doubles (with jitter) up to
    /// [`reconnect_max_delay`](Self::reconnect_max_delay). Default 100 ms.
    #[serde(rename = "reconnect_min_delay_ms", with = "evbus::raw::millis")]
    pub reconnect_min_delay: Duration,
    /// Longest delay between reconnection attempts. Default 5 s.
    #[serde(rename = "reconnect_max_delay_ms", with = "evbus::raw::millis")]
    pub reconnect_max_delay: Duration,
    /// Largest event accepted (data plus attributes, [`evbus::Event::encoded_len`]).
    /// Default 16 MiB; at most [`MAX_PAYLOAD_LIMIT`].
    pub max_payload_bytes: usize,
    /// An anonymous subscription's consumer group left behind by a process that died is
    /// destroyed by the next anonymous subscription to the same topic once it is older than
    /// this and none of its consumers was seen for this long. Default 1 hour.
    #[serde(rename = "anonymous_ttl_ms", with = "evbus::raw::millis")]
    pub anonymous_ttl: Duration,
}

/// How topic streams are trimmed when events are published (`XADD ... MAXLEN|MINID ~`).
///
/// Trimming is approximate (`~`): Redis removes whole internal nodes, so a stream may hold
/// somewhat more than the limit. **Trimming removes entries whether or not every
/// subscription has read them**: a subscription that lags further behind than the limit
/// loses events. Consumers check their subscription's lag every minute and log a warning
/// (`tracing`) when it comes within 80% of the limit. Queues are never trimmed: an entry
/// is deleted from a queue once it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Retention {
    /// Keep every entry until the topic is deleted (the default). Memory grows with every
    /// publish: configure a limit in production.
    #[default]
    Unlimited,
    /// Keep about the last `entries` entries (`MAXLEN ~ entries`).
    MaxLen {
        /// Entries to keep.
        entries: u64,
    },
    /// Keep entries younger than `age` (`MINID ~ <now - age>`, by the publisher's clock).
    MaxAge {
        /// Age beyond which entries are trimmed.
        #[serde(rename = "age_ms", with = "evbus::raw::millis")]
        age: Duration,
    },
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "evbus:".to_owned(),
            retention: Retention::Unlimited,
            block: Duration::from_secs(1),
            claim_interval: Duration::from_secs(1),
            command_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            max_payload_bytes: 16 * 1024 * 1024,
            anonymous_ttl: Duration::from_secs(3600),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &evbus::registry::redact(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("retention", &self.retention)
            .field("block", &self.block)
            .field("claim_interval", &self.claim_interval)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min_delay", &self.reconnect_min_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("anonymous_ttl", &self.anonymous_ttl)
            .finish()
    }
}

/// The URL query parameters of [`RedisConfig`]: the serde names of its fields, except
/// `maxlen` and `max_age_ms`, URL shorthands for [`RedisConfig::retention`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisConfigKey {
    /// [`RedisConfig::key_prefix`].
    Prefix,
    /// [`Retention::MaxLen`].
    MaxLen,
    /// [`Retention::MaxAge`], in milliseconds.
    MaxAgeMs,
    /// [`RedisConfig::block`].
    BlockMs,
    /// [`RedisConfig::claim_interval`].
    ClaimIntervalMs,
    /// [`RedisConfig::command_timeout`].
    CommandTimeoutMs,
    /// [`RedisConfig::connect_timeout`].
    ConnectTimeoutMs,
    /// [`RedisConfig::reconnect_min_delay`].
    ReconnectMinDelayMs,
    /// [`RedisConfig::reconnect_max_delay`].
    ReconnectMaxDelayMs,
    /// [`RedisConfig::max_payload_bytes`].
    MaxPayloadBytes,
    /// [`RedisConfig::anonymous_ttl`].
    AnonymousTtlMs,
}

impl ConfigKey for RedisConfigKey {
    const ADAPTER: &'static str = "Redis";
    const ALL: &'static [Self] = &[
        RedisConfigKey::Prefix,
        RedisConfigKey::MaxLen,
        RedisConfigKey::MaxAgeMs,
        RedisConfigKey::BlockMs,
        RedisConfigKey::ClaimIntervalMs,
        RedisConfigKey::CommandTimeoutMs,
        RedisConfigKey::ConnectTimeoutMs,
        RedisConfigKey::ReconnectMinDelayMs,
        RedisConfigKey::ReconnectMaxDelayMs,
        RedisConfigKey::MaxPayloadBytes,
        RedisConfigKey::AnonymousTtlMs,
    ];

    fn name(self) -> &'static str {
        match self {
            RedisConfigKey::Prefix => "prefix",
            RedisConfigKey::MaxLen => "maxlen",
            RedisConfigKey::MaxAgeMs => "max_age_ms",
            RedisConfigKey::BlockMs => "block_ms",
            RedisConfigKey::ClaimIntervalMs => "claim_interval_ms",
            RedisConfigKey::CommandTimeoutMs => "command_timeout_ms",
            RedisConfigKey::ConnectTimeoutMs => "connect_timeout_ms",
            RedisConfigKey::ReconnectMinDelayMs => "reconnect_min_delay_ms",
            RedisConfigKey::ReconnectMaxDelayMs => "reconnect_max_delay_ms",
            RedisConfigKey::MaxPayloadBytes => "max_payload_bytes",
            RedisConfigKey::AnonymousTtlMs => "anonymous_ttl_ms",
        }
    }
}

impl RedisConfig {
    /// The defaults, connecting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }

    /// Reads a `redis://` or `rediss://` URL. The adapter's own settings travel as query
    /// parameters and are removed from [`url`](Self::url): `prefix`, `maxlen` (see
    /// [`Retention::MaxLen`]), `max_age_ms` ([`Retention::MaxAge`]), `block_ms`,
    /// `claim_interval_ms`, `command_timeout_ms`, `connect_timeout_ms`,
    /// `reconnect_min_delay_ms`, `reconnect_max_delay_ms`, `max_payload_bytes`,
    /// `anonymous_ttl_ms`. An unknown parameter is an error (a typo would otherwise be
    /// silently ignored).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = evbus::registry::parse_url(url, "Redis")?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), for an already parsed URL.
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        match url.scheme() {
            "redis" | "rediss" => {}
            other => {
                return Err(Error::invalid_config(format!(
                    "`{other}://` is not a Redis URL; use redis:// or rediss://"
                )));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid_config(format!(
                "`{}` names no host; use redis://HOST[:PORT]",
                evbus::registry::redact(url.as_str())
            )));
        }
        let mut config = RedisConfig::default();
        for (name, value) in url.query_pairs() {
            use RedisConfigKey as K;
            let key = K::parse(&name)?;
            let millis = || parse_millis(key, &value);
            match key {
                K::Prefix => config.key_prefix = value.clone().into_owned(),
                K::MaxLen => {
                    config.retention = Retention::MaxLen {
                        entries: parse_value(key, &value)?,
                    }
                }
                K::MaxAgeMs => config.retention = Retention::MaxAge { age: millis()? },
                K::BlockMs => config.block = millis()?,
                K::ClaimIntervalMs => config.claim_interval = millis()?,
                K::CommandTimeoutMs => config.command_timeout = millis()?,
                K::ConnectTimeoutMs => config.connect_timeout = millis()?,
                K::ReconnectMinDelayMs => config.reconnect_min_delay = millis()?,
                K::ReconnectMaxDelayMs => config.reconnect_max_delay = millis()?,
                K::MaxPayloadBytes => config.max_payload_bytes = parse_value(key, &value)?,
                K::AnonymousTtlMs => config.anonymous_ttl = millis()?,
            }
        }
        let mut client_url = url.clone();
        client_url.set_query(None);
        config.url = client_url.to_string();
        config.validate()?;
        Ok(config)
    }

    /// Checks that the settings are usable; [`RedisTransport::connect`](crate::RedisTransport::connect)
    /// calls it.
    pub fn validate(&self) -> Result<()> {
        let url = evbus::registry::parse_url(&self.url, "Redis")?;
        match url.scheme() {
            "redis" => {}
            "rediss" if cfg!(feature = "tls") => {}
            "rediss" => {
                return Err(Error::invalid_config(
                    "`rediss://` (TLS) needs the `tls` feature of evbus-redis; enable it in \
                     Cargo.toml",
                ));
            }
            other => {
                return Err(Error::invalid_config(format!(
                    "`{other}://` is not a Redis URL; use redis:// or rediss://"
                )));
            }
        }
        if url.query().is_some() {
            return Err(Error::invalid_config(format!(
                "RedisConfig::url must not carry query parameters (`{}`); set the fields of \
                 RedisConfig instead, or use RedisConfig::from_url",
                evbus::registry::redact(&self.url)
            )));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(Error::invalid_config(format!(
                "key prefix `{}` must not contain `{{` or `}}`: the topic or queue name is the \
                 key's cluster hash tag",
                self.key_prefix
            )));
        }
        evbus::raw::check_positive(&[
            ("block", self.block),
            ("command_timeout", self.command_timeout),
            ("connect_timeout", self.connect_timeout),
            ("claim_interval", self.claim_interval),
        ])?;
        if self.reconnect_max_delay < self.reconnect_min_delay {
            return Err(Error::invalid_config(
                "reconnect_max_delay must not be less than reconnect_min_delay",
            ));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return Err(Error::invalid_config(format!(
                "max_payload_bytes must be between 1 and {MAX_PAYLOAD_LIMIT} (Redis' \
                 proto-max-bulk-len), got {}",
                self.max_payload_bytes
            )));
        }
        match self.retention {
            Retention::MaxLen { entries: 0 } => Err(Error::invalid_config(
                "retention MaxLen must keep at least one entry",
            )),
            Retention::MaxAge { age } if age.is_zero() => Err(Error::invalid_config(
                "retention MaxAge must be longer than zero",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::ErrorKind;

    #[test]
    fn url_keys_are_the_serde_names_but_the_retention_shorthands() {
        let json = serde_json::to_value(RedisConfig::default()).unwrap();
        let mut serde_names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| &**k)
            .filter(|k| !["url", "retention"].contains(k))
            .collect();
        serde_names.sort_unstable();
        let mut url_names: Vec<&str> = RedisConfigKey::ALL
            .iter()
            .map(|k| k.name())
            .filter(|k| !["maxlen", "max_age_ms"].contains(k))
            .collect();
        url_names.sort_unstable();
        assert_eq!(serde_names, url_names);
    }

    #[test]
    fn defaults_connect_to_the_local_server_without_trimming() {
        let config = RedisConfig::default();
        assert_eq!(config.url, "redis://127.0.0.1:6379");
        assert_eq!(config.key_prefix, "evbus:");
        assert_eq!(config.retention, Retention::Unlimited);
        config.validate().unwrap();
    }

    #[test]
    fn url_parameters_become_settings_and_leave_the_client_url() {
        let config = RedisConfig::from_url(
            "redis://user:pw@localhost:6380/2?prefix=shop:&block_ms=250&claim_interval_ms=100\
             &command_timeout_ms=900&connect_timeout_ms=800&reconnect_min_delay_ms=10\
             &reconnect_max_delay_ms=20&max_payload_bytes=1024&anonymous_ttl_ms=60000",
        )
        .unwrap();
        assert_eq!(config.url, "redis://user:pw@localhost:6380/2");
        assert_eq!(config.key_prefix, "shop:");
        assert_eq!(config.block, Duration::from_millis(250));
        assert_eq!(config.claim_interval, Duration::from_millis(100));
        assert_eq!(config.command_timeout, Duration::from_millis(900));
        assert_eq!(config.connect_timeout, Duration::from_millis(800));
        assert_eq!(config.reconnect_min_delay, Duration::from_millis(10));
        assert_eq!(config.reconnect_max_delay, Duration::from_millis(20));
        assert_eq!(config.max_payload_bytes, 1024);
        assert_eq!(config.anonymous_ttl, Duration::from_secs(60));
    }

    #[test]
    fn retention_comes_from_maxlen_or_max_age() {
        let by_len = RedisConfig::from_url("redis://h?maxlen=1000").unwrap();
        assert_eq!(by_len.retention, Retention::MaxLen { entries: 1000 });
        let by_age = RedisConfig::from_url("redis://h?max_age_ms=3600000").unwrap();
        assert_eq!(
            by_age.retention,
            Retention::MaxAge {
                age: Duration::from_secs(3600)
            }
        );
    }

    #[test]
    fn unknown_parameters_name_the_known_ones() {
        let err = RedisConfig::from_url("redis://h?prefx=a:").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("prefx"), "{err}");
        assert!(err.message().contains("prefix"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_parameter_name() {
        let err = RedisConfig::from_url("redis://h?block_ms=soon").unwrap_err();
        assert!(err.message().contains("block_ms"), "{err}");
        let err = RedisConfig::from_url("redis://h?block_ms=0").unwrap_err();
        assert!(err.message().contains("block"), "{err}");
        let err = RedisConfig::from_url("redis://h?maxlen=0").unwrap_err();
        assert!(err.message().contains("MaxLen"), "{err}");
        let err = RedisConfig::from_url("redis://h?prefix=a{b}:").unwrap_err();
        assert!(err.message().contains("hash tag"), "{err}");
        let err = RedisConfig::from_url("redis://h?max_payload_bytes=999999999999").unwrap_err();
        assert!(err.message().contains("max_payload_bytes"), "{err}");
    }

    #[test]
    fn other_schemes_and_missing_hosts_are_rejected() {
        let err = RedisConfig::from_url("kafka://h:9092").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(RedisConfig::from_url("redis://").is_err());
        assert!(RedisConfig::from_url("not a url").is_err());
    }

    #[test]
    fn rediss_needs_the_tls_feature() {
        let result = RedisConfig::from_url("rediss://h:6380");
        if cfg!(feature = "tls") {
            result.unwrap();
        } else {
            assert!(result.unwrap_err().message().contains("`tls` feature"));
        }
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let config = RedisConfig::from_url("redis://user:hunter2@h:1/0").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        let err = RedisConfig::from_url("redis://user:hunter2@h:1/0?nope=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn serde_uses_milliseconds_and_fills_defaults() {
        let config: RedisConfig = serde_json::from_value(serde_json::json!({
            "url": "redis://h:1",
            "block_ms": 200,
            "retention": {"kind": "max_len", "entries": 5}
        }))
        .unwrap();
        assert_eq!(config.block, Duration::from_millis(200));
        assert_eq!(config.retention, Retention::MaxLen { entries: 5 });
        assert_eq!(config.key_prefix, "evbus:");
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["block_ms"], 200);
        assert_eq!(back["retention"]["kind"], "max_len");
        let age: Retention =
            serde_json::from_value(serde_json::json!({"kind": "max_age", "age_ms": 1000})).unwrap();
        assert_eq!(
            age,
            Retention::MaxAge {
                age: Duration::from_secs(1)
            }
        );
    }
}
