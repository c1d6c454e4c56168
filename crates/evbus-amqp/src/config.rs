//! [`AmqpConfig`]: where the RabbitMQ broker is and how the adapter uses it.

use std::fmt;
use std::time::Duration;

use evbus::raw::hosts::{self, HostList, HostSyntax};
use evbus::raw::{ConfigKey, parse_millis, parse_value};
use evbus::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

/// RabbitMQ's hard ceiling on a message body (`max_message_size` cannot be set higher); the
/// adapter refuses larger limits outright.
pub const MAX_PAYLOAD_LIMIT: usize = 512 * 1024 * 1024;

/// Settings of an [`AmqpTransport`](crate::AmqpTransport).
///
/// Every field has a documented default; build one with [`AmqpConfig::new`] or
/// [`AmqpConfig::from_url`], then adjust fields (the struct is `#[non_exhaustive]`). With
/// `serde`, missing fields take their defaults and durations are whole milliseconds
/// (`command_timeout_ms`, ...).
///
/// `Debug` output and every error message hide the password of [`url`](Self::url).
///
/// ```
/// use evbus_amqp::AmqpConfig;
///
/// let config = AmqpConfig::from_url("amqp://app:s3cret@127.0.0.1:5672/shop?prefix=orders.")?;
/// assert_eq!(config.prefix, "orders.");
/// assert_eq!(config.url, "amqp://app:s3cret@127.0.0.1:5672/shop");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), evbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The broker URL given to the AMQP client:
    /// `amqp[s]://[user[:password]@]host[:port][/vhost][?heartbeat=S&frame_max=N&channel_max=N]`.
    /// The vhost is percent-encoded (`%2f` is the default vhost `/`). Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`. The nodes of a cluster are comma-separated
    /// hosts in one URL, `amqp://user:pw@host1:5672,host2:5672,host3:5672/%2f`: the scheme,
    /// credentials, vhost and client parameters apply to every host (see
    /// [`server_urls`](Self::server_urls)).
    pub url: String,
    /// More nodes of the same cluster, `host[:port]` each (port 5672, 5671 with `amqps`,
    /// when omitted), with the scheme, credentials and vhost of [`url`](Self::url). Default
    /// none. The URL parameter `servers` is a comma-separated list; it is the form to use
    /// where the URL is parsed as a standard URL before the adapter sees it
    /// ([`evbus::Registry`], the `evbus` CLI), which rejects comma-separated hosts.
    pub servers: Vec<String>,
    /// Prefix of every exchange and queue the adapter creates. Default `evbus.`. It must not
    /// start with `amq.` (reserved by RabbitMQ).
    pub prefix: String,
    /// How long one AMQP operation (a declaration, a publish and its confirm, a settlement)
    /// may take before failing with [`ErrorKind::Timeout`](evbus::ErrorKind::Timeout).
    /// Default 10 s.
    #[serde(rename = "command_timeout_ms", with = "evbus::raw::millis")]
    pub command_timeout: Duration,
    /// How long one connection attempt may take. Default 5 s.
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
    /// Default 16 MiB; at most [`MAX_PAYLOAD_LIMIT`]. RabbitMQ itself refuses messages above
    /// its `max_message_size` (128 MiB by default).
    pub max_payload_bytes: usize,
    /// How long the tombstone of a deleted topic or queue (the queue that counts its
    /// deletions) stays unused before RabbitMQ drops it (its `x-expires`): a consumer whose
    /// connection was lost while its topic or queue was deleted, and that comes back within
    /// this time, ends; one that comes back later declares what it reads again (README,
    /// "Deleted under a subscription"). Default 24 h; at least 1 s.
    #[serde(rename = "tombstone_ttl_ms", with = "evbus::raw::millis")]
    pub tombstone_ttl: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            servers: Vec::new(),
            prefix: "evbus.".to_owned(),
            command_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            max_payload_bytes: 16 * 1024 * 1024,
            tombstone_ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field(
                "servers",
                &self
                    .servers
                    .iter()
                    .map(|s| hosts::redact_host(s))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min_delay", &self.reconnect_min_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("tombstone_ttl", &self.tombstone_ttl)
            .finish()
    }
}

