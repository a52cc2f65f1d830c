//! tcp-hold: a TCP server that holds connections open for tests.
//!
//! Usage: `tcp-hold [--unread] ADDR:PORT [ADDR:PORT ...]` (IPv6 as
//! `[::]:25`; IPv6 listeners are IPV6_V6ONLY so a v4 and a v6 listener can
//! share a port).
//!
//! Prints `listening` on stdout once every listener is bound. Each
//! connection is served by its own thread, line by line:
//! - `close` → the server closes the connection (FIN);
//! - `reset` → the server closes with SO_LINGER {on, 0}, so a RST is sent;
//! - any other line is echoed back;
//! - EOF from the client → the server closes.
//!
//! With `--unread`, a connection is accepted and never read: the server
//! holds it until it exits, also once the client has half-closed it (as a
//! busy MTA, or Postfix's postscreen before it reads, does).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let unread = args.first().is_some_and(|a| a == "--unread");
    if unread {
        args.remove(0);
    }
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: tcp-hold [--unread] ADDR:PORT [ADDR:PORT ...]");
        std::process::exit(2);
    }
    raise_nofile_limit();
    let listeners: Vec<(SocketAddr, TcpListener)> = args
        .iter()
        .map(|a| {
            let addr: SocketAddr = a
                .parse()
                .unwrap_or_else(|e| fail(&format!("bad address {a:?}: {e}")));
            let l = bind(addr).unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
            (addr, l)
        })
        .collect();
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening");
        let _ = out.flush();
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|(addr, l)| std::thread::spawn(move || accept_loop(addr, l, unread)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("tcp-hold: {msg}");
    std::process::exit(1);
}

/// Hundreds of connections need more than the usual 1024 fds' worth of
/// headroom: raise the soft limit to the hard one.
fn raise_nofile_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer / in pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    // A deep accept queue so a burst of SYNs is not dropped by the server.
    s.listen(4096)?;
    Ok(s.into())
}

fn accept_loop(addr: SocketAddr, l: TcpListener, unread: bool) {
    let mut held = Vec::new();
    loop {
        match l.accept() {
            Ok((stream, _peer)) if unread => held.push(stream),
            Ok((stream, _peer)) => {
                let spawned = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || serve(stream));
                if let Err(e) = spawned {
                    eprintln!("tcp-hold: {addr}: cannot spawn a connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("tcp-hold: {addr}: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = &stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            // EOF (or a partial last line followed by EOF) or an error: close.
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with(b"\n") => return,
            Ok(_) => {
                let cmd = line.strip_suffix(b"\n").unwrap();
                let cmd = cmd.strip_suffix(b"\r").unwrap_or(cmd);
                match cmd {
                    b"close" => return,
                    b"reset" => {
                        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    _ => {
                        if writer.write_all(&line).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}
