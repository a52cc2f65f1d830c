//! The loaded XDP programs on crafted frames, through `BPF_PROG_TEST_RUN`:
//! verdicts and map effects for every header shape. Nothing is attached.
//!
//! The XDP program judges a SYN on the connections counted; it counts
//! nothing itself (the sock_ops program counts a connection when its
//! handshake completes, end to end in `enforce.rs`). So a source is put at
//! its cap here by counting connections for it through the `control`
//! program, as the daemon does for connections it finds at start-up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use limiter::{
    config::Config,
    kernel::{Kernel, LinkLayer, Stats, TableSizes},
    selection::{SelectionTable, from_addr, to_addr},
};
use limiter_common::{
    Rule, addr,
    maps::{FlowKey, RejectionEvent, SourceKey, control, gate, stat},
    refusals::{self, CachedRefusal},
};
use limiter_tests::frames::{
    ACK, ETH_P_8021AD, ETH_P_8021Q, FIN, IPPROTO_ICMP, IPPROTO_UDP, IPV6_AUTH, IPV6_DEST_OPTIONS,
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
    events: RingBuf<MapData>,
    /// Source ports of the connections counted so far, to keep them apart.
    next_port: u16,
}

fn load(config: &str) -> Loaded {
    let config = Config::parse(config, "test.toml").expect("valid config");
    let mut kernel = Kernel::load(
        TableSizes {
            sources: 4096,
            established: 4096,
        },
        None,
    )
    .expect("loading the programs (as root)");
    let table = SelectionTable::build(&config);
    let ids: Vec<u32> = (0..config.connectors.len() as u32).collect();
    kernel.set_settings(&config, 0).unwrap();
    kernel.install(&config, &ids, &table).unwrap();
    let events = kernel.take_events().unwrap();
    Loaded {
        kernel,
        table,
        events,
        next_port: 1000,
    }
}

const ONE_CONNECTOR: &str = "[[connector]]\nname = \"Frontend\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
     max_inbound_connection = 1000\nmax_inbound_connection_per_source = 3\n\
     max_inbound_connection_percentage_per_source = 100\n";

impl Loaded {
    fn run(&self, frame: &[u8]) -> u32 {
        self.run_on(LinkLayer::Ethernet, frame)
    }

    fn run_on(&self, link: LinkLayer, frame: &[u8]) -> u32 {
        let program = self.kernel.admit_program_for(link).unwrap();
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }

    fn stats(&self) -> Stats {
        self.kernel.stats().unwrap()
    }

    fn counter(&self, connector: u32, counter: u32) -> u64 {
        self.stats().connectors[connector as usize][counter as usize]
    }

    fn global(&self, counter: u32) -> u64 {
        self.stats().global[counter as usize]
    }

    fn live(&self, connector: u32) -> u32 {
        self.kernel.connector_live(connector).unwrap()
    }

    /// Counts `n` connections from `remote` to `local:25`, as the daemon
    /// counts those it finds in the socket table; returns their flows.
    fn hold(
        &mut self,
        remote: impl Into<IpAddr>,
        local: impl Into<IpAddr>,
        n: usize,
    ) -> Vec<FlowKey> {
        let (remote, local) = (remote.into(), local.into());
        (0..n)
            .map(|_| {
                self.next_port += 1;
                let flow = FlowKey::from_words(
                    addr::to_words(&to_addr(local)),
                    addr::to_words(&to_addr(remote)),
                    25,
                    self.next_port,
                );
                assert_eq!(self.kernel.seed(&flow).unwrap(), control::DONE);
                flow
            })
            .collect()
    }

    /// The rejection reports on the ring so far.
    fn reports(&mut self) -> Vec<RejectionEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            // SAFETY: the kernel writes RejectionEvents there.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RejectionEvent>()) });
        }
        out
    }

    /// `frame` passes and nothing is counted.
    fn passes_uncounted(&mut self, frame: &[u8], what: &str) {
        self.passes_uncounted_on(LinkLayer::Ethernet, frame, what);
    }

    fn passes_uncounted_on(&mut self, link: LinkLayer, frame: &[u8], what: &str) {
        let before = self.stats();
        assert_eq!(self.run_on(link, frame), XDP_PASS, "{what}");
        assert_eq!(before, self.stats(), "{what} changed the counters");
    }

    /// `segment` is judged as a SYN of connector 0 with its addresses and
    /// ports: passed while its source is under its cap (3), refused, and
    /// reported with its flow, once the source holds 3 connections.
    fn judged(&mut self, segment: &Segment, what: &str) {
        self.judged_on(LinkLayer::Ethernet, segment, what);
    }

    fn judged_on(&mut self, link: LinkLayer, segment: &Segment, what: &str) {
        let frame = match link {
            LinkLayer::Ethernet => segment.build(),
            LinkLayer::None => segment.build_l3(),
        };
        let passed = self.counter(0, stat::SYN_PASSED);
        assert_eq!(self.run_on(link, &frame), XDP_PASS, "{what}");
        assert_eq!(self.counter(0, stat::SYN_PASSED), passed + 1, "{what}");
        self.hold(segment.src, segment.dst, 3);
        self.reports();
        assert_eq!(self.run_on(link, &frame), XDP_DROP, "{what} at the cap");
        let reports = self.reports();
        let report = reports
            .last()
            .unwrap_or_else(|| panic!("{what}: no report"));
        assert_eq!(
            (
                from_addr(&report.remote),
                from_addr(&report.local),
                report.remote_port,
                report.local_port,
                report.connector,
                report.late,
            ),
            (segment.src, segment.dst, segment.sport, segment.dport, 0, 0),
            "{what}"
        );
    }

    /// `frame` is dropped as unreadable, and counted so.
    fn unreadable(&mut self, frame: &[u8], what: &str) {
        let before = self.global(stat::UNREADABLE);
        assert_eq!(self.run(frame), XDP_DROP, "{what}");
        assert_eq!(self.global(stat::UNREADABLE), before + 1, "{what}");
    }
}

