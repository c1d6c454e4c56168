//! `evbus serve`: the gateway (HTTP API, webhooks, streams) on a transport and a catalogue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use evbus::Bus;
use evbus_gateway::{Gateway, GatewayConfig, OutboundPolicy, SecretsKey};
use ipnet::IpNet;

use crate::failure::Failure;
use crate::transport;

mod limits;

/// `evbus serve` arguments.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the gateway's state (SQLite: keys, webhooks, event log, attempts).
    #[arg(long, value_name = "DIR", default_value = "./.evbus")]
    data_dir: PathBuf,
    /// Where the gateway keeps its state: `sqlite` (DATA_DIR/gateway.sqlite3, one process) or
    /// postgres://USER@HOST:PORT/DATABASE[?schema=NAME] (default schema evbus_gateway), which
    /// several `evbus serve` instances on one broker share. Also EVBUS_STORE. Default sqlite.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Catalogue directory: DIR/events/<type>.json and DIR/definitions/<Name>.json.
    #[arg(long, value_name = "DIR", default_value = "examples/schemas")]
    schemas: PathBuf,
    /// Without it: `sqlite://<data-dir>/bus.db`, durable, for this one process.
    #[arg(
        long,
        value_name = "URL",
        env = transport::TRANSPORT_ENV,
        hide_env_values = true,
        help = serve_transport_help()
    )]
    transport: Option<String>,
    /// A network webhooks may reach although it is not public (loopback, private...), as a
    /// CIDR; repeatable. Also EVBUS_WEBHOOK_ALLOW, comma separated.
    #[arg(long = "webhook-allow", value_name = "CIDR")]
    webhook_allow: Vec<IpNet>,
    #[command(flatten)]
    limits: limits::Limits,
}

fn serve_transport_help() -> String {
    format!(
        "{}. Default: sqlite://DATA_DIR/bus.db (durable; one process per data directory; \
         give memory:// explicitly for an in-process bus that keeps nothing)",
        transport::transport_help()
    )
}

/// `--transport` or EVBUS_TRANSPORT; an empty value means the default, as an empty
/// EVBUS_STORE does.
fn given_transport(args: &ServeArgs) -> Option<&str> {
    args.transport.as_deref().filter(|u| !u.trim().is_empty())
}

/// The transport URL: `--transport`, else the SQLite file `bus.db` in the data directory
/// (`memory://`, with a warning, in a build without the `sql` feature).
fn transport_url(args: &ServeArgs) -> Result<String, Failure> {
    if let Some(url) = given_transport(args) {
        return Ok(url.to_owned());
    }
    if cfg!(not(feature = "sql")) {
        eprintln!(
            "warning: this evbus was built without the `sql` feature: serving on memory://, \
             which loses every event when the process stops"
        );
        return Ok("memory://".to_owned());
    }
    let dir = std::path::absolute(&args.data_dir).map_err(|e| {
        Failure::new(format!(
            "cannot resolve the data directory {}: {e}",
            args.data_dir.display()
        ))
    })?;
    let Some(path) = dir.join("bus.db").to_str().map(str::to_owned) else {
        return Err(Failure::new(format!(
            "the data directory {} is not valid UTF-8; give --transport sqlite:///PATH/bus.db",
            dir.display()
        )));
    };
    // Percent-encode what a URL would read as something else.
    let mut url = String::from("sqlite://");
    for c in path.chars() {
        match c {
            '%' => url.push_str("%25"),
            ' ' => url.push_str("%20"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    Ok(url)
}

/// The key sealing webhook secrets at rest: `EVBUS_SECRETS_KEY` (base64 or hex of 32 bytes).
fn secrets_key() -> Result<Option<SecretsKey>, Failure> {
    match std::env::var("EVBUS_SECRETS_KEY") {
        Ok(text) if !text.trim().is_empty() => SecretsKey::from_text(&text)
            .map(Some)
            .map_err(|e| Failure::new(format!("EVBUS_SECRETS_KEY: {e}"))),
        _ => Ok(None),
    }
}

/// Makes the data directory (0700) when the SQLite store did not (a PostgreSQL store with the
/// default bus, whose file lives there).
fn prepare_data_dir(dir: &std::path::Path) -> Result<(), Failure> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            Failure::new(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })
}

/// The store location: `--store`, else `EVBUS_STORE`, else the data directory's SQLite file.
pub(crate) fn store_location(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("EVBUS_STORE").ok())
        .filter(|s| !s.trim().is_empty())
}

