//! [`RedisTier`]: the L2 [`Tier`](strata::tier::Tier) on a standalone Redis/Valkey server
//! or a Redis Cluster (see the crate docs, "Redis Cluster").
//!
//! # Storage layout
//!
//! Every key of a namespace lives under `{prefix}:{<namespace>}:` (the braces are
//! literal: a Redis Cluster hash tag, so that one script can touch every key it needs
//! in a single slot; `:`, `%`, `{` and `}` in a namespace are percent-encoded so that
//! two namespaces can never share a key):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:m` | hash, no TTL | `c` invalidation clock, `n` namespace epoch, `l` lease counter, `f` lease floor, `tf` tag floor, `t:<tag>` clock value of the tag's last invalidation (at most [`max_tag_epochs`](RedisTierBuilder::max_tag_epochs) tags); the tombstone bookkeeping: `xg` current generation (0/1), `x0`/`x1` the tick each generation started at, `xw` when the current one started (server ms), `xf` tombstone floor |
//! | `…:e:<key>` | string, PX = entry ttl | a head `<s>,<f>,<h>,<v>,<tags len>,<mac len>;` (stamp; soft and hard expiry in ns since the epoch; row version or nothing; all decimal), then the tags (`<byte len>:<tag>` repeated), the MAC (only with [`integrity_keys`](RedisTierBuilder::integrity_keys)) and the envelope (format byte `2` + postcard of [`Envelope`](strata::tier::Envelope), its expiries 0 and, without integrity keys, its stamp 0: readers take them from the head). One string: a hash holding a field over 64 bytes becomes a hash table of every field (796 bytes per entry against 373 for this, and 240 for a plain `SET` of the same value: `tier::eviction::memory_per_entry_against_a_plain_set`) |
//! | `…:l:<key>` | string, PX = lease ttl | the id of the lease holder |
//! | `…:x0`, `…:x1` | hash, no TTL | the two tombstone generations: `<key>` → the clock tick of the key's last invalidation, `_` → the tick the generation started at |
//! | `…:x:<key>` | string, PX = tombstone ttl | strata 0.1's tombstone, written and read only with [`legacy_tombstones`](RedisTierBuilder::legacy_tombstones) (the default) |
//! | `…:w:<key>` | sorted set, PX = its longest lock's ttl + 1 ms | write locks on the key: lock id → expiry (server ms) |
//! | `…:w` | sorted set, PX = its longest lock's ttl + 1 ms | write locks on a tag or the whole namespace |
//!
//! The stamp, tags and expiries sit in their own fields so that the Lua scripts
//! validate and touch entries without decoding postcard; on a hit they override the
//! copies inside the envelope (a `set` learns its stamp only inside the script, a
//! `touch` moves the expiries without rewriting the envelope).
//!
//! The clock and every epoch of a namespace live in one hash, so they are lost
//! together or not at all. A clock is created at the server's time in microseconds,
//! with the namespace epoch equal to it; clock values are therefore ~1.8e15 and only
//! grow. If the meta hash is lost (a restart without persistence, an eviction, a
//! flush), the new clock starts above every stamp handed out before: older entries
//! are invalid and older fill tokens are rejected, so a loss makes the namespace
//! cold, never stale. (The new lease counter starts there too, above the ids of
//! leases still held.)
//!
//! # Scripts
//!
//! Each operation is one Lua script, so Redis applies it atomically, but for a lookup's
//! hits:
//!
//! - **lookup** (one or many keys): first a plain read, one pipelined round trip of a
//!   `GETRANGE` per entry (bounded) and an `HMGET` of the meta hash, checked in the client exactly as
//!   the script checks (see `plain_read.rs` for why that answers what the script would):
//!   a fresh, valid, untagged entry is a hit without a script (a script call costs Redis
//!   20–30 µs of CPU, a `GETRANGE` under 1 µs); a miss costs this round trip more, so
//!   while most of the tier's recent lookups missed (a small fleet, whose L1 answers the
//!   repeated reads; a cold start) the plain read is skipped. A
//!   tier whose plain reads found entries but answered none of them 64 times in a row
//!   (tagged data) tries one lookup in 16 until one answers. Every other key goes to
//!   the lookup script:
//!   read the entry, check its stamp against the
//!   namespace epoch and the epochs of its tags; an invalid entry is deleted and is a
//!   miss; a valid entry past its soft expiry is a miss that carries the entry as a
//!   stale fallback. On a miss the script reads the clock (the token's stamp) and,
//!   when asked, takes the lease with `SET PX` unless a live lease (id above the lease
//!   floor) is held.
//! - **peek** (an instance waiting for another's fill, three polls in four): the plain
//!   read alone, whatever the gate says; a hit as the lookup answers it, anything else
//!   `None` and left to the next full lookup (no lease, no repair, no script).
//! - **fill**: refuse if the token's stamp is below the tombstone floor, a tombstone
//!   newer than the stamp exists, a tombstone generation was lost, or the namespace or
//!   one of the value's tags was invalidated since the stamp; otherwise store the entry
//!   stamped with the token's stamp; release the caller's own lease either way.
//! - **set**: counts as an invalidation of the key (clock tick, tombstone, lease
//!   voided), then stores the entry stamped with the tick.
//! - **delete**: one clock tick (`HINCRBY`), then per key: delete entry and lease,
//!   leave a tombstone holding the tick in the current generation.
//! - **invalidate_tag**: a clock tick becomes the tag's epoch. When the namespace then
//!   holds more than [`max_tag_epochs`](RedisTierBuilder::max_tag_epochs) tag epochs, the
//!   older half is dropped and the tag floor `tf` rises to the newest epoch dropped;
//!   lookups and fills treat a *tagged* stamp below the floor as invalidated (so
//!   pruning never brings back what a dropped tag invalidated).
//! - **invalidate_namespace**: a clock tick becomes the namespace epoch; leases granted
//!   so far are voided (lease floor); the tag epochs are dropped, since the namespace
//!   epoch dominates them. Old entries stay until they expire but are never served.
//! - **touch**: validate as lookup does, then rewrite the entry with the new expiries
//!   and `PX` (an entry is one string: it is read once and written once).
//! - **lock** / **unlock** (write locks, see [`Tier::lock`](strata::tier::Tier::lock)): invalidate the scope as
//!   delete / invalidate_tag / invalidate_namespace do and add / remove the lock id.
//!   While a lock set covers a key, lookup hands out tokens with stamp 0, which every
//!   fill refuses (0 is below every namespace epoch), even after the lock expired. A
//!   lock set outlives each lock added to it and an unlock removes its id, so the
//!   lookup asks only whether the set holds anything (`ZCARD`); a lock whose holder
//!   died poisons tokens until its expiry, or longer while a later lock keeps the set.
//!
//! # Undecodable entries
//!
//! An entry that is not a string, has no or an empty envelope, a bad format byte, a
//! stamp, tag list, expiry or version that is not a canonical decimal in range, a stamp
//! above the clock, or is larger than
//! [`max_entry_bytes`](RedisTierBuilder::max_entry_bytes) (the plain read and the
//! script ask for at most that many bytes plus the head and MAC, and the script measures
//! a longer entry with `STRLEN` before reading it, so it is never transferred whole) is
//! left by the plain read to the script, which finds it. An empty string at an entry's
//! key reads as no entry (no release writes one; the next fill replaces it). The
//! postcard inside the envelope is decoded in Rust: an entry that fails there is read
//! once more with its bytes, and the script deletes it if it still holds them and
//! answers a miss either way. Every such entry is a miss:
//! deleted, counted in `strata_l2_undecodable_total` and
//! [`RedisTierStats::undecodable`], never returned as an error.
//!
//! # Poisoned keys
//!
//! Anything may have written under the prefix (another program, a bad restore), so no
//! script trusts what it reads, and none fails on it: a `WRONGTYPE` error or an
//! unparsable number inside a script would fail the call every time, and the cache's
//! L2 breaker with it, for every namespace on the server. A meta hash that is not a
//! hash, holds a clock, epoch, counter or floor that does not parse, or an epoch or
//! floor above what bounds it, is rebuilt as if it had been lost (above the old clock
//! when that still parses): the namespace comes back cold, never stale. A tag epoch is
//! checked when a script reads it (for an entry or a fill carrying the tag). A lease,
//! tombstone or write-lock set of the wrong type, with a value that does not parse or
//! lies above the clock, or without an expiry, is dropped (a bad tombstone first counts
//! as an invalidation of its key, since when the key was last invalidated is unknown).
//! These repairs are counted in `strata_l2_repaired_total` and
//! [`RedisTierStats::repaired`] and logged.
//!
//! # Tombstones
//!
//! A tombstone must outlive every fill token issued before it, and an evicted one must
//! never read as "never invalidated". So tombstones live in two generation hashes
//! without a TTL (`volatile-*` eviction cannot reach them); a generation is replaced
//! when it is older than the tombstone ttl or holds 10,000 keys, and the one before it
//! is then dropped with the tombstone floor `xf` raised to where the kept one starts: a
//! token older than that is refused (it is at least a generation old). A generation the
//! meta hash records but whose `_` is gone (evicted under `allkeys-*`, deleted) or
//! wrong means tombstones were lost: all are forgotten behind a floor at a fresh tick,
//! so every fill in flight is refused (a repair), never let in (test: `tier::eviction`).
//!
//! # Memory pressure
//!
//! Every script but the fill runs with `#!lua flags=allow-oom` (Redis 7.0 or later):
//! over `maxmemory` with nothing the policy may evict (`noeviction`, or `volatile-*`
//! with the memory held by keys without a TTL and by clients), Redis refuses writes,
//! and an invalidation refused is a stale entry left readable. The fill's first write
//! is its entry's, so Redis can refuse it: it is then not stored and counted in
//! [`RedisTierStats::refused_for_memory`], not an error. Test:
//! `tier::eviction::invalidations_go_through_when_redis_is_out_of_memory`.
//!
//! # Eviction policy
//!
//! Entries and leases may be evicted freely; `eviction.rs` tabulates what each policy
//! costs; the builder reads `INFO memory` and warns, or refuses ([`EvictionCheck`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;
use strata::Scope;
use strata::clock::{Clock, SystemClock};
use strata::error::{ErrorKind, Result};

