//! [`HoldServer`]: the `tcp-hold` binary of this crate run in a lab's server
//! namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::child::{ChildGuard, spawn_in};
use crate::lab::Lab;

/// Where the `tcp-hold` binary is: `$CARGO_BIN_EXE_tcp-hold` if set at run
/// time, else `tcp-hold` next to the running executable or in its parent
/// directory (cargo puts test executables in target/PROFILE/deps and
/// binaries in target/PROFILE). Panics if none exists.
///
/// From this crate's integration tests prefer [`crate::tcp_hold_bin!`]
/// (`env!("CARGO_BIN_EXE_tcp-hold")`, resolved at compile time).
pub fn tcp_hold_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_tcp-hold") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("tcp-hold");
        if p.is_file() {
            return p;
        }
        tried.push(p);
    }
    panic!(
        "cannot find the tcp-hold binary (tried {tried:?}); build it with \
         `cargo build -p limiter-tests` or use tcp_hold_bin!() from an integration test"
    );
}

/// A running `tcp-hold` in the server namespace of a [`Lab`] (and optionally
/// in a cgroup), listening on the given addresses. Killed and reaped on
/// drop (the lab also kills it when it is dropped first).
///
/// Protocol per connection, line based: `close` → the server closes (FIN);
/// `reset` → the server closes with SO_LINGER 0 (RST); any other line is
/// echoed; EOF → the server closes.
#[derive(Debug)]
pub struct HoldServer {
    child: ChildGuard,
}

impl HoldServer {
    /// Starts [`tcp_hold_path`] listening on `listen` (e.g.
    /// `["10.77.0.1:2525", "[fd77::1]:2525"]`) and waits until it has bound
    /// them all; panics with its stderr if it fails to.
    pub fn start(lab: &Lab, cgroup: Option<&Cgroup>, listen: &[&str]) -> HoldServer {
        Self::start_with(&tcp_hold_path(), lab, cgroup, listen)
    }

    /// Like [`start`](Self::start) with an explicit binary path (e.g.
    /// `tcp_hold_bin!()`).
    pub fn start_with(
        bin: &Path,
        lab: &Lab,
        cgroup: Option<&Cgroup>,
        listen: &[&str],
    ) -> HoldServer {
        Self::start_in(bin, lab.server_ns(), cgroup, listen)
    }

    /// Like [`start_with`](Self::start_with), in namespace `ns` (a
    /// "container" behind the lab's server, say).
    pub fn start_in(
        bin: &Path,
        ns: &crate::Netns,
        cgroup: Option<&Cgroup>,
        listen: &[&str],
    ) -> HoldServer {
        assert!(!listen.is_empty(), "HoldServer needs at least one address");
        let mut cmd = Command::new(bin);
        cmd.args(listen)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_in(ns, cgroup, cmd);
        child.capture();
        if child
            .wait_for_line(Duration::from_secs(10), |l| l == "listening")
            .is_none()
        {
            let status = child.wait_timeout(Duration::from_millis(100));
            panic!(
                "tcp-hold {listen:?} did not report `listening` (status {status:?}); stderr:\n{}",
                child.stderr_text()
            );
        }
        HoldServer { child }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process guard (e.g. to read what it wrote to stderr).
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}
