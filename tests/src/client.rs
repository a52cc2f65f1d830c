//! TCP clients with a chosen source address and bounded connects. Run them in
//! the client namespace ([`crate::Lab::connect`], or inside
//! [`crate::Netns::run`]).

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Creates a non-blocking TCP socket bound to `src` (port 0) and starts a
/// connect to `dst`: the SYN is on its way when this returns. `Ok(true)` in
/// the second field means the connect already completed.
fn start_connect(src: IpAddr, dst: SocketAddr) -> io::Result<(Socket, bool)> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {src} and destination {dst} are of different families"),
        ));
    }
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    // Pick the port at connect time, by 4-tuple, so that many connections
    // from one source do not exhaust bind()'s port choice.
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer; failure is harmless.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    match sock.connect(&SockAddr::from(dst)) {
        Ok(()) => Ok((sock, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((sock, false)),
        Err(e) => Err(e),
    }
}

/// The outcome of a connect that poll() reported as done.
fn finish_connect(sock: Socket) -> io::Result<TcpStream> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    // POLLOUT without a pending error: connected (peer_addr confirms).
    sock.peer_addr()?;
    sock.set_nonblocking(false)?;
    Ok(sock.into())
}

fn timed_out(dst: SocketAddr, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connect to {dst} timed out after {timeout:?}"),
    )
}

/// Connects to `dst` from source address `src` (port chosen by the kernel),
/// giving up after `timeout` with an error of kind `TimedOut` (a SYN that
/// is dropped). A refused connect (RST) is `ConnectionRefused`. The stream is
/// returned in blocking mode. Uses the calling thread's network namespace.
pub fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_many_from(src, dst, 1, timeout).pop().unwrap()
}

/// Starts `n` connects from `src` to `dst` at once (every SYN is sent before
/// any connect is waited on), then polls them together until all are done or
/// `timeout` (counted from the start) has passed; unfinished ones are
/// `TimedOut`. Results are in the order the connects were started. Uses the
/// calling thread's network namespace.
pub fn connect_many_from(
    src: IpAddr,
    dst: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Vec<io::Result<TcpStream>> {
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<io::Result<TcpStream>>> = (0..n).map(|_| None).collect();
    let mut pending: Vec<(usize, Socket)> = Vec::with_capacity(n);
    for (i, slot) in results.iter_mut().enumerate() {
        match start_connect(src, dst) {
            Ok((sock, true)) => *slot = Some(finish_connect(sock)),
            Ok((sock, false)) => pending.push((i, sock)),
            Err(e) => *slot = Some(Err(e)),
        }
    }
    while !pending.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(_, s)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: fds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for (i, _) in pending.drain(..) {
                results[i] = Some(Err(io::Error::new(e.kind(), format!("poll: {e}"))));
            }
            break;
        }
        let mut still = Vec::with_capacity(pending.len());
        for ((i, sock), pfd) in pending.into_iter().zip(&fds) {
            if pfd.revents != 0 {
                results[i] = Some(finish_connect(sock));
            } else {
                still.push((i, sock));
            }
        }
        pending = still;
    }
    // Whatever is left timed out; dropping the socket aborts the connect.
    for (i, _sock) in pending {
        results[i] = Some(Err(timed_out(dst, timeout)));
    }
    results
        .into_iter()
        .map(|r| r.expect("every connect has a result"))
        .collect()
}
