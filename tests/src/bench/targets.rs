//! The targets: each measured ratio or cost held against its bound.

use super::{
    Flood, Micro, Scale, Subject, Target,
    measure::{CACHE_DROP_CASE, HEADER_PASS_CASE},
};

pub(super) fn target(
    name: &str,
    ratio: f64,
    at_most: Option<f64>,
    at_least: Option<f64>,
) -> (String, Target) {
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

pub(super) fn time_target(name: &str, ns: f64, at_most: f64) -> (String, Target) {
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

pub(super) fn targets(
    micro: &[Micro],
    scale: &[Scale],
    flood: &[Flood],
) -> std::collections::BTreeMap<String, Target> {
    let mut out = std::collections::BTreeMap::new();
    let floor = |case: &str| micro.iter().find(|m| m.case == case);
    let pass = micro
        .iter()
        .filter(|m| {
            m.baseline == "bare XDP_PASS" && m.case != "bare XDP_PASS" && m.case != HEADER_PASS_CASE
        })
        .map(|m| m.ratio)
        .fold(0.0, f64::max);
    if pass > 0.0 {
        out.extend([target("pass_path_vs_bare_pass", pass, Some(1.2), None)]);
    }
    if let Some(headers) = floor(HEADER_PASS_CASE) {
        out.extend([target(
            "pass_path_header_pass_vs_bare_pass",
            headers.ratio,
            None,
            None,
        )]);
    }
    if let Some(reject) = micro.iter().find(|m| m.case.starts_with("SYN rejected")) {
        out.extend([target(
            "syn_reject_vs_bare_drop",
            reject.ratio,
            Some(2.0),
            None,
        )]);
        if let Some(cached) = floor(CACHE_DROP_CASE) {
            out.extend([
                target(
                    "syn_reject_cache_drop_vs_bare_drop",
                    cached.ratio,
                    None,
                    None,
                ),
                target(
                    "syn_reject_vs_cache_drop",
                    reject.ns / cached.ns,
                    None,
                    None,
                ),
            ]);
        }
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
            // What the limiter keeps of the floor of any SYN filter, and
            // that floor against the firewalls: where their ratios end.
            target(
                "flood_256_vs_header_drop",
                limiter / pps(256, Subject::HeaderDrop),
                None,
                None,
            ),
            target(
                "flood_256_header_drop_vs_iptables_connlimit",
                pps(256, Subject::HeaderDrop) / pps(256, Subject::Iptables),
                None,
                None,
            ),
            target(
                "flood_256_header_drop_vs_nftables_ct_count",
                pps(256, Subject::HeaderDrop) / pps(256, Subject::Nftables),
                None,
                None,
            ),
            // The same for the floor of a refusal from a per-CPU cache
            // (one CPU-local lookup, as the limiter's refusal makes).
            target(
                "flood_256_cache_drop_vs_bare_drop",
                pps(256, Subject::CacheDrop) / pps(256, Subject::BareDrop),
                None,
                None,
            ),
            target(
                "flood_256_vs_cache_drop",
                limiter / pps(256, Subject::CacheDrop),
                None,
                None,
            ),
            target(
                "flood_256_cache_drop_vs_iptables_connlimit",
                pps(256, Subject::CacheDrop) / pps(256, Subject::Iptables),
                None,
                None,
            ),
            target(
                "flood_256_cache_drop_vs_nftables_ct_count",
                pps(256, Subject::CacheDrop) / pps(256, Subject::Nftables),
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
