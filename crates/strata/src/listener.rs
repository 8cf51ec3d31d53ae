//! Background work of a cache: the backplane listener (apply, gap detection, repair,
//! health), the heartbeat, the retry of buffered invalidations, and the metrics export.
//! Every task ends when the last `Cache` handle is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::backplane::{Backplane, BackplaneEvent, Message, MessageBody, OriginId};
use crate::cache::{Inner, Member};
use crate::clock::Timestamp;
use crate::key::CacheKey;

/// Heartbeats missed before the backplane counts as unhealthy.
const MISSED_HEARTBEATS: u32 = 3;
/// Origins not heard from for this many heartbeat intervals are forgotten.
const FORGET_AFTER_HEARTBEATS: u32 = 60;
/// Gaps longer than this are repaired by a flush without asking for a replay.
const MAX_REPLAY: u64 = 10_000;
/// How often buffered invalidations are retried, at the most.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How often counters are pushed to the `metrics` recorder.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn spawn_background<K, V>(inner: &Arc<Inner<K, V>>)
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    if let Some(bp) = inner.backplane.clone() {
        tokio::spawn(listen(inner.clone(), bp));
        tokio::spawn(heartbeat(inner.clone()));
    }
    if inner.tier.is_some() || inner.backplane.is_some() {
        tokio::spawn(retry(inner.clone()));
    }
    tokio::spawn(export(inner.clone()));
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Err: every sender is gone, which also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn export<K, V>(inner: Arc<Inner<K, V>>)
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    let mut stop = inner.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPORT_EVERY) => inner.stats.export(&inner.cfg.namespace),
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn retry<K, V>(inner: Arc<Inner<K, V>>)
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    let mut stop = inner.shutdown.clone();
    let mut pause = RETRY_EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(&mut stop) => return,
        }
        if inner.pending.lock().is_empty() {
            pause = RETRY_EVERY;
            continue;
        }
        inner.retry_pending().await;
        // Back off while the remote stays down, up to a few seconds.
        pause = if inner.pending.lock().is_empty() {
            RETRY_EVERY
        } else {
            (pause * 2).min(Duration::from_secs(2))
        };
    }
}

async fn heartbeat<K, V>(inner: Arc<Inner<K, V>>)
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    let Some(bp) = inner.backplane.clone() else { return };
    let mut stop = inner.shutdown.clone();
    let every = inner.cfg.heartbeat_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
        {
            let seq = inner.publisher.lock().await;
            let msg = Message {
                origin: inner.origin,
                seq: *seq,
                namespace: inner.cfg.namespace.clone(),
                body: MessageBody::Heartbeat,
            };
            // A failed heartbeat shows up below as our own heartbeat not coming back.
            let _ = tokio::time::timeout(inner.backplane_timeout(), bp.publish(&msg)).await;
        }
        let now = inner.now();
        let last = inner.health.last_own_heartbeat.load(Ordering::SeqCst);
        let missed = now.since(Timestamp(last)) > every * MISSED_HEARTBEATS;
        if inner.health.subscribed.load(Ordering::SeqCst) && missed {
            inner.mark_unhealthy(Timestamp(last));
        }
    }
}

/// Per-origin sequence tracking.
struct OriginState {
    last_seq: u64,
    last_heard: Timestamp,
}

struct Listener<K, V> {
    inner: Arc<Inner<K, V>>,
    bp: Arc<dyn Backplane>,
    origins: HashMap<OriginId, OriginState>,
    disconnected: bool,
}

async fn listen<K, V>(inner: Arc<Inner<K, V>>, bp: Arc<dyn Backplane>)
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    let mut stop = inner.shutdown.clone();
    let mut l = Listener { inner: inner.clone(), bp, origins: HashMap::new(), disconnected: false };
    let mut backoff = Duration::from_millis(10);
    loop {
        let sub = tokio::select! {
            s = l.bp.subscribe() => s,
            _ = stopped(&mut stop) => return,
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, namespace = %inner.cfg.namespace, "backplane subscribe failed; retrying");
                inner.mark_unhealthy(inner.now());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        // Whatever was published before this subscription could not reach us: start from
        // a clean L1, and refuse the fills of loads that began before it.
        l.inner.flush_l1();
        l.disconnected = false;
        if !inner.strong {
            // At the Strong level the lease starts only with our first heartbeat heard back.
            inner.health.last_own_heartbeat.store(inner.now().as_nanos(), Ordering::SeqCst);
        }
        inner.mark_healthy();
        inner.health.subscribed.store(true, Ordering::SeqCst);
        loop {
            let ev = tokio::select! {
                ev = sub.recv() => ev,
                _ = stopped(&mut stop) => return,
            };
            match ev {
                Some(ev) => l.handle(ev).await,
                None => break,
            }
        }
        // The subscription ended: we are deaf until the next one.
        inner.stats.gaps_detected.incr();
        inner.mark_unhealthy(inner.now());
    }
}

