//! The `Cache` handle: the read path (L1 → L2 → loader with single-flight, fill guards,
//! fail-safe, early refresh) and the write paths (insert, touch, invalidate).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::backplane::{Backplane, Message, MessageBody, OriginId};
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::builder::{CacheBuilder, Config, Consistency, Invalidation};
use crate::clock::{ClockKind, ClockSource, Timestamp, duration_nanos};
use crate::error::{BuildError, Error, ErrorKind, Result};
use crate::guard::Guards;
use crate::key::CacheKey;
use crate::l1::{Entry, EntryWeighter, L1, Meta, Slot, Tags, XFetchLead};
use crate::stats::{CacheStats, Stats};
use crate::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};

/// XFetch fires with probability `exp(-(expiry - now) / (Δβ))`; below `e^-28` (≈7e-13)
/// we do not even draw the random number, which keeps ordinary hits free of it.
const XFETCH_HORIZON: f64 = 28.0;
/// Buffered L2 deletes beyond this are replaced by one namespace bump.
const MAX_PENDING_KEYS: usize = 10_000;

/// The result every waiter of a load receives.
type Shared<V> = Option<Result<Option<V>>>;

/// A typed, namespaced cache handle. Cheap to clone: clones share everything.
///
/// See the crate documentation for the consistency promise of each level.
pub struct Cache<K, V> {
    pub(crate) inner: Arc<Inner<K, V>>,
    /// Dropped with the last handle: stops the background tasks.
    _lifetime: Arc<Lifetime>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache { inner: self.inner.clone(), _lifetime: self._lifetime.clone() }
    }
}

pub(crate) struct Lifetime {
    shutdown: watch::Sender<bool>,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        // The receivers may all be gone already; nothing to do then.
        let _ = self.shutdown.send(true);
    }
}

/// Backplane health as the read path sees it.
#[derive(Default)]
pub(crate) struct Health {
    /// 0 while healthy; otherwise when the backplane was last known healthy.
    pub(crate) unhealthy_since: AtomicU64,
    /// True once the first subscription is live; before that L1 is not filled, since
    /// invalidations could not reach it.
    pub(crate) subscribed: AtomicBool,
    /// When this instance last received its own heartbeat back through the backplane:
    /// the end-to-end proof that the backplane delivers.
    pub(crate) last_own_heartbeat: AtomicU64,
}

/// Invalidations that could not reach L2 or the backplane, retried in the background.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) l2_keys: HashSet<String>,
    pub(crate) l2_tags: HashSet<String>,
    pub(crate) l2_all: bool,
    pub(crate) messages: Vec<MessageBody>,
    /// Write locks whose release failed: (scope, lock id). They would expire anyway;
    /// releasing them lets their keys be cached again sooner.
    pub(crate) unlocks: Vec<(crate::write_lock::Scope, u64)>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.l2_keys.is_empty()
            && self.l2_tags.is_empty()
            && !self.l2_all
            && self.messages.is_empty()
            && self.unlocks.is_empty()
    }
}

/// Another member of the fleet, as this instance hears it (Strong level).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member {
    pub(crate) last_heard: Timestamp,
    /// The highest of our sequence numbers it acknowledged.
    pub(crate) acked: u64,
}

struct Flight<V> {
    id: u64,
    rx: watch::Receiver<Shared<V>>,
}

const FLIGHT_SHARDS: usize = 32;

type FlightShard<K, V> = Mutex<HashMap<K, Flight<V>>>;
/// Handed to the caller that starts a load: its id and the sender for the result.
type Lead<V> = Option<(u64, watch::Sender<Shared<V>>)>;

pub(crate) struct Flights<K, V> {
    shards: Box<[FlightShard<K, V>]>,
    hasher: std::collections::hash_map::RandomState,
    next_id: AtomicU64,
}

