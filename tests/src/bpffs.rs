//! [`BpfFs`]: a private bpffs mount, unmounted and removed on drop.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use crate::CleanupErrors;

/// A fresh bpffs instance mounted on a new directory
/// `$TMPDIR/limiter-test-bpffs-{pid}-{n}`: pins made there (e.g. the
/// daemon's `--bpffs`) are private to the test and vanish with it.
///
/// Drop unmounts it (lazily, MNT_DETACH, so open pinned objects do not
/// block it) and removes the directory.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
    mounted: bool,
}

impl BpfFs {
    /// Creates the directory and mounts bpffs on it; panics on failure
    /// (after removing the directory).
    pub fn new() -> BpfFs {
        crate::require_root();
        let mut fs = loop {
            let path = std::env::temp_dir().join(format!(
                "limiter-test-bpffs-{}-{}",
                std::process::id(),
                crate::next_id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    break BpfFs {
                        path,
                        mounted: false,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        };
        let target = cstr(&fs.path);
        // SAFETY: valid C strings; no data argument.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            panic!(
                "mount -t bpf bpf {}: {}",
                fs.path.display(),
                io::Error::last_os_error()
            );
        }
        fs.mounted = true;
        fs
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for BpfFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let mut errs = CleanupErrors::new(format!("bpffs {}", self.path.display()));
        if self.mounted {
            let target = cstr(&self.path);
            // SAFETY: valid C string.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                errs.push(format!("umount: {}", io::Error::last_os_error()));
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            errs.push(format!("rmdir: {e}"));
        }
        errs.finish();
    }
}

pub(crate) fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("path with a NUL byte")
}
