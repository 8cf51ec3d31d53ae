//! `sharded`: what `ShardedTier` adds to an L2 lookup — placement (rendezvous over the
//! shards), the hot-key sketch, the per-shard breaker and timeout, and tagging the
//! stamp — measured over in-process shards, so that the network round trip a real L2
//! costs (tens of microseconds) does not hide it. Contenders, in one criterion run: one
//! `InProcessTier` looked up directly, and a `ShardedTier` over 3 of them, and over 64
//! virtual shards of one. Every lookup is a hit on one of 10,000 keys.
//!
//! `cargo bench -p strata --bench sharded`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use strata::tier::sharded::NumberedNames;
use strata::tier::{Envelope, Lookup, Tier};
use strata::{Clock, InProcessTier, ShardedTier, SystemClock};

const KEYS: usize = 10_000;

fn envelope() -> Envelope {
    let now = SystemClock::default().now();
    Envelope {
        value: Some(Bytes::from_static(b"row")),
        version: None,
        created: now,
        soft_expiry: now.saturating_add(Duration::from_secs(3600)),
        hard_expiry: now.saturating_add(Duration::from_secs(7200)),
        stamp: 0,
        tags: Vec::new(),
        load_nanos: 0,
        schema: 1,
    }
}

async fn filled(tier: &dyn Tier, keys: &[String]) {
    for k in keys {
        if let Ok(Lookup::Miss { token, .. }) = tier.lookup("ns", k, None).await {
            let _ = tier.fill("ns", k, envelope(), Duration::from_secs(3600), &token).await;
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    let direct = InProcessTier::new();
    let mut ring = ShardedTier::builder();
    for i in 0..3 {
        ring = ring.shard(format!("node-{i}"), Arc::new(InProcessTier::new()));
    }
    let ring = ring.build().expect("valid");
    let virtual_shards = ShardedTier::builder()
        .virtual_shards(Arc::new(InProcessTier::new()), 64, NumberedNames)
        .build()
        .expect("valid");
    let contenders: [(&str, &dyn Tier); 3] =
        [("in_process", &direct), ("sharded_ring_3", &ring), ("sharded_virtual_64", &virtual_shards)];
    for (_, tier) in contenders {
        rt.block_on(filled(tier, &keys));
    }
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("l2_lookup_hit");
    for (name, tier) in contenders {
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7919) % KEYS;
                black_box(rt.block_on(tier.lookup("ns", &keys[i], None)).is_ok())
            })
        });
    }
    group.finish();
    c.final_summary();
}
