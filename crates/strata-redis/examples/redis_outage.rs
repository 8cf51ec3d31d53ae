//! `invalidate` latency during a real Redis outage: a fleet of three instances, each with
//! its own `RedisTier` and `RedisStreamBackplane` on one `redis-server` that this example
//! starts on a random loopback port, issues invalidations at a steady rate (200/s by
//! default) while the server is paused with SIGSTOP (a hung server: every call waits for
//! its timeout) or, with `--fault kill`, killed with SIGKILL and restarted on the same
//! port at the end (connections refused). Prints the latency of the calls issued before
//! and during the outage, how many callers were waiting at once, the retry buffer's peak
//! size (largest of the instances), and how long the buffers took to drain once Redis was
//! back.
//!
//! Run: `cargo run -p strata-redis --example redis_outage -- --seconds 60`
//! (`--seconds N`: the outage, default 60; `--rate N`: invalidations per second, default
//! 200; `--fault pause|kill`, default pause). Needs `redis-server` on the PATH.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use strata::Cache;
use strata_redis::{RedisStreamBackplane, RedisTier};
use strata_testkit::{CallLog, RedisServer};

/// Instances in the fleet.
const INSTANCES: usize = 3;
/// Healthy traffic before the outage, for comparison.
const WARM_UP: Duration = Duration::from_secs(2);
/// How long to wait for the calls still running after the outage, at most.
const DRAIN_AT_MOST: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Pause,
    Kill,
}

struct Args {
    seconds: u64,
    rate: u64,
    fault: Fault,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { seconds: 60, rate: 200, fault: Fault::Pause };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--seconds" | "--rate" => {
                let v = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&v: &u64| v > 0)
                    .ok_or_else(|| format!("{flag} wants a positive whole number"))?;
                if flag == "--seconds" {
                    args.seconds = v;
                } else {
                    args.rate = v;
                }
            }
            "--fault" => {
                args.fault = match it.next().as_deref() {
                    Some("pause") => Fault::Pause,
                    Some("kill") => Fault::Kill,
                    _ => return Err("--fault wants pause or kill".into()),
                }
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; use --seconds N, --rate N, --fault pause|kill"
                ));
            }
        }
    }
    Ok(args)
}

async fn instance(url: &str) -> Result<Cache<u64, String>, Box<dyn std::error::Error>> {
    let tier = RedisTier::builder(url).prefix("outage").build().await?;
    let backplane = RedisStreamBackplane::builder(url).prefix("outage").build().await?;
    let cache = Cache::builder("outage").tier(Arc::new(tier)).backplane(Arc::new(backplane)).build()?;
    cache.ready().await;
    Ok(cache)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut server = RedisServer::start();
    let url = server.url();
    let mut fleet = Vec::new();
    for _ in 0..INSTANCES {
        fleet.push(instance(&url).await?);
    }

    // Samples the retry buffers and the callers waiting.
    let waiting = Arc::new(AtomicUsize::new(0));
    let peak_waiting = Arc::new(AtomicUsize::new(0));
    let peak_pending = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (fleet, waiting, peak_waiting, peak_pending, sampling) =
            (fleet.clone(), waiting.clone(), peak_waiting.clone(), peak_pending.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let pending = fleet.iter().map(Cache::pending_invalidations).max().unwrap_or(0);
                peak_pending.fetch_max(pending, Ordering::Relaxed);
                peak_waiting.fetch_max(waiting.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let healthy = Arc::new(CallLog::default());
    let down = Arc::new(CallLog::default());
    let outage_len = Duration::from_secs(args.seconds);
    println!(
        "{INSTANCES} instances on redis-server {} (RedisTier + RedisStreamBackplane), {} invalidations/s: \
         {WARM_UP:?} healthy, then {outage_len:?} with the server {}",
        server.addr(),
        args.rate,
        if args.fault == Fault::Pause { "paused (SIGSTOP)" } else { "killed (SIGKILL)" }
    );
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut outage_started = false;
    let mut calls = Vec::new();
    for key in 0u64.. {
        ticker.tick().await;
        let elapsed = start.elapsed();
        if elapsed >= WARM_UP + outage_len {
            break;
        }
        let phase = if elapsed < WARM_UP {
            healthy.clone()
        } else {
            if !outage_started {
                match args.fault {
                    Fault::Pause => server.pause()?,
                    Fault::Kill => server.kill(),
                }
                outage_started = true;
            }
            down.clone()
        };
        phase.issue();
        let cache = fleet[key as usize % INSTANCES].clone();
        let waiting = waiting.clone();
        calls.push(tokio::spawn(async move {
            waiting.fetch_add(1, Ordering::Relaxed);
            let began = Instant::now();
            let res = cache.invalidate(&key).await;
            phase.record(began.elapsed(), res.is_ok());
            waiting.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    let returned_during_outage = down.returned();
    let issued_during_outage = down.issued();
    let waiting_at_end = waiting.load(Ordering::Relaxed);
    let peak_during = peak_pending.load(Ordering::Relaxed);
    match args.fault {
        Fault::Pause => server.resume()?,
        Fault::Kill => server.restart(),
    }
    let resumed = Instant::now();
    let _ = tokio::time::timeout(DRAIN_AT_MOST, futures::future::join_all(calls)).await;
    let calls_done = resumed.elapsed();
    while fleet.iter().any(|c| c.pending_invalidations() > 0) && resumed.elapsed() < DRAIN_AT_MOST {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = resumed.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;

    println!();
    println!("{}", healthy.summary("healthy"));
    println!("{}", down.summary("outage"));
    println!(
        "during the outage: {returned_during_outage} of {issued_during_outage} calls returned before it ended; \
         {waiting_at_end} callers still waiting at its end, {} at the peak",
        peak_waiting.load(Ordering::Relaxed)
    );
    println!(
        "retry buffer: peak {peak_during} invalidations during the outage, {} overall (largest of the instances)",
        peak_pending.load(Ordering::Relaxed)
    );
    println!(
        "after Redis came back: every call returned within {:.2} s, every buffer drained within {:.2} s{}",
        calls_done.as_secs_f64(),
        drained.as_secs_f64(),
        if fleet.iter().any(|c| c.pending_invalidations() > 0) { " (NOT drained)" } else { "" }
    );
    let s = fleet.iter().map(Cache::stats).fold((0, 0, 0, 0, 0), |acc, s| {
        (
            acc.0 + s.invalidations_buffered,
            acc.1 + s.invalidations_sent,
            acc.2 + s.repairs_flushed,
            acc.3 + s.pending_collapsed,
            acc.4 + s.members_silent,
        )
    });
    println!(
        "fleet totals: {} buffered, {} messages sent, {} buffer collapses into a namespace invalidation, \
         {} L1 flushes by gap repair ({} of them for members found silent)",
        s.0, s.1, s.3, s.2, s.4
    );
    for c in &fleet {
        c.shutdown().await;
    }
    Ok(())
}
