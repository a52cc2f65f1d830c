//! Network namespaces: a non-owning handle ([`Netns`]) and an owning guard
//! ([`OwnedNetns`]) that deletes the namespace on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::{CleanupErrors, procs, run_checked, try_run};

/// A handle on a named network namespace (`/run/netns/NAME`, as `ip netns`
/// makes them). It does not own the namespace; see [`OwnedNetns`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// A handle on the existing namespace `/run/netns/NAME`.
    pub fn named(name: &str) -> Netns {
        Netns {
            name: name.to_owned(),
            path: Path::new("/run/netns").join(name),
        }
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file (for `setns`), panicking with a clear message
    /// if it does not exist.
    pub fn open(&self) -> File {
        File::open(&self.path).unwrap_or_else(|e| {
            panic!("cannot open network namespace {}: {e}", self.path.display())
        })
    }

    /// (device, inode) of the namespace, as `/proc/PID/ns/net` shows it.
    pub fn id(&self) -> (u64, u64) {
        procs::dev_ino(&self.path)
            .unwrap_or_else(|| panic!("network namespace {} does not exist", self.path.display()))
    }

    /// Runs `f` on a scoped helper thread that has joined this namespace
    /// (`setns(CLONE_NEWNET)`) and returns its result; a panic in `f` is
    /// passed on. The calling thread's namespace is never changed. Sockets
    /// created in `f` stay in this namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.open();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(s, move || {
                    // SAFETY: setns on a valid fd; affects only this thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!(
                            "setns into network namespace {}: {}",
                            self.name,
                            std::io::Error::last_os_error()
                        );
                    }
                    drop(file);
                    f()
                })
                .expect("cannot spawn a netns helper thread");
            match handle.join() {
                Ok(v) => v,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }

    /// A [`Command`] that runs `program` in this namespace, through
    /// `nsenter --net=PATH` (unlike `ip netns exec`, it leaves /sys and the
    /// mount namespace alone, so cgroup paths stay visible). Add arguments
    /// and spawn it as usual; the pid of the spawned child is the program's
    /// (nsenter execs it).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        let mut net = std::ffi::OsString::from("--net=");
        net.push(&self.path);
        cmd.arg(net).arg("--").arg(program);
        cmd
    }

    /// Runs `ip ARGS...` in this namespace (`ip -n NAME`), panicking with its
    /// stderr on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) in
    /// this namespace with a single `ip -n NAME -batch -`.
    pub fn ip_batch(&self, lines: &[String]) {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run ip");
        let mut input = lines.join("\n");
        input.push('\n');
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .expect("write to ip -batch");
        let out = child.wait_with_output().expect("wait for ip -batch");
        if !out.status.success() {
            panic!(
                "ip -n {} -batch failed ({}): {}\ninput:\n{input}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    /// Writes a sysctl of this namespace (`key` like "net.ipv4.tcp_syn_retries")
    /// and checks it reads back.
    pub fn set_sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(|| {
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("sysctl {key}={value} in netns {}: {e}", self.name));
            let got = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                got.trim(),
                value,
                "sysctl {key} in netns {} did not stick",
                self.name
            );
        });
    }

    /// Reads a sysctl of this namespace.
    pub fn sysctl(&self, key: &str) -> String {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(|| {
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read sysctl {key} in netns {}: {e}", self.name))
                .trim()
                .to_owned()
        })
    }
}

/// Serializes `ip netns add` in this process: concurrent first uses of
/// /run/netns can race in iproute2 (both make it a mount point, and a netns
/// bind mount can end up hidden under the second one).
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// A network namespace this fixture created; on drop it kills every process
/// still in it (and waits for them) and deletes it (`ip netns del`), which
/// also removes the links in it (a veth goes away with its peer).
#[derive(Debug)]
pub struct OwnedNetns {
    ns: Netns,
}

impl OwnedNetns {
    /// Creates a namespace with a fresh unique name `lt{pid}x{n}n`.
    pub fn new() -> OwnedNetns {
        let name = format!("lt{}x{}n", std::process::id(), crate::next_id());
        OwnedNetns::create(&name)
    }

    /// Creates the namespace `name` (at most 15 characters; it must not exist
    /// yet) with `ip netns add`, and brings up its loopback.
    pub fn create(name: &str) -> OwnedNetns {
        crate::require_root();
        assert!(
            name.len() <= 15,
            "netns name {name:?} is longer than 15 characters"
        );
        {
            let _g = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = try_run(Command::new("ip").args(["netns", "add", name])) {
                panic!("cannot create network namespace {name}: {e}");
            }
        }
        // From here on the guard deletes it, also if a check below panics.
        let owned = OwnedNetns {
            ns: Netns::named(name),
        };
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        let cpath = std::ffi::CString::new(owned.ns.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string and out pointer.
        let r = unsafe { libc::statfs(cpath.as_ptr(), &mut sfs) };
        const NSFS_MAGIC: i64 = 0x6e736673;
        assert!(
            r == 0 && sfs.f_type as i64 == NSFS_MAGIC,
            "{} is not a network namespace mount after `ip netns add`",
            owned.ns.path.display()
        );
        owned.ns.ip(&["link", "set", "lo", "up"]);
        owned
    }
}

impl Default for OwnedNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for OwnedNetns {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        let mut errs = CleanupErrors::new(format!("network namespace {}", self.ns.name));
        if let Some(id) = procs::dev_ino(&self.ns.path) {
            let left = procs::kill_netns_procs(id, Duration::from_secs(5));
            if !left.is_empty() {
                errs.push(format!("processes still in it after SIGKILL: {left:?}"));
            }
        }
        if let Err(e) = try_run(Command::new("ip").args(["netns", "del", &self.ns.name])) {
            // Fall back to what `ip netns del` does.
            let c = std::ffi::CString::new(self.ns.path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if self.ns.path.exists() && std::fs::remove_file(&self.ns.path).is_err() {
                errs.push(e);
            }
        }
        errs.finish();
    }
}
