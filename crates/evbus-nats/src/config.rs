//! [`NatsConfig`]: where the NATS server is, how to authenticate, and how the adapter lays
//! topics and queues out on JetStream.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use evbus::raw::hosts::{self, HostList, HostSyntax};
use evbus::raw::{ConfigKey, parse_millis, parse_value};
use evbus::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::names;

/// Header room the adapter keeps below the server's `max_payload` when it derives
/// [`NatsConfig::max_payload_bytes`]: NATS counts headers and body against one limit.
pub const HEADER_ALLOWANCE: usize = 4 * 1024;

/// Settings of a [`NatsTransport`](crate::NatsTransport).
///
/// Every field has a documented default; build one with [`NatsConfig::new`] or
/// [`NatsConfig::from_url`], then adjust fields (the struct is `#[non_exhaustive]`). With
/// `serde`, missing fields take their defaults and durations are whole milliseconds
/// (`request_timeout_ms`, `fetch_wait_ms`, ...). Serde names are the URL parameter names
/// ([`NatsConfigKey`]): `nkey`, `creds` and `tls_ca` (the field names are accepted as aliases).
///
/// `Debug` output never shows a password, token or nkey seed.
///
/// ```
/// use evbus_nats::{NatsConfig, Storage};
///
/// let config = NatsConfig::from_url(
///     "nats://app:s3cret@127.0.0.1:4222?stream_prefix=SHOP&storage=memory&max_age_ms=86400000",
/// )?;
/// assert_eq!(config.stream_prefix, "SHOP");
/// assert_eq!(config.storage, Storage::Memory);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), evbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server URL: `nats://[user:password@|token@]host[:port]`, or `tls://...` to require
    /// TLS. Default `nats://127.0.0.1:4222`. Several servers of a cluster are comma-separated
    /// hosts in one URL, `nats://user:pw@host1:4222,host2:4222,host3:4222`: the scheme and
    /// credentials apply to every host (see [`server_urls`](Self::server_urls)).
    pub url: String,
    /// More seed servers of the same cluster, `host[:port]` each (port 4222 when omitted),
    /// with the scheme and credentials of [`url`](Self::url). Default none. The URL parameter
    /// `servers` is a comma-separated list. [`evbus::Registry`] (and so the `evbus` CLI) takes
    /// either form: it hands the hosts after the first of `nats://h1,h2` to the adapter as
    /// `servers`.
    pub servers: Vec<String>,
    /// A token to authenticate with (instead of one in the URL). Default none.
    pub token: Option<String>,
    /// An nkey seed (`SU...`) to authenticate with. Default none. URL and serde name `nkey`.
    #[serde(rename = "nkey", alias = "nkey_seed")]
    pub nkey_seed: Option<String>,
    /// A `.creds` file (user JWT and nkey seed) to authenticate with. Default none. URL and
    /// serde name `creds`.
    #[serde(rename = "creds", alias = "credentials_file")]
    pub credentials_file: Option<PathBuf>,
    /// A PEM file of root certificates to trust for TLS, in addition to the system's.
    /// Default none. URL and serde name `tls_ca`.
    #[serde(rename = "tls_ca", alias = "tls_ca_file")]
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every stream the adapter creates: topic `orders` is stream
    /// `<prefix>_topic_orders`. Default `EVBUS`. Letters, digits, `-` and `_` only.
    pub stream_prefix: String,
    /// First subject token(s) of every subject the adapter publishes to: topic `orders` is
    /// subject `<prefix>.topic.orders`. Default `evbus`. Tokens of letters, digits, `-`, `_`,
    /// separated by `.`.
    pub subject_prefix: String,
    /// Where topic and queue streams keep messages. Default [`Storage::File`].
    pub storage: Storage,
    /// How topic streams retain messages. Default [`Retention::Limits`]. Queues always use
    /// work-queue retention.
    pub retention: Retention,
    /// Replicas of each stream (1 on a single server; 3 or 5 in a cluster). Default 1.
    pub replicas: usize,
    /// Oldest message a topic stream keeps; zero keeps them until the topic is deleted.
    /// Default zero.
    #[serde(rename = "max_age_ms", with = "evbus::raw::millis")]
    pub max_age: Duration,
    /// How long the server remembers published event ids (`Nats-Msg-Id`) to drop duplicate
    /// publishes. Default 2 minutes (the server's default).
    #[serde(rename = "duplicate_window_ms", with = "evbus::raw::millis")]
    pub duplicate_window: Duration,
    /// How long a JetStream request (a PubAck, a stream or consumer operation, a double
    /// ack) may take before failing with [`ErrorKind::Timeout`](evbus::ErrorKind::Timeout).
    /// Default 5 s.
    #[serde(rename = "request_timeout_ms", with = "evbus::raw::millis")]
    pub request_timeout: Duration,
    /// How long the first connection may take. Default 2 s.
    #[serde(rename = "connect_timeout_ms", with = "evbus::raw::millis")]
    pub connect_timeout: Duration,
    /// Longest delay between reconnection attempts (they start at once and back off).
    /// Default 2 s.
    #[serde(rename = "reconnect_max_delay_ms", with = "evbus::raw::millis")]
    pub reconnect_max_delay: Duration,
    /// How long one pull request waits on the server for messages. Default 1 s.
    #[serde(rename = "fetch_wait_ms", with = "evbus::raw::millis")]
    pub fetch_wait: Duration,
    /// Most messages one pull request asks for; a consumer never asks for more than its free
    /// in-flight slots (its `max_in_flight` less its deliveries unsettled). Default 64.
    pub fetch_batch: usize,
    /// Acknowledge with a double ack (`AckAck`): `ack` returns only once the server recorded
    /// it, so an acknowledged event is never redelivered. With `false` the ack is fire and
    /// forget (faster; an ack lost in a connection drop means one more delivery). Default
    /// `true`.
    pub double_ack: bool,
    /// The server-side cap on unacknowledged messages of one consumer (all its clients
    /// together). Default 10 000.
    pub max_ack_pending: i64,
    /// Largest event accepted ([`evbus::Event::encoded_len`]). Default `None`: the server's
    /// `max_payload` (1 MiB unless configured) minus [`HEADER_ALLOWANCE`].
    pub max_payload_bytes: Option<usize>,
    /// An anonymous subscription's consumer left behind by a process that died is removed
    /// by the server after this long without pull requests. Default 5 minutes.
    #[serde(rename = "anonymous_ttl_ms", with = "evbus::raw::millis")]
    pub anonymous_ttl: Duration,
}

