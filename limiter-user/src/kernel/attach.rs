//! Attaching and detaching: XDP on each interface, sock_ops on the
//! cgroup, sk_lookup for the responder; an undo list until a start
//! commits.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, SkLookup, SockOps, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use limiter_common::maps::{names, programs, responder};

use super::{
    AttachedMode, Kernel, KernelError, LinkLayer, XdpModeRequest, error_chain, map_err,
    monotonic_ns, prog_err,
};
use super::{bpfsys, pins::PinDir};

/// Something a start did, and how to take it back if the start fails.
pub(super) enum Undo {
    /// A link this start made and pinned: removing the pin detaches it.
    RemovePin(PathBuf),
    /// An adopted link whose program this start replaced: the link gets
    /// `program` back.
    RestoreProgram { link: OwnedFd, program: OwnedFd },
    /// Maps this start created and pinned (nothing was adopted), and the
    /// `--bpffs` directory if it made that too.
    RemoveMaps { pins: PinDir, made_root: bool },
}

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::RemovePin(path) => write!(f, "removing {}", path.display()),
            Undo::RestoreProgram { .. } => write!(f, "restoring an adopted link's program"),
            Undo::RemoveMaps { pins, .. } => write!(f, "removing {}", pins.dir().display()),
        }
    }
}

/// Makes the link pinned at `path` run `program` instead of its own, and
/// returns how to give it its own back.
pub(super) fn swap_program(path: &Path, program: BorrowedFd<'_>) -> Result<Undo, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| error_chain(&e))?;
    let link = FdLink::from(pinned);
    let old_id = link.info().map_err(|e| error_chain(&e))?.program_id();
    let old = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == old_id)
        .ok_or_else(|| format!("the program (id {old_id}) of the link is gone"))?;
    let old = old.fd().map_err(|e| error_chain(&e))?;
    let link_fd = bpfsys::obj_get(path).map_err(|e| e.to_string())?;
    bpfsys::link_update(link_fd.as_fd(), program).map_err(|e| e.to_string())?;
    Ok(Undo::RestoreProgram {
        link: link_fd,
        program: old
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())?,
    })
}

/// The kernel's reason in an attach error, without what the caller says
/// already.
pub(super) fn reason_of(error: &KernelError) -> String {
    match error {
        KernelError::Interface { reason, .. } => reason
            .split_once(": ")
            .map_or(reason.as_str(), |(_, r)| r)
            .to_string(),
        other => other.to_string(),
    }
}

pub(super) fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, KernelError>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program(name)
        .ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(prog_err(name))
}

pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(prog_err(name))
}

impl Kernel {
    /// Detaches everything and removes the pins: what SIGTERM does without
    /// `--keep-attached`.
    pub fn detach(&mut self) -> Result<(), KernelError> {
        self.owned_links.clear();
        if let Some(pins) = self.pins.take() {
            pins.remove()?;
        }
        Ok(())
    }

