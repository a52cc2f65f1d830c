//! Measuring: the per-packet costs in BPF_PROG_TEST_RUN, the cost as
//! tables grow, and floods of live frames against each subject.

use std::{
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter::{
    baseline::{BARE_DROP, BARE_PASS, Baseline, CACHE_DROP, HEADER_DROP},
    config::Config,
    kernel::{Kernel, TableSizes},
    selection::SelectionTable,
};
use limiter_common::{
    addr,
    maps::{FlowKey, ReportGate, SourceCount, SourceKey, control, names, stat},
    rate::{RATE_SLOTS, RateWindow},
};

use crate::{
    floodlab::{FloodLab, SERVER, SERVER as FLOOD_SERVER, flood_source},
    frames::{ACK, IPPROTO_UDP, PSH, Segment},
    run_checked,
};

use super::{FIXED_RATE, Flood, Micro, Options, REPEAT, SINGLE_RUNS, Scale, Subject};

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Nanoseconds per run of `program` on `frame` as the kernel reports them
/// (the mean over REPEAT runs), median of rounds.
pub(super) fn cost(program: &Xdp, frame: &[u8], rounds: usize) -> f64 {
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
pub(super) fn single_runs(program: &Xdp, frames: impl Iterator<Item = Vec<u8>>) -> f64 {
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

pub(super) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

pub(super) const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A limiter loaded with one connector on port 25 with `ranges` remote
/// ranges (the client's the last), one connection per source.
/// A refused SYN of a connector with action `reply` whose replies this
/// second are spent (what a flood against it costs), with the responder
/// started in a namespace of its own.
pub(super) fn reply_micro(rounds: usize, drop: f64) -> Micro {
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
        // All but the few replies of each second were dropped by the gate.
        let ns = counted(
            &kernel,
            stat::REPLY_GATED,
            rounds as u64 * REPEAT as u64 / 2,
            "SYN rejected, action reply",
            || cost(admit, &over_cap, rounds),
        );
        Micro {
            case: "SYN rejected, action reply (its replies spent)".into(),
            ns,
            baseline: "bare XDP_DROP".into(),
            ratio: ns / drop,
        }
    })
}

/// The connection rate of [`rate_micro`]'s connector, per its unit (the
/// default, 60 s: slots of 10 s, longer than the case runs).
const RATE: u16 = 10;

/// On a connector with a rate limit, far from its concurrency caps: a SYN
/// of a source that used up its connection rate (it holds no connection),
/// refused by the rate once, then from the CPU's refusal cache until the
/// window's next slot boundary; and SYNs of new sources, admitted (every
/// SYN looks its source up there, where a connector without a rate admits
/// far from its caps without).
pub(super) fn rate_micro(rounds: usize, drop: f64, pass_single: f64) -> [Micro; 2] {
    let text = format!(
        "[[connector]]\nname = \"Bench\"\nbindings = [\"0.0.0.0:25\"]\n\
         max_inbound_connection = \"unlimited\"\nmax_inbound_connection_per_source = \"unlimited\"\n\
         max_inbound_connection_percentage_per_source = 100\n\
         max_inbound_connection_rate_per_source = {RATE}\n"
    );
    let config = Config::parse(&text, "bench.toml").expect("a valid bench config");
    let kernel = load_limiter(
        &config,
        TableSizes {
            sources: 1 << 18,
            established: 1 << 18,
        },
    );
    let admit = kernel.admit_program().expect("admit");
    spend_rate(admit, CLIENT, RATE);
    let over_rate = Segment::syn(CLIENT, 40002, LOCAL, 25).build();
    let judged = || kernel.stats().expect("the counters").global[stat::SOURCE_JUDGED as usize];
    let judged_before = judged();
    let ns = counted(
        &kernel,
        stat::REJECTED_RATE,
        rounds as u64 * REPEAT as u64,
        "SYN rejected by rate",
        || cost(admit, &over_rate, rounds),
    );
    // Judged on the window once (and at a slot boundary, were one
    // crossed), else refused from the cache.
    let judged = judged() - judged_before;
    assert!(
        judged <= 2 * rounds as u64,
        "bench case \"SYN rejected by rate\" judged {judged} SYNs on the window: the refusal cache did not answer"
    );
    let admitted = counted(
        &kernel,
        stat::SYN_PASSED,
        SINGLE_RUNS as u64,
        "SYN admitted by a connector with a rate",
        || single_runs(admit, fresh_syns(SINGLE_RUNS as u32, 2)),
    );
    [
        Micro {
            case: "SYN rejected by rate (source over its connection rate)".into(),
            ns,
            baseline: "bare XDP_DROP".into(),
            ratio: ns / drop,
        },
        Micro {
            case: "SYN admitted by a connector with a rate limit (a new source each, single runs)"
                .into(),
            ns: admitted,
            baseline: "bare XDP_PASS, single runs".into(),
            ratio: admitted / pass_single,
        },
    ]
}

/// Writes `remote`'s entry on connector 0 as the sock_ops program leaves
/// it after `n` connections counted now (`CLOCK_MONOTONIC`, the clock of
/// `bpf_ktime_get_ns`), all closed since: the daemon has no way to count
/// into a rate window (seeded connections never do), so the entry is
/// written into the map `program` uses.
fn spend_rate(program: &Xdp, remote: Ipv4Addr, n: u16) {
    let ids = program
        .info()
        .expect("the program's info")
        .map_ids()
        .expect("its maps")
        .expect("map ids (kernel 4.15 or later)");
    let data = ids
        .into_iter()
        .map(|id| MapData::from_id(id).expect("a map of the program"))
        .find(|data| {
            data.info()
                .is_ok_and(|info| info.name_as_str() == Some(names::SOURCE_LIVE))
        })
        .expect("the program uses SOURCE_LIVE");
    let mut sources: HashMap<MapData, SourceKey, SourceCount> =
        HashMap::try_from(Map::HashMap(data)).expect("SOURCE_LIVE is a hash map");
    let key = SourceKey::from_words(0, addr::ipv4_words(u32::from_ne_bytes(remote.octets())));
    let now = limiter::kernel::monotonic_ns();
    let mut counts = [0u16; RATE_SLOTS];
    counts[0] = n;
    let entry = SourceCount {
        key,
        live: 0,
        flags: 0,
        _pad: 0,
        last_change_ns: now,
        gate: ReportGate::default(),
        rate: RateWindow {
            newest_start_ns: now,
            counts,
            seq: 0,
        },
    };
    sources.insert(key, entry, 0).expect("writing the source");
}

pub(super) fn limiter(ranges: u32) -> Kernel {
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
pub(super) fn hold(kernel: &mut Kernel, remote: Ipv4Addr, local: Ipv4Addr, n: u16) {
    for port in 0..n {
        let flow = flow_to_25(remote, 1 + port, local);
        assert_eq!(
            kernel.seed(&flow).expect("counting a connection"),
            control::DONE,
            "{remote} {port}"
        );
    }
}

/// The limiter's programs and maps loaded as the daemon loads them, with
/// `config` installed (nothing attached).
pub(super) fn load_limiter(config: &Config, sizes: TableSizes) -> Kernel {
    let mut kernel = Kernel::load(sizes, None).expect("loading the programs");
    let table = SelectionTable::build(config);
    kernel.set_settings(config, 0).expect("settings");
    kernel.install(config, &[0], &table).expect("tables");
    kernel
}

/// SYNs from `count` sources in 203.0.0.0/8, new flows.
pub(super) fn fresh_syns(count: u32, salt: u16) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| {
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 0, 0)) + i);
        Segment::syn(source, 1024 + salt, LOCAL, 25).build()
    })
}

