//! Reloads pushed to the fleet (see [`CacheBuilder::push_reloads`]): the instance that
//! loads a key again after another instance's invalidation sends the entry L2 took,
//! and the instances that held the key install it instead of each reading L2 again.
//!
//! Why an install is never staler than an L2 read: the sender applied invalidation
//! `after` before its load began (its L1 guard says so, under the lock fills take), so
//! it read the database after the write `after` announced had committed; L2 accepted
//! the fill, so no write lock covered the key and no invalidation reached L2 between
//! the lookup and the fill. A receiver installs only if its own last word on the key
//! is that same message, heard while it held the key, with no invalidation of the key,
//! its tags or the namespace since and no repair since (see `Guards::install_reload`):
//! since every receiver hears the namespace's messages in one order
//! ([`Backplane::delivers_in_one_order`]), it heard no invalidation of the key that the
//! sender had not heard before loading. A write whose message comes later drops the
//! install as it drops any copy. A write of the receiver's own is the exception to
//! "one order": it is applied at once, before its message takes its place in the
//! order, so until a message of its own sent after it comes back, no remote message
//! the receiver applies counts as a key's last word (`Guards::own_settled`).
//!
//! [`CacheBuilder::push_reloads`]: crate::CacheBuilder::push_reloads
//! [`Backplane::delivers_in_one_order`]: crate::backplane::Backplane::delivers_in_one_order

use super::state::Inner;
use crate::backplane::MessageBody;
use crate::fleet::Attempt;
use crate::key::{CacheKey, CacheValue};
use crate::l1::{Cause, Slot};
use crate::tier::Envelope;

impl<K: CacheKey, V: CacheValue> Inner<K, V> {
    /// Whether this cache pushes and installs reloads: on, below the Strong level, over
    /// a backplane that delivers in one order, while it is healthy and no member is
    /// doubted (a loss it reported may not be repaired yet: this instance's word on a
    /// key may be behind, or ahead of, the sender's).
    fn reloads_travel(&self) -> bool {
        self.cfg.push_reloads > 0
            && !self.cfg.is_strong()
            && self.health.is_healthy()
            && !self.health.is_doubted()
            && self.fleet.as_ref().is_some_and(|f| f.backplane().delivers_in_one_order())
    }

    /// The envelope to keep for a push, when a fill of `env` could be pushed: a value of
    /// at most `push_reloads` bytes (a cached "not found" too).
    pub(crate) fn pushable(&self, env: &Envelope) -> Option<Envelope> {
        let small = env.value.as_ref().is_none_or(|v| v.len() <= self.cfg.push_reloads);
        (small && self.reloads_travel()).then(|| env.clone())
    }

    /// The message pushing `env`, loaded for `key_str` after invalidation `after`.
    pub(crate) fn reload_message(key_str: &str, after: Cause, env: Envelope) -> MessageBody {
        MessageBody::Reload { key: key_str.to_owned(), after, entry: Box::new(Envelope { stamp: 0, ..env }) }
    }

    /// Sends a reload: after the readers had their answer, without waiting behind a
    /// busy publisher, and not at all while the backplane is down (a lost push costs
    /// each receiver one L2 read).
    pub(crate) async fn push_reload(&self, body: MessageBody) {
        let Some(fleet) = &self.fleet else { return };
        match fleet.send_control(body, Attempt::FailFast, &self.stats).await {
            Ok(()) => self.stats.reloads_pushed.incr(),
            Err(e) => tracing::debug!(error = %e, namespace = %self.cfg.namespace, "reload not pushed"),
        }
    }

    /// Installs a reload another instance pushed, if this instance's last word on the
    /// key is invalidation `after`, heard while it held the key (see the module docs).
    pub(crate) fn install_reload(&self, key_str: &str, after: Cause, env: &Envelope) {
        let now = self.now();
        if !self.reloads_travel() || self.l1_closed(now) || self.l2_distrusts(key_str, env) {
            return;
        }
        let Some(key) = K::parse_key(key_str) else {
            self.stats.malformed_messages.incr();
            return;
        };
        // The entry counts as filled now: any invalidation from here on outdates it,
        // and `install_reload` refuses it if one came since `after`.
        let entry = match self.decode_envelope(key_str, env.clone(), self.guards.start(now)) {
            Ok(Some(entry)) => entry,
            Ok(None) => return,
            Err(e) => {
                self.stats.malformed_messages.incr();
                tracing::debug!(error = %e, key = key_str, namespace = %self.cfg.namespace, "undecodable reload ignored");
                return;
            }
        };
        let tags = entry.tags.clone();
        let slot = Slot::new(entry, self.xfetch_lead);
        let installed =
            self.guards.install_reload(&key, after, now, tags.as_deref().map_or(&[], Vec::as_slice), || {
                if self.l1.peek(&key).is_some() {
                    return false;
                }
                self.l1.insert(key.clone(), slot);
                true
            });
        if installed {
            self.stats.reloads_installed.incr();
        } else {
            self.stats.reloads_refused.incr();
        }
    }
}
