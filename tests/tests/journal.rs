//! Where events and the daemon's own lines go: a real systemd-journald (the
//! fields `journalctl` queries, and the plain line the rsyslogd it forwards
//! to writes), RFC 3164 to a local socket, and RFC 5424 to a collector over
//! UDP and TCP (a real rsyslogd on loopback in the lab's namespace).

use std::time::Duration;

use limiter::events::{MESSAGE_ID_1009, MESSAGE_ID_1021};
use limiter_tests::{
    Cgroup, HoldServer, Journald, Lab, Limiter, Rsyslog,
    journald::{JournalEntry, without_journald},
    lab::{client_v4, server_v4},
    scenario::{LISTEN, Scenario, connector},
    wait_until,
};

const PER_SOURCE_TEXT: &str = "Receive connector \"Frontend\" rejected an incoming connection from IP address 10.77.0.10. The maximum number of connections per source (1) for this connector has been reached by this source IP address.";
const TOTAL_TEXT: &str = "Receive connector \"Total\" rejected an incoming connection. The maximum number of connections (1) for this connector has been reached.";

/// "Frontend" holds one connection per source from 10.77.0.10-19; "Total"
/// one connection in all from 10.77.0.20-29.
fn two_connectors() -> String {
    format!(
        "{}{}",
        connector("Frontend", "[\"10.77.0.10-10.77.0.19\"]", "100", "1", 100),
        connector(
            "Total",
            "[\"10.77.0.20-10.77.0.29\"]",
            "1",
            "\"unlimited\"",
            100
        )
    )
}

/// Over both caps: three rejections from 10.77.0.10 (1021, the first
/// written at once, the others folded), one from 10.77.0.21 (1009).
fn reject_some(s: &Scenario) -> Vec<std::net::TcpStream> {
    let held = vec![
        s.open(client_v4(0), 1).remove(0),
        s.open(client_v4(10), 1).remove(0),
    ];
    let attempts = s.lab.connect_many(
        client_v4(0).into(),
        server_v4(25),
        3,
        Duration::from_millis(500),
    );
    assert!(attempts.iter().all(|a| a.is_err()), "over the cap");
    s.refused(client_v4(11));
    held
}

fn field<'a>(entry: &'a JournalEntry, name: &str) -> &'a str {
    entry
        .get(name)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{name} in {entry:#?}"))
}

