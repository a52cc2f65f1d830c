//! What the commands tell the operator, and how they end: a reader that
//! goes away, a user who may not use the control socket, `events --follow`
//! from where asked and to the daemon's stop, and the daemon's word on what
//! stopping does to enforcement.

use std::{
    io::{BufRead, BufReader, Read},
    os::unix::process::ExitStatusExt,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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

/// `limiter events ARGS` as a child, its lines collected as they come.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(s: &Scenario, args: &[&str]) -> Follower {
        let mut child = Command::new(limiter_bin())
            .args(["events", "--json"])
            .args(args)
            .arg("--control")
            .arg(s.limiter.control())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let into = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                into.lock().unwrap().push(line);
            }
        });
        Follower {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits up to 10 s for it to end; returns its status and stderr.
    fn end(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the follower did not end when the daemon stopped");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stderr)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_since_and_lines_and_a_follower_that_starts_where_asked_and_ends_with_the_daemon() {
    let mut s = Scenario::start(&monitor_config());
    let _held = s.open(client_v4(0), 1);
    for _ in 0..15 {
        one_event(&s);
    }
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            events_json(&s, &[]).len() == 15
        }),
        "{:?}",
        events_json(&s, &[])
    );
    let all = events_json(&s, &[]);
    assert_eq!(events_json(&s, &["-n", "3"]), all[12..]);
    assert_eq!(events_json(&s, &["--lines", "all"]), all);
    assert_eq!(events_json(&s, &["--since", "1h"]), all);
    assert!(events_json(&s, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    // The times have the same form, so they sort as text.
    let since = all[9]["time"].as_str().unwrap();
    let from_then: Vec<serde_json::Value> = all
        .iter()
        .filter(|e| e["time"].as_str().unwrap() >= since)
        .cloned()
        .collect();
    assert_eq!(events_json(&s, &["--since", since]), from_then);
    assert_eq!(events_json(&s, &["--since", since, "-n", "1"]), all[14..]);

    // Following starts from the last ten, or from now with -n 0.
    let tail = Follower::start(&s, &["--follow"]);
    let new_only = Follower::start(&s, &["-n", "0", "--follow"]);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            tail.events().len() >= 10
        }),
        "{:?}",
        tail.events()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tail.events(), all[5..]);
    assert!(new_only.events().is_empty(), "{:?}", new_only.events());
    one_event(&s);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            tail.events().len() == 11 && new_only.events().len() == 1
        }),
        "{:?}\n{:?}",
        tail.events(),
        new_only.events()
    );
    assert_eq!(tail.events()[10], new_only.events()[0]);

    // The daemon stops: each follower says so, in one line, and exits 0.
    s.limiter.terminate();
    for follower in [tail, new_only] {
        let (status, stderr) = follower.end();
        assert_eq!(
            stderr, "limiter: the daemon stopped (control socket closed)\n",
            "{status:?}"
        );
        assert!(status.success(), "{status:?}: {stderr}");
    }
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
