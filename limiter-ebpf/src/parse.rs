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

use core::mem::offset_of;

use aya_ebpf::programs::XdpContext;
use limiter_common::{addr, maps::FlowKey};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};

pub use crate::maps::ReplyLayout;
use crate::maps::port_is_bound;

// The header layouts are network-types'; each field is read with a load of
// its own at its offset, checked against the bytes made readable, since a
// struct read of a whole header would copy bytes nobody needs.
const ETH_HLEN: usize = EthHdr::LEN;
const ETH_TYPE: usize = offset_of!(EthHdr, ether_type);
const VLAN_HLEN: usize = VlanHdr::LEN;
const VLAN_TYPE: usize = offset_of!(VlanHdr, ether_type);
// network-types stores EtherTypes in network order; `u16_at` reads them in
// host order.
const ETH_P_IP: u16 = u16::from_be(EtherType::Ipv4 as u16);
const ETH_P_IPV6: u16 = u16::from_be(EtherType::Ipv6 as u16);
const ETH_P_8021Q: u16 = u16::from_be(EtherType::Ieee8021q as u16);
const ETH_P_8021AD: u16 = u16::from_be(EtherType::Ieee8021ad as u16);
/// VLAN tags followed. The kernel strips nested priority tags (VLAN 0) one
/// after the other, so a frame with more is unreadable, not harmless.
const MAX_VLAN_TAGS: usize = 4;

pub const IPV4_MIN_HLEN: usize = Ipv4Hdr::LEN;
const IPV4_TOT_LEN: usize = offset_of!(Ipv4Hdr, tot_len);
const IPV4_FRAGS: usize = offset_of!(Ipv4Hdr, frags);
const IPV4_PROTO: usize = offset_of!(Ipv4Hdr, proto);
const IPV4_SRC: usize = offset_of!(Ipv4Hdr, src_addr);
const IPV4_DST: usize = offset_of!(Ipv4Hdr, dst_addr);
pub const IPV6_HLEN: usize = Ipv6Hdr::LEN;
const IPV6_PAYLOAD_LEN: usize = offset_of!(Ipv6Hdr, payload_len);
const IPV6_NEXT: usize = offset_of!(Ipv6Hdr, next_hdr);
const IPV6_SRC: usize = offset_of!(Ipv6Hdr, src_addr);
const IPV6_DST: usize = offset_of!(Ipv6Hdr, dst_addr);
pub const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
/// The first byte of an IPv4 header without options: version 4, five
/// 32-bit words.
const IPV4_PLAIN_VERSION_IHL: u8 = 0x45;

const IPV6_HOP_BY_HOP: u8 = IpProto::HopOpt as u8;
const IPV6_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPV6_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPV6_AUTH: u8 = IpProto::Ah as u8;
const IPV6_DEST_OPTIONS: u8 = IpProto::Ipv6Opts as u8;
/// Extension header lengths are counted in units of this many bytes (the
/// authentication header's in units of 4).
const IPV6_EXTENSION_UNIT: usize = 8;
/// Extension headers followed; a longer chain is unreadable.
const IPV6_MAX_EXTENSION_HEADERS: usize = 8;

const TCP_SOURCE: usize = offset_of!(TcpHdr, source);
const TCP_DEST: usize = offset_of!(TcpHdr, dest);
const TCP_SEQ: usize = offset_of!(TcpHdr, seq);
/// Bytes of the TCP header holding the ports.
const TCP_PORTS_END: usize = TCP_SEQ;
/// The TCP header without options.
pub const TCP_HDR_LEN: usize = TcpHdr::LEN;
/// The data offset's byte (its high nibble), then the flags' byte.
const TCP_DATA_OFFSET: usize = offset_of!(TcpHdr, _bitfield_1);
const TCP_FLAGS_OFFSET: usize = TCP_DATA_OFFSET + 1;
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
    if let Some(l4) = plain_ipv4(ctx, link)? {
        return tcp(ctx, l4, link);
    }
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

/// The fields of an IPv4 header's fixed part that the parsers judge.
#[derive(Clone, Copy)]
struct Ipv4Fixed {
    version_ihl: u8,
    total_len: usize,
    fragment_field: u16,
    protocol: u8,
}

impl Ipv4Fixed {
    /// # Safety
    ///
    /// `ip` must point at IPV4_MIN_HLEN bytes of the packet,
    /// bounds-checked.
    #[inline(always)]
    unsafe fn read(ip: *const u8) -> Ipv4Fixed {
        // SAFETY: the caller checked the bounds.
        unsafe {
            Ipv4Fixed {
                version_ihl: *ip,
                total_len: u16::from_be_bytes([*ip.add(IPV4_TOT_LEN), *ip.add(IPV4_TOT_LEN + 1)])
                    as usize,
                fragment_field: u16::from_be_bytes([*ip.add(IPV4_FRAGS), *ip.add(IPV4_FRAGS + 1)]),
                protocol: *ip.add(IPV4_PROTO),
            }
        }
    }

