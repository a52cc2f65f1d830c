//! Housekeeping: the sweep (seeded connections that closed, resets the
//! ring could not take, connections outside the tracked cgroup), the
//! counts checked against the socket table, idle sources forgotten, the
//! and the responder's heartbeat.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use limiter_common::{
    maps::{ConnectorConfig, FLOW_SEEDED, FlowKey, SourceCount, SourceKey, control as op},
    rate,
};

use crate::{
    kernel::{Kernel, monotonic_ns},
    selection::from_addr,
    sockdiag,
};

use super::Daemon;

/// An idle source (no live connection) is forgotten after this long.
pub(super) const SOURCE_IDLE_FORGET: Duration = Duration::from_secs(120);

/// ...or after this long when the source table is half full.
pub(super) const PRESSURE_SOURCE_IDLE: Duration = Duration::from_secs(1);

/// The counts are checked against the socket table this often, as a safety
/// net: a correction is logged and counted (`reconciled`).
pub(super) const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Housekeeping runs this often: seeded connections that closed, resets
/// that found the ring full, connections outside the tracked cgroup.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Tells the XDP program, twice a second, that the responder answers:
/// without it (the daemon gone, and its `steer` program with it) refused
/// SYNs of a reply connector are dropped.
pub(super) async fn keep_replying(daemon: Arc<Mutex<Daemon>>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let mut daemon = daemon.lock().expect("daemon lock");
        if daemon.kernel.replies()
            && let Err(e) = daemon.kernel.responders_alive()
        {
            log::error!(
                "telling the kernel the responder answers: {:#}",
                anyhow::Error::from(e)
            );
        }
    }
}

pub(super) async fn sweep_forever(daemon: Arc<Mutex<Daemon>>) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || {
            let mut daemon = daemon.lock().expect("daemon lock");
            daemon.sweep()
        })
        .await
        .context("sweeper task")??;
    }
}

/// The counts made to agree with the kernel's socket table: counted
/// connections that are gone (closed while no daemon or no sock_ops program
/// watched) are released, held ones that are not counted (they predate the
/// daemon) are counted. Returns (released, counted) and the flows counted
/// from the socket table, which only the daemon sees close.
///
/// The counted ones are read before the socket table, so a connection that
/// completes in between is never taken for gone; the missing ones after it,
/// so that one is never counted twice (and a count taken twice in a race is
/// given back by the kernel's own checks). Connections in other network
/// namespaces (containers behind DNAT) are left to the sock_ops program:
/// this namespace's table does not show them.
pub(super) fn reconcile(
    kernel: &mut Kernel,
    ports: &HashSet<u16>,
    netns: u64,
) -> anyhow::Result<((usize, usize), HashSet<FlowKey>)> {
    let counted_before = kernel.established_in(netns);
    let held = held_by_servers(ports)?;
    let mut released = 0;
    for (flow, _) in counted_before.iter().filter(|(f, _)| !held.contains(f)) {
        if kernel.release_established(flow)? {
            released += 1;
        }
    }
    // Nor is a connection waiting for its reset one that predates the
    // daemon.
    let known: HashSet<FlowKey> = kernel
        .established_in(netns)
        .into_iter()
        .map(|(flow, _)| flow)
        .chain(
            kernel
                .pending_resets()
                .into_iter()
                .filter(|r| r.conn.netns == netns)
                .map(|r| r.conn.flow),
        )
        .collect();
    let mut counted = 0;
    for flow in held.iter().filter(|f| !known.contains(f)) {
        match kernel.seed(flow)? {
            op::DONE => counted += 1,
            op::FULL => log::warn!("a table is full; not counting {}", show(flow)),
            _ => {}
        }
    }
    let seeded = kernel
        .established_in(netns)
        .into_iter()
        .filter(|(_, v)| v.flags & FLOW_SEEDED != 0)
        .map(|(flow, _)| flow)
        .collect();
    Ok(((released, counted), seeded))
}

/// The connections servers hold on `ports` (the responder's left out).
pub(super) fn held_by_servers(ports: &HashSet<u16>) -> anyhow::Result<HashSet<FlowKey>> {
    Ok(sockdiag::held_connections(ports)
        .context("reading the socket table")?
        .into_iter()
        .collect())
}

impl Daemon {
    pub(super) fn bound_ports(&self) -> HashSet<u16> {
        self.table.ports.iter().copied().collect()
    }

