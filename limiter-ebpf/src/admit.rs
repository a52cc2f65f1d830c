//! XDP `admit`: refuses a SYN to a bound port when the rule refuses it on
//! the live counts, before the kernel spends anything on it. Everything
//! else passes: a SYN that passes is judged again, and counted, by the
//! sock_ops program when its handshake completes (see `track`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use limiter_common::{
    Limits, Rule, UNLIMITED, addr,
    maps::{
        CPU_REPLIES_PER_SECOND, FlowKey, REPLIES_PER_SECOND, REPLY_ALIVE_NS, REPLY_MARK_TTL_NS,
        ReplyMark, SourceCount, SynSeen, action, responder, stat, syn_seen_slot,
    },
    rate,
    refusals::{self, CPU_REPLY_BUDGET, CachedRefusal, REFUSAL_WAYS, RefusalKey},
};

use crate::{
    atomic,
    count::{
        RECENT_UNKNOWN, bump, connector_live, connector_state, recent_unlocked, select_connector,
        source_key, window_unlocked,
    },
    diag,
    maps::{
        CONNECTORS, LAST_REPLY_MARK, REFUSAL_SETS_USED, REFUSALS, RELEASE_STAMPS, REPLY_ALIVE,
        REPLY_BUDGETS, REPLY_FLOWS, REPLY_SCRATCH, SETTINGS, SOURCE_LIVE, STATS, SYNS_SEEN,
    },
    parse::{self, LinkLayer, Packet, ReplyLayout},
    report::{IN_SCRATCH, Rejection, reject, rejected_counter},
    reset,
};

/// What becomes of a SYN.
enum Verdict {
    Pass,
    Drop,
    /// Refused, and answered with a RST.
    Reset,
    /// Not in the refusal cache: to be judged on the counts.
    Judge,
    /// Refused from the cache with action `reply` (see [`reply`]).
    Reply,
}

#[inline(always)]
pub fn run(ctx: &XdpContext, link: LinkLayer) -> u32 {
    let syn = match parse::parse(ctx, link) {
        Packet::Pass => return xdp_action::XDP_PASS,
        Packet::Unreadable => {
            bump(stat::GLOBAL_ROW, stat::UNREADABLE);
            diag::note(limiter_common::maps::diag::UNREADABLE);
            diag::tell(ctx);
            return xdp_action::XDP_DROP;
        }
        Packet::Syn(syn) => syn,
    };
    // Two calls one after the other, not one inside the other: their
    // stacks do not add up.
    let verdict = match from_cache(&syn.flow) {
        Verdict::Judge => {
            // The reply's layout waits in this CPU's scratch entry, not on
            // the stack: the verifier then walks `judge` once, not once for
            // each header layout the parser can end with.
            let stashed = stash(syn.reply);
            return match judge(&syn.flow) {
                Verdict::Reset => answer(ctx, &syn.flow, unstash(stashed)),
                verdict => action_of(verdict),
            };
        }
        verdict => verdict,
    };
    match verdict {
        Verdict::Reset => answer(ctx, &syn.flow, syn.reply),
        verdict => action_of(verdict),
    }
}

#[inline(always)]
fn action_of(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Pass | Verdict::Judge => xdp_action::XDP_PASS,
        Verdict::Drop | Verdict::Reset | Verdict::Reply => xdp_action::XDP_DROP,
    }
}

/// A refused SYN answered with a RST, if its headers allow.
#[inline(always)]
fn answer(ctx: &XdpContext, flow: &FlowKey, layout: Option<ReplyLayout>) -> u32 {
    match layout {
        Some(layout) if reset::reset(ctx, flow, &layout).is_some() => xdp_action::XDP_TX,
        // Headers too unusual to answer in place: drop it instead.
        _ => xdp_action::XDP_DROP,
    }
}

/// Puts `reply` in this CPU's scratch entry; whether it could.
#[inline(always)]
fn stash(reply: Option<ReplyLayout>) -> bool {
    match (REPLY_SCRATCH.get_ptr_mut(0), reply) {
        (Some(entry), Some(layout)) => {
            // SAFETY: this CPU's entry of a per-CPU array.
            unsafe { *entry = layout };
            true
        }
        _ => false,
    }
}

