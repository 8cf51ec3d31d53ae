//! The consistency checker: a pure function from a [`History`], the database's final
//! contents and the caches' contents at quiescence to a [`Report`].
//!
//! # Definitions
//!
//! Versions are per row and strictly increasing (a version column the database bumps
//! on every change). The rows' versions before the history began are given in
//! [`CheckConfig::initial`]. Intervals are closed: two operations whose intervals
//! touch (one returns at the very nanosecond the other is invoked) are concurrent.
//! For a key:
//!
//! * A write is **committed** when its `COMMIT` succeeded (`ok`), whatever became of
//!   its invalidation: it takes effect at its `commit_ns` (when the database
//!   acknowledged the `COMMIT`), or at its `return_ns` when that was not recorded. An
//!   invalidation that failed and was buffered does not excuse the cache; the level's
//!   bound runs from the commit. A write that returned `ok: false` is
//!   **indeterminate** (its `COMMIT`'s outcome is unknown). With
//!   [`CheckConfig::versions_step_by_one`] the checker resolves it from the versions:
//!   if another committed write produced the same version, or the database ends below
//!   it, it did not commit; if no other write claims its version and the database
//!   reached it, it committed (taking effect by its `return_ns`). What stays
//!   unresolved is counted as **unjudged** (`indeterminate_writes`): reads may or may
//!   not see it. A write recorded as **rolled back** ([`Op::WriteRolledBack`])
//!   certainly changed nothing: it is counted and otherwise ignored.
//! * A read is **stale** (`stale_any`) when it returned a version older than that of
//!   a write committed before the read was invoked. This is the one definition of a
//!   stale read strata's documentation uses.
//! * It is **stale beyond the bound** (`stale_beyond_bound`) when that write committed
//!   more than `bound` before the read was invoked: the level promised that such a
//!   write is visible by then.
//! * A read **of an unwritten version** (`unwritten_reads`) returned a version that no
//!   write invoked before the read returned could have produced, and that is not the
//!   key's initial version: a version never written, a rolled-back write's, or a
//!   write's that had not begun. Such a read is wrong at every level, whatever other
//!   writes are in flight. A write of unknown version may have produced any version
//!   between the known ones around it; without a known initial version, every version
//!   below the first known one counts as possibly initial.
//! * The **staleness window** of a committed write W (taking effect at `t`) is the
//!   latest invoke time of a read of its key that returned a version older than W,
//!   minus `t`, or 0 if there is none (or if all such reads were invoked before `t`).
//!   The report gives its p50, p99 and maximum over all committed writes, and the
//!   fraction of writes whose window is at most 1 ms, 10 ms, 100 ms and 1 s
//!   (Polaris-style "consistency within T").
//! * A **permanent inconsistency** is an entry of a cache at quiescence (any instance's
//!   L1, or L2) whose version differs from the database's.
//! * A **lost write** is a committed write whose version is newer than the database's
//!   final version of its key.
//! * **Linearizability** (checked when asked for, i.e. for the Strong level; one writer
//!   per key, strictly increasing versions): a read violates it if it is stale, if it
//!   is a read of an unwritten version, or if it returned a version older than what a
//!   read that returned before it was invoked saw (a new-old inversion). Each violating
//!   read counts once.
//! * A write's **buffered invalidation** is one the writer's cache could not apply at
//!   once (recorded as an [`Op::InvalidationRetried`] event when the retry applied it):
//!   the report counts them and gives the longest time from commit to retry.
//!
//! Failed reads (`ok: false`) and reads without a version are counted but not judged.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{Event, History, Op};

mod linear;
mod writes;

/// How many examples of each kind of finding the report keeps.
const EXAMPLES_PER_KIND: usize = 10;

