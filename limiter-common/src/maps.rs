//! The maps shared by the kernel programs and the daemon: names, sizes, and
//! the layout of every key and value.
//!
//! Keys and values are `#[repr(C)]` with explicit padding, so that the bytes
//! the kernel hashes are the bytes both sides write. Addresses are in
//! [`crate::addr`] form; ports are in host byte order.

use crate::{
    addr::{Addr, Words},
    admission::Limits,
    rate::RateWindow,
};

/// Bumped whenever a key or value below changes shape; part of the pin path.
pub const MAP_LAYOUT_VERSION: u32 = 7;

/// Map names, as they appear in the object file and under `--bpffs`.
pub mod names {
    /// `Array<Settings>`, one entry.
    pub const SETTINGS: &str = "SETTINGS";
    /// `Array<u64>`: a bitmap of the local ports that some connector binds.
    pub const BOUND_PORTS: &str = "BOUND_PORTS";
    /// `Array<u64>`: a bitmap of the local ports bound on a specific local
    /// address (not only the wildcard), so that the others skip a lookup.
    pub const SPECIFIC_PORTS: &str = "SPECIFIC_PORTS";
    /// `HashMap<BindingKey, u32>`: local address and port to binding id.
    pub const BINDINGS: &str = "BINDINGS";
    /// `LpmTrie<RangeKey, u32>`: binding id and remote prefix to connector id.
    pub const RANGES: &str = "RANGES";
    /// `Array<ConnectorConfig>`, indexed by connector id.
    pub const CONNECTORS: &str = "CONNECTORS";
    /// `Array<ConnectorState>` (a BTF map: it holds a spin lock), indexed by
    /// connector id: the connector's live connections.
    pub const CONNECTOR_STATE: &str = "CONNECTOR_STATE";
    /// `HashMap<SourceKey, SourceCount>`: live connections per source.
    pub const SOURCE_LIVE: &str = "SOURCE_LIVE";
    /// `HashMap<ConnKey, FlowValue>`: the connections being counted.
    pub const ESTABLISHED: &str = "ESTABLISHED";
    /// `PerCpuArray<u64>`: counters, see [`super::stat`].
    pub const STATS: &str = "STATS";
    /// `RingBuf` of [`super::RejectionEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// `RingBuf` of [`super::ResetRequest`]: connections the daemon must
    /// reset (judged over a cap when their handshake completed).
    pub const RESETS: &str = "RESETS";
    /// `LruHashMap<ConnKey, ResetRequest>`: every reset requested and not
    /// yet done: the daemon retries what failed, collects what found
    /// `RESETS` full, and never counts these as connections that predate it.
    pub const PENDING_RESETS: &str = "PENDING_RESETS";
    /// `Array<ReportGate>`, indexed by connector id: reports of rejections
    /// of sources without an entry (see [`super::ReportGate`]).
    pub const REPORT_GATES: &str = "REPORT_GATES";
    /// `PerCpuArray<SynSeen>`: the last SYNs the XDP program passed, by a
    /// hash of their remote end, to notice a handshake the kernel moved to
    /// another port or network namespace that no connector's
    /// `forwarded_to` names (see [`super::SynSeen`]).
    pub const SYNS_SEEN: &str = "SYNS_SEEN";
    /// `LruHashMap<Endpoint, u32>`: server endpoints that SYNs to a bound
    /// port were seen to end up at, undeclared, to the connector id they
    /// were addressed to: for the daemon to warn about.
    pub const UNDECLARED_FORWARDS: &str = "UNDECLARED_FORWARDS";
    /// `Array<[u8; CONNECTOR_NAME_BYTES]>`: each connector id's name, for a
    /// daemon that adopts the maps of the one before it. The kernel programs
    /// never read it.
    pub const CONNECTOR_NAMES: &str = "CONNECTOR_NAMES";
    /// `PerCpuArray<CachedRefusal>`: each CPU's refusal cache (see
    /// `crate::refusals`). Not pinned: each daemon starts with empty
    /// caches, under configuration generations it wrote itself.
    pub const REFUSALS: &str = "REFUSALS";
    /// `PerCpuArray<u64>`: a bit for each set of `REFUSALS` where a
    /// refusal this CPU wrote may still stand: set when one is written,
    /// cleared by a lookup that finds none standing (see
    /// `crate::refusals::set_used_bit`). Not pinned, like `REFUSALS`.
    pub const REFUSAL_SETS_USED: &str = "REFUSAL_SETS_USED";
    /// `Array<u32>`: release stamps, the connectors' then the sources'
    /// (see `crate::refusals`).
    pub const RELEASE_STAMPS: &str = "RELEASE_STAMPS";
    /// `PerCpuArray<RejectionEvent>`, one entry: where the XDP program puts
    /// a report together before it copies it onto `EVENTS`. Not pinned.
    pub const REPORT_SCRATCH: &str = "REPORT_SCRATCH";
    /// `PerCpuArray`, one entry: where the XDP program keeps a refused
    /// SYN's header layout while it judges it. Not pinned.
    pub const REPLY_SCRATCH: &str = "REPLY_SCRATCH";
    /// `LruHashMap<FlowKey, ReplyMark>`: SYNs refused with action `reply`.
    /// Not pinned: its marks are for this daemon's responder.
    pub const REPLY_FLOWS: &str = "REPLY_FLOWS";
    /// `SockMap`: the responder's listening sockets (see
    /// [`super::responder`]). Not pinned: they are the daemon's.
    pub const RESPONDERS: &str = "RESPONDERS";
    /// `Array<u64>`, one entry: `bpf_ktime_get_ns()` of the newest reply
    /// mark, so that `steer` skips its lookup while no mark can be live.
    /// Not pinned.
    pub const LAST_REPLY_MARK: &str = "LAST_REPLY_MARK";
    /// `PerCpuArray<DiagGate>`, a slot per [`super::diag`] condition. Not
    /// pinned.
    pub const DIAG_GATES: &str = "DIAG_GATES";
    /// `PerCpuArray<ReplyBudget>`, a slot per refusal cache set and one for
    /// the CPU's replies in all. Not pinned.
    pub const REPLY_BUDGETS: &str = "REPLY_BUDGETS";
    /// `Array<u64>`, an entry per [`super::responder`] family: when the
    /// daemon's responder last said it answers (`CLOCK_MONOTONIC` ns). Not
    /// pinned.
    pub const REPLY_ALIVE: &str = "REPLY_ALIVE";
    /// Every map that is pinned, in the order they are pinned.
    pub const ALL: [&str; 18] = [
        SETTINGS,
        BOUND_PORTS,
        SPECIFIC_PORTS,
        BINDINGS,
        RANGES,
        CONNECTORS,
        CONNECTOR_STATE,
        SOURCE_LIVE,
        ESTABLISHED,
        STATS,
        EVENTS,
        RESETS,
        PENDING_RESETS,
        REPORT_GATES,
        SYNS_SEEN,
        UNDECLARED_FORWARDS,
        CONNECTOR_NAMES,
        RELEASE_STAMPS,
    ];
}

