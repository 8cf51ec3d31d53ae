//! The background task: the listening connection's lifecycle (connect, heartbeats,
//! loss, reconnect with backoff and resync) and the loop that feeds it to the caches.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use strata::Scope;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::notification::{Outstanding, apply};
use super::state::{Config, Counter, Counters, Shared};
use crate::capture::CHANNEL;

/// Notifications buffered between the connection reader and the invalidating loop;
/// beyond this the reader waits (and Postgres queues, up to its 8 GB queue).
const EVENT_CAPACITY: usize = 16_384;

/// A listening connection, its backend pid, and the pool heartbeats are sent through.
pub(crate) type Connected = (PgListener, i32, PgPool);

/// Opens the listening connection and the heartbeat connection, in a private pool of
/// two (so that a dead connection never goes back into the application's pool, and a
/// busy application pool never delays a heartbeat), `LISTEN`s and reads the backend
/// pid.
pub(crate) async fn connect(cfg: &Config) -> Result<Connected, sqlx::Error> {
    let attempt = async {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(cfg.connect_timeout)
            .connect_with(cfg.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        // A lost connection makes try_recv return Ok(None) at once: we reconnect
        // ourselves, so that we know exactly when LISTEN is active again.
        listener.eager_reconnect(false);
        listener.listen(CHANNEL).await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut listener).await?;
        Ok((listener, pid, pool))
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

enum End {
    Stop,
    Lost(String),
}

pub(crate) async fn run(
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    first: Connected,
    mut stop: watch::Receiver<bool>,
) {
    let c = &shared.counters;
    let mut listener = Some(first);
    let mut backoff = cfg.backoff.0;
    loop {
        let conn = match listener.take() {
            Some(l) => l,
            None => match connect(&cfg).await {
                Ok((l, pid, pinger)) => {
                    shared.mark_connected(pid);
                    c.add(Counter::reconnects, 1);
                    backoff = cfg.backoff.0;
                    // LISTEN is active again; what changed while it was not is unknown.
                    resync(&cfg, c).await;
                    (l, pid, pinger)
                }
                Err(e) => {
                    c.add(Counter::connect_errors, 1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "change listener cannot reconnect");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped(&mut stop) => return,
                    }
                    backoff = (backoff * 2).min(cfg.backoff.1);
                    continue;
                }
            },
        };
        let end = serve(&cfg, &shared, conn, &mut stop).await;
        shared.mark_disconnected();
        match end {
            End::Stop => return,
            End::Lost(reason) => {
                c.add(Counter::connection_losses, 1);
                tracing::warn!(%reason, "change listener lost its connection; reconnecting");
            }
        }
    }
}

/// Invalidates every mapped cache: notifications may have been missed.
async fn resync(cfg: &Config, c: &Counters) {
    let results = join_all(cfg.targets.iter().map(|t| t.invalidate(Scope::All))).await;
    c.add(Counter::resync_flushes, cfg.targets.len() as u64);
    c.add(Counter::resyncs, 1);
    let failed = results.iter().filter(|r| r.is_err()).count() as u64;
    c.add(Counter::invalidation_errors, failed);
    tracing::warn!(
        caches = cfg.targets.len(),
        failed,
        "change listener reconnected: mapped caches invalidated (notifications may have been missed)"
    );
}

/// Aborts a task when dropped (a `JoinHandle` alone would leave it running).
struct AbortOnDrop(JoinHandle<String>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads notifications from one connection into the channel; returns why it stopped.
async fn read(mut listener: PgListener, tx: mpsc::Sender<String>) -> String {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if tx.send(n.payload().to_owned()).await.is_err() {
                    return "stopped".to_owned();
                }
            }
            Ok(None) => return "connection closed".to_owned(),
            Err(e) => return e.to_string(),
        }
    }
}

/// Serves one connection until it is lost or the listener stops.
async fn serve(cfg: &Config, shared: &Shared, conn: Connected, stop: &mut watch::Receiver<bool>) -> End {
    let (conn, _pid, pinger) = conn;
    let (tx, mut rx) = mpsc::channel(EVENT_CAPACITY);
    let mut reader = AbortOnDrop(tokio::spawn(read(conn, tx)));
    let period = cfg.heartbeat.unwrap_or(Duration::from_secs(3600));
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outstanding: Option<Outstanding> = None;
    let mut nonce = 0u64;
    loop {
        let deadline = outstanding.as_ref().map(|o| o.deadline);
        tokio::select! {
            biased;
            _ = stopped(stop) => return End::Stop,
            first = rx.recv() => match first {
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < cfg.max_batch {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    apply(cfg, shared, batch, &mut outstanding).await;
                }
                None => {
                    // The reader ended, and everything it read has been applied.
                    let reason = match (&mut reader.0).await {
                        Ok(r) => r,
                        Err(e) => format!("reader task failed: {e}"),
                    };
                    return End::Lost(reason);
                }
            },
            _ = sleep_until_opt(deadline) => {
                shared.counters.add(Counter::heartbeat_timeouts, 1);
                return End::Lost(format!("heartbeat not received back within {:?}", cfg.heartbeat_timeout));
            }
            _ = ticks.tick(), if cfg.heartbeat.is_some() && outstanding.is_none() => {
                nonce += 1;
                outstanding = Some(Outstanding { nonce, deadline: Instant::now() + cfg.heartbeat_timeout });
                let payload = serde_json::json!({ "op": "PING", "listener": shared.id, "nonce": nonce }).to_string();
                let pool = pinger.clone();
                // Sent from its own task so that a slow pool never delays notifications;
                // if it fails, the heartbeat times out and the connection is replaced,
                // which is the safe reading of "cannot prove the connection works".
                tokio::spawn(async move {
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(CHANNEL)
                        .bind(payload)
                        .execute(&pool)
                        .await
                    {
                        tracing::debug!(error = %e, "change listener heartbeat not sent");
                    }
                });
            }
        }
    }
}

/// Resolves once the listener is told to stop (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
