//! Exchange's admission rule for a receive connector, in one place.
//!
//! The kernel calls [`evaluate`] twice for a connection: the XDP program on
//! the live counts when the SYN arrives (a SYN over a cap is refused there,
//! before the kernel spends anything on it), and the sock_ops program when
//! the handshake completes, which is the decision that counts: admitted, the
//! connection is counted; over a cap, it is reset. The daemon calls it for
//! `limiter explain` and `limiter sources`, so that what the operator is
//! told is exactly what the kernel does.
//!
//! # One decision across CPUs
//!
//! The rule reads two counts, the connector's and the source's, and a
//! connection admitted on one CPU must be seen by the next decision on
//! another: two handshakes of one source completing together must not both
//! pass a cap that only one of them fits. So the completion judges and
//! counts under the connector's lock (a `bpf_spin_lock` in its map entry):
//!
//! ```text
//! lock(connector); t = total; s = source; e = evaluate(t, s);
//! if e.admitted { total += 1; source += 1 }  (atomic adds)
//! unlock(connector)
//! ```
//!
//! Releases give counts back with atomic subtractions and no lock: a
//! decision that reads a count just before a release judges on more
//! connections than there are, never fewer. The tests below run every
//! interleaving of two and three decisions and a release, and check that
//! each outcome is one that some order of the same decisions, one at a
//! time, would give; they also show that without the lock (count first,
//! then judge on what the counts were) one source can pass the percentage
//! rule by one.

/// A limit that is not checked (`unlimited` in the config file).
pub const UNLIMITED: u32 = u32::MAX;

/// Largest `max_inbound_connection` Exchange accepts.
pub const MAX_INBOUND_CONNECTION_LIMIT: u32 = 2_147_483_647;
/// The default `connection_rate_time_unit`, in seconds: Postfix's
/// `anvil_rate_time_unit` (see `crate::rate`).
pub const DEFAULT_RATE_UNIT_SECS: u32 = 60;
/// Largest `max_inbound_connection_per_source` Exchange accepts.
pub const MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT: u32 = 10_000;

/// The limits of a receive connector: Exchange's three, and limiter's
/// connection rate per source (see `crate::rate`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `max_inbound_connection`, or [`UNLIMITED`].
    pub max_inbound_connection: u32,
    /// `max_inbound_connection_per_source`, or [`UNLIMITED`].
    pub max_inbound_connection_per_source: u32,
    /// `max_inbound_connection_percentage_per_source`, 1..=100.
    pub max_inbound_connection_percentage_per_source: u32,
    /// `max_inbound_connection_rate_per_source`: new connections a source
    /// may open per `connection_rate_time_unit`, or [`UNLIMITED`].
    pub max_inbound_connection_rate_per_source: u32,
    /// `connection_rate_time_unit`, in seconds.
    pub connection_rate_time_unit: u32,
}

impl Limits {
    /// Exchange's defaults: 5000 in total, 20 per source, 2 %; no rate
    /// limit (Exchange has none).
    pub const EXCHANGE_DEFAULT: Limits = Limits {
        max_inbound_connection: 5000,
        max_inbound_connection_per_source: 20,
        max_inbound_connection_percentage_per_source: 2,
        max_inbound_connection_rate_per_source: UNLIMITED,
        connection_rate_time_unit: DEFAULT_RATE_UNIT_SECS,
    };

    /// Exchange's three limits, with no rate limit.
    pub const fn exchange(max: u32, per_source: u32, percentage: u32) -> Limits {
        Limits {
            max_inbound_connection: max,
            max_inbound_connection_per_source: per_source,
            max_inbound_connection_percentage_per_source: percentage,
            max_inbound_connection_rate_per_source: UNLIMITED,
            connection_rate_time_unit: DEFAULT_RATE_UNIT_SECS,
        }
    }
}

/// Which limit decided. The discriminants are what the kernel stores.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// No limit applies to this connector.
    None = 0,
    /// `max_inbound_connection` (event 1009).
    Total = 1,
    /// `max_inbound_connection_per_source` (event 1021).
    PerSource = 2,
    /// `max_inbound_connection_percentage_per_source` (event 1021).
    Percentage = 3,
    /// `max_inbound_connection_rate_per_source`, limiter's own (event
    /// [`RATE_EVENT_ID`]).
    Rate = 4,
}

