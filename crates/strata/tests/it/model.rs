//! The fill guard and single-flight against a model: random interleavings of loads
//! (some held in the loader while others run), writes with their invalidation, tag and
//! namespace invalidations, evictions of L1 or L2 entries and clock advances, on one
//! cache over the in-process tier. The model is the database itself: after every step,
//! whatever L1 or L2 holds for a key is that key's current row (a slow load that read
//! before a write must never be stored), and every read returned a row that was
//! current at some moment during the read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use strata::testing::ManualClock;
use strata::tier::{MIN_MAX_TAG_EPOCHS, TierConfig};
use strata::{Cache, InProcessTier};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::support::{Db, NS, slow_loader};

const KEYS: u64 = 3;

#[derive(Debug, Clone)]
enum Step {
    /// A read whose loader (if it runs) reads the row, then waits until released.
    SlowRead(u64),
    /// Releases the oldest held loader.
    Release,
    /// A read with an immediate loader.
    Read(u64),
    /// COMMIT of a new row, then its invalidation.
    Write(u64),
    /// New rows for every key of tag `t{k % 2}`, then the tag's invalidation.
    WriteTag(u64),
    /// New rows for every key, then the namespace invalidation.
    WriteAll,
    EvictL1(u64),
    EvictL2(u64),
    Advance(u64),
    /// Invalidations of 24 tags no value carries: past the smallest tag-epoch bound
    /// (16, set on L1 and L2 here), so `t0`'s and `t1`'s epochs get pruned behind the
    /// tag floor, whose rise must never bring an old row back.
    PruneTags,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..KEYS).prop_map(Step::SlowRead),
        3 => Just(Step::Release),
        2 => (0..KEYS).prop_map(Step::Read),
        3 => (0..KEYS).prop_map(Step::Write),
        1 => (0..KEYS).prop_map(Step::WriteTag),
        1 => Just(Step::WriteAll),
        1 => (0..KEYS).prop_map(Step::EvictL1),
        1 => (0..KEYS).prop_map(Step::EvictL2),
        1 => (1..20_000u64).prop_map(Step::Advance),
        1 => Just(Step::PruneTags),
    ]
}

/// A read in flight: its task, its loader's gate, and the rows that were current
/// while it ran (any of them is a correct answer).
struct Held {
    key: u64,
    task: JoinHandle<strata::Result<Option<String>>>,
    gate: Arc<Semaphore>,
    acceptable: Vec<Option<String>>,
}

/// What L2 would serve for `k` (its lookup applies the tag and namespace epochs).
async fn l2_live(tier: &InProcessTier, k: u64) -> Option<String> {
    match strata::tier::Tier::lookup(tier, NS, &k.to_string(), None).await.expect("lookup") {
        strata::tier::Lookup::Hit(env) => env.value.map(|b| postcard::from_bytes(&b).expect("decodable")),
        strata::tier::Lookup::Miss { .. } => None,
    }
}

