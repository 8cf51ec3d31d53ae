//! Warm-up: a starting instance preloads the fleet's hot keys from L2 before it is
//! ready, and the settings are checked at build time.

use std::sync::Arc;
use std::time::Duration;

use strata::{Cache, InProcessBackplane, InProcessTier, WarmUp};

use crate::support::{Db, NS, eventually};

fn warm() -> WarmUp {
    WarmUp::new().keys(50).sample_every(1).report_every(Duration::from_millis(100))
}

async fn member(
    tier: &InProcessTier,
    hub: &InProcessBackplane,
    warm_up: Option<WarmUp>,
) -> Cache<u64, String> {
    let mut b = Cache::builder(NS).tier(Arc::new(tier.clone())).backplane(Arc::new(hub.connect()));
    if let Some(w) = warm_up {
        b = b.warm_up(w);
    }
    let cache = b.build().expect("valid config");
    cache.ready().await;
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_preloads_the_fleets_hot_keys_before_it_is_ready() {
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let rows: Vec<(u64, String)> = (0..200).map(|k| (k, format!("v{k}"))).collect();
    let db = Db::with(&rows.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>());
    let running = member(&tier, &hub, Some(warm())).await;
    // Keys 0..50 are hot (20 reads each), 50..200 read once.
    for round in 0..20 {
        for k in 0..50u64 {
            running.get_or_load(&k, db.loader(k)).await.expect("read");
        }
        if round == 0 {
            for k in 50..200u64 {
                running.get_or_load(&k, db.loader(k)).await.expect("read");
            }
        }
    }
    eventually("the ranking reported", || {
        futures::executor::block_on(strata::tier::Tier::hot_keys(&tier, NS, 50)).is_ok_and(|k| k.len() == 50)
    })
    .await;
    let ranked = strata::tier::Tier::hot_keys(&tier, NS, 50).await.expect("ranking");
    assert!(ranked.iter().all(|k| k.parse::<u64>().is_ok_and(|k| k < 50)), "the hot keys lead: {ranked:?}");

    let joining = member(&tier, &hub, Some(warm())).await;
    assert!(!joining.health().warming_up && joining.health().is_ready());
    assert_eq!(joining.stats().warm_up_keys, 50, "{:?}", joining.stats());
    for k in 0..50u64 {
        assert_eq!(joining.get_local(&k).as_deref(), Some(format!("v{k}").as_str()), "key {k} preloaded");
    }
    assert_eq!(joining.get_local(&100), None, "a cold key is not");
    assert_eq!(joining.stats().loads, 0, "warm-up reads L2, never the database");

    // Without warm-up, the same join starts empty.
    let cold = member(&tier, &hub, None).await;
    assert_eq!(cold.stats().l1_entries, 0);
    assert!(!cold.health().warming_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_with_l2_down_still_becomes_ready() {
    let tier = InProcessTier::new();
    tier.set_available(false);
    let hub = InProcessBackplane::new();
    let cache = tokio::time::timeout(Duration::from_secs(10), member(&tier, &hub, Some(warm())))
        .await
        .expect("ready without L2");
    assert_eq!(cache.stats().warm_up_keys, 0);
    assert!(cache.health().is_ready());
}

#[tokio::test]
async fn warm_up_settings_are_checked_at_build() {
    let err = Cache::<u64, String>::builder(NS).warm_up(WarmUp::new()).build().expect_err("no tier");
    assert_eq!(err.setting, "warm_up");
    assert!(err.to_string().contains("needs an L2 tier"), "{err}");
    let tier = Arc::new(InProcessTier::new());
    for (bad, what) in [
        (WarmUp::new().keys(0), "keys"),
        (WarmUp::new().batch_size(5_000), "batch_size"),
        (WarmUp::new().concurrency(0), "concurrency"),
        (WarmUp::new().sample_every(0), "sample_every"),
        (WarmUp::new().budget(Duration::ZERO), "budget"),
        (WarmUp::new().report_every(Duration::from_millis(1)), "report_every"),
    ] {
        let err = Cache::<u64, String>::builder(NS).tier(tier.clone()).warm_up(bad).build().expect_err(what);
        assert!(err.to_string().contains(what), "{err}");
    }
}
