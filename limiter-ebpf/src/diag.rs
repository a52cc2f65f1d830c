//! Rare kernel-side conditions, told to the operator through aya-log at the
//! level `limiter run --kernel-log-level` sets. Off by default: the level
//! is then a constant of the loaded programs (a read-only global the daemon
//! sets at load), and the verifier drops everything here, the counting
//! too. A condition is noted where it happens (a per-CPU count) and told
//! from the program's top, at most once a second per CPU and condition,
//! with how many happened since: never a line per packet.

use aya_ebpf::{EbpfContext, Global};
use aya_log_ebpf::{error, info, warn};
use limiter_common::maps::{DiagGate, diag};

use crate::maps::DIAG_GATES;

/// aya-log's level number from which conditions are told (0: off), set by
/// the daemon at load (`limiter_common::maps::KERNEL_LOG_LEVEL`).
#[unsafe(no_mangle)]
static KERNEL_LOG_LEVEL: Global<u8> = Global::new(0);

#[inline(always)]
fn off() -> bool {
    KERNEL_LOG_LEVEL.load() == 0
}

/// Counts one `condition` (a [`diag`] index) on this CPU.
#[inline(always)]
pub fn note(condition: u32) {
    if off() {
        return;
    }
    if let Some(gate) = DIAG_GATES.get_ptr_mut(condition) {
        // SAFETY: this CPU's slot of a per-CPU array. Plain stores: an XDP
        // program may interrupt a sock_ops or control run on this CPU and
        // lose a count or tell twice in a second, nothing worse.
        unsafe { (*gate).count += 1 };
    }
}

/// Tells what was noted on this CPU, each condition at most once a second.
#[inline(always)]
pub fn tell<C: EbpfContext>(ctx: &C) {
    if off() {
        return;
    }
    if let Some(n) = due(diag::UNREADABLE) {
        warn!(
            ctx,
            "dropped {} SYN(s) to a bound port that could not be read whole (cut by fragmentation, or behind more headers than followed)",
            n
        );
    }
    if let Some(n) = due(diag::TABLE_FULL) {
        warn!(
            ctx,
            "{} connection(s) reset because a table they needed was full (raise --table-entries)",
            n
        );
    }
    if let Some(n) = due(diag::LATE_RESET) {
        info!(
            ctx,
            "{} connection(s) judged over a cap when their handshake completed, to be reset", n
        );
    }
    if let Some(n) = due(diag::LOST_SOURCE) {
        error!(
            ctx,
            "{} released connection(s) found no source entry to give their count back to (a state thought impossible: please report)",
            n
        );
    }
}

/// The count of `condition` since it was last told, if it is time to tell.
#[inline(always)]
fn due(condition: u32) -> Option<u64> {
    let gate = DIAG_GATES.get_ptr_mut(condition)?;
    // SAFETY: as in `note`; a helper without arguments.
    unsafe {
        if (*gate).count == 0 {
            return None;
        }
        let now = crate::coarse_now_ns();
        if now.wrapping_sub((*gate).told_ns) < 1_000_000_000 && (*gate).told_ns != 0 {
            return None;
        }
        let count = (*gate).count;
        (*gate).count = 0;
        (*gate).told_ns = now;
        Some(count)
    }
}
