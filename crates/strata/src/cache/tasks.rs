//! A cache's background tasks (the only place a cache spawns them): the fleet's
//! listener and heartbeat, the retry of buffered invalidations, the metrics export;
//! and the cache's side of the fleet protocol ([`Host`]). Every task ends on
//! `shutdown` or when the last handle is dropped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::state::Inner;
use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind};
use crate::fleet::{self, Fleet, Health, Host};
use crate::key::{CacheKey, CacheValue};
use crate::l1::{By, Cause};
use crate::scope::Scope;
use crate::stats::Stats;
use crate::tier::Envelope;

/// How often buffered invalidations are retried, at the most.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// The longest pause between retries while the remote stays down: no longer than the
/// first. Every moment a buffered L2 delete waits once Redis answers again is a moment
/// the fleet must distrust what it may cover, and an attempt costs one call bounded by
/// the L2 timeout (a `strata check` run drained the buffer 0.37 s after a Redis pause
/// ended with a 200 ms cap, 1.2 s with the former 2 s one).
const RETRY_AT_MOST_EVERY: Duration = RETRY_EVERY;
/// How often counters are pushed to the `metrics` recorder.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Starts the tasks a cache needs (none but the export without a tier or backplane).
pub(crate) fn spawn<K: CacheKey, V: CacheValue>(inner: &Arc<Inner<K, V>>) {
    if inner.fleet.is_some() {
        let (host, stop) = (inner.clone(), inner.stop.clone());
        tokio::spawn(async move {
            let listening = AssertUnwindSafe(fleet::listener::run(host.clone(), stop)).catch_unwind();
            if listening.await.is_err() {
                // A listener that died applies no invalidation any more: say so at once
                // (the heartbeat would notice within three intervals), so that
                // `max_stale` bounds what L1 serves and readiness reports it.
                tracing::error!(namespace = %host.cfg.namespace, "backplane listener panicked; backplane marked unhealthy");
                fleet::mark_unhealthy(&*host, host.now());
            }
        });
        tokio::spawn(fleet::heartbeat::run(inner.clone(), inner.stop.clone()));
    }
    if inner.l2.is_some() || inner.fleet.is_some() {
        tokio::spawn(retry(inner.clone()));
    }
    tokio::spawn(export(inner.clone()));
    if inner.write_behind.as_ref().is_some_and(|w| w.cfg.run_flusher) {
        tokio::spawn(crate::write_behind::run_flusher(inner.clone()));
    }
    if inner.cfg.warm_up.is_some() {
        tokio::spawn(inner.clone().warm_up());
        tokio::spawn(report_hot_keys(inner.clone()));
    }
}

async fn report_hot_keys<K: CacheKey, V: CacheValue>(inner: Arc<Inner<K, V>>) {
    let Some(every) = inner.cfg.warm_up.as_ref().map(|w| w.report_every) else { return };
    let mut stop = inner.stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => inner.report_hot_keys().await,
            _ = stop.stopped() => return,
        }
    }
}

async fn export<K: CacheKey, V: CacheValue>(inner: Arc<Inner<K, V>>) {
    let mut stop = inner.stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPORT_EVERY) => inner.stats.export(&inner.cfg.namespace),
            _ = stop.stopped() => return,
        }
    }
}

async fn retry<K: CacheKey, V: CacheValue>(inner: Arc<Inner<K, V>>) {
    let mut stop = inner.stop.clone();
    let mut pause = RETRY_EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.stopped() => return,
        }
        if inner.pending.lock().is_empty() {
            pause = RETRY_EVERY;
            continue;
        }
        inner.retry_pending().await;
        // Back off while the remote stays down, up to a few seconds.
        pause =
            if inner.pending.lock().is_empty() { RETRY_EVERY } else { (pause * 2).min(RETRY_AT_MOST_EVERY) };
    }
}

impl<K: CacheKey, V: CacheValue> Host for Inner<K, V> {
    fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }

    fn now(&self) -> Timestamp {
        Inner::now(self)
    }

    fn apply_remote(&self, scope: &Scope, cause: Option<Cause>) {
        let malformed = self.drop_local(scope, None, cause.map_or(By::Unknown, By::Message));
        let applied = match scope {
            Scope::Keys(keys) => keys.len() as u64 - malformed,
            Scope::Tag(_) | Scope::All => 1,
        };
        for _ in 0..applied {
            self.stats.invalidations_applied.incr();
        }
        // Keys not of this cache's type: counted, and the rest applied.
        for _ in 0..malformed {
            self.stats.malformed_messages.incr();
        }
        for hook in &self.cfg.remote_hooks {
            hook(scope);
        }
    }

    fn apply_reload(&self, key: &str, after: Cause, entry: &Envelope) {
        self.install_reload(key, after, entry);
    }

    fn own_settled(&self, mark: u64) {
        self.guards.own_settled(mark);
    }

    fn flush_local(&self) {
        self.flush_l1();
    }

    fn l2_buffered(&self) -> bool {
        self.pending.lock().l2_buffered()
    }

    fn bypass(&self) {
        if !self.is_bypassed() {
            let why = Error::new(ErrorKind::Tier, "another member's l2 delete failed");
            self.l2_invalidation_failed(&Scope::All, &why);
        }
    }

    fn health_changed(&self) {
        self.publish_fast_floor();
    }
}
