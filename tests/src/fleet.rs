//! [`FleetLab`]: an operator's namespace and `n` mail servers, each with a
//! real OpenSSH server and room for a limiter daemon, for the fan-out CLI
//! (`limiter ... --server HOST`), which reaches every server through the
//! system `ssh` client.
//!
//! | namespace | link to ops     | address           | ssh name |
//! |-----------|-----------------|-------------------|----------|
//! | server k  | its own veth    | 10.78.k.1/24      | `mxk`    |
//! | ops       | one veth per k  | 10.78.k.2/24      |          |
//!
//! Each server's sshd (`/usr/sbin/sshd -D -e`, Debian's openssh-server)
//! runs inside the server's namespace and listens only on 10.78.k.1:22. It
//! has its own `sshd_config`, host key and `authorized_keys` in the test's
//! directory; nothing under /etc/ssh or /root/.ssh is read or written, and
//! no sshd ever runs in the caller's namespace. The client key, the
//! `known_hosts` (the servers' real host keys, checked strictly) and the
//! client's `ssh_config` are in the test's directory too:
//! [`FleetLab::ssh_command`] is the `LIMITER_SSH` that uses them.
//!
//! What the remote `limiter` sees comes from the server's `sshd_config`,
//! in one `SetEnv` line (sshd keeps only the first `SetEnv` line): sshd
//! applies `SetEnv` after its own defaults, so it replaces sshd's PATH.
//!
//! - `PATH=<dir>/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
//!   where `<dir>/bin/limiter` is a symlink to [`limiter_bin`], the binary
//!   under test;
//! - `LIMITER_CONTROL=<dir>/mxk/control.sock`, a symlink to the control
//!   socket of the daemon [`FleetLab::start_limiter`] started on that
//!   server (dangling while there is none: the remote CLI then fails as it
//!   does on a server whose daemon is down);
//! - `SHLVL=1`: root's shell runs the remote command (`bash -c`), and
//!   Debian's bash sources `~/.bashrc` and /etc/bash.bashrc when started by
//!   sshd as a top-level shell; with SHLVL=1 inherited it counts itself as
//!   level 2 and skips them, so neither the machine's /root/.bashrc (which
//!   may prepend to PATH, print, or take its time) nor anything else of the
//!   host's login setup changes what the CLI gets back.
//!
//! sshd needs its privilege separation directory /run/sshd: the first
//! fleet lab of the process creates it if it is missing, and the last one
//! removes it again if it was created here.
//!
//! ```no_run
//! use limiter_tests::{FleetLab, scenario::connector};
//!
//! let mut fleet = FleetLab::new(2);
//! for k in 1..=2 {
//!     fleet.start_limiter(k, &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "10", 100));
//! }
//! // `limiter ... --json` on mx1 and mx2, through `$LIMITER_SSH`.
//! let out = fleet.cli(&["status", "--server", "mx1", "--server", "mx2"]);
//! // From now on mx2 refuses ssh connections; mx1 still answers.
//! fleet.stop_sshd(2);
//! ```

