//! Test helpers: a RabbitMQ node this harness starts itself (its own node name, ports and
//! data directory), never the shared broker.

#![allow(dead_code, unreachable_pub)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
const SYNC_RA_REGISTRY: &str = "[ok = dets:sync(maps:get(directory_rev, maps:get(names, \
    ra_system:fetch(S)))) || S <- [quorum_queues, coordination], ra_system:fetch(S) =/= undefined].";

/// A RabbitMQ node owned by this harness: started on free ports with its data in a
/// temporary directory, killed with SIGKILL and restarted on the same ports and data.
pub struct RabbitNode {
    pub port: u16,
    dist_port: u16,
    name: String,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl RabbitNode {
    /// Starts a node and waits until it accepts AMQP connections.
    pub fn start() -> std::io::Result<Self> {
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        let dir =
            std::env::temp_dir().join(format!("evbus-amqp-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        // No plugins: the node starts faster and needs no management port.
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let node = RabbitNode {
            port,
            dist_port,
            name: format!("evbus-ct-{port}@localhost"),
            dir,
            child: Mutex::new(None),
        };
        node.spawn()?;
        node.wait_ready()?;
        Ok(node)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn spawn(&self) -> std::io::Result<()> {
        let mut last = None;
        for server in SERVER {
            let spawned = Command::new(server)
                .env("RABBITMQ_NODENAME", &self.name)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", self.port.to_string())
                .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
                .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
                .env(
                    "RABBITMQ_ENABLED_PLUGINS_FILE",
                    self.dir.join("enabled_plugins"),
                )
                .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
                .env(
                    "RABBITMQ_ADVANCED_CONFIG_FILE",
                    self.dir.join("advanced.config"),
                )
                .current_dir(&self.dir)
                // Its own process group, so SIGKILL reaches the Erlang VM behind the script.
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match spawned {
                Ok(child) => {
                    *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no rabbitmq-server")))
    }

    /// Waits until the node answers the AMQP protocol header on its port.
    pub fn wait_ready(&self) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let answered =
                std::net::TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"AMQP\x00\x00\x09\x01")?;
                    let mut reply = [0u8; 7];
                    s.read_exact(&mut reply)?;
                    // A connection.start method frame: type 1 on channel 0.
                    Ok(reply[0] == 1)
                });
            if let Ok(true) = answered {
                return Ok(());
            }
            if !self.is_running() {
                return Err(std::io::Error::other(format!(
                    "the RabbitMQ node {} exited while starting (logs: {})",
                    self.name,
                    self.dir.join("log").display()
                )));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "the RabbitMQ node {} did not accept AMQP on port {} within 90s (logs: {})",
                    self.name,
                    self.port,
                    self.dir.join("log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Syncs Ra's server name registry to disk ([`SYNC_RA_REGISTRY`]): what newer RabbitMQ
    /// versions do by themselves when a quorum queue is declared. Messages and queue logs
    /// are not touched: what the node confirmed must already be on disk.
    pub fn sync_ra_registry(&self) -> std::io::Result<()> {
        let mut last = None;
        for ctl in CTL {
            let output = Command::new(ctl)
                .args(["-n", &self.name, "eval", SYNC_RA_REGISTRY])
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(out) if out.status.success() => return Ok(()),
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

    /// SIGKILL to the node's whole process group: no chance to write anything more.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
            // The Erlang VM may take a moment to go once its group is killed: wait for the
            // port to close so a restart can bind it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
        // EVBUS_AMQP_KEEP_NODE=1 keeps the node's data and logs for a post-mortem.
        if std::env::var_os("EVBUS_AMQP_KEEP_NODE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}
