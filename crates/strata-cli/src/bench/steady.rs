//! The steady window: what a fleet that has been running for a while costs, beside
//! the cold start the main table measures.
//!
//! After the cold window, each strategy replays more of the same traffic (another
//! seed, the same distributions) faster than real time, uncounted: the warm-up. It
//! drives the same code as the measured windows, only sooner (a request that finds
//! the fleet busy is dropped, which only makes the warm-up lighter). Then a second
//! window as long as the cold one, at the real rate, is measured: the steady window.
//!
//! Two things a fast replay of a minute of traffic cannot give, and a fleet that has run
//! for hours has, are added per strategy, by how long its copies live (its TTL):
//! - copies that outlive the whole run many times over (the 24 h default of the
//!   invalidated caches): every key has been read on every instance, so before the
//!   replay each instance reads every key once, through the same `read` (the fill
//!   pass, at most 2,000,000 reads: the hottest keys that fit; a Zipf tail of 10,000
//!   keys takes minutes of traffic to be read once, and its first loads were most of
//!   these caches' "steady" DB reads);
//! - copies that live at most twice the window (local-ttl's 5 s): their ages are
//!   spread evenly, so the warm-up ends with that long of traffic at the real rate (the
//!   tail; after the fast replay alone, every copy had been loaded within a second and
//!   expired at once inside the window).
//!
//! Its compulsory bound counts only what a perfect fleet-shared cache that had served
//! every key before must still load (reads after writes). Whether it is steady is
//! checked: DB reads/s in its first and last thirds agree within 10 %, or within two
//! standard deviations of their noise when the counts are small (Poisson noise, scaled
//! up where reads come in clumps: see `dispersion`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use futures::stream::{self, StreamExt};
use indicatif::ProgressBar;
use serde::Serialize;

use super::db::{Db, DbCounts};
use super::redis_nodes::{self, NodesReport};
use super::runner::{self, Outcome, RunConfig};
use super::schedule::{Schedule, ScheduleParams};
use super::strategy::{Strategy, TierCounts};
use crate::secret::SecretUrl;

/// How much faster than real time the warm-up replays its traffic by default.
pub const WARM_UP_SPEED: f64 = 8.0;

/// The same for the payment scenario: its writes run at the Strong level, where each
/// one waits for every member's acknowledgement; 8× (800 Strong writes/s at the
/// defaults, 15,200 acknowledgements/s) overloads a 2-core host, and the steady window
/// then measures the recovery from that overload instead of a fleet that has been
/// running at the real rate.
pub const PAYMENT_WARM_UP_SPEED: f64 = 2.0;

/// One measured window of a strategy, as the JSON's `cold` and `steady` objects.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Seconds measured.
    pub duration_s: f64,
    /// Database reads per second.
    pub db_reads_per_s: f64,
    /// Database reads over the window's compulsory bound.
    pub x_bound: f64,
    /// The window's compulsory DB reads.
    pub compulsory_db_reads: u64,
    /// Shared-tier (Redis, or the in-process tier and backplane) calls per request.
    pub redis_ops_per_request: f64,
    /// Reads answered by a cache (local or shared).
    pub hit_rate: f64,
    /// Reads that returned a version older than one already written.
    pub stale_reads: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Requests dropped by the runner.
    pub dropped: u64,
    /// Redis CPU seconds in the window (with Redis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_s: Option<f64>,
    /// Redis commands executed per second in the window (with Redis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_commands_per_s: Option<f64>,
    /// Write returned → every other instance dropped its copy, 99th percentile
    /// (strategies that invalidate local copies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation_lag_p99_us: Option<f64>,
    /// Steady window only: DB reads/s in its first and last thirds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thirds_db_reads_per_s: Option<(f64, f64)>,
    /// Steady window only: whether the thirds agree (see the module docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady: Option<bool>,
}

impl Window {
    /// A window from its outcome and the counters' growth over it.
    pub fn new(
        outcome: &Outcome,
        db: DbCounts,
        tiers: TierCounts,
        compulsory: u64,
        secs: f64,
        nodes: Option<&NodesReport>,
    ) -> Window {
        let all = outcome.all_reads();
        let requests = all.reads + outcome.writes;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Window {
            duration_s: secs,
            db_reads_per_s: db.reads as f64 / secs,
            x_bound: ratio(db.reads, compulsory),
            compulsory_db_reads: compulsory,
            redis_ops_per_request: ratio(tiers.remote_ops, requests),
            hit_rate: ratio(tiers.l1_hits + tiers.l2_hits, all.reads),
            stale_reads: all.stale,
            failed: outcome.errors,
            dropped: outcome.dropped,
            redis_cpu_s: nodes.map(|n| n.cpu_s_total),
            redis_commands_per_s: nodes.map(|n| n.commands_per_s),
            propagation_lag_p99_us: None,
            thirds_db_reads_per_s: None,
            steady: None,
        }
    }
}