#[test]
fn a_syn_under_the_cap_passes_and_holds_nothing() {
    let mut l = load(ONE_CONNECTOR);
    for _ in 0..10 {
        assert_eq!(
            l.run(&Segment::syn(v4(1), 40000, SERVER, 25).build()),
            XDP_PASS
        );
        assert_eq!(
            l.run(&Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25).build()),
            XDP_PASS
        );
    }
    // Only a completed handshake counts: the SYNs were passed, not counted.
    assert_eq!(l.live(0), 0);
    assert_eq!(l.counter(0, stat::SYN_PASSED), 20);
    assert!(l.kernel.sources().is_empty());
    l.judged(&Segment::syn(v4(1), 40000, SERVER, 25), "IPv4 SYN");
    l.judged(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25),
        "IPv6 SYN",
    );
}

#[test]
fn segments_other_than_a_bare_syn_pass_uncounted() {
    let mut l = load(ONE_CONNECTOR);
    // Sources at their cap: a SYN of theirs would be dropped.
    l.hold(v4(1), SERVER, 3);
    l.hold(v6("2001:db8:1::7"), SERVER6, 3);
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
    l.hold(v4(1), SERVER, 3);
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
        l.judged(&segment, &format!("IHL {}", 5 + words));
    }
}

#[test]
fn tcp_options_are_judged_by_the_ip_length() {
    let mut l = load(ONE_CONNECTOR);
    l.judged(
        &Segment::syn(v4(1), 40000, SERVER, 25).tcp_options(20),
        "a SYN with 20 bytes of options",
    );
    // Options the IP length does not hold: malformed, the kernel drops it.
    l.hold(v4(2), SERVER, 3);
    let cut = Segment::syn(v4(2), 40000, SERVER, 25)
        .tcp_options(20)
        .l4_len(28)
        .build();
    l.passes_uncounted(&cut, "options cut short");
}

#[test]
fn padding_after_the_packet_is_not_read_as_the_packet() {
    let mut l = load(ONE_CONNECTOR);
    // A SYN padded to a minimum Ethernet frame and more is still judged by
    // its own headers.
    l.judged(
        &Segment::syn(v4(1), 40000, SERVER, 25).padding(30),
        "a padded IPv4 SYN",
    );
    l.judged(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25).padding(30),
        "a padded IPv6 SYN",
    );
    // An IP length that stops inside the TCP header, with the rest of a SYN
    // in the padding: malformed for the kernel, nothing to judge.
    l.hold(v4(2), SERVER, 3);
    let mut short = Segment::syn(v4(2), 40000, SERVER, 25).build();
    short[16..18].copy_from_slice(&30u16.to_be_bytes());
    l.passes_uncounted(&short, "IP length short of the TCP header");
    // The tiny first fragment of RFC 1858, padded to 60 bytes with what
    // would read as a SYN's flags: judged by the IP length, it hides its
    // flags, and is dropped as unreadable.
    let tiny = Segment::syn(v4(3), 40000, SERVER, 25)
        .ipv4_fragment(0, true)
        .l4_len(8)
        .build();
    let mut padded = tiny.clone();
    padded.extend_from_slice(&[0, 0, 0, 0, 0x50, SYN, 0, 0, 0, 0, 0, 0]);
    l.unreadable(&padded, "a padded tiny fragment");
}

#[test]
fn vlan_tags_are_followed_and_deeper_stacks_dropped() {
    let mut l = load(ONE_CONNECTOR);
    l.judged(
        &Segment::syn(v4(1), 40000, SERVER, 25).tags(&[ETH_P_8021Q]),
        "802.1Q",
    );
    l.judged(
        &Segment::syn(v4(2), 40000, SERVER, 25).tags(&[ETH_P_8021AD, ETH_P_8021Q]),
        "QinQ",
    );
    l.judged(
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25).tags(&[ETH_P_8021Q]),
        "IPv6 over 802.1Q",
    );
    // The kernel strips nested priority tags one after the other: four
    // tags are followed, more are dropped (whatever they carry).
    l.judged(
        &Segment::syn(v4(3), 40000, SERVER, 25).tags(&[ETH_P_8021Q; 4]),
        "four tags",
    );
    l.unreadable(
        &Segment::syn(v4(4), 40000, SERVER, 25)
            .tags(&[ETH_P_8021Q; 5])
            .build(),
        "five tags",
    );
}

