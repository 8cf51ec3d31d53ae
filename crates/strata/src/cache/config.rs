//! The validated configuration a cache runs with, as [`CacheBuilder::build`]
//! (super::builder::CacheBuilder::build) leaves it.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::BreakerConfig;
use crate::clock::MAX_SETTING;
use crate::codec::Codec;
use crate::consistency::Consistency;
use crate::error::BuildError;
use crate::l1::WeighFn;
use crate::loader::Loader;
use crate::overload::LoadProtection;
use crate::scope::Scope;
use crate::tag_epochs::MIN_MAX_TAG_EPOCHS;

/// A value-to-tags function.
pub(crate) type TagFn<K, V> = Arc<dyn Fn(&K, &V) -> Vec<String> + Send + Sync>;
/// A value-to-version function.
pub(crate) type VersionFn<V> = Arc<dyn Fn(&V) -> Option<u64> + Send + Sync>;
/// An after-invalidate hook.
pub(crate) type InvalidateHook = Arc<dyn Fn(&Scope) + Send + Sync>;

/// Checks one duration setting: at most [`MAX_SETTING`] (365 days), and positive
/// unless `zero_ok`.
pub(crate) fn check_duration(setting: &'static str, d: Duration, zero_ok: bool) -> Result<(), BuildError> {
    if d <= MAX_SETTING && (zero_ok || !d.is_zero()) {
        return Ok(());
    }
    let fix = if zero_ok {
        "use a duration of at most 365 days"
    } else {
        "use a positive duration of at most 365 days"
    };
    Err(BuildError::new(setting, format!("is {d:?}"), fix))
}

/// Checks [`max_tag_epochs`](super::builder::CacheBuilder::max_tag_epochs): a prune
/// is O(n) under the L1 guards' tag lock, so n stays small enough for it to be short.
pub(crate) fn check_max_tag_epochs(n: usize) -> Result<(), BuildError> {
    if (MIN_MAX_TAG_EPOCHS..=1_000_000).contains(&n) {
        return Ok(());
    }
    Err(BuildError::new("max_tag_epochs", format!("is {n}"), "use 16 to 1,000,000 (default 10,000)"))
}

/// Every setting, checked.
pub(crate) struct Config<K, V> {
    pub(crate) namespace: String,
    pub(crate) max_capacity: u64,
    pub(crate) estimated_entries: usize,
    pub(crate) weigher: Option<WeighFn<K, V>>,
    pub(crate) l1_ttl: Duration,
    pub(crate) l2_ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) max_stale: Duration,
    pub(crate) fail_safe_max: Option<Duration>,
    pub(crate) fail_safe_throttle: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Duration,
    pub(crate) early_refresh_beta: f64,
    pub(crate) consistency: Consistency,
    pub(crate) l2_timeout: Duration,
    pub(crate) l2_busy_timeout: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) max_value_bytes: usize,
    pub(crate) heartbeat_interval: Duration,
    /// See [`CacheBuilder::broadcast_heartbeats`](super::builder::CacheBuilder::broadcast_heartbeats).
    pub(crate) broadcast_heartbeats: bool,
    /// See [`CacheBuilder::push_reloads`](super::builder::CacheBuilder::push_reloads): the
    /// largest encoded value pushed, 0 for none.
    pub(crate) push_reloads: usize,
    pub(crate) membership_lease: Duration,
    pub(crate) write_lock_ttl: Duration,
    pub(crate) max_tag_epochs: usize,
    pub(crate) tombstone_ttl: Duration,
    pub(crate) tags: Option<TagFn<K, V>>,
    pub(crate) version: Option<VersionFn<V>>,
    pub(crate) hooks: Vec<InvalidateHook>,
    /// Run after an invalidation another instance sent was applied here.
    pub(crate) remote_hooks: Vec<InvalidateHook>,
    pub(crate) loader: Option<Arc<dyn Loader<K, V>>>,
    pub(crate) codec: Arc<dyn Codec<V>>,
    /// The schema fingerprint of this cache's entries (see `crate::schema`).
    pub(crate) schema: u64,
    pub(crate) breaker: BreakerConfig,
    pub(crate) load: LoadProtection,
    pub(crate) seed: Option<u64>,
    pub(crate) warm_up: Option<super::warm_up::WarmUp>,
}

impl<K, V> Config<K, V> {
    pub(crate) fn is_strong(&self) -> bool {
        self.consistency == Consistency::Strong
    }

    /// Timeout of one backplane publish or replay: the L2 timeout, but at least 500 ms
    /// (a stream append is a write the server may fsync).
    pub(crate) fn backplane_timeout(&self) -> Duration {
        self.l2_timeout.max(Duration::from_millis(500))
    }

    /// How long fail-safe may serve an entry past its expiry (zero when off).
    pub(crate) fn fail_safe_extra(&self) -> Duration {
        self.fail_safe_max.unwrap_or_default()
    }
}

impl<K, V> std::fmt::Debug for Config<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("consistency", &self.consistency)
            .field("max_capacity", &self.max_capacity)
            .field("l1_ttl", &self.l1_ttl)
            .field("l2_ttl", &self.l2_ttl)
            .field("ttl_jitter", &self.jitter)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_stale", &self.max_stale)
            .field("fail_safe_max", &self.fail_safe_max)
            .field("loader_soft_timeout", &self.soft_timeout)
            .field("loader_hard_timeout", &self.hard_timeout)
            .field("l2_timeout", &self.l2_timeout)
            .field("l2_busy_timeout", &self.l2_busy_timeout)
            .field("load_protection", &self.load)
            .field("tags", &self.tags.is_some())
            .field("version", &self.version.is_some())
            .field("loader", &self.loader.is_some())
            .field("schema", &format_args!("{:016x}", self.schema))
            .field("hooks", &self.hooks.len())
            .field("remote_hooks", &self.remote_hooks.len())
            .field("warm_up", &self.warm_up)
            .finish_non_exhaustive()
    }
}
