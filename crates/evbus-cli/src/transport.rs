//! What `emit`, `consume` and `serve` share: transport URLs, the catalogue, the runtime.
//!
//! Every adapter crate of the workspace sits behind a cargo feature of evbus-cli named after
//! it (all in `default`); [`ADAPTERS`] is the one list of them, so the registry, `--help` and
//! the error for a scheme this build lacks cannot disagree.

use std::path::Path;
use std::sync::Arc;

use evbus::{Catalog, Registry, Transport};

use crate::failure::Failure;

/// An adapter crate this binary can be built with.
pub(crate) struct Adapter {
    /// The cargo feature of evbus-cli that builds it in (also the adapter's name).
    pub(crate) feature: &'static str,
    /// The adapter crate.
    pub(crate) krate: &'static str,
    /// Its URL schemes, as its connector declares them (checked by a test).
    pub(crate) schemes: &'static [&'static str],
    /// The URL form, for `--help`.
    pub(crate) usage: &'static str,
    /// Registers its connector; `None` when the feature is off.
    pub(crate) register: Option<fn(&mut Registry)>,
}

/// Every adapter of the workspace, in the order `--help` shows them.
pub(crate) const ADAPTERS: &[Adapter] = &[
    Adapter {
        feature: "redis",
        krate: "evbus-redis",
        schemes: &["redis", "redis+cluster", "rediss", "rediss+cluster"],
        #[cfg(feature = "redis-tls")]
        usage: "redis://[:PASSWORD@]HOST:PORT[/DB][?prefix=...] (rediss:// for TLS; a Redis \
                Cluster as redis+cluster://HOST:PORT,HOST:PORT,... or \
                redis+cluster://HOST:PORT?servers=HOST:PORT,...)",
        #[cfg(not(feature = "redis-tls"))]
        usage: "redis://[:PASSWORD@]HOST:PORT[/DB][?prefix=...] (rediss:// for TLS needs a \
                build with the `redis-tls` feature; a Redis Cluster as \
                redis+cluster://HOST:PORT,HOST:PORT,... or \
                redis+cluster://HOST:PORT?servers=HOST:PORT,...)",
        #[cfg(feature = "redis")]
        register: Some(|r| {
            r.register(evbus_redis::RedisConnector);
        }),
        #[cfg(not(feature = "redis"))]
        register: None,
    },
    Adapter {
        feature: "kafka",
        krate: "evbus-kafka",
        schemes: &["kafka"],
        usage: "kafka://HOST:PORT[?brokers=HOST:PORT,...&partitions=N...]",
        #[cfg(feature = "kafka")]
        register: Some(|r| {
            r.register(evbus_kafka::KafkaConnector);
        }),
        #[cfg(not(feature = "kafka"))]
        register: None,
    },
    Adapter {
        feature: "nats",
        krate: "evbus-nats",
        schemes: &["nats", "tls"],
        usage: "nats://[USER:PASSWORD@]HOST:PORT[?stream_prefix=...] (a cluster as \
                nats://HOST:PORT,HOST:PORT,... or nats://HOST:PORT?servers=HOST:PORT,...; \
                tls:// to require TLS)",
        #[cfg(feature = "nats")]
        register: Some(|r| {
            r.register(evbus_nats::NatsConnector);
        }),
        #[cfg(not(feature = "nats"))]
        register: None,
    },
    Adapter {
        feature: "amqp",
        krate: "evbus-amqp",
        schemes: &["amqp", "amqps"],
        usage: "amqp://USER:PASSWORD@HOST:PORT/VHOST[?prefix=...] (amqps:// for TLS)",
        #[cfg(feature = "amqp")]
        register: Some(|r| {
            r.register(evbus_amqp::AmqpConnector);
        }),
        #[cfg(not(feature = "amqp"))]
        register: None,
    },
    Adapter {
        feature: "sql",
        krate: "evbus-sql",
        schemes: &["postgres", "postgresql", "sqlite"],
        usage: "postgres://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE[?schema=...] or \
                sqlite:///PATH/bus.db (one process; the default of `serve`)",
        #[cfg(feature = "sql")]
        register: Some(|r| {
            r.register(evbus_sql::SqlConnector);
        }),
        #[cfg(not(feature = "sql"))]
        register: None,
    },
];

