//! The backplane listener: applies the invalidations other instances send, detects
//! what it missed (sequence gaps, lost subscriptions) and repairs it (replay where the
//! backplane can, else a flush), and keeps the backplane's health. At the Strong level
//! it also tracks the members and acknowledges what it applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::doubt::Doubts;
use super::sequence::{MAX_REPLAY, Origins, Position, replay_covers};
use super::verify::{VERIFY_INTERVALS, Verification, Via};
use super::{Fleet, Host, mark_healthy, mark_unhealthy};
use crate::backplane::{BackplaneEvent, Beat, Message, MessageBody, OriginId};
use crate::clock::Timestamp;
use crate::l1::Cause;
use crate::shutdown::Stop;

/// Origins not heard from for this many heartbeat intervals are forgotten.
const FORGET_AFTER_HEARTBEATS: u32 = 60;
/// Below the Strong level, a member not heard for this many heartbeat intervals while
/// others are heard is doubted (see `doubt`): it beats every interval, so a few missed
/// beats mean it crashed or lost the backplane, either of which may have taken an
/// invalidation it had not published yet.
const SILENT_AFTER_HEARTBEATS: u32 = 5;
/// ... and not before this long: with short intervals a busy host's scheduling
/// hiccups would pass for silence (and each costs a flush).
const SILENT_AFTER_AT_LEAST: Duration = Duration::from_secs(1);
/// A digest's entry older than this many heartbeat intervals is not a sign of life:
/// a live origin beats every interval, so its entry is younger than one (plus delays).
const FRESH_BEAT_INTERVALS: u32 = 3;

/// Messages acknowledged at most before the acknowledgements owed go out, even while
/// more events wait: a long burst does not hold every origin's writes until its end.
const MAX_OWED_MESSAGES: usize = 64;

struct Listener<'a, H> {
    host: &'a H,
    fleet: &'a Fleet,
    origins: Origins,
    disconnected: bool,
    /// Below the Strong level: the members that may have L2 deletes buffered.
    doubts: Doubts,
    /// Each origin's heartbeat count in the last digest: an entry whose count did not
    /// change since is not heard again.
    beats: HashMap<OriginId, u64>,
    /// Below the Strong level: a loss the backplane reported, being verified per origin
    /// instead of flushed (see `verify`).
    verifying: Option<Verification>,
    /// When the last message was read: nothing read before it can have been lost.
    last_read: Timestamp,
    /// Strong level: acknowledgements owed (origin -> the highest number applied), sent
    /// once no event waits in the subscription (see `owe_ack`).
    owed: HashMap<OriginId, u64>,
    /// Messages acknowledged in `owed` since it was last sent.
    owed_messages: usize,
    /// When the members' silence was last looked at (once per heartbeat interval).
    silence_checked: Timestamp,
    /// Since when this instance has heard the backplane without a pause of more than
    /// two heartbeat intervals (its own heartbeat and the digests come every interval):
    /// a member is silent only if it was not heard while this instance was hearing.
    hearing_since: Timestamp,
    /// Below the Strong level: the members that said they left, and when. A digest may
    /// still list one's last beat for a few intervals: that is not a sign of life.
    left: HashMap<OriginId, Timestamp>,
    /// Below the Strong level: the members found silent, with when each was last heard
    /// (each costs one flush, even if it was doubted already for another reason).
    silent: HashMap<OriginId, Timestamp>,
}

