//! `control`: an XDP program that is never attached. The daemon runs it
//! through `BPF_PROG_TEST_RUN` with a [`Control`] request as the frame, to
//! change counts atomically (which only the kernel can), and reads the
//! result back from the frame. XDP, and not a tracing program, because the
//! counts are taken under a `bpf_spin_lock`, which tracing programs may not
//! use.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use limiter_common::maps::{
    ConnKey, Control, FLOW_SEEDED, FlowKey, FlowValue, ReportGate, control as op, stat,
};

use crate::{
    atomic,
    count::{bump, forget_source, judge_and_count, release, select_connector, source_key},
    maps::{CONNECTORS, ESTABLISHED, REPORT_GATES, SETTINGS, SOURCE_LIVE},
    parse::bytes_at,
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
    let request = unsafe { core::ptr::read_unaligned(frame) };
    let result = match request.op {
        op::SEED => seed(&request.flow),
        op::RELEASE_SEEDED => release_established(&request.flow, true),
        op::RELEASE_ESTABLISHED => release_established(&request.flow, false),
        op::COLLECT_SOURCE => collect(
            // SAFETY: only the address of the field is taken.
            SOURCE_LIVE
                .get_ptr_mut(&request.source)
                .map(|entry| unsafe { &raw mut (*entry).gate }),
        ),
        op::COLLECT_CONNECTOR => collect(REPORT_GATES.get_ptr_mut(request.source.connector)),
        op::FORGET_SOURCE => {
            if forget_source(&request.source, request.idle_ns) {
                op::DONE
            } else {
                op::NOTHING
            }
        }
        _ => op::INVALID,
    };
    // SAFETY: as above; the field is within the checked bytes.
    unsafe { core::ptr::write_unaligned(&raw mut (*frame).result, result) };
    xdp_action::XDP_PASS
}

/// Takes the rejections that `gate` holds, for the daemon.
#[inline(always)]
fn collect(gate: Option<*mut ReportGate>) -> u32 {
    match gate {
        // SAFETY: a live map value.
        Some(gate) => atomic::swap(unsafe { &raw mut (*gate).unreported }, 0),
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
#[inline(always)]
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
    if judge_and_count(&source, &config.limits, true).is_none() {
        bump(connector, stat::TABLE_FULL);
        return op::FULL;
    }
    let value = FlowValue {
        source,
        flags: FLOW_SEEDED,
        // SAFETY: a helper without arguments.
        since_ns: unsafe { bpf_ktime_get_ns() },
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
