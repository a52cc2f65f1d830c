//! [`spawn_in`]: start a process inside a network namespace (and cgroup),
//! owned by a [`ChildGuard`] that kills and reaps it on drop.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::netns::Netns;

/// Spawns `cmd` so that, before exec, the child joins `cgroup` (when given:
/// it writes "0" to its `cgroup.procs`; otherwise it stays in the caller's
/// cgroup) and the network namespace `ns` (setns on an fd opened before the
/// fork). Stdio is whatever `cmd` says (inherited by default; use
/// `Stdio::piped()` and [`ChildGuard::capture`] to read output).
///
/// The child also gets PR_SET_PDEATHSIG=SIGKILL, so it dies if the thread
/// that spawned it exits (e.g. the test binary is killed): call this from
/// the test's own thread, not from inside [`Netns::run`].
///
/// Panics (with the command) if the spawn fails.
pub fn spawn_in(ns: &Netns, cgroup: Option<&Cgroup>, mut cmd: Command) -> ChildGuard {
    let label = format!("{cmd:?}");
    let ns_file = ns.open();
    let cg_file: Option<File> = cgroup.map(|c| {
        let p = c.path().join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", p.display()))
    });
    let ns_fd = ns_file.as_raw_fd();
    let cg_fd = cg_file.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe syscalls (write,
    // setns, prctl, getppid) on fds that stay open in the parent until
    // spawn() has returned (they are CLOEXEC, so they close at exec).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cg_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {label} in netns {}: {e}", ns.name()));
    drop(ns_file);
    drop(cg_file);
    ChildGuard {
        child: Some(child),
        status: None,
        label,
        capture: None,
    }
}

/// Spawns `cmd` in the caller's namespaces, as a [`ChildGuard`] (killed on
/// drop, and on the death of the spawning thread through
/// PR_SET_PDEATHSIG).
pub fn spawn_here(mut cmd: Command) -> ChildGuard {
    let label = format!("{cmd:?}");
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {label}: {e}"));
    ChildGuard {
        child: Some(child),
        status: None,
        label,
        capture: None,
    }
}

/// Lines read from a child's stdout/stderr by background threads.
#[derive(Default)]
struct CaptureState {
    stdout: String,
    stderr: String,
    /// Every line in arrival order, whichever stream it came from.
    lines: Vec<String>,
    open_streams: usize,
}

#[derive(Default)]
struct Capture {
    state: Mutex<CaptureState>,
    changed: Condvar,
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless
/// it has already been waited for.
pub struct ChildGuard {
    child: Option<Child>,
    status: Option<ExitStatus>,
    label: String,
    capture: Option<Arc<Capture>>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("pid", &self.id())
            .field("command", &self.label)
            .field("status", &self.status)
            .finish()
    }
}

impl ChildGuard {
    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The command line it was spawned with (for messages).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The underlying [`Child`] (e.g. to take its stdin). Do not wait on it
    /// directly; use [`ChildGuard::wait`] and friends.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already consumed")
    }

    /// Starts background threads that read the child's piped stdout and
    /// stderr (those that were `Stdio::piped()` and not taken yet) line by
    /// line, so the child never blocks on a full pipe and the test can
    /// [`wait_for_line`](Self::wait_for_line) or read
    /// [`stdout_text`](Self::stdout_text) / [`stderr_text`](Self::stderr_text).
    /// Calling it again is a no-op.
    pub fn capture(&mut self) {
        if self.capture.is_some() {
            return;
        }
        let cap = Arc::new(Capture::default());
        let child = self.child.as_mut().expect("child already consumed");
        let streams: Vec<(Box<dyn Read + Send>, bool)> = [
            child
                .stdout
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, true)),
            child
                .stderr
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, false)),
        ]
        .into_iter()
        .flatten()
        .collect();
        cap.state.lock().unwrap().open_streams = streams.len();
        for (stream, is_stdout) in streams {
            let cap = cap.clone();
            // Detached: it ends at EOF, i.e. when the child (and anything
            // that inherited the pipe) is gone.
            std::thread::Builder::new()
                .name(format!(
                    "capture {}",
                    if is_stdout { "stdout" } else { "stderr" }
                ))
                .spawn(move || {
                    let mut r = BufReader::new(stream);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&buf).into_owned();
                                let mut st = cap.state.lock().unwrap();
                                if is_stdout {
                                    st.stdout.push_str(&line)
                                } else {
                                    st.stderr.push_str(&line)
                                }
                                st.lines
                                    .push(line.trim_end_matches(['\n', '\r']).to_owned());
                                cap.changed.notify_all();
                            }
                        }
                    }
                    cap.state.lock().unwrap().open_streams -= 1;
                    cap.changed.notify_all();
                })
                .expect("spawn capture thread");
        }
        self.capture = Some(cap);
    }

    /// Waits up to `timeout` for a captured output line (stdout or stderr,
    /// without its newline) for which `pred` is true, and returns it. Returns
    /// `None` on timeout or when both streams reached EOF without a match.
    /// Lines seen before the call count too. Needs [`capture`](Self::capture).
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let cap = self
            .capture
            .as_ref()
            .expect("wait_for_line needs ChildGuard::capture() first");
        let deadline = Instant::now() + timeout;
        let mut st = cap.state.lock().unwrap();
        loop {
            if let Some(l) = st.lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if st.open_streams == 0 || now >= deadline {
                return None;
            }
            st = cap.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Everything captured from stdout so far.
    pub fn stdout_text(&self) -> String {
        self.capture
            .as_ref()
            .map(|c| c.state.lock().unwrap().stdout.clone())
            .unwrap_or_default()
    }

    /// Everything captured from stderr so far.
    pub fn stderr_text(&self) -> String {
        self.capture
            .as_ref()
            .map(|c| c.state.lock().unwrap().stderr.clone())
            .unwrap_or_default()
    }

    /// Returns the exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let child = self.child.as_mut()?;
            self.status = child
                .try_wait()
                .unwrap_or_else(|e| panic!("waitpid {}: {e}", self.label));
        }
        self.status
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let child = self.child.as_mut().expect("child already consumed");
        let s = child
            .wait()
            .unwrap_or_else(|e| panic!("waitpid {}: {e}", self.label));
        self.status = Some(s);
        s
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = None;
        crate::wait_until(timeout, Duration::from_millis(10), || {
            st = self.try_wait();
            st.is_some()
        });
        st
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`); a no-op once the child has
    /// been reaped (its pid may belong to someone else by then).
    pub fn signal(&mut self, sig: i32) -> io::Result<()> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        // SAFETY: the child is not reaped, so the pid is still its own.
        if unsafe { libc::kill(self.id() as libc::pid_t, sig) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL; returns the
    /// exit status.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let _ = self.signal(libc::SIGTERM);
        match self.wait_timeout(grace) {
            Some(s) => s,
            None => self.kill(),
        }
    }

    /// SIGKILL and wait; returns the exit status (whatever it was if the
    /// child had already exited).
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.signal(libc::SIGKILL);
        self.wait()
    }

    /// Waits for the child to exit and returns its status with its output:
    /// the captured text if [`capture`](Self::capture) was called, otherwise
    /// whatever is read from the pipes still attached.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        if let Some(cap) = self.capture.clone() {
            let status = self.wait();
            let st = cap.state.lock().unwrap();
            // Give the reader threads a moment to drain what is left.
            let (st, _) = cap
                .changed
                .wait_timeout_while(st, Duration::from_secs(2), |s| s.open_streams > 0)
                .unwrap();
            return Ok(Output {
                status,
                stdout: st.stdout.clone().into_bytes(),
                stderr: st.stderr.clone().into_bytes(),
            });
        }
        if let Some(s) = self.status {
            return Ok(Output {
                status: s,
                stdout: Vec::new(),
                stderr: Vec::new(),
            });
        }
        let child = self.child.take().expect("child already consumed");
        let out = child.wait_with_output();
        if let Ok(o) = &out {
            self.status = Some(o.status);
        }
        out
    }

    /// Describes how the child ended, e.g. "exit status: 1" or "signal 9".
    pub fn describe(status: ExitStatus) -> String {
        match status.signal() {
            Some(sig) => format!("killed by signal {sig}"),
            None => status.to_string(),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() && self.status.is_none() {
            self.kill();
        }
    }
}
