//! The responder: answers a SYN refused with action `reply` as Exchange
//! does. The XDP program marks the refused SYN, the `steer` program hands
//! it to one of the listening sockets here instead of the mail server, and
//! this completes the handshake, writes the connector's `421` line and
//! closes. The mail server never sees the connection, and it never counts.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use limiter_common::maps::{FlowKey, RESPONDER_SOCKET_MARK, ReplyMark};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

use crate::{config::Config, selection::to_addr};

/// Connections the responder holds at once; beyond, a connection is closed
/// unanswered (the kernel's budget of replies a second keeps this far off).
const MAX_OPEN: usize = 512;
/// How long a sender has to take the line and close, after which the
/// responder resets the connection.
const LINGER: Duration = Duration::from_secs(3);

/// What the responder shares with the daemon: the kernel's marks and each
/// connector's line.
pub struct Replies {
    flows: Mutex<BpfHashMap<MapData, FlowKey, ReplyMark>>,
    /// Kernel connector id → the line its refused senders get.
    texts: Mutex<HashMap<u32, String>>,
    open: Arc<Semaphore>,
}

impl Replies {
    pub fn new(flows: BpfHashMap<MapData, FlowKey, ReplyMark>) -> Replies {
        Replies {
            flows: Mutex::new(flows),
            texts: Mutex::new(HashMap::new()),
            open: Arc::new(Semaphore::new(MAX_OPEN)),
        }
    }

    /// Takes each connector's `reply_text`; connector `i` of `config` has
    /// kernel id `ids[i]`.
    pub fn set_texts(&self, config: &Config, ids: &[u32]) {
        let texts = ids
            .iter()
            .zip(&config.connectors)
            .map(|(id, c)| (*id, c.reply_text.clone()))
            .collect();
        *self.texts.lock().expect("texts lock") = texts;
    }

    /// The line for a connection, by the connector that refused it.
    fn text_for(&self, flow: &FlowKey) -> String {
        let connector = self
            .flows
            .lock()
            .expect("flows lock")
            .get(flow, 0)
            .ok()
            .map(|mark| mark.connector);
        let texts = self.texts.lock().expect("texts lock");
        connector
            .and_then(|id| texts.get(&id).cloned())
            .unwrap_or_else(|| crate::config::EXCHANGE_REPLY.to_string())
    }

    fn forget(&self, flow: &FlowKey) {
        let _ = self.flows.lock().expect("flows lock").remove(flow);
    }
}

/// The responder's listening sockets, on loopback at ports the kernel
/// picks: nothing reaches them but what `steer` hands them. Each carries
/// [`RESPONDER_SOCKET_MARK`], and so does every connection it accepts. IPv6
/// is `None` where loopback has no `::1`.
pub fn listen() -> io::Result<(TcpListener, Option<TcpListener>)> {
    let ipv4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    set_int_option(
        &ipv4,
        libc::SOL_SOCKET,
        libc::SO_MARK,
        RESPONDER_SOCKET_MARK as i32,
    )?;
    let ipv6 = match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).and_then(|listener| {
        set_int_option(
            &listener,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            RESPONDER_SOCKET_MARK as i32,
        )?;
        Ok(listener)
    }) {
        Ok(listener) => Some(listener),
        Err(e) => {
            log::info!(
                "no IPv6 responder (binding [::1]: {e}): IPv6 senders refused by action reply are dropped"
            );
            None
        }
    };
    Ok((ipv4, ipv6))
}

/// Accepts what `steer` hands `listener` and answers each connection.
pub async fn serve(listener: TcpListener, replies: Arc<Replies>) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // taken: try again shortly.
                log::debug!("responder: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let flow = flow_of(local, peer);
        let Ok(permit) = replies.open.clone().try_acquire_owned() else {
            drop(stream);
            replies.forget(&flow);
            continue;
        };
        let replies = replies.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let text = replies.text_for(&flow);
            if tokio::time::timeout(LINGER, answer(&mut stream, &text))
                .await
                .is_err()
            {
                // A sender that neither reads nor closes: a RST frees the
                // socket at once (no orphan waiting for it to read).
                let _ = set_linger_zero(&stream);
            }
            drop(stream);
            replies.forget(&flow);
            drop(permit);
        });
    }
}

/// Writes the line and waits for the sender to close (it reads the line
/// before its connection is torn down, and may send QUIT), discarding
/// what it sends.
async fn answer(stream: &mut TcpStream, text: &str) -> io::Result<()> {
    stream.write_all(format!("{text}\r\n").as_bytes()).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 512];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

fn set_int_option(socket: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid descriptor and a buffer of the option's size.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_LINGER` on, with no time: the close resets the connection.
fn set_linger_zero(socket: &impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid descriptor and a buffer of the option's size.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The flow key of a connection, from the server's side.
fn flow_of(local: SocketAddr, peer: SocketAddr) -> FlowKey {
    FlowKey {
        local: to_addr(local.ip()),
        remote: to_addr(peer.ip()),
        local_port: local.port(),
        remote_port: peer.port(),
    }
}
