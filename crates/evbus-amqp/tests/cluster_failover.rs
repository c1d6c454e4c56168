//! Failover on a RabbitMQ cluster: events sent through the adapter to a quorum queue while
//! the node leading that queue is SIGKILLed and restarted; every event whose send returned
//! `Ok` must be received.
//!
//! Runs only when `EVBUS_AMQP_CLUSTER_URL` names the cluster, e.g. the one `cargo xtask
//! cluster start amqp` starts:
//!
//! ```sh
//! cargo xtask cluster start amqp
//! EVBUS_AMQP_CLUSTER_URL='amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/%2f' \
//!     cargo test -p evbus-amqp --test cluster_failover -- --nocapture
//! ```
//!
//! Without it the test says loudly that it did not run, and passes (CI does not start the
//! cluster). The test asks `rabbitmqctl` (`EVBUS_RABBITMQ_SBIN`, default the newest
//! `/usr/lib/rabbitmq/lib/*/sbin`) for the queue's leader, finds that node's VM through the
//! harness's pid file (`$EVBUS_AMQP_CLUSTER_DIR/nodeN/rabbitmq.pid` for node `evbusN@...`,
//! default `~/.cache/evbus/clusters/amqp`), and restarts it with `rabbitmq-server` and the
//! environment it read from `/proc` before the kill. `EVBUS_FAILOVER_EVENTS` sets the
//! number of events (default 20,000).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evbus::{ConsumerOptions, SubscribeOptions, Transport};
use evbus_amqp::{AmqpConfig, AmqpTransport};
use evbus_conformance::failover::{self, Emitter, Failover, Received, Verb};
use tokio::sync::Mutex;

/// How long the killed node stays down.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// How long consumption may take to catch up at the end.
const DRAIN: Duration = Duration::from_secs(180);

