//! Redis/Valkey adapters for strata: the shared L2 tier and the invalidation
//! backplanes.
//!
//! | type | port | what it is |
//! |---|---|---|
//! | [`RedisTier`] | [`Tier`](strata::tier::Tier) | L2 on one Redis server or a Redis Cluster: fill guards, leases, tombstones, O(1) tag and namespace invalidation, each operation one Lua script |
//! | [`RedisStreamBackplane`] | [`Backplane`](strata::backplane::Backplane) | the default backplane: a capped Redis Stream; replays what a subscriber missed |
//! | [`RedisPubSubBackplane`] | [`Backplane`](strata::backplane::Backplane) | Redis Pub/Sub: cheaper, at most once, nothing replayed |
//! | [`RedisWriteBehindQueue`] | [`WriteBehindQueue`](strata::write_behind::WriteBehindQueue) | the durable write-behind queue, shared by the fleet: coalesced saves, due times, leased claims, dead letters |
//!
//! All three are configured from a URL: `redis://[user:password@]host[:port][/db]`
//! (user and password are ACL credentials, percent-encoded), or `rediss://…` for TLS
//! (the `tls` feature, on by default: rustls with the ring provider; the server is
//! verified against the system's root certificates, or against the CA given with a
//! builder's `.tls(`[`TlsConfig`]`)`, which can also hold a client certificate).
//! A bad setting is an error of kind
//! [`InvalidInput`](strata::error::ErrorKind::InvalidInput) whose message says how to
//! fix it; passwords are redacted from every message. The settings the three builders
//! share (URL, key prefix, connect timeout, TLS, lazy start) form one
//! [`ConnectionOptions`], which each builder's `connection` setter takes whole.
//!
//! # The tier
//!
//! [`RedisTier`] behaves exactly like strata's in-process reference tier (the tests
//! run one conformance scenario against both). The storage layout and the scripts
//! are described in the [`tier`] module.
//!
//! The core's L2 call wrapper owns resilience: [`Cache`](strata::Cache) bounds every L2
//! call with its `l2_timeout` (default 50 ms; a call still running while the server
//! keeps answering the connection's other calls, a busy server rather than a stalled
//! one, is waited for up to `l2_busy_timeout`: the tier reports the replies it hears
//! through [`Tier::progress`](strata::tier::Tier::progress)) and runs it through its own
//! [`CircuitBreaker`](strata::breaker::CircuitBreaker), which it also forces open when
//! L2 may hold wrong data (both set on [`CacheBuilder`](strata::CacheBuilder)). The tier
//! adds neither a breaker nor an operation timeout, so a call meets one of each. What
//! it keeps is connection-level: a response timeout,
//! [`op_timeout`](RedisTierBuilder::op_timeout) (default 1 s, a backstop well above
//! `l2_timeout` that bounds calls made outside a cache; the name is kept for existing
//! callers), and the replacement of a connection after
//! [`reconnect_after_timeouts`](RedisTierBuilder::reconnect_after_timeouts) consecutive
//! calls that timed out or that the cache abandoned. Timeouts map to
//! [`ErrorKind::Timeout`](strata::error::ErrorKind::Timeout), connection and server
//! errors to [`ErrorKind::Tier`](strata::error::ErrorKind::Tier). An entry that cannot
//! be decoded is a miss: deleted, counted (`strata_l2_undecodable_total`,
//! [`RedisTierStats::undecodable`]), never an error. [`RedisTier::lookup_many`] reads a
//! batch of keys in one round trip when all are fresh hits, two otherwise (a plain read,
//! then the lookup script for the rest); [`RedisTier::ops`] counts round trips for the
//! benchmark's "Redis ops/s".
//!
//! # What each backplane promises
//!
//! Both deliver every message published after `subscribe` returned, to every
//! subscriber (the publisher's own included), in publish order, and report what they
//! know about losses through [`BackplaneEvent`](strata::backplane::BackplaneEvent).
//! The core tracks per-origin sequence numbers and heartbeats on top, which catches
//! the losses a backplane cannot see. On the stream, heartbeats are kept in a hash per
//! namespace (`{prefix}:{bp}:beats:<namespace>`, without a TTL, so `volatile-*` eviction leaves it) and
//! appended as one digest entry per heartbeat interval, so a fleet of N reads one entry
//! per interval instead of N. Strong acknowledgements are pushed to their origin's own
//! channel (`{prefix}:{bp}:ack:<origin>`, subscribed on the subscriber's connection)
//! under the default push delivery, and appended to the origin's own stream of that
//! name only when the origin's connection was not there to receive them (read when it
//! reconnects); with blocking reads they always go to that stream (capped, expiring a
//! minute after its last entry), read in the same `XREAD` as the shared stream. On Pub/Sub the digest is published on the
//! channel and acknowledgements on the origin's own channel (`{prefix}:bp:ack:<origin>`,
//! subscribed on the same connection). With integrity keys heartbeats are published one
//! by one (N² deliveries per interval): a digest built in Redis could not be sealed.
//!
//! **Stream** ([`RedisStreamBackplane`], the default). A publish returns once Redis
//! has appended the message to the stream `{prefix}:{bp}` (with AOF `appendfsync
//! always` it is then on disk; otherwise it lives as long as the server's data). A
//! subscriber that loses its connection (a killed client, a restarted or paused
//! server, a network cut) reconnects and reads on from the last entry it saw, so
//! *nothing is lost while the stream still holds the entries*: it emits
//! `Disconnected`, delivers what it missed, then `Resumed { complete: true }`. The
//! stream is capped at about `max_len` entries (default 100 000): a subscriber away
//! for longer than the stream's window finds entries it never read trimmed, which it
//! detects exactly (entries are numbered) and reports as `Lost` then
//! `Resumed { complete: false }`; the core then flushes its L1. `replay(origin, from,
//! to)` answers from the stream while it still holds those messages, `Ok(None)`
//! otherwise. Subscribers learn of new entries as RESP3 pushes by default (each entry
//! is also published on a channel named like the stream: one `PUBLISH` per entry
//! however many subscribers; the stream is read where the pushes leave a gap, a quiet
//! spell or a reconnect), or by blocking `XREAD`s ([`StreamDelivery`]; always on
//! a Redis Cluster). Pushed reloads
//! ([`MessageBody::Reload`](strata::backplane::MessageBody::Reload)) are no entries: they
//! are published on `<stream>:reloads` to the pushed subscribers only (with blocking
//! reads there are none), so the stream never holds values. Staleness bound: when healthy, the propagation delay (a push, or
//! one `XREAD` round trip, after the publish: about 0.2 ms on loopback); when unhealthy (after
//! `Disconnected`, or when heartbeats stop), the core's `max_stale`.
//!
//! **Pub/Sub** ([`RedisPubSubBackplane`]). A publish returns once Redis has handed the
//! message to the subscribers connected at that moment. Messages published while a
//! subscriber is disconnected, or dropped by Redis because the subscriber was too slow
//! (`client-output-buffer-limit pubsub`), are gone: they are *not replayed*. The loss
//! is detected, by the disconnect itself (`Disconnected`, then
//! `Resumed { complete: false }` after resubscribing), by a subscriber-side `PING`
//! that stops answering, or by the core's per-origin sequence numbers and heartbeats;
//! and it is repaired by an L1 flush. A subscription channel that is full (a slow
//! receiver in the process) drops messages and reports `Lost` rather than growing
//! memory. `replay` always answers `Ok(None)`. Staleness bound: the propagation delay
//! when healthy; `max_stale` otherwise.
//!
//! # Redis Cluster
//!
//! [`RedisTier::cluster_builder`] and [`RedisStreamBackplane::cluster_builder`] take the
//! URLs of one or more nodes of a Redis Cluster (same credentials, TLS mode and
//! certificates as for one server; the other nodes are discovered) and talk to it
//! through redis-rs's cluster connection, which routes each script by its first key,
//! follows `MOVED`/`ASK` and refreshes its slot map when a node fails. Its client is
//! set up for a cache: 2 retries after a connection error with 10–100 ms waits (not
//! redis-rs's 16 retries of at least 1.28 s), each connection attempt bounded by
//! `connect_timeout`, no response timeout of its own (the tier's `op_timeout`, the
//! cache's `l2_timeout` and the backplane's timeouts bound every call). The Pub/Sub
//! backplane refuses a cluster (classic Pub/Sub is broadcast to every node and not
//! replayed).
//!
//! **Layout.** The keys are the same as on one server (see [`tier`]): every key of a
//! namespace carries the hash tag `{<namespace>}`, so every script touches one slot
//! and a batch lookup ([`RedisTier::lookup_many`]) is one script on one node; the
//! namespace lives on the master that serves that slot ([`key_slot`] of any of its
//! keys). To spread a large namespace over the masters, split it into shards, each
//! its own namespace (own meta hash, clock and epochs), named by
//! [`cluster_shard_namespace`]: shard `i` of `n` lands in the `i`-th `n`-th of the
//! slots; [`RedisTier::cluster_shards`] builds the
//! [`ShardedTier`](strata::ShardedTier) that does it ([`ClusterSlots`]). The build's checks run on every master: `PING` (reachability, credentials)
//! and `INFO memory` (the eviction policy; the worst one found is reported). Beyond
//! [`MINIMAL_ACL`], the ACL user needs `+cluster|slots` (the client reads the topology
//! with `CLUSTER SLOTS`).
//!
//! **The stream** `{prefix}:{bp}` and its counter share the hash tag `bp` (slot 5087,
//! whatever the prefix): they live on the master that serves slot 5087. Publishes go
//! through the cluster connection; each subscriber reads with `XREAD BLOCK` on a
//! dedicated cluster connection of its own, named on the stream's node.
//!
//! **What a failover does** (a master killed; its replica promoted after
//! `cluster-node-timeout` and an election, 2–3 s with a 1 s node timeout):
//! - *Tier*: calls to the failed master's slots fail (connection errors, or the cache's
//!   `l2_timeout`) until the promotion, then succeed by themselves with the slot map
//!   refreshed; no reconnect by hand. The cache's L2 breaker opens meanwhile and reads
//!   fall back as during any Redis outage. Other masters' namespaces are not affected.
//!   Writes the old master acknowledged but had not replicated are lost with it
//!   (Redis replication is asynchronous): an entry, a lease, a tombstone or the meta
//!   hash may go back in time. A meta hash that is lost makes the namespace cold. A
//!   clock that went back cannot let a late fill in: the clock ticks to the server's
//!   time in microseconds, so an invalidation after the failover ticks above every
//!   stamp the old master handed out. An invalidation itself that was lost stays lost,
//!   unless [`RedisTierBuilder::wait_for_replicas`] made the tier acknowledge it only
//!   once a replica had it (then it failed, and the cache retried it on the new
//!   master). Over a [`ShardedTier`](strata::ShardedTier), only the shards on the failed
//!   master are affected, and for 2 s after a shard's last failure its entries older
//!   than that failure are read as misses.
//! - *Stream*: publishes fail until the promotion; the subscribers report
//!   `Disconnected`, reconnect to the new master and read on from the last entry they
//!   saw: what the replica holds is replayed (`Resumed { complete: true }`). Entries the
//!   old master acknowledged but had not replicated are gone: the counter on the new
//!   master is then below the last number a subscriber read, or the next entries skip
//!   numbers, which the reader reports as `Lost` then `Resumed { complete: false }`, and
//!   the core flushes its L1; the per-origin sequence numbers and heartbeats catch the
//!   rest. Test: `cluster::cluster_failover_of_a_master`.
//!
//! # Write-behind queue
//!
//! [`RedisWriteBehindQueue`] keeps strata's write-behind saves in Redis until a flusher
//! has written them to the database; it behaves exactly like strata's in-process
//! reference queue (the tests run the queue conformance suite on one server, on a
//! Cluster and under [`WRITE_BEHIND_ACL`]).
//!
//! **Layout.** A namespace's queue is split into [`groups`](RedisWriteBehindQueueBuilder::groups)
//! (default 16); a key belongs to group FNV-1a(key) mod G. Group `g` of namespace `ns`
//! lives under `<prefix>:{<tag>}:q:`, where the tag is
//! [`cluster_shard_namespace`]`("wb:<ns>", g, G)`: one hash tag per group, so every
//! script touches one slot, and group `g` lands in the `g`-th `G`-th of the slots, so
//! on a Cluster the groups spread over the masters. Per group:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…q:r:<key>` | hash | one record per waiting key: `v` value, `s` sequence, `a` failed attempts, `d` dirty since (ms), `st` state (`d` due, `c` claimed, `x` dead), `o` claim owner, `r` when it was saved again during its claim; dead letters also `e` error, `xs` failed sequence, `xa` when |
//! | `…q:s` | sorted set | the schedule: every due or claimed key, score = due time, or claim end while claimed (a claim that runs out is therefore due again: how another instance takes over a dead one's claims) |
//! | `…q:d` | sorted set | the dirty index: every live key by dirty-since time (`stats`' oldest save) |
//! | `…q:x` | sorted set | the dead letters, by when they died (oldest first) |
//! | `…q:c` | hash | counters: `n` records, `b` bytes of values, `db` bytes of dead ones, `q` the last sequence |
//! | `…q:h` | stream | dead-letter history for operators (`key`, `seq`, `attempts`, `error`, `at`), `MAXLEN ~ 10000`; never read back |
//!
//! No queue key ever gets a TTL. Every time is the server's (`TIME` inside the
//! scripts), so instance clocks do not matter. A sequence is max(server time in µs,
//! the group's last sequence + 1): it grows per key even after the key's record was
//! deleted, and even if the server's clock steps back.
//!
//! **Scripts.** Each port method is one Lua script on the key's group (`save`,
//! `pending_value`, `ack`, `retry`, `release`, and `make_due` / `requeue_dead` of one
//! key); `ack` is conditional on the sequence, in the script, so a save that lands
//! during a flush is never lost. `stats`, `dead_letters` and `make_due` /
//! `requeue_dead` of every key fan out: one script over every group on one server, one
//! per group (concurrently) on a Cluster. `claim_due` visits the groups from a random
//! one until it has `max` keys: one script on one server, one call per group visited
//! on a Cluster (an idle poll costs G calls there). Every value a script reads is
//! checked: a record whose value is readable but whose other fields are not canonical
//! is repaired (kept, due at once, fresh sequence: the value is someone's latest save,
//! so it is written rather than lost); a record without a readable value is dropped;
//! counters that do not parse are recounted from the indexes; an index key of the
//! wrong type is dropped (its keys are indexed again when next read). These are
//! counted in [`RedisQueueCounters`] and logged; a script never fails on what it reads.
//!
//! **Limits.** [`QueueLimits`](strata::write_behind::QueueLimits) bound a namespace.
//! On one server they are exact: a save of a new key sums the counters of every group
//! (there are no slots to respect). On a Cluster no script may read another group's
//! slot, so each group holds its share, the bound divided by G rounded up: the
//! namespace holds at most about the bound, but a busy group may refuse a new key while
//! others have room (use `groups(1)` where an exact bound matters more than spreading).
//!
//! **Durability** ([`Durability`], on the builder):
//! - [`Acknowledged`](Durability::Acknowledged) (default): the save returned once Redis
//!   applied it. A `kill -9` of Redis loses what was not yet persisted: with AOF
//!   `everysec` about the last second, with RDB snapshots everything since the last
//!   one, without persistence everything. A failover loses what the replica lacked.
//! - [`Replicas`](Durability::Replicas): `WAIT n timeout` after the save; fewer
//!   confirmations fail the save (kind `Tier`, transient, naming how many confirmed;
//!   retrying is harmless since saves coalesce). Survives the loss of the master when a
//!   confirming replica is promoted. Needs `+wait`.
//! - [`AppendFsync`](Durability::AppendFsync): `build` requires `appendonly yes` and
//!   `appendfsync always` on every master serving the queue (`CONFIG GET`, or where the
//!   ACL denies it, `INFO persistence`), and fails with the fix otherwise. Redis then
//!   fsyncs the AOF before it answers, so a save survives `kill -9` (or a power loss)
//!   and a restart from the AOF. Redis 7.0 has no `WAITAOF` (added in 7.2), so the
//!   queue relies on the server's setting rather than a per-call wait.
//!
//! **Eviction.** `build` reads `INFO memory`: with `maxmemory` set and an `allkeys-*`
//! policy Redis may evict queue records, acknowledged saves lost without a trace, so
//! the build fails (message naming the policy and the fix) unless
//! [`allow_eviction_risk`](RedisWriteBehindQueueBuilder::allow_eviction_risk) turns it
//! into a warning. `noeviction` and `volatile-*` are fine: no queue key has a TTL.
//! Under `noeviction` over `maxmemory`, saves fail (the save script grows the data
//! set) while every other script runs with `allow-oom`, so flushers still drain.
//!
//! **ACL.** [`WRITE_BEHIND_ACL`] lists the commands (plus `+wait`, `+config|get` and
//! `+cluster|slots` where needed, see there).
//!
//! # Tag epochs are bounded
//!
//! Each `invalidate_tag` of a new tag leaves its epoch in the namespace's meta hash. At
//! most [`max_tag_epochs`](RedisTierBuilder::max_tag_epochs) are kept (default 10,000):
//! past it the older half is dropped and the namespace's *tag floor* rises to the newest
//! epoch dropped, below which tagged entries and fills are invalid. Nothing a dropped tag
//! invalidated comes back; tagged entries older than the floor load again. 100,000
//! distinct tags left 100,003 fields (8.2 MB by `MEMORY USAGE`) in the meta hash before;
//! about 5,000–10,000 fields (0.55–0.85 MB) now (see the README for the command).
//!
//! # Sharing a Redis: integrity keys
//!
//! Whoever can write under the key prefix can, by default, serve any row to the fleet
//! (a well-formed entry) or flush it (a forged message). With
//! [`integrity_keys`](RedisTierBuilder::integrity_keys) on the tier and on the backplane
//! ([`RedisStreamBackplaneBuilder::integrity_keys`],
//! [`RedisPubSubBackplaneBuilder::integrity_keys`]), everything they write carries an
//! HMAC-SHA256 under the first [`IntegrityKey`] (at least
//! [`MIN_INTEGRITY_KEY_BYTES`] bytes), and only what verifies under one of the keys is
//! read: put a new key first and keep the old one while its entries live, to rotate.
//!
//! **Protects against** writers to the prefix who lack the keys *creating or altering*
//! data: an entry they wrote or changed (value, version, schema identity, tags, the
//! stamp of a fill, an entry copied to another key, namespace or prefix) is a miss,
//! deleted and counted ([`RedisTierStats::integrity_failures`],
//! `strata_l2_integrity_failures_total`); a message they wrote (an invalidate-all, a
//! sequence jump, a bypass) is skipped and counted as `Malformed`, and on the stream its
//! entry number is ignored, so it cannot fake a loss. Never an error, never a value.
//!
//! **Does not protect against**:
//! - *Deletes and guard state.* Entries, the meta hash, tombstones, leases, the stream
//!   and its counter are not signed: deleting or rewriting them costs misses, a cold
//!   namespace, or a `Lost` (an L1 flush where messages are missing; an `INCR` of the stream counter, or a
//!   message signed with another key appended through the publish script, uses an entry
//!   number: a loss for every reader). Availability, not the rows served, except as
//!   below.
//! - *Replays of older signed data of the same key.* An older signed entry written back
//!   under its key is served if nothing the stamp check sees invalidated it: the check
//!   catches it when a tag or namespace invalidation happened since its stamp (a fill's
//!   stamp is signed), but not after a key invalidation (lookups do not consult
//!   tombstones, which expire anyway), not for an entry written by `insert` (its stamp
//!   is assigned in the script, after signing, so it can be raised), and not once the
//!   meta hash's epochs are rolled back (they are not signed). Expiries are not signed
//!   either (`touch` moves them), so a replayed entry lives as long as the writer likes.
//!   A replayed message repeats an invalidation (more misses) or is one the core's
//!   sequence tracking has seen already (counted as suspicious).
//! - Readers: nothing is encrypted; anyone who can read the prefix reads the rows.
//!
//! Cost: one HMAC-SHA256 per fill, set, lookup hit, publish and delivered message,
//! 32 bytes per entry and per message (see the README for the measured ratio).
//!
//! # Requirements on the server
//!
//! Redis ≥ 6.2 or Valkey (exclusive stream ranges, `XADD … MAXLEN ~`). The tier's
//! tombstones, clocks and epochs and the backplane's stream, counter and heartbeats
//! have no TTL, so under `volatile-*` only entries, leases and write-lock sets can be
//! evicted (see [`tier`], "Eviction policy"); under `allkeys-*` also the namespace meta
//! hash (the namespace goes cold) and the stream with its counter (a loss each
//! subscriber verifies, or flushes its L1 for). Keep the backplane on a server that
//! does not evict: sharing an `allkeys-lru` server with the tier, the meta hash was
//! evicted ~100× as often (README, "Redis under memory pressure"). The tier and the
//! stream backplane read `INFO memory` at build time and warn
//! ([`EvictionCheck::Warn`], the default) or refuse ([`EvictionCheck::Refuse`]).
//!
//! The least-privilege ACL is [`MINIMAL_ACL`] (commands, keys and channels under the
//! prefix; tested with the conformance suite and a backplane round trip), and
//! [`WRITE_BEHIND_ACL`] for the write-behind queue. A command a
//! script needs but the user lacks fails the call with `NOPERM the Redis ACL user may
//! not run <command>: grant +<command>`, never a silent miss.
//!
//! # Layout
//!
//! Each source module has one job, and dependencies point one way: the tier and the
//! backplanes build on `connection` and `reply`; a backplane knows the tier only to
//! publish through its connection (`share_connection`), the tier never knows a
//! backplane.
//!
//! | module | job |
//! |---|---|
//! | [`tier`] | [`RedisTier`]: its connection, counters and `build`; inside, `tier::port` (the [`Tier`](strata::tier::Tier) implementation), `tier::builder` ([`RedisTierBuilder`]'s settings and checks), `tier::startup` and `tier::eviction` (the build's checks), `tier::slots` (cluster hash slots, [`cluster_shard_namespace`]), `tier::format` (key names, the stored envelope, the lookup reply), `tier::lua` (the checks every script shares: strict numbers, the meta hash read and repaired) and `tier::scripts` (the Lua scripts, with the fill's version guard) |
//! | `backplane` | what both backplanes share: [`BackplaneStats`], the publishing connection, reconnect defaults |
//! | [`stream`] | [`RedisStreamBackplane`] (`backplane/stream.rs`, with `stream_builder.rs`, `stream_scripts.rs`, `stream_inner.rs` and the subscriber's readers `stream_reader.rs` (blocking reads) and `stream_push.rs` (pushes) beside it) |
//! | [`pubsub`] | [`RedisPubSubBackplane`] and its builder (`backplane/pubsub.rs`) |
//! | `connection` | [`ConnectionOptions`], the settings every builder shares; opening clients from URLs, password redaction, error mapping, reconnect backoff |
//! | `cluster` | the connection every call goes through, to one server or to a Redis Cluster, and the client that opens it |
//! | `managed` | the connection that replaces itself after repeated timeouts (the tier's, the publishers') |
//! | `reply` | reading values out of Redis replies |
//! | `integrity` | [`IntegrityKey`]: the optional HMAC-SHA256 of entries and messages |
//! | `tls` | [`TlsConfig`] |
//! | `write_behind` | [`RedisWriteBehindQueue`]: `mod.rs` (the queue, its counters), `builder.rs` ([`RedisWriteBehindQueueBuilder`], [`Durability`]), `checks.rs` (`build` and its server checks), `layout.rs` (groups and key names), `port.rs` (the port implementation) and `scripts.rs` (the Lua scripts) |

