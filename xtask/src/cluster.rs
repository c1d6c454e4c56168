//! `cargo xtask cluster start|stop|status|kill|restart <broker> [node]`: a broker cluster on
//! this machine, for the cluster conformance rows (`cargo xtask conformance --adapter
//! nats-cluster`) and failover tests.
//!
//! **nats**: three `nats-server` (2.9) processes with JetStream, routed to each other as the
//! cluster `evbus`:
//!
//! | node | client | cluster (routes) | monitoring |
//! |---|---|---|---|
//! | node1 | 127.0.0.1:4231 | 6231 | 8231 |
//! | node2 | 127.0.0.1:4232 | 6232 | 8232 |
//! | node3 | 127.0.0.1:4233 | 6233 | 8233 |
//!
//! Each keeps its store, pid file and log in `~/.cache/evbus/clusters/nats/nodeN/`. `start`
//! is idempotent (running nodes are left alone) and returns once every node is up and the
//! JetStream meta group has a leader; `stop` sends SIGTERM and waits (SIGKILL after 15 s);
//! the data directories stay (delete them for a fresh cluster). The processes run in their
//! own process group: they outlive the command that started them.
//!
//! The evbus URL of the cluster is [`nats_url`]: the three client ports, comma-separated.
//!
//! **amqp**: three RabbitMQ (3.10) nodes `evbus1@localhost`, `evbus2@localhost`,
//! `evbus3@localhost`, AMQP on 127.0.0.1:5681-5683, distribution ports 25681-25683, no
//! plugins (no management), each with its own configuration, Mnesia, log and pid file in
//! `~/.cache/evbus/clusters/amqp/nodeN/` (never the system node on 5672, whose
//! `/etc/rabbitmq` files are not read). `start` starts the nodes, then joins nodes 2 and 3
//! to node 1 (`rabbitmqctl stop_app`, `join_cluster evbus1@localhost`, `start_app`) unless
//! they already are in its cluster. The scripts are called directly (the `/usr/sbin`
//! wrappers switch to the `rabbitmq` user), so nodes and `rabbitmqctl` share the invoking
//! user's `~/.erlang.cookie`. Its URL is [`amqp_url`].
//!
//! **redis**: six `redis-server` (7.0) processes with `--cluster-enabled yes`, client ports
//! 127.0.0.1:7231-7236 (cluster bus: + 10000), each with its `nodes.conf`, append-only file
//! (`appendfsync everysec`), pid file and log in `~/.cache/evbus/clusters/redis/nodeN/`,
//! `cluster-node-timeout` 3 s (a replica takes over a few seconds after its master died),
//! `repl-diskless-sync-delay` 0 (a restarted node resyncs from its new master at once).
//! The first `start` creates the cluster with `redis-cli --cluster create ...
//! --cluster-replicas 1` (three masters, each with one replica); later starts reuse the
//! `nodes.conf` files. `start` returns once every node reports `cluster_state:ok` and knows
//! all six. Its URL is [`redis_url`]. The system Redis on 6379 is never touched.
//!
//! `~/.cache/evbus/clusters/<broker>` is `$EVBUS_<BROKER>_CLUSTER_DIR` instead when that
//! is set (an absolute path): the failover tests read the same variable to find the pid
//! files. `start` ends with the command that runs the broker's failover test against the
//! cluster (its `EVBUS_<BROKER>_CLUSTER_URL`; NATS adds `?replicas=3`).
//!
//! Each broker's cluster is one [`Cluster`] (`NATS`, `AMQP`, `REDIS`; [`of`] finds it by
//! name): its node count, the pid file in each node's directory, and its own functions to
//! spawn a node, start the cluster, wait until a restarted node is back and describe a node.
//! `stop`, `kill`, `restart`, `status` and the pid lookup are written once over it
//! ([`Cluster::stop`], [`Cluster::kill_node`], ...; RabbitMQ gets 30 s before the SIGKILL
//! of `stop`).
//!
//! [`Cluster::kill_node`], [`Cluster::restart_node`] and the other functions (find a
//! stream's leader, the master of a key's slot) are for tests and the fault suite.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Result;

/// The local clusters `cargo xtask cluster` knows.
const CLUSTERS: &[&Cluster] = &[&NATS, &AMQP, &REDIS];

/// Client port of node 1 (node N: + N - 1).
const NATS_CLIENT_PORT: u16 = 4231;
/// Route (cluster) port of node 1.
const NATS_ROUTE_PORT: u16 = 6231;
/// Monitoring (HTTP) port of node 1.
const NATS_MONITOR_PORT: u16 = 8231;
/// How long `start` and `restart_node` wait for the cluster to be usable.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// `cargo xtask cluster <action> <broker> [node]`.
pub(crate) fn run(action: &str, broker: &str, node: Option<usize>) -> Result<()> {
    let cluster = of(broker)?;
    let node = || {
        let nodes = cluster.nodes;
        let node = node.ok_or_else(|| format!("`{action}` needs a node number (1 to {nodes})"))?;
        cluster.check_node(node).map(|()| node)
    };
    let started = Instant::now();
    match action {
        "start" => cluster.start()?,
        "stop" => return cluster.stop(),
        "status" => {
            return if cluster.print_status() {
                Ok(())
            } else {
                Err(format!("the {broker} cluster is not fully up"))
            };
        }
        "kill" => {
            let node = node()?;
            cluster.kill_node(node)?;
            println!("cluster {broker}: node{node} killed (SIGKILL)");
            return Ok(());
        }
        "restart" => {
            let node = node()?;
            cluster.restart_node(node)?;
            println!(
                "cluster {broker}: node{node} restarted, in the cluster again after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        other => {
            return Err(format!(
                "unknown cluster action `{other}`; use start, stop, status, kill or restart"
            ));
        }
    }
    println!(
        "cluster {broker}: up in {:.1} s; URL {}",
        started.elapsed().as_secs_f64(),
        cluster.url()
    );
    cluster.print_status();
    println!(
        "failover test: {}\nstop: cargo xtask cluster stop {broker}",
        cluster.failover_command()
    );
    Ok(())
}

/// The local cluster of `broker`.
pub(crate) fn of(broker: &str) -> Result<&'static Cluster> {
    CLUSTERS
        .iter()
        .copied()
        .find(|c| c.name == broker)
        .ok_or_else(|| {
            let known: Vec<&str> = CLUSTERS.iter().map(|c| c.name).collect();
            format!(
                "no local cluster for `{broker}`; known: {}",
                known.join(", ")
            )
        })
}

