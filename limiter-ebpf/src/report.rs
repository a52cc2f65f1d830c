//! Rejections: counted, reported to the daemon on the event ring (folded by
//! a gate under a flood), and, for a connection judged when its handshake
//! completed, a request to the daemon to reset it.

use limiter_common::{
    Evaluation, Rule,
    addr::{self, Words},
    maps::{
        ConnKey, ConnectorConfig, FlowKey, REPORT_INTERVAL_NS, RejectionEvent, ReportGate,
        ResetRequest, SourceCount, SourceKey, action, gate, reset_reason, stat,
    },
    rate,
    refusals::CachedRefusal,
};

use crate::{
    atomic,
    count::{
        RECENT_UNKNOWN, bump, connector_live, connector_state, ipv6_prefix_len, recent_unlocked,
    },
    maps::{CONNECTORS, EVENTS, PENDING_RESETS, REPORT_GATES, REPORT_SCRATCH, RESETS, SOURCE_LIVE},
};

/// A connection the rule refuses (or, with action monitor, would refuse).
pub struct Rejection<'a> {
    pub flow: &'a FlowKey,
    pub source: &'a SourceKey,
    pub config: &'a ConnectorConfig,
    pub evaluation: &'a Evaluation,
    /// The counts it met, before it.
    pub live_total: u32,
    pub live_source: u32,
    /// The source's connections in its rate window, before it.
    pub recent: u32,
    /// The source's entry, or null when it has none.
    pub entry: *mut SourceCount,
    /// Earlier refusals of the same flood from this CPU's refusal cache
    /// that no report carries yet: they go with this one.
    pub carried: u32,
    /// Judged when its handshake completed (not at its SYN): reported every
    /// time, not through a gate.
    pub at_completion: bool,
    /// Reset then (not only reported, as with action monitor).
    pub late: bool,
    /// Stands only for refusals reported before (see `report_held`).
    pub repeat: bool,
}

/// Where a report is put together before it is copied onto `EVENTS`: this
/// CPU's scratch entry for the XDP program (its chain of calls has no stack
/// to spare, and nothing else runs it on this CPU meanwhile), the stack for
/// the others (which an XDP program may interrupt on the same CPU).
pub const IN_SCRATCH: bool = true;
pub const ON_STACK: bool = false;

/// Counts a rejection and reports it. A refused SYN is reported through
/// its source's gate (its connector's for a source without an entry): one
/// report a second under a flood. A connection judged when its handshake
/// completed is reported every time: each cost its client a handshake.
///
/// Not inlined: a function of its own keeps the verifier from walking its
/// paths once for each way into it.
#[inline(never)]
pub fn reject<const SCRATCH: bool>(rejection: &Rejection) {
    let connector = rejection.source.connector;
    bump(
        connector,
        rejected_counter(
            rejection.evaluation.rule,
            rejection.config.action == action::MONITOR,
        ),
    );
    if rejection.late {
        bump(connector, stat::REJECTED_LATE);
    }
    if rejection.at_completion {
        report::<SCRATCH>(rejection, None, 0);
        return;
    }
    let gate = if rejection.entry.is_null() {
        REPORT_GATES.get_ptr_mut(connector)
    } else {
        // SAFETY: a live map value.
        Some(unsafe { &raw mut (*rejection.entry).gate })
    };
    if let Some(gate) = gate
        && let Some(folded) = through_gate(gate, rejection.carried)
    {
        report::<SCRATCH>(rejection, Some(gate), folded);
    }
}

/// Reports `held` refusals that the cache entry `cached` counted and that
/// the daemon's sweep took: one report, marked a repeat, that stands for
/// all of them, with the counts and caps of now. Whether it went onto the
/// ring.
#[inline(always)]
pub fn report_held(cached: &CachedRefusal, held: u32) -> bool {
    let connector = cached.connector.wrapping_sub(1);
    let Some(config) = CONNECTORS.get(connector).copied() else {
        return true;
    };
    let source = SourceKey::from_words(
        connector,
        addr::source_identity_words(cached.remote, ipv6_prefix_len()),
    );
    let live_total = connector_state(connector).map_or(0, connector_live);
    let entry = SOURCE_LIVE.get_ptr_mut(&source);
    // SAFETY: a live map value, read once.
    let live_source = entry.map_or(0, |e| unsafe {
        core::ptr::read_volatile(&raw const (*e).live)
    });
    let recent = entry
        .map(|e| recent_unlocked(e, crate::now_ns(), config.rate_slot_ns))
        .filter(|&recent| recent != RECENT_UNKNOWN)
        .unwrap_or(0) as u32;
    let mut evaluation = rate::judge(&config.limits, live_total, live_source, recent);
    evaluation.admitted = false;
    evaluation.rule = Rule::from_raw(cached.rule as u32).unwrap_or(Rule::PerSource);
    let mut recent = recent;
    if evaluation.rule == Rule::Rate {
        evaluation.cap = config.limits.max_inbound_connection_rate_per_source;
        // Each of them met a full window; it may have moved on since.
        recent = recent.max(evaluation.cap);
    }
    let flow = FlowKey::from_words(
        cached.local,
        cached.remote,
        cached.local_port,
        cached.remote_port,
    );
    report::<ON_STACK>(
        &Rejection {
            flow: &flow,
            source: &source,
            config: &config,
            evaluation: &evaluation,
            live_total,
            live_source,
            recent,
            entry: core::ptr::null_mut(),
            carried: 0,
            at_completion: false,
            late: false,
            repeat: true,
        },
        None,
        held - 1,
    )
}