mod backplane;
mod cluster;
mod connection;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod integrity;
mod lua_source;
mod managed;
mod reply;
pub mod tier;
mod tls;
mod write_behind;

/// The least-privilege Redis ACL rule for the default prefix `strata` (the tier, warm-up
/// ranking, write locks, tag pruning, and both backplanes), as `ACL SETUSER` arguments
/// after the user, its password, `resetkeys resetchannels -@all`:
/// `ACL SETUSER app on >PASSWORD resetkeys resetchannels -@all <MINIMAL_ACL>`. For another
/// prefix, replace `strata:` in the key and channel patterns. `+info` is optional: the
/// tier's eviction check is skipped (with a debug log) when it is denied. (Builds before
/// 2026-12-06 also ran `DEL`, `EXISTS`, `HGET` and `ZCOUNT`: keep `+del +exists +hget
/// +zcount` until a rolling deploy from one of them has finished.) Tested by
/// `tier::a_least_privilege_acl_user_runs_the_tier_and_the_stream_backplane`.
pub const MINIMAL_ACL: &str = "~strata:* &strata:* +ping +info +evalsha +script|load +client|setname \
    +time +get +set +unlink +incr +pexpire +pttl +type \
    +getrange +strlen +hset +hmget +hgetall +hexists +hincrby +hdel +hlen +hrandfield +decr +xinfo \
    +zadd +zrem +zcard +zincrby +zrevrange +zremrangebyscore +zremrangebyrank +zunionstore \
    +xadd +xrange +xrevrange +xread +publish +subscribe";