/// Counter `counter` of the bench's connector: the cases check that they
/// measured what they say (a SYN that matched no connector would pass
/// uncounted, and cheaply).
pub(super) fn counter(kernel: &Kernel, counter: u32) -> u64 {
    kernel.stats().expect("the counters").connectors[0][counter as usize]
}

/// What `measure` returns, once it has moved counter `which` by at least
/// `at_least` (else the bench case is not what it says: a panic).
pub(super) fn counted<T>(
    kernel: &Kernel,
    which: u32,
    at_least: u64,
    case: &str,
    measure: impl FnOnce() -> T,
) -> T {
    let before = counter(kernel, which);
    let measured = measure();
    let moved = counter(kernel, which) - before;
    assert!(
        moved >= at_least,
        "bench case {case:?} is not what it says: its counter moved by {moved}, not {at_least}"
    );
    measured
}

pub(super) fn micro(options: &Options, baseline: &mut Baseline) -> Vec<Micro> {
    let rounds = options.rounds();
    let left_out = baseline
        .remember_refusals(&[over_cap_flow()])
        .expect("filling cache_drop's cache");
    assert_eq!(left_out, 0, "cache_drop remembers the over-cap SYN");
    let baseline = &*baseline;
    let bare_pass = baseline.program(BARE_PASS).expect("bare_pass");
    let bare_drop = baseline.program(BARE_DROP).expect("bare_drop");
    let header_drop = baseline.program(HEADER_DROP).expect("header_drop");
    let cache_drop = baseline.program(CACHE_DROP).expect("cache_drop");
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
    // The floors of the pass path and of a cached refusal: the same
    // headers read, and a pass; the same headers read, one per-CPU lookup
    // of the SYN's refusal key, and a drop.
    let headers_pass = cost(header_drop, &other_port, rounds);
    out.push(Micro {
        case: HEADER_PASS_CASE.into(),
        ns: headers_pass,
        baseline: "bare XDP_PASS".into(),
        ratio: headers_pass / pass,
    });
    let cached = cost(cache_drop, &over_cap, rounds);
    out.push(Micro {
        case: CACHE_DROP_CASE.into(),
        ns: cached,
        baseline: "bare XDP_DROP".into(),
        ratio: cached / drop,
    });
    let rejected = counted(
        &kernel,
        stat::REJECTED_PER_SOURCE,
        rounds as u64 * REPEAT as u64,
        "SYN rejected",
        || cost(admit, &over_cap, rounds),
    );
    out.push(Micro {
        case: "SYN rejected (source over its cap)".into(),
        ns: rejected,
        baseline: "bare XDP_DROP".into(),
        ratio: rejected / drop,
    });
    out.push(reply_micro(rounds, drop));
    let admitted = counted(
        &kernel,
        stat::SYN_PASSED,
        SINGLE_RUNS as u64,
        "SYN admitted",
        || single_runs(admit, fresh_syns(SINGLE_RUNS as u32, 1)),
    );
    out.push(Micro {
        case: "SYN admitted (a new connection each, single runs)".into(),
        ns: admitted,
        baseline: "bare XDP_PASS, single runs".into(),
        ratio: admitted / pass_single,
    });
    out.extend(rate_micro(rounds, drop, pass_single));
    out
}

