//! `multi-tier`: the published crate `multi-tier-cache` (0.6), the Rust library that
//! does strata's job, set up for a fleet the way its README's "Cross-Instance
//! Invalidation" section does it: per instance, one `CacheManager::new_with_invalidation`
//! over its own moka L1 (`L1Cache`) and its own connection to the shared Redis L2
//! (`L2Cache::with_url`), invalidations on one Pub/Sub channel. A read is
//! `get_or_compute_typed` (L1, then L2 with promotion to L1, then the DB, with the
//! crate's per-instance stampede protection); a write commits, then `invalidate` (the
//! README's "Remove" strategy: DEL in L2, drop in L1, PUBLISH; every other instance's
//! subscriber drops its L1 copy and DELs the L2 key again).
//!
//! TTL: `CacheStrategy::Custom(24 h)` on every fill (L1 and L2, as strata's safety net);
//! the moka L1 is built with a 24 h time-to-live and time-to-idle (the crate's default
//! idle time, 2 min, would expire copies that strata keeps). A copy promoted from L2
//! keeps the key's remaining Redis TTL. The crate has no key prefix option: the keys
//! are `{run}:multi-tier:{id}` (built here), the channel `{run}:multi-tier:invalidate`;
//! `close` deletes the keys. No audit stream (the crate's default).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use multi_tier_cache::{
    CacheError, CacheManager, CacheStrategy, InvalidationConfig, L1Cache, L2Cache, MokaCacheConfig,
};
use parking_lot::{Mutex, RwLock};

use super::{FleetConfig, Strategy, TierCounts, delete_prefix};
use crate::bench::db::{Db, Row};
use crate::secret::SecretUrl;

/// How long `start` and `rejoin` wait for the instances' subscribers to be listening.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A fleet of `multi-tier-cache` managers sharing one Redis.
pub struct MultiTier {
    db: Arc<Db>,
    /// Behind a lock only so that `rejoin` can replace an instance.
    managers: RwLock<Vec<Arc<CacheManager>>>,
    /// Counters of the instances replaced by `rejoin`.
    retired: Mutex<Snapshot>,
    url: SecretUrl,
    prefix: String,
    channel: String,
    capacity: u64,
    ttl: Duration,
}

impl MultiTier {
    /// Builds one cache manager per instance and waits until every instance's
    /// invalidation subscriber is listening (the crate subscribes in a background task
    /// and does not say when it is done; `PUBSUB NUMSUB` does).
    pub async fn start(cfg: &FleetConfig) -> Result<MultiTier> {
        let url = cfg.redis.clone().context("multi-tier needs --redis (one server)")?;
        let fleet = MultiTier {
            db: cfg.db.clone(),
            managers: RwLock::new(Vec::new()),
            retired: Mutex::new(Snapshot::default()),
            prefix: format!("{}:multi-tier:", cfg.run_id),
            channel: format!("{}:multi-tier:invalidate", cfg.run_id),
            url,
            capacity: cfg.capacity,
            ttl: cfg.ttl,
        };
        let mut managers = Vec::with_capacity(cfg.instances);
        for _ in 0..cfg.instances {
            managers.push(fleet.manager().await?);
        }
        *fleet.managers.write() = managers;
        fleet.wait_subscribers(|n| n >= cfg.instances).await?;
        Ok(fleet)
    }

    /// One instance: its own moka L1, its own connections to Redis.
    async fn manager(&self) -> Result<Arc<CacheManager>> {
        let l1 = L1Cache::new(MokaCacheConfig {
            max_capacity: self.capacity,
            time_to_live: self.ttl,
            time_to_idle: self.ttl,
        })
        .map_err(|e| anyhow!("cannot build the moka L1: {e}"))?;
        let l2 = L2Cache::with_url(self.url.expose())
            .await
            .map_err(|e| anyhow!("cannot connect the L2 to Redis at {}: {e}", self.url))?;
        let config = InvalidationConfig { channel: self.channel.clone(), ..InvalidationConfig::default() };
        let manager =
            CacheManager::new_with_invalidation(Arc::new(l1), Arc::new(l2), self.url.expose(), config)
                .await
                .map_err(|e| anyhow!("cannot start invalidation on Redis at {}: {e}", self.url))?;
        Ok(Arc::new(manager))
    }

