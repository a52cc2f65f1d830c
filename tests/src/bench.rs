//! `cargo xtask bench`: what XDP buys, measured side by side in one run.
//!
//! 1. Per-packet cost of the loaded program through BPF_PROG_TEST_RUN,
//!    against bare XDP_PASS / XDP_DROP programs loaded in the same run.
//! 2. The same as the tables grow (remote ranges, live sources).
//! 3. A SYN flood over a veth (live-frames generator, one core) into the
//!    limiter, a bare XDP_DROP, iptables connlimit, nftables ct count, and
//!    nothing: the highest rate handled on one pinned core, and the receive
//!    path's CPU at a fixed 50 kpps.
//!
//! The machines are noisy: every figure is a median of rounds, and the
//! targets are ratios of figures taken in the same run.

use std::{
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use limiter::{
    baseline::{BARE_DROP, BARE_PASS, Baseline, HEADER_DROP},
    config::Config,
    kernel::{Kernel, TableSizes},
    selection::SelectionTable,
};
use limiter_common::{
    addr,
    maps::{FlowKey, control, stat},
};
use serde::Serialize;

use crate::{
    floodlab::{FloodLab, SERVER, SERVER as FLOOD_SERVER, flood_source},
    frames::{ACK, IPPROTO_UDP, PSH, Segment},
    run_checked,
};

/// How thorough a run is.
#[derive(Clone, Debug)]
pub struct Options {
    /// Under a minute.
    pub quick: bool,
    /// Which parts run (all when none is named): for working on one of them.
    pub only: Vec<Part>,
}

/// A part of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Micro,
    Scale,
    Flood,
}

impl Options {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    fn rounds(&self) -> usize {
        if self.quick { 5 } else { 11 }
    }

    /// Rounds of the flood cases, each round every subject in turn, so that
    /// the machine's drift falls on all of them alike.
    fn flood_rounds(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }

    fn flood_seconds(&self) -> Duration {
        Duration::from_millis(if self.quick { 1000 } else { 3000 })
    }
}

/// BPF_PROG_TEST_RUN repetitions per round.
const REPEAT: u32 = 1_000_000;
/// Single runs for the admitted-SYN case (each a new connection).
const SINGLE_RUNS: usize = 20_000;
/// The fixed rate of the CPU comparison.
const FIXED_RATE: u64 = 50_000;

#[derive(Clone, Debug, Serialize)]
pub struct Micro {
    pub case: String,
    /// Median over the rounds, nanoseconds per packet.
    pub ns: f64,
    /// What it is compared with.
    pub baseline: String,
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    /// "remote ranges" or "live sources".
    pub dimension: String,
    pub case: String,
    pub size: u32,
    pub ns: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Flood {
    pub sources: u32,
    pub subject: String,
    /// Packets per second the server's core got through at full blast.
    pub max_pps: f64,
    /// Share of one core the receive path took at FIXED_RATE.
    pub cpu_at_fixed_rate: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    /// The measured ratio, for a target on a ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The measured nanoseconds, for a target on a time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns: Option<f64>,
    /// Whether it holds.
    pub holds: bool,
    /// The bound, as text (e.g. "<= 1.3"); "floor" for a figure that only
    /// shows what no program can beat.
    pub bound: String,
}

impl Target {
    /// The measured figure.
    pub fn measured(&self) -> f64 {
        self.ratio.or(self.ns).unwrap_or(f64::NAN)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub quick: bool,
    /// Rounds of each flood case (the figures are their medians).
    pub flood_rounds: usize,
    pub micro: Vec<Micro>,
    pub scale: Vec<Scale>,
    pub flood: Vec<Flood>,
    pub targets: std::collections::BTreeMap<String, Target>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Nanoseconds per run of `program` on `frame` as the kernel reports them
/// (the mean over REPEAT runs), median of rounds.
fn cost(program: &Xdp, frame: &[u8], rounds: usize) -> f64 {
    median(
        (0..rounds)
            .map(|_| {
                let result = program
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: REPEAT,
                        ..Default::default()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                result.duration.as_nanos() as f64
            })
            .collect(),
    )
}

/// Nanoseconds of single runs, each on its own frame (median of the
/// per-run durations the kernel reports).
fn single_runs(program: &Xdp, frames: impl Iterator<Item = Vec<u8>>) -> f64 {
    median(
        frames
            .map(|frame| {
                program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        repeat: 1,
                        ..Default::default()
                    })
                    .expect("BPF_PROG_TEST_RUN")
                    .duration
                    .as_nanos() as f64
            })
            .collect(),
    )
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A limiter loaded with one connector on port 25 with `ranges` remote
/// ranges (the client's the last), one connection per source.
/// A refused SYN of a connector with action `reply` whose replies this
/// second are spent (what a flood against it costs), with the responder
/// started in a namespace of its own.
fn reply_micro(rounds: usize, drop: f64) -> Micro {
    let ns = crate::netns::OwnedNetns::new();
    ns.run(|| {
        let text = "[[connector]]\nname = \"Bench\"\nbindings = [\"0.0.0.0:25\"]\n\
                    max_inbound_connection = \"unlimited\"\nmax_inbound_connection_per_source = 1\n\
                    max_inbound_connection_percentage_per_source = 100\naction = \"reply\"\n";
        let config = Config::parse(text, "bench.toml").expect("a valid bench config");
        let mut kernel = Kernel::load(
            TableSizes {
                sources: 1 << 18,
                established: 1 << 18,
            },
            None,
        )
        .expect("loading the programs");
        let responder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("responder");
        kernel
            .start_replies(&responder, None::<&TcpListener>)
            .expect("starting replies");
        kernel.set_settings(&config, 0).expect("settings");
        kernel
            .install(&config, &[0], &SelectionTable::build(&config))
            .expect("tables");
        let over_cap = over_cap_syn(&mut kernel);
        let admit = kernel.admit_program().expect("admit");
        let before = counter(&kernel, stat::REPLY_GATED);
        let ns = cost(admit, &over_cap, rounds);
        // All but the few replies of each second were dropped by the gate.
        check_moved(
            &kernel,
            stat::REPLY_GATED,
            before,
            rounds as u64 * REPEAT as u64 / 2,
            "SYN rejected, action reply",
        );
        Micro {
            case: "SYN rejected, action reply (its replies spent)".into(),
            ns,
            baseline: "bare XDP_DROP".into(),
            ratio: ns / drop,
        }
    })
}

fn limiter(ranges: u32) -> Kernel {
    let mut list: Vec<String> = (0..ranges.saturating_sub(1))
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i * 3).to_string())
        .collect();
    // The client, and the sources of `fresh_syns`.
    list.push("198.51.100.0/24".to_string());
    list.push("203.0.0.0/8".to_string());
    let quoted: Vec<String> = list.iter().map(|r| format!("{r:?}")).collect();
    let text = format!(
        "[[connector]]\nname = \"Bench\"\nbindings = [\"0.0.0.0:25\"]\nremote_ip_ranges = [{}]\n\
         max_inbound_connection = \"unlimited\"\nmax_inbound_connection_per_source = 1\n\
         max_inbound_connection_percentage_per_source = 100\n",
        quoted.join(", ")
    );
    let config = Config::parse(&text, "bench.toml").expect("a valid bench config");
    load_limiter(
        &config,
        TableSizes {
            sources: 1 << 18,
            established: 1 << 18,
        },
    )
}

