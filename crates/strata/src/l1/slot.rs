//! How L1 stores an entry: [`Entry`] unpacked for the read and write paths, [`Slot`]
//! packed into 32 bytes for an 8-byte value so that a hit reads as few bytes as it can.

use std::sync::Arc;

use crate::clock::Timestamp;

/// Bookkeeping of an entry, `Copy`.
///
/// Size matters here: L1 stores it inside a [`Slot`], whose size the hit cost grows
/// with (see there), so the fields only the slow paths need are packed into one word,
/// rounded in the safe direction, and the slot packs that word further.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    /// Fresh until then.
    pub(crate) fresh_until: Timestamp,
    /// The local invalidation clock when the load that produced this entry began.
    pub(crate) fill_seq: u64,
    /// Bits 0..20: load time in µs (XFetch's Δ, saturating at ~1 s; 0 = no early
    /// refresh). Bit 20: a stale copy re-armed by fail-safe. Bits 21..42: how long past
    /// `fresh_until` fail-safe may use the entry, in 100 ms (rounded down, saturating
    /// down at ~2.4 days: fail-safe ends early, never late). Bits 42..64:
    /// `fresh_until − created`, in 100 ms (rounded up, so the entry never looks younger
    /// than it is); all ones when it does not fit (~4.85 days, less than a long TTL),
    /// which reads as created at 0: older than any `max_stale`, never younger.
    bits: u64,
}

const LOAD_BITS: u32 = 20;
const STALE_BIT: u64 = 1 << LOAD_BITS;
const EXTRA_SHIFT: u32 = 21;
const EXTRA_BITS: u32 = 21;
const AGE_SHIFT: u32 = 42;
const AGE_BITS: u32 = 22;
const UNIT_NANOS: u64 = 100_000_000;

fn mask(bits: u32) -> u64 {
    (1 << bits) - 1
}

impl Meta {
    pub(crate) fn new(
        created: Timestamp,
        fresh_until: Timestamp,
        usable_until: Timestamp,
        fill_seq: u64,
        load_nanos: u64,
    ) -> Self {
        let load = load_nanos.div_ceil(1000).min(mask(LOAD_BITS));
        let age = fresh_until
            .as_nanos()
            .saturating_sub(created.as_nanos())
            .div_ceil(UNIT_NANOS)
            .min(mask(AGE_BITS));
        let mut m = Meta { fresh_until, fill_seq, bits: load | (age << AGE_SHIFT) };
        m.set_usable_until(usable_until);
        m
    }

    /// When the value was loaded (never later than the truth, to 100 ms); 0 when the
    /// age did not fit its field.
    pub(crate) fn created(&self) -> Timestamp {
        let age = (self.bits >> AGE_SHIFT) & mask(AGE_BITS);
        if age == mask(AGE_BITS) {
            // Saturated: the truth is earlier than `fresh_until − age`, by how much is lost.
            return Timestamp(0);
        }
        Timestamp(self.fresh_until.as_nanos().saturating_sub(age * UNIT_NANOS))
    }

    /// Until when fail-safe may serve the entry.
    pub(crate) fn usable_until(&self) -> Timestamp {
        let extra = (self.bits >> EXTRA_SHIFT) & mask(EXTRA_BITS);
        Timestamp(self.fresh_until.as_nanos().saturating_add(extra * UNIT_NANOS))
    }

    pub(crate) fn set_usable_until(&mut self, t: Timestamp) {
        let extra =
            (t.as_nanos().saturating_sub(self.fresh_until.as_nanos()) / UNIT_NANOS).min(mask(EXTRA_BITS));
        self.bits = (self.bits & !(mask(EXTRA_BITS) << EXTRA_SHIFT)) | (extra << EXTRA_SHIFT);
    }

