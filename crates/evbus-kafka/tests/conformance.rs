//! The conformance suite against Kafka.
//!
//! Most cases run against the broker at `EVBUS_KAFKA_URL` (default `kafka://127.0.0.1:9092`,
//! the tansu `cargo xtask brokers --start` runs). The outage cases run against a tansu this
//! harness starts itself on a free port, behind a TCP proxy it owns: tansu's usable build
//! keeps data in memory only, so instead of restarting the broker the proxy drops every
//! connection and refuses new ones during the outage. Without a tansu binary (see
//! `support::tansu_binary`) those cases are reported `IGNORED ...: needs broker-control`.
//!
//! The foreign-message case writes with plain rdkafka: a record without `ce_` headers to the
//! queue's Kafka topic, which has the queue's name (README, "How evbus maps onto Kafka").

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::container::{
    self, BrokerContainer, ContainerControl, ContainerSpec, Outage,
};
use evbus_conformance::{BrokerControl, RawProducer, Suite};
use evbus_kafka::{KafkaConfig, KafkaTransport};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{TansuBehindProxy, kafka_url, test_config};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    evbus_conformance::main(|| match container::image_from_env() {
        Some(image) => in_containers(image),
        None => {
            let suite = suite(kafka_url(), None);
            let started = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(TansuBehindProxy::start())
            });
            match started {
                Ok(broker) => suite.with_broker_control(Controlled(broker)),
                Err(e) => {
                    eprintln!(
                        "WARNING: cannot start a tansu behind a proxy for the outage cases: {e}"
                    );
                    suite
                }
            }
        }
    })
}

/// The suite against the broker at `url`, with a raw producer. The suite keeps `container`
/// (the broker at `url` in container mode) until it is dropped, which removes it.
fn suite(url: String, container: Option<Arc<BrokerContainer>>) -> Suite<KafkaTransport> {
    let raw = RawKafka::new(&url);
    let suite = Suite::new("kafka", move || {
        let _owned = &container;
        let url = url.clone();
        async move { KafkaTransport::connect(test_config(&url)?).await }
    });
    match raw {
        Ok(raw) => suite.with_raw_producer(raw),
        Err(e) => {
            eprintln!("WARNING: no raw Kafka producer for the foreign-message case: {e}");
            suite
        }
    }
}

/// Container mode (`EVBUS_CONFORMANCE_IMAGE`, see `docker/tansu`): one container for the
/// suite, another for the outage cases. tansu keeps its data in memory, so the outage pauses
/// the container (every process frozen, its memory kept) instead of restarting it. tansu
/// advertises its own address, so each container listens on the same port inside as the
/// host port it is published on (`TANSU_PORT`).
fn in_containers(image: String) -> Suite<KafkaTransport> {
    let spec = ContainerSpec::new(image, 9092)
        .same_port_inside("TANSU_PORT")
        .outage(Outage::Pause);
    let mut started = container::start_or_exit("kafka", vec![spec.clone(), spec]);
    let controlled = started.pop().expect("two containers");
    let main = started.pop().expect("two containers");
    let url = format!("kafka://127.0.0.1:{}", main.host_port());
    println!(
        "container mode: the suite runs against {} at {url}",
        main.name()
    );
    let control = ContainerControl::new(controlled, |port| async move {
        let url = control_url(&format!("kafka://127.0.0.1:{port}"));
        KafkaTransport::connect(test_config(&url)?).await
    });
    suite(url, Some(Arc::new(main))).with_broker_control(control)
}

/// The URL of the controlled broker: a short operation timeout.
fn control_url(base: &str) -> String {
    format!("{base}?operation_timeout_ms=5000")
}

/// The harness's own tansu, cut off and let through by its proxy.
struct Controlled(TansuBehindProxy);

#[async_trait]
impl BrokerControl for Controlled {
    type Transport = KafkaTransport;

    async fn connect(&self) -> evbus::Result<KafkaTransport> {
        KafkaTransport::connect(test_config(&control_url(&self.0.url()))?).await
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

/// A foreign producer: a plain rdkafka producer writing a record that is not a CloudEvent
/// (no `ce_` headers, no key), no evbus involved.
struct RawKafka {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl RawKafka {
    fn new(url: &str) -> evbus::Result<Self> {
        let config = test_config(url)?;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("client.id", "evbus-conformance-raw-producer")
            .set("acks", "all")
            .set("message.timeout.ms", "20000")
            .set("log_level", "3");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let failed = |what: &str, e: rdkafka::error::KafkaError| {
            Error::new(
                ErrorKind::Internal,
                format!("creating the raw Kafka {what}: {e}"),
            )
        };
        Ok(RawKafka {
            producer: client.create().map_err(|e| failed("producer", e))?,
            admin: client.create().map_err(|e| failed("admin client", e))?,
            config,
        })
    }
}

#[async_trait]
impl RawProducer for RawKafka {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        // The README's mapping: queue `q` is the Kafka topic `q`, created by the adapter with
        // `partitions` partitions. Create it the same way in case no evbus client has yet.
        let topic = NewTopic::new(
            queue,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let created = self
            .admin
            .create_topics([&topic], &options)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("the raw Kafka producer could not create topic `{queue}`: {e}"),
                )
            })?;
        for result in created {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("the raw Kafka producer could not create topic `{queue}`: {code}"),
                    ));
                }
            }
        }
        let record = FutureRecord::<(), str>::to(queue).payload("not a cloudevent");
        self.producer
            .send(record, Duration::from_secs(20))
            .await
            .map_err(|(e, _)| {
                Error::new(
                    ErrorKind::Connection,
                    format!("the raw Kafka producer could not write to topic `{queue}`: {e}"),
                )
            })?;
        Ok(())
    }
}
