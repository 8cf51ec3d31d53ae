//! L1: the in-process tier, a `quick_cache` (S3-FIFO-like, sharded) holding entries with
//! their own expiry times. quick_cache has no TTL of its own; expiry is checked on read
//! and memory stays bounded by the capacity because expired entries are evicted like
//! any other when space is needed.

use std::sync::Arc;

use quick_cache::Weighter;

use crate::clock::Timestamp;

/// Bookkeeping stored beside each value. `Copy`, so a hit clones it without touching
/// any shared reference count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    /// Row version from the loader (0 when none was given).
    pub(crate) version: u64,
    pub(crate) created: Timestamp,
    /// Fresh until then.
    pub(crate) fresh_until: Timestamp,
    /// Usable by fail-safe until then; removed after.
    pub(crate) usable_until: Timestamp,
    /// Before this time XFetch cannot fire (its probability is below 1e-12).
    pub(crate) refresh_from: Timestamp,
    /// The local invalidation clock when the load that produced this entry began.
    pub(crate) fill_seq: u64,
    /// How long the load took (XFetch's Δ).
    pub(crate) load_nanos: u64,
    /// A stale copy re-armed by fail-safe: served, but counted as stale.
    pub(crate) stale_copy: bool,
}

/// One L1 entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry<V> {
    /// `None` is a cached negative result.
    pub(crate) value: Option<V>,
    pub(crate) meta: Meta,
    pub(crate) tags: Option<Arc<[String]>>,
}

/// The user's weigher, if any.
pub(crate) type WeighFn<K, V> = Arc<dyn Fn(&K, &V) -> u64 + Send + Sync>;

pub(crate) struct EntryWeighter<K, V>(pub(crate) Option<WeighFn<K, V>>);

impl<K, V> Clone for EntryWeighter<K, V> {
    fn clone(&self) -> Self {
        EntryWeighter(self.0.clone())
    }
}

impl<K, V> Weighter<K, Entry<V>> for EntryWeighter<K, V> {
    fn weight(&self, key: &K, entry: &Entry<V>) -> u64 {
        match (&self.0, &entry.value) {
            // Weight 0 would make an entry unevictable in quick_cache.
            (Some(f), Some(v)) => f(key, v).max(1),
            _ => 1,
        }
    }
}

pub(crate) type L1<K, V> = quick_cache::sync::Cache<K, Entry<V>, EntryWeighter<K, V>>;
