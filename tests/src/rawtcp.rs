//! A TCP client made of hand-made packets, in a lab's client namespace, as
//! an attacker on the Internet would send them: SYNs in any shape (split
//! across IP fragments, with a broken checksum, from a sender's address),
//! and the last ACK of a handshake sent when the test says.
//!
//! The client's own kernel would answer the server's SYN-ACKs with RSTs
//! (it knows of no such connection): a [`RawClient`] drops those with an
//! nftables rule in the client namespace, removed on drop.

use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    Lab, Netns,
    flood::{fold, sum},
    next_id, run_checked, try_run,
};

/// How a SYN is put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One packet, 20 bytes of TCP options.
    Plain,
    /// Two IP fragments: the first holds the whole TCP header, options and
    /// all; the second 8 bytes of data the SYN carries.
    FragmentedAfterHeader,
    /// Two IP fragments: the first holds 24 bytes of the TCP header; its
    /// options run on into the second.
    FragmentedInOptions,
    /// One packet whose TCP checksum is wrong: the server's kernel drops it.
    BadChecksum,
}

const TCP_OPTIONS: usize = 20;
const SYN_DATA: usize = 8;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// A SYN's (and its ACK's) sequence number: the port, spread out.
fn isn(sport: u16) -> u32 {
    0x1000_0000 ^ (sport as u32).wrapping_mul(2_654_435_761)
}

