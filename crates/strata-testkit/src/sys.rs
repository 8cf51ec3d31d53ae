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

/// Makes the process `cmd` spawns receive SIGKILL when the thread that spawns it exits
/// (Linux `PR_SET_PDEATHSIG`): a server spawned from a thread that lives as long as
/// the process dies with the process, even when no destructor runs.
pub(crate) fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}