impl<K: Hash + Eq + Clone, V> Flights<K, V> {
    fn new() -> Self {
        Flights {
            shards: (0..FLIGHT_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn shard(&self, key: &K) -> &FlightShard<K, V> {
        &self.shards[(self.hasher.hash_one(key) as usize) % FLIGHT_SHARDS]
    }

    /// Joins the load of `key` in flight, or registers a new one and returns its sender.
    fn join_or_lead(&self, key: &K) -> (watch::Receiver<Shared<V>>, Lead<V>) {
        let mut shard = self.shard(key).lock();
        if let Some(f) = shard.get(key) {
            return (f.rx.clone(), None);
        }
        let (tx, rx) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        shard.insert(key.clone(), Flight { id, rx: rx.clone() });
        (rx, Some((id, tx)))
    }

    fn is_running(&self, key: &K) -> bool {
        self.shard(key).lock().contains_key(key)
    }

    /// Forgets the flight of `key` if it is still `id`.
    fn finish(&self, key: &K, id: u64) {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(|f| f.id == id) {
            shard.remove(key);
        }
    }

    /// Makes later readers start a new load instead of joining one that began before an
    /// invalidation (which would hand them the pre-invalidation value).
    pub(crate) fn detach(&self, key: &K) {
        self.shard(key).lock().remove(key);
    }

    pub(crate) fn detach_all(&self) {
        for s in self.shards.iter() {
            s.lock().clear();
        }
    }
}

/// Everything a cache's handles and background tasks share.
pub(crate) struct Inner<K, V> {
    pub(crate) cfg: Config<K, V>,
    pub(crate) clock: ClockSource,
    pub(crate) l1: L1<K, V>,
    pub(crate) guards: Guards<K>,
    pub(crate) flights: Flights<K, V>,
    pub(crate) tier: Option<Arc<dyn Tier>>,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) backplane: Option<Arc<dyn Backplane>>,
    pub(crate) origin: OriginId,
    /// The last sequence number used; held across a publish so that messages leave in
    /// sequence order (receivers would otherwise see false gaps).
    pub(crate) publisher: tokio::sync::Mutex<u64>,
    pub(crate) health: Health,
    pub(crate) stats: Stats,
    pub(crate) pending: Mutex<Pending>,
    /// Strong level: set when L2 may hold a value that should have been deleted.
    pub(crate) untrusted: AtomicBool,
    /// What the L1 fast path requires of a slot's fill sequence, so that a hit reads one
    /// word for three conditions: the namespace epoch as a [`Slot::floor`], or
    /// `u64::MAX` (no slot) at the Strong level (its lease is checked on every read) and
    /// while the backplane is unhealthy (`max_stale` is). Kept by
    /// [`Inner::publish_fast_floor`].
    fast_floor: AtomicU64,
    /// Serialises [`Inner::publish_fast_floor`], so that the last to run stores the floor
    /// of the last state.
    floor_lock: Mutex<()>,
    /// Strong level: the other members and what they acknowledged.
    pub(crate) members: Mutex<HashMap<OriginId, Member>>,
    /// Woken when an acknowledgement arrives.
    pub(crate) acks: tokio::sync::Notify,
    pub(crate) strong: bool,
    /// XFetch's window per µs of load time: β · `XFETCH_HORIZON` · 1000 ns.
    xfetch_lead: XFetchLead,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Where a read found its value. `Fresh` carries only the value, so the hit path moves
/// as little as possible.
enum Probe<V> {
    /// The value, and whether XFetch asks for a background refresh.
    Fresh(Option<V>, bool),
    Stale(Entry<V>),
    Absent,
}

/// What [`Inner::look`] took out of L1 under the shard lock.
enum Look<V> {
    /// A fresh hit's value, decided by the slot alone.
    Fast(Option<V>),
    /// A copy of the slot, for the slow path.
    Slow(Slot<V>),
}

impl<K, V> Cache<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    /// Starts building a cache for `namespace` (a short name such as `"billsetting"`,
    /// used in L2 key names, backplane messages and metrics labels).
    pub fn builder(namespace: impl Into<String>) -> CacheBuilder<K, V> {
        CacheBuilder::new(namespace)
    }

    pub(crate) fn start(
        cfg: Config<K, V>,
        clock: ClockSource,
        tier: Option<Arc<dyn Tier>>,
        backplane: Option<Arc<dyn Backplane>>,
    ) -> std::result::Result<Self, BuildError> {
        let l1 =
            L1::with_weighter(cfg.estimated_entries, cfg.max_capacity, EntryWeighter(cfg.weigher.clone()));
        let breaker_clock: Arc<dyn crate::clock::Clock> = match clock.kind() {
            ClockKind::System(c) => Arc::new(c.clone()),
            ClockKind::Custom(c) => c.clone(),
        };
        let breaker = CircuitBreaker::with_clock(
            format!("l2:{}:{}", tier.as_ref().map_or("none", |t| t.name()), cfg.namespace),
            cfg.breaker.clone(),
            breaker_clock,
        );
        let rng = match cfg.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        let origin = rand::rng().random::<u64>() | 1;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let has_backplane = backplane.is_some();
        let cfg_strong = cfg.consistency == Consistency::Strong;
        let cfg_beta = cfg.early_refresh_beta;
        let inner = Arc::new(Inner {
            guards: Guards::new(cfg.tombstone_ttl),
            cfg,
            clock,
            l1,
            flights: Flights::new(),
            tier,
            breaker,
            backplane,
            origin,
            publisher: tokio::sync::Mutex::new(0),
            health: Health::default(),
            stats: Stats::default(),
            pending: Mutex::new(Pending::default()),
            untrusted: AtomicBool::new(false),
            // What publish_fast_floor would store: epoch 0, healthy.
            fast_floor: AtomicU64::new(if cfg_strong { u64::MAX } else { Slot::<V>::floor(0) }),
            floor_lock: Mutex::new(()),
            members: Mutex::new(HashMap::new()),
            acks: tokio::sync::Notify::new(),
            strong: cfg_strong,
            xfetch_lead: XFetchLead::new((cfg_beta * XFETCH_HORIZON * 1000.0).min(1e12) as u64),
            rng: Mutex::new(rng),
            shutdown: shutdown_rx,
        });
        if !has_backplane {
            inner.health.subscribed.store(true, Ordering::SeqCst);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::listener::spawn_background(&inner);
        }
        Ok(Cache { inner, _lifetime: Arc::new(Lifetime { shutdown: shutdown_tx }) })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.cfg.namespace
    }

    /// The consistency level in force.
    pub fn consistency(&self) -> Consistency {
        self.inner.cfg.consistency
    }

    /// This instance's origin id on the backplane.
    pub fn origin(&self) -> OriginId {
        self.inner.origin
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats.snapshot(self.inner.l1.len() as u64)
    }

    /// Whether the backplane is healthy (always true without one).
    pub fn is_backplane_healthy(&self) -> bool {
        self.inner.health.subscribed.load(Ordering::SeqCst)
            && self.inner.health.unhealthy_since.load(Ordering::SeqCst) == 0
    }

    /// The state of the L2 circuit breaker.
    pub fn l2_breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// True while the cache is bypassed because L2 may hold a value that should have been
    /// deleted (Strong level); reads go to the loader until the namespace bump succeeds.
    pub fn is_bypassed(&self) -> bool {
        self.inner.untrusted.load(Ordering::SeqCst)
    }

    /// Invalidations waiting to be retried against L2 or the backplane.
    pub fn pending_invalidations(&self) -> usize {
        let p = self.inner.pending.lock();
        p.l2_keys.len() + p.l2_tags.len() + usize::from(p.l2_all) + p.messages.len()
    }

    /// Resolves once the backplane subscription is live (at once without a backplane),
    /// and at the Strong level once this instance holds its membership lease: a readiness
    /// probe should wait for it, because until then L1 is neither filled nor served.
    pub async fn ready(&self) {
        let mut rx = self.inner.shutdown.clone();
        let inner = &self.inner;
        while !inner.health.subscribed.load(Ordering::SeqCst)
            || (inner.strong && !inner.own_lease_held(inner.now()))
        {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = rx.changed() => return,
            }
        }
    }

    /// Reads `key` from L1 only, synchronously: `None` when absent, expired or
    /// invalidated. The cheapest read; use it where an await is unwelcome.
    #[inline]
    pub fn get_local(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        // `probe` spelled out, so that a fast hit returns without building a `Probe`.
        match inner.l1.read(key, |slot| inner.look(slot, now))? {
            Look::Fast(value) => {
                inner.stats.l1_hits.incr();
                value
            }
            Look::Slow(slot) => inner.get_local_slow(&slot, now),
        }
    }

    /// Reads `key` from L1, then L2. Never calls a loader; `Ok(None)` when neither tier
    /// has it (or it is a cached "not found").
    pub async fn get(&self, key: &K) -> Result<Option<V>> {
        let inner = &self.inner;
        let now = inner.clock.now();
        if inner.untrusted.load(Ordering::Relaxed) {
            inner.stats.bypassed_reads.incr();
            return Ok(None);
        }
        if let Probe::Fresh(value, _) = inner.probe(key, now) {
            inner.stats.l1_hits.incr();
            return Ok(value);
        }
        let start = inner.guards.start();
        let started_at = now;
        let key_str = key.to_key_string();
        if let Some(Lookup::Hit(env)) = inner.l2_lookup(&key_str, None).await
            && let Some(entry) = inner.entry_from_envelope(&key_str, env, start).await
        {
            inner.stats.l2_hits.incr();
            let value = entry.value.clone();
            inner.fill_l1(key, entry, start, started_at);
            return Ok(value);
        }
        inner.stats.misses.incr();
        Ok(None)
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
    /// A caller that arrives after the invalidation starts a new load.
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
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        let inner = &self.inner;
        let now = inner.clock.now();
        if inner.untrusted.load(Ordering::Relaxed) {
            inner.stats.bypassed_reads.incr();
            return inner.load_direct(loader).await;
        }
        let stale = match inner.probe(key, now) {
            Probe::Fresh(value, refresh) => {
                inner.stats.l1_hits.incr();
                if refresh {
                    Inner::spawn_refresh(inner, key, loader);
                }
                return Ok(value);
            }
            Probe::Stale(e) => Some(e),
            Probe::Absent => None,
        };
        let (mut rx, lead) = inner.flights.join_or_lead(key);
        if let Some((id, tx)) = lead {
            let task_inner = inner.clone();
            let key = key.clone();
            tokio::spawn(async move { task_inner.run_flight(key, id, loader, stale, tx, false).await });
        }
        match rx.wait_for(Option::is_some).await {
            Ok(shared) => match &*shared {
                Some(r) => r.clone(),
                None => Err(Error::new(ErrorKind::Shutdown, "load finished without a result")),
            },
            Err(_) => Err(Error::new(ErrorKind::Loader, "load was abandoned (the loader panicked?)")),
        }
    }

    /// Stores `value` for `key` after the caller changed it in the database: every
    /// instance drops its copy, and no load that began earlier can overwrite it.
    /// Oversized values are refused (`InvalidInput`) and nothing changes.
    pub async fn insert(&self, key: K, value: V) -> Result<()> {
        let inner = &self.inner;
        let key_str = key.to_key_string();
        let tags = inner.tags_of(&key, &value);
        let version = inner.cfg.version.as_ref().and_then(|f| f(&value));
        let encoded = match &inner.tier {
            Some(_) => Some(inner.encode_checked(&value)?),
            None => None,
        };
        inner.clean_l2_if_untrusted().await;
        let now = inner.clock.now();
        inner.guards.invalidate_key(&key, now, || {
            inner.l1.remove(&key);
            inner.flights.detach(&key);
        });
        let start = inner.guards.start();
        let entry = inner.make_entry(Some(value), now, 0, start, tags.clone(), false);
        inner.fill_l1(&key, entry, start, now);
        let mut first_err = None;
        if let (Some(tier), Some(bytes)) = (&inner.tier, encoded) {
            let env = inner.make_envelope(Some(bytes), version, now, 0, tags);
            let ttl = inner.l2_store_ttl(&env, now);
            let res = inner.l2_call("set", tier.set(&inner.cfg.namespace, &key_str, env, ttl)).await;
            if let Err(e) = res {
                inner.l2_invalidation_failed(Some(vec![key_str.clone()]), None, &e);
                first_err = Some(e);
            }
        }
        if let Err(e) = inner.publish(MessageBody::Keys(vec![key_str.clone()])).await {
            first_err.get_or_insert(e);
        }
        inner.run_hooks(&Invalidation::Keys(vec![key_str]));
        first_err.map_or(Ok(()), Err)
    }

    /// Extends the life of `key`'s entry by the TTL from now (sliding expiration, for
    /// sessions and drafts), in L1 and L2. Returns false when there was no live entry.
    pub async fn touch(&self, key: &K) -> Result<bool> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut found = false;
        if let Some(mut e) = inner
            .l1
            .peek(key)
            .filter(|s| {
                let meta = s.meta(inner.xfetch_lead);
                now < meta.fresh_until && inner.guards.valid(meta.fill_seq, s.tag_slice())
            })
            .map(|s| s.to_entry(inner.xfetch_lead))
        {
            let ttl = inner.cfg.l1_ttl;
            e.meta.set_fresh_until(now.saturating_add(ttl));
            e.meta.set_usable_until(
                e.meta.fresh_until.saturating_add(inner.cfg.fail_safe_max.unwrap_or_default()),
            );
            let start = e.meta.fill_seq;
            let tags = e.tags.clone();
            let slot = Slot::new(e, inner.xfetch_lead);
            found = inner.guards.fill_if_clean(
                key,
                start,
                now,
                now,
                tags.as_deref().map_or(&[], Vec::as_slice),
                || inner.l1.insert(key.clone(), slot),
            );
        }
        if let Some(tier) = &inner.tier {
            let ttl = inner.cfg.l2_ttl;
            let soft = now.saturating_add(ttl);
            let hard_ttl = ttl + inner.cfg.fail_safe_max.unwrap_or_default();
            let key_str = key.to_key_string();
            match inner.l2_call("touch", tier.touch(&inner.cfg.namespace, &key_str, soft, hard_ttl)).await {
                Ok(t) => found |= t,
                Err(e) if !found => return Err(e),
                Err(_) => {}
            }
        }
        Ok(found)
    }

