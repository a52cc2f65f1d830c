//! Addresses as the maps store them: 16 bytes, IPv4 as `::ffff:a.b.c.d`.
//!
//! One representation for both families keeps one set of maps, and it is the
//! form in which a dual-stack socket already reports an IPv4 peer.

/// An address in map form.
pub type Addr = [u8; 16];

/// Prefix length of the IPv4-mapped block, added to an IPv4 prefix length.
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

/// An address as four words, each holding four of its bytes in memory order
/// (as one load from a packet or a socket field gives them). The eBPF side
/// builds and compares addresses a word at a time: byte by byte, the
/// compiler calls a byte-at-a-time `memset` to clear them first.
pub type Words = [u32; 4];

/// The third word of an IPv4-mapped address: bytes `00 00 ff ff`.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An address from its [`Words`].
#[inline(always)]
pub const fn from_words(words: Words) -> Addr {
    let [a, b, c, d] = words;
    let (a, b, c, d) = (
        a.to_ne_bytes(),
        b.to_ne_bytes(),
        c.to_ne_bytes(),
        d.to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The [`Words`] of an address.
#[inline(always)]
pub const fn to_words(addr: &Addr) -> Words {
    const fn word(addr: &Addr, i: usize) -> u32 {
        u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]])
    }
    [word(addr, 0), word(addr, 4), word(addr, 8), word(addr, 12)]
}

/// An IPv4 address, given as its four bytes in one word (memory order), as
/// the words of `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn ipv4_words(word: u32) -> Words {
    [0, 0, V4_MAPPED_WORD, word]
}

/// An IPv4 address, given as its four bytes in one word (memory order), as
/// `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn from_ipv4_word(word: u32) -> Addr {
    from_words(ipv4_words(word))
}

/// `a.b.c.d` (network byte order octets) as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn from_ipv4(octets: [u8; 4]) -> Addr {
    from_ipv4_word(u32::from_ne_bytes(octets))
}

/// Whether `addr` is an IPv4 address in mapped form.
#[inline(always)]
pub fn is_ipv4(addr: &Addr) -> bool {
    words_are_ipv4(&to_words(addr))
}

/// [`is_ipv4`] on [`Words`].
#[inline(always)]
pub fn words_are_ipv4(words: &Words) -> bool {
    let [a, b, c, _] = *words;
    a == 0 && b == 0 && c == V4_MAPPED_WORD
}

/// The wildcard local address of a family (`0.0.0.0` or `::`) in map form.
#[inline(always)]
pub const fn wildcard(ipv4: bool) -> Addr {
    from_words(wildcard_words(ipv4))
}

/// [`wildcard`] as [`Words`].
#[inline(always)]
pub const fn wildcard_words(ipv4: bool) -> Words {
    if ipv4 { ipv4_words(0) } else { [0; 4] }
}

/// The identity of a source: an IPv4 address as it is, an IPv6 address cut to
/// its first `ipv6_prefix_len` bits (one IPv6 host owns a whole /64).
#[inline(always)]
pub fn source_identity(remote: &Addr, ipv6_prefix_len: u32) -> Addr {
    from_words(source_identity_words(to_words(remote), ipv6_prefix_len))
}

/// [`source_identity`] on [`Words`].
#[inline(always)]
pub fn source_identity_words(remote: Words, ipv6_prefix_len: u32) -> Words {
    if words_are_ipv4(&remote) {
        return remote;
    }
    // Two 64-bit halves: few values for the compiler to keep (and the
    // eBPF verifier to follow), where bytes would be sixteen.
    let [a, b, c, d] = remote;
    let half = |first: u32, second: u32| {
        let (first, second) = (first.to_ne_bytes(), second.to_ne_bytes());
        u64::from_be_bytes([
            first[0], first[1], first[2], first[3], second[0], second[1], second[2], second[3],
        ])
    };
    let keep = |bits: u32| -> u64 {
        match bits {
            0 => 0,
            1..=63 => u64::MAX << (64 - bits),
            _ => u64::MAX,
        }
    };
    let high = (half(a, b) & keep(ipv6_prefix_len.min(64))).to_be_bytes();
    let low = (half(c, d) & keep(ipv6_prefix_len.saturating_sub(64).min(64))).to_be_bytes();
    let word = |bytes: [u8; 8], at: usize| {
        u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    [word(high, 0), word(high, 4), word(low, 0), word(low, 4)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Addr {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn ipv4_is_mapped() {
        let a = from_ipv4([192, 0, 2, 7]);
        assert!(is_ipv4(&a));
        assert_eq!(a, v6("::ffff:192.0.2.7"));
        assert!(!is_ipv4(&v6("2001:db8::1")));
        assert!(is_ipv4(&wildcard(true)));
        assert!(!is_ipv4(&wildcard(false)));
        assert!(!is_ipv4(&v6("::1:ffff:c000:207")));
        assert!(!is_ipv4(&v6("1::ffff:c000:207")));
    }

    #[test]
    fn words_keep_the_byte_order() {
        let a = v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        assert_eq!(from_words(to_words(&a)), a);
        assert_eq!(
            to_words(&a)[0],
            u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8])
        );
        assert_eq!(
            from_ipv4_word(u32::from_ne_bytes([192, 0, 2, 7])),
            v6("::ffff:192.0.2.7")
        );
    }

    #[test]
    fn ipv4_source_is_the_address() {
        let a = from_ipv4([10, 1, 2, 3]);
        assert_eq!(source_identity(&a, 64), a);
        assert_eq!(source_identity(&a, 0), a);
    }

    #[test]
    fn ipv6_source_is_cut_to_the_prefix() {
        let a = v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        assert_eq!(source_identity(&a, 64), v6("2001:db8:1:2::"));
        assert_eq!(source_identity(&a, 48), v6("2001:db8:1::"));
        assert_eq!(source_identity(&a, 128), a);
        assert_eq!(source_identity(&a, 0), v6("::"));
        // A prefix that is not a whole number of bytes.
        assert_eq!(source_identity(&a, 60), v6("2001:db8:1:0::"));
        assert_eq!(
            source_identity(&v6("2001:db8:1:ff::"), 60),
            v6("2001:db8:1:f0::")
        );
    }
}
