//! The API doing what its docs say: the version guard, the closed state after
//! `shutdown`, `get` telling "absent" from "could not tell", batch reads in one L2
//! round trip, and read-through with a `Loader`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use strata::loader::{BoxError, Loader};
use strata::testing::ManualClock;
use strata::{Cache, CacheKey, Clock, ErrorKind, InProcessTier, loader_fn};
use tokio::sync::{Notify, Semaphore};

use crate::support::{Db, NS, eventually, fleet, manual_cache, strong_fleet};

/// A row with its version column.
type Row = (u64, String);

fn row(version: u64) -> Row {
    (version, format!("v{version}"))
}

fn l2_version(tier: &InProcessTier, key: u64) -> Option<u64> {
    tier.raw(NS, &key.to_key_string()).and_then(|e| e.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_replaces_a_newer_one_in_l2() {
    let tier = InProcessTier::new();
    let build = || {
        Cache::<u64, Row>::builder(NS)
            .tier(Arc::new(tier.clone()))
            .version(|r: &Row| Some(r.0))
            .lease_wait(Duration::from_millis(5))
            .build()
            .expect("valid")
    };
    let (a, b) = (build(), build());
    // B misses first and reads a lagging replica (version 1), slowly: its fill token
    // is issued before A's load.
    let (started, gate) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let (s, g) = (started.clone(), gate.clone());
    let slow = tokio::spawn({
        let b = b.clone();
        async move {
            b.get_or_load(&1, move || async move {
                s.notify_one();
                g.acquire().await.expect("gate").forget();
                Ok::<_, io::Error>(Some(row(1)))
            })
            .await
        }
    });
    started.notified().await;
    // A loads the primary's row (version 2) and fills L2: no invalidation happened, so
    // B's token stays valid.
    let got = a.get_or_load(&1, || async { Ok::<_, io::Error>(Some(row(2))) }).await.expect("load");
    assert_eq!(got, Some(row(2)));
    assert_eq!(l2_version(&tier, 1), Some(2));
    gate.add_permits(1);
    assert_eq!(slow.await.expect("task").expect("load"), Some(row(1)), "B's callers get what B read");
    assert_eq!(l2_version(&tier, 1), Some(2), "the older version did not replace the newer one in L2");
    assert_eq!(b.get_local(&1), None, "refused by L2, so kept out of B's L1 too");
    assert_eq!(b.stats().fills_rejected, 1);
}

#[tokio::test]
async fn a_refresh_that_read_an_older_version_does_not_replace_the_newer_entry_in_l1() {
    let clock = ManualClock::new();
    let ttl = Duration::from_secs(60);
    let delta = Duration::from_millis(100);
    let cache: Cache<u64, Row> = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .ttl_jitter(0.0)
        .ttl(ttl)
        .early_refresh(1000.0)
        .version(|r: &Row| Some(r.0))
        .build()
        .expect("valid");
    let c = clock.clone();
    let first = cache
        .get_or_load(&1, move || async move {
            c.advance(delta);
            Ok::<_, io::Error>(Some(row(2)))
        })
        .await
        .expect("load");
    assert_eq!(first, Some(row(2)));
    // Just before expiry with a large β: the next hit starts an early refresh, whose
    // loader reads a lagging replica.
    clock.set(clock.now().saturating_add(ttl).saturating_sub(Duration::from_millis(1)));
    let hit = cache.get_or_load(&1, || async { Ok::<_, io::Error>(Some(row(1))) }).await.expect("hit");
    assert_eq!(hit, Some(row(2)));
    eventually("the refresh ran", || cache.stats().loads == 2 && cache.stats().fills_rejected == 1).await;
    assert_eq!(cache.get_local(&1), Some(row(2)), "the newer version stays in L1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_no_clone_serves_or_fills() {
    let f = fleet(2, strata::backplane::Mode::Stream, None).await;
    let db = Db::with(&[(1, "v1")]);
    let cache = f.caches[0].clone();
    let clone = cache.clone();
    cache.get_or_load(&1, db.loader(1)).await.expect("load");
    assert_eq!(clone.get_local(&1).as_deref(), Some("v1"));
    cache.shutdown().await;
    assert_eq!(clone.get_local(&1), None, "a clone must not serve L1 without invalidations arriving");
    assert_eq!(clone.get(&1).await.expect_err("closed").kind(), ErrorKind::Shutdown);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let err = clone
        .get_or_load(&1, move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Some("v2".to_owned()))
        })
        .await
        .expect_err("closed");
    assert!(err.is_shutdown(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(clone.health().closed && !clone.health().is_ready());
    // Invalidations still reach the fleet.
    f.caches[1].get_or_load(&1, db.loader(1)).await.expect("load");
    clone.invalidate(&1).await.expect("invalidate after shutdown still reaches L2 and the fleet");
    eventually("the other instance dropped its copy", || f.caches[1].get_local(&1).is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tells_absent_from_bypassed_and_from_an_unreachable_l2() {
    let f = fleet(1, strata::backplane::Mode::Stream, None).await;
    let cache = &f.caches[0];
    assert_eq!(cache.get(&1).await.expect("absent is not an error"), None);
    f.tier.set_available(false);
    let err = cache.get(&1).await.expect_err("L2 down: the cache cannot tell");
    assert!(err.is_transient(), "{err}");
    f.tier.set_available(true);

    let (tier, _conns, caches) = strong_fleet(1).await;
    let db = Db::with(&[(1, "v1")]);
    caches[0].get_or_load(&1, db.loader(1)).await.expect("load");
    tier.set_available(false);
    caches[0].invalidate(&1).await.expect_err("the delete fails");
    assert!(caches[0].is_bypassed());
    let err = caches[0].get(&1).await.expect_err("bypassed is not absent");
    assert_eq!(err.kind(), ErrorKind::Bypassed, "{err}");
    assert!(caches[0].health().bypassed);
    // get_or_load reads through while bypassed.
    assert_eq!(caches[0].get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("v1"));
}

/// Loads from the toy database and counts `load_many` calls and keys.
struct CountingLoader {
    db: Db,
    batches: Arc<AtomicUsize>,
    keys: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Loader<u64, String> for CountingLoader {
    async fn load(&self, key: &u64) -> Result<Option<String>, BoxError> {
        self.keys.fetch_add(1, Ordering::SeqCst);
        Ok(self.db.get(*key))
    }

    async fn load_many(&self, keys: &[u64]) -> Result<Vec<Option<String>>, BoxError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.keys.fetch_add(keys.len(), Ordering::SeqCst);
        Ok(keys.iter().map(|k| self.db.get(*k)).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_l2_in_one_round_trip() {
    let tier = InProcessTier::new();
    let build = || Cache::<u64, String>::builder(NS).tier(Arc::new(tier.clone())).build().expect("valid");
    let (writer, reader) = (build(), build());
    for k in 0..10u64 {
        writer.insert(k, format!("v{k}")).await.expect("insert");
    }
    let before = tier.ops();
    let keys: Vec<u64> = (0..12).collect();
    let got = reader.get_many(&keys).await.expect("get_many");
    assert_eq!(tier.ops() - before, 1, "one L2 call for every key L1 lacked");
    let want: Vec<Option<String>> = (0..12).map(|k| (k < 10).then(|| format!("v{k}"))).collect();
    assert_eq!(got, want);
    assert_eq!((reader.stats().l2_hits, reader.stats().misses), (10, 2));
    // Now L1 answers: no L2 call at all.
    let before = tier.ops();
    assert_eq!(reader.get_many(&keys[..10]).await.expect("get_many"), want[..10]);
    assert_eq!(tier.ops() - before, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_many_loads_the_misses_with_one_load_many_call() {
    let tier = InProcessTier::new();
    let db = Db::with(&(0..20u64).map(|k| (k, "row")).collect::<Vec<_>>());
    let (batches, keys_loaded) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .loader(CountingLoader { db: db.clone(), batches: batches.clone(), keys: keys_loaded.clone() })
        .build()
        .expect("valid");
    let other: Cache<u64, String> = Cache::builder(NS).tier(Arc::new(tier.clone())).build().expect("valid");
    for k in 0..5u64 {
        other.insert(k, "row".to_owned()).await.expect("insert");
    }
    let before = tier.ops();
    let keys: Vec<u64> = (0..10).collect();
    let got = cache.get_or_load_many(&keys).await.expect("load");
    assert!(got.iter().all(|v| v.as_deref() == Some("row")));
    assert_eq!(batches.load(Ordering::SeqCst), 1, "one load_many call");
    assert_eq!(keys_loaded.load(Ordering::SeqCst), 5, "only the keys neither tier held");
    assert_eq!(tier.ops() - before, 1 + 5, "one lookup for the batch, one fill per loaded key");
    // Everything is cached now, in both tiers.
    assert_eq!(cache.get_or_load_many(&keys).await.expect("hit"), got);
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert_eq!(cache.fetch(&3).await.expect("fetch").as_deref(), Some("row"));
    assert_eq!(keys_loaded.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn fetch_reads_through_the_configured_loader_and_refuses_without_one() {
    let clock = ManualClock::new();
    let cache = manual_cache(&clock)
        .loader(loader_fn(|k: u64| async move { Ok::<_, io::Error>(Some(format!("row {k}"))) }))
        .build()
        .expect("valid");
    assert_eq!(cache.fetch(&7).await.expect("fetch").as_deref(), Some("row 7"));
    assert_eq!(cache.stats().loads, 1);
    assert_eq!(cache.fetch(&7).await.expect("hit").as_deref(), Some("row 7"));
    assert_eq!(cache.stats().loads, 1);
    let bare = manual_cache(&clock).build().expect("valid");
    assert_eq!(bare.fetch(&7).await.expect_err("no loader").kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn capacity_evictions_are_counted() {
    let cache: Cache<u64, String> = Cache::builder(NS).max_capacity(100).build().expect("valid config");
    for k in 0..1_000u64 {
        cache
            .get_or_load(&k, move || async move { Ok::<_, std::io::Error>(Some(format!("v{k}"))) })
            .await
            .expect("load");
    }
    let s = cache.stats();
    assert!(s.l1_entries <= 128, "{s:?}");
    assert_eq!(s.l1_evictions + s.l1_entries, 1_000, "{s:?}");
}
