//! Programs to measure limiter against, and to load it with:
//!
//! - `bare_pass` / `bare_drop`: XDP programs that do nothing but return
//!   XDP_PASS / XDP_DROP, the floor any XDP program is compared to;
//! - `header_drop`: drops SYNs to port 25 after reading the headers, the
//!   floor of any SYN filter;
//! - `cache_drop`: drops a SYN to port 25 whose refusal key a per-CPU array
//!   holds, the floor of a refusal from a per-CPU cache (one CPU-local
//!   lookup, as the limiter's refusal cache makes);
//! - `flood_gen`: run through BPF_PROG_TEST_RUN in live-frames mode on one
//!   end of a veth, it turns a template SYN into a stream of SYNs from
//!   `FLOOD_SOURCES` source addresses and new source ports, sent out with
//!   XDP_TX: millions of packets a second, which userspace senders cannot
//!   reach.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use limiter_common::{
    addr,
    maps::FlowKey,
    refusals::{CachedRefusal, REFUSAL_SLOTS, REFUSAL_WAYS, RefusalKey},
};

#[xdp]
pub fn bare_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bare_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The least any SYN filter does: reads the Ethernet, IPv4 and TCP headers
/// and drops a SYN to port 25 (everything else passes). Set beside
/// `bare_drop`, which never touches the frame, it shows what reading a
/// frame costs.
#[xdp]
pub fn header_drop(ctx: XdpContext) -> u32 {
    try_header_drop(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_header_drop(ctx: &XdpContext) -> Option<u32> {
    Some(match syn_to_port_25(ctx)? {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    })
}

const ETHERTYPE: usize = 12;
const IP: usize = 14;

/// Where the TCP header of a SYN to port 25 starts (`Some(None)`: the frame
/// is something else; `None`: too short to tell). Ethernet, IPv4, TCP.
#[inline(always)]
fn syn_to_port_25(ctx: &XdpContext) -> Option<Option<usize>> {
    let start = ctx.data();
    if start + IP + 20 > ctx.data_end() {
        return None;
    }
    let frame = start as *mut u8;
    // SAFETY: the Ethernet header and 20 bytes of IP header were checked.
    let (ethertype, version_ihl, protocol) =
        unsafe { (read16(frame, ETHERTYPE), *frame.add(IP), *frame.add(IP + 9)) };
    if ethertype != 0x0800 || protocol != 6 {
        return Some(None);
    }
    let tcp = IP + ((version_ihl & 0x0f) as usize) * 4;
    if start + tcp + 20 > ctx.data_end() {
        return None;
    }
    // SAFETY: 20 bytes of TCP header were checked.
    let (port, flags) = unsafe { (read16(frame, tcp + 2), *frame.add(tcp + 13)) };
    let syn = flags & 0x12 == 0x02;
    Some((syn && port == 25).then_some(tcp))
}

/// The refusals `cache_drop` knows, laid out as the limiter's refusal
/// cache (filled by the bench).
#[map(name = "CACHE")]
static CACHE: PerCpuArray<CachedRefusal> = PerCpuArray::with_max_entries(REFUSAL_SLOTS, 0);

/// The least a refusal from a per-CPU cache does: reads the headers as
/// `header_drop` does, makes the SYN's refusal key, looks its set up in a
/// per-CPU array and drops the SYN when a slot holds the key (else passes
/// it). Beside the limiter's refusal from its cache, it shows what the
/// checks that make a cached refusal exact (the configuration generation,
/// the release stamp, the counts) cost on top of the lookup.
#[xdp]
pub fn cache_drop(ctx: XdpContext) -> u32 {
    try_cache_drop(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_cache_drop(ctx: &XdpContext) -> Option<u32> {
    let Some(tcp) = syn_to_port_25(ctx)? else {
        return Some(xdp_action::XDP_PASS);
    };
    let frame = ctx.data() as *mut u8;
    // SAFETY: the IP header's addresses and the TCP ports were checked by
    // `syn_to_port_25`.
    let flow = unsafe {
        FlowKey::from_words(
            addr::ipv4_words(core::ptr::read_unaligned(frame.add(IP + 16) as *const u32)),
            addr::ipv4_words(core::ptr::read_unaligned(frame.add(IP + 12) as *const u32)),
            read16(frame, tcp + 2),
            read16(frame, tcp),
        )
    };
    let key = RefusalKey::of(&flow, 128);
    let first = key.first_slot();
    let mut way = 0;
    while way < REFUSAL_WAYS {
        if let Some(entry) = CACHE.get_ptr(first + way) {
            // SAFETY: this CPU's slot of a per-CPU array.
            if unsafe { (*entry).holds(&key) } {
                return Some(xdp_action::XDP_DROP);
            }
        }
        way += 1;
    }
    Some(xdp_action::XDP_PASS)
}

/// Packets generated on this CPU.
#[map(name = "FLOOD_COUNT")]
static FLOOD_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How many source addresses to cycle through: a power of two, at most
/// 65,536 (they differ in the low 16 bits of the template's address).
#[map(name = "FLOOD_SOURCES")]
static FLOOD_SOURCES: Array<u32> = Array::with_max_entries(1, 0);

/// Ethernet, IPv4 without options, TCP without options.
const FRAME_LEN: usize = 54;
const IP_CHECKSUM: usize = 24;
const SOURCE_LOW: usize = 28;
const SOURCE_PORT: usize = 34;
const TCP_CHECKSUM: usize = 50;

#[xdp]
pub fn flood_gen(ctx: XdpContext) -> u32 {
    try_flood_gen(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_flood_gen(ctx: &XdpContext) -> Option<u32> {
    let start = ctx.data();
    if start + FRAME_LEN > ctx.data_end() {
        return None;
    }
    let frame = start as *mut u8;
    let count = FLOOD_COUNT.get_ptr_mut(0)?;
    let sources = *FLOOD_SOURCES.get(0)?;
    // SAFETY: a per-CPU slot; the frame's FRAME_LEN bytes were checked.
    unsafe {
        let n = *count;
        *count = n + 1;
        let mask = sources.saturating_sub(1) as u64;
        let source_low = (n & mask) as u16;
        let port = 1024 + ((n / (mask + 1)) % 60_000) as u16;
        let old_source = read16(frame, SOURCE_LOW);
        let old_port = read16(frame, SOURCE_PORT);
        write16(frame, SOURCE_LOW, source_low);
        write16(frame, SOURCE_PORT, port);
        // RFC 1624: HC' = ~(~HC + ~m + m') for each changed word.
        let ip = update(read16(frame, IP_CHECKSUM), old_source, source_low);
        write16(frame, IP_CHECKSUM, ip);
        let tcp = update(read16(frame, TCP_CHECKSUM), old_source, source_low);
        let tcp = update(tcp, old_port, port);
        write16(frame, TCP_CHECKSUM, tcp);
    }
    Some(xdp_action::XDP_TX)
}

#[inline(always)]
unsafe fn read16(frame: *mut u8, at: usize) -> u16 {
    // SAFETY: within the checked frame.
    unsafe { u16::from_be_bytes([*frame.add(at), *frame.add(at + 1)]) }
}

#[inline(always)]
unsafe fn write16(frame: *mut u8, at: usize, value: u16) {
    let bytes = value.to_be_bytes();
    // SAFETY: within the checked frame.
    unsafe {
        *frame.add(at) = bytes[0];
        *frame.add(at + 1) = bytes[1];
    }
}

#[inline(always)]
fn update(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!checksum as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
