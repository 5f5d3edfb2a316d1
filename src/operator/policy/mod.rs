//! The operator's pure policies: retention from DedupPolicies, dedup-window coverage, and the
//! topic and stream plans.

pub mod coverage;
pub mod retention;
pub mod streams;
pub mod topics;
