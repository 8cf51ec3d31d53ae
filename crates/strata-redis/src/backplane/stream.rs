//! [`RedisStreamBackplane`]: invalidations on a capped Redis Stream (the default
//! backplane).
//!
//! # Wire format
//!
//! One stream, `{prefix}:{bp}`, capped with `MAXLEN ~ N`. Each entry has two fields:
//! `m`, the [`Message`] encoded by [`Message::encode`], and `n`, the entry's number
//! from the counter `{prefix}:{bp}:seq`. A publish is one Lua script that increments
//! the counter and appends the entry (`XADD … MAXLEN ~ N * m <bytes> n <n>`), so
//! numbers follow stream order without gaps. A subscriber that sees number `k + 2`
//! after `k` knows that entry `k + 1` was trimmed before it read it: that is how a
//! loss is *known* rather than guessed (from stream ids alone, a trimmed entry and
//! a quiet period look the same).
//!
//! # Subscriber
//!
//! Each [`Backplane::subscribe`] opens a dedicated connection named
//! `strata-bp-<id>-<k>` (`CLIENT SETNAME`, visible in `CLIENT LIST`) and runs a task
//! that loops on `XREAD COUNT c BLOCK b STREAMS key <last id>`, starting at the
//! stream's last entry at subscribe time. When the connection fails (or a read does
//! not answer within the block time plus a grace period) it emits
//! [`BackplaneEvent::Disconnected`], reconnects with jittered exponential backoff,
//! reads everything after the last id it saw (delivering it), and then emits
//! [`BackplaneEvent::Resumed`] with `complete: true`, or [`BackplaneEvent::Lost`]
//! followed by `Resumed { complete: false }` when entries it had not read were
//! trimmed (or the counter went backwards: Redis lost data). A gap seen while
//! connected (a reader slower than the cap) emits `Lost` alone.
//!
//! The subscription channel is bounded: when the receiver is slow the task waits
//! (the stream is the buffer), so nothing is dropped in the process; a reader slower
//! than the stream's window shows up as a gap, hence `Lost`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use redis::Value;
use redis::aio::MultiplexedConnection;
use strata::backplane::{Backplane, BackplaneEvent, Message, OriginId, Subscription};
use strata::error::{Error, ErrorKind, Result};
use tokio::sync::mpsc;

pub use crate::backplane::BackplaneStats;
use crate::backplane::stream_builder::WHAT;
pub use crate::backplane::stream_builder::{DEFAULT_MAX_LEN, RedisStreamBackplaneBuilder};
use crate::backplane::stream_scripts::{STREAM_CATCH_UP, STREAM_PUBLISH, STREAM_START};
use crate::backplane::{StatCounters, connect_publisher, ping_publisher};
use crate::connection::{Backoff, ManagedConn, map_redis_error};
use crate::reply::{bad_reply, value_array, value_bytes, value_string, value_u64};

impl RedisStreamBackplaneBuilder {
    /// Checks the settings, connects the publishing connection (unless lazy) and
    /// returns the backplane.
    pub async fn build(self) -> Result<RedisStreamBackplane> {
        self.check()?;
        let (client, publisher) = connect_publisher(&self.connection, WHAT)?;
        let prefix = &self.connection.prefix;
        let bp = RedisStreamBackplane {
            inner: Arc::new(StreamInner {
                stream_key: format!("{prefix}:{{bp}}"),
                counter_key: format!("{prefix}:{{bp}}:seq"),
                client,
                publisher,
                publish_script: redis::Script::new(STREAM_PUBLISH),
                start_script: redis::Script::new(STREAM_START),
                catch_up_script: redis::Script::new(STREAM_CATCH_UP),
                instance: rand::random::<u32>(),
                next_subscription: AtomicU64::new(1),
                stats: StatCounters::default(),
                cfg: self,
            }),
        };
        if !bp.inner.cfg.connection.lazy {
            let t = bp.inner.cfg.connection.connect_timeout + bp.inner.cfg.op_timeout;
            ping_publisher(&bp.inner.publisher, t, WHAT, "redis stream backplane ping").await?;
        }
        Ok(bp)
    }
}

struct StreamInner {
    cfg: RedisStreamBackplaneBuilder,
    stream_key: String,
    counter_key: String,
    client: redis::Client,
    publisher: ManagedConn,
    publish_script: redis::Script,
    start_script: redis::Script,
    catch_up_script: redis::Script,
    instance: u32,
    next_subscription: AtomicU64,
    stats: StatCounters,
}

/// The Redis Stream backplane: durable, replayable invalidations (see the module
/// docs for the wire format and the subscriber's behaviour).
///
/// Cloning gives another handle to the same publisher connection and counters.
#[derive(Clone)]
pub struct RedisStreamBackplane {
    inner: Arc<StreamInner>,
}

