//! What `limiter run` checks before it makes anything: each failure is one
//! line naming the thing and what to do, and the host is left as it was.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

use crate::kernel::LinkLayer;

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_NONE: u16 = 0xfffe;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Checks that `iface` exists in this network namespace and that its frames
/// are ones the XDP program reads; returns what they start with.
pub fn interface(iface: &str) -> anyhow::Result<LinkLayer> {
    let name = CString::new(iface).with_context(|| format!("--iface {iface:?}"))?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        bail!("no interface {iface} (names are at most 15 bytes; see `ip link`)");
    }
    // SAFETY: a valid C string.
    if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
        bail!("no interface {iface} in this network namespace (see `ip link`)");
    }
    match hardware_type(&name).with_context(|| format!("interface {iface}"))? {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(LinkLayer::Ethernet),
        ARPHRD_NONE => Ok(LinkLayer::None),
        other => bail!(
            "interface {iface} has link type {other}, whose frames limiter does not read: give an Ethernet interface, or a tun or WireGuard one"
        ),
    }
}

/// The ARPHRD_* type of an interface, asked of the kernel in this network
/// namespace (sysfs may show another's).
fn hardware_type(name: &CString) -> io::Result<u16> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed ifreq is valid; the name fits (checked by the caller).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid socket and ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) };
    let error = io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(error);
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware address member.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

fn filesystem_magic(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string and a zeroed out-parameter.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type)
}

/// Checks that `path` is a directory of the cgroup v2 hierarchy.
pub fn cgroup(path: &Path) -> anyhow::Result<()> {
    match filesystem_magic(path) {
        Ok(CGROUP2_SUPER_MAGIC) if path.join("cgroup.procs").exists() => Ok(()),
        Ok(_) => bail!(
            "--cgroup {}: not a cgroup v2 directory (the mail server's cgroup, or the cgroup v2 mount: see `findmnt -t cgroup2`)",
            path.display()
        ),
        Err(e) => bail!("--cgroup {}: {e}", path.display()),
    }
}

/// Where the pins go: fine as they are, or on a bpffs this start mounts.
pub enum Bpffs {
    Ready,
    /// Nothing is mounted at /sys/fs/bpf yet: mount a bpffs there.
    Mount(PathBuf),
}

/// Checks that `--bpffs`'s parent is on a bpffs, or is /sys/fs/bpf where
/// one can be mounted.
pub fn bpffs(dir: &Path) -> anyhow::Result<Bpffs> {
    let parent = dir
        .parent()
        .with_context(|| format!("--bpffs {} has no parent directory", dir.display()))?;
    if filesystem_magic(parent).is_ok_and(|magic| magic == BPF_FS_MAGIC) {
        return Ok(Bpffs::Ready);
    }
    if parent == Path::new("/sys/fs/bpf") {
        return Ok(Bpffs::Mount(parent.to_path_buf()));
    }
    bail!(
        "--bpffs {}: {} is not a bpffs (mount one with `mount -t bpf bpf {}`)",
        dir.display(),
        parent.display(),
        parent.display()
    )
}

/// Mounts a bpffs at `at`.
pub fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(at)
        .status()
        .context("running mount")?;
    if !status.success() || filesystem_magic(at).ok() != Some(BPF_FS_MAGIC) {
        bail!("cannot mount a bpffs at {}", at.display());
    }
    log::info!("mounted a bpffs at {}", at.display());
    Ok(())
}

/// Unmounts what [`mount_bpffs`] mounted.
pub fn unmount_bpffs(at: &Path) {
    let c_path = CString::new(at.as_os_str().as_encoded_bytes()).ok();
    // SAFETY: a valid C string.
    if c_path.is_none_or(|p| unsafe { libc::umount(p.as_ptr()) } != 0) {
        log::error!(
            "unmounting the bpffs at {}: {}",
            at.display(),
            io::Error::last_os_error()
        );
    }
}

/// Checks that no daemon answers on the control socket `path` (a socket
/// file nobody answers is stale, and replaced).
pub fn control_socket(path: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another limiter daemon is running on {} (stop it first, or give --control another path)",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "--control {}: permission denied (run as root)",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// Binds the metrics address now, so that a busy port fails the start
/// before anything is attached.
pub fn metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--metrics {addr}"))?;
    Ok(listener)
}

/// The id of group `name`.
pub fn group_id(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("group name")?;
    // SAFETY: a valid C string; the result is read at once.
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("--control-group {name}: no such group");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*group).gr_gid })
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mounts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .context("no cgroup2 file system is mounted")
}
