//! Where a key lives: rendezvous (highest random weight) hashing over named shards,
//! and the shard tag carried in the stamps the sharded tier hands out.
//!
//! Rendezvous hashing rather than a ring of points or jump hashing: every process
//! computes the same order of shards for a key from the shards' names alone (not their
//! position in a list), removing a shard moves only its own keys, and the order gives
//! the next shards for free (hot-key copies and the gutter). A key scores every shard,
//! which costs one multiply-xorshift per shard: ~1 ns each, nothing beside a network
//! round trip even at 1,024 virtual shards.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, ErrorKind, Result};

/// The most shards a sharded tier may have: a shard's index plus one is carried in the
/// top [`SHARD_BITS`] bits of a stamp.
pub(super) const MAX_SHARDS: usize = (1 << SHARD_BITS) - 1;

/// Bits of a stamp that carry the shard. Tier clocks stay below 2^53 (the Redis tier
/// keeps them in Lua numbers, exact to 2^53; they start near the server's time in
/// microseconds, ~2^51 in 2026, and tick once per invalidation).
const SHARD_BITS: u32 = 11;
const STAMP_BITS: u32 = 64 - SHARD_BITS;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;

/// The hash of a key or a shard name: xxh3, the same in every process and release.
pub(super) fn hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// A key's score on a shard: a strong 64-bit mix (splitmix64's finaliser) of the two
/// hashes, so scores of one key on different shards are independent.
fn score(key: u64, shard_seed: u64) -> u64 {
    let mut z = key ^ shard_seed.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first `k` shards of the key's rendezvous order (highest score first); `seeds`
/// holds the hash of each shard's name. Ties (astronomically rare) go to the lower
/// index, so every process agrees.
pub(super) fn candidates(key: u64, seeds: &[u64], k: usize) -> Vec<usize> {
    let k = k.min(seeds.len());
    let mut best: Vec<(u64, usize)> = Vec::with_capacity(k + 1);
    for (i, &seed) in seeds.iter().enumerate() {
        let s = score(key, seed);
        if best.len() == k && best.last().is_some_and(|&(low, _)| s <= low) {
            continue;
        }
        let at = best.iter().position(|&(b, _)| s > b).unwrap_or(best.len());
        best.insert(at, (s, i));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Where keys live among named shards: the placement a [`ShardedTier`](super::ShardedTier)
/// uses, for code that must agree with it (a plain client of the same servers, a tool
/// that reports where a key is).
#[derive(Debug, Clone)]
pub struct Placement {
    seeds: Vec<u64>,
}

impl Placement {
    /// The placement over shards with these names (order does not matter for where a
    /// key goes, only for the index returned).
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        Placement { seeds: names.iter().map(|n| hash(n.as_ref().as_bytes())).collect() }
    }

    /// The index of the shard `key` lives on.
    pub fn shard_of(&self, key: &str) -> usize {
        self.candidates(key, 1).first().copied().unwrap_or(0)
    }

    /// The first `k` shards of `key`'s order: where it lives, then where its copies and
    /// its gutter go.
    pub fn candidates(&self, key: &str, k: usize) -> Vec<usize> {
        candidates(hash(key.as_bytes()), &self.seeds, k)
    }

    pub(super) fn candidates_of_hash(&self, h: u64, k: usize) -> Vec<usize> {
        candidates(h, &self.seeds, k)
    }
}

/// A shard's stamp as the sharded tier hands it out: the shard's index plus one in the
/// top bits, so a fill (or a token the cache builds from an entry's stamp) goes back to
/// the shard whose clock issued it. The poisoned stamp (0) stays 0.
pub(super) fn tag_stamp(shard: usize, stamp: u64) -> Result<u64> {
    if stamp == 0 {
        return Ok(0);
    }
    if stamp > STAMP_MASK {
        return Err(Error::new(
            ErrorKind::Tier,
            format!("sharded tier: shard {shard} returned stamp {stamp}, above 2^{STAMP_BITS}"),
        ));
    }
    Ok(((shard as u64 + 1) << STAMP_BITS) | stamp)
}

/// The shard a stamp came from (`None` for the poisoned stamp, or a stamp no sharded
/// tier issued) and the shard's own stamp.
pub(super) fn untag_stamp(stamp: u64) -> (Option<usize>, u64) {
    match stamp >> STAMP_BITS {
        0 => (None, stamp),
        s => Some(s as usize - 1).map_or((None, stamp), |shard| (Some(shard), stamp & STAMP_MASK)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_carry_their_shard() {
        for shard in [0, 1, 63, MAX_SHARDS - 1] {
            for stamp in [1, 2, 1_764_800_000_000_000, STAMP_MASK] {
                let tagged = tag_stamp(shard, stamp).expect("in range");
                assert_eq!(untag_stamp(tagged), (Some(shard), stamp));
            }
        }
        assert_eq!(tag_stamp(5, 0).expect("poisoned"), 0);
        assert_eq!(untag_stamp(0), (None, 0));
        assert!(tag_stamp(0, STAMP_MASK + 1).is_err());
    }

    #[test]
    fn candidates_are_distinct_and_in_score_order() {
        let seeds: Vec<u64> = (0..10).map(|i| hash(format!("node-{i}").as_bytes())).collect();
        for k in 0..200u64 {
            let key = hash(&k.to_le_bytes());
            let all = candidates(key, &seeds, 10);
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 10);
            assert_eq!(candidates(key, &seeds, 3), all[..3].to_vec());
            for w in all.windows(2) {
                assert!(score(key, seeds[w[0]]) >= score(key, seeds[w[1]]));
            }
        }
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys() {
        let seeds: Vec<u64> = (0..5).map(|i| hash(format!("node-{i}").as_bytes())).collect();
        let without: Vec<u64> = seeds.iter().copied().filter(|&s| s != seeds[2]).collect();
        for k in 0..2_000u64 {
            let key = hash(&k.to_le_bytes());
            let before = candidates(key, &seeds, 1)[0];
            let after = without[candidates(key, &without, 1)[0]];
            if before != 2 {
                assert_eq!(after, seeds[before], "key {k} moved although its shard stayed");
            }
        }
    }
}
