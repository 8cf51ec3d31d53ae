//! The three ways to keep drafts, side by side:
//!
//! * `write-through`: every save is a database write, then `Cache::invalidate`; reads
//!   through a strata cache per instance (so only the writes differ from `strata`);
//! * `naive-write-behind`: the seed's own design. A save `SET`s the draft (30 s sliding
//!   TTL, `PEXPIRE` on heartbeat) and `SADD`s its id to a dirty set; every instance runs
//!   a scheduler (staggered, so that the fleet scans once per flush interval) that takes
//!   the dirty ids, `GET`s each draft,
//!   writes it to the database and `SREM`s the id: no claims, no sequence guard, no
//!   durability. On Redis with `--redis`; in this process's memory otherwise;
//! * `strata`: `strata::write_behind` over the same caches (`InProcessQueue`, or a
//!   `RedisWriteBehindQueue` at durability `Acknowledged` with `--redis`, on the same
//!   server), flushed through a sequence-guarded upsert.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use parking_lot::Mutex;
use strata::backplane::Backplane;
use strata::tier::Tier;
use strata::write_behind::WriteBehindQueue;
use strata::{
    Cache, InProcessBackplane, InProcessQueue, InProcessTier, Sink, SinkError, SinkItem, WriteBehindConfig,
};
use strata_redis::{RedisStreamBackplane, RedisTier};

use super::db::{Draft, DraftsDb};
use crate::secret::SecretUrl;

/// The drafts' sliding TTL in caches and in the naive design's Redis keys.
pub const DRAFT_TTL: Duration = Duration::from_secs(30);

/// A fleet keeping drafts one way.
#[async_trait]
pub trait DraftStrategy: Send + Sync {
    /// Its name in the report.
    fn name(&self) -> &'static str;
    /// Saves a draft through `instance`; returns once the save is acknowledged.
    async fn save(&self, instance: usize, user: u64, draft: Draft) -> Result<()>;
    /// Reads a draft through `instance`.
    async fn read(&self, instance: usize, user: u64) -> Result<Option<Draft>>;
    /// The heartbeat through `instance`.
    async fn touch(&self, instance: usize, user: u64) -> Result<()>;
    /// Writes whatever still waits, as a graceful stop would.
    async fn drain(&self) -> Result<()>;
    /// Stops the fleet's background work and deletes what it put in Redis.
    async fn close(&self) -> Result<()>;
}

/// What every strategy is built from.
#[derive(Clone)]
pub struct DraftFleet {
    pub db: Arc<DraftsDb>,
    pub instances: usize,
    pub redis: Option<SecretUrl>,
    pub run_id: String,
    pub flush_delay: Duration,
}

/// The shared L2 and backplane of a fleet of caches.
async fn remote(f: &DraftFleet, name: &str) -> Result<Vec<(Arc<dyn Tier>, Arc<dyn Backplane>)>> {
    let mut out = Vec::with_capacity(f.instances);
    match &f.redis {
        None => {
            let tier = InProcessTier::new();
            let hub = InProcessBackplane::new();
            for _ in 0..f.instances {
                out.push((
                    Arc::new(tier.clone()) as Arc<dyn Tier>,
                    Arc::new(hub.connect()) as Arc<dyn Backplane>,
                ));
            }
        }
        Some(url) => {
            let prefix = format!("{}:{name}", f.run_id);
            for _ in 0..f.instances {
                let tier =
                    RedisTier::builder(url.expose()).prefix(&prefix).build().await.context("RedisTier")?;
                let bp = RedisStreamBackplane::builder(url.expose())
                    .prefix(&prefix)
                    .share_connection(&tier)
                    .build()
                    .await
                    .context("RedisStreamBackplane")?;
                out.push((Arc::new(tier) as Arc<dyn Tier>, Arc::new(bp) as Arc<dyn Backplane>));
            }
        }
    }
    Ok(out)
}

fn cache_builder(tier: Arc<dyn Tier>, bp: Arc<dyn Backplane>) -> strata::CacheBuilder<u64, Draft> {
    Cache::builder("drafts").tier(tier).backplane(bp).ttl(DRAFT_TTL).max_capacity(100_000)
}

