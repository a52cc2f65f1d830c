//! The refusal cache: the XDP program's memory of the SYNs it refused, per
//! CPU, so that the next SYN of a flood is refused with one CPU-local
//! lookup instead of the connector's range lookup and the source's hash
//! lookup.
//!
//! # Why it only refuses what the rule refuses now
//!
//! A refusal stays a refusal while the counts only grow and the limits stay
//! the same (`admission::tests::a_refusal_outlasts_any_growth_of_the_counts`).
//! Counts shrink only by a release, and the limits (and which connector a
//! SYN meets) change only with the configuration. So an entry holds:
//!
//! - the configuration generation it was refused under (the daemon makes
//!   `Settings::generation` odd before it writes a change and even, and
//!   new, once it is written; nothing is cached or answered from the cache
//!   while it is odd), and
//! - the release stamp the refusal depends on, read before the counts were:
//!   the source's ([`source_stamp`]) for a refusal by the per-source limit,
//!   which no other source's release can undo; the connector's
//!   ([`connector_stamp`]) otherwise. Every release bumps both stamps after
//!   it gave its counts back.
//!
//! An entry whose generation or stamp is not current, or whose key is not
//! the SYN's, is no answer: the SYN takes the exact path, which refills it.
//! A completed handshake only adds to the counts, so it leaves a refusal
//! standing, correctly (the tests below check every case against the rule).
//! It may change which check fails first (a source refused by its own
//! limit, then the connector's total reached too): a SYN refused from the
//! cache is counted under the rule of the key's last exact judgement, which
//! the sweep below brings about at least once a sweep while a flood lasts.
//!
//! # Reports
//!
//! A refusal from the cache is counted in the per-CPU `STATS` at once, and
//! into the entry's `gate` (a plain add: only its CPU writes it then). Those
//! counts reach a report in one of two ways, never both: the next exact
//! judgement of the same key on that CPU takes them (an atomic swap) into
//! its report; or the daemon's sweep, which first marks an entry claimed
//! (after which the owner CPU judges exactly again, and takes them itself)
//! and, a sweep later, takes what a still-claimed entry holds. See
//! [`GATE_CLAIMED`]. A take whose report finds the event ring full puts the
//! count back, claimed, for the next sweep. An entry that holds counts no
//! report carries is never given to another key: a third key of a full set
//! is judged exactly until the sweep has emptied one.
//!
//! # Memory order
//!
//! The exact path reads the stamps, then counts one judgement with a
//! fetching atomic add on a per-CPU counter (a fence on every CPU the JIT
//! targets), then the counts: a CPU that reorders loads cannot pair a
//! stamp bumped by a release with a count from before it.

use crate::{
    addr::{self, Words},
    admission::Rule,
    maps::{FlowKey, MAX_CONNECTORS},
};

/// Sets of the cache, per CPU: two slots each.
pub const REFUSAL_SETS: u32 = 1 << REFUSAL_SET_BITS;
const REFUSAL_SET_BITS: u32 = 11;
/// Slots of a set.
pub const REFUSAL_WAYS: u32 = 2;
/// Slots of `REFUSALS`, per CPU (64 bytes each: 256 KiB a CPU).
pub const REFUSAL_SLOTS: u32 = REFUSAL_SETS * REFUSAL_WAYS;
/// Words of `REFUSAL_SETS_USED`, per CPU: one bit a set.
pub const REFUSAL_SETS_USED_WORDS: u32 = REFUSAL_SETS / 64;
/// The `REFUSAL_SETS_USED` word of the set whose first slot is `first`,
/// and the set's bit in it. A CPU sets the bit before it writes a refusal
/// into the set, and only it writes refusals there; it clears the bit when
/// a lookup finds that no refusal of the set stands any more (none
/// stands again until one is written, but for a 32-bit release stamp
/// coming round after 2^32 releases). A clear bit says the set has nothing
/// to answer without touching its slots (under a flood of new sources,
/// the slots' lines are cache misses), and a flood that once filled every
/// set does not keep the lookups it caused.
#[inline(always)]
pub fn set_used_bit(first: u32) -> (u32, u64) {
    let set = first / REFUSAL_WAYS;
    (set / 64, 1 << (set % 64))
}
/// The `REPLY_BUDGETS` slot of a CPU's replies in all (after one per set).
pub const CPU_REPLY_BUDGET: u32 = REFUSAL_SETS;
/// Slots one `control::SWEEP_REFUSALS` request goes through.
pub const SWEEP_CHUNK: u32 = 128;

