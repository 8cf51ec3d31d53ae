//! The L2 port: a tier shared by the fleet (Redis/Valkey, or in-process for tests and
//! the embedded benchmark).
//!
//! # The fill-guard contract
//!
//! Every tier keeps, per namespace, an *invalidation clock*: a counter that every
//! invalidation (key delete, tag bump, namespace bump) advances. A [`Lookup::Miss`]
//! hands out a [`FillToken`] stamped with the clock's value at the time of the
//! lookup. [`Tier::fill`] must store the value only if, since that stamp, nothing
//! invalidated the key, the namespace, or any of the value's tags. Key invalidations
//! are remembered as *tombstones* that live at least [`TierConfig::tombstone_ttl`];
//! the core never fills later than the loader's hard timeout after the lookup, and
//! it refuses to build a cache whose tombstones would not outlive that.
//!
//! Entries are stamped with the token's stamp, and [`Tier::lookup`] must treat as a
//! miss any entry whose stamp is older than its namespace's or one of its tags' last
//! invalidation: that is what makes `invalidate_tag` and `invalidate_all` O(1).
//!
//! # Write locks
//!
//! [`Tier::lock`] marks a scope (keys, a tag, or the namespace) as being written: it
//! invalidates the scope as [`Tier::delete`], [`Tier::invalidate_tag`] or
//! [`Tier::invalidate_namespace`] would, and until the lock is released or expires,
//! every [`FillToken`] a lookup hands out for a covered key is *poisoned*: no fill with
//! it is ever stored, even after the lock is gone. Key tombstones written by a lock
//! live at least the lock's time to live plus [`TierConfig::tombstone_ttl`], so tokens
//! issued before the lock stay refused as long as a load could still be using them.
//! Several locks may cover one key (two writers); each is released by its id.
//! [`Tier::unlock`] invalidates the scope once more (tokens issued while the lock was
//! held may carry values read before the write committed) and drops the lock.
//!
//! A poisoned token carries the stamp [`FillToken::POISONED_STAMP`] (0), and only a
//! poisoned one does: clocks start at 1. The cache reads it through
//! [`FillToken::is_poisoned`] to keep a value out of L1 as well when L2 did not take
//! it, since a value loaded under a lock may predate a write that commits after the
//! load (and whose writer may die before it releases the lock).

mod budget;
mod busy;
#[cfg(feature = "testing")]
pub mod conformance;
mod in_process;
pub mod sharded;

pub use crate::tag_epochs::{DEFAULT_MAX_TAG_EPOCHS, MIN_MAX_TAG_EPOCHS};
pub use budget::LatencyBudget;
pub use busy::{Answered, await_while_answering};
pub use in_process::InProcessTier;
pub use sharded::{ShardedTier, ShardedTierBuilder};

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::Result;
use crate::scope::Scope;

/// One L2 entry as the tier stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The encoded value; `None` is a cached negative result ("no such row").
    pub value: Option<Bytes>,
    /// The row version reported by the loader, if any.
    pub version: Option<u64>,
    /// When the value was loaded.
    pub created: Timestamp,
    /// Fresh until this time; after it the entry is only used by fail-safe.
    pub soft_expiry: Timestamp,
    /// Dropped after this time (the tier's own TTL should end near it).
    pub hard_expiry: Timestamp,
    /// The invalidation-clock value under which this value was loaded.
    pub stamp: u64,
    /// Tags the value belongs to.
    pub tags: Vec<String>,
    /// How long the load took, for early refresh (XFetch).
    pub load_nanos: u64,
    /// The [schema fingerprint](crate::schema) of the cache that wrote the value: its
    /// value type's serde shape, codec and schema version. A cache decodes only entries
    /// carrying its own; tiers store it and never look at it.
    pub schema: u64,
}

/// The answer to a [`Tier::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A valid, fresh entry (its `soft_expiry` is in the future).
    Hit(Envelope),
    /// No fresh entry: fill with `token`.
    Miss {
        /// Presented back to [`Tier::fill`].
        token: FillToken,
        /// A valid entry whose `soft_expiry` has passed but whose `hard_expiry` has not:
        /// the core may serve it if the loader fails (fail-safe).
        stale: Option<Envelope>,
    },
}

