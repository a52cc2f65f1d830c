//! Reload: SIGHUP and `limiter reload` read the config file again and apply
//! it like a live change; a file that does not pass changes nothing.

use std::time::Duration;

use limiter_tests::{
    lab::client_v4,
    scenario::{Scenario, alive, connector},
    wait_until,
};

fn frontend(per_source: &str) -> String {
    connector("Frontend", "[\"0.0.0.0/0\"]", "100", per_source, 100)
}

fn hang_up(s: &Scenario) {
    let pid = s.limiter.status().pid as i32;
    // SAFETY: a signal to the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

fn per_source(s: &Scenario, name: &str) -> serde_json::Value {
    s.limiter.cli_json(&["connector", "show", name])["max_inbound_connection_per_source"].clone()
}

#[test]
fn an_edited_file_applies_on_sighup_and_becomes_the_baseline() {
    let s = Scenario::start(&frontend("2"));
    let held = s.open(client_v4(0), 2);
    s.refused(client_v4(0));
    // Config management rewrites the file: 4 per source, and a new
    // connector.
    let path = s.limiter.config_path().unwrap().to_path_buf();
    std::fs::write(
        &path,
        format!(
            "# deployed by config management\n{}{}",
            frontend("4"),
            connector("Relay", "[\"10.77.0.20-10.77.0.29\"]", "100", "1", 100)
        ),
    )
    .unwrap();
    // Until the reload, live changes refuse to overwrite the edit.
    let line = s.limiter.cli_err(&[
        "connector",
        "set",
        "Frontend",
        "--max-inbound-connection",
        "50",
    ]);
    assert!(
        line.contains("changed by hand since the daemon read it: `limiter reload` loads it"),
        "{line}"
    );
    hang_up(&s);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            per_source(&s, "Frontend") == 4
        }),
        "{}",
        s.limiter.log()
    );
    let log = s.limiter.log();
    assert!(
        log.contains(&format!(
            "reloaded {}: 2 connector(s); added \"Relay\", changed \"Frontend\", removed none",
            path.display()
        )),
        "{log}"
    );
    // The established connections stayed, and counted: two more fit.
    assert!(held.iter().all(alive));
    let more = s.open(client_v4(0), 2);
    s.refused(client_v4(0));
    assert_eq!(s.limiter.live("Frontend"), 4);
    // The file is the baseline now: live changes work and write to it.
    s.limiter.cli_ok(&[
        "connector",
        "set",
        "Relay",
        "--max-inbound-connection-per-source",
        "3",
    ]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# deployed by config management")
            && text.contains("max_inbound_connection_per_source = 3"),
        "{text}"
    );
    drop((held, more));
}

#[test]
fn a_file_that_does_not_pass_leaves_the_old_limits_in_force() {
    let s = Scenario::start(&frontend("2"));
    let held = s.open(client_v4(0), 2);
    let path = s.limiter.config_path().unwrap().to_path_buf();
    std::fs::write(&path, frontend("0")).unwrap();
    // `limiter reload` says why, in one line, and fails.
    let line = s.limiter.cli_err(&["reload"]);
    assert!(
        line.contains("max_inbound_connection_per_source 0 is out of range")
            && !line.contains('\n'),
        "{line}"
    );
    s.refused(client_v4(0));
    // SIGHUP: the same refusal, in the log; the daemon keeps running.
    hang_up(&s);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            s.limiter.log().contains("SIGHUP: reload refused")
        }),
        "{}",
        s.limiter.log()
    );
    assert!(s.limiter.running());
    assert_eq!(per_source(&s, "Frontend"), 2);
    s.refused(client_v4(0));
    // A file without connectors does not pass either.
    std::fs::write(&path, "# nothing here\n").unwrap();
    let line = s.limiter.cli_err(&["reload"]);
    assert!(line.contains("no connectors"), "{line}");
    s.refused(client_v4(0));
    // A file gone is not the built-in default.
    std::fs::remove_file(&path).unwrap();
    let line = s.limiter.cli_err(&["reload"]);
    assert!(line.contains("does not exist any more"), "{line}");
    assert_eq!(per_source(&s, "Frontend"), 2);
    // Fixed, it applies.
    std::fs::write(&path, frontend("3")).unwrap();
    let said = s.limiter.cli_ok(&["reload"]);
    assert!(
        said.contains("1 connector(s); added none, changed \"Frontend\", removed none"),
        "{said}"
    );
    let more = s.open(client_v4(0), 1);
    s.refused(client_v4(0));
    drop((held, more));
}
