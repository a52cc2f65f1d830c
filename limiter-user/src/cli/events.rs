//! `limiter events`: the recent events, `--since` and `-n` as journalctl
//! reads them, and a follower that ends when the daemon stops.

use anyhow::Context;

use crate::{
    api::{self, Reply, Request},
    events::Event,
};

use super::args::Common;

/// How many of the recent events `limiter events` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lines {
    All,
    Last(usize),
}

pub(super) fn parse_lines(text: &str) -> Result<Lines, String> {
    match text {
        "all" => Ok(Lines::All),
        _ => text
            .parse()
            .map(Lines::Last)
            .map_err(|_| format!("{text:?} is not a number of events or `all`")),
    }
}

/// `--since`: a duration ago, or a time (local unless it says otherwise),
/// as journalctl takes it.
pub(super) fn parse_since(text: &str) -> Result<jiff::Timestamp, String> {
    let ago = text.strip_prefix('-').unwrap_or(text);
    if let Ok(duration) = humantime::parse_duration(ago) {
        let duration = jiff::SignedDuration::try_from(duration).map_err(|e| e.to_string())?;
        return jiff::Timestamp::now()
            .checked_sub(duration)
            .map_err(|e| format!("{text}: {e}"));
    }
    if let Ok(time) = text.parse::<jiff::Timestamp>() {
        return Ok(time);
    }
    let local = |time: jiff::civil::DateTime| {
        time.to_zoned(jiff::tz::TimeZone::system())
            .map(|zoned| zoned.timestamp())
            .map_err(|e| format!("{text}: {e}"))
    };
    if let Ok(time) = text.parse::<jiff::civil::DateTime>() {
        return local(time);
    }
    if let Ok(date) = text.parse::<jiff::civil::Date>() {
        return local(date.to_datetime(jiff::civil::Time::midnight()));
    }
    Err(format!(
        "{text:?} is neither a duration (10m, 1h 30m) nor a time (2026-11-27 23:59, 2026-11-27T23:59:00Z)"
    ))
}

/// Whether `event` happened at or after `since` (one whose time cannot be
/// read is kept).
pub(super) fn since_then(event: &Event, since: Option<jiff::Timestamp>) -> bool {
    match (since, event.time.parse::<jiff::Timestamp>()) {
        (Some(since), Ok(time)) => time >= since,
        _ => true,
    }
}

/// Whether the daemon's end of the connection is gone.
pub(super) fn hung_up(error: &api::ClientError) -> bool {
    match error {
        api::ClientError::Closed { .. } => true,
        api::ClientError::Io { source, .. } => source.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

/// Prints events: one line each, or one JSON object a line.
pub(super) fn events(
    common: &Common,
    follow: bool,
    since: Option<jiff::Timestamp>,
    lines: Option<Lines>,
) -> anyhow::Result<()> {
    // Like `tail -f` and `journalctl -f`: following starts from the last
    // ten, unless asked for more.
    let lines = lines.unwrap_or(match (follow, since) {
        (true, None) => Lines::Last(10),
        _ => Lines::All,
    });
    let print = |event: &Event| {
        if !since_then(event, since) {
            return;
        }
        if common.json {
            println!("{}", serde_json::to_string(event).unwrap_or_default());
        } else {
            println!("{}", event.line());
        }
    };
    let mut replies = api::Replies::open(
        &common.control,
        &Request::Events { follow },
        (!follow).then_some(std::time::Duration::from_secs(30)),
    )?;
    loop {
        let reply = match replies.next_reply() {
            Ok(reply) => reply,
            // A follower is told the end of its stream in words; the
            // daemon closes a follower's connection only when it stops.
            Err(e) if follow && hung_up(&e) => {
                eprintln!("limiter: the daemon stopped (control socket closed)");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match reply {
            Reply::Ok(recent) => {
                let recent: Vec<Event> =
                    serde_json::from_value(recent).context("reading the daemon's reply")?;
                let recent: Vec<&Event> = recent.iter().filter(|e| since_then(e, since)).collect();
                let skip = match lines {
                    Lines::All => 0,
                    Lines::Last(n) => recent.len().saturating_sub(n),
                };
                recent[skip..].iter().copied().for_each(print);
                if !follow {
                    return Ok(());
                }
            }
            Reply::Event(event) => print(&event),
            Reply::Lost(n) => eprintln!("limiter: {n} event(s) lost: this reader was too slow"),
            Reply::Error(message) => anyhow::bail!(message),
        }
        // Flush as events come, also into a pipe.
        std::io::Write::flush(&mut std::io::stdout())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_since_read_like_journalctl() {
        assert_eq!(parse_lines("all"), Ok(Lines::All));
        assert_eq!(parse_lines("0"), Ok(Lines::Last(0)));
        assert!(parse_lines("-3").is_err());
        // Bounded by the clock read before and after, however slow the run.
        let ago = |text: &str| {
            let before = jiff::Timestamp::now();
            let since = parse_since(text).unwrap();
            let after = jiff::Timestamp::now();
            (
                before.duration_since(since).as_secs(),
                after.duration_since(since).as_secs(),
            )
        };
        let (low, high) = ago("10m");
        assert!(low <= 600 && 600 <= high + 1, "{low} {high}");
        let (low, high) = ago("-1h 30m");
        assert!(low <= 5400 && 5400 <= high + 1, "{low} {high}");
        assert_eq!(
            parse_since("2026-11-27T23:59:01Z").unwrap().as_second(),
            1_795_823_941
        );
        assert_eq!(
            parse_since("2026-11-27T23:59:01+01:00")
                .unwrap()
                .as_second(),
            1_795_823_941 - 3600
        );
        // Local time, as journalctl reads it.
        for local in ["2026-11-27 23:59", "2026-11-27T23:59:01", "2026-11-27"] {
            assert!(parse_since(local).is_ok(), "{local}");
        }
        assert!(parse_since("yesterday-ish").is_err());
    }

    #[test]
    fn since_keeps_what_it_cannot_read() {
        let event = |time: &str| Event {
            time: time.into(),
            event_id: 1021,
            connector: "F".into(),
            source: "192.0.2.7".into(),
            configured: 1,
            effective: 1,
            rule: "per_source".into(),
            message: String::new(),
            source_identity: "192.0.2.7".into(),
            local: "192.0.2.1:25".into(),
            live_total: 1,
            live_source: 1,
            action: "drop".into(),
            count: 1,
            late: false,
            repeat: false,
            summary: false,
            period_seconds: None,
        };
        let since = parse_since("2026-11-27T23:59:01Z").ok();
        assert!(since_then(&event("2026-11-27T23:59:01.000Z"), since));
        assert!(!since_then(&event("2026-11-27T23:59:00.999Z"), since));
        assert!(since_then(&event("garbled"), since));
        assert!(since_then(&event("2026-11-27T23:59:00.999Z"), None));
    }
}