async fn ready_all(caches: &[Cache<u64, Draft>]) {
    for c in caches {
        c.ready().await;
    }
}

fn pick(caches: &[Cache<u64, Draft>], i: usize) -> Result<&Cache<u64, Draft>> {
    caches.get(i).ok_or_else(|| anyhow!("no instance {i}"))
}

async fn read_through(db: &Arc<DraftsDb>, cache: &Cache<u64, Draft>, user: u64) -> Result<Option<Draft>> {
    let db = db.clone();
    cache
        .get_or_load(&user, move || async move {
            db.read(user).await.map_err(|e| std::io::Error::other(e.to_string()))
        })
        .await
        .map_err(|e| anyhow!("read: {e}"))
}

async fn clean(f: &DraftFleet, name: &str) -> Result<()> {
    match &f.redis {
        Some(url) => crate::bench::strategy::delete_prefix(url, &format!("{}:{name}", f.run_id)).await,
        None => Ok(()),
    }
}

/// `write-through`.
pub struct WriteThrough {
    f: DraftFleet,
    caches: Vec<Cache<u64, Draft>>,
}

impl WriteThrough {
    /// One cache per instance.
    pub async fn start(f: &DraftFleet) -> Result<WriteThrough> {
        let mut caches = Vec::new();
        for (tier, bp) in remote(f, "write-through").await? {
            caches.push(cache_builder(tier, bp).build().map_err(|e| anyhow!("{e}"))?);
        }
        ready_all(&caches).await;
        Ok(WriteThrough { f: f.clone(), caches })
    }
}

#[async_trait]
impl DraftStrategy for WriteThrough {
    fn name(&self) -> &'static str {
        "write-through"
    }
    async fn save(&self, instance: usize, user: u64, draft: Draft) -> Result<()> {
        let rev = draft.rev;
        self.f.db.write(&[(user, draft, rev)], true).await?;
        pick(&self.caches, instance)?.invalidate(&user).await.map_err(|e| anyhow!("invalidate: {e}"))
    }
    async fn read(&self, instance: usize, user: u64) -> Result<Option<Draft>> {
        read_through(&self.f.db, pick(&self.caches, instance)?, user).await
    }
    async fn touch(&self, instance: usize, user: u64) -> Result<()> {
        pick(&self.caches, instance)?.touch(&user).await.map(drop).map_err(|e| anyhow!("touch: {e}"))
    }
    async fn drain(&self) -> Result<()> {
        Ok(())
    }
    async fn close(&self) -> Result<()> {
        for c in &self.caches {
            c.shutdown().await;
        }
        clean(&self.f, "write-through").await
    }
}

/// The sink strata's flusher writes through: one guarded upsert per batch.
struct DbSink(Arc<DraftsDb>);

#[async_trait]
impl Sink<u64, Draft> for DbSink {
    async fn write_batch(
        &self,
        items: &[SinkItem<u64, Draft>],
    ) -> Result<Vec<Result<(), SinkError>>, SinkError> {
        let rows: Vec<(u64, Draft, u64)> = items.iter().map(|i| (i.key, i.value.clone(), i.seq)).collect();
        self.0.write(&rows, true).await.map_err(|e| SinkError::transient(e.to_string()))?;
        Ok(items.iter().map(|_| Ok(())).collect())
    }
}

/// `strata`.
pub struct StrataDrafts {
    f: DraftFleet,
    caches: Vec<Cache<u64, Draft>>,
}

