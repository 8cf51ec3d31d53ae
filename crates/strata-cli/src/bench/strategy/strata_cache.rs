//! `strata`: the library as designed. One `Cache` handle per instance, each with its own
//! L1, sharing one L2 tier and one backplane: `InProcessTier` + `InProcessBackplane`
//! (one connection per instance) by default; with `--redis`, a `RedisTier` and a
//! `RedisStreamBackplane` per instance (each with its own connections, as separate
//! processes would have), all under a prefix unique to the run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use strata::backplane::Backplane;
use strata::tier::Tier;
use strata::{Cache, Consistency, InProcessBackplane, InProcessTier, WarmUp};
use strata_redis::{RedisStreamBackplane, RedisTier};

use super::{FleetConfig, INVALIDATED_TTL, Strategy, TierCounts, delete_prefix};
use crate::bench::db::{Db, Row};
use crate::bench::scenario::Scenario;
use crate::secret::SecretUrl;

/// The shared tier and backplane of the fleet, for counting their operations.
enum Remote {
    InProcess {
        tier: InProcessTier,
        hub: InProcessBackplane,
    },
    Redis {
        url: SecretUrl,
        prefix: String,
        tiers: Mutex<Vec<RedisTier>>,
        backplanes: Mutex<Vec<RedisStreamBackplane>>,
    },
}

/// A fleet of strata caches.
pub struct StrataCache {
    db: Arc<Db>,
    /// Behind a lock only so that `rejoin` can replace an instance.
    caches: RwLock<Vec<Cache<u64, Row>>>,
    /// Instances replaced by `rejoin`, kept for their counters.
    retired: Mutex<Vec<Cache<u64, Row>>>,
    remote: Remote,
    cfg: FleetConfig,
}

impl StrataCache {
    /// Builds one cache per instance and waits until every one is ready (subscribed).
    pub async fn start(cfg: &FleetConfig) -> Result<StrataCache> {
        let mut caches = Vec::with_capacity(cfg.instances);
        let remote = match &cfg.redis {
            None => {
                let tier = InProcessTier::new();
                let hub = InProcessBackplane::new();
                for i in 0..cfg.instances {
                    caches.push(build_cache(cfg, i, Arc::new(tier.clone()), Arc::new(hub.connect()))?);
                }
                Remote::InProcess { tier, hub }
            }
            Some(url) => {
                let prefix = cfg.run_id.clone();
                let mut tiers = Vec::with_capacity(cfg.instances);
                let mut backplanes = Vec::with_capacity(cfg.instances);
                for i in 0..cfg.instances {
                    let (tier, backplane) = connect(url, &prefix).await?;
                    caches.push(build_cache(cfg, i, Arc::new(tier.clone()), Arc::new(backplane.clone()))?);
                    tiers.push(tier);
                    backplanes.push(backplane);
                }
                Remote::Redis {
                    url: url.clone(),
                    prefix,
                    tiers: Mutex::new(tiers),
                    backplanes: Mutex::new(backplanes),
                }
            }
        };
        for c in &caches {
            c.ready().await;
        }
        Ok(StrataCache {
            db: cfg.db.clone(),
            caches: RwLock::new(caches),
            retired: Mutex::new(Vec::new()),
            remote,
            cfg: cfg.clone(),
        })
    }

    fn cache(&self, instance: usize) -> Result<Cache<u64, Row>> {
        self.caches.read().get(instance).cloned().ok_or_else(|| anyhow!("no instance {instance}"))
    }

    /// Every cache built so far, replaced ones included (for the counters).
    fn all_caches(&self) -> Vec<Cache<u64, Row>> {
        let mut all = self.caches.read().clone();
        all.extend(self.retired.lock().iter().cloned());
        all
    }
}

