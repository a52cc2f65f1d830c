//! End to end: the real daemon on the server's veth, real TCP connections
//! from several source addresses in a client namespace, a real server
//! holding them.

use std::{
    io::ErrorKind,
    net::{IpAddr, TcpStream},
    time::Duration,
};

use limiter_tests::{
    Cgroup, HoldServer, Lab, Limiter,
    daemon::limiter_bin,
    established,
    lab::{client_v4, client_v6, server_v4},
    scenario::{ADMIT_WAIT, SETTLE, Scenario, alive, connector, echo, server_side},
    spawn_in, tcp_hold_bin, wait_until,
};

fn setup(config: &str) -> Scenario {
    Scenario::start(config)
}

#[test]
fn per_source_cap_holds_and_other_sources_pass() {
    let s = setup(&connector(
        "Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "100",
        "3",
        100,
    ));
    let mut held = s.open(client_v4(0), 3);
    s.refused(client_v4(0));
    let _other = s.open(client_v4(1), 3);
    s.refused(client_v4(1));
    assert_eq!(s.limiter.live("Frontend"), 6);
    // The held connections still carry data.
    assert_eq!(echo(&mut held[0], "hello"), "hello");
    s.assert_counts_match_ss();
}

#[test]
fn total_cap_rejects_every_source() {
    let s = setup(&connector(
        "Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "5",
        "\"unlimited\"",
        100,
    ));
    let _held: Vec<TcpStream> = (0..5).flat_map(|i| s.open(client_v4(i), 1)).collect();
    for i in [0, 7, 12] {
        s.refused(client_v4(i));
    }
    assert_eq!(s.limiter.live("Frontend"), 5);
    s.assert_counts_match_ss();
}

#[test]
fn percentage_rule_counts_other_sources_connections() {
    // max 20, 50 %: with 10 connections from other sources live, a new
    // source meets ceil((20 - 11) * 50 / 100) = 5 for its first, but its own
    // connections shrink what is left: the 4th needs
    // 4 <= ceil((20 - 14) * 50 / 100) = 3, and fails.
    let s = setup(&connector(
        "Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "20",
        "\"unlimited\"",
        50,
    ));
    let _others: Vec<TcpStream> = (1..=5).flat_map(|i| s.open(client_v4(i), 2)).collect();
    let _own = s.open(client_v4(0), 3);
    s.refused(client_v4(0));
    assert_eq!(s.limiter.live("Frontend"), 13);
    s.assert_counts_match_ss();
}

#[test]
fn most_specific_connector_wins() {
    let config = format!(
        "{}{}",
        connector(
            "Default Frontend",
            "[\"0.0.0.0/0\", \"::/0\"]",
            "100",
            "1",
            100
        ),
        connector("Relay", "[\"10.77.0.20-10.77.0.29\"]", "100", "4", 100)
    );
    let s = setup(&config);
    let _a = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
    // 10.77.0.20 is in the relay's range: its own, larger cap.
    let _b = s.open(client_v4(10), 4);
    s.refused(client_v4(10));
    assert_eq!(s.limiter.live("Default Frontend"), 1);
    assert_eq!(s.limiter.live("Relay"), 4);
    s.assert_counts_match_ss();
}

#[test]
fn ipv6_sources_count_per_64() {
    let config = format!(
        "ipv6_prefix_length = 64\n{}",
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "2", 100)
    );
    let s = setup(&config);
    // ::10, ::11 and ::12 share fd77:0:0:1::/64: one source of cap 2.
    let _a = s.open(client_v6(0), 1);
    let _b = s.open(client_v6(1), 1);
    s.refused(client_v6(2));
    s.refused(client_v6(0));
    // Another /64 is another source.
    let _c = s.open(client_v6(3), 2);
    s.refused(client_v6(3));
    assert_eq!(s.limiter.live("Frontend"), 4);
    s.assert_counts_match_ss();
}

#[test]
fn other_ports_and_unmatched_sources_pass_untouched() {
    let s = setup(&connector(
        "Relay",
        "[\"10.77.0.20-10.77.0.29\"]",
        "100",
        "1",
        100,
    ));
    // Port 2525 is bound by no connector.
    let _many: Vec<TcpStream> = (0..5)
        .map(|_| {
            s.lab
                .connect(client_v4(0).into(), server_v4(2525), ADMIT_WAIT)
                .expect("port 2525 is not limited")
        })
        .collect();
    // 10.77.0.10 is in no connector's range: not ours.
    let _unmatched = s.open(client_v4(0), 5);
    let _relay = s.open(client_v4(10), 1);
    s.refused(client_v4(10));
    assert_eq!(s.limiter.live("Relay"), 1);
}

