//! [`SqlConfig`]: which database, and how the transport uses it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use evbus::raw::{ConfigKey, check_positive, parse_millis, parse_value};
use evbus::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

/// The URL schemes of the SQL transport: `postgres`, `postgresql` and `sqlite`.
pub const URL_SCHEMES: &[&str] = &["postgres", "postgresql", "sqlite"];

/// The database behind a [`SqlTransport`](crate::SqlTransport).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL (`postgres://` or `postgresql://`): any number of processes.
    Postgres,
    /// One SQLite database file (`sqlite:///path` or `sqlite:relative/path`), one process.
    Sqlite,
}

impl Backend {
    /// The adapter name (`postgres`, `sqlite`), as `Transport::name` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// Settings of a [`SqlTransport`](crate::SqlTransport).
///
/// Build one with [`SqlConfig::from_url`], then adjust fields (the struct is
/// `#[non_exhaustive]`). Durations are whole milliseconds in URLs and serde (`*_ms`).
/// `Debug` never shows the password.
///
/// ```
/// use std::time::Duration;
/// use evbus_sql::{Backend, SqlConfig};
///
/// let config = SqlConfig::from_url("postgres://app:s3cret@db:5432/shop?schema=bus&retention_ms=60000")?;
/// assert_eq!(config.backend, Backend::Postgres);
/// assert_eq!(config.schema, "bus");
/// assert_eq!(config.retention, Duration::from_secs(60));
/// assert!(!format!("{config:?}").contains("s3cret"));
///
/// let file = SqlConfig::from_url("sqlite:///var/lib/evbus/bus.db")?;
/// assert_eq!(file.backend, Backend::Sqlite);
/// assert_eq!(file.sqlite_path().unwrap(), std::path::Path::new("/var/lib/evbus/bus.db"));
/// # Ok::<(), evbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SqlConfig {
    /// The database URL without the transport's own parameters:
    /// `postgres://[user[:password]@]host[:port]/database` or `sqlite:///absolute/path.db`
    /// (`sqlite:relative/path.db`). Default `sqlite:evbus.db`.
    pub url: String,
    /// Which database the URL names (derived from its scheme).
    pub backend: Backend,
    /// PostgreSQL only: the schema holding the transport's tables, created if needed.
    /// Default `evbus`. Lower-case letters, digits and `_` only, not starting with a digit,
    /// at most 40 characters.
    pub schema: String,
    /// Most connections the transport opens (the pool size; a PostgreSQL transport opens one
    /// more for `LISTEN`). Default 5.
    pub max_connections: u32,
    /// How often an idle consumer looks for due rows when nothing woke it (the fallback of
    /// `LISTEN/NOTIFY`; it also finds expired visibility timeouts and delayed nacks).
    /// Default 250 ms.
    #[serde(rename = "poll_interval_ms", with = "evbus::raw::millis")]
    pub poll_interval: Duration,
    /// How long an event stays stored once every subscription acknowledged it (what
    /// `StartPosition::Earliest` can replay). Default 1 hour; 0 deletes it at the next cleanup.
    #[serde(rename = "retention_ms", with = "evbus::raw::millis")]
    pub retention: Duration,
    /// How often the cleanup runs (events past retention, anonymous subscriptions left by
    /// dead processes). Default 60 s.
    #[serde(rename = "cleanup_interval_ms", with = "evbus::raw::millis")]
    pub cleanup_interval: Duration,
    /// An anonymous subscription whose consumer was not seen for this long (its process
    /// died) is deleted by the cleanup. Default 10 minutes.
    #[serde(rename = "anonymous_ttl_ms", with = "evbus::raw::millis")]
    pub anonymous_ttl: Duration,
    /// How long opening a connection (or, for SQLite, waiting for the file's write lock)
    /// may take before failing with a connection error. Default 5 s.
    #[serde(rename = "connect_timeout_ms", with = "evbus::raw::millis")]
    pub connect_timeout: Duration,
    /// Largest event accepted ([`evbus::Event::encoded_len`]). Default 16 MiB; at most
    /// [`MAX_PAYLOAD_LIMIT`].
    pub max_payload_bytes: usize,
}

/// The largest `max_payload_bytes` accepted (PostgreSQL's `text` holds at most 1 GB).
pub const MAX_PAYLOAD_LIMIT: usize = 256 * 1024 * 1024;

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            url: "sqlite:evbus.db".to_owned(),
            backend: Backend::Sqlite,
            schema: "evbus".to_owned(),
            max_connections: 5,
            poll_interval: Duration::from_millis(250),
            retention: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
            anonymous_ttl: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            max_payload_bytes: 16 * 1024 * 1024,
        }
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &evbus::registry::redact(&self.url))
            .field("backend", &self.backend)
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("poll_interval", &self.poll_interval)
            .field("retention", &self.retention)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("anonymous_ttl", &self.anonymous_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .finish()
    }
}

