//! Action `reply`: a sender over a cap gets Exchange's 421 line from the
//! daemon's responder, and the mail server never sees the connection.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use limiter_tests::{
    established,
    flood::{send_syn, spoofed_source, syn_flood},
    lab::{client_v4, client_v6, server_v4},
    scenario::{Scenario, alive, connector, reply_connector, server_side},
    wait_until,
};

const EXCHANGE: &str = "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel";

/// Connects from `src`: the handshake must complete, and the first line
/// the sender reads is returned, with whether the connection closed after it.
fn first_line(s: &Scenario, src: impl Into<IpAddr> + Copy) -> (String, bool) {
    let stream = s.connect(src).unwrap_or_else(|e| {
        panic!(
            "a refused sender must get a reply, not {e}\n{}",
            s.limiter.log()
        )
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("reading the reply");
    let mut rest = String::new();
    let closed = matches!(reader.read_line(&mut rest), Ok(0));
    (line, closed)
}

fn stats(s: &Scenario) -> serde_json::Value {
    s.limiter.cli_json(&["stats"])
}

#[test]
fn over_the_cap_a_sender_reads_the_421_line_and_the_server_never_sees_it() {
    let s = Scenario::start(&reply_connector("100", "2"));
    let held = s.open(client_v4(0), 2);
    let (line, closed) = first_line(&s, client_v4(0));
    assert_eq!(line, format!("{EXCHANGE}\r\n"));
    assert!(closed, "the responder closes after its line");
    // Neither the server nor the counts saw it; the held ones carry on.
    assert_eq!(established(s.lab.server_ns(), 25).len(), 2);
    assert_eq!(s.limiter.live("Frontend"), 2);
    assert!(held.iter().all(alive));
    let stats = stats(&s);
    assert_eq!(stats["replied"], 1, "{stats}");
    assert_eq!(stats["rejected_per_source"], 1, "{stats}");
    assert_eq!(stats["reply_dropped"], 0, "{stats}");
    // Another source is admitted as before.
    let _other = s.open(client_v4(1), 2);
    assert_eq!(s.limiter.live("Frontend"), 4);
    s.assert_counts_match_ss();
    // The refusal is reported as Exchange's event, with the action.
    let events = s.limiter.cli_ok(&["events", "--json"]);
    let event: serde_json::Value = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|e: &serde_json::Value| e["event_id"] == 1021)
        .unwrap_or_else(|| panic!("no event 1021 in {events}"));
    assert_eq!(event["action"], "reply", "{event}");
}

#[test]
fn the_configured_text_reaches_ipv6_senders() {
    let custom = "421 4.7.0 mx.lab.test too many connections from your host, try later";
    let s = Scenario::start(&format!(
        "{}reply_text = \"{custom}\"\n",
        reply_connector("100", "1")
    ));
    let _held = s.open(client_v6(0), 1);
    let (line, closed) = first_line(&s, client_v6(0));
    assert_eq!(line, format!("{custom}\r\n"));
    assert!(closed);
    assert_eq!(s.limiter.live("Frontend"), 1);
    assert_eq!(established(s.lab.server_ns(), 25).len(), 1);
    // Changed at run time, the next sender gets the new text.
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Frontend",
        "--reply-text",
        "421 4.3.2 busy",
    ]);
    let (line, _) = first_line(&s, client_v6(0));
    assert_eq!(line, "421 4.3.2 busy\r\n");
    let shown = s.limiter.cli_ok(&["connector", "show", "Frontend"]);
    assert!(shown.contains("421 4.3.2 busy"), "{shown}");
}

#[test]
fn a_connector_switched_to_reply_at_run_time_replies() {
    let s = Scenario::start(&connector(
        "Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "100",
        "1",
        100,
    ));
    let _held = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
    s.limiter
        .cli_ok(&["connector", "set", "Frontend", "--action", "reply"]);
    let (line, closed) = first_line(&s, client_v4(0));
    assert_eq!(line, format!("{EXCHANGE}\r\n"));
    assert!(closed);
    assert_eq!(s.limiter.live("Frontend"), 1);
}

