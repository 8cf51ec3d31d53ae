//! The results: one [`StrategyReport`] per strategy inside a [`BenchReport`], printed
//! as an aligned table and serialized as the `--json` document.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::db::DbCounts;
use super::events::{EventKind, EventReport};
use super::lag::LagSummary;
use super::redis_nodes::NodesReport;
use super::runner::Outcome;
use super::schedule::{Schedule, ScheduleParams};
use super::steady::Window;
use super::strategy::{Strategy, TierCounts};
use super::timeline::Timeline;
use crate::secret::{self, SecretUrl};

/// The whole run: parameters, the schedule's totals and one entry per strategy.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `billsetting` or `payment`.
    pub scenario: String,
    /// Seconds of load per strategy.
    pub duration_s: f64,
    /// App instances.
    pub instances: u32,
    /// Offered requests per second.
    pub rate: f64,
    /// Rows (distinct keys).
    pub keys: u64,
    /// Zipf exponent.
    pub zipf: f64,
    /// Fraction of requests that are writes.
    pub write_ratio: f64,
    /// Schedule seed.
    pub seed: u64,
    /// The database used.
    pub database: String,
    /// The Redis URL, when one was used, with its password replaced by `***`.
    pub redis: Option<String>,
    /// `--redis-backplane`: the server strata's backplane used instead of the tier's,
    /// password replaced by `***`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_backplane: Option<String>,
    /// Requests in the schedule (consumer reads not included).
    pub requests: u64,
    /// UI-like reads in the schedule.
    pub reads: u64,
    /// Reads of the downstream consumer (one per write, `payment` only).
    pub consumer_reads: u64,
    /// Writes in the schedule.
    pub writes: u64,
    /// Minimum DB reads of a perfect fleet-shared cache (see `--help`).
    pub compulsory_db_reads: u64,
    /// `compulsory_db_reads` per second.
    pub compulsory_db_reads_per_s: f64,
    /// The hottest key (most read).
    pub hottest_key: u64,
    /// Writes of the hottest key in the schedule.
    pub hottest_key_writes: u64,
    /// One entry per strategy, in run order.
    pub strategies: Vec<StrategyReport>,
}

