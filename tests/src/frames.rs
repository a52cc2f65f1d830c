//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: TCP over IPv4 (with
//! options, fragments) or IPv6 (with extension headers), behind VLAN tags.
//! Checksums are left zero: the XDP program does not look at them.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;

/// IPv6 extension headers.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTIONS: u8 = 60;
pub const IPV6_AUTH: u8 = 51;

/// A TCP segment (or another protocol's payload) in a frame.
#[derive(Clone, Debug)]
pub struct Segment {
    /// VLAN tags, outermost first: each is the TPID (0x8100 or 0x88a8).
    pub tags: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// IP protocol / IPv6 final next header.
    pub protocol: u8,
    /// IPv4 option bytes (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv4: (fragment offset in 8-byte units, more fragments).
    pub ipv4_fragment: Option<(u16, bool)>,
    /// IPv6 extension headers in order; a fragment header is written with
    /// `ipv6_fragment`.
    pub ipv6_extensions: Vec<u8>,
    /// IPv6 fragment header contents: (offset in 8-byte units, more).
    pub ipv6_fragment: (u16, bool),
    /// Bytes of TCP options (a multiple of 4, at most 40), counted in the
    /// data offset.
    pub tcp_options: usize,
    /// Bytes of the L4 header actually written (the whole TCP header, its
    /// options included, when not cut with [`Segment::l4_len`]).
    pub l4_len: Option<usize>,
    /// Bytes after the IP packet that its length does not count (Ethernet
    /// padding, or trailing junk).
    pub padding: usize,
    /// Fill in the IPv4 header and TCP checksums, as a real host's kernel
    /// checks them (the XDP program does not look at them).
    pub checksums: bool,
    /// The source MAC and the destination MAC of the frame.
    pub macs: ([u8; 6], [u8; 6]),
    /// VLAN ids of the tags (0: priority tags), in order; 100, 101, ...
    /// when not given.
    pub vlan_ids: Vec<u16>,
}

