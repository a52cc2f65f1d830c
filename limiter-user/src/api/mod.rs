//! The control socket: one JSON request per line, one JSON reply per line.
//!
//! Only root may connect, or the members of the daemon's `--control-group`
//! (the socket is mode 0600, or 0660 with the group, and the daemon checks
//! the peer's credentials as well).

mod client;
mod protocol;

pub use self::{
    client::{ClientError, Replies, request},
    protocol::{
        ConnectorStatus, DEFAULT_CONTROL_PATH, InterfaceStatus, Reloaded, Reply, Request, Status,
    },
};
