//! The control socket: one JSON request per line, one JSON reply per line.
//!
//! Only root may connect (the socket is mode 0600 and the daemon checks the
//! peer's credentials as well).

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{edit::ConnectorChanges, events::Event};

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
    pub action: String,
    /// With action reply: the line the sender gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_text: Option<String>,
    pub live: u32,
}

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: no daemon, or a stale socket.
    #[error("cannot reach the limiter daemon at {path}: {source} (is `limiter run` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The socket (or a directory on its way) is not this user's to use:
    /// the daemon may well be running.
    #[error(
        "permission denied on the control socket {path}: run as root, or as a member of the group the daemon was given with --control-group"
    )]
    Denied { path: String },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent a reply that is not valid: {0}")]
    Protocol(String),
    /// The daemon hung up: it stopped, or it would not answer.
    #[error("the daemon closed the connection to {path}")]
    Closed { path: String },
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the daemon's answer.
pub fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let mut replies = Replies::open(path, request, Some(Duration::from_secs(30)))?;
    match replies.next_reply()? {
        Reply::Ok(value) => Ok(value),
        Reply::Error(message) => Err(ClientError::Refused(message)),
        other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
    }
}

/// The replies to one request, read line by line (a followed event stream
/// sends many).
pub struct Replies {
    reader: BufReader<UnixStream>,
    path: String,
}

impl Replies {
    /// Connects, sends `request`, and waits at most `timeout` for each
    /// reply (`None`: forever, for streams).
    pub fn open(
        path: &Path,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Replies, ClientError> {
        let shown = path.display().to_string();
        let io = |source| ClientError::Io {
            path: shown.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::Connect {
                    path: shown.clone(),
                    source,
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::Denied {
                path: shown.clone(),
            },
            _ => io(source),
        })?;
        stream.set_read_timeout(timeout).map_err(io)?;
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        send(&stream, line.as_bytes()).map_err(io)?;
        Ok(Replies {
            reader: BufReader::new(stream),
            path: shown,
        })
    }

    /// The next reply.
    pub fn next_reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Writes `bytes` with MSG_NOSIGNAL: the CLI's commands die quietly of
/// SIGPIPE when their reader goes away (see `cli::main`), but a daemon
/// that hung up must be an error said in words, not that.
fn send(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        // SAFETY: the pointer and length are those of a live slice, and the
        // fd is the stream's, open for as long as it is borrowed.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match sent {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => bytes = &bytes[n.unsigned_abs()..],
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
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
