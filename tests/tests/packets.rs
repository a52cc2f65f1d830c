//! The loaded XDP program on crafted frames, through `BPF_PROG_TEST_RUN`:
//! verdicts and map effects for every header shape. Nothing is attached.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use limiter::{
    config::Config,
    kernel::{Kernel, TableSizes},
    selection::{SelectionTable, from_addr, to_addr},
};
use limiter_common::{
    addr,
    maps::{FlowKey, control, stat},
    retransmit,
};
use limiter_tests::frames::{
    ACK, ETH_P_8021AD, ETH_P_8021Q, FIN, IPPROTO_ICMP, IPPROTO_UDP, IPV6_DEST_OPTIONS,
    IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING, PSH, RST, SYN, Segment, arp, ethernet,
};

const ETH_HLEN: usize = 14;
const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, last)
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

struct Loaded {
    kernel: Kernel,
    table: SelectionTable,
}

fn load(config: &str) -> Loaded {
    let config = Config::parse(config, "test.toml").expect("valid config");
    let mut kernel = Kernel::load(
        TableSizes {
            sources: 4096,
            handshakes: 4096,
            established: 4096,
        },
        None,
    )
    .expect("loading the programs (as root)");
    let table = SelectionTable::build(&config);
    let ids: Vec<u32> = (0..config.connectors.len() as u32).collect();
    kernel.set_settings(&config, 0).unwrap();
    kernel.install(&config, &ids, &table).unwrap();
    Loaded { kernel, table }
}

const ONE_CONNECTOR: &str = "[[connector]]\nname = \"Frontend\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
     max_inbound_connection = 1000\nmax_inbound_connection_per_source = 3\n\
     max_inbound_connection_percentage_per_source = 100\n";

impl Loaded {
    fn run(&self, frame: &[u8]) -> u32 {
        let program = self.kernel.admit_program().unwrap();
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }

    fn counter(&self, connector: u32, counter: u32) -> u64 {
        self.kernel.stats().unwrap().connectors[connector as usize][counter as usize]
    }

    fn handshakes(&self) -> usize {
        self.kernel.handshakes().len()
    }

    fn live(&self, connector: u32) -> u32 {
        self.kernel.connector_live(connector).unwrap()
    }

    /// `frame` passes and nothing is counted.
    fn passes_uncounted(&mut self, frame: &[u8], what: &str) {
        let before = (self.handshakes(), self.kernel.stats().unwrap());
        assert_eq!(self.run(frame), XDP_PASS, "{what}");
        let after = (self.handshakes(), self.kernel.stats().unwrap());
        assert_eq!(before, after, "{what} changed the counts");
    }

    /// `segment` passes as an admitted, counted SYN of connector 0 with the
    /// right flow key.
    fn counted(&mut self, segment: &Segment, what: &str) {
        let before = self.handshakes();
        assert_eq!(self.run(&segment.build()), XDP_PASS, "{what}");
        assert_eq!(self.handshakes(), before + 1, "{what} was not counted");
        let found = self.kernel.handshakes().into_iter().any(|(flow, value)| {
            from_addr(&flow.remote) == segment.src
                && from_addr(&flow.local) == segment.dst
                && flow.remote_port == segment.sport
                && flow.local_port == segment.dport
                && value.source.connector == 0
        });
        assert!(found, "{what}: no handshake with its addresses and ports");
    }
}

#[test]
fn a_syn_is_counted_and_admitted() {
    let mut l = load(ONE_CONNECTOR);
    l.counted(&Segment::syn(v4(1), 40000, SERVER, 25), "IPv4 SYN");
    assert_eq!(l.live(0), 1);
    assert_eq!(l.counter(0, stat::ADMITTED), 1);
    l.counted(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25),
        "IPv6 SYN",
    );
    assert_eq!(l.live(0), 2);
}

