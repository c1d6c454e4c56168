//! Opening the NATS connection and the JetStream context.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use evbus::{Error, Result};

use crate::config::{NatsConfig, redact};
use crate::error::from_connect;

/// The delay before reconnection attempt `attempts` (1-based): 0, then 100 ms doubling up to
/// `max`.
pub(crate) fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(100).saturating_mul(1 << exp).min(max)
}

/// Connects to the server `config` names, or to any of its servers when it names several
/// (async-nats tries each, and later reconnects to any of them or to those the cluster
/// advertises). Fails with a retryable `Connection` error when no server can be reached, and
/// with `InvalidConfig` when credentials or TLS are wrong. `connected` counts the client's
/// connections (bumped at each reconnect).
pub(crate) async fn connect(
    config: &NatsConfig,
    connected: tokio::sync::watch::Sender<u64>,
) -> Result<Client> {
    let max_delay = config.reconnect_max_delay;
    let servers = config
        .server_urls()?
        .into_iter()
        .map(|url| {
            ServerAddr::from_url(url).map_err(|e| {
                Error::invalid_config(format!(
                    "`{}` is not a NATS server address: {e}",
                    redact(&config.url)
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let url = redact(&config.url);
    let log_url = url.clone();
    let mut options = ConnectOptions::new()
        .name("evbus")
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
        .event_callback(move |event| {
            let url = log_url.clone();
            if matches!(event, Event::Connected) {
                connected.send_modify(|n| *n += 1);
            }
            async move {
                match event {
                    Event::Disconnected => {
                        tracing::warn!(server = %url, "NATS connection lost; reconnecting")
                    }
                    Event::Connected => tracing::info!(server = %url, "NATS connected"),
                    Event::LameDuckMode => {
                        tracing::warn!(server = %url, "NATS server entering lame duck mode")
                    }
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(server = %url, sid, "NATS slow consumer: messages dropped client-side; they are redelivered after their visibility timeout")
                    }
                    Event::ServerError(e) => tracing::warn!(server = %url, error = %e, "NATS server error"),
                    Event::ClientError(e) => tracing::warn!(server = %url, error = %e, "NATS client error"),
                    Event::Draining | Event::Closed => {}
                }
            }
        });
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            Error::invalid_config(format!(
                "cannot read the NATS creds file `{}`: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if config.url.starts_with("tls://") {
        options = options.require_tls(true);
    }
    let what = format!("connecting to NATS at {url}");
    // Each server may take connect_timeout before the next one is tried.
    let attempts = u32::try_from(servers.len()).unwrap_or(u32::MAX);
    match tokio::time::timeout(
        config.connect_timeout.saturating_mul(attempts) + Duration::from_secs(1),
        options.connect(servers),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(from_connect(e, &what)),
        Err(_) => Err(Error::new(
            evbus::ErrorKind::Timeout,
            format!("{what}: no answer within {:?}", config.connect_timeout),
        )),
    }
}

/// The JetStream context of `client`, with `config`'s request timeout.
pub(crate) fn jetstream(client: Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .backpressure_on_inflight(true)
        .build(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_start_at_once_and_back_off_to_the_maximum() {
        let max = Duration::from_secs(2);
        assert_eq!(reconnect_delay(0, max), Duration::ZERO);
        assert_eq!(reconnect_delay(1, max), Duration::ZERO);
        assert_eq!(reconnect_delay(2, max), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(200));
        assert_eq!(reconnect_delay(10, max), max);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }
}