fn sbin() -> PathBuf {
    if let Some(dir) = std::env::var_os("EVBUS_RABBITMQ_SBIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .expect("RabbitMQ in /usr/lib/rabbitmq/lib (or set EVBUS_RABBITMQ_SBIN)")
        .filter_map(|e| e.ok().map(|e| e.path().join("sbin")))
        .filter(|p| p.join("rabbitmqctl").exists())
        .collect();
    found.sort();
    found.pop().expect("a rabbitmq_server-*/sbin directory")
}

/// The leader node of quorum queue `queue`, asked of each node in turn until one answers.
fn queue_leader(queue: &str) -> Option<String> {
    for node in 1..=3 {
        let out = Command::new(sbin().join("rabbitmqctl"))
            .args(["-n", &format!("evbus{node}@localhost")])
            .args(["list_queues", "name", "leader", "--formatter", "json"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let Ok(out) = out else { continue };
        let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        for row in rows.as_array().into_iter().flatten() {
            if row["name"] == queue {
                return row["leader"].as_str().map(str::to_owned);
            }
        }
    }
    None
}

/// The node directory, pid and environment of node `node_name` (`evbusN@localhost`).
fn node_process(node_name: &str) -> (PathBuf, u32, Vec<(String, String)>) {
    let n = node_name
        .strip_prefix("evbus")
        .and_then(|rest| rest.split('@').next())
        .unwrap_or_else(|| panic!("`{node_name}` is not a node of the cluster harness"));
    let dir = failover::cluster_dir("amqp").join(format!("node{n}"));
    let pid_file = dir.join("rabbitmq.pid");
    let pid = failover::read_pid(&pid_file);
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("node {node_name} (pid {pid}) is not running: {e}"));
    let env: Vec<(String, String)> = environ
        .split(|&b| b == 0)
        .filter_map(|var| {
            let var = String::from_utf8_lossy(var);
            var.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    assert!(
        env.iter()
            .any(|(k, v)| k == "RABBITMQ_NODENAME" && v == node_name),
        "pid {pid} of {} is not {node_name}",
        pid_file.display()
    );
    (dir, pid, env)
}

/// Where the events go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    /// An evbus queue (a quorum queue), received by one consumer.
    Queue,
    /// An evbus topic (a fanout exchange) with one named subscription (a quorum queue bound
    /// to it, recorded in the topic's classic directory queue).
    Topic,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_the_queue_leader_is_killed() {
    failover(Shape::Queue).await;
}

/// The subscription's quorum queue is declared by the consumer's connection, so RabbitMQ
/// places its leader on that node, and the topic's directory queue too: the kill takes the
/// consumer's connection, and its re-attachment waits for the directory's node to be back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_a_subscription_leader_is_killed() {
    failover(Shape::Topic).await;
}

/// One node kill at a time: libtest runs the tests of this file in parallel, and two nodes
/// down of three leave the quorum queues without a majority (no leader until one is back),
/// which is not the failover this file measures.
static ONE_KILL_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn failover(shape: Shape) {
    let _one_at_a_time = ONE_KILL_AT_A_TIME.lock().await;
    let Some(url) = failover::cluster_url(
        "EVBUS_AMQP_CLUSTER_URL",
        "amqp",
        "amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/%2f",
    ) else {
        return;
    };
    let config = AmqpConfig::from_url(&url).expect("EVBUS_AMQP_CLUSTER_URL is an AMQP URL");
    let sender_transport = AmqpTransport::connect(config.clone())
        .await
        .expect("the cluster at EVBUS_AMQP_CLUSTER_URL is reachable");
    // The consumer on its own connection (it may land on another node).
    let consumer_transport = AmqpTransport::connect(config)
        .await
        .expect("a second connection");
    let name = failover::unique(&format!("{shape:?}").to_lowercase());
    let (target, subscription, queue_name) = match shape {
        Shape::Queue => (
            Emitter::Queue(sender_transport.queue(&name).await.unwrap()),
            consumer_transport
                .queue(&name)
                .await
                .unwrap()
                .receive(ConsumerOptions::default())
                .await
                .unwrap(),
            sender_transport.queue_name(&name),
        ),
        Shape::Topic => (
            Emitter::Topic(sender_transport.topic(&name).await.unwrap()),
            consumer_transport
                .topic(&name)
                .await
                .unwrap()
                .subscribe(SubscribeOptions::named("failover"))
                .await
                .unwrap(),
            sender_transport.subscription_queue_name(&name, "failover"),
        ),
    };

    // The leader is found before the sends start: `rabbitmqctl` takes seconds on a loaded
    // machine, and asked at the quarter mark it let the kill land after the last send (a run
    // that measured no failover at all). Nothing fails over in between: the leader stays.
    let asked = Instant::now();
    let leader = tokio::task::block_in_place(|| queue_leader(&queue_name))
        .unwrap_or_else(|| panic!("no leader reported for queue {queue_name}"));
    let (dir, pid, env) = node_process(&leader);
    eprintln!(
        "{leader} (pid {pid}) leads {queue_name} (asked in {:?})",
        asked.elapsed()
    );

    let received = Received::consume(subscription);
    let events = failover::events_from_env();
    let run = Failover::new(format!("amqp-cluster ({shape:?})"))
        .events(events)
        .drain(DRAIN)
        .verb(Verb::Send)
        .start(target, &received);

    run.wait_for_a_quarter().await;
    let kill = run.kill(pid);
    let at = run.done();
    eprintln!("SIGKILLed {leader} (pid {pid}), the leader of {queue_name}, after {at} Ok sends");
    assert!(
        at < events,
        "the kill came after all {events} sends: this run measured no failover"
    );
    tokio::time::sleep(DOWN_FOR).await;
    let new_leader = tokio::task::block_in_place(|| queue_leader(&queue_name));
    {
        use std::os::unix::process::CommandExt;
        let child = Command::new(sbin().join("rabbitmq-server"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("restarting the killed node");
        eprintln!(
            "restarting {leader} (pid {}) after {:?}; the queue's leader meanwhile: {new_leader:?}",
            child.id(),
            kill.elapsed()
        );
        // Not waited for: the node belongs to the cluster and outlives this test.
        drop(child);
    }

    run.finish(received).await.check();
    // The killed node must be back (AMQP port open) before the next test.
    let port: u16 = env
        .iter()
        .find(|(k, _)| k == "RABBITMQ_NODE_PORT")
        .and_then(|(_, v)| v.parse().ok())
        .expect("RABBITMQ_NODE_PORT in the node's environment");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the restarted node did not open its AMQP port within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{leader} takes connections again {:?} after the kill",
        kill.elapsed()
    );
    match shape {
        Shape::Queue => sender_transport.delete_queue(&name).await.unwrap(),
        Shape::Topic => sender_transport.delete_topic(&name).await.unwrap(),
    }
    sender_transport.close().await.unwrap();
    consumer_transport.close().await.unwrap();
}
