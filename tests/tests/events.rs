//! Rejection events end to end: a real rsyslogd receives the 1009 / 1021
//! lines, `limiter events --follow` streams them, and `/metrics` is
//! scraped over HTTP.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use limiter_tests::{
    Rsyslog,
    daemon::limiter_bin,
    lab::{client_v4, server_v4},
    scenario::{Scenario, connector},
    wait_until,
};

/// One line of rsyslog's RSYSLOG_SyslogProtocol23Format output.
#[derive(Debug)]
struct Line {
    pri: u32,
    app: String,
    msgid: String,
    sd: String,
    msg: String,
}

fn parse(line: &str) -> Line {
    // <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD...] MSG
    let (pri, rest) = line
        .strip_prefix('<')
        .and_then(|l| l.split_once(">1 "))
        .unwrap_or_else(|| panic!("not RFC 5424: {line}"));
    let fields: Vec<&str> = rest.splitn(6, ' ').collect();
    let after_msgid = fields[5];
    let (sd, msg) = if after_msgid.starts_with('[') {
        let end = after_msgid.find("] ").expect("structured data ends") + 1;
        (&after_msgid[..end], &after_msgid[end + 1..])
    } else {
        after_msgid.split_once(' ').unwrap()
    };
    Line {
        pri: pri.parse().unwrap(),
        app: fields[2].to_string(),
        msgid: fields[4].to_string(),
        sd: sd.to_string(),
        msg: msg.trim_end().to_string(),
    }
}

fn sd_param(line: &Line, key: &str) -> String {
    let needle = format!(" {key}=\"");
    let start = line
        .sd
        .find(&needle)
        .unwrap_or_else(|| panic!("{key} in {}", line.sd))
        + needle.len();
    let end = line.sd[start..].find('"').unwrap() + start;
    line.sd[start..end].to_string()
}

/// The event lines: MSGID 1009 or 1021 (the daemon's own lines, MSGID "-",
/// take the same way).
fn limiter_lines(rsyslog: &Rsyslog) -> Vec<Line> {
    rsyslog
        .lines()
        .iter()
        .map(|l| parse(l))
        .filter(|l| l.app == "limiter" && ["1009", "1021"].contains(&l.msgid.as_str()))
        .collect()
}

fn with_syslog(config: &str, rsyslog: &Rsyslog, period: &str) -> Scenario {
    let socket = rsyslog.socket();
    Scenario::start_with(
        Some(config),
        &[
            "--syslog",
            socket.to_str().unwrap(),
            "--event-period",
            period,
        ],
    )
}

#[test]
fn syslog_gets_exchanges_1021_at_once_then_one_summary() {
    let rsyslog = Rsyslog::start();
    let s = with_syslog(
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100),
        &rsyslog,
        "2s",
    );
    let _held = s.open(client_v4(0), 1);
    // Five attempts at once, all within one period.
    let attempts = s.lab.connect_many(
        client_v4(0).into(),
        server_v4(25),
        5,
        Duration::from_millis(500),
    );
    assert!(attempts.iter().all(|a| a.is_err()), "over the cap");
    // The first is written at once, the other four folded into one summary
    // when the 2 s period ends.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            limiter_lines(&rsyslog).len() >= 2
        }),
        "{:?}\n{}",
        rsyslog.lines(),
        s.limiter.log()
    );
    std::thread::sleep(Duration::from_millis(2500));
    let lines = limiter_lines(&rsyslog);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let expected = "Receive connector \"Frontend\" rejected an incoming connection from IP address 10.77.0.10. The maximum number of connections per source (1) for this connector has been reached by this source IP address.";
    let first = &lines[0];
    // Facility mail (2), severity warning (4): 2 * 8 + 4.
    assert_eq!((first.pri, first.msgid.as_str()), (20, "1021"), "{first:?}");
    assert_eq!(first.msg, expected);
    assert!(first.sd.starts_with("[limiter@32473 "), "{}", first.sd);
    for (key, value) in [
        ("connector", "Frontend"),
        ("source", "10.77.0.10"),
        ("rule", "per_source"),
        ("configured", "1"),
        ("effective", "1"),
        ("live_total", "1"),
        ("live_source", "1"),
        ("count", "1"),
        ("action", "drop"),
    ] {
        assert_eq!(sd_param(first, key), value, "{key} in {}", first.sd);
    }
    let summary = &lines[1];
    assert_eq!(summary.msgid, "1021");
    assert_eq!(sd_param(summary, "count"), "4");
    assert_eq!(sd_param(summary, "period_seconds"), "2");
    assert!(
        summary.msg.starts_with(expected)
            && summary
                .msg
                .ends_with("Repeated 4 times in the last 2 seconds."),
        "{}",
        summary.msg
    );
}

