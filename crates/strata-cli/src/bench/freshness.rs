//! Stale-read accounting.
//!
//! A write *completes* when its DB commit returned and the strategy's invalidation
//! returned; from then on, every read that *starts* must return that version or a newer
//! one. The ledger keeps, per key, the highest completed version (one atomic, read at
//! the start of every read) and the completion time of each version (looked at only for
//! stale reads, to tell how old the staleness was).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Per-key completed versions.
pub struct Ledger {
    /// The highest version whose write completed, per key (0: only the seeded one).
    completed: Vec<AtomicU64>,
    /// (version, completion time) of every completed write, per written key.
    history: Mutex<HashMap<u64, Vec<(u64, Instant)>>>,
}

/// What a read has to beat, taken when the read starts.
#[derive(Debug, Clone, Copy)]
pub struct ReadStart {
    key: u64,
    at: Instant,
    required: u64,
}

/// A stale read: how long the newer version had been complete when the read started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// Time between the completion of the oldest version newer than the one returned and
    /// the start of the read.
    pub age: Duration,
}

impl Ledger {
    /// A ledger for keys `0..keys`, all at their seeded version.
    pub fn new(keys: u64) -> Ledger {
        Ledger {
            completed: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            history: Mutex::new(HashMap::new()),
        }
    }

    /// Records that the write producing `version` of `key` completed at `at`.
    pub fn complete(&self, key: u64, version: u64, at: Instant) {
        self.history.lock().entry(key).or_default().push((version, at));
        if let Some(slot) = self.completed.get(key as usize) {
            // Concurrent writes of one key may complete out of version order.
            slot.fetch_max(version, Ordering::SeqCst);
        }
    }

    /// Call when a read starts (before it runs): captures what it must return at least.
    pub fn start(&self, key: u64, at: Instant) -> ReadStart {
        let required = self.completed.get(key as usize).map_or(0, |s| s.load(Ordering::SeqCst));
        ReadStart { key, at, required }
    }

    /// Call with the version the read returned: `Some` when it was stale.
    pub fn check(&self, start: ReadStart, returned: u64) -> Option<Stale> {
        if returned >= start.required {
            return None;
        }
        let history = self.history.lock();
        let since = history
            .get(&start.key)
            .into_iter()
            .flatten()
            .filter(|(v, at)| *v > returned && *at <= start.at)
            .map(|(_, at)| *at)
            .min()
            .unwrap_or(start.at);
        Some(Stale { age: start.at.saturating_duration_since(since) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_older_than_a_completed_write_are_stale() {
        let ledger = Ledger::new(4);
        let t0 = Instant::now();
        let ms = Duration::from_millis;

        // Nothing written yet: the seeded version 1 is fresh.
        assert_eq!(ledger.check(ledger.start(2, t0), 1), None);

        // A read that started before the write completed may return either version.
        let early = ledger.start(2, t0 + ms(5));
        ledger.complete(2, 2, t0 + ms(10));
        assert_eq!(ledger.check(early, 1), None);
        assert_eq!(ledger.check(early, 2), None);
        // One that started after must see version 2.
        let late = ledger.start(2, t0 + ms(30));
        assert_eq!(ledger.check(late, 2), None);
        assert_eq!(ledger.check(late, 3), None, "a newer, still completing write is fine");
        assert_eq!(ledger.check(late, 1), Some(Stale { age: ms(20) }));

        // Two more writes: returning version 2 is stale since version 3 completed.
        ledger.complete(2, 3, t0 + ms(40));
        ledger.complete(2, 4, t0 + ms(50));
        let read = ledger.start(2, t0 + ms(100));
        assert_eq!(ledger.check(read, 2), Some(Stale { age: ms(60) }));
        assert_eq!(ledger.check(read, 1), Some(Stale { age: ms(90) }));
        assert_eq!(ledger.check(read, 4), None);

        // Other keys are unaffected.
        assert_eq!(ledger.check(ledger.start(1, t0 + ms(100)), 1), None);
    }

    #[test]
    fn out_of_order_completions_keep_the_highest_version() {
        let ledger = Ledger::new(1);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        ledger.complete(0, 3, t0 + ms(1));
        ledger.complete(0, 2, t0 + ms(2));
        let read = ledger.start(0, t0 + ms(10));
        assert_eq!(ledger.check(read, 2), Some(Stale { age: ms(9) }));
        assert_eq!(ledger.check(read, 1), Some(Stale { age: ms(9) }));
        assert_eq!(ledger.check(read, 3), None);
    }
}