/// One broker's local cluster: what its nodes are and how to start one, from which `start`,
/// `stop`, `kill`, `restart` and `status` are written once for every broker.
pub(crate) struct Cluster {
    /// The broker's name on the command line (`nats`, `amqp`, `redis`), in status lines and
    /// the directory `~/.cache/evbus/clusters/<name>`.
    pub(crate) name: &'static str,
    /// The broker as messages about one node name it (`Redis node2 is not running`).
    label: &'static str,
    /// How many nodes (numbered from 1), each in `~/.cache/evbus/clusters/<name>/nodeN/`.
    nodes: usize,
    /// The pid file in each node's directory.
    pid_file: &'static str,
    /// Whether the live process `pid` is node `node` of this cluster (a pid file can name
    /// a recycled pid).
    is_node: fn(u32, usize) -> bool,
    /// The port clients connect to on node `node`.
    port: fn(usize) -> u16,
    /// Spawns node `node` in its own process group (it outlives xtask).
    spawn: fn(usize) -> Result<()>,
    /// Starts the nodes that are not running and waits until the cluster is formed.
    /// Idempotent.
    start: fn() -> Result<()>,
    /// Waits until the restarted node `node` is in the cluster again.
    rejoin: fn(usize) -> Result<()>,
    /// The status of running node `node` (process `pid`), after `<name> nodeN: `.
    describe: fn(usize, u32) -> String,
    /// Whether the running nodes form one cluster (printing what `status` says of it).
    formed: fn() -> bool,
    /// The evbus URL of the cluster, without parameters.
    url: fn() -> String,
    /// Appended to [`Cluster::url`] in `EVBUS_<BROKER>_CLUSTER_URL` for the adapter's
    /// `tests/cluster_failover.rs` (NATS: `?replicas=3`, which the test requires).
    failover_parameters: &'static str,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    stop_timeout: Duration,
}

impl Cluster {
    /// The data directory of node `node` (1-based).
    fn node_dir(&self, node: usize) -> PathBuf {
        cluster_dir(self.name).join(format!("node{node}"))
    }

    fn check_node(&self, node: usize) -> Result<()> {
        let nodes = self.nodes;
        if (1..=nodes).contains(&node) {
            Ok(())
        } else {
            Err(format!(
                "node {node} does not exist; nodes are 1 to {nodes}"
            ))
        }
    }

    /// The pid of node `node` if its pid file names a live process of that node.
    fn pid(&self, node: usize) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.node_dir(node).join(self.pid_file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (alive(pid) && (self.is_node)(pid, node)).then_some(pid)
    }

    /// Spawns every node that is not running. The ports of all of them are checked first: a
    /// start that failed on a taken port half-way would leave the nodes before it running.
    fn spawn_missing(&self) -> Result<()> {
        let missing: Vec<usize> = (1..=self.nodes)
            .filter(|&n| self.pid(n).is_none())
            .collect();
        if let Some(node) = missing.iter().copied().find(|&n| port_open((self.port)(n))) {
            return Err(format!(
                "127.0.0.1:{} ({} node{node}'s port) is taken by another process; no node was \
                 started; stop that process, or see `cargo xtask cluster status {}`",
                (self.port)(node),
                self.label,
                self.name
            ));
        }
        for node in missing {
            (self.spawn)(node)?;
        }
        Ok(())
    }

    /// Starts the nodes that are not running and waits until the cluster is formed.
    /// Idempotent.
    pub(crate) fn start(&self) -> Result<()> {
        (self.start)()
    }

    /// The evbus URL of the cluster, without parameters.
    pub(crate) fn url(&self) -> String {
        (self.url)()
    }

    /// The command that runs the broker's `tests/cluster_failover.rs` against this cluster.
    pub(crate) fn failover_command(&self) -> String {
        format!(
            "EVBUS_{}_CLUSTER_URL='{}{}' cargo test -p evbus-{} --test cluster_failover -- \
             --nocapture",
            self.name.to_ascii_uppercase(),
            self.url(),
            self.failover_parameters,
            self.name
        )
    }

    /// Whether every node is running (the cluster may still be forming).
    pub(crate) fn running(&self) -> bool {
        (1..=self.nodes).all(|n| self.pid(n).is_some())
    }

    /// SIGTERM to every running node (each shuts down cleanly), then waits for them to exit
    /// (SIGKILL after a while). Only the processes of this cluster's pid files: never a
    /// system broker.
    pub(crate) fn stop(&self) -> Result<()> {
        let pids: Vec<(usize, u32)> = (1..=self.nodes)
            .filter_map(|n| self.pid(n).map(|pid| (n, pid)))
            .collect();
        for &(_, pid) in &pids {
            signal(pid, "-TERM")?;
        }
        let deadline = Instant::now() + self.stop_timeout;
        for &(node, pid) in &pids {
            while alive(pid) && Instant::now() < deadline {
                sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                eprintln!(
                    "{} node{node} (pid {pid}) still runs after {:?}: SIGKILL",
                    self.label, self.stop_timeout
                );
                signal(pid, "-KILL")?;
            }
            let _ = std::fs::remove_file(self.node_dir(node).join(self.pid_file));
        }
        println!(
            "cluster {}: stopped ({} node(s) were running); data stays in {}",
            self.name,
            pids.len(),
            cluster_dir(self.name).display()
        );
        Ok(())
    }

