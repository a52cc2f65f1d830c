//! Where the daemon's lines go: the systemd journal with structured fields,
//! a local syslog socket (RFC 5424 or RFC 3164), or a collector over UDP or
//! TCP (RFC 5424; octet-counted framing on TCP, RFC 6587). Events and the
//! daemon's own log lines take the same way (see [`DaemonLog`]).

use std::{
    fmt,
    io::{self, Write},
    net::{TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Mutex,
    time::Duration,
};

use fasyslog::{Facility, SDElement, Severity, format::SyslogContext, sender::SyslogSender};
use log::{Level, Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

/// journald's native socket: where it runs, this exists.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The traditional local syslog socket.
pub const DEV_LOG: &str = "/dev/log";
/// The name the lines carry: SYSLOG_IDENTIFIER, APP-NAME, the RFC 3164 tag.
pub const IDENTIFIER: &str = "limiter";
/// A collector that does not answer holds the daemon up at most this long
/// per line.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where lines go, once `auto` is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// journald's native protocol, with structured fields.
    Journal,
    /// A local syslog socket (datagram, or stream as a fallback).
    Socket(PathBuf),
    /// A collector, `HOST:PORT`.
    Udp(String),
    Tcp(String),
}

/// The syslog wire format for a socket or a collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// RFC 5424: MSGID the event id, the details as structured data.
    #[default]
    Rfc5424,
    /// RFC 3164 (BSD syslog): `limiter[PID]: text`, what most local
    /// syslog daemons expect.
    Rfc3164,
}

/// Where lines go and in which format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub target: Target,
    pub format: Format,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = match self.format {
            Format::Rfc5424 => "RFC 5424",
            Format::Rfc3164 => "RFC 3164",
        };
        match &self.target {
            Target::Journal => write!(f, "the systemd journal"),
            Target::Socket(path) => write!(f, "{} ({format})", path.display()),
            Target::Udp(addr) => write!(f, "udp://{addr} ({format})"),
            Target::Tcp(addr) => write!(f, "tcp://{addr} ({format})"),
        }
    }
}

/// The value of `--syslog`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The journal when journald runs, else /dev/log.
    Auto,
    Off,
    Target(Target),
}

impl FromStr for Setting {
    type Err = String;

    fn from_str(text: &str) -> Result<Setting, String> {
        let collector = |scheme: &str, rest: &str| -> Result<String, String> {
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if port_ok {
                Ok(rest.to_string())
            } else {
                Err(format!("{scheme}://{rest} is not {scheme}://HOST:PORT"))
            }
        };
        Ok(match text {
            "" => return Err("an empty value; use auto, journal, a socket path, udp://HOST:PORT, tcp://HOST:PORT or off".into()),
            "auto" => Setting::Auto,
            "off" => Setting::Off,
            "journal" => Setting::Target(Target::Journal),
            _ => match text.split_once("://") {
                Some(("udp", rest)) => Setting::Target(Target::Udp(collector("udp", rest)?)),
                Some(("tcp", rest)) => Setting::Target(Target::Tcp(collector("tcp", rest)?)),
                Some((scheme, _)) => {
                    return Err(format!(
                        "{scheme}:// is not supported; use udp://HOST:PORT or tcp://HOST:PORT"
                    ));
                }
                None => Setting::Target(Target::Socket(PathBuf::from(text))),
            },
        })
    }
}

