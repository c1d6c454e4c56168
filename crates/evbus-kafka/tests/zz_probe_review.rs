//! Reviewer probes (temporary).

mod support;

use std::time::Duration;

use evbus::{ConsumerOptions, Event, StartPosition, SubscribeOptions, Transport};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::TopicPartitionList;

fn ev(i: u32, key: &str) -> Event {
    Event::builder("probe", "/tests")
        .json(&i)
        .and_then(|b| b.partition_key(key).build())
        .expect("event")
}

fn uniq(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

async fn next_opt(sub: &mut evbus::Subscription, secs: u64) -> Option<evbus::Delivery> {
    match tokio::time::timeout(Duration::from_secs(secs), sub.next_delivery()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("delivery error: {e}"),
        Ok(None) => None,
        Err(_) => None,
    }
}

/// Committed offsets of `group` on `topic` partitions 0..n, read with a plain client.
fn committed(group: &str, topic: &str, n: i32) -> Vec<String> {
    let url = support::kafka_url();
    let servers = url
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    got.elements()
        .iter()
        .map(|e| {
            let (lo, hi) = c
                .fetch_watermarks(topic, e.partition(), Duration::from_secs(5))
                .unwrap_or((-1, -1));
            format!(
                "p{} committed={:?} watermarks=({lo},{hi})",
                e.partition(),
                e.offset()
            )
        })
        .collect()
}

/// Two different (topic, subscription) pairs map to one consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_names_collide() {
    let Some(t) = support::connect_with("").await else {
        return;
    };
    let base = uniq("zzpc");
    let ta = t.topic(&format!("{base}.a")).await.unwrap();
    let tb = t.topic(&base).await.unwrap();
    let mut s1 = ta.subscribe(SubscribeOptions::named("b")).await.unwrap();
    ta.publish(&ev(1, "k")).await.unwrap();
    let d = next_opt(&mut s1, 20).await.expect("delivery on s1");
    eprintln!("s1 got attempt {}", d.attempt());
    // An unrelated subscription: topic `<base>`, subscription `a.b`.
    let _s2 = tb.subscribe(SubscribeOptions::named("a.b")).await.unwrap();
    eprintln!("s2 subscribed");
    let r = d.ack().await;
    eprintln!("ack of s1's delivery after s2 subscribed: {r:?}");
    let again = next_opt(&mut s1, 15).await;
    eprintln!(
        "s1 redelivered: {:?}",
        again
            .as_ref()
            .map(|d| (d.event().id().to_owned(), d.attempt()))
    );
    assert!(
        r.is_ok(),
        "opening an unrelated subscription expired s1's delivery: {r:?}"
    );
}

/// A state topic with fewer partitions than the consumed topic: no commit ever lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_topic_with_fewer_partitions_blocks_commits() {
    let Some(a) = support::connect_with("partitions=1&offset_state=state_topic").await else {
        return;
    };
    let name = uniq("zzps");
    let topic = a.topic(&name).await.unwrap();
    let sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    drop(sub);
    a.delete_topic(&name).await.unwrap();
    a.close().await.unwrap();

    let b = support::connect_with("partitions=3&offset_state=state_topic")
        .await
        .unwrap();
    let topic = b.topic(&name).await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    for i in 0..30 {
        topic.publish(&ev(i, &format!("key-{i}"))).await.unwrap();
    }
    for _ in 0..30 {
        let d = next_opt(&mut sub, 20).await.expect("delivery");
        d.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let group = format!("evbus.sub.{name}.s");
    let c = tokio::task::spawn_blocking(move || committed(&group, &name, 3))
        .await
        .unwrap();
    eprintln!("after acking all 30 (subscription still open): {c:#?}");
    drop(sub);
    b.close().await.unwrap();
}