impl std::fmt::Debug for RedisStreamBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamBackplane")
            .field("url", &self.inner.publisher.shown_url())
            .field("stream", &self.inner.stream_key)
            .finish_non_exhaustive()
    }
}

/// One stream entry as read.
#[derive(Debug)]
struct RawEntry {
    id: String,
    message: Option<Vec<u8>>,
    number: Option<u64>,
}

/// Parses `[[id, [field, value, …]], …]`.
fn parse_entries(v: &Value) -> Option<Vec<RawEntry>> {
    let mut out = Vec::new();
    for e in value_array(v)? {
        let pair = value_array(e)?;
        let id = value_string(pair.first()?)?;
        let mut entry = RawEntry { id, message: None, number: None };
        match pair.get(1)? {
            Value::Map(kv) => {
                for (k, v) in kv {
                    take_field(&mut entry, k, v);
                }
            }
            other => {
                let fields = value_array(other)?;
                for kv in fields.chunks(2) {
                    if let [k, v] = kv {
                        take_field(&mut entry, k, v);
                    }
                }
            }
        }
        out.push(entry);
    }
    Some(out)
}

fn take_field(entry: &mut RawEntry, k: &Value, v: &Value) {
    match value_bytes(k) {
        Some(b"m") => entry.message = value_bytes(v).map(<[u8]>::to_vec),
        Some(b"n") => entry.number = value_u64(v),
        _ => {}
    }
}

/// Parses an `XREAD` reply for one stream (nil when the block time passed).
fn parse_xread(v: &Value) -> Option<Vec<RawEntry>> {
    match v {
        Value::Nil => Some(Vec::new()),
        Value::Map(kv) => match kv.first() {
            Some((_, entries)) => parse_entries(entries),
            None => Some(Vec::new()),
        },
        other => {
            let streams = value_array(other)?;
            match streams.first() {
                None => Some(Vec::new()),
                Some(s) => parse_entries(value_array(s)?.get(1)?),
            }
        }
    }
}

impl RedisStreamBackplane {
    /// Starts building a backplane for `url` (`redis://[user:password@]host[:port][/db]`
    /// or `rediss://` with the `tls` feature).
    pub fn builder(url: impl Into<String>) -> RedisStreamBackplaneBuilder {
        RedisStreamBackplaneBuilder::new(url)
    }

    /// The stream's key.
    pub fn stream_key(&self) -> &str {
        &self.inner.stream_key
    }

    /// The prefix of the client names of this handle's subscriber connections
    /// (`strata-bp-<id>`; each subscription appends `-<k>`).
    pub fn client_name_prefix(&self) -> String {
        format!("strata-bp-{:08x}", self.inner.instance)
    }

    /// Counters.
    pub fn stats(&self) -> BackplaneStats {
        self.inner.stats.snapshot()
    }

    /// Opens a dedicated subscriber connection and names it.
    async fn connect(&self, name: &str) -> Result<MultiplexedConnection> {
        let cfg = &self.inner.cfg;
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connection.connect_timeout))
            .set_response_timeout(None);
        let mut conn = match tokio::time::timeout(
            cfg.connection.connect_timeout + cfg.op_timeout,
            self.inner.client.get_multiplexed_async_connection_with_config(&conn_cfg),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(map_redis_error(ErrorKind::Backplane, "redis stream subscriber connect", e));
            }
            Err(_) => {
                return Err(Error::timeout(
                    "redis stream subscriber connect",
                    cfg.connection.connect_timeout,
                ));
            }
        };
        let mut setname = redis::cmd("CLIENT");
        setname.arg("SETNAME").arg(name);
        match tokio::time::timeout(cfg.read_grace, setname.query_async::<Value>(&mut conn)).await {
            Ok(Ok(_)) => Ok(conn),
            Ok(Err(e)) => Err(map_redis_error(ErrorKind::Backplane, "redis stream subscriber setname", e)),
            Err(_) => Err(Error::timeout("redis stream subscriber setname", cfg.read_grace)),
        }
    }

    /// Scans the stream backwards, at most the whole (capped) stream.
    async fn scan_for(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        let want = usize::try_from(to_seq - from_seq + 1).unwrap_or(usize::MAX);
        let mut found: BTreeMap<u64, Message> = BTreeMap::new();
        let mut end = "+".to_owned();
        let mut scanned: u64 = 0;
        let limit = self.inner.cfg.max_len.saturating_mul(2).saturating_add(1000);
        let page = 1000usize;
        while scanned < limit {
            let key = self.inner.stream_key.clone();
            let end_arg = end.clone();
            let v: Value = self
                .inner
                .publisher
                .call(
                    self.inner.cfg.read_grace,
                    ErrorKind::Backplane,
                    "redis stream replay",
                    |mut c| async move {
                        redis::cmd("XREVRANGE")
                            .arg(key)
                            .arg(end_arg)
                            .arg("-")
                            .arg("COUNT")
                            .arg(page)
                            .query_async(&mut c)
                            .await
                    },
                )
                .await
                .map_err(|e| e.into_error())?;
            let entries =
                parse_entries(&v).ok_or_else(|| bad_reply(ErrorKind::Backplane, "redis stream replay"))?;
            scanned += entries.len() as u64;
            let done = entries.len() < page;
            for e in &entries {
                let Some(bytes) = &e.message else { continue };
                let Ok(m) = Message::decode(bytes) else { continue };
                if m.origin == origin && !m.is_heartbeat() && (from_seq..=to_seq).contains(&m.seq) {
                    found.entry(m.seq).or_insert(m);
                }
            }
            if found.len() >= want {
                break;
            }
            match entries.last() {
                Some(last) if !done => end = format!("({}", last.id),
                _ => break,
            }
        }
        if found.len() >= want { Ok(Some(found.into_values().collect())) } else { Ok(None) }
    }
}