    /// One round of housekeeping: resets that found the ring full, seeded
    /// connections that closed, connections outside the tracked cgroup,
    /// the periodic reconciliation, idle sources.
    pub(super) fn sweep(&mut self) -> anyhow::Result<()> {
        // Resets the ring's reader has not settled a second after they were
        // asked for: the ring was full, or they failed.
        let now = monotonic_ns();
        let pending = self.kernel.pending_resets();
        for request in &pending {
            if now.saturating_sub(request.time_ns) >= 1_000_000_000
                && self.resetter.reset(request).settled()
            {
                self.kernel.resolve_reset(&request.conn);
            }
        }
        self.warn_about_undeclared_forwards();
        let held = held_by_servers(&self.bound_ports())?;
        let counted: HashMap<FlowKey, u32> = self
            .kernel
            .established_in(self.netns_cookie)
            .into_iter()
            .map(|(flow, value)| (flow, value.flags))
            .collect();
        let waiting_reset: HashSet<FlowKey> = pending
            .iter()
            .filter(|r| r.conn.netns == self.netns_cookie)
            .map(|r| r.conn.flow)
            .collect();
        // Seeded entries that sock_ops took over (the 4-tuple was reused).
        self.seeded
            .retain(|f| counted.get(f).is_some_and(|flags| flags & FLOW_SEEDED != 0));
        let gone: Vec<FlowKey> = self
            .seeded
            .iter()
            .filter(|f| !held.contains(f))
            .copied()
            .collect();
        for flow in gone {
            self.kernel.release_seeded(&flow)?;
            self.seeded.remove(&flow);
        }
        // Held and still not counted a sweep later: the sock_ops program
        // never saw its handshake complete (its server is outside the
        // tracked cgroup). Counted from here on, and watched by polling.
        let uncounted: HashSet<FlowKey> = held
            .iter()
            .filter(|f| !counted.contains_key(f) && !waiting_reset.contains(f))
            .copied()
            .collect();
        for flow in uncounted.intersection(&self.uncounted) {
            if self.kernel.seed(flow)? == op::DONE {
                self.seeded.insert(*flow);
                if !self.warned_untracked {
                    self.warned_untracked = true;
                    log::warn!(
                        "connection {} completed without passing the sock_ops program: is the mail server in cgroup {}? It is counted, but by polling and without a judgement.",
                        show(flow),
                        self.cgroup.display()
                    );
                }
            }
        }
        self.uncounted = uncounted;
        if self.last_reconcile.elapsed() >= RECONCILE_EVERY {
            let ports = self.bound_ports();
            let ((released, counted), seeded) =
                reconcile(&mut self.kernel, &ports, self.netns_cookie)?;
            self.seeded = seeded;
            self.last_reconcile = Instant::now();
            if released + counted > 0 {
                log::warn!(
                    "reconciled with the socket table: released {released}, counted {counted}"
                );
            }
        }
        let sources_crowded = self.kernel.sources_len() * 2 >= self.kernel.sizes().sources as usize;
        if sources_crowded {
            self.forget_idle_sources(PRESSURE_SOURCE_IDLE, true);
        } else if self.last_source_gc.elapsed() >= SOURCE_IDLE_FORGET / 4 {
            self.last_source_gc = Instant::now();
            self.forget_idle_sources(SOURCE_IDLE_FORGET, false);
        }
        Ok(())
    }

    /// Warns, once each, about server endpoints that SYNs to a bound port
    /// were seen to end up at (NAT) and that no `forwarded_to` names.
    pub(super) fn warn_about_undeclared_forwards(&mut self) {
        for (endpoint, connector) in self.kernel.undeclared_forwards() {
            let shown =
                std::net::SocketAddr::new(from_addr(&endpoint.addr), endpoint.port).to_string();
            if self.warned_forwards.insert(shown.clone()) {
                let name = self
                    .connectors()
                    .by_id(connector)
                    .map_or_else(|| format!("#{connector}"), |c| c.name.clone());
                log::warn!(
                    "connections to connector \"{name}\" end up at {shown} (a REDIRECT, or DNAT into a container?), which no connector's forwarded_to names: they are not counted; add forwarded_to = [\"{shown}\"] to the connector"
                );
            }
        }
    }