/// What the checker is asked to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    /// The consistency level's name, copied into the report.
    pub level: String,
    /// The level's documented staleness bound (with its margin): a read invoked this
    /// long after a write committed must see it.
    pub bound: Duration,
    /// Whether to check linearizability (the Strong level's promise).
    pub linearizable: bool,
    /// The rows' versions before the history began (the database as seeded): they
    /// count as written before every event of the history, but not as writes.
    pub initial: BTreeMap<u64, u64>,
    /// Whether every committed write raises its row's version by exactly one (one
    /// writer per key, `version = version + 1`): then an indeterminate write is
    /// resolved from the versions (see the [module documentation](self)).
    pub versions_step_by_one: bool,
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
    /// Committed writes (recorded as committed, or resolved as such), every one
    /// judged from its commit.
    pub writes: u64,
    /// Writes whose `COMMIT` outcome stayed unknown: never judged.
    pub indeterminate_writes: u64,
    /// Indeterminate writes the versions resolved (committed or not).
    #[serde(default)]
    pub resolved_writes: u64,
    /// Writes that certainly changed nothing (rolled back, or refused before COMMIT).
    #[serde(default)]
    pub rolled_back_writes: u64,
    /// Invalidation events recorded on their own.
    pub invalidations: u64,
    /// Committed writes whose invalidation was buffered and applied later by the retry.
    #[serde(default)]
    pub buffered_invalidations: u64,
    /// The longest time from such a write's commit to its buffered invalidation's
    /// application, in milliseconds.
    #[serde(default)]
    pub buffered_invalidation_max_ms: f64,
    /// History lines that could not be parsed (skipped).
    pub malformed_lines: u64,
    /// Reads older than a write committed more than the bound before they were invoked.
    pub stale_beyond_bound: u64,
    /// Reads older than a write committed before they were invoked.
    pub stale_any: u64,
    /// How long before the stalest read was invoked a newer version had committed, in
    /// milliseconds (0 without stale reads).
    #[serde(default)]
    pub stale_read_max_ms: f64,
    /// Reads of a version no write could have produced by the time they returned.
    #[serde(default)]
    pub unwritten_reads: u64,
    /// Median per-write staleness window, in milliseconds.
    pub staleness_p50_ms: f64,
    /// 99th percentile of the per-write staleness window, in milliseconds.
    pub staleness_p99_ms: f64,
    /// Largest per-write staleness window, in milliseconds.
    pub staleness_max_ms: f64,
    /// Fraction of committed writes whose staleness window is at most 1 ms.
    pub consistent_within_1ms: f64,
    /// Fraction of committed writes whose staleness window is at most 10 ms.
    pub consistent_within_10ms: f64,
    /// Fraction of committed writes whose staleness window is at most 100 ms.
    pub consistent_within_100ms: f64,
    /// Fraction of committed writes whose staleness window is at most 1 s.
    pub consistent_within_1s: f64,
    /// Cached entries at quiescence that differ from the database.
    pub permanent_inconsistencies: u64,
    /// Committed writes newer than the database's final version of their key.
    pub lost_writes: u64,
    /// Reads that violate linearizability; `None` when it was not checked.
    pub linearizability_violations: Option<u64>,
    /// True when nothing the level promises was violated: no stale read beyond the
    /// bound, no read of an unwritten version, no permanent inconsistency, no lost
    /// write, and (when checked) no linearizability violation.
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

/// What became of a write, once resolved.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    /// Committed, taking effect at this time.
    Committed(u64),
    /// Certainly not committed.
    NotCommitted,
    /// Unknown.
    Unknown,
}

/// A write of a key with its fate.
#[derive(Clone, Copy)]
struct Write<'a> {
    ev: &'a Event,
    fate: Fate,
}