impl Setting {
    /// Where lines go (`None`: off). `auto` looks for journald's socket
    /// now. A format makes sense only for syslog. A socket or journal
    /// named outright must exist now: a typo is said at start, not at the
    /// first event.
    pub fn resolve(&self, format: Option<Format>) -> Result<Option<Destination>, String> {
        match self {
            Setting::Target(Target::Socket(path)) => match std::fs::metadata(path) {
                Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {}
                Ok(_) => return Err(format!("--syslog {}: not a socket", path.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(format!(
                        "--syslog {}: no such socket (is the syslog daemon running?)",
                        path.display()
                    ));
                }
                Err(e) => return Err(format!("--syslog {}: {e}", path.display())),
            },
            Setting::Target(Target::Journal) if !Path::new(JOURNAL_SOCKET).exists() => {
                return Err(format!(
                    "--syslog journal: journald does not run here ({JOURNAL_SOCKET} does not exist)"
                ));
            }
            _ => {}
        }
        let target = match self {
            Setting::Off => None,
            Setting::Target(target) => Some(target.clone()),
            Setting::Auto if Path::new(JOURNAL_SOCKET).exists() => Some(Target::Journal),
            Setting::Auto => Some(Target::Socket(PathBuf::from(DEV_LOG))),
        };
        let to_syslog = matches!(
            target,
            Some(Target::Socket(_) | Target::Udp(_) | Target::Tcp(_))
        );
        // With auto, the format is for the case where it finds no journal.
        if format.is_some() && !to_syslog && *self != Setting::Auto {
            return Err(
                "--syslog-format applies to a syslog socket or collector, not to the journal or off"
                    .into(),
            );
        }
        Ok(target.map(|target| Destination {
            target,
            format: format.unwrap_or_default(),
        }))
    }
}

/// One line: an event, or one of the daemon's own.
pub struct Entry<'a> {
    pub level: Level,
    pub facility: Facility,
    /// RFC 5424 MSGID (the event id).
    pub msgid: Option<&'a str>,
    /// The journal's MESSAGE_ID: a 128-bit id, 32 hex digits.
    pub message_id: Option<&'a str>,
    pub message: &'a str,
    /// Structured details: RFC 5424 parameters of [`Entry::sd_id`], and
    /// in the journal `LIMITER_<NAME>` fields.
    pub fields: &'a [(&'a str, String)],
    pub sd_id: &'a str,
}

enum Connection {
    Journal(Box<JournalLog>),
    Syslog(SyslogSender),
    Tcp(TcpStream),
}

/// Writes entries to a [`Destination`]; reconnects when the other end went
/// away (journald or syslogd restarted, the collector closed).
pub struct Writer {
    destination: Destination,
    context: SyslogContext,
    connection: Option<Connection>,
}

impl Writer {
    pub fn new(destination: Destination) -> Writer {
        let mut context = SyslogContext::new();
        context.appname(IDENTIFIER);
        Writer {
            destination,
            context,
            connection: None,
        }
    }

    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The local socket it writes to, if that does not exist (yet): what
    /// `auto` falls back to where neither journald nor a syslog daemon runs.
    pub fn missing_socket(&self) -> Option<&Path> {
        match &self.destination.target {
            Target::Socket(path) if !path.exists() => Some(path),
            _ => None,
        }
    }

    /// Sends one entry; on failure reconnects and tries once more.
    pub fn send(&mut self, entry: &Entry) -> io::Result<()> {
        match self.try_send(entry) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.connection = None;
                self.try_send(entry)
            }
        }
    }

    fn try_send(&mut self, entry: &Entry) -> io::Result<()> {
        if self.connection.is_none() {
            self.connection = Some(self.connect()?);
        }
        let formatted = match self.destination.target {
            Target::Journal => None,
            _ => Some(self.format(entry)),
        };
        match (self.connection.as_mut(), formatted) {
            (Some(Connection::Journal(journal)), _) => journal_send(journal, entry),
            (Some(Connection::Syslog(sender)), Some(line)) => {
                sender.send_formatted(line.as_bytes())?;
                sender.flush()
            }
            (Some(Connection::Tcp(stream)), Some(line)) => {
                // RFC 6587 octet counting: the frame's length, a space, the
                // message; safe whatever the message holds.
                stream.write_all(format!("{} {line}", line.len()).as_bytes())
            }
            _ => Err(io::Error::other("not connected")),
        }
    }

    fn connect(&self) -> io::Result<Connection> {
        Ok(match &self.destination.target {
            Target::Journal => Connection::Journal(Box::new(
                JournalLog::empty()?.with_syslog_identifier(IDENTIFIER.to_string()),
            )),
            Target::Socket(path) => Connection::Syslog(fasyslog::sender::unix(path)?),
            Target::Udp(addr) => {
                let remote = resolve(addr)?;
                let local = if remote.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                Connection::Syslog(SyslogSender::Udp(fasyslog::sender::udp(local, remote)?))
            }
            Target::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(&resolve(addr)?, NETWORK_TIMEOUT)?;
                stream.set_write_timeout(Some(NETWORK_TIMEOUT))?;
                Connection::Tcp(stream)
            }
        })
    }

    /// The syslog line for `entry`.
    pub fn format(&self, entry: &Entry) -> String {
        let mut context = self.context.clone();
        context.facility(entry.facility);
        let severity = severity(entry.level);
        match (self.destination.format, &self.destination.target) {
            (Format::Rfc5424, _) => {
                // The names are ours and valid (checked by the tests); the
                // values are escaped by fasyslog.
                let element = SDElement::new(entry.sd_id).and_then(|mut element| {
                    for (name, value) in entry.fields {
                        element.add_param(*name, value.clone())?;
                    }
                    Ok(element)
                });
                let elements = match element {
                    Ok(element) if !entry.fields.is_empty() => vec![element],
                    _ => Vec::new(),
                };
                context
                    .format_rfc5424(severity, entry.msgid, elements, Some(entry.message))
                    .to_string()
            }
            // On a local socket, RFC 3164 is what syslog(3) sends: no
            // hostname, which the local daemon adds (fasyslog always writes
            // one, which journald and rsyslog's imuxsock would take for the
            // tag).
            (Format::Rfc3164, Target::Socket(_)) => format!(
                "<{}>{} {IDENTIFIER}[{}]: {}",
                (entry.facility.code() << 3) | severity.code(),
                jiff::Zoned::now().strftime("%b %e %T"),
                std::process::id(),
                entry.message
            ),
            (Format::Rfc3164, _) => context
                .format_rfc3164(severity, Some(entry.message))
                .to_string(),
        }
    }
}

