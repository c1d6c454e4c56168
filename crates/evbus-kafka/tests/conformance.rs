//! The conformance suite against Kafka.
//!
//! Most cases run against the broker at `EVBUS_KAFKA_URL` (default `kafka://127.0.0.1:9092`,
//! the tansu `cargo xtask brokers --start` runs). The outage cases run against a tansu this
//! harness starts itself on a free port, behind a TCP proxy it owns: tansu's usable build
//! keeps data in memory only, so instead of restarting the broker the proxy drops every
//! connection and refuses new ones during the outage. Without a tansu binary (see
//! `support::tansu_binary`) those cases are reported `IGNORED ...: needs broker-control`.

mod support;

use std::process::ExitCode;

use async_trait::async_trait;
use evbus_conformance::{BrokerControl, Suite};
use evbus_kafka::KafkaTransport;
use support::{TansuBehindProxy, kafka_url, test_config};

fn main() -> ExitCode {
    let url = kafka_url();
    evbus_conformance::main(move || {
        let suite = Suite::new("kafka", move || {
            let url = url.clone();
            async move { KafkaTransport::connect(test_config(&url)?).await }
        });
        let started = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(TansuBehindProxy::start())
        });
        match started {
            Ok(broker) => suite.with_broker_control(Controlled(broker)),
            Err(e) => {
                eprintln!("WARNING: cannot start a tansu behind a proxy for the outage cases: {e}");
                suite
            }
        }
    })
}

/// The harness's own tansu, cut off and let through by its proxy.
struct Controlled(TansuBehindProxy);

#[async_trait]
impl BrokerControl for Controlled {
    type Transport = KafkaTransport;

    async fn connect(&self) -> evbus::Result<KafkaTransport> {
        let url = format!("{}?operation_timeout_ms=5000", self.0.url());
        KafkaTransport::connect(test_config(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        self.0.proxy.cut();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        self.0.proxy.restore();
        Ok(())
    }
}
