//! An in-process fleet of three instances sharing an L2 tier and a backplane: a read
//! loads once, an invalidation after a "commit" reaches every instance, and the stats
//! show where each read was answered.
//!
//! Run: `cargo run -p strata --example fleet`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use strata::{Cache, InProcessBackplane, InProcessTier};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The "database".
    let db: Arc<Mutex<HashMap<u64, String>>> =
        Arc::new(Mutex::new(HashMap::from([(42, "silver".to_string())])));

    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let mut fleet = Vec::new();
    for _ in 0..3 {
        let cache: Cache<u64, String> = Cache::builder("billsetting")
            .tier(Arc::new(tier.clone()))
            .backplane(Arc::new(hub.connect()))
            .ttl(Duration::from_secs(24 * 3600))
            .build()?;
        cache.ready().await;
        fleet.push(cache);
    }

    let load = |db: Arc<Mutex<HashMap<u64, String>>>| {
        move || async move {
            tokio::time::sleep(Duration::from_millis(5)).await; // a database round trip
            Ok::<_, std::io::Error>(db.lock().get(&42).cloned())
        }
    };
    for (i, cache) in fleet.iter().enumerate() {
        let plan = cache.get_or_load(&42, load(db.clone())).await?;
        println!("instance {i} reads plan {plan:?}");
    }

    // A plan change: commit, then invalidate through any instance.
    db.lock().insert(42, "gold".to_string());
    fleet[0].invalidate(&42).await?;
    tokio::time::sleep(Duration::from_millis(10)).await; // propagation (Invalidated level)

    for (i, cache) in fleet.iter().enumerate() {
        let plan = cache.get_or_load(&42, load(db.clone())).await?;
        let s = cache.stats();
        println!(
            "instance {i} reads plan {plan:?}  (l1 hits {}, l2 hits {}, loads {}, invalidations applied {})",
            s.l1_hits, s.l2_hits, s.loads, s.invalidations_applied
        );
    }
    Ok(())
}
