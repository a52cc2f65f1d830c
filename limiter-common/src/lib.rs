//! What the kernel programs and the daemon of limiter share: the admission
//! rule, address forms, and the layout of every map.
#![no_std]

pub mod addr;
pub mod admission;
pub mod maps;
pub mod rate;
pub mod refusals;

pub use admission::{
    Evaluation, Headroom, Limits, Rule, UNLIMITED, admits, admits_any_source, evaluate, headroom,
};
