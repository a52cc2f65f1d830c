//! XDP `admit`: refuses a SYN to a bound port when the rule refuses it on
//! the live counts, before the kernel spends anything on it. Everything
//! else passes: a SYN that passes is judged again, and counted, by the
//! sock_ops program when its handshake completes (see `track`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use limiter_common::maps::{FlowKey, SynSeen, action, stat, syn_seen_slot};

use crate::{
    count::{bump, connector_live, connector_state, select_connector, source_key},
    maps::{CONNECTORS, SOURCE_LIVE, SYNS_SEEN},
    parse::{self, LinkLayer, Packet},
    report::{Rejection, reject},
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

/// The verdict on a SYN to a bound port: its connector, then the rule on
/// the counts as they are read (no lock, no write: a flood is refused
/// cheaply; the decision that counts is taken when the handshake
/// completes).
///
/// Not inlined: the parser reaches here by many paths (VLAN tags, IPv4 or
/// IPv6, extension headers), and a function of its own is verified without
/// multiplying them by the paths of the decision.
#[inline(never)]
fn decide(flow: &FlowKey) -> Verdict {
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
    let live_total = connector_live(state);
    let source = source_key(connector, flow);
    let entry = SOURCE_LIVE.get_ptr_mut(&source);
    // SAFETY: a live map value, read once.
    let live_source = entry.map_or(0, |e| unsafe {
        core::ptr::read_volatile(&raw const (*e).live)
    });
    let evaluation = limiter_common::evaluate(&config.limits, live_total, live_source);
    if evaluation.admitted {
        return passed(flow, connector);
    }
    reject(&Rejection {
        flow,
        source: &source,
        config: &config,
        evaluation: &evaluation,
        live_total,
        live_source,
        entry: entry.unwrap_or(core::ptr::null_mut()),
        at_completion: false,
        late: false,
    });
    if config.action == action::RESET {
        Verdict::Reset
    } else {
        Verdict::Drop
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