#[test]
fn syslog_gets_1009_for_the_total_and_the_percentage_as_1021() {
    let rsyslog = Rsyslog::start();
    let s = with_syslog(
        &format!(
            "{}{}",
            connector(
                "Total",
                "[\"10.77.0.10-10.77.0.19\"]",
                "1",
                "\"unlimited\"",
                100
            ),
            connector(
                "Share",
                "[\"10.77.0.20-10.77.0.29\"]",
                "10",
                "\"unlimited\"",
                50
            ),
        ),
        &rsyslog,
        "60s",
    );
    let _a = s.open(client_v4(0), 1);
    s.refused(client_v4(1));
    // Share: one source alone holds ceil((10 - S) / 2) >= S up to 3.
    let _b = s.open(client_v4(10), 3);
    s.refused(client_v4(10));
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || { limiter_lines(&rsyslog).len() >= 2 }
    ));
    let lines = limiter_lines(&rsyslog);
    let total = lines
        .iter()
        .find(|l| l.msgid == "1009")
        .expect("a 1009 line");
    assert_eq!(
        total.msg,
        "Receive connector \"Total\" rejected an incoming connection. The maximum number of connections (1) for this connector has been reached."
    );
    assert_eq!(
        (sd_param(total, "rule"), sd_param(total, "configured")),
        ("total".into(), "1".into())
    );
    let share = lines
        .iter()
        .find(|l| l.msgid == "1021")
        .expect("a 1021 line");
    assert_eq!(sd_param(share, "rule"), "percentage");
    // configured: the percentage; effective: ceil((10 - 4) * 50 / 100) = 3.
    assert_eq!(
        (sd_param(share, "configured"), sd_param(share, "effective")),
        ("50".into(), "3".into())
    );
    assert!(
        share.msg.contains("per source (unlimited)"),
        "{}",
        share.msg
    );
}

#[test]
fn a_flood_from_one_source_is_one_line_and_a_summary() {
    let rsyslog = Rsyslog::start();
    let s = with_syslog(
        &connector("Frontend", "[\"0.0.0.0/0\"]", "1000", "1", 100),
        &rsyslog,
        "3s",
    );
    let _held = s.open(client_v4(0), 1);
    let attempts = s.lab.connect_many(
        client_v4(0).into(),
        server_v4(25),
        300,
        Duration::from_millis(500),
    );
    assert!(attempts.iter().all(|a| a.is_err()), "over the cap");
    let rejected = || s.limiter.cli_json(&["stats"])["rejected"].as_u64().unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || rejected() >= 300
    ));
    // Let the period end.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            limiter_lines(&rsyslog)
                .iter()
                .any(|l| sd_param(l, "count") != "1")
        }),
        "{:?}",
        rsyslog.lines()
    );
    let lines = limiter_lines(&rsyslog);
    assert!(
        lines.len() <= 3,
        "not one line per SYN: {} lines",
        lines.len()
    );
    let logged: u64 = lines
        .iter()
        .map(|l| sd_param(l, "count").parse::<u64>().unwrap())
        .sum();
    assert_eq!(logged, rejected());
}

#[test]
fn a_single_repeat_is_repeated_once() {
    let rsyslog = Rsyslog::start();
    let s = with_syslog(
        &connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100),
        &rsyslog,
        "3s",
    );
    let _held = s.open(client_v4(0), 1);
    // Two refusals within a period: the first at once, the second in a
    // summary of one (the kernel holds it for a second, the period is
    // longer than that).
    s.refused(client_v4(0));
    s.refused(client_v4(0));
    let summary = || {
        limiter_lines(&rsyslog)
            .into_iter()
            .find(|l| l.sd.contains(" period_seconds=\""))
    };
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            summary().is_some()
        }),
        "{:?}\n{}",
        rsyslog.lines(),
        s.limiter.log()
    );
    let summary = summary().unwrap();
    assert_eq!(sd_param(&summary, "count"), "1");
    assert!(
        summary
            .msg
            .ends_with("this source IP address. Repeated once in the last 3 seconds."),
        "{}",
        summary.msg
    );
}

