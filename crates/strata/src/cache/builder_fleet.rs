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
