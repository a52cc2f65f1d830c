//! The limiter tried as an attacker on the Internet would: held-back final
//! ACKs, SYNs forged with a real sender's address, floods of forged sources,
//! SYNs split across IP fragments or hidden behind header chains, half-closed
//! connections, and the deployments where the server's socket is not what
//! the packet shows (REDIRECT, DNAT into a container). Real TCP where it can
//! be, hand-made packets where it must be, all from the client namespace.
//!
//! The two promises under test: no source and no connector ever holds more
//! connections than its caps (beyond the moment it takes to reset one), and
//! no forger can cost a real sender the connections its caps allow.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{
    Cgroup, HoldServer, Lab, Limiter, OwnedNetns, established,
    flood::forge_syns,
    frames::{IPV6_DEST_OPTIONS, Segment},
    lab::{SERVER_V4, SERVER_V6, client_v4, client_v6, server_v4},
    rawtcp::{NftTable, RawClient, Shape, mac, send_frames},
    scenario::{ADMIT_WAIT, SETTLE, Scenario, alive, completing_together, connector, server_side},
    sockets_in_state, tcp_hold_bin, wait_until,
};

const SERVER: SocketAddrV4 = SocketAddrV4::new(SERVER_V4, 25);

/// How many of `streams` the server still holds, once the resets of those
/// over a cap are done.
fn still_up(s: &Scenario, streams: &[TcpStream], expected: usize) -> usize {
    wait_until(SETTLE, Duration::from_millis(50), || {
        streams.iter().filter(|stream| alive(stream)).count() == expected
    });
    let up = streams.iter().filter(|stream| alive(stream)).count();
    assert_eq!(up, expected, "{:?}", s.limiter.status());
    up
}

fn from(s: &Scenario, source: impl Into<IpAddr>) -> usize {
    let source = source.into();
    established(s.lab.server_ns(), 25)
        .into_iter()
        .filter(|(_, remote)| remote.ip() == source)
        .count()
}

#[test]
fn late_final_acks_never_leave_a_source_over_its_cap() {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    // The server keeps a half-open connection while it retransmits its
    // SYN-ACK, for many seconds.
    s.lab
        .server_ns()
        .set_sysctl("net.ipv4.tcp_synack_retries", "5");
    let source = client_v4(6);
    // Six handshakes whose last ACK reaches the server only after 2.5 s:
    // meanwhile the client thinks them open, the server holds six half-open
    // connections, and none of them counts, so every SYN passed.
    let streams = completing_together(&s.lab, source, 6, Duration::from_millis(2500));
    // Each was judged when it completed: two admitted, four reset.
    still_up(&s, &streams, 2);
    assert_eq!(from(&s, source), 2);
    assert_eq!(s.limiter.live("Frontend"), 2);
    let stats = s.limiter.cli_json(&["stats"]);
    assert_eq!(stats["rejected_late"], 4, "{stats}");
    let events = s.limiter.cli_ok(&["events", "--json"]);
    let late: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["late"] == true)
        .collect();
    assert!(!late.is_empty(), "{events}");
    assert!(
        late.iter()
            .all(|e| e["event_id"] == 1021 && e["rule"] == "per_source")
    );
    assert_eq!(
        late.iter()
            .map(|e| e["count"].as_u64().unwrap())
            .sum::<u64>(),
        4
    );
    s.assert_counts_match_ss();
}

/// How a forger's SYNs with a real sender's address are treated.
#[derive(Clone, Copy, Debug)]
enum Forgery {
    /// Valid: the real sender's kernel answers the SYN-ACKs with RSTs.
    AnsweredByRst,
    /// Valid, but the SYN-ACKs never reach anyone who would answer.
    Unanswered,
    /// A broken TCP checksum: the server's kernel drops the SYN.
    BadChecksum,
}

/// Forges SYNs from `src` at 100 a second until `stop`.
fn forge(lab: &Lab, src: Ipv4Addr, forgery: Forgery, stop: &AtomicBool) -> u64 {
    forge_syns(lab, src, SERVER, stop, |packet| {
        if matches!(forgery, Forgery::BadChecksum) {
            packet[36] ^= 0x5a;
        }
    })
}