impl StrataDrafts {
    /// One cache per instance, each with write-behind over one shared queue.
    pub async fn start(f: &DraftFleet) -> Result<StrataDrafts> {
        let queue: Arc<dyn WriteBehindQueue> = match &f.redis {
            None => Arc::new(InProcessQueue::new()),
            Some(url) => Arc::new(
                strata_redis::RedisWriteBehindQueue::builder(url.expose())
                    .prefix(format!("{}:strata", f.run_id))
                    .build()
                    .await
                    .context("RedisWriteBehindQueue")?,
            ),
        };
        let mut caches = Vec::new();
        for (tier, bp) in remote(f, "strata").await? {
            let wb = WriteBehindConfig::new(queue.clone(), DbSink(f.db.clone())).flush_delay(f.flush_delay);
            caches.push(cache_builder(tier, bp).write_behind(wb).build().map_err(|e| anyhow!("{e}"))?);
        }
        ready_all(&caches).await;
        Ok(StrataDrafts { f: f.clone(), caches })
    }
}

#[async_trait]
impl DraftStrategy for StrataDrafts {
    fn name(&self) -> &'static str {
        "strata"
    }
    async fn save(&self, instance: usize, user: u64, draft: Draft) -> Result<()> {
        let wb = pick(&self.caches, instance)?.write_behind().context("write-behind is on")?;
        wb.save(user, draft).await.map(drop).map_err(|e| anyhow!("save: {e}"))
    }
    async fn read(&self, instance: usize, user: u64) -> Result<Option<Draft>> {
        read_through(&self.f.db, pick(&self.caches, instance)?, user).await
    }
    async fn touch(&self, instance: usize, user: u64) -> Result<()> {
        let wb = pick(&self.caches, instance)?.write_behind().context("write-behind is on")?;
        wb.touch(&user).await.map(drop).map_err(|e| anyhow!("touch: {e}"))
    }
    async fn drain(&self) -> Result<()> {
        let wb = pick(&self.caches, 0)?.write_behind().context("write-behind is on")?;
        for _ in 0..100 {
            if wb.flush_all().await.map_err(|e| anyhow!("flush_all: {e}"))? == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(anyhow!("the write-behind queue did not drain"))
    }
    async fn close(&self) -> Result<()> {
        for c in &self.caches {
            c.shutdown().await;
        }
        clean(&self.f, "strata").await
    }
}

/// The naive design's shared store: Redis, or a map standing in for it.
enum Store {
    Memory(Mutex<MemoryStore>),
    Redis { conn: redis::aio::ConnectionManager, prefix: String },
}

#[derive(Default)]
struct MemoryStore {
    drafts: HashMap<u64, (Draft, Instant)>,
    dirty: HashSet<u64>,
}

/// `naive-write-behind`.
pub struct NaiveWriteBehind {
    f: DraftFleet,
    store: Arc<Store>,
    schedulers: Vec<tokio::task::JoinHandle<()>>,
}

impl NaiveWriteBehind {
    /// The store and one scheduler per instance, at staggered phases.
    pub async fn start(f: &DraftFleet) -> Result<NaiveWriteBehind> {
        let store = Arc::new(match &f.redis {
            None => Store::Memory(Mutex::new(MemoryStore::default())),
            Some(url) => {
                let client =
                    redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
                let conn = client.get_connection_manager().await.context("cannot connect to Redis")?;
                Store::Redis { conn, prefix: format!("{}:naive:", f.run_id) }
            }
        });
        let mut schedulers = Vec::new();
        for i in 0..f.instances {
            // Each instance's scheduler runs every `instances × flush delay`, staggered,
            // so that the fleet scans the dirty set once per flush delay, as one
            // scheduler would (but with the races several instances bring).
            let n = f.instances.max(1);
            let every = f.flush_delay.saturating_mul(n as u32);
            let (store, db) = (store.clone(), f.db.clone());
            // Instance i scans first at (i + 1) × the flush delay.
            let first = f.flush_delay.saturating_mul(i as u32 + 1);
            schedulers.push(tokio::spawn(async move {
                tokio::time::sleep(first).await;
                loop {
                    if let Err(e) = flush_dirty(&store, &db).await {
                        eprintln!("naive-write-behind: scheduler: {e:#}");
                    }
                    tokio::time::sleep(every).await;
                }
            }));
        }
        Ok(NaiveWriteBehind { f: f.clone(), store, schedulers })
    }
}

