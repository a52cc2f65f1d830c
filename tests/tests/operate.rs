//! The operator's interface end to end: the control socket and the CLI
//! against the real daemon, with real connections in place.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv6Addr},
    os::unix::net::UnixStream,
    process::Command,
    time::Duration,
};

use limiter_tests::{
    daemon::limiter_bin,
    established,
    lab::{client_v4, client_v6},
    scenario::{Scenario, connector, echo},
    wait_until,
};

/// Raises this process's open-file limit: a test holding thousands of
/// client sockets needs more than the usual 1024.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-parameter, then the same struct back.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[test]
fn a_change_applies_to_new_connections_and_spares_established_ones() {
    let s = Scenario::start(&connector(
        "Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "100",
        "3",
        100,
    ));
    let mut held = s.open(client_v4(0), 3);
    let out = s.limiter.cli_ok(&[
        "connector",
        "set",
        "Frontend",
        "--max-inbound-connection-per-source",
        "1",
    ]);
    assert!(
        out.contains("MaxInboundConnectionPerSource             : 1"),
        "{out}"
    );
    // The three established connections are untouched and carry data.
    for stream in &mut held {
        assert_eq!(echo(stream, "still here"), "still here");
    }
    assert_eq!(s.limiter.live("Frontend"), 3);
    // New connections meet the new cap at once.
    s.refused(client_v4(0));
    let _one = s.open(client_v4(1), 1);
    s.refused(client_v4(1));
    // Raised again: room for two more from the first source.
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "frontend",
        "--max-inbound-connection-per-source",
        "5",
    ]);
    let _more = s.open(client_v4(0), 2);
    s.refused(client_v4(0));
    // The file says so too.
    let file = std::fs::read_to_string(s.limiter.config_path().unwrap()).unwrap();
    assert!(
        file.contains("max_inbound_connection_per_source = 5"),
        "{file}"
    );
    s.assert_counts_match_ss();
}