/// Where streams keep their messages (`storage` in the stream config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Storage {
    /// On disk: survives a server restart (the default).
    #[default]
    File,
    /// In memory: faster, lost when the server stops.
    Memory,
}

/// How a topic stream retains messages (`retention` in the stream config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Retention {
    /// Keep messages up to the stream's limits ([`NatsConfig::max_age`]) whether or not they
    /// were consumed: subscriptions can start from the earliest retained event (the default).
    #[default]
    Limits,
    /// Keep a message only until every subscription that existed when it was published has
    /// acknowledged it. Saves space; a subscription can no longer replay history, and an
    /// event published while a topic has no subscription is dropped.
    Interest,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            servers: Vec::new(),
            token: None,
            nkey_seed: None,
            credentials_file: None,
            tls_ca_file: None,
            stream_prefix: "EVBUS".to_owned(),
            subject_prefix: "evbus".to_owned(),
            storage: Storage::File,
            retention: Retention::Limits,
            replicas: 1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            reconnect_max_delay: Duration::from_secs(2),
            fetch_wait: Duration::from_secs(1),
            fetch_batch: 64,
            double_ack: true,
            max_ack_pending: 10_000,
            max_payload_bytes: None,
            anonymous_ttl: Duration::from_secs(300),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsConfig")
            .field("url", &redact(&self.url))
            .field(
                "servers",
                &self
                    .servers
                    .iter()
                    .map(|s| hosts::redact_host(s))
                    .collect::<Vec<_>>(),
            )
            .field("token", &secret(&self.token))
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("credentials_file", &self.credentials_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("stream_prefix", &self.stream_prefix)
            .field("subject_prefix", &self.subject_prefix)
            .field("storage", &self.storage)
            .field("retention", &self.retention)
            .field("replicas", &self.replicas)
            .field("max_age", &self.max_age)
            .field("duplicate_window", &self.duplicate_window)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("fetch_wait", &self.fetch_wait)
            .field("fetch_batch", &self.fetch_batch)
            .field("double_ack", &self.double_ack)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("anonymous_ttl", &self.anonymous_ttl)
            .finish()
    }
}

/// `url` with its password, or a token given as the user name, replaced by `***`; secret
/// query parameters (`token`, `nkey`) too. A URL naming several hosts (`nats://a:1,b:2`) keeps
/// them all. For messages and logs.
pub(crate) fn redact(url: &str) -> String {
    hosts::redact_urls(url, redact_one)
}

/// [`redact`] of a URL naming one host.
fn redact_one(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return "<unparseable URL>".to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        // `nats://TOKEN@host`: the user name is the secret.
        let _ = parsed.set_username("***");
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if SECRET_PARAMETERS.contains(&k.as_ref()) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// How the seed servers of a NATS URL are written.
const SERVER: HostSyntax<'static> = HostSyntax {
    what: "NATS server",
    noun: "server",
    example: "nats://user:pw@a:4222,b:4222",
    port_required: false,
    after_hosts: "",
};

/// Refuses a list of full URLs (`nats://a:1,nats://b:2`): the scheme is given once.
fn check_one_scheme(url: &str) -> Result<()> {
    hosts::check_one_scheme(
        url,
        "nats://user:pw@host1:4222,host2:4222,host3:4222",
        redact_one,
    )
}

/// URL query parameters whose values are secrets.
const SECRET_PARAMETERS: &[&str] = &["token", "nkey"];

