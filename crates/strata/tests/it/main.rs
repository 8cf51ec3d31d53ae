//! Behaviour of the core cache: single-flight, fill guards, fail-safe, timeouts, early
//! refresh, tags, namespaces, sliding TTL, `max_stale`, gap repair, and the error paths.
//! Time-dependent logic runs on a `ManualClock` (or tokio's paused time for timeouts):
//! no test sleeps to let a TTL pass.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use strata::backplane::Mode;
use strata::{
    Backplane, BreakerConfig, BreakerState, Cache, CacheKey, Clock, Consistency, ErrorKind,
    InProcessBackplane, InProcessTier, ManualClock, Tier, TierConfig,
};
use tokio::sync::{Notify, Semaphore};

const NS: &str = "settings";

/// A tiny "database": the source of truth the loaders read.
#[derive(Clone, Default)]
struct Db(Arc<Mutex<HashMap<u64, String>>>);

impl Db {
    fn with(rows: &[(u64, &str)]) -> Self {
        let db = Db::default();
        for (k, v) in rows {
            db.set(*k, v);
        }
        db
    }
    fn set(&self, k: u64, v: &str) {
        self.0.lock().insert(k, v.to_owned());
    }
    fn get(&self, k: u64) -> Option<String> {
        self.0.lock().get(&k).cloned()
    }
    /// A loader reading the current row.
    fn loader(
        &self,
        k: u64,
    ) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, io::Error>> + Send + 'static {
        let db = self.clone();
        move || std::future::ready(Ok(db.get(k)))
    }
}

type BoxedLoad = std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, io::Error>> + Send>>;

/// A loader that reads the row when it starts, signals `started`, then waits for a
/// permit on `gate` before returning what it read: a slow database read.
fn slow_loader(
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

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

struct Fleet {
    tier: InProcessTier,
    conns: Vec<InProcessBackplane>,
    caches: Vec<Cache<u64, String>>,
}

async fn fleet(n: usize, mode: Mode, clock: Option<ManualClock>) -> Fleet {
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
        let cache = b.build().expect("valid config");
        cache.ready().await;
        conns.push(conn);
        caches.push(cache);
    }
    Fleet { tier, conns, caches }
}

fn l2_value(tier: &InProcessTier, key: u64) -> Option<String> {
    let env = tier.raw(NS, &key.to_key_string())?;
    env.value.map(|b| postcard::from_bytes(&b).expect("decodable"))
}

// ---------------------------------------------------------------------------------
// Single-flight

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_callers_share_one_l2_read_and_one_loader_call() {
    let f = fleet(1, Mode::Stream, None).await;
    let cache = f.caches[0].clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let ops_before = f.tier.ops();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (cache, calls, entered, gate) = (cache.clone(), calls.clone(), entered.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            entered.fetch_add(1, Ordering::SeqCst);
            cache
                .get_or_load(&7, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("gate").forget();
                    Ok::<_, io::Error>(Some("loaded".to_string()))
                })
                .await
        }));
    }
    eventually("all callers entered", || entered.load(Ordering::SeqCst) == 1000).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(1);
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("value").as_deref(), Some("loaded"));
    }
    eprintln!("single-flight: 1000 callers, loader calls = {}", calls.load(Ordering::SeqCst));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the loader ran once");
    // One lookup (with the lease) and one fill.
    assert_eq!(f.tier.ops() - ops_before, 2, "one L2 read and one L2 fill");
    let s = cache.stats();
    assert_eq!(s.loads, 1);
    assert_eq!(s.misses, 1);
}

#[tokio::test]
async fn coalesced_callers_share_the_loaders_error() {
    let cache: Cache<u64, String> = Cache::builder(NS).build().expect("valid");
    let gate = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (cache, gate, calls) = (cache.clone(), gate.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("gate").forget();
                    Err::<Option<String>, _>(io::Error::other("db down"))
                })
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(1);
    for t in tasks {
        let err = t.await.expect("task").expect_err("loader failed");
        assert!(err.is_loader());
        assert!(err.to_string().contains("db down"), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().load_errors, 1);
}

// ---------------------------------------------------------------------------------
// Fill guards: the slow-fill race, three variants

/// Starts a slow load of key 1 (reading "v1") on `reader`, then commits "v2" and
/// invalidates through `writer`; returns the slow load's task and its gate.
async fn race_setup(
    f: &Fleet,
    db: &Db,
) -> (tokio::task::JoinHandle<strata::Result<Option<String>>>, Arc<Semaphore>) {
    let reader = f.caches[0].clone();
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let loader = slow_loader(db, 1, started.clone(), gate.clone());
    let slow = tokio::spawn(async move { reader.get_or_load(&1, loader).await });
    started.notified().await;
    db.set(1, "v2");
    (slow, gate)
}

