//! Tag epochs with a bounded memory: the clock value of each tag's last invalidation,
//! for at most a set number of tags, plus a *tag floor* standing in for the ones dropped.
//!
//! Every `invalidate_tag` of a tag never seen before adds an epoch; without a bound, a
//! namespace that tags values by user, tenant or order keeps one per tag for ever (the
//! issue measured 100,000 tags at +15.7 MB in the process). When the map passes its
//! cap, the older half is dropped and the floor rises to the highest epoch dropped. A
//! tagged entry or fill stamped below the floor is invalid, whatever its tags: every
//! entry a dropped epoch `e` invalidated had a stamp below `e`, which is at most the
//! floor, so dropping never makes such an entry valid again. It invalidates some tagged
//! entries that no dropped tag concerned (they load again), which is safe. Untagged
//! entries never look at the floor.
//!
//! Pruning costs O(n) once per `cap / 2` new tags: amortised O(1) per invalidation.
//! The Redis tier applies the same rule inside its Lua scripts (`tf` field of the meta
//! hash).

use std::collections::HashMap;

/// The default bound on tag epochs per namespace (L1 guards and the in-process tier).
pub const DEFAULT_MAX_TAG_EPOCHS: usize = 10_000;

/// The smallest bound accepted: pruning keeps half, so a tiny bound would prune on
/// almost every invalidation.
pub const MIN_MAX_TAG_EPOCHS: usize = 16;

/// Tag → epoch of its last invalidation, bounded; see the module docs.
#[derive(Debug)]
pub(crate) struct TagEpochs {
    epochs: HashMap<String, u64>,
    /// Tagged stamps below this are invalid: the highest epoch pruned so far.
    floor: u64,
    cap: usize,
}

impl TagEpochs {
    /// An empty set holding at most `cap` epochs (raised to [`MIN_MAX_TAG_EPOCHS`]).
    pub(crate) fn new(cap: usize) -> Self {
        TagEpochs { epochs: HashMap::new(), floor: 0, cap: cap.max(MIN_MAX_TAG_EPOCHS) }
    }

    /// Records that `tag` was invalidated at clock value `at`, pruning the older half
    /// when the set passes its cap.
    pub(crate) fn record(&mut self, tag: &str, at: u64) {
        match self.epochs.get_mut(tag) {
            Some(e) => *e = (*e).max(at),
            None => {
                self.epochs.insert(tag.to_owned(), at);
            }
        }
        if self.epochs.len() > self.cap {
            self.prune();
        }
    }

    /// Drops the oldest epochs, keeping the newest `cap / 2`, and raises the floor to
    /// the highest one dropped.
    fn prune(&mut self) {
        let keep = self.cap / 2;
        let drop_n = self.epochs.len().saturating_sub(keep);
        if drop_n == 0 {
            return;
        }
        let mut all: Vec<u64> = self.epochs.values().copied().collect();
        let (_, &mut highest_dropped, _) = all.select_nth_unstable(drop_n - 1);
        // Equal epochs (possible only if a caller records one value twice) are dropped
        // together: more is invalidated, never less.
        self.epochs.retain(|_, e| *e > highest_dropped);
        self.floor = self.floor.max(highest_dropped);
        self.epochs.shrink_to(self.cap);
    }

    /// Whether what was stamped `stamp` with `tags` survived every tag invalidation
    /// recorded (or pruned) so far. Untagged: always.
    #[inline]
    pub(crate) fn valid(&self, stamp: u64, tags: &[String]) -> bool {
        if tags.is_empty() {
            return true;
        }
        stamp >= self.floor && tags.iter().all(|t| self.epochs.get(t).is_none_or(|&e| stamp >= e))
    }

    /// Forgets the epochs at or below `epoch`: a namespace invalidation at `epoch` made
    /// everything stamped below it invalid already. The floor stays (it is at most
    /// `epoch`, so it refuses nothing more than the namespace epoch does).
    pub(crate) fn forget_up_to(&mut self, epoch: u64) {
        self.epochs.retain(|_, e| *e > epoch);
    }

    /// How many epochs are held.
    pub(crate) fn len(&self) -> usize {
        self.epochs.len()
    }

    /// The tag floor (0 until the first prune).
    #[cfg(test)]
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_map_stays_within_its_cap() {
        let mut e = TagEpochs::new(100);
        for i in 0..100_000u64 {
            e.record(&format!("user:{i}"), i + 1);
            assert!(e.len() <= 100);
        }
        assert!(e.len() >= 50, "the newest half is kept: {}", e.len());
        assert!(e.floor() > 99_000, "floor {}", e.floor());
    }

    #[test]
    fn pruning_never_revalidates_what_a_pruned_tag_invalidated() {
        let mut e = TagEpochs::new(MIN_MAX_TAG_EPOCHS);
        let victim = tags(&["victim"]);
        // An entry stamped 5 carrying "victim"; the tag is invalidated at 10.
        e.record("victim", 10);
        assert!(!e.valid(5, &victim));
        for i in 0..(MIN_MAX_TAG_EPOCHS as u64 * 3) {
            e.record(&format!("other:{i}"), 11 + i);
        }
        assert!(e.len() <= MIN_MAX_TAG_EPOCHS);
        assert!(!e.epochs.contains_key("victim"), "the victim's epoch was pruned");
        assert!(!e.valid(5, &victim), "still invalid after its epoch was pruned");
        assert!(!e.valid(9, &tags(&["unrelated"])), "over-invalidation below the floor is allowed");
        assert!(e.valid(5, &[]), "untagged entries never look at the floor");
        assert!(e.valid(10_000, &victim), "a stamp after every invalidation is valid");
    }

    #[test]
    fn re_invalidating_a_tag_keeps_its_newest_epoch_and_namespace_bumps_forget() {
        let mut e = TagEpochs::new(MIN_MAX_TAG_EPOCHS);
        e.record("a", 7);
        e.record("a", 3);
        assert!(!e.valid(6, &tags(&["a"])));
        e.record("b", 9);
        e.forget_up_to(8);
        assert_eq!(e.len(), 1);
        assert!(!e.valid(8, &tags(&["b"])));
    }
}
