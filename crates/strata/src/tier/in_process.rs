//! An L2 tier that lives in the process: the shared tier of an in-process fleet (several
//! `Cache` handles in one process), used by tests and by `strata bench`'s embedded
//! default. It implements the full fill-guard contract of [`Tier`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Envelope, FillOutcome, FillToken, Lookup, Tier, TierConfig};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::scope::Scope;
use crate::tag_epochs::TagEpochs;

/// The stamp of a poisoned fill token: below every namespace epoch (which starts at 1),
/// so no fill with it is ever stored.
const POISONED: u64 = FillToken::POISONED_STAMP;

struct Namespace {
    /// The invalidation clock.
    clock: u64,
    namespace_epoch: u64,
    /// Bounded by [`TierConfig::max_tag_epochs`], with a tag floor.
    tag_epochs: TagEpochs,
    tombstones: HashMap<String, (u64, Timestamp)>,
    entries: HashMap<String, (Envelope, Timestamp)>,
    leases: HashMap<String, (u64, Timestamp)>,
    /// Write locks on keys: (id, expiry) per key.
    key_locks: HashMap<String, Vec<(u64, Timestamp)>>,
    /// Write locks on tags or the whole namespace: (id, expiry); they poison every key.
    wide_locks: Vec<(u64, Timestamp)>,
}

impl Namespace {
    fn new(max_tag_epochs: usize) -> Self {
        Namespace {
            clock: 1,
            namespace_epoch: 1,
            tag_epochs: TagEpochs::new(max_tag_epochs),
            tombstones: HashMap::new(),
            entries: HashMap::new(),
            leases: HashMap::new(),
            key_locks: HashMap::new(),
            wide_locks: Vec::new(),
        }
    }

    fn locked(&self, key: &str, now: Timestamp) -> bool {
        self.wide_locks.iter().any(|(_, exp)| *exp > now)
            || self.key_locks.get(key).is_some_and(|l| l.iter().any(|(_, exp)| *exp > now))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn valid(&self, env: &Envelope) -> bool {
        env.stamp >= self.namespace_epoch && self.tag_epochs.valid(env.stamp, &env.tags)
    }

    fn prune(&mut self, now: Timestamp) {
        // Amortised: sweep only when the maps have grown, so a long run stays bounded.
        if self.tombstones.len() > 4096 {
            self.tombstones.retain(|_, (_, exp)| *exp > now);
        }
        if self.leases.len() > 4096 {
            self.leases.retain(|_, (_, exp)| *exp > now);
        }
        self.wide_locks.retain(|(_, exp)| *exp > now);
        if self.key_locks.len() > 4096 {
            self.key_locks.retain(|_, l| {
                l.retain(|(_, exp)| *exp > now);
                !l.is_empty()
            });
        }
    }

    /// Invalidates `scope` (one clock tick), with key tombstones living `tomb_for`.
    fn invalidate(&mut self, scope: &Scope, now: Timestamp, tomb_for: Duration) {
        let at = self.tick();
        match scope {
            Scope::Keys(keys) => {
                let exp = now.saturating_add(tomb_for);
                for k in keys {
                    self.entries.remove(k);
                    self.leases.remove(k);
                    let t = self.tombstones.entry(k.clone()).or_insert((at, exp));
                    *t = (at, t.1.max(exp));
                }
            }
            Scope::Tag(tag) => {
                self.tag_epochs.record(tag, at);
            }
            Scope::All => {
                self.namespace_epoch = at;
                self.tag_epochs.forget_up_to(at);
                self.entries.clear();
                self.leases.clear();
            }
        }
        self.prune(now);
    }
}

struct Inner {
    config: TierConfig,
    clock: Arc<dyn Clock>,
    namespaces: Mutex<HashMap<String, Namespace>>,
    next_lease: AtomicU64,
    available: AtomicBool,
    ops: AtomicU64,
    /// Hot-key rankings per namespace (warm-up): key → decayed read count.
    hot: Mutex<HashMap<String, HashMap<String, f64>>>,
}

/// An in-process L2 tier shared by every `Cache` handle it is given to.
///
/// Cloning gives another handle to the same tier. Fault injection: [`InProcessTier::set_available`]
/// makes every call fail as a real outage would.
#[derive(Clone)]
pub struct InProcessTier {
    inner: Arc<Inner>,
}

impl Default for InProcessTier {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessTier {
    /// A tier on the system clock with default settings.
    pub fn new() -> Self {
        Self::with_config(TierConfig::default(), Arc::new(SystemClock::default()))
    }

