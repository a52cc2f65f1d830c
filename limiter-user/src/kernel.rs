//! The loaded kernel programs and their maps, as the daemon (and the tests)
//! use them.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, RawTracePoint, RawTracePointRunOptions, SockOps, TestRun, Xdp, XdpMode,
    },
};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, ConnectorConfig, Control, DEFAULT_TABLE_ENTRIES, FlowKey,
    FlowValue, MAP_LAYOUT_VERSION, RangeKey, Settings, SourceCount, SourceKey, control, names,
    programs, stat,
};

use crate::{
    config::Config,
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
    sizes: TableSizes,
    pin_dir: Option<PathBuf>,
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
    /// `bpffs`, every map is also pinned under `bpffs/v<layout>/`, so that
    /// operators can look at them with bpftool; the pins go when the
    /// `Kernel` does.
    pub fn load(sizes: TableSizes, bpffs: Option<&Path>) -> Result<Kernel, KernelError> {
        let mut ebpf = EbpfLoader::new()
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
        let pin_dir = match bpffs {
            Some(bpffs) => Some(pin_maps(&ebpf, bpffs)?),
            None => None,
        };
        Ok(Kernel {
            settings: take!(ebpf, names::SETTINGS),
            bound_ports: take!(ebpf, names::BOUND_PORTS),
            bindings: take!(ebpf, names::BINDINGS),
            ranges: take!(ebpf, names::RANGES),
            connectors: take!(ebpf, names::CONNECTORS),
            connector_live: take!(ebpf, names::CONNECTOR_LIVE),
            source_live: take!(ebpf, names::SOURCE_LIVE),
            handshakes: take!(ebpf, names::HANDSHAKES),
            established: take!(ebpf, names::ESTABLISHED),
            stats: take!(ebpf, names::STATS),
            events: Some(take!(ebpf, names::EVENTS)),
            sizes,
            ebpf,
            pin_dir,
        })
    }

    /// The rejection event ring, for one reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The table sizes it was loaded with.
    pub fn sizes(&self) -> TableSizes {
        self.sizes
    }

    /// Where the maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Removes the pins made by [`Kernel::pin`].
    pub fn unpin(&mut self) {
        if let Some(dir) = self.pin_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            log::warn!("removing pins in {}: {e}", dir.display());
        }
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
        let mut words = vec![0u64; BOUND_PORT_WORDS as usize];
        for port in &table.ports {
            words[(*port >> 6) as usize] |= 1u64 << (port & 63);
        }
        for (index, word) in words.iter().enumerate() {
            let index = index as u32;
            let current = self
                .bound_ports
                .get(&index, 0)
                .map_err(map_err(names::BOUND_PORTS))?;
            if current != *word {
                self.bound_ports
                    .set(index, word, 0)
                    .map_err(map_err(names::BOUND_PORTS))?;
            }
        }

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

    /// Attaches the XDP program to `iface`.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeRequest,
    ) -> Result<AttachedMode, KernelError> {
        let xdp: &mut Xdp = program(&mut self.ebpf, programs::ADMIT)?;
        let attach = |xdp: &mut Xdp, mode: XdpMode| {
            xdp.attach(iface, mode).map_err(|e| KernelError::Interface {
                iface: iface.to_string(),
                reason: format!("attaching XDP ({mode:?} mode): {}", error_chain(&e)),
            })
        };
        match mode {
            XdpModeRequest::Driver => attach(xdp, XdpMode::Driver).map(|_| AttachedMode::Driver),
            XdpModeRequest::Skb => attach(xdp, XdpMode::Skb).map(|_| AttachedMode::Generic),
            XdpModeRequest::Auto => match attach(xdp, XdpMode::Driver) {
                Ok(_) => Ok(AttachedMode::Driver),
                Err(native) => {
                    log::warn!(
                        "{native}; falling back to generic XDP, which runs later in the stack and costs more per packet"
                    );
                    attach(xdp, XdpMode::Skb).map(|_| AttachedMode::Generic)
                }
            },
        }
    }

    /// Attaches the sock_ops program to the cgroup v2 directory `cgroup`.
    pub fn attach_sock_ops(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let file = File::open(cgroup).map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let track: &mut SockOps = program(&mut self.ebpf, programs::TRACK)?;
        // A bpf_link, which shares the cgroup with other programs anyway;
        // link_create refuses the multi-attach flag.
        track
            .attach(&file, CgroupAttachMode::Single)
            .map_err(prog_err(programs::TRACK))?;
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
        let request = Control {
            op,
            _pad: 0,
            flow: *flow,
            _pad2: 0,
        };
        let mut options = RawTracePointRunOptions::new();
        // SAFETY: `Control` is `#[repr(C)]` plain data of 48 bytes, a whole
        // number of u64 arguments (checked in limiter-common's tests).
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

impl Drop for Kernel {
    fn drop(&mut self) {
        self.unpin();
    }
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

/// Pins every map of `ebpf` under `bpffs/v<layout>/`.
fn pin_maps(ebpf: &Ebpf, bpffs: &Path) -> Result<PathBuf, KernelError> {
    let dir = bpffs.join(format!("v{MAP_LAYOUT_VERSION}"));
    let pin_error = |path: &Path, reason: String| KernelError::Pin {
        path: path.to_path_buf(),
        reason,
    };
    if dir.exists() {
        // Left by a daemon that died without cleaning up. Adopting its
        // counts is not supported yet: start over.
        log::warn!("removing stale pins in {}", dir.display());
        std::fs::remove_dir_all(&dir).map_err(|e| pin_error(&dir, e.to_string()))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir, e.to_string()))?;
    for (name, map) in ebpf.maps() {
        let path = dir.join(name);
        map.pin(&path)
            .map_err(|e| pin_error(&path, error_chain(&e)))?;
    }
    Ok(dir)
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
