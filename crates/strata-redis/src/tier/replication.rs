//! Invalidations acknowledged only once replicated
//! ([`RedisTierBuilder::wait_for_replicas`](super::RedisTierBuilder::wait_for_replicas)):
//! the script, then `WAIT` on the same master, in one call.

use redis::Value;
use strata::error::Result;

use super::RedisTier;

impl RedisTier {
    /// Runs an invalidation script (one of those answering `{result, repaired,
    /// corrupt}`); with `wait_for_replicas`, then `WAIT` on the master serving `slot_key`,
    /// failing the call when fewer replicas than asked acknowledged it in time.
    pub(super) async fn run_invalidation(
        &self,
        what: &'static str,
        namespace: &str,
        slot_key: String,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<u64> {
        let Some((replicas, timeout)) = self.inner.wait_for_replicas else {
            return self.run_script(what, namespace, inv).await;
        };
        let v: Value = self
            .run(what, |mut c| async move {
                let v: Value = inv.invoke_async(&mut c).await?;
                let mut wait = redis::cmd("WAIT");
                wait.arg(replicas).arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1));
                let acked = match c.query_on_node_of(&slot_key, wait).await? {
                    Value::Int(n) => n,
                    _ => -1,
                };
                if acked < i64::from(replicas) {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "invalidation not replicated",
                        format!("{acked} of {replicas} replicas acknowledged it within {timeout:?} (WAIT)"),
                    )));
                }
                Ok(v)
            })
            .await?;
        self.finish_script(what, namespace, &v)
    }
}