/// Handed out on a miss; presented back to [`Tier::fill`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FillToken {
    /// The invalidation clock at the lookup.
    pub stamp: u64,
    /// The load lease, when this caller won it: the fleet's one loader for this key.
    pub lease: Option<u64>,
    /// True when this caller should run the loader; false when another instance holds
    /// the lease and this caller should wait briefly for its fill.
    pub leader: bool,
}

impl FillToken {
    /// The stamp of a poisoned token (see "Write locks" in the module docs). No tier
    /// hands it out otherwise: invalidation clocks start at 1.
    pub const POISONED_STAMP: u64 = 0;

    /// True when a write lock covered the key at the lookup: no fill with this token
    /// will ever be stored, and what was loaded under it may be older than a write
    /// about to commit.
    pub fn is_poisoned(&self) -> bool {
        self.stamp == Self::POISONED_STAMP
    }
}

/// What became of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The value was stored.
    Stored,
    /// The fill was refused because an invalidation happened since the lookup.
    Rejected,
    /// The fill was refused by the version guard: the tier holds a valid entry of a
    /// newer version (no invalidation needed: the loader read an older copy, a lagging
    /// replica say).
    Superseded,
}

/// Settings every tier implementation honours.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// How long key tombstones live: must exceed the longest loader hard timeout.
    pub tombstone_ttl: Duration,
    /// How many tag epochs a namespace keeps (default [`DEFAULT_MAX_TAG_EPOCHS`]; values
    /// below [`MIN_MAX_TAG_EPOCHS`] count as that). Past it the older half is pruned and
    /// the namespace's *tag floor* rises to the newest epoch pruned: a tagged entry or
    /// fill stamped below the floor is invalid, so pruning never brings back what a
    /// pruned tag invalidated (it may invalidate more, which only costs loads).
    pub max_tag_epochs: usize,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig { tombstone_ttl: Duration::from_secs(60), max_tag_epochs: DEFAULT_MAX_TAG_EPOCHS }
    }
}