    /// SIGKILL of node `node` (a crash: nothing more written). Returns once it is gone.
    pub(crate) fn kill_node(&self, node: usize) -> Result<()> {
        self.check_node(node)?;
        let pid = self
            .pid(node)
            .ok_or_else(|| format!("{} node{node} is not running", self.label))?;
        signal(pid, "-KILL")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(pid) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts node `node` again on its data and waits until it is back in the cluster.
    pub(crate) fn restart_node(&self, node: usize) -> Result<()> {
        self.check_node(node)?;
        if self.pid(node).is_none() {
            (self.spawn)(node)?;
        }
        (self.rejoin)(node)
    }

    /// Prints one line per node (and what the broker adds); `true` when every node runs
    /// and they form one cluster.
    fn print_status(&self) -> bool {
        let mut up = true;
        for node in 1..=self.nodes {
            match self.pid(node) {
                Some(pid) => println!("{} node{node}: {}", self.name, (self.describe)(node, pid)),
                None => {
                    up = false;
                    let port = (self.port)(node);
                    println!(
                        "{} node{node}: not running{}",
                        self.name,
                        if port_open(port) {
                            format!(" (but 127.0.0.1:{port} is taken by another process)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        up && (self.formed)()
    }
}

/// `host:port` of every node, comma-separated.
fn hosts(nodes: usize, port: fn(usize) -> u16) -> String {
    let hosts: Vec<String> = (1..=nodes)
        .map(|n| format!("127.0.0.1:{}", port(n)))
        .collect();
    hosts.join(",")
}

/// The command line of process `pid`, its arguments separated by NULs.
fn cmdline(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmdline).into_owned())
}

/// The node's `stdout.log` in `dir`, opened twice (standard output and error).
fn node_log(dir: &Path, node: usize) -> Result<(File, File)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stdout.log"))
        .map_err(|e| format!("opening the log of node{node}: {e}"))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("opening the log of node{node}: {e}"))?;
    Ok((log, log2))
}

/// Waits until `ready`, asking every `every`; the error says `what`, and where the logs of
/// `broker`'s cluster are.
fn wait_until(
    broker: &str,
    every: Duration,
    within: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} within {within:?}; logs in {}",
                cluster_dir(broker).display()
            ));
        }
        sleep(every);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// NATS

/// The NATS cluster.
const NATS: Cluster = Cluster {
    name: "nats",
    label: "nats",
    nodes: NATS_NODES,
    pid_file: "nats.pid",
    is_node: nats_is_node,
    port: nats_client_port,
    spawn: nats_spawn,
    start: nats_start,
    rejoin: nats_rejoin,
    describe: nats_describe,
    formed: nats_formed,
    url: nats_url,
    failover_parameters: "?replicas=3",
    stop_timeout: STOP_TIMEOUT,
};

/// Nodes of the NATS cluster.
const NATS_NODES: usize = 3;

/// The directory of `broker`'s cluster: `EVBUS_<BROKER>_CLUSTER_DIR` (an absolute path)
/// when set, else `~/.cache/evbus/clusters/<broker>`. The failover tests look for the pid
/// files in the same place (`evbus_conformance::failover::cluster_dir`).
fn cluster_dir(broker: &str) -> PathBuf {
    cluster_dir_in(
        broker,
        std::env::var_os(format!("EVBUS_{}_CLUSTER_DIR", broker.to_ascii_uppercase())),
        std::env::var_os("HOME"),
    )
}

/// [`cluster_dir`] from the values of `EVBUS_<BROKER>_CLUSTER_DIR` and `HOME`.
fn cluster_dir_in(broker: &str, var: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if let Some(dir) = var {
        return PathBuf::from(dir);
    }
    let home = home.map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/evbus/clusters").join(broker)
}

fn offset(node: usize) -> u16 {
    u16::try_from(node - 1).unwrap_or(0)
}

/// The client port of NATS node `node`.
pub(crate) fn nats_client_port(node: usize) -> u16 {
    NATS_CLIENT_PORT + offset(node)
}

fn nats_monitor_port(node: usize) -> u16 {
    NATS_MONITOR_PORT + offset(node)
}

/// The evbus URL of the cluster, without parameters:
/// `nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233`.
fn nats_url() -> String {
    format!("nats://{}", hosts(NATS_NODES, nats_client_port))
}

/// The nats-server binary: `EVBUS_NATS_SERVER`, else `/usr/sbin/nats-server` if present,
/// else `nats-server` on `PATH` (as the adapter's tests).
fn nats_binary() -> String {
    server_binary("EVBUS_NATS_SERVER", "/usr/sbin/nats-server")
}

/// A broker's binary: the variable `var`, else `path` if present, else its file name (on
/// `PATH`).
fn server_binary(var: &str, path: &str) -> String {
    if let Ok(binary) = std::env::var(var) {
        return binary;
    }
    if Path::new(path).exists() {
        return path.to_owned();
    }
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Whether `pid` is the nats-server of node `node`.
fn nats_is_node(pid: u32, node: usize) -> bool {
    // A recycled pid is some other process: it must be this node's server.
    cmdline(pid).is_some_and(|cmdline| {
        cmdline.contains("nats-server") && cmdline.contains(&*NATS.node_dir(node).to_string_lossy())
    })
}

/// Whether the process `pid` still exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("could not run `kill {signal} {pid}`: {e}"))?;
    if status.success() || !alive(pid) {
        Ok(())
    } else {
        Err(format!("`kill {signal} {pid}` failed"))
    }
}

