//! Single-flight: concurrent misses of one key in this instance share one load.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::sync::{AtomicU64, Mutex};

/// The result every waiter of a load receives.
pub(crate) type Shared<V> = Option<Result<Option<V>>>;

/// What kind of load a flight runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlightKind {
    /// A read that missed: callers wait for it; it may take the fleet's load lease and
    /// answer from L2 or with a fail-safe copy.
    Read,
    /// An early refresh (XFetch) of an entry still being served, fresh until the time
    /// it carries: nobody waits for it.
    Refresh(Timestamp),
}

struct Flight<V> {
    id: u64,
    rx: watch::Receiver<Shared<V>>,
}

const FLIGHT_SHARDS: usize = 32;

type FlightShard<K, V> = Mutex<HashMap<K, Flight<V>>>;

/// Handed to the caller that starts a load: its id and the sender for the result.
pub(crate) struct Lead<V> {
    pub(crate) id: u64,
    pub(crate) tx: watch::Sender<Shared<V>>,
}

/// The loads in flight, by key.
pub(crate) struct Flights<K, V> {
    shards: Box<[FlightShard<K, V>]>,
    hasher: std::collections::hash_map::RandomState,
    next_id: AtomicU64,
}

impl<K: Hash + Eq + Clone, V> Flights<K, V> {
    pub(crate) fn new() -> Self {
        Flights {
            shards: (0..FLIGHT_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn shard(&self, key: &K) -> &FlightShard<K, V> {
        &self.shards[(self.hasher.hash_one(key) as usize) % FLIGHT_SHARDS]
    }

    /// Joins the load of `key` in flight, or registers a new one and returns its lead.
    pub(crate) fn join_or_lead(&self, key: &K) -> (watch::Receiver<Shared<V>>, Option<Lead<V>>) {
        let mut shard = self.shard(key).lock();
        if let Some(f) = shard.get(key) {
            return (f.rx.clone(), None);
        }
        let (tx, rx) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        shard.insert(key.clone(), Flight { id, rx: rx.clone() });
        (rx, Some(Lead { id, tx }))
    }

    pub(crate) fn is_running(&self, key: &K) -> bool {
        self.shard(key).lock().contains_key(key)
    }

    /// Forgets the flight of `key` if it is still `id`.
    pub(crate) fn finish(&self, key: &K, id: u64) {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(|f| f.id == id) {
            shard.remove(key);
        }
    }

    /// Makes later readers start a new load instead of joining one that began before an
    /// invalidation (which would hand them the pre-invalidation value).
    pub(crate) fn detach(&self, key: &K) {
        self.shard(key).lock().remove(key);
    }

    pub(crate) fn detach_all(&self) {
        for s in self.shards.iter() {
            s.lock().clear();
        }
    }
}

/// Forgets a flight however its task ends (even by a panicking loader).
pub(crate) struct FinishOnDrop<'a, K: Hash + Eq + Clone, V> {
    pub(crate) flights: &'a Flights<K, V>,
    pub(crate) key: &'a K,
    pub(crate) id: u64,
}

impl<K: Hash + Eq + Clone, V> Drop for FinishOnDrop<'_, K, V> {
    fn drop(&mut self) {
        self.flights.finish(self.key, self.id);
    }
}

/// Hands a load's result to the callers waiting for it. When the soft timeout already
/// answered them with a fail-safe copy, this changes nothing (their answer stands).
///
/// An early refresh answers too: nobody waits for it when it starts, but a read that
/// misses while it runs (the entry expired or was evicted meanwhile) joins it, and
/// would otherwise get "load was abandoned" when its sender is dropped.
pub(crate) fn complete<V>(tx: &watch::Sender<Shared<V>>, result: Result<Option<V>>) {
    tx.send_if_modified(|cur| {
        if cur.is_none() {
            *cur = Some(result);
            true
        } else {
            false
        }
    });
}

/// Waits for a flight's result.
pub(crate) async fn wait<V: Clone>(mut rx: watch::Receiver<Shared<V>>) -> Result<Option<V>> {
    use crate::error::{Error, ErrorKind};
    match rx.wait_for(Option::is_some).await {
        Ok(shared) => match &*shared {
            Some(r) => r.clone(),
            None => Err(Error::new(ErrorKind::Shutdown, "load finished without a result")),
        },
        Err(_) => Err(Error::new(ErrorKind::Loader, "load was abandoned (the loader panicked?)")),
    }
}