#[test]
fn existing_connections_are_counted_and_released() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let server = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.77.0.1:25"]);
    let mut before: Vec<TcpStream> = (0..3)
        .map(|_| {
            lab.connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
                .unwrap()
        })
        .collect();
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "3", 100),
    );
    let s = Scenario {
        limiter,
        server,
        cgroup,
        lab,
    };
    assert_eq!(s.limiter.live("Frontend"), 3);
    s.refused(client_v4(0));
    // The daemon sees a connection from before it started close by polling
    // the socket table.
    server_side(&mut before[0], "close");
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || s
            .limiter
            .live("Frontend")
            == 2),
        "{:?}",
        s.limiter.status()
    );
    let _again = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
    drop(before.pop());
    assert!(wait_until(SETTLE, Duration::from_millis(50), || s
        .limiter
        .live("Frontend")
        == 2));
    s.assert_counts_match_ss();
}

/// Holds the only slot of a source, frees it with `close` (which returns
/// whatever must stay open meanwhile), and checks the slot can be taken
/// again.
fn release_then_admit(s: &Scenario, close: impl FnOnce(TcpStream) -> Option<TcpStream>) {
    // A connection the client closed before counts until the server closes
    // its side too.
    assert!(wait_until(SETTLE, Duration::from_millis(20), || s
        .limiter
        .live("Frontend")
        == 0));
    let held = s.open(client_v4(3), 1).pop().unwrap();
    s.refused(client_v4(3));
    let _half_open = close(held);
    // The slot is free as soon as the server's socket is closed or reset.
    assert!(
        wait_until(SETTLE, Duration::from_millis(20), || s
            .limiter
            .live("Frontend")
            == 0),
        "{:?}",
        s.limiter.status()
    );
    let _next = s.open(client_v4(3), 1);
    s.refused(client_v4(3));
}

#[test]
fn capacity_is_released_by_client_close() {
    let s = setup(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100));
    release_then_admit(&s, |stream| {
        drop(stream);
        None
    });
}

#[test]
fn capacity_is_released_by_server_close() {
    let s = setup(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100));
    release_then_admit(&s, |mut stream| {
        server_side(&mut stream, "close");
        // Our side stays open: only the server closed.
        Some(stream)
    });
}

#[test]
fn capacity_is_released_by_reset() {
    let s = setup(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100));
    release_then_admit(&s, |mut stream| {
        server_side(&mut stream, "reset");
        let mut buf = [0u8; 1];
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let error = std::io::Read::read(&mut stream, &mut buf).expect_err("reset");
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        None
    });
    // And a reset sent by the client.
    release_then_admit(&s, |stream| {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
        None
    });
}

#[test]
fn a_burst_of_200_connections_leaves_no_more_than_the_cap() {
    let s = setup(&connector("Frontend", "[\"0.0.0.0/0\"]", "1000", "20", 100));
    // All the SYNs leave before any handshake completes: the counts let
    // them pass, and each handshake is judged as it completes.
    let results = s.lab.connect_many(
        client_v4(4).into(),
        server_v4(25),
        200,
        Duration::from_millis(1500),
    );
    let completed: Vec<TcpStream> = results.into_iter().filter_map(Result::ok).collect();
    assert!(completed.len() >= 20, "{}", completed.len());
    // Those past the cap are reset the moment they complete.
    assert!(
        wait_until(SETTLE, Duration::from_millis(50), || established(
            s.lab.server_ns(),
            25
        )
        .len()
            == 20),
        "{:?}",
        s.limiter.status()
    );
    let alive = completed.iter().filter(|stream| alive(stream)).count();
    assert_eq!(alive, 20);
    assert_eq!(s.limiter.live("Frontend"), 20);
    let stats = s.limiter.cli_json(&["stats"]);
    assert_eq!(stats["admitted"], 20, "{stats}");
    assert_eq!(
        stats["rejected_late"].as_u64(),
        Some(completed.len() as u64 - 20),
        "{stats}"
    );
    s.assert_counts_match_ss();
}

