//! The command line of `limiter`: the daemon (`limiter run`) and the
//! commands that question and configure it.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use limiter_common::Rule;
use serde::de::DeserializeOwned;

use crate::{
    control::{self, ConnectorStatus, DEFAULT_CONTROL_PATH, Reloaded, Reply, Request, Status},
    daemon::{self, DEFAULT_BPFFS_PATH, RunOptions},
    edit::ConnectorChanges,
    events::Event,
    fleet::{self, Failure, Fleet},
    kernel::XdpModeRequest,
    logging::{self, DaemonLog},
    report::{Answer, Explanation, SourceEntry, StatsReport, verdict},
};

#[derive(Parser)]
#[command(
    name = "limiter",
    version,
    about = "Exchange's receive-connector connection limits for Linux mail servers, enforced in XDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Which sources hold how many connections, and the cap each would meet
    /// now, largest first.
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
    /// The recent 1009 / 1021 events; with --follow, new ones as they come.
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
enum ConnectorCommand {
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
        settings: Settings,
        #[command(flatten)]
        common: Common,
    },
    /// Change a connector; established connections are never touched.
    Set {
        name: String,
        #[command(flatten)]
        settings: Settings,
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

/// What `connector new|set` may change, spelled as in Exchange.
#[derive(clap::Args)]
struct Settings {
    /// Local IP:PORT bindings, comma-separated (0.0.0.0:25, [::]:25 for any
    /// local address).
    #[arg(long, value_delimiter = ',', value_name = "B[,B...]")]
    bindings: Option<Vec<String>>,
    /// Where connections to the bindings end up after NAT (REDIRECT to
    /// another port, DNAT into a container): the server's own IP:PORT,
    /// comma-separated; an empty value removes them.
    #[arg(long, value_delimiter = ',', value_name = "IP:PORT[,...]")]
    forwarded_to: Option<Vec<String>>,
    /// Remote ranges, comma-separated: addresses, CIDR blocks, first-last.
    #[arg(long, value_delimiter = ',', value_name = "R[,R...]")]
    remote_ip_ranges: Option<Vec<String>>,
    /// 1 to 2147483647, or unlimited.
    #[arg(long, value_name = "N|unlimited")]
    max_inbound_connection: Option<String>,
    /// 1 to 10000, or unlimited.
    #[arg(long, value_name = "N|unlimited")]
    max_inbound_connection_per_source: Option<String>,
    /// 1 to 100 (100 turns the rule off).
    #[arg(long, value_name = "1..100")]
    max_inbound_connection_percentage_per_source: Option<String>,
    /// drop, reset, monitor or reply.
    #[arg(long)]
    action: Option<String>,
    /// With action reply: the line the sender gets ("421 ...").
    #[arg(long, value_name = "TEXT")]
    reply_text: Option<String>,
}

impl From<Settings> for ConnectorChanges {
    fn from(s: Settings) -> Self {
        ConnectorChanges {
            bindings: s.bindings,
            forwarded_to: s
                .forwarded_to
                .map(|list| list.into_iter().filter(|e| !e.is_empty()).collect()),
            remote_ip_ranges: s.remote_ip_ranges,
            max_inbound_connection: s.max_inbound_connection,
            max_inbound_connection_per_source: s.max_inbound_connection_per_source,
            max_inbound_connection_percentage_per_source: s
                .max_inbound_connection_percentage_per_source,
            action: s.action,
            reply_text: s.reply_text,
        }
    }
}

/// Options of every command that talks to the daemon.
#[derive(clap::Args)]
struct Common {
    /// The daemon's control socket.
    #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Ask this server instead of the local daemon (repeatable; an ssh
    /// config alias works): runs `limiter ... --json` there through `ssh`
    /// (or `$LIMITER_SSH`), all servers at once, and prints one table with
    /// a SERVER column. Exits 1 unless every server answered.
    #[arg(long = "server", value_name = "HOST")]
    servers: Vec<String>,
    /// Ask the servers named in PATH, one a line (`#` comments), besides
    /// any --server.
    #[arg(long, value_name = "PATH")]
    servers_file: Option<PathBuf>,
    /// How long to wait for each server (with --server), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    server_timeout: u64,
}

impl Command {
    /// The options of a command that talks to a daemon.
    fn common(&self) -> Option<&Common> {
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
struct RunArgs {
    /// Network interface to enforce on (repeatable).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// Connector configuration (default /etc/limiter/connectors.toml; when
    /// that does not exist, the built-in "Default Frontend" connector).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The cgroup v2 directory whose sockets are tracked (default: the root
    /// of the cgroup v2 mount).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where the maps are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
    bpffs: PathBuf,
    /// The control socket.
    #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    /// A group whose members may use the control socket (default: root only).
    #[arg(long, value_name = "GROUP")]
    control_group: Option<String>,
    /// XDP attach mode: native with fallback to generic, or one of them.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Where events (facility mail) and the daemon's own log lines go:
    /// `auto` (the systemd journal, with structured fields, when journald
    /// runs, else /dev/log), `journal`, a syslog socket path,
    /// `udp://HOST:PORT` or `tcp://HOST:PORT` (a collector), or `off`.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|journal|PATH|udp://HOST:PORT|tcp://HOST:PORT|off"
    )]
    syslog: logging::Setting,
    /// The syslog format for a socket or collector [default: rfc5424].
    #[arg(long, value_enum, value_name = "FORMAT")]
    syslog_format: Option<logging::Format>,
    /// Repeats of one (connector, source, rule) are written as one summary
    /// line per this period.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    event_period: humantime::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// At exit, leave the programs attached and pinned with their counts,
    /// so that the next `limiter run` takes over without a gap (what the
    /// systemd unit uses).
    #[arg(long)]
    keep_attached: bool,
    /// Entries of each of the source, handshake and established tables (a
    /// daemon that adopts pinned tables keeps their size).
    #[arg(long, default_value_t = limiter_common::maps::DEFAULT_TABLE_ENTRIES, value_name = "N")]
    table_entries: u32,
    /// Rare kernel-side conditions (an unreadable SYN dropped, a table
    /// full, a handshake judged over a cap, a state thought impossible)
    /// told in the daemon's log from this level up, at most once a second
    /// each per CPU. Off: the verifier drops the kernel programs' logging
    /// and counting code.
    #[arg(long, value_enum, default_value_t = KernelLogLevel::Off, value_name = "LEVEL")]
    kernel_log_level: KernelLogLevel,
    /// Start even when the config has no connectors (enforcing nothing
    /// until `limiter connector new` adds one), and let `limiter connector
    /// remove` remove the last one. Without it, both are refused: an empty
    /// file is more often a mistake than a wish.
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelLogLevel {
    Off,
    Error,
    Warn,
    Info,
}

impl KernelLogLevel {
    /// aya-log's level number (0: off).
    fn raw(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Error => aya_log::Level::Error as u8,
            KernelLogLevel::Warn => aya_log::Level::Warn as u8,
            KernelLogLevel::Info => aya_log::Level::Info as u8,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Auto,
    Driver,
    Skb,
}

impl From<XdpModeArg> for XdpModeRequest {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Auto => XdpModeRequest::Auto,
            XdpModeArg::Driver => XdpModeRequest::Driver,
            XdpModeArg::Skb => XdpModeRequest::Skb,
        }
    }
}

/// The command line's definition: what the binary parses, and what its man
/// pages and shell completions are made from (see [`crate::docs`]).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line, runs the command, and prints an error as one
/// line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `limiter run` installs a logger that also takes its --syslog way
    // (see `dispatch`).
    if !matches!(cli.command, Command::Run(_)) {
        // A command whose reader went away (`limiter events | head -1`)
        // ends quietly of SIGPIPE, as cat does, instead of panicking in
        // println!. Never the daemon: it must not die of a closed socket.
        // Its own socket writes use MSG_NOSIGNAL (see `control`).
        // SAFETY: no other thread runs yet, and SIG_DFL is a valid action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format_target(false)
            .init();
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a user can act on: the error and its causes.
            eprintln!("limiter: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text.replace('\n', " ")
}

/// Whether `error` is that nothing answers on the control socket.
fn connect_failed(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<control::ClientError>(),
        Some(control::ClientError::Connect { .. })
    )
}

/// Sends `request`; prints the reply as JSON, or as `T` through `show`.
fn ask<T: DeserializeOwned>(
    common: &Common,
    request: Request,
    show: impl FnOnce(T),
) -> anyhow::Result<()> {
    let value = control::request(&common.control, &request)?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let typed: T = serde_json::from_value(value).context("reading the daemon's reply")?;
        show(typed);
    }
    Ok(())
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    if let Some(common) = command.common()
        && let Some(fleet) = Fleet::new(
            &common.servers,
            common.servers_file.as_deref(),
            std::time::Duration::from_secs(common.server_timeout),
        )?
    {
        return fan_out(&command, &fleet, common.json);
    }
    match command {
        Command::Run(args) => {
            let syslog = args
                .syslog
                .resolve(args.syslog_format)
                .map_err(anyhow::Error::msg)?;
            DaemonLog::install(syslog.clone()).context("installing the logger")?;
            let options = RunOptions {
                ifaces: args.ifaces,
                config: args.config,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                control: args.control,
                control_group: args.control_group,
                xdp_mode: args.xdp_mode.into(),
                syslog,
                event_period: args.event_period.into(),
                metrics: args.metrics,
                keep_attached: args.keep_attached,
                table_entries: args.table_entries,
                kernel_log_level: args.kernel_log_level.raw(),
                allow_empty: args.allow_empty,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(daemon::run(options))
        }
        Command::Status { bpffs, common } => {
            ask(&common, Request::Status, |s: Status| print_status(&s)).map_err(|e| {
                match (connect_failed(&e), crate::pins::PinDir::open(&bpffs)) {
                    (true, Ok(pins)) if pins.has_maps() => anyhow::anyhow!(
                        "no limiter daemon answers on {}, but its programs are still attached and enforcing the last config from {} ({}): `limiter run` takes them over, `limiter detach --bpffs {}` removes them",
                        common.control.display(),
                        pins.dir().display(),
                        pins.describe(),
                        bpffs.display()
                    ),
                    _ => e,
                }
            })
        }
        Command::Connector(ConnectorCommand::List(common)) => ask(
            &common,
            Request::ConnectorList,
            |list: Vec<ConnectorStatus>| print_connectors(&list),
        ),
        Command::Connector(ConnectorCommand::Show { name, common }) => ask(
            &common,
            Request::ConnectorShow { name },
            |c: ConnectorStatus| print_connector(&c),
        ),
        Command::Connector(ConnectorCommand::New {
            name,
            settings,
            common,
        }) => ask(
            &common,
            Request::ConnectorNew {
                name,
                changes: settings.into(),
            },
            |c: ConnectorStatus| print_connector(&c),
        ),
        Command::Connector(ConnectorCommand::Set {
            name,
            settings,
            common,
        }) => ask(
            &common,
            Request::ConnectorSet {
                name,
                changes: settings.into(),
            },
            |c: ConnectorStatus| print_connector(&c),
        ),
        Command::Connector(ConnectorCommand::Remove { name, common }) => ask(
            &common,
            Request::ConnectorRemove { name },
            |v: serde_json::Value| {
                println!("removed connector \"{}\"", plain(&v["removed"]));
            },
        ),
        Command::Sources {
            connector,
            top,
            common,
        } => ask(
            &common,
            Request::Sources { connector, top },
            |sources: Vec<SourceEntry>| print_sources(&sources),
        ),
        Command::Explain { ip, local, common } => {
            ask(&common, Request::Explain { ip, local }, |e: Explanation| {
                print_explanation(&e)
            })
        }
        Command::Stats(common) => ask(&common, Request::Stats, |s: StatsReport| print_stats(&s)),
        Command::Reload(common) => ask(&common, Request::Reload, |r: Reloaded| {
            println!("{}", r.describe())
        }),
        Command::Events {
            follow,
            since,
            lines,
            common,
        } => events(&common, follow, since, lines),
        Command::Detach { bpffs, control } => {
            if let Ok(value) = control::request(&control, &Request::Status) {
                anyhow::bail!(
                    "a limiter daemon (pid {}) is running on {}: stop it first (it detaches when it stops, unless it runs with --keep-attached, as the systemd unit does: then run `limiter detach` after it stopped)",
                    value["pid"],
                    control.display()
                );
            }
            let removed = crate::pins::remove_all(&bpffs)?;
            if removed.is_empty() {
                println!("nothing attached under {}", bpffs.display());
            }
            for dir in removed {
                println!("detached and removed {}", dir.display());
            }
            Ok(())
        }
    }
}

/// How many of the recent events `limiter events` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lines {
    All,
    Last(usize),
}

