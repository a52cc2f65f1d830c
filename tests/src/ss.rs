//! Ground truth from the kernel: the TCP socket table of a namespace, as
//! `ss` (iproute2, sock_diag) reports it.

use std::net::{IpAddr, SocketAddr};

use crate::netns::Netns;
use crate::run_checked;

/// (local, remote) of every TCP socket in state ESTABLISHED whose local port
/// is `local_port`, in namespace `ns` (`ss -Htn state established`).
/// IPv4-mapped IPv6 addresses (`[::ffff:a.b.c.d]`) are reported as IPv4.
pub fn established(ns: &Netns, local_port: u16) -> Vec<(SocketAddr, SocketAddr)> {
    sockets_in_state(ns, "established", local_port)
}

/// (local, remote) of every established TCP socket whose local port is
/// `local_port` in `ns` but the limiter's responder's (action `reply`): the
/// mail server's connections. The responder's sockets carry its `SO_MARK`.
pub fn established_at_server(ns: &Netns, local_port: u16) -> Vec<(SocketAddr, SocketAddr)> {
    let not_responder = format!(
        "! ( fwmark = {:#x} )",
        limiter_common::maps::RESPONDER_SOCKET_MARK
    );
    let out = run_checked(
        ns.command("ss")
            .args(["-Htn", "state", "established"])
            .arg(&not_responder),
    );
    parse_ss(&out)
        .unwrap_or_else(|e| panic!("cannot parse `ss -Htn` output: {e}\n{out}"))
        .into_iter()
        .filter(|(l, _)| l.port() == local_port)
        .collect()
}

/// (local, remote) of every TCP socket in `state` (an `ss` state name such
/// as "established", "syn-recv", "time-wait", "close-wait", "fin-wait-2")
/// whose local port is `local_port`, in namespace `ns`.
pub fn sockets_in_state(ns: &Netns, state: &str, local_port: u16) -> Vec<(SocketAddr, SocketAddr)> {
    let out = run_checked(ns.command("ss").args(["-Htn", "state", state]));
    parse_ss(&out)
        .unwrap_or_else(|e| panic!("cannot parse `ss -Htn state {state}` output: {e}\n{out}"))
        .into_iter()
        .filter(|(l, _)| l.port() == local_port)
        .collect()
}

/// Parses `ss -Htn` lines into (local, remote) pairs. Columns that are not
/// addresses (state, queues, process) are skipped.
pub fn parse_ss(out: &str) -> Result<Vec<(SocketAddr, SocketAddr)>, String> {
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let addrs: Vec<SocketAddr> = line.split_whitespace().filter_map(parse_addr).collect();
        match addrs[..] {
            [local, remote] => v.push((local, remote)),
            _ => return Err(format!("expected two addresses in line {line:?}")),
        }
    }
    Ok(v)
}

/// Parses an `ss -n` address column: `10.0.0.1:25`, `[fd77::1]:25`,
/// `[::ffff:10.0.0.1]:25` (→ IPv4), with an optional `%iface` scope.
fn parse_addr(tok: &str) -> Option<SocketAddr> {
    let (host, port) = tok.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.split('%').next()?;
    let ip: IpAddr = host.parse().ok()?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_output() {
        let out = "0      0          10.77.0.1:2525      10.77.0.10:40000 \n\
                   0      0      [fd77::1]:2525 [fd77:0:0:1::10]:51234\n\
                   0      0      [::ffff:10.77.0.1]:25 [::ffff:10.77.0.11]:40001 users:((\"x\",pid=1,fd=3))\n\
                   ESTAB  0 0 [fe80::1%veth0]:22 [fe80::2%veth0]:5000\n";
        let v = parse_ss(out).unwrap();
        assert_eq!(
            v,
            vec![
                (
                    "10.77.0.1:2525".parse().unwrap(),
                    "10.77.0.10:40000".parse().unwrap()
                ),
                (
                    "[fd77::1]:2525".parse().unwrap(),
                    "[fd77:0:0:1::10]:51234".parse().unwrap()
                ),
                (
                    "10.77.0.1:25".parse().unwrap(),
                    "10.77.0.11:40001".parse().unwrap()
                ),
                (
                    "[fe80::1]:22".parse().unwrap(),
                    "[fe80::2]:5000".parse().unwrap()
                ),
            ]
        );
        assert!(parse_ss("garbage line\n").is_err());
        assert_eq!(parse_ss("").unwrap(), vec![]);
    }
}