#[test]
fn handshakes_that_never_complete_hold_nothing() {
    let s = setup(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    let source: IpAddr = client_v4(5).into();
    // The server's SYN-ACKs to this source go nowhere: its handshakes stay
    // open on the server's side.
    let route = format!("{source}/32");
    s.lab.server_ns().ip(&["route", "add", "blackhole", &route]);
    for _ in 0..5 {
        let e = s
            .lab
            .connect(source, server_v4(25), Duration::from_millis(200))
            .expect_err("no SYN-ACK can reach the client");
        assert_eq!(e.kind(), ErrorKind::TimedOut);
    }
    s.lab.server_ns().ip(&["route", "del", "blackhole", &route]);
    // Only a completed handshake counts: the source can open its cap at
    // once.
    assert_eq!(s.limiter.status().live_total, 0);
    let _now = s.open(source, 2);
    s.refused(source);
    s.assert_counts_match_ss();
}

#[test]
fn status_reports_the_daemon() {
    let s = setup(&connector(
        "Frontend",
        "[\"0.0.0.0/0\"]",
        "\"unlimited\"",
        "2",
        100,
    ));
    let _held = s.open(client_v4(0), 2);
    let status = s.limiter.status();
    assert_eq!(status.interfaces.len(), 1);
    assert_eq!(status.interfaces[0].name, s.lab.server_iface());
    assert_eq!(status.connectors[0].max_inbound_connection, "unlimited");
    assert_eq!(status.connectors[0].max_inbound_connection_per_source, 2);
    assert_eq!(status.live_total, 2);
    let text = s.limiter.cli_ok(&["status"]);
    assert!(
        text.contains("Frontend") && text.contains("unlimited / 2 / 100%"),
        "{text}"
    );
    assert_eq!(s.limiter.cli_json(&["status"])["live_total"], 2);
}

#[test]
fn a_bad_config_attaches_nothing_and_says_why_in_one_line() {
    let lab = Lab::new();
    let dir = std::env::temp_dir().join(format!("limiter-test-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("connectors.toml");
    std::fs::write(
        &config,
        connector("Relay", "[\"10.1.0.0/24\"]", "100", "10001", 2),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(limiter_bin());
    cmd.arg("run")
        .args(["--iface", lab.server_iface()])
        .arg("--config")
        .arg(&config)
        .arg("--control")
        .arg(dir.join("control.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = spawn_in(lab.server_ns(), None, cmd)
        .wait_with_output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "limiter: {}: connector \"Relay\": ",
            config.display()
        )) && lines[0].contains("max_inbound_connection_per_source 10001 is out of range"),
        "{stderr}"
    );
    let link = lab
        .server_ns()
        .ip(&["-d", "link", "show", "dev", lab.server_iface()]);
    assert!(!link.contains("xdp"), "{link}");
}

#[test]
fn sigterm_detaches_and_removes_what_it_made() {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100),
    );
    let link = || {
        lab.server_ns()
            .ip(&["-d", "link", "show", "dev", lab.server_iface()])
    };
    assert!(link().contains("xdp"), "{}", link());
    let pins = std::path::PathBuf::from(limiter.status().pins.expect("pinned"));
    assert!(pins.join("maps/ESTABLISHED").exists());
    assert!(
        pins.join("links").read_dir().unwrap().count() == 2,
        "an XDP and a sock_ops link"
    );
    let control = limiter.control().to_path_buf();
    let log = limiter.stop();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!link().contains("xdp"), "{}", link());
    assert!(!pins.exists(), "pins left in {}", pins.display());
    assert!(!control.exists());
    // Nothing is enforced any more.
    let _s = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.77.0.1:25"]);
    for _ in 0..3 {
        lab.connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
            .expect("no limit once stopped");
    }
}

