#![doc = include_str!("../README.md")]

mod capabilities;
mod config;
mod connection;
mod consumer;
mod error;
mod message;
mod names;
mod publisher;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Connector, Result, Transport};
use url::Url;

pub use config::{AmqpConfig, AmqpConfigKey, MAX_PAYLOAD_LIMIT};
pub use consumer::SPARE_RETURNS;
pub use transport::AmqpTransport;

/// The URL schemes of [`AmqpConnector`].
pub const URL_SCHEMES: &[&str] = &["amqp", "amqps"];

/// The prefix of CloudEvents attribute headers this adapter writes (the AMQP binding's
/// JMS-safe form; `cloudEvents:` is accepted when reading).
pub const HEADER_PREFIX: &str = message::PREFIX;

/// The header on a message a consumer published again to retry it: the handler attempts made
/// before that copy (a long-long integer). A message without it starts at attempt 1.
pub const ATTEMPTS_HEADER: &str = message::ATTEMPTS_HEADER;

/// Opens [`AmqpTransport`]s for `amqp://` and `amqps://` URLs (see
/// [`AmqpConfig::from_url`] for the query parameters).
///
/// ```no_run
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::new();
/// registry.register(evbus_amqp::AmqpConnector);
/// let transport = registry.connect("amqp://guest:guest@127.0.0.1:5672/%2f?prefix=shop.").await?;
/// assert_eq!(transport.name(), "amqp");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct AmqpConnector;

#[async_trait]
impl Connector for AmqpConnector {
    fn schemes(&self) -> &'static [&'static str] {
        URL_SCHEMES
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        let config = AmqpConfig::from_parsed_url(url)?;
        Ok(Arc::new(AmqpTransport::connect(config).await?))
    }

    fn more_hosts_parameter(&self) -> Option<&'static str> {
        Some("servers")
    }
}
