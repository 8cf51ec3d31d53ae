//! Change capture, the application side: a `LISTEN`ing task that, on each wake-up,
//! reads the changes committed since its last read from the outbox and invalidates
//! the mapped caches (see `capture.rs` for why an outbox, not the notifications'
//! payloads).
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the builder and the [`ChangeListener`] handle |
//! | `state.rs` | what the handle and the task share: settings, connection state, counters |
//! | `run.rs` | the task: connect, heartbeats, reconnect and catch-up, the serving loop |
//! | `outbox.rs` | reading the outbox by snapshot, pruning it, checking wake-ups |
//! | `notification.rs` | a notification classified, and the changes read applied to the caches |

pub(crate) mod notification;
pub(crate) mod outbox;
mod run;
mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use strata::{Cache, CacheHandle, CacheKey, CacheValue};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::run::{Cursor, connect, run};
use self::state::{Config, Counters, Mapping, Shared};
use crate::error::Error;

pub use self::state::ChangeListenerStats;

/// Configures and starts a [`ChangeListener`]. Create it with
/// [`ChangeListener::builder`].
#[must_use = "a builder does nothing until start() is called"]
pub struct ChangeListenerBuilder {
    /// What the listener will run with; the setters fill it in.
    cfg: Config,
}

impl ChangeListenerBuilder {
    /// Maps `table` (as installed with [`crate::install_change_capture`]: `"payment"`
    /// or `"billing.payment"`; case-sensitive) to `cache`: each notification's key is
    /// parsed with `K::parse_key` and invalidated with [`Cache::invalidate_many`].
    /// A table may be mapped to several caches and a cache to several tables.
    pub fn table<K: CacheKey, V: CacheValue>(self, table: &str, cache: &Cache<K, V>) -> Self {
        self.table_handle(table, &cache.handle())
    }

    /// [`table`](Self::table) for a type-erased cache handle.
    pub fn table_handle(mut self, table: &str, cache: &CacheHandle) -> Self {
        let target = cache.clone();
        // The origin is one per built cache (shared by its clones): it identifies it.
        let idx = match self.cfg.targets.iter().position(|t| t.origin() == target.origin()) {
            Some(i) => i,
            None => {
                self.cfg.targets.push(target);
                self.cfg.targets.len() - 1
            }
        };
        let (schema, table) = match table.split_once('.') {
            Some((s, t)) => (Some(s.to_owned()), t.to_owned()),
            None => (None, table.to_owned()),
        };
        self.cfg.mappings.push(Mapping { schema, table, target: idx });
        self
    }

    /// Every `interval`, the listener sends itself a notification (on its second
    /// connection) and expects it back on the listening connection within the
    /// heartbeat timeout; if it does not come, the connection is presumed dead (a
    /// silent network partition does not close a socket) and is replaced, with a
    /// resync. `None` disables it. Default 5 s.
    pub fn heartbeat(mut self, interval: Option<Duration>) -> Self {
        self.cfg.heartbeat = interval.filter(|d| !d.is_zero());
        self
    }

    /// How long a heartbeat may take to come back. Default 2 s.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.heartbeat_timeout = timeout;
        self
    }

    /// Bound on establishing the listening connection (connect, `LISTEN`). Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.connect_timeout = timeout;
        self
    }

    /// Waits between reconnection attempts: doubling from `min` up to `max`.
    /// Default 50 ms to 5 s.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.backoff = (min, max.max(min));
        self
    }

    /// Changes are applied per read of the outbox (what committed since the previous
    /// read); a read with more distinct keys than this for one cache is applied as one
    /// `invalidate_all` of that cache instead (a bulk `UPDATE`). Default 10 000.
    pub fn bulk_threshold(mut self, keys: usize) -> Self {
        self.cfg.bulk_threshold = keys.max(1);
        self
    }

    /// How long outbox rows are kept: every `retention / 8` or so this listener deletes
    /// the rows of transactions that ended before a read it made at least `retention`
    /// ago (rows every listener that read within the retention has read). A listener
    /// disconnected longer than that (the shortest retention of the listeners pruning
    /// one database) cannot catch up and flushes its caches instead (`resyncs`).
    /// `None`: this listener does not prune (another one does, or a job of yours).
    /// Default 10 minutes. Pruning needs `DELETE` on `strata_change_outbox` and
    /// `UPDATE` on `strata_change_outbox_horizon` (the installing role has both).
    pub fn outbox_retention(mut self, retention: Option<Duration>) -> Self {
        self.cfg.retention = retention;
        self
    }

    /// Connects, `LISTEN`s, and returns once notifications are being received; the
    /// listener then runs in a background task until [`ChangeListener::shutdown`] or
    /// drop. Start it before the mapped caches serve traffic: changes committed
    /// before it listens are not seen.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) with no table
    /// mapped; [`ErrorKind::Database`](crate::ErrorKind::Database) when the first
    /// connection fails, or the outbox is missing or not readable by the role
    /// (install change capture first; later failures are retried in the background).
    pub async fn start(self) -> Result<ChangeListener, Error> {
        if self.cfg.mappings.is_empty() {
            return Err(Error::invalid("ChangeListener: no table mapped; call .table(name, &cache)"));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::invalid("ChangeListener::start must run inside a tokio runtime"));
        }
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            connected: AtomicBool::new(false),
            backend_pid: AtomicI32::new(0),
            id: listener_id(),
        });
        let cfg = Arc::new(self.cfg);
        let first = connect(&cfg)
            .await
            .map_err(|e| Error::database("ChangeListener: cannot connect and LISTEN", e))?;
        // After LISTEN: a change committed after this snapshot is read on its wake-up.
        let snapshot = outbox::start(&first.2).await.map_err(|e| {
            Error::database("ChangeListener: cannot read the change outbox (is change capture installed?)", e)
        })?;
        shared.mark_connected(first.1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let cursor = Cursor::new(snapshot, cfg.retention);
        let task = tokio::spawn(run(cfg.clone(), shared.clone(), first, cursor, stop_rx));
        Ok(ChangeListener { shared, cfg, stop: stop_tx, task: Some(task) })
    }
}

