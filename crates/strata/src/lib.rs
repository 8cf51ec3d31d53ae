//! # strata
//!
//! A cache for data that lives in a relational database, shared by a fleet of
//! application instances, that does not serve wrong data.
//!
//! Each [`Cache`] handle (one per namespace: `"billsetting"`, `"payment"`…) has an
//! in-process L1 ([quick_cache]), an optional shared L2 ([`Tier`](tier::Tier): Redis/Valkey in
//! `strata-redis`, or [`InProcessTier`]) and an optional invalidation [`Backplane`](backplane::Backplane)
//! ([`InProcessBackplane`] here, Redis Streams / Pub/Sub in `strata-redis`).
//!
//! ```
//! use std::sync::Arc;
//! use strata::{Cache, InProcessBackplane, InProcessTier};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tier = InProcessTier::new();
//! let hub = InProcessBackplane::new();
//! let cache: Cache<u64, String> = Cache::builder("billsetting")
//!     .tier(Arc::new(tier))
//!     .backplane(Arc::new(hub.connect()))
//!     .ttl(std::time::Duration::from_secs(24 * 3600))
//!     .build()?;
//! cache.ready().await;
//! let plan = cache
//!     .get_or_load(&42, || async { Ok::<_, std::io::Error>(Some("gold".to_string())) })
//!     .await?;
//! assert_eq!(plan.as_deref(), Some("gold"));
//! // After committing a change to row 42 in the database:
//! cache.invalidate(&42).await?;
//! # Ok(()) }
//! ```
//!
//! ## The consistency promise
//!
//! A *stale read* returns a value older than that of a write committed before the read
//! began; it is stale beyond a bound when that write committed more than the bound
//! before the read began. Bounds count from the commit, not from the invalidation's
//! return. strata bounds stale reads per [`Consistency`] level, provided every write
//! goes through [`Cache::invalidate`] (or [`Cache::insert`]) after its commit, or
//! through a change-capture path that calls it:
//!
//! | level | bound on stale reads |
//! |---|---|
//! | [`Consistency::Local`] | the L1 time to live (no invalidation reaches other instances) |
//! | [`Consistency::Invalidated`] | the backplane's propagation delay while it is healthy; `max_stale` (plus the time to detect it: three heartbeat intervals) while it is not, while a member's L2 delete waits for its retry, or for a row loaded with L2 failing under a write lock whose writer died before its release, or loaded while a write whose writer died before broadcasting it was under way; five heartbeat intervals (at least 1 s) after its last heartbeat for a writer killed between its L2 delete and its publish, plus `max_stale` for one cut off from the backplane that still reaches L2 (see *Silent members*) |
//! | [`Consistency::Strong`] | none for writes made under a [`WriteLock`] (linearizable per key); for a plain `invalidate` after a commit, until it returns; a failed L2 delete makes the cache *bypassed* (every read goes to the loader, `get` answers [`ErrorKind::Bypassed`]) until L2 is clean |
//!
//! What makes these bounds hold:
//!
//! * **Fill guards.** A load that began before an invalidation of its key, one of its
//!   tags or its namespace is never stored, in L1 (per-key tombstones that outlive the
//!   loader's hard timeout, and lazily compared tag and namespace epochs) or in L2 (the
//!   [`Tier`](tier::Tier) refuses fills whose token predates an invalidation). This holds even when
//!   the newer entry was evicted in between: tombstones, not entries, carry the proof.
//! * **No silent loss.** Every message carries its origin and a per-origin sequence
//!   number; heartbeats carry the last one. A gap, a lost subscription or a missed
//!   heartbeat is detected and repaired: by replay where the backplane can, else by
//!   flushing L1 (counted in [`CacheStats::repairs_flushed`]). A loss the backplane
//!   itself reports (a stream's entries trimmed or evicted before they were read, its
//!   counter restarted) is checked the same way below the Strong level: until every
//!   member heard in the last three heartbeat intervals has shown, by a message sent
//!   after the loss, that nothing of its is missing (or had its gap repaired), the
//!   backplane counts as unhealthy (the `max_stale` bound); a member that does not show
//!   it within three intervals costs a flush. Most such losses cost nothing
//!   ([`CacheStats::repairs_verified`]); at the Strong level, which must not
//!   acknowledge over a hole, a reported loss flushes L1.
//! * **In order, not given up.** An instance's messages leave in number order from
//!   its outbox, batched ([`Backplane::publish_batch`](backplane::Backplane::publish_batch))
//!   when they queued behind a slow publish. An `invalidate` that cannot wait (the
//!   backplane is down, or the publisher busy past 100 ms) returns an error, but its
//!   message stays queued and goes out in its turn, so the others see no gap
//!   ([`CacheStats::messages_left_queued`]; counted in `pending_invalidations`). That
//!   error says so ([`Error::is_queued`]): below Strong the write needs nothing more.
//!   A number is given up only when its message's publish failed three times or for
//!   good, or the outbox (4,096 messages) overflowed ([`CacheStats::messages_given_up`]):
//!   that gap costs every receiver a flush.
//! * **Liveness at O(N).** Heartbeats go through
//!   [`Backplane::heartbeat`](backplane::Backplane::heartbeat): the in-process and Redis
//!   stream and Pub/Sub backplanes keep each member's latest and deliver them all as one
//!   [`Digest`](backplane::MessageBody::Digest) per interval, so an idle fleet of N
//!   costs N deliveries per interval, not N² (20 instances: 18 instead of 360 per second
//!   in-process; 50: 45 instead of 2,320; `cargo run --release -p strata-redis --example
//!   idle_fleet`). A digest entry counts as a heartbeat when the member's beat count
//!   changed and it is younger than three intervals, so the gap detection, the
//!   doubt and the Strong membership read it exactly as they read heartbeats. Strong
//!   acknowledgements go to their origin alone ([`Backplane::publish_to`](backplane::Backplane::publish_to)):
//!   an invalidation costs 2N − 1 deliveries instead of N². A backplane that does
//!   neither (one of your own) falls back to broadcasting, and
//!   [`CacheBuilder::broadcast_heartbeats`] does so on purpose while a fleet is upgraded
//!   from a release that knows no digests.
//! * **Degraded mode.** While the backplane has been unhealthy longer than
//!   `max_stale`, L1 serves no entry older than `max_stale`, and what is loaded
//!   meanwhile lives at most `max_stale`. L2 deletes and messages that failed are
//!   buffered and retried every 100 ms, the L2 deletes past the instance's L2
//!   breaker (which guards reads: its cool-down must not keep a delete waiting once
//!   Redis answers).
//! * **Doubt.** Until a buffered L2 delete lands, L2 may serve the old row to any
//!   instance. The instance that buffered it serves no L2 entry it covers, and its
//!   heartbeats say one waits; every other instance then trusts no entry older than
//!   `max_stale`, from L1 or from L2 (such an L2 hit is loaded anew, and the load's
//!   fill replaces it; counted in [`CacheStats::l2_distrusted`]), until a plain
//!   heartbeat says the buffer is applied. An instance that was cut off from the
//!   backplane doubts every member it knew the same way until each has spoken again
//!   (or has been silent for 60 heartbeat intervals and is forgotten).
//!   [`CacheHealth::in_doubt`] shows it.
//! * **Silent members.** A member that stops beating while the others are heard
//!   (killed, or cut off from the backplane but not from L2) may have deleted an
//!   entry from L2 and not published the invalidation. After 5 silent heartbeat
//!   intervals (at least 1 s) every other instance flushes its L1 once and doubts that
//!   member as above until it speaks again or is forgotten
//!   ([`CacheStats::members_silent`]). A member that shuts down with nothing buffered
//!   says it leaves ([`Cache::shutdown`]), and costs the others nothing.
//! * **Single-flight and leases.** Concurrent misses on a key run one load per instance,
//!   and with a leasing tier one per fleet.
//! * **Pushed reloads.** Below the Strong level, the instance that reloads a key after
//!   another instance's invalidation, with a fill L2 accepted, sends the entry on the
//!   backplane ([`MessageBody::Reload`](backplane::MessageBody::Reload),
//!   [`CacheBuilder::push_reloads`]), and each instance that held the key installs it
//!   in L1 instead of reading L2 again, only if the last thing it heard about the key
//!   is that same invalidation (its L1 guard's tombstone records the message; no later
//!   invalidation of the key, a tag or the namespace, no write of its own, no repair,
//!   no doubt). The sender read the database after that invalidation reached it, so
//!   after the write it announced, and a backplane that delivers every origin's messages
//!   in one order ([`Backplane::delivers_in_one_order`](backplane::Backplane::delivers_in_one_order);
//!   no push otherwise) means the receiver heard no invalidation of the key that the
//!   sender had not: an install is as fresh as an L2 read when the push was sent. A lost
//!   push costs one L2 read.
//! * **Schema identity.** Every L2 entry carries the [schema fingerprint](schema) of the
//!   cache that wrote it: its value type's serde shape (field and variant names, order
//!   and types, traced at build time), its codec's name and
//!   [`CacheBuilder::schema_version`]. A cache decodes only entries of its own
//!   fingerprint, so a build whose value type changed (two fields swapped, an enum
//!   variant inserted) never reads another build's entry as its own type. Another
//!   fingerprint is a miss (counted in [`CacheStats::l2_schema_mismatches`]) and the
//!   entry is left in place: two builds running side by side (a rolling deploy)
//!   overwrite each other's entries, each reading its own or missing, never the other's
//!   as its own. Changes serde cannot see (same shape, new meaning) need a new schema
//!   version, and so does every change of a type whose shape cannot be traced (it is
//!   told apart by its name only; `build()` warns).
//! * **Versions.** With [`CacheBuilder::version`], a fill never replaces a live entry of
//!   a newer version, in L1 or L2: a load that read a lagging replica cannot overwrite
//!   what a newer load stored.
//! * **Write locks.** [`Cache::lock_for_write`] invalidates *before* a commit: it takes
//!   a lock in L2 (which poisons every fill token handed out while it holds, so nothing
//!   read before the commit can be stored there, even after the lock expired) and, at
//!   the Strong level, waits for the fleet's acknowledgements; [`WriteLock::release`]
//!   invalidates L2 again after the commit. A value loaded with a poisoned token is
//!   kept out of L1 too unless L2 took it, and one loaded while L2 was failing, within
//!   `write_lock_ttl` of an invalidation of its key, a tag or the namespace heard here,
//!   lives in L1 for `max_stale` at most ([`CacheStats::l1_fills_shortened`]): a writer
//!   dying after its commit leaves no instance serving the row read under its lock for
//!   longer than that (keeping such loads out of L1 altogether, as before, sent every
//!   read of the keys written lately, the hot ones, to the database for as long as L2
//!   failed). A value whose L2 fill an invalidation refused (one not heard here yet:
//!   heard during the load, the L1 guard refuses it) lives in L1 for `max_stale` at most
//!   too, until that invalidation arrives and drops it; a writer that died between its
//!   L2 delete and its broadcast leaves it served that long at most (kept out of L1, a
//!   key written more often than it loads was never cached). One refused because L2
//!   holds a newer version ([`FillOutcome::Superseded`](tier::FillOutcome::Superseded))
//!   stays out. With L1 filled only from L2 at the Strong
//!   level, no read can return the old row once any read returned the new one: reads
//!   and writes are linearizable per key (checked by `strata check --level strong`).
//! * **Strong acknowledgements.** At [`Consistency::Strong`], `invalidate` waits until
//!   every member heard within its membership lease has acknowledged the message, or its
//!   lease has lapsed, or it left ([`Cache::shutdown`] closes the cache, so that it serves
//!   nothing, before it says so); a member that has not heard its own heartbeat back for
//!   half a lease serves nothing from L1. This assumes the skew between members' clocks'
//!   rates and between their backplane deliveries stays under half a lease.
//!
//! Not promised, or bounded differently:
//!
//! * Writes that bypass both strata and change capture are only bounded by the TTL.
//! * When an L2 delete fails at the Invalidated level, other instances may read the old
//!   value back from L2 until they hear the writer's next heartbeat (one heartbeat
//!   interval, within the bound), and after that entries younger than `max_stale`
//!   (loaded before the commit): within `max_stale`. A writer killed between its L2
//!   delete and its publish, or cut off from the backplane while it reaches the
//!   database and L2: 5 heartbeat intervals plus `max_stale` (silent members, above),
//!   for as long as it is not forgotten (60 intervals). Not bounded: a writer that
//!   dies with deletes buffered (they are lost: the old entries stay in L2 until their
//!   TTL, or until change capture invalidates them; the others stop doubting it once
//!   it is forgotten), and one cut off from the backplane for longer than 60 intervals
//!   that keeps writing. At the Strong level the cache is bypassed instead.
//! * L1 time checks use this process's clock (1 ms resolution), L2 expiry the tier's.
//!   An entry L1 takes from L2 counts as created at the earlier of its load (on the
//!   clock of the instance that loaded it) and its fill here, and lives in L1 no longer
//!   than this instance's own TTL and fail-safe settings allow: a writer whose clock
//!   runs ahead cannot make an entry look young to `max_stale`; one whose clock runs
//!   behind makes entries look older, so in degraded mode they leave L1 sooner, never
//!   later. Ages L1 cannot hold (past about 4.8 days, with long TTLs) count as older
//!   than any `max_stale`.
//! * After [`Cache::shutdown`] nothing is served by any handle; invalidations still
//!   reach L2 and the backplane but are not acknowledged (`Shutdown` at the Strong level).
//!
//! ## Write-behind
//!
//! With [`CacheBuilder::write_behind`], [`WriteBehind::save`] returns once the value is
//! durable in the [`WriteBehindQueue`] (at the queue's level: `strata_redis`'s
//! `Durability`; [`InProcessQueue`] keeps it in this process only) and the key is
//! invalidated like any write. From then on reads anywhere return it (or a later save)
//! within the level's bound, never the database's older row: a load of a missing key
//! asks the queue first. An acknowledged save reaches the database at least once, in
//! sequence order per key (the sink's sequence guard makes replays and late batches
//! harmless), unless the queue loses it (its durability level says when) or it is
//! dead-lettered (it then stays readable until requeued). See [`write_behind`].
//!
//! ## Model-checked: single-flight and the fill guards
//!
//! The unit tests (part of `cargo test`, module `model_check`) run the real
//! single-flight table, fill guards, L1 table and fast-path floor under
//! [shuttle](https://docs.rs/shuttle), a deterministic-interleaving checker: their
//! locks and atomics come from one module (`sync`) that is `parking_lot` and `std`
//! everywhere else, and shuttle's inside a checked execution, so every lock and atomic
//! access is a point where the checker may switch tasks. The steps the cache takes
//! around them (read, flight, fill, invalidation) are replayed in the cache's order;
//! tokio, L2 and the backplane are outside the model (the integration tests and
//! `strata check` cover them). The races checked: three loads of one key and a write
//! with its key invalidation; loads racing a tag invalidation, a namespace invalidation
//! (the fast path's floor included), a capacity eviction, the tombstones' expiry, two
//! writes; a failing loader; a read that joins an early refresh. Each read must return
//! no version older than one whose invalidation had returned when it began; at the end
//! L1 must serve no stale version; loads of one key never overlap unless an
//! invalidation detached the first; no caller may hang (shuttle reports a deadlock).
//! Every scenario runs 1 000 schedules under the PCT scheduler and 500 under the random
//! one (about 2 s of CPU for all, in a debug build). To explore more:
//!
//! ```text
//! STRATA_SHUTTLE_ITERATIONS=100000 cargo test --release -p strata --lib model_check
//! ```
//!
//! A failure prints the schedule (or seed) that replays it with `shuttle::replay`.

