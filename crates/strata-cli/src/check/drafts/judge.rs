//! Judges a drafts run: the merged history, the table after the drain, and the dead
//! letters.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use super::worker::Op;

/// What the drafts check found.
#[derive(Debug, Default, Serialize)]
pub struct DraftsVerdict {
    /// Saves acknowledged to a client.
    pub acknowledged_saves: u64,
    /// Saves that failed (not acknowledged: the client knows to retry).
    pub failed_saves: u64,
    /// Reads, and reads that failed.
    pub reads: u64,
    /// Reads that failed.
    pub failed_reads: u64,
    /// Drafts whose row, after the drain, is older than their last acknowledged save
    /// (the poison draft excepted: it is meant for the dead letters).
    pub lost_saves: u64,
    /// Up to 10 of them: (draft, last acknowledged revision, revision in the table).
    pub lost_examples: Vec<(i64, u64, u64)>,
    /// Drafts whose row holds a revision no save produced.
    pub unknown_rows: u64,
    /// Reads that returned an older revision than a save of the same draft acknowledged
    /// more than the level's bound before the read was invoked.
    pub read_your_writes_violations: u64,
    /// Reads older than a save acknowledged before they were invoked at all (zero
    /// slack; informative at the Invalidated level, whose bound allows propagation).
    pub read_your_writes_zero_slack: u64,
    /// Reads older than a save acknowledged before the queue's Redis was killed at a
    /// durability level that does not survive it (`acknowledged`), invoked after the
    /// kill: the level's documented loss, made visible (not counted as violations).
    pub read_your_writes_after_queue_loss: u64,
    /// Drafts whose row equals their last acknowledged save (or a later attempted one).
    pub rows_matching: u64,
    /// Drafts with at least one acknowledged save.
    pub drafts_saved: u64,
    /// The dead letters at the end: (draft, attempts, error).
    pub dead_letters: Vec<(String, u32, String)>,
    /// Whether the poison draft is among them.
    pub poison_dead_lettered: bool,
    /// Dead letters other than the poison draft.
    pub unexpected_dead_letters: u64,
    /// Keys still waiting in the queue after the drain (dead letters excluded).
    pub left_pending: u64,
    /// The longest time a save was seen waiting (the queue's oldest save, sampled).
    pub longest_pending_ms: u64,
    /// The commonest errors of failed operations: (operation, error, count).
    pub top_errors: Vec<(String, String, u64)>,
}

/// Judges `ops` against `rows` (draft → revision in the table).
/// `losses` are the times (CLOCK_MONOTONIC ns) the queue may have lost what it held.
pub fn judge(
    ops: &[Op],
    rows: &HashMap<i64, u64>,
    poison: i64,
    bound: Duration,
    losses: &[u64],
) -> DraftsVerdict {
    let bound_ns = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
    let mut v = DraftsVerdict::default();
    // Per draft: acknowledged saves as (returned at, revision), sorted by return.
    let mut acked: BTreeMap<i64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut attempted: HashMap<i64, Vec<u64>> = HashMap::new();
    for op in ops.iter().filter(|o| o.op == "save") {
        attempted.entry(op.k).or_default().push(op.rev);
        if op.ok {
            v.acknowledged_saves += 1;
            acked.entry(op.k).or_default().push((op.d, op.rev));
        } else {
            v.failed_saves += 1;
        }
    }
    let mut errors: HashMap<(String, String), u64> = HashMap::new();
    for op in ops.iter().filter(|o| !o.ok) {
        let e = op.e.as_deref().unwrap_or("?");
        // Errors differ by their numbers (durations, counts): group by the words.
        let shape: String = e.chars().filter(|c| !c.is_ascii_digit()).take(160).collect();
        *errors.entry((op.op.clone(), shape)).or_default() += 1;
    }
    let mut errors: Vec<_> = errors.into_iter().map(|((op, e), n)| (op, e, n)).collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.2));
    errors.truncate(5);
    v.top_errors = errors;
    for saves in acked.values_mut() {
        saves.sort_unstable();
    }
    // The highest revision acknowledged by time t, per draft: a running maximum.
    let running: HashMap<i64, Vec<(u64, u64)>> = acked
        .iter()
        .map(|(k, saves)| {
            let mut best = 0;
            (
                *k,
                saves
                    .iter()
                    .map(|&(d, rev)| {
                        best = best.max(rev);
                        (d, best)
                    })
                    .collect(),
            )
        })
        .collect();
    for op in ops.iter().filter(|o| o.op == "read") {
        v.reads += 1;
        if !op.ok {
            v.failed_reads += 1;
            continue;
        }
        let Some(saves) = running.get(&op.k) else { continue };
        // Saves that returned strictly before the read was invoked (minus the bound).
        let n = saves.partition_point(|&(d, _)| d < op.i);
        if n > 0 && op.rev < saves[n - 1].1 {
            v.read_your_writes_zero_slack += 1;
        }
        let n = saves.partition_point(|&(d, _)| d.saturating_add(bound_ns) < op.i);
        if n > 0 && op.rev < saves[n - 1].1 {
            // The newest save the read had to see: acknowledged before a loss the level
            // allows, the read after it?
            let must = saves[n - 1].1;
            let acked_at =
                acked.get(&op.k).and_then(|s| s.iter().find(|&&(_, rev)| rev == must)).map(|&(d, _)| d);
            let lost_by_level = acked_at.is_some_and(|d| losses.iter().any(|&t| d < t && t <= op.i));
            if lost_by_level {
                v.read_your_writes_after_queue_loss += 1;
            } else {
                v.read_your_writes_violations += 1;
            }
        }
    }
    for (k, saves) in &running {
        let Some(&(_, last)) = saves.last() else { continue };
        v.drafts_saved += 1;
        if *k == poison {
            continue;
        }
        let row = rows.get(k).copied().unwrap_or(0);
        if row >= last {
            if attempted.get(k).is_some_and(|revs| revs.contains(&row)) {
                v.rows_matching += 1;
            } else {
                v.unknown_rows += 1;
            }
        } else {
            v.lost_saves += 1;
            if v.lost_examples.len() < 10 {
                v.lost_examples.push((*k, last, row));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: &str, k: i64, rev: u64, i: u64, d: u64, ok: bool) -> Op {
        Op { p: "w".into(), op: op.into(), k, rev, i, d, ok, e: None }
    }

    #[test]
    fn lost_saves_and_stale_reads_are_found_and_concurrent_ones_excused() {
        let ops = vec![
            op("save", 2, 10, 10, 20, true),
            op("save", 2, 30, 30, 40, true),
            op("save", 3, 50, 50, 60, true),
            op("save", 4, 70, 70, 80, false),
            // Invoked before the second save returned: may see either.
            op("read", 2, 10, 35, 45, true),
            // Invoked after it: must see 30.
            op("read", 2, 10, 41, 50, true),
            op("read", 2, 30, 42, 50, true),
        ];
        let rows: HashMap<i64, u64> = [(2, 30), (3, 0)].into_iter().collect();
        let v = judge(&ops, &rows, 1, Duration::ZERO, &[]);
        assert_eq!(v.read_your_writes_violations, 1);
        assert_eq!((v.lost_saves, v.lost_examples.clone()), (1, vec![(3, 50, 0)]));
        assert_eq!((v.rows_matching, v.acknowledged_saves, v.failed_saves), (1, 3, 1));
    }
}
