//! Test helpers shared by the integration tests: a `redis-server` process the test owns.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use evbus_conformance::process::BrokerProcess;

/// A `redis-server` with an append-only file synced on every write, owned by this harness
/// (spawn, kill, restart: see [`BrokerProcess`]).
pub struct RedisServer(BrokerProcess);

impl RedisServer {
    pub fn start() -> std::io::Result<Self> {
        BrokerProcess::builder("redis-server", |dir, port| {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--save", ""])
                .arg("--dir")
                .arg(dir)
                .args(["--logfile", "redis.log"]);
            command
        })
        .ready_when(Duration::from_secs(30), answers_ping)
        .start()
        .map(RedisServer)
    }
}

/// Whether the server answers `PING` (it has loaded its append-only file by then).
fn answers_ping(port: u16) -> std::io::Result<bool> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 7];
    let n = stream.read(&mut reply)?;
    Ok(reply[..n].starts_with(b"+PONG"))
}

impl std::ops::Deref for RedisServer {
    type Target = BrokerProcess;

    fn deref(&self) -> &BrokerProcess {
        &self.0
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}
