//! The operator's pure policies: retention from DedupPolicies, dedup-window coverage, and the
//! topic, stream and queue plans.

pub mod coverage;
pub mod queues;
pub mod retention;
pub mod streams;
pub mod topics;