    /// Whether the frame holds the whole packet, the header at `offset`
    /// (a frame may also carry padding past it).
    #[inline(always)]
    fn held_whole(&self, ctx: &XdpContext, offset: usize) -> bool {
        offset + self.total_len <= ctx.data_end() - ctx.data()
    }
}

/// The common frame, read in a few loads: Ethernet without a VLAN tag,
/// then IPv4 without options, not a fragment, held whole by the frame; or
/// IPv4 that is not TCP, passed at once. Anything else (`Ok(None)`) is read
/// by the general path, which finds the same for these frames: this only
/// spares most traffic its branches.
#[inline(always)]
fn plain_ipv4(ctx: &XdpContext, link: LinkLayer) -> Step<Option<L4>> {
    if link != LinkLayer::Ethernet {
        return Ok(None);
    }
    let Some(frame) = bytes_at(ctx, 0, ETH_HLEN + IPV4_MIN_HLEN) else {
        return Ok(None);
    };
    // SAFETY: all reads are within the ETH_HLEN + IPV4_MIN_HLEN bytes
    // checked.
    let (ether_type, header) = unsafe {
        (
            u16::from_be_bytes([*frame.add(ETH_TYPE), *frame.add(ETH_TYPE + 1)]),
            Ipv4Fixed::read(frame.add(ETH_HLEN)),
        )
    };
    if ether_type != ETH_P_IP {
        return Ok(None);
    }
    if header.protocol != IPPROTO_TCP {
        // Whatever else the header says, `ipv4` passes it.
        return Err(Packet::Pass);
    }
    let plain = header.version_ihl == IPV4_PLAIN_VERSION_IHL
        && header.fragment_field & (IPV4_MORE_FRAGMENTS | IPV4_FRAG_OFFSET_MASK) == 0
        && header.total_len >= IPV4_MIN_HLEN
        && header.held_whole(ctx, ETH_HLEN);
    Ok(plain.then_some(L4 {
        offset: ETH_HLEN + IPV4_MIN_HLEN,
        end: ETH_HLEN + header.total_len,
        ip: ETH_HLEN,
        ipv6: false,
        fragment: false,
        plain: true,
    }))
}

#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Step<(usize, u16)> {
    let mut offset = ETH_HLEN;
    let mut ether_type = u16_at(ctx, ETH_TYPE).ok_or(Packet::Pass)?;
    let mut tag = 0;
    while tag < MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok((offset, ether_type));
        }
        ether_type = u16_at(ctx, offset + VLAN_TYPE).ok_or(Packet::Pass)?;
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
    // SAFETY: within the IPV4_MIN_HLEN bytes checked.
    let header = unsafe { Ipv4Fixed::read(ip) };
    let Ipv4Fixed {
        version_ihl,
        total_len,
        fragment_field,
        protocol,
    } = header;
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    // A header or a length the kernel drops as malformed, or a packet the
    // frame does not hold whole (dropped as truncated): nothing to count.
    if version_ihl >> 4 != 4
        || header_len < IPV4_MIN_HLEN
        || total_len < header_len
        || !header.held_whole(ctx, offset)
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
            u16::from_be_bytes([*ip.add(IPV6_PAYLOAD_LEN), *ip.add(IPV6_PAYLOAD_LEN + 1)]) as usize,
            *ip.add(IPV6_NEXT),
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
        let local_port =
            unsafe { u16::from_be_bytes([*ports.add(TCP_DEST), *ports.add(TCP_DEST + 1)]) };
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
            u16::from_be_bytes([*tcp.add(TCP_DEST), *tcp.add(TCP_DEST + 1)]),
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
            u16::from_be_bytes([*tcp.add(TCP_SOURCE), *tcp.add(TCP_SOURCE + 1)]),
            u32::from_be_bytes([
                *tcp.add(TCP_SEQ),
                *tcp.add(TCP_SEQ + 1),
                *tcp.add(TCP_SEQ + 2),
                *tcp.add(TCP_SEQ + 3),
            ]),
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
                    word_at(ip, IPV6_DST),
                    word_at(ip, IPV6_DST + 4),
                    word_at(ip, IPV6_DST + 8),
                    word_at(ip, IPV6_DST + 12),
                ],
                [
                    word_at(ip, IPV6_SRC),
                    word_at(ip, IPV6_SRC + 4),
                    word_at(ip, IPV6_SRC + 8),
                    word_at(ip, IPV6_SRC + 12),
                ],
            )
        }
    } else {
        let ip = bytes_at(ctx, l4.ip, IPV4_MIN_HLEN).ok_or(Packet::Pass)?;
        // SAFETY: the addresses end at byte 20, which was checked.
        unsafe {
            (
                addr::ipv4_words(word_at(ip, IPV4_DST)),
                addr::ipv4_words(word_at(ip, IPV4_SRC)),
            )
        }
    };
    let flow = FlowKey::from_words(local, remote, local_port, remote_port);
    Ok(Packet::Syn(Syn { flow, reply }))
}
