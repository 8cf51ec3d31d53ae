//! `hit_ratio`: replays key-only cache traces through strata's L1 and prints its hit
//! ratio beside the engine underneath (an unsharded `quick_cache`) and moka, at several
//! capacities.
//!
//! Run: `cargo run --release -p strata --example hit_ratio` (about two minutes on two
//! cores). Options: `--traces DIR` (default `../shared/traces` beside the workspace),
//! `--max-requests N` (default 2 000 000: longer traces are cut there, and the table
//! says so), `--only NAME` (repeatable: run only the traces whose name contains NAME).
//! Decompression shells out to `zstd`, `gzip` and `xz`.
//!
//! Each trace is a sequence of keys, each request one entry of weight 1 (the traces'
//! README). Every contender starts empty and sees every request:
//!
//! * `quick_cache`: `quick_cache::unsync::Cache::new(capacity)`, one shard; `get`, and
//!   `insert` on a miss. The reference: strata's L1 is this engine.
//! * `qc sharded`: `quick_cache::sync::Cache::new(capacity)`, sharded by the rule
//!   strata's L1 follows (four shards per core, fewer where a shard would hold under
//!   32 entries), so that a gap to the unsharded engine that sharding alone explains
//!   shows as such. Its keys map to shards through another hash than strata's, so
//!   where the working set just fits (`loop` at 1,024) their imbalances differ.
//! * `moka`: `moka::sync::Cache::new(capacity)`; `get`, and `insert` on a miss.
//! * `get_or_load`: an embedded `strata::Cache` (no L2, no backplane, a TTL no request
//!   outlives) of `max_capacity(capacity)`; `get_or_load`, a hit being a call that did
//!   not run its loader.
//! * `insert`: the same cache without a loader: `get`, and `Cache::insert` on a miss,
//!   the path an application that fills the cache itself (or a write-through) takes.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// How a trace file is encoded (see the traces' README).
#[derive(Clone, Copy)]
enum Format {
    /// zstd text, `start count _ _` per line, expanded to `count` keys.
    Arc,
    /// gzip text, one key per line; `*` lines are markers.
    Lirs,
    /// xz, big-endian i32 keys.
    Cache2k,
    /// gzip, big-endian i64 keys.
    Corda,
}

/// The traces replayed and the capacities of each: the ARC and LIRS papers' and
/// Caffeine's simulator's usual sizes, around each trace's working set.
const TRACES: &[(&str, Format, &[u64])] = &[
    ("arc/OLTP.lis.zst", Format::Arc, &[250, 500, 1_000, 2_000, 4_000]),
    ("arc/P3.lis.zst", Format::Arc, &[1_000, 10_000, 50_000]),
    ("lirs/sprite.trace.gz", Format::Lirs, &[100, 128, 500, 1_000]),
    ("lirs/multi2.trace.gz", Format::Lirs, &[100, 500, 1_000, 2_000]),
    ("lirs/gli.trace.gz", Format::Lirs, &[250, 1_000, 2_000]),
    ("lirs/ps.trace.gz", Format::Lirs, &[100, 500, 1_000]),
    ("lirs/cs.trace.gz", Format::Lirs, &[100, 400, 1_000]),
    ("lirs/loop.trace.gz", Format::Lirs, &[256, 512, 1_024]),
    ("lirs/2_pools.trace.gz", Format::Lirs, &[500, 1_000, 2_000]),
    ("cache2k/web07.trace.xz", Format::Cache2k, &[500, 2_000, 8_000]),
    ("cache2k/web12.trace.xz", Format::Cache2k, &[500, 2_000, 8_000]),
    ("cache2k/orm-busy.trace.xz", Format::Cache2k, &[1_000, 5_000, 20_000]),
    ("corda/trace_vaultservice.gz", Format::Corda, &[500, 5_000, 50_000]),
];

struct Args {
    traces: PathBuf,
    max_requests: usize,
    only: Vec<String>,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        traces: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces"),
        max_requests: 2_000_000,
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--traces" => a.traces = PathBuf::from(value()?),
            "--max-requests" => a.max_requests = value()?.parse()?,
            "--only" => a.only.push(value()?),
            "-h" | "--help" => {
                println!("usage: hit_ratio [--traces DIR] [--max-requests N] [--only NAME]...");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// The first `max` keys of `path` (and whether there were more).
fn read_trace(path: &Path, format: Format, max: usize) -> Result<(Vec<u64>, bool), Error> {
    let tool = match format {
        Format::Arc => "zstd",
        Format::Lirs | Format::Corda => "gzip",
        Format::Cache2k => "xz",
    };
    let mut child = Command::new(tool).arg("-dc").arg(path).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = BufReader::with_capacity(1 << 20, stdout);
    let mut keys = Vec::new();
    let mut more = false;
    match format {
        Format::Arc | Format::Lirs => {
            let mut line = String::new();
            'lines: while reader.read_line(&mut line)? > 0 {
                let mut fields = line.split_whitespace();
                match (format, fields.next()) {
                    (_, None) | (Format::Lirs, Some("*")) => {}
                    (Format::Lirs, Some(k)) => keys.push(k.parse()?),
                    (_, Some(start)) => {
                        let start: u64 = start.parse()?;
                        let count: u64 = fields.next().ok_or("ARC line without a count")?.parse()?;
                        for k in start..start + count {
                            if keys.len() == max {
                                more = true;
                                break 'lines;
                            }
                            keys.push(k);
                        }
                    }
                }
                if keys.len() > max {
                    keys.truncate(max);
                    more = true;
                    break;
                }
                line.clear();
            }
        }
        Format::Cache2k | Format::Corda => {
            let width = if matches!(format, Format::Cache2k) { 4 } else { 8 };
            let mut buf = [0u8; 8];
            loop {
                match reader.read_exact(&mut buf[..width]) {
                    Ok(()) if keys.len() == max => {
                        more = true;
                        break;
                    }
                    Ok(()) if width == 4 => {
                        keys.push(i64::from(i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])) as u64)
                    }
                    Ok(()) => keys.push(u64::from_be_bytes(buf)),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    drop(reader);
    if more {
        // Cut short: the decompressor may be blocked on a full pipe.
        let _ = child.kill();
    }
    let status = child.wait()?;
    if !more && !status.success() {
        return Err(format!("{tool} -dc {} failed: {status}", path.display()).into());
    }
    Ok((keys, more))
}

/// Replays `keys`: `hit(k)` answers from the cache, and fills it on a miss.
fn replay(keys: &[u64], mut hit: impl FnMut(u64) -> bool) -> u64 {
    keys.iter().filter(|&&k| hit(k)).count() as u64
}

fn quick_cache_hits(keys: &[u64], capacity: u64) -> u64 {
    let mut cache = quick_cache::unsync::Cache::<u64, u64>::new(capacity as usize);
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, k);
        }
        hit
    })
}