#[test]
fn ipv6_extension_headers_are_followed_and_longer_chains_dropped() {
    let mut l = load(ONE_CONNECTOR);
    let src = |n: u16| Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 7);
    l.judged(
        &Segment::syn(src(1), 40000, SERVER6, 25).ipv6_extensions(&[IPV6_HOP_BY_HOP]),
        "hop-by-hop",
    );
    l.judged(
        &Segment::syn(src(2), 40000, SERVER6, 25).ipv6_extensions(&[
            IPV6_HOP_BY_HOP,
            IPV6_ROUTING,
            IPV6_DEST_OPTIONS,
        ]),
        "three extension headers",
    );
    l.judged(
        &Segment::syn(src(3), 40000, SERVER6, 25).ipv6_extensions(&[IPV6_AUTH]),
        "an authentication header",
    );
    l.judged(
        &Segment::syn(src(4), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_FRAGMENT])
            .ipv6_fragment(0, true),
        "a first fragment holding the TCP header",
    );
    l.judged(
        &Segment::syn(src(5), 40000, SERVER6, 25).ipv6_extensions(&[IPV6_DEST_OPTIONS; 8]),
        "eight extension headers",
    );
    l.hold(src(6), SERVER6, 3);
    l.passes_uncounted(
        &Segment::syn(src(6), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_FRAGMENT])
            .ipv6_fragment(10, false)
            .build(),
        "a later fragment",
    );
    l.unreadable(
        &Segment::syn(src(7), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_DEST_OPTIONS; 9])
            .build(),
        "nine extension headers",
    );
    l.unreadable(
        &Segment::syn(src(8), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_FRAGMENT])
            .ipv6_fragment(0, true)
            .tcp_options(12)
            .l4_len(24)
            .build(),
        "a first fragment that cuts the TCP options",
    );
}

#[test]
fn ipv4_fragments_never_carry_an_unjudged_syn() {
    let mut l = load(ONE_CONNECTOR);
    l.judged(
        &Segment::syn(v4(1), 40000, SERVER, 25).ipv4_fragment(0, true),
        "a first fragment holding the TCP header",
    );
    l.hold(v4(2), SERVER, 3);
    l.passes_uncounted(
        &Segment::syn(v4(2), 40000, SERVER, 25)
            .ipv4_fragment(3, false)
            .build(),
        "a later fragment",
    );
    // RFC 1858: a first fragment too short for the TCP header could hide a
    // SYN; to a bound port it is dropped.
    l.unreadable(
        &Segment::syn(v4(3), 40000, SERVER, 25)
            .ipv4_fragment(0, true)
            .l4_len(8)
            .build(),
        "a tiny first fragment",
    );
    // The same with the TCP options running past the first fragment.
    l.unreadable(
        &Segment::syn(v4(4), 40000, SERVER, 25)
            .ipv4_fragment(0, true)
            .tcp_options(20)
            .l4_len(24)
            .build(),
        "a first fragment that cuts the TCP options",
    );
    l.passes_uncounted(
        &Segment::syn(v4(5), 40000, SERVER, 443)
            .ipv4_fragment(0, true)
            .l4_len(8)
            .build(),
        "a tiny fragment to port 443",
    );
    // Fewer than 8 bytes in a first fragment: the kernel's reassembly drops
    // it.
    l.passes_uncounted(
        &Segment::syn(v4(6), 40000, SERVER, 25)
            .ipv4_fragment(0, true)
            .l4_len(4)
            .build(),
        "a first fragment of 4 bytes",
    );
}

#[test]
fn frames_cut_short_anywhere_pass_uncounted() {
    let mut l = load(ONE_CONNECTOR);
    l.hold(v4(1), SERVER, 3);
    l.hold(v6("2001:db8:1::7"), SERVER6, 3);
    let shapes = [
        Segment::syn(v4(1), 40000, SERVER, 25),
        Segment::syn(v4(1), 40000, SERVER, 25).ipv4_options(12),
        Segment::syn(v4(1), 40000, SERVER, 25).tags(&[ETH_P_8021AD, ETH_P_8021Q]),
        Segment::syn(v4(1), 40000, SERVER, 25).tcp_options(12),
        Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25),
        Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25)
            .ipv6_extensions(&[IPV6_HOP_BY_HOP, IPV6_FRAGMENT]),
    ];
    for shape in &shapes {
        let frame = shape.build();
        // Every length short of the whole packet, so every header boundary,
        // from the 14 bytes of an Ethernet header up: the IP length says
        // more than the frame holds, and the kernel drops it as truncated.
        for len in ETH_HLEN..frame.len() {
            l.passes_uncounted(&frame[..len], &format!("{shape:?} cut at {len}"));
        }
        // Whole, each is a SYN from a source at its cap.
        assert_eq!(l.run(&frame), XDP_DROP, "{shape:?}");
    }
}

