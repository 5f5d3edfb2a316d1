//! The operator's pure policies: retention from DedupPolicies, dedup-window coverage, and the
//! topic plan.

pub mod coverage;
pub mod retention;
pub mod topics;
