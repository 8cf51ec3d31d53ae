//! Redis itself goes away: paused (SIGSTOP) or killed (SIGKILL) and restarted empty,
//! while the fleet keeps reading and writing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata::{BreakerConfig, BreakerState, Cache};
use strata_redis::RedisStreamBackplane;
use strata_testkit::RedisServer;
use tokio::sync::oneshot;

use super::{
    Db, Opts, Workload, instance, instance_with, l2_version, ms, ms_opt, pct, phase, stream, version_of,
    wait_until,
};
use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_reads_fall_back_and_l1_honours_max_stale() {
    let mut server = RedisServer::start();
    let db = Db::default();
    db.set(1, "v1");
    db.set(2, "w1");
    let a = instance(&server, Arc::new(stream(&server).await)).await;
    a.get_or_load(&1, db.loader(1)).await.unwrap();
    server.pause().unwrap();
    let paused_at = Instant::now();
    let outcome = async {
        assert_eq!(a.get_local(&1).as_deref(), Some("v1"), "L1 serves while L2 is away");
        let started = Instant::now();
        let v = a.get_or_load(&2, db.loader(2)).await;
        let load_latency = started.elapsed();
        assert_eq!(v.unwrap().as_deref(), Some("w1"), "a miss goes to the database when L2 is down");
        // With the backplane unhealthy for longer than max_stale (2 s), L1 stops
        // serving entries older than max_stale.
        let gone = async {
            while a.get_local(&1).is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let bounded = tokio::time::timeout(Duration::from_secs(8), gone).await.is_ok();
        (load_latency, bounded, paused_at.elapsed())
    }
    .await;
    server.resume().unwrap();
    let (load_latency, bounded, gone_after) = outcome;
    assert!(bounded, "L1 kept serving an old entry past max_stale with Redis paused");
    eprintln!(
        "[fleet/pause] Redis SIGSTOPped: miss served by the database in {load_latency:?}; L1 stopped serving \
         the old entry {gone_after:?} after the pause (max_stale 2 s)"
    );
    let back = async {
        while !a.is_backplane_healthy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let resumed = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), back).await.expect("healthy after SIGCONT");
    eprintln!("[fleet/pause] backplane healthy {:?} after SIGCONT", resumed.elapsed());
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.unwrap().as_deref(), Some("v1"));
}

/// One sample of the fleet's state, taken every few milliseconds.
struct Sample {
    at: Instant,
    breakers: Vec<BreakerState>,
    healthy: Vec<bool>,
    l2_hits: u64,
    pending: usize,
}

fn sample_fleet(fleet: &[Cache<u64, String>]) -> Sample {
    Sample {
        at: Instant::now(),
        breakers: fleet.iter().map(Cache::l2_breaker_state).collect(),
        healthy: fleet.iter().map(Cache::is_backplane_healthy).collect(),
        l2_hits: fleet.iter().map(|c| c.stats().l2_hits).sum(),
        pending: fleet.iter().map(Cache::pending_invalidations).sum(),
    }
}

/// Samples the fleet every 2 ms until stopped.
fn watch_fleet(fleet: Vec<Cache<u64, String>>) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<Sample>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stopped.load(Ordering::SeqCst) {
            samples.push(sample_fleet(&fleet));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    });
    (stop, handle)
}

/// First sample at or after `from` satisfying `pred`, as a delay after `from`.
fn first_after(samples: &[Sample], from: Instant, pred: impl Fn(&Sample) -> bool) -> Option<Duration> {
    samples.iter().find(|s| s.at >= from && pred(s)).map(|s| s.at - from)
}