/// The URL query parameters of [`AmqpConfig`]: the serde names of its fields (all but
/// [`url`](AmqpConfig::url), which is the URL itself), plus the AMQP client's own parameters
/// `heartbeat`, `frame_max`, `channel_max` and `auth_mechanism`, which are URL-only: they stay
/// in [`AmqpConfig::url`] for the client to read ([`is_client`](Self::is_client)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AmqpConfigKey {
    /// [`AmqpConfig::prefix`].
    Prefix,
    /// [`AmqpConfig::command_timeout`].
    CommandTimeoutMs,
    /// [`AmqpConfig::connect_timeout`].
    ConnectTimeoutMs,
    /// [`AmqpConfig::reconnect_min_delay`].
    ReconnectMinDelayMs,
    /// [`AmqpConfig::reconnect_max_delay`].
    ReconnectMaxDelayMs,
    /// [`AmqpConfig::max_payload_bytes`].
    MaxPayloadBytes,
    /// [`AmqpConfig::tombstone_ttl`].
    TombstoneTtlMs,
    /// The client's heartbeat interval in seconds (kept in the URL).
    Heartbeat,
    /// The client's largest frame size (kept in the URL).
    FrameMax,
    /// The client's most channels per connection (kept in the URL).
    ChannelMax,
    /// The client's SASL mechanism, `plain` or `external` (kept in the URL).
    AuthMechanism,
    /// [`AmqpConfig::servers`]: comma-separated `host[:port]`.
    Servers,
}

impl AmqpConfigKey {
    /// Whether the AMQP client reads this parameter from [`AmqpConfig::url`] (so it is not a
    /// field of [`AmqpConfig`]).
    pub fn is_client(self) -> bool {
        matches!(
            self,
            AmqpConfigKey::Heartbeat
                | AmqpConfigKey::FrameMax
                | AmqpConfigKey::ChannelMax
                | AmqpConfigKey::AuthMechanism
        )
    }
}

impl ConfigKey for AmqpConfigKey {
    const ADAPTER: &'static str = "AMQP";
    const ALL: &'static [Self] = &[
        AmqpConfigKey::Prefix,
        AmqpConfigKey::CommandTimeoutMs,
        AmqpConfigKey::ConnectTimeoutMs,
        AmqpConfigKey::ReconnectMinDelayMs,
        AmqpConfigKey::ReconnectMaxDelayMs,
        AmqpConfigKey::MaxPayloadBytes,
        AmqpConfigKey::TombstoneTtlMs,
        AmqpConfigKey::Heartbeat,
        AmqpConfigKey::FrameMax,
        AmqpConfigKey::ChannelMax,
        AmqpConfigKey::AuthMechanism,
        AmqpConfigKey::Servers,
    ];

    fn name(self) -> &'static str {
        match self {
            AmqpConfigKey::Prefix => "prefix",
            AmqpConfigKey::CommandTimeoutMs => "command_timeout_ms",
            AmqpConfigKey::ConnectTimeoutMs => "connect_timeout_ms",
            AmqpConfigKey::ReconnectMinDelayMs => "reconnect_min_delay_ms",
            AmqpConfigKey::ReconnectMaxDelayMs => "reconnect_max_delay_ms",
            AmqpConfigKey::MaxPayloadBytes => "max_payload_bytes",
            AmqpConfigKey::TombstoneTtlMs => "tombstone_ttl_ms",
            AmqpConfigKey::Heartbeat => "heartbeat",
            AmqpConfigKey::FrameMax => "frame_max",
            AmqpConfigKey::ChannelMax => "channel_max",
            AmqpConfigKey::AuthMechanism => "auth_mechanism",
            AmqpConfigKey::Servers => "servers",
        }
    }
}

