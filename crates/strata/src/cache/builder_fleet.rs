//! The builder's fleet-protocol settings: heartbeats and the Strong level's membership.

use std::sync::Arc;
use std::time::Duration;

use super::builder::CacheBuilder;
use crate::key::{CacheKey, CacheValue};
use crate::scope::Scope;

impl<K: CacheKey, V: CacheValue> CacheBuilder<K, V> {
    /// How often this instance publishes a heartbeat on the backplane. Default 1 s.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Sends every heartbeat and Strong-level acknowledgement to every member, as
    /// releases before the heartbeat digest did. Off by default: heartbeats go through
    /// [`Backplane::heartbeat`](crate::backplane::Backplane::heartbeat), which the
    /// in-process and Redis backplanes aggregate into one digest per interval
    /// (each instance receives one message per interval, not one per member), and
    /// acknowledgements only to the instance that waits for them. Turn it on while a
    /// fleet is upgraded from an earlier release (which understands neither), then off.
    pub fn broadcast_heartbeats(mut self, on: bool) -> Self {
        self.broadcast_heartbeats = on;
        self
    }

    /// Below the Strong level, pushes a key reloaded after another instance's
    /// invalidation to the fleet, for values whose encoding is at most `max_bytes`
    /// (0 turns it off). Default 4 KiB.
    ///
    /// When a key is written, every instance that held it drops it and, at its next
    /// read, fetches it from L2 again: with N instances, N−1 L2 reads per write of a hot
    /// key, which is most of a warm fleet's L2 traffic. With this on, the instance that
    /// reloads the key (a lookup after the invalidation, a database read, a fill L2
    /// accepted) sends the entry on the backplane
    /// ([`MessageBody::Reload`](crate::backplane::MessageBody::Reload)), and each
    /// instance that held the key installs it in L1 if the last thing it heard about
    /// the key is that same invalidation (no later invalidation of the key, its tags or
    /// the namespace, no write of its own, no repair since). The value was read from the
    /// database after the invalidation reached the reloading instance, so after the
    /// write it announced: an install is as fresh as a read of L2 at the moment the
    /// entry was pushed, and a later write drops it as it drops any copy. A lost push
    /// costs one L2 read, never a repair. Not at the Strong level (where L1 holds only
    /// what L2 returned or accepted under the members' acknowledgements).
    pub fn push_reloads(mut self, max_bytes: usize) -> Self {
        self.push_reloads = max_bytes;
        self
    }

    /// Strong level: how long a member counts as live after it was last heard on the
    /// backplane. `invalidate` waits at most this long for a silent member; a member that
    /// has not received its own heartbeat back for half of it stops serving L1. Must be
    /// at least four heartbeat intervals. Default 5 s.
    pub fn membership_lease(mut self, lease: Duration) -> Self {
        self.membership_lease = lease;
        self
    }

    /// Runs on this instance after it applied an invalidation another instance sent
    /// (its local copies of what `Scope` covers are gone), on the backplane listener's
    /// task: keep it short. For observability, e.g. measuring how long invalidations
    /// take to reach the fleet; [`after_invalidate`](Self::after_invalidate) is the
    /// hook for this instance's own invalidations. Default: none.
    pub fn after_remote_invalidation(mut self, hook: impl Fn(&Scope) + Send + Sync + 'static) -> Self {
        self.remote_hooks.push(Arc::new(hook));
        self
    }
}
