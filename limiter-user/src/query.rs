//! What the operator asks the daemon: which sources hold how many
//! connections, why a source would be refused, and the counters. Every
//! verdict here comes from `limiter_common::rate::judge`, the rule the
//! kernel programs run.

use std::net::{IpAddr, SocketAddr};

use limiter_common::{
    Limits, Rule, UNLIMITED, addr,
    maps::{MAX_CONNECTORS, SourceKey, stat},
    rate::{self, RateWindow},
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Action, Config, Connector, LimitValue},
    kernel::{Kernel, KernelError, Stats, monotonic_ns},
    selection::{SelectionTable, canonical, from_addr, to_addr},
};

/// A connector's identity in the kernel, next to its config.
pub struct Connectors<'a> {
    pub config: &'a Config,
    /// Connector `i` of the config has kernel id `ids[i]`.
    pub ids: &'a [u32],
}

impl Connectors<'_> {
    pub fn by_id(&self, id: u32) -> Option<&Connector> {
        self.ids
            .iter()
            .position(|i| *i == id)
            .map(|index| &self.config.connectors[index])
    }

    fn id_of(&self, name: &str) -> Option<(u32, &Connector)> {
        self.config
            .connectors
            .iter()
            .zip(self.ids)
            .find(|(c, _)| c.name.eq_ignore_ascii_case(name))
            .map(|(c, id)| (*id, c))
    }
}

/// A limit as JSON: a number, or "unlimited".
pub fn limit_json(raw: u32) -> serde_json::Value {
    if raw == UNLIMITED {
        serde_json::Value::from(LimitValue::display(raw))
    } else {
        serde_json::Value::from(raw)
    }
}

/// How a source identity is shown: an IPv4 address, or an IPv6 address with
/// the prefix it stands for.
pub fn show_source(identity: &addr::Addr, ipv6_prefix_length: u8) -> String {
    let ip = from_addr(identity);
    match ip {
        IpAddr::V6(_) if ipv6_prefix_length < 128 => format!("{ip}/{ipv6_prefix_length}"),
        _ => ip.to_string(),
    }
}

/// One source on one connector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceEntry {
    pub connector: String,
    pub source: String,
    pub live: u32,
    /// The effective cap a new connection from this source meets now; null
    /// when no limit applies.
    pub cap: Option<u32>,
    /// The limit behind `cap` ("total", "per_source", "percentage", "rate"
    /// when the rate refuses it now, "none").
    pub rule: String,
    #[serde(flatten)]
    pub holding: Holding,
    #[serde(flatten)]
    pub rate: RateStanding,
}

/// What a source can hold with the others' connections as they are (see
/// `limiter_common::headroom`). Every field is absent in the answer of a
/// daemon older than it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// How many more connections the source can open now; null when no
    /// limit stops it.
    #[serde(default)]
    pub can_open: Option<u32>,
    /// The most connections the source can hold (its own connections shrink
    /// what is left for the percentage rule: often below `cap`).
    #[serde(default)]
    pub holds_at_most: Option<u32>,
    /// The limit that refuses the connection after those ("none": nothing).
    #[serde(default)]
    pub stopped_by: String,
}

impl Holding {
    /// What a source with `live_source` of `live_total` and `recent`
    /// connections in its rate window can hold: the concurrency limits',
    /// and no more to open now than its rate has left.
    fn of(limits: &Limits, live_total: u32, live_source: u32, recent: u32) -> Holding {
        let headroom = limiter_common::headroom(limits, live_total, live_source);
        let rate_left = rate::left(limits, recent);
        let concurrent = headroom.can_open(live_source);
        // What stops it first: its rate, when that leaves it fewer.
        let stopped_by = if rate_left < concurrent {
            Rule::Rate
        } else {
            headroom.stopped_by
        };
        Holding {
            can_open: limited(concurrent.min(rate_left)),
            holds_at_most: limited(headroom.holds_at_most),
            stopped_by: stopped_by.name().to_string(),
        }
    }

    /// Whether the daemon said (one older than `Holding` does not).
    pub fn said(&self) -> bool {
        !self.stopped_by.is_empty()
    }
}

