//! Rejection events: Exchange's 1009 / 1021 lines (and limiter's own
//! 61021 for the connection rate), folded like Exchange's periodic logging, written to the journal or syslog (see
//! [`crate::logging`]) and streamed to `limiter events` followers.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use limiter_common::{
    Limits, Rule,
    admission::{RATE_EVENT_ID, percentage_cap},
    maps::RejectionEvent,
    maps::action,
};
use serde::{Deserialize, Serialize};

use crate::{config::LimitValue, query::show_source, selection::from_addr};

mod fold;
mod hub;
mod sink;

pub use self::{
    fold::Folder,
    hub::EventHub,
    sink::{SyslogSink, syslog_line},
};

/// The structured-data id of limiter's syslog parameters (32473 is the
/// private enterprise number RFC 5612 sets aside for examples and
/// documentation).
pub const SD_ID: &str = "limiter@32473";
/// The journal's MESSAGE_ID of event 1009 (`journalctl MESSAGE_ID=...`):
/// fixed 128-bit ids, made once with `journalctl --new-id128`'s recipe.
pub const MESSAGE_ID_1009: &str = "2c6fcf6927d84099a90dafd0ad35b394";
/// The journal's MESSAGE_ID of event 1021.
pub const MESSAGE_ID_1021: &str = "d5f9771a94124104b64b28621d78327a";
/// The journal's MESSAGE_ID of event 61021 (the connection rate).
pub const MESSAGE_ID_61021: &str = "8fccc67b88d745ca964c99d5ace6903b";
/// Default period over which repeats are folded into one line.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(60);

/// One line of the event log: a rejection, or a summary of repeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    /// 1009 (total), 1021 (per source, percentage) or 61021 (rate,
    /// limiter's own).
    pub event_id: u32,
    pub connector: String,
    /// The remote address, as Exchange prints it.
    pub source: String,
    /// The configured value of the limit that fired (the percentage for the
    /// percentage rule).
    pub configured: u32,
    /// The cap the connection met: the limit, or for the percentage rule
    /// ceil((max - T) * pct / 100).
    pub effective: u32,
    /// "total", "per_source", "percentage" or "rate".
    pub rule: String,
    /// Exchange's text.
    pub message: String,
    /// What the source is counted as (an IPv6 /64, say).
    pub source_identity: String,
    /// The local address and port it tried.
    pub local: String,
    /// Live connections on the connector and from the source, before it.
    pub live_total: u32,
    pub live_source: u32,
    /// The connections the source opened in its rate window before it (in
    /// the last `connection_rate_time_unit`, to a slot).
    #[serde(default)]
    pub recent: u32,
    /// A rejection by the rate: the `connection_rate_time_unit` its limit
    /// counts in, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_unit: Option<u32>,
    /// "drop", "reset" or "reply" (refused), or "monitor" (admitted,
    /// reported only).
    pub action: String,
    /// How many rejections this line stands for: 1, or more when the
    /// kernel folded a source's repeats within a second into one report
    /// (see `limiter_common::maps::ReportGate`), or the repeats a summary
    /// folds. Over the reports (`summary` false) they add up to the
    /// kernel's rejected count.
    pub count: u64,
    /// The connection was reset when its handshake completed over a cap
    /// (its SYN had passed), not refused at its SYN.
    #[serde(default)]
    pub late: bool,
    /// Every rejection it stands for repeats one reported before: SYNs of
    /// a flood that the kernel refused from its refusal cache, reported
    /// when the daemon's sweep took their count. Never written at once:
    /// folded into its period's summary.
    #[serde(default)]
    pub repeat: bool,
    /// Whether this line sums up repeats over `period_seconds`: syslog's
    /// and the journal's summary lines. `limiter events` streams the
    /// reports only (an older daemon streamed summaries too).
    pub summary: bool,
    pub period_seconds: Option<u64>,
}

/// Exchange's message for a rejection by `rule` (for the rate, limiter's
/// own in its style; the source had opened `recent` connections in the
/// window); with action monitor (`monitor`), said as what would have
/// happened, since the connection was admitted.
pub fn exchange_message(
    rule: Rule,
    connector: &str,
    remote: IpAddr,
    limits: &Limits,
    recent: u32,
    monitor: bool,
) -> String {
    let rejected = if monitor {
        "would have rejected (action monitor: admitted)"
    } else {
        "rejected"
    };
    match rule {
        Rule::Total => format!(
            "Receive connector \"{connector}\" {rejected} an incoming connection. The maximum number of connections ({}) for this connector has been reached.",
            LimitValue::display(limits.max_inbound_connection)
        ),
        Rule::Rate => format!(
            "Receive connector \"{connector}\" {rejected} an incoming connection from IP address {remote}. The source opened {recent} connection{} in the last {} seconds, its limit of {} ({}).",
            plural(u64::from(recent)),
            limits.connection_rate_time_unit,
            LimitValue::display(limits.max_inbound_connection_rate_per_source),
            Rule::Rate.exchange_name()
        ),
        _ => format!(
            "Receive connector \"{connector}\" {rejected} an incoming connection from IP address {remote}. The maximum number of connections per source ({}) for this connector has been reached by this source IP address.",
            LimitValue::display(limits.max_inbound_connection_per_source)
        ),
    }
}