/// Gives CLIENT its one connection, and returns a SYN of a second one: over
/// its cap.
pub(super) fn over_cap_syn(kernel: &mut Kernel) -> Vec<u8> {
    hold(kernel, CLIENT, LOCAL, 1);
    Segment::syn(CLIENT, OVER_CAP_PORT, LOCAL, 25).build()
}

const OVER_CAP_PORT: u16 = 40001;

/// The connection of [`over_cap_syn`]'s SYN.
fn over_cap_flow() -> FlowKey {
    flow_to_25(CLIENT, OVER_CAP_PORT, LOCAL)
}

/// The connection from `remote:port` to `local:25`.
pub fn flow_to_25(remote: Ipv4Addr, port: u16, local: Ipv4Addr) -> FlowKey {
    FlowKey::from_words(
        addr::ipv4_words(u32::from_ne_bytes(local.octets())),
        addr::ipv4_words(u32::from_ne_bytes(remote.octets())),
        25,
        port,
    )
}

/// The micro case of the pass path's floor.
pub(super) const HEADER_PASS_CASE: &str =
    "SYN to port 80 passed by header_drop (headers read, no maps)";
/// The micro case of a cached refusal's floor.
pub(super) const CACHE_DROP_CASE: &str =
    "SYN dropped by cache_drop (headers read, one per-CPU lookup)";

