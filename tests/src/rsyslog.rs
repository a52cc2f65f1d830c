//! [`Rsyslog`]: a real rsyslogd with its own config, listening on a socket
//! of its own and writing what it receives, RFC 5424 as received, to a file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{ChildGuard, wait_until};

/// A running rsyslogd, stopped and its files removed on drop.
pub struct Rsyslog {
    child: ChildGuard,
    dir: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslogd in the foreground; returns once its socket exists.
    pub fn start() -> Rsyslog {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-rsyslog-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the rsyslog directory");
        let socket = dir.join("log.sock");
        let output = dir.join("messages");
        let config = format!(
            r#"global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
# The special parser assumes the legacy format; the standard chain
# recognises RFC 5424.
input(type="imuxsock" Socket="{socket}" UseSpecialParser="off" ParseHostname="on")
*.* action(type="omfile" file="{output}" template="RSYSLOG_SyslogProtocol23Format")
"#,
            dir = dir.display(),
            socket = socket.display(),
            output = output.display(),
        );
        let config_path = dir.join("rsyslog.conf");
        std::fs::write(&config_path, config).expect("writing rsyslog.conf");
        let mut cmd = Command::new("rsyslogd");
        cmd.arg("-n")
            .arg("-f")
            .arg(&config_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = crate::child::spawn_here(cmd);
        child.capture();
        let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            socket.exists()
        });
        assert!(
            ready,
            "rsyslogd did not create {}:\n{}",
            socket.display(),
            child.stderr_text()
        );
        Rsyslog { child, dir }
    }

    /// The socket to give `limiter run --syslog`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("log.sock")
    }

    /// The lines written so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("messages"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// The directory rsyslogd works in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
