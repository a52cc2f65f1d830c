//! [`Lab`]: a server and a client network namespace joined by a veth pair,
//! and the addresses they carry.
//!
//! | side   | IPv4                         | IPv6 (all /48, nodad)                                   |
//! |--------|------------------------------|---------------------------------------------------------|
//! | server | 10.77.0.1/24                 | fd77::1                                                 |
//! | client | 10.77.0.10 ..= 10.77.0.29/24 | fd77:0:0:1::10, ::11, ::12; fd77:0:0:2::10, fd77:0:0:3::10 |

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::{Netns, OwnedNetns};

/// The server's IPv4 address (10.77.0.1/24).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The server's IPv6 address (fd77::1/48).
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// How many IPv4 source addresses the client has ([`client_v4`]).
pub const CLIENT_V4_COUNT: usize = 20;
/// The client's IPv4 source addresses: 10.77.0.10 ..= 10.77.0.29.
pub const CLIENT_V4: [Ipv4Addr; CLIENT_V4_COUNT] = {
    let mut a = [Ipv4Addr::UNSPECIFIED; CLIENT_V4_COUNT];
    let mut i = 0;
    while i < CLIENT_V4_COUNT {
        a[i] = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
        i += 1;
    }
    a
};
/// Client IPv6 addresses that share one /64 (fd77:0:0:1::/64).
pub const CLIENT_V6_SAME64: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 0x10),
    Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 0x12),
];
/// Client IPv6 addresses in /64s of their own (fd77:0:0:2::10, fd77:0:0:3::10).
pub const CLIENT_V6_OTHER64: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd77, 0, 0, 2, 0, 0, 0, 0x10),
    Ipv6Addr::new(0xfd77, 0, 0, 3, 0, 0, 0, 0x10),
];
/// All client IPv6 addresses: the three of [`CLIENT_V6_SAME64`], then the
/// two of [`CLIENT_V6_OTHER64`].
pub const CLIENT_V6: [Ipv6Addr; 5] = [
    CLIENT_V6_SAME64[0],
    CLIENT_V6_SAME64[1],
    CLIENT_V6_SAME64[2],
    CLIENT_V6_OTHER64[0],
    CLIENT_V6_OTHER64[1],
];

/// The `i`-th client IPv4 address, 10.77.0.(10+i); panics unless `i < 20`.
pub fn client_v4(i: usize) -> Ipv4Addr {
    assert!(
        i < CLIENT_V4_COUNT,
        "client_v4({i}): the client has {CLIENT_V4_COUNT} IPv4 addresses"
    );
    CLIENT_V4[i]
}

/// The `i`-th client IPv6 address of [`CLIENT_V6`]; panics unless `i < 5`.
pub fn client_v6(i: usize) -> Ipv6Addr {
    assert!(
        i < CLIENT_V6.len(),
        "client_v6({i}): the client has {} IPv6 addresses",
        CLIENT_V6.len()
    );
    CLIENT_V6[i]
}

/// `10.77.0.1:port`.
pub fn server_v4(port: u16) -> SocketAddr {
    SocketAddr::new(SERVER_V4.into(), port)
}

/// `[fd77::1]:port`.
pub fn server_v6(port: u16) -> SocketAddr {
    SocketAddr::new(SERVER_V6.into(), port)
}

/// Two network namespaces, server (`lt{pid}x{n}s`) and client
/// (`lt{pid}x{n}c`), joined by a veth pair (`lt{pid}x{n}v` in the server,
/// `lt{pid}x{n}p` in the client), with the addresses of this module and:
/// client `net.ipv4.tcp_syn_retries=1` (covers IPv6 too: a dropped SYN gives
/// up after ~3 s), server `net.ipv4.tcp_synack_retries=1`.
///
/// Drop kills every process still in either namespace (e.g. servers started
/// with [`crate::spawn_in`] / [`crate::HoldServer`]) and deletes both
/// namespaces, which removes the veth pair.
#[derive(Debug)]
pub struct Lab {
    // Field order is drop order: the client first, then the server.
    client: OwnedNetns,
    server: OwnedNetns,
    server_iface: String,
    client_iface: String,
}

