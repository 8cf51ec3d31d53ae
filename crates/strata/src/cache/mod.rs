//! The [`Cache`] handle and everything behind it.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the handle: construction, introspection, readiness, shutdown, write locks |
//! | `read.rs`, `write.rs` | the handle's read and write methods |
//! | `builder.rs`, `builder_fleet.rs`, `builder_load.rs`, `builder_write.rs`, `config.rs` | the builder and the validated configuration it produces |
//! | `state.rs` | the state every handle and task shares ([`Inner`](state::Inner)) |
//! | `probe.rs` | the L1 side of a read: the hit path, `max_stale`, XFetch |
//! | `flight.rs`, `load.rs`, `batch.rs` | single-flight, one key's load, batch reads |
//! | `entry.rs` | the TTL policy, L2 envelopes, the guarded L1 fill (with the version guard) |
//! | `l2.rs` | the L2 call wrapper: the one owner of the L2 breaker and timeout |
//! | `invalidate.rs`, `pending.rs` | the invalidation algorithm, and its retry buffer |
//! | `write_lock.rs` | write locks (invalidation before a commit) |
//! | `erased.rs`, `handle.rs` | the cache without its types, and [`CacheHandle`](handle::CacheHandle) |
//! | `tasks.rs` | the background tasks, and the cache's side of the fleet protocol |
//! | `hit_age.rs` | the sampled age-at-hit histogram |
//! | `hot_keys.rs`, `warm_up.rs` | the sampled hot-key ranking, and warm-up before readiness |

pub(crate) mod batch;
pub(crate) mod builder;
pub(crate) mod builder_fleet;
pub(crate) mod builder_l2;
pub(crate) mod builder_load;
pub(crate) mod builder_write;
pub(crate) mod config;
pub(crate) mod entry;
pub(crate) mod erased;
pub(crate) mod flight;
pub(crate) mod gate;
pub(crate) mod handle;
pub(crate) mod hit_age;
pub(crate) mod hot_keys;
pub(crate) mod invalidate;
pub(crate) mod l2;
pub(crate) mod load;
pub(crate) mod pending;
pub(crate) mod probe;
pub(crate) mod read;
pub(crate) mod reload;
pub(crate) mod state;
pub(crate) mod tasks;
pub(crate) mod warm_up;
pub(crate) mod write;
pub(crate) mod write_lock;

use std::sync::Arc;

use erased::CacheHealth;
use handle::CacheHandle;
use state::{Inner, Lifetime};
use write_lock::WriteLock;

use crate::backplane::{MessageBody, OriginId};
use crate::breaker::BreakerState;
use crate::consistency::Consistency;
use crate::error::Result;
use crate::fleet::Attempt;
use crate::key::{CacheKey, CacheValue};
use crate::scope::Scope;
use crate::stats::CacheStats;

/// A typed, namespaced cache handle. Cheap to clone: clones share everything.
///
/// See the crate documentation for the consistency promise of each level.
pub struct Cache<K, V> {
    pub(crate) inner: Arc<Inner<K, V>>,
    /// Shared by every handle: the last one dropped stops the background tasks.
    lifetime: Arc<Lifetime>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache { inner: self.inner.clone(), lifetime: self.lifetime.clone() }
    }
}

impl<K: CacheKey, V: CacheValue> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.namespace())
            .field("consistency", &self.consistency())
            .field("origin", &self.origin())
            .field("l1_entries", &self.inner.l1.len())
            .field("config", &self.inner.cfg)
            .finish()
    }
}

impl<K: CacheKey, V: CacheValue> Cache<K, V> {
    pub(crate) fn new(inner: Arc<Inner<K, V>>, lifetime: Lifetime) -> Self {
        Cache { inner, lifetime: Arc::new(lifetime) }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.cfg.namespace
    }

    /// The consistency level in force.
    pub fn consistency(&self) -> Consistency {
        self.inner.cfg.consistency
    }

    /// This cache's origin id on the backplane.
    pub fn origin(&self) -> OriginId {
        self.inner.origin
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats.snapshot(self.inner.l1.len() as u64, self.inner.gate.in_flight() as u64)
    }

    /// What a health or readiness probe needs to know, in one snapshot.
    pub fn health(&self) -> CacheHealth {
        erased::ErasedCache::health(&*self.inner)
    }

    /// Whether the backplane is healthy (always true without one).
    pub fn is_backplane_healthy(&self) -> bool {
        self.inner.health.is_healthy()
    }