    /// Moves `fresh_until` keeping `created` and `usable_until` where they were.
    pub(crate) fn set_fresh_until(&mut self, fresh_until: Timestamp) {
        let created = self.created();
        let usable = self.usable_until();
        let age = fresh_until
            .as_nanos()
            .saturating_sub(created.as_nanos())
            .div_ceil(UNIT_NANOS)
            .min(mask(AGE_BITS));
        self.fresh_until = fresh_until;
        self.bits = (self.bits & !(mask(AGE_BITS) << AGE_SHIFT)) | (age << AGE_SHIFT);
        self.set_usable_until(usable);
    }

    /// Ends the entry's life by `until` at the latest, fail-safe use included.
    pub(crate) fn cap_life(&mut self, until: Timestamp) {
        if self.fresh_until > until {
            self.set_fresh_until(until);
        }
        if self.usable_until() > until {
            self.set_usable_until(until);
        }
    }

    #[inline]
    pub(crate) fn is_stale_copy(&self) -> bool {
        self.bits & STALE_BIT != 0
    }

    pub(crate) fn mark_stale_copy(&mut self) {
        self.bits |= STALE_BIT;
    }

    /// Δ for XFetch in µs; 0 disables early refresh.
    #[inline]
    pub(crate) fn load_micros(&self) -> u32 {
        // The mask keeps 20 bits, so the cast is lossless.
        (self.bits & mask(LOAD_BITS)) as u32
    }

    /// Δ for XFetch; 0 disables early refresh.
    #[inline]
    pub(crate) fn load_nanos(&self) -> u64 {
        (self.bits & mask(LOAD_BITS)) * 1000
    }

    pub(crate) fn disable_early_refresh(&mut self) {
        self.bits &= !mask(LOAD_BITS);
    }
}

/// Tags, behind a thin pointer.
pub(crate) type Tags = Arc<Vec<String>>;

/// One L1 entry, unpacked: what the read and write paths work with. L1 stores it as a
/// [`Slot`].
#[derive(Debug, Clone)]
pub(crate) struct Entry<V> {
    /// `None` is a cached negative result.
    pub(crate) value: Option<V>,
    pub(crate) meta: Meta,
    pub(crate) tags: Option<Tags>,
}

impl<V> Entry<V> {
    pub(crate) fn tag_slice(&self) -> &[String] {
        self.tags.as_deref().map_or(&[], Vec::as_slice)
    }
}

/// Bits of [`Meta::bits`] without the stale-copy bit: load time, then usable extra,
/// then age (63 bits). The low 56 ride in [`Body`]'s tag padding, the high 7 under
/// `fill_seq` in [`Slot::seq`].
const PACKED_LOW_BITS: u32 = 56;
const SEQ_SHIFT: u32 = 63 - PACKED_LOW_BITS;
/// Entries whose `fill_seq` reaches this (2^57 − 1 invalidations) are stored cold, so
/// that no inline `seq` reaches `u64::MAX`, the floor that rules out every slot.
const MAX_INLINE_SEQ: u64 = (1 << (64 - SEQ_SHIFT)) - 1;

/// How long before expiry XFetch may start firing for an entry, from its load time:
/// the same factor for every entry of a cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct XFetchLead {
    /// Nanoseconds of lead per µs of load time, at most 10^12.
    per_micro: u64,
}

impl XFetchLead {
    /// `per_micro` is capped at 10^12 ns, so that no lead overflows.
    pub(crate) fn new(per_micro: u64) -> Self {
        XFetchLead { per_micro: per_micro.min(1_000_000_000_000) }
    }

    /// The lead in ns (0: never); below 2^20 · 10^12, so it cannot overflow.
    #[inline]
    pub(crate) fn of(self, load_micros: u32) -> u64 {
        u64::from(load_micros) * self.per_micro
    }
}

