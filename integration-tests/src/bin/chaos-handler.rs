//! One handler instance of the fault suite (`cargo xtask chaos`) in its own process.
//!
//! `chaos-handler --url URL --group G --instance NAME --ordered 0|1 --concurrency C
//! --fail-pct F --slow-ms S --visibility-ms V --out FILE` handles `chaos.tick` events in group
//! G, appending one line per success and per dead letter to FILE (see
//! `evbus_integration_tests::chaos`). It prints `ready per-key-order=<bool>` once subscribed
//! and shuts down gracefully when its stdin closes.
//!
//! `chaos-handler --url URL --dead-letters G` prints the ids in group G's dead-letter queue,
//! one per line, then `end`.

use std::path::PathBuf;
use std::time::Duration;

use evbus_integration_tests::chaos::{self, HandlerConfig, Record};
use evbus_integration_tests::flags;
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    chaos::init_logging();
    let args = flags(std::env::args().skip(1))?;
    let get = |name: &str| {
        args.get(name)
            .cloned()
            .ok_or_else(|| format!("chaos-handler: missing --{name}"))
    };
    let transport = chaos::connect(&get("url")?).await?;
    let ordering = transport.capabilities().per_key_order;
    if let Some(group) = args.get("dead-letters") {
        let bus = chaos::bus(transport, Duration::from_secs(5));
        for id in chaos::dead_letter_ids(&bus, group).await? {
            println!("{id}");
        }
        println!("end");
        bus.shutdown(Duration::from_secs(5)).await?;
        return Ok(());
    }
    let cfg = HandlerConfig {
        group: get("group")?,
        instance: get("instance")?,
        ordered: get("ordered")? == "1" && ordering,
        concurrency: get("concurrency")?.parse()?,
        fail_pct: get("fail-pct")?.parse()?,
        slow: Duration::from_millis(get("slow-ms")?.parse()?),
    };
    let visibility = Duration::from_millis(get("visibility-ms")?.parse()?);
    let record = Record::open(&PathBuf::from(get("out")?))?;
    let bus = chaos::bus(transport, visibility);
    let _handle = chaos::start_handler(&bus, &cfg, &record).await?;
    println!("ready per-key-order={ordering}");
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    bus.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
