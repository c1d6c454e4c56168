//! Picking a transport at run time from a URL.
//!
//! Core knows `memory://`; each adapter crate provides a [`Connector`] for its schemes
//! (`redis://`, `kafka://`, `nats://`, `amqp://`) that the application registers.
//!
//! ```
//! # async fn demo() -> evbus::Result<()> {
//! let registry = evbus::Registry::new(); // knows memory://
//! let transport = registry.connect("memory://").await?;
//! assert_eq!(transport.name(), "memory");
//! # Ok(()) }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use url::Url;

use crate::error::{Error, Result};
use crate::raw::hosts::HostList;
use crate::transport::Transport;

/// Opens transports for some URL schemes.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The URL schemes this connector handles (without `://`).
    fn schemes(&self) -> &'static [&'static str];

    /// Opens a transport for `url`.
    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>>;

    /// The query parameter that takes more hosts (`host[:port]`, comma-separated), for a
    /// transport that accepts several (a cluster's seed nodes). A URL naming several hosts in
    /// its authority (`redis+cluster://h1:7000,h2:7000`), which a standard URL parser
    /// refuses, then reaches [`connect`](Self::connect) with its first host there and the
    /// others in this parameter. `None` (the default): such a URL is refused with an error
    /// saying the scheme takes one host.
    fn more_hosts_parameter(&self) -> Option<&'static str> {
        None
    }
}

/// A set of [`Connector`]s, keyed by URL scheme.
#[derive(Clone)]
pub struct Registry {
    connectors: Vec<Arc<dyn Connector>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("schemes", &self.schemes())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry that knows the in-memory transport (`memory://`).
    pub fn new() -> Self {
        let mut registry = Self::empty();
        registry.register(crate::memory::MemoryConnector);
        registry
    }

    /// A registry that knows no scheme.
    pub fn empty() -> Self {
        Registry {
            connectors: Vec::new(),
        }
    }

    /// Adds a connector; it takes precedence over earlier ones for the same scheme.
    pub fn register(&mut self, connector: impl Connector + 'static) -> &mut Self {
        self.connectors.insert(0, Arc::new(connector));
        self
    }

    /// Every scheme some connector handles.
    pub fn schemes(&self) -> Vec<&'static str> {
        let mut schemes: Vec<_> = self
            .connectors
            .iter()
            .flat_map(|c| c.schemes().iter().copied())
            .collect();
        schemes.sort_unstable();
        schemes.dedup();
        schemes
    }

    /// Opens a transport for `url` with the connector of its scheme. A scheme no registered
    /// connector opens is an [`InvalidConfig`](crate::ErrorKind::InvalidConfig) error naming
    /// the registered schemes and, for this repository's adapters, the crate and connector
    /// to add.
    ///
    /// A URL with several hosts in its authority (`scheme://h1,h2,h3`) is handed to the
    /// connector with the first host in the authority and the others in the connector's
    /// [`more_hosts_parameter`](Connector::more_hosts_parameter).
    pub async fn connect(&self, url: &str) -> Result<Arc<dyn Transport>> {
        let several = HostList::parse(url).filter(|list| list.hosts.len() > 1);
        let parsed = match several {
            Some(list) => {
                let scheme = list.scheme();
                match (
                    self.connector(scheme)?.more_hosts_parameter(),
                    Url::parse(url),
                ) {
                    (Some(parameter), _) => {
                        parse_url(&first_host_only(&list, parameter)?, "transport")?
                    }
                    // A host list the URL parser takes as one host (names without ports):
                    // the connector's to read, as before.
                    (None, Ok(parsed)) => parsed,
                    (None, Err(_)) => {
                        return Err(Error::invalid_config(format!(
                            "`{}` names {} hosts; a `{scheme}://` URL names one",
                            list.redacted(redact),
                            list.hosts.len()
                        )));
                    }
                }
            }
            None => parse_url(url, "transport")?,
        };
        self.connector(parsed.scheme())?.connect(&parsed).await
    }

    /// The connector of `scheme`, or an error naming the known schemes and what to add.
    fn connector(&self, scheme: &str) -> Result<&Arc<dyn Connector>> {
        self.connectors
            .iter()
            .find(|c| c.schemes().contains(&scheme))
            .ok_or_else(|| {
                let remedy = match adapter_of(scheme) {
                    Some((krate, connector)) => format!(
                        "add the `{krate}` crate and register its connector \
                         (`registry.register({connector})`)"
                    ),
                    None => {
                        "add the adapter crate of this scheme and register its connector".to_owned()
                    }
                };
                Error::invalid_config(format!(
                    "no transport for `{scheme}://` URLs; known schemes: {}. To use it, {remedy}",
                    self.schemes().join(", ")
                ))
            })
    }
}

