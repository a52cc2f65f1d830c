//! A million random and mutated frames through the loaded XDP program
//! (BPF_PROG_TEST_RUN), judged by an independent parser (etherparse): the
//! program never aborts, and only ever drops (or answers) a SYN to a bound
//! port, or a frame it is right not to read (more VLAN tags or IPv6
//! extension headers than it follows).

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpNumber, NetHeaders, PacketHeaders, TransportHeader};
use limiter::{
    config::Config,
    kernel::{Kernel, TableSizes},
    selection::SelectionTable,
};
use limiter_tests::frames::{
    ACK, ETH_P_8021AD, ETH_P_8021Q, FIN, IPV6_DEST_OPTIONS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, RST,
    SYN, Segment,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const FRAMES: u64 = 1_000_000;

/// Port 25 drops what is over the cap; port 587 answers it with a RST.
const CONFIG: &str = "\
[[connector]]\nname = \"Drop\"\nbindings = [\"0.0.0.0:25\", \"[::]:25\"]\n\
max_inbound_connection = 100\nmax_inbound_connection_per_source = 1\n\
[[connector]]\nname = \"Reset\"\nbindings = [\"0.0.0.0:587\", \"[::]:587\"]\n\
max_inbound_connection = 100\nmax_inbound_connection_per_source = 1\naction = \"reset\"\n";

/// xorshift64*: deterministic, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Whether the independent parser sees a SYN (or a first fragment that may
/// carry one) to a bound port; returns that port.
fn syn_to_bound_port(frame: &[u8]) -> Option<u16> {
    if too_deep(frame) {
        return Some(0);
    }
    // etherparse reads two VLAN tags at most: strip the others first.
    let untagged;
    let frame = match vlan_tags(frame) {
        tags if tags > 2 => {
            untagged = [&frame[..12], &frame[12 + 4 * tags..]].concat();
            &untagged[..]
        }
        _ => frame,
    };
    let Ok(headers) = PacketHeaders::from_ethernet_slice(frame) else {
        return repeated_ipv6_options_syn(frame);
    };
    let bound = |port: u16| (port == 25 || port == 587).then_some(port);
    if let Some(TransportHeader::Tcp(tcp)) = &headers.transport {
        return (tcp.syn && !tcp.ack && !tcp.rst && !tcp.fin)
            .then_some(tcp.destination_port)
            .and_then(bound);
    }
    // A first fragment: the transport header is not parsed, but its ports
    // are at the start of the payload (RFC 1858's tiny fragments).
    let tcp_fragment = match &headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            ip.protocol == IpNumber::TCP && ip.more_fragments && ip.fragment_offset.value() == 0
        }
        Some(NetHeaders::Ipv6(_, extensions)) => extensions
            .fragment
            .as_ref()
            .is_some_and(|f| f.more_fragments && f.fragment_offset.value() == 0),
        _ => false,
    };
    let payload = headers.payload.slice();
    if tcp_fragment && payload.len() >= 4 {
        return bound(u16::from_be_bytes([payload[2], payload[3]]));
    }
    // etherparse stops at a repeated destination options header without
    // calling it an error.
    repeated_ipv6_options_syn(frame)
}

/// How many VLAN tags a frame starts with.
fn vlan_tags(frame: &[u8]) -> usize {
    let mut tags = 0;
    while let (Some(a), Some(b)) = (frame.get(12 + 4 * tags), frame.get(13 + 4 * tags)) {
        let tpid = u16::from_be_bytes([*a, *b]);
        if tpid != 0x8100 && tpid != 0x88a8 {
            break;
        }
        tags += 1;
    }
    tags
}

