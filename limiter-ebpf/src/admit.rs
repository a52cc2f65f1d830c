//! XDP `admit`: refuses a SYN to a bound port when the rule refuses it on
//! the live counts, before the kernel spends anything on it. Everything
//! else passes: a SYN that passes is judged again, and counted, by the
//! sock_ops program when its handshake completes (see `track`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use limiter_common::{
    Rule,
    maps::{FlowKey, SynSeen, action, stat, syn_seen_slot},
    refusals::{self, CachedRefusal, GATE_CLAIMED, REFUSAL_WAYS, RefusalKey},
};

use crate::{
    atomic,
    count::{bump, connector_live, connector_state, select_connector, source_key},
    maps::{CONNECTORS, REFUSALS, RELEASE_STAMPS, SETTINGS, SOURCE_LIVE, SYNS_SEEN},
    parse::{self, LinkLayer, Packet},
    report::{self, Rejection, reject, rejected_counter},
    reset,
};

/// What becomes of a SYN.
enum Verdict {
    Pass,
    Drop,
    /// Refused, and answered with a RST.
    Reset,
}

#[inline(always)]
pub fn run(ctx: &XdpContext, link: LinkLayer) -> u32 {
    let syn = match parse::parse(ctx, link) {
        Packet::Pass => return xdp_action::XDP_PASS,
        Packet::Unreadable => {
            bump(stat::GLOBAL_ROW, stat::UNREADABLE);
            return xdp_action::XDP_DROP;
        }
        Packet::Syn(syn) => syn,
    };
    match decide(&syn.flow) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reset => match &syn.reply {
            Some(layout) if reset::reset(ctx, &syn.flow, layout).is_some() => xdp_action::XDP_TX,
            // Headers too unusual to answer in place: drop it instead.
            _ => xdp_action::XDP_DROP,
        },
    }
}

/// The verdict on a SYN to a bound port: from this CPU's refusal cache
/// when it remembers a refusal that still stands (one CPU-local lookup, no
/// shared write), else [`judge`]d on the live counts.
///
/// Not inlined: the parser reaches here by many paths (VLAN tags, IPv4 or
/// IPv6, extension headers), and a function of its own is verified without
/// multiplying them by the paths of the decision.
#[inline(never)]
fn decide(flow: &FlowKey) -> Verdict {
    let Some(settings) = SETTINGS.get_ptr(0) else {
        return Verdict::Pass;
    };
    // SAFETY: a live map value. The generation is read before anything the
    // daemon configures, so a refusal is never cached under a generation
    // newer than the configuration it was judged by.
    let (generation, prefix_len) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*settings).generation),
            (*settings).refusal_prefix_len,
        )
    };
    let key = RefusalKey::of(flow, prefix_len);
    let first = key.first_slot();
    let mut slot = core::ptr::null_mut();
    let mut way = 0;
    while way < REFUSAL_WAYS {
        if let Some(entry) = REFUSALS.get_ptr_mut(first + way) {
            // SAFETY: this CPU's slot of a per-CPU array.
            if unsafe { (*entry).holds(&key) } {
                if let Some(verdict) = from_cache(entry, generation) {
                    return verdict;
                }
                slot = entry;
                break;
            }
        }
        way += 1;
    }
    if slot.is_null() {
        slot = victim(first, flow.remote_port);
    }
    judge(flow, &key, generation, slot)
}

/// The verdict of a cached refusal, if it still stands and its owner (this
/// CPU) still counts into it (see `limiter_common::refusals`).
#[inline(always)]
fn from_cache(entry: *mut CachedRefusal, generation: u32) -> Option<Verdict> {
    // SAFETY: this CPU's slot of a per-CPU array; the stamp is a live map
    // value. Only this CPU writes the gate but for the daemon's sweep,
    // which never races with a plain add to an unclaimed gate.
    unsafe {
        let stamp = RELEASE_STAMPS.get_ptr((*entry).stamp_index)?;
        if !(*entry).stands(generation, core::ptr::read_volatile(stamp)) {
            return None;
        }
        let gate = core::ptr::read_volatile(&raw const (*entry).gate);
        if gate >= GATE_CLAIMED {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*entry).gate, gate + 1);
        bump(
            (*entry).connector - 1,
            rejected_counter(Rule::from_raw((*entry).rule as u32).unwrap_or(Rule::PerSource)),
        );
        Some(if (*entry).action as u32 == action::RESET {
            Verdict::Reset
        } else {
            Verdict::Drop
        })
    }
}

/// The slot of `first`'s set a new refusal goes into: an empty one, else
/// one picked by the SYN's source port (as good as random, and free).
#[inline(always)]
fn victim(first: u32, remote_port: u16) -> *mut CachedRefusal {
    let empty = |way: u32| {
        REFUSALS
            .get_ptr_mut(first + way)
            // SAFETY: this CPU's slot of a per-CPU array.
            .filter(|&entry| unsafe { (*entry).connector } == 0)
    };
    empty(0)
        .or_else(|| empty(1))
        .or_else(|| REFUSALS.get_ptr_mut(first + (remote_port as u32 & 1)))
        .unwrap_or(core::ptr::null_mut())
}

