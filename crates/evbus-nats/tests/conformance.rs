//! The conformance suite against NATS JetStream.
//!
//! Most cases run against the server at `EVBUS_NATS_URL` (default `nats://127.0.0.1:4222`,
//! JetStream enabled). The outage cases run against a `nats-server -js` this harness starts
//! itself on a free port with a file store in a temporary directory, kills with SIGKILL to
//! interrupt, and restarts on the same port and store to resume. Without a `nats-server`
//! binary (`EVBUS_NATS_SERVER`, `/usr/sbin/nats-server` or on `PATH`) those cases are
//! reported `IGNORED ...: needs broker-control`.
//!
//! The foreign-message case writes with plain async-nats: a JetStream publish without `ce-`
//! headers to the queue's subject, `<subject_prefix>.queue.<escaped name>` (README, "Mapping").

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::container::{self, BrokerContainer, ContainerControl, ContainerSpec};
use evbus_conformance::{BrokerControl, RawProducer, Suite};
use evbus_nats::{NatsConfig, NatsTransport};
use support::{NatsServer, io_error};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    evbus_conformance::main(|| match container::image_from_env() {
        Some(image) => in_containers(image),
        None => {
            let url = std::env::var("EVBUS_NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
            let suite = suite(url, None);
            match NatsServer::start() {
                Ok(server) => suite.with_broker_control(server),
                Err(e) => {
                    eprintln!("WARNING: cannot start a nats-server for the outage cases: {e}");
                    suite
                }
            }
        }
    })
}

/// The suite against the server at `url`, with a raw producer. The suite keeps `container`
/// (the server at `url` in container mode) until it is dropped, which removes it.
fn suite(url: String, container: Option<Arc<BrokerContainer>>) -> Suite<NatsTransport> {
    let config = NatsConfig::from_url(&url);
    // Against several servers (a cluster, `cargo xtask conformance --adapter nats-cluster`)
    // the suite reports as `nats-cluster`.
    let servers = config
        .as_ref()
        .ok()
        .and_then(|c| c.server_urls().ok())
        .unwrap_or_default();
    let name = if servers.len() > 1 {
        "nats-cluster"
    } else {
        "nats"
    };
    let raw = config.map(|config| RawNats {
        servers: servers.iter().map(ToString::to_string).collect(),
        subject_prefix: config.subject_prefix,
    });
    let suite = Suite::new(name, move || {
        let _owned = &container;
        let url = url.clone();
        async move { NatsTransport::connect(NatsConfig::from_url(&url)?).await }
    });
    match raw {
        Ok(raw) => suite.with_raw_producer(raw),
        Err(e) => {
            eprintln!("WARNING: no raw NATS producer for the foreign-message case: {e}");
            suite
        }
    }
}

/// Container mode (`EVBUS_CONFORMANCE_IMAGE`, see `docker/nats`): one container for the
/// suite, another for the outage cases, killed with SIGKILL and started again on its file
/// store.
fn in_containers(image: String) -> Suite<NatsTransport> {
    let spec = ContainerSpec::new(image, 4222);
    let mut started = container::start_or_exit("nats", vec![spec.clone(), spec]);
    let controlled = started.pop().expect("two containers");
    let main = started.pop().expect("two containers");
    let url = format!("nats://127.0.0.1:{}", main.host_port());
    println!(
        "container mode: the suite runs against {} at {url}",
        main.name()
    );
    let control = ContainerControl::new(controlled, |port| async move {
        let url = control_url(&format!("nats://127.0.0.1:{port}"));
        NatsTransport::connect(NatsConfig::from_url(&url)?).await
    });
    suite(url, Some(Arc::new(main))).with_broker_control(control)
}

/// The URL of the controlled server: short timeouts and reconnection delays.
fn control_url(base: &str) -> String {
    format!("{base}?reconnect_max_delay_ms=250&request_timeout_ms=2000")
}

#[async_trait]
impl BrokerControl for NatsServer {
    type Transport = NatsTransport;

    async fn connect(&self) -> evbus::Result<NatsTransport> {
        NatsTransport::connect(NatsConfig::from_url(&control_url(&self.url()))?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL: no chance to write anything more. Every message JetStream acknowledged
        // with a PubAck is already written to the file store (the OS keeps it).
        self.kill();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        tokio::task::block_in_place(|| self.restart())
            .map_err(|e| io_error("restarting nats-server", e))
    }
}

/// A foreign producer: a plain async-nats client publishing to JetStream a message that is
/// not a CloudEvent (no `ce-` headers), no evbus involved.
struct RawNats {
    /// Every server of the URL (one, or a cluster's).
    servers: Vec<String>,
    subject_prefix: String,
}

/// The README's name escaping ("Names"): ASCII letters, digits, `-` and `_` stay, `.` becomes
/// `=`, every other byte `~XX` (upper-case hex).
fn escape(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => char::from(b).to_string(),
            b'.' => "=".to_owned(),
            _ => format!("~{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl RawProducer for RawNats {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        let subject = format!("{}.queue.{}", self.subject_prefix, escape(queue));
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Connection,
                format!("the raw NATS producer could not {what} `{subject}`: {e}"),
            )
        };
        let client = async_nats::connect(self.servers.clone())
            .await
            .map_err(|e| failed("connect to publish to", &e))?;
        let js = async_nats::jetstream::new(client);
        js.publish(subject.clone(), "not a cloudevent".into())
            .await
            .map_err(|e| failed("publish to", &e))?
            .await
            .map_err(|e| failed("get a PubAck from", &e))?;
        Ok(())
    }
}