/// Where a source stands with the connection rate (see
/// `limiter_common::rate`). Every field is absent in the answer of a daemon
/// older than the rate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateStanding {
    /// The connections it opened in its window: in the last
    /// `connection_rate_time_unit`, to a slot.
    #[serde(default)]
    pub recent: u32,
    /// `max_inbound_connection_rate_per_source`: a number, or "unlimited"
    /// (null: the daemon did not say).
    #[serde(default)]
    pub rate_limit: serde_json::Value,
    /// Seconds until the rate lets it open one more: 0 when it may now;
    /// null when the rate is unlimited.
    #[serde(default)]
    pub rate_wait_s: Option<f64>,
    /// The time unit the rate counts in, in seconds.
    #[serde(default)]
    pub connection_rate_time_unit: Option<u32>,
}

impl RateStanding {
    /// The standing of a source with rate window `window`, at `now_ns`
    /// (`CLOCK_MONOTONIC`, the kernel's clock).
    pub fn of(limits: &Limits, window: &RateWindow, now_ns: u64) -> RateStanding {
        let unit = limits.connection_rate_time_unit;
        let slot_ns = rate::slot_ns(unit);
        let limit = limits.max_inbound_connection_rate_per_source;
        RateStanding {
            recent: window.recent(now_ns, slot_ns),
            rate_limit: limit_json(limit),
            rate_wait_s: window
                .allowed_at(now_ns, slot_ns, limit)
                .map(|at| seconds_up(at.saturating_sub(now_ns))),
            connection_rate_time_unit: Some(unit),
        }
    }

    /// Whether the daemon said (one older than the rate does not).
    pub fn said(&self) -> bool {
        !self.rate_limit.is_null()
    }
}

/// Nanoseconds as seconds, rounded up to the millisecond: a wait never
/// reads shorter than it is.
fn seconds_up(ns: u64) -> f64 {
    ns.div_ceil(1_000_000) as f64 / 1000.0
}

/// A limit, or nothing, as JSON: null for unlimited.
fn limited(raw: u32) -> Option<u32> {
    (raw != UNLIMITED).then_some(raw)
}

/// The sources holding connections, or that opened some lately (their
/// rate window holds one), largest first.
pub fn sources(
    connectors: &Connectors,
    kernel: &Kernel,
    only: Option<&str>,
    top: Option<usize>,
) -> anyhow::Result<Vec<SourceEntry>> {
    let filter = match only {
        Some(name) => Some(
            connectors
                .id_of(name)
                .ok_or_else(|| anyhow::anyhow!("there is no connector \"{name}\""))?
                .0,
        ),
        None => None,
    };
    let now = monotonic_ns();
    let mut out = Vec::new();
    for (key, count) in kernel.sources() {
        if filter.is_some_and(|id| id != key.connector) {
            continue;
        }
        let Some(connector) = connectors.by_id(key.connector) else {
            // A removed connector whose last connections are still open.
            continue;
        };
        let limits = &connector.limits;
        let standing = RateStanding::of(limits, &count.rate, now);
        let rate_limited = limits.max_inbound_connection_rate_per_source != UNLIMITED;
        if count.live == 0 && !(rate_limited && standing.recent > 0) {
            // Idle, waiting to be forgotten (a window without a rate limit
            // holds nobody back).
            continue;
        }
        let live_total = kernel.connector_live(key.connector)?;
        let evaluation = rate::judge(limits, live_total, count.live, standing.recent);
        out.push(SourceEntry {
            connector: connector.name.clone(),
            source: show_source(&key.addr, connectors.config.ipv6_prefix_length),
            live: count.live,
            cap: limited(evaluation.cap),
            rule: evaluation.rule.name().to_string(),
            holding: Holding::of(limits, live_total, count.live, standing.recent),
            rate: standing,
        });
    }
    out.sort_by(|a, b| {
        b.live
            .cmp(&a.live)
            .then_with(|| b.rate.recent.cmp(&a.rate.recent))
            .then_with(|| a.connector.cmp(&b.connector))
            .then_with(|| a.source.cmp(&b.source))
    });
    if let Some(top) = top {
        out.truncate(top);
    }
    Ok(out)
}

