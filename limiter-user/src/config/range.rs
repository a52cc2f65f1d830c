//! Remote IP ranges as Exchange accepts them: a single address, a CIDR
//! block, or `first-last`, IPv4 or IPv6.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpRange {
    first: IpAddr,
    last: IpAddr,
    /// How it was written, to print it back the same way.
    form: Form,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Form {
    Single,
    Cidr(u8),
    Span,
}

/// Why a range did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not an IP address, a CIDR block or a first-last range")]
    Syntax(String),
    #[error("{0:?}: the two ends of a range must be of the same family")]
    MixedFamilies(String),
    #[error("{0:?}: the first address of a range comes after the last")]
    Reversed(String),
    #[error("{0:?}: CIDR block has host bits set (did you mean {1}?)")]
    HostBits(String, IpNet),
}

impl IpRange {
    /// The range holding exactly `addr`.
    pub fn single(addr: IpAddr) -> Self {
        IpRange {
            first: addr,
            last: addr,
            form: Form::Single,
        }
    }

    /// The whole address space of one family (`0.0.0.0/0` or `::/0`).
    pub fn everything(ipv4: bool) -> Self {
        let net: IpNet = if ipv4 {
            "0.0.0.0/0".parse().expect("valid CIDR")
        } else {
            "::/0".parse().expect("valid CIDR")
        };
        Self::from_net(net)
    }

    fn from_net(net: IpNet) -> Self {
        IpRange {
            first: net.network(),
            last: net.broadcast(),
            form: Form::Cidr(net.prefix_len()),
        }
    }

    pub fn first(&self) -> IpAddr {
        self.first
    }

    pub fn last(&self) -> IpAddr {
        self.last
    }

    pub fn is_ipv4(&self) -> bool {
        self.first.is_ipv4()
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.is_ipv4() && self.first <= addr && addr <= self.last
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains_range(&self, other: &IpRange) -> bool {
        self.contains(other.first) && self.contains(other.last)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.is_ipv4() == other.is_ipv4() && self.first <= other.last && other.first <= self.last
    }

    /// Number of addresses in the range (fits: at most 2^128 - 1 + 1 wraps
    /// only for `::/0`, which is reported as `u128::MAX`).
    pub fn size(&self) -> u128 {
        let (first, last) = match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
            _ => unreachable!("families are checked at construction"),
        };
        (last - first).saturating_add(1)
    }

    /// The fewest CIDR blocks that cover exactly this range. Each is the
    /// largest aligned block inside the range around its addresses, which is
    /// what makes longest-prefix matching choose the smaller of two nested
    /// ranges (see `selection`).
    pub fn cidrs(&self) -> Vec<IpNet> {
        match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect(),
            (IpAddr::V6(a), IpAddr::V6(b)) => Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect(),
            _ => unreachable!("families are checked at construction"),
        }
    }
}

impl FromStr for IpRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, RangeError> {
        let s = text.trim();
        if let Some((first, last)) = s.split_once('-') {
            let first: IpAddr = first
                .trim()
                .parse()
                .map_err(|_| RangeError::Syntax(text.to_string()))?;
            let last: IpAddr = last
                .trim()
                .parse()
                .map_err(|_| RangeError::Syntax(text.to_string()))?;
            if first.is_ipv4() != last.is_ipv4() {
                return Err(RangeError::MixedFamilies(text.to_string()));
            }
            if first > last {
                return Err(RangeError::Reversed(text.to_string()));
            }
            return Ok(IpRange {
                first,
                last,
                form: Form::Span,
            });
        }
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|_| RangeError::Syntax(text.to_string()))?;
            if net.trunc() != net {
                return Err(RangeError::HostBits(text.to_string(), net.trunc()));
            }
            return Ok(Self::from_net(net));
        }
        let addr: IpAddr = s
            .parse()
            .map_err(|_| RangeError::Syntax(text.to_string()))?;
        Ok(Self::single(addr))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.form {
            Form::Single => write!(f, "{}", self.first),
            Form::Cidr(len) => write!(f, "{}/{}", self.first, len),
            Form::Span => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn r(s: &str) -> IpRange {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_three_forms_and_prints_them_back() {
        for text in [
            "192.168.1.75",
            "10.1.0.0/24",
            "10.2.0.5-10.2.0.9",
            "2001:db8::1",
            "2001:db8::/32",
            "2001:db8::5-2001:db8::9",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert_eq!(r(text).to_string(), text);
        }
        assert_eq!(r(" 10.2.0.5 - 10.2.0.9 ").to_string(), "10.2.0.5-10.2.0.9");
    }

    #[test]
    fn rejects_malformed_ranges() {
        for text in [
            "",
            "10.0.0",
            "10.0.0.1/33",
            "10.0.0.0/",
            "2001:db8::/129",
            "example.com",
            "10.0.0.1-",
            "10.0.0.1-10.0.0.x",
        ] {
            assert!(
                matches!(text.parse::<IpRange>(), Err(RangeError::Syntax(_))),
                "{text}"
            );
        }
        assert!(matches!(
            "10.0.0.1-2001:db8::1".parse::<IpRange>(),
            Err(RangeError::MixedFamilies(_))
        ));
        assert!(matches!(
            "10.0.0.9-10.0.0.1".parse::<IpRange>(),
            Err(RangeError::Reversed(_))
        ));
        assert!(matches!(
            "10.1.0.1/24".parse::<IpRange>(),
            Err(RangeError::HostBits(_, _))
        ));
    }

    #[test]
    fn containment_and_overlap() {
        let big = r("10.0.0.0/16");
        let small = r("10.0.1.0-10.0.1.20");
        let across = r("10.0.255.0-10.1.0.5");
        assert!(big.contains_range(&small));
        assert!(!small.contains_range(&big));
        assert!(big.overlaps(&across) && !big.contains_range(&across));
        assert!(!big.overlaps(&r("10.1.0.0/16")));
        assert!(!big.overlaps(&r("::/0")));
        assert!(big.contains(ip("10.0.200.1")));
        assert!(!big.contains(ip("::ffff:10.0.200.1")));
        assert_eq!(r("10.2.0.5-10.2.0.9").size(), 5);
        assert_eq!(r("::/0").size(), u128::MAX);
        assert_eq!(r("0.0.0.0/0").size(), 1 << 32);
    }

    #[test]
    fn cidrs_of_a_span() {
        let nets: Vec<String> = r("10.2.0.5-10.2.0.9")
            .cidrs()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.2.0.5/32", "10.2.0.6/31", "10.2.0.8/31"]);
        assert_eq!(r("::/0").cidrs().len(), 1);
    }

    proptest! {
        #[test]
        fn cidrs_cover_exactly_the_range(a in any::<u32>(), len in 0u32..5000) {
            let first = std::net::Ipv4Addr::from(a);
            let last = std::net::Ipv4Addr::from(a.saturating_add(len));
            let range = IpRange { first: first.into(), last: last.into(), form: Form::Span };
            let nets = range.cidrs();
            let covered: u128 = nets.iter().map(|n| IpRange::from_net(*n).size()).sum();
            prop_assert_eq!(covered, range.size());
            for n in &nets {
                prop_assert!(range.contains_range(&IpRange::from_net(*n)));
            }
        }
    }
}
