//! Network namespaces, found by the cookie a BPF program reports: the
//! daemon resets a connection in the namespace its server's socket lives
//! in, which is not the daemon's when the mail server runs in a container
//! behind DNAT.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-parameter of the given size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let error = io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(error);
    }
    Ok(cookie)
}

/// The network namespaces of the running processes, one path each.
fn namespace_paths() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"))
        .filter(|path| std::fs::metadata(path).is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

/// The cookie of the namespace `file` refers to (entered on a thread of its
/// own: entering a namespace changes only the calling thread).
fn cookie_of(file: &File) -> io::Result<u64> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a namespace file descriptor; only this thread moves.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                current_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// The namespaces met so far, by cookie, held open (so that a cookie keeps
/// naming the same namespace for as long as it is known).
#[derive(Default)]
pub struct Namespaces {
    known: HashMap<u64, File>,
}

impl Namespaces {
    /// Runs `f` in the namespace whose cookie is `cookie`, on a thread of its
    /// own. `Ok(None)`: no running process is in that namespace.
    pub fn run_in<T: Send>(
        &mut self,
        cookie: u64,
        f: impl FnOnce() -> T + Send,
    ) -> io::Result<Option<T>> {
        if !self.known.contains_key(&cookie) {
            self.rescan();
        }
        let Some(file) = self.known.get(&cookie) else {
            return Ok(None);
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a namespace file descriptor; only this thread
                    // moves.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(Some(f()))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// Learns the namespaces of the running processes; forgets those gone.
    fn rescan(&mut self) {
        self.known.clear();
        for path in namespace_paths() {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if let Ok(cookie) = cookie_of(&file) {
                self.known.entry(cookie).or_insert(file);
            }
        }
    }
}