/// Whether a frame has more VLAN tags (5) or IPv6 extension headers (9)
/// than the program follows: it drops those, whatever they carry.
fn too_deep(frame: &[u8]) -> bool {
    let tags = vlan_tags(frame);
    if tags > 4 {
        return true;
    }
    let at = 12 + 4 * tags;
    let ipv6 = frame.get(at..at + 2) == Some(&[0x86, 0xdd][..]);
    let Some(header) = frame.get(at + 2..at + 42).filter(|_| ipv6) else {
        return false;
    };
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let end = at + 42 + payload_len;
    if header[0] >> 4 != 6 || end > frame.len() {
        return false;
    }
    let (mut next, mut at, mut seen) = (header[6], at + 42, 0);
    while matches!(next, 0 | 43 | 44 | 51 | 60) {
        if seen == 8 {
            return true;
        }
        let Some(ext) = frame.get(at..at + 8).filter(|_| at + 8 <= end) else {
            return false;
        };
        if next == 0 && seen > 0 || next == 44 && u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
            return false;
        }
        at += match next {
            44 => 8,
            51 => (ext[1] as usize + 2) * 4,
            _ => (ext[1] as usize + 1) * 8,
        };
        next = ext[0];
        seen += 1;
    }
    false
}

/// etherparse refuses IPv6 chains that repeat the destination options
/// header, which RFC 8200 allows and Linux accepts, and authentication
/// headers shorter than RFC 4302's: a SYN behind them must be judged (or the
/// header would be a way around the limiter). This walks such a chain:
/// hop-by-hop first only, routing, destination options, authentication,
/// fragment; then a TCP SYN to a bound port, lengths consistent.
fn repeated_ipv6_options_syn(frame: &[u8]) -> Option<u16> {
    let at = 12 + 4 * vlan_tags(frame);
    if u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]) != 0x86dd {
        return None;
    }
    let ip = at + 2;
    let header = frame.get(ip..ip + 40)?;
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    if header[0] >> 4 != 6 || ip + 40 + payload_len > frame.len() {
        return None;
    }
    let mut next = header[6];
    let mut at = ip + 40;
    for index in 0.. {
        match next {
            6 => break,
            0 if index == 0 => {}
            43 | 60 => {}
            44 => {
                let fragment = frame.get(at..at + 8)?;
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    return None;
                }
                next = fragment[0];
                at += 8;
                continue;
            }
            // The authentication header counts its length in 4 bytes,
            // minus 2.
            51 => {
                let ext = frame.get(at..at + 2)?;
                next = ext[0];
                at += (ext[1] as usize + 2) * 4;
                continue;
            }
            _ => return None,
        }
        let ext = frame.get(at..at + 2)?;
        next = ext[0];
        at += (ext[1] as usize + 1) * 8;
    }
    let tcp = frame.get(at..at + 20)?;
    let header_len = (tcp[12] >> 4) as usize * 4;
    if at + header_len > ip + 40 + payload_len || header_len < 20 {
        return None;
    }
    let flags = tcp[13];
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    (flags & 0x17 == 0x02 && (port == 25 || port == 587)).then_some(port)
}

const CLIENT4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SERVER4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
const SERVER6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

fn seeds() -> Vec<Vec<u8>> {
    let (v4, v6, server4, server6) = (CLIENT4, CLIENT6, SERVER4, SERVER6);
    let mut out = Vec::new();
    for port in [25, 587, 80] {
        for flags in [SYN, SYN | ACK, ACK, RST, FIN | ACK, SYN | FIN] {
            out.push(Segment::syn(v4, 40000, server4, port).flags(flags).build());
            out.push(Segment::syn(v6, 40000, server6, port).flags(flags).build());
        }
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .ipv4_options(12)
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .tags(&[ETH_P_8021Q])
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .tags(&[ETH_P_8021AD, ETH_P_8021Q])
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .ipv4_fragment(0, true)
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .ipv4_fragment(0, true)
                .l4_len(8)
                .build(),
        );
        out.push(
            Segment::syn(v6, 40000, server6, port)
                .ipv6_extensions(&[IPV6_HOP_BY_HOP, IPV6_DEST_OPTIONS, IPV6_FRAGMENT])
                .ipv6_fragment(0, true)
                .build(),
        );
        // Shapes at the edges of what the program follows.
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .tags(&[ETH_P_8021Q; 4])
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .tags(&[ETH_P_8021Q; 5])
                .build(),
        );
        out.push(
            Segment::syn(v6, 40000, server6, port)
                .ipv6_extensions(&[IPV6_DEST_OPTIONS; 9])
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .tcp_options(20)
                .padding(20)
                .build(),
        );
        out.push(
            Segment::syn(v4, 40000, server4, port)
                .ipv4_fragment(0, true)
                .tcp_options(20)
                .l4_len(24)
                .build(),
        );
    }
    out
}

