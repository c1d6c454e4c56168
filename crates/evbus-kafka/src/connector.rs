//! [`KafkaConnector`]: `kafka://` URLs for [`evbus::Registry`].

use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Connector, Result, Transport};
use url::Url;

use crate::config::KafkaConfig;
use crate::transport::KafkaTransport;

/// Opens [`KafkaTransport`]s for `kafka://` URLs (see [`KafkaConfig::from_url`] for the query
/// parameters).
///
/// ```no_run
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::new();
/// registry.register(evbus_kafka::KafkaConnector);
/// let transport = registry.connect("kafka://127.0.0.1:9092?partitions=6").await?;
/// assert_eq!(transport.name(), "kafka");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaConnector;

/// The URL schemes of [`KafkaConnector`].
pub const URL_SCHEMES: &[&str] = &["kafka"];

#[async_trait]
impl Connector for KafkaConnector {
    fn schemes(&self) -> &'static [&'static str] {
        URL_SCHEMES
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        let config = KafkaConfig::from_parsed_url(url)?;
        Ok(Arc::new(KafkaTransport::connect(config).await?))
    }

    fn more_hosts_parameter(&self) -> Option<&'static str> {
        Some("brokers")
    }
}