/// Counts `n` connections from `remote` to LOCAL:25 (or `local`), as the
/// daemon counts those it finds at start-up: a source at its cap without a
/// real handshake.
fn hold(kernel: &mut Kernel, remote: Ipv4Addr, local: Ipv4Addr, n: u16) {
    for port in 0..n {
        let flow = FlowKey::from_words(
            addr::ipv4_words(u32::from_ne_bytes(local.octets())),
            addr::ipv4_words(u32::from_ne_bytes(remote.octets())),
            25,
            1 + port,
        );
        assert_eq!(
            kernel.seed(&flow).expect("counting a connection"),
            control::DONE,
            "{remote} {port}"
        );
    }
}

/// The limiter's programs and maps loaded as the daemon loads them, with
/// `config` installed (nothing attached).
fn load_limiter(config: &Config, sizes: TableSizes) -> Kernel {
    let mut kernel = Kernel::load(sizes, None).expect("loading the programs");
    let table = SelectionTable::build(config);
    kernel.set_settings(config, 0).expect("settings");
    kernel.install(config, &[0], &table).expect("tables");
    kernel
}

/// SYNs from `count` sources in 203.0.0.0/8, new flows.
fn fresh_syns(count: u32, salt: u16) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| {
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 0, 0)) + i);
        Segment::syn(source, 1024 + salt, LOCAL, 25).build()
    })
}

/// Counter `counter` of the bench's connector: the cases check that they
/// measured what they say (a SYN that matched no connector would pass
/// uncounted, and cheaply).
fn counter(kernel: &Kernel, counter: u32) -> u64 {
    kernel.stats().expect("the counters").connectors[0][counter as usize]
}

/// Panics unless the counter moved by at least `at_least`.
fn check_moved(kernel: &Kernel, which: u32, before: u64, at_least: u64, case: &str) {
    let moved = counter(kernel, which) - before;
    assert!(
        moved >= at_least,
        "bench case {case:?} is not what it says: its counter moved by {moved}, not {at_least}"
    );
}