async fn wait_applied(cache: &Cache<u64, String>, n: u64) {
    eventually("invalidation applied", || cache.stats().invalidations_applied >= n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fill_is_refused_when_the_newer_entry_is_still_present() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    let (slow, gate) = race_setup(&f, &db).await;
    b.invalidate(&1).await.expect("invalidate");
    wait_applied(a, 1).await;

    // A reader arriving after the invalidation must not join the old load.
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v2"));
    gate.add_permits(1);
    assert_eq!(slow.await.expect("task").expect("load").as_deref(), Some("v1"), "its own caller gets it");

    assert_eq!(a.get_local(&1).as_deref(), Some("v2"), "L1 keeps the newer entry");
    assert_eq!(l2_value(&f.tier, 1).as_deref(), Some("v2"), "L2 keeps the newer entry");
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert!(a.stats().fills_rejected >= 1);
    eprintln!("race/newer-present: stale entries left = 0, fills rejected = {}", a.stats().fills_rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fill_is_refused_even_after_the_newer_entry_was_evicted() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    let (slow, gate) = race_setup(&f, &db).await;
    b.invalidate(&1).await.expect("invalidate");
    wait_applied(a, 1).await;
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v2"));

    // The newer entry disappears from both tiers without an invalidation.
    a.evict_local(&1);
    f.tier.evict(NS, "1");
    gate.add_permits(1);
    slow.await.expect("task").expect("load");

    assert_eq!(a.get_local(&1), None, "nothing stale in L1");
    assert_eq!(l2_value(&f.tier, 1), None, "nothing stale in L2");
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    eprintln!("race/newer-evicted: stale entries left = 0, fills rejected = {}", a.stats().fills_rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fill_is_refused_when_the_apply_path_meets_a_malformed_key() {
    let f = fleet(1, Mode::Stream, None).await;
    let a = &f.caches[0];
    // A second instance of the same namespace whose keys are strings: its message
    // carries a key the u64 cache cannot parse, next to one it can.
    let writer: Cache<String, String> = Cache::builder(NS)
        .tier(Arc::new(f.tier.clone()))
        .backplane(Arc::new(f.conns[0].connect()))
        .build()
        .expect("valid");
    writer.ready().await;
    let db = Db::with(&[(1, "v1")]);
    let (slow, gate) = race_setup(&f, &db).await;
    writer.invalidate_many(&["not-a-number".to_string(), "1".to_string()]).await.expect("invalidate");
    wait_applied(a, 1).await;
    assert!(a.stats().malformed_messages >= 1, "the bad key is counted");
    gate.add_permits(1);
    slow.await.expect("task").expect("load");
    assert_eq!(a.get_local(&1), None, "the apply still evicted and guarded key 1");
    assert_eq!(l2_value(&f.tier, 1), None);
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fill_is_refused_when_the_l2_delete_fails_during_invalidation() {
    let f = fleet(1, Mode::Stream, None).await;
    let a = &f.caches[0];
    let db = Db::with(&[(1, "v1")]);
    let (slow, gate) = race_setup(&f, &db).await;
    f.tier.set_available(false);
    let err = a.invalidate(&1).await.expect_err("L2 is down");
    assert!(err.is_transient(), "{err}");
    assert_eq!(a.pending_invalidations(), 1, "the delete is buffered");
    f.tier.set_available(true);
    gate.add_permits(1);
    slow.await.expect("task").expect("load");
    assert_eq!(a.get_local(&1), None, "L1 was evicted despite the error");
    assert_eq!(l2_value(&f.tier, 1), None, "no fill reached L2 while its delete was pending");
    assert_eq!(a.flush_pending().await, 0);
    assert_eq!(a.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    assert_eq!(l2_value(&f.tier, 1).as_deref(), Some("v2"));
}

// ---------------------------------------------------------------------------------
// Fail-safe and timeouts

fn manual_cache(clock: &ManualClock) -> strata::CacheBuilder<u64, String> {
    Cache::builder(NS).clock(Arc::new(clock.clone())).ttl_jitter(0.0).time_to_live(Duration::from_secs(10))
}

#[tokio::test]
async fn failing_loader_serves_the_stale_copy_and_throttles_reloads() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock)
        .fail_safe(Duration::from_secs(60), Duration::from_secs(5))
        .build()
        .expect("valid");
    let db = Db::with(&[(1, "v1")]);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Option<String>, _>(io::Error::other("db down"))
        }
    };
    let v = cache.get_or_load(&1, failing(calls.clone())).await.expect("stale copy");
    assert_eq!(v.as_deref(), Some("v1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Within the throttle period the loader is not called again.
    clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get_or_load(&1, failing(calls.clone())).await.expect("stale").as_deref(), Some("v1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "throttled");
    // After it, one more attempt.
    clock.advance(Duration::from_secs(4));
    assert_eq!(cache.get_or_load(&1, failing(calls.clone())).await.expect("stale").as_deref(), Some("v1"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(cache.stats().stale_served >= 3);
    // Past the fail-safe window the error surfaces.
    clock.advance(Duration::from_secs(120));
    assert!(cache.get_or_load(&1, failing(calls.clone())).await.expect_err("too old").is_loader());
}

#[tokio::test]
async fn without_fail_safe_a_loader_error_is_returned() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock).build().expect("valid");
    let db = Db::with(&[(1, "v1")]);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));
    let err = cache
        .get_or_load(&1, || async { Err::<Option<String>, _>(io::Error::other("boom")) })
        .await
        .expect_err("no fail-safe");
    assert_eq!(err.kind(), ErrorKind::Loader);
}

#[tokio::test(start_paused = true)]
async fn soft_timeout_returns_the_stale_copy_and_the_load_refreshes_in_the_background() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock)
        .fail_safe(Duration::from_secs(60), Duration::from_secs(1))
        .soft_timeout(Duration::from_millis(100))
        .hard_timeout(Duration::from_secs(5))
        .build()
        .expect("valid");
    let db = Db::with(&[(1, "v1")]);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));
    db.set(1, "v2");
    let slow_db = db.clone();
    let began = tokio::time::Instant::now();
    let v = cache
        .get_or_load(&1, move || async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, io::Error>(slow_db.get(1))
        })
        .await
        .expect("stale copy");
    assert_eq!(v.as_deref(), Some("v1"), "answered with the stale copy");
    assert_eq!(began.elapsed(), Duration::from_millis(100), "at the soft timeout");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cache.get_local(&1).as_deref(), Some("v2"), "the background load refreshed L1");
}

#[tokio::test(start_paused = true)]
async fn hard_timeout_fails_the_load_or_falls_back_to_the_stale_copy() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock).hard_timeout(Duration::from_millis(300)).build().expect("valid");
    let hang = || async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, io::Error>(Some("never".to_string()))
    };
    let err = cache.get_or_load(&1, hang).await.expect_err("timed out");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(cache.stats().load_timeouts, 1);

    let safe = manual_cache(&clock)
        .fail_safe(Duration::from_secs(60), Duration::from_secs(1))
        .hard_timeout(Duration::from_millis(300))
        .build()
        .expect("valid");
    safe.insert(1, "v1".into()).await.expect("insert");
    clock.advance(Duration::from_secs(11));
    assert_eq!(safe.get_or_load(&1, hang).await.expect("fallback").as_deref(), Some("v1"));
}

