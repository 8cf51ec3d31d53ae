//! `near-pubsub`: the seed story's hand-written fix. Each instance has a moka cache with
//! the 24 h safety-net TTL; a write commits, drops the writer's copy and broadcasts the
//! key; every instance drops its copy when the broadcast arrives. Written the way a
//! first implementation usually is: no fill guards (a load that read the old row
//! before the broadcast arrived is still stored after it), no sequence numbers, no gap
//! repair (a lagging or reconnecting subscriber just misses messages).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use futures::StreamExt;
use moka::future::Cache;
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{FleetConfig, Strategy, TierCounts, read_through_local};
use crate::bench::db::{Db, Row};
use crate::bench::lag::{LagSummary, LagTracker};

/// Capacity of the in-process broadcast channel; a slower receiver loses messages.
const BROADCAST_CAPACITY: usize = 1024;
/// The broadcast that clears every instance's cache (`--bulk-invalidate-at`): no row
/// has this key.
const CLEAR_ALL: u64 = u64::MAX;

/// How invalidations travel.
enum Bus {
    /// A tokio broadcast channel (the embedded default).
    InProcess(broadcast::Sender<u64>),
    /// Redis Pub/Sub: `PUBLISH channel key`.
    Redis { conn: redis::aio::ConnectionManager, channel: String },
}

/// Local caches + invalidation broadcast, without fill guards or gap repair.
pub struct NearPubSub {
    db: Arc<Db>,
    caches: Vec<Cache<u64, Row>>,
    bus: Bus,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    l1_hits: AtomicU64,
    publishes: AtomicU64,
    lag: Arc<LagTracker>,
    ttl: Duration,
}

impl NearPubSub {
    /// One moka cache and one subscriber per instance; returns once every subscriber is
    /// listening.
    pub async fn start(cfg: &FleetConfig) -> Result<NearPubSub> {
        let caches: Vec<Cache<u64, Row>> = (0..cfg.instances)
            .map(|_| Cache::builder().max_capacity(cfg.capacity).time_to_live(cfg.ttl).build())
            .collect();
        let mut listeners = Vec::with_capacity(caches.len());
        let lag = Arc::new(LagTracker::new(cfg.instances)?);
        let bus = match &cfg.redis {
            None => {
                let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
                for (i, cache) in caches.iter().enumerate() {
                    let applied = Applied { lag: lag.clone(), instance: i };
                    listeners.push(tokio::spawn(listen_in_process(tx.subscribe(), cache.clone(), applied)));
                }
                Bus::InProcess(tx)
            }
            Some(url) => {
                let client =
                    redis::Client::open(url.expose()).with_context(|| format!("bad Redis URL {url}"))?;
                let channel = format!("{}:near-pubsub", cfg.run_id);
                for (i, cache) in caches.iter().enumerate() {
                    let applied = Applied { lag: lag.clone(), instance: i };
                    let mut pubsub = client
                        .get_async_pubsub()
                        .await
                        .with_context(|| format!("cannot open a Pub/Sub connection to {url}"))?;
                    pubsub.subscribe(&channel).await.context("SUBSCRIBE failed")?;
                    listeners.push(tokio::spawn(listen_redis(pubsub, cache.clone(), applied)));
                }
                let conn = client
                    .get_connection_manager()
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?;
                Bus::Redis { conn, channel }
            }
        };
        Ok(NearPubSub {
            db: cfg.db.clone(),
            caches,
            bus,
            listeners: Mutex::new(listeners),
            l1_hits: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            lag,
            ttl: cfg.ttl,
        })
    }

    /// Tells every instance (the writer's included) to drop `key`.
    async fn publish(&self, key: u64) -> Result<()> {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        match &self.bus {
            Bus::InProcess(tx) => {
                // Err only when no instance listens; nothing to tell then.
                let _ = tx.send(key);
            }
            Bus::Redis { conn, channel } => {
                let mut conn = conn.clone();
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .context("PUBLISH failed")?;
            }
        }
        Ok(())
    }
}

/// Drops what a broadcast names from `cache`.
async fn apply(cache: &Cache<u64, Row>, key: u64, applied: &Applied) {
    if key == CLEAR_ALL {
        cache.invalidate_all();
    } else {
        cache.invalidate(&key).await;
        applied.lag.applied(applied.instance, key);
    }
}

/// Tells the lag tracker which instance a listener serves.
struct Applied {
    lag: Arc<LagTracker>,
    instance: usize,
}

async fn listen_in_process(mut rx: broadcast::Receiver<u64>, cache: Cache<u64, Row>, applied: Applied) {
    loop {
        match rx.recv().await {
            Ok(key) => apply(&cache, key, &applied).await,
            // Naive: what was missed is simply gone.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn listen_redis(mut pubsub: redis::aio::PubSub, cache: Cache<u64, Row>, applied: Applied) {
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        // Naive: a payload that does not parse is ignored.
        if let Ok(key) = msg.get_payload::<u64>() {
            apply(&cache, key, &applied).await;
        }
    }
}

#[async_trait]
impl Strategy for NearPubSub {
    fn name(&self) -> &'static str {
        "near-pubsub"
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.ttl)
    }

    fn invalidates(&self) -> bool {
        true
    }

    async fn read(&self, instance: usize, key: u64) -> Result<Row> {
        read_through_local(&self.caches, &self.l1_hits, &self.db, instance, key).await
    }

    fn propagation(&self) -> Option<LagSummary> {
        Some(self.lag.take())
    }

    async fn write(&self, instance: usize, key: u64, value: &str) -> Result<u64> {
        self.lag.write_started(instance, key);
        let version = self.db.write(key, value).await?;
        if let Some(cache) = self.caches.get(instance) {
            cache.invalidate(&key).await;
        }
        self.publish(key).await?;
        self.lag.write_done(key);
        Ok(version)
    }

    fn tier_counts(&self) -> TierCounts {
        TierCounts {
            l1_hits: self.l1_hits.load(Ordering::Relaxed),
            l2_hits: 0,
            remote_ops: self.publishes.load(Ordering::Relaxed),
        }
    }

    async fn invalidate_all(&self) -> Result<bool> {
        self.publish(CLEAR_ALL).await?;
        Ok(true)
    }

    async fn rejoin(&self, instance: usize, _warm: bool) -> Result<()> {
        // The listener stays subscribed: a restarted instance resubscribes before it
        // serves, and its cache is what starts empty.
        if let Some(cache) = self.caches.get(instance) {
            cache.invalidate_all();
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        for l in self.listeners.lock().drain(..) {
            l.abort();
        }
        Ok(())
    }
}
