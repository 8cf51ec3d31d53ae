//! Deterministic-interleaving tests ([shuttle](https://docs.rs/shuttle)) of
//! single-flight ([`Flights`]) and the L1 fill guards ([`Guards`]).
//!
//! The real `Flights`, `Guards`, `L1` and `FastFloor` run here, on shuttle's locks and
//! atomics (see `crate::sync`), so every lock and atomic access in them is a point
//! where the checker may switch tasks. What the cache wraps around them (tokio tasks,
//! timeouts, L2, metrics) cannot run under shuttle; [`World`] replays the order in
//! which the cache calls them, step for step, each step naming the function it stands
//! for: the read path (`Cache::get_or_load`, `Inner::probe`), the flight
//! (`Inner::run_flight`, `Inner::fill_l1`), early refresh (`Inner::spawn_refresh`) and
//! the local side of invalidations (`Inner::evict_key`, `drop_local`, `flush_l1`), and
//! pushed reloads (`Host::apply_remote` with its cause, `Inner::install_reload`).
//!
//! The scenarios (in `scenarios`) run every case under shuttle's random scheduler and
//! its PCT scheduler; [`iterations`] reads `STRATA_SHUTTLE_ITERATIONS` to explore more.

mod scenarios;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::cache::flight::{self, FinishOnDrop, FlightKind, Flights, Lead};
use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind, Result};
use crate::l1::{By, Entry, EntryWeighter, FastFloor, Guards, L1, LoadStart, Meta, Slot, Tags, XFetchLead};
use crate::tag_epochs::DEFAULT_MAX_TAG_EPOCHS;
use shuttle::sync::atomic::{AtomicBool, AtomicU64};

/// The tombstone lifetime (longer than any load may take).
const TOMBSTONE_TTL: Duration = Duration::from_secs(10);
/// How long a filled entry stays fresh.
const ENTRY_TTL: Duration = Duration::from_secs(5);
/// The one tag of every value, when values are tagged.
const TAG: &str = "plan:gold";
/// The key every scenario loads.
pub(super) const KEY: u64 = 1;
/// The origin of the other instances' messages.
const REMOTE: u64 = 9;

/// No XFetch lead: the fast path serves a slot until its expiry.
fn lead() -> XFetchLead {
    XFetchLead::new(0)
}