#[test]
fn new_and_removed_connectors_take_effect_for_the_next_syn() {
    let s = Scenario::start(&connector(
        "Default Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "100",
        "1",
        100,
    ));
    let _a = s.open(client_v4(10), 1);
    s.refused(client_v4(10));
    s.limiter.cli_ok(&[
        "connector",
        "new",
        "Relay",
        "--bindings",
        "0.0.0.0:25",
        "--remote-ip-ranges",
        "10.77.0.20-10.77.0.29",
        "--max-inbound-connection-per-source",
        "3",
    ]);
    // 10.77.0.20 now belongs to the relay: a fresh count and a larger cap;
    // its connection on the default connector stays there.
    let _b = s.open(client_v4(10), 3);
    s.refused(client_v4(10));
    assert_eq!(s.limiter.live("Default Frontend"), 1);
    assert_eq!(s.limiter.live("Relay"), 3);
    let list = s.limiter.cli_json(&["connector", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["name"], "Relay");
    assert_eq!(list[1]["max_inbound_connection"], 5000);
    assert_eq!(
        s.limiter.cli_ok(&["connector", "remove", "Relay"]).trim(),
        "removed connector \"Relay\""
    );
    // Back to the default connector, whose source already holds one.
    s.refused(client_v4(10));
    let list = s.limiter.cli_json(&["connector", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    s.assert_counts_match_ss();
}

#[test]
fn bad_changes_fail_in_one_line_and_change_nothing() {
    let config = format!(
        "# Our MX.\n{}{}",
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "2", 100),
        connector("Relay", "[\"10.77.0.20-10.77.0.29\"]", "100", "2", 100)
    );
    let s = Scenario::start(&config);
    let path = s.limiter.config_path().unwrap().to_path_buf();
    let file_before = std::fs::read(&path).unwrap();
    let list_before = s.limiter.cli_json(&["connector", "list"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["connector", "set", "Nope", "--max-inbound-connection", "5"],
            "there is no connector \"Nope\"",
        ),
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--max-inbound-connection-per-source",
                "0",
            ],
            "--max-inbound-connection-per-source 0 is out of range",
        ),
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--max-inbound-connection-per-source",
                "10001",
            ],
            "--max-inbound-connection-per-source 10001 is out of range",
        ),
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--max-inbound-connection-percentage-per-source",
                "101",
            ],
            "--max-inbound-connection-percentage-per-source 101 is out of range",
        ),
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--max-inbound-connection",
                "0",
            ],
            "--max-inbound-connection 0 is out of range",
        ),
        (
            &[
                "connector",
                "new",
                "Crossing",
                "--bindings",
                "0.0.0.0:25",
                "--remote-ip-ranges",
                "10.77.0.25-10.77.0.40",
            ],
            "overlaps 10.77.0.20-10.77.0.29 (connector \"Relay\")",
        ),
        (
            &[
                "connector",
                "set",
                "Relay",
                "--remote-ip-ranges",
                "10.77.0.0/33",
            ],
            "--remote-ip-ranges \"10.77.0.0/33\" is not an IP address",
        ),
        (
            &["connector", "new", "frontend", "--bindings", "0.0.0.0:587"],
            "already exists",
        ),
        (
            &["connector", "set", "Frontend", "--action", "bounce"],
            "--action \"bounce\"",
        ),
        (
            &["connector", "remove", "Nope"],
            "there is no connector \"Nope\"",
        ),
        (
            &["explain", "not-an-ip"],
            "\"not-an-ip\" is not an IP address",
        ),
        (
            &["sources", "--connector", "Nope"],
            "there is no connector \"Nope\"",
        ),
    ];
    for (args, needle) in cases {
        let line = s.limiter.cli_err(args);
        assert!(
            line.starts_with("limiter: ") && line.contains(needle),
            "{args:?}: {line}"
        );
        // A flag the operator typed is not the file's fault.
        assert!(!line.contains(path.to_str().unwrap()), "{args:?}: {line}");
    }
    // Whole lines: the flag as typed; in a collision, the connector being
    // added or changed first, then the one it collides with.
    let exact: &[(&[&str], &str)] = &[
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--max-inbound-connection-percentage-per-source",
                "0",
            ],
            "limiter: --max-inbound-connection-percentage-per-source 0 is out of range (1 to 100)",
        ),
        (
            &[
                "connector",
                "new",
                "Crossing",
                "--bindings",
                "0.0.0.0:25",
                "--remote-ip-ranges",
                "10.77.0.15-10.77.0.25",
            ],
            "limiter: connector \"Crossing\": remote range 10.77.0.15-10.77.0.25 overlaps 10.77.0.20-10.77.0.29 (connector \"Relay\") on binding 0.0.0.0:25 without one containing the other",
        ),
        (
            &[
                "connector",
                "set",
                "Frontend",
                "--remote-ip-ranges",
                "10.77.0.20-10.77.0.29",
            ],
            "limiter: connector \"Frontend\": remote range 10.77.0.20-10.77.0.29 on binding 0.0.0.0:25 is also on connector \"Relay\"",
        ),
    ];
    for (args, expected) in exact {
        assert_eq!(s.limiter.cli_err(args), *expected, "{args:?}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        file_before,
        "the file changed"
    );
    assert_eq!(s.limiter.cli_json(&["connector", "list"]), list_before);
    // The kernel still enforces the old limits.
    let _two = s.open(client_v4(0), 2);
    s.refused(client_v4(0));

    // Garbage on the socket gets an error reply, and the daemon goes on.
    let mut raw = UnixStream::connect(s.limiter.control()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for garbage in [
        "this is not json\n",
        "{\"command\":\"connector_set\"}\n",
        "{\"command\":\"sources\",\"conector\":\"Frontend\"}\n",
        "[1,2,3]\n",
    ] {
        raw.write_all(garbage.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&raw).read_line(&mut reply).unwrap();
        let value: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert!(
            value["error"]
                .as_str()
                .unwrap()
                .starts_with("malformed request"),
            "{garbage}: {reply}"
        );
    }
    raw.write_all(&[0xff, 0xfe, b'\n']).unwrap();
    drop(raw);
    assert_eq!(s.limiter.status().connectors.len(), 2);
}

#[test]
fn sources_match_the_socket_table() {
    let s = Scenario::start(&format!(
        "ipv6_prefix_length = 64\n{}",
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "1000", "10", 100)
    ));
    let mut held = Vec::new();
    for (i, n) in [(0, 5), (1, 3), (2, 1), (7, 2)] {
        held.extend(s.open(client_v4(i), n));
    }
    // Two addresses of one /64, and another /64.
    held.extend(s.open(client_v6(0), 2));
    held.extend(s.open(client_v6(1), 1));
    held.extend(s.open(client_v6(3), 4));
    s.assert_counts_match_ss();

    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for (_, remote) in established(s.lab.server_ns(), 25) {
        let source = match remote.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", Ipv6Addr::from(prefix))
            }
        };
        *truth.entry(source).or_default() += 1;
    }
    let reported = s.limiter.cli_json(&["sources"]);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut previous = u64::MAX;
    for entry in reported.as_array().unwrap() {
        assert_eq!(entry["connector"], "Frontend");
        let live = entry["live"].as_u64().unwrap();
        assert!(live <= previous, "largest first: {reported}");
        previous = live;
        // The cap a new connection would meet: 10 per source.
        assert_eq!(entry["cap"], 10, "{entry}");
        assert_eq!(entry["rule"], "per_source");
        seen.insert(entry["source"].as_str().unwrap().to_string(), live);
    }
    assert_eq!(seen, truth);
    let top = s
        .limiter
        .cli_json(&["sources", "--top", "2", "--connector", "frontend"]);
    assert_eq!(top.as_array().unwrap().len(), 2);
    assert_eq!(top[0]["source"], "10.77.0.10");
    assert_eq!(top[0]["live"], 5);
    let table = s.limiter.cli_ok(&["sources"]);
    assert!(
        table.lines().next().unwrap().starts_with("CONNECTOR"),
        "{table}"
    );
    assert!(table.contains("fd77:0:0:1::/64"), "{table}");
    drop(held);
}

