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
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::backplane::OriginId;
use crate::clock::Timestamp;
use crate::sync::{AtomicBool, AtomicU64, Mutex, RwLock};
use crate::tag_epochs::TagEpochs;

const SHARDS: usize = 64;
/// Sweep a shard's expired tombstones once it holds this many (at least).
const SWEEP_AT: usize = 1024;

/// One shard of tombstones. Expired ones are swept when the map has doubled since the
/// last sweep, so sweeping stays amortised O(1) per invalidation.
struct Tombstones<K> {
    map: HashMap<K, Tombstone>,
    sweep_at: usize,
}

/// The backplane message behind an invalidation another instance sent: its origin and
/// sequence number (see [`MessageBody::Reload`](crate::backplane::MessageBody::Reload)).
pub(crate) type Cause = (OriginId, u64);

/// Who invalidated a key here, as its tombstone records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    /// This instance (a write of its own). It is applied at once, before its message
    /// takes its place in the backplane's order, so a remote message applied after it
    /// may come before it in that order: until this instance hears back a message of
    /// its own sent after it ([`Guards::own_settled`]), no remote message applied is a
    /// key's last word.
    Own,
    /// A remote message, believed, in the backplane's order.
    Message(Cause),
    /// A message not believed, or replayed out of order by a repair.
    Unknown,
}

/// A key's last invalidation here.
#[derive(Clone, Copy)]
struct Tombstone {
    /// The local invalidation clock it advanced to.
    at: u64,
    /// When it may be forgotten.
    expires: Timestamp,
    /// The remote message it applied, when that is the key's last word here (see [`By`]).
    cause: Option<Cause>,
    /// Whether L1 held the key when this invalidation (or one before it that no fill
    /// followed) dropped it: only then is a pushed reload worth installing.
    held: bool,
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
    /// Bounded: past its cap the oldest epochs are pruned behind a tag floor (see
    /// [`TagEpochs`]), so distinct tags cannot grow the process without limit.
    tag_epochs: RwLock<TagEpochs>,
    /// Tombstones; the shard lock also serialises "check guards then insert into L1"
    /// against "tombstone then evict", which is what makes the L1 guard airtight.
    shards: Box<[Mutex<Tombstones<K>>]>,
    /// A lower bound of the local clock value of this instance's latest own
    /// invalidation, set before it runs (see [`Guards::own_invalidation`]).
    own_last_at: AtomicU64,
    /// The largest [`Guards::mark`] of a message of this instance's own heard back.
    own_settled: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    tombstone_ttl: Duration,
}

impl<K: Hash + Eq + Clone> Guards<K> {
    /// Guards whose tombstones live `tombstone_ttl` and which hold at most
    /// `max_tag_epochs` tag epochs.
    pub(crate) fn new(tombstone_ttl: Duration, max_tag_epochs: usize) -> Self {
        Guards {
            seq: AtomicU64::new(1),
            namespace_epoch: AtomicU64::new(0),
            has_tag_epochs: AtomicBool::new(false),
            tag_epochs: RwLock::new(TagEpochs::new(max_tag_epochs)),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Tombstones { map: HashMap::new(), sweep_at: SWEEP_AT }))
                .collect(),
            own_last_at: AtomicU64::new(0),
            own_settled: AtomicU64::new(0),
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

    /// Tombstones `key` and runs `evict` (which says whether L1 held the key) under the
    /// same lock as fills. `by` says who invalidated it.
    pub(crate) fn invalidate_key(&self, key: &K, now: Timestamp, by: By, evict: impl FnOnce() -> bool) {
        if by == By::Own {
            self.own_invalidation();
        }
        let mut shard = self.shard(key).lock();
        let at = self.advance();
        if shard.map.len() >= shard.sweep_at {
            shard.map.retain(|_, t| t.expires > now);
            shard.sweep_at = (shard.map.len() * 2).max(SWEEP_AT);
        }
        let held = evict();
        let before = shard.map.get(key).filter(|t| t.expires > now);
        // A key dropped twice before anything refilled it was held for the first drop.
        let held = held || before.is_some_and(|t| t.held);
        let settled = self.own_last_at.load(Ordering::SeqCst) <= self.own_settled.load(Ordering::SeqCst);
        let cause = match by {
            By::Message(c) if settled => Some(c),
            _ => None,
        };
        let tombstone = Tombstone { at, expires: now.saturating_add(self.tombstone_ttl), cause, held };
        shard.map.insert(key.clone(), tombstone);
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
        self.fill_if_clean_after(key, start, now, tags, store).is_some()
    }