/// An IPv4 header for `payload_len` bytes of TCP, fragment field
/// `fragment` (offset in 8-byte units, more-fragments bit), checksum right.
fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    fragment: u16,
    payload_len: usize,
) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&fragment.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let check = fold(sum(&ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

/// A TCP segment from `src:sport` to `dst`, checksum right: `options` bytes
/// of options (an MSS, then NOPs), and `data`.
fn tcp_segment(
    src: Ipv4Addr,
    sport: u16,
    dst: SocketAddrV4,
    (seq, ack, flags): (u32, u32, u8),
    options: usize,
    data: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options;
    let mut tcp = vec![0u8; header_len];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = ((header_len / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    if options >= 4 {
        tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        for byte in &mut tcp[24..] {
            *byte = 1;
        }
    }
    tcp.extend_from_slice(data);
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let check = fold(sum(&pseudo));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    tcp
}

/// The IP packets of a SYN from `src:sport` to `dst` in `shape`.
pub fn syn_packets(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, shape: Shape) -> Vec<Vec<u8>> {
    let data: &[u8] = match shape {
        Shape::FragmentedAfterHeader | Shape::FragmentedInOptions => &[0x42; SYN_DATA],
        _ => &[],
    };
    let mut tcp = tcp_segment(src, sport, dst, (isn(sport), 0, SYN), TCP_OPTIONS, data);
    let id = sport;
    let whole = |tcp: &[u8]| -> Vec<u8> {
        let mut packet = ipv4_header(src, *dst.ip(), id, 0x4000, tcp.len()).to_vec();
        packet.extend_from_slice(tcp);
        packet
    };
    match shape {
        Shape::Plain => vec![whole(&tcp)],
        Shape::BadChecksum => {
            tcp[16] ^= 0x5a;
            vec![whole(&tcp)]
        }
        Shape::FragmentedAfterHeader | Shape::FragmentedInOptions => {
            // A cut at a multiple of 8 bytes, as fragments must be.
            let cut = if shape == Shape::FragmentedAfterHeader {
                20 + TCP_OPTIONS
            } else {
                24
            };
            let more_fragments = 0x2000;
            let mut first = ipv4_header(src, *dst.ip(), id, more_fragments, cut).to_vec();
            first.extend_from_slice(&tcp[..cut]);
            let rest = &tcp[cut..];
            let mut second = ipv4_header(src, *dst.ip(), id, (cut / 8) as u16, rest.len()).to_vec();
            second.extend_from_slice(rest);
            vec![first, second]
        }
    }
}

/// An nftables table in a namespace, deleted on drop.
pub struct NftTable {
    ns: Netns,
    family: &'static str,
    name: String,
}

impl NftTable {
    /// Creates table `family name` with `body` (chains and rules, in nft
    /// syntax) in `ns`.
    pub fn new(ns: &Netns, family: &'static str, stem: &str, body: &str) -> NftTable {
        let name = format!("{stem}{}", next_id());
        let rules = format!("table {family} {name} {{\n{body}\n}}\n");
        let path =
            std::env::temp_dir().join(format!("limiter-test-{}-{name}.nft", std::process::id()));
        std::fs::write(&path, rules).expect("writing nft rules");
        let loaded = try_run(ns.command("nft").arg("-f").arg(&path));
        let _ = std::fs::remove_file(&path);
        if let Err(e) = loaded {
            panic!("nft rules for {name} in {}: {e}", ns.name());
        }
        NftTable {
            ns: ns.clone(),
            family,
            name,
        }
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        // The namespace may be gone with the lab already.
        if self.ns.path().exists() {
            let _ =
                try_run(
                    self.ns
                        .command("nft")
                        .args(["delete", "table", self.family, &self.name]),
                );
        }
    }
}

/// A hand-made TCP client from `src` in the client namespace, on source
/// ports in `ports`.
pub struct RawClient {
    src: Ipv4Addr,
    dst: SocketAddrV4,
    send: Socket,
    receive: Socket,
    _no_kernel_resets: NftTable,
}

/// A segment the client received.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// When it was read.
    pub at: Instant,
    pub from_port: u16,
    pub to_port: u16,
    pub seq: u32,
    pub flags: u8,
}

impl RawClient {
    pub fn new(
        lab: &Lab,
        src: Ipv4Addr,
        dst: SocketAddrV4,
        ports: RangeInclusive<u16>,
    ) -> RawClient {
        let guard = NftTable::new(
            lab.client_ns(),
            "ip",
            "rawtcp",
            &format!(
                "chain out {{ type filter hook output priority 0; \
                 ip saddr {src} tcp sport {}-{} tcp flags rst drop; }}",
                ports.start(),
                ports.end()
            ),
        );
        let (send, receive) = lab
            .client_ns()
            .run(|| -> io::Result<(Socket, Socket)> {
                let send = Socket::new(
                    Domain::IPV4,
                    Type::RAW,
                    Some(Protocol::from(libc::IPPROTO_RAW)),
                )?;
                let receive = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
                receive.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((send, receive))
            })
            .expect("raw sockets in the client namespace");
        RawClient {
            src,
            dst,
            send,
            receive,
            _no_kernel_resets: guard,
        }
    }

    fn send_packet(&self, packet: &[u8]) {
        let to = SockAddr::from(self.dst);
        self.send
            .send_to(packet, &to)
            .expect("sending a raw packet");
    }

    /// Sends a SYN from `sport` in `shape`.
    pub fn syn(&self, sport: u16, shape: Shape) {
        for packet in syn_packets(self.src, sport, self.dst, shape) {
            self.send_packet(&packet);
        }
    }

    /// Sends the last ACK of the handshake from `sport`, whose SYN-ACK
    /// carried `server_isn`.
    pub fn ack(&self, sport: u16, server_isn: u32) {
        let tcp = tcp_segment(
            self.src,
            sport,
            self.dst,
            (isn(sport).wrapping_add(1), server_isn.wrapping_add(1), ACK),
            0,
            &[],
        );
        let mut packet = ipv4_header(self.src, *self.dst.ip(), sport, 0x4000, tcp.len()).to_vec();
        packet.extend_from_slice(&tcp);
        self.send_packet(&packet);
    }

    /// Segments from the server to this client until `timeout`.
    pub fn receive(&self, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        while Instant::now() < deadline {
            let Ok(n) = self.receive.recv(&mut buf) else {
                continue;
            };
            // SAFETY: recv initialized the first n bytes.
            let packet: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if packet.len() < 40
                || packet[12..16] != self.dst.ip().octets()
                || packet[16..20] != self.src.octets()
            {
                continue;
            }
            let tcp = &packet[((packet[0] & 0x0f) as usize) * 4..];
            if tcp.len() < 20 {
                continue;
            }
            let from_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            if from_port != self.dst.port() {
                continue;
            }
            out.push(Received {
                at: Instant::now(),
                from_port,
                to_port: u16::from_be_bytes([tcp[2], tcp[3]]),
                seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                flags: tcp[13],
            });
        }
        out
    }

    /// The server's ISN in each SYN-ACK received within `timeout`, by port.
    pub fn syn_acks(&self, timeout: Duration) -> std::collections::HashMap<u16, u32> {
        self.receive(timeout)
            .into_iter()
            .filter(|r| r.flags & (SYN | ACK) == SYN | ACK)
            .map(|r| (r.to_port, r.seq))
            .collect()
    }

    /// Whether a RST to `sport` is among `received`.
    pub fn reset(received: &[Received], sport: u16) -> bool {
        received
            .iter()
            .any(|r| r.to_port == sport && r.flags & RST != 0)
    }
}

/// Sends Ethernet `frames` out of the client's end of the lab's veth
/// (AF_PACKET), as a host on the wire would.
pub fn send_frames(lab: &Lab, frames: &[Vec<u8>]) {
    let iface = lab.client_iface().to_string();
    let frames = frames.to_vec();
    lab.client_ns().run(move || {
        let index = std::ffi::CString::new(iface).expect("a name");
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(index.as_ptr()) };
        assert!(ifindex != 0, "no client interface");
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", io::Error::last_os_error());
        // SAFETY: a zeroed sockaddr_ll is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        for frame in &frames {
            to.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: a valid socket, buffer and address.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(sent, frame.len() as isize, "{}", io::Error::last_os_error());
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    });
}

/// The MAC address of `iface` in `ns`.
pub fn mac(ns: &Netns, iface: &str) -> [u8; 6] {
    let out = run_checked(ns.command("ip").args(["-o", "link", "show", "dev", iface]));
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a MAC address");
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_split_at_the_stated_places_and_checksums_verify() {
        let src = Ipv4Addr::new(10, 77, 0, 10);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 25);
        let whole = syn_packets(src, 20000, dst, Shape::Plain);
        assert_eq!(whole.len(), 1);
        assert_eq!(fold(sum(&whole[0][..20])), 0);
        let mut pseudo = vec![10, 77, 0, 10, 10, 77, 0, 1, 0, 6, 0, 40];
        pseudo.extend_from_slice(&whole[0][20..]);
        assert_eq!(fold(sum(&pseudo)), 0, "the TCP checksum verifies");
        let bad = syn_packets(src, 20000, dst, Shape::BadChecksum);
        let mut pseudo = vec![10, 77, 0, 10, 10, 77, 0, 1, 0, 6, 0, 40];
        pseudo.extend_from_slice(&bad[0][20..]);
        assert_ne!(fold(sum(&pseudo)), 0);
        for (shape, first_tcp) in [
            (Shape::FragmentedAfterHeader, 40),
            (Shape::FragmentedInOptions, 24),
        ] {
            let parts = syn_packets(src, 20000, dst, shape);
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[0].len(), 20 + first_tcp);
            assert_eq!(u16::from_be_bytes([parts[0][6], parts[0][7]]), 0x2000);
            assert_eq!(
                u16::from_be_bytes([parts[1][6], parts[1][7]]),
                (first_tcp / 8) as u16
            );
            assert_eq!(parts[1].len(), 20 + 40 + SYN_DATA - first_tcp);
            assert!(parts.iter().all(|p| fold(sum(&p[..20])) == 0));
        }
    }
}
