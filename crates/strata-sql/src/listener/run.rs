//! The background task: the listening connection's lifecycle (connect, heartbeats,
//! loss, reconnect with backoff and catch-up) and the loop that reads the outbox on
//! each wake-up and feeds its changes to the caches.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use strata::Scope;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::notification::{Notice, Outstanding, apply, classify, pong};
use super::outbox::{self, Pruning, Snapshot, Verifier};
use super::state::{Config, Counter, Counters, Shared};
use crate::capture::CHANNEL;

/// Maintenance (a safety-net read of the outbox, pruning) runs with the heartbeats, or
/// this often when they are off.
const MAINTENANCE: Duration = Duration::from_secs(5);
/// How soon to read again while wake-ups wait for their transaction to be visible.
const RECHECK: Duration = Duration::from_millis(50);

/// What the task keeps across connections: where the last read of the outbox stopped,
/// the wake-ups being checked, and the pruning marks.
pub(crate) struct Cursor {
    pub(crate) snapshot: Snapshot,
    verifier: Verifier,
    pruning: Option<Pruning>,
}

impl Cursor {
    pub(crate) fn new(snapshot: Snapshot, retention: Option<Duration>) -> Self {
        Cursor { snapshot, verifier: Verifier::new(), pruning: retention.map(Pruning::new) }
    }
}

/// Notifications buffered between the connection reader and the invalidating loop;
/// beyond this the reader waits (and Postgres queues, up to its 8 GB queue).
const EVENT_CAPACITY: usize = 16_384;

/// A listening connection, its backend pid, and the pool that reads the outbox and
/// sends heartbeats.
pub(crate) type Connected = (PgListener, i32, PgPool);

