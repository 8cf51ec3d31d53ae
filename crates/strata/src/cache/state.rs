//! What a cache's handles and background tasks share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::config::Config;
use super::flight::Flights;
use super::gate::LoadGate;
use super::hot_keys::HotKeys;
use super::l2::L2;
use super::pending::Pending;
use crate::backplane::{Backplane, OriginId};
use crate::breaker::CircuitBreaker;
use crate::clock::{Clock, ClockKind, ClockSource, Timestamp};
use crate::fleet::{Fleet, FleetConfig, Health};
use crate::key::{CacheKey, CacheValue};
use crate::l1::{EntryWeighter, FastFloor, Guards, L1, Slot, XFetchLead};
use crate::shutdown::{self, Stop, StopSender};
use crate::stats::Stats;
use crate::tier::Tier;

/// XFetch fires with probability `exp(-(expiry - now) / (Δβ))`; below `e^-28` (≈7e-13)
/// we do not even draw the random number, which keeps ordinary hits free of it.
pub(crate) const XFETCH_HORIZON: f64 = 28.0;

/// Held by every handle; dropped with the last one, it stops the background tasks.
pub(crate) struct Lifetime {
    stop: StopSender,
}

impl Lifetime {
    pub(crate) fn stop(&self) {
        self.stop.stop();
    }
}