    /// Attaches the XDP program for `link` frames to `iface`: in place of
    /// the program of a pinned link that an earlier daemon left there
    /// (atomically, so that no packet goes unchecked), or with a new link,
    /// pinned.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        link: LinkLayer,
        mode: XdpModeRequest,
    ) -> Result<AttachedMode, KernelError> {
        let interface_error = |reason: String| KernelError::Interface {
            iface: iface.to_string(),
            reason,
        };
        let pinned = self
            .pins
            .as_ref()
            .and_then(|p| p.xdp_links().into_iter().find(|(i, _, _)| i == iface));
        let name = link.program();
        if let Some((_, attached, path)) = pinned {
            let xdp: &Xdp = program_ref(&self.ebpf, name)?;
            let program = xdp.fd().map_err(prog_err(name))?;
            let undo = swap_program(&path, program.as_fd()).map_err(|e| {
                interface_error(format!("replacing the program of {}: {e}", path.display()))
            })?;
            self.undo.push(undo);
            return Ok(attached);
        }
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        let attach = |xdp: &mut Xdp, mode: XdpMode| {
            xdp.attach(iface, mode).map_err(|e| {
                interface_error(format!(
                    "attaching XDP ({mode:?} mode): {}",
                    error_chain(&e)
                ))
            })
        };
        let (id, attached) = match mode {
            XdpModeRequest::Driver => (attach(xdp, XdpMode::Driver)?, AttachedMode::Driver),
            XdpModeRequest::Skb => (attach(xdp, XdpMode::Skb)?, AttachedMode::Generic),
            XdpModeRequest::Auto => match attach(xdp, XdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Driver),
                Err(native) => match attach(xdp, XdpMode::Skb) {
                    Ok(id) => {
                        log::warn!(
                            "{native}; fell back to generic XDP, which runs later in the stack and costs more per packet"
                        );
                        (id, AttachedMode::Generic)
                    }
                    Err(generic) => {
                        return Err(interface_error(format!(
                            "the kernel refused XDP in driver mode ({}) and in generic mode ({})",
                            reason_of(&native),
                            reason_of(&generic)
                        )));
                    }
                },
            },
        };
        let taken = xdp.take_link(id).map_err(prog_err(name))?;
        match (FdLink::try_from(taken), &self.pins) {
            (Ok(taken), Some(pins)) => {
                let path = pins.xdp_link(iface, attached);
                taken.pin(&path).map_err(|e| KernelError::Pin {
                    path: path.clone(),
                    reason: error_chain(&e),
                })?;
                self.undo.push(Undo::RemovePin(path));
            }
            (Ok(taken), None) => self.owned_links.push(taken),
            (Err(e), _) => {
                return Err(interface_error(format!(
                    "the kernel attached XDP without a bpf_link, which cannot be pinned: {}",
                    error_chain(&e)
                )));
            }
        }
        Ok(attached)
    }

    /// Detaches what an earlier daemon left attached and this one was not
    /// asked for: the XDP links of interfaces not in `keep_ifaces`, the
    /// sock_ops links of other cgroups than `cgroup`. Only once a start has
    /// succeeded: a start that fails leaves adopted state as it found it.
    /// Returns what it detached, for the log.
    pub fn detach_others(
        &mut self,
        keep_ifaces: &[String],
        cgroup: &Path,
    ) -> Result<Vec<String>, KernelError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let keep_ino = std::fs::metadata(cgroup)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(|source| KernelError::Cgroup {
                path: cgroup.to_path_buf(),
                source,
            })?;
        let mut detached = Vec::new();
        let xdp = pins
            .xdp_links()
            .into_iter()
            .filter(|(iface, _, _)| !keep_ifaces.contains(iface))
            .map(|(iface, _, path)| (format!("XDP on {iface}"), path));
        let sock_ops = pins
            .sock_ops_links()
            .into_iter()
            .filter(|(ino, _)| *ino != keep_ino)
            .map(|(ino, path)| (format!("sock_ops on the cgroup with inode {ino}"), path));
        for (what, path) in xdp.chain(sock_ops).collect::<Vec<_>>() {
            std::fs::remove_file(&path).map_err(|e| KernelError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            detached.push(what);
        }
        Ok(detached)
    }

    /// Attaches the sock_ops program to the cgroup v2 directory `cgroup`,
    /// in place of an earlier daemon's program if its link is pinned.
    pub fn attach_sock_ops(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let cgroup_error = |source: std::io::Error| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        };
        let file = File::open(cgroup).map_err(cgroup_error)?;
        let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(cgroup_error)?);
        let adopted = self.pins.as_ref().and_then(|pins| {
            pins.sock_ops_links()
                .into_iter()
                .find(|(other, _)| *other == ino)
        });
        if let Some((_, path)) = adopted {
            let track: &SockOps = program_ref(&self.ebpf, programs::TRACK)?;
            let program = track.fd().map_err(prog_err(programs::TRACK))?;
            let undo = swap_program(&path, program.as_fd()).map_err(|reason| KernelError::Pin {
                path: path.clone(),
                reason,
            })?;
            self.undo.push(undo);
            return Ok(());
        }
        let track: &mut SockOps = program(&mut self.ebpf, programs::TRACK)?;
        // A bpf_link, which shares the cgroup with other programs anyway;
        // link_create refuses the multi-attach flag.
        let id = track
            .attach(&file, CgroupAttachMode::Single)
            .map_err(prog_err(programs::TRACK))?;
        let link = track.take_link(id).map_err(prog_err(programs::TRACK))?;
        let link = FdLink::try_from(link).map_err(|e| KernelError::Pin {
            path: cgroup.to_path_buf(),
            reason: error_chain(&e),
        })?;
        match &self.pins {
            Some(pins) => {
                let path = pins.sock_ops_link(ino);
                link.pin(&path).map_err(|e| KernelError::Pin {
                    path: path.clone(),
                    reason: error_chain(&e),
                })?;
                self.undo.push(Undo::RemovePin(path));
            }
            None => self.owned_links.push(link),
        }
        Ok(())
    }

    /// Undoes what this start attached and pinned, in reverse order: new
    /// links are detached, adopted links get their earlier program back,
    /// maps this start created are removed. What it adopted stays as it was
    /// found, enforcing. Errors are logged: the rollback goes on.
    pub fn roll_back(&mut self) {
        self.owned_links.clear();
        while let Some(undo) = self.undo.pop() {
            let result = match &undo {
                Undo::RemovePin(path) => std::fs::remove_file(path).map_err(|e| e.to_string()),
                Undo::RestoreProgram { link, program } => {
                    bpfsys::link_update(link.as_fd(), program.as_fd()).map_err(|e| e.to_string())
                }
                Undo::RemoveMaps { pins, made_root } => {
                    let removed = pins.remove().map_err(|e| error_chain(&e));
                    if *made_root {
                        let _ = std::fs::remove_dir(pins.root());
                    }
                    removed
                }
            };
            if let Err(e) = result {
                log::error!("rolling back the start: {undo:?}: {e}");
            }
        }
        self.pins = None;
    }

    /// The start succeeded: what it attached stays.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// The XDP program for Ethernet frames, for `BPF_PROG_TEST_RUN` and
    /// benchmarks (shareable between threads, to run it on several CPUs at
    /// once).
    pub fn admit_program(&self) -> Result<&Xdp, KernelError> {
        self.admit_program_for(LinkLayer::Ethernet)
    }

    /// The XDP program for frames that start with `link`.
    pub fn admit_program_for(&self, link: LinkLayer) -> Result<&Xdp, KernelError> {
        program_ref(&self.ebpf, link.program())
    }

    /// Hands SYNs refused with action `reply` to the responder listening on
    /// `ipv4` and `ipv6`: puts the sockets where the `steer` program finds
    /// them and attaches it to this network namespace. Connectors installed
    /// after this reply; before, they drop.
    pub fn start_replies(
        &mut self,
        ipv4: &impl std::os::fd::AsRawFd,
        ipv6: Option<&impl std::os::fd::AsRawFd>,
    ) -> Result<(), KernelError> {
        self.responders
            .set(responder::IPV4, ipv4, 0)
            .map_err(map_err(names::RESPONDERS))?;
        self.responder_families = vec![responder::IPV4];
        if let Some(ipv6) = ipv6 {
            self.responders
                .set(responder::IPV6, ipv6, 0)
                .map_err(map_err(names::RESPONDERS))?;
            self.responder_families.push(responder::IPV6);
        }
        // The calling thread's namespace (a thread may have entered another).
        let netns =
            File::open("/proc/thread-self/ns/net").map_err(|source| KernelError::Cgroup {
                path: PathBuf::from("/proc/thread-self/ns/net"),
                source,
            })?;
        // Loaded only now: a kernel without sk_lookup fails here, not at
        // start.
        let steer: &mut SkLookup = program(&mut self.ebpf, programs::STEER)?;
        steer.load().map_err(prog_err(programs::STEER))?;
        steer.attach(netns).map_err(prog_err(programs::STEER))?;
        self.replies = true;
        self.responders_alive()
    }

    /// Whether SYNs refused with action `reply` go to a responder.
    pub fn replies(&self) -> bool {
        self.replies
    }

    /// Tells the XDP program the responder still answers: without this
    /// for a few seconds (the daemon gone), it drops what it would hand it.
    pub fn responders_alive(&mut self) -> Result<(), KernelError> {
        let now = monotonic_ns();
        for family in &self.responder_families {
            self.reply_alive
                .set(*family, now, 0)
                .map_err(map_err(names::REPLY_ALIVE))?;
        }
        Ok(())
    }
}