/// One scheduler pass: every dirty id, `GET`, write, `SREM` (the lost-update window is
/// between the `GET` and the `SREM`).
async fn flush_dirty(store: &Store, db: &DraftsDb) -> Result<()> {
    match store {
        Store::Memory(m) => {
            let dirty: Vec<u64> = m.lock().dirty.iter().copied().collect();
            for user in dirty {
                let draft = m.lock().drafts.get(&user).map(|(d, _)| d.clone());
                if let Some(d) = draft {
                    let rev = d.rev;
                    db.write(&[(user, d, rev)], false).await?;
                }
                m.lock().dirty.remove(&user);
            }
        }
        Store::Redis { conn, prefix } => {
            let mut c = conn.clone();
            let dirty: Vec<u64> =
                redis::cmd("SMEMBERS").arg(format!("{prefix}dirty")).query_async(&mut c).await?;
            for user in dirty {
                let raw: Option<Vec<u8>> =
                    redis::cmd("GET").arg(format!("{prefix}{user}")).query_async(&mut c).await?;
                if let Some(d) = raw.and_then(|r| serde_json::from_slice::<Draft>(&r).ok()) {
                    let rev = d.rev;
                    db.write(&[(user, d, rev)], false).await?;
                }
                let _: i64 =
                    redis::cmd("SREM").arg(format!("{prefix}dirty")).arg(user).query_async(&mut c).await?;
            }
        }
    }
    Ok(())
}

#[async_trait]
impl DraftStrategy for NaiveWriteBehind {
    fn name(&self) -> &'static str {
        "naive-write-behind"
    }
    async fn save(&self, _instance: usize, user: u64, draft: Draft) -> Result<()> {
        match &*self.store {
            Store::Memory(m) => {
                let mut m = m.lock();
                m.drafts.insert(user, (draft, Instant::now() + DRAFT_TTL));
                m.dirty.insert(user);
            }
            Store::Redis { conn, prefix } => {
                let mut c = conn.clone();
                let body = serde_json::to_vec(&draft)?;
                let ttl = DRAFT_TTL.as_millis() as u64;
                let _: () = redis::cmd("SET")
                    .arg(format!("{prefix}{user}"))
                    .arg(body)
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut c)
                    .await?;
                let _: i64 =
                    redis::cmd("SADD").arg(format!("{prefix}dirty")).arg(user).query_async(&mut c).await?;
            }
        }
        Ok(())
    }
    async fn read(&self, _instance: usize, user: u64) -> Result<Option<Draft>> {
        let cached = match &*self.store {
            Store::Memory(m) => {
                let m = m.lock();
                m.drafts.get(&user).filter(|(_, until)| *until > Instant::now()).map(|(d, _)| d.clone())
            }
            Store::Redis { conn, prefix } => {
                let raw: Option<Vec<u8>> =
                    redis::cmd("GET").arg(format!("{prefix}{user}")).query_async(&mut conn.clone()).await?;
                raw.and_then(|r| serde_json::from_slice(&r).ok())
            }
        };
        match cached {
            Some(d) => Ok(Some(d)),
            None => self.f.db.read(user).await,
        }
    }
    async fn touch(&self, _instance: usize, user: u64) -> Result<()> {
        match &*self.store {
            Store::Memory(m) => {
                if let Some((_, until)) = m.lock().drafts.get_mut(&user) {
                    *until = Instant::now() + DRAFT_TTL;
                }
            }
            Store::Redis { conn, prefix } => {
                let ttl = DRAFT_TTL.as_millis() as u64;
                let _: i64 = redis::cmd("PEXPIRE")
                    .arg(format!("{prefix}{user}"))
                    .arg(ttl)
                    .query_async(&mut conn.clone())
                    .await?;
            }
        }
        Ok(())
    }
    async fn drain(&self) -> Result<()> {
        for s in &self.schedulers {
            s.abort();
        }
        flush_dirty(&self.store, &self.f.db).await
    }
    async fn close(&self) -> Result<()> {
        for s in &self.schedulers {
            s.abort();
        }
        clean(&self.f, "naive").await
    }
}
