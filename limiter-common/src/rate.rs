//! The per-source connection rate: how many connections a source opened in
//! the last `connection_rate_time_unit`, counted when their handshakes
//! completed (a forged SYN never completes one, so it never spends a real
//! sender's rate).
//!
//! # The window
//!
//! Each source entry keeps a [`RateWindow`]: the connections counted in
//! each of the last [`RATE_SLOTS`] slots of `unit / RATE_SUBWINDOWS` (10 s
//! for a 60 s unit). A new connection is admitted while the slots that
//! reach into the last unit hold fewer than the limit: the current slot and
//! the [`RATE_SUBWINDOWS`] before it. So:
//!
//! - a source never has more than `limit` connections counted in any
//!   interval of one unit (the slots summed always cover the whole unit
//!   before a connection; see the tests);
//! - a connection stops counting between one unit and one unit plus a slot
//!   after it was counted (60 to 70 s for a 60 s unit): a source that used
//!   up its rate waits at most a slot longer than an exact sliding window
//!   would make it.
//!
//! The slots advance with the clock in whole slots from the newest slot's
//! start, found by comparisons: no division on the packet path.
//!
//! # Across CPUs
//!
//! The window is written only under the connector's lock, where the
//! connection is judged and counted (see `crate::admission`), so the
//! decision that counts is exact. The XDP program reads it without the
//! lock to refuse a SYN early: [`RateWindow::seq`] is odd while a count is
//! being written, and a reader that sees it odd, or changed, passes the
//! SYN on to the exact decision at completion.

pub use crate::admission::DEFAULT_RATE_UNIT_SECS;
use crate::admission::{Evaluation, Limits, Rule, UNLIMITED, evaluate};

/// Slots of one unit.
pub const RATE_SUBWINDOWS: u32 = 6;
/// Slots of a [`RateWindow`]: the current one and a unit's worth before it.
pub const RATE_SLOTS: usize = RATE_SUBWINDOWS as usize + 1;
/// Largest `max_inbound_connection_rate_per_source` (a slot counts in 16
/// bits).
pub const MAX_RATE_LIMIT: u32 = 60_000;
/// Range of `connection_rate_time_unit`, in seconds.
pub const MIN_RATE_UNIT_SECS: u32 = 6;
pub const MAX_RATE_UNIT_SECS: u32 = 3600;

/// The length of a slot for a unit of `unit_secs` seconds (computed by the
/// daemon, stored in the connector's kernel config).
pub const fn slot_ns(unit_secs: u32) -> u64 {
    // Rounded up: the slots summed always cover a whole unit.
    (unit_secs as u64 * 1_000_000_000).div_ceil(RATE_SUBWINDOWS as u64)
}

/// A source's connections, counted per slot. `counts[0]` is the slot that
/// began at `newest_start_ns`, `counts[i]` the one `i` slots before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// `bpf_ktime_get_ns()` when the newest slot began; 0: nothing counted.
    pub newest_start_ns: u64,
    pub counts: [u16; RATE_SLOTS],
    /// Odd while the window is being written (see the module's docs).
    pub seq: u16,
}

impl RateWindow {
    /// How many slots have begun since the newest one did, at `now` (at
    /// most [`RATE_SLOTS`]: then none of the counts is recent).
    #[inline(always)]
    pub fn slots_since(&self, now_ns: u64, slot_ns: u64) -> u32 {
        let elapsed = now_ns.saturating_sub(self.newest_start_ns);
        let mut advanced = 0;
        let mut boundary = slot_ns;
        while advanced < RATE_SLOTS as u32 && elapsed >= boundary {
            advanced += 1;
            boundary += slot_ns;
        }
        advanced
    }

    /// The connections that count against the rate at `now`.
    #[inline(always)]
    pub fn recent(&self, now_ns: u64, slot_ns: u64) -> u32 {
        let advanced = self.slots_since(now_ns, slot_ns) as usize;
        let mut sum = 0;
        let mut slot = 0;
        while slot < RATE_SLOTS {
            if slot + advanced < RATE_SLOTS {
                sum += self.counts[slot] as u32;
            }
            slot += 1;
        }
        sum
    }