/// Spawns NATS node `node` in its own process group (it outlives xtask).
fn nats_spawn(node: usize) -> Result<()> {
    let dir = NATS.node_dir(node);
    std::fs::create_dir_all(dir.join("store"))
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let port = nats_client_port(node);
    if port_open(port) {
        return Err(format!(
            "127.0.0.1:{port} (NATS node{node}'s client port) is taken by another process; \
             stop it, or see `cargo xtask cluster status nats`"
        ));
    }
    let routes: Vec<String> = (1..=NATS_NODES)
        .filter(|&n| n != node)
        .map(|n| format!("nats://127.0.0.1:{}", NATS_ROUTE_PORT + offset(n)))
        .collect();
    let (log, log2) = node_log(&dir, node)?;
    let mut cmd = Command::new(nats_binary());
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-n", &format!("node{node}")])
        .arg("-js")
        .arg("-sd")
        .arg(dir.join("store"))
        .args(["--cluster_name", "evbus"])
        .arg("--cluster")
        .arg(format!(
            "nats://127.0.0.1:{}",
            NATS_ROUTE_PORT + offset(node)
        ))
        .arg("--routes")
        .arg(routes.join(","))
        .args(["-m", &nats_monitor_port(node).to_string()])
        .arg("-P")
        .arg(dir.join("nats.pid"))
        .arg("-l")
        .arg(dir.join("nats-server.log"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| format!("could not start {} for node{node}: {e}", nats_binary()))?;
    // Not waited for: the server runs on after xtask exits (init reaps it).
    drop(child);
    Ok(())
}

/// One HTTP GET on the monitoring port of `node`: the body, parsed as JSON.
fn monitor_get(node: usize, path: &str) -> Option<serde_json::Value> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, nats_monitor_port(node)));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    if !status.starts_with("HTTP/1.") || !status.contains(" 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The JetStream meta leader as node `node` sees it (`None`: no leader, or the node is down).
fn meta_leader(node: usize) -> Option<String> {
    let jsz = monitor_get(node, "/jsz")?;
    let leader = jsz.get("meta_cluster")?.get("leader")?.as_str()?;
    (!leader.is_empty()).then(|| leader.to_owned())
}

/// Whether every node in `nodes` is up and sees the same JetStream meta leader.
fn agree_on_a_leader(nodes: &[usize]) -> Option<String> {
    let mut leaders = nodes.iter().map(|&n| meta_leader(n));
    let first = leaders.next()??;
    leaders.all(|l| l.as_ref() == Some(&first)).then_some(first)
}

/// Waits until every node in `nodes` answers and agrees on a JetStream meta leader.
fn wait_ready(nodes: &[usize], within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(leader) = agree_on_a_leader(nodes) {
            return Ok(leader);
        }
        if Instant::now() > deadline {
            let state: Vec<String> = nodes
                .iter()
                .map(|&n| {
                    format!(
                        "node{n}: {}",
                        match (NATS.pid(n), meta_leader(n)) {
                            (None, _) => "not running".to_owned(),
                            (Some(_), None) => "running, no JetStream meta leader".to_owned(),
                            (Some(_), Some(l)) => format!("meta leader {l}"),
                        }
                    )
                })
                .collect();
            return Err(format!(
                "the nats cluster was not ready within {within:?} ({}); logs in {}",
                state.join("; "),
                cluster_dir("nats").display()
            ));
        }
        sleep(Duration::from_millis(200));
    }
}

fn all_nodes() -> Vec<usize> {
    (1..=NATS_NODES).collect()
}

/// Starts the nodes that are not running and waits until the cluster has a JetStream meta
/// leader that every node agrees on. Idempotent.
fn nats_start() -> Result<()> {
    NATS.spawn_missing()?;
    wait_ready(&all_nodes(), READY_TIMEOUT).map(drop)
}

/// Waits until the restarted node is back in the cluster (it sees the same meta leader as
/// the other running nodes; a node that is down, killed on purpose, is not waited for).
fn nats_rejoin(node: usize) -> Result<()> {
    let running: Vec<usize> = all_nodes()
        .into_iter()
        .filter(|&n| n == node || NATS.pid(n).is_some())
        .collect();
    wait_ready(&running, READY_TIMEOUT).map(drop)
}

/// The node (1-based) leading JetStream stream `stream` of the global account, if any node
/// reports one.
#[allow(dead_code)] // For the fault suite's failover run (issue 20), not wired yet.
pub(crate) fn nats_stream_leader(stream: &str) -> Option<usize> {
    for node in all_nodes() {
        let Some(jsz) = monitor_get(node, "/jsz?accounts=true&streams=true") else {
            continue;
        };
        let accounts = jsz.get("account_details")?.as_array()?;
        for account in accounts {
            let Some(streams) = account.get("stream_detail").and_then(|s| s.as_array()) else {
                continue;
            };
            for detail in streams {
                if detail.get("name").and_then(|n| n.as_str()) != Some(stream) {
                    continue;
                }
                let leader = detail
                    .get("cluster")
                    .and_then(|c| c.get("leader"))
                    .and_then(|l| l.as_str())
                    .unwrap_or_default();
                if let Some(n) = leader.strip_prefix("node").and_then(|n| n.parse().ok()) {
                    return Some(n);
                }
            }
        }
    }
    None
}

/// The status line of a running node: its client port and the meta leader it sees.
fn nats_describe(node: usize, pid: u32) -> String {
    format!(
        "running (pid {pid}), client 127.0.0.1:{}, JetStream meta leader {}",
        nats_client_port(node),
        meta_leader(node).unwrap_or_else(|| "none".to_owned())
    )
}