/// Everything a cache's handles and background tasks share.
pub(crate) struct Inner<K, V> {
    pub(crate) cfg: Config<K, V>,
    pub(crate) clock: ClockSource,
    pub(crate) l1: L1<K, V>,
    pub(crate) guards: Guards<K>,
    pub(crate) flights: Flights<K, V>,
    /// The shared tier behind its breaker and timeout; `None` without one.
    pub(crate) l2: Option<L2>,
    /// The publishing side of the fleet protocol; `None` without a backplane.
    pub(crate) fleet: Option<Fleet>,
    pub(crate) origin: OriginId,
    pub(crate) health: Health,
    pub(crate) stats: Stats,
    /// The load limits and the loader's breaker every loader call passes.
    pub(crate) gate: LoadGate,
    /// Invalidations that could not reach L2 or the backplane, retried in the background.
    pub(crate) pending: Mutex<Pending>,
    /// Set while L2 may hold a value that should have been deleted (Strong level): the
    /// cache is *bypassed*, every read goes to the loader.
    pub(crate) bypassed: AtomicBool,
    /// Set by `shutdown`: no handle serves or fills anything after it.
    pub(crate) closed: AtomicBool,
    /// When a tag or the whole namespace was last invalidated here (ns since the epoch):
    /// a load without a fill token (L2 failed) may have run under a write lock on it.
    pub(crate) wide_invalidated_at: AtomicU64,
    /// The sampled read counts warm-up ranks keys by; `None` without warm-up.
    pub(crate) hot_keys: Option<HotKeys>,
    /// Set until warm-up has preloaded the hot keys (never set without warm-up).
    pub(crate) warming_up: AtomicBool,
    /// What an L1 hit compares its slot with; see [`Inner::publish_fast_floor`].
    pub(crate) fast_floor: FastFloor,
    /// XFetch's window per µs of load time: β · `XFETCH_HORIZON` · 1000 ns.
    pub(crate) xfetch_lead: XFetchLead,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) stop: Stop,
    /// Write-behind's settings, counters and flusher state; `None` without it.
    pub(crate) write_behind: Option<Arc<crate::write_behind::Shared<K, V>>>,
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// The shared state of a new cache; its tasks are not running yet.
    pub(crate) fn new(
        cfg: Config<K, V>,
        clock: ClockSource,
        tier: Option<Arc<dyn Tier>>,
        backplane: Option<Arc<dyn Backplane>>,
        write_behind: Option<crate::write_behind::WriteBehindConfig<K, V>>,
    ) -> (Arc<Self>, Lifetime) {
        let stats = Stats::default();
        let l1 = L1::with_weighter(
            cfg.estimated_entries,
            cfg.max_capacity,
            EntryWeighter(cfg.weigher.clone()),
            stats.l1_evictions.handle(),
        );
        let breaker_clock: Arc<dyn Clock> = match clock.kind() {
            ClockKind::System(c) => Arc::new(c.clone()),
            ClockKind::Custom(c) => c.clone(),
        };
        let loader_breaker = cfg.load.breaker.clone().map(|b| {
            CircuitBreaker::with_clock(format!("loader:{}", cfg.namespace), b, breaker_clock.clone())
        });
        let gate = LoadGate::new(
            &cfg.namespace,
            &cfg.load,
            cfg.load.permit_wait.unwrap_or(cfg.hard_timeout),
            loader_breaker,
        );
        let l2 = tier.map(|tier| {
            let breaker = CircuitBreaker::with_clock(
                format!("l2:{}:{}", tier.name(), cfg.namespace),
                cfg.breaker.clone(),
                breaker_clock,
            );
            L2::new(tier, breaker, cfg.l2_timeout, cfg.l2_busy_timeout, cfg.namespace.clone())
        });
        let rng = match cfg.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        let origin = rand::rng().random::<u64>() | 1;
        let hot_keys = cfg.warm_up.as_ref().map(|w| HotKeys::new(w.sample_every, w.keys.saturating_mul(4)));
        let warming_up = cfg.warm_up.is_some();
        let fleet = backplane.map(|bp| {
            Fleet::new(
                bp,
                FleetConfig {
                    namespace: cfg.namespace.clone(),
                    origin,
                    strong: cfg.is_strong(),
                    heartbeat_interval: cfg.heartbeat_interval,
                    membership_lease: cfg.membership_lease,
                    timeout: cfg.backplane_timeout(),
                    addressed: !cfg.broadcast_heartbeats,
                },
            )
        });
        let health = if fleet.is_some() { Health::default() } else { Health::without_backplane() };
        let (stop_tx, stop) = shutdown::channel();
        let inner = Arc::new(Inner {
            // Tombstones outlive a write lock plus a load (see `Inner::invalidated_recently`).
            guards: Guards::new(
                cfg.tombstone_ttl.max(cfg.write_lock_ttl.saturating_add(cfg.hard_timeout)),
                cfg.max_tag_epochs,
            ),
            // What publish_fast_floor would store: epoch 0, healthy.
            fast_floor: FastFloor::new(if cfg.is_strong() { u64::MAX } else { Slot::<V>::floor(0) }),
            xfetch_lead: XFetchLead::new((cfg.early_refresh_beta * XFETCH_HORIZON * 1000.0).min(1e12) as u64),
            cfg,
            clock,
            l1,
            flights: Flights::new(),
            l2,
            fleet,
            origin,
            health,
            stats,
            gate,
            pending: Mutex::new(Pending::default()),
            bypassed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            wide_invalidated_at: AtomicU64::new(0),
            hot_keys,
            warming_up: AtomicBool::new(warming_up),
            rng: Mutex::new(rng),
            stop,
            write_behind: write_behind
                .map(|w| Arc::new(crate::write_behind::Shared::new(w, format!("{origin:016x}")))),
        });
        (inner, Lifetime { stop: stop_tx })
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(crate) fn is_bypassed(&self) -> bool {
        self.bypassed.load(Ordering::SeqCst)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Strong level: whether this instance's membership lease is held.
    pub(crate) fn own_lease_held(&self, now: Timestamp) -> bool {
        self.health.own_lease_held(now, self.cfg.membership_lease)
    }

    /// Whether the backplane is unhealthy (never without one).
    pub(crate) fn backplane_unhealthy(&self) -> bool {
        self.fleet.is_some() && self.health.unhealthy_since().is_some()
    }

    /// Resolves once the backplane subscription is live (at once without a backplane),
    /// and at the Strong level once this instance holds its membership lease; at once
    /// after `shutdown`.
    pub(crate) async fn wait_ready(&self) {
        self.wait_serving().await;
        let mut stop = self.stop.clone();
        while self.warming_up.load(Ordering::SeqCst) && !self.is_closed() {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(2)) => {}
                _ = stop.stopped() => return,
            }
        }
    }

    /// Resolves once L1 may be filled and served: the backplane subscription is live
    /// and (Strong) the membership lease held.
    pub(crate) async fn wait_serving(&self) {
        let mut stop = self.stop.clone();
        while !self.health.is_subscribed() || (self.cfg.is_strong() && !self.own_lease_held(self.now())) {
            if self.is_closed() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(2)) => {}
                _ = stop.stopped() => return,
            }
        }
    }

    /// Closes the cache for every handle: nothing is served from L1 or filled into it
    /// any more (the fast path's floor rules every slot out), L1 is dropped.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.publish_fast_floor();
        self.flights.detach_all();
        self.l1.clear();
    }

    /// Recomputes the fast path's floor; called after every change of the namespace
    /// epoch, of the backplane's health, and on close. A reader that finds an entry
    /// filled after a namespace invalidation's `l1.clear()` reads the floor after it,
    /// so it sees that invalidation's floor, as it would have seen its epoch.
    pub(crate) fn publish_fast_floor(&self) {
        self.fast_floor.publish(|| {
            if self.cfg.is_strong()
                || self.health.unhealthy_since().is_some()
                || self.health.is_doubted()
                || self.is_closed()
            {
                u64::MAX
            } else {
                Slot::<V>::floor(self.guards.namespace_epoch())
            }
        });
    }
}