fn parse_lines(text: &str) -> Result<Lines, String> {
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
fn parse_since(text: &str) -> Result<jiff::Timestamp, String> {
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
fn since_then(event: &Event, since: Option<jiff::Timestamp>) -> bool {
    match (since, event.time.parse::<jiff::Timestamp>()) {
        (Some(since), Ok(time)) => time >= since,
        _ => true,
    }
}

/// Whether the daemon's end of the connection is gone.
fn hung_up(error: &control::ClientError) -> bool {
    match error {
        control::ClientError::Closed { .. } => true,
        control::ClientError::Io { source, .. } => {
            source.kind() == std::io::ErrorKind::ConnectionReset
        }
        _ => false,
    }
}

/// Prints events: one line each, or one JSON object a line.
fn events(
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
    let mut replies = control::Replies::open(
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

/// Runs `command` on every server of `fleet` and prints their answers
/// together: one table with a SERVER column where the command prints a
/// table, else one block a server; with `json`, one list whose entries
/// carry a `server` field (`error` for a server that did not answer).
/// Fails (exit 1) unless every server answered.
fn fan_out(command: &Command, fleet: &Fleet, json: bool) -> anyhow::Result<()> {
    let args = fleet::remote_args(
        std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned()),
    );
    let events = matches!(command, Command::Events { .. });
    let answers = if let Command::Events { follow: true, .. } = command {
        let print = |server: &str, line: &str| {
            if let Ok(event) = serde_json::from_str::<Event>(line) {
                print_server_event(server, &event, json);
            }
        };
        fleet.stream(&args, &print)
    } else {
        fleet.ask(&args)
    };
    let mut answered: Vec<(String, serde_json::Value)> = Vec::new();
    let mut failed: Vec<(String, Failure)> = Vec::new();
    for answer in answers {
        let value = answer.outcome.and_then(|out| {
            // `events --json` prints an object a line; the others one value.
            let mut values = serde_json::Deserializer::from_str(&out)
                .into_iter::<serde_json::Value>()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::unknown(format!("its answer is not limiter's JSON: {e}")))?;
            Ok(if events || values.len() != 1 {
                serde_json::Value::Array(values)
            } else {
                values.remove(0)
            })
        });
        match value {
            Ok(value) => answered.push((answer.server, value)),
            Err(e) => failed.push((answer.server, e)),
        }
    }
    let changes = matches!(
        command,
        Command::Reload(_)
            | Command::Connector(
                ConnectorCommand::New { .. }
                    | ConnectorCommand::Set { .. }
                    | ConnectorCommand::Remove { .. }
            )
    );
    if json {
        print_fleet_json(&answered, &failed, events)?;
    } else if changes {
        print_fleet_changes(fleet, &answered, &failed);
    } else {
        print_fleet_text(command, &answered)?;
    }
    if failed.is_empty() {
        return Ok(());
    }
    let following = matches!(command, Command::Events { follow: true, .. });
    if !changes && !json && !following {
        for (server, failure) in &failed {
            eprintln!("limiter: {server}: {}", failure.message);
        }
    }
    let names: Vec<&str> = failed.iter().map(|(s, _)| s.as_str()).collect();
    anyhow::bail!(
        "{} of {} servers failed: {}",
        failed.len(),
        fleet.hosts().len(),
        names.join(", ")
    )
}

fn with_server(server: &str, value: &serde_json::Value) -> serde_json::Value {
    let mut entry = serde_json::Map::new();
    entry.insert("server".into(), server.into());
    match value {
        serde_json::Value::Object(fields) => {
            entry.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())))
        }
        other => {
            entry.insert("result".into(), other.clone());
        }
    }
    serde_json::Value::Object(entry)
}

