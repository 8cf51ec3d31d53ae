//! Database overload protection under a Redis outage (issue #15, done-when 4).
//!
//! A cache on a real Redis (tier and stream backplane, from `strata-testkit`) holds
//! 10 000 keys in L1; Redis is killed; then three storms of 10 000 concurrent reads of
//! distinct keys hit it. A simulated database counts its concurrent queries.
//!
//! - **A. namespace invalidation** (`invalidate_all` while L2 is down): every copy is
//!   invalidated, so none may be served by fail-safe (an invalidated value is known to
//!   be wrong; fail-safe only stretches an *expired* one). Every read loads; the limit
//!   bounds the database's concurrency and the reads queue for permits.
//! - **B. slow database, stale copies present** (the entries expired): the loader takes
//!   500 ms; the soft timeout answers from the stale copy; loads past the limit wait,
//!   then are refused and answered from the copy.
//! - **C. failing database, stale copies present**, loader breaker on: a burst of
//!   failures opens the breaker, the rest are answered from the copies without a query.
//!
//! The copies of B and C are served only because `max_stale` (the staleness bound
//! while the backplane is down) is raised to 60 s: with the default 5 s, an outage
//! longer than 5 s rules out every copy older than 5 s, and C's reads fail fast with
//! the breaker's error instead (measured: 9 808 errors of 10 000).
//!
//! Run: `cargo run -p strata-redis --example overload` (figures are printed; they are
//! timings of this machine, not a benchmark).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use strata::{BreakerConfig, Cache, Consistency};
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

const KEYS: u64 = 10_000;
const LIMIT: usize = 64;
const TTL: Duration = Duration::from_secs(3);

/// The simulated database: a query takes `latency_ms`, fails when `down`.
#[derive(Default)]
struct Db {
    now: AtomicUsize,
    max: AtomicUsize,
    queries: AtomicUsize,
    latency_ms: AtomicUsize,
    down: AtomicBool,
}

impl Db {
    async fn query(&self, key: u64) -> std::io::Result<Option<String>> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(self.latency_ms.load(Ordering::SeqCst) as u64)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("database unavailable"));
        }
        Ok(Some(format!("settings of tenant {key}")))
    }

    fn reset_counts(&self) {
        self.max.store(0, Ordering::SeqCst);
        self.queries.store(0, Ordering::SeqCst);
    }
}

/// Reads every key at once; prints the database's peak concurrency, latency
/// percentiles and errors.
async fn storm(name: &str, cache: &Cache<u64, String>, db: &Arc<Db>) {
    db.reset_counts();
    let before = cache.stats();
    let began = Instant::now();
    let reads = (0..KEYS).map(|k| {
        let (cache, db) = (cache.clone(), db.clone());
        async move {
            let t = Instant::now();
            let r = cache.get_or_load(&k, move || async move { db.query(k).await }).await;
            (t.elapsed(), r)
        }
    });
    let results = join_all(reads).await;
    let wall = began.elapsed();
    let mut times: Vec<Duration> = results.iter().map(|(t, _)| *t).collect();
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    let errors: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let after = cache.stats();
    println!("\n{name}");
    println!(
        "  db: {} queries, max concurrent {} (limit {LIMIT})",
        db.queries.load(Ordering::SeqCst),
        db.max.load(Ordering::SeqCst)
    );
    println!(
        "  reads: {KEYS} in {wall:.2?}; p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        pct(0.50),
        pct(0.99),
        times[times.len() - 1]
    );
    println!(
        "  errors: {} ({}); stale served {}, throttled {}, rejected by limit {}, by breaker {}",
        errors.len(),
        errors.first().map_or_else(|| "none".to_owned(), |e| e.to_string()),
        after.stale_served - before.stale_served,
        after.loads_throttled - before.loads_throttled,
        after.loads_rejected_overload - before.loads_rejected_overload,
        after.loads_rejected_breaker - before.loads_rejected_breaker,
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut redis = RedisServer::start();
    let tier = RedisTier::builder(redis.url()).prefix("overload").build().await?;
    let backplane = RedisStreamBackplane::builder(redis.url()).prefix("overload").build().await?;
    let cache: Cache<u64, String> = Cache::builder("billsetting")
        .tier(Arc::new(tier))
        .backplane(Arc::new(backplane))
        .consistency(Consistency::Invalidated)
        .max_capacity(2 * KEYS)
        .ttl(TTL)
        .ttl_jitter(0.0)
        // While the backplane is down (Redis is), the Invalidated level serves nothing
        // older than `max_stale`, fail-safe copies included: invalidations may be
        // missed. The default 5 s would hide B and C's copies after 5 s of outage; an
        // application that accepts a minute of staleness in an outage says so here.
        .max_stale(Duration::from_secs(60))
        .max_concurrent_loads(LIMIT)
        .fail_safe(Duration::from_secs(600), Duration::from_secs(5))
        .loader_soft_timeout(Duration::from_millis(100))
        .loader_hard_timeout(Duration::from_secs(2))
        .loader_breaker(BreakerConfig {
            consecutive_failures: 5,
            open_for: Duration::from_secs(5),
            ..Default::default()
        })
        .build()?;
    cache.ready().await;
    let db = Arc::new(Db::default());
    db.latency_ms.store(2, Ordering::SeqCst);
    storm("warm-up: 10 000 keys loaded with Redis up", &cache, &db).await;

    redis.kill();
    println!("\nredis killed (L2 tier and backplane down)");

    // A: every copy invalidated; the loads queue behind the limit.
    db.latency_ms.store(5, Ordering::SeqCst);
    let inv = cache.invalidate_all().await;
    println!("invalidate_all with L2 down: {}", inv.map_or_else(|e| e.to_string(), |()| "ok".to_owned()));
    storm("A. namespace invalidated, L2 down, db 5 ms/query", &cache, &db).await;

    // B: the copies expire; the database is slow.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    db.latency_ms.store(500, Ordering::SeqCst);
    storm("B. entries expired (stale copies), L2 down, db 500 ms/query", &cache, &db).await;

    // C: the copies expire again; the database fails.
    tokio::time::sleep(TTL + Duration::from_secs(3)).await;
    db.latency_ms.store(5, Ordering::SeqCst);
    db.down.store(true, Ordering::SeqCst);
    storm("C. entries expired (stale copies), L2 down, db failing, loader breaker on", &cache, &db).await;

    cache.shutdown().await;
    Ok(())
}
