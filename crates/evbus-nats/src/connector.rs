//! [`NatsConnector`]: `nats://` and `tls://` URLs for [`evbus::Registry`].

use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Connector, Result, Transport};
use url::Url;

use crate::config::NatsConfig;
use crate::transport::NatsTransport;

/// Opens [`NatsTransport`]s for `nats://` and `tls://` URLs (see [`NatsConfig::from_url`] for
/// the query parameters).
///
/// ```no_run
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::new();
/// registry.register(evbus_nats::NatsConnector);
/// let transport = registry.connect("nats://127.0.0.1:4222?stream_prefix=SHOP").await?;
/// assert_eq!(transport.name(), "nats");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NatsConnector;

/// The URL schemes of [`NatsConnector`].
pub const URL_SCHEMES: &[&str] = &["nats", "tls"];

#[async_trait]
impl Connector for NatsConnector {
    fn schemes(&self) -> &'static [&'static str] {
        URL_SCHEMES
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        let config = NatsConfig::from_parsed_url(url)?;
        Ok(Arc::new(NatsTransport::connect(config).await?))
    }

    fn more_hosts_parameter(&self) -> Option<&'static str> {
        Some("servers")
    }
}