    /// Invalidates `key` everywhere. Call it after the database commit.
    ///
    /// Returns after the local copy is gone, the L2 entry is deleted and the message is
    /// on the backplane. If L2 or the backplane failed, the error says so, and the cache
    /// has already made itself safe: at the Invalidated level the delete or message is
    /// buffered and retried (while receivers detect the gap and flush); at the Strong
    /// level the cache is bypassed until a namespace bump has cleaned L2.
    pub async fn invalidate(&self, key: &K) -> Result<()> {
        self.invalidate_many(std::slice::from_ref(key)).await
    }

    /// Invalidates several keys with one L2 round trip and one message.
    pub async fn invalidate_many(&self, keys: &[K]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        inner.clean_l2_if_untrusted().await;
        let now = inner.clock.now();
        for key in keys {
            inner.evict_key(key, now);
        }
        let key_strs: Vec<String> = keys.iter().map(CacheKey::to_key_string).collect();
        let mut first_err = None;
        if let Some(tier) = &inner.tier {
            let res = inner.l2_call("delete", tier.delete(&inner.cfg.namespace, &key_strs)).await;
            match res {
                // A read here that reached L2 just before the delete may have put the old
                // value back in our L1 (we skip our own message): evict once more.
                Ok(()) => {
                    let now = inner.clock.now();
                    for key in keys {
                        inner.evict_key(key, now);
                    }
                }
                Err(e) => {
                    inner.l2_invalidation_failed(Some(key_strs.clone()), None, &e);
                    first_err = Some(e);
                }
            }
        }
        if let Err(e) = inner.publish(MessageBody::Keys(key_strs.clone())).await {
            first_err.get_or_insert(e);
        }
        inner.run_hooks(&Invalidation::Keys(key_strs));
        first_err.map_or(Ok(()), Err)
    }

