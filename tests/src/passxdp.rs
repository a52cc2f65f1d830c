//! [`PassXdp`]: an XDP program that passes every frame, attached to the
//! client's end of a lab's veth.
//!
//! A veth delivers the frames that the other end's XDP program sends back
//! (XDP_TX, as the `reset` action does) only once an XDP program runs on
//! the receiving end too: it is that program's NAPI that picks them up. A
//! real NIC needs nothing of the kind. The program is limiter's own `admit`
//! with no connector configured, which passes everything.

use limiter::kernel::{Kernel, TableSizes, XdpModeRequest};

use crate::Lab;

/// Detached (with its maps freed) on drop.
pub struct PassXdp {
    _kernel: Kernel,
}

impl PassXdp {
    pub fn attach(lab: &Lab) -> PassXdp {
        let iface = lab.client_iface().to_string();
        let kernel = lab.client_ns().run(move || {
            let mut kernel = Kernel::load(
                TableSizes {
                    sources: 16,
                    handshakes: 16,
                    established: 16,
                },
                None,
            )
            .expect("loading the XDP program");
            kernel
                .attach_xdp(&iface, XdpModeRequest::Driver)
                .expect("attaching XDP to the client's veth");
            kernel
        });
        PassXdp { _kernel: kernel }
    }
}
