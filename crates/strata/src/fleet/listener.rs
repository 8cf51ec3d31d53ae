//! The backplane listener: applies the invalidations other instances send, detects
//! what it missed (sequence gaps, lost subscriptions) and repairs it (replay where the
//! backplane can, else a flush), and keeps the backplane's health. At the Strong level
//! it also tracks the members and acknowledges what it applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Attempt, Fleet, Host, mark_healthy, mark_unhealthy};
use crate::backplane::{BackplaneEvent, Message, MessageBody, OriginId};
use crate::clock::Timestamp;
use crate::shutdown::Stop;

/// Origins not heard from for this many heartbeat intervals are forgotten.
const FORGET_AFTER_HEARTBEATS: u32 = 60;
/// Gaps longer than this are repaired by a flush without asking for a replay.
const MAX_REPLAY: u64 = 10_000;

/// Per-origin sequence tracking.
struct OriginState {
    last_seq: u64,
    last_heard: Timestamp,
}

struct Listener<'a, H> {
    host: &'a H,
    fleet: &'a Fleet,
    origins: HashMap<OriginId, OriginState>,
    disconnected: bool,
}

/// Subscribes (again after every loss) and handles events until stopped.
pub(crate) async fn run<H: Host>(host: Arc<H>, mut stop: Stop) {
    let Some(fleet) = host.fleet() else { return };
    let namespace = fleet.config().namespace.clone();
    let strong = fleet.config().strong;
    let mut l = Listener { host: &*host, fleet, origins: HashMap::new(), disconnected: false };
    let mut backoff = Duration::from_millis(10);
    loop {
        let sub = tokio::select! {
            s = fleet.backplane().subscribe() => s,
            _ = stop.stopped() => return,
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, namespace = %namespace, "backplane subscribe failed; retrying");
                mark_unhealthy(&*host, host.now());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.stopped() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        // Whatever was published before this subscription could not reach us: start from
        // a clean L1, and refuse the fills of loads that began before it.
        host.flush_local();
        l.disconnected = false;
        if !strong {
            // At the Strong level the lease starts only with our first heartbeat heard back.
            host.health().set_last_own_heartbeat(host.now());
        }
        mark_healthy(&*host);
        host.health().set_subscribed();
        loop {
            let ev = tokio::select! {
                ev = sub.recv() => ev,
                _ = stop.stopped() => return,
            };
            match ev {
                Some(ev) => l.handle(ev).await,
                None => break,
            }
        }
        // The subscription ended: we are deaf until the next one.
        host.stats().gaps_detected.incr();
        mark_unhealthy(&*host, host.now());
    }
}

