//! What one [`RedisStreamBackplane`](super::stream::RedisStreamBackplane) handle shares
//! with its subscriptions' reader tasks: the keys, the connections, the scripts, the
//! counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata::backplane::OriginId;
use strata::error::Result;

use crate::backplane::StatCounters;
use crate::backplane::stream_builder::RedisStreamBackplaneBuilder;
use crate::cluster::{Connector, RedisConn};
use crate::integrity::Integrity;
use crate::managed::ManagedConn;

pub(crate) struct StreamInner {
    pub(crate) cfg: RedisStreamBackplaneBuilder,
    pub(crate) stream_key: String,
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
}

impl StreamInner {
    /// Opens a dedicated subscriber connection and names it.
    pub(crate) async fn connect(&self, name: &str) -> Result<RedisConn> {
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
            )
            .await
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
