//! The kernel side of limiter.
//!
//! - `admit` (XDP; `admit_l3` on an interface without a link layer) refuses
//!   a SYN to a bound port that Exchange's rule refuses on the live counts;
//!   everything else passes ([`admit`]).
//! - `track` (sock_ops) judges a connection again when its handshake
//!   completes, under the connector's lock, and counts it until the
//!   server's socket closes; over a cap, it has the daemon reset it
//!   ([`track`]).
//! - `steer` (sk_lookup) hands a SYN refused with action `reply` to the
//!   daemon's responder, which answers it with a 421 line ([`steer`]).
//! - `control` (XDP, never attached) is run by the daemon to count
//!   connections that predate it and to keep its tables tidy ([`control`]).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics: see atomic.rs")]

mod admit;
mod atomic;
mod control;
mod count;
mod diag;
mod maps;
mod parse;
mod report;
mod reset;
mod steer;
mod time;
mod track;

use aya_ebpf::{
    macros::{sk_lookup, sock_ops, xdp},
    programs::{SkLookupContext, SockOpsContext, XdpContext},
};
use parse::LinkLayer;
pub(crate) use time::{coarse_now_ns, now_ns};

/// One load from a program's context, at the field's own offset: the
/// verifier refuses a context pointer the compiler offset by a variable.
#[inline(always)]
pub(crate) unsafe fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
}

#[xdp]
pub fn admit(ctx: XdpContext) -> u32 {
    admit::run(&ctx, LinkLayer::Ethernet)
}

#[xdp]
pub fn admit_l3(ctx: XdpContext) -> u32 {
    admit::run(&ctx, LinkLayer::None)
}

#[sock_ops]
pub fn track(ctx: SockOpsContext) -> u32 {
    track::run(&ctx);
    1
}

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    steer::run(&ctx)
}

#[xdp]
pub fn control(ctx: XdpContext) -> u32 {
    control::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
