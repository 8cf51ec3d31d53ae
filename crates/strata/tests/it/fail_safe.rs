//! Fail-safe and timeouts, early refresh (XFetch), sliding TTL (`touch`), negative
//! caching and TTL expiry, on a `ManualClock` (or tokio's paused time for timeouts).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use strata::testing::ManualClock;
use strata::tier::TierConfig;
use strata::{Cache, Clock, ErrorKind, InProcessTier};

use crate::support::{Db, NS, manual_cache};

// ---------------------------------------------------------------------------------
// Fail-safe and timeouts

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
        .loader_soft_timeout(Duration::from_millis(100))
        .loader_hard_timeout(Duration::from_secs(5))
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
    let cache = manual_cache(&clock).loader_hard_timeout(Duration::from_millis(300)).build().expect("valid");
    let hang = || async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, io::Error>(Some("never".to_string()))
    };
    let err = cache.get_or_load(&1, hang).await.expect_err("timed out");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(cache.stats().load_timeouts, 1);

    let safe = manual_cache(&clock)
        .fail_safe(Duration::from_secs(60), Duration::from_secs(1))
        .loader_hard_timeout(Duration::from_millis(300))
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
    let cache = manual_cache(&clock).ttl(ttl).early_refresh(1.0).seed(7).build().expect("valid");
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
// Sliding TTL, negative caching, TTL expiry

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
