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
//! a quiet period look the same). An entry without a readable `n` (not written by
//! this backplane) is delivered without taking part in the numbering.
//!
//! On a Redis Cluster both keys carry the hash tag `bp` and live on the master that
//! serves its slot; each subscriber reads on a dedicated cluster connection (see the
//! crate docs, "Redis Cluster", for what a failover of that master does).
//!
//! # Repairs
//!
//! Whoever can write under the prefix can leave the keys where no publish succeeds
//! (an entry at the largest id, another type at the stream's key, a counter `INCR`
//! refuses): the publish script then replaces the key and appends, counted in
//! [`BackplaneStats::repairs`] and logged. A subscriber that missed something
//! because of it sees a gap in the numbers (`Lost`); `replay` forgets the history.
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
//! A read that waited its whole block time for nothing runs the same catch-up read,
//! which sees what a blocked `XREAD` cannot: numbered entries gone after the last
//! one read (`Lost`), and a stream deleted or re-created below the reader's position
//! (`DEL`, `FLUSHALL`, an eviction, a repair, a clock behind the old ids), whose new
//! entries `XREAD` would never return: the reader then reads it from its start, and
//! the numbers tell whether anything was missed. One script call per idle block
//! time, nothing per message.
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
use strata::backplane::{Backplane, BackplaneEvent, Message, OriginId, Subscription};
use strata::error::{Error, ErrorKind, Result};
use tokio::sync::mpsc;

pub use crate::backplane::BackplaneStats;
use crate::backplane::stream_builder::WHAT;
pub use crate::backplane::stream_builder::{DEFAULT_MAX_LEN, RedisStreamBackplaneBuilder};
use crate::backplane::stream_scripts::{
    RawEntry, STREAM_CATCH_UP, STREAM_PUBLISH, STREAM_START, StreamId, parse_entries, parse_xread,
    publish_repairs,
};
use crate::backplane::{StatCounters, connect_publisher, open_message, ping_publisher, seal_message};
use crate::cluster::{Connector, RedisConn};
use crate::connection::{Backoff, map_redis_error};
use crate::integrity::Integrity;
use crate::managed::ManagedConn;
use crate::reply::{bad_reply, value_array, value_string, value_u64};

