//! What the commands tell the operator, and how they end: a reader that
//! goes away, a user who may not use the control socket, `events --follow`
//! from where asked and to the daemon's stop, and the daemon's word on what
//! stopping does to enforcement.

use limiter_tests::scenario::{Scenario, connector};

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
