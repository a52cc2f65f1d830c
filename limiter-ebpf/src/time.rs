//! The clocks the programs read.

/// The monotonic clock, in ns.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// The monotonic clock at a tick's resolution: a plain read, where
/// [`now_ns`] reads the clock source.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}