/// The URL query parameters of [`SqlConfig`] (equal to its serde field names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqlConfigKey {
    /// [`SqlConfig::schema`] (PostgreSQL only).
    Schema,
    /// [`SqlConfig::max_connections`].
    MaxConnections,
    /// [`SqlConfig::poll_interval`].
    PollIntervalMs,
    /// [`SqlConfig::retention`].
    RetentionMs,
    /// [`SqlConfig::cleanup_interval`].
    CleanupIntervalMs,
    /// [`SqlConfig::anonymous_ttl`].
    AnonymousTtlMs,
    /// [`SqlConfig::connect_timeout`].
    ConnectTimeoutMs,
    /// [`SqlConfig::max_payload_bytes`].
    MaxPayloadBytes,
}

impl ConfigKey for SqlConfigKey {
    const ADAPTER: &'static str = "SQL";
    const ALL: &'static [Self] = &[
        SqlConfigKey::Schema,
        SqlConfigKey::MaxConnections,
        SqlConfigKey::PollIntervalMs,
        SqlConfigKey::RetentionMs,
        SqlConfigKey::CleanupIntervalMs,
        SqlConfigKey::AnonymousTtlMs,
        SqlConfigKey::ConnectTimeoutMs,
        SqlConfigKey::MaxPayloadBytes,
    ];

    fn name(self) -> &'static str {
        match self {
            SqlConfigKey::Schema => "schema",
            SqlConfigKey::MaxConnections => "max_connections",
            SqlConfigKey::PollIntervalMs => "poll_interval_ms",
            SqlConfigKey::RetentionMs => "retention_ms",
            SqlConfigKey::CleanupIntervalMs => "cleanup_interval_ms",
            SqlConfigKey::AnonymousTtlMs => "anonymous_ttl_ms",
            SqlConfigKey::ConnectTimeoutMs => "connect_timeout_ms",
            SqlConfigKey::MaxPayloadBytes => "max_payload_bytes",
        }
    }
}

const SQLITE_FORM: &str = "sqlite:///absolute/path/bus.db or sqlite:relative/path/bus.db";
const POSTGRES_FORM: &str = "postgres://[user[:password]@]host[:port]/database";

impl SqlConfig {
    /// Reads a `postgres://`, `postgresql://` or `sqlite:` URL. The transport's own settings
    /// travel as query parameters and are removed from [`url`](Self::url): `schema`,
    /// `max_connections`, `poll_interval_ms`, `retention_ms`, `cleanup_interval_ms`,
    /// `anonymous_ttl_ms`, `connect_timeout_ms`, `max_payload_bytes`. An unknown parameter is
    /// an error listing the valid ones.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |form: &str| {
            Error::invalid_config(format!(
                "`{}` is not an SQL transport URL: write {form}",
                evbus::registry::redact(url)
            ))
        };
        let parsed = Url::parse(url).map_err(|_| {
            if url.starts_with("sqlite") {
                bad(SQLITE_FORM)
            } else {
                bad(POSTGRES_FORM)
            }
        })?;
        Self::from_parsed_url(&parsed)
    }

    /// Like [`from_url`](Self::from_url), for an already parsed URL.
    pub fn from_parsed_url(url: &Url) -> Result<Self> {
        let shown = evbus::registry::redact(url.as_str());
        let bad = |form: &str, why: &str| {
            Error::invalid_config(format!(
                "`{shown}` is not an SQL transport URL ({why}): write {form}"
            ))
        };
        let mut config = SqlConfig::default();
        match url.scheme() {
            "postgres" | "postgresql" => {
                config.backend = Backend::Postgres;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad(POSTGRES_FORM, "no host"));
                }
            }
            "sqlite" => {
                config.backend = Backend::Sqlite;
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad(
                        SQLITE_FORM,
                        "`sqlite://NAME/...` names a host; three slashes for an absolute path",
                    ));
                }
                let path = url.path();
                if path.is_empty() || path == "/" || path.ends_with('/') {
                    return Err(bad(SQLITE_FORM, "no database file"));
                }
                if path == ":memory:" || url.query().is_some_and(|q| q.contains("mode=memory")) {
                    return Err(Error::invalid_config(
                        "an in-memory SQLite database is not supported by the SQL transport (it \
                         would not be durable): use memory:// for an in-process bus, or \
                         sqlite:///path/to/bus.db",
                    ));
                }
            }
            other => {
                return Err(Error::invalid_config(format!(
                    "`{other}:` is not an SQL transport URL; use postgres://, postgresql:// or \
                     sqlite:"
                )));
            }
        }
        for (name, value) in url.query_pairs() {
            use SqlConfigKey as K;
            let key = K::parse(&name)?;
            let millis = || parse_millis(key, &value);
            match key {
                K::Schema => config.schema = value.clone().into_owned(),
                K::MaxConnections => config.max_connections = parse_value(key, &value)?,
                K::PollIntervalMs => config.poll_interval = millis()?,
                K::RetentionMs => config.retention = millis()?,
                K::CleanupIntervalMs => config.cleanup_interval = millis()?,
                K::AnonymousTtlMs => config.anonymous_ttl = millis()?,
                K::ConnectTimeoutMs => config.connect_timeout = millis()?,
                K::MaxPayloadBytes => config.max_payload_bytes = parse_value(key, &value)?,
            }
        }
        let mut database_url = url.clone();
        database_url.set_query(None);
        config.url = database_url.to_string();
        config.validate()?;
        Ok(config)
    }

    /// The database file of an SQLite configuration (percent-decoded), `None` for PostgreSQL.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        if self.backend != Backend::Sqlite {
            return None;
        }
        let url = Url::parse(&self.url).ok()?;
        let path = percent_decode(url.path());
        Some(PathBuf::from(path))
    }

    /// Checks that the settings are usable; [`SqlTransport::connect`](crate::SqlTransport::connect)
    /// calls it.
    pub fn validate(&self) -> Result<()> {
        let scheme = self.url.split(':').next().unwrap_or("");
        let expected = match self.backend {
            Backend::Postgres => matches!(scheme, "postgres" | "postgresql"),
            Backend::Sqlite => scheme == "sqlite",
        };
        if !expected {
            return Err(Error::invalid_config(format!(
                "SqlConfig::url `{}` does not match the backend {:?}",
                evbus::registry::redact(&self.url),
                self.backend
            )));
        }
        // Lower case only: the schema is created quoted but named unquoted in `search_path`
        // (and in the NOTIFY channel), where PostgreSQL folds it to lower case, so `Bus1`
        // would create one schema and use another.
        if self.schema.is_empty()
            || self.schema.len() > 40
            || !self
                .schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || self.schema.starts_with(|c: char| c.is_ascii_digit())
        {
            let hint = if self.schema.chars().any(|c| c.is_ascii_uppercase()) {
                format!(
                    " (PostgreSQL folds unquoted names to lower case: write `{}`)",
                    self.schema.to_ascii_lowercase()
                )
            } else {
                String::new()
            };
            return Err(Error::invalid_config(format!(
                "SQL transport schema `{}`: use 1 to 40 lower-case letters, digits and `_`, not \
                 starting with a digit{hint}",
                self.schema
            )));
        }
        if self.max_connections == 0 {
            return Err(Error::invalid_config(
                "SQL transport max_connections must be at least 1",
            ));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return Err(Error::invalid_config(format!(
                "SQL transport max_payload_bytes must be between 1 and {MAX_PAYLOAD_LIMIT}, got {}",
                self.max_payload_bytes
            )));
        }
        check_positive(&[
            ("poll_interval_ms", self.poll_interval),
            ("cleanup_interval_ms", self.cleanup_interval),
            ("anonymous_ttl_ms", self.anonymous_ttl),
            ("connect_timeout_ms", self.connect_timeout),
        ])
    }
}

