//! The kernel's own table of TCP sockets, through netlink sock_diag: what
//! `ss` shows. The daemon counts what it finds at start-up, keeps its counts
//! honest against it, and resets through it the connections the kernel
//! judged over a cap when their handshake completed (`SOCK_DESTROY`).

use std::{collections::HashSet, io, net::IpAddr};

use limiter_common::maps::{FlowKey, RESPONDER_SOCKET_MARK};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::selection::{from_addr, to_addr};

/// The states in which the server holds a connection: open, or half-closed
/// by the client (CLOSE_WAIT), which the server still serves.
fn held() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT
}

/// The connections of this network namespace that a server holds on a
/// local port in `ports`, as flow keys from the server's side (the
/// responder's left out).
pub fn held_connections(ports: &HashSet<u16>) -> io::Result<Vec<FlowKey>> {
    let mut flows = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, |id| {
            if ports.contains(&id.source_port) {
                flows.push(FlowKey {
                    local: to_addr(id.source_address),
                    remote: to_addr(id.destination_address),
                    local_port: id.source_port,
                    remote_port: id.destination_port,
                });
            }
        })?;
    }
    Ok(flows)
}

fn connect() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn send<T: NetlinkSerializable + std::fmt::Debug>(
    socket: &Socket,
    flags: u16,
    payload: T,
) -> io::Result<()>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

fn dump(family: u8, mut each: impl FnMut(&SocketId)) -> io::Result<()> {
    let socket = connect()?;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: held(),
            socket_id,
        }),
    )?;
    receive::<SockDiagMessage>(&socket, |message| {
        if let SockDiagMessage::InetResponse(response) = message {
            let id = &response.header.socket_id;
            // The responder's connections (action reply) are no server's;
            // the kernel gives a socket's mark to a privileged reader.
            let responders = response
                .nlas
                .iter()
                .any(|nla| matches!(nla, Nla::Mark(mark) if *mark == RESPONDER_SOCKET_MARK));
            // Only what a connection's addresses can be.
            if matches!(id.source_address, IpAddr::V4(_) | IpAddr::V6(_)) && !responders {
                each(id);
            }
        }
    })
}

/// Reads replies until the kernel says it is done (or acknowledges).
fn receive<T>(socket: &Socket, mut each: impl FnMut(T)) -> io::Result<()>
where
    T: NetlinkDeserializable,
{
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<T>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => each(inner),
                NetlinkPayload::Done(_) => return Ok(()),
                // An acknowledgement is an error message with code 0.
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Resets the connection `flow` of this network namespace whose socket has
/// cookie `socket_cookie` (`u64::MAX`: any), as `ss --kill` does: the
/// server's socket is aborted (its application sees ECONNABORTED) and the
/// client gets a RST. `Ok(false)`: no such socket (it closed meanwhile, or
/// the addresses belong to another socket now).
pub fn destroy(flow: &FlowKey, socket_cookie: u64) -> io::Result<bool> {
    let socket = connect()?;
    // An IPv4 connection is found by its IPv4 addresses, whichever family
    // the server's socket has (a dual-stack socket's is hashed as IPv4).
    let (local, remote) = (from_addr(&flow.local), from_addr(&flow.remote));
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: flow.local_port,
            destination_port: flow.remote_port,
            source_address: local,
            destination_address: remote,
            interface_id: 0,
            // Two 32-bit words, low first, each in host order.
            cookie: cookie_words(socket_cookie),
        },
    });
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(request),
    )?;
    match receive::<SockDiagDestroy>(&socket, |_| {}) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `struct inet_diag_sockid`'s cookie: two 32-bit words, low first.
fn cookie_words(cookie: u64) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    bytes[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    bytes
}

/// Whether this kernel can reset a socket from outside it (sock_diag
/// `SOCK_DESTROY`, `CONFIG_INET_DIAG_DESTROY`), and this process may: asked
/// for a socket that does not exist.
pub fn can_destroy() -> io::Result<()> {
    let nowhere = FlowKey {
        local: crate::selection::to_addr(std::net::Ipv4Addr::LOCALHOST.into()),
        remote: crate::selection::to_addr(std::net::Ipv4Addr::LOCALHOST.into()),
        local_port: 1,
        remote_port: 1,
    };
    destroy(&nowhere, u64::MAX).map(|_| ())
}