async fn run(steps: Vec<Step>, with_l2: bool) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    let config = TierConfig { max_tag_epochs: MIN_MAX_TAG_EPOCHS, ..TierConfig::default() };
    let tier = InProcessTier::with_config(config, Arc::new(clock.clone()));
    let mut builder = Cache::builder(NS)
        .clock(Arc::new(clock.clone()))
        .max_tag_epochs(MIN_MAX_TAG_EPOCHS)
        .ttl(Duration::from_secs(60))
        .ttl_jitter(0.0)
        .tags(|k: &u64, _v: &String| vec![format!("t{}", k % 2)]);
    // Without L2, L1's own guard is the only one; with it, both must hold.
    if with_l2 {
        builder = builder.tier(Arc::new(tier.clone()));
    }
    let cache: Cache<u64, String> = builder.build().expect("valid config");
    let db = Db::with(&[(0, "v0"), (1, "v0"), (2, "v0")]);
    let mut version: HashMap<u64, u64> = HashMap::new();
    let mut held: Vec<Held> = Vec::new();
    let mut noise = 0u64;
    let mut commit = |db: &Db, k: u64, held: &mut Vec<Held>| {
        let v = version.entry(k).or_default();
        *v += 1;
        let row = format!("v{v}");
        db.set(k, &row);
        for h in held.iter_mut().filter(|h| h.key == k) {
            h.acceptable.push(Some(row.clone()));
        }
    };
    for s in steps {
        match s {
            Step::SlowRead(k) => {
                let started = Arc::new(Notify::new());
                let gate = Arc::new(Semaphore::new(0));
                let c = cache.clone();
                let loader = slow_loader(&db, k, started.clone(), gate.clone());
                let task = tokio::spawn(async move { c.get_or_load(&k, loader).await });
                // Let it reach its loader, or join a load in flight (then it never starts).
                let _ = tokio::time::timeout(Duration::from_millis(20), started.notified()).await;
                held.push(Held { key: k, task, gate, acceptable: vec![db.get(k)] });
            }
            Step::Release => {
                if !held.is_empty() {
                    let h = held.remove(0);
                    // Release every gate of the key: a joined read waits on the leader's.
                    for other in held.iter().filter(|o| o.key == h.key) {
                        other.gate.add_permits(1);
                    }
                    h.gate.add_permits(1);
                    match h.task.await.expect("task") {
                        Ok(got) => prop_assert!(
                            h.acceptable.contains(&got),
                            "read of {} returned {got:?}, not one of {:?}",
                            h.key,
                            h.acceptable
                        ),
                        // The clock passed the loader's hard timeout while it was held.
                        Err(e) => prop_assert!(e.is_transient(), "read of {} failed: {e}", h.key),
                    }
                    held.retain(|o| o.key != h.key || !o.task.is_finished());
                }
            }
            // It would join a held load of its key (single-flight) and wait for it.
            Step::Read(k) if held.iter().any(|h| h.key == k) => {}
            Step::Read(k) => {
                let got = cache.get_or_load(&k, db.loader(k)).await.expect("read");
                prop_assert_eq!(got, db.get(k), "an immediate read of {} must see the current row", k);
            }
            Step::Write(k) => {
                commit(&db, k, &mut held);
                cache.invalidate(&k).await.expect("invalidate");
            }
            Step::WriteTag(t) => {
                for k in (0..KEYS).filter(|k| k % 2 == t % 2) {
                    commit(&db, k, &mut held);
                }
                cache.invalidate_tag(&format!("t{}", t % 2)).await.expect("invalidate tag");
            }
            Step::WriteAll => {
                for k in 0..KEYS {
                    commit(&db, k, &mut held);
                }
                cache.invalidate_all().await.expect("invalidate all");
            }
            Step::EvictL1(k) => cache.evict_local(&k),
            Step::EvictL2(k) => tier.evict(NS, &k.to_string()),
            Step::Advance(ms) => clock.advance(Duration::from_millis(ms)),
            Step::PruneTags => {
                for _ in 0..24 {
                    noise += 1;
                    cache.invalidate_tag(&format!("noise:{noise}")).await.expect("invalidate tag");
                }
            }
        }
        tokio::task::yield_now().await;
        for k in 0..KEYS {
            let current = db.get(k);
            if let Some(v) = cache.get_local(&k) {
                prop_assert_eq!(Some(v), current.clone(), "L1 holds an old row of {}", k);
            }
            if let Some(v) = l2_live(&tier, k).await {
                prop_assert_eq!(Some(v), current, "L2 serves an old row of {}", k);
            }
        }
    }
    for h in held.drain(..) {
        h.gate.add_permits(8);
        let _ = h.task.await;
    }
    for k in 0..KEYS {
        if let Some(v) = cache.get_local(&k) {
            prop_assert_eq!(Some(v), db.get(k), "L1 holds an old row of {} at the end", k);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_interleaving_stores_an_old_row(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(steps, true))?;
    }

    #[test]
    fn no_interleaving_stores_an_old_row_in_l1_alone(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(steps, false))?;
    }
}
