//! What a person reads: the tables and blocks of each command, in
//! Exchange's names (JSON keeps the config file's).

use limiter_common::Rule;

use crate::{
    api::{ConnectorStatus, Status},
    query::{Answer, Explanation, RateStanding, SourceEntry, StatsReport, verdict},
};

pub(super) fn print_status(s: &Status) {
    println!(
        "limiter {} (pid {}), up {}s, config: {}",
        s.version, s.pid, s.uptime_seconds, s.config
    );
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({} XDP)", i.name, i.xdp_mode))
        .collect();
    println!("interfaces: {}", ifaces.join(", "));
    println!("cgroup: {}", s.cgroup);
    println!("live: {} connection(s) held", s.live_total);
    for endpoint in &s.undeclared_forwards {
        println!(
            "warning: connections end up at {endpoint} (NAT), which no connector's forwarded_to names: not counted"
        );
    }
    if s.live_removed_connectors > 0 {
        println!(
            "  of which {} on removed connectors, until they close",
            s.live_removed_connectors
        );
    }
    println!();
    print_connectors(&s.connectors);
}

pub(super) fn limits(c: &ConnectorStatus) -> String {
    format!(
        "{} / {} / {}%",
        plain(&c.max_inbound_connection),
        plain(&c.max_inbound_connection_per_source),
        c.max_inbound_connection_percentage_per_source
    )
}

/// A rate limit as people read it: "30 per 60 s", or "unlimited"; `None`
/// when the daemon did not say (one older than the rate).
pub(super) fn rate_limit_words(limit: &serde_json::Value, unit: Option<u32>) -> Option<String> {
    match (limit, unit) {
        (serde_json::Value::Null, _) => None,
        (serde_json::Value::Number(n), Some(unit)) => Some(format!("{n} per {unit} s")),
        (limit, _) => Some(plain(limit)),
    }
}

/// A connector's MaxInboundConnectionRatePerSource (see
/// [`rate_limit_words`]).
pub(super) fn rate_limit(c: &ConnectorStatus) -> Option<String> {
    rate_limit_words(
        &c.max_inbound_connection_rate_per_source,
        c.connection_rate_time_unit,
    )
}

pub(super) const CONNECTORS_HEADER: [&str; 7] = [
    "CONNECTOR",
    "BINDINGS",
    "REMOTE RANGES",
    "LIMITS (MaxInboundConnection / PerSource / Percentage)",
    "RATE PER SOURCE",
    "ACTION",
    "LIVE",
];

pub(super) fn connector_row(c: &ConnectorStatus) -> Vec<String> {
    vec![
        c.name.clone(),
        c.bindings.join(","),
        c.remote_ip_ranges.join(","),
        limits(c),
        rate_limit(c).unwrap_or_else(|| "-".to_string()),
        c.action.clone(),
        c.live.to_string(),
    ]
}

pub(super) fn print_connectors(list: &[ConnectorStatus]) {
    let rows: Vec<Vec<String>> = list.iter().map(connector_row).collect();
    print_table(&CONNECTORS_HEADER, &rows);
}

pub(super) fn print_connector(c: &ConnectorStatus) {
    println!("Name                                      : {}", c.name);
    println!(
        "Bindings                                  : {}",
        c.bindings.join(", ")
    );
    if !c.forwarded_to.is_empty() {
        println!(
            "ForwardedTo                               : {}",
            c.forwarded_to.join(", ")
        );
    }
    println!(
        "RemoteIPRanges                            : {}",
        c.remote_ip_ranges.join(", ")
    );
    println!(
        "MaxInboundConnection                      : {}",
        plain(&c.max_inbound_connection)
    );
    println!(
        "MaxInboundConnectionPerSource             : {}",
        plain(&c.max_inbound_connection_per_source)
    );
    println!(
        "MaxInboundConnectionPercentagePerSource   : {}",
        c.max_inbound_connection_percentage_per_source
    );
    if let Some(rate) = rate_limit(c) {
        println!("MaxInboundConnectionRatePerSource         : {rate}");
    }
    println!("Action                                    : {}", c.action);
    if let Some(text) = &c.reply_text {
        println!("ReplyText                                 : {text}");
    }
    println!("LiveConnections                           : {}", c.live);
}

pub(super) const SOURCES_HEADER: [&str; 7] = [
    "CONNECTOR",
    "SOURCE",
    "LIVE",
    "CAN OPEN",
    "HOLDS AT MOST",
    "STOPPED BY",
    "RATE",
];

