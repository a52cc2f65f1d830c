//! Connector selection and the live counts, shared by all three programs.
//!
//! A count is taken by an increment of the connector's total and of the
//! source's entry, and is owned by exactly one flow entry (a handshake or an
//! established connection). Whoever deletes that entry releases its count,
//! and a map deletion succeeds once, so no count is released twice.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    maps::{Array, lpm_trie::Key},
};
use limiter_common::{
    addr::{self, Words},
    maps::{
        BindingKey, FlowKey, FlowValue, RANGE_KEY_BINDING_BITS, RangeKey, ReportGate, SourceCount,
        SourceKey, stat, wildcard_binding_id,
    },
    retransmit::{self, End, MANY, ONE, PORTS, Start},
};

use crate::{
    atomic,
    maps::{
        BINDINGS, BOUND_PORTS, CONNECTOR_LIVE, RANGES, SETTINGS, SOURCE_LIVE, SPECIFIC_PORTS, STATS,
    },
};

/// Whether some connector binds local `port` (one array load).
#[inline(always)]
pub fn port_is_bound(port: u16) -> bool {
    bit_is_set(&BOUND_PORTS, port)
}

#[inline(always)]
fn bit_is_set(bitmap: &Array<u64>, port: u16) -> bool {
    match bitmap.get((port >> 6) as u32) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// The connector for `flow`: the most specific remote range on the binding
/// of its exact local address, else on the wildcard binding of its family.
#[inline(always)]
pub fn select_connector(flow: &FlowKey) -> Option<u32> {
    let (local, remote, port) = (flow.local_words(), flow.remote_words(), flow.local_port);
    if bit_is_set(&SPECIFIC_PORTS, port) {
        // SAFETY: the value is a plain u32 copied out at once.
        let specific = unsafe { BINDINGS.get(&BindingKey::from_words(local, port)).copied() };
        if let Some(connector) = specific.and_then(|id| connector_on_binding(id, remote)) {
            return Some(connector);
        }
    }
    connector_on_binding(
        wildcard_binding_id(port, addr::words_are_ipv4(&local)),
        remote,
    )
}

#[inline(always)]
fn connector_on_binding(binding_id: u32, remote: Words) -> Option<u32> {
    let key = Key::new(
        RANGE_KEY_BINDING_BITS + 128,
        RangeKey::from_words(binding_id, remote),
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

/// The source key of the remote end of `flow` on `connector`.
#[inline(always)]
pub fn source_key(connector: u32, flow: &FlowKey) -> SourceKey {
    let remote = flow.remote_words();
    // An IPv4 source is its address: the setting is only read for IPv6.
    let identity = if addr::words_are_ipv4(&remote) {
        remote
    } else {
        addr::source_identity_words(remote, ipv6_prefix_len())
    };
    SourceKey::from_words(connector, identity)
}

/// The live count of `source`, created at zero if it is new. `None` when the
/// table is full.
#[inline(always)]
pub fn source_entry(source: &SourceKey) -> Option<*mut SourceCount> {
    match SOURCE_LIVE.get_ptr_mut(source) {
        Some(entry) => Some(entry),
        None => new_source_entry(source),
    }
}

/// [`source_entry`] for a source just looked up and not found.
#[inline(always)]
pub fn new_source_entry(source: &SourceKey) -> Option<*mut SourceCount> {
    // Zeroes the compiler cannot see: a zeroed 40-byte value becomes a
    // call to a byte-at-a-time memset on this target.
    let zero = core::hint::black_box(0u64);
    let fresh = SourceCount {
        live: zero as u32,
        _pad: zero as u32,
        last_change_ns: zero,
        handshakes: zero,
        gate: ReportGate {
            reported_ns: zero,
            unreported: zero as u32,
            _pad: zero as u32,
        },
    };
    // Another CPU may insert the same key first; either way it exists after.
    let _ = SOURCE_LIVE.insert(source, fresh, BPF_NOEXIST as u64);
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

/// Counts a handshake of the source at `entry` from `remote_port`, before
/// its flow entry goes in (see `limiter_common::retransmit`).
#[inline(always)]
pub fn handshake_started(entry: *mut SourceCount, remote_port: u16) {
    // SAFETY: `entry` points into a live map value.
    let word = unsafe { &raw mut (*entry).handshakes };
    // SAFETY: as above; one read, acted on by the steps below.
    match retransmit::start(unsafe { core::ptr::read_volatile(word) }, remote_port) {
        Start::Nothing => {}
        Start::TurnOnMany => atomic::or(word, MANY | PORTS),
        Start::Count(bit) => {
            atomic::add(word, ONE);
            atomic::or(word, bit);
        }
    }
}

/// Uncounts a handshake of `source`, after its flow entry was deleted.
#[inline(always)]
pub fn handshake_ended(source: &SourceKey) {
    let Some(entry) = SOURCE_LIVE.get_ptr_mut(source) else {
        return;
    };
    // SAFETY: `entry` points into a live map value.
    let word = unsafe { &raw mut (*entry).handshakes };
    // SAFETY: as above.
    if !retransmit::end_subtracts(unsafe { core::ptr::read_volatile(word) }) {
        return;
    }
    match retransmit::end(atomic::add(word, ONE.wrapping_neg())) {
        End::Done => {}
        End::Empty(left) => atomic::compare_and_swap(word, left, 0),
        End::Undo => {
            atomic::add(word, ONE);
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