/// The L2 port. All methods are async and object safe (`Arc<dyn Tier>`).
#[async_trait]
pub trait Tier: Send + Sync + 'static {
    /// A short name for metrics and logs ("in-process", "redis").
    fn name(&self) -> &str;

    /// The longest loader hard timeout this tier's tombstones protect against.
    fn tombstone_ttl(&self) -> Duration;

    /// A count that grows each time the tier hears back from its server (a reply to
    /// any call, whoever made it), or `None` when the tier cannot tell.
    ///
    /// The cache uses it to tell a busy tier from a stalled one: a call still running
    /// at the cache's `l2_timeout` is waited for while this count keeps growing (the
    /// server answers calls queued before it, so it is working through a backlog), up
    /// to `l2_busy_timeout`; a call that saw no reply at all during one `l2_timeout`
    /// fails as before (see [`CacheBuilder::l2_busy_timeout`](crate::CacheBuilder::l2_busy_timeout)).
    /// Default `None`: every call ends at `l2_timeout`, right for a tier that is never
    /// slow (in-process) or that bounds its calls itself.
    fn progress(&self) -> Option<u64> {
        None
    }

    /// Reads `key`. An entry is a hit while valid (see the module doc) and before its
    /// `soft_expiry`; a valid entry past `soft_expiry` but before `hard_expiry` comes back
    /// as `Miss { stale: Some(..) }`. On a miss, when `lease` is given, tries to take the
    /// load lease for that long; the token says whether this caller won it.
    async fn lookup(&self, namespace: &str, key: &str, lease: Option<Duration>) -> Result<Lookup>;

    /// Whether `key` has become a hit: the entry [`Tier::lookup`] would return as
    /// [`Lookup::Hit`], or `None` for anything else (a miss, a stale entry, or an
    /// answer only the full lookup can give). Takes no lease and repairs nothing.
    ///
    /// The cache asks it between the full lookups while it waits for another
    /// instance's fill, so it should cost the server as little as the tier can make
    /// it; the default is the full lookup without a lease.
    async fn peek(&self, namespace: &str, key: &str) -> Result<Option<Envelope>> {
        Ok(match self.lookup(namespace, key, None).await? {
            Lookup::Hit(env) => Some(env),
            Lookup::Miss { .. } => None,
        })
    }

    /// [`Tier::lookup`] of several keys, answered in the order of `keys`. Tiers that
    /// can should answer in one round trip (the core's batch reads rely on it); the
    /// default looks the keys up one by one.
    async fn lookup_many(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Option<Duration>,
    ) -> Result<Vec<Lookup>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.lookup(namespace, key, lease).await?);
        }
        Ok(out)
    }

    /// Stores a loaded value if no invalidation happened since `token` was issued, and
    /// (when both carry a [`Envelope::version`]) the tier does not hold a valid entry
    /// of a newer version: [`FillOutcome::Rejected`] for the first refusal,
    /// [`FillOutcome::Superseded`] for the second (the cache keeps such a value out of
    /// L1, while an invalidated one may stay there for `max_stale`, until the
    /// invalidation reaches it).
    async fn fill(
        &self,
        namespace: &str,
        key: &str,
        envelope: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> Result<FillOutcome>;

    /// Stores a value unconditionally (an explicit insert or a write-behind value). It
    /// counts as an invalidation of the key (advances the clock, leaves a tombstone, voids
    /// the lease) so that no fill that began earlier can overwrite it, and stamps the
    /// entry with the new clock value.
    async fn set(&self, namespace: &str, key: &str, envelope: Envelope, ttl: Duration) -> Result<()>;

    /// Deletes keys, leaves tombstones and voids their leases. Returns once the tier
    /// has applied the deletes.
    async fn delete(&self, namespace: &str, keys: &[String]) -> Result<()>;

    /// Invalidates every entry carrying `tag`, in O(1).
    async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<()>;

    /// Invalidates the whole namespace, in O(1).
    async fn invalidate_namespace(&self, namespace: &str) -> Result<()>;

    /// Invalidates `scope`: [`Tier::delete`], [`Tier::invalidate_tag`] or
    /// [`Tier::invalidate_namespace`].
    async fn invalidate(&self, namespace: &str, scope: &Scope) -> Result<()> {
        match scope {
            Scope::Keys(keys) => self.delete(namespace, keys).await,
            Scope::Tag(tag) => self.invalidate_tag(namespace, tag).await,
            Scope::All => self.invalidate_namespace(namespace).await,
        }
    }

    /// Gives up the load lease `token` holds without filling (the load failed, or its
    /// result is not to be stored), so the instances waiting for the fill stop waiting.
    /// A lease that is no longer `token`'s is left alone. The default does nothing: the
    /// lease then simply expires.
    async fn release_lease(&self, namespace: &str, key: &str, token: &FillToken) -> Result<()> {
        let _ = (namespace, key, token);
        Ok(())
    }

    /// Extends a live entry's life (sliding expiration). Returns false if there was
    /// no live entry.
    async fn touch(&self, namespace: &str, key: &str, soft_expiry: Timestamp, ttl: Duration) -> Result<bool>;

    /// Takes write lock `id` on `scope` for at most `ttl` (see "Write locks" in the
    /// module docs): invalidates the scope, and poisons the fill tokens handed out for
    /// it until [`Tier::unlock`] or the expiry. Returns once the tier applied it. A tag
    /// lock poisons the tokens of every key of the namespace while it is held: the
    /// tier cannot tell which values a load will tag.
    async fn lock(&self, namespace: &str, scope: &Scope, id: u64, ttl: Duration) -> Result<()>;

    /// Invalidates `scope` once more and drops write lock `id` (other locks on the
    /// scope stay). Dropping a lock that expired or never existed is not an error.
    async fn unlock(&self, namespace: &str, scope: &Scope, id: u64) -> Result<()>;

    /// Adds one instance's read counts since its last report to the namespace's
    /// shared ranking of hot keys (for warm-up, see
    /// [`CacheBuilder::warm_up`](crate::CacheBuilder::warm_up)): the ranking decays
    /// (older reports weigh less) and keeps at most `keep` keys.
    ///
    /// Default: the tier shares no ranking (nothing is recorded, and [`Tier::hot_keys`]
    /// is empty, so warm-up preloads nothing). A tier shared by a fleet should keep one.
    async fn record_hot_keys(&self, namespace: &str, counts: &[(String, u64)], keep: usize) -> Result<()> {
        let _ = (namespace, counts, keep);
        Ok(())
    }

    /// The namespace's `n` hottest keys, hottest first (see [`Tier::record_hot_keys`]).
    async fn hot_keys(&self, namespace: &str, n: usize) -> Result<Vec<String>> {
        let _ = (namespace, n);
        Ok(Vec::new())
    }
}
