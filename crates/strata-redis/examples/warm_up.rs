//! What warm-up buys an instance that joins a running fleet: three instances on one
//! `redis-server` (started here on a random loopback port) serve Zipf-distributed reads
//! until L2 and the shared hot-key ranking are warm; then an instance joins without
//! warm-up, and another with it, and each serves the same read stream alone for a few
//! seconds. Prints, per newcomer: time to ready, keys preloaded, and per second its
//! database loads, L2 reads and L1 hit rate.
//!
//! Run: `cargo run -p strata-redis --example warm_up -- [--keys N] [--hot N] [--rate N]
//! [--seconds N] [--warm N]` (defaults: 5,000 keys, warm-up of the 5,000 hottest, 2,000
//! reads/s, 3 s per newcomer, after the fleet ran 15 s). Needs `redis-server` on the PATH.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata::{Cache, WarmUp};
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

const NS: &str = "billsetting";
const FLEET: usize = 3;
const REPORT_EVERY: Duration = Duration::from_secs(1);

struct Args {
    keys: u64,
    hot: usize,
    rate: u64,
    seconds: u64,
    warm: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { keys: 5_000, hot: 5_000, rate: 2_000, seconds: 3, warm: 15 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("{flag} wants a positive whole number"))?;
        match flag.as_str() {
            "--keys" => a.keys = v,
            "--hot" => a.hot = usize::try_from(v).map_err(|e| e.to_string())?,
            "--rate" => a.rate = v,
            "--seconds" => a.seconds = v,
            "--warm" => a.warm = v,
            other => {
                return Err(format!(
                    "unknown argument {other}; use --keys, --hot, --rate, --seconds, --warm"
                ));
            }
        }
    }
    Ok(a)
}

/// Zipf(1.0) over `n` keys by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: u64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        Zipf(cdf)
    }
    fn sample(&self) -> u64 {
        let u: f64 = rand::random();
        self.0.partition_point(|&c| c < u) as u64
    }
}

/// The "database": every load sleeps 1 ms and is counted.
#[derive(Clone, Default)]
struct Db(Arc<AtomicU64>);

impl Db {
    fn loader(
        &self,
        key: u64,
    ) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<Option<String>, std::io::Error>> + use<>
    {
        let loads = self.0.clone();
        move || {
            Box::pin(async move {
                loads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(Some(format!("settings of account {key}")))
            })
        }
    }
}

async fn instance(
    url: &str,
    warm_up: Option<WarmUp>,
) -> Result<Cache<u64, String>, Box<dyn std::error::Error>> {
    let tier = RedisTier::builder(url).prefix("wu").build().await?;
    let backplane = RedisStreamBackplane::builder(url).prefix("wu").build().await?;
    let mut b =
        Cache::builder(NS).tier(Arc::new(tier)).backplane(Arc::new(backplane)).ttl(Duration::from_secs(3600));
    if let Some(w) = warm_up {
        b = b.warm_up(w);
    }
    Ok(b.build()?)
}

/// Reads at `rate`/s for `secs` on the caches in turn; returns per-second snapshots of
/// (database loads, L2 hits, L1 hits, reads) of `watched`.
async fn drive(
    caches: &[Cache<u64, String>],
    db: &Db,
    zipf: &Arc<Zipf>,
    rate: u64,
    secs: u64,
) -> Vec<(u64, u64, u64, u64)> {
    let mut out = Vec::new();
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut reads = 0u64;
    for _ in 0..secs {
        let (l0, s0, r0) = (db.0.load(Ordering::Relaxed), stats_sum(caches), reads);
        let second = Instant::now();
        while second.elapsed() < Duration::from_secs(1) {
            ticker.tick().await;
            let mut batch = Vec::new();
            for i in 0..per_tick {
                let cache = caches[(reads + i) as usize % caches.len()].clone();
                let key = zipf.sample();
                let load = db.loader(key);
                batch.push(tokio::spawn(async move { cache.get_or_load(&key, load).await }));
            }
            reads += per_tick;
            for t in batch {
                let _ = t.await;
            }
        }
        let s1 = stats_sum(caches);
        out.push((db.0.load(Ordering::Relaxed) - l0, s1.0 - s0.0, s1.1 - s0.1, reads - r0));
    }
    out
}

fn stats_sum(caches: &[Cache<u64, String>]) -> (u64, u64) {
    caches.iter().map(Cache::stats).fold((0, 0), |acc, s| (acc.0 + s.l2_hits, acc.1 + s.l1_hits))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let server = RedisServer::start();
    let url = server.url();
    let zipf = Arc::new(Zipf::new(args.keys));
    // Every read counted (the default samples one in 16): the ranking fills in seconds
    // here, where a real fleet has hours.
    let warm = WarmUp::new()
        .keys(args.hot)
        .sample_every(1)
        .report_every(REPORT_EVERY)
        .budget(Duration::from_secs(30));
    let db = Db::default();
    let mut fleet = Vec::new();
    for _ in 0..FLEET {
        let c = instance(&url, Some(warm.clone())).await?;
        c.ready().await;
        fleet.push(c);
    }
    println!(
        "{FLEET} instances on redis-server {} serve Zipf(1.0) reads over {} keys at {}/s for {} s",
        server.addr(),
        args.keys,
        args.rate,
        args.warm
    );
    let fleet_db = drive(&fleet, &db, &zipf, args.rate, args.warm).await;
    println!(
        "fleet DB loads per second while warming: {:?}",
        fleet_db.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    tokio::time::sleep(REPORT_EVERY * 2).await;

    let mut results: HashMap<&str, String> = HashMap::new();
    for (label, warm_up) in [("cold join", None), ("warm join", Some(warm.clone()))] {
        let began = Instant::now();
        let newcomer = instance(&url, warm_up).await?;
        newcomer.ready().await;
        let to_ready = began.elapsed();
        let preloaded = newcomer.stats().warm_up_keys;
        let per_second = drive(std::slice::from_ref(&newcomer), &db, &zipf, args.rate, args.seconds).await;
        let db_total: u64 = per_second.iter().map(|s| s.0).sum();
        let l2_total: u64 = per_second.iter().map(|s| s.1).sum();
        let seconds: Vec<String> = per_second
            .iter()
            .map(|(loads, l2, l1, reads)| {
                format!("{loads} DB / {l2} L2 / L1 {:.1} %", 100.0 * *l1 as f64 / (*reads).max(1) as f64)
            })
            .collect();
        results.insert(
            label,
            format!(
                "{label}: ready in {:.1} ms, {preloaded} keys preloaded; then {db_total} DB loads and {l2_total} L2 reads \
                 in {} s; per second: {}",
                to_ready.as_secs_f64() * 1e3,
                args.seconds,
                seconds.join(", ")
            ),
        );
        newcomer.shutdown().await;
    }
    println!();
    println!("{}", results["cold join"]);
    println!("{}", results["warm join"]);
    for c in &fleet {
        c.shutdown().await;
    }
    Ok(())
}