/// One list: each server's entries (or its one object) with `server`; a
/// server that did not answer as `{"server", "error"}`. Events stay one
/// object a line.
fn print_fleet_json(
    answered: &[(String, serde_json::Value)],
    failed: &[(String, Failure)],
    events: bool,
) -> anyhow::Result<()> {
    let mut list: Vec<serde_json::Value> = Vec::new();
    for (server, value) in answered {
        match value {
            serde_json::Value::Array(entries) => {
                list.extend(entries.iter().map(|e| with_server(server, e)))
            }
            one => list.push(with_server(server, one)),
        }
    }
    list.extend(failed.iter().map(|(server, failure)| {
        serde_json::json!({
            "server": server,
            "error": failure.message,
            "refused": failure.refused,
        })
    }));
    if events {
        for entry in &list {
            println!("{}", serde_json::to_string(entry)?);
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&list)?);
    }
    Ok(())
}

/// A change on several servers: whether it took, server by server.
fn print_fleet_changes(
    fleet: &Fleet,
    answered: &[(String, serde_json::Value)],
    failed: &[(String, Failure)],
) {
    let rows: Vec<Vec<String>> = fleet
        .hosts()
        .iter()
        .map(|host| {
            let result = match (
                answered.iter().find(|(s, _)| s == host),
                failed.iter().find(|(s, _)| s == host),
            ) {
                (Some((_, value)), _) => change_words(value),
                (None, Some((_, failure))) if failure.refused => {
                    format!("FAILED, nothing changed there: {}", failure.message)
                }
                (None, Some((_, failure))) => {
                    format!("FAILED, whether it took is unknown: {}", failure.message)
                }
                (None, None) => "FAILED: no answer".to_string(),
            };
            vec![host.clone(), result]
        })
        .collect();
    print_table(&["SERVER", "RESULT"], &rows);
}