use crate::cluster::{Connector, RedisConn};
pub use crate::connection::DEFAULT_PREFIX;
use crate::integrity::Integrity;
use crate::managed::{CallError, ManagedConn};
use crate::reply::bad_reply;
use crate::tier::builder::WHAT;
pub use crate::tier::builder::{DEFAULT_MAX_ENTRY_BYTES, DEFAULT_OP_TIMEOUT, RedisTierBuilder};
pub use crate::tier::eviction::EvictionCheck;
pub use crate::tier::format::ENVELOPE_FORMAT;
use crate::tier::format::{NsKeys, millis_at_least_one, parse_script_reply};
use crate::tier::scripts::TierScripts;
pub use crate::tier::slots::{ClusterSlots, DEFAULT_CLUSTER_SHARDS, cluster_shard_namespace, key_slot};

mod builder;
pub(crate) mod eviction;
pub(crate) mod format;
mod hot_keys;
mod lookup;
pub(crate) mod lua;
mod plain_read;
mod port;
mod replication;
mod scripts;
mod slots;
mod startup;

/// Counters of a [`RedisTier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisTierStats {
    /// Redis round trips made (scripts and commands), the benchmark's "Redis ops".
    pub ops: u64,
    /// Entries found undecodable, deleted and served as misses: an envelope that does
    /// not decode, a field that does not parse, a key of the wrong type, an entry over
    /// [`RedisTierBuilder::max_entry_bytes`].
    pub undecodable: u64,
    /// The namespace keys besides entries found corrupt and repaired: meta hashes
    /// rebuilt as if lost (the namespace comes back cold), leases, tombstones and
    /// write-lock sets dropped or replaced.
    pub repaired: u64,
    /// Values a fill or set did not store for being over
    /// [`RedisTierBuilder::max_entry_bytes`].
    pub oversized: u64,
    /// Operations that timed out: Redis did not answer within the response timeout
    /// ([`RedisTierBuilder::op_timeout`]), or the caller gave up first (the cache's
    /// `l2_timeout`).
    pub timeouts: u64,
    /// Operations that failed otherwise (connection, server errors).
    pub errors: u64,
    /// Times the connection was replaced after repeated timeouts.
    pub reconnects: u64,
    /// Entries whose MAC did not verify (with
    /// [`integrity_keys`](RedisTierBuilder::integrity_keys)): deleted and served as
    /// misses, never returned; counted in `strata_l2_integrity_failures_total` too.
    pub integrity_failures: u64,
    /// Fills the guard accepted that Redis refused to store for memory (over
    /// `maxmemory` with nothing the policy may evict, e.g. `noeviction`): not stored,
    /// not an error (the value is still served from L1).
    pub refused_for_memory: u64,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    undecodable: AtomicU64,
    repaired: AtomicU64,
    oversized: AtomicU64,
    integrity_failures: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    refused_for_memory: AtomicU64,
}

