//! What the daemon tells: status, connectors, metrics.

use anyhow::anyhow;
use limiter_common::maps::stat;

use crate::{
    api::{ConnectorStatus, InterfaceStatus, Status},
    events::EventHub,
    metrics,
    query::{self, Connectors, limit_json},
};

use super::Daemon;

impl Daemon {
    pub(super) fn connector_status(&self, index: usize) -> anyhow::Result<ConnectorStatus> {
        let connector = &self.config.connectors[index];
        let live = self.kernel.connector_live(self.ids[index])?;
        Ok(ConnectorStatus {
            name: connector.name.clone(),
            bindings: connector.bindings.iter().map(|b| b.to_string()).collect(),
            forwarded_to: connector
                .forwarded_to
                .iter()
                .map(|b| b.to_string())
                .collect(),
            remote_ip_ranges: connector
                .remote_ip_ranges
                .iter()
                .map(|r| r.to_string())
                .collect(),
            max_inbound_connection: limit_json(connector.limits.max_inbound_connection),
            max_inbound_connection_per_source: limit_json(
                connector.limits.max_inbound_connection_per_source,
            ),
            max_inbound_connection_percentage_per_source: connector
                .limits
                .max_inbound_connection_percentage_per_source,
            max_inbound_connection_rate_per_source: limit_json(
                connector.limits.max_inbound_connection_rate_per_source,
            ),
            connection_rate_time_unit: Some(connector.limits.connection_rate_time_unit),
            action: connector.action.name().to_string(),
            reply_text: (connector.action == crate::config::Action::Reply)
                .then(|| connector.reply_text.clone()),
            live,
        })
    }

    pub(super) fn connector_statuses(&self) -> anyhow::Result<Vec<ConnectorStatus>> {
        (0..self.config.connectors.len())
            .map(|i| self.connector_status(i))
            .collect()
    }

    pub(super) fn status(&self) -> anyhow::Result<Status> {
        let connectors = self.connector_statuses()?;
        let configured: u64 = connectors.iter().map(|c| c.live as u64).sum();
        let live_total = self.kernel.live_total()?;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config: self.config_source.clone(),
            cgroup: self.cgroup.display().to_string(),
            pins: self.kernel.pin_dir().map(|p| p.display().to_string()),
            interfaces: self
                .interfaces
                .iter()
                .map(|(name, mode)| InterfaceStatus {
                    name: name.clone(),
                    xdp_mode: mode.name().to_string(),
                })
                .collect(),
            live_total,
            live_removed_connectors: live_total.saturating_sub(configured),
            connectors,
            undeclared_forwards: {
                let mut shown: Vec<String> = self.warned_forwards.iter().cloned().collect();
                shown.sort();
                shown
            },
        })
    }

    /// What a metrics scrape reports.
    pub(super) fn metrics(&self, hub: &EventHub) -> anyhow::Result<metrics::Snapshot> {
        let stats = self.kernel.stats()?;
        let report = query::stats(&self.connectors(), &stats);
        let mut connectors = Vec::new();
        for (i, counters) in report.connectors.into_iter().enumerate() {
            let live = self.kernel.connector_live(self.ids[i])?;
            connectors.push((counters.name, counters.counters, live));
        }
        let configured: u64 = connectors.iter().map(|(_, _, l)| *l as u64).sum();
        let live_total = self.kernel.live_total()?;
        let sizes = self.kernel.sizes();
        Ok(metrics::Snapshot {
            connectors,
            live_removed: live_total.saturating_sub(configured),
            events_lost: stats.global[stat::EVENTS_LOST as usize],
            syslog_errors: hub.syslog_errors.load(std::sync::atomic::Ordering::Relaxed),
            unreadable_dropped: stats.global[stat::UNREADABLE as usize],
            resets_pending: self.kernel.pending_resets().len() as u64,
            undeclared_forwards: stats.global[stat::UNDECLARED_FORWARDS as usize],
            maps: vec![
                (
                    "sources",
                    self.kernel.sources_len() as u64,
                    sizes.sources as u64,
                ),
                (
                    "established",
                    self.kernel.established().len() as u64,
                    sizes.established as u64,
                ),
            ],
        })
    }

    pub(super) fn connectors(&self) -> Connectors<'_> {
        Connectors {
            config: &self.config,
            ids: &self.ids,
        }
    }

    pub(super) fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.config
            .connectors
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| anyhow!("there is no connector \"{name}\""))
    }
}