/// Out-of-order ack state of a deleted topic's subscription applies to the recreated topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_state_after_delete_topic() {
    let Some(a) = support::connect_with("partitions=1&offset_state=state_topic").await else {
        return;
    };
    let name = uniq("zzpd");
    let topic = a.topic(&name).await.unwrap();
    topic.publish(&ev(0, "k")).await.unwrap();
    topic.publish(&ev(1, "k")).await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("s").start(StartPosition::Earliest))
        .await
        .unwrap();
    let d0 = next_opt(&mut sub, 20).await.expect("d0");
    let d1 = next_opt(&mut sub, 20).await.expect("d1");
    d1.ack().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(d0);
    drop(sub);
    a.delete_topic(&name).await.unwrap();
    eprintln!("deleted; recreating");
    let topic = a.topic(&name).await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    let (f0, f1) = (ev(10, "k"), ev(11, "k"));
    topic.publish(&f0).await.unwrap();
    topic.publish(&f1).await.unwrap();
    let mut got = Vec::new();
    while let Some(d) = next_opt(&mut sub, 8).await {
        let data = String::from_utf8_lossy(d.event().data().map(|b| &b[..]).unwrap_or_default())
            .to_string();
        got.push((data, d.attempt()));
        d.ack().await.unwrap();
    }
    eprintln!("new life of the subscription received (data, attempt): {got:?}");
    drop(sub);
    a.close().await.unwrap();
    assert_eq!(got.len(), 2, "events of the recreated topic lost: {got:?}");
}

/// A queue deleted and created again: does its group's old committed offset apply?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_recreated_after_delete() {
    let Some(a) = support::connect_with("partitions=1").await else {
        return;
    };
    let name = uniq("zzpq");
    let q = a.queue(&name).await.unwrap();
    for i in 0..3 {
        q.send(&ev(i, "k")).await.unwrap();
    }
    let mut c = q.receive(ConsumerOptions::default()).await.unwrap();
    for _ in 0..3 {
        next_opt(&mut c, 20).await.expect("d").ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(c);
    a.delete_queue(&name).await.unwrap();
    let q = a.queue(&name).await.unwrap();
    for i in 10..13 {
        q.send(&ev(i, "k")).await.unwrap();
    }
    let mut c = q.receive(ConsumerOptions::default()).await.unwrap();
    let mut got = Vec::new();
    while let Some(d) = next_opt(&mut c, 8).await {
        got.push(
            String::from_utf8_lossy(d.event().data().map(|b| &b[..]).unwrap_or_default())
                .to_string(),
        );
        d.ack().await.unwrap();
    }
    eprintln!("recreated queue delivered: {got:?}");
    drop(c);
    a.close().await.unwrap();
    assert_eq!(got.len(), 3, "{got:?}");
}

/// `message_timeout_ms=0` is accepted; librdkafka reads 0 as "no timeout".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_timeout_zero_publish_hangs_in_outage() {
    let broker = match support::TansuBehindProxy::start().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("no tansu: {e}");
            return;
        }
    };
    let url = format!("{}?message_timeout_ms=0", broker.url());
    let config = support::test_config(&url).expect("config accepted");
    let t = evbus_kafka::KafkaTransport::connect(config).await.unwrap();
    let topic = t.topic("zzp-mt").await.unwrap();
    topic.publish(&ev(0, "k")).await.unwrap();
    broker.proxy.cut();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(45), topic.publish(&ev(1, "k"))).await;
    eprintln!("publish during outage after {:?}: {r:?}", started.elapsed());
    let closed = tokio::time::timeout(Duration::from_secs(10), t.close()).await;
    eprintln!("close: {closed:?}");
    assert!(r.is_ok(), "publish did not return within 45 s");
}

/// Config values accepted by from_url that fail later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_config_values() {
    for params in [
        "operation_timeout_ms=0",
        "assignment_timeout_ms=0",
        "session_timeout_ms=4000000",
        "heartbeat_interval_ms=0",
        "message_timeout_ms=3000000000",
    ] {
        let url = format!("kafka://127.0.0.1:9092?{params}");
        let config = match evbus_kafka::KafkaConfig::from_url(&url) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{params}: from_url refused: {:?} {e}", e.kind());
                continue;
            }
        };
        let t = match evbus_kafka::KafkaTransport::connect(config).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{params}: from_url OK, connect failed: {:?} {e}", e.kind());
                continue;
            }
        };
        let name = uniq("zzpo");
        let r = async {
            let topic = t.topic(&name).await?;
            topic.publish(&ev(0, "k")).await?;
            let _s = topic.subscribe(SubscribeOptions::named("s")).await?;
            evbus::Result::Ok(())
        };
        let r: Result<evbus::Result<()>, _> =
            tokio::time::timeout(Duration::from_secs(40), r).await;
        match r {
            Ok(Ok(())) => eprintln!("{params}: connect, publish and subscribe OK"),
            Ok(Err(e)) => eprintln!("{params}: connect OK, then {:?} {e}", e.kind()),
            Err(_) => eprintln!("{params}: connect OK, then hung 40 s"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), t.close()).await;
    }
}

