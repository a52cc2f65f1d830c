//! [`Cgroup`]: a fresh cgroup v2 directory, removed on drop.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{CleanupErrors, procs};

/// A cgroup v2 directory `limiter-test-{pid}-{n}` directly under the cgroup2
/// mount (found in /proc/self/mounts). Put processes in it with
/// [`crate::spawn_in`] (or [`Cgroup::add`]); attach cgroup BPF programs to
/// [`Cgroup::path`].
///
/// Drop moves this test process out (to the parent) should it be inside,
/// SIGKILLs every other process in it or in sub-cgroups, and removes the
/// directories (retrying while the kernel still reports EBUSY).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    /// Creates the directory; panics if there is no cgroup2 mount or mkdir
    /// fails.
    pub fn new() -> Cgroup {
        crate::require_root();
        let root = cgroup2_mount().expect("no cgroup2 mount in /proc/self/mounts");
        loop {
            let path = root.join(format!(
                "limiter-test-{}-{}",
                std::process::id(),
                crate::next_id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Cgroup { path, root },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create cgroup {}: {e}", path.display()),
            }
        }
    }

    /// The cgroup's directory (e.g. /sys/fs/cgroup/unified/limiter-test-123-4).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's path relative to the cgroup2 root, as /proc/PID/cgroup
    /// shows it in its `0::` line (e.g. "/limiter-test-123-4").
    pub fn rel_path(&self) -> String {
        format!("/{}", self.path.strip_prefix(&self.root).unwrap().display())
    }

    /// The cgroup id (the directory's inode number), as BPF helpers such as
    /// bpf_get_current_cgroup_id report it.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .map(|m| m.ino())
            .expect("stat cgroup")
    }

    /// The pids in `cgroup.procs`.
    pub fn procs(&self) -> Vec<u32> {
        read_procs(&self.path)
    }

    /// How many sock_ops programs are attached to this cgroup itself
    /// (`BPF_PROG_QUERY`, as `bpftool cgroup show` asks).
    pub fn sock_ops_programs(&self) -> u32 {
        const BPF_PROG_QUERY: libc::c_long = 16;
        const BPF_CGROUP_SOCK_OPS: u32 = 3;
        /// `union bpf_attr` for BPF_PROG_QUERY, padded to the union's size.
        #[repr(C)]
        struct QueryAttr {
            target_fd: u32,
            attach_type: u32,
            query_flags: u32,
            attach_flags: u32,
            prog_ids: u64,
            prog_cnt: u32,
            _pad: [u8; 100],
        }
        let dir = std::fs::File::open(&self.path).expect("opening the cgroup");
        let mut attr = QueryAttr {
            target_fd: std::os::fd::AsRawFd::as_raw_fd(&dir) as u32,
            attach_type: BPF_CGROUP_SOCK_OPS,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: 0,
            prog_cnt: 0,
            _pad: [0; 100],
        };
        // SAFETY: a zero-padded bpf_attr of the size passed; no buffer for
        // the ids, so the kernel writes only the count.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                size_of::<QueryAttr>() as libc::c_uint,
            )
        };
        assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", io::Error::last_os_error());
        attr.prog_cnt
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move pid {pid} into {}: {e}", self.path.display()));
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let mut errs = CleanupErrors::new(format!("cgroup {}", self.path.display()));
        if let Err(e) = remove_tree(&self.path) {
            errs.push(e);
        }
        errs.finish();
    }
}

fn read_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Empties and removes a cgroup directory and its sub-cgroups, depth first.
fn remove_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    let parent_procs = dir.parent().unwrap().join("cgroup.procs");
    let me = std::process::id();
    let this = dir.to_owned();
    let emptied = crate::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        let pids = read_procs(&this);
        for &p in &pids {
            if p == me {
                // Never kill the test itself: move it out.
                let _ = std::fs::write(&parent_procs, p.to_string());
            } else {
                let _ = procs::signal_if(p, libc::SIGKILL, |p| read_procs(&this).contains(&p));
            }
        }
        pids.is_empty()
    });
    if !emptied {
        return Err(format!(
            "processes still inside after SIGKILL: {:?}",
            read_procs(dir)
        ));
    }
    // rmdir fails with EBUSY for a moment after the last task has left.
    let mut last = None;
    let removed = crate::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        match std::fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        }
    });
    if removed {
        Ok(())
    } else {
        Err(format!(
            "rmdir {}: {}",
            dir.display(),
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    find_mount(&mounts, "cgroup2")
}

/// The first mount point of file system type `fstype` in a
/// /proc/self/mounts text (octal escapes such as `\040` decoded).
pub fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mount_points(mounts, fstype).into_iter().next()
}

/// All mount points of file system type `fstype` in a /proc/self/mounts
/// text (octal escapes such as `\040` decoded).
pub fn mount_points(mounts: &str, fstype: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, mp, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then(|| PathBuf::from(unescape_mount(mp)))
        })
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            find_mount(m, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(m, "bpf"), None);
        let m = "bpf /tmp/a\\040b bpf rw 0 0\nbpf /x bpf rw 0 0\n";
        assert_eq!(
            mount_points(m, "bpf"),
            vec![PathBuf::from("/tmp/a b"), PathBuf::from("/x")]
        );
    }
}