#[test]
fn segments_other_than_a_bare_syn_pass_uncounted() {
    let mut l = load(ONE_CONNECTOR);
    for (flags, name) in [
        (SYN | ACK, "SYN-ACK"),
        (ACK, "ACK"),
        (PSH | ACK, "data"),
        (RST, "RST"),
        (RST | ACK, "RST-ACK"),
        (FIN | ACK, "FIN"),
        (SYN | RST, "SYN+RST"),
        (SYN | FIN, "SYN+FIN"),
        (0, "no flags"),
    ] {
        for src in [IpAddr::from(v4(1)), v6("2001:db8:1::7").into()] {
            let dst: IpAddr = if src.is_ipv4() {
                SERVER.into()
            } else {
                SERVER6.into()
            };
            let frame = Segment::syn(src, 40000, dst, 25).flags(flags).build();
            l.passes_uncounted(&frame, name);
        }
    }
}

#[test]
fn other_ports_and_protocols_pass_uncounted() {
    let mut l = load(ONE_CONNECTOR);
    l.passes_uncounted(&Segment::syn(v4(1), 40000, SERVER, 587).build(), "port 587");
    l.passes_uncounted(&Segment::syn(v4(1), 25, SERVER, 24).build(), "port 24");
    l.passes_uncounted(
        &Segment::syn(v4(1), 40000, SERVER, 25)
            .protocol(IPPROTO_UDP)
            .build(),
        "UDP to 25",
    );
    l.passes_uncounted(
        &Segment::syn(v4(1), 40000, SERVER, 25)
            .protocol(IPPROTO_ICMP)
            .build(),
        "ICMP",
    );
    l.passes_uncounted(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25)
            .protocol(IPPROTO_UDP)
            .build(),
        "UDP over IPv6",
    );
    l.passes_uncounted(&arp(), "ARP");
    let mut unknown = ethernet(&[], 0x88cc);
    unknown.extend_from_slice(&[0u8; 46]);
    l.passes_uncounted(&unknown, "LLDP");
    // A version field that lies.
    let mut bad_version = Segment::syn(v4(1), 40000, SERVER, 25).build();
    bad_version[14] = 0x65;
    l.passes_uncounted(&bad_version, "IPv4 ethertype with version 6");
    let mut short_ihl = Segment::syn(v4(1), 40000, SERVER, 25).build();
    short_ihl[14] = 0x44;
    l.passes_uncounted(&short_ihl, "IHL below 5");
}

#[test]
fn ipv4_options_are_skipped() {
    let mut l = load(ONE_CONNECTOR);
    for words in 1..=10u8 {
        let segment = Segment::syn(v4(words), 40000, SERVER, 25).ipv4_options(words as usize * 4);
        l.counted(&segment, &format!("IHL {}", 5 + words));
    }
}

#[test]
fn vlan_and_qinq_tags_are_skipped() {
    let mut l = load(ONE_CONNECTOR);
    l.counted(
        &Segment::syn(v4(1), 40000, SERVER, 25).tags(&[ETH_P_8021Q]),
        "802.1Q",
    );
    l.counted(
        &Segment::syn(v4(2), 40000, SERVER, 25).tags(&[ETH_P_8021AD, ETH_P_8021Q]),
        "QinQ",
    );
    l.counted(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25).tags(&[ETH_P_8021Q]),
        "IPv6 over 802.1Q",
    );
    // Three tags are beyond what the program follows: not a frame it knows.
    l.passes_uncounted(
        &Segment::syn(v4(3), 40000, SERVER, 25)
            .tags(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q])
            .build(),
        "three tags",
    );
}

#[test]
fn ipv6_extension_headers_are_followed() {
    let mut l = load(ONE_CONNECTOR);
    let src = |n: u16| Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 7);
    l.counted(
        &Segment::syn(src(1), 40000, SERVER6, 25).ipv6_extensions(&[IPV6_HOP_BY_HOP]),
        "hop-by-hop",
    );
    l.counted(
        &Segment::syn(src(2), 40000, SERVER6, 25).ipv6_extensions(&[
            IPV6_HOP_BY_HOP,
            IPV6_ROUTING,
            IPV6_DEST_OPTIONS,
        ]),
        "three extension headers",
    );
    l.counted(
        &Segment::syn(src(3), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_FRAGMENT])
            .ipv6_fragment(0, true),
        "first fragment",
    );
    l.passes_uncounted(
        &Segment::syn(src(4), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_FRAGMENT])
            .ipv6_fragment(10, false)
            .build(),
        "later fragment",
    );
    l.passes_uncounted(
        &Segment::syn(src(5), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_DEST_OPTIONS; 5])
            .build(),
        "five extension headers",
    );
}