impl RedisStreamBackplaneBuilder {
    /// Checks the settings, connects the publishing connection (unless lazy) and
    /// returns the backplane.
    pub async fn build(self) -> Result<RedisStreamBackplane> {
        self.check()?;
        let (client, publisher) = connect_publisher(&self.connection, self.shared.as_ref(), WHAT)?;
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
                integrity: Integrity::from_keys(self.integrity_keys.as_deref(), WHAT)?,
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
    client: Connector,
    publisher: Arc<ManagedConn>,
    publish_script: redis::Script,
    start_script: redis::Script,
    catch_up_script: redis::Script,
    instance: u32,
    next_subscription: AtomicU64,
    stats: StatCounters,
    integrity: Option<Integrity>,
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

impl RedisStreamBackplane {
    /// Starts building a backplane for `url` (`redis://[user:password@]host[:port][/db]`
    /// or `rediss://` with the `tls` feature).
    pub fn builder(url: impl Into<String>) -> RedisStreamBackplaneBuilder {
        RedisStreamBackplaneBuilder::new(url)
    }

    /// Starts building a backplane on a Redis Cluster reached through `nodes` (the URLs
    /// of one or more of its nodes). The stream and its counter live in the slot of the
    /// hash tag `bp`, on whichever master serves it; see the crate docs, "Redis
    /// Cluster", for what a failover of that master does.
    pub fn cluster_builder(
        nodes: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisStreamBackplaneBuilder {
        RedisStreamBackplaneBuilder::new("").connection(crate::ConnectionOptions::cluster(nodes))
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

    /// Counts and reports a repair made by the publish script.
    fn repaired(&self, what: &str) {
        self.inner.stats.repairs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("strata_backplane_repairs_total", "backplane" => "redis-stream").increment(1);
        tracing::warn!(
            "redis stream backplane: {what} (no publish could succeed; does something else write \
             under the prefix?); subscribers that missed messages because of it report Lost"
        );
    }

    /// Opens a dedicated subscriber connection and names it.
    async fn connect(&self, name: &str) -> Result<RedisConn> {
        let (cfg, key) = (&self.inner.cfg, &self.inner.stream_key);
        let limit = cfg.connection.connect_timeout + cfg.op_timeout;
        let c = &self.inner.client;
        c.dedicated_named(
            cfg.connection.connect_timeout,
            limit,
            name,
            key,
            cfg.read_grace,
            "redis stream subscriber",
        )
        .await
    }

    /// Scans the stream backwards, at most the whole (capped) stream.
    async fn scan_for(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        let mut end = "+".to_owned();
        let mut scanned: u64 = 0;
        let limit = self.inner.cfg.max_len.saturating_mul(2).saturating_add(1000);
        let page = 1000usize;
        let want = match to_seq.checked_sub(from_seq).and_then(|d| d.checked_add(1)) {
            // More messages than the scan could ever find: no need to read.
            Some(want) if want <= limit.saturating_add(page as u64) => want,
            _ => return Ok(None),
        };
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        let mut found: BTreeMap<u64, Message> = BTreeMap::new();
        let (integrity, stream) = (self.inner.integrity.as_ref(), &self.inner.stream_key);
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
            scanned = scanned.saturating_add(entries.len() as u64);
            let done = entries.len() < page;
            for e in &entries {
                let Some(m) = e.message.as_deref().and_then(|b| open_message(integrity, stream, b)) else {
                    continue;
                };
                if m.origin == origin && !m.is_heartbeat() && (from_seq..=to_seq).contains(&m.seq) {
                    found.entry(m.seq).or_insert(m);
                }
            }
            if found.len() >= want {
                break;
            }
            match entries.last().and_then(|last| last.id.predecessor()) {
                Some(before) if !done => end = before.to_string(),
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
        let inner = &self.inner;
        let bytes = seal_message(inner.integrity.as_ref(), &inner.stream_key, message)?;
        let mut inv = inner.publish_script.prepare_invoke();
        inv.key(&inner.stream_key).key(&inner.counter_key).arg(inner.cfg.max_len).arg(&bytes[..]);
        let v: Value = inner
            .publisher
            .call(inner.cfg.op_timeout, ErrorKind::Backplane, "redis stream publish", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await
            .map_err(|e| e.into_error())?;
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        for what in publish_repairs(&v, &inner.stream_key, &inner.counter_key) {
            self.repaired(&what);
        }
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
        // A counter that is not a number gives no starting point: the first numbered
        // entry read becomes it (the next publish restarts such a counter anyway).
        let (last_id, last_n) = value_array(&v)
            .and_then(|a| Some((StreamId::parse(&value_string(a.first()?)?)?, value_u64(a.get(1)?))))
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

/// What a catch-up read does with a loss it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gaps {
    /// Returns it: after a reconnect the caller sends `Lost` then
    /// `Resumed { complete: false }`.
    Collect,
    /// Sends `Lost` where it is found: the subscription is connected.
    Report,
}

struct StreamReader {
    bp: RedisStreamBackplane,
    tx: mpsc::Sender<BackplaneEvent>,
    name: String,
    last_id: StreamId,
    /// The number of the last numbered entry read, or of the counter when the
    /// reader started or found entries gone; `None` when the counter could not be
    /// read (the next numbered entry then sets it).
    last_n: Option<u64>,
    backoff: Backoff,
}

impl StreamReader {
    async fn send(&self, ev: BackplaneEvent) -> std::result::Result<(), Stop> {
        self.bp.inner.stats.count(&ev, "redis-stream");
        self.tx.send(ev).await.map_err(|_| Stop::Closed)
    }

    /// Delivers one entry; returns true when it revealed a gap.
    async fn deliver(&mut self, e: RawEntry, gaps: Gaps) -> std::result::Result<bool, Stop> {
        let mut gap = false;
        let (integrity, stream) = (self.bp.inner.integrity.as_ref(), &self.bp.inner.stream_key);
        let message = e.message.as_deref().and_then(|b| open_message(integrity, stream, b));
        // Unverified entries have no say in the numbering: a forged number would fake a loss.
        if let Some(n) = e.number.filter(|_| message.is_some() || integrity.is_none()) {
            // No successor to u64::MAX (an entry numbered by hand): whatever follows is a gap.
            if let Some(last) = self.last_n
                && last.checked_add(1) != Some(n)
            {
                tracing::warn!(
                    subscriber = %self.name,
                    last_seen = last,
                    got = n,
                    "redis stream backplane: entries this subscriber had not read are gone (trimmed, \
                     or the stream or its counter replaced)"
                );
                gap = true;
                if gaps == Gaps::Report {
                    self.send(BackplaneEvent::Lost).await?;
                }
            }
            self.last_n = Some(n);
        }
        self.last_id = e.id;
        let ev = match message {
            Some(m) => BackplaneEvent::Message(m),
            None => {
                tracing::warn!(subscriber = %self.name, id = %self.last_id, "redis stream backplane: malformed entry skipped");
                BackplaneEvent::Malformed
            }
        };
        self.send(ev).await?;
        Ok(gap)
    }

    async fn run(mut self, conn: RedisConn) {
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
    async fn reconnect(&mut self) -> Option<RedisConn> {
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
            match self.catch_up(&mut c, Gaps::Collect).await {
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

    /// Delivers everything after the last id, reading a stream that was deleted or
    /// re-created below that id from its start; returns whether nothing was lost.
    async fn catch_up(&mut self, c: &mut RedisConn, gaps: Gaps) -> std::result::Result<bool, Stop> {
        let mut complete = true;
        let inner = self.bp.inner.clone();
        loop {
            // After the largest id nothing can come: read nothing, but still look at
            // the stream's last id and the counter.
            let from = self.last_id.successor().map(|id| id.to_string()).unwrap_or_default();
            let mut inv = inner.catch_up_script.prepare_invoke();
            inv.key(&inner.stream_key).key(&inner.counter_key).arg(from).arg(inner.cfg.batch);
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
            // The counter may hold anything someone wrote: unreadable, it tells nothing
            // (and the next publish restarts it).
            let parsed = value_array(&v).and_then(|a| {
                let last = value_string(a.get(2)?)?;
                let last = if last.is_empty() { None } else { Some(StreamId::parse(&last)?) };
                Some((value_u64(a.first()?), parse_entries(a.get(1)?)?, last))
            });
            let Some((counter, entries, stream_last)) = parsed else {
                return Err(Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream catch-up")));
            };
            let full = entries.len() >= inner.cfg.batch;
            for e in entries {
                if self.deliver(e, gaps).await? {
                    complete = false;
                }
            }
            if full {
                continue;
            }
            if self.last_id != StreamId::ZERO && stream_last.is_none_or(|last| last < self.last_id) {
                // The stream this reader was reading is gone: every entry a new one
                // holds, or gets, has an id below the last one read. Read it from the
                // start; the numbers tell what was missed.
                tracing::warn!(
                    subscriber = %self.name,
                    last_read = %self.last_id,
                    stream_last = %stream_last.map_or("none".to_owned(), |id| id.to_string()),
                    "redis stream backplane: the stream was deleted or re-created below this \
                     subscriber's position; reading the new one from its start"
                );
                self.last_id = StreamId::ZERO;
                if stream_last.is_some() {
                    continue;
                }
            }
            if let Some(counter) = counter {
                if let Some(last) = self.last_n
                    && last != counter
                {
                    // Entries numbered after the last one seen are gone (the stream was
                    // deleted or trimmed to nothing), or the counter went back (Redis
                    // lost data, or someone reset it).
                    tracing::warn!(
                        subscriber = %self.name,
                        counter,
                        last_seen = last,
                        "redis stream backplane: entries missing after the last one read"
                    );
                    complete = false;
                    if gaps == Gaps::Report {
                        self.send(BackplaneEvent::Lost).await?;
                    }
                }
                self.last_n = Some(counter);
            }
            return Ok(complete);
        }
    }

    async fn read_loop(&mut self, c: &mut RedisConn) -> Stop {
        let inner = self.bp.inner.clone();
        let block_ms = u64::try_from(inner.cfg.block.as_millis()).unwrap_or(u64::MAX).max(1);
        let limit = inner.cfg.block + inner.cfg.read_grace;
        loop {
            let last_id = self.last_id.to_string();
            let read = async {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(inner.cfg.batch)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&inner.stream_key)
                    .arg(last_id)
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
            if entries.is_empty() {
                // A quiet block time: either nothing was published, or entries were
                // deleted after the last one read, or the stream was re-created below
                // this reader's position (XREAD would wait forever). Only a look at the
                // stream and the counter tells these apart.
                if let Err(stop) = self.catch_up(c, Gaps::Report).await {
                    return stop;
                }
                continue;
            }
            for e in entries {
                if let Err(stop) = self.deliver(e, Gaps::Report).await {
                    return stop;
                }
            }
        }
    }
}
