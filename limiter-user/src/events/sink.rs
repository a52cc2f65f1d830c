//! Where events are written: the journal with its fields, or syslog
//! (RFC 5424 or 3164) to a socket or a collector.

use fasyslog::Facility;

use crate::logging::{Destination, Entry, Writer};

use super::*;

/// Events to the journal or syslog: facility mail, severity warning,
/// MSGID (RFC 5424) the event id, MESSAGE_ID (journal) the event's.
pub struct SyslogSink {
    writer: Writer,
    /// Lines that could not be written.
    pub errors: u64,
    /// Its socket was missing at start, which was said then: failures are
    /// not said again until a line gets through.
    said_missing: bool,
}

impl SyslogSink {
    pub fn new(destination: Destination) -> SyslogSink {
        let writer = Writer::new(destination);
        let destination = writer.destination();
        let said_missing = match writer.missing_socket() {
            Some(path) => {
                log::warn!(
                    "{} does not exist (no journald and no syslog daemon?): events reach only `limiter events`, and the daemon's own lines only stderr, until a syslog daemon makes it",
                    path.display()
                );
                true
            }
            None => {
                log::info!("events and log lines go to {destination}");
                false
            }
        };
        SyslogSink {
            writer,
            errors: 0,
            said_missing,
        }
    }

    /// Writes one event; reconnects once if the other end went away.
    pub fn write(&mut self, event: &Event) {
        let message = event.log_message();
        let fields = event.fields();
        let msgid = event.event_id.to_string();
        let result = self.writer.send(&entry(event, &msgid, &message, &fields));
        if result.is_ok() {
            self.said_missing = false;
        }
        if let Err(e) = result {
            self.errors += 1;
            // The first failure, then one in a thousand: a missing syslogd
            // must not flood the daemon's own log.
            if self.errors % 1000 == 1 && !self.said_missing {
                log::warn!(
                    "events to {}: {e} ({} line(s) lost so far)",
                    self.writer.destination(),
                    self.errors
                );
            }
        }
    }
}

pub(super) fn entry<'a>(
    event: &Event,
    msgid: &'a str,
    message: &'a str,
    fields: &'a [(&'a str, String)],
) -> Entry<'a> {
    Entry {
        level: log::Level::Warn,
        facility: Facility::MAIL,
        msgid: Some(msgid),
        message_id: Some(event.message_id()),
        message,
        fields,
        sd_id: SD_ID,
    }
}

/// Formats one event's syslog line without sending it, for tests of the
/// wire format.
pub fn syslog_line(event: &Event, destination: Destination) -> String {
    let message = event.log_message();
    let fields = event.fields();
    let msgid = event.event_id.to_string();
    Writer::new(destination).format(&entry(event, &msgid, &message, &fields))
}
