//! Doubt: the members that may have committed a write whose L2 invalidation is not
//! applied yet, as this instance knows them.
//!
//! A member whose L2 delete failed after its commit buffers it and retries; until the
//! retry lands, L2 may serve the old row to any instance, which would keep it in L1 as
//! if it were current. Its heartbeats say so ([`MessageBody::BufferedHeartbeat`]).
//! While any member is doubted, this instance trusts no entry older than `max_stale`,
//! from L1 or L2, which bounds what such a read can be stale by. A member leaves the
//! doubt with a plain heartbeat (nothing buffered any more), or when it has been
//! silent long enough to be forgotten.
//!
//! An instance that was cut off from the backplane (an unhealthy spell, a lost or new
//! subscription) heard no heartbeat meanwhile: it doubts every member it knows until
//! each has spoken again.
//!
//! A member that falls silent while this instance hears the others (crashed, or cut
//! off from the backplane itself) may have deleted an entry from L2 and not published
//! the invalidation: its last messages may be lost with it, and its heartbeats can no
//! longer say so. It is doubted until it speaks again or is forgotten; a member that
//! shuts down cleanly says it leaves ([`MessageBody::Leave`]) and is not doubted.
//!
//! [`MessageBody::BufferedHeartbeat`]: crate::backplane::MessageBody::BufferedHeartbeat
//! [`MessageBody::Leave`]: crate::backplane::MessageBody::Leave

use std::collections::HashMap;
use std::time::Duration;

use crate::backplane::OriginId;
use crate::clock::Timestamp;

/// The doubted members, each with when it was last heard.
#[derive(Default)]
pub(crate) struct Doubts {
    map: HashMap<OriginId, Timestamp>,
}

impl Doubts {
    /// Doubts `origin`, heard at `now` (its heartbeat said it has L2 deletes buffered).
    pub(crate) fn doubt(&mut self, origin: OriginId, now: Timestamp) {
        self.map.insert(origin, now);
    }

    /// Doubts every member in `heard` (with when each was last heard): this instance
    /// could not hear them for a while, or they fell silent.
    pub(crate) fn doubt_all(&mut self, heard: impl Iterator<Item = (OriginId, Timestamp)>) {
        for (origin, at) in heard {
            self.map.entry(origin).or_insert(at);
        }
    }

    /// Stops doubting `origin` (it said it left with nothing buffered).
    pub(crate) fn forget(&mut self, origin: OriginId) {
        self.map.remove(&origin);
    }

    /// `origin` was heard at `now`: a plain heartbeat (`clean`) ends the doubt; any
    /// other message only shows it is alive.
    pub(crate) fn heard(&mut self, origin: OriginId, now: Timestamp, clean: bool) {
        if clean {
            self.map.remove(&origin);
        } else if let Some(at) = self.map.get_mut(&origin) {
            *at = now;
        }
    }

    /// Forgets the members silent for `forget_after`: gone (what they buffered is lost
    /// with them, which no doubt here can repair).
    pub(crate) fn expire(&mut self, now: Timestamp, forget_after: Duration) {
        self.map.retain(|_, at| now.since(*at) < forget_after);
    }

    /// Whether any member is doubted.
    pub(crate) fn any(&self) -> bool {
        !self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubt_ends_with_a_plain_heartbeat_or_silence() {
        let mut d = Doubts::default();
        let t = |s: u64| Timestamp(s * 1_000_000_000);
        d.doubt(7, t(1));
        d.heard(7, t(2), false);
        assert!(d.any(), "an invalidation or a buffered heartbeat does not end it");
        d.heard(7, t(3), true);
        assert!(!d.any());
        d.doubt_all([(7, t(3)), (9, t(1))].into_iter());
        d.heard(7, t(4), true);
        assert!(d.any(), "9 has not spoken");
        d.expire(t(10), Duration::from_secs(10));
        assert!(d.any());
        d.expire(t(11), Duration::from_secs(10));
        assert!(!d.any(), "9 silent for 10 s is forgotten");
    }
}