/// Program names, as they appear in the object file.
pub mod programs {
    /// XDP on an Ethernet interface: refuses SYNs over a cap.
    pub const ADMIT: &str = "admit";
    /// XDP on an interface without a link-layer header (`wg0`, `tun0`).
    pub const ADMIT_L3: &str = "admit_l3";
    /// sock_ops: judges a connection when its handshake completes, and
    /// follows it until the server's socket closes.
    pub const TRACK: &str = "track";
    /// XDP, never attached: run by the daemon through `BPF_PROG_TEST_RUN`
    /// with a [`super::Control`] request as its frame, to change counts
    /// atomically.
    pub const CONTROL: &str = "control";
    /// sk_lookup, in the daemon's network namespace: hands a SYN refused
    /// with action `reply` to the daemon's responder.
    pub const STEER: &str = "steer";
}

/// Connector ids are indices below this.
pub const MAX_CONNECTORS: u32 = 256;
/// Bytes of a connector name in `CONNECTOR_NAMES` (64 characters of UTF-8
/// at most), NUL-padded.
pub const CONNECTOR_NAME_BYTES: usize = 256;
/// Binding ids are below this.
pub const MAX_BINDINGS: u32 = 4096;
/// Entries of the remote range trie.
pub const MAX_RANGES: u32 = 65_536;
/// Default size of the source and established tables.
pub const DEFAULT_TABLE_ENTRIES: u32 = 262_144;
/// `BOUND_PORTS` words (65,536 bits).
pub const BOUND_PORT_WORDS: u32 = 1024;
/// Bytes of the `EVENTS` ring buffer (a power of two, a multiple of the
/// page size): about 2,300 events in flight.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Bytes of the `RESETS` ring buffer: about 1,300 requests in flight.
pub const RESETS_RING_BYTES: u32 = 64 * 1024;
/// Entries of `PENDING_RESETS`.
pub const MAX_PENDING_RESETS: u32 = 65_536;
/// Slots of `SYNS_SEEN`, per CPU: `1 << SYNS_SEEN_SLOT_BITS`.
pub const SYNS_SEEN_SLOTS: u32 = 1 << SYNS_SEEN_SLOT_BITS;
/// A slot is read back by the same CPU a few packets after it is written
/// (the SYN's own request socket), so few slots suffice; few is what keeps
/// them in the cache under a flood of new sources (at 1,024 slots the
/// write cost about 100 ns a SYN there).
const SYNS_SEEN_SLOT_BITS: u32 = 8;
/// Entries of `UNDECLARED_FORWARDS`.
pub const MAX_UNDECLARED_FORWARDS: u32 = 256;

