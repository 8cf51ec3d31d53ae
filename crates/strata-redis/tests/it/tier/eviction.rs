//! Memory pressure: what eviction (or a `DEL`, standing in for it) takes from under the
//! fill guard never lets an old value in, and a server over `maxmemory` still takes
//! every invalidation.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use strata::Scope;
use strata::backplane::Backplane;
use strata::tier::{FillOutcome, Lookup, Tier};
use strata_redis::{EvictionCheck, RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

use crate::support::{LEASE, TTL, fresh, hit_value, key_of, msg, raw_conn, redis_tier, token};

async fn del(raw: &mut MultiplexedConnection, keys: &[String]) {
    let _: u64 = redis::cmd("DEL").arg(keys).query_async(raw).await.expect("DEL");
}

/// The deterministic form of a tombstone lost to eviction: a fill takes its token, the
/// key is invalidated, the tombstone is deleted, then the late fill arrives. For each
/// way the tombstone can go (its generation, both, the meta hash with them, or aged out
/// by two rotations of a short tombstone ttl), the fill is refused and the key reads
/// as a miss: 0 stale entries over 40 keys each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tombstone_never_lets_a_late_fill_in() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "evict").await;
    let short = RedisTier::builder(server.url())
        .prefix("evict2")
        .tombstone_ttl(Duration::from_millis(30))
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("tier");
    let mut raw = raw_conn(&server).await;
    let mut stale = Vec::new();
    for (case, tier) in [("generation", &tier), ("both", &tier), ("meta", &tier), ("aged out", &short)] {
        let ns = format!("ns-{}", case.replace(' ', "-"));
        for i in 0..40 {
            let key = format!("k{i}");
            let t = token(&tier.lookup(&ns, &key, LEASE).await.expect("lookup"));
            tier.delete(&ns, std::slice::from_ref(&key)).await.expect("delete");
            match case {
                "generation" => del(&mut raw, &[key_of(tier, &ns, "x0")]).await,
                "both" => del(&mut raw, &[key_of(tier, &ns, "x0"), key_of(tier, &ns, "x1")]).await,
                "meta" => {
                    del(&mut raw, &[key_of(tier, &ns, "m"), key_of(tier, &ns, "x0"), key_of(tier, &ns, "x1")])
                        .await
                }
                _ => {
                    // Two rotations: the generation holding the key's tombstone is dropped.
                    for r in 0..2 {
                        tokio::time::sleep(Duration::from_millis(40)).await;
                        tier.delete(&ns, &[format!("other{i}-{r}")]).await.expect("delete");
                    }
                }
            }
            let outcome = tier.fill(&ns, &key, fresh("old", &[]), TTL, &t).await.expect("fill");
            let read = hit_value(&tier.lookup(&ns, &key, None).await.expect("lookup"));
            if outcome != FillOutcome::Rejected || read.is_some() {
                stale.push(format!("{case} {key}: {outcome:?}, read {read:?}"));
            }
        }
        // A fill that began after the loss is stored as usual.
        let t = token(&tier.lookup(&ns, "fresh", LEASE).await.expect("lookup"));
        assert_eq!(
            tier.fill(&ns, "fresh", fresh("new", &[]), TTL, &t).await.expect("fill"),
            FillOutcome::Stored,
            "{case}: a fill after the loss"
        );
        assert_eq!(
            hit_value(&tier.lookup(&ns, "fresh", None).await.expect("lookup")).as_deref(),
            Some("new")
        );
    }
    eprintln!(
        "[eviction] lost tombstones: {} stale of 160; stats {:?} / {:?}",
        stale.len(),
        tier.stats(),
        short.stats()
    );
    assert!(stale.is_empty(), "late fills got in:\n{}", stale.join("\n"));
}

/// Puts `server` over its memory limit for good: 2 MB of keys without a TTL, then a
/// `maxmemory` below what is used, so that no policy but `allkeys-*` can get under it
/// and every write Redis counts as growing memory is refused.
async fn over_the_limit(raw: &mut MultiplexedConnection) {
    let junk = vec![b'j'; 1024];
    for i in 0..2048 {
        let _: () =
            redis::cmd("SET").arg(format!("junk:{i}")).arg(&junk).query_async(raw).await.expect("SET");
    }
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1mb").query_async(raw).await.expect("CONFIG");
}