impl Lab {
    /// Creates and configures the two namespaces; panics on failure (after
    /// removing whatever it had already created).
    pub fn new() -> Lab {
        crate::require_root();
        let pid = std::process::id();
        // Skip numbers whose names exist already (left over by an earlier
        // process with the same pid that was killed).
        let (stem, server, client) = loop {
            let stem = format!("lt{pid}x{}", crate::next_id());
            assert!(
                stem.len() < 15,
                "name stem {stem} too long for a netns/link name"
            );
            let (s, c) = (format!("{stem}s"), format!("{stem}c"));
            if Netns::named(&s).path().exists() || Netns::named(&c).path().exists() {
                continue;
            }
            let server = OwnedNetns::create(&s);
            let client = OwnedNetns::create(&c);
            break (stem, server, client);
        };
        let lab = Lab {
            client,
            server,
            server_iface: format!("{stem}v"),
            client_iface: format!("{stem}p"),
        };
        // The veth is created directly inside the namespaces, never in the
        // caller's.
        lab.server.ip(&[
            "link",
            "add",
            &lab.server_iface,
            "type",
            "veth",
            "peer",
            "name",
            &lab.client_iface,
            "netns",
            lab.client.name(),
        ]);

        let mut s = vec![
            format!("link set {} up", lab.server_iface),
            format!("addr add {SERVER_V4}/24 dev {}", lab.server_iface),
            format!("addr add {SERVER_V6}/48 dev {} nodad", lab.server_iface),
        ];
        s.insert(0, "link set lo up".into());
        lab.server.ip_batch(&s);

        let mut c = vec![
            "link set lo up".to_string(),
            format!("link set {} up", lab.client_iface),
        ];
        for a in CLIENT_V4 {
            c.push(format!("addr add {a}/24 dev {}", lab.client_iface));
        }
        for a in CLIENT_V6 {
            c.push(format!("addr add {a}/48 dev {} nodad", lab.client_iface));
        }
        lab.client.ip_batch(&c);

        lab.client.set_sysctl("net.ipv4.tcp_syn_retries", "1");
        lab.server.set_sysctl("net.ipv4.tcp_synack_retries", "1");

        // veth carrier comes up once both ends are up; wait for it so the
        // first connect does not race the link.
        let up = crate::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            lab.server
                .ip(&["-o", "link", "show", "dev", &lab.server_iface])
                .contains("state UP")
                && lab
                    .client
                    .ip(&["-o", "link", "show", "dev", &lab.client_iface])
                    .contains("state UP")
        });
        assert!(
            up,
            "veth {}/{} did not come up",
            lab.server_iface, lab.client_iface
        );
        lab
    }

    /// The server namespace.
    pub fn server_ns(&self) -> &Netns {
        &self.server
    }

    /// The client namespace.
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// The veth end in the server namespace (where the limiter's XDP program
    /// attaches).
    pub fn server_iface(&self) -> &str {
        &self.server_iface
    }

    /// The veth end in the client namespace.
    pub fn client_iface(&self) -> &str {
        &self.client_iface
    }

    /// [`crate::connect_from`] run in the client namespace.
    pub fn connect(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.client.run(|| crate::connect_from(src, dst, timeout))
    }

    /// A connect from `src`, port included (reused if need be), to `dst`,
    /// run in the client namespace.
    pub fn connect_from_port(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.client.run(|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&socket2::SockAddr::from(src))?;
            socket.connect_timeout(&socket2::SockAddr::from(dst), timeout)?;
            Ok(socket.into())
        })
    }

    /// [`crate::connect_many_from`] run in the client namespace: `n`
    /// connects from `src` to `dst` whose SYNs all leave before any is
    /// waited on; results in order.
    pub fn connect_many(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> Vec<io::Result<TcpStream>> {
        self.client
            .run(|| crate::connect_many_from(src, dst, n, timeout))
    }

    /// [`crate::established`] in the server namespace: (local, remote) of the
    /// server's ESTABLISHED sockets on `port`.
    pub fn server_established(&self, port: u16) -> Vec<(SocketAddr, SocketAddr)> {
        crate::established(&self.server, port)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(client_v4(0).to_string(), "10.77.0.10");
        assert_eq!(client_v4(19).to_string(), "10.77.0.29");
        assert_eq!(SERVER_V6.to_string(), "fd77::1");
        assert_eq!(
            CLIENT_V6.map(|a| a.to_string()),
            [
                "fd77:0:0:1::10",
                "fd77:0:0:1::11",
                "fd77:0:0:1::12",
                "fd77:0:0:2::10",
                "fd77:0:0:3::10"
            ]
        );
        assert_eq!(server_v6(25).to_string(), "[fd77::1]:25");
    }

    #[test]
    #[should_panic(expected = "client_v4(20)")]
    fn client_v4_out_of_range() {
        client_v4(20);
    }
}
