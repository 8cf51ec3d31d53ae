//! `l1_hit`: the cost of an L1 hit in strata against a raw quick_cache get (the engine
//! underneath) and a moka get (sync and future), in one criterion run.
//!
//! 100k resident entries, seeded Zipf(1.0) keys, 1 and 2 threads. Every lookup is a hit.
//! Each thread walks its own pre-generated key sequence; the time reported is per get
//! on each thread. Two value types: `u64` (the harshest case: the engine's own clone is
//! nearly free, so every byte and instruction strata adds shows) and `Arc<Row>` (what
//! applications usually store: a shared row, whose reference count every cache pays).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

const ENTRIES: u64 = 100_000;
const KEYS_PER_THREAD: usize = 1 << 20;

fn keys(seed: u64) -> Arc<Vec<u64>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let zipf = Zipf::new(ENTRIES as f64, 1.0).expect("valid zipf");
    Arc::new((0..KEYS_PER_THREAD).map(|_| zipf.sample(&mut rng) as u64 - 1).collect())
}

/// Runs `get` on `threads` threads, `iters` times each, and returns the wall time.
fn run<G: Fn(u64) -> Option<u64> + Send + Sync + 'static>(
    threads: usize,
    iters: u64,
    key_sets: &[Arc<Vec<u64>>],
    get: Arc<G>,
) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let keys = key_sets[t].clone();
            let get = get.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut i = 0usize;
                for _ in 0..iters {
                    black_box(get(keys[i]));
                    i = (i + 1) & (KEYS_PER_THREAD - 1);
                }
                start.elapsed()
            })
        })
        .collect();
    barrier.wait();
    handles.into_iter().map(|h| h.join().expect("bench thread")).max().unwrap_or_default()
}

/// A settings row as an application would cache it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Row {
    id: u64,
    plan: String,
    version: u64,
}

fn bench_value_type<V, F>(c: &mut Criterion, label: &str, key_sets: &[Arc<Vec<u64>>], make: F)
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
    F: Fn(u64) -> V,
{
    let strata: strata::Cache<u64, V> = strata::Cache::builder("bench")
        .max_capacity(2 * ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build()
        .expect("valid config");
    for k in 0..ENTRIES {
        futures::executor::block_on(strata.insert(k, make(k))).expect("insert");
    }
    let strata = Arc::new(move |k: u64| strata.get_local(&k).map(|_| k));

    let raw: quick_cache::sync::Cache<u64, V> = quick_cache::sync::Cache::new(2 * ENTRIES as usize);
    for k in 0..ENTRIES {
        raw.insert(k, make(k));
    }
    let raw = Arc::new(move |k: u64| raw.get(&k).map(|_| k));

    let moka_sync: moka::sync::Cache<u64, V> = moka::sync::Cache::builder()
        .max_capacity(2 * ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    for k in 0..ENTRIES {
        moka_sync.insert(k, make(k));
    }
    moka_sync.run_pending_tasks();
    let moka_sync = Arc::new(move |k: u64| moka_sync.get(&k).map(|_| k));

    let moka_future: moka::future::Cache<u64, V> = moka::future::Cache::builder()
        .max_capacity(2 * ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    futures::executor::block_on(async {
        for k in 0..ENTRIES {
            moka_future.insert(k, make(k)).await;
        }
        moka_future.run_pending_tasks().await;
    });
    let moka_future = Arc::new(move |k: u64| futures::executor::block_on(moka_future.get(&k)).map(|_| k));

    for threads in [1usize, 2] {
        let mut g =
            c.benchmark_group(format!("l1_hit/entries=100k/zipf=1.0/values={label}/threads={threads}"));
        g.throughput(criterion::Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter("strata"), |b| {
            b.iter_custom(|iters| run(threads, iters, key_sets, strata.clone()))
        });
        g.bench_function(BenchmarkId::from_parameter("quick_cache"), |b| {
            b.iter_custom(|iters| run(threads, iters, key_sets, raw.clone()))
        });
        g.bench_function(BenchmarkId::from_parameter("moka_sync"), |b| {
            b.iter_custom(|iters| run(threads, iters, key_sets, moka_sync.clone()))
        });
        g.bench_function(BenchmarkId::from_parameter("moka_future"), |b| {
            b.iter_custom(|iters| run(threads, iters, key_sets, moka_future.clone()))
        });
        g.finish();
    }
}

fn l1_hit(c: &mut Criterion) {
    let key_sets: Vec<_> = (0..2).map(|t| keys(42 + t)).collect();
    bench_value_type(c, "u64", &key_sets, |k| k);
    bench_value_type(c, "arc_row", &key_sets, |k| {
        Arc::new(Row { id: k, plan: format!("plan-{}", k % 7), version: 1 })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = l1_hit
}
criterion_main!(benches);
