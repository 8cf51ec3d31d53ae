//! The write methods of [`Cache`]: insert, touch, invalidations.

use super::Cache;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::key::{CacheKey, CacheValue};
use crate::l1::{By, LoadStart, Slot};
use crate::scope::Scope;

impl<K: CacheKey, V: CacheValue> Cache<K, V> {
    /// Stores `value` for `key` after the caller changed it in the database: every
    /// instance drops its copy, and no load that began earlier can overwrite it.
    /// Oversized values are refused (`InvalidInput`) and nothing changes.
    pub async fn insert(&self, key: K, value: V) -> Result<()> {
        let inner = &self.inner;
        let key_str = key.to_key_string();
        let tags = inner.tags_of(&key, &value);
        let version = inner.version_of(Some(&value));
        let encoded = match &inner.l2 {
            Some(_) => Some(inner.encode_checked(&value)?),
            None => None,
        };
        inner.clean_l2_if_bypassed().await;
        let now = inner.clock.now();
        inner.evict_key(&key, now, By::Own);
        let start = inner.guards.start(now);
        let entry = inner.make_entry(Some(value), now, 0, start, tags.clone());
        inner.fill_l1(&key, entry, start);
        let mut first_err = None;
        if let (Some(l2), Some(bytes)) = (&inner.l2, encoded) {
            let env = inner.make_envelope(Some(bytes), version, now, 0, tags);
            let ttl = inner.l2_store_ttl(&env, now);
            if let Err(e) = l2.call("set", &inner.stats, l2.tier().set(l2.ns(), &key_str, env, ttl)).await {
                let scope = Scope::Keys(vec![key_str.clone()]);
                inner.l2_invalidation_failed(&scope, &e);
                first_err = Some(e);
            }
        }
        let scope = Scope::Keys(vec![key_str]);
        if let Err(e) = inner.publish(crate::backplane::MessageBody::Invalidate(scope.clone())).await {
            first_err.get_or_insert(e);
        }
        inner.run_hooks(&scope);
        first_err.map_or(Ok(()), Err)
    }

    /// Extends the life of `key`'s entry by the TTL from now (sliding expiration, for
    /// sessions and drafts), in L1 and L2. Returns false when there was no live entry.
    pub async fn touch(&self, key: &K) -> Result<bool> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut found = !inner.is_closed() && self.touch_l1(key, now);
        if let Some(l2) = &inner.l2 {
            let ttl = inner.cfg.l2_ttl;
            let soft = now.saturating_add(ttl);
            let hard_ttl = ttl.saturating_add(inner.cfg.fail_safe_extra());
            let key_str = key.to_key_string();
            match l2.call("touch", &inner.stats, l2.tier().touch(l2.ns(), &key_str, soft, hard_ttl)).await {
                Ok(t) => found |= t,
                Err(e) if !found => return Err(e),
                Err(_) => {}
            }
        }
        Ok(found)
    }

    /// L1's part of [`touch`](Self::touch).
    fn touch_l1(&self, key: &K, now: Timestamp) -> bool {
        let inner = &self.inner;
        let lead = inner.xfetch_lead;
        let Some(mut e) = inner
            .l1
            .peek(key)
            .filter(|s| {
                let meta = s.meta(lead);
                now < meta.fresh_until && inner.guards.valid(meta.fill_seq, s.tag_slice())
            })
            .map(|s| s.to_entry(lead))
        else {
            return false;
        };
        e.meta.set_fresh_until(now.saturating_add(inner.cfg.l1_ttl));
        e.meta.set_usable_until(e.meta.fresh_until.saturating_add(inner.cfg.fail_safe_extra()));
        let start = LoadStart { seq: e.meta.fill_seq, at: now };
        let tags = e.tags.clone();
        let slot = Slot::new(e, lead);
        inner.guards.fill_if_clean(key, start, now, tags.as_deref().map_or(&[], Vec::as_slice), || {
            inner.l1.insert(key.clone(), slot);
            true
        })
    }

    /// Invalidates `key` everywhere. Call it after the database commit.
    ///
    /// Returns after the local copy is gone, the L2 entry is deleted and the message is
    /// on the backplane (and, at the Strong level, acknowledged). If L2 or the
    /// backplane failed, the error says so, and the cache has already made itself safe:
    /// at the Invalidated level the delete or message is buffered and retried (while
    /// receivers detect the gap and flush); at the Strong level the cache is bypassed
    /// until a namespace bump has cleaned L2.
    pub async fn invalidate(&self, key: &K) -> Result<()> {
        self.invalidate_many(std::slice::from_ref(key)).await
    }

    /// Invalidates several keys with one L2 round trip and one message.
    pub async fn invalidate_many(&self, keys: &[K]) -> Result<()> {
        self.inner.invalidate(&Scope::keys(keys), Some(keys)).await
    }

    /// Invalidates every entry carrying `tag`, in O(1): tag epochs are compared lazily on
    /// read, in L1 and L2.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.inner.invalidate(&Scope::tag(tag), None).await
    }

    /// Invalidates the whole namespace, in O(1) (a namespace epoch).
    pub async fn invalidate_all(&self) -> Result<()> {
        self.inner.invalidate(&Scope::All, None).await
    }

    /// Invalidates `scope`: [`invalidate_many`](Self::invalidate_many),
    /// [`invalidate_tag`](Self::invalidate_tag) or [`invalidate_all`](Self::invalidate_all)
    /// by value.
    pub async fn invalidate_scope(&self, scope: &Scope) -> Result<()> {
        self.inner.invalidate(scope, None).await
    }

    /// Drops this instance's L1 copy of `key` without telling anyone (as a capacity
    /// eviction would). Loads in flight are unaffected; use [`Cache::invalidate`] after a
    /// write.
    pub fn evict_local(&self, key: &K) {
        self.inner.l1.invalidate(key);
    }
}
