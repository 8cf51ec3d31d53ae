//! `redis-global`: plain cache-aside on one Redis with redis-rs. Every read is a `GET`;
//! a miss loads from the DB and `SET`s with the 24 h TTL; a write commits, then `DEL`s.
//! No local cache, no single-flight, no fill guard. Over `--redis-ring`, each key goes to
//! the server strata's `ShardedTier` would put it on (the same rendezvous placement).
//! Each instance has its own connection to each server (and its own cluster client), as
//! separate app processes would, and as strata's instances do: one multiplexed
//! connection shared by the whole fleet would batch its commands into fewer writes
//! and flatter it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use strata::tier::sharded::Placement;

use super::{FleetConfig, Strategy, TierCounts, delete_prefix};
use crate::bench::db::{Db, Row};
use crate::secret::SecretUrl;

/// Cache-aside on one Redis (or a ring) shared by the fleet.
pub struct RedisGlobal {
    db: Arc<Db>,
    /// Per instance, a connection to each server.
    conns: Vec<Vec<redis::aio::ConnectionManager>>,
    /// With `--redis-cluster`: per instance, its cluster client's connection (redis-rs
    /// routes by key).
    cluster: Vec<redis::cluster_async::ClusterConnection>,
    placement: Placement,
    urls: Vec<SecretUrl>,
    prefix: String,
    ttl: Duration,
    ops: AtomicU64,
    hits: AtomicU64,
}

impl RedisGlobal {
    /// Connects to `--redis` (or to every server of `--redis-ring`).
    pub async fn connect(cfg: &FleetConfig) -> Result<RedisGlobal> {
        let urls = cfg.redis_urls().context("redis-global needs --redis, --redis-ring or --redis-cluster")?;
        let mut conns = Vec::with_capacity(cfg.instances);
        let mut cluster = Vec::new();
        for _ in 0..cfg.instances.max(1) {
            if cfg.cluster {
                let client = redis::cluster::ClusterClient::new(
                    urls.iter().map(|u| u.expose().to_owned()).collect::<Vec<String>>(),
                )
                .context("bad Redis Cluster URLs")?;
                cluster.push(
                    client.get_async_connection().await.context("cannot connect to the Redis Cluster")?,
                );
                continue;
            }
            let mut mine = Vec::with_capacity(urls.len());
            for url in &urls {
                let client =
                    redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
                let conn = client
                    .get_connection_manager()
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?;
                mine.push(conn);
            }
            conns.push(mine);
        }
        let names: Vec<String> = (0..urls.len()).map(|i| format!("node-{i}")).collect();
        Ok(RedisGlobal {
            db: cfg.db.clone(),
            conns,
            cluster,
            placement: Placement::new(&names),
            urls,
            prefix: format!("{}:redis-global:", cfg.run_id),
            ttl: cfg.ttl,
            ops: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    fn key(&self, key: u64) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `cmd` on the server holding `key`, through `instance`'s connection.
    async fn query<T: redis::FromRedisValue>(
        &self,
        instance: usize,
        key: u64,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        if !self.cluster.is_empty() {
            return cmd.query_async(&mut self.cluster[instance % self.cluster.len()].clone()).await;
        }
        let mine = &self.conns[instance % self.conns.len()];
        cmd.query_async(&mut mine[self.placement.shard_of(&key.to_string())].clone()).await
    }
}

#[async_trait]
impl Strategy for RedisGlobal {
    fn name(&self) -> &'static str {
        "redis-global"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.ttl)
    }

    fn invalidates(&self) -> bool {
        true
    }

    async fn read(&self, instance: usize, key: u64) -> Result<Row> {
        let name = self.key(key);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let cached: Option<Vec<u8>> =
            self.query(instance, key, redis::cmd("GET").arg(&name)).await.context("Redis GET failed")?;
        if let Some(bytes) = cached
            && let Ok(row) = serde_json::from_slice::<Row>(&bytes)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(row);
        }
        let row = self.db.read(key).await?;
        let bytes = serde_json::to_vec(&row)?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.query::<()>(
            instance,
            key,
            redis::cmd("SET").arg(&name).arg(bytes).arg("PX").arg(self.ttl.as_millis().max(1) as u64),
        )
        .await
        .context("Redis SET failed")?;
        Ok(row)
    }

    async fn write(&self, instance: usize, key: u64, value: &str) -> Result<u64> {
        let version = self.db.write(key, value).await?;
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.query::<i64>(instance, key, redis::cmd("DEL").arg(self.key(key)))
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

    async fn invalidate_all(&self) -> Result<bool> {
        // What an operator's flush does: every cached row deleted (the SCAN and the
        // UNLINKs are not counted as the workload's ops).
        for url in &self.urls {
            delete_prefix(url, &self.prefix).await?;
        }
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        // Remove this run's keys (not counted: cleanup is not part of the workload).
        for url in &self.urls {
            delete_prefix(url, &self.prefix).await?;
        }
        Ok(())
    }
}
