//! The linearizability part of the checker (the Strong level's promise): stale reads
//! and reads of unwritten versions are judged by the caller; new-old inversions here.

use super::{Examples, Fate, KeyHistory, Read, rel};

/// Counts the reads of one key that violate linearizability, each once. `judged[i]`
/// says why the caller already found read `i` wrong (stale, or of an unwritten
/// version), if it did.
pub(super) fn violations(key: u64, kh: &KeyHistory<'_>, judged: &[Option<String>], ex: &mut Examples) -> u64 {
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
    for (r, why) in kh.reads.iter().zip(judged) {
        let inv = r.ev.invoke_ns;
        // Strictly before: a read that returned at the very nanosecond this one was
        // invoked is concurrent with it.
        let returned_before = by_return.partition_point(|p| p.ev.return_ns < inv);
        let inversion =
            returned_before.checked_sub(1).map(|i| max_seen[i]).filter(|earlier| r.version < earlier.version);
        let what = match (why, inversion) {
            (Some(why), _) => why.clone(),
            (None, Some(earlier)) => {
                // Whether the newer version's write had committed says whether the
                // fleet flip-flopped on a committed or on an indeterminate write.
                let write = kh.writes.iter().find(|w| w.ev.version == Some(earlier.version)).map_or(
                    "written outside the history",
                    |w| {
                        if matches!(w.fate, Fate::Committed(_)) {
                            "a committed write"
                        } else {
                            "an indeterminate write"
                        }
                    },
                );
                format!(
                    "{} read v{} (from {}, {write}) at {} and returned before this read was invoked",
                    earlier.ev.process,
                    earlier.version,
                    earlier.ev.tier.map_or("?", |t| t.as_str()),
                    rel(ex.origin, earlier.ev.invoke_ns),
                )
            }
            (None, None) => continue,
        };
        violations += 1;
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
