//! [`Rsyslog`]: a real rsyslogd with its own config, listening on a socket
//! (or on loopback in a network namespace) and writing what it receives to
//! a file: RFC 5424 as received, or the traditional `... limiter[PID]: text`
//! lines of a mail.log.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{ChildGuard, Netns, wait_until};

/// A running rsyslogd, stopped and its files removed on drop.
pub struct Rsyslog {
    child: ChildGuard,
    dir: PathBuf,
    socket: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslogd on a socket of its own, parsing RFC 5424 and writing
    /// it out as such; returns once its socket exists.
    pub fn start() -> Rsyslog {
        let dir = Self::new_dir();
        let socket = dir.join("log.sock");
        // The special parser assumes the legacy format; the standard chain
        // recognises RFC 5424.
        let input = format!(
            r#"module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{}" UseSpecialParser="off" ParseHostname="on")"#,
            socket.display()
        );
        Self::launch(
            dir,
            socket.clone(),
            &input,
            "RSYSLOG_SyslogProtocol23Format",
            None,
            || socket.exists(),
        )
    }

    /// Starts rsyslogd on `socket` (or a socket of its own) for what
    /// syslog(3) and journald's forwarding send (`<PRI>TIMESTAMP
    /// TAG[PID]: text`), writing the traditional format of a mail.log.
    pub fn start_traditional(socket: Option<&Path>) -> Rsyslog {
        let dir = Self::new_dir();
        let socket = socket.map_or_else(|| dir.join("log.sock"), Path::to_path_buf);
        let input = format!(
            r#"module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{}")"#,
            socket.display()
        );
        let ready = socket.clone();
        Self::launch(
            dir,
            socket,
            &input,
            "RSYSLOG_TraditionalFileFormat",
            None,
            move || ready.exists(),
        )
    }

    /// Starts rsyslogd in `ns`, receiving on 127.0.0.1: UDP on `udp_port`,
    /// TCP on `tcp_port` (RFC 6587 framing), and writing RFC 5424.
    pub fn start_collector(ns: &Netns, udp_port: u16, tcp_port: u16) -> Rsyslog {
        let dir = Self::new_dir();
        let input = format!(
            r#"module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")"#
        );
        let listening = ns.clone();
        Self::launch(
            dir,
            PathBuf::new(),
            &input,
            "RSYSLOG_SyslogProtocol23Format",
            Some(ns),
            move || {
                let out = listening
                    .command("ss")
                    .args(["-Hlnut"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                out.contains(&format!("127.0.0.1:{udp_port}"))
                    && out.contains(&format!("127.0.0.1:{tcp_port}"))
            },
        )
    }

    fn new_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-rsyslog-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the rsyslog directory");
        dir
    }

    fn launch(
        dir: PathBuf,
        socket: PathBuf,
        input: &str,
        template: &str,
        ns: Option<&Netns>,
        ready: impl Fn() -> bool,
    ) -> Rsyslog {
        let output = dir.join("messages");
        let config = format!(
            "global(workDirectory=\"{dir}\")\n{input}\n*.* action(type=\"omfile\" file=\"{output}\" template=\"{template}\")\n",
            dir = dir.display(),
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
        let mut child = match ns {
            Some(ns) => crate::spawn_in(ns, None, cmd),
            None => crate::child::spawn_here(cmd),
        };
        child.capture();
        // From here on, Drop stops it and removes the directory.
        let rsyslog = Rsyslog { child, dir, socket };
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), ready);
        assert!(
            up,
            "rsyslogd did not start listening:\n{}",
            rsyslog.child.stderr_text()
        );
        rsyslog
    }

    /// The socket to give `limiter run --syslog` (not for a collector).
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
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
