//! L1: the in-process tier. quick_cache's S3-FIFO shards hold [`Slot`]s with their own
//! expiry times (quick_cache has no TTL of its own; expiry is checked on read, and
//! memory stays bounded by the capacity because expired entries are evicted like any
//! other when space is needed), the [`FastFloor`] every hit compares with, and the fill
//! guards ([`Guards`]) that keep a load older than an invalidation out of the table.

mod guard;
mod slot;

pub(crate) use guard::{Guards, LoadStart};
pub(crate) use slot::{Entry, Meta, Slot, Tags, XFetchLead};

use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZero;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use quick_cache::{Equivalent, Weighter};

use crate::sync::{Mutex, RwLock};

/// What the fast path requires of a slot's fill sequence ([`Slot::is_fast_hit`]), so
/// that a hit reads one word for every cache-wide condition: the namespace epoch as a
/// [`Slot::floor`], or `u64::MAX` (no slot) while the owner wants every read to take
/// the slow path (the Strong level, an unhealthy backplane, a closed cache).
pub(crate) struct FastFloor {
    word: crate::sync::AtomicU64,
    /// Serialises [`FastFloor::publish`], so that the last to run stores the floor of
    /// the last state.
    serial: Mutex<()>,
}

impl FastFloor {
    pub(crate) fn new(floor: u64) -> Self {
        FastFloor { word: crate::sync::AtomicU64::new(floor), serial: Mutex::new(()) }
    }

    /// The floor, read under the shard lock by every hit.
    #[inline(always)]
    pub(crate) fn load(&self) -> u64 {
        self.word.load(Ordering::SeqCst)
    }

    /// Recomputes and stores the floor; `compute` runs under the serialising lock, so
    /// that concurrent publishers cannot store an older state last.
    pub(crate) fn publish(&self, compute: impl FnOnce() -> u64) {
        let _serial = self.serial.lock();
        self.word.store(compute(), Ordering::SeqCst);
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

impl<K, V: Clone> Weighter<Keyed<K>, Slot<V>> for EntryWeighter<K, V> {
    fn weight(&self, key: &Keyed<K>, slot: &Slot<V>) -> u64 {
        match (&self.0, slot.value()) {
            // Weight 0 would make an entry unevictable in quick_cache.
            (Some(f), Some(v)) => f(&key.0, v).max(1),
            _ => 1,
        }
    }
}

/// The hasher of every L1 key: foldhash (what quick_cache and hashbrown default to),
/// seeded at random once per process against collision floods.
static KEY_HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// A key as L1 stores it. Its `Hash` feeds the key's foldhash to the shard's
/// [`PassThrough`] hasher, so that a lookup hashes the key once, for the shard choice
/// and the table probe alike ([`Lookup`] carries that hash).
#[derive(PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Keyed<K>(K);

impl<K: Hash> Hash for Keyed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(KEY_HASHER.hash_one(&self.0));
    }
}

/// A key being looked up, with its hash computed once.
struct Lookup<'a, K> {
    hash: u64,
    key: &'a K,
}

impl<K> Hash for Lookup<'_, K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl<K: Eq> Equivalent<Keyed<K>> for Lookup<'_, K> {
    fn equivalent(&self, stored: &Keyed<K>) -> bool {
        *self.key == stored.0
    }
}

/// Hands on the hash that [`Keyed`] or [`Lookup`] wrote.
#[derive(Clone, Copy, Default)]
pub(crate) struct PassThrough;

/// See [`PassThrough`].
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Only `write_u64` is ever called; this mixes anything else in rather than panic.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

type Shard<K, V> =
    quick_cache::unsync::Cache<Keyed<K>, Slot<V>, EntryWeighter<K, V>, PassThrough, CountEvictions>;

/// Counts capacity evictions (`l1_evictions`), and keeps the (at most two) evicted
/// entries of a request in its state, as quick_cache's own sync lifecycle does, so that
/// [`L1::insert`] drops them after the shard lock is released.
#[derive(Clone)]
pub(crate) struct CountEvictions(Arc<AtomicU64>);

impl<K, V> quick_cache::Lifecycle<K, V> for CountEvictions {
    type RequestState = [Option<(K, V)>; 2];

    #[inline]
    fn on_evict(&self, state: &mut Self::RequestState, key: K, val: V) {
        self.0.fetch_add(1, Ordering::Relaxed);
        if let Some(free) = state.iter_mut().find(|s| s.is_none()) {
            *free = Some((key, val));
        }
    }
}

/// L1's table: quick_cache's single-threaded cache shards, each under its own
/// read-write lock, sharded the way `quick_cache::sync::Cache` shards.
///
/// Why not `quick_cache::sync::Cache` itself: its `get` clones the whole stored entry
/// under the shard lock and hands the copy back, where a hit needs two words of the
/// slot and the value. [`L1::read`] inspects the slot in place under the read lock and
/// copies out only what the caller asks for. In a standalone paired loop (strata and a
/// raw quick_cache alternating every 20 000 gets, `u64` values) that took the median
/// hit from 1.24–1.29× a raw quick_cache get to 1.19–1.32× (the `l1_hit` bench's paired
/// run: 1.14–1.21×), and 147 instructions per hit to 123 (raw quick_cache: 98).
pub(crate) struct L1<K, V> {
    shards: Box<[RwLock<Shard<K, V>>]>,
    shard_mask: u64,
}