    /// Waits until the number of subscribers of the channel satisfies `ok`.
    async fn wait_subscribers(&self, ok: impl Fn(usize) -> bool) -> Result<()> {
        let client =
            redis::Client::open(self.url.expose()).with_context(|| format!("bad Redis URL {}", self.url))?;
        let mut conn = client.get_multiplexed_async_connection().await.context("cannot connect to Redis")?;
        let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
        loop {
            let (_, n): (String, usize) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&self.channel)
                .query_async(&mut conn)
                .await
                .context("PUBSUB NUMSUB failed")?;
            if ok(n) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("multi-tier: {n} subscribers on the invalidation channel after {SUBSCRIBE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn instance(&self, instance: usize) -> Result<Arc<CacheManager>> {
        self.managers.read().get(instance).cloned().ok_or_else(|| anyhow!("no instance {instance}"))
    }

    fn key(&self, key: u64) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// The crate's counters of one instance or more.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    tiers: TierCounts,
    requests: u64,
    misses: u64,
    promotions: u64,
    sent: u64,
    received: u64,
}

impl Snapshot {
    /// Reads one instance's counters. Remote commands are estimated from them (the
    /// crate does not count its Redis calls): every L1 miss that leads a load sends GET
    /// and PTTL (one pipeline, counted as 2); a DB load then PSETEX; an `invalidate` DEL
    /// and PUBLISH; each invalidation received DEL again.
    fn of(manager: &CacheManager) -> Snapshot {
        let stats = manager.get_stats();
        let inval = manager.invalidation_stats().unwrap_or_default();
        Snapshot {
            tiers: TierCounts {
                l1_hits: stats.l1_hits,
                l2_hits: stats.l2_hits,
                remote_ops: 2 * (stats.l2_hits + stats.misses)
                    + stats.misses
                    + 2 * inval.messages_sent
                    + inval.messages_received,
            },
            requests: stats.total_requests,
            misses: stats.misses,
            promotions: stats.promotions as u64,
            sent: inval.messages_sent,
            received: inval.messages_received,
        }
    }

    fn add(self, o: Snapshot) -> Snapshot {
        Snapshot {
            tiers: TierCounts {
                l1_hits: self.tiers.l1_hits + o.tiers.l1_hits,
                l2_hits: self.tiers.l2_hits + o.tiers.l2_hits,
                remote_ops: self.tiers.remote_ops + o.tiers.remote_ops,
            },
            requests: self.requests + o.requests,
            misses: self.misses + o.misses,
            promotions: self.promotions + o.promotions,
            sent: self.sent + o.sent,
            received: self.received + o.received,
        }
    }
}

impl MultiTier {
    /// The counters of every instance so far, retired ones included.
    fn snapshot(&self) -> Snapshot {
        let live = self.managers.read().iter().fold(Snapshot::default(), |acc, m| acc.add(Snapshot::of(m)));
        self.retired.lock().add(live)
    }
}

#[async_trait]
impl Strategy for MultiTier {
    fn name(&self) -> &'static str {
        "multi-tier"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.ttl)
    }

    fn invalidates(&self) -> bool {
        true
    }

    async fn read(&self, instance: usize, key: u64) -> Result<Row> {
        let manager = self.instance(instance)?;
        let db = self.db.clone();
        manager
            .get_or_compute_typed(&self.key(key), CacheStrategy::Custom(self.ttl), || async move {
                db.read(key).await.map_err(|e| CacheError::BackendError(format!("{e:#}")))
            })
            .await
            .map_err(|e| anyhow!("multi-tier read of row {key} failed: {e}"))
    }

    async fn write(&self, instance: usize, key: u64, value: &str) -> Result<u64> {
        let manager = self.instance(instance)?;
        let version = self.db.write(key, value).await?;
        manager.invalidate(&self.key(key)).await.map_err(|e| anyhow!("multi-tier invalidate failed: {e}"))?;
        Ok(version)
    }

    fn tier_counts(&self) -> TierCounts {
        self.snapshot().tiers
    }

    async fn invalidate_all(&self) -> Result<bool> {
        let manager = self.instance(0)?;
        let pattern = format!("{}*", self.prefix);
        manager
            .invalidate_pattern(&pattern)
            .await
            .map_err(|e| anyhow!("multi-tier invalidate_pattern failed: {e}"))?;
        Ok(true)
    }

    async fn rejoin(&self, instance: usize, _warm: bool) -> Result<()> {
        let n = self.managers.read().len();
        if instance >= n {
            bail!("no instance {instance}");
        }
        // The new instance serves once its subscriber listens beside the old one's.
        let new = self.manager().await?;
        self.wait_subscribers(|s| s > n).await?;
        let old = std::mem::replace(&mut self.managers.write()[instance], new);
        // The old one's subscriber stops when the last request holding it returns.
        let retired = self.retired.lock().add(Snapshot::of(&old));
        *self.retired.lock() = retired;
        Ok(())
    }

    fn details(&self) -> Option<serde_json::Value> {
        let s = self.snapshot();
        Some(serde_json::json!({
            "crate": "multi-tier-cache 0.6",
            "requests": s.requests,
            "misses": s.misses,
            "promotions": s.promotions,
            "invalidations_sent": s.sent,
            "invalidations_received": s.received,
        }))
    }

    async fn close(&self) -> Result<()> {
        // Dropping a manager shuts its subscriber down; its counters stay for the report.
        let live: Vec<Arc<CacheManager>> = std::mem::take(&mut *self.managers.write());
        let total = live.iter().fold(*self.retired.lock(), |acc, m| acc.add(Snapshot::of(m)));
        *self.retired.lock() = total;
        drop(live);
        delete_prefix(&self.url, &self.prefix).await
    }
}