#[test]
fn a_million_frames_never_abort_and_never_drop_what_is_not_a_syn_to_a_bound_port() {
    let config = Config::parse(CONFIG, "fuzz.toml").unwrap();
    let mut kernel = Kernel::load(
        TableSizes {
            sources: 4096,
            established: 16,
        },
        None,
    )
    .expect("loading the programs (as root)");
    let table = SelectionTable::build(&config);
    kernel.set_settings(&config, 0).unwrap();
    kernel.install(&config, &[0, 1], &table).unwrap();
    // The seeds' sources hold a connection on each connector: at their cap,
    // their SYNs are refused.
    for (local, remote) in [
        (SERVER4.into(), CLIENT4.into()),
        (SERVER6.into(), CLIENT6.into()),
    ] {
        for port in [25, 587] {
            let flow = limiter_common::maps::FlowKey {
                local: limiter::selection::to_addr(local),
                remote: limiter::selection::to_addr(remote),
                local_port: port,
                remote_port: 1,
            };
            assert_eq!(
                kernel.seed(&flow).unwrap(),
                limiter_common::maps::control::DONE
            );
        }
    }
    let program = kernel.admit_program().unwrap();
    let seeds = seeds();
    // A fixed seed, so that CI is repeatable; LIMITER_FUZZ_SEED explores.
    let seed = std::env::var("LIMITER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut out = vec![0u8; 2048];
    let mut verdicts = [0u64; 5];
    for i in 0..FRAMES {
        let frame: Vec<u8> = match rng.below(10) {
            // Random bytes, random length.
            0 => {
                let len = 14 + rng.below(120) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            }
            // A seed cut short.
            1 => {
                let seed = &seeds[rng.below(seeds.len() as u64) as usize];
                seed[..14.max(rng.below(seed.len() as u64 + 1) as usize)].to_vec()
            }
            // A seed with a few bytes changed, and sometimes more bytes.
            _ => {
                let mut frame = seeds[rng.below(seeds.len() as u64) as usize].clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(frame.len() as u64) as usize;
                    let random = rng.next() as u8;
                    frame[at] = rng.pick(&[random, 0, 0xff, 0x02, 0x06, 0x45, 0x60]);
                }
                if rng.below(4) == 0 {
                    frame.extend((0..rng.below(40)).map(|_| rng.next() as u8));
                }
                // New source ports keep SYNs arriving as new connections.
                if let Some(byte) = frame.get_mut(34) {
                    *byte = rng.next() as u8;
                }
                frame
            }
        };
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        let verdict = result.return_value;
        assert_ne!(verdict, XDP_ABORTED, "frame {i} aborted: {frame:02x?}");
        verdicts[verdict.min(4) as usize] += 1;
        match verdict {
            XDP_PASS => {}
            XDP_DROP => assert!(
                syn_to_bound_port(&frame).is_some(),
                "frame {i} dropped, but it is no SYN to a bound port: {frame:02x?}"
            ),
            XDP_TX => {
                assert_eq!(
                    syn_to_bound_port(&frame),
                    Some(587),
                    "frame {i} answered, but it is no SYN to the reset connector: {frame:02x?}"
                );
                let reply = &out[..result.data_size_out as usize];
                let headers = PacketHeaders::from_ethernet_slice(reply).expect("a valid RST");
                let Some(TransportHeader::Tcp(tcp)) = headers.transport else {
                    panic!("frame {i}: the reply is not TCP: {reply:02x?}");
                };
                assert!(tcp.rst && tcp.ack && tcp.source_port == 587, "{tcp:?}");
            }
            other => panic!("frame {i}: verdict {other}"),
        }
    }
    println!("verdicts (aborted, drop, pass, tx): {:?}", &verdicts[..4]);
    // The run exercised every verdict that may happen.
    assert!(
        verdicts[XDP_DROP as usize] > 1000 && verdicts[XDP_TX as usize] > 1000,
        "{verdicts:?}"
    );
    assert!(verdicts[XDP_PASS as usize] > FRAMES / 2, "{verdicts:?}");
}
