//! The steady window: what a fleet that has been running for a while costs, beside
//! the cold start the main table measures.
//!
//! After the cold window, each strategy replays more of the same traffic (another
//! seed, the same distributions) faster than real time, uncounted: the warm-up. It
//! drives the same code as the measured windows, only sooner (a request that finds
//! the fleet busy is dropped, which only makes the warm-up lighter). Then a second
//! window as long as the cold one, at the real rate, is measured: the steady window.
//! Its compulsory bound counts only what a perfect fleet-shared cache that had served
//! everything before must still load (writes followed by reads, keys never read
//! before). Whether it is steady is checked: DB reads/s in its first and last thirds
//! agree within 10 %, or within two standard deviations of their Poisson noise when
//! the counts are small.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;

use super::db::{Db, DbCounts};
use super::redis_nodes::{self, NodesReport};
use super::runner::{self, Outcome, RunConfig};
use super::schedule::{Op, Schedule, ScheduleParams};
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
    /// Measured.
    pub steady: Schedule,
    /// The steady window's compulsory DB reads, given everything before it.
    pub compulsory: u64,
    /// With events (`--join-at` and the like): a third window as long, after the
    /// steady one, that they happen in (so that they disturb neither measurement).
    pub events: Option<Schedule>,
}

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
        let compulsory = compulsory_after(&[cold, &warm_up], &steady);
        let events = if events {
            Some(Schedule::generate(&ScheduleParams { seed: params.seed.wrapping_add(3), ..params.clone() })?)
        } else {
            None
        };
        Ok(Plan { warm_up, steady, compulsory, events })
    }
}

/// The compulsory DB reads of `this` for a cache that served `before` first.
fn compulsory_after(before: &[&Schedule], this: &Schedule) -> u64 {
    let mut cached = vec![false; usize::try_from(this.keys).unwrap_or(usize::MAX).min(1 << 32)];
    let mut loads = 0u64;
    for (i, schedule) in before.iter().copied().chain(std::iter::once(this)).enumerate() {
        let counted = i == before.len();
        for r in &schedule.requests {
            let Some(slot) = cached.get_mut(r.key as usize) else { continue };
            let load = match r.op {
                Op::Read => !std::mem::replace(slot, true),
                Op::Write { consumer, .. } => {
                    *slot = consumer.is_some();
                    consumer.is_some()
                }
            };
            if load && counted {
                loads += 1;
            }
        }
    }
    loads
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
    runner::run(strategy.clone(), &plan.warm_up, &no_events, &quiet, db).await?;
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
    let mut window = Window::new(&outcome, db_delta, tiers_delta, plan.compulsory, secs, nodes.as_ref());
    window.propagation_lag_p99_us = strategy.propagation().map(|l| l.p99_us);
    let (first, last) = thirds(&outcome.db_reads_per_second);
    window.thirds_db_reads_per_s = Some((first, last));
    window.steady = Some(agree(first, last, secs / 3.0));
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
/// the Poisson noise of their counts.
fn agree(a: f64, b: f64, secs: f64) -> bool {
    let noise = 2.0 * ((a + b) * secs.max(1.0)).sqrt() / secs.max(1.0);
    (a - b).abs() <= (0.1 * a.max(b)).max(noise)
}

/// The steady window's table: one line per strategy, the cold figures beside.
pub fn table(rows: &[(&str, &Window, &Window)], warm_up: Duration, speed: f64) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "# steady window: after {:.0} s of the same traffic replayed {speed}x faster, uncounted \
         (the table above is the cold start)\n",
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
        assert!(agree(100.0, 105.0, 5.0));
        assert!(!agree(100.0, 150.0, 5.0));
        assert!(agree(4.0, 6.0, 5.0), "small counts: within their noise");
    }
}
