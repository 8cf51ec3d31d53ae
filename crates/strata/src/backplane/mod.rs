//! The backplane port: how invalidations travel between the instances of a fleet.
//!
//! Every [`Message`] carries its origin (one id per `Cache` handle) and a sequence
//! number that origin increments by one per message, so a receiver can tell when it
//! missed something. Heartbeats carry the origin's current sequence number, so a lost
//! *last* message is detected too. The core (not the backplane) tracks sequence numbers
//! and heartbeats; a backplane only has to deliver what it can and say when it knows it
//! lost something (a dropped subscription, a trimmed stream) through [`BackplaneEvent`].

mod in_process;

pub use in_process::{FaultControl, InProcessBackplane, Mode};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::scope::Scope;

/// Identifies one publishing `Cache` handle.
pub type OriginId = u64;

/// One invalidation (or heartbeat) on the backplane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who sent it.
    pub origin: OriginId,
    /// The origin's sequence number: 1, 2, 3… with no gaps. A heartbeat repeats the
    /// last sequence number used.
    pub seq: u64,
    /// The namespace it applies to.
    pub namespace: String,
    /// What to invalidate.
    pub body: MessageBody,
    /// The sender's wall clock at publish, in ms since the Unix epoch; 0 when unknown
    /// (a format-2 sender). Receivers measure the propagation lag with it, across two
    /// machines' clocks, so only as well as those agree; never used for correctness.
    pub sent_at_ms: u64,
}

/// A message without its send time: what every format-2 decoder reads first.
#[derive(Deserialize)]
struct MessageV2 {
    origin: OriginId,
    seq: u64,
    namespace: String,
    body: MessageBody,
}

/// Wall-clock milliseconds since the Unix epoch, for [`Message::sent_at_ms`].
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a message asks receivers to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Drop what `Scope` covers.
    Invalidate(Scope),
    /// Liveness: the origin is alive and its last sequence number is `seq`; none of its
    /// invalidations waits in its retry buffer.
    Heartbeat,
    /// Strong level: an L2 delete failed, so L2 may hold stale entries. Receivers
    /// bypass the cache until they have cleaned L2 themselves (a namespace bump).
    Bypass,
    /// Strong level: the sender applied every message of origin `to` up to `seq`.
    /// Like a heartbeat, it carries the sender's last sequence number without using a new one.
    Ack {
        /// The origin whose messages are acknowledged.
        to: OriginId,
        /// Its sequence number acknowledged.
        seq: u64,
    },
    /// Liveness, like [`MessageBody::Heartbeat`], from an origin some of whose L2
    /// invalidations wait in its retry buffer (the delete failed, after its commit): L2
    /// may still hold what they cover. Receivers trust no entry older than `max_stale`,
    /// from L1 or L2, until the origin sends a plain heartbeat again. (Last, so that the
    /// other variants keep their encoding; a receiver that does not know it counts it
    /// as malformed and ignores it.)
    BufferedHeartbeat,
    /// The latest heartbeat of every origin the backplane heard lately, sent once per
    /// heartbeat interval by a backplane that aggregates them ([`Backplane::heartbeat`]):
    /// each receiver gets one message per interval instead of one per member. Its own
    /// origin and sequence number are 0: it speaks for the origins it lists. (Last, like
    /// `BufferedHeartbeat`: an older receiver counts it as malformed.)
    Digest(Vec<Beat>),
    /// The origin is shutting down with nothing left to deliver: every number up to
    /// `seq` was published or given up, and no L2 invalidation of its waits in a retry
    /// buffer. Receivers forget it at once instead of doubting it once it falls silent.
    /// (Last, like `Digest`: an older receiver counts it as malformed, and doubts the
    /// origin when it falls silent, as it would after a crash.)
    Leave,
    /// A reload after an invalidation: the origin loaded `key` again after applying its
    /// invalidation `after` (an origin and sequence number: the message that dropped the
    /// key there), and L2 took the value. A receiver whose last word on `key` is that
    /// same message, and which held the key when it dropped it, may install `entry` in
    /// L1 instead of reading L2 again (see [`CacheBuilder::push_reloads`]). Like a
    /// heartbeat, it carries the sender's last sequence number without using a new one:
    /// a lost one costs a read, never a repair. (Last, like `Leave`: an older receiver
    /// counts it as malformed and ignores it.)
    ///
    /// [`CacheBuilder::push_reloads`]: crate::CacheBuilder::push_reloads
    Reload {
        /// The key reloaded.
        key: String,
        /// The invalidation the reload follows: `(origin, seq)`.
        after: (OriginId, u64),
        /// The entry as L2 stored it (its stamp left 0).
        entry: Box<crate::tier::Envelope>,
    },
}