/// One strategy's results.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    /// Strategy name.
    pub name: String,
    /// DB `SELECT`s.
    pub db_reads: u64,
    /// DB `SELECT`s per second of load.
    pub db_reads_per_s: f64,
    /// `db_reads / compulsory_db_reads`.
    pub db_reads_over_compulsory: f64,
    /// DB `UPDATE`s.
    pub db_writes: u64,
    /// DB `UPDATE`s per second of load.
    pub db_writes_per_s: f64,
    /// Redis commands (or in-process equivalents), counted client-side.
    pub redis_ops: u64,
    /// `redis_ops` per second of load.
    pub redis_ops_per_s: f64,
    /// Reads that completed.
    pub reads: u64,
    /// Writes that completed.
    pub writes: u64,
    /// Share of reads answered by a cache tier (`l1_hit_rate + l2_hit_rate`).
    pub hit_rate: f64,
    /// Share of reads answered by the instance's local cache.
    pub l1_hit_rate: f64,
    /// Share of reads answered by the shared tier.
    pub l2_hit_rate: f64,
    /// Read latency percentiles, microseconds from the scheduled start.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest read latency.
    pub max_us: f64,
    /// Read service time (task start to answer, without the runner's start delay),
    /// 50th percentile, microseconds.
    pub service_p50_us: f64,
    /// Read service time, 99th percentile.
    pub service_p99_us: f64,
    /// Write latency (commit + invalidation), 50th percentile.
    pub write_p50_us: f64,
    /// Write latency, 99th percentile.
    pub write_p99_us: f64,
    /// Stale reads, all readers.
    pub stale_reads: u64,
    /// Largest staleness of a stale read, milliseconds.
    pub max_stale_ms: f64,
    /// Reads of the downstream consumer (`payment`).
    pub consumer_reads: u64,
    /// Stale reads of the downstream consumer.
    pub consumer_stale_reads: u64,
    /// Largest staleness seen by the consumer, milliseconds.
    pub consumer_max_stale_ms: f64,
    /// DB reads of the hottest key.
    pub hottest_key_db_reads: u64,
    /// Times a perfect fleet-shared cache would (re)load the hottest key (see `--help`).
    pub hottest_key_reloads: Option<u64>,
    /// `hottest_key_db_reads / hottest_key_reloads`; 1.0 is ideal.
    pub hottest_key_loads_per_expiry: Option<f64>,
    /// Requests dropped because too many were in flight.
    pub dropped_requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Delay from the scheduled start to the start of the request's task (the runner's
    /// share of every latency), 50th percentile, microseconds.
    pub start_delay_p50_us: f64,
    /// The same, 99th percentile.
    pub start_delay_p99_us: f64,
    /// Worst lateness of the dispatcher, microseconds.
    pub max_dispatch_lag_us: f64,
    /// Seconds from the first scheduled request to the last completion.
    pub elapsed_s: f64,
    /// Strategy-specific counters (strata: `CacheStats` summed over the fleet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// DB reads in each second of the run.
    pub db_reads_per_second: Vec<u64>,
    /// `--join-at` (or `--warm-join-at`): what the instance joining mid-run cost the
    /// database (the first join of `timeline.events`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<EventReport>,
    /// The window the events happened in (the steady one, or the cold one with
    /// `--steady-after 0`), second by second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
    /// With Redis: what each server executed, and its CPU seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_nodes: Option<NodesReport>,
    /// Write completed → every other instance dropped its copy, over the cold window
    /// (strategies that invalidate local copies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation_lag: Option<LagSummary>,
    /// The cold start (the figures above, summarised like `steady`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold: Option<Window>,
    /// The steady window, after the warm-up (see `bench::steady`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady: Option<Window>,
}