    /// Counts a connection at `now`. Only under the connector's lock.
    #[inline(always)]
    pub fn count(&mut self, now_ns: u64, slot_ns: u64) {
        let advanced = self.slots_since(now_ns, slot_ns);
        if advanced as usize >= RATE_SLOTS {
            self.counts = [0; RATE_SLOTS];
            self.newest_start_ns = now_ns;
        } else {
            // In place, oldest first: no copy of the window on the stack
            // (this runs under a lock, deep in the sock_ops program).
            let mut step = 0;
            while step < advanced {
                let c = &mut self.counts;
                c[6] = c[5];
                c[5] = c[4];
                c[4] = c[3];
                c[3] = c[2];
                c[2] = c[1];
                c[1] = c[0];
                c[0] = 0;
                step += 1;
            }
            self.newest_start_ns += advanced as u64 * slot_ns;
        }
        self.counts[0] = self.counts[0].saturating_add(1);
    }

    /// When the count of recent connections next falls (the next slot
    /// boundary after `now`): a refusal by the rate stands until then.
    #[inline(always)]
    pub fn next_change_ns(&self, now_ns: u64, slot_ns: u64) -> u64 {
        let advanced = self.slots_since(now_ns, slot_ns) as u64;
        if advanced >= RATE_SLOTS as u64 {
            // Nothing recent, and nothing to fall.
            return now_ns + slot_ns;
        }
        self.newest_start_ns + (advanced + 1) * slot_ns
    }

    /// When a source with this window may open a connection again under a
    /// limit of `limit` a unit: `now` when it may now; `None` when the
    /// window alone does not say (unlimited). Not for the packet path.
    pub fn allowed_at(&self, now_ns: u64, slot_ns: u64, limit: u32) -> Option<u64> {
        if limit == UNLIMITED {
            return None;
        }
        let mut at = now_ns;
        // Each step reaches the next slot boundary; a window empties after
        // RATE_SLOTS of them.
        for _ in 0..=RATE_SLOTS {
            if self.recent(at, slot_ns) < limit {
                return Some(at);
            }
            at = self.next_change_ns(at, slot_ns);
        }
        Some(at)
    }
}

/// Whether a source's entry must be kept, idle for `idle_ns` with `recent`
/// connections in its window: on a connector with a rate limit, while the
/// window holds a connection. When the source table is under pressure,
/// only while forgetting it could let the source beat its rate: while it is
/// held to its rate (`recent` at the limit), or has not been idle for as
/// long as its rate allows `recent` connections (`idle * limit < unit *
/// recent`). So sources that came and went cannot keep the table full for
/// a unit, and a source forgotten early opens at most twice its rate in a
/// unit, and no more than its rate over time.
#[inline(always)]
pub fn keeps_entry(limits: &Limits, recent: u32, idle_ns: u64, under_pressure: bool) -> bool {
    let limit = limits.max_inbound_connection_rate_per_source;
    if limit == UNLIMITED || recent == 0 {
        false
    } else if under_pressure {
        let unit_ns = limits.connection_rate_time_unit as u64 * 1_000_000_000;
        // Idle for a unit is idle enough below the limit; capped there, the
        // products fit in 64 bits (a unit of an hour: 2^42 ns, times less
        // than 2^19).
        let idle_ns = idle_ns.min(unit_ns);
        recent >= limit || idle_ns * (limit as u64) < unit_ns * recent as u64
    } else {
        true
    }
}

/// Whether the rate admits one more connection from a source with
/// `recent` connections in the window.
#[inline(always)]
pub fn admits(limits: &Limits, recent: u32) -> bool {
    left(limits, recent) > 0
}

/// How many more connections the rate admits now from a source with
/// `recent` connections in the window ([`UNLIMITED`] without a rate).
#[inline(always)]
pub fn left(limits: &Limits, recent: u32) -> u32 {
    match limits.max_inbound_connection_rate_per_source {
        UNLIMITED => UNLIMITED,
        limit => limit.saturating_sub(recent),
    }
}