#[async_trait]
impl Backplane for RedisStreamBackplane {
    fn name(&self) -> &str {
        "redis-stream"
    }

    async fn publish(&self, message: &Message) -> Result<()> {
        let bytes = message.encode()?;
        let inner = &self.inner;
        let mut inv = inner.publish_script.prepare_invoke();
        inv.key(&inner.stream_key).key(&inner.counter_key).arg(inner.cfg.max_len).arg(bytes.as_ref());
        let _: Value = inner
            .publisher
            .call(inner.cfg.op_timeout, ErrorKind::Backplane, "redis stream publish", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await
            .map_err(|e| e.into_error())?;
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let k = self.inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{k}", self.client_name_prefix());
        let mut conn = self.connect(&name).await?;
        let inner = &self.inner;
        let mut inv = inner.start_script.prepare_invoke();
        inv.key(&inner.stream_key).key(&inner.counter_key);
        let v: Value = match tokio::time::timeout(inner.cfg.read_grace, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(map_redis_error(ErrorKind::Backplane, "redis stream subscribe", e)),
            Err(_) => return Err(Error::timeout("redis stream subscribe", inner.cfg.read_grace)),
        };
        let (last_id, last_n) = value_array(&v)
            .and_then(|a| Some((value_string(a.first()?)?, value_u64(a.get(1)?)?)))
            .ok_or_else(|| bad_reply(ErrorKind::Backplane, "redis stream subscribe"))?;
        let (tx, rx) = mpsc::channel(inner.cfg.channel_capacity);
        let reader = StreamReader {
            bp: self.clone(),
            tx,
            name,
            last_id,
            last_n,
            backoff: Backoff::new(inner.cfg.reconnect_min, inner.cfg.reconnect_max),
        };
        tokio::spawn(reader.run(conn));
        Ok(rx)
    }

    async fn replay(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        if from_seq > to_seq {
            return Ok(Some(Vec::new()));
        }
        self.scan_for(origin, from_seq, to_seq).await
    }
}

/// Why the reader stopped reading on its connection.
enum Stop {
    /// The receiver was dropped: end the task.
    Closed,
    /// The connection failed: reconnect.
    Failed(Error),
}

struct StreamReader {
    bp: RedisStreamBackplane,
    tx: mpsc::Sender<BackplaneEvent>,
    name: String,
    last_id: String,
    last_n: u64,
    backoff: Backoff,
}

impl StreamReader {
    async fn send(&self, ev: BackplaneEvent) -> std::result::Result<(), Stop> {
        self.bp.inner.stats.count(&ev, "redis-stream");
        self.tx.send(ev).await.map_err(|_| Stop::Closed)
    }

    /// Delivers one entry; returns true when it revealed a gap.
    async fn deliver(&mut self, e: RawEntry) -> std::result::Result<bool, Stop> {
        let mut gap = false;
        if let Some(n) = e.number {
            if n != self.last_n.wrapping_add(1) {
                tracing::warn!(
                    subscriber = %self.name,
                    expected = self.last_n.wrapping_add(1),
                    got = n,
                    "redis stream backplane: entries were trimmed before this subscriber read them"
                );
                gap = true;
                self.send(BackplaneEvent::Lost).await?;
            }
            self.last_n = n;
        }
        self.last_id = e.id;
        let ev = match e.message.as_deref().map(Message::decode) {
            Some(Ok(m)) => BackplaneEvent::Message(m),
            _ => {
                tracing::warn!(subscriber = %self.name, id = %self.last_id, "redis stream backplane: malformed entry skipped");
                BackplaneEvent::Malformed
            }
        };
        self.send(ev).await?;
        Ok(gap)
    }

