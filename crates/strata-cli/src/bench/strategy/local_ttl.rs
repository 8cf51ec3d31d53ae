//! `local-ttl`: a per-instance moka cache with a 5 s TTL and no invalidation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use moka::future::Cache;

use super::{FleetConfig, LOCAL_TTL, Strategy, TierCounts, read_through_local};
use crate::bench::db::{Db, Row};

/// The "Caffeine 5 s" baseline, with moka: writes reach the DB only, each instance's
/// copy lives out its TTL. Concurrent misses of a key in one instance share one load
/// (moka's `try_get_with`).
pub struct LocalTtl {
    db: Arc<Db>,
    caches: Vec<Cache<u64, Row>>,
    l1_hits: AtomicU64,
}

impl LocalTtl {
    /// One moka cache per instance.
    pub fn new(cfg: &FleetConfig) -> LocalTtl {
        let caches = (0..cfg.instances)
            .map(|_| Cache::builder().max_capacity(cfg.capacity).time_to_live(LOCAL_TTL).build())
            .collect();
        LocalTtl { db: cfg.db.clone(), caches, l1_hits: AtomicU64::new(0) }
    }
}

#[async_trait]
impl Strategy for LocalTtl {
    fn name(&self) -> &'static str {
        "local-ttl"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(LOCAL_TTL)
    }

    fn invalidates(&self) -> bool {
        false
    }

    async fn read(&self, instance: usize, key: u64) -> Result<Row> {
        read_through_local(&self.caches, &self.l1_hits, &self.db, instance, key).await
    }

    async fn write(&self, _instance: usize, key: u64, value: &str) -> Result<u64> {
        self.db.write(key, value).await
    }

    fn tier_counts(&self) -> TierCounts {
        TierCounts { l1_hits: self.l1_hits.load(Ordering::Relaxed), ..TierCounts::default() }
    }

    async fn rejoin(&self, instance: usize, _warm: bool) -> Result<()> {
        if let Some(cache) = self.caches.get(instance) {
            cache.invalidate_all();
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