/// Global settings, written by the daemon before it attaches anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// IPv6 sources are counted per this prefix length.
    pub ipv6_prefix_len: u32,
    /// The configuration generation: odd while the daemon writes a change
    /// to the connector tables or these settings, even (and new) once it is
    /// written. A cached refusal made under another generation, or while
    /// one is odd, is no answer (see `crate::refusals`).
    pub generation: u32,
    /// Only sockets of this network namespace are judged (the daemon's,
    /// where the interfaces are), but for handshakes the kernel moved there
    /// from a SYN the XDP program passed (DNAT into a container).
    pub netns_cookie: u64,
    /// The IPv6 prefix length refusals are cached by
    /// (`crate::refusals::key_prefix_len`).
    pub refusal_prefix_len: u32,
    pub _pad: u32,
}

/// A local address and port that some connector binds. The address is
/// [`crate::addr::wildcard`] for `0.0.0.0` and `[::]` bindings.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindingKey {
    pub addr: Addr,
    pub port: u16,
    pub _pad: [u8; 2],
}

/// The data of a `RANGES` key: a binding id (big endian, always matched in
/// full) followed by the remote address; the LPM prefix length covers
/// `32 + address bits`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RangeKey {
    pub binding: [u8; 4],
    pub remote: Addr,
}

/// Keys are built from an address's [`Words`] and read as words: a byte
/// array would have the eBPF compiler clear and copy it byte by byte. These
/// twins have the layout of the keys, in words; a transmute checks that the
/// sizes match, and the keys' 4-byte alignment with their addresses at
/// multiples of 4 makes the word reads in [`FlowKey::remote_words`] sound.
mod words {
    use super::Words;

    #[repr(C)]
    pub struct BindingKey {
        pub addr: Words,
        pub port: u16,
        pub pad: u16,
    }

    #[repr(C)]
    pub struct RangeKey {
        pub binding: u32,
        pub remote: Words,
    }

    #[repr(C)]
    pub struct SourceKey {
        pub connector: u32,
        pub addr: Words,
    }

    #[repr(C)]
    pub struct FlowKey {
        pub local: Words,
        pub remote: Words,
        pub local_port: u16,
        pub remote_port: u16,
    }
}

const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(align_of::<FlowKey>() == 4 && align_of::<SourceKey>() == 4);
    assert!(offset_of!(FlowKey, local) == 0 && offset_of!(FlowKey, remote) == 16);
    assert!(offset_of!(SourceKey, addr) == 4);
};

/// The words of an address field of a key.
#[inline(always)]
fn field_words(field: &Addr) -> Words {
    // SAFETY: only called on address fields of 4-byte aligned keys at
    // offsets that are multiples of 4 (asserted above).
    unsafe { *(field as *const Addr).cast::<Words>() }
}

impl BindingKey {
    #[inline(always)]
    pub fn from_words(addr: Words, port: u16) -> BindingKey {
        // SAFETY: the same layout, in words (see `words`).
        unsafe { core::mem::transmute(words::BindingKey { addr, port, pad: 0 }) }
    }
}

impl RangeKey {
    /// The key of `remote` on binding `binding`.
    #[inline(always)]
    pub fn from_words(binding: u32, remote: Words) -> RangeKey {
        let binding = u32::from_ne_bytes(binding.to_be_bytes());
        // SAFETY: the same layout, in words (see `words`).
        unsafe { core::mem::transmute(words::RangeKey { binding, remote }) }
    }
}

impl SourceKey {
    #[inline(always)]
    pub fn from_words(connector: u32, addr: Words) -> SourceKey {
        // SAFETY: the same layout, in words (see `words`).
        unsafe { core::mem::transmute(words::SourceKey { connector, addr }) }
    }

    /// The words of the source's address.
    #[inline(always)]
    pub fn addr_words(&self) -> Words {
        field_words(&self.addr)
    }

