//! [`InProcessQueue`]: the reference queue, in this process's memory.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::queue::{
    AckOutcome, DeadLetter, QueueLimits, QueueStats, QueuedSave, RetryOutcome, SaveOutcome, WriteBehindQueue,
};
use crate::clock::{Clock, SystemClock};
use crate::error::Result;

/// A write-behind queue in this process's memory: the reference implementation of
/// [`WriteBehindQueue`], for tests, the embedded `strata bench` and single-process use.
///
/// **It does not survive a crash**: every save not yet written to the database is lost
/// with the process, and other processes cannot see or flush it. Share one
/// `Arc<InProcessQueue>` between caches (as with
/// [`InProcessTier`](crate::InProcessTier)) to model a fleet inside one process. Use
/// `strata_redis::RedisWriteBehindQueue` for anything that must outlive a process.
pub struct InProcessQueue {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, Namespace>,
    /// The last sequence number handed out: sequences grow across keys and namespaces.
    last_seq: u64,
}

#[derive(Default)]
struct Namespace {
    records: HashMap<String, Record>,
    /// (when something must happen, key) for every record not dead: its due time, or
    /// its claim's end (a claim that runs out makes the key due).
    schedule: BTreeSet<(u64, String)>,
    bytes: u64,
    dead: Vec<DeadLetter>,
}

struct Record {
    value: Bytes,
    seq: u64,
    attempts: u32,
    dirty_since_ms: u64,
    /// When the first save after the current claim was made: what stays dirty once the
    /// claim's flush is acknowledged.
    redirtied_ms: Option<u64>,
    state: RecordState,
}

#[derive(Clone, PartialEq, Eq)]
enum RecordState {
    Due(u64),
    Claimed { owner: String, until: u64 },
    Dead,
}

impl Record {
    fn scheduled_at(&self) -> Option<u64> {
        match &self.state {
            RecordState::Due(at) => Some(*at),
            RecordState::Claimed { until, .. } => Some(*until),
            RecordState::Dead => None,
        }
    }
}

impl Namespace {
    fn set_state(&mut self, key: &str, state: RecordState) {
        let Some(rec) = self.records.get_mut(key) else { return };
        if let Some(at) = rec.scheduled_at() {
            self.schedule.remove(&(at, key.to_owned()));
        }
        rec.state = state;
        if let Some(at) = rec.scheduled_at() {
            self.schedule.insert((at, key.to_owned()));
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(rec) = self.records.remove(key) {
            if let Some(at) = rec.scheduled_at() {
                self.schedule.remove(&(at, key.to_owned()));
            }
            self.bytes = self.bytes.saturating_sub(rec.value.len() as u64);
        }
    }
}

impl Default for InProcessQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessQueue {
    /// An empty queue on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock::default()))
    }

