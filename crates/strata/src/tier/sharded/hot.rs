//! Hot-key detection on the L2 read path: a count-min sketch of recent lookups per
//! instance, halved every window so it follows the traffic, and a short list of the
//! keys found hot for stats and metrics.
//!
//! Written here rather than taken from a crate: what is needed is four relaxed atomic
//! increments per lookup on a key hash the router already computed, lock-free; the
//! sketch crates on crates.io hash the key again, take `&mut self`, or allocate.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Rows of the sketch (independent hashes); an estimate is the least of them.
const ROWS: usize = 4;
/// Counters per row. With a window of 10,000 lookups the error of an estimate is at
/// most ~2.7 × window / WIDTH (≈ 13 lookups) with probability 1 − e^−4.
const WIDTH: usize = 2048;
/// How many hot keys [`HotKeys::report`] lists.
const LISTED: usize = 16;

/// A key found hot, with its estimated reads in the current window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey {
    /// The key as the cache passed it to the tier.
    pub key: String,
    /// Estimated L2 lookups of the key in the detector's window (decayed).
    pub reads: u64,
}

/// The detector. A key is hot when its estimated lookups in the window reach
/// `share` of all lookups in it and at least `min_reads`.
pub(super) struct HotKeys {
    counters: Box<[AtomicU32]>,
    total: AtomicU64,
    window: u64,
    share: f64,
    min_reads: u64,
    listed: Mutex<Vec<HotKey>>,
}

impl HotKeys {
    pub(super) fn new(window: u64, share: f64, min_reads: u64) -> Self {
        HotKeys {
            counters: (0..ROWS * WIDTH).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU64::new(0),
            window: window.max(1),
            share,
            min_reads,
            listed: Mutex::new(Vec::new()),
        }
    }

    /// Counts one lookup of `key` (whose hash is `h`) and says whether it is hot.
    pub(super) fn observe(&self, h: u64, key: &str) -> bool {
        let mut estimate = u32::MAX;
        for row in 0..ROWS {
            let c = &self.counters[row * WIDTH + slot(h, row)];
            estimate = estimate.min(c.fetch_add(1, Ordering::Relaxed).saturating_add(1));
        }
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total >= self.window * 2
            && self.total.compare_exchange(total, total / 2, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            // One caller halves: counts then weigh the last window about as much as
            // everything before it, so a key that cooled down stops being hot.
            for c in self.counters.iter() {
                let v = c.load(Ordering::Relaxed);
                c.store(v / 2, Ordering::Relaxed);
            }
            self.listed.lock().retain_mut(|k| {
                k.reads /= 2;
                k.reads > 0
            });
        }
        let reads = u64::from(estimate);
        let hot = reads >= self.min_reads && reads as f64 >= self.share * total.min(self.window * 2) as f64;
        // The list is refreshed now and then, not on every hot read: it takes a lock.
        if hot && (reads == self.min_reads || reads % 64 == 0) {
            self.list(key, reads);
        }
        hot
    }

    fn list(&self, key: &str, reads: u64) {
        let mut listed = self.listed.lock();
        if let Some(k) = listed.iter_mut().find(|k| k.key == key) {
            k.reads = reads;
        } else if listed.len() < LISTED {
            listed.push(HotKey { key: key.to_owned(), reads });
        } else if let Some(coolest) = listed.iter_mut().min_by_key(|k| k.reads)
            && coolest.reads < reads
        {
            *coolest = HotKey { key: key.to_owned(), reads };
        }
        metrics::gauge!("strata_hot_keys").set(listed.len() as f64);
    }

    /// The keys found hot lately, hottest first.
    pub(super) fn report(&self) -> Vec<HotKey> {
        let mut listed = self.listed.lock().clone();
        listed.sort_by(|a, b| b.reads.cmp(&a.reads).then_with(|| a.key.cmp(&b.key)));
        listed
    }
}

/// The counter of row `row` for hash `h`: each row takes its own 16 bits of a
/// re-mixed hash, so rows are independent.
fn slot(h: u64, row: usize) -> usize {
    let mixed = h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(16 * row as u32);
    (mixed >> 48) as usize % WIDTH
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::sharded::route::hash;

    #[test]
    fn a_key_taking_a_third_of_reads_is_hot_and_the_rest_are_not() {
        let hot = HotKeys::new(10_000, 0.01, 64);
        let mut found_hot = 0;
        let mut cold_flagged = 0;
        for i in 0..60_000u64 {
            if i % 3 == 0 {
                found_hot += usize::from(hot.observe(hash(b"hot"), "hot"));
            } else {
                let k = format!("k{}", i % 5_000);
                cold_flagged += usize::from(hot.observe(hash(k.as_bytes()), &k));
            }
        }
        assert!(found_hot > 19_000, "hot key seen hot {found_hot} times of 20,000");
        assert_eq!(cold_flagged, 0, "keys at 0.02 % of reads were taken for hot");
        assert_eq!(hot.report().first().map(|k| k.key.as_str()), Some("hot"));
    }

    #[test]
    fn a_key_that_cools_down_stops_being_hot() {
        let hot = HotKeys::new(1_000, 0.05, 16);
        for _ in 0..1_000 {
            hot.observe(hash(b"was-hot"), "was-hot");
        }
        assert!(hot.observe(hash(b"was-hot"), "was-hot"));
        for i in 0..20_000u64 {
            let k = format!("k{}", i % 2_000);
            hot.observe(hash(k.as_bytes()), &k);
        }
        assert!(!hot.observe(hash(b"was-hot"), "was-hot"));
    }
}
