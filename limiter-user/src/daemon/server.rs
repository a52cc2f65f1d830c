//! The control socket's server half: who may connect, the requests
//! answered, the event stream to followers (the client half is
//! `crate::api`).

use std::{
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    api::{Reply, Request},
    events::{Event, EventHub},
    query::{self},
    selection::canonical,
};

use super::Daemon;

/// Longest accepted control request line.
pub(super) const MAX_REQUEST_LEN: u64 = 64 * 1024;

/// Binds the control socket (checked free by `preflight::control_socket`),
/// mode 0600 (root), or 0660 with group `gid`.
pub(super) fn bind_control(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

/// Whether the process `pid` (with primary group `gid`) is in group
/// `group`, its supplementary groups included.
pub(super) fn in_group(pid: Option<i32>, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let Some(pid) = pid else { return false };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(group))
        })
}

pub(super) async fn serve_control(
    listener: UnixListener,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    group: Option<u32>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_client(stream, daemon.clone(), hub.clone(), group));
    }
}

pub(super) async fn serve_client(
    stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    group: Option<u32>,
) {
    let allowed = stream.peer_cred().is_ok_and(|cred| {
        cred.uid() == 0 || group.is_some_and(|g| in_group(cred.pid(), cred.gid(), g))
    });
    match allowed {
        true => {}
        false => {
            let (_, mut writer) = stream.into_split();
            let refusal = match group {
                Some(_) => {
                    "permission denied: only root and members of the daemon's --control-group may use the control socket"
                }
                None => {
                    "permission denied: only root may use the control socket (the daemon runs without --control-group)"
                }
            };
            let _ = write_reply(&mut writer, &Reply::Error(refusal.into())).await;
            return;
        }
    }
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_REQUEST_LEN)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events { follow }) => {
                // Subscribed before the snapshot, so nothing falls between.
                let receiver = follow.then(|| hub.follow());
                let recent = serde_json::to_value(hub.recent()).unwrap_or_default();
                if write_reply(&mut writer, &Reply::Ok(recent)).await.is_err() {
                    return;
                }
                if let Some(receiver) = receiver {
                    stream_events(receiver, &mut writer, &mut lines).await;
                    return;
                }
                continue;
            }
            Ok(request) => {
                let daemon = daemon.clone();
                tokio::task::spawn_blocking(move || {
                    daemon.lock().expect("daemon lock").handle(request)
                })
                .await
                .unwrap_or_else(|e| Reply::Error(format!("internal error: {e}")))
            }
            Err(e) => Reply::Error(format!("malformed request: {e}")),
        };
        if write_reply(&mut writer, &reply).await.is_err() {
            return;
        }
    }
}

/// Sends every event to a follower until it hangs up. A follower that reads
/// too slowly is skipped ahead and told how many events it lost; the daemon
/// never waits for it.
pub(super) async fn stream_events<R: tokio::io::AsyncBufRead + Unpin>(
    mut receiver: tokio::sync::broadcast::Receiver<Event>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut tokio::io::Lines<R>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let reply = tokio::select! {
            received = receiver.recv() => match received {
                Ok(event) => Reply::Event(Box::new(event)),
                Err(RecvError::Lagged(lost)) => Reply::Lost(lost),
                Err(RecvError::Closed) => return,
            },
            // Anything from the follower, or its hanging up, ends the stream.
            _ = lines.next_line() => return,
        };
        if write_reply(writer, &reply).await.is_err() {
            return;
        }
    }
}

pub(super) async fn write_reply(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    line.push('\n');
    writer.write_all(line.as_bytes()).await
}

impl Daemon {
    pub(super) fn handle(&mut self, request: Request) -> Reply {
        match self.answer(request) {
            Ok(value) => Reply::Ok(value),
            Err(e) => Reply::Error(format!("{e:#}")),
        }
    }

    pub(super) fn answer(&mut self, request: Request) -> anyhow::Result<serde_json::Value> {
        let value = match request {
            Request::Status => serde_json::to_value(self.status()?)?,
            Request::ConnectorList => serde_json::to_value(self.connector_statuses()?)?,
            Request::ConnectorShow { name } => {
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorNew { name, changes } => {
                self.change(&name, |d| d.new_connector(name.trim(), &changes))?;
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorSet { name, changes } => {
                self.change(&name, |d| d.set_connector(&name, &changes))?;
                serde_json::to_value(self.connector_status(self.index_of(&name)?)?)?
            }
            Request::ConnectorRemove { name } => {
                let index = self.index_of(&name)?;
                let removed = self.config.connectors[index].name.clone();
                self.change(&removed, |d| d.remove_connector(&name))?;
                serde_json::json!({ "removed": removed })
            }
            Request::Sources { connector, top } => serde_json::to_value(query::sources(
                &self.connectors(),
                &self.kernel,
                connector.as_deref(),
                top,
            )?)?,
            Request::Explain { ip, local } => {
                let ip: std::net::IpAddr = ip
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("{ip:?} is not an IP address"))?;
                let local: Option<std::net::SocketAddr> = match local {
                    Some(text) => Some(text.trim().parse().map_err(|_| {
                        anyhow!("--local {text:?} is not IP:PORT (IPv6 as [addr]:port)")
                    })?),
                    None => None,
                };
                // An IPv4 packet carries an IPv4 destination: it never
                // reaches an IPv6 binding such as [::]:25, and the reverse.
                if let Some(local) = local
                    && canonical(local.ip()).is_ipv4() != canonical(ip).is_ipv4()
                {
                    let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
                    let ip_v4 = canonical(ip).is_ipv4();
                    bail!(
                        "{ip} is {} and cannot reach --local {local} ({}): give an {} local address",
                        family(ip_v4),
                        family(!ip_v4),
                        family(ip_v4)
                    );
                }
                let explanation =
                    query::explain(&self.connectors(), &self.table, &self.kernel, ip, local)?;
                serde_json::to_value(explanation)?
            }
            Request::Events { .. } => {
                bail!("events are answered by the connection handler")
            }
            Request::Reload => serde_json::to_value(self.reload()?)?,
            Request::Stats => {
                let stats = self.kernel.stats()?;
                serde_json::to_value(query::stats(&self.connectors(), &stats))?
            }
        };
        Ok(value)
    }
}
