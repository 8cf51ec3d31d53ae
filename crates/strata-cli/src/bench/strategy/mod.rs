//! The caching strategies compared, each behind [`Strategy`]: a fleet of app instances
//! (each with its own local cache, where the strategy has one) that reads and writes
//! rows of the benchmark's table.

mod local_ttl;
mod multi_tier;
mod near_pubsub;
mod no_cache;
mod redis_global;
mod strata_cache;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;

pub use local_ttl::LocalTtl;
pub use multi_tier::MultiTier;
pub use near_pubsub::NearPubSub;
pub use no_cache::NoCache;
pub use redis_global::RedisGlobal;
pub use strata_cache::StrataCache;

use super::db::{Db, Row};
use super::lag::LagSummary;
use super::scenario::Scenario;
use crate::secret::SecretUrl;

/// Counters a strategy keeps about its tiers, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounts {
    /// Reads answered by the instance's own local cache.
    pub l1_hits: u64,
    /// Reads answered by the shared tier (Redis, or strata's in-process tier).
    pub l2_hits: u64,
    /// Calls to the shared tier and the backplane (Redis commands, or their
    /// in-process equivalents), counted client-side.
    pub remote_ops: u64,
}

/// A fleet of app instances using one caching strategy.
#[async_trait]
pub trait Strategy: Send + Sync {
    /// The strategy's name in reports.
    fn name(&self) -> &'static str;

    /// How long a cached copy lives without an invalidation (`None`: nothing is cached).
    fn ttl(&self) -> Option<Duration>;

    /// Whether writes invalidate cached copies (so each write of a key forces a reload).
    fn invalidates(&self) -> bool;

    /// Reads row `key` on instance `instance`.
    async fn read(&self, instance: usize, key: u64) -> Result<Row>;

    /// Writes row `key` on instance `instance` through the app: DB commit, then the
    /// strategy's invalidation. Returns the new version once both have returned.
    async fn write(&self, instance: usize, key: u64, value: &str) -> Result<u64>;

    /// The tier counters so far.
    fn tier_counts(&self) -> TierCounts;

    /// Replaces instance `instance` by a new one that starts with an empty local cache
    /// (`--join-at`: a restart or a scale-out in the middle of the run); returns once
    /// the new instance serves. `warm` (`--warm-join-at`): the new instance warms up
    /// before it serves, where the strategy can. Default: the strategy keeps nothing
    /// per instance.
    async fn rejoin(&self, instance: usize, warm: bool) -> Result<()> {
        let _ = (instance, warm);
        Ok(())
    }

    /// Invalidates everything cached, on every instance (`--bulk-invalidate-at`: a
    /// namespace or tag flush). Returns false when the strategy has no such operation
    /// (the default).
    async fn invalidate_all(&self) -> Result<bool> {
        Ok(false)
    }

    /// The propagation lag of the writes since the last call (and starts over), for
    /// strategies whose instances drop copies on another's invalidation; `None` for the
    /// others.
    fn propagation(&self) -> Option<LagSummary> {
        None
    }

    /// Strategy-specific counters for the JSON report (strata: its `CacheStats`, summed
    /// over the fleet).
    fn details(&self) -> Option<serde_json::Value> {
        None
    }

    /// Stops background work and removes what the strategy stored outside the process.
    async fn close(&self) -> Result<()>;
}

/// The strategies, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum StrategyKind {
    /// Every read goes to the database.
    None,
    /// A per-instance moka cache with a 5 s TTL and no invalidation.
    LocalTtl,
    /// Cache-aside on one Redis: GET per read, DEL on write (needs `--redis`).
    RedisGlobal,
    /// Per-instance moka cache (24 h TTL) + invalidation broadcast, no fill guards, no
    /// gap repair: the seed story's hand-written fix.
    NearPubsub,
    /// The strata library.
    Strata,
    /// The published crate `multi-tier-cache` (moka L1 + Redis L2 + Pub/Sub
    /// invalidation), one cache manager per instance (needs `--redis`).
    MultiTier,
}

