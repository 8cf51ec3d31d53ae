//! [`RedisPubSubBackplane`]: invalidations over Redis Pub/Sub (the seed story's
//! design: cheap, but nothing is replayed).
//!
//! Publishing is `PUBLISH {prefix}:bp <message>` on a shared connection. Each
//! [`Backplane::subscribe`] opens a dedicated RESP2 Pub/Sub connection, `SUBSCRIBE`s
//! to the channel (with [`Backplane::subscribe_as`], also to the origin's own
//! `{prefix}:bp:ack:<origin>`, where Strong acknowledgements addressed to it are
//! published) and forwards what arrives. Heartbeats are kept in a hash per namespace
//! (`{prefix}:bp:beats:<namespace>`) and published as one digest per interval by the
//! script that keeps them (see the stream backplane's docs). The subscriber also `PING`s its
//! connection every `ping_interval`; a ping that does not answer in time counts as a
//! lost connection (a paused server or a dead network path never closes the socket).
//!
//! When the connection is lost (closed by the server, e.g. by `CLIENT KILL` or by the
//! `client-output-buffer-limit pubsub` of a slow subscriber, or a failed ping) the
//! subscription emits [`BackplaneEvent::Disconnected`], resubscribes with jittered
//! backoff and emits [`BackplaneEvent::Resumed`] with `complete: false`: what was
//! published meanwhile is gone, and the receiver must repair (flush). `replay` is not
//! supported.
//!
//! Redis-rs drains the socket into memory without bound, so a receiver that does not
//! keep up would grow memory; instead, when the subscription channel is full, messages
//! are dropped and a [`BackplaneEvent::Lost`] is delivered as soon as there is room.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use redis::Value;
use strata::backplane::{Backplane, BackplaneEvent, Message, OriginId, Subscription};
use strata::error::{Error, ErrorKind, Result};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::backplane::digest::{heartbeat_args, invoke_heartbeat, pubsub_heartbeat};
use crate::backplane::{
    BackplaneStats, DEFAULT_CHANNEL_CAPACITY, DEFAULT_PUBLISH_TIMEOUT, DEFAULT_RECONNECT_BACKOFF,
    StatCounters, connect_publisher, open_message, ping_publisher, seal_message,
};
use crate::connection::{Backoff, ConnectionOptions, map_redis_error};
use crate::integrity::{Integrity, IntegrityKey};
use crate::lua_source;
use crate::managed::ManagedConn;
use crate::tls::TlsConfig;

/// Names the backplane in errors.
const WHAT: &str = "redis pub/sub backplane";

/// Builds a [`RedisPubSubBackplane`]; see [`RedisPubSubBackplane::builder`].
#[must_use = "a builder does nothing until .build().await"]
#[derive(Clone)]
pub struct RedisPubSubBackplaneBuilder {
    connection: ConnectionOptions,
    op_timeout: Duration,
    ping_interval: Duration,
    ping_timeout: Duration,
    channel_capacity: usize,
    reconnect_min: Duration,
    reconnect_max: Duration,
    integrity_keys: Option<Vec<IntegrityKey>>,
}

