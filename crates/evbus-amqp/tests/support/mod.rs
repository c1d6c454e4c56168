//! Test helpers: a RabbitMQ node this harness starts itself (its own node name, ports and
//! data directory), and connections to the shared broker at `EVBUS_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) for tests that need no node of their own.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use evbus_conformance::process::{BrokerProcess, free_port};

/// The `rabbitmq-server` start script, called directly (the `/usr/sbin` wrapper switches to
/// the `rabbitmq` user, which cannot write this harness's temporary directory).
const SERVER: &[&str] = &["/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server"];

/// `rabbitmqctl`, called directly for the same reason (the wrapper would also use the
/// `rabbitmq` user's Erlang cookie instead of ours, which the node shares).
const CTL: &[&str] = &["/usr/lib/rabbitmq/bin/rabbitmqctl", "rabbitmqctl"];

/// Makes Ra's server name registry (`names.dets`) durable on every Ra system of the node.
///
/// RabbitMQ 3.10 (Ra 2.2) writes a new quorum queue's registration to `names.dets` lazily
/// (DETS auto-save, no sync). A SIGKILL within about a second of declaring a quorum queue
/// loses it; on restart RabbitMQ starts the queue's member "as a new one" with a fresh,
/// empty log that never elects a leader on a single node, and the queue (with the messages
/// it confirmed, which are on disk under the old member) is stuck for good: `leader call -
/// leader not known` in the log. Newer Ra syncs the registry on every change (rabbitmq/ra
/// pull request 443). See the crate README, "Broker gaps".
pub const SYNC_RA_REGISTRY: &str = "[ok = dets:sync(maps:get(directory_rev, maps:get(names, \
    ra_system:fetch(S)))) || S <- [quorum_queues, coordination], ra_system:fetch(S) =/= undefined].";

/// A RabbitMQ node owned by this harness: started on free ports with its data in a
/// temporary directory, killed with SIGKILL (its whole process group, so the Erlang VM
/// behind the start script goes too) and restarted on the same ports and data (see
/// [`BrokerProcess`]).
pub struct RabbitNode {
    process: BrokerProcess,
    name: String,
}