#[test]
fn events_go_to_the_journal_with_their_fields_and_on_to_syslog_as_plain_lines() {
    let journald = Journald::start();
    // auto: journald's socket exists, so the journal. Started as systemd
    // starts a service, with stderr going to the journal too.
    let s = Scenario::start_launched(
        Some(&two_connectors()),
        &["--syslog", "auto", "--event-period", "2s"],
        journald.launch_as_service(),
    );
    let pid = s.limiter.status().pid.to_string();
    let _held = reject_some(&s);
    let summarised = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        journald
            .entries(&["LIMITER_EVENT_ID=1021"])
            .iter()
            .any(|e| e.get("LIMITER_COUNT").and_then(|c| c.as_str()) == Some("2"))
    });
    assert!(
        summarised,
        "{:#?}\njournald: {}\nlimiter: {}",
        journald.entries(&[]),
        journald.log(),
        s.limiter.log()
    );

    // journalctl -t limiter: the daemon's own lines and the events.
    let tagged = journald.entries(&["-t", "limiter"]);
    let start = tagged
        .iter()
        .find(|e| field(e, "MESSAGE").contains("events and log lines go to the systemd journal"))
        .unwrap_or_else(|| panic!("the start line in {tagged:#?}"));
    // Its own lines: facility daemon, info as notice, no MESSAGE_ID.
    assert_eq!(
        (field(start, "SYSLOG_FACILITY"), field(start, "PRIORITY")),
        ("3", "5")
    );
    assert!(start.get("MESSAGE_ID").is_none(), "{start:#?}");
    assert!(
        tagged
            .iter()
            .any(|e| field(e, "MESSAGE").starts_with("enforcing on ")),
        "{tagged:#?}"
    );

    let per_source = journald.entries(&["LIMITER_EVENT_ID=1021"]);
    assert_eq!(per_source.len(), 2, "{per_source:#?}");
    let first = &per_source[0];
    for (name, value) in [
        ("MESSAGE", PER_SOURCE_TEXT),
        ("PRIORITY", "4"),
        ("SYSLOG_FACILITY", "2"),
        ("SYSLOG_IDENTIFIER", "limiter"),
        ("MESSAGE_ID", MESSAGE_ID_1021),
        ("_PID", pid.as_str()),
        ("_TRANSPORT", "journal"),
        ("LIMITER_EVENT_ID", "1021"),
        ("LIMITER_CONNECTOR", "Frontend"),
        ("LIMITER_SOURCE", "10.77.0.10"),
        ("LIMITER_SOURCE_IDENTITY", "10.77.0.10"),
        ("LIMITER_LOCAL", "10.77.0.1:25"),
        ("LIMITER_RULE", "per_source"),
        ("LIMITER_CONFIGURED", "1"),
        ("LIMITER_EFFECTIVE", "1"),
        ("LIMITER_LIVE_TOTAL", "1"),
        ("LIMITER_LIVE_SOURCE", "1"),
        ("LIMITER_ACTION", "drop"),
        ("LIMITER_COUNT", "1"),
    ] {
        assert_eq!(field(first, name), value, "{name} in {first:#?}");
    }
    let summary = &per_source[1];
    assert_eq!(
        field(summary, "MESSAGE"),
        format!("{PER_SOURCE_TEXT} Repeated 2 times in the last 2 seconds.")
    );
    assert_eq!(field(summary, "LIMITER_PERIOD_SECONDS"), "2");

    let total = journald.entries(&["LIMITER_EVENT_ID=1009"]);
    assert_eq!(total.len(), 1, "{total:#?}");
    assert_eq!(field(&total[0], "MESSAGE"), TOTAL_TEXT);
    assert_eq!(field(&total[0], "LIMITER_RULE"), "total");
    assert_eq!(field(&total[0], "MESSAGE_ID"), MESSAGE_ID_1009);

    // The fixed MESSAGE_IDs find them.
    let by_id = journald.entries(&[&format!("MESSAGE_ID={MESSAGE_ID_1021}")]);
    assert_eq!(by_id, per_source);
    assert_eq!(
        journald.entries(&[&format!("MESSAGE_ID={MESSAGE_ID_1009}")]),
        total
    );

    // journald forwards to rsyslogd: a plain line, as in mail.log.
    let plain = format!("limiter[{pid}]: {PER_SOURCE_TEXT}");
    let forwarded = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        journald.syslog_lines().iter().any(|l| l.ends_with(&plain))
    });
    assert!(forwarded, "{plain:?} in {:#?}", journald.syslog_lines());
    let lines = journald.syslog_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(&format!("limiter[{pid}]: {TOTAL_TEXT}"))),
        "{lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("limiter@32473") || l.contains(" 1 20")),
        "no RFC 5424 header as text: {lines:#?}"
    );
    // stderr is the journal's already: each line is in the journal once.
    assert_eq!(s.limiter.log(), "", "nothing twice");
}

#[test]
fn auto_without_journald_writes_to_dev_log_or_says_at_start_that_it_cannot() {
    let s = Scenario::start_launched(
        Some(&two_connectors()),
        &["--syslog", "auto"],
        without_journald(),
    );
    // The test's mount namespace hides journald, not the host's /dev/log.
    let dev_log = std::path::Path::new("/dev/log").exists();
    let expected = if dev_log {
        "events and log lines go to /dev/log (RFC 5424)"
    } else {
        "/dev/log does not exist (no journald and no syslog daemon?): events reach only `limiter events`, and the daemon's own lines only stderr, until a syslog daemon makes it"
    };
    // Said at start, before any event.
    let said = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        s.limiter.log().contains(expected)
    });
    assert!(said, "{}", s.limiter.log());
    if !dev_log {
        // Once: the events that follow are not failures said again.
        let _held = reject_some(&s);
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || s.limiter.cli_ok(&["events"]).lines().count() >= 2
        ));
        std::thread::sleep(Duration::from_millis(500));
        let log = s.limiter.log();
        assert_eq!(log.matches("/dev/log").count(), 1, "{log}");
        assert!(!log.contains("events and log lines go to"), "{log}");
    }
}

