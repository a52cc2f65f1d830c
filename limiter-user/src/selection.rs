//! Which connector a connection belongs to, as tables for the kernel.
//!
//! A connection to local `D:p` from `S` belongs to the connector whose
//! binding matches `D:p` and whose remote range is the most specific match
//! for `S`; a binding on `D` itself is tried before the wildcard binding of
//! the family. In the kernel this is a hash lookup (the binding id of a
//! specific address, only on ports that have one; a wildcard binding's id
//! is computed) and longest-prefix matches in one LPM trie keyed by
//! (binding id, remote).
//!
//! Ranges become CIDR blocks. Validation only lets ranges on a binding
//! overlap when one contains the other, and each block is the largest
//! aligned block inside its range, so the block of the inner range around an
//! address is never larger than the outer one's: the longest prefix is the
//! most specific range. Where both give the same block, the smaller range
//! keeps it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
};

use ipnet::IpNet;
use limiter_common::{
    addr::{self, Addr, V4_MAPPED_PREFIX_LEN},
    maps::{BindingKey, FORWARDED_BINDING, RANGE_KEY_BINDING_BITS, RangeKey, wildcard_binding_id},
};

use crate::config::{Binding, Config};

/// An address in the kernel's form (IPv4 as `::ffff:a.b.c.d`).
pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => addr::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The kernel form back to an address (mapped IPv4 as IPv4).
pub fn from_addr(a: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The binding map key of a binding.
pub fn binding_key(binding: &Binding) -> BindingKey {
    BindingKey {
        addr: to_addr(binding.0.ip()),
        port: binding.port(),
        _pad: [0; 2],
    }
}

/// One entry of the kernel's `RANGES` trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    /// LPM prefix length over the whole key (binding id bits included).
    pub prefix_len: u32,
    pub key: RangeKey,
    pub connector: u32,
}

/// The selection tables for a configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectionTable {
    /// Binding key to binding id.
    pub bindings: BTreeMap<BindingKeyOrd, u32>,
    /// Trie entries.
    pub ranges: Vec<RangeEntry>,
    /// Ports some binding uses.
    pub ports: Vec<u16>,
    /// Ports some binding on a specific local address uses.
    pub specific_ports: Vec<u16>,
}

/// [`BindingKey`] with an order, for a deterministic table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingKeyOrd {
    pub addr: Addr,
    pub port: u16,
}

impl BindingKeyOrd {
    pub fn key(&self) -> BindingKey {
        BindingKey {
            addr: self.addr,
            port: self.port,
            _pad: [0; 2],
        }
    }
}

impl SelectionTable {
    /// Builds the tables with connector ids equal to their index in
    /// `config`.
    pub fn build(config: &Config) -> SelectionTable {
        let ids: Vec<u32> = (0..config.connectors.len() as u32).collect();
        SelectionTable::build_with_ids(config, &ids)
    }

    /// Builds the tables; connector `i` of `config` gets id `ids[i]`.
    pub fn build_with_ids(config: &Config, ids: &[u32]) -> SelectionTable {
        let mut table = SelectionTable::default();
        // (binding id, block) -> (range size, connector)
        let mut blocks: HashMap<(u32, IpNet), (u128, u32)> = HashMap::new();
        for (connector, &connector_id) in config.connectors.iter().zip(ids) {
            let forwarded = connector
                .forwarded_to
                .iter()
                .map(|b| (b, FORWARDED_BINDING));
            for (binding, flag) in connector.bindings.iter().map(|b| (b, 0)).chain(forwarded) {
                let key = binding_key(binding);
                let ord = BindingKeyOrd {
                    addr: key.addr,
                    port: key.port,
                };
                let next_id = table.bindings.len() as u32 | flag;
                let id = if key.addr == addr::wildcard(binding.is_ipv4()) {
                    wildcard_binding_id(key.port, binding.is_ipv4())
                } else {
                    next_id
                };
                let binding_id = *table.bindings.entry(ord).or_insert(id);
                for range in connector
                    .remote_ip_ranges
                    .iter()
                    .filter(|r| r.is_ipv4() == binding.is_ipv4())
                {
                    let size = range.size();
                    for block in range.cidrs() {
                        let candidate = (size, connector_id);
                        blocks
                            .entry((binding_id, block))
                            .and_modify(|held| {
                                if candidate.0 < held.0 {
                                    *held = candidate;
                                }
                            })
                            .or_insert(candidate);
                    }
                }
            }
        }
        let mut ranges: Vec<RangeEntry> = blocks
            .into_iter()
            .map(|((binding_id, block), (_, connector))| range_entry(binding_id, block, connector))
            .collect();
        ranges.sort_by_key(|e| (e.key.binding, e.prefix_len, e.key.remote));
        table.ranges = ranges;
        let mut ports: Vec<u16> = table.bindings.keys().map(|b| b.port).collect();
        ports.sort_unstable();
        ports.dedup();
        table.ports = ports;
        let mut specific: Vec<u16> = table
            .bindings
            .keys()
            .filter(|b| b.addr != addr::wildcard(addr::is_ipv4(&b.addr)))
            .map(|b| b.port)
            .collect();
        specific.sort_unstable();
        specific.dedup();
        table.specific_ports = specific;
        table
    }