/// The environment variable `--transport` falls back on, so that a URL holding a password
/// need not be on the command line (where `ps` shows it). Its value is never shown in
/// `--help` (`hide_env_values`).
pub(crate) const TRANSPORT_ENV: &str = "EVBUS_TRANSPORT";

/// Help text for `--transport`: the URL forms of this build.
pub(crate) fn transport_help() -> String {
    let mut forms: Vec<&str> = ADAPTERS
        .iter()
        .filter(|a| a.register.is_some())
        .map(|a| a.usage)
        .collect();
    forms.push(
        "memory:// (in-process only: events vanish when the command exits, so it is useful only \
         to check payloads)",
    );
    let mut help = format!("Transport URL: {}", forms.join("; "));
    let missing: Vec<&str> = ADAPTERS
        .iter()
        .filter(|a| a.register.is_none())
        .map(|a| a.feature)
        .collect();
    if !missing.is_empty() {
        help.push_str(&format!(
            ". Built without the features {} (their adapters' schemes are refused)",
            missing.join(", ")
        ));
    }
    help
}

/// The URL schemes this binary can open: `memory://` and every adapter built in.
pub(crate) fn registry() -> Registry {
    let mut registry = Registry::new();
    for register in ADAPTERS.iter().filter_map(|a| a.register) {
        register(&mut registry);
    }
    registry
}

/// Checks, before any work, that this build can open `url` (see [`connect`]).
pub(crate) fn check(url: &str) -> Result<(), Failure> {
    check_scheme(&registry(), url)
}

/// Opens the transport of `url`; a scheme this build cannot open is refused with the schemes
/// it can, and the feature that would add it.
pub(crate) async fn connect(url: &str) -> Result<Arc<dyn Transport>, Failure> {
    let registry = registry();
    check_scheme(&registry, url)?;
    registry.connect(url).await.map_err(|e| {
        // The adapter's hint ("it reconnects by itself; retry later") is for a long-lived
        // process; a command has already given up.
        let unreachable = matches!(
            e.kind(),
            evbus::ErrorKind::Connection | evbus::ErrorKind::Timeout
        );
        Failure::new(if unreachable {
            format!(
                "cannot open transport: {e} (is the broker running at that address? this \
                 command does not retry)"
            )
        } else {
            format!("cannot open transport: {e}")
        })
    })
}

/// Refuses a URL whose scheme `registry` does not know, saying which schemes it knows and,
/// for an adapter left out of this build, which feature brings it in.
fn check_scheme(registry: &Registry, url: &str) -> Result<(), Failure> {
    if url.trim().is_empty() {
        return Err(Failure::new(format!(
            "the transport URL is empty: give --transport URL or set {TRANSPORT_ENV}"
        )));
    }
    // A cluster's comma-separated hosts are no standard URL; the registry hands them to the
    // adapter (see `Connector::more_hosts_parameter`).
    let scheme = match evbus::raw::hosts::HostList::parse(url).filter(|l| l.hosts.len() > 1) {
        Some(list) => list.scheme().to_owned(),
        None => evbus::registry::parse_url(url, "transport")
            .map_err(|e| Failure::new(format!("cannot open transport: {e}")))?
            .scheme()
            .to_owned(),
    };
    let scheme = scheme.as_str();
    let known = registry.schemes();
    if known.contains(&scheme) {
        return without_tls(scheme).map_or(Ok(()), Err);
    }
    let known = known.join(", ");
    Err(Failure::new(
        match ADAPTERS.iter().find(|a| a.schemes.contains(&scheme)) {
            Some(adapter) => format!(
                "cannot open transport: `{scheme}://` URLs need the {krate} adapter, which this \
                 build of evbus leaves out; rebuild evbus-cli with its `{feature}` feature (a \
                 default feature: build without `--no-default-features`, or add `--features \
                 {feature}`). This build knows: {known}",
                krate = adapter.krate,
                feature = adapter.feature,
            ),
            None => format!(
                "cannot open transport: no transport for `{scheme}://` URLs; this build of evbus \
                 knows: {known}"
            ),
        },
    ))
}

