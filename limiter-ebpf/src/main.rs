//! The kernel side of limiter.
//!
//! - `admit` (XDP) counts and admits or rejects each SYN to a bound port by
//!   Exchange's rule (`limiter_common::evaluate`); everything else passes.
//! - `track` (sock_ops) moves a completed handshake to "established" and
//!   releases its count as soon as the connection leaves ESTABLISHED.
//! - `control` (raw tracepoint, never attached) is run by the daemon to expire
//!   handshakes and to count connections that predate it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod count;
mod maps;
mod parse;
mod reset;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_ESTABLISHED, xdp_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    macros::{sock_ops, xdp},
    maps::HashMap,
    programs::{SockOpsContext, XdpContext},
};
use count::{acquire, bump, release, select_connector, source_key};
use limiter_common::{
    Rule, addr,
    maps::{Control, FLOW_SEEDED, FlowKey, FlowValue, RejectionEvent, action, control as op, stat},
};
use maps::{CONNECTORS, ESTABLISHED, EVENTS, HANDSHAKES, SETTINGS};
use parse::Packet;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const EEXIST: i32 = 17;

#[xdp]
pub fn admit(ctx: XdpContext) -> u32 {
    try_admit(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_admit(ctx: &XdpContext) -> Option<u32> {
    let syn = match parse::parse(ctx)? {
        Packet::Pass => return Some(xdp_action::XDP_PASS),
        Packet::TinyFragment { local_port } => {
            if !count::port_is_bound(local_port) {
                return Some(xdp_action::XDP_PASS);
            }
            bump(stat::GLOBAL_ROW, stat::TINY_FRAGMENT);
            return Some(xdp_action::XDP_DROP);
        }
        Packet::Syn(syn) => syn,
    };
    let flow = &syn.flow;
    if !count::port_is_bound(flow.local_port) {
        return Some(xdp_action::XDP_PASS);
    }
    let connector = select_connector(&flow.local, flow.local_port, &flow.remote)?;
    Some(match admit_syn(flow, connector) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reset => match &syn.reply {
            Some(layout) if reset::reset(ctx, flow, layout).is_some() => xdp_action::XDP_TX,
            // Headers too unusual to answer in place: drop it instead.
            _ => xdp_action::XDP_DROP,
        },
    })
}

/// What becomes of a SYN.
enum Verdict {
    Pass,
    Drop,
    /// Refused, and answered with a RST.
    Reset,
}

/// Counts the SYN first, then applies the rule to the counts as they were:
/// two SYNs on two CPUs see different counts, so together they can never
/// pass a cap that each alone would not.
#[inline(always)]
fn admit_syn(flow: &FlowKey, connector: u32) -> Verdict {
    // A retransmitted SYN of a handshake we counted, or a stray SYN on a live
    // connection (answered by a challenge ACK): already counted.
    if HANDSHAKES.get_ptr(flow).is_some() || ESTABLISHED.get_ptr(flow).is_some() {
        bump(connector, stat::SYN_RETRANSMITTED);
        return Verdict::Pass;
    }
    let Some(config) = CONNECTORS.get(connector).copied() else {
        return Verdict::Pass;
    };
    let source = source_key(connector, &flow.remote);
    let (Some(total), Some(entry)) = (
        count::connector_live(connector),
        count::source_entry(&source),
    ) else {
        bump(connector, stat::TABLE_FULL);
        return Verdict::Drop;
    };
    let live_total = atomic::increment(total);
    // SAFETY: `entry` points into a live map value.
    let live_source = atomic::increment(unsafe { &raw mut (*entry).live });
    let evaluation = limiter_common::evaluate(&config.limits, live_total, live_source);
    if !evaluation.admitted {
        bump(connector, rejected_counter(evaluation.rule));
        report(flow, &source, &config, &evaluation, live_total, live_source);
        match config.action {
            action::MONITOR => {}
            action::RESET => {
                count::release_source(&source);
                return Verdict::Reset;
            }
            _ => {
                count::release_source(&source);
                return Verdict::Drop;
            }
        }
    }
    let value = FlowValue {
        source,
        flags: 0,
        // SAFETY: a helper without arguments.
        since_ns: unsafe { bpf_ktime_get_ns() },
    };
    match HANDSHAKES.insert(flow, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            if evaluation.admitted {
                bump(connector, stat::ADMITTED);
            }
            Verdict::Pass
        }
        Err(error) => {
            count::release_source(&source);
            if error == -EEXIST {
                // The same SYN on another CPU got there first.
                bump(connector, stat::SYN_RETRANSMITTED);
                Verdict::Pass
            } else {
                bump(connector, stat::TABLE_FULL);
                Verdict::Drop
            }
        }
    }
}