// ---------------------------------------------------------------------------------
// Early refresh (XFetch)

/// Measures how often the XFetch rule fires at `gap` before expiry, with a load that
/// took Δ = 100 ms and β = 1.
async fn xfetch_rate(gap_in_deltas: f64, hits: usize) -> f64 {
    let clock = ManualClock::new();
    let ttl = Duration::from_secs(60);
    let delta = Duration::from_millis(100);
    let cache = manual_cache(&clock).time_to_live(ttl).early_refresh(1.0).seed(7).build().expect("valid");
    let c = clock.clone();
    cache
        .get_or_load(&1, move || async move {
            c.advance(delta);
            Ok::<_, io::Error>(Some("v".to_string()))
        })
        .await
        .expect("load");
    // The entry expires `ttl` after the load finished.
    let expiry = clock.now().saturating_add(ttl);
    clock.set(expiry.saturating_sub(delta.mul_f64(gap_in_deltas)));
    for _ in 0..hits {
        let v = cache.get_or_load(&1, std::future::pending::<Result<Option<String>, io::Error>>).await;
        assert_eq!(v.expect("hit").as_deref(), Some("v"));
    }
    let s = cache.stats();
    assert!(s.early_refreshes <= 1, "one refresh at a time");
    s.early_refresh_decisions as f64 / hits as f64
}

#[tokio::test]
async fn early_refresh_fires_at_the_rate_the_xfetch_formula_gives() {
    let n = 20_000;
    for gap in [0.5_f64, 1.0, 3.0] {
        let expected = (-gap).exp();
        let got = xfetch_rate(gap, n).await;
        let sigma = (expected * (1.0 - expected) / n as f64).sqrt();
        eprintln!("xfetch: gap = {gap}·Δβ: expected rate {expected:.4}, measured {got:.4} (σ {sigma:.4})");
        assert!((got - expected).abs() < 5.0 * sigma, "gap {gap}: {got} vs {expected}");
    }
    assert_eq!(xfetch_rate(40.0, 1000).await, 0.0, "far from expiry it never fires");
}

// ---------------------------------------------------------------------------------
// Tags, namespaces, sliding TTL, negative caching

#[tokio::test]
async fn tag_invalidation_hides_tagged_entries_and_refuses_tagged_fills_in_flight() {
    let f = fleet(2, Mode::Stream, None).await;
    let tier = f.tier.clone();
    let hub = f.conns[0].connect();
    let tagged = |tier: &InProcessTier, conn: InProcessBackplane| {
        Cache::<u64, String>::builder("tagged")
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(conn))
            .tags(|k, _v| vec![if k % 2 == 0 { "even".into() } else { "odd".into() }])
            .build()
            .expect("valid")
    };
    let a = tagged(&tier, hub.connect());
    let b = tagged(&tier, hub.connect());
    a.ready().await;
    b.ready().await;
    let db = Db::with(&[(1, "one"), (2, "two"), (3, "three"), (4, "four")]);
    for k in 1..=4 {
        a.get_or_load(&k, db.loader(k)).await.expect("load");
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let (a2, loader) = (a.clone(), slow_loader(&db, 6, started.clone(), gate.clone()));
    let slow = tokio::spawn(async move { a2.get_or_load(&6, loader).await });
    started.notified().await;

    b.invalidate_tag("even").await.expect("invalidate tag");
    eventually("tag applied", || a.stats().invalidations_applied >= 1).await;
    for c in [&a, &b] {
        assert_eq!(c.get_local(&2), None);
        assert_eq!(c.get_local(&4), None);
        assert_eq!(c.get_local(&1).as_deref(), Some("one"));
        assert_eq!(c.get_local(&3).as_deref(), Some("three"));
    }
    // L2 hides them too (a fresh instance reads through to L2).
    let c = tagged(&tier, hub.connect());
    c.ready().await;
    assert_eq!(c.get(&2).await.expect("get"), None);
    assert_eq!(c.get(&1).await.expect("get").as_deref(), Some("one"));

    db.set(6, "six");
    gate.add_permits(1);
    slow.await.expect("task").expect("load");
    assert_eq!(a.get_local(&6), None, "a fill tagged 'even' that began before the bump is refused");
}

#[tokio::test]
async fn invalidate_all_hides_every_entry_in_every_tier() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    for k in [1, 2] {
        a.get_or_load(&k, db.loader(k)).await.expect("load");
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    a.invalidate_all().await.expect("invalidate all");
    eventually("flush applied", || b.stats().invalidations_applied >= 1).await;
    for c in [a, b] {
        assert_eq!(c.get_local(&1), None);
        assert_eq!(c.get(&2).await.expect("get"), None, "L2 hides them as well");
    }
}

#[tokio::test]
async fn touch_slides_the_expiry_of_a_live_entry() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock).build().expect("valid");
    cache.insert(1, "draft".into()).await.expect("insert");
    for _ in 0..5 {
        clock.advance(Duration::from_secs(8));
        assert!(cache.touch(&1).await.expect("touch"), "still live");
    }
    assert_eq!(cache.get_local(&1).as_deref(), Some("draft"), "40 s later, thanks to touch");
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get_local(&1), None, "expired once the heartbeats stopped");
    assert!(!cache.touch(&1).await.expect("touch"));
}

#[tokio::test]
async fn touch_extends_the_l2_entry_too() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
    let cache = manual_cache(&clock).tier(Arc::new(tier.clone())).build().expect("valid");
    cache.insert(1, "draft".into()).await.expect("insert");
    clock.advance(Duration::from_secs(8));
    assert!(cache.touch(&1).await.expect("touch"));
    clock.advance(Duration::from_secs(8));
    cache.evict_local(&1);
    assert_eq!(cache.get(&1).await.expect("get").as_deref(), Some("draft"), "L2 copy was extended");
}

