//! `evbus keys create`: bootstrap API keys without HTTP (the first admin key).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use evbus_gateway::RateLimit;

use crate::failure::Failure;
use crate::out::outln;
use crate::transport;

/// `evbus keys` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create an API key in the gateway's state and print it (only the key) on stdout.
    ///
    /// The key is shown this once: only a hash of it is stored.
    Create(CreateArgs),
}

/// `evbus keys create` arguments.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The gateway's data directory (its SQLite state), as given to `evbus serve`.
    #[arg(long, value_name = "DIR", default_value = "./.evbus")]
    data_dir: PathBuf,
    /// The gateway's store, as given to `evbus serve --store` (a postgres:// URL); also
    /// EVBUS_STORE. Default: the SQLite state in --data-dir.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// A name for the key (who or what uses it).
    #[arg(long)]
    name: String,
    /// Event types the key may subscribe to: names or `*` patterns, comma separated.
    #[arg(long, value_name = "T1,T2", value_delimiter = ',')]
    subscribe: Vec<String>,
    /// Event types the key may publish: names or `*` patterns, comma separated.
    #[arg(long, value_name = "T1,T2", value_delimiter = ',')]
    publish: Vec<String>,
    /// A CloudEvents `source` the key's published events may carry: exact (`/shop`), or a
    /// pattern with `*` for any run of characters (`https://shop.example/*`; `*` alone: any
    /// source). Repeat it for several. Required with --publish: a key publishes only as the
    /// producers it is made for.
    #[arg(long = "source", value_name = "SOURCE")]
    sources: Vec<String>,
    /// The key may manage keys (`/v1/keys`) and read `/metrics`.
    #[arg(long)]
    admin: bool,
    /// When the key stops working (RFC 3339, for example 2030-01-01T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The key's own request rate limit, in requests per second (sustained, 1 to 1000000).
    /// Default: the gateway's (`evbus serve --rate-limit`).
    #[arg(long, value_name = "N")]
    rate_limit: Option<u64>,
    /// The key's own burst (1 to 1000000; default twice --rate-limit). Needs --rate-limit.
    #[arg(
        long = "rate-limit-burst",
        visible_alias = "burst",
        value_name = "N",
        requires = "rate_limit"
    )]
    rate_limit_burst: Option<u64>,
    /// The key's own publish byte rate: bytes of event bodies it may publish per second
    /// through `POST /v1/events` (1 to 1073741824). Default: the gateway's
    /// (`evbus serve --publish-bytes-per-second`).
    #[arg(
        long,
        value_name = "BYTES",
        value_parser = clap::value_parser!(u64)
            .range(1..=evbus_gateway::store::MAX_PUBLISH_BYTES_PER_SECOND)
    )]
    publish_bytes_per_second: Option<u64>,
    /// The event catalogue the gateway serves (as given to `evbus serve --schemas`): each
    /// scope pattern that matches none of its external event types is reported on stderr
    /// (the key is created all the same).
    #[arg(long, value_name = "DIR")]
    schemas: Option<PathBuf>,
}

pub(crate) fn run(cmd: KeysCommand) -> Result<ExitCode, Failure> {
    match cmd {
        KeysCommand::Create(args) => create(args),
    }
}

fn create(args: CreateArgs) -> Result<ExitCode, Failure> {
    // Checked before the store is touched: a bad value creates nothing.
    let rate_limit = match args.rate_limit {
        None => None,
        Some(per_second) => {
            let burst = args
                .rate_limit_burst
                .unwrap_or_else(|| RateLimit::default_burst(per_second));
            Some(
                RateLimit::new(per_second, burst)
                    .map_err(|e| Failure::new(format!("--rate-limit, --rate-limit-burst: {e}")))?,
            )
        }
    };
    let publish: Vec<&str> = args
        .publish
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if !publish.is_empty() && args.sources.is_empty() {
        return Err(Failure::new(
            "--publish needs at least one --source: the CloudEvents `source` values the key's \
             events may carry (such as --source /shop or --source 'https://shop.example/*'; \
             --source '*' allows any)",
        ));
    }
    let visibility = match &args.schemas {
        Some(dir) => Some(evbus_gateway::Visibility::new(transport::catalog(dir)?)),
        None => None,
    };
    let rt = transport::runtime()?;
    rt.block_on(async {
        let location = crate::serve::store_location(args.store.as_deref());
        // A key made in a data directory no gateway serves is refused by every gateway (run
        // from another directory, `.evbus` is another one): say so when the state is new.
        if location.is_none() && !args.data_dir.join(evbus_gateway::store::DB_FILE).exists() {
            eprintln!(
                "note: {} held no gateway state; it was created there. A gateway serving \
                 another --data-dir (or EVBUS_STORE) does not know this key.",
                args.data_dir.display()
            );
        }
        let store = evbus_gateway::store::open(location.as_deref(), &args.data_dir, None)
            .await
            .map_err(Failure::new)?;
        let trim = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let spec = evbus_gateway::KeySpec {
            name: args.name,
            subscribe: trim(args.subscribe),
            publish: trim(args.publish),
            sources: args.sources,
            admin: args.admin,
            expires_at: args.expires_at,
            rate_limit,
            publish_bytes_per_second: args.publish_bytes_per_second,
        };
        let (record, key) = evbus_gateway::create_key(store.as_ref(), spec)
            .await
            .map_err(Failure::new)?;
        for warning in visibility.iter().flat_map(|v| v.unmatched_scopes(&record)) {
            eprintln!("warning: {warning}");
        }
        if let Err(failure) = outln!("{key}") {
            // Shown this once and not shown at all (stdout closed by its reader, or an IO
            // error): no one has the key, so it is revoked rather than left active.
            let revoked = store.revoke_key(&record.id, chrono::Utc::now()).await;
            let what = match revoked {
                Ok(_) => "it was revoked".to_owned(),
                Err(e) => format!("revoking it failed too ({e}): revoke it by its id"),
            };
            // Written, not `eprintln!`: stderr may be the same closed pipe.
            let _ = writeln!(
                std::io::stderr(),
                "evbus: the key {} (\"{}\") was created but could not be printed; {what}",
                record.id,
                crate::printable::printable(&record.name)
            );
            return Err(failure);
        }
        drop(store);
        Ok(ExitCode::SUCCESS)
    })
}