fn forged_syns_never_lock_out_the_sender(forgery: Forgery) {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "5", 100));
    let sender = client_v4(0);
    let _lost_syn_acks = matches!(forgery, Forgery::Unanswered).then(|| {
        NftTable::new(
            s.lab.client_ns(),
            "ip",
            "nosynack",
            &format!(
                "chain in {{ type filter hook input priority 0; \
                 ip daddr {sender} tcp sport 25 tcp dport 20000-29999 drop; }}"
            ),
        )
    });
    let stop = AtomicBool::new(false);
    let (sent, held) = std::thread::scope(|scope| {
        let forger = scope.spawn(|| forge(&s.lab, sender, forgery, &stop));
        // Two seconds of forgery first: at the old default of 20 per
        // source, two forged SYNs a second were a lock-out.
        std::thread::sleep(Duration::from_secs(2));
        let held = s.open(sender, 5);
        s.refused(sender);
        stop.store(true, Ordering::Relaxed);
        (forger.join().unwrap(), held)
    });
    assert!(sent >= 150, "{sent} forged SYNs");
    assert_eq!(held.len(), 5);
    assert_eq!(s.limiter.live("Frontend"), 5);
    s.assert_counts_match_ss();
}

#[test]
fn forged_syns_answered_by_rst_never_lock_out_the_sender() {
    forged_syns_never_lock_out_the_sender(Forgery::AnsweredByRst);
}

#[test]
fn forged_syns_left_unanswered_never_lock_out_the_sender() {
    forged_syns_never_lock_out_the_sender(Forgery::Unanswered);
}

#[test]
fn forged_syns_with_a_bad_checksum_never_lock_out_the_sender() {
    forged_syns_never_lock_out_the_sender(Forgery::BadChecksum);
}

#[test]
fn forged_syns_from_hundreds_of_addresses_never_fill_the_total() {
    let s = Scenario::start(&connector(
        "Frontend",
        "[\"0.0.0.0/0\"]",
        "20",
        "\"unlimited\"",
        100,
    ));
    // The server can answer the forged sources (its SYN-ACKs go to the
    // client's namespace, which drops them): request sockets are made for
    // every forged SYN, as on the Internet.
    s.lab
        .server_ns()
        .ip(&["route", "add", "10.128.0.0/9", "via", "10.77.0.10"]);
    let stop = AtomicBool::new(false);
    let held = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            limiter_tests::flood::syn_flood(&s.lab, SERVER, 300, 200, |_| {
                !stop.load(Ordering::Relaxed)
            })
            .expect("flooding")
        });
        std::thread::sleep(Duration::from_secs(2));
        // New real senders get in, up to the total.
        let held: Vec<TcpStream> = (1..=6).flat_map(|i| s.open(client_v4(i), 3)).collect();
        stop.store(true, Ordering::Relaxed);
        println!("flood: {:?}", flood.join().unwrap());
        held
    });
    assert_eq!(held.len(), 18);
    assert_eq!(s.limiter.live("Frontend"), 18);
    s.assert_counts_match_ss();
}

#[test]
fn syns_split_across_fragments_never_pass_a_cap() {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    let source = client_v4(7);
    let raw = RawClient::new(&s.lab, source, SERVER, 20_000..=20_099);
    // The TCP options run on into the second fragment: the XDP program
    // cannot read the SYN whole, and drops it.
    for port in 20_000..20_006 {
        raw.syn(port, Shape::FragmentedInOptions);
    }
    assert!(raw.syn_acks(Duration::from_millis(500)).is_empty());
    assert_eq!(s.limiter.cli_json(&["stats"])["unreadable_dropped"], 6);
    // The first fragment holds the whole header: the SYNs are judged, and
    // pass (the source holds nothing yet)...
    let ports: Vec<u16> = (20_010..20_016).collect();
    for &port in &ports {
        raw.syn(port, Shape::FragmentedAfterHeader);
    }
    let syn_acks = raw.syn_acks(Duration::from_millis(500));
    assert_eq!(syn_acks.len(), 6, "{syn_acks:?}");
    // ...and when the handshakes complete, two are admitted and the rest
    // reset.
    let completed = Instant::now();
    for &port in &ports {
        raw.ack(port, syn_acks[&port]);
    }
    let received = raw.receive(Duration::from_millis(1500));
    // How long a connection over the cap lived: the last RST's arrival,
    // from the first ACK sent.
    if let Some(last) = received
        .iter()
        .filter(|r| r.flags & 0x04 != 0)
        .map(|r| r.at)
        .max()
    {
        println!(
            "over-cap connections reset within {:?} of completing",
            last - completed
        );
    }
    let reset = ports
        .iter()
        .filter(|port| RawClient::reset(&received, **port))
        .count();
    assert_eq!(reset, 4, "{received:?}");
    assert!(wait_until(SETTLE, Duration::from_millis(50), || from(
        &s, source
    ) == 2));
    assert_eq!(s.limiter.live("Frontend"), 2);
    assert_eq!(s.limiter.cli_json(&["stats"])["rejected_late"], 4);
    s.assert_counts_match_ss();
}