impl std::fmt::Debug for RedisPubSubBackplaneBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPubSubBackplaneBuilder")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl RedisPubSubBackplaneBuilder {
    /// Replaces the connection settings (URL included) with `options`, for example the
    /// ones given to the tier.
    pub fn connection(mut self, options: ConnectionOptions) -> Self {
        self.connection = options;
        self
    }

    /// Prefix (default `strata`): the channel is `{prefix}:bp`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.connection.prefix = prefix.into();
        self
    }

    /// Timeout of a publish (default 100 ms).
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Timeout of each connection attempt (default 1 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connection.connect_timeout = d;
        self
    }

    /// How often a subscriber pings its connection (default 1 s) and how long the
    /// answer may take (default 1 s) before the connection counts as lost.
    pub fn ping(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = interval;
        self.ping_timeout = timeout;
        self
    }

    /// Capacity of each subscription's channel (default 4096 events).
    pub fn channel_capacity(mut self, n: usize) -> Self {
        self.channel_capacity = n;
        self
    }

    /// Reconnect backoff bounds (default 20 ms to 1 s, jittered).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Do not contact the server in `build` (default: `build` sends a `PING`).
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.connection.lazy = lazy;
        self
    }

    /// Certificates for a `rediss://` URL (a private CA, a client certificate).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.connection.tls = Some(tls);
        self
    }

    /// Signs every message this backplane publishes with an HMAC-SHA256 under the first
    /// key, and delivers only messages whose MAC verifies under one of the keys: any
    /// other message is dropped and reported as `Malformed` (counted in
    /// [`BackplaneStats::malformed`](crate::BackplaneStats::malformed)). Every key needs
    /// at least 16 bytes; rotate by putting the new key first. Every instance needs the
    /// keys. See the crate docs, "Sharing a Redis: integrity keys".
    pub fn integrity_keys(mut self, keys: Vec<IntegrityKey>) -> Self {
        self.integrity_keys = Some(keys);
        self
    }

    /// Checks the settings, connects the publishing connection (unless lazy) and
    /// returns the backplane.
    pub async fn build(self) -> Result<RedisPubSubBackplane> {
        let invalid = |what: String| Err(Error::new(ErrorKind::InvalidInput, what));
        self.connection.check(WHAT)?;
        if self.op_timeout.is_zero() || self.ping_interval.is_zero() || self.ping_timeout.is_zero() {
            return invalid(
                "redis pub/sub backplane: op_timeout and the ping interval/timeout must be \
                 non-zero (defaults 100ms, 1s/1s)"
                    .into(),
            );
        }
        if self.channel_capacity == 0 {
            return invalid(
                "redis pub/sub backplane: channel_capacity must be at least 1 (default 4096)".into(),
            );
        }
        Backoff::check(WHAT, self.reconnect_min, self.reconnect_max)?;
        if self.connection.is_cluster() {
            return invalid(
                "redis pub/sub backplane: Redis Cluster is not supported (classic Pub/Sub \
                 fans every message out to every node, and nothing is replayed); use \
                 RedisStreamBackplane::cluster_builder on a cluster"
                    .into(),
            );
        }
        let integrity = Integrity::from_keys(self.integrity_keys.as_deref(), WHAT)?;
        let (connector, publisher) = connect_publisher(&self.connection, None, WHAT)?;
        let client = connector
            .single()
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "redis pub/sub backplane: one server only"))?;
        let bp = RedisPubSubBackplane {
            inner: Arc::new(PubSubInner {
                integrity,
                channel: format!("{}:bp", self.connection.prefix),
                client,
                publisher,
                stats: StatCounters::default(),
                receivers: AtomicU64::new(0),
                heartbeat_script: lua_source::script(&pubsub_heartbeat()),
                cfg: self,
            }),
        };
        if !bp.inner.cfg.connection.lazy {
            let t = bp.inner.cfg.connection.connect_timeout + bp.inner.cfg.op_timeout;
            ping_publisher(&bp.inner.publisher, t, WHAT, "redis pub/sub backplane ping").await?;
        }
        Ok(bp)
    }
}

struct PubSubInner {
    cfg: RedisPubSubBackplaneBuilder,
    channel: String,
    client: redis::Client,
    publisher: Arc<ManagedConn>,
    stats: StatCounters,
    /// Subscribers (count of `PUBLISH` receivers) reported by the last publish.
    receivers: AtomicU64,
    integrity: Option<Integrity>,
    /// `digest::pubsub_heartbeat`.
    heartbeat_script: redis::Script,
}

impl PubSubInner {
    /// The channel of the acknowledgements addressed to `origin`.
    fn ack_channel(&self, origin: OriginId) -> String {
        format!("{}:ack:{origin:x}", self.channel)
    }
}

/// The Redis Pub/Sub backplane (see the module docs): at-most-once delivery, losses
/// detected by disconnects here and by sequence numbers and heartbeats in the core.
///
/// Cloning gives another handle to the same publisher connection and counters.
#[derive(Clone)]
pub struct RedisPubSubBackplane {
    inner: Arc<PubSubInner>,
}

impl std::fmt::Debug for RedisPubSubBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPubSubBackplane")
            .field("url", &self.inner.publisher.shown_url())
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

