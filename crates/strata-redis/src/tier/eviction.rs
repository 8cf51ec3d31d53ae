//! What the server's eviction settings do to strata's promises, read at build time.
//!
//! strata's fill guard and epochs live in Redis beside the entries. Under a memory
//! limit with an eviction policy, Redis may drop them like any cached value:
//!
//! | `maxmemory-policy` (with `maxmemory` set) | what can be evicted | effect |
//! |---|---|---|
//! | `noeviction`, or no `maxmemory` | nothing | writes fail when full (errors, the L2 breaker); promises hold |
//! | `volatile-*` | keys with a TTL: entries, leases, write-lock sets | a lost write lock lets a read during a locked write fill the old row, until the write's release invalidates it (the Strong level's window); tombstones, clocks, epochs, the backplane stream, its counter and its heartbeats hash have no TTL and stay |
//! | `allkeys-*` | everything: also the namespace meta hash (the namespace goes cold), the tombstone generations (every fill in flight is refused) and, on the same server, the backplane stream and its counter (both gone: a `Lost`, each reader that had not read a message the stream took flushes its L1, the others keep theirs once every member's sequence numbers show nothing missing; the counter alone: its numbering resumes from the stream, no loss) | each loss is detected and costs misses, never a stale read; write locks as under `volatile-*`. `allkeys-lru` and `allkeys-random` take these keys as often as entries under pressure (LRU's clock counts seconds); `allkeys-lfu` keeps them, strata's most used keys |
//!
//! Invalidation scripts run with `allow-oom` (Redis 7.0+): over `maxmemory`, an
//! invalidation is never refused; a fill is (counted in
//! [`RedisTierStats::refused_for_memory`](crate::RedisTierStats::refused_for_memory), not an error).
//!
//! The layouts that keep every promise at full speed: no `maxmemory`, `noeviction`, or
//! `volatile-*` outside the Strong level; where everything must be evictable,
//! `allkeys-lfu` (in a 3 MB run strata's steady window read the database 0.52× as
//! often as a plain cache-aside in the same memory, against 5.8× under `allkeys-lru`:
//! README, "Redis under memory pressure"), or the backplane on a server of its own
//! that does not evict (`allkeys-lru` at 3 MB: 0.25× in the steady window instead of
//! 5.3×, the meta hash evicted 24 times in a run instead of 4,275). The builder checks
//! at build time and, by default, warns ([`EvictionCheck`]).
//!
//! A small `maxmemory` also pays costs that are not entries: Redis 7.0+ keeps a latency
//! histogram of ~24 KB for every command it has run (`latency-tracking yes`, the
//! default), and strata's scripts run about [`COMMANDS_USED`] distinct commands: ~0.6 MB
//! that stays until `CONFIG RESETSTAT`. Under 16 MB the build warns about it (a note,
//! never a refusal): `CONFIG SET latency-tracking no` then `CONFIG RESETSTAT` gives it
//! back to the entries.

use std::time::Duration;

use redis::Value;
use strata::error::{Error, ErrorKind, Result};

use super::RedisTier;
use super::builder::RedisTierBuilder;
use crate::managed::ManagedConn;

/// What [`RedisTier`]'s build does when the server may evict strata's keys
/// (what is at risk under each policy: the crate docs, "Eviction").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EvictionCheck {
    /// Log a warning that says what is at risk and how to fix it (the default).
    #[default]
    Warn,
    /// Fail the build with that message.
    Refuse,
    /// Do not look (for example when the ACL user may not run `INFO`).
    Skip,
}

impl RedisTierBuilder {
    /// What to do when the server's `maxmemory-policy` may evict the keys strata's
    /// consistency or its hit ratio rest on (write locks, the namespace meta hash, the
    /// tombstones, the backplane stream). Read with
    /// `INFO memory` at build time (skipped with a debug log where the ACL user may
    /// not run it, and by `.lazy(true)`). Default: [`EvictionCheck::Warn`].
    pub fn eviction_check(mut self, check: EvictionCheck) -> Self {
        self.eviction_check = check;
        self
    }
}

/// Distinct commands the tier and the stream backplane run (their scripts' inner
/// commands included), each with its own latency histogram on Redis 7.0+.
pub(crate) const COMMANDS_USED: u64 = 25;
/// Bytes of one latency histogram (Redis 7.0, 1 ns – 1 s at 2 significant digits),
/// measured with `MEMORY STATS` before and after `CONFIG RESETSTAT`.
const HISTOGRAM_BYTES: u64 = 24_600;
/// Below this `maxmemory` the histograms are worth a note.
const SMALL_MAXMEMORY: u64 = 16 << 20;