/// An [`Entry`] as L1 stores it: 32 bytes for an 8-byte value, against 48 unpacked.
///
/// A hit reads the slot in place under the shard's read lock ([`L1::read`]), but the
/// bytes of every slot cost cache footprint: in our runs a raw quick_cache holding
/// 48-byte values costs 1.1–1.4× one holding 8-byte values, 32-byte values 1.05–1.25×
/// (there the whole value is also copied out). So the common
/// entry (untagged, not a fail-safe stale copy, `fill_seq` below 2^57 − 1, XFetch lead
/// not past the epoch) is stored inline, [`Meta::bits`] but the stale bit packed into
/// the 56 bits of padding after the enum tag and the 7 below the fill sequence; any
/// other entry is stored whole behind an `Arc` ([`Body::Cold`]), whose clone costs one
/// reference-count increment per hit.
///
/// Instead of the expiry, an inline slot holds the time the fast path may serve it
/// until, `fresh_until −` the XFetch lead, so that a hit checks one comparison where
/// it would compute the lead; the expiry is that plus the lead again.
#[derive(Clone)]
pub(crate) struct Slot<V> {
    /// `fresh_until − ` the XFetch lead, in nanoseconds; 0 for cold bodies, which the
    /// fast path thus never serves.
    fast_until: u64,
    /// `fill_seq << 7 | ` the high 7 of the 63 packed meta bits (unused for cold bodies).
    seq: u64,
    body: Body<V>,
}

/// The low 56 packed meta bits, split so that the compiler places them in the padding
/// after the enum tag: `lo` is bits 0..32, `mid` bits 32..48, `hi` bits 48..56. The fast
/// path reads none of them.
#[derive(Clone)]
enum Body<V> {
    Value { lo: u32, mid: u16, hi: u8, value: V },
    Negative { lo: u32, mid: u16, hi: u8 },
    Cold(Arc<Entry<V>>),
}

impl<V: Clone> Slot<V> {
    pub(crate) fn new(e: Entry<V>, lead: XFetchLead) -> Self {
        let m = e.meta;
        let fast_until = m.fresh_until.as_nanos().checked_sub(lead.of(m.load_micros()));
        let fast_until = match fast_until {
            Some(t) if e.tags.is_none() && !m.is_stale_copy() && m.fill_seq < MAX_INLINE_SEQ => t,
            _ => return Slot { fast_until: 0, seq: 0, body: Body::Cold(Arc::new(e)) },
        };
        // Drop the (clear) stale bit: load time below it, the rest above it.
        let packed = (m.bits & mask(LOAD_BITS)) | ((m.bits >> EXTRA_SHIFT) << LOAD_BITS);
        // The casts keep the bits each field is meant to hold.
        let (lo, mid, hi) = (packed as u32, (packed >> 32) as u16, (packed >> 48) as u8);
        let body = match e.value {
            Some(value) => Body::Value { lo, mid, hi, value },
            None => Body::Negative { lo, mid, hi },
        };
        Slot { fast_until, seq: (m.fill_seq << SEQ_SHIFT) | (packed >> PACKED_LOW_BITS), body }
    }

    /// The [`Slot::is_fast_hit`] floor that admits inline slots filled at or after
    /// `fill_seq`; `u64::MAX` admits none.
    pub(crate) fn floor(fill_seq: u64) -> u64 {
        if fill_seq >= MAX_INLINE_SEQ { u64::MAX } else { fill_seq << SEQ_SHIFT }
    }

    /// Whether the fast path may serve this slot: an inline entry, fresh and outside
    /// the XFetch window at `now`, at or above `floor` (from [`Slot::floor`]).
    #[inline(always)]
    pub(crate) fn is_fast_hit(&self, now: Timestamp, floor: u64) -> bool {
        // `seq` compares with a floor as its fill sequence would with the floor's
        // unshifted value: the bits below are less than one step.
        now.as_nanos() < self.fast_until && self.seq >= floor
    }