/// One origin's latest heartbeat, as a [`MessageBody::Digest`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Whose heartbeat.
    pub origin: OriginId,
    /// Its last sequence number, as in [`MessageBody::Heartbeat`].
    pub seq: u64,
    /// Counts the origin's heartbeats: a digest that repeats an entry whose count did
    /// not change (the origin has not beaten since, or is gone) tells nothing new.
    pub beat: u64,
    /// Some of its L2 invalidations wait in its retry buffer
    /// ([`MessageBody::BufferedHeartbeat`]).
    pub buffered: bool,
    /// How long before the digest was sent the backplane received this heartbeat, in
    /// ms (by the backplane's clock; Redis's, for a Redis backplane).
    pub age_ms: u64,
}

impl Beat {
    /// The heartbeat message this entry stands for, in `namespace`.
    pub fn to_message(&self, namespace: &str, sent_at_ms: u64) -> Message {
        Message {
            origin: self.origin,
            seq: self.seq,
            namespace: namespace.to_owned(),
            body: if self.buffered { MessageBody::BufferedHeartbeat } else { MessageBody::Heartbeat },
            sent_at_ms,
        }
    }
}

/// The first byte of every encoded message, so the format can evolve.
///
/// 2: the body of an invalidation is one [`Scope`] (1 had a variant per kind). The send
/// time ([`Message::sent_at_ms`]) follows the body as one more postcard varint, which a
/// decoder that does not know it ignores (postcard reads a value and leaves what
/// follows): senders with and without it understand each other, so a fleet can be
/// upgraded one instance at a time.
const WIRE_FORMAT: u8 = 2;

impl Message {
    /// Encodes the message for a wire (format byte + postcard, the send time last).
    pub fn encode(&self) -> Result<Bytes> {
        let mut out = vec![WIRE_FORMAT];
        postcard::to_io(self, &mut out)
            .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode backplane message").with_source(e))?;
        Ok(Bytes::from(out))
    }

    /// Decodes a message; malformed input is an error the receiver counts and ignores.
    /// A message without a send time (an older sender) gets `sent_at_ms` 0.
    pub fn decode(bytes: &[u8]) -> Result<Message> {
        let malformed = |e| Error::new(ErrorKind::Codec, "malformed backplane message").with_source(e);
        match bytes.split_first() {
            Some((&WIRE_FORMAT, rest)) => {
                let (m, rest) = postcard::take_from_bytes::<MessageV2>(rest).map_err(malformed)?;
                let sent_at_ms = postcard::from_bytes::<u64>(rest).unwrap_or(0);
                Ok(Message { origin: m.origin, seq: m.seq, namespace: m.namespace, body: m.body, sent_at_ms })
            }
            Some((other, _)) => {
                Err(Error::new(ErrorKind::Codec, format!("unknown backplane message format {other}")))
            }
            None => Err(Error::new(ErrorKind::Codec, "empty backplane message")),
        }
    }

    /// True for heartbeats (plain or buffered).
    pub fn is_heartbeat(&self) -> bool {
        matches!(self.body, MessageBody::Heartbeat | MessageBody::BufferedHeartbeat)
    }

