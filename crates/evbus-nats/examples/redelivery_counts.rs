//! Checks whether a NATS server counts redeliveries right when they meet a pull request's
//! expiry, with async-nats alone (no evbus): the reproduction behind ADR 0038.
//!
//! ```text
//! cargo run -p evbus-nats --example redelivery_counts -- [nats://HOST:PORT] [ROUNDS]
//! ```
//!
//! Each round runs 8 consumers at once, for 8 s each, twice: once with every pull request
//! expiring after exactly 500 ms, once with each request's expiry a different point of
//! its last fifth, as the adapter spreads it. Each consumer has its own stream of 20 messages and a 1 s
//! `ack_wait`, never acknowledges, and pulls until the time is up; every message then came
//! once per timeout, so its delivery counts must read 1, 2, 3, ... NATS Server 2.9.10
//! sometimes skips a count (a redelivery counted, never sent) and sends the newest message
//! again as count 1. Exits with 1 if any consumer of the spread requests saw that.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;

const CONSUMERS: usize = 8;
const MESSAGES: usize = 20;
const RUN: Duration = Duration::from_secs(8);
const EXPIRY: Duration = Duration::from_millis(500);
const ACK_WAIT: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("EVBUS_NATS_URL").ok())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(2);
    let client = match async_nats::connect(url.as_str()).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("cannot connect to {url}: {e}");
            return ExitCode::from(2);
        }
    };
    println!("server {url}: {}", client.server_info().version);
    let js = jetstream::new(client);
    let mut miscounted = [0usize; 2];
    for round in 0..rounds {
        for (i, spread) in [false, true].into_iter().enumerate() {
            let runs = (0..CONSUMERS).map(|n| consume(&js, format!("{round}-{i}-{n}"), spread));
            for result in futures::future::join_all(runs).await {
                match result {
                    Ok(anomalies) => miscounted[i] += usize::from(!anomalies.is_empty()),
                    Err(e) => {
                        eprintln!("a consumer failed: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
        }
    }
    let total = rounds * CONSUMERS;
    println!(
        "requests expiring after exactly {EXPIRY:?}: {} of {total} consumers saw a miscount",
        miscounted[0]
    );
    println!(
        "requests expiring within the last fifth of {EXPIRY:?}: {} of {total}",
        miscounted[1]
    );
    if miscounted[1] > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one consumer on a stream of its own; returns the stream sequences whose delivery
/// counts did not read 1, 2, 3, ..., with the counts.
async fn consume(
    js: &jetstream::Context,
    tag: String,
    spread: bool,
) -> Result<Vec<(u64, Vec<i64>)>, async_nats::Error> {
    let name = format!("REDELIVERY_COUNTS_{}_{tag}", std::process::id());
    let subject = format!("redelivery-counts.{}.{tag}", std::process::id());
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let result = async {
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("c".into()),
                ack_wait: ACK_WAIT,
                ..Default::default()
            })
            .await?;
        for n in 0..MESSAGES {
            js.publish(subject.clone(), n.to_string().into())
                .await?
                .await?;
        }
        let mut counts: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
        let start = Instant::now();
        let mut requests = 0u64;
        while start.elapsed() < RUN {
            requests += 1;
            // The adapter draws each request's expiry at random; stepping through the
            // same range breaks the lock step as well.
            let expiry = if spread {
                EXPIRY - EXPIRY / 5 * u32::try_from(requests % 7).unwrap_or(0) / 7
            } else {
                EXPIRY
            };
            let mut batch = consumer
                .batch()
                .max_messages(MESSAGES)
                .expires(expiry)
                .messages()
                .await?;
            while let Some(message) = batch.next().await {
                let message = message?;
                let info = message.info()?;
                counts
                    .entry(info.stream_sequence)
                    .or_default()
                    .push(info.delivered);
            }
        }
        let anomalies: Vec<(u64, Vec<i64>)> = counts
            .into_iter()
            .filter(|(_, seen)| seen.iter().zip(1..).any(|(d, expected)| *d != expected))
            .collect();
        for (sequence, seen) in &anomalies {
            println!("{tag}: stream sequence {sequence} came with delivery counts {seen:?}");
        }
        Ok::<_, async_nats::Error>(anomalies)
    }
    .await;
    let _ = js.delete_stream(&name).await;
    result
}
