//! What one [`RedisStreamBackplane`](super::stream::RedisStreamBackplane) handle shares
//! with its subscriptions' reader tasks: the keys, the connections, the scripts, the
//! counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata::backplane::OriginId;
use strata::error::{Error, ErrorKind, Result};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::backplane::StatCounters;
use crate::backplane::stream_builder::{RedisStreamBackplaneBuilder, StreamDelivery};
use crate::cluster::{Connector, PushSink, RedisConn};
use crate::connection::map_redis_error;
use crate::integrity::Integrity;
use crate::managed::ManagedConn;

/// A subscriber's connection, with the queue of its pushes under push delivery.
pub(crate) type Connected = (RedisConn, Option<mpsc::Receiver<redis::PushInfo>>);

pub(crate) struct StreamInner {
    pub(crate) cfg: RedisStreamBackplaneBuilder,
    pub(crate) stream_key: String,
    /// The channel pushed reloads
    /// ([`MessageBody::Reload`](strata::backplane::MessageBody::Reload)) travel on under
    /// push delivery: beside the stream, not in it (see `RedisStreamBackplane::publish`).
    pub(crate) reload_channel: String,
    pub(crate) counter_key: String,
    pub(crate) client: Connector,
    pub(crate) publisher: Arc<ManagedConn>,
    pub(crate) publish_script: redis::Script,
    pub(crate) start_script: redis::Script,
    pub(crate) catch_up_script: redis::Script,
    /// `digest::STREAM_HEARTBEAT`.
    pub(crate) heartbeat_script: redis::Script,
    pub(crate) instance: u32,
    pub(crate) next_subscription: AtomicU64,
    pub(crate) stats: StatCounters,
    pub(crate) integrity: Option<Integrity>,
    /// When each origin's acknowledgement stream last had its expiry set from here.
    pub(crate) ack_expiries: AckExpiries,
    /// The server refused RESP3: subscribers read even under push delivery.
    pub(crate) no_resp3: AtomicBool,
}

/// When this instance last set the expiry of each origin's acknowledgement stream, so
/// that an acknowledgement is one `XADD`, with the `PEXPIRE` once per interval and
/// origin instead of beside every `XADD` (a third of a Strong write's commands: the
/// `PEXPIRE`s of its N - 1 acknowledgements).
#[derive(Debug, Default)]
pub(crate) struct AckExpiries(parking_lot::Mutex<HashMap<OriginId, Instant>>);

/// Origins remembered at most; past it, those not refreshed within the interval go.
const MAX_ACK_EXPIRIES: usize = 4096;

impl AckExpiries {
    /// Whether an acknowledgement to `to` at `now` sets its stream's expiry (recorded as
    /// set): when none was set from here within `every`.
    pub(crate) fn due(&self, to: OriginId, now: Instant, every: Duration) -> bool {
        let mut seen = self.0.lock();
        if seen.get(&to).is_some_and(|&t| now.saturating_duration_since(t) < every) {
            return false;
        }
        if seen.len() >= MAX_ACK_EXPIRIES {
            seen.retain(|_, t| now.saturating_duration_since(*t) < every);
        }
        seen.insert(to, now);
        true
    }

    /// The expiry of `to`'s stream may not have been set: the next acknowledgement sets it.
    pub(crate) fn forget(&self, to: OriginId) {
        self.0.lock().remove(&to);
    }
}

impl StreamInner {
    /// Opens a dedicated subscriber connection and names it; with `pushes`, a RESP3
    /// connection whose Pub/Sub messages go there (see [`Self::pushes`]).
    pub(crate) async fn connect(&self, name: &str, pushes: Option<PushSink>) -> Result<RedisConn> {
        let (cfg, key) = (&self.cfg, &self.stream_key);
        let limit = cfg.connection.connect_timeout + cfg.op_timeout;
        self.client
            .dedicated_named(
                cfg.connection.connect_timeout,
                limit,
                name,
                key,
                cfg.read_grace,
                "redis stream subscriber",
                pushes,
            )
            .await
    }

