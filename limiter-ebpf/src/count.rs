//! Connector selection and the live counts, shared by the programs.
//!
//! A count is taken under the connector's lock, by an increment of the
//! connector's total and of the source's entry, and is owned by exactly one
//! entry of `ESTABLISHED`. Whoever deletes that entry releases its count
//! (atomic subtractions, no lock), and a map deletion succeeds once, so no
//! count is released twice.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_spin_lock, bpf_spin_unlock},
    maps::{Array, lpm_trie::Key},
};
use limiter_common::{
    Evaluation,
    addr::{self, Words},
    maps::{
        BindingKey, ConnectorConfig, ConnectorState, FORWARDED_BINDING, FlowKey, FlowValue,
        RANGE_KEY_BINDING_BITS, RangeKey, ReportGate, SOURCE_FORGOTTEN, SourceCount, SourceKey,
        diag, stat, wildcard_binding_id,
    },
    rate::{self, RATE_SLOTS, RateWindow},
    refusals,
};

use crate::{
    atomic,
    maps::{
        BINDINGS, CONNECTOR_STATE, CONNECTORS, RANGES, RELEASE_STAMPS, SETTINGS, SOURCE_LIVE,
        SPECIFIC_PORTS, STATS, bit_is_set,
    },
};

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

/// The connector for `flow` whose server socket is in another network
/// namespace than the daemon's: only a `forwarded_to` endpoint of a
/// connector names it (a container behind DNAT).
#[inline(always)]
pub fn select_forwarded(flow: &FlowKey) -> Option<u32> {
    let (local, port) = (flow.local_words(), flow.local_port);
    if !bit_is_set(&SPECIFIC_PORTS, port) {
        return None;
    }
    // SAFETY: the value is a plain u32 copied out at once.
    let id = unsafe { BINDINGS.get(&BindingKey::from_words(local, port)).copied() }?;
    if id & FORWARDED_BINDING == 0 {
        return None;
    }
    connector_on_binding(id, flow.remote_words())
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

/// The connector's live count and lock.
#[inline(always)]
pub fn connector_state(connector: u32) -> Option<*mut ConnectorState> {
    CONNECTOR_STATE.get_ptr_mut(connector)
}

/// The connector's live connections, read without the lock (one load).
#[inline(always)]
pub fn connector_live(state: *mut ConnectorState) -> u32 {
    // SAFETY: a live map value.
    unsafe { core::ptr::read_volatile(&raw const (*state).live) }
}

/// The live count of `source`, created at zero if it is new. `None` when the
/// table is full.
#[inline(always)]
fn source_entry(source: &SourceKey) -> Option<*mut SourceCount> {
    if let Some(entry) = SOURCE_LIVE.get_ptr_mut(source) {
        return Some(entry);
    }
    let entry = new_source_entry(source);
    (!entry.is_null()).then_some(entry)
}

/// [`source_entry`] for a source not in the table: null when it is full.
/// Not inlined: the fresh entry is built on its own stack (the verifier
/// allows 512 bytes along a chain of calls), and it returns a plain
/// pointer (a Rust enum in a signature becomes BTF the kernel refuses).
#[inline(never)]
fn new_source_entry(source: &SourceKey) -> *mut SourceCount {
    // Zeroes the compiler cannot see: a zeroed value becomes a call to a
    // byte-at-a-time memset on this target.
    let zero = core::hint::black_box(0u64);
    let fresh = SourceCount {
        key: *source,
        live: zero as u32,
        flags: zero as u32,
        _pad: zero as u32,
        last_change_ns: crate::now_ns(),
        gate: ReportGate {
            reported_ns: zero,
            unreported: zero as u32,
            _pad: zero as u32,
        },
        rate: RateWindow {
            newest_start_ns: zero,
            counts: [zero as u16; RATE_SLOTS],
            seq: zero as u16,
        },
    };
    // Another CPU may insert the same key first; either way it exists after.
    let _ = SOURCE_LIVE.insert(source, fresh, BPF_NOEXIST as u64);
    SOURCE_LIVE
        .get_ptr_mut(source)
        .unwrap_or(core::ptr::null_mut())
}

/// The counts [`judge_locked`] met, and what it did.
struct Locked {
    live_total: u32,
    live_source: u32,
    recent: u32,
    counted: bool,
}

/// What [`judge_and_count`] decided.
pub struct Judged {
    pub evaluation: Evaluation,
    /// The counts it met, before it.
    pub live_total: u32,
    pub live_source: u32,
    /// The source's connections in its rate window, before it.
    pub recent: u32,
    /// Whether it was counted (admitted, or counted regardless).
    pub counted: bool,
    pub entry: *mut SourceCount,
}

/// How [`judge_and_count`] counts a connection.
#[derive(Clone, Copy)]
pub struct Counting {
    /// Counted even over a cap: a connection that exists already, or one
    /// of a connector in monitor mode.
    pub regardless: bool,
    /// A new connection (its handshake just completed), which the rate
    /// counts; a connection found in the socket table is not one.
    pub new: bool,
}

impl Counting {
    /// Packed in one argument (a function of its own takes five at most).
    #[inline(always)]
    fn bits(self) -> u32 {
        self.regardless as u32 | (self.new as u32) << 1
    }

    #[inline(always)]
    fn from_bits(bits: u32) -> Counting {
        Counting {
            regardless: bits & 1 != 0,
            new: bits & 2 != 0,
        }
    }
}

/// Judges a connection of `source` by the rule and, when admitted (or
/// counted regardless), counts it: under the connector's lock, so that the
/// counts change as one decision (see `limiter_common::admission`). `None`
/// when a table is full (nothing judged, nothing counted).
#[inline(always)]
pub fn judge_and_count(
    source: &SourceKey,
    config: &ConnectorConfig,
    counting: Counting,
) -> Option<Judged> {
    // An entry being forgotten is deleted by its forgetter right after it
    // marked it (see `forget_source`); look again until it is gone. Only the
    // forgetter deletes: a judge that deleted too could delete the fresh
    // entry another judge made and counted into meanwhile.
    let mut locked = core::mem::MaybeUninit::<Locked>::uninit();
    let mut attempt = 0;
    while attempt < 4 {
        let entry = source_entry(source)?;
        if judge_locked(entry, source, config, counting.bits(), locked.as_mut_ptr()) {
            // SAFETY: written whole when it returns true.
            let locked = unsafe { locked.assume_init() };
            // The caps, for a report, outside the lock.
            return Some(Judged {
                evaluation: rate::judge(
                    &config.limits,
                    locked.live_total,
                    locked.live_source,
                    locked.recent,
                ),
                live_total: locked.live_total,
                live_source: locked.live_source,
                recent: locked.recent,
                counted: locked.counted,
                entry,
            });
        }
        attempt += 1;
    }
    None
}

/// The locked part of [`judge_and_count`], into `out`: false (and `out`
/// not written) when `entry` is no longer this source's live entry.
///
/// Not inlined: the window's arithmetic under the lock has a stack of its
/// own, beside the report's (the verifier allows 512 bytes along a chain
/// of calls). No helper calls under the lock.
#[inline(never)]
fn judge_locked(
    entry: *mut SourceCount,
    source: &SourceKey,
    config: &ConnectorConfig,
    counting: u32,
    out: *mut Locked,
) -> bool {
    let counting = Counting::from_bits(counting);
    let Some(state) = connector_state(source.connector) else {
        return false;
    };
    let limits = &config.limits;
    let now = crate::now_ns();
    // SAFETY: `state` and `entry` point into live map values; the lock is
    // the one the kernel found in the map's BTF.
    unsafe {
        bpf_spin_lock((&raw mut (*state).lock).cast());
        let usable = (*entry).flags & SOURCE_FORGOTTEN == 0 && (*entry).key.same(source);
        let live_total = core::ptr::read_volatile(&raw const (*state).live);
        let live_source = core::ptr::read_volatile(&raw const (*entry).live);
        let window = &raw mut (*entry).rate;
        let recent = (*window).recent(now, config.rate_slot_ns);
        let admitted =
            limiter_common::admits(limits, live_total, live_source) && rate::admits(limits, recent);
        let counted = usable && (admitted || counting.regardless);
        if counted {
            atomic::increment(&raw mut (*state).live);
            atomic::increment(&raw mut (*entry).live);
            // Only what the rule admits: in monitor mode, what enforcing
            // would have admitted (a refused connection never completes).
            if counting.new && admitted {
                // Odd while it changes: a lockless reader passes the SYN.
                // The fences keep the compiler from moving the window's
                // stores across the sequence's; the CPU keeps stores in
                // order on x86 (TSO), the only architecture packaged.
                let seq = core::ptr::read_volatile(&raw const (*window).seq);
                core::ptr::write_volatile(&raw mut (*window).seq, seq.wrapping_add(1));
                compiler_fence(Ordering::SeqCst);
                (*window).count(now, config.rate_slot_ns);
                compiler_fence(Ordering::SeqCst);
                core::ptr::write_volatile(&raw mut (*window).seq, seq.wrapping_add(2));
            }
        }
        bpf_spin_unlock((&raw mut (*state).lock).cast());
        if !usable {
            return false;
        }
        if counted {
            // Ours: it holds a count now.
            (*entry).last_change_ns = now;
        }
        out.write(Locked {
            live_total,
            live_source,
            recent,
            counted,
        });
        true
    }
}

/// [`recent_unlocked`] while the window is being written.
pub const RECENT_UNKNOWN: u64 = u64::MAX;

/// The connections `entry`'s source opened in its rate window at `now`,
/// read without the lock (by the XDP program): [`RECENT_UNKNOWN`] while
/// the window is being written, then the SYN is left to the exact
/// decision.
///
/// Not inlined: the copy of the window is on a stack of its own (and a
/// plain integer is returned: an enum in a signature becomes BTF the
/// kernel refuses).
#[inline(never)]
pub fn recent_unlocked(entry: *const SourceCount, now: u64, slot_ns: u64) -> u64 {
    match window_unlocked(entry) {
        Some(window) => window.recent(now, slot_ns) as u64,
        None => RECENT_UNKNOWN,
    }
}

/// A copy of `entry`'s rate window read without the lock; `None` while it
/// is being written.
#[inline(always)]
pub fn window_unlocked(entry: *const SourceCount) -> Option<RateWindow> {
    // SAFETY: a live map value; the fields are read one by one, the
    // sequence around them.
    unsafe {
        let window = &raw const (*entry).rate;
        let seq = core::ptr::read_volatile(&raw const (*window).seq);
        if seq & 1 != 0 {
            return None;
        }
        // Loads in order (see `judge_locked`'s fences).
        compiler_fence(Ordering::SeqCst);
        let copy = RateWindow {
            newest_start_ns: core::ptr::read_volatile(&raw const (*window).newest_start_ns),
            counts: core::ptr::read_volatile(&raw const (*window).counts),
            seq,
        };
        compiler_fence(Ordering::SeqCst);
        (core::ptr::read_volatile(&raw const (*window).seq) == seq).then_some(copy)
    }
}

/// Deletes `source`'s entry if it holds nothing and has held nothing for
/// `idle_ns`: marked forgotten under the connector's lock first, so that
/// no connection can be counted into it between the check and the
/// deletion, which only this does (a judge that meets the mark looks the
/// entry up again until it is gone). A rate window keeps it as
/// `limiter_common::rate::keeps_entry` says (`under_pressure`: the source
/// table is filling). Returns whether it was deleted.
///
/// Not inlined: its stack is its own, beside the other operations'.
#[inline(never)]
pub fn forget_source(source: &SourceKey, idle_ns: u64, under_pressure: bool) -> bool {
    let Some(state) = connector_state(source.connector) else {
        return false;
    };
    let Some(entry) = SOURCE_LIVE.get_ptr_mut(source) else {
        return false;
    };
    let Some(config) = CONNECTORS.get(source.connector) else {
        return false;
    };
    let now = crate::now_ns();
    // SAFETY: live map values; the lock is the map's.
    let forgotten = unsafe {
        bpf_spin_lock((&raw mut (*state).lock).cast());
        // Nor while its rate window must keep it: the rate would be
        // forgotten with it.
        let recent = (*entry).rate.recent(now, config.rate_slot_ns);
        let idle_for = now.wrapping_sub((*entry).last_change_ns);
        let idle = core::ptr::read_volatile(&raw const (*entry).live) == 0
            && idle_for >= idle_ns
            && !rate::keeps_entry(&config.limits, recent, idle_for, under_pressure)
            && (*entry).key.same(source);
        if idle {
            (*entry).flags |= SOURCE_FORGOTTEN;
        }
        bpf_spin_unlock((&raw mut (*state).lock).cast());
        idle
    };
    forgotten && SOURCE_LIVE.remove(source).is_ok()
}

/// Gives back the count a flow holds, then bumps the release stamps of its
/// connector and source: a refusal cached before it no longer stands (see
/// `limiter_common::refusals`).
#[inline(always)]
pub fn release(flow: &FlowValue) {
    if let Some(state) = connector_state(flow.source.connector) {
        // SAFETY: a live map value.
        unsafe { atomic::decrement(&raw mut (*state).live) };
    }
    // An entry that holds a count is never forgotten, so this is the one the
    // count went into.
    if let Some(entry) = SOURCE_LIVE.get_ptr_mut(&flow.source) {
        // SAFETY: `entry` points into a live map value.
        unsafe {
            atomic::decrement(&raw mut (*entry).live);
            (*entry).last_change_ns = crate::now_ns();
        }
    } else {
        crate::diag::note(diag::LOST_SOURCE);
    }
    let connector = flow.source.connector;
    bump_stamp(refusals::connector_stamp(connector));
    bump_stamp(refusals::source_stamp(connector, &flow.source.addr_words()));
}

#[inline(always)]
fn bump_stamp(index: u32) {
    if let Some(stamp) = RELEASE_STAMPS.get_ptr_mut(index) {
        // SAFETY: a live map value.
        unsafe { atomic::add32(stamp, 1) };
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
