//! The drafts run's table, JSON and SVG.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;

use super::db::DraftsDb;
use super::runner::Outcome;
use super::schedule::DraftParams;
use crate::bench::redis_nodes::NodesReport;

/// The whole run.
#[derive(Debug, Serialize)]
pub struct DraftsReport {
    /// Always "drafts".
    pub scenario: &'static str,
    /// Users (one draft each).
    pub users: u64,
    /// Instances.
    pub instances: usize,
    /// Seconds of load per strategy.
    pub duration_s: f64,
    /// strata's flush delay and the naive scheduler's interval.
    pub flush_delay_s: f64,
    /// Events in the schedule, and saves among them.
    pub events: usize,
    /// Saves in the schedule.
    pub scheduled_saves: u64,
    /// The database.
    pub database: String,
    /// Whether `--redis` was given.
    pub redis: bool,
    /// One row per strategy.
    pub strategies: Vec<StrategyRow>,
}

/// One strategy's figures.
#[derive(Debug, Serialize)]
pub struct StrategyRow {
    /// `write-through`, `naive-write-behind` or `strata`.
    pub name: &'static str,
    /// Rows written to the database during the run (a batched upsert of n rows is n).
    pub db_writes: u64,
    /// `db_writes` per second.
    pub db_writes_per_s: f64,
    /// Write statements (a batch is one).
    pub db_write_statements: u64,
    /// `db_write_statements` per second.
    pub db_write_statements_per_s: f64,
    /// Rows written by the drain after the run.
    pub drain_writes: u64,
    /// Database reads.
    pub db_reads: u64,
    /// Acknowledged saves.
    pub saves: u64,
    /// Save latency p50 (µs).
    pub save_p50_us: u64,
    /// Save latency p99 (µs).
    pub save_p99_us: u64,
    /// Reads from another device.
    pub reads: u64,
    /// Reads that returned an older revision than one acknowledged before they began.
    pub read_your_writes_violations: u64,
    /// Users whose row, after the drain, is not their last acknowledged save.
    pub lost_saves: u64,
    /// Time from a save's acknowledgement to its row being written, p50 (ms).
    pub flush_lag_p50_ms: f64,
    /// The same, p99 (ms).
    pub flush_lag_p99_ms: f64,
    /// Failed requests.
    pub errors: u64,
    /// The runner's worst start delay behind the schedule (ms).
    pub max_start_delay_ms: f64,
    /// Rows written in each second of the run.
    pub db_writes_per_second: Vec<u64>,
    /// Redis commands and CPU during the run (`--redis`).
    pub redis: Option<NodesReport>,
    /// Redis commands per second (`--redis`).
    pub redis_ops_per_s: Option<f64>,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[(((p / 100.0) * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)]
}

impl StrategyRow {
    /// The row of one run: `db` counted `(reads, statements, rows)` by its end.
    pub fn new(
        name: &'static str,
        o: &Outcome,
        elapsed: Duration,
        (reads, statements, rows): (u64, u64, u64),
        drain_writes: u64,
        lost_saves: u64,
        db: &DraftsDb,
    ) -> StrategyRow {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| o.saves.as_ref().map_or(0, |h| h.value_at_quantile(p));
        let mut lags = db.lags_ms();
        StrategyRow {
            name,
            db_writes: rows,
            db_writes_per_s: rows as f64 / secs,
            db_write_statements: statements,
            db_write_statements_per_s: statements as f64 / secs,
            drain_writes,
            db_reads: reads,
            saves: o.saves.as_ref().map_or(0, |h| h.len()),
            save_p50_us: q(0.5),
            save_p99_us: q(0.99),
            reads: o.reads,
            read_your_writes_violations: o.violations,
            lost_saves,
            flush_lag_p50_ms: percentile(&mut lags, 50.0),
            flush_lag_p99_ms: percentile(&mut lags, 99.0),
            errors: o.errors,
            max_start_delay_ms: o.max_start_delay.as_secs_f64() * 1e3,
            db_writes_per_second: db.per_second(),
            redis: None,
            redis_ops_per_s: None,
        }
    }

