//! A backplane inside one process, with fault injection.
//!
//! Each [`InProcessBackplane`] handle is one instance's *connection* to a shared hub:
//! make one with [`InProcessBackplane::new`] and more with [`InProcessBackplane::connect`],
//! one per `Cache` handle of the simulated fleet. Each connection's [`FaultControl`]
//! drops, delays, reorders or cuts what that connection receives, so every repair path
//! of the core can be driven deterministically.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{Backplane, BackplaneEvent, Beat, Message, MessageBody, OriginId, Subscription, now_ms};
use crate::error::{Error, ErrorKind, Result};

/// How a hub behaves after a subscriber was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Like Redis Pub/Sub: what was published while a subscriber was away is lost,
    /// and replay is unsupported.
    PubSub,
    /// Like a Redis Stream: a subscriber that comes back gets what it missed, and
    /// `replay` answers from a capped log.
    Stream,
}

/// How many messages the hub keeps for replay in [`Mode::Stream`].
const LOG_CAPACITY: usize = 10_000;
/// Bound on each subscriber's delivery channel: a receiver that falls this far behind
/// is told it lost messages instead of growing memory without limit.
const SUBSCRIBER_CAPACITY: usize = 4096;

/// Heartbeats older than this many of their intervals leave the digest.
const DIGEST_KEEP_INTERVALS: u32 = 8;

struct Hub {
    mode: Mode,
    /// Each subscription, with the origin it subscribed as (for `publish_to`).
    subscribers: Mutex<Vec<(Option<OriginId>, mpsc::UnboundedSender<Message>)>>,
    log: Mutex<VecDeque<Message>>,
    published: AtomicU64,
    delivered: AtomicU64,
    /// Per namespace, the latest heartbeat of each origin and when the last digest
    /// went out.
    beats: Mutex<HashMap<String, BeatTable>>,
}

#[derive(Default)]
struct BeatTable {
    latest: HashMap<OriginId, (Beat, tokio::time::Instant)>,
    last_digest: Option<tokio::time::Instant>,
}

impl Hub {
    /// Sends `message` to every subscription (or to those of origin `to`), under the
    /// lock so that every subscriber sees messages in one global order.
    fn deliver(&self, message: &Message, to: Option<OriginId>) {
        let mut subs = self.subscribers.lock();
        let mut sent = 0;
        subs.retain(|(me, tx)| {
            if to.is_some() && *me != to {
                return true;
            }
            sent += 1;
            tx.send(message.clone()).is_ok()
        });
        self.delivered.fetch_add(sent, Ordering::Relaxed);
    }
}

/// Faults applied to what one connection receives (and whether it can publish).
#[derive(Default)]
pub struct FaultControl {
    drop_next: AtomicU64,
    delay_micros: AtomicU64,
    reorder: AtomicBool,
    disconnected: AtomicBool,
    /// 0: no loss to report; n + 1: drop n messages, then report `Lost`.
    lose_next: AtomicU64,
    changed: tokio::sync::Notify,
    dropped: AtomicU64,
}

impl FaultControl {
    /// Drops the next `n` messages this connection would receive and reports
    /// [`BackplaneEvent::Lost`] before the one after them, as a Redis stream reader does
    /// when entries it had not read were trimmed or evicted. `n = 0` reports a loss that
    /// took nothing (a stream's counter restarted, entries gone that were read already).
    pub fn lose_next(&self, n: u64) {
        self.lose_next.store(n.saturating_add(1), Ordering::SeqCst);
    }

    /// Silently drops the next `n` messages this connection would receive.
    pub fn drop_next(&self, n: u64) {
        self.drop_next.store(n, Ordering::SeqCst);
    }