#[tokio::test]
async fn negative_results_are_cached_only_when_asked() {
    let calls = Arc::new(AtomicUsize::new(0));
    let missing = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<Option<String>, io::Error>(None)
        }
    };
    let plain: Cache<u64, String> = Cache::builder(NS).build().expect("valid");
    plain.get_or_load(&1, missing(calls.clone())).await.expect("none");
    plain.get_or_load(&1, missing(calls.clone())).await.expect("none");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let negative: Cache<u64, String> =
        Cache::builder(NS).negative_ttl(Duration::from_secs(5)).build().expect("valid");
    calls.store(0, Ordering::SeqCst);
    assert_eq!(negative.get_or_load(&1, missing(calls.clone())).await.expect("none"), None);
    assert_eq!(negative.get_or_load(&1, missing(calls.clone())).await.expect("none"), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the 'not found' was cached");
}

#[tokio::test]
async fn ttl_expiry_is_checked_on_read() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock).build().expect("valid");
    cache.insert(1, "v".into()).await.expect("insert");
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(cache.get_local(&1).as_deref(), Some("v"));
    clock.advance(Duration::from_millis(2));
    assert_eq!(cache.get_local(&1), None);
}

// ---------------------------------------------------------------------------------
// Backplane: own messages, gaps, repair, max_stale

#[tokio::test]
async fn invalidation_reaches_every_other_instance_and_own_messages_are_ignored() {
    let f = fleet(3, Mode::Stream, None).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &f.caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    db.set(1, "v2");
    f.caches[0].invalidate(&1).await.expect("invalidate");
    for c in &f.caches[1..] {
        eventually("applied", || c.stats().invalidations_applied == 1).await;
        assert_eq!(c.get_local(&1), None);
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("reload").as_deref(), Some("v2"));
    }
    assert_eq!(f.caches[0].stats().invalidations_received, 0, "own message skipped");
    assert_eq!(f.caches[0].stats().invalidations_sent, 1);
}

#[tokio::test]
async fn insert_makes_the_new_value_visible_fleet_wide() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    a.insert(1, "v2".into()).await.expect("insert");
    eventually("applied", || b.stats().invalidations_applied == 1).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(b.stats().loads, 1, "v2 came from L2, not the database");
}

#[tokio::test]
async fn a_dropped_message_is_detected_and_replayed_from_a_stream() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    for k in [1, 2] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    a.invalidate(&2).await.expect("invalidate");
    eventually("repaired", || b.stats().repairs_replayed == 1).await;
    assert_eq!(b.get_local(&1), None, "the dropped invalidation was replayed");
    assert_eq!(b.get_local(&2), None);
    let s = b.stats();
    assert_eq!((s.gaps_detected, s.repairs_flushed), (1, 0));
}

#[tokio::test]
async fn a_dropped_message_on_pubsub_is_repaired_by_a_flush() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two"), (3, "three")]);
    for k in [1, 2, 3] {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    a.invalidate(&2).await.expect("invalidate");
    eventually("repaired", || b.stats().repairs_flushed == 1).await;
    assert_eq!(b.get_local(&1), None);
    assert_eq!(b.get_local(&3), None, "a flush drops everything");
}

#[tokio::test]
async fn a_lost_last_message_is_detected_by_the_next_heartbeat() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    // Let b hear a's heartbeats first, so a's origin is known.
    eventually("heartbeat heard", || b.stats().heartbeats_received >= 1).await;
    f.conns[1].faults().drop_next(1);
    a.invalidate(&1).await.expect("invalidate");
    eventually("heartbeat repaired the gap", || b.stats().repairs_flushed >= 1).await;
    assert_eq!(b.get_local(&1), None);
}

#[tokio::test]
async fn reordered_and_delayed_messages_still_evict_everything() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "1"), (2, "2"), (3, "3"), (4, "4")]);
    for k in 1..=4 {
        b.get_or_load(&k, db.loader(k)).await.expect("load");
    }
    f.conns[1].faults().set_reorder(true);
    f.conns[1].faults().set_delay(Duration::from_millis(5));
    for k in 1..=4 {
        a.invalidate(&k).await.expect("invalidate");
    }
    eventually("all applied", || (1..=4).all(|k| b.get_local(&k).is_none())).await;
    f.conns[1].faults().clear();
}

#[tokio::test]
async fn disconnect_then_resume_flushes_on_pubsub_and_counts_the_gap() {
    let f = fleet(2, Mode::PubSub, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "one"), (2, "two")]);
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    f.conns[1].faults().set_disconnected(true);
    eventually("unhealthy", || !b.is_backplane_healthy()).await;
    a.invalidate(&1).await.expect("invalidate");
    f.conns[1].faults().set_disconnected(false);
    eventually("resumed", || b.is_backplane_healthy()).await;
    let s = b.stats();
    assert!(s.gaps_detected >= 1 && s.repairs_flushed >= 1, "{s:?}");
    assert_eq!(b.get_local(&2), None);
}

#[tokio::test]
async fn while_the_backplane_is_down_longer_than_max_stale_old_entries_are_not_served() {
    let clock = ManualClock::new();
    let f = fleet(2, Mode::Stream, Some(clock.clone())).await;
    let b = &f.caches[1];
    let db = Db::with(&[(1, "old"), (2, "young")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(3));
    f.conns[1].faults().set_disconnected(true);
    eventually("unhealthy", || !b.is_backplane_healthy()).await;
    // Within max_stale (2 s) of the outage, everything is still served.
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.get_local(&1).as_deref(), Some("old"));
    b.get_or_load(&2, db.loader(2)).await.expect("load");
    // Past it, only entries younger than max_stale are.
    clock.advance(Duration::from_millis(1500));
    assert_eq!(b.get_local(&1), None, "older than max_stale");
    assert_eq!(b.get_local(&2).as_deref(), Some("young"));
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.get_local(&2), None, "loaded during the outage: lives at most max_stale");
    f.conns[1].faults().set_disconnected(false);
    eventually("healthy again", || b.is_backplane_healthy()).await;
}