/// The traffic after the cold window: the warm-up and the steady window.
pub struct Plan {
    /// Replayed uncounted, `speed` times faster than real time.
    pub warm_up: Schedule,
    /// How long the fast replay takes.
    warm_up_wall: Duration,
    /// Measured.
    pub steady: Schedule,
    /// Which keys a perfect fleet-shared cache holds after the warm-up (every key has
    /// been served; a write without a read after it leaves its key out).
    served: Vec<bool>,
    /// What the steady window and the tail are generated from.
    params: ScheduleParams,
    /// With events (`--join-at` and the like): a third window as long, after the
    /// steady one, that they happen in (so that they disturb neither measurement).
    pub events: Option<Schedule>,
}

/// Reads in flight at once during the fill pass.
const FILL_CONCURRENCY: usize = 64;

/// The most reads of a fill pass: beyond, it covers the hottest keys that fit (key 0
/// is the hottest), so that `--keys 1000000` does not spend minutes warming up.
const FILL_MAX_READS: u64 = 2_000_000;

/// A TTL this many times the span from the fill pass to the window's end gets the
/// pass: what it loads does not expire in the window, as in a fleet whose copies live
/// that long.
const FILL_TTL_FACTOR: u32 = 10;

impl Plan {
    /// `warm_up` seconds of traffic after `cold`, then a window as long as the cold one
    /// (and another for `events`).
    pub fn new(
        params: &ScheduleParams,
        cold: &Schedule,
        warm_up: Duration,
        speed: f64,
        events: bool,
    ) -> Result<Plan> {
        let warm = ScheduleParams {
            duration: warm_up.div_f64(speed).max(Duration::from_millis(100)),
            rate: params.rate * speed,
            seed: params.seed.wrapping_add(1),
            ..params.clone()
        };
        let steady = ScheduleParams { seed: params.seed.wrapping_add(2), ..params.clone() };
        let warm_up = Schedule::generate(&warm)?;
        let steady = Schedule::generate(&steady)?;
        let mut served = steady.key_marks(true);
        for schedule in [cold, &warm_up] {
            schedule.loads_after(&mut served);
        }
        let events = if events {
            Some(Schedule::generate(&ScheduleParams { seed: params.seed.wrapping_add(3), ..params.clone() })?)
        } else {
            None
        };
        Ok(Plan { warm_up, warm_up_wall: warm.duration, steady, served, params: params.clone(), events })
    }

    /// The real-time tail of the warm-up for copies that live `ttl` (see the module
    /// docs), or none.
    fn tail(&self, ttl: Option<Duration>) -> Result<Option<Schedule>> {
        match ttl {
            Some(ttl) if ttl <= self.params.duration * 2 => Ok(Some(Schedule::generate(&ScheduleParams {
                duration: ttl,
                seed: self.params.seed.wrapping_add(4),
                ..self.params.clone()
            })?)),
            _ => Ok(None),
        }
    }

    /// Whether copies that live `ttl` get the fill pass (see the module docs).
    fn fills(&self, ttl: Option<Duration>) -> bool {
        let span = self.warm_up_wall + self.params.duration;
        ttl.is_some_and(|ttl| ttl > span * FILL_TTL_FACTOR)
    }

    /// The steady window's compulsory DB reads after `tail`.
    fn compulsory(&self, tail: Option<&Schedule>) -> u64 {
        let mut served = self.served.clone();
        if let Some(tail) = tail {
            tail.loads_after(&mut served);
        }
        self.steady.loads_after(&mut served)
    }
}