/// Three instances read 200 keys at 500 reads/s; Redis is killed with SIGKILL and
/// restarted (empty: no persistence) 5 s later. During the outage 30 rows are
/// updated and invalidated through the caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_kill9_restart_after_5s() {
    const TAG: &str = "[fault/kill-9]";
    let mut server = RedisServer::start();
    let db = Db::default();
    let keys: Vec<u64> = (0..200).collect();
    db.seed(keys.iter().copied());
    // L1 keeps entries 1 s, L2 60 s: before the outage most reads that miss L1 are
    // L2 hits. Lazy tiers: building needs no server, the connection comes and goes.
    let opts = Opts {
        l2_timeout: Duration::from_millis(150),
        l1_ttl: Some(Duration::from_secs(1)),
        max_stale: Duration::from_secs(2),
        lazy: true,
        ..Opts::default()
    };
    let stream_bp = || {
        RedisStreamBackplane::builder(server.url())
            .block(Duration::from_millis(300))
            .read_grace(Duration::from_millis(300))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_millis(500))
            .build()
    };
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(instance_with(&server.url(), Arc::new(stream_bp().await.expect("stream")), &opts).await);
    }
    for c in &fleet {
        for k in &keys {
            c.get_or_load(k, db.loader(*k)).await.expect("warm-up");
        }
    }
    let (stop_watch, watch) = watch_fleet(fleet.clone());
    let workload = Workload::start(fleet.clone(), db.clone(), keys.clone(), 500);
    let started = Instant::now();
    let loads_at_start = db.loads();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let loads_at_kill = db.loads();
    let killed = Instant::now();
    tokio::task::block_in_place(|| server.kill());
    // During the outage: 30 rows change; their invalidations cannot reach L2 or the
    // backplane and are buffered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let updated: Vec<u64> = (0..30).collect();
    let inv_started = Instant::now();
    let mut invalidations = Vec::new();
    for (i, c) in fleet.iter().enumerate() {
        let (c, db) = (c.clone(), db.clone());
        let mine: Vec<u64> = updated.iter().copied().filter(|k| *k as usize % 3 == i).collect();
        invalidations.push(tokio::spawn(async move {
            let mut failed = 0;
            for k in mine {
                db.bump(k);
                if c.invalidate(&k).await.is_err() {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in invalidations {
        failed += tokio::time::timeout(Duration::from_secs(4), t).await.expect("bounded").expect("task");
    }
    let inv_took = inv_started.elapsed();
    let pending: Vec<usize> = fleet.iter().map(Cache::pending_invalidations).collect();
    let until_restart = (killed + Duration::from_secs(5)).saturating_duration_since(Instant::now());
    tokio::time::sleep(until_restart).await;

    let loads_at_restart = db.loads();
    tokio::task::block_in_place(|| server.restart());
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reads = workload.finish().await;
    let ended = Instant::now();
    let loads_at_end = db.loads();

    // Quiescence: buffered invalidations delivered, every backplane healthy.
    wait_until(Duration::from_secs(8), "pending invalidations delivered, backplanes healthy", || {
        fleet.iter().all(|c| c.pending_invalidations() == 0 && c.is_backplane_healthy())
    })
    .await;

    // The truth after the restart: every instance, and L2 itself, has the new rows.
    let probe = support::redis_tier(&server, "fleet").await;
    let mut in_l2 = 0;
    for k in &updated {
        let truth = db.version(*k);
        assert_eq!(truth, 2);
        if let Some(v) = l2_version(&probe, *k).await {
            assert_eq!(
                v, truth,
                "{TAG} L2 holds version {v} of row {k} after the restart, the database {truth}"
            );
            in_l2 += 1;
        }
        for (i, c) in fleet.iter().enumerate() {
            let v = c.get_or_load(k, db.loader(*k)).await.expect("read after recovery");
            assert_eq!(version_of(v.as_deref()), truth, "{TAG} instance {i} row {k} after the restart");
        }
    }

    stop_watch.store(true, Ordering::SeqCst);
    let samples = tokio::time::timeout(Duration::from_secs(5), watch).await.expect("watch").expect("watch");

    let before = phase(&reads, &db, started, killed);
    let during = phase(&reads, &db, killed, restarted);
    let after = phase(&reads, &db, restarted, ended);
    let rate = |loads: u64, from: Instant, to: Instant| loads as f64 / (to - from).as_secs_f64();
    let rate_before = rate(loads_at_kill - loads_at_start, started, killed);
    let rate_during = rate(loads_at_restart - loads_at_kill, killed, restarted);
    let rate_after = rate(loads_at_end - loads_at_restart, restarted, ended);
    let open_after: Vec<String> = (0..fleet.len())
        .map(|i| ms_opt(first_after(&samples, killed, |s| s.breakers[i] == BreakerState::Open)))
        .collect();
    let closed_after: Vec<String> = (0..fleet.len())
        .map(|i| ms_opt(first_after(&samples, restarted, |s| s.breakers[i] == BreakerState::Closed)))
        .collect();
    let all_closed =
        first_after(&samples, restarted, |s| s.breakers.iter().all(|b| *b == BreakerState::Closed));
    let hits_at_restart = samples.iter().rev().find(|s| s.at <= restarted).map_or(0, |s| s.l2_hits);
    let l2_hits_again = first_after(&samples, restarted, |s| s.l2_hits > hits_at_restart);
    let all_healthy = first_after(&samples, restarted, |s| s.healthy.iter().all(|h| *h));
    let drained = first_after(&samples, restarted, |s| s.pending == 0);
    let unhealthy = first_after(&samples, killed, |s| s.healthy.iter().all(|h| !*h));
    let hits_at = |t: Instant| samples.iter().rev().find(|s| s.at <= t).map_or(0, |s| s.l2_hits);
    let l2_hits_before = hits_at(killed) - hits_at(started);
    let l2_hits_during = hits_at(restarted) - hits_at(killed + Duration::from_millis(500));

    eprintln!(
        "{TAG} 3 instances, 500 reads/s over {} keys (L1 TTL 1 s, L2 TTL 60 s, max_stale 2 s, l2_timeout 150 ms, \
         tier response timeout 1 s); redis-server SIGKILLed, restarted empty 5 s later",
        keys.len()
    );
    eprintln!(
        "{TAG} L2 breaker Open after the kill: {open_after:?} (per instance); backplanes all unhealthy {} \
         after the kill",
        ms_opt(unhealthy)
    );
    eprintln!(
        "{TAG} DB loads/s: before {rate_before:.1}, during the outage {rate_during:.1} (ratio during/before \
         {}), after the restart {rate_after:.1} (L2 empty); before the outage L2 absorbed the L1 misses: \
         {l2_hits_before} L2 hits in {}",
        if rate_before > 0.0 {
            format!("{:.0}×", rate_during / rate_before)
        } else {
            "∞: no load at all before".into()
        },
        ms(killed - started)
    );
    eprintln!(
        "{TAG} reads served: before {} / during {} / after {}; errors {} / {} / {}; stale {} / {} / {} \
         (during: the oldest {} after the commit it missed, max_stale 2 s); L2 hits during the outage \
         (from 0.5 s after the kill) {l2_hits_during}",
        before.reads,
        during.reads,
        after.reads,
        before.errors,
        during.errors,
        after.errors,
        before.stale,
        during.stale,
        after.stale,
        ms(during.max_staleness)
    );
    eprintln!(
        "{TAG} read latency p50/p99/max: before {}/{}/{}, during {}/{}/{}, after {}/{}/{}",
        ms(pct(&before.latencies, 0.5)),
        ms(pct(&before.latencies, 0.99)),
        ms(pct(&before.latencies, 1.0)),
        ms(pct(&during.latencies, 0.5)),
        ms(pct(&during.latencies, 0.99)),
        ms(pct(&during.latencies, 1.0)),
        ms(pct(&after.latencies, 0.5)),
        ms(pct(&after.latencies, 0.99)),
        ms(pct(&after.latencies, 1.0)),
    );
    eprintln!(
        "{TAG} during the outage {} rows updated and invalidated through the caches in {}: {failed} \
         invalidate() calls returned an error, buffered (pending per instance {pending:?})",
        updated.len(),
        ms(inv_took)
    );
    eprintln!(
        "{TAG} recovery after the restart: breakers Closed {closed_after:?} (all {}); first L2 hit {}; \
         backplanes healthy {}; buffered invalidations delivered {}",
        ms_opt(all_closed),
        ms_opt(l2_hits_again),
        ms_opt(all_healthy),
        ms_opt(drained)
    );
    eprintln!(
        "{TAG} after the restart: {} stale reads; the {} updated rows read at the new version on every instance; \
         {in_l2} of them in L2, all at the new version",
        after.stale,
        updated.len()
    );
    let slow_after: Vec<String> = reads
        .iter()
        .filter(|r| r.at >= restarted && r.latency > Duration::from_millis(250))
        .map(|r| {
            let by = if updated.contains(&r.key) { format!("{}", r.key % 3) } else { "-".to_owned() };
            format!("reader {} key {} (updated via instance {by}) {}", r.instance, r.key, ms(r.latency))
        })
        .collect();
    eprintln!(
        "{TAG} reads after the restart slower than 250 ms: {} {slow_after:?}; lease waits per instance {:?}. A \
         reader waits up to lease_wait (500 ms) when another instance holds the key's fleet lease and never \
         fills L2: here the instance whose L2 delete of that key is still buffered (it loads from the database \
         but must not fill L2, and leaves its lease to expire)",
        slow_after.len(),
        fleet.iter().map(|c| c.stats().lease_waits).collect::<Vec<_>>()
    );
    let errors: Vec<&String> = reads.iter().filter_map(|r| r.got.as_ref().err()).take(3).collect();
    assert_eq!(before.errors + during.errors + after.errors, 0, "{TAG} reads failed: {errors:?}");
    assert!(during.reads > 1000, "{TAG} reads kept being served during the outage");
    assert!(
        fleet.iter().all(|c| c.stats().l2_errors > 0) && open_after.iter().all(|o| o != "never"),
        "{TAG} every instance's L2 breaker opened: {open_after:?}"
    );
    assert!(rate_during > rate_before, "{TAG} misses went to the database during the outage");
    assert!(during.max_staleness <= opts.max_stale, "{TAG} L1 served beyond max_stale");
    assert_eq!(failed, updated.len(), "{TAG} invalidations during the outage report their failure");
    assert!(pending.iter().all(|p| *p > 0), "{TAG} and are buffered: {pending:?}");
    assert_eq!(after.stale, 0, "{TAG} stale reads after the restart");
    assert!(all_closed.is_some() && l2_hits_again.is_some(), "{TAG} L2 in use again after the restart");
}

/// Redis is SIGSTOPped for 2 s while B and C read at a steady rate (misses load in
/// 5 ms) and A, an otherwise idle instance, runs two slow loads of rows that change
/// meanwhile: S1 is invalidated just before the pause, S2 during it (buffered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_sigstop_2s_bounded_latency_no_stale_fill() {
    const TAG: &str = "[fault/sigstop]";
    let mut server = RedisServer::start();
    let db = Db { delay: Duration::from_millis(5), ..Db::default() };
    let keys: Vec<u64> = (0..1000).collect();
    let (s1, s2) = (5001, 5002);
    db.seed(keys.iter().copied().chain([s1, s2]));
    let l2_timeout = Duration::from_millis(50);
    let loader_time = db.delay;
    let opts = Opts {
        l2_timeout,
        // Fast half-open, so that L2 is in use again soon after SIGCONT.
        cache_breaker: BreakerConfig { open_for: Duration::from_millis(200), ..BreakerConfig::default() },
        // L1 keeps serving through the pause: the staleness bound is max_stale.
        max_stale: Duration::from_secs(5),
        ..Opts::default()
    };
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(instance_with(&server.url(), Arc::new(stream(&server).await), &opts).await);
    }
    let (a, b, c) = (fleet[0].clone(), fleet[1].clone(), fleet[2].clone());
    let workload = Workload::start(vec![b.clone(), c.clone()], db.clone(), keys.clone(), 300);
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A's slow loads read version 1 of S1 and S2, then take 400 / 900 ms.
    let (read1, got1) = oneshot::channel();
    let (read2, got2) = oneshot::channel();
    let load1 = tokio::spawn({
        let (a, l) = (a.clone(), db.loader_with(s1, Duration::from_millis(400), Some(read1)));
        async move { a.get_or_load(&s1, l).await }
    });
    let load2 = tokio::spawn({
        let (a, l) = (a.clone(), db.loader_with(s2, Duration::from_millis(900), Some(read2)));
        async move { a.get_or_load(&s2, l).await }
    });
    let read = tokio::time::timeout(Duration::from_secs(2), async { (got1.await, got2.await) }).await;
    let (r1, r2) = read.expect("slow loads started");
    assert_eq!((version_of(r1.ok().as_deref()), version_of(r2.ok().as_deref())), (1, 1));

    // S1 changes and is invalidated (L2 delete and message succeed); A hears of it.
    let heard = a.stats().invalidations_received;
    db.bump(s1);
    b.invalidate(&s1).await.expect("invalidate S1 before the pause");
    wait_until(Duration::from_secs(1), "A hears S1's invalidation", || {
        a.stats().invalidations_received > heard
    })
    .await;
    server.pause().expect("SIGSTOP");
    let paused = Instant::now();
    let loads_at_pause = db.loads();

    // S2 changes during the pause: its invalidation fails and is buffered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.bump(s2);
    let inv2 = b.invalidate(&s2).await;
    let b_pending = b.pending_invalidations();
    tokio::time::sleep((paused + Duration::from_secs(2)).saturating_duration_since(Instant::now())).await;
    let loads_during_pause = db.loads() - loads_at_pause;
    server.resume().expect("SIGCONT");
    let resumed = Instant::now();
    let (v1, v2) = tokio::time::timeout(Duration::from_secs(3), async { (load1.await, load2.await) })
        .await
        .expect("slow loads finish");
    let (v1, v2) = (v1.expect("task").expect("load S1"), v2.expect("task").expect("load S2"));

    // What L2 holds for S2 right after SIGCONT: A's fill was sent during the pause
    // and Redis runs it now; B's delete was never sent (B's breaker was open).
    let mut l2_after_sigcont = Vec::new();
    let probe = support::redis_tier(&server, "fleet").await;
    for _ in 0..10 {
        l2_after_sigcont.push(l2_version(&probe, s2).await.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // After SIGCONT S1 and S2 become hot: each instance reads them every 20 ms from
    // the moment its L2 breaker has closed again (so the reads go through L2), until
    // the buffered invalidation is delivered and every backplane is healthy.
    let mut hot_stale: Vec<(usize, u64, Duration)> = Vec::new();
    let mut l2_back = [false; 3];
    let settle = async {
        loop {
            for (i, cache) in fleet.iter().enumerate() {
                l2_back[i] |= cache.l2_breaker_state() == BreakerState::Closed;
                if !l2_back[i] {
                    continue;
                }
                for k in [s1, s2] {
                    let truth = db.version(k);
                    let at = Instant::now();
                    let v = cache.get_or_load(&k, db.loader(k)).await.expect("hot read");
                    if version_of(v.as_deref()) < truth {
                        hot_stale.push((i, k, at - resumed));
                    }
                }
            }
            if fleet.iter().all(|c| c.pending_invalidations() == 0 && c.is_backplane_healthy()) {
                return resumed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let settled = tokio::time::timeout(Duration::from_secs(10), settle).await.expect("fleet settles");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads = workload.finish().await;

    // Afterwards: no older version of S1 or S2 in L2 or in any L1.
    let mut leftovers = Vec::new();
    for k in [s1, s2] {
        let truth = db.version(k);
        if let Some(v) = l2_version(&probe, k).await
            && v < truth
        {
            leftovers.push(format!("L2 holds v{v} of row {k} (database v{truth})"));
        }
        for (i, cache) in fleet.iter().enumerate() {
            let v = version_of(cache.get_local(&k).as_deref());
            if v != 0 && v < truth {
                leftovers.push(format!("instance {i}'s L1 holds v{v} of row {k} (database v{truth})"));
            }
        }
    }

    let during = phase(&reads, &db, paused, resumed);
    let after = phase(&reads, &db, resumed, resumed + Duration::from_secs(60));
    let margin = Duration::from_millis(30);
    let bound = l2_timeout + loader_time + margin;
    let p99 = pct(&during.latencies, 0.99);
    eprintln!(
        "{TAG} redis-server SIGSTOPped for 2 s; B and C read 1000 keys at 300 reads/s (loader 5 ms, l2_timeout \
         {}, tier response timeout 1 s); A runs two slow loads (400 / 900 ms) of rows S1, S2 that change meanwhile",
        ms(l2_timeout)
    );
    eprintln!(
        "{TAG} latency of the {} reads during the pause ({loads_during_pause} of them missed and were loaded): \
         p50 {} p99 {} max {}; bound on p99 = l2_timeout {} + loader {} + margin {} = {}; errors {}",
        during.reads,
        ms(pct(&during.latencies, 0.5)),
        ms(p99),
        ms(pct(&during.latencies, 1.0)),
        ms(l2_timeout),
        ms(loader_time),
        ms(margin),
        ms(bound),
        during.errors
    );
    eprintln!(
        "{TAG} after SIGCONT: reads p50 {} p99 {} max {}, errors {}, stale {}; fleet settled (buffered \
         invalidation delivered, backplanes healthy) {} after SIGCONT",
        ms(pct(&after.latencies, 0.5)),
        ms(pct(&after.latencies, 0.99)),
        ms(pct(&after.latencies, 1.0)),
        after.errors,
        after.stale,
        ms(settled)
    );
    eprintln!(
        "{TAG} slow loads returned S1 v{} and S2 v{} to their waiting caller (they began before the \
         invalidations); A's fills_rejected {}; B's S2 invalidation during the pause: {} (pending {b_pending})",
        version_of(v1.as_deref()),
        version_of(v2.as_deref()),
        a.stats().fills_rejected,
        match &inv2 {
            Ok(()) => "succeeded".to_owned(),
            Err(e) => format!("failed and was buffered ({e})"),
        }
    );
    let mut windows: Vec<String> = Vec::new();
    for (i, name) in ["A", "B", "C"].iter().enumerate() {
        for k in [s1, s2] {
            let ts: Vec<Duration> =
                hot_stale.iter().filter(|(j, kk, _)| *j == i && *kk == k).map(|(_, _, t)| *t).collect();
            if let (Some(first), Some(last)) = (ts.first(), ts.last()) {
                let row = if k == s1 { "S1" } else { "S2" };
                windows.push(format!(
                    "{name} served old {row} {} times from +{} to +{}",
                    ts.len(),
                    ms(*first),
                    ms(*last)
                ));
            }
        }
    }
    eprintln!(
        "{TAG} S2 in L2 during the first 100 ms after SIGCONT (version per 10 ms probe, 0 = absent): \
         {l2_after_sigcont:?}"
    );
    let s2_commit = db.committed_at(s2, 2).expect("S2 v2 committed");
    let last_stale = hot_stale.iter().map(|(_, _, t)| *t).max();
    eprintln!(
        "{TAG} hot reads (all instances, every 20 ms once their L2 breaker closed) after SIGCONT that returned \
         an older version: {} [{}]; the last one {} after S2's commit (max_stale {}); lease waits {:?}",
        hot_stale.len(),
        windows.join(", "),
        ms_opt(last_stale.map(|t| (resumed + t).saturating_duration_since(s2_commit))),
        ms(opts.max_stale),
        fleet.iter().map(|c| c.stats().lease_waits).collect::<Vec<_>>()
    );
    eprintln!(
        "{TAG} afterwards (buffered invalidation delivered): {}",
        if leftovers.is_empty() {
            "no older version in L2 or any L1".to_owned()
        } else {
            leftovers.join("; ")
        }
    );
    assert_eq!(during.errors + after.errors, 0, "{TAG} reads failed");
    assert!(
        during.reads > 300 && loads_during_pause > 50,
        "{TAG} reads and misses kept flowing during the pause"
    );
    assert!(p99 <= bound, "{TAG} p99 during the pause {p99:?} exceeds {bound:?}");
    assert!(inv2.is_err() && b_pending > 0, "{TAG} the invalidation during the pause is buffered");
    assert!(leftovers.is_empty(), "{TAG} a stale fill survived: {leftovers:?}");
    for (i, cache) in fleet.iter().enumerate() {
        for k in [s1, s2] {
            let v = cache.get_or_load(&k, db.loader(k)).await.expect("read");
            assert_eq!(version_of(v.as_deref()), db.version(k), "{TAG} instance {i} row {k}");
        }
    }
}
