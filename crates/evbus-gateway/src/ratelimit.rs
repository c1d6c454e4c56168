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

type Keyed = Arc<DefaultKeyedRateLimiter<String>>;

pub(crate) struct Limiters {
    default: RateLimit,
    by_limit: RwLock<HashMap<RateLimit, Keyed>>,
    clock: DefaultClock,
}

impl Limiters {
    /// Limiters where a key without a limit of its own gets `default`.
    pub(crate) fn new(default: RateLimit) -> Limiters {
        Limiters {
            default,
            by_limit: RwLock::default(),
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
        let limiter = self.limiter(limit);
        limiter
            .check_key(&key.id)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn limiter(&self, limit: RateLimit) -> Keyed {
        // A poisoned lock only means a panic elsewhere mid-insert: the map is still whole.
        if let Some(l) = self
            .by_limit
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&limit)
        {
            return Arc::clone(l);
        }
        let mut map = self.by_limit.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(limit).or_insert_with(|| {
            let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ))
        }))
    }

    /// Forgets the keys whose bucket is full again, and the limiters left with no key.
    pub(crate) fn retain_recent(&self) {
        let mut map = self.by_limit.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, limiter| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            !limiter.is_empty()
        });
    }

    /// Keys holding state, over every limiter (tests of boundedness).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        let map = self.by_limit.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|l| l.len()).sum()
    }
}

/// What streams of one key read from the event log while they catch up (resumed from an
/// earlier position, or started behind), in KiB per second, shared by the key's streams: a
/// resume is a replay, and without a bound any id a key was ever sent let it read the whole
/// log again and again, as fast as the store answers, at the cost of every other key. Live
/// streams (fed by the fan-out) are not paced.
pub(crate) struct CatchUp {
    limiter: DefaultKeyedRateLimiter<String>,
    burst_kib: u32,
    clock: DefaultClock,
}

impl CatchUp {
    /// `bytes_per_second` per key (at least 1 KiB), with a burst of a second's worth or a
    /// page of the log (256 KiB), whichever is more.
    pub(crate) fn new(bytes_per_second: u64) -> CatchUp {
        let per_second = u32::try_from(bytes_per_second / 1024)
            .unwrap_or(u32::MAX)
            .max(1);
        let burst_kib = per_second.max(256);
        CatchUp {
            limiter: RateLimiter::keyed(
                Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(burst_kib).unwrap_or(NonZeroU32::MIN)),
            ),
            burst_kib,
            clock: DefaultClock::default(),
        }
    }

    /// Waits until `key` may send `bytes` more of what it catches up on; `false` if
    /// `cancel` fired first. A page larger than the burst is charged the burst.
    pub(crate) async fn take(
        &self,
        key: &str,
        bytes: usize,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.burst_kib);
        let kib = NonZeroU32::new(kib).unwrap_or(NonZeroU32::MIN);
        let key = key.to_owned();
        loop {
            let wait = match self.limiter.check_key_n(&key, kib) {
                Ok(Ok(())) | Err(_) => return true,
                Ok(Err(not_until)) => not_until.wait_time_from(self.clock.now()),
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

/// What one key may publish through `POST /v1/events`, in bytes of request bodies per
/// second: a body is charged with its length before any of it is parsed, since decoding and
/// validating a large event is CPU on the request path, and the request rate alone let one
/// key post [`max_body_bytes`](crate::GatewayConfig::max_body_bytes) fifty times a second.
/// Byte-exact (one cell a byte), so small events cost what they weigh.
pub(crate) struct PublishBytes {
    limiter: DefaultKeyedRateLimiter<String>,
    burst: u32,
    clock: DefaultClock,
}

impl PublishBytes {
    /// `bytes_per_second` per key (at least 1), with a burst of a second's worth or
    /// `max_body_bytes`, whichever is more: a body the gateway accepts always fits a full
    /// allowance, however low the rate.
    pub(crate) fn new(bytes_per_second: u64, max_body_bytes: usize) -> PublishBytes {
        let per_second = u32::try_from(bytes_per_second).unwrap_or(u32::MAX).max(1);
        let burst = per_second.max(u32::try_from(max_body_bytes).unwrap_or(u32::MAX));
        PublishBytes {
            limiter: RateLimiter::keyed(
                Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN)),
            ),
            burst,
            clock: DefaultClock::default(),
        }
    }

    /// The most one key may publish at once, in bytes.
    #[cfg(test)]
    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes `bytes` (at least 1, at most the burst) of `key`'s allowance; when less is
    /// left, takes nothing and says how long until `bytes` fit.
    pub(crate) fn take(&self, key: &str, bytes: usize) -> Result<(), Duration> {
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.burst);
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(&key.to_owned(), n) {
            // `n` is at most the burst: capacity is never insufficient.
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
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
            admin: false,
            created_at: chrono::Utc::now(),
            expires_at: None,
            revoked_at: None,
            rate_limit: limit,
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
        assert!(limiters.by_limit.read().unwrap().is_empty());
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
            let bytes = PublishBytes::new(rate, max_body);
            assert_eq!(
                u64::from(bytes.burst()),
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
        assert_eq!(PublishBytes::new(0, 10).burst(), 10);
    }

    #[test]
    fn a_publish_over_the_allowance_takes_nothing_and_says_when_it_fits() {
        // 1 KiB/s, a burst of 4 KiB (the body limit).
        let bytes = PublishBytes::new(1024, 4096);
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
