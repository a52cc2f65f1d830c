//! The try-it lab of `cargo xtask demo`, as a test: a real Postfix behind
//! the limiter, real swaks and smtp-source clients.

use std::{sync::atomic::AtomicBool, time::Duration};

use limiter_tests::demo::{self, FRONTEND_PER_SOURCE, FRONTEND_RATE, Options};

#[test]
fn the_demo_delivers_what_it_should_and_holds_the_flooder_to_its_cap() {
    let stop = AtomicBool::new(false);
    let summary = demo::run(
        &Options {
            duration: Duration::from_secs(12),
            show: false,
        },
        &stop,
    );
    summary.print();
    // Every message a well-behaved sender or the application got accepted
    // was delivered to the maildir.
    for client in demo::senders().into_iter().chain([demo::application()]) {
        let client = client.to_string();
        let sent = summary.sent.get(&client).copied().unwrap_or(0);
        assert!(sent > 0, "{client} sent nothing: {summary:?}");
        assert_eq!(
            summary.delivered.get(&client).copied(),
            Some(sent),
            "{client}: {summary:?}"
        );
    }
    // The application's parallel sessions all fit its relay connector, the
    // senders' pace the front door's rate.
    let flooder = demo::flooder().to_string();
    let reconnector = demo::reconnector().to_string();
    assert!(
        summary
            .refused
            .keys()
            .all(|(source, _)| source == &flooder || source == &reconnector),
        "only the flooder and the reconnector are refused: {:?}",
        summary.refused
    );
    // The reconnector is slowed to its rate: refused by it, and never more
    // accepted in a unit than the rate allows. Counted by when its sessions
    // ended, one at a time: an admission lies between the end of the
    // session before and the end of its own, so a unit of end times holds
    // at most one admission from outside the unit.
    assert!(
        summary
            .refused
            .get(&(reconnector.clone(), "rate".to_string()))
            .is_some_and(|&n| n > 0),
        "{:?}",
        summary.refused
    );
    let most = summary.reconnector_most_in_a_unit();
    assert!(
        most > 0 && most <= FRONTEND_RATE as usize + 1,
        "{most} in a unit: {summary:?}"
    );
    // The flooder met its cap, and never held more.
    let refused: u64 = summary
        .refused
        .iter()
        .filter(|((_, rule), _)| rule == "per_source" || rule == "percentage")
        .map(|(_, n)| n)
        .sum();
    assert!(refused > 0, "{summary:?}");
    assert!(
        summary.flooder_most_held > 0 && summary.flooder_most_held <= FRONTEND_PER_SOURCE as usize,
        "{summary:?}"
    );
    assert!(
        summary
            .explain_flooder
            .contains("connector \"Default Frontend\""),
        "{}",
        summary.explain_flooder
    );
    assert!(summary.stats["admitted"].as_u64().unwrap() > 0);
    // A sender over the cap hears why, as from Exchange.
    assert!(
        summary.flooder_reply.contains(
            "<** 421 4.3.2 The maximum number of concurrent connections has exceeded a limit"
        ),
        "{}",
        summary.flooder_reply
    );
    assert!(summary.stats["replied"].as_u64().unwrap() > 0);
}