    /// Deletes source entries that have held nothing for `idle`, so that
    /// sources that come and go do not fill the table for good. The kernel
    /// checks again, under the connector's lock, at the moment of each
    /// deletion: a connection counted meanwhile keeps its entry, and so does
    /// a rate window that must keep it (`rate::keeps_entry`; asked about
    /// here only once it no longer does: the kernel would refuse before).
    /// `under_pressure`: the table is filling.
    pub(super) fn forget_idle_sources(&mut self, idle: Duration, under_pressure: bool) {
        let now = monotonic_ns();
        let idle_ns = idle.as_nanos() as u64;
        // Read once a connector, not once a source.
        let mut configs: HashMap<u32, Option<ConnectorConfig>> = HashMap::new();
        let stale: Vec<SourceKey> = self
            .kernel
            .sources()
            .into_iter()
            .filter(|(key, count)| {
                let mut config = || {
                    *configs
                        .entry(key.connector)
                        .or_insert_with(|| self.kernel.connector_config(key.connector))
                };
                forgettable(count, now, idle_ns, under_pressure, &mut config)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            if let Err(e) = self.kernel.forget_source(&key, idle, under_pressure) {
                log::warn!("forgetting an idle source: {:#}", anyhow::Error::from(e));
            }
        }
    }
}

/// Whether a source entry may be forgotten at `now`: it holds nothing, has
/// held nothing for `idle_ns`, and its rate window does not keep it under
/// its connector's `config()` (asked only when the rest holds; none: the
/// connector is gone, nothing keeps it).
pub(super) fn forgettable(
    count: &SourceCount,
    now: u64,
    idle_ns: u64,
    under_pressure: bool,
    config: &mut dyn FnMut() -> Option<ConnectorConfig>,
) -> bool {
    let idle_for = now.saturating_sub(count.last_change_ns);
    count.live == 0
        && idle_for >= idle_ns
        && config().is_none_or(|config| {
            let recent = count.rate.recent(now, config.rate_slot_ns);
            !rate::keeps_entry(&config.limits, recent, idle_for, under_pressure)
        })
}

/// A flow for people: `remote -> local:port`.
pub(super) fn show(flow: &FlowKey) -> String {
    let remote = std::net::SocketAddr::new(from_addr(&flow.remote), flow.remote_port);
    let local = std::net::SocketAddr::new(from_addr(&flow.local), flow.local_port);
    format!("{remote} -> {local}")
}

#[cfg(test)]
mod tests {
    use limiter_common::{
        maps::{ReportGate, SourceKey},
        rate::{RateWindow, slot_ns},
    };

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_source_whose_rate_window_holds_a_connection_is_kept() {
        let slot = slot_ns(60);
        let mut limits = limiter_common::Limits::EXCHANGE_DEFAULT;
        limits.max_inbound_connection_rate_per_source = 2;
        let mut config = ConnectorConfig {
            limits,
            action: 0,
            rate_slot_ns: slot,
        };
        let mut count = SourceCount {
            key: SourceKey {
                connector: 0,
                addr: [0; 16],
            },
            live: 0,
            flags: 0,
            _pad: 0,
            last_change_ns: 1000 * SECOND,
            gate: ReportGate::default(),
            rate: RateWindow::default(),
        };
        count.rate.count(1000 * SECOND, slot);
        let idle = 30 * SECOND;
        let asked = std::cell::Cell::new(0);
        let ask = |config: ConnectorConfig| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                Some(config)
            }
        };
        // Idle long enough, but counted in the rate until 1070 s.
        assert!(!forgettable(
            &count,
            1069 * SECOND,
            idle,
            false,
            &mut ask(config)
        ));
        assert!(forgettable(
            &count,
            1070 * SECOND,
            idle,
            false,
            &mut ask(config)
        ));
        // Under pressure, a source below its rate is forgotten, one at its
        // rate is not.
        assert!(forgettable(
            &count,
            1069 * SECOND,
            idle,
            true,
            &mut ask(config)
        ));
        count.rate.count(1000 * SECOND, slot);
        assert!(!forgettable(
            &count,
            1069 * SECOND,
            idle,
            true,
            &mut ask(config)
        ));
        // Without a rate limit, the window keeps nothing.
        config.limits.max_inbound_connection_rate_per_source = limiter_common::UNLIMITED;
        assert!(forgettable(
            &count,
            1069 * SECOND,
            idle,
            false,
            &mut ask(config)
        ));
        // Not idle long enough: the connector is not even asked for.
        assert!(!forgettable(
            &count,
            1010 * SECOND,
            idle,
            false,
            &mut ask(config)
        ));
        count.live = 1;
        assert!(!forgettable(
            &count,
            2000 * SECOND,
            idle,
            false,
            &mut ask(config)
        ));
        // Only what is idle long enough asked about its connector.
        assert_eq!(asked.get(), 5);
    }
}