fn micro(options: &Options, baseline: &Baseline) -> Vec<Micro> {
    let rounds = options.rounds();
    let bare_pass = baseline.program(BARE_PASS).expect("bare_pass");
    let bare_drop = baseline.program(BARE_DROP).expect("bare_drop");
    let header_drop = baseline.program(HEADER_DROP).expect("header_drop");
    let mut kernel = limiter(1);
    let over_cap = over_cap_syn(&mut kernel);
    let admit = kernel.admit_program().expect("admit");

    let udp = Segment::syn(CLIENT, 40000, LOCAL, 25)
        .protocol(IPPROTO_UDP)
        .build();
    let established = Segment::syn(CLIENT, 40000, LOCAL, 25)
        .flags(PSH | ACK)
        .build();
    let other_port = Segment::syn(CLIENT, 40000, LOCAL, 80).build();

    let pass = cost(bare_pass, &udp, rounds);
    let drop = cost(bare_drop, &over_cap, rounds);
    let pass_single = single_runs(bare_pass, fresh_syns(SINGLE_RUNS as u32, 0));
    let mut out = vec![
        Micro {
            case: "bare XDP_PASS".into(),
            ns: pass,
            baseline: "bare XDP_PASS".into(),
            ratio: 1.0,
        },
        Micro {
            case: "bare XDP_DROP".into(),
            ns: drop,
            baseline: "bare XDP_DROP".into(),
            ratio: 1.0,
        },
    ];
    for (case, frame) in [
        ("non-TCP frame (UDP to port 25)", &udp),
        (
            "segment of an established connection (port 25)",
            &established,
        ),
        ("TCP to another port (SYN to port 80)", &other_port),
    ] {
        let ns = cost(admit, frame, rounds);
        out.push(Micro {
            case: case.into(),
            ns,
            baseline: "bare XDP_PASS".into(),
            ratio: ns / pass,
        });
    }
    let headers = cost(header_drop, &over_cap, rounds);
    out.push(Micro {
        case: "SYN dropped by header_drop (headers read, no maps)".into(),
        ns: headers,
        baseline: "bare XDP_DROP".into(),
        ratio: headers / drop,
    });
    let before = counter(&kernel, stat::REJECTED_PER_SOURCE);
    let rejected = cost(admit, &over_cap, rounds);
    check_moved(
        &kernel,
        stat::REJECTED_PER_SOURCE,
        before,
        rounds as u64 * REPEAT as u64,
        "SYN rejected",
    );
    out.push(Micro {
        case: "SYN rejected (source over its cap)".into(),
        ns: rejected,
        baseline: "bare XDP_DROP".into(),
        ratio: rejected / drop,
    });
    out.push(reply_micro(rounds, drop));
    let before = counter(&kernel, stat::SYN_PASSED);
    let admitted = single_runs(admit, fresh_syns(SINGLE_RUNS as u32, 1));
    check_moved(
        &kernel,
        stat::SYN_PASSED,
        before,
        SINGLE_RUNS as u64,
        "SYN admitted",
    );
    out.push(Micro {
        case: "SYN admitted (a new connection each, single runs)".into(),
        ns: admitted,
        baseline: "bare XDP_PASS, single runs".into(),
        ratio: admitted / pass_single,
    });
    out
}

/// Gives CLIENT its one connection, and returns a SYN of a second one: over
/// its cap.
fn over_cap_syn(kernel: &mut Kernel) -> Vec<u8> {
    hold(kernel, CLIENT, LOCAL, 1);
    Segment::syn(CLIENT, 40001, LOCAL, 25).build()
}

fn scale(options: &Options) -> Vec<Scale> {
    let rounds = options.rounds();
    let mut out = Vec::new();
    for ranges in [1, 100, 10_000] {
        let mut kernel = limiter(ranges);
        let over_cap = over_cap_syn(&mut kernel);
        let admitted = fresh_syns(5_000, 7);
        out.extend(scale_points(
            &kernel,
            ("remote ranges", ranges),
            &over_cap,
            admitted,
            rounds,
        ));
    }
    for sources in [1_000, 10_000, 100_000] {
        let mut kernel = limiter(1);
        // Fill the source table: one connection per source.
        for i in 0..sources {
            let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 0, 0)) + i);
            hold(&mut kernel, source, LOCAL, 1);
        }
        assert_eq!(
            kernel.sources_len(),
            sources as usize,
            "every source holds a connection"
        );
        let over_cap = Segment::syn(Ipv4Addr::new(203, 0, 0, 5), 9999, LOCAL, 25).build();
        let admitted = (0..5_000u32).map(|i| {
            Segment::syn(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 64, 0, 0)) + i),
                4242,
                LOCAL,
                25,
            )
            .build()
        });
        out.extend(scale_points(
            &kernel,
            ("live sources", sources),
            &over_cap,
            admitted,
            rounds,
        ));
    }
    out
}

