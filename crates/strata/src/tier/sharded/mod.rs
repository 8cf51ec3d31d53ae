//! A tier made of several tiers: [`ShardedTier`] routes each key to one shard and
//! sends tag and namespace invalidations to all of them. One rule serves a Redis
//! Cluster (virtual shards, each its own hash tag, spread over the slots) and a ring of
//! standalone servers (one shard per server).
//!
//! # The sharding rule
//!
//! - **Each shard is its own fill-guard domain.** A shard keeps, per namespace, its own
//!   clock, epochs, tombstones and leases ([the contract](crate::tier)); no script or
//!   call ever spans two shards, so on a Cluster every call stays in one slot.
//! - **Keys are placed by rendezvous hashing** over the shards' names (xxh3, the same in
//!   every process): a key's *candidates* are the shards in its score order; it lives
//!   on the first.
//! - **Tokens go back where they came from.** Every stamp the sharded tier hands out (in
//!   a [`FillToken`](crate::tier::FillToken) or an entry) carries its shard's index in its top bits, so a fill,
//!   or a token the cache builds from an entry's stamp, is judged by the clock that
//!   issued it, even if the key's reads have moved since (a failover).
//! - **Invalidations reach every shard that may hold a copy.** A key delete or lock goes
//!   to the key's first `max(hot_key_copies, 2 if a gutter is set)` candidates; a tag or
//!   namespace invalidation, and a lock of either, to every shard. A shard that fails
//!   makes the call fail after the others were done, so the cache's retry of
//!   invalidations covers it; the order across shards does not matter, because no
//!   value ever moves from one shard to another.
//!
//! # Failover: the gutter
//!
//! Each shard has its own circuit breaker. With [`ShardedTierBuilder::gutter`] set, a
//! read whose shard fails (an error, or no answer within
//! [`ShardedTierBuilder::shard_timeout`]) or whose breaker is open goes to the key's next
//! candidate, and what the cache fills there lives at most the gutter's time to live
//! (Facebook's *gutter* pool, within the ring). Invalidations always include that next
//! candidate, so a gutter copy is never stale; the short life only keeps the gutter
//! from holding a dead shard's keys long after it is back. Without a gutter, a failed
//! shard's reads fail, and the cache falls back as on any L2 outage (L1 within
//! `max_stale`, the database through single-flight).
//!
//! When a shard comes back, the entries it kept may predate invalidations it missed:
//! those failed, so the cache that issued them retries them, and while it does, every
//! member distrusts L2 entries older than `max_stale` (the fleet's doubt). A shard that
//! restarts empty has nothing stale.
//!
//! # Hot keys
//!
//! Each instance counts its L2 lookups in a small count-min sketch. With
//! [`ShardedTierBuilder::hot_key_copies`] at `R > 1`, a key whose share of recent
//! lookups passes [`ShardedTierBuilder::hot_key_share`] is read from a random one of its
//! first `R` candidates, and the load that refills it fills all `R`, each copy with its
//! own shard's token taken at the lookup (before the load read the database). Every key
//! delete reaches all `R`, hot or not (no instance can know whether another copied it):
//! `R` costs `R` times the delete traffic, and nothing more on reads of cold keys.
//! A copy missing on the shard a read picked (the key became hot after its last fill)
//! is read from the first candidate instead; the next refill fills it.

mod copies;
mod hot;
mod port;
mod route;

pub use hot::HotKey;
pub use route::Placement;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{BuildError, Result};
use crate::tier::Tier;
use copies::PendingCopies;
use hot::HotKeys;

/// How each shard of a namespace is named on the shards' tiers.
///
/// A ring of servers uses the namespace unchanged ([`SameName`]); virtual shards on
/// one tier (a Redis Cluster) need one name per shard, so that each shard has its own
/// keys, clock and epochs — and, on a Cluster, its own slot.
pub trait ShardNaming: Send + Sync + 'static {
    /// The name of namespace `namespace` on shard `shard` of `shards`.
    fn namespace(&self, namespace: &str, shard: usize, shards: usize) -> String;
}

/// Every shard uses the namespace's own name (each shard is a separate server).
#[derive(Debug, Clone, Copy, Default)]
pub struct SameName;

impl ShardNaming for SameName {
    fn namespace(&self, namespace: &str, _shard: usize, _shards: usize) -> String {
        namespace.to_owned()
    }
}

/// Virtual shard `i` of namespace `ns` is the namespace `ns~i`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NumberedNames;

impl ShardNaming for NumberedNames {
    fn namespace(&self, namespace: &str, shard: usize, _shards: usize) -> String {
        format!("{namespace}~{shard}")
    }
}

