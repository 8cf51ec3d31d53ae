//! Change capture, the application side: a `LISTEN`ing task that invalidates the
//! mapped caches for every change notification.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use strata::{Cache, CacheHandle, CacheKey, CacheValue, Scope};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::capture::CHANNEL;
use crate::error::Error;

/// Notifications buffered between the connection reader and the invalidating loop;
/// beyond this the reader waits (and Postgres queues, up to its 8 GB queue).
const EVENT_CAPACITY: usize = 16_384;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of a [`ChangeListener`]'s counters (since it started). Also
        /// exported as `strata_sql_listener_<name>_total` through the `metrics` facade.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct ChangeListenerStats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        #[derive(Default)]
        struct Counters {
            $( $name: AtomicU64, )*
        }

        impl Counters {
            fn snapshot(&self) -> ChangeListenerStats {
                ChangeListenerStats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        enum Counter { $( $name, )* }

        impl Counters {
            fn add(&self, c: Counter, n: u64) {
                if n == 0 {
                    return;
                }
                match c {
                    $( Counter::$name => {
                        self.$name.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!(concat!("strata_sql_listener_", stringify!($name), "_total"))
                            .increment(n);
                    } )*
                }
            }
        }
    };
}

counters! {
    /// Change notifications received (heartbeats excluded).
    notifications,
    /// Keys handed to `Cache::invalidate_many` (per cache).
    keys_invalidated,
    /// `TRUNCATE` notifications (each invalidates the whole mapped cache).
    truncates,
    /// Notifications that were not valid JSON of the expected shape: ignored.
    malformed,
    /// Keys that the mapped cache's `CacheKey::parse_key` rejected: ignored.
    unparsable_keys,
    /// Notifications for a table no cache is mapped to: ignored.
    unmapped,
    /// Listening connections lost (closed, failed, or silent past the heartbeat timeout).
    connection_losses,
    /// Listening connections re-established after a loss.
    reconnects,
    /// Completed rounds of `invalidate_all` on every mapped cache after a reconnect
    /// (changes made while disconnected were not notified).
    resyncs,
    /// Caches flushed with `invalidate_all` by those rounds.
    resync_flushes,
    /// Own heartbeats received back.
    heartbeats,
    /// Heartbeats not received back in time (each counts as a connection loss).
    heartbeat_timeouts,
    /// Batches with more keys for one cache than `bulk_threshold`, applied as one
    /// `invalidate_all`.
    bulk_flushes,
    /// Cache invalidations that returned an error (the cache made itself safe: buffered
    /// retry or bypass).
    invalidation_errors,
    /// Failed attempts to (re)connect.
    connect_errors,
}

/// Invalidates `keys` (text form) in `cache`: (keys invalidated, keys unparsable,
/// result). Keys are parsed as the cache's key type and sent on in canonical form.
async fn invalidate_text(cache: &CacheHandle, keys: &[String]) -> (u64, u64, strata::Result<()>) {
    let (parsed, bad) = cache.canonical_keys(keys);
    let done = parsed.len() as u64;
    let res = if parsed.is_empty() { Ok(()) } else { cache.invalidate(Scope::Keys(parsed)).await };
    (done, bad as u64, res)
}

/// A table mapped to a target.
struct Mapping {
    schema: Option<String>,
    table: String,
    target: usize,
}

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

struct Config {
    options: PgConnectOptions,
    targets: Vec<CacheHandle>,
    mappings: Vec<Mapping>,
    heartbeat: Option<Duration>,
    heartbeat_timeout: Duration,
    connect_timeout: Duration,
    backoff: (Duration, Duration),
    bulk_threshold: usize,
    max_batch: usize,
}

struct Shared {
    counters: Counters,
    connected: AtomicBool,
    backend_pid: AtomicI32,
    /// Tells this listener's heartbeats from other listeners'.
    id: String,
}