    /// One line for stderr as each strategy finishes.
    pub fn summary_line(&self) -> String {
        format!(
            "{:>18}: {:.0} DB writes/s ({:.1} statements/s), save p99 {} µs, {} read-your-writes violations, {} lost saves",
            self.name,
            self.db_writes_per_s,
            self.db_write_statements_per_s,
            self.save_p99_us,
            self.read_your_writes_violations,
            self.lost_saves
        )
    }
}

impl DraftsReport {
    /// An empty report for these parameters.
    pub fn new(
        p: &DraftParams,
        flush_delay: Duration,
        events: usize,
        saves: u64,
        database: &str,
        redis: bool,
    ) -> Self {
        DraftsReport {
            scenario: "drafts",
            users: p.users,
            instances: p.instances,
            duration_s: p.duration.as_secs_f64(),
            flush_delay_s: flush_delay.as_secs_f64(),
            events,
            scheduled_saves: saves,
            database: database.to_owned(),
            redis,
            strategies: Vec::new(),
        }
    }

    /// The run's parameters in one line.
    pub fn headline(&self) -> String {
        format!(
            "strata bench --scenario drafts: {} users on {} instances, {:.0} s, saves every 1-2 s while active \
             ({} scheduled), flush delay {:.0} s; {}; {}",
            self.users,
            self.instances,
            self.duration_s,
            self.scheduled_saves,
            self.flush_delay_s,
            self.database,
            if self.redis { "Redis" } else { "embedded (in-process tier, backplane and queue)" }
        )
    }

    /// The table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{:<19} {:>10} {:>11} {:>9} {:>10} {:>10} {:>8} {:>6} {:>10} {:>10} {:>10}",
            "strategy",
            "DB writes/s",
            "stmts/s",
            "x fewer",
            "save p50",
            "save p99",
            "RYW viol",
            "lost",
            "lag p50",
            "lag p99",
            "Redis op/s"
        );
        let base = self.strategies.iter().find(|s| s.name == "write-through").map(|s| s.db_writes_per_s);
        for s in &self.strategies {
            let fewer = base.filter(|_| s.db_writes_per_s > 0.0).map(|b| b / s.db_writes_per_s);
            let _ = writeln!(
                out,
                "{:<19} {:>10.1} {:>11.1} {:>9} {:>8}µs {:>8}µs {:>8} {:>6} {:>8.0}ms {:>8.0}ms {:>10}",
                s.name,
                s.db_writes_per_s,
                s.db_write_statements_per_s,
                fewer.map_or("-".to_owned(), |f| format!("{f:.1}x")),
                s.save_p50_us,
                s.save_p99_us,
                s.read_your_writes_violations,
                s.lost_saves,
                s.flush_lag_p50_ms,
                s.flush_lag_p99_ms,
                s.redis.as_ref().map_or("-".to_owned(), |r| format!("{:.0}", r.commands_per_s)),
            );
        }
        let _ = writeln!(
            out,
            "\nx fewer: write-through's DB writes/s divided by the strategy's. lost: users whose row, after a drain, \
             is not the last save they were told succeeded. RYW viol: reads on another instance older than a save \
             acknowledged before the read began. lag: acknowledgement to database row. Redis cmd/s: \
             commands the server executed (INFO; commands run inside scripts count too), during the run."
        );
        out
    }
}

/// `--plot FILE`: rows written per second, one line per strategy.
pub fn write_svg(report: &DraftsReport, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    draw(report, &root).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw(report: &DraftsReport, root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> DrawResult {
    root.fill(&WHITE)?;
    let max_y = report
        .strategies
        .iter()
        .flat_map(|s| s.db_writes_per_second.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1);
    let max_x = report.strategies.iter().map(|s| s.db_writes_per_second.len()).max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "strata bench --scenario drafts: DB rows written per second ({} users, flush delay {:.0} s)",
                report.users, report.flush_delay_s
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0..max_x, 0..max_y + max_y / 10 + 1)?;
    chart.configure_mesh().x_desc("second of the run").y_desc("rows written / s").draw()?;
    for s in &report.strategies {
        let color = match s.name {
            "write-through" => RGBColor(214, 39, 40),
            "naive-write-behind" => RGBColor(230, 145, 30),
            _ => RGBColor(30, 140, 70),
        };
        let series = s.db_writes_per_second.iter().enumerate().map(|(x, y)| (x, *y));
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))?
            .label(format!(
                "{} ({} lost, {} RYW violations)",
                s.name, s.lost_saves, s.read_your_writes_violations
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}
