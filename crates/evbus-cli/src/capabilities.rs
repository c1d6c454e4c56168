//! `evbus capabilities --transport URL`: what a transport declares, as one line of JSON.
//!
//! The values come from the live transport, because several depend on its URL (the memory
//! transport's `max_payload_bytes`) or on what the broker reports when it connects (Redis
//! persistence, NATS `max_payload`). `cargo xtask capabilities` runs this command for every
//! adapter to regenerate the matrix in docs/capabilities.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use evbus::Health;
use serde_json::json;

use crate::failure::Failure;
use crate::out::outln;
use crate::transport;

/// How long the broker may take to answer the health check after connecting.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// `evbus capabilities` arguments.
#[derive(Debug, Args)]
pub(crate) struct CapabilitiesArgs {
    #[arg(
        long,
        value_name = "URL",
        env = transport::TRANSPORT_ENV,
        hide_env_values = true,
        help = transport::transport_help()
    )]
    transport: String,
}

/// Runs `evbus capabilities`: prints
/// `{"transport":"redis","capabilities":[{"name":"replay","value":"true"},...]}` (the rows of
/// `Capabilities::rows()`, in their order) on stdout. Exit status 0 printed; 2 the transport
/// could not be opened or its broker is not healthy.
pub(crate) fn run(args: CapabilitiesArgs) -> Result<ExitCode, Failure> {
    transport::check(&args.transport)?;
    let rt = transport::runtime()?;
    rt.block_on(async {
        let transport = transport::connect(&args.transport).await?;
        // Some adapters connect lazily; the declaration of an unreachable broker is not the
        // broker's (NATS reads its limit from the server), so it is refused.
        let health = tokio::time::timeout(HEALTH_TIMEOUT, transport.health())
            .await
            .unwrap_or_else(|_| {
                Health::Unhealthy(format!(
                    "no answer to the health check within {}s",
                    HEALTH_TIMEOUT.as_secs()
                ))
            });
        if !health.is_healthy() {
            let _ = transport.close().await;
            return Err(Failure::new(format!(
                "broker unreachable: the `{}` transport is not healthy ({health:?}); start the \
                 broker (`cargo xtask brokers --start`) or check the URL",
                transport.name()
            )));
        }
        let rows: Vec<_> = transport
            .capabilities()
            .rows()
            .into_iter()
            .map(|(name, value)| json!({ "name": name, "value": value }))
            .collect();
        let line = json!({ "transport": transport.name(), "capabilities": rows });
        transport
            .close()
            .await
            .map_err(|e| Failure::new(format!("closing the transport: {e}")))?;
        outln!("{line}")?;
        Ok(ExitCode::SUCCESS)
    })
}
