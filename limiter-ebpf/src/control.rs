//! `control`: an XDP program that is never attached. The daemon runs it
//! through `BPF_PROG_TEST_RUN` with a [`Control`] request as the frame, to
//! change counts atomically (which only the kernel can), and reads the
//! result back from the frame. XDP, and not a tracing program, because the
//! counts are taken under a `bpf_spin_lock`, which tracing programs may not
//! use.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::generated::bpf_map_lookup_percpu_elem,
    programs::XdpContext,
};
use limiter_common::{
    addr,
    maps::{
        ConnKey, Control, FLOW_SEEDED, FlowKey, FlowValue, ReportGate, SourceKey, control as op,
        stat,
    },
    refusals::{self, CachedRefusal, GATE_CLAIMED, REFUSAL_SLOTS, SWEEP_CHUNK},
};

use crate::{
    atomic,
    count::{
        Counting, bump, forget_source, ipv6_prefix_len, judge_and_count, release, select_connector,
        source_key,
    },
    maps::{CONNECTORS, ESTABLISHED, REFUSALS, REPORT_GATES, SETTINGS, SOURCE_LIVE},
    parse::bytes_at,
    report::report_held,
    track::claim,
};

const EEXIST: i32 = 17;

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(frame) = bytes_at(ctx, 0, size_of::<Control>()) else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = frame as *mut Control;
    // SAFETY: the frame holds a whole `Control` (checked); it is plain data.
    let op = unsafe { core::ptr::read_unaligned(&raw const (*frame).op) };
    // Each kind of request on a stack of its own: together, the counting
    // and the sweep's report would not fit the verifier's 512 bytes.
    let result = if op == op::SWEEP_REFUSALS {
        sweep_request(frame)
    } else {
        count_request(frame, op)
    };
    // SAFETY: as above; the field is within the checked bytes.
    unsafe { core::ptr::write_unaligned(&raw mut (*frame).result, result) };
    crate::diag::tell(ctx);
    xdp_action::XDP_PASS
}

/// The requests that change counts (every one but the sweep).
#[inline(never)]
fn count_request(frame: *mut Control, op: u32) -> u32 {
    // The fields one at a time, as each operation needs them: a copy of
    // the whole request becomes a call to a `memmove` the verifier refuses
    // on packet memory.
    // SAFETY (all reads below): the frame holds a whole `Control`
    // (checked); it is plain data.
    match op {
        op::SEED => seed(&unsafe { core::ptr::read_unaligned(&raw const (*frame).flow) }),
        op::RELEASE_SEEDED => release_established(
            &unsafe { core::ptr::read_unaligned(&raw const (*frame).flow) },
            true,
        ),
        op::RELEASE_ESTABLISHED => release_established(
            &unsafe { core::ptr::read_unaligned(&raw const (*frame).flow) },
            false,
        ),
        op::COLLECT_SOURCE => collect(
            SOURCE_LIVE
                .get_ptr_mut(&unsafe { core::ptr::read_unaligned(&raw const (*frame).source) })
                // SAFETY: only the address of the field is taken.
                .map(|entry| unsafe { &raw mut (*entry).gate }),
        ),
        op::COLLECT_CONNECTOR => collect(REPORT_GATES.get_ptr_mut(unsafe {
            core::ptr::read_unaligned(&raw const (*frame).source.connector)
        })),
        op::FORGET_SOURCE | op::FORGET_SOURCE_UNDER_PRESSURE => {
            let (source, idle_ns) = unsafe {
                (
                    core::ptr::read_unaligned(&raw const (*frame).source),
                    core::ptr::read_unaligned(&raw const (*frame).idle_ns),
                )
            };
            if forget_source(&source, idle_ns, op == op::FORGET_SOURCE_UNDER_PRESSURE) {
                op::DONE
            } else {
                op::NOTHING
            }
        }
        _ => op::INVALID,
    }
}

/// A `SWEEP_REFUSALS` request: writes the slot to go on from back into
/// the frame.
#[inline(never)]
fn sweep_request(frame: *mut Control) -> u32 {
    // SAFETY: the frame holds a whole `Control` (checked by the caller).
    unsafe {
        let swept = sweep_refusals(
            core::ptr::read_unaligned(&raw const (*frame).cpu),
            core::ptr::read_unaligned(&raw const (*frame).first_slot),
        );
        core::ptr::write_unaligned(&raw mut (*frame).first_slot, swept as u32);
        (swept >> 32) as u32
    }
}

/// Sweeps the refusal cache of `cpu` from slot `first` (see
/// [`GATE_CLAIMED`]): claims the slots that hold refusals no report
/// carries, up to [`SWEEP_CHUNK`] slots or the first slot claimed a sweep
/// ago and untouched since, whose refusals it takes and reports. Returns
/// how many it reported (high half), and the slot to go on from.
///
/// At most one report a run: the loop stays a few instructions long, which
/// keeps the verifier's walk through it short.
#[inline(always)]
fn sweep_refusals(cpu: u32, first: u32) -> u64 {
    // Counted from zero to a constant: the verifier walks the loop once per
    // turn, and a bound it cannot see would be a walk of every slot.
    let mut turn = 0;
    while turn < SWEEP_CHUNK {
        let slot = first.wrapping_add(turn);
        if slot >= REFUSAL_SLOTS {
            return REFUSAL_SLOTS as u64;
        }
        let entry = cached_refusal(cpu, slot);
        if !entry.is_null() {
            // SAFETY: a live map value (another CPU's slot: every write to
            // its gate from here is a compare-and-swap of the whole word).
            let gate = unsafe { core::ptr::read_volatile(&raw const (*entry).gate) };
            if refusals::gate_count(gate) > 0 {
                if gate >= GATE_CLAIMED {
                    return ((take_and_report(entry, gate) as u64) << 32) | (slot as u64 + 1);
                }
                // SAFETY: as above.
                unsafe {
                    atomic::compare_and_swap64(&raw mut (*entry).gate, gate, gate | GATE_CLAIMED)
                };
            }
        }
        turn += 1;
    }
    first.saturating_add(SWEEP_CHUNK) as u64
}