pub(super) fn source_row(s: &SourceEntry) -> Vec<String> {
    // A daemon of an older version does not say (a fleet mid-upgrade).
    let unsaid = !s.holding.said();
    let or_unsaid = |n: Option<u32>| {
        if unsaid {
            "-".to_string()
        } else {
            or_unlimited(n)
        }
    };
    vec![
        s.connector.clone(),
        s.source.clone(),
        s.live.to_string(),
        or_unsaid(s.holding.can_open),
        or_unsaid(s.holding.holds_at_most),
        if unsaid {
            "-".to_string()
        } else {
            limit_name(&s.holding.stopped_by).to_string()
        },
        rate_cell(&s.rate),
    ]
}

/// "R/N": connections opened in the window, of the limit ("R/-" when
/// unlimited, "-" from a daemon older than the rate).
pub(super) fn rate_cell(rate: &RateStanding) -> String {
    match &rate.rate_limit {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::Number(n) => format!("{}/{n}", rate.recent),
        _ => format!("{}/-", rate.recent),
    }
}

/// What the RATE column counts in: one line under the table, naming the
/// time unit (each connector's when they differ); `None` when no entry
/// says.
pub(super) fn rate_legend<'a>(
    sources: impl IntoIterator<Item = &'a SourceEntry>,
) -> Option<String> {
    let mut units: Vec<(&str, u32)> = Vec::new();
    for s in sources {
        if let Some(unit) = s.rate.connection_rate_time_unit
            && !units.iter().any(|(name, _)| *name == s.connector)
        {
            units.push((&s.connector, unit));
        }
    }
    let first = units.first()?.1;
    let per = if units.iter().all(|(_, unit)| *unit == first) {
        format!("the last {first} s")
    } else {
        let each: Vec<String> = units
            .iter()
            .map(|(name, unit)| format!("{name}: {unit} s"))
            .collect();
        format!("the connector's time unit ({})", each.join(", "))
    };
    Some(format!(
        "RATE: connections opened in {per} / {}",
        Rule::Rate.exchange_name()
    ))
}

pub(super) fn print_sources(sources: &[SourceEntry]) {
    let rows: Vec<Vec<String>> = sources.iter().map(source_row).collect();
    print_table(&SOURCES_HEADER, &rows);
    if let Some(legend) = rate_legend(sources) {
        println!("{legend}");
    }
}

pub(super) fn or_unlimited(n: Option<u32>) -> String {
    n.map_or("unlimited".to_string(), |n| n.to_string())
}

pub(super) fn print_explanation(e: &Explanation) {
    // A daemon of an older version answers for one connector only.
    if e.answers.is_empty() && e.answer.connector.is_some() {
        print_answer(&e.ip, &e.source, &e.answer);
        return;
    }
    if e.answers.is_empty() {
        println!(
            "{}: no connector takes it{}; it passes untouched",
            e.ip,
            e.answer
                .local
                .as_ref()
                .map(|l| format!(" on {l}"))
                .unwrap_or_default()
        );
        return;
    }
    for (i, answer) in e.answers.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_answer(&e.ip, &e.source, answer);
    }
}

