//! What the two Redis backplanes share: their counters ([`BackplaneStats`]), the
//! publishing connection (opened and checked the same way), and the reconnect defaults
//! of their subscribers.
//!
//! - [`stream`]: [`RedisStreamBackplane`](stream::RedisStreamBackplane), a capped Redis
//!   Stream that replays what a subscriber missed (its Lua scripts in `stream_scripts`).
//! - [`pubsub`]: [`RedisPubSubBackplane`](pubsub::RedisPubSubBackplane), Redis Pub/Sub,
//!   at most once.
//!
//! With integrity keys (`integrity_keys` on either builder), the bytes published (the
//! stream entry's `m` field, the Pub/Sub payload) are the encoded message followed by a
//! 32-byte HMAC-SHA256 over the channel or stream name and the message; what does not
//! verify is reported as `Malformed` (see the crate docs, "Sharing a Redis").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;
use strata::backplane::{BackplaneEvent, Message};
use strata::error::{Error, ErrorKind};

use crate::cluster::Connector;
use crate::connection::ConnectionOptions;
use crate::integrity::{Integrity, open_opt, seal_opt};
use crate::managed::ManagedConn;

mod digest;
pub mod pubsub;
pub mod stream;
mod stream_builder;

mod stream_inner;
mod stream_push;
mod stream_reader;
pub(crate) mod stream_scripts;

/// Default bounds of a subscriber's reconnect backoff (jittered).
pub(crate) const DEFAULT_RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_secs(1));

/// Default timeout of a publish.
pub(crate) const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_millis(100);

/// Default capacity of a subscription's channel, in events.
pub(crate) const DEFAULT_CHANNEL_CAPACITY: usize = 4096;

/// Consecutive publish timeouts after which the publishing connection is replaced.
const PUBLISHER_RECONNECT_AFTER: u32 = 8;

/// Counters of a Redis backplane, shared by all its subscriptions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackplaneStats {
    /// Messages published by this handle.
    pub published: u64,
    /// Messages delivered to subscriptions.
    pub delivered: u64,
    /// Undecodable entries skipped (each reported as `Malformed`).
    pub malformed: u64,
    /// Times a loss was reported (`Lost`).
    pub lost: u64,
    /// Times a subscription lost its connection (`Disconnected`).
    pub disconnects: u64,
    /// Times a subscription came back (`Resumed`).
    pub resumes: u64,
    /// Times a publish found the stream or its counter unusable (written by someone
    /// else) and replaced it; always 0 for Pub/Sub.
    pub repairs: u64,
    /// Reads the subscriptions sent (stream: each blocking `XREAD`, and each read of
    /// the stream at a subscribe, a catch-up or a quiet block time; a push costs none;
    /// always 0 for Pub/Sub): with `published`, the commands this handle sent.
    pub reads: u64,
}

#[derive(Default)]
pub(crate) struct StatCounters {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) resumes: AtomicU64,
    pub(crate) repairs: AtomicU64,
    pub(crate) reads: AtomicU64,
}

impl StatCounters {
    pub(crate) fn snapshot(&self) -> BackplaneStats {
        BackplaneStats {
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            resumes: self.resumes.load(Ordering::Relaxed),
            repairs: self.repairs.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }

    /// Counts an event about to be sent.
    pub(crate) fn count(&self, ev: &BackplaneEvent, backplane: &'static str) {
        let c = match ev {
            BackplaneEvent::Message(_) => &self.delivered,
            BackplaneEvent::Malformed => {
                metrics::counter!("strata_backplane_malformed_total", "backplane" => backplane).increment(1);
                &self.malformed
            }
            BackplaneEvent::Lost => {
                metrics::counter!("strata_backplane_lost_total", "backplane" => backplane).increment(1);
                &self.lost
            }
            BackplaneEvent::Disconnected => {
                metrics::counter!("strata_backplane_disconnects_total", "backplane" => backplane)
                    .increment(1);
                &self.disconnects
            }
            BackplaneEvent::Resumed { .. } => &self.resumes,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The domain of message MACs: a message is signed with the channel or stream it is
/// published on, so bytes signed for one prefix do not verify on another.
const MESSAGE_DOMAIN: &str = "strata-backplane-message-v1";

/// A message as published on `channel`: its encoding, followed by its MAC when
/// integrity keys are set (the core `Message` stays as it is).
pub(crate) fn seal_message(
    integrity: Option<&Integrity>,
    channel: &str,
    message: &Message,
) -> Result<Vec<u8>, Error> {
    let bytes = message.encode()?;
    Ok(seal_opt(integrity, MESSAGE_DOMAIN, channel.as_bytes(), bytes.to_vec()))
}

/// The message in bytes read from `channel`: `None` when they do not decode or, with
/// integrity keys, carry no valid MAC (the caller reports `Malformed`).
pub(crate) fn open_message(integrity: Option<&Integrity>, channel: &str, bytes: &[u8]) -> Option<Message> {
    let payload = open_opt(integrity, MESSAGE_DOMAIN, channel.as_bytes(), bytes)?;
    Message::decode(payload).ok()
}

/// Opens the client and a backplane's publishing connection on it. The client also
/// opens the subscribers' dedicated connections.
pub(crate) fn connect_publisher(
    options: &ConnectionOptions,
    shared: Option<&SharedConnection>,
    what: &str,
) -> Result<(Connector, Arc<ManagedConn>), Error> {
    let client = Connector::open(options, what)?;
    let publisher = match shared {
        Some(s)
            if s.options.url == options.url
                && s.options.tls == options.tls
                && s.options.cluster_nodes == options.cluster_nodes =>
        {
            s.conn.clone()
        }
        Some(s) => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{what}: share_connection: the tier connects to `{}`, this backplane to `{}`; \
                     share only a connection to the same server with the same credentials",
                    s.options.redacted_url(),
                    options.redacted_url()
                ),
            ));
        }
        None => Arc::new(ManagedConn::new(client.clone(), options, PUBLISHER_RECONNECT_AFTER, what)?),
    };
    Ok((client, publisher))
}