/// What a server said a change did.
fn change_words(value: &serde_json::Value) -> String {
    if let Ok(c) = serde_json::from_value::<ConnectorStatus>(value.clone()) {
        return format!(
            "changed: \"{}\" {} {}, live {}",
            c.name,
            limits(&c),
            c.action,
            c.live
        );
    }
    if let Ok(reloaded) = serde_json::from_value::<Reloaded>(value.clone()) {
        return reloaded.describe();
    }
    format!("removed \"{}\"", plain(&value["removed"]))
}

/// Tables get a SERVER column; other answers one block a server.
fn print_fleet_text(
    command: &Command,
    answered: &[(String, serde_json::Value)],
) -> anyhow::Result<()> {
    if answered.is_empty() {
        return Ok(());
    }
    fn typed<T: DeserializeOwned>(value: &serde_json::Value) -> anyhow::Result<T> {
        serde_json::from_value(value.clone()).context("reading a server's answer")
    }
    let prefixed = |header: &[&str], rows: Vec<Vec<String>>| {
        let mut full = vec!["SERVER"];
        full.extend_from_slice(header);
        print_table(&full, &rows);
    };
    match command {
        Command::Sources { .. } => {
            let mut rows = Vec::new();
            for (server, value) in answered {
                for entry in typed::<Vec<SourceEntry>>(value)? {
                    let mut row = vec![server.clone()];
                    row.extend(source_row(&entry));
                    rows.push(row);
                }
            }
            prefixed(&SOURCES_HEADER, rows);
        }
        Command::Connector(ConnectorCommand::List(_)) => {
            let mut rows = Vec::new();
            for (server, value) in answered {
                for entry in typed::<Vec<ConnectorStatus>>(value)? {
                    let mut row = vec![server.clone()];
                    row.extend(connector_row(&entry));
                    rows.push(row);
                }
            }
            prefixed(&CONNECTORS_HEADER, rows);
        }
        Command::Events { .. } => {
            let mut all: Vec<(String, Event)> = Vec::new();
            for (server, value) in answered {
                all.extend(
                    typed::<Vec<Event>>(value)?
                        .into_iter()
                        .map(|e| (server.clone(), e)),
                );
            }
            all.sort_by(|a, b| a.1.time.cmp(&b.1.time));
            for (server, event) in &all {
                print_server_event(server, event, false);
            }
        }
        _ => {
            for (i, (server, value)) in answered.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                println!("{:<42}: {server}", "Server");
                match command {
                    Command::Status { .. } => print_status(&typed(value)?),
                    Command::Connector(ConnectorCommand::Show { .. }) => {
                        print_connector(&typed(value)?)
                    }
                    Command::Explain { .. } => print_explanation(&typed(value)?),
                    Command::Stats(_) => print_stats(&typed(value)?),
                    _ => println!("{}", serde_json::to_string_pretty(value)?),
                }
            }
        }
    }
    Ok(())
}

