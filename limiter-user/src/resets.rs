//! Resetting the connections the kernel judged over a cap when their
//! handshake completed (or could not count): only userspace can reset a
//! socket from outside it, with sock_diag `SOCK_DESTROY`, in the socket's
//! own network namespace. Each reset names the socket's cookie, so that it
//! never hits a later socket of the same addresses and ports.

use std::sync::Mutex;

use limiter_common::maps::{ResetRequest, reset_reason};

use crate::{netns::Namespaces, selection::from_addr, sockdiag};

/// What became of a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The socket was reset.
    Done,
    /// There is no such socket any more (closed, or its addresses taken by
    /// another socket since): nothing to do.
    Gone,
    /// It failed; the request stays pending, for the next sweep.
    Failed,
}

impl Outcome {
    /// Whether the request is settled.
    pub fn settled(self) -> bool {
        self != Outcome::Failed
    }
}

/// Resets connections; shared by the reset ring's reader and the sweep.
pub struct Resetter {
    /// The daemon's network namespace, where it resets directly.
    own_netns: u64,
    /// The other namespaces met so far, by cookie.
    namespaces: Mutex<Namespaces>,
}

impl Resetter {
    pub fn new(own_netns: u64) -> Resetter {
        Resetter {
            own_netns,
            namespaces: Mutex::new(Namespaces::default()),
        }
    }

    /// Resets the connection of `request`.
    pub fn reset(&self, request: &ResetRequest) -> Outcome {
        let conn = request.conn;
        let cookie = request.socket_cookie;
        let result = if conn.netns == self.own_netns || conn.netns == 0 {
            sockdiag::destroy(&conn.flow, cookie)
        } else {
            let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
            match namespaces.run_in(conn.netns, || sockdiag::destroy(&conn.flow, cookie)) {
                Ok(Some(result)) => result,
                // No process is in that namespace any more: nor is the socket.
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            }
        };
        let why = if request.reason == reset_reason::TABLE_FULL {
            "a table it needed was full"
        } else {
            "over a cap when its handshake completed"
        };
        let shown = format!(
            "{}:{} -> {}:{}",
            from_addr(&conn.flow.remote),
            conn.flow.remote_port,
            from_addr(&conn.flow.local),
            conn.flow.local_port
        );
        match result {
            Ok(true) => {
                log::debug!("reset {shown} ({why})");
                Outcome::Done
            }
            Ok(false) => {
                log::debug!("{shown} closed before its reset ({why})");
                Outcome::Gone
            }
            Err(e) => {
                log::warn!("resetting {shown} ({why}): {e}; trying again");
                Outcome::Failed
            }
        }
    }
}
