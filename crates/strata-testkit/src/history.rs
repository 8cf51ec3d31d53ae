//! Histories of a consistency torture run: one JSON object per line, one line per
//! operation, written by every process of the run and merged for the
//! [checker](crate::checker).
//!
//! ```text
//! {"process":"reader-1","key":17,"op":"read","invoke_ns":1200,"return_ns":1350,"version":4,"tier":"l1","ok":true,"detail":""}
//! {"process":"writer","key":17,"op":"write","invoke_ns":1400,"return_ns":1500,"commit_ns":1480,"version":5,"tier":null,"ok":true,"detail":"invalidation Buffered: …"}
//! {"process":"writer","key":17,"op":"invalidation_retried","invoke_ns":1480,"return_ns":2100,"version":5,"tier":null,"ok":true,"detail":""}
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `process` | who did it (`writer`, `reader-1`, `nemesis`…) |
//! | `key` | the row (0 for events about no row, such as faults) |
//! | `op` | `read`, `write`, `write_rolled_back`, `invalidation_applied`, `invalidation_retried` or `fault` |
//! | `invoke_ns`, `return_ns` | when the operation was invoked and when it returned, in nanoseconds of the system-wide monotonic clock ([`monotonic_ns`]) |
//! | `commit_ns` | writes only, optional: when the database acknowledged the `COMMIT` (so the write committed at or before it); absent in older histories and when unknown, in which case `return_ns` stands in |
//! | `version` | the row version read or written; `null` when unknown (failed read, write whose outcome is unknown) |
//! | `tier` | for reads: where the value came from (`l1`, `l2`, `db`); else `null` |
//! | `ok` | whether the operation succeeded. For a write: its `COMMIT` succeeded (*committed*), whatever became of its invalidation (a buffered invalidation is named in `detail` and followed by an `invalidation_retried` event); a write with `ok: false` is *indeterminate*: the `COMMIT`'s outcome is unknown |
//! | `detail` | free text (error message, fault description) |
//!
//! Histories written before `commit_ns` and `invalidation_retried` existed parse as
//! they are (the field defaults to absent); in them a write whose invalidation failed
//! was recorded `ok: false`, which the checker can resolve from the versions
//! ([`CheckConfig::versions_step_by_one`](crate::CheckConfig::versions_step_by_one)).
//!
//! Times come from `CLOCK_MONOTONIC`, which is one clock for every process of a
//! machine, so events recorded by different processes can be ordered against each
//! other. They are not comparable across machines.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use parking_lot::Mutex;
use rustix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

/// Nanoseconds of `CLOCK_MONOTONIC`: the same clock in every process of this machine
/// (it counts from boot and never jumps), so times recorded by different processes
/// compare.
pub fn monotonic_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// What an [`Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A read of one row through a cache.
    Read,
    /// A change of one row: its `COMMIT`, then its invalidation. `ok` when the
    /// `COMMIT` succeeded.
    Write,
    /// A write that certainly changed nothing: rolled back, or its COMMIT never sent
    /// (e.g. refused at the Strong level because its write lock could not be taken). It
    /// cannot be seen, so the checker only counts it.
    WriteRolledBack,
    /// An invalidation applied (e.g. the invalidation step of a write, on its own).
    InvalidationApplied,
    /// A write's invalidation that had been buffered (L2 or the backplane failed) was
    /// finally applied by the cache's retry: from the write's commit (`invoke_ns`) to
    /// the moment the writer saw its cache's retry buffer drained, taken-out retries
    /// included (`return_ns`: applied by then at the latest).
    InvalidationRetried,
    /// A fault injected by the nemesis (its interval is the time it was in force).
    Fault,
}

/// Where a read found its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The instance's in-process cache.
    L1,
    /// The shared cache tier (or another load's result that came from it).
    L2,
    /// The database (this read's loader ran).
    Db,
}

impl Tier {
    /// The lowercase name used in histories.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::Db => "db",
        }
    }
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Who did it.
    pub process: String,
    /// The row (0 for events about no row).
    pub key: u64,
    /// What was done.
    pub op: Op,
    /// When it was invoked ([`monotonic_ns`]).
    pub invoke_ns: u64,
    /// When it returned ([`monotonic_ns`]).
    pub return_ns: u64,
    /// Writes: when the database acknowledged the `COMMIT` ([`monotonic_ns`]), if
    /// known. Absent from older histories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_ns: Option<u64>,
    /// The version read or written, if known.
    #[serde(default)]
    pub version: Option<u64>,
    /// For reads, where the value came from.
    #[serde(default)]
    pub tier: Option<Tier>,
    /// Whether it returned successfully.
    pub ok: bool,
    /// Free text.
    #[serde(default)]
    pub detail: String,
}

impl Event {
    /// A successful read of `key` that returned `version` from `tier`.
    pub fn read(process: &str, key: u64, invoke_ns: u64, return_ns: u64, version: u64, tier: Tier) -> Self {
        Event {
            process: process.to_owned(),
            key,
            op: Op::Read,
            invoke_ns,
            return_ns,
            commit_ns: None,
            version: Some(version),
            tier: Some(tier),
            ok: true,
            detail: String::new(),
        }
    }

    /// A write of `key`: `ok` when its `COMMIT` succeeded (see [`Event::committed_at`]
    /// to say when).
    pub fn write(
        process: &str,
        key: u64,
        invoke_ns: u64,
        return_ns: u64,
        version: Option<u64>,
        ok: bool,
    ) -> Self {
        Event {
            process: process.to_owned(),
            key,
            op: Op::Write,
            invoke_ns,
            return_ns,
            commit_ns: None,
            version,
            tier: None,
            ok,
            detail: String::new(),
        }
    }

