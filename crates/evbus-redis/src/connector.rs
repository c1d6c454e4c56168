//! [`RedisConnector`]: `redis://`, `rediss://`, `redis+cluster://` and `rediss+cluster://`
//! URLs for [`evbus::Registry`].

use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Connector, Result, Transport};
use url::Url;

use crate::config::RedisConfig;
use crate::transport::RedisTransport;

/// Opens [`RedisTransport`]s for `redis://` and `rediss://` URLs, and for Redis Clusters
/// `redis+cluster://` and `rediss+cluster://` (see [`RedisConfig::from_url`] for the query
/// parameters; the registry parses the URL as a standard URL first, so give a cluster's
/// other seed nodes in the `servers` parameter:
/// `redis+cluster://10.0.0.1:7000?servers=10.0.0.2:7000,10.0.0.3:7000`).
///
/// ```no_run
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::new();
/// registry.register(evbus_redis::RedisConnector);
/// let transport = registry.connect("redis://127.0.0.1:6379?prefix=shop:").await?;
/// assert_eq!(transport.name(), "redis");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisConnector;

/// The URL schemes of [`RedisConnector`].
pub const URL_SCHEMES: &[&str] = &["redis", "rediss", "redis+cluster", "rediss+cluster"];

#[async_trait]
impl Connector for RedisConnector {
    fn schemes(&self) -> &'static [&'static str] {
        URL_SCHEMES
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        let config = RedisConfig::from_parsed_url(url)?;
        Ok(Arc::new(RedisTransport::connect(config).await?))
    }

    fn more_hosts_parameter(&self) -> Option<&'static str> {
        Some("servers")
    }
}
