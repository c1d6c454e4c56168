#![doc = include_str!("../README.md")]
// Doc comments double as `--help` text, where `<type>` is meant literally.
#![allow(rustdoc::invalid_html_tags)]
// Layout: one module per subcommand group (`events` today; `serve`, `keys`, `emit`, `consume`
// join it as their crates land). Exit codes are shared by every command: see `failure`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod events;
mod failure;

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
}

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's own convention, which matches ours).
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Events(cmd) => events::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}
