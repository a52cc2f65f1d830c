//! Finding and killing processes without racing against pid reuse.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The pids of all processes (thread-group leaders) on the system, except
/// this process.
pub(crate) fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != me)
        .collect()
}

/// (device, inode) of a file, following symlinks (e.g. a `/proc/PID/ns/net`
/// magic link, or a netns bind mount under /run/netns).
pub(crate) fn dev_ino(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Sends `sig` to `pid`, but only if `still_matches(pid)` holds for that very
/// process: the check runs after a pidfd pins the process, and the signal
/// goes through the pidfd, so a pid reused in between is never hit.
/// Returns Ok(false) when the process is gone or no longer matches.
pub(crate) fn signal_if(
    pid: u32,
    sig: i32,
    still_matches: impl Fn(u32) -> bool,
) -> io::Result<bool> {
    if pid == std::process::id() {
        return Ok(false);
    }
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: fd is a fresh pidfd that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // While the pidfd's process is not reaped its pid cannot be reused, so if
    // the signal below succeeds, this check was about that same process.
    if !still_matches(pid) {
        return Ok(false);
    }
    // SAFETY: plain syscall on a valid pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(true)
}

/// The processes (other than this one) whose network namespace is the one
/// with (device, inode) `ns`.
pub(crate) fn pids_in_netns(ns: (u64, u64)) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| in_netns(p, ns))
        .collect()
}

pub(crate) fn in_netns(pid: u32, ns: (u64, u64)) -> bool {
    dev_ino(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(ns)
}

/// SIGKILLs every process in the network namespace `ns` and waits (up to
/// `timeout`) until none is left. Returns the pids still there.
pub(crate) fn kill_netns_procs(ns: (u64, u64), timeout: std::time::Duration) -> Vec<u32> {
    let mut left = Vec::new();
    crate::wait_until(timeout, std::time::Duration::from_millis(10), || {
        left = pids_in_netns(ns);
        for &p in &left {
            let _ = signal_if(p, libc::SIGKILL, |p| in_netns(p, ns));
        }
        left.is_empty()
    });
    left
}
