//! The tier conformance suite (`strata::testing::conformance`) on the in-process tier;
//! strata-redis runs the same suite on Redis.

use strata::InProcessTier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_tier_passes_the_conformance_suite() {
    strata::testing::conformance::run(&InProcessTier::new(), "in-process").await;
}
