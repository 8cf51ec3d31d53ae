//! Per-origin sequence tracking: which of an origin's messages a receiver may have
//! missed, given the sequence numbers it sees, when any message can be forged, corrupt
//! or late.
//!
//! The rule that bounds what a bad message costs: a number that does not fit where the
//! origin is tracked (far ahead of it, or behind it) is not believed on its own. It is
//! kept as a *claim* and repaired for once; the origin's tracking moves to it only when
//! a second message agrees with it, and a message that fits where the origin was
//! tracked drops it. So one forged number costs at most one repair, and the origin's
//! real messages and heartbeats are tracked, gaps included, as before it.

use std::collections::HashMap;
use std::time::Duration;

use crate::backplane::{Message, MessageBody, OriginId};
use crate::clock::Timestamp;

/// No live origin reaches this sequence number: each starts at 0 and uses one per
/// message, so it would take nine years at a million messages a second. A message
/// carrying one is forged or corrupt.
pub(crate) const MAX_PLAUSIBLE_SEQ: u64 = 1 << 48;
/// Gaps longer than this are repaired by a flush without asking for a replay.
pub(crate) const MAX_REPLAY: u64 = 10_000;
/// A jump ahead longer than this is a claim, not believed until confirmed. As long as
/// the longest replay: beyond it a gap costs a flush either way. (A real one happens
/// when an origin could not publish for a long time: its refused messages used
/// numbers. Its next message confirms it.)
const MAX_JUMP: u64 = MAX_REPLAY;
/// Messages behind the tracked number by more than this are counted as suspicious;
/// less is what a reordering or late delivery looks like.
const REORDER_WINDOW: u64 = 1024;
/// Origins beyond this many are pruned of those not heard for a while.
const MAX_ORIGINS: usize = 64;

/// Where a message puts its origin's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// Every number up to this one should have been seen before this message.
    top: u64,
    /// Every number up to this one has been seen once this message is.
    after: u64,
}

impl Position {
    /// The position `m` claims for its origin; `None` when no live origin sends such
    /// a message: origin 0 (origins are odd), an implausible sequence number, an
    /// invalidation numbered 0 (the first is 1), an acknowledgement to `me` of a
    /// number `me` never used (`my_last` is the last one it did).
    pub(crate) fn of(m: &Message, me: OriginId, my_last: u64) -> Option<Position> {
        if m.origin == 0 || m.seq >= MAX_PLAUSIBLE_SEQ {
            return None;
        }
        if let MessageBody::Ack { to, seq } = m.body
            && to == me
            && seq > my_last
        {
            return None;
        }
        let top = if m.is_control() { m.seq } else { m.seq.checked_sub(1)? };
        Some(Position { top, after: m.seq })
    }
}

/// What tracking one message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracked {
    /// The numbers that may have been missed: replay them, or flush.
    pub(crate) missed: Option<(u64, u64)>,
    /// Far ahead, or far behind: counted.
    pub(crate) suspicious: bool,
}

/// A number that did not fit, waiting for a second message to agree with it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    after: u64,
}

/// One origin, as a receiver tracks it.
struct OriginState {
    /// Every number up to this one was seen, or repaired for.
    last_seq: u64,
    /// Every number up to this one was seen, or repaired for after it was published:
    /// `last_seq`, except right after a jump ahead, when it stays where the jump left
    /// from. The jump may be forged, and then the repair of its gap ran before the
    /// real messages numbered in it were published.
    settled: u64,
    claim: Option<Claim>,
    last_heard: Timestamp,
}

/// The origins a receiver has heard.
#[derive(Default)]
pub(crate) struct Origins {
    map: HashMap<OriginId, OriginState>,
}

impl Origins {
    /// Whether `seq` is above every number of `origin` seen here (or the origin is new):
    /// not a late duplicate, nor older than what was applied.
    pub(crate) fn is_new(&self, origin: OriginId, seq: u64) -> bool {
        self.map.get(&origin).is_none_or(|o| seq > o.last_seq)
    }

    /// Tracks a message at `pos` from `origin`, heard at `now`.
    pub(crate) fn track(&mut self, origin: OriginId, pos: Position, now: Timestamp) -> Tracked {
        let Some(o) = self.map.get_mut(&origin) else {
            self.map.insert(
                origin,
                OriginState { last_seq: pos.after, settled: 0, claim: None, last_heard: now },
            );
            // First contact: we cannot tell which of this origin's earlier messages
            // were published after we subscribed, so whatever came before this one is
            // treated as missed (replayed, or flushed). An origin that has sent nothing
            // yet (its first heartbeat carries 0) costs nothing.
            return Tracked { missed: missed_after(0, pos.top), suspicious: false };
        };
        o.last_heard = now;
        if within_jump(o.last_seq, pos.after) {
            o.claim = None;
            let missed = missed_after(o.last_seq, pos.top);
            o.settled = if missed.is_some() { o.last_seq } else { pos.after };
            o.last_seq = pos.after;
            return Tracked { missed, suspicious: false };
        }
        if let Some(claim) = o.claim
            && within_jump(claim.after, pos.after)
        {
            // A second message agrees with the claim: that is where the origin is.
            // What came before the claim was repaired for when it arrived.
            o.claim = None;
            o.settled = claim.after;
            o.last_seq = pos.after;
            return Tracked { missed: missed_after(claim.after, pos.top), suspicious: false };
        }
        let ahead = pos.after > o.last_seq;
        // Ahead: the numbers between are missed if the claim is true. Behind: the
        // tracked number may be the forged one, and the claim where the origin really
        // is, so what it sent since the last settled number may be missed. Either way,
        // one repair makes the claim safe to act on (and to acknowledge).
        let missed = missed_after(if ahead { o.last_seq } else { o.settled }, pos.top);
        let suspicious = ahead || o.last_seq.saturating_sub(pos.after) > REORDER_WINDOW;
        o.claim = Some(Claim { after: pos.after });
        Tracked { missed, suspicious }
    }

