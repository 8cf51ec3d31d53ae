//! L1 keeps a key's standing in its eviction policy when the key is replaced
//! (`insert`) or invalidated, while the old value goes at once: a read after either is
//! a miss or the new value on every read path, and a key filled by `insert` is
//! promoted exactly as one filled by `get_or_load`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use strata::testing::ManualClock;
use strata::tier::TierConfig;
use strata::{Cache, InProcessTier, loader_fn};

use crate::support::{Db, manual_cache};

fn failing() -> impl FnOnce() -> std::future::Ready<Result<Option<String>, io::Error>> + Send + 'static {
    || std::future::ready(Err(io::Error::other("db down")))
}

/// Replaces key 1 by `insert` and invalidates keys 2 and 3 (3 inside its early-refresh
/// window), then reads them on every path: never the old value, in L1 or from L2.
async fn replaced_and_invalidated_keys_read_new(with_tier: bool) {
    let clock = ManualClock::new();
    let db = Db::with(&[(1, "a1"), (2, "b1"), (3, "c1")]);
    let read = db.clone();
    let mut builder = manual_cache(&clock)
        .fail_safe(Duration::from_secs(3_600), Duration::from_secs(1))
        .early_refresh(1_000.0)
        .loader(loader_fn(move |k: u64| {
            let db = read.clone();
            async move { Ok::<_, io::Error>(db.get(k)) }
        }));
    if with_tier {
        let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
        builder = builder.tier(Arc::new(tier));
    }
    let cache: Cache<u64, String> = builder.build().expect("valid");
    let loaded = cache.get_or_load_many(&[1, 2, 3]).await.expect("load");
    assert_eq!(loaded.iter().map(|v| v.as_deref()).collect::<Vec<_>>(), [Some("a1"), Some("b1"), Some("c1")]);
    assert_eq!(cache.stats().l1_entries, 3);

    // Well into the 10 s TTL: key 3's hits may refresh early.
    clock.advance(Duration::from_millis(9_900));
    db.set(1, "a2");
    cache.insert(1, "a2".to_owned()).await.expect("insert");
    db.set(2, "b2");
    db.set(3, "c2");
    cache.invalidate_many(&[2, 3]).await.expect("invalidate");
    let s = cache.stats();
    assert_eq!(s.l1_entries, 1, "invalidated keys are not counted as entries: {s:?}");

    assert_eq!(cache.get_local(&1).as_deref(), Some("a2"));
    assert_eq!(cache.get_local(&2), None);
    assert_eq!(cache.get(&1).await.expect("get").as_deref(), Some("a2"));
    assert_eq!(cache.get(&2).await.expect("get"), None);
    assert_eq!(cache.get_many(&[1, 2, 3]).await.expect("get_many"), [Some("a2".to_owned()), None, None]);
    // Fail-safe has no copy of an invalidated key to fall back on.
    let err = cache.get_or_load(&2, failing()).await.expect_err("no stale copy");
    assert!(err.is_loader(), "{err:?}");
    assert_eq!(cache.get_or_load(&2, db.loader(2)).await.expect("load").as_deref(), Some("b2"));
    // Nor does early refresh: key 3 is a miss, loaded now, not a hit refreshed later.
    assert_eq!(cache.get_or_load(&3, db.loader(3)).await.expect("load").as_deref(), Some("c2"));
    // Past the TTL, fail-safe serves the newest copy, never the replaced one.
    cache.invalidate(&3).await.expect("invalidate");
    clock.advance(Duration::from_secs(11));
    assert_eq!(cache.get_or_load(&1, failing()).await.expect("stale copy").as_deref(), Some("a2"));
    let err = cache.get_or_load(&3, failing()).await.expect_err("no stale copy");
    assert!(err.is_loader(), "{err:?}");
    let batch = cache.get_or_load_many(&[1, 2, 3]).await.expect("load");
    assert_eq!(batch.iter().map(|v| v.as_deref()).collect::<Vec<_>>(), [Some("a2"), Some("b2"), Some("c2")]);
    // Dropped locally (as a capacity eviction would), a key is a miss too.
    cache.evict_local(&1);
    assert_eq!(cache.get_local(&1), None);
    assert_eq!(cache.stats().l1_entries, 2);
}

#[tokio::test]
async fn a_replaced_or_invalidated_key_never_reads_its_old_value() {
    replaced_and_invalidated_keys_read_new(false).await;
}

#[tokio::test]
async fn a_replaced_or_invalidated_key_never_reads_its_old_value_from_l2_either() {
    replaced_and_invalidated_keys_read_new(true).await;
}

/// A skewed synthetic trace over 400 keys (a hot 40 and a long tail), for a cache of
/// 64 entries: keys come back after the cold queue has evicted them, so what the
/// policy remembers of them (its ghosts) decides the hit ratio.
fn trace() -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 10 < 7 { x / 10 % 40 } else { 40 + x / 10 % 360 }
        })
        .collect()
}

fn small_cache() -> Cache<u64, u64> {
    Cache::builder("history").max_capacity(64).ttl(Duration::from_secs(86_400)).build().expect("valid")
}

#[tokio::test]
async fn a_key_filled_by_insert_keeps_its_promotion_as_a_loaded_one_does() {
    let trace = trace();
    let loading = small_cache();
    let loads = Arc::new(AtomicU64::new(0));
    for &k in &trace {
        let loads = loads.clone();
        let load = move || async move {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, io::Error>(Some(k))
        };
        assert_eq!(loading.get_or_load(&k, load).await.expect("load"), Some(k));
    }
    let loaded_hits = trace.len() as u64 - loads.load(Ordering::Relaxed);

    // The same trace, filled by `insert` on a miss (which invalidates the key first).
    let inserting = small_cache();
    let mut inserted_hits = 0;
    for &k in &trace {
        match inserting.get(&k).await.expect("get") {
            Some(v) => {
                assert_eq!(v, k);
                inserted_hits += 1;
            }
            None => inserting.insert(k, k).await.expect("insert"),
        }
    }
    assert!(loaded_hits > trace.len() as u64 / 4, "{loaded_hits} hits");
    assert_eq!(inserted_hits, loaded_hits, "hits of {} requests", trace.len());
    assert_eq!(inserting.stats().l1_entries, loading.stats().l1_entries);
}
