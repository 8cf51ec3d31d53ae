//! A spawned server process with signal helpers, plus small shared utilities.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::sys;

/// A child server process. With `group`, it was started as the leader of its
/// own process group and signals go to the whole group (postgres backends).
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    group: bool,
    reaped: bool,
}

impl Proc {
    pub(crate) fn new(child: Child, group: bool) -> Self {
        Self { child, group, reaped: false }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn target(&self) -> i32 {
        // Pids fit in i32 on Linux (pid_max <= 2^22).
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        if self.group { -pid } else { pid }
    }

    /// Sends a signal to the process (or its group).
    pub(crate) fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        // A reaped single process's pid may have been reused: never signal it.
        // A process group id cannot be reused while the group has members.
        if !self.group && self.exit_status().is_some() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the server process has exited"));
        }
        sys::kill(self.target(), sig)
    }

    /// Returns the exit status if the process has exited (reaping it).
    pub(crate) fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// SIGKILL (the group too, if any) and wait for the process.
    pub(crate) fn kill(&mut self) {
        if self.group || !self.reaped {
            // Resume first is not needed: SIGKILL also ends stopped processes.
            let _ = sys::kill(self.target(), libc::SIGKILL);
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why one attempt to start a server failed.
pub(crate) enum StartError {
    /// The port was taken (worth retrying, on another port or later).
    PortInUse(io::Error),
    Other(io::Error),
}

impl StartError {
    fn error(&self) -> &io::Error {
        match self {
            Self::PortInUse(e) | Self::Other(e) => e,
        }
    }

    fn into_error(self) -> io::Error {
        match self {
            Self::PortInUse(e) | Self::Other(e) => e,
        }
    }
}

/// Kills and reaps the process in `proc`, if any, leaving `None`.
pub(crate) fn kill(proc: &mut Option<Proc>) {
    if let Some(mut proc) = proc.take() {
        proc.kill();
    }
}

/// Sends `sig` to the process in `proc`; `NotFound` ("`what` is not running")
/// if there is none.
pub(crate) fn signal(proc: Option<&mut Proc>, what: &str, sig: libc::c_int) -> io::Result<()> {
    match proc {
        Some(proc) => proc.signal(sig),
        None => Err(io::Error::new(io::ErrorKind::NotFound, format!("{what} is not running"))),
    }
}

/// Calls `attempt` with a fresh free port, up to `attempts` times while it
/// fails with [`StartError::PortInUse`]; `what` names the server in the error
/// if no attempt was made.
pub(crate) fn start_on_free_port(
    what: &str,
    attempts: usize,
    attempt: impl FnMut(u16) -> Result<(), StartError>,
) -> io::Result<()> {
    start_on_port_from(what, attempts, free_port, attempt)
}

/// [`start_on_free_port`] with the ports picked by `pick` (e.g. [`free_port_pair`]).
pub(crate) fn start_on_port_from(
    what: &str,
    attempts: usize,
    pick: fn() -> io::Result<u16>,
    mut attempt: impl FnMut(u16) -> Result<(), StartError>,
) -> io::Result<()> {
    let mut last_err = None;
    for _ in 0..attempts {
        match attempt(pick()?) {
            Ok(()) => return Ok(()),
            Err(StartError::PortInUse(e)) => last_err = Some(e),
            Err(StartError::Other(e)) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other(format!("{what} did not start"))))
}

/// Calls `attempt` until it succeeds, retrying every 100 ms for up to
/// `window` the failures that `retry` accepts; other failures, and the
/// last one after the window, are returned.
pub(crate) fn retry_start(
    window: Duration,
    retry: impl Fn(&StartError) -> bool,
    mut attempt: impl FnMut() -> Result<(), StartError>,
) -> io::Result<()> {
    let deadline = Instant::now() + window;
    loop {
        match attempt() {
            Ok(()) => return Ok(()),
            Err(e) => {
                if !retry(&e) || Instant::now() >= deadline {
                    return Err(e.into_error());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Whether a restart attempt that failed with `e` is worth retrying: any
/// early exit is, a startup timeout is not.
pub(crate) fn not_timed_out(e: &StartError) -> bool {
    e.error().kind() != io::ErrorKind::TimedOut
}

/// Whether a restart attempt that failed with `e` is worth retrying: only
/// when the port was still in use.
pub(crate) fn port_in_use(e: &StartError) -> bool {
    matches!(e, StartError::PortInUse(_))
}

/// A port that was free a moment ago on 127.0.0.1 (bind to port 0, read, drop).
pub(crate) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Offset of a Redis Cluster node's bus port from its client port.
pub(crate) const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// A port `p` such that `p` and `p + 10000` (a Redis Cluster node's bus port) were
/// both free a moment ago on 127.0.0.1.
pub(crate) fn free_port_pair() -> io::Result<u16> {
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no free port p with p + 10000 free on 127.0.0.1"))
}

/// Looks `name` up in `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The whole file as (lossy) UTF-8; empty if it cannot be read.
pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> &str {
    let trimmed = text.trim_end_matches('\n');
    match trimmed.rmatch_indices('\n').nth(n.saturating_sub(1)) {
        Some((i, _)) if n > 0 => &trimmed[i + 1..],
        _ if n == 0 => "",
        _ => trimmed,
    }
}

/// Prints the tail of a server log to stderr (used on drop while panicking).
pub(crate) fn dump_log_tail(what: &str, log: &str) {
    eprintln!("---- {what}: last 50 log lines ----\n{}\n---- end of {what} log ----", tail(log, 50));
}
