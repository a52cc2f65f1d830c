//! Finds the SYNs in a frame: Ethernet with up to two VLAN tags (802.1Q,
//! 802.1ad), IPv4 with options, IPv6 with extension headers, then TCP.
//! Every header is bounds-checked before it is read; anything unexpected is
//! [`Packet::Pass`], so the program fails open.

use aya_ebpf::programs::XdpContext;
use limiter_common::{addr, maps::FlowKey};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_TCP: u8 = 6;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;
/// Extension header lengths are counted in units of this many bytes.
const IPV6_EXTENSION_UNIT: usize = 8;
/// Extension headers followed before giving up (and passing the packet).
const IPV6_MAX_EXTENSION_HEADERS: usize = 4;

/// Bytes of the TCP header holding the ports.
const TCP_PORTS_END: usize = 4;
/// The TCP header without options: a SYN must carry it whole to count (a
/// shorter one is malformed and the kernel drops it).
pub const TCP_HDR_LEN: usize = 20;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_DATA_OFFSET: usize = 12;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the admission program needs to know about a frame.
pub enum Packet {
    /// Not a connection attempt: pass it untouched.
    Pass,
    /// A TCP SYN (no ACK, RST or FIN) to a bound port, seen from the server.
    Syn(Syn),
    /// The first fragment of a fragmented TCP segment to a bound port, too
    /// short to hold the TCP header: a SYN could hide behind it (RFC 1858).
    TinyFragment,
}

/// A SYN to admit or refuse.
pub struct Syn {
    pub flow: FlowKey,
    /// Where its headers are, when they are simple enough to turn the frame
    /// into a RST in place (no IP options, no IPv6 extension headers).
    pub reply: Option<ReplyLayout>,
}

/// Offsets of the headers of a SYN that can be answered in place: the TCP
/// header follows the IP header directly.
pub struct ReplyLayout {
    pub ip: usize,
    pub ipv6: bool,
    /// The SYN's sequence number.
    pub seq: u32,
}

/// Where the network header starts and what it is.
struct L3 {
    offset: usize,
    ether_type: u16,
}

/// Where the TCP header starts, where the addresses are, and whether the
/// segment is a first fragment (reassembled later by the kernel). The
/// addresses are only read once the segment turns out to be a SYN.
struct L4 {
    offset: usize,
    addresses: Addresses,
    fragment: bool,
}

enum Addresses {
    /// Offset of the IPv4 header.
    V4(usize),
    /// Offset of the IPv6 header.
    V6(usize),
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

/// Classifies a frame. `None` means it was cut short somewhere: pass it.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Option<Packet> {
    let l3 = ethernet(ctx)?;
    let l4 = match l3.ether_type {
        ETH_P_IP => ipv4(ctx, l3.offset)?,
        ETH_P_IPV6 => ipv6(ctx, l3.offset)?,
        _ => return Some(Packet::Pass),
    };
    let Some(l4) = l4 else {
        return Some(Packet::Pass);
    };
    tcp(ctx, l4)
}

#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Option<L3> {
    let mut offset = ETH_HLEN;
    let mut ether_type = u16_at(ctx, ETH_HLEN - 2)?;
    // QinQ at most: an outer 802.1ad (or 802.1Q) tag and an inner 802.1Q tag.
    let mut tag = 0;
    while tag < 2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = u16_at(ctx, offset + 2)?;
        offset += VLAN_HLEN;
        tag += 1;
    }
    Some(L3 { offset, ether_type })
}

/// `Some(None)`: not TCP, or a later fragment; pass it.
#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Option<Option<L4>> {
    // The fixed part, with a constant length the verifier can follow; the
    // options are covered by the TCP header's own check further on.
    let ip = bytes_at(ctx, offset, IPV4_MIN_HLEN)?;
    // SAFETY: all reads below are within the IPV4_MIN_HLEN bytes checked.
    let (version_ihl, protocol, fragment_field) = unsafe {
        (
            *ip,
            *ip.add(9),
            u16::from_be_bytes([*ip.add(6), *ip.add(7)]),
        )
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN || protocol != IPPROTO_TCP {
        return Some(None);
    }
    if fragment_field & IPV4_FRAG_OFFSET_MASK != 0 {
        // A later fragment carries no TCP header of its own.
        return Some(None);
    }
    Some(Some(L4 {
        offset: offset + header_len,
        addresses: Addresses::V4(offset),
        fragment: fragment_field & IPV4_MORE_FRAGMENTS != 0,
    }))
}

