//! The fleet protocol: how the instances of a namespace keep each other's L1s clean
//! over the [`Backplane`].
//!
//! * [`Fleet`] publishes: every message carries this instance's origin and the next
//!   sequence number; at the Strong level a publish waits for the members'
//!   acknowledgements ([`membership`]).
//! * [`listener`] receives: applies invalidations, detects gaps (sequence jumps, lost
//!   subscriptions, missed heartbeats) and repairs them (replay, else flush), and keeps
//!   the backplane's [`Health`]. [`sequence`] is its bookkeeping of each origin's
//!   numbers, which no forged or corrupt message can throw off for more than one repair.
//! * [`heartbeat`] tells the others this instance is alive and what its last sequence
//!   number is, and notices when its own heartbeats stop coming back.
//!
//! The fleet does not know the cache it serves: it reaches it through [`Host`], which
//! the cache implements. The cache spawns the tasks.

mod doubt;
mod health;
pub(crate) mod heartbeat;
pub(crate) mod listener;
mod membership;
mod outbox;
mod sequence;
mod verify;

pub(crate) use health::Health;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::backplane::{Backplane, Message, MessageBody, OriginId, now_ms};
use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind, Result};
use crate::l1::Cause;
use crate::scope::Scope;
use crate::stats::Stats;
use crate::tier::Envelope;
use membership::Members;
use outbox::Outbox;

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
    /// Drops the local copies `scope` covers (an invalidation another instance sent;
    /// `cause` is its origin and sequence number when believed).
    fn apply_remote(&self, scope: &Scope, cause: Option<Cause>);
    /// Installs a reload another instance pushed after invalidation `after` (see
    /// [`MessageBody::Reload`](crate::backplane::MessageBody::Reload)).
    fn apply_reload(&self, key: &str, after: Cause, entry: &Envelope);
    /// A message of this instance's own came back, sent with `mark` (see `Fleet::send`).
    fn own_settled(&self, mark: u64);
    /// Drops every local copy and refuses the fills in flight: the repair of a gap.
    fn flush_local(&self);
    /// Whether an L2 invalidation of this instance waits in its retry buffer (its
    /// heartbeats then say so).
    fn l2_buffered(&self) -> bool;
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
    /// Heartbeats through [`Backplane::heartbeat`] and acknowledgements through
    /// [`Backplane::publish_to`] (N deliveries per interval where the backplane
    /// aggregates); off, both are broadcast, as earlier releases did.
    pub(crate) addressed: bool,
}

/// How long a caller's message waits for the publisher before it is buffered instead.
/// A healthy backplane publishes in well under a millisecond, so a wait this long
/// means the publish ahead is stalling, and waiting for it (up to the backplane
/// timeout, for every caller queued behind it) is what made `invalidate` stall for the
/// length of an outage.
const PUBLISHER_WAIT: Duration = Duration::from_millis(100);

/// Marks of messages not heard back kept at most (see [`Fleet::send`]); the oldest go
/// first, which only delays what their hearing would have settled.
const MAX_MARKS: usize = 4096;

/// How a message may wait for the backplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// An invalidation a caller waits for: refused at once while the backplane is known
    /// down, and after [`PUBLISHER_WAIT`] behind a busy publisher.
    FailFast,
    /// An acknowledgement: refused at once while the backplane is known down (the
    /// listener must not stall on it; the origin waits for our lease instead), else it
    /// waits its turn, since the origin's `invalidate` fails without it.
    UnlessDown,
    /// A background task (the heartbeat, the retry of buffered messages): publishes even
    /// while the backplane is known down, and so finds out when it is back.
    Probe,
}

/// A message [`Fleet::send`] did not publish.
#[derive(Debug)]
pub(crate) struct NotSent {
    pub(crate) error: Error,
    /// Still in the outbox: it goes out in its turn, or its number is given up (a gap
    /// the receivers repair). Either way nothing needs to send it again.
    pub(crate) queued: bool,
}

