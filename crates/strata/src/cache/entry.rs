//! Entries: the TTL policy (jitter, negative caching, degraded mode), L2 envelopes in
//! and out, the size limit, and the guarded L1 fill.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::state::Inner;
use crate::clock::{Timestamp, mul_f64_saturating};
use crate::error::{Error, ErrorKind, Result};
use crate::key::{CacheKey, CacheValue};
use crate::l1::{Cause, Entry, LoadStart, Meta, Slot, Tags};
use crate::tier::{Envelope, FillToken};

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// `ttl` with the configured jitter added.
    fn jittered(&self, ttl: Duration) -> Duration {
        if self.cfg.jitter <= 0.0 {
            return ttl;
        }
        let f: f64 = self.rng.lock().random_range(0.0..=self.cfg.jitter);
        mul_f64_saturating(ttl, 1.0 + f)
    }

    /// How long an entry lives in a tier whose TTL is `base` (`negative_ttl` for a
    /// cached "not found"): jittered, and at most `max_stale` while the backplane is
    /// unhealthy (invalidations may not reach us, so what is loaded now lives briefly).
    fn entry_ttl(&self, base: Duration, negative: bool) -> Duration {
        let base = if negative { self.cfg.negative_ttl.unwrap_or(base) } else { base };
        let ttl = self.jittered(base);
        if self.backplane_unhealthy() { ttl.min(self.cfg.max_stale) } else { ttl }
    }

    pub(crate) fn tags_of(&self, key: &K, value: &V) -> Option<Tags> {
        self.cfg.tags.as_ref().map(|f| f(key, value)).filter(|t| !t.is_empty()).map(Arc::new)
    }

    pub(crate) fn version_of(&self, value: Option<&V>) -> Option<u64> {
        value.and_then(|v| self.cfg.version.as_ref().and_then(|f| f(v)))
    }

    /// A new L1 entry for a value loaded (or inserted) at `now`.
    pub(crate) fn make_entry(
        &self,
        value: Option<V>,
        now: Timestamp,
        load_nanos: u64,
        start: LoadStart,
        tags: Option<Tags>,
    ) -> Entry<V> {
        let fresh_until = now.saturating_add(self.entry_ttl(self.cfg.l1_ttl, value.is_none()));
        let usable_until = fresh_until.saturating_add(self.cfg.fail_safe_extra());
        Entry { value, meta: Meta::new(now, fresh_until, usable_until, start.seq, load_nanos), tags }
    }

    /// A new L2 envelope for an encoded value loaded (or inserted) at `now`.
    pub(crate) fn make_envelope(
        &self,
        value: Option<bytes::Bytes>,
        version: Option<u64>,
        now: Timestamp,
        load_nanos: u64,
        tags: Option<Tags>,
    ) -> Envelope {
        let soft_expiry = now.saturating_add(self.entry_ttl(self.cfg.l2_ttl, value.is_none()));
        Envelope {
            value,
            version,
            created: now,
            soft_expiry,
            hard_expiry: soft_expiry.saturating_add(self.cfg.fail_safe_extra()),
            stamp: 0,
            tags: tags.map(|t| t.as_ref().clone()).unwrap_or_default(),
            load_nanos,
            schema: self.cfg.schema,
        }
    }

    /// The tier TTL of an envelope: until its hard expiry.
    pub(crate) fn l2_store_ttl(&self, env: &Envelope, now: Timestamp) -> Duration {
        env.hard_expiry.since(now).max(Duration::from_millis(1))
    }

    /// Encodes a value for L2, refusing one larger than `max_value_bytes`.
    pub(crate) fn encode_checked(&self, value: &V) -> Result<bytes::Bytes> {
        let bytes = self.cfg.codec.encode(value)?;
        if bytes.len() > self.cfg.max_value_bytes {
            self.stats.oversized_values.incr();
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "value of {} bytes exceeds max_value_bytes ({}); raise the limit or store less",
                    bytes.len(),
                    self.cfg.max_value_bytes
                ),
            ));
        }
        Ok(bytes)
    }

    /// Decodes an L2 envelope into an L1 entry; an undecodable one is deleted, counted
    /// and read as a miss (`None`). One of another schema (written by a build whose
    /// value type, codec or schema version differ) is never decoded: it is counted and
    /// read as a miss, and left in place for its own build (see `replacement_token`).
    pub(crate) async fn entry_from_envelope(
        &self,
        key_str: &str,
        env: Envelope,
        start: LoadStart,
    ) -> Option<Entry<V>> {
        match self.decode_envelope(key_str, env, start) {
            Ok(entry) => entry,
            Err(e) => {
                self.stats.l2_undecodable.incr();
                tracing::warn!(error = %e, key = key_str, namespace = %self.cfg.namespace, "undecodable l2 entry evicted");
                if let Some(l2) = &self.l2 {
                    let _ = l2
                        .call("delete", &self.stats, l2.tier().delete(l2.ns(), &[key_str.to_owned()]))
                        .await;
                }
                None
            }
        }
    }

    /// Decodes an envelope into an L1 entry: `Ok(None)` for one of another schema
    /// (counted), an error when its value does not decode.
    pub(crate) fn decode_envelope(
        &self,
        key_str: &str,
        env: Envelope,
        start: LoadStart,
    ) -> Result<Option<Entry<V>>> {
        if env.schema != self.cfg.schema {
            self.stats.l2_schema_mismatches.incr();
            tracing::debug!(key = key_str, namespace = %self.cfg.namespace, schema = env.schema, "l2 entry of another schema: a miss");
            return Ok(None);
        }
        let value = env.value.as_deref().map(|b| self.cfg.codec.decode(b)).transpose()?;
        let now = self.now();
        // The envelope's times are on the clock of whichever instance loaded the value.
        // L1's checks are on ours: the entry is no younger than our fill (a writer whose
        // clock runs ahead would otherwise make it look young for as long as its skew,
        // and `max_stale` would not hold), and older if the envelope says so (we cannot
        // tell a writer running behind from an old value, and older is the safe side).
        let created = env.created.min(now);
        let l1_fresh = now.saturating_add(self.entry_ttl(self.cfg.l1_ttl, false));
        let fresh_until = env.soft_expiry.min(l1_fresh);
        let usable_until =
            env.hard_expiry.min(fresh_until.saturating_add(self.cfg.fail_safe_extra())).max(fresh_until);
        Ok(Some(Entry {
            value,
            meta: Meta::new(created, fresh_until, usable_until, start.seq, env.load_nanos),
            tags: (!env.tags.is_empty()).then(|| Arc::new(env.tags)),
        }))
    }

    /// When `env`, an L2 hit, is of another schema: the token to replace it with this
    /// cache's next load of the key. A hit hands out no token; this one carries the
    /// entry's stamp, which is as safe as the lookup's: the entry being valid at the
    /// lookup shows that nothing invalidated the key, its tags or the namespace since
    /// that stamp (an invalidation would have removed or outdated it), and the tier
    /// still refuses the fill if anything does before it lands. It holds no lease, and
    /// no write lock poisons it: under a lock, a lookup can only hit an entry inserted
    /// after the lock invalidated the key, by a writer stating the committed row, so a
    /// load that starts after such a hit reads that row too.
    ///
    /// An entry this instance does not trust ([`Inner::l2_distrusts`]) is replaced the
    /// same way, by a load that starts after the lookup.
    pub(crate) fn replacement_token(&self, key_str: &str, env: &Envelope) -> Option<FillToken> {
        (env.schema != self.cfg.schema || self.l2_distrusts(key_str, env)).then_some(FillToken {
            stamp: env.stamp,
            lease: None,
            leader: true,
        })
    }

    /// Whether an L2 hit must not be served: an L2 invalidation of ours that covers it
    /// waits for its retry (the delete failed after a commit, so the entry may be the
    /// old row), or another member said it has one waiting and the entry is older than
    /// `max_stale` (see the fleet's doubt). Either is then a miss, loaded anew.
    pub(crate) fn l2_distrusts(&self, key_str: &str, env: &Envelope) -> bool {
        if self.health.is_doubted() {
            let now = self.now();
            if now.since(env.created.min(now)) > self.cfg.max_stale {
                return true;
            }
        }
        self.pending.lock().covers(key_str, &env.tags)
    }

    /// Stores `entry` in L1 unless an invalidation since `start` forbids it, the
    /// backplane subscription is not live yet, the cache is bypassed or closed, or
    /// (with a version function) L1 holds a live entry of a newer version.
    pub(crate) fn fill_l1(&self, key: &K, entry: Entry<V>, start: LoadStart) -> bool {
        self.fill_l1_after(key, entry, start).is_some()
    }

    /// Whether L1 takes no fill now: the backplane subscription is not live yet, the
    /// cache is bypassed or closed, or (Strong) its membership lease lapsed.
    pub(crate) fn l1_closed(&self, now: Timestamp) -> bool {
        !self.health.is_subscribed()
            || self.is_bypassed()
            || self.is_closed()
            || (self.cfg.is_strong() && !self.own_lease_held(now))
    }

    /// [`Inner::fill_l1`]; when it stored, also the remote invalidation behind the
    /// key's last tombstone before `start` (see `Guards::fill_if_clean_after`).
    pub(crate) fn fill_l1_after(&self, key: &K, entry: Entry<V>, start: LoadStart) -> Option<Option<Cause>> {
        let now = self.now();
        if self.l1_closed(now) {
            return None;
        }
        let tags = entry.tags.clone();
        let version = self.version_of(entry.value.as_ref());
        // Packed before the guard's lock is taken: a cold slot allocates.
        let slot = Slot::new(entry, self.xfetch_lead);
        let stored = self.guards.fill_if_clean_after(
            key,
            start,
            now,
            tags.as_deref().map_or(&[], Vec::as_slice),
            || {
                if let Some(new) = version
                    && self.holds_newer_version(key, new, now)
                {
                    return false;
                }
                self.l1.insert(key.clone(), slot);
                true
            },
        );
        if stored.is_none() {
            self.stats.fills_rejected.incr();
        }
        stored
    }

    /// Whether L1 holds a live entry for `key` whose version is above `version`. Runs
    /// under the fill guard's lock, so no invalidation of `key` interleaves.
    fn holds_newer_version(&self, key: &K, version: u64, now: Timestamp) -> bool {
        let Some(slot) = self.l1.peek(key) else { return false };
        let meta = slot.meta(self.xfetch_lead);
        let live = now < meta.fresh_until && self.guards.valid(meta.fill_seq, slot.tag_slice());
        live && self.version_of(slot.value()).is_some_and(|held| held > version)
    }
}
