//! The loaded kernel programs and their maps, as the daemon (and the tests)
//! use them.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, SockMap, lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, SkLookup, SockOps, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, CONNECTOR_NAME_BYTES, ConnKey, ConnectorConfig, ConnectorState,
    Control, DEFAULT_TABLE_ENTRIES, Endpoint, FlowKey, FlowValue, MAX_CONNECTORS,
    RANGE_KEY_BINDING_BITS, RangeKey, ReplyMark, ResetRequest, Settings, SourceCount, SourceKey,
    control, gate, names, programs, responder, stat,
};
use limiter_common::{
    addr,
    refusals::{self, CachedRefusal, REFUSAL_SLOTS},
};

use crate::{
    bpfsys,
    config::{Action, Config},
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
    #[error("a second handle on map {name}: {source}")]
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
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {iface}: {reason}")]
    Interface { iface: String, reason: String },
    #[error("counting the CPUs: {0}")]
    Cpus(#[source] std::io::Error),
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

/// What a frame on an interface starts with, which decides the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// An Ethernet header (and maybe VLAN tags): `admit`.
    Ethernet,
    /// None: the IP header (`wg0`, `tun0`): `admit_l3`.
    None,
}

impl LinkLayer {
    fn program(self) -> &'static str {
        match self {
            LinkLayer::Ethernet => programs::ADMIT,
            LinkLayer::None => programs::ADMIT_L3,
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

    /// The reset requests waiting in the ring (those a daemon that is gone
    /// never saw), taken; their entries in `PENDING_RESETS` stay until the
    /// resets are done.
    pub fn ringed_resets(&mut self) -> Vec<ResetRequest> {
        let mut requests = Vec::new();
        if let Some(ring) = self.resets.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<ResetRequest>() {
                    // SAFETY: the kernel wrote a ResetRequest there; the
                    // length was checked.
                    requests.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<ResetRequest>())
                    });
                }
            }
        }
        requests
    }

    /// Every reset requested and not yet done.
    pub fn pending_resets(&self) -> Vec<ResetRequest> {
        self.pending_resets
            .iter()
            .filter_map(Result::ok)
            .map(|(_, request)| request)
            .collect()
    }

    /// A reset is done (or its socket is gone): forget the request.
    pub fn resolve_reset(&mut self, conn: &ConnKey) {
        let _ = self.pending_resets.remove(conn);
    }

    /// Server endpoints that SYNs to a bound port were seen to end up at,
    /// undeclared, with the connector id they were addressed to.
    pub fn undeclared_forwards(&self) -> Vec<(Endpoint, u32)> {
        self.undeclared_forwards
            .iter()
            .filter_map(Result::ok)
            .collect()
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
        self.change(|kernel| {
            let mut settings = kernel.current_settings()?;
            settings.ipv6_prefix_len = config.ipv6_prefix_length as u32;
            settings.netns_cookie = netns_cookie;
            kernel.write_settings(settings)
        })
    }

    /// The settings as the kernel holds them.
    pub fn current_settings(&self) -> Result<Settings, KernelError> {
        self.settings.get(&0, 0).map_err(map_err(names::SETTINGS))
    }

    fn write_settings(&mut self, settings: Settings) -> Result<(), KernelError> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))
    }

    /// Runs `write`, a change to the connector tables or the settings, under
    /// an odd configuration generation, and ends it under a new even one,
    /// whether `write` succeeded or not: the XDP program neither caches a
    /// refusal nor answers from its cache while a change is under way, nor
    /// afterwards with a refusal from before it (see
    /// `limiter_common::refusals`).
    fn change<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let mut settings = self.current_settings()?;
        settings.generation = settings.generation.wrapping_add(1) | 1;
        self.write_settings(settings)?;
        let written = write(self);
        let ended = self.end_change();
        let value = written?;
        ended?;
        Ok(value)
    }

    /// The end of [`Kernel::change`]: the refusal cache's IPv6 prefix from
    /// the ranges now in the kernel (those of an earlier daemon too, for one
    /// that adopted its maps), written while the generation is still odd;
    /// then the generation, alone, made even.
    fn end_change(&mut self) -> Result<(), KernelError> {
        let longest_ipv6_range = self
            .ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !addr::is_ipv4(&key.data().remote))
            .map(|key| key.prefix_len().saturating_sub(RANGE_KEY_BINDING_BITS))
            .max()
            .unwrap_or(0);
        let mut settings = self.current_settings()?;
        settings.refusal_prefix_len =
            refusals::key_prefix_len(settings.ipv6_prefix_len, longest_ipv6_range);
        self.write_settings(settings)?;
        settings.generation = (settings.generation | 1).wrapping_add(1);
        self.write_settings(settings)
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
        self.change(|kernel| kernel.install_tables(config, ids, table))
    }

    fn install_tables(
        &mut self,
        config: &Config,
        ids: &[u32],
        table: &SelectionTable,
    ) -> Result<(), KernelError> {
        for (connector, id) in config.connectors.iter().zip(ids) {
            let value = ConnectorConfig {
                limits: connector.limits,
                // Without a responder, a reply is a drop.
                action: match connector.action {
                    Action::Reply if !self.replies => Action::Drop.to_raw(),
                    action => action.to_raw(),
                },
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

    /// Sweeps every CPU's refusal cache once (see
    /// `limiter_common::refusals::GATE_CLAIMED`): refusals a cache holds
    /// that no report carries are claimed, and those claimed a sweep ago
    /// are reported, in at most `max_reports` reports (the rest wait for the
    /// next sweep, so that a sweep never fills the event ring alone).
    /// Returns how many refusals it reported.
    pub fn sweep_refusals(&mut self, max_reports: usize) -> Result<u64, KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| KernelError::Cpus(e))? as u32;
        let (mut reported, mut reports) = (0u64, 0usize);
        for cpu in 0..cpus {
            let mut first_slot = 0;
            while first_slot < REFUSAL_SLOTS && reports < max_reports {
                let mut request = source_request(
                    control::SWEEP_REFUSALS,
                    &SourceKey {
                        connector: 0,
                        addr: [0; 16],
                    },
                    0,
                );
                request.cpu = cpu;
                request.first_slot = first_slot;
                let answer = self.run_control_answer(request)?;
                if answer.result > 0 {
                    reported += u64::from(answer.result);
                    reports += 1;
                }
                // The kernel always moves on; a stuck answer must not hang.
                first_slot = answer.first_slot.max(first_slot + 1);
            }
        }
        Ok(reported)
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

    /// A handle of its own on the map of SYNs marked for a reply, for the
    /// responder.
    pub fn reply_flows_handle(&self) -> Result<HashMap<MapData, FlowKey, ReplyMark>, KernelError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self
            .reply_flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| KernelError::MapHandle {
                name: names::REPLY_FLOWS,
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(names::REPLY_FLOWS))?;
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(names::REPLY_FLOWS))
    }

    /// Forgets every reply mark: when no connector replies, none may steer
    /// (a mark planted before would send an admitted SYN to the responder).
    pub fn clear_reply_marks(&mut self) {
        let flows: Vec<FlowKey> = self.reply_flows.keys().filter_map(Result::ok).collect();
        for flow in flows {
            let _ = self.reply_flows.remove(&flow);
        }
    }

    /// Every CPU's cached refusals: (CPU, slot, entry), the empty slots left
    /// out.
    pub fn cached_refusals(&self) -> Vec<(usize, u32, CachedRefusal)> {
        let mut out = Vec::new();
        for slot in 0..REFUSAL_SLOTS {
            let Ok(values) = self.refusals.get(&slot, 0) else {
                continue;
            };
            for (cpu, entry) in values.iter().enumerate() {
                if entry.connector != 0 {
                    out.push((cpu, slot, *entry));
                }
            }
        }
        out
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

    /// Runs one control request for `flow` in the kernel and returns its
    /// code (`limiter_common::maps::control::DONE`, ...).
    pub fn control(&mut self, op: u32, flow: &FlowKey) -> Result<u32, KernelError> {
        self.run_control(Control {
            op,
            result: 0,
            flow: *flow,
            source: SourceKey {
                connector: 0,
                addr: [0; 16],
            },
            idle_ns: 0,
            cpu: 0,
            first_slot: 0,
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
        self.run_control(source_request(op, source, 0))
    }

    /// Deletes `source`'s entry if it holds nothing and has held nothing
    /// for `idle`, checked in the kernel at the moment of the deletion.
    pub fn forget_source(
        &mut self,
        source: &SourceKey,
        idle: std::time::Duration,
    ) -> Result<bool, KernelError> {
        let request = source_request(control::FORGET_SOURCE, source, idle.as_nanos() as u64);
        Ok(self.run_control(request)? == control::DONE)
    }

    fn run_control(&mut self, request: Control) -> Result<u32, KernelError> {
        Ok(self.run_control_answer(request)?.result)
    }

    fn run_control_answer(&mut self, request: Control) -> Result<Control, KernelError> {
        // SAFETY: `Control` is `#[repr(C)]` plain data with no implicit
        // padding (checked in limiter-common's tests).
        let bytes: [u8; size_of::<Control>()] = unsafe { std::mem::transmute(request) };
        let mut out = [0u8; size_of::<Control>()];
        let program: &Xdp = program_ref(&self.ebpf, programs::CONTROL)?;
        program
            .test_run(TestRunOptions {
                data_in: Some(&bytes),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(prog_err(programs::CONTROL))?;
        // SAFETY: the program's frame is a `Control`, written back whole.
        Ok(unsafe { std::mem::transmute::<[u8; size_of::<Control>()], Control>(out) })
    }

    /// Live connections of the connector with id `id`.
    pub fn connector_live(&self, id: u32) -> Result<u32, KernelError> {
        self.connector_state
            .get(&id, 0)
            .map(|state| state.live)
            .map_err(map_err(names::CONNECTOR_STATE))
    }

    /// Live connections on every connector id.
    pub fn live_total(&self) -> Result<u64, KernelError> {
        self.connector_state
            .iter()
            .map(|state| {
                state
                    .map(|s| u64::from(s.live))
                    .map_err(map_err(names::CONNECTOR_STATE))
            })
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

    /// Counted connections, in every network namespace.
    pub fn established(&self) -> Vec<(ConnKey, FlowValue)> {
        self.established.iter().filter_map(Result::ok).collect()
    }

    /// Counted connections of the network namespace with cookie `netns`.
    pub fn established_in(&self, netns: u64) -> Vec<(FlowKey, FlowValue)> {
        self.established()
            .into_iter()
            .filter(|(conn, _)| conn.netns == netns)
            .map(|(conn, value)| (conn.flow, value))
            .collect()
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
        self.connector_state
            .iter()
            .enumerate()
            .filter_map(|(id, state)| match state {
                Ok(s) if s.live > 0 => Some(id as u32),
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

/// A `Control` request about `source`.
fn source_request(op: u32, source: &SourceKey, idle_ns: u64) -> Control {
    Control {
        op,
        result: 0,
        flow: FlowKey {
            local: [0; 16],
            remote: [0; 16],
            local_port: 0,
            remote_port: 0,
        },
        source: *source,
        idle_ns,
        cpu: 0,
        first_slot: 0,
    }
}

/// Something a start did, and how to take it back if the start fails.
enum Undo {
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
fn swap_program(path: &Path, program: BorrowedFd<'_>) -> Result<Undo, String> {
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
fn reason_of(error: &KernelError) -> String {
    match error {
        KernelError::Interface { reason, .. } => reason
            .split_once(": ")
            .map_or(reason.as_str(), |(_, r)| r)
            .to_string(),
        other => other.to_string(),
    }
}

fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, KernelError>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program(name)
        .ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(prog_err(name))
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
