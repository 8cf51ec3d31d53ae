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
//! A pushed reload ([`MessageBody::Reload`](strata::backplane::MessageBody::Reload)) is
//! no entry: see [`RedisStreamBackplane`]'s `publish`.
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
//! that follows the stream from its last entry at subscribe time. How it learns of new
//! entries is [`StreamDelivery`]: by default on one server the publish script also
//! publishes each entry (`<id>\n<n>\n<m>`) on a channel named like the stream, and
//! the subscriber, on a RESP3 connection subscribed to it, receives it as a push (one
//! `PUBLISH` per entry whatever the number of subscribers, where a blocking read costs
//! one `XREAD` per subscriber and entry); the stream stays the log, read on the same
//! connection wherever the pushes cannot be the whole story (see `stream_push`). With
//! [`StreamDelivery::BlockingRead`], and always on a Redis Cluster, the task loops on
//! `XREAD COUNT c BLOCK b STREAMS key <last id>`. What follows holds for both. When
//! the connection fails (or a read does
//! not answer within the block time plus a grace period) it emits
//! [`BackplaneEvent::Disconnected`](strata::backplane::BackplaneEvent::Disconnected), reconnects with jittered exponential backoff,
//! reads everything after the last id it saw (delivering it), and then emits
//! [`BackplaneEvent::Resumed`](strata::backplane::BackplaneEvent::Resumed) with `complete: true`, or [`BackplaneEvent::Lost`](strata::backplane::BackplaneEvent::Lost)
//! followed by `Resumed { complete: false }` when entries it had not read were
//! trimmed (or the counter went backwards: Redis lost data). A gap seen while
//! connected (a reader slower than the cap) emits `Lost` alone.
//!
//! A read that waited its whole block time for nothing (under push delivery: a block
//! time and a read grace with no entry pushed) runs the same catch-up read,
//! which sees what a blocked `XREAD` cannot: numbered entries gone after the last
//! one read (`Lost`), and a stream deleted or re-created below the reader's position
//! (`DEL`, `FLUSHALL`, an eviction, a repair, a clock behind the old ids), whose new
//! entries `XREAD` would never return: the reader then reads it from its start, and
//! the numbers tell whether anything was missed. One script call per idle block
//! time, nothing per message.
//!
//! The subscription channel is bounded: when the receiver is slow the task waits
//! (the stream is the buffer), so nothing is dropped in the process; a reader slower
//! than the stream's window shows up as a gap, hence `Lost`. Under push delivery the
//! pushes queue up to the same capacity; those that do not fit are dropped and read
//! from the stream instead.
//!
//! A fleet may mix deliveries (a deploy that changes it, or one from strata 0.1, whose
//! publishers do not publish entries on the channel): a pushed reader reads what was
//! not pushed when the next entry's number shows the gap, or after a block time and a read grace. Only
//! the Strong level's acknowledgements need every member on the same delivery (see
//! [`RedisStreamBackplaneBuilder::delivery`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Value;
use strata::backplane::{Backplane, Message, MessageBody, OriginId, Subscription};
use strata::error::{Error, ErrorKind, Result};
use tokio::sync::mpsc;

pub use crate::backplane::BackplaneStats;
use crate::backplane::digest::{heartbeat_args, invoke_heartbeat, stream_heartbeat};
use crate::backplane::stream_builder::WHAT;
pub use crate::backplane::stream_builder::{DEFAULT_MAX_LEN, RedisStreamBackplaneBuilder, StreamDelivery};
use crate::backplane::stream_inner::StreamInner;
use crate::backplane::stream_reader::StreamReader;
use crate::backplane::stream_scripts::{
    StreamId, parse_entries, publish_repairs, stream_catch_up, stream_publish, stream_start,
};
use crate::backplane::{StatCounters, connect_publisher, open_message, ping_publisher, seal_message};
use crate::connection::{Backoff, map_redis_error};
use crate::integrity::Integrity;
use crate::lua_source;
use crate::reply::{bad_reply, value_array, value_string, value_u64};
use crate::tier::EvictionCheck;
use crate::tier::eviction::{enforce, server_memories};

/// Entries kept in an origin's acknowledgement stream (approximately).
const ACK_STREAM_LEN: u64 = 256;
/// How long an acknowledgement stream outlives its last entry: an origin gone for
/// this long leaves nothing behind.
const ACK_STREAM_KEEP: Duration = Duration::from_secs(60);