/// PCT schedules per scenario (and random ones, half as many): 1 000 unless
/// `STRATA_SHUTTLE_ITERATIONS` says otherwise.
pub(super) fn iterations() -> usize {
    std::env::var("STRATA_SHUTTLE_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000)
}

/// One cache instance's L1 side and the database row it caches. Built inside each
/// shuttle execution, so that the real parts' primitives are the model's; the
/// bookkeeping of the test itself uses shuttle's atomics directly.
pub(super) struct World {
    flights: Flights<u64, u64>,
    guards: Guards<u64>,
    l1: L1<u64, u64>,
    floor: FastFloor,
    /// The row's version; a loader returns the version it read, so a stale value is a
    /// version below the row's.
    row: AtomicU64,
    /// The newest version whose invalidation has returned: a read that starts after
    /// that must not return an older one.
    invalidated: AtomicU64,
    /// The clock, in nanoseconds.
    clock: AtomicU64,
    /// How many loader calls run at this moment, and the most at once.
    running: AtomicU64,
    most_running: AtomicU64,
    /// Loader calls in all.
    loads: AtomicU64,
    /// Whether values carry [`TAG`].
    tagged: bool,
    /// Whether the loader fails.
    failing: AtomicBool,
    /// The version another instance's write committed, once it has (0 before): what a
    /// pushed reload following its invalidation read at least.
    announced: AtomicU64,
    /// Flight tasks, joined at the end so that no fill lands after the final checks.
    tasks: Mutex<Vec<shuttle::future::JoinHandle<()>>>,
}

impl World {
    pub(super) fn new(tagged: bool) -> Arc<Self> {
        let guards = Guards::new(TOMBSTONE_TTL, DEFAULT_MAX_TAG_EPOCHS);
        Arc::new(World {
            floor: FastFloor::new(Slot::<u64>::floor(guards.namespace_epoch())),
            flights: Flights::new(),
            guards,
            l1: L1::with_weighter(64, 64, EntryWeighter(None), Arc::default()),
            row: AtomicU64::new(1),
            invalidated: AtomicU64::new(0),
            clock: AtomicU64::new(1_700_000_000_000_000_000),
            running: AtomicU64::new(0),
            most_running: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            tagged,
            failing: AtomicBool::new(false),
            announced: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn now(&self) -> Timestamp {
        Timestamp(self.clock.load(Ordering::SeqCst))
    }

    /// Moves the clock on (tombstones and entries expire).
    pub(super) fn advance(&self, d: Duration) {
        self.clock.fetch_add(crate::clock::duration_nanos(d), Ordering::SeqCst);
    }

    pub(super) fn row(&self) -> u64 {
        self.row.load(Ordering::SeqCst)
    }

    pub(super) fn invalidated(&self) -> u64 {
        self.invalidated.load(Ordering::SeqCst)
    }

    pub(super) fn most_running(&self) -> u64 {
        self.most_running.load(Ordering::SeqCst)
    }

    pub(super) fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    pub(super) fn fail_loads(&self) {
        self.failing.store(true, Ordering::SeqCst);
    }

    fn tags(&self) -> Option<Tags> {
        self.tagged.then(|| Arc::new(vec![TAG.to_owned()]))
    }

    /// A write: the row changes (the commit); the caller then invalidates.
    pub(super) fn commit(&self) -> u64 {
        self.row.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn invalidation_returned(&self, version: u64) {
        self.invalidated.fetch_max(version, Ordering::SeqCst);
    }

    /// `Inner::evict_key`: the key's tombstone, its L1 entry and its flight, under the
    /// guard's lock.
    pub(super) fn invalidate_key(&self, version: u64) {
        self.guards.invalidate_key(&KEY, self.now(), By::Own, || {
            self.flights.detach(&KEY);
            self.l1.invalidate(&KEY)
        });
        self.invalidation_returned(version);
    }

    /// Another instance's write of `version` committed; its message is on its way.
    pub(super) fn announce(&self, version: u64) {
        self.announced.store(version, Ordering::SeqCst);
    }

    pub(super) fn announced(&self) -> u64 {
        self.announced.load(Ordering::SeqCst)
    }

    /// `Host::apply_remote` of that write's key invalidation: `Inner::evict_key` with
    /// the message as its cause.
    pub(super) fn remote_invalidate_key(&self, version: u64) {
        self.guards.invalidate_key(&KEY, self.now(), By::Message((REMOTE, version)), || {
            self.flights.detach(&KEY);
            self.l1.invalidate(&KEY)
        });
        self.invalidation_returned(version);
    }

    /// `Inner::install_reload`: `value`, which the sending instance read after it
    /// applied the invalidation of `after`, installed if this instance's last word on
    /// the key is that message and L1 does not hold it.
    pub(super) fn install_reload(&self, after: u64, value: u64) -> bool {
        let now = self.now();
        let tags = self.tags();
        let fresh_until = now.saturating_add(ENTRY_TTL);
        let start = self.guards.start(now);
        let entry = Entry {
            value: Some(value),
            meta: Meta::new(now, fresh_until, fresh_until, start.seq, 1_000),
            tags: tags.clone(),
        };
        let slot = Slot::new(entry, lead());
        let tags = tags.as_deref().map_or(&[][..], Vec::as_slice);
        self.guards.install_reload(&KEY, (REMOTE, after), now, tags, || {
            if self.l1.peek(&KEY).is_some() {
                return false;
            }
            self.l1.insert(KEY, slot);
            true
        })
    }

    /// `Inner::drop_local` of a tag scope: a new tag epoch, and no joining old flights.
    pub(super) fn invalidate_tag(&self, version: u64) {
        self.guards.invalidate_tag(TAG);
        self.flights.detach_all();
        self.invalidation_returned(version);
    }

    /// `Inner::flush_l1`: a new namespace epoch, the fast path's floor, no joining old
    /// flights, an empty L1.
    pub(super) fn invalidate_all(&self, version: u64) {
        self.guards.invalidate_all();
        self.floor.publish(|| Slot::<u64>::floor(self.guards.namespace_epoch()));
        self.flights.detach_all();
        self.l1.clear();
        self.invalidation_returned(version);
    }

    /// A capacity eviction: the entry goes (as `Inner::evict_key` drops it), and no guard
    /// tombstone is left.
    pub(super) fn evict(&self) {
        self.l1.invalidate(&KEY);
    }

    /// `Inner::probe`: the fast path (the slot and the floor, under the shard lock),
    /// else the guards' verdict on the slot. `Some` with the value when L1 may serve it.
    pub(super) fn probe(&self, now: Timestamp) -> Option<Option<u64>> {
        enum Look {
            Fast(Option<u64>),
            Slow(Slot<u64>),
        }
        let look = self.l1.read(&KEY, |slot| {
            if slot.is_fast_hit(now, self.floor.load()) {
                Look::Fast(slot.fast_value())
            } else {
                Look::Slow(slot.clone())
            }
        })?;
        match look {
            Look::Fast(value) => Some(value),
            Look::Slow(slot) => {
                let meta = slot.meta(lead());
                (self.guards.valid(meta.fill_seq, slot.tag_slice()) && now < meta.fresh_until)
                    .then(|| slot.value().copied())
            }
        }
    }

    /// `Cache::get_or_load`: L1, else join the key's flight or lead a new one.
    pub(super) async fn get_or_load(self: &Arc<Self>) -> Result<Option<u64>> {
        if let Some(value) = self.probe(self.now()) {
            return Ok(value);
        }
        let (rx, lead) = self.flights.join_or_lead(&KEY);
        if let Some(lead) = lead {
            // As `get_or_load` does: a flight that finished since the probe filled L1.
            if let Some(value) = self.probe(self.now()) {
                self.flights.finish(&KEY, lead.id);
                flight::complete(&lead.tx, Ok(value));
                return Ok(value);
            }
            self.spawn_flight(lead, FlightKind::Read);
        }
        flight::wait(rx).await
    }

    /// `Inner::spawn_refresh`: an early refresh, unless a load of the key runs.
    pub(super) fn spawn_refresh(self: &Arc<Self>) {
        if self.flights.is_running(&KEY) {
            return;
        }
        if let (_, Some(lead)) = self.flights.join_or_lead(&KEY) {
            self.spawn_flight(lead, FlightKind::Refresh(crate::clock::Timestamp(0)));
        }
    }

    /// `Inner::spawn_flight`; what differs between the kinds (stats, L2, the soft
    /// timeout) is outside this model, so the kind is not passed on.
    fn spawn_flight(self: &Arc<Self>, lead: Lead<u64>, _kind: FlightKind) {
        let world = self.clone();
        let task = shuttle::future::spawn(async move { world.run_flight(lead).await });
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(task);
    }

    /// `Inner::run_flight` without L2: the load's start, the loader, the guarded fill,
    /// the result to the waiters.
    async fn run_flight(&self, lead: Lead<u64>) {
        let _finish = FinishOnDrop { flights: &self.flights, key: &KEY, id: lead.id };
        let start = self.guards.start(self.now());
        let result = self.load().await;
        if let Ok(value) = result {
            self.fill_l1(value, start);
        }
        // As `run_flight` does: forgotten before the answer goes out.
        self.flights.finish(&KEY, lead.id);
        flight::complete(&lead.tx, result);
    }

    /// The loader: reads the row, which may change meanwhile.
    async fn load(&self) -> Result<Option<u64>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now_running, Ordering::SeqCst);
        shuttle::future::yield_now().await;
        let version = self.row();
        shuttle::future::yield_now().await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Loader, "the database is down"));
        }
        Ok(Some(version))
    }

    /// `Inner::fill_l1` (`make_entry`, then the guarded insert).
    fn fill_l1(&self, value: Option<u64>, start: LoadStart) -> bool {
        let now = self.now();
        let tags = self.tags();
        let fresh_until = now.saturating_add(ENTRY_TTL);
        let entry = Entry {
            value,
            meta: Meta::new(now, fresh_until, fresh_until, start.seq, 1_000),
            tags: tags.clone(),
        };
        let slot = Slot::new(entry, lead());
        self.guards.fill_if_clean(&KEY, start, now, tags.as_deref().map_or(&[], Vec::as_slice), || {
            self.l1.insert(KEY, slot);
            true
        })
    }

    /// Waits for every flight started so far.
    pub(super) async fn join_flights(&self) {
        loop {
            let Some(task) = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).pop() else { return };
            let _ = task.await;
        }
    }

    /// What L1 would serve now: never a version older than the row once every
    /// invalidation has returned.
    pub(super) fn assert_no_stale_entry(&self) {
        let row = self.row();
        if let Some(served) = self.probe(self.now()) {
            assert_eq!(served, Some(row), "L1 serves version {served:?}, the row is at {row}");
        }
        // And without the fast path: what the guards let through.
        if let Some(slot) = self.l1.peek(&KEY) {
            let meta = slot.meta(lead());
            if self.guards.valid(meta.fill_seq, slot.tag_slice()) && self.now() < meta.fresh_until {
                assert_eq!(slot.value().copied(), Some(row), "L1 holds a stale entry the guards accept");
            }
        }
    }
}
