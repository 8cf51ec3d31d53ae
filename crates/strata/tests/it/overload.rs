//! Database overload protection: the per-cache load limit, the shared `LoadLimiter`,
//! the loader circuit breaker, and fail-safe copies served when they refuse a load.
//! Timeouts run on tokio's paused time; the breaker's cool-down on a `ManualClock`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::join_all;
use strata::testing::ManualClock;
use strata::{BreakerConfig, Cache, ErrorKind, LoadLimiter};

use crate::support::manual_cache;

/// Loads running now and the most seen at once: what a database would count.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
    calls: AtomicUsize,
}

impl Concurrency {
    /// A loader for `key` that holds a "connection" for 20 ms of (paused) time.
    fn loader(
        self: &Arc<Self>,
        key: u64,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = io::Result<Option<String>>> + Send>> + use<>
    {
        let me = self.clone();
        move || {
            Box::pin(async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                let n = me.now.fetch_add(1, Ordering::SeqCst) + 1;
                me.max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                me.now.fetch_sub(1, Ordering::SeqCst);
                Ok(Some(format!("v{key}")))
            })
        }
    }
}

fn failing() -> impl FnOnce() -> std::future::Ready<io::Result<Option<String>>> {
    || std::future::ready(Err(io::Error::other("db down")))
}

async fn wait_for_in_flight(cache: &Cache<u64, String>, n: u64) {
    for _ in 0..1000 {
        if cache.stats().loads_in_flight == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("loads in flight never reached {n}");
}

#[tokio::test(start_paused = true)]
async fn distinct_keys_loaded_at_once_never_exceed_the_limit() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock).max_concurrent_loads(4).build().expect("valid");
    let db = Arc::new(Concurrency::default());
    let reads = (0..50u64).map(|k| {
        let (cache, db) = (cache.clone(), db.clone());
        async move { cache.get_or_load(&k, db.loader(k)).await }
    });
    for (k, r) in join_all(reads).await.into_iter().enumerate() {
        assert_eq!(r.expect("waited for a permit").as_deref(), Some(format!("v{k}").as_str()));
    }
    assert_eq!(db.max.load(Ordering::SeqCst), 4, "the limit is reached and never exceeded");
    assert_eq!(db.calls.load(Ordering::SeqCst), 50);
    let stats = cache.stats();
    assert_eq!(stats.loads_throttled, 46, "every load past the first four waited");
    assert_eq!(stats.loads_rejected_overload, 0);
    assert_eq!(stats.loads_in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_load_serves_the_stale_copy_and_fails_fast_without_one() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock)
        .max_concurrent_loads(1)
        .load_permit_wait(Duration::from_millis(50))
        .fail_safe(Duration::from_secs(600), Duration::from_secs(1))
        .build()
        .expect("valid");
    let db = Arc::new(Concurrency::default());
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));

    // One slow load holds the only permit.
    let (release, blocked) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(&99, move || async move {
                    let _ = blocked.await;
                    Ok::<_, io::Error>(Some("v99".to_owned()))
                })
                .await
        })
    };
    wait_for_in_flight(&cache, 1).await;

    let stale = cache.get_or_load(&1, db.loader(1)).await.expect("the stale copy");
    assert_eq!(stale.as_deref(), Some("v1"));
    let err = cache.get_or_load(&2, db.loader(2)).await.expect_err("no copy to serve");
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert!(err.is_transient());
    assert!(err.to_string().contains("concurrent-load limit of cache \"settings\" (1 loads)"), "{err}");
    assert_eq!(db.calls.load(Ordering::SeqCst), 1, "only the first load reached the database");
    let stats = cache.stats();
    assert_eq!(stats.loads_rejected_overload, 2);
    assert_eq!(stats.loads_throttled, 2);
    assert!(stats.stale_served >= 1);

    release.send(()).expect("holder waiting");
    assert_eq!(holder.await.expect("task").expect("loaded").as_deref(), Some("v99"));
    assert_eq!(cache.get_or_load(&2, db.loader(2)).await.expect("permit free").as_deref(), Some("v2"));
}

#[tokio::test(start_paused = true)]
async fn the_loader_breaker_opens_after_a_burst_of_failures_and_a_probe_closes_it() {
    let clock = ManualClock::new();
    let breaker = BreakerConfig {
        consecutive_failures: 3,
        open_for: Duration::from_secs(1),
        jitter: 0.0,
        ..BreakerConfig::default()
    };
    let cache = manual_cache(&clock)
        .loader_breaker(breaker)
        .fail_safe(Duration::from_secs(600), Duration::from_secs(1))
        .build()
        .expect("valid");
    let db = Arc::new(Concurrency::default());
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));

    for k in 10..13u64 {
        assert!(cache.get_or_load(&k, failing()).await.expect_err("db down").is_loader());
    }
    // Open: the database is not asked; a stale copy is served, other keys fail fast.
    let err = cache.get_or_load(&20, db.loader(20)).await.expect_err("open");
    assert!(err.is_circuit_open(), "{err}");
    assert!(err.to_string().contains("loader:settings"), "{err}");
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("stale").as_deref(), Some("v1"));
    assert_eq!(db.calls.load(Ordering::SeqCst), 1, "no load while open");
    assert_eq!(cache.stats().loads_rejected_breaker, 2);

    // After the cool-down one probe goes through; a failed probe reopens it.
    clock.advance(Duration::from_secs(1));
    assert!(cache.get_or_load(&21, failing()).await.expect_err("probe failed").is_loader());
    assert!(cache.get_or_load(&22, db.loader(22)).await.expect_err("reopened").is_circuit_open());
    // A successful probe closes it.
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.get_or_load(&23, db.loader(23)).await.expect("probe").as_deref(), Some("v23"));
    assert_eq!(cache.get_or_load(&24, db.loader(24)).await.expect("closed").as_deref(), Some("v24"));
    assert_eq!(cache.stats().loads_rejected_breaker, 3);
}