    /// A write of `key` that certainly changed nothing (see [`Op::WriteRolledBack`]).
    pub fn write_rolled_back(process: &str, key: u64, invoke_ns: u64, return_ns: u64) -> Self {
        Event {
            process: process.to_owned(),
            key,
            op: Op::WriteRolledBack,
            invoke_ns,
            return_ns,
            commit_ns: None,
            version: None,
            tier: None,
            ok: false,
            detail: String::new(),
        }
    }

    /// A fault that was in force from `invoke_ns` to `return_ns`.
    pub fn fault(process: &str, invoke_ns: u64, return_ns: u64, detail: impl Into<String>) -> Self {
        Event {
            process: process.to_owned(),
            key: 0,
            op: Op::Fault,
            invoke_ns,
            return_ns,
            commit_ns: None,
            version: None,
            tier: None,
            ok: true,
            detail: detail.into(),
        }
    }

    /// The same write with the time its `COMMIT` was acknowledged.
    #[must_use]
    pub fn committed_at(mut self, commit_ns: u64) -> Self {
        self.commit_ns = Some(commit_ns);
        self
    }

    /// A write's buffered invalidation of `key` at `version`, finally applied: the
    /// write committed at `commit_ns`, its cache's retry buffer was seen empty at
    /// `applied_ns`.
    pub fn invalidation_retried(
        process: &str,
        key: u64,
        version: Option<u64>,
        commit_ns: u64,
        applied_ns: u64,
    ) -> Self {
        Event {
            process: process.to_owned(),
            key,
            op: Op::InvalidationRetried,
            invoke_ns: commit_ns,
            return_ns: applied_ns,
            commit_ns: None,
            version,
            tier: None,
            ok: true,
            detail: String::new(),
        }
    }

    /// When a write took effect at the latest: its `commit_ns` if recorded, else its
    /// `return_ns`.
    pub fn effective_ns(&self) -> u64 {
        self.commit_ns.unwrap_or(self.return_ns).min(self.return_ns)
    }

    /// The same event with `detail` set.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// Appends events to a writer as JSON lines; buffered and safe to share between
/// threads (one lock per event). Call [`Recorder::flush`] before reading the file;
/// dropping the recorder flushes too, ignoring errors.
pub struct Recorder<W: Write + Send = File> {
    out: Mutex<BufWriter<W>>,
}

impl<W: Write + Send> std::fmt::Debug for Recorder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder<File> {
    /// Creates (or truncates) the history file at `path`.
    ///
    /// # Errors
    ///
    /// If the file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Recorder::new(File::create(path)?))
    }
}

impl<W: Write + Send> Recorder<W> {
    /// Records into `out`.
    pub fn new(out: W) -> Self {
        Recorder { out: Mutex::new(BufWriter::with_capacity(64 * 1024, out)) }
    }

    /// Appends one event (one line).
    ///
    /// # Errors
    ///
    /// If it cannot be written.
    pub fn record(&self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        self.out.lock().write_all(&line)
    }

    /// Writes out what is buffered.
    ///
    /// # Errors
    ///
    /// If it cannot be written.
    pub fn flush(&self) -> io::Result<()> {
        self.out.lock().flush()
    }

    /// Flushes and returns the writer.
    ///
    /// # Errors
    ///
    /// If what is buffered cannot be written.
    pub fn into_inner(self) -> io::Result<W> {
        self.out.into_inner().into_inner().map_err(|e| e.into_error())
    }
}

/// A parsed history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The events, in file order.
    pub events: Vec<Event>,
    /// Lines that were not an event (skipped). Blank lines are not counted.
    pub malformed: usize,
}

impl History {
    /// Parses JSON lines; a line that is not an event is counted in
    /// [`History::malformed`] and skipped, as is a line that is not UTF-8.
    ///
    /// # Errors
    ///
    /// Only if reading fails.
    pub fn parse(input: impl Read) -> io::Result<History> {
        let mut history = History::default();
        let mut reader = BufReader::new(input);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(history);
            }
            let text = match std::str::from_utf8(&line) {
                Ok(t) => t.trim(),
                Err(_) => {
                    history.malformed += 1;
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Event>(text) {
                Ok(ev) => history.events.push(ev),
                Err(_) => history.malformed += 1,
            }
        }
    }

    /// Reads and parses the history file at `path` (see [`History::parse`]).
    ///
    /// # Errors
    ///
    /// If the file cannot be opened or read.
    pub fn read(path: impl AsRef<Path>) -> io::Result<History> {
        History::parse(File::open(path)?)
    }

    /// Appends another history (e.g. another process's file).
    pub fn merge(&mut self, other: History) {
        self.events.extend(other.events);
        self.malformed += other.malformed;
    }

    /// Sorts the events by invocation time (then return time), as a merged history is
    /// usually written out.
    pub fn sort(&mut self) {
        self.events.sort_by_key(|e| (e.invoke_ns, e.return_ns));
    }

    /// Writes the events as JSON lines.
    ///
    /// # Errors
    ///
    /// If writing fails.
    pub fn write_to(&self, out: impl Write + Send) -> io::Result<()> {
        let recorder = Recorder::new(out);
        for e in &self.events {
            recorder.record(e)?;
        }
        recorder.flush()
    }
}
