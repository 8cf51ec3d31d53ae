//! What the tier's operations cost Redis in commands, counted by the server
//! (`INFO commandstats` counts the commands a script runs, each with its own latency
//! histogram: on Redis 7 about 27 KB of `maxmemory` per distinct command ever run).

use std::collections::BTreeMap;

use strata::tier::{FillOutcome, Tier};
use strata_testkit::RedisServer;

use crate::support::{LEASE, TTL, fresh, hit_value, is_miss, redis_tier, token};

/// Calls per command since the last `CONFIG RESETSTAT`, without the test's own.
fn commands(server: &RedisServer) -> BTreeMap<String, u64> {
    let info = server.command(&["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_string(), rest.split(',').next()?.parse().ok()?))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect()
}

/// Runs `op` and returns the commands Redis executed for it.
async fn cost<F: std::future::Future<Output = ()>>(server: &RedisServer, op: F) -> BTreeMap<String, u64> {
    server.command(&["CONFIG", "RESETSTAT"]).expect("RESETSTAT");
    op.await;
    commands(server)
}

fn total(c: &BTreeMap<String, u64>) -> u64 {
    c.values().sum()
}

/// A miss reads its entry with one bounded `GETRANGE` (no `STRLEN`, no `EXISTS`), a
/// fill checks and stores without them, and a script's hit reads the entry once: the
/// counts below are what each costs, scripts' inner commands included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_operations_cost_their_commands_and_no_more() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "cost").await;
    // Warm: the scripts loaded, the meta hash made, a tombstone generation started.
    let t = token(&tier.lookup("ns", "warm", LEASE).await.unwrap());
    tier.fill("ns", "warm", fresh("w", &[]), TTL, &t).await.unwrap();
    tier.delete("ns", &["warm".to_string()]).await.unwrap();

    let mut t = None;
    let miss = cost(&server, async { t = Some(token(&tier.lookup("ns", "k", LEASE).await.unwrap())) }).await;
    // The plain read (GETRANGE, HMGET), then the script: EVALSHA, the meta hash (HMGET),
    // the entry (GETRANGE), the lease (GET, HINCRBY, SET), the write locks (two ZCARDs).
    assert_eq!(total(&miss), 10, "{miss:?}");
    let fill = cost(&server, async {
        let out = tier.fill("ns", "k", fresh("v", &[]), TTL, &t.clone().unwrap()).await.unwrap();
        assert_eq!(out, FillOutcome::Stored);
    })
    .await;
    // EVALSHA, the meta hash, the tombstone generation (HMGET), the legacy tombstone
    // (GET), the version guard's look at the entry held (GETRANGE), the entry (SET), the
    // lease (GET, UNLINK).
    assert_eq!(total(&fill), 8, "{fill:?}");
    let hit = cost(&server, async {
        assert_eq!(hit_value(&tier.lookup("ns", "k", None).await.unwrap()).as_deref(), Some("v"));
    })
    .await;
    assert_eq!(total(&hit), 2, "a plain read: {hit:?}");
    // A tagged entry is the script's: EVALSHA, the meta hash, the entry, its tag epoch.
    let t = token(&tier.lookup("ns", "tagged", None).await.unwrap());
    tier.fill("ns", "tagged", fresh("x", &["tg"]), TTL, &t).await.unwrap();
    let script_hit = cost(&server, async {
        assert_eq!(hit_value(&tier.lookup("ns", "tagged", None).await.unwrap()).as_deref(), Some("x"));
    })
    .await;
    assert_eq!(total(&script_hit), 2 + 4, "{script_hit:?}");
    let delete = cost(&server, async { tier.delete("ns", &["k".to_string()]).await.unwrap() }).await;
    // EVALSHA, the meta hash (HMGET), the server's time once (TIME), the clock (HSET),
    // the entry and lease (UNLINK), the tombstone generation (HMGET, HLEN, HSET), the
    // legacy tombstone (SET).
    assert_eq!(total(&delete), 9, "{delete:?}");
    let gone = cost(&server, async { assert!(is_miss(&tier.lookup("ns", "k", None).await.unwrap())) }).await;
    for c in [&miss, &fill, &hit, &script_hit, &delete, &gone] {
        for name in ["exists", "strlen", "del", "hget", "zcount"] {
            assert!(!c.contains_key(name), "{name} in {c:?}");
        }
    }
    assert!(!miss.contains_key("time"), "a miss needs no clock: {miss:?}");
    eprintln!(
        "[commands] miss {miss:?}\n fill {fill:?}\n hit {hit:?}\n script hit {script_hit:?}\n delete {delete:?}\n gone \
         {gone:?}"
    );
}
