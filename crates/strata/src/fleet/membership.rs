//! Strong level: the other members of the fleet, as this instance hears them, and
//! the wait for their acknowledgements.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backplane::OriginId;
use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind, Result};

/// Another member of the fleet, as this instance hears it.
#[derive(Debug, Clone, Copy)]
struct Member {
    last_heard: Timestamp,
    /// The highest of our sequence numbers it acknowledged.
    acked: u64,
}

/// The members heard from and what they acknowledged.
#[derive(Default)]
pub(crate) struct Members {
    map: Mutex<HashMap<OriginId, Member>>,
    /// Woken when an acknowledgement arrives.
    acks: tokio::sync::Notify,
}

impl Members {
    /// `origin` was heard at `now`; `acked` is the sequence number of ours it
    /// acknowledged in that message, if it was an acknowledgement to us.
    pub(crate) fn heard(&self, origin: OriginId, now: Timestamp, acked: Option<u64>) {
        let mut map = self.map.lock();
        let member = map.entry(origin).or_insert(Member { last_heard: now, acked: 0 });
        member.last_heard = now;
        if let Some(seq) = acked {
            member.acked = member.acked.max(seq);
            drop(map);
            self.acks.notify_waiters();
        }
    }

    /// Forgets `origin`: it said it left, closed (it serves nothing any more).
    pub(crate) fn forget(&self, origin: OriginId) {
        self.map.lock().remove(&origin);
        self.acks.notify_waiters();
    }

    /// Waits until every member heard within `lease` acknowledged `seq`, or until its
    /// lease lapsed (then it has stopped serving L1 by its own clock).
    pub(crate) async fn wait_for_acks(
        &self,
        seq: u64,
        lease: Duration,
        now: impl Fn() -> Timestamp,
    ) -> Result<()> {
        // Bounded in tokio time too, in case the clock is a manual one that never moves.
        // `None` (a deadline past what an `Instant` holds): only the leases bound it.
        let give_up = tokio::time::Instant::now().checked_add(lease.saturating_mul(2));
        loop {
            let notified = self.acks.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now();
            let waiting = self
                .map
                .lock()
                .values()
                .filter(|m| m.acked < seq && now.since(m.last_heard) <= lease)
                .count();
            if waiting == 0 {
                return Ok(());
            }
            if give_up.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{waiting} member(s) neither acknowledged invalidation {seq} nor let their lease lapse"
                    ),
                ));
            }
            // Wake on an ack, or poll for lapsed leases.
            let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
        }
    }
}
