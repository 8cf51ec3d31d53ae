//! Where a namespace's queue lives: its keys split into groups, each group's keys
//! under one hash tag (one slot), and the group of each key.

use crate::tier::cluster_shard_namespace;
use crate::tier::format::NsKeys;

/// The groups of one queue and their key names.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    prefix: String,
    groups: usize,
}

/// The four keys a script takes per group: counters, schedule, dirty index, dead
/// letters (records and the dead-letter stream are derived from the first).
pub(crate) type GroupKeys = [String; 4];

impl Layout {
    pub(crate) fn new(prefix: &str, groups: usize) -> Self {
        Layout { prefix: prefix.to_owned(), groups: groups.max(1) }
    }

    pub(crate) fn groups(&self) -> usize {
        self.groups
    }

    /// The group of `key`: FNV-1a (64 bits) of its bytes modulo the group count, the
    /// same in every process and release (a key must always be found in one group).
    pub(crate) fn group_of(&self, key: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // The remainder is below `groups`, a usize.
        usize::try_from(h % self.groups as u64).unwrap_or(0)
    }

    /// `<prefix>:{<tag>}:q:`, the start of every key of group `g` of `ns`. The tag is
    /// [`cluster_shard_namespace`] of `wb:<ns>` (percent-encoded like a tier
    /// namespace): group `g` of `G` lands in the `g`-th `G`-th of the hash slots, so on a
    /// Cluster the groups spread over the masters in proportion to the slots each
    /// serves. The `q:` after the tag keeps the queue's names apart from a tier's, even
    /// under a tag they might share.
    pub(crate) fn base(&self, ns: &str, g: usize) -> String {
        let tag = cluster_shard_namespace(&format!("wb:{ns}"), g, self.groups);
        format!("{}q:", NsKeys::new(&self.prefix, &tag).base())
    }

    pub(crate) fn keys(&self, ns: &str, g: usize) -> GroupKeys {
        let base = self.base(ns, g);
        ["c", "s", "d", "x"].map(|suffix| format!("{base}{suffix}"))
    }

    /// The record of `key` (for tools and tests).
    pub(crate) fn record(&self, ns: &str, key: &str) -> String {
        format!("{}r:{key}", self.base(ns, self.group_of(key)))
    }

    /// Every group's keys, starting at group `first` and wrapping around.
    pub(crate) fn all_from(&self, ns: &str, first: usize) -> Vec<GroupKeys> {
        (0..self.groups).map(|i| self.keys(ns, (first + i) % self.groups)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_stable_and_spread() {
        let l = Layout::new("p", 16);
        assert_eq!(l.group_of("k"), l.group_of("k"));
        let used: std::collections::HashSet<usize> = (0..200).map(|i| l.group_of(&format!("k{i}"))).collect();
        assert_eq!(used.len(), 16);
        let keys = l.keys("a:b", 3);
        assert!(keys[0].starts_with("p:{wb%3Aa%3Ab~") && keys[0].ends_with("}:q:c"), "{keys:?}");
        let slot = crate::key_slot(keys[0].as_bytes());
        assert!(keys.iter().all(|k| crate::key_slot(k.as_bytes()) == slot));
        assert_eq!(usize::from(slot) * 16 / 16384, 3, "group 3 of 16 in the 4th sixteenth of the slots");
    }
}
