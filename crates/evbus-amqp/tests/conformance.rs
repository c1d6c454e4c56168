//! The conformance suite against RabbitMQ.
//!
//! Most cases run against the broker at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). The outage cases run against a RabbitMQ node
//! this harness starts itself (node `evbus-ct-<port>@localhost`, free AMQP and distribution
//! ports, data and logs in a temporary directory, no plugins), kills with SIGKILL to
//! interrupt, and restarts on the same ports and data directory to resume. The node starts
//! once for the whole run (a start takes about 10 s). Without `rabbitmq-server` those cases
//! are reported `IGNORED ...: needs broker-control`.

mod support;

use std::process::ExitCode;

use async_trait::async_trait;
use evbus_amqp::{AmqpConfig, AmqpTransport};
use evbus_conformance::{BrokerControl, Suite};
use support::{RabbitNode, io_error};

fn main() -> ExitCode {
    let url = std::env::var("EVBUS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    evbus_conformance::main(move || {
        let suite = Suite::new("amqp", move || {
            let url = url.clone();
            async move { AmqpTransport::connect(AmqpConfig::from_url(&url)?).await }
        });
        match tokio::task::block_in_place(RabbitNode::start) {
            Ok(node) => suite.with_broker_control(node),
            Err(e) => {
                eprintln!("WARNING: cannot start a RabbitMQ node for the outage cases: {e}");
                suite
            }
        }
    })
}

#[async_trait]
impl BrokerControl for RabbitNode {
    type Transport = AmqpTransport;

    async fn connect(&self) -> evbus::Result<AmqpTransport> {
        let url = format!(
            "{}?reconnect_max_delay_ms=1000&command_timeout_ms=5000&connect_timeout_ms=2000",
            self.url()
        );
        AmqpTransport::connect(AmqpConfig::from_url(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL: no clean shutdown. A quorum queue confirms a message only once it is
        // fsynced, so everything confirmed is on disk. Only Ra's name registry is synced
        // first: RabbitMQ 3.10 writes it lazily, and a quorum queue declared a moment before
        // the kill would otherwise come back without a leader, for good (a broker bug fixed
        // in later versions; see `RabbitNode::sync_ra_registry` and the README).
        tokio::task::block_in_place(|| {
            self.sync_ra_registry()
                .map_err(|e| io_error("syncing the RabbitMQ node's Ra registry", e))?;
            self.kill();
            Ok(())
        })
    }

    async fn resume(&self) -> evbus::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn()
            .map_err(|e| io_error("restarting the RabbitMQ node", e))?;
        tokio::task::block_in_place(|| self.wait_ready())
            .map_err(|e| io_error("waiting for the RabbitMQ node", e))
    }
}