#[inline(always)]
fn unstash(stashed: bool) -> Option<ReplyLayout> {
    if !stashed {
        return None;
    }
    // SAFETY: this CPU's entry of a per-CPU array.
    REPLY_SCRATCH.get_ptr(0).map(|entry| unsafe { *entry })
}

/// The verdict on a SYN to a bound port from this CPU's refusal cache, when
/// it remembers a refusal that still stands: one CPU-local lookup, no
/// shared write. Else [`Verdict::Judge`].
///
/// Not inlined: the parser reaches here by many paths (VLAN tags, IPv4 or
/// IPv6, extension headers), and a function of its own is verified without
/// multiplying them by the paths of the decision.
#[inline(never)]
fn from_cache(flow: &FlowKey) -> Verdict {
    let (generation, key) = cache_key(flow);
    if !refusals::generation_is_stable(generation) {
        return Verdict::Judge;
    }
    let first = key.first_slot();
    if !set_is_used(first) {
        return Verdict::Judge;
    }
    let mut way = 0;
    while way < REFUSAL_WAYS {
        if let Some(entry) = REFUSALS.get_ptr_mut(first + way) {
            // SAFETY: this CPU's slot of a per-CPU array.
            if unsafe { (*entry).holds(&key) } {
                return match cached_verdict(entry, generation) {
                    // SAFETY: as above.
                    Some(Verdict::Reply) => unsafe {
                        reply(
                            flow,
                            (*entry).connector - 1,
                            (*entry).rule as u32,
                            first / REFUSAL_WAYS,
                        )
                    },
                    Some(verdict) => verdict,
                    None => Verdict::Judge,
                };
            }
        }
        way += 1;
    }
    // A miss. When no refusal of the set stands, none stands again until
    // one is written (a generation or a stamp only moves on, but for a
    // 32-bit stamp coming round): the next new source need not read the
    // slots.
    if !set_stands(first, generation) {
        mark_set_unused(first);
    }
    Verdict::Judge
}

/// Whether a refusal in the set whose first slot is `first` still stands.
#[inline(always)]
fn set_stands(first: u32, generation: u32) -> bool {
    let mut way = 0;
    while way < REFUSAL_WAYS {
        if REFUSALS
            .get_ptr(first + way)
            .is_some_and(|entry| stands(entry, generation))
        {
            return true;
        }
        way += 1;
    }
    false
}

/// Whether the set whose first slot is `first` may hold a refusal that
/// stands, on this CPU (see `refusals::set_used_bit`).
#[inline(always)]
fn set_is_used(first: u32) -> bool {
    let (word, bit) = refusals::set_used_bit(first);
    // SAFETY: this CPU's word of a per-CPU array.
    REFUSAL_SETS_USED
        .get_ptr(word)
        .is_none_or(|used| unsafe { *used } & bit != 0)
}

/// Marks the set whose first slot is `first` as used by this CPU, before
/// a refusal is written into it.
#[inline(always)]
fn mark_set_used(first: u32) {
    let (word, bit) = refusals::set_used_bit(first);
    if let Some(used) = REFUSAL_SETS_USED.get_ptr_mut(word) {
        // SAFETY: this CPU's word of a per-CPU array; only this CPU's XDP
        // program writes it.
        unsafe { *used |= bit };
    }
}

/// Marks the set whose first slot is `first` as holding no refusal that
/// stands, on this CPU.
#[inline(always)]
fn mark_set_unused(first: u32) {
    let (word, bit) = refusals::set_used_bit(first);
    if let Some(used) = REFUSAL_SETS_USED.get_ptr_mut(word) {
        // SAFETY: as in `mark_set_used`.
        unsafe { *used &= !bit };
    }
}