impl RedisStreamBackplaneBuilder {
    /// Checks the settings, connects the publishing connection (unless lazy) and
    /// returns the backplane.
    pub async fn build(self) -> Result<RedisStreamBackplane> {
        self.check()?;
        let (client, publisher) = connect_publisher(&self.connection, self.shared.as_ref(), WHAT)?;
        let prefix = &self.connection.prefix;
        let integrity = Integrity::from_keys(self.integrity_keys.as_deref(), WHAT)?;
        // A gone counter resumes from the stream's numbers only where they can be
        // trusted (see `stream_scripts::LAST_NUMBER`).
        let resume = integrity.is_none();
        let bp = RedisStreamBackplane {
            inner: Arc::new(StreamInner {
                stream_key: format!("{prefix}:{{bp}}"),
                reload_channel: format!("{prefix}:{{bp}}:reloads"),
                counter_key: format!("{prefix}:{{bp}}:seq"),
                client,
                publisher,
                publish_script: lua_source::script(&stream_publish(resume)),
                start_script: lua_source::script(&stream_start(resume)),
                catch_up_script: lua_source::script(&stream_catch_up(resume)),
                heartbeat_script: lua_source::script(&stream_heartbeat(resume)),
                instance: rand::random::<u32>(),
                next_subscription: AtomicU64::new(1),
                stats: StatCounters::default(),
                integrity,
                ack_expiries: Default::default(),
                no_resp3: AtomicBool::new(false),
                cfg: self,
            }),
        };
        if !bp.inner.cfg.connection.lazy {
            let t = bp.inner.cfg.connection.connect_timeout + bp.inner.cfg.op_timeout;
            ping_publisher(&bp.inner.publisher, t, WHAT, "redis stream backplane ping").await?;
            bp.check_eviction(t).await?;
        }
        Ok(bp)
    }
}

impl RedisStreamBackplane {
    /// Warns, or refuses, when the stream's server may evict any key (see
    /// [`RedisStreamBackplaneBuilder::eviction_check`]).
    async fn check_eviction(&self, timeout: Duration) -> Result<()> {
        let check = self.inner.cfg.eviction_check;
        if check == EvictionCheck::Skip {
            return Ok(());
        }
        let memories = server_memories(&self.inner.publisher, timeout, "redis stream backplane").await;
        let Some(memory) =
            memories.into_iter().flatten().find(|m| m.maxmemory > 0 && m.policy.starts_with("allkeys-"))
        else {
            return Ok(());
        };
        let message = format!(
            "redis stream backplane: `{}` may evict any key (maxmemory {} bytes, maxmemory-policy {}): the \
             stream and its counter lost together are a loss every subscriber must verify or flush its L1 \
             for, and a tier sharing the server loses its meta hash far more often; put the backplane on a \
             server with maxmemory-policy noeviction or volatile-* (no backplane key has a TTL), or build \
             with .eviction_check(EvictionCheck::Skip) to accept it",
            self.inner.publisher.shown_url(),
            memory.maxmemory,
            memory.policy
        );
        enforce(check, message)
    }
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

