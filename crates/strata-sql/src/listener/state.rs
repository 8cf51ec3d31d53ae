//! What the listener's handle and its background task share: the settings the
//! builder filled in, the connection state and the counters.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use strata::CacheHandle;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of a [`ChangeListener`](super::ChangeListener)'s counters (since
        /// it started). Also exported as `strata_sql_listener_<name>_total` through the
        /// `metrics` facade.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct ChangeListenerStats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        #[derive(Default)]
        pub(crate) struct Counters {
            $( $name: AtomicU64, )*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> ChangeListenerStats {
                ChangeListenerStats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        pub(crate) enum Counter { $( $name, )* }

        impl Counters {
            pub(crate) fn add(&self, c: Counter, n: u64) {
                if n == 0 {
                    return;
                }
                match c {
                    $( Counter::$name => {
                        self.$name.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!(concat!("strata_sql_listener_", stringify!($name), "_total"))
                            .increment(n);
                    } )*
                }
            }
        }
    };
}

counters! {
    /// Genuine wake-ups received: one per committed transaction that changed a
    /// captured table (heartbeats excluded).
    notifications,
    /// Changes read from the outbox (one per changed row key, one per `TRUNCATE`).
    changes,
    /// Keys handed to `Cache::invalidate_many` (per cache).
    keys_invalidated,
    /// `TRUNCATE`s read (each invalidates the whole mapped cache).
    truncates,
    /// Notifications on the channel that the capture trigger did not send, ignored:
    /// anything but a wake-up or a heartbeat, a wake-up naming a transaction that wrote
    /// no change, and a second wake-up for one transaction (a replay). None of them
    /// invalidates anything: invalidations come from the outbox only.
    forged,
    /// Outbox rows with an unknown operation or no key: ignored.
    malformed,
    /// Keys that the mapped cache's `CacheKey::parse_key` rejected: ignored.
    unparsable_keys,
    /// Changes of a table no cache is mapped to: ignored.
    unmapped,
    /// Listening connections lost (closed, failed, or silent past the heartbeat timeout).
    connection_losses,
    /// Listening connections re-established after a loss.
    reconnects,
    /// Reconnections after which the changes committed meanwhile were read from the
    /// outbox (no flush needed).
    catch_ups,
    /// Completed rounds of `invalidate_all` on every mapped cache, when changes may have
    /// been missed: the outbox was pruned past what this listener had read (it was
    /// disconnected longer than the retention), or a read of it failed.
    resyncs,
    /// Caches flushed with `invalidate_all` by those rounds.
    resync_flushes,
    /// Own heartbeats received back.
    heartbeats,
    /// Heartbeats not received back in time (each counts as a connection loss).
    heartbeat_timeouts,
    /// Reads with more keys for one cache than `bulk_threshold`, applied as one
    /// `invalidate_all`.
    bulk_flushes,
    /// Cache invalidations that returned an error (the cache made itself safe: buffered
    /// retry or bypass).
    invalidation_errors,
    /// Failed attempts to (re)connect.
    connect_errors,
    /// Reads of the outbox that failed (the connection is then replaced).
    read_errors,
    /// Outbox rows deleted by this listener's pruning.
    pruned,
    /// Prunings that failed (e.g. the role may not delete from the outbox).
    prune_errors,
}

/// A table mapped to a target.
pub(crate) struct Mapping {
    pub(crate) schema: Option<String>,
    pub(crate) table: String,
    pub(crate) target: usize,
}

pub(crate) struct Config {
    pub(crate) options: PgConnectOptions,
    pub(crate) targets: Vec<CacheHandle>,
    pub(crate) mappings: Vec<Mapping>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) bulk_threshold: usize,
    pub(crate) max_batch: usize,
    /// How long outbox rows are kept (`None`: this listener does not prune).
    pub(crate) retention: Option<Duration>,
}

pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) connected: AtomicBool,
    pub(crate) backend_pid: AtomicI32,
    /// Tells this listener's heartbeats from other listeners'.
    pub(crate) id: String,
}

impl Shared {
    pub(crate) fn mark_connected(&self, pid: i32) {
        self.backend_pid.store(pid, Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
    }

    pub(crate) fn mark_disconnected(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.backend_pid.store(0, Ordering::SeqCst);
    }
}
