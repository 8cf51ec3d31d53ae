//! Counters: kept in the cache (cheap, striped where the hit path touches them) and
//! exported to the `metrics` facade by a reporter task, so an L1 hit never calls into a
//! metrics recorder.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One cache line per stripe so that two threads counting hits never share a line.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

const STRIPES: usize = 16;

/// A counter written on hot paths from many threads: each thread adds to its own
/// stripe, reads sum the stripes.
#[derive(Default)]
pub(crate) struct StripedCounter {
    stripes: [Padded; STRIPES],
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = Cell::new(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES);
}

impl StripedCounter {
    #[inline]
    pub(crate) fn incr(&self) {
        let i = STRIPE.with(Cell::get);
        // Relaxed: a counter orders nothing; readers only want an eventually exact sum.
        self.stripes[i].0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// A plain counter for paths that are not hot.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn incr(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! stats {
    ($( $(#[$doc:meta])* $name:ident : $kind:ident ),* $(,)?) => {
        #[derive(Default)]
        pub(crate) struct Stats {
            $( pub(crate) $name: $kind, )*
        }

        /// A snapshot of a cache's counters (all since the cache was built).
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct CacheStats {
            $( $(#[$doc])* pub $name: u64, )*
            /// Entries resident in L1 (valid or not yet lazily expired).
            pub l1_entries: u64,
        }

        impl Stats {
            pub(crate) fn snapshot(&self, l1_entries: u64) -> CacheStats {
                CacheStats { $( $name: self.$name.get(), )* l1_entries }
            }

            pub(crate) fn export(&self, namespace: &str) {
                $(
                    metrics::counter!(concat!("strata_", stringify!($name), "_total"),
                        "namespace" => namespace.to_owned()).absolute(self.$name.get());
                )*
            }
        }
    };
}

stats! {
    /// Reads answered by L1.
    l1_hits: StripedCounter,
    /// Reads answered by L2.
    l2_hits: Counter,
    /// Reads that found nothing fresh in any tier.
    misses: Counter,
    /// Loader calls started.
    loads: Counter,
    /// Loader calls that failed.
    load_errors: Counter,
    /// Loader calls that passed the hard timeout.
    load_timeouts: Counter,
    /// Reads answered with a stale copy by fail-safe (loader failure, timeouts, throttle).
    stale_served: StripedCounter,
    /// Fills refused by a fill guard (an invalidation happened during the load).
    fills_rejected: Counter,
    /// Background refreshes started by early expiration (XFetch).
    early_refreshes: Counter,
    /// Times the XFetch rule fired on a hit (a refresh starts unless one is running).
    early_refresh_decisions: Counter,
    /// Reads that waited for another fleet member's fill instead of loading.
    lease_waits: Counter,
    /// Invalidation messages published.
    invalidations_sent: Counter,
    /// Invalidation messages received from other instances.
    invalidations_received: Counter,
    /// Keys, tags or namespaces invalidated locally because of a received message.
    invalidations_applied: Counter,
    /// Heartbeats received from other instances.
    heartbeats_received: Counter,
    /// Gaps detected in other instances' sequence numbers, or backplane disconnects.
    gaps_detected: Counter,
    /// Gaps repaired by replaying the missed messages.
    repairs_replayed: Counter,
    /// Gaps repaired by flushing L1.
    repairs_flushed: Counter,
    /// Malformed backplane messages skipped.
    malformed_messages: Counter,
    /// L2 calls that failed or timed out.
    l2_errors: Counter,
    /// L2 entries that could not be decoded (treated as misses and evicted).
    l2_undecodable: Counter,
    /// Values too large for L2 (kept out of it).
    oversized_values: Counter,
    /// L2 deletes or publishes that failed and were buffered for retry.
    invalidations_buffered: Counter,
    /// Reads that bypassed the cache because it could not be trusted (Strong level).
    bypassed_reads: Counter,
}
