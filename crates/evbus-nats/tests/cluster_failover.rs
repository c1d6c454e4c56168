//! Failover on a JetStream cluster: events published through the adapter while the server
//! leading their stream is SIGKILLed and restarted; every event whose publish returned `Ok`
//! must be consumed.
//!
//! Runs only when `EVBUS_NATS_CLUSTER_URL` names the cluster, e.g. the one `cargo xtask
//! cluster start nats` starts:
//!
//! ```sh
//! cargo xtask cluster start nats
//! EVBUS_NATS_CLUSTER_URL='nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233?replicas=3' \
//!     cargo test -p evbus-nats --test cluster_failover -- --nocapture
//! ```
//!
//! Without it the test says loudly that it did not run, and passes (CI does not start the
//! cluster). The test finds the leader's process through the pid files of that harness:
//! `$EVBUS_NATS_CLUSTER_DIR/<server name>/nats.pid` (default
//! `~/.cache/evbus/clusters/nats`), and restarts it with the command line it read from
//! `/proc` before the kill. `EVBUS_FAILOVER_EVENTS` sets the number of events (default
//! 20,000).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evbus::{SubscribeOptions, Topic, Transport};
use evbus_conformance::failover::{self, Emitter, Failover, Received};
use evbus_nats::{NatsConfig, NatsTransport};

/// How long the killed server stays down.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// The pid and command line of the server named `server`.
fn server_process(server: &str) -> (u32, Vec<String>) {
    let pid_file = failover::cluster_dir("nats").join(server).join("nats.pid");
    let pid = failover::read_pid(&pid_file);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("server {server} (pid {pid}) is not running: {e}"));
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        argv.first().is_some_and(|a| a.contains("nats-server")),
        "pid {pid} of {} is not a nats-server: {argv:?}",
        pid_file.display()
    );
    (pid, argv)
}

/// The server leading `stream`, asked with a plain client until one is reported.
async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = js.get_stream(stream).await
            && let Ok(info) = s.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "no leader reported for stream {stream}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_the_stream_leader_is_killed() {
    let Some(url) = failover::cluster_url(
        "EVBUS_NATS_CLUSTER_URL",
        "nats",
        "nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233?replicas=3",
    ) else {
        return;
    };
    let config = NatsConfig::from_url(&url).expect("EVBUS_NATS_CLUSTER_URL is a NATS URL");
    assert!(
        config.replicas >= 3,
        "EVBUS_NATS_CLUSTER_URL must ask for replicas=3 (a stream on one server cannot survive \
         its loss)"
    );
    let servers: Vec<String> = config
        .server_urls()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    let transport = NatsTransport::connect(config)
        .await
        .expect("the cluster at EVBUS_NATS_CLUSTER_URL is reachable");
    let name = failover::unique("topic");
    let topic: Arc<dyn Topic> = transport.topic(&name).await.unwrap();
    let subscription = topic
        .subscribe(SubscribeOptions::named("failover"))
        .await
        .unwrap();
    let stream = transport.topic_stream(&name).unwrap();
    let client = async_nats::connect(servers).await.expect("a plain client");
    let js = async_nats::jetstream::new(client);

    // Consumer: ack everything, count deliveries per id. Publishers: every event until Ok.
    let received = Received::consume(subscription);
    let run = Failover::new("nats-cluster").start(Emitter::Topic(Arc::clone(&topic)), &received);

    // The fault: once a quarter is published, SIGKILL the stream's leader, restart it later.
    run.wait_for_a_quarter().await;
    let leader = stream_leader(&js, &stream).await;
    let (pid, argv) = server_process(&leader);
    let kill = run.kill(pid);
    let at = run.done();
    eprintln!("SIGKILLed {leader} (pid {pid}), the leader of {stream}, after {at} Ok publishes");
    tokio::time::sleep(DOWN_FOR).await;
    let new_leader = stream_leader(&js, &stream).await;
    {
        use std::os::unix::process::CommandExt;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("restarting the killed server");
        eprintln!(
            "restarted {leader} (pid {}) after {:?}; the stream's leader meanwhile: {new_leader}",
            child.id(),
            kill.elapsed()
        );
        // Not waited for: the server belongs to the cluster and outlives this test.
        drop(child);
    }

    run.finish(received).await.check();
    // The killed server must be back in the stream's replica set before the next test.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = js.get_stream(&stream).await.unwrap();
        let info = s.info().await.unwrap();
        let current = info
            .cluster
            .as_ref()
            .map(|c| c.replicas.iter().filter(|r| r.current).count())
            .unwrap_or(0);
        if current == 2 {
            eprintln!(
                "{leader} caught up after {:?} from the kill",
                kill.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server did not catch up with the stream within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    js.delete_stream(&stream).await.unwrap();
    transport.close().await.unwrap();
}
