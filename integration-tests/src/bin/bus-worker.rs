//! One bus instance in its own process, for the multi-process tests.
//!
//! `bus-worker URL TOPIC GROUP MODE` handles `itest.order` events of TOPIC in GROUP and prints
//! one line per handler run on stdout: `<ok|fail> <event id> <attempt>`. MODE is `ok`
//! (always succeeds), `flaky` (events with `"flaky": true` fail their first two attempts) or
//! `fail` (always fails). It prints `ready` once subscribed, and shuts down gracefully when
//! its stdin closes.

use std::io::Write;
use std::time::Duration;

use evbus::bus::{HandlerError, Message};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, topic, group, mode] = args.as_slice() else {
        return Err("usage: bus-worker URL TOPIC GROUP ok|flaky|fail".into());
    };
    let transport = evbus_redis::RedisTransport::connect_url(url).await?;
    let bus = evbus_integration_tests::bus(std::sync::Arc::new(transport), topic);
    let mode = mode.clone();
    bus.on(
        evbus_integration_tests::ORDER,
        group.clone(),
        move |msg: Message| {
            let fail = match mode.as_str() {
                "fail" => true,
                "flaky" => {
                    let flaky = msg
                        .json::<serde_json::Value>()
                        .map(|v| v["flaky"] == true)
                        .unwrap_or(false);
                    flaky && msg.attempt() < 3
                }
                _ => false,
            };
            let line = format!(
                "{} {} {}\n",
                if fail { "fail" } else { "ok" },
                msg.id(),
                msg.attempt()
            );
            async move {
                std::io::stdout().lock().write_all(line.as_bytes())?;
                if fail {
                    Err(HandlerError::from("failing on purpose"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .start()
    .await?;
    println!("ready");
    // Run until the parent closes stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    bus.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
