//! What became of each write (committed, not, or unknown), and which versions the
//! writes could have produced: the parts of the checker that reason about writes
//! alone.

use super::{Fate, Write};
use crate::history::Event;

/// Resolves what became of each write of one key (sorted by invocation).
pub(super) fn resolve<'a>(
    writes: &[&'a Event],
    final_version: Option<u64>,
    step_by_one: bool,
) -> Vec<Write<'a>> {
    writes
        .iter()
        .map(|&ev| {
            let fate = match (ev.ok, ev.version) {
                (true, Some(_)) => Fate::Committed(ev.effective_ns()),
                (_, Some(v)) if step_by_one => {
                    let others = writes.iter().filter(|o| !std::ptr::eq(**o, ev) && o.version == Some(v));
                    let mut claimed = false;
                    let mut claimed_by_committed = false;
                    for o in others {
                        claimed = true;
                        claimed_by_committed |= o.ok;
                    }
                    match final_version {
                        _ if claimed_by_committed => Fate::NotCommitted,
                        Some(end) if end < v => Fate::NotCommitted,
                        Some(_) if !claimed => Fate::Committed(ev.return_ns),
                        _ => Fate::Unknown,
                    }
                }
                _ => Fate::Unknown,
            };
            Write { ev, fate }
        })
        .collect()
}

/// Whether `version` could have been produced by a write of `writes` (sorted by
/// invocation) invoked at or before `returned`, or is the initial version.
pub(super) fn produced(version: u64, initial: Option<u64>, writes: &[Write<'_>], returned: u64) -> bool {
    let known = |w: &Write<'_>| if w.fate == Fate::NotCommitted { None } else { w.ev.version };
    match initial {
        Some(i) if version == i => return true,
        None if writes.iter().filter_map(known).all(|k| version < k) => return true,
        _ => {}
    }
    let invoked = writes.partition_point(|w| w.ev.invoke_ns <= returned);
    let mut below = initial.unwrap_or(0);
    for (i, w) in writes[..invoked].iter().enumerate() {
        match w.ev.version {
            Some(v) if known(w).is_some() => {
                if v == version {
                    return true;
                }
                below = below.max(v);
            }
            Some(_) => {}
            None if w.fate != Fate::NotCommitted => {
                // Any version between the known ones around it.
                let above = writes[i + 1..].iter().find_map(known).unwrap_or(u64::MAX);
                if version > below && version < above {
                    return true;
                }
            }
            None => {}
        }
    }
    false
}