/// Puts a rejection on the event ring for the daemon. A full ring loses the
/// event (counted); the packet path never waits.
#[inline(always)]
fn report(
    flow: &FlowKey,
    source: &limiter_common::maps::SourceKey,
    config: &limiter_common::maps::ConnectorConfig,
    evaluation: &limiter_common::Evaluation,
    live_total: u32,
    live_source: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<RejectionEvent>(0) else {
        bump(stat::GLOBAL_ROW, stat::EVENTS_LOST);
        return;
    };
    entry.write(RejectionEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        connector: source.connector,
        rule: evaluation.rule as u32,
        action: config.action,
        live_total,
        live_source,
        cap: evaluation.cap,
        limits: config.limits,
        local_port: flow.local_port,
        remote_port: flow.remote_port,
        source: source.addr,
        remote: flow.remote,
        local: flow.local,
    });
    entry.submit(0);
}

#[inline(always)]
fn rejected_counter(rule: Rule) -> u32 {
    match rule {
        Rule::Total => stat::REJECTED_TOTAL,
        Rule::PerSource => stat::REJECTED_PER_SOURCE,
        Rule::None | Rule::Percentage => stat::REJECTED_PERCENTAGE,
    }
}

/// Deletes `flow` from `map` and returns what it held, if this call is the
/// one that deleted it (and so owns its count).
#[inline(always)]
fn claim(map: &HashMap<FlowKey, FlowValue>, flow: &FlowKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out before the entry is deleted.
    let value = unsafe { *map.get(flow)? };
    map.remove(flow).ok()?;
    Some(value)
}

#[sock_ops]
pub fn track(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == BPF_TCP_ESTABLISHED => on_left_established(&ctx),
        _ => {}
    }
    0
}

/// The connection as the socket sees it. A dual-stack socket reports an IPv4
/// peer as `::ffff:a.b.c.d`, which is already the map form.
#[inline(always)]
fn socket_flow(ctx: &SockOpsContext) -> Option<FlowKey> {
    let ops = ctx.ops;
    // Every field is loaded unconditionally, each at a constant offset from
    // the context pointer: given branches, LLVM merges the loads behind a
    // derived pointer, which the verifier rejects for context accesses.
    // SAFETY: `ops` is the kernel's context for this program, and every field
    // read here is readable for every socket.
    let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
        (
            read_ctx(&raw const (*ops).family),
            read_ctx(&raw const (*ops).local_ip4),
            read_ctx(&raw const (*ops).remote_ip4),
            [
                read_ctx(&raw const (*ops).local_ip6[0]),
                read_ctx(&raw const (*ops).local_ip6[1]),
                read_ctx(&raw const (*ops).local_ip6[2]),
                read_ctx(&raw const (*ops).local_ip6[3]),
            ],
            [
                read_ctx(&raw const (*ops).remote_ip6[0]),
                read_ctx(&raw const (*ops).remote_ip6[1]),
                read_ctx(&raw const (*ops).remote_ip6[2]),
                read_ctx(&raw const (*ops).remote_ip6[3]),
            ],
            read_ctx(&raw const (*ops).local_port),
            read_ctx(&raw const (*ops).remote_port),
        )
    };
    let (local, remote) = match family {
        AF_INET => (
            addr::from_ipv4(local4.to_ne_bytes()),
            addr::from_ipv4(remote4.to_ne_bytes()),
        ),
        AF_INET6 => (words_to_addr(local6), words_to_addr(remote6)),
        _ => return None,
    };
    Some(FlowKey {
        local,
        remote,
        // local_port is in host order; remote_port is a big-endian 32-bit
        // value (the 16-bit port in network order, shifted up).
        local_port: local_port as u16,
        remote_port: u32::from_be(remote_port) as u16,
    })
}

/// One load from the context.
#[inline(always)]
unsafe fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn words_to_addr(words: [u32; 4]) -> addr::Addr {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = words[i].to_ne_bytes();
        out[i * 4] = bytes[0];
        out[i * 4 + 1] = bytes[1];
        out[i * 4 + 2] = bytes[2];
        out[i * 4 + 3] = bytes[3];
        i += 1;
    }
    out
}