impl Segment {
    /// A SYN from `src:sport` to `dst:dport`.
    pub fn syn(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Segment {
            tags: Vec::new(),
            src: src.into(),
            dst: dst.into(),
            sport,
            dport,
            flags: SYN,
            protocol: IPPROTO_TCP,
            ipv4_options: 0,
            ipv4_fragment: None,
            ipv6_extensions: Vec::new(),
            ipv6_fragment: (0, false),
            tcp_options: 0,
            l4_len: None,
            padding: 0,
            checksums: false,
            macs: ([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1]),
            vlan_ids: Vec::new(),
        }
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn tags(mut self, tags: &[u16]) -> Self {
        self.tags = tags.to_vec();
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn ipv4_options(mut self, bytes: usize) -> Self {
        assert!(bytes.is_multiple_of(4) && bytes <= 40);
        self.ipv4_options = bytes;
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_fragment = Some((offset, more));
        self
    }

    pub fn ipv6_extensions(mut self, headers: &[u8]) -> Self {
        self.ipv6_extensions = headers.to_vec();
        self
    }

    pub fn ipv6_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv6_fragment = (offset, more);
        self
    }

    pub fn l4_len(mut self, len: usize) -> Self {
        self.l4_len = Some(len);
        self
    }

    pub fn tcp_options(mut self, bytes: usize) -> Self {
        assert!(bytes.is_multiple_of(4) && bytes <= 40);
        self.tcp_options = bytes;
        self
    }

    pub fn padding(mut self, bytes: usize) -> Self {
        self.padding = bytes;
        self
    }

    /// Valid checksums, for frames a real kernel is to accept.
    pub fn checksummed(mut self) -> Self {
        self.checksums = true;
        self
    }

    /// The frame goes from `source` to `destination` (MACs).
    pub fn macs(mut self, source: [u8; 6], destination: [u8; 6]) -> Self {
        self.macs = (source, destination);
        self
    }

    /// Priority tags (VLAN 0), `n` of them, as the kernel strips them.
    pub fn priority_tags(mut self, n: usize) -> Self {
        self.tags = vec![ETH_P_8021Q; n];
        self.vlan_ids = vec![0; n];
        self
    }

    fn l4(&self) -> Vec<u8> {
        let len = 20 + self.tcp_options;
        let mut tcp = vec![0u8; len];
        tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        tcp[12] = ((len / 4) as u8) << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        // Options: an MSS, then NOPs.
        if self.tcp_options >= 4 {
            tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
            for byte in tcp.iter_mut().skip(24) {
                *byte = 1;
            }
        }
        tcp.truncate(self.l4_len.unwrap_or(len));
        tcp
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        let (ether_type, network) = self.ip_packet();
        let (source, destination) = self.macs;
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&source);
        for (i, tpid) in self.tags.iter().enumerate() {
            let id = self.vlan_ids.get(i).copied().unwrap_or(100 + i as u16);
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&id.to_be_bytes());
        }
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(&network);
        frame
    }

    /// The IP packet alone, as an interface without a link layer (`wg0`,
    /// `tun0`) carries it.
    pub fn build_l3(&self) -> Vec<u8> {
        self.ip_packet().1
    }

    /// The ether type and the IP packet, padding included.
    fn ip_packet(&self) -> (u16, Vec<u8>) {
        let l4 = self.l4();
        let (ether_type, network) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let header_len = 20 + self.ipv4_options;
                let mut ip = vec![0u8; header_len];
                ip[0] = 0x40 | (header_len / 4) as u8;
                ip[2..4].copy_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
                let fragment = match self.ipv4_fragment {
                    Some((offset, more)) => offset | if more { 0x2000 } else { 0 },
                    None => 0x4000, // DF
                };
                ip[6..8].copy_from_slice(&fragment.to_be_bytes());
                ip[8] = 64;
                ip[9] = self.protocol;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                // Options: NOPs, then an end-of-list.
                for byte in ip.iter_mut().skip(20) {
                    *byte = 1;
                }
                if self.ipv4_options > 0 {
                    ip[header_len - 1] = 0;
                }
                let mut l4 = l4;
                if self.checksums {
                    let check = crate::flood::fold(crate::flood::sum(&ip));
                    ip[10..12].copy_from_slice(&check.to_be_bytes());
                    let mut pseudo = Vec::new();
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&[0, self.protocol]);
                    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                    tcp_checksum(&mut l4, pseudo);
                }
                ip.extend_from_slice(&l4);
                (ETH_P_IP, ip)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut extensions = Vec::new();
                let mut next_headers: Vec<u8> = self.ipv6_extensions.clone();
                next_headers.push(self.protocol);
                for (i, kind) in self.ipv6_extensions.iter().enumerate() {
                    let next = next_headers[i + 1];
                    let mut header = vec![0u8; 8];
                    header[0] = next;
                    if *kind == IPV6_FRAGMENT {
                        let (offset, more) = self.ipv6_fragment;
                        let field = (offset << 3) | u16::from(more);
                        header[2..4].copy_from_slice(&field.to_be_bytes());
                    } else if *kind == IPV6_AUTH {
                        // Length 2, in 4-byte units minus 2: 16 bytes.
                        header[1] = 2;
                        header.extend_from_slice(&[0u8; 8]);
                    } else if *kind == IPV6_ROUTING {
                        // Length 1: 16 bytes; type 0, no segments left.
                        header[1] = 1;
                        header.extend_from_slice(&[0u8; 8]);
                    } else {
                        // Length 0: 8 bytes, padded with a PadN option of
                        // four zeros (the kernel refuses longer padding).
                        header[2] = 1;
                        header[3] = 4;
                    }
                    extensions.extend_from_slice(&header);
                }
                let first = next_headers[0];
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((extensions.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = first;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                let mut l4 = l4;
                if self.checksums {
                    let mut pseudo = Vec::new();
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                    pseudo.extend_from_slice(&[0, 0, 0, self.protocol]);
                    tcp_checksum(&mut l4, pseudo);
                }
                ip.extend_from_slice(&extensions);
                ip.extend_from_slice(&l4);
                (ETH_P_IPV6, ip)
            }
            _ => panic!("mixed address families"),
        };
        let mut network = network;
        network.extend(std::iter::repeat_n(0u8, self.padding));
        (ether_type, network)
    }
}

/// Writes the TCP checksum of `l4` (checksum field zero), given its
/// pseudo-header.
fn tcp_checksum(l4: &mut [u8], mut pseudo: Vec<u8>) {
    if l4.len() < 18 {
        return;
    }
    pseudo.extend_from_slice(l4);
    let check = crate::flood::fold(crate::flood::sum(&pseudo));
    l4[16..18].copy_from_slice(&check.to_be_bytes());
}

/// An Ethernet header with VLAN `tags` (each a TPID) and `ether_type`.
pub fn ethernet(tags: &[u16], ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (i, tpid) in tags.iter().enumerate() {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut frame = ethernet(&[], ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0u8; 20]);
    frame
}