/// The event id of a rejection by the connection rate: Exchange has no such
/// limit, and none of its event ids is given another meaning.
pub const RATE_EVENT_ID: u32 = 61021;

impl Rule {
    /// The rule stored as `raw` by the kernel, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Rule> {
        match raw {
            0 => Some(Rule::None),
            1 => Some(Rule::Total),
            2 => Some(Rule::PerSource),
            3 => Some(Rule::Percentage),
            4 => Some(Rule::Rate),
            _ => None,
        }
    }

    /// The name used in JSON and in the config of the operator interface.
    pub const fn name(self) -> &'static str {
        match self {
            Rule::None => "none",
            Rule::Total => "total",
            Rule::PerSource => "per_source",
            Rule::Percentage => "percentage",
            Rule::Rate => "rate",
        }
    }

    /// The name for people: the Exchange parameter behind the rule.
    pub const fn exchange_name(self) -> &'static str {
        match self {
            Rule::None => "no limit",
            Rule::Total => "MaxInboundConnection",
            Rule::PerSource => "MaxInboundConnectionPerSource",
            Rule::Percentage => "MaxInboundConnectionPercentagePerSource",
            // Not Exchange's: named in its style.
            Rule::Rate => "MaxInboundConnectionRatePerSource",
        }
    }

    /// The rule of [`Rule::name`], if it is one.
    pub fn from_name(name: &str) -> Option<Rule> {
        [
            Rule::None,
            Rule::Total,
            Rule::PerSource,
            Rule::Percentage,
            Rule::Rate,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }

    /// The Exchange event id a rejection by this rule is reported as.
    pub const fn event_id(self) -> u32 {
        match self {
            Rule::Total => 1009,
            Rule::None | Rule::PerSource | Rule::Percentage => 1021,
            Rule::Rate => RATE_EVENT_ID,
        }
    }
}

/// The outcome of [`evaluate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// Whether the new connection is admitted.
    pub admitted: bool,
    /// When rejected, the first limit that failed in Exchange's order (total,
    /// per source, percentage). When admitted, the limit that is tightest now
    /// (ties in the same order), or [`Rule::None`] when none applies.
    pub rule: Rule,
    /// The most connections this source may hold, the new one included,
    /// under the limits as they stand now ([`UNLIMITED`] when none applies).
    /// The new connection is admitted exactly when the source's count with it
    /// is at most `cap`.
    pub cap: u32,
}

/// Applies Exchange's rule to one new connection.
///
/// `live_total` and `live_source` are the connector's live connections and
/// this source's live connections on it, before the new one. As in Exchange,
/// the new connection is counted first:
///
/// ```text
/// T = live_total + 1, S = live_source + 1
/// reject (1009) if max != unlimited and T > max
/// reject (1021) if per_source != unlimited and S > per_source
/// reject (1021) if pct < 100 and max != unlimited
///               and S > ceil((max - T) * pct / 100)
/// ```
#[inline(always)]
pub fn evaluate(limits: &Limits, live_total: u32, live_source: u32) -> Evaluation {
    let max = limits.max_inbound_connection;
    let per_source = limits.max_inbound_connection_per_source;
    let pct = limits.max_inbound_connection_percentage_per_source;
    let total_after = live_total as u64 + 1;
    let source_after = live_source as u64 + 1;

    // Each limit as a cap on the source's count; candidates in Exchange's
    // order, so that the first strict minimum is also the first check to fail.
    let mut rule = Rule::None;
    let mut cap = UNLIMITED as u64;
    if max != UNLIMITED {
        // T <= max  <=>  S <= live_source + (max - live_total)
        let total_cap = (live_source as u64 + max as u64).saturating_sub(live_total as u64);
        if total_cap < cap {
            cap = total_cap;
            rule = Rule::Total;
        }
    }
    if per_source != UNLIMITED && (per_source as u64) < cap {
        cap = per_source as u64;
        rule = Rule::PerSource;
    }
    if pct < 100 && max != UNLIMITED {
        let percentage_cap = percentage_cap(limits, live_total) as u64;
        if percentage_cap < cap {
            cap = percentage_cap;
            rule = Rule::Percentage;
        }
    }

    let admitted = admits(limits, live_total, live_source);
    if !admitted {
        // Exchange reports the first check that fails, which may be looser
        // than the tightest one (e.g. the total when both fail).
        rule = if max != UNLIMITED && total_after > max as u64 {
            Rule::Total
        } else if per_source != UNLIMITED && source_after > per_source as u64 {
            Rule::PerSource
        } else {
            Rule::Percentage
        };
    }
    Evaluation {
        admitted,
        rule,
        cap: if cap > UNLIMITED as u64 {
            UNLIMITED
        } else {
            cap as u32
        },
    }
}

