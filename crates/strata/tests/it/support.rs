//! Helpers shared by the modules: the toy database and its loaders, fleet builders,
//! `eventually`, and a look at what L2 holds.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use strata::backplane::Mode;
use strata::testing::ManualClock;
use strata::tier::TierConfig;
use strata::{Cache, CacheKey, Clock, Consistency, InProcessBackplane, InProcessTier};
use tokio::sync::{Notify, Semaphore};

pub(crate) const NS: &str = "settings";

/// A tiny "database": the source of truth the loaders read.
#[derive(Clone, Default)]
pub(crate) struct Db(Arc<Mutex<HashMap<u64, String>>>);

impl Db {
    pub(crate) fn with(rows: &[(u64, &str)]) -> Self {
        let db = Db::default();
        for (k, v) in rows {
            db.set(*k, v);
        }
        db
    }
    pub(crate) fn set(&self, k: u64, v: &str) {
        self.0.lock().insert(k, v.to_owned());
    }
    pub(crate) fn get(&self, k: u64) -> Option<String> {
        self.0.lock().get(&k).cloned()
    }
    /// A loader reading the current row.
    pub(crate) fn loader(
        &self,
        k: u64,
    ) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, io::Error>> + Send + 'static {
        let db = self.clone();
        move || std::future::ready(Ok(db.get(k)))
    }
}

pub(crate) type BoxedLoad = std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, io::Error>> + Send>>;

/// A loader that reads the row when it starts, signals `started`, then waits for a
/// permit on `gate` before returning what it read: a slow database read.
pub(crate) fn slow_loader(
    db: &Db,
    k: u64,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
) -> impl FnOnce() -> BoxedLoad + Send + 'static {
    let db = db.clone();
    move || {
        Box::pin(async move {
            let v = db.get(k);
            started.notify_one();
            gate.acquire().await.expect("gate open").forget();
            Ok(v)
        })
    }
}

pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub(crate) struct Fleet {
    pub(crate) tier: InProcessTier,
    pub(crate) conns: Vec<InProcessBackplane>,
    pub(crate) caches: Vec<Cache<u64, String>>,
}

pub(crate) async fn fleet(n: usize, mode: Mode, clock: Option<ManualClock>) -> Fleet {
    fleet_of(n, mode, clock, |b| b).await
}

/// Every instance loads key 1 (v1); the row becomes v2 and the first instance
/// invalidates it; returns the database once every other instance applied that.
pub(crate) async fn held_everywhere_then_written(f: &Fleet) -> Db {
    let db = Db::with(&[(1, "v1")]);
    for c in &f.caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    db.set(1, "v2");
    f.caches[0].invalidate(&1).await.expect("invalidate");
    for c in &f.caches[1..] {
        eventually("applied", || c.stats().invalidations_applied == 1).await;
    }
    db
}

/// [`fleet`] with a setting of the test's own on every builder.
pub(crate) async fn fleet_with(
    n: usize,
    mode: Mode,
    adjust: impl Fn(strata::CacheBuilder<u64, String>) -> strata::CacheBuilder<u64, String>,
) -> Fleet {
    fleet_of(n, mode, None, adjust).await
}

async fn fleet_of(
    n: usize,
    mode: Mode,
    clock: Option<ManualClock>,
    adjust: impl Fn(strata::CacheBuilder<u64, String>) -> strata::CacheBuilder<u64, String>,
) -> Fleet {
    let clock_dyn: Option<Arc<dyn Clock>> = clock.map(|c| Arc::new(c) as Arc<dyn Clock>);
    let tier = match &clock_dyn {
        Some(c) => InProcessTier::with_config(TierConfig::default(), c.clone()),
        None => InProcessTier::new(),
    };
    let hub = InProcessBackplane::with_mode(mode);
    let mut conns = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..n {
        let conn = hub.connect();
        let mut b = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(conn.clone()))
            .ttl_jitter(0.0)
            .heartbeat_interval(Duration::from_millis(20))
            .max_stale(Duration::from_secs(2));
        if let Some(c) = &clock_dyn {
            b = b.clock(c.clone());
        }
        let cache = adjust(b).build().expect("valid config");
        cache.ready().await;
        conns.push(conn);
        caches.push(cache);
    }
    Fleet { tier, conns, caches }
}

/// The schema fingerprint of a `Cache<_, String>`'s entries (postcard, version 0).
pub(crate) fn string_schema() -> u64 {
    strata::schema::Schema::of::<String>(strata::Codec::name(&strata::PostcardCodec::<String>::default()), 0)
        .fingerprint()
}

pub(crate) fn l2_value(tier: &InProcessTier, key: u64) -> Option<String> {
    let env = tier.raw(NS, &key.to_key_string())?;
    env.value.map(|b| postcard::from_bytes(&b).expect("decodable"))
}

pub(crate) fn manual_cache(clock: &ManualClock) -> strata::CacheBuilder<u64, String> {
    Cache::builder(NS).clock(Arc::new(clock.clone())).ttl_jitter(0.0).ttl(Duration::from_secs(10))
}

pub(crate) async fn strong_fleet(
    n: usize,
) -> (InProcessTier, Vec<InProcessBackplane>, Vec<Cache<u64, String>>) {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let mut conns = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..n {
        let conn = hub.connect();
        let cache = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(conn.clone()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            .membership_lease(Duration::from_millis(300))
            .build()
            .expect("valid");
        conns.push(conn);
        caches.push(cache);
    }
    for c in &caches {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    // Every member has heard every other one.
    tokio::time::sleep(Duration::from_millis(60)).await;
    (tier, conns, caches)
}