fn print_server_event(server: &str, event: &Event, json: bool) {
    if json {
        if let Ok(value) = serde_json::to_value(event) {
            println!("{}", with_server(server, &value));
        }
    } else {
        println!("{server}  {}", event.line());
    }
}

fn print_status(s: &Status) {
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

fn limits(c: &ConnectorStatus) -> String {
    format!(
        "{} / {} / {}%",
        plain(&c.max_inbound_connection),
        plain(&c.max_inbound_connection_per_source),
        c.max_inbound_connection_percentage_per_source
    )
}

const CONNECTORS_HEADER: [&str; 6] = [
    "CONNECTOR",
    "BINDINGS",
    "REMOTE RANGES",
    "LIMITS (MaxInboundConnection / PerSource / Percentage)",
    "ACTION",
    "LIVE",
];

fn connector_row(c: &ConnectorStatus) -> Vec<String> {
    vec![
        c.name.clone(),
        c.bindings.join(","),
        c.remote_ip_ranges.join(","),
        limits(c),
        c.action.clone(),
        c.live.to_string(),
    ]
}

fn print_connectors(list: &[ConnectorStatus]) {
    let rows: Vec<Vec<String>> = list.iter().map(connector_row).collect();
    print_table(&CONNECTORS_HEADER, &rows);
}

fn print_connector(c: &ConnectorStatus) {
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
    println!("Action                                    : {}", c.action);
    if let Some(text) = &c.reply_text {
        println!("ReplyText                                 : {text}");
    }
    println!("LiveConnections                           : {}", c.live);
}

const SOURCES_HEADER: [&str; 6] = [
    "CONNECTOR",
    "SOURCE",
    "LIVE",
    "CAN OPEN",
    "HOLDS AT MOST",
    "STOPPED BY",
];

fn source_row(s: &SourceEntry) -> Vec<String> {
    // A daemon of an older version does not say (a fleet mid-upgrade).
    let unsaid = s.stopped_by.is_empty();
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
        or_unsaid(s.can_open),
        or_unsaid(s.holds_at_most),
        if unsaid {
            "-".to_string()
        } else {
            limit_name(&s.stopped_by).to_string()
        },
    ]
}

