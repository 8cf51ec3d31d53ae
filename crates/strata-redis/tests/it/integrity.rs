//! Integrity keys (issue #16, Low): with them, an L2 entry or a backplane message that
//! was not written by a holder of a key is a counted miss or an ignored, counted
//! message, never a value served or an invalidation applied.

use std::sync::Arc;
use std::time::Duration;

use strata::Cache;
use strata::tier::{FillOutcome, Tier};
use strata_redis::{IntegrityKey, RedisTier};
use strata_testkit::RedisServer;

use crate::support::{
    TTL, fresh, hit_value, is_miss, raw_conn, read_entry, set_entry_field, token, write_entry,
};

mod backplane;

pub(crate) const K1: &[u8] = b"k1: 32 bytes of key material....";
pub(crate) const K2: &[u8] = b"k2: 32 bytes of other material..";

pub(crate) fn keys(k: &[&[u8]]) -> Vec<IntegrityKey> {
    k.iter().map(|b| IntegrityKey::new(b.to_vec())).collect()
}

async fn tier(server: &RedisServer, k: &[&[u8]]) -> RedisTier {
    let b = RedisTier::builder(server.url()).prefix("shared").op_timeout(Duration::from_secs(2));
    let b = if k.is_empty() { b } else { b.integrity_keys(keys(k)) };
    b.build().await.expect("build redis tier")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_entry_is_a_counted_miss_the_loader_runs_and_the_value_is_right() {
    let server = RedisServer::start();
    let signed = tier(&server, &[K1]).await;
    // Someone who can write the prefix but has no key: a well-formed entry, no MAC.
    let forger = tier(&server, &[]).await;
    let evil: Cache<u64, String> = Cache::builder("payment").tier(Arc::new(forger.clone())).build().unwrap();
    evil.insert(1, "amount=1000000".into()).await.unwrap();
    // And one signed with a key the readers do not have.
    let other_key = tier(&server, &[K2]).await;
    let t = token(&other_key.lookup("payment", "2", None).await.unwrap());
    other_key.fill("payment", "2", fresh("forged", &[]), TTL, &t).await.unwrap();

    let cache: Cache<u64, String> = Cache::builder("payment").tier(Arc::new(signed.clone())).build().unwrap();
    let loads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let loader = |k: u64| {
        let loads = loads.clone();
        move || async move {
            loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some(format!("amount={k}")))
        }
    };
    assert_eq!(cache.get_or_load(&1, loader(1)).await.unwrap().as_deref(), Some("amount=1"));
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1, "the loader ran");
    assert_eq!(signed.stats().integrity_failures, 1, "counted");
    let raw = signed.lookup("payment", "2", None).await.unwrap();
    assert!(is_miss(&raw), "signed with an unknown key: a miss");
    assert_eq!(signed.stats().integrity_failures, 2);
    assert_eq!(signed.stats().undecodable, 0, "counted as integrity failures only");
    // The forged entries were deleted; the good fill replaced the first one and is a hit.
    let mut conn = raw_conn(&server).await;
    let n: u64 =
        redis::cmd("EXISTS").arg(signed.entry_key("payment", "2")).query_async(&mut conn).await.unwrap();
    assert_eq!(n, 0, "the forged entry was deleted");
    let fresh_cache: Cache<u64, String> =
        Cache::builder("payment").tier(Arc::new(signed.clone())).build().unwrap();
    assert_eq!(fresh_cache.get(&1).await.unwrap().as_deref(), Some("amount=1"), "an L2 hit, signed");
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_tags_stamp_or_value_of_a_signed_entry_is_detected() {
    let server = RedisServer::start();
    let signed = tier(&server, &[K1]).await;
    let mut conn = raw_conn(&server).await;
    let fill = |key: &'static str| {
        let signed = signed.clone();
        async move {
            let t = token(&signed.lookup("ns", key, None).await.unwrap());
            let stored = signed.fill("ns", key, fresh("v", &["plan:gold"]), TTL, &t).await.unwrap();
            assert_eq!(stored, FillOutcome::Stored);
            assert_eq!(hit_value(&signed.lookup("ns", key, None).await.unwrap()).as_deref(), Some("v"));
        }
    };
    // Dropping the tags from `t` would let the entry escape invalidate_tag.
    fill("tags").await;
    set_entry_field(&mut conn, &signed.entry_key("ns", "tags"), "t", b"").await;
    // Raising the stamp would let it survive a tag or namespace invalidation.
    fill("stamp").await;
    let ek = signed.entry_key("ns", "stamp");
    let fields = read_entry(&mut conn, &ek).await;
    let s: u64 =
        String::from_utf8_lossy(&fields.iter().find(|(f, _)| f == "s").expect("s").1).parse().expect("s");
    // (Below the clock, which a later invalidation moved: above it, the script itself
    // would drop the entry as corrupt.)
    signed.delete("ns", &["elsewhere".to_owned()]).await.unwrap();
    set_entry_field(&mut conn, &ek, "s", (s + 1).to_string().as_bytes()).await;
    // A flipped byte of the envelope.
    fill("value").await;
    let ek = signed.entry_key("ns", "value");
    let mut e = read_entry(&mut conn, &ek).await.into_iter().find(|(f, _)| f == "e").expect("e").1;
    let last = e.len() - 1;
    e[last] ^= 1;
    set_entry_field(&mut conn, &ek, "e", &e).await;
    // An entry copied under another key.
    fill("copy-from").await;
    let copied = read_entry(&mut conn, &signed.entry_key("ns", "copy-from")).await;
    write_entry(&mut conn, &signed.entry_key("ns", "copy-to"), &copied).await;
    for key in ["tags", "stamp", "value", "copy-to"] {
        let before = signed.stats().integrity_failures;
        assert!(is_miss(&signed.lookup("ns", key, None).await.unwrap()), "{key}: a miss");
        assert_eq!(signed.stats().integrity_failures, before + 1, "{key}: counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_with_the_same_keys_interoperate_and_keys_rotate() {
    let server = RedisServer::start();
    let old = tier(&server, &[K1]).await;
    let rotating = tier(&server, &[K2, K1]).await;
    let new = tier(&server, &[K2]).await;
    let t = token(&old.lookup("ns", "a", None).await.unwrap());
    old.fill("ns", "a", fresh("by-old", &[]), TTL, &t).await.unwrap();
    assert_eq!(
        hit_value(&rotating.lookup("ns", "a", None).await.unwrap()).as_deref(),
        Some("by-old"),
        "old key verifies"
    );
    let t = token(&rotating.lookup("ns", "b", None).await.unwrap());
    rotating.fill("ns", "b", fresh("by-rotating", &[]), TTL, &t).await.unwrap();
    rotating.set("ns", "c", fresh("set-by-rotating", &["x"]), TTL).await.unwrap();
    assert_eq!(
        hit_value(&new.lookup("ns", "b", None).await.unwrap()).as_deref(),
        Some("by-rotating"),
        "the new key signs"
    );
    assert_eq!(hit_value(&new.lookup("ns", "c", None).await.unwrap()).as_deref(), Some("set-by-rotating"));
    assert_eq!(hit_value(&rotating.lookup("ns", "b", None).await.unwrap()).as_deref(), Some("by-rotating"));
    assert_eq!(new.stats().integrity_failures + rotating.stats().integrity_failures, 0);
    assert!(is_miss(&old.lookup("ns", "b", None).await.unwrap()), "a reader without the new key refuses it");
    assert_eq!(old.stats().integrity_failures, 1);
}

#[tokio::test]
async fn short_or_missing_integrity_keys_fail_at_build_time() {
    let url = "redis://127.0.0.1:1";
    let err =
        RedisTier::builder(url).lazy(true).integrity_keys(keys(&[b"too short"])).build().await.unwrap_err();
    assert!(err.to_string().contains("at least 16 bytes"), "{err}");
    assert!(RedisTier::builder(url).lazy(true).integrity_keys(vec![]).build().await.is_err());
    let b = RedisTier::builder(url).lazy(true).integrity_keys(keys(&[K1]));
    assert!(!format!("{b:?}").contains("key material"), "no key bytes in Debug");
    assert_eq!(format!("{:?}", IntegrityKey::new(K1.to_vec())), "IntegrityKey(***)");
}

/// The cost of integrity keys on an L2 hit: alternating rounds of lookups of fresh,
/// valid entries (1 KiB values) on tiers with and without keys, same server. Run with
/// `cargo test --release -p strata-redis --test it -- --ignored integrity_cost --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn integrity_cost_on_l2_hits() {
    const KEYS: usize = 200;
    const ROUNDS: usize = 10;
    let server = RedisServer::start();
    let value = "x".repeat(1024);
    let plain = RedisTier::builder(server.url()).prefix("plain").build().await.unwrap();
    let signed =
        RedisTier::builder(server.url()).prefix("signed").integrity_keys(keys(&[K1])).build().await.unwrap();
    for t in [&plain, &signed] {
        for k in 0..KEYS {
            let key = k.to_string();
            let tok = token(&t.lookup("ns", &key, None).await.unwrap());
            t.fill("ns", &key, fresh(&value, &["tag"]), TTL, &tok).await.unwrap();
        }
    }
    let mut per_hit = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, t) in [&plain, &signed].into_iter().enumerate() {
            let started = std::time::Instant::now();
            for k in 0..KEYS {
                assert!(hit_value(&t.lookup("ns", &k.to_string(), None).await.unwrap()).is_some());
            }
            per_hit[i].push(started.elapsed().as_nanos() as f64 / KEYS as f64 / 1000.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, s) = (median(&mut per_hit[0]), median(&mut per_hit[1]));
    eprintln!(
        "[integrity cost] L2 hit (lookup round trip, 1 KiB value, one tag), median of {ROUNDS} rounds of \
         {KEYS}: without keys {p:.1} us, with keys {s:.1} us, ratio {:.3}",
        s / p
    );
    assert_eq!(signed.stats().integrity_failures, 0);
}