/// Release stamps of sources: sources share one by a hash (a release of
/// one then only costs the others a cache refill).
pub const SOURCE_STAMP_BUCKETS: u32 = 1 << 14;
/// Entries of `RELEASE_STAMPS`: the connectors' stamps, then the sources'.
pub const RELEASE_STAMPS_LEN: u32 = MAX_CONNECTORS + SOURCE_STAMP_BUCKETS;

/// Set in the high half of [`CachedRefusal::gate`] by the daemon's sweep:
/// the owner CPU no longer adds to the entry, but judges its next SYN
/// exactly and takes the count itself; an entry still claimed a sweep
/// later (its owner has not touched it since) is the daemon's to take.
/// Only a sweep writes the high half, and only with a compare-and-swap of
/// the whole word, which fails if the owner wrote it meanwhile: so a count
/// is taken once. The owner's plain add never races with the take: it only
/// adds to an unclaimed word, and a take needs the word claimed for a
/// whole sweep interval, far longer than one run of an XDP program.
pub const GATE_CLAIMED: u64 = 1 << 32;

/// What a cached refusal is looked up by: what decides the SYN's connector
/// and source. The remote address is cut to [`key_prefix_len`] for IPv6, so
/// that a flood varying the host bits within a source's prefix hits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalKey {
    pub remote: Words,
    pub local: Words,
    pub local_port: u16,
    /// The prefix length `remote` was cut to: part of the key, so that a
    /// key cut under one setting never answers under another.
    pub prefix_len: u16,
}

impl RefusalKey {
    /// The key of `flow`; `prefix_len` is `Settings::refusal_prefix_len`.
    #[inline(always)]
    pub fn of(flow: &FlowKey, prefix_len: u32) -> RefusalKey {
        RefusalKey {
            remote: addr::source_identity_words(flow.remote_words(), prefix_len),
            local: flow.local_words(),
            local_port: flow.local_port,
            prefix_len: prefix_len as u16,
        }
    }

    /// The first slot of the key's set (the other is the next one).
    #[inline(always)]
    pub fn first_slot(&self) -> u32 {
        let [r0, r1, r2, r3] = self.remote;
        let [l0, l1, l2, l3] = self.local;
        // Two multiplies, the set from the top bits: every input bit moves
        // them (a multiply carries low bits up, and an address's last byte
        // is the top byte of its word). Keys that share a set only cost a
        // refill: the set holds two.
        let remote = (r0 ^ r1 ^ r2 ^ r3).wrapping_mul(0x9e37_79b1);
        let local = (l0 ^ l1 ^ l2 ^ l3 ^ self.local_port as u32).wrapping_mul(0x85eb_ca77);
        ((remote ^ local.rotate_left(11)) >> (32 - REFUSAL_SET_BITS)) * REFUSAL_WAYS
    }
}

/// The IPv6 prefix the cache keys by: the source prefix, unless a remote
/// range is narrower (then the bits it looks at decide the connector, and
/// must be in the key). IPv4 keys are whole addresses.
pub fn key_prefix_len(ipv6_prefix_len: u32, longest_ipv6_range: u32) -> u32 {
    ipv6_prefix_len.max(longest_ipv6_range).min(128)
}

/// One refusal, remembered by the CPU that made it. 64 bytes: one cache
/// line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedRefusal {
    pub remote: Words,
    pub local: Words,
    pub local_port: u16,
    /// Of the last SYN judged exactly (for the sweep's report).
    pub remote_port: u16,
    /// The connector id plus one; 0: an empty slot.
    pub connector: u32,
    /// `Settings::generation` when refused.
    pub generation: u32,
    /// Which entry of `RELEASE_STAMPS` the refusal depends on, and its
    /// value, read before the counts.
    pub stamp_index: u32,
    pub stamp: u32,
    /// The rule that refused (a `Rule` as u8) and the connector's action.
    pub rule: u8,
    pub action: u8,
    /// [`RefusalKey::prefix_len`].
    pub prefix_len: u16,
    /// Refusals from this entry that no report carries yet (low half), and
    /// [`GATE_CLAIMED`].
    pub gate: u64,
}

