//! The benchmark's flood lab, briefly, so that `cargo xtask bench` is known
//! to work (its figures are for `cargo xtask bench`, never asserted here).

use std::time::Duration;

use limiter::baseline::Baseline;
use limiter_common::maps::stat;
use limiter_tests::{
    bench::{self, Subject},
    floodlab::FloodLab,
};

#[test]
fn a_short_flood_reaches_every_subject() {
    let mut generator = Baseline::load().expect("the generator");
    for subject in Subject::ALL {
        let pps = bench::measure(
            subject,
            256,
            Duration::from_millis(300),
            None,
            &mut generator,
        );
        assert!(pps > 1000.0, "{}: {pps} packets a second", subject.name());
    }
}

#[test]
fn the_limiter_under_the_flood_refuses_what_is_over_the_cap() {
    let mut generator = Baseline::load().expect("the generator");
    let lab = FloodLab::new();
    let installed = bench::install(&lab, Subject::Limiter);
    let sent = lab.flood(&mut generator, 256, Duration::from_millis(300), None);
    let stats = installed.limiter().unwrap().stats().unwrap();
    let admitted = stats.connectors[0][stat::ADMITTED as usize];
    let rejected = stats.connectors[0][stat::REJECTED_PER_SOURCE as usize];
    // 20 per source are admitted, and the rest of what got through refused.
    assert_eq!(admitted, 256 * 20);
    assert!(rejected > 0 && admitted + rejected <= sent, "{stats:?}");
}