/// One connector's answer, in Exchange's names.
pub(super) fn print_answer(ip: &str, source: &str, a: &Answer) {
    println!(
        "{ip} -> {}: connector \"{}\", action {}",
        a.bindings.join(", "),
        a.connector.as_deref().unwrap_or_default(),
        a.action.as_deref().unwrap_or_default()
    );
    let show = |v: &Option<serde_json::Value>| v.as_ref().map(plain).unwrap_or_default();
    let pct = a
        .max_inbound_connection_percentage_per_source
        .unwrap_or_default();
    // A daemon older than the rate does not say it.
    let rate = &a.rate;
    let rate_limit = rate_limit_words(&rate.rate_limit, rate.connection_rate_time_unit);
    println!(
        "limits: MaxInboundConnection {}, MaxInboundConnectionPerSource {}, MaxInboundConnectionPercentagePerSource {pct}{}",
        show(&a.max_inbound_connection),
        show(&a.max_inbound_connection_per_source),
        rate_limit
            .as_ref()
            .map(|words| format!(", {} {words}", Rule::Rate.exchange_name()))
            .unwrap_or_default(),
    );
    let counted_as = if source == ip {
        "this source".to_string()
    } else {
        format!("this source, counted as {source}")
    };
    let opened = match (&rate_limit, rate.connection_rate_time_unit) {
        (Some(words), Some(unit)) => format!(
            "; it opened {} connection{} in the last {unit} s (its limit: {words})",
            rate.recent,
            if rate.recent == 1 { "" } else { "s" }
        ),
        _ => String::new(),
    };
    println!(
        "live: {} on the connector, {} from {ip} ({counted_as}){opened}",
        a.live_total, a.live_source
    );
    let event = a.event_id.unwrap_or_default();
    let rule = limit_name(&a.rule);
    let mut cap = cap_words(a, pct);
    if a.rule == Rule::Rate.name()
        && let Some(wait) = rate.rate_wait_s
    {
        cap.push_str(&format!("; the next is allowed in {} s", tenths_up(wait)));
    }
    let said = match a.verdict.as_str() {
        // A daemon of an older version says only whether it admits.
        "" if a.admitted => verdict::ADMITTED,
        "" => verdict::REJECTED,
        said => said,
    };
    match said {
        verdict::REJECTED => {
            println!("a new connection now: REJECTED by {rule} (event {event}): {cap}")
        }
        verdict::WOULD_REJECT => println!(
            "a new connection now: would be REJECTED by {rule} (event {event}): {cap}; action monitor admits it and reports it"
        ),
        _ if a.cap.is_none() && matches!(rate.rate_limit, serde_json::Value::Number(_)) => {
            println!(
                "a new connection now: admitted; only {} applies",
                Rule::Rate.exchange_name()
            )
        }
        _ if a.cap.is_none() => println!("a new connection now: admitted; no limit applies"),
        _ => println!("a new connection now: admitted; its cap: {cap} ({rule})"),
    }
    let monitor = a.action.as_deref() == Some("monitor");
    let holding = &a.holding;
    match holding.holds_at_most {
        // A daemon of an older version does not say.
        _ if !holding.said() => {}
        None if holding.stopped_by == Rule::Rate.name() => println!(
            "this source: no limit on what it holds; its rate lets it open {} more now",
            holding.can_open.unwrap_or_default()
        ),
        None => println!("this source: no limit stops it"),
        Some(held) if monitor => println!(
            "this source could hold {held}, {} more now, before {} (action monitor: it is only reported)",
            holding.can_open.unwrap_or_default(),
            limit_name(&holding.stopped_by)
        ),
        Some(held) if holding.stopped_by == Rule::Rate.name() => println!(
            "this source can hold {held} at once, {} more now: its rate stops it first",
            holding.can_open.unwrap_or_default()
        ),
        Some(held) => println!(
            "this source can hold {held}, {} more now; then {} stops it",
            holding.can_open.unwrap_or_default(),
            limit_name(&holding.stopped_by)
        ),
    }
}

/// The cap the next connection meets, as its limit works it out.
pub(super) fn cap_words(a: &Answer, pct: u32) -> String {
    let cap = a.cap.unwrap_or_default();
    match a.rule.as_str() {
        "percentage" => format!("{pct} % of the remaining: {cap}"),
        "total" => format!("what the total leaves it: {cap}"),
        "rate" => rate_limit_words(&a.rate.rate_limit, a.rate.connection_rate_time_unit)
            .unwrap_or_else(|| format!("{cap} a time unit")),
        _ => format!("{cap} per source"),
    }
}

/// Seconds to a tenth, rounded up (a wait never reads shorter than it is):
/// "9.4", "10", "0.1".
pub(super) fn tenths_up(seconds: f64) -> String {
    // From whole milliseconds, which is what the daemon gives.
    let tenths = ((seconds * 1000.0).round().max(0.0) as u64).div_ceil(100);
    match tenths % 10 {
        0 => format!("{}", tenths / 10),
        tenth => format!("{}.{tenth}", tenths / 10),
    }
}

/// A limit's name for people: Exchange's (JSON keeps the config file's).
pub(super) fn limit_name(rule: &str) -> &'static str {
    match Rule::from_name(rule) {
        Some(rule) => rule.exchange_name(),
        None if rule == "table_full" => "a full kernel table",
        None => "no limit",
    }
}

