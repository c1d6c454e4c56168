//! Shared by the `bus-worker` binary and the multi-process tests: the catalogue and the
//! Bus every process builds.

use std::sync::Arc;
use std::time::Duration;

use evbus::bus::{Bus, RetryPolicy};
use evbus::{Catalog, Transport};
use serde_json::json;

pub mod chaos;

/// The event type the workers handle.
pub const ORDER: &str = "itest.order";

/// `itest.order {seq: integer, flaky: boolean}`.
pub fn catalog() -> Catalog {
    let mut builder = Catalog::builder();
    builder
        .register_json(
            ORDER,
            json!({
                "type": "object",
                "properties": {"seq": {"type": "integer"}, "flaky": {"type": "boolean"}},
                "required": ["seq", "flaky"]
            }),
        )
        .expect("the test schema is valid");
    builder.freeze().expect("the test catalogue freezes")
}

/// A bus publishing [`ORDER`] to `topic`, with quick retries (50 ms, doubling) and a 2 s
/// visibility timeout, so a killed instance's events come back quickly.
pub fn bus(transport: Arc<dyn Transport>, topic: &str) -> Bus {
    Bus::builder(transport, catalog())
        .source("/evbus/integration-tests")
        .route([ORDER], topic)
        .retry(RetryPolicy::default().initial_backoff(Duration::from_millis(50)))
        .visibility_timeout(Duration::from_secs(2))
        .build()
}

/// `--name value` pairs (and bare `--flag`s, as `"1"`) of a chaos binary's command line.
pub fn flags(
    args: impl IntoIterator<Item = String>,
) -> Result<std::collections::HashMap<String, String>, String> {
    let mut out = std::collections::HashMap::new();
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        let name = arg
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument `{arg}` (expected --name value)"))?;
        let value = match args.peek() {
            Some(v) if !v.starts_with("--") => args.next().unwrap_or_default(),
            _ => "1".to_owned(),
        };
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}