    /// `lead` must be the one the slot was made with.
    pub(crate) fn meta(&self, lead: XFetchLead) -> Meta {
        let (lo, mid, hi) = match &self.body {
            Body::Value { lo, mid, hi, .. } | Body::Negative { lo, mid, hi } => (*lo, *mid, *hi),
            Body::Cold(e) => return e.meta,
        };
        let packed = u64::from(lo)
            | (u64::from(mid) << 32)
            | (u64::from(hi) << 48)
            | ((self.seq & mask(SEQ_SHIFT)) << PACKED_LOW_BITS);
        let bits = (packed & mask(LOAD_BITS)) | ((packed >> LOAD_BITS) << EXTRA_SHIFT);
        let mut meta = Meta { fresh_until: Timestamp(0), fill_seq: self.seq >> SEQ_SHIFT, bits };
        // No overflow: this sum was `fresh_until` when the slot was made.
        meta.fresh_until = Timestamp(self.fast_until + lead.of(meta.load_micros()));
        meta
    }

    /// The value of a slot [`Slot::is_fast_hit`] admitted, which is never cold.
    #[inline(always)]
    pub(crate) fn fast_value(&self) -> Option<V> {
        match &self.body {
            Body::Value { value, .. } => Some(value.clone()),
            _ => None,
        }
    }

    pub(crate) fn value(&self) -> Option<&V> {
        match &self.body {
            Body::Value { value, .. } => Some(value),
            Body::Negative { .. } => None,
            Body::Cold(e) => e.value.as_ref(),
        }
    }

    pub(crate) fn tag_slice(&self) -> &[String] {
        match &self.body {
            Body::Cold(e) => e.tag_slice(),
            _ => &[],
        }
    }

