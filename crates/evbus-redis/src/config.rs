//! [`RedisConfig`]: where the Redis server is and how the adapter uses it.

use std::fmt;
use std::time::Duration;

use evbus::raw::hosts::{self, HostList, HostSyntax};
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
    ///
    /// A Redis Cluster is `redis+cluster://[user][:password]@host:port[,host:port...]`
    /// (`rediss+cluster://` for TLS): the seed nodes, comma-separated, the credentials given
    /// once for all of them; the client discovers the other nodes and follows `MOVED`/`ASK`
    /// redirections and failovers by itself. No database number (a cluster has only db 0).
    pub url: String,
    /// More seed nodes of the cluster, `host:port` each, added to those of
    /// [`url`](Self::url) (a `redis+cluster://` URL only). Default none. As a URL parameter,
    /// `servers` is a comma-separated list: the form to use where the URL is parsed as a
    /// standard URL first ([`evbus::Registry`], the `evbus` CLI), which refuses several hosts:
    /// `redis+cluster://10.0.0.1:7000?servers=10.0.0.2:7000,10.0.0.3:7000`.
    #[serde(default)]
    pub servers: Vec<String>,
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
    /// Largest event accepted (data plus attributes, [`evbus::Event::encoded_len`]; in
    /// [`ContentMode::Structured`], the length of the JSON written, which base64 data or
    /// escapes make larger). Default 16 MiB; at most [`MAX_PAYLOAD_LIMIT`].
    pub max_payload_bytes: usize,
    /// An anonymous subscription's consumer group left behind by a process that died is
    /// destroyed by the next anonymous subscription to the same topic once it is older than
    /// this and none of its consumers was seen for this long. Default 1 hour; from a minute
    /// to a year (any process's sweep judges every process's anonymous subscriptions by its
    /// own TTL).
    #[serde(rename = "anonymous_ttl_ms", with = "evbus::raw::millis")]
    pub anonymous_ttl: Duration,
    /// After each publish (after the last `XADD` of a batch), `WAIT` until this many replicas
    /// of the master that took the write acknowledged it, so that an `Ok` publish survives the
    /// loss of that master (Redis replicates asynchronously: without it, a failover can drop
    /// the last writes a master acknowledged). Fewer replicas within
    /// [`wait_timeout`](Self::wait_timeout) fail the publish with a retryable
    /// [`ErrorKind::Broker`](evbus::ErrorKind::Broker) error (the event was written to the
    /// master: a retry may store it twice). `None` (the default) means 1 on a cluster
    /// (`redis+cluster://`) and 0 (no `WAIT`) on a single server. Costs one round trip to a
    /// replica per publish call.
    pub wait_replicas: Option<u32>,
    /// How long a `WAIT` (see [`wait_replicas`](Self::wait_replicas)) waits for the replicas.
    /// Default 1 s; less than [`command_timeout`](Self::command_timeout).
    #[serde(rename = "wait_timeout_ms", with = "evbus::raw::millis")]
    pub wait_timeout: Duration,
    /// How events are written to streams: CloudEvents binary mode, one field per attribute
    /// (the default), or structured mode, the whole event as JSON in one field. Reading
    /// accepts both, whatever this says, so a stream may hold both while writers change.
    pub content_mode: ContentMode,
}

/// How a Redis transport writes events to stream entries ([`RedisConfig::content_mode`],
/// URL `content_mode=binary|structured`). Consumers read both, entry by entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentMode {
    /// CloudEvents binary mode: each attribute in a field of its own (`ce_specversion`,
    /// `ce_id`, `ce_source`, `ce_type`, `ce_time`, ...), the data's media type in
    /// `content-type` and the data as it is in `data`. A stock Redis client reads any
    /// attribute without parsing anything; the default.
    #[default]
    Binary,
    /// CloudEvents structured mode: two fields, `content-type` =
    /// `application/cloudevents+json` and `data` = the whole event in the CloudEvents JSON
    /// format (JSON data embedded as JSON, other data as `data_base64`). A stock CloudEvents
    /// SDK parses `data` as it is. Redis stores and sends two fields per entry instead of
    /// eight or more, which is what bounds a consumer's rate on a busy server; the client
    /// parses one JSON document per event instead. See the README, "Content modes".
    Structured,
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

