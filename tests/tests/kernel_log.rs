//! `limiter run --kernel-log-level`: the kernel programs' rare conditions,
//! told in the daemon's log through aya-log, at most once a second each
//! per CPU; nothing at all without it.

use std::{net::SocketAddrV4, time::Duration};

use limiter_tests::{
    lab::{SERVER_V4, client_v4},
    rawtcp::{RawClient, Shape},
    scenario::{Scenario, completing_together, connector},
    wait_until,
};

const SERVER: SocketAddrV4 = SocketAddrV4::new(SERVER_V4, 25);
const UNREADABLE: &str = "could not be read whole";
const LATE: &str = "judged over a cap when their handshake completed";

fn config() -> String {
    connector("Frontend", "[\"0.0.0.0/0\", \"::/0\"]", "100", "2", 100)
}

/// Ten SYNs whose first fragment cuts the TCP options: dropped unread.
fn unreadable_syns(s: &Scenario) {
    let raw = RawClient::new(&s.lab, client_v4(5), SERVER, 33_000..=33_009);
    for port in 33_000..=33_009 {
        raw.syn(port, Shape::FragmentedInOptions);
    }
    let dropped = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        s.limiter.cli_json(&["stats"])["unreadable_dropped"] == 10
    });
    assert!(dropped, "{}", s.limiter.cli_json(&["stats"]));
}

#[test]
fn rare_kernel_conditions_reach_the_daemons_log_a_line_a_second_at_most() {
    let s = Scenario::start_with(Some(&config()), &["--kernel-log-level", "info"]);
    unreadable_syns(&s);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            s.limiter.log().contains(UNREADABLE)
        }),
        "{}",
        s.limiter.log()
    );
    // Ten in a moment: a line per CPU at most, not one a SYN.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let lines = s.limiter.log().matches(UNREADABLE).count();
    assert!(
        (1..=cpus).contains(&lines),
        "{lines} lines:\n{}",
        s.limiter.log()
    );
    // Four handshakes completing together against a cap of 2: two judged
    // over it.
    let _streams = completing_together(&s.lab, client_v4(0), 4, Duration::from_millis(1500));
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            s.limiter.log().contains(LATE)
        }),
        "{}",
        s.limiter.log()
    );
}

#[test]
fn without_the_option_the_kernel_says_nothing() {
    let s = Scenario::start(&config());
    unreadable_syns(&s);
    let _streams = completing_together(&s.lab, client_v4(0), 4, Duration::from_millis(1500));
    std::thread::sleep(Duration::from_secs(1));
    let log = s.limiter.log();
    assert!(!log.contains(UNREADABLE) && !log.contains(LATE), "{log}");
}
