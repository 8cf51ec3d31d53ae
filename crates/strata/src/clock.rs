//! Time, injectable so that TTL, fail-safe and breaker logic are tested without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A point in time: nanoseconds since the Unix epoch.
///
/// Within one process it never goes backwards (the system clock is read once and
/// advanced by the monotonic clock), and across processes it is comparable up to the
/// machines' clock skew, which is what L2 envelopes shared by a fleet need.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Nanoseconds since the Unix epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }

    /// From milliseconds since the Unix epoch.
    pub fn from_millis(ms: u64) -> Self {
        Timestamp(ms.saturating_mul(1_000_000))
    }

    /// `self + d`, saturating.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }

    /// `self - d`, saturating at zero.
    #[must_use]
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_nanos(d)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The longest duration any setting accepts: long enough for any cache, short enough
/// that every sum and multiple the cache computes from its settings stays far from
/// overflowing a [`Timestamp`] or an `Instant`.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(365 * 24 * 3600);

/// `d · factor`, as `Duration::mul_f64` computes it but saturating at `Duration::MAX`
/// where that panics; `d` itself for a factor that is negative or not a number.
pub(crate) fn mul_f64_saturating(d: Duration, factor: f64) -> Duration {
    let secs = d.as_secs_f64() * factor;
    if secs.is_nan() || secs < 0.0 {
        return d;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// A source of time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The real clock: wall time read once, advanced by a monotonic clock of 1 ms
/// resolution.
///
/// Reading `Instant::now()` costs ~30 ns on the machines we measured, twice a raw
/// quick_cache hit, so the L1 hit path reads a shared atomic instead, advanced every
/// millisecond by one process-wide ticker thread (started on first use). Time checks on
/// the hit path (TTL, `max_stale`) are therefore exact to about a millisecond, or to
/// the ticker's scheduling delay on an overloaded machine. Load durations for early
/// refresh are measured with `Instant` directly.
#[derive(Debug, Clone)]
pub struct SystemClock {
    base_wall: u64,
    /// `None` if the ticker thread could not be started: then `Instant` is read.
    ticks: Option<&'static AtomicU64>,
    base: Instant,
}

struct Ticker {
    /// Nanoseconds since `base`, advanced by the ticker thread; `None` if it could not
    /// be started.
    elapsed: Option<&'static AtomicU64>,
    base_wall: u64,
    base: Instant,
}

const TICK: Duration = Duration::from_millis(1);

fn ticker() -> &'static Ticker {
    static TICKER: OnceLock<Ticker> = OnceLock::new();
    TICKER.get_or_init(|| {
        let base = Instant::now();
        let base_wall = SystemTime::now().duration_since(UNIX_EPOCH).map(duration_nanos).unwrap_or(0);
        let elapsed: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let spawned = std::thread::Builder::new().name("strata-clock".into()).spawn(move || {
            loop {
                std::thread::sleep(TICK);
                elapsed.store(duration_nanos(base.elapsed()), Ordering::Release);
            }
        });
        if spawned.is_err() {
            tracing::warn!("cannot start the strata clock thread; reading Instant on every call instead");
        }
        Ticker { elapsed: spawned.is_ok().then_some(elapsed), base_wall, base }
    })
}

impl Default for SystemClock {
    fn default() -> Self {
        let t = ticker();
        SystemClock { base_wall: t.base_wall, ticks: t.elapsed, base: t.base }
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Timestamp {
        let elapsed = match self.ticks {
            Some(t) => t.load(Ordering::Acquire),
            None => duration_nanos(self.base.elapsed()),
        };
        Timestamp(self.base_wall + elapsed)
    }
}

/// A clock that moves only when told to; for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

#[cfg(any(test, feature = "testing"))]
impl ManualClock {
    /// A clock at an arbitrary fixed start (1 000 000 s after the epoch).
    pub fn new() -> Self {
        ManualClock { now: Arc::new(AtomicU64::new(1_000_000 * 1_000_000_000)) }
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_nanos(d), Ordering::SeqCst);
    }

    /// Sets the time.
    pub fn set(&self, t: Timestamp) {
        self.now.store(t.0, Ordering::SeqCst);
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::SeqCst))
    }
}

/// The clock a cache uses.
#[derive(Clone)]
pub(crate) struct ClockSource {
    /// The system clock's ticker and wall-clock base, when that is the clock and its
    /// thread runs: then a read is one load and one add, with no dispatch on the kind.
    ticker: Option<(&'static AtomicU64, u64)>,
    kind: ClockKind,
}

#[derive(Clone)]
pub(crate) enum ClockKind {
    System(SystemClock),
    Custom(Arc<dyn Clock>),
}

impl ClockSource {
    pub(crate) fn system() -> Self {
        let clock = SystemClock::default();
        ClockSource { ticker: clock.ticks.map(|t| (t, clock.base_wall)), kind: ClockKind::System(clock) }
    }

    pub(crate) fn custom(clock: Arc<dyn Clock>) -> Self {
        ClockSource { ticker: None, kind: ClockKind::Custom(clock) }
    }

    pub(crate) fn kind(&self) -> &ClockKind {
        &self.kind
    }

    #[inline]
    pub(crate) fn now(&self) -> Timestamp {
        match self.ticker {
            // What `SystemClock::now` computes, without its checks.
            Some((ticks, base_wall)) => Timestamp(base_wall + ticks.load(Ordering::Acquire)),
            None => self.now_untickered(),
        }
    }

    #[inline(never)]
    fn now_untickered(&self) -> Timestamp {
        match &self.kind {
            ClockKind::System(c) => c.now(),
            ClockKind::Custom(c) => c.now(),
        }
    }
}