impl Event {
    /// The event for a kernel report; `connector` is its name now.
    pub fn from_kernel(
        raw: &RejectionEvent,
        connector: &str,
        ipv6_prefix_length: u8,
        time: SystemTime,
    ) -> Event {
        let rule = Rule::from_raw(raw.rule).unwrap_or(Rule::PerSource);
        let limits = raw.limits;
        let (configured, effective) = match rule {
            Rule::Total => (limits.max_inbound_connection, limits.max_inbound_connection),
            Rule::Percentage => (
                limits.max_inbound_connection_percentage_per_source,
                percentage_cap(&limits, raw.live_total),
            ),
            Rule::PerSource | Rule::None => (
                limits.max_inbound_connection_per_source,
                limits.max_inbound_connection_per_source,
            ),
            Rule::Rate => (
                limits.max_inbound_connection_rate_per_source,
                limits.max_inbound_connection_rate_per_source,
            ),
        };
        let remote = from_addr(&raw.remote);
        Event {
            time: humantime::format_rfc3339_millis(time).to_string(),
            event_id: rule.event_id(),
            connector: connector.to_string(),
            source: remote.to_string(),
            configured,
            effective,
            rule: rule.name().to_string(),
            message: exchange_message(
                rule,
                connector,
                remote,
                &limits,
                raw.recent,
                raw.action == action::MONITOR,
            ),
            source_identity: show_source(&raw.source, ipv6_prefix_length),
            local: SocketAddr::new(from_addr(&raw.local), raw.local_port).to_string(),
            live_total: raw.live_total,
            live_source: raw.live_source,
            recent: raw.recent,
            time_unit: (rule == Rule::Rate).then_some(limits.connection_rate_time_unit),
            action: match raw.action {
                action::MONITOR => "monitor",
                action::RESET => "reset",
                action::REPLY => "reply",
                _ => "drop",
            }
            .to_string(),
            count: u64::from(raw.folded) + 1,
            late: raw.late != 0,
            repeat: raw.repeat != 0,
            summary: false,
            period_seconds: None,
        }
    }

    /// The details syslog and the journal carry besides the text: RFC 5424
    /// parameters, and `LIMITER_<NAME>` fields in the journal.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("event_id", self.event_id.to_string()),
            ("connector", self.connector.clone()),
            ("source", self.source.clone()),
            ("source_identity", self.source_identity.clone()),
            ("local", self.local.clone()),
            ("rule", self.rule.clone()),
            ("configured", self.configured.to_string()),
            ("effective", self.effective.to_string()),
            ("live_total", self.live_total.to_string()),
            ("live_source", self.live_source.to_string()),
            ("recent", self.recent.to_string()),
            ("action", self.action.clone()),
            ("count", self.count.to_string()),
            ("late", self.late.to_string()),
        ];
        if let Some(unit) = self.time_unit {
            fields.push(("time_unit", unit.to_string()));
        }
        if let Some(period) = self.period_seconds {
            fields.push(("period_seconds", period.to_string()));
        }
        fields
    }

    /// The text of its syslog or journal line: Exchange's, and for a
    /// summary how often it repeated.
    pub fn log_message(&self) -> String {
        let mut message = self.message.clone();
        if self.summary {
            let seconds = self.period_seconds.unwrap_or_default();
            message.push_str(&format!(
                " Repeated {} in the last {seconds} second{}.",
                times(self.count),
                plural(seconds)
            ));
        }
        message
    }

    /// The journal's MESSAGE_ID for its event id.
    pub fn message_id(&self) -> &'static str {
        match self.event_id {
            1009 => MESSAGE_ID_1009,
            RATE_EVENT_ID => MESSAGE_ID_61021,
            _ => MESSAGE_ID_1021,
        }
    }

    /// The line for people, with how many rejections it stands for.
    pub fn line(&self) -> String {
        // A daemon no longer streams summaries, but an older one may.
        let repeats = if self.summary {
            format!(
                " (repeated {} in the last {}s)",
                times(self.count),
                self.period_seconds.unwrap_or_default()
            )
        } else if self.action == "monitor" {
            format!(" ({} connection{})", self.count, plural(self.count))
        } else {
            format!(" ({} refusal{})", self.count, plural(self.count))
        };
        let monitor = if self.action == "monitor" {
            " [monitor: admitted]"
        } else if self.late {
            " [late: reset when its handshake completed]"
        } else {
            ""
        };
        // The rate's cap is per time unit, not on what is held.
        let per_unit = self
            .time_unit
            .map(|unit| format!(" per {unit} s"))
            .unwrap_or_default();
        format!(
            "{} {} {}{repeats} [{} cap {}{per_unit}, live {} on the connector, {} from the source]{monitor}",
            self.time,
            self.event_id,
            self.message,
            Rule::from_name(&self.rule)
                .map_or(self.rule.clone(), |r| r.exchange_name().to_string()),
            self.effective,
            self.live_total,
            self.live_source
        )
    }
}