    /// Whether `self` and `other` are the same key, compared a word at a
    /// time (a byte array compare becomes a `memcmp` call on the bpf target,
    /// which the kernel's spin-locked sections do not allow).
    #[inline(always)]
    pub fn same(&self, other: &SourceKey) -> bool {
        let (a, b) = (field_words(&self.addr), field_words(&other.addr));
        self.connector == other.connector
            && a[0] == b[0]
            && a[1] == b[1]
            && a[2] == b[2]
            && a[3] == b[3]
    }
}

impl FlowKey {
    #[inline(always)]
    pub fn from_words(local: Words, remote: Words, local_port: u16, remote_port: u16) -> FlowKey {
        // SAFETY: the same layout, in words (see `words`).
        unsafe {
            core::mem::transmute(words::FlowKey {
                local,
                remote,
                local_port,
                remote_port,
            })
        }
    }

    #[inline(always)]
    pub fn local_words(&self) -> Words {
        field_words(&self.local)
    }

    #[inline(always)]
    pub fn remote_words(&self) -> Words {
        field_words(&self.remote)
    }
}

/// Set in the binding id of every wildcard binding, which is
/// [`wildcard_binding_id`] of its port and family: the kernel computes it
/// instead of looking it up. Specific bindings get ids from `BINDINGS`,
/// below this bit.
pub const WILDCARD_BINDING: u32 = 1 << 31;

/// Set in the id of a binding that is a `forwarded_to` endpoint: where a
/// connector's connections end up after NAT (REDIRECT to another port, DNAT
/// into a container). The server's socket there may be in another network
/// namespace, and is judged all the same.
pub const FORWARDED_BINDING: u32 = 1 << 30;

/// The binding id of the wildcard binding (`0.0.0.0` or `[::]`) of `port`.
#[inline(always)]
pub const fn wildcard_binding_id(port: u16, ipv4: bool) -> u32 {
    WILDCARD_BINDING | (port as u32) << 1 | ipv4 as u32
}

/// Bits of a [`RangeKey`] that are always compared: the binding id.
pub const RANGE_KEY_BINDING_BITS: u32 = 32;

/// What the action of a connector does with a connection over its cap.
pub mod action {
    /// Drop the SYN; the client retries later.
    pub const DROP: u32 = 0;
    /// Answer the SYN with a RST; the client moves on at once.
    pub const RESET: u32 = 1;
    /// Admit it, but count and report it as if rejected.
    pub const MONITOR: u32 = 2;
    /// Answer it as Exchange does: the daemon's responder completes the
    /// handshake, writes one `421 4.3.2` line and closes.
    pub const REPLY: u32 = 3;
}

/// A SYN refused with action `reply`, marked by the XDP program for the
/// `steer` program, which hands it to the daemon's responder instead of the
/// mail server. Keyed by the SYN's [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyMark {
    /// `bpf_ktime_get_ns()` when the SYN was refused: a mark older than
    /// [`REPLY_MARK_TTL_NS`] steers nothing (its handshake is long over,
    /// and the 4-tuple may be a new connection's).
    pub time_ns: u64,
    pub connector: u32,
    /// The rule that refused it (a `Rule` as u32): its wording.
    pub rule: u32,
    /// Set by `steer`: 1 once it handed the SYN to the responder, 2 if no
    /// responder took it (so each is counted once).
    pub steered: u32,
    pub _pad: u32,
}

/// How long a reply mark steers: the SYN's retransmissions, and the ACK
/// that completes a handshake answered with a SYN cookie.
pub const REPLY_MARK_TTL_NS: u64 = 10_000_000_000;
/// Entries of `REPLY_FLOWS`: more than the replies all CPUs may make in
/// [`REPLY_MARK_TTL_NS`], so that a live mark is not evicted.
pub const MAX_REPLY_FLOWS: u32 = 16384;
/// Replies a CPU makes a second for the keys of one set of its refusal
/// cache (a source is always in the same set); SYNs beyond are dropped (and
/// counted).
pub const REPLIES_PER_SECOND: u32 = 4;
/// Replies a CPU makes a second in all: a flood of forged sources draws no
/// more SYN-ACKs than this.
pub const CPU_REPLIES_PER_SECOND: u32 = 64;
/// `SO_MARK` of the responder's sockets: how the sock_ops program and the
/// daemon tell the responder's connections from the mail server's (a
/// value no routing rule is likely to match).
pub const RESPONDER_SOCKET_MARK: u32 = 0x4c4d_5251;
/// Where each CPU counts its replies, per set of its refusal cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyBudget {
    /// `bpf_ktime_get_coarse_ns()` when the current second began.
    pub since_ns: u64,
    pub replies: u32,
    pub _pad: u32,
}
/// A responder silent for longer than this is taken for gone: SYNs it
/// would have answered are dropped.
pub const REPLY_ALIVE_NS: u64 = 2_000_000_000;
/// `RESPONDERS` indices: the responder's listening sockets.
pub mod responder {
    pub const IPV4: u32 = 0;
    pub const IPV6: u32 = 1;
}

