//! L1: the in-process tier. quick_cache's S3-FIFO shards hold [`Slot`]s with their own
//! expiry times (quick_cache has no TTL of its own; expiry is checked on read, and
//! memory stays bounded by the capacity because expired entries are evicted like any
//! other when space is needed), the [`FastFloor`] every hit compares with, and the fill
//! guards ([`Guards`]) that keep a load older than an invalidation out of the table.
//!
//! # Dropping an entry keeps its history
//!
//! S3-FIFO decides what to keep from what it remembers about a key: whether its entry
//! is hot or cold, how often it was used since it came in, and, for a key evicted from
//! the cold queue a while ago, a ghost, whose return admits the key straight to the
//! hot queue. `quick_cache`'s `remove` erases all of it, ghost included. An
//! invalidation (local, or applied from the backplane) and every [`Cache::insert`]
//! (which invalidates the key, then fills it) used to go through it, so a key that was
//! written or invalidated came back as if never seen: replaying the ARC paper's OLTP
//! trace at 1,000 entries by `get`, then `insert` on a miss, hit 28 % where the same
//! replay through `get_or_load` hit 35 %, the engine's own ratio (20–26 % against
//! 36 % on the LIRS sprite trace at 128; the `hit_ratio` example prints the table).
//!
//! So L1 never removes a single entry: [`L1::invalidate`] swaps the slot for a
//! tombstone (`None`, see [`Held`]) in place. The value is dropped at once, and
//! nothing reads a tombstone ([`L1::read`] and [`L1::peek`] treat it as absent), so an
//! invalidated key is a miss on every path; but the key keeps its place in the policy,
//! and the next fill takes it over as it would a live entry's. A ghost is left as it
//! is. A tombstone weighs 1 (quick_cache's least evictable weight: nothing beside a
//! weigher's bytes, one entry of capacity without a weigher, as the entry had) and
//! ages out like any entry, into a ghost from the cold queue. [`L1::len`] does not
//! count tombstones, nor does `l1_evictions` count their eviction. Only a flush
//! ([`L1::clear`]: a namespace invalidation, a gap in the backplane, shutdown) still
//! forgets everything.
//!
//! [`Cache::insert`]: crate::Cache::insert

mod guard;
mod slot;

pub(crate) use guard::{By, Cause, Guards, LoadStart};
pub(crate) use slot::{Entry, Meta, Slot, Tags, XFetchLead};

use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZero;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