/// Over `maxmemory` with nothing the policy may evict (`noeviction`; `volatile-lru`
/// with only keys without a TTL), Redis refuses writes: every invalidation still goes
/// through (key, tag, namespace, a write lock, a backplane publish), lookups still
/// answer, and a fill is not stored without failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_go_through_when_redis_is_out_of_memory() {
    for policy in ["noeviction", "volatile-lru"] {
        let server = RedisServer::builder().arg("maxmemory-policy", policy).start();
        let tier = RedisTier::builder(server.url())
            .prefix("oom")
            .eviction_check(EvictionCheck::Skip)
            .op_timeout(Duration::from_secs(2))
            .build()
            .await
            .expect("tier");
        let bp = RedisStreamBackplane::builder(server.url()).prefix("oom").build().await.expect("backplane");
        let t = token(&tier.lookup("ns", "k", LEASE).await.expect("lookup"));
        tier.fill("ns", "k", fresh("v1", &["tag"]), TTL, &t).await.expect("fill before");
        let mut raw = raw_conn(&server).await;
        over_the_limit(&mut raw).await;
        let refused: redis::RedisResult<()> =
            redis::cmd("SET").arg("probe").arg("x").query_async(&mut raw).await;
        assert!(refused.is_err(), "{policy}: the server must be out of memory");

        tier.delete("ns", &["k".to_owned()]).await.unwrap_or_else(|e| panic!("{policy}: delete: {e}"));
        assert!(hit_value(&tier.lookup("ns", "k", None).await.expect("lookup")).is_none());
        tier.invalidate_tag("ns", "tag").await.unwrap_or_else(|e| panic!("{policy}: tag: {e}"));
        tier.lock("ns", &Scope::Keys(vec!["k".into()]), 9, TTL)
            .await
            .unwrap_or_else(|e| panic!("{policy}: lock: {e}"));
        tier.unlock("ns", &Scope::Keys(vec!["k".into()]), 9)
            .await
            .unwrap_or_else(|e| panic!("{policy}: unlock: {e}"));
        tier.invalidate_namespace("ns").await.unwrap_or_else(|e| panic!("{policy}: namespace: {e}"));
        bp.publish(&msg(1, 1, "k")).await.unwrap_or_else(|e| panic!("{policy}: publish: {e}"));
        let t =
            token(&tier.lookup("ns", "k2", LEASE).await.unwrap_or_else(|e| panic!("{policy}: lookup: {e}")));
        let before = tier.stats().refused_for_memory;
        let out = tier.fill("ns", "k2", fresh("v2", &[]), TTL, &t).await;
        assert_eq!(out.ok(), Some(FillOutcome::Stored), "{policy}: a fill refused for memory is no error");
        assert_eq!(tier.stats().refused_for_memory, before + 1, "{policy}: counted");
        assert!(hit_value(&tier.lookup("ns", "k2", None).await.expect("lookup")).is_none());
        eprintln!("[eviction] {policy}: over maxmemory; stats {:?}", tier.stats());
    }
}

async fn used_memory(raw: &mut MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(raw).await.expect("INFO");
    let line = info.lines().find_map(|l| l.strip_prefix("used_memory:")).expect("used_memory");
    line.trim().parse().expect("a number")
}

/// Redis bytes per cached entry, strata against a plain `SET … PX` of the same value
/// under a key of the same length (what a cache-aside stores), and per invalidated key
/// (the tombstone). Printed; the assertion only guards against a regression.
/// `cargo test -p strata-redis --test it memory_per_entry -- --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_entry_against_a_plain_set() {
    const N: usize = 4000;
    let server = RedisServer::start();
    let tier = redis_tier(&server, "strata").await;
    let mut raw = raw_conn(&server).await;
    let value = "v".repeat(100);
    // Warm the namespace's own keys (meta hash, first tombstone generation) first.
    tier.delete("billsetting", &["warm".to_owned()]).await.expect("delete");
    let base = used_memory(&mut raw).await;
    for i in 0..N {
        let key = i.to_string();
        let t = token(&tier.lookup("billsetting", &key, None).await.expect("lookup"));
        tier.fill("billsetting", &key, fresh(&value, &["plan"]), TTL, &t).await.expect("fill");
    }
    let strata = used_memory(&mut raw).await - base;
    let keys: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    for chunk in keys.chunks(100) {
        tier.delete("billsetting", chunk).await.expect("delete");
    }
    let tombs = used_memory(&mut raw).await - base;
    let base = used_memory(&mut raw).await;
    // The same value bytes as strata's envelope holds them, under a key as long.
    let plain_value = vec![b'v'; 100 + 1 + 8];
    for i in 0..N {
        let _: () = redis::cmd("SET")
            .arg(format!("strata:{{billsetting}}:e:{i}x"))
            .arg(&plain_value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut raw)
            .await
            .expect("SET");
    }
    let plain = used_memory(&mut raw).await - base;
    let (per_entry, per_plain) = (strata as f64 / N as f64, plain as f64 / N as f64);
    eprintln!(
        "[memory] per entry: strata {per_entry:.0} B, plain SET {per_plain:.0} B ({:.2}x); per invalidated key \
         (tombstone, entry gone) {:.0} B",
        per_entry / per_plain,
        tombs as f64 / N as f64
    );
    // 3.23x while entries were hashes (a field over 64 bytes made each a hash table).
    assert!(per_entry < 2.0 * per_plain, "strata {per_entry:.0} B per entry against {per_plain:.0} B");
}

