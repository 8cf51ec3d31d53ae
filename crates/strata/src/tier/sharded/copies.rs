//! The fill tokens of a hot key's copies, held between the lookup that took them and
//! the fill that uses them.
//!
//! A copy on another shard is guarded by that shard's own clock, so its token must be
//! taken before the load reads the database, like the primary's. The port's
//! [`FillToken`] carries one stamp, so the sharded tier keeps the others here, under
//! the primary token's (tagged) stamp and lease. Losing them (the map is full, the fill
//! came too late) only means the copies stay empty: reads fall back to the primary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::tier::FillToken;

/// At most this many loads' copy tokens are held at once.
const CAPACITY: usize = 4_096;

type Id = (String, String, u64, Option<u64>);
/// When the tokens were taken, and each copy's shard and token.
type Held = (Instant, Vec<(usize, FillToken)>);

pub(super) struct PendingCopies {
    held: Mutex<HashMap<Id, Held>>,
    keep_for: Duration,
    /// False without hot-key copies: nothing is ever held, so fills skip the lock.
    enabled: bool,
}

impl PendingCopies {
    /// Tokens are dropped `keep_for` after their lookup (the tombstone time to live:
    /// no shard would take a fill with them later anyway). `enabled` is false when the
    /// tier keeps no copies.
    pub(super) fn new(keep_for: Duration, enabled: bool) -> Self {
        PendingCopies { held: Mutex::new(HashMap::new()), keep_for, enabled }
    }

    pub(super) fn hold(
        &self,
        namespace: &str,
        key: &str,
        primary: &FillToken,
        copies: Vec<(usize, FillToken)>,
    ) {
        if copies.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut held = self.held.lock();
        if held.len() >= CAPACITY {
            held.retain(|_, (at, _)| now.duration_since(*at) < self.keep_for);
            if held.len() >= CAPACITY {
                return;
            }
        }
        held.insert(id(namespace, key, primary), (now, copies));
    }

    /// The copies' tokens for the load that `primary` started, if still held.
    pub(super) fn take(&self, namespace: &str, key: &str, primary: &FillToken) -> Vec<(usize, FillToken)> {
        if !self.enabled {
            return Vec::new();
        }
        let mut held = self.held.lock();
        match held.remove(&id(namespace, key, primary)) {
            Some((at, copies)) if at.elapsed() < self.keep_for => copies,
            _ => Vec::new(),
        }
    }

    /// Forgets the copies' tokens of a load that will not fill.
    pub(super) fn forget(&self, namespace: &str, key: &str, primary: &FillToken) {
        if !self.enabled {
            return;
        }
        self.held.lock().remove(&id(namespace, key, primary));
    }
}

fn id(namespace: &str, key: &str, primary: &FillToken) -> Id {
    (namespace.to_owned(), key.to_owned(), primary.stamp, primary.lease)
}
