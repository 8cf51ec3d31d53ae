//! Redis Cluster hash slots of namespaces, and namespace names spread over the slots
//! ([`cluster_shard_namespace`]).

use std::collections::HashMap;
use std::sync::LazyLock;

use parking_lot::RwLock;
use strata::tier::sharded::ShardNaming;

use super::format::NsKeys;

/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// Memoised names of [`cluster_shard_namespace`]; cleared when it holds this many.
const MEMO_CAP: usize = 65_536;

/// `(namespace, shard, shards)`.
type MemoKey = (String, usize, usize);

/// CRC16/XMODEM (polynomial 0x1021), the checksum Redis Cluster hashes keys with.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)])
}

/// The Redis Cluster hash slot of `key`: CRC16 of the key, or of its hash tag (what
/// lies between the first `{` and the next `}`, if not empty), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let len = key[open + 1..].iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &key[open + 1..open + 1 + len])
    });
    // SLOTS is a power of two: the remainder fits in u16.
    crc16(tag.unwrap_or(key)) & (SLOTS as u16 - 1)
}

/// The hash slot that every key of `namespace` lives in (whatever the prefix: the hash
/// tag is the namespace alone).
pub(crate) fn namespace_slot(namespace: &str) -> u16 {
    key_slot(NsKeys::new("p", namespace).meta().as_bytes())
}

/// A namespace name derived from `namespace` whose keys live in bucket `shard` of
/// `shards` equal ranges of the 16384 Redis Cluster hash slots: `<namespace>~<n>` for
/// the smallest `n` that puts it there.
///
/// Every key of a namespace shares its hash tag, so a namespace lives on one master of
/// a cluster. To spread one over the masters, split it into shards (each its own
/// namespace to the tier: its own meta hash, clock and epochs) named with this
/// function: shard `i` of `n` lands in the `i`-th `n`-th of the slots, so the shards
/// spread over the masters in proportion to the slots each serves. The name depends
/// on its arguments only (the same in every process and release); it is memoised,
/// so calling it per operation costs a map lookup.
///
/// The slot is chosen in the middle quarter of the bucket, away from its edges: with
/// the equal slot ranges `redis-cli --cluster create` assigns, a bucket that straddles
/// two masters still goes to a predictable one (64 shards on 3 masters: 21, 22, 21).
///
/// `shards` is clamped to 1..=16384 and `shard` taken modulo `shards`. Names of the
/// form `<namespace>~<n>` are reserved for these shards: do not use them for other
/// namespaces.
pub fn cluster_shard_namespace(namespace: &str, shard: usize, shards: usize) -> String {
    static MEMO: LazyLock<RwLock<HashMap<MemoKey, String>>> = LazyLock::new(|| RwLock::new(HashMap::new()));
    let shards = shards.clamp(1, SLOTS);
    let shard = shard % shards;
    let memo_key = (namespace.to_owned(), shard, shards);
    if let Some(name) = MEMO.read().get(&memo_key) {
        return name.clone();
    }
    let name = search(namespace, shard, shards);
    let mut memo = MEMO.write();
    if memo.len() >= MEMO_CAP {
        memo.clear();
    }
    memo.insert(memo_key, name.clone());
    name
}

fn search(namespace: &str, shard: usize, shards: usize) -> String {
    let (start, end) = (shard * SLOTS / shards, (shard + 1) * SLOTS / shards);
    let width = end - start;
    // The middle quarter when the bucket is wide enough to have one.
    let (lo, hi) = if width >= 8 { (start + width * 3 / 8, start + width * 5 / 8) } else { (start, end) };
    let mut n: u64 = 0;
    loop {
        let name = format!("{namespace}~{n}");
        let slot = usize::from(namespace_slot(&name));
        // Each try lands with probability (hi - lo) / 16384 >= 1 / 16384: a miss after
        // 10^7 tries has probability below e^-600; take the bucket's edges then.
        if (lo..hi).contains(&slot) || (n > 10_000_000 && (start..end).contains(&slot)) {
            return name;
        }
        n += 1;
    }
}

/// How many virtual shards [`RedisTier::cluster_shards`](super::RedisTier::cluster_shards)
/// splits a namespace into by default: 64 lands 21–22 shards on each of 3 masters
/// with the default slot ranges, and a tag or namespace invalidation costs 64 small
/// script calls, sent concurrently.
pub const DEFAULT_CLUSTER_SHARDS: usize = 64;

/// The [`ShardNaming`] of a Redis Cluster: virtual shard `i` of `n` is the namespace
/// [`cluster_shard_namespace`]`(ns, i, n)`, in the `i`-th `n`-th of the slots.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterSlots;

impl ShardNaming for ClusterSlots {
    fn namespace(&self, namespace: &str, shard: usize, shards: usize) -> String {
        cluster_shard_namespace(namespace, shard, shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn slots_match_redis_rs_and_the_spec() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        for key in ["foo", "{user1000}.following", "a{}b", "x{{y}}", "strata:{ns}:m", "", "{", "}{a}"] {
            let expected = Slot::new(key_slot(key.as_bytes())).expect("in range");
            assert_eq!(Slot::for_key(key), expected, "{key}");
        }
        assert_eq!(namespace_slot("billsetting"), key_slot(b"billsetting"));
        assert_eq!(namespace_slot("a:b"), key_slot(b"a%3Ab"));
    }

    /// 64 shards of a namespace land in 64 distinct buckets, and on the default slot
    /// ranges of a 3-master cluster (0-5460, 5461-10922, 10923-16383) 21 or 22 per
    /// master.
    #[test]
    fn shards_spread_over_buckets_and_masters() {
        for namespace in ["billsetting", "payment", "draft", "a:b{c}"] {
            let mut buckets = std::collections::HashSet::new();
            let mut per_master = [0usize; 3];
            for shard in 0..64 {
                let name = cluster_shard_namespace(namespace, shard, 64);
                assert_eq!(name, cluster_shard_namespace(namespace, shard, 64), "deterministic");
                let slot = usize::from(namespace_slot(&name));
                assert_eq!(slot * 64 / SLOTS, shard, "{name} in slot {slot}");
                buckets.insert(slot * 64 / SLOTS);
                per_master[match slot {
                    0..=5460 => 0,
                    5461..=10922 => 1,
                    _ => 2,
                }] += 1;
            }
            assert_eq!(buckets.len(), 64);
            assert!(per_master.iter().all(|&n| (21..=22).contains(&n)), "{namespace}: {per_master:?}");
        }
        // Out-of-range arguments are clamped, not a panic.
        assert_eq!(cluster_shard_namespace("x", 5, 1), cluster_shard_namespace("x", 0, 1));
        assert!(cluster_shard_namespace("x", 0, 0).starts_with("x~"));
        let one = cluster_shard_namespace("x", 16383, 1 << 20);
        assert_eq!(usize::from(namespace_slot(&one)), 16383);
    }
}