/// Where each CPU counts a rare condition until it is told (see
/// [`diag`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiagGate {
    pub count: u64,
    /// `bpf_ktime_get_coarse_ns()` when it was last told.
    pub told_ns: u64,
}

/// The read-only global of the kernel programs that holds aya-log's level
/// for [`diag`] conditions (0: off); set at load.
pub const KERNEL_LOG_LEVEL: &str = "KERNEL_LOG_LEVEL";

/// The rare conditions the kernel programs tell the daemon's log about
/// (`DIAG_GATES` indices).
pub mod diag {
    /// A SYN to a bound port that could not be read whole, dropped.
    pub const UNREADABLE: u32 = 0;
    /// A connection reset because a table it needed was full.
    pub const TABLE_FULL: u32 = 1;
    /// A connection judged over a cap when its handshake completed.
    pub const LATE_RESET: u32 = 2;
    /// A released count with no source entry to go back to.
    pub const LOST_SOURCE: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// A connector as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectorConfig {
    pub limits: Limits,
    /// One of [`action`].
    pub action: u32,
    /// A slot of the rate window: `crate::rate::slot_ns` of the limits'
    /// `connection_rate_time_unit`.
    pub rate_slot_ns: u64,
}

/// The kernel's `struct bpf_spin_lock`. The name is the contract: the
/// kernel finds the lock in a map value by this name in the map's BTF.
#[allow(
    non_camel_case_types,
    reason = "the kernel looks the lock up by this name"
)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// A connector's live connections, and the lock under which a connection
/// is judged and counted: the connector's and the source's counts change
/// together, as one decision (see `limiter_common::admission`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectorState {
    pub lock: bpf_spin_lock,
    /// Changes atomically: taken under `lock`, given back without it.
    pub live: u32,
}

/// A source on a connector: `addr` is the source identity
/// ([`crate::addr::source_identity`]).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub connector: u32,
    pub addr: Addr,
}

/// Live connections of one source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceCount {
    /// The entry's own key: a connection is counted into an entry only
    /// after checking, under the connector's lock, that the entry is still
    /// this source's (a deleted entry's memory may be reused).
    pub key: SourceKey,
    /// Changes atomically: taken under the connector's lock, given back
    /// without it.
    pub live: u32,
    /// [`SOURCE_FORGOTTEN`] once the entry is about to be deleted: nothing
    /// may be counted into it any more.
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last change, so that only sources idle
    /// for a while are forgotten.
    pub last_change_ns: u64,
    /// The reports of this source's rejections.
    pub gate: ReportGate,
    /// The connections it opened lately, for the rate limit: written under
    /// the connector's lock (see `crate::rate`).
    pub rate: RateWindow,
}

/// Set in [`SourceCount::flags`] of an entry being deleted.
pub const SOURCE_FORGOTTEN: u32 = 1;

/// Lets one rejection report a second through, per source (or, for sources
/// without an entry, per connector), and counts the rest into the next
/// report: a flood costs the ring, and the daemon, one event a second per
/// source instead of one per SYN, and the counts stay exact (a full ring
/// does not lose them). The daemon collects what is left when a source goes
/// quiet (`control::COLLECT_SOURCE`, `control::COLLECT_CONNECTOR`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportGate {
    /// `bpf_ktime_get_ns()` of the last report put on the ring; 0: never.
    pub reported_ns: u64,
    /// Rejections since then that no report carries yet. Changes
    /// atomically.
    pub unreported: u32,
    pub _pad: u32,
}

/// At most one report a second through each [`ReportGate`].
pub const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

/// Which kind of [`ReportGate`] a report went through.
pub mod gate {
    /// The source's entry in `SOURCE_LIVE`.
    pub const SOURCE: u32 = 0;
    /// The connector's entry in `REPORT_GATES` (the source had no entry).
    pub const CONNECTOR: u32 = 1;
    /// None: a connection judged when its handshake completed is reported
    /// every time (each one cost its client a whole handshake).
    pub const NONE: u32 = 2;
}

/// One TCP connection, from the server's side.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u16,
    pub remote_port: u16,
}

/// What a counted connection holds: the counts it took.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    pub source: SourceKey,
    /// [`FLOW_SEEDED`], or 0.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when it started counting.
    pub since_ns: u64,
}