/// Opens the listening connection, in a private pool of three (with one to read the
/// outbox and one to send heartbeats; so that a dead connection never goes back into
/// the application's pool, and a busy application pool never delays a heartbeat),
/// `LISTEN`s and reads the backend pid.
pub(crate) async fn connect(cfg: &Config) -> Result<Connected, sqlx::Error> {
    let attempt = async {
        let pool = PgPoolOptions::new()
            .max_connections(3)
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
    mut cursor: Cursor,
    mut stop: watch::Receiver<bool>,
) {
    let c = &shared.counters;
    let mut listener = Some(first);
    let mut backoff = cfg.backoff.0;
    loop {
        let conn = match listener.take() {
            Some(l) => l,
            None => {
                // LISTEN is active again; what committed while it was not is read from
                // the outbox before anything else.
                let caught_up = match connect(&cfg).await {
                    Ok(conn) => match read(&cfg, &shared, &conn.2, &mut cursor).await {
                        Ok(flushed) => Ok((conn, flushed)),
                        Err(e) => {
                            c.add(Counter::read_errors, 1);
                            Err(e)
                        }
                    },
                    Err(e) => {
                        c.add(Counter::connect_errors, 1);
                        Err(e)
                    }
                };
                match caught_up {
                    Ok((conn, flushed)) => {
                        shared.mark_connected(conn.1);
                        c.add(Counter::reconnects, 1);
                        if !flushed {
                            c.add(Counter::catch_ups, 1);
                        }
                        backoff = cfg.backoff.0;
                        conn
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "change listener cannot reconnect");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stopped(&mut stop) => return,
                        }
                        backoff = (backoff * 2).min(cfg.backoff.1);
                        continue;
                    }
                }
            }
        };
        let end = serve(&cfg, &shared, conn, &mut cursor, &mut stop).await;
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

/// Reads the changes committed since the cursor and applies them; decides on the
/// wake-ups received before the read. Returns whether the caches had to be flushed
/// instead (the outbox was pruned past the cursor).
///
/// Bounded by twice the longer of the connect and heartbeat timeouts: a connection
/// that does not answer (a silent partition) is replaced.
async fn read(
    cfg: &Config,
    shared: &Shared,
    pool: &PgPool,
    cursor: &mut Cursor,
) -> Result<bool, sqlx::Error> {
    let c = &shared.counters;
    let limit = cfg.connect_timeout.max(cfg.heartbeat_timeout).saturating_mul(2);
    let read = match tokio::time::timeout(limit, outbox::read_since(pool, &cursor.snapshot)).await {
        Ok(read) => read?,
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    };
    let flushed = read.pruned_below > cursor.snapshot.xmin;
    if flushed {
        resync(cfg, c).await;
    } else {
        apply(cfg, shared, &read.rows).await;
    }
    let verdicts = cursor.verifier.after_read(&read.snapshot, read.rows.iter().map(|r| r.tx));
    c.add(Counter::notifications, verdicts.genuine);
    c.add(Counter::forged, verdicts.forged);
    if verdicts.forged > 0 {
        tracing::debug!(
            forged = verdicts.forged,
            "change listener: wake-ups the trigger did not send ignored"
        );
    }
    cursor.snapshot = read.snapshot;
    if let Some(p) = &mut cursor.pruning {
        p.mark(&cursor.snapshot);
    }
    Ok(flushed)
}

/// Prunes the outbox when due (bounded as a read is).
async fn prune(cfg: &Config, shared: &Shared, pool: &PgPool, cursor: &mut Cursor) {
    let Some(pruning) = &mut cursor.pruning else { return };
    let Some(bound) = pruning.due() else { return };
    let limit = cfg.connect_timeout.max(cfg.heartbeat_timeout).saturating_mul(2);
    match tokio::time::timeout(limit, outbox::prune(pool, bound))
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    {
        Ok(deleted) => {
            pruning.pruned(bound);
            shared.counters.add(Counter::pruned, deleted);
        }
        Err(e) => {
            shared.counters.add(Counter::prune_errors, 1);
            tracing::warn!(error = %e, "change listener: outbox not pruned");
        }
    }
}

/// Invalidates every mapped cache: changes may have been missed.
async fn resync(cfg: &Config, c: &Counters) {
    let results = join_all(cfg.targets.iter().map(|t| t.invalidate(Scope::All))).await;
    c.add(Counter::resync_flushes, cfg.targets.len() as u64);
    c.add(Counter::resyncs, 1);
    let failed = results.iter().filter(|r| r.is_err()).count() as u64;
    c.add(Counter::invalidation_errors, failed);
    tracing::warn!(
        caches = cfg.targets.len(),
        failed,
        "change listener: mapped caches invalidated (the outbox was pruned past what this listener had read)"
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
async fn receive(mut listener: PgListener, tx: mpsc::Sender<String>) -> String {
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
async fn serve(
    cfg: &Config,
    shared: &Shared,
    conn: Connected,
    cursor: &mut Cursor,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let (conn, _pid, pool) = conn;
    let c = &shared.counters;
    let (tx, mut rx) = mpsc::channel(EVENT_CAPACITY);
    let mut reader = AbortOnDrop(tokio::spawn(receive(conn, tx)));
    let period = cfg.heartbeat.unwrap_or(MAINTENANCE);
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outstanding: Option<Outstanding> = None;
    let mut nonce = 0u64;
    loop {
        let deadline = outstanding.as_ref().map(|o| o.deadline);
        let recheck = cursor.verifier.waiting();
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
                    let mut woken = false;
                    for payload in &batch {
                        match classify(payload) {
                            Notice::Wake(xid) => {
                                woken = true;
                                if !cursor.verifier.woken(xid) {
                                    c.add(Counter::forged, 1);
                                }
                            }
                            Notice::Ping { listener, nonce } => pong(shared, &listener, nonce, &mut outstanding),
                            Notice::Other => {
                                c.add(Counter::forged, 1);
                                let shown: String = payload.chars().take(200).collect();
                                tracing::debug!(payload = %shown, "change listener: notification the trigger did not send ignored");
                            }
                        }
                    }
                    if woken && let Err(e) = read(cfg, shared, &pool, cursor).await {
                        c.add(Counter::read_errors, 1);
                        return End::Lost(format!("reading the outbox failed: {e}"));
                    }
                }
                None => {
                    // The reader ended, and everything it read has been handled.
                    let reason = match (&mut reader.0).await {
                        Ok(r) => r,
                        Err(e) => format!("reader task failed: {e}"),
                    };
                    return End::Lost(reason);
                }
            },
            _ = sleep_until_opt(deadline) => {
                c.add(Counter::heartbeat_timeouts, 1);
                return End::Lost(format!("heartbeat not received back within {:?}", cfg.heartbeat_timeout));
            }
            _ = tokio::time::sleep(RECHECK), if recheck => {
                if let Err(e) = read(cfg, shared, &pool, cursor).await {
                    c.add(Counter::read_errors, 1);
                    return End::Lost(format!("reading the outbox failed: {e}"));
                }
            }
            _ = ticks.tick() => {
                if cfg.heartbeat.is_some() && outstanding.is_none() {
                    nonce += 1;
                    outstanding = Some(Outstanding { nonce, deadline: Instant::now() + cfg.heartbeat_timeout });
                    send_ping(&pool, shared, nonce);
                }
                // A safety net: a wake-up lost (or never sent) delays a change by one
                // period at most.
                if let Err(e) = read(cfg, shared, &pool, cursor).await {
                    c.add(Counter::read_errors, 1);
                    return End::Lost(format!("reading the outbox failed: {e}"));
                }
                prune(cfg, shared, &pool, cursor).await;
            }
        }
    }
}

/// Sends a heartbeat from its own task, so that a slow pool never delays
/// notifications; if it fails, the heartbeat times out and the connection is replaced,
/// which is the safe reading of "cannot prove the connection works".
fn send_ping(pool: &PgPool, shared: &Shared, nonce: u64) {
    let payload = serde_json::json!({ "op": "PING", "listener": shared.id, "nonce": nonce }).to_string();
    let pool = pool.clone();
    tokio::spawn(async move {
        if let Err(e) =
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(&pool).await
        {
            tracing::debug!(error = %e, "change listener heartbeat not sent");
        }
    });
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
