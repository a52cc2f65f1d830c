//! Rejections: counted, reported to the daemon on the event ring (folded by
//! a gate under a flood), and, for a connection judged when its handshake
//! completed, a request to the daemon to reset it.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use limiter_common::{
    Evaluation, Rule,
    maps::{
        ConnKey, ConnectorConfig, FlowKey, REPORT_INTERVAL_NS, RejectionEvent, ReportGate,
        ResetRequest, SourceCount, SourceKey, gate, stat,
    },
};

use crate::{
    atomic,
    count::bump,
    maps::{EVENTS, PENDING_RESETS, REPORT_GATES, RESETS},
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
    /// The source's entry, or null when it has none.
    pub entry: *mut SourceCount,
    /// Judged when its handshake completed (not at its SYN): reported every
    /// time, not through a gate.
    pub at_completion: bool,
    /// Reset then (not only reported, as with action monitor).
    pub late: bool,
}

/// Counts a rejection and reports it. A refused SYN is reported through
/// its source's gate (its connector's for a source without an entry): one
/// report a second under a flood. A connection judged when its handshake
/// completed is reported every time: each cost its client a handshake.
///
/// Not inlined: a function of its own keeps the verifier from walking its
/// paths once for each way into it.
#[inline(never)]
pub fn reject(rejection: &Rejection) {
    let connector = rejection.source.connector;
    bump(connector, rejected_counter(rejection.evaluation.rule));
    if rejection.late {
        bump(connector, stat::REJECTED_LATE);
    }
    if rejection.at_completion {
        report(rejection, None, 0);
        return;
    }
    let gate = if rejection.entry.is_null() {
        REPORT_GATES.get_ptr_mut(connector)
    } else {
        // SAFETY: a live map value.
        Some(unsafe { &raw mut (*rejection.entry).gate })
    };
    if let Some(gate) = gate
        && let Some(folded) = through_gate(gate)
    {
        report(rejection, Some(gate), folded);
    }
}

/// Whether a rejection is reported now, carrying how many rejections
/// before it that no report carried; else it is counted into `gate` (see
/// [`ReportGate`]).
#[inline(always)]
fn through_gate(gate: *mut ReportGate) -> Option<u32> {
    // SAFETY: a helper without arguments; the coarse clock is a plain read
    // where the precise one costs a clock source read, per SYN of a flood.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `gate` points into a live map value.
    unsafe {
        let last = core::ptr::read_volatile(&raw const (*gate).reported_ns);
        if last != 0 && now.wrapping_sub(last) < REPORT_INTERVAL_NS {
            atomic::add32(&raw mut (*gate).unreported, 1);
            return None;
        }
        // Two CPUs may both get here: two reports, each with its own share.
        core::ptr::write_volatile(&raw mut (*gate).reported_ns, now);
        Some(atomic::swap(&raw mut (*gate).unreported, 0))
    }
}

/// Puts a rejection on the event ring for the daemon. A full ring loses the
/// report (counted), never the rejections: they go back into the gate.
#[inline(always)]
fn report(rejection: &Rejection, gate: Option<*mut ReportGate>, folded: u32) {
    let Some(mut slot) = EVENTS.reserve::<RejectionEvent>(0) else {
        bump(stat::GLOBAL_ROW, stat::EVENTS_LOST);
        if let Some(gate) = gate {
            // SAFETY: `gate` points into a live map value.
            unsafe { atomic::add32(&raw mut (*gate).unreported, folded.saturating_add(1)) };
        }
        return;
    };
    let (flow, source, config) = (rejection.flow, rejection.source, rejection.config);
    slot.write(RejectionEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        connector: source.connector,
        rule: rejection.evaluation.rule as u32,
        action: config.action,
        live_total: rejection.live_total,
        live_source: rejection.live_source,
        cap: rejection.evaluation.cap,
        limits: config.limits,
        local_port: flow.local_port,
        remote_port: flow.remote_port,
        source: source.addr,
        remote: flow.remote,
        local: flow.local,
        folded,
        gate: match (gate, rejection.entry.is_null()) {
            (None, _) => gate::NONE,
            (Some(_), true) => gate::CONNECTOR,
            (Some(_), false) => gate::SOURCE,
        },
        late: rejection.late as u32,
        _pad: 0,
    });
    slot.submit(0);
}

/// Asks the daemon to reset a connection (only userspace can reset a socket
/// from outside it): recorded in `PENDING_RESETS` until it is done (so the
/// daemon retries a reset that failed, and never counts the connection as
/// one that predates it), and rung on the `RESETS` ring. A full ring leaves
/// it to the daemon's sweep.
#[inline(never)]
pub fn request_reset(conn: &ConnKey, socket_cookie: u64, reason: u32) {
    let request = ResetRequest {
        conn: *conn,
        socket_cookie,
        reason,
        _pad: 0,
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
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

#[inline(always)]
fn rejected_counter(rule: Rule) -> u32 {
    match rule {
        Rule::Total => stat::REJECTED_TOTAL,
        Rule::PerSource => stat::REJECTED_PER_SOURCE,
        Rule::None | Rule::Percentage => stat::REJECTED_PERCENTAGE,
    }
}