#[test]
fn ipv4_fragments() {
    let mut l = load(ONE_CONNECTOR);
    l.counted(
        &Segment::syn(v4(1), 40000, SERVER, 25).ipv4_fragment(0, true),
        "first fragment holding the TCP header",
    );
    l.passes_uncounted(
        &Segment::syn(v4(2), 40000, SERVER, 25)
            .ipv4_fragment(3, false)
            .build(),
        "later fragment",
    );
    // RFC 1858: a first fragment too short for the TCP header could hide a
    // SYN from the limiter; to a bound port it is dropped.
    let tiny = Segment::syn(v4(3), 40000, SERVER, 25)
        .ipv4_fragment(0, true)
        .l4_len(8);
    assert_eq!(l.run(&tiny.build()), XDP_DROP);
    assert_eq!(
        l.kernel.stats().unwrap().global[stat::TINY_FRAGMENT as usize],
        1
    );
    let tiny_elsewhere = Segment::syn(v4(3), 40000, SERVER, 443)
        .ipv4_fragment(0, true)
        .l4_len(8);
    l.passes_uncounted(&tiny_elsewhere.build(), "tiny fragment to port 443");
    assert_eq!(l.handshakes(), 1);
}

#[test]
fn frames_cut_short_anywhere_pass_uncounted() {
    let mut l = load(ONE_CONNECTOR);
    let shapes = [
        Segment::syn(v4(1), 40000, SERVER, 25),
        Segment::syn(v4(1), 40000, SERVER, 25).ipv4_options(12),
        Segment::syn(v4(1), 40000, SERVER, 25).tags(&[ETH_P_8021AD, ETH_P_8021Q]),
        Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25),
        Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_HOP_BY_HOP, IPV6_FRAGMENT]),
    ];
    for shape in &shapes {
        let frame = shape.build();
        // Every length short of the whole TCP header, so every header
        // boundary, from the 14 bytes of an Ethernet header up: the kernel
        // runs XDP on nothing shorter (and BPF_PROG_TEST_RUN refuses it).
        for len in ETH_HLEN..frame.len() {
            l.passes_uncounted(&frame[..len], &format!("{shape:?} cut at {len}"));
        }
        assert_eq!(l.run(&frame), XDP_PASS);
    }
    // Whole, the IPv4 shapes are one flow and the IPv6 shapes another.
    assert_eq!(l.handshakes(), 2);
}

#[test]
fn a_retransmitted_syn_counts_once() {
    let l = load(ONE_CONNECTOR);
    let syn = Segment::syn(v4(1), 40000, SERVER, 25).build();
    for _ in 0..5 {
        assert_eq!(l.run(&syn), XDP_PASS);
    }
    assert_eq!(l.live(0), 1);
    assert_eq!(l.counter(0, stat::SYN_RETRANSMITTED), 4);
}

/// The source's handshake word (see `limiter_common::retransmit`).
fn handshake_word(l: &Loaded, source: IpAddr) -> u64 {
    l.kernel
        .sources()
        .into_iter()
        .find(|(key, _)| from_addr(&key.addr) == source)
        .map_or(0, |(_, count)| count.handshakes)
}