    /// Every origin tracked, with when it was last heard.
    pub(crate) fn heard(&self) -> impl Iterator<Item = (OriginId, Timestamp)> + '_ {
        self.map.iter().map(|(&id, o)| (id, o.last_heard))
    }

    /// Forgets `origin` (it said it left).
    pub(crate) fn forget(&mut self, origin: OriginId) {
        self.map.remove(&origin);
    }

    /// Forgets the origins not heard for `forget_after`, once there are many.
    pub(crate) fn prune(&mut self, now: Timestamp, forget_after: Duration) {
        if self.map.len() > MAX_ORIGINS {
            self.map.retain(|_, o| now.since(o.last_heard) < forget_after);
        }
    }
}

/// Whether `after` is at most [`MAX_JUMP`] ahead of `last` (not behind it).
fn within_jump(last: u64, after: u64) -> bool {
    after.checked_sub(last).is_some_and(|d| d <= MAX_JUMP)
}

/// The numbers after `last` up to `top`, if any.
fn missed_after(last: u64, top: u64) -> Option<(u64, u64)> {
    let from = last.checked_add(1)?;
    (from <= top).then_some((from, top))
}

/// Whether `replayed` is exactly what was asked for: `origin`'s invalidations in
/// `namespace` numbered `from..=to`, each once. Anything else repairs nothing.
pub(crate) fn replay_covers(
    replayed: &[Message],
    origin: OriginId,
    namespace: &str,
    from: u64,
    to: u64,
) -> bool {
    let Some(wanted) = to.checked_sub(from).and_then(|n| n.checked_add(1)) else { return false };
    let all_fit = replayed.iter().all(|m| {
        m.origin == origin && m.namespace == namespace && !m.is_control() && (from..=to).contains(&m.seq)
    });
    if !all_fit {
        return false;
    }
    let mut seqs: Vec<u64> = replayed.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.len() as u64 == wanted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;

    const A: OriginId = 7;
    const ME: OriginId = 9;

    fn msg(seq: u64, body: MessageBody) -> Message {
        Message { origin: A, seq, namespace: "ns".into(), body, sent_at_ms: 0 }
    }

    fn inv(seq: u64) -> Position {
        Position::of(&msg(seq, MessageBody::Invalidate(Scope::All)), ME, 0).expect("plausible")
    }

    fn hb(seq: u64) -> Position {
        Position::of(&msg(seq, MessageBody::Heartbeat), ME, 0).expect("plausible")
    }

    fn t(o: &mut Origins, pos: Position) -> Tracked {
        o.track(A, pos, Timestamp(1))
    }

    /// An origin known at `seq` (everything up to it seen).
    fn known_at(seq: u64) -> Origins {
        let mut o = Origins::default();
        t(&mut o, hb(0));
        for s in 1..=seq {
            assert_eq!(t(&mut o, inv(s)).missed, None);
        }
        o
    }

    #[test]
    fn implausible_messages_have_no_position() {
        let m = |origin, seq, body| Message { origin, seq, namespace: "ns".into(), body, sent_at_ms: 0 };
        assert_eq!(Position::of(&m(0, 3, MessageBody::Heartbeat), ME, 5), None, "origin 0");
        assert_eq!(Position::of(&m(A, u64::MAX, MessageBody::Heartbeat), ME, 5), None);
        assert_eq!(Position::of(&m(A, MAX_PLAUSIBLE_SEQ, MessageBody::Heartbeat), ME, 5), None);
        assert_eq!(Position::of(&m(A, 0, MessageBody::Invalidate(Scope::All)), ME, 5), None, "first is 1");
        let ack = |seq| MessageBody::Ack { to: ME, seq };
        assert_eq!(Position::of(&m(A, 3, ack(6)), ME, 5), None, "acknowledges what was never sent");
        assert!(Position::of(&m(A, 3, ack(5)), ME, 5).is_some());
        assert!(Position::of(&m(A, 3, MessageBody::Ack { to: 11, seq: 99 }), ME, 5).is_some(), "not ours");
    }

    #[test]
    fn gaps_are_found_from_messages_and_heartbeats() {
        let mut o = known_at(3);
        assert_eq!(t(&mut o, inv(6)).missed, Some((4, 5)));
        assert_eq!(t(&mut o, hb(8)).missed, Some((7, 8)), "a heartbeat repeats the last number");
        assert_eq!(t(&mut o, hb(8)).missed, None);
    }

    #[test]
    fn a_far_jump_ahead_costs_one_repair_and_is_not_believed_alone() {
        let mut o = known_at(5);
        let forged = t(&mut o, hb(5 + MAX_JUMP + 1));
        assert_eq!(forged.missed, Some((6, 5 + MAX_JUMP + 1)));
        assert!(forged.suspicious);
        // The origin's real heartbeats and messages fit where it was tracked.
        for _ in 0..10 {
            assert_eq!(t(&mut o, hb(5)), Tracked { missed: None, suspicious: false });
        }
        assert_eq!(t(&mut o, inv(6)).missed, None);
        assert_eq!(t(&mut o, inv(8)).missed, Some((7, 7)), "a real gap is still found");
    }

    #[test]
    fn a_real_far_jump_is_believed_once_confirmed() {
        let mut o = known_at(5);
        let far = 5 + 3 * MAX_JUMP;
        assert!(t(&mut o, hb(far)).missed.is_some());
        assert_eq!(t(&mut o, hb(far)), Tracked { missed: None, suspicious: false });
        assert_eq!(t(&mut o, inv(far + 1)).missed, None);
        assert_eq!(t(&mut o, inv(far + 3)).missed, Some((far + 2, far + 2)));
    }

    #[test]
    fn a_forged_jump_within_range_costs_one_repair_and_the_real_sequence_takes_over() {
        let mut o = known_at(5);
        assert_eq!(t(&mut o, inv(500)).missed, Some((6, 499)), "looks like a gap: repaired");
        // The real origin goes on from 5: behind, but nothing it sent is missed.
        assert_eq!(t(&mut o, hb(5)).missed, None);
        assert_eq!(t(&mut o, inv(6)).missed, None, "confirmed: tracked from here");
        assert_eq!(t(&mut o, inv(7)).missed, None);
        assert_eq!(t(&mut o, inv(9)).missed, Some((8, 8)), "a real gap is still found");
    }

    #[test]
    fn after_a_forged_jump_a_real_message_lost_meanwhile_is_repaired() {
        let mut o = known_at(5);
        assert!(t(&mut o, inv(500)).missed.is_some());
        // The real 6 was lost; 7 arrives behind the forged number.
        assert_eq!(t(&mut o, inv(7)).missed, Some((6, 6)));
        assert_eq!(t(&mut o, inv(8)).missed, None);
    }

    #[test]
    fn a_forged_number_far_behind_costs_nothing() {
        let mut o = known_at(5_000);
        let forged = t(&mut o, hb(3));
        assert_eq!(forged.missed, None, "everything up to 3 was seen");
        assert!(forged.suspicious);
        assert_eq!(t(&mut o, hb(5_000)), Tracked { missed: None, suspicious: false });
        assert_eq!(t(&mut o, inv(5_002)).missed, Some((5_001, 5_001)));
    }

    #[test]
    fn a_late_message_is_not_suspicious() {
        let mut o = known_at(3);
        assert_eq!(t(&mut o, inv(5)).missed, Some((4, 4)));
        assert_eq!(t(&mut o, inv(4)), Tracked { missed: None, suspicious: false });
        assert_eq!(t(&mut o, inv(6)).missed, None);
    }

    #[test]
    fn nothing_overflows_at_the_edges() {
        let mut o = Origins::default();
        let top = MAX_PLAUSIBLE_SEQ - 1;
        assert_eq!(t(&mut o, hb(top)).missed, Some((1, top)));
        assert_eq!(t(&mut o, hb(top)).missed, None);
        assert_eq!(t(&mut o, hb(0)).missed, None);
        assert_eq!(missed_after(u64::MAX, u64::MAX), None);
    }

    #[test]
    fn a_replay_must_be_exactly_what_was_asked() {
        let m = |origin, seq, ns: &str| Message {
            origin,
            seq,
            namespace: ns.into(),
            body: MessageBody::Invalidate(Scope::All),
            sent_at_ms: 0,
        };
        let good = vec![m(A, 4, "ns"), m(A, 5, "ns")];
        assert!(replay_covers(&good, A, "ns", 4, 5));
        assert!(!replay_covers(&good[..1], A, "ns", 4, 5), "one missing");
        assert!(
            !replay_covers(&[m(A, 4, "ns"), m(A, 4, "ns")], A, "ns", 4, 5),
            "a duplicate is not the other"
        );
        assert!(!replay_covers(&[m(A, 4, "ns"), m(3, 5, "ns")], A, "ns", 4, 5), "another origin");
        assert!(!replay_covers(&[m(A, 4, "ns"), m(A, 5, "other")], A, "ns", 4, 5), "another namespace");
        assert!(!replay_covers(&[m(A, 4, "ns"), m(A, 6, "ns")], A, "ns", 4, 5), "out of range");
        assert!(!replay_covers(&good, A, "ns", 5, 4));
    }
}