impl<H: Host> Listener<'_, H> {
    async fn handle(&mut self, ev: BackplaneEvent) {
        let host = self.host;
        match ev {
            BackplaneEvent::Message(m) => self.on_message(m).await,
            BackplaneEvent::Disconnected => {
                host.stats().gaps_detected.incr();
                self.disconnected = true;
                mark_unhealthy(host, host.now());
            }
            BackplaneEvent::Resumed { complete } => {
                self.disconnected = false;
                if !complete {
                    host.stats().repairs_flushed.incr();
                    host.flush_local();
                }
                if !self.fleet.config().strong {
                    host.health().set_last_own_heartbeat(host.now());
                }
                mark_healthy(host);
            }
            BackplaneEvent::Lost => {
                host.stats().gaps_detected.incr();
                host.stats().repairs_flushed.incr();
                host.flush_local();
            }
            BackplaneEvent::Malformed => host.stats().malformed_messages.incr(),
        }
    }

    async fn on_message(&mut self, m: Message) {
        let host = self.host;
        let cfg = self.fleet.config();
        if m.namespace != cfg.namespace {
            return;
        }
        let now = host.now();
        if m.origin == cfg.origin {
            if m.is_heartbeat() {
                if cfg.strong
                    && host.health().heard_own_heartbeat()
                    && !host.health().own_lease_held(now, cfg.membership_lease)
                {
                    // Our lease lapsed while we could not hear ourselves: invalidations
                    // may have gone by unacknowledged. Renewed now; repair before serving.
                    host.stats().repairs_flushed.incr();
                    host.flush_local();
                }
                host.health().set_last_own_heartbeat(now);
                if !self.disconnected {
                    mark_healthy(host);
                }
            }
            return;
        }
        if cfg.strong {
            let acked = match m.body {
                MessageBody::Ack { to, seq } if to == cfg.origin => Some(seq),
                _ => None,
            };
            self.fleet.members().heard(m.origin, now, acked);
        }
        match &m.body {
            MessageBody::Heartbeat => host.stats().heartbeats_received.incr(),
            MessageBody::Ack { .. } => {}
            body => {
                host.stats().invalidations_received.incr();
                // Applying an invalidation twice is harmless, so apply before any repair.
                self.apply(body);
            }
        }
        self.track(m.origin, m.seq, m.is_control(), now).await;
        if cfg.strong && !m.is_control() {
            self.acknowledge(m.origin, m.seq).await;
        }
        let forget_after = cfg.heartbeat_interval.saturating_mul(FORGET_AFTER_HEARTBEATS);
        if self.origins.len() > 64 {
            self.origins.retain(|_, o| now.since(o.last_heard) < forget_after);
        }
    }

    /// Strong level: tells `origin` that everything it sent up to `seq` is applied here
    /// (repairs included, since they ran before this).
    async fn acknowledge(&self, origin: OriginId, seq: u64) {
        let ack = MessageBody::Ack { to: origin, seq };
        if let Err(e) = self.fleet.send_control(ack, Attempt::UnlessDown).await {
            // The origin waits until our lease lapses instead; by then we serve no L1.
            tracing::warn!(error = %e, origin, seq, "acknowledgement not sent");
        }
    }

    /// Sequence bookkeeping: a jump means missed messages, which are replayed or, if the
    /// backplane cannot, answered with a flush.
    async fn track(&mut self, origin: OriginId, seq: u64, control: bool, now: Timestamp) {
        let (from, to) = match self.origins.get_mut(&origin) {
            Some(o) => {
                o.last_heard = now;
                let expected = o.last_seq + 1;
                // A heartbeat or ack repeats the last seq; a message should be the next.
                let missing_to = if control { seq } else { seq.saturating_sub(1) };
                let range = (missing_to >= expected).then_some((expected, missing_to));
                o.last_seq = o.last_seq.max(seq);
                match range {
                    Some(r) => r,
                    None => return,
                }
            }
            None => {
                self.origins.insert(origin, OriginState { last_seq: seq, last_heard: now });
                // First contact: we cannot tell which of this origin's earlier messages
                // were published after we subscribed, so whatever came before this one
                // is treated as missed (replayed, or flushed). An origin that has sent
                // nothing yet (its first heartbeat carries 0) costs nothing.
                let missing_to = if control { seq } else { seq.saturating_sub(1) };
                if missing_to == 0 {
                    return;
                }
                (1, missing_to)
            }
        };
        self.repair(origin, from, to).await;
    }

    async fn repair(&mut self, origin: OriginId, from: u64, to: u64) {
        let host = self.host;
        let cfg = self.fleet.config();
        host.stats().gaps_detected.incr();
        let replay = if to - from < MAX_REPLAY {
            tokio::time::timeout(cfg.timeout, self.fleet.backplane().replay(origin, from, to))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        } else {
            None
        };
        match replay {
            Some(messages) => {
                for m in messages.iter().filter(|m| m.namespace == cfg.namespace) {
                    self.apply(&m.body);
                }
                host.stats().repairs_replayed.incr();
            }
            None => {
                host.stats().repairs_flushed.incr();
                host.flush_local();
            }
        }
        tracing::info!(namespace = %cfg.namespace, origin, from, to, "backplane gap repaired");
    }

    fn apply(&self, body: &MessageBody) {
        match body {
            MessageBody::Invalidate(scope) => self.host.apply_remote(scope),
            MessageBody::Bypass => {
                if self.fleet.config().strong {
                    self.host.bypass();
                }
            }
            MessageBody::Heartbeat | MessageBody::Ack { .. } => {}
        }
    }
}
