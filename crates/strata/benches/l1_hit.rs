//! `l1_hit`: the cost of an L1 hit in strata against a raw quick_cache get (the engine
//! underneath) and a moka get (sync and future), in one criterion run.
//!
//! 100k resident entries, seeded Zipf(1.0) keys, 1 and 2 threads. Every lookup is a hit.
//! Each thread walks its own pre-generated key sequence; the time reported is per get
//! on each thread. Two value types: `u64` (the harshest case: the engine's own clone is
//! nearly free, so every byte and instruction strata adds shows) and `Arc<Row>` (what
//! applications usually store: a shared row, whose reference count every cache pays).
//!
//! After criterion's groups, a paired run measures the ratio with the tight bound
//! (strata ÷ raw quick_cache ≤ 1.5): criterion measures one contender for seconds, then
//! the next, and on a shared machine the load changes in between (we have seen the same
//! raw quick_cache get take 26 ns in one group and 51 ns in the next). The paired run
//! alternates strata and quick_cache every 100 000 gets per thread (the same keys each
//! time, so the hot entries stay in the CPU caches, as in criterion's samples), on
//! threads that live for the whole run, and reports the median and quartiles of the per-round ratios, so
//! that both sides of each ratio share the machine's state. Moka, 7–18× slower than
//! either in our runs, is left to criterion's groups: alternating with it would evict
//! the others' hot entries from the CPU caches between rounds. `L1_HIT_ROUNDS` sets the
//! number of rounds (default 100; 0 skips the paired run).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
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

/// Runs `runner`'s get on `threads` new threads, `iters` times each from the start of
/// each thread's keys, and returns the longest thread's time.
fn run(threads: usize, iters: u64, key_sets: &[Arc<Vec<u64>>], runner: &dyn Runner) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = key_sets[..threads]
            .iter()
            .map(|keys| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    runner.gets(keys, iters)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).max().unwrap_or_default()
    })
}

/// A settings row as an application would cache it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Row {
    id: u64,
    plan: String,
    version: u64,
}

/// One contender's get loop; dynamic per call, so that every get is a static call,
/// inlined into the loop as in application code.
trait Runner: Send + Sync {
    /// Runs `iters` gets on the calling thread, walking `keys` from the start, and
    /// returns the time taken.
    fn gets(&self, keys: &[u64], iters: u64) -> Duration;
}

struct Contender<G>(G);

impl<G: Fn(u64) -> Option<u64> + Send + Sync> Runner for Contender<G> {
    fn gets(&self, keys: &[u64], iters: u64) -> Duration {
        let start = Instant::now();
        let mut i = 0;
        for _ in 0..iters {
            black_box((self.0)(keys[i]));
            i = (i + 1) & (KEYS_PER_THREAD - 1);
        }
        start.elapsed()
    }
}

type Get = Box<dyn Runner>;

fn contender<G: Fn(u64) -> Option<u64> + Send + Sync + 'static>(get: G) -> Get {
    Box::new(Contender(get))
}

