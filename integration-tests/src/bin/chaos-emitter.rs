//! One emitter of the fault suite (`cargo xtask chaos`) in its own process.
//!
//! `chaos-emitter --url URL --emitter E --incarnation I --count N --keys K --rate R
//! --poison-every P --out FILE` emits N `chaos.tick` events on K keys through the Bus and
//! appends `O <id> <key> <seq> <poison>` to FILE for each one the bus returned `Ok` for (see
//! `evbus_integration_tests::chaos`). Prints `done` and exits 0 once all are emitted.

use std::path::PathBuf;
use std::time::Duration;

use evbus_integration_tests::chaos::{self, EmitterConfig, Record};
use evbus_integration_tests::flags;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    chaos::init_logging();
    let args = flags(std::env::args().skip(1))?;
    let get = |name: &str| {
        args.get(name)
            .cloned()
            .ok_or_else(|| format!("chaos-emitter: missing --{name}"))
    };
    let cfg = EmitterConfig {
        emitter: get("emitter")?.parse()?,
        incarnation: get("incarnation")?.parse()?,
        count: get("count")?.parse()?,
        keys: get("keys")?.parse()?,
        rate: get("rate")?.parse()?,
        poison_every: get("poison-every")?.parse()?,
    };
    let record = Record::open(&PathBuf::from(get("out")?))?;
    let transport = chaos::connect(&get("url")?).await?;
    let bus = chaos::bus(transport, Duration::from_secs(5));
    chaos::run_emitter(&bus, &cfg, &record).await?;
    bus.shutdown(Duration::from_secs(5)).await?;
    println!("done");
    Ok(())
}
