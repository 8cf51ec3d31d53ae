//! The cache builder: every setter documents its default; `build()` checks the whole
//! configuration and says how to fix what is wrong.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::Cache;
use super::config::{Config, InvalidateHook, TagFn, VersionFn, check_duration, check_max_tag_epochs};
use super::state::Inner;
use super::tasks;
use super::warm_up::WarmUp;
use crate::backplane::Backplane;
use crate::breaker::BreakerConfig;
use crate::clock::{Clock, ClockSource};
use crate::codec::{Codec, PostcardCodec};
use crate::consistency::Consistency;
use crate::error::BuildError;
use crate::key::{CacheKey, CacheValue};
use crate::l1::WeighFn;
use crate::loader::Loader;
use crate::overload::LoadProtection;
use crate::schema;
use crate::scope::Scope;
use crate::tag_epochs::DEFAULT_MAX_TAG_EPOCHS;
use crate::tier::Tier;

/// The default of [`CacheBuilder::push_reloads`]: values of up to 4 KiB.
const DEFAULT_PUSH_RELOADS: usize = 4096;

/// Builds a [`Cache`]. Create it with [`Cache::builder`]. Every duration setting is at
/// most 365 days; [`build`](Self::build) names a setting out of range and its range.
#[must_use = "a builder does nothing until build() is called"]
pub struct CacheBuilder<K, V> {
    namespace: String,
    max_capacity: u64,
    estimated_entries: Option<usize>,
    weigher: Option<WeighFn<K, V>>,
    ttl: Duration,
    l1_ttl: Option<Duration>,
    l2_ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    max_stale: Duration,
    fail_safe_max: Option<Duration>,
    fail_safe_throttle: Duration,
    soft_timeout: Option<Duration>,
    hard_timeout: Duration,
    early_refresh_beta: f64,
    consistency: Option<Consistency>,
    pub(super) l2_timeout: Duration,
    pub(super) l2_busy_timeout: Option<Duration>,
    pub(super) lease_wait: Duration,
    pub(super) max_value_bytes: usize,
    pub(super) heartbeat_interval: Duration,
    pub(super) broadcast_heartbeats: bool,
    pub(super) push_reloads: usize,
    pub(super) membership_lease: Duration,
    write_lock_ttl: Duration,
    max_tag_epochs: usize,
    tags: Option<TagFn<K, V>>,
    version: Option<VersionFn<V>>,
    hooks: Vec<InvalidateHook>,
    pub(super) remote_hooks: Vec<InvalidateHook>,
    loader: Option<Arc<dyn Loader<K, V>>>,
    codec: Option<Arc<dyn Codec<V>>>,
    schema_version: u32,
    breaker: BreakerConfig,
    pub(super) load: LoadProtection,
    pub(super) tier: Option<Arc<dyn Tier>>,
    pub(super) backplane: Option<Arc<dyn Backplane>>,
    clock: ClockSource,
    seed: Option<u64>,
    warm_up: Option<WarmUp>,
    pub(super) write_behind: Option<crate::write_behind::WriteBehindConfig<K, V>>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: CacheKey, V: CacheValue> Cache<K, V> {
    /// Starts building a cache for `namespace` (a short name such as `"billsetting"`,
    /// used in L2 key names, backplane messages and metrics labels).
    pub fn builder(namespace: impl Into<String>) -> CacheBuilder<K, V> {
        CacheBuilder::new(namespace)
    }
}

impl<K: CacheKey, V: CacheValue> CacheBuilder<K, V> {
    fn new(namespace: impl Into<String>) -> Self {
        CacheBuilder {
            namespace: namespace.into(),
            max_capacity: 10_000,
            estimated_entries: None,
            weigher: None,
            ttl: Duration::from_secs(300),
            l1_ttl: None,
            l2_ttl: None,
            jitter: 0.1,
            negative_ttl: None,
            max_stale: Duration::from_secs(5),
            fail_safe_max: None,
            fail_safe_throttle: Duration::from_secs(1),
            soft_timeout: None,
            hard_timeout: Duration::from_secs(10),
            early_refresh_beta: 1.0,
            consistency: None,
            l2_timeout: Duration::from_millis(50),
            l2_busy_timeout: None,
            lease_wait: Duration::from_millis(500),
            max_value_bytes: 1 << 20,
            heartbeat_interval: Duration::from_secs(1),
            broadcast_heartbeats: false,
            push_reloads: DEFAULT_PUSH_RELOADS,
            membership_lease: Duration::from_secs(5),
            write_lock_ttl: Duration::from_secs(30),
            max_tag_epochs: DEFAULT_MAX_TAG_EPOCHS,
            tags: None,
            version: None,
            hooks: Vec::new(),
            remote_hooks: Vec::new(),
            loader: None,
            codec: None,
            schema_version: 0,
            breaker: BreakerConfig::default(),
            load: LoadProtection::default(),
            tier: None,
            backplane: None,
            clock: ClockSource::system(),
            seed: None,
            warm_up: None,
            write_behind: None,
            _types: PhantomData,
        }
    }