#[test]
fn a_source_at_its_cap_keeps_the_retransmits_of_its_handshakes() {
    let mut l = load(ONE_CONNECTOR);
    let source = IpAddr::from(v4(1));
    // 40000 and 40048 share a bit of the port set; 40001 has its own.
    let held = [40000, 40001, 40048];
    for port in held {
        assert_eq!(
            l.run(&Segment::syn(v4(1), port, SERVER, 25).build()),
            XDP_PASS
        );
    }
    let word = handshake_word(&l, source);
    assert_eq!(retransmit::count(word), 3);
    // At the cap: new SYNs are refused, whether their bit is set (40096, so
    // the table is asked) or clear (40002, so it is not).
    for port in [40096, 40002] {
        assert_eq!(
            l.run(&Segment::syn(v4(1), port, SERVER, 25).build()),
            XDP_DROP,
            "new SYN from port {port}"
        );
    }
    // Retransmissions of the three pass, counted once.
    for port in held {
        assert_eq!(
            l.run(&Segment::syn(v4(1), port, SERVER, 25).build()),
            XDP_PASS,
            "retransmission from port {port}"
        );
    }
    assert_eq!(l.counter(0, stat::SYN_RETRANSMITTED), 3);
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 2);
    assert_eq!(l.live(0), 3);
    // When the last handshake goes, so does the port set.
    for (flow, _) in l.kernel.handshakes() {
        assert!(l.kernel.expire_handshake(&flow).unwrap());
        if l.kernel.handshakes().is_empty() {
            assert_eq!(handshake_word(&l, source), 0);
        } else {
            assert_ne!(handshake_word(&l, source), 0);
        }
    }
    assert_eq!(l.live(0), 0);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40002, SERVER, 25).build()),
        XDP_PASS
    );
    assert_eq!(
        handshake_word(&l, source),
        retransmit::ONE | retransmit::port_bit(40002)
    );
}

#[test]
fn per_source_cap_in_the_kernel() {
    let mut l = load(ONE_CONNECTOR);
    for port in 0..3 {
        assert_eq!(
            l.run(&Segment::syn(v4(1), 40000 + port, SERVER, 25).build()),
            XDP_PASS
        );
    }
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40100, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 1);
    // A rejected SYN leaves the counts as they were.
    assert_eq!(l.live(0), 3);
    assert_eq!(
        l.run(&Segment::syn(v4(2), 40000, SERVER, 25).build()),
        XDP_PASS
    );
    // Releasing one handshake frees one slot.
    let (flow, _) = l
        .kernel
        .handshakes()
        .into_iter()
        .find(|(f, _)| from_addr(&f.remote) == IpAddr::from(v4(1)))
        .unwrap();
    assert!(l.kernel.expire_handshake(&flow).unwrap());
    assert!(
        !l.kernel.expire_handshake(&flow).unwrap(),
        "released once only"
    );
    assert_eq!(l.live(0), 3);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40101, SERVER, 25).build()),
        XDP_PASS
    );
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40102, SERVER, 25).build()),
        XDP_DROP
    );
}

#[test]
fn total_and_percentage_rules_in_the_kernel() {
    let l = load(
        "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\n\
         max_inbound_connection = 10\nmax_inbound_connection_per_source = \"unlimited\"\n\
         max_inbound_connection_percentage_per_source = 50\n",
    );
    // One source alone: S <= ceil((10 - S) / 2) holds up to S = 3.
    let verdicts: Vec<u32> = (0..5)
        .map(|p| l.run(&Segment::syn(v4(1), 40000 + p, SERVER, 25).build()))
        .collect();
    assert_eq!(verdicts, [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP]);
    assert_eq!(l.counter(0, stat::REJECTED_PERCENTAGE), 2);
    // Other sources fill the rest; the 11th connection meets the total.
    let mut admitted = 3;
    for last in 2..=20u8 {
        if l.run(&Segment::syn(v4(last), 40000, SERVER, 25).build()) == XDP_PASS {
            admitted += 1;
        }
    }
    assert!(admitted <= 10, "{admitted}");
    assert_eq!(l.live(0), admitted);
    assert!(l.counter(0, stat::REJECTED_TOTAL) + l.counter(0, stat::REJECTED_PERCENTAGE) > 2);
}

#[test]
fn ipv6_sources_are_counted_per_prefix() {
    for (prefix, expect_same_source) in [(64, true), (128, false)] {
        let l = load(&format!("ipv6_prefix_length = {prefix}\n{ONE_CONNECTOR}"));
        // Three connections from ::1, ::2, ::3 of one /64, cap 3 per source.
        for host in 1..=3u16 {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, host);
            assert_eq!(
                l.run(&Segment::syn(src, 40000, SERVER6, 25).build()),
                XDP_PASS
            );
        }
        let fourth = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 4);
        let verdict = l.run(&Segment::syn(fourth, 40000, SERVER6, 25).build());
        assert_eq!(verdict == XDP_DROP, expect_same_source, "/{prefix}");
        let other_64 = Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1);
        assert_eq!(
            l.run(&Segment::syn(other_64, 40000, SERVER6, 25).build()),
            XDP_PASS
        );
    }
}