/// One shard: a tier, its breaker and counters.
struct Shard {
    name: String,
    tier: Arc<dyn Tier>,
    breaker: CircuitBreaker,
    reads: AtomicU64,
    failed: AtomicU64,
    /// When a call last failed (system time, ns; 0 = never).
    failed_at: AtomicU64,
    /// Hits not served because the entry predates the shard's last failure.
    doubted: AtomicU64,
    gutter_reads: AtomicU64,
    copy_reads: AtomicU64,
}

/// What one shard did, for [`ShardedTier::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardStats {
    /// The shard's name.
    pub name: String,
    /// Lookups sent to it (first choice, gutter or copy).
    pub reads: u64,
    /// Calls that failed or timed out.
    pub failed: u64,
    /// Lookups it answered for another shard's key (as the gutter).
    pub gutter_reads: u64,
    /// Hits it served from a hot key's copy.
    pub copy_reads: u64,
    /// Hits not served because the entry was older than the shard's last failure,
    /// within the doubt window after it (see [`ShardedTierBuilder::doubt_after_failure`]).
    pub doubted: u64,
    /// Its breaker's state.
    pub breaker: BreakerState,
}

/// What a [`ShardedTier`] did: per shard, and the hot keys found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardedTierStats {
    /// One entry per shard, in the order they were added.
    pub shards: Vec<ShardStats>,
    /// Keys found hot lately by this instance, hottest first (at most 16).
    pub hot_keys: Vec<HotKey>,
    /// Fills of hot keys' copies stored.
    pub copies_filled: u64,
}

/// A tier that shards keys over several tiers (see the [module docs](self)).
pub struct ShardedTier {
    shards: Vec<Shard>,
    placement: route::Placement,
    naming: Arc<dyn ShardNaming>,
    name_cache: RwLock<HashMap<String, Arc<[String]>>>,
    copies: usize,
    gutter: Option<Duration>,
    shard_timeout: Duration,
    doubt_window: Duration,
    hot: HotKeys,
    pending: PendingCopies,
    copies_filled: AtomicU64,
    tombstone_ttl: Duration,
}

impl std::fmt::Debug for ShardedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedTier")
            .field("shards", &self.shards.iter().map(|s| s.name.as_str()).collect::<Vec<_>>())
            .field("hot_key_copies", &self.copies)
            .field("gutter", &self.gutter)
            .finish()
    }
}

impl ShardedTier {
    /// A builder: add shards with [`ShardedTierBuilder::shard`] (a ring of servers) or
    /// [`ShardedTierBuilder::virtual_shards`] (one tier split by name, e.g. a Cluster).
    pub fn builder() -> ShardedTierBuilder {
        ShardedTierBuilder::default()
    }

    /// The shards' names, in the order they were added.
    pub fn shard_names(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name.as_str()).collect()
    }

    /// The index of the shard `key` lives on (its first candidate), whatever the
    /// shards' health: the placement every process computes.
    pub fn shard_of(&self, key: &str) -> usize {
        self.candidates(key, 1).first().copied().unwrap_or(0)
    }

    /// Per-shard counters, breaker states and the hot keys found.
    pub fn stats(&self) -> ShardedTierStats {
        ShardedTierStats {
            shards: self
                .shards
                .iter()
                .map(|s| ShardStats {
                    name: s.name.clone(),
                    reads: s.reads.load(Ordering::Relaxed),
                    failed: s.failed.load(Ordering::Relaxed),
                    gutter_reads: s.gutter_reads.load(Ordering::Relaxed),
                    copy_reads: s.copy_reads.load(Ordering::Relaxed),
                    doubted: s.doubted.load(Ordering::Relaxed),
                    breaker: s.breaker.state(),
                })
                .collect(),
            hot_keys: self.hot.report(),
            copies_filled: self.copies_filled.load(Ordering::Relaxed),
        }
    }

    /// The first `k` candidates of `key`.
    fn candidates(&self, key: &str, k: usize) -> Vec<usize> {
        self.placement.candidates(key, k)
    }

    /// How many candidates every key delete and lock covers.
    fn spread(&self) -> usize {
        let gutter = if self.gutter.is_some() { 2 } else { 1 };
        self.copies.max(gutter).min(self.shards.len())
    }

    /// The name of `namespace` on each shard (computed once per namespace).
    fn names_of(&self, namespace: &str) -> Arc<[String]> {
        if let Some(names) = self.name_cache.read().get(namespace) {
            return names.clone();
        }
        let n = self.shards.len();
        let names: Arc<[String]> = (0..n).map(|i| self.naming.namespace(namespace, i, n)).collect();
        self.name_cache.write().insert(namespace.to_owned(), names.clone());
        names
    }
}