    /// An empty queue on `clock` (a manual clock in tests: `strata::testing::ManualClock`).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        InProcessQueue { clock, state: Mutex::new(State::default()) }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now().as_millis()
    }

    fn next_seq(&self, state: &mut State) -> u64 {
        let now_us = self.clock.now().as_nanos() / 1_000;
        state.last_seq = now_us.max(state.last_seq.saturating_add(1));
        state.last_seq
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl WriteBehindQueue for InProcessQueue {
    fn name(&self) -> &str {
        "in-process"
    }

    async fn save(
        &self,
        ns: &str,
        key: &str,
        value: Bytes,
        delay: Duration,
        limits: QueueLimits,
    ) -> Result<SaveOutcome> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let seq = self.next_seq(&mut state);
        let n = state.namespaces.entry(ns.to_owned()).or_default();
        let old_len = n.records.get(key).map(|r| r.value.len() as u64);
        // Only a new key is refused: a save to a waiting key adds no key (its value may
        // grow the bytes past the bound by that value's growth).
        let full = n.records.len() as u64 >= limits.max_entries
            || n.bytes.saturating_add(value.len() as u64) > limits.max_bytes;
        if old_len.is_none() && full {
            return Ok(SaveOutcome::Full { seq });
        }
        n.bytes = n.bytes.saturating_add(value.len() as u64).saturating_sub(old_len.unwrap_or(0));
        let due = now.saturating_add(ms(delay));
        match n.records.get_mut(key) {
            Some(rec) => {
                let replaced = rec.state != RecordState::Dead;
                rec.value = value;
                rec.seq = seq;
                if matches!(rec.state, RecordState::Claimed { .. }) && rec.redirtied_ms.is_none() {
                    rec.redirtied_ms = Some(now);
                }
                if rec.state == RecordState::Dead {
                    // A new value for a dead-lettered key gets a fresh start.
                    rec.attempts = 0;
                    rec.dirty_since_ms = now;
                    n.dead.retain(|d| d.key != key);
                    n.set_state(key, RecordState::Due(due));
                }
                Ok(SaveOutcome::Queued { seq, replaced })
            }
            None => {
                n.records.insert(
                    key.to_owned(),
                    Record {
                        value,
                        seq,
                        attempts: 0,
                        dirty_since_ms: now,
                        redirtied_ms: None,
                        state: RecordState::Due(due),
                    },
                );
                n.schedule.insert((due, key.to_owned()));
                Ok(SaveOutcome::Queued { seq, replaced: false })
            }
        }
    }

    async fn pending_value(&self, ns: &str, key: &str) -> Result<Option<Bytes>> {
        let state = self.state.lock();
        Ok(state.namespaces.get(ns).and_then(|n| n.records.get(key)).map(|r| r.value.clone()))
    }

    async fn claim_due(&self, ns: &str, owner: &str, max: usize, lease: Duration) -> Result<Vec<QueuedSave>> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let Some(n) = state.namespaces.get_mut(ns) else { return Ok(Vec::new()) };
        let due: Vec<String> =
            n.schedule.iter().take_while(|(at, _)| *at <= now).take(max).map(|(_, k)| k.clone()).collect();
        let until = now.saturating_add(ms(lease));
        let mut out = Vec::with_capacity(due.len());
        for key in due {
            n.set_state(&key, RecordState::Claimed { owner: owner.to_owned(), until });
            if let Some(r) = n.records.get_mut(&key) {
                r.redirtied_ms = None;
                out.push(QueuedSave {
                    key,
                    value: r.value.clone(),
                    seq: r.seq,
                    attempts: r.attempts,
                    dirty_since_ms: r.dirty_since_ms,
                });
            }
        }
        Ok(out)
    }

    async fn ack(&self, ns: &str, key: &str, seq: u64) -> Result<AckOutcome> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let Some(n) = state.namespaces.get_mut(ns) else { return Ok(AckOutcome::Flushed) };
        match n.records.get_mut(key) {
            None => Ok(AckOutcome::Flushed),
            Some(r) if r.seq <= seq => {
                n.remove(key);
                Ok(AckOutcome::Flushed)
            }
            Some(r) => {
                // Saved again during the flush: what is left to write is the newer value,
                // dirty since that save.
                r.attempts = 0;
                r.dirty_since_ms = r.redirtied_ms.take().unwrap_or(now);
                if r.state != RecordState::Dead {
                    n.set_state(key, RecordState::Due(now));
                }
                Ok(AckOutcome::Newer)
            }
        }
    }

    async fn retry(
        &self,
        ns: &str,
        owner: &str,
        key: &str,
        seq: u64,
        backoff: Duration,
        error: &str,
        max_attempts: u32,
        permanent: bool,
    ) -> Result<RetryOutcome> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let Some(n) = state.namespaces.get_mut(ns) else { return Ok(RetryOutcome::NotClaimed) };
        let Some(r) = n.records.get_mut(key) else { return Ok(RetryOutcome::NotClaimed) };
        let mine = matches!(&r.state, RecordState::Claimed { owner: o, .. } if o == owner);
        if !mine {
            return Ok(RetryOutcome::NotClaimed);
        }
        if r.seq != seq {
            // Saved again during the failed write: the newer value is tried after the
            // back-off, its own attempts counted from zero.
            n.set_state(key, RecordState::Due(now.saturating_add(ms(backoff))));
            return Ok(RetryOutcome::NotClaimed);
        }
        r.attempts = r.attempts.saturating_add(1);
        let attempts = r.attempts;
        if permanent || attempts >= max_attempts {
            n.dead.push(DeadLetter {
                key: key.to_owned(),
                seq,
                attempts,
                error: error.to_owned(),
                at_ms: now,
            });
            n.set_state(key, RecordState::Dead);
            return Ok(RetryOutcome::DeadLettered { attempts });
        }
        n.set_state(key, RecordState::Due(now.saturating_add(ms(backoff))));
        Ok(RetryOutcome::Retrying { attempts })
    }

    async fn release(&self, ns: &str, owner: &str, key: &str) -> Result<()> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        if let Some(n) = state.namespaces.get_mut(ns) {
            let mine = n
                .records
                .get(key)
                .is_some_and(|r| matches!(&r.state, RecordState::Claimed { owner: o, .. } if o == owner));
            if mine {
                n.set_state(key, RecordState::Due(now));
            }
        }
        Ok(())
    }

    async fn make_due(&self, ns: &str, key: Option<&str>) -> Result<u64> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let Some(n) = state.namespaces.get_mut(ns) else { return Ok(0) };
        let keys: Vec<String> = match key {
            Some(k) => vec![k.to_owned()],
            None => n.records.keys().cloned().collect(),
        };
        let mut changed = 0;
        for k in keys {
            let later =
                n.records.get(&k).is_some_and(|r| matches!(r.state, RecordState::Due(at) if at > now));
            if later {
                n.set_state(&k, RecordState::Due(now));
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn stats(&self, ns: &str) -> Result<QueueStats> {
        let now_ms = self.now_ms();
        let state = self.state.lock();
        let Some(n) = state.namespaces.get(ns) else {
            return Ok(QueueStats { now_ms, ..QueueStats::default() });
        };
        let live = n.records.values().filter(|r| r.state != RecordState::Dead);
        let (mut pending, mut oldest) = (0u64, None::<u64>);
        for r in live {
            pending += 1;
            oldest = Some(oldest.map_or(r.dirty_since_ms, |o| o.min(r.dirty_since_ms)));
        }
        let dead_bytes: u64 =
            n.records.values().filter(|r| r.state == RecordState::Dead).map(|r| r.value.len() as u64).sum();
        Ok(QueueStats {
            pending,
            pending_bytes: n.bytes.saturating_sub(dead_bytes),
            dead: n.dead.len() as u64,
            oldest_ms: oldest,
            now_ms,
        })
    }

    async fn dead_letters(&self, ns: &str, max: usize) -> Result<Vec<DeadLetter>> {
        let state = self.state.lock();
        Ok(state.namespaces.get(ns).map(|n| n.dead.iter().take(max).cloned().collect()).unwrap_or_default())
    }

    async fn requeue_dead(&self, ns: &str, key: Option<&str>) -> Result<u64> {
        let now = self.now_ms();
        let mut state = self.state.lock();
        let Some(n) = state.namespaces.get_mut(ns) else { return Ok(0) };
        let keys: Vec<String> =
            n.dead.iter().filter(|d| key.is_none_or(|k| k == d.key)).map(|d| d.key.clone()).collect();
        n.dead.retain(|d| key.is_some_and(|k| k != d.key));
        let mut count = 0;
        for k in keys {
            if let Some(r) = n.records.get_mut(&k) {
                r.attempts = 0;
                n.set_state(&k, RecordState::Due(now));
                count += 1;
            }
        }
        Ok(count)
    }
}
