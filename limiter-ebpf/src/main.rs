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
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{sock_ops, xdp},
    maps::HashMap,
    programs::{SockOpsContext, XdpContext},
};
use count::{acquire, bump, release, select_connector, source_key};
use limiter_common::{
    Rule, addr,
    maps::{
        ConnectorConfig, Control, FLOW_SEEDED, FlowKey, FlowValue, REPORT_INTERVAL_NS,
        RejectionEvent, ReportGate, SourceCount, SourceKey, action, control as op, gate, stat,
    },
    retransmit,
};
use maps::{CONNECTORS, ESTABLISHED, EVENTS, HANDSHAKES, REPORT_GATES, SETTINGS, SOURCE_LIVE};
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
        Packet::TinyFragment => {
            bump(stat::GLOBAL_ROW, stat::TINY_FRAGMENT);
            return Some(xdp_action::XDP_DROP);
        }
        Packet::Syn(syn) => syn,
    };
    Some(match decide(&syn.flow) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reset => match &syn.reply {
            Some(layout) if reset::reset(ctx, &syn.flow, layout).is_some() => xdp_action::XDP_TX,
            // Headers too unusual to answer in place: drop it instead.
            _ => xdp_action::XDP_DROP,
        },
    })
}

/// The verdict on a SYN to a bound port: its connector, then the rule.
///
/// Not inlined: the parser reaches here by many paths (VLAN tags, IPv4 or
/// IPv6, extension headers), and a function of its own is verified without
/// multiplying them by the paths of the decision.
#[inline(never)]
fn decide(flow: &FlowKey) -> Verdict {
    match select_connector(flow) {
        Some(connector) => admit_syn(flow, connector),
        None => Verdict::Pass,
    }
}

/// What becomes of a SYN.
#[repr(u32)]
enum Verdict {
    Pass,
    Drop,
    /// Refused, and answered with a RST.
    Reset,
}