/// Resolves once the process is asked to stop: Ctrl-C (SIGINT) or, on Unix, SIGTERM (what
/// `kill`, systemd, Docker and Kubernetes send). The handlers are installed by this call, so
/// from then on neither signal kills the process before it stops gracefully.
fn stop_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Failure::new(format!("cannot listen for {name}: {e}")))
        };
        let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
        let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
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
    // PostgreSQL's notices ("schema … already exists, skipping" on every start) are sqlx
    // `info` lines: shown only when `EVBUS_LOG` asks for them.
    crate::log_to_stderr("info,sqlx::postgres::notice=warn");
    let transport_url = transport_url(&args)?;
    transport::check(&transport_url)?;
    if !args.schemas.is_dir() {
        return Err(Failure::new(format!(
            "the schemas directory {} does not exist; give one with --schemas DIR (run from the repository root for the default, examples/schemas)",
            args.schemas.display()
        )));
    }
    let catalog = transport::catalog(&args.schemas)?;
    let allow = allow_list(&args)?;
    let mut config = GatewayConfig::default();
    config.outbound = OutboundPolicy::new(allow);
    args.limits.apply(&mut config).map_err(Failure::new)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let rt = transport::runtime()?;
    rt.block_on(async {
        let location = store_location(args.store.as_deref());
        let key = secrets_key()?;
        let sealed_secrets = key.is_some();
        let store = evbus_gateway::store::open(location.as_deref(), &args.data_dir, key)
            .await
            .map_err(Failure::new)?;
        let has_admin = store
            .list_keys()
            .await
            .map_err(Failure::new)?
            .iter()
            .any(|k| k.admin && k.revoked_at.is_none());
        if location.is_some() && given_transport(&args).is_none() {
            eprintln!(
                "warning: the store is shared but the bus is this process's own (sqlite in the data directory): several instances need one broker, given with --transport or EVBUS_TRANSPORT"
            );
            prepare_data_dir(&args.data_dir)?;
        }
        // After the store: it made the data directory (0700) where bus.db lives.
        let transport = transport::connect(&transport_url).await?;
        let bus = Bus::new(transport, catalog, "/evbus-gateway");
        let gateway =
            Gateway::start_with_metrics(bus.clone(), Arc::clone(&store), config, metrics)
                .await
                .map_err(Failure::new)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| Failure::new(format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr().map_err(Failure::new)?;
        // Listening for the signals before saying where it listens: a signal sent as soon as
        // that line is read stops the gateway gracefully instead of killing the process.
        let stop = stop_signal()?;
        eprintln!(
            "evbus gateway listening on http://{addr} (transport {}, schemas {}, state {})",
            evbus::registry::redact(&transport_url),
            args.schemas.display(),
            evbus_gateway::store::describe(location.as_deref(), &args.data_dir)
        );
        eprintln!("external event types: {}", gateway.visibility().external_types().join(", "));
        if !sealed_secrets {
            eprintln!(
                "webhook signing secrets are stored in clear; set EVBUS_SECRETS_KEY (32 bytes, e.g. `openssl rand -base64 32`) to seal them at rest"
            );
        }
        if !has_admin {
            let at = match &location {
                Some(_) => "--store URL".to_owned(),
                None => format!("--data-dir {}", args.data_dir.display()),
            };
            eprintln!(
                "no admin API key yet; create the first one with:\n  evbus keys create {at} --name admin --admin\n  (from the repository: cargo run -p evbus-cli -- keys create {at} --name admin --admin)"
            );
        }
        gateway
            .serve(listener, stop)
            .await
            .map_err(Failure::new)?;
        eprintln!("evbus gateway stopped");
        let _ = bus.shutdown(Duration::from_secs(10)).await;
        Ok(ExitCode::SUCCESS)
    })
}
