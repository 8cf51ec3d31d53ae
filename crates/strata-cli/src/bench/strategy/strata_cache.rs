//! `strata`: the library as designed. One `Cache` handle per instance, each with its own
//! L1, sharing one L2 tier and one backplane: `InProcessTier` + `InProcessBackplane`
//! (one connection per instance) by default; with `--redis`, a `RedisTier` and a
//! `RedisStreamBackplane` per instance (each with its own connections, as separate
//! processes would have), all under a prefix unique to the run; with `--redis-ring`, a
//! `ShardedTier` per instance over one `RedisTier` per server (with a gutter, and
//! `--hot-key-copies`), the stream backplane on the first server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use strata::Scope;
use strata::backplane::Backplane;
use strata::tier::Tier;
use strata::{Cache, Consistency, InProcessBackplane, InProcessTier, ShardedTier, WarmUp};
use strata_redis::{RedisStreamBackplane, RedisTier};

use super::{FleetConfig, Strategy, TierCounts, delete_prefix};
use crate::bench::db::{Db, Row};
use crate::bench::lag::{LagSummary, LagTracker};
use crate::bench::scenario::Scenario;
use crate::secret::SecretUrl;

/// The shared tier and backplane of the fleet, for counting their operations.
enum Remote {
    InProcess {
        tier: InProcessTier,
        hub: InProcessBackplane,
    },
    Redis {
        /// The servers (one, or the ring's).
        urls: Vec<SecretUrl>,
        prefix: String,
        /// Every `RedisTier` (one per instance and server).
        tiers: Mutex<Vec<RedisTier>>,
        /// The instances' sharded tiers (ring only).
        sharded: Mutex<Vec<Arc<ShardedTier>>>,
        backplanes: Mutex<Vec<RedisStreamBackplane>>,
    },
}

/// One instance's connections to Redis.
struct Connected {
    tier: Arc<dyn Tier>,
    tiers: Vec<RedisTier>,
    sharded: Option<Arc<ShardedTier>>,
    backplane: RedisStreamBackplane,
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
    lag: Arc<LagTracker>,
    /// Writes whose invalidation returned [`strata::Error::is_queued`] below the Strong
    /// level: done, their message late (reported, not failed).
    writes_queued: AtomicU64,
}