fn quick_cache_sharded_hits(keys: &[u64], capacity: u64) -> u64 {
    let cache = quick_cache::sync::Cache::<u64, u64>::new(capacity as usize);
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, k);
        }
        hit
    })
}

fn moka_hits(keys: &[u64], capacity: u64) -> u64 {
    let cache = moka::sync::Cache::<u64, u64>::new(capacity);
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, k);
        }
        hit
    })
}

fn strata_cache(capacity: u64) -> Result<strata::Cache<u64, u64>, Error> {
    Ok(strata::Cache::builder("hit_ratio")
        .max_capacity(capacity)
        .ttl(Duration::from_secs(30 * 86_400))
        .build()?)
}

async fn strata_get_or_load_hits(keys: &[u64], capacity: u64) -> Result<u64, Error> {
    let cache = strata_cache(capacity)?;
    cache.ready().await;
    let loads = Arc::new(AtomicU64::new(0));
    for &k in keys {
        let loads = loads.clone();
        cache
            .get_or_load(&k, move || async move {
                loads.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Infallible>(Some(k))
            })
            .await?;
    }
    cache.shutdown().await;
    Ok(keys.len() as u64 - loads.load(Ordering::Relaxed))
}

async fn strata_insert_hits(keys: &[u64], capacity: u64) -> Result<u64, Error> {
    let cache = strata_cache(capacity)?;
    cache.ready().await;
    let mut hits = 0;
    for &k in keys {
        if cache.get(&k).await?.is_some() {
            hits += 1;
        } else {
            cache.insert(k, k).await?;
        }
    }
    cache.shutdown().await;
    Ok(hits)
}

fn pct(hits: u64, requests: usize) -> f64 {
    100.0 * hits as f64 / requests.max(1) as f64
}

fn main() -> Result<(), Error> {
    let mut args = args()?;
    if let Ok(dir) = args.traces.canonicalize() {
        args.traces = dir;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "hit ratio (%), key-only traces from {}, at most {} requests per trace; {cores} cores",
        args.traces.display(),
        args.max_requests
    );
    println!();
    println!(
        "| trace | requests | capacity | quick_cache | qc sharded | moka | strata get_or_load | strata insert | get_or_load − qc | insert − qc |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // The largest gaps of get_or_load and insert to quick_cache, and between the two.
    let mut worst = [0.0f64; 3];
    for &(file, format, sizes) in TRACES {
        if !args.only.is_empty() && !args.only.iter().any(|o| file.contains(o.as_str())) {
            continue;
        }
        let path = args.traces.join(file);
        let (keys, cut) = read_trace(&path, format, args.max_requests)?;
        let name = file.split('.').next().unwrap_or(file);
        let requests = if cut { format!("{} (cut)", keys.len()) } else { keys.len().to_string() };
        for &capacity in sizes {
            let qc = pct(quick_cache_hits(&keys, capacity), keys.len());
            let sharded = pct(quick_cache_sharded_hits(&keys, capacity), keys.len());
            let moka = pct(moka_hits(&keys, capacity), keys.len());
            let gol = pct(rt.block_on(strata_get_or_load_hits(&keys, capacity))?, keys.len());
            let ins = pct(rt.block_on(strata_insert_hits(&keys, capacity))?, keys.len());
            for (w, gap) in worst.iter_mut().zip([gol - qc, ins - qc, ins - gol]) {
                *w = w.max(gap.abs());
            }
            println!(
                "| {name} | {requests} | {capacity} | {qc:.2} | {sharded:.2} | {moka:.2} | {gol:.2} | {ins:.2} | {:+.2} | {:+.2} |",
                gol - qc,
                ins - qc
            );
        }
    }
    println!();
    println!(
        "largest gap to quick_cache: get_or_load {:.2} points, insert {:.2} points; between the two: {:.2} points ({:.0} s)",
        worst[0],
        worst[1],
        worst[2],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
