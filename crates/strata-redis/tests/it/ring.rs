//! A client-side sharded ring over standalone Redis servers (`strata::ShardedTier` with
//! one `RedisTier` per server): the tier conformance suite on a 3-node ring, and a
//! node paused under a fleet (its reads fail over to the gutter, invalidations made
//! meanwhile reach it once it is back, and no instance serves the old row).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use strata::backplane::Backplane;
use strata::tier::{Lookup, ShardedTierBuilder, Tier};
use strata::{Cache, Clock, ShardedTier, SystemClock};
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

/// A ring builder over `servers`, each shard its own `RedisTier` (as each instance of
/// a fleet has its own connections); shards are named by position, as every instance
/// must name them alike.
async fn ring(servers: &[RedisServer], prefix: &str) -> ShardedTierBuilder {
    let mut b = ShardedTier::builder();
    for (i, s) in servers.iter().enumerate() {
        let tier = RedisTier::builder(s.url())
            .prefix(prefix)
            .op_timeout(Duration::from_millis(2000))
            .build()
            .await
            .expect("build redis tier");
        b = b.shard(format!("node-{i}"), Arc::new(tier));
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_three_redis_servers_passes_the_conformance_suite() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    // Generous read timeout: the suite must not see a failover on 2 busy cores.
    let plain = ring(&servers, "ring-a").await.shard_timeout(Duration::from_secs(2)).build().expect("valid");
    strata::testing::conformance::run(&plain, "redis ring of 3").await;
    let both = ring(&servers, "ring-b")
        .await
        .shard_timeout(Duration::from_secs(2))
        .hot_key_copies(2)
        .gutter(Duration::from_secs(5))
        .build()
        .expect("valid");
    strata::testing::conformance::run(&both, "redis ring of 3, 2 copies and a gutter").await;
}

/// The rows the loaders read.
#[derive(Clone, Default)]
struct Db(Arc<Mutex<HashMap<u64, String>>>);

impl Db {
    fn set(&self, k: u64, v: &str) {
        self.0.lock().insert(k, v.to_owned());
    }
    fn loader(
        &self,
        k: u64,
    ) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
        let row = self.0.lock().get(&k).cloned();
        move || std::future::ready(Ok(row))
    }
}

async fn instance(
    servers: &[RedisServer],
    backplane: &RedisServer,
) -> (Cache<u64, String>, Arc<ShardedTier>) {
    let tier = Arc::new(ring(servers, "fleet").await.gutter(Duration::from_secs(2)).build().expect("valid"));
    let bp: Arc<dyn Backplane> = Arc::new(
        RedisStreamBackplane::builder(backplane.url())
            .block(Duration::from_millis(300))
            .build()
            .await
            .expect("stream backplane"),
    );
    let cache = Cache::builder("ring")
        .tier(tier.clone())
        .backplane(bp)
        .l2_timeout(Duration::from_millis(200))
        .max_stale(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(100))
        .early_refresh(0.0)
        .build()
        .expect("cache");
    tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.expect("ready");
    (cache, tier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_ring_node_fails_over_to_the_gutter_and_comes_back_without_an_old_row() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let bp_server = RedisServer::start();
    let (a, _) = instance(&servers, &bp_server).await;
    let (b, b_tier) = instance(&servers, &bp_server).await;
    let (c, _) = instance(&servers, &bp_server).await;
    let db = Db::default();
    let keys: Vec<u64> = (0..60).collect();
    for &k in &keys {
        db.set(k, "v1");
        a.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    let on_paused: Vec<u64> = keys.iter().copied().filter(|k| b_tier.shard_of(&k.to_string()) == 1).collect();
    assert!(!on_paused.is_empty());

    servers[1].pause().expect("SIGSTOP");
    let paused_at = Instant::now();
    let paused_at_ts = SystemClock::default().now();
    // Writes while node 1 is away: its deletes fail and are retried; the gutter's go through.
    let mut failed = 0;
    for &k in &keys {
        db.set(k, "v2");
        // An invalidation whose delete did not reach every shard reports it, and is
        // retried by the cache until it does.
        failed += usize::from(a.invalidate(&k).await.is_err());
    }
    let pending_during = a.pending_invalidations();
    // One shard down is that shard's breaker's business, not the whole tier's.
    assert_eq!(a.l2_breaker_state(), strata::BreakerState::Closed, "A's L2 breaker stayed closed");
    // B reads every key: those of node 1 through the gutter, all at the new row.
    for &k in &keys {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = b.get_or_load(&k, db.loader(k)).await.expect("read during the pause");
            if v.as_deref() == Some("v2") {
                break;
            }
            assert!(Instant::now() < deadline, "key {k} still old 5 s after its invalidation");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let gutter_reads: u64 = b_tier.stats().shards.iter().map(|s| s.gutter_reads).sum();
    // Node 1 stays away past max_stale, so the entries it keeps are older than it.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(paused_at.elapsed())).await;
    servers[1].resume().expect("SIGCONT");
    let resumed = Instant::now();
    // C never read before: every read now comes from L2 or the database.
    for &k in &keys {
        let v = c.get_or_load(&k, db.loader(k)).await.expect("read after the pause");
        assert_eq!(
            v.as_deref(),
            Some("v2"),
            "key {k} (node {}) served an old row",
            b_tier.shard_of(&k.to_string())
        );
    }
    let drained = async {
        while a.pending_invalidations() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drained).await.expect("the retried deletes reach node 1");
    eprintln!(
        "[ring] node 1 of 3 paused {:?}: {} of 60 keys on it, {failed} invalidations reported failed, {pending_during} buffered, \
         {gutter_reads} gutter reads by B; deletes drained {:?} after SIGCONT",
        resumed - paused_at,
        on_paused.len(),
        resumed.elapsed()
    );
    // What node 1 holds now was written after the pause (every v1 entry was filled
    // before it): nothing of the old rows survived there.
    for &k in &on_paused {
        if let Lookup::Hit(e) = b_tier.lookup("ring", &k.to_string(), None).await.expect("lookup") {
            assert!(e.created >= paused_at_ts, "node 1 kept key {k}'s old entry");
        }
    }
}