    /// Invalidates every entry carrying `tag`, in O(1): tag epochs are compared lazily on
    /// read, in L1 and L2.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        let inner = &self.inner;
        inner.clean_l2_if_untrusted().await;
        inner.guards.invalidate_tag(tag);
        // Loads in flight may carry the tag; their fills are refused by the epoch check,
        // but new readers must not join them.
        inner.flights.detach_all();
        let mut first_err = None;
        if let Some(tier) = &inner.tier {
            let res = inner.l2_call("invalidate_tag", tier.invalidate_tag(&inner.cfg.namespace, tag)).await;
            match res {
                // As for keys: whatever a read brought back from L2 meanwhile goes too.
                Ok(()) => inner.guards.invalidate_tag(tag),
                Err(e) => {
                    inner.l2_invalidation_failed(None, Some(tag.to_owned()), &e);
                    first_err = Some(e);
                }
            }
        }
        if let Err(e) = inner.publish(MessageBody::Tag(tag.to_owned())).await {
            first_err.get_or_insert(e);
        }
        inner.run_hooks(&Invalidation::Tag(tag.to_owned()));
        first_err.map_or(Ok(()), Err)
    }

    /// Invalidates the whole namespace, in O(1) (a namespace epoch).
    pub async fn invalidate_all(&self) -> Result<()> {
        let inner = &self.inner;
        inner.clean_l2_if_untrusted().await;
        inner.flush_l1();
        let mut first_err = None;
        if let Some(tier) = &inner.tier {
            let res =
                inner.l2_call("invalidate_namespace", tier.invalidate_namespace(&inner.cfg.namespace)).await;
            match res {
                Ok(()) => inner.flush_l1(),
                Err(e) => {
                    inner.l2_invalidation_failed(None, None, &e);
                    first_err = Some(e);
                }
            }
        }
        if let Err(e) = inner.publish(MessageBody::All).await {
            first_err.get_or_insert(e);
        }
        inner.run_hooks(&Invalidation::All);
        first_err.map_or(Ok(()), Err)
    }

    /// Drops this instance's L1 copy of `key` without telling anyone (as a capacity
    /// eviction would). Loads in flight are unaffected; use [`Cache::invalidate`] after a
    /// write.
    pub fn evict_local(&self, key: &K) {
        self.inner.l1.remove(key);
    }

    /// Retries buffered invalidations now; returns how many remain.
    pub async fn flush_pending(&self) -> usize {
        self.inner.retry_pending().await;
        self.pending_invalidations()
    }

    /// Stops the background tasks after one last attempt to deliver buffered
    /// invalidations. Other clones of this handle keep working without them.
    pub async fn shutdown(&self) {
        self.inner.retry_pending().await;
        let _ = self._lifetime.shutdown.send(true);
    }
}

