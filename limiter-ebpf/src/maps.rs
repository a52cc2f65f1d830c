//! Map definitions. Names, sizes and layouts come from `limiter_common::maps`;
//! the daemon may resize the tables at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, CONNECTOR_NAME_BYTES, ConnectorConfig, DEFAULT_TABLE_ENTRIES,
    EVENTS_RING_BYTES, FlowKey, FlowValue, MAX_BINDINGS, MAX_CONNECTORS, MAX_RANGES, RangeKey,
    ReportGate, Settings, SourceCount, SourceKey, stat,
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

#[map(name = "CONNECTOR_LIVE")]
pub static CONNECTOR_LIVE: Array<u32> = Array::with_max_entries(MAX_CONNECTORS, 0);

#[map(name = "SOURCE_LIVE")]
pub static SOURCE_LIVE: HashMap<SourceKey, SourceCount> =
    HashMap::with_max_entries(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "HANDSHAKES")]
pub static HANDSHAKES: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ESTABLISHED")]
pub static ESTABLISHED: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::ENTRIES, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "REPORT_GATES")]
pub static REPORT_GATES: Array<ReportGate> = Array::with_max_entries(MAX_CONNECTORS, 0);

/// Only the daemon uses it (see `limiter_common::maps::names`); defined here
/// so that it is created and pinned with the others.
#[map(name = "CONNECTOR_NAMES")]
pub static CONNECTOR_NAMES: Array<[u8; CONNECTOR_NAME_BYTES]> =
    Array::with_max_entries(MAX_CONNECTORS, 0);