// ---------------------------------------------------------------------------------
// L2 failures, Strong level, bad input, bad config

#[tokio::test]
async fn with_l2_down_reads_go_to_the_loader_and_the_breaker_opens() {
    let f = fleet(1, Mode::Stream, None).await;
    let tier = f.tier.clone();
    let cache: Cache<u64, String> = Cache::builder("outage")
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(f.conns[0].connect()))
        .breaker(BreakerConfig { consecutive_failures: 3, ..BreakerConfig::default() })
        .build()
        .expect("valid");
    cache.ready().await;
    tier.set_available(false);
    let db = Db::with(&[(1, "one"), (2, "two"), (3, "three"), (4, "four")]);
    for k in 1..=4 {
        assert!(cache.get_or_load(&k, db.loader(k)).await.expect("served by the loader").is_some());
    }
    assert_eq!(cache.l2_breaker_state(), BreakerState::Open);
    let ops = tier.ops();
    cache.evict_local(&1);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    assert_eq!(tier.ops(), ops, "an open breaker spares the tier");
    tier.set_available(true);
}

#[tokio::test]
async fn strong_level_bypasses_the_cache_until_a_failed_delete_is_made_good() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .backplane(Arc::new(hub.connect()))
        .consistency(Consistency::Strong)
        .build()
        .expect("valid");
    cache.ready().await;
    let db = Db::with(&[(1, "v1")]);
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    tier.set_available(false);
    assert!(cache.invalidate(&1).await.is_err());
    assert!(cache.is_bypassed());
    assert_eq!(cache.l2_breaker_state(), BreakerState::ForcedOpen);
    tier.set_available(true);
    // L2 still holds v1 (the delete failed), but reads bypass it.
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"));
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("bypass").as_deref(), Some("v2"));
    assert!(cache.stats().bypassed_reads >= 1);
    assert_eq!(cache.flush_pending().await, 0);
    assert!(!cache.is_bypassed(), "trusted again after the namespace bump");
    assert_eq!(cache.l2_breaker_state(), BreakerState::Closed);
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_failed_publish_is_buffered_and_retried() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    f.conns[0].faults().set_disconnected(true);
    let err = a.invalidate(&1).await.expect_err("publish failed");
    assert_eq!(err.kind(), ErrorKind::Backplane);
    f.conns[0].faults().set_disconnected(false);
    eventually("retried", || a.pending_invalidations() == 0).await;
    eventually("b evicted", || b.get_local(&1).is_none()).await;
}

#[tokio::test]
async fn oversized_values_are_refused_and_nothing_changes() {
    let tier = InProcessTier::new();
    let cache: Cache<u64, String> =
        Cache::builder(NS).tier(Arc::new(tier.clone())).max_value_bytes(16).build().expect("valid");
    cache.insert(1, "small".into()).await.expect("fits");
    let err = cache.insert(1, "x".repeat(100)).await.expect_err("too big");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("max_value_bytes"), "{err}");
    assert_eq!(cache.get_local(&1).as_deref(), Some("small"), "nothing changed");
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("small"));
}

#[tokio::test]
async fn an_undecodable_l2_entry_is_a_counted_miss_and_is_evicted() {
    let tier = InProcessTier::new();
    let cache: Cache<u64, String> = Cache::builder(NS).tier(Arc::new(tier.clone())).build().expect("valid");
    let garbage = strata::Envelope {
        value: Some(bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff])),
        version: None,
        created: strata::SystemClock::default().now(),
        soft_expiry: strata::SystemClock::default().now().saturating_add(Duration::from_secs(60)),
        hard_expiry: strata::SystemClock::default().now().saturating_add(Duration::from_secs(60)),
        stamp: 0,
        tags: vec![],
        load_nanos: 0,
    };
    tier.set(NS, "1", garbage, Duration::from_secs(60)).await.expect("set");
    let db = Db::with(&[(1, "good")]);
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("good"));
    assert_eq!(cache.stats().l2_undecodable, 1);
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("good"), "replaced by a good fill");
}

#[tokio::test]
async fn bad_configuration_fails_at_build_time_with_a_fix() {
    let cases: Vec<(&str, strata::CacheBuilder<u64, String>)> = vec![
        ("namespace", Cache::builder("has space")),
        ("max_capacity", Cache::builder(NS).max_capacity(0)),
        ("ttl_jitter", Cache::builder(NS).ttl_jitter(2.0)),
        ("time_to_live", Cache::builder(NS).time_to_live(Duration::ZERO)),
        ("soft_timeout", Cache::builder(NS).soft_timeout(Duration::from_secs(1))),
        (
            "soft_timeout",
            Cache::builder(NS)
                .fail_safe(Duration::from_secs(1), Duration::from_secs(1))
                .soft_timeout(Duration::from_secs(20)),
        ),
        ("consistency", Cache::builder(NS).consistency(Consistency::Invalidated)),
        ("early_refresh", Cache::builder(NS).early_refresh(f64::NAN)),
        (
            "hard_timeout",
            Cache::builder(NS).tier(Arc::new(InProcessTier::new())).hard_timeout(Duration::from_secs(120)),
        ),
        ("breaker.window", Cache::builder(NS).breaker(BreakerConfig { window: 0, ..Default::default() })),
    ];
    for (setting, builder) in cases {
        let err = builder.build().err().unwrap_or_else(|| panic!("{setting} should be refused"));
        assert_eq!(err.setting, setting, "{err}");
        assert!(!err.fix.is_empty());
        eprintln!("{err}");
    }
}