#[test]
fn deep_vlan_stacks_and_long_header_chains_never_carry_an_unjudged_syn() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let _server = HoldServer::start_with(
        tcp_hold_bin!(),
        &lab,
        Some(&cgroup),
        &["10.77.0.1:25", "[fd77::1]:25"],
    );
    let macs = (
        mac(lab.client_ns(), lab.client_iface()),
        mac(lab.server_ns(), lab.server_iface()),
    );
    let deep_vlan = |port| {
        Segment::syn(client_v4(8), port, SERVER_V4, 25)
            .priority_tags(5)
            .checksummed()
            .macs(macs.0, macs.1)
            .build()
    };
    let long_chain = |port| {
        Segment::syn(client_v6(3), port, SERVER_V6, 25)
            .ipv6_extensions(&[IPV6_DEST_OPTIONS; 9])
            .checksummed()
            .macs(macs.0, macs.1)
            .build()
    };
    // The client's kernel would answer the server's SYN-ACKs with RSTs,
    // ending the half-open connections this test looks for.
    let _no_resets = NftTable::new(
        lab.client_ns(),
        "inet",
        "noresets",
        "chain out { type filter hook output priority 0; tcp flags rst drop; }",
    );
    let half_open = |ipv6: bool| {
        sockets_in_state(lab.server_ns(), "syn-recv", 25)
            .into_iter()
            .filter(|(_, remote)| remote.is_ipv6() == ipv6)
            .count()
    };
    // Without the limiter the kernel takes both: it strips nested priority
    // tags one after the other, and follows any chain of extension headers.
    send_frames(&lab, &[deep_vlan(21_000), long_chain(21_000)]);
    assert!(
        wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
            half_open(false) == 1 && half_open(true) == 1
        }),
        "the kernel does not take such frames ({} IPv4, {} IPv6): this test proves nothing",
        half_open(false),
        half_open(true)
    );
    // With it, they are dropped and counted.
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "1", 100),
    );
    send_frames(&lab, &[deep_vlan(21_001), long_chain(21_001)]);
    std::thread::sleep(Duration::from_millis(300));
    let from_port = |port: u16| {
        sockets_in_state(lab.server_ns(), "syn-recv", 25)
            .iter()
            .filter(|(_, remote)| remote.port() == port)
            .count()
    };
    assert_eq!(from_port(21_001), 0);
    assert_eq!(limiter.cli_json(&["stats"])["unreadable_dropped"], 2);
    // Four priority tags are followed, and the SYN judged like any other.
    send_frames(
        &lab,
        &[Segment::syn(client_v4(8), 21_002, SERVER_V4, 25)
            .priority_tags(4)
            .checksummed()
            .macs(macs.0, macs.1)
            .build()],
    );
    assert!(wait_until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        || { from_port(21_002) == 1 }
    ));
    assert_eq!(limiter.cli_json(&["stats"])["syn_passed"], 1);
}

#[test]
fn half_closed_connections_count_until_the_server_closes_them() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    // A server that does not read (as Postfix's postscreen before it
    // greets): a client's FIN leaves its socket in CLOSE_WAIT, still open.
    let server = HoldServer::start_with(
        tcp_hold_bin!(),
        &lab,
        Some(&cgroup),
        &["--unread", "10.77.0.1:25"],
    );
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "3", 100),
    );
    let mut admitted = Vec::new();
    for _ in 0..10 {
        if let Ok(stream) = lab.connect(client_v4(9).into(), server_v4(25), ADMIT_WAIT) {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            admitted.push(stream);
        }
    }
    assert_eq!(admitted.len(), 3);
    assert!(wait_until(SETTLE, Duration::from_millis(20), || {
        sockets_in_state(lab.server_ns(), "close-wait", 25).len() == 3
    }));
    assert_eq!(limiter.status().live_total, 3);
    // Once the server closes them, they stop counting.
    drop(server);
    assert!(
        wait_until(SETTLE, Duration::from_millis(20), || limiter
            .status()
            .live_total
            == 0),
        "{:?}",
        limiter.status()
    );
}

