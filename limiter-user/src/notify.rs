//! systemd's service notifications (sd_notify(3)), for `Type=notify`:
//! `READY=1` once the daemon enforces, `STATUS=` with the connectors and
//! live totals, `RELOADING=1` / `READY=1` around a live change,
//! `STOPPING=1`, and `WATCHDOG=1` while the daemon answers. Without
//! `NOTIFY_SOCKET` (not started by systemd) all of it does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::api::Status;

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("notifying systemd: {e}");
    }
}

/// The one-line status systemd shows (`systemctl status limiter`).
pub fn status_line(status: &Status) -> String {
    const SHOWN: usize = 8;
    let interfaces: Vec<String> = status
        .interfaces
        .iter()
        .map(|i| format!("{} ({} XDP)", i.name, i.xdp_mode))
        .collect();
    let mut connectors: Vec<String> = status
        .connectors
        .iter()
        .take(SHOWN)
        .map(|c| format!("{} {}", c.name, c.live))
        .collect();
    if status.connectors.len() > SHOWN {
        connectors.push(format!("{} more", status.connectors.len() - SHOWN));
    }
    format!(
        "enforcing on {}; {} connector(s), {} live connection(s): {}",
        interfaces.join(", "),
        status.connectors.len(),
        status.live_total,
        connectors.join(", ")
    )
}

/// Tells systemd the daemon is ready (every interface and sock_ops
/// attached, the counts seeded) with its status, then keeps the status
/// fresh and, with `WatchdogSec=`, pets the watchdog for as long as
/// `status` answers. Abort the task at shutdown.
pub fn ready<F>(status: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> anyhow::Result<Status> + Send + Sync + 'static,
{
    let status = std::sync::Arc::new(status);
    let line = match status() {
        Ok(s) => status_line(&s),
        Err(e) => format!("enforcing; status unavailable: {e:#}"),
    };
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    let watchdog = sd_notify::watchdog_enabled();
    tokio::spawn(async move {
        if !enabled() {
            return;
        }
        // Half the watchdog's timeout, as sd_watchdog_enabled(3) advises.
        let every = watchdog.map_or(STATUS_EVERY, |timeout| (timeout / 2).min(STATUS_EVERY));
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let status = status.clone();
            // The daemon's lock is a blocking one: a stuck daemon stops
            // the pets, and systemd restarts it.
            let answered = tokio::task::spawn_blocking(move || status()).await;
            if let Ok(Ok(current)) = answered {
                let line = status_line(&current);
                let mut states = vec![NotifyState::Status(&line)];
                if watchdog.is_some() {
                    states.push(NotifyState::Watchdog);
                }
                send(&states);
            }
        }
    })
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// A live change: `RELOADING=1` now, `READY=1` when dropped, whether the
/// change took or not.
#[must_use = "READY=1 is sent when this is dropped"]
pub struct Reloading(());

impl Reloading {
    pub fn start() -> Reloading {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        Reloading(())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        send(&[NotifyState::Ready]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectorStatus, InterfaceStatus};

    #[test]
    fn the_status_line_names_interfaces_connectors_and_totals() {
        let connector = |name: &str, live| ConnectorStatus {
            name: name.into(),
            bindings: vec![],
            forwarded_to: vec![],
            remote_ip_ranges: vec![],
            max_inbound_connection: 5000.into(),
            max_inbound_connection_per_source: 20.into(),
            max_inbound_connection_percentage_per_source: 2,
            max_inbound_connection_rate_per_source: "unlimited".into(),
            connection_rate_time_unit: Some(60),
            action: "drop".into(),
            reply_text: None,
            live,
        };
        let status = Status {
            version: "0".into(),
            pid: 1,
            uptime_seconds: 0,
            config: "built-in".into(),
            cgroup: "/".into(),
            pins: None,
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                xdp_mode: "driver".into(),
            }],
            live_total: 15,
            live_removed_connectors: 0,
            connectors: vec![connector("Default Frontend", 12), connector("Relay", 3)],
            undeclared_forwards: vec![],
        };
        assert_eq!(
            status_line(&status),
            "enforcing on eth0 (driver XDP); 2 connector(s), 15 live connection(s): Default Frontend 12, Relay 3"
        );
    }
}
