//! A subscription's reader task on the stream backplane (see the
//! [`stream`](super::stream) module docs for what it does on a loss or a reconnect).
//! With `subscribe_as`, the same `XREAD` also reads the stream of the
//! acknowledgements addressed to the subscriber's origin.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use redis::Value;
use strata::backplane::{BackplaneEvent, Message};
use strata::error::{Error, ErrorKind};
use tokio::sync::mpsc;

use crate::backplane::open_message;
use crate::backplane::stream_inner::{Connected, StreamInner};
use crate::backplane::stream_scripts::{RawEntry, StreamId, parse_entries, parse_xread_streams};
use crate::cluster::RedisConn;
use crate::connection::{Backoff, map_redis_error};
use crate::reply::{bad_reply, value_array, value_string, value_u64};

/// Why the reader stopped reading on its connection.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The receiver was dropped: end the task.
    Closed,
    /// The connection failed: reconnect.
    Failed(Error),
}

/// What a catch-up read does with a loss it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gaps {
    /// Returns it: after a reconnect the caller sends `Lost` then
    /// `Resumed { complete: false }`.
    Collect,
    /// Sends `Lost` where it is found: the subscription is connected.
    Report,
}

pub(crate) struct StreamReader {
    pub(crate) inner: Arc<StreamInner>,
    pub(crate) tx: mpsc::Sender<BackplaneEvent>,
    pub(crate) name: String,
    pub(crate) last_id: StreamId,
    /// The number of the last numbered entry read, or of the counter when the
    /// reader started or found entries gone; `None` when the counter could not be
    /// read (the next numbered entry then sets it).
    pub(crate) last_n: Option<u64>,
    pub(crate) backoff: Backoff,
    /// The stream of the acknowledgements addressed to this subscription's origin, and
    /// the last id read from it (`subscribe_as`; `None` for a plain `subscribe`). Under
    /// push delivery the key also names the channel they are pushed on, and the stream
    /// is read only after a reconnect.
    pub(crate) acks: Option<(String, StreamId)>,
    /// Set when a push did not fit in the connection's queue (see `stream_push`).
    pub(crate) overflow: Arc<AtomicBool>,
}

impl StreamReader {
    pub(crate) async fn send(&self, ev: BackplaneEvent) -> std::result::Result<(), Stop> {
        self.inner.stats.count(&ev, "redis-stream");
        self.tx.send(ev).await.map_err(|_| Stop::Closed)
    }

