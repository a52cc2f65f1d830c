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

use std::time::Duration;

use limiter::baseline::Baseline;
use serde::Serialize;

mod measure;
mod render;
mod targets;

pub use self::{
    measure::{Gauge, Installed, flow_to_25, install, measure},
    render::{chart_svg, markdown},
};
use self::{
    measure::{flood, micro, scale},
    targets::targets,
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
    /// Nanoseconds a packet spent in the subject's XDP program at full
    /// blast, by the kernel's own run-time statistics, taken in a flood of
    /// its own (they cost each run two clock reads); none for a subject
    /// without an XDP program.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_ns: Option<f64>,
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
    /// Drops SYNs to port 25 whose refusal key its per-CPU array holds
    /// (the flood's sources at their caps): with 256 sources, the floor of
    /// a refusal from a per-CPU cache.
    CacheDrop,
    Limiter,
    /// The limiter with action `reply`: refused SYNs answered by a
    /// responder (each source's replies gated to a few a second).
    LimiterReply,
    Iptables,
    Nftables,
}

impl Subject {
    pub const ALL: [Subject; 9] = [
        Subject::Limiter,
        Subject::LimiterReply,
        Subject::BareDrop,
        Subject::HeaderDrop,
        Subject::CacheDrop,
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
            Subject::CacheDrop => "cache_drop",
            Subject::Limiter => "limiter",
            Subject::LimiterReply => "limiter, action reply",
            Subject::Iptables => "iptables connlimit",
            Subject::Nftables => "nftables ct count",
        }
    }

    /// Whether the subject is an XDP program.
    pub fn has_xdp_program(self) -> bool {
        !matches!(
            self,
            Subject::Nothing | Subject::Iptables | Subject::Nftables
        )
    }
}

/// Runs every benchmark.
pub fn run(options: &Options) -> Report {
    let mut baseline = Baseline::load().expect("loading the baseline programs (as root)");
    let micro = if options.runs(Part::Micro) {
        eprintln!("bench: per-packet cost (BPF_PROG_TEST_RUN)");
        micro(options, &mut baseline)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flood_row(sources: u32, subject: Subject, max_pps: f64, cpu: f64) -> Flood {
        Flood {
            sources,
            subject: subject.name().into(),
            max_pps,
            cpu_at_fixed_rate: cpu,
            program_ns: None,
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
            (Subject::CacheDrop, 4.7e6, 0.01),
            (Subject::Iptables, 0.2e6, 0.04),
            (Subject::Nftables, 0.4e6, 0.03),
            (Subject::BarePass, 0.48e6, 0.01),
            (Subject::Nothing, 0.5e6, 0.01),
        ] {
            let mut row = flood_row(256, subject, pps, cpu);
            if subject == Subject::Limiter {
                row.program_ns = Some(140.4);
            }
            flood.push(row);
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
        // The floors: 4.6 / 4.8 of header_drop, which is 4.8 / 0.4 = 12 of
        // nftables: below 15 whatever a limiter does.
        assert!((t["flood_256_vs_header_drop"].measured() - 4.6 / 4.8).abs() < 1e-9);
        assert!((t["flood_256_header_drop_vs_nftables_ct_count"].measured() - 12.0).abs() < 1e-9);
        assert!((t["flood_256_header_drop_vs_iptables_connlimit"].measured() - 24.0).abs() < 1e-9);
        assert_eq!(
            t["flood_256_header_drop_vs_nftables_ct_count"].bound,
            "floor"
        );
        // And of a per-CPU cache: 4.6 / 4.7 of cache_drop, which is
        // 4.7 / 0.2 = 23.5 of iptables.
        assert!((t["flood_256_vs_cache_drop"].measured() - 4.6 / 4.7).abs() < 1e-9);
        assert!((t["flood_256_cache_drop_vs_iptables_connlimit"].measured() - 23.5).abs() < 1e-9);
        assert_eq!(t["flood_256_cache_drop_vs_bare_drop"].bound, "floor");
        assert_eq!(t.len(), 20);
    }

    #[test]
    fn the_report_renders_as_markdown_json_and_a_chart() {
        let report = report();
        let md = markdown(&report, "chart.svg");
        assert!(md.contains("| flood_256_vs_nftables_ct_count | 11.50 | >= 15 | **no** |"));
        assert!(md.contains("| syn_admitted_ns | 300 ns | <= 400 ns | yes |"));
        assert!(md.contains("| 256 | iptables connlimit | 200000 | 4.0 % | - |"));
        assert!(md.contains("| 256 | limiter | 4600000 | 1.1 % | 140 |"));
        assert!(md.contains("![flood results](chart.svg)"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["targets"]["syn_reject_vs_bare_drop"]["holds"], false);
        assert_eq!(json["targets"]["syn_admitted_ns"]["ns"], 300.0);
        assert_eq!(json["flood"][0]["program_ns"], 140.4);
        assert!(json["flood"][1].get("program_ns").is_none());
        let svg = chart_svg(&report);
        assert!(
            svg.starts_with("<svg") && svg.contains("65536 sources"),
            "{svg}"
        );
    }
}