/// The whole rule for a new connection: Exchange's three limits on the
/// live counts ([`evaluate`]), then the source's connection rate (with
/// `recent` connections in its window). Rejected by the rate only, it is
/// reported as [`Rule::Rate`] with the rate limit as its cap.
#[inline(always)]
pub fn judge(limits: &Limits, live_total: u32, live_source: u32, recent: u32) -> Evaluation {
    let evaluation = evaluate(limits, live_total, live_source);
    if evaluation.admitted && !admits(limits, recent) {
        return Evaluation {
            admitted: false,
            rule: Rule::Rate,
            cap: limits.max_inbound_connection_rate_per_source,
        };
    }
    evaluation
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    const SLOT: u64 = 10_000_000_000;
    const UNIT: u64 = SLOT * RATE_SUBWINDOWS as u64;

    #[test]
    fn slot_of_a_minute_is_ten_seconds() {
        assert_eq!(slot_ns(60), SLOT);
        assert_eq!(size_of::<RateWindow>(), 24);
    }

    #[test]
    fn counts_fall_out_between_one_unit_and_one_unit_and_a_slot() {
        let mut w = RateWindow::default();
        let t0 = 1_000 * SLOT + 3;
        w.count(t0, SLOT);
        assert_eq!(w.recent(t0, SLOT), 1);
        assert_eq!(w.recent(t0 + UNIT - 1, SLOT), 1);
        assert_eq!(w.recent(t0 + UNIT + SLOT - 1, SLOT), 1);
        assert_eq!(w.recent(t0 + UNIT + SLOT, SLOT), 0);
        assert_eq!(w.next_change_ns(t0, SLOT), t0 + SLOT);
        // A slot of nothing (no rate on the connector) holds nothing.
        assert_eq!(w.recent(t0, 0), 0);
    }

    #[test]
    fn allowed_at_is_when_the_oldest_slot_falls_out() {
        let mut w = RateWindow::default();
        let t0 = 7 * SLOT;
        for i in 0..3 {
            w.count(t0 + i * SLOT, SLOT);
        }
        let now = t0 + 2 * SLOT;
        assert_eq!(w.allowed_at(now, SLOT, 4), Some(now));
        assert_eq!(w.allowed_at(now, SLOT, 3), Some(t0 + UNIT + SLOT));
        assert_eq!(w.allowed_at(now, SLOT, 2), Some(t0 + UNIT + 2 * SLOT));
        assert_eq!(w.allowed_at(now, SLOT, 1), Some(t0 + UNIT + 3 * SLOT));
        assert_eq!(w.allowed_at(now, SLOT, UNLIMITED), None);
    }

    #[test]
    fn under_pressure_an_entry_is_kept_only_while_forgetting_could_beat_the_rate() {
        let mut l = Limits::EXCHANGE_DEFAULT;
        l.max_inbound_connection_rate_per_source = 30;
        l.connection_rate_time_unit = 60;
        let second = 1_000_000_000;
        assert!(keeps_entry(&l, 1, 0, false));
        assert!(!keeps_entry(&l, 0, 0, false));
        // 10 of 30 a minute: kept until idle for 20 s.
        assert!(keeps_entry(&l, 10, 20 * second - 1, true));
        assert!(!keeps_entry(&l, 10, 20 * second, true));
        // Held to its rate: kept however long idle (its window empties
        // first).
        assert!(keeps_entry(&l, 30, u64::MAX, true));
        l.max_inbound_connection_rate_per_source = UNLIMITED;
        assert!(!keeps_entry(&l, 10, 0, false));
    }

    proptest! {
        /// A source that opens connections in bursts and waits, forgotten
        /// under pressure whenever `keeps_entry` lets it go (its window
        /// lost): never more than twice its rate in any unit.
        #[test]
        fn forgetting_under_pressure_never_more_than_doubles_the_rate(
            limit in 1u32..8,
            steps in proptest::collection::vec((0u64..2 * SLOT, 0u32..3), 1..150),
        ) {
            let mut l = Limits::EXCHANGE_DEFAULT;
            l.max_inbound_connection_rate_per_source = limit;
            l.connection_rate_time_unit = 60;
            let mut w = RateWindow::default();
            let mut t = 1_000 * SLOT;
            let mut last = t;
            let mut admitted = Vec::new();
            for (gap, burst) in steps {
                t += gap;
                // The daemon's sweep, at `t`.
                if !keeps_entry(&l, w.recent(t, SLOT), t - last, true) {
                    w = RateWindow::default();
                }
                for _ in 0..burst {
                    if w.recent(t, SLOT) < limit {
                        w.count(t, SLOT);
                        admitted.push(t);
                        last = t;
                    }
                }
            }
            for (i, &a) in admitted.iter().enumerate() {
                let within = admitted[i..].iter().take_while(|&&b| b < a + UNIT).count();
                prop_assert!(within as u32 <= 2 * limit, "{within} within a unit from {a}");
            }
        }
    }

    #[test]
    fn the_rate_is_checked_after_exchanges_limits() {
        let mut l = Limits::EXCHANGE_DEFAULT;
        l.max_inbound_connection_rate_per_source = 5;
        let e = judge(&l, 0, 0, 5);
        assert_eq!((e.admitted, e.rule, e.cap), (false, Rule::Rate, 5));
        assert_eq!(judge(&l, 0, 0, 4), evaluate(&l, 0, 0));
        // Over a concurrency cap too: that one is reported.
        let e = judge(&l, 20, 20, 9);
        assert_eq!((e.admitted, e.rule), (false, Rule::PerSource));
        l.max_inbound_connection_rate_per_source = UNLIMITED;
        assert!(judge(&l, 0, 0, u32::MAX).admitted);
    }

    /// Connections admitted one by one at `times` (sorted) under `limit`:
    /// the times of those admitted.
    fn admitted(times: &[u64], limit: u32) -> Vec<u64> {
        let mut w = RateWindow::default();
        let mut out = Vec::new();
        for &t in times {
            if w.recent(t, SLOT) < limit {
                w.count(t, SLOT);
                out.push(t);
            }
        }
        out
    }

    proptest! {
        /// Against a plain model, a list of the admitted connections'
        /// times: never more than `limit` in any interval of one unit, and
        /// a connection is refused only when the admitted ones within the
        /// last unit and a slot reach the limit.
        #[test]
        fn never_more_than_the_limit_in_any_unit(
            start in 0u64..u64::MAX / 4,
            gaps in proptest::collection::vec(0u64..3 * SLOT, 1..200),
            limit in 1u32..12,
        ) {
            let mut times = Vec::new();
            let mut t = start;
            for g in gaps {
                t += g;
                times.push(t);
            }
            let ok = admitted(&times, limit);
            for (i, &a) in ok.iter().enumerate() {
                let within = ok[i..].iter().take_while(|&&b| b < a + UNIT).count();
                prop_assert!(within as u32 <= limit, "{within} within a unit from {a}");
            }
            for &t in &times {
                if ok.contains(&t) {
                    continue;
                }
                let before = ok.iter().filter(|&&a| a <= t && t - a < UNIT + SLOT).count();
                prop_assert!(before as u32 >= limit, "refused at {t} with {before} recent");
            }
        }

        /// What the window says is recent is what the model counts, to a
        /// slot: every admitted connection within the last unit, none older
        /// than a unit and a slot.
        #[test]
        fn recent_counts_the_last_unit_to_a_slot(
            start in 0u64..u64::MAX / 4,
            gaps in proptest::collection::vec(0u64..2 * SLOT, 1..100),
            probe in 0u64..3 * UNIT,
        ) {
            let mut w = RateWindow::default();
            let mut t = start;
            let mut times = Vec::new();
            for g in gaps {
                t += g;
                w.count(t, SLOT);
                times.push(t);
            }
            let now = t + probe;
            let recent = w.recent(now, SLOT) as usize;
            let surely = times.iter().filter(|&&a| now - a < UNIT).count();
            let at_most = times.iter().filter(|&&a| now - a < UNIT + SLOT).count();
            prop_assert!(surely <= recent && recent <= at_most);
            let next = w.next_change_ns(now, SLOT);
            prop_assert!(next > now && next - now <= SLOT);
            prop_assert_eq!(w.recent(next - 1, SLOT), w.recent(now, SLOT));
        }
    }
}