/// The consistency level a strategy runs at, for the table's `level` column.
fn level_of(strategy: &str, payment: bool) -> &'static str {
    match strategy {
        "none" => "no cache",
        "local-ttl" => "ttl 5s",
        "redis-global" => "delete",
        "near-pubsub" | "multi-tier" => "best effort",
        "strata" if payment => "strong",
        "strata" => "invalidated",
        _ => "-",
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl BenchReport {
    /// The report's parameters and schedule totals, with no strategy yet.
    pub fn new(
        p: &ScheduleParams,
        schedule: &Schedule,
        database: &str,
        redis: Option<&SecretUrl>,
        redis_backplane: Option<&SecretUrl>,
    ) -> BenchReport {
        let duration_s = p.duration.as_secs_f64();
        let compulsory = schedule.compulsory_db_reads();
        BenchReport {
            scenario: p.scenario.name().to_owned(),
            duration_s,
            instances: p.instances,
            rate: p.rate,
            keys: p.keys,
            zipf: p.zipf,
            write_ratio: p.write_ratio,
            seed: p.seed,
            database: database.to_owned(),
            redis: redis.map(|r| r.redacted().to_owned()),
            redis_backplane: redis_backplane.map(|r| r.redacted().to_owned()),
            requests: schedule.requests.len() as u64,
            reads: schedule.reads(),
            consumer_reads: schedule.consumer_reads(),
            writes: schedule.writes(),
            compulsory_db_reads: compulsory,
            compulsory_db_reads_per_s: compulsory as f64 / duration_s,
            hottest_key: schedule.hottest_key(),
            hottest_key_writes: schedule.writes_of(schedule.hottest_key()),
            strategies: Vec::new(),
        }
    }

    /// The parameters in one line.
    pub fn parameters(&self) -> String {
        format!(
            "{} s, {} instances, {} req/s, {} keys, zipf {}, write ratio {}, seed {}",
            self.duration_s, self.instances, self.rate, self.keys, self.zipf, self.write_ratio, self.seed
        )
    }

    /// The schedule's totals and the compulsory bound in one line.
    pub fn workload(&self) -> String {
        let consumer = if self.consumer_reads > 0 {
            format!(
                ", each write followed by a consumer read on another instance: {} more reads",
                self.consumer_reads
            )
        } else {
            String::new()
        };
        format!(
            "{} requests ({} reads, {} writes{consumer}); compulsory DB reads {} ({:.1}/s)",
            self.requests, self.reads, self.writes, self.compulsory_db_reads, self.compulsory_db_reads_per_s,
        )
    }

    /// `<sep>redis: URL` (and where the backplane went), or nothing without Redis.
    fn redis_description(&self, sep: &str) -> String {
        let Some(redis) = &self.redis else { return String::new() };
        match &self.redis_backplane {
            Some(bp) => format!("{sep}redis: {redis} (strata's backplane: {bp})"),
            None => format!("{sep}redis: {redis}"),
        }
    }

    /// What is about to run, for stderr.
    pub fn headline(&self) -> String {
        format!(
            "strata bench {}: {}\n  database: {}{}\n  schedule: {}",
            self.scenario,
            self.parameters(),
            self.database,
            self.redis_description(", "),
            self.workload(),
        )
    }

    /// The results as an aligned text table (with a two-line header of parameters).
    pub fn table(&self) -> String {
        let payment = self.scenario == "payment";
        // Without Redis the column counts the in-process tier's and backplane's calls.
        let on_redis = self.redis.is_some() || self.strategies.iter().any(|s| s.redis_nodes.is_some());
        let mut header = vec![
            "strategy",
            "level",
            "DB reads/s",
            "x bound",
            "DB writes/s",
            if on_redis { "Redis ops/s" } else { "shared-tier ops/s" },
            "hit %",
            "L1 %",
            "L2 %",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "stale",
            "max stale ms",
        ];
        if payment {
            header.push("consumer stale");
        }
        header.extend(["hot loads/reload", "dropped", "failed"]);
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
        for s in &self.strategies {
            let mut row = vec![
                s.name.clone(),
                level_of(&s.name, payment).to_owned(),
                format!("{:.1}", s.db_reads_per_s),
                // Three decimals: 0.998 must not read as the bound itself.
                format!("{:.3}", s.db_reads_over_compulsory),
                format!("{:.1}", s.db_writes_per_s),
                format!("{:.1}", s.redis_ops_per_s),
                format!("{:.2}", s.hit_rate * 100.0),
                format!("{:.2}", s.l1_hit_rate * 100.0),
                format!("{:.2}", s.l2_hit_rate * 100.0),
                latency(s.p50_us),
                latency(s.p99_us),
                latency(s.p999_us),
                s.stale_reads.to_string(),
                stale_ms(s.max_stale_ms, s.stale_reads),
            ];
            if payment {
                row.push(format!("{}/{}", s.consumer_stale_reads, s.consumer_reads));
            }
            // A run whose requests failed may never have loaded the key: no figure.
            let hot = s.hottest_key_loads_per_expiry.filter(|_| s.errors == 0 || s.hottest_key_db_reads > 0);
            row.push(hot.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")));
            row.push(s.dropped_requests.to_string());
            row.push(s.errors.to_string());
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "# strata bench {}: {}", self.scenario, self.parameters());
        let _ = writeln!(
            out,
            "# {}; database: {}{}",
            self.workload(),
            self.database,
            self.redis_description("; "),
        );
        let _ = writeln!(out, "# cold start: every strategy starts with empty caches");
        for (i, row) in rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str("  ");
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        if let (Some(p50), Some(p99)) = (
            self.strategies.iter().map(|s| s.start_delay_p50_us).reduce(f64::max),
            self.strategies.iter().map(|s| s.start_delay_p99_us).reduce(f64::max),
        ) {
            let _ = writeln!(
                out,
                "# latencies are from the scheduled start and include the runner's start delay \
                 (scheduled time -> task running): p50 <= {} us, p99 <= {} us",
                latency(p50),
                latency(p99)
            );
        }
        let service: Vec<String> = self
            .strategies
            .iter()
            .map(|s| format!("{} {}/{}", s.name, latency(s.service_p50_us), latency(s.service_p99_us)))
            .collect();
        let _ =
            writeln!(out, "# read service time p50/p99 us (task running -> answer): {}", service.join(", "));
        let lags: Vec<String> = self
            .strategies
            .iter()
            .filter_map(|s| {
                let l = s.propagation_lag?;
                Some(format!(
                    "{} {}/{}/{}/{} ({} writes, {} incomplete)",
                    s.name,
                    latency(l.p50_us),
                    latency(l.p99_us),
                    latency(l.p999_us),
                    latency(l.max_us),
                    l.writes,
                    l.incomplete
                ))
            })
            .collect();
        if !lags.is_empty() {
            let _ = writeln!(
                out,
                "# propagation lag p50/p99/p99.9/max us (write returned -> every other instance dropped its copy): {}",
                lags.join(", ")
            );
        }
        let queued: Vec<String> = self.strategies.iter().filter_map(queued_writes).collect();
        if !queued.is_empty() {
            let _ = writeln!(
                out,
                "# writes done with their invalidation message late (committed, L2 clean, the message queued \
                 and sent in order: `Error::is_queued`; not failed below Strong; so far in the run): {}",
                queued.join(", ")
            );
        }
        let repairs: Vec<String> = self.strategies.iter().filter_map(repairs_line).collect();
        if !repairs.is_empty() {
            let _ = writeln!(
                out,
                "# gaps in the invalidations (messages or stream entries lost): {}",
                repairs.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "# level: ttl 5s = copies up to 5 s old, no invalidation; delete = one shared copy, deleted \
             after the write; best effort = invalidation broadcast, no fill guard, no gap repair; \
             invalidated / strong = strata's levels (stale by at most the propagation delay / linearizable)"
        );
        for s in self.strategies.iter().filter(|s| s.errors > 0) {
            let _ = writeln!(
                out,
                "# FAILED: {}: {} requests failed; first error: {}",
                s.name,
                s.errors,
                s.first_error.as_deref().unwrap_or("-")
            );
        }
        for s in &self.strategies {
            for line in s.timeline.iter().flat_map(|t| t.lines(&s.name)) {
                let _ = writeln!(out, "{line}");
            }
        }
        for s in &self.strategies {
            if let Some(nodes) = &s.redis_nodes {
                let _ = writeln!(out, "{}", nodes.line(&s.name));
            }
        }
        out
    }
}

fn latency(us: f64) -> String {
    if us < 100.0 { format!("{us:.1}") } else { format!("{us:.0}") }
}

fn stale_ms(ms: f64, count: u64) -> String {
    if count == 0 {
        "-".to_owned()
    } else if ms < 10.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.0}")
    }
}

impl StrategyReport {
    /// Builds the entry of `strategy` from its run.
    pub fn new(
        strategy: &dyn Strategy,
        outcome: &Outcome,
        db: DbCounts,
        tiers: TierCounts,
        bench: &BenchReport,
    ) -> StrategyReport {
        let d = bench.duration_s;
        let all = outcome.all_reads();
        let l1 = ratio(tiers.l1_hits, all.reads);
        let l2 = ratio(tiers.l2_hits, all.reads);
        let reloads = strategy.ttl().map(|ttl| {
            let expiries = if ttl.as_secs_f64() < d { (d / ttl.as_secs_f64()).ceil() as u64 - 1 } else { 0 };
            let invalidations = if strategy.invalidates() { bench.hottest_key_writes } else { 0 };
            1 + expiries + invalidations
        });
        StrategyReport {
            name: strategy.name().to_owned(),
            db_reads: db.reads,
            db_reads_per_s: db.reads as f64 / d,
            db_reads_over_compulsory: ratio(db.reads, bench.compulsory_db_reads),
            db_writes: db.writes,
            db_writes_per_s: db.writes as f64 / d,
            redis_ops: tiers.remote_ops,
            redis_ops_per_s: tiers.remote_ops as f64 / d,
            reads: all.reads,
            writes: outcome.writes,
            hit_rate: l1 + l2,
            l1_hit_rate: l1,
            l2_hit_rate: l2,
            p50_us: us(&outcome.read_latency, 0.5),
            p99_us: us(&outcome.read_latency, 0.99),
            p999_us: us(&outcome.read_latency, 0.999),
            max_us: outcome.read_latency.max() as f64 / 1000.0,
            service_p50_us: us(&outcome.read_service, 0.5),
            service_p99_us: us(&outcome.read_service, 0.99),
            write_p50_us: us(&outcome.write_latency, 0.5),
            write_p99_us: us(&outcome.write_latency, 0.99),
            stale_reads: all.stale,
            max_stale_ms: ms(all.max_age),
            consumer_reads: outcome.consumer.reads,
            consumer_stale_reads: outcome.consumer.stale,
            consumer_max_stale_ms: ms(outcome.consumer.max_age),
            hottest_key_db_reads: db.hottest_reads,
            hottest_key_reloads: reloads,
            hottest_key_loads_per_expiry: reloads.map(|r| ratio(db.hottest_reads, r)),
            dropped_requests: outcome.dropped,
            errors: outcome.errors,
            first_error: outcome.first_error.as_deref().map(secret::scrub),
            start_delay_p50_us: us(&outcome.start_delay, 0.5),
            start_delay_p99_us: us(&outcome.start_delay, 0.99),
            max_dispatch_lag_us: outcome.max_dispatch_lag.as_secs_f64() * 1e6,
            elapsed_s: outcome.elapsed.as_secs_f64(),
            details: strategy.details(),
            db_reads_per_second: outcome.db_reads_per_second.clone(),
            join: None,
            timeline: None,
            redis_nodes: None,
            propagation_lag: None,
            cold: None,
            steady: None,
        }
    }

    /// Keeps the timeline of the window the events happened in (and its first join as
    /// `join`).
    pub fn set_timeline(&mut self, timeline: Timeline) {
        self.join = timeline
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ColdJoin | EventKind::WarmJoin))
            .cloned();
        self.timeline = Some(timeline);
    }

    /// One line for stderr once the strategy is done.
    pub fn summary_line(&self) -> String {
        format!(
            "  {:<12} done: {:.1} DB reads/s, hit {:.2} %, p99 {} us, {} stale reads{}",
            self.name,
            self.db_reads_per_s,
            self.hit_rate * 100.0,
            latency(self.p99_us),
            self.stale_reads,
            if self.dropped_requests > 0 {
                format!(", {} dropped", self.dropped_requests)
            } else {
                String::new()
            },
        )
    }
}

