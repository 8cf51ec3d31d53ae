//! The fleet protocol: how the instances of a namespace keep each other's L1s clean
//! over the [`Backplane`].
//!
//! * [`Fleet`] publishes: every message carries this instance's origin and the next
//!   sequence number; at the Strong level a publish waits for the members'
//!   acknowledgements ([`membership`]).
//! * [`listener`] receives: applies invalidations, detects gaps (sequence jumps, lost
//!   subscriptions, missed heartbeats) and repairs them (replay, else flush), and keeps
//!   the backplane's [`Health`].
//! * [`heartbeat`] tells the others this instance is alive and what its last sequence
//!   number is, and notices when its own heartbeats stop coming back.
//!
//! The fleet does not know the cache it serves: it reaches it through [`Host`], which
//! the cache implements. The cache spawns the tasks.

mod health;
pub(crate) mod heartbeat;
pub(crate) mod listener;
mod membership;

pub(crate) use health::Health;

use std::sync::Arc;
use std::time::Duration;

use crate::backplane::{Backplane, Message, MessageBody, OriginId};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::scope::Scope;
use crate::stats::Stats;
use membership::Members;

/// What the fleet asks of the cache it serves.
pub(crate) trait Host: Send + Sync + 'static {
    /// The publishing side; `None` without a backplane.
    fn fleet(&self) -> Option<&Fleet>;
    /// The backplane's health, which the cache's read path reads.
    fn health(&self) -> &Health;
    /// The cache's counters.
    fn stats(&self) -> &Stats;
    /// The cache's clock.
    fn now(&self) -> Timestamp;
    /// Drops the local copies `scope` covers (an invalidation another instance sent).
    fn apply_remote(&self, scope: &Scope);
    /// Drops every local copy and refuses the fills in flight: the repair of a gap.
    fn flush_local(&self);
    /// Strong level: another member's L2 delete failed; bypass the cache until L2 is
    /// clean.
    fn bypass(&self);
    /// The backplane's health changed (the read path may cache a view of it).
    fn health_changed(&self);
}

/// Marks the backplane healthy and tells the host if that changed anything.
pub(crate) fn mark_healthy<H: Host + ?Sized>(host: &H) {
    if host.health().mark_healthy() {
        host.health_changed();
    }
}

/// Marks the backplane unhealthy since `since` and tells the host if that changed
/// anything.
pub(crate) fn mark_unhealthy<H: Host + ?Sized>(host: &H, since: Timestamp) {
    if host.health().mark_unhealthy(since) {
        host.health_changed();
    }
}

/// Settings of the fleet protocol, from the cache's configuration.
#[derive(Debug, Clone)]
pub(crate) struct FleetConfig {
    pub(crate) namespace: String,
    pub(crate) origin: OriginId,
    pub(crate) strong: bool,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) membership_lease: Duration,
    /// Timeout of one publish or replay.
    pub(crate) timeout: Duration,
}

/// This instance's side of the fleet protocol.
pub(crate) struct Fleet {
    backplane: Arc<dyn Backplane>,
    cfg: FleetConfig,
    /// The last sequence number used; held across a publish so that messages leave in
    /// sequence order (receivers would otherwise see false gaps).
    publisher: tokio::sync::Mutex<u64>,
    members: Members,
}

impl Fleet {
    pub(crate) fn new(backplane: Arc<dyn Backplane>, cfg: FleetConfig) -> Self {
        Fleet { backplane, cfg, publisher: tokio::sync::Mutex::new(0), members: Members::default() }
    }

    pub(crate) fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    pub(crate) fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// Sends one message with the next sequence number and returns it.
    pub(crate) async fn send(&self, body: &MessageBody, stats: &Stats) -> Result<u64> {
        let mut seq = self.publisher.lock().await;
        *seq += 1;
        let msg = self.message(*seq, body.clone());
        // The sequence number is used even if this fails: receivers then see a gap at
        // the next message or heartbeat and repair, which is what makes a lost publish safe.
        self.publish_bounded(&msg, "backplane publish").await?;
        stats.invalidations_sent.incr();
        Ok(msg.seq)
    }

    /// Sends a control message (heartbeat, acknowledgement): it carries the last
    /// sequence number used, under the publisher lock so that it is one already
    /// published (a larger one would look like a gap to the receivers).
    pub(crate) async fn send_control(&self, body: MessageBody) -> Result<()> {
        let seq = self.publisher.lock().await;
        let msg = self.message(*seq, body);
        self.publish_bounded(&msg, "backplane control message").await
    }

    /// Strong level: waits until every member heard within its lease acknowledged
    /// `seq`, or let its lease lapse.
    pub(crate) async fn wait_for_acks(&self, seq: u64, now: impl Fn() -> Timestamp) -> Result<()> {
        self.members.wait_for_acks(seq, self.cfg.membership_lease, now).await
    }

    pub(crate) fn members(&self) -> &Members {
        &self.members
    }

    fn message(&self, seq: u64, body: MessageBody) -> Message {
        Message { origin: self.cfg.origin, seq, namespace: self.cfg.namespace.clone(), body }
    }

    async fn publish_bounded(&self, msg: &Message, what: &str) -> Result<()> {
        match tokio::time::timeout(self.cfg.timeout, self.backplane.publish(msg)).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(what, self.cfg.timeout)),
        }
    }
}