impl NatsConfig {
    /// The defaults, connecting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            ..NatsConfig::default()
        }
    }

    /// Reads a `nats://` or `tls://` URL. Credentials go in the URL (`user:password@` or
    /// `token@`) or as query parameters: `token`, `nkey` (an nkey seed), `creds` (the path of
    /// a `.creds` file), `tls_ca` (a PEM file of root certificates). The adapter's settings
    /// are query parameters too: `stream_prefix`, `subject_prefix`, `storage` (`file` or
    /// `memory`), `retention` (`limits` or `interest`), `replicas`, `max_age_ms`,
    /// `duplicate_window_ms`, `request_timeout_ms`, `connect_timeout_ms`,
    /// `reconnect_max_delay_ms`, `fetch_wait_ms`, `fetch_batch`, `double_ack` (`true` or
    /// `false`), `max_ack_pending`, `max_payload_bytes`, `anonymous_ttl_ms` (the list is
    /// [`NatsConfigKey`]; each is the serde name of a field). They are removed from
    /// [`url`](Self::url). An unknown parameter is an error naming the valid keys (a typo
    /// would otherwise be silently ignored).
    ///
    /// Several servers of a cluster are comma-separated hosts, the scheme and credentials
    /// given once for all of them and the parameters after the last one:
    /// `nats://user:pw@10.0.0.1:4222,10.0.0.2:4222,10.0.0.3:4222?replicas=3`. The same
    /// list can be given as the `servers` parameter,
    /// `nats://user:pw@10.0.0.1:4222?servers=10.0.0.2:4222,10.0.0.3:4222&replicas=3`, the
    /// form to use where the URL is parsed as a standard URL first ([`evbus::Registry`], the
    /// `evbus` CLI). A bad host is named in the error.
    pub fn from_url(url: &str) -> Result<Self> {
        check_one_scheme(url)?;
        if let Some(split) = HostList::parse(url).filter(|s| s.hosts.len() > 1) {
            split.checked_with(&[], &SERVER)?;
            let first = split.with_host(split.hosts[0]);
            let parsed = Url::parse(&first).map_err(|e| {
                Error::invalid_config(format!("`{}` is not a NATS URL: {e}", redact(url)))
            })?;
            let mut config = Self::from_parsed(&parsed)?;
            config.url = split.without_query();
            config.validate()?;
            return Ok(config);
        }
        let parsed = Url::parse(url).map_err(|e| {
            Error::invalid_config(format!("`{}` is not a NATS URL: {e}", redact(url)))
        })?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), for an already parsed URL (one host; more in the
    /// `servers` parameter).
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        let config = Self::from_parsed(url)?;
        config.validate()?;
        Ok(config)
    }

    /// Every server to connect to, the URL's hosts then [`servers`](Self::servers), each a
    /// URL with the scheme and credentials of [`url`](Self::url). Fails with
    /// `InvalidConfig` naming the first bad host.
    ///
    /// ```
    /// use evbus_nats::NatsConfig;
    ///
    /// let config = NatsConfig::from_url("nats://app:pw@n1:4231,n2:4232?servers=n3&replicas=3")?;
    /// let servers: Vec<String> = config.server_urls()?.iter().map(|u| u.to_string()).collect();
    /// assert_eq!(servers, ["nats://app:pw@n1:4231", "nats://app:pw@n2:4232", "nats://app:pw@n3"]);
    /// assert_eq!(config.replicas, 3);
    /// # Ok::<(), evbus::Error>(())
    /// ```
    pub fn server_urls(&self) -> Result<Vec<Url>> {
        let not_a_url = |e: url::ParseError| {
            Error::invalid_config(format!("`{}` is not a NATS URL: {e}", redact(&self.url)))
        };
        check_one_scheme(&self.url)?;
        let split = match HostList::parse(&self.url) {
            Some(split) if split.hosts.len() > 1 || !self.servers.is_empty() => split,
            _ => return Ok(vec![Url::parse(&self.url).map_err(not_a_url)?]),
        };
        let servers = split.checked_with(&self.servers, &SERVER)?;
        let count = servers.len();
        let mut urls = Vec::with_capacity(count);
        let mut base: Option<Url> = None;
        for (i, server) in servers.iter().enumerate() {
            let (entry, host, port) = (server.entry, &server.host, server.port);
            let url = match &base {
                None => {
                    let first = Url::parse(&split.with_host(entry)).map_err(not_a_url)?;
                    base = Some(first.clone());
                    first
                }
                Some(base) => {
                    let mut url = base.clone();
                    let bad = |_| {
                        Error::invalid_config(format!(
                            "NATS server `{entry}` (server {} of {count}) is not HOST[:PORT]",
                            i + 1
                        ))
                    };
                    url.set_host(Some(host)).map_err(|e| bad(e.to_string()))?;
                    url.set_port(port).map_err(|()| bad(String::new()))?;
                    url
                }
            };
            urls.push(url);
        }
        Ok(urls)
    }

    /// The settings of a parsed URL (one host), not validated yet.
    fn from_parsed(url: &Url) -> Result<Self> {
        check_scheme(url.scheme())?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid_config(format!(
                "`{}` names no host; use nats://HOST[:PORT]",
                redact(url.as_str())
            )));
        }
        let mut config = NatsConfig::default();
        for (name, value) in url.query_pairs() {
            use NatsConfigKey as K;
            let key = K::parse(&name)?;
            let millis = || parse_millis(key, &value);
            let text = || value.clone().into_owned();
            match key {
                K::Token => config.token = Some(text()),
                K::Nkey => config.nkey_seed = Some(text()),
                K::Creds => config.credentials_file = Some(PathBuf::from(text())),
                K::TlsCa => config.tls_ca_file = Some(PathBuf::from(text())),
                K::StreamPrefix => config.stream_prefix = text(),
                K::SubjectPrefix => config.subject_prefix = text(),
                K::Storage => {
                    config.storage = match value.as_ref() {
                        "file" => Storage::File,
                        "memory" => Storage::Memory,
                        _ => return Err(bad_choice(key, &value, "`file` or `memory`")),
                    }
                }
                K::Retention => {
                    config.retention = match value.as_ref() {
                        "limits" => Retention::Limits,
                        "interest" => Retention::Interest,
                        _ => return Err(bad_choice(key, &value, "`limits` or `interest`")),
                    }
                }
                K::Replicas => config.replicas = parse_value(key, &value)?,
                K::MaxAgeMs => config.max_age = millis()?,
                K::DuplicateWindowMs => config.duplicate_window = millis()?,
                K::RequestTimeoutMs => config.request_timeout = millis()?,
                K::ConnectTimeoutMs => config.connect_timeout = millis()?,
                K::ReconnectMaxDelayMs => config.reconnect_max_delay = millis()?,
                K::FetchWaitMs => config.fetch_wait = millis()?,
                K::FetchBatch => config.fetch_batch = parse_value(key, &value)?,
                K::DoubleAck => {
                    config.double_ack = match value.as_ref() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad_choice(key, &value, "`true` or `false`")),
                    }
                }
                K::MaxAckPending => config.max_ack_pending = parse_value(key, &value)?,
                K::MaxPayloadBytes => config.max_payload_bytes = Some(parse_value(key, &value)?),
                K::AnonymousTtlMs => config.anonymous_ttl = millis()?,
                K::Servers => config
                    .servers
                    .extend(value.split(',').map(|s| s.trim().to_owned())),
            }
        }
        let mut client_url = url.clone();
        client_url.set_query(None);
        config.url = client_url.to_string();
        Ok(config)
    }

    /// Checks that the settings are usable;
    /// [`NatsTransport::connect`](crate::NatsTransport::connect) calls it.
    pub fn validate(&self) -> Result<()> {
        let urls = self.server_urls()?;
        let url = &urls[0];
        check_scheme(url.scheme())?;
        if url.query().is_some() {
            return Err(Error::invalid_config(format!(
                "NatsConfig::url must not carry query parameters (`{}`); set the fields of \
                 NatsConfig instead, or use NatsConfig::from_url",
                redact(&self.url)
            )));
        }
        let auth_methods = [
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.credentials_file.is_some(),
            url.password().is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if auth_methods > 1 {
            return Err(Error::invalid_config(
                "give one way to authenticate to NATS: a user and password, a token, an nkey \
                 seed or a creds file, not several",
            ));
        }
        if self.stream_prefix.is_empty()
            || !self
                .stream_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::invalid_config(format!(
                "stream_prefix `{}` must be non-empty and hold only letters, digits, `-` and `_`",
                self.stream_prefix
            )));
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !self.subject_prefix.split('.').all(token_ok) {
            return Err(Error::invalid_config(format!(
                "subject_prefix `{}` must be tokens of letters, digits, `-` and `_` separated by \
                 single dots (no wildcards, no spaces)",
                self.subject_prefix
            )));
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(Error::invalid_config(format!(
                "replicas must be between 1 and 5 (JetStream's limit), got {}",
                self.replicas
            )));
        }
        let timings = [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_max_delay", self.reconnect_max_delay),
            ("fetch_wait", self.fetch_wait),
            ("anonymous_ttl", self.anonymous_ttl),
        ];
        evbus::raw::check_positive(&timings)?;
        // What JetStream takes: durations in int64 nanoseconds (here at most a century), a
        // `max_age` of 0 (none) or of 100 ms and more, a duplicate window of 1 ms and more (0
        // would be read as its default, 2 minutes; a longer one than `max_age` is shortened
        // to it).
        let limits = [
            ("max_age", self.max_age),
            ("duplicate_window", self.duplicate_window),
        ];
        evbus::raw::check_at_most(&timings, LONGEST)?;
        evbus::raw::check_at_most(&limits, LONGEST)?;
        if !self.max_age.is_zero() && self.max_age < Duration::from_millis(100) {
            return Err(Error::invalid_config(format!(
                "max_age must be 0 (no limit) or at least 100 ms (JetStream's least), got {:?}",
                self.max_age
            )));
        }
        if self.duplicate_window.is_zero() {
            return Err(Error::invalid_config(
                "duplicate_window must be at least 1 ms (NATS reads 0 as its default, 2 minutes)",
            ));
        }
        if self.fetch_batch == 0 {
            return Err(Error::invalid_config("fetch_batch must be at least 1"));
        }
        if self.max_ack_pending < 1 {
            return Err(Error::invalid_config("max_ack_pending must be at least 1"));
        }
        if self.max_payload_bytes == Some(0) {
            return Err(Error::invalid_config(
                "max_payload_bytes must be at least 1 (or unset to follow the server)",
            ));
        }
        // The longest names the adapter derives must stay valid stream names.
        names::check_prefix_room(&self.stream_prefix)?;
        Ok(())
    }
}

