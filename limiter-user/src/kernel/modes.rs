//! How the programs meet an interface: the XDP attach mode asked for and
//! got, and the link layer that picks the program.

use limiter_common::maps::programs;

/// How the XDP program got attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Driver,
    Generic,
}

impl AttachedMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
        }
    }
}

/// What a frame on an interface starts with, which decides the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// An Ethernet header (and maybe VLAN tags): `admit`.
    Ethernet,
    /// None: the IP header (`wg0`, `tun0`): `admit_l3`.
    None,
}

impl LinkLayer {
    pub(super) fn program(self) -> &'static str {
        match self {
            LinkLayer::Ethernet => programs::ADMIT,
            LinkLayer::None => programs::ADMIT_L3,
        }
    }
}

/// Which XDP mode to ask for (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeRequest {
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
    /// Native (the driver's) only.
    Driver,
    /// Generic (skb) only.
    Skb,
}