/// The verdict on the live counts as they are read (no lock, no write: a
/// flood is refused cheaply; the decision that counts is taken when the
/// handshake completes). A refusal is remembered in `slot`.
#[inline(always)]
fn judge(flow: &FlowKey, key: &RefusalKey, generation: u32, slot: *mut CachedRefusal) -> Verdict {
    let Some(connector) = select_connector(flow) else {
        return Verdict::Pass;
    };
    let (Some(config), Some(state)) = (
        CONNECTORS.get(connector).copied(),
        connector_state(connector),
    ) else {
        return Verdict::Pass;
    };
    // Monitor mode judges when the handshake completes, once per connection.
    if config.action == action::MONITOR {
        return passed(flow, connector);
    }
    let source = source_key(connector, flow);
    let stamps = (
        refusals::connector_stamp(connector),
        refusals::source_stamp(connector, &source.addr_words()),
    );
    // The stamps before the counts: a release between the two leaves the
    // refusal cached under a stamp that is already stale.
    let stamp_values = (read_stamp(stamps.0), read_stamp(stamps.1));
    let live_total = connector_live(state);
    let entry = SOURCE_LIVE.get_ptr_mut(&source);
    // SAFETY: a live map value, read once.
    let live_source = entry.map_or(0, |e| unsafe {
        core::ptr::read_volatile(&raw const (*e).live)
    });
    if limiter_common::admits(&config.limits, live_total, live_source) {
        return passed(flow, connector);
    }
    let evaluation = limiter_common::evaluate(&config.limits, live_total, live_source);
    let stamp_index = refusals::stamp_for(evaluation.rule, stamps.0, stamps.1);
    let carried = remember(slot, key);
    if !slot.is_null() {
        // SAFETY: this CPU's slot of a per-CPU array, the gate taken.
        unsafe {
            (*slot).remote_port = flow.remote_port;
            (*slot).connector = connector + 1;
            (*slot).generation = generation;
            (*slot).stamp_index = stamp_index;
            (*slot).stamp = if stamp_index == stamps.0 {
                stamp_values.0
            } else {
                stamp_values.1
            };
            (*slot).rule = evaluation.rule as u8;
            (*slot).action = config.action as u8;
        }
    }
    reject(&Rejection {
        flow,
        source: &source,
        config: &config,
        evaluation: &evaluation,
        live_total,
        live_source,
        entry: entry.unwrap_or(core::ptr::null_mut()),
        carried,
        at_completion: false,
        late: false,
        repeat: false,
    });
    if config.action == action::RESET {
        Verdict::Reset
    } else {
        Verdict::Drop
    }
}

#[inline(always)]
fn read_stamp(index: u32) -> u32 {
    RELEASE_STAMPS
        .get_ptr(index)
        // SAFETY: a live map value.
        .map_or(0, |stamp| unsafe { core::ptr::read_volatile(stamp) })
}

/// Makes `slot` the refusal cache entry of `key` (the caller fills in the
/// rest), and returns the refusals it held for `key` that no report
/// carries yet, for this refusal's report. Those it held for another key
/// go to that source's report gate.
#[inline(always)]
fn remember(slot: *mut CachedRefusal, key: &RefusalKey) -> u32 {
    if slot.is_null() {
        return 0;
    }
    // SAFETY: this CPU's slot of a per-CPU array. The gate is taken first,
    // atomically (the daemon's sweep may be taking it too), and only then
    // is the rest written: a sweep that took it first read a whole entry.
    unsafe {
        let held = refusals::gate_count(atomic::swap64(&raw mut (*slot).gate, 0));
        if (*slot).holds(key) {
            return held;
        }
        if held > 0 {
            report::hold_evicted(slot, held);
        }
        (*slot).remote = key.remote;
        (*slot).local = key.local;
        (*slot).local_port = key.local_port;
        0
    }
}

/// A SYN passes: counted as passed, and remembered by its remote end on
/// this CPU, for a handshake the kernel moves elsewhere (see `SynSeen`).
#[inline(always)]
fn passed(flow: &FlowKey, connector: u32) -> Verdict {
    bump(connector, stat::SYN_PASSED);
    let remote = flow.remote_words();
    if let Some(slot) = SYNS_SEEN.get_ptr_mut(syn_seen_slot(remote[3], flow.remote_port)) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            *slot = SynSeen {
                remote,
                remote_port: flow.remote_port,
                local_port: flow.local_port,
                connector: connector + 1,
            }
        };
    }
    Verdict::Pass
}
