//! The backplane's health as this instance sees it: what the read path checks before
//! it serves or fills L1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Timestamp;

/// Backplane health, read by the read path and kept by the fleet's tasks.
#[derive(Default)]
pub(crate) struct Health {
    /// 0 while healthy; otherwise when the backplane was last known healthy.
    unhealthy_since: AtomicU64,
    /// True once the first subscription is live; before that L1 is not filled, since
    /// invalidations could not reach it.
    subscribed: AtomicBool,
    /// When this instance last received its own heartbeat back through the backplane:
    /// the end-to-end proof that the backplane delivers.
    last_own_heartbeat: AtomicU64,
    /// Set while some member may have committed a write whose L2 invalidation is not
    /// applied yet: it said so in its heartbeat, or this instance has not heard from it
    /// since it was cut off itself. Entries older than `max_stale` are not trusted
    /// then, from L1 or L2. Kept by the listener.
    doubted: AtomicBool,
}

impl Health {
    /// A cache without a backplane: subscribed (to nothing) from the start.
    pub(crate) fn without_backplane() -> Self {
        let h = Health::default();
        h.subscribed.store(true, Ordering::SeqCst);
        h
    }

    /// True once a subscription is live.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst)
    }

    pub(crate) fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::SeqCst);
    }

    /// When the backplane was last known healthy, if it is not now.
    #[inline]
    pub(crate) fn unhealthy_since(&self) -> Option<Timestamp> {
        match self.unhealthy_since.load(Ordering::SeqCst) {
            0 => None,
            t => Some(Timestamp(t)),
        }
    }

    /// Whether the backplane is healthy now (subscribed, and not marked unhealthy).
    pub(crate) fn is_healthy(&self) -> bool {
        self.is_subscribed() && self.unhealthy_since.load(Ordering::SeqCst) == 0
    }

    /// Marks the backplane healthy; true when that changed the state.
    pub(crate) fn mark_healthy(&self) -> bool {
        self.unhealthy_since.swap(0, Ordering::SeqCst) != 0
    }

    /// Marks the backplane unhealthy since `since` unless it already was (the bound on
    /// staleness counts from the earliest time); true when that changed the state.
    pub(crate) fn mark_unhealthy(&self, since: Timestamp) -> bool {
        self.unhealthy_since
            .compare_exchange(0, since.as_nanos().max(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Whether an invalidation another member could not apply yet may cover what L1 or
    /// L2 holds (see `doubted`).
    #[inline]
    pub(crate) fn is_doubted(&self) -> bool {
        self.doubted.load(Ordering::SeqCst)
    }

    /// Sets the doubt; true when that changed the state.
    pub(crate) fn set_doubted(&self, doubted: bool) -> bool {
        self.doubted.swap(doubted, Ordering::SeqCst) != doubted
    }

    /// When this instance last heard its own heartbeat back.
    pub(crate) fn last_own_heartbeat(&self) -> Timestamp {
        Timestamp(self.last_own_heartbeat.load(Ordering::Acquire))
    }

    /// True once this instance has heard its own heartbeat at least once.
    pub(crate) fn heard_own_heartbeat(&self) -> bool {
        self.last_own_heartbeat.load(Ordering::SeqCst) != 0
    }

    pub(crate) fn set_last_own_heartbeat(&self, at: Timestamp) {
        self.last_own_heartbeat.store(at.as_nanos(), Ordering::SeqCst);
    }

    /// Strong level: whether this instance's membership lease is held, i.e. its own
    /// heartbeat came back through the backplane less than half a lease ago. Half, so
    /// that it stops serving L1 before any other member gives up waiting for it.
    pub(crate) fn own_lease_held(&self, now: Timestamp, lease: Duration) -> bool {
        now.since(self.last_own_heartbeat()) <= lease / 2
    }
}