/// The note on the latency histograms for a server with `maxmemory` (0: none) whose
/// `INFO latencystats` lists commands (`tracking`), or `None` where they do not matter.
pub(crate) fn histogram_note(maxmemory: u64, tracking: bool) -> Option<String> {
    if !tracking || !histograms_matter(maxmemory) {
        return None;
    }
    let bytes = COMMANDS_USED * HISTOGRAM_BYTES;
    Some(format!(
        "latency-tracking is on: Redis keeps a ~24 KB histogram for each command it has run, \
         ~{} KB for strata's {COMMANDS_USED} commands, {:.0} % of maxmemory {maxmemory} bytes that entries \
         cannot use; on a server this small run `CONFIG SET latency-tracking no` and `CONFIG RESETSTAT`",
        bytes / 1000,
        bytes as f64 * 100.0 / maxmemory as f64
    ))
}

/// Whether a `maxmemory` (0: none) is small enough for the histograms to matter.
fn histograms_matter(maxmemory: u64) -> bool {
    maxmemory != 0 && maxmemory < SMALL_MAXMEMORY
}

/// What an `allkeys-*` policy puts at risk, whichever one (a macro: `concat!` takes
/// literals only).
macro_rules! all_keys_risk {
    () => {
        "every key can be evicted: a lost namespace meta hash makes the namespace cold, \
         lost tombstones refuse every fill in flight, and a lost backplane stream on the \
         same server flushes the L1 of every reader that had not read all of it (each \
         loss is detected and costs misses, never a stale read); write-lock sets as under \
         volatile-*"
    };
}

/// The server's memory limit and eviction policy, as `INFO memory` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerMemory {
    pub(crate) maxmemory: u64,
    pub(crate) policy: String,
}

impl ServerMemory {
    pub(crate) fn parse(info: &str) -> Option<ServerMemory> {
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(str::trim)
        };
        Some(ServerMemory {
            maxmemory: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy")?.to_owned(),
        })
    }

    /// What the configuration puts at risk, or `None` when nothing is evicted.
    pub(crate) fn risk(&self) -> Option<&'static str> {
        if self.maxmemory == 0 || self.policy == "noeviction" {
            None
        } else if self.policy.starts_with("volatile-") {
            Some(
                "write-lock sets (keys with a TTL) can be evicted: at the Strong level a read \
                 during a locked write may then fill the old row until the write's release \
                 invalidates it (tombstones, clocks, epochs, the backplane stream and its \
                 heartbeats hash have no TTL and stay)",
            )
        } else if self.policy == "allkeys-lfu" {
            Some(concat!(
                all_keys_risk!(),
                ". LFU keeps these, strata's most used keys, far longer than LRU does"
            ))
        } else {
            Some(concat!(
                all_keys_risk!(),
                ". Under pressure this policy takes them as often as any entry (its clock counts \
                 seconds, and entries live less than one): prefer allkeys-lfu, which keeps \
                 strata's most used keys, or volatile-*, and put the backplane on a server that \
                 does not evict (sharing this one, the meta hash went ~100x as often in a 3 MB \
                 run)"
            ))
        }
    }
}

impl RedisTier {
    pub(crate) async fn check_eviction(&self, check: EvictionCheck, timeout: Duration) -> Result<()> {
        if check == EvictionCheck::Skip {
            return Ok(());
        }
        let Some(memories) = server_memories(&self.inner.conn, timeout, "redis tier").await else {
            return Ok(());
        };
        if let Some(small) = memories.iter().map(|m| m.maxmemory).filter(|m| *m > 0).min() {
            self.note_histograms(small, timeout).await;
        }
        let Some((memory, risk)) = memories
            .into_iter()
            .filter_map(|m| m.risk().map(|r| (m, r)))
            .max_by_key(|(m, _)| m.policy.starts_with("allkeys-"))
        else {
            return Ok(());
        };
        let on = if self.inner.conn.is_cluster() { "a node of the cluster at " } else { "" };
        let message = format!(
            "redis tier: {on}`{}` evicts under memory pressure (maxmemory {} bytes, maxmemory-policy {}): {risk}; \
             run strata's tier on a server or database with maxmemory-policy noeviction and memory to spare \
             (or no maxmemory), or build with .eviction_check(EvictionCheck::Skip) to accept it",
            self.inner.conn.shown_url(),
            memory.maxmemory,
            memory.policy
        );
        enforce(check, message)
    }
}