/// Builds a [`ShardedTier`].
pub struct ShardedTierBuilder {
    shards: Vec<(String, Arc<dyn Tier>)>,
    naming: Arc<dyn ShardNaming>,
    copies: usize,
    hot_share: f64,
    hot_min_reads: u64,
    hot_window: u64,
    gutter: Option<Duration>,
    shard_timeout: Duration,
    doubt_window: Duration,
    breaker: BreakerConfig,
}

impl Default for ShardedTierBuilder {
    fn default() -> Self {
        ShardedTierBuilder {
            shards: Vec::new(),
            naming: Arc::new(SameName),
            copies: 1,
            hot_share: 0.01,
            hot_min_reads: 64,
            hot_window: 10_000,
            gutter: None,
            shard_timeout: Duration::from_millis(30),
            doubt_window: Duration::from_secs(2),
            breaker: BreakerConfig::default(),
        }
    }
}

impl ShardedTierBuilder {
    /// Adds a shard named `name` (a server of a ring: name it by something that stays
    /// when its address changes, as placement follows the names).
    pub fn shard(mut self, name: impl Into<String>, tier: Arc<dyn Tier>) -> Self {
        self.shards.push((name.into(), tier));
        self
    }

    /// Splits one tier into `count` virtual shards named by `naming` (each shard of a
    /// namespace is then a namespace of its own on `tier`): how a Redis Cluster spreads
    /// a namespace over its slots. Replaces any shards added before.
    pub fn virtual_shards(mut self, tier: Arc<dyn Tier>, count: usize, naming: impl ShardNaming) -> Self {
        self.shards = (0..count).map(|i| (format!("v{i}"), tier.clone())).collect();
        self.naming = Arc::new(naming);
        self
    }

    /// Hot keys are kept on their first `copies` candidates (default 1: no copies).
    /// Every key delete then covers `copies` shards.
    pub fn hot_key_copies(mut self, copies: usize) -> Self {
        self.copies = copies;
        self
    }

    /// A key is hot when it takes at least `share` of this instance's recent L2
    /// lookups (default 0.01) and at least `min_reads` of them (default 64).
    pub fn hot_key_share(mut self, share: f64, min_reads: u64) -> Self {
        self.hot_share = share;
        self.hot_min_reads = min_reads;
        self
    }

    /// Fails reads of a shard that is down over to the key's next candidate, where
    /// fills live at most `ttl` (see the module docs). Default: no gutter.
    pub fn gutter(mut self, ttl: Duration) -> Self {
        self.gutter = Some(ttl);
        self
    }

    /// How long a call waits for one shard before counting it failed (toward that
    /// shard's breaker) and, for a read with a gutter, asking the next candidate
    /// (default 30 ms; keep it below the cache's `l2_timeout`, 50 ms by default, so
    /// the gutter answers in time and a shard that stopped answering is noticed by its
    /// own breaker rather than only by the cache's).
    pub fn shard_timeout(mut self, timeout: Duration) -> Self {
        self.shard_timeout = timeout;
        self
    }

    /// For this long after a call to a shard failed, entries of that shard created
    /// before the failure are read as misses (and reloaded, their fill guarded from
    /// the entry's own stamp). Default 2 s; zero turns it off.
    ///
    /// Why: while a shard was unreachable, writers' deletes of its keys failed and wait
    /// in their caches' retry buffers, and the backplane that would tell readers so may
    /// have been down with it (on a Cluster, a failed-over master can carry both). The
    /// first reads after it comes back must not trust what it kept until those retries
    /// landed; keep the window above the time a retry takes (the cache retries every
    /// 100 ms, past its breakers).
    pub fn doubt_after_failure(mut self, window: Duration) -> Self {
        self.doubt_window = window;
        self
    }