/// A REDIRECT of port 25 to 2526, where the server listens, declared with
/// `forwarded_to` (or not); with SYN cookies answering every SYN, the
/// kernel's path that makes no request socket.
fn redirected(cookies: bool) {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    if cookies {
        lab.server_ns().set_sysctl("net.ipv4.tcp_syncookies", "2");
    }
    let _redirect = NftTable::new(
        lab.server_ns(),
        "ip",
        "redirect",
        "chain pre { type nat hook prerouting priority dstnat; \
         ip daddr 10.77.0.1 tcp dport 25 redirect to :2526; }",
    );
    let _server = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.77.0.1:2526"]);
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &format!(
            "{}forwarded_to = [\"10.77.0.1:2526\"]\n",
            connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100)
        ),
    );
    let connect = || lab.connect(client_v4(10).into(), server_v4(25), ADMIT_WAIT);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect().expect("within the cap")).collect();
    let refused = connect().expect_err("over the cap");
    assert_eq!(refused.kind(), ErrorKind::TimedOut);
    assert_eq!(limiter.live("Frontend"), 2);
    // Closed on the server's side, on its own port, a connection is
    // released.
    server_side(&mut held[0], "close");
    assert!(wait_until(SETTLE, Duration::from_millis(20), || limiter
        .live("Frontend")
        == 1));
    held.push(connect().expect("a place is free again"));
    let sources = limiter.cli_json(&["sources"]);
    assert_eq!(sources[0]["live"], 2, "{sources}");
    assert_eq!(sources[0]["source"], "10.77.0.20");
    // Handshakes completing together there are judged like any others.
    for stream in &mut held {
        server_side(stream, "close");
    }
    assert!(wait_until(SETTLE, Duration::from_millis(20), || limiter
        .live("Frontend")
        == 0));
    let burst = completing_together(&lab, client_v4(10), 5, Duration::from_millis(200));
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || {
            burst.iter().filter(|stream| alive(stream)).count() == 2
        }),
        "{:?}",
        limiter.status()
    );
    assert_eq!(limiter.live("Frontend"), 2);
}

#[test]
fn a_redirect_to_another_port_is_counted_where_the_server_listens() {
    redirected(false);
}

#[test]
fn a_redirect_is_counted_when_syn_cookies_answer_every_syn() {
    redirected(true);
}

#[test]
fn an_undeclared_redirect_is_named_in_a_warning_and_in_status() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let _redirect = NftTable::new(
        lab.server_ns(),
        "ip",
        "redirect",
        "chain pre { type nat hook prerouting priority dstnat; \
         ip daddr 10.77.0.1 tcp dport 25 redirect to :2526; }",
    );
    let _server = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.77.0.1:2526"]);
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100),
    );
    let _held: Vec<TcpStream> = (0..3)
        .map(|_| {
            lab.connect(client_v4(10).into(), server_v4(25), ADMIT_WAIT)
                .expect("nothing counts them")
        })
        .collect();
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || {
            limiter.status().undeclared_forwards == ["10.77.0.1:2526"]
        }),
        "{:?}",
        limiter.status()
    );
    let log = limiter.log();
    assert!(
        log.contains("end up at 10.77.0.1:2526")
            && log.contains("forwarded_to = [\"10.77.0.1:2526\"]"),
        "{log}"
    );
    assert!(limiter.cli_ok(&["status"]).contains("10.77.0.1:2526"));
    assert!(
        limiter.cli_json(&["stats"])["undeclared_forwards"]
            .as_u64()
            .unwrap()
            >= 3
    );
}

/// A "container": a network namespace behind the lab's server, reached
/// through a veth and Docker-style DNAT of port 25 on the server's address.
struct Container {
    ns: OwnedNetns,
    _dnat: NftTable,
}

impl Container {
    const ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

