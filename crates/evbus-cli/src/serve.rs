//! `evbus serve`: the gateway (HTTP API, webhooks, streams) on a transport and a catalogue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use evbus::Bus;
use evbus_gateway::{Gateway, GatewayConfig, OutboundPolicy, SqliteStore, Store};
use ipnet::IpNet;

use crate::failure::Failure;
use crate::transport;

/// `evbus serve` arguments.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the gateway's state (SQLite: keys, webhooks, event log, attempts).
    #[arg(long, value_name = "DIR", default_value = "./.evbus")]
    data_dir: PathBuf,
    /// Catalogue directory: DIR/events/<type>.json and DIR/definitions/<Name>.json.
    #[arg(long, value_name = "DIR", default_value = "examples/schemas")]
    schemas: PathBuf,
    #[arg(long, value_name = "URL", default_value = "memory://", help = transport::transport_help())]
    transport: String,
    /// A network webhooks may reach although it is not public (loopback, private...), as a
    /// CIDR; repeatable. Also EVBUS_WEBHOOK_ALLOW, comma separated.
    #[arg(long = "webhook-allow", value_name = "CIDR")]
    webhook_allow: Vec<IpNet>,
}

fn allow_list(args: &ServeArgs) -> Result<Vec<IpNet>, Failure> {
    let mut nets = args.webhook_allow.clone();
    if let Ok(env) = std::env::var("EVBUS_WEBHOOK_ALLOW") {
        for part in env.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            nets.push(part.parse().map_err(|e| {
                Failure::new(format!("EVBUS_WEBHOOK_ALLOW: `{part}` is not a CIDR: {e}"))
            })?);
        }
    }
    Ok(nets)
}

pub(crate) fn run(args: ServeArgs) -> Result<ExitCode, Failure> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EVBUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    transport::check(&args.transport)?;
    if !args.schemas.is_dir() {
        return Err(Failure::new(format!(
            "the schemas directory {} does not exist; give one with --schemas DIR (run from the repository root for the default, examples/schemas)",
            args.schemas.display()
        )));
    }
    let catalog = transport::catalog(&args.schemas)?;
    let allow = allow_list(&args)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let rt = transport::runtime()?;
    rt.block_on(async {
        let store = SqliteStore::open_dir(&args.data_dir)
            .await
            .map_err(Failure::new)?;
        let has_admin = store
            .list_keys()
            .await
            .map_err(Failure::new)?
            .iter()
            .any(|k| k.admin && k.revoked_at.is_none());
        let transport = transport::connect(&args.transport).await?;
        let bus = Bus::new(transport, catalog, "/evbus-gateway");
        let mut config = GatewayConfig::default();
        config.outbound = OutboundPolicy::new(allow);
        let gateway =
            Gateway::start_with_metrics(bus.clone(), Arc::new(store), config, metrics)
                .await
                .map_err(Failure::new)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| Failure::new(format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr().map_err(Failure::new)?;
        eprintln!(
            "evbus gateway listening on http://{addr} (transport {}, schemas {}, state {})",
            evbus::registry::redact(&args.transport),
            args.schemas.display(),
            args.data_dir.display()
        );
        eprintln!("external event types: {}", gateway.visibility().external_types().join(", "));
        if !has_admin {
            eprintln!(
                "no admin API key yet; create the first one with:\n  evbus keys create --data-dir {} --name admin --admin\n  (from the repository: cargo run -p evbus-cli -- keys create --data-dir {} --name admin --admin)",
                args.data_dir.display(),
                args.data_dir.display()
            );
        }
        gateway
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(Failure::new)?;
        eprintln!("evbus gateway stopped");
        let _ = bus.shutdown(Duration::from_secs(10)).await;
        Ok(ExitCode::SUCCESS)
    })
}
