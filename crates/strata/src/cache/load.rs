//! Loads: one flight per key (L2 with the fleet's load lease, then the loader with
//! soft and hard timeouts, then guarded fills of both tiers), fail-safe, early refresh,
//! and the batch load of `get_or_load_many`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::flight::{self, FinishOnDrop, FlightKind, Lead};
use super::state::Inner;
use crate::backplane::MessageBody;
use crate::clock::{ClockKind, Timestamp, duration_nanos};
use crate::error::{Error, Result};
use crate::key::{CacheKey, CacheValue};
use crate::l1::{Entry, LoadStart};
use crate::loader::BoxError;
use crate::tier::{Envelope, FillOutcome, FillToken, Lookup};

/// How a loaded value L2 did not take goes into L1 (see `Inner::l1_admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L1Admission {
    /// For its TTL.
    Full,
    /// For `max_stale` at most.
    Brief,
    /// Not at all.
    Refused,
}

/// One key being loaded: what every step of a flight needs to know about it.
pub(crate) struct Loading<K> {
    pub(crate) key: K,
    pub(crate) key_str: String,
    pub(crate) start: LoadStart,
}

/// One poll in this many, while a waiter waits for another instance's fill, also asks
/// for the lease (see `Inner::wait_for_fleet_fill`): a released or expired lease is
/// taken over within this many polls (at most 80 ms once the polls are 20 ms apart).
const FULL_POLL_EVERY: u32 = 4;

