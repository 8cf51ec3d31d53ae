//! The consistency checker: a pure function from a [`History`], the database's final
//! contents and the caches' contents at quiescence to a [`Report`].
//!
//! # Definitions
//!
//! Versions are per row and strictly increasing (a version column the database bumps
//! on every change). The rows' versions before the history began are given in
//! [`CheckConfig::initial`]. For a key:
//!
//! * A write is **completed** when it returned `ok` (committed, and its invalidation
//!   returned). A write that returned an error is **indeterminate**: it may or may not
//!   be visible, so reads may or may not see it, and it never makes a read stale. A
//!   write recorded as **rolled back** ([`Op::WriteRolledBack`]) certainly changed
//!   nothing: it is counted and otherwise ignored, so (unlike an indeterminate write
//!   of unknown version) it excuses no read of a version nobody wrote.
//! * A read is **stale** (`stale_any`) when it returned a version older than the newest
//!   write of its key completed before the read was invoked.
//! * It is **stale beyond the bound** (`stale_beyond_bound`) when it returned a version
//!   older than the newest write completed before `invoke − bound`: the level promised
//!   that such a write is visible by then.
//! * The **staleness window** of a completed write W (returned at `t`) is the latest
//!   invoke time of a read of its key that returned a version older than W, minus `t`,
//!   or 0 if there is none (or if all such reads were invoked before `t`). The report
//!   gives its p50, p99 and maximum over all completed writes, and the fraction of
//!   writes whose window is at most 1 ms, 10 ms, 100 ms and 1 s (Polaris-style
//!   "consistency within T").
//! * A **permanent inconsistency** is an entry of a cache at quiescence (any instance's
//!   L1, or L2) whose version differs from the database's.
//! * A **lost write** is a completed write whose version is newer than the database's
//!   final version of its key.
//! * **Linearizability** (checked when asked for, i.e. for the Strong level; one writer
//!   per key, strictly increasing versions): a read violates it if it returned
//!   - a version older than a write completed before it was invoked (a stale read),
//!   - a version newer than every write invoked before it returned (a read from the
//!     future; a write whose version is unknown may have any version below the next
//!     known one; before the first write, the initial version is the bound, and
//!     without a known initial version such a read is not judged), or
//!   - a version older than what a read that returned before it was invoked saw (a
//!     new-old inversion).
//!
//!   Each violating read counts once.
//!
//! Failed reads (`ok: false`) and reads without a version are counted but not judged.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{Event, History, Op};

/// How many examples of each kind of finding the report keeps.
const EXAMPLES_PER_KIND: usize = 10;

/// What the checker is asked to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    /// The consistency level's name, copied into the report.
    pub level: String,
    /// The level's documented staleness bound (with its margin): a read invoked this
    /// long after a write completed must see it.
    pub bound: Duration,
    /// Whether to check linearizability (the Strong level's promise).
    pub linearizable: bool,
    /// The rows' versions before the history began (the database as seeded): they
    /// count as written before every event of the history, but not as writes.
    pub initial: BTreeMap<u64, u64>,
}

/// The contents of one cache at quiescence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSnapshot {
    /// Which cache (`"reader-1 l1"`, `"l2"`…).
    pub source: String,
    /// Each cached key with the version of its value; `None` for a cached
    /// "not found".
    pub entries: Vec<(u64, Option<u64>)>,
}

/// The system's state once the load stopped and everything settled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiescence {
    /// Every row's final version.
    pub database: BTreeMap<u64, u64>,
    /// What each cache holds.
    pub caches: Vec<CacheSnapshot>,
}