#[test]
fn a_source_at_its_cap_is_refused_until_a_connection_closes() {
    let mut l = load(ONE_CONNECTOR);
    let held = l.hold(v4(1), SERVER, 3);
    assert_eq!(l.live(0), 3);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40100, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 1);
    // A refused SYN changes no count.
    assert_eq!(l.live(0), 3);
    assert_eq!(
        l.run(&Segment::syn(v4(2), 40000, SERVER, 25).build()),
        XDP_PASS
    );
    // A connection that closes frees its place, once.
    assert!(l.kernel.release_established(&held[0]).unwrap());
    assert!(
        !l.kernel.release_established(&held[0]).unwrap(),
        "released once only"
    );
    assert_eq!(l.live(0), 2);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40101, SERVER, 25).build()),
        XDP_PASS
    );
}

#[test]
fn total_and_percentage_rules_in_the_kernel() {
    let mut l = load(
        "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\n\
         max_inbound_connection = 10\nmax_inbound_connection_per_source = \"unlimited\"\n\
         max_inbound_connection_percentage_per_source = 50\n",
    );
    // One source alone: S <= ceil((10 - S) / 2) holds up to S = 3.
    l.hold(v4(1), SERVER, 3);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40000, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.counter(0, stat::REJECTED_PERCENTAGE), 1);
    // With 9 live, a new source meets ceil((10 - 10) / 2) = 0: refused by
    // the percentage (1021), not the total.
    for last in 2..=7 {
        l.hold(v4(last), SERVER, 1);
    }
    assert_eq!(l.live(0), 9);
    assert_eq!(
        l.run(&Segment::syn(v4(20), 40000, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.counter(0, stat::REJECTED_PERCENTAGE), 2);
    // With 10 live, the total (1009).
    l.hold(v4(8), SERVER, 1);
    assert_eq!(
        l.run(&Segment::syn(v4(21), 40000, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.counter(0, stat::REJECTED_TOTAL), 1);
}

#[test]
fn ipv6_sources_are_counted_per_prefix() {
    for (prefix, expect_same_source) in [(64, true), (128, false)] {
        let mut l = load(&format!("ipv6_prefix_length = {prefix}\n{ONE_CONNECTOR}"));
        // One connection each from ::1, ::2, ::3 of one /64, cap 3 per source.
        for host in 1..=3u16 {
            l.hold(
                Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, host),
                SERVER6,
                1,
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
            let before = l.stats();
            assert_eq!(
                l.run(&Segment::syn(remote, port, local, 25).build()),
                XDP_PASS
            );
            // The connector whose passed SYNs went up.
            let after = l.stats();
            let got = (0..5u32).find(|&c| {
                after.connectors[c as usize][stat::SYN_PASSED as usize]
                    > before.connectors[c as usize][stat::SYN_PASSED as usize]
            });
            assert_eq!(got, expected, "{remote} -> {local}");
            seen.insert(got);
        }
    }
    // Every connector was chosen somewhere.
    assert_eq!(seen.len(), 5, "{seen:?}");
}

#[test]
fn monitor_passes_every_syn_and_judges_at_completion() {
    let mut l = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 1\naction = \"monitor\"",
    ));
    l.hold(v4(1), SERVER, 2);
    for port in 0..4 {
        assert_eq!(
            l.run(&Segment::syn(v4(1), 40000 + port, SERVER, 25).build()),
            XDP_PASS
        );
    }
    // Nothing is refused or reported at the SYN: the sock_ops program
    // reports what it would refuse, once per connection (`enforce.rs`).
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 0);
    assert_eq!(l.counter(0, stat::SYN_PASSED), 4);
    assert!(l.reports().is_empty());
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
    let mut l = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 1\naction = \"reset\"",
    ));
    let shapes = [
        Segment::syn(v4(1), 40000, SERVER, 25),
        Segment::syn(v4(2), 40001, SERVER, 25).tags(&[ETH_P_8021Q]),
        Segment::syn(v6("2001:db8:1::7"), 40002, SERVER6, 25),
    ];
    for shape in &shapes {
        // Under the cap it passes; at it, it is answered.
        assert_eq!(l.run(&shape.build()), XDP_PASS);
        l.hold(shape.src, shape.dst, 1);
        let frame = shape.build();
        let (verdict, out) = run_out(&l, &frame);
        assert_eq!(verdict, XDP_TX, "{shape:?}");
        let reply = PacketHeaders::from_ethernet_slice(&out).expect("a valid frame");
        let link = reply.link.clone().unwrap().ethernet2().unwrap();
        assert_eq!(
            (link.source, link.destination),
            ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2])
        );
        assert_eq!(reply.link_exts.len(), shape.tags.len(), "VLAN tags kept");
        let Some(TransportHeader::Tcp(tcp)) = reply.transport.clone() else {
            panic!("no TCP in {reply:?}");
        };
        assert!(tcp.rst && tcp.ack && !tcp.syn, "{tcp:?}");
        assert_eq!((tcp.source_port, tcp.destination_port), (25, shape.sport));
        assert_eq!(
            (tcp.sequence_number, tcp.acknowledgment_number),
            (0, 0x1234_5679)
        );
        assert!(reply.payload.slice().is_empty());
        match reply.net.clone().unwrap() {
            NetHeaders::Ipv4(ip, _) => {
                let IpAddr::V4(client) = shape.src else {
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
fn interfaces_without_a_link_layer_are_judged_from_the_ip_header() {
    let mut l = load(ONE_CONNECTOR);
    l.judged_on(
        LinkLayer::None,
        &Segment::syn(v4(1), 40000, SERVER, 25),
        "IPv4 on wg0",
    );
    l.judged_on(
        LinkLayer::None,
        &Segment::syn(v6("2001:db8:1::7"), 40000, SERVER6, 25).ipv6_extensions(&[IPV6_HOP_BY_HOP]),
        "IPv6 on wg0",
    );
    // An Ethernet frame there is no IP packet: it passes.
    l.passes_uncounted_on(
        LinkLayer::None,
        &Segment::syn(v4(1), 40000, SERVER, 25).build(),
        "an Ethernet frame on wg0",
    );
    // The reset action cannot answer in place without a link layer: it
    // drops.
    let mut r = load(&ONE_CONNECTOR.replace(
        "max_inbound_connection_per_source = 3",
        "max_inbound_connection_per_source = 1\naction = \"reset\"",
    ));
    r.hold(v4(1), SERVER, 1);
    assert_eq!(
        r.run_on(
            LinkLayer::None,
            &Segment::syn(v4(1), 40000, SERVER, 25).build_l3()
        ),
        XDP_DROP
    );
}

#[test]
fn idle_sources_are_forgotten_only_when_idle_at_that_moment() {
    let mut l = load(ONE_CONNECTOR);
    let held = l.hold(v4(1), SERVER, 1);
    let key = SourceKey {
        connector: 0,
        addr: to_addr(v4(1).into()),
    };
    let forget = |l: &mut Loaded, idle_ms| {
        l.kernel
            .forget_source(&key, std::time::Duration::from_millis(idle_ms), false)
            .unwrap()
    };
    // It holds a connection: kept, however long it has been.
    assert!(!forget(&mut l, 0));
    assert!(l.kernel.release_established(&held[0]).unwrap());
    // Idle now, but not for a minute yet: kept.
    assert!(!forget(&mut l, 60_000));
    assert_eq!(l.kernel.sources().len(), 1);
    // Idle long enough: gone; a connection counted after is counted afresh.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(forget(&mut l, 10));
    assert!(l.kernel.sources().is_empty());
    assert!(!forget(&mut l, 10), "forgotten once only");
    l.hold(v4(1), SERVER, 3);
    assert_eq!(l.kernel.source_live(&key), 3);
    assert_eq!(
        l.run(&Segment::syn(v4(1), 40000, SERVER, 25).build()),
        XDP_DROP
    );
}

/// The refusal cache is per CPU: its tests keep their thread on one.
fn on_one_cpu() {
    limiter_tests::floodlab::pin(0, 0);
}

impl Loaded {
    /// This CPU's cached refusals (see `on_one_cpu`).
    fn cached(&self) -> Vec<CachedRefusal> {
        self.kernel
            .cached_refusals()
            .into_iter()
            .filter(|(cpu, _, _)| *cpu == 0)
            .map(|(_, _, entry)| entry)
            .collect()
    }

    /// Refusals counted into the cache since its last exact judgement.
    fn held_by_cache(&self) -> u32 {
        self.cached()
            .iter()
            .map(|e| refusals::gate_count(e.gate))
            .sum()
    }

    /// The refusal cache key of a SYN from `source` to `SERVER:25`.
    fn refusal_key(&self, source: Ipv4Addr) -> refusals::RefusalKey {
        let prefix = self.kernel.current_settings().unwrap().refusal_prefix_len;
        let flow = FlowKey::from_words(
            addr::to_words(&to_addr(SERVER.into())),
            addr::to_words(&to_addr(source.into())),
            25,
            1,
        );
        refusals::RefusalKey::of(&flow, prefix)
    }

    /// `N` sources whose keys share one set of the cache.
    fn sources_sharing_a_set<const N: usize>(&self) -> [Ipv4Addr; N] {
        let mut by_set: std::collections::HashMap<u32, Vec<Ipv4Addr>> = Default::default();
        (0..100_000u32)
            .map(|i| Ipv4Addr::from(0x0b00_0000 + i))
            .find_map(|source| {
                let set = by_set
                    .entry(self.refusal_key(source).first_slot())
                    .or_default();
                set.push(source);
                set.clone().try_into().ok()
            })
            .expect("keys sharing a set")
    }

    /// Whether this CPU marks the set of `source`'s key as holding a
    /// refusal that may still stand.
    fn set_marked(&self, source: Ipv4Addr) -> bool {
        let first = self.refusal_key(source).first_slot();
        self.kernel
            .refusal_sets_used()
            .unwrap()
            .contains(&(0, first))
    }
}

const CAP_ONE: &str = "[[connector]]\nname = \"Frontend\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
     max_inbound_connection = 1000\nmax_inbound_connection_per_source = 1\n\
     max_inbound_connection_percentage_per_source = 100\n";

#[test]
fn a_flood_is_refused_from_the_cache_until_its_source_releases() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    let held = l.hold(v4(7), SERVER, 1);
    let syn = |port: u16| Segment::syn(v4(7), port, SERVER, 25).build();
    assert_eq!(l.run(&syn(5000)), XDP_DROP);
    assert_eq!(
        (l.cached().len(), l.held_by_cache()),
        (1, 0),
        "judged exactly"
    );
    // The rest of the flood, from other ports of the same source: from the
    // cache, counted as rejections all the same.
    for port in 5001..5011 {
        assert_eq!(l.run(&syn(port)), XDP_DROP);
    }
    assert_eq!(l.held_by_cache(), 10);
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 11);
    // Its connection closes: the very next SYN is judged on the counts.
    assert!(l.kernel.release_established(&held[0]).unwrap());
    assert_eq!(l.run(&syn(6000)), XDP_PASS);
    // At its cap again: judged exactly (a count that grows leaves nothing
    // cached that would admit), and its report carries the ten the cache
    // held: one report through the source's gate, or held by the gate.
    l.hold(v4(7), SERVER, 1);
    l.reports();
    assert_eq!(l.run(&syn(6001)), XDP_DROP);
    assert_eq!(l.held_by_cache(), 0);
    let source = SourceKey::from_words(0, addr::to_words(&to_addr(v4(7).into())));
    let reported: u32 = l.reports().iter().map(|r| r.folded + 1).sum();
    let held_by_gate = l.kernel.collect_unreported(gate::SOURCE, &source).unwrap();
    assert_eq!(reported + held_by_gate, 11);
}

#[test]
fn a_release_elsewhere_undoes_a_cached_total_refusal_and_not_a_per_source_one() {
    on_one_cpu();
    let mut l = load(
        "[[connector]]\nname = \"F\"\nbindings = [\"0.0.0.0:25\"]\n\
         max_inbound_connection = 4\nmax_inbound_connection_per_source = 2\n\
         max_inbound_connection_percentage_per_source = 100\n",
    );
    let own = addr::to_words(&to_addr(v4(1).into()));
    let held_by = |l: &Loaded, remote| {
        l.cached()
            .into_iter()
            .find(|e| e.remote == remote)
            .map(|e| refusals::gate_count(e.gate))
    };
    // v4(1) at its own cap, the total not reached: refused by its own
    // limit, then from the cache.
    l.hold(v4(1), SERVER, 2);
    let others = l.hold(v4(2), SERVER, 1);
    for port in 7000..7003 {
        let syn = Segment::syn(v4(1), port, SERVER, 25).build();
        assert_eq!(l.run(&syn), XDP_DROP);
    }
    assert_eq!(held_by(&l, own), Some(2));
    // Another source's connection closes: that changes nothing for v4(1),
    // still refused from the cache.
    assert!(l.kernel.release_established(&others[0]).unwrap());
    let syn = Segment::syn(v4(1), 7100, SERVER, 25).build();
    assert_eq!(l.run(&syn), XDP_DROP);
    assert_eq!(held_by(&l, own), Some(3));
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 4);

    // The total reached: v4(4) is refused by it, then from the cache.
    let others = l.hold(v4(2), SERVER, 1);
    l.hold(v4(3), SERVER, 1);
    for port in 7200..7202 {
        let syn = Segment::syn(v4(4), port, SERVER, 25).build();
        assert_eq!(l.run(&syn), XDP_DROP);
    }
    let fourth = addr::to_words(&to_addr(v4(4).into()));
    assert_eq!(held_by(&l, fourth), Some(1));
    assert_eq!(l.counter(0, stat::REJECTED_TOTAL), 2);
    // Another source's connection closes: the next SYN is judged again,
    // and admitted.
    assert!(l.kernel.release_established(&others[0]).unwrap());
    assert_eq!(
        l.run(&Segment::syn(v4(4), 7300, SERVER, 25).build()),
        XDP_PASS
    );
}

