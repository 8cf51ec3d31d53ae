//! Write locks: invalidation before the commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use strata::testing::ManualClock;
use strata::tier::Tier;
use strata::tier::TierConfig;
use strata::{Clock, InProcessTier};

use crate::support::{BoxedLoad, Db, NS, eventually, l2_value, strong_fleet};

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

    let lock = caches[0].lock_for_write([strata::Scope::key(&1u64)]).await.expect("lock");
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
    let err = caches[0]
        .lock_for_write([strata::Scope::key(&1u64), strata::Scope::tag("t")])
        .await
        .expect_err("L2 down");
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
    let key = vec!["1".to_owned()];
    let miss_token = |l: strata::tier::Lookup| match l {
        strata::tier::Lookup::Miss { token, .. } => token,
        strata::tier::Lookup::Hit(_) => panic!("expected a miss"),
    };
    let envelope = || strata::tier::Envelope {
        value: Some(bytes::Bytes::from_static(b"x")),
        version: None,
        created: clock.now(),
        soft_expiry: clock.now().saturating_add(Duration::from_secs(60)),
        hard_expiry: clock.now().saturating_add(Duration::from_secs(60)),
        stamp: 0,
        tags: Vec::new(),
        load_nanos: 0,
        schema: 0,
    };
    let before = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    tier.lock(NS, &strata::Scope::Keys(key.clone()), 7, Duration::from_secs(1)).await.unwrap();
    tier.lock(NS, &strata::Scope::Keys(key.clone()), 8, Duration::from_secs(1)).await.unwrap();
    let under = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    let ttl = Duration::from_secs(60);
    assert_eq!(
        tier.fill(NS, "1", envelope(), ttl, &before).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    assert_eq!(
        tier.fill(NS, "1", envelope(), ttl, &under).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    // One writer releases; the other's lock still poisons.
    tier.unlock(NS, &strata::Scope::Keys(key.clone()), 7).await.unwrap();
    let still = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    assert_eq!(
        tier.fill(NS, "1", envelope(), ttl, &still).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    // The second lock is never released: it expires, and its tokens stay refused.
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        tier.fill(NS, "1", envelope(), ttl, &under).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    assert_eq!(
        tier.fill(NS, "1", envelope(), ttl, &still).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    let after = miss_token(tier.lookup(NS, "1", None).await.unwrap());
    assert_eq!(tier.fill(NS, "1", envelope(), ttl, &after).await.unwrap(), strata::tier::FillOutcome::Stored);

    // A tag lock poisons every key of the namespace.
    tier.lock(NS, &strata::Scope::tag("t"), 9, Duration::from_secs(1)).await.unwrap();
    let under_tag = miss_token(tier.lookup(NS, "2", None).await.unwrap());
    assert_eq!(
        tier.fill(NS, "2", envelope(), ttl, &under_tag).await.unwrap(),
        strata::tier::FillOutcome::Rejected
    );
    tier.unlock(NS, &strata::Scope::tag("t"), 9).await.unwrap();
    let free = miss_token(tier.lookup(NS, "2", None).await.unwrap());
    assert_eq!(tier.fill(NS, "2", envelope(), ttl, &free).await.unwrap(), strata::tier::FillOutcome::Stored);
}

/// Invalidated level, L2 unreachable from the reader while a writer holds a lock (taken
/// before L2 failed): the reader's load gets no fill token that could say "poisoned",
/// so the recent invalidation it heard stands in for it. The old row it read stays in
/// its L1 for `max_stale` at most (not its TTL): that bounds it when the writer commits
/// and dies without releasing the lock, and the hot keys (the ones written lately) are
/// not sent to the database on every read for as long as L2 fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_without_l2_under_a_heard_write_lock_stays_in_l1_for_max_stale_at_most() {
    let clock = strata::testing::ManualClock::new();
    let f = crate::support::fleet(2, strata::backplane::Mode::Stream, Some(clock.clone())).await;
    let (writer, reader) = (&f.caches[0], &f.caches[1]);
    let db = Db::with(&[(1, "v1"), (2, "w1")]);
    let lock = writer.lock_for_write([strata::Scope::key(&1u64)]).await.expect("lock");
    eventually("the lock's invalidation heard", || reader.stats().invalidations_applied >= 1).await;

    f.tier.set_available(false);
    let before = reader.stats();
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v1"));
    assert_eq!(reader.get_local(&1).as_deref(), Some("v1"), "kept, briefly");
    let s = reader.stats();
    assert_eq!(
        (s.l1_fills_shortened, s.l1_fills_skipped),
        (before.l1_fills_shortened + 1, before.l1_fills_skipped)
    );
    // A key nobody wrote lately is cached for its TTL while L2 is down.
    assert_eq!(reader.get_or_load(&2, db.loader(2)).await.expect("read").as_deref(), Some("w1"));
    assert_eq!(reader.stats().l1_fills_shortened, s.l1_fills_shortened, "unrelated keys keep their TTL");

    // COMMIT, then the writer dies: no release, no second invalidation.
    db.set(1, "v2");
    std::mem::forget(lock);
    f.tier.set_available(true);
    // max_stale is 2 s in this fleet: the old row is gone from L1 after it.
    clock.advance(std::time::Duration::from_millis(2001));
    assert_eq!(reader.get_local(&1), None, "gone after max_stale");
    assert_eq!(reader.get_local(&2).as_deref(), Some("w1"), "still cached");
    assert_eq!(reader.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
    assert_eq!(writer.get_or_load(&1, db.loader(1)).await.expect("read").as_deref(), Some("v2"));
}