    /// [`Guards::fill_if_clean`], which also tells, when it stored, the remote message
    /// behind the key's last invalidation before `start` (`Some(None)`: none, or this
    /// instance's own write). Read under the same lock: no later invalidation can slip
    /// between the check and the answer.
    pub(crate) fn fill_if_clean_after(
        &self,
        key: &K,
        start: LoadStart,
        now: Timestamp,
        tags: &[String],
        store: impl FnOnce() -> bool,
    ) -> Option<Option<Cause>> {
        if now.since(start.at) >= self.tombstone_ttl {
            // The tombstones that could prove this fill stale may be gone already.
            return None;
        }
        let shard = self.shard(key).lock();
        let last = shard.map.get(key).filter(|t| t.expires > now);
        if last.is_some_and(|t| t.at > start.seq) || !self.valid(start.seq, tags) {
            return None;
        }
        let cause = last.and_then(|t| t.cause);
        let stored = store();
        drop(shard);
        stored.then_some(cause)
    }

    /// Runs `store` if `key`'s last invalidation here was the remote message `cause`, L1 held the key then, and no invalidation of `key`, the
    /// namespace or one of `tags` came since (see
    /// [`MessageBody::Reload`](crate::backplane::MessageBody::Reload)); returns what
    /// `store` returned. Under the lock fills take, so `store` may look at L1.
    pub(crate) fn install_reload(
        &self,
        key: &K,
        cause: Cause,
        now: Timestamp,
        tags: &[String],
        store: impl FnOnce() -> bool,
    ) -> bool {
        let shard = self.shard(key).lock();
        let Some(t) = shard.map.get(key).copied() else { return false };
        if t.cause != Some(cause) || !t.held || t.expires <= now || !self.valid(t.at, tags) {
            return false;
        }
        let stored = store();
        drop(shard);
        stored
    }

    /// True when `key` was invalidated here at or after `since` (as far as the
    /// tombstones still tell: they live the guard's tombstone lifetime).
    pub(crate) fn tombstoned_since(&self, key: &K, since: Timestamp) -> bool {
        let shard = self.shard(key).lock();
        shard.map.get(key).is_some_and(|t| t.expires.saturating_sub(self.tombstone_ttl) >= since)
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
        self.tag_epochs.read().valid(fill_seq, tags)
    }

