//! The invalidation algorithm, written once for every [`Scope`]: drop the local
//! copies, invalidate L2, tell the fleet, run the hooks; and what happens when L2 or
//! the backplane fails (buffer and retry; at the Strong level, bypass the cache until
//! L2 is clean).

use std::sync::atomic::Ordering;

use super::pending::Pending;
use super::state::Inner;
use crate::backplane::MessageBody;
use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind, Result};
use crate::fleet::{Attempt, NotSent};
use crate::key::{CacheKey, CacheValue};
use crate::l1::{By, LoadStart};
use crate::scope::Scope;

/// What a [`Scope`]'s L2 invalidation is called in logs and errors.
fn l2_call_name(scope: &Scope) -> &'static str {
    match scope {
        Scope::Keys(_) => "delete",
        Scope::Tag(_) => "invalidate_tag",
        Scope::All => "invalidate_namespace",
    }
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Invalidates `scope` everywhere: the local copies (and the loads in flight), L2,
    /// the other instances (acknowledged at the Strong level), then the hooks. `typed`
    /// are the keys of a key scope when the caller has them (no parsing then).
    ///
    /// On an L2 or backplane failure the cache has already made itself safe when the
    /// error returns: the delete or message is buffered and retried, and at the Strong
    /// level the cache is bypassed until a namespace bump has cleaned L2.
    pub(crate) async fn invalidate(&self, scope: &Scope, typed: Option<&[K]>) -> Result<()> {
        if scope.is_empty() {
            return Ok(());
        }
        self.clean_l2_if_bypassed().await;
        self.drop_local(scope, typed, By::Own);
        let mut first_err = None;
        if let Some(l2) = &self.l2 {
            match l2.call(l2_call_name(scope), &self.stats, l2.tier().invalidate(l2.ns(), scope)).await {
                // A read here that reached L2 just before the delete may have put the old
                // value back in our L1 (we skip our own message): drop it once more.
                Ok(()) => {
                    self.drop_local(scope, typed, By::Own);
                }
                Err(e) => {
                    self.l2_invalidation_failed(scope, &e);
                    first_err = Some(e);
                }
            }
        }
        if let Err(e) = self.publish(MessageBody::Invalidate(scope.clone())).await {
            first_err.get_or_insert(e);
        }
        self.run_hooks(scope);
        first_err.map_or(Ok(()), Err)
    }

    /// Drops this instance's copies `scope` covers and keeps the loads in flight from
    /// storing what they read before: keys are tombstoned, tags and the namespace get a
    /// new epoch. `by` says who invalidated (see [`By`]). Returns how many keys of a key
    /// scope could not be parsed.
    pub(crate) fn drop_local(&self, scope: &Scope, typed: Option<&[K]>, by: By) -> u64 {
        if by == By::Own && !matches!(scope, Scope::Keys(_)) {
            // Keys are marked by `Guards::invalidate_key` itself.
            self.guards.own_invalidation();
        }
        match (scope, typed) {
            (Scope::Keys(_), Some(keys)) => {
                let now = self.now();
                for key in keys {
                    self.evict_key(key, now, by);
                }
                0
            }
            (Scope::Keys(keys), None) => {
                let now = self.now();
                let mut bad = 0;
                for k in keys {
                    match K::parse_key(k) {
                        Some(key) => self.evict_key(&key, now, by),
                        None => bad += 1,
                    }
                }
                bad
            }
            (Scope::Tag(tag), _) => {
                self.note_wide_invalidation();
                self.guards.invalidate_tag(tag);
                // Loads in flight may carry the tag; their fills are refused by the epoch
                // check, but new readers must not join them.
                self.flights.detach_all();
                0
            }
            (Scope::All, _) => {
                self.note_wide_invalidation();
                self.flush_l1();
                0
            }
        }
    }

    /// Only invalidations of a tag or the namespace count, not the flushes that repair
    /// a gap: those happen at every (re)subscription, and counting them would keep
    /// every load out of L1 for `write_lock_ttl` after each.
    fn note_wide_invalidation(&self) {
        self.wide_invalidated_at.fetch_max(self.now().as_nanos(), Ordering::SeqCst);
    }

    /// True when `key`, one of `tags` or the namespace was invalidated here at most
    /// `write_lock_ttl` before `start`: a load that began then may have read the
    /// database under a write lock whose writer has not committed yet (and may die
    /// before it releases the lock). Only asked about loads that ran without a fill
    /// token, so whose poisoning L2 could not tell.
    pub(crate) fn invalidated_recently(&self, key: &K, start: LoadStart) -> bool {
        let since = start.at.saturating_sub(self.cfg.write_lock_ttl);
        // A tag lock poisons every key (the tier cannot tell which values a load will
        // tag), and so does a namespace lock.
        let wide = self.wide_invalidated_at.load(Ordering::SeqCst);
        (wide != 0 && Timestamp(wide) >= since) || self.guards.tombstoned_since(key, since)
    }

    /// Drops `key`'s L1 entry under the fill guards' tombstone (L1 leaves one of its own
    /// in the entry's place, so that the key keeps its standing: see `L1::invalidate`).
    pub(crate) fn evict_key(&self, key: &K, now: Timestamp, by: By) {
        self.guards.invalidate_key(key, now, by, || {
            self.flights.detach(key);
            self.l1.invalidate(key)
        });
    }

    /// Drops everything local and refuses every fill in flight.
    pub(crate) fn flush_l1(&self) {
        self.guards.invalidate_all();
        self.publish_fast_floor();
        self.flights.detach_all();
        self.l1.clear();
    }

    /// An L2 invalidation failed: make the cache safe, then remember to retry.
    pub(crate) fn l2_invalidation_failed(&self, scope: &Scope, err: &Error) {
        self.stats.invalidations_buffered.incr();
        self.pending.lock().add_l2(scope);
        if self.cfg.is_strong() {
            self.start_bypass();
        }
        tracing::warn!(error = %err, namespace = %self.cfg.namespace, scope = %scope.describe(), "l2 invalidation failed; buffered for retry");
    }

    /// Strong level: L2 may still hold what should be gone. Trust no tier until the
    /// namespace bump that cleans it succeeds: every read goes to the loader meanwhile.
    pub(crate) fn start_bypass(&self) {
        self.pending.lock().add_l2(&Scope::All);
        self.bypassed.store(true, Ordering::SeqCst);
        if let Some(l2) = &self.l2 {
            l2.breaker().force_open();
        }
        self.flush_l1();
    }

    /// Strong level: before an invalidation goes out while the cache is bypassed, tries
    /// to make L2 clean first (the namespace bump of [`Inner::retry_pending`], past the
    /// breaker). Otherwise the forced-open breaker skips this invalidation's L2 delete
    /// while its message still reaches the fleet, whose instances then refill their
    /// L1s from the entries the failed deletes left in L2, until the retry task's next
    /// attempt (up to 2 s later) even though L2 is reachable again.
    pub(crate) async fn clean_l2_if_bypassed(&self) {
        if self.cfg.is_strong() && self.is_bypassed() {
            self.retry_pending().await;
        }
    }

    /// Publishes one invalidation message with the next sequence number; at the Strong
    /// level, then waits for the fleet's acknowledgements.
    pub(crate) async fn publish(&self, body: MessageBody) -> Result<()> {
        let Some(fleet) = &self.fleet else { return Ok(()) };
        let strong = self.cfg.is_strong();
        if strong && self.is_bypassed() {
            // Our L2 delete failed, so L2 may still hold what this message invalidates:
            // every member must bypass the cache before it drops its L1 copy, or it would
            // read the old value straight back. Sent first; acknowledged with the message.
            self.publish_or_buffer(MessageBody::Bypass).await?;
        }
        let seq = self.publish_or_buffer(body).await?;
        if strong {
            if self.is_closed() {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    "invalidation published, but a closed cache cannot wait for the fleet's acknowledgements",
                ));
            }
            fleet.wait_for_acks(seq, || self.now()).await?;
        }
        Ok(())
    }

    /// Publishes one message. One that fails, or is refused because the backplane is
    /// known down or the publisher is stuck behind a hanging publish, stays in the
    /// fleet's outbox, which publishes it in its turn (or gives its number up, a gap
    /// the receivers repair by a flush); one that could not even be queued is buffered
    /// for the retry task. Either way this returns within [`Attempt::FailFast`]'s
    /// bounds, not after an outage.
    async fn publish_or_buffer(&self, body: MessageBody) -> Result<u64> {
        let Some(fleet) = &self.fleet else { return Ok(0) };
        match fleet.send(&body, &self.stats, Attempt::FailFast, self.guards.mark()).await {
            Ok(seq) => Ok(seq),
            Err(NotSent { error, queued: true }) => {
                tracing::debug!(error = %error, namespace = %self.cfg.namespace, "message not published yet; it stays queued, in order");
                Err(error.into_queued())
            }
            Err(NotSent { error, queued: false }) => {
                self.stats.invalidations_buffered.incr();
                self.buffer_messages(|p| p.push_message(body));
                // The fleet logs the failure that opened its breaker; the refusals that
                // follow would log once per invalidation of the outage.
                tracing::debug!(error = %error, namespace = %self.cfg.namespace, "message not published; buffered for retry");
                Err(error)
            }
        }
    }

    /// Changes the buffered messages with `change`, which returns true when the buffer
    /// had to be collapsed into a namespace invalidation: counted and logged here.
    fn buffer_messages(&self, change: impl FnOnce(&mut Pending) -> bool) {
        if change(&mut self.pending.lock()) {
            self.stats.pending_collapsed.incr();
            tracing::warn!(namespace = %self.cfg.namespace,
                "too many invalidations buffered; replaced by one of the whole namespace");
        }
    }

    pub(crate) fn run_hooks(&self, scope: &Scope) {
        for hook in &self.cfg.hooks {
            hook(scope);
        }
    }

    /// Retries buffered invalidations: L2 first (so a reader woken by the message cannot
    /// refill from a stale L2 entry), then messages.
    ///
    /// The L2 calls go past this instance's L2 breaker (bounded by the L2 timeout): the
    /// breaker guards the read path, and a cool-down that outlasts the outage kept the
    /// delete waiting while the other instances, whose breakers had closed, read the
    /// old row back from L2 (2.9 s after Redis was back, in a `strata check` run). The
    /// retry task calls this every few hundred milliseconds, so the first call after
    /// Redis answers again applies the buffer.
    pub(crate) async fn retry_pending(&self) {
        let scopes = {
            let mut p = self.pending.lock();
            if p.is_empty() {
                return;
            }
            let scopes = p.take_l2();
            p.l2_in_flight += scopes.len();
            scopes
        };
        let taken = scopes.len();
        let applied = self.retry_l2(&scopes).await;
        {
            let mut p = self.pending.lock();
            for s in &scopes[applied..] {
                p.add_l2(s);
            }
            if applied == scopes.len() && self.l2.is_some() {
                // L2 is clean only now. Until now any instance, this one included, could
                // read the old value back from L2 into its L1 after the first message
                // evicted it (or a fill that predates the invalidation could reach L2
                // before the delete did). So drop such copies (below), and tell the
                // fleet again: queued before the in-flight count drops, so that the
                // buffer never looks empty in between.
                for scope in &scopes {
                    if p.push_message(MessageBody::Invalidate(scope.clone())) {
                        self.stats.pending_collapsed.incr();
                    }
                }
            }
            p.l2_in_flight -= taken;
        }
        if applied < scopes.len() {
            return;
        }
        if self.l2.is_some() {
            self.retry_unlocks().await;
            for scope in &scopes {
                self.drop_local(scope, None, By::Own);
            }
        }
        let Some(fleet) = &self.fleet else {
            self.pending.lock().clear_messages();
            return;
        };
        let messages = {
            let mut p = self.pending.lock();
            let messages = p.take_messages();
            p.messages_in_flight += messages.len();
            messages
        };
        let taken = messages.len();
        let mut iter = messages.into_iter();
        while let Some(body) = iter.next() {
            // A probe: the first of these to succeed is what tells callers the
            // backplane is back.
            if let Err(not_sent) = fleet.send(&body, &self.stats, Attempt::Probe, self.guards.mark()).await {
                // One still in the outbox goes out from there; the ones after it were
                // not tried.
                let again = (!not_sent.queued).then_some(body);
                self.buffer_messages(|p| {
                    p.messages_in_flight -= taken;
                    p.requeue_messages(again.into_iter().chain(iter))
                });
                return;
            }
        }
        self.pending.lock().messages_in_flight -= taken;
    }

    /// The L2 part of [`Inner::retry_pending`]: applies `scopes` in order, past the
    /// breaker, and returns how many were applied (all of them without a tier).
    async fn retry_l2(&self, scopes: &[Scope]) -> usize {
        let Some(l2) = &self.l2 else { return scopes.len() };
        for (i, scope) in scopes.iter().enumerate() {
            let call = l2.tier().invalidate(l2.ns(), scope);
            if l2.call_past_breaker(l2_call_name(scope), &self.stats, call).await.is_err() {
                return i;
            }
            if *scope == Scope::All {
                l2.reset_if_forced_open();
                if self.bypassed.swap(false, Ordering::SeqCst) {
                    // L2 is clean now; what L1 held was flushed when we began to bypass.
                    self.flush_l1();
                    tracing::info!(namespace = %self.cfg.namespace, "l2 cleaned by a namespace bump; cache no longer bypassed");
                }
            }
        }
        scopes.len()
    }

    /// Releases the write locks whose release failed (past the breaker, like the
    /// namespace bump).
    async fn retry_unlocks(&self) {
        let Some(l2) = &self.l2 else { return };
        let unlocks = std::mem::take(&mut self.pending.lock().unlocks);
        for (i, (scope, id)) in unlocks.iter().enumerate() {
            let res =
                l2.call_past_breaker("unlock", &self.stats, l2.tier().unlock(l2.ns(), scope, *id)).await;
            if res.is_err() {
                self.pending.lock().unlocks.extend(unlocks[i..].iter().cloned());
                break;
            }
        }
    }
}