    /// Opens a subscription (reading the acknowledgements addressed to `me` too).
    async fn open_subscription(&self, me: Option<OriginId>) -> Result<Subscription> {
        let k = self.inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{k}", self.client_name_prefix());
        let inner = &self.inner;
        // A new origin's ack stream: everything in it is for this subscription.
        let acks = me.map(|me| (inner.ack_key(me), StreamId::ZERO));
        let overflow = Arc::new(AtomicBool::new(false));
        // Under push delivery, subscribed before the start is read: every entry after
        // it is pushed (and those before it, which are dropped by id).
        let (mut conn, pushes) = inner.open(&name, acks.as_ref().map(|(k, _)| k.as_str()), &overflow).await?;
        inner.stats.reads.fetch_add(1, Ordering::Relaxed);
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
            inner: self.inner.clone(),
            tx,
            name,
            last_id,
            last_n,
            backoff: Backoff::new(inner.cfg.reconnect_min, inner.cfg.reconnect_max),
            acks,
            overflow,
        };
        tokio::spawn(reader.run((conn, pushes)));
        Ok(rx)
    }

    /// Scans the stream backwards, at most the whole (capped) stream, and no further
    /// than `origin`'s last message numbered below `from_seq`: an origin publishes its
    /// messages in number order (its outbox), so its numbers grow along the stream and
    /// nothing wanted lies before that one. (A batch sent again after a failed publish
    /// repeats numbers, but always with every higher number after it. A number the
    /// origin gave up, never published, used to cost a scan of the whole stream, up to
    /// 201 pages of 1,000 entries at the default cap.)
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
        'scan: while scanned < limit {
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
                if m.origin != origin || m.is_heartbeat() {
                    continue;
                }
                if (from_seq..=to_seq).contains(&m.seq) {
                    found.entry(m.seq).or_insert(m);
                } else if m.seq < from_seq {
                    break 'scan;
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

    /// One stream: every subscriber reads it in its order.
    fn delivers_in_one_order(&self) -> bool {
        true
    }

    /// A pushed reload is no invalidation, and may be lost (it costs its receivers an
    /// L2 read), so it does not go into the stream, whose entries it would fill with
    /// values: under push delivery it is published on its own channel, which every
    /// pushed subscriber listens to; with blocking reads (a Cluster, Redis before 6) it
    /// is dropped. Receivers need no order for it: the invalidations it follows come in
    /// the stream's (see `strata`'s `cache::reload`).
    async fn publish(&self, message: &Message) -> Result<()> {
        if !matches!(message.body, MessageBody::Reload { .. }) {
            return self.publish_batch(std::slice::from_ref(message)).await;
        }
        let inner = &self.inner;
        if !inner.pushes() {
            return Ok(());
        }
        let channel = &inner.reload_channel;
        let bytes = seal_message(inner.integrity.as_ref(), channel, message)?;
        inner.publish_on(channel, &bytes, "redis stream reload").await?;
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn publish_batch(&self, messages: &[Message]) -> Result<()> {
        let inner = &self.inner;
        let mut inv = inner.publish_script.prepare_invoke();
        inv.key(&inner.stream_key).key(&inner.counter_key).arg(inner.cfg.max_len).arg(inner.push_channel());
        for message in messages {
            inv.arg(&seal_message(inner.integrity.as_ref(), &inner.stream_key, message)?[..]);
        }
        let v: Value = inner
            .publisher
            .call(inner.cfg.op_timeout, ErrorKind::Backplane, "redis stream publish", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await
            .map_err(|e| e.into_error())?;
        inner.stats.published.fetch_add(messages.len() as u64, Ordering::Relaxed);
        for what in publish_repairs(&v, &inner.stream_key, &inner.counter_key) {
            self.inner.repaired(&what);
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        self.open_subscription(None).await
    }

    async fn subscribe_as(&self, me: OriginId) -> Result<Subscription> {
        self.open_subscription(Some(me)).await
    }

    async fn heartbeat(&self, message: &Message, beat: u64, interval: Duration) -> Result<()> {
        let inner = &self.inner;
        if inner.integrity.is_some() {
            // A digest built in Redis could not carry a MAC (see `digest`).
            return self.publish(message).await;
        }
        let mut inv = inner.heartbeat_script.prepare_invoke();
        inv.key(&inner.stream_key).key(&inner.counter_key).key(inner.beats_key(&message.namespace));
        heartbeat_args(&mut inv, message, beat, interval, inner.cfg.max_len, inner.push_channel())?;
        let what = "redis stream heartbeat";
        invoke_heartbeat(inv, &inner.publisher, inner.cfg.op_timeout, what, &inner.stats).await
    }

    async fn publish_to(&self, to: OriginId, message: &Message) -> Result<()> {
        let inner = &self.inner;
        let key = inner.ack_key(to);
        let bytes = seal_message(inner.integrity.as_ref(), &key, message)?;
        if inner.pushes() {
            // Pushed to the origin's connection (see `stream_push`); kept in its stream
            // only when no connection of the origin's was there to receive it.
            if inner.publish_on(&key, &bytes, "redis stream acknowledgement").await? > 0 {
                inner.stats.published.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        // Kept a while, so that a reader reconnecting still finds them; the origin
        // reads them as they come, so a short stream is enough. The expiry is set by
        // the first acknowledgement to an origin and then every quarter of it: a stream
        // recreated without one (evicted, deleted) gets it back within that quarter.
        let keep_ms = u64::try_from(ACK_STREAM_KEEP.as_millis()).unwrap_or(u64::MAX);
        let expire = inner.ack_expiries.due(to, Instant::now(), ACK_STREAM_KEEP / 4);
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(&key)
            .arg("MAXLEN")
            .arg("~")
            .arg(ACK_STREAM_LEN)
            .arg("*")
            .arg("m")
            .arg(&bytes[..]);
        pipe.ignore();
        if expire {
            pipe.cmd("PEXPIRE").arg(&key).arg(keep_ms).ignore();
        }
        let sent = inner
            .publisher
            .call(
                inner.cfg.op_timeout,
                ErrorKind::Backplane,
                "redis stream acknowledgement",
                |mut c| async move { pipe.query_async::<()>(&mut c).await },
            )
            .await;
        if let Err(e) = sent {
            if expire {
                inner.ack_expiries.forget(to);
            }
            return Err(e.into_error());
        }
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn replay(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        if from_seq > to_seq {
            return Ok(Some(Vec::new()));
        }
        self.scan_for(origin, from_seq, to_seq).await
    }
}
