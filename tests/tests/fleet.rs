//! The fleet lab itself: two servers, each with a real sshd and its own
//! limiter daemon, reached from the ops namespace through the system ssh
//! client with the lab's `ssh_config` (what `LIMITER_SSH` carries).

use std::time::{Duration, Instant};

use limiter_tests::{FleetLab, daemon::limiter_bin, scenario::connector};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `ssh mxK limiter status --json` from the ops namespace: the daemon's
/// status as JSON.
fn remote_status(fleet: &FleetLab, destination: &str) -> serde_json::Value {
    let out = fleet.ssh(destination, &["limiter", "status", "--json"]);
    assert!(
        out.status.success(),
        "ssh {destination} limiter status --json: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{destination}: {e}: {}", text(&out.stdout)))
}

#[test]
fn each_server_answers_with_its_own_daemon_and_a_stopped_sshd_fails_fast() {
    let mut fleet = FleetLab::new(2);
    assert_eq!(fleet.hosts(), ["mx1", "mx2"]);
    for k in 1..=2 {
        fleet.start_limiter(
            k,
            &connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "10", 100),
        );
    }
    let pids = [fleet.limiter(1).status().pid, fleet.limiter(2).status().pid];
    assert_ne!(pids[0], pids[1]);

    // The session's environment: the binary under test first on PATH, and
    // the server's own control socket.
    let out = fleet.ssh("mx1", &["command -v limiter; echo $LIMITER_CONTROL"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}\n{}\n",
            fleet.dir().join("bin/limiter").display(),
            fleet.control(1).display()
        )
    );
    assert_eq!(
        std::fs::canonicalize(fleet.dir().join("bin/limiter")).unwrap(),
        std::fs::canonicalize(limiter_bin()).unwrap()
    );

    // Each server's sshd runs that server's daemon's status.
    for (k, pid) in [(1, pids[0]), (2, pids[1])] {
        let status = remote_status(&fleet, &format!("mx{k}"));
        assert_eq!(status["pid"], pid, "mx{k}: {status}");
        assert_eq!(
            status["interfaces"][0]["name"],
            fleet.server_iface(k),
            "mx{k}: {status}"
        );
        assert_eq!(status["connectors"][0]["name"], "Frontend", "mx{k}");
    }
    // The bare address works as well as the name.
    assert_eq!(remote_status(&fleet, "10.78.2.1")["pid"], pids[1]);

    // The CLI runs in the ops namespace, where no daemon is.
    let out = fleet.cli(&["--version"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A daemon that is down: ssh works, the remote limiter fails.
    fleet.kill_limiter(2);
    let out = fleet.ssh("mx2", &["limiter", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    fleet.restart_limiter(2);
    let restarted = fleet.limiter(2).status().pid;
    assert_eq!(remote_status(&fleet, "mx2")["pid"], restarted);

    // mx2's sshd stopped: ssh to it fails at once, mx1 still answers.
    fleet.stop_sshd(2);
    assert!(!fleet.sshd_running(2));
    let start = Instant::now();
    let out = fleet.ssh("mx2", &["limiter", "status", "--json"]);
    assert_eq!(out.status.code(), Some(255), "ssh's own failure");
    assert!(
        text(&out.stderr).contains("Connection refused"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(remote_status(&fleet, "mx1")["pid"], pids[0]);

    // And back.
    fleet.start_sshd(2);
    assert_eq!(remote_status(&fleet, "mx2")["pid"], restarted);
}