#[test]
fn a_configuration_change_undoes_every_cached_refusal() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    l.hold(v4(9), SERVER, 1);
    for port in 8000..8003 {
        assert_eq!(
            l.run(&Segment::syn(v4(9), port, SERVER, 25).build()),
            XDP_DROP
        );
    }
    assert_eq!(l.held_by_cache(), 2);
    let more = CAP_ONE.replace("connection_per_source = 1\n", "connection_per_source = 2\n");
    let config = Config::parse(&more, "t.toml").unwrap();
    let table = SelectionTable::build(&config);
    l.kernel.install(&config, &[0], &table).unwrap();
    assert_eq!(
        l.run(&Segment::syn(v4(9), 8100, SERVER, 25).build()),
        XDP_PASS
    );
}

#[test]
fn an_ipv6_flood_varying_its_host_bits_is_refused_from_the_cache() {
    on_one_cpu();
    let mut l = load(&format!("ipv6_prefix_length = 64\n{CAP_ONE}"));
    l.hold(v6("2001:db8:7:7::1"), SERVER6, 1);
    for host in 2..=41u16 {
        let remote = Ipv6Addr::new(0x2001, 0xdb8, 7, 7, host, 0, 0, host);
        assert_eq!(
            l.run(&Segment::syn(remote, 9000 + host, SERVER6, 25).build()),
            XDP_DROP
        );
    }
    assert_eq!(l.cached().len(), 1, "one /64, one entry");
    assert_eq!(l.held_by_cache(), 39);

    // A remote range narrower than the source prefix decides connectors by
    // the host bits: then they are part of the key.
    let mut l = load(&format!(
        "ipv6_prefix_length = 64\n{CAP_ONE}\
         [[connector]]\nname = \"One host\"\nbindings = [\"[::]:25\"]\n\
         remote_ip_ranges = [\"2001:db8:7:7::99/128\"]\nmax_inbound_connection_per_source = 1\n"
    ));
    l.hold(v6("2001:db8:7:7::1"), SERVER6, 1);
    for host in 2..=5u16 {
        let remote = Ipv6Addr::new(0x2001, 0xdb8, 7, 7, 0, 0, 0, host);
        assert_eq!(
            l.run(&Segment::syn(remote, 9000 + host, SERVER6, 25).build()),
            XDP_DROP
        );
    }
    assert_eq!(l.cached().len(), 4, "a key per host");
    // The host the narrow range names has its own connector and cap.
    assert_eq!(
        l.run(&Segment::syn(v6("2001:db8:7:7::99"), 9999, SERVER6, 25).build()),
        XDP_PASS
    );
}

