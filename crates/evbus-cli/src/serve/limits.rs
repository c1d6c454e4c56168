//! The gateway's bounds as `evbus serve` flags: what one API key, one client or one endpoint
//! may hold. Each default is [`GatewayConfig::default`]'s, read when `--help` is built, so
//! the two cannot disagree. The gateway README's threat model says what each one protects.

use std::time::Duration;

use clap::Args;
use evbus_gateway::GatewayConfig;

fn defaults() -> GatewayConfig {
    GatewayConfig::default()
}

/// At least 1 (a zero limit would refuse everything).
fn positive(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn rate_limit_help() -> String {
    format!(
        "Requests per second per API key (sustained), for keys without a limit of their own \
         (`evbus keys create --rate-limit`). Also {RATE_LIMIT_ENV} [default: {}]",
        defaults().rate_limit_per_second
    )
}

fn rate_limit_burst_help() -> String {
    format!(
        "Requests one API key may make at once, for keys without a limit of their own. \
         Also {RATE_LIMIT_BURST_ENV} [default: {}]",
        defaults().rate_limit_burst
    )
}

fn max_replayed_per_day_help() -> String {
    format!(
        "Events replays may queue to one webhook per 24 h window (the webhooks of one key, \
         deleted ones included, share this times --max-webhooks-per-key); a replay beyond it \
         queues what fits, one with nothing left is answered 429. Also \
         {MAX_REPLAYED_PER_DAY_ENV} [default: {}]",
        defaults().max_replayed_per_day
    )
}

fn publish_bytes_per_second_help() -> String {
    format!(
        "Request-body bytes one API key may publish per second (POST /v1/events), charged \
         before the body is parsed; a publish over what is left is answered 429. The burst is a \
         second's worth and never less than --max-body-bytes, so an event of that size always \
         fits. Also {PUBLISH_BYTES_PER_SECOND_ENV} [default: {}]",
        defaults().publish_bytes_per_second
    )
}

/// The environment variables of the default rate limit (a flag wins over its variable).
pub(crate) const RATE_LIMIT_ENV: &str = "EVBUS_RATE_LIMIT";
pub(crate) const RATE_LIMIT_BURST_ENV: &str = "EVBUS_RATE_LIMIT_BURST";
/// The environment variable of the replay budget (the flag wins over it).
pub(crate) const MAX_REPLAYED_PER_DAY_ENV: &str = "EVBUS_MAX_REPLAYED_PER_DAY";
/// The environment variable of the publish byte rate (the flag wins over it).
pub(crate) const PUBLISH_BYTES_PER_SECOND_ENV: &str = "EVBUS_PUBLISH_BYTES_PER_SECOND";

/// A flag's value, else its environment variable's (empty counts as unset), else `None`.
fn flag_or_env(flag: Option<u64>, var: &str) -> Result<Option<u64>, String> {
    if flag.is_some() {
        return Ok(flag);
    }
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => positive(v.trim())
            .map(Some)
            .map_err(|e| format!("{var}: {e} (a whole number of at least 1)")),
        _ => Ok(None),
    }
}

/// `evbus serve` limits.
#[derive(Debug, Args)]
#[command(next_help_heading = "Limits")]
pub(crate) struct Limits {
    /// Largest request body, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = positive, default_value_t = defaults().max_body_bytes as u64)]
    max_body_bytes: u64,
    #[arg(long, value_name = "N", value_parser = positive, help = rate_limit_help())]
    rate_limit: Option<u64>,
    #[arg(long, value_name = "N", value_parser = positive, visible_alias = "burst", help = rate_limit_burst_help())]
    rate_limit_burst: Option<u64>,
    #[arg(long, value_name = "BYTES", value_parser = positive, help = publish_bytes_per_second_help())]
    publish_bytes_per_second: Option<u64>,
    /// Open client connections at once (`/healthz` still answers above it).
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_connections as u64)]
    max_connections: u64,
    /// Open client connections at once from one address (IPv6: one /64). Behind a proxy,
    /// where every connection comes from the proxy, raise it to --max-connections.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_connections_per_address as u64)]
    max_connections_per_address: u64,
    /// Longest wait for a request's headers, and longest idle keep-alive, in seconds.
    #[arg(long, value_name = "SECS", value_parser = positive, default_value_t = defaults().header_read_timeout.as_secs())]
    header_read_timeout: u64,
    /// Open event streams at once.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_streams as u64)]
    max_streams: u64,
    /// Open event streams at once per API key.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_streams_per_key as u64)]
    max_streams_per_key: u64,
    /// How fast one API key's streams, together, read the event log while catching up
    /// (resumed with Last-Event-ID), in bytes per second; live streams are not paced.
    #[arg(long, value_name = "BYTES", value_parser = positive, default_value_t = defaults().stream_catch_up_bytes_per_second)]
    stream_catch_up_bytes_per_second: u64,
    /// Webhook deliveries in flight at once, in all.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_in_flight.into())]
    max_in_flight: u64,
    /// Webhook deliveries in flight at once to the endpoints of one API key.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_in_flight_per_key.into())]
    max_in_flight_per_key: u64,
    /// Webhook deliveries in flight at once to one endpoint.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_in_flight_per_endpoint.into())]
    max_in_flight_per_endpoint: u64,
    /// Deadline of one webhook delivery (connect included), in seconds.
    #[arg(long, value_name = "SECS", value_parser = positive, default_value_t = defaults().delivery_timeout.as_secs())]
    delivery_timeout: u64,
    /// How long a claimed webhook delivery belongs to this instance, in seconds: if the
    /// instance dies mid-delivery, another one sharing the store takes it over after this
    /// (at least twice --delivery-timeout plus 1 s).
    #[arg(long, value_name = "SECS", value_parser = positive, default_value_t = defaults().delivery_lease.as_secs())]
    delivery_lease: u64,
    /// Visibility timeout of the gateway's bus consumers, in seconds: an event taken by an
    /// instance that died before logging it goes to another instance after this long.
    #[arg(long, value_name = "SECS", value_parser = positive, default_value_t = defaults().bus_visibility_timeout.as_secs())]
    bus_visibility_timeout: u64,
    /// Webhooks one API key may hold.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_webhooks_per_key as u64)]
    max_webhooks_per_key: u64,
    /// Events one replay request may queue.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = defaults().max_replay_events.into())]
    max_replay_events: u64,
    #[arg(long, value_name = "N", value_parser = positive, help = max_replayed_per_day_help())]
    max_replayed_per_day: Option<u64>,
}

