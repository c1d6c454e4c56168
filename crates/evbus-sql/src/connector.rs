//! [`SqlConnector`]: `postgres://`, `postgresql://` and `sqlite:` URLs for
//! [`evbus::Registry`].

use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Connector, Result, Transport};
use url::Url;

use crate::config::{SqlConfig, URL_SCHEMES};
use crate::transport::SqlTransport;

/// Opens [`SqlTransport`]s for `postgres://`, `postgresql://` and `sqlite:` URLs (see
/// [`SqlConfig::from_url`] for the query parameters).
///
/// ```no_run
/// # async fn demo() -> evbus::Result<()> {
/// let mut registry = evbus::Registry::new();
/// registry.register(evbus_sql::SqlConnector);
/// let transport = registry.connect("sqlite:///var/lib/evbus/bus.db").await?;
/// assert_eq!(transport.name(), "sqlite");
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SqlConnector;

#[async_trait]
impl Connector for SqlConnector {
    fn schemes(&self) -> &'static [&'static str] {
        URL_SCHEMES
    }

    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>> {
        let config = SqlConfig::from_parsed_url(url)?;
        Ok(Arc::new(SqlTransport::connect(config).await?))
    }
}
