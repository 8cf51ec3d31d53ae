//! Which keys this instance reads most: a sampled, bounded count per key, reported to
//! the tier's shared ranking so that a starting instance can preload the fleet's hot
//! keys (warm-up).

use std::cell::Cell;
use std::collections::HashMap;

use parking_lot::Mutex;

thread_local! {
    // Per thread, so that deciding not to sample costs one thread-local increment.
    static TICK: Cell<u32> = const { Cell::new(0) };
}

/// Read counts of a sample of the reads (one in `every`).
pub(crate) struct HotKeys {
    /// `every - 1`, with `every` a power of two.
    mask: u32,
    counts: Mutex<HashMap<String, u64>>,
    /// At most this many distinct keys are counted between two reports; past it the
    /// keys seen once are dropped (a hot key is seen again soon).
    bound: usize,
}

impl HotKeys {
    /// Samples one read in `every` (a power of two), counting at most `bound` keys.
    pub(crate) fn new(every: u32, bound: usize) -> Self {
        HotKeys { mask: every.max(1).next_power_of_two() - 1, counts: Mutex::new(HashMap::new()), bound }
    }

    /// Whether this read is one of the sample.
    #[inline]
    pub(crate) fn sampled(&self) -> bool {
        TICK.with(|t| {
            let n = t.get().wrapping_add(1);
            t.set(n);
            n & self.mask == 0
        })
    }

    /// Counts one sampled read of `key`.
    pub(crate) fn record(&self, key: String) {
        let mut counts = self.counts.lock();
        *counts.entry(key).or_default() += 1;
        if counts.len() > self.bound {
            counts.retain(|_, n| *n > 1);
            if counts.len() > self.bound / 2 {
                // Still crowded: halve every count, so a long run cannot pin old keys.
                counts.retain(|_, n| {
                    *n /= 2;
                    *n > 0
                });
            }
        }
    }

    /// The `n` most read keys since the last call, with their counts; forgets them all.
    pub(crate) fn take_top(&self, n: usize) -> Vec<(String, u64)> {
        let counts = std::mem::take(&mut *self.counts.lock());
        let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(n);
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_one_in_every_and_ranks_by_count() {
        let hot = HotKeys::new(4, 100);
        let sampled = (0..400).filter(|_| hot.sampled()).count();
        assert_eq!(sampled, 100);
        for _ in 0..5 {
            hot.record("a".into());
        }
        hot.record("b".into());
        for _ in 0..3 {
            hot.record("c".into());
        }
        assert_eq!(hot.take_top(2), vec![("a".to_owned(), 5), ("c".to_owned(), 3)]);
        assert!(hot.take_top(2).is_empty(), "taken");
    }

    #[test]
    fn stays_bounded_under_a_scan() {
        let hot = HotKeys::new(1, 64);
        for _ in 0..10 {
            hot.record("hot".into());
        }
        for i in 0..10_000 {
            hot.record(format!("scan{i}"));
        }
        assert!(hot.counts.lock().len() <= 65);
        assert_eq!(hot.take_top(1)[0].0, "hot");
    }
}