impl StrategyKind {
    /// Every strategy, in run order.
    pub const ALL: [StrategyKind; 6] = [
        StrategyKind::None,
        StrategyKind::LocalTtl,
        StrategyKind::RedisGlobal,
        StrategyKind::NearPubsub,
        StrategyKind::Strata,
        StrategyKind::MultiTier,
    ];

    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::None => "none",
            StrategyKind::LocalTtl => "local-ttl",
            StrategyKind::RedisGlobal => "redis-global",
            StrategyKind::NearPubsub => "near-pubsub",
            StrategyKind::Strata => "strata",
            StrategyKind::MultiTier => "multi-tier",
        }
    }

    /// Whether it can only run against a real Redis.
    pub fn needs_redis(self) -> bool {
        matches!(self, StrategyKind::RedisGlobal | StrategyKind::MultiTier)
    }

    /// Whether it can only run against one Redis server (`--redis`, not a ring or a
    /// Cluster): `multi-tier-cache` has no sharding.
    pub fn needs_single_redis(self) -> bool {
        self == StrategyKind::MultiTier
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every strategy is built from.
#[derive(Clone)]
pub struct FleetConfig {
    /// The database.
    pub db: Arc<Db>,
    /// The scenario.
    pub scenario: Scenario,
    /// Number of app instances.
    pub instances: usize,
    /// Local cache capacity per instance (entries).
    pub capacity: u64,
    /// `--redis`: the Redis URL, when given.
    pub redis: Option<SecretUrl>,
    /// A prefix unique to this run, for keys, channels and namespaces in Redis.
    pub run_id: String,
    /// The seed (strata's jitter and early-refresh draws are seeded from it).
    pub seed: u64,
    /// `--warm-up`: strata's caches rank their hot keys and a joining one preloads them.
    pub warm_up: bool,
    /// `--redis-ring` (standalone servers that strata shards over with a `ShardedTier`
    /// and redis-global routes to by the same placement) or `--redis-cluster` (the
    /// Cluster's nodes).
    pub nodes: Vec<SecretUrl>,
    /// True when `nodes` are a Redis Cluster's (`--redis-cluster`).
    pub cluster: bool,
    /// `--redis-backplane`: the ring's stream backplane on its own server.
    pub backplane: Option<SecretUrl>,
    /// `--hot-key-copies`: how many servers of the ring hold a hot key (strata).
    pub hot_key_copies: usize,
    /// `--warm-join-at` was given: strata's caches rank their hot keys from the start,
    /// so that the warm joiner has something to preload.
    pub warm_joins: bool,
    /// `--l2-timeout`: strata's timeout of each L2 call [default: the library's].
    pub l2_timeout: Option<Duration>,
    /// `--l2-busy-timeout`: how long strata waits for a busy tier [default: the library's].
    pub l2_busy_timeout: Option<Duration>,
    /// `--ttl`: how long the invalidated caches (near-pubsub, strata, redis-global,
    /// multi-tier) keep a copy [default: [`INVALIDATED_TTL`]].
    pub ttl: Duration,
}

impl FleetConfig {
    /// The Redis servers the shared tier lives on: `--redis`, the ring's or the
    /// Cluster's.
    pub fn redis_urls(&self) -> Option<Vec<SecretUrl>> {
        match (&self.redis, self.nodes.is_empty()) {
            (Some(url), _) => Some(vec![url.clone()]),
            (None, false) => Some(self.nodes.clone()),
            (None, true) => None,
        }
    }
}

/// TTL of the per-instance cache of `local-ttl` (the "Caffeine 5 s" baseline).
pub const LOCAL_TTL: Duration = Duration::from_secs(5);
/// TTL of the invalidated caches (`near-pubsub`, `strata`, `redis-global`): the seed
/// story's 24 h safety net.
pub const INVALIDATED_TTL: Duration = Duration::from_secs(24 * 3600);

/// Builds the fleet for `kind`.
pub async fn build(kind: StrategyKind, cfg: &FleetConfig) -> Result<Arc<dyn Strategy>> {
    Ok(match kind {
        StrategyKind::None => Arc::new(NoCache::new(cfg)),
        StrategyKind::LocalTtl => Arc::new(LocalTtl::new(cfg)),
        StrategyKind::RedisGlobal => Arc::new(RedisGlobal::connect(cfg).await?),
        StrategyKind::NearPubsub => Arc::new(NearPubSub::start(cfg).await?),
        StrategyKind::Strata => Arc::new(StrataCache::start(cfg).await?),
        StrategyKind::MultiTier => Arc::new(MultiTier::start(cfg).await?),
    })
}

/// Removes every Redis key under `prefix` (the run's tier entries and stream).
pub async fn delete_prefix(url: &SecretUrl, prefix: &str) -> Result<()> {
    let client = redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
    let mut conn = client.get_multiplexed_async_connection().await.context("cannot connect to Redis")?;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("Redis SCAN failed during cleanup")?;
        if !keys.is_empty() {
            // One UNLINK per key: on a Cluster node, one command over keys of several
            // slots is refused (CROSSSLOT).
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("UNLINK").arg(k).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.context("Redis UNLINK failed")?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The read path of the local-cache peers (local-ttl, near-pubsub): the instance's moka
/// cache, then the database through moka's own single-flight.
pub(crate) async fn read_through_local(
    caches: &[moka::future::Cache<u64, Row>],
    l1_hits: &std::sync::atomic::AtomicU64,
    db: &Db,
    instance: usize,
    key: u64,
) -> Result<Row> {
    let cache = caches.get(instance).ok_or_else(|| anyhow::anyhow!("no instance {instance}"))?;
    if let Some(row) = cache.get(&key).await {
        l1_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(row);
    }
    cache
        .try_get_with(key, db.read(key))
        .await
        .map_err(|e| anyhow::anyhow!("load of row {key} failed: {e:#}"))
}