/// The flow was found in the socket table when the daemon started, so no
/// sock_ops callback will report its close: the daemon watches it instead.
pub const FLOW_SEEDED: u32 = 1;

/// A counted connection: the server's socket, in its network namespace
/// (two containers may hold the same addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub flow: FlowKey,
    pub _pad: u32,
    /// The cookie of the socket's network namespace.
    pub netns: u64,
}

/// A server's local address and port, in the [`Words`] of its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// A SYN the XDP program passed, remembered per CPU by its remote end (see
/// `names::SYNS_SEEN`): when the kernel makes a request socket for it on a
/// port no connector binds, or in another network namespace, this says
/// which connector it was addressed to, for a warning.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynSeen {
    /// The remote address, as [`Words`].
    pub remote: Words,
    pub remote_port: u16,
    /// The port it was addressed to, before any NAT.
    pub local_port: u16,
    /// Connector id plus one; 0: an empty slot.
    pub connector: u32,
}

/// The slot of `SYNS_SEEN` for a remote end.
#[inline(always)]
pub fn syn_seen_slot(remote_last_word: u32, remote_port: u16) -> u32 {
    // Fibonacci hashing: the top bits of the product mix every input bit.
    let mixed = (remote_last_word ^ remote_port as u32).wrapping_mul(0x9e37_79b1);
    mixed >> (32 - SYNS_SEEN_SLOT_BITS)
}

/// Counters in `STATS`: row `connector id` (or [`stat::GLOBAL_ROW`]) times
/// [`stat::COUNT`] plus the counter.
pub mod stat {
    use super::MAX_CONNECTORS;

    /// Connections admitted and counted when their handshake completed.
    pub const ADMITTED: u32 = 0;
    /// Connections rejected by `max_inbound_connection` (SYNs refused and
    /// connections reset when their handshake completed).
    pub const REJECTED_TOTAL: u32 = 1;
    /// Rejected by `max_inbound_connection_per_source`.
    pub const REJECTED_PER_SOURCE: u32 = 2;
    /// Rejected by the percentage rule.
    pub const REJECTED_PERCENTAGE: u32 = 3;
    /// Of the rejections above, those judged when the handshake completed
    /// (the SYN had passed) and reset then.
    pub const REJECTED_LATE: u32 = 4;
    /// Connections reset because a table was full (never counted).
    pub const TABLE_FULL: u32 = 5;
    /// SYNs the XDP program passed to the kernel.
    pub const SYN_PASSED: u32 = 6;
    /// Counted connections the server's socket closed (or lost to a RST).
    pub const CLOSED: u32 = 7;
    /// Connections judged at a `forwarded_to` endpoint (after NAT).
    pub const FORWARDED: u32 = 8;
    /// Connections found at start-up (or outside the tracked cgroup) and
    /// counted without a judgement.
    pub const SEEDED: u32 = 9;
    /// Seeded connections the daemon found closed.
    pub const SEEDED_CLOSED: u32 = 10;
    /// Counted connections the daemon found gone from the socket table
    /// although no callback had released them (zero unless the daemon or
    /// the sock_ops program was away).
    pub const RECONCILED: u32 = 11;
    /// Connections refused with action `reply` and handed to the responder
    /// (by `steer`, once each; a forged source never completes the
    /// handshake).
    pub const REPLIED: u32 = 12;
    /// SYNs refused with action `reply` beyond the replies a second, or
    /// with no responder to take them: dropped.
    pub const REPLY_GATED: u32 = 13;
    /// With action `monitor`: connections admitted and counted that
    /// `max_inbound_connection` would have refused (a dry run; never in the
    /// `REJECTED_*` counters).
    pub const MONITORED_TOTAL: u32 = 14;
    /// With action `monitor`: would have been refused by
    /// `max_inbound_connection_per_source`.
    pub const MONITORED_PER_SOURCE: u32 = 15;
    /// With action `monitor`: would have been refused by the percentage
    /// rule.
    pub const MONITORED_PERCENTAGE: u32 = 16;
    /// Rejected by `max_inbound_connection_rate_per_source`.
    pub const REJECTED_RATE: u32 = 17;
    /// With action `monitor`: would have been refused by the rate.
    pub const MONITORED_RATE: u32 = 18;
    /// Counters per row.
    pub const COUNT: u32 = 19;
    /// The row for what belongs to no connector.
    pub const GLOBAL_ROW: u32 = MAX_CONNECTORS;
    /// Global: SYNs to a bound port that the program could not read whole
    /// (the TCP header cut by IP fragmentation, more extension headers or
    /// VLAN tags than it follows), dropped.
    pub const UNREADABLE: u32 = 0;
    /// Global: rejections not reported because the event ring was full.
    pub const EVENTS_LOST: u32 = 1;
    /// Global: reset requests that found the `RESETS` ring full, left to
    /// the daemon's sweep of `PENDING_RESETS`.
    pub const RESETS_DEFERRED: u32 = 2;
    /// Global: handshakes the kernel moved to a port or network namespace
    /// that no `forwarded_to` names: not counted.
    pub const UNDECLARED_FORWARDS: u32 = 3;
    /// Global: SYNs judged on the source's count (not from a refusal cache,
    /// not admitted for being far from every cap).
    pub const SOURCE_JUDGED: u32 = 4;
    /// Entries of `STATS`.
    pub const ENTRIES: u32 = (MAX_CONNECTORS + 1) * COUNT;
}