use std::{
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use crate::{
    Cgroup, ChildGuard, CleanupErrors, Limiter, Netns, OwnedNetns,
    daemon::{Launch, limiter_bin},
    run_checked, spawn_in,
};

/// Debian's OpenSSH server (package openssh-server).
pub const SSHD: &str = "/usr/sbin/sshd";
/// The most servers a fleet lab holds (one digit in names and subnets).
pub const MAX_SERVERS: usize = 9;
/// How long sshd may take to listen, and the daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// sshd's privilege separation directory (Debian's build).
const PRIVSEP_DIR: &str = "/run/sshd";
/// The PATH of an ssh session after the fleet's own `bin` directory
/// (OpenSSH's default for root).
const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Server `k`'s address, 10.78.k.1 (`k` from 1).
pub fn server_addr(k: usize) -> Ipv4Addr {
    check_k(k, MAX_SERVERS);
    Ipv4Addr::new(10, 78, k as u8, 1)
}

/// The ops namespace's address on server `k`'s link, 10.78.k.2.
pub fn ops_addr(k: usize) -> Ipv4Addr {
    check_k(k, MAX_SERVERS);
    Ipv4Addr::new(10, 78, k as u8, 2)
}

/// Server `k`'s name in the fleet's `ssh_config`: `mxk`.
pub fn host(k: usize) -> String {
    check_k(k, MAX_SERVERS);
    format!("mx{k}")
}

fn check_k(k: usize, n: usize) {
    assert!(
        (1..=n).contains(&k),
        "server {k}: servers are numbered 1 ..= {n}"
    );
}

/// An ops namespace and `n` server namespaces, each server joined to ops by
/// a veth pair of its own and running a real sshd; a limiter daemon is
/// started on a server with [`FleetLab::start_limiter`]. Servers are
/// numbered from 1, as their names (`mx1`, `mx2`, ...) and subnets are.
///
/// Drop stops the daemons (SIGTERM) and the sshds (SIGKILL), kills what is
/// left in the namespaces (ssh sessions), deletes the namespaces (and with
/// them the veths) and the cgroups, removes the test's directory, and
/// /run/sshd as the module says; also when the test panics.
pub struct FleetLab {
    // Field order is drop order: servers (daemon, sshd, cgroup, namespace),
    // then ops, then the files, then /run/sshd.
    servers: Vec<Server>,
    ops: OwnedNetns,
    dir: TestDir,
    _privsep: PrivsepDir,
}

/// One server of a fleet. Field order is drop order.
struct Server {
    limiter: Option<Limiter>,
    sshd: Option<ChildGuard>,
    cgroup: Cgroup,
    ns: OwnedNetns,
    iface: String,
    ops_iface: String,
    /// `<dir>/mxk`: sshd_config, host key, authorized_keys, control.sock.
    dir: PathBuf,
}

impl FleetLab {
    /// Creates the namespaces, links, keys and configs, and starts one sshd
    /// per server (waiting until each listens); panics on failure (after
    /// removing whatever it had already created).
    pub fn new(n: usize) -> FleetLab {
        crate::require_root();
        assert!(
            (1..=MAX_SERVERS).contains(&n),
            "a fleet lab has 1 ..= {MAX_SERVERS} servers, not {n}"
        );
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (cargo xtask setup does)"
        );
        let pid = std::process::id();
        let privsep = PrivsepDir::acquire();
        let (stem, ops) = loop {
            let stem = format!("lf{pid}x{}", crate::next_id());
            // The longest name is the stem, a letter and one digit.
            assert!(
                stem.len() + 2 <= 15,
                "name stem {stem} too long for a netns/link name"
            );
            let o = format!("{stem}o");
            if Netns::named(&o).path().exists()
                || (1..=n).any(|k| Netns::named(&format!("{stem}s{k}")).path().exists())
            {
                continue;
            }
            break (stem, OwnedNetns::create(&o));
        };
        let dir = TestDir::new(&format!("limiter-fleet-{pid}"));
        let mut lab = FleetLab {
            servers: Vec::new(),
            ops,
            dir,
            _privsep: privsep,
        };
        let root = lab.dir.0.clone();

        // The binary under test, first on every session's PATH.
        std::fs::create_dir(root.join("bin")).expect("creating the fleet's bin directory");
        std::os::unix::fs::symlink(limiter_bin(), root.join("bin/limiter"))
            .expect("linking the limiter binary");
        std::fs::create_dir(root.join("client")).expect("creating the client's directory");
        keygen(&root.join("client/id_ed25519"), "limiter-fleet client");
        let client_pub = std::fs::read_to_string(root.join("client/id_ed25519.pub"))
            .expect("reading the client key");

        let mut ops_lines = Vec::new();
        let mut known_hosts = String::new();
        for k in 1..=n {
            let server = Server {
                limiter: None,
                sshd: None,
                cgroup: Cgroup::new(),
                ns: OwnedNetns::create(&format!("{stem}s{k}")),
                iface: format!("{stem}v{k}"),
                ops_iface: format!("{stem}p{k}"),
                dir: root.join(host(k)),
            };
            lab.servers.push(server);
            let server = &lab.servers[k - 1];
            // Created inside the namespaces, never in the caller's.
            server.ns.ip(&[
                "link",
                "add",
                &server.iface,
                "type",
                "veth",
                "peer",
                "name",
                &server.ops_iface,
                "netns",
                lab.ops.name(),
            ]);
            server.ns.ip_batch(&[
                format!("addr add {}/24 dev {}", server_addr(k), server.iface),
                format!("link set {} up", server.iface),
            ]);
            ops_lines.push(format!(
                "addr add {}/24 dev {}",
                ops_addr(k),
                server.ops_iface
            ));
            ops_lines.push(format!("link set {} up", server.ops_iface));

            std::fs::create_dir(&server.dir).expect("creating a server's directory");
            let host_key = server.dir.join("ssh_host_ed25519_key");
            keygen(&host_key, &format!("limiter-fleet {}", host(k)));
            let host_pub = std::fs::read_to_string(host_key.with_extension("pub"))
                .expect("reading a host key");
            let mut fields = host_pub.split_whitespace();
            let (kind, key) = (fields.next().unwrap(), fields.next().unwrap());
            known_hosts.push_str(&format!("{},{} {kind} {key}\n", host(k), server_addr(k)));
            let authorized_keys = server.dir.join("authorized_keys");
            std::fs::write(&authorized_keys, &client_pub).expect("writing authorized_keys");
            std::fs::write(
                server.dir.join("sshd_config"),
                sshd_config(
                    server_addr(k),
                    &host_key,
                    &authorized_keys,
                    &root.join("bin"),
                    &server.dir.join("control.sock"),
                ),
            )
            .expect("writing sshd_config");
        }
        lab.ops.ip_batch(&ops_lines);
        std::fs::write(root.join("known_hosts"), known_hosts).expect("writing known_hosts");
        std::fs::write(
            root.join("ssh_config"),
            ssh_config(
                n,
                &root.join("client/id_ed25519"),
                &root.join("known_hosts"),
            ),
        )
        .expect("writing ssh_config");

        let up = crate::wait_until(START_TIMEOUT, Duration::from_millis(10), || {
            lab.servers.iter().all(|s| {
                s.ns.ip(&["-o", "link", "show", "dev", &s.iface])
                    .contains("state UP")
                    && lab
                        .ops
                        .ip(&["-o", "link", "show", "dev", &s.ops_iface])
                        .contains("state UP")
            })
        });
        assert!(up, "the fleet's veths did not come up");
        for k in 1..=n {
            lab.start_sshd(k);
        }
        lab
    }

    /// How many servers there are.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there are no servers (never: a fleet lab has at least one).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn server(&self, k: usize) -> &Server {
        check_k(k, self.servers.len());
        &self.servers[k - 1]
    }

    fn server_mut(&mut self, k: usize) -> &mut Server {
        check_k(k, self.servers.len());
        &mut self.servers[k - 1]
    }

    /// The operator's namespace, where [`FleetLab::cli`] runs.
    pub fn ops_ns(&self) -> &Netns {
        &self.ops
    }

    /// Server `k`'s namespace.
    pub fn server_ns(&self, k: usize) -> &Netns {
        &self.server(k).ns
    }

    /// Server `k`'s veth end (where its limiter attaches).
    pub fn server_iface(&self, k: usize) -> &str {
        &self.server(k).iface
    }

    /// The ops namespace's veth end towards server `k`.
    pub fn ops_iface(&self, k: usize) -> &str {
        &self.server(k).ops_iface
    }

    /// Server `k`'s cgroup, the one its limiter tracks.
    pub fn cgroup(&self, k: usize) -> &Cgroup {
        &self.server(k).cgroup
    }

    /// The names of all servers in the `ssh_config`: `mx1`, `mx2`, ...
    pub fn hosts(&self) -> Vec<String> {
        (1..=self.len()).map(host).collect()
    }

    /// The test's directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The client's `ssh_config`: a `Host mxk` per server (HostName
    /// 10.78.k.1), and for every host (names and bare addresses alike) user
    /// root, the test's client key only, the test's `known_hosts` with
    /// strict checking, BatchMode, a 3 s ConnectTimeout and keepalives that
    /// give up on a silent server after about 6 s.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir().join("ssh_config")
    }

    /// The value for `LIMITER_SSH`: `ssh -F <ssh_config>` (the test's
    /// directory has no white space in its path).
    pub fn ssh_command(&self) -> String {
        format!("ssh -F {}", self.ssh_config().display())
    }

    /// Where `LIMITER_CONTROL` points for server `k`'s sessions: a symlink
    /// to its daemon's control socket.
    pub fn control(&self, k: usize) -> PathBuf {
        self.server(k).dir.join("control.sock")
    }

    /// Writes `hosts`, one a line, to a new file in the test's directory
    /// (for `--servers-file`) and returns its path.
    pub fn servers_file(&self, hosts: &[&str]) -> PathBuf {
        let path = self.dir().join(format!("servers-{}.txt", crate::next_id()));
        let mut text = hosts.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("writing a servers file");
        path
    }

    /// Runs `limiter ARGS` ([`limiter_bin`]) in the ops namespace with
    /// `LIMITER_SSH` set to [`FleetLab::ssh_command`], without
    /// `LIMITER_CONTROL`, stdin from /dev/null.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.ops
            .command(limiter_bin())
            .args(args)
            .env("LIMITER_SSH", self.ssh_command())
            .env_remove("LIMITER_CONTROL")
            .stdin(Stdio::null())
            .output()
            .expect("running limiter in the ops namespace")
    }

    /// Runs `ssh -F <ssh_config> DESTINATION REMOTE...` in the ops namespace
    /// (stdin from /dev/null). As with any ssh, the remote words are joined
    /// with spaces and run by the remote user's shell.
    pub fn ssh(&self, destination: &str, remote: &[&str]) -> Output {
        self.ops
            .command("ssh")
            .arg("-F")
            .arg(self.ssh_config())
            .arg(destination)
            .args(remote)
            .stdin(Stdio::null())
            .output()
            .expect("running ssh in the ops namespace")
    }

    /// Starts a limiter daemon on server `k` (its veth, its cgroup) with
    /// `config` (TOML text), waits until it answers, and points the
    /// server's `LIMITER_CONTROL` at it. A daemon already there is stopped
    /// first.
    pub fn start_limiter(&mut self, k: usize, config: &str) -> &Limiter {
        self.start_limiter_with(k, Some(config), &[], Launch::default())
    }

    /// Like [`FleetLab::start_limiter`], with [`Limiter::start_in`]'s
    /// options.
    pub fn start_limiter_with(
        &mut self,
        k: usize,
        config: Option<&str>,
        extra: &[&str],
        launch: Launch,
    ) -> &Limiter {
        let control = self.control(k);
        let server = self.server_mut(k);
        server.limiter = None;
        let limiter = Limiter::start_in(
            &server.ns,
            &server.iface,
            &server.cgroup,
            config,
            extra,
            launch,
        );
        match std::fs::remove_file(&control) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing {}: {e}", control.display()),
        }
        std::os::unix::fs::symlink(limiter.control(), &control)
            .unwrap_or_else(|e| panic!("linking {}: {e}", control.display()));
        server.limiter.insert(limiter)
    }

    /// Server `k`'s daemon; panics if none was started.
    pub fn limiter(&self, k: usize) -> &Limiter {
        self.server(k)
            .limiter
            .as_ref()
            .unwrap_or_else(|| panic!("no limiter was started on {}", host(k)))
    }

    /// Server `k`'s daemon, to kill, restart or stop it by hand.
    pub fn limiter_mut(&mut self, k: usize) -> &mut Limiter {
        self.server_mut(k)
            .limiter
            .as_mut()
            .unwrap_or_else(|| panic!("no limiter was started on {}", host(k)))
    }

    /// SIGKILLs server `k`'s daemon (it leaves its control socket behind,
    /// as a crashed daemon does); returns its log.
    pub fn kill_limiter(&mut self, k: usize) -> String {
        self.limiter_mut(k).kill()
    }

    /// Starts server `k`'s daemon again (after [`FleetLab::kill_limiter`] or
    /// [`Limiter::terminate`]) with the same command line and config file,
    /// and waits until it answers.
    pub fn restart_limiter(&mut self, k: usize) {
        self.limiter_mut(k).spawn()
    }

    /// Starts server `k`'s sshd (again, after [`FleetLab::stop_sshd`]) and
    /// waits until it listens on 10.78.k.1:22.
    pub fn start_sshd(&mut self, k: usize) {
        let server = self.server_mut(k);
        assert!(server.sshd.is_none(), "sshd of {} already runs", host(k));
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"])
            .arg(server.dir.join("sshd_config"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Not in the tracked cgroup: only the mail server's sockets count.
        let mut child = spawn_in(&server.ns, None, cmd);
        child.capture();
        let listening = format!("Server listening on {} port 22.", server_addr(k));
        let line = child.wait_for_line(START_TIMEOUT, |l| l.contains(&listening));
        if line.is_none() {
            let state = match child.try_wait() {
                Some(status) => format!("exited ({status})"),
                None => format!("did not listen within {START_TIMEOUT:?}"),
            };
            panic!("sshd of {} {state}:\n{}", host(k), child.stderr_text());
        }
        server.sshd = Some(child);
    }

    /// SIGKILLs server `k`'s sshd: from now on connections to it are
    /// refused (sessions already open go on until they end). Returns its
    /// log.
    pub fn stop_sshd(&mut self, k: usize) -> String {
        let mut child = self
            .server_mut(k)
            .sshd
            .take()
            .unwrap_or_else(|| panic!("sshd of {} is not running", host(k)));
        child.kill();
        child.stderr_text()
    }

    /// Whether server `k`'s sshd runs.
    pub fn sshd_running(&mut self, k: usize) -> bool {
        let server = self.server_mut(k);
        match server.sshd.as_mut() {
            Some(child) => child.try_wait().is_none(),
            None => false,
        }
    }

    /// Server `k`'s sshd log so far (`-e`: on stderr).
    pub fn sshd_log(&self, k: usize) -> String {
        self.server(k)
            .sshd
            .as_ref()
            .map(|c| c.stderr_text())
            .unwrap_or_default()
    }
}

/// `ssh-keygen -t ed25519 -N ''` into `path` (and `path.pub`).
fn keygen(path: &Path, comment: &str) {
    run_checked(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    );
}

fn no_space(path: &Path) -> String {
    let s = path.display().to_string();
    assert!(
        !s.contains(char::is_whitespace),
        "{s:?}: the fleet's paths must have no white space (ssh configs, LIMITER_SSH)"
    );
    s
}

/// A server's `sshd_config`: listens on `addr`:22 only, public keys from
/// `authorized_keys` only, root allowed with a key, no PAM, nothing read
/// from the user's home, and the session's environment of the module doc.
pub fn sshd_config(
    addr: Ipv4Addr,
    host_key: &Path,
    authorized_keys: &Path,
    bin: &Path,
    control: &Path,
) -> String {
    format!(
        "# Written by limiter-tests' FleetLab: a test's own sshd, in a test's namespace.\n\
         ListenAddress {addr}:22\n\
         AddressFamily inet\n\
         HostKey {host_key}\n\
         PidFile none\n\
         AuthorizedKeysFile {authorized_keys}\n\
         AuthorizedPrincipalsFile none\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         HostbasedAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitUserEnvironment no\n\
         PermitUserRC no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         UseDNS no\n\
         X11Forwarding no\n\
         AllowTcpForwarding no\n\
         AllowAgentForwarding no\n\
         PermitTunnel no\n\
         LogLevel INFO\n\
         # sshd keeps the first SetEnv line only: everything on this one.\n\
         SetEnv PATH={bin}:{STD_PATH} LIMITER_CONTROL={control} SHLVL=1\n",
        host_key = no_space(host_key),
        authorized_keys = no_space(authorized_keys),
        bin = no_space(bin),
        control = no_space(control),
    )
}

/// The client's `ssh_config` for `n` servers (see [`FleetLab::ssh_config`]).
pub fn ssh_config(n: usize, identity: &Path, known_hosts: &Path) -> String {
    let mut text = String::from("# Written by limiter-tests' FleetLab.\n");
    for k in 1..=n {
        text.push_str(&format!(
            "Host {}\n  HostName {}\n",
            host(k),
            server_addr(k)
        ));
    }
    text.push_str(&format!(
        "Host *\n\
         \x20 User root\n\
         \x20 IdentityFile {identity}\n\
         \x20 IdentitiesOnly yes\n\
         \x20 IdentityAgent none\n\
         \x20 UserKnownHostsFile {known_hosts}\n\
         \x20 GlobalKnownHostsFile /dev/null\n\
         \x20 StrictHostKeyChecking yes\n\
         \x20 UpdateHostKeys no\n\
         \x20 BatchMode yes\n\
         \x20 ConnectTimeout 3\n\
         \x20 ServerAliveInterval 2\n\
         \x20 ServerAliveCountMax 3\n\
         \x20 LogLevel ERROR\n",
        identity = no_space(identity),
        known_hosts = no_space(known_hosts),
    ));
    text
}

/// The fleet's directory under the temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    /// A new directory `{prefix}-{n}` (skipping names left over by an
    /// earlier process with the same pid).
    fn new(prefix: &str) -> TestDir {
        loop {
            let path = std::env::temp_dir().join(format!("{prefix}-{}", crate::next_id()));
            no_space(&path);
            match std::fs::create_dir(&path) {
                Ok(()) => return TestDir(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("creating {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let mut errs = CleanupErrors::new(format!("directory {}", self.0.display()));
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(e.to_string());
        }
        errs.finish();
    }
}

/// Fleet labs of this process using /run/sshd, and whether one of them
/// created it.
struct PrivsepUse {
    users: usize,
    created: bool,
}

static PRIVSEP: Mutex<PrivsepUse> = Mutex::new(PrivsepUse {
    users: 0,
    created: false,
});

/// One fleet lab's use of /run/sshd: created (root's, 0755) when missing,
/// removed when the last user of this process goes, if this process
/// created it.
struct PrivsepDir;

impl PrivsepDir {
    fn acquire() -> PrivsepDir {
        let mut state = PRIVSEP.lock().unwrap_or_else(|e| e.into_inner());
        if !Path::new(PRIVSEP_DIR).is_dir() {
            match std::fs::DirBuilder::new().mode(0o755).create(PRIVSEP_DIR) {
                Ok(()) => state.created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    drop(state);
                    panic!("creating {PRIVSEP_DIR} for sshd: {e}");
                }
            }
        }
        state.users += 1;
        PrivsepDir
    }
}

impl Drop for PrivsepDir {
    fn drop(&mut self) {
        let mut errs = CleanupErrors::new(PRIVSEP_DIR);
        {
            let mut state = PRIVSEP.lock().unwrap_or_else(|e| e.into_inner());
            state.users -= 1;
            if state.users == 0 && state.created {
                state.created = false;
                if let Err(e) = std::fs::remove_dir(PRIVSEP_DIR)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    errs.push(e.to_string());
                }
            }
        }
        errs.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(host(2), "mx2");
        assert_eq!(server_addr(3).to_string(), "10.78.3.1");
        assert_eq!(ops_addr(3).to_string(), "10.78.3.2");
    }

    #[test]
    #[should_panic(expected = "servers are numbered 1 ..= 9")]
    fn servers_count_from_one() {
        server_addr(0);
    }

    #[test]
    fn one_setenv_line() {
        let text = sshd_config(
            server_addr(1),
            Path::new("/t/k"),
            Path::new("/t/a"),
            Path::new("/t/bin"),
            Path::new("/t/mx1/control.sock"),
        );
        let setenv: Vec<&str> = text.lines().filter(|l| l.starts_with("SetEnv")).collect();
        assert_eq!(
            setenv,
            [format!(
                "SetEnv PATH=/t/bin:{STD_PATH} LIMITER_CONTROL=/t/mx1/control.sock SHLVL=1"
            )]
        );
        assert!(text.contains("ListenAddress 10.78.1.1:22\n"), "{text}");
        let client = ssh_config(2, Path::new("/t/id"), Path::new("/t/kh"));
        assert!(
            client.contains("Host mx2\n  HostName 10.78.2.1\n"),
            "{client}"
        );
    }
}
