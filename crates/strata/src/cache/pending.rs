//! Invalidations that could not reach L2 or the backplane, kept for the retry task.

use std::collections::HashSet;

use crate::backplane::MessageBody;
use crate::scope::Scope;

/// Buffered L2 deletes beyond this are replaced by one namespace bump.
const MAX_PENDING_KEYS: usize = 10_000;
/// Buffered messages beyond this are replaced by one namespace invalidation. Every
/// buffered message used a sequence number that was never published, so each receiver
/// flushes its L1 once the backplane is back anyway: the namespace invalidation costs
/// them nothing more, and it keeps the buffer (and the burst of publishes that drains
/// it) small however long the outage.
const MAX_PENDING_MESSAGES: usize = 256;

/// What is waiting to be retried.
#[derive(Default)]
pub(crate) struct Pending {
    /// L2 invalidations: keys and tags, or the whole namespace (which covers them).
    l2_keys: HashSet<String>,
    l2_tags: HashSet<String>,
    l2_all: bool,
    /// Messages whose publish failed, in order; at most [`MAX_PENDING_MESSAGES`].
    messages: Vec<MessageBody>,
    /// Write locks whose release failed: (scope, lock id). They would expire anyway;
    /// releasing them lets their keys be cached again sooner.
    pub(crate) unlocks: Vec<(Scope, u64)>,
    /// L2 invalidations taken out by a retry that has not finished: still not applied,
    /// so still announced as buffered (see [`Pending::l2_buffered`]).
    pub(crate) l2_in_flight: usize,
    /// Messages taken out by a retry that has not finished sending them.
    pub(crate) messages_in_flight: usize,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.l2_is_empty() && self.messages.is_empty() && self.unlocks.is_empty()
    }

    pub(crate) fn l2_is_empty(&self) -> bool {
        self.l2_keys.is_empty() && self.l2_tags.is_empty() && !self.l2_all
    }

    /// How many invalidations wait (L2 keys, tags and namespace, and messages),
    /// counting those a retry has taken out and not yet applied.
    pub(crate) fn len(&self) -> usize {
        self.l2_keys.len()
            + self.l2_tags.len()
            + usize::from(self.l2_all)
            + self.messages.len()
            + self.l2_in_flight
            + self.messages_in_flight
    }

    /// Whether an L2 invalidation waits or is being retried: L2 may still hold what it
    /// covers, which this instance's heartbeats tell the fleet.
    pub(crate) fn l2_buffered(&self) -> bool {
        !self.l2_is_empty() || self.l2_in_flight > 0
    }

    /// Buffers a message that could not be published. Returns true when the buffer
    /// outgrew its cap and was collapsed into one namespace invalidation.
    pub(crate) fn push_message(&mut self, body: MessageBody) -> bool {
        self.messages.push(body);
        self.compact()
    }

    /// Takes the buffered messages, to send them in order.
    pub(crate) fn take_messages(&mut self) -> Vec<MessageBody> {
        std::mem::take(&mut self.messages)
    }

    /// Puts back messages taken that could not be sent, ahead of those buffered since
    /// (a `Bypass` must still precede the invalidations it came with). Returns true
    /// when that collapsed the buffer.
    pub(crate) fn requeue_messages(&mut self, unsent: impl IntoIterator<Item = MessageBody>) -> bool {
        let since = std::mem::take(&mut self.messages);
        self.messages.extend(unsent);
        self.messages.extend(since);
        self.compact()
    }

    /// Forgets the buffered messages (there is no backplane to send them to).
    pub(crate) fn clear_messages(&mut self) {
        self.messages.clear();
    }

    /// Once a namespace invalidation waits, the other invalidations waiting are
    /// redundant: it goes out after every one of them was buffered, so after their
    /// writes committed. Past the cap, one is put in their place. A `Bypass` (Strong
    /// level) is kept, once, ahead of it. Returns true when the cap forced it.
    fn compact(&mut self) -> bool {
        let all = MessageBody::Invalidate(Scope::All);
        let has_all = self.messages.contains(&all);
        let over = self.messages.len() > MAX_PENDING_MESSAGES;
        if !(over || has_all && self.messages.len() > 1) {
            return false;
        }
        let bypass = self.messages.contains(&MessageBody::Bypass);
        self.messages.clear();
        if bypass {
            self.messages.push(MessageBody::Bypass);
        }
        self.messages.push(all);
        over && !has_all
    }

    /// Remembers an L2 invalidation of `scope` to retry.
    pub(crate) fn add_l2(&mut self, scope: &Scope) {
        match scope {
            Scope::Keys(keys) => self.l2_keys.extend(keys.iter().cloned()),
            Scope::Tag(tag) => {
                self.l2_tags.insert(tag.clone());
            }
            Scope::All => self.l2_all = true,
        }
        if self.l2_keys.len() > MAX_PENDING_KEYS {
            self.l2_keys.clear();
            self.l2_tags.clear();
            self.l2_all = true;
        }
    }

    /// Whether an L2 invalidation covering this key (or one of `tags`) awaits retry.
    pub(crate) fn covers(&self, key: &str, tags: &[String]) -> bool {
        self.l2_all || self.l2_keys.contains(key) || tags.iter().any(|t| self.l2_tags.contains(t))
    }

    /// Takes the L2 invalidations to retry, as scopes (the namespace alone when it is
    /// among them).
    pub(crate) fn take_l2(&mut self) -> Vec<Scope> {
        if std::mem::take(&mut self.l2_all) {
            self.l2_keys.clear();
            self.l2_tags.clear();
            return vec![Scope::All];
        }
        let mut out = Vec::with_capacity(1 + self.l2_tags.len());
        if !self.l2_keys.is_empty() {
            let mut keys: Vec<String> = self.l2_keys.drain().collect();
            keys.sort_unstable();
            out.push(Scope::Keys(keys));
        }
        out.extend(self.l2_tags.drain().map(Scope::Tag));
        out
    }
}
