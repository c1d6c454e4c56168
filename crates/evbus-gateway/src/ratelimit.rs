//! Per-key request rate limits: one token bucket per API key, of the key's own
//! [`RateLimit`] or the gateway's default.
//!
//! Keys sharing a limit share one keyed limiter (GCRA, lock-free per key); the limiters of
//! all limits in use sit in a small map read under a read lock. State stays bounded: a key
//! holds state only once it has authenticated, and [`Limiters::retain_recent`] (run by the
//! pruner) drops the state of keys whose bucket has refilled (indistinguishable from fresh),
//! then the limiters left empty.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::store::{KeyRecord, RateLimit};

/// Limiters made on first use, one per limit in use, each shared by the keys held to it.
struct PerLimit<L, V> {
    map: RwLock<HashMap<L, Arc<V>>>,
}

impl<L: std::hash::Hash + Eq + Copy, V> PerLimit<L, V> {
    fn new() -> Self {
        PerLimit {
            map: RwLock::default(),
        }
    }

    /// The limiter of `limit`, made by `make` if there is none yet.
    fn get(&self, limit: L, make: impl FnOnce() -> V) -> Arc<V> {
        // A poisoned lock only means a panic elsewhere mid-insert: the map is still whole.
        if let Some(l) = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&limit)
        {
            return Arc::clone(l);
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(limit).or_insert_with(|| Arc::new(make())))
    }

    /// Keeps the limiters for which `keep` (which may tidy them) says so.
    fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, limiter| keep(limiter));
    }

    #[cfg(test)]
    fn sum(&self, f: impl Fn(&V) -> usize) -> usize {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|l| f(l)).sum()
    }
}

