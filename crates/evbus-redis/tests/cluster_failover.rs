//! Failover on a Redis Cluster: events published through the adapter while the master
//! owning their stream's hash slot is SIGKILLed and restarted; every event whose publish
//! returned `Ok` must be consumed.
//!
//! Runs only when `EVBUS_REDIS_CLUSTER_URL` names the cluster, e.g. the one `cargo xtask
//! cluster start redis` starts:
//!
//! ```sh
//! cargo xtask cluster start redis
//! EVBUS_REDIS_CLUSTER_URL='redis+cluster://127.0.0.1:7231,127.0.0.1:7232,127.0.0.1:7233' \
//!     cargo test -p evbus-redis --test cluster_failover -- --nocapture
//! ```
//!
//! Without it the test says loudly that it did not run, and passes (CI does not start the
//! cluster). The test finds the master's process through the pid files of that harness,
//! `$EVBUS_REDIS_CLUSTER_DIR/node*/redis.pid` (default `~/.cache/evbus/clusters/redis`), and
//! restarts it on its directory with the harness's settings. `EVBUS_FAILOVER_EVENTS` sets
//! the number of events (default 20,000).
//!
//! With the default `wait_replicas` of a cluster URL (1: every publish waits until the
//! master's replica has the event) no `Ok` event may be lost. With `?wait_replicas=0` in the
//! URL the test only measures what an asynchronous-replication failover loses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evbus::{Event, SubscribeOptions, Topic, Transport};
use evbus_conformance::failover::{self, Emitter, Failover, Received};
use evbus_redis::{RedisConfig, RedisTransport};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

/// How long the killed master stays down.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// The tests of this file run one at a time: one kills a node of the cluster the other uses.
static SERIAL: Mutex<()> = Mutex::const_new(());
/// `cluster-node-timeout` of `cargo xtask cluster` (the restarted node gets the same).
const NODE_TIMEOUT_MS: &str = "3000";

