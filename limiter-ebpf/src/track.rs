//! sock_ops `track`: the decision that counts. When a handshake completes
//! it judges the connection by the rule on the connections alone, under
//! the connector's lock: admitted, it is counted until the server's socket
//! closes; over a cap, it is reported and the daemon is asked to reset it.
//! A server socket in another network namespace (a container behind DNAT)
//! is judged when its endpoint is a connector's `forwarded_to`; a handshake
//! the kernel moved anywhere else is noticed, for a warning.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RWND_INIT,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    maps::HashMap,
    programs::SockOpsContext,
};
use limiter_common::{
    addr,
    maps::{
        ConnKey, Endpoint, FlowKey, FlowValue, RESPONDER_SOCKET_MARK, SourceKey, action,
        reset_reason, stat, syn_seen_slot,
    },
};

use crate::{
    count::{
        Counting, bump, judge_and_count, release, select_connector, select_forwarded, source_key,
    },
    maps::{CONNECTORS, ESTABLISHED, SETTINGS, SYNS_SEEN, UNDECLARED_FORWARDS, port_is_bound},
    read_ctx,
    report::{ON_STACK, Rejection, reject, request_reset},
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
    crate::diag::tell(ctx);
}

/// Whether the socket is the responder's (it carries its `SO_MARK`).
#[inline(always)]
fn is_responders(ctx: &SockOpsContext) -> bool {
    // SAFETY: the context's socket pointer, read with a load of its own
    // size, and checked for null before its `mark` is read.
    unsafe {
        let sk = core::ptr::read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk);
        !sk.is_null() && core::ptr::read_volatile(&raw const (*sk).mark) == RESPONDER_SOCKET_MARK
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

#[inline(always)]
fn netns_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the sock_ops context is valid for this helper.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The server's socket of `flow`, in its network namespace.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext, flow: &FlowKey) -> ConnKey {
    ConnKey {
        flow: *flow,
        _pad: 0,
        netns: netns_cookie(ctx),
    }
}

/// Whether the socket is in the daemon's network namespace (where the
/// interfaces are), or in another (a container).
#[inline(always)]
fn in_our_netns(conn: &ConnKey) -> bool {
    match SETTINGS.get(0) {
        Some(settings) => settings.netns_cookie == 0 || conn.netns == settings.netns_cookie,
        None => false,
    }
}

/// The connector of a server socket: by its bindings in our network
/// namespace; elsewhere only by a `forwarded_to` endpoint (the others are
/// not ours: unrelated services in containers that share the cgroup).
#[inline(always)]
fn connector_of(conn: &ConnKey) -> Option<u32> {
    if !port_is_bound(conn.flow.local_port) {
        return None;
    }
    if in_our_netns(conn) {
        select_connector(&conn.flow)
    } else {
        select_forwarded(&conn.flow)
    }
}