    /// A tier with explicit settings and clock (use the same clock as the caches).
    pub fn with_config(config: TierConfig, clock: Arc<dyn Clock>) -> Self {
        InProcessTier {
            inner: Arc::new(Inner {
                config,
                clock,
                namespaces: Mutex::new(HashMap::new()),
                next_lease: AtomicU64::new(1),
                available: AtomicBool::new(true),
                ops: AtomicU64::new(0),
                hot: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Simulates an outage (`false`) or its end (`true`).
    pub fn set_available(&self, available: bool) {
        self.inner.available.store(available, Ordering::SeqCst);
    }

    /// How many calls the tier has served (the equivalent of Redis ops).
    pub fn ops(&self) -> u64 {
        self.inner.ops.load(Ordering::Relaxed)
    }

    /// How many live entries `namespace` holds.
    pub fn len(&self, namespace: &str) -> usize {
        let now = self.inner.clock.now();
        self.inner
            .namespaces
            .lock()
            .get(namespace)
            .map_or(0, |ns| ns.entries.values().filter(|(_, exp)| *exp > now).count())
    }

    /// True when `namespace` holds no live entry.
    pub fn is_empty(&self, namespace: &str) -> bool {
        self.len(namespace) == 0
    }

    /// How many tag epochs `namespace` holds (bounded by [`TierConfig::max_tag_epochs`]).
    pub fn tag_epochs(&self, namespace: &str) -> usize {
        self.inner.namespaces.lock().get(namespace).map_or(0, |ns| ns.tag_epochs.len())
    }

    /// The raw stored envelope, valid or not (for tests that look for stale entries).
    pub fn raw(&self, namespace: &str, key: &str) -> Option<Envelope> {
        self.inner.namespaces.lock().get(namespace).and_then(|ns| ns.entries.get(key)).map(|(e, _)| e.clone())
    }

    /// Removes an entry without an invalidation (as an LRU eviction in Redis would).
    pub fn evict(&self, namespace: &str, key: &str) {
        if let Some(ns) = self.inner.namespaces.lock().get_mut(namespace) {
            ns.entries.remove(key);
        }
    }

    fn enter(&self) -> Result<Timestamp> {
        self.inner.ops.fetch_add(1, Ordering::Relaxed);
        if self.inner.available.load(Ordering::SeqCst) {
            Ok(self.inner.clock.now())
        } else {
            Err(Error::new(ErrorKind::Tier, "in-process tier is unavailable (injected outage)"))
        }
    }

    /// Invalidates `scope` (delete, tag bump or namespace bump), with key tombstones
    /// living the configured tombstone ttl.
    fn invalidate_scope(&self, namespace: &str, scope: &Scope) -> Result<()> {
        let now = self.enter()?;
        let tomb_for = self.inner.config.tombstone_ttl;
        self.with_ns(namespace, |ns| ns.invalidate(scope, now, tomb_for));
        Ok(())
    }

    fn lookup_in(&self, ns: &mut Namespace, key: &str, lease: Option<Duration>, now: Timestamp) -> Lookup {
        let next_lease = &self.inner.next_lease;
        let mut stale = None;
        if let Some((env, exp)) = ns.entries.get(key) {
            if *exp > now && ns.valid(env) {
                if env.soft_expiry > now {
                    return Lookup::Hit(env.clone());
                }
                stale = Some(env.clone());
            } else {
                ns.entries.remove(key);
            }
        }
        let stamp = if ns.locked(key, now) { POISONED } else { ns.clock };
        let token = match lease {
            None => FillToken { stamp, lease: None, leader: true },
            Some(lease_ttl) => match ns.leases.get(key) {
                Some((_, exp)) if *exp > now => FillToken { stamp, lease: None, leader: false },
                _ => {
                    let id = next_lease.fetch_add(1, Ordering::Relaxed);
                    ns.leases.insert(key.to_owned(), (id, now.saturating_add(lease_ttl)));
                    FillToken { stamp, lease: Some(id), leader: true }
                }
            },
        };
        Lookup::Miss { token, stale }
    }

    fn with_ns<R>(&self, namespace: &str, f: impl FnOnce(&mut Namespace) -> R) -> R {
        let mut map = self.inner.namespaces.lock();
        let ns = match map.get_mut(namespace) {
            Some(ns) => ns,
            None => map
                .entry(namespace.to_owned())
                .or_insert_with(|| Namespace::new(self.inner.config.max_tag_epochs)),
        };
        f(ns)
    }
}

#[async_trait]
impl Tier for InProcessTier {
    fn name(&self) -> &str {
        "in-process"
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.config.tombstone_ttl
    }

    async fn lookup(&self, namespace: &str, key: &str, lease: Option<Duration>) -> Result<Lookup> {
        let now = self.enter()?;
        Ok(self.with_ns(namespace, |ns| self.lookup_in(ns, key, lease, now)))
    }

    /// One call (one op) for the whole batch, as a Redis pipeline would be.
    async fn lookup_many(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Option<Duration>,
    ) -> Result<Vec<Lookup>> {
        let now = self.enter()?;
        Ok(self.with_ns(namespace, |ns| keys.iter().map(|k| self.lookup_in(ns, k, lease, now)).collect()))
    }

    async fn fill(
        &self,
        namespace: &str,
        key: &str,
        mut envelope: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> Result<FillOutcome> {
        let now = self.enter()?;
        Ok(self.with_ns(namespace, |ns| {
            if let Some(lease) = token.lease
                && ns.leases.get(key).is_some_and(|(id, _)| *id == lease)
            {
                ns.leases.remove(key);
            }
            let tombstoned = ns.tombstones.get(key).is_some_and(|(at, exp)| *exp > now && *at > token.stamp);
            envelope.stamp = token.stamp;
            if tombstoned || !ns.valid(&envelope) {
                return FillOutcome::Rejected;
            }
            // The version guard: a valid stored entry of a newer version stays.
            let newer_stored = ns.entries.get(key).is_some_and(|(held, exp)| {
                *exp > now
                    && ns.valid(held)
                    && matches!((held.version, envelope.version), (Some(h), Some(v)) if h > v)
            });
            if newer_stored {
                return FillOutcome::Superseded;
            }
            ns.entries.insert(key.to_owned(), (envelope, now.saturating_add(ttl)));
            FillOutcome::Stored
        }))
    }

    async fn set(&self, namespace: &str, key: &str, mut envelope: Envelope, ttl: Duration) -> Result<()> {
        let now = self.enter()?;
        let tomb_exp = now.saturating_add(self.inner.config.tombstone_ttl);
        self.with_ns(namespace, |ns| {
            let at = ns.tick();
            ns.leases.remove(key);
            ns.tombstones.insert(key.to_owned(), (at, tomb_exp));
            envelope.stamp = at;
            ns.entries.insert(key.to_owned(), (envelope, now.saturating_add(ttl)));
            ns.prune(now);
        });
        Ok(())
    }

    async fn delete(&self, namespace: &str, keys: &[String]) -> Result<()> {
        self.invalidate_scope(namespace, &Scope::Keys(keys.to_vec()))
    }

    async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<()> {
        self.invalidate_scope(namespace, &Scope::Tag(tag.to_owned()))
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<()> {
        self.invalidate_scope(namespace, &Scope::All)
    }

    async fn invalidate(&self, namespace: &str, scope: &Scope) -> Result<()> {
        self.invalidate_scope(namespace, scope)
    }

    async fn release_lease(&self, namespace: &str, key: &str, token: &FillToken) -> Result<()> {
        self.enter()?;
        let Some(lease) = token.lease else { return Ok(()) };
        self.with_ns(namespace, |ns| {
            if ns.leases.get(key).is_some_and(|(id, _)| *id == lease) {
                ns.leases.remove(key);
            }
        });
        Ok(())
    }

    async fn touch(&self, namespace: &str, key: &str, soft_expiry: Timestamp, ttl: Duration) -> Result<bool> {
        let now = self.enter()?;
        Ok(self.with_ns(namespace, |ns| {
            let valid = ns.entries.get(key).is_some_and(|(env, exp)| *exp > now && ns.valid(env));
            if !valid {
                return false;
            }
            if let Some((env, exp)) = ns.entries.get_mut(key) {
                env.soft_expiry = soft_expiry;
                env.hard_expiry = now.saturating_add(ttl);
                *exp = now.saturating_add(ttl);
            }
            true
        }))
    }

    async fn lock(&self, namespace: &str, scope: &Scope, id: u64, ttl: Duration) -> Result<()> {
        let now = self.enter()?;
        let tomb_for = self.inner.config.tombstone_ttl.saturating_add(ttl);
        let exp = now.saturating_add(ttl);
        self.with_ns(namespace, |ns| {
            ns.invalidate(scope, now, tomb_for);
            match scope {
                Scope::Keys(keys) => {
                    for k in keys {
                        ns.key_locks.entry(k.clone()).or_default().push((id, exp));
                    }
                }
                Scope::Tag(_) | Scope::All => ns.wide_locks.push((id, exp)),
            }
        });
        Ok(())
    }

    async fn unlock(&self, namespace: &str, scope: &Scope, id: u64) -> Result<()> {
        self.invalidate_scope(namespace, scope)?;
        self.with_ns(namespace, |ns| match scope {
            Scope::Keys(keys) => {
                for k in keys {
                    if let Some(l) = ns.key_locks.get_mut(k) {
                        l.retain(|(i, _)| *i != id);
                        if l.is_empty() {
                            ns.key_locks.remove(k);
                        }
                    }
                }
            }
            Scope::Tag(_) | Scope::All => ns.wide_locks.retain(|(i, _)| *i != id),
        });
        Ok(())
    }

    /// Halves the ranking, adds the counts, keeps the `keep` hottest: as the Redis tier.
    async fn record_hot_keys(&self, namespace: &str, counts: &[(String, u64)], keep: usize) -> Result<()> {
        self.enter()?;
        let mut hot = self.inner.hot.lock();
        let ranking = hot.entry(namespace.to_owned()).or_default();
        ranking.values_mut().for_each(|score| *score /= 2.0);
        for (key, n) in counts {
            *ranking.entry(key.clone()).or_default() += *n as f64;
        }
        if keep == 0 {
            ranking.clear();
        } else if ranking.len() > keep {
            let mut scores: Vec<f64> = ranking.values().copied().collect();
            scores.sort_unstable_by(|a, b| b.total_cmp(a));
            let floor = scores[keep - 1];
            ranking.retain(|_, score| *score >= floor);
            // Ties at the floor may leave a few more; drop those arbitrarily.
            let excess: Vec<String> =
                ranking.iter().filter(|(_, s)| **s == floor).map(|(k, _)| k.clone()).collect();
            for k in excess.into_iter().take(ranking.len().saturating_sub(keep)) {
                ranking.remove(&k);
            }
        }
        Ok(())
    }

    async fn hot_keys(&self, namespace: &str, n: usize) -> Result<Vec<String>> {
        self.enter()?;
        let hot = self.inner.hot.lock();
        let Some(ranking) = hot.get(namespace) else { return Ok(Vec::new()) };
        let mut ranked: Vec<(&String, f64)> = ranking.iter().map(|(k, s)| (k, *s)).collect();
        ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        Ok(ranked.into_iter().take(n).map(|(k, _)| k.clone()).collect())
    }
}
