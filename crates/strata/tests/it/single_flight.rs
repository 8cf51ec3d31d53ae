//! Single-flight: concurrent callers share one L2 read and one loader call, within an
//! instance and (through the fill lease) across a fleet.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use strata::backplane::Mode;
use strata::{Cache, Clock};
use tokio::sync::Semaphore;

use crate::support::{NS, eventually, fleet};

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

/// The lease holder's load fails and it releases the lease: one waiting instance takes
/// the lease over and loads for the fleet, the others get its fill. (Waiters used to
/// poll without asking for the lease, so each instance loaded once `lease_wait` ran
/// out: here 3 loads instead of 1, from a database that had just failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_over_by_one_waiting_instance() {
    let f = fleet(4, Mode::Stream, None).await;
    let (failed, loaded) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let holder = {
        let (c, failed) = (f.caches[0].clone(), failed.clone());
        tokio::spawn(async move {
            c.get_or_load(&9, move || async move {
                failed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(60)).await;
                Err::<Option<String>, _>(io::Error::other("db hiccup"))
            })
            .await
        })
    };
    // The holder has the lease before the others read.
    eventually("the holder is loading", || failed.load(Ordering::SeqCst) == 1).await;
    let mut tasks = Vec::new();
    for c in &f.caches[1..] {
        for _ in 0..8 {
            let (c, loaded) = (c.clone(), loaded.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_load(&9, move || async move {
                    loaded.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    Ok::<_, io::Error>(Some("nine".to_string()))
                })
                .await
            }));
        }
    }
    assert!(holder.await.expect("task").expect_err("the holder's load failed").is_loader());
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("value").as_deref(), Some("nine"));
    }
    assert_eq!(loaded.load(Ordering::SeqCst), 1, "one instance loaded for the fleet");
    let takeovers: u64 = f.caches.iter().map(|c| c.stats().lease_takeovers).sum();
    assert_eq!(takeovers, 1);
}

/// A read that misses while an early refresh runs (the entry expired meanwhile) joins
/// the refresh's flight, and gets the refreshed value: not "load was abandoned", which
/// it got while a refresh handed its result to nobody (found by the shuttle model
/// check of single-flight, `model_check` in the crate).
#[tokio::test]
async fn a_read_that_joins_an_early_refresh_gets_the_refreshed_value() {
    let clock = strata::testing::ManualClock::new();
    let ttl = Duration::from_secs(60);
    let delta = Duration::from_millis(100);
    let cache: Cache<u64, String> = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .ttl_jitter(0.0)
        .ttl(ttl)
        .early_refresh(1000.0)
        .build()
        .expect("valid");
    let c = clock.clone();
    let first = cache
        .get_or_load(&1, move || async move {
            c.advance(delta);
            Ok::<_, io::Error>(Some("v1".to_string()))
        })
        .await
        .expect("load");
    assert_eq!(first.as_deref(), Some("v1"));
    // Just before expiry with a large β: this hit starts a refresh, which waits.
    clock.set(clock.now().saturating_add(ttl).saturating_sub(Duration::from_millis(1)));
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let hit = cache
        .get_or_load(&1, move || async move {
            g.acquire().await.expect("gate").forget();
            Ok::<_, io::Error>(Some("v2".to_string()))
        })
        .await
        .expect("hit");
    assert_eq!(hit.as_deref(), Some("v1"));
    eventually("the refresh started", || cache.stats().loads == 2).await;
    // The entry expires while the refresh runs: the next read misses and joins it.
    clock.advance(Duration::from_secs(1));
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache.get_or_load(&1, || async { Ok::<_, io::Error>(Some("not called".to_string())) }).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.add_permits(1);
    let read = reader.await.expect("task").expect("the refresh's result, not an error");
    assert_eq!(read.as_deref(), Some("v2"));
    assert_eq!(cache.stats().loads, 2, "the read joined the refresh");
}
