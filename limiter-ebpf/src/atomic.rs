//! The two atomic operations the counts need, on BPF CPU v3.
//!
//! `core::sync::atomic` has no read-modify-write methods on the bpf target,
//! so these use the intrinsics. The ordering must not be `Relaxed`: LLVM
//! then emits a plain `lock +=` that does not fetch, and the "old value" is
//! the addend (see TOOLCHAIN.md).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

/// Adds one to `*counter` and returns the value before.
#[inline(always)]
pub fn increment(counter: *mut u32) -> u32 {
    // SAFETY: `counter` points into a map value, which the kernel keeps
    // alive and aligned for the whole run of the program.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, 1) }
}

/// Subtracts one from `*counter` unless it is already zero, so that a bug
/// elsewhere can never wrap a count to four billion and lock a source out.
#[inline(always)]
pub fn decrement(counter: *mut u32) {
    // A few rounds are plenty: each failure means another CPU changed the
    // count in the few instructions between the load and the exchange.
    let mut round = 0;
    while round < 8 {
        // SAFETY: as above.
        let current = unsafe { core::ptr::read_volatile(counter) };
        if current == 0 {
            return;
        }
        let (_, exchanged) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                counter,
                current,
                current - 1,
            )
        };
        if exchanged {
            return;
        }
        round += 1;
    }
}