#[test]
fn the_sweep_reports_what_the_cache_counted_once() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    l.hold(v4(11), SERVER, 1);
    for port in 9100..9106 {
        assert_eq!(
            l.run(&Segment::syn(v4(11), port, SERVER, 25).build()),
            XDP_DROP
        );
    }
    l.reports();
    assert_eq!(l.held_by_cache(), 5);
    // The first sweep claims, the second (its CPU idle since) takes and
    // reports: one report standing for the five.
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 0);
    assert!(l.reports().is_empty());
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 5);
    let reports = l.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0];
    assert_eq!(
        (
            report.folded,
            report.gate,
            report.rule,
            from_addr(&report.remote),
            report.local_port,
        ),
        (
            4,
            gate::NONE,
            Rule::PerSource as u32,
            IpAddr::from(v4(11)),
            25
        )
    );
    assert_eq!(l.held_by_cache(), 0);
    assert_eq!(
        l.kernel.sweep_refusals(usize::MAX).unwrap(),
        0,
        "taken once"
    );
    // A claimed entry its CPU touches again is the CPU's to report: the
    // next SYN is judged exactly and carries what the entry held.
    for port in 9200..9203 {
        l.run(&Segment::syn(v4(11), port, SERVER, 25).build());
    }
    assert_eq!(l.held_by_cache(), 3);
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 0, "claimed");
    assert_eq!(
        l.run(&Segment::syn(v4(11), 9300, SERVER, 25).build()),
        XDP_DROP
    );
    assert_eq!(l.held_by_cache(), 0, "taken by the exact judgement");
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 0);
    assert_eq!(
        l.kernel.sweep_refusals(usize::MAX).unwrap(),
        0,
        "nothing twice"
    );
}

