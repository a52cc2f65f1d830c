//! sock_ops `track`: the decision that counts. When a handshake completes
//! it judges the connection by the rule on the connections alone, under
//! the connector's lock: admitted, it is counted until the server's socket
//! closes; over a cap, it is reported and the daemon is asked to reset it.
//! It also finds handshakes that the kernel moved to another port or
//! network namespace (REDIRECT, DNAT) from the SYN the XDP program passed.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RWND_INIT,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    maps::HashMap,
    programs::SockOpsContext,
};
use limiter_common::{
    addr,
    maps::{FLOW_MOVED, FlowKey, FlowValue, action, reset_reason, stat, syn_seen_slot},
};

use crate::{
    count::{
        CountError, bump, judge_and_count, port_is_bound, release, select_connector, source_key,
    },
    maps::{CONNECTORS, ESTABLISHED, MOVED_HANDSHAKES, SETTINGS, SYNS_SEEN},
    report::{Rejection, reject, request_reset},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
pub fn run(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_RWND_INIT => on_request(ctx),
        // The server's socket holds the connection in ESTABLISHED and, once
        // the client has half-closed it, in CLOSE_WAIT; anything after that
        // (its own close, a RST) ends it.
        BPF_SOCK_OPS_STATE_CB
            if ctx.arg(1) != BPF_TCP_ESTABLISHED && ctx.arg(1) != BPF_TCP_CLOSE_WAIT =>
        {
            on_closed(ctx)
        }
        _ => {}
    }
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
    // read here is readable for every socket, request sockets included.
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

#[inline(always)]
fn netns_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the sock_ops context is valid for this helper.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Sockets of other network namespaces share the cgroup but not our ports.
#[inline(always)]
fn in_our_netns(ctx: &SockOpsContext) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    settings.netns_cookie == 0 || netns_cookie(ctx) == settings.netns_cookie
}

/// Whether the server's socket of `flow` is where the XDP program saw its
/// SYN go: a bound port in our network namespace.
#[inline(always)]
fn ours(ctx: &SockOpsContext, flow: &FlowKey) -> bool {
    port_is_bound(flow.local_port) && in_our_netns(ctx)
}

/// A request socket (the kernel accepted a SYN) on a port no connector
/// binds, or in another network namespace: if this CPU just passed a SYN
/// from the same remote end to a bound port, the kernel moved it there
/// (NAT), and its handshake belongs to that SYN's connector.
#[inline(always)]
fn on_request(ctx: &SockOpsContext) {
    // SAFETY: a field of the context.
    if unsafe { read_ctx(&raw const (*ctx.ops).is_fullsock) } != 0 {
        // An outgoing connection of this host, not a request socket.
        return;
    }
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    if ours(ctx, &flow) {
        return;
    }
    let remote = flow.remote_words();
    let Some(seen) = SYNS_SEEN.get(syn_seen_slot(remote[3], flow.remote_port)) else {
        return;
    };
    let matches = seen.connector != 0
        && seen.remote_port == flow.remote_port
        && seen.remote[0] == remote[0]
        && seen.remote[1] == remote[1]
        && seen.remote[2] == remote[2]
        && seen.remote[3] == remote[3];
    if matches
        && MOVED_HANDSHAKES
            .insert(&flow, seen.connector - 1, 0)
            .is_ok()
    {
        bump(seen.connector - 1, stat::MOVED);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    let (connector, flags) = if ours(ctx, &flow) {
        match select_connector(&flow) {
            Some(connector) => (connector, 0),
            None => return,
        }
    } else {
        // SAFETY: the value is a plain u32 copied out at once.
        match unsafe { MOVED_HANDSHAKES.get(&flow).copied() } {
            Some(connector) => {
                let _ = MOVED_HANDSHAKES.remove(&flow);
                (connector, FLOW_MOVED)
            }
            None => return,
        }
    };
    // An entry under this 4-tuple can only be a connection counted from the
    // socket table that has since closed: its count goes back.
    if let Some(stale) = claim(&ESTABLISHED, &flow) {
        release(&stale);
    }
    let Some(config) = CONNECTORS.get(connector).copied() else {
        return;
    };
    let cookie = netns_cookie(ctx);
    let source = source_key(connector, &flow);
    let monitor = config.action == action::MONITOR;
    let judged = match judge_and_count(&source, &config.limits, monitor) {
        Ok(judged) => judged,
        Err(CountError::Full) => {
            // A full table never admits a connection it cannot count.
            bump(connector, stat::TABLE_FULL);
            request_reset(&flow, reset_reason::TABLE_FULL, cookie);
            return;
        }
    };
    if judged.counted {
        let value = FlowValue {
            source,
            flags,
            // SAFETY: a helper without arguments.
            since_ns: unsafe { bpf_ktime_get_ns() },
        };
        if !count_flow(ctx, &flow, connector, value) {
            request_reset(&flow, reset_reason::TABLE_FULL, cookie);
            return;
        }
    }
    if judged.evaluation.admitted {
        bump(connector, stat::ADMITTED);
    } else {
        reject(&Rejection {
            flow: &flow,
            source: &source,
            config: &config,
            evaluation: &judged.evaluation,
            live_total: judged.live_total,
            live_source: judged.live_source,
            entry: judged.entry,
            at_completion: true,
            // Monitor mode judges only here, and resets nothing.
            late: !monitor,
        });
        if !monitor {
            request_reset(&flow, reset_reason::OVER_CAP, cookie);
        }
    }
}

/// Records a counted connection, and asks for its close. False (and the
/// count given back) when it cannot be followed.
#[inline(always)]
fn count_flow(ctx: &SockOpsContext, flow: &FlowKey, connector: u32, value: FlowValue) -> bool {
    if ESTABLISHED.insert(flow, value, BPF_NOEXIST as u64).is_err() {
        release(&value);
        bump(connector, stat::TABLE_FULL);
        return false;
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        // Without the state callback the close would go unseen.
        if let Some(value) = claim(&ESTABLISHED, flow) {
            release(&value);
        }
        return false;
    }
    true
}

#[inline(always)]
fn on_closed(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    if let Some(value) = claim(&ESTABLISHED, &flow) {
        release(&value);
        bump(value.source.connector, stat::CLOSED);
    }
}

/// Deletes `flow` from `map` and returns what it held, if this call is the
/// one that deleted it (and so owns its count).
#[inline(always)]
pub fn claim(map: &HashMap<FlowKey, FlowValue>, flow: &FlowKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out before the entry is deleted.
    let value = unsafe { *map.get(flow)? };
    map.remove(flow).ok()?;
    Some(value)
}