    pub(crate) fn to_entry(&self, lead: XFetchLead) -> Entry<V> {
        match &self.body {
            Body::Cold(e) => Entry::clone(e),
            _ => Entry { value: self.value().cloned(), meta: self.meta(lead), tags: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOAD_NANOS: u64 = 123_456_789;

    fn entry(value: Option<u64>, fill_seq: u64, tags: Option<Tags>) -> Entry<u64> {
        let created = Timestamp(1_700_000_000_123_456_789);
        let fresh = Timestamp(created.0 + 3_600_000_000_123);
        let usable = Timestamp(fresh.0 + 86_400_000_000_000);
        Entry { value, meta: Meta::new(created, fresh, usable, fill_seq, LOAD_NANOS), tags }
    }

    fn tags() -> Option<Tags> {
        Some(Arc::new(vec!["t".to_owned()]))
    }

    #[test]
    fn inline_slot_is_32_bytes_for_8_byte_values() {
        assert_eq!(std::mem::size_of::<Slot<u64>>(), 32);
        assert_eq!(std::mem::size_of::<Slot<Arc<String>>>(), 32);
    }

    #[test]
    fn slots_round_trip_every_field() {
        let mut stale = entry(Some(7), 9, None);
        stale.meta.mark_stale_copy();
        let mut all_ones = entry(Some(u64::MAX), MAX_INLINE_SEQ - 1, None);
        all_ones.meta.bits = !STALE_BIT;
        let mut lead_past_epoch = entry(Some(7), 1, None);
        lead_past_epoch.meta.fresh_until = Timestamp(1);
        for lead in [XFetchLead::new(0), XFetchLead::new(28_000), XFetchLead::new(u64::MAX)] {
            for e in [
                entry(Some(7), 1, None),
                entry(None, 1, None),
                entry(Some(7), 5, tags()),
                stale.clone(),
                all_ones.clone(),
                lead_past_epoch.clone(),
                entry(Some(7), MAX_INLINE_SEQ, None),
                entry(Some(7), u64::MAX, None),
            ] {
                let slot = Slot::new(e.clone(), lead);
                let m = slot.meta(lead);
                assert_eq!(
                    (m.fresh_until, m.fill_seq, m.bits),
                    (e.meta.fresh_until, e.meta.fill_seq, e.meta.bits)
                );
                let back = slot.to_entry(lead);
                assert_eq!(
                    (back.value, back.meta.bits, back.tag_slice()),
                    (e.value, e.meta.bits, e.tag_slice())
                );
                assert_eq!(slot.value(), e.value.as_ref());
                assert_eq!(slot.tag_slice(), e.tag_slice());
            }
        }
    }

    #[test]
    fn a_saturated_age_reads_as_older_than_anything() {
        let created = Timestamp(1_700_000_000_000_000_000);
        let day = 86_400_000_000_000;
        for ttl_days in [1, 4, 5, 7, 365] {
            let fresh = Timestamp(created.0 + ttl_days * day);
            let meta = Meta::new(created, fresh, fresh, 1, 0);
            for m in [
                meta,
                Slot::new(Entry { value: Some(1u64), meta, tags: None }, XFetchLead::new(0))
                    .meta(XFetchLead::new(0)),
            ] {
                assert!(m.created() <= created, "ttl {ttl_days} days: created {:?}", m.created());
                assert!(created.0 - m.created().0 < UNIT_NANOS || m.created() == Timestamp(0));
                let mut moved = m;
                moved.set_fresh_until(Timestamp(fresh.0 + day));
                assert!(moved.created() <= created, "ttl {ttl_days} days, moved");
            }
        }
    }

    #[test]
    fn usable_until_never_comes_out_later_than_set() {
        let fresh = Timestamp(1_700_000_000_000_000_000);
        for extra in [0, 1, UNIT_NANOS - 1, UNIT_NANOS + 1, 86_400_000_000_000, u64::MAX / 2, u64::MAX] {
            let usable = fresh.saturating_add(std::time::Duration::from_nanos(extra));
            let m = Meta::new(fresh, fresh, usable, 1, 0);
            assert!(m.usable_until() <= usable, "extra {extra} ns");
            assert!(m.usable_until() >= fresh);
        }
    }

    #[test]
    fn fast_path_declines_what_it_cannot_decide() {
        let none = XFetchLead::new(0);
        let fresh = entry(Some(7), 5, None);
        let until = fresh.meta.fresh_until;
        let before = Timestamp(until.0 - 1);
        let floor5 = Slot::<u64>::floor(5);
        assert!(Slot::new(fresh.clone(), none).is_fast_hit(before, floor5));
        assert!(Slot::new(entry(None, 5, None), none).is_fast_hit(before, floor5));
        assert!(!Slot::new(fresh.clone(), none).is_fast_hit(before, u64::MAX));
        let mut highest = entry(Some(7), MAX_INLINE_SEQ - 1, None);
        highest.meta.bits = !STALE_BIT & !mask(LOAD_BITS);
        assert!(Slot::new(highest.clone(), none).is_fast_hit(before, Slot::<u64>::floor(MAX_INLINE_SEQ - 1)));
        assert!(!Slot::new(highest, none).is_fast_hit(before, u64::MAX));
        assert_eq!(Slot::<u64>::floor(MAX_INLINE_SEQ), u64::MAX);
        // Expired, or filled before the namespace epoch.
        assert!(!Slot::new(fresh.clone(), none).is_fast_hit(until, floor5));
        assert!(!Slot::new(fresh.clone(), none).is_fast_hit(before, Slot::<u64>::floor(6)));
        // Inside the XFetch window: its lead is the load time (123 457 µs) times 1000 ns.
        let lead = XFetchLead::new(1000);
        assert!(Slot::new(fresh.clone(), lead).is_fast_hit(Timestamp(until.0 - 123_457_001), floor5));
        assert!(!Slot::new(fresh.clone(), lead).is_fast_hit(Timestamp(until.0 - 123_457_000), floor5));
        // Cold bodies: tagged, stale copies.
        assert!(!Slot::new(entry(Some(7), 5, tags()), none).is_fast_hit(before, 0));
        let mut stale = fresh;
        stale.meta.mark_stale_copy();
        assert!(!Slot::new(stale, none).is_fast_hit(before, 0));
    }
}