/// Whether [`evaluate`] admits: the rule without its caps, and without a
/// division (the packet path runs it on every SYN it judges):
/// `S <= ceil(x / 100)` is `100 * (S - 1) < x`.
#[inline(always)]
pub fn admits(limits: &Limits, live_total: u32, live_source: u32) -> bool {
    let max = limits.max_inbound_connection;
    let per_source = limits.max_inbound_connection_per_source;
    let pct = limits.max_inbound_connection_percentage_per_source;
    let total_after = live_total as u64 + 1;
    if max != UNLIMITED && total_after > max as u64 {
        return false;
    }
    if per_source != UNLIMITED && live_source as u64 + 1 > per_source as u64 {
        return false;
    }
    if pct < 100 && max != UNLIMITED {
        let remaining = (max as u64).saturating_sub(total_after);
        return remaining * pct as u64 > 100 * live_source as u64;
    }
    true
}

/// Whether the rule admits a new connection whatever its source holds:
/// true when it would even if every live connection were that source's
/// (a refusal only grows with the source's count), so that the source's
/// count need not be looked up.
#[inline(always)]
pub fn admits_any_source(limits: &Limits, live_total: u32) -> bool {
    admits(limits, live_total, live_total)
}

/// The percentage rule's cap for a new connection on a connector with
/// `live_total` live connections: `ceil((max - T) * pct / 100)`, with
/// `T = live_total + 1` (0 when the total is already reached). Only
/// meaningful when the rule applies (`pct < 100`, `max` not unlimited).
#[inline(always)]
pub fn percentage_cap(limits: &Limits, live_total: u32) -> u32 {
    let total_after = live_total as u64 + 1;
    let remaining = (limits.max_inbound_connection as u64).saturating_sub(total_after);
    let pct = limits.max_inbound_connection_percentage_per_source as u64;
    // At most (2^31 - 1) * 100 / 100: fits.
    (remaining * pct).div_ceil(100) as u32
}

/// What a source can hold on a connector while the other sources' live
/// connections stay as they are: its own connections shrink what is left
/// for the percentage rule, so this is often below the cap its next
/// connection meets ("cap 60, can hold 59").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headroom {
    /// The most live connections the source can hold ([`UNLIMITED`] when no
    /// limit stops it).
    pub holds_at_most: u32,
    /// The rule that refuses the connection after those ([`Rule::None`]
    /// when nothing does).
    pub stopped_by: Rule,
}

impl Headroom {
    /// How many more connections the source can open now (0 when it already
    /// holds more, e.g. after a limit was lowered); [`UNLIMITED`] when no
    /// limit stops it.
    pub fn can_open(&self, live_source: u32) -> u32 {
        if self.holds_at_most == UNLIMITED {
            UNLIMITED
        } else {
            self.holds_at_most.saturating_sub(live_source)
        }
    }
}