    /// The settings of each shard's circuit breaker.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Checks the settings and builds the tier.
    pub fn build(self) -> std::result::Result<ShardedTier, BuildError> {
        let n = self.shards.len();
        if n == 0 {
            return Err(BuildError::new(
                "shards",
                "no shard was added",
                "add shards with .shard() or .virtual_shards()",
            ));
        }
        if n > route::MAX_SHARDS {
            return Err(BuildError::new(
                "shards",
                format!("{n} shards"),
                format!("use at most {} shards", route::MAX_SHARDS),
            ));
        }
        let mut names: Vec<&str> = self.shards.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(BuildError::new(
                "shard",
                format!("two shards are named `{}`", w[0]),
                "give every shard its own name",
            ));
        }
        if self.copies == 0 || self.copies > n.min(8) {
            return Err(BuildError::new(
                "hot_key_copies",
                format!("{} copies over {n} shards", self.copies),
                format!("use 1 (no copies) to {}", n.min(8)),
            ));
        }
        if !(self.hot_share > 0.0 && self.hot_share <= 1.0) {
            return Err(BuildError::new(
                "hot_key_share",
                format!("share {}", self.hot_share),
                "use a share in (0, 1], such as 0.01",
            ));
        }
        if self.gutter.is_some_and(|t| t.is_zero()) {
            return Err(BuildError::new("gutter", "a zero time to live", "use for example 10s"));
        }
        if self.shard_timeout.is_zero() {
            return Err(BuildError::new("shard_timeout", "zero", "use for example 30ms"));
        }
        self.breaker.validate()?;
        let tombstone_ttl = self.shards.iter().map(|(_, t)| t.tombstone_ttl()).min().unwrap_or_default();
        let shards: Vec<Shard> = self
            .shards
            .into_iter()
            .map(|(name, tier)| Shard {
                breaker: CircuitBreaker::new(format!("shard {name}"), self.breaker.clone()),
                name,
                tier,
                reads: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                failed_at: AtomicU64::new(0),
                doubted: AtomicU64::new(0),
                gutter_reads: AtomicU64::new(0),
                copy_reads: AtomicU64::new(0),
            })
            .collect();
        Ok(ShardedTier {
            placement: route::Placement::new(&shards.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()),
            shards,
            naming: self.naming,
            name_cache: RwLock::new(HashMap::new()),
            copies: self.copies,
            gutter: self.gutter,
            shard_timeout: self.shard_timeout,
            doubt_window: self.doubt_window,
            hot: HotKeys::new(self.hot_window, self.hot_share, self.hot_min_reads),
            pending: PendingCopies::new(tombstone_ttl, self.copies > 1),
            copies_filled: AtomicU64::new(0),
            tombstone_ttl,
        })
    }
}

impl ShardedTier {
    /// Runs a call on one shard through its breaker, within the shard timeout.
    async fn on_shard<T, F>(&self, shard: usize, call: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let s = &self.shards[shard];
        let timeout = self.shard_timeout;
        let out = s.breaker.call(bounded(timeout, call)).await;
        self.outcome(shard, out)
    }

    /// Runs an invalidation or a lock on one shard *past* its breaker (recording the
    /// outcome): a cache retries failed invalidations every 100 ms so that other
    /// instances stop reading what they cover as soon as the shard is back, which must
    /// not wait for this shard's breaker to cool down. A success closes the breaker.
    async fn on_shard_write<T, F>(&self, shard: usize, call: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let out = bounded(self.shard_timeout, call).await;
        let s = &self.shards[shard];
        s.breaker.record(out.as_ref().map_or_else(|e| !e.is_transient(), |_| true));
        self.outcome(shard, out)
    }

    /// Counts a failure, remembers when, and says whether the rest of the tier is up.
    fn outcome<T>(&self, shard: usize, out: Result<T>) -> Result<T> {
        let s = &self.shards[shard];
        match out {
            Err(e) if e.is_transient() && !e.is_shard_down() => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                s.failed_at.store(SystemClock::default().now().0, Ordering::Relaxed);
                let others_up = self
                    .shards
                    .iter()
                    .enumerate()
                    .any(|(i, o)| i != shard && o.breaker.state() == BreakerState::Closed);
                if others_up {
                    let context = format!("shard {} of the sharded tier: {}", s.name, e.context());
                    Err(crate::error::Error::new(crate::error::ErrorKind::ShardDown, context).with_source(e))
                } else {
                    Err(e)
                }
            }
            Err(e) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            ok => ok,
        }
    }

    /// Whether an entry of `shard` must not be served: it predates the shard's last
    /// failure, which is recent (see [`ShardedTierBuilder::doubt_after_failure`]).
    fn doubts(&self, shard: usize, created: Timestamp) -> bool {
        let failed_at = self.shards[shard].failed_at.load(Ordering::Relaxed);
        if failed_at == 0 || self.doubt_window.is_zero() {
            return false;
        }
        let now = SystemClock::default().now();
        now.since(Timestamp(failed_at)) < self.doubt_window && created.0 < failed_at
    }
}

/// `call` within `timeout`.
async fn bounded<T>(timeout: Duration, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(crate::error::Error::timeout("sharded tier: shard call", timeout)))
}
