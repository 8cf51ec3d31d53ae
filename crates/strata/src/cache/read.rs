//! The read methods of [`Cache`].

use std::future::Future;

use super::Cache;
use super::flight::{self, FlightKind};
use super::hit_age;
use super::load::Loading;
use super::probe::{Look, Probe};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};
use crate::loader::{BoxError, Loader};
use crate::tier::Lookup;

impl<K: CacheKey, V: CacheValue> Cache<K, V> {
    /// Reads `key` from L1 only, synchronously: `None` when absent, expired,
    /// invalidated, or the cache is bypassed or shut down. The cheapest read; use it
    /// where an await is unwelcome.
    #[inline]
    pub fn get_local(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        inner.note_read(key);
        let now = inner.clock.now();
        // `probe` spelled out, so that a fast hit returns without building a `Probe`.
        match inner.l1.read(key, |slot| inner.look(slot, now))? {
            Look::Fast(value) => {
                inner.stats.l1_hits.incr();
                if hit_age::sampled() {
                    inner.record_l1_hit_age(key, now);
                }
                value
            }
            Look::Slow(slot) => inner.get_local_slow(&slot, now),
        }
    }

    /// Reads `key` from L1, then L2; never calls a loader.
    ///
    /// `Ok(Some(v))` is a hit; `Ok(None)` means neither tier holds `key` (or holds a
    /// cached "not found"). Anything that keeps the cache from telling is an error, so
    /// that it never reads as "absent": [`ErrorKind::Bypassed`] while the cache is
    /// bypassed (Strong level, L2 untrusted), the L2 failure (timeout, open breaker,
    /// unreachable) when L1 missed and L2 could not answer, [`ErrorKind::Shutdown`]
    /// after `shutdown`.
    pub async fn get(&self, key: &K) -> Result<Option<V>> {
        let inner = &self.inner;
        let now = inner.clock.now();
        self.check_readable()?;
        inner.note_read(key);
        if let Probe::Fresh(value, _) = inner.probe(key, now) {
            inner.stats.l1_hits.incr();
            if hit_age::sampled() {
                inner.record_l1_hit_age(key, now);
            }
            return Ok(value);
        }
        let Some(l2) = &inner.l2 else {
            inner.stats.misses.incr();
            return inner.waiting_value(key).await;
        };
        let loading = Loading::new(key.clone(), inner.guards.start(now));
        let lookup =
            l2.call("lookup", &inner.stats, l2.tier().lookup(l2.ns(), &loading.key_str, None)).await?;
        if let Lookup::Hit(env) = lookup
            && let Some(value) = inner.fill_from_l2(&loading, env).await
        {
            return Ok(value);
        }
        inner.stats.misses.incr();
        inner.waiting_value(key).await
    }

    /// Reads `key`, loading it with `loader` on a miss.
    ///
    /// # Concurrency
    ///
    /// Concurrent calls for the same key in this instance share one load (single-flight
    /// spanning the L2 read and the loader): one L2 read, at most one loader call, and
    /// every caller gets the same value or the same error. Across the fleet, with an L2
    /// tier that grants load leases, one instance runs the loader while the others wait
    /// up to `lease_wait` for its fill. The load runs on its own task, so a caller that
    /// gives up does not cancel it for the others, and `loader` must be `'static`.
    ///
    /// # Consistency
    ///
    /// A load that began before an invalidation of `key` (or of its tag or namespace) is
    /// returned to the callers that were already waiting but never stored, in L1 or L2.
    /// A caller that arrives after the invalidation starts a new load. While the cache
    /// is bypassed, every call runs `loader` and stores nothing.
    ///
    /// # Failures
    ///
    /// When the loader fails or passes the hard timeout and fail-safe is on, a copy that
    /// expired less than the fail-safe duration ago is returned instead (and re-armed for
    /// the throttle period). Past the soft timeout such a copy is returned at once while
    /// the load finishes in the background.
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = &self.inner;
        let now = inner.clock.now();
        if inner.is_closed() {
            return Err(shut_down());
        }
        inner.note_read(key);
        if inner.is_bypassed() {
            inner.stats.bypassed_reads.incr();
            return inner.load_direct(key, loader).await;
        }
        let stale = match inner.probe(key, now) {
            Probe::Fresh(value, refresh) => {
                inner.stats.l1_hits.incr();
                if hit_age::sampled() {
                    inner.record_l1_hit_age(key, now);
                }
                if let Some(fresh_until) = refresh {
                    inner.spawn_refresh(key, fresh_until, loader);
                }
                return Ok(value);
            }
            Probe::Stale(e) => Some(e),
            Probe::Absent => None,
        };
        let (rx, lead) = inner.flights.join_or_lead(key);
        if let Some(lead) = lead {
            // A load of the key may have finished between the probe and `join_or_lead`
            // (it fills L1, then forgets its flight): look again before loading twice.
            if let Probe::Fresh(value, _) = inner.probe(key, inner.clock.now()) {
                inner.flights.finish(key, lead.id);
                flight::complete(&lead.tx, Ok(value.clone()));
                inner.stats.l1_hits.incr();
                return Ok(value);
            }
            inner.spawn_flight(key, lead, loader, stale, FlightKind::Read);
        }
        flight::wait(rx).await
    }

    /// [`get_or_load`](Self::get_or_load) through the cache's [`Loader`] (set with
    /// [`CacheBuilder::loader`](crate::CacheBuilder::loader)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] when the cache has no loader; else as `get_or_load`.
    pub async fn fetch(&self, key: &K) -> Result<Option<V>> {
        let loader = self.loader()?;
        let k = key.clone();
        self.get_or_load(key, move || async move { loader.load(&k).await }).await
    }

    /// [`get`](Self::get) of several keys: L1, then one L2 round trip for the keys L1
    /// did not hold. The values come in the order of `keys`.
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        self.check_readable()?;
        self.inner.get_many(keys).await
    }

    /// [`fetch`](Self::fetch) of several keys: L1, then one L2 round trip for the
    /// keys L1 did not hold, then one [`Loader::load_many`] call for the keys neither
    /// tier held. Keys already being loaded (by another call) are waited for, not
    /// loaded twice. The values come in the order of `keys`; the first error fails the
    /// whole call (keys with a fail-safe copy get the copy instead).
    pub async fn get_or_load_many(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        let loader = self.loader()?;
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(shut_down());
        }
        if inner.is_bypassed() {
            inner.stats.bypassed_reads.incr();
            let load = inner.load_many_waiting_first(keys, &*loader);
            return inner.call_loader(load, None).await.map(|(values, _)| values);
        }
        inner.get_or_load_many(keys, loader).await
    }

    fn loader(&self) -> Result<std::sync::Arc<dyn Loader<K, V>>> {
        self.inner.cfg.loader.clone().ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "this cache has no loader; set one with CacheBuilder::loader")
        })
    }

    /// A read that may not load: refused when shut down or bypassed.
    fn check_readable(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(shut_down());
        }
        if inner.is_bypassed() {
            inner.stats.bypassed_reads.incr();
            return Err(Error::new(
                ErrorKind::Bypassed,
                "the cache is bypassed until l2 is clean again; read from the source instead",
            ));
        }
        Ok(())
    }
}

fn shut_down() -> Error {
    Error::new(ErrorKind::Shutdown, "the cache was shut down")
}