//! ## Costs
//!
//! An L1 hit is a lookup in a quick_cache shard under its read lock plus a clock read and
//! two comparisons, and copies out the value alone; beyond the value's own clone it
//! touches no shared reference count, unless the entry is tagged or a fail-safe stale
//! copy (those are stored behind an `Arc`; see the `l1_hit` benchmark). Misses cost one
//! L2 round trip; invalidations one L2 round trip and one publish.
//!
//! ## Protecting the database
//!
//! Every loader call passes the cache's load gate ([`overload`]): at most
//! [`max_concurrent_loads`](CacheBuilder::max_concurrent_loads) at once (default 64),
//! and as many as a shared [`LoadLimiter`] allows, waiting up to
//! [`load_permit_wait`](CacheBuilder::load_permit_wait); and, when turned on, the loader
//! circuit breaker ([`loader_breaker`](CacheBuilder::loader_breaker)). A refused load is
//! answered from a fail-safe copy when there is one, else with
//! [`ErrorKind::Overloaded`] or [`ErrorKind::CircuitOpen`]. Invalidated copies are never
//! such a copy, and the `max_stale` bound still holds for them.

//! ## Layout
//!
//! | module | job |
//! |---|---|
//! | `cache` | the [`Cache`] handle, its [`CacheBuilder`], the read path (probe, single-flight, loads, batch reads, fail-safe), the write path (one invalidation algorithm for every [`Scope`], its retry buffer, [`WriteLock`]s), the L2 call wrapper (the one owner of the L2 breaker and timeout), the type-erased [`CacheHandle`], and the only place that spawns tasks |
//! | `fleet` | the fleet protocol: publishing with sequence numbers, Strong membership and acknowledgements, the listener (apply, gap detection, repair, health), the heartbeat; it reaches the cache through a small trait |
//! | `l1` | the in-process table (sharded quick_cache), slot packing, the fast path's floor, the fill guards (tombstones, tag and namespace epochs) |
//! | [`tier`] | the L2 port ([`Tier`](tier::Tier)) with its fill-guard contract, the in-process tier, the [`ShardedTier`] combinator (one sharding rule for a Redis Cluster's virtual shards and a ring of servers: rendezvous placement, per-shard fill-guard domains, breakers, gutter, hot-key copies), and the conformance suite every tier must pass (feature `testing`) |
//! | [`write_behind`] | write-behind: the [`WriteBehind`] handle, the flusher, the queue port ([`WriteBehindQueue`], with [`InProcessQueue`] and its conformance suite) and the [`Sink`] port |
//! | [`backplane`] | the backplane port ([`Backplane`](backplane::Backplane), [`Message`](backplane::Message)) and the in-process backplane |
//! | [`scope`] | [`Scope`]: these keys, one tag, or the namespace, used everywhere an invalidation travels |
//! | [`consistency`] | the [`Consistency`] levels |
//! | [`key`] | [`CacheKey`] and [`CacheValue`] |
//! | [`schema`] | the schema fingerprint every L2 entry carries: a value type's traced serde shape, the codec's name and the schema version |
//! | [`loader`] | the [`Loader`] port for read-through |
//! | [`overload`] | [`LoadLimiter`] and the load-protection settings; the gate itself is in `cache` |
//! | [`breaker`], [`clock`], [`codec`], [`error`] | circuit breaker, injectable time, value codecs, the one error type |
//! | `stats` | the counters behind [`CacheStats`] |
//! | `shutdown` | the signal that stops a cache's background tasks |
//! | `sync` | the locks and atomics of single-flight, the fill guards and L1: `parking_lot`'s and `std`'s, or the model checker's in unit tests |