#[test]
fn a_sender_that_talks_first_still_gets_the_line() {
    // A client that does not wait for the greeting (and one that never
    // reads) must not hold the responder or reach the server.
    let s = Scenario::start(&reply_connector("100", "1"));
    let _held = s.open(client_v4(0), 1);
    let mut stream = s.connect(client_v4(0)).expect("handshake");
    stream.write_all(b"EHLO pipelined.example\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line, format!("{EXCHANGE}\r\n"));
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| s.connect(client_v4(0)).expect("handshake"))
        .collect();
    assert_eq!(established(s.lab.server_ns(), 25).len(), 1);
    // Read late, each holds the line and the end of the connection.
    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut all = String::new();
        std::io::Read::read_to_string(&mut stream, &mut all).expect("line, then EOF");
        assert_eq!(all, format!("{EXCHANGE}\r\n"));
    }
    assert_eq!(s.limiter.live("Frontend"), 1);
}

#[test]
fn a_flood_from_one_source_gets_no_more_replies_than_the_gate_allows() {
    let s = Scenario::start(&reply_connector("1", "\"unlimited\""));
    let _held = s.open(client_v4(0), 1);
    let seconds = 3;
    let dst = SocketAddrV4::new(*server_v4_ip(), 25);
    let report = syn_flood(&s.lab, dst, 1, 5_000, |sent| sent < 5_000 * seconds).expect("flooding");
    let settled = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let stats = stats(&s);
        stats["replied"].as_u64().unwrap() + stats["reply_dropped"].as_u64().unwrap() >= report.sent
    });
    let stats = stats(&s);
    assert!(settled, "{stats} after {report:?}");
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let elapsed = report.elapsed.as_secs() + 2;
    let replied = stats["replied"].as_u64().unwrap();
    // 4 a second per CPU for one source, whatever it sends.
    assert!(
        (1..=4 * cpus * elapsed).contains(&replied),
        "{replied} replies to {} SYNs from {} in {:?}: {stats}",
        report.sent,
        spoofed_source(0),
        report.elapsed
    );
    assert_eq!(
        stats["reply_dropped"].as_u64().unwrap() + replied,
        report.sent,
        "{stats}"
    );
    // The real sender is still answered once the flood's second is over.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(s.limiter.live("Frontend"), 1);
    assert_eq!(established(s.lab.server_ns(), 25).len(), 1);
}

#[test]
fn a_forged_syn_cannot_plant_a_421_for_a_later_real_connection() {
    // An attacker forges a SYN from a sender over its cap, on the port the
    // sender will use next: it is refused and marked for the responder. Once
    // the sender has a free slot, its real SYN from that port is admitted
    // and reaches the server, not the responder.
    let s = Scenario::start(&reply_connector("100", "1"));
    let mut held = s.open(client_v4(0), 1);
    let dst = SocketAddrV4::new(*server_v4_ip(), 25);
    let port = 40_000;
    send_syn(&s.lab, client_v4(0), port, dst).expect("sending a SYN by hand");
    let replied = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        stats(&s)["replied"] == 1
    });
    assert!(replied, "{}", stats(&s));
    server_side(&mut held[0], "close");
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || s.limiter.live("Frontend") == 0
    ));
    let stream = s
        .lab
        .connect_from_port(
            SocketAddrV4::new(client_v4(0), port).into(),
            dst.into(),
            Duration::from_secs(3),
        )
        .expect("the real sender connects");
    assert!(alive(&stream), "the server holds it: no 421, no close");
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || s.limiter.live("Frontend") == 1
    ));
    assert_eq!(established(s.lab.server_ns(), 25).len(), 1);
}

fn server_v4_ip() -> &'static std::net::Ipv4Addr {
    static IP: std::sync::OnceLock<std::net::Ipv4Addr> = std::sync::OnceLock::new();
    IP.get_or_init(|| match server_v4(25) {
        std::net::SocketAddr::V4(v4) => *v4.ip(),
        _ => unreachable!("server_v4 is IPv4"),
    })
}