/// Forwards committed database changes, written to the outbox by the triggers of
/// [`crate::install_change_capture`], to the mapped caches' `invalidate`.
///
/// * On each wake-up notification (and every heartbeat interval, as a safety net) it
///   reads the changes committed since its previous read from the outbox; each key is
///   parsed with the mapped cache's `CacheKey::parse_key` and invalidated (one
///   `invalidate_many` per cache and read). A `TRUNCATE` invalidates the whole cache.
/// * Notifications are never trusted: anything on the channel that the trigger did
///   not send (any role may `pg_notify`) is counted (`forged`) and ignored, and at
///   most costs one read of the outbox. Unparsable keys and unmapped tables are
///   counted and ignored. Nothing of this stops the listener.
/// * When the listening connection is lost (closed, killed, or silent past the
///   heartbeat timeout), the listener reconnects with backoff, and once `LISTEN` is
///   active again it reads what committed meanwhile from the outbox (`catch_ups`);
///   only if the outbox was pruned past its last read (disconnected longer than the
///   retention) does it call `invalidate_all` on every mapped cache (`resyncs`).
///
/// Each listener invalidates through its caches, which delete from L2 and broadcast
/// on the backplane: one listener (or two, for redundancy) per fleet is enough.
/// Every instance running one is correct but multiplies L2 deletes and backplane
/// messages by the fleet size.
///
/// It holds up to three dedicated connections (not taken from the application's pool,
/// opened with its connect options): the listening one, one that reads the outbox,
/// and one that sends heartbeats. Its role needs `SELECT` on `strata_change_outbox`
/// and `strata_change_outbox_horizon` (and, to prune, see
/// [`outbox_retention`](ChangeListenerBuilder::outbox_retention)).
pub struct ChangeListener {
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ChangeListener {
    /// Starts configuring a listener whose connections use `pool`'s connect options.
    pub fn builder(pool: &PgPool) -> ChangeListenerBuilder {
        Self::builder_with((*pool.connect_options()).clone())
    }

    /// Starts configuring a listener that connects with `options`.
    pub fn builder_with(options: PgConnectOptions) -> ChangeListenerBuilder {
        ChangeListenerBuilder {
            cfg: Config {
                options: options.application_name("strata-change-listener"),
                targets: Vec::new(),
                mappings: Vec::new(),
                heartbeat: Some(Duration::from_secs(5)),
                heartbeat_timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(5),
                backoff: (Duration::from_millis(50), Duration::from_secs(5)),
                bulk_threshold: 10_000,
                max_batch: 10_000,
                retention: Some(Duration::from_secs(600)),
            },
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ChangeListenerStats {
        self.shared.counters.snapshot()
    }

    /// Whether the listening connection is up (`LISTEN` active).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// The server process id of the listening connection while connected (what
    /// `pg_stat_activity.pid` and `pg_terminate_backend` use).
    pub fn backend_pid(&self) -> Option<i32> {
        Some(self.shared.backend_pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }

    /// The namespaces of the mapped caches.
    pub fn namespaces(&self) -> Vec<String> {
        self.cfg.targets.iter().map(|t| t.namespace().to_owned()).collect()
    }

    /// Stops the listener and waits for its task to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ChangeListener {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ChangeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeListener")
            .field("namespaces", &self.namespaces())
            .field("connected", &self.is_connected())
            .field("backend_pid", &self.backend_pid())
            .finish()
    }
}

fn listener_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{}-{nanos:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