impl std::str::FromStr for ContentMode {
    type Err = &'static str;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "binary" => Ok(ContentMode::Binary),
            "structured" => Ok(ContentMode::Structured),
            _ => Err("expected `binary` or `structured`"),
        }
    }
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
            servers: Vec::new(),
            wait_replicas: None,
            wait_timeout: Duration::from_secs(1),
            content_mode: ContentMode::Binary,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("servers", &self.servers)
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
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("content_mode", &self.content_mode)
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
    /// [`RedisConfig::servers`]: comma-separated `host:port`.
    Servers,
    /// [`RedisConfig::wait_replicas`].
    WaitReplicas,
    /// [`RedisConfig::wait_timeout`].
    WaitTimeoutMs,
    /// [`RedisConfig::content_mode`]: `binary` or `structured`.
    ContentMode,
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
        RedisConfigKey::Servers,
        RedisConfigKey::WaitReplicas,
        RedisConfigKey::WaitTimeoutMs,
        RedisConfigKey::ContentMode,
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
            RedisConfigKey::Servers => "servers",
            RedisConfigKey::WaitReplicas => "wait_replicas",
            RedisConfigKey::WaitTimeoutMs => "wait_timeout_ms",
            RedisConfigKey::ContentMode => "content_mode",
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

    /// Reads a `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL. The
    /// adapter's own settings travel as query parameters and are removed from
    /// [`url`](Self::url): `prefix`, `maxlen` (see [`Retention::MaxLen`]), `max_age_ms`
    /// ([`Retention::MaxAge`]), `block_ms`, `claim_interval_ms`, `command_timeout_ms`,
    /// `connect_timeout_ms`, `reconnect_min_delay_ms`, `reconnect_max_delay_ms`,
    /// `max_payload_bytes`, `anonymous_ttl_ms`, `servers`, `wait_replicas`,
    /// `wait_timeout_ms`. An unknown parameter is an error (a typo would otherwise be
    /// silently ignored).
    ///
    /// A cluster's seed nodes are comma-separated hosts, the scheme and credentials given once
    /// and the parameters after the last host:
    ///
    /// ```
    /// use evbus_redis::RedisConfig;
    ///
    /// let config = RedisConfig::from_url(
    ///     "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000?servers=10.0.0.3:7000&prefix=shop:",
    /// )?;
    /// assert!(config.is_cluster());
    /// assert_eq!(
    ///     config.cluster_nodes()?,
    ///     ["redis://:pw@10.0.0.1:7000", "redis://:pw@10.0.0.2:7000", "redis://:pw@10.0.0.3:7000"]
    /// );
    /// assert_eq!(config.replicas_to_wait_for(), 1);
    /// assert!(!format!("{config:?}").contains("pw@"));
    /// # Ok::<(), evbus::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        if let Some(split) = HostList::parse(url).filter(|s| s.hosts.len() > 1) {
            let parsed = evbus::registry::parse_url(&split.with_host(split.hosts[0]), "Redis")
                .map_err(|_| not_a_url(url, "the first host is not HOST:PORT"))?;
            if !is_cluster_scheme(parsed.scheme()) {
                return Err(Error::invalid_config(format!(
                    "`{}` names several hosts: only a cluster URL (`redis+cluster://` or \
                     `rediss+cluster://`) takes more than one",
                    redact_url(url)
                )));
            }
            let mut config = Self::parse(&parsed)?;
            config.url = split.without_query();
            config.validate()?;
            return Ok(config);
        }
        let parsed = evbus::registry::parse_url(url, "Redis")?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), for an already parsed URL (one host; a cluster's
    /// other seed nodes in the `servers` parameter).
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        let config = Self::parse(url)?;
        config.validate()?;
        Ok(config)
    }

    fn parse(url: &Url) -> Result<Self> {
        match url.scheme() {
            "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {}
            other => {
                return Err(Error::invalid_config(format!(
                    "`{other}://` is not a Redis URL; use redis://, rediss://, redis+cluster:// \
                     or rediss+cluster://"
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
                K::Servers => config
                    .servers
                    .extend(value.split(',').map(|s| s.trim().to_owned())),
                K::WaitReplicas => config.wait_replicas = Some(parse_value(key, &value)?),
                K::WaitTimeoutMs => config.wait_timeout = millis()?,
                K::ContentMode => config.content_mode = parse_value(key, &value)?,
            }
        }
        let mut client_url = url.clone();
        client_url.set_query(None);
        config.url = client_url.to_string();
        Ok(config)
    }

    /// Whether [`url`](Self::url) names a Redis Cluster (`redis+cluster://` or
    /// `rediss+cluster://`).
    pub fn is_cluster(&self) -> bool {
        scheme_of(&self.url).is_some_and(is_cluster_scheme)
    }

    /// How many replicas each publish waits for (see [`wait_replicas`](Self::wait_replicas)):
    /// the setting, else 1 on a cluster and 0 on a single server.
    pub fn replicas_to_wait_for(&self) -> u32 {
        self.wait_replicas
            .unwrap_or(if self.is_cluster() { 1 } else { 0 })
    }

    /// The seed nodes of a cluster URL, as `redis://[user:password@]host:port` URLs (or
    /// `rediss://`) for the cluster client: the hosts of [`url`](Self::url), then
    /// [`servers`](Self::servers). Fails with `InvalidConfig` naming a bad host, or if the
    /// URL is not a cluster URL.
    pub fn cluster_nodes(&self) -> Result<Vec<String>> {
        let split = HostList::parse(&self.url)
            .ok_or_else(|| not_a_url(&self.url, "expected SCHEME://[USER:PASSWORD@]HOST:PORT"))?;
        let scheme = scheme_of(&self.url).unwrap_or_default();
        let Some(node_scheme) = scheme.strip_suffix("+cluster") else {
            return Err(Error::invalid_config(format!(
                "`{}` is not a cluster URL (redis+cluster:// or rediss+cluster://)",
                redact_url(&self.url)
            )));
        };
        let path = split.suffix.split(['?', '#']).next().unwrap_or_default();
        if !matches!(path, "" | "/" | "/0") {
            return Err(Error::invalid_config(format!(
                "`{}` names database `{}`: a Redis Cluster has only database 0",
                redact_url(&self.url),
                path.trim_start_matches('/')
            )));
        }
        let userinfo = split.prefix.split_once("://").map_or("", |(_, u)| u);
        Ok(split
            .checked_with(&self.servers, &NODE)?
            .iter()
            .map(|node| format!("{node_scheme}://{userinfo}{}", node.entry))
            .collect())
    }

    /// Checks that the settings are usable; [`RedisTransport::connect`](crate::RedisTransport::connect)
    /// calls it.
    pub fn validate(&self) -> Result<()> {
        let scheme = scheme_of(&self.url)
            .ok_or_else(|| not_a_url(&self.url, "expected SCHEME://HOST[:PORT]"))?;
        match scheme {
            "redis" | "redis+cluster" => {}
            "rediss" | "rediss+cluster" if cfg!(feature = "tls") => {}
            "rediss" | "rediss+cluster" => {
                return Err(Error::invalid_config(
                    "`rediss://` (TLS) needs the `tls` feature of evbus-redis; enable it in \
                     Cargo.toml",
                ));
            }
            other => {
                return Err(Error::invalid_config(format!(
                    "`{other}://` is not a Redis URL; use redis://, rediss://, redis+cluster:// \
                     or rediss+cluster://"
                )));
            }
        }
        if self.url.contains('?') {
            return Err(Error::invalid_config(format!(
                "RedisConfig::url must not carry query parameters (`{}`); set the fields of \
                 RedisConfig instead, or use RedisConfig::from_url",
                redact_url(&self.url)
            )));
        }
        if self.is_cluster() {
            self.cluster_nodes()?;
        } else {
            evbus::registry::parse_url(&self.url, "Redis")?;
            if !self.servers.is_empty() {
                return Err(Error::invalid_config(
                    "`servers` lists more nodes of a Redis Cluster: use a redis+cluster:// URL",
                ));
            }
        }
        if self.replicas_to_wait_for() > 0 && self.wait_timeout >= self.command_timeout {
            return Err(Error::invalid_config(format!(
                "wait_timeout ({:?}) must be less than command_timeout ({:?}): the WAIT after \
                 each publish must answer before the command times out",
                self.wait_timeout, self.command_timeout
            )));
        }
        if self.key_prefix.chars().any(char::is_control) {
            return Err(Error::invalid_config(format!(
                "key prefix {:?} must not hold control characters",
                self.key_prefix
            )));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(Error::invalid_config(format!(
                "key prefix `{}` must not contain `{{` or `}}`: the topic or queue name is the \
                 key's cluster hash tag",
                self.key_prefix
            )));
        }
        let timings = [
            ("block", self.block),
            ("command_timeout", self.command_timeout),
            ("connect_timeout", self.connect_timeout),
            ("claim_interval", self.claim_interval),
            ("wait_timeout", self.wait_timeout),
        ];
        evbus::raw::check_positive(&timings)?;
        // A typo of a few digits turns these into waits that never end.
        let pauses = [
            ("reconnect_min_delay", self.reconnect_min_delay),
            ("reconnect_max_delay", self.reconnect_max_delay),
        ];
        evbus::raw::check_at_most(&timings, LONGEST_TIMING)?;
        evbus::raw::check_at_most(&pauses, LONGEST_TIMING)?;
        // Another process's sweep judges a live anonymous subscription by this process's
        // TTL: one shorter than a consumer's pause between reads destroyed the others'.
        if !(SHORTEST_ANONYMOUS_TTL..=LONGEST_ANONYMOUS_TTL).contains(&self.anonymous_ttl) {
            return Err(Error::invalid_config(format!(
                "anonymous_ttl_ms must be between {} (a minute) and {} (a year), got {}: an \
                 anonymous subscription idle that long is taken for abandoned and deleted, \
                 by any process",
                SHORTEST_ANONYMOUS_TTL.as_millis(),
                LONGEST_ANONYMOUS_TTL.as_millis(),
                self.anonymous_ttl.as_millis()
            )));
        }
        if let Some(replicas) = self.wait_replicas
            && replicas > MOST_REPLICAS
        {
            return Err(Error::invalid_config(format!(
                "wait_replicas must be at most {MOST_REPLICAS}, got {replicas}: a publish \
                 waits for that many replicas and fails when fewer answer"
            )));
        }
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

/// The longest timeout, block or reconnection pause a config takes.
const LONGEST_TIMING: Duration = Duration::from_secs(3600);

/// Bounds of [`RedisConfig::anonymous_ttl`].
const SHORTEST_ANONYMOUS_TTL: Duration = Duration::from_secs(60);
const LONGEST_ANONYMOUS_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The most replicas a publish waits for.
const MOST_REPLICAS: u32 = 100;

fn scheme_of(url: &str) -> Option<&str> {
    url.split_once("://").map(|(scheme, _)| scheme)
}

fn is_cluster_scheme(scheme: &str) -> bool {
    scheme.ends_with("+cluster")
}

fn not_a_url(url: &str, why: &str) -> Error {
    Error::invalid_config(format!("`{}` is not a Redis URL: {why}", redact_url(url)))
}

/// How the seed nodes of a cluster URL are written.
const NODE: HostSyntax<'static> = HostSyntax {
    what: "Redis Cluster node",
    noun: "node",
    example: "redis+cluster://user:pw@a:7000,b:7000",
    port_required: true,
    after_hosts: "",
};

/// `url` with its password replaced by `***`, for messages and logs; also for the
/// several-hosts form of a cluster URL, which is not a standard URL.
pub(crate) fn redact_url(url: &str) -> String {
    hosts::redact_urls(url, evbus::registry::redact)
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
    fn cluster_urls_list_seed_nodes_with_the_credentials_once() {
        let config = RedisConfig::from_url(
            "redis+cluster://app:pw@127.0.0.1:7231,127.0.0.1:7232/?prefix=shop:&block_ms=200",
        )
        .unwrap();
        assert!(config.is_cluster());
        assert_eq!(
            config.url,
            "redis+cluster://app:pw@127.0.0.1:7231,127.0.0.1:7232/"
        );
        assert_eq!(config.key_prefix, "shop:");
        assert_eq!(config.block, Duration::from_millis(200));
        assert_eq!(
            config.cluster_nodes().unwrap(),
            [
                "redis://app:pw@127.0.0.1:7231",
                "redis://app:pw@127.0.0.1:7232"
            ]
        );
        let one = RedisConfig::from_url("redis+cluster://h1:7000").unwrap();
        assert_eq!(one.cluster_nodes().unwrap(), ["redis://h1:7000"]);
    }

    #[test]
    fn the_servers_parameter_adds_seed_nodes_for_standard_url_parsers() {
        let url = Url::parse("redis+cluster://:pw@n1:7001?servers=n2:7002,%20n3:7003").unwrap();
        let config = RedisConfig::from_parsed_url(&url).unwrap();
        assert_eq!(config.servers, ["n2:7002", "n3:7003"]);
        assert_eq!(
            config.cluster_nodes().unwrap(),
            [
                "redis://:pw@n1:7001",
                "redis://:pw@n2:7002",
                "redis://:pw@n3:7003"
            ]
        );
        let err = RedisConfig::from_url("redis://h:1?servers=n2:7002").unwrap_err();
        assert!(err.message().contains("redis+cluster"), "{err}");
    }

    #[test]
    fn bad_cluster_nodes_are_named() {
        let err = RedisConfig::from_url("redis+cluster://a:1,b").unwrap_err();
        assert!(err.message().contains("node 2 of 2"), "{err}");
        assert!(err.message().contains("no port"), "{err}");
        let err = RedisConfig::from_url("redis+cluster://a:1,,b:2").unwrap_err();
        assert!(err.message().contains("empty"), "{err}");
        let err = RedisConfig::from_url("redis+cluster://a:1?servers=u:pw@b:2").unwrap_err();
        assert!(err.message().contains("credentials"), "{err}");
        assert!(!err.message().contains("u:pw@b"), "{err}");
        let err = RedisConfig::from_url("redis+cluster://a:1,b:2/3").unwrap_err();
        assert!(err.message().contains("database"), "{err}");
        let err = RedisConfig::from_url("redis://a:1,b:2").unwrap_err();
        assert!(err.message().contains("redis+cluster"), "{err}");
    }

    #[test]
    fn clusters_wait_for_one_replica_by_default() {
        let cluster = RedisConfig::from_url("redis+cluster://a:1,b:2").unwrap();
        assert_eq!(cluster.wait_replicas, None);
        assert_eq!(cluster.replicas_to_wait_for(), 1);
        let off = RedisConfig::from_url("redis+cluster://a:1?wait_replicas=0").unwrap();
        assert_eq!(off.replicas_to_wait_for(), 0);
        let single = RedisConfig::from_url("redis://a:1").unwrap();
        assert_eq!(single.replicas_to_wait_for(), 0);
        let two = RedisConfig::from_url("redis://a:1?wait_replicas=2&wait_timeout_ms=250").unwrap();
        assert_eq!(two.replicas_to_wait_for(), 2);
        assert_eq!(two.wait_timeout, Duration::from_millis(250));
        let err = RedisConfig::from_url(
            "redis+cluster://a:1?wait_timeout_ms=5000&command_timeout_ms=5000",
        )
        .unwrap_err();
        assert!(err.message().contains("wait_timeout"), "{err}");
    }

    #[test]
    fn cluster_urls_never_show_the_password() {
        let config = RedisConfig::from_url("redis+cluster://u:hunter2@a:1,b:2").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("u:***@a:1,b:2"), "{debug}");
        let err = RedisConfig::from_url("redis+cluster://u:hunter2@a:1,b:2?nope=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = RedisConfig::from_url("redis+cluster://u:hunter2@a:1,b").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(
            redact_url("redis+cluster://:pw@a:1,b:2"),
            "redis+cluster://:***@a:1,b:2"
        );
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

    #[test]
    fn values_that_would_never_end_or_harm_other_processes_are_refused() {
        for (url, named) in [
            ("redis://h?anonymous_ttl_ms=0", "anonymous_ttl_ms"),
            ("redis://h?anonymous_ttl_ms=59999", "anonymous_ttl_ms"),
            (
                "redis://h?anonymous_ttl_ms=18446744073709551615",
                "anonymous_ttl_ms",
            ),
            (
                "redis://h?claim_interval_ms=18446744073709551615",
                "claim_interval",
            ),
            ("redis://h?command_timeout_ms=3600001", "command_timeout"),
            (
                "redis://h?connect_timeout_ms=18446744073709551615",
                "connect_timeout",
            ),
            (
                "redis://h?reconnect_max_delay_ms=18446744073709551615",
                "reconnect_max_delay",
            ),
            ("redis://h?wait_replicas=4294967295", "wait_replicas"),
            ("redis://h?prefix=a%00b", "control"),
            ("redis://h?prefix=a%0Ab", "control"),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), evbus::ErrorKind::InvalidConfig, "{url}: {err}");
            assert!(err.to_string().contains(named), "{url}: {err}");
        }
        for url in [
            "redis://h?anonymous_ttl_ms=60000",
            "redis://h?command_timeout_ms=3600000&block_ms=3599000",
            "redis://h?wait_replicas=100",
        ] {
            RedisConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}