    /// L1 capacity: entries, or total weight with a [`CacheBuilder::weigher`]. Default 10 000.
    pub fn max_capacity(mut self, capacity: u64) -> Self {
        self.max_capacity = capacity;
        self
    }

    /// Weighs entries (e.g. in bytes) so that `max_capacity` bounds their total weight.
    /// `estimated_entries` sizes L1's tables. Default: every entry weighs 1.
    pub fn weigher(
        mut self,
        estimated_entries: usize,
        weigher: impl Fn(&K, &V) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.estimated_entries = Some(estimated_entries);
        self.weigher = Some(Arc::new(weigher));
        self
    }

    /// Time to live of entries in both tiers unless set separately. Default 5 minutes.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Time to live in L1. Default: [`ttl`](Self::ttl).
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Time to live in L2. Default: [`ttl`](Self::ttl).
    pub fn l2_ttl(mut self, ttl: Duration) -> Self {
        self.l2_ttl = Some(ttl);
        self
    }

    /// Random extra fraction added to every TTL (0.1 = up to +10 %), so that entries
    /// loaded together do not expire together. Default 0.1.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Caches "not found" results for this long. Default: not cached.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// While the backplane has been unhealthy for longer than this, L1 does not serve
    /// entries older than this, and entries loaded meanwhile live at most this long.
    /// Default 5 s.
    pub fn max_stale(mut self, max_stale: Duration) -> Self {
        self.max_stale = max_stale;
        self
    }

    /// Enables fail-safe: when the loader fails or times out, a copy that expired less
    /// than `max_duration` ago is served instead (counted as stale) and further loads of
    /// that key are throttled to one per `throttle`. Default: off; throttle 1 s.
    pub fn fail_safe(mut self, max_duration: Duration, throttle: Duration) -> Self {
        self.fail_safe_max = Some(max_duration);
        self.fail_safe_throttle = throttle;
        self
    }

    /// Past this, a load with a fail-safe copy at hand returns the copy at once and
    /// finishes in the background. Default: off.
    pub fn loader_soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Past this, a load is abandoned (fail-safe copy or a timeout error). Default 10 s.
    pub fn loader_hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = timeout;
        self
    }