/// The [`Headroom`] of a source with `live_source` of the connector's
/// `live_total` connections, found by asking [`evaluate`] itself (each rule
/// only tightens as the source's count grows, so a bisection finds the
/// first refusal). Not for the packet path.
pub fn headroom(limits: &Limits, live_total: u32, live_source: u32) -> Headroom {
    let others = live_total.saturating_sub(live_source);
    // Whether the source may hold `held` connections: whether its
    // `held`-th was admitted with the others live.
    let holds = |held: u32| held == 0 || admits(limits, others.saturating_add(held - 1), held - 1);
    let max = limits.max_inbound_connection;
    let per_source = limits.max_inbound_connection_per_source;
    let mut high = UNLIMITED;
    if max != UNLIMITED {
        high = high.min(max.saturating_sub(others));
    }
    if per_source != UNLIMITED {
        high = high.min(per_source);
    }
    if high == UNLIMITED {
        // Neither the total nor a per-source number: nothing stops it (the
        // percentage rule needs the total).
        return Headroom {
            holds_at_most: UNLIMITED,
            stopped_by: Rule::None,
        };
    }
    // holds(low) is true, holds(high + 1) false.
    let mut low = 0;
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if holds(middle) {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    Headroom {
        holds_at_most: low,
        stopped_by: evaluate(limits, others.saturating_add(low), low).rule,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn limits(max: u32, per_source: u32, pct: u32) -> Limits {
        Limits::exchange(max, per_source, pct)
    }

    /// Exchange's rule, written as plainly as the design states it.
    fn model(l: &Limits, live_total: u32, live_source: u32) -> (bool, Rule) {
        let t = live_total as i128 + 1;
        let s = live_source as i128 + 1;
        let max = l.max_inbound_connection;
        let per = l.max_inbound_connection_per_source;
        let pct = l.max_inbound_connection_percentage_per_source as i128;
        if max != UNLIMITED && t > max as i128 {
            return (false, Rule::Total);
        }
        if per != UNLIMITED && s > per as i128 {
            return (false, Rule::PerSource);
        }
        if pct < 100 && max != UNLIMITED {
            let num = (max as i128 - t) * pct;
            let ceil = (num + 99).div_euclid(100);
            if s > ceil {
                return (false, Rule::Percentage);
            }
        }
        (true, Rule::None)
    }

    /// How many connections one source ends up holding when it opens them one
    /// after the other, with `others` live connections from other sources.
    fn holds(l: &Limits, others: u32) -> u32 {
        let mut own = 0;
        while evaluate(l, others + own, own).admitted {
            own += 1;
        }
        own
    }

    #[test]
    fn seed_2000_live_first_connection_sees_60() {
        let l = limits(5000, 100, 2);
        let e = evaluate(&l, 2000, 0);
        assert!(e.admitted);
        assert_eq!(e.cap, 60);
        assert_eq!(e.rule, Rule::Percentage);
        assert_eq!(holds(&l, 2000), 59);
    }

    #[test]
    fn seed_unlimited_per_source_still_meets_two_percent() {
        let l = limits(5000, UNLIMITED, 2);
        let e = evaluate(&l, 0, 0);
        assert_eq!((e.rule, e.cap), (Rule::Percentage, 100));
        assert_eq!(holds(&l, 0), 99);
        let over = evaluate(&l, 99, 99);
        assert_eq!((over.admitted, over.rule), (false, Rule::Percentage));
        assert_eq!(over.rule.event_id(), 1021);
    }

    #[test]
    fn seed_per_source_20_binds_on_idle_default_connector() {
        let e = evaluate(&Limits::EXCHANGE_DEFAULT, 0, 0);
        assert_eq!((e.admitted, e.rule, e.cap), (true, Rule::PerSource, 20));
        assert_eq!(holds(&Limits::EXCHANGE_DEFAULT, 0), 20);
        let e = evaluate(&Limits::EXCHANGE_DEFAULT, 20, 20);
        assert_eq!((e.admitted, e.rule), (false, Rule::PerSource));
    }

    #[test]
    fn defaults_percentage_binds_from_about_4050_and_rejects_the_5000th() {
        let d = Limits::EXCHANGE_DEFAULT;
        // T = 4050: ceil(950 * 2 / 100) = 19 < 20.
        assert_eq!(evaluate(&d, 4048, 0).rule, Rule::PerSource);
        assert_eq!(evaluate(&d, 4049, 0).rule, Rule::Percentage);
        // The 5000th connection: T = 5000 is within the total, but the
        // percentage of nothing left is 0, so 1021, not 1009.
        let e = evaluate(&d, 4999, 0);
        assert_eq!((e.admitted, e.rule, e.cap), (false, Rule::Percentage, 0));
        assert_eq!(e.rule.event_id(), 1021);
        let e = evaluate(&d, 5000, 0);
        assert_eq!((e.admitted, e.rule), (false, Rule::Total));
        assert_eq!(e.rule.event_id(), 1009);
    }

    #[test]
    fn percentage_100_or_unlimited_total_skips_the_percentage() {
        let e = evaluate(&limits(10, UNLIMITED, 100), 3, 3);
        assert_eq!((e.admitted, e.rule, e.cap), (true, Rule::Total, 10));
        let e = evaluate(&limits(UNLIMITED, UNLIMITED, 2), 1_000_000, 500_000);
        assert_eq!((e.admitted, e.rule, e.cap), (true, Rule::None, UNLIMITED));
        let e = evaluate(&limits(UNLIMITED, 5, 2), 1_000_000, 4);
        assert_eq!((e.admitted, e.rule, e.cap), (true, Rule::PerSource, 5));
    }

    #[test]
    fn total_reported_first_when_several_fail() {
        let e = evaluate(&limits(10, 2, 50), 10, 5);
        assert_eq!((e.admitted, e.rule), (false, Rule::Total));
    }

    #[test]
    fn headroom_reads_the_seeds_cases_right() {
        // 2000 others live: the next connection meets 60, the source holds 59.
        let h = headroom(&limits(5000, 100, 2), 2000, 0);
        assert_eq!((h.holds_at_most, h.stopped_by), (59, Rule::Percentage));
        assert_eq!(h.can_open(0), 59);
        // The issue's lab: 40 / unlimited / 25 %: cap 10, stops at 8.
        let h = headroom(&limits(40, UNLIMITED, 25), 0, 0);
        assert_eq!((h.holds_at_most, h.stopped_by), (8, Rule::Percentage));
        assert_eq!(evaluate(&limits(40, UNLIMITED, 25), 0, 0).cap, 10);
        // Holding 8 of 8: nothing more, the same answer.
        let h = headroom(&limits(40, UNLIMITED, 25), 8, 8);
        assert_eq!((h.holds_at_most, h.can_open(8)), (8, 0));
        // A lowered limit: holding more than it allows opens nothing.
        let h = headroom(&limits(100, 5, 100), 10, 10);
        assert_eq!(
            (h.holds_at_most, h.stopped_by, h.can_open(10)),
            (5, Rule::PerSource, 0)
        );
        let h = headroom(&limits(UNLIMITED, UNLIMITED, 2), 7, 3);
        assert_eq!((h.holds_at_most, h.stopped_by), (UNLIMITED, Rule::None));
        assert_eq!(h.can_open(3), UNLIMITED);
        // The total, with others holding all of it.
        let h = headroom(&limits(10, UNLIMITED, 100), 10, 0);
        assert_eq!((h.holds_at_most, h.stopped_by), (0, Rule::Total));
    }

    fn any_limit(range: core::ops::RangeInclusive<u32>) -> impl Strategy<Value = u32> {
        prop_oneof![Just(UNLIMITED), range]
    }

    proptest! {
        #[test]
        fn agrees_with_the_plain_model(
            max in any_limit(1..=MAX_INBOUND_CONNECTION_LIMIT),
            per in any_limit(1..=MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT),
            pct in 1u32..=100,
            live_total in 0u32..=20_000,
            own in 0u32..=20_000,
        ) {
            let live_source = own.min(live_total);
            let l = limits(max, per, pct);
            let e = evaluate(&l, live_total, live_source);
            let (admitted, rule) = model(&l, live_total, live_source);
            prop_assert_eq!(e.admitted, admitted);
            if !admitted {
                prop_assert_eq!(e.rule, rule);
            }
            // The cap is exact: admitted exactly when the source's count
            // with the new connection is within it.
            prop_assert_eq!(e.admitted, e.cap == UNLIMITED || live_source < e.cap);
        }

        #[test]
        fn admitted_for_any_source_means_for_every_source(
            max in any_limit(1..=200),
            per in any_limit(1..=60),
            pct in 1u32..=100,
            live_total in 0u32..=220,
            own in 0u32..=220,
        ) {
            let l = limits(max, per, pct);
            if admits_any_source(&l, live_total) {
                prop_assert!(admits(&l, live_total, own.min(live_total)));
            }
        }

        /// The headroom is what connecting one after the other gets.
        #[test]
        fn headroom_is_what_connecting_one_by_one_gets(
            max in any_limit(1..=300),
            per in any_limit(1..=120),
            pct in 1u32..=100,
            live_total in 0u32..=320,
            own in 0u32..=320,
        ) {
            let l = limits(max, per, pct);
            let live_source = own.min(live_total);
            let others = live_total - live_source;
            let h = headroom(&l, live_total, live_source);
            if max == UNLIMITED && per == UNLIMITED {
                prop_assert_eq!(h.holds_at_most, UNLIMITED);
            } else {
                let held = holds(&l, others);
                prop_assert_eq!(h.holds_at_most, held);
                let next = evaluate(&l, others + held, held);
                prop_assert!(!next.admitted);
                prop_assert_eq!(h.stopped_by, next.rule);
            }
        }

        /// A refusal stays a refusal while counts only grow (a source's
        /// connections are also the connector's): the refusal cache relies
        /// on it (see `crate::refusals`).
        #[test]
        fn a_refusal_outlasts_any_growth_of_the_counts(
            max in any_limit(1..=200),
            per in any_limit(1..=60),
            pct in 1u32..=100,
            live_total in 0u32..=220,
            own in 0u32..=220,
            more_total in 0u32..=50,
            more_own in 0u32..=50,
        ) {
            let live_source = own.min(live_total);
            let more_source = more_own.min(more_total);
            let l = limits(max, per, pct);
            if !admits(&l, live_total, live_source) {
                prop_assert!(!admits(&l, live_total + more_total, live_source + more_source));
            }
        }

        #[test]
        fn small_limits_agree_with_the_model(
            max in any_limit(1..=50),
            per in any_limit(1..=50),
            pct in 1u32..=100,
            live_total in 0u32..=60,
            own in 0u32..=60,
        ) {
            let live_source = own.min(live_total);
            let l = limits(max, per, pct);
            let e = evaluate(&l, live_total, live_source);
            let (admitted, rule) = model(&l, live_total, live_source);
            prop_assert_eq!(e.admitted, admitted);
            if !admitted {
                prop_assert_eq!(e.rule, rule);
            } else {
                prop_assert!(e.cap == UNLIMITED || live_source < e.cap);
            }
        }
    }
}

/// Every interleaving of concurrent decisions, against the rule applied one
/// decision at a time (see "One decision across CPUs" above).
#[cfg(test)]
mod interleavings {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The shared counts: the connector's total and each source's count.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Counts {
        total: u32,
        sources: Vec<u32>,
    }

    /// What runs on one CPU: a connection of `source` being judged, or a
    /// connection of `source` being released.
    #[derive(Clone, Copy, Debug)]
    enum Actor {
        Decide { source: usize },
        Release { source: usize },
    }

    /// How a decision is made.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Protocol {
        /// The kernel's: judge and count under the connector's lock.
        Locked,
        /// Count first (fetch-and-add on each count), judge on the counts
        /// as they were, give back if refused: no lock.
        CountThenJudge,
    }

    /// One CPU's progress through its steps.
    #[derive(Clone, Debug, Default)]
    struct Cpu {
        step: usize,
        read_total: u32,
        read_source: u32,
        admitted: Option<bool>,
        /// Global step numbers of its first and last step.
        first: Option<usize>,
        last: Option<usize>,
    }

    fn steps(protocol: Protocol, actor: Actor) -> usize {
        match (protocol, actor) {
            // lock, read total, read source, judge (+ add total), add source, unlock
            (Protocol::Locked, Actor::Decide { .. }) => 6,
            // add total, add source, judge (+ give both back if refused)
            (Protocol::CountThenJudge, Actor::Decide { .. }) => 3,
            // subtract total, subtract source
            (_, Actor::Release { .. }) => 2,
        }
    }

    struct World {
        limits: Limits,
        protocol: Protocol,
        actors: Vec<Actor>,
        counts: Counts,
        lock: Option<usize>,
        cpus: Vec<Cpu>,
        clock: usize,
    }

    impl World {
        fn enabled(&self, cpu: usize) -> bool {
            let c = &self.cpus[cpu];
            if c.step == steps(self.protocol, self.actors[cpu]) {
                return false;
            }
            // The lock is the first step of a locked decision.
            !(self.protocol == Protocol::Locked
                && matches!(self.actors[cpu], Actor::Decide { .. })
                && c.step == 0
                && self.lock.is_some())
        }

        fn run(&mut self, cpu: usize) {
            let limits = self.limits;
            let actor = self.actors[cpu];
            let c = &mut self.cpus[cpu];
            c.first.get_or_insert(self.clock);
            c.last = Some(self.clock);
            self.clock += 1;
            let counts = &mut self.counts;
            match (self.protocol, actor, c.step) {
                (Protocol::Locked, Actor::Decide { .. }, 0) => self.lock = Some(cpu),
                (Protocol::Locked, Actor::Decide { .. }, 1) => c.read_total = counts.total,
                (Protocol::Locked, Actor::Decide { source }, 2) => {
                    c.read_source = counts.sources[source]
                }
                (Protocol::Locked, Actor::Decide { .. }, 3) => {
                    let admitted = evaluate(&limits, c.read_total, c.read_source).admitted;
                    c.admitted = Some(admitted);
                    if admitted {
                        counts.total += 1;
                    }
                }
                (Protocol::Locked, Actor::Decide { source }, 4) => {
                    if c.admitted == Some(true) {
                        counts.sources[source] += 1;
                    }
                }
                (Protocol::Locked, Actor::Decide { .. }, 5) => self.lock = None,
                (Protocol::CountThenJudge, Actor::Decide { .. }, 0) => {
                    c.read_total = counts.total;
                    counts.total += 1;
                }
                (Protocol::CountThenJudge, Actor::Decide { source }, 1) => {
                    c.read_source = counts.sources[source];
                    counts.sources[source] += 1;
                }
                (Protocol::CountThenJudge, Actor::Decide { source }, 2) => {
                    let admitted = evaluate(&limits, c.read_total, c.read_source).admitted;
                    c.admitted = Some(admitted);
                    if !admitted {
                        counts.total -= 1;
                        counts.sources[source] -= 1;
                    }
                }
                (_, Actor::Release { .. }, 0) => counts.total -= 1,
                (_, Actor::Release { source }, 1) => counts.sources[source] -= 1,
                _ => unreachable!(),
            }
            c.step += 1;
        }
    }

    /// Whether the outcomes of a finished run are those of some order of the
    /// same actors, one at a time, that keeps every actor that finished
    /// before another started before it.
    fn serializable(world: &World, initial: &Counts) -> bool {
        let n = world.actors.len();
        let mut order: Vec<usize> = (0..n).collect();
        permutations(&mut order, 0, &mut |order| {
            let respects_time = order.iter().enumerate().all(|(i, &a)| {
                order[i + 1..]
                    .iter()
                    .all(|&b| world.cpus[b].last.unwrap() > world.cpus[a].first.unwrap())
            });
            if !respects_time {
                return false;
            }
            let mut counts = initial.clone();
            for &a in order {
                match world.actors[a] {
                    Actor::Decide { source } => {
                        let admitted =
                            evaluate(&world.limits, counts.total, counts.sources[source]).admitted;
                        if Some(admitted) != world.cpus[a].admitted {
                            return false;
                        }
                        if admitted {
                            counts.total += 1;
                            counts.sources[source] += 1;
                        }
                    }
                    Actor::Release { source } => {
                        counts.total -= 1;
                        counts.sources[source] -= 1;
                    }
                }
            }
            counts == world.counts
        })
    }

    fn permutations(
        items: &mut [usize],
        k: usize,
        check: &mut impl FnMut(&[usize]) -> bool,
    ) -> bool {
        if k == items.len() {
            return check(items);
        }
        for i in k..items.len() {
            items.swap(k, i);
            if permutations(items, k + 1, check) {
                items.swap(k, i);
                return true;
            }
            items.swap(k, i);
        }
        false
    }

    /// Runs every interleaving; returns how many there were and the first
    /// that no serial order explains.
    fn explore(
        limits: Limits,
        protocol: Protocol,
        actors: &[Actor],
        initial: &Counts,
    ) -> (usize, Option<Vec<usize>>) {
        fn dfs(
            world: &mut World,
            initial: &Counts,
            trace: &mut Vec<usize>,
            runs: &mut usize,
            bad: &mut Option<Vec<usize>>,
        ) {
            if bad.is_some() {
                return;
            }
            let enabled: Vec<usize> = (0..world.actors.len())
                .filter(|&c| world.enabled(c))
                .collect();
            if enabled.is_empty() {
                *runs += 1;
                assert!(
                    world.lock.is_none()
                        && (0..world.actors.len())
                            .all(|c| world.cpus[c].step == steps(world.protocol, world.actors[c])),
                    "stuck: {trace:?}"
                );
                if !serializable(world, initial) {
                    *bad = Some(trace.clone());
                }
                return;
            }
            for cpu in enabled {
                let saved = (
                    world.counts.clone(),
                    world.lock,
                    world.cpus.clone(),
                    world.clock,
                );
                world.run(cpu);
                trace.push(cpu);
                dfs(world, initial, trace, runs, bad);
                trace.pop();
                (world.counts, world.lock, world.cpus, world.clock) = saved;
            }
        }
        let mut world = World {
            limits,
            protocol,
            actors: actors.to_vec(),
            counts: initial.clone(),
            lock: None,
            cpus: vec![Cpu::default(); actors.len()],
            clock: 0,
        };
        let (mut runs, mut bad) = (0, None);
        dfs(&mut world, initial, &mut Vec::new(), &mut runs, &mut bad);
        (runs, bad)
    }

    fn limits(max: u32, per_source: u32, pct: u32) -> Limits {
        Limits::exchange(max, per_source, pct)
    }

    /// Counts near the edge of each rule, so that the order decides.
    fn cases() -> Vec<(Limits, Counts)> {
        let counts = |total, sources: &[u32]| Counts {
            total,
            sources: sources.to_vec(),
        };
        vec![
            // The percentage rule: one more of source 0 fits, two do not.
            (limits(10, UNLIMITED, 50), counts(5, &[1, 1])),
            (limits(10, UNLIMITED, 50), counts(4, &[1, 0])),
            // Per source: one place left for source 0.
            (limits(100, 3, 100), counts(4, &[2, 2])),
            // The total: one place left on the connector.
            (limits(5, UNLIMITED, 100), counts(4, &[2, 2])),
            // All three at once.
            (limits(12, 3, 60), counts(6, &[2, 2])),
        ]
    }

    #[test]
    fn two_decisions_of_one_source_serialize_under_the_lock() {
        for (limits, initial) in cases() {
            let actors = [Actor::Decide { source: 0 }, Actor::Decide { source: 0 }];
            let (runs, bad) = explore(limits, Protocol::Locked, &actors, &initial);
            assert!(runs >= 2, "{runs}");
            assert_eq!(bad, None, "{limits:?} {initial:?}");
        }
    }

    #[test]
    fn three_decisions_and_a_release_serialize_under_the_lock() {
        for (limits, initial) in cases() {
            for actors in [
                [
                    Actor::Decide { source: 0 },
                    Actor::Decide { source: 0 },
                    Actor::Decide { source: 1 },
                    Actor::Release { source: 1 },
                ],
                [
                    Actor::Decide { source: 0 },
                    Actor::Decide { source: 1 },
                    Actor::Decide { source: 0 },
                    Actor::Release { source: 0 },
                ],
            ] {
                let releases_held = actors.iter().all(|a| match a {
                    Actor::Release { source } => initial.sources[*source] > 0,
                    Actor::Decide { .. } => true,
                });
                if !releases_held {
                    continue;
                }
                let (runs, bad) = explore(limits, Protocol::Locked, &actors, &initial);
                // The lock orders the decisions; the release interleaves
                // with their steps.
                assert!(runs > 100, "{runs}");
                assert_eq!(bad, None, "{limits:?} {initial:?} {actors:?}");
            }
        }
    }

    #[test]
    fn without_the_lock_one_source_passes_the_percentage_rule_by_one() {
        // max 10, 50 %: with 4 live, 1 of them source 0's, one more of
        // source 0 fits (S = 2 <= ceil((10 - 5) / 2) = 3) and a second does
        // not (3 > ceil((10 - 6) / 2) = 2). Counted first, each judged on
        // what the counts were, both can pass.
        let initial = Counts {
            total: 4,
            sources: vec![1],
        };
        let actors = [Actor::Decide { source: 0 }, Actor::Decide { source: 0 }];
        let (_, bad) = explore(
            limits(10, UNLIMITED, 50),
            Protocol::CountThenJudge,
            &actors,
            &initial,
        );
        assert!(bad.is_some(), "the checker must find the lost update");
        let (_, bad) = explore(
            limits(10, UNLIMITED, 50),
            Protocol::Locked,
            &actors,
            &initial,
        );
        assert_eq!(bad, None);
    }
}