/// What happens to a new connection now.
pub mod verdict {
    /// Let in.
    pub const ADMITTED: &str = "admitted";
    /// Refused as the connector's action says.
    pub const REJECTED: &str = "rejected";
    /// Over a cap, but the connector only reports (action monitor): let in.
    pub const WOULD_REJECT: &str = "would_reject";
}

/// Why a connection from an address would be admitted or refused now: the
/// answer for the connector the source uses most (or, holding nothing, the
/// first binding, port 25 first, whose connector takes it), and one answer
/// for every connector it can reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub ip: String,
    /// The source identity it is counted as.
    pub source: String,
    #[serde(flatten)]
    pub answer: Answer,
    /// Each connector that takes a connection from `ip` on some binding,
    /// `answer`'s first (just that one with `--local`).
    #[serde(default)]
    pub answers: Vec<Answer>,
}

/// One connector's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The local address and port the connection was assumed to reach.
    pub local: Option<String>,
    /// Every binding of the connector through which `ip` reaches it.
    #[serde(default)]
    pub bindings: Vec<String>,
    pub connector: Option<String>,
    /// The connector's action ("drop", "reset", "monitor", "reply").
    #[serde(default)]
    pub action: Option<String>,
    /// Live connections on the connector, and from this source on it.
    pub live_total: u32,
    pub live_source: u32,
    /// The cap the next connection from the source meets (the most
    /// connections it may hold with that one, counts as they are now; when
    /// the rate refuses, its limit a time unit).
    pub cap: Option<u32>,
    /// The limit that binds now: the one that refuses (the rate's last),
    /// or the tightest.
    pub rule: String,
    /// Whether a new connection would be let in now (with action monitor,
    /// also one over a cap: see `verdict`).
    pub admitted: bool,
    /// "admitted", "rejected" or "would_reject" (action monitor: over a
    /// cap, let in and reported).
    #[serde(default)]
    pub verdict: String,
    /// The event a refusal (or, with action monitor, a would-be refusal)
    /// is reported as.
    pub event_id: Option<u32>,
    #[serde(flatten)]
    pub holding: Holding,
    #[serde(flatten)]
    pub rate: RateStanding,
    pub max_inbound_connection: Option<serde_json::Value>,
    pub max_inbound_connection_per_source: Option<serde_json::Value>,
    pub max_inbound_connection_percentage_per_source: Option<u32>,
}

/// Explains a connection from `ip` to `local`, or, without `local`, to
/// every binding of its family.
pub fn explain(
    connectors: &Connectors,
    table: &SelectionTable,
    kernel: &Kernel,
    ip: IpAddr,
    local: Option<SocketAddr>,
) -> Result<Explanation, KernelError> {
    let ip = canonical(ip);
    let source_identity =
        addr::source_identity(&to_addr(ip), connectors.config.ipv6_prefix_length as u32);
    let candidates: Vec<SocketAddr> = match local {
        Some(local) => vec![SocketAddr::new(canonical(local.ip()), local.port())],
        None => {
            let mut bindings: Vec<SocketAddr> = connectors
                .config
                .connectors
                .iter()
                .flat_map(|c| c.bindings.iter().map(|b| b.0))
                .filter(|b| b.is_ipv4() == ip.is_ipv4())
                .collect();
            bindings.sort_by_key(|b| (b.port() != 25, !b.ip().is_unspecified()));
            let mut seen = std::collections::HashSet::new();
            bindings.retain(|b| seen.insert(*b));
            bindings
        }
    };
    let now = monotonic_ns();
    // One answer per connector, with every binding that reaches it.
    let mut answers: Vec<(u32, Answer)> = Vec::new();
    for local in candidates {
        let Some(id) = table.select(local.ip(), local.port(), ip) else {
            continue;
        };
        if let Some((_, answer)) = answers.iter_mut().find(|(known, _)| *known == id) {
            answer.bindings.push(local.to_string());
            continue;
        }
        let connector = connectors.by_id(id).expect("ids come from the table");
        let live_total = kernel.connector_live(id)?;
        let count = kernel.source_count(&SourceKey {
            connector: id,
            addr: source_identity,
        });
        let live_source = count.map_or(0, |c| c.live);
        let standing = RateStanding::of(
            &connector.limits,
            &count.map(|c| c.rate).unwrap_or_default(),
            now,
        );
        answers.push((
            id,
            answer(connector, local, live_total, live_source, standing),
        ));
    }
    // The connector the source holds most on comes first (a stable sort
    // keeps the bindings' order among the others).
    answers.sort_by_key(|(_, a)| std::cmp::Reverse(a.live_source));
    let answers: Vec<Answer> = answers.into_iter().map(|(_, a)| a).collect();
    let first = answers.first().cloned().unwrap_or_else(|| Answer {
        local: local.map(|l| l.to_string()),
        rule: Rule::None.name().to_string(),
        admitted: true,
        verdict: verdict::ADMITTED.to_string(),
        holding: Holding {
            stopped_by: Rule::None.name().to_string(),
            ..Holding::default()
        },
        ..Answer::default()
    });
    Ok(Explanation {
        ip: ip.to_string(),
        source: show_source(&source_identity, connectors.config.ipv6_prefix_length),
        answer: first,
        answers,
    })
}