#[tokio::test]
async fn strong_needs_a_tier_and_local_refuses_a_backplane() {
    let hub = InProcessBackplane::new();
    let strong = Cache::<u64, String>::builder(NS)
        .backplane(Arc::new(hub.connect()))
        .consistency(Consistency::Strong)
        .build();
    assert!(strong.err().is_some_and(|e| e.setting == "consistency"));
    let local = Cache::<u64, String>::builder(NS)
        .backplane(Arc::new(hub.connect()) as Arc<dyn Backplane>)
        .consistency(Consistency::Local)
        .build();
    assert!(local.err().is_some_and(|e| e.setting == "consistency"));
}

#[test]
fn build_without_a_runtime_is_refused_when_background_tasks_are_needed() {
    let err = Cache::<u64, String>::builder(NS).tier(Arc::new(InProcessTier::new())).build().err();
    assert!(err.is_some_and(|e| e.setting == "runtime"));
}

#[tokio::test]
async fn after_invalidate_hooks_run_in_registration_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l1, l2) = (log.clone(), log.clone());
    let cache: Cache<u64, String> = Cache::builder(NS)
        .after_invalidate(move |i| l1.lock().push(format!("first {i:?}")))
        .after_invalidate(move |i| l2.lock().push(format!("second {i:?}")))
        .build()
        .expect("valid");
    cache.invalidate(&5).await.expect("invalidate");
    assert_eq!(*log.lock(), vec![r#"first Keys(["5"])"#.to_string(), r#"second Keys(["5"])"#.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_lease_lets_one_instance_load_while_the_others_wait_for_its_fill() {
    let f = fleet(4, Mode::Stream, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in &f.caches {
        for _ in 0..16 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(&9, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, io::Error>(Some("nine".to_string()))
                })
                .await
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("value").as_deref(), Some("nine"));
    }
    eprintln!("fleet stampede: 4 caches x 16 tasks, loader calls = {}", calls.load(Ordering::SeqCst));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------
// Strong level: acknowledgements and membership leases

async fn strong_fleet(n: usize) -> (InProcessTier, Vec<InProcessBackplane>, Vec<Cache<u64, String>>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_invalidate_returns_only_after_every_member_applied_it() {
    let (_tier, conns, caches) = strong_fleet(3).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
        assert_eq!(c.get_local(&1).as_deref(), Some("v1"));
    }
    // The third member hears everything 50 ms late.
    conns[2].faults().set_delay(Duration::from_millis(50));
    db.set(1, "v2");
    let began = std::time::Instant::now();
    caches[0].invalidate(&1).await.expect("invalidate");
    let took = began.elapsed();
    // No waiting here: read-your-writes holds the moment invalidate returned.
    for c in &caches {
        assert_eq!(c.get_local(&1), None);
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    }
    eprintln!("strong: invalidate with a member 50 ms behind took {took:?}");
    assert!(took >= Duration::from_millis(50), "it waited for the slow member's ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_member_cut_off_stops_serving_l1_and_is_not_waited_for_past_its_lease() {
    let (_tier, conns, caches) = strong_fleet(3).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
    }
    conns[2].faults().set_disconnected(true);
    db.set(1, "v2");
    let began = std::time::Instant::now();
    caches[0].invalidate(&1).await.expect("invalidate");
    let took = began.elapsed();
    eprintln!("strong: invalidate with a member cut off took {took:?} (lease 300 ms)");
    assert!(took <= Duration::from_millis(1000), "bounded by the lease");
    // The cut-off member never heard the invalidation, but serves nothing from L1.
    assert_eq!(caches[2].get_local(&1), None, "its own lease lapsed");
    conns[2].faults().set_disconnected(false);
    eventually("re-registered", || caches[2].stats().repairs_flushed >= 1).await;
    tokio::time::timeout(Duration::from_secs(5), caches[2].ready()).await.expect("ready again");
    assert_eq!(caches[2].get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(caches[2].get_local(&1).as_deref(), Some("v2"), "serving L1 again");
}

#[tokio::test]
async fn strong_needs_a_lease_of_at_least_four_heartbeats() {
    let err = Cache::<u64, String>::builder(NS)
        .tier(Arc::new(InProcessTier::new()))
        .backplane(Arc::new(InProcessBackplane::new()))
        .consistency(Consistency::Strong)
        .membership_lease(Duration::from_secs(1))
        .build()
        .err();
    assert!(err.is_some_and(|e| e.setting == "membership_lease"));
}

#[tokio::test]
async fn a_weigher_bounds_l1_by_total_weight() {
    let cache: Cache<u64, String> = Cache::builder(NS)
        .weigher(100, |_k, v: &String| v.len() as u64)
        .max_capacity(1_000)
        .build()
        .expect("valid");
    for k in 0..200 {
        cache.insert(k, "x".repeat(100)).await.expect("insert");
    }
    let resident: usize = (0..200).filter(|k| cache.get_local(k).is_some()).count();
    eprintln!("weigher: 200 values of 100 bytes, capacity 1000 bytes → {resident} resident");
    assert!(resident <= 10, "at most 1000 bytes resident, got {resident} entries");
    assert!(resident >= 1);
}

#[tokio::test]
async fn a_copy_reread_from_l2_before_a_buffered_delete_lands_is_evicted_fleet_wide() {
    let f = fleet(2, Mode::Stream, None).await;
    let (a, b) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1")]);
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    f.tier.set_available(false);
    assert!(a.invalidate(&1).await.is_err(), "L2 delete failed, message published");
    eventually("b evicted", || b.get_local(&1).is_none()).await;
    f.tier.set_available(true);
    // B reads the old value back from L2 (the delete is still buffered) and caches it.
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v1"));
    assert_eq!(a.flush_pending().await, 0, "delete and second message delivered");
    eventually("b evicted the re-read copy", || b.get_local(&1).is_none()).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

#[tokio::test]
async fn strong_level_cleans_l2_before_the_next_invalidation_goes_out() {
    // The writer's L2 delete fails (L2 unreachable); once L2 is back, its next
    // invalidation must clean L2 before the fleet hears of it, rather than fail against
    // the forced-open breaker while the message still wakes the readers, who would then
    // refill from the entry the failed delete left in L2.
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let mut caches: Vec<Cache<u64, String>> = Vec::new();
    for _ in 0..2 {
        let cache = Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            .membership_lease(Duration::from_millis(400))
            .build()
            .expect("valid");
        cache.ready().await;
        caches.push(cache);
    }
    let (writer, reader) = (&caches[0], &caches[1]);
    let db = Db::with(&[(1, "v1"), (2, "two")]);
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v1"));
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"));
    db.set(1, "v2");
    tier.set_available(false);
    assert!(writer.invalidate(&1).await.is_err(), "the L2 delete failed");
    assert!(writer.is_bypassed());
    tier.set_available(true);
    // The next write, with L2 reachable again, succeeds and leaves no stale entry behind.
    db.set(2, "deux");
    writer.invalidate(&2).await.expect("L2 is reachable: the invalidation succeeds");
    assert!(!writer.is_bypassed(), "the namespace bump made L2 trusted again");
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(reader.get_or_load(&2, db.loader(2)).await.expect("read").as_deref(), Some("deux"));
}

/// A real in-process tier seen through one instance's own (breakable) connection.
struct OwnConnection {
    tier: InProcessTier,
    down: std::sync::atomic::AtomicBool,
}

impl OwnConnection {
    fn check(&self) -> strata::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(strata::Error::new(ErrorKind::Tier, "this instance's l2 connection is down (injected)"))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Tier for OwnConnection {
    fn name(&self) -> &str {
        "own-connection"
    }
    fn tombstone_ttl(&self) -> Duration {
        self.tier.tombstone_ttl()
    }
    async fn lookup(&self, ns: &str, key: &str, lease: Option<Duration>) -> strata::Result<strata::Lookup> {
        self.check()?;
        self.tier.lookup(ns, key, lease).await
    }
    async fn fill(
        &self,
        ns: &str,
        key: &str,
        env: strata::Envelope,
        ttl: Duration,
        token: &strata::FillToken,
    ) -> strata::Result<strata::FillOutcome> {
        self.check()?;
        self.tier.fill(ns, key, env, ttl, token).await
    }
    async fn set(&self, ns: &str, key: &str, env: strata::Envelope, ttl: Duration) -> strata::Result<()> {
        self.check()?;
        self.tier.set(ns, key, env, ttl).await
    }
    async fn delete(&self, ns: &str, keys: &[String]) -> strata::Result<()> {
        self.check()?;
        self.tier.delete(ns, keys).await
    }
    async fn invalidate_tag(&self, ns: &str, tag: &str) -> strata::Result<()> {
        self.check()?;
        self.tier.invalidate_tag(ns, tag).await
    }
    async fn invalidate_namespace(&self, ns: &str) -> strata::Result<()> {
        self.check()?;
        self.tier.invalidate_namespace(ns).await
    }
    async fn touch(
        &self,
        ns: &str,
        key: &str,
        soft: strata::Timestamp,
        ttl: Duration,
    ) -> strata::Result<bool> {
        self.check()?;
        self.tier.touch(ns, key, soft, ttl).await
    }
    async fn lock(
        &self,
        ns: &str,
        scope: strata::LockScope<'_>,
        id: u64,
        ttl: Duration,
    ) -> strata::Result<()> {
        self.check()?;
        self.tier.lock(ns, scope, id, ttl).await
    }
    async fn unlock(&self, ns: &str, scope: strata::LockScope<'_>, id: u64) -> strata::Result<()> {
        self.check()?;
        self.tier.unlock(ns, scope, id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_failed_l2_delete_makes_every_member_bypass_until_l2_is_clean() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let own = Arc::new(OwnConnection { tier: tier.clone(), down: false.into() });
    let build = |t: Arc<dyn Tier>| {
        Cache::<u64, String>::builder(NS)
            .tier(t)
            .backplane(Arc::new(hub.connect()))
            .consistency(Consistency::Strong)
            .heartbeat_interval(Duration::from_millis(20))
            .membership_lease(Duration::from_millis(300))
            .build()
            .expect("valid")
    };
    let a = build(own.clone());
    let b = build(Arc::new(tier.clone()));
    for c in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), c.ready()).await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    let db = Db::with(&[(1, "v1")]);
    a.get_or_load(&1, db.loader(1)).await.expect("load");
    b.get_or_load(&1, db.loader(1)).await.expect("load");
    db.set(1, "v2");
    own.down.store(true, Ordering::SeqCst);
    assert!(a.invalidate(&1).await.is_err(), "a's L2 delete failed");
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v1"), "L2 still holds the old row");
    // b can reach L2, but must not read v1 back from it.
    assert!(b.is_bypassed(), "b distrusts L2 as soon as the invalidation returned");
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    own.down.store(false, Ordering::SeqCst);
    assert_eq!(a.flush_pending().await, 0);
    eventually("b trusts L2 again", || !b.is_bypassed()).await;
    assert_eq!(b.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}

// ---------------------------------------------------------------------------------
// Write locks: invalidation before the commit

/// A loader that counts its calls.
fn counted(db: &Db, k: u64, calls: &Arc<AtomicUsize>) -> impl FnOnce() -> BoxedLoad + Send + 'static {
    let db = db.clone();
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(db.get(k))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_keeps_every_member_from_caching_the_old_row_until_released() {
    let (tier, _conns, caches) = strong_fleet(3).await;
    let db = Db::with(&[(1, "v1")]);
    for c in &caches {
        c.get_or_load(&1, db.loader(1)).await.expect("load");
        assert_eq!(c.get_local(&1).as_deref(), Some("v1"));
    }

    let lock = caches[0].lock_for_write(&[1], &[], false).await.expect("lock");
    assert!(lock.is_valid());
    // Acknowledged by every member: nobody holds the old row any more.
    for c in &caches {
        assert_eq!(c.get_local(&1), None);
    }
    assert_eq!(l2_value(&tier, 1), None);

    // Before the commit, reads see the old row, but nothing caches it.
    let calls = Arc::new(AtomicUsize::new(0));
    for c in &caches {
        assert_eq!(c.get_or_load(&1, counted(&db, 1, &calls)).await.expect("read").as_deref(), Some("v1"));
        assert_eq!(c.get_local(&1), None, "not cached in L1 under the lock");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "every read loaded");
    assert_eq!(l2_value(&tier, 1), None, "not cached in L2 under the lock");

    // The commit: from now on no instance may read v1, wherever it reads.
    db.set(1, "v2");
    for c in &caches {
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    }
    lock.release().await.expect("release");
    for c in &caches {
        assert_eq!(c.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    }
    eventually("cached again after the release", || caches.iter().all(|c| c.get_local(&1).is_some())).await;
    assert_eq!(l2_value(&tier, 1).as_deref(), Some("v2"));
    assert_eq!(caches[0].stats().write_locks, 1);
    assert!(caches.iter().map(|c| c.stats().fills_rejected).sum::<u64>() >= 3, "L2 refused the fills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_that_cannot_be_taken_fails_and_leaves_nothing_behind() {
    let (tier, _conns, caches) = strong_fleet(2).await;
    let db = Db::with(&[(1, "v1")]);
    tier.set_available(false);
    let err = caches[0].lock_for_write(&[1], &["t".to_owned()], false).await.expect_err("L2 down");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("write lock"), "{err}");
    assert_eq!(caches[0].stats().write_locks_failed, 1);
    tier.set_available(true);
    // Nothing is locked: a load fills L2 again (once the breaker lets calls through).
    let start = std::time::Instant::now();
    while l2_value(&tier, 1).is_none() {
        assert!(start.elapsed() < Duration::from_secs(5), "L2 never filled again");
        let _ = caches[1].get_or_load(&1, db.loader(1)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tokens_handed_out_under_a_write_lock_never_fill_even_after_it_expired() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
    let key = ["1".to_owned()];
    let miss_token = |l: strata::Lookup| match l {
        strata::Lookup::Miss { token, .. } => token,
        strata::Lookup::Hit(_) => panic!("expected a miss"),
    };
    let envelope = || strata::Envelope {
        value: Some(bytes::Bytes::from_static(b"x")),
        version: None,
        created: clock.now(),
        soft_expiry: clock.now().saturating_add(Duration::from_secs(60)),
        hard_expiry: clock.now().saturating_add(Duration::from_secs(60)),
        stamp: 0,
        tags: Vec::new(),
        load_nanos: 0,
    };
    let before = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    tier.lock(NS, strata::LockScope::Keys(&key), 7, Duration::from_secs(1)).await.unwrap();
    tier.lock(NS, strata::LockScope::Keys(&key), 8, Duration::from_secs(1)).await.unwrap();
    let under = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    let ttl = Duration::from_secs(60);
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &before).await.unwrap(), strata::FillOutcome::Rejected);
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &under).await.unwrap(), strata::FillOutcome::Rejected);
    // One writer releases; the other's lock still poisons.
    tier.unlock(NS, strata::LockScope::Keys(&key), 7).await.unwrap();
    let still = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &still).await.unwrap(), strata::FillOutcome::Rejected);
    // The second lock is never released: it expires, and its tokens stay refused.
    clock.advance(Duration::from_secs(2));
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &under).await.unwrap(), strata::FillOutcome::Rejected);
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &still).await.unwrap(), strata::FillOutcome::Rejected);
    let after = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &after).await.unwrap(), strata::FillOutcome::Stored);

    // A tag lock poisons every key of the namespace.
    tier.lock(NS, strata::LockScope::Tag("t"), 9, Duration::from_secs(1)).await.unwrap();
    let under_tag = miss_token(tier.lookup(NS, "2", None).await.unwrap());
    assert_eq!(tier.fill(NS, "2", envelope(), ttl, &under_tag).await.unwrap(), strata::FillOutcome::Rejected);
    tier.unlock(NS, strata::LockScope::Tag("t"), 9).await.unwrap();
    let free = miss_token(tier.lookup(NS, "2", None).await.unwrap());
    assert_eq!(tier.fill(NS, "2", envelope(), ttl, &free).await.unwrap(), strata::FillOutcome::Stored);
}