/// The longest duration a setting takes: a century, well inside the int64 nanoseconds
/// JetStream reads durations as (about 292 years).
pub(crate) const LONGEST: Duration = evbus::raw::LONGEST_VISIBILITY;

/// `value` is not one of the values `key` takes (`expected`).
fn bad_choice(key: NatsConfigKey, value: &str, expected: &str) -> Error {
    Error::invalid_config(format!(
        "{} URL parameter `{}` must be {expected}, got `{value}`",
        NatsConfigKey::ADAPTER,
        key.name()
    ))
}

/// The URL query parameters of [`NatsConfig`]: the serde names of its fields (all but
/// [`url`](NatsConfig::url), which is the URL itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsConfigKey {
    /// [`NatsConfig::token`].
    Token,
    /// [`NatsConfig::nkey_seed`].
    Nkey,
    /// [`NatsConfig::credentials_file`].
    Creds,
    /// [`NatsConfig::tls_ca_file`].
    TlsCa,
    /// [`NatsConfig::stream_prefix`].
    StreamPrefix,
    /// [`NatsConfig::subject_prefix`].
    SubjectPrefix,
    /// [`NatsConfig::storage`]: `file` or `memory`.
    Storage,
    /// [`NatsConfig::retention`]: `limits` or `interest`.
    Retention,
    /// [`NatsConfig::replicas`].
    Replicas,
    /// [`NatsConfig::max_age`].
    MaxAgeMs,
    /// [`NatsConfig::duplicate_window`].
    DuplicateWindowMs,
    /// [`NatsConfig::request_timeout`].
    RequestTimeoutMs,
    /// [`NatsConfig::connect_timeout`].
    ConnectTimeoutMs,
    /// [`NatsConfig::reconnect_max_delay`].
    ReconnectMaxDelayMs,
    /// [`NatsConfig::fetch_wait`].
    FetchWaitMs,
    /// [`NatsConfig::fetch_batch`].
    FetchBatch,
    /// [`NatsConfig::double_ack`]: `true` or `false` (also `1`/`0`, `yes`/`no`).
    DoubleAck,
    /// [`NatsConfig::max_ack_pending`].
    MaxAckPending,
    /// [`NatsConfig::max_payload_bytes`].
    MaxPayloadBytes,
    /// [`NatsConfig::anonymous_ttl`].
    AnonymousTtlMs,
    /// [`NatsConfig::servers`]: comma-separated `host[:port]`.
    Servers,
}