    fn new(lab: &Lab) -> Container {
        let ns = OwnedNetns::new();
        let (outside, inside) = (format!("{}o", ns.name()), format!("{}i", ns.name()));
        lab.server_ns().ip(&[
            "link",
            "add",
            &outside,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            ns.name(),
        ]);
        lab.server_ns().ip_batch(&[
            format!("addr add 172.31.0.1/24 dev {outside}"),
            format!("link set {outside} up"),
        ]);
        ns.ip_batch(&[
            format!("addr add {}/24 dev {inside}", Self::ADDR),
            format!("link set {inside} up"),
            "route add default via 172.31.0.1".to_string(),
        ]);
        lab.server_ns().set_sysctl("net.ipv4.ip_forward", "1");
        let dnat = NftTable::new(
            lab.server_ns(),
            "ip",
            "docker",
            &format!(
                "chain pre {{ type nat hook prerouting priority dstnat; \
                 ip daddr 10.77.0.1 tcp dport 25 dnat to {}:25; }}",
                Self::ADDR
            ),
        );
        Container { ns, _dnat: dnat }
    }
}

/// A container behind DNAT, declared with `forwarded_to`; with SYN cookies
/// answering every SYN in the container, or not.
fn containerised(cookies: bool) {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let container = Container::new(&lab);
    if cookies {
        container.ns.set_sysctl("net.ipv4.tcp_syncookies", "2");
    }
    let _server = HoldServer::start_in(
        tcp_hold_bin!(),
        &container.ns,
        Some(&cgroup),
        &["172.31.0.2:25"],
    );
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &format!(
            "{}forwarded_to = [\"172.31.0.2:25\"]\n",
            connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100)
        ),
    );
    let source = client_v4(11);
    let connect = || lab.connect(source.into(), server_v4(25), ADMIT_WAIT);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect().expect("within the cap")).collect();
    assert_eq!(
        connect().expect_err("over the cap").kind(),
        ErrorKind::TimedOut
    );
    assert_eq!(limiter.live("Frontend"), 2);
    assert_eq!(limiter.cli_json(&["stats"])["forwarded"], 2);
    // Released when the container's server closes them.
    for stream in &mut held {
        server_side(stream, "close");
    }
    assert!(wait_until(SETTLE, Duration::from_millis(20), || limiter
        .live("Frontend")
        == 0));
    // Handshakes completing together: judged as each completes in the
    // container, and those over the cap reset there.
    let burst = completing_together(&lab, source, 6, Duration::from_millis(200));
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || {
            burst.iter().filter(|stream| alive(stream)).count() == 2
        }),
        "{:?}\n{}",
        limiter.status(),
        limiter.log()
    );
    assert_eq!(limiter.live("Frontend"), 2);
    let in_container = established(&container.ns, 25);
    assert_eq!(in_container.len(), 2, "{in_container:?}");
}

#[test]
fn a_container_behind_dnat_is_counted_and_reset_in_its_namespace() {
    containerised(false);
}

#[test]
fn a_container_behind_dnat_is_counted_when_syn_cookies_answer_every_syn() {
    containerised(true);
}

#[test]
fn without_the_daemon_nothing_forged_holds_a_place_and_resets_wait_for_its_return() {
    let mut s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    s.limiter.kill();
    // Handshakes a scanner abandons hold nothing, daemon or not.
    let scanner: IpAddr = client_v4(12).into();
    let route = format!("{scanner}/32");
    s.lab.server_ns().ip(&["route", "add", "blackhole", &route]);
    for _ in 0..10 {
        let _ = s
            .lab
            .connect(scanner, server_v4(25), Duration::from_millis(100));
    }
    s.lab.server_ns().ip(&["route", "del", "blackhole", &route]);
    let _scanner_held = s.open(scanner, 2);
    s.refused(scanner);
    // Handshakes completing together over the cap: the kernel judges each
    // and asks for the resets; with no daemon to do them, they wait.
    let source = client_v4(13);
    let burst = completing_together(&s.lab, source, 6, Duration::from_millis(200));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(from(&s, source), 6, "a reset without a daemon?");
    let started = Instant::now();
    s.limiter.spawn();
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || {
            burst.iter().filter(|stream| alive(stream)).count() == 2
        }),
        "{:?}",
        s.limiter.status()
    );
    println!("reset {:?} after the restart", started.elapsed());
    assert_eq!(from(&s, source), 2);
    assert_eq!(s.limiter.live("Frontend"), 4);
    s.assert_counts_match_ss();
}
