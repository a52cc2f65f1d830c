//! Addresses as the maps store them: 16 bytes, IPv4 as `::ffff:a.b.c.d`.
//!
//! One representation for both families keeps one set of maps, and it is the
//! form in which a dual-stack socket already reports an IPv4 peer.

/// An address in map form.
pub type Addr = [u8; 16];

/// The IPv4-mapped prefix `::ffff:0:0/96`.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Prefix length of the IPv4-mapped block, added to an IPv4 prefix length.
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

/// `a.b.c.d` (network byte order octets) as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn from_ipv4(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether `addr` is an IPv4 address in mapped form.
#[inline(always)]
pub fn is_ipv4(addr: &Addr) -> bool {
    addr[..12] == V4_MAPPED_PREFIX
}

/// The wildcard local address of a family (`0.0.0.0` or `::`) in map form.
#[inline(always)]
pub const fn wildcard(ipv4: bool) -> Addr {
    if ipv4 { from_ipv4([0; 4]) } else { [0; 16] }
}

/// The identity of a source: an IPv4 address as it is, an IPv6 address cut to
/// its first `ipv6_prefix_len` bits (one IPv6 host owns a whole /64).
#[inline(always)]
pub fn source_identity(remote: &Addr, ipv6_prefix_len: u32) -> Addr {
    if is_ipv4(remote) {
        return *remote;
    }
    let mut out = [0u8; 16];
    let mut i = 0;
    // A fixed trip count keeps the verifier's job trivial.
    while i < 16 {
        let bit = (i as u32) * 8;
        out[i] = if bit + 8 <= ipv6_prefix_len {
            remote[i]
        } else if bit >= ipv6_prefix_len {
            0
        } else {
            remote[i] & (0xffu8 << (8 - (ipv6_prefix_len - bit)))
        };
        i += 1;
    }
    out
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
