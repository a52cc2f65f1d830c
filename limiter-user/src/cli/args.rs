//! The command line's shape: every subcommand and option (clap derive),
//! from which the man pages and completions are made too.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    api::DEFAULT_CONTROL_PATH,
    config::edit::ConnectorChanges,
    daemon::{DEFAULT_BPFFS_PATH, RunOptions},
    kernel::XdpModeRequest,
    logging,
};

#[derive(Parser)]
#[command(
    name = "limiter",
    version,
    about = "Exchange's receive-connector connection limits for Linux mail servers, enforced in XDP"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Attach to the interfaces and enforce the connectors' limits.
    Run(RunArgs),
    /// Connectors, interfaces and live totals of the running daemon (or,
    /// without one, what it left attached).
    Status {
        /// Where a daemon pins its maps and links (to tell whether programs
        /// are still attached when no daemon answers).
        #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
        bpffs: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Show or change the receive connectors (like Get-/Set-ReceiveConnector).
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// Which sources hold how many connections (or opened some lately), the
    /// cap each would meet now and its connection rate, largest first.
    Sources {
        /// Only this connector's sources.
        #[arg(long)]
        connector: Option<String>,
        /// Only the N largest.
        #[arg(long, value_name = "N")]
        top: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Which connector takes a connection from IP, and which limit binds now.
    Explain {
        /// The remote address.
        ip: String,
        /// The local IP:PORT it connects to (default: the first binding,
        /// port 25 first, whose connector takes IP).
        #[arg(long, value_name = "IP:PORT")]
        local: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Counters of admitted and rejected connections.
    Stats(Common),
    /// Read the config file again and apply it, as SIGHUP and `systemctl
    /// reload` do: for the next SYN, established connections untouched. A
    /// file that does not pass changes nothing (one line, exit 1).
    Reload(Common),
    /// Remove what a stopped daemon left attached (with --keep-attached, or
    /// killed): its programs, links and pinned maps.
    Detach {
        /// Where the daemon pinned them.
        #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
        bpffs: PathBuf,
        /// The daemon's control socket (to refuse while it runs).
        #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
        control: PathBuf,
    },
    /// The recent 1009 / 1021 events (61021: the connection rate); with
    /// --follow, new ones as they come.
    Events {
        /// Keep printing new events until interrupted, after the last 10
        /// recent ones (unless --lines or --since says otherwise). Ends
        /// with exit status 0 when the daemon stops.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the events since then: a duration ago (`10m`, `1h 30m`) or
        /// a time (`2026-11-27 23:59`, local time; RFC 3339 with `Z` or an
        /// offset).
        #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
        since: Option<jiff::Timestamp>,
        /// Of the recent events, only the last N (`all`: every one the
        /// daemon keeps); 0 with --follow prints only new ones [default:
        /// all, or 10 with --follow without --since].
        #[arg(short = 'n', long, value_name = "N|all", value_parser = parse_lines)]
        lines: Option<Lines>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub(super) enum ConnectorCommand {
    /// Every connector.
    List(Common),
    /// One connector.
    Show {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Add a connector; it takes effect for the next SYN and is written to
    /// the config file.
    New {
        name: String,
        #[command(flatten)]
        changes: ConnectorChanges,
        #[command(flatten)]
        common: Common,
    },
    /// Change a connector; established connections are never touched.
    Set {
        name: String,
        #[command(flatten)]
        changes: ConnectorChanges,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a connector; its established connections stay up.
    Remove {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Options of every command that talks to the daemon.
#[derive(clap::Args)]
pub(super) struct Common {
    /// The daemon's control socket.
    #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
    pub(super) control: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    /// Ask this server instead of the local daemon (repeatable; an ssh
    /// config alias works): runs `limiter ... --json` there through `ssh`
    /// (or `$LIMITER_SSH`), all servers at once, and prints one table with
    /// a SERVER column. Exits 1 unless every server answered.
    #[arg(long = "server", value_name = "HOST")]
    pub(super) servers: Vec<String>,
    /// Ask the servers named in PATH, one a line (`#` comments), besides
    /// any --server.
    #[arg(long, value_name = "PATH")]
    pub(super) servers_file: Option<PathBuf>,
    /// How long to wait for each server (with --server), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub(super) server_timeout: u64,
}

impl Command {
    /// The options of a command that talks to a daemon.
    pub(super) fn common(&self) -> Option<&Common> {
        match self {
            Command::Status { common, .. }
            | Command::Sources { common, .. }
            | Command::Explain { common, .. }
            | Command::Stats(common)
            | Command::Reload(common)
            | Command::Events { common, .. }
            | Command::Connector(ConnectorCommand::List(common))
            | Command::Connector(ConnectorCommand::Show { common, .. })
            | Command::Connector(ConnectorCommand::New { common, .. })
            | Command::Connector(ConnectorCommand::Set { common, .. })
            | Command::Connector(ConnectorCommand::Remove { common, .. }) => Some(common),
            Command::Run(_) | Command::Detach { .. } => None,
        }
    }
}

#[derive(clap::Args)]
pub(super) struct RunArgs {
    /// Network interface to enforce on (repeatable).
    #[arg(long = "iface", required = true)]
    pub(super) ifaces: Vec<String>,
    /// Connector configuration (default /etc/limiter/connectors.toml; when
    /// that does not exist, the built-in "Default Frontend" connector).
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// The cgroup v2 directory whose sockets are tracked (default: the root
    /// of the cgroup v2 mount).
    #[arg(long)]
    pub(super) cgroup: Option<PathBuf>,
    /// Where the maps are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
    pub(super) bpffs: PathBuf,
    /// The control socket.
    #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
    pub(super) control: PathBuf,
    /// A group whose members may use the control socket (default: root only).
    #[arg(long, value_name = "GROUP")]
    pub(super) control_group: Option<String>,
    /// XDP attach mode: native with fallback to generic, or one of them.
    #[arg(long, value_enum, default_value_t = XdpModeRequest::Auto)]
    pub(super) xdp_mode: XdpModeRequest,
    /// Where events (facility mail) and the daemon's own log lines go:
    /// `auto` (the systemd journal, with structured fields, when journald
    /// runs, else /dev/log), `journal`, a syslog socket path,
    /// `udp://HOST:PORT` or `tcp://HOST:PORT` (a collector), or `off`.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|journal|PATH|udp://HOST:PORT|tcp://HOST:PORT|off"
    )]
    pub(super) syslog: logging::Setting,
    /// The syslog format for a socket or collector [default: rfc5424].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub(super) syslog_format: Option<logging::Format>,
    /// Repeats of one (connector, source, rule) are written as one summary
    /// line per this period.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub(super) event_period: humantime::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(super) metrics: Option<std::net::SocketAddr>,
    /// At exit, leave the programs attached and pinned with their counts,
    /// so that the next `limiter run` takes over without a gap (what the
    /// systemd unit uses).
    #[arg(long)]
    pub(super) keep_attached: bool,
    /// Entries of each of the source, handshake and established tables (a
    /// daemon that adopts pinned tables keeps their size).
    #[arg(long, default_value_t = limiter_common::maps::DEFAULT_TABLE_ENTRIES, value_name = "N")]
    pub(super) table_entries: u32,
    /// Rare kernel-side conditions (an unreadable SYN dropped, a table
    /// full, a handshake judged over a cap, a state thought impossible)
    /// told in the daemon's log from this level up, at most once a second
    /// each per CPU. Off: the verifier drops the kernel programs' logging
    /// and counting code.
    #[arg(long, value_enum, default_value_t = KernelLogLevel::Off, value_name = "LEVEL")]
    pub(super) kernel_log_level: KernelLogLevel,
    /// Start even when the config has no connectors (enforcing nothing
    /// until `limiter connector new` adds one), and let `limiter connector
    /// remove` remove the last one. Without it, both are refused: an empty
    /// file is more often a mistake than a wish.
    #[arg(long)]
    pub(super) allow_empty: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum KernelLogLevel {
    Off,
    Error,
    Warn,
    Info,
}

impl KernelLogLevel {
    /// aya-log's level number (0: off).
    pub(super) fn raw(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Error => aya_log::Level::Error as u8,
            KernelLogLevel::Warn => aya_log::Level::Warn as u8,
            KernelLogLevel::Info => aya_log::Level::Info as u8,
        }
    }
}

impl TryFrom<RunArgs> for RunOptions {
    type Error = anyhow::Error;

    /// The options as the daemon takes them (`--syslog` resolved).
    fn try_from(args: RunArgs) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            syslog: args
                .syslog
                .resolve(args.syslog_format)
                .map_err(anyhow::Error::msg)?,
            ifaces: args.ifaces,
            config: args.config,
            cgroup: args.cgroup,
            bpffs: args.bpffs,
            control: args.control,
            control_group: args.control_group,
            xdp_mode: args.xdp_mode,
            event_period: args.event_period.into(),
            metrics: args.metrics,
            keep_attached: args.keep_attached,
            table_entries: args.table_entries,
            kernel_log_level: args.kernel_log_level.raw(),
            allow_empty: args.allow_empty,
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::{super::events::since_then, *};
    use crate::events::Event;

    #[test]
    fn the_rate_flags_are_connector_changes() {
        let parsed = Cli::try_parse_from([
            "limiter",
            "connector",
            "set",
            "Default Frontend",
            "--max-inbound-connection-rate-per-source",
            "unlimited",
            "--connection-rate-time-unit",
            "10",
        ])
        .unwrap();
        let Command::Connector(ConnectorCommand::Set { name, changes, .. }) = parsed.command else {
            panic!("not connector set");
        };
        assert_eq!(name, "Default Frontend");
        assert_eq!(
            changes,
            ConnectorChanges {
                max_inbound_connection_rate_per_source: Some("unlimited".into()),
                connection_rate_time_unit: Some("10".into()),
                ..ConnectorChanges::default()
            }
        );
        assert_eq!(changes.check(), Ok(()));
        let parsed = Cli::try_parse_from([
            "limiter",
            "connector",
            "new",
            "Relay",
            "--bindings",
            "0.0.0.0:587",
            "--max-inbound-connection-rate-per-source",
            "30",
        ])
        .unwrap();
        let Command::Connector(ConnectorCommand::New { changes, .. }) = parsed.command else {
            panic!("not connector new");
        };
        assert_eq!(
            changes.max_inbound_connection_rate_per_source.as_deref(),
            Some("30")
        );
        assert_eq!(changes.connection_rate_time_unit, None);
        // Values are judged by check(), which names the flag.
        let parsed = Cli::try_parse_from([
            "limiter",
            "connector",
            "set",
            "F",
            "--connection-rate-time-unit",
            "1h",
        ])
        .unwrap();
        let Command::Connector(ConnectorCommand::Set { changes, .. }) = parsed.command else {
            panic!("not connector set");
        };
        assert_eq!(
            changes.check(),
            Err(
                "--connection-rate-time-unit \"1h\" is not a number of seconds (6 to 3600)"
                    .to_string()
            )
        );
    }

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
            recent: 0,
            time_unit: None,
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
