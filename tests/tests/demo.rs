//! The try-it lab of `cargo xtask demo`, as a test: a real Postfix behind
//! the limiter, real swaks and smtp-source clients.

use std::{sync::atomic::AtomicBool, time::Duration};

use limiter_tests::demo::{self, FRONTEND_PER_SOURCE, Options};

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
    // The application's parallel sessions all fit its relay connector.
    let flooder = demo::flooder().to_string();
    assert!(
        summary.refused.keys().all(|(source, _)| source == &flooder),
        "only the flooder is refused: {:?}",
        summary.refused
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
