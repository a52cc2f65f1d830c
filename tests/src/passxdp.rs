//! [`PassXdp`]: an XDP program that passes every frame, attached to the
//! client's end of a lab's veth.
//!
//! A veth delivers the frames that the other end's XDP program sends back
//! (XDP_TX, as the `reset` action does) only once an XDP program runs on
//! the receiving end too: it is that program's NAPI that picks them up. A
//! real NIC needs nothing of the kind.

use aya::programs::XdpMode;
use limiter::baseline::{BARE_PASS, Baseline};

use crate::{Lab, Netns};

/// Detached on drop.
pub struct PassXdp {
    _baseline: Baseline,
}

impl PassXdp {
    pub fn attach(lab: &Lab) -> PassXdp {
        Self::attach_to(lab.client_ns(), lab.client_iface(), XdpMode::Driver)
    }

    /// The program on `iface` in `ns`, in `mode` (another program already
    /// there, say, for a limiter that must fail to attach).
    pub fn attach_to(ns: &Netns, iface: &str, mode: XdpMode) -> PassXdp {
        let iface = iface.to_string();
        let baseline = ns.run(move || {
            let mut baseline = Baseline::load().expect("loading the baseline programs");
            baseline
                .attach(BARE_PASS, &iface, mode)
                .expect("attaching XDP");
            baseline
        });
        PassXdp {
            _baseline: baseline,
        }
    }
}
