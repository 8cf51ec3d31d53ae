//! Fill guards for L1: a local invalidation clock, per-key tombstones, and lazily
//! compared tag and namespace epochs.
//!
//! Every load records the clock when it starts. An invalidation advances the clock and
//! (for a key) leaves a tombstone `(clock value, expiry)`; a fill is stored only if no
//! tombstone of its key, no tag epoch of its value and no namespace epoch is newer than
//! its start. Tombstones live longer than the loader's hard timeout, and fills older
//! than the tombstone lifetime are refused outright, so a slow fill can never outlive
//! the evidence against it, even when the newer entry was evicted in between.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::clock::Timestamp;

const SHARDS: usize = 64;
/// Sweep a shard's expired tombstones once it holds this many (at least).
const SWEEP_AT: usize = 1024;

/// One shard of tombstones. Expired ones are swept when the map has doubled since the
/// last sweep, so sweeping stays amortised O(1) per invalidation.
struct Tombstones<K> {
    map: HashMap<K, (u64, Timestamp)>,
    sweep_at: usize,
}

/// When a load began: the local invalidation clock and the time. Every fill carries
/// the start of the load that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadStart {
    /// The invalidation clock when the load began.
    pub(crate) seq: u64,
    /// The time when the load began.
    pub(crate) at: Timestamp,
}

pub(crate) struct Guards<K> {
    /// The local invalidation clock. SeqCst with the epochs below so that a load that
    /// reads the clock after an invalidation also sees that invalidation's epoch.
    seq: AtomicU64,
    namespace_epoch: AtomicU64,
    has_tag_epochs: AtomicBool,
    tag_epochs: RwLock<HashMap<String, u64>>,
    /// Tombstones; the shard lock also serialises "check guards then insert into L1"
    /// against "tombstone then evict", which is what makes the L1 guard airtight.
    shards: Box<[Mutex<Tombstones<K>>]>,
    hasher: std::collections::hash_map::RandomState,
    tombstone_ttl: Duration,
}

impl<K: Hash + Eq + Clone> Guards<K> {
    pub(crate) fn new(tombstone_ttl: Duration) -> Self {
        Guards {
            seq: AtomicU64::new(1),
            namespace_epoch: AtomicU64::new(0),
            has_tag_epochs: AtomicBool::new(false),
            tag_epochs: RwLock::new(HashMap::new()),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Tombstones { map: HashMap::new(), sweep_at: SWEEP_AT }))
                .collect(),
            hasher: Default::default(),
            tombstone_ttl,
        }
    }

    /// What a load starting now (at `now`) records.
    pub(crate) fn start(&self, now: Timestamp) -> LoadStart {
        LoadStart { seq: self.seq.load(Ordering::SeqCst), at: now }
    }

    fn advance(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn shard(&self, key: &K) -> &Mutex<Tombstones<K>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Tombstones `key` and runs `evict` under the same lock as fills.
    pub(crate) fn invalidate_key(&self, key: &K, now: Timestamp, evict: impl FnOnce()) {
        let mut shard = self.shard(key).lock();
        let at = self.advance();
        if shard.map.len() >= shard.sweep_at {
            shard.map.retain(|_, (_, exp)| *exp > now);
            shard.sweep_at = (shard.map.len() * 2).max(SWEEP_AT);
        }
        shard.map.insert(key.clone(), (at, now.saturating_add(self.tombstone_ttl)));
        evict();
    }

    /// Runs `store` if no invalidation of `key`, of the namespace, or of one of `tags`
    /// happened since `start`; returns what `store` returned (false when it did not run).
    /// `store` runs under the lock that invalidations of `key` take, so it may look at
    /// what L1 holds for `key` and decide not to store after all.
    pub(crate) fn fill_if_clean(
        &self,
        key: &K,
        start: LoadStart,
        now: Timestamp,
        tags: &[String],
        store: impl FnOnce() -> bool,
    ) -> bool {
        if now.since(start.at) >= self.tombstone_ttl {
            // The tombstones that could prove this fill stale may be gone already.
            return false;
        }
        let shard = self.shard(key).lock();
        if shard.map.get(key).is_some_and(|(at, exp)| *at > start.seq && *exp > now) {
            return false;
        }
        if !self.valid(start.seq, tags) {
            return false;
        }
        let stored = store();
        drop(shard);
        stored
    }

    /// The lowest `fill_seq` that survived the namespace invalidations so far.
    #[inline]
    pub(crate) fn namespace_epoch(&self) -> u64 {
        self.namespace_epoch.load(Ordering::SeqCst)
    }

    /// Whether an entry filled at `fill_seq` with `tags` survived the namespace and tag
    /// invalidations so far. The common untagged case is one atomic load.
    #[inline]
    pub(crate) fn valid(&self, fill_seq: u64, tags: &[String]) -> bool {
        if fill_seq < self.namespace_epoch.load(Ordering::SeqCst) {
            return false;
        }
        if tags.is_empty() || !self.has_tag_epochs.load(Ordering::Acquire) {
            return true;
        }
        let epochs = self.tag_epochs.read();
        tags.iter().all(|t| epochs.get(t).is_none_or(|&e| fill_seq >= e))
    }

    /// Invalidates every entry carrying `tag` (lazily, on read).
    pub(crate) fn invalidate_tag(&self, tag: &str) {
        let mut epochs = self.tag_epochs.write();
        let at = self.advance();
        epochs.insert(tag.to_owned(), at);
        self.has_tag_epochs.store(true, Ordering::Release);
    }

    /// Invalidates every entry and every load in flight (lazily, on read).
    pub(crate) fn invalidate_all(&self) {
        let at = self.advance();
        self.namespace_epoch.store(at, Ordering::SeqCst);
        // Tag epochs older than the namespace epoch can no longer matter.
        self.tag_epochs.write().retain(|_, e| *e > at);
    }
}