/// Per-key view of the history.
#[derive(Default)]
struct KeyHistory<'a> {
    reads: Vec<Read<'a>>,
    /// Every write, sorted by invocation.
    writes: Vec<Write<'a>>,
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

    /// A time relative to the start of the history.
    fn at(&self, ns: u64) -> String {
        rel(self.origin, ns)
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

/// Committed writes of one key sorted by the time they took effect, with the running
/// maximum of their versions: answers "the newest write committed before t".
struct Committed {
    at: Vec<u64>,
    max_version: Vec<u64>,
}

impl Committed {
    fn new(initial: Option<u64>, writes: &[Write<'_>]) -> Self {
        let mut done: Vec<(u64, u64)> = writes
            .iter()
            .filter_map(|w| match (w.fate, w.ev.version) {
                (Fate::Committed(t), Some(v)) => Some((t, v)),
                _ => None,
            })
            .collect();
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
        Committed { at: done.iter().map(|&(t, _)| t).collect(), max_version }
    }

    /// The newest version among writes committed strictly before `t` (the initial
    /// version counts as committed at 0).
    fn newest_before(&self, t: u64) -> Option<u64> {
        let n = self.at.partition_point(|&c| c < t);
        n.checked_sub(1).map(|i| self.max_version[i])
    }

    /// When the write of version `v` (or the first newer one) took effect.
    fn time_of(&self, v: u64) -> Option<u64> {
        let i = self.max_version.partition_point(|&m| m < v);
        self.at.get(i).copied()
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
    let mut report = Report {
        level: config.level.clone(),
        bound_ms: ms(bound_ns),
        malformed_lines: history.malformed as u64,
        ..Report::default()
    };

    let mut reads: BTreeMap<u64, Vec<Read<'_>>> = BTreeMap::new();
    let mut writes: BTreeMap<u64, Vec<&Event>> = BTreeMap::new();
    let mut faults: Vec<&Event> = Vec::new();
    let mut retry_max = 0;
    for ev in &history.events {
        match ev.op {
            Op::Read => match (ev.ok, ev.version) {
                (true, Some(version)) => {
                    report.reads += 1;
                    let tier = ev.tier.map_or("unknown", |t| t.as_str());
                    *report.reads_by_tier.entry(tier.to_owned()).or_insert(0) += 1;
                    reads.entry(ev.key).or_default().push(Read { ev, version });
                }
                _ => report.failed_reads += 1,
            },
            Op::Write => writes.entry(ev.key).or_default().push(ev),
            Op::WriteRolledBack => report.rolled_back_writes += 1,
            Op::InvalidationApplied => report.invalidations += 1,
            Op::InvalidationRetried => {
                report.buffered_invalidations += 1;
                retry_max = retry_max.max(ev.return_ns.saturating_sub(ev.invoke_ns));
            }
            Op::Fault => faults.push(ev),
        }
    }
    report.buffered_invalidation_max_ms = ms(retry_max);
    faults.sort_by_key(|e| e.invoke_ns);
    report.faults = faults
        .iter()
        .map(|f| {
            format!(
                "{} at {} for {:.1}s",
                f.detail,
                ex.at(f.invoke_ns),
                ms(f.return_ns.saturating_sub(f.invoke_ns)) / 1e3
            )
        })
        .collect();

    let mut keys: BTreeMap<u64, KeyHistory<'_>> = BTreeMap::new();
    for key in reads.keys().chain(writes.keys()) {
        keys.entry(*key).or_default();
    }
    for (&key, kh) in &mut keys {
        kh.reads = reads.remove(&key).unwrap_or_default();
        let mut ws = writes.remove(&key).unwrap_or_default();
        ws.sort_by_key(|w| (w.invoke_ns, w.return_ns));
        kh.writes = writes::resolve(&ws, end.database.get(&key).copied(), config.versions_step_by_one);
        for w in &kh.writes {
            let recorded = w.ev.ok && w.ev.version.is_some();
            match w.fate {
                Fate::Committed(_) => report.writes += 1,
                Fate::NotCommitted => report.rolled_back_writes += 1,
                Fate::Unknown => report.indeterminate_writes += 1,
            }
            if !recorded && w.fate != Fate::Unknown {
                report.resolved_writes += 1;
            }
        }
    }

    let mut windows: Vec<u64> = Vec::new();
    let mut linearizability = 0u64;
    for (&key, kh) in &keys {
        let initial = config.initial.get(&key).copied();
        let committed = Committed::new(initial, &kh.writes);
        let mut judged = Vec::with_capacity(kh.reads.len());
        for r in &kh.reads {
            let stale = judge_read(key, r, &committed, bound_ns, &mut report, &mut ex);
            let unwritten = !writes::produced(r.version, initial, &kh.writes, r.ev.return_ns);
            if unwritten {
                report.unwritten_reads += 1;
                let at = ex.at(r.ev.invoke_ns);
                ex.add("unwritten version", || {
                    format!(
                        "{} read key {key} v{} from {} at {at}: no write invoked before it returned produced it",
                        r.ev.process,
                        r.version,
                        r.ev.tier.map_or("?", |t| t.as_str()),
                    )
                });
            }
            judged.push(match (stale, unwritten) {
                (Some(newest), _) => Some(format!("v{newest} was committed before it was invoked")),
                (None, true) => Some(format!("no write invoked before it returned produced v{}", r.version)),
                (None, false) => None,
            });
        }
        windows.extend(staleness_windows(kh));
        if config.linearizable {
            linearizability += linear::violations(key, kh, &judged, &mut ex);
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

    quiescence(end, &keys, &mut report, &mut ex);

    report.passed = report.stale_beyond_bound == 0
        && report.unwritten_reads == 0
        && report.permanent_inconsistencies == 0
        && report.lost_writes == 0
        && report.linearizability_violations.is_none_or(|n| n == 0);
    report.examples = ex.lines;
    report
}

/// Counts a read stale at zero slack and beyond the bound; returns the newest version
/// committed before it was invoked when it is older than that.
fn judge_read(
    key: u64,
    r: &Read<'_>,
    committed: &Committed,
    bound_ns: u64,
    report: &mut Report,
    ex: &mut Examples,
) -> Option<u64> {
    let newest = committed.newest_before(r.ev.invoke_ns).filter(|&n| r.version < n)?;
    report.stale_any += 1;
    let tier = r.ev.tier.map_or("?", |t| t.as_str());
    let read_at = ex.at(r.ev.invoke_ns);
    ex.add("stale read", || {
        format!(
            "{} read key {key} v{} from {tier} at {read_at}, v{newest} was committed before",
            r.ev.process, r.version
        )
    });
    // How long before the read the first newer version committed: the read's staleness.
    let since = committed.time_of(r.version.saturating_add(1)).unwrap_or(r.ev.invoke_ns);
    let age = r.ev.invoke_ns.saturating_sub(since);
    report.stale_read_max_ms = report.stale_read_max_ms.max(ms(age));
    if committed.newest_before(r.ev.invoke_ns.saturating_sub(bound_ns)).is_some_and(|n| r.version < n) {
        report.stale_beyond_bound += 1;
        let written = ex.at(since);
        ex.add("stale beyond bound", || {
            format!(
                "{} read key {key} v{} from {tier} at {read_at}, a newer version was committed at {written} ({:.3} s before)",
                r.ev.process,
                r.version,
                age as f64 / 1e9
            )
        });
    }
    Some(newest)
}

/// Per committed write of one key: the latest invocation of a read that returned an
/// older version, minus the time the write took effect (0 if none later).
fn staleness_windows(kh: &KeyHistory<'_>) -> Vec<u64> {
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
    kh.writes
        .iter()
        .filter_map(|w| match (w.fate, w.ev.version) {
            (Fate::Committed(t), Some(v)) => {
                let older = by_version.partition_point(|&(rv, _)| rv < v);
                Some(older.checked_sub(1).map_or(0, |i| latest_invoke[i].saturating_sub(t)))
            }
            _ => None,
        })
        .collect()
}

/// Quiescence: caches against the database, committed writes against the database.
fn quiescence(
    end: &Quiescence,
    keys: &BTreeMap<u64, KeyHistory<'_>>,
    report: &mut Report,
    ex: &mut Examples,
) {
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
    for (&key, kh) in keys {
        for w in &kh.writes {
            let (Fate::Committed(t), Some(v)) = (w.fate, w.ev.version) else { continue };
            let db = end.database.get(&key).copied();
            if db.is_none_or(|d| d < v) {
                report.lost_writes += 1;
                let at = ex.at(t);
                ex.add("lost write", || {
                    format!("key {key} v{v} committed at {at}, the database ends at {db:?}")
                });
            }
        }
    }
}