#[inline(always)]
fn cached_refusal(cpu: u32, slot: u32) -> *mut CachedRefusal {
    // SAFETY: the map is a per-CPU array and the key a u32 on the stack.
    unsafe {
        bpf_map_lookup_percpu_elem(
            core::ptr::addr_of!(REFUSALS).cast_mut().cast(),
            (&raw const slot).cast(),
            cpu,
        )
    }
    .cast()
}

/// Takes the refusals of a slot claimed a sweep ago, if its CPU has not
/// touched it since (the gate still reads `gate`), and reports them. A full
/// ring puts them back, claimed, for the next sweep (or, if the CPU has
/// touched the slot meanwhile, into the source's report gate).
#[inline(always)]
fn take_and_report(entry: *mut CachedRefusal, gate: u64) -> u32 {
    // SAFETY: a live map value. Read before the take: the owner rewrites an
    // entry only after it took the gate itself, which makes the take fail.
    let cached = unsafe { core::ptr::read_volatile(entry) };
    // SAFETY: as above.
    let word = unsafe { &raw mut (*entry).gate };
    // SAFETY: as above.
    if !unsafe { atomic::compare_and_swap64(word, gate, 0) } {
        return 0;
    }
    let held = refusals::gate_count(gate);
    if report_held(&cached, held) {
        return held;
    }
    // SAFETY: as above.
    if !unsafe { atomic::compare_and_swap64(word, 0, gate) } {
        park(&cached, held);
    }
    0
}

/// Adds `held` refusals of `cached`'s source to its report gate (its
/// connector's if it has no entry).
#[inline(always)]
fn park(cached: &CachedRefusal, held: u32) {
    let connector = cached.connector.wrapping_sub(1);
    let source = SourceKey::from_words(
        connector,
        addr::source_identity_words(cached.remote, ipv6_prefix_len()),
    );
    let gate = match SOURCE_LIVE.get_ptr_mut(&source) {
        // SAFETY: only the address of the field is taken.
        Some(entry) => Some(unsafe { &raw mut (*entry).gate }),
        None => REPORT_GATES.get_ptr_mut(connector),
    };
    if let Some(gate) = gate {
        // SAFETY: a live map value.
        unsafe { atomic::add32(&raw mut (*gate).unreported, held) };
    }
}

/// Takes the rejections that `gate` holds, for the daemon.
#[inline(always)]
fn collect(gate: Option<*mut ReportGate>) -> u32 {
    match gate {
        // SAFETY: a live map value.
        Some(gate) => unsafe { atomic::swap(&raw mut (*gate).unreported, 0) },
        None => 0,
    }
}

/// A connection of the daemon's network namespace (the only one whose
/// socket table it reads).
#[inline(always)]
fn own(flow: &FlowKey) -> ConnKey {
    ConnKey {
        flow: *flow,
        _pad: 0,
        netns: SETTINGS.get(0).map_or(0, |settings| settings.netns_cookie),
    }
}

/// Counts a connection that exists already (found in the socket table):
/// no judgement, it is live whatever the rule says.
///
/// Not inlined: its stack is its own, beside the other operations'.
#[inline(never)]
fn seed(flow: &FlowKey) -> u32 {
    let conn = own(flow);
    if ESTABLISHED.get_ptr(&conn).is_some() {
        return op::NOTHING;
    }
    let Some(connector) = select_connector(flow) else {
        return op::NOTHING;
    };
    let Some(config) = CONNECTORS.get(connector).copied() else {
        return op::NOTHING;
    };
    let source = source_key(connector, flow);
    let counting = Counting {
        regardless: true,
        new: false,
    };
    if judge_and_count(&source, &config, counting).is_none() {
        bump(connector, stat::TABLE_FULL);
        return op::FULL;
    }
    let value = FlowValue {
        source,
        flags: FLOW_SEEDED,
        since_ns: crate::now_ns(),
    };
    match ESTABLISHED.insert(&conn, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            bump(connector, stat::SEEDED);
            op::DONE
        }
        Err(error) => {
            release(&value);
            if error == -EEXIST {
                op::NOTHING
            } else {
                bump(connector, stat::TABLE_FULL);
                op::FULL
            }
        }
    }
}

/// Releases a counted connection the daemon found gone from the socket
/// table; with `only_seeded`, only one counted from the socket table.
#[inline(always)]
fn release_established(flow: &FlowKey, only_seeded: bool) -> u32 {
    let conn = own(flow);
    if only_seeded {
        // SAFETY: the value is copied out at once.
        let seeded = ESTABLISHED
            .get_ptr(&conn)
            .is_some_and(|value| unsafe { (*value).flags } & FLOW_SEEDED != 0);
        if !seeded {
            return op::NOTHING;
        }
    }
    match claim(&ESTABLISHED, &conn) {
        Some(value) => {
            release(&value);
            let counter = if value.flags & FLOW_SEEDED != 0 {
                stat::SEEDED_CLOSED
            } else {
                stat::RECONCILED
            };
            bump(value.source.connector, counter);
            op::DONE
        }
        None => op::NOTHING,
    }
}