/// Whether every node agrees on a JetStream meta leader.
fn nats_formed() -> bool {
    agree_on_a_leader(&all_nodes()).is_some()
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

/// The RabbitMQ cluster.
const AMQP: Cluster = Cluster {
    name: "amqp",
    label: "RabbitMQ",
    nodes: AMQP_NODES,
    pid_file: "rabbitmq.pid",
    is_node: amqp_is_node,
    port: amqp_port,
    spawn: amqp_spawn,
    start: amqp_start,
    rejoin: amqp_rejoin,
    describe: amqp_describe,
    formed: amqp_formed,
    url: amqp_url,
    failover_parameters: "",
    // RabbitMQ takes longer to shut down cleanly.
    stop_timeout: Duration::from_secs(30),
};

/// Nodes of the RabbitMQ cluster.
const AMQP_NODES: usize = 3;
/// AMQP port of node 1 (node N: + N - 1).
const AMQP_PORT: u16 = 5681;
/// Erlang distribution port of node 1.
const AMQP_DIST_PORT: u16 = 25681;
/// How long a RabbitMQ node may take to boot (about 10 s here; more on a loaded machine).
const AMQP_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn amqp_node_name(node: usize) -> String {
    format!("evbus{node}@localhost")
}

/// The AMQP port of node `node`.
pub(crate) fn amqp_port(node: usize) -> u16 {
    AMQP_PORT + offset(node)
}

/// The evbus URL of the RabbitMQ cluster:
/// `amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/%2f`.
fn amqp_url() -> String {
    format!("amqp://guest:guest@{}/%2f", hosts(AMQP_NODES, amqp_port))
}

/// The directory of RabbitMQ's own scripts (`rabbitmq-server`, `rabbitmqctl`), called
/// directly: `EVBUS_RABBITMQ_SBIN`, else the newest `/usr/lib/rabbitmq/lib/*/sbin`.
fn rabbitmq_sbin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EVBUS_RABBITMQ_SBIN") {
        return Ok(PathBuf::from(dir));
    }
    let lib = PathBuf::from("/usr/lib/rabbitmq/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .map_err(|e| {
            format!(
                "no RabbitMQ in {} ({e}); set EVBUS_RABBITMQ_SBIN",
                lib.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path().join("sbin")))
        .filter(|p| p.join("rabbitmq-server").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no rabbitmq_server-*/sbin in {}", lib.display()))
}

/// Whether `pid` is the Erlang VM of node `node`.
fn amqp_is_node(pid: u32, node: usize) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("RABBITMQ_NODENAME={}", amqp_node_name(node));
    environ
        .split(|&b| b == 0)
        .any(|var| var == wanted.as_bytes())
}

/// Spawns node `node` in its own process group.
fn amqp_spawn(node: usize) -> Result<()> {
    let dir = AMQP.node_dir(node);
    let port = amqp_port(node);
    if port_open(port) {
        return Err(format!(
            "127.0.0.1:{port} (RabbitMQ node{node}'s AMQP port) is taken by another process"
        ));
    }
    for sub in ["mnesia", "log"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
    }
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| format!("writing {name} of node{node}: {e}"))
    };
    // Its own files, so that the system node's (/etc/rabbitmq: port 5672) are not read.
    write(
        "rabbitmq.conf",
        format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
    )?;
    write("rabbitmq-env.conf", String::new())?;
    write("enabled_plugins", "[].\n".to_owned())?;
    let (log, log2) = node_log(&dir, node)?;
    let child = Command::new(rabbitmq_sbin()?.join("rabbitmq-server"))
        .current_dir(&dir)
        .env("RABBITMQ_NODENAME", amqp_node_name(node))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env(
            "RABBITMQ_DIST_PORT",
            (AMQP_DIST_PORT + offset(node)).to_string(),
        )
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start rabbitmq-server for node{node}: {e}"))?;
    // Not waited for: the node runs on after xtask exits (init reaps it).
    drop(child);
    Ok(())
}

