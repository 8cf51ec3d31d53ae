//! The age of the value a hit returns, as the histogram `strata_hit_age_seconds`
//! (`tier` = `l1` or `l2`): how old is what users are served, which no hit ratio tells.
//! L1 hits are sampled (one in [`EVERY`] per thread) so that the hit path pays a
//! thread-local increment, not a call into the metrics recorder.

use std::cell::Cell;

use super::state::Inner;
use crate::clock::Timestamp;
use crate::key::{CacheKey, CacheValue};

/// One L1 hit in this many is measured.
const EVERY: u32 = 64;

thread_local! {
    static TICK: Cell<u32> = const { Cell::new(0) };
}

/// Whether this L1 hit is one of the sample.
#[inline]
pub(crate) fn sampled() -> bool {
    TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n % EVERY == 0
    })
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Records the age of what L1 holds for `key` (a sampled hit). The look does not
    /// count as a use of the key: the hit already did, and a second one on sampled
    /// hits only would make eviction depend on the sampling.
    #[cold]
    #[inline(never)]
    pub(crate) fn record_l1_hit_age(&self, key: &K, now: Timestamp) {
        if let Some(created) = self.l1.inspect(key, |slot| slot.meta(self.xfetch_lead).created()) {
            self.record_hit_age("l1", created, now);
        }
    }

    /// Records the age of a value served from `tier`, created at `created`.
    pub(crate) fn record_hit_age(&self, tier: &'static str, created: Timestamp, now: Timestamp) {
        // 0: the age did not fit its field; the value is old, by how much is unknown.
        if created.as_nanos() != 0 {
            metrics::histogram!("strata_hit_age_seconds", "namespace" => self.cfg.namespace.clone(), "tier" => tier)
                .record(now.since(created).as_secs_f64());
        }
    }
}
