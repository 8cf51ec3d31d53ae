//! Database overload protection: how many loads may run at once (per cache, and across
//! the caches that share one database pool) and the loader's circuit breaker.
//!
//! A mass invalidation or an L2 outage turns every read into a load. Single-flight
//! already collapses loads of one key; these limits bound loads of *distinct* keys, so
//! the database sees at most the configured number of concurrent queries from one
//! instance and stale copies are served (fail-safe) while it catches up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::breaker::BreakerConfig;
use crate::clock::MAX_SETTING;
use crate::error::BuildError;

/// The largest concurrent-load limit accepted (tokio's semaphore allows more; no pool does).
pub const MAX_LOAD_LIMIT: usize = 1_000_000;

/// Default per-cache limit on concurrent loads.
///
/// 64 is above the connection pool of most services (sqlx and deadpool default to 10 and
/// `num_cpus * 4`), so it never slows a healthy cache, yet it keeps a miss storm on one
/// instance from opening thousands of queries at once.
pub const DEFAULT_MAX_CONCURRENT_LOADS: usize = 64;

/// A limit on concurrent loads shared by several caches (for example every cache whose
/// loader queries one database pool). Cheap to clone: clones share the permits.
///
/// Pass it to each cache's [`CacheBuilder::load_limiter`](crate::CacheBuilder::load_limiter);
/// a load then needs a permit from the cache's own limit and from this one.
#[derive(Clone)]
pub struct LoadLimiter {
    inner: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) limit: usize,
    pub(crate) permits: Semaphore,
}

impl LoadLimiter {
    /// A limiter named `name` (used in errors and logs) allowing `max_concurrent_loads`
    /// loads at once, 1..=1 000 000.
    pub fn new(name: impl Into<String>, max_concurrent_loads: usize) -> Result<Self, BuildError> {
        check_limit("LoadLimiter::new", max_concurrent_loads)?;
        Ok(LoadLimiter {
            inner: Arc::new(Shared {
                name: name.into(),
                limit: max_concurrent_loads,
                permits: Semaphore::new(max_concurrent_loads),
            }),
        })
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many loads may run at once.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Loads holding a permit now, across every cache sharing this limiter.
    pub fn in_flight(&self) -> usize {
        self.inner.limit.saturating_sub(self.inner.permits.available_permits())
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner
    }
}

impl std::fmt::Debug for LoadLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadLimiter")
            .field("name", &self.inner.name)
            .field("limit", &self.inner.limit)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

pub(crate) fn check_limit(setting: &'static str, n: usize) -> Result<(), BuildError> {
    if (1..=MAX_LOAD_LIMIT).contains(&n) {
        return Ok(());
    }
    Err(BuildError::new(
        setting,
        format!("is {n}"),
        format!("use 1..={MAX_LOAD_LIMIT} concurrent loads (default {DEFAULT_MAX_CONCURRENT_LOADS})"),
    ))
}

/// The load-protection settings of one cache, as the builder collects them.
#[derive(Clone, Debug)]
pub(crate) struct LoadProtection {
    /// The cache's own limit; `None` when unlimited.
    pub(crate) max_concurrent: Option<usize>,
    pub(crate) limiter: Option<LoadLimiter>,
    /// How long a load waits for its permits; `None`: the loader's hard timeout.
    pub(crate) permit_wait: Option<Duration>,
    /// The loader's breaker; `None` when off.
    pub(crate) breaker: Option<BreakerConfig>,
}

impl Default for LoadProtection {
    fn default() -> Self {
        LoadProtection {
            max_concurrent: Some(DEFAULT_MAX_CONCURRENT_LOADS),
            limiter: None,
            permit_wait: None,
            breaker: None,
        }
    }
}

impl LoadProtection {
    /// Checks the settings, naming the builder setter at fault.
    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        if let Some(n) = self.max_concurrent {
            check_limit("max_concurrent_loads", n)?;
        }
        if let Some(wait) = self.permit_wait
            && wait > MAX_SETTING
        {
            return Err(BuildError::new(
                "load_permit_wait",
                format!("is {wait:?}"),
                "use a duration of at most 365 days (zero fails at once when the limit is reached)",
            ));
        }
        if let Some(breaker) = &self.breaker {
            breaker.validate().map_err(|mut e| {
                // The breaker names its fields as the L2 breaker's; say which breaker.
                e.problem = format!("{} {}", e.setting.trim_start_matches("breaker."), e.problem);
                e.setting = "loader_breaker";
                e
            })?;
        }
        Ok(())
    }
}