    /// The state of the L2 circuit breaker (`Closed` without an L2 tier).
    pub fn l2_breaker_state(&self) -> BreakerState {
        self.inner.l2.as_ref().map_or(BreakerState::Closed, |l2| l2.breaker().state())
    }

    /// True while the cache is *bypassed*: L2 may hold a value that should have been
    /// deleted (Strong level), so reads go to the loader until the namespace bump that
    /// cleans L2 succeeds.
    pub fn is_bypassed(&self) -> bool {
        self.inner.is_bypassed()
    }

    /// Invalidations waiting to be retried against L2 or the backplane, and messages
    /// waiting in the outbox for their turn to be published.
    pub fn pending_invalidations(&self) -> usize {
        let queued = self.inner.fleet.as_ref().map_or(0, |f| f.queued());
        self.inner.pending.lock().len() + queued
    }

    /// Resolves once the backplane subscription is live (at once without a backplane),
    /// at the Strong level once this instance holds its membership lease (until then L1
    /// is neither filled nor served), and with [`warm_up`](crate::CacheBuilder::warm_up)
    /// once the fleet's hot keys are preloaded (or its budget ran out): a readiness
    /// probe should wait for it.
    pub async fn ready(&self) {
        self.inner.wait_ready().await;
    }

    /// The write-behind side of this cache (save, flush, dead letters), when it was
    /// built with [`CacheBuilder::write_behind`](crate::CacheBuilder::write_behind).
    pub fn write_behind(&self) -> Option<crate::write_behind::WriteBehind<K, V>> {
        let wb = self.inner.write_behind.clone()?;
        Some(crate::write_behind::WriteBehind::new(self.clone(), wb))
    }

    /// This cache without its key and value types: for code that serves many caches
    /// (change capture, transaction helpers, an admin router).
    pub fn handle(&self) -> CacheHandle {
        CacheHandle::new(self.inner.clone(), self.lifetime.clone())
    }

    /// Invalidates `scopes` *before* a database write commits, and keeps them from
    /// being cached again until [`WriteLock::release`]: see the
    /// [`WriteLock`] docs for why the Strong level needs this. The transaction helper
    /// of `strata-sql` calls it for every Strong cache a transaction names.
    ///
    /// Returns once the local copies are gone, L2 holds the lock and the message is on
    /// the backplane; at the Strong level, once every live member acknowledged it or
    /// let its membership lease lapse.
    ///
    /// # Errors
    ///
    /// When L2 cannot take the lock, or the backplane message fails, or (Strong) a
    /// member neither acknowledged nor let its lease lapse, or the cache was shut down:
    /// then the write must not commit. Whatever was locked is released again before the
    /// error returns.
    pub async fn lock_for_write(&self, scopes: impl IntoIterator<Item = Scope>) -> Result<WriteLock> {
        WriteLock::take(self.inner.clone(), self.lifetime.clone(), scopes.into_iter().collect()).await
    }

    /// Retries buffered invalidations now; returns how many remain.
    pub async fn flush_pending(&self) -> usize {
        self.inner.retry_pending().await;
        self.pending_invalidations()
    }

    /// Closes the cache for every handle, after one last attempt to deliver buffered
    /// invalidations: the background tasks stop, and no handle (this one or a clone)
    /// serves or fills anything any more. Reads then fail with
    /// [`ErrorKind::Shutdown`](crate::ErrorKind::Shutdown) (`get_local` returns `None`);
    /// invalidations still reach L2 and the backplane (a write committed during a
    /// drain must not be lost to the fleet), but at the Strong level they return
    /// `Shutdown` because no acknowledgement can be awaited. Once closed with nothing
    /// left to deliver, it tells the fleet it leaves: the others then neither doubt it
    /// when it falls silent nor, at the Strong level, wait for its acknowledgements. A
    /// handle dropped without `shutdown` is a crash to the others.
    pub async fn shutdown(&self) {
        self.inner.retry_pending().await;
        let fleet = self.inner.fleet.as_ref();
        // Failures are the fleet's to repair: an unpublished number is a gap.
        let leave = match fleet {
            Some(fleet) => fleet.drain(&self.inner.stats).await.is_ok() && self.pending_invalidations() == 0,
            None => false,
        };
        self.inner.close();
        if leave && let Some(fleet) = fleet {
            // Nothing of ours is lost with us: the others need not doubt us once we fall
            // silent (otherwise they will, as after a crash), and at the Strong level,
            // closed, we serve nothing any more: their writes need not wait for our
            // acknowledgement, or for our lease to lapse.
            let _ = fleet.send_control(MessageBody::Leave, Attempt::Probe, &self.inner.stats).await;
        }
        self.lifetime.stop();
    }
}
