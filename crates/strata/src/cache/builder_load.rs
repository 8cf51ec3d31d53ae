//! The builder's load-protection settings (see [`crate::overload`]).

use std::time::Duration;

use super::builder::CacheBuilder;
use crate::breaker::BreakerConfig;
use crate::key::{CacheKey, CacheValue};
use crate::overload::LoadLimiter;

impl<K: CacheKey, V: CacheValue> CacheBuilder<K, V> {
    /// At most `n` loader calls of this cache run at once (distinct keys; single-flight
    /// already makes one load per key; a batch load of `get_or_load_many` is one call),
    /// 1..=1 000 000. Default 64: above most
    /// connection pools, so a healthy cache never waits, yet a miss storm cannot open
    /// thousands of queries. A load past the limit waits up to
    /// [`load_permit_wait`](Self::load_permit_wait), then is refused: a read with a
    /// fail-safe copy gets the copy, others fail with
    /// [`ErrorKind::Overloaded`](crate::ErrorKind::Overloaded).
    pub fn max_concurrent_loads(mut self, n: usize) -> Self {
        self.load.max_concurrent = Some(n);
        self
    }

    /// Removes this cache's own load limit (a shared [`LoadLimiter`] still applies).
    pub fn unlimited_loads(mut self) -> Self {
        self.load.max_concurrent = None;
        self
    }

    /// A limit shared with other caches (those whose loaders use the same database
    /// pool): a load needs a permit of it as well as of the cache's own limit.
    /// Default: none.
    pub fn load_limiter(mut self, limiter: LoadLimiter) -> Self {
        self.load.limiter = Some(limiter);
        self
    }

    /// How long a load waits for its permits before it is refused, at most 365 days;
    /// zero refuses at once. Default: the loader hard timeout (a load that waited
    /// longer would have timed out had it run).
    pub fn load_permit_wait(mut self, wait: Duration) -> Self {
        self.load.permit_wait = Some(wait);
        self
    }

    /// Turns on the loader circuit breaker: when loads fail or pass the hard timeout in
    /// a burst (as `config` defines one) it opens; reads with a fail-safe copy get the
    /// copy, others fail at once with
    /// [`ErrorKind::CircuitOpen`](crate::ErrorKind::CircuitOpen); after the cool-down one
    /// load probes the database, and its success closes the breaker.
    ///
    /// Off by default: a loader error may be specific to one key (a row the loader
    /// cannot decode), and a breaker would then refuse every key. Turn it on when
    /// loader errors mean the database is unwell.
    pub fn loader_breaker(mut self, config: BreakerConfig) -> Self {
        self.load.breaker = Some(config);
        self
    }
}