/// A rejected connection (or, with action monitor, one that would have
/// been), as the kernel reports it on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectionEvent {
    /// `bpf_ktime_get_ns()`.
    pub time_ns: u64,
    pub connector: u32,
    /// A [`crate::Rule`] discriminant.
    pub rule: u32,
    /// One of [`action`].
    pub action: u32,
    /// Live connections on the connector and from the source, before this
    /// one.
    pub live_total: u32,
    pub live_source: u32,
    /// [`crate::Evaluation::cap`].
    pub cap: u32,
    /// The limits the connection met.
    pub limits: Limits,
    pub local_port: u16,
    pub remote_port: u16,
    /// The source identity it was counted as.
    pub source: Addr,
    pub remote: Addr,
    pub local: Addr,
    /// Rejections before this one, through the same gate, that no report
    /// carried: this report stands for `folded + 1`.
    pub folded: u32,
    /// One of [`gate`].
    pub gate: u32,
    /// 1: judged when the handshake completed, and reset then; 0: the SYN
    /// was refused.
    pub late: u32,
    /// 1: every rejection this report stands for repeats one reported
    /// before: refused from a refusal cache, taken by the daemon's sweep
    /// (see `crate::refusals`).
    pub repeat: u32,
    /// The source's connections in its rate window, before this one.
    pub recent: u32,
    pub _pad: u32,
}

/// Why a connection is to be reset.
pub mod reset_reason {
    /// Over a cap when its handshake completed.
    pub const OVER_CAP: u32 = 1;
    /// A table it needed to be counted in was full.
    pub const TABLE_FULL: u32 = 2;
}

/// A connection the daemon must reset (sock_diag `SOCK_DESTROY`): only
/// userspace can reset a socket from outside it on every kernel limiter
/// runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRequest {
    /// The server's socket, in its network namespace.
    pub conn: ConnKey,
    /// The socket's cookie, so that a reset never hits a later socket of
    /// the same 4-tuple.
    pub socket_cookie: u64,
    /// One of [`reset_reason`].
    pub reason: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when it was judged.
    pub time_ns: u64,
}

/// A request to the `control` program, passed as its frame.
///
/// The daemon cannot change a count atomically from userspace, so it asks
/// the kernel: each request claims a flow entry by deleting it (whoever
/// deletes an entry owns its counts, so a release races with nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// One of [`control`].
    pub op: u32,
    /// Written by the program: one of `control::DONE`, ..., or for the
    /// collect operations a count.
    pub result: u32,
    /// The connection of the flow operations.
    pub flow: FlowKey,
    /// The source (or, for `COLLECT_CONNECTOR`, only its connector) of the
    /// source operations.
    pub source: SourceKey,
    /// `FORGET_SOURCE`: how long the source must have held nothing.
    pub idle_ns: u64,
    /// `SWEEP_REFUSALS`: whose refusal cache, and its first slot to sweep.
    pub cpu: u32,
    pub first_slot: u32,
}

/// Operations of the `control` program and its return codes.
pub mod control {
    /// Count an established connection found in the socket table.
    pub const SEED: u32 = 2;
    /// Release a seeded connection that is no longer established.
    pub const RELEASE_SEEDED: u32 = 3;
    /// Release any counted connection that the socket table no longer
    /// holds (reconciliation after the daemon was away).
    pub const RELEASE_ESTABLISHED: u32 = 4;
    /// Take the rejections a source's [`super::ReportGate`] holds; returns
    /// how many.
    pub const COLLECT_SOURCE: u32 = 5;
    /// The same for a connector's gate.
    pub const COLLECT_CONNECTOR: u32 = 6;
    /// Delete a source entry if it holds nothing and has been idle for
    /// `idle_ns`, checked under the connector's lock at the moment of the
    /// deletion.
    pub const FORGET_SOURCE: u32 = 7;
    /// `FORGET_SOURCE` when the source table is filling: a rate window
    /// keeps only a source held to its rate
    /// (`crate::rate::keeps_entry`).
    pub const FORGET_SOURCE_UNDER_PRESSURE: u32 = 9;
    /// Sweep one CPU's refusal cache from `first_slot`: claim the entries
    /// that hold refusals no report carries, up to
    /// `crate::refusals::SWEEP_CHUNK` slots or the first entry claimed a
    /// sweep ago and untouched since, whose refusals it reports (see
    /// `crate::refusals::GATE_CLAIMED`). Returns how many refusals it
    /// reported, and writes the slot to go on from into `first_slot`.
    pub const SWEEP_REFUSALS: u32 = 8;