#[tokio::test]
async fn strong_needs_a_write_lock_ttl_of_six_leases() {
    let err = Cache::<u64, String>::builder(NS)
        .tier(Arc::new(InProcessTier::new()))
        .backplane(Arc::new(InProcessBackplane::new()))
        .consistency(Consistency::Strong)
        .membership_lease(Duration::from_secs(5))
        .write_lock_ttl(Duration::from_secs(20))
        .build()
        .err();
    assert!(err.is_some_and(|e| e.setting == "write_lock_ttl" && e.fix.contains("write_lock_ttl")));
}

#[tokio::test]
async fn a_cancelled_probe_does_not_keep_the_breaker_open() {
    let clock = ManualClock::new();
    let cfg = BreakerConfig { consecutive_failures: 1, jitter: 0.0, ..BreakerConfig::default() };
    let breaker = strata::CircuitBreaker::with_clock("test", cfg, Arc::new(clock.clone()));
    let fail = || async { Err::<(), _>(strata::Error::new(ErrorKind::Tier, "down")) };
    assert!(breaker.call(fail()).await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open);
    clock.advance(Duration::from_secs(2));
    // The probe's caller gives up (a timeout around it, a dropped request).
    let hung = breaker.call(std::future::pending::<strata::Result<()>>());
    assert!(tokio::time::timeout(Duration::from_millis(10), hung).await.is_err());
    // The next call probes, and its success closes the breaker.
    breaker.call(async { Ok::<_, strata::Error>(()) }).await.expect("probe allowed");
    assert_eq!(breaker.state(), BreakerState::Closed);
}
