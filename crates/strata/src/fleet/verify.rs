//! Verifying a loss the backplane reported, instead of flushing L1 for it.
//!
//! A stream backplane reports [`Lost`](crate::backplane::BackplaneEvent::Lost) when
//! entries it had not delivered are gone (trimmed, or the stream evicted or deleted:
//! under `allkeys-*` eviction that happens every few seconds) or its numbering
//! restarted (the counter evicted). Most such losses cost nothing: the entries were
//! read already, or the counter alone went. Every message still carries its origin's
//! sequence number, so what was lost is known per origin as soon as each live origin is
//! heard again by a message sent after the loss: a gap in its numbers is repaired
//! (replayed, or flushed) like any other gap, and no gap means nothing of its was lost.
//!
//! Until every origin heard in the last few heartbeat intervals has been heard that way,
//! the backplane counts as unhealthy since the last message read before the loss, so
//! L1 serves what it would serve in any other unhealthy spell (the `max_stale` bound).
//! An origin that does not speak within [`VERIFY_INTERVALS`] heartbeat intervals (the
//! detection time the level's bound allows) costs the flush the loss would have cost.
//!
//! What counts as sent after the loss: on a stream, any message read after the loss was
//! reported (the stream's order is the order of the appends, and the loss is reported
//! before the entry that revealed it). A digest is such a message, but it lists each
//! member's *latest* beat, which may predate the loss; so a digest entry counts only
//! when its beat count changed since a digest read after the loss listed it.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::backplane::OriginId;

/// Heartbeat intervals an origin has to show, after a loss, that none of its messages
/// went with it.
pub(crate) const VERIFY_INTERVALS: u32 = 3;

/// How an origin was heard after the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// A message of its own (an invalidation, a broadcast heartbeat).
    Message,
    /// Its entry in a digest, fresh (its beat count changed since the last digest).
    Digest,
}

/// The origins that must still show that none of their messages was lost.
#[derive(Debug)]
pub(crate) struct Verification {
    /// Each pending origin, and whether a digest read since the loss listed it.
    pending: HashMap<OriginId, bool>,
    deadline: Instant,
}

impl Verification {
    /// A loss was reported: every origin in `live` must be heard again by `deadline`.
    pub(crate) fn new(live: impl Iterator<Item = OriginId>, deadline: Instant) -> Self {
        Verification { pending: live.map(|o| (o, false)).collect(), deadline }
    }

    /// Another loss while this one is verified: every origin, the ones already heard
    /// included, must be heard again after it.
    pub(crate) fn another_loss(&mut self, live: impl Iterator<Item = OriginId>, deadline: Instant) {
        for listed in self.pending.values_mut() {
            *listed = false;
        }
        self.pending.extend(live.map(|o| (o, false)));
        self.deadline = deadline;
    }

    /// `origin` was heard, its sequence numbers tracked without a gap left unrepaired.
    pub(crate) fn heard(&mut self, origin: OriginId, via: Via) {
        let counts = match via {
            Via::Message => true,
            Via::Digest => self.pending.get(&origin).copied().unwrap_or(false),
        };
        if counts {
            self.pending.remove(&origin);
        }
    }

    /// A digest read since the loss listed these origins: their next changed beat was
    /// taken after it. Called after the digest's entries were heard.
    pub(crate) fn listed(&mut self, origins: impl Iterator<Item = OriginId>) {
        for o in origins {
            if let Some(listed) = self.pending.get_mut(&o) {
                *listed = true;
            }
        }
    }

    /// Whether every origin has been heard.
    pub(crate) fn done(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the origins not heard by then cost a flush.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_message_counts_at_once_a_digest_entry_only_after_a_digest_listed_it() {
        let at = Instant::now() + Duration::from_secs(3);
        let mut v = Verification::new([3, 5].into_iter(), at);
        v.heard(3, Via::Digest);
        assert!(!v.done(), "the first digest after the loss may carry a beat from before it");
        v.listed([3, 5].into_iter());
        v.heard(3, Via::Digest);
        v.heard(5, Via::Message);
        assert!(v.done());
        assert_eq!(v.deadline(), at);
    }

    #[test]
    fn another_loss_makes_everyone_speak_again() {
        let at = Instant::now();
        let mut v = Verification::new([3].into_iter(), at);
        v.listed([3].into_iter());
        v.another_loss([7].into_iter(), at);
        v.heard(3, Via::Digest);
        v.heard(7, Via::Message);
        assert!(!v.done(), "3's listing predates the second loss");
        v.heard(3, Via::Message);
        assert!(v.done());
        v.heard(9, Via::Message);
        assert!(v.done(), "an origin nobody waits for changes nothing");
    }
}
