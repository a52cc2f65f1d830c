//! [`PassXdp`]: an XDP program that passes every frame, attached to the
//! client's end of a lab's veth.
//!
//! A veth delivers the frames that the other end's XDP program sends back
//! (XDP_TX, as the `reset` action does) only once an XDP program runs on
//! the receiving end too: it is that program's NAPI that picks them up. A
//! real NIC needs nothing of the kind.

use aya::programs::XdpMode;
use limiter::baseline::{BARE_PASS, Baseline};

use crate::Lab;

/// Detached on drop.
pub struct PassXdp {
    _baseline: Baseline,
}

impl PassXdp {
    pub fn attach(lab: &Lab) -> PassXdp {
        let iface = lab.client_iface().to_string();
        let baseline = lab.client_ns().run(move || {
            let mut baseline = Baseline::load().expect("loading the baseline programs");
            baseline
                .attach(BARE_PASS, &iface, XdpMode::Driver)
                .expect("attaching XDP to the client's veth");
            baseline
        });
        PassXdp {
            _baseline: baseline,
        }
    }
}