/// Decides on a SYN in two steps.
///
/// A SYN over the cap is refused on the counts as they are read: they were
/// the true counts at that instant, so refusing is what the rule says (and
/// costs no atomic operation: a flood is refused cheaply).
///
/// A SYN that looks admissible is counted first, and the rule applied again
/// to the counts as they were just before: two SYNs on two CPUs see
/// different counts, so together they can never pass a cap that each alone
/// would not. If that second look refuses it, the count is given back.
#[inline(always)]
fn admit_syn(flow: &FlowKey, connector: u32) -> Verdict {
    let Some(config) = CONNECTORS.get(connector).copied() else {
        return Verdict::Pass;
    };
    let Some(total) = count::connector_live(connector) else {
        return Verdict::Pass;
    };
    let source = source_key(connector, flow);
    let entry = SOURCE_LIVE.get_ptr_mut(&source);
    // SAFETY: map values, read once each.
    let (live_total, live_source, handshakes) = unsafe {
        (
            core::ptr::read_volatile(total),
            entry.map_or(0, |e| core::ptr::read_volatile(&raw const (*e).live)),
            entry.map_or(0, |e| core::ptr::read_volatile(&raw const (*e).handshakes)),
        )
    };
    // Whether this SYN may retransmit one the source has counted already;
    // if not, no lookup (see `limiter_common::retransmit`).
    let counted = |flow: &FlowKey| {
        retransmit::may_retransmit(handshakes, flow.remote_port)
            && HANDSHAKES.get_ptr(flow).is_some()
    };
    let first = limiter_common::evaluate(&config.limits, live_total, live_source);
    if !first.admitted {
        // A retransmitted SYN of a handshake counted before the source
        // reached its cap passes: it is counted already.
        if counted(flow) {
            bump(connector, stat::SYN_RETRANSMITTED);
            return Verdict::Pass;
        }
        if config.action != action::MONITOR {
            let counts = Counts {
                live_total,
                live_source,
                entry: entry.unwrap_or(core::ptr::null_mut()),
            };
            return refuse(flow, &source, &config, &first, &counts);
        }
    }

    // A stray SYN on a live connection (answered by a challenge ACK):
    // counted already. An established connection holds a count of its
    // source from before its entry goes in, so a source that holds none has
    // no entry to look for (a new source under a flood). A retransmitted
    // SYN is not looked for here: its handshake entry makes the insert
    // below fail, and that gives the count back.
    if live_source != 0 && ESTABLISHED.get_ptr(flow).is_some() {
        bump(connector, stat::SYN_RETRANSMITTED);
        return Verdict::Pass;
    }
    let Some(entry) = entry.or_else(|| count::new_source_entry(&source)) else {
        bump(connector, stat::TABLE_FULL);
        return Verdict::Drop;
    };
    let live_total = atomic::increment(total);
    // SAFETY: `entry` points into a live map value.
    let live_source = atomic::increment(unsafe { &raw mut (*entry).live });
    let evaluation = limiter_common::evaluate(&config.limits, live_total, live_source);
    if !evaluation.admitted {
        if config.action != action::MONITOR {
            count::release_source(&source);
            // Another CPU took the last place meanwhile; a retransmission
            // keeps the place its handshake holds.
            if counted(flow) {
                bump(connector, stat::SYN_RETRANSMITTED);
                return Verdict::Pass;
            }
        }
        let counts = Counts {
            live_total,
            live_source,
            entry,
        };
        let verdict = refuse(flow, &source, &config, &evaluation, &counts);
        if config.action != action::MONITOR {
            return verdict;
        }
    }
    let value = FlowValue {
        source,
        flags: 0,
        // SAFETY: a helper without arguments.
        since_ns: unsafe { bpf_ktime_get_ns() },
    };
    count::handshake_started(entry, flow.remote_port);
    match HANDSHAKES.insert(flow, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            if evaluation.admitted {
                bump(connector, stat::ADMITTED);
            }
            Verdict::Pass
        }
        Err(error) => {
            count::handshake_ended(&source);
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

/// The counts a SYN met, before it, and the source's entry (null if it has
/// none).
struct Counts {
    live_total: u32,
    live_source: u32,
    entry: *mut SourceCount,
}

/// Counts and reports a refusal; what the connector's action does with it.
/// Not inlined: a function of its own keeps the verifier from walking its
/// paths once for each way into it.
#[inline(never)]
fn refuse(
    flow: &FlowKey,
    source: &SourceKey,
    config: &ConnectorConfig,
    evaluation: &limiter_common::Evaluation,
    counts: &Counts,
) -> Verdict {
    bump(source.connector, rejected_counter(evaluation.rule));
    // The source's own gate, or its connector's for a source without an
    // entry.
    let gate = if counts.entry.is_null() {
        REPORT_GATES.get_ptr_mut(source.connector)
    } else {
        // SAFETY: a live map value.
        Some(unsafe { &raw mut (*counts.entry).gate })
    };
    if let Some(gate) = gate
        && let Some(folded) = through_gate(gate)
    {
        report(flow, source, config, evaluation, counts, gate, folded);
    }
    match config.action {
        action::RESET => Verdict::Reset,
        action::MONITOR => Verdict::Pass,
        _ => Verdict::Drop,
    }
}

/// Whether a rejection is reported now, carrying how many rejections
/// before it that no report carried; else it is counted into `gate` (see
/// [`ReportGate`]).
#[inline(always)]
fn through_gate(gate: *mut ReportGate) -> Option<u32> {
    // SAFETY: a helper without arguments; the coarse clock is a plain read
    // where the precise one costs a clock source read, per SYN of a flood.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `gate` points into a live map value.
    unsafe {
        let last = core::ptr::read_volatile(&raw const (*gate).reported_ns);
        if last != 0 && now.wrapping_sub(last) < REPORT_INTERVAL_NS {
            atomic::increment(&raw mut (*gate).unreported);
            return None;
        }
        // Two CPUs may both get here: two reports, each with its own share.
        core::ptr::write_volatile(&raw mut (*gate).reported_ns, now);
        Some(atomic::swap(&raw mut (*gate).unreported, 0))
    }
}

/// Puts a rejection on the event ring for the daemon. A full ring loses the
/// report (counted), never the rejections: they go back into the gate.
#[inline(always)]
fn report(
    flow: &FlowKey,
    source: &SourceKey,
    config: &ConnectorConfig,
    evaluation: &limiter_common::Evaluation,
    counts: &Counts,
    gate: *mut ReportGate,
    folded: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<RejectionEvent>(0) else {
        bump(stat::GLOBAL_ROW, stat::EVENTS_LOST);
        // SAFETY: `gate` points into a live map value.
        unsafe { atomic::add32(&raw mut (*gate).unreported, folded.saturating_add(1)) };
        return;
    };
    entry.write(RejectionEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        connector: source.connector,
        rule: evaluation.rule as u32,
        action: config.action,
        live_total: counts.live_total,
        live_source: counts.live_source,
        cap: evaluation.cap,
        limits: config.limits,
        local_port: flow.local_port,
        remote_port: flow.remote_port,
        source: source.addr,
        remote: flow.remote,
        local: flow.local,
        folded,
        gate: if counts.entry.is_null() {
            gate::CONNECTOR
        } else {
            gate::SOURCE
        },
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
        AF_INET => (addr::ipv4_words(local4), addr::ipv4_words(remote4)),
        AF_INET6 => (local6, remote6),
        _ => return None,
    };
    // local_port is in host order; remote_port is a big-endian 32-bit value
    // (the 16-bit port in network order, shifted up).
    Some(FlowKey::from_words(
        local,
        remote,
        local_port as u16,
        u32::from_be(remote_port) as u16,
    ))
}

/// One load from the context.
#[inline(always)]
unsafe fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
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
        Some(value) => {
            count::handshake_ended(&value.source);
            value
        }
        None => {
            // Not admitted by XDP here (another interface, or its handshake
            // expired): it is live all the same, so it counts.
            let Some(connector) = select_connector(&flow) else {
                return;
            };
            let source = source_key(connector, &flow);
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
/// through `BPF_PROG_TEST_RUN`) and returns one of `control::DONE`, ...,
/// or for the collect operations a count.
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
        op::COLLECT_SOURCE => collect(
            // SAFETY: only the address of the field is taken.
            SOURCE_LIVE
                .get_ptr_mut(&request.source)
                .map(|entry| unsafe { &raw mut (*entry).gate }),
        ),
        op::COLLECT_CONNECTOR => collect(REPORT_GATES.get_ptr_mut(request.source.connector)),
        _ => op::INVALID,
    }
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

#[inline(always)]
fn expire_handshake(flow: &FlowKey) -> u32 {
    match claim(&HANDSHAKES, flow) {
        Some(value) => {
            count::handshake_ended(&value.source);
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
    let Some(connector) = select_connector(flow) else {
        return op::NOTHING;
    };
    let source = source_key(connector, flow);
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