#[test]
fn explain_tells_the_seeds_three_cases() {
    raise_nofile_limit();
    let s = Scenario::start(&connector(
        "Default Frontend",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "5000",
        "20",
        2,
    ));
    let new_source = "10.77.0.10";
    // An idle default connector: the 20 per source binds.
    let e = s.limiter.cli_json(&["explain", new_source]);
    assert_eq!(e["connector"], "Default Frontend");
    assert_eq!(e["local"], "0.0.0.0:25");
    assert_eq!(
        (e["cap"].as_u64(), e["rule"].as_str()),
        (Some(20), Some("per_source"))
    );
    assert_eq!(e["admitted"], true);
    assert_eq!(e["verdict"], "admitted");
    assert_eq!(
        (e["holds_at_most"].as_u64(), e["can_open"].as_u64()),
        (Some(20), Some(20))
    );
    assert_eq!(e["stopped_by"], "per_source");
    // Per source unlimited: the 2 % of 5000 - 1 still binds.
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Default Frontend",
        "--max-inbound-connection-per-source",
        "unlimited",
    ]);
    let e = s.limiter.cli_json(&["explain", new_source]);
    assert_eq!(
        (e["cap"].as_u64(), e["rule"].as_str()),
        (Some(100), Some("percentage"))
    );
    // Its own connections shrink what is left: it can hold 99, not 100.
    assert_eq!(
        (e["holds_at_most"].as_u64(), e["stopped_by"].as_str()),
        (Some(99), Some("percentage"))
    );
    let text = s.limiter.cli_ok(&["explain", new_source]);
    assert!(
        text.contains("connector \"Default Frontend\"")
            && text.contains("2 % of the remaining: 100")
            && text.contains("can hold 99, 99 more now"),
        "{text}"
    );

    // 2000 connections from other sources: let them in, then go back to
    // per source 100 and 2 %.
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Default Frontend",
        "--max-inbound-connection-percentage-per-source",
        "100",
    ]);
    let mut held = Vec::new();
    for i in 1..=19 {
        let n = if i <= 5 { 106 } else { 105 };
        held.extend(
            s.lab
                .connect_many(
                    client_v4(i).into(),
                    limiter_tests::lab::server_v4(25),
                    n,
                    Duration::from_secs(10),
                )
                .into_iter()
                .map(|r| r.expect("admitted")),
        );
    }
    assert_eq!(held.len(), 2000);
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Default Frontend",
        "--max-inbound-connection-per-source",
        "100",
        "--max-inbound-connection-percentage-per-source",
        "2",
    ]);
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { s.limiter.status().live_total == 2000 }
    ));
    let e = s.limiter.cli_json(&["explain", new_source]);
    assert_eq!(e["live_total"], 2000, "{e}");
    assert_eq!(e["live_source"], 0);
    assert_eq!(
        (e["cap"].as_u64(), e["rule"].as_str()),
        (Some(60), Some("percentage"))
    );
    assert_eq!(
        (e["holds_at_most"].as_u64(), e["can_open"].as_u64()),
        (Some(59), Some(59))
    );
    // The seed's sentence, as the operator reads it.
    let text = s.limiter.cli_ok(&["explain", new_source]);
    assert!(
        text.contains("2 % of the remaining: 60 (MaxInboundConnectionPercentagePerSource)")
            && text.contains("this source can hold 59, 59 more now"),
        "{text}"
    );
    // And the kernel agrees: that source gets 59, not 60.
    let _own = s.open(client_v4(0), 59);
    s.refused(client_v4(0));
    let e = s.limiter.cli_json(&["explain", new_source]);
    assert_eq!(
        (e["admitted"].as_bool(), e["event_id"].as_u64()),
        (Some(false), Some(1021))
    );
    assert_eq!(
        (
            e["verdict"].as_str(),
            e["can_open"].as_u64(),
            e["holds_at_most"].as_u64()
        ),
        (Some("rejected"), Some(0), Some(59))
    );
    // `sources` shows the same: it holds what it can, no cap below it.
    let sources = s.limiter.cli_json(&["sources"]);
    let own = sources
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == client_v4(0).to_string())
        .expect("the source holding 59");
    assert_eq!(
        (
            own["live"].as_u64(),
            own["holds_at_most"].as_u64(),
            own["can_open"].as_u64()
        ),
        (Some(59), Some(59), Some(0)),
        "{own}"
    );
    drop(held);
}