mod cache;
mod fleet;
mod l1;
mod shutdown;
mod stats;
mod sync;
mod tag_epochs;

#[cfg(test)]
mod model_check;

pub mod backplane;
pub mod breaker;
pub mod clock;
pub mod codec;
pub mod consistency;
pub mod error;
pub mod key;
pub mod loader;
pub mod overload;
pub mod schema;
pub mod scope;
pub mod tier;
pub mod write_behind;

/// Test fixtures: a manual clock, and the conformance suite every [`Tier`]
/// implementation must pass. Behind the `testing` feature.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::clock::ManualClock;
    pub use crate::tier::conformance;
    pub use crate::write_behind::conformance as queue_conformance;
}

pub use backplane::InProcessBackplane;
pub use breaker::{BreakerConfig, BreakerState};
pub use cache::Cache;
pub use cache::builder::CacheBuilder;
pub use cache::erased::CacheHealth;
pub use cache::handle::CacheHandle;
pub use cache::warm_up::WarmUp;
pub use cache::write_lock::WriteLock;
pub use clock::{Clock, SystemClock, Timestamp};
pub use codec::{Codec, PostcardCodec};
pub use consistency::Consistency;
pub use error::{BuildError, Error, ErrorKind, Result};
pub use key::{CacheKey, CacheValue};
pub use loader::{BoxError, Loader, loader_fn};
pub use overload::LoadLimiter;
pub use scope::Scope;
pub use stats::CacheStats;
pub use tier::{InProcessTier, ShardedTier};
pub use write_behind::{
    InProcessQueue, Sink, SinkError, SinkItem, WhenFull, WriteBehind, WriteBehindConfig, WriteBehindQueue,
};