impl<K: Hash + Eq, V: Clone> L1<K, V> {
    /// Sized as `quick_cache::sync::Cache::with_weighter` would be: four shards per
    /// core, fewer where a shard would hold under 32 entries.
    pub(crate) fn with_weighter(
        estimated_entries: usize,
        capacity: u64,
        weighter: EntryWeighter<K, V>,
        evictions: Arc<AtomicU64>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZero::get);
        let mut shards = (cores * 4).next_power_of_two() as u64;
        let per_shard = |shards: u64| (estimated_entries as u64).saturating_add(shards - 1) / shards;
        while per_shard(shards) < 32 && shards > 1 {
            shards /= 2;
        }
        let weight = capacity.saturating_add(shards - 1) / shards;
        // The cast is lossless: `per_shard` is at most `estimated_entries`.
        let entries = per_shard(shards) as usize;
        L1 {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard::with(
                        entries,
                        weight.max(1),
                        weighter.clone(),
                        PassThrough,
                        CountEvictions(evictions.clone()),
                    ))
                })
                .collect(),
            shard_mask: shards - 1,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Shard<K, V>> {
        // Away from the low bits and the top 7, which hashbrown uses inside the shard.
        // The mask is the slice's length − 1, so the index is in range.
        &self.shards[(hash.rotate_right(32) & self.shard_mask) as usize]
    }

    /// Runs `f` on `key`'s slot under the shard's read lock (marking it used, for
    /// eviction). `f` must be short and must not touch L1.
    #[inline]
    pub(crate) fn read<R>(&self, key: &K, f: impl FnOnce(&Slot<V>) -> R) -> Option<R> {
        let hash = KEY_HASHER.hash_one(key);
        let shard = self.shard(hash).read();
        shard.get(&Lookup { hash, key }).map(f)
    }

    /// A copy of `key`'s slot, without marking it used.
    pub(crate) fn peek(&self, key: &K) -> Option<Slot<V>> {
        let hash = KEY_HASHER.hash_one(key);
        self.shard(hash).read().peek(&Lookup { hash, key }).cloned()
    }

    pub(crate) fn insert(&self, key: K, slot: Slot<V>) {
        let hash = KEY_HASHER.hash_one(&key);
        // Declared before the lock so that what the insert evicts is dropped after it.
        let mut evicted = Default::default();
        self.shard(hash).write().insert_with_lifecycle(Keyed(key), slot, &mut evicted);
    }

    pub(crate) fn remove(&self, key: &K) {
        let hash = KEY_HASHER.hash_one(key);
        // Bound, so that the entry is dropped after the lock.
        let _removed = self.shard(hash).write().remove(&Lookup { hash, key });
    }

    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.write().clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::slot::{Entry, Meta, XFetchLead};
    use super::*;
    use crate::clock::Timestamp;

    fn entry(value: Option<u64>, fill_seq: u64) -> Entry<u64> {
        let created = Timestamp(1_700_000_000_123_456_789);
        let fresh = Timestamp(created.0 + 3_600_000_000_123);
        Entry { value, meta: Meta::new(created, fresh, fresh, fill_seq, 1_000), tags: None }
    }

    fn slot(v: u64) -> Slot<u64> {
        Slot::new(entry(Some(v), 1), XFetchLead::new(0))
    }

    #[test]
    fn the_table_finds_what_it_stores_in_every_shard() {
        let l1 = L1::<u64, u64>::with_weighter(20_000, 20_000, EntryWeighter(None), Arc::default());
        assert!(l1.shards.len() > 1);
        for k in 0..10_000 {
            l1.insert(k, slot(k * 2));
        }
        assert_eq!(l1.len(), 10_000);
        for k in 0..10_000 {
            assert_eq!(l1.read(&k, Slot::fast_value), Some(Some(k * 2)));
            assert_eq!(l1.peek(&k).and_then(|s| s.value().copied()), Some(k * 2));
        }
        assert_eq!(l1.read(&10_000, Slot::fast_value), None);
        for k in (0..10_000).step_by(2) {
            l1.remove(&k);
        }
        assert_eq!(l1.len(), 5_000);
        assert_eq!(l1.read(&2, Slot::fast_value), None);
        assert_eq!(l1.read(&3, Slot::fast_value), Some(Some(6)));
        l1.insert(3, slot(7));
        assert_eq!(l1.read(&3, Slot::fast_value), Some(Some(7)));
        l1.clear();
        assert_eq!(l1.len(), 0);
        assert_eq!(l1.read(&3, Slot::fast_value), None);
    }

    #[test]
    fn the_table_stays_within_its_capacity() {
        let l1 = L1::<String, u64>::with_weighter(
            100,
            1_000,
            EntryWeighter(Some(Arc::new(|_, _| 10))),
            Arc::default(),
        );
        for k in 0..10_000u64 {
            l1.insert(k.to_string(), slot(k));
        }
        // 1 000 weight units of 10 each, rounded up per shard.
        let shards = l1.shards.len();
        assert!(l1.len() <= 100 + shards, "{} entries in {shards} shards", l1.len());
        assert!(l1.len() >= 50, "{} entries", l1.len());
    }

    #[test]
    fn the_pass_through_hasher_takes_anything() {
        let mut h = PassThrough.build_hasher();
        h.write(b"bytes");
        let mixed = h.finish();
        h.write_u64(42);
        assert_eq!(h.finish(), 42);
        assert_ne!(mixed, 0);
    }
}