#[test]
fn the_kernel_selects_the_connector_userspace_predicts() {
    let l = load(
        "[[connector]]\nname = \"Default\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
         max_inbound_connection_per_source = \"unlimited\"\nmax_inbound_connection_percentage_per_source = 100\n\
         [[connector]]\nname = \"Nets\"\nbindings = [\"0.0.0.0:25\"]\n\
         remote_ip_ranges = [\"198.51.100.0/24\", \"203.0.113.7\"]\n\
         max_inbound_connection_per_source = \"unlimited\"\nmax_inbound_connection_percentage_per_source = 100\n\
         [[connector]]\nname = \"Span\"\nbindings = [\"0.0.0.0:25\"]\n\
         remote_ip_ranges = [\"198.51.100.5-198.51.100.77\"]\n\
         max_inbound_connection_per_source = \"unlimited\"\nmax_inbound_connection_percentage_per_source = 100\n\
         [[connector]]\nname = \"Specific\"\nbindings = [\"192.0.2.1:25\"]\n\
         remote_ip_ranges = [\"198.51.100.64/26\"]\n\
         max_inbound_connection_per_source = \"unlimited\"\nmax_inbound_connection_percentage_per_source = 100\n\
         [[connector]]\nname = \"V6\"\nbindings = [\"[::]:25\"]\nremote_ip_ranges = [\"2001:db8:1::/48\"]\n\
         max_inbound_connection_per_source = \"unlimited\"\nmax_inbound_connection_percentage_per_source = 100\n",
    );
    let locals: [IpAddr; 3] = [
        SERVER.into(),
        Ipv4Addr::new(192, 0, 2, 2).into(),
        SERVER6.into(),
    ];
    let mut port = 30000;
    let mut seen = std::collections::HashSet::new();
    for local in locals {
        let remotes: Vec<IpAddr> = if local.is_ipv4() {
            (0..=255u8)
                .map(|i| Ipv4Addr::new(198, 51, 100, i).into())
                .chain([
                    Ipv4Addr::new(203, 0, 113, 7).into(),
                    Ipv4Addr::new(203, 0, 113, 8).into(),
                ])
                .collect()
        } else {
            vec![
                v6("2001:db8:1::1").into(),
                v6("2001:db8:1:ffff::1").into(),
                v6("2001:db8:2::1").into(),
            ]
        };
        for remote in remotes {
            port += 1;
            let expected = l.table.select(local, 25, remote);
            assert_eq!(
                l.run(&Segment::syn(remote, port, local, 25).build()),
                XDP_PASS
            );
            let got = l
                .kernel
                .handshakes()
                .into_iter()
                .find(|(f, _)| f.remote_port == port)
                .map(|(_, v)| v.source.connector);
            assert_eq!(got, expected, "{remote} -> {local}");
            seen.insert(got);
        }
    }
    // Every connector was chosen somewhere.
    assert_eq!(seen.len(), 5, "{seen:?}");
}

#[test]
fn monitor_admits_and_counts_what_it_would_refuse() {
    let l = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 1\naction = \"monitor\"",
    ));
    for port in 0..4 {
        assert_eq!(
            l.run(&Segment::syn(v4(1), 40000 + port, SERVER, 25).build()),
            XDP_PASS
        );
    }
    assert_eq!(l.live(0), 4, "monitored connections count like any other");
    assert_eq!(l.counter(0, stat::ADMITTED), 1);
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 3);
}

