//! Telling a new SYN from a retransmitted one without a table lookup.
//!
//! A SYN from a source at its cap is refused, unless it retransmits a SYN
//! that was admitted and still holds its count. Only a lookup in the
//! handshake table can say so for sure, and under a SYN flood that lookup is
//! most of the cost of a refusal: a fresh 4-tuple each time, so a cache (and
//! TLB) miss in a table sized for floods. So each source's entry keeps one
//! word: how many handshakes it has, and the set of their remote ports
//! folded onto 48 bits. A SYN whose bit is clear is none of them and is
//! refused without the lookup; a set bit only means "look".
//!
//! One word, so that emptying the set when the last handshake ends is one
//! compare-and-swap that fails if a handshake started in the meantime. The
//! kernel changes it with atomic operations only, in this order (checked
//! over every interleaving by the tests below):
//!
//! - a handshake starts ([`start`]): read the word; count the handshake
//!   (fetch-and-add [`ONE`]); set its bit (fetch-and-or); only then insert
//!   its flow entry;
//! - a handshake ends ([`end`]), after its flow entry is deleted: read the
//!   word; subtract [`ONE`]; if that was the last, swap the word that left
//!   for zero (compare-and-swap, which fails if anything changed it).
//!
//! A source with more handshakes than the count holds turns [`MANY`] on for
//! good: every SYN of it is looked up, as without the word.

/// The port set: bits 0 to 47.
pub const PORTS: u64 = (1 << 48) - 1;
/// One handshake in the count, bits 48 to 62.
pub const ONE: u64 = 1 << 48;
const COUNT_MASK: u64 = 0x7fff << 48;
/// Too many handshakes to count: always look.
pub const MANY: u64 = 1 << 63;
/// Past this many, a starting handshake turns [`MANY`] on instead of
/// counting itself; far enough below the count's top (32,767) that racing
/// CPUs cannot carry into [`MANY`].
pub const COUNT_LIMIT: u64 = 0x7000;

/// The bit of `remote_port` in the port set.
#[inline(always)]
pub const fn port_bit(remote_port: u16) -> u64 {
    1 << (remote_port % 48)
}

/// Handshakes counted in `word`.
#[inline(always)]
pub const fn count(word: u64) -> u64 {
    (word & COUNT_MASK) >> 48
}

/// Whether a SYN from `remote_port` may retransmit one of the handshakes
/// that `word` describes. False means it cannot.
#[inline(always)]
pub const fn may_retransmit(word: u64, remote_port: u16) -> bool {
    word & MANY != 0 || (count(word) != 0 && word & port_bit(remote_port) != 0)
}

/// What a starting handshake does, given the word it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Nothing: [`MANY`] is on.
    Nothing,
    /// Turn [`MANY`] on (fetch-and-or).
    TurnOnMany,
    /// Add [`ONE`], then or in the bit.
    Count(u64),
}

/// The first step of a starting handshake on `remote_port`.
#[inline(always)]
pub const fn start(read: u64, remote_port: u16) -> Start {
    if read & MANY != 0 {
        Start::Nothing
    } else if count(read) >= COUNT_LIMIT {
        Start::TurnOnMany
    } else {
        Start::Count(port_bit(remote_port))
    }
}

/// What an ending handshake does after subtracting [`ONE`] from a word that
/// held `before`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Nothing more.
    Done,
    /// It was the last: swap this value (what the word now holds) for zero.
    Empty(u64),
    /// The count was already zero (a bug elsewhere): add [`ONE`] back.
    Undo,
}

/// Whether an ending handshake subtracts at all, given the word it read
/// first: not once [`MANY`] is on (the count no longer means anything).
#[inline(always)]
pub const fn end_subtracts(read: u64) -> bool {
    read & MANY == 0
}