/// What a sender got while waiting for its turn to publish.
enum Turn<'a> {
    /// The publisher lock: the sender publishes what is queued up to its message.
    Publisher(tokio::sync::MutexGuard<'a, ()>),
    /// Its message's outcome, settled by another sender.
    Outcome(Result<()>),
    /// Neither, and it may not wait (see [`Attempt`]): the message stays queued.
    NotWaited,
}

/// This instance's side of the fleet protocol.
pub(crate) struct Fleet {
    backplane: Arc<dyn Backplane>,
    cfg: FleetConfig,
    /// Held by whoever publishes: the outbox's messages leave in sequence order
    /// (receivers would otherwise see false gaps), and a control message after them.
    publisher: tokio::sync::Mutex<()>,
    /// The numbered messages waiting to be published.
    outbox: Outbox,
    /// `(seq, mark)` of this instance's messages not heard back yet (see [`Fleet::send`]).
    marks: parking_lot::Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// This instance's heartbeats so far (the count a digest carries).
    beats: AtomicU64,
    /// The publish breaker: set when a publish failed, cleared when one succeeded.
    down: AtomicBool,
    members: Members,
}

impl Fleet {
    pub(crate) fn new(backplane: Arc<dyn Backplane>, cfg: FleetConfig) -> Self {
        Fleet {
            backplane,
            cfg,
            publisher: tokio::sync::Mutex::new(()),
            outbox: Outbox::default(),
            marks: Default::default(),
            beats: AtomicU64::new(0),
            down: AtomicBool::new(false),
            members: Members::default(),
        }
    }

    pub(crate) fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    pub(crate) fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// The last sequence number this instance used (published, queued, or given up).
    pub(crate) fn last_seq(&self) -> u64 {
        self.outbox.last_seq()
    }

    /// Whether the last publish failed (and none succeeded since).
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Sends one message with the next sequence number and returns it.
    ///
    /// The message is numbered and queued in the [`outbox`], then published in its
    /// turn, batched with what queued behind a slow publish. A caller that cannot wait
    /// (the backplane is known down, or a fail-fast attempt found the publisher busy
    /// for [`PUBLISHER_WAIT`]) gets [`NotSent`] saying the message stays queued: it goes
    /// out in order when the backplane answers, and the other instances see no gap for
    /// it. (Buffering it for retry as well would send it twice, and each copy drops the
    /// key from every L1 that had loaded it again.)
    ///
    /// Only a message whose publish keeps failing (or the oldest of an overflowing
    /// outbox) gives its number up; receivers then see a gap at this instance's next
    /// message or heartbeat and repair it (replay cannot find the number, so they
    /// flush). That is what makes a lost message safe: taking no number would leave
    /// them trusting their L1, stale past the backplane's propagation delay, for as
    /// long as the message is not delivered, and for good if this instance dies first.
    /// Numbers given up in a row show as one gap, so an outage costs each receiver one
    /// repair.
    ///
    /// `mark` is the sender's local clock (see `Guards::mark`), handed back by
    /// [`Fleet::heard_own`] when the message comes back to this instance.
    pub(crate) async fn send(
        &self,
        body: &MessageBody,
        stats: &Stats,
        attempt: Attempt,
        mark: u64,
    ) -> std::result::Result<u64, NotSent> {
        let (seq, mut done, burned) = self
            .outbox
            .push(|seq| {
                // Under the outbox's lock: the marks queue in number order.
                let mut marks = self.marks.lock();
                if marks.len() == MAX_MARKS {
                    marks.pop_front();
                }
                marks.push_back((seq, mark));
                self.message(seq, body.clone())
            })
            .map_err(|error| NotSent { error, queued: false })?;
        stats.messages_given_up.add(burned);
        let outcome = match self.publisher_or_outcome(attempt, &mut done).await {
            // Published by another caller's drain, or failed there.
            Turn::Outcome(outcome) => outcome,
            Turn::NotWaited => Err(self.refusal()),
            Turn::Publisher(_publisher) => {
                let drained = self.drain_through(seq, stats).await;
                // Not told only when a batch ahead of it failed.
                done.try_recv().unwrap_or_else(|_| Err(drained.err().unwrap_or_else(|| self.refusal())))
            }
        };
        outcome.map(|()| seq).map_err(|error| {
            let queued = self.outbox.holds(seq);
            if queued {
                stats.messages_left_queued.incr();
            }
            NotSent { error, queued }
        })
    }