/// The configuration generation, and the refusal cache key of `flow`.
#[inline(always)]
fn cache_key(flow: &FlowKey) -> (u32, RefusalKey) {
    let (generation, prefix_len) = match SETTINGS.get_ptr(0) {
        // SAFETY: a live map value. The generation is read before anything
        // the daemon configures, so a refusal is never cached under a
        // generation newer than the configuration it was judged by.
        Some(settings) => unsafe {
            (
                core::ptr::read_volatile(&raw const (*settings).generation),
                (*settings).refusal_prefix_len,
            )
        },
        None => (0, 128),
    };
    (generation, RefusalKey::of(flow, prefix_len))
}

/// The verdict of a cached refusal, if it still stands and its owner (this
/// CPU) still counts into it (see `limiter_common::refusals`).
#[inline(always)]
fn cached_verdict(entry: *mut CachedRefusal, generation: u32) -> Option<Verdict> {
    // SAFETY: this CPU's slot of a per-CPU array; the stamp is a live map
    // value. Only this CPU writes the gate but for the daemon's sweep,
    // which never races with a plain add to an unclaimed gate.
    unsafe {
        if !stands(entry, generation) {
            return None;
        }
        let gate = core::ptr::read_volatile(&raw const (*entry).gate);
        if !refusals::gate_takes_more(gate) {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*entry).gate, gate + 1);
        bump(
            (*entry).connector - 1,
            rejected_counter(
                Rule::from_raw((*entry).rule as u32).unwrap_or(Rule::PerSource),
                false,
            ),
        );
        Some(match (*entry).action as u32 {
            action::RESET => Verdict::Reset,
            action::REPLY => Verdict::Reply,
            _ => Verdict::Drop,
        })
    }
}

/// Whether the refusal in `entry` still stands (see
/// `limiter_common::refusals`); an empty slot holds none.
#[inline(always)]
fn stands(entry: *const CachedRefusal, generation: u32) -> bool {
    // SAFETY: this CPU's slot of a per-CPU array; the stamp is a live map
    // value.
    unsafe {
        if (*entry).connector == 0 {
            false
        } else if (*entry).is_by_rate() {
            (*entry).stands_at(generation, crate::coarse_now_ns())
        } else {
            RELEASE_STAMPS
                .get_ptr((*entry).stamp_index)
                .is_some_and(|stamp| (*entry).stands(generation, core::ptr::read_volatile(stamp)))
        }
    }
}

/// The slot where `key`'s refusal is, or goes; `first` is its set's first
/// slot.
#[inline(always)]
fn slot_for(key: &RefusalKey, first: u32) -> *mut CachedRefusal {
    let mut way = 0;
    while way < REFUSAL_WAYS {
        if let Some(entry) = REFUSALS.get_ptr_mut(first + way) {
            // SAFETY: this CPU's slot of a per-CPU array.
            if unsafe { (*entry).holds(key) } {
                return entry;
            }
        }
        way += 1;
    }
    victim(first)
}

/// The slot of `first`'s set a new refusal goes into: an empty one, else
/// one whose refusals have all been reported; none when both hold
/// refusals no report carries yet (no count is ever evicted: the key is
/// judged exactly until the sweep has taken them).
#[inline(always)]
fn victim(first: u32) -> *mut CachedRefusal {
    let free = |way: u32, empty: bool| {
        REFUSALS.get_ptr_mut(first + way).filter(|&entry| {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe {
                if empty {
                    (*entry).connector == 0
                } else {
                    refusals::gate_count(core::ptr::read_volatile(&raw const (*entry).gate)) == 0
                }
            }
        })
    };
    free(0, true)
        .or_else(|| free(1, true))
        .or_else(|| free(0, false))
        .or_else(|| free(1, false))
        .unwrap_or(core::ptr::null_mut())
}

