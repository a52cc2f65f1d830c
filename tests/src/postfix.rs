//! [`Postfix`]: a real Postfix (Debian's package) in the lab's server
//! namespace, with a config and queue of its own, listening on port 25 and
//! delivering everything for `lab.test` to one maildir; or, with
//! [`Postfix::start_relay_client`], one in the client namespace that sends
//! its queue to the server.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{Cgroup, ChildGuard, Lab, Netns, spawn_in, wait_until};

/// The mail domain the lab's Postfix takes mail for.
pub const DOMAIN: &str = "lab.test";

const MASTER: &str = "/usr/lib/postfix/sbin/master";
const SENDMAIL: &str = "/usr/sbin/sendmail";

/// A running Postfix master; stopped (with its children) and its files
/// removed on drop.
pub struct Postfix {
    master: Option<ChildGuard>,
    dir: PathBuf,
}

fn id(flag: &str, name: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, name])
        .output()
        .expect("running id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no user or group {name}: is postfix installed?"))
}

fn group_id(name: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", name])
        .output()
        .expect("running getent");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|gid| gid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no group {name}: is postfix installed?"))
}

fn chown(path: &Path, uid: u32, gid: u32, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A fresh instance directory, laid out as `postfix post-install` would.
struct Prepared {
    dir: PathBuf,
    postfix_uid: u32,
    postfix_gid: u32,
}

fn prepare(kind: &str) -> Prepared {
    let dir = std::env::temp_dir().join(format!(
        "limiter-test-{kind}-{}-{}",
        std::process::id(),
        crate::next_id()
    ));
    let (postfix_uid, postfix_gid) = (id("-u", "postfix"), id("-g", "postfix"));
    let postdrop = group_id("postdrop");
    for sub in ["etc", "spool", "data", "mail"] {
        std::fs::create_dir_all(dir.join(sub)).expect("creating the Postfix directories");
    }
    // What `postfix post-install` would create (that command insists on
    // a system-wide /etc/postfix/main.cf, which this lab leaves alone).
    let spool = dir.join("spool");
    chown(&dir, 0, 0, 0o755);
    chown(&spool, 0, 0, 0o755);
    for queue in [
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private",
        "saved", "trace",
    ] {
        let path = spool.join(queue);
        std::fs::create_dir_all(&path).unwrap();
        chown(&path, postfix_uid, 0, 0o700);
    }
    for (queue, mode) in [("maildrop", 0o730), ("public", 0o710)] {
        let path = spool.join(queue);
        std::fs::create_dir_all(&path).unwrap();
        chown(&path, postfix_uid, postdrop, mode);
    }
    std::fs::create_dir_all(spool.join("pid")).unwrap();
    chown(&spool.join("pid"), 0, 0, 0o755);
    chown(&dir.join("data"), postfix_uid, postfix_gid, 0o700);
    chown(&dir.join("mail"), postfix_uid, postfix_gid, 0o755);
    Prepared {
        dir,
        postfix_uid,
        postfix_gid,
    }
}

/// Whether a master.cf line is the SMTP server on port 25 (`smtp inet ...`).
fn is_smtpd_listener(line: &str) -> bool {
    let mut fields = line.split_whitespace();
    fields.next() == Some("smtp") && fields.next() == Some("inet")
}

impl Postfix {
    /// Configures and starts Postfix in `lab`'s server namespace, in
    /// `cgroup` (so that the limiter tracks its sockets).
    pub fn start(lab: &Lab, cgroup: &Cgroup) -> Postfix {
        let Prepared {
            dir,
            postfix_uid,
            postfix_gid,
        } = prepare("postfix");
        let d = dir.display();
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
# The server namespace holds only lab addresses.
inet_interfaces = all
inet_protocols = all
mydestination =
mynetworks = 10.77.0.0/24, [fd77::]/48
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{postfix_uid}
virtual_gid_maps = static:{postfix_gid}
# The limiter does the limiting here.
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 300
# Nothing leaves the lab: no DNS, no delivery anywhere else, no notices.
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
default_transport = error:this lab delivers nowhere else
relay_transport = error:this lab delivers nowhere else
notify_classes =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
",
        );
        std::fs::write(dir.join("etc/main.cf"), main_cf).unwrap();
        std::fs::copy(
            "/usr/share/postfix/master.cf.dist",
            dir.join("etc/master.cf"),
        )
        .expect("Postfix's master.cf.dist: is postfix installed?");
        Self::launch(lab.server_ns(), Some(cgroup), dir)
    }

    /// Configures and starts a sending Postfix in `lab`'s client namespace
    /// (outside any tracked cgroup): it listens on nothing, relays every
    /// message to `relayhost` from the source address `bind`, and retries
    /// deferred mail every second or two. Submit with [`Postfix::submit`].
    pub fn start_relay_client(lab: &Lab, bind: IpAddr, relayhost: SocketAddr) -> Postfix {
        let Prepared { dir, .. } = prepare("postfix-sender");
        let d = dir.display();
        let (protocols, relay) = match relayhost.ip() {
            IpAddr::V4(ip) => ("ipv4", format!("[{ip}]:{}", relayhost.port())),
            IpAddr::V6(ip) => ("ipv6", format!("[ipv6:{ip}]:{}", relayhost.port())),
        };
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = client.{DOMAIN}
mydomain = {DOMAIN}
# master.cf has no smtpd: this instance listens on nothing.
inet_interfaces = loopback-only
inet_protocols = {protocols}
mydestination =
relayhost = {relay}
smtp_bind_address = {bind}
# No DNS, no local delivery, no notices.
smtp_dns_support_level = disabled
local_transport = error:this sender delivers nothing locally
notify_classes =
alias_maps =
alias_database =
biff = no
# A test waits for the retry: make it come quickly.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 2s
smtp_helo_timeout = 5s
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
",
        );
        std::fs::write(dir.join("etc/main.cf"), main_cf).unwrap();
        let master_cf = std::fs::read_to_string("/usr/share/postfix/master.cf.dist")
            .expect("Postfix's master.cf.dist: is postfix installed?");
        let master_cf: String = master_cf
            .lines()
            .filter(|l| !is_smtpd_listener(l))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.join("etc/master.cf"), master_cf).unwrap();
        Self::launch(lab.client_ns(), None, dir)
    }

    /// Starts the master of the instance configured in `dir`, in `ns` (and
    /// `cgroup`), and waits until it has started.
    fn launch(ns: &Netns, cgroup: Option<&Cgroup>, dir: PathBuf) -> Postfix {
        let mut cmd = Command::new(MASTER);
        cmd.arg("-c")
            .arg(dir.join("etc"))
            .arg("-d")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut master = spawn_in(ns, cgroup, cmd);
        master.capture();
        let mut postfix = Postfix {
            master: Some(master),
            dir,
        };
        let up = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            postfix.log().contains("daemon started")
        });
        if let Some(status) = postfix.master.as_mut().and_then(|m| m.try_wait()) {
            panic!("postfix master exited ({status}): {}", postfix.log());
        }
        assert!(up, "postfix did not start: {}", postfix.log());
        postfix
    }

    /// Submits `message` (headers and body) from `from` to `to` with
    /// Postfix's sendmail, into this instance's queue.
    pub fn submit(&self, from: &str, to: &str, message: &str) {
        let mut child = Command::new(SENDMAIL)
            .arg("-C")
            .arg(self.dir.join("etc"))
            .args(["-i", "-f", from, "--", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running Postfix's sendmail");
        child
            .stdin
            .take()
            .expect("sendmail's stdin")
            .write_all(message.as_bytes())
            .expect("writing the message to sendmail");
        let out = child.wait_with_output().expect("waiting for sendmail");
        assert!(
            out.status.success(),
            "sendmail failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Postfix's own log (its `maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// The maildir everything is delivered to.
    pub fn maildir(&self) -> PathBuf {
        self.dir.join("mail/inbox")
    }

    /// Messages delivered, by the client address in their first Received
    /// header.
    pub fn delivered_by_client(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir().join(sub)) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let Ok(text) = std::fs::read_to_string(entry.path()) else {
                    continue;
                };
                if let Some(client) = received_from(&text) {
                    *out.entry(client).or_default() += 1;
                }
            }
        }
        out
    }

    /// Whether the queue is empty (everything delivered).
    pub fn queue_is_empty(&self) -> bool {
        ["incoming", "active", "deferred", "maildrop"]
            .iter()
            .all(|queue| count_files(&self.dir.join("spool").join(queue)) == 0)
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The client address in `Received: from helo (unknown [10.77.0.13])`.
fn received_from(message: &str) -> Option<String> {
    let received = message.lines().find(|l| l.starts_with("Received: from"))?;
    let open = received.find('[')?;
    let close = received[open..].find(']')? + open;
    let inner = &received[open + 1..close];
    Some(inner.strip_prefix("IPv6:").unwrap_or(inner).to_string())
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Some(mut master) = self.master.take() {
            // master stops its children on SIGTERM.
            master.terminate(Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_client_of_a_message() {
        let m = "Return-Path: <a@b>\nReceived: from app (unknown [10.77.0.20])\n\tby mx.lab.test (Postfix) with ESMTP id 1\n";
        assert_eq!(received_from(m).as_deref(), Some("10.77.0.20"));
        let m = "Received: from app (unknown [IPv6:fd77:0:0:2::10])\n";
        assert_eq!(received_from(m).as_deref(), Some("fd77:0:0:2::10"));
    }
}
