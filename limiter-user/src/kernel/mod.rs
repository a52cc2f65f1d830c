//! The loaded kernel programs and their maps, as the daemon (and the tests)
//! use them.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, SockMap},
    programs::{SockOps, Xdp, links::FdLink},
};
use limiter_common::maps::{
    BindingKey, CONNECTOR_NAME_BYTES, ConnKey, ConnectorConfig, ConnectorState,
    DEFAULT_TABLE_ENTRIES, Endpoint, FlowKey, FlowValue, MAX_CONNECTORS, RangeKey, ReplyMark,
    ResetRequest, Settings, SourceCount, SourceKey, names, programs, stat,
};
use limiter_common::refusals::CachedRefusal;

mod bpfsys;
pub mod pins;

mod attach;
mod install;
mod modes;
mod tables;

use self::{
    attach::{Undo, program},
    pins::{PinDir, PinsError},
};

pub use self::modes::{AttachedMode, LinkLayer, XdpModeRequest};

/// The compiled kernel programs, built by this crate's build script.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter-ebpf"));

/// Errors of the kernel side; each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    // aya's errors are worded into the message, not chained: some of them
    // say their own cause again, which a printed chain would repeat.
    #[error("loading the eBPF object: {}", error_chain(.0))]
    Load(aya::EbpfError),
    #[error("program {name}: {}", error_chain(cause))]
    Program {
        name: &'static str,
        cause: aya::programs::ProgramError,
    },
    #[error("map {name}: {}", error_chain(cause))]
    Map {
        name: &'static str,
        cause: aya::maps::MapError,
    },
    #[error("a second handle on map {name}")]
    MapHandle {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {iface}: {reason}")]
    Interface { iface: String, reason: String },
    #[error("counting the CPUs")]
    Cpus(#[source] std::io::Error),
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |cause| KernelError::Map { name, cause }
}

pub(crate) fn prog_err(
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    move |cause| KernelError::Program { name, cause }
}

/// Table sizes, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct TableSizes {
    pub sources: u32,
    pub established: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            sources: DEFAULT_TABLE_ENTRIES,
            established: DEFAULT_TABLE_ENTRIES,
        }
    }
}

/// Statistics summed over CPUs: `rows[connector][counter]`, and the global
/// row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connectors: Vec<[u64; stat::COUNT as usize]>,
    pub global: [u64; stat::COUNT as usize],
}

/// The loaded programs and maps.
pub struct Kernel {
    ebpf: Ebpf,
    settings: Array<MapData, Settings>,
    bound_ports: Array<MapData, u64>,
    specific_ports: Array<MapData, u64>,
    bindings: HashMap<MapData, BindingKey, u32>,
    ranges: LpmTrie<MapData, RangeKey, u32>,
    connectors: Array<MapData, ConnectorConfig>,
    connector_state: Array<MapData, ConnectorState>,
    source_live: HashMap<MapData, SourceKey, SourceCount>,
    established: HashMap<MapData, ConnKey, FlowValue>,
    stats: PerCpuArray<MapData, u64>,
    /// The rejection events, until the daemon's reader takes them.
    events: Option<RingBuf<MapData>>,
    /// The reset requests, until the daemon's resetter takes them.
    resets: Option<RingBuf<MapData>>,
    pending_resets: HashMap<MapData, ConnKey, ResetRequest>,
    undeclared_forwards: HashMap<MapData, Endpoint, u32>,
    connector_names: Array<MapData, [u8; CONNECTOR_NAME_BYTES]>,
    refusals: PerCpuArray<MapData, CachedRefusal>,
    refusal_sets_used: PerCpuArray<MapData, u64>,
    reply_flows: HashMap<MapData, FlowKey, ReplyMark>,
    responders: SockMap<MapData>,
    reply_alive: Array<MapData, u64>,
    /// Whether SYNs refused with action `reply` go to a responder (else the
    /// kernel is told to drop them).
    replies: bool,
    /// The families a responder listens for (`RESPONDERS` indices).
    responder_families: Vec<u32>,
    sizes: TableSizes,
    pins: Option<PinDir>,
    /// Whether the maps were left by an earlier daemon (counts included).
    adopted: bool,
    /// Links that are not pinned, kept attached while the handle lives.
    owned_links: Vec<FdLink>,
    /// What this start did, to undo if it fails (see [`Kernel::roll_back`]).
    undo: Vec<Undo>,
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {{
        let map = $ebpf
            .take_map($name)
            .ok_or(KernelError::MissingMap($name))?;
        map.try_into().map_err(map_err($name))?
    }};
}

impl Kernel {
    /// Loads the programs into the kernel (nothing is attached yet). With
    /// `pins`, the maps live in bpffs: those an earlier daemon left there
    /// are reused, counts and all, and new ones are pinned there.
    ///
    /// A load that fails removes what it pinned, unless it adopted it.
    pub fn load(sizes: TableSizes, pins: Option<&PinDir>) -> Result<Kernel, KernelError> {
        Self::load_with_log(sizes, pins, 0)
    }

    /// Like [`Kernel::load`], with the kernel programs' diagnostics told
    /// from aya-log level `log_level` up (0: off, and the verifier drops
    /// their code); see [`Kernel::take_kernel_log`].
    pub fn load_with_log(
        sizes: TableSizes,
        pins: Option<&PinDir>,
        log_level: u8,
    ) -> Result<Kernel, KernelError> {
        let adopted = pins.is_some_and(PinDir::has_maps);
        let root_existed = pins.is_some_and(|p| p.root().exists());
        let loaded = Self::load_adopting(sizes, pins, adopted, !root_existed, log_level);
        if loaded.is_err()
            && !adopted
            && let Some(pins) = pins
        {
            let _ = pins.remove();
            if !root_existed {
                let _ = std::fs::remove_dir(pins.root());
            }
        }
        loaded
    }

