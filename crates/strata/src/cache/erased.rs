//! The cache with its key and value types erased: what the type-erased
//! [`CacheHandle`](super::handle::CacheHandle) and [`WriteLock`](super::write_lock::WriteLock)
//! call, implemented by every cache's shared state.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;

use super::state::Inner;
use crate::breaker::BreakerState;
use crate::consistency::Consistency;
use crate::error::Result;
use crate::key::{CacheKey, CacheValue};
use crate::scope::Scope;
use crate::stats::CacheStats;

/// A write lock as the cache took it: what its release needs.
#[derive(Debug, Clone)]
pub(crate) struct LockState {
    pub(crate) id: u64,
    /// The scopes locked in L2 (those not yet released).
    pub(crate) scopes: Vec<Scope>,
    /// The message sent with the lock; sent again after the commit below the Strong
    /// level, whose members may fill L1 without L2's consent.
    pub(crate) message: Option<Scope>,
    /// When the first L2 lock was requested: the tier's expiry counts from later.
    pub(crate) taken_at: tokio::time::Instant,
    pub(crate) ttl: Duration,
}

/// A snapshot of what a readiness or health probe asks of a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheHealth {
    /// The namespace.
    pub namespace: String,
    /// The consistency level.
    pub consistency: Consistency,
    /// The backplane subscription is live and its heartbeats come back (always true
    /// without a backplane).
    pub backplane_healthy: bool,
    /// Strong level: this instance holds its membership lease (always true below).
    pub membership_lease_held: bool,
    /// The cache is bypassed: L2 may hold what should have been deleted, so every read
    /// goes to the loader until a namespace bump has cleaned L2 (Strong level).
    pub bypassed: bool,
    /// `shutdown` was called.
    pub closed: bool,
    /// The L2 circuit breaker, when there is an L2 tier.
    pub l2_breaker: Option<BreakerState>,
    /// Invalidations waiting to be retried against L2 or the backplane.
    pub pending_invalidations: usize,
    /// Below the Strong level: another member said an L2 invalidation of its own waits
    /// for its retry, or this instance has not heard from every member since it was cut
    /// off from the backplane. Entries older than `max_stale` are not served from L1
    /// or L2 meanwhile (they are loaded anew).
    pub in_doubt: bool,
    /// Warm-up is still preloading the fleet's hot keys (never true without warm-up).
    pub warming_up: bool,
    /// How long the backplane has been unhealthy (zero while it is healthy): past
    /// `max_stale`, L1 serves only entries younger than `max_stale`.
    pub backplane_unhealthy_for: Duration,
}

impl CacheHealth {
    /// Whether the cache can serve as it promises: not closed, not bypassed, the
    /// backplane healthy, (Strong) the lease held, and warm-up done.
    pub fn is_ready(&self) -> bool {
        !self.closed
            && !self.bypassed
            && self.backplane_healthy
            && self.membership_lease_held
            && !self.warming_up
    }
}

/// The operations a cache offers without its key and value types.
pub(crate) trait ErasedCache: Send + Sync + 'static {
    fn namespace(&self) -> &str;
    fn consistency(&self) -> Consistency;
    fn origin(&self) -> u64;
    fn stats(&self) -> CacheStats;
    fn health(&self) -> CacheHealth;
    fn ready(&self) -> BoxFuture<'_, ()>;
    /// The keys that parse as the cache's key type, in canonical text form, and how
    /// many did not parse.
    fn canonical_keys(&self, keys: &[String]) -> (Vec<String>, usize);
    /// Invalidates `scope` (keys in text form, parsed for L1).
    fn invalidate(&self, scope: Scope) -> BoxFuture<'_, Result<()>>;
    fn lock(&self, scopes: Vec<Scope>) -> BoxFuture<'_, Result<LockState>>;
    fn release(&self, lock: LockState) -> BoxFuture<'_, Result<()>>;
    fn abort(&self, lock: LockState) -> BoxFuture<'_, ()>;
}

impl<K: CacheKey, V: CacheValue> ErasedCache for Inner<K, V> {
    fn namespace(&self) -> &str {
        &self.cfg.namespace
    }

    fn consistency(&self) -> Consistency {
        self.cfg.consistency
    }

    fn origin(&self) -> u64 {
        self.origin
    }

    fn stats(&self) -> CacheStats {
        self.stats.snapshot(self.l1.len() as u64, self.gate.in_flight() as u64)
    }

    fn health(&self) -> CacheHealth {
        CacheHealth {
            namespace: self.cfg.namespace.clone(),
            consistency: self.cfg.consistency,
            backplane_healthy: self.health.is_healthy(),
            membership_lease_held: !self.cfg.is_strong() || self.own_lease_held(self.now()),
            bypassed: self.bypassed.load(Ordering::SeqCst),
            closed: self.is_closed(),
            l2_breaker: self.l2.as_ref().map(|l2| l2.breaker().state()),
            pending_invalidations: self.pending.lock().len(),
            in_doubt: self.health.is_doubted(),
            warming_up: self.warming_up.load(Ordering::SeqCst),
            backplane_unhealthy_for: self
                .health
                .unhealthy_since()
                .map_or(Duration::ZERO, |s| self.now().since(s)),
        }
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.wait_ready())
    }

    fn canonical_keys(&self, keys: &[String]) -> (Vec<String>, usize) {
        let parsed: Vec<String> =
            keys.iter().filter_map(|k| K::parse_key(k)).map(|k| k.to_key_string()).collect();
        let bad = keys.len() - parsed.len();
        (parsed, bad)
    }

    fn invalidate(&self, scope: Scope) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Inner::invalidate(self, &scope, None).await })
    }

    fn lock(&self, scopes: Vec<Scope>) -> BoxFuture<'_, Result<LockState>> {
        Box::pin(self.lock_for_write(scopes))
    }

    fn release(&self, lock: LockState) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.release_lock(lock))
    }

    fn abort(&self, lock: LockState) -> BoxFuture<'_, ()> {
        Box::pin(self.abort_lock(lock))
    }
}