    /// Opens a subscriber's connection: under push delivery, subscribed to the stream's
    /// channel and to `ack_channel`, its pushes queued (up to the channel capacity;
    /// one that does not fit sets `overflow` and is read from the stream instead).
    pub(crate) async fn open(
        &self,
        name: &str,
        ack_channel: Option<&str>,
        overflow: &Arc<AtomicBool>,
    ) -> Result<Connected> {
        if !self.pushes() {
            return Ok((self.connect(name, None).await?, None));
        }
        let (tx, rx) = mpsc::channel(self.cfg.channel_capacity);
        let full = overflow.clone();
        let sink: PushSink = Box::new(move |info| {
            tx.try_send(info).map_err(|e| {
                if matches!(e, TrySendError::Full(_)) {
                    full.store(true, Ordering::Relaxed);
                }
            })
        });
        let mut conn = match self.connect(name, Some(sink)).await {
            Ok(c) => c,
            Err(e) if e.to_string().contains("HELLO") => {
                // Redis before 6 (or `HELLO` renamed away): no RESP3, so no pushes. This
                // handle reads from now on, and acknowledges into the origins' streams.
                if !self.no_resp3.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "redis stream backplane: the server does not speak RESP3 (Redis 6 or later), so \
                         entries cannot be pushed; subscribers read the stream instead \
                         (set .delivery(StreamDelivery::BlockingRead) to say so)"
                    );
                }
                return Ok((self.connect(name, None).await?, None));
            }
            Err(e) => return Err(e),
        };
        let mut channels = vec![self.stream_key.clone(), self.reload_channel.clone()];
        channels.extend(ack_channel.map(str::to_owned));
        let grace = self.cfg.read_grace;
        let subscribed = match &mut conn {
            RedisConn::Plain(m) => tokio::time::timeout(grace, m.subscribe(channels)).await,
            _ => {
                return Err(Error::new(
                    ErrorKind::Backplane,
                    "redis stream subscriber: push delivery needs one server",
                ));
            }
        };
        match subscribed {
            Ok(Ok(())) => Ok((conn, Some(rx))),
            Ok(Err(e)) => Err(map_redis_error(ErrorKind::Backplane, "redis stream subscribe", e)),
            Err(_) => Err(Error::timeout("redis stream subscribe", grace)),
        }
    }

    /// Whether subscribers receive entries as pushes ([`StreamDelivery::PubSub`] on one
    /// server) rather than by blocking reads.
    pub(crate) fn pushes(&self) -> bool {
        self.cfg.delivery == StreamDelivery::PubSub
            && self.client.single().is_some()
            && !self.no_resp3.load(Ordering::Relaxed)
    }

    /// The channel every entry is published on beside the stream: the stream's key on
    /// one server, whatever this handle's delivery (a fleet's members may differ while
    /// a deploy changes it), none on a cluster (where a `PUBLISH` reaches every node).
    pub(crate) fn push_channel(&self) -> &str {
        if self.client.single().is_some() { &self.stream_key } else { "" }
    }

    /// Publishes `bytes` on `channel`; returns how many subscribers received them.
    pub(crate) async fn publish_on(&self, channel: &str, bytes: &[u8], what: &'static str) -> Result<u64> {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(bytes);
        self.publisher
            .call(self.cfg.op_timeout, ErrorKind::Backplane, what, |mut c| async move {
                publish.query_async(&mut c).await
            })
            .await
            .map_err(|e| e.into_error())
    }

    /// The stream of the acknowledgements addressed to `origin`: beside the shared
    /// stream, in its hash slot (one `XREAD` reads both, on a Cluster too).
    pub(crate) fn ack_key(&self, origin: OriginId) -> String {
        format!("{}:ack:{origin:x}", self.stream_key)
    }

    /// The hash of the latest heartbeats in `namespace` (see `digest`).
    pub(crate) fn beats_key(&self, namespace: &str) -> String {
        format!("{}:beats:{namespace}", self.stream_key)
    }

    /// Counts and reports a repair made by the publish script.
    pub(crate) fn repaired(&self, what: &str) {
        self.stats.repairs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("strata_backplane_repairs_total", "backplane" => "redis-stream").increment(1);
        tracing::warn!(
            "redis stream backplane: {what} (no publish could succeed; does something else write \
             under the prefix?); subscribers that missed messages because of it report Lost"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origins_ack_stream_expiry_is_set_once_per_interval() {
        let e = AckExpiries::default();
        let t = Instant::now();
        let every = Duration::from_secs(15);
        assert!(e.due(7, t, every), "the first acknowledgement sets it");
        assert!(!e.due(7, t + Duration::from_secs(14), every));
        assert!(e.due(9, t, every), "per origin");
        assert!(e.due(7, t + every, every), "and again each interval");
        e.forget(7);
        assert!(e.due(7, t + every, every), "a failed send sets it next time");
    }
}
