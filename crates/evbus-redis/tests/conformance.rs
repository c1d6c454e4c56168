//! The conformance suite against Redis.
//!
//! Most cases run against the Redis at `EVBUS_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! The outage cases run against a `redis-server` this harness starts itself on a free port
//! with `--appendonly yes --appendfsync always` (every acknowledged write is on disk before
//! the reply), kills with SIGKILL to interrupt, and restarts on the same port and data
//! directory to resume. Without a `redis-server` binary on `PATH` those cases are reported
//! `IGNORED ...: needs broker-control`.

mod support;

use std::process::ExitCode;

use async_trait::async_trait;
use evbus_conformance::{BrokerControl, Suite};
use evbus_redis::{RedisConfig, RedisTransport};
use support::{RedisServer, io_error};

fn main() -> ExitCode {
    let url =
        std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    evbus_conformance::main(move || {
        let suite = Suite::new("redis", move || {
            let url = url.clone();
            async move { RedisTransport::connect(RedisConfig::from_url(&url)?).await }
        });
        match RedisServer::start() {
            Ok(server) => suite.with_broker_control(server),
            Err(e) => {
                eprintln!("WARNING: cannot start a redis-server for the outage cases: {e}");
                suite
            }
        }
    })
}

#[async_trait]
impl BrokerControl for RedisServer {
    type Transport = RedisTransport;

    async fn connect(&self) -> evbus::Result<RedisTransport> {
        let url = format!(
            "redis://127.0.0.1:{}?reconnect_max_delay_ms=1000&command_timeout_ms=2000",
            self.port
        );
        RedisTransport::connect(RedisConfig::from_url(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL: no chance to write anything more. With `appendfsync always`, every write
        // Redis acknowledged is already on disk.
        self.kill();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn()
            .map_err(|e| io_error("restarting redis-server", e))?;
        tokio::task::block_in_place(|| self.wait_ready())
            .map_err(|e| io_error("waiting for redis-server", e))
    }
}