/// The two points of a scale curve at one table size: a SYN over its cap,
/// repeated, and 5,000 `admitted` SYNs, one run each.
fn scale_points(
    kernel: &Kernel,
    (dimension, size): (&str, u32),
    over_cap: &[u8],
    admitted: impl Iterator<Item = Vec<u8>>,
    rounds: usize,
) -> [Scale; 2] {
    let admit = kernel.admit_program().expect("admit");
    let before = counter(kernel, stat::REJECTED_PER_SOURCE);
    let rejected = cost(admit, over_cap, rounds);
    check_moved(kernel, stat::REJECTED_PER_SOURCE, before, 1, "SYN rejected");
    let before = counter(kernel, stat::SYN_PASSED);
    let admitted = single_runs(admit, admitted);
    check_moved(kernel, stat::SYN_PASSED, before, 5_000, "SYN admitted");
    [
        ("SYN rejected", rejected),
        ("SYN admitted (single runs)", admitted),
    ]
    .map(|(case, ns)| Scale {
        dimension: dimension.into(),
        case: case.into(),
        size,
        ns,
    })
}

/// What receives the flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Nothing,
    /// Passes everything, reading nothing: what any XDP program attached
    /// costs the packets it lets through.
    BarePass,
    BareDrop,
    /// Drops SYNs to port 25 after reading their headers: the floor of any
    /// SYN filter, where `BareDrop` never touches the frame.
    HeaderDrop,
    Limiter,
    /// The limiter with action `reply`: refused SYNs answered by a
    /// responder (each source's replies gated to a few a second).
    LimiterReply,
    Iptables,
    Nftables,
}

impl Subject {
    pub const ALL: [Subject; 8] = [
        Subject::Limiter,
        Subject::LimiterReply,
        Subject::BareDrop,
        Subject::HeaderDrop,
        Subject::Iptables,
        Subject::Nftables,
        Subject::BarePass,
        Subject::Nothing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Subject::Nothing => "nothing attached",
            Subject::BarePass => "bare XDP_PASS",
            Subject::BareDrop => "bare XDP_DROP",
            Subject::HeaderDrop => "header_drop",
            Subject::Limiter => "limiter",
            Subject::LimiterReply => "limiter, action reply",
            Subject::Iptables => "iptables connlimit",
            Subject::Nftables => "nftables ct count",
        }
    }
}

/// Holds what a subject put in place, for the length of one measurement.
#[derive(Default)]
pub struct Installed {
    _baseline: Option<Baseline>,
    limiter: Option<Kernel>,
    /// The responder's listening sockets, with action reply (nothing
    /// accepts: the flood's forged sources never complete a handshake).
    _responders: Vec<TcpListener>,
}

impl Installed {
    /// The limiter's programs and maps, when the subject is the limiter.
    pub fn limiter(&self) -> Option<&Kernel> {
        self.limiter.as_ref()
    }

    /// What the daemon does every second while its responder runs: tells
    /// the XDP program it still answers.
    pub fn keep_replying(&mut self) {
        if let Some(kernel) = self.limiter.as_mut().filter(|k| k.replies()) {
            kernel
                .responders_alive()
                .expect("telling the kernel the responder answers");
        }
    }
}

/// Puts `subject` in place on the server's end of `lab`: the limiter's
/// programs and maps as the daemon loads them (its event reader would
/// share the two cores with the generator and the receive path), a bare
/// program, or a firewall rule in the server's namespace. With the limiter,
/// the first `at_cap` sources of the flood hold their 20 connections
/// already (the firewalls count the flood's own half-open connections).
pub fn install(lab: &FloodLab, subject: Subject, at_cap: u32) -> Installed {
    let per_source = 20;
    match subject {
        Subject::Nothing => Installed::default(),
        Subject::BareDrop | Subject::HeaderDrop | Subject::BarePass => {
            let program = match subject {
                Subject::BareDrop => BARE_DROP,
                Subject::BarePass => BARE_PASS,
                _ => HEADER_DROP,
            };
            let mut baseline = Baseline::load().expect("baseline programs");
            lab.attach_baseline(&mut baseline, program);
            Installed {
                _baseline: Some(baseline),
                ..Default::default()
            }
        }
        Subject::Limiter | Subject::LimiterReply => {
            let reply = subject == Subject::LimiterReply;
            let text = format!(
                "[[connector]]\nname = \"Frontend\"\nbindings = [\"0.0.0.0:25\"]\n\
                 max_inbound_connection = \"unlimited\"\n\
                 max_inbound_connection_per_source = {per_source}\n\
                 max_inbound_connection_percentage_per_source = 100\n\
                 action = \"{}\"\n",
                if reply { "reply" } else { "drop" }
            );
            let config = Config::parse(&text, "bench.toml").expect("config");
            let iface = lab.server_iface.clone();
            let (kernel, responders) = lab.server.run(move || {
                let sizes = TableSizes {
                    sources: 1 << 20,
                    established: 1 << 14,
                };
                let mut kernel = Kernel::load(sizes, None).expect("loading the programs");
                let mut responders = Vec::new();
                if reply {
                    // As the daemon does: the responder first, so that the
                    // connector is installed as replying.
                    let ipv4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("responder");
                    kernel
                        .start_replies(&ipv4, None::<&TcpListener>)
                        .expect("starting replies");
                    responders.push(ipv4);
                }
                kernel.set_settings(&config, 0).expect("settings");
                kernel
                    .install(&config, &[0], &SelectionTable::build(&config))
                    .expect("tables");
                kernel
                    .attach_xdp(
                        &iface,
                        limiter::kernel::LinkLayer::Ethernet,
                        limiter::kernel::XdpModeRequest::Driver,
                    )
                    .expect("attaching XDP");
                for i in 0..at_cap {
                    hold(&mut kernel, flood_source(i), FLOOD_SERVER, per_source);
                }
                (kernel, responders)
            });
            Installed {
                limiter: Some(kernel),
                _responders: responders,
                ..Default::default()
            }
        }
        Subject::Iptables => {
            run_checked(lab.server.command("iptables-legacy").args([
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--syn",
                "--dport",
                "25",
                "-m",
                "connlimit",
                "--connlimit-above",
                &per_source.to_string(),
                "--connlimit-mask",
                "32",
                "-j",
                "DROP",
            ]));
            Installed::default()
        }
        Subject::Nftables => {
            let rules = format!(
                "table inet limiter_bench {{\n\
                   set sources {{ type ipv4_addr; size 65535; flags dynamic; }}\n\
                   chain input {{\n\
                     type filter hook input priority filter; policy accept;\n\
                     tcp dport 25 ct state new add @sources {{ ip saddr ct count over {per_source} }} drop\n\
                   }}\n\
                 }}\n"
            );
            let path =
                std::env::temp_dir().join(format!("limiter-bench-{}.nft", std::process::id()));
            std::fs::write(&path, rules).expect("writing the ruleset");
            run_checked(lab.server.command("nft").arg("-f").arg(&path));
            let _ = std::fs::remove_file(&path);
            Installed::default()
        }
    }
}

