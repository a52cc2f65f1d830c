//! [`Limiter`]: the real `limiter run` daemon, attached to a lab's server
//! interface, with its own config file, control socket, cgroup and bpffs.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use limiter::control::{self, Request, Status};

use crate::{BpfFs, Cgroup, ChildGuard, Lab, spawn_in, wait_for};

/// The `limiter` binary: `$LIMITER_BIN` (set by `cargo xtask test` to
/// target/debug/limiter), else this package's `limiter-under-test` (the same
/// main.rs), which cargo builds next to the test executables' `deps/`.
pub fn limiter_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LIMITER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let candidate = profile_dir.join("limiter-under-test");
    assert!(
        candidate.exists(),
        "{} does not exist: run the tests with cargo (or set LIMITER_BIN)",
        candidate.display()
    );
    candidate
}

/// A running `limiter run`, stopped with SIGTERM (and its files removed)
/// on drop.
pub struct Limiter {
    child: Option<ChildGuard>,
    dir: PathBuf,
    control: PathBuf,
    // Dropped after the daemon, which holds pins in it.
    _bpffs: BpfFs,
}

impl Limiter {
    /// Starts the daemon on the lab's server interface with `config` (TOML
    /// text) and the sockets of `cgroup` tracked, and waits until it
    /// answers `status`.
    pub fn start(lab: &Lab, cgroup: &Cgroup, config: &str) -> Limiter {
        Self::start_with(lab, cgroup, Some(config), &[])
    }

    /// Like [`Limiter::start`]; `config: None` runs without `--config`, and
    /// `extra` is appended to the command line.
    pub fn start_with(lab: &Lab, cgroup: &Cgroup, config: Option<&str>, extra: &[&str]) -> Limiter {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let bpffs = BpfFs::new();
        let control = dir.join("control.sock");
        let mut cmd = Command::new(limiter_bin());
        cmd.arg("run")
            .args(["--iface", lab.server_iface()])
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--bpffs")
            .arg(bpffs.path().join("limiter"))
            .arg("--control")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            let path = dir.join("connectors.toml");
            std::fs::write(&path, config).expect("writing the config");
            cmd.arg("--config").arg(path);
        }
        // The daemon itself stays out of the tracked cgroup: only the mail
        // server's sockets are counted there.
        let mut child = spawn_in(lab.server_ns(), None, cmd);
        child.capture();
        let mut limiter = Limiter {
            child: Some(child),
            dir,
            control,
            _bpffs: bpffs,
        };
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = limiter.child_mut().try_wait() {
                panic!(
                    "limiter run exited early ({status}):\n{}",
                    limiter.child().stderr_text()
                );
            }
            limiter.try_status().ok()
        });
        if ready.is_none() {
            panic!(
                "limiter run did not answer on {} within 20 s:\n{}",
                limiter.control.display(),
                limiter.child().stderr_text()
            );
        }
        limiter
    }

    fn child(&self) -> &ChildGuard {
        self.child.as_ref().expect("running")
    }

    fn child_mut(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("running")
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.child().stderr_text()
    }

    /// `status`, or why not.
    pub fn try_status(&self) -> Result<Status, String> {
        let value = control::request(&self.control, &Request::Status).map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// `status`; panics with the daemon's log if it fails.
    pub fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|e| panic!("limiter status: {e}\n{}", self.log()))
    }

    /// Live connections of the connector called `name`.
    pub fn live(&self, name: &str) -> u32 {
        let status = self.status();
        status
            .connectors
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no connector {name:?} in {status:?}"))
            .live
    }

    /// Runs `limiter ARGS --control SOCKET` and returns its output.
    pub fn cli(&self, args: &[&str]) -> io::Result<std::process::Output> {
        Command::new(limiter_bin())
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
    }

    /// Stops the daemon with SIGTERM and returns its log; panics if it does
    /// not exit cleanly.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let status = child.terminate(Duration::from_secs(10));
        let log = child.stderr_text();
        assert!(status.success(), "limiter run exited with {status}:\n{log}");
        log
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = child.terminate(Duration::from_secs(10));
            if !status.success() && !std::thread::panicking() {
                eprintln!("limiter run exited with {status}:\n{}", child.stderr_text());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
