//! Value types that change between deploys: two builds of one namespace share L2 (a
//! rolling deploy), and neither reads the other's entries as its own type. Every entry
//! carries the schema fingerprint of the cache that wrote it (`strata::schema`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata::schema::Schema;
use strata::testing::ManualClock;
use strata::tier::TierConfig;
use strata::{Cache, CacheKey, Codec, InProcessTier, PostcardCodec, loader_fn};

use crate::support::NS;

/// The value type of the old build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaymentV1 {
    amount: u64,
    fee: u64,
    status: StatusV1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum StatusV1 {
    Pending,
    Completed,
}

/// The new build's: two fields swapped, a variant inserted. postcard reads the old
/// build's bytes of `{10000, 30, Completed}` as `{fee: 10000, amount: 30, Refunded}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaymentV2 {
    fee: u64,
    amount: u64,
    status: StatusV2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum StatusV2 {
    Pending,
    Refunded,
    Completed,
}

/// The fingerprint of `PaymentV1` under postcard and schema version 0, computed once
/// (and checked against another xxh3 implementation): if it changes, the algorithm
/// changed, and every entry deployed builds wrote becomes a miss.
const PAYMENT_V1_FINGERPRINT: u64 = 0xf6b3_b594_c6ff_11fc;

/// Row `k` as each build loads it from the database: the same payment.
fn row_v1(k: u64) -> PaymentV1 {
    PaymentV1 { amount: 10_000 + k, fee: 30 + k, status: StatusV1::Completed }
}

fn row_v2(k: u64) -> PaymentV2 {
    PaymentV2 { fee: 30 + k, amount: 10_000 + k, status: StatusV2::Completed }
}

fn load_v1(
    k: u64,
) -> impl FnOnce() -> std::future::Ready<Result<Option<PaymentV1>, io::Error>> + Send + 'static {
    move || std::future::ready(Ok(Some(row_v1(k))))
}

fn load_v2(
    k: u64,
) -> impl FnOnce() -> std::future::Ready<Result<Option<PaymentV2>, io::Error>> + Send + 'static {
    move || std::future::ready(Ok(Some(row_v2(k))))
}

fn fingerprint<V: serde::de::DeserializeOwned + Serialize + 'static>(version: u32) -> u64 {
    Schema::of::<V>(PostcardCodec::<V>::default().name(), version).fingerprint()
}

/// The schema fingerprint of what L2 holds for `key`.
fn l2_schema(tier: &InProcessTier, key: u64) -> Option<u64> {
    tier.raw(NS, &key.to_key_string()).map(|e| e.schema)
}

fn on<V: strata::CacheValue>(tier: &InProcessTier) -> Cache<u64, V> {
    Cache::builder(NS).tier(Arc::new(tier.clone())).build().expect("valid")
}

#[tokio::test]
async fn a_changed_value_type_is_a_counted_miss_never_a_wrong_decode() {
    let tier = InProcessTier::new();
    let v1 = on::<PaymentV1>(&tier);
    let v2 = on::<PaymentV2>(&tier);
    let (f1, f2) = (fingerprint::<PaymentV1>(0), fingerprint::<PaymentV2>(0));
    assert_ne!(f1, f2);

    v1.get_or_load(&1, load_v1(1)).await.expect("v1 load");
    assert_eq!(l2_schema(&tier, 1), Some(f1));

    // V2 reads V1's entry: a counted miss, left in place (V1 may be serving it).
    assert_eq!(v2.get(&1).await.expect("v2 get"), None, "never V1's bytes decoded as V2");
    assert_eq!(v2.stats().l2_schema_mismatches, 1);
    assert_eq!(l2_schema(&tier, 1), Some(f1), "not deleted");

    // V2 loads its own row and its fill replaces V1's entry.
    assert_eq!(v2.get_or_load(&1, load_v2(1)).await.expect("v2 load"), Some(row_v2(1)));
    let s2 = v2.stats();
    assert_eq!((s2.l2_schema_mismatches, s2.l2_hits, s2.loads, s2.l2_undecodable), (2, 0, 1, 0));
    assert_eq!(l2_schema(&tier, 1), Some(f2), "replaced by V2's fill");

    // V1 (its L1 copy dropped) reads V2's entry: a miss, not V2's bytes as V1.
    v1.evict_local(&1);
    assert_eq!(v1.get(&1).await.expect("v1 get"), None);
    assert_eq!(v1.get_or_load(&1, load_v1(1)).await.expect("v1 reload"), Some(row_v1(1)));
    let s1 = v1.stats();
    assert_eq!((s1.l2_schema_mismatches, s1.l2_hits, s1.loads, s1.l2_undecodable), (2, 0, 2, 0));
    assert_eq!(l2_schema(&tier, 1), Some(f1));

    // A build reads its own entries from L2 as before.
    let v1b = on::<PaymentV1>(&tier);
    assert_eq!(v1b.get(&1).await.expect("v1b get"), Some(row_v1(1)));
    assert_eq!((v1b.stats().l2_hits, v1b.stats().l2_schema_mismatches), (1, 0));
}

