//! Layer 7: what only the `lockstep` binary uses.

pub mod examples;
pub mod logging;
