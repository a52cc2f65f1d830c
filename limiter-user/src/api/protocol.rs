//! What goes over the control socket: the requests, the replies, and
//! what they carry.

use serde::{Deserialize, Serialize};

use crate::{config::edit::ConnectorChanges, events::Event};

/// Default path of the control socket.
pub const DEFAULT_CONTROL_PATH: &str = "/run/limiter/control.sock";

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Connectors, interfaces, live totals.
    Status,
    /// Every connector, with its live count.
    ConnectorList,
    /// One connector.
    ConnectorShow { name: String },
    /// Adds a connector.
    ConnectorNew {
        name: String,
        #[serde(default)]
        changes: ConnectorChanges,
    },
    /// Changes a connector.
    ConnectorSet {
        name: String,
        #[serde(default)]
        changes: ConnectorChanges,
    },
    /// Removes a connector.
    ConnectorRemove { name: String },
    /// The sources holding connections, largest first.
    Sources {
        #[serde(default)]
        connector: Option<String>,
        #[serde(default)]
        top: Option<usize>,
    },
    /// Why a connection from `ip` would be admitted or refused now.
    Explain {
        ip: String,
        #[serde(default)]
        local: Option<String>,
    },
    /// The kernel programs' counters.
    Stats,
    /// Reads the config file again and applies it (as SIGHUP does).
    Reload,
    /// The recent rejection events; with `follow`, a live stream after them.
    Events {
        #[serde(default)]
        follow: bool,
    },
}

/// The daemon's reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
    /// One event, to a follower.
    Event(Box<Event>),
    /// A follower read too slowly and missed this many events.
    Lost(u64),
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// The config file, or "built-in default".
    pub config: String,
    pub cgroup: String,
    pub pins: Option<String>,
    pub interfaces: Vec<InterfaceStatus>,
    pub connectors: Vec<ConnectorStatus>,
    /// Live connections on all connectors, removed ones included.
    pub live_total: u64,
    /// Of those, the ones still held by removed connectors.
    pub live_removed_connectors: u64,
    /// Server endpoints that connections to a bound port were seen to end
    /// up at (NAT) and that no connector's `forwarded_to` names: those
    /// connections are not counted.
    #[serde(default)]
    pub undeclared_forwards: Vec<String>,
}

/// What a reload changed, by connector name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// The file read.
    pub config: String,
    /// Connectors now.
    pub connectors: usize,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Reloaded {
    /// One line for the log and the CLI.
    pub fn describe(&self) -> String {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        format!(
            "reloaded {}: {} connector(s); added {}, changed {}, removed {}",
            self.config,
            self.connectors,
            list(&self.added),
            list(&self.changed),
            list(&self.removed)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// "driver" or "generic".
    pub xdp_mode: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorStatus {
    pub name: String,
    pub bindings: Vec<String>,
    /// The server's own endpoints after NAT, judged as this connector's.
    #[serde(default)]
    pub forwarded_to: Vec<String>,
    pub remote_ip_ranges: Vec<String>,
    /// A number, or "unlimited".
    pub max_inbound_connection: serde_json::Value,
    pub max_inbound_connection_per_source: serde_json::Value,
    pub max_inbound_connection_percentage_per_source: u32,
    /// A number, or "unlimited" (null from a daemon older than the rate).
    #[serde(default)]
    pub max_inbound_connection_rate_per_source: serde_json::Value,
    /// Seconds (absent from a daemon older than the rate).
    #[serde(default)]
    pub connection_rate_time_unit: Option<u32>,
    pub action: String,
    /// With action reply: the line the sender gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_text: Option<String>,
    pub live: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(
                r#"{"command":"connector_set","name":"Relay","changes":{"max_inbound_connection":"unlimited"}}"#
            )
            .unwrap(),
            Request::ConnectorSet {
                name: "Relay".into(),
                changes: ConnectorChanges {
                    max_inbound_connection: Some("unlimited".into()),
                    ..Default::default()
                }
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"command":"sources","conector":"x"}"#).is_err(),
            "unknown fields are refused"
        );
        assert_eq!(
            serde_json::to_string(&Reply::Error("no".into())).unwrap(),
            r#"{"error":"no"}"#
        );
    }
}
