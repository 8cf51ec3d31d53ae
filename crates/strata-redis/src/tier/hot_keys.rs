//! The namespace's shared hot-key ranking (warm-up): one sorted set per namespace,
//! under the namespace's hash tag like every other key of it. Each report halves the
//! scores (so the ranking follows what is hot now), adds the instance's counts and
//! trims to the keys to keep. It is a hint: evicted, expired or corrupted (another type
//! at its name), it is just empty and warm-up preloads nothing.

use std::sync::LazyLock;
use std::time::Duration;

use strata::error::Result;

use super::RedisTier;
use super::format::NsKeys;

/// A ranking nobody reported to for this long is dropped.
const RANKING_TTL: Duration = Duration::from_secs(24 * 3600);

/// KEYS: the ranking. ARGV: keys to keep, ttl ms, then (key, count) pairs.
static RECORD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local k = KEYS[1]
local ty = redis.call('TYPE', k).ok
if ty == 'zset' then
  redis.call('ZUNIONSTORE', k, 1, k, 'WEIGHTS', 0.5)
elseif ty ~= 'none' then
  redis.call('UNLINK', k)
end
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', k, ARGV[i + 1], ARGV[i])
end
local keep = tonumber(ARGV[1])
local n = redis.call('ZCARD', k)
if n > keep then
  redis.call('ZREMRANGEBYRANK', k, 0, n - keep - 1)
end
if n > 0 then
  redis.call('PEXPIRE', k, ARGV[2])
end
return n
"#,
    )
});

/// KEYS: the ranking. ARGV: how many keys. The hottest first; empty unless a sorted set.
static TOP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return {} end
return redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
"#,
    )
});

impl RedisTier {
    pub(crate) async fn record_hot(
        &self,
        namespace: &str,
        counts: &[(String, u64)],
        keep: usize,
    ) -> Result<()> {
        let mut inv = RECORD.prepare_invoke();
        inv.key(NsKeys::new(&self.inner.prefix, namespace).hot())
            .arg(keep)
            .arg(u64::try_from(RANKING_TTL.as_millis()).unwrap_or(u64::MAX));
        for (key, count) in counts {
            inv.arg(key.as_str()).arg(*count);
        }
        let _: i64 = self
            .run("redis tier record_hot_keys", |mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    pub(crate) async fn top_hot(&self, namespace: &str, n: usize) -> Result<Vec<String>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut inv = TOP.prepare_invoke();
        inv.key(NsKeys::new(&self.inner.prefix, namespace).hot()).arg(n);
        self.run("redis tier hot_keys", |mut c| async move { inv.invoke_async(&mut c).await }).await
    }
}
