//! The conformance suite against NATS JetStream.
//!
//! Most cases run against the server at `EVBUS_NATS_URL` (default `nats://127.0.0.1:4222`,
//! JetStream enabled). The outage cases run against a `nats-server -js` this harness starts
//! itself on a free port with a file store in a temporary directory, kills with SIGKILL to
//! interrupt, and restarts on the same port and store to resume. Without a `nats-server`
//! binary (`EVBUS_NATS_SERVER`, `/usr/sbin/nats-server` or on `PATH`) those cases are
//! reported `IGNORED ...: needs broker-control`.

mod support;

use std::process::ExitCode;

use async_trait::async_trait;
use evbus_conformance::{BrokerControl, Suite};
use evbus_nats::{NatsConfig, NatsTransport};
use support::{NatsServer, io_error};

fn main() -> ExitCode {
    let url =
        std::env::var("EVBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    evbus_conformance::main(move || {
        let suite = Suite::new("nats", move || {
            let url = url.clone();
            async move { NatsTransport::connect(NatsConfig::from_url(&url)?).await }
        });
        match NatsServer::start() {
            Ok(server) => suite.with_broker_control(server),
            Err(e) => {
                eprintln!("WARNING: cannot start a nats-server for the outage cases: {e}");
                suite
            }
        }
    })
}

#[async_trait]
impl BrokerControl for NatsServer {
    type Transport = NatsTransport;

    async fn connect(&self) -> evbus::Result<NatsTransport> {
        let url = format!(
            "{}?reconnect_max_delay_ms=250&request_timeout_ms=2000",
            self.url()
        );
        NatsTransport::connect(NatsConfig::from_url(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL: no chance to write anything more. Every message JetStream acknowledged
        // with a PubAck is already written to the file store (the OS keeps it).
        self.kill();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn()
            .map_err(|e| io_error("restarting nats-server", e))?;
        tokio::task::block_in_place(|| self.wait_ready())
            .map_err(|e| io_error("waiting for nats-server", e))
    }
}