    /// The connector id for a connection from `remote` to `local:port`,
    /// looked up exactly as the kernel does.
    pub fn select(&self, local: IpAddr, port: u16, remote: IpAddr) -> Option<u32> {
        let local = canonical(local);
        let remote = canonical(remote);
        let specific = BindingKeyOrd {
            addr: to_addr(local),
            port,
        };
        let wildcard = BindingKeyOrd {
            addr: addr::wildcard(local.is_ipv4()),
            port,
        };
        [specific, wildcard]
            .iter()
            .filter_map(|b| self.bindings.get(b))
            .find_map(|id| self.longest_match(*id, &to_addr(remote)))
    }

    fn longest_match(&self, binding_id: u32, remote: &Addr) -> Option<u32> {
        let remote = u128::from_be_bytes(*remote);
        self.ranges
            .iter()
            .filter(|e| e.key.binding == binding_id.to_be_bytes())
            .filter(|e| {
                let bits = e.prefix_len - RANGE_KEY_BINDING_BITS;
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from_be_bytes(e.key.remote) & mask == remote & mask
            })
            .max_by_key(|e| e.prefix_len)
            .map(|e| e.connector)
    }
}

fn range_entry(binding_id: u32, block: IpNet, connector: u32) -> RangeEntry {
    let (remote, bits) = match block {
        IpNet::V4(net) => (
            addr::from_ipv4(net.network().octets()),
            V4_MAPPED_PREFIX_LEN + net.prefix_len() as u32,
        ),
        IpNet::V6(net) => (net.network().octets(), net.prefix_len() as u32),
    };
    RangeEntry {
        prefix_len: RANGE_KEY_BINDING_BITS + bits,
        key: RangeKey {
            binding: binding_id.to_be_bytes(),
            remote,
        },
        connector,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        config::range::IpRange,
        config::{Action, Connector},
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn connector(name: &str, bindings: &[&str], ranges: &[&str]) -> Connector {
        Connector {
            name: name.to_string(),
            bindings: bindings.iter().map(|b| b.parse().unwrap()).collect(),
            forwarded_to: Vec::new(),
            remote_ip_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            limits: limiter_common::Limits::EXCHANGE_DEFAULT,
            action: Action::Drop,
            reply_text: crate::config::EXCHANGE_REPLY.to_string(),
        }
    }

    fn config(connectors: Vec<Connector>) -> Config {
        Config {
            ipv6_prefix_length: 64,
            connectors,
        }
    }

    /// The rule as the design states it, on the config directly.
    fn naive(config: &Config, local: IpAddr, port: u16, remote: IpAddr) -> Option<u32> {
        let on = |wildcard: bool| {
            config
                .connectors
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.bindings.iter().any(|b| {
                        b.port() == port
                            && b.is_ipv4() == local.is_ipv4()
                            && if wildcard {
                                b.is_wildcard()
                            } else {
                                b.0.ip() == local
                            }
                    })
                })
                .flat_map(|(i, c)| {
                    c.remote_ip_ranges
                        .iter()
                        .filter(|r| r.contains(remote))
                        .map(move |r| (r.size(), i as u32))
                })
                .min()
                .map(|(_, i)| i)
        };
        on(false).or_else(|| on(true))
    }

    #[test]
    fn most_specific_range_wins() {
        let c = config(vec![
            connector(
                "Default Frontend",
                &["0.0.0.0:25", "[::]:25"],
                &["0.0.0.0/0", "::/0"],
            ),
            connector(
                "Unauthenticated SMTP",
                &["0.0.0.0:25"],
                &["10.1.0.0/24", "192.168.1.75", "10.2.0.5-10.2.0.9"],
            ),
            connector("Relay v6", &["[::]:25"], &["2001:db8:1::/48"]),
        ]);
        let t = SelectionTable::build(&c);
        let any = ip("192.0.2.1");
        assert_eq!(t.select(any, 25, ip("10.1.0.7")), Some(1));
        assert_eq!(t.select(any, 25, ip("192.168.1.75")), Some(1));
        assert_eq!(t.select(any, 25, ip("192.168.1.76")), Some(0));
        assert_eq!(t.select(any, 25, ip("10.2.0.9")), Some(1));
        assert_eq!(t.select(any, 25, ip("10.2.0.10")), Some(0));
        assert_eq!(
            t.select(ip("2001:db8::1"), 25, ip("2001:db8:1:5::1")),
            Some(2)
        );
        assert_eq!(
            t.select(ip("2001:db8::1"), 25, ip("2001:db8:2::1")),
            Some(0)
        );
        // Other ports are nobody's.
        assert_eq!(t.select(any, 587, ip("10.1.0.7")), None);
        assert_eq!(t.ports, vec![25]);
        // Dual-stack sockets report IPv4 peers as mapped addresses.
        assert_eq!(
            t.select(ip("::ffff:192.0.2.1"), 25, ip("::ffff:10.1.0.7")),
            Some(1)
        );
    }

    #[test]
    fn a_specific_binding_beats_the_wildcard() {
        let c = config(vec![
            connector("Any", &["0.0.0.0:25"], &["10.0.0.0/8"]),
            connector("Front", &["192.0.2.10:25"], &["0.0.0.0/0"]),
            connector("Narrow", &["192.0.2.11:25"], &["172.16.0.0/12"]),
        ]);
        let t = SelectionTable::build(&c);
        // The specific binding wins even with a wider range.
        assert_eq!(t.select(ip("192.0.2.10"), 25, ip("10.0.0.1")), Some(1));
        assert_eq!(t.select(ip("192.0.2.99"), 25, ip("10.0.0.1")), Some(0));
        // No range of the specific binding matches: the wildcard's turn.
        assert_eq!(t.select(ip("192.0.2.11"), 25, ip("10.0.0.1")), Some(0));
        assert_eq!(t.select(ip("192.0.2.11"), 25, ip("172.16.0.1")), Some(2));
        assert_eq!(t.select(ip("192.0.2.11"), 25, ip("8.8.8.8")), None);
    }

    #[test]
    fn same_block_goes_to_the_smaller_range() {
        // 10.0.0.0-10.0.0.255 and 10.0.0.0-10.0.1.255 both yield 10.0.0.0/24.
        let c = config(vec![
            connector("Wide", &["0.0.0.0:25"], &["10.0.0.0-10.0.1.255"]),
            connector("Narrow", &["0.0.0.0:25"], &["10.0.0.0/24"]),
        ]);
        let t = SelectionTable::build(&c);
        assert_eq!(t.select(ip("192.0.2.1"), 25, ip("10.0.0.5")), Some(1));
        assert_eq!(t.select(ip("192.0.2.1"), 25, ip("10.0.1.5")), Some(0));
    }

    #[test]
    fn kernel_keys() {
        let c = config(vec![connector("A", &["0.0.0.0:25"], &["10.1.0.0/24"])]);
        let t = SelectionTable::build(&c);
        assert_eq!(t.ranges.len(), 1);
        let e = t.ranges[0];
        assert_eq!(e.prefix_len, 32 + 96 + 24);
        // A wildcard binding's id is computed, not looked up.
        assert_eq!(e.key.binding, wildcard_binding_id(25, true).to_be_bytes());
        assert_eq!(from_addr(&e.key.remote), ip("10.1.0.0"));
        let b = *t.bindings.keys().next().unwrap();
        assert_eq!(from_addr(&b.addr), ip("0.0.0.0"));
        assert!(addr::is_ipv4(&b.addr));
    }

    /// Nested ranges (a laminar family) from random cut points, spread over
    /// a few connectors, so that the config is valid by construction.
    fn laminar_ranges() -> impl Strategy<Value = Vec<(u32, u32, usize)>> {
        proptest::collection::vec((0u32..1000, 0u32..1000, 0usize..3), 1..12).prop_map(|raw| {
            let mut out: Vec<(u32, u32, usize)> = Vec::new();
            for (a, b, owner) in raw {
                let (first, last) = (a.min(b), a.max(b));
                let fits = out.iter().all(|&(f, l, _)| {
                    let disjoint = last < f || l < first;
                    let inside = f <= first && last <= l;
                    let outside = first <= f && l <= last;
                    let same = f == first && l == last;
                    !same && (disjoint || inside || outside)
                });
                if fits {
                    out.push((first, last, owner));
                }
            }
            out
        })
    }

    proptest! {
        #[test]
        fn tables_agree_with_the_naive_rule(ranges in laminar_ranges(), probes in proptest::collection::vec(0u32..1100, 50)) {
            let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0));
            let mut connectors: Vec<Connector> = (0..3)
                .map(|i| connector(&format!("c{i}"), &["0.0.0.0:25"], &[]))
                .collect();
            for (first, last, owner) in &ranges {
                let text = format!(
                    "{}-{}",
                    std::net::Ipv4Addr::from(base + first),
                    std::net::Ipv4Addr::from(base + last)
                );
                connectors[*owner].remote_ip_ranges.push(text.parse::<IpRange>().unwrap());
            }
            let c = config(connectors);
            let t = SelectionTable::build(&c);
            for p in probes {
                let remote = IpAddr::V4(std::net::Ipv4Addr::from(base + p));
                let local = ip("192.0.2.1");
                prop_assert_eq!(t.select(local, 25, remote), naive(&c, local, 25, remote));
            }
        }
    }
}