    /// XFetch β: on a hit, refresh in the background when
    /// `now − Δ·β·ln(rand()) ≥ expiry`, Δ being the last load's duration. 0 disables
    /// early refresh; larger values refresh earlier. Default 1.0.
    ///
    /// A refresh looks in L2 first: an entry fresh for longer than the copy (another
    /// instance refreshed it, or L1's TTL is the shorter) is taken instead of loading
    /// ([`CacheStats::early_refreshes_from_l2`](crate::CacheStats::early_refreshes_from_l2)); one as old as the copy is loaded anew and
    /// replaced in L2, so the copies of a fleet that expire together cost about one load.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh_beta = beta;
        self
    }

    /// The consistency level. Default: `Invalidated` with a backplane, `Local` without.
    pub fn consistency(mut self, level: Consistency) -> Self {
        self.consistency = Some(level);
        self
    }

    /// How long a write lock ([`Cache::lock_for_write`]) holds at most if it is never
    /// released (its writer crashed or lost L2). A write must commit within the first
    /// half of it ([`WriteLock::is_valid`](crate::WriteLock::is_valid)); while a lock
    /// holds, its keys are not cached in L2 (every read of them loads). At the Strong
    /// level it must be at least six membership leases (the acknowledgement wait may
    /// take two). Default 30 s.
    pub fn write_lock_ttl(mut self, ttl: Duration) -> Self {
        self.write_lock_ttl = ttl;
        self
    }

    /// How many tag epochs (one per tag invalidated) the L1 guards keep, from 16 to
    /// 1,000,000; default 10,000. Past it the older half is pruned and every tagged L1
    /// entry or load older than the newest one pruned is treated as invalidated: tagged
    /// entries may load again sooner, none is ever served after its tag's invalidation.
    /// A pruning costs O(n) once per n/2 new tags. (The L2 tier has its own bound.)
    pub fn max_tag_epochs(mut self, n: usize) -> Self {
        self.max_tag_epochs = n;
        self
    }

    /// The tags of a value, for [`Cache::invalidate_tag`]. Default: no tags.
    pub fn tags(mut self, tags: impl Fn(&K, &V) -> Vec<String> + Send + Sync + 'static) -> Self {
        self.tags = Some(Arc::new(tags));
        self
    }

    /// The row version of a value (`updated_at`, a version column): a fill never
    /// replaces a live entry of a newer version, in L1 or in L2 (a load that read a
    /// lagging replica cannot overwrite what a newer load stored). [`Cache::insert`]
    /// is not checked: it states what the database now holds. Default: none.
    pub fn version(mut self, version: impl Fn(&V) -> Option<u64> + Send + Sync + 'static) -> Self {
        self.version = Some(Arc::new(version));
        self
    }

    /// Runs after each invalidation has been applied (L2 deleted, message published),
    /// in registration order: publish your domain events here. Default: none.
    pub fn after_invalidate(mut self, hook: impl Fn(&Scope) + Send + Sync + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// The loader [`Cache::fetch`], [`Cache::get_or_load_many`] and early refreshes of
    /// their entries read through. [`Cache::get_or_load`] takes its own per call.
    /// Default: none.
    pub fn loader(mut self, loader: impl Loader<K, V>) -> Self {
        self.loader = Some(Arc::new(loader));
        self
    }

    /// The L2 value codec. Default: postcard. Its [`name`](Codec::name) is part of the
    /// schema fingerprint (see [`schema_version`](Self::schema_version)).
    pub fn codec(mut self, codec: Arc<dyn Codec<V>>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// The version of the value type's meaning, for changes its serde shape does not
    /// show (same fields and types, new meaning: an amount in cents becomes one in
    /// units, a status variant is redefined).
    ///
    /// Every L2 entry carries the [schema fingerprint](crate::schema) of the cache that
    /// wrote it: the value type's serde shape (traced in [`build`](Self::build): field
    /// and variant names, order and types), the codec's name and this version. A cache
    /// reads an entry of another fingerprint as a miss (counted in
    /// [`CacheStats::l2_schema_mismatches`](crate::CacheStats)), never decodes it as its
    /// own type, and leaves it in place; its next fill of that key replaces it. So
    /// while two builds whose value types differ run side by side (a rolling deploy),
    /// they overwrite each other's entries, each reading its own or missing, never the
    /// other's as its own. A value type whose shape cannot be traced (it needs a
    /// self-describing format, or validates what it reads) is told apart by its Rust
    /// type name only, with a warning at build time: raise this version with every
    /// change of such a type. Default 0.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// The L2 circuit breaker's settings. Default: [`BreakerConfig::default`].
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// The clock (tests use `strata::testing::ManualClock`, feature `testing`). Default:
    /// the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = ClockSource::custom(clock);
        self
    }

    /// Seeds the random choices (TTL jitter, XFetch) for reproducible runs. Default:
    /// seeded from the OS.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Preloads the fleet's hot keys from L2 into L1 before [`Cache::ready`] resolves,
    /// and reports this instance's own to the tier's shared ranking (see [`WarmUp`]).
    /// Off by default; needs an L2 tier.
    pub fn warm_up(mut self, warm_up: WarmUp) -> Self {
        self.warm_up = Some(warm_up);
        self
    }

    /// Checks the configuration and builds the cache. With a backplane, it must be
    /// called inside a tokio runtime (background tasks are spawned).
    pub fn build(self) -> Result<Cache<K, V>, BuildError> {
        let consistency = self.consistency.unwrap_or(if self.backplane.is_some() {
            Consistency::Invalidated
        } else {
            Consistency::Local
        });
        self.check(consistency)?;
        let tombstone_ttl =
            self.tier.as_ref().map_or(self.hard_timeout.saturating_mul(2), |t| t.tombstone_ttl());
        let codec = self.codec.unwrap_or_else(|| Arc::new(PostcardCodec::<V>::default()));
        let schema = schema::fingerprint_for_cache::<V>(&self.namespace, codec.name(), self.schema_version);
        let config = Config {
            namespace: self.namespace,
            max_capacity: self.max_capacity,
            estimated_entries: self.estimated_entries.unwrap_or(self.max_capacity.min(1 << 24) as usize),
            weigher: self.weigher,
            l1_ttl: self.l1_ttl.unwrap_or(self.ttl),
            l2_ttl: self.l2_ttl.unwrap_or(self.ttl),
            jitter: self.jitter,
            negative_ttl: self.negative_ttl,
            max_stale: self.max_stale,
            fail_safe_max: self.fail_safe_max,
            fail_safe_throttle: self.fail_safe_throttle,
            soft_timeout: self.soft_timeout,
            hard_timeout: self.hard_timeout,
            early_refresh_beta: self.early_refresh_beta,
            consistency,
            l2_timeout: self.l2_timeout,
            l2_busy_timeout: self.l2_busy_timeout.unwrap_or(self.l2_timeout.saturating_mul(10)),
            lease_wait: self.lease_wait,
            max_value_bytes: self.max_value_bytes,
            heartbeat_interval: self.heartbeat_interval,
            broadcast_heartbeats: self.broadcast_heartbeats,
            push_reloads: self.push_reloads,
            membership_lease: self.membership_lease,
            write_lock_ttl: self.write_lock_ttl,
            max_tag_epochs: self.max_tag_epochs,
            tombstone_ttl,
            tags: self.tags,
            version: self.version,
            hooks: self.hooks,
            remote_hooks: self.remote_hooks,
            loader: self.loader,
            codec,
            schema,
            breaker: self.breaker,
            load: self.load,
            seed: self.seed,
            warm_up: self.warm_up,
        };
        let (inner, lifetime) = Inner::new(config, self.clock, self.tier, self.backplane, self.write_behind);
        if tokio::runtime::Handle::try_current().is_ok() {
            tasks::spawn(&inner);
        } else {
            // No task can preload anything: do not keep `ready` waiting for it.
            inner.warming_up.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Cache::new(inner, lifetime))
    }

    fn check(&self, consistency: Consistency) -> Result<(), BuildError> {
        if let Some(w) = &self.warm_up {
            w.check(self.tier.is_some())?;
        }
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(BuildError::new(
                "namespace",
                format!(
                    "{ns:?} is empty, longer than 64 characters or has characters other than [A-Za-z0-9-_.]"
                ),
                "use a short name such as \"billsetting\"",
            ));
        }
        if self.max_capacity == 0 {
            return Err(BuildError::new("max_capacity", "is 0", "use at least 1 (default 10 000)"));
        }
        if self.max_value_bytes == 0 {
            return Err(BuildError::new(
                "max_value_bytes",
                "is 0, so no value could be stored in L2",
                "use at least 1 byte (default 1 MiB)",
            ));
        }
        check_max_tag_epochs(self.max_tag_epochs)?;
        if let Some(busy) = self.l2_busy_timeout
            && busy < self.l2_timeout
        {
            return Err(BuildError::new(
                "l2_busy_timeout",
                format!("is {busy:?}, below l2_timeout ({:?})", self.l2_timeout),
                "use at least l2_timeout (equal turns the wait for a busy tier off), or leave the default (10 × l2_timeout)",
            ));
        }
        for (name, d, zero_ok) in [
            ("ttl", Some(self.ttl), false),
            ("l1_ttl", self.l1_ttl, false),
            ("l2_ttl", self.l2_ttl, false),
            ("negative_ttl", self.negative_ttl, false),
            ("max_stale", Some(self.max_stale), false),
            ("fail_safe", self.fail_safe_max, false),
            ("fail_safe", Some(self.fail_safe_throttle), false),
            ("loader_soft_timeout", self.soft_timeout, true),
            ("loader_hard_timeout", Some(self.hard_timeout), false),
            ("l2_timeout", Some(self.l2_timeout), false),
            ("l2_busy_timeout", self.l2_busy_timeout, false),
            ("lease_wait", Some(self.lease_wait), true),
            ("heartbeat_interval", Some(self.heartbeat_interval), false),
            ("membership_lease", Some(self.membership_lease), true),
            ("write_lock_ttl", Some(self.write_lock_ttl), false),
            ("tier.tombstone_ttl", self.tier.as_ref().map(|t| t.tombstone_ttl()), true),
        ] {
            if let Some(d) = d {
                check_duration(name, d, zero_ok)?;
            }
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BuildError::new(
                "ttl_jitter",
                format!("is {}", self.jitter),
                "use a fraction in 0.0..=1.0 (default 0.1)",
            ));
        }
        if !(self.early_refresh_beta >= 0.0 && self.early_refresh_beta.is_finite()) {
            return Err(BuildError::new(
                "early_refresh",
                format!("β is {}", self.early_refresh_beta),
                "use a finite β ≥ 0 (0 disables, default 1.0)",
            ));
        }
        if let Some(soft) = self.soft_timeout
            && soft >= self.hard_timeout
        {
            return Err(BuildError::new(
                "loader_soft_timeout",
                format!("{soft:?} is not below loader_hard_timeout {:?}", self.hard_timeout),
                "make loader_soft_timeout shorter than loader_hard_timeout",
            ));
        }
        if self.soft_timeout.is_some() && self.fail_safe_max.is_none() {
            return Err(BuildError::new(
                "loader_soft_timeout",
                "is set but fail-safe is off, so there is never a stale copy to return",
                "call .fail_safe(max_duration, throttle) too, or drop loader_soft_timeout",
            ));
        }
        if let Some(tier) = &self.tier
            && tier.tombstone_ttl() <= self.hard_timeout
        {
            return Err(BuildError::new(
                "loader_hard_timeout",
                format!(
                    "{:?} is not below the tier's tombstone lifetime {:?}, so a slow fill could outlive the \
                     evidence that it is stale",
                    self.hard_timeout,
                    tier.tombstone_ttl()
                ),
                "lower loader_hard_timeout or raise the tier's tombstone_ttl",
            ));
        }
        match (consistency, &self.backplane) {
            (Consistency::Local, Some(_)) => {
                return Err(BuildError::new(
                    "consistency",
                    "is Local but a backplane is set",
                    "drop .consistency(Local) (a backplane implies Invalidated) or drop the backplane",
                ));
            }
            (Consistency::Invalidated | Consistency::Strong, None) => {
                return Err(BuildError::new(
                    "consistency",
                    format!("{consistency:?} needs a backplane to tell other instances about invalidations"),
                    "call .backplane(...) or use Consistency::Local",
                ));
            }
            _ => {}
        }
        if consistency == Consistency::Strong
            && self.membership_lease < self.heartbeat_interval.saturating_mul(4)
        {
            return Err(BuildError::new(
                "membership_lease",
                format!(
                    "{:?} is shorter than four heartbeat intervals ({:?} each)",
                    self.membership_lease, self.heartbeat_interval
                ),
                "raise membership_lease or shorten heartbeat_interval",
            ));
        }
        if consistency == Consistency::Strong && self.write_lock_ttl < self.membership_lease.saturating_mul(6)
        {
            return Err(BuildError::new(
                "write_lock_ttl",
                format!(
                    "{:?} is shorter than six membership leases ({:?} each): a write could wait two \
                     leases for acknowledgements and still needs time to commit",
                    self.write_lock_ttl, self.membership_lease
                ),
                "raise write_lock_ttl or shorten membership_lease",
            ));
        }
        if consistency == Consistency::Strong && self.tier.is_none() {
            return Err(BuildError::new(
                "consistency",
                "Strong needs an L2 tier (its guarantees are about L2 being clean)",
                "call .tier(...) or use Consistency::Invalidated",
            ));
        }
        if (self.backplane.is_some() || self.tier.is_some()) && tokio::runtime::Handle::try_current().is_err()
        {
            return Err(BuildError::new(
                "runtime",
                "build() was called outside a tokio runtime, but a tier or backplane needs background tasks",
                "build the cache from async code running on tokio",
            ));
        }
        self.write_behind.as_ref().map_or(Ok(()), |w| w.check())?;
        self.breaker.validate()?;
        self.load.validate()
    }
}

impl<K, V> std::fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.namespace)
            .field("consistency", &self.consistency)
            .field("max_capacity", &self.max_capacity)
            .field("ttl", &self.ttl)
            .field("l1_ttl", &self.l1_ttl)
            .field("l2_ttl", &self.l2_ttl)
            .field("tier", &self.tier.as_ref().map(|t| t.name().to_owned()))
            .field("backplane", &self.backplane.as_ref().map(|b| b.name().to_owned()))
            .field("loader", &self.loader.is_some())
            .field("schema_version", &self.schema_version)
            .field("load_protection", &self.load)
            .finish_non_exhaustive()
    }
}