pub(super) fn scale(options: &Options) -> Vec<Scale> {
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
pub(super) fn scale_points(
    kernel: &Kernel,
    (dimension, size): (&str, u32),
    over_cap: &[u8],
    admitted: impl Iterator<Item = Vec<u8>>,
    rounds: usize,
) -> [Scale; 2] {
    let admit = kernel.admit_program().expect("admit");
    let rejected = counted(kernel, stat::REJECTED_PER_SOURCE, 1, "SYN rejected", || {
        cost(admit, over_cap, rounds)
    });
    let admitted = counted(kernel, stat::SYN_PASSED, 5_000, "SYN admitted", || {
        single_runs(admit, admitted)
    });
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

/// Holds what a subject put in place, for the length of one measurement.
#[derive(Default)]
pub struct Installed {
    /// A baseline program, and the name of the one attached.
    baseline: Option<(Baseline, &'static str)>,
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
        Subject::BareDrop | Subject::HeaderDrop | Subject::CacheDrop | Subject::BarePass => {
            let program = match subject {
                Subject::BareDrop => BARE_DROP,
                Subject::BarePass => BARE_PASS,
                Subject::CacheDrop => CACHE_DROP,
                _ => HEADER_DROP,
            };
            let mut baseline = Baseline::load().expect("baseline programs");
            if subject == Subject::CacheDrop {
                // The sources the limiter holds at their caps.
                let at_cap: Vec<FlowKey> = (0..at_cap)
                    .map(|i| flow_to_25(flood_source(i), 1, FLOOD_SERVER))
                    .collect();
                let left_out = baseline
                    .remember_refusals(&at_cap)
                    .expect("filling cache_drop's cache");
                assert_eq!(left_out, 0, "cache_drop remembers every source at its cap");
            }
            lab.attach_baseline(&mut baseline, program);
            Installed {
                baseline: Some((baseline, program)),
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

/// What one flood measures.
#[derive(Clone, Copy)]
pub enum Gauge {
    /// Packets per second the server got through, the generator at full
    /// speed.
    HighestRate,
    /// The share of the server's core the receive path took at this many
    /// packets per second.
    CpuAt(u64),
    /// Nanoseconds a packet spent in the subject's XDP program at full
    /// speed, by the kernel's run-time statistics (NaN without one).
    ProgramTime,
}

impl Installed {
    /// The XDP program attached, if any.
    pub fn xdp_program(&self) -> Option<&Xdp> {
        match (&self.limiter, &self.baseline) {
            (Some(kernel), _) => kernel.admit_program().ok(),
            (None, Some((baseline, name))) => baseline.program(name).ok(),
            (None, None) => None,
        }
    }
}

/// The run count and run time the kernel has kept for `program`.
fn run_stats(program: &Xdp) -> (u64, Duration) {
    let info = program.info().expect("the program's info");
    (info.run_count(), info.run_time())
}

/// One flood measurement in a fresh lab (fresh conntrack too): see
/// [`Gauge`].
pub fn measure(
    subject: Subject,
    sources: u32,
    duration: Duration,
    gauge: Gauge,
    generator: &mut Baseline,
) -> f64 {
    let rate = match gauge {
        Gauge::CpuAt(rate) => Some(rate),
        Gauge::HighestRate | Gauge::ProgramTime => None,
    };
    let lab = FloodLab::new();
    // A mail server listening on port 25, as on a real MX.
    let _listener = lab.server.run(|| {
        TcpListener::bind((SERVER, 25)).expect("listening on port 25 in the server namespace")
    });
    // The flood from 256 sources is one from sources at their cap; the one
    // from 65,536 mostly opens new connections.
    let at_cap = if sources <= 256 { sources } else { 0 };
    let mut installed = install(&lab, subject, at_cap);
    // Run-time statistics only for their own measurement: kept while the
    // descriptor is open.
    let stats = matches!(gauge, Gauge::ProgramTime)
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS"));
    let stats_from = stats
        .as_ref()
        .and_then(|_| installed.xdp_program())
        .map(run_stats);
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
    let ran = stats_from
        .zip(installed.xdp_program().map(run_stats))
        .filter(|((runs, _), (runs_now, _))| runs_now > runs)
        .map(|((runs, time), (runs_now, time_now))| {
            (time_now - time).as_nanos() as f64 / (runs_now - runs) as f64
        });
    drop(stats);
    drop(installed);
    drop(lab);
    // Conntrack entries of a deleted namespace go away in the background.
    std::thread::sleep(Duration::from_millis(500));
    match gauge {
        Gauge::HighestRate => handled as f64 / duration.as_secs_f64(),
        Gauge::CpuAt(_) => cpu / duration.as_secs_f64(),
        Gauge::ProgramTime => ran.unwrap_or(f64::NAN),
    }
}

pub(super) fn flood(options: &Options) -> Vec<Flood> {
    let duration = options.flood_seconds();
    let mut generator = Baseline::load().expect("the generator");
    let mut out = Vec::new();
    for sources in [256u32, 65_536] {
        let mut rounds: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); Subject::ALL.len()];
        for _ in 0..options.flood_rounds() {
            for (subject, figures) in Subject::ALL.into_iter().zip(&mut rounds) {
                let mut gauge = |gauge| measure(subject, sources, duration, gauge, &mut generator);
                let max_pps = gauge(Gauge::HighestRate);
                let cpu = gauge(Gauge::CpuAt(FIXED_RATE));
                let program_ns = if subject.has_xdp_program() {
                    gauge(Gauge::ProgramTime)
                } else {
                    f64::NAN
                };
                figures.push((max_pps, cpu, program_ns));
            }
        }
        for (subject, figures) in Subject::ALL.into_iter().zip(rounds) {
            let max_pps = median(figures.iter().map(|f| f.0).collect());
            let cpu_at_fixed_rate = median(figures.iter().map(|f| f.1).collect());
            let program_ns =
                Some(median(figures.iter().map(|f| f.2).collect())).filter(|ns| ns.is_finite());
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
                program_ns,
            });
        }
    }
    out
}