impl RedisPubSubBackplane {
    /// Starts building a backplane for `url` (`redis://[user:password@]host[:port][/db]`
    /// or `rediss://` with the `tls` feature).
    pub fn builder(url: impl Into<String>) -> RedisPubSubBackplaneBuilder {
        RedisPubSubBackplaneBuilder {
            connection: ConnectionOptions::new(url),
            op_timeout: DEFAULT_PUBLISH_TIMEOUT,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            reconnect_min: DEFAULT_RECONNECT_BACKOFF.0,
            reconnect_max: DEFAULT_RECONNECT_BACKOFF.1,
            integrity_keys: None,
        }
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Counters.
    pub fn stats(&self) -> BackplaneStats {
        self.inner.stats.snapshot()
    }

    /// How many subscribers (fleet-wide) received the last message this handle
    /// published, as `PUBLISH` reported it.
    pub fn last_receivers(&self) -> u64 {
        self.inner.receivers.load(Ordering::Relaxed)
    }

    /// A dedicated connection subscribed to the channel (and to `me`'s acknowledgement
    /// channel).
    async fn connect(&self, me: Option<OriginId>) -> Result<redis::aio::PubSub> {
        let cfg = &self.inner.cfg;
        let limit = cfg.connection.connect_timeout + cfg.op_timeout;
        let mut ps = match tokio::time::timeout(limit, self.inner.client.get_async_pubsub()).await {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => return Err(map_redis_error(ErrorKind::Backplane, "redis pub/sub connect", e)),
            Err(_) => return Err(Error::timeout("redis pub/sub connect", limit)),
        };
        let mut channels = vec![self.inner.channel.clone()];
        channels.extend(me.map(|me| self.inner.ack_channel(me)));
        match tokio::time::timeout(cfg.ping_timeout, ps.subscribe(channels)).await {
            Ok(Ok(())) => Ok(ps),
            Ok(Err(e)) => Err(map_redis_error(ErrorKind::Backplane, "redis pub/sub subscribe", e)),
            Err(_) => Err(Error::timeout("redis pub/sub subscribe", cfg.ping_timeout)),
        }
    }
}

#[async_trait]
impl Backplane for RedisPubSubBackplane {
    fn name(&self) -> &str {
        "redis-pubsub"
    }

    /// One channel on one server (a Cluster is refused at build): Redis sends each
    /// subscriber the channel's messages in the order it executed the `PUBLISH`es.
    fn delivers_in_one_order(&self) -> bool {
        true
    }

    async fn publish(&self, message: &Message) -> Result<()> {
        let inner = &self.inner;
        let bytes = seal_message(inner.integrity.as_ref(), &inner.channel, message)?;
        let channel = inner.channel.clone();
        let n: u64 = inner
            .publisher
            .call(inner.cfg.op_timeout, ErrorKind::Backplane, "redis pub/sub publish", |mut c| async move {
                redis::cmd("PUBLISH").arg(channel).arg(&bytes[..]).query_async(&mut c).await
            })
            .await
            .map_err(|e| e.into_error())?;
        inner.receivers.store(n, Ordering::Relaxed);
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        self.open_subscription(None).await
    }

    async fn subscribe_as(&self, me: OriginId) -> Result<Subscription> {
        self.open_subscription(Some(me)).await
    }

    async fn publish_to(&self, to: OriginId, message: &Message) -> Result<()> {
        let inner = &self.inner;
        let channel = inner.ack_channel(to);
        let bytes = seal_message(inner.integrity.as_ref(), &channel, message)?;
        inner
            .publisher
            .call(
                inner.cfg.op_timeout,
                ErrorKind::Backplane,
                "redis pub/sub acknowledgement",
                |mut c| async move {
                    redis::cmd("PUBLISH").arg(channel).arg(&bytes[..]).query_async::<u64>(&mut c).await
                },
            )
            .await
            .map_err(|e| e.into_error())?;
        inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn heartbeat(&self, message: &Message, beat: u64, interval: Duration) -> Result<()> {
        let inner = &self.inner;
        if inner.integrity.is_some() {
            // A digest built in Redis could not carry a MAC (see `digest`).
            return self.publish(message).await;
        }
        let mut inv = inner.heartbeat_script.prepare_invoke();
        inv.key(format!("{}:beats:{}", inner.channel, message.namespace));
        heartbeat_args(&mut inv, message, beat, interval, 0, &inner.channel)?;
        let what = "redis pub/sub heartbeat";
        invoke_heartbeat(inv, &inner.publisher, inner.cfg.op_timeout, what, &inner.stats).await
    }
}

impl RedisPubSubBackplane {
    /// Opens a subscription (with `me`'s acknowledgements too).
    async fn open_subscription(&self, me: Option<OriginId>) -> Result<Subscription> {
        let ps = self.connect(me).await?;
        let (tx, rx) = mpsc::channel(self.inner.cfg.channel_capacity);
        let reader = PubSubReader {
            bp: self.clone(),
            me,
            tx,
            lost_pending: false,
            backoff: Backoff::new(self.inner.cfg.reconnect_min, self.inner.cfg.reconnect_max),
        };
        tokio::spawn(reader.run(ps));
        Ok(rx)
    }
}

struct PubSubReader {
    bp: RedisPubSubBackplane,
    /// The origin whose acknowledgements the subscription also receives.
    me: Option<OriginId>,
    tx: mpsc::Sender<BackplaneEvent>,
    /// Messages were dropped because the channel was full; `Lost` is owed.
    lost_pending: bool,
    backoff: Backoff,
}

/// The receiver was dropped.
struct Closed;

impl PubSubReader {
    /// Sends a control event, waiting for room.
    async fn send(&mut self, ev: BackplaneEvent) -> std::result::Result<(), Closed> {
        if self.lost_pending {
            self.lost_pending = false;
            self.bp.inner.stats.count(&BackplaneEvent::Lost, "redis-pubsub");
            self.tx.send(BackplaneEvent::Lost).await.map_err(|_| Closed)?;
        }
        self.bp.inner.stats.count(&ev, "redis-pubsub");
        self.tx.send(ev).await.map_err(|_| Closed)
    }