impl AmqpConfig {
    /// The defaults, connecting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            ..AmqpConfig::default()
        }
    }

    /// Reads an `amqp://` or `amqps://` URL. The adapter's own settings travel as query
    /// parameters and are removed from [`url`](Self::url): `prefix`, `command_timeout_ms`,
    /// `connect_timeout_ms`, `reconnect_min_delay_ms`, `reconnect_max_delay_ms`,
    /// `max_payload_bytes`, `tombstone_ttl_ms` (each the serde name of a field). The client's `heartbeat`,
    /// `frame_max`, `channel_max` and `auth_mechanism` stay in the URL. The list is
    /// [`AmqpConfigKey`]; any other parameter is an error naming the valid keys (a typo would
    /// otherwise be silently ignored).
    ///
    /// The nodes of a cluster are comma-separated hosts, the scheme and credentials given
    /// once before them, the vhost and parameters after the last one:
    /// `amqp://app:pw@10.0.0.1:5672,10.0.0.2:5672,10.0.0.3:5672/%2f`. The same list can be
    /// given as the `servers` parameter,
    /// `amqp://app:pw@10.0.0.1:5672/%2f?servers=10.0.0.2:5672,10.0.0.3:5672`, the form to use
    /// where the URL is parsed as a standard URL first ([`evbus::Registry`], the `evbus`
    /// CLI). The adapter connects to the first node that accepts, trying them in turn (on
    /// each reconnection it starts from the next one). A bad host is named in the error.
    pub fn from_url(url: &str) -> Result<Self> {
        check_one_scheme(url)?;
        if let Some(split) = HostList::parse(url).filter(|s| s.hosts.len() > 1) {
            split.checked_with(&[], &NODE)?;
            let parsed = evbus::registry::parse_url(&split.with_host(split.hosts[0]), "AMQP")?;
            let mut config = Self::from_parsed(&parsed)?;
            // Put the other hosts back after the first one in the client URL.
            let single = HostList::parse(&config.url).ok_or_else(|| {
                Error::invalid_config(format!("`{}` is not an AMQP URL", redact(url)))
            })?;
            config.url = format!(
                "{}{},{}{}",
                single.prefix,
                single.hosts.join(","),
                split.hosts[1..].join(","),
                single.suffix
            );
            config.validate()?;
            return Ok(config);
        }
        let parsed = evbus::registry::parse_url(url, "AMQP")?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), for an already parsed URL (one host; more in the
    /// `servers` parameter).
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        let config = Self::from_parsed(url)?;
        config.validate()?;
        Ok(config)
    }

    /// Every node to connect to, the URL's hosts then [`servers`](Self::servers), each a
    /// one-host client URL with the scheme, credentials, vhost and client parameters of
    /// [`url`](Self::url). Fails with `InvalidConfig` naming the first bad host.
    ///
    /// ```
    /// use evbus_amqp::AmqpConfig;
    ///
    /// let config = AmqpConfig::from_url("amqp://app:pw@n1:5681,n2:5682/shop?servers=n3")?;
    /// assert_eq!(
    ///     config.server_urls()?,
    ///     ["amqp://app:pw@n1:5681/shop", "amqp://app:pw@n2:5682/shop", "amqp://app:pw@n3/shop"]
    /// );
    /// # Ok::<(), evbus::Error>(())
    /// ```
    pub fn server_urls(&self) -> Result<Vec<String>> {
        check_one_scheme(&self.url)?;
        let split = match HostList::parse(&self.url) {
            Some(split) if split.hosts.len() > 1 || !self.servers.is_empty() => split,
            _ => return Ok(vec![self.url.clone()]),
        };
        Ok(split
            .checked_with(&self.servers, &NODE)?
            .iter()
            .map(|node| split.with_host(node.entry))
            .collect())
    }

    /// The settings of a parsed URL (one host), not validated yet.
    fn from_parsed(url: &Url) -> Result<Self> {
        check_scheme(url)?;
        let mut config = AmqpConfig::default();
        let mut kept = Vec::new();
        for (name, value) in url.query_pairs() {
            use AmqpConfigKey as K;
            let key = K::parse(&name)?;
            let millis = || parse_millis(key, &value);
            match key {
                K::Prefix => config.prefix = value.clone().into_owned(),
                K::CommandTimeoutMs => config.command_timeout = millis()?,
                K::ConnectTimeoutMs => config.connect_timeout = millis()?,
                K::ReconnectMinDelayMs => config.reconnect_min_delay = millis()?,
                K::ReconnectMaxDelayMs => config.reconnect_max_delay = millis()?,
                K::MaxPayloadBytes => config.max_payload_bytes = parse_value(key, &value)?,
                K::TombstoneTtlMs => config.tombstone_ttl = millis()?,
                K::Heartbeat | K::FrameMax | K::ChannelMax | K::AuthMechanism => {
                    kept.push((name.clone().into_owned(), value.clone().into_owned()));
                }
                K::Servers => config
                    .servers
                    .extend(value.split(',').map(|s| s.trim().to_owned())),
            }
        }
        let mut client_url = url.clone();
        if kept.is_empty() {
            client_url.set_query(None);
        } else {
            client_url.query_pairs_mut().clear().extend_pairs(kept);
        }
        config.url = client_url.to_string();
        Ok(config)
    }

    /// Checks that the settings are usable;
    /// [`AmqpTransport::connect`](crate::AmqpTransport::connect) calls it.
    pub fn validate(&self) -> Result<()> {
        for server in self.server_urls()? {
            self.validate_server(&server)?;
        }
        if self.prefix.starts_with("amq.") {
            return Err(Error::invalid_config(format!(
                "prefix `{}` starts with `amq.`, which RabbitMQ reserves for its own exchanges \
                 and queues; choose another prefix",
                self.prefix
            )));
        }
        if self.prefix.len() > 64 || !crate::names::is_plain(&self.prefix) {
            return Err(Error::invalid_config(format!(
                "prefix `{}` must be at most 64 ASCII letters, digits, `.`, `-` or `_`",
                self.prefix.escape_debug()
            )));
        }
        evbus::raw::check_positive(&[
            ("command_timeout", self.command_timeout),
            ("connect_timeout", self.connect_timeout),
        ])?;
        if self.reconnect_max_delay < self.reconnect_min_delay {
            return Err(Error::invalid_config(
                "reconnect_max_delay must not be less than reconnect_min_delay",
            ));
        }
        if self.tombstone_ttl < Duration::from_secs(1)
            || self.tombstone_ttl.as_millis() > u128::from(u32::MAX)
        {
            return Err(Error::invalid_config(format!(
                "tombstone_ttl must be between 1 s and {} ms (about 49 days), got {:?}",
                u32::MAX,
                self.tombstone_ttl
            )));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return Err(Error::invalid_config(format!(
                "max_payload_bytes must be between 1 and {MAX_PAYLOAD_LIMIT} (RabbitMQ's \
                 largest max_message_size), got {}",
                self.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// Checks one node's client URL.
    fn validate_server(&self, server: &str) -> Result<()> {
        let url = evbus::registry::parse_url(server, "AMQP")?;
        check_scheme(&url)?;
        if let Some(query) = url.query() {
            for (key, _) in url::form_urlencoded::parse(query.as_bytes()) {
                if !AmqpConfigKey::parse(&key).is_ok_and(AmqpConfigKey::is_client) {
                    return Err(Error::invalid_config(format!(
                        "AmqpConfig::url carries `{key}`, which the AMQP client does not read; \
                         set the fields of AmqpConfig instead, or use AmqpConfig::from_url \
                         (URL `{}`)",
                        redact(&self.url)
                    )));
                }
            }
        }
        // Let the client's own parser judge the rest (vhost, port, parameter values).
        server.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Error::invalid_config(format!(
                "`{}` is not a usable AMQP URL: {}",
                redact(server),
                scrub(&e, server)
            ))
        })?;
        Ok(())
    }

    /// The URL for messages and logs: the password replaced by `***`.
    pub(crate) fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// `url` with its password replaced by `***`; a URL naming several hosts
/// (`amqp://u:pw@a:1,b:2/v`) keeps them all. For messages and logs.
pub(crate) fn redact(url: &str) -> String {
    hosts::redact_urls(url, evbus::registry::redact)
}

/// How the nodes of an AMQP URL are written.
const NODE: HostSyntax<'static> = HostSyntax {
    what: "AMQP node",
    noun: "node",
    example: "amqp://user:pw@a:5672,b:5672/%2f",
    port_required: false,
    after_hosts: "the vhost",
};

/// Refuses a list of full URLs (`amqp://a:1,amqp://b:2`): the scheme is given once.
fn check_one_scheme(url: &str) -> Result<()> {
    hosts::check_one_scheme(
        url,
        "amqp://user:pw@host1:5672,host2:5672/%2f",
        evbus::registry::redact,
    )
}

/// `text` with the password of `url` (as written and percent-decoded) replaced by `***`:
/// client errors may quote the whole URL.
///
/// Where it stands in a URL's user information (`:password@`) it is always replaced;
/// elsewhere only if it has at least [`BARE_SCRUB_MIN`] characters and is not also the user
/// name: replacing every `e` of a message for the password `e` garbled it (`conn***cting`,
/// `127.***.***.1`), and a password that is the user name (`guest:guest`) hid the user.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    // With several hosts, the credentials are those of the first host's URL.
    let first = HostList::parse(url).map(|split| split.with_host(split.hosts[0]));
    let Ok(parsed) = Url::parse(first.as_deref().unwrap_or(url)) else {
        return text.to_owned();
    };
    let Some(password) = parsed.password().filter(|p| !p.is_empty()) else {
        return text.to_owned();
    };
    let user = parsed.username();
    let mut forms = vec![password.to_owned()];
    if let Ok(decoded) = percent_decode(password)
        && !decoded.is_empty()
        && decoded != password
    {
        forms.push(decoded);
    }
    let mut out = text.to_owned();
    for form in &forms {
        out = out.replace(&format!(":{form}@"), ":***@");
        if form.chars().count() >= BARE_SCRUB_MIN && form != user {
            out = out.replace(form.as_str(), "***");
        }
    }
    out
}

/// The shortest password [`scrub`] replaces outside a URL's user information.
const BARE_SCRUB_MIN: usize = 4;

fn percent_decode(text: &str) -> std::result::Result<String, std::string::FromUtf8Error> {
    let bytes: Vec<u8> =
        url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned().into_bytes())
            .unwrap_or_default();
    String::from_utf8(bytes)
}