/// `rabbitmqctl -n evbusN@localhost <args>`: its standard output, or an error with both
/// outputs.
fn rabbitmqctl(node: usize, args: &[&str]) -> Result<String> {
    let output = Command::new(rabbitmq_sbin()?.join("rabbitmqctl"))
        .args(["-n", &amqp_node_name(node)])
        .args(args)
        .current_dir(AMQP.node_dir(node))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run rabbitmqctl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`rabbitmqctl -n {} {}` failed: {} {}",
            amqp_node_name(node),
            args.join(" "),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The running members of node `node`'s cluster, as it sees them.
fn amqp_running_nodes(node: usize) -> Option<Vec<String>> {
    let out = rabbitmqctl(node, &["cluster_status", "--formatter", "json"]).ok()?;
    let status: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    Some(
        status
            .get("running_nodes")?
            .as_array()?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect(),
    )
}

/// [`wait_until`] for the RabbitMQ cluster: every 500 ms.
fn amqp_wait(within: Duration, what: &str, ready: impl FnMut() -> bool) -> Result<()> {
    wait_until("amqp", Duration::from_millis(500), within, what, ready)
}

/// Whether every node runs and node 1 sees all of them in its cluster.
fn amqp_all_joined() -> bool {
    let everyone: Vec<String> = (1..=AMQP_NODES).map(amqp_node_name).collect();
    amqp_running_nodes(1).is_some_and(|running| everyone.iter().all(|n| running.contains(n)))
}

/// Starts the nodes that are not running, waits until each accepts AMQP connections, joins
/// nodes 2 and 3 to node 1's cluster where they are not in it yet, and waits until node 1
/// sees all three running. Idempotent.
fn amqp_start() -> Result<()> {
    // All at once: after a full stop, the node that stopped last must be up for the others
    // to finish booting (they wait for its Mnesia tables).
    AMQP.spawn_missing()?;
    for node in 1..=AMQP_NODES {
        amqp_wait(
            AMQP_BOOT_TIMEOUT,
            &format!("RabbitMQ node{node} did not accept AMQP connections"),
            || port_open(amqp_port(node)),
        )?;
    }
    let leader = amqp_node_name(1);
    for node in 2..=AMQP_NODES {
        let joined = amqp_running_nodes(node).is_some_and(|r| r.contains(&leader));
        if !joined {
            println!("joining {} to {leader}", amqp_node_name(node));
            rabbitmqctl(node, &["stop_app"])?;
            rabbitmqctl(node, &["join_cluster", &leader])?;
            rabbitmqctl(node, &["start_app"])?;
        }
    }
    amqp_wait(
        AMQP_BOOT_TIMEOUT,
        "the RabbitMQ nodes did not all run in one cluster",
        amqp_all_joined,
    )?;
    // Every node must take AMQP connections again after start_app.
    for node in 1..=AMQP_NODES {
        amqp_wait(
            AMQP_BOOT_TIMEOUT,
            &format!("RabbitMQ node{node} did not accept AMQP connections"),
            || port_open(amqp_port(node)),
        )?;
    }
    Ok(())
}

/// Waits until the restarted node accepts AMQP connections and sees itself running with
/// every other running node (it rejoins its cluster by itself). A node that is down, killed
/// on purpose, is not waited for.
fn amqp_rejoin(node: usize) -> Result<()> {
    amqp_wait(
        AMQP_BOOT_TIMEOUT,
        &format!("RabbitMQ node{node} did not accept AMQP connections"),
        || port_open(amqp_port(node)),
    )?;
    amqp_wait(
        AMQP_BOOT_TIMEOUT,
        &format!("RabbitMQ node{node} did not run in one cluster with the other running nodes"),
        || {
            let running: Vec<String> = (1..=AMQP_NODES)
                .filter(|&n| n == node || AMQP.pid(n).is_some())
                .map(amqp_node_name)
                .collect();
            amqp_running_nodes(node).is_some_and(|seen| running.iter().all(|n| seen.contains(n)))
        },
    )
}

/// The node (1-based) leading quorum queue `queue` (default vhost), asked of each running
/// node in turn.
#[allow(dead_code)] // For the fault suite's failover run (issue 20), not wired yet.
pub(crate) fn amqp_queue_leader(queue: &str) -> Option<usize> {
    for node in (1..=AMQP_NODES).filter(|&n| AMQP.pid(n).is_some()) {
        let Ok(out) = rabbitmqctl(
            node,
            &["list_queues", "name", "leader", "--formatter", "json"],
        ) else {
            continue;
        };
        let Ok(rows) = serde_json::from_str::<serde_json::Value>(out.trim()) else {
            continue;
        };
        let leader = rows
            .as_array()?
            .iter()
            .find(|row| row["name"] == queue)?
            .get("leader")?
            .as_str()?
            .to_owned();
        return leader
            .strip_prefix("evbus")
            .and_then(|rest| rest.split('@').next())
            .and_then(|n| n.parse().ok());
    }
    None
}

/// The status line of a running node: its name and whether its AMQP port is open.
fn amqp_describe(node: usize, pid: u32) -> String {
    let port = amqp_port(node);
    format!(
        "{} (pid {pid}), AMQP 127.0.0.1:{port} {}",
        amqp_node_name(node),
        if port_open(port) {
            "open"
        } else {
            "not open (booting?)"
        }
    )
}

/// Prints the running nodes node 1 sees; whether they are all in its cluster.
fn amqp_formed() -> bool {
    let joined = amqp_all_joined();
    println!(
        "amqp cluster: {}",
        match amqp_running_nodes(1) {
            Some(nodes) => format!("running nodes {}", nodes.join(", ")),
            None => "node1 does not answer rabbitmqctl".to_owned(),
        }
    );
    joined
}

// ---------------------------------------------------------------------------------------
// Redis Cluster

/// The Redis Cluster.
const REDIS: Cluster = Cluster {
    name: "redis",
    label: "Redis",
    nodes: REDIS_NODES,
    pid_file: "redis.pid",
    is_node: redis_is_node,
    port: redis_port,
    spawn: redis_spawn,
    start: redis_start,
    rejoin: redis_rejoin,
    describe: redis_describe,
    formed: redis_all_ok,
    url: redis_url,
    failover_parameters: "",
    stop_timeout: STOP_TIMEOUT,
};

/// Nodes of the Redis Cluster (three masters, three replicas).
const REDIS_NODES: usize = 6;
/// Client port of node 1 (node N: + N - 1); the cluster bus port is + 10000.
const REDIS_PORT: u16 = 7231;
/// `cluster-node-timeout`: how long a master may be unreachable before its replica takes
/// over (the failover itself follows within about another second).
const REDIS_NODE_TIMEOUT_MS: u64 = 3000;

/// The client port of Redis node `node`.
pub(crate) fn redis_port(node: usize) -> u16 {
    REDIS_PORT + offset(node)
}

/// The evbus URL of the Redis Cluster, without parameters:
/// `redis+cluster://127.0.0.1:7231,...,127.0.0.1:7236`.
fn redis_url() -> String {
    format!("redis+cluster://{}", hosts(REDIS_NODES, redis_port))
}

/// The redis-server binary: `EVBUS_REDIS_SERVER`, else `/usr/bin/redis-server` if present,
/// else `redis-server` on `PATH`.
fn redis_binary() -> String {
    server_binary("EVBUS_REDIS_SERVER", "/usr/bin/redis-server")
}

/// Whether `pid` is the redis-server of node `node` (on its port).
fn redis_is_node(pid: u32, node: usize) -> bool {
    // Redis sets its process title to `redis-server 127.0.0.1:PORT [cluster]`.
    cmdline(pid).is_some_and(|cmdline| {
        cmdline.contains("redis-server") && cmdline.contains(&format!(":{}", redis_port(node)))
    })
}

/// Spawns Redis node `node` in its own process group (it outlives xtask).
fn redis_spawn(node: usize) -> Result<()> {
    let dir = REDIS.node_dir(node);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let port = redis_port(node);
    if port_open(port) {
        return Err(format!(
            "127.0.0.1:{port} (Redis node{node}'s port) is taken by another process; stop it, \
             or see `cargo xtask cluster status redis`"
        ));
    }
    let (log, log2) = node_log(&dir, node)?;
    let child = Command::new(redis_binary())
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--daemonize", "no"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", &REDIS_NODE_TIMEOUT_MS.to_string()])
        .args(["--appendonly", "yes"])
        .args(["--appendfsync", "everysec"])
        .args(["--save", ""])
        // A replica (the restarted old master) resyncs at once, not after 5 s.
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(&dir)
        .arg("--pidfile")
        .arg(dir.join("redis.pid"))
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start {} for node{node}: {e}", redis_binary()))?;
    // Not waited for: the server runs on after xtask exits (init reaps it).
    drop(child);
    Ok(())
}