/// Control: the same flow with a state topic of matching partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_state_topic_commits_land() {
    let Some(b) = support::connect_with("partitions=3&offset_state=state_topic").await else {
        return;
    };
    let name = uniq("zzpk");
    let topic = b.topic(&name).await.unwrap();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    for i in 0..30 {
        topic.publish(&ev(i, &format!("key-{i}"))).await.unwrap();
    }
    for _ in 0..30 {
        let d = next_opt(&mut sub, 20).await.expect("delivery");
        d.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let group = format!("evbus.sub.{name}.s");
    let c = tokio::task::spawn_blocking(move || committed(&group, &name, 3))
        .await
        .unwrap();
    eprintln!("CONTROL after acking all 30 (subscription still open): {c:#?}");
    drop(sub);
    b.close().await.unwrap();
}

fn state_watermarks(state_topic: &str) -> (i64, i64) {
    let url = support::kafka_url();
    let servers = url.trim_start_matches("kafka://").split('?').next().unwrap().to_owned();
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("group.id", "zzp-reader")
        .create()
        .unwrap();
    c.fetch_watermarks(state_topic, 0, Duration::from_secs(5)).unwrap_or((-1, -1))
}

/// The same mismatch, idle: how many state records are written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_topic_mismatch_write_rate() {
    let Some(a) = support::connect_with("partitions=1&offset_state=state_topic").await else {
        return;
    };
    let name = uniq("zzpw");
    let topic = a.topic(&name).await.unwrap();
    drop(topic.subscribe(SubscribeOptions::named("s")).await.unwrap());
    a.delete_topic(&name).await.unwrap();
    a.close().await.unwrap();
    let b = support::connect_with("partitions=3&offset_state=state_topic").await.unwrap();
    let topic = b.topic(&name).await.unwrap();
    let started = std::time::Instant::now();
    let mut sub = topic.subscribe(SubscribeOptions::named("s")).await.unwrap();
    eprintln!("subscribe took {:?}", started.elapsed());
    topic.publish(&ev(1, "key-1")).await.unwrap();
    next_opt(&mut sub, 20).await.expect("d").ack().await.unwrap();
    let st = format!("__evbus_state.evbus.sub.{name}.s");
    let st2 = st.clone();
    let w1 = tokio::task::spawn_blocking(move || state_watermarks(&st2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let w2 = tokio::task::spawn_blocking(move || state_watermarks(&st)).await.unwrap();
    eprintln!("state topic p0 watermarks, idle subscription, 5 s apart: {w1:?} -> {w2:?}");
    drop(sub);
    b.close().await.unwrap();
}

/// A named subscription reopened by a transport whose operation_timeout is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_operation_timeout_reopen() {
    for v in [3, 10, 30] {
        let Some(n) = support::connect_with("partitions=1&offset_state=commit_metadata").await else {
            return;
        };
        let name = uniq("zzpt");
        let topic = n.topic(&name).await.unwrap();
        drop(topic.subscribe(SubscribeOptions::named("s")).await.unwrap());
        for i in 0..5 {
            topic.publish(&ev(i, "k")).await.unwrap();
        }
        n.close().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let x = match support::connect_with(&format!(
            "partitions=1&offset_state=commit_metadata&operation_timeout_ms={v}"
        ))
        .await
        {
            Some(x) => x,
            None => continue,
        };
        let r = async {
            let topic = x.topic(&name).await?;
            topic.subscribe(SubscribeOptions::named("s")).await
        }
        .await;
        match r {
            Err(e) => eprintln!("op timeout {v} ms: subscribe failed {:?} {e}", e.kind()),
            Ok(mut sub) => {
                let mut got = 0;
                while let Some(d) = next_opt(&mut sub, 5).await {
                    got += 1;
                    let _ = d.ack().await;
                }
                eprintln!("op timeout {v} ms: the reopened subscription got {got} of 5 events");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), x.close()).await;
    }
}