/// What the checker found. See the [module documentation](self) for the definitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The consistency level checked.
    pub level: String,
    /// The bound used for `stale_beyond_bound`, in milliseconds.
    pub bound_ms: f64,
    /// The faults injected (their descriptions, in order).
    pub faults: Vec<String>,
    /// Successful reads that returned a version (the judged reads).
    pub reads: u64,
    /// Reads that failed or returned no version.
    pub failed_reads: u64,
    /// Judged reads per tier they were served from (`l1`, `l2`, `db`, `unknown`).
    pub reads_by_tier: BTreeMap<String, u64>,
    /// Completed writes.
    pub writes: u64,
    /// Writes that returned an error (they may or may not be visible).
    pub indeterminate_writes: u64,
    /// Writes that certainly changed nothing (rolled back, or refused before COMMIT).
    #[serde(default)]
    pub rolled_back_writes: u64,
    /// Invalidation events recorded on their own.
    pub invalidations: u64,
    /// History lines that could not be parsed (skipped).
    pub malformed_lines: u64,
    /// Reads older than a write completed more than the bound before they were invoked.
    pub stale_beyond_bound: u64,
    /// Reads older than a write completed before they were invoked.
    pub stale_any: u64,
    /// Median per-write staleness window, in milliseconds.
    pub staleness_p50_ms: f64,
    /// 99th percentile of the per-write staleness window, in milliseconds.
    pub staleness_p99_ms: f64,
    /// Largest per-write staleness window, in milliseconds.
    pub staleness_max_ms: f64,
    /// Fraction of completed writes whose staleness window is at most 1 ms.
    pub consistent_within_1ms: f64,
    /// Fraction of completed writes whose staleness window is at most 10 ms.
    pub consistent_within_10ms: f64,
    /// Fraction of completed writes whose staleness window is at most 100 ms.
    pub consistent_within_100ms: f64,
    /// Fraction of completed writes whose staleness window is at most 1 s.
    pub consistent_within_1s: f64,
    /// Cached entries at quiescence that differ from the database.
    pub permanent_inconsistencies: u64,
    /// Completed writes newer than the database's final version of their key.
    pub lost_writes: u64,
    /// Reads that violate linearizability; `None` when it was not checked.
    pub linearizability_violations: Option<u64>,
    /// True when nothing the level promises was violated: no stale read beyond the
    /// bound, no permanent inconsistency, no lost write, and (when checked) no
    /// linearizability violation.
    pub passed: bool,
    /// A few examples of each finding, for diagnosis.
    pub examples: Vec<String>,
}

/// A read being judged.
#[derive(Clone, Copy)]
struct Read<'a> {
    ev: &'a Event,
    version: u64,
}

/// Per-key view of the history.
#[derive(Default)]
struct KeyHistory<'a> {
    reads: Vec<Read<'a>>,
    /// Every write, sorted by invocation.
    writes: Vec<&'a Event>,
}

/// Collects examples, a few per kind.
struct Examples {
    per_kind: HashMap<&'static str, usize>,
    lines: Vec<String>,
    origin: u64,
}

impl Examples {
    fn add(&mut self, kind: &'static str, line: impl FnOnce() -> String) {
        let n = self.per_kind.entry(kind).or_insert(0);
        if *n < EXAMPLES_PER_KIND {
            *n += 1;
            self.lines.push(format!("{kind}: {}", line()));
        }
    }
}

