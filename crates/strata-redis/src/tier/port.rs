//! [`RedisTier`] as strata's [`Tier`]: each operation one Lua script (see
//! `scripts.rs`), keys named as `format.rs` lays them out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use strata::Scope;
use strata::clock::Timestamp;
use strata::error::{ErrorKind, Result};
use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};

use super::RedisTier;
use super::format::{NsKeys, encode_stored_envelope, encode_tags, entry_mac, millis_at_least_one};
use crate::reply::bad_reply;

#[async_trait]
impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl
    }

    fn progress(&self) -> Option<u64> {
        // On a Cluster the count covers every node: a call to a stalled master while
        // the others answer is waited for until `l2_busy_timeout`, not `l2_timeout`.
        Some(self.inner.conn.replies())
    }

    async fn lookup(&self, namespace: &str, key: &str, lease: Option<Duration>) -> Result<Lookup> {
        let keys = [key.to_owned()];
        let mut out = self.lookup_many(namespace, &keys, lease).await?;
        out.pop().ok_or_else(|| bad_reply(ErrorKind::Tier, "redis tier lookup"))
    }

    async fn peek(&self, namespace: &str, key: &str) -> Result<Option<Envelope>> {
        RedisTier::peek(self, namespace, key).await
    }

    async fn lookup_many(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Option<Duration>,
    ) -> Result<Vec<Lookup>> {
        RedisTier::lookup_many(self, namespace, keys, lease).await
    }

    async fn fill(
        &self,
        namespace: &str,
        key: &str,
        mut envelope: Envelope,
        ttl: Duration,
        token: &FillToken,
    ) -> Result<FillOutcome> {
        // With integrity keys, signed with the stamp inside: readers check that the
        // script's stamp is this one. Without, readers take the stamp from the entry's
        // head (`format::with_fields`, every release since the head exists), so the copy
        // inside is dead weight: 0 is one byte of postcard, the token's stamp eight.
        envelope.stamp = if self.inner.integrity.is_some() { token.stamp } else { 0 };
        let bytes = encode_stored_envelope(&envelope)?;
        // Over the size limit: the script runs the guard and stores nothing.
        let stored: &[u8] = if self.oversized(namespace, key, bytes.len()) { &[] } else { &bytes };
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let tags = encode_tags(&envelope.tags);
        let entry = ns.entry(key);
        let mac = self.inner.integrity.as_ref().map(|i| entry_mac(i, &entry, &bytes, &tags));
        let mut inv = self.inner.scripts.fill.prepare_invoke();
        inv.key(entry)
            .key(ns.meta())
            .key(ns.lease(key))
            .arg(token.stamp)
            .arg(millis_at_least_one(ttl))
            .arg(token.lease.unwrap_or(0))
            .arg(stored)
            .arg(&tags)
            .arg(envelope.soft_expiry.0)
            .arg(envelope.hard_expiry.0)
            .arg(envelope.version.map_or_else(String::new, |v| v.to_string()))
            .arg(millis_at_least_one(self.inner.tombstone_ttl))
            .arg(mac.as_ref().map_or(&[][..], |m| &m[..]));
        for t in &envelope.tags {
            inv.arg(t.as_str());
        }
        match self.run_script("redis tier fill", namespace, inv).await? {
            // 2: accepted by the guard but over the size limit, not stored.
            1 | 2 => Ok(FillOutcome::Stored),
            // 3: accepted by the guard, but Redis is out of memory (`noeviction`, or
            // nothing left that the policy may evict): not stored, not an L2 failure.
            3 => {
                self.inner.counters.refused_for_memory.fetch_add(1, Ordering::Relaxed);
                Ok(FillOutcome::Stored)
            }
            0 => Ok(FillOutcome::Rejected),
            4 => Ok(FillOutcome::Superseded),
            _ => Err(bad_reply(ErrorKind::Tier, "redis tier fill")),
        }
    }

    async fn set(&self, namespace: &str, key: &str, mut envelope: Envelope, ttl: Duration) -> Result<()> {
        // The script assigns the stamp; 0 inside the signed envelope says so to readers.
        envelope.stamp = 0;
        let bytes = encode_stored_envelope(&envelope)?;
        // Over the size limit: the script invalidates the key and stores nothing.
        let stored: &[u8] = if self.oversized(namespace, key, bytes.len()) { &[] } else { &bytes };
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let tags = encode_tags(&envelope.tags);
        let entry = ns.entry(key);
        let mac = self.inner.integrity.as_ref().map(|i| entry_mac(i, &entry, &bytes, &tags));
        let mut inv = self.inner.scripts.set.prepare_invoke();
        inv.key(entry)
            .key(ns.meta())
            .key(ns.lease(key))
            .arg(millis_at_least_one(ttl))
            .arg(stored)
            .arg(&tags)
            .arg(envelope.soft_expiry.0)
            .arg(envelope.hard_expiry.0)
            .arg(millis_at_least_one(self.inner.tombstone_ttl))
            .arg(envelope.version.map_or_else(String::new, |v| v.to_string()))
            .arg(mac.as_ref().map_or(&[][..], |m| &m[..]));
        self.run_invalidation("redis tier set", namespace, ns.meta(), inv).await?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, keys: &[String]) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.delete.prepare_invoke();
        inv.key(ns.meta());
        for k in keys {
            inv.key(ns.entry(k)).key(ns.lease(k));
        }
        inv.arg(millis_at_least_one(self.inner.tombstone_ttl));
        self.run_invalidation("redis tier delete", namespace, ns.meta(), inv).await?;
        Ok(())
    }

    async fn release_lease(&self, namespace: &str, key: &str, token: &FillToken) -> Result<()> {
        let Some(lease) = token.lease else { return Ok(()) };
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.release_lease.prepare_invoke();
        inv.key(ns.lease(key)).arg(lease);
        self.run_script("redis tier release_lease", namespace, inv).await?;
        Ok(())
    }

    async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.invalidate_tag.prepare_invoke();
        inv.key(ns.meta()).arg(tag);
        self.run_invalidation("redis tier invalidate_tag", namespace, ns.meta(), inv).await?;
        Ok(())
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.invalidate_namespace.prepare_invoke();
        inv.key(ns.meta());
        self.run_invalidation("redis tier invalidate_namespace", namespace, ns.meta(), inv).await?;
        Ok(())
    }

    async fn lock(&self, namespace: &str, scope: &Scope, id: u64, ttl: Duration) -> Result<()> {
        let inv = self.lock_invocation(&self.inner.scripts.lock, namespace, scope, id, ttl);
        self.run_invalidation(
            "redis tier lock",
            namespace,
            NsKeys::new(&self.inner.prefix, namespace).meta(),
            inv,
        )
        .await?;
        Ok(())
    }

    async fn unlock(&self, namespace: &str, scope: &Scope, id: u64) -> Result<()> {
        let inv = self.lock_invocation(&self.inner.scripts.unlock, namespace, scope, id, Duration::ZERO);
        self.run_invalidation(
            "redis tier unlock",
            namespace,
            NsKeys::new(&self.inner.prefix, namespace).meta(),
            inv,
        )
        .await?;
        Ok(())
    }

    async fn touch(&self, namespace: &str, key: &str, soft_expiry: Timestamp, ttl: Duration) -> Result<bool> {
        let hard = self.inner.clock.now().saturating_add(ttl);
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.touch.prepare_invoke();
        inv.key(ns.entry(key))
            .key(ns.meta())
            .arg(soft_expiry.0)
            .arg(hard.0)
            .arg(millis_at_least_one(ttl))
            .arg(self.inner.max_entry_bytes);
        Ok(self.run_script("redis tier touch", namespace, inv).await? == 1)
    }

    async fn record_hot_keys(&self, namespace: &str, counts: &[(String, u64)], keep: usize) -> Result<()> {
        self.record_hot(namespace, counts, keep).await
    }

    async fn hot_keys(&self, namespace: &str, n: usize) -> Result<Vec<String>> {
        self.top_hot(namespace, n).await
    }
}