/// Sockets of other network namespaces share the cgroup but not our ports.
#[inline(always)]
fn in_our_netns(ctx: &SockOpsContext) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    // SAFETY: the sock_ops context is valid for this helper.
    settings.netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == settings.netns_cookie
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    if !count::port_is_bound(flow.local_port) || !in_our_netns(ctx) {
        return;
    }
    let value = match claim(&HANDSHAKES, &flow) {
        Some(value) => value,
        None => {
            // Not admitted by XDP here (another interface, or its handshake
            // expired): it is live all the same, so it counts.
            let Some(connector) = select_connector(&flow.local, flow.local_port, &flow.remote)
            else {
                return;
            };
            let source = source_key(connector, &flow.remote);
            if !acquire(&source) {
                bump(connector, stat::TABLE_FULL);
                return;
            }
            bump(connector, stat::ESTABLISHED_UNSEEN);
            FlowValue {
                source,
                flags: 0,
                // SAFETY: a helper without arguments.
                since_ns: unsafe { bpf_ktime_get_ns() },
            }
        }
    };
    // An entry under this 4-tuple can only be a seeded connection that has
    // since closed: its count goes back.
    if let Some(stale) = claim(&ESTABLISHED, &flow) {
        release(&stale);
    }
    let connector = value.source.connector;
    if ESTABLISHED
        .insert(&flow, value, BPF_NOEXIST as u64)
        .is_err()
    {
        release(&value);
        bump(connector, stat::TABLE_FULL);
        return;
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        // Without the state callback the close would go unseen.
        if let Some(value) = claim(&ESTABLISHED, &flow) {
            release(&value);
        }
        return;
    }
    bump(connector, stat::ESTABLISHED);
}

#[inline(always)]
fn on_left_established(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    if let Some(value) = claim(&ESTABLISHED, &flow) {
        release(&value);
        bump(value.source.connector, stat::CLOSED);
    }
}

/// Runs one [`Control`] request from the daemon (passed as the context
/// through `BPF_PROG_TEST_RUN`) and returns one of `control::DONE`, ...
///
/// Written out by hand rather than with `#[raw_tracepoint]`, whose wrapper
/// discards the return value.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp")]
pub fn control(ctx: *mut core::ffi::c_void) -> u32 {
    // SAFETY: the kernel checks that the context holds at least as many bytes
    // as the program reads; `Control` is plain data.
    let request = unsafe { core::ptr::read(ctx as *const Control) };
    match request.op {
        op::EXPIRE_HANDSHAKE => expire_handshake(&request.flow),
        op::SEED => seed(&request.flow),
        op::RELEASE_SEEDED => release_established(&request.flow, true),
        op::RELEASE_ESTABLISHED => release_established(&request.flow, false),
        _ => op::INVALID,
    }
}

#[inline(always)]
fn expire_handshake(flow: &FlowKey) -> u32 {
    match claim(&HANDSHAKES, flow) {
        Some(value) => {
            release(&value);
            bump(value.source.connector, stat::HANDSHAKE_EXPIRED);
            op::DONE
        }
        None => op::NOTHING,
    }
}

#[inline(always)]
fn seed(flow: &FlowKey) -> u32 {
    if ESTABLISHED.get_ptr(flow).is_some() {
        return op::NOTHING;
    }
    let Some(connector) = select_connector(&flow.local, flow.local_port, &flow.remote) else {
        return op::NOTHING;
    };
    let source = source_key(connector, &flow.remote);
    if !acquire(&source) {
        bump(connector, stat::TABLE_FULL);
        return op::FULL;
    }
    let value = FlowValue {
        source,
        flags: FLOW_SEEDED,
        // SAFETY: a helper without arguments.
        since_ns: unsafe { bpf_ktime_get_ns() },
    };
    match ESTABLISHED.insert(flow, value, BPF_NOEXIST as u64) {
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
    if only_seeded {
        // SAFETY: the value is copied out at once.
        let seeded = ESTABLISHED
            .get_ptr(flow)
            .is_some_and(|value| unsafe { (*value).flags } & FLOW_SEEDED != 0);
        if !seeded {
            return op::NOTHING;
        }
    }
    match claim(&ESTABLISHED, flow) {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
