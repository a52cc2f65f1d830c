//! The try-it lab behind `cargo xtask demo` (and its end-to-end test): a
//! real Postfix behind the limiter, real SMTP clients (swaks,
//! smtp-source), and what an operator would look at meanwhile.
//!
//! | who                  | address                        | connector               |
//! |----------------------|--------------------------------|-------------------------|
//! | well-behaved senders | 10.77.0.10-.12, fd77:0:0:2::10 | Default Frontend        |
//! | the flooder          | 10.77.0.13                     | Default Frontend        |
//! | the reconnector      | 10.77.0.14                     | Default Frontend        |
//! | the application      | 10.77.0.20                     | Application Relay       |
//!
//! smtp-source cannot choose its source address, so the application and
//! the flooder reach the server by addresses of their own (10.77.0.2,
//! 10.77.0.3) whose routes name the source to use.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Cgroup, Lab, Limiter,
    lab::{client_v4, client_v6},
    postfix::{DOMAIN, Postfix},
    ss::established_at_server,
    wait_until,
};

/// The per-source limit of the front door.
pub const FRONTEND_PER_SOURCE: u32 = 10;
/// The front door's connection rate per source: this many a unit.
pub const FRONTEND_RATE: u32 = 30;
/// Its unit, in seconds: a short one, for a short demo.
pub const FRONTEND_RATE_UNIT: u32 = 10;

/// The lab's connectors: a front door with a low total, so that the
/// percentage rule shows, and a relay for the application's range with
/// room for its parallel sessions, as in the seed.
pub fn config() -> String {
    format!(
        r#"handshake_timeout = "5s"

[[connector]]
name = "Default Frontend"
bindings = ["0.0.0.0:25", "[::]:25"]
max_inbound_connection = 40
max_inbound_connection_per_source = {FRONTEND_PER_SOURCE}
max_inbound_connection_percentage_per_source = 25
max_inbound_connection_rate_per_source = {FRONTEND_RATE}
connection_rate_time_unit = {FRONTEND_RATE_UNIT}
action = "reply"

[[connector]]
name = "Application Relay"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.77.0.20-10.77.0.24"]
max_inbound_connection = 200
max_inbound_connection_per_source = 50
max_inbound_connection_percentage_per_source = 100
"#
    )
}

/// The well-behaved senders.
pub fn senders() -> Vec<IpAddr> {
    vec![
        client_v4(0).into(),
        client_v4(1).into(),
        client_v4(2).into(),
        client_v6(3).into(),
    ]
}

/// The flooder's address.
pub fn flooder() -> IpAddr {
    client_v4(3).into()
}

/// The address of a sender that reconnects in a loop, a message a
/// connection, as fast as it can.
pub fn reconnector() -> IpAddr {
    client_v4(4).into()
}

/// The application's address.
pub fn application() -> IpAddr {
    client_v4(10).into()
}

/// Sessions the application runs at once, and messages per session.
const APP_SESSIONS: usize = 30;
const APP_MESSAGES_PER_SESSION: usize = 10;
/// Sessions the flooder tries to hold at once (each sends a message a
/// second for 20 s).
const FLOOD_SESSIONS: usize = 25;

/// How the demo runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the clients send.
    pub duration: Duration,
    /// Print the sources table and the events as they come.
    pub show: bool,
}

/// What happened, for the summary (and the test).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Messages each client got accepted, by its own account.
    pub sent: BTreeMap<String, usize>,
    /// Messages found in the maildir, by the client address Postfix
    /// recorded.
    pub delivered: BTreeMap<String, usize>,
    /// Rejected connection attempts, by (source, rule).
    pub refused: BTreeMap<(String, String), u64>,
    /// When the reconnector's messages were accepted, since the start.
    pub reconnector_accepted: Vec<Duration>,
    /// The most connections the flooder held at once (from `ss`).
    pub flooder_most_held: usize,
    /// `limiter explain` for the flooder, while it floods.
    pub explain_flooder: String,
    /// What swaks saw, sent from the flooder's address while it holds its
    /// cap: the responder's 421 line.
    pub flooder_reply: String,
    /// `limiter stats --json` at the end.
    pub stats: serde_json::Value,
    /// Whether it stopped early (Ctrl-C).
    pub interrupted: bool,
}