/// `Some(None)`: not TCP, or a later fragment; pass it.
#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Option<Option<L4>> {
    let ip = bytes_at(ctx, offset, IPV6_HLEN)?;
    // SAFETY: within the IPV6_HLEN bytes checked.
    let (version, mut next_header) = unsafe { (*ip >> 4, *ip.add(6)) };
    if version != 6 {
        return Some(None);
    }
    let mut header = offset + IPV6_HLEN;
    let mut fragment = false;
    let mut seen = 0;
    while seen < IPV6_MAX_EXTENSION_HEADERS && next_header != IPPROTO_TCP {
        // Every extension header is a multiple of 8 bytes: check 8 at once
        // and read them through that one pointer.
        let ext = bytes_at(ctx, header, IPV6_EXTENSION_UNIT)?;
        // SAFETY: within the IPV6_EXTENSION_UNIT bytes checked.
        let (next, length, offset_and_flags) = unsafe {
            (
                *ext,
                *ext.add(1),
                u16::from_be_bytes([*ext.add(2), *ext.add(3)]),
            )
        };
        match next_header {
            // Hop-by-hop options come first or not at all (RFC 8200 4.1).
            IPV6_HOP_BY_HOP if seen > 0 => return Some(None),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                header += (length as usize + 1) * IPV6_EXTENSION_UNIT;
            }
            IPV6_FRAGMENT => {
                if offset_and_flags >> 3 != 0 {
                    return Some(None);
                }
                fragment = offset_and_flags & 1 != 0;
                header += IPV6_EXTENSION_UNIT;
            }
            _ => return Some(None),
        }
        next_header = next;
        seen += 1;
    }
    if next_header != IPPROTO_TCP {
        return Some(None);
    }
    Some(Some(L4 {
        offset: header,
        addresses: Addresses::V6(offset),
        fragment,
    }))
}

/// Whether the IP header's own length holds `tcp_bytes` of the TCP header
/// and fits in the frame (else the kernel drops the packet as malformed).
#[inline(always)]
fn ip_length_holds(ctx: &XdpContext, l4: &L4, tcp_bytes: usize) -> Option<bool> {
    let (ip, ipv6) = match l4.addresses {
        Addresses::V4(ip) => (ip, false),
        Addresses::V6(ip) => (ip, true),
    };
    let fields = bytes_at(ctx, ip, 6)?;
    // SAFETY: 6 bytes checked.
    let length = unsafe {
        if ipv6 {
            IPV6_HLEN + u16::from_be_bytes([*fields.add(4), *fields.add(5)]) as usize
        } else {
            u16::from_be_bytes([*fields.add(2), *fields.add(3)]) as usize
        }
    };
    let in_frame = ctx.data_end() - ctx.data() - ip;
    Some(length >= l4.offset - ip + tcp_bytes && length <= in_frame)
}

#[inline(always)]
fn tcp(ctx: &XdpContext, l4: L4) -> Option<Packet> {
    let Some(tcp) = bytes_at(ctx, l4.offset, TCP_HDR_LEN) else {
        // A fragment's first piece always carries the ports (8 bytes at
        // least), but may stop before the flags: RFC 1858's tiny fragment.
        if !l4.fragment {
            return Some(Packet::Pass);
        }
        let ports = bytes_at(ctx, l4.offset, TCP_PORTS_END)?;
        // SAFETY: within the TCP_PORTS_END bytes checked.
        let local_port = unsafe { u16::from_be_bytes([*ports.add(2), *ports.add(3)]) };
        if !crate::count::port_is_bound(local_port) || !ip_length_holds(ctx, &l4, TCP_PORTS_END)? {
            return Some(Packet::Pass);
        }
        return Some(Packet::TinyFragment);
    };
    // SAFETY: all reads are within the TCP_HDR_LEN bytes checked.
    let flags = unsafe { *tcp.add(TCP_FLAGS_OFFSET) };
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return Some(Packet::Pass);
    }
    // SAFETY: as above.
    let local_port = unsafe { u16::from_be_bytes([*tcp.add(2), *tcp.add(3)]) };
    // A SYN to a port nobody binds passes before anything else is read.
    if !crate::count::port_is_bound(local_port) {
        return Some(Packet::Pass);
    }
    // SAFETY: as above.
    let (remote_port, seq) = unsafe {
        (
            u16::from_be_bytes([*tcp, *tcp.add(1)]),
            u32::from_be_bytes([*tcp.add(4), *tcp.add(5), *tcp.add(6), *tcp.add(7)]),
        )
    };
    let (ip, ipv6, plain_header) = match l4.addresses {
        Addresses::V4(ip) => (ip, false, IPV4_MIN_HLEN),
        Addresses::V6(ip) => (ip, true, IPV6_HLEN),
    };
    // A SYN the kernel will drop as malformed is not counted: its IP length
    // must fit in the frame and hold the whole TCP header, options included.
    // SAFETY: within the TCP_HDR_LEN bytes checked.
    let header_len = ((unsafe { *tcp.add(TCP_DATA_OFFSET) } >> 4) as usize) * 4;
    if header_len < TCP_HDR_LEN || !ip_length_holds(ctx, &l4, header_len)? {
        return Some(Packet::Pass);
    }
    let reply =
        (!l4.fragment && l4.offset == ip + plain_header).then_some(ReplyLayout { ip, ipv6, seq });
    let (local, remote) = match l4.addresses {
        Addresses::V4(offset) => {
            let ip = bytes_at(ctx, offset, IPV4_MIN_HLEN)?;
            // SAFETY: the addresses end at byte 20, which was checked.
            unsafe {
                (
                    addr::ipv4_words(word_at(ip, 16)),
                    addr::ipv4_words(word_at(ip, 12)),
                )
            }
        }
        Addresses::V6(offset) => {
            let ip = bytes_at(ctx, offset, IPV6_HLEN)?;
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
        }
    };
    let flow = FlowKey::from_words(local, remote, local_port, remote_port);
    Some(Packet::Syn(Syn { flow, reply }))
}