impl RedisTierBuilder {
    /// Checks the settings, connects (unless lazy) and returns the tier.
    pub async fn build(self) -> Result<RedisTier> {
        self.check()?;
        let client = Connector::open(&self.connection, WHAT)?;
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock::default()));
        let conn = Arc::new(ManagedConn::new(client, &self.connection, self.reconnect_after_timeouts, WHAT)?);
        let shared = self.connection.clone();
        let tier = RedisTier {
            inner: Arc::new(Inner {
                conn,
                connection: shared,
                prefix: self.connection.prefix,
                op_timeout: self.op_timeout,
                tombstone_ttl: self.tombstone_ttl,
                max_entry_bytes: self.max_entry_bytes,
                clock,
                scripts: TierScripts::new(self.max_tag_epochs, self.legacy_tombstones),
                integrity: Integrity::from_keys(self.integrity_keys.as_deref(), WHAT)?,
                counters: Counters::default(),
                wait_for_replicas: self.wait_for_replicas,
                plain_gate: plain_read::PlainGate::default(),
            }),
        };
        if !self.connection.lazy {
            tier.check_server(self.connection.connect_timeout + self.op_timeout).await?;
            tier.check_eviction(self.eviction_check, self.op_timeout.max(Duration::from_secs(1))).await?;
        }
        Ok(tier)
    }
}