    /// The mark [`Fleet::send`] was given for this instance's message `seq`, now heard
    /// back (messages come back in number order; marks of earlier ones not heard are
    /// dropped).
    pub(crate) fn heard_own(&self, seq: u64) -> Option<u64> {
        let mut marks = self.marks.lock();
        while marks.front().is_some_and(|&(s, _)| s < seq) {
            marks.pop_front();
        }
        marks.front().filter(|&&(s, _)| s == seq).map(|&(_, mark)| mark)
    }

    /// Messages waiting in the outbox.
    pub(crate) fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// The publisher lock, or the message's outcome if it came first (another caller's
    /// drain published it, or failed), or neither when the attempt must not wait.
    async fn publisher_or_outcome(
        &self,
        attempt: Attempt,
        done: &mut tokio::sync::oneshot::Receiver<Result<()>>,
    ) -> Turn<'_> {
        tokio::select! {
            biased;
            outcome = &mut *done => Turn::Outcome(outcome.unwrap_or_else(|_| Err(Error::new(
                ErrorKind::Backplane,
                "backplane message dropped from the outbox unpublished",
            )))),
            guard = self.publisher_for(attempt) => guard.map_or(Turn::NotWaited, Turn::Publisher),
        }
    }

    /// Publishes the outbox's messages numbered up to `through`, in batches, until
    /// none is left or a publish fails (whose error it returns). The caller holds the
    /// publisher lock.
    async fn drain_through(&self, through: u64, stats: &Stats) -> Result<()> {
        loop {
            let batch = self.outbox.batch(through);
            let Some(last) = batch.last().map(|m| m.seq) else { return Ok(()) };
            let sent = self.bounded(self.backplane.publish_batch(&batch), "backplane publish").await;
            let n = batch.len() as u64;
            match sent {
                Ok(()) => {
                    self.outbox.published(last);
                    stats.invalidations_sent.add(n);
                    if n > 1 {
                        stats.messages_batched.add(n);
                    }
                }
                Err(e) => {
                    stats.messages_given_up.add(self.outbox.failed(last, &e).burned);
                    return Err(e);
                }
            }
        }
    }

    /// Publishes everything the outbox holds (a last attempt at shutdown: messages
    /// whose callers were cancelled are buffered nowhere else).
    pub(crate) async fn drain(&self, stats: &Stats) -> Result<()> {
        let _publisher = self.publisher.lock().await;
        self.drain_through(self.outbox.last_seq(), stats).await
    }

    /// Sends a control message (heartbeat, acknowledgement) after what the outbox
    /// holds: it carries the outbox's watermark, read under the publisher lock, so that
    /// every smaller number that will ever be published already was (a number still on
    /// its way would look like a gap to the receivers).
    pub(crate) async fn send_control(
        &self,
        body: MessageBody,
        attempt: Attempt,
        stats: &Stats,
    ) -> Result<()> {
        let Some(_publisher) = self.publisher_for(attempt).await else {
            return Err(self.refusal());
        };
        let msg = self.control_message(body, stats).await;
        self.publish_bounded(&msg, "backplane control message").await
    }

    /// Publishes what waits in the outbox (a message its caller stopped waiting for is
    /// published here at the latest), then builds a control message carrying the
    /// watermark; a failure of the drain shows in it. The caller holds the publisher
    /// lock.
    async fn control_message(&self, body: MessageBody, stats: &Stats) -> Message {
        let _ = self.drain_through(self.outbox.last_seq(), stats).await;
        self.message(self.outbox.watermark(), body)
    }

    /// Sends a heartbeat (a control message, see [`Fleet::send_control`]) through
    /// [`Backplane::heartbeat`], which may aggregate it with the other members'.
    pub(crate) async fn send_heartbeat(&self, body: MessageBody, stats: &Stats) -> Result<()> {
        if !self.cfg.addressed {
            return self.send_control(body, Attempt::Probe, stats).await;
        }
        let _publisher = self.publisher.lock().await;
        let msg = self.control_message(body, stats).await;
        let beat = self.beats.fetch_add(1, Ordering::SeqCst).saturating_add(1);
        let interval = self.cfg.heartbeat_interval;
        self.bounded(self.backplane.heartbeat(&msg, beat, interval), "backplane heartbeat").await
    }

    /// Sends a Strong-level acknowledgement to `to` alone (to everyone when not
    /// addressed). It carries the last sequence number like any control message.
    pub(crate) async fn send_ack(&self, to: OriginId, seq: u64, stats: &Stats) -> Result<()> {
        let body = MessageBody::Ack { to, seq };
        if !self.cfg.addressed {
            return self.send_control(body, Attempt::UnlessDown, stats).await;
        }
        // Not under the publisher lock: an addressed acknowledgement travels apart from
        // this instance's messages, so receivers take no sequence claim from it (see the
        // listener) and its number need not be exact. Under the lock, the acknowledgements
        // the listener sends one per message heard (a round trip each) queued ahead of
        // this instance's own invalidations, which gave up after `PUBLISHER_WAIT`
        // (`strata bench --scenario payment --redis`).
        if self.is_down() {
            return Err(self.refusal());
        }
        let msg = self.message(self.last_seq(), body);
        self.bounded(self.backplane.publish_to(to, &msg), "backplane acknowledgement").await
    }

    /// The publisher lock, or `None` when a fail-fast attempt must not wait for it.
    async fn publisher_for(&self, attempt: Attempt) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if attempt == Attempt::Probe {
            return Some(self.publisher.lock().await);
        }
        if self.is_down() {
            return None;
        }
        let guard = match attempt {
            Attempt::FailFast => tokio::time::timeout(PUBLISHER_WAIT, self.publisher.lock()).await.ok()?,
            Attempt::UnlessDown | Attempt::Probe => self.publisher.lock().await,
        };
        // The publish we queued behind may have found the backplane down.
        (!self.is_down()).then_some(guard)
    }

    /// The error of an attempt that was not made.
    fn refusal(&self) -> Error {
        if self.is_down() {
            Error::new(
                ErrorKind::CircuitOpen,
                "backplane publish not attempted: the last one failed and none has succeeded since",
            )
        } else {
            Error::timeout("waiting for the backplane publisher", PUBLISHER_WAIT)
        }
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
        Message {
            origin: self.cfg.origin,
            seq,
            namespace: self.cfg.namespace.clone(),
            body,
            sent_at_ms: now_ms(),
        }
    }

    /// Publishes within the backplane timeout, and keeps the publish breaker.
    async fn publish_bounded(&self, msg: &Message, what: &str) -> Result<()> {
        self.bounded(self.backplane.publish(msg), what).await
    }

    /// Runs one send of any kind (publish, heartbeat, acknowledgement) within the
    /// backplane timeout, and keeps the publish breaker with its outcome.
    async fn bounded(&self, send: impl std::future::Future<Output = Result<()>>, what: &str) -> Result<()> {
        let res = match tokio::time::timeout(self.cfg.timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(what, self.cfg.timeout)),
        };
        let was_down = self.down.swap(res.is_err(), Ordering::SeqCst);
        match (&res, was_down) {
            (Err(e), false) => tracing::warn!(error = %e, namespace = %self.cfg.namespace,
                "backplane publish failed; invalidations stay queued without waiting until one succeeds"),
            (Ok(()), true) => tracing::info!(namespace = %self.cfg.namespace, "backplane publishes again"),
            _ => {}
        }
        res
    }
}
