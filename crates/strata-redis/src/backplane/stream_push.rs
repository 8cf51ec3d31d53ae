//! A subscription's reader under push delivery
//! ([`StreamDelivery::PubSub`](super::stream_builder::StreamDelivery::PubSub)): the
//! publish and heartbeat scripts publish each entry they append on a channel named
//! like the stream, and the reader receives it as a RESP3 push on its own connection,
//! where a blocking read costs Redis one `XREAD` per subscriber and entry.
//!
//! The stream stays the log, and the reader reads it, on the same connection, whenever
//! a push cannot be the whole story: an entry numbered other than the one after the
//! last delivered (one that was not pushed: appended by an older release or a reader
//! behind on its queue), pushes dropped because the queue was full, a block time and
//! a read grace with no entry pushed (which also sees a stream deleted or re-created, as in
//! [`stream_reader`](super::stream_reader)), and a reconnect. An entry read there and
//! pushed as well is delivered once: pushes at or below the last id delivered are
//! dropped. Acknowledgements addressed to this origin are pushed to it; one that
//! reached no subscriber of the origin's channel (its connection was down) is
//! appended to the origin's acknowledgement stream instead, which the origin reads
//! after it reconnects. One lost in flight with a connection makes its origin wait for
//! the sender's lease.

use std::sync::atomic::Ordering;

use redis::{PushKind, Value};
use strata::backplane::{BackplaneEvent, MessageBody};
use strata::error::{Error, ErrorKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backplane::open_message;
use crate::backplane::stream_reader::{Gaps, Stop, StreamReader};
use crate::backplane::stream_scripts::{parse_entries, push_payload};
use crate::cluster::RedisConn;
use crate::reply::{bad_reply, value_bytes};

impl StreamReader {
    /// Delivers pushes until the connection fails or the receiver is gone.
    pub(crate) async fn push_loop(
        &mut self,
        c: &mut RedisConn,
        pushes: &mut mpsc::Receiver<redis::PushInfo>,
    ) -> Stop {
        // Longer than a blocking read's wait: the digests of a quiet fleet come once per
        // heartbeat interval (1 s by default, like `block`), and a read at every
        // digest that came a little late cost a catch-up per subscriber and second.
        let quiet = self.inner.cfg.block + self.inner.cfg.read_grace;
        let mut last_entry = Instant::now();
        loop {
            if self.overflow.swap(false, Ordering::Relaxed) {
                tracing::debug!(subscriber = %self.name, "redis stream backplane: pushes dropped, reading the stream");
                if let Err(stop) = self.catch_up(c, Gaps::Report).await {
                    return stop;
                }
                last_entry = Instant::now();
            }
            let next = tokio::select! {
                _ = self.tx.closed() => return Stop::Closed,
                next = tokio::time::timeout_at(last_entry + quiet, pushes.recv()) => next,
            };
            let push = match next {
                Err(_) => {
                    // No entry for that long: a quiet stream, or one this
                    // connection's pushes do not show (see `read_loop`'s idle read).
                    if let Err(stop) = self.catch_up(c, Gaps::Report).await {
                        return stop;
                    }
                    last_entry = Instant::now();
                    continue;
                }
                Ok(None) => return Stop::Failed(disconnected()),
                Ok(Some(push)) => push,
            };
            match push.kind {
                PushKind::Message => {}
                PushKind::Disconnection => return Stop::Failed(disconnected()),
                // Subscription confirmations and anything else a server pushes.
                _ => continue,
            }
            let channel = push.data.first().and_then(value_bytes);
            let payload = push.data.get(1).and_then(value_bytes);
            let (Some(channel), Some(payload)) = (channel, payload) else { continue };
            let r = if channel == self.inner.stream_key.as_bytes() {
                last_entry = Instant::now();
                self.pushed(c, payload).await
            } else if channel == self.inner.reload_channel.as_bytes() {
                self.pushed_reload(payload).await
            } else if self.acks.as_ref().is_some_and(|(k, _)| k.as_bytes() == channel) {
                self.deliver_ack_bytes(Some(payload)).await
            } else {
                Ok(())
            };
            if let Err(stop) = r {
                return stop;
            }
        }
    }

    /// Delivers a pushed entry, after reading the stream when it is not the next one.
    async fn pushed(&mut self, c: &mut RedisConn, payload: &[u8]) -> Result<(), Stop> {
        let Some(e) = push_payload(payload) else {
            tracing::warn!(subscriber = %self.name, "redis stream backplane: malformed push skipped");
            return self.send(BackplaneEvent::Malformed).await;
        };
        if e.id <= self.last_id {
            // Read from the stream already (a catch-up ran after it was appended).
            return Ok(());
        }
        let (integrity, stream) = (self.inner.integrity.as_ref(), &self.inner.stream_key);
        let Some(message) = e.message.as_deref().and_then(|b| open_message(integrity, stream, b)) else {
            // Anyone allowed to publish on the channel chooses the id and the number
            // (a MAC covers neither): they must not move the reader's position. An
            // entry of the stream that does not open is skipped by the stream's read.
            tracing::warn!(subscriber = %self.name, "redis stream backplane: push that does not open skipped");
            return self.send(BackplaneEvent::Malformed).await;
        };
        if let (Some(last), Some(n)) = (self.last_n, e.number)
            && last.checked_add(1) != Some(n)
        {
            // Something between was not pushed to this connection: the stream has it.
            self.catch_up(c, Gaps::Report).await?;
            if e.id <= self.last_id {
                return Ok(());
            }
        }
        self.deliver_opened(e.id, e.number, Some(message), Gaps::Report).await.map(|_| ())
    }

    /// Delivers a pushed reload as it comes: it takes no part in the stream's numbering
    /// or order (see `RedisStreamBackplane::publish`). Anything else on its channel is
    /// malformed.
    async fn pushed_reload(&mut self, payload: &[u8]) -> Result<(), Stop> {
        match open_message(self.inner.integrity.as_ref(), &self.inner.reload_channel, payload) {
            Some(m) if matches!(m.body, MessageBody::Reload { .. }) => {
                self.send(BackplaneEvent::Message(m)).await
            }
            _ => {
                tracing::debug!(subscriber = %self.name, "redis stream backplane: malformed reload skipped");
                self.send(BackplaneEvent::Malformed).await
            }
        }
    }

    /// After a reconnect, delivers the acknowledgements kept in this origin's stream:
    /// a member whose `PUBLISH` reached no subscriber of the origin's channel (this
    /// connection was down) appends it there instead.
    pub(crate) async fn catch_up_acks(&mut self, c: &mut RedisConn) -> Result<(), Stop> {
        let Some((key, last)) = self.acks.as_ref() else { return Ok(()) };
        let Some(from) = last.successor() else { return Ok(()) };
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key).arg(from.to_string()).arg("+").arg("COUNT").arg(self.inner.cfg.batch);
        let v = self.read("redis stream acknowledgements", cmd.query_async::<Value>(c)).await?;
        let entries = parse_entries(&v)
            .ok_or_else(|| Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream acknowledgements")))?;
        for e in entries {
            self.deliver_ack(e).await?;
        }
        Ok(())
    }
}

fn disconnected() -> Error {
    Error::new(ErrorKind::Backplane, "redis stream subscriber: the connection closed")
}
