//! Writing a config into the kernel's tables: settings, bindings, ranges,
//! connectors, bound ports, and the reply marks.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapData, lpm_trie::Key};
use limiter_common::maps::{
    BOUND_PORT_WORDS, BindingKey, ConnectorConfig, FlowKey, RANGE_KEY_BINDING_BITS, RangeKey,
    ReplyMark, Settings, names,
};
use limiter_common::{
    addr, rate,
    refusals::{self},
};

use crate::{
    config::{Action, Config},
    selection::{BindingKeyOrd, RangeEntry, SelectionTable},
};

use super::{Kernel, KernelError, map_err};

/// Sets a port bitmap to exactly `ports`, writing only the words that change.
pub(super) fn write_bitmap(
    map: &mut Array<MapData, u64>,
    name: &'static str,
    ports: &[u16],
) -> Result<(), KernelError> {
    let mut words = vec![0u64; BOUND_PORT_WORDS as usize];
    for port in ports {
        words[(*port >> 6) as usize] |= 1u64 << (port & 63);
    }
    for (index, word) in words.iter().enumerate() {
        let index = index as u32;
        if map.get(&index, 0).map_err(map_err(name))? != *word {
            map.set(index, word, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// [`RangeKey`] with an order, for diffing tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RangeKeyOrd(RangeKey);

impl PartialOrd for RangeKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RangeKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.binding, self.0.remote).cmp(&(other.0.binding, other.0.remote))
    }
}

impl Kernel {
    /// Writes the global settings.
    pub fn set_settings(&mut self, config: &Config, netns_cookie: u64) -> Result<(), KernelError> {
        self.change(|kernel| {
            let mut settings = kernel.current_settings()?;
            settings.ipv6_prefix_len = config.ipv6_prefix_length as u32;
            settings.netns_cookie = netns_cookie;
            kernel.write_settings(settings)
        })
    }

    /// The settings as the kernel holds them.
    pub fn current_settings(&self) -> Result<Settings, KernelError> {
        self.settings.get(&0, 0).map_err(map_err(names::SETTINGS))
    }

    pub(super) fn write_settings(&mut self, settings: Settings) -> Result<(), KernelError> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))
    }

    /// Runs `write`, a change to the connector tables or the settings, under
    /// an odd configuration generation, and ends it under a new even one,
    /// whether `write` succeeded or not: the XDP program neither caches a
    /// refusal nor answers from its cache while a change is under way, nor
    /// afterwards with a refusal from before it (see
    /// `limiter_common::refusals`).
    pub(super) fn change<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let mut settings = self.current_settings()?;
        settings.generation = settings.generation.wrapping_add(1) | 1;
        self.write_settings(settings)?;
        let written = write(self);
        let ended = self.end_change();
        let value = written?;
        ended?;
        Ok(value)
    }

    /// The end of [`Kernel::change`]: the refusal cache's IPv6 prefix from
    /// the ranges now in the kernel (those of an earlier daemon too, for one
    /// that adopted its maps), written while the generation is still odd;
    /// then the generation, alone, made even.
    pub(super) fn end_change(&mut self) -> Result<(), KernelError> {
        let longest_ipv6_range = self
            .ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !addr::is_ipv4(&key.data().remote))
            .map(|key| key.prefix_len().saturating_sub(RANGE_KEY_BINDING_BITS))
            .max()
            .unwrap_or(0);
        let mut settings = self.current_settings()?;
        settings.refusal_prefix_len =
            refusals::key_prefix_len(settings.ipv6_prefix_len, longest_ipv6_range);
        self.write_settings(settings)?;
        settings.generation = (settings.generation | 1).wrapping_add(1);
        self.write_settings(settings)
    }

    /// Makes the kernel's connector tables match `config`, whose connector
    /// `i` has id `ids[i]`. New entries go in before stale ones go out, so a
    /// SYN in between meets either the old rule or the new one.
    pub fn install(
        &mut self,
        config: &Config,
        ids: &[u32],
        table: &SelectionTable,
    ) -> Result<(), KernelError> {
        self.change(|kernel| kernel.install_tables(config, ids, table))
    }

    pub(super) fn install_tables(
        &mut self,
        config: &Config,
        ids: &[u32],
        table: &SelectionTable,
    ) -> Result<(), KernelError> {
        for (connector, id) in config.connectors.iter().zip(ids) {
            let value = ConnectorConfig {
                limits: connector.limits,
                // Without a responder, a reply is a drop.
                action: match connector.action {
                    Action::Reply if !self.replies => Action::Drop.to_raw(),
                    action => action.to_raw(),
                },
                rate_slot_ns: rate::slot_ns(connector.limits.connection_rate_time_unit),
            };
            self.connectors
                .set(*id, value, 0)
                .map_err(map_err(names::CONNECTORS))?;
        }

        let want_ranges: BTreeMap<(u32, RangeKeyOrd), u32> = table
            .ranges
            .iter()
            .map(|e: &RangeEntry| ((e.prefix_len, RangeKeyOrd(e.key)), e.connector))
            .collect();
        for ((prefix_len, key), connector) in &want_ranges {
            self.ranges
                .insert(&Key::new(*prefix_len, key.0), connector, 0)
                .map_err(map_err(names::RANGES))?;
        }
        for (binding, id) in &table.bindings {
            self.bindings
                .insert(binding.key(), id, 0)
                .map_err(map_err(names::BINDINGS))?;
        }
        write_bitmap(&mut self.bound_ports, names::BOUND_PORTS, &table.ports)?;
        write_bitmap(
            &mut self.specific_ports,
            names::SPECIFIC_PORTS,
            &table.specific_ports,
        )?;

        let stale_bindings: Vec<BindingKey> = self
            .bindings
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !table.bindings.contains_key(&BindingKeyOrd {
                    addr: k.addr,
                    port: k.port,
                })
            })
            .collect();
        for key in stale_bindings {
            self.bindings
                .remove(&key)
                .map_err(map_err(names::BINDINGS))?;
        }
        let stale_ranges: Vec<Key<RangeKey>> = self
            .ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want_ranges.contains_key(&(k.prefix_len(), RangeKeyOrd(k.data()))))
            .collect();
        for key in stale_ranges {
            self.ranges.remove(&key).map_err(map_err(names::RANGES))?;
        }
        Ok(())
    }

    /// A handle of its own on the map of SYNs marked for a reply, for the
    /// responder.
    pub fn reply_flows_handle(&self) -> Result<HashMap<MapData, FlowKey, ReplyMark>, KernelError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self
            .reply_flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| KernelError::MapHandle {
                name: names::REPLY_FLOWS,
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(names::REPLY_FLOWS))?;
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(names::REPLY_FLOWS))
    }

    /// Forgets every reply mark: when no connector replies, none may steer
    /// (a mark planted before would send an admitted SYN to the responder).
    pub fn clear_reply_marks(&mut self) {
        let flows: Vec<FlowKey> = self.reply_flows.keys().filter_map(Result::ok).collect();
        for flow in flows {
            let _ = self.reply_flows.remove(&flow);
        }
    }
}
