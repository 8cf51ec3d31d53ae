//! [`RedisTier`] as strata's [`Tier`]: each operation one Lua script (see
//! `scripts.rs`), keys named as `format.rs` lays them out.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use strata::Scope;
use strata::clock::Timestamp;
use strata::error::{ErrorKind, Result};
use strata::tier::{Envelope, FillOutcome, FillToken, Lookup, Tier};

use super::RedisTier;
use super::format::{NsKeys, encode_envelope, encode_tags, millis_at_least_one};
use crate::reply::{bad_reply, value_u64};

#[async_trait]
impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn tombstone_ttl(&self) -> Duration {
        self.inner.tombstone_ttl
    }

    async fn lookup(&self, namespace: &str, key: &str, lease: Option<Duration>) -> Result<Lookup> {
        let keys = [key.to_owned()];
        let mut out = self.lookup_many(namespace, &keys, lease).await?;
        out.pop().ok_or_else(|| bad_reply(ErrorKind::Tier, "redis tier lookup"))
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
        envelope.stamp = token.stamp;
        let bytes = encode_envelope(&envelope)?;
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.fill.prepare_invoke();
        inv.key(ns.entry(key))
            .key(ns.meta())
            .key(ns.lease(key))
            .key(ns.tomb(key))
            .arg(token.stamp)
            .arg(millis_at_least_one(ttl))
            .arg(token.lease.unwrap_or(0))
            .arg(bytes)
            .arg(encode_tags(&envelope.tags))
            .arg(envelope.soft_expiry.0)
            .arg(envelope.hard_expiry.0)
            .arg(envelope.version.map_or_else(String::new, |v| v.to_string()));
        for t in &envelope.tags {
            inv.arg(t.as_str());
        }
        let v: Value =
            self.run("redis tier fill", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        match value_u64(&v) {
            Some(1) => Ok(FillOutcome::Stored),
            Some(0) => Ok(FillOutcome::Rejected),
            _ => Err(bad_reply(ErrorKind::Tier, "redis tier fill")),
        }
    }

    async fn set(&self, namespace: &str, key: &str, envelope: Envelope, ttl: Duration) -> Result<()> {
        let bytes = encode_envelope(&envelope)?;
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.set.prepare_invoke();
        inv.key(ns.entry(key))
            .key(ns.meta())
            .key(ns.lease(key))
            .key(ns.tomb(key))
            .arg(millis_at_least_one(ttl))
            .arg(bytes)
            .arg(encode_tags(&envelope.tags))
            .arg(envelope.soft_expiry.0)
            .arg(envelope.hard_expiry.0)
            .arg(millis_at_least_one(self.inner.tombstone_ttl))
            .arg(envelope.version.map_or_else(String::new, |v| v.to_string()));
        let _: Value =
            self.run("redis tier set", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, keys: &[String]) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.delete.prepare_invoke();
        inv.key(ns.meta());
        for k in keys {
            inv.key(ns.entry(k)).key(ns.lease(k)).key(ns.tomb(k));
        }
        inv.arg(millis_at_least_one(self.inner.tombstone_ttl));
        let _: Value =
            self.run("redis tier delete", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    async fn release_lease(&self, namespace: &str, key: &str, token: &FillToken) -> Result<()> {
        let Some(lease) = token.lease else { return Ok(()) };
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.release_lease.prepare_invoke();
        inv.key(ns.lease(key)).arg(lease);
        let _: Value = self
            .run("redis tier release_lease", |mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.invalidate_tag.prepare_invoke();
        inv.key(ns.meta()).arg(tag);
        let _: Value = self
            .run("redis tier invalidate_tag", |mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<()> {
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.invalidate_namespace.prepare_invoke();
        inv.key(ns.meta());
        let _: Value = self
            .run("redis tier invalidate_namespace", |mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn lock(&self, namespace: &str, scope: &Scope, id: u64, ttl: Duration) -> Result<()> {
        let inv = self.lock_invocation(&self.inner.scripts.lock, namespace, scope, id, ttl);
        let _: Value =
            self.run("redis tier lock", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    async fn unlock(&self, namespace: &str, scope: &Scope, id: u64) -> Result<()> {
        let inv = self.lock_invocation(&self.inner.scripts.unlock, namespace, scope, id, Duration::ZERO);
        let _: Value =
            self.run("redis tier unlock", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    async fn touch(&self, namespace: &str, key: &str, soft_expiry: Timestamp, ttl: Duration) -> Result<bool> {
        let hard = self.inner.clock.now().saturating_add(ttl);
        let ns = NsKeys::new(&self.inner.prefix, namespace);
        let mut inv = self.inner.scripts.touch.prepare_invoke();
        inv.key(ns.entry(key)).key(ns.meta()).arg(soft_expiry.0).arg(hard.0).arg(millis_at_least_one(ttl));
        let v: Value =
            self.run("redis tier touch", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        match value_u64(&v) {
            Some(2) => {
                self.count_undecodable(namespace);
                Ok(false)
            }
            Some(n) => Ok(n == 1),
            None => Err(bad_reply(ErrorKind::Tier, "redis tier touch")),
        }
    }
}
