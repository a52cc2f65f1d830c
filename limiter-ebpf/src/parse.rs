//! Finds the SYNs in a frame: Ethernet with VLAN tags (or a bare IP packet
//! on an interface without a link layer), IPv4 with options, IPv6 with
//! extension headers, then TCP.
//!
//! Every header is bounds-checked against the frame before it is read, and
//! every length is judged by the IP header, never by the frame (a frame may
//! carry padding past the packet). A SYN to a bound port that cannot be read
//! whole (its TCP header cut by fragmentation, or behind more extension
//! headers or VLAN tags than are followed here) is [`Packet::Unreadable`]:
//! the kernel would reassemble or unwrap it and accept it uncounted.
//! Anything else unexpected is [`Packet::Pass`]: the program fails open.

use aya_ebpf::programs::XdpContext;
use limiter_common::{addr, maps::FlowKey};

use crate::count::port_is_bound;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags followed. The kernel strips nested priority tags (VLAN 0) one
/// after the other, so a frame with more is unreadable, not harmless.
const MAX_VLAN_TAGS: usize = 4;

pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_TCP: u8 = 6;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTIONS: u8 = 60;
/// Extension header lengths are counted in units of this many bytes (the
/// authentication header's in units of 4).
const IPV6_EXTENSION_UNIT: usize = 8;
/// Extension headers followed; a longer chain is unreadable.
const IPV6_MAX_EXTENSION_HEADERS: usize = 8;

/// Bytes of the TCP header holding the ports.
const TCP_PORTS_END: usize = 4;
/// The TCP header without options.
pub const TCP_HDR_LEN: usize = 20;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_DATA_OFFSET: usize = 12;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a frame starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    Ethernet,
    /// A bare IP packet (`wg0`, `tun0`): the version tells the family.
    None,
}

/// What the admission program needs to know about a frame.
pub enum Packet {
    /// Not a connection attempt to a bound port: pass it untouched.
    Pass,
    /// A TCP SYN (no ACK, RST or FIN) to a bound port, seen from the server.
    Syn(Syn),
    /// Maybe a SYN to a bound port, but not readable whole: drop it.
    Unreadable,
}

/// A SYN to admit or refuse.
pub struct Syn {
    pub flow: FlowKey,
    /// Where its headers are, when they are simple enough to turn the frame
    /// into a RST in place (Ethernet, no IP options, no IPv6 extension
    /// headers, no fragment).
    pub reply: Option<ReplyLayout>,
}

/// Offsets of the headers of a SYN that can be answered in place: the TCP
/// header follows the IP header directly.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReplyLayout {
    pub ip: u32,
    /// 1 for IPv6.
    pub ipv6: u32,
    /// The SYN's sequence number.
    pub seq: u32,
}

/// Where the TCP header starts, where the IP packet ends (by its own
/// length), where the addresses are, and whether the segment is the first
/// piece of a fragmented packet.
struct L4 {
    offset: usize,
    end: usize,
    ip: usize,
    ipv6: bool,
    fragment: bool,
    /// The TCP header follows a plain IP header (no options, no extension
    /// headers).
    plain: bool,
}

/// A pointer to `len` bytes at `offset` in the frame, or `None` if the frame
/// is shorter.
#[inline(always)]
pub fn bytes_at(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *const u8)
}

/// Four bytes of the packet at `from + offset`, in memory order.
///
/// # Safety
///
/// The four bytes must be in the packet, bounds-checked.
#[inline(always)]
unsafe fn word_at(from: *const u8, offset: usize) -> u32 {
    // SAFETY: the caller checked the bounds; the load may be unaligned.
    unsafe { core::ptr::read_unaligned(from.add(offset) as *const u32) }
}

/// A big-endian u16 at `offset`.
#[inline(always)]
fn u16_at(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let p = bytes_at(ctx, offset, 2)?;
    // SAFETY: bounds checked just above.
    Some(u16::from_be_bytes(unsafe { [*p, *p.add(1)] }))
}

/// What a parse step found: go on with `T`, or stop with a verdict.
type Step<T> = Result<T, Packet>;

/// Classifies a frame.
#[inline(always)]
pub fn parse(ctx: &XdpContext, link: LinkLayer) -> Packet {
    match try_parse(ctx, link) {
        Ok(packet) | Err(packet) => packet,
    }
}