fn print_sources(sources: &[SourceEntry]) {
    let rows: Vec<Vec<String>> = sources.iter().map(source_row).collect();
    print_table(&SOURCES_HEADER, &rows);
}

fn or_unlimited(n: Option<u32>) -> String {
    n.map_or("unlimited".to_string(), |n| n.to_string())
}

fn print_explanation(e: &Explanation) {
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
fn print_answer(ip: &str, source: &str, a: &Answer) {
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
    println!(
        "limits: MaxInboundConnection {}, MaxInboundConnectionPerSource {}, MaxInboundConnectionPercentagePerSource {pct}",
        show(&a.max_inbound_connection),
        show(&a.max_inbound_connection_per_source),
    );
    let counted_as = if source == ip {
        "this source".to_string()
    } else {
        format!("this source, counted as {source}")
    };
    println!(
        "live: {} on the connector, {} from {ip} ({counted_as})",
        a.live_total, a.live_source
    );
    let event = a.event_id.unwrap_or_default();
    let rule = limit_name(&a.rule);
    let cap = cap_words(a, pct);
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
        _ if a.cap.is_none() => println!("a new connection now: admitted; no limit applies"),
        _ => println!("a new connection now: admitted; its cap: {cap} ({rule})"),
    }
    let monitor = a.action.as_deref() == Some("monitor");
    match a.holds_at_most {
        // A daemon of an older version does not say.
        _ if a.stopped_by.is_empty() => {}
        None => println!("this source: no limit stops it"),
        Some(held) if monitor => println!(
            "this source could hold {held}, {} more now, before {} (action monitor: it is only reported)",
            a.can_open.unwrap_or_default(),
            limit_name(&a.stopped_by)
        ),
        Some(held) => println!(
            "this source can hold {held}, {} more now; then {} stops it",
            a.can_open.unwrap_or_default(),
            limit_name(&a.stopped_by)
        ),
    }
}

/// The cap the next connection meets, as its limit works it out.
fn cap_words(a: &Answer, pct: u32) -> String {
    let cap = a.cap.unwrap_or_default();
    match a.rule.as_str() {
        "percentage" => format!("{pct} % of the remaining: {cap}"),
        "total" => format!("what the total leaves it: {cap}"),
        _ => format!("{cap} per source"),
    }
}

/// A limit's name for people: Exchange's (JSON keeps the config file's).
fn limit_name(rule: &str) -> &'static str {
    match Rule::from_name(rule) {
        Some(rule) => rule.exchange_name(),
        None if rule == "table_full" => "a full kernel table",
        None => "no limit",
    }
}

fn print_stats(s: &StatsReport) {
    let mut blocks: Vec<(&str, &crate::report::Counters)> = s
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
        let lines: [(&str, u64, bool); 14] = [
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
fn print_table(header: &[&str], rows: &[Vec<String>]) {
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

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
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
