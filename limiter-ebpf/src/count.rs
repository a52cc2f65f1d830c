//! Connector selection and the live counts, shared by all three programs.
//!
//! A count is taken by an increment of the connector's total and of the
//! source's entry, and is owned by exactly one flow entry (a handshake or an
//! established connection). Whoever deletes that entry releases its count,
//! and a map deletion succeeds once, so no count is released twice.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use limiter_common::{
    addr::{self, Addr, is_ipv4},
    maps::{BindingKey, FlowValue, RANGE_KEY_BINDING_BITS, RangeKey, SourceCount, SourceKey, stat},
};

use crate::{
    atomic,
    maps::{BINDINGS, BOUND_PORTS, CONNECTOR_LIVE, RANGES, SETTINGS, SOURCE_LIVE, STATS},
};

/// Whether some connector binds local `port` (one array load).
#[inline(always)]
pub fn port_is_bound(port: u16) -> bool {
    match BOUND_PORTS.get((port >> 6) as u32) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// The connector for a connection from `remote` to `local:port`: the most
/// specific remote range on the binding of that exact local address, else on
/// the wildcard binding of its family.
#[inline(always)]
pub fn select_connector(local: &Addr, port: u16, remote: &Addr) -> Option<u32> {
    let specific = BindingKey {
        addr: *local,
        port,
        _pad: [0; 2],
    };
    if let Some(connector) = connector_on_binding(&specific, remote) {
        return Some(connector);
    }
    let wildcard = BindingKey {
        addr: addr::wildcard(is_ipv4(local)),
        port,
        _pad: [0; 2],
    };
    connector_on_binding(&wildcard, remote)
}

#[inline(always)]
fn connector_on_binding(binding: &BindingKey, remote: &Addr) -> Option<u32> {
    // SAFETY: the value is a plain u32 copied out at once.
    let binding_id = unsafe { *BINDINGS.get(binding)? };
    let key = Key::new(
        RANGE_KEY_BINDING_BITS + 128,
        RangeKey {
            binding: binding_id.to_be_bytes(),
            remote: *remote,
        },
    );
    RANGES.get(&key).copied()
}

/// The IPv6 prefix length sources are counted by.
#[inline(always)]
pub fn ipv6_prefix_len() -> u32 {
    match SETTINGS.get(0) {
        Some(settings) => settings.ipv6_prefix_len,
        None => 64,
    }
}

/// The source key of `remote` on `connector`.
#[inline(always)]
pub fn source_key(connector: u32, remote: &Addr) -> SourceKey {
    SourceKey {
        connector,
        addr: addr::source_identity(remote, ipv6_prefix_len()),
    }
}

/// The live count of `source`, created at zero if it is new. `None` when the
/// table is full.
#[inline(always)]
pub fn source_entry(source: &SourceKey) -> Option<*mut SourceCount> {
    if let Some(entry) = SOURCE_LIVE.get_ptr_mut(source) {
        return Some(entry);
    }
    // Another CPU may insert the same key first; either way it exists after.
    let _ = SOURCE_LIVE.insert(source, SourceCount::default(), BPF_NOEXIST as u64);
    SOURCE_LIVE.get_ptr_mut(source)
}

/// The connector's total, as a pointer for atomic updates.
#[inline(always)]
pub fn connector_live(connector: u32) -> Option<*mut u32> {
    CONNECTOR_LIVE.get_ptr_mut(connector)
}

/// Takes a count for `source` with no admission check: for connections that
/// already exist. Returns false (and takes nothing) when a table is full.
#[inline(always)]
pub fn acquire(source: &SourceKey) -> bool {
    let Some(total) = connector_live(source.connector) else {
        return false;
    };
    let Some(entry) = source_entry(source) else {
        return false;
    };
    atomic::increment(total);
    // SAFETY: `entry` points into a live map value.
    unsafe {
        atomic::increment(&raw mut (*entry).live);
        (*entry).last_change_ns = bpf_ktime_get_ns();
    }
    true
}

/// Gives back the count a flow holds.
#[inline(always)]
pub fn release(flow: &FlowValue) {
    release_source(&flow.source);
}

/// Gives back one count of `source`.
#[inline(always)]
pub fn release_source(source: &SourceKey) {
    if let Some(total) = connector_live(source.connector) {
        atomic::decrement(total);
    }
    if let Some(entry) = SOURCE_LIVE.get_ptr_mut(source) {
        // SAFETY: `entry` points into a live map value.
        unsafe {
            atomic::decrement(&raw mut (*entry).live);
            (*entry).last_change_ns = bpf_ktime_get_ns();
        }
    }
}

/// Adds one to counter `counter` of row `row` (a connector id or
/// [`stat::GLOBAL_ROW`]). Per-CPU, so a plain add.
#[inline(always)]
pub fn bump(row: u32, counter: u32) {
    if let Some(value) = STATS.get_ptr_mut(row * stat::COUNT + counter) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *value += 1 };
    }
}