async fn connect(url: &SecretUrl, prefix: &str) -> Result<(RedisTier, RedisStreamBackplane)> {
    let tier = RedisTier::builder(url.expose())
        .prefix(prefix)
        .build()
        .await
        .with_context(|| format!("cannot connect strata's RedisTier to {url}"))?;
    let backplane = RedisStreamBackplane::builder(url.expose())
        .prefix(prefix)
        .share_connection(&tier)
        .build()
        .await
        .with_context(|| format!("cannot connect strata's RedisStreamBackplane to {url}"))?;
    Ok((tier, backplane))
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

    async fn rejoin(&self, instance: usize) -> Result<()> {
        let cache = match &self.remote {
            Remote::InProcess { tier, hub } => {
                build_cache(&self.cfg, instance, Arc::new(tier.clone()), Arc::new(hub.connect()))?
            }
            Remote::Redis { url, prefix, tiers, backplanes } => {
                let (tier, backplane) = connect(url, prefix).await?;
                let cache =
                    build_cache(&self.cfg, instance, Arc::new(tier.clone()), Arc::new(backplane.clone()))?;
                tiers.lock().push(tier);
                backplanes.lock().push(backplane);
                cache
            }
        };
        // Serves only once ready (subscribed; warmed up with --warm-up), as behind a
        // readiness probe; meanwhile the old instance keeps serving.
        cache.ready().await;
        let old = {
            let mut caches = self.caches.write();
            let slot = caches.get_mut(instance).ok_or_else(|| anyhow!("no instance {instance}"))?;
            std::mem::replace(slot, cache)
        };
        old.shutdown().await;
        self.retired.lock().push(old);
        Ok(())
    }

    fn tier_counts(&self) -> TierCounts {
        let (l1_hits, l2_hits) = self
            .all_caches()
            .iter()
            .map(Cache::stats)
            .fold((0, 0), |(l1, l2), s| (l1 + s.l1_hits, l2 + s.l2_hits));
        let remote_ops = match &self.remote {
            Remote::InProcess { tier, hub } => tier.ops() + hub.published(),
            // Tier round trips + XADDs + one XREAD per delivered message (an upper
            // bound: a read may return several; idle XREADs, one per second and
            // subscriber, are not counted).
            Remote::Redis { tiers, backplanes, .. } => {
                tiers.lock().iter().map(RedisTier::ops).sum::<u64>()
                    + backplanes.lock().iter().map(|b| b.stats().published + b.stats().delivered).sum::<u64>()
            }
        };
        TierCounts { l1_hits, l2_hits, remote_ops }
    }

    fn details(&self) -> Option<serde_json::Value> {
        let mut sum = serde_json::Map::new();
        for stats in self.all_caches().iter().map(Cache::stats) {
            let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(stats) else { continue };
            for (name, value) in fields {
                let add = value.as_u64().unwrap_or(0);
                let total = sum.get(&name).and_then(serde_json::Value::as_u64).unwrap_or(0);
                sum.insert(name, (total + add).into());
            }
        }
        match &self.remote {
            Remote::InProcess { tier, hub } => {
                sum.insert("tier_ops".into(), tier.ops().into());
                sum.insert("backplane_published".into(), hub.published().into());
            }
            Remote::Redis { tiers, backplanes, .. } => {
                sum.insert("tier_ops".into(), tiers.lock().iter().map(RedisTier::ops).sum::<u64>().into());
                let backplanes = backplanes.lock();
                let bp = backplanes.iter().map(RedisStreamBackplane::stats);
                let (published, delivered) = bp.fold((0, 0), |(p, d), s| (p + s.published, d + s.delivered));
                sum.insert("backplane_published".into(), published.into());
                sum.insert("backplane_delivered".into(), delivered.into());
            }
        }
        Some(serde_json::Value::Object(sum))
    }

    async fn close(&self) -> Result<()> {
        for c in self.all_caches() {
            c.shutdown().await;
        }
        if let Remote::Redis { url, prefix, .. } = &self.remote {
            delete_prefix(url, prefix).await?;
        }
        Ok(())
    }
}

/// One instance's cache.
fn build_cache(
    cfg: &FleetConfig,
    instance: usize,
    tier: Arc<dyn Tier>,
    backplane: Arc<dyn Backplane>,
) -> Result<Cache<u64, Row>> {
    let mut builder = Cache::<u64, Row>::builder(cfg.scenario.name())
        .tier(tier)
        .backplane(backplane)
        .max_capacity(cfg.capacity)
        .ttl(INVALIDATED_TTL)
        .version(|row: &Row| Some(row.version))
        .seed(cfg.seed.wrapping_add(instance as u64));
    if cfg.warm_up {
        // Reports every second: the bench's runs last seconds, not hours.
        builder = builder.warm_up(WarmUp::new().report_every(Duration::from_secs(1)));
    }
    if cfg.scenario == Scenario::Payment {
        // The payment story asks for read-your-writes across the fleet.
        builder = builder.consistency(Consistency::Strong);
    }
    builder.build().map_err(|e| anyhow!("cannot build strata cache: {e}"))
}
