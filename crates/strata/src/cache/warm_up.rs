//! Warm-up before readiness: every instance reports which keys it reads most to the
//! tier's shared ranking; a starting instance preloads the fleet's hottest keys from
//! L2 into L1 (batched, bounded concurrency, within a time budget) before
//! [`Cache::ready`](crate::Cache::ready) resolves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;

use super::state::Inner;
use crate::clock::MAX_SETTING;
use crate::error::BuildError;
use crate::key::{CacheKey, CacheValue};
use crate::tier::Lookup;

/// Warm-up settings, for [`CacheBuilder::warm_up`](crate::CacheBuilder::warm_up).
///
/// Off by default: a small cache fills in seconds on its own, and the ranking costs
/// a sampled count on reads plus one L2 call per `report_every`. Turn it on where a
/// cold instance hurts: many instances, a hot set much larger than what a few seconds
/// of traffic load, or a shared tier that a cold start would hammer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmUp {
    pub(crate) keys: usize,
    pub(crate) budget: Duration,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) sample_every: u32,
    pub(crate) report_every: Duration,
}

impl Default for WarmUp {
    fn default() -> Self {
        WarmUp {
            keys: 1_000,
            budget: Duration::from_secs(10),
            batch: 100,
            concurrency: 4,
            sample_every: 16,
            report_every: Duration::from_secs(10),
        }
    }
}

impl WarmUp {
    /// The defaults: the 1,000 hottest keys, within 10 s, 100 keys per L2 round trip,
    /// 4 round trips at once; one read in 16 counted, reported every 10 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many of the fleet's hottest keys a starting instance preloads (1..=100,000).
    /// The shared ranking keeps twice as many.
    #[must_use]
    pub fn keys(mut self, n: usize) -> Self {
        self.keys = n;
        self
    }

    /// The longest a start waits for warm-up: past it, the instance reports ready with
    /// what it preloaded so far.
    #[must_use]
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// Keys per L2 round trip (1..=1,000).
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }

    /// L2 round trips in flight at once (1..=64).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Counts one read in `n` (rounded up to a power of two, 1..=1,024): the sampling
    /// keeps the cost on the hit path to a thread-local increment for the others.
    #[must_use]
    pub fn sample_every(mut self, n: u32) -> Self {
        self.sample_every = n;
        self
    }

    /// How often an instance adds its counts to the shared ranking (at least 100 ms).
    #[must_use]
    pub fn report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
        self
    }

    pub(crate) fn check(&self, has_tier: bool) -> Result<(), BuildError> {
        let fail = |what: &str, fix: &str| Err(BuildError::new("warm_up", what.to_owned(), fix.to_owned()));
        if !has_tier {
            return fail(
                "needs an L2 tier: the hot keys are shared and preloaded through it",
                "set a tier or drop warm_up",
            );
        }
        if !(1..=100_000).contains(&self.keys) {
            return fail(&format!("keys is {}", self.keys), "use 1..=100000 keys");
        }
        if !(1..=1_000).contains(&self.batch) {
            return fail(&format!("batch_size is {}", self.batch), "use 1..=1000 keys per round trip");
        }
        if !(1..=64).contains(&self.concurrency) {
            return fail(&format!("concurrency is {}", self.concurrency), "use 1..=64 round trips at once");
        }
        if !(1..=1_024).contains(&self.sample_every) {
            return fail(&format!("sample_every is {}", self.sample_every), "use 1..=1024");
        }
        if self.budget.is_zero() || self.budget > MAX_SETTING {
            return fail(&format!("budget is {:?}", self.budget), "use more than 0 and at most 365 days");
        }
        if self.report_every < Duration::from_millis(100) || self.report_every > MAX_SETTING {
            return fail(&format!("report_every is {:?}", self.report_every), "use 100 ms to 365 days");
        }
        Ok(())
    }
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Counts a read for the hot-key ranking (a sample of them), when warm-up is on.
    #[inline]
    pub(crate) fn note_read(&self, key: &K) {
        if let Some(hot) = &self.hot_keys
            && hot.sampled()
        {
            hot.record(key.to_key_string());
        }
    }

    /// Preloads the fleet's hottest keys, then marks warm-up done (also when it failed
    /// or ran out of time: warm-up makes a start cheaper, never impossible).
    pub(crate) async fn warm_up(self: Arc<Self>) {
        if let (Some(cfg), Some(l2)) = (&self.cfg.warm_up, &self.l2) {
            self.wait_serving().await;
            let preloading = async {
                let listed = l2.call("hot_keys", &self.stats, l2.tier().hot_keys(l2.ns(), cfg.keys)).await;
                let Ok(listed) = listed else { return };
                let keys: Vec<K> = listed.iter().filter_map(|k| K::parse_key(k)).collect();
                let batches: Vec<Vec<K>> = keys.chunks(cfg.batch).map(<[K]>::to_vec).collect();
                futures::stream::iter(batches)
                    .map(|batch| self.preload(batch))
                    .buffer_unordered(cfg.concurrency)
                    .collect::<Vec<()>>()
                    .await;
            };
            if tokio::time::timeout(cfg.budget, preloading).await.is_err() {
                self.stats.warm_up_timeouts.incr();
                tracing::warn!(namespace = %self.cfg.namespace, budget = ?cfg.budget, "warm-up ran out of time; ready with what it preloaded");
            }
        }
        self.warming_up.store(false, Ordering::SeqCst);
    }

    /// One L2 round trip: what L2 holds of `keys` goes into L1, through the fill guard.
    async fn preload(&self, keys: Vec<K>) {
        let Some(l2) = &self.l2 else { return };
        let start = self.guards.start(self.now());
        let key_strs: Vec<String> = keys.iter().map(CacheKey::to_key_string).collect();
        let Ok(lookups) =
            l2.call("lookup_many", &self.stats, l2.tier().lookup_many(l2.ns(), &key_strs, None)).await
        else {
            return;
        };
        for ((key, key_str), lookup) in keys.into_iter().zip(key_strs).zip(lookups) {
            if let Lookup::Hit(env) = lookup
                && let Some(entry) = self.entry_from_envelope(&key_str, env, start).await
                && self.fill_l1(&key, entry, start)
            {
                self.stats.warm_up_keys.incr();
            }
        }
    }

    /// Adds this instance's sampled counts to the shared ranking.
    pub(crate) async fn report_hot_keys(&self) {
        let (Some(cfg), Some(hot), Some(l2)) = (&self.cfg.warm_up, &self.hot_keys, &self.l2) else { return };
        let counts = hot.take_top(cfg.keys.saturating_mul(2));
        if counts.is_empty() {
            return;
        }
        let keep = cfg.keys.saturating_mul(2);
        let _ =
            l2.call("record_hot_keys", &self.stats, l2.tier().record_hot_keys(l2.ns(), &counts, keep)).await;
    }
}