/// The URL of `list` with its first host in the authority and the others in query parameter
/// `parameter`; an error when the parameter is given as well.
fn first_host_only(list: &HostList<'_>, parameter: &str) -> Result<String> {
    let (before_fragment, fragment) = match list.suffix.find('#') {
        Some(at) => list.suffix.split_at(at),
        None => (list.suffix, ""),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (before_fragment, None),
    };
    let given = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split('=').next() == Some(parameter))
    });
    if given {
        return Err(Error::invalid_config(format!(
            "`{}` names {} hosts and sets `{parameter}` too: give the other hosts either after \
             the first one or in `{parameter}`",
            list.redacted(redact),
            list.hosts.len()
        )));
    }
    let more = list.hosts[1..].join(",");
    let query = match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("{query}&{parameter}={more}"),
        None => format!("{parameter}={more}"),
    };
    Ok(format!(
        "{}{}{path}?{query}{fragment}",
        list.prefix, list.hosts[0]
    ))
}

/// Parses `url`, or fails with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig):
/// "`URL` is not a `what` URL: why", the URL shown without its password.
pub fn parse_url(url: &str, what: &str) -> Result<Url> {
    Url::parse(url)
        .map_err(|e| Error::invalid_config(format!("`{}` is not a {what} URL: {e}", redact(url))))
}

/// A URL for messages and logs, with every secret it may carry replaced by `***`:
///
/// - the password (`redis://u:***@host`);
/// - a user name given without a password (`nats://***@host`: NATS reads it as a token, and
///   many other clients do the same), except under the schemes whose bare user name is only
///   a login name (`postgres`, `postgresql`, `mysql`, `mariadb`, the `redis` schemes, `amqp`,
///   `amqps`);
/// - the value of every query parameter whose name looks secret, the other parameters kept
///   as written: a name that contains, in any case, `pass` (`password`, `passwd`,
///   `rdkafka.sasl.password`), `pwd`, `secret`, `token`, `key` (`nkey`, `apiKey`), `cred`
///   (`credentials`, `creds`), `jwt`, `seed`, `signature`, `cookie` or `authorization`, or
///   whose last part (after `.`, `_` or `-`) is `auth`, `sig`, `pw` or `sas`.
///
/// A URL that does not parse is `<unparseable URL>`. Parameter names are matched against a
/// deny list, broad on purpose (it hides `ssl.key.location` too), so that messages keep the
/// settings that explain them (`capacity=5`, `session_timeout_ms=6000`): a secret under a
/// name that looks like none of those words is shown.
pub fn redact(url: &str) -> String {
    let Ok(mut u) = Url::parse(url) else {
        return "<unparseable URL>".to_owned();
    };
    let hidden = if u.password().is_some() {
        u.set_password(Some("***"))
    } else if !u.username().is_empty() && !NAMED_USER_SCHEMES.contains(&u.scheme()) {
        u.set_username("***")
    } else {
        Ok(())
    };
    if hidden.is_err() {
        // Never reached for a URL with credentials (it has a host), but never shown either.
        return format!("{}:<URL with credentials>", u.scheme());
    }
    if let Some(query) = u.query().filter(|q| !q.is_empty()) {
        let mut changed = false;
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let raw_name = pair.split_once('=').map_or(pair, |(name, _)| name);
                let secret = url::form_urlencoded::parse(raw_name.as_bytes())
                    .next()
                    .is_some_and(|(name, _)| is_secret_parameter(&name));
                if secret {
                    changed = true;
                    format!("{raw_name}=***")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        if changed {
            u.set_query(Some(&pairs.join("&")));
        }
    }
    u.to_string()
}

/// URL schemes whose user name, given without a password, is a login name and not a secret,
/// so [`redact`] shows it. Under any other scheme a bare user name is hidden: NATS
/// (`nats://TOKEN@host`) and many HTTP-style clients read it as a token.
const NAMED_USER_SCHEMES: &[&str] = &[
    "postgres",
    "postgresql",
    "mysql",
    "mariadb",
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "amqp",
    "amqps",
];

/// Words that make a query parameter secret wherever they appear in its name (any case):
/// `password`, `passwd`, `pass`, `sasl.password`, `ssl.key.password`, `pwd`, `secret`,
/// `client_secret`, `token`, `access_token`, `nkey`, `key`, `apiKey`, `credential(s)`,
/// `creds`, `jwt`, `seed`, `signature`, `cookie`, `authorization`…
const SECRET_WORDS: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "cred",
    "jwt",
    "seed",
    "signature",
    "cookie",
    "authorization",
];

