//! The answers of several servers (`--server`) printed together: one
//! table with a SERVER column, one block a server, or one JSON list.

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::{
    api::{ConnectorStatus, Reloaded},
    events::Event,
    fleet::{self, Failure, Fleet},
    query::SourceEntry,
};

use super::{
    args::{Command, ConnectorCommand},
    print::{
        CONNECTORS_HEADER, SOURCES_HEADER, connector_row, limits, plain, print_connector,
        print_explanation, print_stats, print_status, print_table, rate_legend, rate_limit,
        source_row,
    },
};

/// Runs `command` on every server of `fleet` and prints their answers
/// together: one table with a SERVER column where the command prints a
/// table, else one block a server; with `json`, one list whose entries
/// carry a `server` field (`error` for a server that did not answer).
/// Fails (exit 1) unless every server answered.
pub(super) fn fan_out(command: &Command, fleet: &Fleet, json: bool) -> anyhow::Result<()> {
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

pub(super) fn with_server(server: &str, value: &serde_json::Value) -> serde_json::Value {
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
pub(super) fn print_fleet_json(
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
pub(super) fn print_fleet_changes(
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
pub(super) fn change_words(value: &serde_json::Value) -> String {
    if let Ok(c) = serde_json::from_value::<ConnectorStatus>(value.clone()) {
        let rate = rate_limit(&c)
            .map(|rate| format!(", rate {rate}"))
            .unwrap_or_default();
        return format!(
            "changed: \"{}\" {}{rate} {}, live {}",
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
pub(super) fn print_fleet_text(
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
            let mut entries = Vec::new();
            for (server, value) in answered {
                for entry in typed::<Vec<SourceEntry>>(value)? {
                    let mut row = vec![server.clone()];
                    row.extend(source_row(&entry));
                    rows.push(row);
                    entries.push(entry);
                }
            }
            prefixed(&SOURCES_HEADER, rows);
            if let Some(legend) = rate_legend(&entries) {
                println!("{legend}");
            }
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

pub(super) fn print_server_event(server: &str, event: &Event, json: bool) {
    if json {
        if let Ok(value) = serde_json::to_value(event) {
            println!("{}", with_server(server, &value));
        }
    } else {
        println!("{server}  {}", event.line());
    }
}