    /// The request changed the counts.
    pub const DONE: u32 = 1;
    /// Nothing to do (already released, already counted, or not ours).
    pub const NOTHING: u32 = 2;
    /// A table was full; nothing changed.
    pub const FULL: u32 = 3;
    /// Unknown operation.
    pub const INVALID: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and
    // byte arrays, with their padding spelled out as fields.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::BindingKey {}
    unsafe impl aya::Pod for super::RangeKey {}
    unsafe impl aya::Pod for super::ConnectorConfig {}
    unsafe impl aya::Pod for super::ConnectorState {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceCount {}
    unsafe impl aya::Pod for super::ReportGate {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::RejectionEvent {}
    unsafe impl aya::Pod for super::ResetRequest {}
    unsafe impl aya::Pod for super::SynSeen {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ReplyMark {}
    unsafe impl aya::Pod for super::ReplyBudget {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Settings>(), 24);
        assert_eq!(size_of::<ReplyMark>(), 24);
        assert_eq!(size_of::<ReplyBudget>(), 16);
        assert_eq!(size_of::<BindingKey>(), 20);
        assert_eq!(size_of::<RangeKey>(), 20);
        assert_eq!(size_of::<ConnectorConfig>(), 32);
        assert_eq!(size_of::<ConnectorState>(), 8);
        assert_eq!(size_of::<SourceKey>(), 20);
        assert_eq!(size_of::<SourceCount>(), 80);
        assert_eq!(core::mem::offset_of!(SourceCount, last_change_ns), 32);
        assert_eq!(size_of::<ReportGate>(), 16);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<FlowValue>(), 32);
        assert_eq!(align_of::<FlowValue>(), 8);
        assert_eq!(size_of::<RejectionEvent>(), 128);
        assert_eq!(size_of::<ConnKey>(), 48);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<ResetRequest>(), 72);
        assert_eq!(core::mem::offset_of!(ResetRequest, time_ns), 64);
        assert_eq!(size_of::<SynSeen>(), 24);
        assert_eq!(size_of::<Control>(), 80);
        assert_eq!(core::mem::offset_of!(Control, idle_ns), 64);
    }

    #[test]
    fn syn_seen_slots_are_in_range_and_spread() {
        let mut used = [false; SYNS_SEEN_SLOTS as usize];
        for port in 40_000..41_000u16 {
            let slot = syn_seen_slot(u32::from_ne_bytes([10, 77, 0, 10]), port);
            assert!(slot < SYNS_SEEN_SLOTS);
            used[slot as usize] = true;
        }
        // A thousand ports of one client land on nearly all of the slots.
        let used = used.iter().filter(|u| **u).count() as u32;
        assert!(used > SYNS_SEEN_SLOTS * 9 / 10, "{used}");
    }

    #[test]
    fn keys_from_words_are_the_keys_from_bytes() {
        let local: Addr = core::array::from_fn(|i| i as u8);
        let remote: Addr = core::array::from_fn(|i| 0xf0 - i as u8);
        let (l, r) = (
            crate::addr::to_words(&local),
            crate::addr::to_words(&remote),
        );
        let flow = FlowKey::from_words(l, r, 25, 40_000);
        assert_eq!(
            flow,
            FlowKey {
                local,
                remote,
                local_port: 25,
                remote_port: 40_000
            }
        );
        assert_eq!((flow.local_words(), flow.remote_words()), (l, r));
        assert_eq!(
            BindingKey::from_words(l, 25),
            BindingKey {
                addr: local,
                port: 25,
                _pad: [0; 2]
            }
        );
        assert_eq!(
            RangeKey::from_words(0x0102_0304, r),
            RangeKey {
                binding: [1, 2, 3, 4],
                remote
            }
        );
        assert_eq!(
            SourceKey::from_words(7, r),
            SourceKey {
                connector: 7,
                addr: remote
            }
        );
    }
}
