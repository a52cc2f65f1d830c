//! The command line of `limiter`: the daemon (`limiter run`) and the
//! commands that question it.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    control::{self, DEFAULT_CONTROL_PATH, Request, Status},
    daemon::{self, DEFAULT_BPFFS_PATH, RunOptions},
    kernel::XdpModeRequest,
};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Connectors, interfaces and live totals of the running daemon.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long, env = "LIMITER_CONTROL", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
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
    #[command(flatten)]
    control: ControlArgs,
    /// XDP attach mode: native with fallback to generic, or one of them.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
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

/// Parses the command line, runs the command, and prints an error as one
/// line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
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

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let options = RunOptions {
                ifaces: args.ifaces,
                config: args.config,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                control: args.control.control,
                xdp_mode: args.xdp_mode.into(),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(daemon::run(options))
        }
        Command::Status { control, json } => {
            let value = control::request(&control.control, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let status: Status = serde_json::from_value(value)?;
                print_status(&status);
            }
            Ok(())
        }
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
    println!(
        "live: {} ({} established, {} in handshake)",
        s.live_total, s.established, s.handshakes
    );
    println!();
    let rows: Vec<Vec<String>> = s
        .connectors
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.bindings.join(","),
                c.remote_ip_ranges.join(","),
                format!(
                    "{} / {} / {}%",
                    plain(&c.max_inbound_connection),
                    plain(&c.max_inbound_connection_per_source),
                    c.max_inbound_connection_percentage_per_source
                ),
                c.action.clone(),
                c.live.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "CONNECTOR",
            "BINDINGS",
            "REMOTE RANGES",
            "LIMITS (TOTAL / SOURCE / %)",
            "ACTION",
            "LIVE",
        ],
        &rows,
    );
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