#[test]
fn reset_refuses_at_once_and_monitor_only_reports() {
    let config = format!(
        "{}action = \"reset\"\n{}action = \"monitor\"\n",
        connector("Reset", "[\"10.77.0.10-10.77.0.19\"]", "100", "1", 100),
        connector("Monitor", "[\"10.77.0.20-10.77.0.29\"]", "100", "1", 100),
    );
    let s = setup(&config);
    let _pass = limiter_tests::passxdp::PassXdp::attach(&s.lab);
    let _held = s.open(client_v4(0), 1);
    // The RST comes from XDP: the client learns at once, long before its
    // SYN would be retransmitted (1 s).
    let started = std::time::Instant::now();
    let refused = s
        .lab
        .connect(
            client_v4(0).into(),
            server_v4(25),
            Duration::from_millis(900),
        )
        .expect_err("over the cap");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    println!("refused after {:?}", started.elapsed());
    // Monitor admits everything, and reports what it would have refused.
    let _monitored = s.open(client_v4(10), 3);
    assert_eq!(s.limiter.live("Monitor"), 3);
    let stats = s.limiter.cli_json(&["stats"]);
    let monitor = stats["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Monitor")
        .unwrap()
        .clone();
    // All three admitted; two of them would have been refused, and are
    // counted so, never as rejections.
    assert_eq!(
        (
            monitor["admitted"].as_u64(),
            monitor["rejected"].as_u64(),
            monitor["rejected_per_source"].as_u64(),
            monitor["would_reject"].as_u64(),
            monitor["would_reject_per_source"].as_u64()
        ),
        (Some(3), Some(0), Some(0), Some(2), Some(2)),
        "{stats}"
    );
    let table = s.limiter.cli_ok(&["stats"]);
    assert!(
        table.lines().any(
            |l| l.starts_with("Would be rejected (action monitor: admitted)") && l.ends_with(": 2")
        ),
        "{table}"
    );
    let events = s.limiter.cli_ok(&["events", "--json"]);
    let events: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["action"] == "reset"), "{events:?}");
    let monitored: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["action"] == "monitor").collect();
    assert!(!monitored.is_empty(), "{events:?}");
    for e in monitored {
        let message = e["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "Receive connector \"Monitor\" would have rejected (action monitor: admitted) an incoming connection"
            ),
            "{message}"
        );
    }
    // explain says the same: over the cap, let in, reported.
    let e = s.limiter.cli_json(&["explain", &client_v4(10).to_string()]);
    assert_eq!(
        (
            e["verdict"].as_str(),
            e["admitted"].as_bool(),
            e["event_id"].as_u64()
        ),
        (Some("would_reject"), Some(true), Some(1021)),
        "{e}"
    );
    let text = s.limiter.cli_ok(&["explain", &client_v4(10).to_string()]);
    assert!(
        text.contains(
            "a new connection now: would be REJECTED by MaxInboundConnectionPerSource (event 1021): 1 per source; action monitor admits it"
        ) && !text.contains(": REJECTED"),
        "{text}"
    );
}

#[test]
fn an_interface_without_a_link_layer_is_enforced_from_the_ip_header() {
    use limiter_tests::tunlink::{self, TunLink};
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let link = TunLink::new(&lab);
    let _server = HoldServer::start_with(tcp_hold_bin!(), &lab, Some(&cgroup), &["10.78.0.1:25"]);
    let limiter = Limiter::start_with(
        &lab,
        &cgroup,
        Some(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100)),
        &["--iface", link.server_iface()],
    );
    let status = limiter.status();
    assert!(
        status
            .interfaces
            .iter()
            .any(|i| i.name == link.server_iface()),
        "{status:?}"
    );
    let server = std::net::SocketAddr::from((tunlink::SERVER, 25));
    let connect = || lab.connect(tunlink::CLIENT.into(), server, ADMIT_WAIT);
    let _held: Vec<TcpStream> = (0..2).map(|_| connect().expect("within the cap")).collect();
    // Refused at its SYN, by the program that reads bare IP packets.
    let refused = connect().expect_err("over the cap");
    assert_eq!(refused.kind(), ErrorKind::TimedOut);
    let stats = limiter.cli_json(&["stats"]);
    assert!(
        stats["rejected_per_source"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(stats["rejected_late"], 0, "{stats}");
    assert_eq!(limiter.live("Frontend"), 2);
}

#[test]
fn a_server_outside_the_tracked_cgroup_is_counted_by_polling_with_a_warning() {
    let lab = Lab::new();
    let tracked = Cgroup::new();
    // The server runs elsewhere: its handshakes never pass the sock_ops
    // program.
    let _server = HoldServer::start_with(tcp_hold_bin!(), &lab, None, &["10.77.0.1:25"]);
    let limiter = Limiter::start(
        &lab,
        &tracked,
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100),
    );
    let _held: Vec<TcpStream> = (0..3)
        .map(|_| {
            lab.connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
                .expect("nothing judges them")
        })
        .collect();
    assert!(
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(50),
            || limiter.live("Frontend") == 3
        ),
        "{:?}",
        limiter.status()
    );
    let log = limiter.log();
    assert!(
        log.contains("without passing the sock_ops program")
            && log.contains("is the mail server in cgroup"),
        "{log}"
    );
    // Counted, they are refused at the SYN from then on.
    let refused = lab
        .connect(client_v4(0).into(), server_v4(25), ADMIT_WAIT)
        .expect_err("over the cap");
    assert_eq!(refused.kind(), ErrorKind::TimedOut);
}
