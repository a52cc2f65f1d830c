//! The Debian package and a Debian 12 root to install it into.
//!
//! [`deb`] is the package `cargo xtask dist` made (`$LIMITER_DEB`, which
//! `cargo xtask test` sets, or built here the same way). [`bookworm_root`]
//! is a minimal Debian 12 made with debootstrap from Debian's archive, kept
//! in a cache directory outside the clone so that a machine fetches it once.
//! [`Chroot`] runs commands in a throwaway copy of it: an overlay on a tmpfs
//! in a private mount namespace, so whatever the commands change, and the
//! mounts themselves, vanish with the namespace, also when a test fails.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

/// Where the Debian 12 root is cached.
pub const CACHE: &str = "/var/cache/limiter-tests";
/// Debian's archive.
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the checks need besides a minimal system: `man -l` and
/// `systemd-analyze verify`.
const INCLUDE: &str = "man-db,systemd";

/// The .deb under test, made once per test process.
pub fn deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(make_deb).clone()
}

fn make_deb() -> PathBuf {
    if let Some(path) = std::env::var_os("LIMITER_DEB") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace");
    // The profile the tests were built with: no build from scratch.
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace)
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "dist",
            "--profile",
            "dev",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo xtask dist");
    assert!(
        out.status.success(),
        "cargo xtask dist failed ({})",
        out.status
    );
    workspace.join(format!(
        "target/dist/dev/limiter_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ))
}

/// A minimal Debian 12 (bookworm) root with man-db and systemd, made once
/// per machine with debootstrap (about a minute) and reused.
pub fn bookworm_root() -> PathBuf {
    crate::require_root();
    let cache = Path::new(CACHE);
    let root = cache.join("bookworm");
    std::fs::create_dir_all(cache).unwrap_or_else(|e| panic!("creating {CACHE}: {e}"));
    // One maker at a time, across test processes.
    let lock = File::create(cache.join(".lock")).expect("creating the cache lock");
    // SAFETY: flock on an open file descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!("locking {CACHE}: {}", std::io::Error::last_os_error());
    }
    if root.join("usr/bin/systemd-analyze").exists() {
        return root;
    }
    // Made aside and renamed when complete: a half-made root is never used.
    let partial = cache.join("bookworm.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", "--include", INCLUDE, "bookworm"])
        .arg(&partial)
        .arg(MIRROR)
        .output()
        .expect("running debootstrap (cargo xtask setup installs it)");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        panic!(
            "debootstrap bookworm failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Nothing in it runs as a service; apt's lists are not needed.
    std::fs::rename(&partial, &root).expect("moving the new root in place");
    root
}

/// A throwaway copy of a root (see the module's description).
pub struct Chroot {
    /// Empty on the host: the tmpfs with the overlay is mounted on it only
    /// in the commands' mount namespace.
    dir: PathBuf,
    lower: PathBuf,
}

impl Chroot {
    pub fn new(lower: &Path) -> Chroot {
        let dir = std::env::temp_dir().join(format!(
            "limiter-test-chroot-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the chroot directory");
        Chroot {
            dir,
            lower: lower.to_path_buf(),
        }
    }

    /// Runs `script` (sh, `set -e`) in a private mount namespace where
    /// `$ROOT` is a writable copy of the root with /proc mounted, and
    /// `"$@"` are `args`. The copy lives as long as the script.
    pub fn run<S: AsRef<OsStr>>(&self, script: &str, args: &[S]) -> Output {
        let setup = "W=$0; LOWER=$1; shift; \
             mount -t tmpfs tmpfs \"$W\"; \
             mkdir \"$W/upper\" \"$W/work\" \"$W/root\"; \
             mount -t overlay overlay -o \"lowerdir=$LOWER,upperdir=$W/upper,workdir=$W/work\" \"$W/root\"; \
             mount -t proc proc \"$W/root/proc\"; \
             ROOT=$W/root; ";
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
            .arg(format!("{setup}{script}"))
            .arg(&self.dir)
            .arg(&self.lower)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running unshare")
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