impl CachedRefusal {
    /// Whether this slot remembers a refusal for `key`.
    #[inline(always)]
    pub fn holds(&self, key: &RefusalKey) -> bool {
        self.connector != 0
            && self.local_port == key.local_port
            && self.prefix_len == key.prefix_len
            && self.remote == key.remote
            && self.local == key.local
    }

    /// Whether the refusal still stands: same configuration, and no release
    /// it depends on since. `stamp` is `RELEASE_STAMPS[self.stamp_index]`
    /// now. Entries are only made under a stable (even) generation.
    #[inline(always)]
    pub fn stands(&self, generation: u32, stamp: u32) -> bool {
        self.generation == generation && self.stamp == stamp
    }

    /// Whether this is a refusal by the connection rate, which no release
    /// undoes, only time: its stamp fields hold when it lapses
    /// ([`CachedRefusal::lapses_at`]).
    #[inline(always)]
    pub fn is_by_rate(&self) -> bool {
        self.rule == Rule::Rate as u8
    }

    /// The stamp fields of a refusal by the rate that stands until
    /// `next_change_ns` (`crate::rate::RateWindow::next_change_ns`): that
    /// time less the most the coarse clock lags, as (high, low) halves.
    #[inline(always)]
    pub fn rate_stamp(next_change_ns: u64) -> (u32, u32) {
        let lapses = next_change_ns.saturating_sub(COARSE_CLOCK_LAG_NS);
        ((lapses >> 32) as u32, lapses as u32)
    }

    /// When a refusal by the rate lapses (see [`CachedRefusal::rate_stamp`]).
    #[inline(always)]
    pub fn lapses_at(&self) -> u64 {
        (self.stamp_index as u64) << 32 | self.stamp as u64
    }

    /// Whether a refusal by the rate still stands at `coarse_now_ns`
    /// (`bpf_ktime_get_coarse_ns()`): same configuration, not lapsed.
    #[inline(always)]
    pub fn stands_at(&self, generation: u32, coarse_now_ns: u64) -> bool {
        self.generation == generation && coarse_now_ns < self.lapses_at()
    }
}

/// More than the coarse clock lags the monotonic one: a tick (10 ms at HZ
/// 100, 4 ms at Debian's 250) and the few ticks the kernel lets jiffies
/// fall behind when the CPU that keeps time is stalled. A refusal by the
/// rate lapses this much early by the coarse clock, so that it never
/// outlasts the exact rule's refusal; the SYNs of that last stretch of a
/// slot are judged exactly.
pub const COARSE_CLOCK_LAG_NS: u64 = 100_000_000;

/// Whether the configuration is not being changed (see
/// `Settings::generation`): refusals may be cached and answered.
#[inline(always)]
pub const fn generation_is_stable(generation: u32) -> bool {
    generation & 1 == 0
}

/// Whether a gate word takes one more refusal from its owner: not claimed,
/// and its count not at its largest (never carried into the claim bit).
#[inline(always)]
pub const fn gate_takes_more(gate: u64) -> bool {
    gate < u32::MAX as u64
}

/// The refusals a gate word holds.
#[inline(always)]
pub const fn gate_count(gate: u64) -> u32 {
    gate as u32
}

/// The release stamp of a connector.
#[inline(always)]
pub const fn connector_stamp(connector: u32) -> u32 {
    connector % MAX_CONNECTORS
}

/// The release stamp of the source with `identity` on `connector`.
#[inline(always)]
pub fn source_stamp(connector: u32, identity: &Words) -> u32 {
    let [a, b, c, d] = *identity;
    let h = mix(mix(a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24)) ^ connector);
    MAX_CONNECTORS + (h & (SOURCE_STAMP_BUCKETS - 1))
}