/// A flag's value as a `usize` / `u32` field (a value past the field's range means "no
/// practical limit").
fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Limits {
    /// Writes the flags (and the environment variables standing for some) into `config`.
    pub(crate) fn apply(&self, config: &mut GatewayConfig) -> Result<(), String> {
        config.max_body_bytes = size(self.max_body_bytes);
        if let Some(n) = flag_or_env(self.rate_limit, RATE_LIMIT_ENV)? {
            config.rate_limit_per_second = count(n);
        }
        if let Some(n) = flag_or_env(self.rate_limit_burst, RATE_LIMIT_BURST_ENV)? {
            config.rate_limit_burst = count(n);
        }
        if let Some(n) = flag_or_env(self.publish_bytes_per_second, PUBLISH_BYTES_PER_SECOND_ENV)? {
            config.publish_bytes_per_second = n;
        }
        config.max_connections = size(self.max_connections);
        config.max_connections_per_address = size(self.max_connections_per_address);
        config.header_read_timeout = Duration::from_secs(self.header_read_timeout);
        config.max_streams = size(self.max_streams);
        config.max_streams_per_key = size(self.max_streams_per_key);
        config.stream_catch_up_bytes_per_second = self.stream_catch_up_bytes_per_second;
        config.max_in_flight = count(self.max_in_flight);
        config.max_in_flight_per_key = count(self.max_in_flight_per_key);
        config.max_in_flight_per_endpoint = count(self.max_in_flight_per_endpoint);
        config.delivery_timeout = Duration::from_secs(self.delivery_timeout);
        config.delivery_lease = Duration::from_secs(self.delivery_lease);
        config.bus_visibility_timeout = Duration::from_secs(self.bus_visibility_timeout);
        config.max_webhooks_per_key = size(self.max_webhooks_per_key);
        config.max_replay_events = count(self.max_replay_events);
        if let Some(n) = flag_or_env(self.max_replayed_per_day, MAX_REPLAYED_PER_DAY_ENV)? {
            config.max_replayed_per_day = count(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        limits: Limits,
    }

    fn applied(args: &[&str]) -> Result<GatewayConfig, String> {
        let serve = Serve::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let mut config = GatewayConfig::default();
        serve.limits.apply(&mut config)?;
        Ok(config)
    }

    #[test]
    fn the_replay_budget_is_a_flag_of_at_least_one() {
        let config = applied(&["--max-replayed-per-day", "7", "--max-replay-events", "3"]).unwrap();
        assert_eq!(
            (config.max_replayed_per_day, config.max_replay_events),
            (7, 3)
        );
        assert!(applied(&["--max-replayed-per-day", "0"]).is_err());
        assert!(max_replayed_per_day_help().contains(MAX_REPLAYED_PER_DAY_ENV));
        assert!(max_replayed_per_day_help().contains("30000"));
    }

    #[test]
    fn the_publish_byte_rate_is_a_flag_of_at_least_one() {
        let config = applied(&["--publish-bytes-per-second", "65536"]).unwrap();
        assert_eq!(config.publish_bytes_per_second, 65_536);
        assert!(applied(&["--publish-bytes-per-second", "0"]).is_err());
        assert_eq!(
            applied(&[]).unwrap().publish_bytes_per_second,
            GatewayConfig::default().publish_bytes_per_second
        );
        assert!(publish_bytes_per_second_help().contains(PUBLISH_BYTES_PER_SECOND_ENV));
        assert!(publish_bytes_per_second_help().contains("8388608"));
    }
}