    /// An invalidation of this instance's own (a key, a tag or the namespace) is about
    /// to run: until it is settled, no remote message applied is recorded as a key's
    /// last word (see [`By::Own`]). Set before the invalidation advances the clock, so
    /// that no remote message applied after it misses it; the message sent for it
    /// carries a mark at least this large.
    pub(crate) fn own_invalidation(&self) {
        self.own_last_at.fetch_max(self.seq.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    }

    /// This instance heard back a message of its own sent when its local clock read
    /// `mark` (see [`Guards::mark`]): every invalidation of its own up to then has its
    /// place in the backplane's order, before every remote message applied from now on.
    pub(crate) fn own_settled(&self, mark: u64) {
        self.own_settled.fetch_max(mark, Ordering::SeqCst);
    }

    /// The local clock, read when a message of this instance's own is sent: it covers
    /// every invalidation this instance applied before.
    pub(crate) fn mark(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Invalidates every entry carrying `tag` (lazily, on read).
    pub(crate) fn invalidate_tag(&self, tag: &str) {
        let mut epochs = self.tag_epochs.write();
        let at = self.advance();
        epochs.record(tag, at);
        self.has_tag_epochs.store(true, Ordering::Release);
    }

    /// Invalidates every entry and every load in flight (lazily, on read).
    pub(crate) fn invalidate_all(&self) {
        let at = self.advance();
        self.namespace_epoch.store(at, Ordering::SeqCst);
        // Tag epochs older than the namespace epoch can no longer matter.
        self.tag_epochs.write().forget_up_to(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::tag_epochs::{DEFAULT_MAX_TAG_EPOCHS, MIN_MAX_TAG_EPOCHS};

    const TTL: Duration = Duration::from_secs(10);

    fn fill(g: &Guards<u64>, key: u64, start: LoadStart, now: Timestamp, tags: &[String]) -> bool {
        g.fill_if_clean(&key, start, now, tags, || true)
    }

    #[test]
    fn a_fill_that_began_before_its_key_was_invalidated_is_refused() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let before = g.start(clock.now());
        g.invalidate_key(&1, clock.now(), By::Own, || false);
        let after = g.start(clock.now());
        assert!(!fill(&g, 1, before, clock.now(), &[]));
        assert!(fill(&g, 2, before, clock.now(), &[]), "other keys are not affected");
        assert!(fill(&g, 1, after, clock.now(), &[]));
    }

    #[test]
    fn the_tombstone_outlives_the_slowest_allowed_fill() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let before = g.start(clock.now());
        g.invalidate_key(&1, clock.now(), By::Own, || false);
        clock.advance(TTL - Duration::from_millis(1));
        assert!(!fill(&g, 1, before, clock.now(), &[]), "the tombstone still holds");
        clock.advance(Duration::from_millis(1));
        // The tombstone has expired, and so has the fill's right to be stored at all.
        assert!(!fill(&g, 1, before, clock.now(), &[]));
        let fresh = g.start(clock.now());
        assert!(fill(&g, 1, fresh, clock.now(), &[]));
    }

    #[test]
    fn tag_and_namespace_epochs_refuse_older_fills_lazily() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let tags = vec!["plan:gold".to_owned()];
        let before = g.start(clock.now());
        g.invalidate_tag("plan:gold");
        assert!(!fill(&g, 1, before, clock.now(), &tags));
        assert!(fill(&g, 1, before, clock.now(), &[]), "untagged fills are not affected");
        assert!(!g.valid(before.seq, &tags));
        let mid = g.start(clock.now());
        assert!(g.valid(mid.seq, &tags));
        g.invalidate_all();
        assert!(!g.valid(mid.seq, &[]));
        assert!(!fill(&g, 1, mid, clock.now(), &[]));
        assert_eq!(g.namespace_epoch(), g.start(clock.now()).seq);
        assert!(fill(&g, 1, g.start(clock.now()), clock.now(), &tags));
    }

    #[test]
    fn a_reload_is_installed_only_over_the_invalidation_it_follows() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let now = clock.now();
        let install =
            |key: u64, cause: Cause, tags: &[String]| g.install_reload(&key, cause, now, tags, || true);
        g.invalidate_key(&1, now, By::Message((7, 3)), || true);
        assert!(!install(1, (7, 2), &[]), "another message");
        assert!(!install(1, (8, 3), &[]), "another origin");
        assert!(install(1, (7, 3), &[]));
        g.invalidate_key(&2, now, By::Message((7, 4)), || false);
        assert!(!install(2, (7, 4), &[]), "not held when dropped");
        g.invalidate_key(&2, now, By::Message((7, 5)), || true);
        g.invalidate_key(&2, now, By::Message((7, 6)), || false);
        assert!(install(2, (7, 6), &[]), "held for the drop before, nothing refilled since");
        g.invalidate_key(&3, now, By::Message((7, 7)), || true);
        g.invalidate_key(&3, now, By::Own, || false);
        assert!(!install(3, (7, 7), &[]), "a write of this instance's since");
        g.invalidate_key(&3, now, By::Message((7, 11)), || false);
        assert!(!install(3, (7, 11), &[]), "a message applied after an own write may precede it");
        g.invalidate_key(&8, now, By::Message((7, 15)), || true);
        assert!(!install(8, (7, 15), &[]), "so may one of another key");
        g.own_settled(g.mark());
        g.invalidate_key(&3, now, By::Message((7, 14)), || false);
        assert!(install(3, (7, 14), &[]), "one applied after the own write's message came back");
        g.invalidate_key(&7, now, By::Message((7, 12)), || true);
        g.invalidate_key(&7, now, By::Unknown, || false);
        assert!(!install(7, (7, 12), &[]), "a replayed message since");
        g.invalidate_key(&4, now, By::Message((7, 8)), || true);
        g.invalidate_tag("t");
        assert!(install(4, (7, 8), &[]));
        assert!(!install(4, (7, 8), &["t".to_owned()]), "its tag invalidated since");
        g.invalidate_all();
        assert!(!install(4, (7, 8), &[]), "the namespace invalidated since");
        assert!(!install(5, (7, 9), &[]), "never invalidated here");
        g.own_invalidation();
        g.invalidate_tag("u");
        g.invalidate_key(&6, now, By::Message((7, 10)), || true);
        assert!(!install(6, (7, 10), &[]), "applied while an own tag invalidation was not settled");
        g.own_settled(g.mark());
        g.invalidate_key(&6, now, By::Message((7, 13)), || true);
        assert!(install(6, (7, 13), &[]), "settled");
        g.invalidate_key(&6, now, By::Message((7, 13)), || true);
        clock.advance(TTL);
        assert!(!g.install_reload(&6, (7, 13), clock.now(), &[], || true), "the tombstone expired");
    }