impl ConfigKey for NatsConfigKey {
    const ADAPTER: &'static str = "NATS";
    const ALL: &'static [Self] = &[
        NatsConfigKey::Token,
        NatsConfigKey::Nkey,
        NatsConfigKey::Creds,
        NatsConfigKey::TlsCa,
        NatsConfigKey::StreamPrefix,
        NatsConfigKey::SubjectPrefix,
        NatsConfigKey::Storage,
        NatsConfigKey::Retention,
        NatsConfigKey::Replicas,
        NatsConfigKey::MaxAgeMs,
        NatsConfigKey::DuplicateWindowMs,
        NatsConfigKey::RequestTimeoutMs,
        NatsConfigKey::ConnectTimeoutMs,
        NatsConfigKey::ReconnectMaxDelayMs,
        NatsConfigKey::FetchWaitMs,
        NatsConfigKey::FetchBatch,
        NatsConfigKey::DoubleAck,
        NatsConfigKey::MaxAckPending,
        NatsConfigKey::MaxPayloadBytes,
        NatsConfigKey::AnonymousTtlMs,
        NatsConfigKey::Servers,
    ];

    fn name(self) -> &'static str {
        match self {
            NatsConfigKey::Token => "token",
            NatsConfigKey::Nkey => "nkey",
            NatsConfigKey::Creds => "creds",
            NatsConfigKey::TlsCa => "tls_ca",
            NatsConfigKey::StreamPrefix => "stream_prefix",
            NatsConfigKey::SubjectPrefix => "subject_prefix",
            NatsConfigKey::Storage => "storage",
            NatsConfigKey::Retention => "retention",
            NatsConfigKey::Replicas => "replicas",
            NatsConfigKey::MaxAgeMs => "max_age_ms",
            NatsConfigKey::DuplicateWindowMs => "duplicate_window_ms",
            NatsConfigKey::RequestTimeoutMs => "request_timeout_ms",
            NatsConfigKey::ConnectTimeoutMs => "connect_timeout_ms",
            NatsConfigKey::ReconnectMaxDelayMs => "reconnect_max_delay_ms",
            NatsConfigKey::FetchWaitMs => "fetch_wait_ms",
            NatsConfigKey::FetchBatch => "fetch_batch",
            NatsConfigKey::DoubleAck => "double_ack",
            NatsConfigKey::MaxAckPending => "max_ack_pending",
            NatsConfigKey::MaxPayloadBytes => "max_payload_bytes",
            NatsConfigKey::AnonymousTtlMs => "anonymous_ttl_ms",
            NatsConfigKey::Servers => "servers",
        }
    }
}