    /// Runs one read of the stream (counted), within the read grace: an error or a
    /// timeout fails the connection.
    pub(crate) async fn read(
        &self,
        what: &'static str,
        read: impl Future<Output = redis::RedisResult<Value>>,
    ) -> std::result::Result<Value, Stop> {
        let grace = self.inner.cfg.read_grace;
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(grace, read).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Stop::Failed(map_redis_error(ErrorKind::Backplane, what, e))),
            Err(_) => Err(Stop::Failed(Error::timeout(what, grace))),
        }
    }

    /// Delivers an acknowledgement read from this origin's ack stream (unnumbered: the
    /// ack stream is not the invalidation log, and an ack lost with it only makes its
    /// origin wait for the sender's lease).
    pub(crate) async fn deliver_ack(&mut self, e: RawEntry) -> std::result::Result<(), Stop> {
        let Some((_, last)) = self.acks.as_mut() else { return Ok(()) };
        *last = e.id;
        self.deliver_ack_bytes(e.message.as_deref()).await
    }

    /// Delivers an acknowledgement addressed to this origin, however it came (`None`:
    /// an entry without a message).
    pub(crate) async fn deliver_ack_bytes(&mut self, bytes: Option<&[u8]>) -> std::result::Result<(), Stop> {
        let Some((key, _)) = self.acks.as_ref() else { return Ok(()) };
        let ev = match bytes.and_then(|b| open_message(self.inner.integrity.as_ref(), key, b)) {
            Some(m) => BackplaneEvent::Message(m),
            None => BackplaneEvent::Malformed,
        };
        self.send(ev).await
    }

    /// Delivers one entry; returns true when it revealed a gap.
    pub(crate) async fn deliver(&mut self, e: RawEntry, gaps: Gaps) -> std::result::Result<bool, Stop> {
        let (integrity, stream) = (self.inner.integrity.as_ref(), &self.inner.stream_key);
        let message = e.message.as_deref().and_then(|b| open_message(integrity, stream, b));
        self.deliver_opened(e.id, e.number, message, gaps).await
    }

    /// [`deliver`](Self::deliver), its message opened (`None`: it did not open).
    pub(crate) async fn deliver_opened(
        &mut self,
        id: StreamId,
        number: Option<u64>,
        message: Option<Message>,
        gaps: Gaps,
    ) -> std::result::Result<bool, Stop> {
        let mut gap = false;
        let integrity = self.inner.integrity.as_ref();
        // Unverified entries have no say in the numbering: a forged number would fake a loss.
        if let Some(n) = number.filter(|_| message.is_some() || integrity.is_none()) {
            // No successor to u64::MAX (an entry numbered by hand): whatever follows is a gap.
            if let Some(last) = self.last_n
                && last.checked_add(1) != Some(n)
            {
                tracing::warn!(
                    subscriber = %self.name,
                    last_seen = last,
                    got = n,
                    "redis stream backplane: entries this subscriber had not read are gone (trimmed, \
                     or the stream or its counter replaced)"
                );
                gap = true;
                if gaps == Gaps::Report {
                    self.send(BackplaneEvent::Lost).await?;
                }
            }
            self.last_n = Some(n);
        }
        self.last_id = id;
        let ev = match message {
            Some(m) => BackplaneEvent::Message(m),
            None => {
                tracing::warn!(subscriber = %self.name, id = %self.last_id, "redis stream backplane: malformed entry skipped");
                BackplaneEvent::Malformed
            }
        };
        self.send(ev).await?;
        Ok(gap)
    }

    pub(crate) async fn run(mut self, conn: Connected) {
        let mut conn = Some(conn);
        loop {
            let (mut c, pushes) = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => return,
                },
            };
            let stop = match pushes {
                Some(mut pushes) => self.push_loop(&mut c, &mut pushes).await,
                None => self.read_loop(&mut c).await,
            };
            match stop {
                Stop::Closed => return,
                Stop::Failed(e) => {
                    tracing::warn!(subscriber = %self.name, error = %e, "redis stream backplane: subscription lost");
                    if self.send(BackplaneEvent::Disconnected).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reconnects with backoff and catches up; `None` when the receiver is gone.
    async fn reconnect(&mut self) -> Option<Connected> {
        let started = Instant::now();
        loop {
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            let ack_channel = self.acks.as_ref().map(|(k, _)| k.as_str());
            let (mut c, pushes) = match self.inner.open(&self.name, ack_channel, &self.overflow).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(subscriber = %self.name, error = %e, "redis stream backplane: reconnect failed");
                    continue;
                }
            };
            let caught_up = match self.catch_up(&mut c, Gaps::Collect).await {
                Ok(complete) if pushes.is_some() => self.catch_up_acks(&mut c).await.map(|()| complete),
                other => other,
            };
            match caught_up {
                Ok(complete) => {
                    self.backoff.reset();
                    tracing::info!(
                        subscriber = %self.name,
                        complete,
                        after = ?started.elapsed(),
                        "redis stream backplane: subscription resumed"
                    );
                    if !complete && self.send(BackplaneEvent::Lost).await.is_err() {
                        return None;
                    }
                    if self.send(BackplaneEvent::Resumed { complete }).await.is_err() {
                        return None;
                    }
                    return Some((c, pushes));
                }
                Err(Stop::Closed) => return None,
                Err(Stop::Failed(e)) => {
                    tracing::debug!(subscriber = %self.name, error = %e, "redis stream backplane: catch-up failed");
                }
            }
        }
    }

    /// Delivers everything after the last id, reading a stream that was deleted or
    /// re-created below that id from its start; returns whether nothing was lost.
    pub(crate) async fn catch_up(
        &mut self,
        c: &mut RedisConn,
        gaps: Gaps,
    ) -> std::result::Result<bool, Stop> {
        let mut complete = true;
        let inner = self.inner.clone();
        loop {
            // After the largest id nothing can come: read nothing, but still look at
            // the stream's last id and the counter.
            let from = self.last_id.successor().map(|id| id.to_string()).unwrap_or_default();
            let mut inv = inner.catch_up_script.prepare_invoke();
            inv.key(&inner.stream_key).key(&inner.counter_key).arg(from).arg(inner.cfg.batch);
            let v = self.read("redis stream catch-up", inv.invoke_async(c)).await?;
            // The counter may hold anything someone wrote: unreadable, it tells nothing
            // (and the next publish restarts it).
            let parsed = value_array(&v).and_then(|a| {
                let last = value_string(a.get(2)?)?;
                let last = if last.is_empty() { None } else { Some(StreamId::parse(&last)?) };
                Some((value_u64(a.first()?), parse_entries(a.get(1)?)?, last))
            });
            let Some((counter, entries, stream_last)) = parsed else {
                return Err(Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream catch-up")));
            };
            let full = entries.len() >= inner.cfg.batch;
            for e in entries {
                if self.deliver(e, gaps).await? {
                    complete = false;
                }
            }
            if full {
                continue;
            }
            if self.last_id != StreamId::ZERO && stream_last.is_none_or(|last| last < self.last_id) {
                // The stream this reader was reading is gone: every entry a new one
                // holds, or gets, has an id below the last one read. Read it from the
                // start; the numbers tell what was missed.
                tracing::warn!(
                    subscriber = %self.name,
                    last_read = %self.last_id,
                    stream_last = %stream_last.map_or("none".to_owned(), |id| id.to_string()),
                    "redis stream backplane: the stream was deleted or re-created below this \
                     subscriber's position; reading the new one from its start"
                );
                self.last_id = StreamId::ZERO;
                if stream_last.is_some() {
                    continue;
                }
            }
            if let Some(counter) = counter {
                if let Some(last) = self.last_n
                    && last != counter
                {
                    // Entries numbered after the last one seen are gone (the stream was
                    // deleted or trimmed to nothing), or the counter went back (Redis
                    // lost data, or someone reset it).
                    tracing::warn!(
                        subscriber = %self.name,
                        counter,
                        last_seen = last,
                        "redis stream backplane: entries missing after the last one read"
                    );
                    complete = false;
                    if gaps == Gaps::Report {
                        self.send(BackplaneEvent::Lost).await?;
                    }
                }
                self.last_n = Some(counter);
            }
            return Ok(complete);
        }
    }

    async fn read_loop(&mut self, c: &mut RedisConn) -> Stop {
        let inner = self.inner.clone();
        let block_ms = u64::try_from(inner.cfg.block.as_millis()).unwrap_or(u64::MAX).max(1);
        let limit = inner.cfg.block + inner.cfg.read_grace;
        loop {
            let last_id = self.last_id.to_string();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(inner.cfg.batch)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&inner.stream_key);
            match &self.acks {
                Some((key, last)) => cmd.arg(key).arg(last_id).arg(last.to_string()),
                None => cmd.arg(last_id),
            };
            inner.stats.reads.fetch_add(1, Ordering::Relaxed);
            let read = cmd.query_async::<Value>(c);
            let r = tokio::select! {
                _ = self.tx.closed() => return Stop::Closed,
                r = tokio::time::timeout(limit, read) => r,
            };
            let v = match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    return Stop::Failed(map_redis_error(ErrorKind::Backplane, "redis stream read", e));
                }
                Err(_) => return Stop::Failed(Error::timeout("redis stream read", limit)),
            };
            let Some(streams) = parse_xread_streams(&v) else {
                return Stop::Failed(bad_reply(ErrorKind::Backplane, "redis stream read"));
            };
            let mut entries = Vec::new();
            let mut acks = Vec::new();
            for (key, batch) in streams {
                if key == inner.stream_key {
                    entries = batch;
                } else if self.acks.as_ref().is_some_and(|(k, _)| *k == key) {
                    acks = batch;
                }
            }
            let idle = entries.is_empty() && acks.is_empty();
            for e in acks {
                if let Err(stop) = self.deliver_ack(e).await {
                    return stop;
                }
            }
            if idle {
                // A quiet block time: either nothing was published, or entries were
                // deleted after the last one read, or the stream was re-created below
                // this reader's position (XREAD would wait forever). Only a look at the
                // stream and the counter tells these apart.
                if let Err(stop) = self.catch_up(c, Gaps::Report).await {
                    return stop;
                }
                continue;
            }
            for e in entries {
                if let Err(stop) = self.deliver(e, Gaps::Report).await {
                    return stop;
                }
            }
        }
    }
}
