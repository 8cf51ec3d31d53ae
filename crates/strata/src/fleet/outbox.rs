//! The outbox: this instance's numbered messages waiting to be published, in number
//! order.
//!
//! A message takes its sequence number when it is queued here, and leaves in that
//! order, in batches of what queued behind a slow publish. A caller that stops waiting
//! (its fail-fast bound passed) leaves its message queued: it is still published in
//! its turn, so the other instances see no gap. Earlier the message gave its number
//! up instead, and every receiver, unable to replay a number that was never
//! published, flushed its L1: under load, where publishes are slow, that flush per
//! give-up was what turned a busy Redis into a database overload (the 50-instance
//! runs of `strata bench` at 20,000 requests/s).
//!
//! A number is given up ("burned") only when its message cannot go out: the publish
//! failed [`MAX_ATTEMPTS`] times or was refused for good, or the outbox overflowed
//! (its oldest message makes room). Receivers then see a gap, which they repair.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::backplane::Message;
use crate::error::{Error, ErrorKind, Result};

/// Publish attempts a message gets before its number is given up. More than one, so
/// that a publish that timed out once on a busy backplane costs no gap; few, so that
/// an outage does not keep the first messages queued long after it began (they are
/// buffered for retry by their callers anyway).
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// Messages queued at most; beyond, the oldest is given up. An outage of the backplane
/// queues a message per invalidation until the probes give them up.
pub(crate) const MAX_QUEUED: usize = 4096;
/// Messages published in one call at most.
pub(crate) const MAX_BATCH: usize = 64;

/// A queued message and the caller waiting for its outcome, if it still waits.
struct Queued {
    msg: Message,
    attempts: u32,
    /// Told the first outcome: published, failed (the message may stay queued and go
    /// out later), or given up.
    done: Option<oneshot::Sender<Result<()>>>,
}

impl Queued {
    fn tell(&mut self, outcome: Result<()>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(outcome);
        }
    }
}

#[derive(Default)]
struct State {
    /// The last sequence number taken.
    last_seq: u64,
    queue: VecDeque<Queued>,
}

/// What happened to a batch's messages after a failed publish.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failed {
    /// Messages given up (their numbers are gaps now).
    pub(crate) burned: u64,
}

/// The queue of numbered messages (see the module docs).
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<State>,
}

impl Outbox {
    /// The last sequence number taken (published, queued, or given up).
    pub(crate) fn last_seq(&self) -> u64 {
        self.state.lock().last_seq
    }

    /// Numbers the message `make` builds with the next sequence number and queues it.
    /// Returns the number, the receiver of its outcome, and how many older messages the
    /// queue gave up to make room.
    pub(crate) fn push(
        &self,
        make: impl FnOnce(u64) -> Message,
    ) -> Result<(u64, oneshot::Receiver<Result<()>>, u64)> {
        let mut s = self.state.lock();
        let seq = s
            .last_seq
            .checked_add(1)
            .ok_or_else(|| Error::new(ErrorKind::Backplane, "backplane sequence numbers exhausted"))?;
        s.last_seq = seq;
        let mut burned = 0;
        while s.queue.len() >= MAX_QUEUED {
            let Some(mut oldest) = s.queue.pop_front() else { break };
            oldest.tell(Err(Error::new(
                ErrorKind::Backplane,
                "backplane message given up: too many messages queued behind a failing backplane",
            )));
            burned += 1;
        }
        let (tx, rx) = oneshot::channel();
        s.queue.push_back(Queued { msg: make(seq), attempts: 0, done: Some(tx) });
        Ok((seq, rx, burned))
    }

    /// The number a control message carries: every smaller or equal number that will
    /// ever be published already was (the one before the first queued message), or
    /// was given up.
    pub(crate) fn watermark(&self) -> u64 {
        let s = self.state.lock();
        s.queue.front().map_or(s.last_seq, |q| q.msg.seq.saturating_sub(1))
    }

    /// Messages queued.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Whether message `seq` is still queued (neither published nor given up).
    pub(crate) fn holds(&self, seq: u64) -> bool {
        let s = self.state.lock();
        s.queue.binary_search_by_key(&seq, |q| q.msg.seq).is_ok()
    }

    /// The sequence number of the first queued message.
    #[cfg(test)]
    pub(crate) fn front_seq(&self) -> Option<u64> {
        self.state.lock().queue.front().map(|q| q.msg.seq)
    }

    /// Copies of the first queued messages up to `through` (at most [`MAX_BATCH`]):
    /// they stay queued until [`Outbox::published`] or [`Outbox::failed`] says what
    /// became of them, so that a publish abandoned half-way loses nothing (the next
    /// one sends them again; a receiver takes a number twice as a late duplicate).
    pub(crate) fn batch(&self, through: u64) -> Vec<Message> {
        let s = self.state.lock();
        s.queue.iter().take_while(|q| q.msg.seq <= through).take(MAX_BATCH).map(|q| q.msg.clone()).collect()
    }