/// The refusal of a `rediss://` URL by a build without TLS for Redis (evbus-cli's `redis-tls`
/// feature). evbus-redis would refuse it too, but with advice for a Cargo.toml, which a user
/// of the binary does not have.
fn without_tls(scheme: &str) -> Option<Failure> {
    if cfg!(feature = "redis-tls") || !["rediss", "rediss+cluster"].contains(&scheme) {
        return None;
    }
    Some(Failure::new(format!(
        "cannot open transport: `{scheme}://` URLs need TLS for Redis, which this build of evbus \
         leaves out; rebuild evbus-cli with its `redis-tls` feature (`cargo install --locked \
         --path crates/evbus-cli --features redis-tls`; it needs OpenSSL's development files), \
         or use a `redis://` URL"
    )))
}

pub(crate) fn catalog(dir: &Path) -> Result<Catalog, Failure> {
    Ok(Catalog::from_dir(dir)?)
}

/// A multi-threaded tokio runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_built_adapter_registers_exactly_the_schemes_listed_for_it() {
        for adapter in ADAPTERS {
            let Some(register) = adapter.register else {
                continue;
            };
            let mut registry = Registry::empty();
            register(&mut registry);
            let mut listed = adapter.schemes.to_vec();
            listed.sort_unstable();
            assert_eq!(registry.schemes(), listed, "{}", adapter.krate);
        }
    }

    #[test]
    fn the_registry_knows_memory_and_every_built_adapter() {
        let schemes = registry().schemes();
        assert!(schemes.contains(&"memory"));
        for adapter in ADAPTERS {
            for scheme in adapter.schemes {
                assert_eq!(
                    schemes.contains(scheme),
                    adapter.register.is_some(),
                    "{scheme}"
                );
            }
        }
    }

    #[test]
    fn features_and_adapter_crates_are_named_alike() {
        for adapter in ADAPTERS {
            assert_eq!(adapter.krate, format!("evbus-{}", adapter.feature));
        }
    }

    #[test]
    fn an_unknown_scheme_is_refused_listing_the_known_ones() {
        let err = check_scheme(&registry(), "carrier-pigeon://coop")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no transport for `carrier-pigeon://` URLs"),
            "{err}"
        );
        for scheme in registry().schemes() {
            assert!(err.contains(scheme), "{scheme} missing: {err}");
        }
    }

    #[test]
    fn a_scheme_of_a_left_out_adapter_names_its_feature() {
        // The default build has every adapter, so leave one out by hand.
        for left_out in ADAPTERS {
            let mut registry = Registry::new();
            for adapter in ADAPTERS.iter().filter(|a| a.feature != left_out.feature) {
                if let Some(register) = adapter.register {
                    register(&mut registry);
                }
            }
            for scheme in left_out.schemes {
                let err = check_scheme(&registry, &format!("{scheme}://127.0.0.1:1"))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains(&format!("`{}` feature", left_out.feature))
                        && err.contains(left_out.krate)
                        && err.contains("memory"),
                    "{err}"
                );
            }
        }
    }

    #[cfg(all(feature = "redis", not(feature = "redis-tls")))]
    #[test]
    fn a_tls_redis_url_names_the_feature_that_adds_tls() {
        for scheme in ["rediss", "rediss+cluster"] {
            let err = check_scheme(&registry(), &format!("{scheme}://127.0.0.1:6379"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`redis-tls` feature") && !err.contains("Cargo.toml"),
                "{err}"
            );
        }
        assert!(check_scheme(&registry(), "redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn a_known_scheme_passes_and_an_unparseable_url_is_refused() {
        assert!(check_scheme(&registry(), "memory://").is_ok());
        let err = check_scheme(&registry(), "not a url")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a transport URL"), "{err}");
        // Several hosts (a cluster's seeds) are not refused here: the registry reads them.
        assert!(check_scheme(&registry(), "memory://h1:1,h2:2").is_ok());
    }
}