/// One flood measurement in a fresh lab (fresh conntrack too): packets per
/// second the server got through, or with `rate` the share of its core.
pub fn measure(
    subject: Subject,
    sources: u32,
    duration: Duration,
    rate: Option<u64>,
    generator: &mut Baseline,
) -> f64 {
    let lab = FloodLab::new();
    // A mail server listening on port 25, as on a real MX.
    let _listener = lab.server.run(|| {
        TcpListener::bind((SERVER, 25)).expect("listening on port 25 in the server namespace")
    });
    // The flood from 256 sources is one from sources at their cap; the one
    // from 65,536 mostly opens new connections.
    let at_cap = if sources <= 256 { sources } else { 0 };
    let mut installed = install(&lab, subject, at_cap);
    let received = lab.server_frames();
    let cpu = lab.server_cpu_seconds();
    let flooding = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                installed.keep_replying();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        lab.flood(generator, sources, duration, rate);
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    });
    let handled = lab.server_frames() - received;
    let cpu = lab.server_cpu_seconds() - cpu;
    drop(installed);
    drop(lab);
    // Conntrack entries of a deleted namespace go away in the background.
    std::thread::sleep(Duration::from_millis(500));
    match rate {
        None => handled as f64 / duration.as_secs_f64(),
        Some(_) => cpu / duration.as_secs_f64(),
    }
}

fn flood(options: &Options) -> Vec<Flood> {
    let duration = options.flood_seconds();
    let mut generator = Baseline::load().expect("the generator");
    let mut out = Vec::new();
    for sources in [256u32, 65_536] {
        let mut rounds: Vec<Vec<(f64, f64)>> = vec![Vec::new(); Subject::ALL.len()];
        for _ in 0..options.flood_rounds() {
            for (subject, figures) in Subject::ALL.into_iter().zip(&mut rounds) {
                let max_pps = measure(subject, sources, duration, None, &mut generator);
                let cpu = measure(subject, sources, duration, Some(FIXED_RATE), &mut generator);
                figures.push((max_pps, cpu));
            }
        }
        for (subject, figures) in Subject::ALL.into_iter().zip(rounds) {
            let max_pps = median(figures.iter().map(|f| f.0).collect());
            let cpu_at_fixed_rate = median(figures.iter().map(|f| f.1).collect());
            eprintln!(
                "bench: flood from {sources} sources into {}: {:.0} pps at most, {:.1} % of a core at {FIXED_RATE} pps",
                subject.name(),
                max_pps,
                cpu_at_fixed_rate * 100.0
            );
            out.push(Flood {
                sources,
                subject: subject.name().into(),
                max_pps,
                cpu_at_fixed_rate,
            });
        }
    }
    out
}

fn target(name: &str, ratio: f64, at_most: Option<f64>, at_least: Option<f64>) -> (String, Target) {
    let (holds, bound) = match (at_most, at_least) {
        (Some(max), _) => (ratio <= max, format!("<= {max}")),
        (_, Some(min)) => (ratio >= min, format!(">= {min}")),
        _ => (true, "floor".to_string()),
    };
    (
        name.to_string(),
        Target {
            name: name.to_string(),
            ratio: Some(ratio),
            ns: None,
            holds,
            bound,
        },
    )
}

