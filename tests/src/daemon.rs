//! [`Limiter`]: the real `limiter run` daemon, attached to a lab's server
//! interface (or any interface in a namespace, [`Limiter::start_in`]), with
//! its own config file, control socket, cgroup and bpffs.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use limiter::api::{self, Request, Status};

use crate::{BpfFs, Cgroup, ChildGuard, Lab, Netns, spawn_in, wait_for};

/// The `limiter` binary: `$LIMITER_BIN` (set by `cargo xtask test` and
/// `cargo xtask demo`), else this package's `limiter-under-test` (the same
/// main.rs), which cargo builds next to the test executables' `deps/`.
pub fn limiter_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LIMITER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("limiter-under-test"))
        .collect();
    candidates
        .iter()
        .find(|c| c.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!("none of {candidates:?} exists: run the tests with cargo (or set LIMITER_BIN)")
        })
}

/// How the daemon's process is started, beyond its arguments.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// The binary, for the daemon and the CLI (default: [`limiter_bin`]).
    pub bin: Option<PathBuf>,
    /// A command that takes the daemon's command line as its arguments and
    /// execs it (into a mount namespace, say), so that the pid stays the
    /// daemon's.
    pub wrapper: Vec<OsString>,
    /// Variables set for the daemon.
    pub env: Vec<(OsString, OsString)>,
}

/// A running `limiter run`, stopped with SIGTERM (and its files removed)
/// on drop.
pub struct Limiter {
    child: Option<ChildGuard>,
    bin: PathBuf,
    launch: Launch,
    ns: Netns,
    args: Vec<OsString>,
    dir: PathBuf,
    control: PathBuf,
    config: Option<PathBuf>,
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
        Self::start_launched(lab, cgroup, config, extra, Launch::default())
    }

    /// Like [`Limiter::start_with`], started as `launch` says.
    pub fn start_launched(
        lab: &Lab,
        cgroup: &Cgroup,
        config: Option<&str>,
        extra: &[&str],
        launch: Launch,
    ) -> Limiter {
        Self::start_in(
            lab.server_ns(),
            lab.server_iface(),
            cgroup,
            config,
            extra,
            launch,
        )
    }

    /// Like [`Limiter::start_launched`], without a [`Lab`]: the daemon runs
    /// in the network namespace `ns` with `--iface iface` (an interface in
    /// `ns`), e.g. on a server of a [`crate::fleet::FleetLab`].
    pub fn start_in(
        ns: &Netns,
        iface: &str,
        cgroup: &Cgroup,
        config: Option<&str>,
        extra: &[&str],
        launch: Launch,
    ) -> Limiter {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let bpffs = BpfFs::new();
        let control = dir.join("control.sock");
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--iface".into(),
            iface.into(),
            "--cgroup".into(),
            cgroup.path().into(),
            "--bpffs".into(),
            bpffs.path().join("limiter").into(),
            "--control".into(),
            control.clone().into(),
        ];
        let config = config.map(|text| {
            let path = dir.join("connectors.toml");
            std::fs::write(&path, text).expect("writing the config");
            args.push("--config".into());
            args.push(path.clone().into());
            path
        });
        if !extra.contains(&"--syslog") {
            // Tests that look at syslog bring their own rsyslogd.
            args.extend(["--syslog".into(), "off".into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        let mut limiter = Limiter {
            child: None,
            bin: launch.bin.clone().unwrap_or_else(limiter_bin),
            launch,
            ns: ns.clone(),
            args,
            dir,
            control,
            config,
            _bpffs: bpffs,
        };
        limiter.spawn();
        limiter
    }

    /// Starts the daemon process (again, after [`Limiter::kill`]) with the
    /// same command line, and waits until it answers.
    pub fn spawn(&mut self) {
        let mut cmd = match self.launch.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.args(&self.args)
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The daemon itself stays out of the tracked cgroup: only the mail
        // server's sockets are counted there.
        let mut child = spawn_in(&self.ns, None, cmd);
        child.capture();
        self.child = Some(child);
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = self.child_mut().try_wait() {
                panic!(
                    "limiter run exited early ({status}):\n{}",
                    self.child().stderr_text()
                );
            }
            self.try_status().ok()
        });
        if ready.is_none() {
            panic!(
                "limiter run did not answer on {} within 20 s:\n{}",
                self.control.display(),
                self.child().stderr_text()
            );
        }
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same command
    /// line and config file; returns the first run's log.
    pub fn restart(&mut self) -> String {
        let log = self.terminate();
        self.spawn();
        log
    }

    /// SIGKILL: the daemon gets no chance to clean up. Returns its log.
    pub fn kill(&mut self) -> String {
        let mut child = self.child.take().expect("running");
        child.kill();
        child.stderr_text()
    }

    /// SIGTERM, and a clean exit. Returns its log.
    pub fn terminate(&mut self) -> String {
        let mut child = self.child.take().expect("running");
        let status = child.terminate(Duration::from_secs(10));
        let log = child.stderr_text();
        assert!(status.success(), "limiter run exited with {status}:\n{log}");
        log
    }

    fn child(&self) -> &ChildGuard {
        self.child.as_ref().expect("running")
    }

    /// Whether the daemon process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The `--bpffs` directory.
    pub fn bpffs(&self) -> PathBuf {
        self._bpffs.path().join("limiter")
    }

    fn child_mut(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("running")
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The config file, when started with one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.stderr_text())
            .unwrap_or_default()
    }

    /// `status`, or why not.
    pub fn try_status(&self) -> Result<Status, String> {
        let value = api::request(&self.control, &Request::Status).map_err(|e| {
            // The error and its causes (the errno says why).
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        })?;
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

    /// Runs `limiter ARGS --control SOCKET`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .expect("running limiter")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "limiter {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI command with `--json` that must succeed; returns the JSON.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = self.cli_ok(&with_json);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Runs a CLI command that must fail with exit code 1 and one line on
    /// stderr; returns that line.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "limiter {args:?} should fail: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        stderr.trim_end().to_string()
    }

    /// Stops the daemon with SIGTERM and returns its log; panics if it does
    /// not exit cleanly.
    pub fn stop(mut self) -> String {
        self.terminate()
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
