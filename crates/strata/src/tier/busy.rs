//! [`await_while_answering`]: a timeout that tells a busy server from a stalled one, for
//! the cache's L2 calls and for adapters' own connection-level timeouts.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How [`await_while_answering`] ended.
#[derive(Debug)]
pub struct Answered<T> {
    /// The call's output, or how long it was waited for before giving up.
    pub outcome: Result<T, Duration>,
    /// Whether the call ran past its first `timeout` and was waited for further.
    pub waited: bool,
    /// The first slice the call was given (`timeout`).
    pub slice: Duration,
}

/// Awaits `call` for `timeout`, then in further slices of `timeout` for as long as
/// `progress` (a count of replies the server sent, to anyone: see
/// [`Tier::progress`](super::Tier::progress)) changed during the slice before, until
/// `cap` in all. A server that answers nothing during a slice (paused, unreachable)
/// ends the call there; one that keeps answering the calls queued before this one is
/// busy, not down, and is given up to `cap`. With `progress` returning `None` the call
/// ends at `timeout`,
///
/// unless this process was what stalled: a slice whose timer woke this task more than
/// a quarter of a slice late (its threads, and the task reading the connection, did
/// not get a core) proves nothing about the server, whose reply may be waiting unread,
/// so the call is waited for another slice, still within `cap`. Failure detectors
/// discount their own pauses the same way (a monitor that was descheduled does not
/// suspect what it could not hear): a 2-core host saturated by its clients failed
/// lookups at 50 ms that Redis had answered in time, and a fleet of 50 went to 9× its
/// compulsory database reads where a plain cache-aside, which waits, stayed at 1.2×.
pub async fn await_while_answering<T>(
    call: impl Future<Output = T>,
    timeout: Duration,
    cap: Duration,
    progress: impl Fn() -> Option<u64>,
) -> Answered<T> {
    let mut call = std::pin::pin!(call);
    let start = Instant::now();
    let mut seen = progress();
    let mut slice = timeout;
    let mut waited = false;
    loop {
        let deadline = Instant::now() + slice;
        if let Ok(out) = tokio::time::timeout_at(deadline, call.as_mut()).await {
            return Answered { outcome: Ok(out), waited, slice: timeout };
        }
        let starved = Instant::now().saturating_duration_since(deadline) > slice / 4;
        let elapsed = start.elapsed();
        let now = progress();
        let answering = matches!((seen, now), (Some(a), Some(b)) if a != b);
        let left = cap.saturating_sub(elapsed);
        if !(answering || starved) || left.is_zero() {
            return Answered { outcome: Err(elapsed), waited, slice: timeout };
        }
        (seen, waited, slice) = (now, true, timeout.min(left));
    }
}
