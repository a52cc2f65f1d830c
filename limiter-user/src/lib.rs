//! limiter: Exchange's receive-connector limits, enforced in XDP.
//!
//! The library holds everything the `limiter` binary does, so that the
//! end-to-end tests drive the same code.

pub mod api;
#[cfg(feature = "bench")]
pub mod baseline;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod docs;
pub mod events;
pub mod fleet;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod preflight;
pub mod query;
pub mod resets;
pub mod responder;
pub mod selection;
pub mod sockdiag;
