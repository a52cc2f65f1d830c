//! Action `reply` against hand-made packets: what a client could do with
//! the marks that steer refused SYNs to the responder, or with a flood of
//! forged sources, found by review and kept as tests.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use limiter_tests::{
    established,
    flood::send_syn,
    lab::{SERVER_V4, client_v4},
    rawtcp::{RawClient, Shape},
    scenario::{Scenario, alive, reply_connector, server_side},
    wait_until,
};

const SERVER: SocketAddrV4 = SocketAddrV4::new(SERVER_V4, 25);

fn from(s: &Scenario, source: Ipv4Addr) -> usize {
    established(s.lab.server_ns(), 25)
        .into_iter()
        .filter(|(_, remote)| remote.ip() == source)
        .count()
}

fn replied(s: &Scenario) -> u64 {
    s.limiter.cli_json(&["stats"])["replied"]
        .as_u64()
        .unwrap_or(0)
}

/// A client holds back the ACK of handshakes the responder answered with
/// SYN cookies until their marks are stale: steer no longer takes the ACK,
/// so the mail server's listener takes the cookie (the cookie secret is
/// the namespace's, not the listener's). Those connections are the
/// server's, and are counted and judged as such: the responder's own are
/// known by their socket's mark, not by the 4-tuple's. Here the server
/// answers every SYN with a cookie (as under a SYN flood).
#[test]
fn an_ack_after_the_mark_ttl_is_counted_and_judged_like_any_handshake() {
    let s = Scenario::start(&reply_connector("100", "1"));
    s.lab.server_ns().set_sysctl("net.ipv4.tcp_syncookies", "2");
    let source = client_v4(0);
    let _held = s.open(source, 1);
    assert_eq!(s.limiter.live("Frontend"), 1);
    let ports = 30_000..=30_003u16;
    let raw = RawClient::new(&s.lab, source, SERVER, ports.clone());
    let mut cookies = std::collections::HashMap::new();
    for port in ports.clone() {
        // One at a time: well within the gate.
        raw.syn(port, Shape::Plain);
        cookies.extend(raw.syn_acks(Duration::from_millis(300)));
    }
    assert_eq!(cookies.len(), 4, "the responder answered each: {cookies:?}");
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || replied(&s) == 4
    ));
    // Past the mark's TTL (10 s): steer no longer takes the ACK.
    std::thread::sleep(Duration::from_millis(10_500));
    for (port, isn) in &cookies {
        raw.ack(*port, *isn);
    }
    // Two sweeps and more: the daemon would have counted any connection it
    // saw held but uncounted.
    std::thread::sleep(Duration::from_secs(4));
    let at_server = from(&s, source);
    let live = s.limiter.live("Frontend");
    assert!(
        at_server <= 1 && live as usize == at_server,
        "cap 1 per source: the server holds {at_server} connections from {source}, the limiter counts {live}: {:?}",
        established(s.lab.server_ns(), 25)
    );
}

/// A source plants marks while its connector answers with `reply` (SYNs
/// whose SYN-ACKs its kernel resets, so the responder never accepts and
/// never forgets them); then the action changes. Its connections on those
/// 4-tuples are counted, and held to its cap, like any.
#[test]
fn marks_left_from_action_reply_let_no_source_past_its_cap_after_the_action_changes() {
    let s = Scenario::start(&reply_connector("100", "1"));
    let source = client_v4(0);
    let mut held = s.open(source, 1);
    let ports: Vec<u16> = (31_000..31_004).collect();
    // Plain raw SYNs: the client's kernel answers the responder's SYN-ACK
    // with a RST, so the responder never accepts and never forgets.
    for port in &ports {
        send_syn(&s.lab, source, *port, SERVER).expect("sending a SYN by hand");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
            replied(&s) == ports.len() as u64
        }),
        "{}",
        s.limiter.cli_json(&["stats"])
    );
    std::thread::sleep(Duration::from_millis(10_500));
    s.limiter
        .cli_ok(&["connector", "set", "Frontend", "--action", "drop"]);
    server_side(&mut held[0], "close");
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || s.limiter.live("Frontend") == 0
    ));
    let streams: Vec<TcpStream> = ports
        .iter()
        .filter_map(|port| {
            s.lab
                .connect_from_port(
                    SocketAddrV4::new(source, *port).into(),
                    SERVER.into(),
                    Duration::from_secs(2),
                )
                .ok()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let up = streams.iter().filter(|stream| alive(stream)).count();
    let at_server = from(&s, source);
    let live = s.limiter.live("Frontend");
    assert!(
        at_server <= 1 && live as usize == at_server,
        "cap 1 per source: {up} streams up, the server holds {at_server} from {source}, the limiter counts {live}"
    );
}

/// When the total cap refuses everyone, each forged source could draw a
/// SYN-ACK (a reflection the drop action never makes): each CPU makes 64
/// replies a second at most, whatever the sources.
#[test]
fn forged_sources_at_the_total_cap_draw_at_most_64_syn_acks_a_second_per_cpu() {
    let s = Scenario::start(&reply_connector("1", "\"unlimited\""));
    let _held = s.open(client_v4(0), 1);
    // The Internet: a route back to the forged sources.
    s.lab.server_ns().ip(&[
        "route",
        "add",
        "10.128.0.0/9",
        "via",
        &client_v4(0).to_string(),
    ]);
    let seconds = 3;
    let report = limiter_tests::flood::syn_flood(&s.lab, SERVER, 4096, 20_000, |sent| {
        sent < 20_000 * seconds
    })
    .expect("flooding");
    std::thread::sleep(Duration::from_secs(1));
    let stats = s.limiter.cli_json(&["stats"]);
    let replied = stats["replied"].as_u64().unwrap();
    let nstat = s
        .lab
        .server_ns()
        .command("nstat")
        .args([
            "-az",
            "TcpExtSyncookiesSent",
            "TcpExtListenOverflows",
            "TcpExtListenDrops",
            "TcpExtTCPSynRetrans",
            "TcpOutSegs",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let seconds = report.elapsed.as_secs() + 1;
    assert!(
        replied > 0 && replied <= 64 * cpus * seconds,
        "one flooder (4096 forged addresses) drew {replied} replies in {:?}: {stats}\n{nstat}",
        report.elapsed
    );
    assert_eq!(
        stats["replied"].as_u64().unwrap() + stats["reply_dropped"].as_u64().unwrap(),
        stats["rejected"].as_u64().unwrap(),
        "{stats}"
    );
}