/// Whether a rejection is reported now, carrying how many rejections
/// before it that no report carried; else it is counted into `gate` (see
/// [`ReportGate`]), with the `carried` ones.
#[inline(always)]
fn through_gate(gate: *mut ReportGate, carried: u32) -> Option<u32> {
    // The coarse clock is a plain read where the precise one costs a clock
    // source read, per SYN of a flood.
    let now = crate::coarse_now_ns();
    // SAFETY: `gate` points into a live map value.
    unsafe {
        let last = core::ptr::read_volatile(&raw const (*gate).reported_ns);
        if last != 0 && now.wrapping_sub(last) < REPORT_INTERVAL_NS {
            atomic::add32(&raw mut (*gate).unreported, carried.saturating_add(1));
            return None;
        }
        // Two CPUs may both get here: two reports, each with its own share.
        core::ptr::write_volatile(&raw mut (*gate).reported_ns, now);
        Some(atomic::swap(&raw mut (*gate).unreported, 0).saturating_add(carried))
    }
}

/// Puts a rejection on the event ring for the daemon; whether it could. A
/// full ring loses the report (counted), never the rejections: those of a
/// gate go back into it.
#[inline(always)]
fn report<const SCRATCH: bool>(
    rejection: &Rejection,
    gate: Option<*mut ReportGate>,
    folded: u32,
) -> bool {
    let kind = match (gate, rejection.entry.is_null()) {
        (None, _) => gate::NONE,
        (Some(_), true) => gate::CONNECTOR,
        (Some(_), false) => gate::SOURCE,
    };
    let sent = if SCRATCH {
        match REPORT_SCRATCH.get_ptr_mut(0) {
            Some(event) => {
                fill(event, rejection, kind, folded);
                // SAFETY: this CPU's entry, just written whole.
                EVENTS
                    .output::<RejectionEvent>(unsafe { &*event }, 0)
                    .is_ok()
            }
            None => false,
        }
    } else {
        // Written in place on the ring: not on a stack that is deep here.
        match EVENTS.reserve::<RejectionEvent>(0) {
            Some(mut event) => {
                fill(event.as_mut_ptr(), rejection, kind, folded);
                event.submit(0);
                true
            }
            None => false,
        }
    };
    if !sent {
        bump(stat::GLOBAL_ROW, stat::EVENTS_LOST);
        if let Some(gate) = gate {
            // SAFETY: `gate` points into a live map value.
            unsafe { atomic::add32(&raw mut (*gate).unreported, folded.saturating_add(1)) };
        }
    }
    sent
}

/// Writes every field of the report of `rejection` into `event`.
#[inline(always)]
fn fill(event: *mut RejectionEvent, rejection: &Rejection, kind: u32, folded: u32) {
    let (flow, source, config) = (rejection.flow, rejection.source, rejection.config);
    // SAFETY: `event` points to a whole `RejectionEvent` (a map value or
    // the caller's stack); its address fields are at multiples of four in
    // a `#[repr(C)]` value (see limiter-common's layout test), so they take
    // words.
    unsafe {
        (*event).time_ns = crate::now_ns();
        (*event).connector = source.connector;
        (*event).rule = rejection.evaluation.rule as u32;
        (*event).action = config.action;
        (*event).live_total = rejection.live_total;
        (*event).live_source = rejection.live_source;
        (*event).cap = rejection.evaluation.cap;
        (*event).limits = config.limits;
        (*event).local_port = flow.local_port;
        (*event).remote_port = flow.remote_port;
        *(&raw mut (*event).source).cast::<Words>() = source.addr_words();
        *(&raw mut (*event).remote).cast::<Words>() = flow.remote_words();
        *(&raw mut (*event).local).cast::<Words>() = flow.local_words();
        (*event).folded = folded;
        (*event).gate = kind;
        (*event).late = rejection.late as u32;
        (*event).repeat = rejection.repeat as u32;
        (*event).recent = rejection.recent;
        (*event)._pad = 0;
    }
}

/// Asks the daemon to reset a connection (only userspace can reset a socket
/// from outside it): recorded in `PENDING_RESETS` until it is done (so the
/// daemon retries a reset that failed, and never counts the connection as
/// one that predates it), and rung on the `RESETS` ring. A full ring leaves
/// it to the daemon's sweep.
#[inline(never)]
pub fn request_reset(conn: &ConnKey, socket_cookie: u64, reason: u32) {
    crate::diag::note(if reason == reset_reason::TABLE_FULL {
        limiter_common::maps::diag::TABLE_FULL
    } else {
        limiter_common::maps::diag::LATE_RESET
    });
    let request = ResetRequest {
        conn: *conn,
        socket_cookie,
        reason,
        _pad: 0,
        time_ns: crate::now_ns(),
    };
    let _ = PENDING_RESETS.insert(conn, request, 0);
    match RESETS.reserve::<ResetRequest>(0) {
        Some(mut slot) => {
            slot.write(request);
            slot.submit(0);
        }
        None => bump(stat::GLOBAL_ROW, stat::RESETS_DEFERRED),
    }
}

/// The counter of a refusal by `rule`; with action monitor, of one that
/// would have been (the connection was admitted).
#[inline(always)]
pub fn rejected_counter(rule: Rule, monitor: bool) -> u32 {
    match (rule, monitor) {
        (Rule::Total, false) => stat::REJECTED_TOTAL,
        (Rule::Total, true) => stat::MONITORED_TOTAL,
        (Rule::PerSource, false) => stat::REJECTED_PER_SOURCE,
        (Rule::PerSource, true) => stat::MONITORED_PER_SOURCE,
        (Rule::None | Rule::Percentage, false) => stat::REJECTED_PERCENTAGE,
        (Rule::None | Rule::Percentage, true) => stat::MONITORED_PERCENTAGE,
        (Rule::Rate, false) => stat::REJECTED_RATE,
        (Rule::Rate, true) => stat::MONITORED_RATE,
    }
}