/// Reads every key on every instance once (instance by instance: the first loads, the
/// others find what a shared tier holds), `FILL_CONCURRENCY` at a time, at most
/// `FILL_MAX_READS` in all. A read that fails only leaves its copy out; a pass where
/// every read failed is an error.
async fn fill(strategy: &Arc<dyn Strategy>, keys: u64, instances: u32) -> Result<()> {
    let keys = keys.min(FILL_MAX_READS / u64::from(instances.max(1)));
    let reads = (0..instances as usize).flat_map(|i| (0..keys).map(move |k| (i, k)));
    let total = keys.saturating_mul(u64::from(instances));
    let failed = stream::iter(reads)
        .map(|(i, k)| {
            let strategy = strategy.clone();
            async move { strategy.read(i, k).await.is_err() }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await as u64;
    if total > 0 && failed == total {
        bail!("every read of the fill pass failed");
    }
    Ok(())
}

/// Runs the warm-up and measures the steady window of `strategy`, built and already
/// run through the cold window (without `config`'s events).
pub async fn measure(
    strategy: &Arc<dyn Strategy>,
    plan: &Plan,
    config: &RunConfig,
    db: &Arc<Db>,
    urls: &[SecretUrl],
) -> Result<(Window, Outcome)> {
    let quiet = ProgressBar::hidden();
    let no_events = RunConfig { events: Vec::new(), ..config.clone() };
    if plan.fills(strategy.ttl()) {
        fill(strategy, plan.params.keys, plan.params.instances).await?;
    }
    runner::run(strategy.clone(), &plan.warm_up, &no_events, &quiet, db).await?;
    let tail = plan.tail(strategy.ttl())?;
    if let Some(tail) = &tail {
        runner::run(strategy.clone(), tail, &no_events, &quiet, db).await?;
    }
    let _ = strategy.propagation(); // the warm-up's
    let db_before = db.counts();
    let tiers_before = strategy.tier_counts();
    let nodes_before = redis_nodes::sample(urls).await?;
    let outcome = runner::run(strategy.clone(), &plan.steady, &no_events, &quiet, db).await?;
    let (db_after, tiers_after) = (db.counts(), strategy.tier_counts());
    let nodes_after = redis_nodes::sample(urls).await?;
    let secs = plan.steady.requests.last().map_or(1.0, |r| r.at.as_secs_f64()).max(1.0);
    let nodes = (!urls.is_empty()).then(|| NodesReport::between(&nodes_before, &nodes_after, secs));
    let db_delta = DbCounts {
        reads: db_after.reads.saturating_sub(db_before.reads),
        writes: db_after.writes.saturating_sub(db_before.writes),
        hottest_reads: db_after.hottest_reads.saturating_sub(db_before.hottest_reads),
    };
    let tiers_delta = TierCounts {
        l1_hits: tiers_after.l1_hits.saturating_sub(tiers_before.l1_hits),
        l2_hits: tiers_after.l2_hits.saturating_sub(tiers_before.l2_hits),
        remote_ops: tiers_after.remote_ops.saturating_sub(tiers_before.remote_ops),
    };
    let compulsory = plan.compulsory(tail.as_ref());
    let mut window = Window::new(&outcome, db_delta, tiers_delta, compulsory, secs, nodes.as_ref());
    window.propagation_lag_p99_us = strategy.propagation().map(|l| l.p99_us);
    // Whole seconds only: the series ends with the part of a second the run took after
    // its last whole one, whose count would pull the last third down.
    let whole = &outcome.db_reads_per_second[..outcome.db_reads_per_second.len().min(secs as usize)];
    let (first, last) = thirds(whole);
    window.thirds_db_reads_per_s = Some((first, last));
    let noise = dispersion(whole);
    window.steady = Some(agree(first, last, secs / 3.0, noise));
    Ok((window, outcome))
}

/// Runs the events window of `plan` (if it has one), with `config`'s events.
pub async fn events(
    strategy: &Arc<dyn Strategy>,
    plan: &Plan,
    config: &RunConfig,
    db: &Arc<Db>,
) -> Result<Option<Outcome>> {
    let Some(schedule) = &plan.events else { return Ok(None) };
    runner::run(strategy.clone(), schedule, config, &ProgressBar::hidden(), db).await.map(Some)
}

/// Mean DB reads/s of the first and of the last third of a per-second series.
fn thirds(per_second: &[u64]) -> (f64, f64) {
    let n = per_second.len();
    if n < 3 {
        let mean = per_second.iter().sum::<u64>() as f64 / n.max(1) as f64;
        return (mean, mean);
    }
    let third = n / 3;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
    (mean(&per_second[..third]), mean(&per_second[n - third..]))
}

/// Two rates over `secs` each agree: within 10 %, or within two standard deviations of
/// their counts' noise: Poisson noise scaled by `dispersion` (see [`dispersion`]).
fn agree(a: f64, b: f64, secs: f64, dispersion: f64) -> bool {
    let secs = secs.max(1.0);
    let noise = 2.0 * (dispersion.max(1.0) * (a + b) * secs).sqrt() / secs;
    (a - b).abs() <= (0.1 * a.max(b)).max(noise)
}

/// How much noisier than Poisson a per-second series is: its variance over its mean,
/// at least 1, the variance taken from consecutive differences (half their variance)
/// so that a trend does not count as noise. DB reads come in clumps where one
/// event causes many (a write makes every instance that held the key reload it: ~20
/// reads from one event at the defaults), and such counts vary clump-size times more
/// than independent ones.
fn dispersion(per_second: &[u64]) -> f64 {
    if per_second.len() < 3 {
        return 1.0;
    }
    let mean = per_second.iter().sum::<u64>() as f64 / per_second.len() as f64;
    if mean <= 0.0 {
        return 1.0;
    }
    let diffs: Vec<f64> = per_second.windows(2).map(|w| w[1] as f64 - w[0] as f64).collect();
    let slope = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let variance = diffs.iter().map(|d| (d - slope).powi(2)).sum::<f64>() / diffs.len() as f64 / 2.0;
    (variance / mean).max(1.0)
}

/// The steady window's table: one line per strategy, the cold figures beside.
pub fn table(rows: &[(&str, &Window, &Window)], warm_up: Duration, speed: f64) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "# steady window: after {:.0} s of the same traffic replayed {speed}x faster, uncounted \
         (the table above is the cold start); caches whose copies outlive the run read every key \
         on every instance first, those whose copies live at most twice the window end the \
         warm-up with that long at the real rate\n",
        warm_up.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<13} {:>12} {:>8} {:>14} {:>7} {:>6} {:>7} {:>12} {:>9} {:>12}",
        "strategy",
        "DB reads/s",
        "x bound",
        "ops/request",
        "hit %",
        "stale",
        "failed",
        "thirds /s",
        "steady",
        "cold DB r/s"
    );
    for (name, cold, steady) in rows {
        let (a, b) = steady.thirds_db_reads_per_s.unwrap_or((0.0, 0.0));
        let _ = writeln!(
            out,
            "{:<13} {:>12.1} {:>8.3} {:>14.4} {:>7.2} {:>6} {:>7} {:>12} {:>9} {:>12.1}",
            name,
            steady.db_reads_per_s,
            steady.x_bound,
            steady.redis_ops_per_request,
            steady.hit_rate * 100.0,
            steady.stale_reads,
            steady.failed,
            format!("{a:.1}/{b:.1}"),
            if steady.steady == Some(true) { "yes" } else { "DRIFTING" },
            cold.db_reads_per_s,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirds_and_agreement() {
        assert_eq!(thirds(&[10, 10, 10, 20, 20, 20]), (10.0, 20.0));
        assert!(agree(100.0, 105.0, 5.0, 1.0));
        assert!(!agree(100.0, 150.0, 5.0, 1.0));
        assert!(agree(4.0, 6.0, 5.0, 1.0), "small counts: within their noise");
        assert!(!agree(80.0, 60.0, 5.0, 1.0), "as Poisson counts, they differ");
        assert!(agree(80.0, 60.0, 5.0, 20.0), "in clumps of 20, they do not");
    }

    #[test]
    fn the_warm_up_a_cache_gets_follows_its_ttl() {
        use super::super::scenario::Scenario;
        let params = ScheduleParams {
            hot_key_share: 0.0,
            scenario: Scenario::Billsetting,
            duration: Duration::from_secs(15),
            rate: 200.0,
            keys: 1000,
            zipf: 1.0,
            write_ratio: 0.0,
            instances: 4,
            seed: 7,
        };
        let cold = Schedule::generate(&params).unwrap();
        let plan = Plan::new(&params, &cold, Duration::from_secs(30), 8.0, false).unwrap();
        let day = Some(Duration::from_secs(24 * 3600));
        let (five, minute) = (Some(Duration::from_secs(5)), Some(Duration::from_secs(60)));
        assert!(plan.fills(day) && !plan.fills(five) && !plan.fills(minute) && !plan.fills(None));
        assert_eq!(plan.tail(five).unwrap().map(|t| t.requests.last().unwrap().at.as_secs()), Some(4));
        assert!(plan.tail(day).unwrap().is_none() && plan.tail(minute).unwrap().is_none());
        assert!(plan.tail(None).unwrap().is_none());
        // Every key was served before: without writes nothing is compulsory.
        assert_eq!(plan.compulsory(None), 0);
        assert_eq!(plan.compulsory(plan.tail(five).unwrap().as_ref()), 0);
    }

    #[test]
    fn dispersion_of_clumped_and_trending_series() {
        assert_eq!(dispersion(&[100, 100, 100, 100]), 1.0, "never below Poisson");
        // Every other second a clump of 40: differences of ±40 about a mean of 20.
        let clumped = [0, 40, 0, 40, 0, 40, 0, 40];
        assert!(dispersion(&clumped) > 30.0, "{}", dispersion(&clumped));
        // A steady trend is not noise.
        assert_eq!(dispersion(&[10, 20, 30, 40, 50, 60]), 1.0);
    }
}
