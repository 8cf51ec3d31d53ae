//! The plain read is skipped while most lookups miss (a cold start: each miss would pay
//! its round trip and then the script's), and tried again once lookups hit.

use strata::tier::Tier;
use strata_testkit::RedisServer;

use super::evalsha_calls;
use crate::support::{TTL, fresh, hit_value, is_miss, redis_tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_lookups_skip_the_plain_read_while_most_miss() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "gate").await;
    let mut trips = Vec::new();
    for i in 0..40 {
        let ops = tier.ops();
        assert!(is_miss(&tier.lookup("g", &format!("k{i}"), None).await.unwrap()));
        trips.push(tier.ops() - ops);
    }
    let skipped_from = trips.iter().position(|&n| n == 1).expect("the plain read was skipped");
    assert!(trips[..skipped_from].iter().all(|&n| n == 2) && (20..=24).contains(&skipped_from), "{trips:?}");
    assert!(trips[skipped_from..].iter().all(|&n| n == 1), "{trips:?}");
    for i in 0..40 {
        tier.set("g", &format!("k{i}"), fresh("v", &[]), TTL).await.unwrap();
    }
    let mut trips = Vec::new();
    for i in 0..40 {
        let ops = tier.ops();
        assert_eq!(hit_value(&tier.lookup("g", &format!("k{i}"), None).await.unwrap()).as_deref(), Some("v"));
        trips.push(tier.ops() - ops);
    }
    // Hits answered by the script, one round trip each, until they outweigh the
    // misses; then by the plain read, one round trip each too, and no script.
    assert!(trips.iter().all(|&n| n == 1), "{trips:?}");
    let scripts = evalsha_calls(&server);
    tier.lookup("g", "k0", None).await.unwrap();
    assert_eq!(evalsha_calls(&server), scripts, "a hit by the plain read again");
}
