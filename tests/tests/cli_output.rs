//! What the commands tell the operator, and how they end: a reader that
//! goes away, a user who may not use the control socket, `events --follow`
//! from where asked and to the daemon's stop, and the daemon's word on what
//! stopping does to enforcement.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    process::{Command, Output, Stdio},
    time::Duration,
};

use limiter_tests::{
    daemon::limiter_bin,
    lab::client_v4,
    scenario::{Scenario, connector},
    wait_until,
};

/// "Frontend", one connection per source, action monitor: every connection
/// over the cap is admitted and reported on its own, so a test makes
/// exactly as many events as it opens connections.
fn monitor_config() -> String {
    format!(
        "{}action = \"monitor\"\n",
        connector("Frontend", "[\"0.0.0.0/0\"]", "100000", "1", 100)
    )
}

/// One more event: a connection over the cap of a source that holds one.
fn one_event(s: &Scenario) {
    drop(s.open(client_v4(0), 1));
}

fn events_json(s: &Scenario, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["events", "--json"];
    args.extend(extra);
    s.limiter
        .cli_ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The command ended quietly: exit 0, or killed by SIGPIPE (141 in a
/// shell), and nothing on stderr (no panic, no error).
fn assert_quiet(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) || out.status.signal() == Some(libc::SIGPIPE),
        "limiter {what}: {:?}: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "limiter {what}: {stderr}");
}

#[test]
fn a_reader_that_goes_away_ends_every_command_quietly() {
    let s = Scenario::start(&monitor_config());
    let _held = s.open(client_v4(0), 1);
    // Far more than a pipe holds: each JSON line is some 600 bytes.
    for _ in 0..400 {
        one_event(&s);
    }
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            events_json(&s, &[]).len() >= 400
        }),
        "{}",
        s.limiter.log()
    );
    let control = s.limiter.control().to_str().unwrap().to_string();
    let with_control = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--control".to_string(), control.clone()]);
        all
    };
    let mut commands: Vec<Vec<String>> = [
        &["events", "--json"][..],
        &["events"],
        &["sources"],
        &["sources", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["status"],
        &["status", "--json"],
        &["connector", "list"],
        &["connector", "list", "--json"],
        &["connector", "show", "Frontend"],
        &["explain", "10.77.0.10"],
        &["explain", "10.77.0.10", "--json"],
    ]
    .iter()
    .map(|args| with_control(args))
    .collect();
    commands.push(vec!["--help".into()]);
    commands.push(vec!["events".into(), "--help".into()]);
    // A pipe whose reader is gone before the command writes a byte: every
    // write fails, whatever the command prints.
    for args in &commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(limiter_bin())
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_quiet(&args.join(" "), &out);
    }
    // `limiter events --json | head -1`, again and again.
    for args in [&["events", "--json"][..], &["events"]] {
        for _ in 0..30 {
            let mut child = Command::new(limiter_bin())
                .args(with_control(args))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut first = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            assert!(first.contains("1021"), "{first}");
            assert_quiet(&args.join(" "), &child.wait_with_output().unwrap());
        }
    }
    // The daemon wrote to readers that went away too, and lives on.
    assert_eq!(s.limiter.status().live_total, 1);
}

#[test]
fn a_user_who_may_not_use_the_socket_is_told_so() {
    let s = Scenario::start(&connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100));
    // nobody: the socket is root's, mode 0600.
    for args in [&["status"][..], &["events"], &["stats", "--json"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(limiter_bin())
            .args(args)
            .arg("--control")
            .arg(s.limiter.control())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("limiter: permission denied on the control socket ")
                && stderr.contains("run as root, or as a member of the group")
                && stderr.contains("--control-group"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("is `limiter run` running"), "{stderr}");
    }
    // Where nothing is, the daemon may well not run.
    let missing = s.limiter.control().with_file_name("missing.sock");
    let out = Command::new(limiter_bin())
        .args(["stats", "--control"])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("(is `limiter run` running?)") && !stderr.contains("permission"),
        "{stderr}"
    );
}

#[test]
fn stopping_says_in_one_line_what_happens_to_the_programs() {
    let config = connector("Frontend", "[\"0.0.0.0/0\"]", "100", "1", 100);
    let mut kept = Scenario::start_with(Some(&config), &["--keep-attached"]);
    // `limiter detach` refuses while it runs, and says what a stop leaves.
    let refusal = kept.limiter.cli_err(&["detach"]);
    assert!(
        refusal.contains("unless it runs with --keep-attached")
            && refusal.contains("then run `limiter detach` after it stopped"),
        "{refusal}"
    );
    let log = kept.limiter.terminate();
    assert!(
        log.contains(
            "SIGTERM: stopping; the programs stay attached (--keep-attached): they keep enforcing"
        ),
        "{log}"
    );
    assert!(!log.contains("detach"), "{log}");
    drop(kept);

    let mut plain = Scenario::start(&config);
    let log = plain.limiter.terminate();
    assert!(
        log.contains("SIGTERM: stopping and detaching the programs"),
        "{log}"
    );
    assert!(!log.contains("stay attached"), "{log}");
}
