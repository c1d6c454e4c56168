#![doc = include_str!("../README.md")]
// Doc comments double as `--help` text, where `<type>` is meant literally.
#![allow(rustdoc::invalid_html_tags)]
// Layout: one module per subcommand group (`events`, `emit`, `consume`, `dlq`, `serve`,
// `keys`);
// `transport` holds what the commands share. Exit
// codes are shared by every command: see `failure`. Everything printed on stdout goes
// through `out` (a reader closing the pipe early is exit 141, not a panic).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

mod capabilities;
mod consume;
mod dlq;
mod emit;
mod events;
mod failure;
mod keys;
mod out;
mod payloads;
mod printable;
mod serve;
mod transport;

/// The evbus command-line tool.
#[derive(Debug, Parser)]
#[command(name = "evbus", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and check the event catalogue (a directory of JSON Schemas).
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Validate payloads of one event type and emit them; prints one event id per line.
    ///
    /// Exit status: 0 emitted; 1 a payload is invalid (violations on stderr, nothing
    /// emitted); 2 usage, IO, schema or transport error.
    Emit(emit::EmitArgs),
    /// Handle events of one type in a group, printing each as a one-line CloudEvent (JSON)
    /// as it is acknowledged; each event dead-lettered instead is reported on stderr
    /// (`evbus: dead-lettered <id>: <reason>`).
    ///
    /// Exit status: 0 after --count events (or at --timeout without --count); 1 the
    /// timeout passed first; 2 usage, schema or transport error; 141 stdout was closed by its
    /// reader (`| head`; the event whose line could not be written is not acked).
    Consume(consume::ConsumeArgs),
    /// List, show, redrive and discard the dead letters of one handler group.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Run the gateway: HTTP API with API keys, curated payloads, signed webhooks and
    /// Server-Sent Events. With no options: the durable SQLite transport and state in
    /// ./.evbus, schemas from examples/schemas, listening on 127.0.0.1:8080.
    Serve(serve::ServeArgs),
    /// Manage the gateway's API keys without HTTP (the first admin key).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Print what a transport declares (`Capabilities::rows()`) as one line of JSON, read
    /// from the live transport: some values depend on the URL or on the broker.
    ///
    /// Exit status: 0 printed; 2 the transport could not be opened or is not healthy.
    Capabilities(capabilities::CapabilitiesArgs),
}

/// Logs what the library and the adapters say (`tracing`) on stderr, filtered by `EVBUS_LOG`
/// or else by `default`. Without it a command would be silent about what only a log tells: a
/// dead-letter queue that cannot be written, a broker that keeps refusing, a retry.
pub(crate) fn log_to_stderr(default: &str) {
    log_to_stderr_quieting(default, false);
}

/// The default filter of every command but `serve`: warnings and errors only, the commands'
/// own output says the rest.
const COMMAND_LOG: &str = "warn,sqlx::postgres::notice=error";

/// [`log_to_stderr`]; with `dead_letters`, and unless `EVBUS_LOG` says otherwise, without the
/// handler's warning for each event it dead-letters (`dead-lettering an invalid event`,
/// carrying the reason), which `evbus consume` reports itself, once, on its own line (`evbus:
/// dead-lettered <id>: <reason>`). The handler's other warnings stay (a dead letter that
/// could not be written among them: then no line of `consume` reports it).
fn log_to_stderr_quieting(default: &str, dead_letters: bool) {
    let (filter, quiet) = match tracing_subscriber::EnvFilter::try_from_env("EVBUS_LOG") {
        Ok(filter) => (filter, false),
        Err(_) => (tracing_subscriber::EnvFilter::new(default), dead_letters),
    };
    let quieted = quiet.then(|| {
        tracing_subscriber::filter::filter_fn(|metadata| {
            !(metadata.target() == "evbus::bus::handler"
                && tracing_subscriber::filter::LevelFilter::WARN == *metadata.level()
                && metadata.fields().field("reason").is_some())
        })
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(quiet_secret_logs(filter))
        .with_writer(|| printable::Escaping(std::io::stderr()))
        .finish()
        .with(quieted)
        .try_init();
}

/// `filter` without the one log line that can show a store URL's secret: sqlx logs each query
/// parameter of a `postgres://` URL it does not know with its value (`?sslpassword=…`), at
/// `warn`. Added whatever `EVBUS_LOG` says (a more precise directive wins).
fn quiet_secret_logs(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    match "sqlx_postgres::options::parse=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's own convention, which matches ours).
    let cli = Cli::parse();
    match cli.command {
        // It logs more: see `serve::run`.
        Command::Serve(_) => {}
        Command::Consume(_) => log_to_stderr_quieting(COMMAND_LOG, true),
        _ => log_to_stderr(COMMAND_LOG),
    }
    let result = match cli.command {
        Command::Events(cmd) => events::run(cmd),
        Command::Emit(args) => emit::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Dlq(cmd) => dlq::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Keys(cmd) => keys::run(cmd),
        Command::Capabilities(args) => capabilities::run(args),
    };
    match result {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}