pub(crate) struct Limiters {
    default: RateLimit,
    by_limit: PerLimit<RateLimit, DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl Limiters {
    /// Limiters where a key without a limit of its own gets `default`.
    pub(crate) fn new(default: RateLimit) -> Limiters {
        Limiters {
            default,
            by_limit: PerLimit::new(),
            clock: DefaultClock::default(),
        }
    }

    /// The limit `key` is held to.
    pub(crate) fn effective(&self, key: &KeyRecord) -> RateLimit {
        key.rate_limit.unwrap_or(self.default)
    }

    /// Takes one request of `key`'s bucket; when it is empty, how long until it is not.
    pub(crate) fn check(&self, key: &KeyRecord) -> Result<(), Duration> {
        let limit = self.effective(key);
        let limiter = self.by_limit.get(limit, || {
            let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        limiter
            .check_key(&key.id)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the keys whose bucket is full again, and the limiters left with no key.
    pub(crate) fn retain_recent(&self) {
        self.by_limit.retain(|limiter| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            !limiter.is_empty()
        });
    }

    /// Keys holding state, over every limiter (tests of boundedness).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.by_limit.sum(|l| l.len())
    }
}

/// The publish byte rates of keys: a key with a rate of its own
/// ([`KeyRecord::publish_bytes_per_second`]) is held to it, any other to the gateway's
/// default ([`GatewayConfig::publish_bytes_per_second`](crate::GatewayConfig::publish_bytes_per_second));
/// one [`ByteRate::publish`] per rate in use.
pub(crate) struct PublishRates {
    default: u64,
    max_body_bytes: usize,
    by_rate: PerLimit<u64, ByteRate>,
}

impl PublishRates {
    pub(crate) fn new(default: u64, max_body_bytes: usize) -> PublishRates {
        PublishRates {
            default,
            max_body_bytes,
            by_rate: PerLimit::new(),
        }
    }

    /// The bytes per second `key` may publish.
    pub(crate) fn effective(&self, key: &KeyRecord) -> u64 {
        key.publish_bytes_per_second.unwrap_or(self.default).max(1)
    }

    /// Takes `bytes` of `key`'s allowance (see [`ByteRate::take`]).
    pub(crate) fn take(&self, key: &KeyRecord, bytes: usize) -> Result<(), Duration> {
        let rate = self.effective(key);
        self.by_rate
            .get(rate, || ByteRate::publish(rate, self.max_body_bytes))
            .take(&key.id, bytes)
    }

    /// Forgets the keys whose allowance is full again, and the rates left with no key.
    pub(crate) fn retain_recent(&self) {
        self.by_rate.retain(|rate| {
            rate.retain_recent();
            !rate.limiter.is_empty()
        });
    }

    /// Keys holding state, over every rate (tests of boundedness).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.by_rate.sum(|r| r.limiter.len())
    }
}

/// A rate of bytes per API key: a token bucket (GCRA, lock-free per key) counted in cells of
/// `unit` bytes. Two of them bound what one key costs the others in bytes:
///
/// - **catching up** ([`catch_up`](Self::catch_up)): what a key's streams read from the event
///   log while behind (resumed from an earlier position, or started behind), shared by the
///   key's streams: a resume is a replay, and without a bound any id a key was ever sent let
///   it read the whole log again and again, as fast as the store answers. Live streams (fed by
///   the fan-out) are not paced.
/// - **publishing** ([`publish`](Self::publish)): request bodies of `POST /v1/events`,
///   charged before any of the body is parsed, since decoding and validating a large event is
///   CPU on the request path, and the request rate alone let one key post
///   [`max_body_bytes`](crate::GatewayConfig::max_body_bytes) fifty times a second.
pub(crate) struct ByteRate {
    limiter: DefaultKeyedRateLimiter<String>,
    /// Bytes per cell of the bucket.
    unit: u32,
    /// The bucket's size, in cells: the most one charge takes.
    burst: u32,
    /// Cells refilled per second (what tests check).
    #[cfg(test)]
    per_second: u32,
    clock: DefaultClock,
}

/// The most cells a byte rate refills per second. The limiter refills one cell every
/// `1 s / cells` and keeps that interval in whole nanoseconds, rounded down: at a byte a cell,
/// 600 MB/s would refill every nanosecond, as 1 GB/s does. At ten million cells a second
/// or fewer the interval is at least 100 ns, and the rounding under 1 %.
const MAX_CELLS_PER_SECOND: u64 = 10_000_000;

impl ByteRate {
    /// `bytes_per_second` per key (at least one `unit`), with a burst of a second's worth or
    /// `min_burst` bytes, whichever is more.
    fn new(bytes_per_second: u64, min_burst: u64, unit: u32) -> ByteRate {
        let unit_bytes = u64::from(unit);
        let cells = |n: u64| u32::try_from(n).unwrap_or(u32::MAX).max(1);
        let per_second = cells(bytes_per_second / unit_bytes);
        let burst = per_second.max(cells(min_burst.div_ceil(unit_bytes)));
        ByteRate {
            limiter: RateLimiter::keyed(
                Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN)),
            ),
            unit,
            burst,
            #[cfg(test)]
            per_second,
            clock: DefaultClock::default(),
        }
    }

    /// Catching up: `bytes_per_second` per key (at least 1 KiB, counted in KiB), with a burst
    /// of a second's worth or a page of the log (256 KiB), whichever is more.
    pub(crate) fn catch_up(bytes_per_second: u64) -> ByteRate {
        ByteRate::new(bytes_per_second, 256 * 1024, 1024)
    }

    /// Publishing: `bytes_per_second` per key (at least 1), with a burst of a second's worth
    /// or `max_body_bytes`, whichever is more: a body the gateway accepts always fits a full
    /// allowance, however low the rate. Counted in bytes up to [`MAX_CELLS_PER_SECOND`] a
    /// second (small events cost what they weigh), in cells of several bytes above it.
    pub(crate) fn publish(bytes_per_second: u64, max_body_bytes: usize) -> ByteRate {
        let unit = bytes_per_second
            .div_ceil(MAX_CELLS_PER_SECOND)
            .clamp(1, u64::from(u32::MAX));
        ByteRate::new(bytes_per_second, max_body_bytes as u64, unit as u32)
    }

    /// The most one key may take at once, in bytes.
    #[cfg(test)]
    pub(crate) fn burst(&self) -> u64 {
        u64::from(self.burst) * u64::from(self.unit)
    }

    /// The bytes a second it refills, as the limiter keeps its interval (whole nanoseconds,
    /// rounded down).
    #[cfg(test)]
    pub(crate) fn refill_bytes_per_second(&self) -> f64 {
        let interval_ns = (1_000_000_000 / u64::from(self.per_second)).max(1);
        1e9 / interval_ns as f64 * f64::from(self.unit)
    }

    /// Takes `bytes` (at least one cell, at most the burst: a larger charge is charged the
    /// burst) of `key`'s allowance; when less is left, takes nothing and says how long until
    /// `bytes` fit.
    pub(crate) fn take(&self, key: &str, bytes: usize) -> Result<(), Duration> {
        let cells = u32::try_from(bytes.div_ceil(self.unit as usize))
            .unwrap_or(u32::MAX)
            .clamp(1, self.burst);
        let cells = NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(&key.to_owned(), cells) {
            // At most the burst: capacity is never insufficient.
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Waits until `key` may take `bytes` (see [`take`](Self::take)); `false` if `cancel`
    /// fired first.
    pub(crate) async fn wait_for(
        &self,
        key: &str,
        bytes: usize,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> bool {
        loop {
            let Err(wait) = self.take(key, bytes) else {
                return true;
            };
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Forgets the keys whose allowance is full again.
    pub(crate) fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, limit: Option<RateLimit>) -> KeyRecord {
        KeyRecord {
            id: id.to_owned(),
            name: id.to_owned(),
            secret_hash: vec![],
            subscribe: vec![],
            publish: vec![],
            sources: vec![],
            admin: false,
            created_at: chrono::Utc::now(),
            expires_at: None,
            revoked_at: None,
            rate_limit: limit,
            publish_bytes_per_second: None,
        }
    }

    #[test]
    fn each_key_gets_its_own_limit_or_the_default() {
        let limiters = Limiters::new(RateLimit::new(1, 2).unwrap());
        let own = key("own", Some(RateLimit::new(1, 4).unwrap()));
        let default = key("default", None);
        let taken = |k: &KeyRecord| (0..10).take_while(|_| limiters.check(k).is_ok()).count();
        assert_eq!(taken(&own), 4);
        assert_eq!(taken(&default), 2);
        assert!(limiters.check(&own).unwrap_err() > Duration::ZERO);
        assert_eq!(limiters.effective(&default), RateLimit::new(1, 2).unwrap());
    }

    #[test]
    fn state_of_refilled_keys_is_dropped() {
        // 1,000,000/s: a bucket of 1 refills within a microsecond.
        let limiters = Limiters::new(RateLimit::new(1_000_000, 1).unwrap());
        for i in 0..100 {
            let _ = limiters.check(&key(&format!("k{i}"), None));
        }
        assert_eq!(limiters.tracked(), 100);
        std::thread::sleep(Duration::from_millis(5));
        limiters.retain_recent();
        assert_eq!(limiters.tracked(), 0);
        assert!(limiters.by_limit.map.read().unwrap().is_empty());
    }

    #[test]
    fn each_key_publishes_at_its_own_byte_rate_or_the_default() {
        // A default of 1 KiB/s, bodies of at most 1 KiB: bursts of 1 KiB.
        let rates = PublishRates::new(1024, 1024);
        let own = KeyRecord {
            publish_bytes_per_second: Some(64 * 1024),
            ..key("own", None)
        };
        let default = key("default", None);
        let taken = |k: &KeyRecord| (0..100).take_while(|_| rates.take(k, 1024).is_ok()).count();
        assert_eq!(taken(&own), 64);
        assert_eq!(taken(&default), 1);
        assert_eq!(rates.effective(&own), 64 * 1024);
        assert_eq!(rates.effective(&default), 1024);
        // A key on the same rate as another has its own allowance.
        let twin = KeyRecord {
            publish_bytes_per_second: Some(64 * 1024),
            ..key("twin", None)
        };
        assert_eq!(taken(&twin), 64);
        assert_eq!(rates.tracked(), 3);
    }

    #[test]
    fn state_of_refilled_publish_allowances_is_dropped() {
        let rates = PublishRates::new(1 << 30, 1);
        for i in 0..50 {
            let mut k = key(&format!("k{i}"), None);
            k.publish_bytes_per_second = (i % 2 == 0).then_some(1 << 29);
            rates.take(&k, 1).unwrap();
        }
        assert_eq!(rates.tracked(), 50);
        std::thread::sleep(Duration::from_millis(5));
        rates.retain_recent();
        assert_eq!(rates.tracked(), 0);
        assert!(rates.by_rate.map.read().unwrap().is_empty());
    }

    #[test]
    fn a_body_of_the_largest_size_always_fits_the_publish_burst() {
        // However low the rate, or large the body limit, a full allowance takes the largest
        // body the gateway accepts; a second's worth when that is more.
        for (rate, max_body) in [
            (1, 1024 * 1024),
            (1_000, 64),
            (8 * 1024 * 1024, 1024 * 1024),
            (8 * 1024 * 1024, 16 * 1024 * 1024),
        ] {
            let bytes = ByteRate::publish(rate, max_body);
            assert_eq!(
                bytes.burst(),
                rate.max(max_body as u64),
                "{rate} B/s, {max_body} B"
            );
            assert_eq!(
                bytes.take("k", max_body),
                Ok(()),
                "{rate} B/s, {max_body} B"
            );
        }
        // 0 counts as 1 byte a second.
        assert_eq!(ByteRate::publish(0, 10).burst(), 10);
        // A large body limit with a rate counted in cells of several bytes still fits.
        let bytes = ByteRate::publish(600_000_000, 16 * 1024 * 1024 + 1);
        assert!(bytes.burst() >= 600_000_000, "{}", bytes.burst());
        assert_eq!(bytes.take("k", 16 * 1024 * 1024 + 1), Ok(()));
        // Catching up is counted in KiB: a second's worth, or a page of the log (256 KiB).
        assert_eq!(ByteRate::catch_up(4 << 20).burst(), 4 << 20);
        assert_eq!(ByteRate::catch_up(1).burst(), 256 << 10);
    }

    #[test]
    fn high_publish_rates_refill_at_the_rate_set() {
        // Counted in bytes, 600 MB/s would refill a byte every nanosecond (1 GB/s).
        for rate in [
            1_000u64,
            8 * 1024 * 1024,
            10_000_000,
            10_000_001,
            100_000_000,
            600_000_000,
            1 << 30,
        ] {
            let refill = ByteRate::publish(rate, 1024).refill_bytes_per_second();
            let error = (refill - rate as f64).abs() / rate as f64;
            assert!(error < 0.01, "{rate} B/s refills at {refill} B/s");
        }
        // Up to ten million bytes a second, a byte is a cell: small events cost what they weigh.
        assert_eq!(ByteRate::publish(8 * 1024 * 1024, 1024).unit, 1);
    }

    #[test]
    fn a_publish_over_the_allowance_takes_nothing_and_says_when_it_fits() {
        // 1 KiB/s, a burst of 4 KiB (the body limit).
        let bytes = ByteRate::publish(1024, 4096);
        assert_eq!(bytes.take("a", 3000), Ok(()));
        let wait = bytes.take("a", 2000).unwrap_err();
        // 1,096 bytes left, 904 short: they come in about 0.88 s.
        assert!(
            wait > Duration::from_millis(700) && wait <= Duration::from_millis(900),
            "{wait:?}"
        );
        // Nothing was taken: what is left still fits.
        assert_eq!(bytes.take("a", 900), Ok(()));
        // Another key has its whole allowance.
        assert_eq!(bytes.take("b", 4096), Ok(()));
    }
}