#[tokio::test]
async fn two_builds_side_by_side_never_read_each_others_entries() {
    let tier = InProcessTier::new();
    let v1 = on::<PaymentV1>(&tier);
    let v2 = on::<PaymentV2>(&tier);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..600 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = rng % 8;
        // Drop the local copy so that every read goes to L2.
        match (rng >> 8) % 4 {
            0 => {
                v1.evict_local(&k);
                assert_eq!(v1.get_or_load(&k, load_v1(k)).await.expect("v1"), Some(row_v1(k)));
            }
            1 => {
                v2.evict_local(&k);
                assert_eq!(v2.get_or_load(&k, load_v2(k)).await.expect("v2"), Some(row_v2(k)));
            }
            2 => {
                v1.evict_local(&k);
                let got = v1.get(&k).await.expect("v1 get");
                assert!(got.is_none() || got == Some(row_v1(k)), "v1 read {got:?}");
            }
            _ => {
                v2.evict_local(&k);
                let got = v2.get(&k).await.expect("v2 get");
                assert!(got.is_none() || got == Some(row_v2(k)), "v2 read {got:?}");
            }
        }
    }
    let (s1, s2) = (v1.stats(), v2.stats());
    eprintln!("side by side: v1 {s1:?}\nv2 {s2:?}");
    for s in [&s1, &s2] {
        assert!(s.l2_hits > 0, "each read its own entries");
        assert!(s.l2_schema_mismatches > 0, "and missed on the other's");
        assert_eq!(s.l2_undecodable, 0);
    }
}

#[tokio::test]
async fn batch_reads_miss_on_another_schema_and_replace_it() {
    let tier = InProcessTier::new();
    let v1 = on::<PaymentV1>(&tier);
    let v2: Cache<u64, PaymentV2> = Cache::builder(NS)
        .tier(Arc::new(tier.clone()))
        .loader(loader_fn(|k: u64| async move { Ok::<_, io::Error>(Some(row_v2(k))) }))
        .build()
        .expect("valid");
    for k in 0..3 {
        v1.get_or_load(&k, load_v1(k)).await.expect("v1 load");
    }
    assert_eq!(v2.get_many(&[0, 1, 2]).await.expect("get_many"), vec![None, None, None]);
    assert_eq!(v2.stats().l2_schema_mismatches, 3);
    let rows = v2.get_or_load_many(&[0, 1, 2]).await.expect("get_or_load_many");
    assert_eq!(rows, vec![Some(row_v2(0)), Some(row_v2(1)), Some(row_v2(2))]);
    for k in 0..3 {
        assert_eq!(l2_schema(&tier, k), Some(fingerprint::<PaymentV2>(0)), "key {k} replaced");
    }
}