impl<K, V: Clone> Weighter<Keyed<K>, Held<V>> for EntryWeighter<K, V> {
    fn weight(&self, key: &Keyed<K>, held: &Held<V>) -> u64 {
        match (&self.0, held.as_ref().and_then(Slot::value)) {
            // Weight 0 would make an entry unevictable in quick_cache: a negative entry
            // and a tombstone weigh 1, the least an evictable entry can.
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

/// What a shard holds for a key: its slot, or `None`, the tombstone that
/// [`L1::invalidate`] leaves in the slot's place so that the key keeps its standing in
/// the eviction policy (see the module docs). A tombstone holds no value, weighs 1 and
/// reads as absent: [`L1::read`] and [`L1::peek`] never hand one out.
type Held<V> = Option<Slot<V>>;

type Shard<K, V> =
    quick_cache::unsync::Cache<Keyed<K>, Held<V>, EntryWeighter<K, V>, PassThrough, CountEvictions>;

/// Counts capacity evictions (`l1_evictions`) and the tombstones that leave the table,
/// and keeps the (at most two) evicted entries of a request in its state, as
/// quick_cache's own sync lifecycle does, so that [`L1::insert`] drops them after the
/// shard lock is released.
#[derive(Clone)]
pub(crate) struct CountEvictions {
    evictions: Arc<AtomicU64>,
    /// Tombstones in the table, across shards; changed only under a shard's write lock.
    tombstones: Arc<AtomicUsize>,
}

impl<K, V> quick_cache::Lifecycle<K, Held<V>> for CountEvictions {
    type RequestState = [Option<(K, Held<V>)>; 2];

    /// Called for an entry evicted for capacity, and for one that an insert replaced.
    #[inline]
    fn on_evict(&self, state: &mut Self::RequestState, key: K, val: Held<V>) {
        if val.is_none() {
            // A tombstone, evicted (a cold one stays as a ghost) or replaced by a fill.
            self.tombstones.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.evictions.fetch_add(1, Ordering::Relaxed);
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
    /// The lifecycle's count of tombstones, which [`L1::len`] leaves out.
    tombstones: Arc<AtomicUsize>,
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
        let tombstones = Arc::new(AtomicUsize::new(0));
        let lifecycle = CountEvictions { evictions, tombstones: tombstones.clone() };
        L1 {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard::with(
                        entries,
                        weight.max(1),
                        weighter.clone(),
                        PassThrough,
                        lifecycle.clone(),
                    ))
                })
                .collect(),
            shard_mask: shards - 1,
            tombstones,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Shard<K, V>> {
        // Away from the low bits and the top 7, which hashbrown uses inside the shard.
        // The mask is the slice's length − 1, so the index is in range.
        &self.shards[(hash.rotate_right(32) & self.shard_mask) as usize]
    }

    /// Runs `f` on `key`'s slot under the shard's read lock (marking it used, for
    /// eviction). `f` must be short and must not touch L1. `None` when there is no slot:
    /// the key is absent, a ghost, or a tombstone (whose read counts as a use, as a
    /// hit's would: the load that follows takes the key's place back).
    #[inline]
    pub(crate) fn read<R>(&self, key: &K, f: impl FnOnce(&Slot<V>) -> R) -> Option<R> {
        let hash = KEY_HASHER.hash_one(key);
        let shard = self.shard(hash).read();
        shard.get(&Lookup { hash, key }).and_then(Option::as_ref).map(f)
    }

    /// Runs `f` on `key`'s slot under the shard's read lock without marking it used
    /// (for a look that is not a read, which must not sway eviction); `None` as for
    /// [`L1::read`].
    pub(crate) fn inspect<R>(&self, key: &K, f: impl FnOnce(&Slot<V>) -> R) -> Option<R> {
        let hash = KEY_HASHER.hash_one(key);
        self.shard(hash).read().peek(&Lookup { hash, key }).and_then(Option::as_ref).map(f)
    }

    /// A copy of `key`'s slot, without marking it used; `None` for a tombstone too.
    pub(crate) fn peek(&self, key: &K) -> Option<Slot<V>> {
        self.inspect(key, Slot::clone)
    }

    /// Stores `slot` for `key`. Over a tombstone or a ghost of `key`, the slot takes
    /// the key's standing in the eviction policy (quick_cache's insert over an
    /// existing entry keeps its hot or cold state and counts a use; over a ghost it
    /// enters hot), as it would over a live entry.
    pub(crate) fn insert(&self, key: K, slot: Slot<V>) {
        let hash = KEY_HASHER.hash_one(&key);
        // Declared before the lock so that what the insert evicts is dropped after it.
        let mut evicted = Default::default();
        self.shard(hash).write().insert_with_lifecycle(Keyed(key), Some(slot), &mut evicted);
    }

    /// Drops `key`'s slot, leaving a tombstone in its place: nothing reads it any more,
    /// its value is freed, but the key keeps its hot or cold state and use count (and a
    /// cold tombstone that is evicted leaves a ghost, as a cold entry would). A ghost
    /// of `key` is left as it is. quick_cache's `remove` would erase either record, so
    /// that a key invalidated or replaced would come back as if never seen.
    pub(crate) fn invalidate(&self, key: &K) -> bool {
        let hash = KEY_HASHER.hash_one(key);
        let mut shard = self.shard(hash).write();
        // `peek_mut` finds residents only, without counting a use; dropping its guard
        // moves the entry's weight to the tombstone's (1).
        let old = shard.peek_mut(&Lookup { hash, key }).and_then(|mut held| held.take());
        if old.is_some() {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
        }
        drop(shard);
        let held = old.is_some();
        // The old slot is dropped after the lock.
        drop(old);
        held
    }

    /// Empties the table, the eviction policy's record of past keys included.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            let tombstones = shard.write().drain().filter(|(_, held)| held.is_none()).count();
            self.tombstones.fetch_sub(tombstones, Ordering::Relaxed);
        }
    }

    /// Live slots (fresh or not), tombstones left out.
    pub(crate) fn len(&self) -> usize {
        let resident: usize = self.shards.iter().map(|s| s.read().len()).sum();
        resident.saturating_sub(self.tombstones.load(Ordering::Relaxed))
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
            l1.invalidate(&k);
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

    /// Every key of `0..keys` that `l1` holds a slot for.
    fn resident(l1: &L1<u64, u64>, keys: u64) -> Vec<u64> {
        (0..keys).filter(|k| l1.peek(k).is_some()).collect()
    }

    #[test]
    fn invalidating_before_an_insert_changes_nothing_the_policy_remembers() {
        // Two tables fed the same reads and fills; one invalidates each key before its
        // fill, as `Cache::insert` does. Fills land on absent keys, ghosts and live
        // entries (a write over a cached value) alike.
        let plain = L1::<u64, u64>::with_weighter(64, 64, EntryWeighter(None), Arc::default());
        let invalidating = L1::<u64, u64>::with_weighter(64, 64, EntryWeighter(None), Arc::default());
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut hits = 0;
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = if x % 10 < 7 { x / 10 % 40 } else { 40 + x / 10 % 360 };
            let got = plain.read(&k, Slot::fast_value);
            assert_eq!(got, invalidating.read(&k, Slot::fast_value), "request {i}, key {k}");
            if got.is_some() && !x.is_multiple_of(7) {
                hits += 1;
                continue;
            }
            plain.insert(k, slot(k));
            invalidating.invalidate(&k);
            assert_eq!(invalidating.read(&k, Slot::fast_value), None, "invalidated");
            invalidating.insert(k, slot(k));
        }
        assert!(hits > 5_000, "{hits} hits");
        assert_eq!(resident(&plain, 400), resident(&invalidating, 400));
        assert_eq!(plain.len(), invalidating.len());
    }

    #[test]
    fn a_tombstone_costs_a_slot_no_byte() {
        // `None` lives in the slot's niche: the hit path reads no more memory.
        assert_eq!(std::mem::size_of::<Held<u64>>(), std::mem::size_of::<Slot<u64>>());
        assert_eq!(std::mem::size_of::<Held<Arc<String>>>(), std::mem::size_of::<Slot<Arc<String>>>());
    }

    #[test]
    fn a_tombstone_reads_as_absent_weighs_one_and_is_not_an_entry() {
        let evictions = Arc::new(AtomicU64::new(0));
        let l1 = L1::<u64, u64>::with_weighter(
            16,
            1_000,
            EntryWeighter(Some(Arc::new(|_, _| 100))),
            evictions.clone(),
        );
        assert_eq!(l1.shards.len(), 1);
        let weight = || l1.shards[0].read().weight();
        for k in 0..5 {
            l1.insert(k, slot(k));
        }
        assert_eq!((l1.len(), weight()), (5, 500));
        l1.invalidate(&1);
        l1.invalidate(&2);
        l1.invalidate(&2);
        l1.invalidate(&99);
        assert_eq!(l1.read(&1, Slot::fast_value), None);
        assert!(l1.peek(&2).is_none());
        assert_eq!((l1.len(), weight()), (3, 302), "two tombstones of weight 1");
        l1.insert(2, slot(20));
        assert_eq!(l1.read(&2, Slot::fast_value), Some(Some(20)));
        assert_eq!((l1.len(), weight()), (4, 401));
        // Tombstones leaving for capacity are not counted as evictions.
        for k in 100..200 {
            l1.insert(k, slot(k));
        }
        assert!(l1.peek(&1).is_none());
        let held = l1.shards[0].read().iter().count();
        assert_eq!(l1.len() as u64 + evictions.load(Ordering::Relaxed), 104, "{held} held");
        l1.invalidate(&150);
        l1.clear();
        assert_eq!((l1.len(), weight()), (0, 0));
        assert_eq!(l1.tombstones.load(Ordering::Relaxed), 0);
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