/// What `connector` does with a new connection to `local` from a source
/// holding `live_source` of its `live_total` connections, where it stands
/// with the connection rate `standing`.
fn answer(
    connector: &Connector,
    local: SocketAddr,
    live_total: u32,
    live_source: u32,
    standing: RateStanding,
) -> Answer {
    let limits = &connector.limits;
    let evaluation = rate::judge(limits, live_total, live_source, standing.recent);
    let monitor = connector.action == Action::Monitor;
    let verdict = match (evaluation.admitted, monitor) {
        (true, _) => verdict::ADMITTED,
        (false, true) => verdict::WOULD_REJECT,
        (false, false) => verdict::REJECTED,
    };
    Answer {
        local: Some(local.to_string()),
        bindings: vec![local.to_string()],
        connector: Some(connector.name.clone()),
        action: Some(connector.action.name().to_string()),
        live_total,
        live_source,
        cap: limited(evaluation.cap),
        rule: evaluation.rule.name().to_string(),
        admitted: evaluation.admitted || monitor,
        verdict: verdict.to_string(),
        event_id: (!evaluation.admitted).then(|| evaluation.rule.event_id()),
        holding: Holding::of(limits, live_total, live_source, standing.recent),
        rate: standing,
        max_inbound_connection: Some(limit_json(limits.max_inbound_connection)),
        max_inbound_connection_per_source: Some(limit_json(
            limits.max_inbound_connection_per_source,
        )),
        max_inbound_connection_percentage_per_source: Some(
            limits.max_inbound_connection_percentage_per_source,
        ),
    }
}

/// Counters of the kernel programs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Connections admitted and counted when their handshake completed.
    pub admitted: u64,
    /// Connections refused: SYNs refused, and connections reset when their
    /// handshake completed (never those of action monitor: see
    /// `would_reject`).
    pub rejected: u64,
    pub rejected_total_limit: u64,
    pub rejected_per_source: u64,
    pub rejected_percentage: u64,
    /// Rejected by `max_inbound_connection_rate_per_source`.
    #[serde(default)]
    pub rejected_rate: u64,
    /// Of the rejections, those judged when the handshake completed (the
    /// SYN had passed) and reset then.
    pub rejected_late: u64,
    /// Connections reset because a table they needed was full.
    pub rejected_table_full: u64,
    /// SYNs passed to the kernel.
    pub syn_passed: u64,
    /// Counted connections the server's socket closed.
    pub closed: u64,
    /// Connections judged at a `forwarded_to` endpoint in another network
    /// namespace (a container behind DNAT).
    pub forwarded: u64,
    /// Connections found in the socket table and counted without a
    /// judgement, and those of them seen closed.
    pub seeded: u64,
    pub seeded_closed: u64,
    /// Counted connections found gone from the socket table without a
    /// callback (the daemon or sock_ops was away): corrections.
    pub reconciled: u64,
    /// Connections refused with action reply and handed to the responder,
    /// which completes the handshake (a forged source never does) and
    /// writes the connector's 421 line.
    #[serde(default)]
    pub replied: u64,
    /// SYNs refused with action reply beyond the replies a second (or with
    /// no responder running): dropped.
    #[serde(default)]
    pub reply_dropped: u64,
    /// With action monitor: connections admitted that a limit would have
    /// refused (reported, in `admitted` too), and by which limit.
    #[serde(default)]
    pub would_reject: u64,
    #[serde(default)]
    pub would_reject_total_limit: u64,
    #[serde(default)]
    pub would_reject_per_source: u64,
    #[serde(default)]
    pub would_reject_percentage: u64,
    #[serde(default)]
    pub would_reject_rate: u64,
}