/// Short words that make a query parameter secret when they are the last part of its name
/// (parts split at `.`, `_` and `-`): `auth`, `http.auth`, `sig`, `pw`, `sas`; not
/// `auth_mechanism`.
const SECRET_PARTS: &[&str] = &["auth", "sig", "pw", "sas"];

/// Whether [`redact`] hides the value of the query parameter `name` (any case, any dotted
/// prefix: `rdkafka.sasl.password`): it contains one of the words listed there, or its last
/// part is `auth`, `sig`, `pw` or `sas`. Adapters use it to keep such a setting's value out of
/// their own error messages too (a client library's configuration error may quote it).
pub fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| name.contains(word))
        || name
            .rsplit(['.', '_', '-'])
            .next()
            .is_some_and(|last| SECRET_PARTS.contains(&last))
}

/// The crate and connector of the evbus adapter that opens `scheme`, for the error of a
/// registry that lacks it (the adapter crates are not dependencies of this one).
fn adapter_of(scheme: &str) -> Option<(&'static str, &'static str)> {
    Some(match scheme {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            ("evbus-redis", "evbus_redis::RedisConnector")
        }
        "kafka" => ("evbus-kafka", "evbus_kafka::KafkaConnector"),
        "nats" | "tls" => ("evbus-nats", "evbus_nats::NatsConnector"),
        "amqp" | "amqps" => ("evbus-amqp", "evbus_amqp::AmqpConnector"),
        "sqlite" | "postgres" | "postgresql" => ("evbus-sql", "evbus_sql::SqlConnector"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector of `multi://` (more hosts in `servers`) and `single://` (one host) that
    /// fails with the URL it was handed.
    struct Echo;

    #[async_trait]
    impl Connector for Echo {
        fn schemes(&self) -> &'static [&'static str] {
            &["multi", "single"]
        }
        async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
            Err(Error::invalid_config(format!("handed {url}")))
        }
        fn more_hosts_parameter(&self) -> Option<&'static str> {
            Some("servers")
        }
    }

    struct Single;

    #[async_trait]
    impl Connector for Single {
        fn schemes(&self) -> &'static [&'static str] {
            &["single"]
        }
        async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
            Err(Error::invalid_config(format!("handed {url}")))
        }
    }

    #[tokio::test]
    async fn several_hosts_reach_the_connector_in_its_parameter() {
        let mut registry = Registry::empty();
        registry.register(Echo).register(Single);
        let handed = |url: &'static str| {
            let registry = registry.clone();
            async move {
                registry
                    .connect(url)
                    .await
                    .unwrap_err()
                    .message()
                    .to_owned()
            }
        };
        assert_eq!(
            handed("multi://u:pw@10.0.0.1:7000,10.0.0.2:7000,[::1]:7002/0?prefix=a#f").await,
            "handed multi://u:pw@10.0.0.1:7000/0?prefix=a&servers=10.0.0.2:7000,[::1]:7002#f"
        );
        assert_eq!(
            handed("multi://h1,h2").await,
            "handed multi://h1?servers=h2"
        );
        // One host: the URL as given.
        assert_eq!(handed("multi://h1:1?x=1").await, "handed multi://h1:1?x=1");
        let both = handed("multi://h1,h2?servers=h3").await;
        assert!(both.contains("sets `servers` too"), "{both}");
        // Without a parameter: what the URL parser takes is the connector's to read, as
        // before; what it refuses is refused saying why, without the password.
        assert_eq!(handed("single://h1,h2").await, "handed single://h1,h2");
        let one = handed("single://u:secret@h1:1,h2:2").await;
        assert!(
            one.contains("names 2 hosts; a `single://` URL names one"),
            "{one}"
        );
        assert!(!one.contains("secret"), "{one}");
        let unknown = handed("other://h1,h2").await;
        assert!(unknown.contains("no transport for `other://`"), "{unknown}");
    }

    #[tokio::test]
    async fn unknown_schemes_name_the_known_ones() {
        let err = Registry::new()
            .connect("kafka://127.0.0.1:9092")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
        assert!(err.message().contains("memory"), "{err}");
        assert!(err.message().contains("evbus-kafka"), "{err}");
        // The crate that opens the scheme, not one named after the scheme.
        for (url, krate, connector) in [
            (
                "sqlite:///tmp/x.db",
                "`evbus-sql`",
                "evbus_sql::SqlConnector",
            ),
            ("postgres://h/db", "`evbus-sql`", "evbus_sql::SqlConnector"),
            (
                "rediss+cluster://h:1",
                "`evbus-redis`",
                "evbus_redis::RedisConnector",
            ),
            ("amqps://h", "`evbus-amqp`", "evbus_amqp::AmqpConnector"),
        ] {
            let err = Registry::new().connect(url).await.unwrap_err();
            assert!(err.message().contains(krate), "{url}: {err}");
            assert!(err.message().contains(connector), "{url}: {err}");
            assert!(!err.message().contains("evbus-sqlite"), "{url}: {err}");
        }
        let err = Registry::new().connect("pigeon://h").await.unwrap_err();
        assert!(
            err.message()
                .contains("add the adapter crate of this scheme"),
            "{err}"
        );
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(redact("redis://u:secret@h:1/"), "redis://u:***@h:1/");
        assert!(!redact("not a url secret").contains("secret"));
    }

    #[test]
    fn a_user_name_without_a_password_is_hidden_unless_the_scheme_makes_it_a_login() {
        // NATS reads a bare user name as a token.
        assert_eq!(redact("nats://s3cr3t@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("tls://s3cr3t@h:4222"), "tls://***@h:4222");
        assert_eq!(redact("memory://s3cr3t@x"), "memory://***@x");
        assert_eq!(redact("https://ghp_s3cr3t@h/x"), "https://***@h/x");
        // With a password the user name is a name; so is a bare one where it is a login.
        assert_eq!(redact("nats://u:s3cr3t@h:1"), "nats://u:***@h:1");
        assert_eq!(redact("postgres://gw@h:5432/db"), "postgres://gw@h:5432/db");
        assert_eq!(redact("amqp://guest@h:5672/v"), "amqp://guest@h:5672/v");
        assert_eq!(redact("redis://app@h:6379"), "redis://app@h:6379");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn secret_query_parameters_are_hidden_and_the_others_kept_as_written() {
        let cases = [
            (
                "postgres://gw@127.0.0.1:1/db?password=hunter2",
                "postgres://gw@127.0.0.1:1/db?password=***",
            ),
            (
                "nats://h:4222?token=s3cr3t&storage=file",
                "nats://h:4222?token=***&storage=file",
            ),
            ("nats://h:4222?nkey=SUAB3CD", "nats://h:4222?nkey=***"),
            (
                "kafka://h:9092?rdkafka.sasl.password=s3cr3t&rdkafka.sasl.username=app",
                "kafka://h:9092?rdkafka.sasl.password=***&rdkafka.sasl.username=app",
            ),
            (
                "kafka://h:9092?RDKAFKA.SASL.PASSWORD=s3cr3t",
                "kafka://h:9092?RDKAFKA.SASL.PASSWORD=***",
            ),
            // A percent-encoded name is recognised; the value is hidden whatever its form.
            ("x://h?pass%77ord=s3cr3t", "x://h?pass%77ord=***"),
            (
                "x://h?Passwd=s3cr3t&pass=s3cr3t",
                "x://h?Passwd=***&pass=***",
            ),
            (
                "x://h?pwd=s3cr3t&client_secret=s3cr3t",
                "x://h?pwd=***&client_secret=***",
            ),
            (
                "x://h?access_token=s3cr3t&apiKey=s3cr3t",
                "x://h?access_token=***&apiKey=***",
            ),
            (
                "x://h?credentials=s3cr3t&creds=s3cr3t",
                "x://h?credentials=***&creds=***",
            ),
            (
                "x://h?auth=s3cr3t&x-amz-signature=s3cr3t",
                "x://h?auth=***&x-amz-signature=***",
            ),
            (
                "x://h?http.auth=s3cr3t&basic_auth=s3cr3t",
                "x://h?http.auth=***&basic_auth=***",
            ),
            ("x://h?sig=s3cr3t&jwt=s3cr3t", "x://h?sig=***&jwt=***"),
            // A value-less secret parameter gets the mark too; nothing else changes.
            ("x://h?token", "x://h?token=***"),
            (
                "memory://?capacity=5&publish_timeout_ms=100",
                "memory://?capacity=5&publish_timeout_ms=100",
            ),
            (
                "kafka://h:9092?brokers=a:1,b:2&session_timeout_ms=6000&rdkafka.sasl.username=app",
                "kafka://h:9092?brokers=a:1,b:2&session_timeout_ms=6000&rdkafka.sasl.username=app",
            ),
            (
                "amqp://u:pw@h/v?auth_mechanism=plain",
                "amqp://u:***@h/v?auth_mechanism=plain",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redact(url), shown, "{url}");
            assert!(!redact(url).contains("s3cr3t"), "{url}");
        }
        // Everything together.
        let all = redact("nats://s3cr3t@h:4222?token=s3cr3t&nkey=s3cr3t&stream_prefix=app");
        assert_eq!(
            all,
            "nats://***@h:4222?token=***&nkey=***&stream_prefix=app"
        );
    }
}
