//! The L1 side of every read: the hit path, and what decides whether an entry may be
//! served (freshness, fill guards, `max_stale`, the Strong lease, XFetch).

use rand::Rng;

use super::state::Inner;
use crate::clock::Timestamp;
use crate::key::{CacheKey, CacheValue};
use crate::l1::{Entry, Meta, Slot};

/// Where a read found its value. `Fresh` carries only the value, so the hit path moves
/// as little as possible.
pub(crate) enum Probe<V> {
    /// The value, and, when XFetch asks for a background refresh, until when the copy
    /// is fresh (the refresh takes an L2 entry that outlives it instead of loading).
    Fresh(Option<V>, Option<Timestamp>),
    /// Expired, but usable by fail-safe.
    Stale(Entry<V>),
    Absent,
}

/// What [`Inner::look`] took out of L1 under the shard lock.
pub(crate) enum Look<V> {
    /// A fresh hit's value, decided by the slot alone.
    Fast(Option<V>),
    /// A copy of the slot, for the slow path.
    Slow(Slot<V>),
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// The L1 lookup of every read. Kept small: it is the hit path.
    #[inline]
    pub(crate) fn probe(&self, key: &K, now: Timestamp) -> Probe<V> {
        match self.l1.read(key, |slot| self.look(slot, now)) {
            None => Probe::Absent,
            Some(Look::Fast(value)) => Probe::Fresh(value, None),
            Some(Look::Slow(slot)) => self.probe_slow(&slot, now),
        }
    }

    /// Runs under L1's shard lock: copies out the value when the slot decides the
    /// common case alone (inline: untagged, not a stale copy; fresh and outside the
    /// XFetch window; not invalidated by a namespace epoch; no degraded mode in force
    /// and not closed, which the floor rules out by being unreachable), else the whole
    /// slot for the slow path to decide outside the lock.
    ///
    /// The floor is read under the lock: a reader that finds an entry filled after a
    /// namespace invalidation's `l1.clear()` thus sees that invalidation's floor.
    #[inline(always)]
    pub(crate) fn look(&self, slot: &Slot<V>, now: Timestamp) -> Look<V> {
        if slot.is_fast_hit(now, self.fast_floor.load()) {
            Look::Fast(slot.fast_value())
        } else {
            Look::Slow(slot.clone())
        }
    }

    /// [`Cache::get_local`](crate::Cache::get_local) past the fast path.
    #[inline(never)]
    pub(crate) fn get_local_slow(&self, slot: &Slot<V>, now: Timestamp) -> Option<V> {
        match self.probe_slow(slot, now) {
            Probe::Fresh(value, _) => {
                self.stats.l1_hits.incr();
                value
            }
            _ => None,
        }
    }

    /// Everything the fast path of [`Inner::probe`] does not decide.
    #[inline(never)]
    pub(crate) fn probe_slow(&self, slot: &Slot<V>, now: Timestamp) -> Probe<V> {
        let meta = slot.meta(self.xfetch_lead);
        if self.is_closed()
            || !self.guards.valid(meta.fill_seq, slot.tag_slice())
            || !self.within_max_stale(&meta, now)
        {
            return Probe::Absent;
        }
        if now < meta.fresh_until {
            if meta.is_stale_copy() {
                self.stats.stale_served.incr();
            }
            let refresh = self.in_xfetch_window(&meta, now) && self.xfetch_fires(&meta, now);
            return Probe::Fresh(slot.value().cloned(), refresh.then_some(meta.fresh_until));
        }
        if now < meta.usable_until() { Probe::Stale(slot.to_entry(self.xfetch_lead)) } else { Probe::Absent }
    }

    /// While the backplane has been unhealthy longer than `max_stale`, entries older
    /// than `max_stale` are not served, nor at all while another member may have an L2
    /// delete buffered (the doubt: no grace then, the write it covers committed
    /// before we heard of it); at the Strong level, nothing is served while this
    /// instance's membership lease is not held.
    #[inline]
    fn within_max_stale(&self, meta: &Meta, now: Timestamp) -> bool {
        if self.cfg.is_strong() && !self.own_lease_held(now) {
            return false;
        }
        let doubted = self.health.is_doubted();
        let unhealthy = self.health.unhealthy_since();
        if !doubted && unhealthy.is_none() {
            return true;
        }
        let max = self.cfg.max_stale;
        if now.since(meta.created()) <= max {
            return true;
        }
        !doubted && unhealthy.is_some_and(|since| now.since(since) <= max)
    }

    #[cold]
    fn xfetch_fires(&self, meta: &Meta, now: Timestamp) -> bool {
        let beta = self.cfg.early_refresh_beta;
        let u: f64 = 1.0 - self.rng.lock().random::<f64>(); // (0, 1]
        let gap = meta.fresh_until.as_nanos().saturating_sub(now.as_nanos()) as f64;
        let fires = -(meta.load_nanos() as f64) * beta * u.ln() >= gap;
        if fires {
            self.stats.early_refresh_decisions.incr();
        }
        fires
    }

    /// Whether `now` is close enough to expiry for XFetch to possibly fire: it fires with
    /// probability `exp(-(expiry - now) / (Δβ))`, negligible beyond `XFETCH_HORIZON`·Δβ.
    #[inline]
    fn in_xfetch_window(&self, meta: &Meta, now: Timestamp) -> bool {
        let lead = self.xfetch_lead.of(meta.load_micros());
        lead != 0 && now.as_nanos().saturating_add(lead) >= meta.fresh_until.as_nanos()
    }
}