/// Subscribes (again after every loss) and handles events until stopped.
pub(crate) async fn run<H: Host>(host: Arc<H>, mut stop: Stop) {
    let Some(fleet) = host.fleet() else { return };
    let namespace = fleet.config().namespace.clone();
    let strong = fleet.config().strong;
    let mut l = Listener {
        host: &*host,
        fleet,
        origins: Origins::default(),
        disconnected: false,
        doubts: Doubts::default(),
        beats: HashMap::new(),
        verifying: None,
        last_read: host.now(),
        owed: HashMap::new(),
        owed_messages: 0,
        silence_checked: host.now(),
        hearing_since: host.now(),
        left: HashMap::new(),
        silent: HashMap::new(),
    };
    let mut backoff = Duration::from_millis(10);
    loop {
        let sub = tokio::select! {
            s = fleet.backplane().subscribe_as(fleet.config().origin) => s,
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
        l.verifying = None;
        l.last_read = host.now();
        l.hearing_since = l.last_read;
        l.cut_off_ended();
        l.disconnected = false;
        if !strong {
            // At the Strong level the lease starts only with our first heartbeat heard back.
            host.health().set_last_own_heartbeat(host.now());
        }
        mark_healthy(&*host);
        host.health().set_subscribed();
        loop {
            let deadline = l.verifying.as_ref().map(Verification::deadline);
            let ev = tokio::select! {
                ev = sub.recv() => ev,
                _ = until(deadline) => {
                    l.verification_timed_out();
                    continue;
                }
                _ = stop.stopped() => return,
            };
            match ev {
                Some(ev) => l.handle(ev).await,
                None => break,
            }
            if sub.is_empty() || l.owed_messages >= MAX_OWED_MESSAGES {
                l.send_owed().await;
            }
        }
        l.send_owed().await;
        // The subscription ended: we are deaf until the next one.
        host.stats().gaps_detected.incr();
        mark_unhealthy(&*host, host.now());
    }
}

impl<H: Host> Listener<'_, H> {
    async fn handle(&mut self, ev: BackplaneEvent) {
        let host = self.host;
        match ev {
            BackplaneEvent::Message(m) => {
                let now = host.now();
                let pause = self.fleet.config().heartbeat_interval.saturating_mul(2);
                if now.since(self.last_read) > pause {
                    self.hearing_since = now;
                }
                self.last_read = now;
                self.on_message(m).await;
            }
            BackplaneEvent::Disconnected => {
                host.stats().gaps_detected.incr();
                self.disconnected = true;
                mark_unhealthy(host, host.now());
            }
            BackplaneEvent::Resumed { complete } => {
                self.disconnected = false;
                self.hearing_since = host.now();
                self.cut_off_ended();
                if !complete {
                    host.stats().repairs_flushed.incr();
                    self.flush();
                }
                if !self.fleet.config().strong {
                    host.health().set_last_own_heartbeat(host.now());
                }
                if self.verifying.is_none() {
                    mark_healthy(host);
                }
            }
            BackplaneEvent::Lost => {
                host.stats().gaps_detected.incr();
                self.on_lost();
                self.cut_off_ended();
            }
            BackplaneEvent::Malformed => host.stats().malformed_messages.incr(),
        }
    }

    async fn on_message(&mut self, m: Message) {
        if m.namespace != self.fleet.config().namespace {
            return;
        }
        match m.body {
            MessageBody::Digest(beats) => {
                let listed: Vec<OriginId> = beats.iter().map(|b| b.origin).collect();
                for beat in self.fresh_beats(beats) {
                    let origin = beat.origin;
                    if self.on_one(beat.to_message(&m.namespace, m.sent_at_ms)).await {
                        self.verified(origin, Via::Digest);
                    }
                }
                if let Some(v) = &mut self.verifying {
                    v.listed(listed.into_iter());
                }
            }
            _ => {
                let origin = m.origin;
                if self.on_one(m).await {
                    self.verified(origin, Via::Message);
                }
            }
        }
    }

    /// A loss the backplane reported. At the Strong level (which acknowledges what it
    /// applied, and must not acknowledge over a hole) L1 is flushed; below it, each live
    /// origin's next message shows whether any of its messages went (see `verify`).
    fn on_lost(&mut self) {
        let host = self.host;
        let cfg = self.fleet.config();
        if cfg.strong {
            host.stats().repairs_flushed.incr();
            self.flush();
            return;
        }
        let now = host.now();
        let live_within = cfg.heartbeat_interval.saturating_mul(VERIFY_INTERVALS);
        let live = self
            .origins
            .heard()
            .filter(|(_, at)| now.since(*at) <= live_within)
            .map(|(o, _)| o)
            .collect::<Vec<_>>();
        let deadline = tokio::time::Instant::now() + live_within;
        match &mut self.verifying {
            Some(v) => v.another_loss(live.into_iter(), deadline),
            None => self.verifying = Some(Verification::new(live.into_iter(), deadline)),
        }
        mark_unhealthy(host, self.last_read);
        self.end_verification_if_done();
    }

    /// `origin` showed, by a message sent after the loss being verified, that none of
    /// its messages was lost.
    fn verified(&mut self, origin: OriginId, via: Via) {
        if let Some(v) = &mut self.verifying {
            v.heard(origin, via);
            self.end_verification_if_done();
        }
    }

    fn end_verification_if_done(&mut self) {
        if self.verifying.as_ref().is_some_and(Verification::done) {
            self.verifying = None;
            self.host.stats().repairs_verified.incr();
            if !self.disconnected {
                mark_healthy(self.host);
            }
        }
    }

    /// Some live origin was not heard in time after a loss: what it sent may be lost.
    fn verification_timed_out(&mut self) {
        tracing::info!(
            namespace = %self.fleet.config().namespace,
            "backplane loss not verified in time: flushing L1"
        );
        self.host.stats().repairs_flushed.incr();
        self.flush();
    }

    /// Flushes L1, which also ends a verification: nothing L1 holds now predates a loss.
    fn flush(&mut self) {
        self.host.flush_local();
        if self.verifying.take().is_some() && !self.disconnected {
            mark_healthy(self.host);
        }
    }

    /// The entries of a digest that are news: younger than a few intervals, with a
    /// count that changed since the last digest (which, like a replayed heartbeat, may
    /// be a late one). Remembers the counts of this one, which forgets the origins it
    /// no longer lists.
    fn fresh_beats(&mut self, beats: Vec<Beat>) -> Vec<Beat> {
        let cfg = self.fleet.config();
        let fresh_ms = cfg.heartbeat_interval.saturating_mul(FRESH_BEAT_INTERVALS).as_millis();
        let last = std::mem::take(&mut self.beats);
        let mut fresh = Vec::new();
        for b in beats {
            if self.beats.insert(b.origin, b.beat).is_some() {
                continue; // listed twice: a forged or corrupt digest; the first counts
            }
            if last.get(&b.origin) != Some(&b.beat) && u128::from(b.age_ms) <= fresh_ms {
                fresh.push(b);
            }
        }
        fresh
    }

    /// Handles one message (a digest's entry as the heartbeat it stands for). True when
    /// it shows that none of its origin's messages up to it is missing here (tracked
    /// without a gap, or its gap replayed), for the verification of a loss.
    async fn on_one(&mut self, m: Message) -> bool {
        let host = self.host;
        let cfg = self.fleet.config();
        let now = host.now();
        let forget_after = cfg.heartbeat_interval.saturating_mul(FORGET_AFTER_HEARTBEATS);
        self.doubts.expire(now, forget_after);
        self.doubt_the_silent(now, forget_after);
        self.sync_doubt();
        if m.origin == cfg.origin {
            if m.seq > self.fleet.last_seq() {
                // A number we never used: not ours, and no proof that the backplane
                // delivers what we send.
                host.stats().suspicious_messages.incr();
                return false;
            }
            if let (false, Some(mark)) = (m.is_control(), self.fleet.heard_own(m.seq)) {
                host.own_settled(mark);
            }
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
                if !self.disconnected && self.verifying.is_none() {
                    let was_cut_off = host.health().unhealthy_since().is_some();
                    mark_healthy(host);
                    if was_cut_off {
                        self.cut_off_ended();
                    }
                }
            }
            return false;
        }
        if m.is_control() && self.left.contains_key(&m.origin) {
            return false;
        }
        // Heard again: if it falls silent again, that costs another flush.
        self.silent.remove(&m.origin);
        let Some(pos) = Position::of(&m, cfg.origin, self.fleet.last_seq()) else {
            // No live instance sends this. What it invalidates is dropped (once too
            // often is safe, once too few is not); nothing else is believed: no
            // sequence number, no sign of life, no acknowledgement.
            host.stats().suspicious_messages.incr();
            self.apply(&m.body, None);
            return false;
        };
        // An acknowledgement addressed to us, or a reload, may travel apart from the
        // origin's messages (its own channel), so it can arrive before the invalidation
        // it follows: its sequence number says nothing about what we missed.
        let apart = matches!(m.body, MessageBody::Ack { .. } | MessageBody::Reload { .. });
        // A late duplicate is applied again, but is not the key's latest word.
        let cause = self.origins.is_new(m.origin, m.seq).then_some((m.origin, m.seq));
        let tracked = if apart {
            super::sequence::Tracked { missed: None, suspicious: false }
        } else {
            self.origins.track(m.origin, pos, now)
        };
        if tracked.suspicious {
            host.stats().suspicious_messages.incr();
        }
        if cfg.strong {
            let acked = match m.body {
                MessageBody::Ack { to, seq } if to == cfg.origin => Some(seq),
                _ => None,
            };
            self.fleet.members().heard(m.origin, now, acked);
        }
        match &m.body {
            MessageBody::Heartbeat | MessageBody::BufferedHeartbeat => {
                host.stats().heartbeats_received.incr()
            }
            MessageBody::Ack { .. }
            | MessageBody::Digest(_)
            | MessageBody::Leave
            | MessageBody::Reload { .. } => {}
            body => {
                host.stats().invalidations_received.incr();
                // Applying an invalidation twice is harmless, so apply before any repair.
                self.apply(body, cause);
                record_lag(&cfg.namespace, m.sent_at_ms);
            }
        }
        let mut in_order = !apart && !tracked.suspicious;
        if let Some((from, to)) = tracked.missed {
            in_order &= self.repair(m.origin, from, to).await;
        }
        if let MessageBody::Reload { key, after, entry } = &m.body {
            host.apply_reload(key, *after, entry);
        }
        if m.body == MessageBody::Leave {
            // Closed before it said so: at the Strong level no write waits for it any
            // more, whatever it sent before (a gap in it was repaired above, or flushed).
            if cfg.strong {
                self.fleet.members().forget(m.origin);
            }
            self.left.insert(m.origin, now);
        }
        if !cfg.strong {
            match m.body {
                MessageBody::BufferedHeartbeat => self.doubts.doubt(m.origin, now),
                // Whatever it sent before is repaired above: nothing of its is missing.
                MessageBody::Leave if in_order => {
                    self.doubts.forget(m.origin);
                    self.origins.forget(m.origin);
                }
                _ => self.doubts.heard(m.origin, now, m.body == MessageBody::Heartbeat),
            }
            self.sync_doubt();
        }
        if cfg.strong && !m.is_control() {
            // Even for a number not believed yet: its repair ran above.
            self.owe_ack(m.origin, m.seq);
        }
        self.origins.prune(now, forget_after);
        in_order
    }

    /// This instance heard nothing for a while (an unhealthy spell, a lost or new
    /// subscription): any member may have buffered an L2 delete meanwhile, and said so
    /// in heartbeats it missed. Below the Strong level (which bypasses the cache
    /// instead), it doubts every member it knows until each has spoken again.
    fn cut_off_ended(&mut self) {
        if self.fleet.config().strong {
            return;
        }
        self.doubts.doubt_all(self.origins.heard());
        self.sync_doubt();
    }

    /// Below the Strong level, doubts the members that fell silent while this instance
    /// hears the backplane (see `doubt`); looked at once per heartbeat interval. After
    /// a pause of its own (its subscription, a paused server) it waits as long again:
    /// the others' beats had no way to reach it.
    fn doubt_the_silent(&mut self, now: Timestamp, forget_after: Duration) {
        let cfg = self.fleet.config();
        if self.disconnected || now.since(self.silence_checked) < cfg.heartbeat_interval {
            return;
        }
        self.silence_checked = now;
        self.left.retain(|_, at| now.since(*at) < forget_after);
        if cfg.strong {
            // Leases stand for liveness there.
            return;
        }
        self.silent.retain(|_, at| now.since(*at) < forget_after);
        let silent_after =
            cfg.heartbeat_interval.saturating_mul(SILENT_AFTER_HEARTBEATS).max(SILENT_AFTER_AT_LEAST);
        // Not those already forgotten (kept in `origins` until there are many).
        let hearing_since = self.hearing_since;
        let fallen: Vec<_> = self
            .origins
            .heard()
            .filter(|(origin, at)| {
                now.since((*at).max(hearing_since)) >= silent_after
                    && now.since(*at) < forget_after
                    && !self.silent.contains_key(origin)
            })
            .collect();
        let new = fallen.len();
        self.silent.extend(fallen.iter().copied());
        self.doubts.doubt_all(fallen.into_iter());
        if new > 0 {
            // A copy its lost message would have dropped may be of a key nobody reads
            // while the doubt lasts, and be served again once it is forgotten: gone now.
            // Later deletes of a member still alive are what the doubt covers.
            self.host.stats().members_silent.add(new as u64);
            self.host.stats().repairs_flushed.incr();
            self.flush();
            tracing::warn!(
                namespace = %cfg.namespace,
                members = new,
                "backplane: member(s) silent for {SILENT_AFTER_HEARTBEATS} heartbeat intervals (at least 1 s) without \
                 leaving; L1 flushed, and entries older than max_stale are not trusted until they speak \
                 again or are forgotten"
            );
        }
    }

    /// Publishes the doubt to the read path.
    fn sync_doubt(&self) {
        if self.host.health().set_doubted(self.doubts.any()) {
            self.host.health_changed();
        }
    }

    /// Strong level: `origin`'s messages up to `seq` are applied here (repairs included,
    /// since they ran before this). Acknowledgements are cumulative, so the ones owed
    /// wait until the subscription holds no further event: a member that fell behind
    /// and reads a burst answers each origin once for it, not once per message (one
    /// `XADD` each on Redis), which is what let it fall further behind.
    fn owe_ack(&mut self, origin: OriginId, seq: u64) {
        let owed = self.owed.entry(origin).or_insert(seq);
        *owed = (*owed).max(seq);
        self.owed_messages += 1;
    }

    /// Sends the acknowledgements owed.
    async fn send_owed(&mut self) {
        self.owed_messages = 0;
        for (origin, seq) in std::mem::take(&mut self.owed) {
            if let Err(e) = self.fleet.send_ack(origin, seq, self.host.stats()).await {
                // The origin waits until our lease lapses instead; by then we serve no L1.
                tracing::warn!(error = %e, origin, seq, "acknowledgement not sent");
            }
        }
    }

    /// Repairs a gap: replays `from..=to` where the backplane can (true), else flushes.
    async fn repair(&mut self, origin: OriginId, from: u64, to: u64) -> bool {
        let host = self.host;
        let cfg = self.fleet.config();
        host.stats().gaps_detected.incr();
        let replay = if to.checked_sub(from).is_some_and(|n| n < MAX_REPLAY) {
            tokio::time::timeout(cfg.timeout, self.fleet.backplane().replay(origin, from, to))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        } else {
            None
        };
        // A replay is believed only if it is exactly what was asked for.
        let replay = replay.filter(|messages| {
            let covers = replay_covers(messages, origin, &cfg.namespace, from, to);
            if !covers {
                host.stats().suspicious_messages.incr();
            }
            covers
        });
        let replayed = match replay {
            Some(messages) => {
                for m in &messages {
                    // No cause: applied after the message that revealed the gap, a
                    // replayed one must not pass for the key's latest word.
                    self.apply(&m.body, None);
                }
                host.stats().repairs_replayed.incr();
                true
            }
            None => {
                host.stats().repairs_flushed.incr();
                self.flush();
                false
            }
        };
        tracing::info!(namespace = %cfg.namespace, origin, from, to, "backplane gap repaired");
        replayed
    }

    /// Applies what a message asks (only invalidations and, at Strong, bypasses do).
    fn apply(&self, body: &MessageBody, cause: Option<Cause>) {
        match body {
            MessageBody::Invalidate(scope) => self.host.apply_remote(scope, cause),
            MessageBody::Bypass if self.fleet.config().strong => self.host.bypass(),
            _ => {}
        }
    }
}

/// Waits until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Publish → applied here, as `strata_invalidation_lag_seconds`: measured across the
/// sender's and this machine's wall clocks, so only as exact as they agree. A send time
/// in the future (skew) counts as no lag, and as `strata_invalidation_lag_skewed_total`.
fn record_lag(namespace: &str, sent_at_ms: u64) {
    if sent_at_ms == 0 {
        return; // a format-2 sender: no send time
    }
    let now = crate::backplane::now_ms();
    if now < sent_at_ms {
        metrics::counter!("strata_invalidation_lag_skewed_total", "namespace" => namespace.to_owned())
            .increment(1);
    }
    let lag = now.saturating_sub(sent_at_ms) as f64 / 1000.0;
    metrics::histogram!("strata_invalidation_lag_seconds", "namespace" => namespace.to_owned()).record(lag);
}