/// `redis-cli -h 127.0.0.1 -p <node's port> <args>`: its standard output, or an error.
fn redis_cli(node: usize, args: &[&str]) -> Result<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis_port(node).to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run redis-cli: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("Could not") {
        Ok(stdout)
    } else {
        Err(format!(
            "`redis-cli -p {} {}` failed: {} {}",
            redis_port(node),
            args.join(" "),
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `CLUSTER INFO` of node `node` as `(field, value)` pairs, if it answers.
fn redis_cluster_info(node: usize) -> Option<Vec<(String, String)>> {
    let out = redis_cli(node, &["CLUSTER", "INFO"]).ok()?;
    Some(
        out.lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

fn info_field(info: &[(String, String)], name: &str) -> Option<String> {
    info.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Whether node `node` answers with `cluster_state:ok` and knows all six nodes.
fn redis_node_ok(node: usize) -> bool {
    redis_cluster_info(node).is_some_and(|info| {
        info_field(&info, "cluster_state").as_deref() == Some("ok")
            && info_field(&info, "cluster_known_nodes").as_deref()
                == Some(&*REDIS_NODES.to_string())
    })
}

fn redis_all_ok() -> bool {
    (1..=REDIS_NODES).all(redis_node_ok)
}

/// [`wait_until`] for the Redis Cluster: every 200 ms.
fn redis_wait(within: Duration, what: &str, ready: impl FnMut() -> bool) -> Result<()> {
    wait_until("redis", Duration::from_millis(200), within, what, ready)
}

/// Starts the nodes that are not running, creates the cluster the first time (three masters
/// with one replica each) and waits until every node reports `cluster_state:ok`. Idempotent.
fn redis_start() -> Result<()> {
    REDIS.spawn_missing()?;
    for node in 1..=REDIS_NODES {
        redis_wait(
            READY_TIMEOUT,
            &format!("Redis node{node} did not answer"),
            || redis_cli(node, &["PING"]).is_ok_and(|out| out.trim() == "PONG"),
        )?;
    }
    // A node that never joined a cluster knows only itself and owns no slot.
    let fresh = redis_cluster_info(1).is_some_and(|info| {
        info_field(&info, "cluster_known_nodes").as_deref() == Some("1")
            && info_field(&info, "cluster_slots_assigned").as_deref() == Some("0")
    });
    if fresh {
        let hosts: Vec<String> = (1..=REDIS_NODES)
            .map(|n| format!("127.0.0.1:{}", redis_port(n)))
            .collect();
        println!("creating the Redis Cluster (redis-cli --cluster create, 1 replica per master)");
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&hosts)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run redis-cli --cluster create: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.contains("[OK] All 16384 slots covered") {
            return Err(format!(
                "redis-cli --cluster create failed: {} {}",
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    redis_wait(
        READY_TIMEOUT,
        "the Redis Cluster did not report cluster_state:ok on every node",
        redis_all_ok,
    )
}

/// Waits until the restarted node and every other running node report `cluster_state:ok`
/// (the restarted node rejoins the cluster from its `nodes.conf`, as a replica if its replica
/// took over meanwhile). A node that is down, killed on purpose, is not waited for.
fn redis_rejoin(node: usize) -> Result<()> {
    redis_wait(
        READY_TIMEOUT,
        &format!("Redis node{node} and the other running nodes did not report cluster_state:ok"),
        || {
            redis_node_ok(node)
                && (1..=REDIS_NODES)
                    .filter(|&n| n != node && REDIS.pid(n).is_some())
                    .all(redis_node_ok)
        },
    )
}

/// One line of `CLUSTER NODES`: the node (1-based, from its port), whether it is a master
/// that is not failed, and the slot ranges it serves.
struct RedisNodeLine {
    node: Option<usize>,
    master: bool,
    failed: bool,
    slots: Vec<(u16, u16)>,
}

fn parse_cluster_nodes(text: &str) -> Vec<RedisNodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields.get(1)?;
            let port: u16 = address
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields.get(2)?;
            let node = port
                .checked_sub(REDIS_PORT)
                .map(|o| usize::from(o) + 1)
                .filter(|n| (1..=REDIS_NODES).contains(n));
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|one| (one, one)),
                })
                .collect();
            Some(RedisNodeLine {
                node,
                master: flags.split(',').any(|f| f == "master"),
                failed: flags.split(',').any(|f| f == "fail" || f == "fail?"),
                slots,
            })
        })
        .collect()
}

/// The node (1-based) serving as master the hash slot of `key` (`CLUSTER KEYSLOT`, then
/// `CLUSTER NODES`), asked of each running node in turn.
#[allow(dead_code)] // For the fault suite's failover run (issue 20), not wired yet.
pub(crate) fn redis_slot_master(key: &str) -> Option<usize> {
    for node in (1..=REDIS_NODES).filter(|&n| REDIS.pid(n).is_some()) {
        let Some(slot) = redis_cli(node, &["CLUSTER", "KEYSLOT", key])
            .ok()
            .and_then(|out| out.trim().parse::<u16>().ok())
        else {
            continue;
        };
        let Ok(nodes) = redis_cli(node, &["CLUSTER", "NODES"]) else {
            continue;
        };
        return parse_cluster_nodes(&nodes)
            .into_iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .and_then(|n| n.node);
    }
    None
}

/// The status line of a running node: its port, role and `cluster_state`.
fn redis_describe(node: usize, pid: u32) -> String {
    let info = redis_cluster_info(node).unwrap_or_default();
    let role = redis_cli(node, &["ROLE"])
        .ok()
        .and_then(|out| out.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    format!(
        "running (pid {pid}), 127.0.0.1:{}, {role}, cluster_state {}",
        redis_port(node),
        info_field(&info, "cluster_state").unwrap_or_else(|| "?".to_owned())
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::atomic::{AtomicU16, AtomicUsize};

    use super::*;

    #[test]
    fn the_url_names_every_client_port() {
        assert_eq!(
            NATS.url(),
            "nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233"
        );
        assert!(NATS.check_node(0).is_err());
        assert!(NATS.check_node(NATS_NODES + 1).is_err());
        assert!(of("kafka").is_err());
        of("redis").unwrap().check_node(6).unwrap();
        assert!(of("redis").unwrap().check_node(7).is_err());
        assert!(of("nats").unwrap().check_node(4).is_err());
        assert_eq!(
            REDIS.url(),
            "redis+cluster://127.0.0.1:7231,127.0.0.1:7232,127.0.0.1:7233,127.0.0.1:7234,\
             127.0.0.1:7235,127.0.0.1:7236"
        );
        assert_eq!(
            AMQP.url(),
            "amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/%2f"
        );
        assert_eq!(AMQP.nodes, 3);
    }

    #[test]
    fn each_broker_names_its_own_cluster() {
        for name in ["nats", "amqp", "redis"] {
            assert_eq!(of(name).unwrap().name, name);
        }
        assert_eq!(
            of("kafka").err().unwrap(),
            "no local cluster for `kafka`; known: nats, amqp, redis"
        );
        assert_eq!(
            server_binary("EVBUS_XTASK_NO_SUCH_VAR", "/no/such/dir/nats-server"),
            "nats-server"
        );
        assert_eq!(
            REDIS.node_dir(2),
            cluster_dir("redis").join("node2"),
            "pid files and data in ~/.cache/evbus/clusters/<broker>/nodeN"
        );
    }

    #[test]
    fn the_cluster_directory_is_the_one_the_failover_tests_read() {
        // `evbus_conformance::failover::cluster_dir`: the variable first, then the home.
        assert_eq!(
            cluster_dir_in("redis", Some("/srv/rc".into()), Some("/home/u".into())),
            PathBuf::from("/srv/rc")
        );
        assert_eq!(
            cluster_dir_in("nats", None, Some("/home/u".into())),
            PathBuf::from("/home/u/.cache/evbus/clusters/nats")
        );
        assert_eq!(
            cluster_dir_in("amqp", None, None),
            PathBuf::from("/tmp/.cache/evbus/clusters/amqp")
        );
    }

    #[test]
    fn the_failover_command_names_the_test_and_a_url_it_accepts() {
        assert_eq!(
            NATS.failover_command(),
            "EVBUS_NATS_CLUSTER_URL='nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233\
             ?replicas=3' cargo test -p evbus-nats --test cluster_failover -- --nocapture"
        );
        assert!(
            REDIS
                .failover_command()
                .starts_with("EVBUS_REDIS_CLUSTER_URL='redis+cluster://127.0.0.1:7231,"),
            "{}",
            REDIS.failover_command()
        );
        assert!(
            AMQP.failover_command()
                .ends_with("/%2f' cargo test -p evbus-amqp --test cluster_failover -- --nocapture"),
            "{}",
            AMQP.failover_command()
        );
    }

    static TEST_PORTS: [AtomicU16; 2] = [AtomicU16::new(0), AtomicU16::new(0)];
    static SPAWNED: AtomicUsize = AtomicUsize::new(0);

    fn test_port(node: usize) -> u16 {
        TEST_PORTS[node - 1].load(SeqCst)
    }

    fn test_spawn(_node: usize) -> Result<()> {
        SPAWNED.fetch_add(1, SeqCst);
        Ok(())
    }

    /// A cluster of two nodes whose pid files do not exist (both missing) and whose spawn
    /// only counts.
    const TWO: Cluster = Cluster {
        name: "xtask-unit-test-no-such-cluster",
        label: "Test",
        nodes: 2,
        pid_file: "test.pid",
        is_node: |_, _| false,
        port: test_port,
        spawn: test_spawn,
        start: || Ok(()),
        rejoin: |_| Ok(()),
        describe: |_, _| String::new(),
        formed: || false,
        url: String::new,
        failover_parameters: "",
        stop_timeout: STOP_TIMEOUT,
    };

    #[test]
    fn a_taken_port_fails_the_start_before_any_node_is_spawned() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let free_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        TEST_PORTS[0].store(free_port, SeqCst);
        TEST_PORTS[1].store(taken_port, SeqCst);
        let err = TWO.spawn_missing().unwrap_err();
        assert!(
            err.contains(&format!(
                "127.0.0.1:{taken_port} (Test node2's port) is taken"
            )) && err.contains("no node was started"),
            "{err}"
        );
        assert_eq!(
            SPAWNED.load(SeqCst),
            0,
            "node1 was started although node2's port is taken"
        );
        drop(taken);
        TWO.spawn_missing().unwrap();
        assert_eq!(SPAWNED.load(SeqCst), 2);
    }

    #[test]
    fn cluster_nodes_lines_give_each_masters_slots() {
        let text = "\
a1 127.0.0.1:7231@17231 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7232@17232 master,fail - 0 0 2 connected
c3 127.0.0.1:7235@17235 master - 0 0 7 connected 5461-10922 12000 [123->-x]
d4 127.0.0.1:7236@17236 slave a1 0 0 1 connected
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].node, Some(1));
        assert!(nodes[0].master && !nodes[0].failed);
        assert_eq!(nodes[0].slots, [(0, 5460)]);
        assert!(nodes[1].failed);
        assert_eq!(nodes[2].node, Some(5));
        assert_eq!(nodes[2].slots, [(5461, 10922), (12000, 12000)]);
        assert!(!nodes[3].master);
    }
}
