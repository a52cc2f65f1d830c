//! The atomic operations the counts need, on BPF CPU v3.
//!
//! `core::sync::atomic` has no read-modify-write methods on the bpf target,
//! so these use the intrinsics. The ordering must not be `Relaxed`: LLVM
//! then emits a plain `lock +=` that does not fetch, and the "old value" is
//! the addend (see TOOLCHAIN.md).
//!
//! Each takes a raw pointer, so each is `unsafe`: the caller promises it
//! points into a live map value (the kernel keeps it alive and aligned for
//! the whole run of the program).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg};

/// Adds one to `*counter` and returns the value before.
#[inline(always)]
pub unsafe fn increment(counter: *mut u32) -> u32 {
    // SAFETY: the caller's promise (see the module).
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, 1) }
}

/// Subtracts one from `*counter` unless it is zero (compare-and-swap), so
/// that a bug elsewhere can never leave a count at four billion and lock a
/// source out. A few tries: the verifier walks every path of every call
/// site, and the counter moves only when another CPU changes it.
#[inline(always)]
pub unsafe fn decrement(counter: *mut u32) {
    let mut tries = 0;
    while tries < 8 {
        // SAFETY: the caller's promise (see the module).
        let seen = unsafe { core::ptr::read_volatile(counter) };
        if seen == 0 {
            return;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                counter,
                seen,
                seen - 1,
            )
        };
        if swapped {
            return;
        }
        tries += 1;
    }
}

/// Adds `value` to `*counter`.
#[inline(always)]
pub unsafe fn add32(counter: *mut u32, value: u32) {
    // SAFETY: as above.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(counter, value) };
}

/// Puts `value` in `*counter` and returns what it held.
#[inline(always)]
pub unsafe fn swap(counter: *mut u32, value: u32) -> u32 {
    // SAFETY: as above.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(counter, value) }
}

/// Puts `value` in `*word` and returns what it held.
#[inline(always)]
pub unsafe fn swap64(word: *mut u64, value: u64) -> u64 {
    // SAFETY: as above.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(word, value) }
}

/// Puts `new` in `*word` if it holds `old`; returns whether it did.
#[inline(always)]
pub unsafe fn compare_and_swap64(word: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: as above.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, old, new)
    }
    .1
}

/// Adds one to `*counter`, as a full barrier: loads after it are not done
/// before it, nor loads before it after it (a fetching atomic is
/// `lock xadd` on x86 and `ldaddal` on arm64).
#[inline(always)]
pub unsafe fn increment_fenced(counter: *mut u64) {
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, 1) };
}