impl Counters {
    fn from_row(row: &[u64; stat::COUNT as usize]) -> Counters {
        let at = |i: u32| row[i as usize];
        let rejected_total_limit = at(stat::REJECTED_TOTAL);
        let rejected_per_source = at(stat::REJECTED_PER_SOURCE);
        let rejected_percentage = at(stat::REJECTED_PERCENTAGE);
        let rejected_rate = at(stat::REJECTED_RATE);
        Counters {
            admitted: at(stat::ADMITTED),
            rejected: rejected_total_limit
                + rejected_per_source
                + rejected_percentage
                + rejected_rate,
            rejected_total_limit,
            rejected_per_source,
            rejected_percentage,
            rejected_rate,
            rejected_late: at(stat::REJECTED_LATE),
            rejected_table_full: at(stat::TABLE_FULL),
            syn_passed: at(stat::SYN_PASSED),
            closed: at(stat::CLOSED),
            forwarded: at(stat::FORWARDED),
            seeded: at(stat::SEEDED),
            seeded_closed: at(stat::SEEDED_CLOSED),
            reconciled: at(stat::RECONCILED),
            replied: at(stat::REPLIED),
            reply_dropped: at(stat::REPLY_GATED),
            would_reject: at(stat::MONITORED_TOTAL)
                + at(stat::MONITORED_PER_SOURCE)
                + at(stat::MONITORED_PERCENTAGE)
                + at(stat::MONITORED_RATE),
            would_reject_total_limit: at(stat::MONITORED_TOTAL),
            would_reject_per_source: at(stat::MONITORED_PER_SOURCE),
            would_reject_percentage: at(stat::MONITORED_PERCENTAGE),
            would_reject_rate: at(stat::MONITORED_RATE),
        }
    }

    fn add(&mut self, other: &Counters) {
        self.admitted += other.admitted;
        self.rejected += other.rejected;
        self.rejected_total_limit += other.rejected_total_limit;
        self.rejected_per_source += other.rejected_per_source;
        self.rejected_percentage += other.rejected_percentage;
        self.rejected_rate += other.rejected_rate;
        self.rejected_late += other.rejected_late;
        self.rejected_table_full += other.rejected_table_full;
        self.syn_passed += other.syn_passed;
        self.closed += other.closed;
        self.forwarded += other.forwarded;
        self.seeded += other.seeded;
        self.seeded_closed += other.seeded_closed;
        self.reconciled += other.reconciled;
        self.replied += other.replied;
        self.reply_dropped += other.reply_dropped;
        self.would_reject += other.would_reject;
        self.would_reject_total_limit += other.would_reject_total_limit;
        self.would_reject_per_source += other.would_reject_per_source;
        self.would_reject_percentage += other.would_reject_percentage;
        self.would_reject_rate += other.would_reject_rate;
    }
}

/// `limiter stats`: the totals (flattened into the top level) and each
/// connector's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    #[serde(flatten)]
    pub total: Counters,
    /// SYNs to a bound port the XDP program could not read whole (cut by
    /// fragmentation, or behind more headers than it follows), dropped.
    pub unreadable_dropped: u64,
    /// Resets of connections judged over a cap that found the reset ring
    /// full (done by the daemon's sweep instead).
    pub resets_deferred: u64,
    /// Handshakes the kernel moved (NAT) to an endpoint no `forwarded_to`
    /// names: not counted.
    pub undeclared_forwards: u64,
    pub connectors: Vec<ConnectorCounters>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorCounters {
    pub name: String,
    #[serde(flatten)]
    pub counters: Counters,
}

