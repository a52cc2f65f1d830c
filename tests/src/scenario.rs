//! [`Scenario`]: a lab, a tracked cgroup, a hold server on port 25 in it,
//! the real daemon, and the moves tests make with real connections.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::Duration,
};

use crate::{
    Cgroup, HoldServer, Lab, Limiter,
    daemon::Launch,
    established,
    lab::{server_v4, server_v6},
    rawtcp::NftTable,
    wait_until,
};

/// Long enough for an admitted SYN to be answered on a veth; a dropped SYN
/// is retransmitted only after 1 s, so a shorter wait sees only the first.
pub const ADMIT_WAIT: Duration = Duration::from_millis(800);
/// How long a test waits for the daemon to notice a change.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A lab, a tracked cgroup, a server on port 25 (IPv4 and IPv6) and 2525
/// in it, and the limiter. Fields drop in order: the daemon first.
pub struct Scenario {
    pub limiter: Limiter,
    pub server: HoldServer,
    pub cgroup: Cgroup,
    pub lab: Lab,
}

/// The ports the hold server listens on.
pub const LISTEN: &[&str] = &["10.77.0.1:25", "[fd77::1]:25", "10.77.0.1:2525"];

impl Scenario {
    /// Everything, with the limiter on `config`.
    pub fn start(config: &str) -> Scenario {
        Self::start_with(Some(config), &[])
    }

    /// Like [`Scenario::start`], with [`Limiter::start_with`]'s options.
    pub fn start_with(config: Option<&str>, extra: &[&str]) -> Scenario {
        Self::start_launched(config, extra, Launch::default())
    }

    /// Like [`Scenario::start_with`], the daemon started as `launch` says.
    pub fn start_launched(config: Option<&str>, extra: &[&str], launch: Launch) -> Scenario {
        let lab = Lab::new();
        let cgroup = Cgroup::new();
        let server = HoldServer::start(&lab, Some(&cgroup), LISTEN);
        let limiter = Limiter::start_launched(&lab, &cgroup, config, extra, launch);
        Scenario {
            limiter,
            server,
            cgroup,
            lab,
        }
    }
}

/// A connector on port 25 (IPv4 and IPv6) in config-file form.
pub fn connector(name: &str, ranges: &str, max: &str, per_source: &str, pct: u32) -> String {
    format!(
        "[[connector]]\nname = \"{name}\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
         remote_ip_ranges = {ranges}\nmax_inbound_connection = {max}\n\
         max_inbound_connection_per_source = {per_source}\n\
         max_inbound_connection_percentage_per_source = {pct}\n"
    )
}

/// [`connector`] "Frontend" on every remote address, with these caps (the
/// percentage rule off) and action `reply`.
pub fn reply_connector(max: &str, per_source: &str) -> String {
    format!(
        "{}action = \"reply\"\n",
        connector(
            "Frontend",
            "[\"0.0.0.0/0\", \"::/0\"]",
            max,
            per_source,
            100
        )
    )
}

impl Scenario {
    /// Connects from `src` to the server's port 25 of the same family.
    pub fn connect(&self, src: impl Into<IpAddr>) -> std::io::Result<TcpStream> {
        let src = src.into();
        let dst = if src.is_ipv4() {
            server_v4(25)
        } else {
            server_v6(25)
        };
        self.lab.connect(src, dst, ADMIT_WAIT)
    }

    /// Opens `n` connections from `src`, each of which must be admitted.
    pub fn open(&self, src: impl Into<IpAddr> + Copy, n: usize) -> Vec<TcpStream> {
        (0..n)
            .map(|i| {
                self.connect(src).unwrap_or_else(|e| {
                    panic!(
                        "connection {} of {n} from {} was refused: {e}\n{}",
                        i + 1,
                        src.into(),
                        self.limiter.log()
                    )
                })
            })
            .collect()
    }

    /// A connection from `src` must be refused (its SYN dropped).
    pub fn refused(&self, src: impl Into<IpAddr> + Copy) {
        match self.connect(src) {
            Ok(s) => panic!(
                "a connection from {} was admitted ({:?}); status: {:?}",
                src.into(),
                s.local_addr(),
                self.limiter.status()
            ),
            Err(e) => assert_eq!(e.kind(), ErrorKind::TimedOut, "from {}: {e}", src.into()),
        }
    }

    /// The daemon's live count equals what the kernel's socket table holds
    /// on port 25 (once resets of connections over a cap are done).
    pub fn assert_counts_match_ss(&self) {
        let ok = wait_until(SETTLE, Duration::from_millis(50), || {
            let status = self.limiter.status();
            status.live_total as usize == established(self.lab.server_ns(), 25).len()
        });
        assert!(
            ok,
            "live counts {:?} != ss {:?}",
            self.limiter.status(),
            established(self.lab.server_ns(), 25)
        );
    }
}

/// Whether the server still holds `stream`: no RST (nor FIN) has come back
/// within a moment. Reads nothing it would miss: the hold server sends
/// nothing unasked.
pub fn alive(stream: &TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("setting a read timeout");
    let mut buf = [0u8; 1];
    match std::io::Read::read(&mut &*stream, &mut buf) {
        Ok(_) => false,
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// Waits until the server has reset `stream` (a connection judged over a
/// cap when its handshake completed); false if it is still up after
/// [`SETTLE`].
pub fn reset_by_server(stream: &TcpStream) -> bool {
    wait_until(SETTLE, Duration::from_millis(10), || !alive(stream))
}

/// Whether a connection attempt completed its handshake and was then reset
/// by the server: a connected stream that dies, or, when the reset came
/// before the connecting thread woke up, a connect that fails with
/// "connection reset" (a refused SYN times out instead).
pub fn completed_then_reset(attempt: std::io::Result<TcpStream>) -> bool {
    match attempt {
        Ok(stream) => reset_by_server(&stream),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Asks the server to close (or reset) its side of `stream`.
pub fn server_side(stream: &mut TcpStream, command: &str) {
    stream
        .write_all(format!("{command}\n").as_bytes())
        .expect("sending the command");
}

/// Sends `line` and returns the server's echo.
pub fn echo(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    BufReader::new(&*stream).read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// `n` connections from `source` whose last ACKs are held back (a client's
/// nftables rule drops them) until `hold` has passed, then let through with
/// data: every SYN passes while the source holds nothing, and the
/// handshakes complete together, each judged as it does.
pub fn completing_together(
    lab: &Lab,
    source: Ipv4Addr,
    n: usize,
    hold: Duration,
) -> Vec<TcpStream> {
    let held_back = NftTable::new(
        lab.client_ns(),
        "ip",
        "holdacks",
        &format!(
            "chain out {{ type filter hook output priority 0; \
             ip saddr {source} tcp dport 25 tcp flags & (syn | ack | fin | rst | psh) == ack drop; }}"
        ),
    );
    let mut streams: Vec<TcpStream> = (0..n)
        .map(|_| {
            lab.connect(source.into(), server_v4(25), ADMIT_WAIT)
                .expect("the client's side completes")
        })
        .collect();
    std::thread::sleep(hold);
    drop(held_back);
    for stream in &mut streams {
        stream.write_all(b"hello\n").expect("writing");
    }
    streams
}