/// Without integrity keys an entry keeps its stamp in its head alone: the envelope's
/// copy is 0 (one byte of postcard, not eight; 232 -> 216 Redis bytes per entry in
/// `strata bench`), and a hit still carries the fill token's stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stamp_is_stored_once() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "stamp").await;
    let mut raw = raw_conn(&server).await;
    let t = token(&tier.lookup("ns", "k", None).await.expect("lookup"));
    tier.fill("ns", "k", fresh("row", &[]), TTL, &t).await.expect("fill");
    let stored: Vec<u8> =
        redis::cmd("GET").arg(tier.entry_key("ns", "k")).query_async(&mut raw).await.expect("GET");
    let head_end = stored.iter().position(|&b| b == b';').expect("a head");
    assert!(stored.starts_with(format!("{},", t.stamp).as_bytes()), "the head holds the stamp");
    let mut varint = Vec::new();
    let mut n = t.stamp;
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        varint.push(if n > 0 { b | 128 } else { b });
        if n == 0 {
            break;
        }
    }
    assert!(!stored[head_end..].windows(varint.len()).any(|w| w == varint), "the envelope does not");
    match tier.lookup("ns", "k", None).await.expect("lookup") {
        Lookup::Hit(e) => assert_eq!(e.stamp, t.stamp),
        other => panic!("expected a hit, got {other:?}"),
    }
}

/// A rolling deploy from strata 0.1: its tombstones (`…:x:<key>` keys) refuse this
/// release's late fills and this release writes them for 0.1's fills
/// (`legacy_tombstones`, on by default); its entries (hashes) read as plain misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_and_entries_of_the_previous_release_are_honoured() {
    let server = RedisServer::start();
    let tier = redis_tier(&server, "roll").await;
    let mut raw = raw_conn(&server).await;
    let t = token(&tier.lookup("ns", "k", LEASE).await.expect("lookup"));
    let old_tomb = key_of(&tier, "ns", "x:k");
    let _: () = redis::cmd("SET")
        .arg(&old_tomb)
        .arg(t.stamp + 1)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(tier.fill("ns", "k", fresh("old", &[]), TTL, &t).await.unwrap(), FillOutcome::Rejected);
    tier.delete("ns", &["j".to_owned()]).await.unwrap();
    let n: u64 = redis::cmd("EXISTS").arg(key_of(&tier, "ns", "x:j")).query_async(&mut raw).await.unwrap();
    assert_eq!(n, 1, "a delete writes the 0.1 tombstone too");
    let off =
        RedisTier::builder(server.url()).prefix("roll2").legacy_tombstones(false).build().await.unwrap();
    off.delete("ns", &["j".to_owned()]).await.unwrap();
    let n: u64 = redis::cmd("EXISTS").arg(key_of(&off, "ns", "x:j")).query_async(&mut raw).await.unwrap();
    assert_eq!(n, 0, "not with legacy_tombstones(false)");
    // A 0.1 entry: a miss, deleted, not counted as undecodable.
    let ek = tier.entry_key("ns", "h");
    let _: () =
        redis::cmd("HSET").arg(&ek).arg("e").arg("x").arg("s").arg("1").query_async(&mut raw).await.unwrap();
    let bad = tier.stats().undecodable;
    assert!(hit_value(&tier.lookup("ns", "h", None).await.unwrap()).is_none());
    assert_eq!(tier.stats().undecodable, bad);
    let n: u64 = redis::cmd("EXISTS").arg(&ek).query_async(&mut raw).await.unwrap();
    assert_eq!(n, 0);
}
