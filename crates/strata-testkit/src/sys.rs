//! The only unsafe code of the crate: thin wrappers over libc calls that have
//! no memory-safety preconditions.
#![allow(unsafe_code)]

use std::io;

/// Sends `sig` to `pid` (a negative pid addresses a process group), as kill(2).
pub(crate) fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The effective uid of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    euid() == 0
}
