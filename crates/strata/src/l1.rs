//! L1: the in-process tier, a `quick_cache` (S3-FIFO-like, sharded) holding entries with
//! their own expiry times. quick_cache has no TTL of its own; expiry is checked on read
//! and memory stays bounded by the capacity because expired entries are evicted like
//! any other when space is needed.

use std::sync::Arc;

use quick_cache::Weighter;

use crate::clock::Timestamp;

/// Bookkeeping stored beside each value: 24 bytes, `Copy`.
///
/// Size matters here. A hit clones the entry under quick_cache's shard read lock, and
/// the `l1_hit` benchmark shows the engine's hit cost growing with the entry (a 96-byte
/// value costs ~1.5× an 8-byte one with two threads), so the fields only the slow paths
/// need are packed into one word, rounded in the safe direction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    /// Fresh until then.
    pub(crate) fresh_until: Timestamp,
    /// The local invalidation clock when the load that produced this entry began.
    pub(crate) fill_seq: u64,
    /// Bits 0..20: load time in µs (XFetch's Δ, saturating at ~1 s; 0 = no early
    /// refresh). Bit 20: a stale copy re-armed by fail-safe. Bits 21..42: how long past
    /// `fresh_until` fail-safe may use the entry, in 100 ms (rounded down). Bits 42..64:
    /// `fresh_until − created`, in 100 ms (rounded up, so the entry never looks younger
    /// than it is).
    bits: u64,
}

const LOAD_BITS: u32 = 20;
const STALE_BIT: u64 = 1 << LOAD_BITS;
const EXTRA_SHIFT: u32 = 21;
const EXTRA_BITS: u32 = 21;
const AGE_SHIFT: u32 = 42;
const AGE_BITS: u32 = 22;
const UNIT_NANOS: u64 = 100_000_000;

fn mask(bits: u32) -> u64 {
    (1 << bits) - 1
}

impl Meta {
    pub(crate) fn new(
        created: Timestamp,
        fresh_until: Timestamp,
        usable_until: Timestamp,
        fill_seq: u64,
        load_nanos: u64,
    ) -> Self {
        let load = load_nanos.div_ceil(1000).min(mask(LOAD_BITS));
        let age = fresh_until
            .as_nanos()
            .saturating_sub(created.as_nanos())
            .div_ceil(UNIT_NANOS)
            .min(mask(AGE_BITS));
        let mut m = Meta { fresh_until, fill_seq, bits: load | (age << AGE_SHIFT) };
        m.set_usable_until(usable_until);
        m
    }

    /// When the value was loaded (never later than the truth, to 100 ms).
    pub(crate) fn created(&self) -> Timestamp {
        let age = (self.bits >> AGE_SHIFT) & mask(AGE_BITS);
        Timestamp(self.fresh_until.as_nanos().saturating_sub(age * UNIT_NANOS))
    }

    /// Until when fail-safe may serve the entry.
    pub(crate) fn usable_until(&self) -> Timestamp {
        let extra = (self.bits >> EXTRA_SHIFT) & mask(EXTRA_BITS);
        Timestamp(self.fresh_until.as_nanos().saturating_add(extra * UNIT_NANOS))
    }

    pub(crate) fn set_usable_until(&mut self, t: Timestamp) {
        let extra =
            (t.as_nanos().saturating_sub(self.fresh_until.as_nanos()) / UNIT_NANOS).min(mask(EXTRA_BITS));
        self.bits = (self.bits & !(mask(EXTRA_BITS) << EXTRA_SHIFT)) | (extra << EXTRA_SHIFT);
    }

    /// Moves `fresh_until` keeping `created` and `usable_until` where they were.
    pub(crate) fn set_fresh_until(&mut self, fresh_until: Timestamp) {
        let created = self.created();
        let usable = self.usable_until();
        let age = fresh_until
            .as_nanos()
            .saturating_sub(created.as_nanos())
            .div_ceil(UNIT_NANOS)
            .min(mask(AGE_BITS));
        self.fresh_until = fresh_until;
        self.bits = (self.bits & !(mask(AGE_BITS) << AGE_SHIFT)) | (age << AGE_SHIFT);
        self.set_usable_until(usable);
    }

    #[inline]
    pub(crate) fn is_stale_copy(&self) -> bool {
        self.bits & STALE_BIT != 0
    }

    pub(crate) fn mark_stale_copy(&mut self) {
        self.bits |= STALE_BIT;
    }

    /// Δ for XFetch in µs; 0 disables early refresh.
    #[inline]
    pub(crate) fn load_micros(&self) -> u32 {
        // The mask keeps 20 bits, so the cast is lossless.
        (self.bits & mask(LOAD_BITS)) as u32
    }

    /// Δ for XFetch; 0 disables early refresh.
    #[inline]
    pub(crate) fn load_nanos(&self) -> u64 {
        (self.bits & mask(LOAD_BITS)) * 1000
    }

    pub(crate) fn disable_early_refresh(&mut self) {
        self.bits &= !mask(LOAD_BITS);
    }
}

/// Tags, behind a thin pointer to keep entries small.
pub(crate) type Tags = Arc<Vec<String>>;

/// One L1 entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry<V> {
    /// `None` is a cached negative result.
    pub(crate) value: Option<V>,
    pub(crate) meta: Meta,
    pub(crate) tags: Option<Tags>,
}

impl<V> Entry<V> {
    pub(crate) fn tag_slice(&self) -> &[String] {
        self.tags.as_deref().map_or(&[], Vec::as_slice)
    }
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
