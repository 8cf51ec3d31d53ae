//! `none`: every read goes to the database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use super::{FleetConfig, Strategy, TierCounts};
use crate::bench::db::{Db, Row};

/// No cache at all: the baseline for DB load and the reference for freshness.
pub struct NoCache {
    db: Arc<Db>,
}

impl NoCache {
    /// The fleet: instances share nothing but the database.
    pub fn new(cfg: &FleetConfig) -> NoCache {
        NoCache { db: cfg.db.clone() }
    }
}

#[async_trait]
impl Strategy for NoCache {
    fn name(&self) -> &'static str {
        "none"
    }

    fn ttl(&self) -> Option<Duration> {
        None
    }

    fn invalidates(&self) -> bool {
        false
    }

    async fn read(&self, _instance: usize, key: u64) -> Result<Row> {
        self.db.read(key).await
    }

    async fn write(&self, _instance: usize, key: u64, value: &str) -> Result<u64> {
        self.db.write(key, value).await
    }

    fn tier_counts(&self) -> TierCounts {
        TierCounts::default()
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