fn check_scheme(url: &Url) -> Result<()> {
    match url.scheme() {
        "amqp" | "amqps" => {}
        other => {
            return Err(Error::invalid_config(format!(
                "`{other}://` is not an AMQP URL; use amqp:// or amqps://"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid_config(format!(
            "`{}` names no host; use amqp://HOST[:PORT][/VHOST]",
            evbus::registry::redact(url.as_str())
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use evbus::ErrorKind;

    #[test]
    fn url_keys_are_the_serde_names_but_the_client_parameters() {
        let json = serde_json::to_value(AmqpConfig::default()).unwrap();
        let mut serde_names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| &**k)
            .filter(|k| *k != "url")
            .collect();
        serde_names.sort_unstable();
        let mut url_names: Vec<&str> = AmqpConfigKey::ALL
            .iter()
            .filter(|k| !k.is_client())
            .map(|k| k.name())
            .collect();
        url_names.sort_unstable();
        assert_eq!(serde_names, url_names);
        let client: Vec<&str> = AmqpConfigKey::ALL
            .iter()
            .filter(|k| k.is_client())
            .map(|k| k.name())
            .collect();
        assert_eq!(
            client,
            ["heartbeat", "frame_max", "channel_max", "auth_mechanism"]
        );
    }

    #[test]
    fn a_typo_lists_the_valid_keys() {
        let typo = AmqpConfig::from_url("amqp://h?command_timeout=5").unwrap_err();
        assert_eq!(typo.kind(), ErrorKind::InvalidConfig);
        assert!(
            typo.message().contains(
                "unknown AMQP URL parameter `command_timeout`; valid keys are: prefix, \
                 command_timeout_ms, connect_timeout_ms, reconnect_min_delay_ms, \
                 reconnect_max_delay_ms, max_payload_bytes, tombstone_ttl_ms, heartbeat, \
                 frame_max, channel_max, auth_mechanism"
            ),
            "{typo}"
        );
    }

    #[test]
    fn defaults_connect_to_the_local_broker_default_vhost() {
        let config = AmqpConfig::default();
        assert_eq!(config.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(config.prefix, "evbus.");
        assert_eq!(config.max_payload_bytes, 16 * 1024 * 1024);
        config.validate().unwrap();
    }

    #[test]
    fn adapter_parameters_become_settings_and_client_parameters_stay() {
        let config = AmqpConfig::from_url(
            "amqp://u:pw@localhost:5673/shop?prefix=x.&command_timeout_ms=900\
             &connect_timeout_ms=800&reconnect_min_delay_ms=10&reconnect_max_delay_ms=20\
             &max_payload_bytes=1024&tombstone_ttl_ms=60000&heartbeat=15",
        )
        .unwrap();
        assert_eq!(config.url, "amqp://u:pw@localhost:5673/shop?heartbeat=15");
        assert_eq!(config.prefix, "x.");
        assert_eq!(config.command_timeout, Duration::from_millis(900));
        assert_eq!(config.connect_timeout, Duration::from_millis(800));
        assert_eq!(config.reconnect_min_delay, Duration::from_millis(10));
        assert_eq!(config.reconnect_max_delay, Duration::from_millis(20));
        assert_eq!(config.max_payload_bytes, 1024);
        assert_eq!(config.tombstone_ttl, Duration::from_secs(60));
        for bad in ["999", "4294967296"] {
            let url = format!("amqp://h?tombstone_ttl_ms={bad}");
            let err = AmqpConfig::from_url(&url).unwrap_err();
            assert!(err.message().contains("tombstone_ttl"), "{err}");
        }
    }

    #[test]
    fn the_vhost_stays_in_the_client_url() {
        let config = AmqpConfig::from_url("amqps://h/%2fprod?prefix=a.").unwrap();
        assert_eq!(config.url, "amqps://h/%2fprod");
        let uri: lapin::uri::AMQPUri = config.url.parse().unwrap();
        assert_eq!(uri.vhost, "/prod");
    }

    #[test]
    fn unknown_parameters_name_the_known_ones() {
        let err = AmqpConfig::from_url("amqp://h?prefx=a.").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("prefx"), "{err}");
        assert!(err.message().contains("prefix"), "{err}");
        assert!(err.message().contains("heartbeat"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_parameter_name() {
        let err = AmqpConfig::from_url("amqp://h?command_timeout_ms=soon").unwrap_err();
        assert!(err.message().contains("command_timeout_ms"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?command_timeout_ms=0").unwrap_err();
        assert!(err.message().contains("command_timeout"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?prefix=a/b.").unwrap_err();
        assert!(err.message().contains("letters"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?prefix=amq.x").unwrap_err();
        assert!(err.message().contains("reserves"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?max_payload_bytes=999999999999").unwrap_err();
        assert!(err.message().contains("max_payload_bytes"), "{err}");
        let err = AmqpConfig::from_url("amqp://h?heartbeat=often").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let err =
            AmqpConfig::from_url("amqp://h?reconnect_min_delay_ms=50&reconnect_max_delay_ms=5")
                .unwrap_err();
        assert!(err.message().contains("reconnect_max_delay"), "{err}");
    }

    #[test]
    fn other_schemes_and_missing_hosts_are_rejected() {
        let err = AmqpConfig::from_url("redis://h:6379").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("amqp://"), "{err}");
        assert!(AmqpConfig::from_url("amqp://").is_err());
        assert!(AmqpConfig::from_url("not a url").is_err());
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let config = AmqpConfig::from_url("amqp://user:hunter2@h:1/v").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        let err = AmqpConfig::from_url("amqp://user:hunter2@h:1/v?nope=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let mut bad = AmqpConfig::new("amqp://user:hunter2@h:1/v?prefix=x");
        bad.prefix = "x".into();
        let err = bad.validate().unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn comma_separated_nodes_share_the_credentials_vhost_and_parameters() {
        let config = AmqpConfig::from_url(
            "amqp://app:s3cret@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/shop?heartbeat=5\
             &prefix=x.",
        )
        .unwrap();
        assert_eq!(
            config.url,
            "amqp://app:s3cret@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/shop?heartbeat=5"
        );
        assert_eq!(config.prefix, "x.");
        assert_eq!(
            config.server_urls().unwrap(),
            [
                "amqp://app:s3cret@127.0.0.1:5681/shop?heartbeat=5",
                "amqp://app:s3cret@127.0.0.1:5682/shop?heartbeat=5",
                "amqp://app:s3cret@127.0.0.1:5683/shop?heartbeat=5"
            ]
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(
            debug.contains("amqp://app:***@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/shop"),
            "{debug}"
        );
        // The `servers` parameter: the form a strict URL parser accepts.
        let parsed = Url::parse("amqp://u:pw@n1:5681/%2f?servers=n2:5682,n3").unwrap();
        let config = AmqpConfig::from_parsed_url(&parsed).unwrap();
        assert_eq!(config.url, "amqp://u:pw@n1:5681/%2f");
        assert_eq!(
            config.server_urls().unwrap(),
            [
                "amqp://u:pw@n1:5681/%2f",
                "amqp://u:pw@n2:5682/%2f",
                "amqp://u:pw@n3/%2f"
            ]
        );
        assert_eq!(
            AmqpConfig::from_url("amqp://h")
                .unwrap()
                .server_urls()
                .unwrap(),
            ["amqp://h"]
        );
    }

    #[test]
    fn a_bad_node_in_a_list_is_named_and_passwords_never_leak() {
        for (url, needles) in [
            (
                "amqp://u:hunter2@a:1,b:nope,c:3/%2f",
                &["`b:nope`", "node 2 of 3", "invalid port"][..],
            ),
            ("amqp://u:hunter2@a:1,,b:2", &["node 2 of 3", "empty"][..]),
            ("amqp://u:hunter2@a:1,b:", &["`b:`", "no port"][..]),
            (
                "amqp://u:hunter2@a:1,v:hunter2@b:2",
                &["node 2 of 2", "credentials go once"][..],
            ),
            (
                "amqp://u:hunter2@a:1,amqp://v:hunter2@b:2",
                &["repeats `scheme://`"][..],
            ),
            (
                "amqp://u:hunter2@a:1/%2f?servers=b:2,c:x",
                &["`c:x`", "node 3 of 3"][..],
            ),
            ("amqp://u:hunter2@a:1,b:2/%2f?nope=1", &["nope"][..]),
        ] {
            let err = AmqpConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
            for needle in needles {
                assert!(err.message().contains(needle), "{url}: {needle}: {err}");
            }
        }
        assert_eq!(
            redact("amqp://u:hunter2@a:1,b:2/%2f"),
            "amqp://u:***@a:1,b:2/%2f"
        );
        let text = scrub("bad 'amqp://u:hunter2@a:1'", "amqp://u:hunter2@a:1,b:2/%2f");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn client_errors_quoting_the_url_are_scrubbed() {
        let text = scrub(
            "Invalid URL: 'amqp://u:p%40ss@h'; also p@ss",
            "amqp://u:p%40ss@h",
        );
        assert!(!text.contains("p%40ss") && !text.contains("p@ss"), "{text}");
        assert_eq!(scrub("no secret", "amqp://h"), "no secret");
    }

    /// A short password, or one that is the user name, is scrubbed from URLs the client
    /// quotes, not from every word of the message (an outside review saw `conn***cting to
    /// RabbitMQ at amqp://app:***@127.***.***.1` for the password `e`, and the user hidden
    /// for `guest:guest`).
    #[test]
    fn a_short_password_is_scrubbed_from_urls_not_from_every_word() {
        let text = scrub(
            "connecting to 127.0.0.1: IO error: refused for 'amqp://app:e@127.0.0.1:5999'",
            "amqp://app:e@127.0.0.1:5999/%2f",
        );
        assert_eq!(
            text,
            "connecting to 127.0.0.1: IO error: refused for 'amqp://app:***@127.0.0.1:5999'"
        );
        let text = scrub(
            "login of guest refused for 'amqp://guest:guest@h'",
            "amqp://guest:guest@h",
        );
        assert_eq!(text, "login of guest refused for 'amqp://guest:***@h'");
    }

    #[test]
    fn serde_uses_milliseconds_and_fills_defaults() {
        let config: AmqpConfig = serde_json::from_value(serde_json::json!({
            "url": "amqp://h:1/%2f",
            "command_timeout_ms": 200
        }))
        .unwrap();
        assert_eq!(config.command_timeout, Duration::from_millis(200));
        assert_eq!(config.prefix, "evbus.");
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["command_timeout_ms"], 200);
        assert!(serde_json::from_value::<AmqpConfig>(serde_json::json!({"nope": 1})).is_err());
    }
}