    /// Forwards a message without waiting: a full channel drops it and owes `Lost`.
    fn forward(&mut self, ev: BackplaneEvent) -> std::result::Result<(), Closed> {
        if self.lost_pending {
            match self.tx.try_send(BackplaneEvent::Lost) {
                Ok(()) => {
                    self.lost_pending = false;
                    self.bp.inner.stats.count(&BackplaneEvent::Lost, "redis-pubsub");
                }
                Err(TrySendError::Full(_)) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(Closed),
            }
        }
        let malformed = matches!(ev, BackplaneEvent::Malformed);
        match self.tx.try_send(ev) {
            Ok(()) => {
                // Counted once it is in the channel.
                if malformed {
                    self.bp.inner.stats.count(&BackplaneEvent::Malformed, "redis-pubsub");
                } else {
                    self.bp.inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                if !self.lost_pending {
                    tracing::warn!(
                        channel = %self.bp.inner.channel,
                        "redis pub/sub backplane: receiver is not keeping up, dropping messages"
                    );
                }
                self.lost_pending = true;
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(Closed),
        }
    }

    async fn run(mut self, ps: redis::aio::PubSub) {
        let mut ps = Some(ps);
        loop {
            let conn = match ps.take() {
                Some(p) => p,
                None => match self.reconnect().await {
                    Some(p) => p,
                    None => return,
                },
            };
            if self.read(conn).await.is_err() {
                return;
            }
            if self.send(BackplaneEvent::Disconnected).await.is_err() {
                return;
            }
        }
    }

    /// Reads until the connection is lost (`Ok`) or the receiver is gone (`Err`).
    async fn read(&mut self, ps: redis::aio::PubSub) -> std::result::Result<(), Closed> {
        let cfg = self.bp.inner.cfg.clone();
        let (mut sink, mut stream) = ps.split();
        let mut ping = tokio::time::interval(cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let tx = self.tx.clone();
        loop {
            tokio::select! {
                _ = tx.closed() => return Err(Closed),
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        tracing::warn!(channel = %self.bp.inner.channel, "redis pub/sub backplane: connection closed");
                        return Ok(());
                    };
                    let integrity = self.bp.inner.integrity.as_ref();
                    let channel = msg.get_channel_name();
                    let ev = match open_message(integrity, channel, msg.get_payload_bytes()) {
                        Some(m) => BackplaneEvent::Message(m),
                        None => BackplaneEvent::Malformed,
                    };
                    self.forward(ev)?;
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(cfg.ping_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "redis pub/sub backplane: ping failed");
                            return Ok(());
                        }
                        Err(_) => {
                            tracing::warn!(timeout = ?cfg.ping_timeout, "redis pub/sub backplane: ping timed out");
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Option<redis::aio::PubSub> {
        let started = Instant::now();
        loop {
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            match self.bp.connect(self.me).await {
                Ok(ps) => {
                    self.backoff.reset();
                    tracing::info!(after = ?started.elapsed(), "redis pub/sub backplane: resubscribed");
                    // Pub/Sub cannot replay what was published meanwhile.
                    if self.send(BackplaneEvent::Resumed { complete: false }).await.is_err() {
                        return None;
                    }
                    return Some(ps);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis pub/sub backplane: resubscribe failed");
                }
            }
        }
    }
}