/// A tier's connection that a backplane publishes through (`share_connection`).
#[derive(Clone)]
pub(crate) struct SharedConnection {
    pub(crate) conn: Arc<ManagedConn>,
    pub(crate) options: ConnectionOptions,
}

impl SharedConnection {
    pub(crate) fn of(tier: &crate::RedisTier) -> Self {
        let (conn, options) = tier.shared_connection();
        SharedConnection { conn, options: options.clone() }
    }
}

/// Sends a `PING` on a backplane's publishing connection within `timeout`; `ping_what`
/// names the call, `what` the backplane in the error that says what to check.
pub(crate) async fn ping_publisher(
    publisher: &ManagedConn,
    timeout: Duration,
    what: &str,
    ping_what: &'static str,
) -> Result<(), Error> {
    publisher
        .call(timeout, ErrorKind::Backplane, ping_what, |mut c| async move {
            redis::cmd("PING").query_async::<Value>(&mut c).await
        })
        .await
        .map_err(|e| {
            let e = e.into_error();
            Error::new(
                e.kind(),
                format!(
                    "{what}: cannot reach `{}`: {e}; check that the server runs, the URL's \
                     host/port and the ACL credentials",
                    publisher.shown_url()
                ),
            )
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::stream_scripts::{parse_entries, parse_xread_streams};
    use strata::Scope;
    use strata::backplane::MessageBody;
    use strata_testkit::alloc::largest_allocation;

    /// serde's cap on what a sequence's length claim preallocates.
    const MAX_PREALLOC: usize = 1 << 20;

    fn integrity() -> Integrity {
        Integrity::from_keys(Some(&[crate::IntegrityKey::new(vec![7; 32])]), "test")
            .expect("a valid key")
            .expect("keys set")
    }

    /// A Pub/Sub payload or a stream entry's `m` field whose key count claims
    /// gigabytes is malformed, and opening it allocates at most serde's cap, with or
    /// without integrity keys (the MAC is checked first, over the bytes as they are).
    #[test]
    fn a_message_claiming_gigabytes_does_not_allocate_them() {
        let m = Message {
            origin: 7,
            seq: 1,
            namespace: "ns".into(),
            body: MessageBody::Invalidate(Scope::Keys(vec!["k".into()])),
            sent_at_ms: 0,
        };
        let i = integrity();
        let good = seal_message(Some(&i), "ch", &m).expect("seals");
        assert_eq!(open_message(Some(&i), "ch", &good), Some(m.clone()));
        // The key count (1) sits before `1, b'k'`: claim 2^32 - 1 keys instead.
        let plain = m.encode().expect("encodes").to_vec();
        let at = plain.windows(2).rposition(|w| w == [1, 1]).expect("the key count");
        let mut huge = plain[..at].to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, b'k']);
        let (opened, largest) = largest_allocation(|| open_message(None, "ch", &huge));
        assert_eq!(opened, None);
        assert!(largest <= MAX_PREALLOC, "allocated {largest} bytes");
        let sealed = i.seal(MESSAGE_DOMAIN, b"ch", &huge);
        let (opened, largest) = largest_allocation(|| open_message(Some(&i), "ch", &sealed));
        assert_eq!(opened, None, "a signed but malformed message is still malformed");
        assert!(largest <= MAX_PREALLOC, "allocated {largest} bytes");
    }

    /// What the backplanes read goes through the client's RESP parser first: array and
    /// string lengths that claim gigabytes fail on the missing bytes without being
    /// allocated.
    #[test]
    fn a_reply_claiming_gigabytes_does_not_allocate_them() {
        for reply in [
            &b"*4294967295\r\n"[..],
            b"*2\r\n$4294967295\r\nab\r\n",
            b"*1\r\n*2\r\n$3\r\n1-1\r\n*9223372036854775807\r\n$1\r\nm\r\n",
            b"%4294967295\r\n",
            b"~4294967295\r\n",
            b"$9223372036854775807\r\nabc\r\n",
        ] {
            let (parsed, largest) = largest_allocation(|| redis::parse_redis_value(reply));
            assert!(parsed.is_err(), "{:?} parsed", String::from_utf8_lossy(reply));
            assert!(
                largest <= MAX_PREALLOC,
                "{:?}: allocated {largest} bytes",
                String::from_utf8_lossy(reply)
            );
        }
        // What does parse is read without surprises.
        let ok = redis::parse_redis_value(b"*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$1\r\nx\r\n")
            .expect("parses");
        let entries = parse_entries(&ok).expect("entries");
        assert_eq!(entries[0].message.as_deref(), Some(&b"x"[..]));
        assert!(parse_xread_streams(&ok).is_none(), "not an XREAD reply");
    }
}
