//! The command line of `limiter`: the daemon (`limiter run`) and the
//! commands that question and configure it.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use serde::de::DeserializeOwned;

use crate::{
    api::{self, ConnectorStatus, Reloaded, Request, Status},
    daemon::{self, RunOptions},
    fleet::Fleet,
    logging::DaemonLog,
    query::{Explanation, SourceEntry, StatsReport},
};

mod args;
mod events;
mod fanout;
mod print;

use self::{
    args::{Cli, Command, Common, ConnectorCommand},
    events::events,
    fanout::fan_out,
    print::{
        plain, print_connector, print_connectors, print_explanation, print_sources, print_stats,
        print_status,
    },
};

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
        // Its own socket writes use MSG_NOSIGNAL (see `crate::api`).
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
            eprintln!("limiter: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` is that nothing answers on the control socket.
fn connect_failed(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<api::ClientError>(),
        Some(api::ClientError::Connect { .. })
    )
}

/// Sends `request`; prints the reply as JSON, or as `T` through `show`.
fn ask<T: DeserializeOwned>(
    common: &Common,
    request: Request,
    show: impl FnOnce(T),
) -> anyhow::Result<()> {
    let value = api::request(&common.control, &request)?;
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
            let options = RunOptions::try_from(args)?;
            DaemonLog::install(options.syslog.clone()).context("installing the logger")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(daemon::run(options))
        }
        Command::Status { bpffs, common } => {
            ask(&common, Request::Status, |s: Status| print_status(&s)).map_err(|e| {
                match (connect_failed(&e), crate::kernel::pins::PinDir::open(&bpffs)) {
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
            changes,
            common,
        }) => ask(
            &common,
            Request::ConnectorNew {
                name,
                changes: changes.normalized(),
            },
            |c: ConnectorStatus| print_connector(&c),
        ),
        Command::Connector(ConnectorCommand::Set {
            name,
            changes,
            common,
        }) => ask(
            &common,
            Request::ConnectorSet {
                name,
                changes: changes.normalized(),
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
            if let Ok(value) = api::request(&control, &Request::Status) {
                anyhow::bail!(
                    "a limiter daemon (pid {}) is running on {}: stop it first (it detaches when it stops, unless it runs with --keep-attached, as the systemd unit does: then run `limiter detach` after it stopped)",
                    value["pid"],
                    control.display()
                );
            }
            let removed = crate::kernel::pins::remove_all(&bpffs)?;
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
