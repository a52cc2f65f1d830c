//! The benchmark's flood lab, briefly, so that `cargo xtask bench` is known
//! to work (its figures are for `cargo xtask bench`, never asserted here).

use std::{net::Ipv4Addr, sync::Mutex, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use limiter::baseline::Baseline;
use limiter_common::{maps::stat, refusals::RefusalKey};
use limiter_tests::{
    bench::{self, Gauge, Subject},
    floodlab::{FloodLab, SERVER, flood_source},
    frames::Segment,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// One test at a time: each pins its generator and the server's receive
/// path to the same two cores, and loads tables of 2^20 entries (a third
/// of a second in the kernel). Once in CI, a flood running beside the
/// other test got 257 frames through in 300 ms: its receive path had no
/// core, the veth's ring of 256 filled, and the rest was dropped.
static ONE_FLOOD: Mutex<()> = Mutex::new(());

#[test]
fn a_short_flood_reaches_every_subject() {
    let _one = ONE_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    let mut generator = Baseline::load().expect("the generator");
    for subject in Subject::ALL {
        let mut gauge = |gauge| {
            bench::measure(
                subject,
                256,
                Duration::from_millis(300),
                gauge,
                &mut generator,
            )
        };
        let pps = gauge(Gauge::HighestRate);
        assert!(pps > 1000.0, "{}: {pps} packets a second", subject.name());
        // The kernel's run-time statistics of the subject's program.
        if subject.has_xdp_program() {
            let ns = gauge(Gauge::ProgramTime);
            assert!(
                ns.is_finite() && ns > 0.0,
                "{}: {ns} ns a packet in its program",
                subject.name()
            );
        }
    }
}

#[test]
fn the_limiter_under_the_flood_refuses_what_is_over_the_cap() {
    let _one = ONE_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    let mut generator = Baseline::load().expect("the generator");
    let lab = FloodLab::new();
    let installed = bench::install(&lab, Subject::Limiter, 256);
    let sent = lab.flood(&mut generator, 256, Duration::from_millis(300), None);
    let stats = installed.limiter().unwrap().stats().unwrap();
    let row = &stats.connectors[0];
    // The 256 sources hold their 20 each, and what got through of their
    // flood was refused, none of it passed.
    assert_eq!(row[stat::SEEDED as usize], 256 * 20);
    let rejected = row[stat::REJECTED_PER_SOURCE as usize];
    assert!(rejected > 0 && rejected <= sent, "{stats:?}");
    assert_eq!(row[stat::SYN_PASSED as usize], 0, "{stats:?}");
}

/// With `the_limiter_under_the_flood_refuses_what_is_over_the_cap`, which
/// finds the flood's sources to be `flood_source(0..256)`, this shows that
/// `cache_drop` refuses the flood's SYNs from its cache.
#[test]
fn cache_drop_drops_the_syns_of_the_sources_at_their_caps_and_no_other() {
    let _one = ONE_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    let lab = FloodLab::new();
    let installed = bench::install(&lab, Subject::CacheDrop, 256);
    let program = installed.xdp_program().expect("cache_drop");
    let verdict = |source: Ipv4Addr| {
        let frame = Segment::syn(source, 1000, SERVER, 25).build();
        program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    };
    for i in 0..256 {
        assert_eq!(verdict(flood_source(i)), XDP_DROP, "source {i}, at its cap");
    }
    assert_eq!(
        verdict(flood_source(256)),
        XDP_PASS,
        "a source under its cap"
    );
    // A source whose key shares a set with one at its cap: told apart by
    // the whole key.
    let set = |source: Ipv4Addr| {
        RefusalKey::of(&bench::flow_to_25(source, 1000, SERVER), 128).first_slot()
    };
    let sets_at_cap: Vec<u32> = (0..256).map(|i| set(flood_source(i))).collect();
    let neighbour = (1..100_000u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i))
        .find(|&source| sets_at_cap.contains(&set(source)))
        .expect("a source sharing a set");
    assert_eq!(verdict(neighbour), XDP_PASS, "{neighbour} shares a set");
}

#[test]
fn with_action_reply_the_flood_gets_a_few_replies_a_second_per_source() {
    let _one = ONE_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    let mut generator = Baseline::load().expect("the generator");
    let lab = FloodLab::new();
    let installed = bench::install(&lab, Subject::LimiterReply, 256);
    let sent = lab.flood(&mut generator, 256, Duration::from_millis(300), None);
    let stats = installed.limiter().unwrap().stats().unwrap();
    let row = &stats.connectors[0];
    let rejected = row[stat::REJECTED_PER_SOURCE as usize];
    let replied = row[stat::REPLIED as usize];
    let gated = row[stat::REPLY_GATED as usize];
    assert!(rejected > 0 && rejected <= sent, "{stats:?}");
    // Every refusal is answered or dropped; at most 4 a second for each
    // source on each CPU (its cache set is its own, or shared).
    assert_eq!(replied + gated, rejected, "{stats:?}");
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(replied <= 256 * 4 * cpus, "{stats:?}");
    assert!(gated > 0, "{stats:?}");
}
