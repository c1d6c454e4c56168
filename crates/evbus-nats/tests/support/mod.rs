//! Test helpers shared by the integration tests: a `nats-server` process the test owns.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use evbus_conformance::process::BrokerProcess;

/// The nats-server binary: `EVBUS_NATS_SERVER`, else `/usr/sbin/nats-server` if present, else
/// `nats-server` on `PATH`.
fn binary() -> String {
    if let Ok(path) = std::env::var("EVBUS_NATS_SERVER") {
        return path;
    }
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        return "/usr/sbin/nats-server".to_owned();
    }
    "nats-server".to_owned()
}

/// The extra configuration file, in the server's data directory.
const CONFIG_FILE: &str = "nats-server.conf";

/// A `nats-server -js` process with a file store in its data directory, owned by this
/// harness (spawn, kill, restart: see [`BrokerProcess`]).
pub struct NatsServer(BrokerProcess);

impl NatsServer {
    pub fn start() -> std::io::Result<Self> {
        Self::start_inner(None)
    }

    /// Starts a server that also reads `config` (nats-server configuration syntax).
    pub fn start_with_config(config: &str) -> std::io::Result<Self> {
        Self::start_inner(Some(config))
    }

    fn start_inner(config: Option<&str>) -> std::io::Result<Self> {
        let process = BrokerProcess::builder("nats-server", |dir, port| {
            let mut command = Command::new(binary());
            let config = dir.join(CONFIG_FILE);
            if config.exists() {
                command.arg("-c").arg(config);
            }
            command
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
                .arg("-sd")
                .arg(dir.join("store"))
                .arg("-l")
                .arg(dir.join("nats-server.log"));
            command
        })
        .ready_when(Duration::from_secs(30), greets_a_client)
        .build()?;
        if let Some(text) = config {
            std::fs::write(process.data_dir().join(CONFIG_FILE), text)?;
        }
        process.restart()?;
        Ok(NatsServer(process))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }
}

/// Whether the server greets a client with `INFO` (JetStream has recovered its store by then:
/// the server opens the client port after enabling JetStream).
fn greets_a_client(port: u16) -> std::io::Result<bool> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info)?;
    Ok(info.starts_with("INFO"))
}

impl std::ops::Deref for NatsServer {
    type Target = BrokerProcess;

    fn deref(&self) -> &BrokerProcess {
        &self.0
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}
