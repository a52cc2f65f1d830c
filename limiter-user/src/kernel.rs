//! The loaded kernel programs and their maps, as the daemon (and the tests)
//! use them.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, RawTracePoint, RawTracePointRunOptions, SockOps, TestRun, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, CONNECTOR_NAME_BYTES, ConnectorConfig, Control,
    DEFAULT_TABLE_ENTRIES, FlowKey, FlowValue, MAX_CONNECTORS, RangeKey, Settings, SourceCount,
    SourceKey, control, gate, names, programs, stat,
};

use crate::{
    bpfsys,
    config::Config,
    pins::{PinDir, PinsError},
    selection::{BindingKeyOrd, RangeEntry, SelectionTable},
};

/// The compiled kernel programs, built by this crate's build script.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter-ebpf"));

/// Errors of the kernel side; each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {iface}: {reason}")]
    Interface { iface: String, reason: String },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    move |source| KernelError::Program { name, source }
}

/// How the XDP program got attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Driver,
    Generic,
}

impl AttachedMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
        }
    }
}

/// Which XDP mode to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpModeRequest {
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
    Driver,
    Skb,
}

/// Table sizes, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct TableSizes {
    pub sources: u32,
    pub handshakes: u32,
    pub established: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            sources: DEFAULT_TABLE_ENTRIES,
            handshakes: DEFAULT_TABLE_ENTRIES,
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
    connector_live: Array<MapData, u32>,
    source_live: HashMap<MapData, SourceKey, SourceCount>,
    handshakes: HashMap<MapData, FlowKey, FlowValue>,
    established: HashMap<MapData, FlowKey, FlowValue>,
    stats: PerCpuArray<MapData, u64>,
    /// The rejection events, until the daemon's reader takes them.
    events: Option<RingBuf<MapData>>,
    connector_names: Array<MapData, [u8; CONNECTOR_NAME_BYTES]>,
    sizes: TableSizes,
    pins: Option<PinDir>,
    /// Whether the maps were left by an earlier daemon (counts included).
    adopted: bool,
    /// Links that are not pinned, kept attached while the handle lives.
    owned_links: Vec<FdLink>,
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
    pub fn load(sizes: TableSizes, pins: Option<&PinDir>) -> Result<Kernel, KernelError> {
        let adopted = pins.is_some_and(PinDir::has_maps);
        let mut sizes = sizes;
        let mut loader = EbpfLoader::new();
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
                    handshakes: size(names::HANDSHAKES)?,
                    established: size(names::ESTABLISHED)?,
                };
            }
            for name in names::ALL {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader
            .map_max_entries(names::SOURCE_LIVE, sizes.sources)
            .map_max_entries(names::HANDSHAKES, sizes.handshakes)
            .map_max_entries(names::ESTABLISHED, sizes.established)
            .load(EBPF_OBJECT)
            .map_err(KernelError::Load)?;
        {
            let xdp: &mut Xdp = program(&mut ebpf, programs::ADMIT)?;
            xdp.load().map_err(prog_err(programs::ADMIT))?;
        }
        {
            let track: &mut SockOps = program(&mut ebpf, programs::TRACK)?;
            track.load().map_err(prog_err(programs::TRACK))?;
        }
        {
            let control: &mut RawTracePoint = program(&mut ebpf, programs::CONTROL)?;
            control.load().map_err(prog_err(programs::CONTROL))?;
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
            connector_live: take!(ebpf, names::CONNECTOR_LIVE),
            source_live: take!(ebpf, names::SOURCE_LIVE),
            handshakes: take!(ebpf, names::HANDSHAKES),
            established: take!(ebpf, names::ESTABLISHED),
            stats: take!(ebpf, names::STATS),
            events: Some(take!(ebpf, names::EVENTS)),
            connector_names: take!(ebpf, names::CONNECTOR_NAMES),
            sizes,
            ebpf,
            pins: pins.cloned(),
            adopted,
            owned_links: Vec::new(),
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

    /// The table sizes it was loaded with.
    pub fn sizes(&self) -> TableSizes {
        self.sizes
    }

    /// Where the maps and links are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::dir)
    }

    /// Detaches everything and removes the pins: what SIGTERM does without
    /// `--keep-attached`.
    pub fn detach(&mut self) -> Result<(), KernelError> {
        self.owned_links.clear();
        if let Some(pins) = self.pins.take() {
            pins.remove()?;
        }
        Ok(())
    }

    /// Writes the global settings.
    pub fn set_settings(&mut self, config: &Config, netns_cookie: u64) -> Result<(), KernelError> {
        let settings = Settings {
            ipv6_prefix_len: config.ipv6_prefix_length as u32,
            _pad: 0,
            netns_cookie,
        };
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))
    }

    /// Makes the kernel's connector tables match `config`, whose connector
    /// `i` has id `ids[i]`. New entries go in before stale ones go out, so a
    /// SYN in between meets either the old rule or the new one.
    pub fn install(
        &mut self,
        config: &Config,
        ids: &[u32],
        table: &SelectionTable,
    ) -> Result<(), KernelError> {
        for (connector, id) in config.connectors.iter().zip(ids) {
            let value = ConnectorConfig {
                limits: connector.limits,
                action: connector.action.to_raw(),
            };
            self.connectors
                .set(*id, value, 0)
                .map_err(map_err(names::CONNECTORS))?;
        }

        let want_ranges: BTreeMap<(u32, RangeKeyOrd), u32> = table
            .ranges
            .iter()
            .map(|e: &RangeEntry| ((e.prefix_len, RangeKeyOrd(e.key)), e.connector))
            .collect();
        for ((prefix_len, key), connector) in &want_ranges {
            self.ranges
                .insert(&Key::new(*prefix_len, key.0), connector, 0)
                .map_err(map_err(names::RANGES))?;
        }
        for (binding, id) in &table.bindings {
            self.bindings
                .insert(binding.key(), id, 0)
                .map_err(map_err(names::BINDINGS))?;
        }
        write_bitmap(&mut self.bound_ports, names::BOUND_PORTS, &table.ports)?;
        write_bitmap(
            &mut self.specific_ports,
            names::SPECIFIC_PORTS,
            &table.specific_ports,
        )?;

        let stale_bindings: Vec<BindingKey> = self
            .bindings
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !table.bindings.contains_key(&BindingKeyOrd {
                    addr: k.addr,
                    port: k.port,
                })
            })
            .collect();
        for key in stale_bindings {
            self.bindings
                .remove(&key)
                .map_err(map_err(names::BINDINGS))?;
        }
        let stale_ranges: Vec<Key<RangeKey>> = self
            .ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want_ranges.contains_key(&(k.prefix_len(), RangeKeyOrd(k.data()))))
            .collect();
        for key in stale_ranges {
            self.ranges.remove(&key).map_err(map_err(names::RANGES))?;
        }
        Ok(())
    }

    /// Attaches the XDP program to `iface`: in place of the program of a
    /// pinned link that an earlier daemon left there (atomically, so that no
    /// packet goes unchecked), or with a new link, pinned.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
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
        let xdp: &mut Xdp = program(&mut self.ebpf, programs::ADMIT)?;
        if let Some((_, attached, path)) = pinned {
            let mut replace = || -> Result<(), String> {
                let pinned = PinnedLink::from_pin(&path).map_err(|e| error_chain(&e))?;
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| error_chain(&e))?;
                let id = xdp.attach_to_link(link).map_err(|e| error_chain(&e))?;
                // The pin holds the link; the handle may go.
                drop(xdp.take_link(id).map_err(|e| error_chain(&e))?);
                Ok(())
            };
            replace().map_err(|e| {
                interface_error(format!("replacing the program of {}: {e}", path.display()))
            })?;
            return Ok(attached);
        }
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
                Err(native) => {
                    log::warn!(
                        "{native}; falling back to generic XDP, which runs later in the stack and costs more per packet"
                    );
                    (attach(xdp, XdpMode::Skb)?, AttachedMode::Generic)
                }
            },
        };
        let link = xdp.take_link(id).map_err(prog_err(programs::ADMIT))?;
        match (FdLink::try_from(link), &self.pins) {
            (Ok(link), Some(pins)) => {
                let path = pins.xdp_link(iface, attached);
                link.pin(&path).map_err(|e| KernelError::Pin {
                    path,
                    reason: error_chain(&e),
                })?;
            }
            (Ok(link), None) => self.owned_links.push(link),
            (Err(e), _) => {
                return Err(interface_error(format!(
                    "the kernel attached XDP without a bpf_link, which cannot be pinned: {}",
                    error_chain(&e)
                )));
            }
        }
        Ok(attached)
    }

    /// Detaches the pinned XDP links of interfaces not in `keep` (a daemon
    /// restarted with fewer `--iface`s). Returns the interfaces.
    pub fn detach_other_interfaces(&mut self, keep: &[String]) -> Result<Vec<String>, KernelError> {
        let mut detached = Vec::new();
        for (iface, _, path) in self
            .pins
            .as_ref()
            .map(PinDir::xdp_links)
            .unwrap_or_default()
        {
            if !keep.contains(&iface) {
                std::fs::remove_file(&path).map_err(|e| KernelError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                detached.push(iface);
            }
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
        let track: &mut SockOps = program(&mut self.ebpf, programs::TRACK)?;
        if let Some(pins) = &self.pins {
            for (other, path) in pins.sock_ops_links() {
                if other == ino {
                    let link = bpfsys::obj_get(&path).map_err(cgroup_error)?;
                    let program = track.fd().map_err(prog_err(programs::TRACK))?;
                    bpfsys::link_update(link.as_fd(), program.as_fd()).map_err(cgroup_error)?;
                    return Ok(());
                }
                // A link on another cgroup: --cgroup changed.
                log::info!("detaching the sock_ops program from the cgroup with inode {other}");
                std::fs::remove_file(&path).map_err(cgroup_error)?;
            }
        }
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
                    path,
                    reason: error_chain(&e),
                })?;
            }
            None => self.owned_links.push(link),
        }
        Ok(())
    }

    /// The XDP program, for `BPF_PROG_TEST_RUN` and benchmarks (shareable
    /// between threads, to run it on several CPUs at once).
    pub fn admit_program(&self) -> Result<&Xdp, KernelError> {
        let program = self
            .ebpf
            .program(programs::ADMIT)
            .ok_or(KernelError::MissingProgram(programs::ADMIT))?;
        program.try_into().map_err(prog_err(programs::ADMIT))
    }

    /// Runs one control request in the kernel and returns its code
    /// (`limiter_common::maps::control::DONE`, ...).
    pub fn control(&mut self, op: u32, flow: &FlowKey) -> Result<u32, KernelError> {
        self.run_control(Control {
            op,
            _pad: 0,
            flow: *flow,
            _pad2: 0,
            source: SourceKey {
                connector: 0,
                addr: [0; 16],
            },
            _pad3: 0,
        })
    }

    /// Takes the rejections that a report gate holds (see
    /// `limiter_common::maps::ReportGate`): the gate of `source`, or with
    /// `gate::CONNECTOR` the gate of its connector. Returns how many.
    pub fn collect_unreported(
        &mut self,
        kind: u32,
        source: &SourceKey,
    ) -> Result<u32, KernelError> {
        let op = if kind == gate::CONNECTOR {
            control::COLLECT_CONNECTOR
        } else {
            control::COLLECT_SOURCE
        };
        self.run_control(Control {
            op,
            _pad: 0,
            flow: FlowKey {
                local: [0; 16],
                remote: [0; 16],
                local_port: 0,
                remote_port: 0,
            },
            _pad2: 0,
            source: *source,
            _pad3: 0,
        })
    }

    fn run_control(&mut self, request: Control) -> Result<u32, KernelError> {
        let mut options = RawTracePointRunOptions::new();
        // SAFETY: `Control` is `#[repr(C)]` plain data, a whole number of u64
        // arguments (checked in limiter-common's tests).
        let bytes: [u8; size_of::<Control>()] = unsafe { std::mem::transmute(request) };
        for (arg, chunk) in options.args.iter_mut().zip(bytes.chunks_exact(8)) {
            *arg = u64::from_ne_bytes(chunk.try_into().expect("chunks of 8"));
        }
        let program: &mut RawTracePoint = program(&mut self.ebpf, programs::CONTROL)?;
        let result = program
            .test_run(options)
            .map_err(prog_err(programs::CONTROL))?;
        Ok(result.return_value)
    }

    /// Live connections of the connector with id `id`.
    pub fn connector_live(&self, id: u32) -> Result<u32, KernelError> {
        self.connector_live
            .get(&id, 0)
            .map_err(map_err(names::CONNECTOR_LIVE))
    }

    /// Live connections on every connector id.
    pub fn live_total(&self) -> Result<u64, KernelError> {
        self.connector_live
            .iter()
            .map(|live| live.map(u64::from).map_err(map_err(names::CONNECTOR_LIVE)))
            .sum()
    }

    /// Every source entry (live or idle).
    pub fn sources(&self) -> Vec<(SourceKey, SourceCount)> {
        self.source_live.iter().filter_map(Result::ok).collect()
    }

    /// Entries in the source table.
    pub fn sources_len(&self) -> usize {
        self.source_live.keys().count()
    }

    /// Live connections of one source (0 when it has no entry).
    pub fn source_live(&self, key: &SourceKey) -> u32 {
        self.source_live.get(key, 0).map(|c| c.live).unwrap_or(0)
    }

    /// Forgets a source entry (only ever one with no live connection).
    pub fn forget_source(&mut self, key: &SourceKey) -> Result<(), KernelError> {
        self.source_live
            .remove(key)
            .map_err(map_err(names::SOURCE_LIVE))
    }

    /// Open handshakes.
    pub fn handshakes(&self) -> Vec<(FlowKey, FlowValue)> {
        self.handshakes.iter().filter_map(Result::ok).collect()
    }

    /// Counted established connections.
    pub fn established(&self) -> Vec<(FlowKey, FlowValue)> {
        self.established.iter().filter_map(Result::ok).collect()
    }

    /// Counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, KernelError> {
        let mut stats = Stats::default();
        let rows = limiter_common::maps::MAX_CONNECTORS as usize;
        stats.connectors = vec![[0; stat::COUNT as usize]; rows];
        for (index, values) in self.stats.iter().enumerate() {
            let values = values.map_err(map_err(names::STATS))?;
            let total: u64 = values.iter().sum();
            let row = index / stat::COUNT as usize;
            let counter = index % stat::COUNT as usize;
            if row < rows {
                stats.connectors[row][counter] = total;
            } else {
                stats.global[counter] = total;
            }
        }
        Ok(stats)
    }

    /// Expires `flow` if it is still an open handshake.
    pub fn expire_handshake(&mut self, flow: &FlowKey) -> Result<bool, KernelError> {
        Ok(self.control(control::EXPIRE_HANDSHAKE, flow)? == control::DONE)
    }

    /// Counts an established connection found in the socket table.
    pub fn seed(&mut self, flow: &FlowKey) -> Result<u32, KernelError> {
        self.control(control::SEED, flow)
    }

    /// Releases a seeded connection that is gone.
    pub fn release_seeded(&mut self, flow: &FlowKey) -> Result<bool, KernelError> {
        Ok(self.control(control::RELEASE_SEEDED, flow)? == control::DONE)
    }

    /// Releases any counted connection that is gone from the socket table.
    pub fn release_established(&mut self, flow: &FlowKey) -> Result<bool, KernelError> {
        Ok(self.control(control::RELEASE_ESTABLISHED, flow)? == control::DONE)
    }

    /// The ids of connectors that still hold counts.
    pub fn connector_ids_in_use(&self) -> HashSet<u32> {
        self.connector_live
            .iter()
            .enumerate()
            .filter_map(|(id, live)| match live {
                Ok(n) if n > 0 => Some(id as u32),
                _ => None,
            })
            .collect()
    }
}

/// Sets a port bitmap to exactly `ports`, writing only the words that change.
fn write_bitmap(
    map: &mut Array<MapData, u64>,
    name: &'static str,
    ports: &[u16],
) -> Result<(), KernelError> {
    let mut words = vec![0u64; BOUND_PORT_WORDS as usize];
    for port in ports {
        words[(*port >> 6) as usize] |= 1u64 << (port & 63);
    }
    for (index, word) in words.iter().enumerate() {
        let index = index as u32;
        if map.get(&index, 0).map_err(map_err(name))? != *word {
            map.set(index, word, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// [`RangeKey`] with an order, for diffing tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RangeKeyOrd(RangeKey);

impl PartialOrd for RangeKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RangeKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.binding, self.0.remote).cmp(&(other.0.binding, other.0.remote))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(prog_err(name))
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
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