/// The contenders, each filled with the same 100k entries.
struct Contenders {
    label: &'static str,
    gets: Vec<(&'static str, Get)>,
}

fn contenders<V, F>(label: &'static str, make: F) -> Contenders
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
    F: Fn(u64) -> V,
{
    let strata: strata::Cache<u64, V> = strata::Cache::builder("bench")
        .max_capacity(2 * ENTRIES)
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("valid config");
    for k in 0..ENTRIES {
        futures::executor::block_on(strata.insert(k, make(k))).expect("insert");
    }
    let strata = contender(move |k: u64| strata.get_local(&k).map(|_| k));

    let raw: quick_cache::sync::Cache<u64, V> = quick_cache::sync::Cache::new(2 * ENTRIES as usize);
    for k in 0..ENTRIES {
        raw.insert(k, make(k));
    }
    let raw = contender(move |k: u64| raw.get(&k).map(|_| k));

    let moka_sync: moka::sync::Cache<u64, V> = moka::sync::Cache::builder()
        .max_capacity(2 * ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    for k in 0..ENTRIES {
        moka_sync.insert(k, make(k));
    }
    moka_sync.run_pending_tasks();
    let moka_sync = contender(move |k: u64| moka_sync.get(&k).map(|_| k));

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
    let moka_future = contender(move |k: u64| futures::executor::block_on(moka_future.get(&k)).map(|_| k));

    Contenders {
        label,
        gets: vec![
            ("strata", strata),
            ("quick_cache", raw),
            ("moka_sync", moka_sync),
            ("moka_future", moka_future),
        ],
    }
}

fn group_name(label: &str, threads: usize) -> String {
    format!("l1_hit/entries=100k/zipf=1.0/values={label}/threads={threads}")
}

fn l1_hit(c: &mut Criterion, all: &[Contenders], key_sets: &[Arc<Vec<u64>>]) {
    for contenders in all {
        for threads in [1usize, 2] {
            let mut g = c.benchmark_group(group_name(contenders.label, threads));
            g.throughput(criterion::Throughput::Elements(1));
            for (name, get) in &contenders.gets {
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter_custom(|iters| run(threads, iters, key_sets, get.as_ref()))
                });
            }
            g.finish();
        }
    }
}

/// Gets per thread and contender in one round of the paired run: a few milliseconds,
/// long enough that refilling the CPU caches after the other contender's turn is a
/// small part of it.
const ROUND: u64 = 100_000;

/// Median and quartiles of `v`.
fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        v.get(((v.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
    };
    [at(0.25), at(0.5), at(0.75)]
}

/// Runs the paired rounds on `threads` threads that live for the whole run (so that
/// each stays on its core and keeps its caches): in round `r` every thread runs
/// [`ROUND`] gets of each contender, starting with contender `r mod n`, all threads
/// starting each step together. Like criterion's samples, each run of gets walks a
/// thread's keys from the start. Returns ns per get, per contender and round (the
/// slowest thread's).
fn paired_rounds(
    picked: &[&dyn Runner],
    threads: usize,
    key_sets: &[Arc<Vec<u64>>],
    rounds: usize,
) -> Vec<Vec<f64>> {
    let n = picked.len();
    let barrier = Barrier::new(threads);
    let per_thread: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = key_sets[..threads]
            .iter()
            .map(|keys| {
                let barrier = &barrier;
                s.spawn(move || {
                    // Warm every contender's hot entries first.
                    for runner in picked {
                        runner.gets(keys, ROUND);
                    }
                    let mut ns = vec![Vec::with_capacity(rounds); n];
                    for r in 0..rounds {
                        for step in 0..n {
                            let j = (step + r) % n;
                            barrier.wait();
                            let took = picked[j].gets(keys, ROUND);
                            ns[j].push(took.as_nanos() as f64 / ROUND as f64);
                        }
                    }
                    ns
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
    });
    (0..n)
        .map(|j| (0..rounds).map(|r| per_thread.iter().map(|t| t[j][r]).fold(0.0, f64::max)).collect())
        .collect()
}

/// The paired run (see the crate docs).
fn paired(all: &[Contenders], key_sets: &[Arc<Vec<u64>>], rounds: usize, filters: &[String]) {
    println!("\npaired run: {rounds} rounds of {ROUND} gets per thread and contender, order alternating");
    println!("{:<48} {:>9} {:>9} {:>26}", "group", "strata", "qc", "strata ÷ qc (p25, p75)");
    for contenders in all {
        for threads in [1usize, 2] {
            let group = group_name(contenders.label, threads);
            if !filters.is_empty() && !filters.iter().any(|f| group.contains(f.as_str())) {
                continue;
            }
            let picked: Vec<&dyn Runner> = ["strata", "quick_cache"]
                .iter()
                .filter_map(|want| contenders.gets.iter().find(|(n, _)| n == want).map(|(_, g)| g.as_ref()))
                .collect();
            let ns = paired_rounds(&picked, threads, key_sets, rounds);
            let [p25, median, p75] = quartiles((0..rounds).map(|r| ns[0][r] / ns[1][r]).collect());
            let med = |j: usize| quartiles(ns[j].clone())[1];
            println!(
                "{:<48} {:>7.1}ns {:>7.1}ns {:>12.2} ({p25:.2}, {p75:.2})",
                group.trim_start_matches("l1_hit/"),
                med(0),
                med(1),
                median
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let key_sets: Vec<_> = (0..2).map(|t| keys(42 + t)).collect();
    let all = [
        contenders("u64", |k| k),
        contenders("arc_row", |k| Arc::new(Row { id: k, plan: format!("plan-{}", k % 7), version: 1 })),
    ];
    l1_hit(&mut c, &all, &key_sets);
    c.final_summary();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` runs this binary with `--test`: criterion then runs each
    // benchmark once, and the paired run is left out.
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rounds = std::env::var("L1_HIT_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(100);
    if rounds > 0 {
        let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
        paired(&all, &key_sets, rounds, &filters);
    }
}
