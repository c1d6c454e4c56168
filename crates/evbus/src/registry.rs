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
use crate::transport::Transport;

/// Opens transports for some URL schemes.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The URL schemes this connector handles (without `://`).
    fn schemes(&self) -> &'static [&'static str];

    /// Opens a transport for `url`.
    async fn connect(&self, url: &Url) -> Result<Arc<dyn Transport>>;
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

    /// Opens a transport for `url` with the connector of its scheme.
    pub async fn connect(&self, url: &str) -> Result<Arc<dyn Transport>> {
        let parsed = parse_url(url, "transport")?;
        let scheme = parsed.scheme();
        let connector = self
            .connectors
            .iter()
            .find(|c| c.schemes().contains(&scheme))
            .ok_or_else(|| {
                Error::invalid_config(format!(
                    "no transport for `{scheme}://` URLs; known schemes: {}. Add the adapter crate \
                     (evbus-{scheme}) and register its connector",
                    self.schemes().join(", ")
                ))
            })?;
        connector.connect(&parsed).await
    }
}

/// Parses `url`, or fails with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig):
/// "`URL` is not a `what` URL: why", the URL shown without its password.
pub fn parse_url(url: &str, what: &str) -> Result<Url> {
    Url::parse(url)
        .map_err(|e| Error::invalid_config(format!("`{}` is not a {what} URL: {e}", redact(url))))
}

/// A URL with its password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_schemes_name_the_known_ones() {
        let err = Registry::new()
            .connect("kafka://127.0.0.1:9092")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
        assert!(err.message().contains("memory"), "{err}");
        assert!(err.message().contains("evbus-kafka"), "{err}");
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(redact("redis://u:secret@h:1/"), "redis://u:***@h:1/");
        assert!(!redact("not a url secret").contains("secret"));
    }
}
