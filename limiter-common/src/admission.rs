//! Exchange's admission rule for a receive connector, in one place.
//!
//! The XDP program calls [`evaluate`] for every SYN it counts, and the daemon
//! calls it for `limiter explain` and `limiter sources`, so that what the
//! operator is told is exactly what the kernel does.

/// A limit that is not checked (`unlimited` in the config file).
pub const UNLIMITED: u32 = u32::MAX;

/// Largest `max_inbound_connection` Exchange accepts.
pub const MAX_INBOUND_CONNECTION_LIMIT: u32 = 2_147_483_647;
/// Largest `max_inbound_connection_per_source` Exchange accepts.
pub const MAX_INBOUND_CONNECTION_PER_SOURCE_LIMIT: u32 = 10_000;

/// The three limits of a receive connector.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `max_inbound_connection`, or [`UNLIMITED`].
    pub max_inbound_connection: u32,
    /// `max_inbound_connection_per_source`, or [`UNLIMITED`].
    pub max_inbound_connection_per_source: u32,
    /// `max_inbound_connection_percentage_per_source`, 1..=100.
    pub max_inbound_connection_percentage_per_source: u32,
}

impl Limits {
    /// Exchange's defaults: 5000 in total, 20 per source, 2 %.
    pub const EXCHANGE_DEFAULT: Limits = Limits {
        max_inbound_connection: 5000,
        max_inbound_connection_per_source: 20,
        max_inbound_connection_percentage_per_source: 2,
    };
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
}

impl Rule {
    /// The rule stored as `raw` by the kernel, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Rule> {
        match raw {
            0 => Some(Rule::None),
            1 => Some(Rule::Total),
            2 => Some(Rule::PerSource),
            3 => Some(Rule::Percentage),
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
        }
    }

    /// The Exchange event id a rejection by this rule is reported as.
    pub const fn event_id(self) -> u32 {
        match self {
            Rule::Total => 1009,
            Rule::None | Rule::PerSource | Rule::Percentage => 1021,
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

    let admitted = source_after <= cap;
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn limits(max: u32, per_source: u32, pct: u32) -> Limits {
        Limits {
            max_inbound_connection: max,
            max_inbound_connection_per_source: per_source,
            max_inbound_connection_percentage_per_source: pct,
        }
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
            // The cap is exact: one more connection at the cap is rejected.
            if e.cap != UNLIMITED && e.admitted {
                prop_assert!(live_source < e.cap);
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