    async fn run(mut self, conn: MultiplexedConnection) {
        let mut conn = Some(conn);
        loop {
            let mut c = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => return,
                },
            };
            match self.read_loop(&mut c).await {
                Stop::Closed => return,
                Stop::Failed(e) => {
                    tracing::warn!(subscriber = %self.name, error = %e, "redis stream backplane: subscription lost");
                    if self.send(BackplaneEvent::Disconnected).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reconnects with backoff and catches up; `None` when the receiver is gone.
    async fn reconnect(&mut self) -> Option<MultiplexedConnection> {
        let started = Instant::now();
        loop {
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            let mut c = match self.bp.connect(&self.name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(subscriber = %self.name, error = %e, "redis stream backplane: reconnect failed");
                    continue;
                }
            };
            match self.catch_up(&mut c).await {
                Ok(complete) => {
                    self.backoff.reset();
                    tracing::info!(
                        subscriber = %self.name,
                        complete,
                        after = ?started.elapsed(),
                        "redis stream backplane: subscription resumed"
                    );
                    if !complete && self.send(BackplaneEvent::Lost).await.is_err() {
                        return None;
                    }
                    if self.send(BackplaneEvent::Resumed { complete }).await.is_err() {
                        return None;
                    }
                    return Some(c);
                }
                Err(Stop::Closed) => return None,
                Err(Stop::Failed(e)) => {
                    tracing::debug!(subscriber = %self.name, error = %e, "redis stream backplane: catch-up failed");
                }
            }
        }
    }

    /// Delivers everything after the last id; returns whether nothing was lost.
    async fn catch_up(&mut self, c: &mut MultiplexedConnection) -> std::result::Result<bool, Stop> {
        let mut complete = true;
        let inner = self.bp.inner.clone();
        loop {
            let mut inv = inner.catch_up_script.prepare_invoke();
            inv.key(&inner.stream_key).key(&inner.counter_key).arg(&self.last_id).arg(inner.cfg.batch);
            let v: Value = match tokio::time::timeout(inner.cfg.read_grace, inv.invoke_async(c)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    return Err(Stop::Failed(map_redis_error(
                        ErrorKind::Backplane,
                        "redis stream catch-up",
                        e,
                    )));
                }
                Err(_) => {
                    return Err(Stop::Failed(Error::timeout("redis stream catch-up", inner.cfg.read_grace)));
                }
            };
            let parsed =
                value_array(&v).and_then(|a| Some((value_u64(a.first()?)?, parse_entries(a.get(1)?)?)));
            let Some((counter, entries)) = parsed else {
                return Err(Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream catch-up")));
            };
            let full = entries.len() >= inner.cfg.batch;
            for e in entries {
                if self.deliver_quiet(e).await? {
                    complete = false;
                }
            }
            if !full {
                if counter != self.last_n {
                    // Entries numbered after the last one seen are gone (the stream was
                    // deleted or trimmed to nothing), or the counter went back (Redis
                    // lost data).
                    tracing::warn!(
                        subscriber = %self.name,
                        counter,
                        last_seen = self.last_n,
                        "redis stream backplane: entries missing after reconnect"
                    );
                    complete = false;
                    self.last_n = counter;
                }
                return Ok(complete);
            }
        }
    }

    /// Like `deliver`, but a gap is reported by the caller (as `Lost` then
    /// `Resumed { complete: false }`) rather than here.
    async fn deliver_quiet(&mut self, e: RawEntry) -> std::result::Result<bool, Stop> {
        let mut gap = false;
        if let Some(n) = e.number {
            gap = n != self.last_n.wrapping_add(1);
            self.last_n = n;
        }
        self.last_id = e.id;
        let ev = match e.message.as_deref().map(Message::decode) {
            Some(Ok(m)) => BackplaneEvent::Message(m),
            _ => BackplaneEvent::Malformed,
        };
        self.send(ev).await?;
        Ok(gap)
    }

    async fn read_loop(&mut self, c: &mut MultiplexedConnection) -> Stop {
        let inner = self.bp.inner.clone();
        let block_ms = u64::try_from(inner.cfg.block.as_millis()).unwrap_or(u64::MAX).max(1);
        let limit = inner.cfg.block + inner.cfg.read_grace;
        loop {
            let read = async {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(inner.cfg.batch)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&inner.stream_key)
                    .arg(&self.last_id)
                    .query_async::<Value>(c)
                    .await
            };
            let r = tokio::select! {
                _ = self.tx.closed() => return Stop::Closed,
                r = tokio::time::timeout(limit, read) => r,
            };
            let v = match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    return Stop::Failed(map_redis_error(ErrorKind::Backplane, "redis stream read", e));
                }
                Err(_) => return Stop::Failed(Error::timeout("redis stream read", limit)),
            };
            let Some(entries) = parse_xread(&v) else {
                return Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream read"));
            };
            for e in entries {
                if let Err(stop) = self.deliver(e).await {
                    return stop;
                }
            }
        }
    }
}