/// Murmur3's finalizer: every input bit moves every output bit, in five
/// cheap instructions and two multiplies.
#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Which release stamp a refusal by `rule` depends on: the source's own
/// for the per-source limit (the first check that failed, so the total was
/// not reached: no other source's release can admit it, or change which
/// check fails first), else the connector's.
#[inline(always)]
pub fn stamp_for(rule: Rule, connector_stamp: u32, source_stamp: u32) -> u32 {
    if rule == Rule::PerSource {
        source_stamp
    } else {
        connector_stamp
    }
}

// SAFETY: `#[repr(C)]`, plain integers, no implicit padding (checked in
// the tests).
#[cfg(feature = "user")]
unsafe impl aya::Pod for CachedRefusal {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec::Vec};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        Limits, UNLIMITED,
        addr::from_ipv4,
        admits,
        maps::FlowKey,
        rate::{self, RateWindow, slot_ns},
    };

    #[test]
    fn an_entry_is_a_cache_line_with_its_gate_last() {
        assert_eq!(core::mem::size_of::<CachedRefusal>(), 64);
        assert_eq!(core::mem::offset_of!(CachedRefusal, gate), 56);
    }

    const CONNECTOR: u32 = 3;

    /// The kernel's state as the cache sees it: the configuration and its
    /// generation, the counts, the release stamps.
    #[derive(Debug)]
    struct World {
        limits: Limits,
        generation: u32,
        total: u32,
        sources: BTreeMap<u8, u32>,
        stamps: Vec<u32>,
        /// The monotonic clock, and how far the coarse clock lags it.
        now: u64,
        lag: u64,
        windows: BTreeMap<u8, RateWindow>,
    }

    impl World {
        fn new(limits: Limits) -> World {
            World {
                limits,
                generation: 2,
                total: 0,
                sources: BTreeMap::new(),
                stamps: std::vec![0; RELEASE_STAMPS_LEN as usize],
                now: 1_000_000_000_000,
                lag: 0,
                windows: BTreeMap::new(),
            }
        }

        fn slot_ns(&self) -> u64 {
            slot_ns(self.limits.connection_rate_time_unit)
        }

        fn recent(&self, source: u8) -> u32 {
            self.windows
                .get(&source)
                .map_or(0, |w| w.recent(self.now, self.slot_ns()))
        }

        /// Whether the whole rule admits a connection of `source` now.
        fn admits(&self, source: u8) -> bool {
            admits(&self.limits, self.total, self.live(source))
                && rate::admits(&self.limits, self.recent(source))
        }

        fn live(&self, source: u8) -> u32 {
            self.sources.get(&source).copied().unwrap_or(0)
        }

        /// A handshake that completes: counted if the rule admits it.
        fn complete(&mut self, source: u8) {
            if self.admits(source) {
                self.total += 1;
                *self.sources.entry(source).or_default() += 1;
                let (now, slot) = (self.now, self.slot_ns());
                self.windows.entry(source).or_default().count(now, slot);
            }
        }

        /// Time passes; the coarse clock lags by `lag` (at most a tick).
        fn tick(&mut self, ns: u64, lag: u64) {
            self.now += ns;
            self.lag = lag.min(COARSE_CLOCK_LAG_NS - 1);
        }

        /// A connection that predates the daemon: counted regardless.
        fn seed(&mut self, source: u8) {
            self.total += 1;
            *self.sources.entry(source).or_default() += 1;
        }

        /// A connection that closes: counts first, then both stamps.
        fn release(&mut self, source: u8) {
            if self.live(source) == 0 {
                return;
            }
            self.total -= 1;
            *self.sources.get_mut(&source).expect("counted") -= 1;
            self.stamps[connector_stamp(CONNECTOR) as usize] += 1;
            self.stamps[source_stamp(CONNECTOR, &identity(source)) as usize] += 1;
        }

        fn reconfigure(&mut self, limits: Limits) {
            self.limits = limits;
            self.generation += 2;
        }
    }

    fn identity(source: u8) -> Words {
        addr::to_words(&from_ipv4([192, 0, 2, source]))
    }

    fn key(source: u8) -> RefusalKey {
        let flow = FlowKey::from_words(
            addr::to_words(&from_ipv4([198, 51, 100, 25])),
            identity(source),
            25,
            40_000,
        );
        RefusalKey::of(&flow, 64)
    }

    /// One CPU's cache, as the XDP program uses it.
    struct Cache {
        slots: Vec<CachedRefusal>,
        hits: u32,
    }

    impl Cache {
        fn new() -> Cache {
            Cache {
                slots: std::vec![CachedRefusal::default(); REFUSAL_SLOTS as usize],
                hits: 0,
            }
        }

        /// A SYN of `source`: whether it is refused, and whether the cache
        /// said so.
        fn syn(&mut self, world: &World, source: u8) -> (bool, bool) {
            let key = key(source);
            let first = key.first_slot() as usize;
            for way in 0..REFUSAL_WAYS as usize {
                let entry = &self.slots[first + way];
                let stands = if entry.is_by_rate() {
                    entry.stands_at(world.generation, world.now - world.lag)
                } else {
                    entry.stands(world.generation, world.stamps[entry.stamp_index as usize])
                };
                if entry.holds(&key) && stands {
                    self.hits += 1;
                    return (true, true);
                }
            }
            // The exact path: stamps before counts.
            let connector = connector_stamp(CONNECTOR);
            let own = source_stamp(CONNECTOR, &identity(source));
            let (connector_value, own_value) =
                (world.stamps[connector as usize], world.stamps[own as usize]);
            let live = world.live(source);
            let window = world.windows.get(&source).copied().unwrap_or_default();
            let recent = window.recent(world.now, world.slot_ns());
            let evaluation = rate::judge(&world.limits, world.total, live, recent);
            if evaluation.admitted {
                return (false, false);
            }
            let index = stamp_for(evaluation.rule, connector, own);
            let (stamp_index, stamp) = if evaluation.rule == Rule::Rate {
                CachedRefusal::rate_stamp(window.next_change_ns(world.now, world.slot_ns()))
            } else if index == connector {
                (index, connector_value)
            } else {
                (index, own_value)
            };
            let way = self.slots[first..first + 2]
                .iter()
                .position(|e| e.holds(&key))
                .unwrap_or(0);
            self.slots[first + way] = CachedRefusal {
                remote: key.remote,
                local: key.local,
                local_port: key.local_port,
                prefix_len: key.prefix_len,
                connector: CONNECTOR + 1,
                generation: world.generation,
                stamp_index,
                stamp,
                rule: evaluation.rule as u8,
                ..Default::default()
            };
            (true, false)
        }
    }

    fn limits(max: u32, per_source: u32, pct: u32) -> Limits {
        Limits::exchange(max, per_source, pct)
    }

    /// A world where source 1 holds `held` and is refused from the cache.
    fn refused_from_cache(limits: Limits, held: u32, others: u32) -> (World, Cache) {
        let mut world = World::new(limits);
        for _ in 0..held {
            world.seed(1);
        }
        for _ in 0..others {
            world.seed(2);
        }
        let mut cache = Cache::new();
        assert_eq!(cache.syn(&world, 1), (true, false), "judged exactly first");
        assert_eq!(cache.syn(&world, 1), (true, true), "then from the cache");
        (world, cache)
    }

    #[test]
    fn a_release_of_the_source_makes_the_next_syn_exact() {
        let (mut world, mut cache) = refused_from_cache(limits(UNLIMITED, 2, 100), 2, 5);
        world.release(1);
        assert_eq!(cache.syn(&world, 1), (false, false));
    }

    #[test]
    fn a_release_elsewhere_on_the_connector_undoes_a_total_refusal() {
        let (mut world, mut cache) = refused_from_cache(limits(5, 20, 100), 1, 4);
        world.release(2);
        assert_eq!(cache.syn(&world, 1), (false, false));
    }

    #[test]
    fn a_release_elsewhere_leaves_a_per_source_refusal_cached() {
        let (mut world, mut cache) = refused_from_cache(limits(100, 2, 100), 2, 5);
        world.release(2);
        assert_eq!(cache.syn(&world, 1), (true, true));
    }

    #[test]
    fn a_configuration_change_makes_the_next_syn_exact() {
        let (mut world, mut cache) = refused_from_cache(limits(UNLIMITED, 2, 100), 2, 0);
        world.reconfigure(limits(UNLIMITED, 3, 100));
        assert_eq!(cache.syn(&world, 1), (false, false));
        // The same limits under a new generation: exact once, then cached.
        world.reconfigure(limits(UNLIMITED, 2, 100));
        world.seed(1);
        assert_eq!(cache.syn(&world, 1), (true, false));
        assert_eq!(cache.syn(&world, 1), (true, true));
    }

    #[test]
    fn a_completed_handshake_leaves_a_refusal_standing_and_right() {
        // The percentage rule: another source's handshake completing makes
        // the cap smaller, never larger.
        let (mut world, mut cache) = refused_from_cache(limits(100, 20, 2), 2, 10);
        world.complete(2);
        world.complete(1);
        assert!(!admits(&world.limits, world.total, world.live(1)));
        assert_eq!(cache.syn(&world, 1), (true, true));
    }

    fn rate_limits(rate: u32) -> Limits {
        let mut limits = limits(UNLIMITED, UNLIMITED, 100);
        limits.max_inbound_connection_rate_per_source = rate;
        limits.connection_rate_time_unit = 60;
        limits
    }

    /// A world where source 1 opened `rate` connections (closed since) and
    /// is refused by the rate from the cache.
    fn refused_by_rate(rate: u32) -> (World, Cache) {
        let mut world = World::new(rate_limits(rate));
        for _ in 0..rate {
            world.complete(1);
            world.release(1);
        }
        let mut cache = Cache::new();
        assert_eq!(cache.syn(&world, 1), (true, false), "judged exactly first");
        assert_eq!(cache.syn(&world, 1), (true, true), "then from the cache");
        (world, cache)
    }

    #[test]
    fn a_rate_refusal_lapses_when_the_window_moves_on_and_not_before() {
        let (mut world, mut cache) = refused_by_rate(3);
        let slot = world.slot_ns();
        // Releases do not undo it: the connections were counted all the
        // same.
        world.seed(1);
        world.release(1);
        assert_eq!(cache.syn(&world, 1), (true, true));
        // Up to the next slot boundary it stands, however late the coarse
        // clock; after it, the SYN is judged exactly again (and still
        // refused: the connections are recent until a unit and a slot).
        world.tick(slot - COARSE_CLOCK_LAG_NS - 1, 0);
        assert_eq!(cache.syn(&world, 1), (true, true));
        world.tick(COARSE_CLOCK_LAG_NS + 1, COARSE_CLOCK_LAG_NS - 1);
        assert_eq!(cache.syn(&world, 1), (true, false));
        world.tick(6 * slot, 0);
        assert_eq!(cache.syn(&world, 1), (false, false));
    }

    #[test]
    fn a_configuration_change_undoes_a_rate_refusal() {
        let (mut world, mut cache) = refused_by_rate(2);
        world.reconfigure(rate_limits(3));
        assert_eq!(cache.syn(&world, 1), (false, false));
    }

    #[test]
    fn ipv6_hosts_of_one_prefix_share_a_key_and_other_prefixes_do_not() {
        let flow = |host: u8, net: u8| {
            let mut remote = [0u8; 16];
            remote[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            remote[7] = net;
            remote[15] = host;
            FlowKey::from_words(
                addr::to_words(&[0xfd; 16]),
                addr::to_words(&remote),
                25,
                40_000 + host as u16,
            )
        };
        assert_eq!(
            RefusalKey::of(&flow(1, 0), 64),
            RefusalKey::of(&flow(200, 0), 64)
        );
        assert_ne!(
            RefusalKey::of(&flow(1, 0), 64),
            RefusalKey::of(&flow(1, 1), 64)
        );
        // A remote range narrower than the prefix puts its bits in the key.
        assert_eq!(key_prefix_len(64, 0), 64);
        assert_eq!(key_prefix_len(64, 120), 120);
        assert_ne!(
            RefusalKey::of(&flow(1, 0), key_prefix_len(64, 128)),
            RefusalKey::of(&flow(200, 0), key_prefix_len(64, 128))
        );
    }

    #[test]
    fn slots_are_in_range_and_spread() {
        let mut sets = std::collections::BTreeSet::new();
        for source in 0..=255u8 {
            let slot = key(source).first_slot();
            assert!(slot + 1 < REFUSAL_SLOTS && slot.is_multiple_of(REFUSAL_WAYS));
            sets.insert(slot);
        }
        // 256 sources in 2048 sets: a few share a set, which holds two.
        assert!(sets.len() > 230, "{} sets", sets.len());
        let stamps: std::collections::BTreeSet<u32> = (0..=255u8)
            .map(|s| source_stamp(CONNECTOR, &identity(s)))
            .collect();
        assert!(stamps.len() > 250);
        assert!(
            stamps
                .iter()
                .all(|s| (MAX_CONNECTORS..RELEASE_STAMPS_LEN).contains(s))
        );
    }

    #[derive(Clone, Debug)]
    enum Step {
        Syn(u8),
        Complete(u8),
        Seed(u8),
        Release(u8),
        Reconfigure(u32, u32, u32, u32),
        /// Milliseconds pass; the coarse clock then lags by this many µs.
        Tick(u32, u32),
    }

    fn step() -> impl Strategy<Value = Step> {
        let source = 0u8..4;
        prop_oneof![
            4 => source.clone().prop_map(Step::Syn),
            2 => source.clone().prop_map(Step::Complete),
            1 => source.clone().prop_map(Step::Seed),
            2 => source.prop_map(Step::Release),
            1 => (1u32..=12, 1u32..=6, 1u32..=100, 1u32..=8)
                .prop_map(|(m, p, c, r)| Step::Reconfigure(m, p, c, r)),
            2 => (0u32..25_000, 0u32..20_000).prop_map(|(ms, lag)| Step::Tick(ms, lag)),
        ]
    }

    /// The steps a proptest case takes, from a seed.
    fn steps_from(seed: u64, count: usize) -> Vec<Step> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as u32
        };
        (0..count)
            .map(|_| {
                let source = (next() % 4) as u8;
                match next() % 12 {
                    0..=3 => Step::Syn(source),
                    4 | 5 => Step::Complete(source),
                    6 => Step::Seed(source),
                    7 | 8 => Step::Release(source),
                    9 | 10 => Step::Tick(next() % 25_000, next() % 20_000),
                    _ => Step::Reconfigure(
                        1 + next() % 12,
                        1 + next() % 6,
                        1 + next() % 100,
                        1 + next() % 8,
                    ),
                }
            })
            .collect()
    }

    fn replay(limits: Limits, steps: &[Step]) -> Result<u32, TestCaseError> {
        let mut world = World::new(limits);
        let mut cache = Cache::new();
        for step in steps {
            match *step {
                Step::Syn(source) => {
                    let exact = !world.admits(source);
                    let (refused, _) = cache.syn(&world, source);
                    prop_assert_eq!(refused, exact, "{:?}", world);
                }
                Step::Complete(source) => world.complete(source),
                Step::Seed(source) => world.seed(source),
                Step::Release(source) => world.release(source),
                Step::Reconfigure(m, p, c, r) => {
                    let mut limits = self::limits(m, p, c);
                    // A rate on some configurations, with a unit of 6 s.
                    limits.max_inbound_connection_rate_per_source =
                        if r > 6 { UNLIMITED } else { r };
                    limits.connection_rate_time_unit = 6;
                    world.reconfigure(limits)
                }
                Step::Tick(ms, lag_us) => world.tick(ms as u64 * 1_000_000, lag_us as u64 * 1000),
            }
        }
        Ok(cache.hits)
    }

    #[test]
    fn the_model_answers_from_the_cache_often() {
        let hits = replay(limits(8, 3, 50), &steps_from(7, 20_000)).expect("agrees");
        assert!(hits > 1000, "{hits} hits");
    }

    proptest! {
        /// Whatever happens between two SYNs, the cache refuses only what
        /// the rule refuses on the counts of that moment.
        #[test]
        fn the_cache_refuses_only_what_the_rule_refuses_now(
            start in (1u32..=12, 1u32..=6, 1u32..=100, 1u32..=8),
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut limits = limits(start.0, start.1, start.2);
            limits.max_inbound_connection_rate_per_source =
                if start.3 > 6 { UNLIMITED } else { start.3 };
            limits.connection_rate_time_unit = 6;
            replay(limits, &steps)?;
        }
    }
}