fn check_scheme(scheme: &str) -> Result<()> {
    match scheme {
        "nats" | "tls" => Ok(()),
        other => Err(Error::invalid_config(format!(
            "`{other}://` is not a NATS URL; use nats:// (or tls:// to require TLS)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::ErrorKind;

    #[test]
    fn durations_jetstream_refuses_are_refused_when_the_config_is_read() {
        for (query, name) in [
            ("max_age_ms=10", "max_age"),
            ("max_age_ms=10000000000000", "max_age"),
            ("duplicate_window_ms=10000000000000", "duplicate_window"),
            ("duplicate_window_ms=0", "duplicate_window"),
            ("fetch_wait_ms=10000000000000", "fetch_wait"),
        ] {
            let e = NatsConfig::from_url(&format!("nats://127.0.0.1:4222?{query}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{query}: {e}");
            assert!(e.to_string().contains(name), "{query}: {e}");
        }
        for query in ["max_age_ms=0", "max_age_ms=100", "max_age_ms=60000"] {
            NatsConfig::from_url(&format!("nats://127.0.0.1:4222?{query}"))
                .and_then(|c| c.validate())
                .unwrap_or_else(|e| panic!("{query}: {e}"));
        }
    }

    #[test]
    fn url_keys_are_the_serde_names() {
        let json = serde_json::to_value(NatsConfig::default()).unwrap();
        let mut serde_names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| &**k)
            .filter(|k| *k != "url")
            .collect();
        serde_names.sort_unstable();
        let mut url_names: Vec<&str> = NatsConfigKey::ALL.iter().map(|k| k.name()).collect();
        url_names.sort_unstable();
        assert_eq!(serde_names, url_names);
        for secret in SECRET_PARAMETERS {
            assert!(NatsConfigKey::parse(secret).is_ok(), "{secret}");
        }
    }

    #[test]
    fn a_typo_lists_the_valid_keys() {
        let typo = NatsConfig::from_url("nats://h?fetch_wait=5").unwrap_err();
        assert_eq!(typo.kind(), ErrorKind::InvalidConfig);
        assert!(
            typo.message().contains(
                "unknown NATS URL parameter `fetch_wait`; valid keys are: token, nkey, creds, \
                 tls_ca, stream_prefix"
            ),
            "{typo}"
        );
        assert!(
            typo.message().ends_with("anonymous_ttl_ms, servers"),
            "{typo}"
        );
    }

    #[test]
    fn serde_accepts_the_old_field_names() {
        let config: NatsConfig = serde_json::from_value(serde_json::json!({
            "nkey_seed": "SUAEXAMPLESEED",
            "credentials_file": "/a.creds",
            "tls_ca_file": "/ca.pem"
        }))
        .unwrap();
        assert_eq!(config.nkey_seed.as_deref(), Some("SUAEXAMPLESEED"));
        assert_eq!(config.credentials_file, Some(PathBuf::from("/a.creds")));
        assert_eq!(config.tls_ca_file, Some(PathBuf::from("/ca.pem")));
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["nkey"], "SUAEXAMPLESEED");
        assert_eq!(back["creds"], "/a.creds");
        assert_eq!(back["tls_ca"], "/ca.pem");
    }

    #[test]
    fn defaults_connect_to_the_local_server_with_file_storage() {
        let config = NatsConfig::default();
        assert_eq!(config.url, "nats://127.0.0.1:4222");
        assert_eq!(config.stream_prefix, "EVBUS");
        assert_eq!(config.subject_prefix, "evbus");
        assert_eq!(config.storage, Storage::File);
        assert_eq!(config.retention, Retention::Limits);
        assert_eq!(config.replicas, 1);
        assert_eq!(config.duplicate_window, Duration::from_secs(120));
        assert!(config.double_ack);
        config.validate().unwrap();
    }

    #[test]
    fn url_parameters_become_settings_and_leave_the_client_url() {
        let config = NatsConfig::from_url(
            "nats://localhost:4333?stream_prefix=SHOP&subject_prefix=shop.events&storage=memory\
             &retention=interest&replicas=3&max_age_ms=60000&duplicate_window_ms=5000\
             &request_timeout_ms=900&connect_timeout_ms=800&reconnect_max_delay_ms=700\
             &fetch_wait_ms=250&fetch_batch=10&double_ack=false&max_ack_pending=99\
             &max_payload_bytes=1024&anonymous_ttl_ms=30000",
        )
        .unwrap();
        assert_eq!(config.url, "nats://localhost:4333");
        assert_eq!(config.stream_prefix, "SHOP");
        assert_eq!(config.subject_prefix, "shop.events");
        assert_eq!(config.storage, Storage::Memory);
        assert_eq!(config.retention, Retention::Interest);
        assert_eq!(config.replicas, 3);
        assert_eq!(config.max_age, Duration::from_secs(60));
        assert_eq!(config.duplicate_window, Duration::from_secs(5));
        assert_eq!(config.request_timeout, Duration::from_millis(900));
        assert_eq!(config.connect_timeout, Duration::from_millis(800));
        assert_eq!(config.reconnect_max_delay, Duration::from_millis(700));
        assert_eq!(config.fetch_wait, Duration::from_millis(250));
        assert_eq!(config.fetch_batch, 10);
        assert!(!config.double_ack);
        assert_eq!(config.max_ack_pending, 99);
        assert_eq!(config.max_payload_bytes, Some(1024));
        assert_eq!(config.anonymous_ttl, Duration::from_secs(30));
    }

    #[test]
    fn credentials_come_from_the_url_or_its_parameters() {
        let config = NatsConfig::from_url("nats://app:pw@h:4222").unwrap();
        assert_eq!(config.url, "nats://app:pw@h:4222");
        let config = NatsConfig::from_url("nats://h?token=t0k3n").unwrap();
        assert_eq!(config.token.as_deref(), Some("t0k3n"));
        let config = NatsConfig::from_url("nats://h?nkey=SUAEXAMPLESEED").unwrap();
        assert_eq!(config.nkey_seed.as_deref(), Some("SUAEXAMPLESEED"));
        let config =
            NatsConfig::from_url("tls://h?creds=/etc/nats/app.creds&tls_ca=/ca.pem").unwrap();
        assert_eq!(
            config.credentials_file,
            Some(PathBuf::from("/etc/nats/app.creds"))
        );
        assert_eq!(config.tls_ca_file, Some(PathBuf::from("/ca.pem")));
        let err = NatsConfig::from_url("nats://u:p@h?token=t").unwrap_err();
        assert!(err.message().contains("one way to authenticate"), "{err}");
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        for url in [
            "nats://user:hunter2@h:1",
            "nats://hunter2@h:1",
            "nats://h:1?token=hunter2",
            "nats://h:1?nkey=hunter2",
        ] {
            let config = NatsConfig::from_url(url).unwrap();
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("***"), "{debug}");
            let err = NatsConfig::from_url(&format!(
                "{url}{}nope=1",
                if url.contains('?') { "&" } else { "?" }
            ))
            .unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        assert!(!redact("nats://h:1?token=hunter2&storage=file").contains("hunter2"));
    }

    #[test]
    fn comma_separated_hosts_share_the_scheme_credentials_and_parameters() {
        let config = NatsConfig::from_url(
            "nats://app:s3cret@127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233?replicas=3\
             &stream_prefix=SHOP",
        )
        .unwrap();
        assert_eq!(
            config.url,
            "nats://app:s3cret@127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233"
        );
        assert_eq!(config.replicas, 3);
        assert_eq!(config.stream_prefix, "SHOP");
        let urls: Vec<String> = config
            .server_urls()
            .unwrap()
            .iter()
            .map(Url::to_string)
            .collect();
        assert_eq!(
            urls,
            [
                "nats://app:s3cret@127.0.0.1:4231",
                "nats://app:s3cret@127.0.0.1:4232",
                "nats://app:s3cret@127.0.0.1:4233"
            ]
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(
            debug.contains("nats://app:***@127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233"),
            "{debug}"
        );
        // TLS, a token as the user name, IPv6 and a default port.
        let config = NatsConfig::from_url("tls://t0k3n@[::1]:4231,n2,n3:4333").unwrap();
        let urls: Vec<String> = config
            .server_urls()
            .unwrap()
            .iter()
            .map(Url::to_string)
            .collect();
        assert_eq!(
            urls,
            [
                "tls://t0k3n@[::1]:4231",
                "tls://t0k3n@n2",
                "tls://t0k3n@n3:4333"
            ]
        );
        assert!(!format!("{config:?}").contains("t0k3n"));
        // One host: one server, as before.
        let config = NatsConfig::from_url("nats://h:4222").unwrap();
        assert_eq!(config.server_urls().unwrap().len(), 1);
    }

    #[test]
    fn the_servers_parameter_adds_seed_servers() {
        // The form a strict URL parser (evbus::Registry) accepts.
        let parsed =
            Url::parse("nats://u:pw@n1:4231?servers=n2:4232,%20n3:4233&replicas=3").unwrap();
        let config = NatsConfig::from_parsed_url(&parsed).unwrap();
        assert_eq!(config.url, "nats://u:pw@n1:4231");
        assert_eq!(config.servers, ["n2:4232", "n3:4233"]);
        let urls: Vec<String> = config
            .server_urls()
            .unwrap()
            .iter()
            .map(Url::to_string)
            .collect();
        assert_eq!(
            urls,
            [
                "nats://u:pw@n1:4231",
                "nats://u:pw@n2:4232",
                "nats://u:pw@n3:4233"
            ]
        );
        // Both forms together, and from serde.
        let config = NatsConfig::from_url("nats://n1,n2?servers=n3").unwrap();
        assert_eq!(config.server_urls().unwrap().len(), 3);
        let config: NatsConfig = serde_json::from_value(serde_json::json!({
            "url": "nats://n1:1,n2:2",
            "servers": ["n3:3"],
            "replicas": 3
        }))
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.server_urls().unwrap()[2].port(), Some(3));
    }

    #[test]
    fn a_bad_host_in_a_list_is_named() {
        for (url, needles) in [
            (
                "nats://127.0.0.1:4231,127.0.0.1:nope,127.0.0.1:4233",
                &["`127.0.0.1:nope`", "server 2 of 3", "invalid port"][..],
            ),
            ("nats://a:1,,b:2", &["server 2 of 3", "empty"][..]),
            ("nats://a:1,b:2,", &["server 3 of 3", "empty"][..]),
            ("nats://a:1,b:", &["`b:`", "server 2 of 2", "no port"][..]),
            ("nats://a:1,b:99999", &["`b:99999`", "server 2 of 2"][..]),
            (
                "nats://a:1?servers=b:2,c:x",
                &["`c:x`", "server 3 of 3"][..],
            ),
            (
                "nats://a:1,nats://b:2",
                &["repeats `scheme://`", "once"][..],
            ),
        ] {
            let err = NatsConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            for needle in needles {
                assert!(err.message().contains(needle), "{url}: {needle}: {err}");
            }
        }
        // The same checks apply to a config built by hand.
        let config = NatsConfig {
            servers: vec!["ok:1".into(), "bad host".into()],
            ..NatsConfig::new("nats://a:1")
        };
        let err = config.validate().unwrap_err();
        assert!(
            err.message().contains("`bad host` (server 3 of 3)"),
            "{err}"
        );
    }

    #[test]
    fn credentials_in_a_list_never_leak() {
        for url in [
            "nats://u:hunter2@a:1,b:2,c:x",
            "nats://u:hunter2@a:1,v:hunter2@b:2",
            "nats://u:hunter2@a:1,nats://v:hunter2@b:2",
            "nats://hunter2@a:1,b:2?nope=1",
            "nats://a:1,b:2?token=hunter2&nope=1",
            "nats://a:1?servers=x:hunter2@b:2",
        ] {
            let err = NatsConfig::from_url(url).unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
        }
        assert_eq!(
            redact("nats://u:hunter2@a:1,b:2?token=hunter2&storage=file"),
            "nats://u:***@a:1,b:2?token=***&storage=file"
        );
        let err = NatsConfig::from_url("nats://u:hunter2@a:1,v:pw@b:2").unwrap_err();
        assert!(err.message().contains("credentials go once"), "{err}");
        let config = NatsConfig {
            servers: vec!["v:hunter2@b:2".into()],
            ..NatsConfig::new("nats://a:1")
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_parameters_name_the_known_ones() {
        let err = NatsConfig::from_url("nats://h?stream_prefx=A").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("stream_prefx"), "{err}");
        assert!(err.message().contains("stream_prefix"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_parameter_name() {
        for (url, needle) in [
            ("nats://h?fetch_wait_ms=soon", "fetch_wait_ms"),
            ("nats://h?fetch_wait_ms=0", "fetch_wait"),
            ("nats://h?storage=disk", "storage"),
            ("nats://h?retention=forever", "retention"),
            ("nats://h?replicas=0", "replicas"),
            ("nats://h?double_ack=maybe", "double_ack"),
            ("nats://h?stream_prefix=A.B", "stream_prefix"),
            ("nats://h?subject_prefix=a.*", "subject_prefix"),
            ("nats://h?subject_prefix=a..b", "subject_prefix"),
            ("nats://h?fetch_batch=0", "fetch_batch"),
            ("nats://h?max_payload_bytes=0", "max_payload_bytes"),
        ] {
            let err = NatsConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(err.message().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn other_schemes_and_missing_hosts_are_rejected() {
        let err = NatsConfig::from_url("redis://h:6379").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("nats://"), "{err}");
        assert!(NatsConfig::from_url("nats://").is_err());
        assert!(NatsConfig::from_url("not a url").is_err());
        NatsConfig::from_url("tls://h:4222").unwrap();
    }

    #[test]
    fn serde_uses_milliseconds_and_fills_defaults() {
        let config: NatsConfig = serde_json::from_value(serde_json::json!({
            "url": "nats://h:1",
            "fetch_wait_ms": 200,
            "storage": "memory",
            "retention": "interest"
        }))
        .unwrap();
        assert_eq!(config.fetch_wait, Duration::from_millis(200));
        assert_eq!(config.storage, Storage::Memory);
        assert_eq!(config.retention, Retention::Interest);
        assert_eq!(config.stream_prefix, "EVBUS");
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["fetch_wait_ms"], 200);
        assert_eq!(back["duplicate_window_ms"], 120_000);
        assert!(serde_json::from_value::<NatsConfig>(serde_json::json!({"nope": 1})).is_err());
    }
}