fn time_target(name: &str, ns: f64, at_most: f64) -> (String, Target) {
    (
        name.to_string(),
        Target {
            name: name.to_string(),
            ratio: None,
            ns: Some(ns),
            holds: ns <= at_most,
            bound: format!("<= {at_most} ns"),
        },
    )
}

fn targets(
    micro: &[Micro],
    scale: &[Scale],
    flood: &[Flood],
) -> std::collections::BTreeMap<String, Target> {
    let mut out = std::collections::BTreeMap::new();
    let pass = micro
        .iter()
        .filter(|m| m.baseline == "bare XDP_PASS" && m.case != "bare XDP_PASS")
        .map(|m| m.ratio)
        .fold(0.0, f64::max);
    if pass > 0.0 {
        out.extend([target("pass_path_vs_bare_pass", pass, Some(1.2), None)]);
    }
    if let Some(reject) = micro.iter().find(|m| m.case.starts_with("SYN rejected")) {
        out.extend([target(
            "syn_reject_vs_bare_drop",
            reject.ratio,
            Some(2.0),
            None,
        )]);
    }
    if let Some(admitted) = micro.iter().find(|m| m.case.starts_with("SYN admitted")) {
        out.extend([time_target("syn_admitted_ns", admitted.ns, 400.0)]);
    }
    let pps = |sources: u32, subject: Subject| {
        flood
            .iter()
            .find(|f| f.sources == sources && f.subject == subject.name())
            .map(|f| f.max_pps)
            .unwrap_or(f64::NAN)
    };
    let cpu = |sources: u32, subject: Subject| {
        flood
            .iter()
            .find(|f| f.sources == sources && f.subject == subject.name())
            .map(|f| f.cpu_at_fixed_rate)
            .unwrap_or(f64::NAN)
    };
    if !flood.is_empty() {
        let limiter = pps(256, Subject::Limiter);
        out.extend([
            target(
                "flood_256_vs_bare_drop",
                limiter / pps(256, Subject::BareDrop),
                None,
                Some(0.9),
            ),
            target(
                "flood_256_reply_vs_drop",
                pps(256, Subject::LimiterReply) / limiter,
                None,
                Some(0.83),
            ),
            target(
                "flood_256_reply_cpu_vs_drop",
                cpu(256, Subject::LimiterReply) / cpu(256, Subject::Limiter),
                Some(1.2),
                None,
            ),
            target(
                "flood_256_header_drop_vs_bare_drop",
                pps(256, Subject::HeaderDrop) / pps(256, Subject::BareDrop),
                None,
                None,
            ),
            target(
                "flood_256_vs_iptables_connlimit",
                limiter / pps(256, Subject::Iptables),
                None,
                Some(15.0),
            ),
            target(
                "flood_256_vs_nftables_ct_count",
                limiter / pps(256, Subject::Nftables),
                None,
                Some(15.0),
            ),
            target(
                "flood_65536_vs_nothing",
                pps(65_536, Subject::Limiter) / pps(65_536, Subject::Nothing),
                None,
                Some(0.85),
            ),
            target(
                "flood_65536_bare_pass_vs_nothing",
                pps(65_536, Subject::BarePass) / pps(65_536, Subject::Nothing),
                None,
                None,
            ),
            target(
                "flood_65536_cpu_vs_nothing",
                cpu(65_536, Subject::Limiter) / cpu(65_536, Subject::Nothing),
                Some(1.2),
                None,
            ),
        ]);
    }
    let mut curves: Vec<(String, String)> = scale
        .iter()
        .map(|s| (s.dimension.clone(), s.case.clone()))
        .collect();
    curves.dedup();
    for (dimension, case) in curves {
        let points: Vec<&Scale> = scale
            .iter()
            .filter(|s| s.dimension == dimension && s.case == case)
            .collect();
        let smallest = points
            .iter()
            .min_by_key(|s| s.size)
            .map(|s| s.ns)
            .unwrap_or(1.0);
        let largest = points
            .iter()
            .max_by_key(|s| s.size)
            .map(|s| s.ns)
            .unwrap_or(1.0);
        let name = format!(
            "scale_{}_{}",
            dimension.replace(' ', "_"),
            case.split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join("_")
                .to_lowercase()
        );
        out.extend([target(&name, largest / smallest, Some(1.5), None)]);
    }
    out
}

/// Runs every benchmark.
pub fn run(options: &Options) -> Report {
    let baseline = Baseline::load().expect("loading the baseline programs (as root)");
    let micro = if options.runs(Part::Micro) {
        eprintln!("bench: per-packet cost (BPF_PROG_TEST_RUN)");
        micro(options, &baseline)
    } else {
        Vec::new()
    };
    let scale = if options.runs(Part::Scale) {
        eprintln!("bench: scale");
        scale(options)
    } else {
        Vec::new()
    };
    let flood = if options.runs(Part::Flood) {
        eprintln!("bench: floods over a veth");
        flood(options)
    } else {
        Vec::new()
    };
    let targets = targets(&micro, &scale, &flood);
    Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick: options.quick,
        flood_rounds: options.flood_rounds(),
        micro,
        scale,
        flood,
        targets,
    }
}