    /// Delays every received message by `d` (order is kept).
    pub fn set_delay(&self, d: Duration) {
        self.delay_micros.store(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Swaps each pair of consecutive received messages while on.
    pub fn set_reorder(&self, on: bool) {
        self.reorder.store(on, Ordering::SeqCst);
    }

    /// Cuts the connection (`true`) or restores it (`false`). While cut, publishing
    /// fails and received messages are lost ([`Mode::PubSub`]) or held back and
    /// delivered on reconnect ([`Mode::Stream`]).
    pub fn set_disconnected(&self, cut: bool) {
        self.disconnected.store(cut, Ordering::SeqCst);
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    /// How many messages were dropped by `drop_next` or by a Pub/Sub disconnect.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Clears every fault.
    pub fn clear(&self) {
        self.drop_next(0);
        self.set_delay(Duration::ZERO);
        self.set_reorder(false);
        self.set_disconnected(false);
        self.lose_next.store(0, Ordering::SeqCst);
    }

    /// What `lose_next` does to the next message; reports the loss on `out` when it is
    /// due.
    async fn take_loss(&self, out: &mpsc::Sender<BackplaneEvent>) -> LossStep {
        let step = self
            .lose_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map_or(LossStep::Deliver, |n| if n == 1 { LossStep::Report } else { LossStep::Drop });
        if step == LossStep::Report && out.send(BackplaneEvent::Lost).await.is_err() {
            return LossStep::Gone;
        }
        step
    }

    fn take_drop(&self) -> bool {
        self.drop_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

/// One instance's connection to an in-process backplane hub.
#[derive(Clone)]
pub struct InProcessBackplane {
    hub: Arc<Hub>,
    faults: Arc<FaultControl>,
}

impl Default for InProcessBackplane {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessBackplane {
    /// A new hub in [`Mode::Stream`] and a first connection to it.
    pub fn new() -> Self {
        Self::with_mode(Mode::Stream)
    }

    /// A new hub with the given mode and a first connection to it.
    pub fn with_mode(mode: Mode) -> Self {
        InProcessBackplane {
            hub: Arc::new(Hub {
                mode,
                subscribers: Mutex::new(Vec::new()),
                log: Mutex::new(VecDeque::new()),
                published: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                beats: Mutex::new(HashMap::new()),
            }),
            faults: Arc::new(FaultControl::default()),
        }
    }

    /// Another connection to the same hub, with its own faults: one per instance.
    pub fn connect(&self) -> Self {
        InProcessBackplane { hub: self.hub.clone(), faults: Arc::new(FaultControl::default()) }
    }

    /// This connection's fault controls.
    pub fn faults(&self) -> &FaultControl {
        &self.faults
    }

    /// How many messages were published on the hub (heartbeats, digests and
    /// acknowledgements included).
    pub fn published(&self) -> u64 {
        self.hub.published.load(Ordering::Relaxed)
    }

    /// How many messages the hub handed to subscriptions (one per subscription a
    /// message reached), before each connection's faults: what a fleet's backplane
    /// traffic costs its receivers.
    pub fn delivered(&self) -> u64 {
        self.hub.delivered.load(Ordering::Relaxed)
    }

    fn check_connected(&self) -> Result<()> {
        if self.faults.disconnected.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Backplane,
                "in-process backplane connection is cut (injected)",
            ));
        }
        Ok(())
    }

    async fn subscribe_for(&self, me: Option<OriginId>) -> Result<Subscription> {
        let (raw_tx, raw_rx) = mpsc::unbounded_channel();
        self.hub.subscribers.lock().push((me, raw_tx));
        let (tx, rx) = mpsc::channel(SUBSCRIBER_CAPACITY);
        tokio::spawn(forward(raw_rx, tx, self.faults.clone(), self.hub.mode));
        Ok(rx)
    }
}

#[async_trait]
impl Backplane for InProcessBackplane {
    fn name(&self) -> &str {
        match self.hub.mode {
            Mode::PubSub => "in-process-pubsub",
            Mode::Stream => "in-process-stream",
        }
    }

    /// One hub delivers under one lock, in one order, unless this connection's
    /// [`FaultControl::set_reorder`] is on or it ever dropped a message silently
    /// ([`FaultControl::drop_next`]).
    fn delivers_in_one_order(&self) -> bool {
        let f = &self.faults;
        !f.reorder.load(Ordering::SeqCst) && f.drop_next.load(Ordering::SeqCst) == 0 && f.dropped() == 0
    }

    async fn publish(&self, message: &Message) -> Result<()> {
        self.check_connected()?;
        self.hub.published.fetch_add(1, Ordering::Relaxed);
        if self.hub.mode == Mode::Stream && !message.is_control() {
            let mut log = self.hub.log.lock();
            if log.len() == LOG_CAPACITY {
                log.pop_front();
            }
            log.push_back(message.clone());
        }
        self.hub.deliver(message, None);
        Ok(())
    }

    /// Keeps the beat, and sends every namespace member's latest as one digest when
    /// the last went out an interval ago or more.
    async fn heartbeat(&self, message: &Message, beat: u64, interval: Duration) -> Result<()> {
        self.check_connected()?;
        self.hub.published.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let digest = {
            let mut tables = self.hub.beats.lock();
            let table = tables.entry(message.namespace.clone()).or_default();
            let buffered = message.body == MessageBody::BufferedHeartbeat;
            let entry = Beat { origin: message.origin, seq: message.seq, beat, buffered, age_ms: 0 };
            table.latest.insert(message.origin, (entry, now));
            // Nine tenths, so that jitter never skips an interval's digest.
            let due = table.last_digest.is_none_or(|at| now.duration_since(at) >= interval * 9 / 10);
            if !due {
                return Ok(());
            }
            table.last_digest = Some(now);
            let keep = interval.saturating_mul(DIGEST_KEEP_INTERVALS);
            table.latest.retain(|_, (_, at)| now.duration_since(*at) <= keep);
            let beats = table
                .latest
                .values()
                .map(|(b, at)| Beat {
                    age_ms: u64::try_from(now.duration_since(*at).as_millis()).unwrap_or(u64::MAX),
                    ..b.clone()
                })
                .collect();
            Message {
                origin: 0,
                seq: 0,
                namespace: message.namespace.clone(),
                body: MessageBody::Digest(beats),
                sent_at_ms: now_ms(),
            }
        };
        self.hub.deliver(&digest, None);
        Ok(())
    }

    async fn publish_to(&self, to: OriginId, message: &Message) -> Result<()> {
        self.check_connected()?;
        self.hub.published.fetch_add(1, Ordering::Relaxed);
        self.hub.deliver(message, Some(to));
        Ok(())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        self.subscribe_for(None).await
    }

    async fn subscribe_as(&self, me: OriginId) -> Result<Subscription> {
        self.subscribe_for(Some(me)).await
    }

    async fn replay(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        if self.hub.mode != Mode::Stream {
            return Ok(None);
        }
        self.check_connected()?;
        let log = self.hub.log.lock();
        let found: Vec<Message> = log
            .iter()
            .filter(|m| m.origin == origin && m.seq >= from_seq && m.seq <= to_seq)
            .cloned()
            .collect();
        // A replay that cannot return every asked-for message is no replay at all.
        let wanted = to_seq.saturating_sub(from_seq) + 1;
        Ok((found.len() as u64 == wanted).then_some(found))
    }
}

/// Applies one connection's faults between the hub and the subscriber.
async fn forward(
    mut raw: mpsc::UnboundedReceiver<Message>,
    out: mpsc::Sender<BackplaneEvent>,
    faults: Arc<FaultControl>,
    mode: Mode,
) {
    let mut held: Option<Message> = None;
    let mut missed: Vec<Message> = Vec::new();
    let mut was_cut = false;
    loop {
        let msg = tokio::select! {
            m = raw.recv() => m,
            _ = faults.changed.notified() => {
                if let Some(m) = held.take() && out.send(BackplaneEvent::Message(m)).await.is_err() {
                    return;
                }
                if !handle_transition(&faults, &out, mode, &mut was_cut, &mut missed).await {
                    return;
                }
                continue;
            }
        };
        let Some(msg) = msg else { return };
        if !handle_transition(&faults, &out, mode, &mut was_cut, &mut missed).await {
            return;
        }
        if was_cut {
            match mode {
                Mode::Stream => missed.push(msg),
                Mode::PubSub => {
                    faults.dropped.fetch_add(1, Ordering::SeqCst);
                }
            }
            continue;
        }
        match faults.take_loss(&out).await {
            LossStep::Drop => {
                faults.dropped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            LossStep::Gone => return,
            LossStep::Deliver | LossStep::Report => {}
        }
        if faults.take_drop() {
            faults.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let delay = faults.delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let to_send = if faults.reorder.load(Ordering::SeqCst) {
            match held.take() {
                None => {
                    held = Some(msg);
                    continue;
                }
                Some(first) => vec![msg, first],
            }
        } else {
            let mut v: Vec<Message> = held.take().into_iter().collect();
            v.push(msg);
            v
        };
        for m in to_send {
            if out.send(BackplaneEvent::Message(m)).await.is_err() {
                return;
            }
        }
    }
}

/// What `lose_next` does to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LossStep {
    /// Nothing: deliver it.
    Deliver,
    /// Drop it: lost.
    Drop,
    /// `Lost` was reported before it: deliver it.
    Report,
    /// The receiver is gone.
    Gone,
}

/// Emits Disconnected/Resumed when the cut state changed. False when the receiver is gone.
async fn handle_transition(
    faults: &FaultControl,
    out: &mpsc::Sender<BackplaneEvent>,
    mode: Mode,
    was_cut: &mut bool,
    missed: &mut Vec<Message>,
) -> bool {
    let cut = faults.disconnected.load(Ordering::SeqCst);
    if cut == *was_cut {
        return true;
    }
    *was_cut = cut;
    if cut {
        return out.send(BackplaneEvent::Disconnected).await.is_ok();
    }
    for m in missed.drain(..) {
        if out.send(BackplaneEvent::Message(m)).await.is_err() {
            return false;
        }
    }
    out.send(BackplaneEvent::Resumed { complete: mode == Mode::Stream }).await.is_ok()
}