/// The least-privilege Redis ACL rule for [`RedisWriteBehindQueue`] alone, with the
/// default prefix `strata`, as `ACL SETUSER` arguments after the user, its password,
/// `resetkeys resetchannels -@all` (combine it with [`MINIMAL_ACL`] for a user that also
/// runs the tier and the backplanes). `+info` is optional (the eviction check is skipped,
/// with a warning, where it is denied). Add `+wait` for [`Durability::Replicas`], and
/// `+config|get` for [`Durability::AppendFsync`] (without it the build falls back to
/// `INFO persistence`, which shows whether the AOF is on but not its fsync policy), and
/// on a Redis Cluster `+cluster|slots`. Tested by
/// `write_behind::write_behind_under_a_least_privilege_acl_user`.
pub const WRITE_BEHIND_ACL: &str = "~strata:* +ping +info +evalsha +script|load +time +type \
    +unlink +hmget +hset +hdel +hstrlen +zadd +zrem +zscore +zcard +zrange +zrangebyscore +xadd";

pub use backplane::BackplaneStats;
pub use backplane::pubsub::{RedisPubSubBackplane, RedisPubSubBackplaneBuilder};
pub use backplane::stream::{RedisStreamBackplane, RedisStreamBackplaneBuilder, StreamDelivery};
pub use backplane::{pubsub, stream};
pub use connection::ConnectionOptions;
pub use integrity::{IntegrityKey, MIN_INTEGRITY_KEY_BYTES};
pub use tier::{
    ClusterSlots, DEFAULT_CLUSTER_SHARDS, EvictionCheck, RedisTier, RedisTierBuilder, RedisTierStats,
    cluster_shard_namespace, key_slot,
};
pub use tls::TlsConfig;
pub use write_behind::{
    DEFAULT_QUEUE_GROUPS, Durability, RedisQueueCounters, RedisWriteBehindQueue, RedisWriteBehindQueueBuilder,
};

// Records the largest allocation per thread, for the unit tests of what a decoder
// allocates when a length prefix claims gigabytes (`backplane::tests`).
#[cfg(test)]
#[global_allocator]
static ALLOC: strata_testkit::alloc::PeakAlloc = strata_testkit::alloc::PeakAlloc;
