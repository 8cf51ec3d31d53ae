//! The table `strata check` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use strata_testkit::Report;

use super::CheckArgs;

/// What the table says about the run besides the report.
pub struct RunInfo<'a> {
    /// The command line.
    pub args: &'a CheckArgs,
    /// How the bound was derived.
    pub bound_how: &'a str,
    /// Entries in L2 at quiescence.
    pub l2_cached: usize,
    /// Entries in all L1s at quiescence.
    pub l1_cached: usize,
    /// Ticks each worker skipped (too many operations in flight).
    pub skipped: &'a BTreeMap<String, u64>,
}

fn percent(f: f64) -> String {
    format!("{:.2} %", f * 100.0)
}

/// Renders the report as a table.
pub fn render(r: &Report, run: &RunInfo<'_>) -> String {
    let a = run.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "strata check — level {}, fault {}, {} s, {} instances (1 writer at {}/s, {} readers at {}/s each), {} keys",
        r.level,
        a.fault.name(),
        a.duration,
        a.instances,
        a.write_rate,
        a.instances - 1,
        a.read_rate,
        a.keys
    );
    let _ = writeln!(out, "bound: {:.0} ms = {}", r.bound_ms, run.bound_how);
    if r.faults.is_empty() {
        let _ = writeln!(out, "faults: none");
    } else {
        let _ = writeln!(out, "faults:");
        for f in &r.faults {
            let _ = writeln!(out, "  {f}");
        }
    }
    let tiers = r.reads_by_tier.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ");
    let skipped: u64 = run.skipped.values().sum();
    let lin = match r.linearizability_violations {
        Some(n) => n.to_string(),
        None => "not checked (not promised at this level)".to_owned(),
    };
    let verdict = |n: u64| if n == 0 { "ok" } else { "VIOLATED" };
    let rows: Vec<(String, String, &str)> = vec![
        ("reads".into(), format!("{} ({tiers})", r.reads), ""),
        ("failed reads".into(), r.failed_reads.to_string(), ""),
        ("writes committed (judged from the commit)".into(), r.writes.to_string(), ""),
        (
            "writes left unjudged (COMMIT outcome unknown)".into(),
            format!("{} ({} resolved from the versions)", r.indeterminate_writes, r.resolved_writes),
            "",
        ),
        ("writes rolled back (never visible)".into(), r.rolled_back_writes.to_string(), ""),
        (
            "invalidations buffered, then retried".into(),
            format!(
                "{} (longest commit → applied {:.0} ms)",
                r.buffered_invalidations, r.buffered_invalidation_max_ms
            ),
            "",
        ),
        ("ticks skipped (overload)".into(), skipped.to_string(), ""),
        ("stale reads beyond bound".into(), r.stale_beyond_bound.to_string(), verdict(r.stale_beyond_bound)),
        (
            "stale reads (zero slack)".into(),
            format!("{} (stalest {:.0} ms after a newer commit)", r.stale_any, r.stale_read_max_ms),
            "",
        ),
        ("reads of unwritten versions".into(), r.unwritten_reads.to_string(), verdict(r.unwritten_reads)),
        (
            "staleness p50 / p99 / max".into(),
            format!("{:.3} / {:.3} / {:.3} ms", r.staleness_p50_ms, r.staleness_p99_ms, r.staleness_max_ms),
            "",
        ),
        (
            "writes consistent within 1ms / 10ms / 100ms / 1s".into(),
            format!(
                "{} / {} / {} / {}",
                percent(r.consistent_within_1ms),
                percent(r.consistent_within_10ms),
                percent(r.consistent_within_100ms),
                percent(r.consistent_within_1s)
            ),
            "",
        ),
        (
            "permanent inconsistencies".into(),
            format!(
                "{} (of {} L1 + {} L2 entries)",
                r.permanent_inconsistencies, run.l1_cached, run.l2_cached
            ),
            verdict(r.permanent_inconsistencies),
        ),
        ("lost writes".into(), r.lost_writes.to_string(), verdict(r.lost_writes)),
        ("linearizability violations".into(), lin, r.linearizability_violations.map_or("", verdict)),
        ("malformed history lines".into(), r.malformed_lines.to_string(), ""),
    ];
    let width = rows.iter().map(|(k, _, _)| k.chars().count()).max().unwrap_or(0);
    let _ = writeln!(out);
    for (k, v, verdict) in &rows {
        let pad = width - k.chars().count();
        let _ = writeln!(
            out,
            "  {k}{}  {v}{}",
            " ".repeat(pad),
            if verdict.is_empty() { String::new() } else { format!("  [{verdict}]") }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "result: {}", if r.passed { "PASS" } else { "FAIL" });
    if !r.examples.is_empty() {
        let _ = writeln!(out, "examples:");
        for e in &r.examples {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}