/// `limiter events --json`, parsed.
fn events_json(s: &Scenario) -> Vec<serde_json::Value> {
    s.limiter
        .cli_ok(&["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn events_count_each_refusal_once() {
    // A short period: summaries are due within the test.
    // "Watch" only reports (monitor): its would-be refusals are in the
    // stream once each too, and counted apart in stats.
    let s = Scenario::start_with(
        Some(&format!(
            "{}{}action = \"monitor\"\n",
            connector("Frontend", "[\"0.0.0.0/0\"]", "1000", "1", 100),
            connector("Watch", "[\"10.77.0.11\"]", "1000", "1", 100),
        )),
        &["--event-period", "1s"],
    );
    let _held = s.open(client_v4(0), 1);
    let _watched = s.open(client_v4(1), 3);
    // A burst, then more a moment later: the kernel folds them into a
    // report a second per source, and its refusal caches take their share.
    for _ in 0..2 {
        let attempts = s.lab.connect_many(
            client_v4(0).into(),
            server_v4(25),
            150,
            Duration::from_millis(500),
        );
        assert!(attempts.iter().all(|a| a.is_err()), "over the cap");
    }
    // Refusals and monitor's would-be refusals: each in the stream once.
    let rejected = || {
        let stats = s.limiter.cli_json(&["stats"]);
        assert_eq!(stats["would_reject"], 2, "{stats}");
        stats["rejected"].as_u64().unwrap() + stats["would_reject"].as_u64().unwrap()
    };
    let counted = |events: &[serde_json::Value]| -> u64 {
        events.iter().map(|e| e["count"].as_u64().unwrap()).sum()
    };
    let reports = |events: &[serde_json::Value]| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e["summary"] != true)
            .cloned()
            .collect()
    };
    // What the gates and caches still hold arrives within two sweeps.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            let total = rejected();
            total >= 302 && counted(&reports(&events_json(&s))) == total
        }),
        "stats {} vs events {:?}",
        s.limiter.cli_json(&["stats"]),
        events_json(&s)
    );
    // Several periods later, the summaries syslog got have not been added
    // to the stream: the counts of all its lines are the refusals, once.
    std::thread::sleep(Duration::from_millis(2500));
    let events = events_json(&s);
    let total = rejected();
    assert_eq!(counted(&events), total, "{events:#?}");
    assert!(events.iter().all(|e| e["summary"] == false), "{events:#?}");
    // The text says how many each line stands for.
    let text = s.limiter.cli_ok(&["events"]);
    let shown: u64 = text
        .lines()
        .map(|line| {
            let (_, after) = line
                .split_once(" reached by this source IP address. (")
                .unwrap_or_else(|| panic!("no count in {line}"));
            let (n, unit) = after.split_once(' ').unwrap();
            // Monitor's lines stand for connections it let in.
            let monitored = line.contains("would have rejected");
            assert!(
                unit.starts_with(if monitored { "connection" } else { "refusal" }),
                "{line}"
            );
            n.parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(shown, total, "{text}");
}

/// `limiter events --follow --json` as a child reading from the daemon.
fn follower(s: &Scenario) -> std::process::Child {
    Command::new(limiter_bin())
        .args(["events", "--follow", "--json", "--control"])
        .arg(s.limiter.control())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn followers_get_the_stream_and_a_slow_one_is_told_what_it_lost() {
    // "Watch" only reports (monitor) what it would refuse: one report per
    // connection over its cap, each when the handshake completes.
    let s = Scenario::start(&format!(
        "{}{}action = \"monitor\"\n",
        connector("Frontend", "[\"10.77.0.10\"]", "100000", "1", 100),
        connector("Watch", "[\"10.77.0.11\"]", "100000", "1", 100),
    ));
    let _held = s.open(client_v4(0), 1);
    // Two rejections before anyone follows: the recent events. Within a
    // second of each other, the kernel reports the first and holds the
    // second, which the daemon collects once the source is quiet.
    s.refused(client_v4(0));
    s.refused(client_v4(0));
    let recent_events = || -> Vec<serde_json::Value> {
        s.limiter
            .cli_ok(&["events", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let counted = |events: &[serde_json::Value]| -> u64 {
        events.iter().map(|e| e["count"].as_u64().unwrap()).sum()
    };
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            counted(&recent_events()) == 2
        }),
        "{:?}",
        recent_events()
    );
    let recent = recent_events();
    assert!(recent.len() <= 2, "{recent:?}");
    let event = &recent[0];
    for key in [
        "time",
        "event_id",
        "connector",
        "source",
        "configured",
        "effective",
        "rule",
        "message",
    ] {
        assert!(event.get(key).is_some(), "{key} in {event}");
    }
    assert_eq!(event["event_id"], 1021);
    assert!(event["time"].as_str().unwrap().ends_with('Z'));

    let mut fast = follower(&s);
    let mut slow = follower(&s);
    let fast_out = fast.stdout.take().unwrap();
    let counter = std::thread::spawn(move || {
        BufReader::new(fast_out)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("\"event_id\""))
            .count()
    });
    // Let both subscribe (each gets the recent events first).
    std::thread::sleep(Duration::from_millis(500));
    // Thousands of reports while the slow follower reads nothing: a source
    // at its cap on "Watch" opens and closes connections, each reported.
    let sources = 6000;
    // Monitor's reports: counted as would-be rejections, never as
    // rejections.
    let before = s.limiter.cli_json(&["stats"])["would_reject"]
        .as_u64()
        .unwrap();
    let _watched = s.open(client_v4(1), 1);
    for _ in 0..sources {
        drop(s.open(client_v4(1), 1));
    }
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            s.limiter.cli_json(&["stats"])["would_reject"]
                .as_u64()
                .unwrap()
                >= before + sources as u64
        }),
        "{}",
        s.limiter.cli_json(&["stats"])
    );
    // The daemon kept answering throughout.
    assert!(s.limiter.status().live_total >= 2);
    std::thread::sleep(Duration::from_millis(500));
    // Now the slow one reads: it is told what it lost.
    let mut slow_out = String::new();
    let mut slow_stdout = slow.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let _ = slow_stdout.read_to_string(&mut slow_out);
        slow_out
    });
    std::thread::sleep(Duration::from_millis(1000));
    fast.kill().unwrap();
    slow.kill().unwrap();
    let _ = fast.wait();
    let _ = slow.wait();
    let mut slow_err = String::new();
    slow.stderr
        .take()
        .unwrap()
        .read_to_string(&mut slow_err)
        .unwrap();
    let fast_count = counter.join().unwrap();
    let slow_count = drain.join().unwrap().lines().count();
    assert!(
        slow_err.contains("event(s) lost: this reader was too slow"),
        "slow follower stderr: {slow_err:?}; it printed {slow_count} events"
    );
    assert!(slow_count < sources as usize, "{slow_count}");
    // The fast one saw (nearly) every report.
    assert!(
        fast_count >= sources as usize * 9 / 10,
        "the fast follower saw {fast_count} of {}",
        sources + 2
    );
}