impl<K, V> Listener<K, V>
where
    K: CacheKey,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    async fn handle(&mut self, ev: BackplaneEvent) {
        let inner = &self.inner;
        match ev {
            BackplaneEvent::Message(m) => self.on_message(m).await,
            BackplaneEvent::Disconnected => {
                inner.stats.gaps_detected.incr();
                self.disconnected = true;
                inner.mark_unhealthy(inner.now());
            }
            BackplaneEvent::Resumed { complete } => {
                self.disconnected = false;
                if !complete {
                    inner.stats.repairs_flushed.incr();
                    inner.flush_l1();
                }
                if !inner.strong {
                    inner.health.last_own_heartbeat.store(inner.now().as_nanos(), Ordering::SeqCst);
                }
                inner.mark_healthy();
            }
            BackplaneEvent::Lost => {
                inner.stats.gaps_detected.incr();
                inner.stats.repairs_flushed.incr();
                inner.flush_l1();
            }
            BackplaneEvent::Malformed => inner.stats.malformed_messages.incr(),
        }
    }

    async fn on_message(&mut self, m: Message) {
        let inner = self.inner.clone();
        if m.namespace != inner.cfg.namespace {
            return;
        }
        let now = inner.now();
        if m.origin == inner.origin {
            if m.is_heartbeat() {
                if inner.strong
                    && inner.health.last_own_heartbeat.load(Ordering::SeqCst) != 0
                    && !inner.own_lease_held(now)
                {
                    // Our lease lapsed while we could not hear ourselves: invalidations
                    // may have gone by unacknowledged. Renewed now; repair before serving.
                    inner.stats.repairs_flushed.incr();
                    inner.flush_l1();
                }
                inner.health.last_own_heartbeat.store(now.as_nanos(), Ordering::SeqCst);
                if !self.disconnected {
                    inner.mark_healthy();
                }
            }
            return;
        }
        if inner.strong {
            let mut members = inner.members.lock();
            let member = members.entry(m.origin).or_insert(Member { last_heard: now, acked: 0 });
            member.last_heard = now;
            if let MessageBody::Ack { to, seq } = m.body
                && to == inner.origin
            {
                member.acked = member.acked.max(seq);
                drop(members);
                inner.acks.notify_waiters();
            }
        }
        match &m.body {
            MessageBody::Heartbeat => inner.stats.heartbeats_received.incr(),
            MessageBody::Ack { .. } => {}
            body => {
                inner.stats.invalidations_received.incr();
                // Applying an invalidation twice is harmless, so apply before any repair.
                self.apply(body, now);
            }
        }
        self.track(m.origin, m.seq, m.is_control(), now).await;
        if inner.strong && !m.is_control() {
            self.acknowledge(m.origin, m.seq).await;
        }
        let forget_after = inner.cfg.heartbeat_interval * FORGET_AFTER_HEARTBEATS;
        if self.origins.len() > 64 {
            self.origins.retain(|_, o| now.since(o.last_heard) < forget_after);
        }
    }

    /// Strong level: tells `origin` that everything it sent up to `seq` is applied here
    /// (repairs included, since they ran before this).
    async fn acknowledge(&self, origin: OriginId, seq: u64) {
        let inner = &self.inner;
        // Under the publisher lock, so the ack carries a sequence number already published
        // (a larger one would look like a gap to the receivers).
        let last = inner.publisher.lock().await;
        let ack = Message {
            origin: inner.origin,
            seq: *last,
            namespace: inner.cfg.namespace.clone(),
            body: MessageBody::Ack { to: origin, seq },
        };
        if let Err(e) = tokio::time::timeout(inner.backplane_timeout(), self.bp.publish(&ack))
            .await
            .unwrap_or_else(|_| Err(crate::Error::timeout("backplane ack", inner.backplane_timeout())))
        {
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
        let inner = self.inner.clone();
        inner.stats.gaps_detected.incr();
        let replay = if to - from < MAX_REPLAY {
            tokio::time::timeout(inner.backplane_timeout(), self.bp.replay(origin, from, to))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        } else {
            None
        };
        match replay {
            Some(messages) => {
                let now = inner.now();
                for m in messages.iter().filter(|m| m.namespace == inner.cfg.namespace) {
                    self.apply(&m.body, now);
                }
                inner.stats.repairs_replayed.incr();
            }
            None => {
                inner.stats.repairs_flushed.incr();
                inner.flush_l1();
            }
        }
        tracing::info!(namespace = %inner.cfg.namespace, origin, from, to, "backplane gap repaired");
    }

    fn apply(&self, body: &MessageBody, now: Timestamp) {
        let inner = &self.inner;
        match body {
            MessageBody::Keys(keys) => {
                for k in keys {
                    match K::parse_key(k) {
                        Some(key) => {
                            inner.evict_key(&key, now);
                            inner.stats.invalidations_applied.incr();
                        }
                        None => {
                            // Not a key of this cache's type: count it and go on with the rest.
                            inner.stats.malformed_messages.incr();
                        }
                    }
                }
            }
            MessageBody::Tag(tag) => {
                inner.guards.invalidate_tag(tag);
                inner.flights.detach_all();
                inner.stats.invalidations_applied.incr();
            }
            MessageBody::All => {
                inner.flush_l1();
                inner.stats.invalidations_applied.incr();
            }
            MessageBody::DistrustL2 => {
                if inner.strong && !inner.untrusted.load(Ordering::SeqCst) {
                    let why = crate::Error::new(crate::ErrorKind::Tier, "another member's l2 delete failed");
                    inner.l2_invalidation_failed(None, None, &why);
                }
            }
            MessageBody::Heartbeat | MessageBody::Ack { .. } => {}
        }
    }
}
