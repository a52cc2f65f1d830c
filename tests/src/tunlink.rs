//! [`TunLink`]: a point-to-point IP link between a lab's client and server
//! namespaces over two tun devices and a relay, as a VPN (WireGuard, say)
//! gives a mail server an interface without a link layer: frames on it are
//! bare IP packets.
//!
//! | side   | device        | address       |
//! |--------|---------------|---------------|
//! | server | `{stem}ts`    | 10.78.0.1/30  |
//! | client | `{stem}tc`    | 10.78.0.2/30  |

use std::{
    fs::{File, OpenOptions},
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use crate::{Lab, Netns};

/// The server's address on the link.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The client's address on the link.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The two tun devices and the relay between them; both go on drop.
pub struct TunLink {
    server_iface: String,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

/// Opens `/dev/net/tun` as a new tun device `name` in `ns`.
fn open_tun(ns: &Netns, name: &str) -> File {
    ns.run(|| -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: a zeroed ifreq is valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
            *slot = *byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: a valid tun fd and ifreq.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    })
    .unwrap_or_else(|e| panic!("creating tun device {name}: {e}"))
}

/// Copies packets from `from` to `to` until `stop`.
fn relay(from: File, to: File, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let mut poll = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: a valid fd and buffer.
            let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                // SAFETY: as above; a lost packet is what a link may do.
                unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
            }
        }
    })
}

impl TunLink {
    pub fn new(lab: &Lab) -> TunLink {
        let stem = format!("tl{}x{}", std::process::id() % 100_000, crate::next_id());
        let (server_iface, client_iface) = (format!("{stem}ts"), format!("{stem}tc"));
        let server = open_tun(lab.server_ns(), &server_iface);
        let client = open_tun(lab.client_ns(), &client_iface);
        lab.server_ns().ip_batch(&[
            format!("addr add {SERVER}/30 dev {server_iface}"),
            format!("link set {server_iface} up"),
        ]);
        lab.client_ns().ip_batch(&[
            format!("addr add {CLIENT}/30 dev {client_iface}"),
            format!("link set {client_iface} up"),
        ]);
        let stop = Arc::new(AtomicBool::new(false));
        let dup = |f: &File| {
            // SAFETY: dup of a valid fd, owned by the new File.
            unsafe { File::from_raw_fd(libc::dup(f.as_raw_fd())) }
        };
        let relays = vec![
            relay(dup(&client), dup(&server), stop.clone()),
            relay(server, client, stop.clone()),
        ];
        TunLink {
            server_iface,
            stop,
            relays,
        }
    }

    /// The server's tun device.
    pub fn server_iface(&self) -> &str {
        &self.server_iface
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The devices go with their last fd, which the relays hold.
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
    }
}