/// What `INFO memory` says of each server behind `conn` (one, or every master of a
/// cluster); `None`, logged at debug, where it cannot be read (an ACL user without
/// `INFO`, a timeout): the check is then skipped, never failed.
pub(crate) async fn server_memories(
    conn: &ManagedConn,
    timeout: Duration,
    what: &str,
) -> Option<Vec<ServerMemory>> {
    let mut c = conn.get();
    let info =
        tokio::time::timeout(timeout, redis::cmd("INFO").arg("memory").query_async::<Value>(&mut c)).await;
    match info {
        // One server answers with its text; a cluster connection sends INFO to every
        // master and answers with each one's text by address.
        Ok(Ok(v)) => Some(info_texts(&v).iter().filter_map(|t| ServerMemory::parse(t)).collect()),
        other => {
            tracing::debug!(result = ?other.map(|r| r.map(|_| ())), "{what}: cannot read INFO memory; eviction not checked");
            None
        }
    }
}

/// Applies an [`EvictionCheck`] to a risk found: a warning, or the build's error.
pub(crate) fn enforce(check: EvictionCheck, message: String) -> Result<()> {
    match check {
        EvictionCheck::Refuse => Err(Error::new(ErrorKind::InvalidInput, message)),
        _ => {
            tracing::warn!("{message}");
            Ok(())
        }
    }
}

impl RedisTier {
    /// Warns when the latency histograms take a share of a small `maxmemory` worth
    /// knowing (see the module docs); silent where `INFO latencystats` is refused.
    async fn note_histograms(&self, maxmemory: u64, timeout: Duration) {
        if !histograms_matter(maxmemory) {
            return;
        }
        let mut c = self.inner.conn.get();
        let info = tokio::time::timeout(timeout, async {
            redis::cmd("INFO").arg("latencystats").query_async::<Value>(&mut c).await
        })
        .await;
        let Ok(Ok(v)) = info else { return };
        let tracking = info_texts(&v).iter().any(|t| t.contains("latency_percentiles_usec_"));
        if let Some(note) = histogram_note(maxmemory, tracking) {
            tracing::warn!("redis tier: `{}`: {note}", self.inner.conn.shown_url());
        }
    }
}

/// The `INFO` texts in a reply: one server's, or each node's in a cluster's map.
pub(crate) fn info_texts(v: &Value) -> Vec<String> {
    match v {
        Value::BulkString(b) => vec![String::from_utf8_lossy(b).into_owned()],
        Value::VerbatimString { text, .. } => vec![text.clone()],
        Value::SimpleString(s) => vec![s.clone()],
        Value::Map(pairs) => pairs.iter().flat_map(|(_, v)| info_texts(v)).collect(),
        Value::Array(items) => items.iter().flat_map(info_texts).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(maxmemory: u64, policy: &str) -> ServerMemory {
        ServerMemory { maxmemory, policy: policy.to_owned() }
    }

    #[test]
    fn reads_info_memory() {
        let info = "# Memory\r\nused_memory:1000\r\nmaxmemory:3145728\r\nmaxmemory_human:3.00M\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(ServerMemory::parse(info), Some(memory(3_145_728, "allkeys-lru")));
        assert_eq!(ServerMemory::parse("# Memory\r\n"), None);
    }

    #[test]
    fn notes_the_latency_histograms_on_a_small_server_only() {
        let note = histogram_note(3 << 20, true).expect("3 MB");
        assert!(note.contains("latency-tracking no") && note.contains("20 %"), "{note}");
        assert_eq!(histogram_note(3 << 20, false), None, "tracking off");
        assert_eq!(histogram_note(0, true), None, "no maxmemory");
        assert_eq!(histogram_note(1 << 30, true), None, "1 GB");
    }

    #[test]
    fn judges_each_policy() {
        assert_eq!(memory(0, "allkeys-lru").risk(), None);
        assert_eq!(memory(1 << 20, "noeviction").risk(), None);
        assert!(memory(1 << 20, "volatile-lru").risk().is_some_and(|r| r.contains("write-lock")));
        assert!(memory(1 << 20, "allkeys-lfu").risk().is_some_and(|r| r.contains("meta hash")));
        assert!(memory(1 << 20, "allkeys-lru").risk().is_some_and(|r| r.contains("prefer allkeys-lfu")));
        assert!(memory(1 << 20, "allkeys-random").risk().is_some_and(|r| r.contains("prefer allkeys-lfu")));
        assert!(memory(1 << 20, "allkeys-lfu").risk().is_some_and(|r| !r.contains("prefer")));
    }
}
