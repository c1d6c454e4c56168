//! Connections: one shared, multiplexed, self-reconnecting connection for commands
//! (publish, ack, group management), and one dedicated connection per consumer for its
//! blocking reads, so a `XREADGROUP ... BLOCK` never stalls other traffic.

use evbus::raw::Backoff;
use evbus::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Value};

use crate::config::RedisConfig;
use crate::error::from_redis;

/// Opens the client for `config.url` (no I/O yet).
pub(crate) fn client(config: &RedisConfig) -> Result<Client> {
    Client::open(config.url.as_str()).map_err(|e| {
        from_redis(
            e,
            &format!(
                "opening Redis client for `{}`",
                evbus::registry::redact(&config.url)
            ),
        )
    })
}

/// Connects the shared command connection. It reconnects by itself after a failure (the
/// failing command returns a retryable error; the next one uses the new connection).
pub(crate) async fn shared_connection(
    client: &Client,
    config: &RedisConfig,
) -> Result<ConnectionManager> {
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.command_timeout))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_min_delay(config.reconnect_min_delay)
        .set_max_delay(config.reconnect_max_delay)
        .set_number_of_retries(3);
    ConnectionManager::new_with_config(client.clone(), manager_config)
        .await
        .map_err(|e| {
            from_redis(
                e,
                &format!(
                    "connecting to Redis at `{}`",
                    evbus::registry::redact(&config.url)
                ),
            )
        })
}

/// A consumer's own connection for blocking reads, reconnected on demand.
pub(crate) struct BlockingConnection {
    client: Client,
    config: AsyncConnectionConfig,
    conn: Option<(MultiplexedConnection, i64)>,
}

impl BlockingConnection {
    pub(crate) fn new(client: Client, config: &RedisConfig) -> Self {
        // A blocking read legitimately waits `block` for its reply.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.block + config.command_timeout));
        BlockingConnection {
            client,
            config,
            conn: None,
        }
    }

    /// The connection, connecting first if needed.
    pub(crate) async fn get(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            let id: i64 = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut conn)
                .await?;
            self.conn = Some((conn, id));
        }
        match &mut self.conn {
            Some((conn, _)) => Ok(conn),
            None => unreachable!("connected above"),
        }
    }

    /// The server-side client id of the current connection (for `CLIENT UNBLOCK`).
    pub(crate) fn client_id(&self) -> Option<i64> {
        self.conn.as_ref().map(|(_, id)| *id)
    }

    /// Drops the current connection; the next [`get`](Self::get) reconnects.
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }
}

/// The reconnect backoff `config` asks for.
pub(crate) fn backoff(config: &RedisConfig) -> Backoff {
    Backoff::new(config.reconnect_min_delay, config.reconnect_max_delay)
}

/// Reads `INFO <section>` into `(field, value)` pairs.
pub(crate) async fn info(
    conn: &mut ConnectionManager,
    section: &str,
) -> Result<Vec<(String, String)>> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .map_err(|e| from_redis(e, &format!("reading INFO {section}")))?;
    Ok(parse_info(&text))
}

fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// `major.minor` of a `redis_version` string.
pub(crate) fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The oldest server the adapter supports: `XPENDING ... IDLE`, exclusive ranges and
/// `XGROUP CREATECONSUMER` arrived in Redis 6.2.
pub(crate) const MIN_VERSION: (u32, u32) = (6, 2);

/// Checks the server version from `INFO server`.
pub(crate) fn check_version(info: &[(String, String)]) -> Result<()> {
    let version = info
        .iter()
        .find(|(k, _)| k == "redis_version")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match parse_version(version) {
        Some(v) if v >= MIN_VERSION => Ok(()),
        _ => Err(Error::unsupported(format!(
            "Redis {version} is too old: evbus-redis needs Redis {}.{} or later",
            MIN_VERSION.0, MIN_VERSION.1
        ))),
    }
}

/// Bytes of a bulk or simple string reply.
pub(crate) fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// A string reply as UTF-8 (lossy).
pub(crate) fn string_of(value: &Value) -> Option<String> {
    bytes_of(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// An integer reply (also accepting integers sent as strings).
pub(crate) fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_become_pairs() {
        let text = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n";
        let info = parse_info(text);
        assert_eq!(info[0], ("redis_version".to_owned(), "7.0.15".to_owned()));
        check_version(&info).unwrap();
    }

    #[test]
    fn old_servers_are_refused_with_the_needed_version() {
        let info = vec![("redis_version".to_owned(), "6.0.9".to_owned())];
        let err = check_version(&info).unwrap_err();
        assert_eq!(err.kind(), evbus::ErrorKind::Unsupported);
        assert!(err.message().contains("6.2"), "{err}");
        assert_eq!(parse_version("6.2.14"), Some((6, 2)));
        assert_eq!(parse_version("x"), None);
    }
}
