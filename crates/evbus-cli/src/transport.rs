//! What `emit` and `consume` share: transport URLs, the catalogue, the runtime.

use std::path::Path;
use std::sync::Arc;

use evbus::{Catalog, Registry, Transport};

use crate::failure::Failure;

/// Help text for `--transport`.
pub(crate) const TRANSPORT_HELP: &str = "Transport URL: redis://HOST:PORT[/DB][?prefix=...] for Redis, or memory:// (in-process \
only: events vanish when the command exits, so it is useful only to check payloads)";

/// The URL schemes this binary can open.
pub(crate) fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register(evbus_redis::RedisConnector);
    registry
}

pub(crate) async fn connect(url: &str) -> Result<Arc<dyn Transport>, Failure> {
    registry()
        .connect(url)
        .await
        .map_err(|e| Failure::new(format!("cannot open transport: {e}")))
}

pub(crate) fn catalog(dir: &Path) -> Result<Catalog, Failure> {
    Ok(Catalog::from_dir(dir)?)
}

/// A multi-threaded tokio runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))
}