/// Decodes `%XX` escapes of a URL path (invalid escapes are kept as written).
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_keep_the_transport_parameters_apart() {
        let config =
            SqlConfig::from_url("postgresql://u:p@localhost/db?schema=s1&poll_interval_ms=50")
                .unwrap();
        assert_eq!(config.backend, Backend::Postgres);
        assert_eq!(config.url, "postgresql://u:p@localhost/db");
        assert_eq!(config.poll_interval, Duration::from_millis(50));
    }

    #[test]
    fn sqlite_paths_absolute_relative_and_escaped() {
        let abs = SqlConfig::from_url("sqlite:///tmp/a%20b/bus.db").unwrap();
        assert_eq!(abs.sqlite_path().unwrap(), PathBuf::from("/tmp/a b/bus.db"));
        let rel = SqlConfig::from_url("sqlite:data/bus.db").unwrap();
        assert_eq!(rel.sqlite_path().unwrap(), PathBuf::from("data/bus.db"));
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        let cases = [
            ("sqlite://data/bus.db", "names a host"),
            ("sqlite:///", "no database file"),
            ("sqlite::memory:", "in-memory SQLite"),
            ("postgres:///db", "no host"),
            ("mysql://h/db", "use postgres://"),
            ("postgres://h/db?retention=5", "valid keys are: schema"),
            (
                "postgres://h/db?retention_ms=soon",
                "`retention_ms`: bad value",
            ),
            ("postgres://h/db?schema=a-b", "schema `a-b`"),
            (
                "postgres://h/db?schema=Bus1",
                "lower-case letters, digits and `_`, not starting with a digit (PostgreSQL \
                 folds unquoted names to lower case: write `bus1`)",
            ),
            (
                "postgres://h/db?poll_interval_ms=0",
                "poll_interval_ms must be at least 1 ms",
            ),
            (
                "postgres://h/db?max_connections=0",
                "max_connections must be at least 1",
            ),
        ];
        for (url, want) in cases {
            let err = SqlConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), evbus::ErrorKind::InvalidConfig, "{url}");
            assert!(err.message().contains(want), "{url}: {err}");
        }
    }
}
