//! Change capture, the application side: a `LISTEN`ing task that invalidates the
//! mapped caches for every change notification.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the builder and the [`ChangeListener`] handle |
//! | `state.rs` | what the handle and the task share: settings, connection state, counters |
//! | `run.rs` | the task: connect, heartbeats, reconnect and resync, the serving loop |
//! | `notification.rs` | a notification's payload, parsed, and a batch applied to the caches |

mod notification;
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

use self::run::{connect, run};
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

    /// Notifications are applied in batches (what arrived while the previous batch
    /// was being applied, up to 10 000); a batch with more distinct keys than this for
    /// one cache is applied as one `invalidate_all` of that cache instead (a bulk
    /// `UPDATE`). Default 10 000.
    pub fn bulk_threshold(mut self, keys: usize) -> Self {
        self.cfg.bulk_threshold = keys.max(1);
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
    /// connection fails (later failures are retried in the background).
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
        shared.mark_connected(first.1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(cfg.clone(), shared.clone(), first, stop_rx));
        Ok(ChangeListener { shared, cfg, stop: stop_tx, task: Some(task) })
    }
}

/// Forwards committed database changes, notified by the triggers of
/// [`crate::install_change_capture`], to the mapped caches' `invalidate`.
///
/// * Each notification's key is parsed with the mapped cache's `CacheKey::parse_key`
///   and invalidated (notifications that arrive together are grouped into one
///   `invalidate_many` per cache). A `TRUNCATE` invalidates the whole cache.
/// * Malformed notifications, unparsable keys and unmapped tables are counted
///   ([`ChangeListenerStats`]) and ignored; they never stop the listener.
/// * When the listening connection is lost (closed, killed, or silent past the
///   heartbeat timeout), the listener reconnects with backoff, and once `LISTEN` is
///   active again it assumes it missed notifications: it calls `invalidate_all` on
///   every mapped cache (counted in `resyncs`).
///
/// Each listener invalidates through its caches, which delete from L2 and broadcast
/// on the backplane: one listener (or two, for redundancy) per fleet is enough.
/// Every instance running one is correct but multiplies L2 deletes and backplane
/// messages by the fleet size.
///
/// It holds two dedicated connections (not taken from the application's pool, opened
/// with its connect options): the listening one and one that sends heartbeats.
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