/// A request socket (the kernel accepted a SYN) that no connector's
/// bindings or `forwarded_to` take: if this CPU just passed a SYN from the
/// same remote end to a bound port, the kernel moved it there (NAT) and
/// nobody said so. Noted, for the daemon to warn about; never counted.
/// Not inlined: each callback's stack is its own (the verifier allows 512
/// bytes along a chain of calls).
#[inline(never)]
fn on_request(ctx: &SockOpsContext) {
    // SAFETY: a field of the context.
    if unsafe { read_ctx(&raw const (*ctx.ops).is_fullsock) } != 0 {
        // An outgoing connection of this host, not a request socket.
        return;
    }
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    let conn = conn_key(ctx, &flow);
    if connector_of(&conn).is_some() {
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
    if matches {
        let endpoint = Endpoint {
            addr: flow.local,
            port: flow.local_port,
            _pad: 0,
        };
        let _ = UNDECLARED_FORWARDS.insert(&endpoint, seen.connector - 1, 0);
        bump(stat::GLOBAL_ROW, stat::UNDECLARED_FORWARDS);
    }
}

/// Not inlined: each callback's stack is its own (the verifier allows 512
/// bytes along a chain of calls).
#[inline(never)]
fn on_established(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    // The responder's handshake (action `reply`), when the daemon is in
    // the tracked cgroup: not a connection to count. Known by its socket,
    // never by anything a client can send.
    if is_responders(ctx) {
        return;
    }
    let conn = conn_key(ctx, &flow);
    if let Some(connector) = connector_of(&conn) {
        judge_completed(ctx, &conn, connector);
    }
}

/// The decision that counts, for a connection of `connector` whose
/// handshake just completed. Not inlined, for the stack (see above).
#[inline(never)]
fn judge_completed(ctx: &SockOpsContext, conn: &ConnKey, connector: u32) {
    // An entry under this socket can only be a connection counted from the
    // socket table that has since closed: its count goes back.
    if let Some(stale) = claim(&ESTABLISHED, conn) {
        release(&stale);
    }
    let Some(config) = CONNECTORS.get(connector) else {
        return;
    };
    if !in_our_netns(conn) {
        bump(connector, stat::FORWARDED);
    }
    // SAFETY: the sock_ops context is valid for this helper.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let source = source_key(connector, &conn.flow);
    let monitor = config.action == action::MONITOR;
    let counting = Counting {
        regardless: monitor,
        new: true,
    };
    let Some(judged) = judge_and_count(&source, config, counting) else {
        // A full table never admits a connection it cannot count.
        bump(connector, stat::TABLE_FULL);
        request_reset(conn, socket_cookie, reset_reason::TABLE_FULL);
        return;
    };
    if judged.counted && !count_flow(ctx, conn, connector, &source) {
        request_reset(conn, socket_cookie, reset_reason::TABLE_FULL);
        return;
    }
    // With action monitor, a connection over a cap is admitted too (and
    // counted apart as one that would have been refused).
    if judged.evaluation.admitted || monitor {
        bump(connector, stat::ADMITTED);
    }
    if judged.evaluation.admitted {
        return;
    }
    reject::<ON_STACK>(&Rejection {
        flow: &conn.flow,
        source: &source,
        config,
        evaluation: &judged.evaluation,
        live_total: judged.live_total,
        live_source: judged.live_source,
        recent: judged.recent,
        entry: judged.entry,
        carried: 0,
        at_completion: true,
        // Monitor mode judges only here, and resets nothing.
        late: !monitor,
        repeat: false,
    });
    if !monitor {
        request_reset(conn, socket_cookie, reset_reason::OVER_CAP);
    }
}

/// Records a counted connection of `source`, and asks for its close. False
/// (and the count given back) when it cannot be followed.
#[inline(never)]
fn count_flow(ctx: &SockOpsContext, conn: &ConnKey, connector: u32, source: &SourceKey) -> bool {
    let value = FlowValue {
        source: *source,
        flags: 0,
        since_ns: crate::now_ns(),
    };
    if ESTABLISHED.insert(conn, value, BPF_NOEXIST as u64).is_err() {
        release(&value);
        bump(connector, stat::TABLE_FULL);
        return false;
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        // Without the state callback the close would go unseen.
        if let Some(value) = claim(&ESTABLISHED, conn) {
            release(&value);
        }
        return false;
    }
    true
}

/// Not inlined: each callback's stack is its own (the verifier allows 512
/// bytes along a chain of calls).
#[inline(never)]
fn on_closed(ctx: &SockOpsContext) {
    let Some(flow) = socket_flow(ctx) else {
        return;
    };
    if let Some(value) = claim(&ESTABLISHED, &conn_key(ctx, &flow)) {
        release(&value);
        bump(value.source.connector, stat::CLOSED);
    }
}

/// Deletes `conn` from `map` and returns what it held, if this call is the
/// one that deleted it (and so owns its count).
#[inline(always)]
pub fn claim(map: &HashMap<ConnKey, FlowValue>, conn: &ConnKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out before the entry is deleted.
    let value = unsafe { *map.get(conn)? };
    map.remove(conn).ok()?;
    Some(value)
}