impl<K, V> Inner<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The L1 lookup of every read. Kept small: it is the hit path.
    #[inline]
    fn probe(&self, key: &K, now: Timestamp) -> Probe<V> {
        match self.l1.read(key, |slot| self.look(slot, now)) {
            None => Probe::Absent,
            Some(Look::Fast(value)) => Probe::Fresh(value, false),
            Some(Look::Slow(slot)) => self.probe_slow(&slot, now),
        }
    }

    /// Runs under L1's shard lock: copies out the value when the slot decides the
    /// common case alone (inline: untagged, not a stale copy; fresh and outside the
    /// XFetch window; not invalidated by a namespace epoch; no degraded mode in force,
    /// which the floor rules out by being unreachable), else the whole slot for the
    /// slow path to decide outside the lock.
    ///
    /// The floor is read under the lock: a reader that finds an entry filled after a
    /// namespace invalidation's `l1.clear()` thus sees that invalidation's floor.
    #[inline(always)]
    fn look(&self, slot: &Slot<V>, now: Timestamp) -> Look<V> {
        if slot.is_fast_hit(now, self.fast_floor.load(Ordering::SeqCst)) {
            Look::Fast(slot.fast_value())
        } else {
            Look::Slow(slot.clone())
        }
    }

    /// Recomputes the fast path's floor; called after every change of the namespace
    /// epoch or of the backplane's health. A reader that finds an entry filled after a
    /// namespace invalidation's `l1.clear()` reads the floor after it, so it sees that
    /// invalidation's floor, as it would have seen its epoch.
    pub(crate) fn publish_fast_floor(&self) {
        let _serial = self.floor_lock.lock();
        let floor = if self.strong || self.health.unhealthy_since.load(Ordering::SeqCst) != 0 {
            u64::MAX
        } else {
            Slot::<V>::floor(self.guards.namespace_epoch())
        };
        self.fast_floor.store(floor, Ordering::SeqCst);
    }

    /// The backplane is healthy (again).
    pub(crate) fn mark_healthy(&self) {
        if self.health.unhealthy_since.swap(0, Ordering::SeqCst) != 0 {
            self.publish_fast_floor();
        }
    }

    /// The backplane is unhealthy, since `since` unless it already was.
    pub(crate) fn mark_unhealthy(&self, since: Timestamp) {
        // Keep the earliest time: the bound on staleness counts from then.
        let marked = self.health.unhealthy_since.compare_exchange(
            0,
            since.as_nanos().max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if marked.is_ok() {
            self.publish_fast_floor();
        }
    }

    /// [`Cache::get_local`] past the fast path.
    #[inline(never)]
    fn get_local_slow(&self, slot: &Slot<V>, now: Timestamp) -> Option<V> {
        match self.probe_slow(slot, now) {
            Probe::Fresh(value, _) => {
                self.stats.l1_hits.incr();
                value
            }
            _ => None,
        }
    }

    /// Everything the fast path of [`Inner::probe`] does not decide.
    #[inline(never)]
    fn probe_slow(&self, slot: &Slot<V>, now: Timestamp) -> Probe<V> {
        let meta = slot.meta(self.xfetch_lead);
        if !self.guards.valid(meta.fill_seq, slot.tag_slice()) || !self.within_max_stale(&meta, now) {
            return Probe::Absent;
        }
        if now < meta.fresh_until {
            if meta.is_stale_copy() {
                self.stats.stale_served.incr();
            }
            let refresh = self.in_xfetch_window(&meta, now) && self.xfetch_fires(&meta, now);
            return Probe::Fresh(slot.value().cloned(), refresh);
        }
        if now < meta.usable_until() { Probe::Stale(slot.to_entry(self.xfetch_lead)) } else { Probe::Absent }
    }

    /// While the backplane has been unhealthy longer than `max_stale`, entries older
    /// than `max_stale` are not served.
    #[inline]
    fn within_max_stale(&self, meta: &Meta, now: Timestamp) -> bool {
        if self.strong && !self.own_lease_held(now) {
            return false;
        }
        let since = self.health.unhealthy_since.load(Ordering::Relaxed);
        if since == 0 {
            return true;
        }
        let max = self.cfg.max_stale;
        now.since(Timestamp(since)) <= max || now.since(meta.created()) <= max
    }

    /// Strong level: whether this instance's membership lease is held, i.e. its own
    /// heartbeat came back through the backplane less than half a lease ago. Half, so
    /// that it stops serving L1 before any other member gives up waiting for it.
    pub(crate) fn own_lease_held(&self, now: Timestamp) -> bool {
        let last = Timestamp(self.health.last_own_heartbeat.load(Ordering::Acquire));
        now.since(last) <= self.cfg.membership_lease / 2
    }

    #[cold]
    fn xfetch_fires(&self, meta: &Meta, now: Timestamp) -> bool {
        let beta = self.cfg.early_refresh_beta;
        let u: f64 = 1.0 - self.rng.lock().random::<f64>(); // (0, 1]
        let gap = meta.fresh_until.as_nanos().saturating_sub(now.as_nanos()) as f64;
        let fires = -(meta.load_nanos() as f64) * beta * u.ln() >= gap;
        if fires {
            self.stats.early_refresh_decisions.incr();
        }
        fires
    }

    /// Whether `now` is close enough to expiry for XFetch to possibly fire: it fires with
    /// probability `exp(-(expiry - now) / (Δβ))`, negligible beyond `XFETCH_HORIZON`·Δβ.
    #[inline]
    fn in_xfetch_window(&self, meta: &Meta, now: Timestamp) -> bool {
        let lead = self.xfetch_lead.of(meta.load_micros());
        lead != 0 && now.as_nanos().saturating_add(lead) >= meta.fresh_until.as_nanos()
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        if self.cfg.jitter <= 0.0 {
            return ttl;
        }
        let f: f64 = self.rng.lock().random_range(0.0..=self.cfg.jitter);
        ttl.mul_f64(1.0 + f)
    }

    fn backplane_unhealthy(&self) -> bool {
        self.backplane.is_some() && self.health.unhealthy_since.load(Ordering::Relaxed) != 0
    }

    fn tags_of(&self, key: &K, value: &V) -> Option<Tags> {
        self.cfg.tags.as_ref().map(|f| f(key, value)).filter(|t| !t.is_empty()).map(Arc::new)
    }

    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        value: Option<V>,
        now: Timestamp,
        load_nanos: u64,
        fill_seq: u64,
        tags: Option<Tags>,
        stale_copy: bool,
    ) -> Entry<V> {
        let base =
            if value.is_some() { self.cfg.l1_ttl } else { self.cfg.negative_ttl.unwrap_or(self.cfg.l1_ttl) };
        let mut ttl = self.jittered(base);
        if self.backplane_unhealthy() {
            // Invalidations may not reach us: keep what we load now only briefly.
            ttl = ttl.min(self.cfg.max_stale);
        }
        let fresh_until = now.saturating_add(ttl);
        Entry {
            value,
            meta: {
                let mut m = Meta::new(
                    now,
                    fresh_until,
                    fresh_until.saturating_add(self.cfg.fail_safe_max.unwrap_or_default()),
                    fill_seq,
                    load_nanos,
                );
                if stale_copy {
                    m.mark_stale_copy();
                }
                m
            },
            tags,
        }
    }

    fn make_envelope(
        &self,
        value: Option<bytes::Bytes>,
        version: Option<u64>,
        now: Timestamp,
        load_nanos: u64,
        tags: Option<Tags>,
    ) -> Envelope {
        let base =
            if value.is_some() { self.cfg.l2_ttl } else { self.cfg.negative_ttl.unwrap_or(self.cfg.l2_ttl) };
        let mut ttl = self.jittered(base);
        if self.backplane_unhealthy() {
            ttl = ttl.min(self.cfg.max_stale);
        }
        let soft_expiry = now.saturating_add(ttl);
        Envelope {
            value,
            version,
            created: now,
            soft_expiry,
            hard_expiry: soft_expiry.saturating_add(self.cfg.fail_safe_max.unwrap_or_default()),
            stamp: 0,
            tags: tags.map(|t| t.as_ref().clone()).unwrap_or_default(),
            load_nanos,
        }
    }

    fn l2_store_ttl(&self, env: &Envelope, now: Timestamp) -> Duration {
        env.hard_expiry.since(now).max(Duration::from_millis(1))
    }

    fn encode_checked(&self, value: &V) -> Result<bytes::Bytes> {
        let bytes = self.cfg.codec.encode(value)?;
        if bytes.len() > self.cfg.max_value_bytes {
            self.stats.oversized_values.incr();
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "value of {} bytes exceeds max_value_bytes ({}); raise the limit or store less",
                    bytes.len(),
                    self.cfg.max_value_bytes
                ),
            ));
        }
        Ok(bytes)
    }

    /// Stores `entry` in L1 unless an invalidation since `start` forbids it, or the
    /// backplane subscription is not live yet, or the cache is bypassed.
    pub(crate) fn fill_l1(&self, key: &K, entry: Entry<V>, start: u64, started_at: Timestamp) -> bool {
        let now = self.now();
        if !self.health.subscribed.load(Ordering::SeqCst)
            || self.untrusted.load(Ordering::SeqCst)
            || (self.strong && !self.own_lease_held(now))
        {
            return false;
        }
        let tags = entry.tags.clone();
        // Packed before the guard's lock is taken: a cold slot allocates.
        let slot = Slot::new(entry, self.xfetch_lead);
        let stored = self.guards.fill_if_clean(
            key,
            start,
            started_at,
            now,
            tags.as_deref().map_or(&[], Vec::as_slice),
            || {
                self.l1.insert(key.clone(), slot);
            },
        );
        if !stored {
            self.stats.fills_rejected.incr();
        }
        stored
    }

    /// One L2 call: skipped when the breaker is open, bounded by the L2 timeout, its
    /// outcome fed to the breaker.
    pub(crate) async fn l2_call<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.cfg.l2_timeout;
        let res = self
            .breaker
            .call(async {
                match tokio::time::timeout(timeout, call).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::timeout(&format!("l2 {what}"), timeout)),
                }
            })
            .await;
        if let Err(e) = &res
            && !e.is_circuit_open()
        {
            self.stats.l2_errors.incr();
            tracing::debug!(error = %e, namespace = %self.cfg.namespace, "l2 call failed");
        }
        res
    }

    async fn l2_lookup(&self, key_str: &str, lease: Option<Duration>) -> Option<Lookup> {
        let tier = self.tier.as_ref()?;
        self.l2_call("lookup", tier.lookup(&self.cfg.namespace, key_str, lease)).await.ok()
    }

    /// Decodes an L2 envelope; an undecodable one is deleted, counted and read as a miss.
    async fn entry_from_envelope(&self, key_str: &str, env: Envelope, start: u64) -> Option<Entry<V>> {
        let value = match env.value.as_deref().map(|b| self.cfg.codec.decode(b)).transpose() {
            Ok(v) => v,
            Err(e) => {
                self.stats.l2_undecodable.incr();
                tracing::warn!(error = %e, key = key_str, namespace = %self.cfg.namespace, "undecodable l2 entry evicted");
                if let Some(tier) = &self.tier {
                    let _ =
                        self.l2_call("delete", tier.delete(&self.cfg.namespace, &[key_str.to_owned()])).await;
                }
                return None;
            }
        };
        let now = self.now();
        let mut l1_ttl = self.jittered(self.cfg.l1_ttl);
        if self.backplane_unhealthy() {
            l1_ttl = l1_ttl.min(self.cfg.max_stale);
        }
        let l1_fresh = now.saturating_add(l1_ttl);
        let fresh_until = env.soft_expiry.min(l1_fresh);
        Some(Entry {
            value,
            meta: Meta::new(
                env.created,
                fresh_until,
                env.hard_expiry.max(fresh_until),
                start,
                env.load_nanos,
            ),
            tags: (!env.tags.is_empty()).then(|| Arc::new(env.tags)),
        })
    }

    /// Reads through to the loader without caching (the Strong level's bypass).
    async fn load_direct<F, Fut, E>(&self, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.stats.loads.incr();
        match tokio::time::timeout(self.cfg.hard_timeout, loader()).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.stats.load_errors.incr();
                Err(Error::loader(e))
            }
            Err(_) => {
                self.stats.load_timeouts.incr();
                Err(Error::timeout("loader", self.cfg.hard_timeout))
            }
        }
    }

    fn spawn_refresh<F, Fut, E>(self: &Arc<Self>, key: &K, loader: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        if self.flights.is_running(key) {
            return;
        }
        let (_rx, lead) = self.flights.join_or_lead(key);
        if let Some((id, tx)) = lead {
            self.stats.early_refreshes.incr();
            let inner = self.clone();
            let key = key.clone();
            tokio::spawn(async move { inner.run_flight(key, id, loader, None, tx, true).await });
        }
    }

    /// One load: L2 (with the fleet lease), then the loader, then guarded fills.
    async fn run_flight<F, Fut, E>(
        self: Arc<Self>,
        key: K,
        id: u64,
        loader: F,
        stale_l1: Option<Entry<V>>,
        tx: watch::Sender<Shared<V>>,
        background: bool,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        // Forget the flight however this task ends (even by a panicking loader).
        struct Finish<'a, K: Hash + Eq + Clone, V>(&'a Flights<K, V>, &'a K, u64);
        impl<K: Hash + Eq + Clone, V> Drop for Finish<'_, K, V> {
            fn drop(&mut self) {
                self.0.finish(self.1, self.2);
            }
        }
        let _finish = Finish(&self.flights, &key, id);

        let start = self.guards.start();
        let started_at = self.now();
        let key_str = key.to_key_string();
        if !background {
            self.stats.misses.incr();
        }

        // L2, and the fleet-wide lease.
        let mut token: Option<FillToken> = None;
        let mut stale_l2: Option<Envelope> = None;
        if self.tier.is_some() && !background {
            let lease = Some(self.cfg.hard_timeout);
            match self.l2_lookup(&key_str, lease).await {
                Some(Lookup::Hit(env)) => {
                    if let Some(entry) = self.entry_from_envelope(&key_str, env, start).await {
                        self.stats.l2_hits.incr();
                        let value = entry.value.clone();
                        self.fill_l1(&key, entry, start, started_at);
                        let _ = tx.send(Some(Ok(value)));
                        return;
                    }
                    // Undecodable and deleted: ask again for a token to fill with.
                    if let Some(Lookup::Miss { token: t, .. }) = self.l2_lookup(&key_str, lease).await {
                        token = Some(t);
                    }
                }
                Some(Lookup::Miss { token: t, stale }) => {
                    stale_l2 = stale;
                    if !t.leader {
                        match self.wait_for_fleet_fill(&key, &key_str, start, started_at).await {
                            Ok(value) => {
                                let _ = tx.send(Some(Ok(value)));
                                return;
                            }
                            Err(t) => token = t,
                        }
                    } else {
                        token = Some(t);
                    }
                }
                None => {}
            }
        } else if self.tier.is_some()
            && let Some(Lookup::Miss { token: t, .. }) = self.l2_lookup(&key_str, None).await
        {
            token = Some(t);
        }

        // The fail-safe copy, if one is allowed.
        let fallback = self.fail_safe_copy(stale_l1, stale_l2, &key_str, start).await;

        // The loader, with soft and hard timeouts.
        self.stats.loads.incr();
        let load_began = std::time::Instant::now();
        let hard = self.cfg.hard_timeout;
        let load = tokio::time::timeout(hard, loader());
        tokio::pin!(load);
        let loaded: Result<Option<V>> = {
            let outcome = match (self.cfg.soft_timeout, &fallback) {
                (Some(soft), Some(copy)) if !background => {
                    tokio::select! {
                        r = &mut load => r,
                        _ = tokio::time::sleep(soft) => {
                            // Answer now with the copy; finish the load for the next readers.
                            self.stats.stale_served.incr();
                            let _ = tx.send(Some(Ok(copy.value.clone())));
                            load.await
                        }
                    }
                }
                _ => load.await,
            };
            // Converted inside this block: the loader's error type need not be Send.
            match outcome {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => {
                    self.stats.load_errors.incr();
                    Err(Error::loader(e))
                }
                Err(_) => {
                    self.stats.load_timeouts.incr();
                    Err(Error::timeout("loader", hard))
                }
            }
        };
        let now = self.now();
        let result = match loaded {
            Ok(value) => {
                // Δ for XFetch: precise for the system clock (its hit-path reading is
                // coarse), the injected clock's view otherwise.
                let took = match self.clock.kind() {
                    ClockKind::System(_) => load_began.elapsed(),
                    ClockKind::Custom(_) => now.since(started_at),
                };
                let load_nanos = duration_nanos(took).max(1);
                metrics::histogram!("strata_load_duration_seconds", "namespace" => self.cfg.namespace.clone())
                    .record(took.as_secs_f64());
                self.store_loaded(
                    &key,
                    &key_str,
                    value.clone(),
                    token.as_ref(),
                    start,
                    started_at,
                    load_nanos,
                )
                .await;
                Ok(value)
            }
            Err(e) => {
                self.release_lease(&key_str, token.as_ref()).await;
                Err(e)
            }
        };
        let result = match (result, fallback) {
            (Err(e), Some(copy)) => {
                tracing::debug!(error = %e, key = %key_str, "load failed; serving the fail-safe copy");
                self.rearm(&key, copy, now, start, started_at)
            }
            (r, _) => r,
        };
        if background {
            return;
        }
        // If the soft timeout already answered, this only updates late subscribers.
        tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(result);
                true
            } else {
                false
            }
        });
    }

    /// Waits for the lease holder's fill; on success the value, else the token to fill
    /// with ourselves (from the last lookup, so it predates our load).
    async fn wait_for_fleet_fill(
        &self,
        key: &K,
        key_str: &str,
        start: u64,
        started_at: Timestamp,
    ) -> std::result::Result<Option<V>, Option<FillToken>> {
        self.stats.lease_waits.incr();
        let deadline = tokio::time::Instant::now() + self.cfg.lease_wait;
        let mut pause = Duration::from_millis(1);
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
            match self.l2_lookup(key_str, None).await {
                Some(Lookup::Hit(env)) => {
                    if let Some(entry) = self.entry_from_envelope(key_str, env, start).await {
                        self.stats.l2_hits.incr();
                        let value = entry.value.clone();
                        self.fill_l1(key, entry, start, started_at);
                        return Ok(value);
                    }
                }
                Some(Lookup::Miss { token, .. }) => last = Some(token),
                None => return Err(last),
            }
        }
        Err(last)
    }

    async fn fail_safe_copy(
        &self,
        stale_l1: Option<Entry<V>>,
        stale_l2: Option<Envelope>,
        key_str: &str,
        start: u64,
    ) -> Option<Entry<V>> {
        self.cfg.fail_safe_max?;
        if let Some(e) = stale_l1 {
            return Some(e);
        }
        let env = stale_l2?;
        self.entry_from_envelope(key_str, env, start).await
    }

    /// Serves a fail-safe copy and re-arms it for the throttle period so that the next
    /// reads do not hammer a failing loader.
    fn rearm(
        &self,
        key: &K,
        mut copy: Entry<V>,
        now: Timestamp,
        start: u64,
        started_at: Timestamp,
    ) -> Result<Option<V>> {
        self.stats.stale_served.incr();
        let usable_until = copy.meta.usable_until();
        copy.meta.set_fresh_until(now.saturating_add(self.cfg.fail_safe_throttle).min(usable_until.max(now)));
        copy.meta.mark_stale_copy();
        copy.meta.disable_early_refresh();
        let fill_seq = copy.meta.fill_seq.min(start);
        let value = copy.value.clone();
        self.fill_l1(key, copy, fill_seq, started_at);
        Ok(value)
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_loaded(
        &self,
        key: &K,
        key_str: &str,
        value: Option<V>,
        token: Option<&FillToken>,
        start: u64,
        started_at: Timestamp,
        load_nanos: u64,
    ) {
        if value.is_none() && self.cfg.negative_ttl.is_none() {
            self.release_lease(key_str, token).await;
            return;
        }
        let now = self.now();
        let tags = value.as_ref().and_then(|v| self.tags_of(key, v));
        let version = value.as_ref().and_then(|v| self.cfg.version.as_ref().and_then(|f| f(v)));
        let mut filled = false;
        let mut stored_in_l2 = false;
        if let (Some(tier), Some(token)) = (&self.tier, token)
            && !self.l2_delete_pending(key_str, tags.as_deref().map_or(&[], Vec::as_slice))
        {
            let encoded = match &value {
                Some(v) => match self.encode_checked(v) {
                    Ok(b) => Some(Some(b)),
                    Err(e) => {
                        tracing::debug!(error = %e, key = key_str, "value kept out of l2");
                        None
                    }
                },
                None => Some(None),
            };
            if let Some(bytes) = encoded {
                filled = true;
                let env = self.make_envelope(bytes, version, now, load_nanos, tags.clone());
                let ttl = self.l2_store_ttl(&env, now);
                match self.l2_call("fill", tier.fill(&self.cfg.namespace, key_str, env, ttl, token)).await {
                    Ok(FillOutcome::Rejected) => {
                        // An invalidation (maybe from another instance, not yet heard of
                        // here) overtook this load: it must not reach L1 either.
                        self.stats.fills_rejected.incr();
                        return;
                    }
                    Ok(FillOutcome::Stored) => stored_in_l2 = true,
                    Err(_) => {}
                }
            }
        }
        if !filled {
            self.release_lease(key_str, token).await;
        }
        if self.strong && !stored_in_l2 {
            // Strong: L1 holds only what L2 returned or accepted. A value L2 did not
            // take may have been read before a write that holds a write lock here
            // committed, and L1 would then serve it after the commit.
            self.stats.l1_fills_skipped.incr();
            return;
        }
        let entry = self.make_entry(value, now, load_nanos, start, tags, false);
        self.fill_l1(key, entry, start, started_at);
    }

    /// Lets the instances waiting for our fill stop waiting when there will be none.
    async fn release_lease(&self, key_str: &str, token: Option<&FillToken>) {
        if let (Some(tier), Some(token)) = (&self.tier, token)
            && token.lease.is_some()
        {
            let _ =
                self.l2_call("release_lease", tier.release_lease(&self.cfg.namespace, key_str, token)).await;
        }
    }

    /// Whether an L2 invalidation covering this key failed and awaits retry: L2 holds no
    /// tombstone for it then, so a fill could store a stale value there.
    fn l2_delete_pending(&self, key_str: &str, tags: &[String]) -> bool {
        let p = self.pending.lock();
        p.l2_all || p.l2_keys.contains(key_str) || tags.iter().any(|t| p.l2_tags.contains(t))
    }

    /// Removes `key` from L1 under its tombstone.
    pub(crate) fn evict_key(&self, key: &K, now: Timestamp) {
        self.guards.invalidate_key(key, now, || {
            self.l1.remove(key);
            self.flights.detach(key);
        });
    }

    /// Drops everything local and refuses every fill in flight.
    pub(crate) fn flush_l1(&self) {
        self.guards.invalidate_all();
        self.publish_fast_floor();
        self.flights.detach_all();
        self.l1.clear();
    }

    /// An L2 invalidation failed: make the cache safe, then remember to retry.
    pub(crate) fn l2_invalidation_failed(&self, keys: Option<Vec<String>>, tag: Option<String>, err: &Error) {
        self.stats.invalidations_buffered.incr();
        let mut p = self.pending.lock();
        match (keys, tag) {
            (Some(keys), _) => p.l2_keys.extend(keys),
            (None, Some(tag)) => {
                p.l2_tags.insert(tag);
            }
            (None, None) => p.l2_all = true,
        }
        if p.l2_keys.len() > MAX_PENDING_KEYS {
            p.l2_keys.clear();
            p.l2_tags.clear();
            p.l2_all = true;
        }
        if self.cfg.consistency == Consistency::Strong {
            // L2 may still hold what should be gone: trust no tier until the namespace
            // bump that cleans it succeeds.
            p.l2_all = true;
            self.untrusted.store(true, Ordering::SeqCst);
            self.breaker.force_open();
            self.flush_l1();
        }
        tracing::warn!(error = %err, namespace = %self.cfg.namespace, "l2 invalidation failed; buffered for retry");
    }

    /// Strong level: before an invalidation goes out while L2 is untrusted, tries to make
    /// L2 clean first (the namespace bump of [`Inner::retry_pending`], straight to the
    /// tier). Otherwise the forced-open breaker skips this invalidation's L2 delete while
    /// its message still reaches the fleet, whose instances then refill their L1s from
    /// the entries the failed deletes left in L2, until the retry task's next attempt
    /// (up to 2 s later) even though L2 is reachable again.
    pub(crate) async fn clean_l2_if_untrusted(&self) {
        if self.strong && self.untrusted.load(Ordering::SeqCst) {
            self.retry_pending().await;
        }
    }

    /// Publishes one invalidation message with the next sequence number; at the Strong
    /// level, then waits for the fleet's acknowledgements.
    pub(crate) async fn publish(&self, body: MessageBody) -> Result<()> {
        if self.strong && self.untrusted.load(Ordering::SeqCst) {
            // Our L2 delete failed, so L2 may still hold what this message invalidates:
            // every member must stop trusting L2 before it drops its L1 copy, or it would
            // read the old value straight back. Sent first; acknowledged with the message.
            self.publish_only(MessageBody::DistrustL2).await?;
        }
        let seq = self.publish_only(body).await?;
        if self.strong && seq != 0 {
            self.wait_for_acks(seq).await?;
        }
        Ok(())
    }

    /// Waits until every member heard within its lease acknowledged `seq`, or until its
    /// lease lapsed (then it has stopped serving L1 by its own clock, see
    /// [`Inner::own_lease_held`]).
    async fn wait_for_acks(&self, seq: u64) -> Result<()> {
        let lease = self.cfg.membership_lease;
        // Bounded in tokio time too, in case the clock is a manual one that never moves.
        let give_up = tokio::time::Instant::now() + lease * 2;
        loop {
            let notified = self.acks.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.now();
            let waiting: Vec<OriginId> = self
                .members
                .lock()
                .iter()
                .filter(|(_, m)| m.acked < seq && now.since(m.last_heard) <= lease)
                .map(|(o, _)| *o)
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{} member(s) neither acknowledged invalidation {seq} nor let their lease lapse",
                        waiting.len()
                    ),
                ));
            }
            // Wake on an ack, or poll for lapsed leases.
            let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
        }
    }

    /// Publishes one message with the next sequence number; returns it (0 without a
    /// backplane).
    async fn publish_only(&self, body: MessageBody) -> Result<u64> {
        match self.send(&body).await {
            Ok(seq) => Ok(seq),
            Err(e) => {
                self.stats.invalidations_buffered.incr();
                self.pending.lock().messages.push(body);
                tracing::warn!(error = %e, namespace = %self.cfg.namespace, "publish failed; buffered for retry");
                Err(e)
            }
        }
    }

    /// Sends one message with the next sequence number (0 without a backplane).
    async fn send(&self, body: &MessageBody) -> Result<u64> {
        let Some(bp) = &self.backplane else { return Ok(0) };
        let mut seq = self.publisher.lock().await;
        *seq += 1;
        let msg = Message {
            origin: self.origin,
            seq: *seq,
            namespace: self.cfg.namespace.clone(),
            body: body.clone(),
        };
        // The sequence number is used even if this fails: receivers then see a gap at
        // the next message or heartbeat and repair, which is what makes a lost publish safe.
        match tokio::time::timeout(self.backplane_timeout(), bp.publish(&msg)).await {
            Ok(Ok(())) => {
                self.stats.invalidations_sent.incr();
                Ok(msg.seq)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::timeout("backplane publish", self.backplane_timeout())),
        }
    }

    pub(crate) fn backplane_timeout(&self) -> Duration {
        self.cfg.l2_timeout.max(Duration::from_millis(500))
    }

    pub(crate) fn run_hooks(&self, what: &Invalidation) {
        for hook in &self.cfg.hooks {
            hook(what);
        }
    }

    /// Retries buffered invalidations: L2 first (so a reader woken by the message cannot
    /// refill from a stale L2 entry), then messages.
    pub(crate) async fn retry_pending(&self) {
        let (keys, tags, all) = {
            let mut p = self.pending.lock();
            if p.is_empty() {
                return;
            }
            (std::mem::take(&mut p.l2_keys), std::mem::take(&mut p.l2_tags), std::mem::take(&mut p.l2_all))
        };
        if let Some(tier) = &self.tier {
            let ns = &self.cfg.namespace;
            let mut failed = false;
            if all {
                // Straight to the tier: a forced-open breaker must not block the very call
                // that makes L2 clean again.
                match tokio::time::timeout(self.cfg.l2_timeout, tier.invalidate_namespace(ns)).await {
                    Ok(Ok(())) => {
                        if self.breaker.state() == BreakerState::ForcedOpen {
                            self.breaker.reset();
                        }
                        if self.untrusted.swap(false, Ordering::SeqCst) {
                            // L2 is clean now; what L1 held was flushed when we lost trust.
                            self.flush_l1();
                            tracing::info!(namespace = %ns, "l2 cleaned by a namespace bump; cache trusted again");
                        }
                    }
                    _ => failed = true,
                }
            } else {
                if !keys.is_empty() {
                    let list: Vec<String> = keys.iter().cloned().collect();
                    failed |= !matches!(self.l2_call("delete", tier.delete(ns, &list)).await, Ok(()));
                }
                for tag in &tags {
                    failed |=
                        !matches!(self.l2_call("invalidate_tag", tier.invalidate_tag(ns, tag)).await, Ok(()));
                }
            }
            if failed {
                let mut p = self.pending.lock();
                p.l2_all |= all;
                if !all {
                    p.l2_keys.extend(keys);
                    p.l2_tags.extend(tags);
                }
                return;
            }
            let unlocks = std::mem::take(&mut self.pending.lock().unlocks);
            for (i, (scope, id)) in unlocks.iter().enumerate() {
                // Straight to the tier, like the namespace bump above.
                let res =
                    tokio::time::timeout(self.cfg.l2_timeout, tier.unlock(ns, scope.borrow(), *id)).await;
                if !matches!(res, Ok(Ok(()))) {
                    self.pending.lock().unlocks.extend(unlocks[i..].iter().cloned());
                    break;
                }
            }
            // L2 is clean only now. Until now any instance, this one included, could read
            // the old value back from L2 into its L1 after the first message evicted it
            // (or a fill that predates the invalidation could reach L2 before the delete
            // did). So drop such copies here, and tell the fleet again.
            let mut again = Vec::new();
            if all {
                self.flush_l1();
                again.push(MessageBody::All);
            } else {
                let now = self.now();
                for key in keys.iter().filter_map(|k| K::parse_key(k)) {
                    self.evict_key(&key, now);
                }
                for tag in &tags {
                    self.guards.invalidate_tag(tag);
                    again.push(MessageBody::Tag(tag.clone()));
                }
                if !tags.is_empty() {
                    self.flights.detach_all();
                }
                if !keys.is_empty() {
                    again.push(MessageBody::Keys(keys.into_iter().collect()));
                }
            }
            self.pending.lock().messages.extend(again);
        }
        let messages = std::mem::take(&mut self.pending.lock().messages);
        let mut iter = messages.into_iter();
        while let Some(body) = iter.next() {
            if self.send(&body).await.is_err() {
                let mut p = self.pending.lock();
                p.messages.push(body);
                p.messages.extend(iter);
                return;
            }
        }
    }
}