/// A time relative to the start of the history, for examples.
fn rel(origin: u64, ns: u64) -> String {
    format!("+{:.3}s", ns.saturating_sub(origin) as f64 / 1e9)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fraction(count: usize, total: usize) -> f64 {
    if total == 0 { 1.0 } else { count as f64 / total as f64 }
}

/// Completed writes of one key sorted by return time, with the running maximum of
/// their versions: answers "the newest write completed before t".
struct Completed {
    returns: Vec<u64>,
    max_version: Vec<u64>,
}

impl Completed {
    fn new(initial: Option<u64>, writes: &[&Event]) -> Self {
        let mut done: Vec<(u64, u64)> =
            writes.iter().filter(|w| w.ok).filter_map(|w| w.version.map(|v| (w.return_ns, v))).collect();
        done.sort_unstable();
        if let Some(v) = initial {
            done.insert(0, (0, v));
        }
        let mut max = 0;
        let max_version = done
            .iter()
            .map(|&(_, v)| {
                max = max.max(v);
                max
            })
            .collect();
        Completed { returns: done.iter().map(|&(t, _)| t).collect(), max_version }
    }

    /// The newest version among writes that returned strictly before `t` (the initial
    /// version counts as returned at 0).
    fn newest_before(&self, t: u64) -> Option<u64> {
        let n = self.returns.partition_point(|&r| r < t);
        n.checked_sub(1).map(|i| self.max_version[i])
    }
}

/// Checks a history against the level's promises.
///
/// `history` may hold the events of several processes in any order; `end` is the
/// state at quiescence.
pub fn check(config: &CheckConfig, history: &History, end: &Quiescence) -> Report {
    let bound_ns = nanos(config.bound);
    let origin = history.events.iter().map(|e| e.invoke_ns).min().unwrap_or(0);
    let mut ex = Examples { per_kind: HashMap::new(), lines: Vec::new(), origin };
    let at = |ns: u64| rel(origin, ns);
    let mut report = Report {
        level: config.level.clone(),
        bound_ms: ms(bound_ns),
        malformed_lines: history.malformed as u64,
        ..Report::default()
    };

    let mut keys: BTreeMap<u64, KeyHistory<'_>> = BTreeMap::new();
    let mut faults: Vec<&Event> = Vec::new();
    for ev in &history.events {
        match ev.op {
            Op::Read => match (ev.ok, ev.version) {
                (true, Some(version)) => {
                    report.reads += 1;
                    let tier = ev.tier.map_or("unknown", |t| t.as_str());
                    *report.reads_by_tier.entry(tier.to_owned()).or_insert(0) += 1;
                    keys.entry(ev.key).or_default().reads.push(Read { ev, version });
                }
                _ => report.failed_reads += 1,
            },
            Op::Write => {
                if ev.ok && ev.version.is_some() {
                    report.writes += 1;
                } else {
                    report.indeterminate_writes += 1;
                }
                keys.entry(ev.key).or_default().writes.push(ev);
            }
            Op::WriteRolledBack => report.rolled_back_writes += 1,
            Op::InvalidationApplied => report.invalidations += 1,
            Op::Fault => faults.push(ev),
        }
    }
    faults.sort_by_key(|e| e.invoke_ns);
    report.faults = faults
        .iter()
        .map(|f| {
            format!(
                "{} at {} for {:.1}s",
                f.detail,
                at(f.invoke_ns),
                ms(f.return_ns.saturating_sub(f.invoke_ns)) / 1e3
            )
        })
        .collect();

    let mut windows: Vec<u64> = Vec::new();
    let mut linearizability = 0u64;
    for (&key, kh) in &mut keys {
        kh.writes.sort_by_key(|w| (w.invoke_ns, w.return_ns));
        let initial = config.initial.get(&key).copied();
        let completed = Completed::new(initial, &kh.writes);

        // Stale reads, at zero slack and beyond the bound.
        for r in &kh.reads {
            if let Some(newest) = completed.newest_before(r.ev.invoke_ns)
                && r.version < newest
            {
                report.stale_any += 1;
                ex.add("stale read", || {
                    format!(
                        "{} read key {key} v{} from {} at {}, v{newest} was completed before",
                        r.ev.process,
                        r.version,
                        r.ev.tier.map_or("?", |t| t.as_str()),
                        at(r.ev.invoke_ns)
                    )
                });
            }
            if let Some(newest) = completed.newest_before(r.ev.invoke_ns.saturating_sub(bound_ns))
                && r.version < newest
            {
                report.stale_beyond_bound += 1;
                let read_at = at(r.ev.invoke_ns);
                let written = kh
                    .writes
                    .iter()
                    .find(|w| w.ok && w.version == Some(newest))
                    .map_or(String::from("?"), |w| at(w.return_ns));
                ex.add("stale beyond bound", || {
                    format!(
                        "{} read key {key} v{} from {} at {read_at}, v{newest} was completed at {written}",
                        r.ev.process,
                        r.version,
                        r.ev.tier.map_or("?", |t| t.as_str()),
                    )
                });
            }
        }

        // Per-write staleness windows: reads sorted by version, with the running
        // maximum of their invocation times.
        let mut by_version: Vec<(u64, u64)> = kh.reads.iter().map(|r| (r.version, r.ev.invoke_ns)).collect();
        by_version.sort_unstable();
        let mut latest = 0;
        let latest_invoke: Vec<u64> = by_version
            .iter()
            .map(|&(_, t)| {
                latest = latest.max(t);
                latest
            })
            .collect();
        for w in kh.writes.iter().filter(|w| w.ok) {
            let Some(v) = w.version else { continue };
            let older = by_version.partition_point(|&(rv, _)| rv < v);
            let window = older.checked_sub(1).map_or(0, |i| latest_invoke[i].saturating_sub(w.return_ns));
            windows.push(window);
        }

        if config.linearizable {
            linearizability += linearizability_violations(key, initial, kh, &completed, &mut ex);
        }
    }

    windows.sort_unstable();
    report.staleness_p50_ms = ms(percentile(&windows, 50.0));
    report.staleness_p99_ms = ms(percentile(&windows, 99.0));
    report.staleness_max_ms = ms(windows.last().copied().unwrap_or(0));
    let within = |limit_ns: u64| fraction(windows.partition_point(|&w| w <= limit_ns), windows.len());
    report.consistent_within_1ms = within(1_000_000);
    report.consistent_within_10ms = within(10_000_000);
    report.consistent_within_100ms = within(100_000_000);
    report.consistent_within_1s = within(1_000_000_000);
    report.linearizability_violations = config.linearizable.then_some(linearizability);

    // Quiescence: caches against the database, completed writes against the database.
    for snapshot in &end.caches {
        for &(key, cached) in &snapshot.entries {
            let db = end.database.get(&key).copied();
            if cached != db {
                report.permanent_inconsistencies += 1;
                let show = |v: Option<u64>| v.map_or("none".to_owned(), |v| format!("v{v}"));
                ex.add("permanent inconsistency", || {
                    format!(
                        "{} holds key {key} at {}, the database has {}",
                        snapshot.source,
                        show(cached),
                        show(db)
                    )
                });
            }
        }
    }
    for (&key, kh) in &keys {
        for w in kh.writes.iter().filter(|w| w.ok) {
            let Some(v) = w.version else { continue };
            let db = end.database.get(&key).copied();
            if db.is_none_or(|d| d < v) {
                report.lost_writes += 1;
                ex.add("lost write", || {
                    format!("key {key} v{v} completed at {}, the database ends at {db:?}", at(w.return_ns))
                });
            }
        }
    }

    report.passed = report.stale_beyond_bound == 0
        && report.permanent_inconsistencies == 0
        && report.lost_writes == 0
        && report.linearizability_violations.is_none_or(|n| n == 0);
    report.examples = ex.lines;
    report
}

/// Counts the reads of one key that violate linearizability (each once).
fn linearizability_violations(
    key: u64,
    initial: Option<u64>,
    kh: &KeyHistory<'_>,
    completed: &Completed,
    ex: &mut Examples,
) -> u64 {
    let writes = &kh.writes;
    // Upper bound of what a read may see, for each prefix of writes (by invocation):
    // the largest known version, or, if the last write of the prefix has an unknown
    // version, the next known version minus one (unbounded if there is none).
    let mut prefix_max = Vec::with_capacity(writes.len());
    let mut max = initial.unwrap_or(0);
    for w in writes {
        if let Some(v) = w.version {
            max = max.max(v);
        }
        prefix_max.push(max);
    }
    let upper = |n: usize| -> Option<u64> {
        // n = number of writes invoked before the read returned.
        let Some(last) = n.checked_sub(1).map(|i| writes[i]) else {
            // None yet: the initial version, if known (else the read is not judged).
            return initial.or(Some(u64::MAX));
        };
        if last.version.is_some() {
            return Some(prefix_max[n - 1]);
        }
        writes[n..].iter().find_map(|w| w.version).map(|v| v.saturating_sub(1).max(prefix_max[n - 1]))
    };

    // Reads by return time with the running maximum version (and the read that saw
    // it), for inversions.
    let mut by_return: Vec<&Read<'_>> = kh.reads.iter().collect();
    by_return.sort_unstable_by_key(|r| (r.ev.return_ns, r.version));
    let mut newest: Option<&Read<'_>> = None;
    let max_seen: Vec<&Read<'_>> = by_return
        .iter()
        .map(|&r| {
            let n = match newest {
                Some(n) if n.version >= r.version => n,
                _ => r,
            };
            newest = Some(n);
            n
        })
        .collect();

    let mut violations = 0;
    for r in &kh.reads {
        let inv = r.ev.invoke_ns;
        let stale = completed.newest_before(inv).filter(|&newest| r.version < newest);
        let invoked_before = writes.partition_point(|w| w.invoke_ns < r.ev.return_ns);
        let future = upper(invoked_before).filter(|&u| r.version > u);
        let returned_before = by_return.partition_point(|p| p.ev.return_ns < inv);
        let inversion =
            returned_before.checked_sub(1).map(|i| max_seen[i]).filter(|earlier| r.version < earlier.version);
        if stale.is_none() && future.is_none() && inversion.is_none() {
            continue;
        }
        violations += 1;
        let what = if let Some(newest) = stale {
            format!("v{newest} was completed before it was invoked")
        } else if let Some(u) = future {
            format!("no write newer than v{u} was invoked before it returned")
        } else if let Some(earlier) = inversion {
            // Whether the newer version's write had returned ok says whether the fleet
            // flip-flopped on a completed or on an indeterminate write.
            let write = writes.iter().find(|w| w.version == Some(earlier.version)).map_or(
                "written outside the history",
                |w| {
                    if w.ok { "a completed write" } else { "an indeterminate write" }
                },
            );
            format!(
                "{} read v{} (from {}, {write}) at {} and returned before this read was invoked",
                earlier.ev.process,
                earlier.version,
                earlier.ev.tier.map_or("?", |t| t.as_str()),
                rel(ex.origin, earlier.ev.invoke_ns),
            )
        } else {
            String::new()
        };
        let at = rel(ex.origin, inv);
        ex.add("not linearizable", || {
            format!(
                "{} read key {key} v{} from {} at {at}: {what}",
                r.ev.process,
                r.version,
                r.ev.tier.map_or("?", |t| t.as_str())
            )
        });
    }
    violations
}
