//! `invalidate` latency while the backplane is unavailable: a fleet of three instances
//! over the in-process tier and backplane issues invalidations at a steady rate (200/s
//! by default) while every backplane publish hangs for a while, as against a paused or
//! unreachable Redis (each publish then waits for the backplane timeout), or with
//! `--refuse` fails at once, as against a Redis that refuses connections. Prints the
//! latency of the calls issued before and during the outage, how many callers were
//! waiting at once, the retry buffer's peak size, and how long the buffers took to
//! drain once the backplane was back.
//!
//! Run: `cargo run -p strata --example outage_invalidate -- --seconds 10`
//! (`--seconds N`: the outage, default 60; `--rate N`: invalidations per second, default
//! 200; `--refuse`: publishes fail at once instead of hanging)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use strata::backplane::{Backplane, Message, OriginId, Subscription};
use strata::{Cache, InProcessBackplane, InProcessTier};
use tokio::sync::Notify;

/// Instances in the fleet.
const INSTANCES: usize = 3;
/// Healthy traffic before the outage, for comparison.
const WARM_UP: Duration = Duration::from_secs(2);
/// How long to wait for the calls still running after the outage, at most.
const DRAIN_AT_MOST: Duration = Duration::from_secs(120);

/// Makes every connection's publishes hang while paused.
#[derive(Default)]
struct Outage {
    paused: AtomicBool,
    resumed: Notify,
    /// Fail at once while paused instead of hanging.
    refuse: bool,
}

impl Outage {
    fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.resumed.notify_waiters();
        }
    }

    async fn wait_until_resumed(&self) {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.paused.load(Ordering::SeqCst) {
                return;
            }
            resumed.await;
        }
    }
}

/// One instance's connection, whose publishes hang during the outage.
struct PausableBackplane {
    inner: InProcessBackplane,
    outage: Arc<Outage>,
}

#[async_trait]
impl Backplane for PausableBackplane {
    fn name(&self) -> &str {
        "pausable-in-process"
    }

    async fn publish(&self, message: &Message) -> strata::Result<()> {
        if self.outage.refuse && self.outage.paused.load(Ordering::SeqCst) {
            return Err(strata::Error::new(strata::ErrorKind::Backplane, "connection refused (simulated)"));
        }
        self.outage.wait_until_resumed().await;
        self.inner.publish(message).await
    }

    async fn subscribe(&self) -> strata::Result<Subscription> {
        self.inner.subscribe().await
    }

    async fn replay(&self, origin: OriginId, from: u64, to: u64) -> strata::Result<Option<Vec<Message>>> {
        self.inner.replay(origin, from, to).await
    }
}

struct Args {
    seconds: u64,
    rate: u64,
    refuse: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { seconds: 60, rate: 200, refuse: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{name} wants a positive whole number"))
        };
        match flag.as_str() {
            "--seconds" => args.seconds = value("--seconds")?,
            "--rate" => args.rate = value("--rate")?,
            "--refuse" => args.refuse = true,
            other => return Err(format!("unknown argument {other}; use --seconds N, --rate N, --refuse")),
        }
    }
    Ok(args)
}

/// What one phase's calls did.
#[derive(Default)]
struct Phase {
    issued: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    failed: AtomicU64,
}

impl Phase {
    fn report(&self, name: &str) {
        let mut l = self.latencies.lock().clone();
        l.sort_unstable();
        let at = |q: f64| l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1))).copied();
        let ms =
            |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
        println!(
            "{name:<9} {:>6} calls ({:>6} returned an error)   p50 {:>10}   p99 {:>10}   max {:>10}",
            l.len(),
            self.failed.load(Ordering::Relaxed),
            ms(at(0.50)),
            ms(at(0.99)),
            ms(l.last().copied()),
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let tier = InProcessTier::new();
    let hub = InProcessBackplane::new();
    let outage = Arc::new(Outage { refuse: args.refuse, ..Outage::default() });
    let mut fleet = Vec::new();
    for _ in 0..INSTANCES {
        let backplane = PausableBackplane { inner: hub.connect(), outage: outage.clone() };
        let cache: Cache<u64, String> =
            Cache::builder("outage").tier(Arc::new(tier.clone())).backplane(Arc::new(backplane)).build()?;
        cache.ready().await;
        fleet.push(cache);
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

    let healthy = Arc::new(Phase::default());
    let down = Arc::new(Phase::default());
    let outage_len = Duration::from_secs(args.seconds);
    println!(
        "{INSTANCES} instances, {} invalidations/s: {:?} healthy, then {outage_len:?} with every publish {}",
        args.rate,
        WARM_UP,
        if args.refuse { "refused" } else { "hanging" }
    );
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut outage_started = None;
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
            if outage_started.is_none() {
                outage.set(true);
                outage_started = Some(Instant::now());
            }
            down.clone()
        };
        phase.issued.fetch_add(1, Ordering::Relaxed);
        let cache = fleet[key as usize % INSTANCES].clone();
        let waiting = waiting.clone();
        calls.push(tokio::spawn(async move {
            waiting.fetch_add(1, Ordering::Relaxed);
            let began = Instant::now();
            let res = cache.invalidate(&key).await;
            phase.latencies.lock().push(began.elapsed());
            if res.is_err() {
                phase.failed.fetch_add(1, Ordering::Relaxed);
            }
            waiting.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    let returned_during_outage = down.latencies.lock().len();
    let issued_during_outage = down.issued.load(Ordering::Relaxed);
    let waiting_at_end = waiting.load(Ordering::Relaxed);
    outage.set(false);
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
    healthy.report("healthy");
    down.report("outage");
    println!(
        "during the outage: {returned_during_outage} of {issued_during_outage} calls returned before it ended; \
         {waiting_at_end} callers still waiting at its end, {} at the peak",
        peak_waiting.load(Ordering::Relaxed)
    );
    println!(
        "retry buffer: peak {} invalidations (largest of the instances)",
        peak_pending.load(Ordering::Relaxed)
    );
    println!(
        "after the backplane came back: every call returned within {:.2} s, every buffer drained within {:.2} s",
        calls_done.as_secs_f64(),
        drained.as_secs_f64()
    );
    let s = fleet.iter().map(Cache::stats).fold((0, 0, 0), |acc, s| {
        (acc.0 + s.invalidations_buffered, acc.1 + s.invalidations_sent, acc.2 + s.repairs_flushed)
    });
    println!("fleet totals: {} buffered, {} messages sent, {} L1 flushes by gap repair", s.0, s.1, s.2);
    for c in &fleet {
        c.shutdown().await;
    }
    Ok(())
}