/// "<name> <count>" of a strategy's writes whose invalidation message was only late
/// (strata's `writes_queued` detail), when there were any.
fn queued_writes(s: &StrategyReport) -> Option<String> {
    let n = s.details.as_ref()?.get("writes_queued")?.as_u64().filter(|&n| n > 0)?;
    Some(format!("{} {n}", s.name))
}

/// How a strategy's instances repaired what they missed, from its details (strata's
/// counters): `None` when nothing was missed.
fn repairs_line(s: &StrategyReport) -> Option<String> {
    let d = s.details.as_ref()?;
    let n = |k: &str| d.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let (gaps, flushed, replayed, verified) =
        (n("gaps_detected"), n("repairs_flushed"), n("repairs_replayed"), n("repairs_verified"));
    let silent = n("members_silent");
    (gaps > 0 || silent > 0).then(|| {
        format!(
            "{} {gaps} detected, repaired by {flushed} L1 flushes and {replayed} replays; {verified} checks \
             of reported stream losses found nothing missing; {silent} members found silent (an L1 flush \
             each)",
            s.name
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(latency(3.25), "3.2");
        assert_eq!(latency(1234.5), "1234");
        assert_eq!(stale_ms(0.0, 0), "-");
        assert_eq!(stale_ms(0.0421, 2), "0.042");
        assert_eq!(stale_ms(4200.4, 2), "4200");
    }
}