/// The verdict on the live counts as they are read (no lock, no write: a
/// flood is refused cheaply; the decision that counts is taken when the
/// handshake completes). A refusal is remembered in this CPU's refusal
/// cache.
///
/// Not inlined, for the verifier (see [`from_cache`]).
#[inline(never)]
fn judge(flow: &FlowKey) -> Verdict {
    // First: the generation must be no newer than the configuration read.
    let generation = cache_key(flow).0;
    let Some(connector) = select_connector(flow) else {
        return Verdict::Pass;
    };
    let (Some(config), Some(state)) = (
        CONNECTORS.get(connector).copied(),
        connector_state(connector),
    ) else {
        return Verdict::Pass;
    };
    // Monitor mode judges when the handshake completes, once per connection.
    if config.action == action::MONITOR {
        return passed(flow, connector);
    }
    let limits = &config.limits;
    let rate_limited = limits.max_inbound_connection_rate_per_source != UNLIMITED;
    // Admitted even if every live connection were this source's: no need
    // to look the source up (a connector far from its caps, and no rate).
    if !rate_limited && admits(limits, connector_live(state), None) {
        return admitted(flow, connector, config.action);
    }
    let source = source_key(connector, flow);
    let stamps = (
        refusals::connector_stamp(connector),
        refusals::source_stamp(connector, &source.addr_words()),
    );
    // The stamps before the counts: a release between the two leaves the
    // refusal cached under a stamp that is already stale. The count of
    // these judgements is the fence that keeps the reads in that order on
    // a CPU that would reorder them.
    let stamp_values = (read_stamp(stamps.0), read_stamp(stamps.1));
    fenced_bump(stat::GLOBAL_ROW, stat::SOURCE_JUDGED);
    let live_total = connector_live(state);
    let entry = SOURCE_LIVE.get_ptr_mut(&source);
    // SAFETY: a live map value, read once.
    let live_source = entry.map_or(0, |e| unsafe {
        core::ptr::read_volatile(&raw const (*e).live)
    });
    let recent = match entry {
        Some(entry) if rate_limited => {
            match recent_unlocked(entry, crate::now_ns(), config.rate_slot_ns) {
                // Being written: the completion judges it.
                RECENT_UNKNOWN => return admitted(flow, connector, config.action),
                recent => recent as u32,
            }
        }
        _ => 0,
    };
    if admits(limits, live_total, Some(live_source)) && rate::admits(limits, recent) {
        return admitted(flow, connector, config.action);
    }
    let evaluation = rate::judge(limits, live_total, live_source, recent);
    // What the refusal stands on: a release stamp, or for the rate, when
    // it lapses (see `CachedRefusal::rate_stamp`).
    let stamp = if evaluation.rule == Rule::Rate {
        // Refused by the rate, the source has an entry.
        rate_stamp(
            entry.unwrap_or(core::ptr::null_mut()),
            config.rate_slot_ns,
            limits.max_inbound_connection_rate_per_source,
        )
    } else {
        let stamp_index = refusals::stamp_for(evaluation.rule, stamps.0, stamps.1);
        let stamp = if stamp_index == stamps.0 {
            stamp_values.0
        } else {
            stamp_values.1
        };
        (stamp as u64) << 32 | stamp_index as u64
    };
    // Nothing is remembered while the configuration is being changed.
    let carried = if refusals::generation_is_stable(generation) {
        remember(
            flow,
            generation,
            stamp,
            connector | (evaluation.rule as u32) << 16 | config.action << 24,
        )
    } else {
        0
    };
    reject::<IN_SCRATCH>(&Rejection {
        flow,
        source: &source,
        config: &config,
        evaluation: &evaluation,
        live_total,
        live_source,
        recent,
        entry: entry.unwrap_or(core::ptr::null_mut()),
        carried,
        at_completion: false,
        late: false,
        repeat: false,
    });
    match config.action {
        action::RESET => Verdict::Reset,
        // The key's set is found in `reply`: here it would grow this
        // frame past the verifier's stack.
        action::REPLY => reply(flow, connector, evaluation.rule as u32, SET_UNKNOWN),
        _ => Verdict::Drop,
    }
}