#[tokio::test]
async fn a_stale_copy_of_another_schema_is_never_served_by_fail_safe() {
    let clock = ManualClock::new();
    let tier = InProcessTier::with_config(TierConfig::default(), Arc::new(clock.clone()));
    fn build<V: strata::CacheValue>(tier: &InProcessTier, clock: &ManualClock) -> Cache<u64, V> {
        Cache::builder(NS)
            .tier(Arc::new(tier.clone()))
            .clock(Arc::new(clock.clone()))
            .ttl(Duration::from_secs(10))
            .ttl_jitter(0.0)
            .fail_safe(Duration::from_secs(600), Duration::from_secs(1))
            .build()
            .expect("valid")
    }
    let failing = || async { Err::<Option<PaymentV2>, _>(io::Error::other("database down")) };
    let v1 = build::<PaymentV1>(&tier, &clock);
    v1.get_or_load(&1, load_v1(1)).await.expect("v1 load");
    clock.advance(Duration::from_secs(30));

    let v2 = build::<PaymentV2>(&tier, &clock);
    let err = v2.get_or_load(&1, failing).await.expect_err("no copy of V2's own to fall back on");
    assert!(err.to_string().contains("database down"), "{err}");
    assert_eq!(v2.stats().stale_served, 0);
    assert_eq!(v2.stats().l2_schema_mismatches, 1);

    // The old build's own stale copy still serves it.
    let v1b = build::<PaymentV1>(&tier, &clock);
    let failing_v1 = || async { Err::<Option<PaymentV1>, _>(io::Error::other("database down")) };
    assert_eq!(v1b.get_or_load(&1, failing_v1).await.expect("stale copy"), Some(row_v1(1)));
    assert_eq!(v1b.stats().stale_served, 1);
}

#[tokio::test]
async fn the_same_shape_under_another_schema_version_is_a_miss() {
    let tier = InProcessTier::new();
    let build = |version: u32| -> Cache<u64, PaymentV1> {
        Cache::builder(NS).tier(Arc::new(tier.clone())).schema_version(version).build().expect("valid")
    };
    let (old, new, new_again) = (build(0), build(1), build(1));
    old.get_or_load(&1, load_v1(1)).await.expect("old load");
    assert_eq!(new.get(&1).await.expect("new get"), None);
    assert_eq!(new.stats().l2_schema_mismatches, 1);
    assert_eq!(new.get_or_load(&1, load_v1(1)).await.expect("new load"), Some(row_v1(1)));
    assert_eq!(l2_schema(&tier, 1), Some(fingerprint::<PaymentV1>(1)));
    assert_eq!(new_again.get(&1).await.expect("same version"), Some(row_v1(1)));
    assert_eq!((new_again.stats().l2_hits, new_again.stats().l2_schema_mismatches), (1, 0));
    assert_ne!(fingerprint::<PaymentV1>(0), fingerprint::<PaymentV1>(1));
}

#[tokio::test]
async fn the_fingerprint_is_stable_across_builds_and_processes() {
    let schema = Schema::of::<PaymentV1>("postcard-1", 0);
    assert_eq!(
        schema.shape(),
        Some("#0=PaymentV1{amount:u64,fee:u64,status:#1=StatusV1<0:Pending|1:Completed>}")
    );
    assert_eq!(
        schema.fingerprint(),
        PAYMENT_V1_FINGERPRINT,
        "the fingerprint algorithm changed: {:#018x}",
        schema.fingerprint()
    );
    assert_eq!(PostcardCodec::<PaymentV1>::default().name(), "postcard-1");

    // Two separately built caches of one type and version share their entries.
    let tier = InProcessTier::new();
    let a = on::<PaymentV1>(&tier);
    a.get_or_load(&7, load_v1(7)).await.expect("a load");
    assert_eq!(l2_schema(&tier, 7), Some(PAYMENT_V1_FINGERPRINT));
    let b = on::<PaymentV1>(&tier);
    let unexpected = || async { Err::<Option<PaymentV1>, _>(io::Error::other("must not load")) };
    assert_eq!(b.get_or_load(&7, unexpected).await.expect("b reads a's entry"), Some(row_v1(7)));
    let s = b.stats();
    assert_eq!((s.l2_hits, s.loads, s.l2_schema_mismatches), (1, 0, 0));
}
