//! [`Journald`]: a real systemd-journald of the test's own, standalone in a
//! private mount namespace, its journal files in the test's directory, and
//! a real rsyslogd it forwards to (as on a Debian host, where mail.log comes
//! from journald).
//!
//! journald's sockets live in `/run/systemd/journal`: in its namespace
//! that is a bind mount of the test's directory, and a daemon started with
//! [`Journald::launch`] gets the same bind mount in a private mount
//! namespace of its own, so that it finds journald where it always is.
//! Both namespaces, with their mounts, go away with their processes;
//! nothing on the host changes.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Map, Value};

use crate::{ChildGuard, Rsyslog, daemon::Launch, wait_until};

/// Makes a private mount namespace with `/run` a fresh tmpfs and `$0`
/// bind-mounted on `/run/systemd/journal`, then execs `"$@"`.
const WITH_JOURNAL_SOCKETS: &str = "mount -t tmpfs tmpfs /run; \
     mkdir -p /run/systemd/journal; \
     mount --bind \"$0\" /run/systemd/journal; \
     exec \"$@\"";

/// One journal entry: field to value (`journalctl -o json`).
pub type JournalEntry = Map<String, Value>;

/// A running systemd-journald with a forwarding rsyslogd; both stopped and
/// the files removed on drop.
pub struct Journald {
    // Stopped before rsyslogd, which it forwards to.
    child: ChildGuard,
    syslog: Rsyslog,
    dir: PathBuf,
}

impl Journald {
    /// Starts rsyslogd on the socket journald forwards to, then journald
    /// (volatile storage, forwarding to syslog, no rate limit); returns once
    /// journald's socket exists.
    pub fn start() -> Journald {
        crate::require_root();
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-journald-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        for sub in ["run", "files"] {
            std::fs::create_dir_all(dir.join(sub)).expect("creating the journald directory");
        }
        std::fs::write(
            dir.join("journald.conf"),
            "[Journal]\nStorage=volatile\nForwardToSyslog=yes\nMaxLevelSyslog=debug\n\
             ForwardToWall=no\nForwardToConsole=no\nForwardToKMsg=no\nReadKMsg=no\n\
             RateLimitIntervalSec=0\n",
        )
        .expect("writing journald.conf");
        let syslog = Rsyslog::start_traditional(Some(&dir.join("run/syslog")));
        let script = "mount -t tmpfs tmpfs /run; \
             mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d; \
             mount --bind \"$0/run\" /run/systemd/journal; \
             mount --bind \"$0/files\" /run/log/journal; \
             cp \"$0/journald.conf\" /run/systemd/journald.conf.d/test.conf; \
             exec /lib/systemd/systemd-journald";
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-ec",
            script,
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = crate::child::spawn_here(cmd);
        child.capture();
        let journald = Journald { child, syslog, dir };
        let socket = journald.dir.join("run/socket");
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            socket.exists()
        });
        assert!(
            up,
            "systemd-journald did not create {}:\n{}",
            socket.display(),
            journald.child.stderr_text()
        );
        journald
    }

    /// How to start a daemon that sees this journald at
    /// /run/systemd/journal (see [`crate::Limiter::start_launched`]).
    pub fn launch(&self) -> Launch {
        Launch {
            wrapper: mount_namespace_wrapper(WITH_JOURNAL_SOCKETS, &self.dir.join("run")),
            ..Launch::default()
        }
    }

    /// Like [`Journald::launch`], with stderr connected to the journal as
    /// systemd connects a service's: `JOURNAL_STREAM` names it (here a
    /// pipe to the test, standing in for journald's stream socket).
    pub fn launch_as_service(&self) -> Launch {
        let script = format!(
            "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); export JOURNAL_STREAM; {WITH_JOURNAL_SOCKETS}"
        );
        Launch {
            wrapper: mount_namespace_wrapper(&script, &self.dir.join("run")),
            ..Launch::default()
        }
    }

    /// The entries `journalctl` finds with `matches` (`FIELD=VALUE`, or
    /// `-t IDENTIFIER`), oldest first.
    pub fn entries(&self, matches: &[&str]) -> Vec<JournalEntry> {
        let files = self.dir.join("files");
        let machines: Vec<PathBuf> = std::fs::read_dir(&files)
            .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        let Some(machine) = machines.first() else {
            return Vec::new();
        };
        let out = crate::run_checked(
            Command::new("journalctl")
                .arg("-D")
                .arg(machine)
                .args(["-o", "json", "--no-pager"])
                .args(matches),
        );
        out.lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("journalctl -o json: {e}: {line}"))
            })
            .collect()
    }

    /// The lines the forwarding rsyslogd wrote, as in a mail.log.
    pub fn syslog_lines(&self) -> Vec<String> {
        self.syslog.lines()
    }

    /// journald's own output (for messages).
    pub fn log(&self) -> String {
        self.child.stderr_text()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A wrapper for [`Launch`] that runs `script` in a private mount namespace
/// with `arg` as `$0` and the daemon's command line as `"$@"`.
pub fn mount_namespace_wrapper(script: &str, arg: &Path) -> Vec<OsString> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-ec",
        script,
    ]
    .into_iter()
    .map(OsString::from)
    .chain([arg.as_os_str().to_owned()])
    .collect()
}

/// A wrapper for [`Launch`] under which no journald runs: `/run` is an
/// empty tmpfs in a private mount namespace.
pub fn without_journald() -> Launch {
    Launch {
        wrapper: mount_namespace_wrapper("mount -t tmpfs tmpfs /run; exec \"$@\"", Path::new("sh")),
        ..Launch::default()
    }
}