/// The step after the subtraction of an ending handshake.
#[inline(always)]
pub const fn end(before: u64) -> End {
    match count(before) {
        0 => End::Undo,
        1 => End::Empty(before - ONE),
        _ => End::Done,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The atomic steps of a starting and of an ending handshake.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        StartRead(u16),
        StartChange,
        StartSetBit,
        EndRead,
        EndSubtract,
        EndEmpty,
    }

    /// What each side remembers between its steps.
    #[derive(Default)]
    struct Sides {
        start: Option<Start>,
        end_subtracts: bool,
        end: Option<End>,
    }

    fn run(word: &mut u64, step: Step, sides: &mut Sides) {
        match step {
            Step::StartRead(port) => sides.start = Some(start(*word, port)),
            Step::StartChange => match sides.start {
                Some(Start::TurnOnMany) => *word |= MANY | PORTS,
                Some(Start::Count(_)) => *word += ONE,
                _ => {}
            },
            Step::StartSetBit => {
                if let Some(Start::Count(bit)) = sides.start {
                    *word |= bit;
                }
            }
            Step::EndRead => sides.end_subtracts = end_subtracts(*word),
            Step::EndSubtract => {
                if sides.end_subtracts {
                    sides.end = Some(end(*word));
                    *word = word.wrapping_sub(ONE);
                }
            }
            Step::EndEmpty => match sides.end {
                Some(End::Empty(value)) if *word == value => *word = 0,
                Some(End::Undo) => *word = word.wrapping_add(ONE),
                _ => {}
            },
        }
    }

    /// Every merge of two step sequences, each kept in order.
    fn interleavings(a: &[Step], b: &[Step]) -> Vec<Vec<Step>> {
        if a.is_empty() || b.is_empty() {
            return vec![[a, b].concat()];
        }
        let mut out = Vec::new();
        for mut rest in interleavings(&a[1..], b) {
            rest.insert(0, a[0]);
            out.push(rest);
        }
        for mut rest in interleavings(a, &b[1..]) {
            rest.insert(0, b[0]);
            out.push(rest);
        }
        out
    }

    /// A handshake on `new_port` starts while another ends, from a word
    /// describing `initial`; the new one must be found from the moment its
    /// flow entry exists (right after its last step) on.
    fn check_every_order(initial: u64, new_port: u16, expect_count: Option<u64>) {
        let starting = [
            Step::StartRead(new_port),
            Step::StartChange,
            Step::StartSetBit,
        ];
        let ending = [Step::EndRead, Step::EndSubtract, Step::EndEmpty];
        let orders = interleavings(&starting, &ending);
        assert_eq!(orders.len(), 20);
        for order in orders {
            let mut word = initial;
            let mut sides = Sides::default();
            let mut inserted = false;
            for step in &order {
                run(&mut word, *step, &mut sides);
                inserted |= matches!(step, Step::StartSetBit);
                if inserted {
                    assert!(
                        may_retransmit(word, new_port),
                        "missed after {order:?}: {word:#x}"
                    );
                }
            }
            if let Some(expected) = expect_count {
                assert_eq!(count(word), expected, "{order:?}");
            }
        }
    }

    #[test]
    fn a_handshake_starting_while_the_last_one_ends_is_never_missed() {
        // Same bit and different bits as the one that ends.
        check_every_order(ONE | port_bit(40_000), 40_000, Some(1));
        check_every_order(ONE | port_bit(40_000), 40_001, Some(1));
    }

    #[test]
    fn a_handshake_starting_while_another_ends_is_never_missed() {
        check_every_order((2 * ONE) | port_bit(1) | port_bit(2), 3, Some(2));
    }

    #[test]
    fn too_many_handshakes_turn_on_many_for_good() {
        // The count no longer matters once MANY is on.
        check_every_order((COUNT_LIMIT * ONE) | port_bit(9), 10, None);
        let many = MANY | PORTS | (5 * ONE);
        assert_eq!(start(many, 7), Start::Nothing);
        assert!(!end_subtracts(many));
        assert!(may_retransmit(many, 12_345));
    }

    #[test]
    fn the_set_empties_with_the_last_handshake() {
        let mut word = 0;
        let mut sides = Sides::default();
        for port in [1000, 2000, 3000] {
            for step in [Step::StartRead(port), Step::StartChange, Step::StartSetBit] {
                run(&mut word, step, &mut sides);
            }
        }
        assert_eq!(count(word), 3);
        assert!(may_retransmit(word, 2000));
        // 2000 and 2048 share a bit: a false positive, which only costs a
        // lookup.
        assert!(may_retransmit(word, 2048));
        assert!(!may_retransmit(word, 2001));
        for _ in 0..3 {
            for step in [Step::EndRead, Step::EndSubtract, Step::EndEmpty] {
                run(&mut word, step, &mut sides);
            }
        }
        assert_eq!(word, 0);
        assert!(!may_retransmit(word, 2000));
    }

    #[test]
    fn an_end_without_a_start_is_undone() {
        assert_eq!(end(0), End::Undo);
        assert_eq!(end(ONE | 6), End::Empty(6));
        assert_eq!(end((2 * ONE) | 6), End::Done);
    }
}