#[test]
fn rfc3164_to_a_socket_is_a_plain_tagged_line() {
    let rsyslog = Rsyslog::start_traditional(None);
    let socket = rsyslog.socket();
    let s = Scenario::start_with(
        Some(&two_connectors()),
        &[
            "--syslog",
            socket.to_str().unwrap(),
            "--syslog-format",
            "rfc3164",
        ],
    );
    let pid = s.limiter.status().pid;
    let _held = reject_some(&s);
    let plain = format!("limiter[{pid}]: {PER_SOURCE_TEXT}");
    // The daemon's own lines take the same way.
    let own = format!(
        "limiter[{pid}]: events and log lines go to {} (RFC 3164)",
        socket.display()
    );
    let arrived = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let lines = rsyslog.lines();
        lines.iter().any(|l| l.ends_with(&plain)) && lines.iter().any(|l| l.ends_with(&own))
    });
    assert!(arrived, "{plain:?} and {own:?} in {:#?}", rsyslog.lines());
    // stderr is no journal here: the daemon logs there as well.
    assert!(
        s.limiter.log().contains("enforcing on "),
        "{}",
        s.limiter.log()
    );
}

/// One line of rsyslog's RSYSLOG_SyslogProtocol23Format output: (PRI,
/// MSGID, the rest after MSGID).
fn rfc5424(line: &str) -> (u32, String, String) {
    let (pri, rest) = line
        .strip_prefix('<')
        .and_then(|l| l.split_once(">1 "))
        .unwrap_or_else(|| panic!("not RFC 5424: {line}"));
    let fields: Vec<&str> = rest.splitn(6, ' ').collect();
    assert_eq!(fields[2], "limiter", "APP-NAME in {line}");
    (
        pri.parse().unwrap(),
        fields[4].to_string(),
        fields[5].to_string(),
    )
}

#[test]
fn a_udp_collector_gets_rfc5424() {
    collector_gets_events("udp", 5514);
}

#[test]
fn a_tcp_collector_gets_rfc5424_octet_counted() {
    collector_gets_events("tcp", 5515);
}

fn collector_gets_events(scheme: &str, port: u16) {
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let server = HoldServer::start(&lab, Some(&cgroup), LISTEN);
    // The collector listens on the loopback of the daemon's namespace.
    let rsyslog = Rsyslog::start_collector(lab.server_ns(), 5514, 5515);
    let target = format!("{scheme}://127.0.0.1:{port}");
    let limiter = Limiter::start_with(
        &lab,
        &cgroup,
        Some(&two_connectors()),
        &["--syslog", &target],
    );
    let s = Scenario {
        limiter,
        server,
        cgroup,
        lab,
    };
    let _held = reject_some(&s);
    let lines =
        || -> Vec<(u32, String, String)> { rsyslog.lines().iter().map(|l| rfc5424(l)).collect() };
    let own = format!("- events and log lines go to {target} (RFC 5424)");
    let arrived = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let lines = lines();
        ["1009", "1021", "-"]
            .iter()
            .all(|id| lines.iter().any(|(_, msgid, _)| msgid == id))
            && lines.iter().any(|(_, _, rest)| *rest == own)
    });
    assert!(arrived, "{:#?}\n{}", rsyslog.lines(), s.limiter.log());
    let lines = lines();
    // Each event a line of its own: on TCP, the framing kept them apart.
    let per_source = lines.iter().find(|(_, msgid, _)| msgid == "1021").unwrap();
    // <mail.warning> = 2 * 8 + 4.
    assert_eq!(per_source.0, 20);
    assert!(
        per_source
            .2
            .starts_with("[limiter@32473 event_id=\"1021\" connector=\"Frontend\" ")
            && per_source.2.ends_with(&format!("] {PER_SOURCE_TEXT}")),
        "{per_source:?}"
    );
    let total = lines.iter().find(|(_, msgid, _)| msgid == "1009").unwrap();
    assert!(total.2.ends_with(&format!("] {TOTAL_TEXT}")), "{total:?}");
    // The daemon's own lines: facility daemon, info as notice (3 * 8 + 5),
    // no MSGID, no structured data.
    assert!(
        lines
            .iter()
            .any(|(pri, msgid, rest)| *pri == 29 && msgid == "-" && *rest == own),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|(pri, _, _)| [20, 29].contains(pri)),
        "{lines:#?}"
    );
}