impl<K: CacheKey> Loading<K> {
    pub(crate) fn new(key: K, start: LoadStart) -> Self {
        Loading { key_str: key.to_key_string(), key, start }
    }
}

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Starts a flight for `key` on its own task (so that a caller that gives up does
    /// not cancel it for the others).
    pub(crate) fn spawn_flight<F, Fut, E>(
        self: &Arc<Self>,
        key: &K,
        lead: Lead<V>,
        loader: F,
        stale: Option<Entry<V>>,
        kind: FlightKind,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        if matches!(kind, FlightKind::Refresh(_)) {
            self.stats.early_refreshes.incr();
        }
        let inner = self.clone();
        let key = key.clone();
        tokio::spawn(async move { inner.run_flight(key, lead, loader, stale, kind).await });
    }

    /// XFetch decided on a refresh of a copy fresh until `fresh_until`: starts one
    /// unless a load of `key` is running.
    pub(crate) fn spawn_refresh<F, Fut, E>(self: &Arc<Self>, key: &K, fresh_until: Timestamp, loader: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        if self.flights.is_running(key) {
            return;
        }
        if let (_, Some(lead)) = self.flights.join_or_lead(key) {
            self.spawn_flight(key, lead, loader, None, FlightKind::Refresh(fresh_until));
        }
    }

    /// One load: L2 (with the fleet lease), then the loader, then guarded fills.
    async fn run_flight<F, Fut, E>(
        self: Arc<Self>,
        key: K,
        lead: Lead<V>,
        loader: F,
        stale_l1: Option<Entry<V>>,
        kind: FlightKind,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let _finish = FinishOnDrop { flights: &self.flights, key: &key, id: lead.id };
        let tx = lead.tx;
        let loading = Loading::new(key.clone(), self.guards.start(self.now()));
        if kind == FlightKind::Read {
            self.stats.misses.incr();
        }

        // L2, and the fleet-wide lease.
        let (token, stale_l2) = match self.read_l2_for_load(&loading, kind).await {
            Ok(value) => {
                // Forgotten before answering: a read that starts once the answer is out
                // must not join a flight that is over (it would get this value, read
                // before whatever committed since, while other readers already see it).
                self.flights.finish(&key, lead.id);
                let _ = tx.send(Some(Ok(value)));
                return;
            }
            Err(t) => t,
        };
        if token.as_ref().is_some_and(FillToken::is_poisoned) {
            // A write lock covers the key: its commit may land while this load runs, and
            // a read that starts after it must load for itself, not join a load that
            // may have read the row before it.
            self.flights.finish(&key, lead.id);
        }

        let fallback = self.fail_safe_copy(stale_l1, stale_l2, &loading).await;
        let soft = match (self.cfg.soft_timeout, &fallback) {
            (Some(soft), Some(copy)) if kind == FlightKind::Read => {
                let (copy, tx, stats) = (copy.value.clone(), &tx, &self.stats);
                let answer: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
                    // Answer now with the copy; the load finishes for the next readers.
                    stats.stale_served.incr();
                    let _ = tx.send(Some(Ok(copy)));
                });
                Some((soft, answer))
            }
            _ => None,
        };
        let mut push = None;
        let result = match self.call_loader(self.load_one(&loading.key_str, loader()), soft).await {
            Ok((value, load_nanos)) => {
                push = self.store_loaded(&loading, value.clone(), token.as_ref(), load_nanos).await;
                Ok(value)
            }
            Err(e) => {
                self.release_lease(&loading.key_str, token.as_ref()).await;
                Err(e)
            }
        };
        let result = match (result, fallback) {
            (Err(e), Some(copy)) => {
                tracing::debug!(error = %e, key = %loading.key_str, "load failed; serving the fail-safe copy");
                self.rearm(&loading, copy)
            }
            (r, _) => r,
        };
        self.flights.finish(&key, lead.id);
        flight::complete(&tx, result);
        if let Some(body) = push {
            self.push_reload(body).await;
        }
    }

    /// The L2 part of a load: `Ok` with the value when L2 (or the lease holder's fill)
    /// answered; else the token to fill with and the fail-safe copy L2 offered.
    async fn read_l2_for_load(
        &self,
        loading: &Loading<K>,
        kind: FlightKind,
    ) -> std::result::Result<Option<V>, (Option<FillToken>, Option<Envelope>)> {
        let Some(l2) = &self.l2 else { return Err((None, None)) };
        let key_str = &loading.key_str;
        if let FlightKind::Refresh(fresh_until) = kind {
            let lookup = l2.call("lookup", &self.stats, l2.tier().lookup(l2.ns(), key_str, None)).await;
            return match lookup {
                Ok(Lookup::Miss { token, .. }) => Err((Some(token), None)),
                Ok(Lookup::Hit(env)) => {
                    // An entry fresh for longer than our copy: another instance refreshed
                    // it already (or L1's TTL is the shorter one). Taken instead of a load,
                    // so that a fleet whose copies near expiry together loads about once.
                    let token = FillToken { stamp: env.stamp, lease: None, leader: true };
                    if env.soft_expiry > fresh_until
                        && let Some(value) = self.fill_from_l2(loading, env).await
                    {
                        self.stats.early_refreshes_from_l2.incr();
                        return Ok(value);
                    }
                    // As old as our copy, or not one we can serve (another schema,
                    // distrusted): loaded anew, and replaced for the fleet too. A token from
                    // the entry's stamp is as safe as the lookup's (see `replacement_token`).
                    Err((Some(token), None))
                }
                Err(_) => Err((None, None)),
            };
        }
        let lease = Some(self.cfg.hard_timeout);
        match l2.call("lookup", &self.stats, l2.tier().lookup(l2.ns(), key_str, lease)).await {
            Ok(Lookup::Hit(env)) => {
                let replace = self.replacement_token(key_str, &env);
                if let Some(value) = self.fill_from_l2(loading, env).await {
                    return Ok(value);
                }
                if replace.is_some() {
                    // Another schema's entry: load, and let the fill replace it.
                    return Err((replace, None));
                }
                // Undecodable and deleted: ask again for a token to fill with.
                match l2.call("lookup", &self.stats, l2.tier().lookup(l2.ns(), key_str, lease)).await {
                    Ok(Lookup::Miss { token, .. }) => Err((Some(token), None)),
                    _ => Err((None, None)),
                }
            }
            Ok(Lookup::Miss { token, stale }) if !token.leader => {
                match self.wait_for_fleet_fill(loading, token).await {
                    Ok(value) => Ok(value),
                    Err(token) => Err((token, stale)),
                }
            }
            Ok(Lookup::Miss { token, stale }) => Err((Some(token), stale)),
            Err(_) => Err((None, None)),
        }
    }

    /// An L2 hit: decoded into L1; `None` when undecodable (deleted and counted).
    /// An entry this instance does not trust ([`Inner::l2_distrusts`]) is `None` too,
    /// and left in place for the load's fill to replace.
    pub(crate) async fn fill_from_l2(&self, loading: &Loading<K>, env: Envelope) -> Option<Option<V>> {
        if self.l2_distrusts(&loading.key_str, &env) {
            self.stats.l2_distrusted.incr();
            return None;
        }
        let entry = self.entry_from_envelope(&loading.key_str, env, loading.start).await?;
        self.stats.l2_hits.incr();
        self.record_hit_age("l2", entry.meta.created(), self.now());
        let value = entry.value.clone();
        self.fill_l1(&loading.key, entry, loading.start);
        Some(value)
    }

    /// Runs a load under the hard timeout and returns its output with the time it
    /// took; past the soft timeout (when given) `on_soft_timeout` runs once and the load
    /// goes on.
    pub(crate) async fn call_loader<T, Fut, E>(
        &self,
        load: Fut,
        soft: Option<(Duration, Box<dyn FnOnce() + Send + '_>)>,
    ) -> Result<(T, u64)>
    where
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<BoxError>,
    {
        let hard = self.cfg.hard_timeout;
        let timed = async {
            self.stats.loads.incr();
            let began = (std::time::Instant::now(), self.now());
            (tokio::time::timeout(hard, load).await, began)
        };
        // The load limits and the loader breaker (see `gate`); waiting for a permit
        // counts towards the soft timeout, so a stale copy is served meanwhile.
        let load = self.gate.admitted(&self.stats, timed, |(r, _)| matches!(r, Ok(Ok(_))));
        tokio::pin!(load);
        let outcome = match soft {
            Some((soft, on_soft_timeout)) => {
                tokio::select! {
                    r = &mut load => r,
                    _ = tokio::time::sleep(soft) => {
                        on_soft_timeout();
                        load.await
                    }
                }
            }
            None => load.await,
        };
        let (outcome, (began, began_at)) = outcome?;
        // Converted here: the loader's error type need not be Send.
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => {
                self.stats.load_errors.incr();
                return Err(Error::loader(e));
            }
            Err(_) => {
                self.stats.load_timeouts.incr();
                return Err(Error::timeout("loader", hard));
            }
        };
        // Δ for XFetch: precise for the system clock (its hit-path reading is coarse),
        // the injected clock's view otherwise.
        let took = match self.clock.kind() {
            ClockKind::System(_) => began.elapsed(),
            ClockKind::Custom(_) => self.now().since(began_at),
        };
        metrics::histogram!("strata_load_duration_seconds", "namespace" => self.cfg.namespace.clone())
            .record(took.as_secs_f64());
        Ok((value, duration_nanos(took).max(1)))
    }

    /// Reads through to the loader without caching (the bypassed cache's reads).
    pub(crate) async fn load_direct<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let key_str = key.to_key_string();
        self.call_loader(self.load_one(&key_str, loader()), None).await.map(|(value, _)| value)
    }

    /// Serves a fail-safe copy and re-arms it for the throttle period so that the next
    /// reads do not hammer a failing loader.
    pub(crate) fn rearm(&self, loading: &Loading<K>, mut copy: Entry<V>) -> Result<Option<V>> {
        let now = self.now();
        self.stats.stale_served.incr();
        let usable_until = copy.meta.usable_until();
        copy.meta.set_fresh_until(now.saturating_add(self.cfg.fail_safe_throttle).min(usable_until.max(now)));
        copy.meta.mark_stale_copy();
        copy.meta.disable_early_refresh();
        let start = LoadStart { seq: copy.meta.fill_seq.min(loading.start.seq), at: loading.start.at };
        let value = copy.value.clone();
        self.fill_l1(&loading.key, copy, start);
        Ok(value)
    }

    /// Stores a loaded value: in L2 through the token's guarded fill, then in L1.
    /// Returns the reload to push to the fleet, if any (see `reload.rs`).
    pub(crate) async fn store_loaded(
        &self,
        loading: &Loading<K>,
        value: Option<V>,
        token: Option<&FillToken>,
        load_nanos: u64,
    ) -> Option<MessageBody> {
        let key_str = &loading.key_str;
        if value.is_none() && self.cfg.negative_ttl.is_none() {
            self.release_lease(key_str, token).await;
            return None;
        }
        let now = self.now();
        let tags = value.as_ref().and_then(|v| self.tags_of(&loading.key, v));
        let mut filled = false;
        let mut stored_in_l2 = false;
        let mut pushable = None;
        // The token of a fill an invalidation refused (see `rejected_admission`).
        let mut refused: Option<&FillToken> = None;
        if let (Some(l2), Some(token)) = (&self.l2, token)
            && !self.pending.lock().covers(key_str, tags.as_deref().map_or(&[], Vec::as_slice))
        {
            let encoded = match &value {
                Some(v) => match self.encode_checked(v) {
                    Ok(b) => Some(Some(b)),
                    Err(e) => {
                        tracing::debug!(error = %e, key = key_str, "value kept out of l2");
                        None
                    }
                },
                None => Some(None),
            };
            if let Some(bytes) = encoded {
                filled = true;
                let env =
                    self.make_envelope(bytes, self.version_of(value.as_ref()), now, load_nanos, tags.clone());
                let ttl = self.l2_store_ttl(&env, now);
                pushable = self.pushable(&env);
                match l2.call("fill", &self.stats, l2.tier().fill(l2.ns(), key_str, env, ttl, token)).await {
                    Ok(FillOutcome::Rejected) => {
                        // An invalidation (maybe from another instance, not yet heard of
                        // here) overtook this load.
                        self.stats.fills_rejected.incr();
                        refused = Some(token);
                    }
                    Ok(FillOutcome::Superseded) => {
                        // L2 holds a newer version, which no invalidation will replace:
                        // this one must not reach L1 either.
                        self.stats.fills_rejected.incr();
                        return None;
                    }
                    Ok(FillOutcome::Stored) => stored_in_l2 = true,
                    Err(_) => {}
                }
            }
        }
        if !filled {
            self.release_lease(key_str, token).await;
        }
        let admission = if stored_in_l2 {
            L1Admission::Full
        } else if let Some(token) = refused {
            self.rejected_admission(token)
        } else {
            self.l1_admission(loading, token)
        };
        if admission == L1Admission::Refused {
            self.stats.l1_fills_skipped.incr();
            return None;
        }
        let mut entry = self.make_entry(value, now, load_nanos, loading.start, tags);
        if admission == L1Admission::Brief {
            entry.meta.cap_life(now.saturating_add(self.cfg.max_stale));
            self.stats.l1_fills_shortened.incr();
        }
        // Pushed only what L2 took, loaded after a remote invalidation this instance had
        // applied (what the L1 guard found under its lock).
        let after = self.fill_l1_after(&loading.key, entry, loading.start)??;
        let env = pushable.filter(|_| stored_in_l2)?;
        Some(Self::reload_message(key_str, after, env))
    }

    /// How a value L2 did not take goes into L1. It may have been read under a write
    /// lock, before a write that commits after the load, and L1 would serve it after the
    /// commit until its TTL if the writer died before releasing the lock (no second
    /// invalidation would follow). At the Strong level L1 holds only what L2 returned or
    /// accepted; at the others a poisoned token says a lock covered the key (refused),
    /// and without a token (L2 failed) a recent invalidation of the key, a tag or the
    /// namespace stands in for the lock L2 could not report: kept for `max_stale` at
    /// most, which bounds it if the writer dies before its release (refusing it instead
    /// sent every read of the keys written lately, the hot ones, to the database for as
    /// long as L2 failed).
    fn l1_admission(&self, loading: &Loading<K>, token: Option<&FillToken>) -> L1Admission {
        if self.cfg.is_strong() {
            return L1Admission::Refused;
        }
        match token {
            Some(token) if token.is_poisoned() => L1Admission::Refused,
            None if self.l2.is_some() && self.invalidated_recently(&loading.key, loading.start) => {
                L1Admission::Brief
            }
            _ => L1Admission::Full,
        }
    }

    /// How a value whose L2 fill was refused goes into L1: for `max_stale` at most, as a
    /// value L2 could not take at all (see [`Self::l1_admission`]), but never at the
    /// Strong level or under a write lock.
    ///
    /// An invalidation heard here since the load began refuses it in `fill_l1` (the L1
    /// guard); one not heard yet drops it when it arrives, within the propagation
    /// delay, like any L1 copy; one that never arrives (its writer died between its L2
    /// delete and its broadcast) is what the `max_stale` cap bounds. Keeping such values
    /// out of L1 altogether made a key written more often than it loads uncacheable:
    /// each load's fill was refused by the write that came during it, so every read
    /// loaded again. That is what an overloaded database does to the hot keys (the
    /// most written ones), and the loads it added kept the database overloaded (50
    /// instances over one Redis at 20,000 req/s: up to 38,700 fills refused, 4–7× the
    /// compulsory database reads).
    fn rejected_admission(&self, token: &FillToken) -> L1Admission {
        if self.cfg.is_strong() || token.is_poisoned() { L1Admission::Refused } else { L1Admission::Brief }
    }

    /// Lets the instances waiting for our fill stop waiting when there will be none.
    async fn release_lease(&self, key_str: &str, token: Option<&FillToken>) {
        if let (Some(l2), Some(token)) = (&self.l2, token)
            && token.lease.is_some()
        {
            let _ =
                l2.call("release_lease", &self.stats, l2.tier().release_lease(l2.ns(), key_str, token)).await;
        }
    }

    /// Waits for the lease holder's fill; on success the value, else the token to fill
    /// with ourselves (from the last lookup, so it predates our load; `token`, the one
    /// that sent us waiting, until a poll brings a newer one).
    ///
    /// Every [`FULL_POLL_EVERY`]th poll, and the last, asks for the lease too: when the
    /// holder released it (its load failed, or it was told to stay out of L2) or it
    /// expired (the holder died), the first waiter to ask becomes the fleet's loader
    /// and the others go on waiting for its fill. Polls that never asked left every
    /// waiter polling until `lease_wait` and then loading, all of them, from the
    /// database that had just failed the holder's load. The polls between only
    /// [`Tier::peek`](crate::tier::Tier::peek) for the fill (over Redis a plain read,
    /// no script): a hot key's waiters poll while the whole fleet misses, which is when
    /// the server has least time to spare (50 instances starved of CPU: 15,054 waits in
    /// a 10 s run, each poll a lookup script).
    async fn wait_for_fleet_fill(
        &self,
        loading: &Loading<K>,
        token: FillToken,
    ) -> std::result::Result<Option<V>, Option<FillToken>> {
        let Some(l2) = &self.l2 else { return Err(Some(token)) };
        self.stats.lease_waits.incr();
        let now = tokio::time::Instant::now();
        // `lease_wait` is checked at build time; an unrepresentable deadline means no wait.
        let deadline = now.checked_add(self.cfg.lease_wait).unwrap_or(now);
        let mut pause = Duration::from_millis(1);
        let mut last = Some(token);
        let lease = Some(self.cfg.hard_timeout);
        let mut polls = 0u32;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
            polls += 1;
            let full =
                polls.is_multiple_of(FULL_POLL_EVERY) || tokio::time::Instant::now() + pause >= deadline;
            let answer = if full {
                l2.call("lookup", &self.stats, l2.tier().lookup(l2.ns(), &loading.key_str, lease)).await
            } else {
                match l2.call("peek", &self.stats, l2.tier().peek(l2.ns(), &loading.key_str)).await {
                    Ok(Some(env)) => Ok(Lookup::Hit(env)),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                }
            };
            match answer {
                Ok(Lookup::Hit(env)) => {
                    let replace = self.replacement_token(&loading.key_str, &env);
                    if let Some(value) = self.fill_from_l2(loading, env).await {
                        return Ok(value);
                    }
                    if replace.is_some() {
                        // Filled under another schema: waiting longer will not help.
                        return Err(replace);
                    }
                }
                Ok(Lookup::Miss { token, .. }) if token.leader => {
                    self.stats.lease_takeovers.incr();
                    return Err(Some(token));
                }
                Ok(Lookup::Miss { token, .. }) => last = Some(token),
                Err(_) => return Err(last),
            }
        }
        Err(last)
    }

    /// The copy fail-safe may serve if the load fails: L1's, else L2's stale entry.
    pub(crate) async fn fail_safe_copy(
        &self,
        stale_l1: Option<Entry<V>>,
        stale_l2: Option<Envelope>,
        loading: &Loading<K>,
    ) -> Option<Entry<V>> {
        self.cfg.fail_safe_max?;
        if let Some(e) = stale_l1 {
            return Some(e);
        }
        self.entry_from_envelope(&loading.key_str, stale_l2?, loading.start).await
    }
}