fn run_ok(mut cmd: Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the lab until `options.duration` has passed or `stop` is set, and
/// returns what happened. Everything it made is removed when it returns.
pub fn run(options: &Options, stop: &AtomicBool) -> Summary {
    let lab = Lab::new();
    let server = lab.server_ns();
    for extra in ["10.77.0.2/24", "10.77.0.3/24"] {
        server.ip(&["addr", "add", extra, "dev", lab.server_iface()]);
    }
    for (entry, source) in [("10.77.0.2", application()), ("10.77.0.3", flooder())] {
        lab.client_ns().ip(&[
            "route",
            "add",
            &format!("{entry}/32"),
            "dev",
            lab.client_iface(),
            "src",
            &source.to_string(),
        ]);
    }
    let cgroup = Cgroup::new();
    let postfix = Postfix::start(&lab, &cgroup);
    let limiter = Limiter::start(&lab, &cgroup, &config());
    if options.show {
        println!("\nlimiter is attached to the server's interface; the connectors:\n");
        println!("{}", limiter.cli_ok(&["connector", "list"]));
    }

    let deadline = Instant::now() + options.duration;
    let running = || Instant::now() < deadline && !stop.load(Ordering::Relaxed);
    let sent: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let started = Instant::now();
    let reconnector_accepted: Mutex<Vec<Duration>> = Mutex::default();
    let refused: Mutex<BTreeMap<(String, String), u64>> = Mutex::default();
    let flooder_most_held = AtomicUsize::new(0);
    let explain_flooder = Mutex::new(String::new());
    let mut flooder_reply = String::new();

    // The events, as `limiter events --follow` shows them.
    let mut follower = Command::new(crate::daemon::limiter_bin())
        .args(["events", "--follow", "--json", "--control"])
        .arg(limiter.control())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("limiter events --follow");
    let events = follower.stdout.take().expect("piped");

    std::thread::scope(|scope| {
        scope.spawn(|| {
            for line in BufReader::new(events).lines().map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let key = (
                    event["source"].as_str().unwrap_or("?").to_string(),
                    event["rule"].as_str().unwrap_or("?").to_string(),
                );
                // A report stands for `count` refusals (the kernel folds
                // a flood's).
                let count = event["count"].as_u64().unwrap_or(1);
                *refused.lock().unwrap().entry(key).or_default() += count;
                if options.show {
                    let rule =
                        limiter_common::Rule::from_name(event["rule"].as_str().unwrap_or(""))
                            .map_or("?", limiter_common::Rule::exchange_name);
                    println!(
                        "  event {} {} ({count} refused) [{rule} cap {}, live {}]",
                        event["event_id"],
                        event["message"].as_str().unwrap_or(""),
                        event["effective"],
                        event["live_total"]
                    );
                }
            }
        });
        for sender in senders() {
            let sent = &sent;
            let lab = &lab;
            scope.spawn(move || {
                let server = if sender.is_ipv4() {
                    crate::lab::SERVER_V4.to_string()
                } else {
                    crate::lab::SERVER_V6.to_string()
                };
                let mut n = 0;
                while running() {
                    let mut swaks = lab.client_ns().command("swaks");
                    swaks
                        .args(["--server", &server, "--port", "25"])
                        .args(["--local-interface", &sender.to_string()])
                        .args([
                            "--from",
                            &format!("sender@{}.example", sender.to_string().replace(':', "-")),
                        ])
                        .args(["--to", &format!("inbox@{DOMAIN}")])
                        .args(["--header", &format!("Subject: message {n} from {sender}")]);
                    if run_ok(swaks) {
                        n += 1;
                        *sent.lock().unwrap().entry(sender.to_string()).or_default() += 1;
                    }
                    // At most two connections a second: well within the
                    // front door's rate.
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        }
        scope.spawn(|| {
            // No pause between sessions: slowed to the connector's rate,
            // told so with a 421 (or dropped past the replies a second).
            let sender = reconnector().to_string();
            let mut n = 0;
            while running() {
                let mut swaks = lab.client_ns().command("swaks");
                swaks
                    .args([
                        "--server",
                        &crate::lab::SERVER_V4.to_string(),
                        "--port",
                        "25",
                    ])
                    .args(["--local-interface", &sender])
                    .args(["--timeout", "2"])
                    .args(["--from", "again@reconnect.example"])
                    .args(["--to", &format!("inbox@{DOMAIN}")])
                    .args(["--header", &format!("Subject: message {n} from {sender}")]);
                if run_ok(swaks) {
                    n += 1;
                    *sent.lock().unwrap().entry(sender.clone()).or_default() += 1;
                    reconnector_accepted.lock().unwrap().push(started.elapsed());
                }
            }
        });
        scope.spawn(|| {
            while running() {
                let mut source = lab.client_ns().command("smtp-source");
                source
                    .arg("-d")
                    .args(["-s", &APP_SESSIONS.to_string()])
                    .args(["-m", &(APP_SESSIONS * APP_MESSAGES_PER_SESSION).to_string()])
                    .args(["-f", "app@app.example", "-t", &format!("inbox@{DOMAIN}")])
                    .arg("10.77.0.2:25");
                if run_ok(source) {
                    *sent
                        .lock()
                        .unwrap()
                        .entry(application().to_string())
                        .or_default() += APP_SESSIONS * APP_MESSAGES_PER_SESSION;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        scope.spawn(|| {
            // It keeps coming back: each run dies at its first refused
            // connection, with the ones it got still open.
            while running() {
                let mut source = lab.client_ns().command("smtp-source");
                source
                    .args(["-d", "-w", "1"])
                    .args(["-s", &FLOOD_SESSIONS.to_string()])
                    .args(["-m", &(FLOOD_SESSIONS * 20).to_string()])
                    .args(["-f", "bulk@flood.example", "-t", &format!("inbox@{DOMAIN}")])
                    .arg("10.77.0.3:25")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let Ok(mut child) = source.spawn() else {
                    break;
                };
                while running() && child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // What an operator watches: who holds how many, refreshed; and, in
        // the thick of it, why the flooder is refused.
        let mut last_table = Instant::now();
        let explain_at = Instant::now() + options.duration * 3 / 5;
        while running() {
            if explain_flooder.lock().unwrap().is_empty() && Instant::now() >= explain_at {
                let text = limiter.cli_ok(&["explain", &flooder().to_string()]);
                if options.show {
                    println!("\n$ limiter explain {}\n{text}", flooder());
                }
                *explain_flooder.lock().unwrap() = text;
            }
            if flooder_reply.is_empty() && Instant::now() >= explain_at {
                flooder_reply = refused_transcript(&lab).unwrap_or_default();
                if options.show && !flooder_reply.is_empty() {
                    println!("\n$ swaks from the flooder's address\n{flooder_reply}");
                }
            }
            // The responder's short connections (its 421s) are not held.
            let held = established_at_server(lab.server_ns(), 25)
                .into_iter()
                .filter(|(_, remote)| remote.ip() == flooder())
                .count();
            flooder_most_held.fetch_max(held, Ordering::Relaxed);
            if options.show && last_table.elapsed() >= Duration::from_secs(2) {
                last_table = Instant::now();
                println!("\n$ limiter sources\n{}", limiter.cli_ok(&["sources"]));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the last sessions finish.
        std::thread::sleep(Duration::from_secs(1));
        let _ = follower.kill();
        let _ = follower.wait();
    });

    // Everything accepted is delivered once the queue is empty.
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        postfix.queue_is_empty()
    });
    Summary {
        sent: sent.into_inner().unwrap(),
        delivered: postfix.delivered_by_client(),
        refused: refused.into_inner().unwrap(),
        reconnector_accepted: reconnector_accepted.into_inner().unwrap(),
        flooder_most_held: flooder_most_held.into_inner(),
        explain_flooder: explain_flooder.into_inner().unwrap(),
        flooder_reply,
        stats: limiter.cli_json(&["stats"]),
        interrupted: stop.load(Ordering::Relaxed),
    }
}

/// One SMTP session from the flooder's address, as swaks shows it, if the
/// server's side answered with a 421 line (the connector's action reply):
/// the flooder's cap is full only while its sessions run, so it tries a
/// few times.
fn refused_transcript(lab: &Lab) -> Option<String> {
    for _ in 0..20 {
        let mut swaks = lab.client_ns().command("swaks");
        swaks
            .args(["--server", "10.77.0.3", "--port", "25"])
            .args(["--from", "bulk@flood.example"])
            .args(["--to", &format!("inbox@{DOMAIN}")])
            .args(["--timeout", "5"]);
        if let Ok(out) = swaks.output() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("<** 421") {
                return Some(
                    text.lines()
                        .filter(|l| {
                            l.starts_with("===") || l.starts_with("<**") || l.starts_with("**")
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

impl Summary {
    /// The most of the reconnector's messages accepted within any one unit
    /// of the front door's rate.
    pub fn reconnector_most_in_a_unit(&self) -> usize {
        let unit = Duration::from_secs(FRONTEND_RATE_UNIT.into());
        let times = &self.reconnector_accepted;
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|&&t| t < times[i] + unit)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// The summary for people.
    pub fn print(&self) {
        println!("\n=== summary ===\n");
        println!("messages delivered to the maildir, by client:");
        let mut clients: Vec<&String> = self.delivered.keys().chain(self.sent.keys()).collect();
        clients.sort();
        clients.dedup();
        for client in clients {
            let role = if client == &flooder().to_string() {
                "flooder"
            } else if client == &reconnector().to_string() {
                "reconnector"
            } else if client == &application().to_string() {
                "application"
            } else {
                "sender"
            };
            println!(
                "  {client:<16} {role:<12} delivered {:>5}   accepted by its own count {:>5}",
                self.delivered.get(client).copied().unwrap_or(0),
                self.sent
                    .get(client)
                    .map_or("-".to_string(), |n| n.to_string())
            );
        }
        println!("\nconnections refused, by source and rule:");
        if self.refused.is_empty() {
            println!("  none");
        }
        for ((source, rule), n) in &self.refused {
            println!("  {source:<16} {rule:<12} {n:>5}");
        }
        println!(
            "\nthe flooder held at most {} connections at once (its cap: {FRONTEND_PER_SOURCE} per source, or less by the percentage rule)",
            self.flooder_most_held
        );
        println!(
            "the reconnector got at most {} messages accepted in any {FRONTEND_RATE_UNIT} s (its rate: {FRONTEND_RATE} connections per {FRONTEND_RATE_UNIT} s)",
            self.reconnector_most_in_a_unit()
        );
        println!(
            "\n$ limiter explain {}\n{}",
            flooder(),
            self.explain_flooder
        );
        println!(
            "\n$ swaks --server 10.77.0.3 (from the flooder's address, at its cap)\n{}",
            if self.flooder_reply.is_empty() {
                "(no 421 seen)"
            } else {
                &self.flooder_reply
            }
        );
    }
}
