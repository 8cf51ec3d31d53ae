//! `redis-global`: plain cache-aside on one Redis with redis-rs. Every read is a `GET`;
//! a miss loads from the DB and `SET`s with the 24 h TTL; a write commits, then `DEL`s.
//! No local cache, no single-flight, no fill guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;

use super::{FleetConfig, INVALIDATED_TTL, Strategy, TierCounts, delete_prefix};
use crate::bench::db::{Db, Row};
use crate::secret::SecretUrl;

/// Cache-aside on one Redis shared by the fleet (instances differ only by name).
pub struct RedisGlobal {
    db: Arc<Db>,
    conn: redis::aio::ConnectionManager,
    url: SecretUrl,
    prefix: String,
    ops: AtomicU64,
    hits: AtomicU64,
}

impl RedisGlobal {
    /// Connects to `--redis`.
    pub async fn connect(cfg: &FleetConfig) -> Result<RedisGlobal> {
        let url = cfg.redis.as_ref().context("redis-global needs --redis URL")?;
        let client = redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
        let conn = client
            .get_connection_manager()
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        Ok(RedisGlobal {
            db: cfg.db.clone(),
            conn,
            url: url.clone(),
            prefix: format!("{}:redis-global:", cfg.run_id),
            ops: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    fn key(&self, key: u64) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait]
impl Strategy for RedisGlobal {
    fn name(&self) -> &'static str {
        "redis-global"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(INVALIDATED_TTL)
    }

    fn invalidates(&self) -> bool {
        true
    }

    async fn read(&self, _instance: usize, key: u64) -> Result<Row> {
        let mut conn = self.conn.clone();
        let name = self.key(key);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let cached: Option<Vec<u8>> =
            redis::cmd("GET").arg(&name).query_async(&mut conn).await.context("Redis GET failed")?;
        if let Some(bytes) = cached
            && let Ok(row) = serde_json::from_slice::<Row>(&bytes)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(row);
        }
        let row = self.db.read(key).await?;
        let bytes = serde_json::to_vec(&row)?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        redis::cmd("SET")
            .arg(&name)
            .arg(bytes)
            .arg("EX")
            .arg(INVALIDATED_TTL.as_secs())
            .query_async::<()>(&mut conn)
            .await
            .context("Redis SET failed")?;
        Ok(row)
    }

    async fn write(&self, _instance: usize, key: u64, value: &str) -> Result<u64> {
        let version = self.db.write(key, value).await?;
        let mut conn = self.conn.clone();
        self.ops.fetch_add(1, Ordering::Relaxed);
        redis::cmd("DEL")
            .arg(self.key(key))
            .query_async::<i64>(&mut conn)
            .await
            .context("Redis DEL failed")?;
        Ok(version)
    }

    fn tier_counts(&self) -> TierCounts {
        TierCounts {
            l1_hits: 0,
            l2_hits: self.hits.load(Ordering::Relaxed),
            remote_ops: self.ops.load(Ordering::Relaxed),
        }
    }

    async fn close(&self) -> Result<()> {
        // Remove this run's keys (not counted: cleanup is not part of the workload).
        delete_prefix(&self.url, &self.prefix).await
    }
}