/// The stamp a refusal by the rate (`limit` a unit) is remembered with (see
/// [`remember`]): when it lapses, the window's next slot boundary, read
/// again now. The clock has moved on since the refusal: if a boundary
/// passed and the window no longer refuses, the stamp has lapsed already
/// (the next SYN is judged exactly), so that a refusal never stands a slot
/// too long.
///
/// Not inlined: its stack is its own, beside the report's.
#[inline(never)]
fn rate_stamp(entry: *const SourceCount, slot_ns: u64, limit: u32) -> u64 {
    if entry.is_null() {
        return 0;
    }
    let Some(window) = window_unlocked(entry) else {
        return 0;
    };
    let now = crate::now_ns();
    if window.recent(now, slot_ns) < limit {
        return 0;
    }
    let lapses = window.next_change_ns(now, slot_ns);
    let (high, low) = CachedRefusal::rate_stamp(lapses);
    (low as u64) << 32 | high as u64
}

/// An admitted SYN. With action `reply`, a mark an earlier SYN of the same
/// 4-tuple left (refused, or forged to plant it) is taken away, or `steer`
/// would hand this one to the responder.
#[inline(always)]
fn admitted(flow: &FlowKey, connector: u32, connector_action: u32) -> Verdict {
    if connector_action == action::REPLY {
        let _ = REPLY_FLOWS.remove(flow);
    }
    passed(flow, connector)
}

/// A SYN refused with action `reply`: marked for the `steer` program, which
/// hands it to the daemon's responder, and passed on; unless this CPU has
/// made its replies for the key's cache set this second (a flood costs a
/// handshake per reply), or no responder answers, then dropped and
/// counted.
#[inline(never)]
fn reply(flow: &FlowKey, connector: u32, rule: u32, set: u32) -> Verdict {
    let set = if set == SET_UNKNOWN {
        cache_key(flow).1.first_slot() / REFUSAL_WAYS
    } else {
        set
    };
    let now = crate::coarse_now_ns();
    // The key's own budget first: under a flood it is the one spent, and
    // the SYN is dropped after one CPU-local lookup. Then: a responder for
    // this family said it answers lately (else the daemon is gone, or has
    // none: `steer` could only refuse the SYN with a RST), and this CPU's
    // replies in all. The coarse clock may lag the daemon's reading: never
    // "gone" then.
    let family = if addr::words_are_ipv4(&flow.local_words()) {
        responder::IPV4
    } else {
        responder::IPV6
    };
    if !spend(set, REPLIES_PER_SECOND, now)
        || now.saturating_sub(REPLY_ALIVE.get(family).copied().unwrap_or(0)) > REPLY_ALIVE_NS
        || !spend(CPU_REPLY_BUDGET, CPU_REPLIES_PER_SECOND, now)
    {
        bump(connector, stat::REPLY_GATED);
        return Verdict::Drop;
    }
    let now = crate::now_ns();
    // A retransmission of a SYN already marked keeps its mark (and the
    // count of it `steer` made).
    if let Some(existing) = REPLY_FLOWS.get_ptr(flow) {
        // SAFETY: a map value, read at once.
        if now.saturating_sub(unsafe { (*existing).time_ns }) <= REPLY_MARK_TTL_NS {
            return Verdict::Pass;
        }
    }
    let mark = ReplyMark {
        time_ns: now,
        connector,
        rule,
        steered: 0,
        _pad: 0,
    };
    if REPLY_FLOWS.insert(flow, &mark, 0).is_err() {
        bump(connector, stat::REPLY_GATED);
        return Verdict::Drop;
    }
    if let Some(last) = LAST_REPLY_MARK.get_ptr_mut(0) {
        // SAFETY: a map value; a plain store (replies are few a second).
        unsafe { core::ptr::write_volatile(last, now) };
    }
    // Counted as replied by `steer`, once it has handed it over.
    Verdict::Pass
}

/// For [`reply`]: the SYN's refusal cache set is not known yet.
const SET_UNKNOWN: u32 = u32::MAX;

/// Takes one reply from this CPU's budget `slot` of `per_second` replies a
/// second; false when it is spent.
#[inline(always)]
fn spend(slot: u32, per_second: u32, now: u64) -> bool {
    let Some(budget) = REPLY_BUDGETS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array, which only this CPU's XDP
    // program writes.
    unsafe {
        if now.wrapping_sub((*budget).since_ns) >= 1_000_000_000 {
            (*budget).since_ns = now;
            (*budget).replies = 0;
        }
        if (*budget).replies >= per_second {
            return false;
        }
        (*budget).replies += 1;
    }
    true
}