pub(super) fn print_stats(s: &StatsReport) {
    let mut blocks: Vec<(&str, &crate::query::Counters)> = s
        .connectors
        .iter()
        .map(|c| (c.name.as_str(), &c.counters))
        .collect();
    blocks.push(("(all)", &s.total));
    for (i, (name, c)) in blocks.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{:<49}: {name}", "Connector");
        let lines: [(&str, u64, bool); 16] = [
            ("Admitted", c.admitted, true),
            ("Rejected", c.rejected, true),
            ("  by MaxInboundConnection", c.rejected_total_limit, true),
            (
                "  by MaxInboundConnectionPerSource",
                c.rejected_per_source,
                true,
            ),
            (
                "  by MaxInboundConnectionPercentagePerSource",
                c.rejected_percentage,
                true,
            ),
            (
                "  by MaxInboundConnectionRatePerSource",
                c.rejected_rate,
                true,
            ),
            (
                "  of them at handshake completion (reset)",
                c.rejected_late,
                true,
            ),
            (
                "  answered with the 421 line (action reply)",
                c.replied,
                c.replied + c.reply_dropped > 0,
            ),
            (
                "  dropped beyond the replies a second",
                c.reply_dropped,
                c.replied + c.reply_dropped > 0,
            ),
            (
                "Reset for a full kernel table",
                c.rejected_table_full,
                c.rejected_table_full > 0,
            ),
            (
                "Would be rejected (action monitor: admitted)",
                c.would_reject,
                c.would_reject > 0,
            ),
            (
                "  by MaxInboundConnection",
                c.would_reject_total_limit,
                c.would_reject > 0,
            ),
            (
                "  by MaxInboundConnectionPerSource",
                c.would_reject_per_source,
                c.would_reject > 0,
            ),
            (
                "  by MaxInboundConnectionPercentagePerSource",
                c.would_reject_percentage,
                c.would_reject > 0,
            ),
            (
                "  by MaxInboundConnectionRatePerSource",
                c.would_reject_rate,
                c.would_reject > 0,
            ),
            ("Closed", c.closed, true),
        ];
        for (label, n, shown) in lines {
            if shown {
                println!("{label:<49}: {n}");
            }
        }
    }
    for (what, n) in [
        ("unreadable SYNs dropped", s.unreadable_dropped),
        ("resets deferred", s.resets_deferred),
        (
            "handshakes moved by NAT to an undeclared endpoint",
            s.undeclared_forwards,
        ),
    ] {
        if n > 0 {
            println!("{what}: {n}");
        }
    }
}

/// Prints rows under a header, in columns.
pub(super) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |cells: &mut dyn Iterator<Item = &str>| {
        let line: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    };
    print(&mut header.iter().copied());
    for row in rows {
        print(&mut row.iter().map(String::as_str));
    }
}

pub(super) fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Holding;

    fn source(connector: &str, recent: u32, limit: serde_json::Value, unit: u32) -> SourceEntry {
        SourceEntry {
            connector: connector.into(),
            source: "192.0.2.7".into(),
            live: 0,
            cap: None,
            rule: "none".into(),
            holding: Holding::default(),
            rate: RateStanding {
                recent,
                rate_limit: limit,
                rate_wait_s: None,
                connection_rate_time_unit: Some(unit),
            },
        }
    }

    #[test]
    fn the_rate_column_says_recent_of_the_limit_and_its_unit() {
        let limited = source("F", 3, 5.into(), 60);
        let unlimited = source("F", 2, "unlimited".into(), 60);
        assert_eq!(rate_cell(&limited.rate), "3/5");
        assert_eq!(rate_cell(&unlimited.rate), "2/-");
        assert_eq!(rate_cell(&RateStanding::default()), "-");
        assert_eq!(
            rate_legend([&limited, &unlimited]).as_deref(),
            Some("RATE: connections opened in the last 60 s / MaxInboundConnectionRatePerSource")
        );
        let relay = source("Relay", 1, 2.into(), 10);
        assert_eq!(
            rate_legend([&limited, &relay]).as_deref(),
            Some(
                "RATE: connections opened in the connector's time unit (F: 60 s, Relay: 10 s) / MaxInboundConnectionRatePerSource"
            )
        );
        assert_eq!(rate_legend([]), None);
    }

    #[test]
    fn waits_read_in_tenths_never_shorter() {
        for (seconds, shown) in [
            (0.0, "0"),
            (0.001, "0.1"),
            (9.3, "9.3"),
            (9.301, "9.4"),
            (10.0, "10"),
            (64.5, "64.5"),
        ] {
            assert_eq!(tenths_up(seconds), shown, "{seconds}");
        }
    }

    #[test]
    fn a_rate_limit_reads_per_its_unit() {
        assert_eq!(
            rate_limit_words(&30.into(), Some(60)).as_deref(),
            Some("30 per 60 s")
        );
        assert_eq!(
            rate_limit_words(&"unlimited".into(), Some(60)).as_deref(),
            Some("unlimited")
        );
        assert_eq!(rate_limit_words(&serde_json::Value::Null, None), None);
    }
}
