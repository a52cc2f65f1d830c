//! sk_lookup `steer`: a SYN that the XDP program refused with action
//! `reply` (marked in `REPLY_FLOWS`) goes to the daemon's responder instead
//! of the mail server. Every other lookup is left to the kernel.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    programs::SkLookupContext,
};
use limiter_common::{
    addr,
    maps::{FlowKey, REPLY_MARK_TTL_NS, responder, stat},
};

use crate::{
    count::bump,
    maps::{LAST_REPLY_MARK, REPLY_FLOWS, RESPONDERS},
    read_ctx,
};

const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[inline(always)]
pub fn run(ctx: &SkLookupContext) -> u32 {
    try_steer(ctx).unwrap_or(sk_action::SK_PASS)
}

/// `None`: not ours, the kernel's lookup goes on.
#[inline(always)]
fn try_steer(ctx: &SkLookupContext) -> Option<u32> {
    // No mark made within its TTL: none to find (every SYN the namespace
    // takes comes here, so the common case costs no hash lookup). A mark
    // made on another CPU a moment ago may be missed: that SYN then goes
    // to the mail server, which counts and judges it when it completes.
    let now = crate::now_ns();
    // SAFETY: a map value, read at once.
    let last = LAST_REPLY_MARK
        .get_ptr(0)
        .map_or(0, |last| unsafe { core::ptr::read_volatile(last) });
    if now.saturating_sub(last) > REPLY_MARK_TTL_NS {
        return None;
    }
    let lookup: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: fields of the context, each read with a load of its own (the
    // verifier checks every access to the context).
    let (family, protocol) = unsafe {
        (
            read_ctx(&raw const (*lookup).family),
            read_ctx(&raw const (*lookup).protocol),
        )
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: as above.
    let flow = unsafe {
        let local6 = [
            read_ctx(&raw const (*lookup).local_ip6[0]),
            read_ctx(&raw const (*lookup).local_ip6[1]),
            read_ctx(&raw const (*lookup).local_ip6[2]),
            read_ctx(&raw const (*lookup).local_ip6[3]),
        ];
        let remote6 = [
            read_ctx(&raw const (*lookup).remote_ip6[0]),
            read_ctx(&raw const (*lookup).remote_ip6[1]),
            read_ctx(&raw const (*lookup).remote_ip6[2]),
            read_ctx(&raw const (*lookup).remote_ip6[3]),
        ];
        let local4 = read_ctx(&raw const (*lookup).local_ip4);
        let remote4 = read_ctx(&raw const (*lookup).remote_ip4);
        let local_port = read_ctx(&raw const (*lookup).local_port);
        // A big-endian 16-bit port in a 32-bit field.
        let remote_port = core::ptr::read_volatile(&raw const (*lookup).remote_port);
        let (local, remote) = if family == AF_INET6 {
            (local6, remote6)
        } else {
            (addr::ipv4_words(local4), addr::ipv4_words(remote4))
        };
        FlowKey::from_words(local, remote, local_port as u16, u16::from_be(remote_port))
    };
    let mark = REPLY_FLOWS.get_ptr_mut(&flow)?;
    // SAFETY: a helper without arguments; a map value, read and written
    // with plain loads and stores (a racing SYN retransmission writes the
    // same).
    if unsafe { now.saturating_sub((*mark).time_ns) } > REPLY_MARK_TTL_NS {
        return None;
    }
    let index = if family == AF_INET6 {
        responder::IPV6
    } else {
        responder::IPV4
    };
    // SAFETY: as above.
    let connector = unsafe { (*mark).connector };
    // Refused all the same when no responder takes it (none listens for
    // this family): the mail server never sees it.
    Some(match RESPONDERS.redirect_sk_lookup(ctx, index, 0) {
        Ok(()) => {
            // SAFETY: as above. Counted once per connection: a SYN cookie's
            // ACK is looked up (and steered) again.
            unsafe {
                if (*mark).steered == 0 {
                    (*mark).steered = 1;
                    bump(connector, stat::REPLIED);
                }
            }
            sk_action::SK_PASS
        }
        Err(_) => {
            // SAFETY: as above.
            unsafe {
                if (*mark).steered == 0 {
                    (*mark).steered = 2;
                    bump(connector, stat::REPLY_GATED);
                }
            }
            sk_action::SK_DROP
        }
    })
}