/// The pid and data directory of the harness's node listening on `port`.
fn node_process(port: u16) -> (u32, PathBuf) {
    let dirs = std::fs::read_dir(failover::cluster_dir("redis"))
        .unwrap_or_else(|e| panic!("reading {}: {e}", failover::cluster_dir("redis").display()));
    for dir in dirs.filter_map(|d| d.ok().map(|d| d.path())) {
        let Some(pid) = std::fs::read_to_string(dir.join("redis.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // Redis sets its process title to `redis-server 127.0.0.1:PORT [cluster]`.
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("redis-server") && cmdline.contains(&format!(":{port}")) {
            return (pid, dir);
        }
    }
    panic!(
        "no redis-server of {} listens on port {port}",
        failover::cluster_dir("redis").display()
    );
}

/// Starts the node of `dir` on `port` again, as `cargo xtask cluster` starts it.
fn restart_node(port: u16, dir: &Path) -> u32 {
    use std::os::unix::process::CommandExt;
    let binary = std::env::var("EVBUS_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = Command::new(binary)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--daemonize", "no"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ])
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(dir)
        .arg("--pidfile")
        .arg(dir.join("redis.pid"))
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("restarting the killed redis-server");
    let pid = child.id();
    // Not waited for: the server belongs to the cluster and outlives this test.
    drop(child);
    pid
}

/// The port of the master serving `key`'s slot, from `CLUSTER KEYSLOT` and `CLUSTER NODES`.
async fn slot_master(conn: &mut ClusterConnection, key: &str) -> (u16, u16) {
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .expect("CLUSTER KEYSLOT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(conn)
            .await
            .expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                continue;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            let port = address
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            if let (true, Some(port)) = (serves, port) {
                return (slot, port);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no live master serves slot {slot}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the node on `port` is in the cluster again: it answers, reports
/// `cluster_state:ok`, and (a replica now) its link to its master is up.
async fn wait_rejoined(port: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    loop {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let synced = replication.contains("role:master")
                || replication.contains("master_link_status:up");
            if info.contains("cluster_state:ok") && synced {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < within,
            "the restarted node on port {port} did not rejoin the cluster within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_the_slot_master_is_killed() {
    let Some(url) = failover::cluster_url(
        "EVBUS_REDIS_CLUSTER_URL",
        "redis",
        "redis+cluster://127.0.0.1:7231,127.0.0.1:7232,127.0.0.1:7233",
    ) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let config = RedisConfig::from_url(&url).expect("EVBUS_REDIS_CLUSTER_URL is a Redis URL");
    assert!(
        config.is_cluster(),
        "EVBUS_REDIS_CLUSTER_URL must be a redis+cluster:// URL"
    );
    let waits_for = config.replicas_to_wait_for();
    let nodes = config.cluster_nodes().unwrap();
    let transport = RedisTransport::connect(config)
        .await
        .expect("the cluster at EVBUS_REDIS_CLUSTER_URL is reachable");
    let name = failover::unique("topic");
    let topic: Arc<dyn Topic> = transport.topic(&name).await.unwrap();
    let subscription = topic
        .subscribe(SubscribeOptions::named("failover"))
        .await
        .unwrap();
    let stream = transport.topic_key(&name);
    let mut admin = ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .expect("a plain cluster client");

    // Consumer: ack everything, count deliveries per id. Publishers: every event until Ok,
    // with a progress line every 5 s (and the latest retryable error).
    let received = Received::consume(subscription);
    let run = Failover::new("redis-cluster")
        .detail(format!("wait_replicas {waits_for}"))
        .progress(Duration::from_secs(5))
        .start(Emitter::Topic(Arc::clone(&topic)), &received);

    // The fault: once a quarter is published, SIGKILL the master of the stream's slot,
    // restart it later.
    run.wait_for_a_quarter().await;
    let (slot, port) = slot_master(&mut admin, &stream).await;
    let (pid, dir) = node_process(port);
    let kill = run.kill(pid);
    let at = run.done();
    eprintln!(
        "SIGKILLed the master 127.0.0.1:{port} (pid {pid}) of slot {slot} ({stream}) after {at} \
         Ok publishes"
    );
    tokio::time::sleep(DOWN_FOR).await;
    let (_, new_master) = slot_master(&mut admin, &stream).await;
    let new_pid = restart_node(port, &dir);
    eprintln!(
        "restarted 127.0.0.1:{port} (pid {new_pid}) after {:?}; the slot's master meanwhile: \
         127.0.0.1:{new_master}",
        kill.elapsed()
    );

    let outcome = run.finish(received).await;
    if let Some(e) = &outcome.last_error {
        eprintln!("last retryable publish error: {e}");
    }
    let rejoined = wait_rejoined(port, Duration::from_secs(60)).await;
    eprintln!("127.0.0.1:{port} back in the cluster {rejoined:?} after the wait began");
    outcome.check_bound();
    if waits_for >= 1 {
        outcome.check_none_lost();
    } else if !outcome.missing.is_empty() {
        eprintln!(
            "wait_replicas=0: {} Ok-returned events were lost with the killed master \
             (asynchronous replication); measured, not asserted",
            outcome.missing.len()
        );
    }
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}

/// The registry form of a cluster URL: one host, the other seed nodes in `servers`.
#[tokio::test]
async fn the_registry_opens_a_cluster_from_one_host_and_the_servers_parameter() {
    let Ok(url) = std::env::var("EVBUS_REDIS_CLUSTER_URL") else {
        let _ = writeln!(
            std::io::stderr(),
            "\nWARNING: the registry cluster test was NOT run: EVBUS_REDIS_CLUSTER_URL is not \
             set.\n"
        );
        return;
    };
    let _serial = SERIAL.lock().await;
    let nodes = RedisConfig::from_url(&url)
        .unwrap()
        .cluster_nodes()
        .unwrap();
    let hosts: Vec<&str> = nodes
        .iter()
        .map(|n| n.rsplit('@').next().unwrap().trim_start_matches("redis://"))
        .collect();
    let registry_url = format!(
        "redis+cluster://{}?servers={}&prefix=registry:",
        hosts[0],
        hosts[1..].join(",")
    );
    let mut registry = evbus::Registry::new();
    registry.register(evbus_redis::RedisConnector);
    let transport = registry.connect(&registry_url).await.unwrap();
    let name = failover::unique("registry");
    let topic = transport.topic(&name).await.unwrap();
    let mut subscription = topic
        .subscribe(SubscribeOptions::named("registry"))
        .await
        .unwrap();
    let event = Event::builder("registry.tick", "/failover")
        .build()
        .unwrap();
    topic.publish(&event).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next_delivery())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open")
        .unwrap();
    assert_eq!(delivery.event().id(), event.id());
    delivery.ack().await.unwrap();
    drop(subscription);
    transport.delete_topic(&name).await.unwrap();
    transport.close().await.unwrap();
}