#[test]
fn a_full_ring_keeps_what_the_sweep_could_not_report() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    // Fill the event ring: one report each from 2,400 sources at their cap.
    for i in 0..2_400u32 {
        let source = Ipv4Addr::from(0x0a00_0000 + i);
        l.hold(source, SERVER, 1);
        l.run(&Segment::syn(source, 5000, SERVER, 25).build());
    }
    assert!(l.global(stat::EVENTS_LOST) > 0, "the ring is full");
    l.hold(v4(12), SERVER, 1);
    for port in 9400..9405 {
        l.run(&Segment::syn(v4(12), port, SERVER, 25).build());
    }
    assert_eq!(l.held_by_cache(), 4);
    // Claimed, then taken: the report finds the ring full, and the four go
    // back, claimed, for the next sweep.
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 0);
    assert_eq!(l.kernel.sweep_refusals(usize::MAX).unwrap(), 0);
    assert!(l.held_by_cache() >= 4, "{}", l.held_by_cache());
    let held = l.held_by_cache();
    l.reports();
    assert_eq!(
        l.kernel.sweep_refusals(usize::MAX).unwrap(),
        u64::from(held)
    );
    let reports = l.reports();
    assert_eq!(reports.iter().map(|r| r.folded + 1).sum::<u32>(), held);
    assert!(reports.iter().all(|r| r.repeat == 1));
}

