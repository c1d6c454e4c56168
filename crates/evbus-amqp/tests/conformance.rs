//! The conformance suite against RabbitMQ.
//!
//! Most cases run against the broker at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). The outage cases run against a RabbitMQ node
//! this harness starts itself (node `evbus-ct-<port>@localhost`, free AMQP and distribution
//! ports, data and logs in a temporary directory, no plugins), kills with SIGKILL to
//! interrupt, and restarts on the same ports and data directory to resume. The node starts
//! once for the whole run (a start takes about 10 s). Without `rabbitmq-server` those cases
//! are reported `IGNORED ...: needs broker-control`.
//!
//! The foreign message of `queue_undecodable_message_is_dead_lettered_and_does_not_block` is
//! written by [`LapinProducer`] with plain lapin, not through evbus.

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use evbus::ErrorKind;
use evbus_amqp::{AmqpConfig, AmqpTransport};
use evbus_conformance::container::{self, BrokerContainer, ContainerControl, ContainerSpec};
use evbus_conformance::{BrokerControl, RawProducer, Suite};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use support::{RabbitNode, SYNC_RA_REGISTRY, io_error};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    evbus_conformance::main(|| match container::image_from_env() {
        Some(image) => in_containers(image),
        None => {
            let url = std::env::var("EVBUS_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
            let suite = suite(url, None);
            match tokio::task::block_in_place(RabbitNode::start) {
                Ok(node) => suite.with_broker_control(node),
                Err(e) => {
                    eprintln!("WARNING: cannot start a RabbitMQ node for the outage cases: {e}");
                    suite
                }
            }
        }
    })
}

/// The suite against the broker at `url`, with a raw producer. The suite keeps `container`
/// (the broker at `url` in container mode) until it is dropped, which removes it.
fn suite(url: String, container: Option<Arc<BrokerContainer>>) -> Suite<AmqpTransport> {
    let producer = LapinProducer { url: url.clone() };
    // Against several nodes (a cluster, `cargo xtask conformance --adapter amqp-cluster`) the
    // suite reports as `amqp-cluster`.
    let nodes = AmqpConfig::from_url(&url)
        .and_then(|c| c.server_urls())
        .map_or(1, |servers| servers.len());
    let name = if nodes > 1 { "amqp-cluster" } else { "amqp" };
    Suite::new(name, move || {
        let _owned = &container;
        let url = url.clone();
        async move {
            let mut config = AmqpConfig::from_url(&url)?;
            // Every case deletes what it made: the tombstones go after ten minutes on the
            // shared broker, not a day.
            config.tombstone_ttl = std::time::Duration::from_secs(600);
            AmqpTransport::connect(config).await
        }
    })
    .with_raw_producer(producer)
}

/// Container mode (`EVBUS_CONFORMANCE_IMAGE`, see `docker/rabbitmq`): one container for the
/// suite, another for the outage cases, killed with SIGKILL and started again on its data,
/// after syncing Ra's name registry in it as for a local node (see `RabbitNode`).
fn in_containers(image: String) -> Suite<AmqpTransport> {
    let main = ContainerSpec::new(image, 5672);
    let controlled = main.clone().exec_before_interrupt(&[
        "rabbitmqctl",
        "-n",
        "rabbit@localhost",
        "eval",
        SYNC_RA_REGISTRY,
    ]);
    let mut started = container::start_or_exit("amqp", vec![main, controlled]);
    let controlled = started.pop().expect("two containers");
    let main = started.pop().expect("two containers");
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", main.host_port());
    println!(
        "container mode: the suite runs against {} at {url}",
        main.name()
    );
    let control = ContainerControl::new(controlled, |port| async move {
        let url = control_url(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        AmqpTransport::connect(AmqpConfig::from_url(&url)?).await
    });
    suite(url, Some(Arc::new(main))).with_broker_control(control)
}

/// The URL of the controlled broker: short timeouts and reconnection delays.
fn control_url(base: &str) -> String {
    format!("{base}?reconnect_max_delay_ms=1000&command_timeout_ms=5000&connect_timeout_ms=2000")
}

#[async_trait]
impl BrokerControl for RabbitNode {
    type Transport = AmqpTransport;

    async fn connect(&self) -> evbus::Result<AmqpTransport> {
        AmqpTransport::connect(AmqpConfig::from_url(&control_url(&self.url()))?).await
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
        tokio::task::block_in_place(|| self.restart())
            .map_err(|e| io_error("restarting the RabbitMQ node", e))
    }
}

/// A foreign producer: plain lapin, no evbus. It publishes one message that is not a
/// CloudEvent (body `not a cloudevent`, no headers at all) to the default exchange with the
/// routing key of the evbus queue, named the way the README's mapping says.
struct LapinProducer {
    /// The evbus URL of the suite's transport (its adapter parameters are read, not sent).
    url: String,
}

/// The RabbitMQ queue behind evbus queue `queue`, as the README documents it: `<prefix>` then
/// the name with every byte other than ASCII letters, digits, `.` and `-` written `_XX`
/// (uppercase hex). Written out here rather than asked of the adapter, so a drift between
/// the adapter and its documentation fails the case.
fn documented_queue_name(prefix: &str, queue: &str) -> evbus::Result<String> {
    let mut name = prefix.to_owned();
    for b in queue.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("_{b:02X}"));
        }
    }
    // Longer names are cut and hashed; the suite's names are far shorter.
    if name.len() > 255 {
        return Err(evbus::Error::invalid_config(format!(
            "queue `{queue}` maps to a name longer than 255 bytes; the raw producer does not \
             replicate the hashed form"
        )));
    }
    Ok(name)
}

#[async_trait]
impl RawProducer for LapinProducer {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        let config = AmqpConfig::from_url(&self.url)?;
        let routing_key = documented_queue_name(&config.prefix, queue)?;
        let client = |what: &'static str| {
            move |e: lapin::Error| evbus::Error::client(ErrorKind::Connection, what, e)
        };
        // The first node of a cluster URL (any node takes publishes for every queue).
        let first = config.server_urls()?.swap_remove(0);
        let conn = Connection::connect(&first, ConnectionProperties::default())
            .await
            .map_err(client("connecting the raw lapin producer"))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(client("opening a lapin channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(client("enabling publisher confirms"))?;
        let confirmation = channel
            .basic_publish(
                "".into(),
                routing_key.as_str().into(),
                // Mandatory: a message routed to no queue comes back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                b"not a cloudevent",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(client("publishing the foreign message"))?
            .await
            .map_err(client("waiting for the broker's confirm"))?;
        let _ = conn.close(200, "done".into()).await;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(evbus::Error::new(
                ErrorKind::NotFound,
                format!(
                    "RabbitMQ has no queue `{routing_key}` for evbus queue `{queue}`: the \
                     adapter no longer names queues the way its README documents"
                ),
            )),
            other => Err(evbus::Error::new(
                ErrorKind::Broker,
                format!("RabbitMQ did not accept the foreign message: {other:?}"),
            )),
        }
    }
}