/// "once", "7 times".
fn times(count: u64) -> String {
    match count {
        1 => "once".to_string(),
        n => format!("{n} times"),
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use limiter_common::{addr, maps::action};

    use super::*;
    use crate::logging::Destination;
    use std::time::Instant;

    fn raw(rule: Rule, remote: &str, live_total: u32, live_source: u32) -> RejectionEvent {
        let remote: IpAddr = remote.parse().unwrap();
        let remote = crate::selection::to_addr(remote);
        RejectionEvent {
            time_ns: 0,
            connector: 0,
            rule: rule as u32,
            action: action::DROP,
            live_total,
            live_source,
            cap: 0,
            limits: Limits::EXCHANGE_DEFAULT,
            local_port: 25,
            remote_port: 40000,
            source: addr::source_identity(&remote, 64),
            remote,
            local: addr::from_ipv4([192, 0, 2, 1]),
            folded: 0,
            gate: limiter_common::maps::gate::SOURCE,
            late: 0,
            repeat: 0,
            recent: 0,
            _pad: 0,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn messages_are_exchanges() {
        let e = Event::from_kernel(
            &raw(Rule::PerSource, "192.0.2.7", 100, 20),
            "Default Frontend",
            64,
            at(0),
        );
        assert_eq!(
            e.message,
            "Receive connector \"Default Frontend\" rejected an incoming connection from IP address 192.0.2.7. The maximum number of connections per source (20) for this connector has been reached by this source IP address."
        );
        assert_eq!((e.event_id, e.configured, e.effective), (1021, 20, 20));
        let e = Event::from_kernel(
            &raw(Rule::Total, "192.0.2.7", 5000, 3),
            "Default Frontend",
            64,
            at(0),
        );
        assert_eq!(
            e.message,
            "Receive connector \"Default Frontend\" rejected an incoming connection. The maximum number of connections (5000) for this connector has been reached."
        );
        assert_eq!((e.event_id, e.configured, e.effective), (1009, 5000, 5000));
        // Action monitor admitted it: the text says what would have been.
        let mut monitored = raw(Rule::PerSource, "192.0.2.7", 100, 20);
        monitored.action = action::MONITOR;
        let e = Event::from_kernel(&monitored, "Default Frontend", 64, at(0));
        assert_eq!(
            e.message,
            "Receive connector \"Default Frontend\" would have rejected (action monitor: admitted) an incoming connection from IP address 192.0.2.7. The maximum number of connections per source (20) for this connector has been reached by this source IP address."
        );
        assert_eq!(e.action, "monitor");
        // The percentage rule: 1021 with the per-source value in the text,
        // the percentage and the cap it worked out to in the fields.
        let e = Event::from_kernel(
            &raw(Rule::Percentage, "2001:db8:1:2::9", 2000, 60),
            "F",
            64,
            at(0),
        );
        assert_eq!((e.event_id, e.configured, e.effective), (1021, 2, 60));
        assert!(
            e.message.contains("from IP address 2001:db8:1:2::9.")
                && e.message.contains("per source (20)")
        );
        assert_eq!(e.source_identity, "2001:db8:1:2::/64");
        assert_eq!(e.time, "2027-01-15T08:00:00.000Z");
    }

    /// A rejection by the rate: 5 a minute, the source had opened 5.
    fn rate_report(action: u32) -> RejectionEvent {
        let mut rated = raw(Rule::Rate, "192.0.2.7", 3, 1);
        rated.limits.max_inbound_connection_rate_per_source = 5;
        rated.recent = 5;
        rated.action = action;
        rated
    }

    #[test]
    fn a_rejection_by_the_rate_is_event_61021() {
        let e = Event::from_kernel(&rate_report(action::DROP), "Default Frontend", 64, at(0));
        assert_eq!(
            e.message,
            "Receive connector \"Default Frontend\" rejected an incoming connection from IP address 192.0.2.7. The source opened 5 connections in the last 60 seconds, its limit of 5 (MaxInboundConnectionRatePerSource)."
        );
        assert_eq!(
            (e.event_id, e.rule.as_str(), e.configured, e.effective),
            (61021, "rate", 5, 5)
        );
        assert_eq!((e.recent, e.time_unit), (5, Some(60)));
        assert_eq!(e.message_id(), MESSAGE_ID_61021);
        assert_eq!(
            e.line(),
            "2027-01-15T08:00:00.000Z 61021 Receive connector \"Default Frontend\" rejected an incoming connection from IP address 192.0.2.7. The source opened 5 connections in the last 60 seconds, its limit of 5 (MaxInboundConnectionRatePerSource). (1 refusal) [MaxInboundConnectionRatePerSource cap 5 per 60 s, live 3 on the connector, 1 from the source]"
        );
        let json = serde_json::to_value(&e).unwrap();
        for (key, value) in [
            ("event_id", serde_json::json!(61021)),
            ("rule", "rate".into()),
            ("configured", 5.into()),
            ("effective", 5.into()),
            ("recent", 5.into()),
            ("time_unit", 60.into()),
        ] {
            assert_eq!(json[key], value, "{key} in {json}");
        }
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), e);
        let fields = e.fields();
        for field in [("recent", "5"), ("time_unit", "60"), ("event_id", "61021")] {
            assert!(
                fields.iter().any(|(k, v)| (*k, v.as_str()) == field),
                "{field:?} in {fields:?}"
            );
        }
        let line = syslog_line(
            &e,
            Destination {
                target: crate::logging::Target::Socket("/dev/log".into()),
                format: crate::logging::Format::Rfc5424,
            },
        );
        assert!(
            line.contains(&format!(
                " limiter {} 61021 [limiter@32473 event_id=\"61021\" ",
                std::process::id()
            )) && line.contains("recent=\"5\"")
                && line.contains("time_unit=\"60\""),
            "{line}"
        );
        // One connection, and action monitor.
        let mut one = rate_report(action::MONITOR);
        one.limits.max_inbound_connection_rate_per_source = 1;
        one.recent = 1;
        let e = Event::from_kernel(&one, "F", 64, at(0));
        assert!(
            e.message.starts_with(
                "Receive connector \"F\" would have rejected (action monitor: admitted) an incoming connection from IP address 192.0.2.7. The source opened 1 connection in the last 60 seconds, its limit of 1 ("
            ),
            "{}",
            e.message
        );
    }

    #[test]
    fn other_events_carry_recent_but_no_time_unit() {
        let mut report = raw(Rule::PerSource, "192.0.2.7", 100, 20);
        report.recent = 7;
        let e = Event::from_kernel(&report, "F", 64, at(0));
        assert_eq!((e.recent, e.time_unit), (7, None));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["recent"], 7);
        assert!(json.get("time_unit").is_none(), "{json}");
        assert!(!e.line().contains("cap 20 per"), "{}", e.line());
        assert_eq!(e.message_id(), MESSAGE_ID_1021);
        // An older daemon's event, without them.
        let mut old = json;
        old.as_object_mut().unwrap().remove("recent");
        assert_eq!(serde_json::from_value::<Event>(old).unwrap().recent, 0);
    }

    #[test]
    fn the_syslog_line_carries_msgid_and_structured_data() {
        let e = Event::from_kernel(
            &raw(Rule::PerSource, "192.0.2.7", 100, 20),
            "Relay \"A\"",
            64,
            at(0),
        );
        let line = syslog_line(
            &e,
            Destination {
                target: crate::logging::Target::Socket("/dev/log".into()),
                format: crate::logging::Format::Rfc5424,
            },
        );
        // <mail.warning> = 2 * 8 + 4.
        assert!(line.starts_with("<20>1 "), "{line}");
        assert!(
            line.contains(&format!(
                " limiter {} 1021 [limiter@32473 event_id=\"1021\" ",
                std::process::id()
            )),
            "{line}"
        );
        assert!(line.contains("connector=\"Relay \\\"A\\\"\""), "{line}");
        assert!(
            line.contains("effective=\"20\"") && line.contains("rule=\"per_source\""),
            "{line}"
        );
        assert!(line.ends_with("by this source IP address."), "{line}");
        assert_eq!(e.message_id(), MESSAGE_ID_1021);
        let mut summary = e.clone();
        (summary.summary, summary.count, summary.period_seconds) = (true, 7, Some(60));
        assert!(
            summary
                .log_message()
                .ends_with("address. Repeated 7 times in the last 60 seconds."),
            "{}",
            summary.log_message()
        );
    }

    #[test]
    fn texts_say_how_many_in_plain_words() {
        let mut e = Event::from_kernel(&raw(Rule::PerSource, "192.0.2.7", 100, 20), "F", 64, at(0));
        assert!(
            e.line()
                .contains("reached by this source IP address. (1 refusal) [")
        );
        e.count = 42;
        assert!(e.line().contains(" (42 refusals) ["), "{}", e.line());
        e.action = "monitor".into();
        assert!(e.line().contains(" (42 connections) ["), "{}", e.line());
        let mut summary = e.clone();
        (summary.summary, summary.count, summary.period_seconds) = (true, 1, Some(1));
        assert!(
            summary
                .log_message()
                .ends_with("address. Repeated once in the last 1 second."),
            "{}",
            summary.log_message()
        );
        assert!(summary.line().contains(" (repeated once in the last 1s) "));
        summary.count = 2;
        assert!(
            summary
                .line()
                .contains(" (repeated 2 times in the last 1s) ")
        );
    }

    #[test]
    fn repeats_fold_into_one_line_per_period() {
        let period = Duration::from_secs(60);
        let mut folder = Folder::new(period);
        let t0 = Instant::now();
        let event =
            |source: &str| Event::from_kernel(&raw(Rule::PerSource, source, 1, 20), "F", 64, at(0));
        assert!(folder.offer(event("192.0.2.7"), t0).is_some());
        for i in 1..=500 {
            assert!(
                folder
                    .offer(event("192.0.2.7"), t0 + Duration::from_millis(i))
                    .is_none()
            );
        }
        // Another source is another key.
        assert!(folder.offer(event("192.0.2.8"), t0).is_some());
        assert!(folder.tick(t0 + Duration::from_secs(59)).is_empty());
        let summaries = folder.tick(t0 + period);
        assert_eq!(summaries.len(), 1);
        assert_eq!((summaries[0].count, summaries[0].summary), (500, true));
        assert_eq!(summaries[0].source, "192.0.2.7");
        // Still going: counted into the next period.
        assert!(
            folder
                .offer(event("192.0.2.7"), t0 + Duration::from_secs(61))
                .is_none()
        );
        let next = folder.tick(t0 + period * 2);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].count, 1);
        // A quiet period ends the key: the next one is written at once.
        assert!(folder.tick(t0 + period * 3).is_empty());
        assert!(folder.offer(event("192.0.2.7"), t0 + period * 3).is_some());
    }

    #[test]
    fn a_kernel_report_stands_for_what_it_folded() {
        let mut folded = raw(Rule::PerSource, "192.0.2.7", 1, 20);
        folded.folded = 41;
        let event = Event::from_kernel(&folded, "F", 64, at(0));
        assert_eq!((event.count, event.summary), (42, false));
        // Written at once when it opens its key; summed when it does not.
        let period = Duration::from_secs(60);
        let mut folder = Folder::new(period);
        let t0 = Instant::now();
        assert!(folder.offer(event.clone(), t0).is_some());
        assert!(folder.offer(event, t0 + Duration::from_secs(1)).is_none());
        let summaries = folder.tick(t0 + period);
        assert_eq!(summaries[0].count, 42);
    }

    #[test]
    fn repeats_taken_from_a_refusal_cache_go_into_a_summary() {
        let mut held = raw(Rule::PerSource, "192.0.2.8", 1, 20);
        held.folded = 4;
        held.repeat = 1;
        let event = Event::from_kernel(&held, "F", 64, at(0));
        assert_eq!((event.count, event.repeat), (5, true));
        let period = Duration::from_secs(2);
        let mut folder = Folder::new(period);
        let t0 = Instant::now();
        // Its key's window has closed: never a line of its own at once.
        assert!(folder.offer(event.clone(), t0).is_none());
        assert!(folder.tick(t0 + Duration::from_secs(1)).is_empty());
        let summaries = folder.tick(t0 + period);
        assert_eq!(summaries.len(), 1);
        assert_eq!(
            (
                summaries[0].count,
                summaries[0].summary,
                summaries[0].period_seconds
            ),
            (5, true, Some(2))
        );
    }
}