#[test]
fn explain_names_no_connector_for_strangers_and_honours_local() {
    let config = format!(
        "{}[[connector]]\nname = \"Submission\"\nbindings = [\"10.77.0.1:587\"]\n\
         remote_ip_ranges = [\"10.77.0.0/24\"]\n",
        connector("Relay", "[\"10.77.0.20-10.77.0.29\"]", "100", "2", 100)
    );
    let s = Scenario::start(&config);
    // Nobody on port 25 takes 10.77.0.5; the submission binding does.
    let e = s.limiter.cli_json(&["explain", "10.77.0.5"]);
    assert_eq!(
        (&e["connector"], &e["local"]),
        (&"Submission".into(), &"10.77.0.1:587".into())
    );
    let e = s
        .limiter
        .cli_json(&["explain", "10.77.0.5", "--local", "0.0.0.0:25"]);
    assert_eq!(e["connector"], serde_json::Value::Null);
    assert_eq!(e["rule"], "none");
    assert_eq!(e["cap"], serde_json::Value::Null);
    let e = s.limiter.cli_json(&["explain", "10.99.0.1"]);
    assert_eq!(e["connector"], serde_json::Value::Null);
    let text = s.limiter.cli_ok(&["explain", "10.99.0.1"]);
    assert!(text.contains("no connector takes it"), "{text}");
    let e = s.limiter.cli_json(&["explain", "10.77.0.21"]);
    assert_eq!(e["connector"], "Relay");
    let line = s
        .limiter
        .cli_err(&["explain", "10.77.0.21", "--local", "nowhere"]);
    assert!(line.contains("is not IP:PORT"), "{line}");
}

