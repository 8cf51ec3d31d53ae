//! Fill guards: the slow-fill race in its variants, tag invalidation refusing tagged
//! fills in flight, and `invalidate_all`.

use std::sync::Arc;

use strata::backplane::Mode;
use strata::{Cache, InProcessBackplane, InProcessTier};
use tokio::sync::{Notify, Semaphore};

use crate::support::{Db, Fleet, NS, eventually, fleet, l2_value, slow_loader};

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
    assert!(!err.is_queued(), "L2 may still hold the old value: not done: {err:?}");
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
// Tags and invalidate_all

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

/// An invalidation that reached L2 (its tombstone) but not yet this instance refuses a
/// slow load's fill; the value still goes into L1, for `max_stale` at most (the
/// invalidation drops it when it arrives). Kept out of L1 altogether, a key written
/// more often than it loads was never cached: under an overloaded database every read
/// of the hot keys loaded again. A newer version in L2 keeps a value out of L1
/// (`api::an_older_version_never_replaces_a_newer_one_in_l2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_refused_by_an_invalidation_not_heard_here_lives_in_l1_for_max_stale() {
    let clock = strata::testing::ManualClock::new();
    let tier = InProcessTier::new();
    let max_stale = std::time::Duration::from_secs(2);
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .clock(Arc::new(clock.clone()))
        .ttl(std::time::Duration::from_secs(600))
        .max_stale(max_stale)
        .build()
        .expect("valid");
    let (started, gate) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let slow = {
        let (cache, started, gate) = (cache.clone(), started.clone(), gate.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    started.notify_one();
                    gate.acquire().await.expect("gate").forget();
                    Ok::<_, std::io::Error>(Some("v1".to_owned()))
                })
                .await
        })
    };
    started.notified().await;
    // Another instance's write: its L2 delete landed, its broadcast is still on its way.
    strata::tier::Tier::delete(&tier, NS, &["1".to_owned()]).await.expect("delete");
    gate.add_permits(1);
    assert_eq!(slow.await.expect("task").expect("load").as_deref(), Some("v1"));
    let s = cache.stats();
    assert_eq!((s.fills_rejected, s.l1_fills_shortened, s.loads), (1, 1, 1), "{s:?}");
    assert_eq!(l2_value(&tier, 1), None, "not in L2");
    assert_eq!(cache.get_local(&1).as_deref(), Some("v1"), "in L1");
    clock.advance(max_stale + std::time::Duration::from_millis(1));
    assert_eq!(cache.get_local(&1), None, "gone at max_stale");
}
