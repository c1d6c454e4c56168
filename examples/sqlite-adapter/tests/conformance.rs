//! The evbus conformance suite against the SQLite example adapter, on a fresh database file
//! in a temporary directory (or the one `EVBUS_SQLITE_EXAMPLE_URL` names).
//!
//! `cargo test -p evbus-example-sqlite --test conformance -- --list` lists the cases.

use evbus_conformance::Suite;

fn main() -> std::process::ExitCode {
    let dir = tempfile::tempdir().expect("a temporary directory for the database");
    let file = dir.path().join("evbus.db");
    let url = std::env::var("EVBUS_SQLITE_EXAMPLE_URL")
        .unwrap_or_else(|_| format!("sqlite-example://{}", file.display()));
    evbus_conformance::main(move || {
        Suite::new("sqlite-example", move || {
            let url = url.clone();
            async move { evbus_example_sqlite::connect(&url).await }
        })
    })
}