    #[test]
    fn a_clean_fill_tells_the_remote_invalidation_it_followed() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let now = clock.now();
        g.invalidate_key(&1, now, By::Message((7, 3)), || true);
        g.invalidate_key(&2, now, By::Own, || true);
        let start = g.start(now);
        assert_eq!(g.fill_if_clean_after(&1, start, now, &[], || true), Some(Some((7, 3))));
        assert_eq!(g.fill_if_clean_after(&2, start, now, &[], || true), Some(None), "its own write");
        assert_eq!(g.fill_if_clean_after(&3, start, now, &[], || true), Some(None), "never invalidated");
        assert_eq!(g.fill_if_clean_after(&1, start, now, &[], || false), None, "declined");
        g.invalidate_key(&1, now, By::Message((7, 4)), || true);
        assert_eq!(g.fill_if_clean_after(&1, start, now, &[], || true), None, "invalidated since the start");
    }

    #[test]
    fn store_may_decline_under_the_lock() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        let start = g.start(clock.now());
        assert!(!g.fill_if_clean(&1, start, clock.now(), &[], || false));
    }

    #[test]
    fn expired_tombstones_are_swept() {
        let (g, clock) = (Guards::<u64>::new(TTL, DEFAULT_MAX_TAG_EPOCHS), ManualClock::new());
        for k in 0..(SWEEP_AT as u64 * SHARDS as u64 * 2) {
            g.invalidate_key(&k, clock.now(), By::Own, || false);
        }
        clock.advance(TTL * 2);
        for k in 0..(SWEEP_AT as u64 * SHARDS as u64 * 2) {
            g.invalidate_key(&(k + 1_000_000_000), clock.now(), By::Own, || false);
        }
        let held: usize = g.shards.iter().map(|s| s.lock().map.len()).sum();
        assert!(held < SWEEP_AT * SHARDS * 3, "{held} tombstones held");
    }

    #[test]
    fn tag_epochs_stay_bounded_and_pruning_revalidates_nothing() {
        let (g, clock) = (Guards::<u64>::new(TTL, MIN_MAX_TAG_EPOCHS), ManualClock::new());
        let victim = vec!["victim".to_owned()];
        // An entry filled before the tag's invalidation, and a load in flight across it.
        let stored = g.start(clock.now());
        let in_flight = g.start(clock.now());
        g.invalidate_tag("victim");
        assert!(!g.valid(stored.seq, &victim));
        for i in 0..10_000 {
            g.invalidate_tag(&format!("user:{i}"));
        }
        assert!(g.tag_epochs.read().len() <= MIN_MAX_TAG_EPOCHS, "{} epochs held", g.tag_epochs.read().len());
        assert!(g.tag_epochs.read().floor() > stored.seq, "the victim's epoch was pruned");
        assert!(!g.valid(stored.seq, &victim), "the stored entry stays invalid");
        assert!(!fill(&g, 1, in_flight, clock.now(), &victim), "the fill in flight stays refused");
        assert!(g.valid(stored.seq, &[]), "untagged entries are not affected");
        let fresh = g.start(clock.now());
        assert!(fill(&g, 1, fresh, clock.now(), &victim), "a load after every invalidation fills");
    }
}