#[test]
fn refusals_no_report_carries_are_never_evicted() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    // Three sources whose keys share a set of the cache (two slots).
    let [a, b, c] = l.sources_sharing_a_set();
    for source in [a, b, c] {
        l.hold(source, SERVER, 1);
    }
    let refuse = |l: &Loaded, source: Ipv4Addr, port: u16| {
        assert_eq!(
            l.run(&Segment::syn(source, port, SERVER, 25).build()),
            XDP_DROP
        )
    };
    let held_by = |l: &Loaded, source: Ipv4Addr| {
        l.cached()
            .into_iter()
            .find(|e| e.remote == l.refusal_key(source).remote)
            .map(|e| refusals::gate_count(e.gate))
    };
    // a holds two unreported refusals, b none: c takes b's slot.
    for port in 1..=3 {
        refuse(&l, a, port);
    }
    refuse(&l, b, 1);
    refuse(&l, c, 1);
    assert_eq!(
        (held_by(&l, a), held_by(&l, b), held_by(&l, c)),
        (Some(2), None, Some(0))
    );
    // Now both slots hold refusals no report carries: b is judged exactly
    // each time, and remembered nowhere.
    refuse(&l, c, 2);
    refuse(&l, b, 2);
    refuse(&l, b, 3);
    assert_eq!(
        (held_by(&l, a), held_by(&l, b), held_by(&l, c)),
        (Some(2), None, Some(1))
    );
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 8);
}

#[test]
fn a_set_whose_refusals_no_longer_stand_is_skipped_until_the_next_refusal() {
    on_one_cpu();
    let mut l = load(CAP_ONE);
    let [a, b, c] = l.sources_sharing_a_set();
    let syn = |source: Ipv4Addr, port: u16| Segment::syn(source, port, SERVER, 25).build();
    assert!(!l.set_marked(a), "nothing refused yet");
    // c is refused, into the set's first slot, then its connection closes:
    // that refusal no longer stands.
    let held_by_c = l.hold(c, SERVER, 1);
    assert_eq!(l.run(&syn(c, 1)), XDP_DROP);
    assert!(l.set_marked(a));
    assert!(l.kernel.release_established(&held_by_c[0]).unwrap());
    // a is refused, into the second slot.
    let held_by_a = l.hold(a, SERVER, 1);
    assert_eq!(l.run(&syn(a, 1)), XDP_DROP);
    let slot_of_a = l
        .kernel
        .cached_refusals()
        .into_iter()
        .find(|(cpu, _, e)| *cpu == 0 && e.remote == l.refusal_key(a).remote)
        .map(|(_, slot, _)| slot);
    assert_eq!(slot_of_a, Some(l.refusal_key(a).first_slot() + 1));
    // b's SYN misses in the set while a's refusal stands: still marked.
    assert_eq!(l.run(&syn(b, 1)), XDP_PASS);
    assert!(l.set_marked(a), "a's refusal stands");
    // a's connection closes: no refusal of the set stands, and the next
    // miss in it unmarks it.
    assert!(l.kernel.release_established(&held_by_a[0]).unwrap());
    assert_eq!(l.run(&syn(b, 2)), XDP_PASS);
    assert!(!l.set_marked(a), "nothing in the set stands");
    // a at its cap again: judged exactly into the slot it had, the set
    // marked again, and the rest of its flood refused from the cache.
    l.hold(a, SERVER, 1);
    assert_eq!(l.run(&syn(a, 2)), XDP_DROP);
    assert!(l.set_marked(a));
    for port in 3..6 {
        assert_eq!(l.run(&syn(a, port)), XDP_DROP);
    }
    assert_eq!(l.held_by_cache(), 3);
    assert_eq!(l.counter(0, stat::REJECTED_PER_SOURCE), 6);
}

#[test]
fn an_adopting_daemon_keys_the_cache_by_the_ranges_it_finds() {
    let fs = limiter_tests::bpffs::BpfFs::new();
    let pins = limiter::kernel::pins::PinDir::open(fs.path()).unwrap();
    let config = Config::parse(
        &format!(
            "ipv6_prefix_length = 64\n{CAP_ONE}\
             [[connector]]\nname = \"One host\"\nbindings = [\"[::]:25\"]\n\
             remote_ip_ranges = [\"2001:db8:7:7::/120\"]\n"
        ),
        "t.toml",
    )
    .unwrap();
    let sizes = TableSizes {
        sources: 4096,
        established: 4096,
    };
    let table = SelectionTable::build(&config);
    {
        let mut first = Kernel::load(sizes, Some(&pins)).unwrap();
        first.set_settings(&config, 0).unwrap();
        first.install(&config, &[0, 1], &table).unwrap();
        assert_eq!(first.current_settings().unwrap().refusal_prefix_len, 120);
    }
    // The next daemon adopts the maps, and writes its settings before it
    // installs its tables: the ranges it found count already.
    let mut next = Kernel::load(sizes, Some(&pins)).unwrap();
    assert!(next.adopted());
    let before = next.current_settings().unwrap().generation;
    next.set_settings(&config, 0).unwrap();
    let settings = next.current_settings().unwrap();
    assert_eq!(settings.refusal_prefix_len, 120);
    assert_eq!(
        settings.generation,
        before + 2,
        "odd while written, then even"
    );
    assert!(refusals::generation_is_stable(settings.generation));
    drop(next);
    let _ = pins.remove();
}