struct Inner {
    conn: Arc<ManagedConn>,
    /// What `conn` connects with, for a backplane that shares it.
    connection: crate::connection::ConnectionOptions,
    prefix: String,
    op_timeout: Duration,
    tombstone_ttl: Duration,
    max_entry_bytes: usize,
    clock: Arc<dyn Clock>,
    scripts: TierScripts,
    /// Entry MACs, when integrity keys are set.
    integrity: Option<Integrity>,
    counters: Counters,
    /// `WAIT` after invalidations: replicas and timeout.
    wait_for_replicas: Option<(u32, Duration)>,
    /// Whether lookups try the plain read first.
    plain_gate: plain_read::PlainGate,
}

/// The L2 tier on Redis/Valkey: implements the full fill-guard contract of [`Tier`](strata::tier::Tier)
/// with one Lua script per operation (see the module docs for the layout).
///
/// It has no circuit breaker and no operation timeout of its own: the cache's L2 call
/// wrapper owns both (see the crate docs).
///
/// Cloning gives another handle to the same connection and counters.
#[derive(Clone)]
pub struct RedisTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("url", &self.inner.conn.shown_url())
            .field("prefix", &self.inner.prefix)
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisTier {
    /// Starts building a tier for `url`: `redis://[user:password@]host[:port][/db]`,
    /// or `rediss://…` for TLS (with the `tls` feature). User and password are the
    /// ACL credentials, percent-encoded.
    pub fn builder(url: impl Into<String>) -> RedisTierBuilder {
        RedisTierBuilder::new(url)
    }

    /// Starts building a tier on a Redis Cluster reached through `nodes`: the URLs of
    /// one or more of its nodes (as for [`builder`](Self::builder), all with the same
    /// credentials and TLS mode; the other nodes are discovered). Every key of a
    /// namespace shares the namespace's hash tag, so a namespace lives on the master of
    /// one slot; spread a large one over the masters with
    /// [`cluster_shard_namespace`]. See the crate docs,
    /// "Redis Cluster".
    pub fn cluster_builder(nodes: impl IntoIterator<Item = impl Into<String>>) -> RedisTierBuilder {
        RedisTierBuilder::new("").connection(crate::ConnectionOptions::cluster(nodes))
    }

    /// A [`ShardedTier`](strata::ShardedTier) builder splitting this tier into `shards`
    /// virtual shards named by [`ClusterSlots`]: on a Cluster, each namespace's keys
    /// spread over every master, each shard keeping its own clock and epochs in its own
    /// slot ([`DEFAULT_CLUSTER_SHARDS`] is a good count). Add hot-key copies or a gutter
    /// on the builder, then `build()`.
    pub fn cluster_shards(self, shards: usize) -> strata::tier::ShardedTierBuilder {
        strata::ShardedTier::builder().virtual_shards(std::sync::Arc::new(self), shards, ClusterSlots)
    }

    /// Redis round trips made so far.
    pub fn ops(&self) -> u64 {
        self.inner.counters.ops.load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> RedisTierStats {
        let c = &self.inner.counters;
        RedisTierStats {
            ops: c.ops.load(Ordering::Relaxed),
            undecodable: c.undecodable.load(Ordering::Relaxed),
            repaired: c.repaired.load(Ordering::Relaxed),
            oversized: c.oversized.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed) + self.inner.conn.abandoned(),
            errors: c.errors.load(Ordering::Relaxed),
            reconnects: self.inner.conn.reconnects(),
            integrity_failures: c.integrity_failures.load(Ordering::Relaxed),
            refused_for_memory: c.refused_for_memory.load(Ordering::Relaxed),
        }
    }

    /// The tier's connection and its settings, for a backplane that publishes through
    /// it (`share_connection`).
    pub(crate) fn shared_connection(&self) -> (Arc<ManagedConn>, &crate::connection::ConnectionOptions) {
        (self.inner.conn.clone(), &self.inner.connection)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The connection's response timeout (see [`RedisTierBuilder::op_timeout`]).
    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// The largest entry the tier handles (see [`RedisTierBuilder::max_entry_bytes`]).
    pub fn max_entry_bytes(&self) -> usize {
        self.inner.max_entry_bytes
    }

    /// The Redis key holding `key`'s entry in `namespace` (for tools and tests).
    pub fn entry_key(&self, namespace: &str, key: &str) -> String {
        NsKeys::new(&self.inner.prefix, namespace).entry(key)
    }

    /// Sends `PING` (with the response timeout): a health check.
    pub async fn ping(&self) -> Result<()> {
        let _: Value = self
            .run("redis tier ping", |mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Runs one Redis call with the response timeout, counting it.
    async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        inner.counters.ops.fetch_add(1, Ordering::Relaxed);
        inner.conn.call(inner.op_timeout, ErrorKind::Tier, what, f).await.map_err(|e| {
            match &e {
                CallError::Timeout(_) => &inner.counters.timeouts,
                CallError::Failed(_) => &inner.counters.errors,
            }
            .fetch_add(1, Ordering::Relaxed);
            e.into_error()
        })
    }

    fn count_undecodable(&self, namespace: &str, n: u64) {
        if n > 0 {
            self.inner.counters.undecodable.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("strata_l2_undecodable_total", "namespace" => namespace.to_owned())
                .increment(n);
        }
    }

    fn count_repaired(&self, namespace: &str, n: u64) {
        if n > 0 {
            self.inner.counters.repaired.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("strata_l2_repaired_total", "namespace" => namespace.to_owned()).increment(n);
            tracing::warn!(
                namespace,
                repaired = n,
                "corrupt l2 keys (meta hash, lease, tombstone, lock set) repaired"
            );
        }
    }

    /// Whether an envelope of `len` bytes is over the size limit (counted, logged).
    fn oversized(&self, namespace: &str, key: &str, len: usize) -> bool {
        let over = len > self.inner.max_entry_bytes;
        if over {
            self.inner.counters.oversized.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                namespace,
                key,
                bytes = len,
                max_entry_bytes = self.inner.max_entry_bytes,
                "l2 value over the tier's max_entry_bytes: not stored"
            );
        }
        over
    }

    /// Runs one of the scripts that answer `{result, repaired, corrupt}`, counts what
    /// it found corrupt, and returns its result.
    async fn run_script(
        &self,
        what: &'static str,
        namespace: &str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<u64> {
        let v: Value = self.run(what, |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        self.finish_script(what, namespace, &v)
    }

    /// Counts what a script found corrupt and returns its result.
    fn finish_script(&self, what: &'static str, namespace: &str, v: &Value) -> Result<u64> {
        let r = parse_script_reply(v).ok_or_else(|| bad_reply(ErrorKind::Tier, what))?;
        self.count_repaired(namespace, r.repaired);
        self.count_undecodable(namespace, r.corrupt);
        Ok(r.result)
    }

    /// The keys and arguments of the lock and unlock scripts (see `scripts.rs`).
    fn lock_invocation<'a>(
        &self,
        script: &'a redis::Script,
        namespace: &str,
        scope: &Scope,
        id: u64,
        ttl: Duration,
    ) -> redis::ScriptInvocation<'a> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = script.prepare_invoke();
        inv.key(ns.meta());
        let (kind, tag) = match scope {
            Scope::Keys(keys) => {
                for k in keys {
                    inv.key(ns.entry(k)).key(ns.lease(k)).key(ns.key_locks(k));
                }
                ("k", "")
            }
            Scope::Tag(tag) => {
                inv.key(ns.wide_locks());
                ("t", tag.as_str())
            }
            Scope::All => {
                inv.key(ns.wide_locks());
                ("n", "")
            }
        };
        inv.arg(kind)
            .arg(id)
            .arg(millis_at_least_one(ttl))
            .arg(millis_at_least_one(self.inner.tombstone_ttl))
            .arg(tag);
        inv
    }
}
