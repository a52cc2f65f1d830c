//! What the commands tell the operator, and how they end: a reader that
//! goes away, a user who may not use the control socket, `events --follow`
//! from where asked and to the daemon's stop, and the daemon's word on what
//! stopping does to enforcement.

use std::process::Command;

use limiter_tests::{
    daemon::limiter_bin,
    scenario::{Scenario, connector},
};

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