#[test]
fn concurrent_syns_on_two_cpus_never_overshoot() {
    // Two threads run the program at once (BPF_PROG_TEST_RUN runs on the
    // caller's CPU), each firing SYNs from the same source; every round, the
    // source must end up holding exactly its cap, never more.
    let mut l = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 5",
    ));
    let frames: Vec<Vec<Vec<u8>>> = (0..2u16)
        .map(|thread| {
            (0..200u16)
                .map(|i| Segment::syn(v4(9), 10000 + thread * 1000 + i, SERVER, 25).build())
                .collect()
        })
        .collect();
    for round in 0..100 {
        let start = std::sync::Barrier::new(frames.len());
        let admitted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = frames
                .iter()
                .map(|mine| {
                    let program = l.kernel.admit_program().unwrap();
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        mine.iter()
                            .filter(|frame| {
                                program
                                    .test_run(TestRunOptions {
                                        data_in: Some(frame),
                                        ..Default::default()
                                    })
                                    .unwrap()
                                    .return_value
                                    == XDP_PASS
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 5, "round {round}");
        assert_eq!(l.live(0), 5, "round {round}");
        for (flow, _) in l.kernel.handshakes() {
            assert!(l.kernel.expire_handshake(&flow).unwrap());
        }
        assert_eq!(l.live(0), 0);
    }
}

/// Runs `frame` and returns the verdict and the frame as the program left it.
fn run_out(l: &Loaded, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let program = l.kernel.admit_program().unwrap();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn reset_answers_an_over_cap_syn_with_a_valid_rst() {
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let l = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 1\naction = \"reset\"",
    ));
    let shapes = [
        Segment::syn(v4(1), 40000, SERVER, 25),
        Segment::syn(v4(2), 40001, SERVER, 25).tags(&[ETH_P_8021Q]),
        Segment::syn(v6("2001:db8:1::7"), 40002, SERVER6, 25),
    ];
    for shape in &shapes {
        // The first is admitted, the next over the cap.
        assert_eq!(l.run(&shape.build()), XDP_PASS);
        let mut again = shape.clone();
        again.sport += 1;
        let frame = again.build();
        let (verdict, out) = run_out(&l, &frame);
        assert_eq!(verdict, XDP_TX, "{again:?}");
        let reply = PacketHeaders::from_ethernet_slice(&out).expect("a valid frame");
        let link = reply.link.clone().unwrap().ethernet2().unwrap();
        assert_eq!(
            (link.source, link.destination),
            ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2])
        );
        assert_eq!(reply.link_exts.len(), again.tags.len(), "VLAN tags kept");
        let Some(TransportHeader::Tcp(tcp)) = reply.transport.clone() else {
            panic!("no TCP in {reply:?}");
        };
        assert!(tcp.rst && tcp.ack && !tcp.syn, "{tcp:?}");
        assert_eq!((tcp.source_port, tcp.destination_port), (25, again.sport));
        assert_eq!(
            (tcp.sequence_number, tcp.acknowledgment_number),
            (0, 0x1234_5679)
        );
        assert!(reply.payload.slice().is_empty());
        match reply.net.clone().unwrap() {
            NetHeaders::Ipv4(ip, _) => {
                let IpAddr::V4(client) = again.src else {
                    unreachable!()
                };
                assert_eq!(
                    (ip.source, ip.destination),
                    (SERVER.octets(), client.octets())
                );
                assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                assert_eq!(ip.total_len, 40);
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, &[]).unwrap());
            }
            NetHeaders::Ipv6(ip, _) => {
                assert_eq!(ip.source, SERVER6.octets());
                assert_eq!(ip.payload_length, 20);
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, &[]).unwrap());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 3);
    // Headers it will not rewrite in place: dropped instead.
    let with_options = Segment::syn(v4(1), 41000, SERVER, 25).ipv4_options(8);
    assert_eq!(l.run(&with_options.build()), XDP_DROP);
}

#[test]
fn a_syn_on_an_established_connection_is_not_counted_again() {
    let mut l = load(ONE_CONNECTOR);
    let flow = FlowKey::from_words(
        addr::to_words(&to_addr(SERVER.into())),
        addr::to_words(&to_addr(v4(1).into())),
        25,
        40000,
    );
    assert_eq!(l.kernel.seed(&flow).unwrap(), control::DONE);
    assert_eq!(l.live(0), 1);
    // A stray SYN on it (the kernel answers with a challenge ACK) holds
    // nothing new.
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40000, SERVER, 25).build()),
        XDP_PASS
    );
    assert_eq!(l.live(0), 1);
    assert_eq!(l.counter(0, stat::SYN_RETRANSMITTED), 1);
    // Another connection from the same source is new.
    l.counted(
        &Segment::syn(v4(1), 40001, SERVER, 25),
        "a second connection",
    );
    assert_eq!(l.live(0), 2);
}
