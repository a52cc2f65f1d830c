//! Action `reply` against real mail servers: a sending Postfix over the
//! per-source cap reads the 421 line from the limiter's responder, defers
//! the message without the server Postfix ever seeing the attempt, and
//! delivers it on a retry once its source is under the cap again.

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    time::Duration,
};

use limiter_tests::{
    Cgroup, Lab, Limiter,
    lab::{client_v4, server_v4},
    postfix::{DOMAIN, Postfix},
    scenario::connector,
    wait_until,
};

const CONNECTOR: &str = "Frontend";
const EXCHANGE_421: &str = "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel";

/// The lines of `log` that contain every one of `needles`.
fn lines_with(log: &str, needles: &[&str]) -> Vec<String> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_sending_postfix_over_the_cap_defers_on_the_421_and_delivers_once_under_it() {
    let source: IpAddr = client_v4(0).into();
    let lab = Lab::new();
    let cgroup = Cgroup::new();
    let server = Postfix::start(&lab, &cgroup);
    let limiter = Limiter::start(
        &lab,
        &cgroup,
        &format!(
            "{}action = \"reply\"\n",
            connector(CONNECTOR, "[\"0.0.0.0/0\", \"::/0\"]", "100", "1", 100)
        ),
    );
    let sender = Postfix::start_relay_client(&lab, source, server_v4(25));

    // The one connection the source may have: the server Postfix greets it.
    let held = lab
        .connect(source, server_v4(25), Duration::from_secs(1))
        .expect("the first connection from the source is admitted");
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = String::new();
    BufReader::new(&held).read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("220 "), "greeting: {greeting:?}");
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            limiter.live(CONNECTOR) == 1
        }),
        "live {} with one connection held",
        limiter.live(CONNECTOR)
    );

    let recipient = format!("someone@{DOMAIN}");
    sender.submit(
        &format!("sender@client.{DOMAIN}"),
        &recipient,
        &format!("To: {recipient}\nSubject: over the cap\n\nRetried after a 421.\n"),
    );

    // Postfix reads the responder's line as the greeting and defers.
    let deferred = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        !lines_with(&sender.log(), &["status=deferred", "421 4.3.2"]).is_empty()
    });
    let sender_log = sender.log();
    assert!(
        deferred,
        "no deferral on the 421 in the sender's log:\n{sender_log}\nlimiter:\n{}",
        limiter.log()
    );
    let deferrals = lines_with(&sender_log, &["status=deferred", "421 4.3.2"]);
    eprintln!("the sender deferred:\n{}", deferrals.join("\n"));
    assert!(
        deferrals.iter().any(|l| l.contains(EXCHANGE_421)),
        "the whole line reached Postfix: {deferrals:?}"
    );
    assert!(
        !sender.queue_is_empty(),
        "the message waits in the sender's queue"
    );
    // The server never saw the attempt: nothing delivered, one connection
    // counted, and its smtpd logged only the held one. (Not `ss`: the
    // responder's own sockets on port 25 come and go with each retry.)
    assert!(
        server.delivered_by_client().is_empty(),
        "{:?}",
        server.delivered_by_client()
    );
    assert_eq!(limiter.live(CONNECTOR), 1);
    let connects = lines_with(&server.log(), &["smtpd", "connect from"])
        .into_iter()
        .filter(|l| !l.contains("disconnect from"))
        .count();
    assert_eq!(connects, 1, "server log:\n{}", server.log());
    let stats = limiter.cli_json(&["stats"]);
    assert!(stats["replied"].as_u64().unwrap() >= 1, "{stats}");

    // Under the cap again, the sender's own retry (its backoff is 1-2 s
    // here) goes through: no flush needed.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            limiter.live(CONNECTOR) == 0
        }),
        "live {} after the held connection closed",
        limiter.live(CONNECTOR)
    );
    let delivered = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        server.delivered_by_client().get(&source.to_string()) == Some(&1)
    });
    assert!(
        delivered,
        "not delivered: {:?}\nsender log:\n{}\nserver log:\n{}",
        server.delivered_by_client(),
        sender.log(),
        server.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            !lines_with(&sender.log(), &["status=sent", &recipient]).is_empty()
        }),
        "the sender logs the delivery:\n{}",
        sender.log()
    );
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || sender.queue_is_empty()
    ));
    assert_eq!(server.delivered_by_client().len(), 1);
}
