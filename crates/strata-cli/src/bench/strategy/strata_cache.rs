//! `strata`: the library as designed. One `Cache` handle per instance, each with its own
//! L1, sharing one L2 tier and one backplane: `InProcessTier` + `InProcessBackplane`
//! (one connection per instance) by default.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use strata::{Cache, Consistency, InProcessBackplane, InProcessTier};

use super::{FleetConfig, INVALIDATED_TTL, Strategy, TierCounts};
use crate::bench::Scenario;
use crate::bench::db::{Db, Row};

/// The shared tier and backplane of the fleet, for counting their operations.
enum Remote {
    InProcess { tier: InProcessTier, hub: InProcessBackplane },
}

/// A fleet of strata caches.
pub struct StrataCache {
    db: Arc<Db>,
    caches: Vec<Cache<u64, Row>>,
    remote: Remote,
}

impl StrataCache {
    /// Builds one cache per instance and waits until every one is ready (subscribed).
    pub async fn start(cfg: &FleetConfig) -> Result<StrataCache> {
        if cfg.redis.is_some() {
            bail!(
                "strata over Redis needs the strata-redis crate (RedisTier + RedisStreamBackplane), \
                 which has not landed in this workspace yet; run without --redis"
            );
        }
        let tier = InProcessTier::new();
        let hub = InProcessBackplane::new();
        let mut caches = Vec::with_capacity(cfg.instances);
        for i in 0..cfg.instances {
            let mut builder = Cache::<u64, Row>::builder(cfg.scenario.name())
                .tier(Arc::new(tier.clone()))
                .backplane(Arc::new(hub.connect()))
                .max_capacity(cfg.capacity)
                .time_to_live(INVALIDATED_TTL)
                .version(|row: &Row| Some(row.version))
                .seed(cfg.seed.wrapping_add(i as u64));
            if cfg.scenario == Scenario::Payment {
                // The payment story asks for read-your-writes across the fleet.
                builder = builder.consistency(Consistency::Strong);
            }
            caches.push(builder.build().map_err(|e| anyhow!("cannot build strata cache: {e}"))?);
        }
        for c in &caches {
            c.ready().await;
        }
        Ok(StrataCache { db: cfg.db.clone(), caches, remote: Remote::InProcess { tier, hub } })
    }

    fn cache(&self, instance: usize) -> Result<&Cache<u64, Row>> {
        self.caches.get(instance).ok_or_else(|| anyhow!("no instance {instance}"))
    }
}

#[async_trait]
impl Strategy for StrataCache {
    fn name(&self) -> &'static str {
        "strata"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(INVALIDATED_TTL)
    }

    fn invalidates(&self) -> bool {
        true
    }

    async fn read(&self, instance: usize, key: u64) -> Result<Row> {
        let db = self.db.clone();
        let row = self
            .cache(instance)?
            .get_or_load(&key, move || async move { db.read(key).await.map(Some) })
            .await?;
        row.ok_or_else(|| anyhow!("row {key} is missing"))
    }

    async fn write(&self, instance: usize, key: u64, value: &str) -> Result<u64> {
        let version = self.db.write(key, value).await?;
        self.cache(instance)?.invalidate(&key).await?;
        Ok(version)
    }

    fn tier_counts(&self) -> TierCounts {
        let (l1_hits, l2_hits) =
            self.caches.iter().map(Cache::stats).fold((0, 0), |(l1, l2), s| (l1 + s.l1_hits, l2 + s.l2_hits));
        let remote_ops = match &self.remote {
            Remote::InProcess { tier, hub } => tier.ops() + hub.published(),
        };
        TierCounts { l1_hits, l2_hits, remote_ops }
    }

    async fn close(&self) -> Result<()> {
        for c in &self.caches {
            c.shutdown().await;
        }
        Ok(())
    }
}