#[inline(always)]
fn try_parse(ctx: &XdpContext, link: LinkLayer) -> Step<Packet> {
    let (offset, ether_type) = match link {
        LinkLayer::Ethernet => ethernet(ctx)?,
        LinkLayer::None => {
            // Every IP header is at least this long (and a check of one
            // byte compiles to a compare the verifier cannot follow).
            let first = bytes_at(ctx, 0, IPV4_MIN_HLEN).ok_or(Packet::Pass)?;
            // SAFETY: one byte checked.
            match unsafe { *first } >> 4 {
                4 => (0, ETH_P_IP),
                6 => (0, ETH_P_IPV6),
                _ => return Err(Packet::Pass),
            }
        }
    };
    let l4 = match ether_type {
        ETH_P_IP => ipv4(ctx, offset)?,
        ETH_P_IPV6 => ipv6(ctx, offset)?,
        _ => return Err(Packet::Pass),
    };
    tcp(ctx, l4, link)
}

#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Step<(usize, u16)> {
    let mut offset = ETH_HLEN;
    let mut ether_type = u16_at(ctx, ETH_HLEN - 2).ok_or(Packet::Pass)?;
    let mut tag = 0;
    while tag < MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok((offset, ether_type));
        }
        ether_type = u16_at(ctx, offset + 2).ok_or(Packet::Pass)?;
        offset += VLAN_HLEN;
        tag += 1;
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Packet::Unreadable);
    }
    Ok((offset, ether_type))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Step<L4> {
    // The fixed part, with a constant length the verifier can follow.
    let ip = bytes_at(ctx, offset, IPV4_MIN_HLEN).ok_or(Packet::Pass)?;
    // SAFETY: all reads below are within the IPV4_MIN_HLEN bytes checked.
    let (version_ihl, total_len, fragment_field, protocol) = unsafe {
        (
            *ip,
            u16::from_be_bytes([*ip.add(2), *ip.add(3)]) as usize,
            u16::from_be_bytes([*ip.add(6), *ip.add(7)]),
            *ip.add(9),
        )
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    // A header or a length the kernel drops as malformed, or a packet the
    // frame does not hold whole (dropped as truncated): nothing to count.
    if version_ihl >> 4 != 4
        || header_len < IPV4_MIN_HLEN
        || total_len < header_len
        || offset + total_len > ctx.data_end() - ctx.data()
        || protocol != IPPROTO_TCP
    {
        return Err(Packet::Pass);
    }
    if fragment_field & IPV4_FRAG_OFFSET_MASK != 0 {
        // A later fragment carries no TCP header of its own, and the kernel
        // drops fragments that overlap the first.
        return Err(Packet::Pass);
    }
    Ok(L4 {
        offset: offset + header_len,
        end: offset + total_len,
        ip: offset,
        ipv6: false,
        fragment: fragment_field & IPV4_MORE_FRAGMENTS != 0,
        plain: header_len == IPV4_MIN_HLEN,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Step<L4> {
    let ip = bytes_at(ctx, offset, IPV6_HLEN).ok_or(Packet::Pass)?;
    // SAFETY: within the IPV6_HLEN bytes checked.
    let (version, payload_len, mut next_header) = unsafe {
        (
            *ip >> 4,
            u16::from_be_bytes([*ip.add(4), *ip.add(5)]) as usize,
            *ip.add(6),
        )
    };
    let end = offset + IPV6_HLEN + payload_len;
    if version != 6 || end > ctx.data_end() - ctx.data() {
        return Err(Packet::Pass);
    }
    let mut header = offset + IPV6_HLEN;
    let mut fragment = false;
    let mut seen = 0;
    while seen < IPV6_MAX_EXTENSION_HEADERS {
        if next_header == IPPROTO_TCP {
            return Ok(L4 {
                offset: header,
                end,
                ip: offset,
                ipv6: true,
                fragment,
                plain: seen == 0,
            });
        }
        // Every extension header starts with 8 bytes: check them at once
        // and read through that one pointer.
        let ext = bytes_at(ctx, header, IPV6_EXTENSION_UNIT).ok_or(Packet::Pass)?;
        if header + IPV6_EXTENSION_UNIT > end {
            return Err(Packet::Pass);
        }
        // SAFETY: within the IPV6_EXTENSION_UNIT bytes checked.
        let (next, length, offset_and_flags) = unsafe {
            (
                *ext,
                *ext.add(1) as usize,
                u16::from_be_bytes([*ext.add(2), *ext.add(3)]),
            )
        };
        header += match next_header {
            // Hop-by-hop options come first or not at all (RFC 8200 4.1).
            IPV6_HOP_BY_HOP if seen > 0 => return Err(Packet::Pass),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                (length + 1) * IPV6_EXTENSION_UNIT
            }
            IPV6_AUTH => (length + 2) * 4,
            IPV6_FRAGMENT => {
                if offset_and_flags >> 3 != 0 {
                    // A later fragment.
                    return Err(Packet::Pass);
                }
                fragment = offset_and_flags & 1 != 0;
                IPV6_EXTENSION_UNIT
            }
            // Not TCP (ESP, no next header, another protocol): what it
            // carries, if anything, is judged when its handshake completes.
            _ => return Err(Packet::Pass),
        };
        next_header = next;
        seen += 1;
    }
    match next_header {
        IPPROTO_TCP => Ok(L4 {
            offset: header,
            end,
            ip: offset,
            ipv6: true,
            fragment,
            plain: false,
        }),
        // Another extension header: the chain goes on past what is followed.
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTIONS => {
            Err(Packet::Unreadable)
        }
        _ => Err(Packet::Pass),
    }
}

#[inline(always)]
fn tcp(ctx: &XdpContext, l4: L4, link: LinkLayer) -> Step<Packet> {
    // The segment's bytes, by the IP header's own length.
    let available = l4.end.saturating_sub(l4.offset);
    if available < TCP_HDR_LEN {
        // A whole packet this short is malformed and dropped by the kernel.
        // A first fragment this short hides its flags and maybe its options
        // (RFC 1858); one shorter than 8 bytes is dropped by the kernel's
        // reassembly.
        if !l4.fragment || available < IPV6_EXTENSION_UNIT {
            return Err(Packet::Pass);
        }
        let ports = bytes_at(ctx, l4.offset, TCP_PORTS_END).ok_or(Packet::Pass)?;
        // SAFETY: within the TCP_PORTS_END bytes checked.
        let local_port = unsafe { u16::from_be_bytes([*ports.add(2), *ports.add(3)]) };
        return Err(if port_is_bound(local_port) {
            Packet::Unreadable
        } else {
            Packet::Pass
        });
    }
    let tcp = bytes_at(ctx, l4.offset, TCP_HDR_LEN).ok_or(Packet::Pass)?;
    // SAFETY: all reads are within the TCP_HDR_LEN bytes checked.
    let (flags, local_port, header_len) = unsafe {
        (
            *tcp.add(TCP_FLAGS_OFFSET),
            u16::from_be_bytes([*tcp.add(2), *tcp.add(3)]),
            ((*tcp.add(TCP_DATA_OFFSET) >> 4) as usize) * 4,
        )
    };
    // Anything but a SYN passes first (the flags are in the bytes checked),
    // then a SYN to a port nobody binds, before anything else is read.
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN || !port_is_bound(local_port) {
        return Err(Packet::Pass);
    }
    if header_len < TCP_HDR_LEN {
        // Malformed: the kernel drops it.
        return Err(Packet::Pass);
    }
    if header_len > available {
        // Options cut off: a malformed packet the kernel drops, or the first
        // piece of one it will reassemble.
        return Err(if l4.fragment {
            Packet::Unreadable
        } else {
            Packet::Pass
        });
    }
    // SAFETY: within the TCP_HDR_LEN bytes checked.
    let (remote_port, seq) = unsafe {
        (
            u16::from_be_bytes([*tcp, *tcp.add(1)]),
            u32::from_be_bytes([*tcp.add(4), *tcp.add(5), *tcp.add(6), *tcp.add(7)]),
        )
    };
    let reply = (link == LinkLayer::Ethernet && l4.plain && !l4.fragment).then_some(ReplyLayout {
        ip: l4.ip as u32,
        ipv6: l4.ipv6 as u32,
        seq,
    });
    let (local, remote) = if l4.ipv6 {
        let ip = bytes_at(ctx, l4.ip, IPV6_HLEN).ok_or(Packet::Pass)?;
        // SAFETY: the addresses end at byte 40, which was checked.
        unsafe {
            (
                [
                    word_at(ip, 24),
                    word_at(ip, 28),
                    word_at(ip, 32),
                    word_at(ip, 36),
                ],
                [
                    word_at(ip, 8),
                    word_at(ip, 12),
                    word_at(ip, 16),
                    word_at(ip, 20),
                ],
            )
        }
    } else {
        let ip = bytes_at(ctx, l4.ip, IPV4_MIN_HLEN).ok_or(Packet::Pass)?;
        // SAFETY: the addresses end at byte 20, which was checked.
        unsafe {
            (
                addr::ipv4_words(word_at(ip, 16)),
                addr::ipv4_words(word_at(ip, 12)),
            )
        }
    };
    let flow = FlowKey::from_words(local, remote, local_port, remote_port);
    Ok(Packet::Syn(Syn { flow, reply }))
}
