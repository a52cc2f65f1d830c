//! Map definitions. Names, sizes and layouts come from `limiter_common::maps`;
//! the daemon may resize the tables at load time.

use aya_ebpf::{
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap},
};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, CONNECTOR_NAME_BYTES, ConnKey, ConnectorConfig, ConnectorState,
    DEFAULT_TABLE_ENTRIES, EVENTS_RING_BYTES, Endpoint, FlowValue, MAX_BINDINGS, MAX_CONNECTORS,
    MAX_PENDING_RESETS, MAX_RANGES, MAX_UNDECLARED_FORWARDS, RESETS_RING_BYTES, RangeKey,
    RejectionEvent, ReportGate, ResetRequest, SYNS_SEEN_SLOTS, Settings, SourceCount, SourceKey,
    SynSeen, stat,
};
use limiter_common::maps::{DiagGate, FlowKey, MAX_REPLY_FLOWS, ReplyBudget, ReplyMark, diag};
use limiter_common::refusals::{
    CachedRefusal, REFUSAL_SETS, REFUSAL_SETS_USED_WORDS, REFUSAL_SLOTS, RELEASE_STAMPS_LEN,
};

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "BOUND_PORTS")]
pub static BOUND_PORTS: Array<u64> = Array::with_max_entries(BOUND_PORT_WORDS, 0);

#[map(name = "SPECIFIC_PORTS")]
pub static SPECIFIC_PORTS: Array<u64> = Array::with_max_entries(BOUND_PORT_WORDS, 0);

#[map(name = "BINDINGS")]
pub static BINDINGS: HashMap<BindingKey, u32> = HashMap::with_max_entries(MAX_BINDINGS, 0);

#[map(name = "RANGES")]
pub static RANGES: LpmTrie<RangeKey, u32> = LpmTrie::with_max_entries(MAX_RANGES, 0);

#[map(name = "CONNECTORS")]
pub static CONNECTORS: Array<ConnectorConfig> = Array::with_max_entries(MAX_CONNECTORS, 0);

/// A BTF map: the kernel finds the spin lock in its value by the BTF.
#[btf_map]
pub static CONNECTOR_STATE: btf_maps::Array<ConnectorState, { MAX_CONNECTORS as usize }> =
    btf_maps::Array::new();

#[map(name = "SOURCE_LIVE")]
pub static SOURCE_LIVE: HashMap<SourceKey, SourceCount> =
    HashMap::with_max_entries(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ESTABLISHED")]
pub static ESTABLISHED: HashMap<ConnKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::ENTRIES, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "RESETS")]
pub static RESETS: RingBuf = RingBuf::with_byte_size(RESETS_RING_BYTES, 0);

#[map(name = "PENDING_RESETS")]
pub static PENDING_RESETS: LruHashMap<ConnKey, ResetRequest> =
    LruHashMap::with_max_entries(MAX_PENDING_RESETS, 0);

#[map(name = "REPORT_GATES")]
pub static REPORT_GATES: Array<ReportGate> = Array::with_max_entries(MAX_CONNECTORS, 0);

#[map(name = "SYNS_SEEN")]
pub static SYNS_SEEN: PerCpuArray<SynSeen> = PerCpuArray::with_max_entries(SYNS_SEEN_SLOTS, 0);

#[map(name = "UNDECLARED_FORWARDS")]
pub static UNDECLARED_FORWARDS: LruHashMap<Endpoint, u32> =
    LruHashMap::with_max_entries(MAX_UNDECLARED_FORWARDS, 0);

#[map(name = "REFUSALS")]
pub static REFUSALS: PerCpuArray<CachedRefusal> = PerCpuArray::with_max_entries(REFUSAL_SLOTS, 0);

#[map(name = "REFUSAL_SETS_USED")]
pub static REFUSAL_SETS_USED: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(REFUSAL_SETS_USED_WORDS, 0);

/// Where a report is put together before it is copied onto `EVENTS`.
#[map(name = "REPORT_SCRATCH")]
pub static REPORT_SCRATCH: PerCpuArray<RejectionEvent> = PerCpuArray::with_max_entries(1, 0);

/// Where a SYN's reply layout waits while it is judged (see `admit::run`).
#[map(name = "REPLY_SCRATCH")]
pub static REPLY_SCRATCH: PerCpuArray<ReplyLayout> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "RELEASE_STAMPS")]
pub static RELEASE_STAMPS: Array<u32> = Array::with_max_entries(RELEASE_STAMPS_LEN, 0);

#[map(name = "LAST_REPLY_MARK")]
pub static LAST_REPLY_MARK: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "DIAG_GATES")]
pub static DIAG_GATES: PerCpuArray<DiagGate> = PerCpuArray::with_max_entries(diag::COUNT, 0);

#[map(name = "REPLY_FLOWS")]
pub static REPLY_FLOWS: LruHashMap<FlowKey, ReplyMark> =
    LruHashMap::with_max_entries(MAX_REPLY_FLOWS, 0);

#[map(name = "RESPONDERS")]
pub static RESPONDERS: SockMap = SockMap::with_max_entries(2, 0);

#[map(name = "REPLY_ALIVE")]
pub static REPLY_ALIVE: Array<u64> = Array::with_max_entries(2, 0);

#[map(name = "REPLY_BUDGETS")]
pub static REPLY_BUDGETS: PerCpuArray<ReplyBudget> =
    PerCpuArray::with_max_entries(REFUSAL_SETS + 1, 0);

/// Only the daemon uses it (see `limiter_common::maps::names`); defined here
/// so that it is created and pinned with the others.
#[map(name = "CONNECTOR_NAMES")]
pub static CONNECTOR_NAMES: Array<[u8; CONNECTOR_NAME_BYTES]> =
    Array::with_max_entries(MAX_CONNECTORS, 0);

/// Offsets of the headers of a SYN that can be answered in place: the TCP
/// header follows the IP header directly.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReplyLayout {
    pub ip: u32,
    /// 1 for IPv6.
    pub ipv6: u32,
    /// The SYN's sequence number.
    pub seq: u32,
}

/// Whether some connector binds local `port` (one array load).
#[inline(always)]
pub fn port_is_bound(port: u16) -> bool {
    bit_is_set(&BOUND_PORTS, port)
}

/// Whether `port`'s bit is set in a port bitmap.
#[inline(always)]
pub fn bit_is_set(bitmap: &Array<u64>, port: u16) -> bool {
    match bitmap.get((port >> 6) as u32) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}