/// The report as BENCHMARKS.md.
pub fn markdown(report: &Report, chart: &str) -> String {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str(&format!(
        "Written by `cargo xtask bench{}` on Linux {}, {} CPUs. Every figure is a median of rounds; \
         the targets are ratios of figures taken in the same run (absolute figures drift \
         between runs on these machines, ratios much less).\n\n",
        if report.quick { " --quick" } else { "" },
        report.kernel,
        report.cpus
    ));
    md.push_str("## Targets\n\n| target | measured | bound | holds |\n|---|---|---|---|\n");
    for t in report.targets.values() {
        let measured = match t.ns {
            Some(ns) => format!("{ns:.0} ns"),
            None => format!("{:.2}", t.measured()),
        };
        let holds = match (t.bound.as_str(), t.holds) {
            ("floor", _) => "-",
            (_, true) => "yes",
            (_, false) => "**no**",
        };
        md.push_str(&format!(
            "| {} | {measured} | {} | {holds} |\n",
            t.name, t.bound
        ));
    }
    md.push_str(&format!(
        "\n## Per-packet cost (BPF_PROG_TEST_RUN, {REPEAT} repetitions a round)\n\n\
         | case | ns per packet | compared with | ratio |\n|---|---|---|---|\n"
    ));
    for m in &report.micro {
        md.push_str(&format!(
            "| {} | {:.1} | {} | {:.2} |\n",
            m.case, m.ns, m.baseline, m.ratio
        ));
    }
    md.push_str(
        "\nSingle runs (one BPF_PROG_TEST_RUN per packet, to give each SYN a connection of its \
         own) carry the kernel's per-run timing overhead; they are compared with the bare program \
         timed the same way.\n\n## Scale\n\n| tables | size | case | ns per packet |\n|---|---|---|---|\n",
    );
    for s in &report.scale {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} |\n",
            s.dimension, s.size, s.case, s.ns
        ));
    }
    md.push_str(&format!(
        "\n## SYN flood over a veth\n\nA generator (BPF_PROG_TEST_RUN live frames, XDP_TX) on one core \
         sends SYNs to port 25 of a server namespace whose receive path (threaded NAPI) is pinned to \
         the other core, with a listener on port 25. Highest rate: packets the server's core got \
         through per second, the generator at full speed. CPU: the share of the server's core the \
         receive path took at {FIXED_RATE} packets per second. Each measurement in fresh namespaces \
         (fresh conntrack); each figure the median of {} rounds, every subject in turn in each \
         round. Per source, every subject allows 20. `header_drop` reads the \
         Ethernet, IPv4 and TCP headers and drops every SYN to port 25, using no map: the \
         floor of any program that looks at a SYN, where bare XDP_DROP never touches the \
         frame. `bare XDP_PASS` passes every frame unread: what attaching any XDP program \
         costs the packets it lets through, the floor of the flood that is mostly \
         admitted.\n\n\
         ![flood results]({chart})\n\n\
         | sources | subject | highest rate (pps) | CPU at {FIXED_RATE} pps |\n|---|---|---|---|\n",
        report.flood_rounds
    ));
    for f in &report.flood {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} % |\n",
            f.sources,
            f.subject,
            f.max_pps,
            f.cpu_at_fixed_rate * 100.0
        ));
    }
    md
}