#[test]
fn explain_answers_for_the_connector_a_source_uses_and_every_other_it_reaches() {
    // "Specific" on the server's own address for one source, "Wide" on every
    // local address for its /24: the source's connections go to Specific.
    let config = "[[connector]]\nname = \"Wide\"\nbindings = [\"0.0.0.0:25\"]\n\
         remote_ip_ranges = [\"10.77.0.0/24\"]\nmax_inbound_connection = 100\n\
         max_inbound_connection_per_source = 2\n\
         max_inbound_connection_percentage_per_source = 100\n\
         [[connector]]\nname = \"Specific\"\nbindings = [\"10.77.0.1:25\"]\n\
         remote_ip_ranges = [\"10.77.0.10\"]\nmax_inbound_connection = 40\n\
         max_inbound_connection_per_source = \"unlimited\"\n\
         max_inbound_connection_percentage_per_source = 25\n";
    let s = Scenario::start(config);
    let source = client_v4(0).to_string();
    let mut held = s.open(client_v4(0), 3);
    let e = s.limiter.cli_json(&["explain", &source]);
    assert_eq!(
        (&e["connector"], &e["local"], &e["live_source"]),
        (&"Specific".into(), &"10.77.0.1:25".into(), &3.into()),
        "{e}"
    );
    // 40 / unlimited / 25 %: the next connection meets ceil(36 / 4) = 9,
    // but the source stops at 8 (ceil((40 - 9) / 4) = 8).
    assert_eq!(
        (
            e["cap"].as_u64(),
            e["holds_at_most"].as_u64(),
            e["can_open"].as_u64()
        ),
        (Some(9), Some(8), Some(5)),
        "{e}"
    );
    let answers = e["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 2, "{e}");
    assert_eq!(
        (
            &answers[1]["connector"],
            &answers[1]["local"],
            &answers[1]["live_source"],
            &answers[1]["cap"]
        ),
        (&"Wide".into(), &"0.0.0.0:25".into(), &0.into(), &2.into())
    );
    let text = s.limiter.cli_ok(&["explain", &source]);
    assert!(
        text.contains("10.77.0.10 -> 10.77.0.1:25: connector \"Specific\"")
            && text.contains("10.77.0.10 -> 0.0.0.0:25: connector \"Wide\"")
            && text.contains("this source can hold 8, 5 more now"),
        "{text}"
    );
    // And the kernel stops it at 8, as said.
    held.extend(s.open(client_v4(0), 5));
    s.refused(client_v4(0));
    let sources = s.limiter.cli_json(&["sources"]);
    assert_eq!(
        (
            &sources[0]["live"],
            &sources[0]["holds_at_most"],
            &sources[0]["can_open"],
            &sources[0]["stopped_by"]
        ),
        (&8.into(), &8.into(), &0.into(), &"percentage".into()),
        "{sources}"
    );
    let table = s.limiter.cli_ok(&["sources"]);
    assert!(
        table.starts_with("CONNECTOR  SOURCE      LIVE  CAN OPEN  HOLDS AT MOST  STOPPED BY")
            && table.contains("MaxInboundConnectionPercentagePerSource"),
        "{table}"
    );
    // An IPv4 source never reaches an IPv6 binding.
    let line = s
        .limiter
        .cli_err(&["explain", &source, "--local", "[::]:25"]);
    assert!(
        line.contains("10.77.0.10 is IPv4 and cannot reach --local [::]:25 (IPv6)"),
        "{line}"
    );
    drop(held);
}

#[test]
fn stats_count_admissions_and_rejections() {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    let _held = s.open(client_v4(0), 2);
    for _ in 0..3 {
        s.refused(client_v4(0));
    }
    let stats = s.limiter.cli_json(&["stats"]);
    assert_eq!(stats["admitted"], 2, "{stats}");
    assert_eq!(stats["rejected"], 3);
    assert_eq!(stats["rejected_per_source"], 3);
    assert_eq!(stats["rejected_total_limit"], 0);
    assert_eq!(stats["rejected_percentage"], 0);
    assert_eq!(stats["connectors"][0]["name"], "Frontend");
    assert_eq!(stats["connectors"][0]["rejected_per_source"], 3);
    let table = s.limiter.cli_ok(&["stats"]);
    assert!(table.contains("(all)"), "{table}");
    // In Exchange's names, and no dry-run lines where there is no monitor.
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("  by MaxInboundConnectionPerSource ") && l.ends_with(": 3"))
            && !table.contains("Would be rejected"),
        "{table}"
    );
}

#[test]
fn only_root_may_use_the_control_socket() {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100));
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(limiter_bin())
        .args(["status", "--control"])
        .arg(s.limiter.control())
        .output()
        .unwrap();
    assert_eq!(as_nobody.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(
        stderr.contains("permission denied on the control socket"),
        "{stderr}"
    );
}

#[test]
fn a_control_group_lets_its_members_in() {
    let s = Scenario::start_with(
        Some(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100)),
        &["--control-group", "nogroup"],
    );
    let run_as = |gid: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .arg(limiter_bin())
            .args(["status", "--json", "--control"])
            .arg(s.limiter.control())
            .output()
            .unwrap()
    };
    let member = run_as("65534");
    assert!(member.status.success(), "{member:?}");
    let outsider = run_as("100");
    assert_eq!(outsider.status.code(), Some(1), "{outsider:?}");
}

#[test]
fn a_changed_config_restarts_to_the_same_state() {
    let mut s = Scenario::start(&format!(
        "# Keep this comment.\nhandshake_timeout = \"5s\"\n{}",
        connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "2", 100)
    ));
    s.limiter.cli_ok(&[
        "connector",
        "new",
        "Relay",
        "--bindings",
        "0.0.0.0:25,[::]:25",
        "--remote-ip-ranges",
        "10.77.0.20-10.77.0.29,fd77:0:0:3::/64",
        "--max-inbound-connection",
        "unlimited",
        "--max-inbound-connection-per-source",
        "1",
        "--action",
        "monitor",
    ]);
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Frontend",
        "--max-inbound-connection-percentage-per-source",
        "50",
    ]);
    let before = s.limiter.cli_json(&["connector", "list"]);
    let file = std::fs::read_to_string(s.limiter.config_path().unwrap()).unwrap();
    assert!(file.starts_with("# Keep this comment."), "{file}");
    let log = s.limiter.restart();
    assert!(log.contains("config changed and written"), "{log}");
    assert_eq!(s.limiter.cli_json(&["connector", "list"]), before);
    // And it enforces what it says: the relay only monitors its cap of 1.
    let _many = s.open(client_v4(10), 4);
    assert_eq!(s.limiter.live("Relay"), 4);
}
