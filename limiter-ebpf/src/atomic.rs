//! The atomic operations the counts need, on BPF CPU v3.
//!
//! `core::sync::atomic` has no read-modify-write methods on the bpf target,
//! so these use the intrinsics. The ordering must not be `Relaxed`: LLVM
//! then emits a plain `lock +=` that does not fetch, and the "old value" is
//! the addend (see TOOLCHAIN.md).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg};

/// Adds one to `*counter` and returns the value before.
#[inline(always)]
pub fn increment(counter: *mut u32) -> u32 {
    // SAFETY: `counter` points into a map value, which the kernel keeps
    // alive and aligned for the whole run of the program.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, 1) }
}

/// Subtracts one from `*counter`, and puts it back if it was already zero,
/// so that a bug elsewhere can never leave a count at four billion and lock
/// a source out. No loop: the verifier walks every path of every call site.
#[inline(always)]
pub fn decrement(counter: *mut u32) {
    // SAFETY: as above.
    let before = unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, u32::MAX) };
    if before == 0 {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, 1) };
    }
}

/// Adds `value` to `*word` (wrapping) and returns the value before.
#[inline(always)]
pub fn add(word: *mut u64, value: u64) -> u64 {
    // SAFETY: `word` points into a map value, kept alive and aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(word, value) }
}

/// Sets `bits` in `*word`.
#[inline(always)]
pub fn or(word: *mut u64, bits: u64) {
    // SAFETY: as above.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) };
}

/// Replaces `*word` with `new` if it holds `expected`.
#[inline(always)]
pub fn compare_and_swap(word: *mut u64, expected: u64, new: u64) {
    // SAFETY: as above.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word, expected, new,
        )
    };
}

/// Adds `value` to `*counter`.
#[inline(always)]
pub fn add32(counter: *mut u32, value: u32) {
    // SAFETY: as above.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, value) };
}

/// Puts `value` in `*counter` and returns what it held.
#[inline(always)]
pub fn swap(counter: *mut u32, value: u32) -> u32 {
    // SAFETY: as above.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(counter, value) }
}
