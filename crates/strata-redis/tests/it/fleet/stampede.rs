//! Many concurrent misses of one key across the fleet load it once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::Cache;
use strata_testkit::RedisServer;

use super::{Db, Opts, instance, instance_with, l2_version, ms, pct, stream, version_of};
use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_one_load_for_the_fleet() {
    let server = RedisServer::start();
    let db = Db { delay: Duration::from_millis(200), ..Db::default() };
    db.set(7, "hot");
    let a = instance(&server, Arc::new(stream(&server).await)).await;
    let b = instance(&server, Arc::new(stream(&server).await)).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let loader = db.loader(7);
        tasks.push(tokio::spawn(async move { cache.get_or_load(&7, loader).await }));
    }
    for t in tasks {
        let v = tokio::time::timeout(Duration::from_secs(5), t).await.expect("bounded").expect("task");
        assert_eq!(v.unwrap().as_deref(), Some("hot"));
    }
    let took = started.elapsed();
    eprintln!(
        "[fleet/stampede] 40 concurrent misses on 2 instances: {} load(s), lease waits A {} B {}, all answered in {took:?}",
        db.loads(),
        a.stats().lease_waits,
        b.stats().lease_waits
    );
    assert_eq!(db.loads(), 1, "one loader for the fleet (lease + single-flight)");
}

/// 4 instances × 64 concurrent reads of one expired key, loader 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_fleet_stampede_on_an_expired_key_loads_once() {
    const TAG: &str = "[fault/stampede]";
    let server = RedisServer::start();
    let db = Db { delay: Duration::from_millis(200), ..Db::default() };
    db.seed([7]);
    let ttl = Duration::from_millis(400);
    let lease_wait = Duration::from_millis(1000);
    let opts = Opts { ttl, jitter: 0.0, lease_wait, ..Opts::default() };
    let mut fleet = Vec::new();
    for _ in 0..4 {
        fleet.push(instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await);
    }
    // Load the key once (L1 of instance 0 and L2), then let it expire everywhere.
    fleet[0].get_or_load(&7, db.loader(7)).await.expect("first load");
    for c in &fleet[1..] {
        c.get_or_load(&7, db.loader(7)).await.expect("from L2");
    }
    assert_eq!(db.loads(), 1);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(fleet.iter().all(|c| c.get_local(&7).is_none()), "{TAG} expired in every L1");
    let probe = support::redis_tier(&server, "fleet").await;
    assert_eq!(l2_version(&probe, 7).await, None, "{TAG} expired in L2");
    db.bump(7);

    let before = db.loads();
    let base: Vec<_> = fleet.iter().map(Cache::stats).collect();
    let gate = Arc::new(tokio::sync::Barrier::new(256));
    let mut tasks = Vec::new();
    for i in 0..256 {
        let (cache, loader, gate) = (fleet[i % 4].clone(), db.loader(7), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let started = Instant::now();
            let v = cache.get_or_load(&7, loader).await;
            (started.elapsed(), v)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        let (took, v) =
            tokio::time::timeout(Duration::from_secs(5), t).await.expect("bounded").expect("read task");
        assert_eq!(version_of(v.expect("read").as_deref()), 2, "{TAG} every read gets the new row");
        latencies.push(took);
    }
    latencies.sort();
    let loads = db.loads() - before;
    let per = |f: fn(&strata::CacheStats) -> u64| -> Vec<u64> {
        fleet.iter().zip(&base).map(|(c, b)| f(&c.stats()) - f(b)).collect()
    };
    eprintln!(
        "{TAG} 4 instances × 64 concurrent reads of one expired key (loader 200 ms, lease_wait {}): loader \
         called {loads} time(s); read latency p50 {} max {} (min {})",
        ms(lease_wait),
        ms(pct(&latencies, 0.5)),
        ms(latencies[latencies.len() - 1]),
        ms(latencies[0])
    );
    eprintln!(
        "{TAG} per instance: loads {:?}, lease waits {:?}, l2 hits {:?}",
        per(|s| s.loads),
        per(|s| s.lease_waits),
        per(|s| s.l2_hits)
    );
    assert_eq!(loads, 1, "{TAG} one loader call for the whole fleet (lease + single-flight)");
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(200) + lease_wait,
        "{TAG} nobody waited out the lease"
    );
}

/// An instance waiting for another's fill polls L2 with plain reads; one poll in four
/// (and the last) runs the lookup script, which could take a released lease over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_polls_with_plain_reads_not_scripts() {
    const TAG: &str = "[fleet/stampede/polls]";
    let server = RedisServer::start();
    let db = Db { delay: Duration::from_millis(600), ..Db::default() };
    db.set(7, "hot");
    let opts = Opts { lease_wait: Duration::from_secs(3), ..Opts::default() };
    let a = instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await;
    let b = instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await;
    server.command(&["CONFIG", "RESETSTAT"]).expect("RESETSTAT");
    let leader = tokio::spawn({
        let (a, loader) = (a.clone(), db.loader(7));
        async move { a.get_or_load(&7, loader).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = b.get_or_load(&7, db.loader(7)).await.expect("the waiter's read");
    assert_eq!(waiter.as_deref(), Some("hot"));
    assert_eq!(leader.await.expect("task").expect("the leader's read").as_deref(), Some("hot"));
    let info = server.command(&["INFO", "commandstats"]).expect("INFO");
    let calls = |cmd: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls="))?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let (scripts, plain) = (calls("evalsha"), calls("getrange"));
    eprintln!(
        "{TAG} one 600 ms load, one waiter: {} load(s), {} lease wait(s), {scripts} scripts run \
         (heartbeats, the leader's lookup and fill, the waiter's lookups), {plain} GETRANGEs",
        db.loads(),
        b.stats().lease_waits
    );
    assert_eq!(db.loads(), 1, "{TAG} the waiter took the leader's fill");
    assert_eq!(b.stats().lease_waits, 1);
    // Polls 1, 2, 4, 8, 16, then every 20 ms: ~30 in 550 ms, every one a script before.
    assert!(plain >= 12, "{TAG} the waiter polled by plain reads: {plain} GETRANGEs");
    assert!(scripts <= 24, "{TAG} {scripts} scripts: the polls between the full ones run none");
}