    fn load_adopting(
        sizes: TableSizes,
        pins: Option<&PinDir>,
        adopted: bool,
        made_root: bool,
        log_level: u8,
    ) -> Result<Kernel, KernelError> {
        let mut sizes = sizes;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &log_level, true)
            .override_global(limiter_common::maps::KERNEL_LOG_LEVEL, &log_level, true);
        if let Some(pins) = pins {
            pins.create()?;
            if adopted {
                // The pinned tables keep the sizes they were made with.
                let size = |name| {
                    MapInfo::from_pin(pins.map(name))
                        .map(|info| info.max_entries())
                        .map_err(map_err(name))
                };
                sizes = TableSizes {
                    sources: size(names::SOURCE_LIVE)?,
                    established: size(names::ESTABLISHED)?,
                };
            }
            for name in names::ALL {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader
            .map_max_entries(names::SOURCE_LIVE, sizes.sources)
            .map_max_entries(names::ESTABLISHED, sizes.established)
            .load(EBPF_OBJECT)
            .map_err(KernelError::Load)?;
        for name in [programs::ADMIT, programs::ADMIT_L3, programs::CONTROL] {
            let xdp: &mut Xdp = program(&mut ebpf, name)?;
            xdp.load().map_err(prog_err(name))?;
        }
        {
            let track: &mut SockOps = program(&mut ebpf, programs::TRACK)?;
            track.load().map_err(prog_err(programs::TRACK))?;
        }
        // The typed handles check key and value sizes: a pinned map of
        // another shape is refused here.
        Ok(Kernel {
            settings: take!(ebpf, names::SETTINGS),
            bound_ports: take!(ebpf, names::BOUND_PORTS),
            specific_ports: take!(ebpf, names::SPECIFIC_PORTS),
            bindings: take!(ebpf, names::BINDINGS),
            ranges: take!(ebpf, names::RANGES),
            connectors: take!(ebpf, names::CONNECTORS),
            connector_state: take!(ebpf, names::CONNECTOR_STATE),
            source_live: take!(ebpf, names::SOURCE_LIVE),
            established: take!(ebpf, names::ESTABLISHED),
            stats: take!(ebpf, names::STATS),
            events: Some(take!(ebpf, names::EVENTS)),
            resets: Some(take!(ebpf, names::RESETS)),
            pending_resets: take!(ebpf, names::PENDING_RESETS),
            undeclared_forwards: take!(ebpf, names::UNDECLARED_FORWARDS),
            connector_names: take!(ebpf, names::CONNECTOR_NAMES),
            refusals: take!(ebpf, names::REFUSALS),
            refusal_sets_used: take!(ebpf, names::REFUSAL_SETS_USED),
            reply_flows: take!(ebpf, names::REPLY_FLOWS),
            responders: take!(ebpf, names::RESPONDERS),
            reply_alive: take!(ebpf, names::REPLY_ALIVE),
            replies: false,
            responder_families: Vec::new(),
            sizes,
            ebpf,
            pins: pins.cloned(),
            adopted,
            owned_links: Vec::new(),
            undo: match pins {
                Some(pins) if !adopted => vec![Undo::RemoveMaps {
                    pins: pins.clone(),
                    made_root,
                }],
                _ => Vec::new(),
            },
        })
    }

    /// Whether the maps (and their counts) were left by an earlier daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The name each connector id had when its maps were written, for a
    /// daemon that adopts them.
    pub fn connector_names(&self) -> Vec<(u32, String)> {
        (0..MAX_CONNECTORS)
            .filter_map(|id| {
                let bytes = self.connector_names.get(&id, 0).ok()?;
                let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                (len > 0).then(|| (id, String::from_utf8_lossy(&bytes[..len]).into_owned()))
            })
            .collect()
    }

    /// Records the name of each connector id (empty for the others).
    pub fn set_connector_names(&mut self, named: &[(u32, &str)]) -> Result<(), KernelError> {
        for id in 0..MAX_CONNECTORS {
            let mut bytes = [0u8; CONNECTOR_NAME_BYTES];
            if let Some((_, name)) = named.iter().find(|(i, _)| *i == id) {
                let name = name.as_bytes();
                let len = name.len().min(CONNECTOR_NAME_BYTES);
                bytes[..len].copy_from_slice(&name[..len]);
            }
            if self.connector_names.get(&id, 0).ok() != Some(bytes) {
                self.connector_names
                    .set(id, bytes, 0)
                    .map_err(map_err(names::CONNECTOR_NAMES))?;
            }
        }
        Ok(())
    }

    /// The rejection event ring, for one reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The reader of the kernel programs' diagnostics (aya-log), which
    /// writes them to this process's log; `Ok(None)` when they are off.
    pub fn take_kernel_log(
        &mut self,
        log_level: u8,
    ) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>, aya_log::Error> {
        if log_level == 0 {
            return Ok(None);
        }
        aya_log::EbpfLogger::init(&mut self.ebpf).map(Some)
    }

    /// The reset request ring, for one reader.
    pub fn take_resets(&mut self) -> Option<RingBuf<MapData>> {
        self.resets.take()
    }

    /// The table sizes it was loaded with.
    pub fn sizes(&self) -> TableSizes {
        self.sizes
    }

    /// Where the maps and links are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::dir)
    }
}

/// An error of aya's and its causes on one line, for a reason this layer
/// words itself (aya's own messages may say their cause, so a cause
/// already said is not said again; limiter's errors never repeat theirs).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
