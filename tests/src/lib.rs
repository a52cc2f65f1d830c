//! Fixtures for limiter's privileged end-to-end tests.
//!
//! Every fixture here owns what it creates and removes it in `Drop`, also when
//! the test panics: network namespaces ([`Lab`], [`OwnedNetns`]), the veth
//! pair between them (deleted with the namespaces), cgroup v2 directories
//! ([`Cgroup`]), bpffs mounts ([`BpfFs`]) and child processes ([`ChildGuard`],
//! [`HoldServer`]). Names are unique per process and per fixture (pid plus an
//! atomic counter), so tests can run in parallel threads of one binary.
//!
//! Nothing here changes the network namespace of the calling thread:
//! [`Netns::run`] uses a scoped helper thread, and [`spawn_in`] /
//! [`Netns::command`] switch namespace only in the child process.
//!
//! Traffic only ever goes to the addresses of the two namespaces a [`Lab`]
//! creates (10.77.0.0/24 and fd77::/48 on a veth pair between them), or to
//! those of a [`FleetLab`]'s namespaces (10.78.k.0/24, one veth pair per
//! server).
//!
//! The fixtures need root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and the `ip`
//! (iproute2), `nsenter` (util-linux) and `ss` (iproute2) programs. They
//! panic with a clear message when something cannot be set up.
//!
//! From an integration test (`tests/tests/*.rs`; there
//! `HoldServer::start_with(tcp_hold_bin!(), ..)` names the binary cargo built
//! for that test, while `HoldServer::start` looks it up at run time):
//!
//! ```no_run
//! use limiter_tests::{lab, HoldServer, Lab, established};
//! use std::time::Duration;
//!
//! let lab = Lab::new();
//! let _srv = HoldServer::start(&lab, None, &["10.77.0.1:2525"]);
//! let s = lab
//!     .connect(lab::client_v4(0).into(), lab::server_v4(2525), Duration::from_secs(2))
//!     .unwrap();
//! assert_eq!(established(lab.server_ns(), 2525).len(), 1);
//! drop(s);
//! ```

pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod child;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod fleet;
pub mod flood;
pub mod floodlab;
pub mod frames;
pub mod hold;
pub mod journald;
pub mod lab;
pub mod netns;
pub mod package;
pub mod passxdp;
pub mod postfix;
mod procs;
pub mod rawtcp;
pub mod rsyslog;
pub mod scenario;
pub mod ss;
pub mod tunlink;

pub use bpffs::BpfFs;
pub use cgroup::Cgroup;
pub use child::{ChildGuard, spawn_in};
pub use client::{connect_from, connect_many_from};
pub use daemon::Limiter;
pub use fleet::FleetLab;
pub use hold::{HoldServer, tcp_hold_path};
pub use journald::Journald;
pub use lab::Lab;
pub use netns::{Netns, OwnedNetns};
pub use rsyslog::Rsyslog;
pub use ss::{established, sockets_in_state};

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The path of the `tcp-hold` binary as cargo built it for this integration
/// test: `env!("CARGO_BIN_EXE_tcp-hold")` as a `&'static Path`.
///
/// Only usable from this package's integration tests (`tests/tests/*.rs`),
/// which is where cargo defines that variable. Elsewhere use
/// [`tcp_hold_path`].
#[macro_export]
macro_rules! tcp_hold_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_tcp-hold"))
    };
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number that is unique within this process (an atomic counter), for
/// building names together with the pid.
pub fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd`, panics (with the command and its stderr) unless it exits with
/// status 0, and returns its stdout as text.
pub fn run_checked(cmd: &mut Command) -> String {
    match try_run(cmd) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `cmd` and returns its stdout, or an error message that names the
/// command, its exit status and its stderr.
pub fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `cond` every `poll_interval` until it returns true (→ `true`) or
/// `timeout` has passed (→ `false`; `cond` is checked once more at the end).
pub fn wait_until(
    timeout: Duration,
    poll_interval: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(poll_interval.min(deadline - now));
    }
}

/// Polls `f` every 10 ms until it returns `Some` (→ that value) or `timeout`
/// has passed (→ `None`).
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut found = None;
    wait_until(timeout, Duration::from_millis(10), || {
        found = f();
        found.is_some()
    });
    found
}

/// Panics with a clear message unless the effective uid is 0: the fixtures
/// create namespaces, cgroups and mounts.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("limiter-tests fixtures need root (network namespaces, cgroups, bpffs mounts)");
    }
}

/// Collects cleanup failures in `Drop` impls: reported on stderr, and turned
/// into a panic at the end unless the thread is already unwinding (a panic
/// during unwinding would abort the whole test binary).
pub(crate) struct CleanupErrors {
    what: String,
    errors: Vec<String>,
}

impl CleanupErrors {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            errors: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, e: impl Into<String>) {
        let e = e.into();
        eprintln!("limiter-tests: cleanup of {}: {e}", self.what);
        self.errors.push(e);
    }

    pub(crate) fn finish(self) {
        if !self.errors.is_empty() && !std::thread::panicking() {
            panic!(
                "cleanup of {} failed: {}",
                self.what,
                self.errors.join("; ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_times_out_and_succeeds() {
        let start = Instant::now();
        assert!(!wait_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            || false
        ));
        assert!(start.elapsed() >= Duration::from_millis(50));
        let mut n = 0;
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                n == 3
            }
        ));
        let mut m = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), || {
                m += 1;
                (m == 4).then_some(m)
            }),
            Some(4)
        );
        assert_eq!(wait_for::<()>(Duration::from_millis(20), || None), None);
    }

    #[test]
    fn ids_are_unique() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
    }

    #[test]
    fn try_run_reports_stderr() {
        let err = try_run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        assert!(err.contains("oops"), "{err}");
        assert_eq!(
            try_run(Command::new("sh").args(["-c", "echo hi"])).unwrap(),
            "hi\n"
        );
    }
}