/// GET `path` from `addr` in the server's namespace.
fn http_get(s: &Scenario, addr: &str, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: limiter\r\nConnection: close\r\n\r\n");
    let addr = addr.to_string();
    let response = s.lab.server_ns().run(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_are_scraped_over_http() {
    let s = Scenario::start_with(
        Some(&format!(
            "{}{}action = \"monitor\"\n",
            connector("Frontend", "[\"0.0.0.0/0\"]", "100", "2", 100),
            connector("Watch", "[\"10.77.0.11\"]", "100", "1", 100),
        )),
        &["--metrics", "127.0.0.1:9464"],
    );
    let _held = s.open(client_v4(0), 2);
    for _ in 0..3 {
        s.refused(client_v4(0));
    }
    // Monitor admits both; the second would have been refused.
    let _watched = s.open(client_v4(1), 2);
    let (head, body) = http_get(&s, "127.0.0.1:9464", "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} not in\n{body}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("limiter_connections_admitted_total{connector=\"Frontend\"}"),
        2.0
    );
    assert_eq!(
        value(
            "limiter_connections_rejected_total{connector=\"Frontend\",rule=\"per_source\",action=\"enforce\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            "limiter_connections_rejected_total{connector=\"Frontend\",rule=\"total\",action=\"enforce\"}"
        ),
        0.0
    );
    assert_eq!(
        value("limiter_live_connections{connector=\"Frontend\"}"),
        2.0
    );
    assert_eq!(
        value("limiter_connections_admitted_total{connector=\"Watch\"}"),
        2.0
    );
    assert_eq!(
        value(
            "limiter_connections_rejected_total{connector=\"Watch\",rule=\"per_source\",action=\"monitor\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            "limiter_connections_rejected_total{connector=\"Watch\",rule=\"per_source\",action=\"enforce\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            "limiter_connections_rejected_total{connector=\"Frontend\",rule=\"per_source\",action=\"monitor\"}"
        ),
        0.0
    );
    assert_eq!(value("limiter_events_lost_total"), 0.0);
    assert_eq!(value("limiter_map_entries{map=\"established\"}"), 4.0);
    assert_eq!(value("limiter_map_capacity{map=\"established\"}"), 262144.0);
    // No per-source series.
    assert!(!body.contains("10.77.0.10"), "{body}");
    let (head, _) = http_get(&s, "127.0.0.1:9464", "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
