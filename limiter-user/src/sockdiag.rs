//! The kernel's own table of TCP sockets, read through netlink sock_diag:
//! what `ss` shows. The daemon counts what it finds at start-up and keeps
//! its counts honest against it.

use std::{collections::HashSet, io, net::IpAddr};

use limiter_common::maps::FlowKey;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::selection::to_addr;

/// The established TCP connections of this network namespace whose local
/// port is in `ports`, as flow keys from the server's side.
pub fn established(ports: &HashSet<u16>) -> io::Result<Vec<FlowKey>> {
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

fn dump(family: u8, mut each: impl FnMut(&SocketId)) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    // Only what a connection's addresses can be.
                    if matches!(id.source_address, IpAddr::V4(_) | IpAddr::V6(_)) {
                        each(id);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
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