    /// The messages up to `through` went out.
    pub(crate) fn published(&self, through: u64) {
        let mut s = self.state.lock();
        while s.queue.front().is_some_and(|q| q.msg.seq <= through) {
            if let Some(mut q) = s.queue.pop_front() {
                q.tell(Ok(()));
            }
        }
    }

    /// The publish of the messages up to `through` failed with `err`: their callers
    /// hear it; each is given up once it has had [`MAX_ATTEMPTS`], or at once when the
    /// error will not go away by retrying.
    pub(crate) fn failed(&self, through: u64, err: &Error) -> Failed {
        let mut s = self.state.lock();
        for q in s.queue.iter_mut().take_while(|q| q.msg.seq <= through) {
            q.attempts += 1;
            q.tell(Err(err.clone()));
        }
        // Every publish starts at the front, so attempts never grow along the queue:
        // the messages to give up are a prefix of it.
        let for_good = !err.is_transient();
        let mut out = Failed::default();
        while s
            .queue
            .front()
            .is_some_and(|q| q.msg.seq <= through && (for_good || q.attempts >= MAX_ATTEMPTS))
        {
            s.queue.pop_front();
            out.burned += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::MessageBody;
    use crate::scope::Scope;

    fn msg(seq: u64) -> Message {
        Message {
            origin: 7,
            seq,
            namespace: "ns".into(),
            body: MessageBody::Invalidate(Scope::All),
            sent_at_ms: 0,
        }
    }

    fn push(o: &Outbox) -> (u64, oneshot::Receiver<Result<()>>) {
        let (seq, rx, burned) = o.push(msg).expect("numbers left");
        assert_eq!(burned, 0);
        (seq, rx)
    }

    #[test]
    fn messages_leave_in_number_order_and_the_watermark_stays_below_the_queue() {
        let o = Outbox::default();
        assert_eq!(o.watermark(), 0);
        let (a, mut ra) = push(&o);
        let (b, _rb) = push(&o);
        let (c, _rc) = push(&o);
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(o.watermark(), 0);
        let batch: Vec<u64> = o.batch(2).iter().map(|m| m.seq).collect();
        assert_eq!(batch, vec![1, 2]);
        o.published(2);
        assert!(ra.try_recv().expect("told").is_ok());
        assert_eq!(o.watermark(), 2);
        assert_eq!(o.front_seq(), Some(3));
        o.published(3);
        assert_eq!(o.watermark(), 3);
        assert_eq!(o.front_seq(), None);
    }

    #[test]
    fn a_transient_failure_keeps_the_message_queued_until_its_last_attempt() {
        let o = Outbox::default();
        let (_, mut r1) = push(&o);
        let (_, _r2) = push(&o);
        let timeout = Error::timeout("backplane publish", std::time::Duration::from_millis(100));
        assert!(timeout.is_transient());
        assert_eq!(o.failed(1, &timeout), Failed { burned: 0 });
        assert!(r1.try_recv().expect("told").is_err(), "the caller hears the failure");
        assert_eq!(o.front_seq(), Some(1), "still queued, still first");
        for _ in 1..MAX_ATTEMPTS - 1 {
            assert_eq!(o.failed(2, &timeout), Failed { burned: 0 });
        }
        // Message 1 has had its attempts; message 2 one fewer.
        assert_eq!(o.failed(2, &timeout), Failed { burned: 1 });
        assert_eq!(o.front_seq(), Some(2));
        assert_eq!(o.watermark(), 1, "the given-up number is below the watermark: a gap");
    }

    #[test]
    fn a_refusal_for_good_gives_the_number_up_at_once() {
        let o = Outbox::default();
        let _ = push(&o);
        let refused = Error::new(ErrorKind::InvalidInput, "message too large for the backplane");
        assert!(!refused.is_transient());
        assert_eq!(o.failed(1, &refused), Failed { burned: 1 });
        assert_eq!(o.front_seq(), None);
        assert_eq!(o.watermark(), 1);
    }

    #[test]
    fn an_overflowing_outbox_gives_its_oldest_message_up() {
        let o = Outbox::default();
        let (_, mut first) = push(&o);
        for _ in 1..MAX_QUEUED {
            let _ = push(&o);
        }
        let (seq, _rx, burned) = o.push(msg).expect("numbers left");
        assert_eq!((seq, burned), (MAX_QUEUED as u64 + 1, 1));
        assert!(first.try_recv().expect("told").is_err());
        assert_eq!(o.front_seq(), Some(2));
        assert!(o.batch(u64::MAX).len() <= MAX_BATCH);
    }
}