/// The first of `candidates` that exists, else the last (looked up on `PATH`).
fn first_installed(candidates: &[&'static str]) -> &'static str {
    candidates
        .iter()
        .copied()
        .find(|c| std::path::Path::new(c).exists())
        .unwrap_or(candidates[candidates.len() - 1])
}

impl RabbitNode {
    /// Starts a node and waits until it accepts AMQP connections.
    pub fn start() -> std::io::Result<Self> {
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        let name = format!("evbus-ct-{port}@localhost");
        let node = name.clone();
        let process = BrokerProcess::builder("the RabbitMQ node", move |dir, port| {
            let mut command = Command::new(first_installed(SERVER));
            command
                .env("RABBITMQ_NODENAME", &node)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_DIST_PORT", dist_port.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"));
            command
        })
        .port(port)
        .process_group()
        .ready_when(Duration::from_secs(90), speaks_amqp)
        // EVBUS_AMQP_KEEP_NODE=1 keeps the node's data and logs for a post-mortem.
        .keep_data(std::env::var_os("EVBUS_AMQP_KEEP_NODE").is_some())
        .build()?;
        let dir = process.data_dir();
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        // No plugins: the node starts faster and needs no management port.
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        process.restart()?;
        Ok(RabbitNode { process, name })
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port())
    }

    /// Syncs Ra's server name registry to disk ([`SYNC_RA_REGISTRY`]): what newer RabbitMQ
    /// versions do by themselves when a quorum queue is declared. Messages and queue logs
    /// are not touched: what the node confirmed must already be on disk.
    pub fn sync_ra_registry(&self) -> std::io::Result<()> {
        self.eval(SYNC_RA_REGISTRY).map(drop)
    }

    /// Evaluates the Erlang expression `expr` on the node (`rabbitmqctl eval`) and returns
    /// what it printed.
    pub fn eval(&self, expr: &str) -> std::io::Result<String> {
        let mut last = None;
        for ctl in CTL {
            let output = Command::new(ctl)
                .args(["-n", &self.name, "eval", expr])
                .current_dir(self.data_dir())
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(out) if out.status.success() => {
                    return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
                }
                Ok(out) => {
                    return Err(std::io::Error::other(format!(
                        "`{ctl} -n {} eval` failed ({}): {} {}",
                        self.name,
                        out.status,
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no rabbitmqctl")))
    }

    /// Adds the user `user` (password `pw`) with the permission patterns given on vhost `/`.
    pub fn add_user(&self, user: &str, configure: &str, write: &str, read: &str) {
        self.eval(&format!(
            "ok = rabbit_auth_backend_internal:add_user(<<\"{user}\">>, <<\"pw\">>, <<\"test\">>), \
             ok = rabbit_auth_backend_internal:set_permissions(<<\"{user}\">>, <<\"/\">>, \
             <<\"{configure}\">>, <<\"{write}\">>, <<\"{read}\">>, <<\"test\">>)."
        ))
        .expect("adding a user to the test's node");
    }

    /// The URL of the user `user` added by [`add_user`](Self::add_user).
    pub fn user_url(&self, user: &str) -> String {
        format!("amqp://{user}:pw@127.0.0.1:{}/%2f", self.port())
    }

    /// Suspends (`true`) or resumes (`false`) the Ra server of the quorum queue `queue` (in
    /// the default vhost): while suspended, the queue answers no command, so a
    /// `basic.consume` on it waits, and its `consume-ok` comes only after the resume.
    pub fn suspend_quorum_queue(&self, queue: &str, suspend: bool) -> std::io::Result<()> {
        let call = if suspend { "suspend" } else { "resume" };
        self.eval(&format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
             {{Name, _}} = amqqueue:get_pid(Q), ok = sys:{call}(whereis(Name))."
        ))
        .map(drop)
    }
}

/// Whether the node answers the AMQP protocol header with a `connection.start` method frame
/// (type 1 on channel 0).
fn speaks_amqp(port: u16) -> std::io::Result<bool> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    Ok(reply[0] == 1)
}

impl std::ops::Deref for RabbitNode {
    type Target = BrokerProcess;

    fn deref(&self) -> &BrokerProcess {
        &self.process
    }
}

/// Starts a node for a test that needs one. Without one the test cannot run: under `CI` or
/// `EVBUS_REQUIRE_BROKERS` that fails it, elsewhere it says so loudly and the test returns.
pub fn start_node() -> Option<std::sync::Arc<RabbitNode>> {
    match tokio::task::block_in_place(RabbitNode::start) {
        Ok(node) => Some(std::sync::Arc::new(node)),
        Err(e) => {
            assert!(
                !evbus_conformance::require_brokers(),
                "cannot start a RabbitMQ node (rabbitmq-server): {e}; CI or \
                 EVBUS_REQUIRE_BROKERS is set, so this is a failure"
            );
            eprintln!("SKIPPED: cannot start a RabbitMQ node (rabbitmq-server): {e}");
            None
        }
    }
}

/// A transport to `node`, with the adapter options in `query` (`name=value&...`).
pub async fn transport(node: &RabbitNode, query: &str) -> evbus_amqp::AmqpTransport {
    let url = format!("{}?{query}", node.url());
    let config = evbus_amqp::AmqpConfig::from_url(&url).expect("a valid AMQP URL");
    evbus_amqp::AmqpTransport::connect(config)
        .await
        .expect("connecting to the test's RabbitMQ node")
}

/// Publishes `count` events of type `ty` (their data: 0, 1, ...) to `topic`, each awaited,
/// and returns their ids in order.
pub async fn publish_numbered(topic: &dyn evbus::Topic, ty: &str, count: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for seq in 0..count {
        let event = evbus::Event::builder(ty, format!("/{ty}"))
            .json(&seq)
            .expect("a number is JSON")
            .build()
            .expect("a valid event");
        topic.publish(&event).await.expect("publish");
        ids.push(event.id().to_owned());
    }
    ids
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}

/// The URL of the shared broker (`EVBUS_AMQP_URL`).
pub fn shared_url() -> String {
    std::env::var("EVBUS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// An evbus transport to the shared broker. The tombstones of what its tests delete go
/// after ten minutes, not a day.
pub async fn shared_transport() -> evbus_amqp::AmqpTransport {
    let mut config = evbus_amqp::AmqpConfig::from_url(&shared_url()).expect("a valid URL");
    config.tombstone_ttl = std::time::Duration::from_secs(600);
    evbus_amqp::AmqpTransport::connect(config)
        .await
        .expect("RabbitMQ reachable at EVBUS_AMQP_URL")
}

/// A plain lapin connection to the shared broker, and a channel on it.
pub async fn stock_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&shared_url(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable at EVBUS_AMQP_URL");
    let channel = conn.create_channel().await.expect("a channel");
    (conn, channel)
}

/// How many messages the queue `queue` holds (a passive declare), on a channel of its own
/// (a missing queue closes it): `None` when the queue does not exist.
pub async fn message_count(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count())
}
