//! Action `reset`: the refused SYN becomes, in place, the RST the server
//! would send (RFC 9293 3.10.7.1: `<SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>`),
//! and goes back out of the interface it came in by, so the client fails
//! at once and moves on to its next MX instead of retrying into a timeout.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use limiter_common::maps::FlowKey;

use crate::parse::{
    IPPROTO_TCP, IPV4_MIN_HLEN, IPV6_HLEN, ReplyLayout, TCP_ACK, TCP_HDR_LEN, TCP_RST, bytes_at,
};

const MAC_LEN: usize = 6;
/// Ethernet and two VLAN tags.
const MAX_L2_LEN: usize = 22;
const TTL: u8 = 64;
const IPV4_DONT_FRAGMENT: u16 = 0x4000;

/// Rewrites the frame into the RST for `flow`; `None` if it cannot (the
/// caller then drops the SYN). Not inlined: its headers, built on the
/// stack, would otherwise count against the admission path's stack.
#[inline(never)]
pub fn reset(ctx: &XdpContext, flow: &FlowKey, layout: &ReplyLayout) -> Option<()> {
    // Bounds the verifier can see (the offsets come back from the stack as
    // plain numbers): at most two VLAN tags before the IP header.
    let ip_offset = layout.ip as usize;
    if ip_offset > MAX_L2_LEN {
        return None;
    }
    let tcp_offset = ip_offset
        + if layout.ipv6 != 0 {
            IPV6_HLEN
        } else {
            IPV4_MIN_HLEN
        };
    // Cut options and payload: the reply is a bare TCP header.
    let reply_len = tcp_offset + TCP_HDR_LEN;
    let frame_len = ctx.data_end() - ctx.data();
    if frame_len > reply_len {
        let delta = reply_len as i32 - frame_len as i32;
        // SAFETY: the context of this program; the kernel checks the delta.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return None;
        }
    }

    // The headers, built on the stack.
    let tcp = tcp_header(flow, layout.seq);
    let tcp_checksum = if layout.ipv6 != 0 {
        let mut pseudo = [0u8; 40];
        pseudo[..16].copy_from_slice(&flow.local);
        pseudo[16..32].copy_from_slice(&flow.remote);
        pseudo[35] = TCP_HDR_LEN as u8;
        pseudo[39] = IPPROTO_TCP;
        checksum(&[sum(&pseudo), sum(&tcp)])
    } else {
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&flow.local[12..]);
        pseudo[4..8].copy_from_slice(&flow.remote[12..]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[11] = TCP_HDR_LEN as u8;
        checksum(&[sum(&pseudo), sum(&tcp)])
    };

    // Ethernet: back to where it came from.
    let eth = bytes_at(ctx, 0, 2 * MAC_LEN)? as *mut u8;
    // SAFETY: 12 bytes checked; the frame is ours to rewrite.
    unsafe {
        let destination = core::ptr::read_unaligned(eth as *const [u8; MAC_LEN]);
        let source = core::ptr::read_unaligned(eth.add(MAC_LEN) as *const [u8; MAC_LEN]);
        core::ptr::write_unaligned(eth as *mut [u8; MAC_LEN], source);
        core::ptr::write_unaligned(eth.add(MAC_LEN) as *mut [u8; MAC_LEN], destination);
    }

    if layout.ipv6 != 0 {
        let ip = bytes_at(ctx, ip_offset, IPV6_HLEN)? as *mut u8;
        let mut header = [0u8; IPV6_HLEN];
        header[0] = 0x60;
        header[4..6].copy_from_slice(&(TCP_HDR_LEN as u16).to_be_bytes());
        header[6] = IPPROTO_TCP;
        header[7] = TTL;
        header[8..24].copy_from_slice(&flow.local);
        header[24..40].copy_from_slice(&flow.remote);
        // SAFETY: IPV6_HLEN bytes checked.
        unsafe { core::ptr::write_unaligned(ip as *mut [u8; IPV6_HLEN], header) };
    } else {
        let ip = bytes_at(ctx, ip_offset, IPV4_MIN_HLEN)? as *mut u8;
        let mut header = [0u8; IPV4_MIN_HLEN];
        header[0] = 0x45;
        header[2..4].copy_from_slice(&((IPV4_MIN_HLEN + TCP_HDR_LEN) as u16).to_be_bytes());
        header[6..8].copy_from_slice(&IPV4_DONT_FRAGMENT.to_be_bytes());
        header[8] = TTL;
        header[9] = IPPROTO_TCP;
        header[12..16].copy_from_slice(&flow.local[12..]);
        header[16..20].copy_from_slice(&flow.remote[12..]);
        let check = checksum(&[sum(&header)]);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        // SAFETY: IPV4_MIN_HLEN bytes checked.
        unsafe { core::ptr::write_unaligned(ip as *mut [u8; IPV4_MIN_HLEN], header) };
    }

    let mut tcp = tcp;
    tcp[16..18].copy_from_slice(&tcp_checksum.to_be_bytes());
    let out = bytes_at(ctx, tcp_offset, TCP_HDR_LEN)? as *mut u8;
    // SAFETY: TCP_HDR_LEN bytes checked.
    unsafe { core::ptr::write_unaligned(out as *mut [u8; TCP_HDR_LEN], tcp) };
    Some(())
}

/// The RST's TCP header, checksum zero.
#[inline(always)]
fn tcp_header(flow: &FlowKey, syn_seq: u32) -> [u8; TCP_HDR_LEN] {
    let mut tcp = [0u8; TCP_HDR_LEN];
    tcp[0..2].copy_from_slice(&flow.local_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&flow.remote_port.to_be_bytes());
    // SEQ 0; ACK the SYN, which takes one sequence number.
    tcp[8..12].copy_from_slice(&syn_seq.wrapping_add(1).to_be_bytes());
    tcp[12] = ((TCP_HDR_LEN / 4) as u8) << 4;
    tcp[13] = TCP_RST | TCP_ACK;
    tcp
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words.
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut total = 0u32;
    let mut i = 0;
    while i + 1 < N {
        total += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    total
}

/// The Internet checksum of the sums.
#[inline(always)]
fn checksum(sums: &[u32]) -> u16 {
    let mut total: u32 = 0;
    for s in sums {
        total = total.wrapping_add(*s);
    }
    // Twice is enough for the sums of a few dozen bytes.
    total = (total & 0xffff) + (total >> 16);
    total = (total & 0xffff) + (total >> 16);
    !(total as u16)
}