impl StrataCache {
    /// Builds one cache per instance and waits until every one is ready (subscribed).
    pub async fn start(fleet: &FleetConfig) -> Result<StrataCache> {
        // A warm join needs the fleet's ranking of hot keys from the start.
        let cfg = &FleetConfig { warm_up: fleet.warm_up || fleet.warm_joins, ..fleet.clone() };
        let mut caches = Vec::with_capacity(cfg.instances);
        let lag = Arc::new(LagTracker::new(cfg.instances)?);
        let remote = match cfg.redis_urls() {
            None => {
                let tier = InProcessTier::new();
                let hub = InProcessBackplane::new();
                for i in 0..cfg.instances {
                    caches.push(build_cache(cfg, &lag, i, Arc::new(tier.clone()), Arc::new(hub.connect()))?);
                }
                Remote::InProcess { tier, hub }
            }
            Some(urls) => {
                let prefix = cfg.run_id.clone();
                let mut tiers = Vec::new();
                let mut sharded = Vec::new();
                let mut backplanes = Vec::with_capacity(cfg.instances);
                for i in 0..cfg.instances {
                    let c = connect(&urls, &prefix, cfg).await?;
                    caches.push(build_cache(cfg, &lag, i, c.tier, Arc::new(c.backplane.clone()))?);
                    tiers.extend(c.tiers);
                    sharded.extend(c.sharded);
                    backplanes.push(c.backplane);
                }
                Remote::Redis {
                    urls,
                    prefix,
                    tiers: Mutex::new(tiers),
                    sharded: Mutex::new(sharded),
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
            cfg: fleet.clone(),
            lag,
            writes_queued: AtomicU64::new(0),
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

async fn connect_one(url: &SecretUrl, prefix: &str) -> Result<RedisTier> {
    RedisTier::builder(url.expose())
        .prefix(prefix)
        .build()
        .await
        .with_context(|| format!("cannot connect strata's RedisTier to {url}"))
}

/// One instance's tier (a `RedisTier`; a `ShardedTier` over one per server of a ring,
/// or over the Cluster's virtual shards) and stream backplane (on the first server, or
/// the Cluster, sharing the tier's connection).
async fn connect(urls: &[SecretUrl], prefix: &str, cfg: &FleetConfig) -> Result<Connected> {
    let first = urls.first().ok_or_else(|| anyhow!("no Redis URL"))?;
    if cfg.cluster {
        let tier = RedisTier::cluster_builder(urls.iter().map(|u| u.expose().to_owned()))
            .prefix(prefix)
            .build()
            .await
            .with_context(|| format!("cannot connect strata's RedisTier to the Cluster at {first}"))?;
        let backplane = RedisStreamBackplane::cluster_builder(urls.iter().map(|u| u.expose().to_owned()))
            .prefix(prefix)
            .share_connection(&tier)
            .build()
            .await
            .with_context(|| {
                format!("cannot connect strata's RedisStreamBackplane to the Cluster at {first}")
            })?;
        let sharded = tier
            .clone()
            .cluster_shards(strata_redis::DEFAULT_CLUSTER_SHARDS)
            .hot_key_copies(cfg.hot_key_copies)
            .build()
            .map_err(|e| anyhow!("cannot shard over the Cluster: {e}"))?;
        let sharded = Arc::new(sharded);
        return Ok(Connected { tier: sharded.clone(), tiers: vec![tier], sharded: Some(sharded), backplane });
    }
    let mut tiers = Vec::with_capacity(urls.len());
    for url in urls {
        tiers.push(connect_one(url, prefix).await?);
    }
    let backplane = match &cfg.backplane {
        Some(url) => RedisStreamBackplane::builder(url.expose()).prefix(prefix).build().await,
        None => {
            RedisStreamBackplane::builder(first.expose())
                .prefix(prefix)
                .share_connection(&tiers[0])
                .build()
                .await
        }
    };
    let backplane = backplane.with_context(|| "cannot connect strata's RedisStreamBackplane".to_owned())?;
    if urls.len() == 1 {
        return Ok(Connected { tier: Arc::new(tiers[0].clone()), tiers, sharded: None, backplane });
    }
    let mut ring = ShardedTier::builder().gutter(Duration::from_secs(10)).hot_key_copies(cfg.hot_key_copies);
    for (i, t) in tiers.iter().enumerate() {
        // Named by position: every instance lists the servers in the same order.
        ring = ring.shard(format!("node-{i}"), Arc::new(t.clone()));
    }
    let sharded = Arc::new(ring.build().map_err(|e| anyhow!("cannot build the ring: {e}"))?);
    Ok(Connected { tier: sharded.clone(), tiers, sharded: Some(sharded), backplane })
}

#[async_trait]
impl Strategy for StrataCache {
    fn name(&self) -> &'static str {
        "strata"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.cfg.ttl)
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
        self.lag.write_started(instance, key);
        let version = self.db.write(key, value).await?;
        let cache = self.cache(instance)?;
        match cache.invalidate(&key).await {
            Ok(()) => {}
            // Committed, L2 clean, the message queued and sent in order: below Strong
            // that is the whole write (its staleness is what the propagation lag and
            // the stale reads measure); at Strong the fleet did not acknowledge it.
            Err(e) if e.is_queued() && cache.consistency() != Consistency::Strong => {
                self.writes_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e.into()),
        }
        self.lag.write_done(key);
        Ok(version)
    }

    fn propagation(&self) -> Option<LagSummary> {
        Some(self.lag.take())
    }

    async fn invalidate_all(&self) -> Result<bool> {
        // A namespace bump: every instance's L1 and the shared L2 at once.
        self.cache(0)?.invalidate_all().await?;
        Ok(true)
    }

    async fn rejoin(&self, instance: usize, warm: bool) -> Result<()> {
        // --warm-up makes every join warm; otherwise only the warm join's instance.
        let cfg = FleetConfig { warm_up: warm || self.cfg.warm_up, ..self.cfg.clone() };
        let cache = match &self.remote {
            Remote::InProcess { tier, hub } => {
                build_cache(&cfg, &self.lag, instance, Arc::new(tier.clone()), Arc::new(hub.connect()))?
            }
            Remote::Redis { urls, prefix, tiers, sharded, backplanes } => {
                let c = connect(urls, prefix, &cfg).await?;
                let cache = build_cache(&cfg, &self.lag, instance, c.tier, Arc::new(c.backplane.clone()))?;
                tiers.lock().extend(c.tiers);
                sharded.lock().extend(c.sharded);
                backplanes.lock().push(c.backplane);
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
            // Tier round trips + the backplane's publishes and reads (a pushed entry
            // costs no command of the subscriber's).
            Remote::Redis { tiers, backplanes, .. } => {
                tiers.lock().iter().map(RedisTier::ops).sum::<u64>()
                    + backplanes.lock().iter().map(|b| b.stats().published + b.stats().reads).sum::<u64>()
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
        sum.insert("writes_queued".into(), self.writes_queued.load(Ordering::Relaxed).into());
        match &self.remote {
            Remote::InProcess { tier, hub } => {
                sum.insert("tier_ops".into(), tier.ops().into());
                sum.insert("backplane_published".into(), hub.published().into());
            }
            Remote::Redis { tiers, sharded, backplanes, .. } => {
                sum.insert("tier_ops".into(), tiers.lock().iter().map(RedisTier::ops).sum::<u64>().into());
                let (mut copy_reads, mut gutter_reads, mut copies_filled) = (0, 0, 0);
                for t in sharded.lock().iter() {
                    let stats = t.stats();
                    copies_filled += stats.copies_filled;
                    for s in &stats.shards {
                        copy_reads += s.copy_reads;
                        gutter_reads += s.gutter_reads;
                    }
                }
                if !sharded.lock().is_empty() {
                    sum.insert("ring_copy_reads".into(), copy_reads.into());
                    sum.insert("ring_gutter_reads".into(), gutter_reads.into());
                    sum.insert("ring_copies_filled".into(), copies_filled.into());
                }
                let backplanes = backplanes.lock();
                let bp = backplanes.iter().map(RedisStreamBackplane::stats);
                let (mut published, mut delivered, mut lost, mut disconnects) = (0, 0, 0, 0);
                for s in bp {
                    (published, delivered) = (published + s.published, delivered + s.delivered);
                    (lost, disconnects) = (lost + s.lost, disconnects + s.disconnects);
                }
                sum.insert("backplane_published".into(), published.into());
                sum.insert("backplane_delivered".into(), delivered.into());
                sum.insert("backplane_lost".into(), lost.into());
                sum.insert("backplane_disconnects".into(), disconnects.into());
            }
        }
        Some(serde_json::Value::Object(sum))
    }

    async fn close(&self) -> Result<()> {
        for c in self.all_caches() {
            c.shutdown().await;
        }
        if let Remote::Redis { urls, prefix, .. } = &self.remote {
            for url in urls.iter().chain(&self.cfg.backplane) {
                delete_prefix(url, prefix).await?;
            }
        }
        Ok(())
    }
}

/// One instance's cache.
fn build_cache(
    cfg: &FleetConfig,
    lag: &Arc<LagTracker>,
    instance: usize,
    tier: Arc<dyn Tier>,
    backplane: Arc<dyn Backplane>,
) -> Result<Cache<u64, Row>> {
    let lag = lag.clone();
    let mut builder = Cache::<u64, Row>::builder(cfg.scenario.name())
        .after_remote_invalidation(move |scope| {
            if let Scope::Keys(keys) = scope {
                for key in keys.iter().filter_map(|k| k.parse::<u64>().ok()) {
                    lag.applied(instance, key);
                }
            }
        })
        .tier(tier)
        .backplane(backplane)
        .max_capacity(cfg.capacity)
        .ttl(cfg.ttl)
        .version(|row: &Row| Some(row.version))
        .seed(cfg.seed.wrapping_add(instance as u64));
    if let Some(timeout) = cfg.l2_timeout {
        builder = builder.l2_timeout(timeout);
    }
    if let Some(timeout) = cfg.l2_busy_timeout {
        builder = builder.l2_busy_timeout(timeout);
    }
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