    /// True for messages that invalidate nothing and use no sequence number of their
    /// own (heartbeats, digests of them, acknowledgements, leaving notices and reloads).
    pub fn is_control(&self) -> bool {
        matches!(
            self.body,
            MessageBody::Heartbeat
                | MessageBody::BufferedHeartbeat
                | MessageBody::Ack { .. }
                | MessageBody::Digest(_)
                | MessageBody::Leave
                | MessageBody::Reload { .. }
        )
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackplaneEvent {
    /// A message, in the order the backplane delivered it.
    Message(Message),
    /// The subscription was lost; messages may be missed until [`BackplaneEvent::Resumed`].
    Disconnected,
    /// The subscription is back. `complete` is true when the backplane replayed
    /// everything published while it was away (a stream); false when it could not
    /// (Pub/Sub), in which case the receiver must repair by flushing.
    Resumed {
        /// Whether nothing was lost.
        complete: bool,
    },
    /// The backplane knows messages were lost (a trimmed stream, a lagging receiver).
    Lost,
    /// A message that could not be decoded was received and skipped.
    Malformed,
}

/// The receiving end of a subscription. Bounded: a receiver that falls behind gets a
/// [`BackplaneEvent::Lost`] rather than unbounded memory growth.
pub type Subscription = mpsc::Receiver<BackplaneEvent>;

/// The backplane port. Object safe (`Arc<dyn Backplane>`).
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// A short name for metrics and logs.
    fn name(&self) -> &str;

    /// Publishes a message. Returns once the message is durable on the backplane (for a
    /// stream) or handed to it (Pub/Sub).
    async fn publish(&self, message: &Message) -> Result<()>;

    /// True when every subscriber of a namespace receives its invalidations, whatever
    /// their origins, in one order and without a hole it is not told of (one numbered
    /// stream, one Pub/Sub channel on one server, whose losses end the subscription):
    /// what a subscriber applied is a prefix of that order, or it knows it is not.
    /// Pushed reloads ([`MessageBody::Reload`]) rely on it: a receiver installs one only
    /// if the last invalidation it heard of the key is the one the sender's load
    /// followed, which then shows it heard no invalidation of the key the sender had not.
    /// Reloads themselves need no order. Default false: the cache then neither pushes
    /// nor installs reloads.
    fn delivers_in_one_order(&self) -> bool {
        false
    }

    /// Publishes `messages` in order, as one call where the backplane can (what queued
    /// behind a slow publish leaves together). An error means any suffix of them may
    /// not have been published; the caller may publish them again (receivers take a
    /// number seen twice as a late duplicate). The default publishes them one by one.
    async fn publish_batch(&self, messages: &[Message]) -> Result<()> {
        for message in messages {
            self.publish(message).await?;
        }
        Ok(())
    }

    /// Opens a subscription that receives every message published after it starts,
    /// including this process's own (receivers skip their own by origin id).
    async fn subscribe(&self) -> Result<Subscription>;

    /// Sends this instance's heartbeat: `message` is a [`MessageBody::Heartbeat`] or
    /// [`MessageBody::BufferedHeartbeat`] carrying its last sequence number, `beat`
    /// counts its heartbeats (1, 2, 3…), and it beats every `interval`.
    ///
    /// The default publishes it to every subscriber: in a fleet of N, N² deliveries
    /// per interval. A backplane that can aggregate keeps each origin's latest beat and
    /// delivers them all as one [`MessageBody::Digest`] per interval and namespace (N
    /// deliveries), listing only origins heard within the last few intervals and each
    /// entry's age; the receivers then hear a heartbeat when an origin's count changed.
    async fn heartbeat(&self, message: &Message, beat: u64, interval: std::time::Duration) -> Result<()> {
        let _ = (beat, interval);
        self.publish(message).await
    }

    /// Sends `message` to the subscription of origin `to` only (a Strong-level
    /// acknowledgement). The default publishes it to everyone, who skip what is not
    /// addressed to them.
    async fn publish_to(&self, to: OriginId, message: &Message) -> Result<()> {
        let _ = to;
        self.publish(message).await
    }

    /// Like [`Backplane::subscribe`], for origin `me`: the subscription also receives
    /// what [`Backplane::publish_to`] addresses to `me`. The default is `subscribe`.
    async fn subscribe_as(&self, me: OriginId) -> Result<Subscription> {
        let _ = me;
        self.subscribe().await
    }

    /// Asks for messages `from_seq..=to_seq` of `origin` again. `Ok(None)` means the
    /// backplane cannot replay (the receiver flushes instead).
    async fn replay(&self, origin: OriginId, from_seq: u64, to_seq: u64) -> Result<Option<Vec<Message>>> {
        let _ = (origin, from_seq, to_seq);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sent_at_ms: u64) -> Message {
        Message {
            origin: 7,
            seq: 42,
            namespace: "ns".into(),
            body: MessageBody::Invalidate(Scope::Keys(vec!["k".into()])),
            sent_at_ms,
        }
    }

    /// What a sender without the send time wrote: format 2, the struct, nothing after.
    #[derive(Serialize)]
    struct Old<'a> {
        origin: OriginId,
        seq: u64,
        namespace: &'a str,
        body: &'a MessageBody,
    }

    #[test]
    fn old_and_new_senders_understand_each_other() {
        let new = message(1_796_000_000_123);
        let bytes = new.encode().expect("encode");
        assert_eq!(Message::decode(&bytes).expect("decode"), new);
        // A decoder that knows only the struct reads the same message from new bytes.
        let old_view = postcard::from_bytes::<MessageV2>(&bytes[1..]).expect("an older decoder");
        assert_eq!((old_view.origin, old_view.seq, old_view.body), (7, 42, new.body.clone()));
        // An older sender's bytes decode with no send time.
        let mut old = vec![WIRE_FORMAT];
        let body = new.body.clone();
        postcard::to_io(&Old { origin: 7, seq: 42, namespace: "ns", body: &body }, &mut old).expect("encode");
        assert_eq!(Message::decode(&old).expect("decode"), message(0));
        assert!(Message::decode(&[3, 0]).is_err());
        assert!(Message::decode(&[]).is_err());
    }
}
