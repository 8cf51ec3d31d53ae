//! Tag epochs are bounded (issue #16, Low): distinct tag invalidations no longer grow
//! the process without limit, and pruning never brings back an entry that a pruned
//! tag's invalidation had invalidated.

use std::sync::Arc;

use strata::clock::SystemClock;
use strata::tier::{DEFAULT_MAX_TAG_EPOCHS, MIN_MAX_TAG_EPOCHS, TierConfig};
use strata::{Cache, InProcessTier};

use crate::support::{Db, NS};

fn small_tier() -> InProcessTier {
    let config = TierConfig { max_tag_epochs: MIN_MAX_TAG_EPOCHS, ..TierConfig::default() };
    InProcessTier::with_config(config, Arc::new(SystemClock::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_tier_passes_the_tag_pruning_conformance_case() {
    let tier = small_tier();
    strata::testing::conformance::tag_pruning(&tier, "in-process", MIN_MAX_TAG_EPOCHS).await;
    assert!(tier.tag_epochs("prune") <= MIN_MAX_TAG_EPOCHS, "{} epochs held", tier.tag_epochs("prune"));
}

#[tokio::test]
async fn an_entry_invalidated_by_a_pruned_tag_is_never_served_again() {
    let tier = small_tier();
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .max_tag_epochs(MIN_MAX_TAG_EPOCHS)
        .tags(|k, _| vec![if *k == 1 { "victim".into() } else { format!("t{k}") }])
        .build()
        .expect("valid");
    let db = Db::with(&[(1, "old"), (2, "two")]);
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("old"));
    cache.insert(2, "two".into()).await.expect("insert");
    db.set(1, "new");
    cache.invalidate_tag("victim").await.expect("invalidate");
    for i in 0..MIN_MAX_TAG_EPOCHS * 6 {
        cache.invalidate_tag(&format!("other:{i}")).await.expect("invalidate");
    }
    assert!(tier.tag_epochs(NS) <= MIN_MAX_TAG_EPOCHS, "{} epochs held in L2", tier.tag_epochs(NS));
    assert_eq!(cache.get_local(&1), None, "L1 keeps refusing the invalidated entry");
    assert_eq!(cache.get_or_load(&1, db.loader(1)).await.expect("load").as_deref(), Some("new"));
    assert_eq!(cache.get_local(&1).as_deref(), Some("new"), "a load after the invalidations is cached");
}

/// Resident set size of this process, in bytes (Linux), for the printed figure only.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test]
async fn a_hundred_thousand_distinct_tag_invalidations_stay_bounded() {
    let tier = InProcessTier::new();
    let cache: Cache<u64, String> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .tags(|k, _| vec![format!("user:{k}")])
        .build()
        .expect("valid");
    let before = rss_bytes();
    for i in 0..100_000u64 {
        cache.invalidate_tag(&format!("user:{i}")).await.expect("invalidate");
    }
    let after = rss_bytes();
    let held = tier.tag_epochs(NS);
    eprintln!(
        "[tag pruning] 100000 distinct tags invalidated: {held} epochs held by the in-process tier \
         (cap {DEFAULT_MAX_TAG_EPOCHS}), RSS {:?} -> {:?} bytes",
        before, after
    );
    assert!(held <= DEFAULT_MAX_TAG_EPOCHS, "{held} epochs held");
}

#[tokio::test]
async fn max_tag_epochs_out_of_range_fails_at_build_time() {
    for n in [0, MIN_MAX_TAG_EPOCHS - 1, 1_000_001] {
        let err = Cache::<u64, String>::builder(NS).max_tag_epochs(n).build().expect_err("out of range");
        let msg = err.to_string();
        assert!(msg.contains("max_tag_epochs") && msg.contains("16 to 1,000,000"), "{msg}");
    }
    assert!(Cache::<u64, String>::builder(NS).max_tag_epochs(MIN_MAX_TAG_EPOCHS).build().is_ok());
}
