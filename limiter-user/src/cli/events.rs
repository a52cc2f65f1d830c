//! `limiter events`: the recent events, `--since` and `-n` as journalctl
//! reads them, and a follower that ends when the daemon stops.

use anyhow::Context;

use crate::{
    api::{self, Reply, Request},
    events::Event,
};

use super::args::{Common, Lines};

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