#[inline(always)]
fn read_stamp(index: u32) -> u32 {
    RELEASE_STAMPS
        .get_ptr(index)
        // SAFETY: a live map value.
        .map_or(0, |stamp| unsafe { core::ptr::read_volatile(stamp) })
}

/// Counts into `STATS` with a fetching atomic add: a fence (see
/// [`atomic::increment_fenced`]).
#[inline(always)]
fn fenced_bump(row: u32, counter: u32) {
    if let Some(value) = STATS.get_ptr_mut(row * stat::COUNT + counter) {
        // SAFETY: a live map value.
        unsafe { atomic::increment_fenced(value) };
    }
}

/// [`limiter_common::admits`] for a source with `live_source` connections,
/// or (`None`) for any source ([`limiter_common::admits_any_source`]).
///
/// Not inlined: the rule's branches then end in one verdict, 0 or 1,
/// instead of multiplying the verifier's walk through what follows.
#[inline(never)]
fn admits(limits: &Limits, live_total: u32, live_source: Option<u32>) -> bool {
    match live_source {
        Some(live_source) => limiter_common::admits(limits, live_total, live_source),
        None => limiter_common::admits_any_source(limits, live_total),
    }
}

/// Makes this CPU's refusal cache remember that `flow`'s key is refused:
/// judged under `generation`, standing while the release stamp (`stamp`:
/// value, high half; index, low half; for the rate, the fields of
/// `CachedRefusal::rate_stamp`) is unchanged; `refusal` is the
/// connector id, the rule (bits 16..24) and the action (bits 24..). Returns
/// the refusals the entry held for the same key that no report carries
/// yet, for this refusal's report.
///
/// Not inlined: its stack is its own, beside the report's.
#[inline(never)]
fn remember(flow: &FlowKey, generation: u32, stamp: u64, refusal: u32) -> u32 {
    let (_, key) = cache_key(flow);
    let first = key.first_slot();
    let slot = slot_for(&key, first);
    if slot.is_null() {
        return 0;
    }
    // Before the refusal is written (its set may have been marked unused
    // since the slot was last written).
    mark_set_used(first);
    // SAFETY: this CPU's slot of a per-CPU array. The gate is taken first,
    // atomically (the daemon's sweep may be taking it too), and only then
    // is the rest written: a sweep that took it first read a whole entry.
    unsafe {
        let held = refusals::gate_count(atomic::swap64(&raw mut (*slot).gate, 0));
        let carried = if (*slot).holds(&key) {
            held
        } else {
            // Another key's entry with nothing left to report (see
            // `victim`): nothing is lost in taking it over.
            (*slot).remote = key.remote;
            (*slot).local = key.local;
            (*slot).local_port = key.local_port;
            (*slot).prefix_len = key.prefix_len;
            0
        };
        (*slot).remote_port = flow.remote_port;
        (*slot).connector = (refusal & 0xffff) + 1;
        (*slot).generation = generation;
        (*slot).stamp_index = stamp as u32;
        (*slot).stamp = (stamp >> 32) as u32;
        (*slot).rule = (refusal >> 16) as u8;
        (*slot).action = (refusal >> 24) as u8;
        carried
    }
}

/// A SYN passes: counted as passed, and remembered by its remote end on
/// this CPU, for a handshake the kernel moves elsewhere (see `SynSeen`).
#[inline(always)]
fn passed(flow: &FlowKey, connector: u32) -> Verdict {
    bump(connector, stat::SYN_PASSED);
    let remote = flow.remote_words();
    if let Some(slot) = SYNS_SEEN.get_ptr_mut(syn_seen_slot(remote[3], flow.remote_port)) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            *slot = SynSeen {
                remote,
                remote_port: flow.remote_port,
                local_port: flow.local_port,
                connector: connector + 1,
            }
        };
    }
    Verdict::Pass
}