/// The flood results as an SVG bar chart: the highest rate per subject,
/// for both source mixes.
pub fn chart_svg(report: &Report) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).expect("drawing");
        let subjects: Vec<String> = Subject::ALL.iter().map(|s| s.name().to_string()).collect();
        let top = report
            .flood
            .iter()
            .map(|f| f.max_pps / 1e6)
            .fold(0.1, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "SYN flood: highest rate handled on one core (Mpps)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..(subjects.len() as f64), 0.0..top)
            .expect("a chart");
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(subjects.len())
            .x_label_formatter(&|x| {
                subjects
                    .get(x.floor() as usize)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_desc("million packets per second")
            .draw()
            .expect("the mesh");
        for (mix, (sources, color)) in [(256u32, BLUE), (65_536u32, RED)].into_iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = Subject::ALL
                .iter()
                .enumerate()
                .filter_map(|(i, subject)| {
                    let f = report
                        .flood
                        .iter()
                        .find(|f| f.sources == sources && f.subject == subject.name())?;
                    let left = i as f64 + 0.1 + 0.4 * mix as f64;
                    Some(Rectangle::new(
                        [(left, 0.0), (left + 0.38, f.max_pps / 1e6)],
                        color.mix(0.7).filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .expect("bars")
                .label(format!("{sources} sources"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .expect("the legend");
        root.present().expect("the chart");
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flood_row(sources: u32, subject: Subject, max_pps: f64, cpu: f64) -> Flood {
        Flood {
            sources,
            subject: subject.name().into(),
            max_pps,
            cpu_at_fixed_rate: cpu,
        }
    }

    fn micro_row(case: &str, ns: f64, baseline: &str, ratio: f64) -> Micro {
        Micro {
            case: case.into(),
            ns,
            baseline: baseline.into(),
            ratio,
        }
    }

    fn report() -> Report {
        let micro = vec![
            micro_row("bare XDP_PASS", 20.0, "bare XDP_PASS", 1.0),
            micro_row("bare XDP_DROP", 20.0, "bare XDP_DROP", 1.0),
            micro_row("non-TCP frame", 22.0, "bare XDP_PASS", 1.1),
            micro_row("TCP to another port", 28.0, "bare XDP_PASS", 1.4),
            micro_row(
                "SYN rejected (source over its cap)",
                90.0,
                "bare XDP_DROP",
                4.5,
            ),
            micro_row(
                "SYN admitted (single runs)",
                300.0,
                "bare XDP_PASS, single runs",
                6.0,
            ),
        ];
        let scale: Vec<Scale> = [(1, 100.0), (100, 120.0), (10_000, 160.0)]
            .into_iter()
            .map(|(size, ns)| Scale {
                dimension: "remote ranges".into(),
                case: "SYN rejected".into(),
                size,
                ns,
            })
            .collect();
        let mut flood = Vec::new();
        for (subject, pps, cpu) in [
            (Subject::Limiter, 4.6e6, 0.011),
            (Subject::LimiterReply, 4.0e6, 0.012),
            (Subject::BareDrop, 5.0e6, 0.01),
            (Subject::HeaderDrop, 4.8e6, 0.01),
            (Subject::Iptables, 0.2e6, 0.04),
            (Subject::Nftables, 0.4e6, 0.03),
            (Subject::BarePass, 0.48e6, 0.01),
            (Subject::Nothing, 0.5e6, 0.01),
        ] {
            flood.push(flood_row(256, subject, pps, cpu));
            let pps = if subject == Subject::Limiter {
                0.46e6
            } else {
                pps
            };
            flood.push(flood_row(65_536, subject, pps, cpu));
        }
        let targets = targets(&micro, &scale, &flood);
        Report {
            kernel: "6.x".into(),
            cpus: 2,
            quick: true,
            flood_rounds: 1,
            micro,
            scale,
            flood,
            targets,
        }
    }

    #[test]
    fn targets_are_the_measured_ratios_against_their_bounds() {
        let t = report().targets;
        // The worst pass-path case counts: 1.4 > 1.3.
        assert!((t["pass_path_vs_bare_pass"].measured() - 1.4).abs() < 1e-9);
        assert!(!t["pass_path_vs_bare_pass"].holds);
        // 4.5 > 2.
        assert!(!t["syn_reject_vs_bare_drop"].holds);
        assert!(t["syn_admitted_ns"].holds);
        assert_eq!(t["syn_admitted_ns"].ns, Some(300.0));
        assert!((t["flood_256_vs_bare_drop"].measured() - 0.92).abs() < 1e-9);
        assert!(t["flood_256_vs_bare_drop"].holds);
        assert!(t["flood_256_vs_iptables_connlimit"].holds);
        // 4.6 / 0.4 = 11.5 < 15.
        assert!(!t["flood_256_vs_nftables_ct_count"].holds);
        assert!((t["flood_65536_cpu_vs_nothing"].measured() - 1.1).abs() < 1e-9);
        assert!(t["flood_65536_cpu_vs_nothing"].holds);
        // 0.46 / 0.5 = 0.92 >= 0.85.
        assert!(t["flood_65536_vs_nothing"].holds);
        assert_eq!(t["flood_256_header_drop_vs_bare_drop"].bound, "floor");
        // 160 / 100 = 1.6 > 1.5.
        assert!(!t["scale_remote_ranges_syn_rejected"].holds);
        // 4.0 / 4.6 = 0.87 >= 0.83; 0.012 / 0.011 = 1.09 <= 1.2.
        assert!(t["flood_256_reply_vs_drop"].holds);
        assert!(t["flood_256_reply_cpu_vs_drop"].holds);
        assert_eq!(t.len(), 13);
    }

    #[test]
    fn the_report_renders_as_markdown_json_and_a_chart() {
        let report = report();
        let md = markdown(&report, "chart.svg");
        assert!(md.contains("| flood_256_vs_nftables_ct_count | 11.50 | >= 15 | **no** |"));
        assert!(md.contains("| syn_admitted_ns | 300 ns | <= 400 ns | yes |"));
        assert!(md.contains("| 256 | iptables connlimit | 200000 | 4.0 % |"));
        assert!(md.contains("![flood results](chart.svg)"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["targets"]["syn_reject_vs_bare_drop"]["holds"], false);
        assert_eq!(json["targets"]["syn_admitted_ns"]["ns"], 300.0);
        let svg = chart_svg(&report);
        assert!(
            svg.starts_with("<svg") && svg.contains("65536 sources"),
            "{svg}"
        );
    }
}