pub fn stats(connectors: &Connectors, stats: &Stats) -> StatsReport {
    let global = |counter: u32| stats.global[counter as usize];
    let mut report = StatsReport {
        unreadable_dropped: global(stat::UNREADABLE),
        resets_deferred: global(stat::RESETS_DEFERRED),
        undeclared_forwards: global(stat::UNDECLARED_FORWARDS),
        ..Default::default()
    };
    for (id, row) in stats
        .connectors
        .iter()
        .enumerate()
        .take(MAX_CONNECTORS as usize)
    {
        let counters = Counters::from_row(row);
        report.total.add(&counters);
        if let Some(connector) = connectors.by_id(id as u32) {
            report.connectors.push(ConnectorCounters {
                name: connector.name.clone(),
                counters,
            });
        }
    }
    // In config order, as `connector list` shows them.
    report.connectors.sort_by_key(|c| {
        connectors
            .config
            .connectors
            .iter()
            .position(|k| k.name == c.name)
    });
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    /// A window with a connection counted at each of `times` (seconds).
    fn window(times: &[u64], unit: u32) -> RateWindow {
        let mut w = RateWindow::default();
        for t in times {
            w.count(t * SECOND, rate::slot_ns(unit));
        }
        w
    }

    fn rated(limit: u32, unit: u32) -> Connector {
        let mut c = Config::builtin_default().connectors.remove(0);
        c.limits.max_inbound_connection_rate_per_source = limit;
        c.limits.connection_rate_time_unit = unit;
        c
    }

    #[test]
    fn the_rate_standing_says_recent_and_the_wait() {
        let c = rated(3, 60);
        // Three in the slot from 1000 s: the next when it falls out, one
        // unit and a slot later.
        let w = window(&[1000, 1001, 1002], 60);
        let now = 1005 * SECOND + SECOND / 2;
        let standing = RateStanding::of(&c.limits, &w, now);
        assert_eq!(standing.recent, 3);
        assert_eq!(standing.rate_limit, serde_json::json!(3));
        assert_eq!(standing.connection_rate_time_unit, Some(60));
        assert_eq!(standing.rate_wait_s, Some(64.5));
        // Rounded up to the millisecond.
        let standing = RateStanding::of(&c.limits, &w, now + 1);
        assert_eq!(standing.rate_wait_s, Some(64.5));
        let standing = RateStanding::of(&c.limits, &w, now - 1);
        assert_eq!(standing.rate_wait_s, Some(64.501));
        // Under the limit: it may now.
        let standing = RateStanding::of(&rated(4, 60).limits, &w, now);
        assert_eq!(standing.rate_wait_s, Some(0.0));
        // Unlimited: the window still counts; no wait to tell.
        let standing = RateStanding::of(&rated(UNLIMITED, 60).limits, &w, now);
        assert_eq!(
            (standing.recent, &standing.rate_limit, standing.rate_wait_s),
            (3, &serde_json::json!("unlimited"), None)
        );
        // An older daemon's answer says nothing.
        let old: RateStanding = serde_json::from_str("{}").unwrap();
        assert!(!old.said() && standing.said());
    }

    #[test]
    fn an_answer_refused_by_the_rate_says_rate_and_61021() {
        let mut c = rated(3, 60);
        let w = window(&[1000, 1001, 1002], 60);
        let now = 1010 * SECOND;
        let local: SocketAddr = "192.0.2.1:25".parse().unwrap();
        let a = answer(&c, local, 4, 1, RateStanding::of(&c.limits, &w, now));
        assert_eq!(
            (
                a.rule.as_str(),
                a.verdict.as_str(),
                a.admitted,
                a.event_id,
                a.cap
            ),
            ("rate", verdict::REJECTED, false, Some(61021), Some(3))
        );
        // Concurrency could take more; the rate lets nothing in now.
        assert_eq!(
            (a.holding.can_open, a.holding.holds_at_most),
            (Some(0), Some(20))
        );
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["recent"], 3, "{json}");
        assert_eq!(json["rate_limit"], 3);
        assert_eq!(json["connection_rate_time_unit"], 60);
        assert_eq!(json["rate_wait_s"], 60.0);
        assert_eq!(json["can_open"], 0);
        assert_eq!(serde_json::from_value::<Answer>(json).unwrap(), a);
        // Action monitor: it would be refused.
        c.action = Action::Monitor;
        let a = answer(&c, local, 4, 1, RateStanding::of(&c.limits, &w, now));
        assert_eq!(
            (a.rule.as_str(), a.verdict.as_str(), a.admitted),
            ("rate", verdict::WOULD_REJECT, true)
        );
        // Exchange's limits come first.
        let a = answer(&c, local, 24, 20, RateStanding::of(&c.limits, &w, now));
        assert_eq!((a.rule.as_str(), a.event_id), ("per_source", Some(1021)));
        // Within the rate: admitted, and the rate says how far it is; it
        // can open what is left of its rate now, not the 19 it could hold.
        let a = answer(
            &c,
            local,
            4,
            1,
            RateStanding::of(&c.limits, &RateWindow::default(), now),
        );
        assert_eq!(
            (a.verdict.as_str(), a.holding.can_open),
            (
                "admitted",
                Some(c.limits.max_inbound_connection_rate_per_source)
            )
        );
        assert_eq!((a.rate.recent, a.rate.rate_wait_s), (0, Some(0.0)));
    }

    #[test]
    fn a_source_entry_carries_the_rate_fields() {
        let entry = SourceEntry {
            connector: "F".into(),
            source: "192.0.2.7".into(),
            live: 0,
            cap: Some(3),
            rule: "rate".into(),
            holding: Holding::default(),
            rate: RateStanding {
                recent: 3,
                rate_limit: serde_json::json!(3),
                rate_wait_s: Some(12.5),
                connection_rate_time_unit: Some(60),
            },
        };
        let json = serde_json::to_value(&entry).unwrap();
        for (key, value) in [
            ("recent", serde_json::json!(3)),
            ("rate_limit", serde_json::json!(3)),
            ("rate_wait_s", serde_json::json!(12.5)),
            ("connection_rate_time_unit", serde_json::json!(60)),
        ] {
            assert_eq!(json[key], value, "{key} in {json}");
        }
        assert_eq!(serde_json::from_value::<SourceEntry>(json).unwrap(), entry);
        // Unlimited: null wait.
        let mut unlimited = entry.clone();
        unlimited.rate.rate_limit = "unlimited".into();
        unlimited.rate.rate_wait_s = None;
        let json = serde_json::to_value(&unlimited).unwrap();
        assert!(json["rate_wait_s"].is_null() && json["rate_limit"] == "unlimited");
    }

    #[test]
    fn stats_count_the_rate_into_the_sums() {
        let mut row = [0u64; stat::COUNT as usize];
        row[stat::REJECTED_PER_SOURCE as usize] = 2;
        row[stat::REJECTED_RATE as usize] = 5;
        row[stat::MONITORED_TOTAL as usize] = 1;
        row[stat::MONITORED_RATE as usize] = 7;
        let c = Counters::from_row(&row);
        assert_eq!((c.rejected, c.rejected_rate), (7, 5));
        assert_eq!((c.would_reject, c.would_reject_rate), (8, 7));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            (&json["rejected_rate"], &json["would_reject_rate"]),
            (&5.into(), &7.into())
        );
        // An older daemon's counters, without them.
        let mut old = json;
        old.as_object_mut().unwrap().remove("rejected_rate");
        old.as_object_mut().unwrap().remove("would_reject_rate");
        let read: Counters = serde_json::from_value(old).unwrap();
        assert_eq!((read.rejected_rate, read.would_reject_rate), (0, 0));
    }

    #[test]
    fn sources_are_shown_as_operators_write_them() {
        let v4 = to_addr("192.0.2.7".parse().unwrap());
        assert_eq!(show_source(&v4, 64), "192.0.2.7");
        let v6 = addr::source_identity(&to_addr("2001:db8:1:2::99".parse().unwrap()), 64);
        assert_eq!(show_source(&v6, 64), "2001:db8:1:2::/64");
        assert_eq!(
            show_source(&to_addr("2001:db8::1".parse().unwrap()), 128),
            "2001:db8::1"
        );
    }
}