fn resolve(addr: &str) -> io::Result<std::net::SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{addr} resolves to no address")))
}

/// The syslog severity of a log level, as systemd-journal-logger maps it
/// for the journal (info is notice), so that both say the same.
fn severity(level: Level) -> Severity {
    match level {
        Level::Error => Severity::ERROR,
        Level::Warn => Severity::WARNING,
        Level::Info => Severity::NOTICE,
        Level::Debug => Severity::INFORMATIONAL,
        Level::Trace => Severity::DEBUG,
    }
}

/// The journal field for a structured detail: `LIMITER_<NAME>`.
pub fn journal_field(name: &str) -> String {
    format!("{IDENTIFIER}_{name}").to_ascii_uppercase()
}

fn journal_send(journal: &JournalLog, entry: &Entry) -> io::Result<()> {
    let facility = entry.facility.code().to_string();
    let mut fields: Vec<(String, &str)> = vec![("SYSLOG_FACILITY".into(), facility.as_str())];
    if let Some(id) = entry.message_id {
        fields.push(("MESSAGE_ID".into(), id));
    }
    for (name, value) in entry.fields {
        fields.push((journal_field(name), value.as_str()));
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    journal.journal_send(
        &Record::builder()
            .level(entry.level)
            .target(IDENTIFIER)
            .args(format_args!("{}", entry.message))
            .key_values(&fields)
            .build(),
    )
}

/// The daemon's own log: its lines (start, warnings) go to the destination
/// its events take (facility daemon), and to stderr unless stderr already
/// is the journal (under systemd) and they go there anyway.
pub struct DaemonLog {
    stderr: Option<env_logger::Logger>,
    filter: env_logger::Logger,
    writer: Option<Mutex<Writer>>,
}

impl DaemonLog {
    /// Installs it as the global logger; the level comes from RUST_LOG
    /// (default info), as for the other commands.
    pub fn install(destination: Option<Destination>) -> Result<(), log::SetLoggerError> {
        let build = || {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .format_target(false)
                .build()
        };
        let journal_is_stderr = systemd_journal_logger::connected_to_journal();
        let to_journal = destination
            .as_ref()
            .is_some_and(|d| d.target == Target::Journal);
        let filter = build();
        log::set_max_level(filter.filter());
        log::set_boxed_logger(Box::new(DaemonLog {
            stderr: (!(to_journal && journal_is_stderr)).then(build),
            filter,
            writer: destination.map(|d| Mutex::new(Writer::new(d))),
        }))
    }
}

impl Log for DaemonLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        if let Some(stderr) = &self.stderr {
            stderr.log(record);
        }
        if let Some(writer) = &self.writer {
            let message = record.args().to_string();
            let entry = Entry {
                level: record.level(),
                facility: Facility::DAEMON,
                msgid: None,
                message_id: None,
                message: &message,
                fields: &[],
                sd_id: "",
            };
            // A log line that cannot be written is lost: there is nowhere
            // else to say so but stderr, which has it already.
            if let Ok(mut writer) = writer.lock() {
                let _ = writer.send(&entry);
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        let target = |t: Target| Ok(Setting::Target(t));
        assert_eq!("auto".parse(), Ok(Setting::Auto));
        assert_eq!("off".parse(), Ok(Setting::Off));
        assert_eq!("journal".parse(), target(Target::Journal));
        assert_eq!(
            "/dev/log".parse(),
            target(Target::Socket("/dev/log".into()))
        );
        assert_eq!(
            "udp://10.0.0.5:514".parse(),
            target(Target::Udp("10.0.0.5:514".into()))
        );
        assert_eq!(
            "tcp://[2001:db8::5]:6514".parse(),
            target(Target::Tcp("[2001:db8::5]:6514".into()))
        );
        assert_eq!(
            "tcp://logs.example:601".parse(),
            target(Target::Tcp("logs.example:601".into()))
        );
        for bad in [
            "udp://10.0.0.5",
            "tcp://:514",
            "tcp://h:99999",
            "tls://h:6514",
            "",
        ] {
            assert!(bad.parse::<Setting>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_format_is_for_syslog_only_and_a_named_socket_must_exist() {
        let journal = Setting::Target(Target::Journal);
        assert!(journal.resolve(Some(Format::Rfc3164)).is_err());
        assert!(Setting::Off.resolve(Some(Format::Rfc5424)).is_err());
        assert_eq!(Setting::Off.resolve(None), Ok(None));
        let dir = std::env::temp_dir().join(format!("limiter-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.sock");
        let _ = std::fs::remove_file(&path);
        let _bound = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let socket = Setting::Target(Target::Socket(path.clone()));
        assert_eq!(
            socket.resolve(Some(Format::Rfc3164)),
            Ok(Some(Destination {
                target: Target::Socket(path.clone()),
                format: Format::Rfc3164
            }))
        );
        // Named outright, it must be there, and be a socket.
        let missing = Setting::Target(Target::Socket(dir.join("missing.sock")));
        let said = missing.resolve(None).unwrap_err();
        assert!(said.contains("missing.sock: no such socket"), "{said}");
        let plain = dir.join("plain");
        std::fs::write(&plain, "").unwrap();
        let said = Setting::Target(Target::Socket(plain))
            .resolve(None)
            .unwrap_err();
        assert!(said.ends_with("plain: not a socket"), "{said}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn auto_takes_the_journal_only_where_journald_runs() {
        let expected = if Path::new(JOURNAL_SOCKET).exists() {
            Target::Journal
        } else {
            Target::Socket(DEV_LOG.into())
        };
        let resolved = Setting::Auto.resolve(None).unwrap().unwrap();
        assert_eq!(resolved.target, expected);
    }

    fn entry<'a>(fields: &'a [(&'a str, String)]) -> Entry<'a> {
        Entry {
            level: Level::Warn,
            facility: Facility::MAIL,
            msgid: Some("1021"),
            message_id: Some("d5f9771a94124104b64b28621d78327a"),
            message: "Receive connector \"F\" rejected an incoming connection.",
            fields,
            sd_id: "limiter@32473",
        }
    }

    #[test]
    fn lines_in_each_format() {
        let fields = [("connector", "F \"x\"".to_string())];
        let writer = |target, format| Writer::new(Destination { target, format });
        let socket = || Target::Socket("/dev/log".into());
        let line = writer(socket(), Format::Rfc5424).format(&entry(&fields));
        // <mail.warning> = 2 * 8 + 4.
        assert!(line.starts_with("<20>1 "), "{line}");
        assert!(
            line.contains(&format!(
                " limiter {} 1021 [limiter@32473 connector=\"F \\\"x\\\"\"] Receive connector",
                std::process::id()
            )),
            "{line}"
        );
        let line = writer(socket(), Format::Rfc3164).format(&entry(&fields));
        // "<20>Nov 27 23:59:01 limiter[PID]: ...": no hostname on a local
        // socket.
        let tag = format!(" limiter[{}]: Receive connector", std::process::id());
        assert!(line.starts_with("<20>"), "{line}");
        assert!(
            line["<20>Nov 27 23:59:01".len()..].starts_with(&tag),
            "{line}"
        );
        // Own lines: no MSGID, no structured data, facility daemon.
        let own = Entry {
            level: Level::Info,
            facility: Facility::DAEMON,
            msgid: None,
            message_id: None,
            message: "started",
            fields: &[],
            sd_id: "",
        };
        let line = writer(Target::Udp("127.0.0.1:514".into()), Format::Rfc5424).format(&own);
        // <daemon.notice> = 3 * 8 + 5.
        assert!(line.starts_with("<29>1 "), "{line}");
        assert!(
            line.ends_with(&format!(" limiter {} - - started", std::process::id())),
            "{line}"
        );
    }
}