#[tokio::test(start_paused = true)]
async fn a_shared_limiter_bounds_the_loads_of_every_cache_using_it() {
    let clock = ManualClock::new();
    let limiter = LoadLimiter::new("orders-db", 3).expect("valid");
    let a = manual_cache(&clock).load_limiter(limiter.clone()).build().expect("valid");
    let b = Cache::<u64, String>::builder("other")
        .clock(Arc::new(clock.clone()))
        .load_limiter(limiter.clone())
        .build()
        .expect("valid");
    let db = Arc::new(Concurrency::default());
    let reads = (0..40u64).map(|k| {
        let (cache, db) = (if k % 2 == 0 { a.clone() } else { b.clone() }, db.clone());
        async move { cache.get_or_load(&k, db.loader(k)).await }
    });
    assert!(join_all(reads).await.iter().all(Result::is_ok));
    assert_eq!(db.max.load(Ordering::SeqCst), 3, "the shared limit holds across both caches");
    assert_eq!(limiter.in_flight(), 0);
    assert!(a.stats().loads_throttled + b.stats().loads_throttled >= 37);
}

#[test]
fn load_protection_settings_are_checked_at_build() {
    let clock = ManualClock::new();
    let err = manual_cache(&clock).max_concurrent_loads(0).build().expect_err("zero");
    assert_eq!(err.setting, "max_concurrent_loads");
    assert!(err.fix.contains("1..=1000000"), "{err}");
    let err = manual_cache(&clock)
        .loader_breaker(BreakerConfig { window: 0, ..BreakerConfig::default() })
        .build()
        .expect_err("window 0");
    assert_eq!(err.setting, "loader_breaker");
    assert!(err.problem.contains("window"), "{err}");
    let err =
        manual_cache(&clock).load_permit_wait(Duration::from_secs(400 * 86_400)).build().expect_err("long");
    assert_eq!(err.setting, "load_permit_wait");
    assert!(LoadLimiter::new("db", 0).is_err());
    manual_cache(&clock).unlimited_loads().load_permit_wait(Duration::ZERO).build().expect("valid");
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_permit_counts_towards_the_soft_timeout() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock)
        .max_concurrent_loads(1)
        .fail_safe(Duration::from_secs(600), Duration::from_secs(1))
        .loader_soft_timeout(Duration::from_millis(100))
        .loader_hard_timeout(Duration::from_secs(5))
        .build()
        .expect("valid");
    let db = Arc::new(Concurrency::default());
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    clock.advance(Duration::from_secs(11));
    let (release, blocked) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(&99, move || async move {
                    let _ = blocked.await;
                    Ok::<_, io::Error>(Some("v99".to_owned()))
                })
                .await
        })
    };
    wait_for_in_flight(&cache, 1).await;
    let began = tokio::time::Instant::now();
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("stale").as_deref(), Some("v1"));
    assert_eq!(began.elapsed(), Duration::from_millis(100), "answered at the soft timeout");
    assert_eq!(db.calls.load(Ordering::SeqCst), 1, "still waiting for the permit");
    release.send(()).expect("holder waiting");
    holder.await.expect("task").expect("loaded");
    // The waiting load gets the permit and refreshes key 1 for the next readers.
    for _ in 0..100 {
        if db.calls.load(Ordering::SeqCst) == 2 && cache.stats().loads_in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(db.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.stats().loads_throttled, 1);
}

#[tokio::test(start_paused = true)]
async fn loads_past_the_hard_timeout_open_the_loader_breaker() {
    let clock = ManualClock::new();
    let breaker = BreakerConfig { consecutive_failures: 2, jitter: 0.0, ..BreakerConfig::default() };
    let cache = manual_cache(&clock)
        .loader_breaker(breaker)
        .loader_hard_timeout(Duration::from_millis(200))
        .build()
        .expect("valid");
    let hang = || std::future::pending::<io::Result<Option<String>>>();
    for k in 0..2u64 {
        assert!(cache.get_or_load(&k, hang).await.expect_err("hard timeout").is_timeout());
    }
    let db = Arc::new(Concurrency::default());
    assert!(cache.get_or_load(&5, db.loader(5)).await.expect_err("open").is_circuit_open());
    assert_eq!(db.calls.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().loads_rejected_breaker, 1);
}

#[tokio::test(start_paused = true)]
async fn loads_queued_for_a_permit_are_refused_once_the_breaker_opened_meanwhile() {
    let clock = ManualClock::new();
    let breaker = BreakerConfig { consecutive_failures: 3, jitter: 0.0, ..BreakerConfig::default() };
    let cache = manual_cache(&clock).max_concurrent_loads(4).loader_breaker(breaker).build().expect("valid");
    let queries = Arc::new(AtomicUsize::new(0));
    let reads = (0..40u64).map(|k| {
        let (cache, queries) = (cache.clone(), queries.clone());
        async move {
            cache
                .get_or_load(&k, move || async move {
                    queries.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Err::<Option<String>, _>(io::Error::other("db down"))
                })
                .await
        }
    });
    let results = join_all(reads).await;
    // The first four fail (and open the breaker); the 36 that were waiting never query.
    assert_eq!(queries.load(Ordering::SeqCst), 4);
    assert_eq!(results.iter().filter(|r| r.as_ref().is_err_and(|e| e.is_circuit_open())).count(), 36);
    assert_eq!(cache.stats().loads_rejected_breaker, 36);
}