impl Shared {
    fn mark_connected(&self, pid: i32) {
        self.backend_pid.store(pid, Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
    }

    fn mark_disconnected(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.backend_pid.store(0, Ordering::SeqCst);
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

/// A listening connection, its backend pid, and the pool heartbeats are sent through.
type Connected = (PgListener, i32, PgPool);

/// Opens the listening connection and the heartbeat connection, in a private pool of
/// two (so that a dead connection never goes back into the application's pool, and a
/// busy application pool never delays a heartbeat), `LISTEN`s and reads the backend
/// pid.
async fn connect(cfg: &Config) -> Result<Connected, sqlx::Error> {
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

async fn run(cfg: Arc<Config>, shared: Arc<Shared>, first: Connected, mut stop: watch::Receiver<bool>) {
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

/// A heartbeat sent and not yet received back.
struct Outstanding {
    nonce: u64,
    deadline: Instant,
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

/// The shape of a notification payload (see `sql/change_capture.sql`).
#[derive(Deserialize)]
struct Payload {
    op: String,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    key: Option<serde_json::Value>,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default)]
    nonce: Option<u64>,
}

enum Change {
    Row { schema: Option<String>, table: String, key: String },
    Truncate { schema: Option<String>, table: String },
    Ping { listener: String, nonce: u64 },
}

fn parse(payload: &str) -> Option<Change> {
    let p: Payload = serde_json::from_str(payload).ok()?;
    match p.op.as_str() {
        "INSERT" | "UPDATE" | "DELETE" => {
            let key = match p.key? {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some(Change::Row { schema: p.schema, table: p.table?, key })
        }
        "TRUNCATE" => Some(Change::Truncate { schema: p.schema, table: p.table? }),
        "PING" => Some(Change::Ping { listener: p.listener?, nonce: p.nonce? }),
        _ => None,
    }
}

/// Applies one batch of notifications: per cache, one `invalidate_many` (or one
/// `invalidate_all` for a truncate or a batch above the bulk threshold).
async fn apply(cfg: &Config, shared: &Shared, batch: Vec<String>, outstanding: &mut Option<Outstanding>) {
    let c = &shared.counters;
    let n = cfg.targets.len();
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); n];
    let mut all = vec![false; n];
    for payload in &batch {
        let Some(change) = parse(payload) else {
            c.add(Counter::malformed, 1);
            let shown: String = payload.chars().take(200).collect();
            tracing::warn!(payload = %shown, "malformed change notification ignored");
            continue;
        };
        let (schema, table) = match &change {
            Change::Ping { listener, nonce } => {
                if *listener == shared.id && outstanding.as_ref().is_some_and(|o| o.nonce == *nonce) {
                    *outstanding = None;
                    c.add(Counter::heartbeats, 1);
                }
                continue;
            }
            Change::Row { schema, table, .. } | Change::Truncate { schema, table } => (schema, table),
        };
        c.add(Counter::notifications, 1);
        let mut mapped = false;
        for m in cfg
            .mappings
            .iter()
            .filter(|m| m.table == *table && (m.schema.is_none() || m.schema.as_deref() == schema.as_deref()))
        {
            mapped = true;
            match &change {
                Change::Row { key, .. } => {
                    if seen[m.target].insert(key.clone()) {
                        keys[m.target].push(key.clone());
                    }
                }
                _ => all[m.target] = true,
            }
        }
        if !mapped {
            c.add(Counter::unmapped, 1);
        }
        if matches!(change, Change::Truncate { .. }) {
            c.add(Counter::truncates, 1);
        }
    }
    let work = (0..n).filter(|&i| all[i] || !keys[i].is_empty()).map(|i| {
        let target = &cfg.targets[i];
        let keys = &keys[i];
        let flush = all[i] || keys.len() > cfg.bulk_threshold;
        if !all[i] && flush {
            c.add(Counter::bulk_flushes, 1);
        }
        async move {
            if flush {
                (0, 0, target.invalidate(Scope::All).await)
            } else {
                invalidate_text(target, keys).await
            }
        }
    });
    for (done, bad, res) in join_all(work).await {
        c.add(Counter::keys_invalidated, done);
        c.add(Counter::unparsable_keys, bad);
        if let Err(e) = res {
            c.add(Counter::invalidation_errors, 1);
            tracing::warn!(error = %e, "change listener: invalidation failed (the cache made itself safe)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert!(matches!(
            parse(r#"{"schema":"public","table":"payment","op":"UPDATE","key":"7","version":"3"}"#),
            Some(Change::Row { ref table, ref key, .. }) if table == "payment" && key == "7"
        ));
        assert!(
            matches!(parse(r#"{"table":"t","op":"DELETE","key":42}"#), Some(Change::Row { ref key, .. }) if key == "42")
        );
        assert!(matches!(parse(r#"{"table":"t","op":"TRUNCATE"}"#), Some(Change::Truncate { .. })));
        assert!(matches!(parse(r#"{"op":"PING","listener":"x","nonce":1}"#), Some(Change::Ping { .. })));
        for bad in [
            "garbage",
            "",
            "{}",
            r#"{"op":"UPDATE","table":"t"}"#,
            r#"{"op":"UPDATE","key":"1"}"#,
            r#"{"op":"UPDATE","table":"t","key":null}"#,
            r#"{"op":"UPDATE","table":"t","key":[1]}"#,
            r#"{"op":"MERGE","table":"t","key":"1"}"#,
            "[1,2]",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