#[test]
fn where_the_responder_cannot_listen_a_reply_is_a_drop_and_the_start_says_so() {
    // Without loopback's ::1 the responder has nowhere to listen for IPv6:
    // IPv6 senders over the cap are dropped, and the log says so; IPv4
    // ones are still answered (steering needs no loopback route).
    let lab = limiter_tests::Lab::new();
    let cgroup = limiter_tests::Cgroup::new();
    let _server =
        limiter_tests::HoldServer::start(&lab, Some(&cgroup), limiter_tests::scenario::LISTEN);
    lab.server_ns().ip(&["link", "set", "lo", "down"]);
    let limiter = limiter_tests::Limiter::start(&lab, &cgroup, &reply_connector("100", "1"));
    let connect = |src: IpAddr| {
        let dst = if src.is_ipv4() {
            server_v4(25)
        } else {
            limiter_tests::lab::server_v6(25)
        };
        lab.connect(src, dst, limiter_tests::scenario::ADMIT_WAIT)
    };
    let v6: IpAddr = client_v6(0).into();
    let _held = connect(v6).expect("the first is admitted");
    assert_eq!(
        connect(v6).map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::TimedOut),
        "{}",
        limiter.log()
    );
    let log = limiter.log();
    assert!(log.contains("no IPv6 responder"), "{log}");
    let v4: IpAddr = client_v4(0).into();
    let _held = connect(v4).expect("the first is admitted");
    let mut stream = connect(v4).expect("IPv4 is answered");
    let mut line = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    BufReader::new(&mut stream).read_line(&mut line).unwrap();
    assert_eq!(line, format!("{EXCHANGE}\r\n"));
    let stats = limiter.cli_json(&["stats"]);
    assert_eq!(stats["rejected_per_source"], 2, "{stats}");
    assert_eq!(stats["replied"], 1, "{stats}");
    assert_eq!(stats["reply_dropped"], 1, "{stats}");
}

#[test]
fn with_the_daemon_gone_a_reply_connector_drops_and_replies_again_when_it_is_back() {
    let mut s = Scenario::start(&reply_connector("100", "1"));
    let _held = s.open(client_v4(0), 1);
    let log = s.limiter.kill();
    assert!(log.contains("enforcing on"), "{log}");
    // Its responder and `steer` went with it: once the kernel has not heard
    // from it for 2 s, what it would have answered is dropped, and the
    // server never sees it.
    std::thread::sleep(Duration::from_millis(2500));
    s.refused(client_v4(0));
    assert_eq!(established(s.lab.server_ns(), 25).len(), 1);
    s.limiter.spawn();
    let (line, _) = first_line(&s, client_v4(0));
    assert_eq!(line, format!("{EXCHANGE}\r\n"));
    assert_eq!(s.limiter.live("Frontend"), 1);
}

#[test]
fn with_the_daemon_in_the_tracked_cgroup_the_responders_handshakes_are_not_the_servers() {
    // As in production, where the tracked cgroup is the root: the sock_ops
    // program sees the responder's handshakes too, and must know them by
    // their socket.
    let lab = limiter_tests::Lab::new();
    let cgroup = limiter_tests::Cgroup::new();
    let _server =
        limiter_tests::HoldServer::start(&lab, Some(&cgroup), limiter_tests::scenario::LISTEN);
    let procs = cgroup.path().join("cgroup.procs");
    let launch = limiter_tests::daemon::Launch {
        wrapper: vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > {} && exec \"$@\"", procs.display()).into(),
            "sh".into(),
        ],
        ..Default::default()
    };
    let limiter = limiter_tests::Limiter::start_launched(
        &lab,
        &cgroup,
        Some(&reply_connector("100", "1")),
        &[],
        launch,
    );
    assert!(cgroup.procs().len() >= 2, "the daemon is in the cgroup");
    let connect = || lab.connect(client_v4(0).into(), server_v4(25), Duration::from_secs(2));
    let _held = connect().expect("the first is admitted");
    for _ in 0..3 {
        let stream = connect().expect("a refused sender is answered");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut all = String::new();
        std::io::Read::read_to_string(&mut &stream, &mut all).expect("the line, then EOF");
        assert_eq!(all, format!("{EXCHANGE}\r\n"));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let stats = limiter.cli_json(&["stats"]);
    assert_eq!(stats["admitted"], 1, "{stats}");
    assert_eq!(stats["rejected_late"], 0, "{stats}");
    assert_eq!(stats["replied"], 3, "{stats}");
    assert_eq!(stats["seeded"], 0, "{stats}");
    let status = limiter.status();
    assert_eq!(status.live_total, 1, "{status:?}");
}
